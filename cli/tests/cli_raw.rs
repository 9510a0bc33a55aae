//! CLI tests on raw images, side by side with qemu-img and qemu-io.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

#[test]
fn random_workload_through_vmimg_io_and_qemu_io_gives_identical_files_and_output() {
    let dir = tempdir();
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    let size = 8u64 << 20;
    qemu_img(["create", "-f", "raw", s(&ours), &size.to_string()]).ok();
    qemu_img(["create", "-f", "raw", s(&theirs), &size.to_string()]).ok();

    let mut rng = fastrand::Rng::with_seed(0x5eed_2026);
    let cmds: Vec<String> = (0..200).map(|_| random_command(&mut rng, size)).collect();
    let mut args_ours = vec!["io".to_string(), "-f".into(), "raw".into()];
    let mut args_theirs = vec!["-f".to_string(), "raw".into()];
    for c in &cmds {
        args_ours.extend(["-c".to_string(), c.clone()]);
        args_theirs.extend(["-c".to_string(), c.clone()]);
    }
    args_ours.push(s(&ours).into());
    args_theirs.push(s(&theirs).into());
    let a = vmimg(&args_ours).ok();
    let b = qemu_io(&args_theirs).ok();

    assert_eq!(io_data_lines(&a.stdout), io_data_lines(&b.stdout));
    assert_eq!(
        io_data_lines(&a.stdout).len(),
        200 - cmds.iter().filter(|c| *c == "flush").count()
    );
    let da = std::fs::read(&ours).unwrap();
    let db = std::fs::read(&theirs).unwrap();
    assert_eq!(da.len(), db.len());
    if let Some(i) = da.iter().zip(&db).position(|(x, y)| x != y) {
        panic!(
            "files differ first at byte {i}: vmimg {:#x}, qemu-io {:#x}",
            da[i], db[i]
        );
    }
    qemu_img(["compare", "-f", "raw", "-F", "raw", s(&ours), s(&theirs)]).ok();
}

#[test]
fn io_read_pattern_mismatch_exits_1_like_qemu_io_and_later_commands_still_run() {
    let dir = tempdir();
    let img = dir.path().join("p.raw");
    qemu_img(["create", "-f", "raw", s(&img), "1M"]).ok();
    let cmds = [
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "read -P 0x22 0 4k",
        "-c",
        "read -P 0x11 0 4k",
    ];
    let mut ours = vec!["io", "-f", "raw"];
    ours.extend(cmds);
    ours.push(s(&img));
    let a = vmimg(&ours).expect_status(1);
    let mut theirs = vec!["-f", "raw"];
    theirs.extend(cmds);
    theirs.push(s(&img));
    let b = qemu_io(&theirs).expect_status(1);
    assert_eq!(io_data_lines(&a.stdout), io_data_lines(&b.stdout));
    assert!(a
        .stdout
        .contains("Pattern verification failed at offset 0, 4096 bytes"));
    assert!(
        a.stdout.ends_with("ops/sec)\n"),
        "last read ran: {}",
        a.stdout
    );
}

#[test]
fn io_out_of_range_read_and_read_only_write_fail_with_status_1() {
    let dir = tempdir();
    let img = dir.path().join("r.raw");
    vmimg(["create", "-f", "raw", s(&img), "64k"]).ok();
    let r = vmimg(["io", "-f", "raw", "-c", "read 64k 1", s(&img)]).expect_status(1);
    assert!(r.stdout.starts_with("read failed:"), "{}", r.stdout);
    // As qemu-io: refused before it runs, on stderr.
    let r = vmimg(["io", "-f", "raw", "-r", "-c", "write 0 1", s(&img)]).expect_status(1);
    assert!(
        r.stderr.contains("vmimg: Block node is read-only"),
        "{}",
        r.stderr
    );
    let r = vmimg(["io", "-f", "raw", "-c", "write -P 300 0 1", s(&img)]).expect_status(1);
    assert!(r.stdout.contains("300 is not a valid pattern byte"));
    let r = vmimg(["io", "-f", "raw", "-c", "nonsense", s(&img)]).expect_status(1);
    assert!(r.stderr.contains("command \"nonsense\" not found"));
}

