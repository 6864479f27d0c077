//! The static configuration: the local VTEP and each network's peers and static entries,
//! from a TOML file and command-line flags (flags win), validated before anything is created.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use dataplane::linux::{LoopThreads, Offloads};
use dataplane::{MacAddr, Vni};
use serde::Deserialize;

/// Longest network name, so that `ovbr-<name>` fits Linux's 15-character interface names.
pub const MAX_NAME_LEN: usize = 10;

/// `dataplane_threads` in the file: `1`, `2` or `"auto"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ThreadsSetting {
    Count(i64),
    Word(String),
}

impl ThreadsSetting {
    fn resolve(&self) -> Result<LoopThreads, String> {
        match self {
            ThreadsSetting::Count(n) => LoopThreads::parse(&n.to_string()),
            ThreadsSetting::Word(w) => LoopThreads::parse(w),
        }
    }
}

/// The file format (see `overlayd daemon --help`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub underlay_addr: Option<IpAddr>,
    pub underlay_mtu: Option<u32>,
    pub vxlan_port: Option<u16>,
    pub source_ports: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub offloads: Option<String>,
    pub dataplane_threads: Option<ThreadsSetting>,
    #[serde(default, rename = "network")]
    pub networks: Vec<FileNetwork>,
}

/// One `[[network]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNetwork {
    pub name: Option<String>,
    pub vni: u32,
    pub bridge: Option<String>,
    pub tap: Option<String>,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub peers: Vec<IpAddr>,
    pub learning: Option<bool>,
    /// MAC → VTEP.
    #[serde(default)]
    pub fdb: BTreeMap<String, IpAddr>,
    /// IPv4 → MAC.
    #[serde(default)]
    pub arp: BTreeMap<Ipv4Addr, String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// A network ready to be created.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NetworkConfig {
    pub name: String,
    pub vni: Vni,
    pub bridge: String,
    pub tap: String,
    /// `None`: underlay MTU minus the VXLAN overhead, known once the underlay is inspected.
    pub mtu: Option<u32>,
    pub peers: Vec<IpAddr>,
    pub learning: bool,
    pub fdb: Vec<(MacAddr, IpAddr)>,
    pub arp: Vec<(Ipv4Addr, MacAddr)>,
}

/// The whole validated daemon configuration. With networks it is static mode (and the
/// underlay address is known); without, the daemon waits for `init` or `join` (cluster mode).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StaticConfig {
    pub underlay_addr: Option<IpAddr>,
    pub underlay_mtu: Option<u32>,
    pub vxlan_port: u16,
    pub source_port_base: u16,
    pub source_port_count: u16,
    pub metrics_addr: Option<SocketAddr>,
    pub offloads: Offloads,
    pub dataplane_threads: LoopThreads,
    pub networks: Vec<NetworkConfig>,
}

impl StaticConfig {
    /// Whether this is static mode.
    pub fn is_static(&self) -> bool {
        !self.networks.is_empty()
    }

    /// VXLAN overhead for this underlay's address family.
    pub fn overhead(&self) -> u32 {
        crate::host::overhead(self.underlay_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
    }
}

/// Parses `FIRST-LAST` into (first, count).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range; write FIRST-LAST, e.g. 61000-61015");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(format!("{s:?}: the first port must be 1 or more and not above the last"));
    }
    let count = b - a + 1;
    if count > 1024 {
        return Err(format!("{s:?}: at most 1024 source ports (one socket each)"));
    }
    Ok((a, count))
}

/// Parses `MAC=VTEP`.
pub fn parse_fdb_entry(s: &str) -> Result<(MacAddr, IpAddr), String> {
    let (m, v) =
        s.split_once('=').ok_or_else(|| format!("{s:?}: write MAC=VTEP, e.g. 02:4f:0a:00:00:02=198.18.0.2"))?;
    let vtep = v.parse().map_err(|_| format!("{s:?}: {v:?} is not an IP address"))?;
    Ok((m.parse()?, vtep))
}

/// Parses `IP=MAC`.
pub fn parse_arp_entry(s: &str) -> Result<(Ipv4Addr, MacAddr), String> {
    let (i, m) = s.split_once('=').ok_or_else(|| format!("{s:?}: write IP=MAC, e.g. 10.0.0.2=02:4f:0a:00:00:02"))?;
    let ip = i.parse().map_err(|_| format!("{s:?}: {i:?} is not an IPv4 address"))?;
    Ok((ip, m.parse()?))
}

