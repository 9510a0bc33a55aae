//! Hostile qcow2 images: crafted byte by byte, each must end in a clear error or in the data
//! QEMU would return — never a panic, a hang or an allocation sized by a crafted field.
//!
//! Every image is laid out by [`Qcow2Builder`], a minimal valid qcow2 writer (header at 0,
//! refcount table, one refcount block, L1 table, then L2 tables and data clusters appended in
//! allocation order), and then damaged on purpose. Each case runs under [`bounded`]: a
//! `tokio::time::timeout` inside a thread of its own, with a watchdog around it that also
//! catches a case stuck in synchronous code (which an async timeout cannot interrupt).
//!
//! Set `QCOW2_HOSTILE_DUMP=/some/dir` to write every crafted image there, to compare with
//! `qemu-io -r -f qcow2 -c 'read -v 0 64k' FILE`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use vmimg::{
    BlockStatusKind, Error, ErrorKind, Image, ImageOpen, ImplicitOpenPolicy, MemoryStorage,
    OpenOptions, PolicyDecision, Qcow2Open, Storage,
};

// ---------------------------------------------------------------------------------------------
// Running cases under a bound
// ---------------------------------------------------------------------------------------------

/// The time limit of one case.
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// Runs `case` on a current-thread runtime of its own thread under `tokio::time::timeout`
/// (`limit`), and fails the test if it panics, times out, or never yields back (the watchdog
/// waits `limit` + 5 s and then leaves the stuck thread behind).
async fn bounded_for<F>(name: &'static str, limit: Duration, case: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let finished = rt
                .block_on(async move { tokio::time::timeout(limit, case).await })
                .is_ok();
            let _ = done_tx.send(finished);
        })
        .expect("spawn case thread");
    match tokio::time::timeout(limit + Duration::from_secs(5), done_rx).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => panic!("case {name} did not finish within {limit:?}"),
        // The sender was dropped: the case panicked. Re-raise its panic here.
        Ok(Err(_)) => match thread.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => panic!("case {name} ended without a result"),
        },
        Err(_) => panic!("case {name} is stuck (did not yield within {limit:?} + 5 s)"),
    }
}

async fn bounded<F>(name: &'static str, case: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    bounded_for(name, CASE_LIMIT, case).await
}

// ---------------------------------------------------------------------------------------------
// The image builder
// ---------------------------------------------------------------------------------------------

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

/// Header field offsets (see docs/interop/qcow2.txt).
mod field {
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
}

/// Lays out a minimal valid qcow2 image in memory:
///
/// ```text
///  cluster 0: header, extensions, backing name | 1: refcount table | 2: refcount block
///  3..: L1 table | then L2 tables and data clusters, in the order they are allocated
/// ```
///
/// Every cluster of the file gets refcount 1 (16-bit refcounts), so `qemu-img check` finds
/// the undamaged images clean.
#[derive(Clone)]
struct Qcow2Builder {
    cluster_bits: u32,
    size: u64,
    version: u32,
    extended_l2: bool,
    zstd: bool,
    extra_incompat: u64,
    data_file_bit: bool,
    data_file_name: Option<String>,
    backing: Option<(String, Option<String>)>,
    feature_table: bool,
    file: Vec<u8>,
    l1_offset: u64,
    l1: Vec<u64>,
    l2_tables: Vec<u64>,
}

impl Qcow2Builder {
    fn new(cluster_bits: u32, size: u64) -> Self {
        let cs = 1u64 << cluster_bits;
        let mut b = Qcow2Builder {
            cluster_bits,
            size,
            version: 3,
            extended_l2: false,
            zstd: false,
            extra_incompat: 0,
            data_file_bit: false,
            data_file_name: None,
            backing: None,
            feature_table: false,
            file: vec![0u8; 3 * cs as usize],
            l1_offset: 3 * cs,
            l1: Vec::new(),
            l2_tables: Vec::new(),
        };
        b.layout_l1();
        b
    }

    /// Extended L2 entries (32 subclusters per cluster; needs clusters >= 16 KiB).
    fn extended_l2(mut self) -> Self {
        assert!(self.l2_tables.is_empty(), "choose the L2 format first");
        self.extended_l2 = true;
        self.layout_l1();
        self
    }

    fn zstd(mut self) -> Self {
        self.zstd = true;
        self
    }

    fn v2(mut self) -> Self {
        self.version = 2;
        self
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / if self.extended_l2 { 16 } else { 8 }
    }

    fn layout_l1(&mut self) {
        let coverage = self.l2_entries() * self.cs();
        let entries = self.size.div_ceil(coverage).max(1);
        let l1_clusters = (entries * 8).div_ceil(self.cs());
        self.l1 = vec![0; entries as usize];
        self.file
            .resize(((3 + l1_clusters) * self.cs()) as usize, 0);
    }

    /// Appends a zeroed cluster and returns its offset.
    fn alloc(&mut self) -> u64 {
        let at = self.file.len() as u64;
        self.file.resize((at + self.cs()) as usize, 0);
        at
    }

