//! The gossip benchmark: a whole cluster's gossip — the real `GossipNode`s (foca SWIM, signed
//! endpoint records, anti-entropy, sealed datagrams) of every host — in one process over the
//! simulated network and clock of `control::gossip::sim`, at the sizes asked for. Per size:
//! - endpoint change to every host: puts and deletes on random hosts, 200 ms apart; per
//!   (change, host) the delay until the host's replica has it, and per change the delay until
//!   the last host has it;
//! - dead host withdrawn everywhere: hosts killed (no goodbye) 8 s apart; per kill the delay
//!   until the last live host emitted `PeerDown`; and the same for graceful leaves;
//! - gossip bytes sent per host per second, as UDP payload and with 28 B of IPv4 and UDP
//!   headers, in steady state and during the changes;
//! - the process's peak RSS (VmHWM, reset between sizes) and the wall time.
//!
//! Latency is drawn from 0.1–2 ms per datagram; `--loss` drops datagrams at random. Needs no
//! root. The goals at 1,000 hosts: change p99 < 1 s, dead host withdrawn everywhere
//! < 5 s, under 10 KB/s per host.
//!
//! `cargo run --release -p overlayd-benches --bin gossip -- --hosts 1000,10000`

use std::collections::HashSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use control::gossip::GossipConfig;
use control::gossip::sim::{SimConfig, Simulation, UDP_IPV4_HEADERS, WatchId, endpoint_key, percentiles};
use serde_json::json;

#[derive(Parser)]
#[command(name = "gossip", about = "overlayd gossip convergence and cost, whole clusters simulated in one process")]
struct Cli {
    /// Cluster sizes to simulate, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    hosts: Vec<usize>,
    /// Probability that a datagram is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seeds the cluster and the choice of hosts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Endpoint changes (puts and deletes alternately), 200 ms apart.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Hosts killed, 8 s apart.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Hosts that leave gracefully, 3 s apart.
    #[arg(long, default_value_t = 5)]
    leaves: usize,
    /// SWIM probe period in ms [default: the agent's, `GossipConfig::default()`] (to try
    /// other settings; the figures in BENCHMARKS.md use the defaults).
    #[arg(long)]
    probe_period_ms: Option<u64>,
    /// Suspicion time before a suspect is declared down, in ms [default: the agent's].
    #[arg(long)]
    suspicion_ms: Option<u64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

const CHANGE_EVERY: Duration = Duration::from_millis(200);
const KILL_EVERY: Duration = Duration::from_secs(8);
const LEAVE_EVERY: Duration = Duration::from_secs(3);
/// How long the steady-state bandwidth is measured.
const STEADY: Duration = Duration::from_secs(10);

/// SplitMix64: picks hosts reproducibly without another dependency.
struct Pick(u64);

impl Pick {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % below as u64) as usize
    }

    /// A host not in `used` (and then in it).
    fn fresh(&mut self, hosts: usize, used: &mut HashSet<usize>) -> usize {
        loop {
            let h = self.next(hosts);
            if used.insert(h) {
                return h;
            }
        }
    }
}

/// Peak resident set of this process, in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak resident set (`VmHWM`), so that each size reports its own.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes and datagrams sent per host per second over a stretch: the mean over hosts and the
/// busiest host, as payload and with headers.
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    payload: f64,
    wire: f64,
    datagrams: f64,
    busiest_wire: f64,
}

fn snapshot(sim: &Simulation) -> Vec<(u64, u64)> {
    (0..sim.hosts()).map(|i| sim.sent(i)).collect()
}

