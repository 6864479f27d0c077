//! Cluster mode: a host that has run `init` or `join`. This module wires its runtime — the
//! control API it serves, the manager it runs if it is one, the follower of the state, gossip
//! and the reconciler — and stops it; `membership` is what the host is in the cluster and how
//! it becomes it, `reports` answers the CLI, `reconcile` keeps the host in line with the state.

pub mod keys;
mod membership;
mod reconcile;
mod reports;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::follower::Follower;
use control::manager::{HostApi, Manager, ManagerConfig};
use control::pki::NodeIdentity;
use control::state::{Command, Role};
use control::store::Opening;
use control::transport;
use proto as pb;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

pub use membership::{Membership, RoleChangeError, forget_offline, is_member};

use crate::config::DaemonSettings;
use crate::dns::Dns;
use crate::endpoints::{self, EndpointStore};
use crate::gossip::{self, Gossip, GossipKeys};
use crate::host::Host;

pub(crate) const PKI_DIR: &str = "pki";
pub(crate) const RAFT_DIR: &str = "raft";
pub(crate) const VIEW_FILE: &str = "view.json";
pub(crate) const ENDPOINTS_FILE: &str = "endpoints.json";
/// How long `join --token <manager token>` waits to become a Raft voter.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the daemon passes down to cluster mode.
#[derive(Clone)]
pub struct ClusterContext {
    pub state_dir: PathBuf,
    pub nl: rtnetlink::Handle,
    /// The daemon's settings: the dataplane's, the underlay MTU, the default advertise address.
    pub settings: DaemonSettings,
}

