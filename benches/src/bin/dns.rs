//! The DNS benchmark of issue 14: overlayd's embedded resolver against podman's `aardvark-dns`
//! and `dnsmasq`, all serving the same names (each endpoint's name and its aliases, A records),
//! measured with `dnsperf` from a container on the resolver's network, rounds interleaved in one
//! run:
//! - **queries per second**: dnsperf at full speed (`--outstanding` queries in flight) for
//!   `--seconds`, a random mix of the names;
//! - **latency percentiles** at a fixed offered rate (`--rate`, the issue's 30,000 queries per
//!   second): dnsperf 2.10 prints no percentiles, so it runs with `-v`, which prints each
//!   reply's latency (in µs), and the percentiles are taken over every query sent: a query that
//!   got no reply within 1 s counts as slower than every reply;
//! - **server CPU per query**: the server process's user + system time over a run, divided by
//!   the queries answered (steadier than queries per second on a shared machine);
//! - **memory per 10,000 names**: each server's resident memory (`VmRSS`) with the names loaded
//!   minus with only the client's own name, each read after the same 1 s of queries, scaled to
//!   10,000 names. For overlayd that is the whole daemon's growth: on the host of the endpoints
//!   (veths, endpoint records, gossip, dataplane tables, the name table), and on a host that
//!   holds none of them and only learns them by gossip.
//!
//! **Layout.** overlayd: a cluster in the namespace testbed; the network's endpoints, one
//! namespace each, attached with `overlayd attach --netns … --name … --alias …`, up to
//! `--per-host` on a host (a Linux bridge takes 1,023 ports, and a namespace one endpoint per
//! network) and the rest on the next host, their names reaching the first by gossip; a client
//! container attached on the first host, where dnsperf runs and asks the resolver on the
//! network's gateway; and one more host with only a container of its own, for memory. Each peer
//! runs alone in a host namespace of its own, on the same gateway address of a bridge there,
//! with a client container of the same address on that bridge; it serves the same names with
//! the same addresses (aardvark-dns from a config directory as podman writes it, dnsmasq from
//! an `--addn-hosts` file). Before the rounds the benchmark waits for the machine to be quiet
//! (`--quiet-load`), since the client and the server share its cores.
//!
//! `sudo target/release/dns --runs 3 --seconds 10` (build with `cargo build --release -p
//! overlayd -p overlayd-benches`; dnsperf, aardvark-dns and dnsmasq from scripts/install-deps).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use control::gossip::record::MAX_ALIASES;
use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::{median, process_cpu_seconds, process_rss_kib, wait_for};
use testbed::{Agent, Container, Host, Options, Testbed, netns, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "dns", about = "overlayd's DNS resolver against aardvark-dns and dnsmasq: QPS, latency, memory")]
struct Cli {
    /// Names on the network (each endpoint carries a name and up to 8 aliases).
    #[arg(long, default_value_t = 10_000)]
    names: usize,
    /// Rounds per server (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of each dnsperf run (full speed, then at the fixed rate).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// The fixed offered rate of the latency runs, queries per second.
    #[arg(long, default_value_t = 30_000)]
    rate: u32,
    /// Queries in flight at full speed (dnsperf -q).
    #[arg(long, default_value_t = 100)]
    outstanding: u32,
    /// Endpoints attached on one host at most (its bridge also holds the TAP and the client,
    /// and a Linux bridge takes 1,023 ports); the rest go to further hosts.
    #[arg(long, default_value_t = 1000)]
    per_host: usize,
    /// `overlayd attach` commands run at once.
    #[arg(long, default_value_t = 2)]
    attach_jobs: usize,
    /// Before the rounds, wait for the machine's 1-minute load average to fall below this (the
    /// setup, attaching the endpoints, raises it; so do other users of the machine)...
    #[arg(long, default_value_t = 1.5)]
    quiet_load: f64,
    /// ... for this many seconds at most (then measure anyway, and say so).
    #[arg(long, default_value_t = 600)]
    quiet_wait: u64,
    /// The overlayd binary [default: next to this one, or $OVERLAYD_BIN].
    #[arg(long)]
    overlayd: Option<PathBuf>,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

/// The overlay network of the benchmark (its subnet exists only inside the testbed's
/// namespaces), and each host's block: room for `--per-host` endpoints and the client.
const NETWORK: &str = "dnsb";
const SUBNET: &str = "10.152.0.0/16";
const BLOCK_PREFIX: &str = "21";
/// Names of an endpoint at most: its name and its aliases.
const NAMES_PER_ENDPOINT: usize = 1 + MAX_ALIASES;
/// The client container's name (the one name every server knows in its baseline).
const CLIENT: &str = "client";
/// Lines of the query file (dnsperf goes round it).
const QUERY_LINES: usize = 200_000;
/// A query with no reply after this long is lost (dnsperf -t).
const QUERY_TIMEOUT_S: u32 = 1;
/// The warm-up before each memory reading.
const WARM_UP_S: u32 = 1;
/// How long each server's CPU use is read while idle, at least.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const T: Duration = Duration::from_secs(60);

/// One endpoint: its name and aliases, and the address overlayd gave it.
struct Endpoint {
    names: Vec<String>,
    ip: Ipv4Addr,
}

/// The names of endpoint `i` (the last one may carry fewer, to make `total` names).
fn endpoint_names(i: usize, total: usize) -> Vec<String> {
    let n = NAMES_PER_ENDPOINT.min(total - i * NAMES_PER_ENDPOINT);
    let name = format!("svc{i:05}");
    let mut v = vec![name.clone()];
    v.extend((1..n).map(|k| format!("{name}-a{k}")));
    v
}

/// A small deterministic generator for the query mix (splitmix64).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Attaches `total` names' worth of endpoints to the network, each in a namespace of its own,
/// `per_host` per host, as many commands at once as `jobs`. Stops at the first failure (a
/// limit, say) and returns what was attached, with the error.
fn attach_all(c: &Cluster, total: usize, per_host: usize, jobs: usize) -> (Vec<Endpoint>, Option<anyhow::Error>) {
    let count = total.div_ceil(NAMES_PER_ENDPOINT);
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let done: Mutex<Vec<(usize, Endpoint)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let names = endpoint_names(i, total);
                    let host = i / per_host;
                    let ns = match c.hosts[host].add_netns(&format!("e{i}")) {
                        Ok(ns) => ns,
                        Err(e) => {
                            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            return;
                        }
                    };
                    let path = ns.netns_path();
                    let mut args = vec!["attach", "--network", NETWORK, "--netns", &path, "--name", &names[0]];
                    for a in &names[1..] {
                        args.extend(["--alias", a.as_str()]);
                    }
                    let ip = c.agents[host].json(&args).and_then(|ep| {
                        ep["ip"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("attach printed {ep}"))
                    });
                    match ip {
                        Ok(ip) => {
                            let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                            d.push((i, Endpoint { names, ip }));
                            if d.len().is_multiple_of(200) {
                                say(&format!(
                                    "  {} endpoints attached ({:.0} s)",
                                    d.len(),
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                        }
                        Err(e) => {
                            let e = e.context(format!("attaching endpoint {i} ({}) on host {}", names[0], host + 1));
                            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|(i, _)| *i);
    // With several jobs a failure may leave a gap: keep the endpoints before it only, so that
    // the names are a prefix of the plan (any after it stay attached, and are still served by
    // overlayd, but are neither queried nor given to the peers).
    let contiguous = done.iter().enumerate().take_while(|(k, (i, _))| k == i).count();
    done.truncate(contiguous);
    (done.into_iter().map(|(_, e)| e).collect(), failed.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// A host namespace for a peer server, laid out as an overlayd host's network is: a bridge with
/// the network's gateway address, and a container on it with the overlayd client's address.
fn peer_host(bed: &Testbed, gateway: Ipv4Addr, prefix_len: u8, client_ip: Ipv4Addr) -> Result<(Host, Container)> {
    let h = bed.add_host()?;
    let ns = h.ns().to_owned();
    netns::ip(["-n", &ns, "link", "add", "brdns", "type", "bridge"])?;
    netns::ip(["-n", &ns, "addr", "add", &format!("{gateway}/{prefix_len}"), "dev", "brdns"])?;
    netns::ip(["-n", &ns, "link", "set", "brdns", "up"])?;
    let client = h.add_container(CLIENT, "brdns", &format!("{client_ip}/{prefix_len}"))?;
    Ok((h, client))
}

/// aardvark-dns daemonizes (it forks, and the parent exits once the child is ready), so a shell
/// of the testbed starts it and stays: on SIGTERM (the testbed's cleanup, or the parent-death
/// signal the testbed gives its children if this process dies) it kills the server by the PID
/// aardvark-dns wrote. `$1` the binary, `$2` the config directory.
const AARDVARK_KEEPER: &str = r#"s=
trap 'kill $(cat "$2/aardvark.pid" 2>/dev/null) $s 2>/dev/null; exit 0' TERM INT HUP
"$1" --config "$2" --port 53 run || exit 1
sleep 2147483647 & s=$!
wait $s"#;

/// Where Debian's aardvark-dns package puts the program (podman runs it from there).
const AARDVARK_BIN: &str = "/usr/lib/podman/aardvark-dns";

/// A server under test: where its clients are, where it listens, and the process whose memory
/// is its own.
struct Server {
    label: &'static str,
    client_ns: String,
    addr: Ipv4Addr,
    pid: u32,
    /// The testbed process to stop it by (none for overlayd, which stays).
    handle: Option<Agent>,
}

impl Server {
    fn stop(&mut self) {
        let Some(h) = self.handle.take() else { return };
        let _ = h.terminate();
        // aardvark-dns is killed by its keeper, not reaped by it: wait until it is gone.
        let gone = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        };
        let _ = wait_for(Duration::from_secs(5), "the server to exit", || gone(self.pid).then_some(()));
    }
}

/// Starts aardvark-dns in `host`, serving `entries` (name list and address) on `gateway`;
/// `client_ip` is the asking container's (aardvark-dns answers only containers it knows).
fn start_aardvark(
    host: &Host,
    dir: &Path,
    gateway: Ipv4Addr,
    client_ip: Ipv4Addr,
    entries: &[Endpoint],
) -> Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // podman's format: the gateway(s) to listen on, then `id ipv4 ipv6 name,alias,…` per container.
    let mut conf = format!("{gateway}\n{CLIENT} {client_ip}  {CLIENT}\n");
    for (i, e) in entries.iter().enumerate() {
        let _ = writeln!(conf, "{i:064x} {}  {}", e.ip, e.names.join(","));
    }
    std::fs::write(dir.join(NETWORK), conf)?;
    let label = format!("aardvark-dns {}", dir.file_name().and_then(|f| f.to_str()).unwrap_or(""));
    let keeper =
        host.spawn(&label, "sh", &["-c", AARDVARK_KEEPER, "aardvark-keeper", AARDVARK_BIN, &dir.to_string_lossy()])?;
    let pid = wait_for(Duration::from_secs(20), "aardvark-dns to write its PID", || {
        std::fs::read_to_string(dir.join("aardvark.pid")).ok()?.trim().parse::<u32>().ok()
    })?;
    Ok(Server { label: "aardvark-dns", client_ns: String::new(), addr: gateway, pid, handle: Some(keeper) })
}

/// Starts dnsmasq in `host` on `gateway`, answering only from a hosts file of `entries`.
fn start_dnsmasq(
    host: &Host,
    dir: &Path,
    gateway: Ipv4Addr,
    client_ip: Ipv4Addr,
    entries: &[Endpoint],
) -> Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut hosts = format!("{client_ip} {CLIENT}\n");
    for e in entries {
        let _ = writeln!(hosts, "{} {}", e.ip, e.names.join(" "));
    }
    let (hosts_file, conf) = (dir.join("hosts"), dir.join("dnsmasq.conf"));
    std::fs::write(&hosts_file, hosts)?;
    std::fs::write(&conf, "")?;
    let label = format!("dnsmasq {}", dir.file_name().and_then(|f| f.to_str()).unwrap_or(""));
    let d = host.spawn(
        &label,
        "dnsmasq",
        &[
            "--keep-in-foreground",
            &format!("--conf-file={}", conf.display()),
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", hosts_file.display()),
            "--user=root",
            "--group=root",
            "--bind-interfaces",
            &format!("--listen-address={gateway}"),
            "--port=53",
            "--log-facility=-",
            "--pid-file=",
        ],
    )?;
    Ok(Server { label: "dnsmasq", client_ns: String::new(), addr: gateway, pid: d.pid(), handle: Some(d) })
}

/// `dig +short NAME A` from `ns` to `server`: the addresses.
fn dig(ns: &str, server: Ipv4Addr, name: &str) -> Vec<String> {
    netns::exec(ns, "dig", ["+short", "+time=1", "+tries=1", &format!("@{server}"), name, "A"])
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Waits until `server` answers a sample of the names with their addresses.
fn check_answers(s: &Server, sample: &[(&str, Ipv4Addr)]) -> Result<()> {
    for (name, ip) in sample {
        wait_for(Duration::from_secs(30), &format!("{} to answer {name} with {ip}", s.label), || {
            (dig(&s.client_ns, s.addr, name) == [ip.to_string()]).then_some(())
        })?;
    }
    Ok(())
}

/// What one dnsperf run reported.
#[derive(Debug, Default)]
struct Perf {
    qps: f64,
    sent: u64,
    lost: u64,
    noerror: u64,
    avg_ms: f64,
    /// Server CPU time per query answered, µs (filled in by the caller).
    cpu_us: f64,
    /// Every reply's latency, µs (`-v` runs only).
    latencies_us: Vec<u64>,
}

impl Perf {
    /// The q-quantile over every query sent, lost ones slower than every reply (∞).
    fn quantile_ms(&self, q: f64) -> f64 {
        let n = self.latencies_us.len() + self.lost as usize;
        if n == 0 {
            return f64::NAN;
        }
        let k = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        self.latencies_us.get(k).map_or(f64::INFINITY, |us| *us as f64 / 1000.0)
    }
}

/// Runs dnsperf in `ns` against `server` for `seconds` (at `rate` queries per second with every
/// latency printed, or at full speed with `outstanding` in flight), its output in `out`.
fn dnsperf(
    ns: &str,
    server: Ipv4Addr,
    queries: &Path,
    seconds: u32,
    rate: Option<u32>,
    outstanding: u32,
    out: &Path,
) -> Result<Perf> {
    let mut cmd = netns::command(ns, "dnsperf");
    cmd.args(["-s", &server.to_string(), "-d"]).arg(queries);
    cmd.args(["-l", &seconds.to_string(), "-t", &QUERY_TIMEOUT_S.to_string(), "-q", &outstanding.to_string()]);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string(), "-v"]);
    }
    let file = std::fs::File::create(out)?;
    cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe: dnsperf gets SIGTERM if this process dies.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot run dnsperf (install it: scripts/install-deps)")?;
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds) + 30);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dnsperf did not finish within {} s more than asked", 30);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(out)?;
    ensure!(
        status.success(),
        "dnsperf failed ({status}): {}",
        text.lines().rev().take(10).collect::<Vec<_>>().join("\n")
    );
    parse_dnsperf(&text)
}

