//! QEMU's block-node options: `json:{...}` file names, `--image-opts` and qemu-io's
//! `open -o` strings (`driver=qcow2,file.filename=x.qcow2`), and protocol prefixes
//! (`blkdebug:CONFIG:FILE`, `file:PATH`, `null-co://`), turned into an open image.
//!
//! ```text
//!   "driver=qcow2,file.driver=blkdebug,file.image.filename=x"   json:{"driver": "qcow2", ...}
//!                \______________________   ______________________/
//!                                       v
//!     Node {driver: qcow2, file: Node {driver: blkdebug, image: Node {filename: x}}}
//!                                       v
//!     Image (qcow2) over DebugStorage over FileStorage
//! ```
//!
//! Formats are vmimg's; the protocol drivers are `file` (and `host_device`, `host_cdrom`),
//! `null-co`/`null-aio`, `blkdebug`, and `raw` or `copy-on-read` as pass-through filters
//! (copy-on-read copies nothing).

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use vmimg::storage::{BoxFuture, DebugConfig, DebugStorage, HostExtent};
use vmimg::{DiscardMode, Error, ErrorKind, Format, Image, ImageOpen, OpenOptions, Storage};
use vmimg::{FileStorageOpen, LockMode, NullStorage, PreallocMode};

/// An option value: a string, a child node, a list, or JSON's `null`.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Str(String),
    Node(Node),
    List(Vec<Val>),
    Null,
}

/// One block node's options, children nested by their dotted keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node(BTreeMap<String, Val>);

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Protocol drivers: a node that holds bytes itself rather than a format over a child.
pub fn is_protocol(driver: &str) -> bool {
    matches!(
        driver,
        "file" | "host_device" | "host_cdrom" | "null-co" | "null-aio" | "blkdebug"
    )
}

impl Node {
    /// Sets `key` (dotted: `file.filename`), making the nodes on the way.
    pub fn insert(&mut self, key: &str, val: Val) -> Result<(), Error> {
        if key.matches('.').count() >= MAX_DEPTH {
            return Err(invalid(format!("Option name '{key}' nests too deep")));
        }
        match key.split_once('.') {
            None => {
                match (self.0.get_mut(key), val) {
                    (Some(Val::Node(old)), Val::Node(new)) => old.merge(new),
                    (_, val) => {
                        self.0.insert(key.to_string(), val);
                    }
                }
                Ok(())
            }
            Some((head, rest)) => {
                let child = self
                    .0
                    .entry(head.to_string())
                    .or_insert_with(|| Val::Node(Node::default()));
                match child {
                    Val::Node(n) => n.insert(rest, val),
                    _ => Err(invalid(format!(
                        "Cannot set option '{key}': '{head}' is not a node"
                    ))),
                }
            }
        }
    }

    /// `other`'s options over these (children merged).
    pub fn merge(&mut self, other: Node) {
        for (k, v) in other.0 {
            match (self.0.get_mut(&k), v) {
                (Some(Val::Node(a)), Val::Node(b)) => a.merge(b),
                (_, v) => {
                    self.0.insert(k, v);
                }
            }
        }
    }

    fn take(&mut self, key: &str) -> Option<Val> {
        self.0.remove(key)
    }

