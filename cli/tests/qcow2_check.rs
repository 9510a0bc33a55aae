//! `vmimg check` against `qemu-img check`, on images built at test time by QEMU's tools.
//!
//! * Consistent images of every kind (compressed, snapshots, extended L2, 512-byte clusters
//!   with 1- and 64-bit refcounts, v2, preallocation, backing and data files, bitmaps): both
//!   tools print the same report, human and JSON, byte for byte, and exit 0.
//! * Damaged images (made by editing refcounts and L1/L2 entries in place): the same report,
//!   the same messages on stderr (after the program name) and the same exit status; then
//!   `-r leaks` and `-r all` (human and JSON output) on two copies: the same output and
//!   status, byte-identical repaired files, which `qemu-img check` finds consistent and
//!   `qemu-img compare` finds identical to the undamaged image.
//!
//! Each test reports every failing case at once, by name.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

// ---------------------------------------------------------------------------------------------
// Building and editing images
// ---------------------------------------------------------------------------------------------

/// Creates qcow2 image `name` in `dir` with qemu-img (`opts` may be empty).
fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    qemu_img_in(dir, &args).ok();
    dir.join(name)
}

/// Runs qemu-io commands on image `name` in `dir`.
fn io(dir: &Path, name: &str, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(name);
    qemu_io_in(dir, &args).ok();
}

/// Takes an internal snapshot with qemu-img.
fn snapshot(dir: &Path, name: &str, tag: &str) {
    qemu_img_in(dir, ["snapshot", "-c", tag, name]).ok();
}

/// Copies image `from` to `to` in `dir`; returns the new path.
fn copy(dir: &Path, from: &str, to: &str) -> PathBuf {
    std::fs::copy(dir.join(from), dir.join(to)).expect("copy image");
    dir.join(to)
}

/// Reads a big-endian integer of `width` bytes.
fn get_be(path: &Path, offset: u64, width: usize) -> u64 {
    let f = std::fs::File::open(path).expect("open image");
    let mut b = vec![0u8; width];
    f.read_exact_at(&mut b, offset).expect("read image");
    b.iter().fold(0, |acc, &x| (acc << 8) | u64::from(x))
}

/// Writes a big-endian integer of `width` bytes.
fn put_be(path: &Path, offset: u64, width: usize, value: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(&value.to_be_bytes()[8 - width..], offset)
        .expect("write image");
}

/// The header facts the edits need.
struct Layout {
    cluster_bits: u32,
    refcount_order: u32,
    l1_offset: u64,
    reftable_offset: u64,
}

fn layout(path: &Path) -> Layout {
    let version = get_be(path, 4, 4);
    Layout {
        cluster_bits: get_be(path, 20, 4) as u32,
        refcount_order: if version >= 3 {
            get_be(path, 96, 4) as u32
        } else {
            4
        },
        l1_offset: get_be(path, 40, 8),
        reftable_offset: get_be(path, 48, 8),
    }
}

/// Where the stored refcount of host cluster `cluster` lives: byte offset, width in bits
/// and bit shift within the byte (for widths below 8).
fn refcount_slot(path: &Path, cluster: u64) -> (u64, u64, u64) {
    let l = layout(path);
    let bits = 1u64 << l.refcount_order;
    let per_block = (1u64 << l.cluster_bits) * 8 / bits;
    let block = get_be(path, l.reftable_offset + cluster / per_block * 8, 8) & !0x1ff;
    assert_ne!(block, 0, "cluster {cluster} has no refcount block");
    let bit = cluster % per_block * bits;
    (block + bit / 8, bits, bit % 8)
}

fn refcount(path: &Path, cluster: u64) -> u64 {
    let (at, bits, shift) = refcount_slot(path, cluster);
    if bits >= 8 {
        get_be(path, at, bits as usize / 8)
    } else {
        (get_be(path, at, 1) >> shift) & ((1 << bits) - 1)
    }
}

fn set_refcount(path: &Path, cluster: u64, value: u64) {
    let (at, bits, shift) = refcount_slot(path, cluster);
    if bits >= 8 {
        put_be(path, at, bits as usize / 8, value);
    } else {
        let mask = ((1u64 << bits) - 1) << shift;
        let byte = get_be(path, at, 1);
        put_be(path, at, 1, (byte & !mask) | ((value << shift) & mask));
    }
}

