//! VMDK both ways with QEMU's tools: what qemu-img makes reads here as qemu-img reads it,
//! what vmimg makes reads in QEMU as vmimg meant it, the same files byte for byte (but the
//! random CID), the same maps and info, the same refusals, and parent chains checked by CID.

mod common;

use common::*;
use std::path::Path;

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// A raw file with data, zero runs and holes over several grains.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(9);
    for (i, chunk) in data.chunks_mut(200 << 10).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(90_000);
            if i % 2 == 0 {
                rng.fill(&mut chunk[..n]);
            } else {
                // Compressible data.
                for (j, b) in chunk[..n].iter_mut().enumerate() {
                    *b = (j / 100) as u8;
                }
            }
        }
    }
    std::fs::write(path, &data).unwrap();
}

/// The descriptor text (up to its first NUL) with the CID value blanked (it is random).
fn text_without_cid(bytes: &[u8]) -> Vec<u8> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    text.lines()
        .map(|l| if l.starts_with("CID=") { "CID=" } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// A file of a VMDK image made comparable: a sparse file's header, descriptor (CID
/// blanked) and everything after the descriptor area; a descriptor file's text (CID
/// blanked) and whether it is NUL-padded to whole sectors.
fn without_cid(bytes: &[u8]) -> Vec<u8> {
    if bytes.starts_with(b"KDMV") {
        let area = 512 + 20 * 512;
        let mut out = bytes[..512].to_vec();
        out.extend(text_without_cid(&bytes[512..area.min(bytes.len())]));
        out.extend_from_slice(&bytes[area.min(bytes.len())..]);
        return out;
    }
    let mut out = text_without_cid(bytes);
    out.push(u8::from(bytes.contains(&0) && bytes.len() % 512 == 0));
    out
}

/// Every file of the image `name` in `dir` (the descriptor and its extents), sorted.
fn image_files(dir: &Path, stem: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n == &format!("{stem}.vmdk") || n.starts_with(&format!("{stem}-")))
        .collect();
    v.sort();
    v
}

