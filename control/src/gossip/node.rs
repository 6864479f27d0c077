//! One host's gossip: SWIM membership (foca) with endpoint records piggybacked on its
//! messages, anti-entropy rounds, and the seal on every datagram. Sans-IO: datagrams,
//! timer expiries and local changes go in with the current time; datagrams to send, timers
//! to arm and [`Event`]s come out in an [`Output`]. The agent drives it from a UDP socket
//! and tokio timers; the simulation (see [`super::sim`]) from an in-memory network and a
//! simulated clock.
//!
//! Only the directory's hosts (Raft's nodes) gossip: a datagram whose authenticated sender is
//! not in it — a removed host, or one this host's directory does not list yet — is refused
//! before SWIM sees it, and no host outside it is ever alive here, whatever other hosts say
//! of it.
//!
//! **Ring watch.** Beside SWIM's probes (foca picks their targets, at random per host), each
//! host pings its successor among the members it holds alive, sorted by node id, every probe
//! period ([`super::ring`]); when no try within the probe RTT is answered it tells SWIM the
//! member is suspect at its current incarnation (spread like SWIM's own suspicions), tells
//! the member directly so that a live one refutes at once, and declares it down when the
//! suspicion has run [`GossipConfig::suspect_to_down`] unrefuted — foca arms that timer only
//! for its own probes, so the node arms its own. Every member is then watched by one host
//! each period, and a dead one is withdrawn everywhere within a period, the RTT, the
//! suspicion and the time the news takes to spread, whatever the cluster's size (SWIM's
//! probes alone left a member unprobed in a period with probability ≈ 1/e, and the worst
//! case to chance). The successor is passed over while this host's suspicion of it runs, so
//! the next one is watched at once; a member that goes down, leaves or joins changes the
//! ring from the next period on, and hosts whose views differ for a moment watch a member
//! twice or, until they agree, leave one to SWIM's probes.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foca::{BroadcastHandler, Config, Foca, Invalidates, Member, OwnedNotification, PostcardCodec, State};
use rand10::rngs::SmallRng;
use rand10::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::record::{Change, Endpoint, EndpointKey, PUBLIC_KEY_LEN, Record, RecordError, Signer};
use super::replay::{Refused, ReplayGuard};
use super::ring::{self, RingMessage, RingWatch, Verdict};
use super::seal::{GossipKey, Kind, OVERHEAD, Opened, SealError, Sealer};
use super::sync::{self, MemberInfo, Summary, SyncMessage, Want, serde_bytes_vec::Bytes};
use super::tables::{Applied, EndpointTables, Position, Replica, bucket};
use super::vecmap::VecMap;
use crate::state::NodeId;

/// A host's identity in SWIM. `generation` grows with every agent start and every rejoin
/// after being declared down, so a restarted host is a new incarnation that wins over the
/// old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// The host's cluster node id.
    pub node: NodeId,
    /// Where its gossip socket is.
    pub addr: SocketAddr,
    /// Which life of the host this is.
    pub generation: u64,
}

/// A [`Peer`] as SWIM holds it: every host keeps one per member, so it takes 32 bytes where
/// a `Peer` takes 48 (an IPv6 address, rare on an underlay, is boxed). It travels exactly as
/// a `Peer` does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SwimId {
    node: NodeId,
    generation: u64,
    addr: PeerAddr,
}

/// A gossip address in 16 bytes (a `SocketAddr` takes 32, for IPv6's sake).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerAddr {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        match a {
            SocketAddr::V4(a) => PeerAddr::V4(a),
            SocketAddr::V6(a) => PeerAddr::V6(Box::new(a)),
        }
    }
}

impl PeerAddr {
    fn get(&self) -> SocketAddr {
        match self {
            PeerAddr::V4(a) => SocketAddr::V4(*a),
            PeerAddr::V6(a) => SocketAddr::V6(**a),
        }
    }
}

/// A member's identity but its node id (the key it is kept under).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Life {
    generation: u64,
    addr: PeerAddr,
}

impl Life {
    fn of(id: &SwimId) -> Life {
        Life { generation: id.generation, addr: id.addr.clone() }
    }

    /// Whether this is `id`'s life (of the member it is kept under).
    fn is(&self, id: &SwimId) -> bool {
        self.generation == id.generation && self.addr == id.addr
    }
}

impl From<&Peer> for SwimId {
    fn from(p: &Peer) -> SwimId {
        SwimId { node: p.node, generation: p.generation, addr: p.addr.into() }
    }
}

impl SwimId {
    fn peer(&self) -> Peer {
        Peer { node: self.node, addr: self.addr.get(), generation: self.generation }
    }
}

impl Serialize for SwimId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.peer().serialize(s)
    }
}

impl<'de> Deserialize<'de> for SwimId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SwimId, D::Error> {
        Peer::deserialize(d).map(|p| SwimId::from(&p))
    }
}

impl foca::Identity for SwimId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(SwimId { generation: self.generation + 1, ..self.clone() })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Timings and sizes.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// How often each host probes one member.
    pub probe_period: Duration,
    /// How long a direct probe waits before asking others to probe.
    pub probe_rtt: Duration,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down: Duration,
    /// How long a down identity is remembered (then it may come back as it was).
    pub remove_down_after: Duration,
    /// How often pending updates are gossiped, and to how many members.
    pub gossip_interval: Duration,
    /// Members per gossip message burst.
    pub gossip_fanout: usize,
    /// After news arrives, the shortest wait before passing it on (eager push).
    pub eager_delay: Duration,
    /// How often a host starts an anti-entropy round.
    pub sync_interval: Duration,
    /// Most record bytes one anti-entropy answer carries.
    pub sync_budget: usize,
    /// Largest datagram (sealed).
    pub max_datagram: usize,
    /// Hosts the cluster is sized for: each host passes every update and record it learns on
    /// 4·log10(N+1) times (SWIM's rule, which lets a rumour reach all N hosts). The agent
    /// follows the directory's size.
    pub cluster_size: u32,
    /// After the cluster key is rotated, how long a host goes on sealing with the old one
    /// (every host following the state has the new one by then); it forgets the old one
    /// after twice this.
    pub key_changeover: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            probe_period: Duration::from_millis(400),
            probe_rtt: Duration::from_millis(150),
            suspect_to_down: Duration::from_millis(1500),
            remove_down_after: Duration::from_secs(15),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            eager_delay: Duration::from_millis(5),
            sync_interval: Duration::from_secs(1),
            sync_budget: 32 * 1024,
            max_datagram: 1400,
            cluster_size: 1000,
            key_changeover: Duration::from_secs(3),
        }
    }
}

impl GossipConfig {
    fn foca(&self) -> Config {
        let mut c = Config::new_lan(std::num::NonZeroU32::new(self.cluster_size.max(2)).expect("at least 2"));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down;
        c.remove_down_after = Some(self.remove_down_after);
        c.max_packet_size = NonZeroUsize::new(self.max_datagram - OVERHEAD).expect("room for a payload");
        c.num_indirect_probes = NonZeroUsize::new(self.gossip_fanout.max(1)).expect("non-zero");
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).expect("non-zero"),
        });
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(3),
            num_members: NonZeroUsize::new(2).expect("non-zero"),
        });
        c
    }
}

/// What the agent knows of a host from Raft: how to verify its records, where it gossips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// Its gossip signing key's public half.
    pub public_key: [u8; PUBLIC_KEY_LEN],
    /// Its gossip address.
    pub addr: SocketAddr,
}

/// The hosts of the cluster (Raft's node registry) by node id, this host among them or not.
/// Immutable once built and shared: the agent builds one per change of the registry, a
/// simulation one for all its hosts (see [`GossipNode::set_shared_directory`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory(VecMap<DirectoryEntry>);

impl FromIterator<(NodeId, DirectoryEntry)> for Directory {
    fn from_iter<I: IntoIterator<Item = (NodeId, DirectoryEntry)>>(iter: I) -> Self {
        Directory(iter.into_iter().collect())
    }
}

impl Directory {
    /// `node`'s entry.
    pub fn get(&self, node: NodeId) -> Option<&DirectoryEntry> {
        self.0.get(node)
    }

    /// Whether `node` is listed.
    pub fn contains(&self, node: NodeId) -> bool {
        self.0.contains_key(node)
    }

    /// Hosts listed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The hosts, by node id.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (NodeId, &DirectoryEntry)> + '_ {
        self.0.iter()
    }
}

/// A timer to arm; give it back to [`GossipNode::handle_timer`] when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer(TimerKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimerKind {
    Swim(u32, foca::Timer<SwimId>),
    Sync,
    Eager,
    /// Seal with the newest key (of this rotation).
    KeySeal(u32),
    /// Forget the older keys (of this rotation).
    KeyRetire(u32),
    /// A ring-watch period starts.
    RingTick,
    /// A try of the ring ping of this number has had its share of the RTT.
    RingDeadline(u32),
    /// The ring watch's suspicion of `member` at `incarnation` (of SWIM instance `life`) has
    /// run its course.
    RingDown {
        life: u32,
        member: SwimId,
        incarnation: u16,
    },
}

/// What changed, for the agent to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The host is alive (joined, came back, refuted a suspicion that had gone to down).
    PeerUp(NodeId),
    /// The host is confirmed down (or left).
    PeerDown(NodeId),
    /// The host's endpoint table changed.
    Endpoints(NodeId),
}

/// What one call produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Sealed datagrams to send.
    pub datagrams: Vec<(SocketAddr, Vec<u8>)>,
    /// Timers to arm: fire after the duration.
    pub timers: Vec<(Duration, Timer)>,
    /// What changed.
    pub events: Vec<Event>,
}

impl Output {
    /// Empties it (keeping the allocations).
    pub fn clear(&mut self) {
        self.datagrams.clear();
        self.timers.clear();
        self.events.clear();
    }
}

/// Everything counted, for `overlayd peers` and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipCounters {
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Refused: not an overlayd gossip datagram.
    pub rx_not_gossip: u64,
    /// Refused: an overlayd gossip datagram of another format version (its sender runs
    /// another overlayd release; see [`super::seal`]).
    pub rx_other_version: u64,
    /// Refused: does not authenticate under the cluster key.
    pub rx_bad_auth: u64,
    /// Authenticated but malformed (or a kind this version does not know).
    pub rx_malformed: u64,
    /// Refused: authenticated, but received before (a replay), or too far behind its
    /// sender's newest to tell (see [`super::replay`]).
    pub rx_replayed: u64,
    /// Refused: authenticated, but from an earlier generation of its sender than one
    /// already heard (sent before the sender restarted, or a replay of such).
    pub rx_stale_generation: u64,
    /// Refused: authenticated, but sealed for another host (or by this one): a datagram
    /// captured on its way elsewhere, replayed here.
    pub rx_misdirected: u64,
    /// Refused: authenticated, but its sender is not in the directory (a host removed from
    /// the cluster, or one that joined before this host's directory caught up).
    pub rx_unknown_sender: u64,
    /// Datagrams not sent: their receiver is not in the directory (a host SWIM still speaks
    /// of after its removal). Every datagram goes to the directory's address of its receiver.
    pub tx_not_in_directory: u64,
    /// Endpoint records applied.
    pub records_applied: u64,
    /// Endpoint records that were already known.
    pub records_stale: u64,
    /// Endpoint records whose signature is not their owner's.
    pub records_forged: u64,
    /// Endpoint records of a host that is not in the cluster (yet).
    pub records_unknown_owner: u64,
    /// Endpoint records that did not parse.
    pub records_malformed: u64,
    /// Anti-entropy rounds started.
    pub sync_rounds: u64,
    /// Times this host came back from a silence as a new incarnation (cut off, or stalled).
    pub rebirths: u64,
    /// Members this host suspected: a probe of one, direct and through others, went
    /// unanswered (SWIM declares it down unless it refutes in time).
    pub suspicions: u64,
    /// Suspicions of this host that it refuted (each raises its SWIM incarnation).
    pub refutations: u64,
    /// Records received through anti-entropy that were new (repairs).
    pub sync_repaired: u64,
    /// Records sent in anti-entropy answers.
    pub sync_records_sent: u64,
    /// SWIM probe cycles that ended before all their steps had run: timers fired late (a
    /// stalled or overloaded host). SWIM goes on with the next cycle.
    pub probe_cycles_incomplete: u64,
    /// SWIM probe timers that fired while SWIM counted itself cut off from every member;
    /// ignored (foca voids such timers, so this points at a bug).
    pub probe_timers_disconnected: u64,
    /// SWIM messages that could not be encoded, so were not sent (a member identity or an
    /// update that does not fit a datagram).
    pub swim_unencodable: u64,
    /// This host's own records too large to piggyback on SWIM messages: only anti-entropy
    /// carries them.
    pub records_not_piggybacked: u64,
    /// Changes of the cluster size that SWIM refused to apply at run time (its
    /// retransmission count stays as it was).
    pub cluster_size_refused: u64,
    /// SWIM errors that none of the calls made outside datagram handling returns (counted
    /// so that a foca upgrade that starts returning them shows).
    pub swim_unexpected: u64,
    /// Ring pings this host sent its successor (tries within one RTT included; see
    /// [`super::ring`]).
    pub ring_pings: u64,
    /// Ring acks this host received that answered its current ping.
    pub ring_acks: u64,
    /// Members this host's ring watch suspected: every try of a period's ping went
    /// unanswered (SWIM declares it down unless it refutes in time).
    pub ring_suspicions: u64,
    /// Periods whose ring ping went unanswered by a member that never answered one in its
    /// current life (an earlier overlayd release, which does not know them): not suspected.
    pub ring_unproven: u64,
}