/// Adds `delta` to the stored refcount of `cluster`.
fn bump_refcount(path: &Path, cluster: u64, delta: i64) {
    let v = refcount(path, cluster);
    set_refcount(
        path,
        cluster,
        v.checked_add_signed(delta).expect("refcount range"),
    );
}

/// Offset of the active L1 entry covering guest offset `guest` (standard L2 entries).
fn l1_entry_at(path: &Path, guest: u64) -> u64 {
    let l = layout(path);
    let l2_entries = 1u64 << (l.cluster_bits - 3);
    l.l1_offset + (guest >> l.cluster_bits) / l2_entries * 8
}

/// Offset of the active L2 entry of guest offset `guest` (standard L2 entries).
fn l2_entry_at(path: &Path, guest: u64) -> u64 {
    let l = layout(path);
    let l2_entries = 1u64 << (l.cluster_bits - 3);
    let l2 = get_be(path, l1_entry_at(path, guest), 8) & L1_OFFSET_MASK;
    assert_ne!(l2, 0, "guest offset {guest:#x} has no L2 table");
    l2 + (guest >> l.cluster_bits) % l2_entries * 8
}

/// Host cluster index of the L2 table covering guest offset `guest`.
fn l2_table_cluster(path: &Path, guest: u64) -> u64 {
    (get_be(path, l1_entry_at(path, guest), 8) & L1_OFFSET_MASK) >> layout(path).cluster_bits
}

/// Host cluster index of the data of guest offset `guest`.
fn data_cluster(path: &Path, guest: u64) -> u64 {
    (get_be(path, l2_entry_at(path, guest), 8) & L1_OFFSET_MASK) >> layout(path).cluster_bits
}

/// Appends one cluster to the file and gives it refcount 1: a pure leak.
fn leak_appended_cluster(path: &Path) {
    let cs = 1u64 << layout(path).cluster_bits;
    let len = std::fs::metadata(path).expect("stat").len();
    let end = len.div_ceil(cs) * cs;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.set_len(end + cs).expect("grow image");
    set_refcount(path, end / cs, 1);
}

// ---------------------------------------------------------------------------------------------
// Comparing the tools
// ---------------------------------------------------------------------------------------------

/// Drops the program name QEMU and vmimg put before their own error lines.
fn normalise_stderr(s: &str) -> String {
    s.lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("vmimg: "))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Differences between two runs of the same command, as one message (empty: none).
fn differences(what: &str, q: &Run, v: &Run) -> String {
    let mut out = String::new();
    if q.status != v.status {
        out += &format!(
            "{what}: exit status qemu-img {} vmimg {}\n",
            q.status, v.status
        );
    }
    if q.stdout != v.stdout {
        out += &format!(
            "{what}: stdout differs\n--- qemu-img\n{}--- vmimg\n{}",
            q.stdout, v.stdout
        );
    }
    let (qe, ve) = (normalise_stderr(&q.stderr), normalise_stderr(&v.stderr));
    if qe != ve {
        out += &format!("{what}: stderr differs\n--- qemu-img\n{qe}\n--- vmimg\n{ve}\n");
    }
    out
}

/// Runs `check ARGS NAME` (human, JSON and quiet) with both tools in `dir`; returns the
/// differences and qemu-img's exit status.
fn check_differences(dir: &Path, name: &str, args: &[&str]) -> (String, i32) {
    let mut diffs = String::new();
    let mut status = 0;
    for output in [&["--output=human"][..], &["--output=json"], &["-q"]] {
        let mut a = vec!["check"];
        a.extend(args);
        a.extend(output);
        a.push(name);
        let q = qemu_img_in(dir, &a);
        let v = vmimg_in(dir, &a);
        diffs += &differences(&format!("{name} {}", a[1..a.len() - 1].join(" ")), &q, &v);
        status = q.status;
    }
    (diffs, status)
}

