//! Image locking as QEMU does it: one byte-range lock per permission, on the image file
//! itself, so that QEMU's tools and vmimg see each other.
//!
//! QEMU's block layer names what a user of an image does (its *permissions*) and what it lets
//! others do at the same time (its *shared* permissions). The file driver turns both into
//! open-file-description (OFD) locks, all shared (`F_RDLCK`), one byte each:
//!
//! ```text
//!   byte 100 + bit   held while this user has the permission
//!   byte 200 + bit   held while this user refuses to share it
//!
//!   bit 0 consistent read    bit 1 write    bit 2 write unchanged    bit 3 resize
//! ```
//!
//! Before taking a permission a user checks that nobody holds byte `200 + bit` (nobody
//! refuses it); before refusing one it checks that nobody holds `100 + bit`. Locks are taken
//! first and checked afterwards, so two users racing for the same image cannot both win.
//! Read off QEMU 10 (`/proc/locks` while its tools run): a qcow2 writer holds 100, 101, 103,
//! 201 and 203; a qcow2 reader 100, 201 and 203; a reader with `-U` (force share) only 100.

use crate::{Error, ErrorKind, Result};
use std::fmt;

/// Byte of the first permission lock.
const PERM_BASE: u64 = 100;
/// Byte of the first "not shared" lock.
const SHARED_BASE: u64 = 200;

/// A set of QEMU block permissions (bits as in QEMU's `BLK_PERM_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// No permission.
    pub const NONE: Permissions = Permissions(0);
    /// Reading sees consistent data (nobody changes it behind the reader's back).
    pub const CONSISTENT_READ: Permissions = Permissions(1);
    /// Writing.
    pub const WRITE: Permissions = Permissions(2);
    /// Writing data that does not change what readers see (QEMU's copy-on-read).
    pub const WRITE_UNCHANGED: Permissions = Permissions(4);
    /// Changing the size.
    pub const RESIZE: Permissions = Permissions(8);
    /// Every permission.
    pub const ALL: Permissions = Permissions(15);

    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions of `self` that are not in `other`.
    pub fn without(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// The permissions of `self` and of `other`.
    pub fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// The single permissions in the set, with their bit numbers.
    fn bits(self) -> impl Iterator<Item = (u64, &'static str)> {
        (0..4u64)
            .filter(move |b| self.0 & (1 << b) != 0)
            .map(|b| (b, Self::NAMES[b as usize]))
    }
}

impl std::ops::BitOr for Permissions {
    type Output = Permissions;
    fn bitor(self, rhs: Permissions) -> Permissions {
        self.union(rhs)
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.bits().map(|(_, n)| n).collect();
        write!(f, "Permissions({})", names.join(", "))
    }
}

/// Whether files are locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Lock where the file system supports it; where it does not (some network file
    /// systems), go on without locks (QEMU's `locking=auto`).
    #[default]
    Auto,
    /// Lock, and fail where the file system cannot.
    On,
    /// Never lock: nothing protects the image from other processes.
    Off,
}

impl LockMode {
    /// Parses QEMU's names: `auto`, `on`, `off`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => LockMode::Auto,
            "on" => LockMode::On,
            "off" => LockMode::Off,
            _ => return None,
        })
    }
}

/// Operations on the lock bytes of one open file description.
pub(super) trait LockBytes {
    /// Takes (`true`) or releases (`false`) a shared lock on `byte`.
    fn set(&self, byte: u64, locked: bool) -> std::io::Result<()>;
    /// Whether another open file description holds a lock on `byte`.
    fn held_elsewhere(&self, byte: u64) -> std::io::Result<bool>;
}

/// The permissions one open file holds and shares, and the locks that express them.
#[derive(Debug)]
pub(super) struct FileLocks {
    mode: LockMode,
    /// Held and shared permissions (also kept with locking off, for `permissions()`).
    state: std::sync::Mutex<(Permissions, Permissions)>,
    /// Locking turned out to be unavailable here (with [`LockMode::Auto`]).
    unavailable: std::sync::atomic::AtomicBool,
}