impl GossipCounters {
    /// Counts an error of a SWIM call other than `handle_data` (whose errors are about the
    /// datagram, counted as `rx_malformed`).
    fn swim_error(&mut self, e: &foca::Error) {
        use foca::Error as E;
        let counter = match e {
            E::IncompleteProbeCycle => &mut self.probe_cycles_incomplete,
            E::NotConnected => &mut self.probe_timers_disconnected,
            E::Encode(_) => &mut self.swim_unencodable,
            E::InvalidConfig => &mut self.cluster_size_refused,
            E::DataTooBig
            | E::MalformedPacket
            | E::Decode(_)
            | E::DataFromOurselves
            | E::IndirectForOurselves
            | E::CustomBroadcast(_)
            | E::NotUndead
            | E::SameIdentity => &mut self.swim_unexpected,
        };
        *counter += 1;
    }

    /// Adds `other`'s counts to these (the simulation sums its hosts').
    pub(crate) fn add(&mut self, other: &GossipCounters) {
        let GossipCounters {
            rx_datagrams,
            rx_bytes,
            tx_datagrams,
            tx_bytes,
            rx_not_gossip,
            rx_other_version,
            rx_bad_auth,
            rx_malformed,
            rx_replayed,
            rx_stale_generation,
            rx_misdirected,
            rx_unknown_sender,
            tx_not_in_directory,
            records_applied,
            records_stale,
            records_forged,
            records_unknown_owner,
            records_malformed,
            sync_rounds,
            rebirths,
            suspicions,
            refutations,
            sync_repaired,
            sync_records_sent,
            probe_cycles_incomplete,
            probe_timers_disconnected,
            swim_unencodable,
            records_not_piggybacked,
            cluster_size_refused,
            swim_unexpected,
            ring_pings,
            ring_acks,
            ring_suspicions,
            ring_unproven,
        } = other;
        self.rx_datagrams += rx_datagrams;
        self.rx_bytes += rx_bytes;
        self.tx_datagrams += tx_datagrams;
        self.tx_bytes += tx_bytes;
        self.rx_not_gossip += rx_not_gossip;
        self.rx_other_version += rx_other_version;
        self.rx_bad_auth += rx_bad_auth;
        self.rx_malformed += rx_malformed;
        self.rx_replayed += rx_replayed;
        self.rx_stale_generation += rx_stale_generation;
        self.rx_misdirected += rx_misdirected;
        self.rx_unknown_sender += rx_unknown_sender;
        self.tx_not_in_directory += tx_not_in_directory;
        self.records_applied += records_applied;
        self.records_stale += records_stale;
        self.records_forged += records_forged;
        self.records_unknown_owner += records_unknown_owner;
        self.records_malformed += records_malformed;
        self.sync_rounds += sync_rounds;
        self.rebirths += rebirths;
        self.suspicions += suspicions;
        self.refutations += refutations;
        self.sync_repaired += sync_repaired;
        self.sync_records_sent += sync_records_sent;
        self.probe_cycles_incomplete += probe_cycles_incomplete;
        self.probe_timers_disconnected += probe_timers_disconnected;
        self.swim_unencodable += swim_unencodable;
        self.records_not_piggybacked += records_not_piggybacked;
        self.cluster_size_refused += cluster_size_refused;
        self.swim_unexpected += swim_unexpected;
        self.ring_pings += ring_pings;
        self.ring_acks += ring_acks;
        self.ring_suspicions += ring_suspicions;
        self.ring_unproven += ring_unproven;
    }
}

/// How this host sees another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The host.
    pub node: NodeId,
    /// `alive`, `suspect`, `down`, or `unknown` (never heard from, or long down).
    pub state: &'static str,
    /// The identity generation (grows with restarts and rejoins).
    pub generation: u64,
    /// SWIM incarnation (grows with every refuted suspicion).
    pub incarnation: u16,
    /// Where this host's replica of its endpoint table stands.
    pub table: Option<Position>,
    /// Endpoints in that table.
    pub endpoints: usize,
}

/// Identifies a piggybacked record in foca's broadcast queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ItemKey {
    owner: NodeId,
    epoch: u64,
    version: u64,
}

impl Invalidates for ItemKey {
    // Every version travels (none replaces another in the queue): receivers' watermarks
    // then advance without anti-entropy in the common case.
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
enum Never {}

/// State the broadcast handler (owned by foca) and the node share.
#[derive(Debug)]
struct Shared {
    tables: EndpointTables,
    /// This host is listed too: see [`Shared::member`].
    directory: Arc<Directory>,
    counters: GossipCounters,
    changed: BTreeSet<NodeId>,
    fresh: bool,
}

impl Shared {
    /// Whether `node` is another host of the directory.
    fn member(&self, node: NodeId) -> bool {
        node != self.tables.me() && self.directory.contains(node)
    }

    /// Checks and applies record bytes from a peer. `Ok(true)`: new.
    fn accept(&mut self, wire: &[u8]) -> Result<(Record, bool), ()> {
        let record = match Record::decode(wire) {
            Ok(r) => r,
            Err(_) => {
                self.counters.records_malformed += 1;
                return Err(());
            }
        };
        if record.owner == self.tables.me() || self.tables.knows(record.owner, record.epoch, record.version) {
            self.counters.records_stale += 1;
            return Ok((record, false));
        }
        let Some(entry) = self.directory.get(record.owner) else {
            self.counters.records_unknown_owner += 1;
            return Err(());
        };
        if let Err(e) = record.verify(&entry.public_key) {
            debug_assert_eq!(e, RecordError::Forged);
            self.counters.records_forged += 1;
            return Err(());
        }
        let owner = record.owner;
        match self.tables.apply(record.clone()) {
            Applied::New => {
                self.counters.records_applied += 1;
                self.changed.insert(owner);
                Ok((record, true))
            }
            Applied::Stale => {
                self.counters.records_stale += 1;
                Ok((record, false))
            }
        }
    }
}

struct Handler(Arc<Mutex<Shared>>);

impl BroadcastHandler<SwimId> for Handler {
    type Key = ItemKey;
    type Error = Never;

