//! `--untrusted`: no probing, no file named inside an image is opened.

mod common;

use common::*;

#[test]
fn untrusted_mode_never_opens_files_an_image_names() {
    let dir = tempdir();
    let d = dir.path();
    // An image whose external data file names a "host secret".
    qemu_img_in(
        d,
        [
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=secret.raw,data_file_raw=on",
            "evil.qcow2",
            "9000",
        ],
    )
    .ok();
    // (qemu-img create sized the data file; now it holds the secret.)
    std::fs::write(d.join("secret.raw"), b"TOPSECRET".repeat(1000)).unwrap();
    // Trusting it reads the secret through the image...
    let out = d.join("leak.raw");
    vmimg_in(
        d,
        ["convert", "-f", "qcow2", "-O", "raw", "evil.qcow2", s(&out)],
    )
    .ok();
    assert!(std::fs::read(&out).unwrap().starts_with(b"TOPSECRET"));
    std::fs::remove_file(&out).unwrap();
    // ...untrusted, nothing is opened and nothing is written.
    let r = vmimg_in(
        d,
        [
            "--untrusted",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "evil.qcow2",
            s(&out),
        ],
    );
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("not opening data file"), "{}", r.stderr);
    assert!(!out.exists());

    // Backing files named inside the image are refused too.
    qemu_img_in(d, ["create", "-f", "raw", "base.raw", "1M"]).ok();
    qemu_img_in(
        d,
        [
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    )
    .ok();
    for args in [
        &[
            "info",
            "--untrusted",
            "--backing-chain",
            "-f",
            "qcow2",
            "top.qcow2",
        ][..],
        &[
            "--untrusted",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "top.qcow2",
            "o.raw",
        ],
    ] {
        let r = vmimg_in(d, args);
        assert_eq!(r.status, 1, "{args:?}");
        assert!(
            r.stderr.contains("not opening backing file"),
            "{}",
            r.stderr
        );
    }
    // Plain info opens no backing file at all (as qemu-img): it only names it.
    let r = vmimg_in(d, ["info", "--untrusted", "-f", "qcow2", "top.qcow2"]).ok();
    assert!(r.stdout.contains("backing file: base.raw"), "{}", r.stdout);

    // And the format must be named: probing is unsafe.
    let r = vmimg_in(d, ["--untrusted", "info", "base.raw"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("format named"), "{}", r.stderr);
    vmimg_in(d, ["--untrusted", "info", "-f", "raw", "base.raw"]).ok();
}
