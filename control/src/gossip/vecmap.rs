//! A map keyed by node id, kept as one sorted `Vec`: what a host holds per other host (its
//! replica of each table, each member alive, each sender's replay window) takes no more than
//! its entries, where a hash map takes twice that (buckets kept free, a control byte each) and
//! a B-tree a third more. Every host holds several maps of every other host, so at cluster
//! scale this is most of the gossip layer's memory. Lookups are binary searches; inserting a
//! new key moves the entries above it, which is rare (hosts join and leave).

use crate::state::NodeId;

/// Entries sorted by node id, each id once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMap<V> {
    entries: Vec<(NodeId, V)>,
}

impl<V> Default for VecMap<V> {
    fn default() -> Self {
        VecMap { entries: Vec::new() }
    }
}

impl<V> VecMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, key: NodeId) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&key, |(k, _)| *k)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes room for `additional` more entries at once: for a map about to hold one entry
    /// per host of a known directory, which would otherwise grow by doubling and keep up to
    /// half its room unused.
    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve_exact(additional);
    }

    /// The value of `key`.
    pub fn get(&self, key: NodeId) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// The value of `key`, to change.
    pub fn get_mut(&mut self, key: NodeId) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: NodeId) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key`'s value; returns the one it replaced.
    pub fn insert(&mut self, key: NodeId, value: V) -> Option<V> {
        match self.find(key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// `key`'s value, inserted first with `make` if there is none.
    pub fn get_or_insert_with(&mut self, key: NodeId, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (key, make()));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: NodeId) -> Option<V> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(NodeId, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(*k, v));
    }

    /// Takes every entry out, in key order.
    pub fn drain(&mut self) -> impl Iterator<Item = (NodeId, V)> + '_ {
        self.entries.drain(..)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (NodeId, &V)> + '_ {
        self.entries.iter().map(|(k, v)| (*k, v))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = NodeId> + '_ {
        self.entries.iter().map(|(k, _)| *k)
    }

    /// The entry at `index` in key order (`index < len`).
    pub fn nth(&self, index: usize) -> (NodeId, &V) {
        let (k, v) = &self.entries[index];
        (*k, v)
    }

    /// Where `key` is (or would be) in key order.
    pub fn rank(&self, key: NodeId) -> usize {
        self.find(key).unwrap_or_else(|i| i)
    }
}

impl<V> FromIterator<(NodeId, V)> for VecMap<V> {
    /// Of entries in any order; of a key given twice, the last value is kept (as a map
    /// collected from the same entries keeps it).
    fn from_iter<I: IntoIterator<Item = (NodeId, V)>>(iter: I) -> Self {
        let mut entries: Vec<(NodeId, V)> = iter.into_iter().collect();
        // Stable: of equal keys, the last given ends up last, and is the one kept.
        entries.sort_by_key(|(k, _)| *k);
        let mut kept: Vec<(NodeId, V)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match kept.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => kept.push((k, v)),
            }
        }
        kept.shrink_to_fit();
        VecMap { entries: kept }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn collecting_sorts_and_keeps_the_last_value_of_a_key() {
        let m: VecMap<&str> = [(5, "a"), (1, "b"), (5, "c"), (3, "d"), (1, "e")].into_iter().collect();
        assert_eq!(m.iter().collect::<Vec<_>>(), [(1, &"e"), (3, &"d"), (5, &"c")]);
        assert_eq!((m.len(), m.rank(3), m.rank(4), m.rank(9)), (3, 1, 2, 3));
        assert_eq!(m.nth(2), (5, &"c"));
    }

    #[test]
    fn reserving_for_a_directory_leaves_no_room_unused() {
        let mut m = VecMap::new();
        m.reserve(1000);
        for k in 0..1000 {
            m.insert(k, k);
        }
        assert_eq!(m.entries.capacity(), 1000);
    }

    proptest::proptest! {
        /// Against the standard library's ordered map, through any mix of operations.
        #[test]
        fn it_behaves_as_an_ordered_map(ops in proptest::collection::vec((0u8..5, 0u64..40, 0u32..100), 0..300)) {
            let mut m = VecMap::new();
            let mut model = BTreeMap::new();
            for (op, k, v) in ops {
                match op {
                    0 => proptest::prop_assert_eq!(m.insert(k, v), model.insert(k, v)),
                    1 => proptest::prop_assert_eq!(m.remove(k), model.remove(&k)),
                    2 => {
                        *m.get_or_insert_with(k, || v) += 1;
                        *model.entry(k).or_insert(v) += 1;
                    }
                    3 => {
                        m.retain(|k, v| (k + u64::from(*v)) % 3 != 0);
                        model.retain(|k, v| (k + u64::from(*v)) % 3 != 0);
                    }
                    _ => {
                        if let Some(x) = m.get_mut(k) {
                            *x = v;
                        }
                        if let Some(x) = model.get_mut(&k) {
                            *x = v;
                        }
                    }
                }
                proptest::prop_assert_eq!(m.get(k), model.get(&k));
                proptest::prop_assert_eq!(m.contains_key(k), model.contains_key(&k));
                let ours: Vec<(u64, u32)> = m.iter().map(|(k, v)| (k, *v)).collect();
                let theirs: Vec<(u64, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                proptest::prop_assert_eq!(ours, theirs);
            }
            let drained: Vec<(u64, u32)> = m.drain().collect();
            proptest::prop_assert_eq!(drained, model.into_iter().collect::<Vec<_>>());
            proptest::prop_assert!(m.is_empty());
        }
    }
}
