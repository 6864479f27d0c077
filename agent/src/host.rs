//! This host's side of the overlay, whatever runs it (static configuration or the cluster):
//! the dataplane, per network a bridge and a TAP on it, and the firewall that keeps the
//! networks off the underlay and each endpoint to its own identity. Reports for `status` and
//! `fdb` come from here too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use control::cidr::Ipv4Cidr;
use dataplane::linux::{Dataplane, DataplaneSettings};
use dataplane::tables::{BlockOwner, NetworkSettings};
use dataplane::{MacAddr, Vni};
use proto as pb;
use tokio::sync::Mutex;

use crate::cluster::keys::SealKeys;
use crate::endpoints::LocalEndpoint;
use crate::firewall::{self, Firewall, GatewayNetwork, PortBinding, UnderlayServices};
use crate::netdev::{self, Bridge};

/// Bytes VXLAN adds in front of a frame on an underlay of `addr`'s family: outer IPv4 20 (or
/// IPv6 40) + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub fn overhead(addr: IpAddr) -> u32 {
    control::state::vxlan_overhead(addr)
}

/// The mesh port of a network on this host: the host's side of a veth pair whose other side
/// (`ovmb-<network>`) is on the network's bridge.
pub fn mesh_port(network: &str) -> String {
    format!("ovm-{network}")
}

/// The underlay as this host sees it.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub addr: IpAddr,
    pub interface: String,
    pub mtu: u32,
}

/// Where a cluster network's gateway is, which block is this host's, and whether the gateway
/// leads out of the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    pub addr: Ipv4Addr,
    pub local_block: Ipv4Cidr,
    /// The network's whole subnet.
    pub subnet: Ipv4Cidr,
    /// Egress: this host forwards its containers' traffic out of the overlay, masqueraded
    /// (false on an `--internal` network).
    pub egress: bool,
    /// This host's mesh address on the network (`control::service::mesh_address`), held by its
    /// mesh port (`ovm-<network>`), through which published ports reach the replicas.
    pub mesh: Option<Ipv4Addr>,
}

/// A network to bring up on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub vni: Vni,
    pub bridge: String,
    pub tap: String,
    pub mtu: u32,
    pub learning: bool,
    /// Sealed between hosts (it sends nothing until it has a key).
    pub encrypted: bool,
    /// Cluster networks: the gateway lives on the bridge of every host.
    pub gateway: Option<Gateway>,
}

/// What a cluster network's dataplane tables hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkTables {
    /// The VTEPs broadcast and unknown frames are replicated to.
    pub flood: Vec<IpAddr>,
    /// Prefix length of every host's block.
    pub block_prefix: u8,
    /// Each block's first address and who holds it.
    pub blocks: Vec<(Ipv4Addr, BlockOwner)>,
    /// The network's gateway (on every host's bridge).
    pub gateway: Ipv4Addr,
    /// Other hosts' endpoints: address, MAC, VTEP (and their mesh addresses, whose ARP the
    /// dataplane answers as an endpoint's).
    pub endpoints: Vec<(Ipv4Addr, MacAddr, IpAddr)>,
    /// The network's subnet.
    pub subnet: Ipv4Cidr,
    /// Every host's mesh address (this host's too).
    pub mesh: Vec<Ipv4Addr>,
    /// An encrypted network's keys: what it opens and seals with now.
    pub crypto: Option<SealKeys>,
}

/// Endpoints by network, then by bridge port: (MAC, address).
type Bindings = BTreeMap<String, BTreeMap<String, (MacAddr, Ipv4Addr)>>;

/// A network that is up.
#[derive(Debug, Clone)]
pub struct LocalNetwork {
    pub spec: NetworkSpec,
    pub bridge: Bridge,
}

