//! The driver's calls: decoding Docker's requests, answering them from the cluster runtime,
//! and the little it must remember itself (`docker.json` in the state dir: which Docker network
//! is which subnet, which endpoint has which address, which overlayd networks it put into
//! Docker). Addresses themselves are reserved in the endpoint store, with the endpoints.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use control::cidr::Ipv4Cidr;
use control::state::Network;
use dataplane::MacAddr;
use proto as pb;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::engine::Engine;
use super::wire::{
    CreateEndpoint, CreateNetwork, DockerEndpoint, DockerNetwork, DriverStore, EndpointOnly, Join, ReleaseAddress,
    Request, RequestAddress, RequestPool, error, wants_encryption,
};
use crate::attach;
use crate::cluster::{ClusterRuntime, ENDPOINTS_FILE};
use crate::daemon::{Daemon, Mode};
use crate::endpoints::{self, Reservation};
use crate::statefile;

/// The driver's own file in the state dir.
const STORE_FILE: &str = "docker.json";
/// The address space this IPAM driver names (one: the cluster's plan).
const ADDRESS_SPACE: &str = "overlayd";
/// How Docker marks the gateway's `RequestAddress`.
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
/// How long a call waits for the state it needs (a network Docker just made, a block just
/// leased) to reach this host.
const SETTLE: Duration = Duration::from_secs(10);
/// How often the cluster's networks are compared with Docker's.
const MIRROR_EVERY: Duration = Duration::from_secs(3);
/// The container label that makes a Docker container a replica of a service (`docker run
/// --label io.overlayd.service=web --network front …`).
pub const SERVICE_LABEL: &str = "io.overlayd.service";

/// The driver: Docker's calls in, the cluster runtime's answers out.
pub struct Driver {
    /// Its name: the plugin's and the network driver's (`docker network create -d NAME`).
    name: String,
    engine: Engine,
    daemon: Arc<Daemon>,
    store: Mutex<DriverStore>,
    path: PathBuf,
}

