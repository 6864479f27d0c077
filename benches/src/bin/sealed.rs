//! Encrypted networks (issue 16) against plain ones, in one two-host cluster and one run: a
//! container on each host on an encrypted network and on a plain one, iperf3 from host 1 to
//! host 2 over each, with 1 and 4 streams, every path in every round (the order rotated), with
//! the CPU the two agents and the whole machine spent per GB moved.
//!
//! Not here: the encrypted userspace tunnels (nebula, vpncloud, tinc, n2n), which `e2e
//! --encrypted --peers all` measures against overlayd encrypted with a pre-shared key; and a
//! kernel reference (this kernel has neither WireGuard nor IPsec ESP).
//!
//! `sudo target/release/sealed --runs 3 --seconds 8` (build with `cargo build --release -p
//! overlayd -p overlayd-benches`; needs iperf3).

use std::io::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use testbed::cluster::Cluster;
use testbed::measure::{MachineCpu, median};
use testbed::{Agent, Node, Options, Testbed, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "sealed", about = "overlayd: an encrypted network against a plain one, same hosts, same run")]
struct Cli {
    /// Rounds of every measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<std::path::PathBuf>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

const T: Duration = Duration::from_secs(60);

/// A container attached with `overlayd attach --netns`: its namespace and address.
fn attach(c: &Cluster, host: usize, network: &str, name: &str) -> Result<(Node, IpAddr)> {
    let node = c.hosts[host].add_netns(name)?;
    let path = node.netns_path();
    let ep = c.agents[host].json(&["attach", "--network", network, "--netns", &path, "--name", name])?;
    let ip = ep["ip"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("no address: {ep}"))?;
    Ok((node, ip))
}

/// One iperf3 run and what it cost: Gbit/s, the agents' and the machine's CPU-seconds per GB.
fn run(client: &Node, server: &Node, to: IpAddr, agents: &[&Agent], seconds: u32, streams: u32) -> Result<[f64; 3]> {
    let before: f64 = agents.iter().map(|a| a.cpu_seconds().unwrap_or(0.0)).sum();
    let machine = MachineCpu::sample()?;
    let r = client.iperf3_to(server, to, seconds, streams)?;
    let busy = MachineCpu::sample()?.busy_seconds_since(&machine);
    let after: f64 = agents.iter().map(|a| a.cpu_seconds().unwrap_or(0.0)).sum();
    let gb = r.bytes as f64 / 1e9;
    Ok([r.bits_per_second / 1e9, (after - before) / gb, busy / gb])
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    let bed = Testbed::new(Options::new(overlayd))?;
    let c = Cluster::form(&bed, 1, 1)?;
    c.await_nodes(2, &[], T)?;
    c.agents[0].json(&["network", "create", "sec", "--encrypted"])?;
    // The same MTU on both, so that only the sealing differs.
    let mtu = c.agents[0].json(&["network", "inspect", "sec"])?["network"]["mtu"].as_u64().context("no MTU")?;
    c.agents[0].json(&["network", "create", "plain", "--mtu", &mtu.to_string()])?;
    let (s1, _) = attach(&c, 0, "sec", "s1")?;
    let (s2, s2_ip) = attach(&c, 1, "sec", "s2")?;
    let (p1, _) = attach(&c, 0, "plain", "p1")?;
    let (p2, p2_ip) = attach(&c, 1, "plain", "p2")?;
    s1.ping_ok(s2_ip, 2)?;
    p1.ping_ok(p2_ip, 2)?;
    let agents: Vec<&Agent> = c.agents.iter().collect();
    say(&format!("two hosts; networks sec (encrypted) and plain, MTU {mtu} both; iperf3 h1 → h2"));
    let paths = [
        ("encrypted, 1 stream", &s1, &s2, s2_ip, 1),
        ("plain, 1 stream", &p1, &p2, p2_ip, 1),
        ("encrypted, 4 streams", &s1, &s2, s2_ip, 4),
        ("plain, 4 streams", &p1, &p2, p2_ip, 4),
    ];
    let mut results: Vec<Vec<[f64; 3]>> = vec![vec![]; paths.len()];
    for round in 0..cli.runs {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let (label, client, server, to, streams) = paths[i];
            let r = run(client, server, to, &agents, cli.seconds, streams)?;
            say(&format!(
                "round {}: {label:<22} {:.2} Gbit/s, agents {:.2} CPU-s/GB, machine {:.2} CPU-s/GB",
                round + 1,
                r[0],
                r[1],
                r[2]
            ));
            results[i].push(r);
        }
    }
    let m = |i: usize, f: usize| median(&results[i].iter().map(|r| r[f]).collect::<Vec<_>>());
    say("");
    say(&format!("medians of {} rounds of {} s", cli.runs, cli.seconds));
    say("");
    say(
        "| streams | encrypted Gbit/s | plain Gbit/s | encrypted / plain | agents CPU-s/GB, encrypted | plain | machine CPU-s/GB, encrypted | plain |",
    );
    say("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (row, (e, p)) in [(1, (0, 1)), (4, (2, 3))] {
        say(&format!(
            "| {row} | {:.2} | {:.2} | **{:.2}x** | {:.2} | {:.2} | {:.2} | {:.2} |",
            m(e, 0),
            m(p, 0),
            m(e, 0) / m(p, 0),
            m(e, 1),
            m(p, 1),
            m(e, 2),
            m(p, 2)
        ));
    }
    Ok(())
}