/// qemu-img info's text without the lines that differ by nature (CID, disk usage).
fn stable_info(text: &str) -> String {
    text.lines()
        .filter(|l| !l.contains("cid:") && !l.contains("disk size"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `create` makes the files qemu-img makes, byte for byte but the CID, in every
/// subformat and with every option.
#[test]
fn create_matches_qemu_img_byte_for_byte_but_the_cid() {
    let dir = tempdir();
    let root = dir.path();
    let option_sets = [
        "",
        "adapter_type=lsilogic",
        "zeroed_grain=on,hwversion=14,toolsversion=12",
        "compat6=on,adapter_type=legacyESX",
    ];
    let mut cases = 0;
    for sub in SUBFORMATS {
        for opts in option_sets {
            if opts.contains("zeroed") && sub.contains("Flat") {
                continue;
            }
            for size in ["0", "1000", "100M", "5G"] {
                let (q, v) = (root.join("q"), root.join("v"));
                for d in [&q, &v] {
                    let _ = std::fs::remove_dir_all(d);
                    std::fs::create_dir(d).unwrap();
                }
                let o = format!(
                    "subformat={sub}{}{opts}",
                    if opts.is_empty() { "" } else { "," }
                );
                qemu_img_in(&q, ["create", "-q", "-f", "vmdk", "-o", &o, "d.vmdk", size]).ok();
                vmimg_in(&v, ["create", "-q", "-f", "vmdk", "-o", &o, "d.vmdk", size]).ok();
                let files = image_files(&q, "d");
                assert_eq!(image_files(&v, "d"), files, "{o} {size}: files");
                for f in files {
                    if f.contains("-flat") || f.contains("-f0") {
                        // Flat extents: empty files of the extent's size.
                        let len = |d: &Path| std::fs::metadata(d.join(&f)).unwrap().len();
                        assert_eq!(len(&v), len(&q), "{o} {size}: {f}");
                        continue;
                    }
                    let (qb, vb) = (
                        std::fs::read(q.join(&f)).unwrap(),
                        std::fs::read(v.join(&f)).unwrap(),
                    );
                    assert!(
                        without_cid(&qb) == without_cid(&vb),
                        "{o} {size}: {f} differs beyond the CID"
                    );
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 72);
}

/// Option errors with qemu-img's words, and nothing left behind.
#[test]
fn create_refusals_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vmdk", "base.vmdk", "10M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "base.raw", "10M"]).ok();
    let cases: [&[&str]; 7] = [
        &["-o", "subformat=foo"],
        &["-o", "adapter_type=scsi"],
        &["-o", "compat6=on,hwversion=7"],
        &["-o", "subformat=monolithicFlat,zeroed_grain=on"],
        &[
            "-o",
            "subformat=monolithicFlat",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
        ],
        &["-b", "base.vmdk", "-F", "raw"],
        &["-b", "base.raw", "-F", "raw"],
    ];
    for extra in cases {
        let mut args = vec!["create", "-q", "-f", "vmdk"];
        args.extend_from_slice(extra);
        args.extend(["new.vmdk", "10M"]);
        let q = qemu_img_in(d, &args).expect_status(1);
        let v = vmimg_in(d, &args).expect_status(1);
        let words = |s: &str| {
            s.lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|(_, w)| w.to_owned())
        };
        assert_eq!(words(&v.stderr), words(&q.stderr), "{extra:?}");
        assert!(!d.join("new.vmdk").exists(), "{extra:?}: file left");
        assert!(image_files(d, "new").is_empty(), "{extra:?}: extent left");
    }
}

/// Every subformat converted by each tool reads in the other as the source; maps and info
/// agree; the sparse subformats come out byte-identical to qemu-img's (but the CID).
#[test]
fn convert_both_ways_in_every_subformat() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 7 << 20);
    for sub in SUBFORMATS {
        for f in std::fs::read_dir(d).unwrap() {
            let n = f.unwrap().file_name().to_string_lossy().into_owned();
            if n.ends_with(".vmdk") {
                std::fs::remove_file(d.join(n)).unwrap();
            }
        }
        let o = format!("subformat={sub}");
        let conv = ["convert", "-f", "raw", "-O", "vmdk", "-o", &o, "src.raw"];
        let mut q = conv.to_vec();
        q.push("q.vmdk");
        let mut v = conv.to_vec();
        v.push("v.vmdk");
        qemu_img_in(d, &q).ok();
        vmimg_in(d, &v).ok();
        for img in ["q.vmdk", "v.vmdk"] {
            qemu_img_in(d, ["compare", "-f", "vmdk", "-F", "raw", img, "src.raw"]).ok();
            vmimg_in(d, ["compare", "-f", "vmdk", "-F", "raw", img, "src.raw"]).ok();
            let qm = qemu_img_in(d, ["map", "--output=json", "-f", "vmdk", img]).ok();
            let vm = vmimg_in(d, ["map", "--output=json", "-f", "vmdk", img]).ok();
            assert_eq!(vm.stdout, qm.stdout, "{sub} {img}: map");
            for out in ["human", "json"] {
                let fmt = format!("--output={out}");
                let qi = qemu_img_in(d, ["info", "-f", "vmdk", &fmt, img]).ok();
                let vi = vmimg_in(d, ["info", "-f", "vmdk", &fmt, img]).ok();
                if out == "human" {
                    assert_eq!(
                        stable_info(&vi.stdout),
                        stable_info(&qi.stdout),
                        "{sub} {img}"
                    );
                } else {
                    let strip = |s: &str| {
                        let mut j: serde_json::Value = serde_json::from_str(s).unwrap();
                        j["format-specific"]["data"]["cid"] = 0.into();
                        j["actual-size"] = 0.into();
                        for c in j["children"].as_array_mut().unwrap() {
                            c["info"]["actual-size"] = 0.into();
                        }
                        j
                    };
                    assert_eq!(strip(&vi.stdout), strip(&qi.stdout), "{sub} {img}: json");
                }
            }
        }
        if sub.contains("Sparse") {
            for f in image_files(d, "q") {
                let twin = f.replacen('q', "v", 1);
                let (qb, vb) = (
                    std::fs::read(d.join(&f)).unwrap(),
                    std::fs::read(d.join(&twin)).unwrap(),
                );
                let qb = String::from_utf8_lossy(&without_cid(&qb)).replace("q-s0", "v-s0");
                let vb = String::from_utf8_lossy(&without_cid(&vb)).into_owned();
                let (qb, vb) = (qb.replace("\"q.vmdk\"", "\"v.vmdk\""), vb);
                assert!(qb == vb, "{sub}: {f} and {twin} differ beyond the CID");
            }
        }
    }
}