    /// Appends `bytes` at the next cluster boundary (padded to whole clusters).
    fn append(&mut self, bytes: &[u8]) -> u64 {
        let at = self.file.len() as u64;
        let len = (bytes.len() as u64).div_ceil(self.cs()).max(1) * self.cs();
        self.file.resize((at + len) as usize, 0);
        self.file[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        at
    }

    /// The L2 table covering `guest`, allocated on first use.
    fn l2_table(&mut self, guest: u64) -> u64 {
        let index = (guest / (self.l2_entries() * self.cs())) as usize;
        if self.l1[index] == 0 {
            let at = self.alloc();
            self.l1[index] = at | COPIED;
            self.l2_tables.push(at);
        }
        self.l1[index] & OFFSET_MASK
    }

    /// Sets the raw L2 entry (and subcluster bitmap, with extended L2) of guest `guest`.
    fn set_l2(&mut self, guest: u64, entry: u64, bitmap: u64) {
        let table = self.l2_table(guest);
        let index = (guest / self.cs()) % self.l2_entries();
        if self.extended_l2 {
            put64(&mut self.file, table + index * 16, entry);
            put64(&mut self.file, table + index * 16 + 8, bitmap);
        } else {
            put64(&mut self.file, table + index * 8, entry);
        }
    }

    /// Stores `data` (at most a cluster) in a new cluster mapped at guest `guest`.
    fn data(&mut self, guest: u64, data: &[u8]) -> u64 {
        assert!(guest % self.cs() == 0 && data.len() as u64 <= self.cs());
        let host = self.alloc();
        self.file[host as usize..host as usize + data.len()].copy_from_slice(data);
        let bitmap = if self.extended_l2 { 0xffff_ffff } else { 0 };
        self.set_l2(guest, host | COPIED, bitmap);
        host
    }

    /// Compresses a whole cluster with the image's compression type.
    fn compress(&self, cluster: &[u8]) -> Vec<u8> {
        assert_eq!(cluster.len() as u64, self.cs());
        if self.zstd {
            zstd::bulk::compress(cluster, 3).unwrap()
        } else {
            let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
            let mut out = vec![0u8; c.deflate_compress_bound(cluster.len())];
            let n = c.deflate_compress(cluster, &mut out).unwrap();
            out.truncate(n);
            out
        }
    }

    /// A compressed-cluster descriptor (bits 0..=61 of the L2 entry): `sectors` 512-byte
    /// sectors from `host` (1 ..= the field's maximum).
    fn descriptor(&self, host: u64, sectors: u64) -> u64 {
        let x = 62 - (self.cluster_bits - 8);
        assert!(host < 1 << x && sectors >= 1 && sectors - 1 < 1 << (62 - x));
        host | ((sectors - 1) << x)
    }

    /// The largest sector count a descriptor can hold.
    fn max_sectors(&self) -> u64 {
        1 << (self.cluster_bits - 8)
    }

    /// Maps guest cluster `guest` to `stream`, stored at the next cluster boundary, as a
    /// compressed cluster (sector count: what the stream needs, or `sectors`).
    fn compressed_raw(&mut self, guest: u64, stream: &[u8], sectors: Option<u64>) -> u64 {
        let host = self.append(stream);
        let sectors = sectors.unwrap_or((stream.len() as u64).div_ceil(512));
        let d = self.descriptor(host, sectors);
        self.set_l2(guest, COMPRESSED | d, 0);
        host
    }

    /// Stores `cluster` compressed at guest `guest`.
    fn compressed(&mut self, guest: u64, cluster: &[u8]) -> u64 {
        let stream = self.compress(cluster);
        self.compressed_raw(guest, &stream, None)
    }

    /// The finished image.
    fn build(&self) -> Vec<u8> {
        let cs = self.cs();
        let mut f = self.file.clone();
        // Header.
        f[0..4].copy_from_slice(b"QFI\xfb");
        put32(&mut f, 4, self.version);
        put32(&mut f, 20, self.cluster_bits);
        put64(&mut f, 24, self.size);
        put32(&mut f, 36, self.l1.len() as u32);
        put64(&mut f, 40, self.l1_offset);
        put64(&mut f, 48, cs); // refcount table
        put32(&mut f, 56, 1);
        let mut pos = if self.version >= 3 {
            let mut incompat = self.extra_incompat;
            if self.data_file_bit {
                incompat |= INCOMPAT_DATA_FILE;
            }
            if self.zstd {
                incompat |= INCOMPAT_COMPRESSION;
            }
            if self.extended_l2 {
                incompat |= INCOMPAT_EXTL2;
            }
            put64(&mut f, 72, incompat);
            put32(&mut f, 96, 4); // refcount_order: 16-bit refcounts
            put32(&mut f, 100, 112); // header_length
            f[104] = u8::from(self.zstd);
            112
        } else {
            assert!(!self.zstd && !self.extended_l2 && !self.data_file_bit);
            72
        };
        // Header extensions.
        let ext = |f: &mut Vec<u8>, pos: &mut u64, ty: u32, data: &[u8]| {
            put32(f, *pos, ty);
            put32(f, *pos + 4, data.len() as u32);
            let at = (*pos + 8) as usize;
            f[at..at + data.len()].copy_from_slice(data);
            *pos += 8 + (data.len() as u64).div_ceil(8) * 8;
        };
        if let Some((_, Some(fmt))) = &self.backing {
            ext(&mut f, &mut pos, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some(name) = &self.data_file_name {
            ext(&mut f, &mut pos, EXT_DATA_FILE, name.as_bytes());
        }
        if self.feature_table {
            let mut table = Vec::new();
            for (kind, bit, name) in [(0u8, 0u8, "dirty bit"), (0, 1, "corrupt bit")] {
                let mut e = [0u8; 48];
                e[0] = kind;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&e);
            }
            ext(&mut f, &mut pos, EXT_FEATURE_TABLE, &table);
        }
        pos += 8; // end of the extension area (type 0, already zero)
        if let Some((name, _)) = &self.backing {
            put64(&mut f, 8, pos);
            put32(&mut f, 16, name.len() as u32);
            f[pos as usize..pos as usize + name.len()].copy_from_slice(name.as_bytes());
            pos += name.len() as u64;
        }
        assert!(pos <= cs, "header does not fit in cluster 0");
        // L1 table.
        for (i, &e) in self.l1.iter().enumerate() {
            put64(&mut f, self.l1_offset + 8 * i as u64, e);
        }
        // Refcounts: table entry 0 -> block at cluster 2; every cluster of the file counts 1.
        put64(&mut f, cs, 2 * cs);
        let clusters = f.len() as u64 / cs;
        assert!(
            clusters <= cs / 2,
            "refcount block covers {} clusters",
            cs / 2
        );
        for c in 0..clusters {
            f[(2 * cs + 2 * c) as usize + 1] = 1;
        }
        f
    }
}

/// A cluster of recognisable, compressible bytes.
fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 251) as u8) ^ (i % 7) as u8)
        .collect()
}

/// Writes `bytes` to `$QCOW2_HOSTILE_DUMP/name.qcow2` when that variable is set.
fn dump(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("QCOW2_HOSTILE_DUMP") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.qcow2")), bytes).unwrap();
    }
}

fn memory(bytes: &[u8]) -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::from_bytes(bytes))
}

fn deny() -> OpenOptions {
    OpenOptions::new().policy(ImplicitOpenPolicy::deny())
}

/// Opens `bytes` as qcow2 from memory, with the deny policy.
async fn open_bytes(name: &str, bytes: &[u8]) -> vmimg::Result<Image> {
    dump(name, bytes);
    Qcow2Open::storage(memory(bytes))
        .options(deny())
        .open()
        .await
}

async fn read(image: &Image, offset: u64, len: u64) -> vmimg::Result<Vec<u8>> {
    let mut buf = vec![0xeeu8; len as usize];
    image.read(offset, &mut buf).await?;
    Ok(buf)
}

/// Asserts `r` failed with `kind` and a message containing every one of `needles`.
#[track_caller]
fn expect_err<T>(r: vmimg::Result<T>, kind: ErrorKind, needles: &[&str]) -> Error {
    let err = match r {
        Ok(_) => panic!("expected a {kind:?} error, got success"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), kind, "wrong kind: {err:?}");
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
    }
    err
}