/// Collects failures of table-driven cases and reports them all at the end.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, case: &str, msg: String) {
        if !msg.is_empty() {
            self.0.push(format!("[{case}]\n{msg}"));
        }
    }

    /// Both tools check image `name` alike, with exit status `status`.
    fn checks_agree(&mut self, dir: &Path, name: &str, status: i32) {
        let (mut diffs, got) = check_differences(dir, name, &[]);
        if got != status {
            diffs += &format!("qemu-img check exits {got}, the test expects {status}\n");
        }
        self.add(name, diffs);
    }

    /// Repairs copies of image `damaged` with both tools (`-r mode`, human and JSON output):
    /// same output and exit status `status`, byte-identical results. When `pristine` is
    /// given, the result must also be consistent for qemu-img and read like `pristine`.
    fn repairs_agree(
        &mut self,
        dir: &Path,
        damaged: &str,
        mode: &str,
        status: i32,
        pristine: Option<&str>,
    ) {
        for output in ["human", "json"] {
            let case = format!("{damaged} -r {mode} --output={output}");
            // Same file name in two directories: the outputs name it alike.
            let q_dir = dir.join(format!("{damaged}-{mode}-{output}.qemu"));
            let v_dir = dir.join(format!("{damaged}-{mode}-{output}.vmimg"));
            let mut msg = String::new();
            for sub in [&q_dir, &v_dir] {
                std::fs::create_dir(sub).expect("create directory");
                std::fs::copy(dir.join(damaged), sub.join(damaged)).expect("copy image");
            }
            let args = ["check", "-r", mode, "--output", output, damaged];
            let q = qemu_img_in(&q_dir, args);
            let v = vmimg_in(&v_dir, args);
            msg += &differences(&case, &q, &v);
            if v.status != status {
                msg += &format!("vmimg exits {}, the test expects {status}\n", v.status);
            }
            let v_path = v_dir.join(damaged);
            if let Err(e) = compare_files(&v_path, &q_dir.join(damaged)) {
                msg += &format!("repaired files differ: {e}\n");
            }
            if let Some(pristine) = pristine {
                let after = qemu_img(["check", s(&v_path)]);
                if after.status != 0 {
                    msg += &format!(
                        "qemu-img check after vmimg's repair exits {}:\n{}{}",
                        after.status, after.stdout, after.stderr
                    );
                }
                let same = qemu_img(["compare", s(&dir.join(pristine)), s(&v_path)]);
                if same.status != 0 {
                    msg += &format!("qemu-img compare with {pristine}: {}", same.stdout);
                }
            }
            self.add(&case, msg);
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Consistent images
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_and_compressed_images_check_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();

    create(d, "plain.qcow2", "100M", "");
    io(
        d,
        "plain.qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 50M 70k",
            "write -P 3 600k 10k",
            "write -z 2M 1M",
            "discard 0 128k",
        ],
    );
    create(d, "empty.qcow2", "1G", "");
    create(d, "deflate.qcow2", "20M", "");
    io(
        d,
        "deflate.qcow2",
        &[
            "write -c -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -c -P 5 1M 192k",
            "write -P 7 4M 64k",
        ],
    );
    create(d, "zstd.qcow2", "20M", "compression_type=zstd");
    io(
        d,
        "zstd.qcow2",
        &["write -c -P 1 0 256k", "write -P 2 1M 4k"],
    );
    create(d, "big-clusters.qcow2", "100M", "cluster_size=2M");
    io(d, "big-clusters.qcow2", &["write -P 1 0 3M"]);
    // Scattered 4 KiB clusters: fragmentation counts.
    create(d, "fragmented.qcow2", "50M", "cluster_size=4096");
    let writes: Vec<String> = (1..40u64)
        .map(|i| format!("write -P {i} {} 4k", (i * 7919 % 500) * 4096 * 20))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    io(d, "fragmented.qcow2", &writes);

    for name in [
        "plain.qcow2",
        "empty.qcow2",
        "deflate.qcow2",
        "zstd.qcow2",
        "big-clusters.qcow2",
        "fragmented.qcow2",
    ] {
        f.checks_agree(d, name, 0);
    }
    f.assert_none();
}

#[test]
fn snapshot_and_small_cluster_images_check_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();

    create(d, "snap.qcow2", "20M", "");
    io(d, "snap.qcow2", &["write -P 1 0 1M"]);
    snapshot(d, "snap.qcow2", "s1");
    io(
        d,
        "snap.qcow2",
        &["write -P 2 512k 1M", "write -c -P 4 5M 128k"],
    );
    snapshot(d, "snap.qcow2", "s2");
    io(d, "snap.qcow2", &["write -P 3 0 64k"]);

    create(d, "v2.qcow2", "20M", "compat=0.10");
    io(d, "v2.qcow2", &["write -P 1 0 300k"]);
    snapshot(d, "v2.qcow2", "s");
    io(d, "v2.qcow2", &["write -P 2 64k 64k"]);

    create(d, "rc1.qcow2", "4M", "cluster_size=512,refcount_bits=1");
    io(d, "rc1.qcow2", &["write -P 1 0 100k", "write -P 2 1M 3k"]);

    create(d, "rc64.qcow2", "4M", "cluster_size=512,refcount_bits=64");
    io(d, "rc64.qcow2", &["write -P 1 0 100k", "write -P 2 1M 3k"]);
    snapshot(d, "rc64.qcow2", "s");
    io(
        d,
        "rc64.qcow2",
        &["write -P 3 0 2k", "write -c -P 4 2M 512"],
    );

    for name in ["snap.qcow2", "v2.qcow2", "rc1.qcow2", "rc64.qcow2"] {
        f.checks_agree(d, name, 0);
    }
    f.assert_none();
}