#[test]
fn io_prints_each_command_as_it_completes_even_through_a_pipe() {
    let dir = tempdir();
    let img = dir.path().join("pipe.raw");
    vmimg(["create", "-f", "raw", s(&img), "1M"]).ok();
    let mut child = Command::new(vmimg_bin())
        .args(["io", "-f", "raw", s(&img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Send one command at a time and require its output before sending the next: this only
    // works if every line is flushed as soon as the command completes.
    for (cmd, expect) in [
        ("write -P 7 0 4k", "wrote 4096/4096 bytes at offset 0"),
        ("read -P 7 0 4k", "read 4096/4096 bytes at offset 0"),
        ("discard 4k 4k", "discard 4096/4096 bytes at offset 4096"),
    ] {
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), expect);
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains(" ops; "), "timing line, got {line:?}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn info_json_agrees_with_qemu_img() {
    let dir = tempdir();
    let img = dir.path().join("i.raw");
    qemu_img(["create", "-f", "raw", s(&img), "3M"]).ok();
    qemu_io(["-f", "raw", "-c", "write 1M 64k", s(&img)]).ok();
    let ours: serde_json::Value = serde_json::from_str(
        &vmimg(["info", "-f", "raw", "--output=json", s(&img)])
            .ok()
            .stdout,
    )
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(
        &qemu_img(["info", "-f", "raw", "--output=json", s(&img)])
            .ok()
            .stdout,
    )
    .unwrap();
    for key in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ] {
        assert_eq!(ours[key], theirs[key], "key {key}");
    }
    assert_eq!(ours["children"][0]["name"], theirs["children"][0]["name"]);
    assert_eq!(
        ours["children"][0]["info"]["virtual-size"],
        theirs["children"][0]["info"]["virtual-size"]
    );
}

#[test]
fn info_human_agrees_with_qemu_img() {
    let dir = tempdir();
    let img = dir.path().join("h.raw");
    qemu_img(["create", "-f", "raw", s(&img), "1500M"]).ok();
    let ours = vmimg(["info", "-f", "raw", s(&img)]).ok().stdout;
    let theirs = qemu_img(["info", "-f", "raw", s(&img)]).ok().stdout;
    assert_eq!(ours, theirs);
}

#[test]
fn create_makes_a_sparse_file_of_the_size_and_preallocation_full_allocates() {
    let dir = tempdir();
    let img = dir.path().join("c.raw");
    let r = vmimg(["create", "-f", "raw", s(&img), "1G"]).ok();
    assert_eq!(
        r.stdout.trim(),
        format!("Formatting '{}', fmt=raw size=1073741824", s(&img))
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 30);
    assert!(allocated(&img) < 1 << 20);
    let full = dir.path().join("full.raw");
    vmimg([
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=full",
        s(&full),
        "4M",
    ])
    .ok();
    assert!(allocated(&full) >= 4 << 20);
    let bad = vmimg([
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=bogus",
        s(&full),
        "4M",
    ]);
    assert_eq!(bad.status, 1);
    let bad = vmimg(["create", "-f", "raw", s(&full), "12x"]);
    assert_eq!(bad.status, 1);
}

#[test]
fn convert_copies_content_and_keeps_holes() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    qemu_img(["create", "-f", "raw", s(&src), "256M"]).ok();
    qemu_io([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0x11 100M 3000",
        "-c",
        "write -z 200M 1M",
        "-c",
        "write -P 0x22 255M 1M",
        s(&src),
    ])
    .ok();
    vmimg(["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&dst)]).ok();
    qemu_img(["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst)]).ok();
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 256 << 20);
    // 1 MiB + 4 KiB + 1 MiB of data; the explicitly zeroed MiB must not be copied as data.
    assert!(allocated(&dst) <= 3 << 20, "allocated {}", allocated(&dst));
    let a = std::fs::read(&src).unwrap();
    let b = std::fs::read(&dst).unwrap();
    assert!(a == b);
}

#[test]
fn convert_into_existing_target_with_n_overwrites_old_data_with_zeros() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    qemu_img(["create", "-f", "raw", s(&src), "4M"]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 1 1M 4k", s(&src)]).ok();
    qemu_img(["create", "-f", "raw", s(&dst), "4M"]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 9 0 4M", s(&dst)]).ok();
    vmimg(["convert", "-n", "-f", "raw", "-O", "raw", s(&src), s(&dst)]).ok();
    qemu_img(["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst)]).ok();
}

#[test]
fn convert_concatenates_several_sources() {
    let dir = tempdir();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let out = dir.path().join("out.raw");
    qemu_img(["create", "-f", "raw", s(&a), "1M"]).ok();
    qemu_img(["create", "-f", "raw", s(&b), "1M"]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 0xa1 0 1M", s(&a)]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 0xb2 4k 4k", s(&b)]).ok();
    vmimg(["convert", "-f", "raw", s(&a), s(&b), s(&out)]).ok();
    let data = std::fs::read(&out).unwrap();
    assert_eq!(data.len(), 2 << 20);
    assert!(data[..1 << 20].iter().all(|&x| x == 0xa1));
    assert!(data[(1 << 20) + 4096..(1 << 20) + 8192]
        .iter()
        .all(|&x| x == 0xb2));
    assert!(data[(1 << 20) + 8192..].iter().all(|&x| x == 0));
}

#[test]
fn compare_exit_codes_and_messages_match_qemu_img() {
    let dir = tempdir();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let c = dir.path().join("c.raw");
    qemu_img(["create", "-f", "raw", s(&a), "1M"]).ok();
    qemu_img(["create", "-f", "raw", s(&b), "1M"]).ok();
    qemu_img(["create", "-f", "raw", s(&c), "2M"]).ok();
    let cases: Vec<Vec<String>> = vec![
        vec![s(&a).into(), s(&b).into()],
        vec![s(&a).into(), s(&c).into()],
        vec!["-s".into(), s(&a).into(), s(&c).into()],
    ];
    let check = |cases: &[Vec<String>]| {
        for args in cases {
            let mut ours = vec![
                "compare".to_string(),
                "-f".into(),
                "raw".into(),
                "-F".into(),
                "raw".into(),
            ];
            ours.extend(args.iter().cloned());
            let mut theirs = vec![
                "compare".to_string(),
                "-f".into(),
                "raw".into(),
                "-F".into(),
                "raw".into(),
            ];
            theirs.extend(args.iter().cloned());
            let o = vmimg(&ours);
            let t = qemu_img(&theirs);
            assert_eq!(
                (o.status, o.stdout.clone()),
                (t.status, t.stdout.clone()),
                "{args:?}"
            );
        }
    };
    check(&cases);
    qemu_io(["-f", "raw", "-c", "write -P 3 1000 1", s(&b)]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 3 1536k 1", s(&c)]).ok();
    check(&cases);
    let missing = dir.path().join("missing.raw");
    let o = vmimg(["compare", s(&a), s(&missing)]);
    assert_eq!(o.status, 2);
    assert!(o.stderr.contains("missing.raw"), "{}", o.stderr);
}
