//! Conversions between the replicated state's types and their protobuf messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proto as pb;

use crate::cidr::Ipv4Cidr;
use crate::service::{HealthCheck, HealthProbe, NewService, PublishedPort, Service, ServicePort};
use crate::state::{Block, Change, ClusterView, Network, NodeRecord, NodeStatus, Role};

/// A message that does not describe a valid value.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    /// Which message.
    pub what: &'static str,
    /// What is wrong with it.
    pub why: String,
}

fn parse<T: std::str::FromStr>(what: &'static str, s: &str) -> Result<T, Malformed>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| Malformed { what, why: format!("{s:?}: {e}") })
}

impl From<Role> for pb::Role {
    fn from(r: Role) -> pb::Role {
        match r {
            Role::Manager => pb::Role::Manager,
            Role::Worker => pb::Role::Worker,
        }
    }
}

/// The role a protobuf enum value names.
pub fn role_from_pb(v: i32) -> Result<Role, Malformed> {
    match pb::Role::try_from(v) {
        Ok(pb::Role::Manager) => Ok(Role::Manager),
        Ok(pb::Role::Worker) => Ok(Role::Worker),
        _ => Err(Malformed { what: "role", why: format!("unknown value {v}") }),
    }
}

impl From<&NodeRecord> for pb::Node {
    fn from(n: &NodeRecord) -> pb::Node {
        pb::Node {
            id: n.id,
            name: n.name.clone(),
            underlay_addr: n.underlay_addr.to_string(),
            api_addr: n.api_addr.to_string(),
            role: pb::Role::from(n.role) as i32,
            status: match n.status {
                NodeStatus::Ready => pb::NodeStatus::Ready,
                NodeStatus::Down => pb::NodeStatus::Down,
            } as i32,
            joined_at_unix: n.joined_at,
            gossip_addr: n.gossip_addr.to_string(),
            gossip_public_key: n.gossip_public_key.to_vec(),
            underlay_networks: n.underlay_networks.iter().map(ToString::to_string).collect(),
            underlay_mtu: n.underlay_mtu,
        }
    }
}

impl TryFrom<&pb::Node> for NodeRecord {
    type Error = Malformed;
    fn try_from(n: &pb::Node) -> Result<NodeRecord, Malformed> {
        Ok(NodeRecord {
            id: n.id,
            name: n.name.clone(),
            underlay_addr: parse::<IpAddr>("node", &n.underlay_addr)?,
            api_addr: parse::<SocketAddr>("node", &n.api_addr)?,
            role: role_from_pb(n.role)?,
            status: match pb::NodeStatus::try_from(n.status) {
                Ok(pb::NodeStatus::Down) => NodeStatus::Down,
                _ => NodeStatus::Ready,
            },
            joined_at: n.joined_at_unix,
            gossip_addr: parse::<SocketAddr>("node", &n.gossip_addr)?,
            gossip_public_key: n
                .gossip_public_key
                .as_slice()
                .try_into()
                .map_err(|_| Malformed { what: "node", why: "a gossip public key has 32 bytes".into() })?,
            underlay_networks: underlay_networks(&n.underlay_networks)
                .map_err(|why| Malformed { what: "node", why })?,
            underlay_mtu: n.underlay_mtu,
        })
    }
}

/// The IPv4 networks a host reports ([`NodeRecord::underlay_networks`]), sorted and without
/// repeats, so that the same networks always make the same record.
pub fn underlay_networks(given: &[String]) -> Result<Vec<Ipv4Cidr>, String> {
    let mut networks = given
        .iter()
        .map(|s| s.parse::<Ipv4Cidr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("underlay network: {e}"))?;
    networks.sort();
    networks.dedup();
    Ok(networks)
}

impl From<&Network> for pb::Network {
    fn from(n: &Network) -> pb::Network {
        pb::Network {
            name: n.name.clone(),
            vni: n.vni,
            subnet: n.subnet.to_string(),
            gateway: n.gateway.to_string(),
            mtu: n.mtu,
            block_prefix: u32::from(n.block_prefix),
            created_at_unix: n.created_at,
            internal: n.internal,
            encrypted: n.encrypted,
            key_epoch: n.key_epoch,
            key_made_at_unix: n.key_made_at,
        }
    }
}

