//! The daemon's configuration: its settings ([`DaemonSettings`]: one type, from flags and
//! environment over the config file over the defaults) and, in static mode, its networks
//! (from flags or `[[network]]` tables), validated before anything is created.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use dataplane::linux::DataplaneSettings;
use dataplane::{MacAddr, Vni};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest network name, so that `ovbr-<name>` fits Linux's 15-character interface names.
pub const MAX_NAME_LEN: usize = 10;

/// The daemon's settings, whatever its mode. Each is a flag, an `OVERLAYD_*` variable and a
/// key of the config file, by the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Args)]
#[serde(default)]
pub struct DaemonSettings {
    /// This host's underlay address in static mode: where other VTEPs send VXLAN to, and the
    /// source of ours (a cluster host's is given to `init` or `join`).
    #[arg(long, env = "OVERLAYD_UNDERLAY_ADDR", value_name = "IP")]
    pub underlay_addr: Option<IpAddr>,

    /// Underlay MTU [default: the MTU of the interface that holds the underlay address].
    #[arg(long, env = "OVERLAYD_UNDERLAY_MTU", value_name = "BYTES")]
    pub underlay_mtu: Option<u32>,

    /// Cluster mode: IP[:PORT] other hosts reach this one's control API at, for `init` and
    /// `join` that do not give --advertise-addr [default: this host's only global address,
    /// port 7947].
    #[arg(long, env = "OVERLAYD_ADVERTISE_ADDR", value_name = "ADDR")]
    pub advertise_addr: Option<String>,

    /// Cluster mode: IP[:PORT] the control API listens on [default: the advertise address and
    /// port; give 0.0.0.0 to listen on every address, e.g. behind NAT where the advertise
    /// address is not this host's].
    #[arg(long, env = "OVERLAYD_LISTEN_ADDR", value_name = "ADDR")]
    pub listen_addr: Option<String>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, env = "OVERLAYD_METRICS_ADDR", value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log filter: a level (error, warn, info, debug, trace), optionally with MODULE=LEVEL
    /// directives, e.g. `info,overlayd=debug`. Raft's own logs (openraft) show from warn unless
    /// named, e.g. `info,openraft=info`.
    #[arg(long, env = "OVERLAYD_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,

    /// Cluster mode: serve Docker's network and IPAM driver under this name, on
    /// /run/docker/plugins/NAME.sock (`docker network create -d NAME --ipam-driver NAME`); ""
    /// serves none.
    #[arg(long, env = "OVERLAYD_DOCKER_PLUGIN", default_value = "overlayd", value_name = "NAME")]
    pub docker_plugin: String,

    /// The Docker daemon the driver asks for container and network names, and makes the
    /// cluster's networks appear in.
    #[arg(long, env = "OVERLAYD_DOCKER_HOST", default_value = "unix:///run/docker.sock", value_name = "URL")]
    pub docker_host: String,

    /// Cluster mode: the TTL, in seconds, of the answers the embedded DNS resolver gives for
    /// containers' names (short, so that a container that went leaves clients' caches soon).
    #[arg(long, env = "OVERLAYD_DNS_TTL", default_value_t = resolver::answer::DEFAULT_TTL, value_name = "SECONDS")]
    pub dns_ttl: u32,

    /// Cluster mode: the resolv.conf whose nameservers the embedded DNS resolver forwards
    /// other names to (read again when it changes).
    #[arg(long, env = "OVERLAYD_DNS_UPSTREAMS_FILE", default_value = DEFAULT_DNS_UPSTREAMS_FILE, value_name = "FILE")]
    pub dns_upstreams_file: std::path::PathBuf,

    #[command(flatten)]
    #[serde(flatten)]
    pub dataplane: DataplaneSettings,
}

/// Where the embedded resolver finds its upstreams unless told.
pub const DEFAULT_DNS_UPSTREAMS_FILE: &str = "/etc/resolv.conf";

impl Default for DaemonSettings {
    fn default() -> DaemonSettings {
        DaemonSettings {
            underlay_addr: None,
            underlay_mtu: None,
            advertise_addr: None,
            listen_addr: None,
            metrics_addr: None,
            log: "info".into(),
            docker_plugin: "overlayd".into(),
            docker_host: "unix:///run/docker.sock".into(),
            dns_ttl: resolver::answer::DEFAULT_TTL,
            dns_upstreams_file: DEFAULT_DNS_UPSTREAMS_FILE.into(),
            dataplane: DataplaneSettings::default(),
        }
    }
}

