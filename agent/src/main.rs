//! `overlayd`: the agent binary. CLI, daemon wiring, local API and host plumbing; the
//! packet work is in the `dataplane` crate.

mod api;
mod config;
mod daemon;
mod netdev;
mod output;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dataplane::alloc_count::CountingAllocator;
use dataplane::linux::Offloads;
use dataplane::{MacAddr, Vni};

// Counting allocations per thread is how the zero-allocation hot loop is checked in every
// build; it costs one thread-local increment per allocation, and the hot loops make none.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const DEFAULT_STATE_DIR: &str = "/var/lib/overlayd";

#[derive(Parser)]
#[command(
    name = "overlayd",
    version,
    about = "A VXLAN overlay network agent with a userspace dataplane",
    long_about = "overlayd gives containers on many hosts one layer-2 network. Every host runs one \
        `overlayd daemon`: it creates a bridge and a TAP device per network, and carries the \
        containers' Ethernet frames to other hosts inside VXLAN (RFC 7348, UDP port 4789, \
        interoperable with Linux's vxlan device) from a userspace dataplane.\n\n\
        Today the daemon runs in static mode: you tell it its underlay address, the networks \
        (VNI) and the peer VTEPs. The other commands talk to the running daemon over the Unix \
        socket in its state dir.",
    after_help = "Example: two hosts, 198.18.0.1 and 198.18.0.2, one network with VNI 100\n  \
        host1# overlayd daemon --underlay-addr 198.18.0.1 --vni 100 --peer 198.18.0.2\n  \
        host2# overlayd daemon --underlay-addr 198.18.0.2 --vni 100 --peer 198.18.0.1\n  \
        then attach containers' veths to the bridge ovbr-100 on each host, and:\n  \
        host1# overlayd status"
)]
struct Cli {
    /// Where the daemon keeps its socket (and, later, its cluster state). Several daemons on
    /// one machine need one each.
    #[arg(long, global = true, env = "OVERLAYD_STATE_DIR", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (for systemd or a terminal); stop it with SIGTERM or
    /// Ctrl-C and it removes the bridges and TAPs it created.
    #[command(long_about = DAEMON_HELP)]
    Daemon(Box<DaemonArgs>),
    /// Show the running daemon's underlay, networks and counters (drops by reason included).
    Status(OutputArgs),
    /// Show the dataplane's tables: flood lists, MAC → VTEP entries (static and learned) and
    /// the addresses answered by ARP.
    Fdb(OutputArgs),
}

const DAEMON_HELP: &str = "Run the agent in the foreground.\n\n\
Static mode: the networks, their peer VTEPs and any static entries come from flags (one network) \
or a TOML file given with --config (any number of networks); flags override the file, and the \
file's settings override defaults. For each network the daemon creates the bridge ovbr-<name> \
and the TAP ovt-<name> on it (MTU = underlay MTU - 50 on IPv4, - 70 on IPv6, unless --mtu), \
floods broadcast and unknown frames to the peers, answers ARP for the static IP=MAC entries, \
and learns where other MACs live from the peers' traffic (ageing 300 s). It accepts VXLAN only \
from the peers and static FDB VTEPs of each network; everything else is dropped and counted.\n\n\
Config file example:\n\n\
  underlay_addr = \"198.18.0.1\"      # this host's VTEP address (required)\n\
  # underlay_mtu = 1500             # default: the MTU of the interface holding underlay_addr\n\
  # vxlan_port = 4789\n\
  # source_ports = \"61000-61015\"    # outer UDP source ports, picked by inner-flow hash\n\
  # metrics_addr = \"127.0.0.1:9477\" # Prometheus text at GET /metrics\n\n\
  [[network]]\n\
  name = \"blue\"                     # bridge ovbr-blue, TAP ovt-blue (name: up to 10 characters)\n\
  vni = 100\n\
  peers = [\"198.18.0.2\", \"198.18.0.3\"]\n\
  # mtu = 1450\n\
  # learning = true\n\
  fdb = { \"02:4f:0a:00:00:02\" = \"198.18.0.2\" }   # MAC = VTEP\n\
  arp = { \"10.0.0.2\" = \"02:4f:0a:00:00:02\" }     # IP = MAC\n\n\
To talk to a Linux kernel VTEP, create it with the same VNI and `dstport 4789` (Linux's default \
port is 8472).";

#[derive(Args)]
struct DaemonArgs {
    /// TOML file with the settings and any number of [[network]] tables (see above).
    #[arg(short, long, env = "OVERLAYD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// This host's underlay address: where other VTEPs send VXLAN to, and the source of ours.
    #[arg(long, env = "OVERLAYD_UNDERLAY_ADDR", value_name = "IP")]
    underlay_addr: Option<IpAddr>,

