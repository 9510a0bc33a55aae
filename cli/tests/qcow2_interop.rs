//! qcow2 interop: images are built at test time by QEMU's own tools (qemu-img, qemu-io) in
//! temporary directories, then read by vmimg and by qemu-img, which must agree.
//!
//! * Content tests (`*_convert_matches_qemu` and the like): `vmimg convert -f qcow2 -O raw`
//!   and `qemu-img convert -f qcow2 -O raw` give byte-identical files (also of internal
//!   snapshots, through `-l snapshot.name=NAME`).
//! * `map_json_*` tests: `vmimg map --output=json` equals `qemu-img map --output=json` as JSON.
//!   Their image files are first rewritten by [`resparsify_dir`] (see there for why).
//! * `info_json_*` tests: `vmimg info --output=json` agrees with `qemu-img info --output=json`
//!   on the keys listed in [`INFO_KEYS`], `format-specific.data` and the snapshot list.
//!
//! Table-driven tests run every case and report all failing cases at once, by name.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const T: u64 = 1 << 40;

// ---------------------------------------------------------------------------------------------
// Building images
// ---------------------------------------------------------------------------------------------

/// Creates image `name` (a name relative to `dir`; the tools run in `dir`) with qemu-img.
fn create(dir: &Path, fmt: &str, name: &str, size: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    qemu_img_in(dir, &args).ok();
    dir.join(name)
}

/// Creates qcow2 overlay `name` over `backing` (both relative to `dir`, so the header keeps
/// the relative name). `size` may be empty to inherit the backing file's size.
fn create_overlay(
    dir: &Path,
    name: &str,
    backing: &str,
    backing_fmt: &str,
    size: &str,
    opts: &str,
) -> PathBuf {
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
    ];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(name);
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img_in(dir, &args).ok();
    dir.join(name)
}

/// Runs qemu-io commands on `name` (relative to `dir`) and fails the test if any fails.
fn qio(dir: &Path, fmt: &str, name: &str, cmds: &[&str]) {
    if cmds.is_empty() {
        return;
    }
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(name);
    let r = qemu_io_in(dir, &args).ok();
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io {cmds:?} on {name} failed:\n{}\n{}",
        r.stdout,
        r.stderr
    );
}

/// `qemu-img ARGS...` in `dir`, which must succeed.
fn qimg(dir: &Path, args: &[&str]) {
    qemu_img_in(dir, args).ok();
}

/// A directory to run conversions from that is not the image's directory, so relative names
/// inside images must be resolved against the image's directory, not the current one.
fn elsewhere() -> PathBuf {
    std::env::temp_dir()
}

/// Rewrites every file in `dir` in place with the same contents, all-zero 4 KiB blocks as real
/// holes and every other block as written data (like `cp --sparse=always`).
///
/// Why: qemu-io's partial-cluster writes leave the rest of the cluster as *unwritten* extents
/// (`fallocate(ZERO_RANGE)`), which ext4's `SEEK_DATA` reports as holes only until something
/// (readahead of either tool's own metadata reads, say) brings those pages into the page
/// cache; from then on they are data. Whenever `qemu-img map` looks into the image file (its
/// metadata-preallocation heuristic, below), its output depends on that page-cache state, and
/// so does vmimg's: the comparison would be flaky. Real holes and written blocks answer the
/// same whatever is cached.
fn resparsify_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            rewrite_file(&path, |_, block| block.iter().all(|&b| b == 0));
        }
    }
}

