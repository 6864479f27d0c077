//! The end-to-end benchmark: in one run, on this machine, container-to-container TCP throughput
//! (iperf3, 1 and 4 streams), ping RTT and CPU cost per GB over
//! - a plain veth between the two hosts (the ceiling: no overlay at all),
//! - the Linux kernel's VXLAN (vxlan device on a bridge),
//! - overlayd (and, with `--variants`, overlayd with some offloads turned off, to measure what
//!   each technique gives on its own),
//! - with `--peers`, the userspace tunnels users pick instead: tinc 1.0 (switch mode), n2n,
//!   nebula (L3, measured host to host) and vpncloud, each as fast as it can be set (no
//!   encryption where the tool can turn it off; the row's label says its mode, cipher and MTU;
//!   see `testbed::peers`),
//! - with `--floor`, `tap-floor` (this crate's bare TAP + UDP GSO/GRO forwarder, not VXLAN),
//!   the floor under any TAP-based userspace dataplane,
//! - with `--encrypted`, overlayd on an encrypted network too (a two-host cluster, `network
//!   create --encrypted`), and the peers with their encryption on (tinc's default cipher and
//!   digest, vpncloud `--algorithm aes256`; nebula and n2n always encrypt), with a second table
//!   of every encrypted row against overlayd's; this kernel has neither WireGuard nor IPsec
//!   ESP, so there is no kernel reference for encryption,
//!
//! all in the same two-host namespace topology. Rounds are interleaved (every path once per
//! round) so that drift in the machine's load hits each alike; the table shows medians and the
//! ratio of every row to kernel VXLAN. For a peer, "agents' CPU" is its two tunnel daemons'.
//! Needs root.
//!
//! `sudo cargo run --release -p overlayd-benches --bin e2e -- --runs 3 --seconds 10`
//!
//! The peers are optional and not needed by the test suite. Install them with
//! `apt-get install tinc n2n nebula` (Debian 12: tinc 1.0.36, n2n 1.3.2, nebula 1.6.1) and
//! `cargo install vpncloud --root target/vpncloud-install` (found there, on `$PATH`, in
//! `~/.cargo/bin`, or where `--vpncloud PATH` says), then add `--peers all` (or a list such as
//! `--peers tinc,vpncloud`). A peer that cannot be set up — not installed, its daemon exits, no
//! ping through it within 20 s, or no TCP stream through it in a one-second iperf3 probe — is
//! listed under the table with the reason, and the run goes on without it.

use std::io::Write as _;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use testbed::scenario::{self, Pair, Path};
use testbed::{Options, overlayd_next_to_me, peers};

#[derive(Parser)]
#[command(
    name = "e2e",
    about = "overlayd vs Linux kernel VXLAN vs plain veth (and userspace tunnels with --peers), container to container, one run"
)]
struct Cli {
    /// Rounds; medians are taken over them.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds per iperf3 test.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// overlayd variants to measure besides the default, each an --offloads value (e.g.
    /// none,tap,tap+gso,tap+gso+gro: `+` separates, as `,` separates variants) or
    /// `threads=N` for `--dataplane-threads N`, `remote-checksum` for VXLAN remote checksum
    /// offload between the two agents (`--remote-checksum`), or `bin=PATH` for another overlayd binary with
    /// the defaults (to compare two builds in one run).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Skip the plain-veth ceiling.
    #[arg(long)]
    no_veth: bool,
    /// Also measure `tap-floor`, the bare TAP + UDP GSO/GRO forwarder (not VXLAN): what the
    /// mechanism under overlayd costs without overlayd's own work.
    #[arg(long)]
    floor: bool,
    /// Also measure overlayd on an encrypted network, and run the peers with encryption on.
    #[arg(long)]
    encrypted: bool,
    /// Also write the summaries as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<std::path::PathBuf>,
    /// Userspace tunnels to measure as well (optional installs, see the module doc).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<Peer>,
    /// The vpncloud binary for `--peers vpncloud` [default: on $PATH, in
    /// target/vpncloud-install/bin, or in ~/.cargo/bin].
    #[arg(long)]
    vpncloud: Option<std::path::PathBuf>,
}

/// A userspace tunnel `--peers` can add.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    Tinc,
    N2n,
    Nebula,
    Vpncloud,
    /// All of the above.
    All,
}

impl Peer {
    /// Its path; with `encrypted`, with its encryption on.
    fn path(self, encrypted: bool) -> Option<Path> {
        match self {
            Peer::Tinc if encrypted => Some(Path::TincEncrypted),
            Peer::Tinc => Some(Path::Tinc),
            Peer::N2n => Some(Path::N2n),
            Peer::Nebula => Some(Path::Nebula),
            Peer::Vpncloud if encrypted => Some(Path::VpncloudEncrypted),
            Peer::Vpncloud => Some(Path::Vpncloud),
            Peer::All => None,
        }
    }
}

