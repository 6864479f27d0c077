//! The shell of the VIP load balancer: keeps [`super::lb`]'s table in the network namespace of
//! every container of this host whose network has a service in `vip` mode, equal to what the
//! cluster says (the services of the state, their healthy replicas from gossip), and resets a
//! client's connections to a replica that left the set (died, turned unhealthy, was detached)
//! at once.
//!
//! A container on no network with a VIP service gets no table; one whose network's last VIP
//! service went has its table removed. Docker's containers are not balanced yet: the agent
//! does not know their namespaces (Docker sets them up itself).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use control::service::{Protocol, ServiceMode};
use control::state::ClusterView;

use super::lb::{self, Proto, ServicePort, VipService};
use super::{Replica, healthy};
use crate::cluster::ClusterRuntime;

/// What was last applied in one namespace: the script, and each VIP's backends.
#[derive(Debug, Default)]
struct Applied {
    script: String,
    backends: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    /// Whether the connections to replicas that are not backends any more (ones that went
    /// while the agent was down) were reset: once, [`SETTLE`] after the agent started.
    done: bool,
}

/// How long after a start the agent waits before it takes the replicas it knows for all there
/// are: gossip brings every host's table within a few rounds.
const SETTLE: Duration = Duration::from_secs(10);

/// Every VIP service of each network, with its healthy replicas as backends.
pub fn vip_services(view: &ClusterView, replicas: &BTreeMap<String, Vec<Replica>>) -> HashMap<String, Vec<VipService>> {
    let mut out: HashMap<String, Vec<VipService>> = HashMap::new();
    for svc in view.services.values() {
        let (ServiceMode::Vip, Some(vip)) = (svc.mode, svc.vip) else { continue };
        let ports = svc
            .ports
            .iter()
            .map(|p| ServicePort {
                port: p.port,
                proto: match p.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                },
            })
            .collect();
        let backends = replicas.get(&svc.name).map(|r| healthy(r)).unwrap_or_default();
        out.entry(svc.network.clone()).or_default().push(VipService { name: svc.name.clone(), vip, ports, backends });
    }
    out
}

impl ClusterRuntime {
    /// Programs the load-balancer table of one newly attached container's namespace `netns` at
    /// once, so that the attach answers only when its first connection to a VIP of `network`
    /// finds the table ([`ClusterRuntime::balance_vips`] keeps it in line afterwards; left to
    /// that loop alone, a client that connected right after its attach could find none).
    pub(crate) async fn program_vips_now(&self, netns: &str, network: &str) -> anyhow::Result<()> {
        let view = self.follower.view();
        let heard = Arc::clone(&self.gossip.subscribe().borrow());
        let local = Arc::clone(&self.gossip.local().borrow());
        let replicas = super::replicas(&view, &heard, &local, self.membership.node_id);
        match vip_services(&view, &replicas).get(network) {
            Some(services) => lb::apply(std::path::Path::new(netns), &lb::script(services)).await,
            None => Ok(()),
        }
    }

    /// Keeps every local container's load-balancer table in line, for as long as the runtime
    /// lives.
    pub async fn balance_vips(self: Arc<Self>) {
        let mut views = self.follower.subscribe();
        let mut heard = self.gossip.subscribe();
        let mut local = self.gossip.local();
        let mut applied: HashMap<PathBuf, Applied> = HashMap::new();
        let started = std::time::Instant::now();
        loop {
            let view = self.follower.view();
            let replicas = {
                let h = Arc::clone(&heard.borrow_and_update());
                let l = Arc::clone(&local.borrow_and_update());
                super::replicas(&view, &h, &l, self.membership.node_id)
            };
            let by_network = vip_services(&view, &replicas);
            let mut wanted: HashMap<PathBuf, Vec<VipService>> = HashMap::new();
            {
                let store = self.endpoints.lock().await;
                for e in store.endpoints.iter().filter(|e| !e.netns.is_empty()) {
                    if let Some(services) = by_network.get(&e.network) {
                        wanted.entry(PathBuf::from(&e.netns)).or_default().extend(services.iter().cloned());
                    }
                }
            }
            let settled = started.elapsed() >= SETTLE;
            for (netns, services) in &wanted {
                let script = lb::script(services);
                let before = applied.entry(netns.clone()).or_default();
                let now: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> =
                    services.iter().map(|s| (s.vip, s.backends.clone())).collect();
                if before.script != script {
                    if let Err(e) = lb::apply(netns, &script).await {
                        tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot program the VIP load balancer");
                        continue;
                    }
                    for (vip, old) in &before.backends {
                        let kept = now.get(vip).map(Vec::as_slice).unwrap_or_default();
                        let gone: Vec<Ipv4Addr> = old.iter().copied().filter(|b| !kept.contains(b)).collect();
                        if gone.is_empty() {
                            continue;
                        }
                        match lb::reset(netns, *vip, &gone).await {
                            Ok(n) if n > 0 => {
                                tracing::info!(netns = %netns.display(), %vip, ?gone, connections = n, "reset connections to replicas that left")
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot reset connections")
                            }
                        }
                    }
                    before.script = script;
                    before.backends = now.clone();
                }
                // Once gossip has had time to bring every host's replicas after a start, the
                // connections to replicas that went while the agent was down are reset.
                if !before.done && settled {
                    before.done = true;
                    for (vip, kept) in &now {
                        match lb::reset_except(netns, *vip, kept).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(netns = %netns.display(), %vip, connections = n, "reset connections to replicas that went while the agent was down")
                            }
                            Err(e) => {
                                tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot reset connections")
                            }
                        }
                    }
                }
            }
            let stale: Vec<PathBuf> = applied.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
            for netns in stale {
                let Some(gone) = applied.remove(&netns) else { continue };
                // The namespace may be gone with its container: nothing to remove then.
                if netns.exists() {
                    // Without the table its open connections through a VIP would hang.
                    for vip in gone.backends.keys() {
                        let _ = lb::reset_except(&netns, *vip, &[]).await;
                    }
                    if let Err(e) = lb::remove(&netns).await {
                        tracing::warn!(netns = %netns.display(), error = %format!("{e:#}"), "cannot remove the VIP load balancer");
                    }
                }
            }
            tokio::select! {
                r = views.changed() => if r.is_err() { break },
                r = heard.changed() => if r.is_err() { break },
                r = local.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
