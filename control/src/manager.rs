//! A manager: one Raft voter holding the cluster state, and the services it answers on the
//! control port — Raft among managers, the manager API for hosts (join, watch, network and
//! node operations), and the host API every node serves.
//!
//! Writes go to the leader: a manager that is not the leader hands them over (`Propose`), so a
//! host may talk to any manager. The leader also tracks the hosts' heartbeats and marks a host
//! down (and ready again) in the replicated state.
//!
//! Every call but `Join` is authorized first ([`crate::authz`]): by the caller's standing in
//! this manager's state (a removed node is refused, and its open watch ended), its role there,
//! and for a Raft vote its place among the voters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, Raft, SnapshotPolicy};
use proto as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::{Request, Response as GrpcResponse, Status};

use crate::authz::{self, Call, Caller, Denied, Need, Standing, Voting};
use crate::gossip::GossipKey;
use crate::pki::{ClusterCa, JoinToken, NodeIdentity};
use crate::raft_net::{self, NetworkFactory};
use crate::state::{
    ClusterView, Command, NewNetwork, NewNode, NodeId, NodeStatus, Rejection, Response, Role, check_network_name,
};
use crate::store::{self, StateHandle, StoreError};
use crate::transport;
use crate::types::{RaftNode, TypeConfig};
use crate::watch::{Catchup, WatchHub};

/// Heartbeat interval of Raft, milliseconds: a few hundred, for real networks.
pub const RAFT_HEARTBEAT_MS: u64 = 250;
/// Election timeout range of Raft, milliseconds. openraft 0.9 makes a follower that has a
/// leader wait a leader lease (= the maximum) *plus* a random timeout from this range before it
/// campaigns, so after a leader dies an election starts after 1.7 to 2.0 s of silence: seven
/// or more missed heartbeats, for real networks, and failover within about 2.5 s.
pub const RAFT_ELECTION_MS: (u64, u64) = (700, 1000);
/// How often hosts report to the leader.
pub const HOST_HEARTBEAT: Duration = Duration::from_secs(2);
/// A host silent for this long is marked down.
pub const DOWN_AFTER: Duration = Duration::from_secs(10);
/// How long a new leader that follows gossip waits before it marks hosts down.
pub const LIVENESS_GRACE: Duration = Duration::from_secs(3);
/// How long a manager may be out of touch with a leader before its watchers are sent away.
pub const OUT_OF_TOUCH: Duration = Duration::from_secs(3);
/// How long a write may wait for a leader to exist.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// openraft's configuration for overlayd: timeouts for real networks, not LAN benchmarks;
/// a snapshot every 500 entries, after which the log is purged.
pub fn raft_config() -> Config {
    Config {
        cluster_name: "overlayd".into(),
        heartbeat_interval: RAFT_HEARTBEAT_MS,
        election_timeout_min: RAFT_ELECTION_MS.0,
        election_timeout_max: RAFT_ELECTION_MS.1,
        // The default 200 ms per snapshot chunk can loop forever on a loaded host.
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 100,
        purge_batch_size: 64,
        ..Default::default()
    }
}

/// Seconds since the Unix epoch, from this host's clock (proposers stamp commands with it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a manager hands to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderOp {
    /// A state command.
    Command(Box<Command>),
    /// Make a joined manager a voter (learner first, then voter).
    AddVoter {
        /// Its id.
        id: NodeId,
        /// Where it listens.
        node: RaftNode,
    },
    /// Take a manager out of the voters.
    RemoveVoter {
        /// Its id.
        id: NodeId,
    },
    /// A host reported in.
    Heartbeat {
        /// Which.
        id: NodeId,
    },
}

/// The leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderReply {
    /// The state machine's response to a command.
    Response(Response),
    /// Done.
    Done,
}

/// Why a manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The Raft log and state machine could not be opened (see [`StoreError`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// openraft refused the configuration of [`raft_config`] (a bug: the configuration is fixed).
    #[error("invalid Raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    /// The Raft node stopped while starting, typically because its storage failed as it loaded
    /// the log or the state machine.
    #[error("the Raft node could not start: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// No leader could be reached in time (no quorum, or an election that does not end).
    #[error("no Raft leader is reachable: {0} (are a majority of the managers up?)")]
    NoLeader(String),
    /// Raft failed.
    #[error("Raft: {0}")]
    Raft(String),
}

impl From<ProposeError> for Status {
    fn from(e: ProposeError) -> Status {
        match &e {
            ProposeError::Rejected(r) => rejection_status(r),
            ProposeError::NoLeader(_) => Status::unavailable(e.to_string()),
            ProposeError::Raft(_) => Status::internal(e.to_string()),
        }
    }
}

/// The gRPC status that tells a client why the state machine refused.
pub fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::DuplicateNodeName(_)
        | Rejection::DuplicateUnderlay(..)
        | Rejection::DuplicateNetwork(_)
        | Rejection::DuplicateVni { .. }
        | Rejection::DuplicateService(_)
        | Rejection::AlreadyInitialized => Status::already_exists(msg),
        Rejection::UnknownNode(_) | Rejection::UnknownNetwork(_) | Rejection::UnknownService(_) => {
            Status::not_found(msg)
        }
        Rejection::InvalidName(_)
        | Rejection::InvalidSpec(_)
        | Rejection::SubnetOverlap { .. }
        | Rejection::SubnetOverlapsHost { .. } => Status::invalid_argument(msg),
        _ => Status::failed_precondition(msg),
    }
}

