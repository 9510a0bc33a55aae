//! [`DebugStorage`]: requests that fail on purpose, by the rules of QEMU's `blkdebug`
//! driver, so that error paths can be tested against the same configurations as QEMU's.
//!
//! ```text
//!   layer above --debug_event("read_aio")--> rules of that event (in the current state)
//!                                            become the active ones; set-state rules move
//!                                            the state
//!   layer above --readv/writev/...---------> the first active rule of that request type
//!                                            whose sector the request covers fails it
//!                                            (once: and is then forgotten)
//! ```
//!
//! Data reads and writes of an image announce themselves (`read_aio`, `write_aio`), qcow2
//! announces its L2 table loads (`l2_load`); writes, zero writes and flushes of this storage
//! raise QEMU's block-layer events (`pwritev`, `pwritev_zero`, `pwritev_done`,
//! `flush_to_os`, `flush_to_disk`) themselves. The other events of QEMU's format drivers
//! (`l1_update`, `refblock_alloc`, ...) are accepted in rules and do not fire yet.

use super::{BoxFuture, HostExtent, Permissions, PreallocMode, ResolvedName, Storage};
use crate::{Error, ErrorKind, Result};
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// QEMU's blkdebug event names.
const EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// Request types a rule applies to (QEMU's `iotype`).
mod io {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const WRITE_ZEROES: u32 = 4;
    pub const DISCARD: u32 = 8;
    pub const FLUSH: u32 = 16;
    pub const BLOCK_STATUS: u32 = 32;
    pub const ALL: u32 = 63;
}

#[derive(Clone, Debug)]
enum Action {
    Inject {
        errno: i32,
        /// The byte the request must cover (`sector` × 512), or any request.
        offset: Option<u64>,
        once: bool,
        iotypes: u32,
    },
    SetState {
        new_state: u32,
    },
}

#[derive(Clone, Debug)]
struct Rule {
    event: &'static str,
    /// The state the rule applies in (0: any).
    state: u32,
    action: Action,
}

/// The rules of a [`DebugStorage`]: QEMU's blkdebug configuration file, or rules added one
/// by one (as blkdebug's `inject-error` and `set-state` options give them).
#[derive(Clone, Debug, Default)]
pub struct DebugConfig {
    rules: Vec<Rule>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

fn flag(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| invalid(format!("Parameter '{key}' expects a number")))
}

impl DebugConfig {
    /// No rules: every request goes through.
    pub fn new() -> Self {
        DebugConfig::default()
    }