    fn receive_item(&mut self, data: &[u8], sender: Option<&SwimId>) -> Result<Option<ItemKey>, Never> {
        let mut s = lock(&self.0);
        if sender.is_none() {
            // Our own record, just applied by `publish`.
            return Ok(Record::decode(data).ok().map(|r| ItemKey {
                owner: r.owner,
                epoch: r.epoch,
                version: r.version,
            }));
        }
        Ok(match s.accept(data) {
            Ok((r, true)) => {
                s.fresh = true;
                Some(ItemKey { owner: r.owner, epoch: r.epoch, version: r.version })
            }
            _ => None,
        })
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts what a SWIM call refused. Its errors are not the caller's to act on: each says a
/// message was not sent or a step did not run, and SWIM's next round repairs that.
fn counted<T>(shared: &Mutex<Shared>, result: Result<T, foca::Error>) {
    if let Err(e) = result {
        lock(shared).counters.swim_error(&e);
    }
}

/// What foca asks of its runtime, collected; and what its notifications count.
#[derive(Default)]
struct Outbox {
    sends: Vec<(SwimId, Vec<u8>)>,
    timers: Vec<(Duration, foca::Timer<SwimId>)>,
    notes: Vec<OwnedNotification<SwimId>>,
    /// Counted since the last flush (see [`GossipCounters::suspicions`]).
    suspicions: u64,
    /// Counted since the last flush (see [`GossipCounters::refutations`]).
    refutations: u64,
    /// This host's SWIM incarnation as its last message said.
    incarnation: u16,
}

impl foca::Runtime<SwimId> for Outbox {
    fn notify(&mut self, n: foca::Notification<'_, SwimId>) {
        use foca::Notification as N;
        match n {
            // foca keeps this host's incarnation to itself, but every message carries it, and
            // it grows only to refute a suspicion (it starts over with a new identity).
            N::DataSent(header) => {
                if header.src_incarnation > self.incarnation {
                    self.refutations += 1;
                }
                self.incarnation = header.src_incarnation;
            }
            N::DataReceived(_) => {}
            N::ProbeFailed(..) => self.suspicions += 1,
            n => self.notes.push(n.to_owned()),
        }
    }

    fn send_to(&mut self, to: SwimId, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: foca::Timer<SwimId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// Where a datagram goes: the host it is sealed for, and its address.
#[derive(Debug, Clone, Copy)]
struct Dest {
    node: NodeId,
    addr: SocketAddr,
}

impl From<&SwimId> for Dest {
    fn from(p: &SwimId) -> Dest {
        Dest { node: p.node, addr: p.addr.get() }
    }
}

/// Most Digest datagrams one Hello is answered with.
const MAX_DIGESTS: usize = 4;
/// Most suspects told per anti-entropy round.
const MAX_TOLD_SUSPECTS: usize = 16;
/// Most cluster keys a host opens with (rotations in quick succession).
const MAX_KEYS: usize = 3;

type Swim = Foca<SwimId, PostcardCodec, SmallRng, Handler>;

/// One host's gossip.
pub struct GossipNode {
    swim: Swim,
    shared: Arc<Mutex<Shared>>,
    /// The cluster keys datagrams open with, newest first: more than one only while a
    /// rotation is under way (see [`GossipNode::rotate_key`]).
    keys: Vec<GossipKey>,
    /// Which rotation is under way (its timers carry it).
    rotation: u32,
    /// Where a datagram is copied to be tried under one key while others remain.
    trial: Vec<u8>,
    /// Seals what this host sends: its key and counter for this generation (`epoch`).
    sealer: Sealer,
    /// Which datagrams of each sender were taken.
    replay: ReplayGuard,
    signer: Signer,
    config: GossipConfig,
    epoch: u64,
    version: u64,
    /// The members alive here, and which life of each SWIM last named.
    live: VecMap<Life>,
    outbox: Outbox,
    rng: SmallRng,
    last_eager: Option<Duration>,
    eager_armed: bool,
    scratch: Vec<u8>,
    pending_sends: Vec<(NodeId, Vec<u8>)>,
    pending_timers: Vec<(Duration, Timer)>,
    /// When an authenticated datagram last arrived (see `heard`).
    last_heard: Option<Duration>,
    /// Which SWIM instance this is (timers carry it).
    life: u32,
    pending_events: Vec<Event>,
    ring: RingWatch,
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode").field("me", self.swim.identity()).field("epoch", &self.epoch).finish()
    }
}

impl GossipNode {
    /// A host's gossip, with an empty endpoint table in `epoch`, which must grow with every
    /// start of the agent: it is also the generation its datagrams are sealed in, and a node
    /// id running twice in one generation would repeat nonces (see [`super::seal`]). `seed`
    /// seeds its random choices.
    pub fn new(me: Peer, config: GossipConfig, key: GossipKey, signer: Signer, epoch: u64, seed: u64) -> GossipNode {
        let sealer = key.sealer(me.node, epoch);
        let shared = Arc::new(Mutex::new(Shared {
            tables: EndpointTables::new(me.node),
            directory: Arc::default(),
            counters: GossipCounters::default(),
            changed: BTreeSet::new(),
            fresh: false,
        }));
        let swim = Foca::with_custom_broadcast(
            SwimId::from(&me),
            config.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            Handler(Arc::clone(&shared)),
        );
        GossipNode {
            swim,
            shared,
            sealer,
            keys: vec![key],
            rotation: 0,
            trial: Vec::new(),
            replay: ReplayGuard::default(),
            signer,
            config,
            epoch,
            version: 0,
            live: VecMap::new(),
            outbox: Outbox::default(),
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            last_eager: None,
            eager_armed: false,
            scratch: Vec::new(),
            pending_sends: Vec::new(),
            pending_timers: Vec::new(),
            last_heard: None,
            life: 0,
            pending_events: Vec::new(),
            ring: RingWatch::default(),
        }
    }

    /// This host's identity now.
    pub fn identity(&self) -> Peer {
        self.swim.identity().peer()
    }

    fn me(&self) -> NodeId {
        self.swim.identity().node
    }

    /// Starts: opens the endpoint table's epoch and arms the anti-entropy timer (whose
    /// rounds also announce the host while it knows no member). Give it the directory next.
    pub fn start(&mut self, out: &mut Output) {
        self.record(Change::Epoch, out);
        let first = self.config.sync_interval.mul_f64(self.rng.random_range(0.1..1.0));
        out.timers.push((first, Timer(TimerKind::Sync)));
        // Hosts started together do not ping in step.
        let first = self.config.probe_period.mul_f64(self.rng.random_range(0.0..1.0));
        out.timers.push((first, Timer(TimerKind::RingTick)));
    }

    /// The hosts of the cluster (from Raft). Tables of hosts no longer in it are dropped, and
    /// they are down here at once (and said to be, to the others); a host that enters it and
    /// that SWIM already knows alive is alive from now on.
    pub fn set_directory(&mut self, entries: impl IntoIterator<Item = (NodeId, DirectoryEntry)>, out: &mut Output) {
        self.set_shared_directory(Arc::new(entries.into_iter().collect()), out);
    }

    /// [`GossipNode::set_directory`] with a directory other hosts' nodes may share (it may
    /// list this host or not).
    pub fn set_shared_directory(&mut self, directory: Arc<Directory>, out: &mut Output) {
        let gone: Vec<SwimId> = {
            let mut s = lock(&self.shared);
            s.directory = directory;
            // A replica of every host's table, every member alive: room for all at once.
            let hosts = s.directory.len();
            s.tables.reserve(hosts);
            self.live.reserve(hosts.saturating_sub(self.live.len()));
            let stale: Vec<NodeId> = s.tables.owners().filter(|o| *o != s.tables.me() && !s.member(*o)).collect();
            for o in stale {
                s.tables.forget(o);
                s.changed.insert(o);
            }
            let s = &*s;
            self.replay.set_directory(|n| s.member(n));
            self.ring.retain(|n| s.member(n));
            let left: Vec<NodeId> = self.live.keys().filter(|n| !s.member(*n)).collect();
            for n in left {
                self.live.remove(n);
                self.pending_events.push(Event::PeerDown(n));
            }
            for m in self.swim.iter_members() {
                let p = m.id();
                if s.member(p.node) && !self.live.contains_key(p.node) {
                    self.live.insert(p.node, Life::of(p));
                    self.pending_events.push(Event::PeerUp(p.node));
                }
            }
            self.swim.iter_members().map(|m| m.id().clone()).filter(|p| !s.member(p.node)).collect()
        };
        if !gone.is_empty() {
            counted(&self.shared, self.swim.apply_many(gone.into_iter().map(Member::down), true, &mut self.outbox));
        }
        let size = {
            let s = lock(&self.shared);
            (s.directory.len() - usize::from(s.directory.contains(s.tables.me()))) as u32 + 1
        };
        if size != self.config.cluster_size {
            self.config.cluster_size = size;
            // Only the retransmission count follows the size; foca accepts that at run time.
            counted(&self.shared, self.swim.set_config(self.config.foca()));
        }
        if self.swim.num_members() == 0 {
            self.announce(3);
        }
        self.flush(out);
    }

    /// Adds or replaces one of this host's endpoints.
    pub fn put(&mut self, key: EndpointKey, endpoint: Endpoint, out: &mut Output) {
        self.record(Change::Put(key, endpoint), out);
    }

    /// Removes one of this host's endpoints (a tombstone goes out).
    pub fn delete(&mut self, key: EndpointKey, out: &mut Output) {
        self.record(Change::Delete(key), out);
    }

    /// Leaves: tells a few members this identity is down, at once.
    pub fn leave(&mut self, out: &mut Output) {
        counted(&self.shared, self.swim.leave_cluster(&mut self.outbox));
        self.flush(out);
    }

    fn record(&mut self, change: Change, out: &mut Output) {
        self.version += 1;
        let r = Record::sign(&self.signer, self.me(), self.epoch, self.version, change);
        {
            let mut s = lock(&self.shared);
            s.tables.apply(r.clone());
            s.changed.insert(r.owner);
        }
        // Our own item: the handler accepts it; only its size can be refused.
        match self.swim.add_broadcast(r.wire()) {
            Ok(_) => {}
            Err(foca::Error::DataTooBig) => lock(&self.shared).counters.records_not_piggybacked += 1,
            Err(e) => lock(&self.shared).counters.swim_error(&e),
        }
        if self.swim.num_members() > 0 {
            counted(&self.shared, self.swim.gossip(&mut self.outbox));
        }
        self.flush(out);
    }

    /// A datagram arrived on the gossip socket.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, datagram: &mut [u8], out: &mut Output) {
        self.check_silence(now);
        let updates_before = self.swim.updates_backlog();
        {
            let mut s = lock(&self.shared);
            s.counters.rx_datagrams += 1;
            s.counters.rx_bytes += datagram.len() as u64;
        }
        match self.open(datagram) {
            Err(e) => {
                let mut s = lock(&self.shared);
                match e {
                    SealError::NotGossip => s.counters.rx_not_gossip += 1,
                    SealError::OtherVersion(_) => s.counters.rx_other_version += 1,
                    SealError::BadAuth => s.counters.rx_bad_auth += 1,
                    SealError::UnknownKind(_) => s.counters.rx_malformed += 1,
                }
            }
            Ok(opened) => {
                if self.take(&opened) {
                    let from = Dest { node: opened.header.sender, addr: from };
                    self.handle_payload(now, from, opened.kind, opened.payload);
                }
            }
        }
        let fresh = std::mem::take(&mut lock(&self.shared).fresh) || self.swim.updates_backlog() > updates_before;
        if fresh {
            self.eager(now);
        }
        self.flush(out);
    }

    /// Opens a datagram in place under the newest of the keys it opens under.
    fn open<'d>(&mut self, datagram: &'d mut [u8]) -> Result<Opened<'d>, SealError> {
        // Opening in place spoils the datagram when the key is wrong: while a rotation is
        // under way, the keys but the last are tried on a copy.
        let (last, earlier) = self.keys.split_last().expect("a node always has a key");
        let mut key = last;
        for k in earlier {
            self.trial.clear();
            self.trial.extend_from_slice(datagram);
            match k.open(&mut self.trial) {
                Ok(_) => {
                    key = k;
                    break;
                }
                Err(SealError::BadAuth) => continue,
                Err(e) => return Err(e),
            }
        }
        key.open(datagram)
    }

    /// Whether an authenticated datagram is for this host, from a host of the directory, and
    /// new: each is taken once, before anything in it is looked at, so that a replay is never
    /// answered; a sender outside the directory is never heard (it is not alive here, and
    /// says nothing of others).
    fn take(&mut self, opened: &Opened<'_>) -> bool {
        let h = &opened.header;
        let me = self.me();
        let mut s = lock(&self.shared);
        if h.receiver != me || h.sender == me {
            s.counters.rx_misdirected += 1;
            return false;
        }
        if !s.member(h.sender) {
            s.counters.rx_unknown_sender += 1;
            return false;
        }
        match self.replay.take(h.sender, h.generation, h.counter, true) {
            Ok(()) => true,
            Err(Refused::Replayed) => {
                s.counters.rx_replayed += 1;
                false
            }
            Err(Refused::StaleGeneration) => {
                s.counters.rx_stale_generation += 1;
                false
            }
        }
    }

    fn handle_payload(&mut self, now: Duration, from: Dest, kind: Kind, payload: &[u8]) {
        match kind {
            Kind::Swim => {
                self.heard(now);
                if let Err(e) = self.swim.handle_data(payload, &mut self.outbox)
                    && !matches!(e, foca::Error::DataFromOurselves)
                {
                    lock(&self.shared).counters.rx_malformed += 1;
                }
            }
            Kind::Sync => match SyncMessage::decode(payload) {
                Some(m) => {
                    self.heard(now);
                    self.handle_sync(from, m)
                }
                None => lock(&self.shared).counters.rx_malformed += 1,
            },
            Kind::Ring => match RingMessage::decode(payload) {
                // Any host's ping is answered: its watch may differ from this host's view.
                Some(RingMessage::Ping(seq)) => {
                    self.heard(now);
                    self.send_ring(from.node, RingMessage::Ack(seq));
                }
                Some(RingMessage::Ack(seq)) => {
                    self.heard(now);
                    if self.ring.ack(from.node, seq) {
                        lock(&self.shared).counters.ring_acks += 1;
                    }
                }
                None => lock(&self.shared).counters.rx_malformed += 1,
            },
        }
    }

    /// Seals `payload` of `kind` for host `to` as this host seals what it sends (its key, its
    /// next counter), without sending it: what a holder of this host's keys can put on the
    /// wire. For the simulation's injections and for tests.
    pub fn seal(&mut self, to: NodeId, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut sealed = Vec::new();
        self.sealer.seal(to, kind, payload, &mut sealed);
        sealed
    }

    /// A timer this node armed expired.
    pub fn handle_timer(&mut self, now: Duration, timer: Timer, out: &mut Output) {
        self.check_silence(now);
        match timer.0 {
            TimerKind::Swim(life, t) => {
                // A timer of a SWIM instance since replaced (see `rebirth`) is void.
                if life == self.life {
                    counted(&self.shared, self.swim.handle_timer(t, &mut self.outbox));
                }
            }
            TimerKind::Sync => {
                let jitter = self.rng.random_range(0.8..1.2);
                out.timers.push((self.config.sync_interval.mul_f64(jitter), Timer(TimerKind::Sync)));
                if self.swim.num_members() == 0 {
                    self.announce(3);
                } else {
                    self.sync_round();
                    self.tell_suspects();
                }
            }
            TimerKind::Eager => {
                self.eager_armed = false;
                self.eager(now);
            }
            TimerKind::RingTick => {
                out.timers.push((self.config.probe_period, Timer(TimerKind::RingTick)));
                self.ring_tick();
            }
            TimerKind::RingDeadline(seq) => self.ring_deadline(now, seq),
            TimerKind::RingDown { life, member, incarnation } => {
                self.ring.resolved(member.node);
                // A suspicion of a SWIM instance since replaced (see `rebirth`) is void.
                if life == self.life {
                    self.ring_down(now, member, incarnation);
                }
            }
            TimerKind::KeySeal(rotation) if rotation == self.rotation => self.sealer.rekey(&self.keys[0]),
            TimerKind::KeyRetire(rotation) if rotation == self.rotation => self.keys.truncate(1),
            // Of a rotation since overtaken by another: that one's timers finish the job.
            TimerKind::KeySeal(_) | TimerKind::KeyRetire(_) => {}
        }
        self.flush(out);
    }