/// The rows that encrypt (overlayd's encrypted network, n2n, nebula, and tinc and vpncloud
/// with their ciphers on) against overlayd's encrypted network: throughput and CPU per GB.
fn encrypted_table(summaries: &[scenario::Summary]) -> String {
    let sealed = [Path::OverlaydEncrypted, Path::N2n, Path::Nebula, Path::TincEncrypted, Path::VpncloudEncrypted];
    let Some(ours) = summaries.iter().find(|s| s.path == Path::OverlaydEncrypted) else {
        return String::new();
    };
    let mut o = String::from(
        "| encrypted path | 1 stream Gbit/s | overlayd's / its | 4 streams Gbit/s | overlayd's / its | machine CPU s/GB, 1 stream | its / overlayd's | agents' CPU s/GB | its / overlayd's |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in summaries.iter().filter(|s| sealed.contains(&s.path)) {
        o.push_str(&format!(
            "| {} | {:.2} | {:.1}x | {:.2} | {:.1}x | {:.2} | {:.1}x | {:.2} | {:.1}x |\n",
            s.label,
            s.gbps_1,
            ours.gbps_1 / s.gbps_1,
            s.gbps_4,
            ours.gbps_4 / s.gbps_4,
            s.machine_cpu_s_per_gb,
            s.machine_cpu_s_per_gb / ours.machine_cpu_s_per_gb,
            s.agent_cpu_s_per_gb,
            s.agent_cpu_s_per_gb / ours.agent_cpu_s_per_gb,
        ));
    }
    o.push_str("\nNo kernel reference for encryption: this kernel has neither WireGuard nor IPsec ESP.\n");
    o
}

/// A peer path that could not be set up, listed under the table.
struct Skipped {
    label: String,
    reason: String,
}

/// Table rows (same columns as `scenario::table`) for the peers that were not measured.
fn skipped_rows(skipped: &[Skipped]) -> String {
    let mut o = String::new();
    for s in skipped {
        let mut reason: String = s.reason.replace('|', "\\|").split_whitespace().collect::<Vec<_>>().join(" ");
        if reason.chars().count() > 300 {
            reason = reason.chars().take(300).collect::<String>() + "…";
        }
        o.push_str(&format!("| {} | not run: {reason} |{}\n", s.label, " - |".repeat(10)));
    }
    o
}

/// Builds a peer path and checks that a TCP stream gets through, so that a tunnel that pings
/// but cannot carry iperf3 is skipped here rather than aborting the measured rounds.
fn build_peer(path: Path, options: &Options, label: &str) -> Result<Pair> {
    let pair = scenario::build_with(path, options, label, &[])?;
    pair.throughput(1, 1).context("one-second iperf3 probe")?;
    Ok(pair)
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0);
    format!("{cores} x {cpu}, {} GiB, Linux {}", mem_kb / 1024 / 1024, kernel.trim())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM: the testbed library removes what was built.
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    let mut options = Options::new(overlayd);
    options.vpncloud = cli.vpncloud.clone();
    say(&format!("machine: {}", machine()));
    say(&format!("{} rounds of {} s iperf3 runs (1 and 4 streams) and 100 pings per path", cli.runs, cli.seconds));

    let mut plan: Vec<(Path, String, Vec<String>, Options)> = Vec::new();
    if !cli.no_veth {
        plan.push((Path::Veth, Path::Veth.label().into(), vec![], options.clone()));
    }
    plan.push((Path::KernelVxlan, Path::KernelVxlan.label().into(), vec![], options.clone()));
    plan.push((Path::Overlayd, "overlayd".into(), vec![], options.clone()));
    if cli.encrypted {
        plan.push((Path::OverlaydEncrypted, Path::OverlaydEncrypted.label().into(), vec![], options.clone()));
    }
    if cli.floor {
        say(&peers::version(Path::TapFloor, &options)?);
        plan.push((Path::TapFloor, Path::TapFloor.label().into(), vec![], options.clone()));
    }
    for v in &cli.variants {
        if let Some(n) = v.strip_prefix("threads=") {
            let label = format!("overlayd --dataplane-threads {n}");
            plan.push((Path::Overlayd, label, vec!["--dataplane-threads".into(), n.into()], options.clone()));
        } else if v == "remote-checksum" {
            let label = "overlayd --remote-checksum".to_owned();
            plan.push((Path::Overlayd, label, vec!["--remote-checksum".into()], options.clone()));
        } else if let Some(bin) = v.strip_prefix("bin=") {
            let other = Options { overlayd: bin.into(), ..options.clone() };
            plan.push((Path::Overlayd, format!("overlayd ({bin})"), vec![], other));
        } else {
            let list = v.replace('+', ",");
            let label = format!("overlayd --offloads {list}");
            plan.push((Path::Overlayd, label, vec!["--offloads".into(), list], options.clone()));
        }
    }
    let mut pairs = plan
        .iter()
        .map(|(path, label, args, options)| {
            scenario::build_with(*path, options, label, args).with_context(|| format!("building {label}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let all = [Peer::Tinc, Peer::N2n, Peer::Nebula, Peer::Vpncloud];
    let mut skipped = Vec::new();
    for peer in all.into_iter().filter(|p| cli.peers.contains(p) || cli.peers.contains(&Peer::All)) {
        let path = peer.path(cli.encrypted).context("`all` is not a peer")?;
        let label = path.label();
        match peers::version(path, &options) {
            Ok(v) => say(&format!("{label}: {v}")),
            Err(e) => say(&format!("{label}: {e:#}")),
        }
        match build_peer(path, &options, label) {
            Ok(pair) => pairs.push(pair),
            Err(e) => {
                say(&format!("  {label}: not measured: {e:#}"));
                skipped.push(Skipped { label: label.to_owned(), reason: format!("{e:#}") });
            }
        }
    }
    let summaries = scenario::compare(&pairs, cli.seconds, cli.runs, |l| say(&format!("  {l}")))?;
    drop(pairs);
    say("");
    say(&format!("{}{}", scenario::table(&summaries), skipped_rows(&skipped)));
    if cli.encrypted {
        say("");
        say(&encrypted_table(&summaries));
    }
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&summaries)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
