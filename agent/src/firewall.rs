//! overlayd's own nftables tables, the host's half of isolation (the dataplane checks frames
//! that cross hosts): nothing from an overlay network reaches the underlay services or the
//! host, and a container's bridge port passes only its endpoint's own MAC and addresses.
//!
//! Two tables, created when the host starts and deleted when it stops:
//! - `table inet overlayd`: packets that arrive on an overlay bridge (`iifname`, never the
//!   claimed source address) for the VXLAN port and its source ports, gossip or the control
//!   port are dropped, at input and when the host forwards them to another host; on a cluster
//!   network's bridge (it carries the gateway) everything else for the host is dropped too,
//!   except replies to what the host opened, ping, and what overlayd serves there on purpose
//!   (the `gateway_services` chain: DNS, UDP and TCP port 53, to the network's own gateway
//!   address only, from its own bridge only: the set `dns_gateways` of bridge . gateway).
//!   A resolver is reached only from its network's bridge and from the host itself: a query
//!   for a gateway's port 53 from anywhere else (the underlay, with a route to the gateway
//!   through this host; another network) is dropped first thing, so that it is no open
//!   resolver. And a query a container sends to one of the host's own resolvers (the set
//!   `dns_intercepted`, which the DNS shell keeps equal to the resolver's upstreams) is
//!   answered by its network's resolver instead (DNAT to the gateway of the bridge it came in
//!   on, the map `dns_redirect`), which answers the overlay's names and forwards the rest to
//!   those same resolvers: a container that kept the host's resolv.conf (Docker's embedded
//!   resolver forwards there) finds the overlay's names too.
//! - `table bridge overlayd`: each endpoint's host-side veth has a chain (`port-<veth>`, found
//!   by a verdict map on the input port) that drops frames whose Ethernet source, IPv4 source,
//!   ARP sender or IPv6 source is not the endpoint's own, and VLAN-tagged frames (which would
//!   hide their addresses from these rules).
//!
//! Egress, the way out of a cluster network (as flannel's `ipMasq` and swarm's
//! `docker_gwbridge`), is forwarding plus masquerade on the container's own host, in the inet
//! table too. Each cluster network up on the host has a chain `net-<bridge>` (found by the
//! verdict map `networks` on the forward hook's input interface): traffic routed from its bridge
//! to another overlay bridge is dropped (networks stay apart), to anything else accepted, or,
//! on an `--internal` network, dropped and counted. Routed into a cluster network's bridge from
//! elsewhere passes only what belongs to a connection from inside (established, related) or to
//! a port published on purpose (DNAT); the rest is dropped and counted. The chain `egress_nat`
//! (on the NAT postrouting hook) masquerades each egress network's subnet to whatever leaves
//! through a non-overlay interface, with the address of that interface: the outside sees the
//! container's host. None of this opens the host to its containers: what they send to the
//! host itself is input, closed as above. A network's chain goes when the network goes down on
//! the host, and everything with the tables when the host stops.
//!
//! A network's **mesh port** (`ovm-<network>`, the set `mesh_ports`; see `services::mesh`)
//! is how the connections a published port took in reach their replicas, and their answers
//! come back: the chain `mesh` passes through it exactly those (translated, DNAT) one way out
//! and back, and drops and counts the rest (`mesh_unsolicited`); nothing that comes in on it
//! is for the host (`mesh_to_host`). A container that sends to it reaches neither the host nor
//! anything beyond.
//!
//! Forwarding itself is the kernel's `net.ipv4.ip_forward` (the interface a reply comes in on
//! must forward, not only the bridge, so a per-interface setting would have to guess the
//! uplinks): turned on when the first network with egress comes up, if it was off, and left on
//! when overlayd stops, as Docker, podman and the CNI bridge plugin leave it. Turning it off
//! again would cut off whatever started relying on it meanwhile (Docker's own bridges, say);
//! overlayd's containers need no such guard, since the tables are gone with their bridges.
//!
//! Every drop is counted in a named counter of the table ([`COUNTERS`]), which `overlayd
//! status` shows with the dataplane's drops. Each change is one `nft -f -` script, applied by
//! the kernel as one transaction. Why the `nft` program and not netlink: nf_tables' netlink
//! protocol (expressions, sets, batches) has no maintained Rust implementation, and `nft` is
//! what every distribution ships with it; its scripts are also what an operator reads with
//! `nft list table inet overlayd`.
//!
//! A restart keeps what the tables hold (set elements, port chains, counters) and rewrites their
//! fixed rules, so a daemon that crashed leaves its containers no unguarded moment; the host
//! re-binds every endpoint it knows and [`Firewall::retain`] removes the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use control::cidr::Ipv4Cidr;
use dataplane::MacAddr;
use tokio::sync::Mutex;

/// The tables' name, in both families.
pub const TABLE: &str = "overlayd";

