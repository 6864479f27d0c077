//! Each gossip datagram is taken once: per sender, the newest generation heard and a sliding
//! window over the counters of that generation's datagrams (the anti-replay window of IPsec
//! and WireGuard, RFC 6479). A datagram of an older generation, one seen before, or one too
//! far behind the newest to tell, is refused; one of a newer generation starts a new window.
//!
//! Only datagrams that authenticated under the cluster key, and were sealed for this host,
//! get here (see [`super::seal`]), so strangers cannot fill it; the gossip node also refuses
//! senders outside the directory before they get here (see [`super::node`]). Memory is still
//! bounded: one window per host of the directory that has sent to this one, and at most
//! [`MAX_STRANGERS`] for senders outside the directory — hosts that left it, whose windows are
//! kept in case they are listed again, or a key holder making up node ids — the least
//! recently heard evicted first.
//!
//! A sender's counter counts what it sends to every host, so of the counters in one window a
//! receiver of a large cluster sees a few: a window holds up to [`FEW`] of them as offsets in
//! 8 bytes (48 per sender in all), and turns into the full bitmap (128 bytes more) when it
//! holds more, until its sender jumps a whole window ahead.
//!
//! Windows live in memory: after this host restarts, each datagram captured before, of its
//! sender's current generation, can be taken once more (the first one sets the window).

use super::vecmap::VecMap;
use crate::state::NodeId;

/// Width of the window: a datagram up to this many counters behind the newest of its sender
/// is still accepted once (reordering); further behind, it is refused.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;
/// Most counters below the newest a window holds as offsets before it becomes a bitmap.
pub const FEW: usize = 4;
/// Most senders outside the directory a window is kept for.
pub const MAX_STRANGERS: usize = 64;

/// Why an authenticated datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Taken before (a replay), or more than [`WINDOW`] counters behind the newest of its
    /// sender's generation (too old to tell).
    #[error("already received, or too old to tell")]
    Replayed,
    /// Of an older generation of its sender than one already heard from (sent before the
    /// sender restarted, or replayed since).
    #[error("from an earlier life of its sender")]
    StaleGeneration,
}

/// Which of the last [`WINDOW`] counters up to `top` were taken (`top` always is).
#[derive(Debug, Clone)]
struct Window {
    top: u64,
    taken: Taken,
}

/// The counters below `top` that were taken.
#[derive(Debug, Clone)]
enum Taken {
    /// Up to [`FEW`], each as its distance below `top` (1 to `WINDOW - 1`); 0 is a free place.
    Few([u16; FEW]),
    /// Any number: bit `c % WINDOW` for counter `c`, `top`'s included.
    Bits(Box<[u64; WORDS]>),
}

impl Window {
    fn new(counter: u64) -> Window {
        Window { top: counter, taken: Taken::Few([0; FEW]) }
    }

    fn take(&mut self, counter: u64) -> Result<(), Refused> {
        if counter > self.top {
            let ahead = counter - self.top;
            if ahead >= WINDOW {
                *self = Window::new(counter);
                return Ok(());
            }
            match &mut self.taken {
                Taken::Few(few) => {
                    // The old top and the offsets move down; what falls out of the window goes.
                    for d in few.iter_mut().filter(|d| **d != 0) {
                        *d = if u64::from(*d) + ahead < WINDOW { *d + ahead as u16 } else { 0 };
                    }
                    self.top = counter;
                    self.add_below(ahead as u16);
                }
                Taken::Bits(bits) => {
                    clear(bits, self.top + 1, counter);
                    set(bits, counter);
                    self.top = counter;
                }
            }
            return Ok(());
        }
        let below = self.top - counter;
        if below == 0 || below >= WINDOW {
            return Err(Refused::Replayed);
        }
        let taken = match &self.taken {
            Taken::Few(few) => few.contains(&(below as u16)),
            Taken::Bits(bits) => bits[word(counter)] & bit(counter) != 0,
        };
        if taken {
            return Err(Refused::Replayed);
        }
        self.add_below(below as u16);
        Ok(())
    }