    /// Parses QEMU's blkdebug configuration file: `[inject-error]` and `[set-state]`
    /// sections of `key = "value"` lines, `#` comments.
    pub fn parse(text: &str) -> Result<Self> {
        let mut config = DebugConfig::new();
        let mut section: Option<(String, Vec<(String, String)>)> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if let Some((name, pairs)) = section.take() {
                    config.add(&name, &pairs)?;
                }
                section = Some((name.trim().to_string(), Vec::new()));
                continue;
            }
            let (Some((_, pairs)), Some((key, value))) = (section.as_mut(), line.split_once('='))
            else {
                return Err(invalid(format!(
                    "blkdebug config line {}: parse error",
                    n + 1
                )));
            };
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            pairs.push((key.trim().to_string(), value.to_string()));
        }
        if let Some((name, pairs)) = section {
            config.add(&name, &pairs)?;
        }
        Ok(config)
    }

    /// Adds one rule: `section` is `inject-error` (keys `event`, `state`, `errno`,
    /// `sector`, `once`, `immediately`, `iotype`) or `set-state` (`event`, `state`,
    /// `new_state`).
    pub fn add(&mut self, section: &str, pairs: &[(String, String)]) -> Result<()> {
        let get = |key: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == key || k.replace('-', "_") == key)
                .map(|(_, v)| v.as_str())
        };
        let name = get("event").ok_or_else(|| invalid("Missing event name for rule"))?;
        let event = *EVENTS
            .iter()
            .find(|e| **e == name)
            .ok_or_else(|| invalid(format!("Invalid event name \"{name}\"")))?;
        let state = get("state").map(|v| number("state", v)).transpose()?;
        let action = match section {
            "inject-error" => {
                let mut iotypes = 0;
                for t in get("iotype").map(|v| v.split(',')).into_iter().flatten() {
                    iotypes |= match t.trim() {
                        "read" => io::READ,
                        "write" => io::WRITE,
                        "write-zeroes" => io::WRITE_ZEROES,
                        "discard" => io::DISCARD,
                        "flush" => io::FLUSH,
                        "block-status" => io::BLOCK_STATUS,
                        other => return Err(invalid(format!("Invalid iotype '{other}'"))),
                    };
                }
                let sector: i64 = get("sector")
                    .map(|v| number("sector", v))
                    .transpose()?
                    .unwrap_or(-1);
                Action::Inject {
                    errno: get("errno")
                        .map(|v| number("errno", v))
                        .transpose()?
                        .unwrap_or(libc::EIO),
                    offset: u64::try_from(sector).ok().and_then(|s| s.checked_mul(512)),
                    once: get("once")
                        .map(|v| flag("once", v))
                        .transpose()?
                        .unwrap_or(false),
                    iotypes: if iotypes == 0 { io::ALL } else { iotypes },
                }
            }
            "set-state" => Action::SetState {
                new_state: number(
                    "new_state",
                    get("new_state")
                        .ok_or_else(|| invalid("Missing new_state for set-state rule"))?,
                )?,
            },
            other => {
                return Err(invalid(format!(
                    "blkdebug config: unknown section [{other}]"
                )))
            }
        };
        self.rules.push(Rule {
            event,
            state: state.unwrap_or(0),
            action,
        });
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    rules: Vec<Option<Rule>>,
    /// Indexes of the rules that fail requests now, newest first.
    active: Vec<usize>,
    state: u32,
}

/// A storage over `inner` whose requests fail as a [`DebugConfig`] says (QEMU's blkdebug).
#[derive(Debug)]
pub struct DebugStorage {
    inner: Arc<dyn Storage>,
    align: usize,
    st: Mutex<State>,
}

impl DebugStorage {
    /// `inner` under `config`'s rules, requests aligned to `align` bytes (1: as `inner`).
    pub fn new(inner: Arc<dyn Storage>, config: DebugConfig, align: usize) -> Self {
        DebugStorage {
            align: align.max(inner.request_align()),
            inner,
            st: Mutex::new(State {
                rules: config.rules.into_iter().map(Some).collect(),
                active: Vec::new(),
                state: 1,
            }),
        }
    }

    fn event(&self, event: &str) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let current = st.state;
        let mut new_state = current;
        let mut injected = false;
        for i in 0..st.rules.len() {
            let Some(rule) = &st.rules[i] else { continue };
            if rule.event != event || (rule.state != 0 && rule.state != current) {
                continue;
            }
            match rule.action {
                Action::Inject { .. } => {
                    if !injected {
                        st.active.clear();
                        injected = true;
                    }
                    st.active.insert(0, i);
                }
                Action::SetState { new_state: n } => new_state = n,
            }
        }
        st.state = new_state;
    }

    /// The error an active rule gives a request of `iotype` over `[offset, offset + len)`.
    fn check(&self, iotype: u32, offset: u64, len: u64) -> Result<()> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let hit = st.active.iter().position(|&i| match &st.rules[i] {
            Some(Rule {
                action:
                    Action::Inject {
                        offset: at,
                        iotypes,
                        ..
                    },
                ..
            }) => {
                iotypes & iotype != 0
                    && at.is_none_or(|at| len > 0 && at >= offset && at - offset < len)
            }
            _ => false,
        });
        let Some(pos) = hit else { return Ok(()) };
        let i = st.active[pos];
        let Some(Rule {
            action: Action::Inject { errno, once, .. },
            ..
        }) = st.rules[i].clone()
        else {
            return Ok(());
        };
        if once {
            st.active.remove(pos);
            st.rules[i] = None;
        }
        Err(Error::from_io(std::io::Error::from_raw_os_error(errno)))
    }
}