#[test]
fn extended_l2_preallocated_backed_data_file_and_bitmap_images_check_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();

    create(d, "extl2.qcow2", "20M", "extended_l2=on");
    io(
        d,
        "extl2.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 100k 3k",
            "write -z 1M 64k",
            "write -c -P 3 2M 64k",
            "write -z 3M 4k",
        ],
    );
    create(d, "prealloc.qcow2", "30M", "preallocation=metadata");
    create(d, "base.qcow2", "16M", "");
    io(d, "base.qcow2", &["write -P 1 0 2M"]);
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "overlay.qcow2",
        ],
    )
    .ok();
    io(d, "overlay.qcow2", &["write -P 9 1M 100k"]);
    create(
        d,
        "datafile.qcow2",
        "8M",
        "data_file=datafile.raw,data_file_raw=on",
    );
    io(d, "datafile.qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    create(d, "bitmap.qcow2", "64M", "");
    qemu_img_in(d, ["bitmap", "--add", "bitmap.qcow2", "bm0"]).ok();
    io(d, "bitmap.qcow2", &["write -P 3 0 3M"]);

    for name in [
        "extl2.qcow2",
        "prealloc.qcow2",
        "overlay.qcow2",
        "datafile.qcow2",
        "bitmap.qcow2",
    ] {
        f.checks_agree(d, name, 0);
    }
    f.assert_none();
}

#[test]
fn raw_images_have_no_check() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "disk.raw", "1M"]).ok();
    create(d, "disk.qcow2", "1M", "");
    for args in [
        &["check", "disk.raw"][..],
        &["check", "--output=json", "disk.raw"],
        &["check", "-r", "all", "disk.raw"],
        &["check", "-f", "raw", "disk.qcow2"],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!(q.status, 63, "{args:?}: {q:?}");
        assert_eq!(v.status, 63, "{args:?}: {v:?}");
        assert_eq!(v.stdout, "");
        assert_eq!(
            v.stderr,
            "vmimg: This image format does not support checks\n"
        );
        // (Opening a probed raw image for writing also makes QEMU warn about probing.)
        assert!(
            q.stderr
                .ends_with("qemu-img: This image format does not support checks\n"),
            "{args:?}: {q:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Damaged refcounts and flags
// ---------------------------------------------------------------------------------------------

/// A 64 MiB image with 1 MiB at 0 and 100 KiB at 10 MiB (64 KiB clusters).
fn base_image(d: &Path, name: &str) -> PathBuf {
    let p = create(d, name, "64M", "");
    io(d, name, &["write -P 1 0 1M", "write -P 2 10M 100k"]);
    p
}

#[test]
fn leaks_are_reported_and_freed_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();
    base_image(d, "base.qcow2");

    // A cluster with a refcount and no reference: a pure leak.
    leak_appended_cluster(&copy(d, "base.qcow2", "leak.qcow2"));
    f.checks_agree(d, "leak.qcow2", 3);
    // The L2 table counted twice: a leak, and its L1 entry's OFLAG_COPIED is wrong.
    let p = copy(d, "base.qcow2", "l2twice.qcow2");
    bump_refcount(&p, l2_table_cluster(&p, 0), 1);
    f.checks_agree(d, "l2twice.qcow2", 2);

    for name in ["leak.qcow2", "l2twice.qcow2"] {
        for mode in ["leaks", "all"] {
            f.repairs_agree(d, name, mode, 0, Some("base.qcow2"));
        }
    }
    f.assert_none();
}

#[test]
fn missing_references_need_repair_all_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();
    base_image(d, "base.qcow2");

    // A data cluster with refcount 0: -r leaks gives up ("need to rebuild", status 1), -r
    // all rebuilds the refcount structure.
    let p = copy(d, "base.qcow2", "zero-refcount.qcow2");
    set_refcount(&p, data_cluster(&p, 64 << 10), 0);
    f.checks_agree(d, "zero-refcount.qcow2", 2);
    f.repairs_agree(d, "zero-refcount.qcow2", "leaks", 1, None);
    f.repairs_agree(d, "zero-refcount.qcow2", "all", 0, Some("base.qcow2"));

    // Shared by a snapshot (refcount 2) but counted once: a corruption that -r all fixes in
    // place; -r leaks leaves it.
    create(d, "snap.qcow2", "20M", "");
    io(d, "snap.qcow2", &["write -P 1 0 1M"]);
    snapshot(d, "snap.qcow2", "s1");
    io(d, "snap.qcow2", &["write -P 2 512k 64k"]);
    let p = copy(d, "snap.qcow2", "shared-low.qcow2");
    let shared = data_cluster(&p, 0);
    assert_eq!(refcount(&p, shared), 2);
    bump_refcount(&p, shared, -1);
    // And one counted three times: a leak.
    bump_refcount(&p, data_cluster(&p, 128 << 10), 1);
    f.checks_agree(d, "shared-low.qcow2", 2);
    f.repairs_agree(d, "shared-low.qcow2", "leaks", 2, None);
    f.repairs_agree(d, "shared-low.qcow2", "all", 0, Some("snap.qcow2"));
    f.assert_none();
}