/// Awaits `fut`; a panic inside it fails the test as a library bug described by `what`.
async fn no_panic<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(v) => v,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("LIBRARY BUG: {what} panics instead of failing: {msg}")
        }
    }
}

/// Runs `fut` on a thread of its own and fails the test as a library bug described by
/// `what` if it has not finished after `limit`. (A future that never yields cannot be
/// cancelled: its thread is left behind, spinning until the test process exits.)
async fn library_finishes_within<T, F>(limit: Duration, what: &'static str, fut: F) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = tx.send(rt.block_on(fut));
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("LIBRARY BUG: {what}: panicked"),
        Err(_) => panic!("LIBRARY BUG: {what}: not finished after {limit:?}"),
    }
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------------------------------------
// L1 / L2 entries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn l1_entry_unaligned_l2_offset_read_is_corrupt() {
    bounded("l1_unaligned", async {
        let mut b = Qcow2Builder::new(16, 1 << 30);
        b.data(0, &pattern(64 * KIB, 1));
        // L1[1] covers guest [512 MiB, 1 GiB): point it 0x200 into a real table.
        b.data(512 * MIB, &pattern(64 * KIB, 2));
        b.l1[1] += 0x200;
        let image = open_bytes("l1_unaligned", &b.build()).await.unwrap();
        // The sane half still reads.
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        let r = read(&image, 512 * MIB, 4 * KIB).await;
        expect_err(r, ErrorKind::Corrupt, &["L2 table offset", "unaligned"]);
        let r = image.block_status(512 * MIB, 64 * KIB).await;
        expect_err(r, ErrorKind::Corrupt, &["unaligned"]);
    })
    .await;
}

#[tokio::test]
async fn l2_entry_unaligned_data_offset_read_is_corrupt() {
    bounded("l2_unaligned", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let host = b.data(64 * KIB, &pattern(64 * KIB, 2));
        b.set_l2(64 * KIB, COPIED | (host + 0x200), 0);
        let image = open_bytes("l2_unaligned", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        let r = read(&image, 64 * KIB, 512).await;
        let e = expect_err(r, ErrorKind::Corrupt, &["unaligned", "L2 table"]);
        assert!(
            e.to_string().contains(&format!("{:#x}", host + 0x200)),
            "{e}"
        );
        // A read spanning the good and the bad cluster fails as a whole.
        expect_err(
            read(&image, 0, 128 * KIB).await,
            ErrorKind::Corrupt,
            &["unaligned"],
        );
    })
    .await;
}

