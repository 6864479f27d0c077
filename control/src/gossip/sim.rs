//! A discrete-event simulation of a whole cluster's gossip: the real [`GossipNode`]s (foca,
//! signed records, anti-entropy, sealed datagrams) of many hosts over an in-memory network
//! with latency, loss and partitions, on a simulated clock. Used by the convergence tests
//! (`control/tests/gossip_sim.rs`) and the `gossip` benchmark, which measure how long an
//! endpoint change takes to reach every host, how long a dead host takes to be withdrawn
//! everywhere, and how many bytes each host sends.
//!
//! Nothing here stands in for the gossip code: only the network and the clock are simulated.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand10::rngs::SmallRng;
use rand10::{RngExt, SeedableRng};

use super::node::{Directory, DirectoryEntry, Event, GossipConfig, GossipCounters, GossipNode, Output, Peer, Timer};
use super::record::{Endpoint, EndpointKey, Signer};
use super::seal::{GossipKey, KEY_LEN, Kind};
use super::tables::Replica;
use crate::state::NodeId;

/// Members a node takes in per call while warm-starting.
const WARM_BATCH: usize = 256;

/// Bytes of IPv4 and UDP headers around each datagram (counted in wire figures).
pub const UDP_IPV4_HEADERS: u64 = 28;

/// The simulated cluster and network.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Hosts.
    pub hosts: usize,
    /// Endpoints each host has at the start.
    pub endpoints_per_host: usize,
    /// One-way latency, drawn uniformly from this range per datagram.
    pub latency: (Duration, Duration),
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// The gossip settings every host runs.
    pub gossip: GossipConfig,
    /// Start as a converged cluster (members known, tables replicated) instead of having
    /// every host announce itself at time zero.
    pub warm: bool,
    /// Seeds every random choice the simulation makes.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            hosts: 100,
            endpoints_per_host: 2,
            latency: (Duration::from_micros(100), Duration::from_millis(2)),
            loss: 0.0,
            gossip: GossipConfig::default(),
            warm: true,
            seed: 1,
        }
    }
}

struct Host {
    id: NodeId,
    addr: SocketAddr,
    signer_pkcs8: Vec<u8>,
    node: Option<GossipNode>,
    /// Which life of the host's node a timer belongs to (a restart voids the old ones).
    life: u64,
    cut: bool,
    tx_bytes: u64,
    tx_datagrams: u64,
    endpoints: Vec<(EndpointKey, Endpoint)>,
}

enum Pending {
    Datagram { to: usize, from: SocketAddr, data: Vec<u8> },
    Timer { host: usize, life: u64, timer: Timer },
}

/// A watched endpoint change: when each host first saw it.
struct Watch {
    owner: usize,
    key: EndpointKey,
    expect: Option<Endpoint>,
    since: Duration,
    seen: Vec<Option<Duration>>,
}

/// Datagrams one host sent, recorded as they went on the wire.
struct Capture {
    from: usize,
    /// (the host it was sent to, the datagram).
    sent: Vec<(usize, Vec<u8>)>,
}

/// Identifies a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchId(usize);

/// The simulation.
pub struct Simulation {
    config: SimConfig,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    pending: HashMap<u64, Pending>,
    hosts: Vec<Host>,
    by_addr: HashMap<SocketAddr, usize>,
    /// One directory, every node's.
    directory: Arc<Directory>,
    key: [u8; KEY_LEN],
    rng: SmallRng,
    out: Output,
    watches: Vec<Watch>,
    /// What one host sent, recorded (see [`Simulation::capture`]).
    capture: Option<Capture>,
    /// Liveness events as they happened: (time, host that saw it, event).
    pub log: Vec<(Duration, usize, Event)>,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation").field("hosts", &self.hosts.len()).field("now", &self.now).finish()
    }
}

fn addr_of(i: usize) -> SocketAddr {
    let n = u32::try_from(i).expect("fewer than 2^24 hosts") + 1;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n)), super::DEFAULT_PORT)
}

/// The endpoint key of a host's `n`th endpoint: network 4096, an address of its block.
pub fn endpoint_key(host: usize, n: usize) -> EndpointKey {
    let h = u32::try_from(host).expect("small");
    let n = u32::try_from(n % 250).expect("small") + 2;
    EndpointKey { vni: 4096, ip: Ipv4Addr::from(0x0a80_0000 | (h << 8) | n) }
}

