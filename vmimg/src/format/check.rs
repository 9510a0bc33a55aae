//! What a consistency check finds and repairs (`qemu-img check`), in qemu-img's terms: the
//! same counts for every format that can be checked.

/// What a check may change in the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Repair {
    /// Only look (`qemu-img check`).
    #[default]
    None,
    /// Free leaked clusters (`qemu-img check -r leaks`); OFLAG_COPIED flags are fixed too
    /// when the refcounts are otherwise sound, as QEMU does.
    Leaks,
    /// Fix leaks, refcount errors and OFLAG_COPIED flags, rebuilding the refcount structure
    /// when needed (`qemu-img check -r all`).
    All,
}

impl Repair {
    /// Whether leaked clusters are freed.
    pub(crate) fn leaks(self) -> bool {
        self != Repair::None
    }

    /// Whether inconsistencies other than leaks are fixed.
    pub(crate) fn errors(self) -> bool {
        self == Repair::All
    }
}

/// The outcome of one check pass, with qemu-img's counts.
///
/// With a repair mode, the counts describe the pass that repaired: what was fixed, and
/// what was found but could not be fixed. `qemu-img check -r` then checks the image again
/// and prints the second pass with the first pass's `*_fixed` counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can corrupt data (refcount too low, bad offsets, bad flags).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (wasted space).
    pub leaks: u64,
    /// Errors that kept parts of the check from running (unreadable metadata).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a refcount), in bytes.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1/L2 tables (data, preallocated zero and
    /// compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not following their predecessor on the host (compressed clusters
    /// always count).
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// What was found and done, one line each, in QEMU's words (qemu-img prints these on
    /// stderr).
    pub messages: Vec<String>,
    /// Set when the check could not complete, with the reason (qemu-img: "Check failed:
    /// REASON", exit status 1); the counts are then incomplete.
    pub failure: Option<String>,
}
