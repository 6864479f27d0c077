//! The routing mesh: a service's published port answers on every host's addresses, also on a
//! host with no replica, and reaches a healthy replica wherever it runs, which sees the real
//! client address (what swarm's mesh loses to SNAT, moby #25526).
//!
//! **How.** Every host takes part in each network that has a published port: it leases a
//! block there if it has none, so the network is up on it with its **mesh port**
//! (`ovm-<network>`, see `netdev::add_mesh_port`), which holds the host's **mesh address**
//! (`control::service::mesh_address`, one per host and network, with the MAC derived from it).
//! Then, for a connection from outside to a published port of this host:
//! 1. **The host that takes it in** (the table `ip overlayd_published` of [`host_script`], in
//!    the host's namespace) translates its destination to a replica picked by a Maglev table
//!    (NAT prerouting; host mode: only this host's replicas) and marks it
//!    ([`netdev::MESH_MARK`](crate::netdev::MESH_MARK)); the mark routes it out of the mesh
//!    port, whose MAC is this host's alone, onto the overlay. No SNAT: the replica sees the
//!    client.
//! 2. **The replica's namespace** (the table `ip overlayd_mesh` of [`replica_script`])
//!    remembers, for a new connection from outside the subnet, which host's mesh MAC it came
//!    from (a conntrack mark per host), and marks its answers with it; a routing rule per host
//!    sends them to that host's mesh address ([`route_answers`]), over the overlay if need be,
//!    rather than to the gateway, which is every host's and knows nothing of the connection.
//! 3. Back on the host that took it in, conntrack undoes the translation and the answer leaves
//!    for the client from the address it called.
//!
//! The dataplane lets a host's mesh MAC carry sources outside the subnet, and nothing else
//! (`dataplane::tables::Transaction::set_mesh`); the firewall passes through a mesh port only
//! the translated connections and their answers (`firewall`, chain `mesh`).
//!
//! **What it is not.** It picks no replica by health itself (the caller gives the healthy
//! ones), and a client on the host itself, or in a container of the overlay, is not served
//! through the host's addresses (use the VIP). Neighbours: [`super::lb`] (the VIP balancer,
//! whose Maglev table and nft runner this shares), `netdev` (the mesh port and its route),
//! `firewall` (the host's own tables, which this never touches).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use control::cidr::Ipv4Cidr;
use control::service::{PublishMode, PublishedPort};
use control::state::{ClusterView, NodeId};
use dataplane::MacAddr;
use futures::TryStreamExt as _;

use super::{Replica, lb, maglev};
use crate::cluster::ClusterRuntime;
use crate::netdev::MESH_MARK;

/// overlayd's table in the host's namespace: the published ports.
pub const HOST_TABLE: &str = "overlayd_published";
/// overlayd's table in each replica's namespace: where answers to outside clients go.
pub const REPLICA_TABLE: &str = "overlayd_mesh";

/// A published port of a service on this host, with the replicas it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The service's name.
    pub service: String,
    /// The port.
    pub port: PublishedPort,
    /// The healthy replicas it reaches from this host (host mode: this host's own).
    pub backends: Vec<Ipv4Addr>,
}

/// Every published port of the state, with the replicas it reaches from host `me`.
pub fn published(view: &ClusterView, replicas: &BTreeMap<String, Vec<Replica>>, me: NodeId) -> Vec<Published> {
    let mut out = Vec::new();
    for svc in view.services.values() {
        let list = replicas.get(&svc.name).map(Vec::as_slice).unwrap_or_default();
        for port in &svc.published {
            let backends = list
                .iter()
                .filter(|r| r.health == control::gossip::Health::Healthy)
                .filter(|r| port.mode == PublishMode::Ingress || r.node == me)
                .map(|r| r.ip)
                .collect();
            out.push(Published { service: svc.name.clone(), port: *port, backends });
        }
    }
    out.sort_by_key(|p| (p.port.protocol, p.port.published));
    out
}