/// Rewrites `path` in place with the same contents: the 4 KiB blocks for which
/// `hole(offset, block)` holds become real holes, every other block written data.
fn rewrite_file(path: &Path, hole: impl Fn(u64, &[u8]) -> bool) {
    use std::os::unix::fs::FileExt;
    let data = std::fs::read(path).unwrap();
    let tmp = path.with_extension("rewrite-tmp");
    let f = std::fs::File::create(&tmp).unwrap();
    for (i, block) in data.chunks(4096).enumerate() {
        let off = i as u64 * 4096;
        if !hole(off, block) {
            f.write_all_at(block, off).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Converts `img` (or its internal snapshot `snapshot`) to raw with both tools (run in `cwd`)
/// and compares the results byte for byte. Outputs go next to the image.
fn check_convert(cwd: &Path, img: &Path, snapshot: Option<&str>) -> Result<(), String> {
    let name = img.file_name().unwrap().to_str().unwrap();
    let tag = match snapshot {
        Some(sn) => format!("{name}@{sn}"),
        None => name.to_string(),
    };
    let dir = img.parent().unwrap();
    let ours = dir.join(format!("{tag}.vmimg.raw"));
    let theirs = dir.join(format!("{tag}.qemu.raw"));
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let l_opt = snapshot.map(|sn| format!("snapshot.name={sn}"));

    let mut q = vec!["convert", "-f", "qcow2"];
    let mut v = vec!["convert", "-f", "qcow2"];
    if let Some(l) = &l_opt {
        q.extend(["-l", l]);
        v.extend(["-l", l]);
    }
    q.extend(["-O", "raw", s(img), s(&theirs)]);
    v.extend(["-O", "raw", s(img), s(&ours)]);
    qemu_img_in(cwd, &q).ok();
    let r = vmimg_in(cwd, &v);
    if r.status != 0 {
        return Err(format!(
            "{tag}: `vmimg {}` exited with {}:\n{}{}",
            v.join(" "),
            r.status,
            r.stdout,
            r.stderr
        ));
    }
    compare_files(&ours, &theirs).map_err(|e| format!("{tag}: {e}"))?;
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    Ok(())
}

/// Parses a tool's JSON output.
fn parse_json(tool: &str, cmd: &[&str], out: &str) -> Result<Value, String> {
    serde_json::from_str(out).map_err(|e| {
        format!(
            "`{tool} {}` printed invalid JSON ({e}):\n{out}",
            cmd.join(" ")
        )
    })
}

/// Runs `map --output=json -f qcow2 IMG` with both tools and compares the arrays exactly,
/// after [`resparsify_dir`] on the image's directory.
fn check_map_json(cwd: &Path, img: &Path) -> Result<(), String> {
    resparsify_dir(img.parent().unwrap());
    check_map_json_as_is(cwd, img)
}

/// [`check_map_json`] without rewriting the image files first.
fn check_map_json_as_is(cwd: &Path, img: &Path) -> Result<(), String> {
    let args = ["map", "--output=json", "-f", "qcow2", s(img)];
    let q = qemu_img_in(cwd, args).ok();
    let v = vmimg_in(cwd, args);
    if v.status != 0 {
        return Err(format!(
            "`vmimg {}` exited with {}:\n{}{}",
            args.join(" "),
            v.status,
            v.stdout,
            v.stderr
        ));
    }
    let theirs = parse_json("qemu-img", &args, &q.stdout)?;
    let ours = parse_json("vmimg", &args, &v.stdout)?;
    if ours == theirs {
        return Ok(());
    }
    let (a, b) = (ours.as_array(), theirs.as_array());
    let detail = match (a, b) {
        (Some(a), Some(b)) => match a.iter().zip(b).position(|(x, y)| x != y) {
            Some(i) => format!(
                "first differing entry #{i}:\n  vmimg:    {}\n  qemu-img: {}",
                a[i], b[i]
            ),
            None => format!("vmimg has {} entries, qemu-img has {}", a.len(), b.len()),
        },
        _ => "one of the outputs is not an array".to_string(),
    };
    Err(format!(
        "map of {} differs: {detail}\nvmimg:\n{}\nqemu-img:\n{}",
        img.display(),
        v.stdout,
        q.stdout
    ))
}

/// Top-level `info` keys compared as they are.
const INFO_KEYS: [&str; 7] = [
    "virtual-size",
    "cluster-size",
    "format",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
];

/// The compared part of `info --output=json`: [`INFO_KEYS`], `format-specific.data`, and
/// name, id and vm-state-size of each snapshot (an absent list counts as empty).
fn info_subset(info: &Value) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = INFO_KEYS
        .iter()
        .map(|k| (k.to_string(), info.get(*k).cloned().unwrap_or(Value::Null)))
        .collect();
    out.push((
        "format-specific.data".into(),
        info.pointer("/format-specific/data")
            .cloned()
            .unwrap_or(Value::Null),
    ));
    let snapshots: Vec<Value> = info
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|sn| {
                    serde_json::json!({
                        "name": sn.get("name"),
                        "id": sn.get("id"),
                        "vm-state-size": sn.get("vm-state-size"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.push(("snapshots".into(), Value::Array(snapshots)));
    out
}

/// Runs `info --output=json -f qcow2 IMG` with both tools and compares the subsets.
fn check_info_json(cwd: &Path, img: &Path) -> Result<(), String> {
    let args = ["info", "--output=json", "-f", "qcow2", s(img)];
    let q = qemu_img_in(cwd, args).ok();
    let v = vmimg_in(cwd, args);
    if v.status != 0 {
        return Err(format!(
            "`vmimg {}` exited with {}:\n{}{}",
            args.join(" "),
            v.status,
            v.stdout,
            v.stderr
        ));
    }
    let theirs = info_subset(&parse_json("qemu-img", &args, &q.stdout)?);
    let ours = info_subset(&parse_json("vmimg", &args, &v.stdout)?);
    let diffs: Vec<String> = ours
        .iter()
        .zip(&theirs)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| format!("  {}: vmimg {} / qemu-img {}", a.0, a.1, b.1))
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(format!(
        "info of {} differs:\n{}\nvmimg:\n{}\nqemu-img:\n{}",
        img.display(),
        diffs.join("\n"),
        v.stdout,
        q.stdout
    ))
}

/// Fails with every error of `results` (one line block per failing case).
fn all_ok(results: Vec<Result<(), String>>) {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} case(s) failed:\n\n{}",
        errors.len(),
        errors.join("\n\n")
    );
}

/// Runs `f` on every case, prefixing errors with the case's name.
fn each<C>(cases: &[C], name: impl Fn(&C) -> String, f: impl Fn(&C) -> Result<(), String>) {
    all_ok(
        cases
            .iter()
            .map(|c| f(c).map_err(|e| format!("[{}] {e}", name(c))))
            .collect(),
    )
}

/// One plain case: `qemu-img create -f qcow2 -o OPTS img SIZE`, then qemu-io commands, then
/// a convert comparison.
fn simple_case(opts: &str, size: &str, cmds: &[&str]) -> Result<(), String> {
    let dir = tempdir();
    let img = create(dir.path(), "qcow2", "img.qcow2", size, opts);
    qio(dir.path(), "qcow2", "img.qcow2", cmds);
    check_convert(&elsewhere(), &img, None)
}

// ---------------------------------------------------------------------------------------------
// Recipes shared by content, map and info tests
// ---------------------------------------------------------------------------------------------

/// Writes at odd offsets and lengths, zero writes (with and without unmap), discards, and
/// writes into discarded ranges, over a 5 MiB image (not a multiple of 2 MiB clusters).
const ODD_WRITES: [&str; 12] = [
    "write -P 0x11 1000 5000",
    "write -P 0x22 3M 70000",
    "write -P 0x23 5241403 1477",
    "write -z 2000 1000",
    "write -z 1M 300k",
    "write -P 0x24 1048676 10",
    "write -z -u 2M 128k",
    "write -P 0x25 2162688 4096",
    "discard 3149824 8192",
    "discard 4M 512k",
    "write -P 0x26 4195304 2000",
    "write -P 0x27 0 1",
];

/// Plain 64 KiB-cluster image with [`ODD_WRITES`].
fn build_plain(dir: &Path) -> PathBuf {
    let img = create(dir, "qcow2", "plain.qcow2", "5M", "");
    qio(dir, "qcow2", "plain.qcow2", &ODD_WRITES);
    img
}

/// zstd-compressed clusters among plain ones.
fn build_compressed_zstd(dir: &Path) -> PathBuf {
    let img = create(dir, "qcow2", "zstd.qcow2", "4M", "compression_type=zstd");
    qio(
        dir,
        "qcow2",
        "zstd.qcow2",
        &[
            "write -c -P 0x33 0 64k",
            "write -c -P 0x34 128k 64k",
            "write -c -P 0x35 192k 64k",
            "write -P 0x36 64k 1000",
            "write -c -P 0x37 1M 64k",
            "write -P 0x44 1052672 4096",
            "write -c -P 0x38 4128768 64k",
        ],
    );
    img
}

/// base (raw or qcow2) <- mid.qcow2 <- top.qcow2, relative backing names, each layer writing
/// different and overlapping ranges, zeroing and discarding over lower layers' data.
fn build_chain(dir: &Path, base_fmt: &str) -> PathBuf {
    let base = format!("base.{base_fmt}");
    create(dir, base_fmt, &base, "4M", "");
    qio(
        dir,
        base_fmt,
        &base,
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xa2 2M 512k",
            "write -P 0xa3 4190208 4096",
        ],
    );
    create_overlay(dir, "mid.qcow2", &base, base_fmt, "", "");
    qio(
        dir,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0xb1 512k 100000",
            "write -z 2162688 65536",
            "write -P 0xb2 3M 10000",
            "write -c -P 0xb3 1536k 64k",
        ],
    );
    let top = create_overlay(dir, "top.qcow2", "mid.qcow2", "qcow2", "", "");
    qio(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xc1 900k 300k",
            "discard 2M 64k",
            "write -z 3M 4k",
            "write -c -P 0xc2 1600k 64k",
            "write -c -P 0xc5 2228224 64k",
            "write -P 0xc3 4193424 880",
            "write -P 0xc4 1572964 7",
        ],
    );
    top
}