/// Reads dnsperf's statistics and, from `-v` output, each reply's latency.
fn parse_dnsperf(text: &str) -> Result<Perf> {
    let mut p = Perf::default();
    let field = |key: &str| -> Result<&str> {
        let line = text.lines().find(|l| l.trim_start().starts_with(key)).with_context(|| format!("no {key:?}"))?;
        Ok(line.split_once(':').map_or("", |(_, v)| v.trim()))
    };
    let first = |v: &str| v.split_whitespace().next().unwrap_or("").to_owned();
    p.qps = first(field("Queries per second:")?).parse().context("queries per second")?;
    p.sent = first(field("Queries sent:")?).parse().context("queries sent")?;
    p.lost = first(field("Queries lost:")?).parse().context("queries lost")?;
    p.avg_ms = first(field("Average Latency (s):")?).parse::<f64>().context("average latency")? * 1000.0;
    let codes = field("Response codes:")?;
    p.noerror = codes
        .split(',')
        .find_map(|c| c.trim().strip_prefix("NOERROR ").map(first))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("> ") else { continue };
        let mut w = rest.split_whitespace();
        if w.next() == Some("T") {
            continue;
        }
        if let Some(s) = w.next_back().and_then(|s| s.parse::<f64>().ok()) {
            p.latencies_us.push((s * 1e6).round() as u64);
        }
    }
    p.latencies_us.sort_unstable();
    Ok(p)
}

