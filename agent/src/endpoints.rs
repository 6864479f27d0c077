//! This host's endpoints (containers attached to its networks): the store in the state dir
//! that survives restarts, the cluster's `attach` and `detach` (address from the host's own
//! block, plumbing by `attach`, the change gossiped), and how others see them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use control::cidr::Ipv4Cidr;
use control::manager::HostApi;
use control::state::{ClusterView, NodeId};
use dataplane::MacAddr;
use proto as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::attach::{self, Netns};
use crate::cluster::{ClusterRuntime, ENDPOINTS_FILE};
use crate::host::LocalNetwork;

/// One container attached to one network on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub network: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The network's prefix length (the container sees the whole subnet on-link).
    pub prefix_len: u8,
    pub mac: MacAddr,
    /// The veth end on the bridge.
    pub host_ifname: String,
    /// The container's namespace as given (path).
    pub netns: String,
    /// The namespace's identity (device, inode), to recognise it under another path.
    pub netns_id: (u64, u64),
    /// The interface inside the namespace.
    pub ifname: String,
}

/// The endpoints of this host, persisted in the state dir.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EndpointStore {
    pub endpoints: Vec<LocalEndpoint>,
}

impl EndpointStore {
    /// Loads the store (empty if the file does not exist).
    pub fn load(path: &Path) -> Result<EndpointStore> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EndpointStore::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Saves it (atomically: written aside, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The lowest free address of `block` for `network`: not the block's first or last
    /// address, not the gateway, not held by an endpoint.
    pub fn allocate(&self, network: &str, block: Ipv4Cidr, gateway: Ipv4Addr) -> Option<Ipv4Addr> {
        let taken = |ip: Ipv4Addr| ip == gateway || self.endpoints.iter().any(|e| e.network == network && e.ip == ip);
        (1..block.size().saturating_sub(1)).filter_map(|n| block.nth(n)).find(|ip| !taken(*ip))
    }

    /// Endpoints of one network.
    pub fn in_network<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a LocalEndpoint> + 'a {
        self.endpoints.iter().filter(move |e| e.network == network)
    }
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
    }
}

/// This host's endpoints as gossip carries them (those of networks the view knows).
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
                control::gossip::Endpoint { mac: e.mac.0, name: e.name.clone() },
            ))
        })
        .collect()
}

impl ClusterRuntime {
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
        let endpoint = LocalEndpoint {
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
        // The port's firewall and the dataplane's binding first: the container never sends unchecked.
        self.host.bind_endpoint(&endpoint).await?;
        if let Err(e) = attach::plumb(&self.host.nl, &ns, &endpoint, &local.bridge, net.mtu, net.gateway).await {
            if let Err(u) = self.host.unbind_endpoint(&endpoint).await {
                tracing::warn!(error = %format!("{u:#}"), "could not unbind an endpoint that was not attached");
            }
            return Err(e);
        }
        store.endpoints.push(endpoint.clone());
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(gossiped(&self.follower.view(), &store));
        tracing::info!(network = %endpoint.network, name = %endpoint.name, ip = %endpoint.ip, "attached");
        Ok(to_pb(&endpoint, me, &self.membership.name))
    }

    async fn wait_network_up(&self, name: &str) -> Result<LocalNetwork> {
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
        let matches = |e: &LocalEndpoint| {
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
            self.host.unbind_endpoint(e).await?;
            tracing::info!(network = %e.network, name = %e.name, ip = %e.ip, "detached");
        }
        store.save(&self.state_dir.join(ENDPOINTS_FILE))?;
        self.gossip.publish_local(gossiped(&self.follower.view(), &store));
        // A network this host no longer uses gives its block back (so it can be removed).
        let emptied: BTreeSet<String> =
            gone.iter().map(|e| e.network.clone()).filter(|n| store.in_network(n).next().is_none()).collect();
        drop(store);
        for network in emptied {
            if let Ok(mut c) = self.manager_client().await {
                if let Err(s) = c.release_block(pb::ReleaseBlockRequest { network: network.clone() }).await {
                    tracing::warn!(%network, error = %s.message(), "could not give the block back");
                }
            }
        }
        Ok(pb::DetachReply {
            detached: gone.iter().map(|e| to_pb(e, self.membership.node_id, &self.membership.name)).collect(),
        })
    }
}

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
        }
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
