//! The gossip benchmark on real daemons: a cluster of N hosts (30 by default: 3 managers and
//! 27 workers), each a network namespace running its own `overlayd`, one container attached
//! on each. Measured:
//! - **endpoint change to every host**: a container is attached (or detached) on one host;
//!   from the moment its agent published the change to the moment each other agent learned it
//!   (both from the agents' logs, one clock: the machine's);
//! - **dead host withdrawn everywhere**: a worker's agent is SIGKILLed; from the kill to the
//!   moment each other agent confirmed it down (and withdrew it from its dataplane); then it is
//!   restarted, and the time until every agent has it back is measured too;
//! - **gossip bytes per host per second** (UDP payload, sent), in a quiet window and during the
//!   churn, from the agents' own counters (`overlayd peers`).
//!
//! `sudo target/release/gossip-testbed --hosts 30`

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Options, Testbed, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "gossip-testbed", about = "overlayd gossip convergence with real daemons in a namespace testbed")]
struct Cli {
    /// Hosts in the cluster.
    #[arg(long, default_value_t = 30)]
    hosts: usize,
    /// Of which managers.
    #[arg(long, default_value_t = 3)]
    managers: usize,
    /// Endpoint changes to measure (attaches and detaches, alternating, on rotating hosts).
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Hosts to kill (one after the other, each restarted before the next).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Seconds of the quiet window in which gossip traffic is measured.
    #[arg(long, default_value_t = 20)]
    window: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<PathBuf>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    use std::io::Write as _;
    println!("{s}");
    let _ = std::io::stdout().flush();
}

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as tracing writes it
/// (`2026-11-21T14:25:28.747136Z`).
fn parse_time(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, sec) =
        (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A parsed log line: time, message and its `key=value` fields.
struct Line {
    at: f64,
    message: String,
    fields: BTreeMap<String, String>,
}

fn lines(agent: &Agent) -> Vec<Line> {
    agent
        .log()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let at = parse_time(words.next()?)?;
            let _level = words.next()?;
            let target = words.next()?;
            if !target.starts_with("overlayd::gossip") {
                return None;
            }
            let (mut message, mut fields) = (Vec::new(), BTreeMap::new());
            for w in words {
                match w.split_once('=') {
                    Some((k, v)) => {
                        fields.insert(k.to_owned(), v.to_owned());
                    }
                    None => message.push(w),
                }
            }
            Some(Line { at, message: message.join(" "), fields })
        })
        .collect()
}

