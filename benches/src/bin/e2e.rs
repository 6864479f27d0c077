//! The end-to-end benchmark: in one run, on this machine, container-to-container TCP throughput
//! (iperf3, 1 and 4 streams), ping RTT and CPU cost per GB over
//! - a plain veth between the two hosts (the ceiling: no overlay at all),
//! - the Linux kernel's VXLAN (vxlan device on a bridge),
//! - overlayd (and, with `--variants`, overlayd with some offloads turned off, to measure what
//!   each technique gives on its own),
//!
//! all in the same two-host namespace topology. Rounds are interleaved (every path once per
//! round) so that drift in the machine's load hits each alike; the table shows medians and the
//! ratio of every row to kernel VXLAN. Needs root.
//!
//! `sudo cargo run --release -p overlayd-benches --bin e2e -- --runs 3 --seconds 10`

use std::io::Write as _;

use anyhow::{Context, Result};
use clap::Parser;
use testbed::scenario::{self, Path};
use testbed::{Options, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "e2e", about = "overlayd vs Linux kernel VXLAN vs plain veth, container to container, one run")]
struct Cli {
    /// Rounds; medians are taken over them.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds per iperf3 test.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// overlayd offload variants to measure besides the default (all), each an --offloads
    /// value: e.g. none,tap,tap+gso,tap+gso+gro (`+` separates, as `,` separates variants).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Skip the plain-veth ceiling.
    #[arg(long)]
    no_veth: bool,
    /// Also write the summaries as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<std::path::PathBuf>,
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
    let options = Options::new(overlayd);
    say(&format!("machine: {}", machine()));
    say(&format!("{} rounds of {} s iperf3 runs (1 and 4 streams) and 100 pings per path", cli.runs, cli.seconds));

    let mut plan: Vec<(Path, String, Vec<String>)> = Vec::new();
    if !cli.no_veth {
        plan.push((Path::Veth, Path::Veth.label().into(), vec![]));
    }
    plan.push((Path::KernelVxlan, Path::KernelVxlan.label().into(), vec![]));
    plan.push((Path::Overlayd, "overlayd".into(), vec![]));
    for v in &cli.variants {
        let list = v.replace('+', ",");
        plan.push((Path::Overlayd, format!("overlayd --offloads {list}"), vec!["--offloads".into(), list]));
    }
    let pairs = plan
        .iter()
        .map(|(path, label, args)| {
            scenario::build_with(*path, &options, label, args).with_context(|| format!("building {label}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let summaries = scenario::compare(&pairs, cli.seconds, cli.runs, |l| say(&format!("  {l}")))?;
    drop(pairs);
    say("");
    say(&scenario::table(&summaries));
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&summaries)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