impl TryFrom<&pb::Network> for Network {
    type Error = Malformed;
    fn try_from(n: &pb::Network) -> Result<Network, Malformed> {
        Ok(Network {
            name: n.name.clone(),
            vni: n.vni,
            subnet: parse::<Ipv4Cidr>("network", &n.subnet)?,
            gateway: parse::<Ipv4Addr>("network", &n.gateway)?,
            mtu: n.mtu,
            block_prefix: u8::try_from(n.block_prefix)
                .map_err(|_| Malformed { what: "network", why: "block prefix above 255".into() })?,
            created_at: n.created_at_unix,
            internal: n.internal,
            encrypted: n.encrypted,
            key_epoch: n.key_epoch,
            key_made_at: n.key_made_at_unix,
        })
    }
}

impl From<&Block> for pb::Block {
    fn from(b: &Block) -> pb::Block {
        pb::Block { network: b.network.clone(), node_id: b.node, cidr: b.cidr.to_string() }
    }
}

impl TryFrom<&pb::Block> for Block {
    type Error = Malformed;
    fn try_from(b: &pb::Block) -> Result<Block, Malformed> {
        Ok(Block { network: b.network.clone(), node: b.node_id, cidr: parse::<Ipv4Cidr>("block", &b.cidr)? })
    }
}

impl From<&ClusterView> for pb::ClusterView {
    fn from(v: &ClusterView) -> pb::ClusterView {
        pb::ClusterView {
            cluster_id: v.cluster_id.clone(),
            revision: v.revision,
            nodes: v.nodes.values().map(pb::Node::from).collect(),
            networks: v.networks.values().map(pb::Network::from).collect(),
            blocks: v
                .blocks
                .iter()
                .flat_map(|(net, m)| {
                    m.iter().map(move |(node, cidr)| Block { network: net.clone(), node: *node, cidr: *cidr })
                })
                .map(|b| pb::Block::from(&b))
                .collect(),
            gossip_key_generation: v.gossip_key_generation,
            removed: v.removed.iter().copied().collect(),
            services: v.services.values().map(pb::Service::from).collect(),
        }
    }
}

impl TryFrom<&pb::ClusterView> for ClusterView {
    type Error = Malformed;
    fn try_from(v: &pb::ClusterView) -> Result<ClusterView, Malformed> {
        let mut view = ClusterView {
            cluster_id: v.cluster_id.clone(),
            revision: v.revision,
            gossip_key_generation: v.gossip_key_generation,
            removed: v.removed.iter().copied().collect(),
            ..Default::default()
        };
        for n in &v.nodes {
            let n = NodeRecord::try_from(n)?;
            view.nodes.insert(n.id, n);
        }
        for n in &v.networks {
            let n = Network::try_from(n)?;
            view.networks.insert(n.name.clone(), n);
        }
        for b in &v.blocks {
            let b = Block::try_from(b)?;
            view.blocks.entry(b.network).or_default().insert(b.node, b.cidr);
        }
        for s in &v.services {
            let s = Service::try_from(s)?;
            view.services.insert(s.name.clone(), s);
        }
        Ok(view)
    }
}

impl From<&Change> for pb::Change {
    fn from(c: &Change) -> pb::Change {
        use pb::change::Kind;
        let kind = match c {
            Change::NodeUpsert(n) => Kind::NodeUpsert(n.into()),
            Change::NodeRemove(id) => Kind::NodeRemove(*id),
            Change::NetworkUpsert(n) => Kind::NetworkUpsert(n.into()),
            Change::NetworkRemove(name) => Kind::NetworkRemove(name.clone()),
            Change::BlockUpsert(b) => Kind::BlockUpsert(b.into()),
            Change::BlockRemove { network, node } => {
                Kind::BlockRemove(pb::BlockKey { network: network.clone(), node_id: *node })
            }
            Change::GossipKeyRotated(generation) => Kind::GossipKeyRotated(*generation),
            Change::ServiceUpsert(svc) => Kind::ServiceUpsert(svc.into()),
            Change::ServiceRemove(name) => Kind::ServiceRemove(name.clone()),
        };
        pb::Change { kind: Some(kind) }
    }
}