/// What the agent answers about its own endpoints, for the host API.
#[tonic::async_trait]
pub trait HostApi: Send + Sync + 'static {
    /// The endpoints attached on this host (of one network, or all). Waits for the agent's
    /// endpoint table when an attach or detach holds it, rather than answer without it.
    async fn endpoints(&self, network: Option<&str>) -> Vec<pb::Endpoint>;
}

/// Where a manager's Raft node stands, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// The current term.
    pub term: u64,
    /// The leader this manager knows of, if any.
    pub leader: Option<NodeId>,
    /// Whether this manager is the leader.
    pub leading: bool,
    /// The index of the last entry in its log.
    pub last_log_index: u64,
    /// The index of the last entry committed (by a majority of the voters).
    pub committed_index: u64,
    /// The index of the last entry applied to its state.
    pub applied_index: u64,
    /// Voters of the Raft membership.
    pub voters: usize,
    /// Writes this manager, as the leader, handed to Raft and Raft refused (see
    /// [`Manager::raft_status`]).
    pub proposals_failed: u64,
}

/// Settings of a manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where the Raft log and state machine live.
    pub dir: PathBuf,
    /// Where its control API listens (as other managers reach it).
    pub api_addr: SocketAddr,
    /// MTU given to networks created without one while no node has reported its underlay MTU
    /// (this manager's underlay MTU less VXLAN's overhead).
    pub default_mtu: u32,
    /// The cluster's id: with the identity's node id, whose Raft store it is.
    pub cluster_id: String,
    /// Whether the Raft store is made now (`init`, `join`) or must be there (a restart).
    pub opening: store::Opening,
}

/// A running manager.
pub struct Manager {
    /// The Raft instance.
    pub raft: Raft<TypeConfig>,
    /// The applied state.
    pub state: StateHandle,
    /// The watch history.
    pub hub: Arc<WatchHub>,
    identity: Arc<NodeIdentity>,
    config: ManagerConfig,
    heartbeats: Mutex<HashMap<NodeId, Instant>>,
    leader_since: Mutex<Option<Instant>>,
    liveness: Mutex<Option<tokio::sync::watch::Receiver<std::collections::BTreeSet<NodeId>>>>,
    /// Writes Raft refused this manager as leader ([`RaftStatus::proposals_failed`]).
    proposals_failed: AtomicU64,
}

impl Manager {
    /// Opens the Raft storage in `config.dir` and starts the Raft node with this identity's id.
    pub async fn open(config: ManagerConfig, identity: Arc<NodeIdentity>) -> Result<Arc<Manager>, ManagerError> {
        // `store::open` creates the directory of a new store.
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let hub = WatchHub::start(events_rx);
        let owner = store::StoreOwner { cluster_id: config.cluster_id.clone(), node_id: identity.node_id() };
        let (log_store, sm_store, state) = store::open(&config.dir, &owner, config.opening, events_tx)?;
        let raft_config = Arc::new(raft_config().validate()?);
        let raft =
            Raft::new(identity.node_id(), raft_config, NetworkFactory::new(Arc::clone(&identity)), log_store, sm_store)
                .await?;
        let m = Arc::new(Manager {
            raft,
            state,
            hub,
            identity,
            config,
            heartbeats: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            liveness: Mutex::new(None),
            proposals_failed: AtomicU64::new(0),
        });
        tokio::spawn(Arc::clone(&m).leader_duties());
        Ok(m)
    }

    /// This manager's node id.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// What this manager's copy of the state says of node `id`.
    pub fn standing(&self, id: NodeId) -> Standing {
        self.state.read(|s| Standing::of(id, &s.nodes, &s.removed))
    }

    /// Whether `id` is a voter of the Raft membership this manager has.
    fn voting(&self, id: NodeId) -> Voting {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        match (voters.is_empty(), voters.contains(&id)) {
            (true, _) => Voting::NoMembership,
            (false, true) => Voting::Voter,
            (false, false) => Voting::NotVoter,
        }
    }

    /// The node id of `request`'s caller, if it may make `call` (see [`authz::authorize`]).
    fn authorize<T>(&self, request: &Request<T>, call: Call) -> Result<NodeId, Status> {
        let (id, certified) = transport::request_peer(request).ok_or(Denied::NoCertificate)?;
        let voting =
            if matches!(call.needs(), Need::Voter | Need::Leader) { self.voting(id) } else { Voting::NotVoter };
        let caller = Caller { id, certified, standing: self.standing(id), voting };
        authz::authorize(call, &caller).map_err(|denied| {
            match denied {
                Denied::NotManager { .. } | Denied::NotVoter(_) => {
                    tracing::info!(node = id, ?call, %denied, "call refused")
                }
                _ => tracing::debug!(node = id, ?call, %denied, "call refused"),
            }
            Status::from(denied)
        })?;
        Ok(id)
    }

    /// Makes this (fresh) manager a one-voter cluster and writes `init` as its first command.
    pub async fn bootstrap(&self, init: Command) -> Result<Response, ProposeError> {
        let me = BTreeMap::from([(self.node_id(), RaftNode { api_addr: self.config.api_addr.to_string() })]);
        self.raft.initialize(me).await.map_err(|e| ProposeError::Raft(e.to_string()))?;
        match self.propose(LeaderOp::Command(Box::new(init))).await? {
            LeaderReply::Response(r) => Ok(r),
            LeaderReply::Done => Ok(Response::Done),
        }
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Option<NodeId> {
        self.raft.current_leader().await
    }

    /// Where this manager's Raft node stands. `proposals_failed` counts the writes (state
    /// commands, voter changes) Raft refused this manager while it led: leadership moved, the
    /// quorum was lost, Raft stopped. Their proposer tries again for a while (`LEADER_WAIT`).
    pub fn raft_status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        RaftStatus {
            term: m.current_term,
            leader: m.current_leader,
            leading: m.state == openraft::ServerState::Leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: self.state.committed_index(),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            voters: m.membership_config.membership().voter_ids().count(),
            proposals_failed: self.proposals_failed.load(Ordering::Relaxed),
        }
    }