impl Storage for DebugStorage {
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn request_align(&self) -> usize {
        self.align
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, Result<()>> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        Box::pin(async move {
            self.check(io::READ, offset, len)?;
            self.inner.readv(offset, bufs).await
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        Box::pin(async move {
            self.event("pwritev");
            self.check(io::WRITE, offset, len)?;
            self.inner.writev(offset, bufs).await?;
            self.event("pwritev_done");
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.event("pwritev_zero");
            self.check(io::WRITE_ZEROES, offset, len)?;
            self.inner.write_zeroes(offset, len, may_unmap).await?;
            self.event("pwritev_done");
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(io::DISCARD, offset, len)?;
            self.inner.discard(offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.event("flush_to_os");
            self.check(io::FLUSH, 0, 0)?;
            self.inner.flush().await
        })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.event("flush_to_os");
            self.event("flush_to_disk");
            self.check(io::FLUSH, 0, 0)?;
            self.inner.sync().await
        })
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        self.inner.resize(new_size, prealloc)
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        self.inner.extent(offset, max_len)
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }

    fn set_permissions(&self, perm: Permissions, shared: Permissions) -> Result<()> {
        self.inner.set_permissions(perm, shared)
    }

    fn permissions(&self) -> (Permissions, Permissions) {
        self.inner.permissions()
    }

    fn debug_event(&self, event: &'static str) {
        self.event(event);
    }

    fn resolve_name(&self, name: &str) -> Result<ResolvedName> {
        self.inner.resolve_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, StorageExt};

    fn storage(conf: &str) -> DebugStorage {
        let config = DebugConfig::parse(conf).unwrap();
        DebugStorage::new(Arc::new(MemoryStorage::new()), config, 1)
    }

    /// As QEMU: a rule fails nothing until its event happens, then every request of its
    /// type (the first only with once), and the sector narrows it to requests covering it.
    #[tokio::test]
    async fn rules_fire_after_their_event_as_in_blkdebug() {
        let s = storage("[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nsector = \"8\"\n");
        let mut b = [0u8; 512];
        s.read_at(4096, &mut b).await.unwrap();
        s.debug_event("read_aio");
        s.read_at(0, &mut b).await.unwrap();
        let e = s.read_at(4096, &mut b).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(s.read_at(4096, &mut b).await.is_err(), "once is off");
        s.write_at(0, &b).await.unwrap();

        let s = storage("# a comment\n[inject-error]\nevent = \"write_aio\"\nonce = \"on\"\n");
        s.debug_event("write_aio");
        assert_eq!(s.write_at(0, &b).await.unwrap_err().errno(), libc::EIO);
        s.write_at(0, &b).await.unwrap();
    }

    #[tokio::test]
    async fn states_gate_rules() {
        let s = storage(
            "[set-state]\nevent = \"flush_to_disk\"\nstate = \"1\"\nnew_state = \"2\"\n\
             [inject-error]\nevent = \"read_aio\"\nstate = \"2\"\n",
        );
        let mut b = [0u8; 512];
        s.debug_event("read_aio");
        s.read_at(0, &mut b).await.unwrap();
        s.sync().await.unwrap();
        s.debug_event("read_aio");
        assert!(s.read_at(0, &mut b).await.is_err());
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (conf, words) in [
            ("[inject-error]\nevent = \"nope\"\n", "Invalid event name"),
            ("[inject-error]\nerrno = \"5\"\n", "Missing event name"),
            ("event = \"read_aio\"\n", "parse error"),
            ("[set-state]\nevent = \"read_aio\"\n", "new_state"),
            (
                "[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
                "'once'",
            ),
        ] {
            let e = DebugConfig::parse(conf).unwrap_err();
            assert!(e.to_string().contains(words), "{conf}: {e}");
        }
    }
}
