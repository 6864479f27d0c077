//! Services (issue 15) measured from a client container, in one three-host cluster and one run:
//! - throughput (iperf3, one stream) from a client on host 1 to a replica on host 2 through the
//!   service's VIP, directly to the replica's own address, and through haproxy;
//! - new TCP connections per second (`wrk`, one request per connection: `Connection: close`,
//!   and both servers close after each answer) through the VIP, directly, and through haproxy
//!   (`mode tcp`, an L4 proxy), to one replica and to two replicas on two hosts; against two
//!   servers: busybox `httpd`, which forks per connection, and a small server of this process
//!   (threads, no fork), so that the path's own cost shows and not only the server's;
//! - a replica's death (its `httpd` SIGKILLed; the service's health check is a TCP connect to
//!   port 80) to no client request failing: requests through the VIP every 20 ms, timed from
//!   the kill to the first of 25 successes in a row.
//!
//! - new TCP connections per second from "the outside" (a namespace on the underlay) through a
//!   published port: on the replica's own host, on another host (across the overlay), and
//!   through haproxy in the replica's host's namespace (the L4 proxy an operator would put
//!   there, which hides the client's address; the routing mesh keeps it).
//!
//! For the VIP, haproxy runs in the client container's own namespace and listens on its
//! loopback: overlayd's firewall closes the host to its containers (everything but DNS on the
//! gateway), so a proxy in the host's namespace is out of their reach; the client's namespace
//! is also where overlayd's own balancer (nftables DNAT) sits, so both balance in the same place.
//!
//! `sudo target/release/services --runs 3 --seconds 8` (build with `cargo build --release -p
//! overlayd -p overlayd-benches`; needs iperf3, wrk, haproxy and busybox-static).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use testbed::cluster::Cluster;
use testbed::measure::{median, wait_for};
use testbed::{Agent, Node, Options, Testbed, overlayd_next_to_me};

#[derive(Parser)]
#[command(name = "services", about = "overlayd services: the VIP against direct and haproxy, and a replica's death")]
struct Cli {
    /// Rounds of every measurement (and replica deaths); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per iperf3 and per wrk run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// wrk's open connections (each closed after its one request and opened again).
    #[arg(long, default_value_t = 16)]
    connections: u32,
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
/// The replicas' ports: busybox httpd and this process's server, each on three ports, one per
/// path (see [`Path`]); iperf3.
const HTTPD_PORT: u16 = 80;
const FAST_PORT: u16 = 8000;
const IPERF_PORT: u16 = 5201;
/// haproxy's listeners on the client's loopback, for `solo` (one replica) and `web` (two).
const fn proxy_port(service: Svc, server: u16) -> u16 {
    match (service, server) {
        (Svc::Solo, IPERF_PORT) => 15201,
        (Svc::Solo, HTTPD_PORT) => 8080,
        (Svc::Solo, _) => 8090,
        (Svc::Web, HTTPD_PORT) => 8081,
        (Svc::Web, _) => 8091,
    }
}

/// How a client reaches a replica. Each path ends at a port of the replica's own (the
/// server's base port + [`Path::offset`]), so that no two paths share the replica's TIME_WAIT
/// sockets: the kernel draws a connection's TCP timestamp offset from its addresses before NAT,
/// the VIP's for a connection through it, the replica's for one to it, so a SYN of one path
/// that meets a TIME_WAIT socket another path left on the same replica port is refused by PAWS
/// half the time (whichever offset is lower), and waits for its 1 s retransmission. Measured
/// while writing this bench, one port shared: a VIP round right after a direct round made 826
/// connections/s with 888 retransmission timeouts, where VIP rounds made 3,700-4,200 otherwise.
#[derive(Clone, Copy)]
enum Path {
    Vip,
    Direct,
    Haproxy,
    /// From the outside, a published port of the replica's own host.
    MeshLocal,
    /// From the outside, a published port of another host.
    MeshRemote,
    /// From the outside, haproxy in the replica's host's namespace.
    HostProxy,
}

impl Path {
    const ALL: [Path; 6] = [Path::Vip, Path::Direct, Path::Haproxy, Path::MeshLocal, Path::MeshRemote, Path::HostProxy];