/// The `nft -f -` script that makes the host's table `ip overlayd_published` hold exactly
/// `published` (one transaction, the table rewritten whole; none: the table goes).
///
/// Per published port, a map from a Maglev slot to a replica's address and port, and a rule
/// (NAT prerouting) that sends a new connection to the port on any of the host's own
/// addresses, from anywhere but an overlay bridge or mesh port, to the replica of slot
/// `jhash(client address . client port)`, marked so that it leaves by the mesh port; the
/// chain `marked` marks the connection's later packets (both ways) the same way. A port
/// with no replica is refused at once (TCP reset, ICMP port unreachable) rather than left to
/// whatever listens on the host.
pub fn host_script(published: &[Published]) -> String {
    let t = format!("ip {HOST_TABLE}");
    let mut out =
        format!("# overlayd: ports published by services (rewritten whole by overlayd)\ntable {t}\ndelete table {t}\n");
    if published.is_empty() {
        return out;
    }
    let size = maglev::DEFAULT_SIZE;
    let mut maps = String::new();
    let mut rules = String::new();
    let mut unserved: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    let from_outside = "iifname != \"ovbr-*\" iifname != \"ovm-*\" fib daddr type local";
    for p in published {
        let proto = p.port.protocol.to_string();
        let comment = format!("{} {}", lb::comment_text(&p.service), p.port);
        if p.backends.is_empty() {
            unserved.entry(if proto == "tcp" { "tcp" } else { "udp" }).or_default().push(p.port.published);
            continue;
        }
        let map = format!("pub_{proto}_{}", p.port.published);
        let _ = writeln!(maps, "\tmap {map} {{");
        let _ = writeln!(maps, "\t\ttypeof numgen inc mod {size} : ip daddr . tcp dport");
        let _ = writeln!(maps, "\t\tcomment \"{comment}: Maglev slot to replica\"");
        lb::maglev_elements(&mut maps, &p.backends, size, |b| format!("{b} . {}", p.port.target));
        maps.push_str("\t}\n");
        let _ = writeln!(
            rules,
            "\t\t{from_outside} meta l4proto {proto} th dport {} meta mark set {MESH_MARK:#x} ct mark set {MESH_MARK:#x} \
             dnat ip to jhash ip saddr . th sport mod {size} seed {:#x} map @{map} comment \"{comment}\"",
            p.port.published,
            lb::HASH_SEED,
        );
    }
    let _ = writeln!(out, "table {t} {{");
    out.push_str("\tcomment \"overlayd: ports published by services, to their replicas anywhere\"\n");
    out.push_str(&maps);
    out.push_str("\tchain published {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n");
    out.push_str(&rules);
    out.push_str("\t}\n");
    out.push_str("\tchain marked {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n");
    let _ = writeln!(
        out,
        "\t\tct mark {MESH_MARK:#x} meta mark set ct mark comment \"a published connection: by the mesh port\""
    );
    out.push_str("\t}\n");
    out.push_str("\tchain unserved {\n\t\ttype filter hook input priority filter; policy accept;\n");
    for (proto, ports) in &unserved {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        let verdict = if *proto == "tcp" { "reject with tcp reset" } else { "reject" };
        let _ = writeln!(
            out,
            "\t\t{from_outside} meta l4proto {proto} th dport {{ {} }} counter {verdict} comment \"published, no replica\"",
            list.join(", ")
        );
    }
    out.push_str("\t}\n}\n");
    out
}

/// A host's mesh address on a network, as a replica's namespace needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeshHost {
    /// The mesh address: where answers go.
    pub addr: Ipv4Addr,
    /// Its network's subnet: connections from inside it are the overlay's own, not the mesh's.
    pub subnet: Ipv4Cidr,
}

impl MeshHost {
    /// The conntrack (and routing) mark of the connections it brought, and the number of the
    /// routing table that sends their answers to it: [`MESH_MARK`] with the address's low 16
    /// bits (unique among the hosts of a network whose blocks are at most /16 apart).
    pub fn mark(&self) -> u32 {
        MESH_MARK | (u32::from(self.addr) & 0xffff)
    }
}

/// Every host's mesh address on `network`.
pub fn mesh_hosts(view: &ClusterView, network: &str) -> Vec<MeshHost> {
    let Some(net) = view.networks.get(network) else { return Vec::new() };
    let mut out: Vec<MeshHost> = view
        .blocks
        .get(network)
        .into_iter()
        .flatten()
        .filter_map(|(_, b)| control::service::mesh_address(net.subnet, *b))
        .map(|addr| MeshHost { addr, subnet: net.subnet })
        .collect();
    out.sort();
    out
}

/// The `nft -f -` script of a replica's table `ip overlayd_mesh` (rewritten whole; no hosts:
/// the table goes): a new connection from outside the subnets, from a host's mesh MAC, is
/// marked with that host's mark, and so are the namespace's answers on it, which the rules of
/// [`route_answers`] send back to that host. Hosts whose marks collide keep the first.
pub fn replica_script(hosts: &[MeshHost]) -> String {
    let t = format!("ip {REPLICA_TABLE}");
    let mut out = format!(
        "# overlayd: answers to published ports' clients (rewritten whole by overlayd)\ntable {t}\ndelete table {t}\n"
    );
    if hosts.is_empty() {
        return out;
    }
    let mut marks = BTreeSet::new();
    let elements: Vec<String> = hosts
        .iter()
        .filter(|h| marks.insert(h.mark()))
        .map(|h| format!("{} : {:#x}", MacAddr::from_ipv4(h.addr), h.mark()))
        .collect();
    let subnets: BTreeSet<String> = hosts.iter().map(|h| h.subnet.to_string()).collect();
    let _ = writeln!(out, "table {t} {{");
    out.push_str(
        "\tcomment \"overlayd: answers to a published port's clients go back by the host that took them in\"\n",
    );
    let _ = writeln!(
        out,
        "\tmap ingress {{\n\t\ttype ether_addr : mark\n\t\telements = {{ {} }}\n\t}}",
        elements.join(", ")
    );
    out.push_str("\tchain ingress {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n");
    let _ = writeln!(
        out,
        "\t\tct state new ip saddr != {{ {} }} ct mark set ether saddr map @ingress comment \"from a host's mesh port\"",
        subnets.into_iter().collect::<Vec<_>>().join(", ")
    );
    out.push_str("\t}\n\tchain answers {\n\t\ttype route hook output priority mangle; policy accept;\n");
    let _ = writeln!(
        out,
        "\t\tct direction reply ct mark and 0xffff0000 == {MESH_MARK:#x} meta mark set ct mark comment \"by its host\""
    );
    out.push_str("\t}\n}\n");
    out
}

