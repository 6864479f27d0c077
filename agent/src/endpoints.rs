//! This host's endpoints (containers attached to its networks): the store in the state dir
//! that survives restarts, the cluster's `attach` and `detach` (address from the host's own
//! block, plumbing by `attach`, the change gossiped), and how others see them.
//!
//! An attach is all or nothing, across an error or a crash at any step: its intent is on disk
//! before anything is plumbed, the endpoint is committed once the plumbing is done, and any
//! error undoes both ([`attach_all_or_nothing`]). At start, [`recover`] rolls back an intent a
//! crash left, sets a corrupt store aside and rebuilds it from the veths, forgets endpoints
//! whose veth went with their container, and removes the veths no endpoint owns.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::cidr::Ipv4Cidr;
use control::gossip::Health;
use control::manager::HostApi;
use control::state::{ClusterView, NodeId};
use dataplane::MacAddr;
use proto as pb;
use tokio::sync::Mutex;

use crate::attach::{self, Netns};
use crate::cluster::{ClusterRuntime, ENDPOINTS_FILE};
use crate::dns::resolv_conf;
use crate::host::LocalNetwork;
use crate::{netdev, statefile};

mod store;
pub use self::store::{EndpointStore, LoadError, LocalEndpoint, Origin, Persist, Reservation};

/// The longest endpoint name or alias (a DNS label's limit).
const MAX_NAME_LEN: usize = 63;
/// The most aliases an endpoint has: what a gossip record carries.
const MAX_ALIASES: usize = control::gossip::record::MAX_ALIASES;

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("{what} {name:?}: 1 to {MAX_NAME_LEN} of a-z, A-Z, 0-9, '-', '_', '.'");
    }
    Ok(())
}

/// The address an attach asks for (`ip`, `mac`, both or neither), checked against this host's
/// block: a cluster network's MACs derive from addresses, so a MAC names an address too.
pub(crate) fn requested_address(ip: &str, mac: &str, block: Ipv4Cidr, gateway: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
    let ip: Option<Ipv4Addr> = match ip.split('/').next().unwrap_or_default() {
        "" => None,
        s => Some(s.parse().map_err(|_| anyhow::anyhow!("{ip:?} is not an IPv4 address"))?),
    };
    let from_mac = match mac {
        "" => None,
        m => {
            let mac: MacAddr = m.parse().map_err(|e| anyhow::anyhow!("{m:?} is not a MAC address: {e}"))?;
            let ip = mac.derived_ipv4().with_context(|| {
                format!("MAC {mac} is not one overlayd gives (02:4f followed by the IPv4 address): leave it out")
            })?;
            Some(ip)
        }
    };
    let ip = match (ip, from_mac) {
        (Some(a), Some(b)) if a != b => {
            bail!("the MAC asked for belongs to {b}, not to the address asked for {a}: give one or the other")
        }
        (a, b) => a.or(b),
    };
    if let Some(ip) = ip
        && (!block.contains(ip) || ip == block.addr() || block.nth(block.size() - 1) == Some(ip) || ip == gateway)
    {
        bail!(
            "{ip} is not an address this host gives: it must lie in this host's block {block} (not its first or last address, nor the gateway)"
        );
    }
    Ok(ip)
}

/// A replica's health as gossip carries it: what its checks found, or, before they found
/// anything, `Starting` when its service has a check and `Healthy` when it has none.
pub fn replica_health(view: &ClusterView, store: &EndpointStore, e: &LocalEndpoint) -> Health {
    let Some(service) = &e.service else { return Health::Healthy };
    if let Some(h) = store.health.get(&(e.network.clone(), e.ip)) {
        return *h;
    }
    match view.services.get(service) {
        Some(s) if s.health.is_some() => Health::Starting,
        _ => Health::Healthy,
    }
}

/// Attaches `ep` all or nothing: its intent is kept before `plumb` runs, and it is committed
/// once `plumb` succeeded. On an error at any step, `unplumb` undoes the plumbing and the
/// record goes; an intent left on disk by an error that also kept the disk from forgetting it
/// (or by a crash) is rolled back by [`recover`].
pub async fn attach_all_or_nothing<D, P, U, F>(
    store: &mut EndpointStore,
    disk: &D,
    ep: &LocalEndpoint,
    plumb: P,
    unplumb: U,
) -> Result<()>
where
    D: Persist + ?Sized,
    P: Future<Output = Result<()>>,
    U: FnOnce() -> F,
    F: Future<Output = Result<()>>,
{
    store.pending.push(ep.clone());
    if let Err(e) = disk.persist(store) {
        store.pending.retain(|p| p != ep);
        return Err(e.context("cannot record the attach, so nothing was attached"));
    }
    let forget_intent = |store: &mut EndpointStore| {
        store.pending.retain(|p| p != ep);
        if let Err(e) = disk.persist(store) {
            tracing::warn!(name = %ep.name, error = %format!("{e:#}"), "the attach's intent stays on disk; the next start rolls it back");
        }
    };
    if let Err(e) = plumb.await {
        undo(unplumb, ep).await;
        forget_intent(store);
        return Err(e);
    }
    store.pending.retain(|p| p != ep);
    store.endpoints.push(ep.clone());
    if let Err(e) = disk.persist(store) {
        store.endpoints.retain(|p| p != ep);
        undo(unplumb, ep).await;
        // The intent is what the disk holds: the next start rolls it back if it stays.
        return Err(e.context("cannot record the attach, so the container was detached again"));
    }
    Ok(())
}

async fn undo<U, F>(unplumb: U, ep: &LocalEndpoint)
where
    U: FnOnce() -> F,
    F: Future<Output = Result<()>>,
{
    if let Err(e) = unplumb().await {
        tracing::warn!(veth = %ep.host_ifname, error = %format!("{e:#}"), "could not undo an attach's plumbing; the next start removes the veth");
    }
}

