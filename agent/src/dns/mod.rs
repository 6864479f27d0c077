//! The embedded DNS resolver's shell (issue 14): containers find each other by name.
//!
//! For every cluster network up on this host, a [`server`] task listens on UDP and TCP port 53
//! at the network's gateway address (on the host's bridge `ovbr-<net>`, in the host's
//! namespace: the same address on every host, as podman's aardvark-dns does) and moves bytes
//! between its sockets and the sans-IO `resolver` crate, which answers from a [`NameTable`].
//! The network a query is for is the address it was sent to.
//!
//! **Where the names come from.** Every host's endpoints as gossip carries them (name,
//! aliases, address): this host's own as it publishes them, the others' as it hears them, of
//! the hosts gossip counts alive, each only within its owner's block ([`names`], the same
//! rule as the reconciler's). The table is rebuilt whole on every change of the Raft view,
//! of what gossip heard or of this host's endpoints, and swapped into each server (an `Arc`,
//! sent over a watch channel: a server takes the new one between two wakeups, so the answer
//! path takes no lock).
//!
//! **Forwarding.** Names a network does not have go to the upstreams of the resolv.conf given
//! by the daemon setting `dns_upstreams_file` (the host's /etc/resolv.conf unless told; its
//! modification time is checked every [`RESOLV_CONF_POLL`]), never to a network's gateway
//! itself; an `--internal` network never forwards (NXDOMAIN). See `resolver::forward` for the
//! failover rules.
//!
//! **One task per network**, each with its own sockets, forwarder and counters: a network
//! that comes up gets a task, one that goes down takes its task (and sockets) with it
//! ([`crate::host::Host::gateways`] says which are up), and a flood on one network's resolver
//! costs the others only CPU time. Each task handles at most [`server::BATCH`] datagrams per
//! socket per wakeup, at most 1,024 forwarded queries in flight and [`server::MAX_TCP`] TCP
//! connections.
//!
//! How containers reach it: [`resolv_conf`] (for `attach --netns /run/netns/NAME`), the CNI
//! result's `dns`, and for the containers that kept the host's resolvers (Docker's: its
//! embedded resolver at 127.0.0.11 answers the names of its own host's containers and
//! forwards the rest to the host's resolvers, from the container) the firewall's interception:
//! a query from a cluster network to one of the addresses of [`intercepted`] is answered by
//! that network's resolver, which forwards what is not the overlay's to those same upstreams.
//! `overlayd dns` shows what each network answers.

pub mod resolv_conf;
pub mod server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use control::follower::Follower;
use control::gossip::{Endpoint, EndpointKey};
use control::service::ServiceMode;
use control::state::{ClusterView, NodeId};
use proto as pb;
use resolver::{Counters, NameTable, Upstreams};
use tokio::sync::watch;

use crate::endpoints::EndpointStore;
use crate::gossip::{Gossip, GossipView};
use crate::host::Host;

/// How often the upstreams file's modification time is checked.
pub const RESOLV_CONF_POLL: Duration = Duration::from_secs(2);

/// What the resolvers answer from: the table, and the endpoints it was built from (for
/// `overlayd dns`).
#[derive(Debug, Default)]
pub struct Names {
    pub table: NameTable,
    /// By network: every endpoint the table has, sorted by address.
    pub endpoints: BTreeMap<String, Vec<NamedEndpoint>>,
    /// The containers of this host that are on several networks: each of their addresses →
    /// every network of the container. Such a container asks the first network's resolver
    /// (its first nameserver) for the names of all its networks; see [`Names::network_for`].
    /// Networks never overlap, so an address names its network.
    pub siblings: HashMap<Ipv4Addr, Vec<String>>,
}

impl Names {
    /// The network whose names answer `query` from `client` sent to `network`'s resolver:
    /// `network` itself, unless the client is on other networks too and the name is not on
    /// `network` but on one of those (the first, in the order the container joined them).
    pub fn network_for<'a>(&'a self, network: &'a str, client: Ipv4Addr, query: &[u8]) -> &'a str {
        use resolver::wire::{Header, MAX_TEXT_LEN, Question};
        let Some(networks) = self.siblings.get(&client) else { return network };
        let Ok(header) = Header::new_checked(query) else { return network };
        let Ok(question) = Question::parse(&header) else { return network };
        let mut text = [0u8; MAX_TEXT_LEN];
        let Some(name) = question.name.lower_text(&mut text) else { return network };
        let has = |n: &str| self.table.network(n).is_some_and(|t| t.lookup(name).is_some());
        if has(network) {
            return network;
        }
        networks.iter().map(String::as_str).find(|n| *n != network && has(n)).unwrap_or(network)
    }
}

