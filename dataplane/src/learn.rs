//! Data-plane learning, the fallback for MACs the control plane has not told us about:
//! a frame from a member VTEP teaches "inner source MAC lives behind the outer source
//! address", and an entry not refreshed for the ageing time (300 s, as Linux's vxlan) goes.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::{ArcSwap, Cache};

use crate::counters::{Counters, bump};
use crate::tables::FastMap;
use crate::wire::{MacAddr, Vni};

/// Linux vxlan's default FDB ageing time (`FDB_AGE_DEFAULT`), in seconds.
pub const DEFAULT_AGEING_SECS: u64 = 300;

/// Default bound on learned entries, so that a flood of made-up MACs cannot grow memory.
pub const DEFAULT_MAX_ENTRIES: usize = 65_536;

/// How many new entries one batch can queue before the rest wait for the next packet.
const PENDING_CAPACITY: usize = 256;

/// How often expired entries are looked for, in seconds.
const SWEEP_INTERVAL_SECS: u64 = 1;

/// One learned location.
#[derive(Debug)]
pub struct Learned {
    /// The VTEP the MAC was last seen behind.
    pub vtep: IpAddr,
    /// When it was last seen (seconds on the dataplane's clock).
    pub last_seen: AtomicU64,
}

impl Clone for Learned {
    fn clone(&self) -> Self {
        Learned { vtep: self.vtep, last_seen: AtomicU64::new(self.last_seen.load(Relaxed)) }
    }
}

/// A published snapshot of the learned FDB.
#[derive(Debug, Clone, Default)]
pub struct LearnedFdb {
    entries: FastMap<(Vni, MacAddr), Learned>,
}

impl LearnedFdb {
    /// Where `mac` was learned in network `vni`.
    #[inline]
    pub fn lookup(&self, vni: Vni, mac: MacAddr) -> Option<IpAddr> {
        self.entries.get(&(vni, mac)).map(|l| l.vtep)
    }

    /// Every entry: (VNI, MAC, VTEP, last seen).
    pub fn entries(&self) -> impl Iterator<Item = (Vni, MacAddr, IpAddr, u64)> + '_ {
        self.entries.iter().map(|((v, m), l)| (*v, *m, l.vtep, l.last_seen.load(Relaxed)))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The published learned FDB, shared by the learner (writer) and its readers.
pub type SharedLearned = Arc<ArcSwap<LearnedFdb>>;

/// A reader's cached handle on the learned FDB.
pub type LearnedReader = Cache<SharedLearned, Arc<LearnedFdb>>;

/// A new shared learned FDB.
pub fn shared_learned() -> SharedLearned {
    Arc::new(ArcSwap::from_pointee(LearnedFdb::default()))
}

/// The writer side, owned by the RX loop, the only writer.
///
/// Refreshing a known entry stores a timestamp in place (an atomic in the published snapshot,
/// so no copy and no allocation); a new or moved MAC is queued and published with the rest of
/// its batch as a new snapshot, which the TX loop reads lock-free like the other tables.
#[derive(Debug)]
pub struct Learner {
    shared: SharedLearned,
    current: Arc<LearnedFdb>,
    pending: Vec<(Vni, MacAddr, IpAddr)>,
    max_entries: usize,
    ageing_secs: u64,
    next_sweep: u64,
}

impl Learner {
    /// A learner publishing into `shared`.
    pub fn new(shared: SharedLearned, max_entries: usize, ageing_secs: u64) -> Self {
        let current = shared.load_full();
        Learner {
            shared,
            current,
            pending: Vec::with_capacity(PENDING_CAPACITY),
            max_entries,
            ageing_secs,
            next_sweep: 0,
        }
    }

    /// Notes that `mac` of network `vni` was just seen behind `vtep`. Never allocates.
    #[inline]
    pub fn observe(&mut self, vni: Vni, mac: MacAddr, vtep: IpAddr, now: u64) {
        if let Some(e) = self.current.entries.get(&(vni, mac))
            && e.vtep == vtep
        {
            e.last_seen.store(now, Relaxed);
            return;
        }
        let queued = self.pending.iter().position(|(v, m, _)| *v == vni && *m == mac);
        match queued {
            Some(i) => self.pending[i].2 = vtep,
            None if self.pending.len() < PENDING_CAPACITY => self.pending.push((vni, mac, vtep)),
            None => {} // learned from a later frame of the same MAC
        }
    }