/// The same random qemu-io workload, in every writable subformat, on an image made by
/// `qemu-img create` (run by qemu-io) and one made by `vmimg create` (run by `vmimg io`):
/// the same outputs, the same content, clean checks; and each tool reads the other's
/// result as the other does.
#[test]
fn twin_workloads_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let option_sets = [
        "subformat=monolithicSparse",
        "zeroed_grain=on",
        "subformat=monolithicFlat",
        "subformat=twoGbMaxExtentSparse",
        "subformat=twoGbMaxExtentFlat",
    ];
    for (i, opts) in option_sets.into_iter().enumerate() {
        for f in std::fs::read_dir(d).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        qemu_img_in(
            d,
            ["create", "-q", "-f", "vmdk", "-o", opts, "q.vmdk", "24M"],
        )
        .ok();
        vmimg_in(
            d,
            ["create", "-q", "-f", "vmdk", "-o", opts, "v.vmdk", "24M"],
        )
        .ok();
        let mut rng = fastrand::Rng::with_seed(40 + i as u64);
        let mut q = vec!["-f".to_string(), "vmdk".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "vmdk".into()];
        for _ in 0..60 {
            let c = random_command(&mut rng, 24 << 20);
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.vmdk".into());
        v.push("v.vmdk".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(
            io_data_lines(&vo.stdout),
            io_data_lines(&qo.stdout),
            "{opts}"
        );
        qemu_img_in(
            d,
            ["compare", "-f", "vmdk", "-F", "vmdk", "q.vmdk", "v.vmdk"],
        )
        .ok();
        for img in ["q.vmdk", "v.vmdk"] {
            let c = qemu_img_in(d, ["check", "-f", "vmdk", img]).ok();
            assert_eq!(
                c.stdout, "No errors were found on the image.\n",
                "{opts} {img}"
            );
        }
        // What QEMU wrote, read here, byte for byte as qemu-img reads it.
        qemu_img_in(d, ["convert", "-O", "raw", "q.vmdk", "by-qemu.raw"]).ok();
        vmimg_in(d, ["convert", "-O", "raw", "q.vmdk", "by-vmimg.raw"]).ok();
        compare_files(&d.join("by-vmimg.raw"), &d.join("by-qemu.raw")).unwrap();
    }
}

/// A disk that names itself as its parent is refused as a loop, not followed.
#[test]
fn a_vmdk_naming_itself_as_parent_is_refused() {
    let dir = tempdir();
    let d = dir.path();
    vmimg_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "a.vmdk",
            "1M",
        ],
    )
    .ok();
    let text = std::fs::read_to_string(d.join("a.vmdk")).unwrap();
    let cid = text
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .unwrap()
        .to_string();
    let text = text
        .replace("parentCID=ffffffff", &format!("parentCID={cid}"))
        .replace(
            "createType=\"monolithicFlat\"\n",
            "createType=\"monolithicFlat\"\nparentFileNameHint=\"a.vmdk\"\n",
        );
    std::fs::write(d.join("a.vmdk"), text).unwrap();
    let r = vmimg_in(d, ["io", "-c", "read 0 512", "a.vmdk"]).expect_status(1);
    assert!(r.stderr.contains("loop"), "{}", r.stderr);
}

/// Zero writes over unallocated whole grains of a zeroed-grain image become zeroed
/// entries, as in QEMU (the same map there). Over allocated grains vmimg zeroes the grain
/// in place where QEMU makes a zeroed entry and leaks the grain: the same content.
#[test]
fn zeroed_grains_map_as_qemu_makes_them() {
    let dir = tempdir();
    let d = dir.path();
    for img in ["q.vmdk", "v.vmdk"] {
        qemu_img_in(
            d,
            [
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "zeroed_grain=on",
                img,
                "4M",
            ],
        )
        .ok();
    }
    let cmds = ["write -P 5 0 256k", "write -z 64k 128k", "write -z 1M 128k"];
    let mut q = vec!["-f", "vmdk"];
    let mut v = vec!["io", "-f", "vmdk"];
    for c in cmds {
        q.extend(["-c", c]);
        v.extend(["-c", c]);
    }
    q.push("q.vmdk");
    v.push("v.vmdk");
    qemu_io_in(d, &q).ok();
    vmimg_in(d, &v).ok();
    let zeroed = "{ \"start\": 1048576, \"length\": 131072, \"depth\": 0, \"present\": true, \
                  \"zero\": true, \"data\": false, \"compressed\": false},";
    for img in ["q.vmdk", "v.vmdk"] {
        let out = qemu_img_in(d, ["map", "--output=json", "-f", "vmdk", img]).ok();
        assert!(
            out.stdout.lines().any(|l| l == zeroed),
            "{img}: {}",
            out.stdout
        );
    }
    qemu_img_in(d, ["compare", "q.vmdk", "v.vmdk"]).ok();
    // No grain was added for the zeroes: the files are the same length.
    let len = |n: &str| std::fs::metadata(d.join(n)).unwrap().len();
    assert_eq!(len("v.vmdk"), len("q.vmdk"));
}

