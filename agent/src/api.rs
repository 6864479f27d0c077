//! The local API: the `Agent` gRPC service (see `proto`) on a Unix socket in the state dir
//! (`overlayd.sock`, mode 0600), which the CLI calls as `docker` calls `dockerd`. A manager's
//! command on a worker is answered here, with a manager to run it on, before any manager is
//! called. (The Prometheus endpoint is in `metrics`.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use proto as pb;
use proto::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use control::state::{NodeStatus, Role};

use crate::cluster::ClusterRuntime;
use crate::daemon::{Daemon, Mode};

/// The socket's file name in the state dir.
pub const SOCKET_NAME: &str = "overlayd.sock";

/// Where the daemon of `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Serves the local API on `path` until the future is dropped.
pub async fn serve(path: &Path, daemon: Arc<Daemon>) -> Result<()> {
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
    // The commands can reach the daemon from now on: tell systemd (Type=notify) it is ready.
    crate::daemon::notify_service_manager("READY=1");
    tonic::transport::Server::builder()
        .add_service(pb::agent_server::AgentServer::new(AgentService(daemon)))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .context("the local API stopped")
}

/// A client of the daemon whose state dir is `state_dir`.
pub async fn connect(state_dir: &Path) -> Result<AgentClient<Channel>> {
    let path = socket_path(state_dir);
    let p = path.clone();
    let channel =
        Endpoint::try_from("http://overlayd.local")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .with_context(|| {
                crate::output::Classified(
                    crate::output::Failure::Unreachable,
                    format!(
                        "cannot reach the overlayd daemon at {}: is `overlayd daemon` running with --state-dir {}?",
                        path.display(),
                        state_dir.display()
                    ),
                )
            })?;
    Ok(AgentClient::new(channel))
}

/// Turns a refusal from the daemon into an error that reads well on the command line.
pub fn refused(s: Status) -> anyhow::Error {
    crate::output::Refusal(s.code(), s.message().to_owned()).into()
}

/// Waits (5 s at most) until this host's view of the cluster state satisfies `done`: a command
/// that changed the state answers once what follows it on this host (attach, ls) sees the change.
async fn await_view(c: &ClusterRuntime, mut done: impl FnMut(&control::state::ClusterView) -> bool) {
    let mut views = c.follower.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(5), views.wait_for(|v| done(v))).await;
}

struct AgentService(Arc<Daemon>);

fn internal(e: anyhow::Error) -> Status {
    Status::failed_precondition(format!("{e:#}"))
}

/// What a worker answers a manager's command: which manager to run it on (from its view, the
/// ready ones first). The role is the one the view records (the certificate's is what the host
/// joined as). `None` on a manager.
fn worker_refusal(c: &ClusterRuntime) -> Option<Status> {
    let view = c.follower.view();
    let me = c.membership.node_id;
    let role = view.nodes.get(&me).map_or(c.membership.role, |n| n.role);
    if role == Role::Manager {
        return None;
    }
    let mut managers: Vec<_> = view.nodes.values().filter(|n| n.role == Role::Manager && n.id != me).collect();
    managers.sort_by_key(|n| (n.status != NodeStatus::Ready, n.id));
    let names: Vec<String> = managers.iter().take(2).map(|n| format!("{} at {}", n.name, n.api_addr)).collect();
    let example = match names.as_slice() {
        [] => "none is known to this host yet".to_owned(),
        some => format!("e.g. {}", some.join(", or ")),
    };
    Some(Status::permission_denied(format!("this host is a worker: run this on a manager ({example})")))
}