/// One network given by flags rather than the file.
#[derive(Debug, Default, Clone, Args)]
#[command(next_help_heading = "One network from flags (use --config for several)")]
pub struct FlagNetwork {
    /// The network's VXLAN Network Identifier (1-16777215).
    #[arg(long, value_name = "VNI")]
    pub vni: Option<Vni>,

    /// Network name, used in device names [default: the VNI].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Bridge the containers attach to [default: ovbr-<name>]. An existing bridge is used and
    /// left in place on exit.
    #[arg(long, value_name = "IFNAME")]
    pub bridge: Option<String>,

    /// TAP device name [default: ovt-<name>].
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,

    /// MTU of the bridge and TAP [default: underlay MTU - 50 (IPv4) or - 70 (IPv6)].
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,

    /// A peer VTEP: receives this network's broadcast and unknown frames, and may send to it.
    /// Repeat for each peer.
    #[arg(long = "peer", value_name = "IP")]
    pub peers: Vec<IpAddr>,

    /// A static MAC → VTEP entry. Repeatable.
    #[arg(long = "fdb", value_name = "MAC=VTEP", value_parser = parse_fdb_entry)]
    pub fdb: Vec<(MacAddr, IpAddr)>,

    /// Answer ARP requests for IP with MAC, locally. Repeatable.
    #[arg(long = "arp", value_name = "IP=MAC", value_parser = parse_arp_entry)]
    pub arp: Vec<(Ipv4Addr, MacAddr)>,

    /// Do not learn MAC locations from the peers' traffic (static entries and flooding only).
    #[arg(long)]
    pub no_learning: bool,

    /// Encrypt the network with the pre-shared key in FILE: 64 hex digits (32 bytes; make one
    /// with `openssl rand -hex 32 > FILE && chmod 600 FILE`), the same file on every peer. Every
    /// datagram is sealed with AES-256-GCM; plaintext VXLAN (a kernel VTEP) is refused and
    /// counted. The file must not be readable by group or others. Default MTU: 32 less.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// The peers (`--peer`, `--fdb` VTEPs) take VXLAN remote checksum offload: overlayd agents,
    /// or kernel VTEPs made with `remcsumrx`. Segments of large TCP/UDP sends go to them with
    /// their inner checksum left for the receiver, which saves summing every byte on both
    /// sides. Leave it off for any other VTEP: RFC 7348 has no such bits, and a kernel VTEP
    /// without `remcsumrx` drops them.
    #[arg(long)]
    pub remote_checksum: bool,
}

/// One `[[network]]` table of the config file.
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
    /// A pre-shared key (see `--key-file`): the network is encrypted.
    pub key_file: Option<PathBuf>,
    /// The peers take VXLAN remote checksum offload (see `--remote-checksum`).
    #[serde(default)]
    pub remote_checksum: bool,
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
    /// The pre-shared key's file, for an encrypted network (read when the daemon starts).
    pub key_file: Option<PathBuf>,
    /// Its peers take VXLAN remote checksum offload.
    pub remote_checksum: bool,
}

/// The whole validated daemon configuration. With networks it is static mode (and the
/// underlay address is known); without, the daemon waits for `init` or `join` (cluster mode).
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub settings: DaemonSettings,
    pub networks: Vec<NetworkConfig>,
}

impl DaemonConfig {
    /// Whether this is static mode.
    pub fn is_static(&self) -> bool {
        !self.networks.is_empty()
    }

