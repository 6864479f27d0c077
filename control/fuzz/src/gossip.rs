//! A receiving gossip node, host 1 of a three-host cluster (hosts 2 and 3 in its directory,
//! host 9 outside it), driven by a script of [`Step`]s read from the fuzzer's bytes: raw
//! datagrams, payloads sealed as the cluster's hosts seal them (so that SWIM and anti-entropy
//! decode what the fuzzer wrote, past the envelope), anti-entropy records re-signed by their
//! owners (so that they are applied, past the signature), datagrams under any header, and the
//! timers the node arms. Everything goes through [`GossipNode::handle_datagram`] and
//! [`GossipNode::handle_timer`], the calls the agent's gossip task makes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use control::gossip::record::{Change, Record};
use control::gossip::seal::{self, Header, Kind, Sealer};
use control::gossip::sync::SyncMessage;
use control::gossip::{
    DirectoryEntry, Endpoint, EndpointKey, Event, GossipConfig, GossipKey, GossipNode, Output, Peer, Signer, Timer,
};
use control::state::NodeId;

use crate::Input;

/// The cluster's gossip key.
pub const CLUSTER_KEY: [u8; seal::KEY_LEN] = *b"overlayd fuzz cluster gossip key";
/// The generation (epoch) every host of the script runs in.
pub const GENERATION: u64 = 1_700_000_000_000_000;
/// The receiving host.
pub const ME: NodeId = 1;
/// The hosts of its directory.
pub const MEMBERS: [NodeId; 2] = [2, 3];
/// A host outside it (that holds the key: removed, or not yet listed).
pub const STRANGER: NodeId = 9;
/// Most timers one [`Step::Timers`] fires.
const MAX_FIRED: usize = 32;

/// The signing keys of hosts 1, 2 and 3 (PKCS#8), fixed so that every run signs alike.
const SIGNERS: [&str; 3] = [
    "3051020101300506032b657004220420d688e769a2862af5fd20d6692df2db17340d99ab0fb939be925811efbf36229d812100c26f61b0a9f4a38f187a54cd5c375471018a79d7c935f8a44653759bdab274f3",
    "3051020101300506032b6570042204207a202d65eb8181778fb115d297f5f999817505c8d1a6160f330064f0f04ce114812100b051b10dfb7ad36f352fe3b4064eed82a1bd71d7757e272588d1bad8bd008832",
    "3051020101300506032b65700422042035e17855a9ac0295813e93b25681765e6cd8c06991439d9a0bd859ae6058dad881210015593ada663beb3cb82b7a6b88a3737dc8a963dc3a706ef9db90848479732dc3",
];

/// Host `node`'s signing key (hosts 1 to 3).
pub fn signer(node: NodeId) -> Signer {
    let doc = hex::decode(SIGNERS[node as usize - 1]).expect("hex");
    Signer::from_pkcs8(&doc).expect("a valid key")
}

static MEMBER_SIGNERS: LazyLock<[Signer; 2]> = LazyLock::new(|| MEMBERS.map(signer));

/// Host `node`'s gossip address.
pub fn addr(node: NodeId) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 18, 0, node as u8), control::gossip::DEFAULT_PORT))
}

/// Host `node`'s identity in SWIM.
pub fn peer(node: NodeId) -> Peer {
    Peer { node, addr: addr(node), generation: GENERATION }
}

/// The directory every host of the script has: hosts 1 to 3.
pub fn directory() -> Vec<(NodeId, DirectoryEntry)> {
    (1..=3).map(|n| (n, DirectoryEntry { public_key: signer(n).public_key(), addr: addr(n) })).collect()
}

/// The settings every host of the script runs with.
pub fn config() -> GossipConfig {
    GossipConfig { cluster_size: 3, ..GossipConfig::default() }
}

/// Host `owner`'s `n`th endpoint.
pub fn endpoint(owner: NodeId, n: u8) -> (EndpointKey, Endpoint) {
    let ip = Ipv4Addr::new(10, 128, owner as u8, n);
    let o = ip.octets();
    (
        EndpointKey { vni: 4096, ip },
        Endpoint {
            mac: [2, 0x4f, o[0], o[1], o[2], o[3]],
            name: format!("c{owner}-{n}"),
            aliases: Vec::new(),
            service: None,
            health: Default::default(),
        },
    )
}

