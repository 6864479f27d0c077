//! The replicated cluster state and the commands that change it.
//!
//! Every manager applies the same commands in Raft log order, so [`ClusterState::apply`] must
//! be deterministic: no clock, no randomness, no I/O — times and secrets come inside the
//! command from whoever proposed it. Automatic choices (a network's VNI and subnet, a host's
//! address block) are the lowest free value, so every replica makes the same one. Each applied
//! command yields the [`Change`]s it made, which the watch streams to hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Cidr;
pub use crate::service::{NewService, Service, ServiceMode};

/// A node's id in the cluster (also its Raft id, for managers).
pub type NodeId = u64;

/// The lowest VNI chosen automatically (lower ones are left for static networks).
pub const FIRST_AUTO_VNI: u32 = 4096;

/// Where automatically chosen subnets come from, a /16 at a time.
pub const DEFAULT_ADDRESS_POOL: &str = "10.128.0.0/9";

/// Networks sorted and without repeats: one set, one record.
fn normalized(networks: &[Ipv4Cidr]) -> Vec<Ipv4Cidr> {
    let mut v = networks.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Address ranges no network's subnet may overlap, and what they are.
pub const RESERVED_RANGES: [(&str, &str); 5] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the broadcast address"),
];

/// Prefix length of automatically chosen subnets.
pub const AUTO_SUBNET_PREFIX: u8 = 16;

/// What a node does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A Raft voter: holds the replicated state and answers the manager API.
    Manager,
    /// Follows the state from a manager.
    Worker,
}

impl Role {
    /// The role's name as written in certificates (OU), tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("{s:?} is not a role (manager or worker)")),
        }
    }
}

/// Whether a node is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// It reports to the managers.
    Ready,
    /// It stopped reporting; its blocks stay leased until it is removed.
    Down,
}

/// A host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Cluster-wide id.
    pub id: NodeId,
    /// Unique name (the host name by default).
    pub name: String,
    /// Its VTEP address: where other hosts send its VXLAN.
    pub underlay_addr: IpAddr,
    /// Where its control API (gRPC over mutual TLS) listens.
    pub api_addr: SocketAddr,
    /// Manager or worker.
    pub role: Role,
    /// Ready or down.
    pub status: NodeStatus,
    /// When it joined (Unix seconds, from the proposer's clock).
    pub joined_at: u64,
    /// Where its gossip socket is (UDP).
    pub gossip_addr: SocketAddr,
    /// The public half of its gossip signing key: its endpoint records must verify under it.
    pub gossip_public_key: [u8; 32],
    /// The IPv4 networks of its own addresses (its underlay's and its other interfaces'), as it
    /// reported them at join or since: no overlay network may overlap them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub underlay_networks: Vec<Ipv4Cidr>,
    /// The MTU of its underlay interface, as it last reported it (hosts report it at start
    /// and when it changes; older records have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mtu: Option<u32>,
}

/// Bytes VXLAN adds to a frame on an underlay of `addr`'s family: outer IPv4 (20) or IPv6 (40),
/// UDP (8), VXLAN (8) and the inner Ethernet header (14).
pub fn vxlan_overhead(addr: IpAddr) -> u32 {
    if addr.is_ipv4() { 50 } else { 70 }
}

/// The largest network MTU every node's underlay carries ([`NodeRecord::underlay_mtu`] less
/// [`vxlan_overhead`]), over the nodes that reported one; `None` if none did.
pub fn smallest_network_mtu<'a>(nodes: impl IntoIterator<Item = &'a NodeRecord>) -> Option<u32> {
    nodes.into_iter().filter_map(|n| Some(n.underlay_mtu?.saturating_sub(vxlan_overhead(n.underlay_addr)))).min()
}

/// The MTUs a network may have.
pub const NETWORK_MTU: std::ops::RangeInclusive<u32> = 576..=9000;

/// An overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Unique name.
    pub name: String,
    /// Its VXLAN Network Identifier.
    pub vni: u32,
    /// The addresses of its containers.
    pub subnet: Ipv4Cidr,
    /// The default gateway containers get (the subnet's first address).
    pub gateway: Ipv4Addr,
    /// The MTU of its bridges, TAPs and containers.
    pub mtu: u32,
    /// Prefix length of the block each host leases from the subnet.
    pub block_prefix: u8,
    /// When it was created (Unix seconds).
    pub created_at: u64,
    /// No way out: its containers reach the overlay and nothing beyond it (`network create
    /// --internal`). Otherwise each host forwards its containers' traffic out, masqueraded.
    /// Absent in logs and snapshots from before egress: not internal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    /// Its datagrams between hosts are sealed (`network create --encrypted`) with the key of
    /// epoch [`Network::key_epoch`], which the managers keep in [`Secrets::network_keys`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// How many times its key was rotated (0: the key it was created with).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_epoch: u32,
    /// When its key was last made (Unix seconds): hosts send with a new key a few seconds
    /// after, and accept the one before it for a while longer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_made_at: u64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A network key of one epoch, as the managers keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochKey {
    /// The epoch ([`Network::key_epoch`] when it was made).
    pub epoch: u32,
    /// The key (hex, 32 bytes).
    pub key: String,
}

/// An address block of one host in one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The network.
    pub network: String,
    /// The host.
    pub node: NodeId,
    /// Its addresses.
    pub cidr: Ipv4Cidr,
}

/// What only managers may know: the CA key (to sign joiners' certificates), the join tokens
/// (their hashes to check a joiner's secret, the tokens themselves for `overlayd join-token`
/// to print) and the gossip key. Never sent to a watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    /// The cluster CA's certificate.
    pub ca_cert_pem: String,
    /// The cluster CA's private key.
    pub ca_key_pem: String,
    /// SHA-256 (hex) of the worker token's secret.
    pub worker_token_hash: String,
    /// SHA-256 (hex) of the manager token's secret.
    pub manager_token_hash: String,
    /// The gossip key (hex, 32 bytes) every host seals its gossip datagrams with.
    pub gossip_key: String,
    /// The worker token itself, for `overlayd join-token worker` (empty in a cluster made
    /// before tokens were kept: rotate it to have one).
    #[serde(default)]
    pub worker_token: String,
    /// The manager token itself.
    #[serde(default)]
    pub manager_token: String,
    /// Each encrypted network's keys: the current one last, the one before it (still
    /// accepted for a while after a rotation) before it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_keys: BTreeMap<String, Vec<EpochKey>>,
}

/// A host that is joining (its id is chosen by the state machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNode {
    /// Unique name.
    pub name: String,
    /// VTEP address.
    pub underlay_addr: IpAddr,
    /// Control API address.
    pub api_addr: SocketAddr,
    /// Manager or worker.
    pub role: Role,
    /// When (Unix seconds).
    pub joined_at: u64,
    /// Gossip socket.
    pub gossip_addr: SocketAddr,
    /// Public half of its gossip signing key.
    pub gossip_public_key: [u8; 32],
    /// The IPv4 networks of its own addresses ([`NodeRecord::underlay_networks`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub underlay_networks: Vec<Ipv4Cidr>,
}

/// A network that `network create` asks for (its VNI, subnet and block size chosen when not given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNetwork {
    /// Unique name.
    pub name: String,
    /// VNI, or the lowest free one from [`FIRST_AUTO_VNI`].
    pub vni: Option<u32>,
    /// Subnet, or the lowest free /16 of the address pool.
    pub subnet: Option<Ipv4Cidr>,
    /// MTU of the network.
    pub mtu: u32,
    /// Block prefix length, or subnet prefix + 8 (at most /28).
    pub block_prefix: Option<u8>,
    /// When (Unix seconds).
    pub created_at: u64,
    /// No egress ([`Network::internal`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    /// Sealed between hosts ([`Network::encrypted`]): with this key (hex, 32 bytes), which
    /// the proposing manager made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A change to the cluster state: the Raft log's entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// `Init` (with the secrets) is far larger than the rest, and written once per cluster: boxing
