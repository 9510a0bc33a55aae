//! Format options as qemu-img takes them (`-o key=value,...`): each format states its
//! options with a type ([`OptionSpec`]), and the values given are checked against that
//! schema with qemu-img's messages before anything is created or changed.

use crate::{Error, ErrorKind, Result};
use std::fmt::Write as _;

/// The type of an option's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    /// A size with qemu's suffixes (`64k`, `1.5G`).
    Size,
    /// `on` or `off`.
    Bool,
    /// A number.
    Number,
    /// A string (checked by the format itself).
    Str,
}

impl OptionKind {
    /// qemu-img's name for the type in `-o help`.
    fn help_name(self) -> &'static str {
        match self {
            OptionKind::Size => "size",
            OptionKind::Bool => "bool (on/off)",
            OptionKind::Number => "num",
            OptionKind::Str => "str",
        }
    }
}

/// One option a format takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// qemu-img's name (`cluster_size`).
    pub name: &'static str,
    /// Its type.
    pub kind: OptionKind,
    /// qemu-img's one-line help.
    pub help: &'static str,
}

/// qemu-img's `-o help` text for a format's options (sorted by name, as qemu-img lists them).
pub fn options_help(format: &str, specs: &[OptionSpec]) -> String {
    let mut sorted: Vec<&OptionSpec> = specs.iter().collect();
    sorted.sort_by_key(|s| s.name);
    let mut out = format!("Supported {format} options:\n");
    for s in sorted {
        let left = format!("{}=<{}>", s.name, s.kind.help_name());
        let _ = writeln!(out, "  {left:<22} - {}", s.help);
    }
    out
}

/// A checked option value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionValue {
    /// A size in bytes.
    Size(u64),
    /// On or off.
    Bool(bool),
    /// A number.
    Number(u64),
    /// A string.
    Str(String),
}

/// Option values checked against a format's schema, in the order given (a later value of
/// the same option replaces an earlier one, as in qemu-img).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FormatOptions {
    values: Vec<(&'static str, OptionValue)>,
}

/// Splits qemu's option list syntax (`a=1,b=2`, with `,,` for a comma inside a value) into
/// keys and values; several lists (several `-o`) are joined.
pub fn parse_option_list(lists: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for list in lists {
        let invalid = || {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid option list: {list}"),
            )
        };
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = list.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                    continue;
                }
                items.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        if items.iter().any(|i| i.is_empty()) {
            return Err(invalid());
        }
        for item in items {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                // A bare key is "key=on" for booleans; others refuse it when checked.
                None => (item, "on".to_string()),
            };
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Parses a size with qemu's optional suffix: `k`/`K`, `M`, `G`, `T`, `P`, `E` (powers of
/// 1024), `b`/`B` for bytes; decimal fractions (`1.5G`) and hex (`0x1000`) are accepted.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let err = || format!("invalid size '{s}'");
    let s_trim = s.trim();
    if let Some(hex) = s_trim
        .strip_prefix("0x")
        .or_else(|| s_trim.strip_prefix("0X"))
    {
        return u64::from_str_radix(hex, 16).map_err(|_| err());
    }
    let split = s_trim
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s_trim.len());
    let (num, suffix) = s_trim.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(err()),
    };
    if num.is_empty() {
        return Err(err());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(err());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err())?
    };
    let mut value = int.checked_shl(shift).filter(|v| v >> shift == int);
    if !frac.is_empty() {
        // Fractions must come out to whole bytes, as in qemu.
        let digits = frac.len() as u32;
        let frac_num: u128 = frac.parse().map_err(|_| err())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(err)?;
        let bytes = frac_num << shift;
        if bytes % scale != 0 {
            return Err(err());
        }
        value = value.and_then(|v| v.checked_add(u64::try_from(bytes / scale).ok()?));
    }
    value.ok_or_else(|| format!("size '{s}' is too large"))
}