    /// The voters and learners of the Raft membership.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        let learners: BTreeSet<NodeId> = m.membership().learner_ids().collect();
        (voters, learners)
    }

    /// Applies a command through the leader and unwraps the state machine's answer.
    pub async fn command(&self, cmd: Command) -> Result<Response, ProposeError> {
        match self.propose(LeaderOp::Command(Box::new(cmd))).await? {
            LeaderReply::Response(Response::Rejected(r)) => Err(ProposeError::Rejected(r)),
            LeaderReply::Response(r) => Ok(r),
            LeaderReply::Done => Ok(Response::Done),
        }
    }

    /// Carries out `op` on the leader: here if this manager leads, else by handing it over.
    pub async fn propose(&self, op: LeaderOp) -> Result<LeaderReply, ProposeError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let leader = self.raft.current_leader().await;
            let outcome = match leader {
                Some(l) if l == self.node_id() => self.lead(op.clone()).await,
                Some(l) => self.forward(l, &op).await,
                None => Err(Retry("no leader elected yet".into())),
            };
            match outcome {
                Ok(reply) => return Ok(reply),
                Err(Retry(why)) if Instant::now() < deadline => {
                    tracing::debug!(%why, "waiting for a leader");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Retry(why)) => return Err(ProposeError::NoLeader(why)),
            }
        }
    }

    async fn lead(&self, op: LeaderOp) -> Result<LeaderReply, Retry> {
        let write_err = |e: RaftError<NodeId, ClientWriteError<NodeId, RaftNode>>| {
            self.proposals_failed.fetch_add(1, Ordering::Relaxed);
            match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    Retry(format!("leadership moved to {:?}", f.leader_id))
                }
                other => Retry(other.to_string()),
            }
        };
        match op {
            LeaderOp::Command(cmd) => {
                let r = self.raft.client_write(*cmd).await.map_err(write_err)?;
                Ok(LeaderReply::Response(r.data))
            }
            LeaderOp::AddVoter { id, node } => {
                let (voters, _) = self.members();
                if voters.contains(&id) {
                    return Ok(LeaderReply::Done);
                }
                self.raft.add_learner(id, node, true).await.map_err(write_err)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_err)?;
                tracing::info!(node = id, "added a Raft voter");
                Ok(LeaderReply::Done)
            }
            LeaderOp::RemoveVoter { id } => {
                let (voters, learners) = self.members();
                if voters.contains(&id) {
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_err)?;
                } else if learners.contains(&id) {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_err)?;
                }
                Ok(LeaderReply::Done)
            }
            LeaderOp::Heartbeat { id } => {
                self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
                Ok(LeaderReply::Done)
            }
        }
    }

    async fn forward(&self, leader: NodeId, op: &LeaderOp) -> Result<LeaderReply, Retry> {
        let addr = {
            let m = self.raft.metrics().borrow().membership_config.clone();
            m.membership().get_node(&leader).map(|n| n.api_addr.clone())
        };
        let addr: SocketAddr =
            addr.and_then(|a| a.parse().ok()).ok_or_else(|| Retry(format!("no address for leader {leader}")))?;
        let channel = transport::connect(addr, &self.identity, raft_net::CONNECT_TIMEOUT)
            .await
            .map_err(|e| Retry(e.to_string()))?;
        let payload = serde_json::to_vec(op).map_err(|e| Retry(e.to_string()))?;
        let mut client = pb::raft_client::RaftClient::new(channel);
        let reply = tokio::time::timeout(LEADER_WAIT, client.propose(pb::RaftMessage { payload }))
            .await
            .map_err(|_| Retry(format!("leader {leader} did not answer")))?
            .map_err(|s| Retry(format!("leader {leader}: {}", s.message())))?;
        let result: Result<LeaderReply, String> =
            serde_json::from_slice(&reply.into_inner().payload).map_err(|e| Retry(e.to_string()))?;
        result.map_err(Retry)
    }

    /// From now on host status follows this set of live hosts (gossip's), instead of
    /// heartbeats: the leader marks a host down once it leaves the set, ready when it is back.
    pub fn follow_liveness(&self, alive: tokio::sync::watch::Receiver<std::collections::BTreeSet<NodeId>>) {
        *self.liveness.lock().unwrap_or_else(|p| p.into_inner()) = Some(alive);
    }

    /// The leader marks hosts that stopped reporting down, and back up when they return.
    async fn leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let leading = self.raft.current_leader().await == Some(self.node_id());
            let since = {
                let mut s = self.leader_since.lock().unwrap_or_else(|p| p.into_inner());
                match (leading, *s) {
                    (true, None) => *s = Some(Instant::now()),
                    (false, Some(_)) => *s = None,
                    _ => {}
                }
                *s
            };
            let Some(since) = since else { continue };
            let now = Instant::now();
            let alive = self.liveness.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|rx| rx.borrow().clone());
            let changes: Vec<(NodeId, NodeStatus)> = if let Some(alive) = alive {
                // A new leader's gossip knows who is alive already; a short grace covers a
                // leader that just started.
                let settled = now.duration_since(since) > LIVENESS_GRACE;
                let joined_before = unix_now().saturating_sub(LIVENESS_GRACE.as_secs());
                self.state.read(|s| {
                    s.nodes
                        .values()
                        .filter_map(|n| match (n.status, alive.contains(&n.id)) {
                            (NodeStatus::Ready, false) if settled && n.joined_at < joined_before => {
                                Some((n.id, NodeStatus::Down))
                            }
                            (NodeStatus::Down, true) => Some((n.id, NodeStatus::Ready)),
                            _ => None,
                        })
                        .collect()
                })
            } else {
                let hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
                self.state.read(|s| {
                    s.nodes
                        .values()
                        .filter_map(|n| {
                            // A new leader gives every host a full grace period.
                            let last = hb.get(&n.id).copied().unwrap_or(since).max(since);
                            let silent = now.duration_since(last) > DOWN_AFTER;
                            match (n.status, silent) {
                                (NodeStatus::Ready, true) => Some((n.id, NodeStatus::Down)),
                                (NodeStatus::Down, false) if hb.contains_key(&n.id) => Some((n.id, NodeStatus::Ready)),
                                _ => None,
                            }
                        })
                        .collect()
                })
            };
            for (id, status) in changes {
                tracing::info!(node = id, ?status, "host status");
                if let Err(e) = self.command(Command::SetNodeStatus { id, status }).await {
                    tracing::warn!(node = id, error = %e, "could not record host status");
                }
            }
            // Keys are rotated on a schedule too: each encrypted network's once it is
            // [`NETWORK_KEY_LIFETIME`] old.
            let at = unix_now();
            let stale: Vec<String> = self.state.read(|s| {
                s.networks
                    .values()
                    .filter(|n| n.encrypted && at.saturating_sub(n.key_made_at) >= NETWORK_KEY_LIFETIME.as_secs())
                    .map(|n| n.name.clone())
                    .collect()
            });
            for network in stale {
                match self.command(Command::RotateNetworkKey { network: network.clone(), key: new_key(), at }).await {
                    Ok(_) => tracing::info!(%network, "network key rotated on schedule"),
                    Err(e) => tracing::warn!(%network, error = %e, "could not rotate the network key"),
                }
            }
        }
    }

    /// The services of the control port: Raft, manager API, host API.
    pub fn services(self: &Arc<Self>, host: Arc<dyn HostApi>) -> tonic::service::Routes {
        let host = HostService { api: host, members: Members::Manager(Arc::clone(self)) };
        tonic::service::Routes::new(pb::raft_server::RaftServer::new(RaftService(Arc::clone(self))))
            .add_service(pb::manager_server::ManagerServer::new(ManagerService(Arc::clone(self))))
            .add_service(pb::host_server::HostServer::new(host))
    }

    /// Whether this manager is in contact with a working leader (or is one with a quorum), so
    /// that what it serves is current.
    pub fn in_touch(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        match m.state {
            openraft::ServerState::Leader => {
                m.millis_since_quorum_ack.is_some_and(|ms| ms < OUT_OF_TOUCH.as_millis() as u64)
            }
            openraft::ServerState::Follower | openraft::ServerState::Learner => m.current_leader.is_some(),
            openraft::ServerState::Candidate | openraft::ServerState::Shutdown => false,
        }
    }

    fn view(&self) -> ClusterView {
        self.state.read(|s| s.view())
    }
}

