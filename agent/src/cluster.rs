//! Cluster mode: this host's membership (kept in the state dir and resumed after a restart),
//! `init`, `join` and `leave`, the control API it serves, the manager it runs if it is one,
//! the follower that keeps its view of the state, and the reconciler that turns that view into
//! bridges, TAPs and dataplane tables.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::follower::Follower;
use control::manager::{HostApi, Manager, ManagerConfig, unix_now};
use control::pki::{self, ClusterCa, JoinToken, NodeIdentity, NodeKey};
use control::state::{ClusterView, Command, NewNode, NodeId, Role};
use dataplane::tables::BlockOwner;
use dataplane::{MacAddr, Vni};
use proto as pb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::attach::{self, EndpointRecord, EndpointStore, Netns};
use crate::gossip::{self, Gossip, GossipKeys, GossipView};
use crate::host::{DataplaneSettings, Gateway, Host, NetworkSpec};

const MEMBERSHIP_FILE: &str = "cluster.json";
const PKI_DIR: &str = "pki";
const RAFT_DIR: &str = "raft";
const VIEW_FILE: &str = "view.json";
const ENDPOINTS_FILE: &str = "endpoints.json";
/// How long `join` waits for a manager to answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `join --token <manager token>` waits to become a Raft voter.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a host remembers of its cluster membership (`cluster.json` in the state dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    pub role: Role,
    /// Where other hosts reach this one's control API.
    pub advertise: SocketAddr,
    /// Its VTEP address.
    pub underlay: IpAddr,
    /// Managers known at join time (more are learned from the state).
    pub managers: Vec<SocketAddr>,
    /// Where its gossip socket is (UDP; the advertise address's IP).
    pub gossip: SocketAddr,
}

impl Membership {
    fn load(dir: &Path) -> Result<Option<Membership>> {
        match std::fs::read(dir.join(MEMBERSHIP_FILE)) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).context("cluster.json is corrupt")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(MEMBERSHIP_FILE))?;
        Ok(())
    }
}

/// Whether `dir` holds a cluster membership.
pub fn is_member(dir: &Path) -> bool {
    dir.join(MEMBERSHIP_FILE).exists()
}

/// What the daemon passes down to cluster mode.
#[derive(Clone)]
pub struct ClusterContext {
    pub state_dir: PathBuf,
    pub nl: rtnetlink::Handle,
    pub settings: DataplaneSettings,
    pub underlay_mtu: Option<u32>,
}

