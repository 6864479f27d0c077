//! The endpoint tables one host holds: its own (which only it writes) and a replica of every
//! other host's, each at a known point of its owner's history.
//!
//! A replica knows its owner's epoch and a *watermark*: every version up to it has been
//! applied (or was superseded by a later version of the same slot, which anti-entropy
//! vouches for). Versions that arrive out of order are applied at once (a slot only ever
//! moves to a higher version) and remembered above the watermark until the gap fills. The
//! watermark is what anti-entropy compares: a replica behind another pulls what it lacks.
//!
//! Tombstones stay for the life of the owner's epoch; a slot is an address of the owner's
//! own block in one network, reused lowest-free, so a table never holds more slots than
//! its blocks hold addresses.
//!
//! A host holds a replica of every other host's table, so replicas are kept small: sorted by
//! owner in one `Vec`, each behind an `Arc` that is copied only when it changes. Replicas of an
//! owner that are alike can then be one: a simulation's warm start hands every host the owner's
//! own (see [`EndpointTables::adopt`]), as it hands them the same records.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::record::{Change, Endpoint, EndpointKey, Record};
use super::vecmap::VecMap;
use crate::state::NodeId;

/// Where a replica stands: its epoch and watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The owner's epoch.
    pub epoch: u64,
    /// Every version up to this one is applied.
    pub watermark: u64,
}

/// What applying a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was new: the replica changed (the endpoints may have).
    New,
    /// Already known, or older than what the replica has.
    Stale,
}

/// One owner's table as a host holds it.
#[derive(Debug, Default, Clone)]
pub struct Replica {
    epoch: u64,
    watermark: u64,
    /// Versions applied above the watermark, while a gap below them remains: rarely any, so
    /// boxed (8 bytes, where an empty set takes 24).
    #[allow(clippy::box_collection, reason = "the replica's size, when it is empty (nearly always)")]
    above: Option<Box<BTreeSet<u64>>>,
    /// Sorted by slot, no longer than it needs to be (a table is small, and thousands are
    /// held: a slice is the compact choice).
    slots: Box<[Record]>,
}

impl Replica {
    fn knows(&self, epoch: u64, version: u64) -> bool {
        epoch < self.epoch
            || (epoch == self.epoch
                && (version <= self.watermark || self.above.as_ref().is_some_and(|a| a.contains(&version))))
    }

    fn advance(&mut self) {
        let Some(above) = self.above.as_mut() else { return };
        // At the last version there is, nothing lies above (a member may vouch for it).
        while let Some(next) = self.watermark.checked_add(1)
            && above.remove(&next)
        {
            self.watermark = next;
        }
        while above.first().is_some_and(|v| *v <= self.watermark) {
            above.pop_first();
        }
        if above.is_empty() {
            self.above = None;
        }
    }

    fn set_slot(&mut self, record: Record) {
        match self.slots.binary_search_by_key(&record.slot(), Record::slot) {
            Ok(i) if self.slots[i].version >= record.version => {}
            Ok(i) => self.slots[i] = record,
            Err(i) => {
                let mut slots = std::mem::take(&mut self.slots).into_vec();
                slots.insert(i, record);
                self.slots = slots.into_boxed_slice();
            }
        }
    }
}

/// One host's view of every endpoint table.
#[derive(Debug)]
pub struct EndpointTables {
    me: NodeId,
    replicas: VecMap<Arc<Replica>>,
}

impl EndpointTables {
    /// Tables of host `me`, whose own table starts `epoch` (empty).
    pub fn new(me: NodeId) -> EndpointTables {
        EndpointTables { me, replicas: VecMap::new() }
    }

    /// Makes room for replicas of `owners` hosts in all, at once (a directory's worth).
    pub fn reserve(&mut self, owners: usize) {
        self.replicas.reserve(owners.saturating_sub(self.replicas.len()));
    }