/// Makes the namespace at `netns` route what is marked for each of `hosts` to its mesh
/// address (a rule `fwmark M lookup M` and a default route in table M per host), and removes
/// the rules and routes of hosts that are not in it any more.
pub async fn route_answers(netns: &Path, hosts: &[MeshHost]) -> Result<()> {
    let mut wanted: BTreeMap<u32, Ipv4Addr> = BTreeMap::new();
    for h in hosts {
        wanted.entry(h.mark()).or_insert(h.addr);
    }
    let ns = crate::attach::Netns::open(netns.to_str(), None)?;
    ns.with_netlink(move |h| async move {
        use rtnetlink::packet_route::rule::RuleAttribute;
        let rules: Vec<_> = h.rule().get(rtnetlink::IpVersion::V4).execute().try_collect().await?;
        let mut have = BTreeSet::new();
        for r in rules {
            let mark = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::FwMark(m) => Some(*m),
                _ => None,
            });
            let table = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            });
            let Some(mark) = mark.filter(|m| m & 0xffff_0000 == MESH_MARK && table == Some(*m)) else { continue };
            if wanted.contains_key(&mark) {
                have.insert(mark);
                continue;
            }
            h.rule().del(r).execute().await.context("cannot remove a routing mesh rule")?;
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().table_id(mark).build();
            // The table's route may be gone already.
            let _ = h.route().del(route).execute().await;
        }
        for (mark, addr) in &wanted {
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().gateway(*addr).table_id(*mark).build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .with_context(|| format!("cannot route answers to the mesh address {addr}"))?;
            if !have.contains(mark) {
                let rule = h
                    .rule()
                    .add()
                    .v4()
                    .fw_mark(*mark)
                    .table_id(*mark)
                    .priority(crate::netdev::MESH_TABLE)
                    .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
                crate::netdev::ignore_exists(rule.execute().await).context("cannot add a routing mesh rule")?;
            }
        }
        Ok(())
    })
    .await
    .with_context(|| format!("cannot route published ports' answers in the network namespace {}", netns.display()))
}

/// Removes the host's table of published ports (when the agent stops).
pub async fn unpublish() -> Result<()> {
    load_here(host_script(&[])).await.context("cannot remove the published ports")
}

/// Runs `nft -f -` with `script` in the host's own namespace.
async fn load_here(script: String) -> Result<()> {
    tokio::task::spawn_blocking(move || crate::firewall::load(&crate::firewall::nft_program(), &script)).await?
}