/// What [`recover`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Recovery {
    /// Where the corrupt store was set aside.
    pub set_aside: Option<PathBuf>,
    /// Endpoints rebuilt from their veths.
    pub rebuilt: Vec<String>,
    /// Attaches a crash left half done, rolled back.
    pub rolled_back: Vec<String>,
    /// Endpoints whose veth is gone (their container went while the daemon was down).
    pub gone: Vec<String>,
    /// Veths no endpoint owns, removed, and why none does.
    pub removed: Vec<(String, String)>,
}

/// What to make of the store at start, given the endpoint veths (`ovl…`) the host has: the
/// store to run with (and which veths to remove). `rebuilt` holds the endpoints the veths
/// rebuild (or why one cannot be), for a store that was set aside.
pub fn reconcile_store(
    loaded: Option<EndpointStore>,
    veths: &[String],
    rebuilt: Vec<(String, Result<LocalEndpoint, String>)>,
) -> (EndpointStore, Recovery, Vec<String>) {
    let mut recovery = Recovery::default();
    let mut store = match loaded {
        Some(s) => s,
        None => {
            let mut s = EndpointStore::default();
            for (veth, r) in rebuilt {
                match r {
                    Ok(ep)
                        if s.endpoints
                            .iter()
                            .any(|e| e.network == ep.network && (e.ip == ep.ip || e.name == ep.name)) =>
                    {
                        recovery
                            .removed
                            .push((veth, format!("another endpoint of {:?} has its name or address", ep.network)));
                    }
                    Ok(ep) => {
                        recovery.rebuilt.push(ep.name.clone());
                        s.endpoints.push(ep);
                    }
                    Err(why) => recovery.removed.push((veth, why)),
                }
            }
            s
        }
    };
    let mut remove: Vec<String> = recovery.removed.iter().map(|(v, _)| v.clone()).collect();
    for ep in store.pending.drain(..) {
        recovery.rolled_back.push(ep.name.clone());
        if veths.contains(&ep.host_ifname) {
            remove.push(ep.host_ifname);
        }
    }
    store.endpoints.retain(|e| {
        let live = veths.contains(&e.host_ifname);
        if !live {
            recovery.gone.push(e.name.clone());
        }
        live
    });
    for v in veths {
        if !store.endpoints.iter().any(|e| &e.host_ifname == v) && !remove.contains(v) {
            recovery.removed.push((v.clone(), "no endpoint owns it".into()));
            remove.push(v.clone());
        }
    }
    (store, recovery, remove)
}

/// Loads the store at `path` and brings it and the host's veths in line (see the module doc).
pub async fn recover(nl: &rtnetlink::Handle, path: &Path) -> Result<EndpointStore> {
    let loaded = match EndpointStore::load(path) {
        Ok(s) => Some(s),
        Err(LoadError::Unreadable(e)) => return Err(e),
        Err(LoadError::Corrupt(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "the endpoint store is corrupt: setting it aside and rebuilding it from the veths");
            None
        }
    };
    let set_aside = match loaded {
        Some(_) => None,
        None => Some(set_aside(path)?),
    };
    let veths: Vec<netdev::Iface> =
        netdev::links(nl).await?.into_iter().filter(|l| l.veth && attach::is_endpoint_veth(&l.name)).collect();
    let mut rebuilt = Vec::new();
    if loaded.is_none() {
        for v in &veths {
            rebuilt.push((v.name.clone(), attach::inspect(v).await));
        }
    }
    let names: Vec<String> = veths.iter().map(|v| v.name.clone()).collect();
    let changed = loaded.as_ref().is_none_or(|l| !l.pending.is_empty());
    let (store, mut recovery, remove) = reconcile_store(loaded, &names, rebuilt);
    recovery.set_aside = set_aside;
    for veth in &remove {
        attach::unplumb(nl, veth).await?;
    }
    if let Some(p) = &recovery.set_aside {
        tracing::warn!(set_aside = %p.display(), rebuilt = ?recovery.rebuilt, "rebuilt the endpoint store from the veths");
    }
    for (veth, why) in &recovery.removed {
        tracing::warn!(%veth, %why, "removed a veth of overlayd's that no endpoint owns");
    }
    if !recovery.rolled_back.is_empty() {
        tracing::warn!(endpoints = ?recovery.rolled_back, "rolled back attaches a crash left half done");
    }
    if !recovery.gone.is_empty() {
        tracing::info!(endpoints = ?recovery.gone, "forgot endpoints whose veth went with their container");
    }
    if changed || !recovery.gone.is_empty() {
        // Not fatal: what is on disk is rolled back or rebuilt again at the next start.
        if let Err(e) = store.save(path) {
            tracing::warn!(error = %format!("{e:#}"), "could not save the recovered endpoint store");
        }
    }
    Ok(store)
}

/// Renames a corrupt store to `<name>.corrupt-<unix time>`, kept for a look.
pub(crate) fn set_aside(path: &Path) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{secs}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)
        .with_context(|| format!("cannot set the corrupt {} aside as {}", path.display(), aside.display()))?;
    statefile::sync_dir(path)?;
    Ok(aside)
}

/// The endpoints as the host API lists them (for a manager's `network inspect` of this host).
pub struct Lister {
    pub store: Arc<Mutex<EndpointStore>>,
    pub node: NodeId,
    pub name: String,
}

#[tonic::async_trait]
impl HostApi for Lister {
    async fn endpoints(&self, network: Option<&str>) -> Vec<pb::Endpoint> {
        // An attach or detach in progress holds the store for a moment: wait for it, rather
        // than answer that this host has no endpoints.
        let store = self.store.lock().await;
        store
            .endpoints
            .iter()
            .filter(|e| network.is_none_or(|n| n == e.network))
            .map(|e| to_pb(e, self.node, &self.name))
            .collect()
    }
}

/// An endpoint of this host as the API carries it.
/// `detach` found no endpoint of this host that matches.
#[derive(Debug)]
pub struct NothingToDetach;