    /// VXLAN overhead for this underlay's address family.
    pub fn overhead(&self) -> u32 {
        crate::host::overhead(self.settings.underlay_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
    }
}

/// Reads the config file at `path` (if any) under the settings of the command line, whose
/// matches say which were given there or in the environment.
pub fn load(path: Option<&Path>, cli: DaemonSettings, given: &ArgMatches, flags: FlagNetwork) -> Result<DaemonConfig> {
    let Some(path) = path else { return resolve(cli, Vec::new(), flags) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    from_text(&text, cli, given, flags).with_context(|| format!("in the config file {}", path.display()))
}

/// [`load`] with the file's text.
fn from_text(text: &str, cli: DaemonSettings, given: &ArgMatches, flags: FlagNetwork) -> Result<DaemonConfig> {
    let mut table: toml::Table = toml::from_str(text)?;
    let networks: Vec<FileNetwork> = match table.remove("network") {
        Some(n) => n.try_into().context("[[network]]")?,
        None => Vec::new(),
    };
    resolve(layered(&cli, given, &table)?, networks, flags)
}

/// `cli` with each setting of `file` that was not given on the command line or in the
/// environment. A key that is not a setting, or a value of the wrong kind, is refused by name.
fn layered<T: Args + Serialize + DeserializeOwned>(cli: &T, given: &ArgMatches, file: &toml::Table) -> Result<T> {
    let command = T::augment_args(clap::Command::new("settings"));
    let known: Vec<&str> = command.get_arguments().map(|a| a.get_id().as_str()).collect();
    let serde_json::Value::Object(mut merged) = serde_json::to_value(cli)? else { bail!("settings are not a table") };
    for (key, value) in file {
        ensure!(
            known.contains(&key.as_str()),
            "unknown field {key:?}: the file takes {} and [[network]] tables",
            known.join(", ")
        );
        if matches!(given.value_source(key), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let mut one = merged.clone();
        one.insert(key.clone(), serde_json::to_value(value)?);
        serde_json::from_value::<T>(serde_json::Value::Object(one.clone()))
            .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        merged = one;
    }
    Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
}

/// `IP` or `IP:PORT` (`what` names the flag or argument in the error).
pub fn socket_addr(given: &str, default_port: u16, what: &str) -> Result<SocketAddr> {
    if let Ok(a) = given.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = given.parse().map_err(|_| anyhow::anyhow!("{what} {given:?} is not an IP address or IP:PORT"))?;
    Ok(SocketAddr::new(ip, default_port))
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

fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The settings with the networks of the file and of the flags, checked as far as they can be
/// before touching the host.
pub fn resolve(settings: DaemonSettings, file_networks: Vec<FileNetwork>, flags: FlagNetwork) -> Result<DaemonConfig> {
    if let Some(a) = settings.underlay_addr {
        ensure!(
            !a.is_unspecified() && !a.is_multicast(),
            "the underlay address {a} must be a unicast address of this host"
        );
    }
    if let Some(a) = &settings.advertise_addr {
        socket_addr(a, proto::DEFAULT_CONTROL_PORT, "the advertise address")?;
    }
    if let Some(a) = &settings.listen_addr {
        socket_addr(a, proto::DEFAULT_CONTROL_PORT, "--listen-addr")?;
    }
    let mut networks = Vec::new();
    for (i, n) in file_networks.into_iter().enumerate() {
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
        let mut net = network(vni, n.name, n.bridge, n.tap, n.mtu, n.peers, n.learning.unwrap_or(true), fdb, arp);
        net.key_file = n.key_file;
        net.remote_checksum = n.remote_checksum;
        networks.push(net);
    }
    let f = flags;
    match f.vni {
        Some(vni) => {
            let mut net = network(vni, f.name, f.bridge, f.tap, f.mtu, f.peers, !f.no_learning, f.fdb, f.arp);
            net.key_file = f.key_file;
            net.remote_checksum = f.remote_checksum;
            networks.push(net);
        }
        None => ensure!(
            f.name.is_none()
                && f.bridge.is_none()
                && f.tap.is_none()
                && f.mtu.is_none()
                && f.peers.is_empty()
                && f.fdb.is_empty()
                && f.arp.is_empty()
                && !f.no_learning
                && f.key_file.is_none()
                && !f.remote_checksum,
            "--name, --bridge, --tap, --mtu, --peer, --fdb, --arp, --no-learning, --key-file and --remote-checksum \
             describe a network: give its --vni too"
        ),
    }
    match (networks.is_empty(), settings.underlay_addr) {
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

    let cfg = DaemonConfig { settings, networks };
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
        key_file: None,
        remote_checksum: false,
    }
}

/// Reads a pre-shared network key: 64 hex digits (surrounding whitespace allowed), in a file
/// that neither group nor others may read.
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    ensure!(
        mode & 0o077 == 0,
        "the key file {} may be read by others (mode {mode:03o}): chmod 600 {}",
        path.display(),
        path.display()
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
    parse_key(text.trim()).with_context(|| format!("the key file {}", path.display()))
}

/// 32 bytes from 64 hex digits.
fn parse_key(hex: &str) -> Result<[u8; 32]> {
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "holds {} characters where a key is 64 hex digits (make one with `openssl rand -hex 32`)",
        hex.len()
    );
    let mut key = [0; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(key)
}

fn validate(cfg: &DaemonConfig) -> Result<()> {
    let family = |ip: &IpAddr| ip.is_ipv4();
    let underlay = cfg.settings.underlay_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let dp = &cfg.settings.dataplane;
    ensure!(dp.vxlan_port != 0, "the VXLAN port cannot be 0");
    ensure!(
        !dp.source_ports.contains(dp.vxlan_port),
        "the source ports {} must not include the VXLAN port {}",
        dp.source_ports,
        dp.vxlan_port
    );
    let plugin = &cfg.settings.docker_plugin;
    ensure!(
        plugin.len() <= 64
            && plugin.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !plugin.starts_with('.'),
        "docker_plugin {plugin:?}: use letters, digits, '-', '_' and '.' (it names a socket file), or \"\" for none"
    );
    let mut vnis = HashSet::new();
    let mut names = HashSet::new();
    let mut ifnames = HashSet::new();
    for n in &cfg.networks {
        let what = format!("network {:?} (vni {})", n.name, n.vni);
        ensure!(
            u32::from(n.vni) != 0,
            "{what}: VNI 0 is refused (a cluster never gives it, and many VTEPs take it as reserved): give one from 1 to {}",
            Vni::MAX
        );
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
                "{what}: MTU {mtu} is not between 68 and {}",
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
    use clap::{CommandFactory, FromArgMatches};
    use dataplane::linux::{LoopThreads, PortRange};

    use super::*;

    /// The configuration `overlayd daemon ARGS…` loads with a config file holding `file`.
    fn daemon(args: &[&str], file: &str) -> Result<DaemonConfig> {
        let argv = ["overlayd", "daemon"].into_iter().chain(args.iter().copied());
        let matches = crate::Cli::command().try_get_matches_from(argv)?;
        let crate::Command::Daemon(a) = crate::Cli::from_arg_matches(&matches)?.command else { unreachable!() };
        let given = matches.subcommand_matches("daemon").expect("the daemon's matches");
        from_text(file, a.settings, given, a.network)
    }

    fn static_flags(vni: &str, peers: &[&str]) -> Vec<String> {
        let mut v = vec!["--underlay-addr".to_owned(), "198.18.0.1".into(), "--vni".into(), vni.into()];
        for p in peers {
            v.extend(["--peer".to_owned(), (*p).to_owned()]);
        }
        v
    }

    fn with(v: &[String], more: &[&str]) -> Vec<String> {
        v.iter().cloned().chain(more.iter().map(|s| (*s).to_owned())).collect()
    }

    fn run(args: &[String], file: &str) -> Result<DaemonConfig> {
        daemon(&args.iter().map(String::as_str).collect::<Vec<_>>(), file)
    }

    fn err(args: &[String], file: &str) -> String {
        format!("{:#}", run(args, file).unwrap_err())
    }

    #[test]
    fn flags_alone_make_one_network_with_defaults() {
        let c = run(&static_flags("100", &["198.18.0.2"]), "").unwrap();
        assert_eq!(c.settings.dataplane.vxlan_port, 4789);
        assert_eq!(c.settings.dataplane.source_ports, PortRange { first: 61_000, count: 16 });
        let n = &c.networks[0];
        assert_eq!((n.name.as_str(), n.bridge.as_str(), n.tap.as_str()), ("100", "ovbr-100", "ovt-100"));
        assert!(n.learning);
    }

    #[test]
    fn the_file_and_flags_combine() {
        let file = r#"
            underlay_addr = "198.18.0.9"
            vxlan_port = 4790
            [[network]]
            name = "blue"
            vni = 200
            peers = ["198.18.0.3"]
            learning = false
            fdb = { "02:4f:0a:00:00:03" = "198.18.0.3" }
            arp = { "10.0.0.3" = "02:4f:0a:00:00:03" }
            "#;
        let c = run(&static_flags("100", &["198.18.0.2"]), file).unwrap();
        assert_eq!(c.settings.underlay_addr, Some("198.18.0.1".parse::<IpAddr>().unwrap()), "the flag wins");
        assert_eq!(c.settings.dataplane.vxlan_port, 4790);
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks[0].bridge, "ovbr-blue");
        assert_eq!(c.networks[0].fdb.len(), 1);
        assert!(!c.networks[0].learning);
    }

    #[test]
    fn a_cluster_host_takes_its_daemon_settings_from_the_file() {
        let file = r#"
            log = "debug"
            advertise_addr = "198.18.0.7"
            metrics_addr = "127.0.0.1:9477"
            underlay_mtu = 9000
            offloads = "tap,gso"
            source_ports = "62000-62003"
            "#;
        let c = daemon(&[], file).unwrap();
        assert!(!c.is_static(), "no networks: cluster mode");
        assert_eq!(c.settings.log, "debug", "the file's value over the flag's default");
        assert_eq!(c.settings.advertise_addr.as_deref(), Some("198.18.0.7"));
        assert_eq!(c.settings.metrics_addr, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(c.settings.underlay_mtu, Some(9000));
        assert_eq!(c.settings.dataplane.source_ports, PortRange { first: 62_000, count: 4 });
        let o = c.settings.dataplane.offloads;
        assert!(o.tap && o.udp_gso && !o.udp_gro && !o.coalesce);
        let flag = daemon(&["--log", "info", "--offloads", "all"], file).unwrap();
        assert_eq!(flag.settings.log, "info", "a flag given wins even when it says the default");
        assert!(flag.settings.dataplane.offloads.coalesce);
    }

    #[test]
    fn the_dns_ttl_and_upstreams_come_from_the_flag_then_the_file_then_the_default() {
        let c = daemon(&[], "").unwrap();
        assert_eq!((c.settings.dns_ttl, c.settings.dns_upstreams_file.to_str()), (5, Some("/etc/resolv.conf")));
        let file = "dns_ttl = 30\ndns_upstreams_file = \"/run/test/resolv.conf\"\n";
        let c = daemon(&[], file).unwrap();
        assert_eq!((c.settings.dns_ttl, c.settings.dns_upstreams_file.to_str()), (30, Some("/run/test/resolv.conf")));
        let c = daemon(&["--dns-ttl", "1"], file).unwrap();
        assert_eq!(c.settings.dns_ttl, 1, "the flag wins");
    }

    #[test]
    fn mistakes_are_refused_with_what_to_fix() {
        let no_addr = static_flags("1", &[])[2..].to_vec();
        assert!(err(&no_addr, "").contains("--underlay-addr"));
        let no_net = static_flags("1", &[])[..2].to_vec();
        assert!(err(&no_net, "").contains("--vni"));
        let cluster = daemon(&[], "").unwrap();
        assert!(!cluster.is_static(), "nothing static: cluster mode");
        assert!(err(&static_flags("1", &["198.18.0.1"]), "").contains("own underlay address"));
        assert!(err(&static_flags("1", &["fd00::2"]), "").contains("address family"));
        assert!(err(&static_flags("0", &["198.18.0.2"]), "").contains("VNI 0 is refused"));
        assert!(err(&static_flags("1", &[]), "[[network]]\nvni = 0\n").contains("VNI 0 is refused"));
        let dup = "[[network]]\nvni = 1\nname = \"x\"\n";
        assert!(err(&static_flags("1", &[]), dup).contains("configured twice"));
        let long = with(&static_flags("1", &[]), &["--name", "averyverylongname"]);
        assert!(err(&long, "").contains("1 to 10 characters"));
        let unknown = format!("{:#}", daemon(&[], "underlay_adr = \"1.2.3.4\"").unwrap_err());
        assert!(unknown.contains("unknown field \"underlay_adr\"") && unknown.contains("advertise_addr"), "{unknown}");
        let in_network = format!("{:#}", daemon(&[], "[[network]]\nvni = 1\npeer = []").unwrap_err());
        assert!(in_network.contains("unknown field `peer`"), "{in_network}");
        let wrong_kind = format!("{:#}", daemon(&[], "vxlan_port = \"x\"").unwrap_err());
        assert!(wrong_kind.contains("vxlan_port"), "the setting is named: {wrong_kind}");
        assert!(err(&with(&static_flags("1", &[]), &["--source-ports", "5-1"]), "").contains("not above the last"));
        assert!(err(&with(&static_flags("1", &[]), &["--source-ports", "x"]), "").contains("FIRST-LAST"));
        let into_vxlan = with(&static_flags("1", &[]), &["--source-ports", "4780-4790"]);
        assert!(err(&into_vxlan, "").contains("must not include the VXLAN port 4789"));
        assert!(parse_fdb_entry("02:4f:0a:00:00:02").unwrap_err().contains("MAC=VTEP"));
        assert!(parse_arp_entry("10.0.0.2=zz").is_err());
        let three = err(&static_flags("1", &[]), "dataplane_threads = 3");
        assert!(three.contains("dataplane_threads") && three.contains("write auto"), "{three}");
    }

    #[test]
    fn a_key_file_holds_64_hex_digits_that_only_its_owner_may_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("overlayd-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = read_key_file(&write("good", &format!("{hex}\n"), 0o600)).unwrap();
        assert_eq!((key[0], key[1], key[15], key[31]), (0x00, 0x11, 0xff, 0xff));
        let open = format!("{:#}", read_key_file(&write("open", hex, 0o644)).unwrap_err());
        assert!(open.contains("chmod 600") && open.contains("644"), "{open}");
        let short = format!("{:#}", read_key_file(&write("short", "abcd", 0o600)).unwrap_err());
        assert!(short.contains("64 hex digits") && short.contains("openssl rand -hex 32"), "{short}");
        let not_hex = format!("{:#}", read_key_file(&write("nothex", &"zz".repeat(32), 0o400)).unwrap_err());
        assert!(not_hex.contains("64 hex digits"), "{not_hex}");
        let missing = format!("{:#}", read_key_file(&dir.join("missing")).unwrap_err());
        assert!(missing.contains("cannot read the key file"), "{missing}");
        let c = run(&with(&static_flags("1", &["198.18.0.2"]), &["--key-file", "/k"]), "").unwrap();
        assert_eq!(c.networks[0].key_file.as_deref(), Some(Path::new("/k")));
        let f = run(&static_flags("1", &[]), "[[network]]\nvni = 2\nkey_file = \"/k2\"\n").unwrap();
        assert_eq!(f.networks[0].key_file.as_deref(), Some(Path::new("/k2")));
        assert!(err(&["--key-file".into(), "/k".into()], "").contains("give its --vni too"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_address_with_or_without_a_port() {
        assert_eq!(socket_addr("198.18.0.1", 7947, "x").unwrap(), "198.18.0.1:7947".parse().unwrap());
        assert_eq!(socket_addr("198.18.0.1:9000", 7947, "x").unwrap(), "198.18.0.1:9000".parse().unwrap());
        assert_eq!(socket_addr("[fd00::1]:9000", 7947, "x").unwrap(), "[fd00::1]:9000".parse().unwrap());
        assert_eq!(socket_addr("fd00::1", 7947, "x").unwrap(), "[fd00::1]:7947".parse().unwrap());
        let e = socket_addr("manager-1", 7947, "--advertise-addr").unwrap_err().to_string();
        assert!(e.contains("--advertise-addr \"manager-1\" is not an IP address or IP:PORT"), "{e}");
    }

    #[test]
    fn hot_loop_threads_come_from_the_flag_then_the_file() {
        let threads = |args: &[&str], file: &str| {
            run(&with(&static_flags("1", &[]), args), file).unwrap().settings.dataplane.dataplane_threads
        };
        assert_eq!(threads(&[], ""), LoopThreads::Auto, "one thread while idle, two under load, by default");
        assert_eq!(threads(&[], "dataplane_threads = \"auto\""), LoopThreads::Auto);
        assert_eq!(threads(&[], "dataplane_threads = 2"), LoopThreads::PerDirection);
        let word = err(&static_flags("1", &[]), "dataplane_threads = \"many\"");
        assert!(word.contains("write auto"), "{word}");
        assert_eq!(threads(&[], "dataplane_threads = 1"), LoopThreads::One);
        assert_eq!(
            threads(&["--dataplane-threads", "2"], "dataplane_threads = 1"),
            LoopThreads::PerDirection,
            "the flag wins"
        );
    }
}