/// Children made by one tool over a base made by the other read alike; a base written
/// after its child was made (its CID changed) is refused here, and fails reads in QEMU.
#[test]
fn parent_chains_are_checked_by_cid() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 6 << 20);
    qemu_img_in(
        d,
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "src.raw",
            "qbase.vmdk",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "src.raw",
            "vbase.vmdk",
        ],
    )
    .ok();
    let child = |tool: fn(&Path, &[&str]) -> Run, base: &str, name: &str| {
        tool(
            d,
            &["create", "-q", "-f", "vmdk", "-b", base, "-F", "vmdk", name],
        )
        .ok();
    };
    child(|d, a| vmimg_in(d, a), "qbase.vmdk", "vc.vmdk");
    child(|d, a| qemu_img_in(d, a), "vbase.vmdk", "qc.vmdk");
    let info = vmimg_in(d, ["info", "vc.vmdk"]).ok();
    assert!(info
        .stdout
        .contains("backing file: qbase.vmdk\nbacking file format: vmdk"));
    // Writes by the other tool, then the same content everywhere.
    qemu_io_in(d, ["-f", "vmdk", "-c", "write -P 0x61 100k 5k", "vc.vmdk"]).ok();
    vmimg_in(
        d,
        ["io", "-f", "vmdk", "-c", "write -P 0x61 100k 5k", "qc.vmdk"],
    )
    .ok();
    qemu_img_in(d, ["compare", "vc.vmdk", "qc.vmdk"]).ok();
    vmimg_in(d, ["compare", "vc.vmdk", "qc.vmdk"]).ok();
    let qm = qemu_img_in(d, ["map", "--output=json", "vc.vmdk"]).ok();
    let vm = vmimg_in(d, ["map", "--output=json", "vc.vmdk"]).ok();
    assert_eq!(vm.stdout, qm.stdout);
    // Writing a base gives it a new CID: its children no longer match.
    vmimg_in(
        d,
        ["io", "-f", "vmdk", "-c", "write -P 1 0 512", "qbase.vmdk"],
    )
    .ok();
    let r = vmimg_in(d, ["io", "-c", "read 0 512", "vc.vmdk"]).expect_status(1);
    assert!(r.stderr.contains("not the parent"), "{}", r.stderr);
    let q = qemu_io_in(d, ["-c", "read 0 512", "vc.vmdk"]);
    assert!(q.stderr.contains("Invalid argument") || q.stdout.contains("Invalid argument"));
}

/// Stream-optimized images: compressed grains both ways, QEMU's refusals of rewrites.
#[test]
fn stream_optimized_images_are_written_once() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 3 << 20);
    let o = "subformat=streamOptimized";
    vmimg_in(
        d,
        [
            "convert", "-f", "raw", "-O", "vmdk", "-o", o, "src.raw", "v.vmdk",
        ],
    )
    .ok();
    let map = qemu_img_in(d, ["map", "--output=json", "v.vmdk"]).ok();
    assert!(
        map.stdout.contains("\"compressed\": true"),
        "{}",
        map.stdout
    );
    let info = vmimg_in(d, ["info", "v.vmdk"]).ok();
    assert!(info.stdout.contains("compressed: true"), "{}", info.stdout);
    // A grain already written cannot be rewritten, by either tool.
    let q = qemu_io_in(d, ["-f", "vmdk", "-c", "write -P 1 0 64k", "v.vmdk"]);
    assert!(
        q.stderr.contains("Could not write to allocated cluster"),
        "{}",
        q.stderr
    );
    let v = vmimg_in(d, ["io", "-f", "vmdk", "-c", "write -P 1 0 64k", "v.vmdk"]);
    assert_ne!(v.status, 0);
    vmimg_in(
        d,
        ["compare", "-f", "vmdk", "-F", "raw", "v.vmdk", "src.raw"],
    )
    .ok();
    // Compressed by the other tool, read here.
    qemu_img_in(
        d,
        [
            "convert", "-f", "raw", "-O", "vmdk", "-o", o, "src.raw", "q.vmdk",
        ],
    )
    .ok();
    vmimg_in(d, ["convert", "-O", "raw", "q.vmdk", "back.raw"]).ok();
    compare_files(&d.join("back.raw"), &d.join("src.raw")).unwrap();
    // No larger than 1.1x qemu-img's.
    let len = |n: &str| std::fs::metadata(d.join(n)).unwrap().len();
    assert!(
        len("v.vmdk") * 10 <= len("q.vmdk") * 11,
        "{} vs {}",
        len("v.vmdk"),
        len("q.vmdk")
    );
}

