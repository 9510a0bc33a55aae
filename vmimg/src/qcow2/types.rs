//! Typed offsets and cluster geometry. Numbers read from an image go through the checked
//! conversions here, so each overflow choice is visible at its call site.

/// Offset in the guest's view of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// Offset in the image file (or the external data file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// Index of a guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// Cluster size and the derived L2 geometry of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    /// log2 of the number of entries in one L2 table.
    l2_bits: u32,
    extended_l2: bool,
}

impl Geometry {
    /// Geometry for `cluster_bits` (9..=21, checked by the header parser) and L2 entry width.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        // An L2 entry is 8 bytes, or 16 with extended L2 entries.
        let entry_shift = if extended_l2 { 4 } else { 3 };
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - entry_shift,
            extended_l2,
        }
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(self) -> u32 {
        self.cluster_bits
    }

    /// The cluster size in bytes.
    pub fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries carry a subcluster bitmap.
    pub fn extended_l2(self) -> bool {
        self.extended_l2
    }

    /// Entries in one L2 table.
    pub fn l2_entries(self) -> u64 {
        1 << self.l2_bits
    }

    /// Bytes one L2 table covers in the guest.
    pub fn l2_coverage(self) -> u64 {
        1 << (self.l2_bits + self.cluster_bits)
    }

    /// Size of a subcluster (a cluster without extended L2 entries).
    pub fn subcluster_size(self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Offset within the cluster.
    pub fn in_cluster(self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// The guest cluster holding `offset`.
    pub fn guest_cluster(self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits)
    }

    /// L1 index of a guest cluster.
    pub fn l1_index(self, cluster: GuestCluster) -> u64 {
        cluster.0 >> self.l2_bits
    }

    /// L2 index of a guest cluster.
    pub fn l2_index(self, cluster: GuestCluster) -> usize {
        (cluster.0 & (self.l2_entries() - 1)) as usize
    }

    /// L1 entries needed to map `size` guest bytes, `None` if that overflows.
    pub fn l1_entries_for(self, size: u64) -> Option<u64> {
        Some(size.checked_add(self.l2_coverage() - 1)? >> (self.l2_bits + self.cluster_bits))
    }

    /// Whether a host offset is aligned to a cluster.
    pub fn is_aligned(self, offset: HostOffset) -> bool {
        self.in_cluster(offset.0) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_64k_clusters() {
        let g = Geometry::new(16, false);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        let c = g.guest_cluster(GuestOffset((512 << 20) + 3 * 65536 + 5));
        assert_eq!((g.l1_index(c), g.l2_index(c)), (1, 3));
        assert_eq!(g.l1_entries_for(1), Some(1));
        assert_eq!(g.l1_entries_for(512 << 20), Some(1));
        assert_eq!(g.l1_entries_for((512 << 20) + 1), Some(2));
        assert_eq!(g.l1_entries_for(u64::MAX), None);
    }

    #[test]
    fn extended_l2_halves_the_entries_and_has_32_subclusters() {
        let g = Geometry::new(16, true);
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
    }
}