/// Every network of each container of this host on more than one (by its namespace), keyed by
/// each of its addresses: [`Names::siblings`].
pub fn siblings(store: &EndpointStore) -> HashMap<Ipv4Addr, Vec<String>> {
    let mut by_netns: BTreeMap<(u64, u64), Vec<(&str, Ipv4Addr)>> = BTreeMap::new();
    // Docker's endpoints have no namespace the agent knows (it is Docker's to set up).
    for e in store.endpoints.iter().filter(|e| e.netns_id != (0, 0)) {
        by_netns.entry(e.netns_id).or_default().push((e.network.as_str(), e.ip));
    }
    let mut out = HashMap::new();
    for eps in by_netns.values().filter(|eps| eps.len() > 1) {
        let mut networks: Vec<String> = Vec::new();
        for (n, _) in eps {
            if !networks.iter().any(|x| x == n) {
                networks.push((*n).to_owned());
            }
        }
        if networks.len() > 1 {
            for (_, ip) in eps {
                out.insert(*ip, networks.clone());
            }
        }
    }
    out
}

/// An endpoint as the resolvers know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEndpoint {
    pub name: String,
    pub aliases: Vec<String>,
    pub ip: Ipv4Addr,
    /// The host it is on.
    pub node: NodeId,
}

/// The names of every network up on this host (one where it has a block): the endpoints of
/// this host (`local`, as it publishes them) and of every other host gossip counts alive,
/// each only within its owner's block (a host cannot claim another's addresses, nor names on
/// a network it has no block in); and each service of the network: its name to its VIP (or,
/// in dnsrr mode, to its healthy replicas), `tasks.NAME` to its healthy replicas, and
/// `_PORT._PROTO.NAME` to SRV records of its ports.
pub fn names(view: &ClusterView, heard: &GossipView, local: &HashMap<EndpointKey, Endpoint>, me: NodeId) -> Names {
    let services = crate::services::replicas(view, heard, local, me);
    let mut b = NameTable::builder();
    let mut endpoints = BTreeMap::new();
    for (name, net) in &view.networks {
        let Some(blocks) = view.blocks.get(name) else { continue };
        let Some(mine) = blocks.get(&me) else { continue };
        let mut list: Vec<NamedEndpoint> = Vec::new();
        let mut add = |node: NodeId, k: &EndpointKey, e: &Endpoint| {
            list.push(NamedEndpoint { name: e.name.clone(), aliases: e.aliases.clone(), ip: k.ip, node });
        };
        for (k, e) in local {
            if k.vni == net.vni && mine.contains(k.ip) {
                add(me, k, e);
            }
        }
        for (&node, cidr) in blocks {
            if node == me || !heard.alive.contains(&node) {
                continue;
            }
            for (k, e) in heard.endpoints.get(&node).into_iter().flatten() {
                if k.vni == net.vni && cidr.contains(k.ip) {
                    add(node, k, e);
                }
            }
        }
        list.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
        let mut n = b.network(name, net.internal);
        for e in &list {
            n.endpoint(&e.name, e.aliases.iter().map(String::as_str), e.ip);
        }
        // Services: NAME → the VIP (vip mode) or every healthy replica (dnsrr), tasks.NAME →
        // every healthy replica.
        // _PORT._PROTO.NAME → SRV: the service's name (vip) or each healthy replica's (dnsrr).
        for svc in view.services.values().filter(|s| s.network == *name) {
            let replicas = services.get(&svc.name).map(Vec::as_slice).unwrap_or_default();
            let healthy = crate::services::healthy(replicas);
            let vip = match (svc.mode, svc.vip) {
                (ServiceMode::Vip, Some(vip)) => Some(vip),
                _ => None,
            };
            match vip {
                Some(vip) => {
                    n.name(&svc.name, vip);
                }
                None => {
                    for ip in &healthy {
                        n.name(&svc.name, *ip);
                    }
                }
            }
            let tasks = format!("tasks.{}", svc.name);
            for ip in &healthy {
                n.name(&tasks, *ip);
            }
            for p in &svc.ports {
                let srv = format!("_{}._{}.{}", p.port, p.protocol, svc.name);
                if vip.is_some() {
                    n.srv(&srv, p.port, &svc.name);
                } else {
                    for r in replicas.iter().filter(|r| r.health == control::gossip::Health::Healthy) {
                        n.srv(&srv, p.port, &r.name);
                    }
                }
            }
        }
        endpoints.insert(name.clone(), list);
    }
    Names { table: b.build(), endpoints, siblings: HashMap::new() }
}

