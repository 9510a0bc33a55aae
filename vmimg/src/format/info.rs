//! Format-specific facts for `info`, as a format-neutral tree that each format fills and
//! tools print as qemu-img does (its "Format specific information" and the JSON
//! `format-specific` object).

use std::fmt::Write as _;

/// A value in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoValue {
    /// `true`/`false`.
    Bool(bool),
    /// A number.
    Int(u64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<InfoValue>),
    /// Named values, in order.
    Map(Vec<(String, InfoValue)>),
}

/// A format's facts: its type name (`qcow2`) and named values with qemu-img's JSON keys
/// (`compression-type`), in qemu-img's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatSpecific {
    /// The format's name, qemu-img's `format-specific.type`.
    pub kind: &'static str,
    /// The facts.
    pub data: Vec<(String, InfoValue)>,
}

impl FormatSpecific {
    /// An empty set of facts for format `kind`.
    pub fn new(kind: &'static str) -> Self {
        FormatSpecific {
            kind,
            data: Vec::new(),
        }
    }

    /// Adds a fact.
    pub fn push(&mut self, key: &str, value: InfoValue) {
        self.data.push((key.to_string(), value));
    }

    /// A fact by key.
    pub fn get(&self, key: &str) -> Option<&InfoValue> {
        self.data.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// qemu-img info's text: one `key: value` line each (dashes in keys printed as
    /// spaces), nested values indented four more spaces, list items as `[i]:`. `indent` is
    /// the indentation of the top level.
    pub fn human(&self, indent: usize) -> String {
        let mut out = String::new();
        for (k, v) in &self.data {
            write_human(&mut out, indent, &k.replace('-', " "), v);
        }
        out
    }
}

fn write_human(out: &mut String, indent: usize, key: &str, value: &InfoValue) {
    let pad = " ".repeat(indent);
    match value {
        InfoValue::Bool(b) => {
            let _ = writeln!(out, "{pad}{key}: {b}");
        }
        InfoValue::Int(n) => {
            let _ = writeln!(out, "{pad}{key}: {n}");
        }
        InfoValue::Str(s) => {
            let _ = writeln!(out, "{pad}{key}: {s}");
        }
        InfoValue::List(items) => {
            let _ = writeln!(out, "{pad}{key}:");
            for (i, item) in items.iter().enumerate() {
                write_human(out, indent + 4, &format!("[{i}]"), item);
            }
        }
        InfoValue::Map(entries) => {
            let _ = writeln!(out, "{pad}{key}:");
            for (k, v) in entries {
                write_human(out, indent + 4, &k.replace('-', " "), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_text_nests_lists_and_maps_like_qemu_img() {
        let mut f = FormatSpecific::new("qcow2");
        f.push("compat", InfoValue::Str("1.1".into()));
        f.push("lazy-refcounts", InfoValue::Bool(false));
        f.push(
            "bitmaps",
            InfoValue::List(vec![InfoValue::Map(vec![
                (
                    "flags".into(),
                    InfoValue::List(vec![InfoValue::Str("auto".into())]),
                ),
                ("name".into(), InfoValue::Str("b0".into())),
                ("granularity".into(), InfoValue::Int(65536)),
            ])]),
        );
        assert_eq!(
            f.human(4),
            "    compat: 1.1\n    lazy refcounts: false\n    bitmaps:\n        [0]:\n            \
             flags:\n                [0]: auto\n            name: b0\n            granularity: \
             65536\n"
        );
    }
}
