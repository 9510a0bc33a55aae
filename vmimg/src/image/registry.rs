//! The registry: the one list of the formats vmimg implements. Opening, probing, `info`,
//! `create`, `measure`, `check` and `amend` go through it and through [`Format`]; nothing
//! else names a format. A new format is a folder implementing
//! [`ImageFormat`](crate::format::ImageFormat) and one line in [`FORMATS`].

use crate::format::{best, foreign_names, foreign_scores, probe_buffer, Format, PROBE_BYTES};
use crate::storage::{Storage, StorageExt};
use crate::{Error, ErrorKind, Result};

/// Every format vmimg implements.
pub static FORMATS: &[Format] = &[
    crate::raw::RAW,
    crate::qcow2::QCOW2,
    crate::vpc::VPC,
    crate::vmdk::VMDK,
    crate::vdi::VDI,
    crate::vhdx::VHDX,
    crate::qcow1::QCOW,
    crate::bochs::BOCHS,
    crate::cloop::CLOOP,
    crate::qed::QED,
    crate::parallels::PARALLELS,
    crate::dmg::DMG,
];

impl Format {
    /// Raw: guest offset equals file offset.
    pub const RAW: Format = crate::raw::RAW;
    /// QEMU's copy-on-write format, versions 2 and 3.
    pub const QCOW2: Format = crate::qcow2::QCOW2;
    /// VHD (QEMU's `vpc`): fixed, dynamic and differencing disks.
    pub const VPC: Format = crate::vpc::VPC;
    /// VMDK: VMware's sparse, flat, split and stream-optimized disks.
    pub const VMDK: Format = crate::vmdk::VMDK;
    /// VDI (VirtualBox): dynamic and static images.
    pub const VDI: Format = crate::vdi::VDI;
    /// VHDX (Hyper-V): dynamic and fixed images, differencing disks read only.
    pub const VHDX: Format = crate::vhdx::VHDX;
    /// QEMU's original qcow (version 1), read only.
    pub const QCOW: Format = crate::qcow1::QCOW;
    /// Bochs growing images, read only.
    pub const BOCHS: Format = crate::bochs::BOCHS;
    /// cloop compressed images, read only.
    pub const CLOOP: Format = crate::cloop::CLOOP;
    /// QED (QEMU Enhanced Disk).
    pub const QED: Format = crate::qed::QED;
    /// Parallels expandable images.
    pub const PARALLELS: Format = crate::parallels::PARALLELS;
    /// Apple DMG (UDIF) images, read only.
    pub const DMG: Format = crate::dmg::DMG;

    /// Every format vmimg implements.
    pub fn all() -> &'static [Format] {
        FORMATS
    }

    /// Looks a format up by qemu-img's name. Formats QEMU knows that vmimg cannot open yet
    /// are refused with [`ErrorKind::Unsupported`] ("format 'vhdx' is not supported"); names
    /// nobody knows with QEMU's "Unknown driver" message.
    pub fn from_name(name: &str) -> Result<Self> {
        if let Some(f) = FORMATS.iter().find(|f| f.name() == name) {
            return Ok(*f);
        }
        let msg = if foreign_names().any(|n| n == name) {
            format!("format '{name}' is not supported")
        } else {
            format!("Unknown driver '{name}'")
        };
        Err(Error::new(ErrorKind::Unsupported, msg))
    }

    /// Guesses the format from the first bytes of `storage` and its file name, as QEMU does
    /// (see [`probe_bytes`]): every format QEMU recognises is recognised, and one vmimg
    /// cannot open fails with [`ErrorKind::Unsupported`] instead of being read as raw. An
    /// empty file is raw.
    ///
    /// **Not for untrusted images.** A guest that can write to a raw image can make its first
    /// sector look like a qcow2 header naming any backing file on the host; probing such an
    /// image would then read a file the user never named. Name the format explicitly for any
    /// image you did not create yourself. (Writes that would change what a probed raw image
    /// probes as are refused, as in QEMU, but images written elsewhere are not protected.)
    pub async fn probe(storage: &dyn Storage) -> Result<Self> {
        let size = storage.size()?;
        if size == 0 {
            return Ok(Format::RAW);
        }
        let mut first = vec![0u8; size.min(PROBE_BYTES as u64) as usize];
        storage.read_at(0, &mut first).await?;
        let name = storage.path().and_then(|p| p.to_str());
        Format::from_name(probe_sized(&first, name, size))
    }
}

/// QEMU's name for the format of an image whose first bytes are `first` (the rest of the
/// 512 bytes read as zeros) and whose file is called `filename` (only a `.dmg` suffix
/// counts): every format QEMU's probe knows, those vmimg implements and those it does not.
/// Always answers: `"raw"` when nothing else matches.
pub fn probe_bytes(first: &[u8], filename: Option<&str>) -> &'static str {
    probe_sized(first, filename, first.len() as u64)
}

fn probe_sized(first: &[u8], filename: Option<&str>, size: u64) -> &'static str {
    let buf = probe_buffer(first);
    let ours = FORMATS
        .iter()
        .map(|f| (f.name(), f.entry().probe(&buf, filename, size)));
    best(ours.chain(foreign_scores(&buf, filename))).unwrap_or("raw")
}

/// Every format name QEMU's probe can answer.
pub fn probed_names() -> impl Iterator<Item = &'static str> {
    FORMATS.iter().map(|f| f.name()).chain(foreign_names())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::CLOOP_MAGIC;

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