/// A host in cluster mode.
pub struct ClusterRuntime {
    pub membership: Membership,
    pub host: Arc<Host>,
    pub manager: Option<Arc<Manager>>,
    pub follower: Arc<Follower>,
    pub gossip: Arc<Gossip>,
    endpoints: Arc<Mutex<EndpointStore>>,
    state_dir: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The endpoints as the host API lists them (a blocking snapshot, for the gRPC handler).
struct Endpoints {
    store: Arc<Mutex<EndpointStore>>,
    node: NodeId,
    name: String,
}

impl HostApi for Endpoints {
    fn endpoints(&self, network: Option<&str>) -> Vec<pb::Endpoint> {
        let Ok(store) = self.store.try_lock() else { return Vec::new() };
        store
            .endpoints
            .iter()
            .filter(|e| network.is_none_or(|n| n == e.network))
            .map(|e| endpoint_pb(e, self.node, &self.name))
            .collect()
    }
}

fn endpoint_pb(e: &EndpointRecord, node: NodeId, node_name: &str) -> pb::Endpoint {
    pb::Endpoint {
        network: e.network.clone(),
        name: e.name.clone(),
        ip: e.ip.to_string(),
        prefix_len: u32::from(e.prefix_len),
        mac: e.mac.to_string(),
        node_id: node,
        node_name: node_name.to_owned(),
        host_ifname: e.host_ifname.clone(),
        netns: e.netns.clone(),
    }
}

/// Picks the address to advertise: the one given, else this host's only global IPv4 address.
pub async fn advertise_addr(nl: &rtnetlink::Handle, given: &str) -> Result<SocketAddr> {
    let port = proto::DEFAULT_CONTROL_PORT;
    if !given.is_empty() {
        if let Ok(a) = given.parse::<SocketAddr>() {
            return Ok(a);
        }
        let ip: IpAddr =
            given.parse().map_err(|_| anyhow::anyhow!("--advertise-addr {given:?} is not an IP address or IP:PORT"))?;
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs = crate::netdev::global_addresses(nl).await?;
    match addrs.as_slice() {
        [one] => Ok(SocketAddr::new(*one, port)),
        [] => bail!("this host has no global address to advertise: give one with --advertise-addr"),
        many => bail!(
            "this host has several addresses ({}): choose the one other hosts reach it at with --advertise-addr",
            many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn default_name(given: &str) -> String {
    if !given.is_empty() {
        return given.to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

/// Removes what `init`/`join` wrote, after a failure or `leave`.
fn forget(dir: &Path) {
    for f in [MEMBERSHIP_FILE, VIEW_FILE, ENDPOINTS_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join(PKI_DIR));
    let _ = std::fs::remove_dir_all(dir.join(RAFT_DIR));
}

impl ClusterRuntime {
    /// `overlayd init`: a new cluster with this host as its first manager.
    pub async fn init(ctx: &ClusterContext, req: pb::InitRequest) -> Result<(ClusterRuntime, pb::InitReply)> {
        let advertise = advertise_addr(&ctx.nl, &req.advertise_addr).await?;
        let underlay = parse_underlay(&req.underlay_addr, advertise)?;
        let name = default_name(&req.name);
        let cluster_id = hex::encode(rand::random::<[u8; 8]>());
        let ca = ClusterCa::generate(&cluster_id)?;
        let worker = JoinToken::generate(&ca);
        let manager = JoinToken::generate(&ca);
        let identity = ca.issue_node(1, Role::Manager)?;
        let gossip_addr = gossip::gossip_addr(advertise, parse_port(req.gossip_port)?);
        let membership = Membership {
            cluster_id: cluster_id.clone(),
            node_id: 1,
            name: name.clone(),
            role: Role::Manager,
            advertise,
            underlay,
            managers: vec![advertise],
            gossip: gossip_addr,
        };
        let secrets = pki::cluster_secrets(&ca, &worker, &manager);
        let keys = GossipKeys {
            cluster: hex::decode(&secrets.gossip_key)?.try_into().map_err(|_| anyhow::anyhow!("bad gossip key"))?,
            signer: control::gossip::Signer::generate(),
        };
        let init = Command::Init {
            cluster_id: cluster_id.clone(),
            node: NewNode {
                name,
                underlay_addr: underlay,
                api_addr: advertise,
                role: Role::Manager,
                joined_at: unix_now(),
                gossip_addr,
                gossip_public_key: keys.signer.public_key(),
            },
            secrets,
        };
        identity.save(&ctx.state_dir.join(PKI_DIR))?;
        keys.save(&ctx.state_dir.join(PKI_DIR))?;
        membership.save(&ctx.state_dir)?;
        match Self::start(ctx, membership, Arc::new(identity), Some(init)).await {
            Ok(rt) => Ok((
                rt,
                pb::InitReply {
                    node_id: 1,
                    cluster_id,
                    worker_token: worker.to_string(),
                    manager_token: manager.to_string(),
                    manager_addr: advertise.to_string(),
                },
            )),
            Err(e) => {
                forget(&ctx.state_dir);
                Err(e)
            }
        }
    }

    /// `overlayd join`: becomes a member of the cluster a manager belongs to.
    pub async fn join(
        ctx: &ClusterContext,
        req: pb::JoinClusterRequest,
    ) -> Result<(ClusterRuntime, pb::JoinClusterReply)> {
        let token: JoinToken =
            req.token.trim().parse().map_err(|e| anyhow::anyhow!("the join token is malformed: {e}"))?;
        let manager = parse_manager(&req.manager_addr)?;
        let advertise = advertise_addr(&ctx.nl, &req.advertise_addr).await?;
        let underlay = parse_underlay(&req.underlay_addr, advertise)?;
        let name = default_name(&req.name);
        let gossip_addr = gossip::gossip_addr(advertise, parse_port(req.gossip_port)?);
        let signer = control::gossip::Signer::generate();
        let key = NodeKey::generate()?;
        let channel = pki::connect_pinned(manager, token.ca_digest, JOIN_TIMEOUT).await.map_err(|e| match e {
            pki::PkiError::UntrustedServer { .. } | pki::PkiError::CaDigestMismatch => anyhow::anyhow!(
                "the manager at {manager} does not belong to the cluster this token is for (its CA does not match the token): \
                 check the address and the token"
            ),
            other => anyhow::anyhow!("cannot reach the manager at {manager}: {other}"),
        })?;
        let request = pb::JoinRequest {
            secret: token.secret.clone(),
            name: name.clone(),
            underlay_addr: underlay.to_string(),
            api_addr: advertise.to_string(),
            csr_der: key.csr_der(&name)?,
            gossip_addr: gossip_addr.to_string(),
            gossip_public_key: signer.public_key().to_vec(),
        };
        let reply = tokio::time::timeout(JOIN_TIMEOUT, pb::manager_client::ManagerClient::new(channel).join(request))
            .await
            .map_err(|_| anyhow::anyhow!("the manager at {manager} did not answer within {JOIN_TIMEOUT:?}"))?
            .map_err(|s| anyhow::anyhow!("the manager at {manager} refused the join: {}", s.message()))?
            .into_inner();
        let identity = key.into_identity(&reply.node_cert_pem, &reply.ca_cert_pem)?;
        let role = control::convert::role_from_pb(reply.role)?;
        let managers: Vec<SocketAddr> = reply.managers.iter().filter_map(|m| m.api_addr.parse().ok()).collect();
        let membership = Membership {
            cluster_id: reply.cluster_id.clone(),
            node_id: reply.node_id,
            name,
            role,
            advertise,
            underlay,
            managers: if managers.is_empty() { vec![manager] } else { managers },
            gossip: gossip_addr,
        };
        let keys = GossipKeys {
            cluster: reply
                .gossip_key
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("the manager sent no valid gossip key (is it an older overlayd?)"))?,
            signer,
        };
        identity.save(&ctx.state_dir.join(PKI_DIR))?;
        keys.save(&ctx.state_dir.join(PKI_DIR))?;
        membership.save(&ctx.state_dir)?;
        let rt = match Self::start(ctx, membership, Arc::new(identity), None).await {
            Ok(rt) => rt,
            Err(e) => {
                forget(&ctx.state_dir);
                return Err(e);
            }
        };
        if role == Role::Manager {
            rt.await_voter().await?;
        }
        Ok((
            rt,
            pb::JoinClusterReply {
                node_id: reply.node_id,
                cluster_id: reply.cluster_id,
                role: reply.role,
                managers: reply.managers,
            },
        ))
    }

    /// Resumes the membership the state dir holds, if any.
    pub async fn resume(ctx: &ClusterContext) -> Result<Option<ClusterRuntime>> {
        let Some(membership) = Membership::load(&ctx.state_dir)? else { return Ok(None) };
        let identity = NodeIdentity::load(&ctx.state_dir.join(PKI_DIR))?.context(
            "the state dir has a cluster membership but no node certificate: run `overlayd leave` and join again",
        )?;
        tracing::info!(cluster = %membership.cluster_id, node = membership.node_id, role = %membership.role, "resuming cluster membership");
        Ok(Some(Self::start(ctx, membership, Arc::new(identity), None).await?))
    }

    async fn start(
        ctx: &ClusterContext,
        membership: Membership,
        identity: Arc<NodeIdentity>,
        bootstrap: Option<Command>,
    ) -> Result<ClusterRuntime> {
        let host =
            Arc::new(Host::start(ctx.nl.clone(), membership.underlay, ctx.underlay_mtu, ctx.settings.clone()).await?);
        let result = async {
            let store = Arc::new(Mutex::new(EndpointStore::load(&ctx.state_dir.join(ENDPOINTS_FILE))?));
            let listener = TcpListener::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), membership.advertise.port()))
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on the control port {} (is another overlayd using it?)",
                        membership.advertise.port()
                    )
                })?;
            let manager = match membership.role {
                Role::Manager => {
                    let config = ManagerConfig {
                        dir: ctx.state_dir.join(RAFT_DIR),
                        api_addr: membership.advertise,
                        default_mtu: host.underlay.mtu - host.overhead(),
                    };
                    Some(Manager::open(config, Arc::clone(&identity)).await?)
                }
                Role::Worker => None,
            };
            let host_api: Arc<dyn HostApi> = Arc::new(Endpoints {
                store: Arc::clone(&store),
                node: membership.node_id,
                name: membership.name.clone(),
            });
            let routes = match &manager {
                Some(m) => m.services(host_api),
                None => tonic::service::Routes::new(pb::host_server::HostServer::new(control::manager::HostService(
                    host_api,
                ))),
            };
            let incoming = pki::incoming(listener, identity.server_config()?);
            let mut tasks = vec![tokio::spawn(async move {
                if let Err(e) =
                    tonic::transport::Server::builder().add_routes(routes).serve_with_incoming(incoming).await
                {
                    tracing::error!(error = %e, "the control API stopped");
                }
            })];
            if let (Some(m), Some(init)) = (&manager, bootstrap) {
                m.bootstrap(init).await.context("cannot initialize the cluster's Raft state")?;
            }
            let keys = GossipKeys::load(&ctx.state_dir.join(PKI_DIR))?;
            let me = control::gossip::Peer {
                node: membership.node_id,
                addr: membership.gossip,
                generation: gossip::next_epoch(&ctx.state_dir)?,
            };
            let gossip = Arc::new(Gossip::start(me, &keys, control::gossip::GossipConfig::default()).await?);
            if let Some(m) = &manager {
                m.follow_liveness(gossip.liveness());
            }
            let follower =
                Follower::start(Arc::clone(&identity), membership.managers.clone(), ctx.state_dir.join(VIEW_FILE));
            // Commands run right after init or join (attach, network ls) must see the state.
            let mut views = follower.subscribe();
            if tokio::time::timeout(Duration::from_secs(10), views.wait_for(|v| v.revision > 0)).await.is_err() {
                tracing::warn!("no cluster state from a manager yet; going on, the view will follow");
            }
            let rt = ClusterRuntime {
                membership,
                host: Arc::clone(&host),
                manager,
                follower,
                gossip,
                endpoints: store,
                state_dir: ctx.state_dir.clone(),
                tasks: Vec::new(),
            };
            tasks.push(tokio::spawn(reconcile_loop(
                Arc::clone(&rt.host),
                Arc::clone(&rt.follower),
                Arc::clone(&rt.endpoints),
                Arc::clone(&rt.gossip),
                rt.membership.node_id,
            )));
            if rt.membership.role == Role::Manager
                && rt.manager.as_ref().is_some_and(|m| !m.members().0.contains(&rt.membership.node_id))
            {
                tasks.push(tokio::spawn(promote_loop(Arc::clone(&rt.follower))));
            }
            Ok(ClusterRuntime { tasks, ..rt })
        }
        .await;
        if result.is_err() {
            host.shutdown().await;
        }
        result
    }

