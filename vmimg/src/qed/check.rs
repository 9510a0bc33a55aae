//! qemu-img check for QED, as QEMU 10 counts: every table and data cluster referenced once,
//! inside the file, after the header; clusters nobody references are leaks. The repair
//! (`-r leaks` and `-r all` alike, as in QEMU) zeroes entries that point outside the file;
//! leaks and clusters referenced twice are left as they are.
//!
//! Deliberate difference: QEMU divides by `cluster_size - 1` where it means the cluster
//! size, so from about 4 GiB of clusters on (at 64 KiB) it reports leaks that are not
//! there; the counts here are the true ones.

use super::header::{QedHeader, ZERO_CLUSTER};
use crate::format::CheckReport;
use crate::storage::{Storage, StorageExt};
use crate::Result;
use std::collections::HashSet;

/// Reads `n` little-endian u64 entries at `offset`.
pub(super) async fn read_table(file: &dyn Storage, offset: u64, n: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (n * 8) as usize];
    file.read_at(offset, &mut raw).await?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// The bytes of `entries`.
pub(super) fn table_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Clusters referenced so far.
struct Used {
    clusters: HashSet<u64>,
    cs: u64,
}

impl Used {
    /// Marks `n` clusters from byte `offset`; false (and one corruption per cluster
    /// already marked) when any was.
    fn mark(&mut self, offset: u64, n: u64, report: &mut CheckReport) -> bool {
        let first = offset / self.cs;
        let mut twice = 0;
        for c in first..first + n {
            if !self.clusters.insert(c) {
                twice += 1;
            }
        }
        report.corruptions += twice;
        twice == 0
    }
}

/// Checks the image in `file` (header `h`, L1 entries `l1`), fixing what QEMU fixes when
/// `fix`; the fixed tables are written back. Returns the report and the L1 as it is now.
pub(super) async fn check(
    file: &dyn Storage,
    h: &QedHeader,
    mut l1: Vec<u64>,
    fix: bool,
) -> Result<(CheckReport, Vec<u64>)> {
    let cs = h.cs();
    let end = h.file_end(file.size()?);
    let mut report = CheckReport {
        total_clusters: h.image_size.div_ceil(cs),
        ..CheckReport::default()
    };
    let mut used = Used {
        clusters: HashSet::new(),
        cs,
    };
    used.mark(h.l1_table_offset, u64::from(h.table_size), &mut report);
    let mut l1_fixed = false;
    for slot in l1.iter_mut() {
        let offset = *slot;
        if offset == 0 {
            continue;
        }
        if !h.table_offset_ok(offset, end) {
            if fix {
                *slot = 0;
                l1_fixed = true;
                report.corruptions_fixed += 1;
            } else {
                report.corruptions += 1;
            }
            continue;
        }
        // A table whose clusters are taken already is not read (its data then counts
        // as leaked), as in QEMU.
        if !used.mark(offset, u64::from(h.table_size), &mut report) {
            continue;
        }
        let mut l2 = match read_table(file, offset, h.table_entries()).await {
            Ok(t) => t,
            Err(e) => {
                report.check_errors += 1;
                report
                    .messages
                    .push(format!("ERROR reading an L2 table: {e}"));
                continue;
            }
        };
        let mut last = 0u64;
        let mut invalid = 0;
        for e in l2.iter_mut() {
            if *e == 0 || *e == ZERO_CLUSTER {
                continue;
            }
            report.allocated_clusters += 1;
            // Wrapping, as QEMU computes it: the entry is validated below.
            if last != 0 && last.wrapping_add(cs) != *e {
                report.fragmented_clusters += 1;
            }
            last = *e;
            if !h.cluster_ok(*e, end) {
                if fix {
                    *e = 0;
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
                invalid += 1;
                continue;
            }
            used.mark(*e, 1, &mut report);
        }
        if invalid > 0 && fix {
            file.write_at(offset, &table_bytes(&l2)).await?;
        }
    }
    if l1_fixed {
        file.write_at(h.l1_table_offset, &table_bytes(&l1)).await?;
    }
    let clusters = end / cs;
    let header = u64::from(h.header_size).min(clusters);
    let in_range = used
        .clusters
        .iter()
        .filter(|&&c| c >= header && c < clusters)
        .count() as u64;
    report.leaks = clusters - header - in_range;
    if fix && (l1_fixed || report.corruptions_fixed > 0) {
        file.sync().await?;
    }
    Ok((report, l1))
}