/// The dataplane and the networks on it.
pub struct Host {
    pub nl: rtnetlink::Handle,
    pub dataplane: Arc<Dataplane>,
    pub underlay: Underlay,
    /// overlayd's nftables tables.
    pub firewall: Firewall,
    networks: Mutex<BTreeMap<String, LocalNetwork>>,
    /// Each network's endpoints on this host, by their bridge port: (MAC, address). Kept
    /// while a network is down, programmed into its tables when it comes up.
    bindings: Mutex<Bindings>,
    /// Each encrypted network's keys as last programmed, and what the dataplane made of them
    /// (kept while they stay the same: its sealer's counter goes on).
    crypto: std::sync::Mutex<BTreeMap<Vni, (SealKeys, Arc<dataplane::tables::NetworkCrypto>)>>,
    /// The underlay services the firewall closes to the overlay, as last set.
    services: Mutex<UnderlayServices>,
    /// The cluster networks up on this host, with their gateway: where the DNS resolver
    /// listens (see [`Host::gateways`]).
    gateways: tokio::sync::watch::Sender<BTreeMap<String, Ipv4Addr>>,
    started: Instant,
    /// The underlay interface's MTU now (`underlay.mtu` is the one at start), as the MTU
    /// watch last read it.
    underlay_mtu_now: std::sync::atomic::AtomicU32,
}

impl Host {
    /// Starts the dataplane on `underlay_addr` (whose interface and MTU are looked up).
    pub async fn start(
        nl: rtnetlink::Handle,
        underlay_addr: IpAddr,
        underlay_mtu: Option<u32>,
        settings: DataplaneSettings,
    ) -> Result<Host> {
        let (interface, detected) = netdev::underlay_mtu(&nl, underlay_addr).await?;
        let mtu = underlay_mtu.unwrap_or(detected);
        tracing::info!(addr = %underlay_addr, %interface, mtu, "underlay");
        let ports = (settings.vxlan_port, settings.source_ports);
        let dataplane = Dataplane::start(underlay_addr, settings).with_context(|| {
            format!(
                "cannot start the dataplane on {underlay_addr}:{} (is another VXLAN endpoint, overlayd or a kernel vxlan \
                 device, using this port or the source ports {} on this host?)",
                ports.0, ports.1
            )
        })?;
        let s = dataplane.settings();
        let last = s.source_ports.first.saturating_add(s.source_ports.count.saturating_sub(1));
        let services = UnderlayServices::new(s.vxlan_port, (s.source_ports.first, last));
        let firewall = match Firewall::install(&interface, &services).await {
            Ok(f) => f,
            Err(e) => {
                dataplane.shutdown();
                return Err(e);
            }
        };
        Ok(Host {
            nl,
            dataplane: Arc::new(dataplane),
            underlay: Underlay { addr: underlay_addr, interface, mtu },
            firewall,
            networks: Mutex::new(BTreeMap::new()),
            bindings: Mutex::new(BTreeMap::new()),
            crypto: std::sync::Mutex::new(BTreeMap::new()),
            services: Mutex::new(services),
            gateways: tokio::sync::watch::channel(BTreeMap::new()).0,
            started: Instant::now(),
            underlay_mtu_now: std::sync::atomic::AtomicU32::new(mtu),
        })
    }