/// An extended-L2 overlay (cluster `cluster`) over a full qcow2 base, with partial-subcluster
/// writes, subcluster zero writes and discards.
fn build_ext_l2_over_backing(dir: &Path, cluster: &str) -> PathBuf {
    create(dir, "qcow2", "base.qcow2", "6M", "");
    qio(dir, "qcow2", "base.qcow2", &["write -P 0xee 0 6M"]);
    let opts = format!("extended_l2=on,cluster_size={cluster}");
    let top = create_overlay(dir, "xl2.qcow2", "base.qcow2", "qcow2", "", &opts);
    qio(
        dir,
        "qcow2",
        "xl2.qcow2",
        &[
            "write -P 5 1000 3000",
            "write -z 8k 4k",
            "discard 16k 2k",
            "write -P 6 70000 100",
            "write -z -u 128k 64k",
            "write -P 7 2100152 5000",
            "discard 3M 1M",
            "write -z 5M 2k",
            "write -P 8 5244928 2048",
            "write -z 4194304 1000",
        ],
    );
    top
}

/// Snapshots s1 and s2 (and a deleted one between them), with writes before, between and
/// after. With `resize`, the image grows by 2 MiB after s1.
fn build_snapshots(dir: &Path, opts: &str, resize: bool) -> PathBuf {
    let img = create(dir, "qcow2", "snap.qcow2", "4M", opts);
    qio(
        dir,
        "qcow2",
        "snap.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -c -P 0x12 2M 64k",
            "write -z 3M 64k",
            "write -P 0x13 4193304 1000",
        ],
    );
    qimg(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    if resize {
        qimg(dir, &["resize", "-q", "snap.qcow2", "+2M"]);
        qio(dir, "qcow2", "snap.qcow2", &["write -P 0x14 5M 4k"]);
    }
    qio(
        dir,
        "qcow2",
        "snap.qcow2",
        &[
            "write -P 0x21 512k 64k",
            "write -P 0x22 1000 300",
            "write -z 2M 64k",
            "discard 0 64k",
        ],
    );
    qimg(dir, &["snapshot", "-c", "gone", "snap.qcow2"]);
    qio(dir, "qcow2", "snap.qcow2", &["write -P 0x23 1M 64k"]);
    qimg(dir, &["snapshot", "-c", "s2", "snap.qcow2"]);
    qimg(dir, &["snapshot", "-d", "gone", "snap.qcow2"]);
    qio(
        dir,
        "qcow2",
        "snap.qcow2",
        &[
            "write -P 0x31 3M 4k",
            "write -P 0x32 2097252 100",
            "write -P 0x33 1M 4k",
        ],
    );
    img
}