/// When each agent but `skip` first logged `message` with `field` matching, at or after
/// `since`: delay in seconds, None where it has not (yet).
fn first_seen(
    agents: &[Agent],
    skip: usize,
    since: f64,
    message: &str,
    matches: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Vec<Option<f64>> {
    agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != skip)
        .map(|(_, a)| {
            lines(a)
                .into_iter()
                .find(|l| l.at >= since && l.message == message && matches(&l.fields))
                .map(|l| l.at - since)
        })
        .collect()
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn stats(v: &[f64]) -> Value {
    json!({"p50_ms": percentile(v, 0.5) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3, "max_ms": percentile(v, 1.0) * 1e3, "samples": v.len()})
}

fn fmt(v: &Value) -> String {
    format!(
        "{:.0} / {:.0} / {:.0} ms ({} samples)",
        v["p50_ms"].as_f64().unwrap_or(f64::NAN),
        v["p99_ms"].as_f64().unwrap_or(f64::NAN),
        v["max_ms"].as_f64().unwrap_or(f64::NAN),
        v["samples"]
    )
}

/// Sent gossip bytes of every agent (from `overlayd peers`).
fn sent_bytes(agents: &[Agent]) -> Result<Vec<u64>> {
    agents
        .iter()
        .map(|a| {
            let p = a.json(&["peers"])?;
            p["counters"]["tx_bytes"].as_u64().context("no tx_bytes counter")
        })
        .collect()
}

fn arp_count(agent: &Agent) -> Option<usize> {
    let fdb = agent.fdb().ok()?;
    Some(fdb["networks"].as_array()?.iter().map(|n| n["arp"].as_array().map_or(0, Vec::len)).sum())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.hosts < cli.managers + 2 || cli.managers == 0 {
        bail!("--hosts must leave room for at least 2 workers besides the {} manager(s)", cli.managers);
    }
    let binary = match cli.overlayd.clone() {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    let mut options = Options::new(binary);
    options.log_filter = Some("info,overlayd::gossip=debug".into());
    let bed = Testbed::new(options)?;
    let n = cli.hosts;
    let started = Instant::now();
    say(&format!("forming a cluster of {n} hosts ({} managers)", cli.managers));
    let mut c = Cluster::form(&bed, cli.managers, n - cli.managers)?;
    c.await_nodes(n, &[], Duration::from_secs(120))?;
    c.agents[0].json(&["network", "create", "bench"])?;
    for i in 0..n {
        c.attach(i, "bench", &format!("c{i}"))?;
    }
    for a in &c.agents {
        wait_for(Duration::from_secs(60), "every endpoint everywhere", || (arp_count(a)? == n - 1).then_some(()))?;
    }
    say(&format!("formed, one container per host, converged in {:?}", started.elapsed()));
    let rss: Vec<u64> = c.agents.iter().filter_map(|a| testbed::measure::process_rss_kib(a.pid()).ok()).collect();
    let rss_mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;

    // Quiet window.
    let before = sent_bytes(&c.agents)?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(cli.window));
    let after = sent_bytes(&c.agents)?;
    let secs = t.elapsed().as_secs_f64();
    let quiet: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / secs).collect();
    say(&format!(
        "quiet: {:.0} B/s sent per host (mean), {:.0} max",
        quiet.iter().sum::<f64>() / n as f64,
        quiet.iter().copied().fold(0.0, f64::max)
    ));

    // Endpoint changes.
    let churn_start = (sent_bytes(&c.agents)?, Instant::now());
    let mut change_delays = Vec::new();
    let mut change_everywhere = Vec::new();
    let mut extra: Vec<(usize, String, IpAddr)> = Vec::new();
    for r in 0..cli.changes {
        let (owner, ip, put) = if r % 2 == 0 || extra.is_empty() {
            let owner = 1 + r % (n - 1);
            let name = format!("x{r}");
            let (_, ip) = c.attach(owner, "bench", &name)?;
            extra.push((owner, name, ip));
            (owner, ip, true)
        } else {
            let (owner, name, ip) = extra.remove(0);
            c.agents[owner].json(&["detach", "--name", &name])?;
            (owner, ip, false)
        };
        let ip_s = ip.to_string();
        let owner_id = (owner + 1).to_string();
        let published = wait_for(Duration::from_secs(10), "the owner's log to show the change", || {
            let msg = if put { "endpoint published" } else { "endpoint withdrawn" };
            lines(&c.agents[owner])
                .into_iter()
                .rev()
                .find(|l| l.message == msg && l.fields.get("ip") == Some(&ip_s))
                .map(|l| l.at)
        })
        .with_context(|| {
            let log = c.agents[owner].log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!("the owner's log ends with:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        })?;
        let has = |f: &BTreeMap<String, String>| {
            f.get("owner") == Some(&owner_id)
                && f.get("endpoints").is_some_and(|e| e.split(',').any(|x| x == ip_s)) == put
        };
        let seen = wait_for(Duration::from_secs(30), "every agent to learn the change", || {
            let s = first_seen(&c.agents, owner, published, "endpoints changed", has);
            s.iter().all(Option::is_some).then_some(s)
        })?;
        let delays: Vec<f64> = seen.into_iter().flatten().collect();
        change_everywhere.push(delays.iter().copied().fold(0.0, f64::max));
        change_delays.extend(delays);
        std::thread::sleep(Duration::from_millis(300));
    }
    let e = stats(&change_delays);
    say(&format!("endpoint change to each host p50/p99/max: {}", fmt(&e)));
    let ee = stats(&change_everywhere);
    say(&format!("endpoint change to every host p50/p99/max: {}", fmt(&ee)));

    // Kills.
    let mut down_everywhere = Vec::new();
    let mut down_each = Vec::new();
    let mut back_everywhere = Vec::new();
    for k in 0..cli.kills {
        let victim = n - 1 - (k % (n - cli.managers));
        let id = (victim + 1).to_string();
        let t0 = unix(SystemTime::now());
        c.agents[victim].kill()?;
        let seen = wait_for(Duration::from_secs(30), "every agent to confirm the host down", || {
            let s = first_seen(&c.agents, victim, t0, "host down", |f| f.get("node") == Some(&id));
            s.iter().all(Option::is_some).then_some(s)
        })?;
        let delays: Vec<f64> = seen.into_iter().flatten().collect();
        down_everywhere.push(delays.iter().copied().fold(0.0, f64::max));
        down_each.extend(delays);
        let t1 = unix(SystemTime::now());
        c.agents[victim] = c.hosts[victim].start_daemon::<&str>(&[])?;
        let seen = wait_for(Duration::from_secs(30), "every agent to have it back", || {
            let s = first_seen(&c.agents, victim, t1, "host alive", |f| f.get("node") == Some(&id));
            s.iter().all(Option::is_some).then_some(s)
        })?;
        back_everywhere.push(seen.into_iter().flatten().fold(0.0, f64::max));
        for a in &c.agents {
            wait_for(Duration::from_secs(30), "its endpoints back everywhere", || {
                (arp_count(a)? >= n - 1).then_some(())
            })?;
        }
        say(&format!(
            "kill {}: down everywhere after {:.0} ms; restarted, alive everywhere after {:.0} ms",
            k + 1,
            down_everywhere[k] * 1e3,
            back_everywhere[k] * 1e3
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    let churn_after = sent_bytes(&c.agents)?;
    let churn_secs = churn_start.1.elapsed().as_secs_f64();
    let churn: Vec<f64> =
        churn_start.0.iter().zip(&churn_after).map(|(b, a)| a.saturating_sub(*b) as f64 / churn_secs).collect();
    let d = stats(&down_everywhere);
    let de = stats(&down_each);
    let b = stats(&back_everywhere);
    say(&format!("dead host confirmed down at each host p50/p99/max: {}", fmt(&de)));
    say(&format!("dead host withdrawn everywhere p50/p99/max: {}", fmt(&d)));
    say(&format!("restarted host alive everywhere p50/p99/max: {}", fmt(&b)));
    let result = json!({
        "hosts": n,
        "managers": cli.managers,
        "agent_rss_kib_mean": rss_mean,
        "endpoint_change_each_host": e,
        "endpoint_change_every_host": ee,
        "dead_host_each_host": de,
        "dead_host_everywhere": d,
        "restarted_host_everywhere": b,
        "gossip_bytes_per_host_per_s_quiet_mean": quiet.iter().sum::<f64>() / n as f64,
        "gossip_bytes_per_host_per_s_quiet_max": quiet.iter().copied().fold(0.0, f64::max),
        "gossip_bytes_per_host_per_s_churn_mean": churn.iter().sum::<f64>() / n as f64,
        "gossip_bytes_per_host_per_s_churn_max": churn.iter().copied().fold(0.0, f64::max),
    });
    say("");
    say(&format!("| figure ({n} real agents, {} managers) | p50 | p99 | max |", cli.managers));
    say("|---|---:|---:|---:|");
    for (label, v) in [
        ("endpoint change, to each host", &e),
        ("endpoint change, to every host", &ee),
        ("dead host confirmed down, at each host", &de),
        ("dead host withdrawn everywhere", &d),
        ("restarted host alive everywhere", &b),
    ] {
        say(&format!(
            "| {label} | {:.0} ms | {:.0} ms | {:.0} ms |",
            v["p50_ms"].as_f64().unwrap_or(f64::NAN),
            v["p99_ms"].as_f64().unwrap_or(f64::NAN),
            v["max_ms"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    say(&format!(
        "\ngossip sent per host: {:.0} B/s quiet (max {:.0}), {:.0} B/s during the churn (max {:.0}); agent RSS {:.0} MiB mean",
        result["gossip_bytes_per_host_per_s_quiet_mean"].as_f64().unwrap_or(0.0),
        result["gossip_bytes_per_host_per_s_quiet_max"].as_f64().unwrap_or(0.0),
        result["gossip_bytes_per_host_per_s_churn_mean"].as_f64().unwrap_or(0.0),
        result["gossip_bytes_per_host_per_s_churn_max"].as_f64().unwrap_or(0.0),
        rss_mean / 1024.0
    ));
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    drop(c);
    Ok(())
}