    fn take_str(&mut self, key: &str) -> Result<Option<String>, Error> {
        match self.0.remove(key) {
            None => Ok(None),
            Some(Val::Str(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(format!(
                "Invalid parameter type for '{key}', expected: string"
            ))),
        }
    }

    fn take_bool(&mut self, key: &str) -> Result<Option<bool>, Error> {
        match self.take_str(key)?.as_deref() {
            None => Ok(None),
            Some("on" | "true" | "yes") => Ok(Some(true)),
            Some("off" | "false" | "no") => Ok(Some(false)),
            Some(_) => Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
        }
    }

    /// The driver of its `file` child (`file` when the child names none).
    pub fn file_driver(&self) -> String {
        match self.0.get("file") {
            Some(Val::Node(f)) => f.driver().unwrap_or("file").to_string(),
            _ => "file".to_string(),
        }
    }

    /// The node's `driver`, when it names one.
    pub fn driver(&self) -> Option<&str> {
        match self.0.get("driver") {
            Some(Val::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Parses `key=value,...` (`,,` is a comma in a value), QEMU's option syntax.
    pub fn parse_keyval(s: &str) -> Result<Node, Error> {
        let mut node = Node::default();
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(invalid(format!("Invalid parameter '{item}'")));
            };
            node.insert(k, Val::Str(v.to_string()))?;
        }
        Ok(node)
    }

    /// Parses the JSON object of a `json:` file name (QEMU's JSON: strings in single or
    /// double quotes); dotted keys nest as in [`Node::parse_keyval`].
    pub fn parse_json(s: &str) -> Result<Node, Error> {
        let mut p = Json {
            b: s.as_bytes(),
            at: 0,
            depth: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.at != p.b.len() {
            return Err(p.err("trailing characters"));
        }
        match v {
            Val::Node(n) => Ok(n),
            _ => Err(invalid("json: file names must hold a JSON object")),
        }
    }
}

struct Json<'a> {
    b: &'a [u8],
    at: usize,
    /// Objects and lists open around the value being read (bounded: names can come from
    /// images, and nesting must not exhaust the stack).
    depth: usize,
}

/// The deepest nesting of objects and lists a `json:` name may have.
const MAX_DEPTH: usize = 64;

impl Json<'_> {
    fn err(&self, what: &str) -> Error {
        invalid(format!(
            "Could not parse the JSON options: {what} at byte {}",
            self.at
        ))
    }

    fn ws(&mut self) {
        while self.at < self.b.len() && self.b[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.at).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), Error> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn string(&mut self) -> Result<String, Error> {
        let quote = self.peek().ok_or_else(|| self.err("expected a string"))?;
        if quote != b'"' && quote != b'\'' {
            return Err(self.err("expected a string"));
        }
        self.at += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.b.get(self.at) {
            self.at += 1;
            match c {
                c if c == quote => {
                    return String::from_utf8(out).map_err(|_| self.err("bad UTF-8"))
                }
                b'\\' => {
                    let e = *self.b.get(self.at).ok_or_else(|| self.err("bad escape"))?;
                    self.at += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'b' => 8,
                        b'f' => 12,
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
        Err(self.err("unterminated string"))
    }

    fn value(&mut self) -> Result<Val, Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        let v = self.value_inner();
        self.depth -= 1;
        v
    }

    fn value_inner(&mut self) -> Result<Val, Error> {
        match self.peek().ok_or_else(|| self.err("expected a value"))? {
            b'{' => {
                self.at += 1;
                let mut node = Node::default();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(Val::Node(node));
                }
                loop {
                    let k = self.string()?;
                    self.expect(b':')?;
                    let v = self.value()?;
                    node.insert(&k, v)?;
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Val::Node(node));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            b'[' => {
                self.at += 1;
                let mut list = Vec::new();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Val::List(list));
                }
                loop {
                    list.push(self.value()?);
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Val::List(list));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            b'"' | b'\'' => Ok(Val::Str(self.string()?)),
            _ => {
                let start = self.at;
                while self.at < self.b.len()
                    && (self.b[self.at].is_ascii_alphanumeric()
                        || b"+-.".contains(&self.b[self.at]))
                {
                    self.at += 1;
                }
                match &self.b[start..self.at] {
                    b"" => Err(self.err("expected a value")),
                    b"null" => Ok(Val::Null),
                    word => Ok(Val::Str(String::from_utf8_lossy(word).into_owned())),
                }
            }
        }
    }
}

/// Whether `name` is more than a plain path: `json:`, or a protocol prefix (`proto:` with
/// no `/` before the colon, as QEMU decides).
pub fn is_special(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/') && colon > 0,
        None => false,
    }
}

/// The path after a `file:` prefix as QEMU names the file: a relative path that would
/// read as a protocol name itself gets `./` before it.
pub fn protocol_path(rest: &str) -> String {
    if is_special(rest) {
        format!("./{rest}")
    } else {
        rest.to_string()
    }
}

/// The protocol node a special file name stands for, or the options of a `json:` name.
fn from_name(name: &str) -> Result<(Node, bool), Error> {
    if let Some(json) = name.strip_prefix("json:") {
        return Ok((Node::parse_json(json)?, true));
    }
    let (proto, rest) = name.split_once(':').unwrap_or(("file", name));
    let mut node = Node::default();
    match proto {
        "file" | "host_device" | "host_cdrom" if is_special(name) => {
            node.insert("driver", Val::Str(proto.into()))?;
            node.insert("filename", Val::Str(protocol_path(rest)))?;
        }
        "blkdebug" => {
            // blkdebug:CONFIG:IMAGE (the configuration may be empty)
            let (config, image) = rest.split_once(':').unwrap_or(("", rest));
            node.insert("driver", Val::Str("blkdebug".into()))?;
            if !config.is_empty() {
                node.insert("config", Val::Str(config.into()))?;
            }
            let (image, _) = from_name(image)?;
            node.insert("image", Val::Node(image))?;
        }
        "null-co" | "null-aio" => {
            node.insert("driver", Val::Str(proto.into()))?;
        }
        _ if is_special(name) => {
            return Err(invalid(format!("Unknown protocol '{proto}'")));
        }
        _ => {
            node.insert("driver", Val::Str("file".into()))?;
            node.insert("filename", Val::Str(name.into()))?;
        }
    }
    Ok((node, false))
}

/// The options of an image given as `name` with options `opts` over it (qemu-io's
/// `open -o OPTS NAME`): `json:` names are the top node; other names are placed where the
/// chain of primary children (`file`, blkdebug's `image`) ends.
pub fn with_name(mut opts: Node, name: Option<&str>) -> Result<Node, Error> {
    let Some(name) = name else { return Ok(opts) };
    let (leaf, json) = from_name(name)?;
    if json {
        let mut top = leaf;
        top.merge(opts);
        return Ok(top);
    }
    let mut node = &mut opts;
    let mut top = true;
    loop {
        if !top && node.driver().is_none() {
            // A child given only some options (`file.align=4k`): the name supplies it.
            node.merge(leaf);
            return Ok(opts);
        }
        top = false;
        let key = match node.driver() {
            Some(d) if is_protocol(d) && d != "blkdebug" => {
                let mut leaf = leaf;
                leaf.0.remove("driver");
                node.merge(leaf);
                return Ok(opts);
            }
            Some("blkdebug") => "image",
            _ => "file",
        };
        match node.0.get(key) {
            Some(Val::Node(_)) => {}
            _ => {
                node.0.insert(key.to_string(), Val::Node(leaf));
                return Ok(opts);
            }
        }
        let Some(Val::Node(child)) = node.0.get_mut(key) else {
            unreachable!("checked above")
        };
        node = child;
    }
}

/// The plain file name QEMU shows for an image given as options, when the options say no
/// more than "this format over this file" (else `None`: QEMU shows a `json:` name).
pub fn plain_filename(top: &Node) -> Option<String> {
    let harmless = |k: &String| matches!(k.as_str(), "driver" | "node-name" | "file");
    if !top.0.keys().all(harmless) {
        return None;
    }
    match top.0.get("file")? {
        Val::Node(f) => {
            let ok =
                f.0.keys()
                    .all(|k| matches!(k.as_str(), "driver" | "filename" | "node-name"));
            match (f.driver(), f.0.get("filename")) {
                (None | Some("file"), Some(Val::Str(name))) if ok => Some(name.clone()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The name QEMU shows for the image argument `arg` (as `--image-opts` options when
/// `image_opts`): a plain file name where the options reduce to one, else `arg`.
pub fn display_name(arg: &str, image_opts: bool) -> String {
    let node = if image_opts {
        Node::parse_keyval(arg).ok()
    } else if let Some(rest) = arg.strip_prefix("file:") {
        return protocol_path(rest);
    } else {
        arg.strip_prefix("json:")
            .and_then(|j| Node::parse_json(j).ok())
    };
    node.as_ref()
        .and_then(plain_filename)
        .unwrap_or_else(|| arg.to_string())
}

/// QEMU's checks of `reopen -o` options `extra` against the node's current options
/// `current` (what it was opened with) and its drivers (`drivers`: the image's format,
/// its file's driver, its backing file's format): node names and drivers cannot change,
/// and flags must be on or off.
pub fn check_reopen(
    current: &Node,
    extra: &Node,
    drivers: [Option<&str>; 3],
) -> Result<(), String> {
    let child = |n: &Node, key: &str| match n.0.get(key) {
        Some(Val::Node(c)) => Some(c.clone()),
        _ => None,
    };
    let levels = [
        (Some(current.clone()), Some(extra.clone()), drivers[0]),
        (child(current, "file"), child(extra, "file"), drivers[1]),
        (
            child(current, "backing"),
            child(extra, "backing"),
            drivers[2],
        ),
    ];
    for (cur, new, driver) in levels {
        let Some(new) = new else { continue };
        let get = |n: &Option<Node>, key: &str| match n.as_ref().and_then(|n| n.0.get(key)) {
            Some(Val::Str(v)) => Some(v.clone()),
            _ => None,
        };
        if let Some(Val::Str(name)) = new.0.get("node-name") {
            if get(&cur, "node-name").as_deref() != Some(name) {
                return Err("Cannot change the option 'node-name'".into());
            }
        }
        if let Some(d) = new.driver() {
            if Some(d) != driver {
                return Err("Cannot change the option 'driver'".into());
            }
        }
    }
    let flag = |key: &str| match extra.0.get(key) {
        Some(Val::Str(v)) if !matches!(v.as_str(), "on" | "off" | "true" | "false") => {
            Err(format!("Parameter '{key}' expects 'on' or 'off'"))
        }
        _ => Ok(()),
    };
    flag("read-only")?;
    if let Some(Val::Node(cache)) = extra.0.get("cache") {
        for key in ["no-flush", "direct"] {
            if let Some(Val::Str(v)) = cache.0.get(key) {
                if !matches!(v.as_str(), "on" | "off" | "true" | "false") {
                    return Err(format!("Parameter 'cache.{key}' expects 'on' or 'off'"));
                }
            }
        }
    }
    flag("auto-read-only")
}

/// Whether the options of a special file name name the image's format (else it is probed).
pub fn names_format(name: &str) -> bool {
    with_name(Node::default(), Some(name)).is_ok_and(|n| n.driver().is_some())
}

/// Opens an image from a special file name (see [`is_special`]) with `format` and `opts`.
pub async fn open_name(
    name: &str,
    format: Option<&str>,
    opts: OpenOptions,
) -> Result<Image, Error> {
    let mut top = Node::default();
    if let Some(f) = format {
        top.insert("driver", Val::Str(f.into()))?;
    }
    open(with_name(top, Some(name))?, opts).await
}

/// Options QEMU's format drivers take that change nothing vmimg does.
const ACCEPTED: &[&str] = &[
    "node-name",
    "discard",
    "detect-zeroes",
    "auto-read-only",
    "force-share",
    "cache",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "aio",
    "aio-max-batch",
    "locking",
    "read-zeroes",
    "x-check-cache-dropped",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
    "take-child-perms",
    "unshare-child-perms",
    "latency-ns",
];

fn refuse_unknown(node: &Node, kind: &str, driver: &str) -> Result<(), Error> {
    match node.0.keys().find(|k| !ACCEPTED.contains(&k.as_str())) {
        Some(k) => Err(invalid(if kind == "format" {
            format!("Block format '{driver}' does not support the option '{k}'")
        } else {
            format!("Block protocol '{driver}' doesn't support the option '{k}'")
        })),
        None => Ok(()),
    }
}

/// Opens the image `node` describes.
pub fn open(mut node: Node, opts: OpenOptions) -> BoxFuture<'static, Result<Image, Error>> {
    Box::pin(async move {
        let mut opts = opts;
        if let Some(ro) = node.take_bool("read-only")? {
            let writable = !ro && opts.is_writable();
            opts = opts.writable(writable);
        }
        let driver = node.take_str("driver")?;
        match driver.as_deref() {
            Some("copy-on-read") | Some("raw") if matches!(node.0.get("file"), Some(Val::Node(n)) if n.driver().is_some_and(|d| !is_protocol(d))) =>
            {
                let Some(Val::Node(child)) = node.take("file") else {
                    unreachable!()
                };
                return open(child, opts).await;
            }
            Some("compress") => {
                // QEMU's compress filter: every write reaches the image compressed.
                let Some(Val::Node(child)) = node.take("file") else {
                    return Err(invalid("A block device must be specified for \"file\""));
                };
                refuse_unknown(&node, "format", "compress")?;
                let image = open(child, opts.clone()).await?;
                if image.cluster_size().is_none() || !image.format().entry().compressed_writes() {
                    return Err(invalid(
                        "Compression is not supported for underlying format",
                    ));
                }
                let storage: Arc<dyn Storage> = Arc::new(Compress(ImageStorage(image)));
                return ImageOpen::storage(storage)
                    .format(Format::RAW)
                    .options(opts)
                    .open()
                    .await;
            }
            Some(d) if is_protocol(d) => {
                node.insert("driver", Val::Str(d.into()))?;
                let storage = open_storage(node, &opts).await?;
                return ImageOpen::storage(storage)
                    .format(Format::RAW)
                    .options(opts)
                    .open()
                    .await;
            }
            _ => {}
        }
        let format = driver.as_deref().map(Format::from_name).transpose()?;
        let child = match (node.take("file"), node.take_str("filename")?) {
            (Some(Val::Node(n)), _) => n,
            (Some(Val::Str(f)), _) | (None, Some(f)) => {
                let mut n = Node::default();
                n.insert("filename", Val::Str(f))?;
                n
            }
            _ => return Err(invalid("A block device must be specified for \"file\"")),
        };
        // raw's window on its file (`offset`, `size`).
        let mut window = None;
        if format == Some(Format::RAW) {
            let num = |v: Option<String>, key: &str| {
                v.map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| invalid(format!("Parameter '{key}' expects a size")))
                })
                .transpose()
            };
            let offset = num(node.take_str("offset")?, "offset")?;
            let size = num(node.take_str("size")?, "size")?;
            if offset.is_some() || size.is_some() {
                window = Some((offset.unwrap_or(0), size));
            }
        }
        let mut named_backing = None;
        match node.take("backing") {
            None => {}
            Some(Val::Null) => opts = opts.no_backing(true),
            // Options for the backing file the image names (`backing.driver=qcow2`).
            Some(Val::Node(b)) if !b.0.contains_key("file") && !b.0.contains_key("filename") => {
                named_backing = Some(b)
            }
            Some(Val::Node(b)) => {
                let backing = open(b, opts.clone().writable(false)).await?;
                opts = opts.backing(backing);
            }
            Some(Val::Str(name)) => {
                let backing =
                    crate::open_image_with(&name, None, opts.clone().writable(false)).await?;
                opts = opts.backing(backing);
            }
            Some(Val::List(_)) => return Err(invalid("Invalid parameter type for 'backing'")),
        }
        if let Some(v) = node.take("data-file") {
            let mut n = match v {
                Val::Node(n) => n,
                Val::Str(f) => {
                    let mut n = Node::default();
                    n.insert("filename", Val::Str(f))?;
                    n
                }
                _ => return Err(invalid("Invalid parameter type for 'data-file'")),
            };
            // A raw node over the data file is the data file.
            if n.driver() == Some("raw") {
                if let Some(Val::Node(inner)) = n.take("file") {
                    n = inner;
                }
            }
            let data = open_storage(n, &opts).await?;
            opts = opts.data_file(data);
        }
        let name = format.map_or("raw", |f| f.name());
        refuse_unknown(&node, "format", name)?;
        let mut storage = open_storage(child, &opts).await?;
        if let Some((offset, size)) = window {
            storage = Arc::new(Window::new(storage, offset, size)?);
        }
        let with_format = |open: ImageOpen| match format {
            Some(f) => open.format(f),
            None => open,
        };
        if let Some(b) = named_backing {
            let header = with_format(ImageOpen::storage(Arc::clone(&storage)))
                .options(
                    opts.clone()
                        .writable(false)
                        .no_backing(true)
                        .metadata_only(true),
                )
                .open()
                .await?;
            let name = header.describe().full_backing_filename;
            drop(header);
            if let Some(name) = name {
                let backing =
                    open(with_name(b, Some(&name))?, opts.clone().writable(false)).await?;
                opts = opts.backing(backing);
            }
        }
        with_format(ImageOpen::storage(storage))
            .options(opts)
            .open()
            .await
    })
}

/// Opens the storage a protocol node (or a format node, read through its image) describes.
fn open_storage(
    mut node: Node,
    opts: &OpenOptions,
) -> BoxFuture<'static, Result<Arc<dyn Storage>, Error>> {
    let opts = opts.clone();
    Box::pin(async move {
        let writable = opts.is_writable();
        let driver = match node.take_str("driver")? {
            Some(d) => d,
            None if node.0.contains_key("filename") => "file".to_string(),
            None => return Err(invalid("A block device must be specified for \"file\"")),
        };
        match driver.as_str() {
            "file" | "host_device" | "host_cdrom" => {
                let filename = node.take_str("filename")?.ok_or_else(|| {
                    invalid(format!("The '{driver}' block driver requires a file name"))
                })?;
                let locking = match node.take_str("locking")?.as_deref() {
                    None | Some("auto") => LockMode::Auto,
                    Some("on") => LockMode::On,
                    Some("off") => LockMode::Off,
                    Some(other) => {
                        return Err(invalid(format!(
                            "Parameter 'locking' does not accept value '{other}'"
                        )))
                    }
                };
                node.take("cache");
                refuse_unknown(&node, "protocol", &driver)?;
                // The driver's file type first, as QEMU checks it (a directory opened for
                // writing fails in open(2) before that).
                if let Ok(meta) = std::fs::metadata(&filename) {
                    use std::os::unix::fs::FileTypeExt;
                    let t = meta.file_type();
                    if !(writable && t.is_dir()) {
                        if driver == "file" && !t.is_file() {
                            return Err(invalid(format!(
                                "'file' driver requires '{filename}' to be a regular file"
                            )));
                        }
                        if driver != "file" && !(t.is_block_device() || t.is_char_device()) {
                            return Err(invalid(format!(
                                "'{driver}' driver requires '{filename}' to be either a \
                                 character or block device"
                            )));
                        }
                    }
                }
                let storage = FileStorageOpen::new(&filename)
                    .char_device(driver != "file")
                    .writable(writable)
                    .direct(opts.is_direct())
                    .no_sync(opts.is_no_sync())
                    .locking(locking)
                    .open()
                    .await?;
                Ok(Arc::new(storage) as Arc<dyn Storage>)
            }
            "null-co" | "null-aio" => {
                let size = match node.take_str("size")? {
                    Some(s) => s
                        .parse()
                        .map_err(|_| invalid("Parameter 'size' expects a size"))?,
                    None => 1 << 30,
                };
                refuse_unknown(&node, "protocol", &driver)?;
                Ok(Arc::new(NullStorage::new(size)) as Arc<dyn Storage>)
            }
            "blkdebug" => {
                let mut config = match node.take_str("config")? {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path).map_err(|e| {
                            invalid(format!("Could not read blkdebug config file: {e}"))
                        })?;
                        DebugConfig::parse(&text)?
                    }
                    None => DebugConfig::new(),
                };
                for section in ["inject-error", "set-state"] {
                    let Some(v) = node.take(section) else {
                        continue;
                    };
                    let rules = match v {
                        Val::List(l) => l,
                        other => vec![other],
                    };
                    for r in rules {
                        let Val::Node(r) = r else {
                            return Err(invalid(format!("Invalid parameter type for '{section}'")));
                        };
                        let pairs: Vec<(String, String)> =
                            r.0.into_iter()
                                .filter_map(|(k, v)| match v {
                                    Val::Str(s) => Some((k, s)),
                                    _ => None,
                                })
                                .collect();
                        config.add(section, &pairs)?;
                    }
                }
                let align = match node.take_str("align")? {
                    Some(a) => crate::size::parse_size(&a).map_err(invalid)? as usize,
                    None => 1,
                };
                let image = match (node.take("image"), node.take_str("x-image")?) {
                    (Some(Val::Node(n)), _) => n,
                    (Some(Val::Str(f)), _) | (None, Some(f)) => from_name(&f)?.0,
                    _ => return Err(invalid("A block device must be specified for \"image\"")),
                };
                refuse_unknown(&node, "protocol", "blkdebug")?;
                let inner = open_storage(image, &opts).await?;
                Ok(Arc::new(DebugStorage::new(inner, config, align)) as Arc<dyn Storage>)
            }
            "raw" if matches!(node.0.get("file"), Some(Val::Node(_))) && node.0.len() == 1 => {
                let Some(Val::Node(child)) = node.take("file") else {
                    unreachable!()
                };
                open_storage(child, &opts).await
            }
            _ => {
                // A format node: its image's bytes.
                node.insert("driver", Val::Str(driver))?;
                let image = open(node, opts).await?;
                Ok(Arc::new(ImageStorage(image)) as Arc<dyn Storage>)
            }
        }
    })
}