/// An image whose data lives in external file `data_file` (relative names are resolved by
/// QEMU against the current directory, so tools must run in `dir`).
fn build_data_file(dir: &Path, data_file: &str, raw: bool) -> PathBuf {
    let opts = format!(
        "data_file={data_file},data_file_raw={}",
        if raw { "on" } else { "off" }
    );
    let img = create(dir, "qcow2", "df.qcow2", "4M", &opts);
    qio(
        dir,
        "qcow2",
        "df.qcow2",
        &[
            "write -P 0x11 1000 5000",
            "write -P 0x22 3M 70000",
            "write -z 1M 64k",
            "write -P 0x33 2M 128k",
            "discard 2M 64k",
            "write -z 2228224 1000",
            "write -P 0x44 4193304 1000",
        ],
    );
    img
}

/// Data bytes written to the 4 TiB sparse image: (pattern, offset, length).
const SPARSE_WRITES: [(u8, u64, u64); 5] = [
    (0x11, 4096, 8192),
    (0x12, 70000, 1000),
    (0x22, T, M),
    (0x33, 4 * T - 64 * K, 64 * K - 512),
    (0x44, 4 * T - 512, 512),
];

/// A 4 TiB sparse image with a few writes near 0, 1 TiB and the end.
fn build_sparse_4t(dir: &Path) -> PathBuf {
    let img = create(dir, "qcow2", "big.qcow2", "4T", "");
    let cmds: Vec<String> = SPARSE_WRITES
        .iter()
        .map(|(p, off, len)| format!("write -P {p:#x} {off} {len}"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qio(dir, "qcow2", "big.qcow2", &cmds);
    img
}

/// Persistent dirty bitmaps (one enabled, one disabled with another granularity).
fn build_bitmaps(dir: &Path) -> PathBuf {
    let img = create(dir, "qcow2", "bm.qcow2", "4M", "");
    qimg(dir, &["bitmap", "--add", "bm.qcow2", "b0"]);
    qimg(dir, &["bitmap", "--add", "-g", "128k", "bm.qcow2", "b1"]);
    qio(
        dir,
        "qcow2",
        "bm.qcow2",
        &["write -P 0x11 1000 5000", "write -P 0x22 3M 70000"],
    );
    qimg(dir, &["bitmap", "--disable", "bm.qcow2", "b1"]);
    img
}

/// A lazy-refcounts image left dirty by a crash (qemu-io `abort` after writes).
fn build_lazy_dirty(dir: &Path) -> PathBuf {
    let img = create(dir, "qcow2", "lazy.qcow2", "4M", "lazy_refcounts=on");
    let r = qemu_io_in(
        dir,
        [
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1000 5000",
            "-c",
            "write -P 0x22 3M 70000",
            "-c",
            "abort",
            "lazy.qcow2",
        ],
    );
    assert_ne!(r.status, 0, "qemu-io abort should have crashed: {r:?}");
    let info = qemu_img_in(dir, ["info", "--output=json", "lazy.qcow2"]).ok();
    assert!(
        info.stdout.contains("\"dirty-flag\": true"),
        "image not dirty:\n{}",
        info.stdout
    );
    img
}

/// Removes the backing-file-format header extension (0xe2792aca) of a qcow2 image, so the
/// backing file's format must be probed (qemu-img refuses to create such images today).
fn strip_backing_format(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let version = be32(&b, 4);
    let mut pos = if version >= 3 {
        be32(&b, 100) as usize
    } else {
        72
    };
    let start = pos;
    let mut kept = Vec::new();
    let mut removed = false;
    loop {
        let magic = be32(&b, pos);
        let len = be32(&b, pos + 4) as usize;
        let total = 8 + len.div_ceil(8) * 8;
        if magic == 0 {
            kept.extend_from_slice(&b[pos..pos + 8]);
            pos += 8;
            break;
        }
        if magic == 0xe279_2aca {
            removed = true;
        } else {
            kept.extend_from_slice(&b[pos..pos + total]);
        }
        pos += total;
    }
    assert!(removed, "no backing format extension in {}", img.display());
    kept.resize(pos - start, 0);
    b[start..pos].copy_from_slice(&kept);
    std::fs::write(img, b).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Content tests
// ---------------------------------------------------------------------------------------------

#[test]
fn cluster_sizes_convert_matches_qemu() {
    each(
        &["512", "4k", "64k", "2M"],
        |cs| format!("cluster_size={cs}"),
        |cs| simple_case(&format!("cluster_size={cs}"), "5M", &ODD_WRITES),
    );
}

#[test]
fn refcount_bits_convert_matches_qemu() {
    each(
        &[1, 2, 4, 8, 16, 32, 64],
        |n| format!("refcount_bits={n}"),
        |n| {
            simple_case(
                &format!("refcount_bits={n}"),
                "4M",
                &[
                    "write -P 0x11 0 256k",
                    "write -c -P 0x12 256k 64k",
                    "write -P 0x13 1000 3000",
                    "discard 64k 128k",
                    "write -P 0x14 1M 192k",
                    "write -z 1114112 4096",
                    "write -P 0x15 4191304 3000",
                ],
            )
        },
    );
}

#[test]
fn compat_versions_and_lazy_refcounts_convert_matches_qemu() {
    each(
        &[
            "compat=0.10",
            "compat=1.1",
            "compat=1.1,lazy_refcounts=on",
            "compat=0.10,cluster_size=4k",
        ],
        |o| o.to_string(),
        |o| {
            simple_case(
                o,
                "5M",
                &[
                    &ODD_WRITES[..],
                    &[
                        "write -c -P 0x31 4456448 64k",
                        "write -z 4456548 100",
                        "write -c -P 0x32 64k 64k",
                    ][..],
                ]
                .concat(),
            )
        },
    );
}

#[test]
fn lazy_refcounts_dirty_image_after_crash_convert_matches_qemu() {
    let dir = tempdir();
    let img = build_lazy_dirty(dir.path());
    all_ok(vec![check_convert(&elsewhere(), &img, None)]);
}

#[test]
fn compressed_clusters_convert_matches_qemu() {
    let cases = [
        ("zlib", 64 * K),
        ("zstd", 64 * K),
        ("zlib", 2 * M),
        ("zstd", 2 * M),
        ("zlib", 512),
        ("zstd", 4 * K),
    ];
    each(
        &cases,
        |(ct, cs)| format!("compression_type={ct},cluster_size={cs}"),
        |(ct, cs)| {
            let cs = *cs;
            let size = (5 * cs).max(4 * M);
            let cmds = [
                format!("write -c -P 0x33 0 {cs}"),
                format!("write -c -P 0x34 {} {cs}", 2 * cs),
                format!("write -c -P 0x35 {} {cs}", 3 * cs),
                format!("write -P 0x36 {cs} {}", (cs / 2).min(1000)),
                format!("write -c -P 0x37 {} {cs}", size - cs),
            ];
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            simple_case(
                &format!("compression_type={ct},cluster_size={cs}"),
                &size.to_string(),
                &cmds,
            )
        },
    );
}

#[test]
fn compressed_clusters_partly_overwritten_convert_matches_qemu() {
    each(
        &["zlib", "zstd"],
        |ct| format!("compression_type={ct}"),
        |ct| {
            simple_case(
                &format!("compression_type={ct}"),
                "4M",
                &[
                    "write -c -P 0x33 0 128k",
                    "write -P 0x44 4k 4k",
                    "write -z 72k 4k",
                    "write -c -P 0x55 256k 64k",
                    "write -P 0x66 256k 64k",
                    "write -c -P 0x77 512k 64k",
                    "discard 512k 64k",
                    "write -c -P 0x78 768k 64k",
                    "write -z 768k 64k",
                    "write -c -P 0x79 1M 64k",
                    "write -P 0x7a 1114111 2",
                ],
            )
        },
    );
}

/// 4 MiB + 1.5 KiB of varied content, 64 KiB at a time: zeros, constant, random
/// (incompressible), half random, low-entropy random, text, sparse random, sawtooth.
fn varied_raw(path: &Path) {
    let mut rng = fastrand::Rng::with_seed(0x0c0f_fee5);
    let size = 4 * M as usize + 1536;
    let mut buf = vec![0u8; size];
    for (i, chunk) in buf.chunks_mut(64 * K as usize).enumerate() {
        match i % 8 {
            0 => {}
            1 => chunk.fill(0x5a),
            2 => rng.fill(chunk),
            3 => {
                let half = chunk.len() / 2;
                rng.fill(&mut chunk[..half]);
            }
            4 => chunk.iter_mut().for_each(|b| *b = rng.u8(0..4)),
            5 => {
                let text: Vec<u8> = (0..)
                    .flat_map(|n| {
                        format!("the quick brown fox {n} jumps over {i} lazy dogs\n").into_bytes()
                    })
                    .take(chunk.len())
                    .collect();
                chunk.copy_from_slice(&text);
            }
            6 => chunk.iter_mut().for_each(|b| {
                if rng.u8(0..8) == 0 {
                    *b = rng.u8(..)
                }
            }),
            _ => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 251) as u8),
        }
    }
    // The partial last cluster is random too.
    let tail = size - 1536;
    rng.fill(&mut buf[tail..]);
    std::fs::write(path, buf).unwrap();
}

#[test]
fn qemu_img_convert_compressed_from_varied_raw_matches_qemu() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    varied_raw(&src);
    let cases = [
        ("zlib", "64k"),
        ("zstd", "64k"),
        ("zstd", "2M"),
        ("zlib", "4k"),
    ];
    each(
        &cases,
        |(ct, cs)| format!("convert -c compression_type={ct},cluster_size={cs}"),
        |(ct, cs)| {
            let name = format!("c-{ct}-{cs}.qcow2");
            let opts = format!("compression_type={ct},cluster_size={cs}");
            qimg(
                dir.path(),
                &[
                    "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", &name,
                ],
            );
            check_convert(&elsewhere(), &dir.path().join(&name), None)
        },
    );
}