    /// Underlay MTU [default: the MTU of the interface that holds --underlay-addr].
    #[arg(long, env = "OVERLAYD_UNDERLAY_MTU", value_name = "BYTES")]
    underlay_mtu: Option<u32>,

    /// VXLAN UDP port, on this host and on the peers [default: 4789].
    #[arg(long, env = "OVERLAYD_VXLAN_PORT", value_name = "PORT")]
    vxlan_port: Option<u16>,

    /// Outer UDP source ports; each inner flow keeps one, chosen by hash, for ECMP and RSS
    /// [default: 61000-61015].
    #[arg(long, env = "OVERLAYD_SOURCE_PORTS", value_name = "FIRST-LAST", value_parser = config::parse_port_range)]
    source_ports: Option<(u16, u16)>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, env = "OVERLAYD_METRICS_ADDR", value_name = "ADDR:PORT")]
    metrics_addr: Option<SocketAddr>,

    /// Offloads: all, none, or a list of tap (TSO super-frames from the TAP), gso (UDP_SEGMENT
    /// sends), gro (UDP_GRO receives), coalesce (TCP segments joined for the TAP). For diagnosis
    /// and for measuring each on its own.
    #[arg(long, env = "OVERLAYD_OFFLOADS", value_name = "LIST", value_parser = Offloads::parse)]
    offloads: Option<Offloads>,

    /// Log filter (tracing syntax: error, warn, info, debug, or per-module).
    #[arg(long, env = "OVERLAYD_LOG", default_value = "info", value_name = "FILTER")]
    log: String,

    #[command(flatten)]
    network: NetworkFlags,
}

/// One network from flags.
#[derive(Args)]
#[command(next_help_heading = "One network from flags (use --config for several)")]
struct NetworkFlags {
    /// The network's VXLAN Network Identifier (0-16777215).
    #[arg(long, value_name = "VNI")]
    vni: Option<Vni>,

    /// Network name, used in device names [default: the VNI].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Bridge the containers attach to [default: ovbr-<name>]. An existing bridge is used and
    /// left in place on exit.
    #[arg(long, value_name = "IFNAME")]
    bridge: Option<String>,

    /// TAP device name [default: ovt-<name>].
    #[arg(long, value_name = "IFNAME")]
    tap: Option<String>,

    /// MTU of the bridge and TAP [default: underlay MTU - 50 (IPv4) or - 70 (IPv6)].
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u32>,

    /// A peer VTEP: receives this network's broadcast and unknown frames, and may send to it.
    /// Repeat for each peer.
    #[arg(long = "peer", value_name = "IP")]
    peers: Vec<IpAddr>,

    /// A static MAC → VTEP entry. Repeatable.
    #[arg(long = "fdb", value_name = "MAC=VTEP", value_parser = config::parse_fdb_entry)]
    fdb: Vec<(MacAddr, IpAddr)>,

    /// Answer ARP requests for IP with MAC, locally. Repeatable.
    #[arg(long = "arp", value_name = "IP=MAC", value_parser = config::parse_arp_entry)]
    arp: Vec<(Ipv4Addr, MacAddr)>,

    /// Do not learn MAC locations from the peers' traffic (static entries and flooding only).
    #[arg(long)]
    no_learning: bool,
}

#[derive(Args)]
struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        #[allow(clippy::print_stderr)] // the CLI's last word; tracing may not be set up yet
        {
            eprintln!("overlayd: {e:#}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => {
            let args = *args;
            init_logging(&args.log)?;
            let file = match &args.config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            let n = args.network;
            let flags = config::FlagSettings {
                underlay_addr: args.underlay_addr,
                underlay_mtu: args.underlay_mtu,
                vxlan_port: args.vxlan_port,
                source_ports: args.source_ports,
                metrics_addr: args.metrics_addr,
                offloads: args.offloads,
                network: config::FlagNetwork {
                    vni: n.vni,
                    name: n.name,
                    bridge: n.bridge,
                    tap: n.tap,
                    mtu: n.mtu,
                    peers: n.peers,
                    no_learning: n.no_learning,
                    fdb: n.fdb,
                    arp: n.arp,
                },
            };
            let cfg = config::resolve(file, flags)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("overlayd-ctl")
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(daemon::run(cfg, cli.state_dir))
        }
        Command::Status(o) => {
            let report: api::StatusReport = api::call(&cli.state_dir, api::Request::Status)?;
            output::print(o.json, &report, output::status)
        }
        Command::Fdb(o) => {
            let report: api::FdbReport = api::call(&cli.state_dir, api::Request::Fdb)?;
            output::print(o.json, &report, output::fdb)
        }
    }
}

fn init_logging(filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log {filter:?} is not a valid filter (try info, debug, or overlayd=debug)"))?;
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}
