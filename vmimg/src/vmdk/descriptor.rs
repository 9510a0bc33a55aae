//! The text descriptor: which files hold the disk (extent lines), its content ID and its
//! parent's, and the disk database (`ddb.*`).
//!
//! ```text
//!  # Disk DescriptorFile
//!  version=1
//!  CID=3d895fe4                 content ID: changes on the first write of each open
//!  parentCID=ffffffff           the parent's CID when this disk was made (ffffffff: none)
//!  createType="twoGbMaxExtentSparse"
//!  parentFileNameHint="base.vmdk"
//!  RW 4194304 SPARSE "x-s001.vmdk"          access, sectors, type, file, [offset]
//!  ddb.adapterType = "ide"
//! ```
//!
//! Parsed as VMware's grammar (`key=value` lines, quoted or not, with any spacing; comment
//! lines; text ends at the first NUL), which accepts everything QEMU writes and reads.
//! Written exactly as qemu-img writes it.

use crate::{Error, ErrorKind, Result};
use std::fmt::Write as _;

/// `parentCID` of a disk without a parent.
pub const NO_PARENT: u32 = 0xffff_ffff;
/// The largest descriptor read (QEMU's limit for descriptor files).
pub const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// What an extent line allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    ReadWrite,
    /// Read only.
    ReadOnly,
    /// Neither.
    NoAccess,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access.
    pub access: Access,
    /// Sectors (authoritative for flat and zero extents; sparse extents have their own).
    pub sectors: u64,
    /// The type as written: `FLAT`, `SPARSE`, `ZERO`, `VMFS`, `VMFSSPARSE`, `SESPARSE`, ...
    pub kind: String,
    /// The file (none for `ZERO`).
    pub file: Option<String>,
    /// Sector offset in the file (flat extents).
    pub offset: Option<u64>,
}

/// A parsed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Content ID.
    pub cid: u32,
    /// The parent's content ID ([`NO_PARENT`] without one).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`: the parent's file name.
    pub parent_hint: Option<String>,
    /// The extents, in disk order.
    pub extents: Vec<ExtentLine>,
    /// The disk database, `ddb.` keys with their values.
    pub ddb: Vec<(String, String)>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// The text of a descriptor read from disk: up to the first NUL.
pub fn text_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_hex(v: &str, key: &str) -> Result<u32> {
    u32::from_str_radix(unquote(v), 16)
        .map_err(|_| invalid(format!("invalid VMDK image descriptor: bad {key} '{v}'")))
}

impl Descriptor {
    /// Parses descriptor text. Extent lines (starting with `RW`, `RDONLY` or `NOACCESS`)
    /// must be well formed (`Invalid extent line: ...` otherwise); a `CID` and a
    /// `createType` must be present. Unknown keys and lines are ignored.
    pub fn parse(text: &str) -> Result<Self> {
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut ddb = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            let access = match first {
                "RW" => Some(Access::ReadWrite),
                "RDONLY" => Some(Access::ReadOnly),
                "NOACCESS" => Some(Access::NoAccess),
                _ => None,
            };
            if let Some(access) = access {
                extents.push(
                    parse_extent(access, line[first.len()..].trim_start())
                        .ok_or_else(|| invalid(format!("Invalid extent line: {raw}")))?,
                );
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            match key {
                "CID" => cid = Some(parse_hex(value, key)?),
                "parentCID" => parent_cid = Some(parse_hex(value, key)?),
                "createType" => create_type = Some(unquote(value).to_string()),
                "parentFileNameHint" => parent_hint = Some(unquote(value).to_string()),
                k if k.starts_with("ddb.") => ddb.push((k.to_string(), unquote(value).into())),
                _ => {}
            }
        }
        let create_type =
            create_type.ok_or_else(|| invalid("invalid VMDK image descriptor: no createType"))?;
        let cid = cid.ok_or_else(|| invalid("invalid VMDK image descriptor: no CID"))?;
        Ok(Descriptor {
            cid,
            parent_cid: parent_cid.unwrap_or(NO_PARENT),
            create_type,
            parent_hint: parent_hint.filter(|h| !h.is_empty()),
            extents,
            ddb,
        })
    }

    /// A `ddb.` value.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `SECTORS TYPE ["FILE" [OFFSET]]` after the access word.
fn parse_extent(access: Access, rest: &str) -> Option<ExtentLine> {
    let (sectors, rest) = rest.split_once(char::is_whitespace)?;
    let sectors: u64 = sectors.parse().ok()?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = kind.to_string();
    let rest = rest.trim();
    if rest.is_empty() {
        // Only a zero extent names no file.
        return (kind == "ZERO").then_some(ExtentLine {
            access,
            sectors,
            kind,
            file: None,
            offset: None,
        });
    }
    let rest = rest.strip_prefix('"')?;
    let (file, rest) = rest.split_once('"')?;
    let rest = rest.trim();
    let offset = if rest.is_empty() {
        None
    } else {
        Some(rest.parse().ok()?)
    };
    Some(ExtentLine {
        access,
        sectors,
        kind,
        file: Some(file.to_string()),
        offset,
    })
}

/// `text` with the value of its (first) `CID` line replaced by `cid`; everything else kept.
pub fn with_cid(text: &str, cid: u32) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut done = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_start();
        if !done && body.split_once('=').is_some_and(|(k, _)| k.trim() == "CID") {
            let indent = &line[..line.len() - body.len()];
            let end = if line.ends_with("\r\n") {
                "\r\n"
            } else if line.ends_with('\n') {
                "\n"
            } else {
                ""
            };
            let _ = write!(out, "{indent}CID={cid:x}{end}");
            done = true;
        } else {
            out.push_str(line);
        }
    }
    out
}