/// A part of a file (raw's `offset` and `size` options).
#[derive(Debug)]
struct Window {
    inner: Arc<dyn Storage>,
    offset: u64,
    size: u64,
}

impl Window {
    fn new(inner: Arc<dyn Storage>, offset: u64, size: Option<u64>) -> Result<Self, Error> {
        let file = inner.size()?;
        let size = match size {
            Some(size) if offset.checked_add(size).is_none_or(|end| end > file) => {
                return Err(invalid(format!(
                    // QEMU's words, with their two spaces.
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to \
                     the  actual size of the containing file ({file})"
                )));
            }
            Some(size) if size % 512 != 0 => {
                return Err(invalid("Specified size is not multiple of 512"))
            }
            Some(size) => size,
            None if offset > file => {
                return Err(invalid(format!(
                    "Offset ({offset}) cannot be greater than size of the containing file \
                     ({file})"
                )))
            }
            None => file - offset,
        };
        Ok(Window {
            inner,
            offset,
            size,
        })
    }
}

impl Storage for Window {
    fn size(&self) -> vmimg::Result<u64> {
        Ok(self.size)
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn request_align(&self) -> usize {
        self.inner.request_align()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        self.inner.readv(self.offset + offset, bufs)
    }

    fn writev<'a>(
        &'a self,
        offset: u64,
        bufs: &'a [IoSlice<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        self.inner.writev(self.offset + offset, bufs)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner
            .write_zeroes(self.offset + offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner.discard(self.offset + offset, len)
    }

    fn flush(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner.flush()
    }

    fn sync(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner.sync()
    }

    fn resize(&self, _: u64, _: PreallocMode) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "Cannot resize a raw image with an offset or a size",
            ))
        })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, vmimg::Result<(HostExtent, u64)>> {
        let max_len = max_len.min(self.size.saturating_sub(offset)).max(1);
        self.inner.extent(self.offset + offset, max_len)
    }

    fn set_permissions(
        &self,
        perm: vmimg::Permissions,
        shared: vmimg::Permissions,
    ) -> vmimg::Result<()> {
        self.inner.set_permissions(perm, shared)
    }

    fn debug_event(&self, event: &'static str) {
        self.inner.debug_event(event)
    }
}