fn endpoint(key: &EndpointKey, name: &str) -> Endpoint {
    let o = key.ip.octets();
    Endpoint {
        mac: [0x02, 0x4f, o[0], o[1], o[2], o[3]],
        name: name.to_owned(),
        aliases: Vec::new(),
        service: None,
        health: Default::default(),
    }
}

impl Simulation {
    /// Builds the cluster and starts every host at time zero.
    pub fn new(config: SimConfig) -> Simulation {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let key: [u8; KEY_LEN] = std::array::from_fn(|_| rng.random());
        let mut hosts = Vec::with_capacity(config.hosts);
        let mut directory = Vec::with_capacity(config.hosts);
        for i in 0..config.hosts {
            let signer = Signer::generate();
            let id = i as NodeId + 1;
            directory.push((id, DirectoryEntry { public_key: signer.public_key(), addr: addr_of(i) }));
            let endpoints = (0..config.endpoints_per_host)
                .map(|n| {
                    let k = endpoint_key(i, n);
                    (k, endpoint(&k, &format!("c{i}-{n}")))
                })
                .collect();
            hosts.push(Host {
                id,
                addr: addr_of(i),
                signer_pkcs8: signer.pkcs8().to_vec(),
                node: None,
                life: 0,
                cut: false,
                tx_bytes: 0,
                tx_datagrams: 0,
                endpoints,
            });
        }
        let by_addr = hosts.iter().enumerate().map(|(i, h)| (h.addr, i)).collect();
        let mut sim = Simulation {
            config,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            hosts,
            by_addr,
            directory: Arc::new(directory.into_iter().collect()),
            key,
            rng,
            out: Output::default(),
            watches: Vec::new(),
            capture: None,
            log: Vec::new(),
        };
        if sim.config.warm {
            sim.warm_start();
        } else {
            for i in 0..sim.hosts.len() {
                sim.boot(i, true);
            }
        }
        sim
    }

    fn new_node(&mut self, i: usize) -> GossipNode {
        self.hosts[i].life += 1;
        let generation = 1_000_000 * self.hosts[i].life + self.now.as_micros() as u64;
        self.node_of(i, generation)
    }

    /// Host `i`'s node in `generation` (also its table's epoch).
    fn node_of(&self, i: usize, generation: u64) -> GossipNode {
        let h = &self.hosts[i];
        let me = Peer { node: h.id, addr: h.addr, generation };
        let signer = Signer::from_pkcs8(&h.signer_pkcs8).expect("our own key");
        GossipNode::new(
            me,
            self.config.gossip.clone(),
            GossipKey::new(&self.key),
            signer,
            generation,
            self.config.seed ^ (i as u64).wrapping_mul(0x9e37_79b9),
        )
    }

    /// Starts host `i`'s node (again): a new generation and epoch, its endpoints published.
    fn boot(&mut self, i: usize, publish: bool) {
        let mut node = self.new_node(i);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        node.start(&mut out);
        node.set_shared_directory(Arc::clone(&self.directory), &mut out);
        if publish {
            for (k, e) in self.hosts[i].endpoints.clone() {
                node.put(k, e, &mut out);
            }
        }
        self.hosts[i].node = Some(node);
        self.dispatch(i, &mut out);
        self.out = out;
    }