/// A fixed-rate run, summed up: what it achieved, and its p50, p99 and p99.9 (ms).
struct Fixed {
    qps: f64,
    lost: u64,
    sent: u64,
    q: [f64; 3],
    /// Server CPU time per query answered, µs.
    cpu_us: f64,
}

/// The 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::INFINITY)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Resident memory of `s` after `WARM_UP_S` of its queries, KiB.
fn warm_rss(s: &Server, queries: &Path, out: &Path) -> Result<u64> {
    dnsperf(&s.client_ns, s.addr, queries, WARM_UP_S, None, 100, out)?;
    std::thread::sleep(Duration::from_millis(200));
    process_rss_kib(s.pid)
}

fn fmt_ms(ms: f64) -> String {
    if ms.is_infinite() { "lost".into() } else { format!("{ms:.3}") }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.names >= 1 && cli.runs >= 1 && cli.seconds >= 1, "--names, --runs and --seconds must be at least 1");
    ensure!(Path::new(AARDVARK_BIN).exists(), "no {AARDVARK_BIN}: install aardvark-dns (scripts/install-deps)");
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    say(&format!("load average at start: {}", loadavg()));
    let bed = Testbed::new(Options::new(overlayd))?;
    let dir = bed.dir().to_owned();
    let endpoints_planned = cli.names.div_ceil(NAMES_PER_ENDPOINT);
    let hosts = endpoints_planned.div_ceil(cli.per_host).max(1);
    // One more host, the observer, holds none of the endpoints: what it pays to know the names.
    let c = Cluster::form(&bed, 1, hosts)?;
    let observer = hosts;
    c.agents[0].json(&["network", "create", NETWORK, "--subnet", SUBNET, "--block-prefix", BLOCK_PREFIX])?;
    let (client, client_ip) = c.attach(0, NETWORK, CLIENT)?;
    let std::net::IpAddr::V4(client_ip) = client_ip else { bail!("the client got an IPv6 address") };
    let dns_report = |agent: &Agent| -> Result<Value> {
        let v = agent.json(&["dns", NETWORK])?;
        v["networks"].as_array().and_then(|a| a.first()).cloned().with_context(|| format!("no network in {v}"))
    };
    let gateway: Ipv4Addr = wait_for(T, "overlayd's resolver to listen", || {
        let n = dns_report(&c.agents[0]).ok()?;
        (n["listening"] == true).then(|| n["gateway"].as_str()?.parse().ok()).flatten()
    })?;
    let prefix_len: u8 = SUBNET.split_once('/').and_then(|(_, l)| l.parse().ok()).context("subnet")?;
    let (observer_client, _) = c.attach(observer, NETWORK, "observer")?;
    say(&format!(
        "{} overlayd hosts (the endpoints on h1..h{hosts}, h{} only learns them); network {NETWORK} {SUBNET}, \
         resolver on {gateway}:53; client {client_ip} on h1",
        hosts + 1,
        hosts + 1
    ));

    // The peers' hosts, each a bridge with the gateway's address and the same client.
    let (aardvark_host, aardvark_client) = peer_host(&bed, gateway, prefix_len, client_ip)?;
    let (dnsmasq_host, dnsmasq_client) = peer_host(&bed, gateway, prefix_len, client_ip)?;

    // Baselines: each server knowing only the client's name.
    let baseline_queries = dir.join("baseline-queries.txt");
    std::fs::write(&baseline_queries, format!("{CLIENT} A\n"))?;
    let overlayd_srv = Server {
        label: "overlayd",
        client_ns: client.ns().to_owned(),
        addr: gateway,
        pid: c.agents[0].pid(),
        handle: None,
    };
    let observer_srv = Server {
        label: "overlayd, a host without the endpoints",
        client_ns: observer_client.ns().to_owned(),
        addr: gateway,
        pid: c.agents[observer].pid(),
        handle: None,
    };
    check_answers(&overlayd_srv, &[(CLIENT, client_ip)])?;
    check_answers(&observer_srv, &[(CLIENT, client_ip)])?;
    let overlayd_base = warm_rss(&overlayd_srv, &baseline_queries, &dir.join("warm.out"))?;
    let observer_base = warm_rss(&observer_srv, &baseline_queries, &dir.join("warm.out"))?;
    let mut a = start_aardvark(&aardvark_host, &dir.join("aardvark-baseline"), gateway, client_ip, &[])?;
    a.client_ns = aardvark_client.ns().to_owned();
    check_answers(&a, &[(CLIENT, client_ip)])?;
    let aardvark_base = warm_rss(&a, &baseline_queries, &dir.join("warm.out"))?;
    a.stop();
    let mut d = start_dnsmasq(&dnsmasq_host, &dir.join("dnsmasq-baseline"), gateway, client_ip, &[])?;
    d.client_ns = dnsmasq_client.ns().to_owned();
    check_answers(&d, &[(CLIENT, client_ip)])?;
    let dnsmasq_base = warm_rss(&d, &baseline_queries, &dir.join("warm.out"))?;
    d.stop();
    say(&format!(
        "baseline resident memory (the client's name only): overlayd {overlayd_base} KiB (h{} \
         {observer_base} KiB), aardvark-dns {aardvark_base} KiB, dnsmasq {dnsmasq_base} KiB",
        hosts + 1
    ));

    // The names.
    let t = Instant::now();
    say(&format!(
        "attaching {endpoints_planned} endpoints ({} names, {NAMES_PER_ENDPOINT} per endpoint), {} per host at most",
        cli.names, cli.per_host
    ));
    let (endpoints, failure) = attach_all(&c, cli.names, cli.per_host, cli.attach_jobs);
    let attach_s = t.elapsed().as_secs_f64();
    if let Some(e) = &failure {
        say(&format!("ATTACH STOPPED after {} endpoints: {e:#}", endpoints.len()));
    }
    ensure!(!endpoints.is_empty(), "no endpoint could be attached");
    let names: usize = endpoints.iter().map(|e| e.names.len()).sum();
    say(&format!("attached {} endpoints ({names} names) in {attach_s:.0} s", endpoints.len()));
    let expected: HashMap<&str, Ipv4Addr> =
        endpoints.iter().flat_map(|e| e.names.iter().map(move |n| (n.as_str(), e.ip))).collect();
    let t = Instant::now();
    for i in [0, observer] {
        wait_for(Duration::from_secs(120), &format!("every name in h{}'s resolver", i + 1), || {
            let n = dns_report(&c.agents[i]).ok()?;
            let known = n["names"]
                .as_array()?
                .iter()
                .filter(|x| x["name"].as_str().is_some_and(|s| expected.contains_key(s)))
                .count();
            (known == names).then_some(())
        })?;
    }
    say(&format!(
        "the resolvers of h1 and h{} have all {names} names {:.1} s after the last attach",
        hosts + 1,
        t.elapsed().as_secs_f64()
    ));

    // The query mix: the same file for every server.
    let all_names: Vec<&str> = endpoints.iter().flat_map(|e| e.names.iter().map(String::as_str)).collect();
    let queries = dir.join("queries.txt");
    let mut mix = Mix(14);
    let mut text = String::with_capacity(QUERY_LINES * 16);
    for _ in 0..QUERY_LINES {
        let _ = writeln!(text, "{} A", all_names[(mix.next() % all_names.len() as u64) as usize]);
    }
    std::fs::write(&queries, text)?;
    let sample: Vec<(&str, Ipv4Addr)> =
        (0..12).map(|k| all_names[k * (all_names.len() - 1) / 11]).map(|n| (n, expected[n])).collect();

    let mut a = start_aardvark(&aardvark_host, &dir.join("aardvark"), gateway, client_ip, &endpoints)?;
    a.client_ns = aardvark_client.ns().to_owned();
    let mut d = start_dnsmasq(&dnsmasq_host, &dir.join("dnsmasq"), gateway, client_ip, &endpoints)?;
    d.client_ns = dnsmasq_client.ns().to_owned();
    let mut servers = [overlayd_srv, a, d];
    for s in servers.iter().chain([&observer_srv]) {
        check_answers(s, &sample)?;
    }
    let observer_loaded = warm_rss(&observer_srv, &queries, &dir.join("warm.out"))?;
    let base = [overlayd_base, aardvark_base, dnsmasq_base];
    let mut loaded = [0u64; 3];
    for (i, s) in servers.iter().enumerate() {
        loaded[i] = warm_rss(s, &queries, &dir.join("warm.out"))?;
    }
    say(&format!("all three answer the sample; load average: {}", loadavg()));
    // The wait is also the window in which each server's CPU use when idle is read (overlayd
    // has its gossip and reconciling to do; 10 s at least).
    let t = Instant::now();
    let cpu = |s: &Server| process_cpu_seconds(s.pid).unwrap_or(f64::NAN);
    let idle_from: Vec<f64> = servers.iter().map(cpu).collect();
    while (load1() >= cli.quiet_load && t.elapsed() < Duration::from_secs(cli.quiet_wait)) || t.elapsed() < IDLE_WINDOW
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    let idle_pct: Vec<f64> =
        servers.iter().zip(&idle_from).map(|(s, c0)| (cpu(s) - c0) * 100.0 / t.elapsed().as_secs_f64()).collect();
    say(&format!(
        "{} {:.0} s for a load below {}; load average before the rounds: {}",
        if load1() < cli.quiet_load { "waited" } else { "NOT QUIET after" },
        t.elapsed().as_secs_f64(),
        cli.quiet_load,
        loadavg()
    ));

    // The rounds, interleaved.
    let mut full: Vec<Vec<Perf>> = (0..3).map(|_| Vec::new()).collect();
    let mut fixed: Vec<Vec<Fixed>> = (0..3).map(|_| Vec::new()).collect();
    for run in 0..cli.runs {
        for (i, s) in servers.iter().enumerate() {
            let out = dir.join(format!("{}-{run}-full.out", s.label));
            let c0 = cpu(s);
            let mut p = dnsperf(&s.client_ns, s.addr, &queries, cli.seconds, None, cli.outstanding, &out)?;
            p.cpu_us = (cpu(s) - c0) * 1e6 / (p.sent - p.lost).max(1) as f64;
            say(&format!(
                "run {run} {:<13} full speed: {:>8.0} queries/s, {} lost, {} NOERROR of {} sent, average {:.3} ms, \
                 {:.1} µs of server CPU per query (load {})",
                s.label,
                p.qps,
                p.lost,
                p.noerror,
                p.sent,
                p.avg_ms,
                p.cpu_us,
                loadavg()
            ));
            if p.noerror + p.lost < p.sent {
                say(&format!("  NOT EVERY REPLY NOERROR: {} of {} ({})", p.noerror, p.sent, out.display()));
            }
            full[i].push(p);
            let out = dir.join(format!("{}-{run}-rate.out", s.label));
            let c0 = cpu(s);
            let p = dnsperf(&s.client_ns, s.addr, &queries, cli.seconds, Some(cli.rate), cli.outstanding, &out)?;
            let cpu_us = (cpu(s) - c0) * 1e6 / (p.sent - p.lost).max(1) as f64;
            say(&format!(
                "run {run} {:<13} at {} /s: {:>8.0} queries/s, {} lost, {cpu_us:.1} µs of server CPU per query, p50 {} \
                 ms, p99 {} ms, p99.9 {} ms, max {} ms",
                s.label,
                cli.rate,
                p.qps,
                p.lost,
                fmt_ms(p.quantile_ms(0.50)),
                fmt_ms(p.quantile_ms(0.99)),
                fmt_ms(p.quantile_ms(0.999)),
                fmt_ms(p.quantile_ms(1.0)),
            ));
            let q = [p.quantile_ms(0.50), p.quantile_ms(0.99), p.quantile_ms(0.999)];
            fixed[i].push(Fixed { qps: p.qps, lost: p.lost, sent: p.sent, q, cpu_us });
        }
    }
    let load_after = loadavg();
    let counters = dns_report(&c.agents[0]).map(|n| n["counters"].clone()).unwrap_or(Value::Null);

    say("");
    say(&format!(
        "DNS, {names} names ({} endpoints, A queries, a random mix), {} runs of {} s each, medians",
        endpoints.len(),
        cli.runs,
        cli.seconds
    ));
    say(&format!(
        "| server | queries/s at full speed ({} in flight) | runs | average latency there (ms) | at {} queries/s \
         offered: achieved | p50 / p99 / p99.9 (ms) | lost there |",
        cli.outstanding, cli.rate
    ));
    say("|---|---:|---|---:|---:|---:|---:|");
    for (i, s) in servers.iter().enumerate() {
        let qps: Vec<f64> = full[i].iter().map(|p| p.qps).collect();
        let avg: Vec<f64> = full[i].iter().map(|p| p.avg_ms).collect();
        let q = |k: usize| median(&fixed[i].iter().map(|p| p.q[k]).collect::<Vec<_>>());
        let lost: u64 = fixed[i].iter().map(|p| p.lost).sum();
        let sent: u64 = fixed[i].iter().map(|p| p.sent).sum();
        say(&format!(
            "| {} | {:.0} | {} | {:.3} | {:.0} | {} / {} / {} | {lost} of {sent} |",
            s.label,
            median(&qps),
            qps.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", "),
            median(&avg),
            median(&fixed[i].iter().map(|p| p.qps).collect::<Vec<_>>()),
            fmt_ms(q(0)),
            fmt_ms(q(1)),
            fmt_ms(q(2)),
        ));
    }
    say("");
    say(&format!(
        "| server | CPU per query at full speed (µs) | at {} queries/s (µs) | CPU when idle (% of a core) | resident \
         memory: client's name only → {names} names | per 10,000 names |",
        cli.rate
    ));
    say("|---|---:|---:|---:|---:|---:|");
    for (i, s) in servers.iter().enumerate() {
        let per_10k = (loaded[i] as f64 - base[i] as f64) * 10_000.0 / names as f64 / 1024.0;
        say(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} → {} KiB | {per_10k:.2} MiB |",
            s.label,
            median(&full[i].iter().map(|p| p.cpu_us).collect::<Vec<_>>()),
            median(&fixed[i].iter().map(|p| p.cpu_us).collect::<Vec<_>>()),
            idle_pct[i],
            base[i],
            loaded[i],
        ));
    }
    let per_10k = (observer_loaded as f64 - observer_base as f64) * 10_000.0 / names as f64 / 1024.0;
    say(&format!(
        "| {} (h{}: the names by gossip only) | | | | {observer_base} → {observer_loaded} KiB | {per_10k:.2} MiB |",
        observer_srv.label,
        hosts + 1
    ));
    say(&format!("load average after the rounds: {load_after}"));
    say(&format!("overlayd's resolver counters on h1: {counters}"));
    for s in &mut servers {
        s.stop();
    }
    Ok(())
}
