//! Every format the registry holds, converted into every other directly, and chains across
//! formats; qemu-img checks each result.

mod common;

use common::*;

/// Formats vmimg reads and writes.
const FORMATS: &[&str] = &["raw", "qcow2", "vpc", "vmdk", "vdi", "vhdx"];

#[test]
fn convert_between_any_two_formats() {
    let dir = tempdir();
    let d = dir.path();
    let mut data = vec![0u8; 6 << 20];
    let mut rng = fastrand::Rng::with_seed(3);
    for chunk in data.chunks_mut(1 << 20).step_by(2) {
        rng.fill(&mut chunk[..200_000]);
    }
    std::fs::write(d.join("src.raw"), &data).unwrap();
    for from in FORMATS {
        let src = format!("src.{from}");
        if *from != "raw" {
            qemu_img_in(d, ["convert", "-f", "raw", "-O", from, "src.raw", &src]).ok();
        }
        for to in FORMATS {
            let out = format!("{from}-to.{to}");
            vmimg_in(d, ["convert", "-f", from, "-O", to, &src, &out]).ok();
            qemu_img_in(d, ["compare", "-f", "raw", "-F", to, "src.raw", &out]).expect_status(0);
            if *to == "qcow2" {
                qemu_img_in(d, ["check", &out]).ok();
            }
        }
    }
}

/// A qcow2 overlay over a VHD, and a VHD differencing disk over a VHD: reads go through.
#[test]
fn chains_across_formats_read_through() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vpc", "base.vhd", "8M"]).ok();
    qemu_io_in(d, ["-f", "vpc", "-c", "write -P 0x11 0 4M", "base.vhd"]).ok();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.vhd",
            "-F",
            "vpc",
            "top.qcow2",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 1M 64k",
            "top.qcow2",
        ],
    )
    .ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 1M 64k",
            "-c",
            "read -P 0x11 1114112 1M",
            "top.qcow2",
        ],
    )
    .ok();
    qemu_img_in(d, ["check", "top.qcow2"]).ok();
    vmimg_in(d, ["convert", "-O", "raw", "top.qcow2", "v.raw"]).ok();
    qemu_img_in(d, ["convert", "-O", "raw", "top.qcow2", "q.raw"]).ok();
    compare_files(&d.join("v.raw"), &d.join("q.raw")).unwrap();
    let map = |tool: &str| {
        let args = ["map", "--output=json", "top.qcow2"];
        let r = if tool == "q" {
            qemu_img_in(d, args)
        } else {
            vmimg_in(d, args)
        };
        r.ok().stdout
    };
    assert_eq!(map("v"), map("q"));
}

/// A qcow2 overlay over a split VMDK (a descriptor and its extents): reads go through the
/// extents, maps agree with qemu-img's.
#[test]
fn qcow2_over_a_split_vmdk_reads_through() {
    let dir = tempdir();
    let d = dir.path();
    let o = "subformat=twoGbMaxExtentSparse";
    qemu_img_in(
        d,
        ["create", "-q", "-f", "vmdk", "-o", o, "base.vmdk", "3G"],
    )
    .ok();
    qemu_io_in(
        d,
        ["-f", "vmdk", "-c", "write -P 0x11 2047M 2M", "base.vmdk"],
    )
    .ok();
    let b = ["-b", "base.vmdk", "-F", "vmdk"];
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(b);
    args.push("top.qcow2");
    vmimg_in(d, &args).ok();
    vmimg_in(d, ["io", "-c", "write -P 0x22 2048M 64k", "top.qcow2"]).ok();
    qemu_io_in(
        d,
        [
            "-c",
            "read -P 0x11 2047M 1M",
            "-c",
            "read -P 0x22 2048M 64k",
            "-c",
            "read -P 0x11 2147549184 983040",
            "top.qcow2",
        ],
    )
    .ok();
    let q = qemu_img_in(d, ["map", "--output=json", "top.qcow2"]).ok();
    let v = vmimg_in(d, ["map", "--output=json", "top.qcow2"]).ok();
    assert_eq!(v.stdout, q.stdout);
}
