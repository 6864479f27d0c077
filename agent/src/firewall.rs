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
//!   (the `gateway_services` chain: empty until DNS).
//! - `table bridge overlayd`: each endpoint's host-side veth has a chain (`port-<veth>`, found
//!   by a verdict map on the input port) that drops frames whose Ethernet source, IPv4 source,
//!   ARP sender or IPv6 source is not the endpoint's own, and VLAN-tagged frames (which would
//!   hide their addresses from these rules).
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
use dataplane::MacAddr;

/// The tables' name, in both families.
pub const TABLE: &str = "overlayd";

/// The named counters: (family, name, what it counts). Their names are the drop reasons
/// `overlayd status` shows.
pub const COUNTERS: &[(&str, &str, &str)] = &[
    ("inet", "vxlan_from_overlay", "datagrams from an overlay network to a VXLAN port or its source ports"),
    ("inet", "gossip_from_overlay", "datagrams from an overlay network to a gossip port"),
    ("inet", "control_from_overlay", "connections from an overlay network to a control port"),
    ("inet", "host_from_overlay", "packets from a cluster network to any other service of this host"),
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

/// overlayd's nftables tables on this host.
#[derive(Debug)]
pub struct Firewall {
    nft: PathBuf,
    /// The underlay interface: never treated as an overlay bridge, whatever a static
    /// configuration says.
    underlay: String,
}

impl Firewall {
    /// Creates the tables (or, after a crash, takes them over: their elements, port chains and
    /// counters stay, their fixed rules are rewritten).
    pub async fn install(underlay_interface: &str, services: &UnderlayServices) -> Result<Firewall> {
        let fw = Firewall { nft: nft_program(), underlay: underlay_interface.to_owned() };
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

    /// Guards a network's bridge: the underlay services are closed to it, and with
    /// `gateway` (a cluster network) the whole host but ping and `gateway_services`.
    pub async fn add_network(&self, bridge: &str, gateway: bool) -> Result<()> {
        if bridge == self.underlay {
            tracing::warn!(%bridge, "the network's bridge is the underlay interface: it is not firewalled as an overlay");
            return Ok(());
        }
        let mut s = format!("add element inet {TABLE} overlay_bridges {{ {} }}\n", quoted(bridge));
        if gateway {
            let _ = writeln!(s, "add element inet {TABLE} gateway_bridges {{ {} }}", quoted(bridge));
        }
        self.run(s).await.with_context(|| format!("cannot firewall the bridge {bridge}"))
    }

    /// Forgets a network's bridge.
    pub async fn remove_network(&self, bridge: &str) -> Result<()> {
        let mut s = String::new();
        for set in ["overlay_bridges", "gateway_bridges"] {
            // Added first, so that deleting cannot fail for want of the element.
            let _ = writeln!(s, "add element inet {TABLE} {set} {{ {} }}", quoted(bridge));
            let _ = writeln!(s, "delete element inet {TABLE} {set} {{ {} }}", quoted(bridge));
        }
        self.run(s).await.with_context(|| format!("cannot remove the firewall of the bridge {bridge}"))
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

    /// Removes an endpoint's port rules; rules already gone are fine.
    pub async fn unbind_port(&self, port: &str) -> Result<()> {
        self.run(unbind_port(port)).await.with_context(|| format!("cannot remove the firewall of the port {port}"))
    }

    /// Removes every port chain and bridge element not in `ports` and `bridges` (what a
    /// crashed daemon left for endpoints and networks that are gone).
    pub async fn retain(&self, ports: &BTreeSet<String>, bridges: &BTreeSet<String>) -> Result<()> {
        let listed = self.output(&["-j", "list", "table", "bridge", TABLE]).await?;
        let mut s = String::new();
        for chain in json_names(&listed, "chain") {
            if let Some(port) = chain.strip_prefix(PORT_CHAIN_PREFIX) {
                if !ports.contains(port) {
                    s.push_str(&unbind_port(port));
                }
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
        if s.is_empty() {
            return Ok(());
        }
        self.run(s).await.context("cannot remove stale firewall rules")
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
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(&nft)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot run {} (install nftables)", nft.display()))?;
            child.stdin.take().context("nft's standard input")?.write_all(script.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        })
        .await?
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

/// `nft` where distributions put it (a service's PATH may lack /usr/sbin), else from PATH.
fn nft_program() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

const PORT_CHAIN_PREFIX: &str = "port-";

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
    for set in ["overlay_bridges", "gateway_bridges"] {
        let _ = writeln!(s, "add set {t} {set} {{ type ifname; }}");
    }
    for set in ["vxlan_ports", "vxlan_source_ports", "gossip_ports", "control_ports"] {
        let _ = writeln!(s, "add set {t} {set} {{ type inet_service; flags interval; }}");
    }
    s.push_str(&service_ports(services));
    // The chains that others jump to first, then the base chains.
    let chains: [(&str, Option<&str>, Vec<String>); 5] = [
        (
            "underlay_services",
            None,
            vec![
                "udp dport @vxlan_ports counter name vxlan_from_overlay drop".into(),
                "udp dport @gossip_ports counter name gossip_from_overlay drop".into(),
                "tcp dport @control_ports counter name control_from_overlay drop".into(),
            ],
        ),
        // What overlayd serves on a network's gateway on purpose. Nothing yet: the DNS
        // resolver's `udp dport 53 accept` and `tcp dport 53 accept` go here.
        ("gateway_services", None, vec![]),
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
        (
            "input",
            Some("type filter hook input priority filter; policy accept;"),
            vec![
                "iifname @overlay_bridges udp dport @vxlan_source_ports counter name vxlan_from_overlay drop".into(),
                "iifname @overlay_bridges jump underlay_services".into(),
                "iifname @gateway_bridges goto from_gateway_network".into(),
            ],
        ),
        (
            "forward",
            Some("type filter hook forward priority filter; policy accept;"),
            // Not from one overlay bridge to another: with br_netfilter loaded, traffic bridged
            // between two containers passes this hook too, in and out on their bridge.
            vec!["iifname @overlay_bridges oifname != @overlay_bridges jump underlay_services".into()],
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
            "add rule bridge overlayd prerouting iifname vmap @ports",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
        // Every counter a rule names exists.
        for name in ["vxlan_from_overlay", "gossip_from_overlay", "control_from_overlay", "host_from_overlay"] {
            assert!(s.contains(&format!("add counter inet overlayd {name} ")), "{name}");
        }
        let table = s.find("add table bridge").unwrap();
        assert!(s.find("add counter bridge").unwrap() > table, "the bridge table comes before its counters");
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