/// check as qemu-img: clean images pass; a grain past the end of its file fails with
/// QEMU's message; repairs are not supported.
#[test]
fn check_finds_grains_past_the_end_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vmdk", "c.vmdk", "16M"]).ok();
    qemu_io_in(d, ["-f", "vmdk", "-c", "write -P 3 64k 64k", "c.vmdk"]).ok();
    let good_q = qemu_img_in(d, ["check", "c.vmdk"]).ok();
    let good_v = vmimg_in(d, ["check", "c.vmdk"]).ok();
    assert_eq!(good_v.stdout, good_q.stdout);
    let jq = qemu_img_in(d, ["check", "--output=json", "c.vmdk"]).ok();
    let jv = vmimg_in(d, ["check", "--output=json", "c.vmdk"]).ok();
    assert_eq!(jv.stdout, jq.stdout);
    qemu_img_in(d, ["check", "-r", "all", "c.vmdk"]).expect_status(63);
    vmimg_in(d, ["check", "-r", "all", "c.vmdk"]).expect_status(63);
    // Point grain 1's entry (primary table) far past the end.
    let mut b = std::fs::read(d.join("c.vmdk")).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize;
    let gt = u32::from_le_bytes(b[gd * 512..gd * 512 + 4].try_into().unwrap()) as usize;
    b[gt * 512 + 4..gt * 512 + 8].copy_from_slice(&0x0100_0000u32.to_le_bytes());
    std::fs::write(d.join("c.vmdk"), &b).unwrap();
    let q = qemu_img_in(d, ["check", "c.vmdk"]).expect_status(1);
    let v = vmimg_in(d, ["check", "c.vmdk"]).expect_status(1);
    let first = |s: &str| s.lines().next().unwrap_or("").to_string();
    assert_eq!(first(&v.stderr), first(&q.stderr));
    assert!(
        first(&q.stderr).contains("points after EOF"),
        "{}",
        q.stderr
    );
}

/// What VMDK cannot do, refused in qemu-img's words.
#[test]
fn resize_amend_and_measure_are_refused_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vmdk", "a.vmdk", "16M"]).ok();
    let cases: [&[&str]; 3] = [
        &["resize", "a.vmdk", "32M"],
        &["amend", "-f", "vmdk", "-o", "zeroed_grain=on", "a.vmdk"],
        &["measure", "-O", "vmdk", "--size", "1G"],
    ];
    for args in cases {
        let q = qemu_img_in(d, args).expect_status(1);
        let v = vmimg_in(d, args).expect_status(1);
        let tail = |s: &str| s.trim_end().rsplit(": ").next().unwrap().to_string();
        assert_eq!(tail(&v.stderr), tail(&q.stderr), "{args:?}");
    }
}

/// The CID changes on the first write of each session that writes (so that children see
/// their parent changed), and not on reads.
#[test]
fn the_cid_changes_once_per_writing_session() {
    let dir = tempdir();
    let d = dir.path();
    vmimg_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "f.vmdk",
            "1M",
        ],
    )
    .ok();
    let cid = || {
        let out = vmimg_in(d, ["info", "--output=json", "f.vmdk"]).ok();
        let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        j["format-specific"]["data"]["cid"].as_u64().unwrap()
    };
    let c0 = cid();
    vmimg_in(d, ["io", "-c", "read 0 4k", "f.vmdk"]).ok();
    assert_eq!(cid(), c0);
    vmimg_in(d, ["io", "-c", "write 0 4k", "-c", "write 8k 4k", "f.vmdk"]).ok();
    let c1 = cid();
    assert_ne!(c1, c0);
    // QEMU reads the rewritten descriptor (NUL-padded to a sector, as QEMU leaves it).
    let len = std::fs::metadata(d.join("f.vmdk")).unwrap().len();
    assert_eq!(len % 512, 0, "{len}");
    let q = qemu_img_in(d, ["info", "--output=json", "f.vmdk"]).ok();
    let j: serde_json::Value = serde_json::from_str(&q.stdout).unwrap();
    assert_eq!(j["format-specific"]["data"]["cid"].as_u64(), Some(c1));
}