#[test]
fn oflag_copied_errors_are_reported_and_fixed_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();
    base_image(d, "base.qcow2");

    let p = copy(d, "base.qcow2", "l2-flag.qcow2");
    let at = l2_entry_at(&p, 3 << 16);
    put_be(&p, at, 8, get_be(&p, at, 8) & !COPIED);
    let p = copy(d, "base.qcow2", "l1-flag.qcow2");
    let at = l1_entry_at(&p, 0);
    put_be(&p, at, 8, get_be(&p, at, 8) & !COPIED);

    for name in ["l2-flag.qcow2", "l1-flag.qcow2"] {
        f.checks_agree(d, name, 2);
        // With sound refcounts, even -r leaks fixes the flags (as QEMU does).
        f.repairs_agree(d, name, "leaks", 0, Some("base.qcow2"));
        f.repairs_agree(d, name, "all", 0, Some("base.qcow2"));
    }
    f.assert_none();
}

#[test]
fn one_and_64_bit_refcounts_are_repaired_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();

    create(d, "rc64.qcow2", "4M", "cluster_size=512,refcount_bits=64");
    io(d, "rc64.qcow2", &["write -P 1 0 100k"]);
    snapshot(d, "rc64.qcow2", "s");
    let p = copy(d, "rc64.qcow2", "rc64-leak.qcow2");
    bump_refcount(&p, data_cluster(&p, 4096), 5);
    f.checks_agree(d, "rc64-leak.qcow2", 3);

    create(d, "rc1.qcow2", "4M", "cluster_size=512,refcount_bits=1");
    io(d, "rc1.qcow2", &["write -P 1 0 100k", "write -P 2 1M 3k"]);
    leak_appended_cluster(&copy(d, "rc1.qcow2", "rc1-leak.qcow2"));
    f.checks_agree(d, "rc1-leak.qcow2", 3);
    let p = copy(d, "rc1.qcow2", "rc1-zero.qcow2");
    set_refcount(&p, data_cluster(&p, 8192), 0);
    f.checks_agree(d, "rc1-zero.qcow2", 2);

    for mode in ["leaks", "all"] {
        f.repairs_agree(d, "rc64-leak.qcow2", mode, 0, Some("rc64.qcow2"));
        f.repairs_agree(d, "rc1-leak.qcow2", mode, 0, Some("rc1.qcow2"));
    }
    f.repairs_agree(d, "rc1-zero.qcow2", "all", 0, Some("rc1.qcow2"));
    f.assert_none();
}