    /// Waits until this (joining) manager is a Raft voter.
    async fn await_voter(&self) -> Result<()> {
        let Some(m) = &self.manager else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + PROMOTE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if m.members().0.contains(&self.membership.node_id) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "joined as a manager, but the leader has not made this host a Raft voter within {PROMOTE_TIMEOUT:?}; it keeps trying"
        )
    }

    /// Stops everything this host runs for the cluster (membership stays on disk).
    pub async fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(m) = &self.manager {
            let _ = m.raft.shutdown().await;
        }
        self.host.shutdown().await;
    }

    /// `overlayd leave`: detaches every container, leaves the cluster, forgets it.
    pub async fn leave(&self) -> Result<()> {
        let mut client = self.follower.manager().await.context("cannot leave")?;
        // Gossip first: every host withdraws this one's endpoints at once.
        self.gossip.leave().await;
        client.leave(pb::LeaveRequest {}).await.map_err(|s| anyhow::anyhow!("the cluster refused: {}", s.message()))?;
        {
            let mut store = self.endpoints.lock().await;
            for e in store.endpoints.drain(..) {
                let _ = attach::unplumb(&self.host.nl, &e.host_ifname).await;
            }
        }
        self.shutdown().await;
        forget(&self.state_dir);
        Ok(())
    }

    /// The cluster part of `overlayd status`.
    pub async fn status(&self) -> pb::ClusterStatus {
        let view = self.follower.view();
        let (connected, to) = self.follower.connection();
        let leader = match &self.manager {
            Some(m) => m.leader().await.unwrap_or(0),
            None => 0,
        };
        pb::ClusterStatus {
            cluster_id: self.membership.cluster_id.clone(),
            node_id: self.membership.node_id,
            node_name: self.membership.name.clone(),
            role: pb::Role::from(self.membership.role) as i32,
            leader_id: leader,
            revision: view.revision,
            connected,
            connected_to: to.map(|a| a.to_string()).unwrap_or_default(),
            api_addr: self.membership.advertise.to_string(),
        }
    }

    /// `overlayd node ls`.
    pub async fn node_list(&self) -> pb::NodeListReply {
        let view = self.follower.view();
        let leader = match self.follower.manager().await {
            Ok(mut c) => c.info(pb::Empty {}).await.map(|r| r.into_inner().leader_id).unwrap_or(0),
            Err(_) => 0,
        };
        pb::NodeListReply {
            nodes: view.nodes.values().map(pb::Node::from).collect(),
            leader_id: leader,
            self_id: self.membership.node_id,
        }
    }

    /// `overlayd peers`: every host of the view (and any other SWIM member) as gossip sees it.
    pub async fn peers(&self) -> Result<pb::PeersReply> {
        let snap = self.gossip.snapshot().await?;
        let view = self.follower.view();
        let raft = |id: NodeId| match view.nodes.get(&id).map(|n| n.status) {
            Some(control::state::NodeStatus::Ready) => "ready",
            Some(control::state::NodeStatus::Down) => "down",
            None => "-",
        };
        let mut peers: Vec<pb::PeerInfo> = snap
            .peers
            .iter()
            .map(|p| pb::PeerInfo {
                node_id: p.node,
                name: view.nodes.get(&p.node).map(|n| n.name.clone()).unwrap_or_default(),
                state: p.state.to_owned(),
                gossip_addr: view.nodes.get(&p.node).map(|n| n.gossip_addr.to_string()).unwrap_or_default(),
                generation: p.generation,
                incarnation: u32::from(p.incarnation),
                table_epoch: p.table.map_or(0, |t| t.epoch),
                table_version: p.table.map_or(0, |t| t.watermark),
                endpoints: p.endpoints as u32,
                raft_status: raft(p.node).to_owned(),
            })
            .collect();
        let me = self.membership.node_id;
        let own = self.endpoints.lock().await.endpoints.len();
        peers.push(pb::PeerInfo {
            node_id: me,
            name: self.membership.name.clone(),
            state: "self".into(),
            gossip_addr: snap.me.addr.to_string(),
            generation: snap.me.generation,
            incarnation: 0,
            table_epoch: snap.me.generation,
            table_version: 0,
            endpoints: own as u32,
            raft_status: raft(me).to_owned(),
        });
        peers.sort_by_key(|p| p.node_id);
        let counters = serde_json::to_value(&snap.counters)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v.as_u64()?))).collect())
            .unwrap_or_default();
        Ok(pb::PeersReply { peers, self_id: me, counters })
    }

    /// A client of some manager, or an error saying none answers.
    pub async fn manager_client(&self) -> Result<pb::manager_client::ManagerClient<tonic::transport::Channel>> {
        Ok(self.follower.manager().await?)
    }

    /// `overlayd network inspect`: the network, each host's block, and the endpoints of every
    /// host that has a block (this host's own, the others' as gossip reports them).
    pub async fn network_inspect(&self, name: &str) -> Result<pb::NetworkInspectReply> {
        let view = self.follower.view();
        let net =
            view.networks.get(name).with_context(|| format!("no network named {name:?} (see overlayd network ls)"))?;
        let blocks = view.blocks.get(name).cloned().unwrap_or_default();
        let peers = blocks
            .iter()
            .map(|(id, cidr)| {
                let n = view.nodes.get(id);
                pb::NetworkPeer {
                    node_id: *id,
                    node_name: n.map(|n| n.name.clone()).unwrap_or_default(),
                    vtep: n.map(|n| n.underlay_addr.to_string()).unwrap_or_default(),
                    block: cidr.to_string(),
                }
            })
            .collect();
        // Other hosts' endpoints come from gossip: no host is asked, however many there are.
        let heard = self.gossip.subscribe().borrow().clone();
        let mut endpoints = Vec::new();
        let mut unreachable = Vec::new();
        for (id, cidr) in &blocks {
            let Some(node) = view.nodes.get(id) else { continue };
            if *id == self.membership.node_id {
                let store = self.endpoints.lock().await;
                endpoints.extend(store.in_network(name).map(|e| endpoint_pb(e, *id, &node.name)));
                continue;
            }
            if !heard.alive.contains(id) {
                unreachable.push(format!("{}: down (its endpoints are withdrawn until it is back)", node.name));
                continue;
            }
            for (k, e) in heard.endpoints.get(id).into_iter().flatten() {
                if k.vni != net.vni || !cidr.contains(k.ip) {
                    continue;
                }
                endpoints.push(pb::Endpoint {
                    network: name.to_owned(),
                    name: e.name.clone(),
                    ip: k.ip.to_string(),
                    prefix_len: u32::from(net.subnet.prefix()),
                    mac: MacAddr(e.mac).to_string(),
                    node_id: *id,
                    node_name: node.name.clone(),
                    host_ifname: String::new(),
                    netns: String::new(),
                });
            }
        }
        endpoints.sort_by_key(|e| e.ip.parse::<Ipv4Addr>().ok());
        Ok(pb::NetworkInspectReply { network: Some(net.into()), peers, endpoints, unreachable })
    }

    /// `overlayd attach`.
    pub async fn attach(&self, req: pb::AttachRequest) -> Result<pb::Endpoint> {
        let ns = Netns::open((!req.netns.is_empty()).then_some(req.netns.as_str()), (req.pid != 0).then_some(req.pid))?;
        let name = if req.name.is_empty() { ns.default_name() } else { req.name.clone() };
        let ifname = if req.ifname.is_empty() { "eth0".to_owned() } else { req.ifname.clone() };
        if name.is_empty() || name.len() > 64 {
            bail!("an endpoint name has 1 to 64 characters");
        }
        let view = self.follower.view();
        let net = view
            .networks
            .get(&req.network)
            .with_context(|| format!("no network named {:?} (see overlayd network ls)", req.network))?
            .clone();
        let me = self.membership.node_id;
        // The host's block: leased once (one Raft write), then every attach is local.
        if view.block(&net.name, me).is_none() {
            let mut c = self.manager_client().await?;
            c.lease_block(pb::LeaseBlockRequest { network: net.name.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("cannot lease an address block: {}", s.message()))?;
        }
        let local = self.wait_network_up(&net.name).await?;
        let block = local.spec.gateway.map(|g| g.local_block).context("the network has no local block")?;
        let mut store = self.endpoints.lock().await;
        if let Some(e) =
            store.endpoints.iter().find(|e| e.network == net.name && (e.name == name || e.netns_id == ns.id))
        {
            bail!(
                "{:?} is already attached to {:?} as {:?} ({}): detach it first",
                ns.path.display(),
                net.name,
                e.name,
                e.ip
            );
        }
        let ip = store
            .allocate(&net.name, block, net.gateway)
            .with_context(|| format!("every address of this host's block {block} is in use"))?;
        let (host_ifname, _) = attach::veth_names(&net.name, &name);
        let record = EndpointRecord {
            network: net.name.clone(),
            name,
            ip,
            prefix_len: net.subnet.prefix(),
            mac: MacAddr::from_ipv4(ip),
            host_ifname,
            netns: ns.path.to_string_lossy().into_owned(),
            netns_id: ns.id,
            ifname,
        };
        attach::plumb(&self.host.nl, &ns, &record, &local.bridge, net.mtu, net.gateway).await?;
        store.endpoints.push(record.clone());
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(local_endpoints(&self.follower.view(), &store));
        tracing::info!(network = %record.network, name = %record.name, ip = %record.ip, "attached");
        Ok(endpoint_pb(&record, me, &self.membership.name))
    }

    async fn wait_network_up(&self, name: &str) -> Result<crate::host::LocalNetwork> {
        for _ in 0..100 {
            if let Some(n) = self.host.networks().await.remove(name) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("network {name:?} did not come up on this host within 10 s (is a manager reachable?)")
    }

    /// `overlayd detach`.
    pub async fn detach(&self, req: pb::DetachRequest) -> Result<pb::DetachReply> {
        let ns_id = if req.netns.is_empty() && req.pid == 0 {
            None
        } else {
            Some(
                Netns::open((!req.netns.is_empty()).then_some(req.netns.as_str()), (req.pid != 0).then_some(req.pid))?
                    .id,
            )
        };
        if req.name.is_empty() && ns_id.is_none() {
            bail!("say what to detach: --name NAME, --netns PATH or --pid PID");
        }
        let mut store = self.endpoints.lock().await;
        let matches = |e: &EndpointRecord| {
            (req.name.is_empty() || e.name == req.name)
                && ns_id.is_none_or(|id| e.netns_id == id)
                && (req.network.is_empty() || e.network == req.network)
        };
        let (gone, keep): (Vec<_>, Vec<_>) = store.endpoints.drain(..).partition(|e| matches(e));
        store.endpoints = keep;
        if gone.is_empty() {
            bail!("nothing to detach: no endpoint matches (see overlayd network inspect)");
        }
        for e in &gone {
            attach::unplumb(&self.host.nl, &e.host_ifname).await?;
            tracing::info!(network = %e.network, name = %e.name, ip = %e.ip, "detached");
        }
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(local_endpoints(&self.follower.view(), &store));
        // A network this host no longer uses gives its block back (so it can be removed).
        let emptied: Vec<String> =
            gone.iter().map(|e| e.network.clone()).filter(|n| store.in_network(n).next().is_none()).collect();
        drop(store);
        for network in emptied.into_iter().collect::<std::collections::BTreeSet<_>>() {
            if let Ok(mut c) = self.manager_client().await {
                if let Err(s) = c.release_block(pb::ReleaseBlockRequest { network: network.clone() }).await {
                    tracing::warn!(%network, error = %s.message(), "could not give the block back");
                }
            }
        }
        Ok(pb::DetachReply {
            detached: gone.iter().map(|e| endpoint_pb(e, self.membership.node_id, &self.membership.name)).collect(),
        })
    }
}

fn parse_underlay(given: &str, advertise: SocketAddr) -> Result<IpAddr> {
    if given.is_empty() {
        return Ok(advertise.ip());
    }
    given.parse().map_err(|_| anyhow::anyhow!("--underlay-addr {given:?} is not an IP address"))
}

fn parse_port(port: u32) -> Result<u16> {
    u16::try_from(port).map_err(|_| anyhow::anyhow!("--gossip-port {port} is not a UDP port (1-65535)"))
}

fn parse_manager(given: &str) -> Result<SocketAddr> {
    if let Ok(a) = given.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr =
        given.parse().map_err(|_| anyhow::anyhow!("{given:?} is not a manager address: give IP or IP:PORT"))?;
    Ok(SocketAddr::new(ip, proto::DEFAULT_CONTROL_PORT))
}

/// Keeps asking to be made a voter until it is (a join that was cut short, or a restart).
async fn promote_loop(follower: Arc<Follower>) {
    loop {
        let r = async {
            let mut c = follower.manager().await?;
            c.promote(pb::PromoteRequest {}).await?;
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "promotion to voter not done yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the host's networks and tables equal to what the Raft view and gossip say, gossip's
/// directory equal to the view's hosts, and this host's published endpoints equal to its own.
async fn reconcile_loop(
    host: Arc<Host>,
    follower: Arc<Follower>,
    endpoints: Arc<Mutex<EndpointStore>>,
    gossip: Arc<Gossip>,
    me: NodeId,
) {
    let mut views = follower.subscribe();
    let mut heard = gossip.subscribe();
    let mut directory = None;
    loop {
        let view = views.borrow_and_update().clone();
        let g = heard.borrow_and_update().clone();
        let dir = gossip::directory(&view);
        if directory.as_ref() != Some(&dir) {
            gossip.set_directory(dir.clone());
            directory = Some(dir);
        }
        gossip.publish_local(local_endpoints(&view, &*endpoints.lock().await));
        if let Err(e) = reconcile(&host, &view, &g, &endpoints, me).await {
            tracing::warn!(error = %format!("{e:#}"), "could not bring the host in line with the cluster state; retrying");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            r = heard.changed() => if r.is_err() { return },
        }
    }
}

/// This host's endpoints as gossip carries them (those of networks the view knows).
fn local_endpoints(
    view: &ClusterView,
    store: &EndpointStore,
) -> Vec<(control::gossip::EndpointKey, control::gossip::Endpoint)> {
    store
        .endpoints
        .iter()
        .filter_map(|e| {
            let vni = view.networks.get(&e.network)?.vni;
            Some((
                control::gossip::EndpointKey { vni, ip: e.ip },
                control::gossip::Endpoint { mac: e.mac.0, name: e.name.clone() },
            ))
        })
        .collect()
}

/// One pass: networks this host has a block in are up; the others are down. An up network's
/// tables: every other block's VTEP (dropped while its host is down), the flood list of the
/// live hosts that have a block, the gateway, and the endpoints of the live hosts (each only
/// within its owner's block: a host cannot claim another's addresses).
async fn reconcile(
    host: &Host,
    view: &ClusterView,
    heard: &GossipView,
    endpoints: &Mutex<EndpointStore>,
    me: NodeId,
) -> Result<()> {
    let mut wanted: BTreeMap<String, NetworkSpec> = BTreeMap::new();
    for (name, net) in &view.networks {
        let Some(local_block) = view.block(name, me) else { continue };
        let Some(vni) = Vni::new(net.vni) else { continue };
        wanted.insert(
            name.clone(),
            NetworkSpec {
                name: name.clone(),
                vni,
                bridge: format!("ovbr-{name}"),
                tap: format!("ovt-{name}"),
                mtu: net.mtu,
                learning: false,
                gateway: Some(Gateway { addr: net.gateway, local_block }),
            },
        );
    }
    for (name, local) in host.networks().await {
        if wanted.get(&name) != Some(&local.spec) {
            host.remove_network(&name).await?;
        }
    }
    for (name, spec) in wanted {
        let fresh = !host.networks().await.contains_key(&name);
        if fresh {
            host.add_network(spec.clone()).await?;
            // Containers attached before (a restart) go back on the new bridge.
            let local = host.networks().await.remove(&name).context("network vanished")?;
            for e in endpoints.lock().await.in_network(&name) {
                if crate::netdev::link_exists(&host.nl, &e.host_ifname).await? {
                    crate::netdev::enslave(&host.nl, &e.host_ifname, &local.bridge, spec.mtu).await?;
                }
            }
        }
        let net = &view.networks[&name];
        let blocks = view.blocks.get(&name).cloned().unwrap_or_default();
        let mut flood = Vec::new();
        let mut owners = Vec::new();
        let mut remote = Vec::new();
        for (node, cidr) in blocks {
            if node == me {
                owners.push((cidr.addr(), BlockOwner::Local));
                continue;
            }
            let Some(n) = view.nodes.get(&node) else { continue };
            if !heard.alive.contains(&node) {
                owners.push((cidr.addr(), BlockOwner::Down(n.underlay_addr)));
                continue;
            }
            owners.push((cidr.addr(), BlockOwner::Remote(n.underlay_addr)));
            flood.push(n.underlay_addr);
            for (k, e) in heard.endpoints.get(&node).into_iter().flatten() {
                let mac = MacAddr(e.mac);
                if k.vni == net.vni && cidr.contains(k.ip) && !mac.is_multicast() {
                    remote.push((k.ip, mac, n.underlay_addr));
                }
            }
        }
        host.program_network(spec.vni, flood, net.block_prefix, owners, net.gateway, remote)?;
    }
    Ok(())
}
