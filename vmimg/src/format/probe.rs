//! Format probing as QEMU 10 does it: every format QEMU recognises, from the first 512 bytes
//! of the file (zero-padded when the file is shorter) and, for dmg, the file name.
//!
//! Each format scores the bytes (100: its magic, 2: a weak sign, 1: raw, which always
//! matches); the highest score wins, and equal scores go to the format QEMU registers last
//! ([`TIE_ORDER`]). Only the vdi signature (at 0x40) can tie with another format's magic,
//! and dmg (by name) with cloop. Read off QEMU's drivers' probe functions and checked
//! against qemu-img 10.0.2 with crafted files (`qemu-img --trace bdrv_open_common info`).
//!
//! The formats vmimg implements score themselves ([`ImageFormat::probe`](super::ImageFormat::probe),
//! in their folders); this module holds the probes of the formats QEMU knows that vmimg
//! does not open ([`foreign_scores`]), so that their images are named and refused rather
//! than read as raw.

/// Bytes a probe looks at.
pub const PROBE_BYTES: usize = 512;

/// QEMU's order for equal scores, first wins (the reverse of its drivers' registration).
pub const TIE_ORDER: &[&str] = &[
    "parallels",
    "qed",
    "dmg",
    "bochs",
    "cloop",
    "vpc",
    "vmdk",
    "vhdx",
    "vdi",
    "qcow",
    "raw",
    "qcow2",
    "luks",
];

/// One format's probe: QEMU's driver name and its score for a buffer and a file name.
struct Probe {
    name: &'static str,
    score: fn(&[u8; PROBE_BYTES], Option<&str>) -> u32,
}

/// The cloop V2.0 header: a shell script that mounts the image.
pub(crate) const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// vmdk's text descriptor: after comment lines (`#...`) and lines of spaces, the first line
/// must be `version=1`, `2` or `3`, ended by LF or CRLF. An empty line stops the search.
pub(crate) fn vmdk_text(b: &[u8]) -> bool {
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

/// QEMU's formats that vmimg does not open.
const PROBES: &[Probe] = &[Probe {
    name: "luks",
    score: |b, _| {
        if b.starts_with(b"LUKS\xba\xbe") && b[6..8] == [0, 1] {
            100
        } else {
            0
        }
    },
}];

/// `first` zero-padded to the 512 bytes every probe is given.
pub fn probe_buffer(first: &[u8]) -> [u8; PROBE_BYTES] {
    let mut buf = [0u8; PROBE_BYTES];
    let n = first.len().min(PROBE_BYTES);
    buf[..n].copy_from_slice(&first[..n]);
    buf
}

/// The scores of QEMU's formats vmimg does not open, for a probe buffer and a file name.
pub fn foreign_scores<'a>(
    buf: &'a [u8; PROBE_BYTES],
    filename: Option<&'a str>,
) -> impl Iterator<Item = (&'static str, u32)> + 'a {
    PROBES
        .iter()
        .map(move |p| (p.name, (p.score)(buf, filename)))
}

/// Every format name QEMU's probe can answer that vmimg does not open.
pub fn foreign_names() -> impl Iterator<Item = &'static str> {
    PROBES.iter().map(|p| p.name)
}

/// The winner among scored formats: the highest score; equal scores as QEMU breaks them
/// ([`TIE_ORDER`], names it does not list last).
pub fn best(scores: impl Iterator<Item = (&'static str, u32)>) -> Option<&'static str> {
    let rank = |n: &str| TIE_ORDER.iter().position(|t| *t == n).unwrap_or(usize::MAX);
    scores
        .filter(|(_, s)| *s > 0)
        .max_by(|a, b| a.1.cmp(&b.1).then(rank(b.0).cmp(&rank(a.0))))
        .map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_the_way_qemu_breaks_them_and_zero_never_wins() {
        let pick = |v: &[(&'static str, u32)]| best(v.iter().copied());
        assert_eq!(pick(&[("qcow2", 100), ("vdi", 100)]), Some("vdi"));
        assert_eq!(pick(&[("vdi", 100), ("vpc", 100)]), Some("vpc"));
        assert_eq!(pick(&[("cloop", 2), ("dmg", 2), ("raw", 1)]), Some("dmg"));
        assert_eq!(pick(&[("raw", 1), ("qcow2", 0)]), Some("raw"));
        assert_eq!(pick(&[("new", 100), ("luks", 100)]), Some("luks"));
        assert_eq!(pick(&[("qcow2", 0)]), None);
    }
}