#[test]
fn dirty_image_is_rebuilt_and_marked_clean_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();
    create(d, "lazy.qcow2", "16M", "lazy_refcounts=on");
    io(d, "lazy.qcow2", &["write -P 1 0 512k"]);
    // What a crash with lazy refcounts leaves: the dirty bit, and refcounts never written.
    let p = copy(d, "lazy.qcow2", "dirty.qcow2");
    put_be(&p, 72, 8, get_be(&p, 72, 8) | 1);
    for guest in [0u64, 64 << 10, 128 << 10] {
        set_refcount(&p, data_cluster(&p, guest), 0);
    }
    f.checks_agree(d, "dirty.qcow2", 2);
    f.repairs_agree(d, "dirty.qcow2", "all", 0, Some("lazy.qcow2"));
    let repaired = d.join("dirty.qcow2-all-human.vmimg/dirty.qcow2");
    assert_eq!(get_be(&repaired, 72, 8) & 1, 0, "dirty bit cleared");
    f.assert_none();
}

#[test]
fn hostile_metadata_is_reported_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::default();
    base_image(d, "base.qcow2");
    let edit = |name: &str, at: fn(&Path) -> u64, value: fn(u64) -> u64| {
        let p = copy(d, "base.qcow2", name);
        let offset = at(&p);
        put_be(&p, offset, 8, value(get_be(&p, offset, 8)));
    };
    // Reserved bits in an L1 and an L2 entry.
    edit("l1-reserved.qcow2", |p| l1_entry_at(p, 0), |v| v | 1);
    edit("l2-reserved.qcow2", |p| l2_entry_at(p, 0), |v| v | 0x100);
    // An unaligned L2 table offset.
    edit("l2-unaligned.qcow2", |p| l1_entry_at(p, 0), |v| v + 0x200);
    // A data cluster far past the end of the file.
    edit(
        "past-eof.qcow2",
        |p| l2_entry_at(p, 2 << 16),
        |_| COPIED | 0x1000_0000,
    );
    // An unaligned data cluster, and an unaligned preallocated zero cluster (which -r all
    // turns into a plain zero cluster).
    edit(
        "data-unaligned.qcow2",
        |p| l2_entry_at(p, 3 << 16),
        |v| v + 0x200,
    );
    edit(
        "zero-unaligned.qcow2",
        |p| l2_entry_at(p, 3 << 16),
        |v| v + 0x201,
    );
    // A compressed cluster with the copied flag.
    create(d, "comp.qcow2", "4M", "");
    io(d, "comp.qcow2", &["write -c -P 1 0 64k"]);
    let p = copy(d, "comp.qcow2", "comp-copied.qcow2");
    let at = l2_entry_at(&p, 0);
    put_be(&p, at, 8, get_be(&p, at, 8) | COPIED);
    // A refcount block placed past the end of the file (-r all grows the file).
    let p = copy(d, "base.qcow2", "refblock-outside.qcow2");
    put_be(&p, layout(&p).reftable_offset + 8, 8, 4 << 20);
    // A refcount block also used as a data cluster.
    let p = copy(d, "base.qcow2", "refblock-shared.qcow2");
    let block = get_be(&p, layout(&p).reftable_offset, 8);
    let at = l2_entry_at(&p, 1 << 16);
    put_be(&p, at, 8, COPIED | block);
    // Two references to a cluster whose refcount cannot exceed 1.
    create(d, "rc1.qcow2", "1M", "cluster_size=512,refcount_bits=1");
    io(d, "rc1.qcow2", &["write -P 1 0 4k"]);
    let p = copy(d, "rc1.qcow2", "rc1-overflow.qcow2");
    let first = get_be(&p, l2_entry_at(&p, 0), 8);
    put_be(&p, l2_entry_at(&p, 512), 8, first);

    for name in [
        "l1-reserved.qcow2",
        "l2-reserved.qcow2",
        "l2-unaligned.qcow2",
        "past-eof.qcow2",
        "data-unaligned.qcow2",
        "zero-unaligned.qcow2",
        "comp-copied.qcow2",
        "refblock-outside.qcow2",
        "refblock-shared.qcow2",
        "rc1-overflow.qcow2",
    ] {
        f.checks_agree(d, name, 2);
    }
    // What neither tool can fix stays, with the same report.
    for name in ["l1-reserved.qcow2", "past-eof.qcow2", "comp-copied.qcow2"] {
        f.repairs_agree(d, name, "all", 2, None);
    }
    f.repairs_agree(d, "zero-unaligned.qcow2", "all", 0, None);
    f.repairs_agree(d, "refblock-outside.qcow2", "all", 0, Some("base.qcow2"));
    f.repairs_agree(d, "refblock-shared.qcow2", "leaks", 1, None);
    f.repairs_agree(d, "refblock-shared.qcow2", "all", 0, None);
    f.assert_none();
}