/// The named counters: (family, name, what it counts). Their names are the drop reasons
/// `overlayd status` shows.
pub const COUNTERS: &[(&str, &str, &str)] = &[
    ("inet", "vxlan_from_overlay", "datagrams from an overlay network to a VXLAN port or its source ports"),
    ("inet", "gossip_from_overlay", "datagrams from an overlay network to a gossip port"),
    ("inet", "control_from_overlay", "connections from an overlay network to a control port"),
    ("inet", "host_from_overlay", "packets from a cluster network to any other service of this host"),
    (
        "inet",
        "dns_from_elsewhere",
        "DNS queries to a network's resolver from elsewhere than that network's bridge or this host",
    ),
    ("inet", "between_networks", "packets routed from one overlay network to another"),
    ("inet", "egress_internal", "packets from an internal network to outside the overlay"),
    ("inet", "into_network", "packets routed into a cluster network from outside it, for no connection of its own"),
    ("inet", "mesh_to_host", "packets from a network's mesh port to this host itself"),
    ("inet", "mesh_unsolicited", "packets through a mesh port that belong to no connection a published port took in"),
    ("bridge", "spoofed_mac", "frames from a container with another Ethernet source than its own"),
    ("bridge", "spoofed_ip", "IPv4 packets from a container with another source address than its own"),
    ("bridge", "spoofed_arp", "ARP from a container whose sender is not its own MAC and address"),
    ("bridge", "spoofed_ipv6", "IPv6 from a container with another source than its link-local (or :: for DAD)"),
    ("bridge", "vlan_tagged", "VLAN-tagged frames from a container"),
];

/// What the inet table protects: this host's underlay services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlayServices {
    /// The VXLAN port.
    pub vxlan_port: u16,
    /// The source ports of the VXLAN sockets (first, last).
    pub source_ports: (u16, u16),
    /// Gossip ports (UDP): this host's and every other host's.
    pub gossip_ports: BTreeSet<u16>,
    /// Control ports (TCP): this host's and every other host's.
    pub control_ports: BTreeSet<u16>,
}

impl UnderlayServices {
    /// The defaults for gossip and control, with the given VXLAN sockets.
    pub fn new(vxlan_port: u16, source_ports: (u16, u16)) -> UnderlayServices {
        UnderlayServices {
            vxlan_port,
            source_ports,
            gossip_ports: [control::gossip::DEFAULT_PORT].into(),
            control_ports: [DEFAULT_CONTROL_PORT].into(),
        }
    }
}

/// The control port every host uses unless told otherwise.
pub const DEFAULT_CONTROL_PORT: u16 = 7947;

/// An endpoint's identity on its bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortBinding<'a> {
    /// The host-side veth.
    pub port: &'a str,
    /// The endpoint's MAC.
    pub mac: MacAddr,
    /// The endpoint's address.
    pub ip: Ipv4Addr,
}

/// What the firewall needs of a cluster network (one with its gateway on the bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayNetwork {
    /// Its gateway address: where its containers reach the DNS resolver.
    pub gateway: Ipv4Addr,
    /// Its subnet: what is masqueraded on the way out.
    pub subnet: Ipv4Cidr,
    /// Its containers may leave the overlay through this host (false: `--internal`).
    pub egress: bool,
}

/// overlayd's nftables tables on this host.
#[derive(Debug)]
pub struct Firewall {
    nft: PathBuf,
    /// The underlay interface: never treated as an overlay bridge, whatever a static
    /// configuration says.
    underlay: String,
    /// The subnets `egress_nat` masquerades, by bridge: each change rewrites the chain whole
    /// (its rules overlap nothing then, even with what a crashed daemon left).
    masquerade: Mutex<BTreeMap<String, Ipv4Cidr>>,
    /// The gateway of each cluster network's bridge, where DNS is open: each change rewrites
    /// the set `dns_gateways` whole, as `egress_nat`.
    gateways: Mutex<BTreeMap<String, Ipv4Addr>>,
}

impl Firewall {
    /// Creates the tables (or, after a crash, takes them over: their elements, port chains and
    /// counters stay, their fixed rules are rewritten).
    pub async fn install(underlay_interface: &str, services: &UnderlayServices) -> Result<Firewall> {
        let fw = Firewall {
            nft: nft_program(),
            underlay: underlay_interface.to_owned(),
            masquerade: Mutex::new(BTreeMap::new()),
            gateways: Mutex::new(BTreeMap::new()),
        };
        if let Err(first) = fw.run(skeleton(services)).await {
            // Tables an older overlayd made with another layout: start afresh.
            tracing::info!(error = %format!("{first:#}"), "rebuilding overlayd's nftables tables");
            fw.run(format!("{}{}", delete_tables(), skeleton(services))).await.context(
                "cannot create overlayd's nftables tables, which keep containers off the underlay and from \
                 spoofing each other (is nftables installed and the nf_tables module available?)",
            )?;
        }
        Ok(fw)
    }

    /// Guards a network's bridge: the underlay services are closed to it, and with `gateway`
    /// (a cluster network) the whole host but ping and `gateway_services` (DNS on its gateway),
    /// other networks, and with egress off everything outside the overlay; with egress on,
    /// what leaves the overlay is masqueraded. One transaction.
    pub async fn add_network(&self, bridge: &str, gateway: Option<GatewayNetwork>) -> Result<()> {
        if bridge == self.underlay {
            tracing::warn!(%bridge, "the network's bridge is the underlay interface: it is not firewalled as an overlay");
            return Ok(());
        }
        let mut s = format!("add element inet {TABLE} overlay_bridges {{ {} }}\n", quoted(bridge));
        let mut masquerade = self.masquerade.lock().await;
        let mut gateways = self.gateways.lock().await;
        let mut wanted = masquerade.clone();
        let mut wanted_gateways = gateways.clone();
        if let Some(g) = gateway {
            let _ = writeln!(s, "add element inet {TABLE} gateway_bridges {{ {} }}", quoted(bridge));
            s.push_str(&bind_network(bridge, g.egress));
            if g.egress {
                wanted.insert(bridge.to_owned(), g.subnet);
            } else {
                wanted.remove(bridge);
            }
            s.push_str(&egress_nat(&wanted));
            wanted_gateways.insert(bridge.to_owned(), g.gateway);
            s.push_str(&dns_gateways(&wanted_gateways));
        }
        self.run(s).await.with_context(|| format!("cannot firewall the bridge {bridge}"))?;
        *masquerade = wanted;
        *gateways = wanted_gateways;
        Ok(())
    }