    /// This host.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Whether a record at this place of `owner`'s history is already known (or void):
    /// checked before paying for a signature check.
    pub fn knows(&self, owner: NodeId, epoch: u64, version: u64) -> bool {
        self.replicas.get(owner).is_some_and(|r| r.knows(epoch, version))
    }

    /// Applies a record whose signature was verified. A record of a newer epoch voids the
    /// replica first.
    pub fn apply(&mut self, record: Record) -> Applied {
        let shared = self.replicas.get_or_insert_with(record.owner, Arc::default);
        if shared.knows(record.epoch, record.version) {
            return Applied::Stale;
        }
        let r = Arc::make_mut(shared);
        if record.epoch > r.epoch {
            *r = Replica { epoch: record.epoch, ..Replica::default() };
        }
        // In order (the common case): no detour through `above`.
        if r.watermark.checked_add(1) == Some(record.version) && r.above.is_none() {
            r.watermark = record.version;
        } else {
            r.above.get_or_insert_default().insert(record.version);
        }
        r.set_slot(record);
        r.advance();
        Applied::New
    }

    /// `owner`'s replica, shared: for [`EndpointTables::adopt`] on another host.
    pub fn replica(&self, owner: NodeId) -> Option<Arc<Replica>> {
        self.replicas.get(owner).cloned()
    }

    /// Takes `replica` (another host's, shared until either changes it) as `owner`'s, if this
    /// host holds none yet and `owner` is not this host: the same as applying its records.
    pub fn adopt(&mut self, owner: NodeId, replica: Arc<Replica>) -> Applied {
        if owner == self.me || self.replicas.contains_key(owner) {
            return Applied::Stale;
        }
        self.replicas.insert(owner, replica);
        Applied::New
    }

    /// Anti-entropy vouched that `owner`'s history in `epoch` over `(from, upto]` is all
    /// applied (the records of that range were sent). Returns whether the watermark moved.
    pub fn complete(&mut self, owner: NodeId, epoch: u64, from: u64, upto: u64) -> bool {
        let Some(shared) = self.replicas.get_mut(owner) else { return false };
        if shared.epoch != epoch || shared.watermark < from || shared.watermark >= upto {
            return false;
        }
        let r = Arc::make_mut(shared);
        r.watermark = upto;
        r.advance();
        true
    }

    /// Where `owner`'s replica stands.
    pub fn position(&self, owner: NodeId) -> Option<Position> {
        self.replicas.get(owner).map(|r| Position { epoch: r.epoch, watermark: r.watermark })
    }

    /// Every replica's position (this host's own table included).
    pub fn positions(&self) -> impl Iterator<Item = (NodeId, Position)> + '_ {
        self.replicas.iter().map(|(o, r)| (o, Position { epoch: r.epoch, watermark: r.watermark }))
    }

    /// The records of `owner`'s `epoch` with versions above `from`, oldest first, and the
    /// replica's watermark (up to which they are complete). `None` if the replica is not in
    /// that epoch.
    pub fn since(&self, owner: NodeId, epoch: u64, from: u64) -> Option<(Vec<&Record>, u64)> {
        let r = self.replicas.get(owner).filter(|r| r.epoch == epoch)?;
        let mut out: Vec<&Record> = r.slots.iter().filter(|rec| rec.version > from).collect();
        out.sort_unstable_by_key(|rec| rec.version);
        Some((out, r.watermark))
    }

    /// The live endpoints of `owner`'s table.
    pub fn endpoints(&self, owner: NodeId) -> impl Iterator<Item = (&EndpointKey, &Endpoint)> + '_ {
        self.replicas.get(owner).into_iter().flat_map(|r| {
            r.slots.iter().filter_map(|rec| match &rec.change {
                Change::Put(k, e) => Some((k, e)),
                _ => None,
            })
        })
    }

    /// The owners this host holds a table of.
    pub fn owners(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.keys()
    }

    /// Drops `owner`'s replica (it left the cluster). Returns whether there was one.
    pub fn forget(&mut self, owner: NodeId) -> bool {
        self.replicas.remove(owner).is_some()
    }

    /// The order-independent fingerprint of the positions in each of `buckets` buckets.
    pub fn bucket_hashes(&self, buckets: u16) -> Vec<u64> {
        let mut h = vec![0u64; usize::from(buckets.max(1))];
        for (owner, pos) in self.positions() {
            h[bucket(owner, buckets)] = h[bucket(owner, buckets)].wrapping_add(fingerprint(owner, pos));
        }
        h
    }
}

