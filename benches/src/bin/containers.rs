//! Containers on overlayd through real runtimes, measured from the outside as a user would see
//! them, in one two-host cluster (a manager and a worker) and one run:
//! - `podman run` → first ping: from the command on host 1 (podman with overlayd as its CNI
//!   plugin) to the first reply from its container to a container on host 2;
//! - `docker run` → first ping: the same with dockerd and overlayd's Docker driver;
//! - death → withdrawn everywhere: a container killed (`podman kill`, `docker kill`, SIGKILL of
//!   an `overlayd attach --pid` process) until host 2's `network inspect` no longer lists it;
//! - throughput container to container across the hosts (iperf3, one stream) from a podman, a
//!   Docker and an `overlayd attach` container, in the same run.
//!
//! `sudo target/release/containers --runs 5` (build with `cargo build --release -p overlayd
//! -p overlayd-benches`).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use testbed::cluster::Cluster;
use testbed::dockerd::Dockerd;
use testbed::measure::{median, parse_iperf3, wait_for};
use testbed::runtimes::Podman;
use testbed::{Agent, Node, Options, Testbed, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "containers", about = "overlayd with podman and Docker: start, death and throughput timings")]
struct Cli {
    /// Runs per timing; medians are reported.
    #[arg(long, default_value_t = 5)]
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
    use std::io::Write as _;
    println!("{s}");
    let _ = std::io::stdout().flush();
}

const T: Duration = Duration::from_secs(60);

/// Pings `dst` from the namespace at `netns` (one echo, 100 ms wait) until a reply comes.
fn first_reply(netns: &str, dst: IpAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let out = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["ping", "-n", "-c", "1", "-W", "0.1", &dst.to_string()])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
    }
    bail!("no reply from {dst} within {timeout:?}")
}

/// Waits until `agent` no longer lists an endpoint with address `ip` on `network`.
fn withdrawn(agent: &Agent, network: &str, ip: Ipv4Addr) -> Result<()> {
    let ip = ip.to_string();
    wait_for(T, "the endpoint withdrawn", || {
        let v = agent.json(&["network", "inspect", network]).ok()?;
        let listed = v["endpoints"].as_array()?.iter().any(|e| e["ip"] == ip.as_str());
        (!listed).then_some(())
    })
}

/// iperf3 for `seconds` from the namespace at `netns` to `server` at `dst` (a one-off server
/// started here): Gbit/s.
fn throughput(netns: &str, server: &Node, dst: IpAddr, port: u16, seconds: u32) -> Result<f64> {
    server.iperf3_server(port)?;
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["iperf3", "-J", "-c", &dst.to_string(), "-p", &port.to_string(), "-t", &seconds.to_string()])
        .output()
        .context("cannot run iperf3")?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(parse_iperf3(&String::from_utf8_lossy(&out.stdout))?.bits_per_second / 1e9)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    let bed = Testbed::new(Options::new(overlayd))?;
    let c = Cluster::form(&bed, 1, 1)?;
    c.agents[0].json(&["network", "create", "web", "--subnet", "10.140.0.0/16"])?;
    let (peer, peer_ip): (Node, IpAddr) = c.attach(1, "web", "peer")?;
    let podman = Podman::new(&c.hosts[0], &c.agents[0], "web")?;
    let docker = Dockerd::start(&c.hosts[0], false)?;
    let plugin = c.hosts[0].ns().to_owned();
    wait_for(T, "web in Docker", || {
        docker.docker(&["network", "ls", "--format", "{{.Name}}"]).ok()?.lines().any(|l| l == "web").then_some(())
    })?;
    say(&format!("cluster of 2 hosts; containers on h1, the peer on h2 ({peer_ip}); Docker driver {plugin}"));

    let (mut p_start, mut d_start, mut p_death, mut d_death, mut a_death) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cli.runs {
        // podman run → first ping.
        let name = format!("p{run}");
        let t = Instant::now();
        podman.run(&name, &[])?;
        let netns = podman.netns(&name)?;
        first_reply(&netns, peer_ip, T)?;
        p_start.push(ms(t.elapsed()));
        let ip = podman.ip(&name)?;
        let t = Instant::now();
        podman.podman(&["kill", &name])?;
        withdrawn(&c.agents[1], "web", ip)?;
        p_death.push(ms(t.elapsed()));
        let _ = podman.podman(&["rm", "-f", &name]);

        // docker run → first ping.
        let name = format!("d{run}");
        let t = Instant::now();
        docker.run(&name, "web", &[])?;
        let netns = docker.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &name])?;
        first_reply(&netns, peer_ip, T)?;
        d_start.push(ms(t.elapsed()));
        let ip = docker.ip(&name, "web")?;
        let t = Instant::now();
        docker.docker(&["kill", &name])?;
        withdrawn(&c.agents[1], "web", ip)?;
        d_death.push(ms(t.elapsed()));
        let _ = docker.output(&["rm", "-f", &name]);

        // overlayd attach --pid, the process killed.
        let ns = c.hosts[0].add_netns(&format!("a{run}"))?;
        let mut sleeper = testbed::netns::command(ns.ns(), "sleep").arg("600").spawn()?;
        let ep = c.agents[0].json(&["attach", "--network", "web", "--pid", &sleeper.id().to_string()])?;
        let ip: Ipv4Addr = ep["ip"].as_str().and_then(|s| s.parse().ok()).context("attach printed no address")?;
        // The namespace is named too: only the process holds it once the name is gone.
        testbed::netns::delete(ns.ns());
        let t = Instant::now();
        sleeper.kill()?;
        let _ = sleeper.wait();
        withdrawn(&c.agents[1], "web", ip)?;
        a_death.push(ms(t.elapsed()));
    }
    say(&format!("runs: {}", cli.runs));
    say(&format!("podman run → first ping across hosts: median {:.0} ms ({p_start:.0?})", median(&p_start)));
    say(&format!("docker run → first ping across hosts: median {:.0} ms ({d_start:.0?})", median(&d_start)));
    say(&format!("podman kill → withdrawn on the other host: median {:.0} ms ({p_death:.0?})", median(&p_death)));
    say(&format!("docker kill → withdrawn on the other host: median {:.0} ms ({d_death:.0?})", median(&d_death)));
    say(&format!(
        "attach --pid, SIGKILL → withdrawn on the other host: median {:.0} ms ({a_death:.0?})",
        median(&a_death)
    ));

    // Throughput, each path in turn, several rounds.
    podman.run("pt", &[])?;
    docker.run("dt", "web", &[])?;
    let (attached, _) = c.attach(0, "web", "at")?;
    let paths = [
        ("overlayd attach", attached.netns_path()),
        ("podman (CNI)", podman.netns("pt")?),
        ("docker (driver)", docker.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "dt"])?),
    ];
    let mut results: Vec<Vec<f64>> = vec![vec![]; paths.len()];
    let mut port = 5201;
    for _ in 0..cli.runs.min(3) {
        for (i, (_, netns)) in paths.iter().enumerate() {
            results[i].push(throughput(netns, &peer, peer_ip, port, cli.seconds)?);
            port += 1;
        }
    }
    for (i, (label, _)) in paths.iter().enumerate() {
        let m = median(&results[i]);
        say(&format!(
            "throughput {label:<16} → h2: median {m:.2} Gbit/s ({:.2?}), {:.2}x of overlayd attach",
            results[i],
            m / median(&results[0])
        ));
    }
    Ok(())
}