    const fn offset(self) -> u16 {
        match self {
            Path::Vip => 0,
            Path::Direct => 1,
            Path::Haproxy => 2,
            Path::MeshLocal => 3,
            Path::MeshRemote => 4,
            Path::HostProxy => 5,
        }
    }
}

/// The port a published path (or the host's haproxy) answers on, for a server's base port.
const fn outside_port(server: u16, path: Path) -> u16 {
    20_000 + server + path.offset()
}
/// Seconds the containers' conntrack keeps a closed TCP connection (the kernel's default: 120).
const TIME_WAIT_TRACKED: u32 = 10;
/// Threads of this process's HTTP server per replica.
const FAST_THREADS: usize = 4;
/// The death timing: a request every PERIOD, each with REQUEST_TIMEOUT to connect and to
/// read; the clients are clean again after STREAK successes in a row; at most DEATH_LIMIT.
const PERIOD: Duration = Duration::from_millis(20);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
const STREAK: usize = 25;
const DEATH_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Svc {
    Solo,
    Web,
}

/// A container attached with `overlayd attach --netns`.
struct Ct {
    node: Node,
    ip: Ipv4Addr,
}

fn attach(c: &Cluster, i: usize, name: &str, service: Option<&str>) -> Result<Ct> {
    let node = c.hosts[i].add_netns(name)?;
    let path = node.netns_path();
    let mut args = vec!["attach", "--network", "front", "--netns", &path, "--name", name];
    if let Some(s) = service {
        args.extend(["--service", s]);
    }
    let ep = c.agents[i].json(&args).with_context(|| format!("cannot attach {name}"))?;
    let ip = ep["ip"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("no address: {ep}"))?;
    Ok(Ct { node, ip })
}

/// A replica: its container and its servers (the httpd of the VIP's port is restarted after
/// each death).
struct Replica {
    ct: Ct,
    name: String,
    dir: String,
    httpd: Agent,
    _others: Vec<Agent>,
    fast: Vec<FastServer>,
}

fn replica(bed: &Testbed, c: &Cluster, host: usize, name: &str, service: &str) -> Result<Replica> {
    let ct = attach(c, host, name, Some(service))?;
    let dir = bed.dir().join(format!("www-{name}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), format!("{name}\n"))?;
    let dir = dir.to_string_lossy().into_owned();
    let httpd = httpd(&ct, name, &dir, HTTPD_PORT)?;
    let mut others =
        vec![ct.node.spawn(&format!("iperf3-{name}"), "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?];
    let mut fast = Vec::new();
    let mut ports = vec![IPERF_PORT];
    for path in Path::ALL {
        if path.offset() > 0 {
            others.push(self::httpd(&ct, name, &dir, HTTPD_PORT + path.offset())?);
        }
        fast.push(FastServer::start(&ct, name, FAST_PORT + path.offset())?);
        ports.push(HTTPD_PORT + path.offset());
    }
    let needles: Vec<String> = ports.iter().map(|p| format!(":{p} ")).collect();
    listening(&ct.node, &needles.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(Replica { ct, name: name.to_owned(), dir, httpd, _others: others, fast })
}

fn httpd(ct: &Ct, name: &str, dir: &str, port: u16) -> Result<Agent> {
    ct.node.spawn(&format!("httpd-{name}-{port}"), "busybox", &["httpd", "-f", "-p", &port.to_string(), "-h", dir])
}

/// An HTTP server of this process in a replica's namespace: FAST_THREADS threads accepting on
/// one listener, each answering the replica's name and closing. Unlike busybox httpd it forks
/// nothing per connection, so that a connection rate through it is the path's.
struct FastServer {
    ns: String,
    port: u16,
    stop: Arc<AtomicBool>,
    /// Connections that got no answer (an error reading the request or writing the page).
    failed: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl FastServer {
    fn start(ct: &Ct, name: &str, port: u16) -> Result<FastServer> {
        let listener = testbed::netns::within(ct.node.ns(), move || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).with_context(|| format!("cannot listen on port {port}"))
        })?;
        let page: Arc<[u8]> = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}\n",
            name.len() + 1
        )
        .into_bytes()
        .into();
        let (stop, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let mut threads = Vec::with_capacity(FAST_THREADS);
        for _ in 0..FAST_THREADS {
            let (l, page, stop, failed) =
                (listener.try_clone()?, Arc::clone(&page), Arc::clone(&stop), Arc::clone(&failed));
            threads.push(std::thread::spawn(move || {
                // Ends when told to (and woken by a connection); the listener's namespace goes
                // with the testbed.
                for conn in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if conn.and_then(|s| answer(s, &page)).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(FastServer { ns: ct.node.ns().to_owned(), port, stop, failed, threads })
    }
}

impl Drop for FastServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let (n, port) = (self.threads.len(), self.port);
        let woken = testbed::netns::within(&self.ns, move || {
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let wake: std::io::Result<Vec<TcpStream>> =
                (0..n).map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(1))).collect();
            Ok(wake?)
        });
        // Joined only when every thread was woken; otherwise they end with the process.
        if woken.is_ok() {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// Reads a request's head (wrk and [`http_ok`] send it in one segment) and writes the page.
fn answer(mut s: TcpStream, page: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..])?;
        n += k;
        if k == 0 || buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    s.write_all(page)
}

/// Waits until every one of `needles` (`:PORT ` or `ADDR:PORT `) is a listening TCP socket.
fn listening(node: &Node, needles: &[&str]) -> Result<()> {
    wait_for(Duration::from_secs(10), "the servers to listen", || {
        let out = node.exec("ss", ["-ltnH"]).ok()?;
        needles.iter().all(|n| out.contains(n)).then_some(())
    })
}

/// Whether `agent` sees `n` replicas of `service`, all healthy.
fn healthy(agent: &Agent, service: &str, n: usize) -> bool {
    agent.json(&["service", "inspect", service]).ok().is_some_and(|v| {
        v["replicas"].as_array().is_some_and(|r| r.len() == n && r.iter().all(|x| x["health"] == "healthy"))
    })
}

/// One HTTP request on a new connection (from the calling thread's namespace): answered 200.
fn http_ok(to: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&to, REQUEST_TIMEOUT)?;
        s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        s.write_all(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::with_capacity(512);
        s.take(64 * 1024).read_to_end(&mut answer)?;
        Ok(answer.starts_with(b"HTTP/1.") && answer.windows(5).take(16).any(|w| w == b" 200 "))
    };
    attempt().unwrap_or(false)
}

/// Waits until an HTTP request from `client` to `to` is answered.
fn answers(client: &Ct, to: SocketAddr) -> Result<()> {
    let ns = client.node.ns().to_owned();
    wait_for(T, &format!("{to} to answer"), || {
        testbed::netns::within(&ns, move || Ok(http_ok(to))).ok().filter(|ok| *ok).map(|_| ())
    })
}

/// iperf3, one stream, from `client` to `to` for `seconds`: Gbit/s.
fn throughput(client: &Ct, to: SocketAddr, seconds: u32) -> Result<f64> {
    let r = client.node.iperf3(to.ip(), to.port(), seconds, 1)?;
    Ok(r.bits_per_second / 1e9)
}

/// What one wrk run reported.
struct Wrk {
    per_second: f64,
    /// Socket errors (connect, read, write, timeout) and answers other than 2xx/3xx.
    errors: u64,
}

/// `wrk` from `client` to `http://to/` for `seconds`, `connections` at a time, each closed
/// after its one request (`Connection: close`; both servers close anyway): requests per
/// second = new connections per second.
fn connection_rate(client: &Node, to: SocketAddr, seconds: u32, connections: u32) -> Result<Wrk> {
    let out = testbed::netns::command(client.ns(), "wrk")
        .args(["-t", "1", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), "--timeout", "2s"])
        .args(["-H", "Connection: close", &format!("http://{to}/")])
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk to {to} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let per_second = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no Requests/sec: {text}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let mut errors = 0;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest.split(',').filter_map(|f| f.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(Wrk { per_second, errors })
}

/// What a replica's death did to a client that sends a request through the VIP every PERIOD.
struct Death {
    /// From the kill to the first request of the STREAK successes in a row that follow it.
    clean_after: Duration,
    /// Requests sent after the kill, before that streak, that failed.
    failed: usize,
    /// Requests sent after the kill, before that streak.
    sent: usize,
    /// Requests that failed before the kill (should be none).
    failed_before: usize,
}

/// Starts the request loop in `client`, kills `victim`'s httpd once STREAK requests went
/// through, and waits for the loop's verdict.
fn death(client: &Ct, vip: Ipv4Addr, victim: &Replica) -> Result<Death> {
    let killed: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let done_before = Arc::new(AtomicUsize::new(0));
    let ns = client.node.ns().to_owned();
    let (k, d) = (Arc::clone(&killed), Arc::clone(&done_before));
    let to = SocketAddr::from((vip, HTTPD_PORT));
    let looper = std::thread::spawn(move || {
        testbed::netns::within(&ns, move || {
            let start = Instant::now();
            let (mut failed_before, mut failed, mut sent, mut streak) = (0, 0, 0, 0);
            let mut streak_start = start;
            while start.elapsed() < DEATH_LIMIT {
                let t = Instant::now();
                let ok = http_ok(to);
                match k.get() {
                    Some(&kill) if t >= kill => {
                        if ok {
                            if streak == 0 {
                                streak_start = t;
                            }
                            streak += 1;
                            if streak >= STREAK {
                                return Ok(Death {
                                    clean_after: streak_start - kill,
                                    failed,
                                    sent: sent - (STREAK - 1),
                                    failed_before,
                                });
                            }
                        } else {
                            failed += 1;
                            streak = 0;
                        }
                        sent += 1;
                    }
                    _ => {
                        failed_before += usize::from(!ok);
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(PERIOD.saturating_sub(t.elapsed()));
            }
            bail!("requests through the VIP still failed {DEATH_LIMIT:?} in ({failed} failed of {sent} since the kill)")
        })
    });
    let warm = wait_for(Duration::from_secs(10), "the request loop to run", || {
        (done_before.load(Ordering::Relaxed) >= STREAK).then_some(())
    });
    // Killed even if the loop did not warm up, so that the loop ends by its verdict.
    let _ = killed.set(Instant::now());
    victim.httpd.kill().context("the replica's httpd was not running")?;
    let verdict = looper.join().map_err(|_| anyhow::anyhow!("the request loop panicked"))?;
    warm?;
    verdict
}

/// haproxy's configuration: TCP (L4) proxies on the client's loopback, round robin, one per
/// service and replica port.
fn haproxy_config(solo: &Replica, web: &[Replica]) -> String {
    let mut cfg = String::from(
        "global\n    maxconn 4096\n\
         defaults\n    mode tcp\n    option splice-auto\n    timeout connect 2s\n    timeout client 30s\n    \
         timeout server 30s\n",
    );
    let services = [(Svc::Solo, std::slice::from_ref(solo)), (Svc::Web, web)];
    for (svc, replicas) in services {
        for server in [HTTPD_PORT, FAST_PORT, IPERF_PORT] {
            if svc == Svc::Web && server == IPERF_PORT {
                continue;
            }
            let port = if server == IPERF_PORT { server } else { server + Path::Haproxy.offset() };
            cfg += &format!("listen p{}\n", proxy_port(svc, server));
            cfg += &format!("    bind 127.0.0.1:{}\n    balance roundrobin\n", proxy_port(svc, server));
            for r in replicas {
                cfg += &format!("    server {} {}:{port}\n", r.name, r.ct.ip);
            }
        }
    }
    cfg
}

/// haproxy in a host's namespace: TCP (L4) proxies on its underlay address `at` to `solo`'s
/// servers (the host reaches its own containers), what an operator without a routing mesh
/// would run on the host of a replica.
fn host_haproxy_config(at: std::net::IpAddr, solo: &Replica) -> String {
    let mut cfg = String::from(
        "global\n    maxconn 4096\n\
         defaults\n    mode tcp\n    option splice-auto\n    timeout connect 2s\n    timeout client 30s\n    \
         timeout server 30s\n",
    );
    for server in [HTTPD_PORT, FAST_PORT] {
        let port = outside_port(server, Path::HostProxy);
        cfg += &format!("listen h{port}\n    bind {at}:{port}\n");
        cfg += &format!("    server {} {}:{}\n", solo.name, solo.ct.ip, server + Path::HostProxy.offset());
    }
    cfg
}

/// Whether one request from `node` to `http://to/` is answered.
fn answered(node: &Node, to: SocketAddr) -> bool {
    testbed::netns::within(node.ns(), move || Ok(http_ok(to))).unwrap_or(false)
}

/// The 1-, 5- and 15-minute load averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Connections the kernel tracks in a namespace (the VIP's table makes it track them all), and
/// its sockets in TIME_WAIT.
fn tracked(node: &Node) -> String {
    let ct = node
        .exec("cat", ["/proc/sys/net/netfilter/nf_conntrack_count"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let tw = node.exec("ss", ["-tanH", "state", "time-wait"]).map(|s| s.lines().count()).unwrap_or(0);
    format!("{ct} tracked, {tw} in TIME_WAIT")
}

fn vip_of(v: &serde_json::Value) -> Result<Ipv4Addr> {
    v["vip"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("no VIP: {v}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let overlayd = match cli.overlayd {
        Some(p) => p,
        None => overlayd_next_to_me()?,
    };
    for tool in ["iperf3", "wrk", "haproxy", "busybox"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.status.success();
        if !found {
            bail!("{tool} is not installed (scripts/install-deps)");
        }
    }
    say(&format!("load average at the start: {}", load()));
    let bed = Testbed::new(Options::new(overlayd))?;
    let c = Cluster::form(&bed, 1, 2)?;
    c.await_nodes(3, &[], T)?;
    c.agents[0].json(&["network", "create", "front"])?;
    // `solo` is published: each server's port of the two published paths.
    let published: Vec<String> = [HTTPD_PORT, FAST_PORT]
        .into_iter()
        .flat_map(|server| {
            [Path::MeshLocal, Path::MeshRemote]
                .map(|p| format!("{}:{}/tcp", outside_port(server, p), server + p.offset()))
        })
        .collect();
    let create = |name: &str| -> Result<Ipv4Addr> {
        let mut args = vec!["service", "create", name, "--network", "front"];
        if name == "solo" {
            for p in &published {
                args.extend(["--publish", p.as_str()]);
            }
        }
        args.extend(["--port", "5201/tcp", "--port", "80/tcp", "--port", "8000/tcp"]);
        args.extend(["--health-tcp", "80", "--health-interval", "500ms", "--health-timeout", "400ms"]);
        args.extend(["--health-retries", "2"]);
        vip_of(&c.agents[0].json(&args).with_context(|| format!("service create {name}"))?)
    };
    // `solo`: one replica on host 2, so that the VIP and the direct path end at the same server.
    // `web`: a replica on host 2 and one on host 3, for the spread and the deaths.
    let solo_vip = create("solo")?;
    let web_vip = create("web")?;
    let solo = replica(&bed, &c, 1, "solo1", "solo")?;
    let mut web = [replica(&bed, &c, 1, "web2", "web")?, replica(&bed, &c, 2, "web3", "web")?];
    let client = attach(&c, 0, "client", None)?;
    wait_for(T, "solo's and web's replicas healthy on the client's host", || {
        (healthy(&c.agents[0], "solo", 1) && healthy(&c.agents[0], "web", 2)).then_some(())
    })?;
    // Every container here tracks its connections (the VIP's table needs conntrack), and a
    // closed one stays tracked for the kernel's 120 s of TIME_WAIT: at thousands of connections
    // a second the client's table (262,144 entries) would fill within a round and drop new
    // ones. 10 s, the same for every path.
    for node in std::iter::once(&client.node).chain(std::iter::once(&solo).chain(&web).map(|r| &r.ct.node)) {
        node.exec("sysctl", ["-qw", &format!("net.netfilter.nf_conntrack_tcp_timeout_time_wait={TIME_WAIT_TRACKED}")])?;
    }
    let haproxy_cfg = bed.dir().join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_config(&solo, &web))?;
    let _haproxy = client.node.spawn("haproxy", "haproxy", &["-db", "-f", &haproxy_cfg.to_string_lossy()])?;
    let proxied = |svc: Svc, port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, proxy_port(svc, port)));
    // The outside, and haproxy in the namespace of solo1's host (h2), on its underlay address.
    let outside = bed.add_outside()?;
    let h2 = c.hosts[1].addr();
    let host_cfg = bed.dir().join("haproxy-h2.cfg");
    std::fs::write(&host_cfg, host_haproxy_config(h2, &solo))?;
    let _host_haproxy = c.hosts[1].spawn("haproxy-h2", "haproxy", &["-db", "-f", &host_cfg.to_string_lossy()])?;
    for node in [&*outside, &*c.hosts[0], &*c.hosts[1]] {
        node.exec("sysctl", ["-qw", &format!("net.netfilter.nf_conntrack_tcp_timeout_time_wait={TIME_WAIT_TRACKED}")])?;
    }
    let needles: Vec<String> = [
        (Svc::Solo, HTTPD_PORT),
        (Svc::Solo, FAST_PORT),
        (Svc::Solo, IPERF_PORT),
        (Svc::Web, HTTPD_PORT),
        (Svc::Web, FAST_PORT),
    ]
    .map(|(s, p)| format!("{} ", proxied(s, p)))
    .into();
    listening(&client.node, &needles.iter().map(String::as_str).collect::<Vec<_>>())?;
    say(&format!(
        "cluster of 3 hosts; client {} on h1; solo (VIP {solo_vip}): solo1 {} on h2; web (VIP {web_vip}): web2 {} on \
         h2, web3 {} on h3; haproxy {} in the client's namespace",
        client.ip,
        solo.ct.ip,
        web[0].ct.ip,
        web[1].ct.ip,
        haproxy_version()
    ));

    // Throughput and new connections per second, every path in every round, the order rotated.
    let iperf_paths = [
        ("VIP", SocketAddr::from((solo_vip, IPERF_PORT))),
        ("direct", SocketAddr::from((solo.ct.ip, IPERF_PORT))),
        ("haproxy", proxied(Svc::Solo, IPERF_PORT)),
    ];
    // For each server: VIP, direct, haproxy to solo1; VIP, haproxy to web2 and web3.
    let conn_paths: Vec<(String, SocketAddr)> = [(HTTPD_PORT, "httpd"), (FAST_PORT, "in-bench")]
        .into_iter()
        .flat_map(|(port, server)| {
            [
                (format!("{server}: VIP, 1 replica"), SocketAddr::from((solo_vip, port))),
                (format!("{server}: direct, 1 replica"), SocketAddr::from((solo.ct.ip, port + Path::Direct.offset()))),
                (format!("{server}: haproxy, 1 replica"), proxied(Svc::Solo, port)),
                (format!("{server}: VIP, 2 replicas"), SocketAddr::from((web_vip, port))),
                (format!("{server}: haproxy, 2 replicas"), proxied(Svc::Web, port)),
            ]
        })
        .collect();
    for (_, to) in &conn_paths {
        answers(&client, *to)?;
    }
    let (h1, h2) = (c.hosts[0].addr(), c.hosts[1].addr());
    let outside_paths: Vec<(String, SocketAddr)> = [(HTTPD_PORT, "httpd"), (FAST_PORT, "in-bench")]
        .into_iter()
        .flat_map(|(port, server)| {
            [
                (format!("{server}: published, h2"), SocketAddr::new(h2, outside_port(port, Path::MeshLocal))),
                (format!("{server}: published, h1"), SocketAddr::new(h1, outside_port(port, Path::MeshRemote))),
                (format!("{server}: haproxy on h2"), SocketAddr::new(h2, outside_port(port, Path::HostProxy))),
            ]
        })
        .collect();
    for (label, to) in &outside_paths {
        wait_for(T, label, || answered(&outside, *to).then_some(()))?;
    }
    let mut gbps: Vec<Vec<f64>> = vec![vec![]; iperf_paths.len()];
    let mut rate: Vec<Vec<f64>> = vec![vec![]; conn_paths.len()];
    let mut errors = vec![0u64; conn_paths.len()];
    let mut outside_rate: Vec<Vec<f64>> = vec![vec![]; outside_paths.len()];
    let mut outside_errors = vec![0u64; outside_paths.len()];
    for run in 0..cli.runs {
        for k in 0..iperf_paths.len() {
            let i = (k + run) % iperf_paths.len();
            let (label, to) = iperf_paths[i];
            let g = throughput(&client, to, cli.seconds).with_context(|| format!("iperf3 through {label}"))?;
            say(&format!("round {}: iperf3 {label:<8} {g:.2} Gbit/s", run + 1));
            gbps[i].push(g);
        }
        for k in 0..conn_paths.len() {
            let i = (k + run) % conn_paths.len();
            let (label, to) = &conn_paths[i];
            let w = connection_rate(&client.node, *to, cli.seconds, cli.connections)
                .with_context(|| format!("wrk through {label}"))?;
            say(&format!(
                "round {}: wrk {label:<30} {:>6.0} connections/s, {} errors; client: {}",
                run + 1,
                w.per_second,
                w.errors,
                tracked(&client.node)
            ));
            rate[i].push(w.per_second);
            errors[i] += w.errors;
        }
        for k in 0..outside_paths.len() {
            let i = (k + run) % outside_paths.len();
            let (label, to) = &outside_paths[i];
            let w = connection_rate(&outside, *to, cli.seconds, cli.connections)
                .with_context(|| format!("wrk from the outside through {label}"))?;
            say(&format!(
                "round {}: wrk outside {label:<24} {:>6.0} connections/s, {} errors",
                run + 1,
                w.per_second,
                w.errors
            ));
            outside_rate[i].push(w.per_second);
            outside_errors[i] += w.errors;
        }
    }
    say(&format!("load average after the throughput and connection rounds: {}", load()));

    // Deaths: web2 and web3 in turn, each restarted and healthy again before the next.
    let mut deaths = Vec::new();
    for run in 0..cli.runs {
        let i = run % web.len();
        let d = death(&client, web_vip, &web[i])?;
        say(&format!(
            "round {}: {} killed: clean after {:.0} ms; {} of the {} requests sent meanwhile failed ({} failed before \
             the kill)",
            run + 1,
            web[i].name,
            ms(d.clean_after),
            d.failed,
            d.sent,
            d.failed_before
        ));
        deaths.push(d);
        web[i].httpd = httpd(&web[i].ct, &web[i].name, &web[i].dir, HTTPD_PORT)?;
        listening(&web[i].ct.node, &[&format!(":{HTTPD_PORT} ")])?;
        wait_for(T, "the restarted replica healthy on the client's host", || {
            healthy(&c.agents[0], "web", 2).then_some(())
        })?;
        answers(&client, SocketAddr::from((web_vip, HTTPD_PORT)))?;
    }
    say(&format!("load average at the end: {}", load()));
    let unanswered: u64 =
        std::iter::once(&solo).chain(&web).flat_map(|r| &r.fast).map(|f| f.failed.load(Ordering::Relaxed)).sum();

    // The table.
    let m = |v: &[f64]| median(v);
    say("");
    say(&format!(
        "medians of {} rounds of {} s (wrk: {} connections, 1 thread; one request per connection)",
        cli.runs, cli.seconds, cli.connections
    ));
    say("");
    say("| figure | through the VIP | direct to the replica | through haproxy | VIP / direct | VIP / haproxy |");
    say("|---|---:|---:|---:|---:|---:|");
    let (gv, gd, gh) = (m(&gbps[0]), m(&gbps[1]), m(&gbps[2]));
    say(&format!(
        "| iperf3, 1 stream, Gbit/s (h1 → h2) | {gv:.2} | {gd:.2} | {gh:.2} | {:.2}x | {:.2}x |",
        gv / gd,
        gv / gh
    ));
    for (j, server) in ["busybox httpd", "in-bench server"].iter().enumerate() {
        let r = |i: usize| m(&rate[5 * j + i]);
        let (v, d, h, v2, h2) = (r(0), r(1), r(2), r(3), r(4));
        say(&format!(
            "| new connections/s, {server}, 1 replica (h2) | {v:.0} | {d:.0} | {h:.0} | {:.2}x | {:.2}x |",
            v / d,
            v / h
        ));
        say(&format!(
            "| new connections/s, {server}, 2 replicas (h2, h3) | {v2:.0} | - | {h2:.0} | - | {:.2}x |",
            v2 / h2
        ));
    }
    say("");
    say(
        "| from the outside, new connections/s | published port, replica's host (h2) | published port, another host (h1) | haproxy on h2 | published h2 / haproxy | published h1 / haproxy |",
    );
    say("|---|---:|---:|---:|---:|---:|");
    for (j, server) in ["busybox httpd", "in-bench server"].iter().enumerate() {
        let r = |i: usize| m(&outside_rate[3 * j + i]);
        let (local, remote, proxy) = (r(0), r(1), r(2));
        say(&format!(
            "| {server}, 1 replica (h2) | {local:.0} | {remote:.0} | {proxy:.0} | {:.2}x | {:.2}x |",
            local / proxy,
            remote / proxy
        ));
    }
    let clean: Vec<f64> = deaths.iter().map(|d| ms(d.clean_after)).collect();
    let failed: Vec<f64> = deaths.iter().map(|d| d.failed as f64).collect();
    say("");
    say(&format!(
        "replica death (httpd SIGKILLed) → no request through the VIP failing ({STREAK} in a row, one every {} ms): \
         median {:.0} ms ({clean:.0?}); requests failed meanwhile: median {:.0} ({failed:.0?})",
        PERIOD.as_millis(),
        m(&clean),
        m(&failed),
    ));
    say(&format!("rounds: iperf3 Gbit/s VIP {:.2?}, direct {:.2?}, haproxy {:.2?}", gbps[0], gbps[1], gbps[2]));
    for (i, (label, _)) in conn_paths.iter().enumerate() {
        say(&format!("rounds: connections/s {label}: {:.0?}, wrk errors {}", rate[i], errors[i]));
    }
    for (i, (label, _)) in outside_paths.iter().enumerate() {
        say(&format!(
            "rounds: connections/s from the outside, {label}: {:.0?}, wrk errors {}",
            outside_rate[i], outside_errors[i]
        ));
    }
    say(&format!("in-bench server: {unanswered} connections unanswered (wrk cuts its open ones at the end of a run)"));
    Ok(())
}
