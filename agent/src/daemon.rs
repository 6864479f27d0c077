//! `overlayd daemon`: sets up the host (bridge and TAP per network), starts the dataplane,
//! programs its tables from the static configuration, answers the CLI, and on SIGTERM or
//! SIGINT removes everything it created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dataplane::linux::{Dataplane, DataplaneConfig};
use dataplane::tables::NetworkSettings;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{self, ArpEntry, FdbEntry, FdbReport, NetworkFdb, NetworkStatus, StatusReport};
use crate::config::{NetworkConfig, StaticConfig};
use crate::netdev::{self, Bridge};

/// A network as it runs.
struct RunningNetwork {
    config: NetworkConfig,
    mtu: u32,
    bridge: Bridge,
}

/// What the API handlers read.
struct Agent {
    config: StaticConfig,
    dataplane: Dataplane,
    networks: Vec<RunningNetwork>,
    underlay_interface: String,
    underlay_mtu: u32,
    started: Instant,
}

impl Agent {
    fn status(&self) -> StatusReport {
        let tables = self.dataplane.tables();
        let learned = self.dataplane.learned();
        let networks = self
            .networks
            .iter()
            .map(|n| {
                let t = tables.by_vni(n.config.vni).map(|(_, t)| t);
                NetworkStatus {
                    name: n.config.name.clone(),
                    vni: n.config.vni,
                    bridge: n.bridge.name.clone(),
                    tap: n.config.tap.clone(),
                    tap_offloads: t
                        .map(|t| t.port().offloads())
                        .map(|o| match (o.vnet_hdr, o.uso) {
                            (false, _) => "none".to_owned(),
                            (true, false) => "csum,tso".to_owned(),
                            (true, true) => "csum,tso,uso".to_owned(),
                        })
                        .unwrap_or_default(),
                    mtu: n.mtu,
                    learning: n.config.learning,
                    flood_list: t.map(|t| t.flood_list().to_vec()).unwrap_or_default(),
                    fdb_entries: t.map_or(0, |t| t.fdb_entries().count()),
                    learned_entries: learned.entries().filter(|(v, ..)| *v == n.config.vni).count(),
                    arp_entries: t.map_or(0, |t| t.arp_entries().count()),
                }
            })
            .collect();
        let c = &self.config;
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            mode: "static".to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            underlay_addr: c.underlay_addr,
            underlay_interface: self.underlay_interface.clone(),
            underlay_mtu: self.underlay_mtu,
            vxlan_port: c.vxlan_port,
            source_ports: format!("{}-{}", c.source_port_base, c.source_port_base + (c.source_port_count - 1)),
            allocation_counting: dataplane::alloc_count::is_installed(),
            offloads: self.dataplane.config().offloads,
            networks,
            counters: self.dataplane.counters().snapshot(),
        }
    }

    fn fdb(&self) -> FdbReport {
        let tables = self.dataplane.tables();
        let learned = self.dataplane.learned();
        let now = self.dataplane.now_secs();
        let networks = self
            .networks
            .iter()
            .filter_map(|n| {
                let (_, t) = tables.by_vni(n.config.vni)?;
                let mut fdb: Vec<FdbEntry> = t
                    .fdb_entries()
                    .map(|(mac, vtep)| FdbEntry { mac, vtep, origin: "static".into(), age_secs: None })
                    .chain(learned.entries().filter(|(v, ..)| *v == n.config.vni).map(|(_, mac, vtep, seen)| {
                        FdbEntry { mac, vtep, origin: "learned".into(), age_secs: Some(now.saturating_sub(seen)) }
                    }))
                    .collect();
                fdb.sort_by_key(|e| (e.mac, e.origin.clone()));
                let mut arp: Vec<ArpEntry> = t.arp_entries().map(|(ip, mac)| ArpEntry { ip, mac }).collect();
                arp.sort_by_key(|e| e.ip);
                Some(NetworkFdb {
                    name: n.config.name.clone(),
                    vni: n.config.vni,
                    flood_list: t.flood_list().to_vec(),
                    fdb,
                    arp,
                })
            })
            .collect();
        FdbReport { networks }
    }
}

