//! Regressions found by the `qcow2_model` fuzz target (fuzz/fuzz_targets/qcow2_model.rs),
//! each reduced to the few calls that show it. Images are built in memory by code.

use std::sync::Arc;
use vmimg::qcow2::check::{check, CheckReport, Repair};
use vmimg::{Image, MemoryStorage, Qcow2Create, Qcow2Open};

/// A new image created on memory by `create`, opened for writing.
async fn new_image(create: Qcow2Create) -> (Arc<MemoryStorage>, Image) {
    let s = Arc::new(MemoryStorage::new());
    create.create_on(s.as_ref(), None).await.unwrap();
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    (s, img)
}

/// Fails unless `check` finds the image clean: no corruption, no leak, no check error.
fn assert_clean(report: &CheckReport, what: &str) {
    assert_eq!(
        (
            report.corruptions,
            report.leaks,
            report.check_errors,
            report.failure.clone()
        ),
        (0, 0, 0, None),
        "{what}: {report:#?}"
    );
}

/// A zero-size image has an L1 table of no entries; `Qcow2Create::create_on`
/// (vmimg/src/qcow2/create.rs, `let l1_clusters = ... .max(1)`) still allocates one cluster
/// for it and gives it refcount 1, but nothing references that cluster (`l1_size` is 0), so
/// `check` (and `qemu-img check`, exit status 3) reports it leaked. QEMU creates such an
/// image without an L1 cluster (`l1_table_offset` 0) and its check finds no errors.
#[tokio::test]
async fn a_zero_size_image_has_no_leaked_l1_cluster() {
    for (cluster, compat) in [(512, "1.1"), (512, "0.10"), (65536, "1.1")] {
        let s = MemoryStorage::new();
        Qcow2Create::new(0)
            .cluster_size(cluster)
            .compat(compat)
            .unwrap()
            .create_on(&s, None)
            .await
            .unwrap();
        let report = check(&s, Repair::None).await.unwrap();
        assert_clean(
            &report,
            &format!("new empty image, {cluster}-byte clusters, {compat}"),
        );
    }
}

/// Compressed clusters are packed into shared host clusters, one reference each. With a
/// narrow refcount width the shared cluster's refcount reaches its maximum (1 for 1-bit
/// refcounts, 3 for 2-bit, 15 for 4-bit), and the next compressed write fails with
/// `Unsupported` ("refcount of cluster N would exceed the 1-bit maximum"): `alloc_bytes`
/// (vmimg/src/qcow2/write.rs) calls `add_ref` on the partly used cluster without first
/// checking its refcount against the maximum. QEMU's `qcow2_alloc_bytes` starts a new
/// cluster when the refcount is saturated, so `qemu-io -c 'write -c ...'` keeps working on
/// such images (checked with 1-bit refcounts and three compressed 64 KiB clusters).
#[tokio::test]
async fn compressed_writes_work_with_narrow_refcounts() {
    for bits in [1u32, 2, 4] {
        let (s, img) = new_image(
            Qcow2Create::new(2 << 20)
                .cluster_size(65536)
                .refcount_bits(bits),
        )
        .await;
        // Twenty clusters of one byte value each compress to a few dozen bytes: all fit
        // into one host cluster, which would need a refcount of 20.
        for i in 0..20u64 {
            let data = vec![0x40 + i as u8; 65536];
            img.write_compressed(i * 65536, &data)
                .await
                .unwrap_or_else(|e| panic!("{bits}-bit refcounts, compressed write {i}: {e}"));
        }
        img.flush().await.unwrap();
        for i in 0..20u64 {
            let mut buf = vec![0u8; 65536];
            img.read(i * 65536, &mut buf).await.unwrap();
            assert!(
                buf.iter().all(|&b| b == 0x40 + i as u8),
                "{bits}-bit refcounts: cluster {i} reads back wrong"
            );
        }
        let report = check(s.as_ref(), Repair::None).await.unwrap();
        assert_clean(&report, &format!("{bits}-bit refcounts"));
    }
}

/// The cache of decompressed clusters (`Qcow2Driver::decompressed`, filled by
/// `decompressed_cluster` in vmimg/src/qcow2/mod.rs) is keyed by the compressed cluster
/// descriptor (host offset and sector count) and only cleared by `invalidate_cache`. When a
/// compressed cluster is overwritten its host bytes are freed; a later compressed write can
/// be given the same host offset, and a descriptor equal to the old one, and reads of it
/// (and copy-on-write of a partial write into it, `read_own` in write.rs) then return the
/// old, cached content. Neither `write_compressed_impl` nor `release_entry`
/// (vmimg/src/qcow2/write.rs) drops the cached entry. A plain read only shows the wrong
/// bytes, but a partial write into the new cluster copies the stale bytes around it into
/// the new data cluster: the wrong content reaches the disk and survives a reopen.
#[tokio::test]
async fn a_reused_compressed_extent_never_reads_from_the_stale_decompressed_cache() {
    let (s, img) = new_image(Qcow2Create::new(1 << 20).cluster_size(65536)).await;
    img.write_compressed(0, &[0x11; 65536]).await.unwrap();
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    // Overwriting the compressed cluster frees its extent; the flush lets it be reused.
    img.write(0, &[0x33; 65536]).await.unwrap();
    img.flush().await.unwrap();
    img.write_compressed(65536, &[0x22; 65536]).await.unwrap();
    img.read(65536, &mut buf).await.unwrap();
    let first_wrong = buf.iter().position(|&b| b != 0x22);
    assert_eq!(
        first_wrong.map(|i| (i, buf[i])),
        None,
        "the new compressed cluster reads back old bytes"
    );
    // A partial write into the new compressed cluster copies the rest of it: it must copy
    // the new content, and so must survive a reopen.
    img.write(65536, &[0x44; 512]).await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    let img = Qcow2Open::storage(s.clone()).open().await.unwrap();
    img.read(65536, &mut buf).await.unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x44));
    let first_wrong = buf[512..].iter().position(|&b| b != 0x22);
    assert_eq!(
        first_wrong.map(|i| (i + 512, buf[i + 512])),
        None,
        "copy-on-write copied old bytes to disk"
    );
    let report = check(s.as_ref(), Repair::None).await.unwrap();
    assert_clean(&report, "after the writes");
}