impl std::fmt::Display for NothingToDetach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nothing to detach: no endpoint of this host matches (see overlayd network inspect)")
    }
}

impl std::error::Error for NothingToDetach {}

pub fn to_pb(e: &LocalEndpoint, node: NodeId, node_name: &str) -> pb::Endpoint {
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
        container_id: e.container_id.clone(),
        origin: e.origin.as_str().to_owned(),
        aliases: e.aliases.clone(),
        ifname: e.ifname.clone(),
        service: e.service.clone().unwrap_or_default(),
        cni_network: e.cni_network.clone(),
        ..Default::default()
    }
}

/// This host's endpoints as gossip carries them (those of networks the view knows), with
/// their aliases (the first [`MAX_ALIASES`]: an endpoint attached before the bound has all
/// its aliases here, and a record with more would be refused by every host).
pub fn gossiped(
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
                control::gossip::Endpoint {
                    mac: e.mac.0,
                    name: e.name.clone(),
                    aliases: e.aliases.iter().take(MAX_ALIASES).cloned().collect(),
                    service: e.service.clone(),
                    health: replica_health(view, store, e),
                },
            ))
        })
        .collect()
}

impl ClusterRuntime {
    /// `overlayd attach`, the CNI plugin's ADD and Docker's join: one path.
    pub async fn attach(&self, req: pb::AttachRequest) -> Result<pb::Endpoint> {
        let origin = Origin::parse(&req.origin)?;
        // Docker's sandbox gets its namespace only after the join (its runtime's hook binds it
        // there): Docker moves the veth in itself, so there is nothing to open yet.
        let ns = match origin {
            Origin::Docker => None,
            _ => Some(Netns::open(
                (!req.netns.is_empty()).then_some(req.netns.as_str()),
                (req.pid != 0).then_some(req.pid),
            )?),
        };
        let name = match &ns {
            _ if !req.name.is_empty() => req.name.clone(),
            Some(ns) => ns.default_name(),
            None => req.container_id.chars().take(12).collect(),
        };
        let ifname = if req.ifname.is_empty() { "eth0".to_owned() } else { req.ifname.clone() };
        check_name("the endpoint name", &name)?;
        for a in &req.aliases {
            check_name("the alias", a)?;
        }
        if req.aliases.len() > MAX_ALIASES {
            bail!("{} aliases: an endpoint has at most {MAX_ALIASES}", req.aliases.len());
        }
        let view = self.follower.view();
        let net = view
            .networks
            .get(&req.network)
            .with_context(|| format!("no network named {:?} (see overlayd network ls)", req.network))?
            .clone();
        if !req.service.is_empty() {
            match view.services.get(&req.service) {
                None => bail!("no service named {:?} (see overlayd service ls)", req.service),
                Some(s) if s.network != net.name => bail!(
                    "service {:?} is on network {:?}, not {:?}: attach its replicas to {:?}",
                    s.name,
                    s.network,
                    net.name,
                    s.network
                ),
                Some(_) => {}
            }
        }
        let leased_now = self.lease_block(&net.name).await?;
        let result = self.attach_in(&req, ns.as_ref(), name.clone(), ifname, origin, &net).await;
        if result.is_err() && leased_now {
            // A failed attach leaves nothing behind, not even the block it leased.
            self.release_unused_blocks([net.name.clone()].into()).await;
        }
        if result.is_ok() {
            let netns = {
                let store = self.endpoints.lock().await;
                let e = store.endpoints.iter().find(|e| e.network == net.name && e.name == name);
                e.map(|e| e.netns.clone()).filter(|n| !n.is_empty())
            };
            if let Some(netns) = netns
                && let Err(e) = self.program_vips_now(&netns, &net.name).await
            {
                // The balancing loop tries again; the endpoint itself is up.
                tracing::warn!(netns, error = %format!("{e:#}"), "cannot program the VIP load balancer yet");
            }
        }
        result
    }

    /// Leases this host's block of `network` unless it has one (one Raft write; then every
    /// attach is local). Whether it leased one now.
    pub(crate) async fn lease_block(&self, network: &str) -> Result<bool> {
        if self.follower.view().block(network, self.membership.node_id).is_some() {
            return Ok(false);
        }
        let mut c = self.manager_client().await?;
        c.lease_block(pb::LeaseBlockRequest { network: network.to_owned() })
            .await
            .map_err(|s| anyhow::anyhow!("cannot lease an address block: {}", s.message()))?;
        Ok(true)
    }

