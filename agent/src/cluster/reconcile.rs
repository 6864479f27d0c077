//! The reconciler: keeps this host's networks and dataplane tables equal to what the Raft view
//! and gossip say. [`plan`] is pure (view, what gossip heard, this host → the wanted networks
//! and their tables); [`apply`] makes the host match a plan. It also keeps the firewall's list
//! of the cluster's gossip and control ports ([`service_ports`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use control::follower::Follower;
use control::state::{ClusterView, NodeId};
use dataplane::tables::BlockOwner;
use dataplane::{MacAddr, Vni};
use tokio::sync::Mutex;

use crate::endpoints::{self, EndpointStore};
use crate::gossip::{self, Gossip, GossipView};
use crate::host::{Gateway, Host, NetworkSpec, NetworkTables};

/// What one network should look like on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedNetwork {
    /// The bridge, TAP and gateway.
    pub spec: NetworkSpec,
    /// What its dataplane tables hold.
    pub tables: NetworkTables,
}

/// The networks this host should have up (every other one goes down), by name.
pub type Plan = BTreeMap<String, PlannedNetwork>;

/// The networks this host has a block in, each with: every other block's VTEP (marked down
/// while its host is down), the flood list of the live hosts that have a block, the gateway,
/// and the endpoints of the live hosts (each only within its owner's block: a host cannot
/// claim another's addresses, nor a group MAC); on a network with a published port, every
/// host's mesh address (the live ones' answered by ARP).
pub fn plan(view: &ClusterView, heard: &GossipView, me: NodeId, keys: &super::keys::Keys, now: u64) -> Plan {
    let mut wanted = Plan::new();
    let meshed = control::service::published_networks(view.services.values());
    for (name, net) in &view.networks {
        let Some(local_block) = view.block(name, me) else { continue };
        let Some(vni) = Vni::new(net.vni) else { continue };
        let mut tables = NetworkTables {
            flood: Vec::new(),
            block_prefix: net.block_prefix,
            blocks: Vec::new(),
            gateway: net.gateway,
            endpoints: Vec::new(),
            subnet: net.subnet,
            mesh: Vec::new(),
            crypto: net
                .encrypted
                .then(|| super::keys::sealing(net, keys.get(name).map(Vec::as_slice).unwrap_or_default(), now)),
        };
        for (&node, cidr) in view.blocks.get(name).into_iter().flatten() {
            // The routing mesh's addresses, on a network with a published port only.
            let mesh = control::service::mesh_address(net.subnet, *cidr).filter(|_| meshed.contains(name));
            tables.mesh.extend(mesh);
            if node == me {
                tables.blocks.push((cidr.addr(), BlockOwner::Local));
                continue;
            }
            let Some(n) = view.nodes.get(&node) else { continue };
            if !heard.alive.contains(&node) {
                tables.blocks.push((cidr.addr(), BlockOwner::Down(n.underlay_addr)));
                continue;
            }
            tables.blocks.push((cidr.addr(), BlockOwner::Remote(n.underlay_addr)));
            tables.flood.push(n.underlay_addr);
            if let Some(m) = mesh {
                tables.endpoints.push((m, MacAddr::from_ipv4(m), n.underlay_addr));
            }
            for (k, e) in heard.endpoints.get(&node).into_iter().flatten() {
                let mac = MacAddr(e.mac);
                if k.vni == net.vni && cidr.contains(k.ip) && !mac.is_multicast() {
                    tables.endpoints.push((k.ip, mac, n.underlay_addr));
                }
            }
        }
        let spec = NetworkSpec {
            name: name.clone(),
            vni,
            bridge: format!("ovbr-{name}"),
            tap: format!("ovt-{name}"),
            mtu: net.mtu,
            learning: false,
            encrypted: net.encrypted,
            gateway: Some(Gateway {
                addr: net.gateway,
                local_block,
                subnet: net.subnet,
                egress: !net.internal,
                mesh: control::service::mesh_address(net.subnet, local_block),
            }),
        };
        wanted.insert(name.clone(), PlannedNetwork { spec, tables });
    }
    wanted
}

/// The gossip (UDP) and control (TCP) ports of every host the view knows: closed to the
/// overlay on this host, and through it on every other.
pub fn service_ports(view: &ClusterView) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let gossip = view.nodes.values().map(|n| n.gossip_addr.port()).collect();
    let control = view.nodes.values().map(|n| n.api_addr.port()).collect();
    (gossip, control)
}