    /// The underlay interface's MTU, as last read ([`Host::refresh_underlay_mtu`]).
    pub fn underlay_mtu(&self) -> u32 {
        self.underlay_mtu_now.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the underlay interface's MTU again (unless `fixed`, the `--underlay-mtu` setting)
    /// and returns it; a change is logged.
    pub async fn refresh_underlay_mtu(&self, fixed: Option<u32>) -> Result<u32> {
        let now = match fixed {
            Some(m) => m,
            None => netdev::underlay_mtu(&self.nl, self.underlay.addr).await?.1,
        };
        let before = self.underlay_mtu_now.swap(now, std::sync::atomic::Ordering::Relaxed);
        if before != now {
            tracing::info!(interface = %self.underlay.interface, from = before, to = now, "the underlay MTU changed");
        }
        Ok(now)
    }

    /// Changes network `name`'s MTU in place: its bridge, TAP, dataplane and the endpoints
    /// `endpoints` (this host's on it: their veths and their interfaces in the containers).
    pub async fn set_network_mtu(&self, name: &str, mtu: u32, endpoints: &[LocalEndpoint]) -> Result<()> {
        let mut nets = self.networks.lock().await;
        let n = nets.get_mut(name).with_context(|| format!("network {name} is not up here"))?;
        if mtu + self.overhead() > self.underlay_mtu() {
            tracing::warn!(
                network = %name, mtu, underlay_mtu = self.underlay_mtu(),
                "the network's MTU does not fit this host's underlay: large frames will be fragmented or lost"
            );
        }
        // Smaller first at the edges, so that nothing on the way is ever smaller than what
        // enters it; the bridge follows its ports.
        for e in endpoints {
            if let Err(err) = crate::attach::set_mtu(&self.nl, e, mtu, n.spec.encrypted).await {
                tracing::warn!(endpoint = %e.name, error = %format!("{err:#}"), "could not change the container's MTU");
            }
        }
        netdev::set_mtu(&self.nl, &n.spec.tap, mtu).await?;
        netdev::set_mtu(&self.nl, &n.bridge.name, mtu).await?;
        self.dataplane.update(|tx| tx.set_mtu(n.spec.vni, mtu))?;
        n.spec.mtu = mtu;
        tracing::info!(network = %name, mtu, "network MTU changed");
        Ok(())
    }

    /// VXLAN overhead on this underlay.
    pub fn overhead(&self) -> u32 {
        overhead(self.underlay.addr)
    }

    /// Brings a network up: bridge (created or adopted), its firewall, gateway on it, TAP,
    /// dataplane (a cluster network with the endpoints bound to it). If a step fails, what was
    /// made is recorded so that `shutdown` still removes it.
    pub async fn add_network(&self, spec: NetworkSpec) -> Result<()> {
        let mut nets = self.networks.lock().await;
        if nets.contains_key(&spec.name) {
            return Ok(());
        }
        if spec.mtu + self.overhead() > self.underlay.mtu {
            tracing::warn!(
                network = %spec.name, mtu = spec.mtu, underlay_mtu = self.underlay.mtu,
                "MTU + {} bytes of VXLAN overhead exceeds the underlay MTU: full-size frames will be fragmented",
                self.overhead()
            );
        }
        let bridge = netdev::ensure_bridge(&self.nl, &spec.bridge, spec.mtu).await?;
        nets.insert(spec.name.clone(), LocalNetwork { spec: spec.clone(), bridge: bridge.clone() });
        // Guarded before the gateway is on it and anything is forwarded to it.
        let rules = spec.gateway.map(|g| GatewayNetwork { gateway: g.addr, subnet: g.subnet, egress: g.egress });
        self.firewall.add_network(&bridge.name, rules).await?;
        if let Some(gw) = spec.gateway {
            netdev::set_gateway(&self.nl, &bridge, gw.addr, gw.local_block).await?;
            if let Some(addr) = gw.mesh {
                let port = mesh_port(&spec.name);
                // Guarded before it is up: nothing but published-port traffic passes it.
                self.firewall.add_mesh_port(&port).await?;
                netdev::add_mesh_port(
                    &self.nl,
                    &port,
                    &format!("ovmb-{}", spec.name),
                    &bridge,
                    spec.mtu,
                    addr,
                    gw.subnet,
                )
                .await?;
            }
            if gw.egress {
                // Without forwarding the network still works, only not beyond the overlay.
                match firewall::enable_ipv4_forwarding() {
                    Ok(true) => tracing::info!(
                        network = %spec.name,
                        "turned IPv4 forwarding on (net.ipv4.ip_forward = 1) for egress; it stays on when overlayd stops"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        network = %spec.name, error = %format!("{e:#}"),
                        "the network's containers cannot reach beyond the overlay"
                    ),
                }
            }
        }
        let tap = self.dataplane.open_tap(&spec.tap).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => {
                anyhow::anyhow!("the TAP {} is held by another process (another overlayd?): {e}", spec.tap)
            }
            Some(libc::EPERM) | Some(libc::EACCES) => {
                anyhow::anyhow!(
                    "cannot create the TAP {}: {e}; overlayd needs CAP_NET_ADMIN (run it as root)",
                    spec.tap
                )
            }
            _ => anyhow::anyhow!("cannot create the TAP {}: {e}", spec.tap),
        })?;
        netdev::attach_tap(&self.nl, tap.name(), &bridge, spec.mtu).await?;
        self.dataplane.add_network(
            spec.vni,
            tap,
            NetworkSettings { learning: spec.learning, mtu: spec.mtu, encrypted: spec.encrypted },
        )?;
        if spec.gateway.is_some() {
            // A cluster network sends only its endpoints' frames, from the first one on.
            let bindings = self.bindings.lock().await;
            self.dataplane.update(|tx| tx.set_local_endpoints(spec.vni, local_endpoints(&bindings, &spec.name)))?;
        }
        tracing::info!(network = %spec.name, vni = %spec.vni, bridge = %bridge.name, tap = %spec.tap, mtu = spec.mtu, "network up");
        if let Some(gw) = spec.gateway {
            self.gateways.send_modify(|g| {
                g.insert(spec.name.clone(), gw.addr);
            });
        }
        Ok(())
    }

    /// Takes a network down: out of the dataplane (its TAP closes), bridge removed if ours,
    /// its firewall (egress included) removed.
    pub async fn remove_network(&self, name: &str) -> Result<()> {
        let Some(n) = self.networks.lock().await.remove(name) else { return Ok(()) };
        // Its resolver goes first: nothing listens on an address that is going away.
        self.gateways.send_if_modified(|g| g.remove(name).is_some());
        let _ = self.dataplane.remove_network(n.spec.vni);
        // Its keys go with it (a network made again gets a sealer, and a session, of its own).
        self.crypto.lock().unwrap_or_else(|p| p.into_inner()).remove(&n.spec.vni);
        if n.spec.gateway.is_some_and(|g| g.mesh.is_some()) {
            let port = mesh_port(name);
            netdev::delete_link(&self.nl, &port).await?;
            self.firewall.remove_mesh_port(&port).await?;
        }
        if n.bridge.owned {
            netdev::delete_link(&self.nl, &n.bridge.name).await?;
        }
        self.firewall.remove_network(&n.bridge.name).await?;
        tracing::info!(network = %name, "network down");
        Ok(())
    }

    /// The cluster networks up on this host and their gateway address (on the network's
    /// bridge), and changes to come: a network is in it once it is wholly up, and leaves it
    /// before it goes down.
    pub fn gateways(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, Ipv4Addr>> {
        self.gateways.subscribe()
    }

    /// The networks that are up.
    pub async fn networks(&self) -> BTreeMap<String, LocalNetwork> {
        self.networks.lock().await.clone()
    }

    /// Binds an endpoint to its bridge port before the port joins the bridge: the port's
    /// firewall passes only the endpoint's MAC and address, and its network's dataplane sends
    /// its frames (and only bound endpoints' frames).
    pub async fn bind_endpoint(&self, e: &LocalEndpoint) -> Result<()> {
        self.firewall.bind_port(PortBinding { port: &e.host_ifname, mac: e.mac, ip: e.ip }).await?;
        let nets = self.networks.lock().await;
        let mut bindings = self.bindings.lock().await;
        bindings.entry(e.network.clone()).or_default().insert(e.host_ifname.clone(), (e.mac, e.ip));
        self.program_bindings(&nets, &bindings, &e.network)
    }

    /// Unbinds an endpoint whose port is gone (or never came): its frames are no longer sent,
    /// and its port's rules are removed.
    pub async fn unbind_endpoint(&self, e: &LocalEndpoint) -> Result<()> {
        {
            let nets = self.networks.lock().await;
            let mut bindings = self.bindings.lock().await;
            if let Some(ports) = bindings.get_mut(&e.network) {
                ports.remove(&e.host_ifname);
            }
            self.program_bindings(&nets, &bindings, &e.network)?;
        }
        self.firewall.unbind_port(&e.host_ifname).await
    }

    fn program_bindings(
        &self,
        nets: &BTreeMap<String, LocalNetwork>,
        bindings: &Bindings,
        network: &str,
    ) -> Result<()> {
        let Some(n) = nets.get(network).filter(|n| n.spec.gateway.is_some()) else { return Ok(()) };
        self.dataplane.update(|tx| tx.set_local_endpoints(n.spec.vni, local_endpoints(bindings, network)))?;
        Ok(())
    }

    /// Removes what the firewall holds for ports and bridges this host no longer has (left by
    /// a daemon that crashed): call once every endpoint is bound again.
    pub async fn prune_firewall(&self) -> Result<()> {
        let bridges: BTreeSet<String> = self.networks.lock().await.values().map(|n| n.bridge.name.clone()).collect();
        let ports: BTreeSet<String> = self.bindings.lock().await.values().flat_map(|p| p.keys().cloned()).collect();
        self.firewall.retain(&ports, &bridges).await
    }

    /// Closes the gossip and control ports of every host (`gossip`, `control`: the cluster's,
    /// besides the defaults) to the overlay; nothing is rewritten if they did not change.
    pub async fn set_service_ports(&self, gossip: BTreeSet<u16>, control: BTreeSet<u16>) -> Result<()> {
        let mut services = self.services.lock().await;
        let mut wanted = services.clone();
        wanted.gossip_ports = gossip;
        wanted.gossip_ports.insert(control::gossip::DEFAULT_PORT);
        wanted.control_ports = control;
        wanted.control_ports.insert(crate::firewall::DEFAULT_CONTROL_PORT);
        if wanted != *services {
            self.firewall.set_service_ports(&wanted).await?;
            *services = wanted;
        }
        Ok(())
    }

    /// How network `vni` is sealed on this host, for `status` (see `NetworkStatus.sealing`).
    fn sealing(&self, vni: Vni, encrypted: bool) -> String {
        if !encrypted {
            return "none".into();
        }
        let made = self.crypto.lock().unwrap_or_else(|p| p.into_inner());
        let Some((keys, _)) = made.get(&vni).filter(|(k, _)| !k.keys.is_empty()) else {
            return "AES-256-GCM, no key yet (refusing the network's traffic)".into();
        };
        let opening: Vec<String> = keys.keys.iter().map(|k| k.epoch.to_string()).collect();
        let sealing = keys.send.map_or("not sealing yet".to_owned(), |e| format!("sealing with epoch {e}"));
        format!("AES-256-GCM, {sealing}, opening {}", opening.join(","))
    }

    /// The key epochs network `vni` seals with and opens on this host (see
    /// `NetworkStatus.sealing_epoch`): none on a plain network or before its first key.
    fn key_epochs(&self, vni: Vni) -> (Option<u32>, Vec<u32>) {
        let made = self.crypto.lock().unwrap_or_else(|p| p.into_inner());
        made.get(&vni).map_or((None, Vec::new()), |(keys, _)| (keys.send, keys.keys.iter().map(|k| k.epoch).collect()))
    }

    /// The dataplane's keys for network `vni` from `wanted`: those made last time if they are
    /// the same (so that the sealing session goes on), else new ones.
    fn crypto_for(&self, vni: Vni, wanted: &SealKeys) -> Arc<dataplane::tables::NetworkCrypto> {
        let mut made = self.crypto.lock().unwrap_or_else(|p| p.into_inner());
        match made.get(&vni) {
            Some((have, c)) if have == wanted => Arc::clone(c),
            _ => {
                let (keys, send) = wanted.for_dataplane();
                let c = self.dataplane.network_crypto(keys, send);
                made.insert(vni, (wanted.clone(), Arc::clone(&c)));
                c
            }
        }
    }

    /// Seals static network `vni` with a pre-shared key (epoch 0, for opening and sealing).
    pub fn seal_with_static_key(&self, vni: Vni, key: [u8; 32]) -> Result<()> {
        let keys = SealKeys { keys: vec![crate::cluster::keys::EpochKey { epoch: 0, key }], send: Some(0) };
        let crypto = self.crypto_for(vni, &keys);
        self.dataplane.update(|tx| tx.set_crypto(vni, Some(crypto)))?;
        Ok(())
    }

    /// Programs a cluster network's tables, in one transaction.
    pub fn program_network(&self, vni: Vni, t: &NetworkTables) -> Result<()> {
        let crypto = t.crypto.as_ref().map(|wanted| self.crypto_for(vni, wanted));
        self.dataplane.update(|tx| {
            if crypto.is_some() {
                tx.set_crypto(vni, crypto)?;
            }
            tx.set_flood_list(vni, t.flood.iter().copied())?;
            tx.set_blocks(vni, t.block_prefix, t.blocks.iter().copied())?;
            tx.set_gateway(vni, Some(t.gateway))?;
            tx.set_mesh(vni, (t.subnet.addr(), t.subnet.prefix()), t.mesh.iter().copied())?;
            tx.set_endpoints(vni, t.endpoints.iter().copied())
        })?;
        Ok(())
    }

    /// Stops the dataplane, removes the bridges this agent created, then its nftables tables.
    pub async fn shutdown(&self) {
        self.gateways.send_if_modified(|g| !std::mem::take(g).is_empty());
        self.dataplane.shutdown();
        let nets = std::mem::take(&mut *self.networks.lock().await);
        for n in nets.values().filter(|n| n.spec.gateway.is_some_and(|g| g.mesh.is_some())) {
            if let Err(e) = netdev::delete_link(&self.nl, &mesh_port(&n.spec.name)).await {
                tracing::warn!(network = %n.spec.name, error = %format!("{e:#}"), "could not remove the mesh port");
            }
        }
        if let Err(e) = netdev::remove_mesh_rule(&self.nl).await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the routing mesh's rule");
        }
        for n in nets.values().filter(|n| n.bridge.owned) {
            match netdev::delete_link(&self.nl, &n.bridge.name).await {
                Ok(()) => tracing::info!(bridge = %n.bridge.name, "removed bridge"),
                Err(e) => tracing::warn!(bridge = %n.bridge.name, error = %format!("{e:#}"), "could not remove bridge"),
            }
        }
        // After the bridges: no container is left on one while its rules go.
        if let Err(e) = self.firewall.remove().await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the nftables tables");
        }
    }

    /// Seconds since the host started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The dataplane part of `overlayd status`.
    pub async fn status(&self, mode: &str) -> pb::StatusReply {
        let tables = self.dataplane.tables();
        let learned = self.dataplane.learned();
        let (split, switches) = self.dataplane.loops();
        let nets = self.networks().await;
        let networks = nets
            .values()
            .map(|n| {
                let t = tables.by_vni(n.spec.vni).map(|(_, t)| t);
                let mut status = pb::NetworkStatus {
                    name: n.spec.name.clone(),
                    vni: n.spec.vni.get(),
                    bridge: n.bridge.name.clone(),
                    tap: n.spec.tap.clone(),
                    tap_offloads: t
                        .map(|t| match (t.tap().offloads().vnet_hdr, t.tap().offloads().uso) {
                            (false, _) => "none",
                            (true, false) => "csum,tso",
                            (true, true) => "csum,tso,uso",
                        })
                        .unwrap_or_default()
                        .to_owned(),
                    mtu: n.spec.mtu,
                    learning: n.spec.learning,
                    flood_list: t.map(|t| t.flood_list().iter().map(ToString::to_string).collect()).unwrap_or_default(),
                    fdb_entries: t.map_or(0, |t| t.fdb_entries().count() as u64),
                    learned_entries: learned.entries().filter(|(v, ..)| *v == n.spec.vni).count() as u64,
                    arp_entries: t.map_or(0, |t| t.arp_entries().count() as u64),
                    blocks: t.map_or(0, |t| t.block_entries().count() as u64),
                    local_block: n.spec.gateway.map(|g| g.local_block.to_string()).unwrap_or_default(),
                    sealing: self.sealing(n.spec.vni, n.spec.encrypted),
                    counters: t.map(|t| network_counters(&t.counters().snapshot())),
                    sealing_epoch: None,
                    opening_epochs: Vec::new(),
                };
                if n.spec.encrypted {
                    (status.sealing_epoch, status.opening_epochs) = self.key_epochs(n.spec.vni);
                }
                status
            })
            .collect();
        let s = self.dataplane.settings();
        let o = s.offloads;
        pb::StatusReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            mode: mode.to_owned(),
            uptime_secs: self.uptime_secs(),
            underlay_addr: self.underlay.addr.to_string(),
            underlay_interface: self.underlay.interface.clone(),
            underlay_mtu: Some(self.underlay_mtu()),
            vxlan_port: Some(u32::from(s.vxlan_port)),
            source_ports: s.source_ports.to_string(),
            allocation_counting: dataplane::alloc_count::is_installed(),
            offloads: Some(pb::Offloads { tap: o.tap, udp_gso: o.udp_gso, udp_gro: o.udp_gro, coalesce: o.coalesce }),
            networks,
            counters: Some(self.counters().await),
            cluster: None,
            dataplane_threads: if split { 2 } else { 1 },
            dataplane_threads_setting: s.dataplane_threads.as_str().into(),
            dataplane_loop_switches: switches,
        }
    }

    /// The dataplane's counters, with the firewall's drops among the drop reasons.
    async fn counters(&self) -> pb::Counters {
        let mut c = counters(&self.dataplane.counters().snapshot());
        match self.firewall.counters().await {
            Ok(fw) => c.dropped.extend(fw),
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "cannot read the firewall's counters"),
        }
        c
    }

    /// `overlayd fdb`.
    pub async fn fdb(&self) -> pb::FdbReply {
        let tables = self.dataplane.tables();
        let learned = self.dataplane.learned();
        let now = self.dataplane.now_secs();
        let nets = self.networks().await;
        let networks = nets
            .values()
            .filter_map(|n| {
                let (_, t) = tables.by_vni(n.spec.vni)?;
                // A cluster network's entries are the endpoints gossip reports.
                let origin = if n.spec.gateway.is_some() { "gossip" } else { "static" };
                let mut fdb: Vec<pb::FdbEntry> = t
                    .fdb_entries()
                    .map(|(mac, vtep)| pb::FdbEntry {
                        mac: mac.to_string(),
                        vtep: vtep.to_string(),
                        origin: origin.into(),
                        ..Default::default()
                    })
                    .chain(learned.entries().filter(|(v, ..)| *v == n.spec.vni).map(|(_, mac, vtep, seen)| {
                        pb::FdbEntry {
                            mac: mac.to_string(),
                            vtep: vtep.to_string(),
                            origin: "learned".into(),
                            age_secs: Some(now.saturating_sub(seen)),
                        }
                    }))
                    .collect();
                fdb.sort_by(|a, b| (&a.mac, &a.origin).cmp(&(&b.mac, &b.origin)));
                let mut arp: Vec<pb::ArpEntry> = t
                    .arp_entries()
                    .map(|(ip, mac)| pb::ArpEntry { ip: ip.to_string(), mac: mac.to_string() })
                    .collect();
                arp.sort_by_key(|e| e.ip.parse::<Ipv4Addr>().ok());
                let mut blocks: Vec<(Ipv4Addr, pb::BlockEntry)> = t
                    .block_entries()
                    .map(|(base, prefix, owner)| {
                        let (vtep, down) = match owner {
                            BlockOwner::Local => (String::new(), false),
                            BlockOwner::Remote(v) => (v.to_string(), false),
                            BlockOwner::Down(v) => (v.to_string(), true),
                        };
                        let local = matches!(owner, BlockOwner::Local);
                        (base, pb::BlockEntry { cidr: format!("{base}/{prefix}"), vtep, down, local })
                    })
                    .collect();
                blocks.sort_by_key(|(b, _)| *b);
                Some(pb::NetworkFdb {
                    name: n.spec.name.clone(),
                    vni: n.spec.vni.get(),
                    flood_list: t.flood_list().iter().map(ToString::to_string).collect(),
                    fdb,
                    arp,
                    blocks: blocks.into_iter().map(|(_, b)| b).collect(),
                    local_block: n.spec.gateway.map(|g| g.local_block.to_string()).unwrap_or_default(),
                })
            })
            .collect();
        pb::FdbReply { networks }
    }
}

/// The bound endpoints of `network`: (MAC, address).
fn local_endpoints(bindings: &Bindings, network: &str) -> Vec<(MacAddr, Ipv4Addr)> {
    bindings.get(network).into_iter().flat_map(|p| p.values().copied()).collect()
}

/// A network's counters as the local API carries them.
fn network_counters(c: &dataplane::NetworkCountersSnapshot) -> pb::NetworkCounters {
    pb::NetworkCounters {
        tx_frames: c.tx_frames,
        tx_bytes: c.tx_bytes,
        rx_frames: c.rx_frames,
        rx_bytes: c.rx_bytes,
        dropped: c.dropped.clone(),
    }
}

/// Counters as the local API carries them.
pub fn counters(c: &dataplane::CountersSnapshot) -> pb::Counters {
    let values = serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v.as_u64()?))).collect())
        .unwrap_or_default();
    pb::Counters { values, dropped: c.dropped.clone().into_iter().collect() }
}