/// Creates (0700) or checks the state dir, and makes sure no other daemon uses it.
fn claim_state_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict the state dir {} to its owner", dir.display()))?;
    let sock = api::socket_path(dir);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "another overlayd daemon is running with the state dir {}: stop it first, or give this one its own --state-dir",
            dir.display()
        );
    }
    match std::fs::remove_file(&sock) {
        Ok(()) => {
            tracing::info!(socket = %sock.display(), "removed a stale socket left by an earlier daemon")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove the stale socket {}", sock.display()));
        }
    }
    Ok(sock)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: StaticConfig, state_dir: PathBuf) -> Result<()> {
    // Watch the signals first: from here on SIGTERM means "clean up and leave", even mid-setup.
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let sock = claim_state_dir(&state_dir)?;
    let nl = netdev::connect()?;
    let (underlay_interface, detected_mtu) = netdev::underlay_mtu(&nl, config.underlay_addr).await?;
    let underlay_mtu = config.underlay_mtu.unwrap_or(detected_mtu);
    tracing::info!(addr = %config.underlay_addr, interface = %underlay_interface, mtu = underlay_mtu, "underlay");

    let mut dp_config = DataplaneConfig::new(config.underlay_addr);
    dp_config.port = config.vxlan_port;
    dp_config.source_port_base = config.source_port_base;
    dp_config.source_port_count = config.source_port_count;
    dp_config.offloads = config.offloads;
    let dataplane = Dataplane::start(dp_config).with_context(|| {
        format!(
            "cannot start the dataplane on {}:{} (is another VXLAN endpoint, overlayd or a kernel vxlan device, \
             using this port or the source ports {}-{} on this host?)",
            config.underlay_addr,
            config.vxlan_port,
            config.source_port_base,
            config.source_port_base + (config.source_port_count - 1)
        )
    })?;

    let mut agent =
        Agent { config, dataplane, networks: Vec::new(), underlay_interface, underlay_mtu, started: Instant::now() };
    let setup = tokio::select! {
        r = setup_networks(&mut agent, &nl) => r,
        _ = term.recv() => Err(anyhow::anyhow!("SIGTERM during setup")),
        _ = int.recv() => Err(anyhow::anyhow!("SIGINT during setup")),
    };
    let agent = Arc::new(agent);
    let result = match setup {
        Ok(()) => {
            tokio::select! {
                r = serve(Arc::clone(&agent), &sock) => r,
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
            }
        }
        Err(e) => Err(e),
    };

    // Teardown runs whatever happened above: the TAPs close with the dataplane, then the
    // bridges overlayd created go.
    agent.dataplane.shutdown();
    for n in agent.networks.iter().filter(|n| n.bridge.owned) {
        match netdev::delete_link(&nl, &n.bridge.name).await {
            Ok(()) => tracing::info!(bridge = %n.bridge.name, "removed bridge"),
            Err(e) => {
                tracing::warn!(bridge = %n.bridge.name, error = %format!("{e:#}"), "could not remove bridge")
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    result
}

async fn setup_networks(agent: &mut Agent, nl: &rtnetlink::Handle) -> Result<()> {
    for net in agent.config.networks.clone() {
        let what = format!("network {:?} (vni {})", net.name, net.vni);
        setup_network(agent, nl, net).await.with_context(|| format!("cannot set up {what}"))?;
    }
    Ok(())
}

async fn setup_network(agent: &mut Agent, nl: &rtnetlink::Handle, net: NetworkConfig) -> Result<()> {
    let overhead = agent.config.overhead();
    let mtu = match net.mtu {
        Some(m) => {
            if m + overhead > agent.underlay_mtu {
                tracing::warn!(
                    network = %net.name, mtu = m, underlay_mtu = agent.underlay_mtu,
                    "MTU + {overhead} bytes of VXLAN overhead exceeds the underlay MTU: full-size frames will be fragmented"
                );
            }
            m
        }
        None => agent.underlay_mtu.checked_sub(overhead).filter(|m| *m >= 68).with_context(|| {
            format!(
                "the underlay MTU {} leaves no room for {overhead} bytes of VXLAN overhead; set --mtu",
                agent.underlay_mtu
            )
        })?,
    };
    let bridge = netdev::ensure_bridge(nl, &net.bridge, mtu).await?;
    // Record the bridge at once, so that teardown removes it even if a later step fails.
    agent.networks.push(RunningNetwork { config: net.clone(), mtu, bridge: bridge.clone() });
    let tap = agent.dataplane.open_tap(&net.tap).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow::anyhow!("the TAP {} is held by another process (another overlayd?): {e}", net.tap),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            anyhow::anyhow!("cannot create the TAP {}: {e}; overlayd needs CAP_NET_ADMIN (run it as root)", net.tap)
        }
        _ => anyhow::anyhow!("cannot create the TAP {}: {e}", net.tap),
    })?;
    netdev::attach_tap(nl, tap.name(), &bridge, mtu).await?;
    agent.dataplane.add_network(net.vni, tap, NetworkSettings { learning: net.learning, mtu })?;
    agent.dataplane.update(|tx| {
        tx.set_flood_list(net.vni, net.peers.iter().copied())?;
        for (mac, vtep) in &net.fdb {
            tx.set_fdb(net.vni, *mac, *vtep)?;
        }
        for (ip, mac) in &net.arp {
            tx.set_arp(net.vni, *ip, *mac)?;
        }
        Ok(())
    })?;
    tracing::info!(
        network = %net.name, vni = %net.vni, bridge = %bridge.name, tap = %net.tap, mtu,
        peers = net.peers.len(), fdb = net.fdb.len(), arp = net.arp.len(), learning = net.learning,
        "network up"
    );
    Ok(())
}

async fn serve(agent: Arc<Agent>, sock: &Path) -> Result<()> {
    let api_agent = Arc::clone(&agent);
    let api = api::serve(sock, move |req| {
        Ok(match req {
            api::Request::Status => serde_json::to_value(api_agent.status())?,
            api::Request::Fdb => serde_json::to_value(api_agent.fdb())?,
        })
    });
    let metrics_agent = Arc::clone(&agent);
    let metrics = async move {
        match metrics_agent.config.metrics_addr {
            Some(addr) => {
                let a = Arc::clone(&metrics_agent);
                api::serve_metrics(addr, move || Ok(a.status())).await
            }
            None => std::future::pending().await,
        }
    };
    tracing::info!(socket = %sock.display(), networks = agent.networks.len(), "overlayd is ready");
    let watchdog_agent = Arc::clone(&agent);
    let watchdog = async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            if let Some(why) = watchdog_agent.dataplane.failure() {
                tracing::error!(%why, "a dataplane loop died; stopping so that the service manager restarts overlayd");
                bail!("the dataplane stopped: {why}");
            }
        }
    };
    tokio::select! {
        r = api => r,
        r = metrics => r,
        r = watchdog => r,
    }
}