    /// Forgets a network's bridge: its elements, its chain and its masquerade.
    pub async fn remove_network(&self, bridge: &str) -> Result<()> {
        let mut s = String::new();
        for set in ["overlay_bridges", "gateway_bridges"] {
            // Added first, so that deleting cannot fail for want of the element.
            let _ = writeln!(s, "add element inet {TABLE} {set} {{ {} }}", quoted(bridge));
            let _ = writeln!(s, "delete element inet {TABLE} {set} {{ {} }}", quoted(bridge));
        }
        s.push_str(&unbind_network(bridge));
        let mut masquerade = self.masquerade.lock().await;
        let mut gateways = self.gateways.lock().await;
        let mut wanted = masquerade.clone();
        wanted.remove(bridge);
        s.push_str(&egress_nat(&wanted));
        let mut wanted_gateways = gateways.clone();
        wanted_gateways.remove(bridge);
        s.push_str(&dns_gateways(&wanted_gateways));
        self.run(s).await.with_context(|| format!("cannot remove the firewall of the bridge {bridge}"))?;
        *masquerade = wanted;
        *gateways = wanted_gateways;
        Ok(())
    }

    /// Sets the gossip and control ports closed to the overlay (this host's and the others').
    pub async fn set_service_ports(&self, services: &UnderlayServices) -> Result<()> {
        self.run(service_ports(services)).await.context("cannot update the firewalled service ports")
    }

    /// Installs (or replaces) the rules of an endpoint's bridge port: only its MAC and
    /// addresses pass. Done before the port joins its bridge.
    pub async fn bind_port(&self, b: PortBinding<'_>) -> Result<()> {
        self.run(bind_port(b)).await.with_context(|| format!("cannot firewall the port {} of {}", b.port, b.ip))
    }

    /// Guards a network's mesh port (`ovm-<network>`, see `netdev::add_mesh_port`): what comes
    /// in on it is never for the host, and what passes it belongs to a connection a published
    /// port took in (DNAT), one way out and its answers back.
    pub async fn add_mesh_port(&self, port: &str) -> Result<()> {
        self.run(format!("add element inet {TABLE} mesh_ports {{ {} }}\n", quoted(port)))
            .await
            .with_context(|| format!("cannot firewall the mesh port {port}"))
    }

    /// Forgets a mesh port; one already gone is fine.
    pub async fn remove_mesh_port(&self, port: &str) -> Result<()> {
        let q = quoted(port);
        self.run(format!(
            "add element inet {TABLE} mesh_ports {{ {q} }}\ndelete element inet {TABLE} mesh_ports {{ {q} }}\n"
        ))
        .await
        .with_context(|| format!("cannot remove the firewall of the mesh port {port}"))
    }

    /// Removes an endpoint's port rules; rules already gone are fine.
    pub async fn unbind_port(&self, port: &str) -> Result<()> {
        self.run(unbind_port(port)).await.with_context(|| format!("cannot remove the firewall of the port {port}"))
    }

    /// Removes every port chain, bridge element and network chain not in `ports` and
    /// `bridges` (what a crashed daemon left for endpoints and networks that are gone), and
    /// masquerades only the subnets of the networks up now.
    pub async fn retain(&self, ports: &BTreeSet<String>, bridges: &BTreeSet<String>) -> Result<()> {
        let listed = self.output(&["-j", "list", "table", "bridge", TABLE]).await?;
        let mut s = String::new();
        for chain in json_names(&listed, "chain") {
            if let Some(port) = chain.strip_prefix(PORT_CHAIN_PREFIX)
                && !ports.contains(port)
            {
                s.push_str(&unbind_port(port));
            }
        }
        let listed = self.output(&["-j", "list", "set", "inet", TABLE, "overlay_bridges"]).await?;
        for bridge in json_set_elements(&listed) {
            if !bridges.contains(&bridge) {
                for set in ["overlay_bridges", "gateway_bridges"] {
                    let _ = writeln!(s, "add element inet {TABLE} {set} {{ {} }}", quoted(&bridge));
                    let _ = writeln!(s, "delete element inet {TABLE} {set} {{ {} }}", quoted(&bridge));
                }
            }
        }
        let listed = self.output(&["-j", "list", "chains", "inet"]).await?;
        let wanted_chains: BTreeSet<String> = bridges.iter().map(|b| network_chain(b)).collect();
        for chain in json_table_chains(&listed, "inet") {
            if let Some(bridge) = chain.strip_prefix(NETWORK_CHAIN_PREFIX)
                && !wanted_chains.contains(&chain)
            {
                s.push_str(&unbind_network(bridge));
            }
        }
        let mut masquerade = self.masquerade.lock().await;
        masquerade.retain(|bridge, _| bridges.contains(bridge));
        s.push_str(&egress_nat(&masquerade));
        let mut gateways = self.gateways.lock().await;
        gateways.retain(|bridge, _| bridges.contains(bridge));
        s.push_str(&dns_gateways(&gateways));
        self.run(s).await.context("cannot remove stale firewall rules")
    }