#[test]
fn backing_chain_3_deep_convert_matches_qemu() {
    each(
        &["qcow2", "raw"],
        |f| format!("base format {f}"),
        |f| {
            let dir = tempdir();
            let top = build_chain(dir.path(), f);
            check_convert(&elsewhere(), &top, None)?;
            check_convert(&elsewhere(), &dir.path().join("mid.qcow2"), None)
        },
    );
}

#[test]
fn backing_file_shorter_than_overlay_convert_matches_qemu() {
    // (base name, base format, base size): the overlay is 4 MiB; reads past the base's end
    // must be zeros, including in a cluster that straddles it.
    let cases = [
        ("base.qcow2", "qcow2", M),
        ("base.raw", "raw", M),
        ("odd.raw", "raw", 1_000_000),
    ];
    each(
        &cases,
        |(n, f, sz)| format!("{f} base {n} of {sz} bytes"),
        |(name, fmt, size)| {
            let dir = tempdir();
            let d = dir.path();
            if *size == M {
                create(d, fmt, name, "1M", "");
                qio(d, fmt, name, &["write -P 0x55 0 1M"]);
            } else {
                std::fs::write(d.join(name), vec![0x77u8; *size as usize]).unwrap();
            }
            let top = create_overlay(d, "top.qcow2", name, fmt, "4M", "");
            qio(
                d,
                "qcow2",
                "top.qcow2",
                &[
                    "write -P 0x66 512k 4k",
                    "write -P 0x67 1044480 8192",
                    "write -P 0x68 999000 200",
                    "write -P 0x69 2M 4k",
                ],
            );
            check_convert(&elsewhere(), &top, None)
        },
    );
}