struct Retry(String);

struct RaftService(Arc<Manager>);

fn json<T: Serialize>(v: &T) -> Result<GrpcResponse<pb::RaftMessage>, Status> {
    serde_json::to_vec(v)
        .map(|payload| GrpcResponse::new(pb::RaftMessage { payload }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(m: &pb::RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&m.payload).map_err(|e| Status::invalid_argument(format!("malformed Raft message: {e}")))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<pb::RaftMessage>) -> Result<GrpcResponse<pb::RaftMessage>, Status> {
        self.0.authorize(&request, Call::AppendEntries)?;
        let r = self.0.raft.append_entries(from_json(request.get_ref())?).await;
        json(&r)
    }

    async fn vote(&self, request: Request<pb::RaftMessage>) -> Result<GrpcResponse<pb::RaftMessage>, Status> {
        self.0.authorize(&request, Call::Vote)?;
        let r = self.0.raft.vote(from_json(request.get_ref())?).await;
        json(&r)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<GrpcResponse<pb::RaftMessage>, Status> {
        self.0.authorize(&request, Call::InstallSnapshot)?;
        let r = self.0.raft.install_snapshot(from_json(request.get_ref())?).await;
        json(&r)
    }

    async fn propose(&self, request: Request<pb::RaftMessage>) -> Result<GrpcResponse<pb::RaftMessage>, Status> {
        self.0.authorize(&request, Call::Propose)?;
        let op: LeaderOp = from_json(request.get_ref())?;
        let r: Result<LeaderReply, String> = if self.0.raft.current_leader().await == Some(self.0.node_id()) {
            self.0.lead(op).await.map_err(|Retry(why)| why)
        } else {
            Err("not the leader".into())
        };
        json(&r)
    }
}

struct ManagerService(Arc<Manager>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

impl ManagerService {
    /// The id of the node named `node` (or whose id it is), as `node rm` and `node promote` take it.
    fn node_id(&self, node: &str) -> Result<NodeId, Status> {
        let id = self.0.state.read(|s| {
            s.nodes
                .values()
                .find(|n| n.name == node)
                .map(|n| n.id)
                .or_else(|| node.parse().ok().filter(|id| s.nodes.contains_key(id)))
        });
        id.ok_or_else(|| Status::not_found(format!("no node named {node:?} (see overlayd node ls)")))
    }

    /// The MTU of a network created without one: the largest that every node's underlay
    /// carries (their reported underlay MTUs less VXLAN's overhead), else this manager's own
    /// (`ManagerConfig::default_mtu`); within 576 to 9000.
    fn default_mtu(&self) -> u32 {
        let smallest = self.0.state.read(|s| crate::state::smallest_network_mtu(s.nodes.values()));
        let mtu = smallest.unwrap_or(self.0.config.default_mtu);
        mtu.clamp(*crate::state::NETWORK_MTU.start(), *crate::state::NETWORK_MTU.end())
    }

    /// Removes a node: out of the Raft voters first if it is a manager. The gossip key is
    /// replaced in the same write, so the one the removed node holds opens nothing once every
    /// host has the new one.
    async fn remove(&self, id: NodeId) -> Result<(), Status> {
        let m = &self.0;
        let is_manager = m.state.read(|s| s.nodes.get(&id).map(|n| n.role == Role::Manager));
        match is_manager {
            None => return Err(rejection_status(&Rejection::UnknownNode(id))),
            Some(true) => {
                let (voters, _) = m.members();
                if voters.len() == 1 && voters.contains(&id) {
                    return Err(Status::failed_precondition(
                        "this is the cluster's last manager: removing it would leave no one to hold the state. \
                         To dissolve the cluster, let every other host leave, then run `overlayd leave --force` here \
                         (or, to keep the cluster, first join another host with the manager token)",
                    ));
                }
                m.propose(LeaderOp::RemoveVoter { id }).await?;
            }
            Some(false) => {}
        }
        // Every key it held is replaced: the gossip key, and each encrypted network's.
        let network_keys = m
            .state
            .read(|s| s.networks.values().filter(|n| n.encrypted).map(|n| (n.name.clone(), new_key())).collect());
        let gossip_key = Some(new_key());
        m.command(Command::RemoveNode { id, gossip_key, network_keys, at: unix_now() }).await?;
        tracing::info!(node = id, "node removed; gossip and network keys rotated");
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::manager_server::Manager for ManagerService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<GrpcResponse<pb::JoinReply>, Status> {
        let m = &self.0;
        let req = request.into_inner();
        let secrets = m
            .state
            .read(|s| s.secrets.clone())
            .ok_or_else(|| Status::unavailable("the cluster is not initialized yet"))?;
        let hash = JoinToken::secret_hash(&req.secret);
        let role = if constant_time_eq(&hash, &secrets.manager_token_hash) {
            Role::Manager
        } else if constant_time_eq(&hash, &secrets.worker_token_hash) {
            Role::Worker
        } else {
            return Err(Status::permission_denied(
                "the join token's secret is not valid for this cluster: ask a manager for one: `overlayd join-token worker` (or `manager`) on a manager",
            ));
        };
        let underlay_addr = req
            .underlay_addr
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad underlay address {:?}", req.underlay_addr)))?;
        let api_addr = req
            .api_addr
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad API address {:?}", req.api_addr)))?;
        if req.name.is_empty() || req.name.len() > 64 {
            return Err(Status::invalid_argument("a node name has 1 to 64 characters"));
        }
        let ca = ClusterCa::from_pem(&secrets.ca_cert_pem, &secrets.ca_key_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        // Check the CSR before the node is recorded, so a bad request changes nothing.
        ca.sign_node(&req.csr_der, 0, role)
            .map_err(|e| Status::invalid_argument(format!("bad certificate request: {e}")))?;
        let gossip_addr = req
            .gossip_addr
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad gossip address {:?}", req.gossip_addr)))?;
        let gossip_public_key = req
            .gossip_public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("a gossip public key has 32 bytes"))?;
        let gossip_key = hex::decode(&secrets.gossip_key).map_err(|e| Status::internal(e.to_string()))?;
        let gossip_key_generation = m.state.read(|s| s.gossip_key_generation);
        let new = NewNode {
            name: req.name.clone(),
            underlay_addr,
            api_addr,
            role,
            joined_at: unix_now(),
            gossip_addr,
            gossip_public_key,
            underlay_networks: crate::convert::underlay_networks(&req.underlay_networks)
                .map_err(Status::invalid_argument)?,
        };
        let node = match m.command(Command::AddNode(new)).await? {
            Response::Node(n) => n,
            other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        };
        let cert = ca.sign_node(&req.csr_der, node.id, role).map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(node = node.id, name = %node.name, role = role.as_str(), "host joined");
        let view = m.view();
        Ok(GrpcResponse::new(pb::JoinReply {
            node_id: node.id,
            cluster_id: view.cluster_id.clone(),
            role: pb::Role::from(role) as i32,
            ca_cert_pem: secrets.ca_cert_pem,
            node_cert_pem: cert,
            managers: view.nodes.values().filter(|n| n.role == Role::Manager).map(pb::Node::from).collect(),
            gossip_key,
            gossip_key_generation,
        }))
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<GrpcResponse<pb::Empty>, Status> {
        let id = self.0.authorize(&request, Call::Promote)?;
        let addr = self
            .0
            .state
            .read(|s| s.nodes.get(&id).map(|n| n.api_addr))
            .ok_or_else(|| Status::not_found(format!("no node {id}")))?;
        self.0.propose(LeaderOp::AddVoter { id, node: RaftNode { api_addr: addr.to_string() } }).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<GrpcResponse<WatchStream>, Status> {
        let id = self.0.authorize(&request, Call::Watch)?;
        let mut revision = request.get_ref().from_revision;
        let m = Arc::clone(&self.0);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut head = m.hub.subscribe();
            let mut out_of_touch: Option<Instant> = None;
            loop {
                // A watcher removed meanwhile is sent away with the refusal its next call
                // would get: its certificate opens nothing from now on.
                if m.standing(id) == Standing::Removed {
                    if tx.send(Err(Denied::Removed(id).into())).await.is_err() {
                        tracing::debug!(node = id, "a removed watcher left before it was told");
                    }
                    return;
                }
                // Each event says how far the history goes, so the watcher knows its lag.
                let newest = *head.borrow();
                let catchup = m.hub.catchup(revision);
                let events: Vec<pb::WatchEvent> = match catchup {
                    Catchup::Snapshot => {
                        let view = m.view();
                        revision = view.revision;
                        let body = Some(pb::watch_event::Body::Snapshot((&view).into()));
                        vec![pb::WatchEvent { revision, body, head: newest.max(revision) }]
                    }
                    Catchup::Changes(sets) => {
                        let last = sets.last().map_or(revision, |(r, _)| *r);
                        sets.into_iter()
                            .map(|(r, changes)| {
                                revision = r;
                                pb::WatchEvent {
                                    revision: r,
                                    body: Some(pb::watch_event::Body::Changes(pb::ChangeSet {
                                        changes: changes.iter().map(pb::Change::from).collect(),
                                    })),
                                    head: newest.max(last),
                                }
                            })
                            .collect()
                    }
                    Catchup::Wait => {
                        tokio::select! {
                            changed = head.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                            }
                            () = tokio::time::sleep(Duration::from_secs(1)) => {
                                // A manager cut off from the leader would keep its watchers
                                // waiting for changes it will never see: send them elsewhere.
                                match m.in_touch() {
                                    true => out_of_touch = None,
                                    false => {
                                        let since = *out_of_touch.get_or_insert_with(Instant::now);
                                        if since.elapsed() >= OUT_OF_TOUCH {
                                            let away = Status::unavailable(
                                                "this manager has lost contact with the cluster's leader: watch another manager",
                                            );
                                            if tx.send(Err(away)).await.is_err() {
                                                tracing::debug!("the watcher left before it was sent away");
                                            }
                                            return;
                                        }
                                    }
                                }
                            }
                        }
                        continue;
                    }
                };
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return; // the watcher went away
                    }
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn create_network(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<GrpcResponse<pb::Network>, Status> {
        self.0.authorize(&request, Call::CreateNetwork)?;
        let r = request.into_inner();
        check_network_name(&r.name).map_err(|e| rejection_status(&e))?;
        let subnet = match r.subnet.as_str() {
            "" => None,
            s => Some(s.parse().map_err(Status::invalid_argument)?),
        };
        let block_prefix = match r.block_prefix {
            0 => None,
            p => Some(u8::try_from(p).map_err(|_| Status::invalid_argument("block prefix above 32"))?),
        };
        let spec = NewNetwork {
            name: r.name,
            vni: (r.vni != 0).then_some(r.vni),
            subnet,
            // A sealed datagram is 32 bytes longer (its header and tag): the default leaves room.
            mtu: match (r.mtu, r.encrypted) {
                (0, false) => self.default_mtu(),
                (0, true) => self.default_mtu().saturating_sub(SEAL_OVERHEAD),
                (mtu, _) => mtu,
            },
            block_prefix,
            created_at: unix_now(),
            internal: r.internal,
            key: r.encrypted.then(new_key),
        };
        match self.0.command(Command::CreateNetwork(spec)).await? {
            Response::Network(n) => Ok(GrpcResponse::new((&n).into())),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn remove_network(
        &self,
        request: Request<pb::RemoveNetworkRequest>,
    ) -> Result<GrpcResponse<pb::Empty>, Status> {
        self.0.authorize(&request, Call::RemoveNetwork)?;
        let r = request.into_inner();
        self.0.command(Command::RemoveNetwork { name: r.name, force: r.force }).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn create_service(&self, request: Request<pb::Service>) -> Result<GrpcResponse<pb::Service>, Status> {
        self.0.authorize(&request, Call::CreateService)?;
        let spec = crate::convert::new_service_from_pb(request.get_ref(), unix_now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.0.command(Command::CreateService(spec)).await? {
            Response::Service(s) => Ok(GrpcResponse::new((&s).into())),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn remove_service(
        &self,
        request: Request<pb::RemoveServiceRequest>,
    ) -> Result<GrpcResponse<pb::Empty>, Status> {
        self.0.authorize(&request, Call::RemoveService)?;
        self.0.command(Command::RemoveService { name: request.into_inner().name }).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn lease_block(&self, request: Request<pb::LeaseBlockRequest>) -> Result<GrpcResponse<pb::Block>, Status> {
        let node = self.0.authorize(&request, Call::LeaseBlock)?;
        match self.0.command(Command::LeaseBlock { network: request.into_inner().network, node }).await? {
            Response::Block(b) => Ok(GrpcResponse::new((&b).into())),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn release_block(
        &self,
        request: Request<pb::ReleaseBlockRequest>,
    ) -> Result<GrpcResponse<pb::Empty>, Status> {
        let node = self.0.authorize(&request, Call::ReleaseBlock)?;
        self.0.command(Command::ReleaseBlock { network: request.into_inner().network, node }).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<GrpcResponse<pb::Empty>, Status> {
        let id = self.0.authorize(&request, Call::Heartbeat)?;
        let report = request.get_ref();
        if report.report_networks {
            let networks =
                crate::convert::underlay_networks(&report.underlay_networks).map_err(Status::invalid_argument)?;
            self.0.command(Command::SetUnderlayNetworks { id, networks }).await?;
        }
        if report.underlay_mtu != 0 {
            self.0.command(Command::SetUnderlayMtu { id, mtu: report.underlay_mtu }).await?;
        }
        self.0.propose(LeaderOp::Heartbeat { id }).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<GrpcResponse<pb::Empty>, Status> {
        self.0.authorize(&request, Call::RemoveNode)?;
        let r = request.into_inner();
        let id = self.node_id(&r.node)?;
        let is_manager = self.0.state.read(|s| s.nodes.get(&id).is_some_and(|n| n.role == Role::Manager));
        let ready = self.0.state.read(|s| s.nodes.get(&id).is_some_and(|n| n.status == NodeStatus::Ready));
        if is_manager && ready && !r.force {
            return Err(Status::failed_precondition(format!(
                "{:?} is a running manager: run `overlayd leave` on it, or use --force",
                r.node
            )));
        }
        self.remove(id).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<GrpcResponse<pb::Empty>, Status> {
        let id = self.0.authorize(&request, Call::Leave)?;
        self.remove(id).await?;
        Ok(GrpcResponse::new(pb::Empty {}))
    }

    async fn info(&self, request: Request<pb::Empty>) -> Result<GrpcResponse<pb::ClusterInfo>, Status> {
        self.0.authorize(&request, Call::Info)?;
        let m = &self.0;
        let (voters, learners) = m.members();
        let (cluster_id, revision) = m.state.read(|s| (s.cluster_id.clone(), s.revision));
        Ok(GrpcResponse::new(pb::ClusterInfo {
            cluster_id,
            leader_id: m.leader().await.unwrap_or(0),
            revision,
            voters: voters.into_iter().collect(),
            learners: learners.into_iter().collect(),
        }))
    }

    async fn network_keys(&self, request: Request<pb::Empty>) -> Result<GrpcResponse<pb::NetworkKeysReply>, Status> {
        self.0.authorize(&request, Call::NetworkKeys)?;
        let keys = self.0.state.read(|s| s.secrets.as_ref().map(|x| x.network_keys.clone()));
        let keys = keys.ok_or_else(|| Status::unavailable("the cluster is not initialized yet"))?;
        let mut networks = BTreeMap::new();
        for (name, epochs) in keys {
            let mut list = Vec::new();
            for k in epochs {
                let key = hex::decode(&k.key)
                    .map_err(|e| Status::internal(format!("the stored key of network {name} is not hex: {e}")))?;
                list.push(pb::EpochKey { epoch: k.epoch, key });
            }
            networks.insert(name, pb::NetworkKeys { keys: list });
        }
        Ok(GrpcResponse::new(pb::NetworkKeysReply { networks }))
    }

    async fn rotate_network_key(
        &self,
        request: Request<pb::RotateNetworkKeyRequest>,
    ) -> Result<GrpcResponse<pb::Network>, Status> {
        self.0.authorize(&request, Call::RotateNetworkKey)?;
        let r = request.into_inner();
        let cmd = Command::RotateNetworkKey { network: r.network.clone(), key: new_key(), at: unix_now() };
        match self.0.command(cmd).await? {
            Response::Network(n) => {
                tracing::info!(network = %n.name, epoch = n.key_epoch, "network key rotated");
                Ok(GrpcResponse::new((&n).into()))
            }
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn set_node_role(&self, request: Request<pb::SetNodeRoleRequest>) -> Result<GrpcResponse<pb::Node>, Status> {
        self.0.authorize(&request, Call::SetNodeRole)?;
        let r = request.into_inner();
        let role = crate::convert::role_from_pb(r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = self.node_id(&r.node)?;
        if role == Role::Worker {
            let managers = self.0.state.read(|s| s.nodes.values().filter(|n| n.role == Role::Manager).count());
            let is_manager = self.0.state.read(|s| s.nodes.get(&id).is_some_and(|n| n.role == Role::Manager));
            if is_manager && managers == 1 {
                return Err(Status::failed_precondition(format!(
                    "{:?} is the cluster's last manager: promote another node first",
                    r.node
                )));
            }
            // The managers left must still make a majority of themselves.
            let (up, left) = self.0.state.read(|s| {
                let left: Vec<_> = s.nodes.values().filter(|n| n.role == Role::Manager && n.id != id).collect();
                (left.iter().filter(|n| n.status == NodeStatus::Ready).count(), left.len())
            });
            if is_manager && up * 2 <= left {
                return Err(Status::failed_precondition(format!(
                    "demoting {:?} would leave {left} managers of which {up} are up: no majority. Bring the others \
                     back, or remove the dead ones first (overlayd node rm NODE --force)",
                    r.node
                )));
            }
            // Its vote goes first: a demoted node never counts towards a majority.
            if is_manager {
                self.0.propose(LeaderOp::RemoveVoter { id }).await?;
            }
        }
        // A promoted node sees its new role, takes a manager's certificate and asks for its
        // vote itself (Manager.Promote), as a manager that joins does. A leader that removed
        // its own vote steps down: the role is then written through the next one.
        let mut tries = 0;
        let answer = loop {
            match self.0.command(Command::SetRole { id, role }).await {
                Err(ProposeError::NoLeader(_)) if tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                other => break other?,
            }
        };
        match answer {
            Response::Node(n) => {
                tracing::info!(node = n.id, name = %n.name, role = role.as_str(), "node role changed");
                Ok(GrpcResponse::new(pb::Node::from(&n)))
            }
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn certify(&self, request: Request<pb::CertifyRequest>) -> Result<GrpcResponse<pb::CertifyReply>, Status> {
        let id = self.0.authorize(&request, Call::Certify)?;
        let role = self
            .0
            .state
            .read(|s| s.nodes.get(&id).map(|n| n.role))
            .ok_or_else(|| Status::not_found(format!("no node {id}")))?;
        let secrets = self.0.state.read(|s| s.secrets.clone()).ok_or_else(|| Status::unavailable("not initialized"))?;
        let ca = ClusterCa::from_pem(&secrets.ca_cert_pem, &secrets.ca_key_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let cert = ca
            .sign_node(&request.get_ref().csr_der, id, role)
            .map_err(|e| Status::invalid_argument(format!("bad certificate request: {e}")))?;
        tracing::info!(node = id, role = role.as_str(), "certified a node for its role");
        Ok(GrpcResponse::new(pb::CertifyReply { node_cert_pem: cert, role: pb::Role::from(role) as i32 }))
    }

    async fn update_network(
        &self,
        request: Request<pb::UpdateNetworkRequest>,
    ) -> Result<GrpcResponse<pb::Network>, Status> {
        self.0.authorize(&request, Call::UpdateNetwork)?;
        let r = request.into_inner();
        match self.0.command(Command::SetNetworkMtu { network: r.network, mtu: r.mtu }).await? {
            Response::Network(n) => {
                tracing::info!(network = %n.name, mtu = n.mtu, "network MTU changed");
                Ok(GrpcResponse::new((&n).into()))
            }
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn gossip_key(&self, request: Request<pb::Empty>) -> Result<GrpcResponse<pb::GossipKeyReply>, Status> {
        self.0.authorize(&request, Call::GossipKey)?;
        let (generation, key) =
            self.0.state.read(|s| (s.gossip_key_generation, s.secrets.as_ref().map(|x| x.gossip_key.clone())));
        let key = key.ok_or_else(|| Status::unavailable("the cluster is not initialized yet"))?;
        let key = hex::decode(key).map_err(|e| Status::internal(format!("the stored gossip key is not hex: {e}")))?;
        Ok(GrpcResponse::new(pb::GossipKeyReply { generation, key }))
    }
}

/// How long an encrypted network's key lives before the leader replaces it.
pub const NETWORK_KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Bytes a sealed datagram adds to a plain one (its header beyond VXLAN's, and its tag).
pub const SEAL_OVERHEAD: u32 = 32;

/// A new random 32-byte key, in hex (a network's, or the gossip key).
fn new_key() -> String {
    hex::encode(GossipKey::generate())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The cluster's members as the view of a host that holds no state has them (a worker's), for
/// the host API it serves: nobody's until [`MemberView::follow`] hands it the follower's view.
#[derive(Clone, Debug, Default)]
pub struct MemberView(Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<Arc<ClusterView>>>>);

impl MemberView {
    /// From now on, the members are those of the latest of `views`.
    pub fn follow(&self, views: tokio::sync::watch::Receiver<Arc<ClusterView>>) {
        if self.0.set(views).is_err() {
            tracing::warn!("the host API already follows a view: the second is ignored");
        }
    }

    fn standing(&self, id: NodeId) -> Standing {
        match self.0.get() {
            Some(views) => {
                let view = views.borrow();
                Standing::of(id, &view.nodes, &view.removed)
            }
            None => Standing::Unknown,
        }
    }
}

/// Who the host API takes calls from: a manager asks its state, any other host its view.
enum Members {
    Manager(Arc<Manager>),
    View(MemberView),
}

/// The host API, answered from the agent's endpoints, to the cluster's members.
pub struct HostService {
    api: Arc<dyn HostApi>,
    members: Members,
}

impl HostService {
    /// The host API of a host that holds no cluster state: `members` says who may call.
    pub fn new(api: Arc<dyn HostApi>, members: MemberView) -> HostService {
        HostService { api, members: Members::View(members) }
    }
}

#[tonic::async_trait]
impl pb::host_server::Host for HostService {
    async fn endpoints(
        &self,
        request: Request<pb::EndpointsRequest>,
    ) -> Result<GrpcResponse<pb::EndpointsReply>, Status> {
        match &self.members {
            Members::Manager(m) => {
                m.authorize(&request, Call::Endpoints)?;
            }
            Members::View(view) => {
                let (id, certified) = transport::request_peer(&request).ok_or(Denied::NoCertificate)?;
                let caller = Caller { id, certified, standing: view.standing(id), voting: Voting::NotVoter };
                authz::authorize(Call::Endpoints, &caller)?;
            }
        }
        let network = request.get_ref().network.as_str();
        let endpoints = self.api.endpoints((!network.is_empty()).then_some(network)).await;
        Ok(GrpcResponse::new(pb::EndpointsReply { endpoints }))
    }
}