    /// Sets the host's resolvers whose queries from a cluster network's containers its own
    /// resolver answers instead (see the module doc).
    pub async fn set_dns_intercepted(&self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        self.run(dns_intercepted(addresses)).await.context("cannot set the DNS servers whose queries are intercepted")
    }

    /// Every named counter: drops by reason (packets).
    pub async fn counters(&self) -> Result<BTreeMap<String, u64>> {
        let listed = self.output(&["-j", "list", "counters"]).await?;
        Ok(json_counters(&listed))
    }

    /// Deletes both tables.
    pub async fn remove(&self) -> Result<()> {
        self.run(delete_tables()).await.context("cannot remove overlayd's nftables tables")
    }

    /// Runs `nft -f -` with `script`, on a blocking thread.
    async fn run(&self, script: String) -> Result<()> {
        let nft = self.nft.clone();
        tokio::task::spawn_blocking(move || load(&nft, &script)).await?
    }

    /// Runs `nft args` and returns what it printed.
    async fn output(&self, args: &[&str]) -> Result<String> {
        let nft = self.nft.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(&nft)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot run {} (install nftables)", nft.display()))?;
            if !out.status.success() {
                bail!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .await?
    }
}

/// Runs `nft -f -` with `script`, blocking, in the calling thread's network namespace (the
/// host's for [`Firewall`], a container's for the services' load balancer).
pub fn load(nft: &std::path::Path, script: &str) -> Result<()> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} (install nftables)", nft.display()))?;
    // An nft that fails early closes its input: its message says more than the broken pipe.
    let written = child.stdin.take().context("nft's standard input")?.write_all(script.as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    written.context("writing to nft")
}

/// `nft` where distributions put it (a service's PATH may lack /usr/sbin), else from PATH.
pub fn nft_program() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

const PORT_CHAIN_PREFIX: &str = "port-";
const NETWORK_CHAIN_PREFIX: &str = "net-";

/// The name of a cluster network's forward chain.
fn network_chain(bridge: &str) -> String {
    format!("{NETWORK_CHAIN_PREFIX}{}", bridge.replace(['"', '\\', '\n', ' '], "_"))
}

/// A cluster network's forward chain (where what its containers send to be routed is judged),
/// written anew, and its element in the `networks` map.
fn bind_network(bridge: &str, egress: bool) -> String {
    let t = format!("inet {TABLE}");
    let chain = network_chain(bridge);
    let q = quoted(bridge);
    let rules = [
        // Bridged within the network (with br_netfilter loaded, such frames pass this hook).
        format!("oifname {q} accept"),
        "oifname @overlay_bridges counter name between_networks drop".into(),
        if egress { "accept".into() } else { "counter name egress_internal drop".into() },
    ];
    let mut s = format!("add chain {t} {chain}\nflush chain {t} {chain}\n");
    for r in rules {
        let _ = writeln!(s, "add rule {t} {chain} {r}");
    }
    let _ = writeln!(s, "add element {t} networks {{ {q} : goto {chain} }}");
    s
}

/// Removes a cluster network's forward chain and its element; what is gone already is fine.
fn unbind_network(bridge: &str) -> String {
    let t = format!("inet {TABLE}");
    let chain = network_chain(bridge);
    let q = quoted(bridge);
    // Added first, so that deleting cannot fail for want of the element or the chain.
    format!(
        "add chain {t} {chain}\nadd element {t} networks {{ {q} : goto {chain} }}\ndelete element {t} networks {{ {q} }}\n\
         flush chain {t} {chain}\ndelete chain {t} {chain}\n"
    )
}

/// `egress_nat` rewritten whole: each subnet is masqueraded when it leaves through a
/// non-overlay interface for anywhere but itself.
fn egress_nat(subnets: &BTreeMap<String, Ipv4Cidr>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!("flush chain {t} egress_nat\n");
    for subnet in subnets.values() {
        let _ = writeln!(
            s,
            "add rule {t} egress_nat ip saddr {subnet} ip daddr != {subnet} oifname != @overlay_bridges masquerade"
        );
    }
    s
}

/// The set `dns_gateways` rewritten whole: each cluster network's bridge with its gateway
/// address, the only destination on it that `gateway_services` opens DNS to; and the map
/// `dns_redirect` (the same pairs), where intercepted queries go.
fn dns_gateways(gateways: &BTreeMap<String, Ipv4Addr>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!("flush set {t} dns_gateways\nflush set {t} dns_addresses\nflush map {t} dns_redirect\n");
    if !gateways.is_empty() {
        let elements: Vec<String> = gateways.iter().map(|(b, gw)| format!("{} . {gw}", quoted(b))).collect();
        let _ = writeln!(s, "add element {t} dns_gateways {{ {} }}", elements.join(", "));
        let redirect: Vec<String> = gateways.iter().map(|(b, gw)| format!("{} : {gw}", quoted(b))).collect();
        let _ = writeln!(s, "add element {t} dns_redirect {{ {} }}", redirect.join(", "));
        let addresses: BTreeSet<String> = gateways.values().map(ToString::to_string).collect();
        let _ =
            writeln!(s, "add element {t} dns_addresses {{ {} }}", addresses.into_iter().collect::<Vec<_>>().join(", "));
    }
    s
}