impl Driver {
    /// The driver named `name`, asking the Docker daemon at `docker_host` for names.
    pub fn new(name: &str, docker_host: &str, daemon: Arc<Daemon>) -> Result<Driver> {
        let path = daemon.ctx.state_dir.join(STORE_FILE);
        let store = match std::fs::read(&path) {
            Ok(b) => match DriverStore::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    let aside = endpoints::set_aside(&path)?;
                    tracing::warn!(error = %e, aside = %aside.display(), "the Docker driver's file is corrupt: set aside; networks Docker made before must be made again");
                    DriverStore::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DriverStore::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(Driver { name: name.to_owned(), engine: Engine::new(docker_host)?, daemon, store: Mutex::new(store), path })
    }

    /// Answers one call (`Interface.Method`) with an HTTP status and a JSON body.
    pub async fn call(self: &Arc<Self>, call: &str, body: &[u8]) -> (u16, Value) {
        let request = match Request::decode(call, body) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let result = match request {
            Request::Activate => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            Request::NetworkCapabilities => Ok(json!({ "Scope": "local" })),
            Request::IpamCapabilities => Ok(json!({ "RequiresMACAddress": false })),
            Request::DefaultAddressSpaces => {
                Ok(json!({ "LocalDefaultAddressSpace": ADDRESS_SPACE, "GlobalDefaultAddressSpace": ADDRESS_SPACE }))
            }
            Request::RequestPool(r) => self.request_pool(r).await,
            Request::ReleasePool | Request::Nothing => Ok(json!({})),
            Request::RequestAddress(r) => self.request_address(r).await,
            Request::ReleaseAddress(r) => self.release_address(r).await,
            Request::CreateNetwork(r) => self.create_network(r).await,
            Request::DeleteNetwork(r) => self.delete_network(&r.network_id).await,
            Request::CreateEndpoint(r) => self.create_endpoint(r).await,
            Request::DeleteEndpoint(r) => self.leave(&r, true).await,
            Request::Join(r) => self.join(r).await,
            Request::Leave(r) => self.leave(&r, false).await,
            Request::EndpointOperInfo => Ok(json!({ "Value": {} })),
        };
        match result {
            Ok(v) => (200, v),
            Err(e) => {
                tracing::warn!(call, error = %format!("{e:#}"), "refused a Docker call");
                (500, error(format!("overlayd: {e:#}")))
            }
        }
    }

    /// The cluster runtime, if this host is in a cluster.
    async fn runtime(&self) -> Result<Arc<ClusterRuntime>> {
        match &*self.daemon.mode.read().await {
            Mode::Cluster(c) => Ok(Arc::clone(c)),
            _ => bail!("this host is in no cluster: run overlayd init or overlayd join first"),
        }
    }

    async fn save(&self, store: &DriverStore) -> Result<()> {
        statefile::write_atomic(&self.path, &serde_json::to_vec_pretty(store)?)
    }

    /// A pool: the subnet of an overlayd network (named by `--ipam-opt network=NAME`, or by
    /// `--subnet`), or, on a manager, a new subnet for a network made once Docker names it.
    async fn request_pool(&self, r: RequestPool) -> Result<Value> {
        ensure!(!r.v6, "overlayd networks are IPv4: leave out --ipv6");
        ensure!(
            r.sub_pool.is_empty(),
            "--ip-range is not supported: each host gives addresses from its own block of the subnet"
        );
        let rt = self.runtime().await?;
        let view = rt.follower.view();
        let asked = match r.pool.as_str() {
            "" => None,
            p => Some(p.parse::<Ipv4Cidr>().map_err(|e| anyhow::anyhow!("--subnet: {e}"))?),
        };
        let named = r.options.as_ref().and_then(|o| o.get("network"));
        let subnet = match (named, asked) {
            (Some(name), _) => {
                let net = view.networks.get(name.as_str()).with_context(|| {
                    format!("--ipam-opt network={name}: no overlayd network of that name (see overlayd network ls)")
                })?;
                if let Some(s) = asked.filter(|s| *s != net.subnet) {
                    bail!("--subnet {s} is not the subnet {} of overlayd network {name}: leave it out", net.subnet);
                }
                net.subnet
            }
            (None, Some(s)) => {
                if let Some(n) = view.networks.values().find(|n| n.subnet != s && n.subnet.overlaps(&s)) {
                    bail!("--subnet {s} overlaps overlayd network {} ({})", n.name, n.subnet);
                }
                if !view.networks.values().any(|n| n.subnet == s) {
                    ensure!(s.prefix() <= 28, "--subnet {s} is too small: use /28 or larger");
                    ensure_manager(&rt)?;
                }
                s
            }
            (None, None) => {
                ensure_manager(&rt)?;
                view.free_subnet().context("the cluster's address pool has no free subnet left: give --subnet")?
            }
        };
        Ok(json!({ "PoolID": subnet.to_string(), "Pool": subnet.to_string(), "Data": {} }))
    }

    /// The gateway (the network's first address), or an address of this host's block for a
    /// container (`--ip` within the block), reserved until Docker releases it.
    async fn request_address(&self, r: RequestAddress) -> Result<Value> {
        let subnet: Ipv4Cidr = r.pool_id.parse().map_err(|e| anyhow::anyhow!("pool {:?}: {e}", r.pool_id))?;
        let prefix = subnet.prefix();
        let gateway_request =
            r.options.as_ref().and_then(|o| o.get("RequestAddressType")).map(String::as_str) == Some(GATEWAY_REQUEST);
        let rt = self.runtime().await?;
        if gateway_request {
            let gateway = network_by_subnet(&rt, subnet).map_or_else(|| subnet.nth(1), |n| Some(n.gateway));
            let gateway = gateway.context("the subnet has no first address")?;
            if !r.address.is_empty() && r.address.split('/').next() != Some(gateway.to_string().as_str()) {
                bail!("an overlayd network's gateway is its first address, {gateway}: leave out --gateway");
            }
            return Ok(json!({ "Address": format!("{gateway}/{prefix}"), "Data": {} }));
        }
        let net = self.settled_network(&rt, subnet).await?;
        rt.lease_block(&net.name).await?;
        let me = rt.membership.node_id;
        let mut block = None;
        for _ in 0..SETTLE.as_millis() / 100 {
            block = rt.follower.view().block(&net.name, me);
            if block.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let block = block.context("this host's block of the network did not arrive (is a manager reachable?)")?;
        let mut store = rt.endpoints.lock().await;
        let ip = match endpoints::requested_address(&r.address, "", block, net.gateway) {
            Ok(Some(ip)) => {
                if let Some(holder) = store.holder(&net.name, ip) {
                    bail!("{ip} is in use by {holder} on {:?}", net.name);
                }
                ip
            }
            Ok(None) => store
                .allocate(&net.name, block, net.gateway)
                .with_context(|| format!("every address of this host's block {block} is in use"))?,
            Err(e) => bail!("{e:#} (--ip must be an address of this host's block {block} of network {})", net.name),
        };
        store.reserved.push(Reservation { network: net.name.clone(), ip });
        store.save(&rt.state_dir.join(ENDPOINTS_FILE))?;
        Ok(json!({ "Address": format!("{ip}/{prefix}"), "Data": {} }))
    }

    /// Gives back an address Docker reserved (the gateway is nobody's).
    async fn release_address(&self, r: ReleaseAddress) -> Result<Value> {
        let subnet: Ipv4Cidr = r.pool_id.parse().map_err(|e| anyhow::anyhow!("pool {:?}: {e}", r.pool_id))?;
        let ip: Ipv4Addr = r
            .address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| anyhow::anyhow!("{:?} is not an IPv4 address", r.address))?;
        let rt = self.runtime().await?;
        let view = rt.follower.view();
        let network = view.networks.values().find(|n| n.subnet == subnet).map(|n| n.name.clone());
        let mut store = rt.endpoints.lock().await;
        let before = store.reserved.len();
        // A network removed meanwhile has no name for its subnet: its reservations go too.
        store
            .reserved
            .retain(|x| !(x.ip == ip && network.as_ref().is_none_or(|n| *n == x.network) && subnet.contains(x.ip)));
        if store.reserved.len() != before {
            store.save(&rt.state_dir.join(ENDPOINTS_FILE))?;
        }
        drop(store);
        if let Some(n) = network {
            rt.release_unused_blocks([n].into()).await;
        }
        Ok(json!({}))
    }

    /// Remembers which subnet Docker's network is; a new subnet becomes an overlayd network
    /// under the name Docker gives it.
    async fn create_network(self: &Arc<Self>, r: CreateNetwork) -> Result<Value> {
        let data = r.ipv4_data.unwrap_or_default();
        let Some(pool) = data.first().filter(|d| d.address_space == ADDRESS_SPACE) else {
            bail!(
                "an overlayd network needs overlayd's addresses: add --ipam-driver {} (Docker's default IPAM would give each host its own)",
                self.name
            );
        };
        let subnet: Ipv4Cidr = pool.pool.parse().map_err(|e| anyhow::anyhow!("pool {:?}: {e}", pool.pool))?;
        let internal = r.options.as_ref().is_some_and(|o| {
            o.get("com.docker.network.internal").is_some_and(|v| v == &json!(true) || v == &json!("true"))
        });
        let encrypted = r.options.as_ref().is_some_and(wants_encryption);
        let rt = self.runtime().await?;
        let mut store = self.store.lock().await;
        store.networks.insert(r.network_id.clone(), DockerNetwork { subnet, failed: String::new() });
        self.save(&store).await?;
        drop(store);
        if network_by_subnet(&rt, subnet).is_none() {
            let me = Arc::clone(self);
            tokio::spawn(
                async move { me.create_overlayd_network(rt, r.network_id, subnet, internal, encrypted).await },
            );
        }
        Ok(json!({}))
    }

    /// Creates the overlayd network of a Docker network with a new subnet, once Docker shows
    /// the network's name.
    async fn create_overlayd_network(
        &self,
        rt: Arc<ClusterRuntime>,
        id: String,
        subnet: Ipv4Cidr,
        internal: bool,
        encrypted: bool,
    ) {
        let result = async {
            let mut name = None;
            for _ in 0..300 {
                if let Ok(Some(n)) = self.engine.network(&id).await {
                    name = Some(n.name);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let name = name.context("Docker never showed the network's name")?;
            let mut c = rt.manager_client().await?;
            c.create_network(pb::CreateNetworkRequest {
                name: name.clone(),
                subnet: subnet.to_string(),
                internal,
                encrypted,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("cannot create overlayd network {name:?}: {}", s.message()))?;
            self.store.lock().await.mirrored.insert(name.clone());
            anyhow::Ok(name)
        }
        .await;
        let mut store = self.store.lock().await;
        match result {
            Ok(name) => tracing::info!(network = %name, %subnet, "created the overlayd network of a Docker network"),
            Err(e) => {
                tracing::warn!(%subnet, error = %format!("{e:#}"), "could not create the overlayd network of a Docker network");
                if let Some(n) = store.networks.get_mut(&id) {
                    n.failed = format!("{e:#}");
                }
            }
        }
        if let Err(e) = self.save(&store).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot save the Docker driver's file");
        }
    }

    /// Forgets Docker's network; the overlayd network stays (other hosts may use it: `overlayd
    /// network rm` removes it from the cluster).
    async fn delete_network(&self, id: &str) -> Result<Value> {
        let mut store = self.store.lock().await;
        if store.networks.remove(id).is_some() {
            self.save(&store).await?;
        }
        Ok(json!({}))
    }

    /// The overlayd network of Docker's network `id`, waiting a little for one Docker just
    /// made.
    async fn network_of(&self, rt: &ClusterRuntime, id: &str) -> Result<Network> {
        let subnet = self.store.lock().await.networks.get(id).map(|n| n.subnet).context(
            "Docker's network is unknown to overlayd (made before its state was lost? remove it and make it again)",
        )?;
        self.settled_network(rt, subnet).await
    }

    /// The overlayd network of `subnet`, waiting up to [`SETTLE`] for one being made.
    async fn settled_network(&self, rt: &ClusterRuntime, subnet: Ipv4Cidr) -> Result<Network> {
        for _ in 0..SETTLE.as_millis() / 100 {
            if let Some(n) = network_by_subnet(rt, subnet) {
                return Ok(n);
            }
            let store = self.store.lock().await;
            if let Some(failed) = store.networks.values().find(|n| n.subnet == subnet && !n.failed.is_empty()) {
                bail!("the network's overlayd network could not be made: {}", failed.failed);
            }
            drop(store);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no overlayd network has the subnet {subnet} (see overlayd network ls)")
    }

    /// An endpoint: its address came from `RequestAddress`; its MAC derives from it.
    async fn create_endpoint(&self, r: CreateEndpoint) -> Result<Value> {
        let iface = r.interface.unwrap_or_default();
        ensure!(iface.address_ipv6.is_empty(), "overlayd networks are IPv4: leave out --ip6");
        let ip: Ipv4Addr = iface.address.split('/').next().unwrap_or_default().parse().map_err(|_| {
            anyhow::anyhow!(
                "Docker gave the endpoint no IPv4 address ({:?}): the network needs --ipam-driver {}",
                iface.address,
                self.name
            )
        })?;
        let rt = self.runtime().await?;
        self.network_of(&rt, &r.network_id).await?;
        let mac = MacAddr::from_ipv4(ip);
        let reply = match iface.mac_address.as_str() {
            "" => json!({ "Interface": { "MacAddress": mac.to_string() } }),
            given => {
                ensure!(
                    given.parse::<MacAddr>().ok() == Some(mac),
                    "on an overlayd network a MAC derives from the address ({mac} for {ip}): leave out --mac-address"
                );
                json!({})
            }
        };
        let mut store = self.store.lock().await;
        store.endpoints.insert(r.endpoint_id, DockerEndpoint { network_id: r.network_id, ip });
        self.save(&store).await?;
        Ok(reply)
    }

    /// Attaches the container: a veth whose host end is on the network's bridge and whose other
    /// end Docker moves into the container, named after Docker's endpoint.
    async fn join(self: &Arc<Self>, r: Join) -> Result<Value> {
        let rt = self.runtime().await?;
        let ep =
            self.store.lock().await.endpoints.get(&r.endpoint_id).cloned().context("Join for an unknown endpoint")?;
        ensure!(ep.network_id == r.network_id, "Join for an endpoint of another network");
        let net = self.network_of(&rt, &r.network_id).await?;
        rt.attach(pb::AttachRequest {
            network: net.name.clone(),
            netns: r.sandbox_key,
            container_id: r.endpoint_id.clone(),
            ip: ep.ip.to_string(),
            origin: "docker".into(),
            ..Default::default()
        })
        .await?;
        let (_, peer) = attach::veth_names(&net.name, attach::veth_key(&r.endpoint_id, ""));
        let me = Arc::clone(self);
        tokio::spawn(async move { me.learn_name(rt, r.network_id, r.endpoint_id).await });
        Ok(json!({
            "InterfaceName": { "SrcName": peer, "DstPrefix": "eth" },
            "Gateway": net.gateway.to_string(),
        }))
    }

    /// Gives the endpoint its container's name, once Docker shows it, and makes it a replica of
    /// the service its label [`SERVICE_LABEL`] names.
    async fn learn_name(&self, rt: Arc<ClusterRuntime>, network_id: String, endpoint_id: String) {
        for _ in 0..150 {
            if let Ok(Some(n)) = self.engine.network(&network_id).await
                && let Some(c) = n.containers.values().find(|c| c.endpoint_id == endpoint_id && !c.name.is_empty())
            {
                if let Err(e) = rt.rename(&endpoint_id, &c.name).await {
                    tracing::warn!(container = %c.name, error = %format!("{e:#}"), "cannot give the endpoint its container's name");
                }
                // Its namespace by its process (Docker's own path for it is a bind mount in
                // dockerd's mount namespace, which another may not see) for its VIPs.
                // Docker shows the name before the container's process runs: wait for it.
                // By its name: a container being started is listed under its endpoint's id.
                let mut inspected = self.engine.container(&c.name).await;
                for _ in 0..150 {
                    if matches!(&inspected, Ok(c) if c.pid != 0) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    inspected = self.engine.container(&c.name).await;
                }
                match inspected {
                    Ok(container) => {
                        let pid = container.pid;
                        let netns = (pid != 0).then(|| format!("/proc/{pid}/ns/net"));
                        let service = container.labels.get(SERVICE_LABEL).map(String::as_str);
                        let aliases = container.aliases.get(&n.name).cloned().unwrap_or_default();
                        if let Err(e) = rt.learn_container(&endpoint_id, netns, service, &aliases).await {
                            tracing::warn!(container = %c.name, ?service, error = %format!("{e:#}"), "cannot make the container a replica");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(container = %c.name, error = %format!("{e:#}"), "cannot inspect the container")
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::info!(endpoint = %endpoint_id, "Docker did not show the container's name: the endpoint keeps its sandbox's");
    }

    /// Leave and DeleteEndpoint: the endpoint is detached (gone already is fine); DeleteEndpoint
    /// also forgets it.
    async fn leave(&self, r: &EndpointOnly, delete: bool) -> Result<Value> {
        let rt = self.runtime().await?;
        rt.detach(pb::DetachRequest { container_id: r.endpoint_id.clone(), missing_ok: true, ..Default::default() })
            .await?;
        if delete {
            let mut store = self.store.lock().await;
            if store.endpoints.remove(&r.endpoint_id).is_some() {
                self.save(&store).await?;
            }
        }
        Ok(json!({}))
    }

    /// Puts each overlayd network into this host's Docker (once) and takes out those whose
    /// overlayd network is gone; runs until the daemon stops.
    pub async fn mirror_networks(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MIRROR_EVERY);
        loop {
            tick.tick().await;
            let Ok(rt) = self.runtime().await else { continue };
            if let Err(e) = self.mirror_once(&rt).await {
                tracing::debug!(error = %format!("{e:#}"), "cannot mirror the cluster's networks into Docker");
            }
        }
    }

    async fn mirror_once(&self, rt: &ClusterRuntime) -> Result<()> {
        let view = rt.follower.view();
        let mirrored = self.store.lock().await.mirrored.clone();
        let new: Vec<&Network> = view.networks.values().filter(|n| !mirrored.contains(&n.name)).collect();
        let gone: Vec<&String> = mirrored.iter().filter(|n| !view.networks.contains_key(*n)).collect();
        if new.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let docker = self.engine.networks().await?;
        let mut done = BTreeSet::new();
        for n in new {
            if !docker.iter().any(|d| d.name == n.name) {
                self.engine
                    .create_network(&n.name, &self.name, &n.subnet.to_string(), &n.gateway.to_string(), n.internal)
                    .await?;
                tracing::info!(network = %n.name, "put the overlayd network into Docker");
            }
            done.insert(n.name.clone());
        }
        for name in &gone {
            if let Some(d) = docker.iter().find(|d| &&d.name == name && d.driver == self.name) {
                self.engine.remove_network(&d.id).await?;
                tracing::info!(network = %name, "took the removed overlayd network out of Docker");
            }
        }
        let mut store = self.store.lock().await;
        store.mirrored.extend(done);
        store.mirrored.retain(|n| !gone.contains(&n));
        self.save(&store).await
    }
}

/// The overlayd network with subnet `subnet`.
fn network_by_subnet(rt: &ClusterRuntime, subnet: Ipv4Cidr) -> Option<Network> {
    rt.follower.view().networks.values().find(|n| n.subnet == subnet).cloned()
}

/// Making a network is a manager's job.
fn ensure_manager(rt: &ClusterRuntime) -> Result<()> {
    ensure!(
        rt.manager.is_some(),
        "this host is a worker: create the network on a manager (docker network create there, or overlayd network create); it then appears in every host's Docker"
    );
    Ok(())
}