/// An image whose writes are all compressed (QEMU's `compress` filter): each cluster a
/// write touches is written whole, what the write does not cover read from the image.
#[derive(Debug)]
struct Compress(ImageStorage);

impl Compress {
    async fn write(&self, offset: u64, data: &[u8]) -> vmimg::Result<()> {
        let img = &self.0 .0;
        let cs = img.cluster_size().unwrap_or(65536);
        let size = img.size();
        let end = offset + data.len() as u64;
        let mut c = offset / cs * cs;
        while c < end {
            let len = cs.min(size - c);
            let mut cluster = vec![0u8; len as usize];
            let (from, to) = (offset.max(c), end.min(c + len));
            if from > c || to < c + len {
                img.read(c, &mut cluster).await?;
            }
            cluster[(from - c) as usize..(to - c) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            img.write_compressed(c, &cluster).await?;
            c += len;
        }
        Ok(())
    }
}

impl Storage for Compress {
    fn size(&self) -> vmimg::Result<u64> {
        self.0.size()
    }

    fn mem_align(&self) -> usize {
        1
    }

    fn request_align(&self) -> usize {
        1
    }

    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        self.0.readv(offset, bufs)
    }

    fn writev<'a>(
        &'a self,
        offset: u64,
        bufs: &'a [IoSlice<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        Box::pin(async move { self.write(offset, &data).await })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(async move {
            let len = usize::try_from(len).map_err(|_| invalid("zero write too large"))?;
            self.write(offset, &vec![0u8; len]).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, vmimg::Result<()>> {
        self.0.discard(offset, len)
    }

