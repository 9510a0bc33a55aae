//! Format probing as QEMU 10 does it: every format QEMU recognises, from the first 512 bytes
//! of the file (zero-padded when the file is shorter) and, for dmg, the file name.
//!
//! Each format scores the bytes (100: its magic, 2: a weak sign, 1: raw, which always
//! matches); the highest score wins, and equal scores go to the format QEMU registers last
//! (the order of [`PROBES`]). Only the vdi signature (at 0x40) can tie with another
//! format's magic, and dmg (by name) with cloop. Read off QEMU's drivers' probe functions
//! and checked against qemu-img 10.0.2 with crafted files (`qemu-img --trace
//! bdrv_open_common info`).

/// Bytes a probe looks at.
pub const PROBE_BYTES: usize = 512;

/// One format's probe: QEMU's driver name and its score for a buffer and a file name.
struct Probe {
    name: &'static str,
    score: fn(&[u8; PROBE_BYTES], Option<&str>) -> u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-terminated string field equal to `s` (QEMU compares with `strcmp`).
fn c_string_is(b: &[u8], at: usize, s: &str) -> bool {
    b[at..].starts_with(s.as_bytes()) && b.get(at + s.len()) == Some(&0)
}

fn magic(b: &[u8], m: &[u8]) -> u32 {
    if b.starts_with(m) {
        100
    } else {
        0
    }
}

/// The cloop V2.0 header: a shell script that mounts the image.
const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// vmdk's text descriptor: after comment lines (`#...`) and lines of spaces, the first line
/// must be `version=1`, `2` or `3`, ended by LF or CRLF. An empty line stops the search.
fn vmdk_text(b: &[u8]) -> bool {
    let mut p = 0usize;
    while p < b.len() {
        match b[p] {
            b'#' => {
                p = b[p..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| p + n)
                    + 1;
            }
            b' ' => {
                while p < b.len() && b[p] == b' ' {
                    p += 1;
                }
                if p < b.len() && b[p] == b'\r' {
                    p += 1;
                }
                if p == b.len() || b[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let line = &b[p..];
                return [b'1', b'2', b'3'].iter().any(|v| {
                    let mut lf = b"version=X\n".to_vec();
                    lf[8] = *v;
                    let mut crlf = b"version=X\r\n".to_vec();
                    crlf[8] = *v;
                    line.starts_with(&lf) || line.starts_with(&crlf)
                });
            }
        }
    }
    false
}

/// In QEMU's tie order: on equal scores the first here wins.
const PROBES: &[Probe] = &[
    Probe {
        name: "parallels",
        score: |b, _| {
            let m = b.starts_with(b"WithoutFreeSpace") || b.starts_with(b"WithouFreSpacExt");
            if m && le32(b, 16) == 2 {
                100
            } else {
                0
            }
        },
    },
    Probe {
        name: "qed",
        score: |b, _| magic(b, b"QED\0"),
    },
    Probe {
        name: "dmg",
        score: |_, name| match name {
            Some(n) if n.len() > 4 && n.ends_with(".dmg") => 2,
            _ => 0,
        },
    },
    Probe {
        name: "bochs",
        score: |b, _| {
            let v = le32(b, 0x40);
            let ok = c_string_is(b, 0, "Bochs Virtual HD Image")
                && c_string_is(b, 0x20, "Redolog")
                && c_string_is(b, 0x30, "Growing")
                && (v == 0x0002_0000 || v == 0x0001_0000);
            if ok {
                100
            } else {
                0
            }
        },
    },
    Probe {
        name: "cloop",
        score: |b, _| if b.starts_with(CLOOP_MAGIC) { 2 } else { 0 },
    },
    Probe {
        name: "vpc",
        score: |b, _| magic(b, b"conectix"),
    },
    Probe {
        name: "vmdk",
        score: |b, _| {
            if b.starts_with(b"KDMV") || b.starts_with(b"COWD") || vmdk_text(b) {
                100
            } else {
                0
            }
        },
    },
    Probe {
        name: "vhdx",
        score: |b, _| magic(b, b"vhdxfile"),
    },
    Probe {
        name: "vdi",
        score: |b, _| if le32(b, 0x40) == 0xbeda_107f { 100 } else { 0 },
    },
    Probe {
        name: "qcow",
        score: |b, _| {
            if b.starts_with(b"QFI\xfb") && be32(b, 4) == 1 {
                100
            } else {
                0
            }
        },
    },
    Probe {
        name: "raw",
        score: |_, _| 1,
    },
    Probe {
        name: "qcow2",
        score: |b, _| {
            if b.starts_with(b"QFI\xfb") && be32(b, 4) >= 2 {
                100
            } else {
                0
            }
        },
    },
    Probe {
        name: "luks",
        score: |b, _| {
            if b.starts_with(b"LUKS\xba\xbe") && b[6..8] == [0, 1] {
                100
            } else {
                0
            }
        },
    },
];

/// QEMU's name for the format of an image whose first bytes are `first` (the rest of the
/// 512 bytes read as zeros) and whose file is called `filename` (only a `.dmg` suffix
/// counts). Always answers: `"raw"` when nothing else matches.
pub fn probe_bytes(first: &[u8], filename: Option<&str>) -> &'static str {
    let mut buf = [0u8; PROBE_BYTES];
    let n = first.len().min(PROBE_BYTES);
    buf[..n].copy_from_slice(&first[..n]);
    let mut best = ("raw", 0);
    for p in PROBES {
        let s = (p.score)(&buf, filename);
        if s > best.1 {
            best = (p.name, s);
        }
    }
    best.0
}

/// Every format name QEMU's probe can answer.
pub fn probed_names() -> impl Iterator<Item = &'static str> {
    PROBES.iter().map(|p| p.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn each_magic_names_its_format() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with(0, b"QFI\xfb\0\0\0\x03"), "qcow2"),
            (with(0, b"QFI\xfb\0\0\0\x02"), "qcow2"),
            (with(0, b"QFI\xfb\xff\xff\xff\xff"), "qcow2"),
            (with(0, b"QFI\xfb\0\0\0\x01"), "qcow"),
            (with(0, b"QFI\xfb\0\0\0\0"), "raw"),
            (with(0, b"QED\0"), "qed"),
            (with(0x40, &0xbeda_107fu32.to_le_bytes()), "vdi"),
            (with(0, b"KDMV"), "vmdk"),
            (with(0, b"COWD"), "vmdk"),
            (with(0, b"VMDK"), "raw"),
            (with(0, b"conectix"), "vpc"),
            (with(0, b"vhdxfile"), "vhdx"),
            (with(0, b"WithoutFreeSpace\x02\0\0\0"), "parallels"),
            (with(0, b"WithouFreSpacExt\x02\0\0\0"), "parallels"),
            (with(0, b"WithoutFreeSpace\x01\0\0\0"), "raw"),
            (with(0, b"LUKS\xba\xbe\0\x01"), "luks"),
            (with(0, b"LUKS\xba\xbe\0\x02"), "raw"),
            (with(0, CLOOP_MAGIC), "cloop"),
            (with(0, &CLOOP_MAGIC[..82]), "raw"),
            (vec![0u8; 512], "raw"),
        ];
        for (buf, want) in cases {
            assert_eq!(probe_bytes(&buf, None), want, "{:?}", &buf[..16]);
        }
    }

    #[test]
    fn bochs_needs_all_three_strings_nul_ended_and_a_known_version() {
        let mut b = vec![0u8; 512];
        b[..22].copy_from_slice(b"Bochs Virtual HD Image");
        b[0x20..0x27].copy_from_slice(b"Redolog");
        b[0x30..0x37].copy_from_slice(b"Growing");
        b[0x40..0x44].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert_eq!(probe_bytes(&b, None), "bochs");
        b[0x40..0x44].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        assert_eq!(probe_bytes(&b, None), "bochs");
        b[0x40..0x44].copy_from_slice(&0x0003_0000u32.to_le_bytes());
        assert_eq!(probe_bytes(&b, None), "raw");
        b[0x40..0x44].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        b[22] = b'X';
        assert_eq!(probe_bytes(&b, None), "raw");
    }

    #[test]
    fn vmdk_descriptors_follow_qemus_line_rules() {
        let cases: &[(&[u8], &str)] = &[
            (b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n", "vmdk"),
            (b"# Disk DescriptorFile\r\nversion=3\r\n", "vmdk"),
            (b"   \r\nversion=2\n", "vmdk"),
            (b"#\n#\n   \nversion=1\n", "vmdk"),
            (b"\nversion=1\n", "raw"),
            (b" version=1\n", "raw"),
            (b"version=4\n", "raw"),
            (b"version=1", "raw"),
            (b"#", "raw"),
        ];
        for (text, want) in cases {
            assert_eq!(probe_bytes(text, None), *want, "{text:?}");
        }
        // The version line must start early enough to fit in the 512 bytes.
        let at = |start: usize| {
            let mut b = vec![b'#'; start];
            b[start - 1] = b'\n';
            b.extend_from_slice(b"version=1\n");
            probe_bytes(&b, None)
        };
        assert_eq!(at(502), "vmdk");
        assert_eq!(at(503), "raw");
    }

    #[test]
    fn dmg_goes_by_name_and_ties_go_the_way_qemu_breaks_them() {
        assert_eq!(probe_bytes(&[0u8; 512], Some("disk.dmg")), "dmg");
        assert_eq!(probe_bytes(&[0u8; 512], Some("disk.DMG")), "raw");
        assert_eq!(probe_bytes(&[0u8; 512], Some(".dmg")), "raw");
        assert_eq!(probe_bytes(CLOOP_MAGIC, Some("a.dmg")), "dmg");
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03", Some("a.dmg")), "qcow2");
        // The vdi signature at 0x40 against magics at 0.
        let vdi_and = |m: &[u8]| {
            let mut b = with(0, m);
            b[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
            probe_bytes(&b, None)
        };
        assert_eq!(vdi_and(b"QFI\xfb\0\0\0\x03"), "vdi");
        assert_eq!(vdi_and(b"QFI\xfb\0\0\0\x01"), "vdi");
        assert_eq!(vdi_and(b"LUKS\xba\xbe\0\x01"), "vdi");
        assert_eq!(vdi_and(b"conectix"), "vpc");
        assert_eq!(vdi_and(b"vhdxfile"), "vhdx");
        assert_eq!(vdi_and(b"KDMV"), "vmdk");
        assert_eq!(vdi_and(b"QED\0"), "qed");
    }

    /// Hostile first sectors (random bytes, and text made of the vmdk descriptor's
    /// characters) and names never make the probe panic.
    #[test]
    fn random_sectors_never_panic() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet = b"# \r\nversion=123QFI\xfbLUKSconectix";
        for i in 0..20_000 {
            let len = (next() % 600) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if i % 2 == 0 {
                        r as u8
                    } else {
                        alphabet[(r % alphabet.len() as u64) as usize]
                    }
                })
                .collect();
            let name = if i % 3 == 0 { Some("x.dmg") } else { None };
            assert!(probed_names().any(|n| n == probe_bytes(&buf, name)));
        }
    }

    #[test]
    fn short_buffers_are_zero_padded() {
        assert_eq!(probe_bytes(b"conectix", None), "vpc");
        assert_eq!(probe_bytes(b"QED\0", None), "qed");
        assert_eq!(probe_bytes(b"", None), "raw");
    }
}
