//! What a host is in its cluster and how it becomes it: `cluster.json` and the key files in
//! the state dir, written by `init` and `join`, read back by `resume`, removed by `leave` (or
//! by a failed `init`/`join`, which leaves nothing half-done behind).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::manager::unix_now;
use control::pki::{self, ClusterCa, JoinToken, NodeIdentity, NodeKey};
use control::state::{Command, NewNode, Role};
use control::store::Opening;
use control::transport::{self, TransportError};
use proto as pb;

use self::record::MEMBERSHIP_FILE;
pub use self::record::Membership;
use super::{ClusterContext, ClusterRuntime, ENDPOINTS_FILE, PKI_DIR, RAFT_DIR, VIEW_FILE};
use crate::attach;
use crate::config::socket_addr;
use crate::gossip::{self, GossipKeys};

mod record;

/// How long `join` waits for a manager to answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do about a membership whose files cannot be trusted: put them back, or come back as
/// a new node.
const REJOIN: &str = "Put the file back if you have it; or bring this host back as a new node: on a manager \
    `overlayd node rm <this node> --force`, then on this host `overlayd leave --force` (it forgets the membership \
    kept in the state dir) and `overlayd join`";

/// `e`, with [`REJOIN`] after it.
pub(super) fn or_rejoin(e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = format!("{:#}", e.into());
    let stop = if e.ends_with(['.', '?']) { "" } else { "." };
    anyhow::anyhow!("{e}{stop} {REJOIN}")
}

/// Whether `dir` holds a cluster membership.
pub fn is_member(dir: &Path) -> bool {
    dir.join(MEMBERSHIP_FILE).exists()
}

/// Removes what `init`/`join` wrote, after a failure or `leave`.
fn forget(dir: &Path) {
    for f in [MEMBERSHIP_FILE, VIEW_FILE, ENDPOINTS_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join(PKI_DIR));
    let _ = std::fs::remove_dir_all(dir.join(RAFT_DIR));
}

/// `overlayd leave --force` when no daemon runs with `dir` (one that refuses to start, say,
/// because its Raft store is gone): removes the veths of the endpoints the state dir records
/// (or, if that record is unreadable, of every endpoint whose veth carries overlayd's tag)
/// and forgets the membership, without asking the cluster. `false`: there was none.
pub async fn forget_offline(dir: &Path) -> Result<bool> {
    let files = [MEMBERSHIP_FILE, VIEW_FILE, ENDPOINTS_FILE, PKI_DIR, RAFT_DIR];
    let mut any = false;
    for f in files {
        // try_exists, not exists: a file this user may not look at is not an absent one.
        match dir.join(f).try_exists() {
            Ok(there) => any |= there,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(anyhow::Error::new(e).context(crate::output::Classified(
                    crate::output::Failure::NotPermitted,
                    format!("cannot read the state dir {}: run overlayd leave --force as root", dir.display()),
                )));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read the state dir {}", dir.display())),
        }
    }
    if !any {
        return Ok(false);
    }
    let nl = crate::netdev::connect()?;
    let veths: Vec<String> = match crate::endpoints::EndpointStore::load(&dir.join(ENDPOINTS_FILE)) {
        Ok(store) => store.endpoints.iter().chain(&store.pending).map(|e| e.host_ifname.clone()).collect(),
        Err(_) => crate::netdev::links(&nl)
            .await?
            .into_iter()
            .filter(|l| l.veth && l.alias.as_deref().and_then(attach::VethTag::parse).is_some())
            .map(|l| l.name)
            .collect(),
    };
    for veth in veths {
        attach::unplumb(&nl, &veth).await?;
    }
    remove_left_bridges(&nl, dir).await;
    forget(dir);
    Ok(true)
}

/// Removes the bridges of the networks the cached view names that overlayd made (they carry
/// its alias) and that are still here: a killed daemon leaves its bridges for the next one to
/// adopt, and after `leave --force` there is no next one (no daemon at all, offline; or one
/// that never brought the network up, as a node that learns at start that it was removed).
async fn remove_left_bridges(nl: &rtnetlink::Handle, dir: &Path) {
    let Some(view) = std::fs::read(dir.join(VIEW_FILE)).ok().and_then(|b| control::follower::read_cache(&b)) else {
        return;
    };
    let links = match crate::netdev::links(nl).await {
        Ok(links) => links,
        Err(e) => return tracing::warn!(error = %format!("{e:#}"), "cannot list the interfaces to remove left bridges"),
    };
    for name in view.networks.keys().map(|n| format!("ovbr-{n}")) {
        let ours = links.iter().any(|l| l.name == name && l.alias.as_deref() == Some(crate::netdev::BRIDGE_ALIAS));
        if !ours {
            continue;
        }
        match crate::netdev::delete_link(nl, &name).await {
            Ok(()) => tracing::info!(bridge = %name, "removed a bridge an earlier daemon left"),
            Err(e) => tracing::warn!(bridge = %name, error = %format!("{e:#}"), "could not remove a left bridge"),
        }
    }
}