#[test]
fn overlay_without_backing_format_probes_it_convert_matches_qemu() {
    each(
        &["qcow2", "raw"],
        |f| format!("probed {f} base"),
        |f| {
            let dir = tempdir();
            let d = dir.path();
            let base = format!("base.{f}");
            create(d, f, &base, "4M", "");
            qio(d, f, &base, &["write -P 0x55 0 1M", "write -P 0x56 3M 64k"]);
            let top = create_overlay(d, "top.qcow2", &base, f, "", "");
            strip_backing_format(&top);
            let info = qemu_img_in(d, ["info", "--output=json", "top.qcow2"]).ok();
            assert!(
                !info.stdout.contains("backing-filename-format"),
                "{}",
                info.stdout
            );
            qio(
                d,
                "qcow2",
                "top.qcow2",
                &["write -P 0x66 512k 4k", "write -z 3M 4k"],
            );
            check_convert(&elsewhere(), &top, None)
        },
    );
}

#[test]
fn extended_l2_convert_matches_qemu() {
    each(
        &["64k", "2M"],
        |cs| format!("extended_l2=on,cluster_size={cs}"),
        |cs| {
            simple_case(
                &format!("extended_l2=on,cluster_size={cs}"),
                "8M",
                &[
                    "write -P 5 1000 3000",
                    "write -P 6 40960 2049",
                    "write -z 102400 6144",
                    "write -z -u 200k 64k",
                    "discard 64k 64k",
                    "write -P 7 2096152 3000",
                    "write -P 8 4M 2M",
                    "write -z 4196352 2048",
                    "discard 4259840 65536",
                    "write -P 10 5M 7",
                    &format!("write -c -P 9 6M {cs}"),
                    "write -P 11 6291556 100",
                ],
            )
        },
    );
}

#[test]
fn extended_l2_over_backing_convert_matches_qemu() {
    each(
        &["64k", "2M"],
        |cs| format!("extended_l2=on,cluster_size={cs} over backing"),
        |cs| {
            let dir = tempdir();
            let top = build_ext_l2_over_backing(dir.path(), cs);
            check_convert(&elsewhere(), &top, None)
        },
    );
}

#[test]
fn internal_snapshots_convert_matches_qemu() {
    each(
        &["", "compat=0.10", "cluster_size=8k", "refcount_bits=4"],
        |o| format!("snapshots with -o '{o}'"),
        |o| {
            let dir = tempdir();
            let img = build_snapshots(dir.path(), o, false);
            check_convert(&elsewhere(), &img, None)?;
            check_convert(&elsewhere(), &img, Some("s1"))?;
            check_convert(&elsewhere(), &img, Some("s2"))
        },
    );
}

#[test]
fn internal_snapshot_taken_before_resize_convert_matches_qemu() {
    // qemu-img converts a snapshot taken at 4 MiB of an image now 6 MiB to 6 MiB (zeros past
    // the snapshot's L1 table).
    let dir = tempdir();
    let img = build_snapshots(dir.path(), "", true);
    all_ok(vec![
        check_convert(&elsewhere(), &img, None),
        check_convert(&elsewhere(), &img, Some("s1")),
        check_convert(&elsewhere(), &img, Some("s2")),
    ]);
}

#[test]
fn external_data_file_convert_matches_qemu() {
    each(
        &[("data.raw", true), ("data.raw", false), ("ABS", false)],
        |(f, raw)| format!("data_file={f},data_file_raw={raw}"),
        |(f, raw)| {
            let dir = tempdir();
            let d = dir.path();
            let abs = d.join("abs-data.raw");
            let name = if *f == "ABS" { s(&abs) } else { f };
            let img = build_data_file(d, name, *raw);
            // QEMU resolves a relative data file name against the current directory.
            check_convert(d, &img, None)
        },
    );
}

#[test]
fn preallocation_modes_convert_matches_qemu() {
    each(
        &["metadata", "falloc", "full"],
        |p| format!("preallocation={p}"),
        |p| {
            simple_case(
                &format!("preallocation={p}"),
                "4M",
                &[
                    "write -P 0x11 1000 5000",
                    "write -z 1M 64k",
                    "discard 2M 64k",
                    "write -P 0x22 3145733 70000",
                    "write -z -u 2228224 65536",
                ],
            )
        },
    );
}

/// Reads `cmds` on `img` with `vmimg io -r` and `qemu-io -r` (format `fmt`) and compares the
/// data lines of the outputs; vmimg must exit 0.
fn check_io_reads(img: &Path, fmt: &str, cmds: &[String]) -> Result<(), String> {
    let mut args = vec!["-f".to_string(), fmt.into(), "-r".into()];
    for c in cmds {
        args.extend(["-c".to_string(), c.clone()]);
    }
    args.push(s(img).into());
    let theirs = qemu_io(&args).ok();
    let mut ours_args = vec!["io".to_string()];
    ours_args.extend(args);
    let ours = vmimg(&ours_args);
    if ours.status != 0 {
        return Err(format!(
            "`vmimg {}` exited with {}:\n{}{}",
            ours_args.join(" "),
            ours.status,
            ours.stdout,
            ours.stderr
        ));
    }
    let (a, b) = (io_data_lines(&ours.stdout), io_data_lines(&theirs.stdout));
    if a != b {
        return Err(format!(
            "io output differs on {}:\nvmimg: {a:#?}\nqemu-io: {b:#?}",
            img.display()
        ));
    }
    Ok(())
}

