//! The ring watch: every host watches one member, its successor on the ring of the members it
//! holds alive sorted by node id (the next after itself, wrapping), with a small ping each
//! probe period, and suspects it in SWIM when no ack comes back within the probe RTT. SWIM's
//! own probes pick their targets at random per host, so in a period no host probes a given
//! member with probability ≈ 1/e; on the ring every member is watched by one host each period,
//! so a dead one is suspected within one period and the RTT, whatever the cluster's size.
//!
//! **What it is.** The state of one host's watch — whom it pings, which ping is answered,
//! whom it suspected — and the [`RingMessage`]s on the wire; no I/O and no clock: the node
//! ([`super::node::GossipNode`]) arms the timers, seals the messages and tells SWIM.
//!
//! **What it is not.** A failure detector of its own: it only raises suspicions; SWIM
//! (foca) spreads them, the suspect refutes, and a suspect that does not is declared down by
//! the node after [`super::node::GossipConfig::suspect_to_down`]. Nor a replacement of SWIM's
//! probes, which go on as before (with their indirect probes).
//!
//! A ping is tried up to [`ATTEMPTS`] times within the RTT (every RTT/3), an ack to any of
//! them counts: a false suspicion then needs every try's ping or ack lost, about (2p)³ at
//! loss p — 8·10⁻⁶ per host and period at 1 %, 7·10⁻³ at 10 %, where SWIM's probe with its
//! three indirect ones gives 8·10⁻³ — where a single ping would suspect a live member in 2 %
//! of periods at 1 % loss, and each suspicion costs the whole cluster an update and its
//! refutation. Tries beyond the first cost nothing unless it goes unanswered; waiting out
//! the RTT before one retry would have put the suspicion a period + 2 RTT after a death. The
//! tries all go to the member itself, not through others as SWIM's indirect probes do: a
//! member that only its watcher cannot reach (a one-way fault on that path) is suspected once,
//! refutes through the others, and is not suspected by the ring watch again until it answers a
//! ring ping again: meanwhile its silences count as `ring_unproven` and SWIM's probes, whose
//! indirect ones go around the fault, watch it. (Suspecting it again after each suspicion ran
//! out, as the first version did, cost the cluster a suspicion and a refutation every two
//! seconds for as long as the fault lasted, and wrapped the member's 16-bit SWIM incarnation
//! within two days.)
//!
//! A member is suspected only once it has answered a ring ping in its current life (SWIM
//! generation): a host of an earlier release refuses the [`super::seal::Kind::Ring`]
//! datagram as a kind it does not know (counting it malformed) and never answers, and must
//! not be suspected every period while a cluster is upgraded. The price: a successor watched
//! for the first time that dies before its first answer (a member and its successor killed at
//! the same moment) is left to SWIM's probes.

use super::vecmap::VecMap;
use crate::state::NodeId;

/// Tries of one period's ping, spread over the probe RTT.
pub const ATTEMPTS: u8 = 3;

/// Bytes of a ring message; a longer payload is read for its first bytes (a later release
/// may append fields).
pub const MESSAGE_LEN: usize = 5;

/// A ring message: the payload of a [`super::seal::Kind::Ring`] datagram.
///
/// ```text
///  0     1            5
/// +-----+------------+
/// | tag | number (4) |    tag 1: ping, 2: ack; the number big-endian
/// +-----+------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingMessage {
    /// Are you there? (the watcher's ping of this period: its number).
    Ping(u32),
    /// Yes: the answer to the ping of that number.
    Ack(u32),
}

impl RingMessage {
    /// The message as it travels.
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let (tag, n) = match *self {
            RingMessage::Ping(n) => (1, n),
            RingMessage::Ack(n) => (2, n),
        };
        let mut b = [tag; MESSAGE_LEN];
        b[1..].copy_from_slice(&n.to_be_bytes());
        b
    }

    /// Reads a message; `None` if too short or of an unknown tag.
    pub fn decode(payload: &[u8]) -> Option<RingMessage> {
        let n = u32::from_be_bytes(payload.get(1..MESSAGE_LEN)?.try_into().ok()?);
        match payload[0] {
            1 => Some(RingMessage::Ping(n)),
            2 => Some(RingMessage::Ack(n)),
            _ => None,
        }
    }
}

/// The first of `members` (sorted by node id) after `me`, wrapping around, that `skip` does
/// not pass over; never `me`.
pub fn successor<V>(members: &VecMap<V>, me: NodeId, skip: impl Fn(NodeId) -> bool) -> Option<(NodeId, &V)> {
    let n = members.len();
    let start = members.rank(me);
    (0..n).map(|i| members.nth((start + i) % n)).find(|(node, _)| *node != me && !skip(*node))
}

/// The member this period's ping went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// Its node id.
    pub node: NodeId,
    /// Its life (SWIM generation) as this host holds it.
    pub generation: u64,
    acked: bool,
    tries: u8,
}