/// The bucket of `owner` among `buckets`.
pub fn bucket(owner: NodeId, buckets: u16) -> usize {
    (mix(owner ^ 0x9e37_79b9_7f4a_7c15) % u64::from(buckets.max(1))) as usize
}

fn fingerprint(owner: NodeId, pos: Position) -> u64 {
    mix(mix(mix(owner) ^ pos.epoch) ^ pos.watermark)
}

/// SplitMix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::record::Signer;
    use std::net::Ipv4Addr;

    fn key(n: u8) -> EndpointKey {
        EndpointKey { vni: 4096, ip: Ipv4Addr::new(10, 128, 0, n) }
    }

    fn put(s: &Signer, epoch: u64, v: u64, n: u8) -> Record {
        Record::sign(
            s,
            1,
            epoch,
            v,
            Change::Put(
                key(n),
                Endpoint {
                    mac: [2, 0x4f, 10, 128, 0, n],
                    name: format!("c{n}"),
                    aliases: Vec::new(),
                    service: None,
                    health: Default::default(),
                },
            ),
        )
    }

    #[test]
    fn out_of_order_records_apply_at_once_and_the_watermark_waits_for_the_gap() {
        let s = Signer::generate();
        let mut t = EndpointTables::new(9);
        assert_eq!(t.apply(Record::sign(&s, 1, 5, 1, Change::Epoch)), Applied::New);
        assert_eq!(t.apply(put(&s, 5, 3, 2)), Applied::New);
        assert_eq!(t.position(1), Some(Position { epoch: 5, watermark: 1 }));
        assert_eq!(t.endpoints(1).count(), 1);
        assert_eq!(t.apply(put(&s, 5, 2, 1)), Applied::New);
        assert_eq!(t.position(1), Some(Position { epoch: 5, watermark: 3 }));
        assert_eq!(t.apply(put(&s, 5, 2, 1)), Applied::Stale);
        assert!(t.knows(1, 5, 3) && !t.knows(1, 5, 4) && t.knows(1, 4, 100));
        // A tombstone replaces the entry; an older put of the same slot arriving late does not undo it.
        assert_eq!(t.apply(Record::sign(&s, 1, 5, 5, Change::Delete(key(1)))), Applied::New);
        assert_eq!(t.apply(put(&s, 5, 4, 1)), Applied::New);
        let names: Vec<_> = t.endpoints(1).map(|(_, e)| e.name.clone()).collect();
        assert_eq!(names, ["c2"]);
        assert_eq!(t.position(1).unwrap().watermark, 5);
    }

    /// Found by the `gossip_records` fuzz target: a completion up to the last version there is
    /// (any member can send `Records { upto: u64::MAX }`), or a record of the last version in
    /// order, overflowed the watermark's `+ 1`: a panic wherever overflow checks are on.
    #[test]
    fn the_watermark_reaches_the_last_version_without_overflowing() {
        let s = Signer::generate();
        let mut t = EndpointTables::new(9);
        t.apply(Record::sign(&s, 1, 5, 1, Change::Epoch));
        t.apply(put(&s, 5, 3, 2));
        assert!(t.complete(1, 5, 1, u64::MAX));
        assert_eq!(t.position(1), Some(Position { epoch: 5, watermark: u64::MAX }));
        assert_eq!(t.apply(put(&s, 5, u64::MAX, 3)), Applied::Stale);

        let mut t = EndpointTables::new(9);
        t.apply(Record::sign(&s, 1, 5, 1, Change::Epoch));
        assert!(t.complete(1, 5, 1, u64::MAX - 1));
        assert_eq!(t.apply(put(&s, 5, u64::MAX, 3)), Applied::New);
        assert_eq!(t.position(1), Some(Position { epoch: 5, watermark: u64::MAX }));
    }

    #[test]
    fn an_adopted_replica_is_shared_until_either_host_changes_it() {
        let s = Signer::generate();
        let mut owner = EndpointTables::new(1);
        owner.apply(Record::sign(&s, 1, 5, 1, Change::Epoch));
        owner.apply(put(&s, 5, 2, 1));
        let mut other = EndpointTables::new(9);
        assert_eq!(other.adopt(1, owner.replica(1).unwrap()), Applied::New);
        assert!(Arc::ptr_eq(&owner.replica(1).unwrap(), &other.replica(1).unwrap()));
        assert_eq!(other.adopt(1, Arc::default()), Applied::Stale, "it holds one already");
        assert_eq!(owner.adopt(1, Arc::default()), Applied::Stale, "its own table");
        assert_eq!(other.position(1), Some(Position { epoch: 5, watermark: 2 }));
        // The owner changes its table: the other host's replica stays as it was until the
        // record reaches it.
        owner.apply(put(&s, 5, 3, 2));
        assert_eq!((other.position(1).unwrap().watermark, other.endpoints(1).count()), (2, 1));
        assert_eq!(other.apply(put(&s, 5, 3, 2)), Applied::New);
        assert_eq!(other.position(1), owner.position(1));
        assert_eq!(other.endpoints(1).count(), 2);
        assert!(!Arc::ptr_eq(&owner.replica(1).unwrap(), &other.replica(1).unwrap()));
    }

    #[test]
    fn a_newer_epoch_voids_the_old_table_and_an_older_one_is_ignored() {
        let s = Signer::generate();
        let mut t = EndpointTables::new(9);
        t.apply(Record::sign(&s, 1, 5, 1, Change::Epoch));
        t.apply(put(&s, 5, 2, 1));
        assert_eq!(t.apply(Record::sign(&s, 1, 6, 1, Change::Epoch)), Applied::New);
        assert_eq!(t.endpoints(1).count(), 0);
        assert_eq!(t.apply(put(&s, 5, 3, 2)), Applied::Stale);
        assert_eq!(t.position(1), Some(Position { epoch: 6, watermark: 1 }));
    }

    #[test]
    fn anti_entropy_completion_moves_the_watermark_only_from_where_it_is() {
        let s = Signer::generate();
        let mut t = EndpointTables::new(9);
        t.apply(Record::sign(&s, 1, 5, 1, Change::Epoch));
        t.apply(put(&s, 5, 4, 3));
        assert!(!t.complete(1, 5, 2, 6), "a range that starts above the watermark leaves a gap");
        assert!(!t.complete(1, 4, 0, 6), "another epoch");
        assert!(t.complete(1, 5, 1, 6));
        assert_eq!(t.position(1).unwrap().watermark, 6);
        let (recs, wm) = t.since(1, 5, 1).unwrap();
        assert_eq!((recs.iter().map(|r| r.version).collect::<Vec<_>>(), wm), (vec![4], 6));
        assert!(t.since(1, 4, 0).is_none());
    }

    #[test]
    fn bucket_hashes_differ_exactly_where_positions_do() {
        let s = Signer::generate();
        let mut a = EndpointTables::new(9);
        let mut b = EndpointTables::new(9);
        for owner in 1..=40u64 {
            let r = Record::sign(&s, owner, 1, 1, Change::Epoch);
            a.apply(r.clone());
            b.apply(r);
        }
        assert_eq!(a.bucket_hashes(4), b.bucket_hashes(4));
        a.apply(Record::sign(&s, 17, 1, 2, Change::Delete(key(1))));
        let (ha, hb) = (a.bucket_hashes(4), b.bucket_hashes(4));
        let differ: Vec<usize> = (0..4).filter(|i| ha[*i] != hb[*i]).collect();
        assert_eq!(differ, [bucket(17, 4)]);
    }
}