    /// Marks the counter `below` under `top` (1 to `WINDOW - 1`, not marked yet) taken.
    fn add_below(&mut self, below: u16) {
        let counter = self.top - u64::from(below);
        match &mut self.taken {
            Taken::Few(few) => match few.iter_mut().find(|d| **d == 0) {
                Some(free) => *free = below,
                None => {
                    let mut bits = Box::new([0u64; WORDS]);
                    set(&mut bits, self.top);
                    for d in few.iter() {
                        set(&mut bits, self.top - u64::from(*d));
                    }
                    set(&mut bits, counter);
                    self.taken = Taken::Bits(bits);
                }
            },
            Taken::Bits(bits) => set(bits, counter),
        }
    }
}

fn set(bits: &mut [u64; WORDS], counter: u64) {
    bits[word(counter)] |= bit(counter);
}

/// Clears the bits of counters `from..=to` (fewer than [`WINDOW`]): they held counters a
/// window older, now behind it.
fn clear(bits: &mut [u64; WORDS], from: u64, to: u64) {
    let mut c = from;
    while c <= to {
        let n = (64 - c % 64).min(to - c + 1);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << (c % 64) };
        bits[word(c)] &= !mask;
        c += n;
    }
}

fn word(counter: u64) -> usize {
    (counter / 64) as usize % WORDS
}

fn bit(counter: u64) -> u64 {
    1 << (counter % 64)
}

/// One sender as heard: its newest generation and that generation's window.
#[derive(Debug, Clone)]
struct Sender {
    generation: u64,
    window: Window,
    /// When it was last heard (a tick of the guard), to evict the least recent stranger.
    heard: u64,
}

impl Sender {
    fn new(generation: u64, counter: u64, heard: u64) -> Sender {
        Sender { generation, window: Window::new(counter), heard }
    }

    fn take(&mut self, generation: u64, counter: u64, heard: u64) -> Result<(), Refused> {
        self.heard = heard;
        match generation.cmp(&self.generation) {
            std::cmp::Ordering::Less => Err(Refused::StaleGeneration),
            std::cmp::Ordering::Greater => {
                *self = Sender::new(generation, counter, heard);
                Ok(())
            }
            std::cmp::Ordering::Equal => self.window.take(counter),
        }
    }
}

/// The windows of every sender this host hears from.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    /// Senders of the directory.
    members: VecMap<Sender>,
    /// Senders outside it, at most [`MAX_STRANGERS`].
    strangers: Vec<(NodeId, Sender)>,
    tick: u64,
}

impl ReplayGuard {
    /// Takes an authenticated datagram's place in its sender's history: `Ok` the first time,
    /// refused after. `member`: whether the sender is in the directory.
    pub fn take(&mut self, sender: NodeId, generation: u64, counter: u64, member: bool) -> Result<(), Refused> {
        self.tick += 1;
        let tick = self.tick;
        if member {
            return match self.members.get_mut(sender) {
                Some(s) => s.take(generation, counter, tick),
                None => {
                    self.members.insert(sender, Sender::new(generation, counter, tick));
                    Ok(())
                }
            };
        }
        if let Some((_, s)) = self.strangers.iter_mut().find(|(n, _)| *n == sender) {
            return s.take(generation, counter, tick);
        }
        self.add_stranger(sender, Sender::new(generation, counter, tick));
        Ok(())
    }

    fn add_stranger(&mut self, node: NodeId, sender: Sender) {
        if self.strangers.len() == MAX_STRANGERS {
            let oldest = (0..self.strangers.len()).min_by_key(|i| self.strangers[*i].1.heard).expect("full");
            self.strangers.swap_remove(oldest);
        }
        self.strangers.push((node, sender));
    }

