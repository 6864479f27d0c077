//! The control-plane benchmark: real overlayd daemons in network namespaces, measured from the
//! outside with the CLI a user would run.
//! - join to first ping: a new host runs `overlayd join`, attaches a container, and pings a
//!   container on another host; from the join command to the first reply;
//! - network create to usable everywhere: `overlayd network create` on a manager, then on every
//!   host (in parallel) watch `network ls` until it appears, attach a container and ping one on
//!   the first host; the time to visible on all hosts and to usable on all hosts;
//! - leader failover: SIGKILL the leader's daemon, then a write (`network create` on another
//!   manager) until it succeeds; the killed manager is restarted before the next run.
//!
//! `sudo cargo run --release -p overlayd-benches --bin control -- --runs 5`

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use testbed::cluster::Cluster;
use testbed::measure::{median, wait_for};
use testbed::{Node, Options, Testbed, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "control", about = "overlayd control-plane timings in a namespace testbed")]
struct Cli {
    /// Runs per measurement; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Managers in the cluster.
    #[arg(long, default_value_t = 3)]
    managers: usize,
    /// Workers in the cluster.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<std::path::PathBuf>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    use std::io::Write as _;
    println!("{s}");
    let _ = std::io::stdout().flush();
}

const T: Duration = Duration::from_secs(60);

/// Pings `dst` from `from` (one echo, 200 ms wait) until a reply comes.
fn first_reply(from: &Node, dst: IpAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let out = testbed::netns::command(from.ns(), "ping")
            .args(["-n", "-c", "1", "-W", "0.2", &dst.to_string()])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
    }
    bail!("no reply from {dst} within {timeout:?}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(what: &str, samples: &[f64]) -> String {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(0.0, f64::max);
    format!("| {what} | {:.0} | {min:.0} | {max:.0} | {} |", median(samples), samples.len())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    let bed = Testbed::new(Options::new(overlayd))?;
    let n = cli.managers + cli.workers;
    say(&format!("forming a cluster of {} managers and {} workers", cli.managers, cli.workers));
    let mut c = Cluster::form(&bed, cli.managers, cli.workers)?;
    c.await_nodes(n, &[], T)?;
    c.agents[0].json(&["network", "create", "bench"])?;
    let (_, anchor) = c.attach(0, "bench", "anchor")?;

    // Join to first ping.
    let (mut join_total, mut join_only) = (Vec::new(), Vec::new());
    for r in 0..cli.runs {
        let i = c.add_host(&bed)?;
        let t0 = Instant::now();
        c.join(i, 0, &c.worker_token.clone())?;
        let joined = t0.elapsed();
        let (ns, _) = c.attach(i, "bench", &format!("j{r}"))?;
        first_reply(&ns, anchor, T)?;
        let total = t0.elapsed();
        say(&format!("  join {r}: joined in {:.0} ms, first ping after {:.0} ms", ms(joined), ms(total)));
        join_only.push(ms(joined));
        join_total.push(ms(total));
    }
    let n = c.hosts.len();

    // Network create to visible and usable everywhere.
    let (mut visible, mut usable) = (Vec::new(), Vec::new());
    for r in 0..cli.runs {
        let name = format!("net{r}");
        let t0 = Instant::now();
        c.agents[1 % cli.managers].json(&["network", "create", &name])?;
        let anchor_ns = c.hosts[0].add_netns(&format!("a{r}"))?;
        let per_host: Vec<(Duration, IpAddr)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let (c, name) = (&c, &name);
                    s.spawn(move || -> Result<(Duration, IpAddr)> {
                        wait_for(T, "the network to appear", || {
                            let ls = c.agents[i].json(&["network", "ls"]).ok()?;
                            ls["networks"].as_array()?.iter().any(|x| x["name"] == name.as_str()).then_some(())
                        })?;
                        let seen = t0.elapsed();
                        let (_, ip) = c.attach(i, name, &format!("u{r}-{i}"))?;
                        Ok((seen, ip))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect::<Result<Vec<_>>>()
        })?;
        // Usable: every host's new container answers a container on the first host.
        c.agents[0].json(&[
            "attach",
            "--network",
            &name,
            "--netns",
            &anchor_ns.netns_path(),
            "--name",
            &format!("a{r}"),
        ])?;
        for (_, ip) in &per_host {
            first_reply(&anchor_ns, *ip, T)?;
        }
        let all_seen = per_host.iter().map(|(seen, _)| *seen).max().unwrap_or_default();
        let all_usable = t0.elapsed();
        say(&format!(
            "  network {r}: on every host's view after {:.0} ms, attached and pinging everywhere after {:.0} ms",
            ms(all_seen),
            ms(all_usable)
        ));
        visible.push(ms(all_seen));
        usable.push(ms(all_usable));
    }

    // Leader failover.
    let (mut elected, mut failover) = (Vec::new(), Vec::new());
    for r in 0..cli.runs {
        let leader = c.leader(cli.managers).context("no leader")?;
        let dead = c.host_of(leader);
        let other = (0..cli.managers).find(|i| *i != dead).context("one manager only")?;
        let t0 = Instant::now();
        c.agents[dead].kill()?;
        let new_leader = std::thread::scope(|s| {
            let c = &c;
            let watch = s.spawn(move || {
                wait_for(T, "a new leader", || c.leader(other).filter(|l| *l != leader)).map(|_| t0.elapsed())
            });
            wait_for(T, "a write to succeed", || c.agents[other].json(&["network", "create", &format!("fo{r}")]).ok())?;
            let took = t0.elapsed();
            anyhow::Ok((watch.join().expect("thread")?, took))
        });
        let (seen, took) = new_leader?;
        say(&format!(
            "  failover {r}: leader {leader} killed; a new leader seen after {:.0} ms, a write committed after {:.0} ms",
            ms(seen),
            ms(took)
        ));
        elected.push(ms(seen));
        failover.push(ms(took));
        c.agents[dead] = c.hosts[dead].start_daemon::<&str>(&[])?;
        c.await_nodes(n, &[], T)?;
    }

    say("");
    say("| measurement (ms) | median | min | max | runs |");
    say("|---|---:|---:|---:|---:|");
    say(&row("`overlayd join` returns", &join_only));
    say(&row("join to first ping across hosts (join + attach + ping)", &join_total));
    say(&row(&format!("network create to visible on all {n} hosts"), &visible));
    say(&row(&format!("network create to attached and pinging on all {n} hosts"), &usable));
    say(&row("leader killed (SIGKILL) to a new leader seen by another manager", &elected));
    say(&row("leader killed (SIGKILL) to the next write committed", &failover));
    drop(c);
    Ok(())
}
