//! `profile`: one iperf3 transfer through one path of the e2e runner's two-host bed, with the
//! figures needed to tell where its time goes: Gbit/s, the machine's busy CPU per GB moved,
//! the agents' own counters per super-frame (overlayd paths), and optionally a system-wide
//! `perf record` of exactly the transfer, so that samples can be normalised per GB and two
//! builds or two stream counts compared.
//!
//! It is the e2e runner cut down to one path and one run, for profiling; the comparisons that
//! count are the e2e runner's (same run, interleaved rounds).
//!
//! ```sh
//! cargo build --release -p overlayd -p overlayd-benches
//! target/release/profile --path overlayd --streams 4 --seconds 10 --perf /tmp/ov4.data
//! perf report -i /tmp/ov4.data --no-children --sort sym | head -60
//! ```
//! Needs root (namespaces) and, for `--perf`, the `perf` tool.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use testbed::Options;
use testbed::measure::MachineCpu;
use testbed::scenario::{self, Path};

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    /// overlayd with its defaults (and `--overlayd-arg`s).
    Overlayd,
    /// `tap-floor`, the bare TAP + UDP GSO/GRO forwarder.
    Floor,
    /// Linux kernel VXLAN.
    Kernel,
}

#[derive(Parser)]
#[command(
    name = "profile",
    about = "One iperf3 transfer through one e2e path, with counters and an optional perf record"
)]
struct Cli {
    #[arg(long, value_enum, default_value = "overlayd")]
    path: Which,
    /// iperf3 parallel streams.
    #[arg(long, default_value_t = 1)]
    streams: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Record the whole machine with `perf record -a -g -F 499` into this file during the
    /// transfer.
    #[arg(long)]
    perf: Option<std::path::PathBuf>,
    /// Transfers in a row (each reported; the profile covers all of them).
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Extra arguments for both overlayd daemons (repeatable, e.g. `--overlayd-arg=--dataplane-threads=1`).
    #[arg(long, allow_hyphen_values = true)]
    overlayd_arg: Vec<String>,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<std::path::PathBuf>,
    /// Instead of iperf3: this many pings 10 ms apart (the e2e runner's RTT measurement).
    #[arg(long)]
    ping: Option<u32>,
    /// Also `perf trace -s` the agents (overlayd paths) during the measurement into this file:
    /// system calls per thread, counted and timed.
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// A shell command to run in both hosts' namespaces once the path is up (an experiment:
    /// e.g. `nft delete table inet overlayd` to see what the host's tables cost).
    #[arg(long)]
    host_exec: Option<String>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

/// Counters worth reading per super-frame: the sender's TX side, the receiver's RX side.
const TX_COUNTERS: [&str; 6] =
    ["tx_frames", "tx_segmented", "tx_datagrams", "tx_gso_sends", "tx_send_calls", "tx_remote_checksums"];
const RX_COUNTERS: [&str; 6] =
    ["rx_datagrams", "rx_recv_calls", "rx_coalesced", "rx_delivered", "rx_remote_checksums", "rx_checksums_completed"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => testbed::overlayd_next_to_me()?,
    };
    let options = Options::new(overlayd);
    let path = match cli.path {
        Which::Overlayd => Path::Overlayd,
        Which::Floor => Path::TapFloor,
        Which::Kernel => Path::KernelVxlan,
    };
    let pair = scenario::build_with(path, &options, path.label(), &cli.overlayd_arg)?;
    if let Some(cmd) = &cli.host_exec {
        for host in ["h1", "h2"] {
            let ns = format!("{}-{host}", pair.bed.prefix());
            testbed::netns::exec(&ns, "sh", ["-c", cmd.as_str()]).with_context(|| format!("{cmd} in {ns}"))?;
        }
    }
    // Warm up (ARP, the learned tables, TCP's windows), unrecorded.
    pair.throughput(2, cli.streams)?;
    let before: Vec<_> = pair.agents.iter().filter_map(|a| a.counters().ok()).collect();
    let mut perf = match &cli.perf {
        Some(out) => Some(start_perf(&["record", "-a", "-g", "-F", "499", "-o"], out, &[])?),
        None => None,
    };
    let mut trace = match &cli.trace {
        Some(out) if !pair.agents.is_empty() => {
            let pids: Vec<String> = pair.agents.iter().map(|a| a.pid().to_string()).collect();
            Some(start_perf(&["trace", "-s", "-o"], out, &["-p", &pids.join(",")])?)
        }
        _ => None,
    };
    if let Some(count) = cli.ping {
        let rtt = pair.rtt(count);
        for child in [perf.as_mut(), trace.as_mut()].into_iter().flatten() {
            stop_perf(child)?;
        }
        let rtt = rtt?;
        say(&format!(
            "{}: {count} pings, RTT ms: average {:.3}, min {:.3}, median {:.3}, p90 {:.3}",
            pair.label, rtt.rtt_avg_ms, rtt.rtt_min_ms, rtt.rtt_p50_ms, rtt.rtt_p90_ms
        ));
        return Ok(());
    }
    let cpu0 = MachineCpu::sample()?;
    let mut bytes = 0u64;
    let mut result = Ok(());
    for run in 1..=cli.runs {
        match pair.throughput(cli.seconds, cli.streams) {
            Ok(r) => {
                bytes += r.iperf.bytes;
                say(&format!(
                    "run {run}: {:.2} Gbit/s, {:.2} machine CPU s/GB, {} retransmits",
                    r.iperf.bits_per_second / 1e9,
                    r.machine_cpu_s_per_gb,
                    r.iperf.retransmits
                ));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let cpu = MachineCpu::sample()?.busy_seconds_since(&cpu0);
    for child in [trace.as_mut(), perf.as_mut()].into_iter().flatten() {
        stop_perf(child)?;
    }
    result?;
    let gb = bytes as f64 / 1e9;
    say(&format!(
        "{}: {} stream(s), {:.2} GB moved, {:.2} machine CPU s/GB over all runs",
        pair.label,
        cli.streams,
        gb,
        cpu / gb
    ));
    if let Some(out) = &cli.perf {
        say(&format!("perf samples in {} ({:.2} GB moved: divide sample counts by it)", out.display(), gb));
    }
    let after: Vec<_> = pair.agents.iter().filter_map(|a| a.counters().ok()).collect();
    if path == Path::Overlayd && before.len() == 2 && after.len() == 2 {
        let delta = |side: usize, name: &str| after[side].get(name).saturating_sub(before[side].get(name));
        let frames = delta(0, "tx_frames").max(1) as f64;
        for name in TX_COUNTERS {
            let d = delta(0, name);
            say(&format!("  sender   {name:<16} {d:>12} ({:.2} per TAP frame)", d as f64 / frames));
        }
        for name in RX_COUNTERS {
            let d = delta(1, name);
            say(&format!("  receiver {name:<16} {d:>12} ({:.2} per sender TAP frame)", d as f64 / frames));
        }
    }
    Ok(())
}

/// Starts `perf ARGS OUT MORE…` quietly and gives it a moment to attach.
fn start_perf(args: &[&str], out: &std::path::Path, more: &[&str]) -> Result<std::process::Child> {
    let child = Command::new("perf")
        .args(args)
        .arg(out)
        .args(more)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting perf {} (is perf installed?)", args[0]))?;
    std::thread::sleep(Duration::from_millis(700));
    Ok(child)
}

/// Stops a `perf` this process started (SIGINT: it writes its file) and reaps it.
fn stop_perf(child: &mut std::process::Child) -> Result<()> {
    // SAFETY: `kill` with a PID this process spawned and has not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    // perf ends with 0 or by the SIGINT itself, having written its file.
    use std::os::unix::process::ExitStatusExt as _;
    if !status.success() && status.signal() != Some(libc::SIGINT) {
        bail!("perf failed: {status}");
    }
    Ok(())
}