/// A host in cluster mode.
pub struct ClusterRuntime {
    pub membership: Membership,
    pub host: Arc<Host>,
    pub manager: Option<Arc<Manager>>,
    pub follower: Arc<Follower>,
    pub gossip: Arc<Gossip>,
    /// The DNS resolvers of this host's networks.
    pub dns: Dns,
    pub(crate) endpoints: Arc<Mutex<EndpointStore>>,
    pub(crate) state_dir: PathBuf,
    /// Who may take which TLS handshake slot of the control port, and what it refused.
    pub(crate) admission: transport::Admission,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tasks that hold the runtime itself (started by [`ClusterRuntime::running`]).
    followers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ClusterRuntime {
    async fn start(
        ctx: &ClusterContext,
        membership: Membership,
        identity: Arc<NodeIdentity>,
        bootstrap: Option<Command>,
        opening: Opening,
    ) -> Result<ClusterRuntime> {
        let host = Arc::new(
            Host::start(ctx.nl.clone(), membership.underlay, ctx.settings.underlay_mtu, ctx.settings.dataplane.clone())
                .await?,
        );
        let result = async {
            let store = Arc::new(Mutex::new(endpoints::recover(&ctx.nl, &ctx.state_dir.join(ENDPOINTS_FILE)).await?));
            let listen = match &ctx.settings.listen_addr {
                Some(a) => crate::config::socket_addr(a, membership.advertise.port(), "--listen-addr")?,
                None => membership.advertise,
            };
            let listener = TcpListener::bind(listen).await.map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrNotAvailable => format!(
                        "{} is not an address of this host: behind NAT, give --listen-addr 0.0.0.0 (or this host's own address)",
                        listen.ip()
                    ),
                    std::io::ErrorKind::AddrInUse => "is another overlayd using it?".to_owned(),
                    _ => e.to_string(),
                };
                anyhow::anyhow!("cannot listen on the control API address {listen}: {hint}")
            })?;
            let manager = match membership.role {
                Role::Manager => {
                    let config = ManagerConfig {
                        dir: ctx.state_dir.join(RAFT_DIR),
                        api_addr: membership.advertise,
                        default_mtu: host.underlay.mtu - host.overhead(),
                        cluster_id: membership.cluster_id.clone(),
                        opening,
                    };
                    Some(Manager::open(config, Arc::clone(&identity)).await?)
                }
                Role::Worker => None,
            };
            let host_api: Arc<dyn HostApi> = Arc::new(endpoints::Lister {
                store: Arc::clone(&store),
                node: membership.node_id,
                name: membership.name.clone(),
            });
            // A worker's host API answers the members its view lists (once it has a view).
            let members = control::manager::MemberView::default();
            let routes = match &manager {
                Some(m) => m.services(host_api),
                None => tonic::service::Routes::new(pb::host_server::HostServer::new(
                    control::manager::HostService::new(host_api, members.clone()),
                )),
            };
            // Handshakes from the cluster's own hosts keep slots a flood cannot take.
            let admission = transport::Admission::default();
            let incoming = transport::incoming_with(listener, identity.server_config()?, admission.clone());
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
            let keys = GossipKeys::load(&ctx.state_dir.join(PKI_DIR)).map_err(membership::or_rejoin)?;
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
            tasks.push(admission.follow_members(follower.subscribe()));
            members.follow(follower.subscribe());
            tasks.push(gossip::follow_key_rotations(
                Arc::clone(&gossip),
                Arc::clone(&follower),
                ctx.state_dir.join(PKI_DIR),
                keys.generation,
            ));
            // Commands run right after init or join (attach, network ls) must see the state.
            let mut views = follower.subscribe();
            if tokio::time::timeout(Duration::from_secs(10), views.wait_for(|v| v.revision > 0)).await.is_err() {
                tracing::warn!("no cluster state from a manager yet; going on, the view will follow");
            }
            let dns = Dns::start(
                &host,
                Arc::clone(&follower),
                &gossip,
                Arc::clone(&store),
                membership.node_id,
                ctx.settings.dns_ttl,
                ctx.settings.dns_upstreams_file.clone(),
            );
            let rt = ClusterRuntime {
                membership,
                host: Arc::clone(&host),
                manager,
                follower,
                gossip,
                dns,
                endpoints: store,
                state_dir: ctx.state_dir.clone(),
                admission,
                tasks: Vec::new(),
                followers: Default::default(),
            };
            let (keys_tx, keys_rx) = tokio::sync::watch::channel(Arc::new(keys::Keys::new()));
            tasks.push(tokio::spawn(keys::follow(Arc::clone(&rt.follower), keys_tx)));
            tasks.push(tokio::spawn(reconcile::run(
                Arc::clone(&rt.host),
                Arc::clone(&rt.follower),
                Arc::clone(&rt.endpoints),
                Arc::clone(&rt.gossip),
                rt.membership.node_id,
                keys_rx,
            )));
            if rt.membership.role == Role::Manager
                && rt.manager.as_ref().is_some_and(|m| !m.members().0.contains(&rt.membership.node_id))
            {
                tasks.push(tokio::spawn(promote_loop(Arc::clone(&rt.follower))));
            }
            tasks.push(tokio::spawn(report_networks(Arc::clone(&rt.follower), ctx.nl.clone(), rt.membership.node_id)));
            tasks.push(tokio::spawn(watch_underlay_mtu(
                Arc::clone(&rt.follower),
                Arc::clone(&rt.host),
                rt.membership.node_id,
                ctx.settings.underlay_mtu,
            )));
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

    /// The runtime, running: with the tasks that need it whole (endpoints that follow their
    /// containers).
    pub fn running(rt: ClusterRuntime) -> Arc<ClusterRuntime> {
        let rt = Arc::new(rt);
        let follow = tokio::spawn(Arc::clone(&rt).follow_containers());
        let resolv_confs = tokio::spawn(Arc::clone(&rt).resync_resolv_confs());
        let health = tokio::spawn(Arc::clone(&rt).check_replicas());
        let vips = tokio::spawn(Arc::clone(&rt).balance_vips());
        let mesh = tokio::spawn(Arc::clone(&rt).publish_ports());
        rt.followers.lock().unwrap_or_else(|p| p.into_inner()).extend([follow, resolv_confs, health, vips, mesh]);
        rt
    }