/// What qemu-img writes in a new descriptor.
#[derive(Clone, Debug)]
pub struct NewDescriptor<'a> {
    /// Content ID.
    pub cid: u32,
    /// The parent's content ID ([`NO_PARENT`] without one).
    pub parent_cid: u32,
    /// The subformat.
    pub create_type: &'a str,
    /// `parentFileNameHint`.
    pub parent_hint: Option<&'a str>,
    /// `(sectors, type, file, offset)` of each extent.
    pub extents: Vec<(u64, &'static str, String, Option<u64>)>,
    /// `ddb.virtualHWVersion`.
    pub hw_version: &'a str,
    /// Disk size in bytes (for the geometry).
    pub size: u64,
    /// `ddb.adapterType`.
    pub adapter: &'a str,
    /// `ddb.toolsVersion`.
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The descriptor text, byte for byte as qemu-img 10 writes it.
    pub fn render(&self) -> String {
        let heads: u64 = if self.adapter == "ide" { 16 } else { 255 };
        let mut s = format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n",
            self.cid, self.parent_cid, self.create_type
        );
        if let Some(p) = self.parent_hint {
            let _ = write!(s, "parentFileNameHint=\"{p}\"");
        }
        s.push_str("\n# Extent description\n");
        for (sectors, kind, file, offset) in &self.extents {
            let _ = write!(s, "RW {sectors} {kind} \"{file}\"");
            if let Some(o) = offset {
                let _ = write!(s, " {o}");
            }
            s.push('\n');
        }
        let _ = write!(
            s,
            "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\n\
             ddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{heads}\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\n\
             ddb.toolsVersion = \"{}\"\n",
            self.hw_version,
            self.size / (63 * heads * 512),
            self.adapter,
            self.tools_version
        );
        s
    }
}

/// A new content ID: random, as QEMU's (never [`NO_PARENT`] or `fffffffe`, which some
/// tools read specially).
pub fn new_cid() -> u32 {
    loop {
        let mut b = [0u8; 4];
        crate::format::random_bytes(&mut b);
        let cid = u32::from_le_bytes(b);
        if cid < 0xffff_fffe {
            return cid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_SPLIT: &str = "# Disk DescriptorFile\nversion=1\nCID=81f33840\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
        RW 4194304 SPARSE \"split-s001.vmdk\"\nRW 4194304 SPARSE \"split-s002.vmdk\"\n\
        RW 2097152 SPARSE \"split-s003.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
        ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"652\"\n\
        ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
        ddb.adapterType = \"lsilogic\"\nddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn renders_qemu_img_descriptors_byte_for_byte() {
        let d = NewDescriptor {
            cid: 0x81f3_3840,
            parent_cid: NO_PARENT,
            create_type: "twoGbMaxExtentSparse",
            parent_hint: None,
            extents: vec![
                (4194304, "SPARSE", "split-s001.vmdk".into(), None),
                (4194304, "SPARSE", "split-s002.vmdk".into(), None),
                (2097152, "SPARSE", "split-s003.vmdk".into(), None),
            ],
            hw_version: "4",
            size: 5 << 30,
            adapter: "lsilogic",
            tools_version: "2147483647",
        };
        assert_eq!(d.render(), QEMU_SPLIT);
    }

    #[test]
    fn parses_qemu_and_vmware_grammar() {
        let d = Descriptor::parse(QEMU_SPLIT).unwrap();
        assert_eq!(d.cid, 0x81f3_3840);
        assert_eq!(d.parent_cid, NO_PARENT);
        assert_eq!(d.create_type, "twoGbMaxExtentSparse");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[2].file.as_deref(), Some("split-s003.vmdk"));
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
        let vmware = "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=0000abcd\r\n\
            parentCID=12345678\r\ncreateType = \"monolithicFlat\"\r\n\
            parentFileNameHint=\"../base dir/b.vmdk\"\r\n\tRW 2048 FLAT \"my disk-flat.vmdk\" 0\r\n\
            RDONLY 100 ZERO\r\n";
        let d = Descriptor::parse(vmware).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0xabcd, 0x1234_5678));
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.parent_hint.as_deref(), Some("../base dir/b.vmdk"));
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-flat.vmdk"));
        assert_eq!(d.extents[0].offset, Some(0));
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[1].kind, "ZERO");
    }

    #[test]
    fn refuses_malformed_extent_lines_and_missing_keys() {
        for bad in [
            "RW x FLAT \"f\" 0",
            "RW 10 FLAT f 0",
            "RW 10 FLAT \"f",
            "RW 10 FLAT \"f\" -1",
            "RW 10 SPARSE",
        ] {
            let text = format!("CID=1\ncreateType=\"monolithicFlat\"\n{bad}\n");
            let e = Descriptor::parse(&text).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("Invalid extent line: {bad}"),
                "{bad}"
            );
        }
        assert!(Descriptor::parse("CID=1\n").is_err());
        assert!(Descriptor::parse("createType=\"vmfs\"\n").is_err());
        assert!(Descriptor::parse("CID=zz\ncreateType=\"vmfs\"\n").is_err());
    }

    #[test]
    fn cid_rewrite_keeps_every_other_line() {
        let text = "version=1\r\nCID=1\r\nfoo=bar\r\nparentCID=ffffffff\r\n";
        assert_eq!(
            with_cid(text, 0xabc),
            "version=1\r\nCID=abc\r\nfoo=bar\r\nparentCID=ffffffff\r\n"
        );
        let d = Descriptor::parse(&with_cid(QEMU_SPLIT, 7)).unwrap();
        assert_eq!((d.cid, d.parent_cid), (7, NO_PARENT));
        assert_eq!(text_of(b"CID=1\n\0\0garbage"), "CID=1\n");
    }
}