fn rate(sim: &Simulation, before: &[(u64, u64)], over: Duration) -> Rate {
    let s = over.as_secs_f64();
    let n = sim.hosts() as f64;
    let mut r = Rate::default();
    for (i, (b0, d0)) in before.iter().enumerate() {
        let (b1, d1) = sim.sent(i);
        let (b, d) = ((b1 - b0) as f64, (d1 - d0) as f64);
        let wire = b + d * UDP_IPV4_HEADERS as f64;
        r.payload += b / n / s;
        r.datagrams += d / n / s;
        r.wire += wire / n / s;
        r.busiest_wire = r.busiest_wire.max(wire / s);
    }
    r
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A row of delays: p50, p99, max (ms) and the sample count, with what never arrived.
fn delay_row(what: &str, delays: &[Option<Duration>]) -> (String, serde_json::Value) {
    let (p50, p99, max, missing) = percentiles(delays.iter().copied());
    let seen = delays.len() - missing;
    let samples = if missing == 0 { format!("{seen}") } else { format!("{seen} (**{missing} never**)") };
    (
        format!("| {what} | {:.0} | {:.0} | {:.0} | {samples} |", ms(p50), ms(p99), ms(max)),
        json!({ "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(max), "samples": seen, "missing": missing }),
    )
}

fn rate_row(what: &str, r: Rate) -> (String, serde_json::Value) {
    (
        format!("| {what} | {:.0} | {:.0} | {:.1} | {:.0} |", r.payload, r.wire, r.datagrams, r.busiest_wire),
        json!({ "payload_bytes_per_s": r.payload, "wire_bytes_per_s": r.wire,
                "datagrams_per_s": r.datagrams, "busiest_host_wire_bytes_per_s": r.busiest_wire }),
    )
}

/// The delay until the last live host saw the subject go down: `None` if one never did.
fn down_everywhere(sim: &Simulation, subject: usize, since: Duration) -> Option<Duration> {
    sim.event_delays(subject, since, false).into_iter().try_fold(Duration::ZERO, |m, d| d.map(|d| m.max(d)))
}

fn run(cli: &Cli, hosts: usize) -> Result<serde_json::Value> {
    let wall = Instant::now();
    let rss_reset = reset_peak_rss();
    let mut gossip = GossipConfig { cluster_size: u32::try_from(hosts).context("hosts")?, ..GossipConfig::default() };
    if let Some(ms) = cli.probe_period_ms {
        gossip.probe_period = Duration::from_millis(ms);
    }
    if let Some(ms) = cli.suspicion_ms {
        gossip.suspect_to_down = Duration::from_millis(ms);
    }
    let mut sim = Simulation::new(SimConfig {
        hosts,
        loss: cli.loss,
        seed: cli.seed,
        gossip: gossip.clone(),
        ..SimConfig::default()
    });
    let built = wall.elapsed();
    say(&format!("  {hosts} hosts: warm cluster built in {:.1} s", built.as_secs_f64()));
    let mut pick = Pick(cli.seed);
    let mut used = HashSet::new();

    // Steady state: nothing changes.
    sim.run_for(Duration::from_secs(5));
    let before = snapshot(&sim);
    sim.run_for(STEADY);
    let steady = rate(&sim, &before, STEADY);

    // Endpoint changes on random hosts, puts and deletes alternately.
    let before = snapshot(&sim);
    let t = sim.now();
    let mut watches: Vec<WatchId> = Vec::new();
    for c in 0..cli.changes {
        let h = pick.fresh(hosts, &mut used);
        watches.push(if c % 2 == 0 {
            sim.put(h, endpoint_key(h, 10), &format!("bench-{c}"))
        } else {
            sim.delete(h, endpoint_key(h, 0))
        });
        sim.run_for(CHANGE_EVERY);
    }
    let churn = rate(&sim, &before, sim.now() - t);
    sim.run_for(Duration::from_secs(5));
    let per_host: Vec<Vec<Option<Duration>>> = watches.iter().map(|w| sim.watch_delays(*w)).collect();
    let to_all: Vec<Option<Duration>> =
        per_host.iter().map(|d| d.iter().try_fold(Duration::ZERO, |m, x| x.map(|x| m.max(x)))).collect();
    let per_host: Vec<Option<Duration>> = per_host.into_iter().flatten().collect();
    let agree = sim.tables_agree();
    say(&format!(
        "  {} changes done after {:.0} s simulated ({:.0} s wall); tables agree: {}",
        cli.changes,
        sim.now().as_secs_f64(),
        wall.elapsed().as_secs_f64(),
        agree.as_ref().map_or_else(|e| e.clone(), |_| "yes".into())
    ));

    // Kills, then graceful leaves.
    let mut killed = Vec::new();
    for _ in 0..cli.kills {
        let h = pick.fresh(hosts, &mut used);
        let t = sim.now();
        sim.kill(h);
        sim.run_for(KILL_EVERY);
        killed.push(down_everywhere(&sim, h, t));
    }
    let mut left = Vec::new();
    for _ in 0..cli.leaves {
        let h = pick.fresh(hosts, &mut used);
        let t = sim.now();
        sim.leave(h);
        sim.run_for(LEAVE_EVERY);
        left.push(down_everywhere(&sim, h, t));
    }
    let counters = sim.counters();
    let simulated = sim.now();
    let wall = wall.elapsed();
    let rss = peak_rss_mib();
    drop(sim);

    let rows = [
        delay_row("endpoint change reaches a host (per change and host)", &per_host),
        delay_row("endpoint change reaches every host (per change)", &to_all),
        delay_row("killed host (SIGKILL) seen down by every live host (per kill)", &killed),
        delay_row("host that left gracefully seen down by every host (per leave)", &left),
    ];
    let rates = [
        rate_row("steady state (no changes)", steady),
        rate_row(&format!("during changes ({:.0} per second)", 1.0 / CHANGE_EVERY.as_secs_f64()), churn),
    ];
    say("");
    say(&format!(
        "### {hosts} hosts (loss {}, seed {}, probe every {} ms, suspicion {} ms)",
        cli.loss,
        cli.seed,
        gossip.probe_period.as_millis(),
        gossip.suspect_to_down.as_millis()
    ));
    say("");
    say("| measurement (ms) | p50 | p99 | max | samples |");
    say("|---|---:|---:|---:|---:|");
    for (r, _) in &rows {
        say(r);
    }
    say("");
    say(
        "| gossip sent per host | B/s (UDP payload) | B/s (with IP+UDP headers) | datagrams/s | busiest host B/s (with headers) |",
    );
    say("|---|---:|---:|---:|---:|");
    for (r, _) in &rates {
        say(r);
    }
    say("");
    let rss_text = match (rss, rss_reset) {
        (Some(r), true) => format!("{r:.0} MiB"),
        (Some(r), false) => format!("{r:.0} MiB (process peak: could not reset between sizes)"),
        (None, _) => "unknown".into(),
    };
    // What one endpoint change costs each host, whatever the rate of changes.
    let per_change = (churn.wire - steady.wire) * CHANGE_EVERY.as_secs_f64();
    say(&format!(
        "each endpoint change costs every host {per_change:.0} B sent (with headers); warm start {:.1} s; \
         {:.0} s simulated in {:.1} s wall; peak RSS {rss_text}; anti-entropy repaired {} records in {} rounds; \
         {} hosts started over after a silence",
        built.as_secs_f64(),
        simulated.as_secs_f64(),
        wall.as_secs_f64(),
        counters.sync_repaired,
        counters.sync_rounds,
        counters.rebirths,
    ));
    say("");
    Ok(json!({
        "hosts": hosts,
        "loss": cli.loss,
        "seed": cli.seed,
        "change_to_host": rows[0].1,
        "change_to_all_hosts": rows[1].1,
        "killed_down_everywhere": rows[2].1,
        "left_down_everywhere": rows[3].1,
        "steady": rates[0].1,
        "churn": rates[1].1,
        "wire_bytes_per_host_per_change": per_change,
        "tables_agree": agree.is_ok(),
        "warm_start_s": built.as_secs_f64(),
        "simulated_s": simulated.as_secs_f64(),
        "wall_s": wall.as_secs_f64(),
        "peak_rss_mib": rss,
        "counters": counters,
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    say(&format!(
        "gossip simulation: {} changes {} ms apart, {} kills {} s apart, {} leaves, loss {}",
        cli.changes,
        CHANGE_EVERY.as_millis(),
        cli.kills,
        KILL_EVERY.as_secs(),
        cli.leaves,
        cli.loss
    ));
    let mut results = Vec::new();
    for &hosts in &cli.hosts {
        anyhow::ensure!(
            hosts > cli.changes.max(cli.kills + cli.leaves + cli.changes),
            "{hosts} hosts are too few for {} changes, {} kills and {} leaves on distinct hosts",
            cli.changes,
            cli.kills,
            cli.leaves
        );
        results.push(run(&cli, hosts)?);
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