    /// Stops everything this host runs for the cluster (membership stays on disk).
    pub async fn shutdown(&self) {
        for t in self.tasks.iter().chain(self.followers.lock().unwrap_or_else(|p| p.into_inner()).iter()) {
            t.abort();
        }
        self.dns.stop();
        // Its mesh ports go with the networks: nothing is published through them any more.
        if let Err(e) = crate::services::mesh::unpublish().await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the published ports");
        }
        if let Some(m) = &self.manager {
            let _ = m.raft.shutdown().await;
        }
        self.host.shutdown().await;
    }

    /// A client of some manager, or an error saying none answers.
    pub async fn manager_client(&self) -> Result<pb::manager_client::ManagerClient<tonic::transport::Channel>> {
        Ok(self.follower.manager().await?)
    }
}

/// Tells the cluster this host's networks once they are not what its node record says (they
/// changed since it joined, or an older overlayd joined without them), so that no network is
/// given a subnet that overlaps them. Keeps trying until a manager takes them.
async fn report_networks(follower: Arc<Follower>, nl: rtnetlink::Handle, me: control::state::NodeId) {
    let mut views = follower.subscribe();
    loop {
        let recorded = match views.wait_for(|v| v.nodes.contains_key(&me)).await {
            Ok(v) => v.nodes.get(&me).map(|n| n.underlay_networks.clone()).unwrap_or_default(),
            Err(_) => return,
        };
        let r = async {
            let now = crate::netdev::host_networks(&nl).await?;
            if now != recorded {
                let report = pb::HeartbeatRequest {
                    report_networks: true,
                    underlay_networks: now.iter().map(ToString::to_string).collect(),
                    underlay_mtu: 0,
                };
                follower.manager().await?.heartbeat(report).await?;
                tracing::info!(networks = ?now, "reported this host's networks to the cluster");
            }
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "could not report this host's networks yet"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// How often the underlay interface's MTU is read again without a link notification (one
/// missed, or none to be had).
const UNDERLAY_MTU_EVERY: Duration = Duration::from_secs(10);

/// Reads the underlay interface's MTU whenever the kernel announces a change of an interface
/// (netlink), and every [`UNDERLAY_MTU_EVERY`] besides, or takes `fixed`, the `--underlay-mtu`
/// setting, for `status`; and tells the cluster when it differs from this node's record, so
/// that new networks get an MTU every host's underlay carries.
async fn watch_underlay_mtu(follower: Arc<Follower>, host: Arc<Host>, me: control::state::NodeId, fixed: Option<u32>) {
    let mut changes = match crate::netdev::link_changes() {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no link notifications: the underlay's MTU is read every {UNDERLAY_MTU_EVERY:?}");
            None
        }
    };
    loop {
        let r = async {
            let now = host.refresh_underlay_mtu(fixed).await?;
            // Once the view lists this node, and its record says otherwise.
            let recorded = follower.view().nodes.get(&me).map(|n| n.underlay_mtu);
            if recorded.is_none() {
                anyhow::bail!("the cluster does not list this node yet");
            }
            if recorded.is_some_and(|r| r != Some(now)) {
                let report = pb::HeartbeatRequest { underlay_mtu: now, ..Default::default() };
                follower.manager().await?.heartbeat(report).await?;
                tracing::info!(mtu = now, "reported this host's underlay MTU to the cluster");
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = &r {
            tracing::debug!(error = %format!("{e:#}"), "could not read or report the underlay MTU yet");
        }
        // Until the cluster has this node's record, and after a failed report, again soon.
        let wait = if r.is_err() { Duration::from_secs(2) } else { UNDERLAY_MTU_EVERY };
        tokio::select! {
            Some(()) = async { changes.as_mut()?.recv().await } => {
                // A burst (containers attaching) is one reading.
                while changes.as_mut().is_some_and(|c| c.try_recv().is_ok()) {}
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
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