/// What an unanswered ping's deadline calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answered, or overtaken by a later ping: nothing.
    Fine,
    /// Ping it again (the same number) and check again.
    Retry(Watched),
    /// Every try went unanswered: suspect it (it is passed over until [`RingWatch::resolved`]).
    Suspect(Watched),
    /// Every try went unanswered, but it has not answered a ring ping in this life (an
    /// earlier release, which does not know them), or not since this watch last suspected
    /// it: not suspected.
    Unproven(Watched),
}

/// One host's ring watch.
#[derive(Debug, Default)]
pub struct RingWatch {
    /// The number of the latest ping (its retries carry it too).
    seq: u32,
    watched: Option<Watched>,
    /// Members this watch suspected whose suspicion has not run out: passed over, so that
    /// the one after a dead member is watched at once. A handful at most.
    suspects: Vec<NodeId>,
    /// The life (SWIM generation) in which each member last answered a ring ping.
    answered: VecMap<u64>,
}

impl RingWatch {
    /// Whether `node` is passed over (this watch suspects it).
    pub fn passes_over(&self, node: NodeId) -> bool {
        self.suspects.contains(&node)
    }

    /// A new period: `to` is pinged; returns the ping's number. The previous ping's
    /// deadlines are void from now on.
    pub fn start(&mut self, node: NodeId, generation: u64) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.watched = Some(Watched { node, generation, acked: false, tries: 1 });
        self.seq
    }

    /// No member to watch this period (alone, or every member passed over).
    pub fn idle(&mut self) {
        self.watched = None;
    }

    /// An ack of ping `seq` from `from` arrived: whether it answers the current ping (the
    /// first such ack; later ones, and acks of earlier pings, are ignored).
    pub fn ack(&mut self, from: NodeId, seq: u32) -> bool {
        match self.watched.as_mut() {
            Some(w) if w.node == from && seq == self.seq && !w.acked => {
                w.acked = true;
                self.answered.insert(w.node, w.generation);
                true
            }
            _ => false,
        }
    }

    /// Ping `seq`'s try has had its share of the RTT.
    pub fn deadline(&mut self, seq: u32) -> Verdict {
        let Some(w) = self.watched.as_mut().filter(|w| seq == self.seq && !w.acked) else {
            return Verdict::Fine;
        };
        if w.tries < ATTEMPTS {
            w.tries += 1;
            return Verdict::Retry(*w);
        }
        let w = self.watched.take().expect("checked above");
        if self.answered.get(w.node) == Some(&w.generation) {
            // Suspected once per answer: if it refutes and stays silent to this host (a
            // one-way fault on this path), SWIM's probes, with their indirect ones, watch it
            // until it answers a ring ping again.
            self.answered.remove(w.node);
            self.suspects.push(w.node);
            Verdict::Suspect(w)
        } else {
            Verdict::Unproven(w)
        }
    }

    /// The suspicion of `node` ran out (it was declared down, or refuted): watch it again
    /// when its turn comes.
    pub fn resolved(&mut self, node: NodeId) {
        self.suspects.retain(|n| *n != node);
    }

    /// Starts over (this host's SWIM instance was replaced): nothing pinged, nobody
    /// suspected; who answered is kept.
    pub fn reset(&mut self) {
        self.watched = None;
        self.suspects.clear();
    }

    /// Forgets the members `keep` says no to (they left the directory).
    pub fn retain(&mut self, keep: impl Fn(NodeId) -> bool) {
        self.answered.retain(|n, _| keep(n));
        self.suspects.retain(|n| keep(*n));
        if self.watched.is_some_and(|w| !keep(w.node)) {
            self.watched = None;
        }
    }

    /// The member being watched this period, if any.
    pub fn watched(&self) -> Option<Watched> {
        self.watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(nodes: &[NodeId]) -> VecMap<()> {
        nodes.iter().map(|n| (*n, ())).collect()
    }

    #[test]
    fn messages_round_trip_and_garbage_does_not_decode() {
        for m in [RingMessage::Ping(0), RingMessage::Ack(7), RingMessage::Ping(u32::MAX)] {
            let wire = m.encode();
            assert_eq!(RingMessage::decode(&wire), Some(m));
            // A later release's longer message is read for what this one knows.
            let mut longer = wire.to_vec();
            longer.extend_from_slice(b"more");
            assert_eq!(RingMessage::decode(&longer), Some(m));
            assert_eq!(RingMessage::decode(&wire[..MESSAGE_LEN - 1]), None);
        }
        assert_eq!(RingMessage::Ack(0x0102_0304).encode(), [2, 1, 2, 3, 4]);
        assert_eq!(RingMessage::decode(&[3, 0, 0, 0, 1]), None);
        assert_eq!(RingMessage::decode(&[]), None);
    }

    #[test]
    fn the_successor_is_the_next_member_wrapping_and_skips_whom_it_is_told() {
        let none = |_| false;
        let m = ring(&[2, 5, 9]);
        assert_eq!(successor(&m, 1, none).map(|(n, _)| n), Some(2));
        assert_eq!(successor(&m, 5, none).map(|(n, _)| n), Some(9), "a member of the map itself");
        assert_eq!(successor(&m, 6, none).map(|(n, _)| n), Some(9));
        assert_eq!(successor(&m, 9, none).map(|(n, _)| n), Some(2), "wraps");
        assert_eq!(successor(&m, 10, none).map(|(n, _)| n), Some(2), "wraps");
        assert_eq!(successor(&m, 1, |n| n == 2).map(|(n, _)| n), Some(5), "a suspect passed over");
        assert_eq!(successor(&m, 1, |n| n != 9).map(|(n, _)| n), Some(9));
        assert_eq!(successor(&m, 1, |_| true), None, "everyone passed over");
        // A ring of two: each watches the other; of one: nobody.
        assert_eq!(successor(&ring(&[1, 2]), 2, none).map(|(n, _)| n), Some(1));
        assert_eq!(successor(&ring(&[1, 2]), 1, none).map(|(n, _)| n), Some(2));
        assert_eq!(successor(&ring(&[1]), 1, none), None);
        assert_eq!(successor(&ring(&[]), 1, none), None);
    }

    #[test]
    fn an_answered_ping_is_fine_and_teaches_who_speaks_ring() {
        let mut w = RingWatch::default();
        let seq = w.start(5, 100);
        assert!(!w.ack(6, seq), "from another member");
        assert!(!w.ack(5, seq.wrapping_sub(1)), "of an earlier ping");
        assert!(w.ack(5, seq));
        assert!(!w.ack(5, seq), "a second ack of the same ping");
        assert_eq!(w.deadline(seq), Verdict::Fine);
        // Next period, silent: retried, then suspected (it answered in this life before).
        let seq = w.start(5, 100);
        assert!(matches!(w.deadline(seq), Verdict::Retry(x) if x.node == 5));
        assert!(matches!(w.deadline(seq), Verdict::Retry(x) if x.node == 5));
        assert!(matches!(w.deadline(seq), Verdict::Suspect(x) if x.node == 5 && x.generation == 100));
        assert!(w.passes_over(5));
        assert_eq!(w.deadline(seq), Verdict::Fine, "one verdict per ping");
        w.resolved(5);
        assert!(!w.passes_over(5));
        // It refuted but stays silent to this host (a one-way fault): not suspected again
        // until it answers again.
        for _ in 0..3 {
            let seq = w.start(5, 100);
            (1..ATTEMPTS).for_each(|_| assert!(matches!(w.deadline(seq), Verdict::Retry(_))));
            assert!(matches!(w.deadline(seq), Verdict::Unproven(x) if x.node == 5));
            assert!(!w.passes_over(5));
        }
        let seq = w.start(5, 100);
        assert!(w.ack(5, seq), "the path healed");
        let seq = w.start(5, 100);
        (1..ATTEMPTS).for_each(|_| assert!(matches!(w.deadline(seq), Verdict::Retry(_))));
        assert!(matches!(w.deadline(seq), Verdict::Suspect(x) if x.node == 5), "watched by the ring again");
    }

    #[test]
    fn a_late_ack_within_the_tries_counts_and_an_old_deadline_is_void() {
        let mut w = RingWatch::default();
        let seq = w.start(5, 100);
        assert!(matches!(w.deadline(seq), Verdict::Retry(_)));
        assert!(w.ack(5, seq), "the first try's ack, late");
        assert_eq!(w.deadline(seq), Verdict::Fine);
        let next = w.start(7, 1);
        assert_eq!(w.deadline(seq), Verdict::Fine, "a deadline of the previous period");
        assert!(matches!(w.deadline(next), Verdict::Retry(x) if x.node == 7));
    }

    #[test]
    fn a_member_that_never_answered_in_this_life_is_not_suspected() {
        let mut w = RingWatch::default();
        let silent = |w: &mut RingWatch, node, generation| {
            let seq = w.start(node, generation);
            (1..ATTEMPTS).for_each(|_| assert!(matches!(w.deadline(seq), Verdict::Retry(_))));
            w.deadline(seq)
        };
        assert!(matches!(silent(&mut w, 5, 100), Verdict::Unproven(_)), "never answered");
        assert!(!w.passes_over(5));
        let seq = w.start(5, 100);
        assert!(w.ack(5, seq));
        assert!(matches!(silent(&mut w, 5, 101), Verdict::Unproven(_)), "answered in an earlier life only");
        assert!(matches!(silent(&mut w, 5, 100), Verdict::Suspect(_)));
        // Out of the directory: forgotten.
        w.retain(|n| n != 5);
        assert!(!w.passes_over(5));
        assert!(matches!(silent(&mut w, 5, 100), Verdict::Unproven(_)));
    }
}