/// Picks the address to advertise: the one given to `init`/`join`, else the daemon's setting,
/// else this host's only global address.
async fn advertise_addr(ctx: &ClusterContext, given: &str) -> Result<SocketAddr> {
    let port = proto::DEFAULT_CONTROL_PORT;
    if !given.is_empty() {
        return socket_addr(given, port, "--advertise-addr");
    }
    if let Some(setting) = &ctx.settings.advertise_addr {
        return socket_addr(setting, port, "the daemon's advertise_addr");
    }
    let addrs = crate::netdev::global_addresses(&ctx.nl).await?;
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

fn parse_underlay(given: &str, advertise: SocketAddr) -> Result<IpAddr> {
    if given.is_empty() {
        return Ok(advertise.ip());
    }
    given.parse().map_err(|_| anyhow::anyhow!("--underlay-addr {given:?} is not an IP address"))
}

fn parse_port(port: u32) -> Result<u16> {
    u16::try_from(port).map_err(|_| anyhow::anyhow!("--gossip-port {port} is not a UDP port (1-65535)"))
}

impl ClusterRuntime {
    /// `overlayd init`: a new cluster with this host as its first manager.
    pub async fn init(ctx: &ClusterContext, req: pb::InitRequest) -> Result<(ClusterRuntime, pb::InitReply)> {
        let advertise = advertise_addr(ctx, &req.advertise_addr).await?;
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
            generation: 0,
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
                underlay_networks: crate::netdev::host_networks(&ctx.nl).await?,
            },
            secrets,
        };
        identity.save(&ctx.state_dir.join(PKI_DIR))?;
        keys.save(&ctx.state_dir.join(PKI_DIR))?;
        membership.save(&ctx.state_dir)?;
        match Self::start(ctx, membership, Arc::new(identity), Some(init), Opening::Create).await {
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
        let manager = socket_addr(&req.manager_addr, proto::DEFAULT_CONTROL_PORT, "the manager address")?;
        let advertise = advertise_addr(ctx, &req.advertise_addr).await?;
        let underlay = parse_underlay(&req.underlay_addr, advertise)?;
        let name = default_name(&req.name);
        let gossip_addr = gossip::gossip_addr(advertise, parse_port(req.gossip_port)?);
        let signer = control::gossip::Signer::generate();
        let key = NodeKey::generate()?;
        let channel = transport::connect_pinned(manager, token.ca_digest, JOIN_TIMEOUT).await.map_err(|e| match e {
            TransportError::UntrustedServer { .. } | TransportError::CaDigestMismatch => anyhow::anyhow!(
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
            underlay_networks: crate::netdev::host_networks(&ctx.nl).await?.iter().map(ToString::to_string).collect(),
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
            generation: reply.gossip_key_generation,
            signer,
        };
        identity.save(&ctx.state_dir.join(PKI_DIR))?;
        keys.save(&ctx.state_dir.join(PKI_DIR))?;
        membership.save(&ctx.state_dir)?;
        let rt = match Self::start(ctx, membership, Arc::new(identity), None, Opening::Create).await {
            Ok(rt) => rt,
            Err(e) => {
                forget(&ctx.state_dir);
                return Err(e);
            }
        };
        let mut warning = String::new();
        if role == Role::Manager {
            rt.await_voter().await?;
            let mut views = rt.follower.subscribe();
            let me = reply.node_id;
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), views.wait_for(|v| v.nodes.contains_key(&me)))
                    .await;
            let managers = rt.follower.view().nodes.values().filter(|n| n.role == Role::Manager).count();
            warning = crate::output::even_managers(managers).unwrap_or_default();
        }
        Ok((
            rt,
            pb::JoinClusterReply {
                node_id: reply.node_id,
                cluster_id: reply.cluster_id,
                role: reply.role,
                managers: reply.managers,
                warning,
            },
        ))
    }

    /// The role the cluster's state gives this node now, if it differs from the one it runs
    /// as (a manager promoted or demoted it).
    pub fn role_changed(&self) -> Option<Role> {
        let now = self.follower.view().nodes.get(&self.membership.node_id).map(|n| n.role)?;
        (now != self.membership.role).then_some(now)
    }

    /// Runs this node as `role` from now on (`node promote` or `node demote` on a manager): a
    /// certificate of the new role for a new key, the membership file, and the runtime started
    /// again (containers stay attached, as across a daemon restart); a promoted node opens a
    /// Raft store and asks for its vote, a demoted one drops its store.
    ///
    /// The caller hands over its runtime: once it is stopped, every reference to its host
    /// must go (the dataplane's sockets close with the last one) before the new one binds.
    pub async fn change_role(
        self: Arc<Self>,
        ctx: &ClusterContext,
        role: Role,
    ) -> Result<ClusterRuntime, (Option<Arc<Self>>, RoleChangeError)> {
        let (identity, membership) = match self.certify_as(ctx, role).await {
            Ok(x) => x,
            Err(e) => return Err((Some(self), RoleChangeError::NotStarted(e))),
        };
        tracing::info!(from = %self.membership.role, to = %role, "this node's role changed: starting again in its new role");
        self.shutdown().await;
        let host = Arc::clone(&self.host);
        drop(self);
        // The stopped runtime's tasks let go of the host as they end.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&host) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(host);
        Self::start_as(ctx, identity, membership).await.map_err(|e| (None, RoleChangeError::Stopped(e)))
    }

    /// A certificate of `role` for a new key, and the membership with that role.
    async fn certify_as(&self, ctx: &ClusterContext, role: Role) -> Result<(NodeIdentity, Membership)> {
        let pki = ctx.state_dir.join(PKI_DIR);
        let current = NodeIdentity::load(&pki)?.context("this node's certificate is gone from the state dir")?;
        let key = NodeKey::generate()?;
        let request = pb::CertifyRequest { csr_der: key.csr_der(&self.membership.name)? };
        let reply = self
            .follower
            .manager()
            .await?
            .certify(request)
            .await
            .map_err(|s| anyhow::anyhow!("the cluster did not certify this node as a {role}: {}", s.message()))?;
        let identity = key.into_identity(&reply.into_inner().node_cert_pem, current.ca_pem())?;
        anyhow::ensure!(
            identity.role() == role,
            "the cluster certified this node as a {}, not a {role}",
            identity.role()
        );
        Ok((identity, Membership { role, ..self.membership.clone() }))
    }

    /// Starts a runtime as `membership` says, with `identity` (both kept in the state dir).
    async fn start_as(ctx: &ClusterContext, identity: NodeIdentity, membership: Membership) -> Result<ClusterRuntime> {
        let (pki, role) = (ctx.state_dir.join(PKI_DIR), membership.role);
        identity.save(&pki)?;
        membership.save(&ctx.state_dir)?;
        let opening = match role {
            Role::Manager => {
                // A store left from an earlier time as a manager holds another membership.
                let _ = std::fs::remove_dir_all(ctx.state_dir.join(RAFT_DIR));
                Opening::Create
            }
            Role::Worker => {
                let _ = std::fs::remove_dir_all(ctx.state_dir.join(RAFT_DIR));
                Opening::Resume
            }
        };
        Self::start(ctx, membership, Arc::new(identity), None, opening).await
    }
}