    async fn attach_in(
        &self,
        req: &pb::AttachRequest,
        ns: Option<&Netns>,
        name: String,
        ifname: String,
        origin: Origin,
        net: &control::state::Network,
    ) -> Result<pb::Endpoint> {
        let local = self.wait_network_up(&net.name).await?;
        let block = local.spec.gateway.map(|g| g.local_block).context("the network has no local block")?;
        let asked = requested_address(&req.ip, &req.mac, block, net.gateway)?;
        let mut store = self.endpoints.lock().await;
        if !req.container_id.is_empty()
            && let Some(e) = store
                .endpoints
                .iter()
                .find(|e| e.network == net.name && e.container_id == req.container_id && e.ifname == ifname)
        {
            return Err(AlreadyAttached(format!(
                "container {} is already attached to {:?} as {:?} ({})",
                &req.container_id[..req.container_id.len().min(12)],
                net.name,
                e.name,
                e.ip
            ))
            .into());
        }
        let ns_path = ns.map_or_else(|| req.netns.clone(), |ns| ns.path.to_string_lossy().into_owned());
        let ns_id = ns.map(|ns| ns.id);
        if let Some(e) = store
            .endpoints
            .iter()
            .find(|e| e.network == net.name && (e.name == name || ns_id.is_some_and(|id| e.netns_id == id)))
        {
            if e.name == name && ns_id.is_none_or(|id| e.netns_id != id) {
                return Err(AlreadyAttached(format!(
                    "another endpoint of {:?} on this host is named {name:?} ({}): give this one another name",
                    net.name, e.ip
                ))
                .into());
            }
            return Err(AlreadyAttached(format!(
                "{ns_path:?} is already attached to {:?} as {:?} ({}): detach it first",
                net.name, e.name, e.ip
            ))
            .into());
        }
        let ip = match asked {
            Some(ip) => {
                // Docker's join takes the address its IPAM reserved for it.
                let reserved_for_docker = origin == Origin::Docker
                    && store.reserved.iter().any(|r| r.network == net.name && r.ip == ip)
                    && !store.endpoints.iter().chain(&store.pending).any(|e| e.network == net.name && e.ip == ip);
                if let Some(holder) = store.holder(&net.name, ip).filter(|_| !reserved_for_docker) {
                    bail!("{ip} is in use by {holder} on {:?}", net.name);
                }
                ip
            }
            None => store
                .allocate(&net.name, block, net.gateway)
                .with_context(|| format!("every address of this host's block {block} is in use"))?,
        };
        let (host_ifname, _) = attach::veth_names(&net.name, attach::veth_key(&req.container_id, &name));
        let endpoint = LocalEndpoint {
            network: net.name.clone(),
            name,
            ip,
            prefix_len: net.subnet.prefix(),
            mac: MacAddr::from_ipv4(ip),
            host_ifname,
            netns: ns_path,
            netns_id: ns_id.unwrap_or_default(),
            ifname,
            container_id: req.container_id.clone(),
            origin,
            aliases: req.aliases.clone(),
            service: (!req.service.is_empty()).then(|| req.service.clone()),
            cni_network: if origin == Origin::Cni { req.cni_network.clone() } else { String::new() },
        };
        let nl = &self.host.nl;
        // The port's firewall and the dataplane's binding first: the container never sends unchecked.
        self.host.bind_endpoint(&endpoint).await?;
        let attached = attach_all_or_nothing(
            &mut store,
            self.state_dir.join(ENDPOINTS_FILE).as_path(),
            &endpoint,
            async {
                match ns {
                    Some(ns) => {
                        attach::plumb(nl, ns, &endpoint, &local.bridge, net.mtu, net.encrypted, net.gateway).await
                    }
                    // Docker moves the container's end itself and configures it.
                    None => {
                        attach::plumb_for_docker(nl, &endpoint, &local.bridge, net.mtu, net.encrypted).await.map(drop)
                    }
                }
            },
            || attach::unplumb(nl, &endpoint.host_ifname),
        )
        .await;
        if let Err(e) = attached {
            if let Err(u) = self.host.unbind_endpoint(&endpoint).await {
                tracing::warn!(error = %format!("{u:#}"), "could not unbind an endpoint that was not attached");
            }
            return Err(e);
        }
        self.gossip.publish_local(gossiped(&self.follower.view(), &store));
        if endpoint.origin == Origin::Attach {
            self.sync_resolv_conf(&store, &endpoint.netns);
        }
        tracing::info!(network = %endpoint.network, name = %endpoint.name, ip = %endpoint.ip, origin = endpoint.origin.as_str(), "attached");
        Ok(pb::Endpoint {
            gateway: net.gateway.to_string(),
            mtu: net.mtu,
            ..to_pb(&endpoint, self.membership.node_id, &self.membership.name)
        })
    }

    /// Gives the endpoint a runtime attached as `container_id` the name the runtime knows it
    /// by (Docker tells its driver no name: it is learned after the join).
    pub async fn rename(&self, container_id: &str, name: &str) -> Result<()> {
        check_name("the endpoint name", name)?;
        let mut store = self.endpoints.lock().await;
        let Some(i) = store.endpoints.iter().position(|e| e.container_id == container_id) else { return Ok(()) };
        let network = store.endpoints[i].network.clone();
        if store.endpoints[i].name == name || store.in_network(&network).any(|e| e.name == name) {
            return Ok(());
        }
        store.endpoints[i].name = name.to_owned();
        attach::retag(&self.host.nl, &store.endpoints[i]).await?;
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(gossiped(&self.follower.view(), &store));
        Ok(())
    }

    /// What Docker shows of a container once it runs: its namespace (`/proc/PID/ns/net`, for
    /// its VIPs), the service its label makes it a replica of (of its network), and its
    /// aliases on the network (those that are no name, or its own name, are left out).
    pub async fn learn_container(
        &self,
        container_id: &str,
        netns: Option<String>,
        service: Option<&str>,
        aliases: &[String],
    ) -> Result<()> {
        let view = self.follower.view();
        let mut store = self.endpoints.lock().await;
        let Some(i) = store.endpoints.iter().position(|e| e.container_id == container_id) else { return Ok(()) };
        if let Some(netns) = netns {
            store.endpoints[i].netns = netns;
        }
        let mut learned: Vec<String> = Vec::new();
        for a in aliases {
            if *a != store.endpoints[i].name && !learned.contains(a) && learned.len() < MAX_ALIASES {
                match check_name("the alias", a) {
                    Ok(()) => learned.push(a.clone()),
                    Err(e) => {
                        tracing::warn!(container = %store.endpoints[i].name, error = %e, "a Docker alias left out")
                    }
                }
            }
        }
        store.endpoints[i].aliases = learned;
        let network = store.endpoints[i].network.clone();
        let result = match service.map(|s| (s, view.services.get(s))) {
            None => Ok(()),
            Some((s, None)) => Err(anyhow::anyhow!("no service named {s:?} (see overlayd service ls)")),
            Some((s, Some(svc))) if svc.network != network => {
                Err(anyhow::anyhow!("service {s:?} is on network {:?}, not {network:?}", svc.network))
            }
            Some((s, Some(_))) => {
                store.endpoints[i].service = Some(s.to_owned());
                Ok(())
            }
        };
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(gossiped(&view, &store));
        result
    }

