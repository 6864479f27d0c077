//! Services (issue 15): one name and one virtual IP for several replicas.
//!
//! A service is in the replicated state (`control::service`); its replicas are endpoints whose
//! gossip record names it, each with the health its own host's checks found. This module
//! finds them; its submodules act on them:
//! - [`health`]: the health checks of this host's replicas;
//! - [`maglev`]: the consistent-hash table that picks a replica for a new connection;
//! - [`lb`]: the load balancer in each client container's own network namespace (nftables
//!   DNAT from the VIP to a replica, by the Maglev table), and the reset of connections to a
//!   replica that went;
//! - [`vip`]: the shell that keeps each local container's table equal to the cluster's
//!   services and their healthy replicas;
//! - [`mesh`]: the routing mesh, published ports on every host's addresses.

pub mod health;
pub mod lb;
pub mod maglev;
pub mod mesh;
pub mod vip;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use control::gossip::{Endpoint, EndpointKey, Health};
use control::state::{ClusterView, NodeId};

use crate::gossip::GossipView;

/// A replica as this host knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: NodeId,
    pub health: Health,
}

/// Every service's replicas, by service name, sorted by address: the endpoints on the
/// service's network that name it, this host's (`local`, as it publishes them) and those of
/// every other host gossip counts alive, each only within its owner's block (the rule of the
/// reconciler and of DNS).
pub fn replicas(
    view: &ClusterView,
    heard: &GossipView,
    local: &HashMap<EndpointKey, Endpoint>,
    me: NodeId,
) -> BTreeMap<String, Vec<Replica>> {
    let mut out: BTreeMap<String, Vec<Replica>> = view.services.keys().map(|name| (name.clone(), Vec::new())).collect();
    let mut add = |node: NodeId, k: &EndpointKey, e: &Endpoint| {
        let Some(name) = &e.service else { return };
        let Some(svc) = view.services.get(name) else { return };
        let Some(net) = view.networks.get(&svc.network) else { return };
        if net.vni != k.vni || view.block(&net.name, node).is_none_or(|b| !b.contains(k.ip)) {
            return;
        }
        if let Some(list) = out.get_mut(name) {
            list.push(Replica { name: e.name.clone(), ip: k.ip, node, health: e.health });
        }
    };
    for (k, e) in local {
        add(me, k, e);
    }
    for (&node, eps) in &heard.endpoints {
        if node == me || !heard.alive.contains(&node) {
            continue;
        }
        for (k, e) in eps {
            add(node, k, e);
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
    }
    out
}

/// The addresses of a service's replicas that get traffic: the healthy ones.
pub fn healthy(replicas: &[Replica]) -> Vec<Ipv4Addr> {
    replicas.iter().filter(|r| r.health == Health::Healthy).map(|r| r.ip).collect()
}

#[cfg(test)]
mod tests {
    use control::service::{NewService, ServiceMode};
    use control::state::{ClusterState, Command, NewNetwork, NewNode, Role};

    use super::*;

    fn node(name: &str, last: u8, role: Role) -> NewNode {
        NewNode {
            name: name.into(),
            underlay_addr: std::net::IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)),
            api_addr: format!("198.18.0.{last}:7947").parse().unwrap(),
            role,
            joined_at: 1,
            gossip_addr: format!("198.18.0.{last}:7946").parse().unwrap(),
            gossip_public_key: [last; 32],
            underlay_networks: Vec::new(),
        }
    }

    fn ep(ip: Ipv4Addr, name: &str, service: Option<&str>, health: Health) -> (EndpointKey, Endpoint) {
        let o = ip.octets();
        (
            EndpointKey { vni: 4096, ip },
            Endpoint {
                mac: [2, 0x4f, o[0], o[1], o[2], o[3]],
                name: name.into(),
                aliases: Vec::new(),
                service: service.map(str::to_owned),
                health,
            },
        )
    }

    #[test]
    fn replicas_are_the_endpoints_that_name_their_service_on_live_hosts_within_their_blocks() {
        let mut s = ClusterState::default();
        let secrets = control::state::Secrets {
            network_keys: Default::default(),
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            worker_token_hash: String::new(),
            manager_token_hash: String::new(),
            gossip_key: "00".repeat(32),
            worker_token: String::new(),
            manager_token: String::new(),
        };
        s.apply(&Command::Init { cluster_id: "c".into(), secrets, node: node("m", 1, Role::Manager) });
        for (name, last) in [("w2", 2), ("w3", 3)] {
            s.apply(&Command::AddNode(node(name, last, Role::Worker)));
        }
        let net = NewNetwork {
            key: None,
            name: "front".into(),
            vni: Some(4096),
            subnet: Some("10.128.0.0/16".parse().unwrap()),
            mtu: 1450,
            block_prefix: None,
            created_at: 1,
            internal: false,
        };
        s.apply(&Command::CreateNetwork(net));
        for n in 1..=3 {
            s.apply(&Command::LeaseBlock { network: "front".into(), node: n });
        }
        let svc = NewService {
            name: "web".into(),
            network: "front".into(),
            mode: ServiceMode::Vip,
            vip: None,
            ports: vec![],
            published: vec![],
            health: None,
            created_at: 1,
        };
        s.apply(&Command::CreateService(svc));
        let view = s.view();
        let ip = |h: u8, i: u8| Ipv4Addr::new(10, 128, h - 1, i);
        let local: HashMap<_, _> = [
            ep(ip(1, 1), "web1", Some("web"), Health::Healthy),
            ep(ip(1, 2), "other", None, Health::Healthy),
            ep(ip(1, 3), "ghost", Some("nope"), Health::Healthy),
        ]
        .into();
        let mut heard = GossipView { alive: [2].into(), ..Default::default() };
        heard.endpoints.insert(
            2,
            vec![
                ep(ip(2, 1), "web2", Some("web"), Health::Unhealthy),
                // Outside its owner's block: not a replica.
                ep(ip(3, 9), "thief", Some("web"), Health::Healthy),
            ],
        );
        // Host 3 is not alive: its replicas are not counted.
        heard.endpoints.insert(3, vec![ep(ip(3, 1), "web3", Some("web"), Health::Healthy)]);
        let r = replicas(&view, &heard, &local, 1);
        let web = &r["web"];
        let names: Vec<&str> = web.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["web1", "web2"]);
        assert_eq!(healthy(web), [ip(1, 1)], "the unhealthy one gets no traffic");
        assert_eq!(r.len(), 1, "only services of the state");
    }
}