#[test]
fn resized_image_convert_matches_qemu() {
    let cases = ["grow +3M", "grow +3M then +512", "shrink to 3M"];
    each(
        &cases,
        |c| c.to_string(),
        |case| {
            let dir = tempdir();
            let d = dir.path();
            let img = create(d, "qcow2", "r.qcow2", "4M", "");
            qio(
                d,
                "qcow2",
                "r.qcow2",
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x12 4193304 1000",
                    "write -P 0x13 3M 4k",
                ],
            );
            let mut reads: Vec<String> = vec!["read -P 0x12 4193304 1000".into()];
            match *case {
                "grow +3M" => {
                    qimg(d, &["resize", "-q", "r.qcow2", "+3M"]);
                    qio(d, "qcow2", "r.qcow2", &["write -P 0x14 6M 4096"]);
                    reads.extend([
                        "read -P 0 4M 2M".into(),
                        "read -P 0x14 6M 4096".into(),
                        "read -P 0 6295552 1044480".into(),
                    ]);
                }
                "grow +3M then +512" => {
                    qimg(d, &["resize", "-q", "r.qcow2", "+3M"]);
                    qimg(d, &["resize", "-q", "r.qcow2", "+512"]);
                    qio(d, "qcow2", "r.qcow2", &["write -P 0x15 7340032 512"]);
                    reads.extend(["read -P 0 4M 3M".into(), "read -P 0x15 7340032 512".into()]);
                }
                _ => {
                    qimg(d, &["resize", "-q", "--shrink", "r.qcow2", "3M"]);
                    qimg(d, &["resize", "-q", "r.qcow2", "4M"]);
                    reads = vec!["read -P 0x11 0 64k".into(), "read -P 0 3M 1M".into()];
                }
            }
            check_convert(&elsewhere(), &img, None)?;
            check_io_reads(&img, "qcow2", &reads)
        },
    );
}

#[test]
fn bitmaps_image_convert_matches_qemu() {
    let dir = tempdir();
    let img = build_bitmaps(dir.path());
    all_ok(vec![check_convert(&elsewhere(), &img, None)]);
}

/// `read -P` commands for [`SPARSE_WRITES`] plus zero reads around them.
fn sparse_reads() -> Vec<String> {
    let mut v: Vec<String> = SPARSE_WRITES
        .iter()
        .map(|(p, off, len)| format!("read -P {p:#x} {off} {len}"))
        .collect();
    v.extend([
        "read -P 0 0 4096".to_string(),
        format!("read -P 0 {} {}", T + M, M),
        format!("read -P 0 {} 65536", 2 * T),
        format!("read -P 0 {} 65536", 4 * T - 128 * K),
    ]);
    v
}