// it would only change how it is built.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Makes a new cluster with its first node (a manager).
    Init {
        /// Random id of the cluster.
        cluster_id: String,
        /// CA and token hashes.
        secrets: Secrets,
        /// The first manager.
        node: NewNode,
    },
    /// Adds a node; answers with its record (and id).
    AddNode(NewNode),
    /// Removes a node and frees its blocks; its id is remembered as removed, never to be
    /// a member again.
    RemoveNode {
        /// Which.
        id: NodeId,
        /// A new gossip key (hex, 32 bytes) that replaces the one the removed node holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gossip_key: Option<String>,
        /// New keys for encrypted networks (hex, by network), that replace those the removed
        /// node holds.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        network_keys: BTreeMap<String, String>,
        /// When the removal happened (Unix seconds), for the new keys' age.
        #[serde(default, skip_serializing_if = "is_zero")]
        at: u64,
    },
    /// Replaces an encrypted network's key with a new epoch; the old one is kept as the one
    /// before it (the one before that goes).
    RotateNetworkKey {
        /// Which network.
        network: String,
        /// The new key (hex, 32 bytes).
        key: String,
        /// When (Unix seconds).
        at: u64,
    },
    /// Makes a node a manager or a worker (its Raft vote is added or removed apart).
    SetRole {
        /// Which node.
        id: NodeId,
        /// Its role from now on.
        role: Role,
    },
    /// Records the MTU of a host's underlay interface (it reports it at start and when it
    /// changes).
    SetUnderlayMtu {
        /// Which host.
        id: NodeId,
        /// Its underlay MTU now.
        mtu: u32,
    },
    /// Changes a network's MTU (every host sets its bridge, TAP and containers to it).
    SetNetworkMtu {
        /// Which network.
        network: String,
        /// The new MTU.
        mtu: u32,
    },
    /// Replaces a join token: joiners with the old one are refused from then on.
    RotateJoinToken {
        /// Which token.
        role: Role,
        /// The new token, whole (for `overlayd join-token` to print).
        token: String,
        /// SHA-256 (hex) of its secret (what a joiner's secret is checked against).
        secret_hash: String,
    },
    /// Marks a node ready or down.
    SetNodeStatus {
        /// Which.
        id: NodeId,
        /// New status.
        status: NodeStatus,
    },
    /// Creates a network.
    CreateNetwork(NewNetwork),
    /// Removes a network that no host holds a block of (or any, with `force`).
    RemoveNetwork {
        /// Which.
        name: String,
        /// Remove even with blocks leased.
        force: bool,
    },
    /// Leases a block of `network` to `node` (the one it has, if any).
    LeaseBlock {
        /// Which network.
        network: String,
        /// For which host.
        node: NodeId,
    },
    /// Gives a host's block back (its last container left).
    ReleaseBlock {
        /// Which network.
        network: String,
        /// Whose.
        node: NodeId,
    },
    /// Records the IPv4 networks of a host's own addresses (it reports them when they changed).
    SetUnderlayNetworks {
        /// Which host.
        id: NodeId,
        /// Its networks now.
        networks: Vec<Ipv4Cidr>,
    },
    /// Creates a service (its VIP chosen when not given); answers with it.
    CreateService(NewService),
    /// Removes a service.
    RemoveService {
        /// Which.
        name: String,
    },
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// `Init` on a cluster that exists.
    #[error("this cluster is already initialized")]
    AlreadyInitialized,
    /// Anything before `Init`.
    #[error("the cluster is not initialized")]
    NotInitialized,
    /// A node with this name exists.
    #[error(
        "a node named {0:?} is already in the cluster: give this host another name with --name, or remove the old node first (overlayd node rm)"
    )]
    DuplicateNodeName(String),
    /// A node with this underlay address exists.
    #[error("node {0:?} already uses the underlay address {1}")]
    DuplicateUnderlay(String, IpAddr),
    /// No such node.
    #[error("no node with id {0}")]
    UnknownNode(NodeId),
    /// A network with this name exists.
    #[error("a network named {0:?} already exists")]
    DuplicateNetwork(String),
    /// A network with this VNI exists.
    #[error("VNI {vni} is already used by network {network:?}")]
    DuplicateVni {
        /// The VNI.
        vni: u32,
        /// Who has it.
        network: String,
    },
    /// The subnet overlaps another network's.
    #[error("subnet {subnet} overlaps network {network:?} ({other}): choose a subnet outside it")]
    SubnetOverlap {
        /// Asked for.
        subnet: Ipv4Cidr,
        /// Who overlaps.
        network: String,
        /// Its subnet.
        other: Ipv4Cidr,
    },
    /// The subnet overlaps a network of a host's own (a container there would cut it off).
    #[error(
        "subnet {subnet} overlaps {network}, a network of host {host:?} (its underlay's or another of its \
         interfaces'): its containers would cut that host off; choose a subnet outside it"
    )]
    SubnetOverlapsHost {
        /// Asked for.
        subnet: Ipv4Cidr,
        /// The host's name.
        host: String,
        /// Its network.
        network: Ipv4Cidr,
    },
    /// The network name is not acceptable.
    #[error("{0}")]
    InvalidName(String),
    /// The network spec is not acceptable.
    #[error("{0}")]
    InvalidSpec(String),
    /// No /16 of the pool is free.
    #[error("no free /16 is left in the address pool {0}: give --subnet")]
    NoFreeSubnet(Ipv4Cidr),
    /// No VNI is free.
    #[error("no free VNI is left")]
    NoFreeVni,
    /// No such network.
    #[error("no network named {0:?}")]
    UnknownNetwork(String),
    /// Every block of the subnet is leased.
    #[error(
        "every {prefix} block of network {network:?} is leased ({count} hosts): use a larger subnet or smaller blocks"
    )]
    NoFreeBlock {
        /// The network.
        network: String,
        /// Block size.
        prefix: String,
        /// How many there are.
        count: u64,
    },
    /// A service with this name exists.
    #[error("a service named {0:?} already exists")]
    DuplicateService(String),
    /// No such service.
    #[error("no service named {0:?}")]
    UnknownService(String),
    /// `network rm` while services use the network.
    #[error("network {network:?} has services ({services}): remove them first (overlayd service rm), or use --force")]
    NetworkHasServices {
        /// Which.
        network: String,
        /// Their names, comma-separated.
        services: String,
    },
    /// `network rm` while hosts hold blocks.
    #[error("network {network:?} is in use on {hosts} host(s): detach its containers first, or use --force")]
    NetworkInUse {
        /// Which.
        network: String,
        /// How many hosts hold a block.
        hosts: usize,
    },
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied (or nothing to do).
    Done,
    /// The node added or changed.
    Node(NodeRecord),
    /// The network created.
    Network(Network),
    /// The block leased.
    Block(Block),
    /// The service created.
    Service(Service),
    /// Refused; nothing changed.
    Rejected(Rejection),
}

/// One change, as the watch streams it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A node appeared or changed.
    NodeUpsert(NodeRecord),
    /// A node left.
    NodeRemove(NodeId),
    /// A network appeared or changed.
    NetworkUpsert(Network),
    /// A network went.
    NetworkRemove(String),
    /// A block was leased.
    BlockUpsert(Block),
    /// A block was freed.
    BlockRemove {
        /// Its network.
        network: String,
        /// Its host.
        node: NodeId,
    },
    /// The gossip key was rotated (to this generation): hosts fetch the new one. The key
    /// itself is never in a change.
    GossipKeyRotated(u64),
    /// A service appeared or changed.
    ServiceUpsert(Service),
    /// A service went.
    ServiceRemove(String),
}

