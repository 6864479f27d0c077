//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4): the lookup table that maps a connection's hash slot to a
//! service replica, so that a change of the replica set moves as few flows as possible.
//!
//! What it is: [`table`], a pure function of a backend set and a table size, with no I/O, no
//! clock and no randomness, so every host computes the same table for the same set (the
//! backends are sorted first; their input order does not matter). [`super::lb`] writes it into
//! each client namespace as an nftables map from `jhash(client address, client port) mod size`
//! to a replica's address. What it is not: a health checker (it gets the healthy set) or a
//! per-packet lookup (the kernel looks the map up once per new connection; conntrack pins the
//! flow after that).
//!
//! Each backend gets a permutation of the slots from two hashes of its address (`offset`,
//! `skip`: slot *j* of backend *i*'s preference list is `(offset_i + j·skip_i) mod size`, a full
//! permutation because `size` is prime); backends take turns claiming their next preferred free
//! slot until the table is full. So each backend owns ⌊size/n⌋ or ⌈size/n⌉ slots, and
//! removing one backend frees its own slots and disturbs only a few others (the paper's
//! Fig. 12; the tests below measure it).
//!
//! The hashes are FNV-1a (64-bit) over a one-byte tag (0 for the offset, 1 for the skip) and
//! the address's four octets, followed by MurmurHash3's 64-bit finaliser (`fmix64`), because
//! FNV-1a alone spreads addresses that differ only in their last octet poorly. Both are fixed
//! here, not taken from `std` (whose `DefaultHasher` may change between Rust releases), so
//! hosts running different builds still agree.

use std::net::Ipv4Addr;

/// The table size overlayd uses: a prime (Maglev needs one), chosen for evenness and memory.
///
/// - Evenness: two replicas' shares differ by at most one slot, 0.1 % of the new connections
///   (257 slots: 0.4 %, which with 10 replicas is 25 against 26 slots, 4 % apart).
/// - Memory: it is the size of each service's nftables map in each client namespace: 1,021
///   elements of some 100 bytes of kernel memory each (measured: 4.9 MB more slab for 50 such
///   maps), 100 KB per service per container (the paper's 65,537 would be 6.4 MB), and a
///   16 KB `nft` script.
/// - Disruption matters less here than in Maglev's own setting: conntrack pins every open
///   flow to its replica, so a moved slot only redirects *new* connections (and flows the
///   kernel forgot). Measured when one of 2 to 16 replicas goes (the test
///   `one_backend_less_moves_few_other_slots`): up to 3.6 % of the other slots move on
///   average, 4.7 % at worst; 257 slots: up to 10 %; 4,093: up to 1.8 %.
pub const DEFAULT_SIZE: usize = 1021;

