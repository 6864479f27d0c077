//! `testbed`: the demo (a 3-host overlayd mesh in namespaces, containers pinging and iperf3
//! across hosts, then overlayd against the Linux kernel's VXLAN) and cleanup of leftovers.

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

fn demo(options: &Options, seconds: u32) -> Result<()> {
    say("== overlayd demo: 3 hosts in network namespaces, one overlay network (VNI 42)");
    let bed = Testbed::new(options.clone())?;
    let hosts = bed.add_hosts(3)?;
    let mut agents = Vec::new();
    for h in &hosts {
        let mut args = vec!["--vni".to_owned(), "42".to_owned(), "--name".into(), "demo".into()];
        for p in hosts.iter().filter(|p| p.addr() != h.addr()) {
            args.extend(["--peer".to_owned(), p.addr().to_string()]);
        }
        agents.push(h.start_overlayd(&args)?);
        say(&format!(
            "   {}: overlayd (pid {}) on underlay {}, bridge ovbr-demo",
            h.name(),
            agents.last().map_or(0, |a| a.pid()),
            h.addr()
        ));
    }
    let mut containers = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let c = h.add_container(&format!("c{}", i + 1), "ovbr-demo", &format!("10.42.0.{}/24", i + 1))?;
        say(&format!("   container c{} on {}: {} ({})", i + 1, h.name(), c.ip(), c.mac()));
        containers.push(c);
    }
    say("== every container pings every other");
    for a in &containers {
        for b in &containers {
            if a.ip() != b.ip() {
                let p = a.ping_ok(b.ip(), 3)?;
                say(&format!(
                    "   {} -> {}: {}/{} replies, rtt {:.3} ms",
                    a.ip(),
                    b.ip(),
                    p.received,
                    p.transmitted,
                    p.rtt_avg_ms
                ));
            }
        }
    }
    say(&format!("== iperf3 across hosts ({seconds} s each)"));
    for (a, b) in [(0usize, 1usize), (2, 0)] {
        let r = containers[a].iperf3_to(&containers[b], containers[b].ip(), seconds, 1)?;
        say(&format!("   {} -> {}: {:.2} Gbit/s", containers[a].ip(), containers[b].ip(), r.bits_per_second / 1e9));
    }
    say("== what the agent on h1 saw (overlayd status)");
    for line in agents[0].cli(&["status"])?.lines() {
        say(&format!("   {line}"));
    }
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