impl ClusterRuntime {
    /// Keeps this host's published ports, its blocks in the networks that have them, and its
    /// replicas' answers in line with the cluster, for as long as the runtime lives.
    pub async fn publish_ports(self: Arc<Self>) {
        let mut views = self.follower.subscribe();
        let mut heard = self.gossip.subscribe();
        let mut local = self.gossip.local();
        let me = self.membership.node_id;
        let mut host_applied: Option<String> = None;
        let mut replicas_applied: HashMap<PathBuf, (String, Vec<MeshHost>)> = HashMap::new();
        let mut meshed: BTreeSet<String> = BTreeSet::new();
        loop {
            let view = self.follower.view();
            let replicas = {
                let h = Arc::clone(&heard.borrow_and_update());
                let l = Arc::clone(&local.borrow_and_update());
                super::replicas(&view, &h, &l, me)
            };
            // Every host is in the mesh of each network with a published port.
            let networks = control::service::published_networks(view.services.values());
            for net in &networks {
                if view.block(net, me).is_none()
                    && let Err(e) = self.lease_block(net).await
                {
                    tracing::warn!(network = %net, error = %format!("{e:#}"), "cannot join the routing mesh");
                }
            }
            let left: BTreeSet<String> = meshed.difference(&networks).cloned().collect();
            if !left.is_empty() {
                self.release_unused_blocks(left).await;
            }
            meshed.clone_from(&networks);
            let script = host_script(&published(&view, &replicas, me));
            if host_applied.as_ref() != Some(&script) {
                match load_here(script.clone()).await {
                    Ok(()) => host_applied = Some(script),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot program the published ports"),
                }
            }
            // The answers of this host's replicas of services with a published port.
            let mut wanted: HashMap<PathBuf, Vec<MeshHost>> = HashMap::new();
            {
                let store = self.endpoints.lock().await;
                for e in store.endpoints.iter().filter(|e| !e.netns.is_empty()) {
                    let publishes = e
                        .service
                        .as_ref()
                        .and_then(|s| view.services.get(s))
                        .is_some_and(|s| !s.published.is_empty() && s.network == e.network);
                    if publishes {
                        wanted.entry(PathBuf::from(&e.netns)).or_default().extend(mesh_hosts(&view, &e.network));
                    }
                }
            }
            for (netns, hosts) in &mut wanted {
                hosts.sort();
                hosts.dedup();
                let script = replica_script(hosts);
                if replicas_applied.get(netns).is_some_and(|(s, h)| *s == script && h == hosts) {
                    continue;
                }
                let done = lb::apply(netns, &script).await.and(route_answers(netns, hosts).await);
                match done {
                    Ok(()) => {
                        replicas_applied.insert(netns.clone(), (script, hosts.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot route a replica's answers")
                    }
                }
            }
            let stale: Vec<PathBuf> = replicas_applied.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
            for netns in stale {
                replicas_applied.remove(&netns);
                if netns.exists() {
                    let undone = lb::apply(&netns, &replica_script(&[])).await.and(route_answers(&netns, &[]).await);
                    if let Err(e) = undone {
                        tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot remove a replica's mesh routes");
                    }
                }
            }
            tokio::select! {
                r = views.changed() => if r.is_err() { break },
                r = heard.changed() => if r.is_err() { break },
                r = local.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use control::service::Protocol;

    use super::*;

    fn port(published: u16, target: u16, protocol: Protocol) -> PublishedPort {
        PublishedPort { published, target, protocol, mode: PublishMode::Ingress }
    }

    #[test]
    fn each_published_port_goes_to_its_replicas_by_maglev_and_one_with_none_is_refused() {
        let web = Published {
            service: "web".into(),
            port: port(8080, 80, Protocol::Tcp),
            backends: vec![Ipv4Addr::new(10, 128, 1, 2), Ipv4Addr::new(10, 128, 2, 2)],
        };
        let dns = Published { service: "dns".into(), port: port(5353, 53, Protocol::Udp), backends: vec![] };
        let s = host_script(&[web, dns]);
        assert!(s.starts_with("# overlayd"), "{s}");
        assert!(s.contains("table ip overlayd_published\ndelete table ip overlayd_published\n"));
        assert!(s.contains("map pub_tcp_8080"));
        assert!(s.contains(" : 10.128.1.2 . 80"), "replica and target port");
        assert!(s.contains(" : 10.128.2.2 . 80"));
        assert!(s.contains(
            "fib daddr type local meta l4proto tcp th dport 8080 meta mark set 0x6f6d0000 ct mark set 0x6f6d0000 dnat"
        ));
        assert!(s.contains("meta l4proto udp th dport { 5353 } counter reject"), "no replica: refused");
        assert!(!s.contains("pub_udp_5353"));
        assert_eq!(
            host_script(&[]),
            "# overlayd: ports published by services (rewritten whole by overlayd)\ntable ip overlayd_published\n\
             delete table ip overlayd_published\n",
            "nothing published: no table"
        );
    }

    #[test]
    fn a_replica_marks_what_each_hosts_mesh_port_brings_and_routes_the_answers_back() {
        let subnet: Ipv4Cidr = "10.128.0.0/16".parse().unwrap();
        let hosts = [
            MeshHost { addr: Ipv4Addr::new(10, 128, 0, 255), subnet },
            MeshHost { addr: Ipv4Addr::new(10, 128, 1, 255), subnet },
        ];
        assert_eq!(hosts[0].mark(), 0x6f6d_00ff);
        assert_eq!(hosts[1].mark(), 0x6f6d_01ff);
        let s = replica_script(&hosts);
        assert!(s.contains("elements = { 02:4f:0a:80:00:ff : 0x6f6d00ff, 02:4f:0a:80:01:ff : 0x6f6d01ff }"), "{s}");
        assert!(s.contains("ct state new ip saddr != { 10.128.0.0/16 } ct mark set ether saddr map @ingress"));
        assert!(s.contains("ct direction reply ct mark and 0xffff0000 == 0x6f6d0000 meta mark set ct mark"));
        assert!(!replica_script(&[]).contains('{'), "no hosts: no table");
    }
}