    /// This host's endpoints (of `network`, or all), for the local API.
    pub async fn local_endpoints(&self, network: &str) -> Vec<pb::Endpoint> {
        let view = self.follower.view();
        let store = self.endpoints.lock().await;
        store
            .endpoints
            .iter()
            .filter(|e| network.is_empty() || e.network == network)
            .map(|e| {
                let net = view.networks.get(&e.network);
                pb::Endpoint {
                    gateway: net.map(|n| n.gateway.to_string()).unwrap_or_default(),
                    mtu: net.map_or(0, |n| n.mtu),
                    ..to_pb(e, self.membership.node_id, &self.membership.name)
                }
            })
            .collect()
    }

    pub(crate) async fn wait_network_up(&self, name: &str) -> Result<LocalNetwork> {
        for _ in 0..100 {
            if let Some(n) = self.host.networks().await.remove(name) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("network {name:?} did not come up on this host within 10 s (is a manager reachable?)")
    }

    /// `overlayd detach`, the CNI plugin's DEL and Docker's leave.
    pub async fn detach(&self, req: pb::DetachRequest) -> Result<pb::DetachReply> {
        // A container's namespace may be gone already (CNI's DEL after the container exited):
        // only a namespace given to tell endpoints apart has to open.
        let ns_id = if req.netns.is_empty() && req.pid == 0 {
            None
        } else {
            match Netns::open((!req.netns.is_empty()).then_some(req.netns.as_str()), (req.pid != 0).then_some(req.pid))
            {
                Ok(ns) => Some(ns.id),
                Err(_) if req.missing_ok || !req.container_id.is_empty() => None,
                Err(e) => return Err(e),
            }
        };
        if req.name.is_empty() && ns_id.is_none() && req.container_id.is_empty() {
            if req.missing_ok {
                return Ok(pb::DetachReply::default());
            }
            bail!("say what to detach: --name NAME, --netns PATH or --pid PID");
        }
        let matches = |e: &LocalEndpoint| {
            (req.name.is_empty() || e.name == req.name)
                && ns_id.is_none_or(|id| e.netns_id == id)
                && (req.container_id.is_empty() || e.container_id == req.container_id)
                && (req.ifname.is_empty() || e.ifname == req.ifname)
                && (req.network.is_empty() || e.network == req.network)
        };
        let gone = self.forget(matches).await?;
        if gone.is_empty() && !req.missing_ok {
            return Err(NothingToDetach.into());
        }
        Ok(pb::DetachReply {
            detached: gone.iter().map(|e| to_pb(e, self.membership.node_id, &self.membership.name)).collect(),
        })
    }

    /// Removes the endpoints `matches` selects: their veths (gone already is fine), their
    /// bindings, their records; gossips the change and gives back the blocks no longer used.
    async fn forget(&self, matches: impl Fn(&LocalEndpoint) -> bool) -> Result<Vec<LocalEndpoint>> {
        let mut store = self.endpoints.lock().await;
        let (gone, keep): (Vec<_>, Vec<_>) = store.endpoints.drain(..).partition(|e| matches(e));
        store.endpoints = keep;
        if gone.is_empty() {
            return Ok(gone);
        }
        for e in &gone {
            attach::unplumb(&self.host.nl, &e.host_ifname).await?;
            self.host.unbind_endpoint(e).await?;
            tracing::info!(network = %e.network, name = %e.name, ip = %e.ip, "detached");
        }
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(gossiped(&self.follower.view(), &store));
        let namespaces: BTreeSet<&str> =
            gone.iter().filter(|e| e.origin == Origin::Attach).map(|e| e.netns.as_str()).collect();
        for netns in namespaces {
            self.sync_resolv_conf(&store, netns);
        }
        drop(store);
        self.release_unused_blocks(gone.iter().map(|e| e.network.clone()).collect()).await;
        Ok(gone)
    }

    /// Makes the resolv.conf of the namespace at `netns` (if `ip netns` names it) list the
    /// resolver of each network its `overlayd attach` endpoints are on, or removes it when
    /// it has none left (see [`resolv_conf`]). Not fatal: the container's network works
    /// without it, and the next change or start tries again.
    pub(crate) fn sync_resolv_conf(&self, store: &EndpointStore, netns: &str) {
        let Some(name) = resolv_conf::netns_name(netns) else { return };
        let view = self.follower.view();
        let mut servers = Vec::new();
        for e in store
            .endpoints
            .iter()
            .filter(|e| e.origin == Origin::Attach && resolv_conf::netns_name(&e.netns) == Some(name))
        {
            if let Some(n) = view.networks.get(&e.network)
                && !servers.contains(&n.gateway)
            {
                servers.push(n.gateway);
            }
        }
        match resolv_conf::sync(Path::new(resolv_conf::NETNS_ETC), name, &self.state_dir, &servers) {
            Ok(resolv_conf::Synced::Written(p)) => {
                tracing::info!(file = %p.display(), nameservers = ?servers, "wrote the namespace's resolv.conf")
            }
            Ok(resolv_conf::Synced::Removed(p)) => {
                tracing::info!(file = %p.display(), "removed the namespace's resolv.conf")
            }
            Ok(resolv_conf::Synced::NotOurs(p)) => tracing::warn!(
                file = %p.display(), nameservers = ?servers,
                "the namespace has a resolv.conf overlayd did not write: left alone (its containers resolve overlay names only if it lists these nameservers)"
            ),
            Ok(resolv_conf::Synced::Unchanged) => {}
            Err(e) => {
                tracing::warn!(netns = %name, error = %e, "cannot write the namespace's resolv.conf: its containers do not resolve overlay names")
            }
        }
    }

    /// At start, once the view is known: the resolv.conf of every namespace attached here is
    /// written again (a network's gateway is in the view), and those this daemon wrote for
    /// namespaces that went while it was down are removed.
    pub async fn resync_resolv_confs(self: Arc<Self>) {
        let mut views = self.follower.subscribe();
        if views.wait_for(|v| v.revision > 0).await.is_err() {
            return;
        }
        let store = self.endpoints.lock().await;
        let mut attached: BTreeSet<String> = BTreeSet::new();
        for e in store.endpoints.iter().filter(|e| e.origin == Origin::Attach) {
            if let Some(name) = resolv_conf::netns_name(&e.netns)
                && attached.insert(name.to_owned())
            {
                self.sync_resolv_conf(&store, &e.netns);
            }
        }
        for name in resolv_conf::written(Path::new(resolv_conf::NETNS_ETC), &self.state_dir) {
            if !attached.contains(&name) {
                self.sync_resolv_conf(&store, &format!("/run/netns/{name}"));
            }
        }
    }

    /// Gives back this host's block in each of `networks` that it no longer uses (so that the
    /// network can be removed), unless a service publishes a port there (every host is then
    /// in the network's routing mesh).
    pub(crate) async fn release_unused_blocks(&self, networks: BTreeSet<String>) {
        let meshed = control::service::published_networks(self.follower.view().services.values());
        let store = self.endpoints.lock().await;
        let unused: Vec<String> = networks.into_iter().filter(|n| !store.uses(n) && !meshed.contains(n)).collect();
        drop(store);
        for network in unused {
            if let Ok(mut c) = self.manager_client().await
                && let Err(s) = c.release_block(pb::ReleaseBlockRequest { network: network.clone() }).await
            {
                tracing::warn!(%network, error = %s.message(), "could not give the block back");
            }
        }
    }

    /// Withdraws the endpoints whose veth went (its container's namespace is gone: the container
    /// stopped, was removed, or its last process exited). Returns how many.
    pub async fn withdraw_gone(&self, deleted: &BTreeSet<String>) -> Result<usize> {
        let gone = self.forget(|e| deleted.contains(&e.host_ifname)).await?;
        for e in &gone {
            tracing::info!(network = %e.network, name = %e.name, ip = %e.ip, "withdrew an endpoint whose container is gone");
        }
        Ok(gone.len())
    }

    /// Sorts the endpoints whose process exited or whose namespace's name went, (veth,
    /// namespace), into `gone` (nothing holds their namespace any more: their containers are
    /// gone) and `lingering` (something still does: looked at again by the sweep).
    async fn unheld(
        &self,
        exited: Vec<(String, (u64, u64))>,
        lingering: &mut BTreeSet<(String, (u64, u64))>,
        gone: &mut BTreeSet<String>,
    ) {
        if exited.is_empty() {
            return;
        }
        let held = tokio::task::spawn_blocking(move || {
            exited.into_iter().map(|e| (attach::namespace_held(e.1), e)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (held, e) in held {
            if held {
                lingering.insert(e);
            } else {
                lingering.remove(&e);
                gone.insert(e.0);
            }
        }
    }

    /// Follows the containers: an endpoint goes as soon as the kernel deletes its veth (which
    /// it does with the namespace of a container that is gone), or, for one of `attach`, as
    /// soon as its process exits (`--pid`) or its namespace's name goes (`--netns`) and nothing
    /// else holds the namespace (the kernel tears a namespace down when it gets to it, seconds
    /// later on a busy host); a sweep every few seconds catches what a notification missed.
    pub async fn follow_containers(self: std::sync::Arc<Self>) {
        use futures::StreamExt as _;
        let mut deletions = match netdev::link_deletions() {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no link notifications: containers that go are found by the sweep only");
                None
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        // The `attach` endpoints, by their veth, whose process is waited on (`--pid`) or whose
        // namespace's name went (`--netns`): a namespace that outlives that is left to its veth.
        let mut watched: BTreeSet<String> = BTreeSet::new();
        let mut lingering: BTreeSet<(String, (u64, u64))> = BTreeSet::new();
        let mut exits = futures::stream::FuturesUnordered::new();
        let mut watch = tokio::time::interval(WATCH_PROCESSES_EVERY);
        loop {
            let mut deleted = BTreeSet::new();
            tokio::select! {
                _ = watch.tick() => {
                    let attached: Vec<(String, String, (u64, u64))> = self.endpoints.lock().await.endpoints.iter()
                        .filter(|e| e.origin == Origin::Attach && e.netns_id != (0, 0))
                        .map(|e| (e.host_ifname.clone(), e.netns.clone(), e.netns_id))
                        .collect();
                    watched.retain(|w| attached.iter().any(|(ifname, ..)| ifname == w));
                    lingering.retain(|(w, _)| watched.contains(w));
                    let mut exited = Vec::new();
                    for (ifname, netns, id) in attached {
                        if watched.contains(&ifname) {
                            continue;
                        }
                        let Some(pid) = attach::attached_pid(&netns) else {
                            // Attached by path: its name going (`ip netns delete`) is its exit.
                            if !attach::still_at(&netns, id) {
                                watched.insert(ifname.clone());
                                exited.push((ifname, id));
                            }
                            continue;
                        };
                        watched.insert(ifname.clone());
                        match attach::process_exit(pid, id) {
                            Ok(exit) => exits.push(Box::pin(async move {
                                exit.await;
                                (ifname, id)
                            }) as std::pin::Pin<Box<dyn Future<Output = _> + Send>>),
                            Err(_) => exited.push((ifname, id)),
                        }
                    }
                    self.unheld(exited, &mut lingering, &mut deleted).await;
                }
                Some(exit) = exits.next() => {
                    self.unheld(vec![exit], &mut lingering, &mut deleted).await;
                }
                Some(name) = async { deletions.as_mut()?.recv().await } => {
                    if !attach::is_endpoint_veth(&name) {
                        continue;
                    }
                    deleted.insert(name);
                    // A container with several endpoints takes them all at once.
                    while let Some(more) = deletions.as_mut().and_then(|d| d.try_recv().ok()) {
                        deleted.insert(more);
                    }
                }
                _ = sweep.tick() => {
                    self.unheld(lingering.iter().cloned().collect(), &mut lingering, &mut deleted).await;
                    let names: Vec<String> = self.endpoints.lock().await.endpoints.iter().map(|e| e.host_ifname.clone()).collect();
                    for n in names {
                        if matches!(netdev::link_exists(&self.host.nl, &n).await, Ok(false)) {
                            deleted.insert(n);
                        }
                    }
                }
            }
            if deleted.is_empty() {
                continue;
            }
            if let Err(e) = self.withdraw_gone(&deleted).await {
                tracing::warn!(error = %format!("{e:#}"), "could not withdraw the endpoints of containers that went");
            }
        }
    }
}

/// How often the endpoints' veths are checked, besides the kernel's notifications.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often `attach` endpoints' namespace names are checked, and how soon a new `--pid`
/// endpoint's process is watched (an exit before then is seen when it is).
const WATCH_PROCESSES_EVERY: Duration = Duration::from_secs(1);

/// An attach refused because the container (or namespace, or name) is attached already.
#[derive(Debug)]
pub struct AlreadyAttached(pub String);

impl std::fmt::Display for AlreadyAttached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AlreadyAttached {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(network: &str, ip: [u8; 4]) -> LocalEndpoint {
        LocalEndpoint {
            network: network.into(),
            name: format!("{ip:?}"),
            ip: ip.into(),
            prefix_len: 16,
            mac: MacAddr::from_ipv4(ip.into()),
            host_ifname: String::new(),
            netns: String::new(),
            netns_id: (0, 0),
            ifname: "eth0".into(),
            container_id: String::new(),
            origin: Origin::Attach,
            aliases: Vec::new(),
            service: None,
            cni_network: String::new(),
        }
    }

    /// A disk that keeps what it is given as JSON, and fails the saves it is told to.
    #[derive(Default)]
    struct Disk {
        kept: std::cell::RefCell<Option<EndpointStore>>,
        saves: std::cell::Cell<usize>,
        fail: Vec<usize>,
    }

    impl Persist for Disk {
        fn persist(&self, store: &EndpointStore) -> Result<()> {
            let n = self.saves.get() + 1;
            self.saves.set(n);
            if self.fail.contains(&n) {
                bail!("No space left on device (os error 28)");
            }
            let json = serde_json::to_vec(store)?;
            *self.kept.borrow_mut() = Some(serde_json::from_slice(&json)?);
            Ok(())
        }
    }

    impl Disk {
        fn kept(&self) -> (Vec<String>, Vec<String>) {
            let kept = self.kept.borrow();
            let names = |v: &Vec<LocalEndpoint>| v.iter().map(|e| e.name.clone()).collect();
            kept.as_ref().map_or((vec![], vec![]), |s| (names(&s.endpoints), names(&s.pending)))
        }
    }

    /// The error, the endpoints in memory, (endpoints, intents) on disk, plumbings, unplumbings.
    type Outcome = (Option<String>, Vec<String>, (Vec<String>, Vec<String>), usize, usize);

    /// One attach of `c2` to a store holding `c1`, with saves `fail` failing and the plumbing
    /// failing or not: the error if any, what the store then holds, what the disk holds, and
    /// how often plumbing and unplumbing ran.
    fn run(fail: &[usize], plumb_ok: bool) -> Outcome {
        let mut disk = Disk::default();
        let mut store = EndpointStore::default();
        store.endpoints.push(ep("a", [10, 128, 0, 2]));
        store.endpoints[0].name = "c1".into();
        disk.persist(&store).unwrap();
        disk.saves.set(0);
        disk.fail = fail.to_vec();
        let mut c2 = ep("a", [10, 128, 0, 3]);
        c2.name = "c2".into();
        let (plumbed, unplumbed) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let r = futures::executor::block_on(attach_all_or_nothing(
            &mut store,
            &disk,
            &c2,
            async {
                plumbed.set(plumbed.get() + 1);
                if plumb_ok { Ok(()) } else { bail!("cannot create the veth") }
            },
            || async {
                unplumbed.set(unplumbed.get() + 1);
                Ok(())
            },
        ));
        let names = store.endpoints.iter().map(|e| e.name.clone()).collect();
        assert!(store.pending.is_empty(), "no intent stays in memory");
        (r.err().map(|e| format!("{e:#}")), names, disk.kept(), plumbed.get(), unplumbed.get())
    }

    #[test]
    fn an_attach_is_all_or_nothing_whichever_step_fails() {
        let c1 = || vec!["c1".to_owned()];
        let both = || vec!["c1".to_owned(), "c2".to_owned()];
        // Everything works: committed in memory and on disk.
        assert_eq!(run(&[], true), (None, both(), (both(), vec![]), 1, 0));
        // The intent cannot be written (a full disk): nothing is plumbed.
        let (e, mem, disk, plumbed, _) = run(&[1], true);
        assert!(e.unwrap().contains("nothing was attached"));
        assert_eq!((mem, disk, plumbed), (c1(), (c1(), vec![]), 0));
        // The plumbing fails: undone, the intent forgotten.
        let (e, mem, disk, _, unplumbed) = run(&[], false);
        assert!(e.unwrap().contains("cannot create the veth"));
        assert_eq!((mem, disk, unplumbed), (c1(), (c1(), vec![]), 1));
        // ... and the disk cannot forget the intent either: it stays for the next start.
        let (_, mem, disk, _, _) = run(&[2], false);
        assert_eq!((mem, disk), (c1(), (c1(), vec!["c2".to_owned()])));
        // The commit cannot be written: the plumbing is undone; the disk holds the intent.
        let (e, mem, disk, plumbed, unplumbed) = run(&[2], true);
        assert!(e.unwrap().contains("detached again"));
        assert_eq!((mem, disk, plumbed, unplumbed), (c1(), (c1(), vec!["c2".to_owned()]), 1, 1));
    }

    fn named(name: &str, veth: &str) -> LocalEndpoint {
        LocalEndpoint { name: name.into(), host_ifname: veth.into(), ..ep("a", [10, 128, 0, 9]) }
    }

    #[test]
    fn at_start_intents_roll_back_gone_endpoints_are_forgotten_and_orphan_veths_go() {
        let veths: Vec<String> = ["ovl1", "ovl2", "ovl3"].map(String::from).to_vec();
        let mut loaded = EndpointStore::default();
        loaded.endpoints.push(named("kept", "ovl1"));
        loaded.endpoints.push(named("gone", "ovl9"));
        loaded.pending.push(named("half", "ovl2"));
        let (store, r, remove) = reconcile_store(Some(loaded), &veths, Vec::new());
        assert_eq!(store.endpoints, [named("kept", "ovl1")]);
        assert!(store.pending.is_empty());
        assert_eq!((r.rolled_back, r.gone), (vec!["half".to_owned()], vec!["gone".to_owned()]));
        assert_eq!(r.removed, [("ovl3".to_owned(), "no endpoint owns it".to_owned())]);
        assert_eq!(remove, ["ovl2", "ovl3"]);
    }

    #[test]
    fn a_store_set_aside_is_rebuilt_from_what_the_veths_say() {
        let veths: Vec<String> = ["ovl1", "ovl2", "ovl3"].map(String::from).to_vec();
        let mut twin = named("twin", "ovl3");
        twin.ip = named("x", "").ip;
        let rebuilt = vec![
            ("ovl1".to_owned(), Ok(named("c1", "ovl1"))),
            ("ovl2".to_owned(), Err("the container's network namespace is gone".to_owned())),
            ("ovl3".to_owned(), Ok(twin)),
        ];
        let (store, r, remove) = reconcile_store(None, &veths, rebuilt);
        assert_eq!(store.endpoints, [named("c1", "ovl1")]);
        assert_eq!(r.rebuilt, ["c1"]);
        assert_eq!(r.removed.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(), ["ovl2", "ovl3"]);
        assert!(r.removed[1].1.contains("address"), "{:?}", r.removed);
        assert_eq!(remove, ["ovl2", "ovl3"]);
    }

    #[test]
    fn gossip_carries_the_aliases_of_endpoints_of_known_networks_within_the_bound() {
        let mut view = ClusterView::default();
        let net = |name: &str, vni| control::state::Network {
            encrypted: false,
            key_epoch: 0,
            key_made_at: 0,
            name: name.into(),
            vni,
            subnet: "10.128.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 128, 0, 1),
            mtu: 1450,
            block_prefix: 24,
            created_at: 0,
            internal: false,
        };
        view.networks.insert("a".into(), net("a", 4096));
        let mut s = EndpointStore::default();
        let mut web = ep("a", [10, 128, 0, 2]);
        web.aliases = (0..MAX_ALIASES + 3).map(|i| format!("alias{i}")).collect();
        s.endpoints.push(web.clone());
        s.endpoints.push(ep("unknown", [10, 129, 0, 2]));
        let g = gossiped(&view, &s);
        assert_eq!(g.len(), 1, "an endpoint of a network the view does not know is not gossiped");
        let (k, e) = &g[0];
        assert_eq!((k.vni, k.ip, e.mac, e.name.as_str()), (4096, web.ip, web.mac.0, web.name.as_str()));
        assert_eq!(e.aliases, web.aliases[..MAX_ALIASES], "the first aliases, as many as a record carries");
        assert!(e.within_bounds());
    }

    #[test]
    fn a_store_file_without_intents_reads_as_before() {
        let old = br#"{"endpoints": []}"#;
        assert_eq!(serde_json::from_slice::<EndpointStore>(old).unwrap(), EndpointStore::default());
        assert_eq!(serde_json::to_string(&EndpointStore::default()).unwrap(), r#"{"endpoints":[]}"#);
    }

    #[test]
    fn an_endpoint_record_of_an_older_overlayd_loads_without_a_cni_configuration() {
        let mine =
            LocalEndpoint { origin: Origin::Cni, cni_network: "web-replicas".into(), ..ep("web", [10, 128, 0, 2]) };
        let mut json = serde_json::to_value(&mine).unwrap();
        assert_eq!(serde_json::from_value::<LocalEndpoint>(json.clone()).unwrap(), mine);
        json.as_object_mut().unwrap().remove("cni_network");
        let old: LocalEndpoint = serde_json::from_value(json).unwrap();
        assert_eq!(old, LocalEndpoint { cni_network: String::new(), ..mine });
    }

    #[test]
    fn allocation_skips_the_edges_the_gateway_and_what_is_taken_and_reuses_freed_addresses() {
        let block: Ipv4Cidr = "10.128.0.0/24".parse().unwrap();
        let gw = Ipv4Addr::new(10, 128, 0, 1);
        let mut s = EndpointStore::default();
        assert_eq!(s.allocate("a", block, gw), Some(Ipv4Addr::new(10, 128, 0, 2)), "not .0, not the gateway");
        s.endpoints.push(ep("a", [10, 128, 0, 2]));
        s.endpoints.push(ep("a", [10, 128, 0, 3]));
        s.endpoints.push(ep("b", [10, 128, 0, 4]));
        assert_eq!(
            s.allocate("a", block, gw),
            Some(Ipv4Addr::new(10, 128, 0, 4)),
            "another network's address does not count"
        );
        s.endpoints.remove(0);
        assert_eq!(s.allocate("a", block, gw), Some(Ipv4Addr::new(10, 128, 0, 2)), "a freed address is reused");
        let tiny: Ipv4Cidr = "10.0.0.0/30".parse().unwrap();
        let mut t = EndpointStore::default();
        t.endpoints.push(ep("a", [10, 0, 0, 1]));
        assert_eq!(t.allocate("a", tiny, gw), Some(Ipv4Addr::new(10, 0, 0, 2)));
        t.endpoints.push(ep("a", [10, 0, 0, 2]));
        assert_eq!(t.allocate("a", tiny, gw), None, "full");
    }
}