    fn flush(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.0.flush()
    }

    fn sync(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.0.sync()
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, vmimg::Result<()>> {
        self.0.resize(new_size, prealloc)
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, vmimg::Result<(HostExtent, u64)>> {
        self.0.extent(offset, max_len)
    }
}

/// An image's guest bytes as a storage (a format node under blkdebug or a filter).
#[derive(Debug)]
struct ImageStorage(Image);

impl Storage for ImageStorage {
    fn size(&self) -> vmimg::Result<u64> {
        Ok(self.0.size())
    }

    fn mem_align(&self) -> usize {
        1
    }

    fn request_align(&self) -> usize {
        1
    }

    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        Box::pin(self.0.readv(offset, bufs))
    }

    fn writev<'a>(
        &'a self,
        offset: u64,
        bufs: &'a [IoSlice<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        Box::pin(self.0.writev(offset, bufs))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(self.0.write_zeroes(offset, len, may_unmap))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(self.0.discard(offset, len, DiscardMode::ReadsAnything))
    }

    fn flush(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(self.0.flush())
    }

    fn sync(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(self.0.sync())
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(self.0.resize(new_size, prealloc))
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, vmimg::Result<(HostExtent, u64)>> {
        Box::pin(async move {
            let len = max_len.min(self.0.size().saturating_sub(offset));
            if len == 0 {
                return Ok((HostExtent::Hole, max_len.max(1)));
            }
            let s = self.0.block_status(offset, len).await?;
            let kind = if s.zero() {
                HostExtent::Hole
            } else {
                HostExtent::Data
            };
            Ok((kind, s.len))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Val {
        Val::Str(v.into())
    }

    #[test]
    fn keyval_and_json_give_the_same_tree() {
        let a = Node::parse_keyval("driver=qcow2,file.driver=file,file.filename=a,,b").unwrap();
        let b = Node::parse_json(
            "{'driver': 'qcow2', \"file\": {'driver': 'file'}, 'file.filename': 'a,b'}",
        )
        .unwrap();
        assert_eq!(a, b);
        let Some(Val::Node(f)) = a.0.get("file") else {
            panic!("{a:?}")
        };
        assert_eq!(f.0.get("filename"), Some(&s("a,b")));
        let j = Node::parse_json("{'backing': null, 'l': [{'n': 5}, true]}").unwrap();
        assert_eq!(j.0.get("backing"), Some(&Val::Null));
        assert!(matches!(j.0.get("l"), Some(Val::List(l)) if l.len() == 2));
        for bad in ["{'a': }", "{'a' 1}", "[1]", "{'a': 'b'} x", "{'a': 'b"] {
            assert!(Node::parse_json(bad).is_err(), "{bad}");
        }
        // Deep nesting is refused, not a stack overflow.
        let deep = format!("{{'a': {}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
        let e = Node::parse_json(&deep).unwrap_err();
        assert!(e.to_string().contains("nesting too deep"), "{e}");
        let keys = format!("{{'{}': 1}}", "a.".repeat(1000) + "b");
        assert!(Node::parse_json(&keys).is_err());
        assert!(Node::parse_keyval(&("a.".repeat(100_000) + "b=1")).is_err());
        assert!(Node::parse_keyval("driver").is_err());
    }

    #[test]
    fn names_are_placed_at_the_end_of_the_primary_children() {
        let opts = Node::parse_keyval("driver=qcow2,file.driver=blkdebug,file.config=c").unwrap();
        let n = with_name(opts, Some("x.qcow2")).unwrap();
        let want = Node::parse_keyval(
            "driver=qcow2,file.driver=blkdebug,file.config=c,file.image.driver=file,\
             file.image.filename=x.qcow2",
        )
        .unwrap();
        assert_eq!(n, want);
        let n = with_name(Node::default(), Some("blkdebug::x")).unwrap();
        let want =
            Node::parse_keyval("file.driver=blkdebug,file.image.driver=file,file.image.filename=x")
                .unwrap();
        assert_eq!(n, want);
        assert!(is_special("json:{}") && is_special("file:a") && !is_special("d/a:b"));
        assert!(with_name(Node::default(), Some("nope:x")).is_err());
    }
}