/// `overlayd join-token [--rotate] ROLE` on a manager: the token, rotated first if asked (the
/// old one is refused once the rotation is applied).
async fn join_token(c: &ClusterRuntime, req: &pb::JoinTokenRequest) -> Result<pb::JoinTokenReply, Status> {
    let role = control::convert::role_from_pb(req.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let m = c.manager.as_ref().ok_or_else(|| Status::failed_precondition("this host runs no manager"))?;
    let token = if req.rotate {
        let (token, cmd) = control::pki::JoinToken::rotation(c.follower.identity().ca_digest(), role);
        m.command(cmd).await?;
        tracing::info!(%role, "join token rotated");
        token.to_string()
    } else {
        let kept = m.state.read(|s| {
            s.secrets.as_ref().map(|x| match role {
                Role::Worker => x.worker_token.clone(),
                Role::Manager => x.manager_token.clone(),
            })
        });
        match kept {
            None => return Err(Status::unavailable("this manager has no cluster state yet: try again")),
            Some(t) if t.is_empty() => {
                return Err(Status::failed_precondition(format!(
                    "this cluster's {role} token was made before overlayd kept join tokens: make a new one with `overlayd join-token --rotate {role}`"
                )));
            }
            Some(t) => t,
        }
    };
    Ok(pb::JoinTokenReply {
        role: pb::Role::from(role) as i32,
        token,
        manager_addr: c.membership.advertise.to_string(),
        rotated: req.rotate,
    })
}

impl AgentService {
    async fn cluster(&self) -> Result<Arc<ClusterRuntime>, Status> {
        match &*self.0.mode.read().await {
            Mode::Cluster(c) => Ok(Arc::clone(c)),
            Mode::Idle => Err(Status::failed_precondition(
                "this host is not in a cluster: run `overlayd init` to start one, or `overlayd join` to join one",
            )),
            Mode::Static(_) => Err(Status::failed_precondition(
                "this daemon runs in static mode (networks from its configuration): cluster commands need a daemon \
                 started without static networks",
            )),
        }
    }

    async fn manager(&self) -> Result<pb::manager_client::ManagerClient<Channel>, Status> {
        self.cluster().await?.manager_client().await.map_err(|e| Status::unavailable(format!("{e:#}")))
    }

    /// The cluster runtime, if this host is a manager; a worker is told where to go instead.
    async fn managing(&self) -> Result<Arc<ClusterRuntime>, Status> {
        let c = self.cluster().await?;
        match worker_refusal(&c) {
            Some(refusal) => Err(refusal),
            None => Ok(c),
        }
    }

    async fn idle_for(&self, what: &str) -> Result<tokio::sync::RwLockWriteGuard<'_, Mode>, Status> {
        let mode = self.0.mode.write().await;
        match &*mode {
            Mode::Idle => Ok(mode),
            Mode::Cluster(c) => Err(Status::already_exists(format!(
                "this host is already node {} ({:?}) of cluster {}: run `overlayd leave` before you {what}",
                c.membership.node_id, c.membership.name, c.membership.cluster_id
            ))),
            Mode::Static(_) => Err(Status::failed_precondition(format!(
                "this daemon runs in static mode: start one without static networks (and its own --state-dir) to {what}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn status(&self, _: Request<pb::Empty>) -> Result<Response<pb::StatusReply>, Status> {
        let mode = self.0.mode.read().await;
        let mut reply = match &*mode {
            Mode::Idle => pb::StatusReply {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                mode: "idle".into(),
                uptime_secs: self.0.started.elapsed().as_secs(),
                allocation_counting: dataplane::alloc_count::is_installed(),
                ..Default::default()
            },
            Mode::Static(h) => h.status("static").await,
            Mode::Cluster(c) => pb::StatusReply { cluster: Some(c.status().await), ..c.host.status("cluster").await },
        };
        // Up since the process started, whatever the mode (a host's dataplane may be younger).
        reply.uptime_secs = self.0.started.elapsed().as_secs();
        Ok(Response::new(reply))
    }

    async fn fdb(&self, _: Request<pb::Empty>) -> Result<Response<pb::FdbReply>, Status> {
        let mode = self.0.mode.read().await;
        Ok(Response::new(match mode.host() {
            Some(h) => h.fdb().await,
            None => pb::FdbReply::default(),
        }))
    }

    async fn init(&self, request: Request<pb::InitRequest>) -> Result<Response<pb::InitReply>, Status> {
        let mut mode = self.idle_for("init a cluster").await?;
        let (rt, reply) = ClusterRuntime::init(&self.0.ctx, request.into_inner()).await.map_err(internal)?;
        tracing::info!(cluster = %reply.cluster_id, "initialized a new cluster");
        *mode = Mode::Cluster(ClusterRuntime::running(rt));
        Ok(Response::new(reply))
    }

    async fn join(&self, request: Request<pb::JoinClusterRequest>) -> Result<Response<pb::JoinClusterReply>, Status> {
        let mut mode = self.idle_for("join a cluster").await?;
        let (rt, reply) = ClusterRuntime::join(&self.0.ctx, request.into_inner()).await.map_err(internal)?;
        tracing::info!(cluster = %reply.cluster_id, node = reply.node_id, "joined the cluster");
        *mode = Mode::Cluster(ClusterRuntime::running(rt));
        Ok(Response::new(reply))
    }

    async fn leave(&self, request: Request<pb::LeaveClusterRequest>) -> Result<Response<pb::Empty>, Status> {
        let rt = self.cluster().await?;
        let mut mode = self.0.mode.write().await;
        if request.get_ref().force {
            rt.leave_locally().await;
            tracing::info!("forgot the cluster (leave --force): nobody was asked");
        } else {
            rt.leave().await.map_err(internal)?;
            tracing::info!("left the cluster");
        }
        *mode = Mode::Idle;
        Ok(Response::new(pb::Empty {}))
    }

    async fn node_list(&self, _: Request<pb::Empty>) -> Result<Response<pb::NodeListReply>, Status> {
        Ok(Response::new(self.cluster().await?.node_list().await))
    }

    async fn node_remove(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::Empty>, Status> {
        self.managing().await?;
        self.manager().await?.remove_node(request.into_inner()).await
    }

    async fn network_create(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let c = self.managing().await?;
        let net = self.manager().await?.create_network(request.into_inner()).await?.into_inner();
        // Answer once this host's view has it, so that what follows (attach, ls) sees it.
        await_view(&c, |v| v.networks.contains_key(&net.name)).await;
        Ok(Response::new(net))
    }

    async fn network_list(&self, _: Request<pb::Empty>) -> Result<Response<pb::NetworkListReply>, Status> {
        let view = self.cluster().await?.follower.view();
        Ok(Response::new(pb::NetworkListReply { networks: view.networks.values().map(pb::Network::from).collect() }))
    }

    async fn network_inspect(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::NetworkInspectReply>, Status> {
        let c = self.cluster().await?;
        c.network_inspect(&request.get_ref().name)
            .await
            .map(Response::new)
            .map_err(|e| Status::not_found(format!("{e:#}")))
    }

    async fn network_remove(&self, request: Request<pb::RemoveNetworkRequest>) -> Result<Response<pb::Empty>, Status> {
        let c = self.managing().await?;
        let name = request.get_ref().name.clone();
        self.manager().await?.remove_network(request.into_inner()).await?;
        await_view(&c, |v| !v.networks.contains_key(&name)).await;
        Ok(Response::new(pb::Empty {}))
    }

    async fn node_set_role(&self, request: Request<pb::SetNodeRoleRequest>) -> Result<Response<pb::Node>, Status> {
        let c = self.managing().await?;
        let n = self.manager().await?.set_node_role(request.into_inner()).await?.into_inner();
        let (id, role) = (n.id, n.role);
        await_view(&c, |v| v.nodes.get(&id).is_some_and(|x| pb::Role::from(x.role) as i32 == role)).await;
        // Done when the Raft membership (as this manager's replica has it) agrees: a promoted
        // node votes, a demoted one does not.
        let voter = role == pb::Role::Manager as i32;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while c.manager.as_ref().is_some_and(|m| m.members().0.contains(&id) != voter) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "{} has its new role in the cluster state, but after 30 s it {} a Raft voter: see its daemon's log",
                    n.name,
                    if voter { "is not yet" } else { "is still" }
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Response::new(n))
    }

    async fn network_update(
        &self,
        request: Request<pb::UpdateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let c = self.managing().await?;
        let net = self.manager().await?.update_network(request.into_inner()).await?.into_inner();
        // Answer once this host's view has it (and this host's containers follow).
        await_view(&c, |v| v.networks.get(&net.name).is_some_and(|n| n.mtu == net.mtu)).await;
        Ok(Response::new(net))
    }

    async fn network_rotate_key(
        &self,
        request: Request<pb::RotateNetworkKeyRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let c = self.managing().await?;
        let net = self.manager().await?.rotate_network_key(request.into_inner()).await?.into_inner();
        await_view(&c, |v| v.networks.get(&net.name).is_some_and(|n| n.key_epoch >= net.key_epoch)).await;
        Ok(Response::new(net))
    }

    async fn attach(&self, request: Request<pb::AttachRequest>) -> Result<Response<pb::Endpoint>, Status> {
        self.cluster().await?.attach(request.into_inner()).await.map(Response::new).map_err(|e| {
            if e.downcast_ref::<crate::endpoints::AlreadyAttached>().is_some() {
                Status::already_exists(format!("{e:#}"))
            } else {
                internal(e)
            }
        })
    }

    async fn endpoints(&self, request: Request<pb::EndpointsRequest>) -> Result<Response<pb::EndpointsReply>, Status> {
        let endpoints = self.cluster().await?.local_endpoints(&request.get_ref().network).await;
        Ok(Response::new(pb::EndpointsReply { endpoints }))
    }

    async fn detach(&self, request: Request<pb::DetachRequest>) -> Result<Response<pb::DetachReply>, Status> {
        let req = request.into_inner();
        // Veths that no endpoint of the store holds (a wiped state dir left them): detach
        // removes them too, in a cluster or not.
        let strays = |known: Vec<String>| {
            let req = req.clone();
            let nl = self.0.ctx.nl.clone();
            async move {
                let ns = crate::attach::Netns::open(
                    (!req.netns.is_empty()).then_some(req.netns.as_str()),
                    (req.pid != 0).then_some(req.pid),
                )
                .ok()
                .map(|n| n.id);
                let gone = crate::attach::remove_strays(&nl, &req.name, ns, &known).await.map_err(internal)?;
                let detached: Vec<pb::Endpoint> = gone
                    .into_iter()
                    .map(|(name, network)| pb::Endpoint { name, network, ..Default::default() })
                    .collect();
                Ok::<_, Status>(detached)
            }
        };
        let c = match &*self.0.mode.read().await {
            Mode::Cluster(c) => Arc::clone(c),
            Mode::Idle if !req.name.is_empty() || !req.netns.is_empty() || req.pid != 0 => {
                let detached = strays(Vec::new()).await?;
                if detached.is_empty() {
                    return Err(Status::failed_precondition(
                        "this host is not in a cluster, and no veth overlayd left here matches",
                    ));
                }
                return Ok(Response::new(pb::DetachReply { detached }));
            }
            _ => self.cluster().await?,
        };
        match c.detach(req.clone()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) if e.downcast_ref::<crate::endpoints::NothingToDetach>().is_some() => {
                let known: Vec<String> =
                    c.endpoints.lock().await.endpoints.iter().map(|e| e.host_ifname.clone()).collect();
                let detached = strays(known).await?;
                if !detached.is_empty() {
                    return Ok(Response::new(pb::DetachReply { detached }));
                }
                // Named, and held by another host: say which, and what to run there.
                let elsewhere = if req.name.is_empty() { Vec::new() } else { c.holders_of(&req.name) };
                Err(Status::not_found(match elsewhere.as_slice() {
                    [] => format!("{e:#}"),
                    held => format!(
                        "{} is not attached on this host: it is on {}; run `overlayd detach --name {}` there",
                        req.name,
                        held.join(", "),
                        req.name
                    ),
                }))
            }
            Err(e) => Err(internal(e)),
        }
    }

    async fn peers(&self, _: Request<pb::Empty>) -> Result<Response<pb::PeersReply>, Status> {
        self.cluster().await?.peers().await.map(Response::new).map_err(internal)
    }

    async fn join_token(&self, request: Request<pb::JoinTokenRequest>) -> Result<Response<pb::JoinTokenReply>, Status> {
        let c = self.managing().await?;
        join_token(&c, request.get_ref()).await.map(Response::new)
    }

    async fn dns(&self, request: Request<pb::DnsRequest>) -> Result<Response<pb::DnsReply>, Status> {
        let c = self.cluster().await?;
        c.dns.report(&request.get_ref().network).map(Response::new).map_err(|e| Status::not_found(format!("{e:#}")))
    }

    async fn service_create(&self, request: Request<pb::Service>) -> Result<Response<pb::Service>, Status> {
        let c = self.managing().await?;
        let svc = self.manager().await?.create_service(request.into_inner()).await?.into_inner();
        // Answer once this host's view has it, so that what follows (attach --service) sees it.
        await_view(&c, |v| v.services.contains_key(&svc.name)).await;
        Ok(Response::new(svc))
    }

    async fn service_remove(&self, request: Request<pb::RemoveServiceRequest>) -> Result<Response<pb::Empty>, Status> {
        let c = self.managing().await?;
        let name = request.get_ref().name.clone();
        self.manager().await?.remove_service(request.into_inner()).await?;
        await_view(&c, |v| !v.services.contains_key(&name)).await;
        Ok(Response::new(pb::Empty {}))
    }

    async fn service_list(&self, _: Request<pb::Empty>) -> Result<Response<pb::ServiceListReply>, Status> {
        let c = self.cluster().await?;
        let view = c.follower.view();
        let heard = Arc::clone(&c.gossip.subscribe().borrow());
        let local = Arc::clone(&c.gossip.local().borrow());
        let mut replicas = crate::services::replicas(&view, &heard, &local, c.membership.node_id);
        let services = view
            .services
            .values()
            .map(|s| pb::ServiceInfo {
                service: Some(s.into()),
                replicas: replicas
                    .remove(&s.name)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| pb::Replica {
                        name: r.name,
                        ip: r.ip.to_string(),
                        node_id: r.node,
                        node_name: view.nodes.get(&r.node).map(|n| n.name.clone()).unwrap_or_default(),
                        health: r.health.as_str().to_owned(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ServiceListReply { services }))
    }
}