/// The state every manager holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Random id, set by `Init`.
    pub cluster_id: String,
    /// Counts up with every command that changed something.
    pub revision: u64,
    /// Managers' secrets, set by `Init`.
    pub secrets: Option<Secrets>,
    /// Every node.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Every network.
    pub networks: BTreeMap<String, Network>,
    /// Blocks: network → node → block.
    pub blocks: BTreeMap<String, BTreeMap<NodeId, Ipv4Cidr>>,
    /// The id the next node gets.
    pub next_node_id: NodeId,
    /// Where automatic subnets come from.
    pub address_pool: Ipv4Cidr,
    /// Nodes removed from the cluster: their certificates open nothing, ever.
    #[serde(default)]
    pub removed: BTreeSet<NodeId>,
    /// How many times the gossip key was rotated.
    #[serde(default)]
    pub gossip_key_generation: u64,
    /// Every service, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            cluster_id: String::new(),
            revision: 0,
            secrets: None,
            nodes: BTreeMap::new(),
            networks: BTreeMap::new(),
            blocks: BTreeMap::new(),
            next_node_id: 1,
            address_pool: DEFAULT_ADDRESS_POOL.parse().expect("valid pool"),
            removed: BTreeSet::new(),
            gossip_key_generation: 0,
            services: BTreeMap::new(),
        }
    }
}

/// What hosts may see of the state: everything but the secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Random id of the cluster.
    pub cluster_id: String,
    /// The revision this view is at.
    pub revision: u64,
    /// Every node.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Every network.
    pub networks: BTreeMap<String, Network>,
    /// Blocks: network → node → block.
    pub blocks: BTreeMap<String, BTreeMap<NodeId, Ipv4Cidr>>,
    /// How many times the gossip key was rotated (a host with an older key fetches it).
    #[serde(default)]
    pub gossip_key_generation: u64,
    /// Nodes removed from the cluster (their certificates open nothing).
    #[serde(default)]
    pub removed: BTreeSet<NodeId>,
    /// Every service, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
}

impl ClusterView {
    /// The subnet a new network created now without one would get from the default address
    /// pool, as far as this view knows (the managers decide: another network may take it
    /// first). For a runtime that must name a network's subnet before it may create it.
    pub fn free_subnet(&self) -> Option<Ipv4Cidr> {
        free_subnet(DEFAULT_ADDRESS_POOL.parse().expect("valid pool"), &self.networks, &self.nodes)
    }

    /// Applies changes received from the watch, ending at `revision`.
    pub fn apply_changes(&mut self, revision: u64, changes: &[Change]) {
        for c in changes {
            match c {
                Change::NodeUpsert(n) => {
                    self.nodes.insert(n.id, n.clone());
                }
                Change::NodeRemove(id) => {
                    self.nodes.remove(id);
                    self.removed.insert(*id);
                    for blocks in self.blocks.values_mut() {
                        blocks.remove(id);
                    }
                }
                Change::NetworkUpsert(n) => {
                    self.networks.insert(n.name.clone(), n.clone());
                }
                Change::NetworkRemove(name) => {
                    self.networks.remove(name);
                    self.blocks.remove(name);
                }
                Change::BlockUpsert(b) => {
                    self.blocks.entry(b.network.clone()).or_default().insert(b.node, b.cidr);
                }
                Change::BlockRemove { network, node } => {
                    if let Some(m) = self.blocks.get_mut(network) {
                        m.remove(node);
                        if m.is_empty() {
                            self.blocks.remove(network);
                        }
                    }
                }
                Change::GossipKeyRotated(generation) => self.gossip_key_generation = *generation,
                Change::ServiceUpsert(svc) => {
                    self.services.insert(svc.name.clone(), svc.clone());
                }
                Change::ServiceRemove(name) => {
                    self.services.remove(name);
                }
            }
        }
        self.revision = revision;
    }

    /// The block of `node` in `network`.
    pub fn block(&self, network: &str, node: NodeId) -> Option<Ipv4Cidr> {
        self.blocks.get(network)?.get(&node).copied()
    }

    /// The node with this name.
    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.name == name)
    }
}

/// Checks a network key: 32 bytes in hex.
fn check_key(key: &str) -> Result<(), Rejection> {
    if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Rejection::InvalidSpec("a network key is 32 bytes in hex".into()))
    }
}