/// Makes the host match `plan`: networks not in it (or changed) go down, new ones come up
/// (with the containers attached before a restart bound again — their port's firewall and
/// the dataplane's binding — and put back on the new bridge), and every planned network's
/// tables are programmed.
pub async fn apply(host: &Host, plan: &Plan, endpoints: &Mutex<EndpointStore>) -> Result<()> {
    for (name, local) in host.networks().await {
        let Some(planned) = plan.get(&name) else {
            host.remove_network(&name).await?;
            continue;
        };
        // A new MTU is set in place: the containers keep their interfaces and connections.
        if planned.spec.mtu != local.spec.mtu
            && (NetworkSpec { mtu: local.spec.mtu, ..planned.spec.clone() }) == local.spec
        {
            let on_it: Vec<_> = endpoints.lock().await.in_network(&name).cloned().collect();
            host.set_network_mtu(&name, planned.spec.mtu, &on_it).await?;
        } else if planned.spec != local.spec {
            host.remove_network(&name).await?;
        }
    }
    for (name, planned) in plan {
        let new = !host.networks().await.contains_key(name);
        if new {
            host.add_network(planned.spec.clone()).await?;
        }
        // Tables first: an attach may be waiting for the network (holding the endpoint store)
        // and its container's first frames must find the other hosts.
        host.program_network(planned.spec.vni, &planned.tables)?;
        if new {
            let local = host.networks().await.remove(name).context("network vanished")?;
            for e in endpoints.lock().await.in_network(name) {
                host.bind_endpoint(e).await?;
                if crate::netdev::link_exists(&host.nl, &e.host_ifname).await? {
                    crate::netdev::enslave(&host.nl, &e.host_ifname, &local.bridge, planned.spec.mtu).await?;
                }
            }
        }
    }
    Ok(())
}