/// One network given by flags rather than the file.
#[derive(Debug, Default, Clone)]
pub struct FlagNetwork {
    pub vni: Option<Vni>,
    pub name: Option<String>,
    pub bridge: Option<String>,
    pub tap: Option<String>,
    pub mtu: Option<u32>,
    pub peers: Vec<IpAddr>,
    pub no_learning: bool,
    pub fdb: Vec<(MacAddr, IpAddr)>,
    pub arp: Vec<(Ipv4Addr, MacAddr)>,
}

/// Top-level settings given by flags (or their environment variables).
#[derive(Debug, Default, Clone)]
pub struct FlagSettings {
    pub underlay_addr: Option<IpAddr>,
    pub underlay_mtu: Option<u32>,
    pub vxlan_port: Option<u16>,
    pub source_ports: Option<(u16, u16)>,
    pub metrics_addr: Option<SocketAddr>,
    pub offloads: Option<Offloads>,
    pub dataplane_threads: Option<LoopThreads>,
    pub network: FlagNetwork,
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Merges file and flags and checks everything that can be checked before touching the host.
pub fn resolve(file: FileConfig, flags: FlagSettings) -> Result<StaticConfig> {
    let underlay_addr = flags.underlay_addr.or(file.underlay_addr);
    if let Some(a) = underlay_addr {
        ensure!(
            !a.is_unspecified() && !a.is_multicast(),
            "the underlay address {a} must be a unicast address of this host"
        );
    }
    let (source_port_base, source_port_count) = match (flags.source_ports, &file.source_ports) {
        (Some(r), _) => r,
        (None, Some(s)) => parse_port_range(s).map_err(|e| anyhow::anyhow!("source_ports in the config file: {e}"))?,
        (None, None) => (61_000, 16),
    };
    let vxlan_port = flags.vxlan_port.or(file.vxlan_port).unwrap_or(4789);
    ensure!(vxlan_port != 0, "the VXLAN port cannot be 0");
    let underlay_mtu = flags.underlay_mtu.or(file.underlay_mtu);

    let mut networks = Vec::new();
    for (i, n) in file.networks.into_iter().enumerate() {
        let what = format!("[[network]] #{} (vni {})", i + 1, n.vni);
        let vni = Vni::try_from(n.vni).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let fdb = n
            .fdb
            .iter()
            .map(|(m, v)| Ok((m.parse::<MacAddr>().map_err(|e| anyhow::anyhow!("{what}, fdb: {e}"))?, *v)))
            .collect::<Result<Vec<_>>>()?;
        let arp = n
            .arp
            .iter()
            .map(|(ip, m)| Ok((*ip, m.parse::<MacAddr>().map_err(|e| anyhow::anyhow!("{what}, arp: {e}"))?)))
            .collect::<Result<Vec<_>>>()?;
        networks.push(network(vni, n.name, n.bridge, n.tap, n.mtu, n.peers, n.learning.unwrap_or(true), fdb, arp));
    }
    let f = flags.network;
    match f.vni {
        Some(vni) => {
            networks.push(network(vni, f.name, f.bridge, f.tap, f.mtu, f.peers, !f.no_learning, f.fdb, f.arp));
        }
        None => ensure!(
            f.name.is_none()
                && f.bridge.is_none()
                && f.tap.is_none()
                && f.mtu.is_none()
                && f.peers.is_empty()
                && f.fdb.is_empty()
                && f.arp.is_empty()
                && !f.no_learning,
            "--name, --bridge, --tap, --mtu, --peer, --fdb, --arp and --no-learning describe a network: give its --vni too"
        ),
    }
    match (networks.is_empty(), underlay_addr) {
        (true, Some(_)) => bail!(
            "no network to serve: give one with --vni N --peer IP…, or several as [[network]] tables in a --config \
             file (for cluster mode, leave out --underlay-addr and use `overlayd init` or `overlayd join`)"
        ),
        (false, None) => bail!(
            "no underlay address: pass --underlay-addr IP (this host's address that other VTEPs send to), \
             set OVERLAYD_UNDERLAY_ADDR, or put underlay_addr = \"IP\" in the config file"
        ),
        _ => {}
    }

    let cfg = StaticConfig {
        underlay_addr,
        underlay_mtu,
        vxlan_port,
        source_port_base,
        source_port_count,
        metrics_addr: flags.metrics_addr.or(file.metrics_addr),
        offloads: match (flags.offloads, &file.offloads) {
            (Some(o), _) => o,
            (None, Some(s)) => Offloads::parse(s).map_err(|e| anyhow::anyhow!("offloads in the config file: {e}"))?,
            (None, None) => Offloads::default(),
        },
        dataplane_threads: match (flags.dataplane_threads, file.dataplane_threads) {
            (Some(t), _) => t,
            (None, Some(n)) => n.resolve().map_err(|e| anyhow::anyhow!("dataplane_threads in the config file: {e}"))?,
            (None, None) => LoopThreads::default(),
        },
        networks,
    };
    validate(&cfg)?;
    Ok(cfg)
}

#[allow(clippy::too_many_arguments)]
fn network(
    vni: Vni,
    name: Option<String>,
    bridge: Option<String>,
    tap: Option<String>,
    mtu: Option<u32>,
    peers: Vec<IpAddr>,
    learning: bool,
    fdb: Vec<(MacAddr, IpAddr)>,
    arp: Vec<(Ipv4Addr, MacAddr)>,
) -> NetworkConfig {
    let name = name.unwrap_or_else(|| vni.to_string());
    NetworkConfig {
        bridge: bridge.unwrap_or_else(|| format!("ovbr-{name}")),
        tap: tap.unwrap_or_else(|| format!("ovt-{name}")),
        name,
        vni,
        mtu,
        peers,
        learning,
        fdb,
        arp,
    }
}

fn validate(cfg: &StaticConfig) -> Result<()> {
    let family = |ip: &IpAddr| ip.is_ipv4();
    let underlay = cfg.underlay_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let (first, count) = (u32::from(cfg.source_port_base), u32::from(cfg.source_port_count));
    ensure!(
        !(first..first + count).contains(&u32::from(cfg.vxlan_port)) && first + count - 1 <= 65_535,
        "the source ports {first}-{} must not include the VXLAN port {} and must end at 65535 or below",
        first + count - 1,
        cfg.vxlan_port
    );
    let mut vnis = HashSet::new();
    let mut names = HashSet::new();
    let mut ifnames = HashSet::new();
    for n in &cfg.networks {
        let what = format!("network {:?} (vni {})", n.name, n.vni);
        ensure!(vnis.insert(n.vni), "{what}: VNI {} is configured twice", n.vni);
        ensure!(names.insert(n.name.clone()), "{what}: the name {:?} is used twice", n.name);
        ensure!(
            n.name.len() <= MAX_NAME_LEN && valid_ifname(&n.name),
            "{what}: a network name has 1 to {MAX_NAME_LEN} characters from a-z, A-Z, 0-9, '-', '_', '.'"
        );
        for dev in [&n.bridge, &n.tap] {
            ensure!(
                valid_ifname(dev),
                "{what}: {dev:?} is not a valid interface name (1-15 of a-z, A-Z, 0-9, '-', '_', '.')"
            );
            ensure!(ifnames.insert(dev.clone()), "{what}: the interface name {dev:?} is used twice");
        }
        if let Some(mtu) = n.mtu {
            ensure!(
                (68..=65_535 - cfg.overhead()).contains(&mtu),
                "{what}: MTU {mtu} is outside 68..={}",
                65_535 - cfg.overhead()
            );
        }
        for p in n.peers.iter().chain(n.fdb.iter().map(|(_, v)| v)) {
            ensure!(
                family(p) == family(&underlay),
                "{what}: VTEP {p} is not of the underlay's address family ({underlay})"
            );
            ensure!(*p != underlay, "{what}: VTEP {p} is this host's own underlay address");
            ensure!(!p.is_unspecified() && !p.is_multicast(), "{what}: VTEP {p} must be a unicast address");
        }
        for mac in n.fdb.iter().map(|(m, _)| m).chain(n.arp.iter().map(|(_, m)| m)) {
            ensure!(!mac.is_multicast(), "{what}: {mac} is a group address; static entries need unicast MACs");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(vni: u32, peers: &[&str]) -> FlagSettings {
        FlagSettings {
            underlay_addr: Some("198.18.0.1".parse().unwrap()),
            network: FlagNetwork {
                vni: Some(Vni::new(vni).unwrap()),
                peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn flags_alone_make_one_network_with_defaults() {
        let c = resolve(FileConfig::default(), flags(100, &["198.18.0.2"])).unwrap();
        assert_eq!(c.vxlan_port, 4789);
        assert_eq!((c.source_port_base, c.source_port_count), (61_000, 16));
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.bridge.as_str(), n.tap.as_str()), ("100", "ovbr-100", "ovt-100"));
        assert!(n.learning);
    }

    #[test]
    fn the_file_and_flags_combine() {
        let file: FileConfig = toml::from_str(
            r#"
            underlay_addr = "198.18.0.9"
            vxlan_port = 4790
            [[network]]
            name = "blue"
            vni = 200
            peers = ["198.18.0.3"]
            learning = false
            fdb = { "02:4f:0a:00:00:03" = "198.18.0.3" }
            arp = { "10.0.0.3" = "02:4f:0a:00:00:03" }
            "#,
        )
        .unwrap();
        let c = resolve(file, flags(100, &["198.18.0.2"])).unwrap();
        assert_eq!(c.underlay_addr, Some("198.18.0.1".parse::<IpAddr>().unwrap()), "the flag wins");
        assert_eq!(c.vxlan_port, 4790);
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks[0].bridge, "ovbr-blue");
        assert_eq!(c.networks[0].fdb.len(), 1);
        assert!(!c.networks[0].learning);
    }

    #[test]
    fn mistakes_are_refused_with_what_to_fix() {
        let e = |f: FileConfig, s: FlagSettings| resolve(f, s).unwrap_err().to_string();
        let mut no_addr = flags(1, &[]);
        no_addr.underlay_addr = None;
        assert!(e(FileConfig::default(), no_addr).contains("--underlay-addr"));
        let mut no_net = flags(1, &[]);
        no_net.network = FlagNetwork::default();
        assert!(e(FileConfig::default(), no_net).contains("--vni"));
        let cluster = resolve(FileConfig::default(), FlagSettings::default()).unwrap();
        assert!(!cluster.is_static(), "nothing static: cluster mode");
        assert!(e(FileConfig::default(), flags(1, &["198.18.0.1"])).contains("own underlay address"));
        assert!(e(FileConfig::default(), flags(1, &["fd00::2"])).contains("address family"));
        let mut dup = FileConfig::default();
        dup.networks.push(FileNetwork { vni: 1, name: Some("x".into()), ..Default::default() });
        assert!(e(dup, flags(1, &[])).contains("configured twice"));
        let mut long = flags(1, &[]);
        long.network.name = Some("averyverylongname".into());
        assert!(e(FileConfig::default(), long).contains("1 to 10 characters"));
        let unknown = toml::from_str::<FileConfig>("underlay_adr = \"1.2.3.4\"").unwrap_err().to_string();
        assert!(unknown.contains("unknown field"), "{unknown}");
        assert!(parse_port_range("5-1").is_err() && parse_port_range("x").is_err());
        assert_eq!(parse_port_range("61000-61015"), Ok((61_000, 16)));
        assert!(parse_fdb_entry("02:4f:0a:00:00:02").unwrap_err().contains("MAC=VTEP"));
        assert!(parse_arp_entry("10.0.0.2=zz").is_err());
        let three = FileConfig { dataplane_threads: Some(ThreadsSetting::Count(3)), ..Default::default() };
        assert!(e(three, flags(1, &[])).contains("dataplane_threads in the config file"));
    }

    #[test]
    fn hot_loop_threads_come_from_the_flag_then_the_file() {
        let file = FileConfig { dataplane_threads: Some(ThreadsSetting::Count(1)), ..Default::default() };
        let c = resolve(FileConfig::default(), flags(1, &[])).unwrap();
        assert_eq!(c.dataplane_threads, LoopThreads::Auto, "one thread while idle, two under load, by default");
        let auto: FileConfig = toml::from_str("dataplane_threads = \"auto\"").unwrap();
        assert_eq!(resolve(auto, flags(1, &[])).unwrap().dataplane_threads, LoopThreads::Auto);
        let two: FileConfig = toml::from_str("dataplane_threads = 2").unwrap();
        assert_eq!(resolve(two, flags(1, &[])).unwrap().dataplane_threads, LoopThreads::PerDirection);
        let word: FileConfig = toml::from_str("dataplane_threads = \"many\"").unwrap();
        assert!(format!("{:#}", resolve(word, flags(1, &[])).unwrap_err()).contains("write auto"));
        assert_eq!(resolve(file, flags(1, &[])).unwrap().dataplane_threads, LoopThreads::One);
        let file = FileConfig { dataplane_threads: Some(ThreadsSetting::Count(1)), ..Default::default() };
        let mut two = flags(1, &[]);
        two.dataplane_threads = Some(LoopThreads::PerDirection);
        assert_eq!(resolve(file, two).unwrap().dataplane_threads, LoopThreads::PerDirection, "the flag wins");
    }
}