/// The set `dns_intercepted` rewritten whole.
fn dns_intercepted(addresses: &BTreeSet<Ipv4Addr>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!("flush set {t} dns_intercepted\n");
    if !addresses.is_empty() {
        let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "add element {t} dns_intercepted {{ {} }}", list.join(", "));
    }
    s
}

/// Turns IPv4 forwarding on if it is off (egress needs it; see the module doc for why it stays
/// on). Answers whether it was off.
pub fn enable_ipv4_forwarding() -> Result<bool> {
    const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(IP_FORWARD).with_context(|| format!("cannot read {IP_FORWARD}"))?;
    if now.trim() != "0" {
        return Ok(false);
    }
    std::fs::write(IP_FORWARD, "1").with_context(|| {
        format!("cannot turn on IPv4 forwarding ({IP_FORWARD}), which egress needs (is /proc/sys read-only here?)")
    })?;
    Ok(true)
}

fn quoted(ifname: &str) -> String {
    // Interface names cannot hold quotes or whitespace (the kernel refuses them), but a
    // configured name reaches here before any interface exists.
    format!("\"{}\"", ifname.replace(['"', '\\', '\n'], "_"))
}

fn delete_tables() -> String {
    // Each table is added first, so that deleting cannot fail for want of it.
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\nadd table bridge {TABLE}\ndelete table bridge {TABLE}\n"
    )
}

/// The tables with their fixed chains and rules. `add` leaves what exists (elements, port
/// chains, counters); the fixed chains are flushed and written anew.
fn skeleton(services: &UnderlayServices) -> String {
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    let _ = writeln!(s, "add table {t}\nadd table bridge {TABLE}");
    for (family, name, what) in COUNTERS {
        let _ = writeln!(s, "add counter {family} {TABLE} {name} {{ comment \"{what}\"; }}");
    }
    for set in ["overlay_bridges", "gateway_bridges", "mesh_ports"] {
        let _ = writeln!(s, "add set {t} {set} {{ type ifname; }}");
    }
    let _ = writeln!(s, "add map {t} networks {{ type ifname : verdict; }}");
    let _ = writeln!(s, "add set {t} dns_gateways {{ type ifname . ipv4_addr; }}");
    let _ = writeln!(s, "add set {t} dns_addresses {{ type ipv4_addr; }}");
    let _ = writeln!(s, "add map {t} dns_redirect {{ type ifname : ipv4_addr; }}");
    let _ = writeln!(s, "add set {t} dns_intercepted {{ type ipv4_addr; }}");
    // Written by each network change, never here: a restart keeps the masquerade in force
    // until the networks come back.
    let _ = writeln!(s, "add chain {t} egress_nat");
    for set in ["vxlan_ports", "vxlan_source_ports", "gossip_ports", "control_ports"] {
        let _ = writeln!(s, "add set {t} {set} {{ type inet_service; flags interval; }}");
    }
    s.push_str(&service_ports(services));
    // The chains that others jump to first, then the base chains.
    let chains: [(&str, Option<&str>, Vec<String>); 9] = [
        (
            "underlay_services",
            None,
            vec![
                "udp dport @vxlan_ports counter name vxlan_from_overlay drop".into(),
                "udp dport @gossip_ports counter name gossip_from_overlay drop".into(),
                "tcp dport @control_ports counter name control_from_overlay drop".into(),
            ],
        ),
        // What overlayd serves on a network's gateway on purpose: its DNS resolver, on the
        // gateway address of the bridge the query came in on (another network's gateway, or
        // an underlay address of the host, stays closed).
        (
            "gateway_services",
            None,
            vec![
                "iifname . ip daddr @dns_gateways udp dport 53 accept".into(),
                "iifname . ip daddr @dns_gateways tcp dport 53 accept".into(),
            ],
        ),
        (
            "from_gateway_network",
            None,
            vec![
                "ct state established,related accept".into(),
                "icmp type echo-request accept".into(),
                "icmpv6 type { echo-request, nd-neighbor-solicit, nd-neighbor-advert } accept".into(),
                "jump gateway_services".into(),
                "counter name host_from_overlay drop".into(),
            ],
        ),
        // A network's mesh port carries the connections published ports took in, to their
        // replicas and back, and nothing else: a container that sends to it reaches nothing.
        (
            "mesh",
            None,
            vec![
                "iifname @mesh_ports ct direction reply ct status dnat accept".into(),
                "oifname @mesh_ports ct direction original ct status dnat accept".into(),
                "ct state related accept".into(),
                "counter name mesh_unsolicited drop".into(),
            ],
        ),
        (
            "input",
            Some("type filter hook input priority filter; policy accept;"),
            vec![
                "iifname @mesh_ports counter name mesh_to_host drop".into(),
                "ip daddr @dns_addresses meta l4proto { tcp, udp } th dport 53 iifname != \"lo\" \
                 iifname . ip daddr != @dns_gateways counter name dns_from_elsewhere drop"
                    .into(),
                "iifname @overlay_bridges udp dport @vxlan_source_ports counter name vxlan_from_overlay drop".into(),
                "iifname @overlay_bridges jump underlay_services".into(),
                "iifname @gateway_bridges goto from_gateway_network".into(),
            ],
        ),
        // Routed into a cluster network from outside it: replies and what was published on
        // purpose (DNAT) only.
        (
            "into_gateway_network",
            None,
            vec![
                "ct state established,related accept".into(),
                "ct status dnat accept".into(),
                "iifname @overlay_bridges counter name between_networks drop".into(),
                "counter name into_network drop".into(),
            ],
        ),
        (
            "forward",
            Some("type filter hook forward priority filter; policy accept;"),
            vec![
                "iifname @mesh_ports goto mesh".into(),
                "oifname @mesh_ports goto mesh".into(),
                // Not from one overlay bridge to another: with br_netfilter loaded, traffic
                // bridged between two containers passes this hook too, in and out on their bridge.
                "iifname @overlay_bridges oifname != @overlay_bridges jump underlay_services".into(),
                // A cluster network's own chain decides what its containers send (egress).
                "iifname vmap @networks".into(),
                "oifname @gateway_bridges goto into_gateway_network".into(),
            ],
        ),
        // A container's query to one of the host's resolvers goes to its network's resolver.
        (
            "prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec![
                "iifname @gateway_bridges ip daddr @dns_intercepted meta l4proto { tcp, udp } th dport 53 \
                 dnat ip to iifname map @dns_redirect"
                    .into(),
            ],
        ),
        (
            "postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec!["jump egress_nat".into()],
        ),
    ];
    for (name, base, rules) in &chains {
        match base {
            Some(spec) => {
                let _ = writeln!(s, "add chain {t} {name} {{ {spec} }}");
            }
            None => {
                let _ = writeln!(s, "add chain {t} {name}");
            }
        }
        let _ = writeln!(s, "flush chain {t} {name}");
        for r in rules {
            let _ = writeln!(s, "add rule {t} {name} {r}");
        }
    }
    let b = format!("bridge {TABLE}");
    let _ = writeln!(s, "add map {b} ports {{ type ifname : verdict; }}");
    let _ = writeln!(s, "add chain {b} prerouting {{ type filter hook prerouting priority filter; policy accept; }}");
    let _ = writeln!(s, "flush chain {b} prerouting");
    let _ = writeln!(s, "add rule {b} prerouting iifname vmap @ports");
    s
}