/// Checks a network name: 1 to 10 characters of a-z, A-Z, 0-9, '-', '_', '.', so that the
/// bridge `ovbr-<name>` fits Linux's 15-character interface names.
pub fn check_network_name(name: &str) -> Result<(), Rejection> {
    let ok =
        !name.is_empty() && name.len() <= 10 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Rejection::InvalidName(format!(
            "{name:?} is not a valid network name: 1 to 10 characters from a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

impl ClusterState {
    /// What hosts may see.
    pub fn view(&self) -> ClusterView {
        ClusterView {
            cluster_id: self.cluster_id.clone(),
            revision: self.revision,
            nodes: self.nodes.clone(),
            networks: self.networks.clone(),
            blocks: self.blocks.clone(),
            gossip_key_generation: self.gossip_key_generation,
            removed: self.removed.clone(),
            services: self.services.clone(),
        }
    }

    /// Applies one command: the answer, and what changed (empty if nothing did).
    pub fn apply(&mut self, cmd: &Command) -> (Response, Vec<Change>) {
        let initialized = self.secrets.is_some();
        let result = match cmd {
            Command::Init { .. } if initialized => Err(Rejection::AlreadyInitialized),
            Command::Init { cluster_id, secrets, node } => {
                self.cluster_id = cluster_id.clone();
                self.secrets = Some(secrets.clone());
                self.add_node(node)
            }
            _ if !initialized => Err(Rejection::NotInitialized),
            Command::AddNode(node) => self.add_node(node),
            Command::RemoveNode { id, gossip_key, network_keys, at } => {
                self.remove_node(*id, gossip_key.as_deref(), network_keys, *at)
            }
            Command::RotateNetworkKey { network, key, at } => self.rotate_network_key(network, key, *at),
            Command::RotateJoinToken { role, token, secret_hash } => match self.secrets.as_mut() {
                None => Err(Rejection::NotInitialized),
                Some(secrets) => {
                    let (kept, hash) = match role {
                        Role::Worker => (&mut secrets.worker_token, &mut secrets.worker_token_hash),
                        Role::Manager => (&mut secrets.manager_token, &mut secrets.manager_token_hash),
                    };
                    kept.clone_from(token);
                    hash.clone_from(secret_hash);
                    // Nothing a watcher sees changed.
                    Ok((Response::Done, vec![]))
                }
            },
            Command::SetNodeStatus { id, status } => match self.nodes.get_mut(id) {
                None => Err(Rejection::UnknownNode(*id)),
                Some(n) if n.status == *status => Ok((Response::Node(n.clone()), vec![])),
                Some(n) => {
                    n.status = *status;
                    Ok((Response::Node(n.clone()), vec![Change::NodeUpsert(n.clone())]))
                }
            },
            Command::CreateNetwork(spec) => self.create_network(spec),
            Command::RemoveNetwork { name, force } => self.remove_network(name, *force),
            Command::LeaseBlock { network, node } => self.lease_block(network, *node),
            Command::SetUnderlayNetworks { id, networks } => match self.nodes.get_mut(id) {
                None => Err(Rejection::UnknownNode(*id)),
                Some(n) if n.underlay_networks == normalized(networks) => Ok((Response::Node(n.clone()), vec![])),
                Some(n) => {
                    n.underlay_networks = normalized(networks);
                    Ok((Response::Node(n.clone()), vec![Change::NodeUpsert(n.clone())]))
                }
            },
            Command::SetRole { id, role } => {
                let managers = self.nodes.values().filter(|n| n.role == Role::Manager).count();
                match self.nodes.get_mut(id) {
                    None => Err(Rejection::UnknownNode(*id)),
                    Some(n) if n.role == *role => Ok((Response::Node(n.clone()), vec![])),
                    Some(n) if n.role == Role::Manager && managers == 1 => Err(Rejection::InvalidSpec(format!(
                        "{} is the cluster's last manager: promote another node first",
                        n.name
                    ))),
                    Some(n) => {
                        n.role = *role;
                        Ok((Response::Node(n.clone()), vec![Change::NodeUpsert(n.clone())]))
                    }
                }
            }
            Command::SetUnderlayMtu { id, mtu } => match self.nodes.get_mut(id) {
                None => Err(Rejection::UnknownNode(*id)),
                Some(n) if n.underlay_mtu == Some(*mtu) => Ok((Response::Node(n.clone()), vec![])),
                Some(n) => {
                    n.underlay_mtu = Some(*mtu);
                    Ok((Response::Node(n.clone()), vec![Change::NodeUpsert(n.clone())]))
                }
            },
            Command::SetNetworkMtu { network, mtu } => match self.networks.get_mut(network) {
                _ if !NETWORK_MTU.contains(mtu) => {
                    Err(Rejection::InvalidSpec(format!("MTU {mtu} is not between 576 and 9000")))
                }
                None => Err(Rejection::UnknownNetwork(network.clone())),
                Some(n) if n.mtu == *mtu => Ok((Response::Network(n.clone()), vec![])),
                Some(n) => {
                    n.mtu = *mtu;
                    Ok((Response::Network(n.clone()), vec![Change::NetworkUpsert(n.clone())]))
                }
            },
            Command::CreateService(spec) => self.create_service(spec),
            Command::RemoveService { name } => match self.services.remove(name) {
                None => Err(Rejection::UnknownService(name.clone())),
                Some(_) => Ok((Response::Done, vec![Change::ServiceRemove(name.clone())])),
            },
            Command::ReleaseBlock { network, node } => {
                let freed = self.blocks.get_mut(network).and_then(|m| m.remove(node)).is_some();
                if self.blocks.get(network).is_some_and(|m| m.is_empty()) {
                    self.blocks.remove(network);
                }
                Ok((
                    Response::Done,
                    if freed { vec![Change::BlockRemove { network: network.clone(), node: *node }] } else { vec![] },
                ))
            }
        };
        match result {
            Ok((response, changes)) => {
                if !changes.is_empty() {
                    self.revision += 1;
                }
                (response, changes)
            }
            Err(r) => (Response::Rejected(r), vec![]),
        }
    }

    fn add_node(&mut self, new: &NewNode) -> Result<(Response, Vec<Change>), Rejection> {
        if let Some(n) = self.nodes.values().find(|n| n.name == new.name) {
            return Err(Rejection::DuplicateNodeName(n.name.clone()));
        }
        if let Some(n) = self.nodes.values().find(|n| n.underlay_addr == new.underlay_addr) {
            return Err(Rejection::DuplicateUnderlay(n.name.clone(), n.underlay_addr));
        }
        let id = self.next_node_id;
        self.next_node_id += 1;
        let node = NodeRecord {
            id,
            name: new.name.clone(),
            underlay_addr: new.underlay_addr,
            api_addr: new.api_addr,
            role: new.role,
            status: NodeStatus::Ready,
            joined_at: new.joined_at,
            gossip_addr: new.gossip_addr,
            gossip_public_key: new.gossip_public_key,
            underlay_networks: normalized(&new.underlay_networks),
            underlay_mtu: None,
        };
        self.nodes.insert(id, node.clone());
        Ok((Response::Node(node.clone()), vec![Change::NodeUpsert(node)]))
    }

    fn remove_node(
        &mut self,
        id: NodeId,
        gossip_key: Option<&str>,
        network_keys: &BTreeMap<String, String>,
        at: u64,
    ) -> Result<(Response, Vec<Change>), Rejection> {
        if self.nodes.remove(&id).is_none() {
            return Err(Rejection::UnknownNode(id));
        }
        let mut rotated = Vec::new();
        for (network, key) in network_keys {
            if let Ok((_, changes)) = self.rotate_network_key(network, key, at) {
                rotated.extend(changes);
            }
        }
        self.removed.insert(id);
        let mut changes = Vec::new();
        for (network, blocks) in &mut self.blocks {
            if blocks.remove(&id).is_some() {
                changes.push(Change::BlockRemove { network: network.clone(), node: id });
            }
        }
        self.blocks.retain(|_, m| !m.is_empty());
        changes.push(Change::NodeRemove(id));
        if let (Some(key), Some(secrets)) = (gossip_key, self.secrets.as_mut()) {
            secrets.gossip_key = key.to_owned();
            self.gossip_key_generation += 1;
            changes.push(Change::GossipKeyRotated(self.gossip_key_generation));
        }
        changes.extend(rotated);
        Ok((Response::Done, changes))
    }

    /// Makes `key` the network's key of the next epoch, the current one the one before it.
    fn rotate_network_key(&mut self, name: &str, key: &str, at: u64) -> Result<(Response, Vec<Change>), Rejection> {
        check_key(key)?;
        let Some(net) = self.networks.get_mut(name) else { return Err(Rejection::UnknownNetwork(name.to_owned())) };
        if !net.encrypted {
            return Err(Rejection::InvalidSpec(format!(
                "network {name:?} is not encrypted: it has no key to rotate (create it with --encrypted)"
            )));
        }
        let secrets = self.secrets.as_mut().ok_or(Rejection::NotInitialized)?;
        net.key_epoch += 1;
        net.key_made_at = at;
        let keys = secrets.network_keys.entry(name.to_owned()).or_default();
        keys.push(EpochKey { epoch: net.key_epoch, key: key.to_owned() });
        let excess = keys.len().saturating_sub(2);
        keys.drain(..excess);
        Ok((Response::Network(net.clone()), vec![Change::NetworkUpsert(net.clone())]))
    }

    /// Whether a network may have subnet `s` ([`subnet_conflict`]).
    fn check_subnet(&self, s: Ipv4Cidr) -> Result<(), Rejection> {
        subnet_conflict(&self.networks, &self.nodes, s)
    }

    fn create_network(&mut self, spec: &NewNetwork) -> Result<(Response, Vec<Change>), Rejection> {
        check_network_name(&spec.name)?;
        if self.networks.contains_key(&spec.name) {
            return Err(Rejection::DuplicateNetwork(spec.name.clone()));
        }
        if !NETWORK_MTU.contains(&spec.mtu) {
            return Err(Rejection::InvalidSpec(format!("MTU {} is not between 576 and 9000", spec.mtu)));
        }
        let vni = match spec.vni {
            Some(v) => {
                if v == 0 || v > 0xff_ffff {
                    return Err(Rejection::InvalidSpec(format!("VNI {v} is not between 1 and 16777215")));
                }
                if let Some(n) = self.networks.values().find(|n| n.vni == v) {
                    return Err(Rejection::DuplicateVni { vni: v, network: n.name.clone() });
                }
                v
            }
            None => (FIRST_AUTO_VNI..=0xff_ffff)
                .find(|v| !self.networks.values().any(|n| n.vni == *v))
                .ok_or(Rejection::NoFreeVni)?,
        };
        let subnet = match spec.subnet {
            Some(s) => {
                if s.prefix() > 28 {
                    return Err(Rejection::InvalidSpec(format!("subnet {s} is too small: use /28 or larger")));
                }
                self.check_subnet(s)?;
                s
            }
            None => free_subnet(self.address_pool, &self.networks, &self.nodes)
                .ok_or(Rejection::NoFreeSubnet(self.address_pool))?,
        };
        let block_prefix = spec.block_prefix.unwrap_or((subnet.prefix() + 8).min(28));
        if block_prefix < subnet.prefix() || block_prefix > 30 {
            return Err(Rejection::InvalidSpec(format!(
                "block size /{block_prefix} must be within the subnet {subnet} and at most /30"
            )));
        }
        let network = Network {
            name: spec.name.clone(),
            vni,
            subnet,
            gateway: subnet.nth(1).expect("a /28 or larger has a first address"),
            mtu: spec.mtu,
            block_prefix,
            created_at: spec.created_at,
            internal: spec.internal,
            encrypted: spec.key.is_some(),
            key_epoch: 0,
            key_made_at: if spec.key.is_some() { spec.created_at } else { 0 },
        };
        if let Some(key) = &spec.key {
            check_key(key)?;
            let secrets = self.secrets.as_mut().ok_or(Rejection::NotInitialized)?;
            secrets.network_keys.insert(network.name.clone(), vec![EpochKey { epoch: 0, key: key.clone() }]);
        }
        self.networks.insert(network.name.clone(), network.clone());
        Ok((Response::Network(network.clone()), vec![Change::NetworkUpsert(network)]))
    }

    fn remove_network(&mut self, name: &str, force: bool) -> Result<(Response, Vec<Change>), Rejection> {
        if !self.networks.contains_key(name) {
            return Err(Rejection::UnknownNetwork(name.to_owned()));
        }
        let hosts = self.blocks.get(name).map_or(0, BTreeMap::len);
        if hosts > 0 && !force {
            return Err(Rejection::NetworkInUse { network: name.to_owned(), hosts });
        }
        let services: Vec<String> =
            self.services.values().filter(|s| s.network == name).map(|s| s.name.clone()).collect();
        if !services.is_empty() && !force {
            return Err(Rejection::NetworkHasServices { network: name.to_owned(), services: services.join(", ") });
        }
        self.networks.remove(name);
        if let Some(secrets) = self.secrets.as_mut() {
            secrets.network_keys.remove(name);
        }
        let mut changes: Vec<Change> = Vec::new();
        for svc in services {
            self.services.remove(&svc);
            changes.push(Change::ServiceRemove(svc));
        }
        changes.extend(
            self.blocks
                .remove(name)
                .into_iter()
                .flat_map(|m| m.into_keys())
                .map(|node| Change::BlockRemove { network: name.to_owned(), node }),
        );
        changes.push(Change::NetworkRemove(name.to_owned()));
        Ok((Response::Done, changes))
    }

    fn lease_block(&mut self, network: &str, node: NodeId) -> Result<(Response, Vec<Change>), Rejection> {
        let net = self.networks.get(network).ok_or_else(|| Rejection::UnknownNetwork(network.to_owned()))?;
        if !self.nodes.contains_key(&node) {
            return Err(Rejection::UnknownNode(node));
        }
        let taken = self.blocks.entry(network.to_owned()).or_default();
        if let Some(cidr) = taken.get(&node) {
            return Ok((Response::Block(Block { network: network.to_owned(), node, cidr: *cidr }), vec![]));
        }
        let count = 1u64 << (net.block_prefix - net.subnet.prefix());
        let vips: Vec<Ipv4Addr> =
            self.services.values().filter(|s| s.network == network).filter_map(|s| s.vip).collect();
        let cidr = (0..count)
            .filter_map(|i| net.subnet.subnet(net.block_prefix, i))
            .find(|b| !taken.values().any(|t| t == b) && !vips.iter().any(|v| b.contains(*v)))
            .ok_or_else(|| Rejection::NoFreeBlock {
                network: network.to_owned(),
                prefix: format!("/{}", net.block_prefix),
                count,
            })?;
        taken.insert(node, cidr);
        let block = Block { network: network.to_owned(), node, cidr };
        Ok((Response::Block(block.clone()), vec![Change::BlockUpsert(block)]))
    }
}

impl ClusterState {
    fn create_service(&mut self, spec: &NewService) -> Result<(Response, Vec<Change>), Rejection> {
        spec.check().map_err(Rejection::InvalidSpec)?;
        if self.services.contains_key(&spec.name) {
            return Err(Rejection::DuplicateService(spec.name.clone()));
        }
        let net = self.networks.get(&spec.network).ok_or_else(|| Rejection::UnknownNetwork(spec.network.clone()))?;
        for p in &spec.published {
            if let Some(other) = self
                .services
                .values()
                .find(|s| s.published.iter().any(|q| q.published == p.published && q.protocol == p.protocol))
            {
                return Err(Rejection::InvalidSpec(format!(
                    "port {}/{} is already published by service {:?}",
                    p.published, p.protocol, other.name
                )));
            }
        }
        let vips: BTreeSet<Ipv4Addr> =
            self.services.values().filter(|s| s.network == net.name).filter_map(|s| s.vip).collect();
        let blocks: Vec<Ipv4Cidr> =
            self.blocks.get(&net.name).map(|m| m.values().copied().collect()).unwrap_or_default();
        let usable = |ip: Ipv4Addr| {
            net.subnet.contains(ip)
                && ip != net.subnet.addr()
                && ip != net.gateway
                && net.subnet.nth(net.subnet.size() - 1) != Some(ip)
        };
        let vip = match (spec.mode, spec.vip) {
            (ServiceMode::Dnsrr, _) => None,
            (ServiceMode::Vip, Some(ip)) => {
                if !usable(ip) {
                    return Err(Rejection::InvalidSpec(format!(
                        "VIP {ip} is not a host address of network {:?} ({}): choose one inside it, not its first, \
                         gateway or broadcast address",
                        net.name, net.subnet
                    )));
                }
                if let Some(b) = blocks.iter().find(|b| b.contains(ip)) {
                    return Err(Rejection::InvalidSpec(format!(
                        "VIP {ip} is in the block {b} a host holds for its containers: choose one outside the hosts' \
                         blocks, or leave --vip out"
                    )));
                }
                if vips.contains(&ip) {
                    return Err(Rejection::InvalidSpec(format!("VIP {ip} is another service's")));
                }
                Some(ip)
            }
            // From the top of the subnet down: blocks are leased from the bottom up.
            (ServiceMode::Vip, None) => Some(
                (2..net.subnet.size())
                    .filter_map(|i| net.subnet.nth(net.subnet.size() - i))
                    .find(|ip| usable(*ip) && !vips.contains(ip) && !blocks.iter().any(|b| b.contains(*ip)))
                    .ok_or_else(|| {
                        Rejection::InvalidSpec(format!(
                            "no free VIP is left in network {:?} ({})",
                            net.name, net.subnet
                        ))
                    })?,
            ),
        };
        let svc = Service { vip, ..spec.clone() };
        self.services.insert(svc.name.clone(), svc.clone());
        Ok((Response::Service(svc.clone()), vec![Change::ServiceUpsert(svc)]))
    }
}

/// Builders shared by this crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn secrets() -> Secrets {
        Secrets {
            network_keys: Default::default(),
            ca_cert_pem: "c".into(),
            ca_key_pem: "k".into(),
            worker_token_hash: "w".into(),
            manager_token_hash: "m".into(),
            gossip_key: "00".repeat(32),
            worker_token: "OVL1-w".into(),
            manager_token: "OVL1-m".into(),
        }
    }

    pub(crate) fn new_node(name: &str, last: u8, role: Role) -> NewNode {
        NewNode {
            name: name.into(),
            underlay_addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)),
            api_addr: format!("198.18.0.{last}:7947").parse().unwrap(),
            role,
            joined_at: 1,
            gossip_addr: format!("198.18.0.{last}:7946").parse().unwrap(),
            gossip_public_key: [last; 32],
            underlay_networks: Vec::new(),
        }
    }
}