#[test]
fn sparse_4t_convert_finishes_and_reads_back() {
    let dir = tempdir();
    let d = dir.path();
    let img = build_sparse_4t(d);
    let out = d.join("out.raw");
    let start = Instant::now();
    let r = vmimg(["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&out)]);
    let elapsed = start.elapsed();
    assert_eq!(
        r.status, 0,
        "vmimg convert failed:\n{}{}",
        r.stdout, r.stderr
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "converting the 4 TiB sparse image took {elapsed:?}"
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 * T);
    assert!(
        allocated(&out) < 64 * M,
        "the raw copy allocates {} bytes: holes were not kept",
        allocated(&out)
    );
    all_ok(vec![
        check_io_reads(&out, "raw", &sparse_reads()),
        check_io_reads(&img, "qcow2", &sparse_reads()),
    ]);
}

// ---------------------------------------------------------------------------------------------
// map --output=json
// ---------------------------------------------------------------------------------------------

#[test]
fn map_json_plain() {
    let dir = tempdir();
    let img = build_plain(dir.path());
    all_ok(vec![check_map_json(&elsewhere(), &img)]);
}

#[test]
fn map_json_compressed_zstd() {
    let dir = tempdir();
    let img = build_compressed_zstd(dir.path());
    all_ok(vec![check_map_json(&elsewhere(), &img)]);
}

#[test]
fn map_json_backing_chain_3_deep() {
    each(
        &["qcow2", "raw"],
        |f| format!("base format {f}"),
        |f| {
            let dir = tempdir();
            let top = build_chain(dir.path(), f);
            check_map_json(&elsewhere(), &top)
        },
    );
}

#[test]
fn map_json_extended_l2_over_backing() {
    each(
        &["64k", "2M"],
        |cs| format!("cluster_size={cs}"),
        |cs| {
            let dir = tempdir();
            let top = build_ext_l2_over_backing(dir.path(), cs);
            check_map_json(&elsewhere(), &top)
        },
    );
}

#[test]
fn map_json_snapshots() {
    let dir = tempdir();
    let img = build_snapshots(dir.path(), "", false);
    all_ok(vec![check_map_json(&elsewhere(), &img)]);
}

#[test]
fn map_json_data_file() {
    each(
        &[true, false],
        |raw| format!("data_file_raw={raw}"),
        |raw| {
            let dir = tempdir();
            let img = build_data_file(dir.path(), "data.raw", *raw);
            check_map_json(dir.path(), &img)
        },
    );
}

#[test]
fn map_json_data_cluster_over_file_hole() {
    // Sixteen full data clusters, one with a 4 KiB real hole in the image file under it. The
    // file is otherwise fully allocated, so QEMU's metadata-preallocation heuristic
    // (qcow2_detect_metadata_preallocation: clusters with a nonzero refcount >=
    // max(allocated_clusters * 10 / 9, allocated_clusters + 2)) stays off and qemu-img does
    // not look at the file's holes: guest [0, 1M) is one data row.
    let dir = tempdir();
    let d = dir.path();
    let img = create(d, "qcow2", "hole.qcow2", "4M", "");
    qio(
        d,
        "qcow2",
        "hole.qcow2",
        &["write -P 0x11 0 1M", "write -P 0 8k 4k"],
    );
    let map = qemu_img_in(d, ["map", "--output=json", "hole.qcow2"]).ok();
    let map: Value = serde_json::from_str(&map.stdout).unwrap();
    let host = map[0]["offset"].as_u64().expect("guest 0 is data") + 8 * K;
    // Every block written (no unwritten extents, no holes) except guest [8k, 12k).
    rewrite_file(&img, |off, _| off == host);
    all_ok(vec![check_map_json_as_is(&elsewhere(), &img)]);
}

#[test]
fn map_json_preallocation_metadata() {
    // Preallocated clusters are mostly holes in the file: QEMU's heuristic turns on and
    // qemu-img reports the holes as `"zero": true, "data": true`.
    let dir = tempdir();
    let d = dir.path();
    let img = create(d, "qcow2", "pm.qcow2", "4M", "preallocation=metadata");
    qio(
        d,
        "qcow2",
        "pm.qcow2",
        &[
            "write -P 0x11 1000 5000",
            "write -P 0x22 3M 70000",
            "write -z 1M 64k",
        ],
    );
    all_ok(vec![check_map_json(&elsewhere(), &img)]);
}

#[test]
fn map_json_sparse_4t() {
    let dir = tempdir();
    let img = build_sparse_4t(dir.path());
    all_ok(vec![check_map_json(&elsewhere(), &img)]);
}

// ---------------------------------------------------------------------------------------------
// info --output=json
// ---------------------------------------------------------------------------------------------

#[test]
fn info_json_plain() {
    let dir = tempdir();
    let img = build_plain(dir.path());
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

#[test]
fn info_json_compressed_zstd() {
    let dir = tempdir();
    let img = build_compressed_zstd(dir.path());
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

#[test]
fn info_json_backing_chain_3_deep() {
    each(
        &["qcow2", "raw"],
        |f| format!("base format {f}"),
        |f| {
            let dir = tempdir();
            let top = build_chain(dir.path(), f);
            check_info_json(&elsewhere(), &top)?;
            check_info_json(&elsewhere(), &dir.path().join("mid.qcow2"))
        },
    );
}

#[test]
fn info_json_extended_l2_over_backing() {
    let dir = tempdir();
    let img = build_ext_l2_over_backing(dir.path(), "64k");
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

#[test]
fn info_json_snapshots() {
    each(
        &["", "compat=0.10"],
        |o| format!("snapshots with -o '{o}'"),
        |o| {
            let dir = tempdir();
            let img = build_snapshots(dir.path(), o, false);
            check_info_json(&elsewhere(), &img)
        },
    );
}

#[test]
fn info_json_data_file() {
    each(
        &[true, false],
        |raw| format!("data_file_raw={raw}"),
        |raw| {
            let dir = tempdir();
            let img = build_data_file(dir.path(), "data.raw", *raw);
            check_info_json(dir.path(), &img)
        },
    );
}

#[test]
fn info_json_sparse_4t() {
    let dir = tempdir();
    let img = build_sparse_4t(dir.path());
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

#[test]
fn info_json_bitmaps() {
    let dir = tempdir();
    let img = build_bitmaps(dir.path());
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

#[test]
fn info_json_lazy_refcounts_dirty() {
    let dir = tempdir();
    let img = build_lazy_dirty(dir.path());
    all_ok(vec![check_info_json(&elsewhere(), &img)]);
}

/// A header rewrite puts the extensions in qemu-img's order (iotest 031): backing format,
/// feature table, then the unknown extensions the image had, even when the image had
/// them first.
#[test]
fn header_rewrite_orders_extensions_as_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    create(d, "qcow2", "base.qcow2", "1M", "");
    for img in ["q.qcow2", "v.qcow2"] {
        let path = create(d, "qcow2", img, "1M", "");
        // An unknown extension in front of the feature table.
        let mut b = std::fs::read(&path).unwrap();
        let header_len = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
        let mut ext = 0x1234_5678u32.to_be_bytes().to_vec();
        ext.extend_from_slice(&7u32.to_be_bytes());
        ext.extend_from_slice(b"unknown\0");
        b.splice(header_len..header_len, ext.iter().copied());
        // The first cluster keeps its size: what moved past it was padding.
        b.drain(65536..65536 + ext.len());
        std::fs::write(&path, b).unwrap();
    }
    let args = |img: &'static str| ["rebase", "-u", "-F", "qcow2", "-b", "base.qcow2", img];
    qemu_img_in(d, args("q.qcow2")).ok();
    vmimg_in(d, args("v.qcow2")).ok();
    let header = |img: &str| std::fs::read(d.join(img)).unwrap()[..65536].to_vec();
    assert!(header("v.qcow2") == header("q.qcow2"));
}