/// The bytes locked for holding `perm` and sharing `shared`.
fn lock_set(perm: Permissions, shared: Permissions) -> Vec<u64> {
    let held = perm.bits().map(|(b, _)| PERM_BASE + b);
    let refused = Permissions::ALL
        .without(shared)
        .bits()
        .map(|(b, _)| SHARED_BASE + b);
    held.chain(refused).collect()
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

impl FileLocks {
    pub(super) fn new(mode: LockMode) -> Self {
        FileLocks {
            mode,
            state: std::sync::Mutex::new((Permissions::NONE, Permissions::ALL)),
            unavailable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn get(&self) -> (Permissions, Permissions) {
        *self.state.lock().unwrap()
    }

    /// Switches to holding `perm` and sharing `shared`: takes the new locks, checks that no
    /// other user conflicts, then releases the locks no longer needed. On a conflict the
    /// previous locks are restored and the error names the permission (QEMU's wording;
    /// `name` is the file as the user named it).
    pub(super) fn set(
        &self,
        bytes: &dyn LockBytes,
        name: &str,
        perm: Permissions,
        shared: Permissions,
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let off = self.mode == LockMode::Off
            || self.unavailable.load(std::sync::atomic::Ordering::Relaxed);
        if off {
            *state = (perm, shared);
            return Ok(());
        }
        let old = lock_set(state.0, state.1);
        let new = lock_set(perm, shared);
        let apply = |set: &[u64], release_others: bool| -> std::io::Result<()> {
            for byte in (PERM_BASE..PERM_BASE + 4).chain(SHARED_BASE..SHARED_BASE + 4) {
                if set.contains(&byte) {
                    bytes.set(byte, true)?;
                } else if release_others {
                    bytes.set(byte, false)?;
                }
            }
            Ok(())
        };
        let union: Vec<u64> = old.iter().chain(new.iter()).copied().collect();
        if let Err(e) = apply(&union, false) {
            let _ = apply(&old, true);
            if self.mode == LockMode::Auto && unsupported(&e) {
                tracing::debug!(file = name, "file locking unavailable: {e}");
                self.unavailable
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                *state = (perm, shared);
                return Ok(());
            }
            return Err(Error::from_io(e).with_operation("lock"));
        }
        // Giving permissions up cannot conflict with anyone: no check (a failed check would
        // leave the permission held).
        let only_releases = state.0.contains(perm)
            && Permissions::ALL
                .without(state.1)
                .contains(Permissions::ALL.without(shared));
        let checked = if only_releases {
            Ok(())
        } else {
            check(bytes, name, perm, shared)
        };
        match checked {
            Ok(()) => {
                apply(&new, true).map_err(|e| Error::from_io(e).with_operation("lock"))?;
                *state = (perm, shared);
                Ok(())
            }
            Err(e) => {
                let _ = apply(&old, true);
                Err(e)
            }
        }
    }
}

/// QEMU's conflict check: nobody may refuse what we take, nor hold what we refuse.
fn check(bytes: &dyn LockBytes, name: &str, perm: Permissions, shared: Permissions) -> Result<()> {
    let conflict = |what: String| {
        Error::new(
            ErrorKind::Locked,
            format!("{what}\nIs another process using the image [{name}]?"),
        )
    };
    for (bit, perm_name) in perm.bits() {
        if bytes
            .held_elsewhere(SHARED_BASE + bit)
            .map_err(|e| Error::from_io(e).with_operation("lock"))?
        {
            return Err(conflict(format!("Failed to get \"{perm_name}\" lock")));
        }
    }
    for (bit, perm_name) in Permissions::ALL.without(shared).bits() {
        if bytes
            .held_elsewhere(PERM_BASE + bit)
            .map_err(|e| Error::from_io(e).with_operation("lock"))?
        {
            return Err(conflict(format!(
                "Failed to get shared \"{perm_name}\" lock"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Lock bytes of several simulated open file descriptions of one file.
    #[derive(Default)]
    struct Table(Mutex<HashMap<u64, Vec<usize>>>);

    struct Ofd(Arc<Table>, usize);

    impl LockBytes for Ofd {
        fn set(&self, byte: u64, locked: bool) -> std::io::Result<()> {
            let mut t = self.0 .0.lock().unwrap();
            let holders = t.entry(byte).or_default();
            holders.retain(|&h| h != self.1);
            if locked {
                holders.push(self.1);
            }
            Ok(())
        }
        fn held_elsewhere(&self, byte: u64) -> std::io::Result<bool> {
            let t = self.0 .0.lock().unwrap();
            Ok(t.get(&byte).is_some_and(|h| h.iter().any(|&x| x != self.1)))
        }
    }

    fn held(table: &Table, who: usize) -> Vec<u64> {
        let t = table.0.lock().unwrap();
        let mut v: Vec<u64> = t
            .iter()
            .filter(|(_, h)| h.contains(&who))
            .map(|(b, _)| *b)
            .collect();
        v.sort_unstable();
        v
    }

    const QCOW2_SHARED: Permissions = Permissions(15 & !2 & !8);

    #[test]
    fn qcow2_writer_and_reader_take_qemus_bytes() {
        let t = Arc::new(Table::default());
        let w = FileLocks::new(LockMode::On);
        let rw = Permissions::CONSISTENT_READ | Permissions::WRITE | Permissions::RESIZE;
        w.set(&Ofd(Arc::clone(&t), 1), "a", rw, QCOW2_SHARED)
            .unwrap();
        assert_eq!(held(&t, 1), vec![100, 101, 103, 201, 203]);
        let r = FileLocks::new(LockMode::On);
        let err = r
            .set(
                &Ofd(Arc::clone(&t), 2),
                "a",
                Permissions::CONSISTENT_READ,
                QCOW2_SHARED,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked);
        assert_eq!(
            err.to_string(),
            "Failed to get shared \"write\" lock\nIs another process using the image [a]?"
        );
        assert!(held(&t, 2).is_empty(), "a refused user keeps no lock");
        // Force share: a reader that lets others do anything coexists with the writer.
        r.set(
            &Ofd(Arc::clone(&t), 2),
            "a",
            Permissions::CONSISTENT_READ,
            Permissions::ALL,
        )
        .unwrap();
        assert_eq!(held(&t, 2), vec![100]);
    }

    #[test]
    fn a_writer_is_refused_where_a_reader_unshares_write() {
        let t = Arc::new(Table::default());
        let r = FileLocks::new(LockMode::On);
        r.set(
            &Ofd(Arc::clone(&t), 1),
            "img",
            Permissions::CONSISTENT_READ,
            QCOW2_SHARED,
        )
        .unwrap();
        let w = FileLocks::new(LockMode::On);
        let err = w
            .set(
                &Ofd(Arc::clone(&t), 2),
                "img",
                Permissions::WRITE,
                Permissions::ALL,
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("Failed to get \"write\" lock"));
        // Locking off: nothing is taken or checked.
        let off = FileLocks::new(LockMode::Off);
        off.set(
            &Ofd(Arc::clone(&t), 3),
            "img",
            Permissions::WRITE,
            Permissions::NONE,
        )
        .unwrap();
        assert!(held(&t, 3).is_empty());
    }

    /// Regression: giving a permission up went through the conflict check; a conflict
    /// that appeared meanwhile made it fail and keep the permission held for good.
    #[test]
    fn giving_permissions_up_never_fails() {
        let t = Arc::new(Table::default());
        let l = FileLocks::new(LockMode::On);
        let me = Ofd(Arc::clone(&t), 1);
        let w = Permissions::CONSISTENT_READ | Permissions::WRITE;
        l.set(&me, "r", w | Permissions::RESIZE, Permissions::ALL)
            .unwrap();
        // Another user refuses writers (racing in past our check).
        Ofd(Arc::clone(&t), 2).set(201, true).unwrap();
        l.set(&me, "r", w, Permissions::ALL).unwrap();
        assert_eq!(held(&t, 1), vec![100, 101]);
    }

    #[test]
    fn changing_permissions_releases_the_bytes_no_longer_needed() {
        let t = Arc::new(Table::default());
        let l = FileLocks::new(LockMode::On);
        let me = Ofd(Arc::clone(&t), 1);
        let rw = Permissions::CONSISTENT_READ | Permissions::WRITE;
        l.set(&me, "r", rw, Permissions::ALL).unwrap();
        assert_eq!(held(&t, 1), vec![100, 101]);
        l.set(&me, "r", rw | Permissions::RESIZE, Permissions::ALL)
            .unwrap();
        assert_eq!(held(&t, 1), vec![100, 101, 103]);
        l.set(&me, "r", rw, Permissions::ALL).unwrap();
        assert_eq!(held(&t, 1), vec![100, 101]);
        assert_eq!(l.get(), (rw, Permissions::ALL));
    }
}