    /// The cluster key was rotated (a node was removed: it holds the old one). Datagrams open
    /// under `key` at once, and still under the keys this host had; it seals with `key` after
    /// [`GossipConfig::key_changeover`], when every host following the state has it too, and
    /// forgets the older keys after twice that: from then on, what the old key seals opens
    /// nothing here.
    pub fn rotate_key(&mut self, key: GossipKey, out: &mut Output) {
        self.rotation += 1;
        self.keys.insert(0, key);
        self.keys.truncate(MAX_KEYS);
        let changeover = self.config.key_changeover;
        out.timers.push((changeover, Timer(TimerKind::KeySeal(self.rotation))));
        out.timers.push((changeover * 2, Timer(TimerKind::KeyRetire(self.rotation))));
    }

    /// An authenticated datagram arrived.
    fn heard(&mut self, now: Duration) {
        self.last_heard = Some(now);
    }

    /// A host that has heard nothing for longer than a suspicion lasts is cut off (or was
    /// stalled), or alone: what its SWIM instance concludes meanwhile — every member it cannot
    /// reach suspected, then declared down, those verdicts queued to be gossiped — is about
    /// itself, not them, and spreading it once the cut heals would take healthy hosts down
    /// everywhere. So it withdraws everyone locally and starts over as a new incarnation that
    /// announces itself until it is heard again (see `rebirth`).
    fn check_silence(&mut self, now: Duration) {
        if self.last_heard.is_some_and(|t| now.saturating_sub(t) > self.config.suspect_to_down) {
            self.last_heard = None;
            self.rebirth();
        }
    }

    /// Replaces the SWIM instance with a fresh one under a renewed identity, which announces
    /// itself; the endpoint tables stay (anti-entropy brings them up to date). Every member is
    /// down until heard from again.
    fn rebirth(&mut self) {
        let next = foca::Identity::renew(self.swim.identity()).expect("a SwimId always renews");
        self.life += 1;
        let seed = self.rng.random();
        self.swim = Foca::with_custom_broadcast(
            next,
            self.config.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            Handler(Arc::clone(&self.shared)),
        );
        for (node, _) in self.live.drain() {
            self.pending_events.push(Event::PeerDown(node));
        }
        self.ring.reset();
        lock(&self.shared).counters.rebirths += 1;
        self.announce(3);
    }

    /// Tells each member this host suspects so, directly: a suspicion's gossip may have been
    /// spent while the member was unreachable, and a member that never learns it is suspected
    /// cannot refute it.
    fn tell_suspects(&mut self) {
        let me = self.me();
        let suspects: Vec<(Dest, u16)> = self
            .swim
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect)
            .take(MAX_TOLD_SUSPECTS)
            .map(|m| (Dest::from(m.id()), m.incarnation()))
            .collect();
        for (to, incarnation) in suspects {
            self.send_sync(to, &SyncMessage::Suspected { by: me, incarnation });
        }
    }

    /// A ring-watch period: pings the successor (see [`super::ring`]).
    fn ring_tick(&mut self) {
        let me = self.me();
        let ring = &self.ring;
        let Some((node, life)) = ring::successor(&self.live, me, |n| ring.passes_over(n)) else {
            self.ring.idle();
            return;
        };
        let seq = self.ring.start(node, life.generation);
        self.ring_ping(node, seq);
    }

    /// Sends ping `seq` (a try of this period's), and arms its try's deadline: the tries
    /// share the probe RTT.
    fn ring_ping(&mut self, to: NodeId, seq: u32) {
        lock(&self.shared).counters.ring_pings += 1;
        self.send_ring(to, RingMessage::Ping(seq));
        self.outbox_timer(self.config.probe_rtt / u32::from(ring::ATTEMPTS), TimerKind::RingDeadline(seq));
    }

    fn ring_deadline(&mut self, now: Duration, seq: u32) {
        match self.ring.deadline(seq) {
            Verdict::Fine => {}
            Verdict::Retry(w) => self.ring_ping(w.node, seq),
            Verdict::Suspect(w) => self.ring_suspect(now, w.node, w.generation),
            Verdict::Unproven(_) => lock(&self.shared).counters.ring_unproven += 1,
        }
    }

    /// The ring watch suspects `node` (in life `generation`): SWIM holds it suspect at its
    /// current incarnation and spreads that (unless it already did), the member hears it at
    /// once (a live one refutes), and the suspicion runs out after `suspect_to_down`.
    fn ring_suspect(&mut self, now: Duration, node: NodeId, generation: u64) {
        // A scan of SWIM's members (foca finds one no faster), once per suspicion.
        let found = self
            .swim
            .iter_membership_state()
            .find(|m| m.id().node == node && m.id().generation == generation)
            .map(|m| (m.id().clone(), m.incarnation(), m.state()));
        let Some((id, incarnation, state)) = found.filter(|(_, _, state)| *state != State::Down) else {
            // Down or gone meanwhile: nothing to suspect.
            self.ring.resolved(node);
            return;
        };
        lock(&self.shared).counters.ring_suspicions += 1;
        if state == State::Alive {
            let suspect = Member::new(id.clone(), incarnation, State::Suspect);
            counted(&self.shared, self.swim.apply_many(std::iter::once(suspect), true, &mut self.outbox));
            self.eager(now);
        }
        let me = self.me();
        self.send_sync(Dest::from(&id), &SyncMessage::Suspected { by: me, incarnation });
        let life = self.life;
        self.outbox_timer(self.config.suspect_to_down, TimerKind::RingDown { life, member: id, incarnation });
    }

    /// The ring watch's suspicion of `member` at `incarnation` ran out: down, if SWIM still
    /// holds it suspect at that incarnation (it did not refute, nor did it go down or come
    /// back as a new life meanwhile).
    fn ring_down(&mut self, now: Duration, member: SwimId, incarnation: u16) {
        let unrefuted = self
            .swim
            .iter_membership_state()
            .any(|m| *m.id() == member && m.state() == State::Suspect && m.incarnation() == incarnation);
        if unrefuted {
            let down = Member::new(member, incarnation, State::Down);
            counted(&self.shared, self.swim.apply_many(std::iter::once(down), true, &mut self.outbox));
            self.eager(now);
        }
    }

    fn send_ring(&mut self, to: NodeId, m: RingMessage) {
        let sealed = self.seal(to, Kind::Ring, &m.encode());
        self.pending_sends.push((to, sealed));
    }

    /// Passes news on now, or as soon as `eager_delay` since the last push allows.
    fn eager(&mut self, now: Duration) {
        if self.eager_armed {
            return;
        }
        match self.last_eager {
            Some(t) if now < t + self.config.eager_delay => {
                self.eager_armed = true;
                self.outbox_timer(t + self.config.eager_delay - now, TimerKind::Eager);
            }
            _ => {
                self.last_eager = Some(now);
                if self.swim.num_members() > 0 {
                    counted(&self.shared, self.swim.gossip(&mut self.outbox));
                }
            }
        }
    }

    fn outbox_timer(&mut self, after: Duration, kind: TimerKind) {
        self.pending_timers.push((after, Timer(kind)));
    }

    /// Announces this host to up to `n` random hosts of the directory.
    fn announce(&mut self, n: usize) {
        let seeds: Vec<SwimId> = {
            let s = lock(&self.shared);
            // The directory's hosts but this one, by rank.
            let me = s.tables.me();
            let listed = s.directory.contains(me);
            let others = s.directory.len() - usize::from(listed);
            let my_rank = s.directory.0.rank(me);
            let mut chosen = Vec::new();
            for _ in 0..n.min(others) {
                let i = self.rng.random_range(0..others);
                let (node, e) = s.directory.0.nth(if listed && i >= my_rank { i + 1 } else { i });
                chosen.push(SwimId { node, addr: e.addr.into(), generation: 0 });
            }
            chosen
        };
        for p in seeds {
            counted(&self.shared, self.swim.announce(p, &mut self.outbox));
        }
    }

    fn sync_round(&mut self) {
        let members: Vec<Dest> = self.swim.iter_members().map(|m| Dest::from(m.id())).collect();
        if members.is_empty() {
            return;
        }
        let to = members[self.rng.random_range(0..members.len())];
        let hashes = {
            let mut s = lock(&self.shared);
            s.counters.sync_rounds += 1;
            let owners = s.tables.owners().count();
            s.tables.bucket_hashes(sync::buckets_for(owners))
        };
        let members = self.swim.num_members() as u32;
        self.send_sync(to, &SyncMessage::Hello { hashes, members });
    }

    fn handle_sync(&mut self, from: Dest, m: SyncMessage) {
        match m {
            SyncMessage::Hello { hashes, members } => {
                self.on_hello(from, &hashes);
                if (members as usize) < self.swim.num_members() {
                    self.send_members(from);
                }
            }
            SyncMessage::Members { members } => self.on_members(&members),
            SyncMessage::Suspected { by, incarnation } => self.on_suspected(from, by, incarnation),
            SyncMessage::Digest { buckets, covered, summaries } => self.on_digest(from, buckets, &covered, &summaries),
            SyncMessage::Pull { wants } => self.on_pull(from, &wants),
            SyncMessage::Records { owner, epoch, from: start, upto, items } => {
                self.on_records(owner, epoch, start, upto, &items)
            }
        }
    }

    /// Sends the members this host holds active to a host that knows fewer (one that just
    /// started or rejoined): SWIM alone would introduce them only as they happen to call.
    fn send_members(&mut self, to: Dest) {
        let room = self.payload_max() - 16;
        let mut msgs = Vec::new();
        let (mut batch, mut size, mut total) = (Vec::new(), 0usize, 0usize);
        for m in self.swim.iter_members() {
            let info = MemberInfo { peer: m.id().peer(), incarnation: m.incarnation() };
            let len = postcard::to_stdvec(&info).map_or(usize::MAX, |v| v.len());
            if size + len > room && !batch.is_empty() {
                msgs.push(SyncMessage::Members { members: std::mem::take(&mut batch) });
                size = 0;
            }
            total += len;
            if total > self.config.sync_budget {
                break;
            }
            size += len;
            batch.push(info);
        }
        if !batch.is_empty() {
            msgs.push(SyncMessage::Members { members: batch });
        }
        for m in msgs {
            self.send_sync(to, &m);
        }
    }

    fn on_members(&mut self, members: &[MemberInfo]) {
        let known: Vec<Member<SwimId>> = {
            let s = lock(&self.shared);
            members
                .iter()
                .filter(|m| s.member(m.peer.node))
                .map(|m| Member::new(SwimId::from(&m.peer), m.incarnation, State::Alive))
                .collect()
        };
        counted(&self.shared, self.swim.apply_many(known.into_iter(), false, &mut self.outbox));
    }

    /// Another host suspects this one: refute (a higher incarnation), and tell it at once.
    fn on_suspected(&mut self, from: Dest, by: NodeId, incarnation: u16) {
        let me = self.swim.identity().clone();
        let refute =
            self.swim.apply_many(std::iter::once(Member::new(me, incarnation, State::Suspect)), true, &mut self.outbox);
        counted(&self.shared, refute);
        let by = SwimId { node: by, addr: from.addr.into(), generation: 0 };
        counted(&self.shared, self.swim.announce(by, &mut self.outbox));
    }