/// Keeps the host's networks and tables equal to what the Raft view and gossip say, gossip's
/// directory equal to the view's hosts, and this host's published endpoints equal to its own.
pub async fn run(
    host: Arc<Host>,
    follower: Arc<Follower>,
    store: Arc<Mutex<EndpointStore>>,
    gossip: Arc<Gossip>,
    me: NodeId,
    mut keys: tokio::sync::watch::Receiver<Arc<super::keys::Keys>>,
) {
    let mut views = follower.subscribe();
    let mut heard = gossip.subscribe();
    let mut directory = None;
    let mut pruned = false;
    loop {
        let view = views.borrow_and_update().clone();
        let g = heard.borrow_and_update().clone();
        let dir = gossip::directory(&view);
        if directory.as_ref() != Some(&dir) {
            gossip.set_directory(dir.clone());
            directory = Some(dir);
        }
        gossip.publish_local(endpoints::gossiped(&view, &*store.lock().await));
        let (gossip_ports, control_ports) = service_ports(&view);
        let firewalled = host.set_service_ports(gossip_ports, control_ports).await;
        let now = unix_now();
        let k = Arc::clone(&keys.borrow_and_update());
        if let Err(e) = firewalled.and(apply(&host, &plan(&view, &g, me, &k, now), &store).await) {
            tracing::warn!(error = %format!("{e:#}"), "could not bring the host in line with the cluster state; retrying");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        if !pruned && view.revision > 0 {
            // Every endpoint is bound again: what a crashed daemon left for others can go.
            match host.prune_firewall().await {
                Ok(()) => pruned = true,
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not remove stale firewall rules"),
            }
        }
        // A key rotation changes what is sealed with at set times, with nothing else changing.
        let next = super::keys::next_change(view.networks.values(), now)
            .map_or(Duration::from_secs(3600), |t| Duration::from_secs(t.saturating_sub(now)));
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            r = heard.changed() => if r.is_err() { return },
            r = keys.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use control::cidr::Ipv4Cidr;
    use control::gossip::{Endpoint, EndpointKey};
    use control::state::{Network, NodeRecord, NodeStatus, Role};

    use super::*;

    const VNI: u32 = 4096;

    fn vtep(id: NodeId) -> IpAddr {
        IpAddr::from([198, 18, 0, id as u8])
    }

    fn block(id: NodeId) -> Ipv4Cidr {
        format!("10.128.{id}.0/24").parse().unwrap()
    }

    /// Network "web" (10.128.0.0/16), hosts 1..=n each with block 10.128.ID.0/24.
    fn view(n: NodeId) -> ClusterView {
        let mut v = ClusterView { revision: 1, ..Default::default() };
        for id in 1..=n {
            v.nodes.insert(
                id,
                NodeRecord {
                    id,
                    name: format!("h{id}"),
                    underlay_addr: vtep(id),
                    api_addr: SocketAddr::new(vtep(id), 7947),
                    role: Role::Worker,
                    status: NodeStatus::Ready,
                    joined_at: 0,
                    gossip_addr: SocketAddr::new(vtep(id), 7946),
                    gossip_public_key: [0; 32],
                    underlay_networks: Vec::new(),
                    underlay_mtu: None,
                },
            );
            v.blocks.entry("web".into()).or_default().insert(id, block(id));
        }
        v.networks.insert(
            "web".into(),
            Network {
                encrypted: false,
                key_epoch: 0,
                key_made_at: 0,
                name: "web".into(),
                vni: VNI,
                subnet: "10.128.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 128, 0, 1),
                mtu: 1450,
                block_prefix: 24,
                created_at: 0,
                internal: false,
            },
        );
        v
    }

    fn endpoint(ip: [u8; 4]) -> (EndpointKey, Endpoint) {
        let ip = Ipv4Addr::from(ip);
        (
            EndpointKey { vni: VNI, ip },
            Endpoint {
                mac: MacAddr::from_ipv4(ip).0,
                name: format!("c{ip}"),
                aliases: Vec::new(),
                service: None,
                health: Default::default(),
            },
        )
    }

    fn heard(alive: &[NodeId], endpoints: &[(NodeId, (EndpointKey, Endpoint))]) -> GossipView {
        let mut g = GossipView { alive: alive.iter().copied().collect::<BTreeSet<_>>(), ..Default::default() };
        for (node, e) in endpoints {
            g.endpoints.entry(*node).or_default().push(e.clone());
        }
        g
    }

    fn plan_(v: &ClusterView, g: &GossipView, me: NodeId) -> Plan {
        plan(v, g, me, &super::super::keys::Keys::new(), 0)
    }

    /// The containers' entries of a plan's tables (not the hosts' mesh addresses).
    fn containers(t: &NetworkTables) -> Vec<(Ipv4Addr, MacAddr, IpAddr)> {
        t.endpoints.iter().filter(|e| !t.mesh.contains(&e.0)).copied().collect()
    }

    #[test]
    fn every_hosts_mesh_address_is_known_and_a_live_remote_ones_answered_by_arp() {
        let mut v = view(3);
        let t = &plan_(&v, &heard(&[2], &[]), 1)["web"].tables;
        assert!(t.mesh.is_empty() && t.endpoints.is_empty(), "no published port: no mesh");
        let published = control::service::PublishedPort {
            published: 8080,
            target: 80,
            protocol: control::service::Protocol::Tcp,
            mode: control::service::PublishMode::Ingress,
        };
        let svc = control::service::Service {
            name: "www".into(),
            network: "web".into(),
            mode: control::service::ServiceMode::Vip,
            vip: None,
            ports: vec![],
            published: vec![published],
            health: None,
            created_at: 0,
        };
        v.services.insert("www".into(), svc);
        let t = &plan_(&v, &heard(&[2], &[]), 1)["web"].tables;
        let m = |h| Ipv4Addr::new(10, 128, h, 255);
        assert_eq!(t.mesh, [m(1), m(2), m(3)]);
        assert_eq!(t.endpoints, [(m(2), MacAddr::from_ipv4(m(2)), vtep(2))], "host 3 is down, host 1 is this one");
        assert_eq!(t.subnet, "10.128.0.0/16".parse().unwrap());
    }

    #[test]
    fn a_network_is_up_only_where_this_host_has_a_block() {
        let v = view(2);
        let p = plan_(&v, &heard(&[2], &[]), 1);
        let web = &p["web"];
        assert_eq!((web.spec.bridge.as_str(), web.spec.tap.as_str()), ("ovbr-web", "ovt-web"));
        let subnet = "10.128.0.0/16".parse().unwrap();
        let mesh = Some(Ipv4Addr::new(10, 128, 1, 255));
        let gateway = Gateway { addr: Ipv4Addr::new(10, 128, 0, 1), local_block: block(1), subnet, egress: true, mesh };
        assert_eq!(web.spec.gateway, Some(gateway));
        assert!(!web.spec.learning, "a cluster network learns nothing from the data plane");
        assert!(plan_(&v, &heard(&[1, 2], &[]), 3).is_empty(), "host 3 has no block: no network up");
    }

    #[test]
    fn an_internal_networks_gateway_leads_nowhere() {
        let mut v = view(2);
        v.networks.get_mut("web").unwrap().internal = true;
        let p = plan_(&v, &heard(&[2], &[]), 1);
        assert!(!p["web"].spec.gateway.unwrap().egress);
    }

    #[test]
    fn a_host_that_is_down_is_not_flooded_to_and_its_block_and_endpoints_are_withdrawn() {
        let v = view(3);
        let eps = [(2, endpoint([10, 128, 2, 5])), (3, endpoint([10, 128, 3, 5]))];
        let t = &plan_(&v, &heard(&[2], &eps), 1)["web"].tables;
        assert_eq!(t.flood, [vtep(2)], "host 3 is down: only host 2 is flooded to");
        assert_eq!(
            t.blocks,
            [
                (Ipv4Addr::new(10, 128, 1, 0), BlockOwner::Local),
                (Ipv4Addr::new(10, 128, 2, 0), BlockOwner::Remote(vtep(2))),
                (Ipv4Addr::new(10, 128, 3, 0), BlockOwner::Down(vtep(3))),
            ]
        );
        let ip = Ipv4Addr::new(10, 128, 2, 5);
        assert_eq!(containers(t), [(ip, MacAddr::from_ipv4(ip), vtep(2))], "host 3's endpoint is not installed");
        let back = &plan_(&v, &heard(&[2, 3], &eps), 1)["web"].tables;
        assert_eq!(back.flood, [vtep(2), vtep(3)], "host 3 is back");
        assert_eq!(containers(back).len(), 2);
    }

    #[test]
    fn an_endpoint_outside_its_owners_block_a_group_mac_or_another_vni_is_ignored() {
        let v = view(3);
        let mut group = endpoint([10, 128, 2, 7]);
        group.1.mac = [0x01, 0, 0x5e, 0, 0, 1];
        let mut other_vni = endpoint([10, 128, 2, 8]);
        other_vni.0.vni = VNI + 1;
        let eps = [
            (2, endpoint([10, 128, 2, 6])),
            (2, endpoint([10, 128, 3, 6])), // host 2 claims an address of host 3's block
            (2, endpoint([10, 128, 1, 6])), // … and one of this host's
            (2, group),
            (2, other_vni),
        ];
        let t = &plan_(&v, &heard(&[2, 3], &eps), 1)["web"].tables;
        let ip = Ipv4Addr::new(10, 128, 2, 6);
        assert_eq!(containers(t), [(ip, MacAddr::from_ipv4(ip), vtep(2))]);
    }

    #[test]
    fn a_block_that_changes_owner_follows_its_new_owner() {
        let mut v = view(3);
        let eps = [(2, endpoint([10, 128, 3, 9])), (3, endpoint([10, 128, 3, 9]))];
        let before = &plan_(&v, &heard(&[2, 3], &eps), 1)["web"].tables;
        let ip = Ipv4Addr::new(10, 128, 3, 9);
        assert_eq!(containers(before), [(ip, MacAddr::from_ipv4(ip), vtep(3))], "the block is host 3's");
        // Host 3 is removed and its block leased again, to host 2.
        v.nodes.remove(&3);
        let web = v.blocks.get_mut("web").unwrap();
        web.remove(&3);
        web.insert(2, block(3));
        let after = &plan_(&v, &heard(&[2], &eps), 1)["web"].tables;
        assert!(after.blocks.contains(&(Ipv4Addr::new(10, 128, 3, 0), BlockOwner::Remote(vtep(2)))));
        assert_eq!(containers(after), [(ip, MacAddr::from_ipv4(ip), vtep(2))], "now host 2's endpoint");
        assert_eq!(after.flood, [vtep(2)]);
    }

    #[test]
    fn a_block_of_a_host_the_view_does_not_know_is_skipped() {
        let mut v = view(2);
        v.nodes.remove(&2);
        let t = &plan_(&v, &heard(&[2], &[(2, endpoint([10, 128, 2, 5]))]), 1)["web"].tables;
        assert_eq!(t.blocks, [(Ipv4Addr::new(10, 128, 1, 0), BlockOwner::Local)]);
        assert!(t.flood.is_empty() && t.endpoints.is_empty());
    }
}