/// The first /[`AUTO_SUBNET_PREFIX`] of `pool` that a new network may have.
fn free_subnet(
    pool: Ipv4Cidr,
    networks: &BTreeMap<String, Network>,
    nodes: &BTreeMap<NodeId, NodeRecord>,
) -> Option<Ipv4Cidr> {
    let count = 1u64 << AUTO_SUBNET_PREFIX.saturating_sub(pool.prefix());
    (0..count).filter_map(|i| pool.subnet(AUTO_SUBNET_PREFIX, i)).find(|s| subnet_conflict(networks, nodes, *s).is_ok())
}

/// Whether a network may have subnet `s`: not overlapping another network, an address range
/// no host can route ([`RESERVED_RANGES`]), or a network of a host's own (a node that
/// reported none counts with its underlay address).
fn subnet_conflict(
    networks: &BTreeMap<String, Network>,
    nodes: &BTreeMap<NodeId, NodeRecord>,
    s: Ipv4Cidr,
) -> Result<(), Rejection> {
    if let Some(n) = networks.values().find(|n| n.subnet.overlaps(&s)) {
        return Err(Rejection::SubnetOverlap { subnet: s, network: n.name.clone(), other: n.subnet });
    }
    for (range, what) in RESERVED_RANGES {
        let range: Ipv4Cidr = range.parse().expect("a valid range");
        if range.overlaps(&s) {
            return Err(Rejection::InvalidSpec(format!(
                "subnet {s} overlaps {range} ({what}): choose a subnet outside it"
            )));
        }
    }
    for n in nodes.values() {
        let own = match n.underlay_addr {
            IpAddr::V4(a) => Ipv4Cidr::new(a, 32),
            IpAddr::V6(_) => None,
        };
        if let Some(network) = n.underlay_networks.iter().copied().chain(own).find(|net| net.overlaps(&s)) {
            return Err(Rejection::SubnetOverlapsHost { subnet: s, host: n.name.clone(), network });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::testing::{new_node, secrets};
    use super::*;
    use proptest::prelude::*;

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let (r, _) = s.apply(&Command::Init {
            cluster_id: "c1".into(),
            secrets: secrets(),
            node: new_node("m1", 1, Role::Manager),
        });
        assert!(matches!(r, Response::Node(NodeRecord { id: 1, .. })));
        s
    }

    fn svc(name: &str, network: &str) -> NewService {
        NewService {
            name: name.into(),
            network: network.into(),
            mode: ServiceMode::Vip,
            vip: None,
            ports: vec!["80/tcp".parse().unwrap()],
            published: vec![],
            health: None,
            created_at: 3,
        }
    }

    fn rejected(s: &mut ClusterState, cmd: Command) -> String {
        let before = s.clone();
        match s.apply(&cmd).0 {
            Response::Rejected(r) => {
                assert_eq!(*s, before, "a refused command changes nothing");
                r.to_string()
            }
            other => panic!("{cmd:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn services_get_vips_from_the_top_of_their_subnet_outside_every_block() {
        let mut s = cluster();
        let small =
            NewNetwork { subnet: Some("10.50.0.0/24".parse().unwrap()), block_prefix: Some(26), ..spec("front") };
        s.apply(&Command::CreateNetwork(small));
        s.apply(&Command::LeaseBlock { network: "front".into(), node: 1 });
        let (r, changes) = s.apply(&Command::CreateService(svc("web", "front")));
        let Response::Service(web) = r else { panic!("{r:?}") };
        assert_eq!(web.vip, Some(Ipv4Addr::new(10, 50, 0, 254)), "the highest host address");
        assert_eq!(changes, vec![Change::ServiceUpsert(web.clone())]);
        let Response::Service(api) = s.apply(&Command::CreateService(svc("api", "front"))).0 else { panic!() };
        assert_eq!(api.vip, Some(Ipv4Addr::new(10, 50, 0, 253)));
        let dnsrr = NewService { mode: ServiceMode::Dnsrr, ..svc("db", "front") };
        let Response::Service(db) = s.apply(&Command::CreateService(dnsrr)).0 else { panic!() };
        assert_eq!(db.vip, None);
        // The block with the VIPs is never leased: the hosts get the others, then none is left.
        for id in 2..=4 {
            s.apply(&Command::AddNode(new_node(&format!("w{id}"), id as u8, Role::Worker)));
        }
        let leased: Vec<Response> =
            (2..=4).map(|node| s.apply(&Command::LeaseBlock { network: "front".into(), node }).0).collect();
        assert!(matches!(leased[0], Response::Block(_)) && matches!(leased[1], Response::Block(_)));
        assert!(matches!(leased[2], Response::Rejected(Rejection::NoFreeBlock { .. })), "{leased:?}");
        let mut view = ClusterView::default();
        view.apply_changes(s.revision, &[Change::ServiceUpsert(web.clone())]);
        assert_eq!(view.services["web"], web);
        view.apply_changes(s.revision, &[Change::ServiceRemove("web".into())]);
        assert!(view.services.is_empty());
    }

    #[test]
    fn a_bad_service_changes_nothing_and_says_what_to_fix() {
        let mut s = cluster();
        let small =
            NewNetwork { subnet: Some("10.50.0.0/24".parse().unwrap()), block_prefix: Some(26), ..spec("front") };
        s.apply(&Command::CreateNetwork(small));
        s.apply(&Command::LeaseBlock { network: "front".into(), node: 1 });
        let web = NewService { published: vec!["8080:80".parse().unwrap()], ..svc("web", "front") };
        assert!(matches!(s.apply(&Command::CreateService(web.clone())).0, Response::Service(_)));
        assert!(rejected(&mut s, Command::CreateService(web)).contains("already exists"));
        let again = NewService { published: vec!["8080:8080".parse().unwrap()], ..svc("api", "front") };
        assert!(rejected(&mut s, Command::CreateService(again)).contains("already published by service \"web\""));
        assert!(rejected(&mut s, Command::CreateService(svc("api", "nowhere"))).contains("no network named"));
        for (vip, why) in [
            ("10.99.0.5", "not a host address of network"),
            ("10.50.0.1", "not a host address"),
            ("10.50.0.255", "not a host address"),
            ("10.50.0.7", "in the block 10.50.0.0/26"),
        ] {
            let spec = NewService { vip: Some(vip.parse().unwrap()), ..svc("api", "front") };
            let e = rejected(&mut s, Command::CreateService(spec));
            assert!(e.contains(why), "{vip}: {e}");
        }
        let taken = NewService { vip: Some(Ipv4Addr::new(10, 50, 0, 254)), ..svc("api", "front") };
        assert!(rejected(&mut s, Command::CreateService(taken)).contains("another service's"));
        assert!(
            rejected(&mut s, Command::CreateService(svc("Bad_Name", "front"))).contains("not a valid service name")
        );
        assert!(rejected(&mut s, Command::RemoveService { name: "nope".into() }).contains("no service named"));
        // A network with services is not removed without --force; with it, they go too.
        s.apply(&Command::ReleaseBlock { network: "front".into(), node: 1 });
        let e = rejected(&mut s, Command::RemoveNetwork { name: "front".into(), force: false });
        assert!(e.contains("has services (web)"), "{e}");
        let (_, changes) = s.apply(&Command::RemoveNetwork { name: "front".into(), force: true });
        assert!(changes.contains(&Change::ServiceRemove("web".into())), "{changes:?}");
        assert!(s.services.is_empty());
    }

    fn spec(name: &str) -> NewNetwork {
        NewNetwork {
            key: None,
            name: name.into(),
            vni: None,
            subnet: None,
            mtu: 1450,
            block_prefix: None,
            created_at: 2,
            internal: false,
        }
    }

    #[test]
    fn init_once_then_nodes_with_unique_names_and_addresses() {
        let mut s = cluster();
        assert_eq!(
            s.apply(&Command::Init {
                cluster_id: "x".into(),
                secrets: secrets(),
                node: new_node("m9", 9, Role::Manager)
            })
            .0,
            Response::Rejected(Rejection::AlreadyInitialized)
        );
        let (r, c) = s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        assert!(matches!(r, Response::Node(NodeRecord { id: 2, .. })));
        assert_eq!(c.len(), 1);
        assert_eq!(s.revision, 2);
        let (r, c) = s.apply(&Command::AddNode(new_node("w1", 3, Role::Worker)));
        assert_eq!(r, Response::Rejected(Rejection::DuplicateNodeName("w1".into())));
        assert!(c.is_empty());
        assert_eq!(s.revision, 2, "a rejected command changes nothing");
        assert!(matches!(
            s.apply(&Command::AddNode(new_node("w2", 2, Role::Worker))).0,
            Response::Rejected(Rejection::DuplicateUnderlay(..))
        ));
        assert_eq!(
            ClusterState::default().apply(&Command::AddNode(new_node("w", 5, Role::Worker))).0,
            Response::Rejected(Rejection::NotInitialized)
        );
    }

    #[test]
    fn networks_get_free_vnis_and_subnets_and_refuse_overlaps() {
        let mut s = cluster();
        let Response::Network(a) = s.apply(&Command::CreateNetwork(spec("a"))).0 else { panic!() };
        assert_eq!(
            (a.vni, a.subnet.to_string(), a.gateway.to_string(), a.block_prefix),
            (4096, "10.128.0.0/16".into(), "10.128.0.1".into(), 24)
        );
        let Response::Network(b) = s.apply(&Command::CreateNetwork(spec("b"))).0 else { panic!() };
        assert_eq!((b.vni, b.subnet.to_string()), (4097, "10.129.0.0/16".into()));
        let overlap = NewNetwork { subnet: Some("10.128.5.0/24".parse().unwrap()), ..spec("c") };
        assert!(matches!(
            s.apply(&Command::CreateNetwork(overlap)).0,
            Response::Rejected(Rejection::SubnetOverlap { .. })
        ));
        let dup_vni = NewNetwork { vni: Some(4096), ..spec("d") };
        assert!(matches!(
            s.apply(&Command::CreateNetwork(dup_vni)).0,
            Response::Rejected(Rejection::DuplicateVni { .. })
        ));
        assert_eq!(
            s.apply(&Command::CreateNetwork(spec("a"))).0,
            Response::Rejected(Rejection::DuplicateNetwork("a".into()))
        );
        assert!(matches!(
            s.apply(&Command::CreateNetwork(spec("way-too-long-name"))).0,
            Response::Rejected(Rejection::InvalidName(_))
        ));
        let small = NewNetwork { subnet: Some("192.168.7.0/24".parse().unwrap()), ..spec("small") };
        let Response::Network(n) = s.apply(&Command::CreateNetwork(small)).0 else { panic!() };
        assert_eq!(n.block_prefix, 28);
        assert_eq!(s.revision, 4);
    }

    #[test]
    fn an_internal_network_says_so_and_records_from_before_egress_are_not_internal() {
        let mut s = cluster();
        let Response::Network(n) = s.apply(&Command::CreateNetwork(NewNetwork { internal: true, ..spec("priv") })).0
        else {
            panic!()
        };
        assert!(n.internal && s.view().networks["priv"].internal);
        let Response::Network(n) = s.apply(&Command::CreateNetwork(spec("pub"))).0 else { panic!() };
        assert!(!n.internal);
        // A log entry and a record written before the flag existed.
        let old = r#"{"CreateNetwork":{"name":"old","vni":null,"subnet":null,"mtu":1450,"block_prefix":null,"created_at":2}}"#;
        let Command::CreateNetwork(spec) = serde_json::from_str::<Command>(old).unwrap() else { panic!() };
        assert!(!spec.internal);
        let record = serde_json::to_string(&n).unwrap();
        assert!(!record.contains("internal"), "a network with egress is written as before: {record}");
        assert_eq!(serde_json::from_str::<Network>(&record).unwrap(), n);
    }

    #[test]
    fn a_subnet_that_would_cut_a_host_off_or_that_no_host_routes_is_refused() {
        let mut s = cluster();
        let mut w = new_node("w1", 2, Role::Worker);
        w.underlay_networks = vec!["198.18.0.0/15".parse().unwrap(), "10.128.0.0/24".parse().unwrap()];
        s.apply(&Command::AddNode(w));
        let create = |s: &mut ClusterState, name: &str, subnet: &str| {
            s.apply(&Command::CreateNetwork(NewNetwork { subnet: Some(subnet.parse().unwrap()), ..spec(name) })).0
        };
        assert!(matches!(
            create(&mut s, "u", "198.19.0.0/24"),
            Response::Rejected(Rejection::SubnetOverlapsHost { ref host, .. }) if host == "w1"
        ));
        // m1 reported no networks: its underlay address counts.
        assert!(matches!(
            create(&mut s, "u", "198.18.0.0/28"),
            Response::Rejected(Rejection::SubnetOverlapsHost { ref host, .. }) if host == "m1"
        ));
        for (subnet, what) in [
            ("127.1.0.0/16", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("239.0.0.0/8", "multicast"),
            ("0.0.0.0/16", "this network"),
            ("255.255.255.0/28", "broadcast"),
        ] {
            let Response::Rejected(Rejection::InvalidSpec(why)) = create(&mut s, "r", subnet) else {
                panic!("{subnet}")
            };
            assert!(why.contains(what), "{subnet}: {why}");
        }
        // An automatic subnet steps over the host's 10.128.0.0/24.
        let Response::Network(auto) = s.apply(&Command::CreateNetwork(spec("auto"))).0 else { panic!() };
        assert_eq!(auto.subnet.to_string(), "10.129.0.0/16");
        // A host's networks change: the record follows, once.
        let now = vec!["192.168.50.0/24".parse().unwrap()];
        let (_, changes) = s.apply(&Command::SetUnderlayNetworks { id: 2, networks: now.clone() });
        assert!(matches!(changes.as_slice(), [Change::NodeUpsert(n)] if n.underlay_networks == now));
        assert!(s.apply(&Command::SetUnderlayNetworks { id: 2, networks: now }).1.is_empty());
        assert!(matches!(
            create(&mut s, "v", "192.168.50.0/28"),
            Response::Rejected(Rejection::SubnetOverlapsHost { .. })
        ));
        assert!(matches!(create(&mut s, "v", "198.19.0.0/24"), Response::Network(_)), "198.18.0.0/15 is gone");
    }

    #[test]
    fn the_smallest_underlay_sets_the_network_mtu_and_a_network_mtu_changes_in_range() {
        let mut s = cluster();
        s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        assert_eq!(smallest_network_mtu(s.nodes.values()), None, "nobody reported yet");
        s.apply(&Command::SetUnderlayMtu { id: 1, mtu: 9000 });
        assert_eq!(smallest_network_mtu(s.nodes.values()), Some(8950));
        let (_, changes) = s.apply(&Command::SetUnderlayMtu { id: 2, mtu: 1500 });
        assert!(matches!(changes.as_slice(), [Change::NodeUpsert(n)] if n.underlay_mtu == Some(1500)));
        assert!(s.apply(&Command::SetUnderlayMtu { id: 2, mtu: 1500 }).1.is_empty(), "the same again: no change");
        assert_eq!(smallest_network_mtu(s.nodes.values()), Some(1450));
        s.apply(&Command::CreateNetwork(spec("a")));
        let (_, changes) = s.apply(&Command::SetNetworkMtu { network: "a".into(), mtu: 8000 });
        assert!(matches!(changes.as_slice(), [Change::NetworkUpsert(n)] if n.mtu == 8000));
        for bad in [575, 9001] {
            let (r, changes) = s.apply(&Command::SetNetworkMtu { network: "a".into(), mtu: bad });
            assert!(matches!(r, Response::Rejected(Rejection::InvalidSpec(m)) if m.contains("between 576 and 9000")));
            assert!(changes.is_empty());
        }
        let (r, _) = s.apply(&Command::SetNetworkMtu { network: "zz".into(), mtu: 1400 });
        assert!(matches!(r, Response::Rejected(Rejection::UnknownNetwork(_))));
    }

    #[test]
    fn blocks_are_leased_once_per_host_and_freed_with_the_host() {
        let mut s = cluster();
        s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        s.apply(&Command::CreateNetwork(spec("a")));
        let Response::Block(b1) = s.apply(&Command::LeaseBlock { network: "a".into(), node: 1 }).0 else { panic!() };
        let Response::Block(b2) = s.apply(&Command::LeaseBlock { network: "a".into(), node: 2 }).0 else { panic!() };
        assert_eq!((b1.cidr.to_string(), b2.cidr.to_string()), ("10.128.0.0/24".into(), "10.128.1.0/24".into()));
        let (again, changes) = s.apply(&Command::LeaseBlock { network: "a".into(), node: 2 });
        assert_eq!(again, Response::Block(b2.clone()));
        assert!(changes.is_empty(), "leasing twice is idempotent");
        assert!(matches!(
            s.apply(&Command::RemoveNetwork { name: "a".into(), force: false }).0,
            Response::Rejected(Rejection::NetworkInUse { hosts: 2, .. })
        ));
        let (_, changes) =
            s.apply(&Command::RemoveNode { id: 2, gossip_key: None, network_keys: BTreeMap::new(), at: 0 });
        assert_eq!(changes, vec![Change::BlockRemove { network: "a".into(), node: 2 }, Change::NodeRemove(2)]);
        // The freed block goes to the next host that asks.
        s.apply(&Command::AddNode(new_node("w3", 3, Role::Worker)));
        let Response::Block(b3) = s.apply(&Command::LeaseBlock { network: "a".into(), node: 3 }).0 else { panic!() };
        assert_eq!(b3.cidr, b2.cidr);
        assert_eq!(
            s.apply(&Command::LeaseBlock { network: "nope".into(), node: 3 }).0,
            Response::Rejected(Rejection::UnknownNetwork("nope".into()))
        );
    }

    #[test]
    fn a_full_subnet_says_so() {
        let mut s = cluster();
        let tiny = NewNetwork { subnet: Some("192.168.0.0/27".parse().unwrap()), block_prefix: Some(28), ..spec("t") };
        s.apply(&Command::CreateNetwork(tiny));
        for i in 2..=3 {
            s.apply(&Command::AddNode(new_node(&format!("w{i}"), i, Role::Worker)));
        }
        for id in 1..=2 {
            assert!(matches!(s.apply(&Command::LeaseBlock { network: "t".into(), node: id }).0, Response::Block(_)));
        }
        assert!(matches!(
            s.apply(&Command::LeaseBlock { network: "t".into(), node: 3 }).0,
            Response::Rejected(Rejection::NoFreeBlock { count: 2, .. })
        ));
    }

    #[test]
    fn an_encrypted_networks_key_is_kept_secret_rotated_with_the_one_before_and_replaced_when_a_node_goes() {
        let mut s = cluster();
        s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        let new = |name: &str, key: Option<String>| NewNetwork {
            name: name.into(),
            vni: None,
            subnet: None,
            mtu: 1418,
            block_prefix: None,
            created_at: 7,
            internal: false,
            key,
        };
        let (r, _) = s.apply(&Command::CreateNetwork(new("sealed", Some("01".repeat(32)))));
        let Response::Network(n) = r else { panic!("{r:?}") };
        assert!(n.encrypted && n.key_epoch == 0 && n.key_made_at == 7);
        s.apply(&Command::CreateNetwork(new("plain", None)));
        assert!(!s.networks["plain"].encrypted);
        let bad = Command::CreateNetwork(new("badkey", Some("zz".into())));
        assert!(matches!(s.apply(&bad).0, Response::Rejected(Rejection::InvalidSpec(_))));
        assert!(!s.networks.contains_key("badkey"), "nothing changed");
        // The key is a secret: in no view, in no change.
        let view = serde_json::to_string(&s.view()).unwrap();
        assert!(!view.contains(&"01".repeat(32)));
        for epoch in 1..=3u8 {
            let key = format!("{epoch:02x}").repeat(32);
            let (_, changes) = s.apply(&Command::RotateNetworkKey { network: "sealed".into(), key, at: 10 });
            assert!(!format!("{changes:?}").contains(&format!("{epoch:02x}").repeat(32)));
        }
        let keys = &s.secrets.as_ref().unwrap().network_keys["sealed"];
        assert_eq!(keys.iter().map(|k| k.epoch).collect::<Vec<_>>(), [2, 3], "the current key and the one before");
        assert_eq!((s.networks["sealed"].key_epoch, s.networks["sealed"].key_made_at), (3, 10));
        let plain = Command::RotateNetworkKey { network: "plain".into(), key: "02".repeat(32), at: 10 };
        assert!(matches!(s.apply(&plain).0, Response::Rejected(Rejection::InvalidSpec(_))));
        // A node removed: the network gets a key it never had.
        let network_keys: BTreeMap<String, String> = [("sealed".to_owned(), "ee".repeat(32))].into();
        s.apply(&Command::RemoveNode { id: 2, gossip_key: None, network_keys, at: 20 });
        assert_eq!(s.networks["sealed"].key_epoch, 4);
        assert_eq!(s.secrets.as_ref().unwrap().network_keys["sealed"].last().unwrap().key, "ee".repeat(32));
        s.apply(&Command::RemoveNetwork { name: "sealed".into(), force: true });
        assert!(!s.secrets.as_ref().unwrap().network_keys.contains_key("sealed"), "its keys go with it");
    }

    #[test]
    fn a_removed_node_is_remembered_and_its_removal_rotates_the_gossip_key() {
        let mut s = cluster();
        s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        let key = "ab".repeat(32);
        let (_, changes) = s.apply(&Command::RemoveNode {
            id: 2,
            gossip_key: Some(key.clone()),
            network_keys: BTreeMap::new(),
            at: 0,
        });
        assert_eq!(changes, vec![Change::NodeRemove(2), Change::GossipKeyRotated(1)]);
        assert_eq!((s.removed.iter().copied().collect::<Vec<_>>(), s.gossip_key_generation), (vec![2], 1));
        assert_eq!(s.secrets.as_ref().unwrap().gossip_key, key);
        assert_eq!(s.view().gossip_key_generation, 1);
        // The id is not given again; the name is free for a new node.
        let (r, _) = s.apply(&Command::AddNode(new_node("w1", 2, Role::Worker)));
        assert!(matches!(r, Response::Node(NodeRecord { id: 3, .. })), "{r:?}");
        assert!(s.removed.contains(&2) && !s.removed.contains(&3));
        // A state written before removed ids were kept reads as having none.
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("removed");
        old.as_object_mut().unwrap().remove("gossip_key_generation");
        let back: ClusterState = serde_json::from_value(old).unwrap();
        assert!(back.removed.is_empty());
        // And a RemoveNode of the log before keys were rotated on removal still applies.
        let cmd: Command = serde_json::from_str(r#"{"RemoveNode":{"id":3}}"#).unwrap();
        assert_eq!(cmd, Command::RemoveNode { id: 3, gossip_key: None, network_keys: BTreeMap::new(), at: 0 });
    }

    #[test]
    fn join_tokens_rotate_without_a_change_for_watchers() {
        let mut s = cluster();
        let revision = s.revision;
        let (r, changes) = s.apply(&Command::RotateJoinToken {
            role: Role::Worker,
            token: "OVL1-new".into(),
            secret_hash: "h2".into(),
        });
        assert_eq!((r, changes), (Response::Done, vec![]));
        let secrets = s.secrets.as_ref().unwrap();
        assert_eq!((secrets.worker_token.as_str(), secrets.worker_token_hash.as_str()), ("OVL1-new", "h2"));
        assert_eq!((secrets.manager_token.as_str(), secrets.manager_token_hash.as_str()), ("OVL1-m", "m"));
        assert_eq!(s.revision, revision, "the view did not change");
        let cmd = Command::RotateJoinToken { role: Role::Manager, token: "t".into(), secret_hash: "h".into() };
        assert_eq!(ClusterState::default().apply(&cmd).0, Response::Rejected(Rejection::NotInitialized));
    }

    proptest! {
        /// A host following the watch (a view plus the changes) always ends up with exactly
        /// the managers' state, whatever the commands.
        #[test]
        fn views_plus_changes_equal_the_state(ops in proptest::collection::vec((0u8..7, 0u64..5, 0u8..4), 0..60)) {
            let mut s = cluster();
            let mut view = s.view();
            for (op, id, net) in ops {
                let name = format!("n{net}");
                let cmd = match op {
                    0 => Command::AddNode(new_node(&format!("h{id}"), 10 + id as u8, Role::Worker)),
                    1 => Command::RemoveNode {
                        id,
                        gossip_key: (net % 2 == 0).then(|| format!("{net:064x}")),
                        network_keys: BTreeMap::new(),
                        at: 0,
                    },
                    2 => Command::CreateNetwork(spec(&name)),
                    3 => Command::RemoveNetwork { name, force: id % 2 == 0 },
                    4 => Command::LeaseBlock { network: name, node: id },
                    5 => Command::ReleaseBlock { network: name, node: id },
                    _ => Command::SetNodeStatus { id, status: if net % 2 == 0 { NodeStatus::Down } else { NodeStatus::Ready } },
                };
                let before = s.revision;
                let (_, changes) = s.apply(&cmd);
                prop_assert_eq!(s.revision, before + u64::from(!changes.is_empty()));
                view.apply_changes(s.revision, &changes);
                prop_assert_eq!(&view, &s.view());
            }
        }
    }
}