    /// The directory changed: senders that left it become strangers (the most recently heard
    /// kept), strangers that entered it members.
    pub fn set_directory(&mut self, member: impl Fn(NodeId) -> bool) {
        let (joined, strangers): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.strangers).into_iter().partition(|(n, _)| member(*n));
        for (n, s) in joined {
            self.members.insert(n, s);
        }
        let left: Vec<NodeId> = self.members.keys().filter(|n| !member(*n)).collect();
        let mut all: Vec<(NodeId, Sender)> = strangers;
        all.extend(left.into_iter().filter_map(|n| self.members.remove(n).map(|s| (n, s))));
        all.sort_by_key(|(_, s)| std::cmp::Reverse(s.heard));
        all.truncate(MAX_STRANGERS);
        self.strangers = all;
    }

    /// Senders a window is kept for.
    pub fn senders(&self) -> usize {
        self.members.len() + self.strangers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{TestCaseError, prop_assert_eq};

    const G: u64 = 1_700_000_000_000_000;

    /// A sender's window stays small while it holds few counters, becomes a bitmap past
    /// [`FEW`], and small again once its sender is a window ahead.
    #[test]
    fn a_window_holds_a_few_counters_in_place_and_more_in_a_bitmap() {
        assert_eq!(std::mem::size_of::<(NodeId, Sender)>(), 48);
        let few = |g: &ReplayGuard| matches!(g.members.get(1).unwrap().window.taken, Taken::Few(_));
        let mut g = ReplayGuard::default();
        for c in [100, 90, 95, 99, 60] {
            assert_eq!(g.take(1, G, c, true), Ok(()));
        }
        assert!(few(&g), "the newest and four below it");
        assert_eq!(g.take(1, G, 98, true), Ok(()));
        assert!(!few(&g), "a fifth below the newest");
        for c in [100, 99, 98, 95, 90, 60] {
            assert_eq!(g.take(1, G, c, true), Err(Refused::Replayed), "{c} again");
        }
        assert_eq!(g.take(1, G, 100 + WINDOW, true), Ok(()));
        assert!(few(&g));
        assert_eq!(g.take(1, G, 100 + WINDOW, true), Err(Refused::Replayed));
        assert_eq!(g.take(1, G, 101, true), Ok(()), "WINDOW - 1 behind, never seen");
        // Moving ahead by less than a window keeps what is still inside it.
        assert_eq!(g.take(1, G, 110 + WINDOW, true), Ok(()));
        assert_eq!(g.take(1, G, 101, true), Err(Refused::Replayed), "now a window behind");
        assert_eq!(g.take(1, G, 100 + WINDOW, true), Err(Refused::Replayed), "still in the window");
    }

    #[test]
    fn each_counter_is_taken_once_in_any_order_within_the_window() {
        let mut g = ReplayGuard::default();
        for c in [5, 6, 9, 7, 8, 0, 1] {
            assert_eq!(g.take(1, G, c, true), Ok(()), "counter {c}");
        }
        for c in [0, 1, 5, 6, 7, 8, 9] {
            assert_eq!(g.take(1, G, c, true), Err(Refused::Replayed), "counter {c} again");
        }
        assert_eq!(g.take(1, G, 2, true), Ok(()), "a hole is still open");
        assert_eq!(g.take(2, G, 9, true), Ok(()), "another sender has its own window");
    }

    #[test]
    fn a_counter_a_window_behind_the_newest_is_refused() {
        let mut g = ReplayGuard::default();
        assert_eq!(g.take(1, G, 10, true), Ok(()));
        assert_eq!(g.take(1, G, 10 + WINDOW - 1, true), Ok(()));
        assert_eq!(g.take(1, G, 11, true), Ok(()), "just inside: WINDOW - 2 behind");
        assert_eq!(g.take(1, G, 10, true), Err(Refused::Replayed), "seen");
        assert_eq!(g.take(1, G, 10 + WINDOW, true), Ok(()));
        assert_eq!(g.take(1, G, 10, true), Err(Refused::Replayed), "exactly WINDOW behind");
        assert_eq!(g.take(1, G, 12, true), Ok(()), "WINDOW - 2 behind, never seen");
    }

    /// Against a model that remembers every counter: taken once, unless a window behind.
    fn takes_what_a_model_with_perfect_memory_takes(steps: Vec<(u64, bool)>) -> Result<(), TestCaseError> {
        let mut g = ReplayGuard::default();
        let mut taken = std::collections::BTreeSet::new();
        let mut top = 0u64;
        for (n, forward) in steps {
            let c = if forward { top + n } else { top.saturating_sub(n) };
            let fresh = taken.is_empty() || c > top || (top - c < WINDOW && !taken.contains(&c));
            prop_assert_eq!(g.take(1, G, c, true).is_ok(), fresh, "counter {} with newest {}", c, top);
            if fresh {
                taken.insert(c);
                top = top.max(c);
            }
        }
        Ok(())
    }

    proptest::proptest! {
        /// Counters close together, as between two hosts that talk mostly to each other: the
        /// windows fill past their few offsets, into bitmaps, and back.
        #[test]
        fn a_crowded_window_takes_what_a_model_with_perfect_memory_takes(
            steps in proptest::collection::vec((0u64..(WINDOW / 8), proptest::bool::ANY), 1..600),
        ) {
            let steps = steps.into_iter().map(|(n, forward)| (if forward { n % 4 } else { n }, forward)).collect();
            takes_what_a_model_with_perfect_memory_takes(steps)?;
        }

        /// Against a model that remembers every counter: taken once, unless a window behind.
        #[test]
        fn the_window_takes_what_a_model_with_perfect_memory_takes(
            steps in proptest::collection::vec((0u64..3 * WINDOW, proptest::bool::ANY), 1..400),
        ) {
            // Half the steps jump ahead of the newest (by up to three windows), half look
            // back (up to three windows).
            takes_what_a_model_with_perfect_memory_takes(steps)?;
        }
    }

    #[test]
    fn a_newer_generation_starts_over_and_older_ones_are_refused() {
        let mut g = ReplayGuard::default();
        for c in 0..100 {
            assert_eq!(g.take(1, G, c, true), Ok(()));
        }
        assert_eq!(g.take(1, G + 1_000_000, 0, true), Ok(()), "restarted: counting from 0 again");
        assert_eq!(g.take(1, G + 1_000_000, 0, true), Err(Refused::Replayed));
        assert_eq!(g.take(1, G + 1_000_000, 1, true), Ok(()));
        for c in [0, 99, 100, 5000] {
            assert_eq!(g.take(1, G, c, true), Err(Refused::StaleGeneration), "counter {c} of the old life");
        }
    }

    #[test]
    fn strangers_are_bounded_and_members_are_not_evicted() {
        let mut g = ReplayGuard::default();
        for n in 1..=10 {
            assert_eq!(g.take(n, G, 0, true), Ok(()));
        }
        // A flood of made-up senders (each authenticated: a key holder's).
        for n in 1000..1000 + 10 * MAX_STRANGERS as u64 {
            assert_eq!(g.take(n, G, 0, false), Ok(()));
        }
        assert_eq!(g.senders(), 10 + MAX_STRANGERS);
        for n in 1..=10 {
            assert_eq!(g.take(n, G, 0, true), Err(Refused::Replayed), "member {n} kept its window");
        }
        let last = 1000 + 10 * MAX_STRANGERS as u64 - 1;
        assert_eq!(g.take(last, G, 0, false), Err(Refused::Replayed), "the most recent strangers are kept");

        // A stranger that enters the directory keeps its window; a member that leaves it
        // becomes a stranger with its window.
        g.set_directory(|n| n == last || (2..=10).contains(&n));
        assert_eq!(g.take(last, G, 0, true), Err(Refused::Replayed));
        assert_eq!(g.take(1, G, 0, false), Err(Refused::Replayed));
        assert_eq!(g.senders(), 10 + MAX_STRANGERS);
    }
}