/// Why a role change failed: before anything stopped (the runtime runs on as before), or
/// after the runtime stopped (it must be resumed).
#[derive(Debug)]
pub enum RoleChangeError {
    NotStarted(anyhow::Error),
    Stopped(anyhow::Error),
}

impl ClusterRuntime {
    /// Resumes the membership the state dir holds, if any: only with this node's own
    /// certificate, and (a manager) its own Raft store.
    pub async fn resume(ctx: &ClusterContext) -> Result<Option<ClusterRuntime>> {
        let Some(membership) = Membership::load(&ctx.state_dir).map_err(or_rejoin)? else { return Ok(None) };
        let pki = ctx.state_dir.join(PKI_DIR);
        let identity = NodeIdentity::load(&pki).map_err(or_rejoin)?.ok_or_else(|| {
            or_rejoin(anyhow::anyhow!(
                "{} holds a cluster membership, but {} holds no node certificate",
                ctx.state_dir.join(MEMBERSHIP_FILE).display(),
                pki.display()
            ))
        })?;
        if identity.node_id() != membership.node_id {
            return Err(or_rejoin(anyhow::anyhow!(
                "{} says this host is node {}, but its certificate {} is node {}'s: was cluster.json edited, or \
                 the state dir put together from two hosts?",
                ctx.state_dir.join(MEMBERSHIP_FILE).display(),
                membership.node_id,
                pki.join("node.crt").display(),
                identity.node_id()
            )));
        }
        tracing::info!(cluster = %membership.cluster_id, node = membership.node_id, role = %membership.role, "resuming cluster membership");
        Ok(Some(Self::start(ctx, membership, Arc::new(identity), None, Opening::Resume).await?))
    }

    /// `overlayd leave`: detaches every container, leaves the cluster, forgets it.
    pub async fn leave(&self) -> Result<()> {
        let mut client = self.follower.manager().await.context("cannot leave")?;
        // Gossip first: every host withdraws this one's endpoints at once.
        self.gossip.leave().await;
        client.leave(pb::LeaveRequest {}).await.map_err(|s| anyhow::anyhow!("the cluster refused: {}", s.message()))?;
        self.leave_locally().await;
        Ok(())
    }

    /// `overlayd leave --force`: detaches every container and forgets the cluster without
    /// asking it (a node removed from the cluster, or a cluster that is gone).
    pub async fn leave_locally(&self) {
        {
            let mut store = self.endpoints.lock().await;
            for e in store.endpoints.drain(..) {
                let _ = attach::unplumb(&self.host.nl, &e.host_ifname).await;
            }
        }
        self.shutdown().await;
        remove_left_bridges(&self.host.nl, &self.state_dir).await;
        forget(&self.state_dir);
    }
}