/// Host 2's table as host 1 holds it when the script starts: its epoch, three puts, a delete.
pub fn member_records() -> Vec<Record> {
    let s = &MEMBER_SIGNERS[0];
    let mut v = vec![Record::sign(s, 2, GENERATION, 1, Change::Epoch)];
    for n in 2..5u8 {
        let (k, e) = endpoint(2, n);
        v.push(Record::sign(s, 2, GENERATION, u64::from(n), Change::Put(k, e)));
    }
    v.push(Record::sign(s, 2, GENERATION, 5, Change::Delete(endpoint(2, 3).0)));
    v
}

/// Who a step's datagram is from, by the byte that picks it.
pub fn sender(pick: u8) -> NodeId {
    [MEMBERS[0], MEMBERS[1], STRANGER, ME][usize::from(pick % 4)]
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// These bytes arrive as they are, from host 2's address.
    Raw(Vec<u8>),
    /// A payload of `kind` sealed as host `sender(from)` seals its next datagram to host 1.
    Sealed {
        /// Picks the sender (see [`sender`]).
        from: u8,
        /// SWIM, anti-entropy or ring watch.
        kind: Kind,
        /// What it carries.
        payload: Vec<u8>,
    },
    /// An anti-entropy payload whose records (of a `Records` message) are signed again by
    /// their owner, if it is host 2 or 3, then sealed as in [`Step::Sealed`].
    Resigned {
        /// Picks the sender (see [`sender`]).
        from: u8,
        /// The anti-entropy message.
        payload: Vec<u8>,
    },
    /// A payload sealed under the cluster key with any header.
    Header {
        /// Picks the sender (see [`sender`]).
        from: u8,
        /// Picks the receiver (see [`sender`]).
        to: u8,
        /// The sender's generation: 0 its own, 1 an earlier one, 2 a later one, else this.
        generation: u64,
        /// The datagram's number.
        counter: u64,
        /// SWIM, anti-entropy or ring watch.
        kind: Kind,
        /// What it carries.
        payload: Vec<u8>,
    },
    /// Time passes (`(ticks + 1) * 5` ms) and the timers due fire.
    Timers(u8),
    /// Host 1 adds (or replaces) its own endpoint `n`.
    Put(u8),
    /// Host 1 removes its own endpoint `n`.
    Delete(u8),
}

/// The kind a step's byte picks: 0 SWIM, 1 anti-entropy, 2 ring watch (then again).
fn kind_of(b: u8) -> Kind {
    match b % 3 {
        0 => Kind::Swim,
        1 => Kind::Sync,
        _ => Kind::Ring,
    }
}

/// The byte [`kind_of`] reads back as `kind`.
fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Swim => 0,
        Kind::Sync => 1,
        Kind::Ring => 2,
    }
}

impl Step {
    /// Reads one step (the input must not be empty).
    pub fn read(input: &mut Input<'_>) -> Step {
        match input.u8() % 7 {
            0 => Step::Raw(input.chunk().to_vec()),
            1 => Step::Sealed { from: input.u8(), kind: kind_of(input.u8()), payload: input.chunk().to_vec() },
            2 => Step::Resigned { from: input.u8(), payload: input.chunk().to_vec() },
            3 => Step::Header {
                from: input.u8(),
                to: input.u8(),
                generation: input.u64(),
                counter: input.u64(),
                kind: kind_of(input.u8()),
                payload: input.chunk().to_vec(),
            },
            4 => Step::Timers(input.u8()),
            5 => Step::Put(input.u8()),
            _ => Step::Delete(input.u8()),
        }
    }

    /// Writes what [`Step::read`] reads back as this step.
    pub fn write(&self, out: &mut Vec<u8>) {
        let kind = |k: &Kind| kind_byte(*k);
        match self {
            Step::Raw(d) => {
                out.push(0);
                crate::put_chunk(out, d);
            }
            Step::Sealed { from, kind: k, payload } => {
                out.extend_from_slice(&[1, *from, kind(k)]);
                crate::put_chunk(out, payload);
            }
            Step::Resigned { from, payload } => {
                out.extend_from_slice(&[2, *from]);
                crate::put_chunk(out, payload);
            }
            Step::Header { from, to, generation, counter, kind: k, payload } => {
                out.extend_from_slice(&[3, *from, *to]);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&counter.to_be_bytes());
                out.push(kind(k));
                crate::put_chunk(out, payload);
            }
            Step::Timers(t) => out.extend_from_slice(&[4, *t]),
            Step::Put(n) => out.extend_from_slice(&[5, *n]),
            Step::Delete(n) => out.extend_from_slice(&[6, *n]),
        }
    }
}