/// The Maglev lookup table of `backends` with `size` slots: for each slot, the index in
/// `backends` of the backend it maps to. Empty when `backends` is.
///
/// `size` must be a prime greater than 1 (else a backend's preference list is not a
/// permutation and the fill would not end; this panics instead). The result depends only on
/// the *set* of addresses: the same set in any order gives the same backend per slot; a
/// duplicate address maps to its first index. With more distinct backends than slots, only
/// `size` of them get a slot.
pub fn table(backends: &[Ipv4Addr], size: usize) -> Vec<u16> {
    assert!(is_prime(size), "a Maglev table size must be prime, not {size}");
    // Distinct addresses in address order, each with its first index in the caller's slice.
    let mut sorted: Vec<(Ipv4Addr, usize)> = backends.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    sorted.sort();
    sorted.dedup_by_key(|(a, _)| *a);
    assert!(backends.len() <= usize::from(u16::MAX), "too many backends for a u16 index");
    if sorted.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let prefs: Vec<(u64, u64)> = sorted.iter().map(|(a, _)| (hash(0, *a) % m, hash(1, *a) % (m - 1) + 1)).collect();
    let mut next = vec![0u64; sorted.len()];
    let mut slots: Vec<Option<u16>> = vec![None; size];
    let mut filled = 0;
    // Each pass of the outer loop fills one slot per backend; each backend's inner walk is
    // bounded by `size` since its preference list is a permutation and a free slot remains.
    'fill: loop {
        for (i, &(offset, skip)) in prefs.iter().enumerate() {
            let mut slot;
            loop {
                slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if slots[slot].is_none() {
                    break;
                }
            }
            slots[slot] = Some(sorted[i].1 as u16);
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    slots.into_iter().map(|s| s.expect("every slot is filled")).collect()
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// FNV-1a 64 over `tag` and the address's octets, then MurmurHash3's `fmix64`.
fn hash(tag: u8, addr: Ipv4Addr) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in std::iter::once(tag).chain(addr.octets()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<Ipv4Addr> {
        (0..n).map(|i| Ipv4Addr::new(10, 1, (i >> 8) as u8, (i & 0xff) as u8 + 2)).collect()
    }

    /// The table as addresses (indices depend on the input order, addresses do not).
    fn resolved(backends: &[Ipv4Addr], size: usize) -> Vec<Ipv4Addr> {
        table(backends, size).into_iter().map(|i| backends[usize::from(i)]).collect()
    }

    #[test]
    fn empty_backends_give_an_empty_table() {
        assert!(table(&[], DEFAULT_SIZE).is_empty());
    }

    #[test]
    fn one_backend_owns_every_slot() {
        assert_eq!(table(&[Ipv4Addr::new(10, 0, 0, 9)], 257), vec![0; 257]);
    }

    #[test]
    fn every_backend_gets_its_share_within_one_slot() {
        for size in [257, DEFAULT_SIZE] {
            for n in 1..=20 {
                let t = table(&addrs(n), size);
                assert_eq!(t.len(), size);
                let mut counts = vec![0usize; n];
                for i in t {
                    counts[usize::from(i)] += 1;
                }
                // Backends claim slots in turns, so no two differ by more than one slot.
                let (lo, hi) = (size / n, size.div_ceil(n));
                assert!(counts.iter().all(|c| (lo..=hi).contains(c)), "size {size}, {n} backends: {counts:?}");
            }
        }
    }

    #[test]
    fn input_order_and_duplicates_do_not_matter() {
        let b = addrs(7);
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        assert_eq!(resolved(&b, DEFAULT_SIZE), resolved(&shuffled, DEFAULT_SIZE));
        let mut dup = b.clone();
        dup.push(b[3]);
        assert_eq!(resolved(&b, DEFAULT_SIZE), resolved(&dup, DEFAULT_SIZE));
        assert!(
            table(&dup, DEFAULT_SIZE).iter().all(|&i| usize::from(i) < b.len()),
            "a duplicate maps to its first index"
        );
    }

    /// A fixed table for a fixed set: what another host (or another build) must compute too.
    #[test]
    fn the_table_is_fixed_for_a_fixed_set() {
        let b = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)];
        let t = table(&b, 7);
        assert_eq!(t.len(), 7);
        // A change here breaks agreement between hosts running different versions during an
        // upgrade.
        assert_eq!(t, FIXED_7);
        assert_eq!(hash(0, b[0]), FIXED_HASH);
    }
    // Computed by an independent Python transcription of this module when it was written.
    const FIXED_7: [u16; 7] = [0, 2, 2, 1, 0, 1, 0];
    const FIXED_HASH: u64 = 0x0f15_03be_4cbc_ebd9;

    /// Slots that moved between two tables, not counting those of `removed` (which must move).
    fn moved_others(before: &[Ipv4Addr], after: &[Ipv4Addr], removed: Option<Ipv4Addr>) -> usize {
        before.iter().zip(after).filter(|(b, a)| Some(**b) != removed && b != a).count()
    }

    /// Removing one backend moves that backend's own slots (1/n of the table) and only a small
    /// fraction of the others; adding it back restores the table exactly. Measured over every
    /// backend of sets of 2 to 16 (see [`DEFAULT_SIZE`] for the figures): the bounds are the
    /// measured worst cases rounded up, and the computation has no randomness.
    #[test]
    fn one_backend_less_moves_few_other_slots() {
        for (size, worst_bound, mean_bound) in [(257, 0.11, 0.07), (DEFAULT_SIZE, 0.05, 0.04)] {
            let (mut worst, mut sum, mut cases) = (0.0f64, 0.0, 0);
            for n in 2..=16 {
                let all = addrs(n);
                let before = resolved(&all, size);
                for gone in &all {
                    let rest: Vec<Ipv4Addr> = all.iter().copied().filter(|a| a != gone).collect();
                    let after = resolved(&rest, size);
                    assert!(after.iter().all(|a| a != gone));
                    let own = before.iter().filter(|a| *a == gone).count();
                    let others = moved_others(&before, &after, Some(*gone));
                    let frac = others as f64 / (size - own) as f64;
                    assert!(
                        frac < worst_bound,
                        "size {size}, {n} backends, {gone} gone: {others} other slots moved ({frac:.3})"
                    );
                    let total = (own + others) as f64 / size as f64;
                    assert!(
                        total < 1.0 / n as f64 + worst_bound,
                        "size {size}, {n} backends: {total:.3} of the table moved"
                    );
                    worst = worst.max(frac);
                    sum += frac;
                    cases += 1;
                    assert_eq!(resolved(&all, size), before);
                }
            }
            let mean = sum / f64::from(cases);
            println!(
                "size {size}: other slots moved when one of 2..=16 backends goes: mean {mean:.4}, worst {worst:.4}"
            );
            assert!(mean < mean_bound, "size {size}: mean {mean:.4}");
        }
    }

    #[test]
    #[should_panic(expected = "must be prime")]
    fn a_size_that_is_not_prime_is_refused() {
        table(&addrs(2), 1000);
    }

    #[test]
    fn hashes_are_spread() {
        // Consecutive addresses get unrelated offsets (FNV-1a alone would not).
        let offs: std::collections::BTreeSet<u64> = addrs(50).iter().map(|a| hash(0, *a) % 1021).collect();
        assert!(offs.len() > 45, "{} distinct offsets of 50", offs.len());
    }
}