impl FormatOptions {
    /// Checks `items` against `specs`: unknown names and values of the wrong type are
    /// refused with qemu-img's messages.
    pub fn parse(specs: &[OptionSpec], items: &[(String, String)]) -> Result<Self> {
        let mut out = FormatOptions::default();
        for (k, v) in items {
            let spec = specs.iter().find(|s| s.name == k).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("Invalid parameter '{k}'"),
                )
            })?;
            let bad = |what: &str| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("Parameter '{k}' expects {what}"),
                )
            };
            let value = match spec.kind {
                OptionKind::Size => OptionValue::Size(parse_size(v).map_err(|_| {
                    bad(
                        "a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E \
                         means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
                    )
                })?),
                // QEMU's spellings of a boolean.
                OptionKind::Bool => OptionValue::Bool(match v.as_str() {
                    "on" | "yes" | "y" | "true" => true,
                    "off" | "no" | "n" | "false" => false,
                    _ => return Err(bad("'on' or 'off'")),
                }),
                OptionKind::Number => OptionValue::Number(v.parse().map_err(|_| bad("a number"))?),
                OptionKind::Str => OptionValue::Str(v.clone()),
            };
            out.set(spec.name, value);
        }
        Ok(out)
    }

    /// Sets (or replaces) an option.
    pub fn set(&mut self, name: &'static str, value: OptionValue) {
        self.values.retain(|(n, _)| *n != name);
        self.values.push((name, value));
    }

    /// Removes an option, returning its value.
    pub fn take(&mut self, name: &str) -> Option<OptionValue> {
        let i = self.values.iter().position(|(n, _)| *n == name)?;
        Some(self.values.remove(i).1)
    }

    /// The value of an option, if given.
    pub fn get(&self, name: &str) -> Option<&OptionValue> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The options given, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &OptionValue)> {
        self.values.iter().map(|(n, v)| (*n, v))
    }

    /// A size option.
    pub fn size(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            Some(OptionValue::Size(v) | OptionValue::Number(v)) => Some(*v),
            _ => None,
        }
    }

    /// A boolean option.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(OptionValue::Bool(v)) => Some(*v),
            _ => None,
        }
    }

    /// A number option.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.size(name)
    }

    /// A string option.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(OptionValue::Str(v)) => Some(v),
            _ => None,
        }
    }

    /// Whether no option was given.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec {
            name: "cluster_size",
            kind: OptionKind::Size,
            help: "qcow2 cluster size",
        },
        OptionSpec {
            name: "lazy_refcounts",
            kind: OptionKind::Bool,
            help: "Postpone refcount updates",
        },
        OptionSpec {
            name: "refcount_bits",
            kind: OptionKind::Number,
            help: "Width of a reference count entry in bits",
        },
        OptionSpec {
            name: "backing_file",
            kind: OptionKind::Str,
            help: "File name of a base image",
        },
    ];

    fn parse(lists: &[&str]) -> Result<FormatOptions> {
        let lists: Vec<String> = lists.iter().map(|s| s.to_string()).collect();
        FormatOptions::parse(SPECS, &parse_option_list(&lists)?)
    }

    #[test]
    fn values_are_typed_and_the_last_one_wins() {
        let o = parse(&["cluster_size=4k,lazy_refcounts=on", "cluster_size=8k"]).unwrap();
        assert_eq!(o.size("cluster_size"), Some(8192));
        assert_eq!(o.bool("lazy_refcounts"), Some(true));
        let o = parse(&["backing_file=a,,b,refcount_bits=8"]).unwrap();
        assert_eq!(o.str("backing_file"), Some("a,b"));
        assert_eq!(o.number("refcount_bits"), Some(8));
    }

    #[test]
    fn bad_lists_names_and_values_get_qemu_imgs_messages() {
        let msg = |l: &[&str]| parse(l).unwrap_err().to_string();
        assert_eq!(msg(&["foo=bar"]), "Invalid parameter 'foo'");
        assert_eq!(
            msg(&[",cluster_size=4k"]),
            "Invalid option list: ,cluster_size=4k"
        );
        assert_eq!(msg(&[""]), "Invalid option list: ");
        assert_eq!(
            msg(&["lazy_refcounts=maybe"]),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            msg(&["refcount_bits=x"]),
            "Parameter 'refcount_bits' expects a number"
        );
        assert!(msg(&["cluster_size=abc"])
            .starts_with("Parameter 'cluster_size' expects a non-negative number below 2^64"));
    }

    #[test]
    fn help_lists_options_by_name_like_qemu_img() {
        assert_eq!(
            options_help("qcow2", SPECS),
            "Supported qcow2 options:\n  \
             backing_file=<str>     - File name of a base image\n  \
             cluster_size=<size>    - qcow2 cluster size\n  \
             lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n  \
             refcount_bits=<num>    - Width of a reference count entry in bits\n"
        );
    }

    #[test]
    fn sizes_take_qemus_suffixes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1.3").is_err());
        assert!(parse_size("20E").is_err());
    }
}