#[tokio::test]
async fn l2_table_and_data_offsets_past_eof_read_zeros() {
    bounded("past_eof", async {
        // 64 KiB clusters: one L2 table covers 512 MiB; three L1 entries.
        let mut b = Qcow2Builder::new(16, 1536 * MIB);
        b.data(0, &pattern(64 * KIB, 1));
        // Guest cluster 1: data far past the end of the file.
        b.set_l2(64 * KIB, COPIED | (1 << 40), 0);
        // Guest cluster 2: data in the cluster right after the last one of the file.
        let eof = b.build().len() as u64;
        b.set_l2(128 * KIB, COPIED | (eof + 64 * KIB), 0);
        // L1[1]: an L2 table past the end of the file (reads as an all-zero table).
        b.l1[1] = COPIED | (1 << 41);
        // L1[2]: the largest offset an L1 entry can hold.
        b.l1[2] = COPIED | (OFFSET_MASK & !0xffff);
        let image = open_bytes("past_eof", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        for at in [
            64 * KIB,
            128 * KIB,
            512 * MIB,
            1024 * MIB,
            1536 * MIB - 64 * KIB,
        ] {
            let got = read(&image, at, 64 * KIB)
                .await
                .unwrap_or_else(|e| panic!("read at {at:#x}: {e:?}"));
            assert!(all_zero(&got), "offset {at:#x} does not read as zeros");
        }
        // Status queries on the same ranges are answered, not refused.
        for at in [64 * KIB, 512 * MIB, 1024 * MIB] {
            let s = image.block_status(at, 64 * KIB).await.unwrap();
            assert!(s.zero() || s.data(), "{s:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn extended_l2_subcluster_allocated_and_zero_is_corrupt() {
    bounded("extl2_alloc_zero", async {
        let mut b = Qcow2Builder::new(16, MIB).extended_l2();
        let host = b.data(0, &pattern(64 * KIB, 1));
        // Subcluster 0 allocated; subcluster 3 allocated *and* zero.
        b.set_l2(0, COPIED | host, 0b1001 | (0b1000 << 32));
        let image = open_bytes("extl2_alloc_zero", &b.build()).await.unwrap();
        let sc = 2 * KIB;
        // The clean subclusters of the entry: vmimg checks each subcluster, as the spec
        // words it, and serves them; QEMU refuses the whole entry ("Invalid cluster entry
        // found"). Either answer is acceptable here, but not any other data.
        match read(&image, 0, sc).await {
            Ok(got) => assert_eq!(got, pattern(64 * KIB, 1)[..2048]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}"),
        }
        match read(&image, sc, 2 * sc).await {
            Ok(got) => assert!(all_zero(&got)),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}"),
        }
        let r = read(&image, 3 * sc, 512).await;
        expect_err(
            r,
            ErrorKind::Corrupt,
            &["subcluster 3", "both allocated and zero"],
        );
        let r = read(&image, 0, 64 * KIB).await;
        expect_err(r, ErrorKind::Corrupt, &["both allocated and zero"]);
    })
    .await;
}

#[tokio::test]
async fn extended_l2_allocated_without_host_offset_is_corrupt() {
    bounded("extl2_no_offset", async {
        let mut b = Qcow2Builder::new(16, MIB).extended_l2();
        b.data(0, &pattern(64 * KIB, 1));
        b.set_l2(64 * KIB, 0, 1 << 5);
        let image = open_bytes("extl2_no_offset", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        // Subclusters 0..=4 of guest cluster 1 are unallocated: zeros for vmimg, which
        // checks per subcluster; QEMU refuses the whole entry.
        match read(&image, 64 * KIB, 10 * KIB).await {
            Ok(got) => assert!(all_zero(&got)),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}"),
        }
        let r = read(&image, 64 * KIB + 10 * KIB, 2 * KIB).await;
        expect_err(r, ErrorKind::Corrupt, &["subcluster 5", "no offset"]);
        let r = read(&image, 64 * KIB, 64 * KIB).await;
        expect_err(r, ErrorKind::Corrupt, &["no offset"]);
    })
    .await;
}

#[tokio::test]
async fn l1_size_at_qemu_max_with_tiny_file_completes() {
    bounded("l1_max", async {
        // 32 MiB / 8 = 4 Mi entries of 512 MiB each: a 2 PiB disk, in a 256 KiB file whose
        // L1 table (at 0x30000) is all but entirely past the end of the file.
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let mut bytes = b.build();
        let entries = (32 * MIB / 8) as u32;
        put32(&mut bytes, field::L1_SIZE, entries);
        put64(&mut bytes, field::SIZE, u64::from(entries) * 512 * MIB);
        assert!(bytes.len() < 512 * KIB as usize);
        let start = Instant::now();
        match open_bytes("l1_max", &bytes).await {
            Ok(image) => {
                assert_eq!(image.size(), 1 << 51);
                assert_eq!(
                    read(&image, 0, 64 * KIB).await.unwrap(),
                    pattern(64 * KIB, 1)
                );
                let last = image.size() - 64 * KIB;
                assert!(all_zero(&read(&image, last, 64 * KIB).await.unwrap()));
                let s = image.block_status(last, 64 * KIB).await.unwrap();
                assert_eq!(s.kind, BlockStatusKind::Unallocated);
            }
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::InvalidFormat | ErrorKind::Unsupported),
                "{e:?}"
            ),
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // One entry more than QEMU's limit is refused at once.
        put32(&mut bytes, field::L1_SIZE, entries + 1);
        let r = open_bytes("l1_over_max", &bytes).await;
        expect_err(r, ErrorKind::InvalidFormat, &["L1 table", "too large"]);
    })
    .await;
}

#[tokio::test]
async fn refcount_table_of_repeated_blocks_block_status_is_bounded() {
    bounded_for("refcount_scan", Duration::from_secs(20), async {
        // A 384 KiB file: 1-bit refcounts (524288 per 64 KiB block) and a one-cluster
        // refcount table whose 8192 entries all name the same block. Reads never look at
        // refcounts; block status on a data cluster makes vmimg guess whether the image was
        // created with preallocation=metadata, as QEMU does. QEMU counts refcounts only up
        // to the clusters the file holds (6 here) and stops at its threshold; the guess
        // must not cost more than the file is long.
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let mut bytes = b.build();
        put32(&mut bytes, 96, 0); // refcount_order: 1-bit refcounts
        for i in 0..8192 {
            put64(&mut bytes, 64 * KIB + 8 * i, 128 * KIB);
        }
        let image = open_bytes("refcount_scan", &bytes).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        let status = library_finishes_within(
            Duration::from_secs(5),
            "block_status on a data cluster scans every refcount of every refcount-table \
             entry (Qcow2Driver::metadata_preallocated -> Refcounts::count_used: 8192 x \
             524288 entries for a 384 KiB file; 6.7 s in release, hours with 2 MiB \
             clusters, and up to 1024 cached 2 MiB blocks = 2 GiB)",
            async move { image.block_status(0, 64 * KIB).await },
        )
        .await
        .unwrap();
        assert!(status.data(), "{status:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Compressed clusters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn compressed_descriptor_past_eof_read_is_corrupt() {
    bounded("compressed_past_eof", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.compressed(0, &pattern(64 * KIB, 1));
        let eof = b.build().len() as u64;
        // Guest cluster 1: one sector just past the end; cluster 2: far past it, with the
        // largest sector count.
        let d1 = b.descriptor(eof, 1);
        b.set_l2(64 * KIB, COMPRESSED | d1, 0);
        let d2 = b.descriptor((1 << 50) + 0x1234, b.max_sectors());
        b.set_l2(128 * KIB, COMPRESSED | d2, 0);
        let image = open_bytes("compressed_past_eof", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        for at in [64 * KIB, 128 * KIB] {
            let r = read(&image, at, 4 * KIB).await;
            expect_err(r, ErrorKind::Corrupt, &["compressed cluster", "deflate"]);
        }
    })
    .await;
}

#[tokio::test]
async fn compressed_garbage_deflate_stream_read_is_corrupt() {
    bounded("garbage_deflate", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.compressed(0, &pattern(64 * KIB, 1));
        // 0xff...: a final block of the reserved type 3.
        b.compressed_raw(64 * KIB, &[0xff; 1000], None);
        // Random bytes.
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
        b.compressed_raw(128 * KIB, &noise, None);
        // A valid stream that stops short of a whole cluster.
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut short = vec![0u8; 8192];
        let n = c.deflate_compress(&[9u8; 4096], &mut short).unwrap();
        b.compressed_raw(192 * KIB, &short[..n], None);
        let image = open_bytes("garbage_deflate", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        for at in [64 * KIB, 128 * KIB] {
            let r = read(&image, at, 64 * KIB).await;
            expect_err(r, ErrorKind::Corrupt, &["deflate stream is malformed"]);
        }
        let r = read(&image, 192 * KIB, 512).await;
        expect_err(r, ErrorKind::Corrupt, &["not a whole cluster"]);
    })
    .await;
}

#[tokio::test]
async fn compressed_garbage_zstd_stream_read_is_corrupt() {
    bounded("garbage_zstd", async {
        let mut b = Qcow2Builder::new(16, MIB).zstd();
        b.compressed(0, &pattern(64 * KIB, 1));
        b.compressed_raw(64 * KIB, &[0xff; 1000], None);
        // A zstd frame header asking for a 2 GiB window, then noise.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa8];
        frame.extend_from_slice(&[0x5a; 200]);
        b.compressed_raw(128 * KIB, &frame, None);
        // A valid frame that stops short of a whole cluster.
        let short = zstd::bulk::compress(&[3u8; 1000], 3).unwrap();
        b.compressed_raw(192 * KIB, &short, None);
        let image = open_bytes("garbage_zstd", &b.build()).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        for at in [64 * KIB, 128 * KIB] {
            let r = read(&image, at, 64 * KIB).await;
            expect_err(r, ErrorKind::Corrupt, &["zstd stream is malformed"]);
        }
        // The frame ends early; the decoder then takes the zero padding of its last sector
        // for the next frame and finds it malformed (QEMU fails the read too).
        let r = read(&image, 192 * KIB, 512).await;
        expect_err(r, ErrorKind::Corrupt, &["zstd stream"]);
    })
    .await;
}

#[tokio::test]
async fn compressed_max_sector_count_reads_data_bounded() {
    bounded("compressed_max_sectors", async {
        // QEMU reads nb_sectors * 512 bytes (zeros past the end of the file) and stops
        // decoding at a whole cluster, so the trailing bytes do not matter.
        for (bits, zstd) in [(16, false), (16, true), (21, false), (9, false)] {
            let cs = 1u64 << bits;
            let mut b = Qcow2Builder::new(bits, 4 * MIB);
            if zstd {
                b = b.zstd();
            }
            let data = pattern(cs, 5);
            let stream = b.compress(&data);
            // Last thing in the file, so most of the extent is past the end.
            b.compressed_raw(0, &stream, Some(b.max_sectors()));
            // An unaligned start: the length is computed from the sector, not the cluster.
            let host = b.append(&[]) + 300;
            b.file.resize((host + stream.len() as u64) as usize, 0);
            b.file[host as usize..].copy_from_slice(&stream);
            let d = b.descriptor(host, b.max_sectors());
            b.set_l2(cs, COMPRESSED | d, 0);
            let name = format!("compressed_max_sectors_{bits}_{zstd}");
            let image = open_bytes(&name, &b.build()).await.unwrap();
            for at in [0, cs] {
                let got = read(&image, at, cs).await.unwrap();
                assert!(got == data, "{name}: guest {at:#x} differs");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Snapshot table
// ---------------------------------------------------------------------------------------------

/// One snapshot table entry with v3's 16 bytes of extra data (disk size 1 MiB); the name
/// length field says `name_len` whatever `name` holds.
fn snapshot_entry(l1_offset: u64, l1_size: u32, id: &str, name_len: u16, name: &str) -> Vec<u8> {
    let mut e = vec![0u8; 56];
    put64(&mut e, 0, l1_offset);
    put32(&mut e, 8, l1_size);
    e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    e[14..16].copy_from_slice(&name_len.to_be_bytes());
    put32(&mut e, 36, 16); // extra_data_size
    put64(&mut e, 48, MIB); // disk_size
    e.extend_from_slice(id.as_bytes());
    e.extend_from_slice(name.as_bytes());
    e
}

#[tokio::test]
async fn snapshot_entry_past_eof_open_is_invalid_format() {
    bounded("snapshot_past_eof", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let l1 = b.l1_offset;
        // The last cluster of the file: a name of 65535 bytes cannot fit in it.
        let table = b.append(&snapshot_entry(l1, 1, "1", u16::MAX, "snap"));
        let mut bytes = b.build();
        put32(&mut bytes, field::NB_SNAPSHOTS, 1);
        put64(&mut bytes, field::SNAPSHOTS_OFFSET, table);
        let r = open_bytes("snapshot_past_eof", &bytes).await;
        expect_err(r, ErrorKind::InvalidFormat, &["snapshot", "runs past"]);
        // A complete first entry, the second one cut by the end of the file.
        let mut b2 = b.clone();
        let mut t = snapshot_entry(l1, 1, "1", 4, "snap");
        t.resize(t.len().div_ceil(8) * 8, 0);
        let second = snapshot_entry(l1, 1, "2", 100, "x");
        let table = b2.append(&[]);
        let cut = table as usize + t.len() + 20;
        b2.file.truncate(table as usize);
        b2.file.extend_from_slice(&t);
        b2.file.extend_from_slice(&second);
        let mut bytes = b2.build();
        bytes.truncate(cut);
        put32(&mut bytes, field::NB_SNAPSHOTS, 2);
        put64(&mut bytes, field::SNAPSHOTS_OFFSET, table);
        let r = open_bytes("snapshot_second_past_eof", &bytes).await;
        expect_err(r, ErrorKind::InvalidFormat, &["snapshot table entry 1"]);
        // The table itself far past the end of the file.
        let mut bytes = b.build();
        put32(&mut bytes, field::NB_SNAPSHOTS, 1);
        put64(&mut bytes, field::SNAPSHOTS_OFFSET, 1 << 40);
        let r = open_bytes("snapshot_table_past_eof", &bytes).await;
        expect_err(r, ErrorKind::InvalidFormat, &["snapshot"]);
    })
    .await;
}

#[tokio::test]
async fn snapshot_count_huge_open_is_invalid_format() {
    bounded("snapshot_count", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let table = b.append(&snapshot_entry(b.l1_offset, 1, "1", 4, "snap"));
        let mut bytes = b.build();
        put64(&mut bytes, field::SNAPSHOTS_OFFSET, table);
        for n in [u32::MAX, 65537] {
            put32(&mut bytes, field::NB_SNAPSHOTS, n);
            let r = open_bytes("snapshot_count_huge", &bytes).await;
            expect_err(r, ErrorKind::InvalidFormat, &["snapshots is too many"]);
        }
        // At QEMU's limit the count is accepted, and the table is found short.
        put32(&mut bytes, field::NB_SNAPSHOTS, 65536);
        let start = Instant::now();
        let r = open_bytes("snapshot_count_limit", &bytes).await;
        // (The zero bytes after the entry parse as empty entries, up to the end of the file.)
        expect_err(
            r,
            ErrorKind::InvalidFormat,
            &["snapshot table entry", "runs past"],
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // Sanity: the same image with the right count opens and lists the snapshot.
        put32(&mut bytes, field::NB_SNAPSHOTS, 1);
        let image = open_bytes("snapshot_count_one", &bytes).await.unwrap();
        assert_eq!(image.describe().snapshots.len(), 1);
        let snap = Qcow2Open::storage(memory(&bytes))
            .options(deny().snapshot("snap"))
            .open()
            .await
            .unwrap();
        assert_eq!(snap.size(), MIB);
        assert_eq!(
            read(&snap, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
    })
    .await;
}

#[tokio::test]
async fn snapshot_with_hostile_disk_size_or_l1_is_bounded() {
    bounded("snapshot_hostile_l1", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let l1 = b.l1_offset;
        let entries = (32 * MIB / 8) as u32;
        // "huge": disk size u64::MAX with a one-entry L1 table. "far": a 4 Mi-entry L1 table
        // far past the end of the file, for a 2 PiB disk.
        let mut huge = snapshot_entry(l1, 1, "1", 4, "huge");
        put64(&mut huge, 48, u64::MAX);
        huge.resize(huge.len().div_ceil(8) * 8, 0);
        let mut far = snapshot_entry(1 << 44, entries, "2", 3, "far");
        put64(&mut far, 48, u64::from(entries) * 512 * MIB);
        let table = b.append(&[huge, far].concat());
        let mut bytes = b.build();
        put32(&mut bytes, field::NB_SNAPSHOTS, 2);
        put64(&mut bytes, field::SNAPSHOTS_OFFSET, table);
        dump("snapshot_hostile_l1", &bytes);
        // The active state is unaffected.
        let image = open_bytes("snapshot_hostile_l1", &bytes).await.unwrap();
        assert_eq!(image.describe().snapshots.len(), 2);
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        let open_snap = |name: &'static str| {
            Qcow2Open::storage(memory(&bytes))
                .options(deny().snapshot(name))
                .open()
        };
        // QEMU reads a snapshot at the image's current size, whatever disk size the entry
        // records; refusing the absurd size would be fine too.
        let start = Instant::now();
        match open_snap("huge").await {
            Ok(snap) => {
                assert_eq!(snap.size(), MIB);
                assert_eq!(
                    read(&snap, 0, 64 * KIB).await.unwrap(),
                    pattern(64 * KIB, 1)
                );
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e:?}"),
        }
        // Its L1 table lies past the end of the file: unallocated everywhere.
        match open_snap("far").await {
            Ok(snap) => {
                let size = snap.size();
                for at in [0, size - 64 * KIB] {
                    assert!(all_zero(&read(&snap, at, 64 * KIB).await.unwrap()));
                }
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        let r = open_snap("missing").await;
        expect_err(r, ErrorKind::NotFound, &["missing"]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Backing chains
// ---------------------------------------------------------------------------------------------

fn with_backing(b: &mut Qcow2Builder, name: &str) {
    b.backing = Some((name.to_string(), Some("qcow2".to_string())));
}

#[tokio::test]
async fn backing_loop_of_two_files_open_is_invalid_format_naming_loop() {
    bounded("backing_loop", async {
        let dir = tempfile::tempdir().unwrap();
        for (me, other) in [("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")] {
            let mut b = Qcow2Builder::new(16, MIB);
            with_backing(&mut b, other);
            std::fs::write(dir.path().join(me), b.build()).unwrap();
        }
        let start = Instant::now();
        let r = Qcow2Open::path(dir.path().join("a.qcow2")).open().await;
        expect_err(r, ErrorKind::InvalidFormat, &["loop", "a.qcow2"]);
        // Through the probing opener too.
        let r = ImageOpen::path(dir.path().join("b.qcow2")).open().await;
        expect_err(r, ErrorKind::InvalidFormat, &["loop", "b.qcow2"]);
        assert!(start.elapsed() < Duration::from_secs(2));
    })
    .await;
}

#[tokio::test]
async fn backing_self_reference_open_is_invalid_format_naming_loop() {
    bounded("backing_self", async {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Qcow2Builder::new(16, MIB);
        with_backing(&mut b, "self.qcow2");
        std::fs::write(dir.path().join("self.qcow2"), b.build()).unwrap();
        let r = Qcow2Open::path(dir.path().join("self.qcow2")).open().await;
        expect_err(r, ErrorKind::InvalidFormat, &["loop", "self.qcow2"]);
        // The same file reached by another spelling of its name ("./self.qcow2").
        let mut b = Qcow2Builder::new(16, MIB);
        with_backing(&mut b, "./sub/../self2.qcow2");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("self2.qcow2"), b.build()).unwrap();
        let r = Qcow2Open::path(dir.path().join("self2.qcow2")).open().await;
        expect_err(r, ErrorKind::InvalidFormat, &["loop"]);
    })
    .await;
}

const CHAIN_DEPTH: usize = 400;
const CHAIN_MIDDLE: usize = 200;

/// Writes `l0.qcow2` (bottom) .. `l399.qcow2` (top), each backed by the previous one through
/// a relative name; 512-byte clusters, 1 MiB. Returns the top image's path.
///
/// The bottom layer holds 0xb0 at guest cluster 0 and 0xb1 at guest cluster 100; the middle
/// layer holds 0x5a at guest cluster 100 (shadowing the bottom) and 0x5b at guest cluster 7.
fn write_chain(dir: &Path) -> PathBuf {
    for i in 0..CHAIN_DEPTH {
        let mut b = Qcow2Builder::new(9, MIB);
        if i > 0 {
            with_backing(&mut b, &format!("l{}.qcow2", i - 1));
        }
        if i == 0 {
            b.data(0, &[0xb0; 512]);
            b.data(100 * 512, &[0xb1; 512]);
        }
        if i == CHAIN_MIDDLE {
            b.data(100 * 512, &[0x5a; 512]);
            b.data(7 * 512, &[0x5b; 512]);
        }
        std::fs::write(dir.join(format!("l{i}.qcow2")), b.build()).unwrap();
    }
    dir.join(format!("l{}.qcow2", CHAIN_DEPTH - 1))
}

#[tokio::test]
async fn backing_chain_400_deep_reads_right_bytes() {
    bounded("chain_400", async {
        let dir = tempfile::tempdir().unwrap();
        let top = write_chain(dir.path());
        let image = Qcow2Open::path(&top).open().await.unwrap();
        assert_eq!(image.chain_len(), CHAIN_DEPTH);
        assert_eq!(image.size(), MIB);
        let got = read(&image, 0, 64 * KIB).await.unwrap();
        for (cluster, chunk) in got.chunks(512).enumerate() {
            let want = match cluster {
                0 => 0xb0,
                7 => 0x5b,
                100 => 0x5a,
                _ => 0,
            };
            assert!(
                chunk.iter().all(|&x| x == want),
                "guest cluster {cluster} should read {want:#x}"
            );
        }
        // Unaligned, across layers.
        let got = read(&image, 7 * 512 - 3, 6).await.unwrap();
        assert_eq!(got, [0, 0, 0, 0x5b, 0x5b, 0x5b]);
        let s = image.block_status(100 * 512, 512).await.unwrap();
        assert_eq!(s.depth, CHAIN_DEPTH - 1 - CHAIN_MIDDLE);
        let s = image.block_status(0, 512).await.unwrap();
        assert_eq!(s.depth, CHAIN_DEPTH - 1);
        assert!(all_zero(
            &read(&image, MIB - 64 * KIB, 64 * KIB).await.unwrap()
        ));
    })
    .await;
}

#[tokio::test]
async fn backing_chain_deeper_than_max_chain_depth_is_invalid_format() {
    bounded("chain_limit", async {
        let dir = tempfile::tempdir().unwrap();
        let top = write_chain(dir.path());
        let r = Qcow2Open::path(&top)
            .options(OpenOptions::new().max_chain_depth(100))
            .open()
            .await;
        expect_err(r, ErrorKind::InvalidFormat, &["deeper than 100 layers"]);
        // Exactly at the limit it opens.
        let r = Qcow2Open::path(dir.path().join("l99.qcow2"))
            .options(OpenOptions::new().max_chain_depth(100))
            .open()
            .await;
        assert_eq!(r.unwrap().chain_len(), 100);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// External data files
// ---------------------------------------------------------------------------------------------

/// An image with the external-data-file bit whose guest cluster 1 is allocated (in the data
/// file, the host offset equals the guest offset).
fn data_file_image(name: Option<&str>) -> Vec<u8> {
    let mut b = Qcow2Builder::new(16, MIB);
    b.data_file_bit = true;
    b.data_file_name = name.map(str::to_string);
    b.set_l2(64 * KIB, COPIED | (64 * KIB), 0);
    b.build()
}

#[tokio::test]
async fn data_file_bit_without_name_or_option_open_is_invalid_argument() {
    bounded("data_file_missing", async {
        let bytes = data_file_image(None);
        let r = open_bytes("data_file_missing", &bytes).await;
        expect_err(r, ErrorKind::InvalidArgument, &["external data file"]);
        // Permissive policy: nothing to open either.
        let r = Qcow2Open::storage(memory(&bytes)).open().await;
        expect_err(r, ErrorKind::InvalidArgument, &["external data file"]);
    })
    .await;
}

#[tokio::test]
async fn data_file_bit_with_explicit_data_file_reads_it() {
    bounded("data_file_given", async {
        let bytes = data_file_image(None);
        let mut data = vec![0u8; MIB as usize];
        data[64 * KIB as usize..128 * KIB as usize].copy_from_slice(&pattern(64 * KIB, 9));
        data[..64 * KIB as usize].fill(0x77); // not mapped: must not show through
        let image = Qcow2Open::storage(memory(&bytes))
            .options(deny().data_file(memory(&data)))
            .open()
            .await
            .unwrap();
        assert!(all_zero(&read(&image, 0, 64 * KIB).await.unwrap()));
        assert_eq!(
            read(&image, 64 * KIB, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 9)
        );
    })
    .await;
}

#[tokio::test]
async fn data_file_named_etc_passwd_with_deny_is_permission_denied() {
    bounded("data_file_passwd", async {
        let bytes = data_file_image(Some("/etc/passwd"));
        let r = open_bytes("data_file_passwd", &bytes).await;
        expect_err(
            r,
            ErrorKind::PermissionDenied,
            &["/etc/passwd", "data file"],
        );
        // A recording policy sees exactly one request, for /etc/passwd, and denies it.
        let asked: Arc<Mutex<Vec<(String, PathBuf, String)>>> = Arc::default();
        let log = Arc::clone(&asked);
        let policy = ImplicitOpenPolicy::custom(move |req| {
            log.lock().unwrap().push((
                req.kind.to_string(),
                req.path.to_path_buf(),
                req.name.to_string(),
            ));
            PolicyDecision::Deny("recorded".into())
        });
        let r = Qcow2Open::storage(memory(&bytes))
            .options(OpenOptions::new().policy(policy))
            .open()
            .await;
        expect_err(r, ErrorKind::PermissionDenied, &["/etc/passwd", "recorded"]);
        let asked = asked.lock().unwrap().clone();
        assert_eq!(
            asked,
            vec![(
                "data file".to_string(),
                PathBuf::from("/etc/passwd"),
                "/etc/passwd".to_string()
            )]
        );
        // From a file too: refused, naming the data file and the image that names it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let r = Qcow2Open::path(&path).options(deny()).open().await;
        expect_err(
            r,
            ErrorKind::PermissionDenied,
            &["/etc/passwd", "img.qcow2"],
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Truncation and header fields
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn truncated_header_open_is_invalid_format() {
    bounded("truncated", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let full = b.build();
        for n in [50, 71, 100, 103] {
            let r = open_bytes(&format!("truncated_{n}"), &full[..n]).await;
            expect_err(r, ErrorKind::InvalidFormat, &["too short"]);
        }
        // v2: the 72-byte header alone is complete.
        let v2 = Qcow2Builder::new(16, MIB).v2().build();
        let r = open_bytes("truncated_v2_50", &v2[..50]).await;
        expect_err(r, ErrorKind::InvalidFormat, &["too short"]);
    })
    .await;
}

#[tokio::test]
async fn truncated_after_header_reads_zeros_like_qemu() {
    bounded("truncated_200", async {
        // The first 200 bytes hold the whole 112-byte header and the end of the extension
        // area. QEMU opens such a file and reads zeros everywhere (every table lies past
        // the end of the file and reads as zeros); so does vmimg.
        let mut b = Qcow2Builder::new(16, MIB);
        b.data(0, &pattern(64 * KIB, 1));
        let full = b.build();
        let image = open_bytes("truncated_200", &full[..200]).await.unwrap();
        assert_eq!(image.size(), MIB);
        assert!(all_zero(&read(&image, 0, MIB).await.unwrap()));
    })
    .await;
}

#[tokio::test]
async fn truncated_inside_header_extension_open_is_invalid_format() {
    bounded("truncated_ext", async {
        // Like qemu-img's images: a feature name table right after the header. Cut at 200
        // bytes it overruns the end of the file. (QEMU reads the missing bytes as zeros and
        // opens the image; vmimg refuses it, naming the extension.)
        let mut b = Qcow2Builder::new(16, MIB);
        b.feature_table = true;
        b.data(0, &pattern(64 * KIB, 1));
        let full = b.build();
        let image = open_bytes("feature_table_full", &full).await.unwrap();
        assert_eq!(
            read(&image, 0, 64 * KIB).await.unwrap(),
            pattern(64 * KIB, 1)
        );
        let r = open_bytes("truncated_ext_200", &full[..200]).await;
        expect_err(r, ErrorKind::InvalidFormat, &["extension", "overruns"]);
    })
    .await;
}

#[tokio::test]
async fn empty_file_as_qcow2_is_invalid_format_and_probed_is_empty_raw() {
    bounded("empty", async {
        let r = open_bytes("empty", &[]).await;
        expect_err(r, ErrorKind::InvalidFormat, &["too short", "0 bytes"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.qcow2");
        std::fs::write(&path, []).unwrap();
        let r = Qcow2Open::path(&path).open().await;
        expect_err(r, ErrorKind::InvalidFormat, &["too short"]);
        // Without a format, an empty file probes as raw of size 0.
        let image = ImageOpen::path(&path).open().await.unwrap();
        assert_eq!(image.format(), vmimg::Format::RAW);
        assert_eq!(image.size(), 0);
    })
    .await;
}

#[tokio::test]
async fn unknown_incompatible_bit_open_is_unsupported_naming_bit() {
    bounded("unknown_bit", async {
        let mut b = Qcow2Builder::new(16, MIB);
        b.extra_incompat = (1 << 9) | (1 << 63);
        let r = open_bytes("unknown_bit", &b.build()).await;
        expect_err(
            r,
            ErrorKind::Unsupported,
            // QEMU's words: the unnamed bits as one mask.
            &["Unknown incompatible feature: 8000000000000200"],
        );
    })
    .await;
}

#[tokio::test]
async fn encrypted_luks_open_is_unsupported() {
    bounded("encrypted", async {
        let mut bytes = Qcow2Builder::new(16, MIB).build();
        for method in [2, 1] {
            put32(&mut bytes, field::CRYPT_METHOD, method);
            let r = open_bytes("encrypted", &bytes).await;
            expect_err(
                r,
                ErrorKind::Unsupported,
                &["encrypted images are not supported yet"],
            );
        }
    })
    .await;
}

#[tokio::test]
async fn backing_name_outside_header_cluster_open_is_invalid_format() {
    bounded("backing_name_outside", async {
        let mut bytes = Qcow2Builder::new(9, MIB).build();
        put64(&mut bytes, field::BACKING_FILE_OFFSET, 500);
        put32(&mut bytes, field::BACKING_FILE_SIZE, 100);
        let r = open_bytes("backing_name_outside", &bytes).await;
        expect_err(r, ErrorKind::InvalidFormat, &["backing file name"]);
        // backing_file_offset + backing_file_size overflows 64 bits. QEMU refuses any
        // backing_file_offset past the first cluster ("Invalid backing file offset").
        put64(&mut bytes, field::BACKING_FILE_OFFSET, u64::MAX - 10);
        let r = no_panic(
            "Header::parse with backing_file_offset = u64::MAX - 10, backing_file_size = 100 \
             (qcow2/header.rs parse_backing_name adds them unchecked)",
            open_bytes("backing_name_overflow", &bytes),
        )
        .await;
        expect_err(r, ErrorKind::InvalidFormat, &["backing file name"]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Random mutations
// ---------------------------------------------------------------------------------------------

/// A small valid image with every kind of L2 entry, and the byte ranges worth damaging.
fn mutation_base(extended: bool) -> (Vec<u8>, Vec<(usize, usize)>) {
    let (bits, mut b) = if extended {
        (14, Qcow2Builder::new(14, MIB).extended_l2().zstd())
    } else {
        (12, Qcow2Builder::new(12, MIB))
    };
    let cs = 1u64 << bits;
    b.data(0, &pattern(cs, 1));
    b.data(2 * cs, &pattern(cs, 2));
    b.compressed(4 * cs, &pattern(cs, 3));
    b.set_l2(5 * cs, ZERO_FLAG, 0);
    let host = b.data(6 * cs, &pattern(cs, 4));
    if extended {
        // Subclusters: 0-7 data, 8-15 zero, the rest unallocated.
        b.set_l2(6 * cs, COPIED | host, 0xff | (0xff00 << 32));
    } else {
        b.set_l2(6 * cs, COPIED | host | ZERO_FLAG, 0);
    }
    b.data(MIB - cs, &pattern(cs, 6));
    // The header fields, the rest of the first 4 KiB, then the L1 and L2 tables.
    let mut areas = vec![(0, 120), (0, 4096)];
    areas.push((b.l1_offset as usize, 8 * b.l1.len()));
    for &t in &b.l2_tables {
        areas.push((t as usize, cs as usize));
    }
    (b.build(), areas)
}

/// How far a mutated image got.
#[derive(Debug, Default)]
struct Tally {
    open_failed: usize,
    opened: usize,
    reads_ok: usize,
    reads_failed: usize,
}

/// Opens `bytes` and reads through it; any error is fine, a panic or a hang is not.
async fn exercise(bytes: Vec<u8>, tally: &mut Tally) -> Result<(), String> {
    let image = match Qcow2Open::storage(memory(&bytes))
        .options(deny().l2_cache_size(64 * KIB))
        .open()
        .await
    {
        Ok(image) => image,
        Err(e) => {
            tally.open_failed += 1;
            return check_err(e);
        }
    };
    tally.opened += 1;
    let size = image.size();
    let chunk = 64 * KIB;
    let mut buf = vec![0u8; chunk as usize];
    let mut offsets: Vec<u64> = (0..size.min(2 * MIB)).step_by(chunk as usize).collect();
    offsets.extend([size / 2, size.saturating_sub(chunk), size.saturating_sub(1)]);
    for at in offsets {
        let n = chunk.min(size - at.min(size)) as usize;
        if n == 0 {
            continue;
        }
        match image.read(at, &mut buf[..n]).await {
            Ok(()) => tally.reads_ok += 1,
            Err(e) => {
                tally.reads_failed += 1;
                check_err(e)?;
            }
        }
        if let Err(e) = image.block_status(at, n as u64).await {
            check_err(e)?;
        }
    }
    Ok(())
}

/// Errors are fine, except one that hides a panic of a decompression task.
fn check_err(e: Error) -> Result<(), String> {
    let msg = format!("{e:?}");
    if msg.contains("task failed") || msg.contains("panicked") {
        return Err(msg);
    }
    Ok(())
}

#[tokio::test]
async fn random_mutations_never_panic_or_hang() {
    bounded_for("mutations", Duration::from_secs(60), async {
        let bases = [mutation_base(false), mutation_base(true)];
        // The undamaged bases read back fine.
        for ((bytes, _), name) in bases.iter().zip(["mutation_base", "mutation_base_extl2"]) {
            let image = open_bytes(name, bytes).await.unwrap();
            let all = read(&image, 0, MIB).await.unwrap();
            assert!(!all_zero(&all));
        }
        let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
        let mut tally = Tally::default();
        for i in 0..2000 {
            let (base, areas) = &bases[i % 2];
            let mut bytes = base.clone();
            for _ in 0..rng.usize(1..=8) {
                let area = match rng.u8(..10) {
                    0..=3 => 0,
                    4 => 1,
                    _ => rng.usize(2..areas.len()),
                };
                let (start, len) = areas[area];
                let at = start + rng.usize(..len);
                match rng.u8(..3) {
                    0 => bytes[at] ^= 1 << rng.u8(..8),
                    1 => bytes[at] = rng.u8(..),
                    _ => bytes[at] = [0, 0xff, 0x80, 0x01][rng.usize(..4)],
                }
            }
            let copy = bytes.clone();
            let run = tokio::time::timeout(CASE_LIMIT, exercise(bytes, &mut tally));
            let outcome = std::panic::AssertUnwindSafe(run).catch_unwind().await;
            let fail = match outcome {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(msg))) => Some(format!("hidden panic: {msg}")),
                Ok(Err(_)) => Some("timed out".to_string()),
                Err(_) => Some("panicked".to_string()),
            };
            if let Some(why) = fail {
                let path = std::env::temp_dir().join(format!("qcow2_hostile_mutation_{i}.qcow2"));
                std::fs::write(&path, &copy).unwrap();
                panic!("mutation {i} {why}; image saved to {}", path.display());
            }
        }
        // The mutations must leave enough images openable for the reads to be exercised.
        assert_eq!(tally.open_failed + tally.opened, 2000, "{tally:?}");
        assert!(tally.opened > 500 && tally.reads_ok > 5000, "{tally:?}");
        assert!(
            tally.open_failed > 100 && tally.reads_failed > 100,
            "{tally:?}"
        );
        println!("{tally:?}");
    })
    .await;
}