impl TryFrom<&pb::Change> for Change {
    type Error = Malformed;
    fn try_from(c: &pb::Change) -> Result<Change, Malformed> {
        use pb::change::Kind;
        Ok(match c.kind.as_ref().ok_or(Malformed { what: "change", why: "empty".into() })? {
            Kind::NodeUpsert(n) => Change::NodeUpsert(n.try_into()?),
            Kind::NodeRemove(id) => Change::NodeRemove(*id),
            Kind::NetworkUpsert(n) => Change::NetworkUpsert(n.try_into()?),
            Kind::NetworkRemove(name) => Change::NetworkRemove(name.clone()),
            Kind::BlockUpsert(b) => Change::BlockUpsert(b.try_into()?),
            Kind::BlockRemove(k) => Change::BlockRemove { network: k.network.clone(), node: k.node_id },
            Kind::GossipKeyRotated(generation) => Change::GossipKeyRotated(*generation),
            Kind::ServiceUpsert(svc) => Change::ServiceUpsert(svc.try_into()?),
            Kind::ServiceRemove(name) => Change::ServiceRemove(name.clone()),
        })
    }
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> pb::Service {
        pb::Service {
            name: s.name.clone(),
            network: s.network.clone(),
            mode: s.mode.to_string(),
            vip: s.vip.map(|v| v.to_string()).unwrap_or_default(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort { port: p.port.into(), protocol: p.protocol.to_string() })
                .collect(),
            published: s
                .published
                .iter()
                .map(|p| pb::PublishedPort {
                    published: p.published.into(),
                    target: p.target.into(),
                    protocol: p.protocol.to_string(),
                    mode: p.mode.to_string(),
                })
                .collect(),
            health: s.health.as_ref().map(|h| {
                let (kind, target) = match &h.probe {
                    HealthProbe::Tcp(p) => ("tcp", p.to_string()),
                    HealthProbe::Http(path) => ("http", path.clone()),
                    HealthProbe::Cmd(c) => ("cmd", c.clone()),
                };
                pb::HealthCheck {
                    kind: kind.into(),
                    target,
                    interval_ms: h.interval_ms,
                    timeout_ms: h.timeout_ms,
                    retries: h.retries,
                    start_period_ms: h.start_period_ms,
                }
            }),
            created_at_unix: s.created_at,
        }
    }
}

fn port16(what: &'static str, v: u32) -> Result<u16, Malformed> {
    u16::try_from(v).ok().filter(|p| *p != 0).ok_or(Malformed { what, why: format!("port {v} is not 1 to 65535") })
}

/// The service a create request asks for (its VIP may be empty: chosen by the managers), not
/// yet checked against the state.
pub fn new_service_from_pb(s: &pb::Service, created_at: u64) -> Result<NewService, Malformed> {
    let bad = |why: String| Malformed { what: "service", why };
    let ports = s
        .ports
        .iter()
        .map(|p| Ok(ServicePort { port: port16("service port", p.port)?, protocol: p.protocol.parse().map_err(bad)? }))
        .collect::<Result<Vec<_>, Malformed>>()?;
    let published = s
        .published
        .iter()
        .map(|p| {
            Ok(PublishedPort {
                published: port16("published port", p.published)?,
                target: port16("target port", p.target)?,
                protocol: p.protocol.parse().map_err(bad)?,
                mode: match p.mode.as_str() {
                    "" | "ingress" => crate::service::PublishMode::Ingress,
                    "host" => crate::service::PublishMode::Host,
                    m => return Err(bad(format!("{m:?} is not a publish mode: ingress or host"))),
                },
            })
        })
        .collect::<Result<Vec<_>, Malformed>>()?;
    let health = match &s.health {
        None => None,
        Some(h) => Some(HealthCheck {
            probe: match h.kind.as_str() {
                "tcp" => HealthProbe::Tcp(
                    h.target.parse().map_err(|_| bad(format!("{:?} is not a TCP port to check", h.target)))?,
                ),
                "http" => HealthProbe::Http(h.target.clone()),
                "cmd" => HealthProbe::Cmd(h.target.clone()),
                k => return Err(bad(format!("{k:?} is not a health check: tcp, http or cmd"))),
            },
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            retries: h.retries,
            start_period_ms: h.start_period_ms,
        }),
    };
    Ok(NewService {
        name: s.name.clone(),
        network: s.network.clone(),
        mode: if s.mode.is_empty() { Default::default() } else { s.mode.parse().map_err(bad)? },
        vip: if s.vip.is_empty() { None } else { Some(parse("VIP", &s.vip)?) },
        ports,
        published,
        health,
        created_at,
    })
}