fn service_ports(services: &UnderlayServices) -> String {
    let t = format!("inet {TABLE}");
    let list = |ports: &BTreeSet<u16>| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let (first, last) = services.source_ports;
    let mut s = String::new();
    for (set, elements) in [
        ("vxlan_ports", services.vxlan_port.to_string()),
        ("vxlan_source_ports", if first == last { first.to_string() } else { format!("{first}-{last}") }),
        ("gossip_ports", list(&services.gossip_ports)),
        ("control_ports", list(&services.control_ports)),
    ] {
        let _ = writeln!(s, "flush set {t} {set}");
        if !elements.is_empty() {
            let _ = writeln!(s, "add element {t} {set} {{ {elements} }}");
        }
    }
    s
}

/// The IPv6 link-local address the kernel gives an interface with `mac` (EUI-64).
fn link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

fn bind_port(b: PortBinding<'_>) -> String {
    let t = format!("bridge {TABLE}");
    let chain = format!("{PORT_CHAIN_PREFIX}{}", b.port.replace(['"', '\\', '\n', ' '], "_"));
    let (mac, ip) = (b.mac, b.ip);
    let ll = link_local(mac);
    // The target of a neighbour advertisement (and of a DAD solicitation) as nft compares raw
    // payload: one 128-bit number.
    let ll_raw = format!("0x{:032x}", u128::from(ll));
    let rules = [
        format!("ether saddr != {mac} counter name spoofed_mac drop"),
        "ether type { 8021q, 8021ad } counter name vlan_tagged drop".into(),
        format!("ether type arp arp saddr ether != {mac} counter name spoofed_arp drop"),
        // 0.0.0.0: an address-conflict probe (RFC 5227), which claims nothing.
        format!("ether type arp arp saddr ip != {{ {ip}, 0.0.0.0 }} counter name spoofed_arp drop"),
        format!("ether type ip ip saddr != {ip} counter name spoofed_ip drop"),
        // The unspecified source only for duplicate address detection and MLD reports.
        format!("ether type ip6 ip6 saddr != {{ ::, {ll} }} counter name spoofed_ipv6 drop"),
        "ether type ip6 ip6 saddr :: icmpv6 type != { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } \
         counter name spoofed_ipv6 drop"
            .into(),
        format!("ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != {ll_raw} counter name spoofed_ipv6 drop"),
        format!(
            "ether type ip6 ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 != {ll_raw} counter name spoofed_ipv6 drop"
        ),
    ];
    let mut s = format!("add chain {t} {chain}\nflush chain {t} {chain}\n");
    for r in rules {
        let _ = writeln!(s, "add rule {t} {chain} {r}");
    }
    let _ = writeln!(s, "add element {t} ports {{ {} : goto {chain} }}", quoted(b.port));
    s
}

fn unbind_port(port: &str) -> String {
    let t = format!("bridge {TABLE}");
    let chain = format!("{PORT_CHAIN_PREFIX}{}", port.replace(['"', '\\', '\n', ' '], "_"));
    let q = quoted(port);
    // Added first, so that deleting cannot fail for want of the element or the chain.
    format!(
        "add chain {t} {chain}\nadd element {t} ports {{ {q} : goto {chain} }}\ndelete element {t} ports {{ {q} }}\n\
         flush chain {t} {chain}\ndelete chain {t} {chain}\n"
    )
}

