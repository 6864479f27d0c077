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

use std::collections::{BTreeSet, HashMap};

use super::record::{Change, Endpoint, EndpointKey, Record};
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

#[derive(Debug, Default)]
struct Replica {
    epoch: u64,
    watermark: u64,
    above: BTreeSet<u64>,
    /// Sorted by slot (a table is small: a Vec is the compact choice for thousands of them).
    slots: Vec<Record>,
}

impl Replica {
    fn knows(&self, epoch: u64, version: u64) -> bool {
        epoch < self.epoch || (epoch == self.epoch && (version <= self.watermark || self.above.contains(&version)))
    }

    fn advance(&mut self) {
        // At the last version there is, nothing lies above (a member may vouch for it).
        while let Some(next) = self.watermark.checked_add(1)
            && self.above.remove(&next)
        {
            self.watermark = next;
        }
        while self.above.first().is_some_and(|v| *v <= self.watermark) {
            self.above.pop_first();
        }
    }
}

/// One host's view of every endpoint table.
#[derive(Debug)]
pub struct EndpointTables {
    me: NodeId,
    replicas: HashMap<NodeId, Replica>,
}

impl EndpointTables {
    /// Tables of host `me`, whose own table starts `epoch` (empty).
    pub fn new(me: NodeId) -> EndpointTables {
        EndpointTables { me, replicas: HashMap::new() }
    }

    /// This host.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Whether a record at this place of `owner`'s history is already known (or void):
    /// checked before paying for a signature check.
    pub fn knows(&self, owner: NodeId, epoch: u64, version: u64) -> bool {
        self.replicas.get(&owner).is_some_and(|r| r.knows(epoch, version))
    }

    /// Applies a record whose signature was verified. A record of a newer epoch voids the
    /// replica first.
    pub fn apply(&mut self, record: Record) -> Applied {
        let r = self.replicas.entry(record.owner).or_default();
        if r.knows(record.epoch, record.version) {
            return Applied::Stale;
        }
        if record.epoch > r.epoch {
            *r = Replica { epoch: record.epoch, ..Replica::default() };
        }
        // In order (the common case): no detour through `above`, which would leave an empty
        // tree node behind in every replica.
        if r.watermark.checked_add(1) == Some(record.version) && r.above.is_empty() {
            r.watermark = record.version;
        } else {
            r.above.insert(record.version);
        }
        match r.slots.binary_search_by_key(&record.slot(), Record::slot) {
            Ok(i) if r.slots[i].version >= record.version => {}
            Ok(i) => r.slots[i] = record,
            Err(i) => r.slots.insert(i, record),
        }
        r.advance();
        Applied::New
    }

    /// Anti-entropy vouched that `owner`'s history in `epoch` over `(from, upto]` is all
    /// applied (the records of that range were sent). Returns whether the watermark moved.
    pub fn complete(&mut self, owner: NodeId, epoch: u64, from: u64, upto: u64) -> bool {
        let Some(r) = self.replicas.get_mut(&owner) else { return false };
        if r.epoch != epoch || r.watermark < from || r.watermark >= upto {
            return false;
        }
        r.watermark = upto;
        r.advance();
        true
    }

    /// Where `owner`'s replica stands.
    pub fn position(&self, owner: NodeId) -> Option<Position> {
        self.replicas.get(&owner).map(|r| Position { epoch: r.epoch, watermark: r.watermark })
    }

    /// Every replica's position (this host's own table included).
    pub fn positions(&self) -> impl Iterator<Item = (NodeId, Position)> + '_ {
        self.replicas.iter().map(|(o, r)| (*o, Position { epoch: r.epoch, watermark: r.watermark }))
    }

    /// The records of `owner`'s `epoch` with versions above `from`, oldest first, and the
    /// replica's watermark (up to which they are complete). `None` if the replica is not in
    /// that epoch.
    pub fn since(&self, owner: NodeId, epoch: u64, from: u64) -> Option<(Vec<&Record>, u64)> {
        let r = self.replicas.get(&owner).filter(|r| r.epoch == epoch)?;
        let mut out: Vec<&Record> = r.slots.iter().filter(|rec| rec.version > from).collect();
        out.sort_unstable_by_key(|rec| rec.version);
        Some((out, r.watermark))
    }

    /// The live endpoints of `owner`'s table.
    pub fn endpoints(&self, owner: NodeId) -> impl Iterator<Item = (&EndpointKey, &Endpoint)> + '_ {
        self.replicas.get(&owner).into_iter().flat_map(|r| {
            r.slots.iter().filter_map(|rec| match &rec.change {
                Change::Put(k, e) => Some((k, e)),
                _ => None,
            })
        })
    }

    /// The owners this host holds a table of.
    pub fn owners(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.keys().copied()
    }

    /// Drops `owner`'s replica (it left the cluster). Returns whether there was one.
    pub fn forget(&mut self, owner: NodeId) -> bool {
        self.replicas.remove(&owner).is_some()
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