    /// Publishes what the batch learned and, at most once a second, removes expired entries.
    /// Allocates only when something changed.
    pub fn end_batch(&mut self, now: u64, counters: &Counters) {
        let sweep = now >= self.next_sweep;
        let expired = sweep && self.current.entries.values().any(|e| self.expired(e, now));
        if self.pending.is_empty() && !expired {
            if sweep {
                self.next_sweep = now + SWEEP_INTERVAL_SECS;
            }
            return;
        }
        let mut next = LearnedFdb::clone(&self.current);
        if expired {
            let before = next.entries.len();
            next.entries.retain(|_, e| !self.expired(e, now));
            bump(&counters.rx.aged_out, (before - next.entries.len()) as u64);
            self.next_sweep = now + SWEEP_INTERVAL_SECS;
        }
        for (vni, mac, vtep) in self.pending.drain(..) {
            let key = (vni, mac);
            if next.entries.len() >= self.max_entries && !next.entries.contains_key(&key) {
                bump(&counters.rx.learn_table_full, 1);
                continue;
            }
            next.entries.insert(key, Learned { vtep, last_seen: AtomicU64::new(now) });
            bump(&counters.rx.learned, 1);
        }
        let next = Arc::new(next);
        self.shared.store(Arc::clone(&next));
        self.current = next;
    }

    fn expired(&self, e: &Learned, now: u64) -> bool {
        now.saturating_sub(e.last_seen.load(Relaxed)) >= self.ageing_secs
    }

    /// Forgets every entry of a network (when it is removed).
    pub fn forget_network(&mut self, vni: Vni) {
        let mut next = LearnedFdb::clone(&self.current);
        next.entries.retain(|(v, _), _| *v != vni);
        let next = Arc::new(next);
        self.shared.store(Arc::clone(&next));
        self.current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn learns_moves_and_ages_out() {
        let shared = shared_learned();
        let mut reader = Cache::new(Arc::clone(&shared));
        let c = Counters::default();
        let mut l = Learner::new(Arc::clone(&shared), 10, 300);
        let v = Vni::new(7).unwrap();
        l.observe(v, mac(1), A, 0);
        assert_eq!(reader.load().lookup(v, mac(1)), None, "not before the batch ends");
        l.end_batch(0, &c);
        assert_eq!(reader.load().lookup(v, mac(1)), Some(A));

        // Refreshing in place publishes nothing new.
        let before = Arc::as_ptr(reader.load());
        l.observe(v, mac(1), A, 200);
        l.end_batch(200, &c);
        assert_eq!(Arc::as_ptr(reader.load()), before);

        // Still there at 499 (seen at 200), gone at 500.
        l.end_batch(499, &c);
        assert_eq!(reader.load().lookup(v, mac(1)), Some(A));
        l.end_batch(500, &c);
        assert_eq!(reader.load().lookup(v, mac(1)), None);
        assert_eq!(c.rx.aged_out.load(Relaxed), 1);

        // A move replaces the VTEP.
        l.observe(v, mac(2), A, 600);
        l.end_batch(600, &c);
        l.observe(v, mac(2), B, 601);
        l.end_batch(601, &c);
        assert_eq!(reader.load().lookup(v, mac(2)), Some(B));
        assert_eq!(c.rx.learned.load(Relaxed), 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let shared = shared_learned();
        let c = Counters::default();
        let mut l = Learner::new(Arc::clone(&shared), 4, 300);
        let v = Vni::new(7).unwrap();
        for n in 0..10 {
            l.observe(v, mac(n), A, 0);
        }
        l.end_batch(0, &c);
        assert_eq!(shared.load().len(), 4);
        assert_eq!(c.rx.learn_table_full.load(Relaxed), 6);
    }
}