/// Encodes a script.
pub fn script(steps: &[Step]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in steps {
        s.write(&mut out);
    }
    out
}

/// Host 1's node and what the other hosts need to seal to it.
pub struct Harness {
    node: GossipNode,
    key: GossipKey,
    sealers: Vec<(NodeId, Sealer)>,
    now: Duration,
    timers: Vec<(Duration, u64, Timer)>,
    seq: u64,
    out: Output,
    sealed: Vec<u8>,
    delivered: u64,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// Host 1 started in a cluster that has converged: hosts 2 and 3 alive, host 2's table
    /// replicated, one endpoint of its own.
    pub fn new() -> Harness {
        let key = GossipKey::new(&CLUSTER_KEY);
        let mut node = GossipNode::new(peer(ME), config(), GossipKey::new(&CLUSTER_KEY), signer(ME), GENERATION, 1);
        let mut out = Output::default();
        node.start(&mut out);
        node.set_directory(directory(), &mut out);
        node.warm_start(&[peer(2), peer(3)], &member_records(), &mut out);
        let (k, e) = endpoint(ME, 2);
        node.put_quietly(k, e);
        let sealers =
            [MEMBERS[0], MEMBERS[1], STRANGER, ME].into_iter().map(|n| (n, key.sealer(n, GENERATION))).collect();
        let mut h = Harness {
            node,
            key,
            sealers,
            now: Duration::from_secs(1),
            timers: Vec::new(),
            seq: 0,
            out: Output::default(),
            sealed: Vec::new(),
            delivered: 0,
        };
        h.take_output(out);
        h
    }

    /// The node.
    pub fn node(&self) -> &GossipNode {
        &self.node
    }

    /// Runs a whole script.
    pub fn run(&mut self, data: &[u8]) {
        let mut input = Input::new(data);
        while !input.is_empty() {
            let step = Step::read(&mut input);
            self.step(step);
        }
        self.check_counters();
    }

    /// Runs one step, then checks what the node sent and said.
    pub fn step(&mut self, step: Step) {
        self.now += Duration::from_millis(1);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        match step {
            Step::Raw(mut d) => self.deliver(addr(MEMBERS[0]), &mut d, &mut out),
            Step::Sealed { from, kind, payload } => self.seal_and_deliver(sender(from), kind, &payload, &mut out),
            Step::Resigned { from, payload } => {
                let payload = resign(&payload);
                self.seal_and_deliver(sender(from), Kind::Sync, &payload, &mut out);
            }
            Step::Header { from, to, generation, counter, kind, payload } => {
                let generation = match generation {
                    0 => GENERATION,
                    1 => GENERATION - 1,
                    2 => GENERATION + 1,
                    g => g,
                };
                let header = Header { sender: sender(from), generation, counter, receiver: sender(to) };
                let mut d = Vec::new();
                self.key.seal(&header, kind, &payload, &mut d);
                self.deliver(addr(header.sender), &mut d, &mut out);
            }
            Step::Timers(ticks) => {
                self.now += Duration::from_millis(5 * (u64::from(ticks) + 1));
                self.timers.sort_by_key(|(at, seq, _)| std::cmp::Reverse((*at, *seq)));
                for _ in 0..MAX_FIRED {
                    if self.timers.last().is_none_or(|(at, _, _)| *at > self.now) {
                        break;
                    }
                    let (at, _, timer) = self.timers.pop().expect("a due timer");
                    self.node.handle_timer(at.max(self.now), timer, &mut out);
                }
            }
            Step::Put(n) => {
                let (k, e) = endpoint(ME, n);
                self.node.put(k, e, &mut out);
            }
            Step::Delete(n) => self.node.delete(endpoint(ME, n).0, &mut out),
        }
        self.take_output(out);
    }

