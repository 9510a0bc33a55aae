//! A bounded cache of metadata tables read on demand (grain tables, L2 tables), by index,
//! evicted oldest first: formats whose tables are small and read-mostly share it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Cached tables of `T` entries, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct TableCache<T> {
    tables: HashMap<u64, Arc<Vec<T>>>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl<T: Clone> TableCache<T> {
    /// An empty cache of at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            tables: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// How many tables of `entries` entries of `entry_bytes` each fit in `bytes` (at least
    /// `min`, at most 65536).
    pub(crate) fn slots(bytes: u64, entries: u64, entry_bytes: u64, min: usize) -> usize {
        (bytes / (entries * entry_bytes).max(1)).clamp(min as u64, 1 << 16) as usize
    }

    /// The table at `index`, if cached.
    pub(crate) fn get(&self, index: u64) -> Option<Arc<Vec<T>>> {
        self.tables.get(&index).cloned()
    }

    /// Caches `table` at `index`, evicting the oldest table when full.
    pub(crate) fn put(&mut self, index: u64, table: Arc<Vec<T>>) {
        if self.tables.insert(index, table).is_none() {
            self.order.push_back(index);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.tables.remove(&old);
                }
            }
        }
    }

    /// Sets entry `entry` of the cached table at `index` (if cached) to `value`.
    pub(crate) fn update(&mut self, index: u64, entry: usize, value: T) {
        if let Some(t) = self.tables.get_mut(&index) {
            if let Some(slot) = Arc::make_mut(t).get_mut(entry) {
                *slot = value;
            }
        }
    }

    /// Number of tables cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_first_and_updates_in_place() {
        let mut c = TableCache::new(2);
        for i in 0..3u64 {
            c.put(i, Arc::new(vec![i as u32; 4]));
        }
        assert!(c.get(0).is_none());
        assert_eq!(c.len(), 2);
        let held = c.get(2).unwrap();
        c.update(2, 1, 9);
        assert_eq!(c.get(2).unwrap()[1], 9);
        assert_eq!(
            held[1], 2,
            "a table handed out is not changed under its reader"
        );
        assert_eq!(TableCache::<u32>::slots(32 << 20, 512, 4, 16), 16384);
        assert_eq!(TableCache::<u32>::slots(0, 512, 4, 16), 16);
    }
}