    fn payload_max(&self) -> usize {
        self.config.max_datagram - OVERHEAD
    }

    fn on_hello(&mut self, from: Dest, hashes: &[u64]) {
        let Ok(buckets) = u16::try_from(hashes.len()) else {
            lock(&self.shared).counters.rx_malformed += 1;
            return;
        };
        if buckets == 0 || buckets > 128 {
            lock(&self.shared).counters.rx_malformed += 1;
            return;
        }
        let room = self.payload_max() - 64 - 2 * usize::from(buckets);
        let digests: Vec<SyncMessage> = {
            let s = lock(&self.shared);
            let mine = s.tables.bucket_hashes(buckets);
            let differ: Vec<u16> = (0..buckets).filter(|b| mine[usize::from(*b)] != hashes[usize::from(*b)]).collect();
            if differ.is_empty() {
                return;
            }
            let mut by_bucket: HashMap<u16, Vec<Summary>> = HashMap::new();
            for (owner, position) in s.tables.positions() {
                let b = bucket(owner, buckets) as u16;
                if differ.contains(&b) {
                    by_bucket.entry(b).or_default().push(Summary { owner, position });
                }
            }
            // Start at a random differing bucket, so that all get their turn.
            let start = self.rng.random_range(0..differ.len());
            let mut msgs = Vec::new();
            let (mut covered, mut summaries, mut size) = (Vec::new(), Vec::new(), 0usize);
            for i in 0..differ.len() {
                let b = differ[(start + i) % differ.len()];
                let list = by_bucket.remove(&b).unwrap_or_default();
                let len: usize = list.iter().map(sync::summary_len).sum();
                if len > room {
                    // More owners in one bucket than a datagram holds (some buckets of a
                    // cluster near 10,000 hosts, whose epochs take 5 bytes): a stretch of its
                    // summaries from a random place, in a Digest of its own that covers no
                    // bucket. The member compares each summary it gets (and pulls or pushes
                    // what differs); only a covered bucket says "I have nobody else", so
                    // nothing is inferred from who is not in the stretch.
                    if msgs.len() < MAX_DIGESTS {
                        let from = self.rng.random_range(0..list.len());
                        let (mut part, mut used) = (Vec::new(), 0);
                        for s in list.iter().cycle().skip(from).take(list.len()) {
                            used += sync::summary_len(s);
                            if used > room {
                                break;
                            }
                            part.push(*s);
                        }
                        msgs.push(SyncMessage::Digest { buckets, covered: Vec::new(), summaries: part });
                    }
                    continue;
                }
                if size + len > room {
                    msgs.push(SyncMessage::Digest {
                        buckets,
                        covered: std::mem::take(&mut covered),
                        summaries: std::mem::take(&mut summaries),
                    });
                    size = 0;
                    if msgs.len() == MAX_DIGESTS {
                        break;
                    }
                }
                covered.push(b);
                summaries.extend(list);
                size += len;
            }
            if !covered.is_empty() && msgs.len() < MAX_DIGESTS {
                msgs.push(SyncMessage::Digest { buckets, covered, summaries });
            }
            msgs
        };
        for d in digests {
            self.send_sync(from, &d);
        }
    }

    fn on_digest(&mut self, from: Dest, buckets: u16, covered: &[u16], summaries: &[Summary]) {
        if buckets == 0 || buckets > 128 || covered.iter().any(|b| *b >= buckets) {
            lock(&self.shared).counters.rx_malformed += 1;
            return;
        }
        let (wants, pushes) = {
            let s = lock(&self.shared);
            // Every summary is compared; a covered bucket also says the sender has no other
            // owner in it (the loop after this one).
            let theirs: HashMap<NodeId, Position> = summaries.iter().map(|x| (x.owner, x.position)).collect();
            let me = s.tables.me();
            let known = |o: &NodeId| *o == me || s.directory.contains(*o);
            let mut wants = Vec::new();
            let mut pushes = Vec::new();
            for (&owner, &t) in theirs.iter().filter(|(o, _)| known(o)) {
                match s.tables.position(owner) {
                    None => wants.push(Want { owner, epoch: t.epoch, from: 0 }),
                    Some(m) if m.epoch < t.epoch => wants.push(Want { owner, epoch: t.epoch, from: 0 }),
                    Some(m) if m.epoch == t.epoch && m.watermark < t.watermark => {
                        wants.push(Want { owner, epoch: t.epoch, from: m.watermark })
                    }
                    Some(m) if m.epoch > t.epoch => pushes.push((owner, m.epoch, 0)),
                    Some(m) if m.epoch == t.epoch && m.watermark > t.watermark => {
                        pushes.push((owner, m.epoch, t.watermark))
                    }
                    Some(_) => {}
                }
            }
            for (owner, m) in s.tables.positions() {
                if covered.contains(&(bucket(owner, buckets) as u16)) && !theirs.contains_key(&owner) && known(&owner) {
                    pushes.push((owner, m.epoch, 0));
                }
            }
            (wants, pushes)
        };
        let per = (self.payload_max() - 16) / 32;
        for chunk in wants.chunks(per.max(1)) {
            self.send_sync(from, &SyncMessage::Pull { wants: chunk.to_vec() });
        }
        let mut budget = self.config.sync_budget;
        for (owner, epoch, start) in pushes {
            budget = self.send_records(from, owner, epoch, start, budget);
        }
    }

    fn on_pull(&mut self, from: Dest, wants: &[Want]) {
        let mut budget = self.config.sync_budget;
        for w in wants.iter().take(512) {
            let Some(m) = lock(&self.shared).tables.position(w.owner) else { continue };
            if m.epoch == w.epoch && m.watermark > w.from {
                budget = self.send_records(from, w.owner, m.epoch, w.from, budget);
            } else if m.epoch > w.epoch {
                budget = self.send_records(from, w.owner, m.epoch, 0, budget);
            }
        }
    }

    /// Sends `owner`'s records of `epoch` above `start`, in Records messages that each vouch
    /// for their stretch. Returns the budget left.
    fn send_records(&mut self, to: Dest, owner: NodeId, epoch: u64, start: u64, mut budget: usize) -> usize {
        let room = self.payload_max() - sync::RECORDS_OVERHEAD;
        let msgs: Vec<SyncMessage> = {
            let mut s = lock(&self.shared);
            let Some((records, watermark)) = s.tables.since(owner, epoch, start) else { return budget };
            let mut msgs = Vec::new();
            let (mut from, mut items, mut size, mut last) = (start, Vec::new(), 0usize, start);
            let (mut sent, mut complete) = (0u64, true);
            for r in records.into_iter().filter(|r| r.version <= watermark) {
                let len = r.wire().len() + 2;
                if size + len > room && !items.is_empty() {
                    msgs.push(SyncMessage::Records {
                        owner,
                        epoch,
                        from,
                        upto: last,
                        items: std::mem::take(&mut items),
                    });
                    from = last;
                    size = 0;
                }
                if budget < len {
                    complete = false;
                    break;
                }
                budget -= len;
                size += len;
                last = r.version;
                sent += 1;
                items.push(Bytes(r.wire().to_vec()));
            }
            // Past the last record sent, the stretch up to the watermark holds only versions
            // that later ones superseded: vouch for it too, if everything went.
            let upto = if complete { watermark } else { last };
            if upto > from || !items.is_empty() {
                msgs.push(SyncMessage::Records { owner, epoch, from, upto, items });
            }
            s.counters.sync_records_sent += sent;
            msgs
        };
        for m in msgs {
            self.send_sync(to, &m);
        }
        budget
    }

    fn on_records(&mut self, owner: NodeId, epoch: u64, start: u64, upto: u64, items: &[Bytes]) {
        let mut s = lock(&self.shared);
        if owner != s.tables.me() && !s.directory.contains(owner) {
            s.counters.records_unknown_owner += items.len() as u64;
            return;
        }
        if upto < start {
            s.counters.rx_malformed += 1;
            return;
        }
        let mut sound = true;
        for item in items {
            match Record::decode(&item.0) {
                Ok(r) if r.owner == owner && r.epoch == epoch && r.version > start && r.version <= upto => {}
                Ok(_) => {
                    s.counters.records_malformed += 1;
                    sound = false;
                    continue;
                }
                Err(_) => {
                    s.counters.records_malformed += 1;
                    sound = false;
                    continue;
                }
            }
            match s.accept(&item.0) {
                Ok((_, true)) => {
                    s.counters.sync_repaired += 1;
                    s.fresh = true;
                }
                Ok((_, false)) => {}
                Err(()) => sound = false,
            }
        }
        // A stretch with a bad record in it vouches for nothing.
        if sound && owner != s.tables.me() {
            s.tables.complete(owner, epoch, start, upto);
        }
    }

    fn send_sync(&mut self, to: Dest, m: &SyncMessage) {
        let mut payload = std::mem::take(&mut self.scratch);
        m.encode(&mut payload);
        let mut sealed = Vec::new();
        self.sealer.seal(to.node, Kind::Sync, &payload, &mut sealed);
        self.scratch = payload;
        self.pending_sends.push((to.node, sealed));
    }

    /// Moves what foca and the sync code produced into `out`, sealed; turns notifications
    /// into events.
    fn flush(&mut self, out: &mut Output) {
        let first = out.datagrams.len();
        let me = self.me();
        {
            // Where a host's gossip goes is the directory's word (Raft's), never what gossip
            // says: a member that speaks of itself or another at some other address (or of a
            // host no longer listed) redirects nothing to it.
            let mut s = lock(&self.shared);
            let s = &mut *s;
            for (to, data) in self.outbox.sends.drain(..) {
                // SWIM keeps this host's earlier lives (before a restart) that members still
                // speak of as down members, and announces to down members now and then: never
                // to itself.
                if to.node == me {
                    continue;
                }
                let Some(entry) = s.directory.get(to.node) else {
                    s.counters.tx_not_in_directory += 1;
                    continue;
                };
                let mut sealed = Vec::with_capacity(data.len() + OVERHEAD);
                self.sealer.seal(to.node, Kind::Swim, &data, &mut sealed);
                out.datagrams.push((entry.addr, sealed));
            }
            for (to, sealed) in self.pending_sends.drain(..) {
                match s.directory.get(to) {
                    Some(entry) => out.datagrams.push((entry.addr, sealed)),
                    None => s.counters.tx_not_in_directory += 1,
                }
            }
        }
        let life = self.life;
        out.timers.extend(self.outbox.timers.drain(..).map(|(d, t)| (d, Timer(TimerKind::Swim(life, t)))));
        out.events.append(&mut self.pending_events);
        out.timers.append(&mut self.pending_timers);
        let mut s = lock(&self.shared);
        s.counters.suspicions += std::mem::take(&mut self.outbox.suspicions);
        s.counters.refutations += std::mem::take(&mut self.outbox.refutations);
        for n in self.outbox.notes.drain(..) {
            match n {
                // A host outside the directory, which some member still vouches for: not
                // alive here (it is when the directory lists it, see `set_directory`).
                OwnedNotification::MemberUp(p) if !s.member(p.node) => {}
                OwnedNotification::MemberUp(p) if !self.live.contains_key(p.node) => {
                    out.events.push(Event::PeerUp(p.node));
                    self.live.insert(p.node, Life::of(&p));
                }
                OwnedNotification::MemberUp(p) => {
                    self.live.insert(p.node, Life::of(&p));
                }
                OwnedNotification::MemberDown(p) if self.live.get(p.node).is_some_and(|l| l.is(&p)) => {
                    self.live.remove(p.node);
                    out.events.push(Event::PeerDown(p.node));
                }
                OwnedNotification::Rename(old, new) if self.live.get(old.node).is_some_and(|l| l.is(&old)) => {
                    self.live.insert(new.node, Life::of(&new));
                }
                _ => {}
            }
        }
        out.events.extend(std::mem::take(&mut s.changed).into_iter().map(Event::Endpoints));
        let sent = &out.datagrams[first..];
        s.counters.tx_datagrams += sent.len() as u64;
        s.counters.tx_bytes += sent.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
    }