    fn seal_and_deliver(&mut self, from: NodeId, kind: Kind, payload: &[u8], out: &mut Output) {
        let sealer = &mut self.sealers.iter_mut().find(|(n, _)| *n == from).expect("a sealer for every sender").1;
        sealer.seal(ME, kind, payload, &mut self.sealed);
        let mut d = std::mem::take(&mut self.sealed);
        self.deliver(addr(from), &mut d, out);
        self.sealed = d;
    }

    fn deliver(&mut self, from: SocketAddr, datagram: &mut [u8], out: &mut Output) {
        self.delivered += 1;
        self.node.handle_datagram(self.now, from, datagram, out);
    }

    /// Checks what one call produced, and keeps its timers.
    fn take_output(&mut self, mut out: Output) {
        let max = config().max_datagram;
        let mut copy = Vec::new();
        for (to, d) in &out.datagrams {
            assert!(d.len() <= max, "a {}-byte datagram to {to} (at most {max})", d.len());
            copy.clear();
            copy.extend_from_slice(d);
            let opened = self.key.open(&mut copy).expect("what the node sends opens under the cluster key");
            assert_eq!(opened.header.sender, ME, "sealed as this host");
            assert_ne!(opened.header.receiver, ME, "never sealed for itself");
            assert!(
                MEMBERS.contains(&opened.header.receiver) && MEMBERS.iter().any(|m| addr(*m) == *to),
                "sent only to hosts of the directory: {:?} to {to}",
                opened.header
            );
        }
        for e in &out.events {
            match e {
                Event::PeerUp(n) => assert!(MEMBERS.contains(n), "only a host of the directory is alive: {n}"),
                Event::PeerDown(n) => assert_ne!(*n, ME, "this host is never down to itself"),
                Event::Endpoints(n) => {
                    assert!(*n == ME || MEMBERS.contains(n), "only a host of the directory has endpoints: {n}")
                }
            }
        }
        for n in self.node.alive() {
            assert!(MEMBERS.contains(&n), "host {n} is alive but not in the directory");
        }
        for (after, timer) in out.timers.drain(..) {
            self.seq += 1;
            self.timers.push((self.now + after, self.seq, timer));
        }
        self.out = out;
    }

    fn check_counters(&self) {
        let c = self.node.counters();
        assert_eq!(c.rx_datagrams, self.delivered, "every datagram counted");
        let refused = c.rx_not_gossip
            + c.rx_other_version
            + c.rx_bad_auth
            + c.rx_replayed
            + c.rx_stale_generation
            + c.rx_misdirected
            + c.rx_unknown_sender;
        assert!(refused <= c.rx_datagrams, "{c:?}");
        // The ring watch counts an ack only for a ping it sent, a suspicion only for a ping
        // that went unanswered.
        assert!(c.ring_acks <= c.ring_pings && c.ring_suspicions <= c.ring_pings, "{c:?}");
        for p in self.node.peers() {
            assert!(p.node == ME || MEMBERS.contains(&p.node), "peers lists only the directory: {p:?}");
        }
        for owner in [ME, MEMBERS[0], MEMBERS[1], STRANGER] {
            self.node.for_each_endpoint(owner, |k, e| {
                assert!(owner != STRANGER, "a stranger's endpoint {k:?} {e:?}");
                assert!(e.name.len() <= control::gossip::record::MAX_NAME_LEN);
            });
        }
    }
}

/// `payload` with the records of a `Records` message signed again by their owners (hosts 2
/// and 3; others' are left as they are), so that the node gets past their signatures.
pub fn resign(payload: &[u8]) -> Vec<u8> {
    let Some(SyncMessage::Records { owner, epoch, from, upto, mut items }) = SyncMessage::decode(payload) else {
        return payload.to_vec();
    };
    for item in &mut items {
        let Ok(r) = Record::decode(&item.0) else { continue };
        let Some(i) = MEMBERS.iter().position(|m| *m == r.owner) else { continue };
        item.0 = Record::sign(&MEMBER_SIGNERS[i], r.owner, r.epoch, r.version, r.change.clone()).wire().to_vec();
    }
    let mut out = Vec::new();
    SyncMessage::Records { owner, epoch, from, upto, items }.encode(&mut out);
    out
}
