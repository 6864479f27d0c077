//! `testbed`: the demo (a 3-host overlayd mesh in namespaces, containers pinging and iperf3
//! across hosts, then overlayd against the Linux kernel's VXLAN) and cleanup of leftovers.

use std::net::IpAddr;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use testbed::scenario::{self, Path};
use testbed::{Options, Testbed};

#[derive(Parser)]
#[command(name = "testbed", about = "Hosts and containers as network namespaces, with real overlayd processes")]
struct Cli {
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long, global = true)]
    overlayd: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// 3 hosts with overlayd, a container on each: every pair pings, iperf3 crosses hosts,
    /// then overlayd is compared with the Linux kernel's VXLAN; everything is removed at the end.
    Demo {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// Removes namespaces left by testbed processes that no longer exist.
    Cleanup,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM: the testbed library removes what was built, then the process leaves.
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => testbed::overlayd_next_to_me()?,
    };
    match cli.command {
        Command::Demo { seconds } => demo(&Options::new(overlayd), seconds),
        Command::Cleanup => {
            // Creating a testbed sweeps leftovers; this one is removed at once.
            Testbed::new(Options::new(overlayd))?.cleanup();
            say("removed namespaces of testbed processes that no longer run");
            Ok(())
        }
    }
}

fn show(host: &str, args: &[&str], out: &str) {
    say(&format!("== {host}# overlayd {}", args.join(" ")));
    for line in out.lines() {
        say(&format!("   {line}"));
    }
}

fn demo(options: &Options, seconds: u32) -> Result<()> {
    say("== overlayd demo: 3 hosts in network namespaces, each running `overlayd daemon`");
    let bed = Testbed::new(options.clone())?;
    let hosts = bed.add_hosts(3)?;
    let agents = hosts.iter().map(|h| h.start_daemon::<&str>(&[])).collect::<Result<Vec<_>>>()?;
    for (h, a) in hosts.iter().zip(&agents) {
        say(&format!("   {}: underlay {}, overlayd pid {} (idle: not in a cluster yet)", h.name(), h.addr(), a.pid()));
    }
    let h1 = hosts[0].addr().to_string();
    let init = agents[0].json(&["init", "--advertise-addr", &h1, "--name", "h1"])?;
    let token = |k: &str| init[k].as_str().unwrap_or_default().to_owned();
    let (worker, manager) = (token("worker_token"), token("manager_token"));
    show(
        "h1",
        &["init", "--advertise-addr", &h1, "--name", "h1"],
        &format!(
            "cluster {} initialized; this host is its first manager\nworker token:  {worker}\nmanager token: {manager}",
            init["cluster_id"].as_str().unwrap_or_default()
        ),
    );
    for (i, tok, kind) in [(1usize, &manager, "manager"), (2, &worker, "worker")] {
        let me = hosts[i].addr().to_string();
        let name = hosts[i].name();
        let out = agents[i].cli(&["join", &h1, "--token", tok, "--advertise-addr", &me, "--name", name])?;
        let shown = format!("<{kind} token>");
        show(name, &["join", &h1, "--token", &shown, "--advertise-addr", &me, "--name", name], &out);
    }
    show("h3", &["node", "ls"], &agents[2].cli(&["node", "ls"])?);
    show("h2", &["network", "create", "demo"], &agents[1].cli(&["network", "create", "demo"])?);
    let mut containers = Vec::new();
    for (i, (h, a)) in hosts.iter().zip(&agents).enumerate() {
        let name = format!("c{}", i + 1);
        let ns = h.add_netns(&name)?;
        let path = ns.netns_path();
        let args = ["attach", "--network", "demo", "--netns", &path, "--name", &name];
        let ep = a.json(&args)?;
        let shown = format!(
            "attached {name}: {}/{} ({})",
            ep["ip"].as_str().unwrap_or_default(),
            ep["prefix_len"],
            ep["mac"].as_str().unwrap_or_default()
        );
        show(h.name(), &args, &shown);
        let ip: IpAddr = ep["ip"].as_str().unwrap_or_default().parse()?;
        containers.push((ns, ip));
    }
    say("== every container pings every other (ARP answered by the agents: nothing flooded)");
    for (a, ipa) in &containers {
        for (_, ipb) in &containers {
            if ipa != ipb {
                let p = a.ping_ok(*ipb, 3)?;
                say(&format!(
                    "   {ipa} -> {ipb}: {}/{} replies, rtt {:.3} ms",
                    p.received, p.transmitted, p.rtt_avg_ms
                ));
            }
        }
    }
    say(&format!("== iperf3 across hosts ({seconds} s each)"));
    for (a, b) in [(0usize, 1usize), (2, 0)] {
        let r = containers[a].0.iperf3_to(&containers[b].0, containers[b].1, seconds, 1)?;
        say(&format!("   {} -> {}: {:.2} Gbit/s", containers[a].1, containers[b].1, r.bits_per_second / 1e9));
    }
    show("h3", &["network", "inspect", "demo"], &agents[2].cli(&["network", "inspect", "demo"])?);
    show("h1", &["status"], &agents[0].cli(&["status"])?);
    drop(agents);
    bed.cleanup();

    say(&format!(
        "== overlayd vs Linux kernel VXLAN, same topology (2 hosts, container to container, {seconds} s runs)"
    ));
    let pairs = [Path::Veth, Path::KernelVxlan, Path::Overlayd]
        .into_iter()
        .map(|p| scenario::build(p, options).with_context(|| format!("building the {} setup", p.label())))
        .collect::<Result<Vec<_>>>()?;
    let summaries = scenario::compare(&pairs, seconds, 1, |line| say(&format!("   {line}")))?;
    say("");
    say(&scenario::table(&summaries));
    say("(one run each; `cargo run --release -p overlayd-benches --bin e2e` takes medians over several)");
    drop(pairs);
    say("== cleaned up: no namespace, device or process of the demo is left");
    Ok(())
}