/// The resolvers whose queries from containers go to their network's resolver instead (the
/// firewall's set `dns_intercepted`): the IPv4 upstreams on port 53 but loopback ones, which
/// no container can reach, or, when the upstreams are all loopback (a host with a local cache,
/// systemd-resolved's 127.0.0.53), the defaults Docker and podman give a container then
/// (8.8.8.8 and 8.8.4.4). None when there are no upstreams: forwarding would fail where the
/// container's own query may not.
pub fn intercepted(upstreams: &Upstreams) -> BTreeSet<Ipv4Addr> {
    let servers = upstreams.servers();
    let mut out: BTreeSet<Ipv4Addr> = servers
        .iter()
        .filter(|s| s.port() == 53)
        .filter_map(|s| match s.ip() {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect();
    if out.is_empty() && !servers.is_empty() && servers.iter().all(|s| s.ip().is_loopback()) {
        out.extend([Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(8, 8, 4, 4)]);
    }
    out
}

/// The upstreams as last read.
#[derive(Debug, Default, Clone)]
pub struct UpstreamsState {
    pub upstreams: Upstreams,
    /// Why the file could not be read, if it could not.
    pub error: Option<String>,
}

/// What a network's server publishes for `overlayd dns` and the metrics.
#[derive(Debug, Default)]
pub struct NetworkState {
    pub gateway: Option<Ipv4Addr>,
    /// Whether its sockets are bound; why not, if they are not.
    pub listening: bool,
    pub error: Option<String>,
    pub counters: Counters,
    pub shell: server::ShellCounters,
}

/// What the servers and the supervisor share.
pub struct Shared {
    names: watch::Sender<Arc<Names>>,
    upstreams: watch::Sender<Arc<UpstreamsState>>,
    /// By network (also after it went down: counters stay, as the dataplane's do).
    networks: Mutex<BTreeMap<String, Arc<Mutex<NetworkState>>>>,
    ttl: u32,
    upstreams_file: PathBuf,
}

/// This host's DNS resolvers.
pub struct Dns {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dns {
    /// Stops every resolver (the daemon is stopping, or leaving the cluster).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Starts the resolvers of every cluster network that is or comes up on `host`.
    pub fn start(
        host: &Arc<Host>,
        follower: Arc<Follower>,
        gossip: &Gossip,
        store: Arc<tokio::sync::Mutex<EndpointStore>>,
        me: NodeId,
        ttl: u32,
        upstreams_file: PathBuf,
    ) -> Dns {
        let shared = Arc::new(Shared {
            names: watch::channel(Arc::default()).0,
            upstreams: watch::channel(Arc::default()).0,
            networks: Mutex::new(BTreeMap::new()),
            ttl,
            upstreams_file,
        });
        let inputs = Inputs {
            views: follower.subscribe(),
            heard: gossip.subscribe(),
            local: gossip.local(),
            up: host.gateways(),
            store,
            host: Arc::clone(host),
        };
        let task = tokio::spawn(supervise(Arc::clone(&shared), inputs, me));
        Dns { shared, task }
    }

    /// `overlayd dns [NETWORK]`: what each network's resolver answers, its counters, and the
    /// upstreams.
    pub fn report(&self, network: &str) -> anyhow::Result<pb::DnsReply> {
        let names = Arc::clone(&self.shared.names.borrow());
        let upstreams = Arc::clone(&self.shared.upstreams.borrow());
        let states = self.shared.networks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !network.is_empty() && !names.endpoints.contains_key(network) && !states.contains_key(network) {
            anyhow::bail!(
                "this host has no resolver for {network:?}: the network is not up here (see overlayd network ls)"
            );
        }
        let mut networks = Vec::new();
        let all: BTreeSet<&String> = names.endpoints.keys().chain(states.keys()).collect();
        for name in all.into_iter().filter(|n| network.is_empty() || *n == network) {
            let state = states.get(name).map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                (s.gateway, s.listening, s.error.clone(), counter_map(&s.counters, &s.shell))
            });
            let (gateway, listening, error, counters) = state.unwrap_or_default();
            let table = names.table.network(name);
            let mut by_name: Vec<pb::DnsName> = table
                .map(|t| {
                    t.names()
                        .map(|(n, addrs)| pb::DnsName {
                            name: n.to_owned(),
                            addresses: addrs.iter().map(ToString::to_string).collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            by_name.sort_by(|a, b| a.name.cmp(&b.name));
            let endpoints = names
                .endpoints
                .get(name)
                .into_iter()
                .flatten()
                .map(|e| pb::DnsEndpoint {
                    name: e.name.clone(),
                    ip: e.ip.to_string(),
                    aliases: e.aliases.clone(),
                    node_id: e.node,
                })
                .collect();
            networks.push(pb::DnsNetwork {
                name: name.clone(),
                gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
                internal: table.is_some_and(|t| t.is_internal()),
                listening,
                error: error.unwrap_or_default(),
                names: by_name,
                endpoints,
                counters: counters.into_iter().collect(),
            });
        }
        Ok(pb::DnsReply {
            networks,
            upstreams: upstreams.upstreams.servers().iter().map(ToString::to_string).collect(),
            ignored_upstreams: upstreams
                .upstreams
                .ignored()
                .iter()
                .map(|i| format!("{} ({})", i.text, i.reason))
                .collect(),
            upstreams_file: self.shared.upstreams_file.display().to_string(),
            upstreams_error: upstreams.error.clone().unwrap_or_default(),
            intercepted: intercepted(&upstreams.upstreams).iter().map(ToString::to_string).collect(),
            ttl: self.shared.ttl,
            rejected: names
                .table
                .rejected()
                .iter()
                .map(|r| format!("{} on {}: {}", r.name, r.network, r.error))
                .collect(),
        })
    }
}

/// The counters of a network's resolver by metric: `family` or `family:label` (the label is
/// the RCODE for `answers`, the reason for the others), as `overlayd dns --json` shows them
/// and [`crate::api`] turns them into `overlayd_dns_<family>_total{…}`.
pub fn counter_map(c: &Counters, s: &server::ShellCounters) -> BTreeMap<String, u64> {
    use resolver::wire::{WireError, rcode};
    let mut m = BTreeMap::new();
    let mut put = |k: String, v: u64| {
        m.insert(k, v);
    };
    put("queries".into(), c.queries);
    for code in [rcode::NOERROR, rcode::FORMERR, rcode::SERVFAIL, rcode::NXDOMAIN, rcode::NOTIMP, rcode::REFUSED] {
        put(format!("answers:{}", rcode::name(code).to_ascii_lowercase()), c.answered(code));
    }
    let others: u64 = (0..16u8).filter(|r| *r > rcode::REFUSED).map(|r| c.answered(r)).sum();
    put("answers:other".into(), others);
    put("nodata".into(), c.nodata);
    put("truncated".into(), c.truncated);
    put("internal_nxdomain".into(), c.internal_nxdomain);
    put("refused:class".into(), c.refused_class);
    put("refused:unknown_network".into(), c.unknown_network);
    put("refused:query_too_large".into(), c.forward_query_too_large);
    put("forwarded".into(), c.forwarded);
    put("upstream_queries".into(), c.upstream_queries);
    put("upstream_failures:timeout".into(), c.upstream_timeouts);
    put("upstream_failures:servfail".into(), c.upstream_servfail);
    put("upstream_failures:refused".into(), c.upstream_refused);
    put("forward_failed:upstreams_failed".into(), c.forward_failed);
    put("forward_failed:too_many_in_flight".into(), c.forward_table_full);
    put("forward_failed:no_upstream".into(), c.forward_no_upstream);
    put("forward_failed:reply_too_large".into(), c.forward_reply_too_large);
    for e in WireError::ALL {
        put(format!("malformed:{}", e.name()), c.malformed_for(*e));
    }
    for r in resolver::DropReason::ALL {
        put(format!("dropped:{}", r.name()), c.dropped_for(*r));
    }
    put("dropped:send_failed".into(), s.send_failed);
    put("dropped:tcp_busy".into(), s.tcp_refused);
    put("dropped:tcp_malformed".into(), s.tcp_malformed);
    put("tcp_connections".into(), s.tcp_connections);
    m
}

struct Inputs {
    views: watch::Receiver<Arc<ClusterView>>,
    heard: watch::Receiver<Arc<GossipView>>,
    local: watch::Receiver<Arc<HashMap<EndpointKey, Endpoint>>>,
    up: watch::Receiver<BTreeMap<String, Ipv4Addr>>,
    /// This host's endpoints with their namespaces (for [`siblings`]).
    store: Arc<tokio::sync::Mutex<EndpointStore>>,
    /// For the firewall's [`intercepted`] resolvers.
    host: Arc<Host>,
}

/// The upstreams file as last seen: (modification time, length, inode), to tell a change.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Keeps the names, the upstreams and one server per network up to date.
async fn supervise(shared: Arc<Shared>, mut inputs: Inputs, me: NodeId) {
    let mut servers = Servers::default();
    let mut tick = tokio::time::interval(RESOLV_CONF_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_stamp, mut own): (Option<Stamp>, Vec<IpAddr>) = (None, Vec::new());
    let mut rebuild = true;
    // What the firewall intercepts, as last set (None: not yet, or it failed: try again).
    let mut intercepting: Option<BTreeSet<Ipv4Addr>> = None;
    loop {
        if rebuild {
            let view = Arc::clone(&inputs.views.borrow_and_update());
            let heard = Arc::clone(&inputs.heard.borrow_and_update());
            let local = Arc::clone(&inputs.local.borrow_and_update());
            let mut built = names(&view, &heard, &local, me);
            built.siblings = siblings(&*inputs.store.lock().await);
            shared.names.send_replace(Arc::new(built));
            let gateways: Vec<IpAddr> = view.networks.values().map(|n| IpAddr::V4(n.gateway)).collect();
            if gateways != own {
                own = gateways;
                last_stamp = None;
            }
            rebuild = false;
        }
        let now = stamp(&shared.upstreams_file);
        if last_stamp != Some(now) {
            last_stamp = Some(now);
            let state = match std::fs::read_to_string(&shared.upstreams_file) {
                Ok(text) => UpstreamsState { upstreams: Upstreams::from_resolv_conf(&text, &own), error: None },
                Err(e) => UpstreamsState {
                    upstreams: Upstreams::default(),
                    error: Some(format!("cannot read {}: {e}", shared.upstreams_file.display())),
                },
            };
            let before = Arc::clone(&shared.upstreams.borrow());
            match &state.error {
                Some(e) if before.error.as_ref() == Some(e) => {}
                Some(e) => tracing::warn!(error = %e, "DNS: no upstreams: names outside the overlay get SERVFAIL"),
                None if before.error.is_none() && before.upstreams == state.upstreams => {}
                None => tracing::info!(
                    file = %shared.upstreams_file.display(),
                    upstreams = ?state.upstreams.servers(),
                    ignored = ?state.upstreams.ignored().iter().map(|i| format!("{} ({})", i.text, i.reason)).collect::<Vec<_>>(),
                    "DNS upstreams"
                ),
            }
            shared.upstreams.send_replace(Arc::new(state));
        }
        let wanted_intercepts = intercepted(&shared.upstreams.borrow().upstreams);
        if intercepting.as_ref() != Some(&wanted_intercepts) {
            match inputs.host.firewall.set_dns_intercepted(&wanted_intercepts).await {
                Ok(()) => {
                    tracing::info!(resolvers = ?wanted_intercepts, "DNS: containers' queries to these resolvers are answered by their network's");
                    intercepting = Some(wanted_intercepts);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "DNS: cannot intercept queries to the host's resolvers; trying again");
                    intercepting = None;
                }
            }
        }
        let wanted = inputs.up.borrow_and_update().clone();
        servers.0.retain(|name, (gw, task)| {
            let keep = wanted.get(name) == Some(gw) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::info!(network = %name, "DNS resolver stopped");
            }
            keep
        });
        for (name, &gw) in &wanted {
            if servers.0.contains_key(name) {
                continue;
            }
            let state =
                Arc::clone(shared.networks.lock().unwrap_or_else(|p| p.into_inner()).entry(name.clone()).or_default());
            {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.gateway = Some(gw);
                s.listening = false;
            }
            let config = server::Config { network: name.clone(), gateway: gw, ttl: shared.ttl };
            let io = server::Inputs { names: shared.names.subscribe(), upstreams: shared.upstreams.subscribe() };
            servers.0.insert(name.clone(), (gw, tokio::spawn(server::run(config, io, state))));
        }
        tokio::select! {
            r = inputs.views.changed() => { if r.is_err() { return } rebuild = true; }
            r = inputs.heard.changed() => { if r.is_err() { return } rebuild = true; }
            r = inputs.local.changed() => { if r.is_err() { return } rebuild = true; }
            r = inputs.up.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// The servers running, by network: aborted when the supervisor ends (with the cluster
/// runtime), which closes their sockets.
#[derive(Default)]
struct Servers(BTreeMap<String, (Ipv4Addr, tokio::task::JoinHandle<()>)>);

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use control::state::{Network, NodeRecord, NodeStatus, Role};

    use super::*;

    fn node(id: NodeId) -> NodeRecord {
        let addr = IpAddr::from([198, 18, 0, id as u8]);
        NodeRecord {
            id,
            name: format!("h{id}"),
            underlay_addr: addr,
            api_addr: SocketAddr::new(addr, 7947),
            role: Role::Worker,
            status: NodeStatus::Ready,
            joined_at: 0,
            gossip_addr: SocketAddr::new(addr, 7946),
            gossip_public_key: [0; 32],
            underlay_networks: Vec::new(),
            underlay_mtu: None,
        }
    }

    /// Hosts 1-3; "web" (VNI 1, 10.1.0.0/16, a /24 per host) on all, "db" (VNI 2, internal) on
    /// hosts 2 and 3 only.
    fn view() -> ClusterView {
        let mut v = ClusterView { revision: 1, ..Default::default() };
        for (name, vni, internal, hosts) in [("web", 1, false, &[1, 2, 3][..]), ("db", 2, true, &[2, 3][..])] {
            v.networks.insert(
                name.into(),
                Network {
                    encrypted: false,
                    key_epoch: 0,
                    key_made_at: 0,
                    name: name.into(),
                    vni,
                    subnet: format!("10.{vni}.0.0/16").parse().unwrap(),
                    gateway: Ipv4Addr::new(10, vni as u8, 0, 1),
                    mtu: 1450,
                    block_prefix: 24,
                    created_at: 0,
                    internal,
                },
            );
            for &h in hosts {
                v.nodes.insert(h, node(h));
                v.blocks.entry(name.into()).or_default().insert(h, format!("10.{vni}.{h}.0/24").parse().unwrap());
            }
        }
        v
    }

    fn ep(vni: u32, ip: [u8; 4], name: &str, aliases: &[&str]) -> (EndpointKey, Endpoint) {
        let aliases = aliases.iter().map(|a| (*a).to_owned()).collect();
        (
            EndpointKey { vni, ip: ip.into() },
            Endpoint {
                mac: [2, 0x4f, ip[0], ip[1], ip[2], ip[3]],
                name: name.into(),
                aliases,
                service: None,
                health: Default::default(),
            },
        )
    }

    fn addrs(n: &Names, network: &str, name: &str) -> Vec<Ipv4Addr> {
        let mut v = n.table.network(network).and_then(|t| t.addresses(name.as_bytes())).unwrap_or_default().to_vec();
        v.sort();
        v
    }

    #[test]
    fn every_live_hosts_endpoints_within_its_block_on_the_networks_up_here() {
        let v = view();
        let local: HashMap<_, _> = [ep(1, [10, 1, 2, 5], "web2", &["www"])].into();
        let mut heard = GossipView { alive: [1, 3].into(), ..Default::default() };
        heard
            .endpoints
            .insert(1, vec![ep(1, [10, 1, 1, 5], "web1", &["www", "front"]), ep(1, [10, 1, 3, 9], "thief", &[])]);
        heard.endpoints.insert(3, vec![ep(1, [10, 1, 3, 5], "web3", &[]), ep(2, [10, 2, 3, 5], "cache", &[])]);
        let n = names(&v, &heard, &local, 2);
        let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        assert_eq!(addrs(&n, "web", "www"), [ip(10, 1, 1, 5), ip(10, 1, 2, 5)], "an alias of two endpoints");
        assert_eq!(addrs(&n, "web", "web3.web"), [ip(10, 1, 3, 5)]);
        assert_eq!(addrs(&n, "web", "front"), [ip(10, 1, 1, 5)]);
        assert!(addrs(&n, "web", "thief").is_empty(), "host 1 cannot name an address of host 3's block");
        assert_eq!(addrs(&n, "db", "cache"), [ip(10, 2, 3, 5)]);
        assert!(addrs(&n, "db", "web1").is_empty(), "names stay on their network");
        assert!(n.table.network("db").unwrap().is_internal());
        assert_eq!(n.endpoints["web"].iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["web1", "web2", "web3"]);
        assert_eq!(n.endpoints["web"][1].node, 2);

        // Host 3 confirmed down: its names go. Host 1 has no block in db: db is not up there.
        heard.alive = [1].into();
        let n = names(&v, &heard, &local, 2);
        assert!(addrs(&n, "web", "web3").is_empty());
        assert!(addrs(&n, "db", "cache").is_empty());
        assert!(names(&v, &heard, &local, 1).table.network("db").is_none());
    }

    fn stored(network: &str, ip: [u8; 4], netns: (u64, u64)) -> crate::endpoints::LocalEndpoint {
        crate::endpoints::LocalEndpoint {
            network: network.into(),
            name: format!("{ip:?}"),
            ip: ip.into(),
            prefix_len: 16,
            mac: dataplane::MacAddr::from_ipv4(ip.into()),
            host_ifname: String::new(),
            netns: String::new(),
            netns_id: netns,
            ifname: "eth0".into(),
            container_id: String::new(),
            origin: crate::endpoints::Origin::Attach,
            aliases: Vec::new(),
            service: None,
            cni_network: String::new(),
        }
    }

    #[test]
    fn a_container_on_two_networks_resolves_the_names_of_both_through_either() {
        let mut store = EndpointStore::default();
        store.endpoints.push(stored("web", [10, 1, 2, 9], (1, 7)));
        store.endpoints.push(stored("db", [10, 2, 2, 9], (1, 7)));
        store.endpoints.push(stored("web", [10, 1, 2, 10], (1, 8)));
        store.endpoints.push(stored("web", [10, 1, 2, 11], (0, 0)));
        store.endpoints.push(stored("db", [10, 2, 2, 11], (0, 0)));
        let sib = siblings(&store);
        assert_eq!(sib.len(), 2, "only the container on both networks: {sib:?}");
        assert_eq!(sib[&Ipv4Addr::new(10, 1, 2, 9)], ["web", "db"]);
        assert_eq!(sib[&Ipv4Addr::new(10, 2, 2, 9)], ["web", "db"]);

        let mut heard = GossipView { alive: [3].into(), ..Default::default() };
        heard.endpoints.insert(3, vec![ep(1, [10, 1, 3, 5], "web3", &[]), ep(2, [10, 2, 3, 5], "cache", &[])]);
        let mut n = names(&view(), &heard, &HashMap::new(), 2);
        n.siblings = sib;
        let q = |name: &str| {
            let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in name.split('.') {
                m.push(label.len() as u8);
                m.extend(label.as_bytes());
            }
            m.extend([0, 0, 1, 0, 1]);
            m
        };
        let both = Ipv4Addr::new(10, 1, 2, 9);
        assert_eq!(n.network_for("web", both, &q("cache")), "db", "a name of its other network");
        assert_eq!(n.network_for("web", both, &q("web3")), "web");
        assert_eq!(n.network_for("web", both, &q("5.3.2.10.in-addr.arpa")), "db", "and its addresses");
        assert_eq!(n.network_for("web", both, &q("elsewhere.example")), "web", "forwarded by the network asked");
        assert_eq!(n.network_for("web", Ipv4Addr::new(10, 1, 2, 10), &q("cache")), "web", "a container on web only");
        assert_eq!(n.network_for("web", both, b"junk"), "web");
    }

    #[test]
    fn the_hosts_reachable_resolvers_are_intercepted_or_dockers_defaults_behind_a_local_cache() {
        let text = "nameserver 192.0.2.53\nnameserver 127.0.0.1\nnameserver 2001:db8::53\n";
        let got: Vec<Ipv4Addr> = intercepted(&Upstreams::from_resolv_conf(text, &[])).into_iter().collect();
        assert_eq!(got, [Ipv4Addr::new(192, 0, 2, 53)], "no loopback, no IPv6");
        let cache = Upstreams::from_resolv_conf("nameserver 127.0.0.53\n", &[]);
        let got: Vec<Ipv4Addr> = intercepted(&cache).into_iter().collect();
        assert_eq!(got, [Ipv4Addr::new(8, 8, 4, 4), Ipv4Addr::new(8, 8, 8, 8)], "what Docker gives a container then");
        assert!(intercepted(&Upstreams::default()).is_empty(), "no upstream: nothing to answer for");
    }
}