    /// Starts as part of a cluster that has converged: `members` are known alive and
    /// `records` (other hosts' signed records) are already in the replicas, nothing queued
    /// to gossip. For simulations that measure a running cluster, not its formation.
    pub fn warm_start(&mut self, members: &[Peer], records: &[Record], out: &mut Output) {
        let me = self.me();
        let peers = members.iter().filter(|p| p.node != me).map(|p| Member::alive(SwimId::from(p)));
        counted(&self.shared, self.swim.apply_many(peers, false, &mut self.outbox));
        {
            let mut s = lock(&self.shared);
            for r in records.iter().filter(|r| r.owner != me) {
                s.tables.apply(r.clone());
            }
            s.changed.clear();
        }
        self.flush(out);
    }

    /// Adds one of this host's endpoints without gossiping it (see [`GossipNode::warm_start`]).
    pub fn put_quietly(&mut self, key: EndpointKey, endpoint: Endpoint) -> Record {
        self.version += 1;
        let r = Record::sign(&self.signer, self.me(), self.epoch, self.version, Change::Put(key, endpoint));
        lock(&self.shared).tables.apply(r.clone());
        r
    }

    /// This host's own table, shared: for [`GossipNode::adopt_table`] on the other hosts of a
    /// simulation's warm start.
    pub fn own_table(&self) -> Arc<Replica> {
        let s = lock(&self.shared);
        s.tables.replica(s.tables.me()).unwrap_or_default()
    }

    /// Takes `owner`'s table as another host holds it (shared until either changes it), if
    /// this host holds none yet: what [`GossipNode::warm_start`] does with `owner`'s records.
    pub fn adopt_table(&mut self, owner: NodeId, table: Arc<Replica>) {
        lock(&self.shared).tables.adopt(owner, table);
    }

    /// This host's own records (its table as others should hold it).
    pub fn own_records(&self) -> Vec<Record> {
        let s = lock(&self.shared);
        let me = self.me();
        s.tables.since(me, self.epoch, 0).map(|(r, _)| r.into_iter().cloned().collect()).unwrap_or_default()
    }

    /// Whether `node` is alive (or suspected, not yet confirmed down) as this host sees it.
    pub fn is_alive(&self, node: NodeId) -> bool {
        node == self.me() || self.live.contains_key(node)
    }

    /// The hosts alive as this host sees it (itself not included).
    pub fn alive(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.live.keys()
    }

    /// Calls `f` with each live endpoint of `owner`'s table.
    pub fn for_each_endpoint(&self, owner: NodeId, mut f: impl FnMut(&EndpointKey, &Endpoint)) {
        let s = lock(&self.shared);
        for (k, e) in s.tables.endpoints(owner) {
            f(k, e);
        }
    }

    /// Where this host's replica of `owner`'s table stands.
    pub fn position(&self, owner: NodeId) -> Option<Position> {
        lock(&self.shared).tables.position(owner)
    }

    /// The counters.
    pub fn counters(&self) -> GossipCounters {
        lock(&self.shared).counters.clone()
    }