impl TryFrom<&pb::Service> for Service {
    type Error = Malformed;
    fn try_from(s: &pb::Service) -> Result<Service, Malformed> {
        new_service_from_pb(s, s.created_at_unix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterState, Command, NewNetwork, NewNode};

    #[test]
    fn a_view_and_its_changes_survive_the_wire() {
        let mut s = ClusterState::default();
        let secrets = crate::state::testing::secrets();
        let node = NewNode {
            joined_at: 5,
            underlay_networks: vec!["198.18.0.0/15".parse().unwrap(), "172.17.0.0/16".parse().unwrap()],
            ..crate::state::testing::new_node("m1", 1, Role::Manager)
        };
        let (_, mut changes) = s.apply(&Command::Init { cluster_id: "c".into(), secrets, node });
        changes.extend(
            s.apply(&Command::CreateNetwork(NewNetwork {
                key: None,
                name: "a".into(),
                vni: None,
                subnet: None,
                mtu: 1450,
                block_prefix: None,
                created_at: 6,
                internal: false,
            }))
            .1,
        );
        changes.extend(
            s.apply(&Command::CreateNetwork(NewNetwork {
                key: None,
                name: "b".into(),
                vni: None,
                subnet: None,
                mtu: 1450,
                block_prefix: None,
                created_at: 7,
                internal: true,
            }))
            .1,
        );
        changes.extend(s.apply(&Command::LeaseBlock { network: "a".into(), node: 1 }).1);
        let web = crate::service::NewService {
            name: "web".into(),
            network: "a".into(),
            mode: crate::service::ServiceMode::Vip,
            vip: None,
            ports: vec!["80/tcp".parse().unwrap(), "53/udp".parse().unwrap()],
            published: vec!["8080:80".parse().unwrap(), "8053:53/udp,host".parse().unwrap()],
            health: Some(HealthCheck {
                probe: HealthProbe::Http("/health".into()),
                interval_ms: 1_000,
                timeout_ms: 500,
                retries: 2,
                start_period_ms: 3_000,
            }),
            created_at: 8,
        };
        changes.extend(s.apply(&Command::CreateService(web)).1);
        let cmd = crate::service::NewService {
            name: "db".into(),
            mode: crate::service::ServiceMode::Dnsrr,
            health: Some(HealthCheck {
                probe: HealthProbe::Cmd("pg_isready".into()),
                interval_ms: 1_000,
                timeout_ms: 500,
                retries: 2,
                start_period_ms: 0,
            }),
            ports: vec![],
            published: vec![],
            vip: None,
            network: "a".into(),
            created_at: 9,
        };
        changes.extend(s.apply(&Command::CreateService(cmd)).1);
        changes.extend(s.apply(&Command::RemoveService { name: "db".into() }).1);
        assert_eq!(changes.iter().filter(|c| matches!(c, Change::ServiceUpsert(_))).count(), 2);
        changes.extend(s.apply(&Command::AddNode(crate::state::testing::new_node("w", 2, Role::Worker))).1);
        changes.extend(
            s.apply(&Command::RemoveNode {
                id: 2,
                gossip_key: Some("11".repeat(32)),
                network_keys: Default::default(),
                at: 0,
            })
            .1,
        );
        assert!(changes.contains(&Change::GossipKeyRotated(1)));
        let view = s.view();
        assert!(view.networks["b"].internal && !view.networks["a"].internal);
        assert_eq!(ClusterView::try_from(&pb::ClusterView::from(&view)).unwrap(), view);
        for c in &changes {
            assert_eq!(&Change::try_from(&pb::Change::from(c)).unwrap(), c);
        }
        let bad = pb::Network { subnet: "10.0.0.1/8".into(), ..pb::Network::from(&view.networks["a"]) };
        assert!(Network::try_from(&bad).unwrap_err().to_string().contains("host bits"));
    }
}