    /// Builds every node as part of a converged cluster. Loading the member lists is
    /// quadratic per node (foca looks members up by a scan), so the nodes are built on all
    /// cores; everything they share (each owner's table, its records) is shared, not copied,
    /// until a host changes its replica.
    fn warm_start(&mut self) {
        for h in &mut self.hosts {
            h.life += 1;
        }
        let generation = |life: u64| 1_000_000 * life;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(self.hosts.len().max(1));
        let chunk = self.hosts.len().div_ceil(threads).max(1);
        let this = &*self;
        // Each node with its own table, built in parallel.
        let built: Vec<(GossipNode, Output, Arc<Replica>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..this.hosts.len())
                .step_by(chunk)
                .map(|lo| {
                    s.spawn(move || {
                        (lo..(lo + chunk).min(this.hosts.len()))
                            .map(|i| {
                                let mut node = this.node_of(i, generation(this.hosts[i].life));
                                let mut out = Output::default();
                                node.start(&mut out);
                                node.set_shared_directory(Arc::clone(&this.directory), &mut Output::default());
                                for (k, e) in &this.hosts[i].endpoints {
                                    node.put_quietly(*k, e.clone());
                                }
                                let table = node.own_table();
                                (node, out, table)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().expect("a warm-start worker panicked")).collect()
        });
        let members: Vec<Peer> = built.iter().map(|(n, _, _)| n.identity()).collect();
        let tables: Vec<Arc<Replica>> = built.iter().map(|(_, _, t)| Arc::clone(t)).collect();
        let mut built: Vec<(GossipNode, Output)> = built.into_iter().map(|(n, o, _)| (n, o)).collect();
        std::thread::scope(|s| {
            for part in built.chunks_mut(chunk) {
                let (members, tables) = (&members, &tables);
                s.spawn(move || {
                    for (node, out) in part {
                        // A few hundred members at a time: the buffers a node fills while
                        // taking them in (notifications, events) keep their capacity, which
                        // for the whole cluster at once was 12 % of the peak at 2,000 hosts.
                        for lo in (0..members.len()).step_by(WARM_BATCH) {
                            let hi = (lo + WARM_BATCH).min(members.len());
                            node.warm_start(&members[lo..hi], &[], out);
                            for (member, table) in members[lo..hi].iter().zip(&tables[lo..hi]) {
                                node.adopt_table(member.node, Arc::clone(table));
                            }
                            // Keep only the timers (anti-entropy, SWIM's probe cycle): the
                            // epoch record the start produced is already everywhere.
                            out.datagrams.clear();
                            out.events.clear();
                        }
                        out.datagrams.shrink_to_fit();
                        out.events.shrink_to_fit();
                    }
                });
            }
        });
        for (i, (node, mut out)) in built.into_iter().enumerate() {
            self.hosts[i].node = Some(node);
            self.dispatch(i, &mut out);
        }
        self.log.clear();
    }

    /// Now, on the simulated clock.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Host `i`'s node (None while it is dead).
    pub fn node(&self, i: usize) -> Option<&GossipNode> {
        self.hosts[i].node.as_ref()
    }

    /// Host `i`'s node id.
    pub fn id(&self, i: usize) -> NodeId {
        self.hosts[i].id
    }

    /// Bytes and datagrams host `i` has sent (UDP payloads).
    pub fn sent(&self, i: usize) -> (u64, u64) {
        (self.hosts[i].tx_bytes, self.hosts[i].tx_datagrams)
    }

    /// Host `i`'s gossip address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.hosts[i].addr
    }

    /// Whether host `i`'s node is running (not killed or left).
    pub fn is_running(&self, i: usize) -> bool {
        self.hosts[i].node.is_some()
    }

    /// Host `i`'s own endpoints, as the host itself has them (what every replica should hold).
    pub fn endpoints(&self, i: usize) -> &[(EndpointKey, Endpoint)] {
        &self.hosts[i].endpoints
    }

    /// Host `i`'s gossip signing key (for tests that forge records with another host's key).
    pub fn signer(&self, i: usize) -> Signer {
        Signer::from_pkcs8(&self.hosts[i].signer_pkcs8).expect("our own key")
    }

    /// The counters of every running node, summed (a killed node's are gone with it).
    pub fn counters(&self) -> GossipCounters {
        let mut t = GossipCounters::default();
        for c in self.hosts.iter().filter_map(|h| h.node.as_ref()).map(GossipNode::counters) {
            t.add(&c);
        }
        t
    }

    /// Bytes and datagrams all hosts together have sent (UDP payloads).
    pub fn sent_total(&self) -> (u64, u64) {
        self.hosts.iter().fold((0, 0), |(b, d), h| (b + h.tx_bytes, d + h.tx_datagrams))
    }

    /// Seals `payload` as a datagram of `kind` as host `from` seals (its key, its next
    /// counter) and hands it to host `to` at once: what a host holding the key (a member, or
    /// one turned hostile) can put on the wire. Loss and cuts do not apply. Host `from` must
    /// be running.
    pub fn inject(&mut self, from: usize, to: usize, kind: Kind, payload: &[u8]) {
        let receiver = self.hosts[to].id;
        let node = self.hosts[from].node.as_mut().expect("a running host to inject from");
        let datagram = node.seal(receiver, kind, payload);
        self.inject_raw(self.hosts[from].addr, to, datagram);
    }

    /// Hands host `to` the bytes `datagram` at once, as if they came from `from` (any
    /// address): forgeries under another key, garbage. Loss and cuts do not apply.
    pub fn inject_raw(&mut self, from: SocketAddr, to: usize, mut datagram: Vec<u8>) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        if let Some(node) = self.hosts[to].node.as_mut() {
            node.handle_datagram(self.now, from, &mut datagram, &mut out);
        }
        self.dispatch(to, &mut out);
        self.out = out;
    }

    /// Starts recording every datagram host `from` sends, as it goes on the wire (sealed,
    /// before loss): what an eavesdropper on the underlay captures. Replaces an earlier
    /// recording.
    pub fn capture(&mut self, from: usize) {
        self.capture = Some(Capture { from, sent: Vec::new() });
    }

    /// Stops recording; returns what was recorded: (the host it was sent to, the datagram).
    pub fn captured(&mut self) -> Vec<(usize, Vec<u8>)> {
        self.capture.take().map(|c| c.sent).unwrap_or_default()
    }

    fn schedule(&mut self, at: Duration, p: Pending) {
        self.seq += 1;
        self.pending.insert(self.seq, p);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn dispatch(&mut self, i: usize, out: &mut Output) {
        for (after, timer) in out.timers.drain(..) {
            let life = self.hosts[i].life;
            self.schedule(self.now + after, Pending::Timer { host: i, life, timer });
        }
        let from = self.hosts[i].addr;
        for (to, data) in out.datagrams.drain(..) {
            self.hosts[i].tx_bytes += data.len() as u64;
            self.hosts[i].tx_datagrams += 1;
            let Some(&j) = self.by_addr.get(&to) else { continue };
            if let Some(c) = self.capture.as_mut().filter(|c| c.from == i) {
                c.sent.push((j, data.clone()));
            }
            if self.hosts[i].cut || self.hosts[j].cut || self.rng.random_bool(self.config.loss) {
                continue;
            }
            let (lo, hi) = self.config.latency;
            let latency = if hi > lo { self.rng.random_range(lo..hi) } else { lo };
            self.schedule(self.now + latency, Pending::Datagram { to: j, from, data });
        }
        for ev in out.events.drain(..) {
            match ev {
                Event::Endpoints(owner) => self.check_watches(i, owner),
                _ => self.log.push((self.now, i, ev)),
            }
        }
    }

    fn check_watches(&mut self, i: usize, owner: NodeId) {
        let Some(node) = self.hosts[i].node.as_ref() else { return };
        for w in self.watches.iter_mut().filter(|w| w.seen[i].is_none() && self.hosts[w.owner].id == owner) {
            let mut found = None;
            node.for_each_endpoint(owner, |k, e| {
                if *k == w.key {
                    found = Some(e.clone());
                }
            });
            if found == w.expect {
                w.seen[i] = Some(self.now - w.since);
            }
        }
    }

    /// Runs until the simulated clock reaches `t`.
    pub fn run_until(&mut self, t: Duration) {
        let mut out = std::mem::take(&mut self.out);
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > t {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(p) = self.pending.remove(&seq) else { continue };
            out.clear();
            let i = match p {
                Pending::Datagram { to, from, mut data } => {
                    if self.hosts[to].cut {
                        continue;
                    }
                    let Some(node) = self.hosts[to].node.as_mut() else { continue };
                    node.handle_datagram(at, from, &mut data, &mut out);
                    to
                }
                Pending::Timer { host, life, timer } => {
                    if life != self.hosts[host].life {
                        continue;
                    }
                    let Some(node) = self.hosts[host].node.as_mut() else { continue };
                    node.handle_timer(at, timer, &mut out);
                    host
                }
            };
            self.dispatch(i, &mut out);
        }
        self.now = t;
        self.out = out;
    }

    /// Runs for `d` more.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Host `i` adds (or changes) endpoint `key`; returns a watch on its arrival everywhere.
    pub fn put(&mut self, i: usize, key: EndpointKey, name: &str) -> WatchId {
        let e = endpoint(&key, name);
        self.hosts[i].endpoints.retain(|(k, _)| *k != key);
        self.hosts[i].endpoints.push((key, e.clone()));
        let id = self.watch(i, key, Some(e.clone()));
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        if let Some(node) = self.hosts[i].node.as_mut() {
            node.put(key, e, &mut out);
        }
        self.dispatch(i, &mut out);
        self.out = out;
        id
    }

    /// Host `i` removes endpoint `key`; returns a watch on the removal reaching everyone.
    pub fn delete(&mut self, i: usize, key: EndpointKey) -> WatchId {
        self.hosts[i].endpoints.retain(|(k, _)| *k != key);
        let id = self.watch(i, key, None);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        if let Some(node) = self.hosts[i].node.as_mut() {
            node.delete(key, &mut out);
        }
        self.dispatch(i, &mut out);
        self.out = out;
        id
    }

    fn watch(&mut self, owner: usize, key: EndpointKey, expect: Option<Endpoint>) -> WatchId {
        let mut seen = vec![None; self.hosts.len()];
        seen[owner] = Some(Duration::ZERO);
        self.watches.push(Watch { owner, key, expect, since: self.now, seen });
        WatchId(self.watches.len() - 1)
    }

    /// For each host: how long after the change it saw it (None: not yet). Hosts that are
    /// dead or cut off when asked are left out.
    pub fn watch_delays(&self, id: WatchId) -> Vec<Option<Duration>> {
        let w = &self.watches[id.0];
        (0..self.hosts.len())
            .filter(|i| self.hosts[*i].node.is_some() && !self.hosts[*i].cut)
            .map(|i| w.seen[i])
            .collect()
    }

    /// Kills host `i` (no goodbye): its node stops, datagrams to it are lost.
    pub fn kill(&mut self, i: usize) {
        self.hosts[i].node = None;
        self.hosts[i].life += 1;
    }

    /// Host `i` leaves gracefully, then stops.
    pub fn leave(&mut self, i: usize) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        if let Some(node) = self.hosts[i].node.as_mut() {
            node.leave(&mut out);
        }
        self.dispatch(i, &mut out);
        self.out = out;
        self.kill(i);
    }

    /// Restarts host `i`: a new node, a new generation and epoch, its endpoints republished.
    pub fn restart(&mut self, i: usize) {
        self.boot(i, true);
    }

    /// Cuts host `i` off the network (both ways), or heals it.
    pub fn cut(&mut self, i: usize, cut: bool) {
        self.hosts[i].cut = cut;
    }

    /// When each live host (other than `subject`) saw `event` about it, from `since` on:
    /// the delay per host, None where it has not.
    pub fn event_delays(&self, subject: usize, since: Duration, up: bool) -> Vec<Option<Duration>> {
        let id = self.hosts[subject].id;
        let mut seen = vec![None; self.hosts.len()];
        for (t, host, ev) in self.log.iter().filter(|(t, _, _)| *t >= since) {
            let hit = match ev {
                Event::PeerDown(n) => !up && *n == id,
                Event::PeerUp(n) => up && *n == id,
                Event::Endpoints(_) => false,
            };
            if hit && seen[*host].is_none() {
                seen[*host] = Some(*t - since);
            }
        }
        (0..self.hosts.len())
            .filter(|i| *i != subject && self.hosts[*i].node.is_some() && !self.hosts[*i].cut)
            .map(|i| seen[i])
            .collect()
    }

    /// Whether every running, connected host holds the same endpoints for every running
    /// host's table as that host itself has (tables of killed hosts are not compared: the
    /// agent withdraws those on [`Event::PeerDown`]). The error names the first difference.
    pub fn tables_agree(&self) -> Result<(), String> {
        let truth: Vec<Vec<(EndpointKey, Endpoint)>> = self
            .hosts
            .iter()
            .map(|h| {
                let mut v = h.endpoints.clone();
                v.sort_by_key(|(k, _)| *k);
                v
            })
            .collect();
        for (i, h) in self.hosts.iter().enumerate() {
            let Some(node) = h.node.as_ref().filter(|_| !h.cut) else { continue };
            for (j, owner) in self.hosts.iter().enumerate() {
                if owner.node.is_none() {
                    continue;
                }
                let mut got = Vec::new();
                node.for_each_endpoint(owner.id, |k, e| got.push((*k, e.clone())));
                got.sort_by_key(|(k, _)| *k);
                if got != truth[j] {
                    let missing = truth[j].iter().filter(|e| !got.contains(e)).count();
                    let stale = got.iter().filter(|e| !truth[j].contains(e)).count();
                    return Err(format!(
                        "host {i}'s replica of host {j} differs: {missing} of its {} endpoints missing, {stale} stale",
                        truth[j].len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// p50, p99 and max of some delays (`None` counts as missing: returned separately).
pub fn percentiles(delays: impl IntoIterator<Item = Option<Duration>>) -> (Duration, Duration, Duration, usize) {
    let mut seen = Vec::new();
    let mut missing = 0;
    for d in delays {
        match d {
            Some(d) => seen.push(d),
            None => missing += 1,
        }
    }
    if seen.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO, missing);
    }
    seen.sort_unstable();
    let at = |q: f64| seen[((seen.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), *seen.last().expect("non-empty"), missing)
}

#[cfg(test)]
mod tests {
    //! The ring watch (see [`super::super::ring`]) in a simulated cluster.

    use super::*;

    fn cluster(hosts: usize, loss: f64, seed: u64) -> Simulation {
        let gossip = GossipConfig { cluster_size: hosts as u32, ..GossipConfig::default() };
        let mut sim = Simulation::new(SimConfig { hosts, loss, seed, gossip, ..SimConfig::default() });
        sim.run_for(Duration::from_secs(2));
        sim
    }

    fn ring_suspicions(sim: &Simulation, i: usize) -> u64 {
        sim.node(i).map_or(0, |n| n.counters().ring_suspicions)
    }

    /// Host `i`'s predecessor on the ring: the running host before it by node id, wrapping.
    fn predecessor(sim: &Simulation, i: usize) -> usize {
        let n = sim.hosts();
        (1..n).map(|d| (i + n - d) % n).find(|j| sim.is_running(*j)).expect("another running host")
    }

    /// Hosts killed one after the other — two of them neighbours on the ring, one at its
    /// wrap — are each suspected by their ring predecessor (and by no other ring watch)
    /// within a probe period and the RTT, and withdrawn everywhere within that, the suspicion
    /// and the time news takes to spread.
    #[test]
    fn a_killed_host_is_suspected_by_its_ring_predecessor_within_a_period_and_the_rtt() {
        let mut sim = cluster(60, 0.0, 21);
        let g = sim.config.gossip.clone();
        let step = Duration::from_millis(5);
        let detect = g.probe_period + g.probe_rtt;
        // News reaches every host within two rounds of periodic gossip after the eager push.
        let spread = g.gossip_interval * 2;
        let down_bound = detect + g.suspect_to_down + spread;
        for k in [17, 40, 41, 0, 59] {
            let p = predecessor(&sim, k);
            let before: Vec<u64> = (0..sim.hosts()).map(|i| ring_suspicions(&sim, i)).collect();
            let t0 = sim.now();
            sim.kill(k);
            while ring_suspicions(&sim, p) == before[p] && sim.now() < t0 + detect * 4 {
                sim.run_for(step);
            }
            let suspected = sim.now() - t0;
            assert!(suspected <= detect + step, "host {k} suspected by host {p} after {suspected:?}");
            sim.run_for(down_bound + Duration::from_secs(1) - suspected);
            let down = sim.event_delays(k, t0, false);
            let (_, _, max, missing) = percentiles(down);
            assert_eq!(missing, 0, "host {k}: every live host saw it down");
            assert!(max <= down_bound, "host {k} withdrawn everywhere after {max:?} (bound {down_bound:?})");
            for i in (0..sim.hosts()).filter(|i| *i != p && sim.is_running(*i)) {
                assert_eq!(ring_suspicions(&sim, i), before[i], "host {i} suspected too, killing {k}");
            }
            assert_eq!(ring_suspicions(&sim, p), before[p] + 1, "host {p}: one suspicion of {k}");
        }
        let c = sim.counters();
        assert_eq!((c.ring_unproven, c.rebirths), (0, 0), "{c:?}");
    }

    /// At 10 % loss the ring's tries keep false suspicions about as rare as SWIM's own
    /// (some 50 in 8,000 watched periods here, against some 70 of SWIM's probes), and those
    /// it raises are refuted in time: no live host goes down anywhere.
    #[test]
    fn on_a_lossy_network_the_ring_watch_takes_no_live_host_down() {
        let mut sim = cluster(100, 0.1, 22);
        sim.run_for(Duration::from_secs(30));
        let c = sim.counters();
        let downs = sim.log.iter().filter(|(_, _, ev)| matches!(ev, Event::PeerDown(_))).count();
        println!(
            "ring: {} pings, {} acks, {} suspicions; SWIM: {} suspicions, {} refutations; {downs} PeerDowns",
            c.ring_pings, c.ring_acks, c.ring_suspicions, c.suspicions, c.refutations
        );
        assert!(c.ring_acks > 0 && c.ring_pings > c.ring_acks, "loss made some tries retry: {c:?}");
        for i in 0..sim.hosts() {
            assert_eq!(sim.node(i).unwrap().alive().count(), sim.hosts() - 1, "host {i}");
        }
        assert_eq!(downs, 0, "no live host went down: {:?}", &sim.log[..sim.log.len().min(5)]);
    }
}
