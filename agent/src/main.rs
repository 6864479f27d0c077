//! `overlayd`: the agent binary. CLI, daemon wiring, local API and host plumbing; the
//! packet work is in the `dataplane` crate.

mod api;
mod attach;
mod cluster;
mod cni;
mod config;
mod daemon;
mod dns;
mod docker;
mod endpoints;
mod firewall;
mod gossip;
mod host;
mod metrics;
mod netdev;
mod output;
mod services;
mod statefile;
mod static_mode;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use dataplane::alloc_count::CountingAllocator;
use proto as pb;

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
        Hosts form a cluster as with `docker swarm`: `overlayd init` on the first, `overlayd join` \
        with the printed token on the others; managers keep the shared state with Raft, and every \
        host learns which hosts are alive and where every container is by gossip (UDP 7946). \
        Without a cluster the daemon runs in static mode: you give it its underlay address, the \
        networks (VNI) and the peer VTEPs. The other commands talk to the running daemon over the \
        Unix socket in its state dir.",
    after_help = "A cluster of three hosts:\n  \
        every host# overlayd daemon\n  \
        h1# overlayd init --advertise-addr 198.18.0.1      (prints the join tokens)\n  \
        h2# overlayd join 198.18.0.1 --token OVL1-… --advertise-addr 198.18.0.2\n  \
        h1# overlayd network create web\n  \
        h2# overlayd attach --network web --netns /run/netns/app1\n  \
        h2# overlayd peers; overlayd fdb; overlayd status\n\n\
        Static mode, two hosts, one network with VNI 100:\n  \
        host1# overlayd daemon --underlay-addr 198.18.0.1 --vni 100 --peer 198.18.0.2\n  \
        host2# overlayd daemon --underlay-addr 198.18.0.2 --vni 100 --peer 198.18.0.1"
)]
struct Cli {
    /// Where the daemon keeps its socket, its cluster membership and state. Several daemons on
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
    /// Make this host the first manager of a new cluster, and print the join tokens.
    Init(InitArgs),
    /// Join the cluster a manager belongs to.
    #[command(long_about = "Join the cluster the manager at MANAGER belongs to. A worker token makes this host \
        a worker (it follows the cluster state); a manager token makes it a manager (a Raft voter that holds \
        the state). The token pins the cluster's CA: a manager of another cluster is refused.")]
    Join(JoinArgs),
    /// Leave the cluster: detach every container, remove this node, forget the cluster.
    Leave(LeaveArgs),
    /// Print a join token (on a manager), or rotate it first: the old one is refused at once.
    JoinToken(JoinTokenArgs),
    /// Show the running daemon: cluster, underlay, networks, counters (drops by reason).
    Status(OutputArgs),
    /// Show the dataplane's tables: flood lists, address blocks (and whose host is down), MAC →
    /// VTEP entries (static, from gossip, learned) and the addresses answered by ARP.
    Fdb(OutputArgs),
    /// Show every host as this one sees it through gossip: alive, suspect or down, its identity
    /// generation and SWIM incarnation, and how far this host's copy of its endpoint table is;
    /// with the gossip counters (refused datagrams by reason, forged records, repairs).
    Peers(OutputArgs),
    /// List or remove the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create, list, inspect or remove overlay networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Create, list, inspect or remove services: one name (and a virtual IP) for several
    /// replicas.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Attach a container (a network namespace) to a network: a veth into it with the next free
    /// address of this host's block, a MAC derived from the address, the network's MTU and a
    /// default route via the gateway.
    Attach(AttachArgs),
    /// Detach containers: by name, or everything of a namespace (optionally one network only).
    Detach(DetachArgs),
    /// Show what this host's DNS resolvers answer: per network, the names (containers'
    /// names and aliases) and their addresses, what the resolver counted, and the upstreams.
    #[command(long_about = DNS_HELP)]
    Dns {
        /// Only this network.
        network: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Print a shell completion script, e.g. `overlayd completions bash >
    /// /usr/share/bash-completion/completions/overlayd` (scripts/install does it).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `overlayd man > /usr/local/share/man/man8/overlayd.8`
    /// (scripts/install does it); read it with `man overlayd`.
    Man,
}

const DNS_HELP: &str = "Show what this host's DNS resolvers answer.\n\n\
Every cluster network has a resolver on each host, on the network's gateway address (UDP and TCP \
port 53, in the host's namespace). It answers, for containers of that network only: every \
container's name and aliases (`attach --alias`, CNI's aliases) on the network, on any host, and \
NAME.NETWORK, with every address that has it (A; AAAA gets no answer), and each address back \
(PTR). Other names go to the host's upstreams (the daemon setting dns_upstreams_file, \
/etc/resolv.conf by default); an --internal network answers NXDOMAIN instead. A container that \
goes, or a host confirmed down, leaves the answers of every host within seconds. TTL: the daemon \
setting dns_ttl (5 s).\n\n\
How containers use it: `overlayd attach --netns /run/netns/NAME` writes \
/etc/netns/NAME/resolv.conf (`ip netns exec NAME` uses it); the CNI plugin returns the resolver \
as the result's dns.nameservers; with `attach --pid`, point the container's resolv.conf at the \
network's gateway yourself.";

#[derive(Subcommand)]
enum NodeCommand {
    /// The nodes, their role and status, and who leads.
    #[command(visible_alias = "list")]
    Ls(OutputArgs),
    /// Remove a node (a host that is gone for good): its address blocks are freed.
    #[command(visible_aliases = ["remove", "delete"])]
    Rm {
        /// Its name or id.
        node: String,
        /// Remove a manager that is still running too.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Make a worker a manager: it takes a manager's certificate, opens a Raft store and
    /// becomes a voter within seconds (its containers stay attached). Run it on a manager.
    Promote {
        /// Its name or id.
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Make a manager a worker: its Raft vote goes first, then it runs as a worker (its
    /// containers stay attached). The last manager cannot be demoted. Run it on a manager.
    Demote {
        /// Its name or id.
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network; its subnet and VNI are chosen unless given.
    Create {
        /// Its name (1 to 10 of a-z, A-Z, 0-9, '-', '_', '.'; the bridge is ovbr-NAME).
        name: String,
        /// Its subnet, e.g. 10.20.0.0/16 [default: the next free /16 of 10.128.0.0/9].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// Its VXLAN Network Identifier [default: the lowest free from 4096].
        #[arg(long)]
        vni: Option<u32>,
        /// Its MTU [default: the manager's underlay MTU - 50].
        #[arg(long)]
        mtu: Option<u32>,
        /// Prefix length of each host's address block [default: subnet prefix + 8, at most 28].
        #[arg(long, value_name = "LEN")]
        block_prefix: Option<u32>,
        /// No way out: its containers reach each other and nothing beyond the overlay [default:
        /// each host forwards its containers' traffic out, masqueraded].
        #[arg(long)]
        internal: bool,
        /// Seal its datagrams between hosts (AES-256-GCM, keys made and rotated by the managers):
        /// 32 bytes more per datagram, so the default MTU is 32 lower. A kernel VXLAN VTEP
        /// cannot be a member of an encrypted network.
        #[arg(long)]
        encrypted: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Replace an encrypted network's key with a new one (on every host within seconds; the
    /// old one is accepted for a while longer, so no traffic is lost). Run it on a manager.
    RotateKey {
        /// The network.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change a network's MTU: on every host, its bridge, TAP and every attached container's
    /// interface follow within seconds (connections stay up). Run it on a manager.
    Update {
        /// The network.
        name: String,
        /// The new MTU, between 576 and 9000 (at most every host's underlay MTU less 50).
        #[arg(long, value_name = "BYTES")]
        mtu: u32,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List the networks.
    #[command(visible_alias = "list")]
    Ls(OutputArgs),
    /// Show a network: subnet, gateway, VNI, each host's block and VTEP, and its containers.
    Inspect {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove a network that no host uses (or any, with --force).
    #[command(visible_aliases = ["remove", "delete"])]
    Rm {
        name: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// How this host presents itself to the cluster (init and join).
#[derive(Args)]
struct HostArgs {
    /// IP[:PORT] other hosts reach this one's control API at [default: this host's only global
    /// address, port 7947].
    #[arg(long, value_name = "ADDR")]
    advertise_addr: Option<String>,
    /// This host's VTEP address [default: the advertise address].
    #[arg(long, value_name = "IP")]
    underlay_addr: Option<String>,
    /// This host's name in the cluster [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// UDP port of this host's gossip socket, on the advertise address (every host of a
    /// cluster may use its own).
    #[arg(long, value_name = "PORT", default_value_t = control::gossip::DEFAULT_PORT,
          value_parser = dataplane::linux::parse_udp_port)]
    gossip_port: u16,
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    me: HostArgs,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
struct JoinArgs {
    /// IP[:PORT] of a manager (port 7947 by default).
    manager: String,
    /// The join token `overlayd init` printed (worker or manager).
    #[arg(long, env = "OVERLAYD_TOKEN")]
    token: String,
    #[command(flatten)]
    me: HostArgs,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
struct LeaveArgs {
    /// Forget the membership and tear down here without asking the cluster: for a node that
    /// was removed (`overlayd status` says so), a cluster that is gone, or a daemon that
    /// refuses to start with its state dir (then no daemon need run).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
struct JoinTokenArgs {
    /// Which token: `worker` or `manager`.
    #[arg(value_parser = ["worker", "manager"])]
    role: String,
    /// Make a new token first; hosts joining with the old one are refused from then on.
    #[arg(long)]
    rotate: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
struct AttachArgs {
    /// The network.
    #[arg(long)]
    network: String,
    /// The container's network namespace (a path such as /run/netns/NAME or /proc/PID/ns/net).
    /// For /run/netns/NAME, overlayd writes /etc/netns/NAME/resolv.conf (used by `ip netns exec
    /// NAME`) with the network's DNS resolver, and removes it on detach.
    #[arg(long, value_name = "PATH", conflicts_with = "pid", required_unless_present = "pid")]
    netns: Option<String>,
    /// The PID of a process in the container (its resolv.conf is not written: point it at the
    /// network's gateway, where the network's DNS resolver listens).
    #[arg(long)]
    pid: Option<u32>,
    /// The endpoint's name [default: the namespace's name, or pidPID].
    #[arg(long)]
    name: Option<String>,
    /// The interface inside the container.
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// The address to give it, from this host's block [default: the next free one].
    #[arg(long, value_name = "IP")]
    ip: Option<std::net::Ipv4Addr>,
    /// Another name it answers to on the network (repeat for several).
    #[arg(long = "alias", value_name = "NAME")]
    aliases: Vec<String>,
    /// Make it a replica of this service (of the same network): it answers the service's
    /// name and VIP while it lives and passes the service's health check.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

const SERVICE_HELP: &str = "Create a service: one name for several replicas, on one network.\n\n\
overlayd does not start replicas: containers become replicas when they are attached with \
`overlayd attach --service NAME` (on any host), and stop being replicas when they are detached or \
die. In vip mode (the default) the service gets a virtual IP from the network's subnet: NAME \
answers it, and each client's host spreads connections to VIP:PORT over the healthy replicas. \
In dnsrr mode NAME answers every healthy replica. tasks.NAME always answers every healthy \
replica, and _PORT._PROTO.NAME the SRV records of the service's ports.\n\n\
A health check (--health-tcp, --health-http or --health-cmd) is run by each replica's own host: a \
replica that fails it --health-retries times in a row leaves DNS and the VIP on every host until \
it passes again. Without one, a replica is healthy while it lives.\n\n\
Examples:\n  overlayd service create web --network front --port 80/tcp --health-http /\n  \
overlayd service create db --network back --mode dnsrr --health-tcp 5432";

#[derive(Subcommand)]
enum ServiceCommand {
    /// Create a service.
    #[command(long_about = SERVICE_HELP)]
    Create(Box<ServiceCreateArgs>),
    /// List the services, with their replicas' health.
    #[command(visible_alias = "list")]
    Ls(OutputArgs),
    /// Show a service: its VIP, ports, health check and replicas (their host and health).
    Inspect {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove a service (its replicas stay attached, as plain containers).
    #[command(visible_aliases = ["remove", "delete"])]
    Rm {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Args)]
struct ServiceCreateArgs {
    /// The service's name: a DNS label (a-z, 0-9, '-').
    name: String,
    /// The network its replicas and clients are on.
    #[arg(long)]
    network: String,
    /// A port of the service, PORT[/tcp|udp] (repeat for several): the VIP balances it, SRV
    /// records name it.
    #[arg(long = "port", value_name = "PORT[/PROTO]", value_parser = parse_service_port)]
    ports: Vec<control::service::ServicePort>,
    /// vip: one virtual IP, balanced by each client's host; dnsrr: DNS answers every replica.
    #[arg(long, default_value = "vip", value_parser = ["vip", "dnsrr"])]
    mode: String,
    /// The VIP, from the network's subnet outside every host's block [default: the highest
    /// free address of the subnet].
    #[arg(long, value_name = "IP")]
    vip: Option<std::net::Ipv4Addr>,
    /// Publish a port on every host's underlay address: PUBLISHED:TARGET[/tcp|udp][,host]
    /// (",host": each host to its own replicas only). Repeat for several.
    #[arg(long = "publish", value_name = "SPEC", value_parser = parse_published_port)]
    published: Vec<control::service::PublishedPort>,
    /// Health check: connect to this TCP port of each replica.
    #[arg(long, value_name = "PORT", group = "check", value_parser = dataplane::linux::parse_tcp_port)]
    health_tcp: Option<u16>,
    /// Health check: GET this path on the service's first TCP port; 2xx or 3xx passes.
    #[arg(long, value_name = "PATH", group = "check")]
    health_http: Option<String>,
    /// Health check: run this command (sh -c) in each replica's network namespace; exit 0 passes.
    #[arg(long, value_name = "CMD", group = "check")]
    health_cmd: Option<String>,
    /// Between two checks (e.g. 500ms, 2s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = control::service::parse_duration_ms)]
    health_interval: u64,
    /// How long one check may take.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = control::service::parse_duration_ms)]
    health_timeout: u64,
    /// Failures in a row that make a replica unhealthy.
    #[arg(long, value_name = "N", default_value_t = control::service::DEFAULT_HEALTH_RETRIES)]
    health_retries: u32,
    /// Failures after a replica appears that do not count yet.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = control::service::parse_duration_ms)]
    health_start_period: u64,
    #[command(flatten)]
    out: OutputArgs,
}

fn parse_service_port(s: &str) -> Result<control::service::ServicePort, String> {
    s.parse()
}

fn parse_published_port(s: &str) -> Result<control::service::PublishedPort, String> {
    s.parse()
}

impl ServiceCreateArgs {
    /// The request, with the health check's words checked here (so that a bad one is refused
    /// before anything is asked of the cluster).
    fn request(&self) -> Result<pb::Service> {
        use control::service::{HealthCheck, HealthProbe};
        let probe = match (&self.health_tcp, &self.health_http, &self.health_cmd) {
            (Some(p), _, _) => Some(HealthProbe::Tcp(*p)),
            (_, Some(path), _) => Some(HealthProbe::Http(path.clone())),
            (_, _, Some(cmd)) => Some(HealthProbe::Cmd(cmd.clone())),
            _ => None,
        };
        let health = probe.map(|probe| HealthCheck {
            probe,
            interval_ms: self.health_interval,
            timeout_ms: self.health_timeout,
            retries: self.health_retries,
            start_period_ms: self.health_start_period,
        });
        let spec = control::service::NewService {
            name: self.name.clone(),
            network: self.network.clone(),
            mode: self.mode.parse().map_err(anyhow::Error::msg)?,
            vip: self.vip,
            ports: self.ports.clone(),
            published: self.published.clone(),
            health,
            created_at: 0,
        };
        spec.check().map_err(anyhow::Error::msg)?;
        Ok(pb::Service::from(&spec))
    }
}

#[derive(Args)]
struct DetachArgs {
    /// The endpoint's name.
    #[arg(long)]
    name: Option<String>,
    /// The container's network namespace.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    netns: Option<String>,
    /// The PID of a process in the container.
    #[arg(long)]
    pid: Option<u32>,
    /// Only from this network.
    #[arg(long)]
    network: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

const DAEMON_HELP: &str = "Run the agent in the foreground.\n\n\
Every setting is a flag, an OVERLAYD_* environment variable and a key of the TOML file given \
with --config, by the same name; a flag or variable wins over the file, the file over the \
default.\n\n\
Cluster mode (no networks configured): the daemon resumes the membership its state dir holds, \
or waits for `overlayd init` or `overlayd join`.\n\n\
Static mode: the networks, their peer VTEPs and any static entries come from flags (one network) \
or [[network]] tables in the file (any number). For each network the daemon creates the bridge \
ovbr-<name> and the TAP ovt-<name> on it (MTU = underlay MTU - 50 on IPv4, - 70 on IPv6, unless \
--mtu), floods broadcast and unknown frames to the peers, answers ARP for the static IP=MAC \
entries, and learns where other MACs live from the peers' traffic (ageing 300 s). It accepts \
VXLAN only from the peers and static FDB VTEPs of each network; everything else is dropped and \
counted.\n\n\
Config file example, cluster mode:\n\n\
  advertise_addr = \"198.18.0.1\"     # for init and join [default: the only global address]\n\
  log = \"info\"\n\
  # metrics_addr = \"127.0.0.1:9477\" # Prometheus text at GET /metrics\n\
  # underlay_mtu = 1500             # default: the MTU of the interface holding the VTEP address\n\
  # vxlan_port = 4789\n\
  # source_ports = \"61000-61015\"    # outer UDP source ports, picked by inner-flow hash\n\
  # offloads = \"all\"               # or none, or some of tap,gso,gro,coalesce\n\
  # dataplane_threads = \"auto\"      # one thread while idle, one per direction under load; or 1, 2\n\
  # dns_ttl = 5                     # TTL of the DNS answers for containers' names (see overlayd dns --help)\n\
  # dns_upstreams_file = \"/etc/resolv.conf\"   # where names outside the overlay are forwarded\n\n\
Config file example, static mode (the same settings, and):\n\n\
  underlay_addr = \"198.18.0.1\"      # this host's VTEP address (required)\n\n\
  [[network]]\n\
  name = \"blue\"                     # bridge ovbr-blue, TAP ovt-blue (name: up to 10 characters)\n\
  vni = 100\n\
  peers = [\"198.18.0.2\", \"198.18.0.3\"]\n\
  # mtu = 1450\n\
  # learning = true\n\
  # key_file = \"/etc/overlayd/blue.key\"   # encrypt with this pre-shared key (see --key-file)\n\
  fdb = { \"02:4f:0a:00:00:02\" = \"198.18.0.2\" }   # MAC = VTEP\n\
  arp = { \"10.0.0.2\" = \"02:4f:0a:00:00:02\" }     # IP = MAC\n\n\
To talk to a Linux kernel VTEP, create it with the same VNI and `dstport 4789` (Linux's default \
port is 8472).";

#[derive(Args)]
struct DaemonArgs {
    /// TOML file with any of the settings below (by the same names: `vxlan_port = 4789`) and,
    /// for static mode, any number of [[network]] tables (see above).
    #[arg(short, long, env = "OVERLAYD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: config::DaemonSettings,

    #[command(flatten)]
    network: config::FlagNetwork,
}

#[derive(Args)]
struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    if cni::invoked() {
        cni::main(cni::Client::for_conf);
    }
    let json = std::env::args().any(|a| a == "--json");
    let matches = Cli::command().try_get_matches().unwrap_or_else(|e| output::usage_error(e, json));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| output::usage_error(e, json));
    if let Err(e) = run(cli, &matches) {
        std::process::exit(output::failed(&e, json));
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => {
            let args = *args;
            let given = matches.subcommand_matches("daemon").context("no daemon arguments")?;
            let cfg = config::load(args.config.as_deref(), args.settings, given, args.network).map_err(usage)?;
            init_logging(&cfg.settings.log).map_err(usage)?;
            daemon::require_privileges()?;
            runtime(2)?.block_on(daemon::run(cfg, cli.state_dir))
        }
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "overlayd", &mut script);
            let mut out = std::io::stdout().lock();
            match std::io::Write::write_all(&mut out, &script) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("cannot write the completion script"),
            }
        }
        Command::Man => {
            // Section 8: a system administration command (it runs as root).
            let man = clap_mangen::Man::new(Cli::command()).section("8");
            man.render(&mut std::io::stdout().lock()).context("cannot write the manual page")
        }
        command => runtime(1)?.block_on(client(cli.state_dir, command)),
    }
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("overlayd-ctl")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The CLI side: one call to the daemon, its answer printed.
async fn client(state_dir: PathBuf, command: Command) -> Result<()> {
    let command_role = match &command {
        Command::Node(NodeCommand::Promote { .. }) => Some(pb::Role::Manager),
        Command::Node(NodeCommand::Demote { .. }) => Some(pb::Role::Worker),
        _ => None,
    };
    let mut c = match (api::connect(&state_dir).await, &command) {
        (Ok(c), _) => c,
        // Without root the state dir cannot even be read: say so, not that it holds nothing.
        (Err(e), Command::Leave(a)) if a.force && !daemon::privileged() => {
            return Err(e.context(output::Classified(
                output::Failure::NotPermitted,
                "overlayd leave --force removes this host's veths and the membership in its state dir, which only \
                 root may use: run it as root (sudo overlayd leave --force)"
                    .into(),
            )));
        }
        // No daemon runs with this state dir (one that refuses to start, say): forget it here.
        (Err(_), Command::Leave(a)) if a.force => {
            let said = match cluster::forget_offline(&state_dir).await? {
                true => "This host forgot its cluster membership (no daemon was running; the cluster was not asked).\n",
                false => "This state dir holds no cluster membership.\n",
            };
            return output::print(
                a.out.json,
                &serde_json::json!({"left": true, "force": true, "warning": null}),
                |_| said.into(),
            );
        }
        (Err(e), _) if !daemon::privileged() => {
            return Err(e.context(output::Classified(
                output::Failure::NotPermitted,
                "overlayd commands talk to the daemon over a socket in its state dir that only root may use: \
                 run them as root (sudo overlayd …)"
                    .into(),
            )));
        }
        (Err(e), _) => return Err(e),
    };
    let e = api::refused;
    match command {
        Command::Daemon(_) | Command::Completions { .. } | Command::Man => unreachable!("handled by run"),
        Command::Status(o) => {
            output::print(o.json, &c.status(pb::Empty {}).await.map_err(e)?.into_inner(), output::status)
        }
        Command::Fdb(o) => output::print(o.json, &c.fdb(pb::Empty {}).await.map_err(e)?.into_inner(), output::fdb),
        Command::Peers(o) => {
            output::print(o.json, &c.peers(pb::Empty {}).await.map_err(e)?.into_inner(), output::peers)
        }
        Command::Init(a) => {
            let r = c
                .init(pb::InitRequest {
                    advertise_addr: a.me.advertise_addr.unwrap_or_default(),
                    underlay_addr: a.me.underlay_addr.unwrap_or_default(),
                    name: a.me.name.unwrap_or_default(),
                    gossip_port: u32::from(a.me.gossip_port),
                })
                .await
                .map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::init)
        }
        Command::Join(a) => {
            let r = c
                .join(pb::JoinClusterRequest {
                    manager_addr: a.manager,
                    token: a.token,
                    advertise_addr: a.me.advertise_addr.unwrap_or_default(),
                    underlay_addr: a.me.underlay_addr.unwrap_or_default(),
                    name: a.me.name.unwrap_or_default(),
                    gossip_port: u32::from(a.me.gossip_port),
                })
                .await
                .map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::join)
        }
        Command::Leave(a) => {
            // A manager that leaves leaves one manager fewer: counted now, while this host is
            // still a member that may list the nodes (a failure to list only loses the warning).
            let managers_after = match a.force {
                true => None,
                false => c.node_list(pb::Empty {}).await.ok().and_then(|r| {
                    let r = r.into_inner();
                    let managers = r.nodes.iter().filter(|n| n.role == pb::Role::Manager as i32);
                    let me = r.nodes.iter().find(|n| n.id == r.self_id)?;
                    (me.role == pb::Role::Manager as i32).then(|| managers.count() - 1)
                }),
            };
            c.leave(pb::LeaveClusterRequest { force: a.force }).await.map_err(e)?;
            let warning = managers_after.and_then(output::even_managers);
            let said = if a.force {
                "This host forgot its cluster membership (the cluster was not asked).\n"
            } else {
                "This host left the cluster.\n"
            };
            let human = |_: &serde_json::Value| match &warning {
                Some(w) => format!("{said}warning: {w}\n"),
                None => said.to_owned(),
            };
            output::print(a.out.json, &serde_json::json!({"left": true, "force": a.force, "warning": warning}), human)
        }
        Command::JoinToken(a) => {
            let role = if a.role == "manager" { pb::Role::Manager } else { pb::Role::Worker };
            let r = c.join_token(pb::JoinTokenRequest { role: role as i32, rotate: a.rotate }).await.map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::join_token)
        }
        Command::Node(NodeCommand::Ls(o)) => {
            output::print(o.json, &c.node_list(pb::Empty {}).await.map_err(e)?.into_inner(), output::nodes)
        }
        Command::Node(NodeCommand::Promote { node, out } | NodeCommand::Demote { node, out }) => {
            let (role, word) = match &command_role {
                Some(pb::Role::Manager) => (pb::Role::Manager, "manager"),
                _ => (pb::Role::Worker, "worker"),
            };
            let n = c
                .node_set_role(pb::SetNodeRoleRequest { node: node.clone(), role: role as i32 })
                .await
                .map_err(e)?
                .into_inner();
            let nodes = c.node_list(pb::Empty {}).await.map_err(e)?.into_inner().nodes;
            let managers = nodes.iter().filter(|n| n.role == pb::Role::Manager as i32).count();
            let warning = output::even_managers(managers);
            let human = |_: &serde_json::Value| {
                let mut o = format!("node {} is now a {word}\n", n.name);
                if let Some(w) = &warning {
                    o.push_str(&format!("warning: {w}\n"));
                }
                o
            };
            output::print(out.json, &serde_json::json!({"node": n.name, "role": word, "warning": warning}), human)
        }
        Command::Node(NodeCommand::Rm { node, force, out }) => {
            c.node_remove(pb::RemoveNodeRequest { node: node.clone(), force }).await.map_err(e)?;
            let nodes = c.node_list(pb::Empty {}).await.map_err(e)?.into_inner().nodes;
            let managers = nodes.iter().filter(|n| n.role == pb::Role::Manager as i32).count();
            let warning = output::even_managers(managers);
            let human = |_: &serde_json::Value| match &warning {
                Some(w) => format!("removed node {node}\nwarning: {w}\n"),
                None => format!("removed node {node}\n"),
            };
            output::print(out.json, &serde_json::json!({"removed": node, "warning": warning}), human)
        }
        Command::Network(NetworkCommand::Create { name, subnet, vni, mtu, block_prefix, internal, encrypted, out }) => {
            let r = c
                .network_create(pb::CreateNetworkRequest {
                    encrypted,
                    name,
                    subnet: subnet.unwrap_or_default(),
                    vni: vni.unwrap_or(0),
                    mtu: mtu.unwrap_or(0),
                    block_prefix: block_prefix.unwrap_or(0),
                    internal,
                })
                .await
                .map_err(e)?;
            output::print(out.json, &r.into_inner(), output::network)
        }
        Command::Network(NetworkCommand::Update { name, mtu, out }) => {
            let r = c.network_update(pb::UpdateNetworkRequest { network: name, mtu }).await.map_err(e)?;
            output::print(out.json, &r.into_inner(), output::network)
        }
        Command::Network(NetworkCommand::RotateKey { name, out }) => {
            let r = c.network_rotate_key(pb::RotateNetworkKeyRequest { network: name }).await.map_err(e)?;
            output::print(out.json, &r.into_inner(), output::network)
        }
        Command::Network(NetworkCommand::Ls(o)) => {
            output::print(o.json, &c.network_list(pb::Empty {}).await.map_err(e)?.into_inner(), output::networks)
        }
        Command::Network(NetworkCommand::Inspect { name, out }) => output::print(
            out.json,
            &c.network_inspect(pb::NameRequest { name }).await.map_err(e)?.into_inner(),
            output::inspect,
        ),
        Command::Network(NetworkCommand::Rm { name, force, out }) => {
            c.network_remove(pb::RemoveNetworkRequest { name: name.clone(), force }).await.map_err(e)?;
            output::print(out.json, &serde_json::json!({"removed": name}), |_| format!("removed network {name}\n"))
        }
        Command::Service(ServiceCommand::Create(a)) => {
            let r = c.service_create(a.request()?).await.map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::service)
        }
        Command::Service(ServiceCommand::Ls(o)) => {
            output::print(o.json, &c.service_list(pb::Empty {}).await.map_err(e)?.into_inner(), output::services)
        }
        Command::Service(ServiceCommand::Inspect { name, out }) => {
            let all = c.service_list(pb::Empty {}).await.map_err(e)?.into_inner();
            let one = all
                .services
                .into_iter()
                .find(|s| s.service.as_ref().is_some_and(|s| s.name == name))
                .with_context(|| format!("no service named {name:?} (see overlayd service ls)"))?;
            output::print(out.json, &one, output::service_inspect)
        }
        Command::Service(ServiceCommand::Rm { name, out }) => {
            c.service_remove(pb::RemoveServiceRequest { name: name.clone() }).await.map_err(e)?;
            output::print(out.json, &serde_json::json!({"removed": name}), |_| format!("removed service {name}\n"))
        }
        Command::Attach(a) => {
            let r = c
                .attach(pb::AttachRequest {
                    network: a.network,
                    netns: a.netns.unwrap_or_default(),
                    pid: a.pid.unwrap_or(0),
                    name: a.name.unwrap_or_default(),
                    ifname: a.ifname,
                    ip: a.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    aliases: a.aliases,
                    service: a.service.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::endpoint)
        }
        Command::Dns { network, out } => output::print(
            out.json,
            &c.dns(pb::DnsRequest { network: network.unwrap_or_default() }).await.map_err(e)?.into_inner(),
            output::dns,
        ),
        Command::Detach(a) => {
            let r = c
                .detach(pb::DetachRequest {
                    name: a.name.unwrap_or_default(),
                    netns: a.netns.unwrap_or_default(),
                    pid: a.pid.unwrap_or(0),
                    network: a.network.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(e)?;
            output::print(a.out.json, &r.into_inner(), output::detached)
        }
    }
}

/// A configuration or flag error, classed as bad usage (exit code 2).
fn usage(e: anyhow::Error) -> anyhow::Error {
    output::Classified(output::Failure::Usage, format!("{e:#}")).into()
}

/// The levels a `--log` directive may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Refuses a `--log` filter that tracing would take but that cannot be what was meant: a bare
/// word that is not a level (`--log verbose` would turn every log off but a module named
/// "verbose").
fn check_log_filter(filter: &str) -> Result<()> {
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !d.contains('=') && !d.contains("::") && !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            anyhow::bail!(
                "--log {filter:?}: {d:?} is not a level ({}); for one module write MODULE=LEVEL, e.g. info,overlayd=debug",
                LOG_LEVELS.join(", ")
            );
        }
    }
    Ok(())
}

fn init_logging(filter: &str) -> Result<()> {
    check_log_filter(filter)?;
    // openraft logs its metrics and every election step at info: quiet unless asked for.
    let quiet = if filter.contains("openraft") { String::new() } else { ",openraft=warn".to_owned() };
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{filter}{quiet}"))
        .with_context(|| format!("--log {filter:?} is not a valid filter (try info, debug, or overlayd=debug)"))?;
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}