/// The names of the `kind` objects of overlayd's tables in `nft -j` output.
fn json_names(listed: &str, kind: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(listed).unwrap_or_default();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    items.iter().filter_map(|i| Some(i[kind]["name"].as_str()?.to_owned())).collect()
}

/// The names of the chains of overlayd's table of `family` in `nft -j list chains` output.
fn json_table_chains(listed: &str, family: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(listed).unwrap_or_default();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|i| &i["chain"])
        .filter(|c| c["table"] == TABLE && c["family"] == family)
        .filter_map(|c| Some(c["name"].as_str()?.to_owned()))
        .collect()
}

fn json_set_elements(listed: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(listed).unwrap_or_default();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|i| i["set"]["elem"].as_array().cloned())
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect()
}

fn json_counters(listed: &str) -> BTreeMap<String, u64> {
    let v: serde_json::Value = serde_json::from_str(listed).unwrap_or_default();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut out = BTreeMap::new();
    for c in items.iter().map(|i| &i["counter"]) {
        if c["table"] != TABLE || !COUNTERS.iter().any(|(f, n, _)| c["family"] == *f && c["name"] == *n) {
            continue;
        }
        if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) {
            *out.entry(name.to_owned()).or_default() += packets;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_passes_only_its_own_mac_and_addresses() {
        let ip = Ipv4Addr::new(10, 128, 0, 5);
        let s = bind_port(PortBinding { port: "ovl0123456789", mac: MacAddr::from_ipv4(ip), ip });
        for want in [
            "add chain bridge overlayd port-ovl0123456789\nflush chain bridge overlayd port-ovl0123456789\n",
            "ether saddr != 02:4f:0a:80:00:05 counter name spoofed_mac drop",
            "arp saddr ether != 02:4f:0a:80:00:05 counter name spoofed_arp drop",
            "arp saddr ip != { 10.128.0.5, 0.0.0.0 }",
            "ip saddr != 10.128.0.5 counter name spoofed_ip drop",
            "ip6 saddr != { ::, fe80::4f:aff:fe80:5 }",
            "@th,64,128 != 0xfe80000000000000004f0afffe800005",
            "add element bridge overlayd ports { \"ovl0123456789\" : goto port-ovl0123456789 }",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
        let u = unbind_port("ovl0123456789");
        assert!(u.ends_with("delete chain bridge overlayd port-ovl0123456789\n"), "{u}");
    }

    #[test]
    fn the_skeleton_keeps_what_exists_and_rewrites_its_rules() {
        let mut services = UnderlayServices::new(4789, (61_000, 61_015));
        services.gossip_ports.insert(7950);
        let s = skeleton(&services);
        assert!(!s.contains("delete"), "a restart keeps elements and port chains:\n{s}");
        for want in [
            "add element inet overlayd vxlan_ports { 4789 }",
            "add element inet overlayd vxlan_source_ports { 61000-61015 }",
            "add element inet overlayd gossip_ports { 7946, 7950 }",
            "add element inet overlayd control_ports { 7947 }",
            "flush chain inet overlayd input\n",
            "add rule inet overlayd input iifname @gateway_bridges goto from_gateway_network",
            "add rule inet overlayd forward iifname @overlay_bridges oifname != @overlay_bridges jump underlay_services",
            "add rule inet overlayd forward iifname vmap @networks\nadd rule inet overlayd forward oifname @gateway_bridges goto into_gateway_network\n",
            "add rule inet overlayd into_gateway_network ct state established,related accept",
            "add rule inet overlayd into_gateway_network counter name into_network drop",
            "add chain inet overlayd postrouting { type nat hook postrouting priority srcnat; policy accept; }",
            "add rule inet overlayd postrouting jump egress_nat",
            "add rule bridge overlayd prerouting iifname vmap @ports",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
        assert!(!s.contains("flush chain inet overlayd egress_nat"), "a restart keeps the masquerade:\n{s}");
        // Every counter a rule names exists.
        for name in [
            "vxlan_from_overlay",
            "gossip_from_overlay",
            "control_from_overlay",
            "host_from_overlay",
            "dns_from_elsewhere",
            "between_networks",
            "egress_internal",
            "into_network",
        ] {
            assert!(s.contains(&format!("add counter inet overlayd {name} ")), "{name}");
        }
        let table = s.find("add table bridge").unwrap();
        assert!(s.find("add counter bridge").unwrap() > table, "the bridge table comes before its counters");
    }

    #[test]
    fn a_network_leaves_the_overlay_only_with_egress_and_never_into_another() {
        let egress = bind_network("ovbr-web", true);
        for want in [
            "add chain inet overlayd net-ovbr-web\nflush chain inet overlayd net-ovbr-web\n",
            "add rule inet overlayd net-ovbr-web oifname \"ovbr-web\" accept\n\
             add rule inet overlayd net-ovbr-web oifname @overlay_bridges counter name between_networks drop\n\
             add rule inet overlayd net-ovbr-web accept\n",
            "add element inet overlayd networks { \"ovbr-web\" : goto net-ovbr-web }",
        ] {
            assert!(egress.contains(want), "{want:?} not in\n{egress}");
        }
        let internal = bind_network("ovbr-db", false);
        assert!(
            internal.contains("add rule inet overlayd net-ovbr-db counter name egress_internal drop\n"),
            "{internal}"
        );
        assert!(!internal.contains("net-ovbr-db accept"), "{internal}");
        let gone = unbind_network("ovbr-web");
        assert!(gone.ends_with("delete chain inet overlayd net-ovbr-web\n"), "{gone}");
        assert!(gone.contains("delete element inet overlayd networks { \"ovbr-web\" }"), "{gone}");

        let subnets: BTreeMap<String, Ipv4Cidr> = [
            ("ovbr-a".to_owned(), "10.128.0.0/16".parse().unwrap()),
            ("ovbr-b".to_owned(), "10.129.0.0/16".parse().unwrap()),
        ]
        .into();
        assert_eq!(
            egress_nat(&subnets),
            "flush chain inet overlayd egress_nat\n\
             add rule inet overlayd egress_nat ip saddr 10.128.0.0/16 ip daddr != 10.128.0.0/16 oifname != @overlay_bridges masquerade\n\
             add rule inet overlayd egress_nat ip saddr 10.129.0.0/16 ip daddr != 10.129.0.0/16 oifname != @overlay_bridges masquerade\n"
        );
        assert_eq!(egress_nat(&BTreeMap::new()), "flush chain inet overlayd egress_nat\n");
    }

    #[test]
    fn dns_is_open_on_each_networks_own_gateway_only() {
        let s = skeleton(&UnderlayServices::new(4789, (61_000, 61_015)));
        for want in [
            "add set inet overlayd dns_gateways { type ifname . ipv4_addr; }",
            "add rule inet overlayd gateway_services iifname . ip daddr @dns_gateways udp dport 53 accept\n\
             add rule inet overlayd gateway_services iifname . ip daddr @dns_gateways tcp dport 53 accept\n",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
        assert!(
            !s.contains("flush set inet overlayd dns_gateways"),
            "a restart keeps the set until the networks are back"
        );
        let gateways: BTreeMap<String, Ipv4Addr> =
            [("ovbr-a".to_owned(), Ipv4Addr::new(10, 128, 0, 1)), ("ovbr-b".to_owned(), Ipv4Addr::new(10, 129, 0, 1))]
                .into();
        assert_eq!(
            dns_gateways(&gateways),
            "flush set inet overlayd dns_gateways\nflush set inet overlayd dns_addresses\nflush map inet overlayd dns_redirect\n\
             add element inet overlayd dns_gateways { \"ovbr-a\" . 10.128.0.1, \"ovbr-b\" . 10.129.0.1 }\n\
             add element inet overlayd dns_redirect { \"ovbr-a\" : 10.128.0.1, \"ovbr-b\" : 10.129.0.1 }\n\
             add element inet overlayd dns_addresses { 10.128.0.1, 10.129.0.1 }\n"
        );
        assert_eq!(
            dns_gateways(&BTreeMap::new()),
            "flush set inet overlayd dns_gateways\nflush set inet overlayd dns_addresses\nflush map inet overlayd dns_redirect\n"
        );
        assert!(
            s.contains(
                "add rule inet overlayd prerouting iifname @gateway_bridges ip daddr @dns_intercepted \
                 meta l4proto { tcp, udp } th dport 53 dnat ip to iifname map @dns_redirect\n"
            ),
            "queries to the host's resolvers go to the network's own: {s}"
        );
        assert!(!s.contains("flush set inet overlayd dns_intercepted"), "a restart keeps the set");
        let upstreams: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(8, 8, 8, 8)].into();
        assert_eq!(
            dns_intercepted(&upstreams),
            "flush set inet overlayd dns_intercepted\nadd element inet overlayd dns_intercepted { 8.8.8.8, 192.0.2.53 }\n"
        );
        assert_eq!(dns_intercepted(&BTreeSet::new()), "flush set inet overlayd dns_intercepted\n");
        assert!(
            s.contains(
                "add rule inet overlayd input ip daddr @dns_addresses meta l4proto { tcp, udp } th dport 53 \
                 iifname != \"lo\" iifname . ip daddr != @dns_gateways counter name dns_from_elsewhere drop\n"
            ),
            "no open resolver: {s}"
        );
    }

    #[test]
    fn stale_network_chains_are_found_in_nft_json() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "inet", "table": "overlayd", "name": "net-ovbr-web", "handle": 9}},
            {"chain": {"family": "inet", "table": "overlayd", "name": "forward", "handle": 3}},
            {"chain": {"family": "inet", "table": "filter", "name": "net-ovbr-x", "handle": 1}}]}"#;
        assert_eq!(json_table_chains(listed, "inet"), ["net-ovbr-web", "forward"]);
    }

    #[test]
    fn counters_are_read_from_nft_json() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "bridge", "name": "spoofed_ip", "table": "overlayd", "packets": 7, "bytes": 9}},
            {"counter": {"family": "inet", "name": "vxlan_from_overlay", "table": "overlayd", "packets": 3, "bytes": 1}},
            {"counter": {"family": "inet", "name": "spoofed_ip", "table": "someone_else", "packets": 5, "bytes": 1}}]}"#;
        let c = json_counters(listed);
        assert_eq!(c, [("spoofed_ip".to_owned(), 7), ("vxlan_from_overlay".to_owned(), 3)].into());
    }

    #[test]
    fn link_local_is_eui_64() {
        let mac = MacAddr([0x02, 0x4f, 0x0a, 0x80, 0x00, 0x05]);
        assert_eq!(link_local(mac), "fe80::4f:aff:fe80:5".parse::<Ipv6Addr>().unwrap());
    }
}