    /// Every host of the directory, as this host sees it (a host outside it is nothing here,
    /// whatever SWIM heard of it).
    pub fn peers(&self) -> Vec<PeerStatus> {
        let s = lock(&self.shared);
        let mut seen: HashMap<NodeId, PeerStatus> = HashMap::new();
        for m in self.swim.iter_membership_state() {
            let p = m.id();
            if !s.member(p.node) {
                continue;
            }
            let state = match m.state() {
                State::Alive => "alive",
                State::Suspect => "suspect",
                State::Down => "down",
            };
            let newer = seen.get(&p.node).is_none_or(|old| old.generation < p.generation);
            if newer {
                seen.insert(
                    p.node,
                    PeerStatus {
                        node: p.node,
                        state,
                        generation: p.generation,
                        incarnation: m.incarnation(),
                        table: None,
                        endpoints: 0,
                    },
                );
            }
        }
        for node in s.directory.iter().map(|(n, _)| n).filter(|n| *n != s.tables.me()) {
            seen.entry(node).or_insert(PeerStatus {
                node,
                state: "unknown",
                generation: 0,
                incarnation: 0,
                table: None,
                endpoints: 0,
            });
        }
        let mut out: Vec<PeerStatus> = seen
            .into_values()
            .map(|mut p| {
                p.table = s.tables.position(p.node);
                p.endpoints = s.tables.endpoints(p.node).count();
                p
            })
            .collect();
        out.sort_by_key(|p| p.node);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;

    use crate::gossip::seal::{self, KEY_LEN};

    const MS: Duration = Duration::from_millis(1);

    enum Pending {
        Datagram { from: usize, to: usize, data: Vec<u8> },
        Timer { host: usize, life: u32, timer: Timer },
    }

    /// A few hosts' nodes wired by hand: every datagram delivered 1 ms after it is sent (and
    /// kept in `wire`, as an eavesdropper on the underlay would), timers fired in order.
    struct Lab {
        key: [u8; KEY_LEN],
        signers: Vec<Vec<u8>>,
        nodes: Vec<GossipNode>,
        lives: Vec<u32>,
        now: Duration,
        queue: Vec<(Duration, u64, Pending)>,
        seq: u64,
        /// Every datagram delivered: (from, to, the sealed bytes).
        wire: Vec<(usize, usize, Vec<u8>)>,
        /// Datagrams from .0 to .1 are held back here instead of delivered.
        hold: Option<(usize, usize)>,
        held: Vec<Vec<u8>>,
        /// This host runs a release before the ring watch: ring datagrams to it are refused.
        before_ring: Option<usize>,
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1 + i as u8], 7946))
    }

    fn key(i: usize) -> EndpointKey {
        EndpointKey { vni: 4096, ip: std::net::Ipv4Addr::new(10, 0, 0, 2 + i as u8) }
    }

    fn endpoint(name: &str) -> Endpoint {
        Endpoint {
            mac: [2, 0, 0, 0, 0, 2],
            name: name.into(),
            aliases: Vec::new(),
            service: None,
            health: Default::default(),
        }
    }

    impl Lab {
        /// `n` hosts (node ids 1..=n) that know each other from the directory, run for 3 s.
        fn new(n: usize) -> Lab {
            Lab::with(n, None)
        }

        /// [`Lab::new`], host `before_ring` (if any) of a release before the ring watch.
        fn with(n: usize, before_ring: Option<usize>) -> Lab {
            let mut lab = Lab {
                key: GossipKey::generate(),
                signers: (0..n).map(|_| Signer::generate().pkcs8().to_vec()).collect(),
                nodes: Vec::new(),
                lives: vec![0; n],
                now: Duration::ZERO,
                queue: Vec::new(),
                seq: 0,
                wire: Vec::new(),
                hold: None,
                held: Vec::new(),
                before_ring,
            };
            for i in 0..n {
                let node = lab.boot(i, 1_000_000);
                lab.nodes.push(node);
            }
            for i in 0..n {
                lab.start(i);
            }
            lab.run(Duration::from_secs(3));
            lab
        }

        fn boot(&mut self, i: usize, generation: u64) -> GossipNode {
            let me = Peer { node: i as NodeId + 1, addr: addr(i), generation };
            let signer = Signer::from_pkcs8(&self.signers[i]).unwrap();
            let config = GossipConfig { cluster_size: self.signers.len() as u32, ..GossipConfig::default() };
            GossipNode::new(me, config, GossipKey::new(&self.key), signer, generation, 7 + i as u64)
        }

        fn start(&mut self, i: usize) {
            let directory: Vec<(NodeId, DirectoryEntry)> = (0..self.signers.len())
                .map(|j| {
                    let public_key = Signer::from_pkcs8(&self.signers[j]).unwrap().public_key();
                    (j as NodeId + 1, DirectoryEntry { public_key, addr: addr(j) })
                })
                .collect();
            let mut out = Output::default();
            self.nodes[i].start(&mut out);
            self.nodes[i].set_directory(directory, &mut out);
            self.dispatch(i, out);
        }

        /// Host `i` starts again, in `generation`.
        fn restart(&mut self, i: usize, generation: u64) {
            self.nodes[i] = self.boot(i, generation);
            self.lives[i] += 1;
            self.start(i);
        }

        fn dispatch(&mut self, i: usize, out: Output) {
            for (after, timer) in out.timers {
                self.seq += 1;
                self.queue.push((self.now + after, self.seq, Pending::Timer { host: i, life: self.lives[i], timer }));
            }
            for (to, data) in out.datagrams {
                let to = (0..self.nodes.len()).find(|j| addr(*j) == to).expect("a lab address");
                if self.hold == Some((i, to)) {
                    self.held.push(data);
                    continue;
                }
                let ring = || GossipKey::new(&self.key).open(&mut data.clone()).is_ok_and(|o| o.kind == Kind::Ring);
                if self.before_ring == Some(to) && ring() {
                    continue;
                }
                self.seq += 1;
                self.queue.push((self.now + MS, self.seq, Pending::Datagram { from: i, to, data }));
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            loop {
                self.queue.sort_by_key(|(at, seq, _)| Reverse((*at, *seq)));
                match self.queue.last() {
                    Some((at, _, _)) if *at <= end => {}
                    _ => break,
                }
                let (at, _, p) = self.queue.pop().unwrap();
                self.now = at;
                match p {
                    Pending::Datagram { from, to, data } => {
                        self.wire.push((from, to, data.clone()));
                        let out = self.deliver(from, to, data);
                        self.dispatch(to, out);
                    }
                    Pending::Timer { host, life, timer } if life == self.lives[host] => {
                        let mut out = Output::default();
                        self.nodes[host].handle_timer(at, timer, &mut out);
                        self.dispatch(host, out);
                    }
                    Pending::Timer { .. } => {}
                }
            }
            self.now = end;
        }

        /// Hands host `to` the bytes `data` now, from host `from`'s address; returns what it
        /// produced (not dispatched).
        fn deliver(&mut self, from: usize, to: usize, mut data: Vec<u8>) -> Output {
            let mut out = Output::default();
            self.nodes[to].handle_datagram(self.now, addr(from), &mut data, &mut out);
            out
        }

        fn put(&mut self, i: usize, k: EndpointKey, name: &str) {
            let mut out = Output::default();
            self.nodes[i].put(k, endpoint(name), &mut out);
            self.dispatch(i, out);
        }

        /// What `from` sent `to` so far, as it went over the wire.
        fn captured(&self, from: usize, to: usize) -> Vec<Vec<u8>> {
            self.wire.iter().filter(|(f, t, _)| (*f, *t) == (from, to)).map(|(_, _, d)| d.clone()).collect()
        }

        fn endpoints(&self, i: usize, owner: usize) -> Vec<EndpointKey> {
            let mut v = Vec::new();
            self.nodes[i].for_each_endpoint(owner as NodeId + 1, |k, _| v.push(*k));
            v
        }
    }

    /// What host `to` made of datagrams replayed to it.
    struct Replayed {
        /// Deliveries that produced anything (datagrams, timers, events).
        answered: usize,
        /// Datagrams they produced.
        replies: usize,
        before: GossipCounters,
        after: GossipCounters,
    }

    impl Replayed {
        /// How much counter `field` of host `to` grew.
        fn grew(&self, field: impl Fn(&GossipCounters) -> u64) -> u64 {
            field(&self.after) - field(&self.before)
        }
    }

    impl Lab {
        /// Hands each of `datagrams` to host `to`, `times` over, from host `from`'s address.
        fn replay(&mut self, from: usize, to: usize, datagrams: &[Vec<u8>], times: usize) -> Replayed {
            let before = self.nodes[to].counters();
            let (mut answered, mut replies) = (0, 0);
            for _ in 0..times {
                for d in datagrams {
                    let out = self.deliver(from, to, d.clone());
                    answered +=
                        usize::from(!(out.datagrams.is_empty() && out.timers.is_empty() && out.events.is_empty()));
                    replies += out.datagrams.len();
                }
            }
            Replayed { answered, replies, before, after: self.nodes[to].counters() }
        }
    }

    /// Issue 12, item 7: every datagram one host sent another, captured and replayed to the
    /// receiver 50 times over, is refused: nothing applied, nothing answered.
    #[test]
    fn captured_datagrams_replayed_to_their_receiver_are_refused_and_never_answered() {
        let mut lab = Lab::new(2);
        lab.put(0, key(0), "web");
        lab.put(0, key(1), "db");
        lab.run(Duration::from_secs(3));
        assert_eq!(lab.endpoints(1, 0), vec![key(0), key(1)]);
        let captured = lab.captured(0, 1);
        assert!(captured.len() > 10, "{} datagrams", captured.len());
        let peers = lab.nodes[1].peers();
        let r = lab.replay(0, 1, &captured, 50);
        let replays = 50 * captured.len() as u64;
        let (answered, replies) = (r.answered, r.replies);
        assert_eq!(
            (answered, replies),
            (0, 0),
            "of {replays} replays, {answered} were acted on, with {replies} replies"
        );
        assert_eq!(r.grew(|c| c.rx_datagrams), replays);
        assert_eq!(r.grew(|c| c.rx_replayed), replays, "{:?}", r.after);
        let unchanged = |c: &GossipCounters| (c.records_applied, c.records_stale, c.sync_repaired, c.tx_datagrams);
        assert_eq!(unchanged(&r.after), unchanged(&r.before), "{:?}", r.after);
        assert_eq!(lab.nodes[1].peers(), peers);
        // The cluster goes on as before.
        lab.run(Duration::from_secs(3));
        assert!(lab.nodes[1].is_alive(1) && lab.nodes[0].is_alive(2));
    }

    /// Two endpoint changes of host 0 held back on their way to host 1, then delivered in the
    /// reverse order: both are taken.
    #[test]
    fn datagrams_reordered_within_the_window_are_taken() {
        let mut lab = Lab::new(2);
        lab.hold = Some((0, 1));
        lab.put(0, key(0), "web");
        lab.put(0, key(1), "db");
        lab.hold = None;
        let held = std::mem::take(&mut lab.held);
        assert!(held.len() >= 2, "{}", held.len());
        let before = lab.nodes[1].counters();
        for d in held.iter().rev() {
            let out = lab.deliver(0, 1, d.clone());
            lab.dispatch(1, out);
        }
        let after = lab.nodes[1].counters();
        assert_eq!((after.rx_replayed, after.rx_stale_generation), (before.rx_replayed, before.rx_stale_generation));
        assert_eq!(after.records_applied - before.records_applied, 2, "{after:?}");
        assert_eq!(lab.endpoints(1, 0), vec![key(0), key(1)]);
    }

    /// A datagram held back while its sender sealed more than a window of others is refused
    /// when it finally arrives: too old to tell from a replay.
    #[test]
    fn a_datagram_older_than_the_window_is_refused() {
        let mut lab = Lab::new(2);
        lab.hold = Some((0, 1));
        lab.put(0, key(0), "web");
        lab.hold = None;
        let late = lab.held.pop().expect("a held datagram");
        // Host 0 talks to others meanwhile (made up here: sealed, never sent).
        for _ in 0..super::super::replay::WINDOW {
            lab.nodes[0].seal(3, Kind::Sync, b"elsewhere");
        }
        lab.put(0, key(1), "db");
        lab.run(Duration::from_millis(10));
        let r = lab.replay(0, 1, &[late], 1);
        assert_eq!((r.answered, r.grew(|c| c.rx_replayed)), (0, 1), "{:?}", r.after);
        assert_eq!(r.grew(|c| c.records_applied), 0);
    }

    /// The sender restarts (a new generation): its new life is heard, and what it sent in the
    /// old one is refused from then on, never answered.
    #[test]
    fn a_restarted_senders_earlier_life_is_refused() {
        let mut lab = Lab::new(2);
        let old_life = lab.captured(0, 1);
        lab.restart(0, 2_000_000);
        lab.put(0, key(2), "after");
        let heard_before = lab.nodes[1].counters().rx_datagrams;
        lab.run(Duration::from_secs(3));
        assert!(lab.nodes[1].counters().rx_datagrams > heard_before);
        assert_eq!(lab.endpoints(1, 0), vec![key(2)], "the new life was taken");
        assert!(lab.nodes[1].peers().iter().any(|p| p.node == 1 && p.generation >= 2_000_000));
        let r = lab.replay(0, 1, &old_life, 1);
        assert_eq!((r.answered, r.grew(|c| c.rx_stale_generation)), (0, old_life.len() as u64), "{:?}", r.after);
        assert_eq!(lab.endpoints(1, 0), vec![key(2)]);
    }

    /// Found by the `gossip_datagram` fuzz target: a member speaks of this host's earlier life
    /// (a generation before a restart) as alive. SWIM records that life as down, and announces
    /// now and then to down members, so this host sent datagrams to itself. It sends none.
    #[test]
    fn a_host_never_sends_to_an_earlier_life_of_its_own() {
        let mut lab = Lab::new(3);
        let me = lab.nodes[0].identity();
        // Host 3 tells host 1 that host 1's earlier life is alive.
        lab.gossip_alive(2, 0, Peer { generation: me.generation - 1, ..me });
        lab.run(Duration::from_secs(20));
        let to_itself = lab.wire.iter().filter(|(from, to, _)| from == to).count();
        assert_eq!(to_itself, 0, "datagrams host 1 sent itself");
        assert_eq!(lab.nodes[0].counters().rx_misdirected, 0);
        assert!((2..=3).all(|n| lab.nodes[0].is_alive(n)), "{:?}", lab.nodes[0].peers());
    }

    /// Found by the `gossip_datagram` fuzz target: a member speaks of another member (or of
    /// itself) as alive at an address that is not the directory's. SWIM took the address
    /// from that identity and sent there, so any member could point the others' gossip at
    /// any address. Every datagram now goes to its receiver's address in the directory (the
    /// lab panics on any other address).
    #[test]
    fn gossip_goes_to_the_directorys_address_whatever_members_say() {
        let mut lab = Lab::new(3);
        let elsewhere = SocketAddr::from(([127, 0, 0, 99], 9));
        for (i, node) in [(1, 2), (2, 3)] {
            // Host 3 tells host 1 that host 2, then host 3 itself, is alive in a newer life at
            // an address nobody listed.
            let real = lab.nodes[i].identity();
            assert_eq!(real.node, node);
            lab.gossip_alive(2, 0, Peer { addr: elsewhere, generation: real.generation + 1, ..real });
        }
        let before = lab.wire.len();
        lab.run(Duration::from_secs(20));
        let to = |j| lab.wire[before..].iter().filter(|(f, t, _)| *f == 0 && *t == j).count();
        assert!(to(1) > 0 && to(2) > 0, "host 1 still gossips with hosts 2 and 3");
        assert_eq!(lab.nodes[0].counters().tx_not_in_directory, 0);
    }

    /// What host 0 sent host 1, replayed to host 2: sealed for another host, refused.
    #[test]
    fn a_datagram_sealed_for_another_host_is_refused() {
        let mut lab = Lab::new(3);
        let captured = lab.captured(0, 1);
        assert!(!captured.is_empty());
        let r = lab.replay(0, 2, &captured, 1);
        assert_eq!((r.answered, r.grew(|c| c.rx_misdirected)), (0, captured.len() as u64), "{:?}", r.after);
        assert_eq!(r.grew(|c| c.rx_replayed), 0);
    }

    impl Lab {
        /// Host `i`'s directory without the hosts in `without`.
        fn set_directory(&mut self, i: usize, without: &[usize]) {
            let directory: Vec<(NodeId, DirectoryEntry)> = (0..self.signers.len())
                .filter(|j| !without.contains(j))
                .map(|j| {
                    let public_key = Signer::from_pkcs8(&self.signers[j]).unwrap().public_key();
                    (j as NodeId + 1, DirectoryEntry { public_key, addr: addr(j) })
                })
                .collect();
            let mut out = Output::default();
            self.nodes[i].set_directory(directory, &mut out);
            self.dispatch(i, out);
        }

        fn rotate(&mut self, i: usize, key: [u8; KEY_LEN]) {
            let mut out = Output::default();
            self.nodes[i].rotate_key(GossipKey::new(&key), &mut out);
            self.dispatch(i, out);
        }

        /// Host `from`'s SWIM gossip to host `to`, sealed as `from` seals and delivered, with
        /// one membership update: `member` is alive.
        fn gossip_alive(&mut self, from: usize, to: usize, member: Peer) {
            use foca::{Codec as _, Header, Message};
            let (src, dst) = (self.nodes[from].identity(), self.nodes[to].identity());
            let mut payload = Vec::new();
            let header = Header { src, src_incarnation: 0, dst, message: Message::Gossip };
            PostcardCodec.encode_header(&header, &mut payload).unwrap();
            payload.extend_from_slice(&1u16.to_be_bytes());
            PostcardCodec.encode_member(&Member::alive(member), &mut payload).unwrap();
            let sealed = self.nodes[from].seal(to as NodeId + 1, Kind::Swim, &payload);
            let out = self.deliver(from, to, sealed);
            self.dispatch(to, out);
        }

        fn listed(&self, i: usize, node: NodeId) -> bool {
            self.nodes[i].peers().iter().any(|p| p.node == node)
        }
    }

    /// Issue 12, item 2: a host removed from the others' directories keeps running and
    /// talking, and is never alive to them again: its datagrams are refused before SWIM sees
    /// them, and what the members still say of it does not bring it back.
    #[test]
    fn a_host_out_of_the_directory_is_refused_and_never_alive_again() {
        let mut lab = Lab::new(3);
        assert!(lab.nodes[0].is_alive(3) && lab.nodes[1].is_alive(3));
        lab.put(2, key(2), "still-here");
        // Host 1 learns of the removal a second after host 0 (and vouches for host 2 meanwhile).
        lab.set_directory(0, &[2]);
        lab.run(Duration::from_secs(1));
        lab.set_directory(1, &[2]);
        lab.run(Duration::from_secs(10));
        for i in [0, 1] {
            assert!(!lab.nodes[i].is_alive(3), "host {i} counts the removed host alive");
            assert!(!lab.listed(i, 3), "host {i} lists the removed host: {:?}", lab.nodes[i].peers());
            assert!(lab.endpoints(i, 2).is_empty(), "host {i} holds the removed host's endpoints");
            assert!(lab.nodes[i].counters().rx_unknown_sender > 0, "{:?}", lab.nodes[i].counters());
        }
        assert!(lab.nodes[0].is_alive(2) && lab.nodes[1].is_alive(1), "the members still see each other");
        // The removed host itself sees nobody any more.
        assert!(!lab.nodes[2].is_alive(1) && !lab.nodes[2].is_alive(2));
    }

    /// Issue 12, item 2: the cluster key is rotated on every host, not at once; no datagram
    /// between members is refused meanwhile, and after the changeover the old key opens
    /// nothing.
    #[test]
    fn a_key_rotation_cuts_no_member_off_and_then_the_old_key_opens_nothing() {
        let mut lab = Lab::new(3);
        let new = GossipKey::generate();
        let before: Vec<GossipCounters> = lab.nodes.iter().map(GossipNode::counters).collect();
        lab.rotate(0, new);
        lab.run(Duration::from_millis(700));
        lab.rotate(1, new);
        lab.run(Duration::from_millis(300));
        lab.rotate(2, new);
        lab.put(0, key(0), "during");
        lab.run(Duration::from_secs(8));
        for (i, (node, before)) in lab.nodes.iter().zip(&before).enumerate() {
            let c = node.counters();
            assert_eq!(c.rx_bad_auth, before.rx_bad_auth, "host {i} refused a member's datagram: {c:?}");
            assert!((1..=3).all(|n| node.is_alive(n)), "host {i}: {:?}", node.peers());
        }
        assert_eq!(lab.endpoints(2, 0), vec![key(0)]);
        // Sealed with the old key by a holder of it, as a member: refused now.
        let old = GossipKey::new(&lab.key);
        let header = seal::Header { sender: 2, generation: 1_000_000, counter: 1 << 40, receiver: 1 };
        let mut forged = Vec::new();
        old.seal(&header, Kind::Sync, b"x", &mut forged);
        let r = lab.replay(1, 0, &[forged], 1);
        assert_eq!((r.answered, r.grew(|c| c.rx_bad_auth)), (0, 1), "{:?}", r.after);
        // What the hosts seal now opens under the new key only.
        let sent = lab.captured(0, 1).pop().unwrap();
        assert!(GossipKey::new(&new).open(&mut sent.clone()).is_ok());
        assert_eq!(old.open(&mut sent.clone()), Err(SealError::BadAuth));
    }

    /// Issue 17, item 6 (metrics): a host whose answers are lost is suspected by the prober,
    /// refutes once it hears of it, and stays alive; each side counts its part.
    #[test]
    fn a_suspicion_and_its_refutation_are_counted() {
        let mut lab = Lab::new(2);
        for node in &lab.nodes {
            let c = node.counters();
            assert_eq!((c.suspicions, c.refutations), (0, 0), "a healthy cluster: {c:?}");
        }
        // Host 1's datagrams to host 0 are lost for a while (shorter than it takes to be
        // declared down): host 0's probes of it go unanswered.
        lab.hold = Some((1, 0));
        lab.run(Duration::from_millis(1200));
        lab.hold = None;
        lab.run(Duration::from_secs(3));
        let (prober, suspect) = (lab.nodes[0].counters(), lab.nodes[1].counters());
        assert!(prober.suspicions >= 1, "{prober:?}");
        assert!(suspect.refutations >= 1, "{suspect:?}");
        // In a ring of two the lost direction also carries host 2's ring pings of host 1:
        // host 2's ring watch suspects host 1 in turn, which refutes too.
        assert!(suspect.ring_suspicions >= 1 && prober.refutations >= 1, "{prober:?} {suspect:?}");
        assert_eq!((prober.rebirths, suspect.rebirths), (0, 0), "{prober:?} {suspect:?}");
        assert!(lab.nodes[0].is_alive(2), "the suspect refuted in time: {:?}", lab.nodes[0].peers());
        assert!(lab.nodes[1].is_alive(1), "the prober refuted in time: {:?}", lab.nodes[1].peers());
    }

    impl Lab {
        /// The ring datagrams delivered so far: (from, to, the message).
        fn ring_messages(&self) -> Vec<(usize, usize, RingMessage)> {
            let key = GossipKey::new(&self.key);
            self.wire
                .iter()
                .filter_map(|(from, to, d)| {
                    let mut d = d.clone();
                    let opened = key.open(&mut d).ok()?;
                    let m = RingMessage::decode(opened.payload).filter(|_| opened.kind == Kind::Ring)?;
                    Some((*from, *to, m))
                })
                .collect()
        }

        /// The ring datagrams of the next `span` (what went before is forgotten).
        fn ring_messages_over(&mut self, span: Duration) -> Vec<(usize, usize, RingMessage)> {
            self.wire.clear();
            self.run(span);
            self.ring_messages()
        }
    }

    /// Each host pings its successor by node id (the last one the first) once a probe
    /// period, is answered at the first try, and suspects nobody.
    #[test]
    fn every_host_pings_its_ring_successor_each_period_and_is_answered() {
        let mut lab = Lab::new(3);
        let ring = lab.ring_messages_over(Duration::from_secs(4));
        for i in 0..3 {
            let next = (i + 1) % 3;
            let pings = ring.iter().filter(|(f, _, m)| *f == i && matches!(m, RingMessage::Ping(_))).count();
            assert_eq!(pings, 10, "host {i}: one ping a period");
            let strays = ring.iter().filter(|(f, t, m)| *f == i && *t != next && matches!(m, RingMessage::Ping(_)));
            assert_eq!(strays.count(), 0, "host {i} pings only its successor");
            let acks = ring.iter().filter(|(f, t, m)| (*f, *t) == (next, i) && matches!(m, RingMessage::Ack(_)));
            assert_eq!(acks.count(), pings, "host {next} answers each");
            let c = lab.nodes[i].counters();
            assert_eq!(c.ring_acks, c.ring_pings, "{c:?}");
            assert_eq!((c.ring_suspicions, c.ring_unproven, c.suspicions, c.rx_malformed), (0, 0, 0, 0), "{c:?}");
        }
    }

    /// A ring of two: each watches the other. Alone: nobody to ping.
    #[test]
    fn in_a_ring_of_two_each_watches_the_other_and_one_alone_pings_nobody() {
        let mut lab = Lab::new(2);
        let ring = lab.ring_messages_over(Duration::from_secs(2));
        for (i, other) in [(0, 1), (1, 0)] {
            let pings = ring.iter().filter(|(f, t, m)| (*f, *t) == (i, other) && matches!(m, RingMessage::Ping(_)));
            assert_eq!(pings.count(), 5, "host {i}");
        }
        let alone = Lab::new(1);
        assert_eq!(alone.nodes[0].counters().ring_pings, 0);
        assert!(alone.ring_messages().is_empty());
    }

    /// A successor whose answers are lost is suspected by its ring predecessor after the
    /// period's tries (within a period and the RTT), hears of it at once, refutes, and stays
    /// alive once its datagrams get through again.
    #[test]
    fn a_silent_successor_is_suspected_within_a_period_and_the_rtt_and_refutes() {
        let mut lab = Lab::new(3);
        let config = GossipConfig::default();
        let t0 = lab.now;
        // Host 2 (index 1), host 1's successor, is heard by nobody's host 1 from now on.
        lab.hold = Some((1, 0));
        while lab.nodes[0].counters().ring_suspicions == 0 && lab.now < t0 + Duration::from_secs(2) {
            lab.run(5 * MS);
        }
        let took = lab.now - t0;
        assert!(took <= config.probe_period + config.probe_rtt + 5 * MS, "suspected after {took:?}");
        assert_eq!(lab.nodes[0].peers()[0].state, "suspect");
        // Told directly (host 1's datagrams to host 2 get through): refuted at once.
        lab.run(10 * MS);
        assert!(lab.nodes[1].counters().refutations >= 1, "{:?}", lab.nodes[1].counters());
        lab.run(Duration::from_millis(600));
        lab.hold = None;
        lab.run(Duration::from_secs(4));
        for (i, node) in lab.nodes.iter().enumerate() {
            assert!((1..=3).all(|n| node.is_alive(n)), "host {i}: {:?}", node.peers());
            assert_eq!(node.counters().rebirths, 0);
        }
        assert_eq!(lab.nodes[0].counters().ring_suspicions, 1, "{:?}", lab.nodes[0].counters());
    }

    /// A one-way fault: host 1 never hears its ring successor (host 2), which the others hear
    /// and which hears everyone. Suspected once, it refutes through the others, and the ring
    /// watch leaves it to SWIM's probes (whose indirect ones go around the fault) instead of
    /// suspecting it again every suspicion's length, each time costing the cluster a
    /// suspicion and a refutation and host 2 an incarnation.
    #[test]
    fn a_member_behind_a_one_way_fault_is_suspected_once_not_every_period() {
        let mut lab = Lab::new(3);
        lab.hold = Some((1, 0));
        lab.run(Duration::from_secs(30));
        let watcher = lab.nodes[0].counters();
        assert_eq!(watcher.ring_suspicions, 1, "{watcher:?}");
        assert!(watcher.ring_unproven >= 60, "its silences counted: {watcher:?}");
        let refutations = lab.nodes[1].counters().refutations;
        assert!(refutations <= 3, "host 2 refuted {refutations} times in 30 s");
        for (i, node) in lab.nodes.iter().enumerate() {
            assert!((1..=3).all(|n| node.is_alive(n)), "host {i}: {:?}", node.peers());
        }
        // The path heals: host 2 answers, and the ring watches it again.
        lab.hold = None;
        lab.run(Duration::from_secs(2));
        let before = lab.nodes[0].counters().ring_acks;
        lab.run(Duration::from_secs(2));
        assert!(lab.nodes[0].counters().ring_acks > before);
    }

    /// A successor of an earlier release, which refuses ring pings and never answers one, is
    /// not suspected for its silence (a cluster being upgraded stays quiet): its silences
    /// are counted, and SWIM's probes watch it as before.
    #[test]
    fn a_successor_that_never_answered_a_ring_ping_is_not_suspected() {
        let mut lab = Lab::with(3, Some(1));
        lab.run(Duration::from_secs(4));
        let c = lab.nodes[0].counters();
        assert!(c.ring_unproven >= 15, "a silence counted each period: {c:?}");
        assert_eq!((c.ring_acks, c.ring_suspicions), (0, 0), "{c:?}");
        for (i, node) in lab.nodes.iter().enumerate() {
            let c = node.counters();
            assert_eq!((c.ring_suspicions, c.refutations, c.rebirths), (0, 0, 0), "host {i}: {c:?}");
            assert!((1..=3).all(|n| node.is_alive(n)), "host {i}: {:?}", node.peers());
        }
    }

    /// SWIM's compact identity travels exactly as a `Peer`, so hosts that keep either hear
    /// each other.
    #[test]
    fn a_swim_identity_is_small_and_encodes_as_a_peer() {
        assert_eq!(std::mem::size_of::<SwimId>(), 32);
        assert_eq!(std::mem::size_of::<Member<SwimId>>(), 40);
        for addr in ["10.1.2.3:7946", "[fd00::1:2]:7946"] {
            let peer = Peer { node: 300, addr: addr.parse().unwrap(), generation: 1_700_000_000_000_000 };
            let id = SwimId::from(&peer);
            let wire = postcard::to_stdvec(&peer).unwrap();
            assert_eq!(postcard::to_stdvec(&id).unwrap(), wire, "{addr}");
            assert_eq!(postcard::from_bytes::<SwimId>(&wire).unwrap(), id);
            assert_eq!(id.peer(), peer);
            let later = foca::Identity::renew(&id).unwrap();
            assert_eq!(later.peer(), Peer { generation: peer.generation + 1, ..peer });
            assert!(Life::of(&id).is(&id) && !Life::of(&later).is(&id));
        }
    }

    #[test]
    fn records_too_big_to_piggyback_are_counted() {
        let me = Peer { node: 1, addr: "127.0.0.1:7946".parse().unwrap(), generation: 0 };
        // Datagrams with room for SWIM's own messages but not for a signed record.
        let config = GossipConfig { max_datagram: OVERHEAD + 64, ..GossipConfig::default() };
        let mut node = GossipNode::new(me, config, GossipKey::new(&GossipKey::generate()), Signer::generate(), 1, 7);
        let mut out = Output::default();
        node.start(&mut out);
        let key = EndpointKey { vni: 4096, ip: "10.0.0.2".parse().unwrap() };
        node.put(
            key,
            Endpoint {
                mac: [2, 0, 0, 0, 0, 2],
                name: "web".into(),
                aliases: Vec::new(),
                service: None,
                health: Default::default(),
            },
            &mut out,
        );
        let c = node.counters();
        assert_eq!(c.records_not_piggybacked, 2, "the epoch record and the put: {c:?}");
        assert_eq!(c.swim_unexpected, 0, "{c:?}");
        assert_eq!(node.own_records().len(), 2, "both stay in the table, for anti-entropy");
    }
}
