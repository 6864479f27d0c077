//! The overlayd testbed: hosts and containers as network namespaces on one machine, real
//! `overlayd` processes in them, and the Linux kernel's vxlan device as reference and peer.
//!
//! **What it is.** [`Testbed::new`] makes a *switch* namespace with an underlay bridge;
//! [`Testbed::add_host`] adds a host namespace joined to it by a veth (underlay addresses
//! 198.18.0.0/15, the benchmarking range, that exist only inside these namespaces);
//! [`Host::start_overlayd`] runs the real binary there; [`Host::add_container`] adds a
//! container namespace with a veth on a bridge of the host; [`Host::add_kernel_vxlan`] builds
//! the kernel's VTEP instead. [`measure`] reads ping, iperf3 and /proc; [`scenario`] builds
//! the two-host overlayd / kernel VXLAN / plain veth comparisons the demo and the benchmark use;
//! [`peers`] sets up the userspace tunnels users pick instead (tinc, n2n, nebula, vpncloud) as
//! further paths of those comparisons; [`runtimes`] runs podman and containerd in a host, with
//! overlayd as their CNI plugin, and [`dockerd`] a Docker daemon with overlayd as its network
//! driver.
//!
//! **Safety.** Every namespace carries a prefix unique to this process and testbed
//! (`ovtb-<pid>-<n>`); the switch has no uplink and no namespace has a default route, so all
//! traffic stays inside. Dropping the [`Testbed`] — also while a test panics — stops the
//! processes it started (by PID) and deletes its namespaces; [`cleanup_all`] does the same from
//! a Ctrl-C handler; and a new testbed first removes namespaces left by a testbed process that
//! no longer exists (killed with SIGKILL, say).
//!
//! **What it is not.** Production code, or a mock: nothing here stands in for overlayd.

pub mod cluster;
pub mod dockerd;
pub mod measure;
pub mod netns;
pub mod peers;
pub mod runtimes;
pub mod scenario;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

pub use measure::{IperfStats, PingStats};

/// The file name of [`Testbed::upstreams_file`].
const UPSTREAMS_FILE: &str = "upstreams.resolv.conf";

/// Prefix of every namespace any testbed makes.
pub const PREFIX: &str = "ovtb";

/// The underlay network of every testbed (RFC 2544's benchmarking range).
pub const UNDERLAY_PREFIX_LEN: u8 = 15;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());
static SWEEP: Once = Once::new();

/// Settings of a testbed.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `overlayd` binary to run.
    pub overlayd: PathBuf,
    /// MTU of the underlay links.
    pub underlay_mtu: u32,
    /// The `vpncloud` binary for [`scenario::Path::Vpncloud`] (None: looked up, see
    /// [`peers::vpncloud_binary`]).
    pub vpncloud: Option<PathBuf>,
    /// The daemons' log filter (`OVERLAYD_LOG`; None: `$OVERLAYD_LOG`, else `info`).
    pub log_filter: Option<String>,
}

impl Options {
    /// Defaults for the given binary.
    pub fn new(overlayd: impl Into<PathBuf>) -> Options {
        Options { overlayd: overlayd.into(), underlay_mtu: 1500, vpncloud: None, log_filter: None }
    }
}

struct Inner {
    prefix: String,
    dir: PathBuf,
    options: Options,
    switch: String,
    state: Mutex<State>,
    /// Held for the whole of a cleanup, so that a second caller (the main thread dropping its
    /// testbed while the signal watcher cleans up) waits until everything is removed instead
    /// of returning, and letting the process exit, halfway.
    cleaning: Mutex<()>,
}

#[derive(Default)]
struct State {
    namespaces: Vec<String>,
    /// Every host's namespace, underlay address and underlay MAC, for the pinned neighbours.
    underlay: Vec<(String, Ipv4Addr, String)>,
    children: HashMap<u32, (String, Child)>,
    hosts: u32,
    logs: Vec<(String, PathBuf)>,
    cleaned: bool,
}

/// A set of namespaces and processes that is removed when dropped.
pub struct Testbed {
    inner: Arc<Inner>,
}

impl Testbed {
    /// Makes the switch namespace. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip`.
    pub fn new(options: Options) -> Result<Testbed> {
        ensure!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "the testbed needs root: it creates network namespaces (run the tests with sudo or as root)"
        );
        ensure!(
            options.overlayd.exists(),
            "no overlayd binary at {} (build it first: cargo build -p overlayd)",
            options.overlayd.display()
        );
        SWEEP.call_once(|| {
            sweep_stale();
            install_signal_cleanup();
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let inner = Arc::new(Inner {
            switch: format!("{prefix}-sw"),
            prefix,
            dir,
            options,
            state: Mutex::new(State::default()),
            cleaning: Mutex::new(()),
        });
        LIVE.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&inner));
        let bed = Testbed { inner };
        bed.inner.add_namespace(&bed.inner.switch)?;
        let sw = bed.inner.switch.clone();
        quiet_ipv6(&sw)?;
        netns::ip(["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        netns::ip(["-n", &sw, "link", "set", "br0", "up"])?;
        Ok(bed)
    }

    /// This testbed's namespace prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Where logs and state dirs go.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The resolv.conf every daemon of the testbed reads its DNS upstreams from (the daemon
    /// setting `dns_upstreams_file`): none until a test writes it, so that no daemon forwards
    /// a container's query beyond the testbed.
    pub fn upstreams_file(&self) -> PathBuf {
        self.inner.dir.join(UPSTREAMS_FILE)
    }

    /// The switch namespace, whose bridge `br0` carries the whole underlay (to capture it).
    pub fn switch(&self) -> Node {
        Node { ns: self.inner.switch.clone(), inner: Arc::clone(&self.inner) }
    }

    /// Adds host number n (1, 2, …) with underlay address 198.18.x.y on `ul0`.
    pub fn add_host(&self) -> Result<Host> {
        self.add_underlay_node("h")
    }

    /// Adds "the outside" for egress tests: a namespace on the underlay, wired and addressed
    /// like a host (the next host number, named `out<n>`), that runs no overlayd and has no
    /// route into any overlay subnet. A container reaches it only through its host, and its
    /// replies get back only when that host masqueraded the container's address to its own.
    pub fn add_outside(&self) -> Result<Host> {
        self.add_underlay_node("out")
    }

    /// A namespace on the underlay named `<kind><n>`, n the next host number.
    fn add_underlay_node(&self, kind: &str) -> Result<Host> {
        let index = {
            let mut st = self.inner.lock();
            st.hosts += 1;
            st.hosts
        };
        ensure!(index < 65_000, "too many hosts");
        let name = format!("{kind}{index}");
        let ns = format!("{}-{name}", self.inner.prefix);
        let addr = Ipv4Addr::new(198, 18 + (index >> 16) as u8, (index >> 8) as u8, index as u8);
        self.inner.add_namespace(&ns)?;
        quiet_ipv6(&ns)?;
        let mtu = self.inner.options.underlay_mtu.to_string();
        netns::ip([
            "link",
            "add",
            "ul0",
            "netns",
            &ns,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &name,
            "netns",
            &self.inner.switch,
            "mtu",
            &mtu,
        ])?;
        netns::ip(["-n", &self.inner.switch, "link", "set", &name, "master", "br0", "up"])?;
        let mac = format!("02:18:00:{:02x}:{:02x}:{:02x}", index >> 16 & 0xff, index >> 8 & 0xff, index & 0xff);
        netns::ip(["-n", &ns, "link", "set", "ul0", "address", &mac])?;
        netns::ip(["-n", &ns, "addr", "add", &format!("{addr}/{UNDERLAY_PREFIX_LEN}"), "dev", "ul0"])?;
        netns::ip(["-n", &ns, "link", "set", "ul0", "up"])?;
        self.inner.pin_neighbours(&ns, addr, mac)?;
        Ok(Host { node: Node { ns, inner: Arc::clone(&self.inner) }, name, addr: IpAddr::V4(addr) })
    }

    /// Adds `n` hosts.
    pub fn add_hosts(&self, n: usize) -> Result<Vec<Host>> {
        (0..n).map(|_| self.add_host()).collect()
    }

    /// Stops processes and removes namespaces now (also done on drop).
    pub fn cleanup(&self) {
        self.inner.cleanup();
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.inner.print_logs();
        }
        self.inner.cleanup();
    }
}

/// Cleans up every testbed of this process (for a Ctrl-C handler).
pub fn cleanup_all() {
    let live: Vec<_> = LIVE.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
    for t in live {
        t.cleanup();
    }
}

/// On SIGINT or SIGTERM (Ctrl-C on a test run or the demo), removes every testbed of this
/// process and exits. The handler only writes a byte to a pipe, which is async-signal-safe; a
/// watcher thread does the cleanup. A handler the program installed itself is left alone.
fn install_signal_cleanup() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    WAKE_FD.store(fds[1], Ordering::Relaxed);
    let read_fd = fds[0];
    let watcher = std::thread::Builder::new().name("testbed-signals".into()).spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reads one byte from our own pipe into a live buffer.
        let n = unsafe { libc::read(read_fd, b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            cleanup_all();
            std::process::exit(130);
        }
    });
    if watcher.is_err() {
        return;
    }
    extern "C" fn on_signal(_: libc::c_int) {
        let fd = WAKE_FD.load(Ordering::Relaxed);
        // SAFETY: write(2) is async-signal-safe; one byte from a static to our pipe.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: queries the current disposition, then installs a handler only where the
        // default one is in place; sigaction structs are plain C data.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_DFL {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
}

static WAKE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Removes namespaces (and whatever runs inside them) and directories left by testbed
/// processes that are gone.
fn sweep_stale() {
    for ns in netns::list() {
        let Some(rest) = ns.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for p in netns::pids(&ns) {
            // SAFETY: kill has no memory-safety preconditions; these processes live in a
            // namespace a dead testbed process made.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        netns::delete(&ns);
    }
    // The resolv.conf files overlayd wrote for the containers of testbeds that are gone.
    for entry in std::fs::read_dir(NETNS_ETC).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&format!("{PREFIX}-"))) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let _ = std::fs::remove_dir(NETNS_ETC);
    // And the directories (state, logs) of testbeds whose process is gone: kept after a
    // failure for a look at the logs, removed by the next run.
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&format!("{PREFIX}-"))) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            runtimes::sweep_stale_dir(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Where `ip netns exec` takes a namespace's /etc files from (overlayd writes the resolv.conf
/// of the containers it attaches there).
const NETNS_ETC: &str = "/etc/netns";

/// Removes the /etc/netns files of this testbed's namespaces (overlayd removes them on
/// detach, but not those of a daemon that was killed), and /etc/netns itself if that leaves
/// it empty.
fn remove_netns_etc(prefix: &str) {
    for entry in std::fs::read_dir(NETNS_ETC).into_iter().flatten().flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(&format!("{prefix}-"))) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let _ = std::fs::remove_dir(NETNS_ETC);
}

/// Turns IPv6 off in a namespace, so that the kernel's own IPv6 chatter (router and neighbour
/// solicitations, MLD) does not cross the overlay and blur the frame counts tests assert.
fn quiet_ipv6(ns: &str) -> Result<()> {
    netns::exec(ns, "sysctl", ["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
    Ok(())
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins the new host's underlay neighbours, and it in every other host, as permanent
    /// entries. The kernel's ARP table is one for all namespaces, and its dynamic entries are
    /// capped machine-wide (`gc_thresh3`, 1024 by default): a cluster of a few dozen hosts that
    /// all talk to each other fills it, and then new resolutions fail with ENOBUFS. Permanent
    /// entries do not count against the cap and need no ARP at all.
    fn pin_neighbours(&self, ns: &str, addr: Ipv4Addr, mac: String) -> Result<()> {
        let others = {
            let mut st = self.lock();
            let others = st.underlay.clone();
            st.underlay.push((ns.to_owned(), addr, mac.clone()));
            others
        };
        if others.is_empty() {
            return Ok(());
        }
        let mine: String =
            others.iter().map(|(_, a, m)| format!("neigh replace {a} lladdr {m} dev ul0 nud permanent\n")).collect();
        netns::ip_batch(ns, &mine)?;
        for (other, _, _) in &others {
            netns::ip([
                "-n",
                other,
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                "ul0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    fn add_namespace(&self, ns: &str) -> Result<()> {
        {
            let st = self.lock();
            ensure!(!st.cleaned, "the testbed has been cleaned up");
        }
        netns::add(ns)?;
        self.lock().namespaces.push(ns.to_owned());
        Ok(())
    }

    fn spawn(&self, label: &str, mut cmd: std::process::Command, log: Option<&Path>) -> Result<u32> {
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        cmd.stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe. If this process dies, the child gets SIGTERM and cleans up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut st = self.lock();
        ensure!(!st.cleaned, "the testbed has been cleaned up");
        let child = cmd.spawn().with_context(|| format!("cannot start {label}"))?;
        let pid = child.id();
        st.children.insert(pid, (label.to_owned(), child));
        if let Some(p) = log {
            st.logs.push((label.to_owned(), p.to_owned()));
        }
        Ok(pid)
    }

    /// Signals a child and waits up to `timeout` for it; SIGKILL after that.
    fn stop_child(&self, pid: u32, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        let (_, mut child) = self.lock().children.remove(&pid)?;
        // SAFETY: `pid` is a child we spawned and have not reaped, so it names that process.
        unsafe { libc::kill(pid as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_exited(&self, pid: u32) -> Option<ExitStatus> {
        let mut st = self.lock();
        let (_, child) = st.children.get_mut(&pid)?;
        child.try_wait().ok().flatten()
    }

    fn cleanup(&self) {
        let _whole = self.cleaning.lock().unwrap_or_else(|p| p.into_inner());
        let (children, namespaces) = {
            let mut st = self.lock();
            if st.cleaned {
                return;
            }
            st.cleaned = true;
            (std::mem::take(&mut st.children), std::mem::take(&mut st.namespaces))
        };
        // Daemons first, gracefully, so that they remove what they made.
        let mut children: Vec<_> = children.into_iter().collect();
        for (pid, _) in &children {
            // SAFETY: every pid is a child we spawned and have not reaped.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, (_, child)) in &mut children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for ns in namespaces.iter().rev() {
            netns::delete(ns);
        }
        remove_netns_etc(&self.prefix);
        if std::env::var_os("OVERLAYD_TESTBED_KEEP_LOGS").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn print_logs(&self) {
        let logs = self.lock().logs.clone();
        for (label, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            #[allow(clippy::print_stderr)] // shown by the test harness next to the failure
            {
                eprintln!("---- last lines of {label} ({}) ----", path.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Something with its own network namespace: a host or a container.
#[derive(Clone)]
pub struct Node {
    ns: String,
    inner: Arc<Inner>,
}

impl Node {
    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The namespace's path, as `overlayd attach --netns` takes it.
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    /// Runs a program inside and fails unless it succeeds.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Ok(String::from_utf8_lossy(&netns::exec(&self.ns, program, args)?.stdout).into_owned())
    }

    /// Starts `program args` inside as a long-running process of the testbed, its output in
    /// `<label>.log` of the testbed's dir; stopped by PID when the testbed goes, or by the
    /// handle ([`Agent::kill`], [`Agent::terminate`]), which serves for its PID and log only.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(&self, label: &str, program: &str, args: &[S]) -> Result<Agent> {
        let file: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let log = self.inner.dir.join(format!("{file}.log"));
        let mut cmd = netns::command(&self.ns, program);
        cmd.args(args);
        let pid = self.inner.spawn(label, cmd, Some(&log))?;
        Ok(Agent {
            inner: Arc::clone(&self.inner),
            pid,
            state_dir: self.inner.dir.clone(),
            log,
            host: label.to_owned(),
            wrapper: Vec::new(),
        })
    }

    /// `ping -c count` to `dst`; loss is reported, not an error.
    pub fn ping(&self, dst: IpAddr, count: u32) -> Result<PingStats> {
        let out = netns::command(&self.ns, "ping")
            .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "1", &dst.to_string()])
            .output()
            .context("cannot run ping (install iputils-ping)")?;
        measure::parse_ping(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("ping from {} to {dst}: {}", self.ns, String::from_utf8_lossy(&out.stderr)))
    }

    /// Fails unless `count` pings to `dst` all come back.
    pub fn ping_ok(&self, dst: IpAddr, count: u32) -> Result<PingStats> {
        let p = self.ping(dst, count)?;
        ensure!(
            p.received == p.transmitted && p.received == count,
            "ping {} -> {dst}: {}/{} replies",
            self.ns,
            p.received,
            p.transmitted
        );
        Ok(p)
    }

    /// Fast ping for latency: `count` echo requests 10 ms apart (each reply's time kept for
    /// the percentiles).
    pub fn ping_rtt(&self, dst: IpAddr, count: u32) -> Result<PingStats> {
        let out = netns::command(&self.ns, "ping")
            .args(["-n", "-c", &count.to_string(), "-i", "0.01", "-W", "1", &dst.to_string()])
            .output()
            .context("cannot run ping")?;
        measure::parse_ping(&String::from_utf8_lossy(&out.stdout))
    }

    /// Starts an iperf3 server for one test on `port`, and waits until it listens.
    pub fn iperf3_server(&self, port: u16) -> Result<u32> {
        let mut cmd = netns::command(&self.ns, "iperf3");
        cmd.args(["-s", "-1", "-p", &port.to_string()]);
        let pid = self.inner.spawn(&format!("iperf3 server in {}", self.ns), cmd, None)?;
        let needle = format!(":{port} ");
        measure::wait_for(Duration::from_secs(5), "iperf3 to listen", || {
            let out = netns::exec(&self.ns, "ss", ["-ltnH"]).ok()?;
            String::from_utf8_lossy(&out.stdout).contains(&needle).then_some(())
        })?;
        Ok(pid)
    }

    /// Runs an iperf3 TCP client test against `dst:port`.
    pub fn iperf3(&self, dst: IpAddr, port: u16, seconds: u32, streams: u32) -> Result<IperfStats> {
        let out = netns::command(&self.ns, "iperf3")
            .args([
                "-c",
                &dst.to_string(),
                "-p",
                &port.to_string(),
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ])
            .args(["--connect-timeout", "3000"])
            .output()
            .context("cannot run iperf3 (install iperf3)")?;
        measure::parse_iperf3(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("iperf3 {} -> {dst}", self.ns))
    }

    /// Runs an iperf3 test against a fresh server in `server` (one-off server, then client).
    pub fn iperf3_to(&self, server: &Node, dst: IpAddr, seconds: u32, streams: u32) -> Result<IperfStats> {
        let port = 5201;
        let pid = server.iperf3_server(port)?;
        let r = self.iperf3(dst, port, seconds, streams);
        self.inner.stop_child(pid, libc::SIGTERM, Duration::from_secs(2));
        r
    }

    /// A counter of an interface, from /sys/class/net/DEV/statistics.
    pub fn if_stat(&self, dev: &str, stat: &str) -> Result<u64> {
        let out = self.exec("cat", [format!("/sys/class/net/{dev}/statistics/{stat}")])?;
        out.trim().parse().with_context(|| format!("{dev} {stat}: {out:?}"))
    }

    /// Loads an nftables ruleset (`nft -f -`) inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = netns::command(&self.ns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        child.stdin.take().context("no stdin")?.write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "nft in {}: {}", self.ns, String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }

    /// Sends UDP `payloads` from `from` (an address of this namespace, port chosen by the
    /// kernel unless given) to `dst`, from inside the namespace.
    pub fn send_udp(&self, from: SocketAddr, dst: SocketAddr, payloads: Vec<Vec<u8>>) -> Result<()> {
        netns::within(&self.ns, move || {
            let s = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
            for p in &payloads {
                s.send_to(p, dst).with_context(|| format!("send to {dst}"))?;
            }
            Ok(())
        })
    }
}

/// A host: a namespace on the underlay, where an overlayd (or a kernel VTEP) runs.
#[derive(Clone)]
pub struct Host {
    node: Node,
    name: String,
    addr: IpAddr,
}

impl std::ops::Deref for Host {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Host {
    /// Short name (h1, h2, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Underlay address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The state dir its overlayd uses.
    pub fn state_dir(&self) -> PathBuf {
        self.node.inner.dir.join(&self.name)
    }

    /// Starts `overlayd daemon --underlay-addr <addr> <args>` (static mode) in this host and waits
    /// until it answers `overlayd status`.
    pub fn start_overlayd<S: AsRef<str>>(&self, args: &[S]) -> Result<Agent> {
        let mut all = vec!["--underlay-addr".to_owned(), self.addr.to_string()];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.start_daemon(&all)
    }

    /// Starts `overlayd daemon <args>` in this host (cluster or idle mode without static
    /// networks; resuming what its state dir holds) and waits until it answers `overlayd status`.
    pub fn start_daemon<S: AsRef<str>>(&self, args: &[S]) -> Result<Agent> {
        self.start_daemon_wrapped(Vec::new(), args)
    }

    /// [`start_daemon`](Self::start_daemon) with the host's state dir on `disk`: the daemon,
    /// and every CLI call of the [`Agent`], run in the disk's mount namespace.
    pub fn start_daemon_on<S: AsRef<str>>(&self, disk: &SmallDisk, args: &[S]) -> Result<Agent> {
        self.start_daemon_wrapped(disk.enter(), args)
    }

    /// [`Host::start_daemon`] with these environment variables besides the testbed's (e.g.
    /// `NOTIFY_SOCKET`, to play systemd).
    pub fn start_daemon_env<S: AsRef<str>>(&self, env: &[(&str, &str)], args: &[S]) -> Result<Agent> {
        self.start_daemon_full(Vec::new(), env, args)
    }

    fn start_daemon_wrapped<S: AsRef<str>>(&self, wrapper: Vec<String>, args: &[S]) -> Result<Agent> {
        self.start_daemon_full(wrapper, &[], args)
    }

    fn start_daemon_full<S: AsRef<str>>(
        &self,
        wrapper: Vec<String>,
        env: &[(&str, &str)],
        args: &[S],
    ) -> Result<Agent> {
        let inner = &self.node.inner;
        let state_dir = self.state_dir();
        let log = inner.dir.join(format!("{}.log", self.name));
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = netns::command(&self.node.ns, program);
                cmd.args(rest).arg(&inner.options.overlayd);
                cmd
            }
            None => netns::command(&self.node.ns, &inner.options.overlayd),
        };
        cmd.arg("--state-dir").arg(&state_dir).arg("daemon");
        // Docker's plugin sockets are one directory for the whole machine: each host's driver
        // gets a name of its own (its namespace's), which a test's dockerd uses with `-d`.
        cmd.env("OVERLAYD_DOCKER_PLUGIN", &self.node.ns);
        cmd.env("OVERLAYD_DOCKER_HOST", format!("unix://{}", dockerd::socket_of(&self.node.ns).display()));
        // The embedded DNS resolver forwards only where a test says ([`Testbed::upstreams_file`]),
        // never to the machine's own resolvers.
        cmd.env("OVERLAYD_DNS_UPSTREAMS_FILE", inner.dir.join(UPSTREAMS_FILE));
        cmd.envs(env.iter().copied());
        cmd.args(args.iter().map(AsRef::as_ref));
        let filter = inner.options.log_filter.clone().or_else(|| std::env::var("OVERLAYD_LOG").ok());
        cmd.env("OVERLAYD_LOG", filter.unwrap_or_else(|| "info".into()));
        let pid = inner.spawn(&format!("overlayd on {}", self.name), cmd, Some(&log))?;
        let agent = Agent { inner: Arc::clone(inner), pid, state_dir, log, host: self.name.clone(), wrapper };
        let ready = measure::wait_for(Duration::from_secs(30), "overlayd to answer status", || {
            if inner.child_exited(pid).is_some() {
                return Some(false);
            }
            agent.status().is_ok().then_some(true)
        })?;
        if !ready {
            let status = inner.stop_child(pid, libc::SIGKILL, Duration::from_secs(1));
            bail!("overlayd on {} exited ({status:?}) before it was ready:\n{}", self.name, agent.log());
        }
        Ok(agent)
    }

    /// Starts `program args` in this host's namespace as a long-running daemon, its output
    /// appended to `log`; like overlayd, it is stopped by PID when the testbed goes. For the
    /// tunnel daemons of [`peers`]: the handle serves for its PID, CPU time and log only.
    pub(crate) fn spawn_daemon<S: AsRef<std::ffi::OsStr>>(
        &self,
        label: &str,
        program: &Path,
        args: &[S],
        log: &Path,
    ) -> Result<Agent> {
        let inner = &self.node.inner;
        let mut cmd = netns::command(&self.node.ns, program);
        cmd.args(args);
        let pid = inner.spawn(label, cmd, Some(log))?;
        Ok(Agent {
            inner: Arc::clone(inner),
            pid,
            state_dir: inner.dir.clone(),
            log: log.to_owned(),
            host: self.name.clone(),
            wrapper: Vec::new(),
        })
    }

    /// Puts this host's state dir on a small disk: a tmpfs of `size` (`mount -o size=`, e.g.
    /// `1m`) mounted on it, with what the dir held copied in, inside a mount namespace of its
    /// own that a process of the testbed holds open. Nothing outside that namespace sees the
    /// tmpfs; it goes when the testbed stops the holder and the daemons started in it.
    pub fn small_disk(&self, size: &str) -> Result<SmallDisk> {
        let inner = &self.node.inner;
        let dir = self.state_dir();
        let log = inner.dir.join(format!("{}-disk.log", self.name));
        let script = r#"set -e
d="$1"
mkdir -p "$d"
rm -rf "$d.disk"
cp -a "$d" "$d.disk"
mount -t tmpfs -o "size=$2,mode=0700" overlayd-small-disk "$d"
cp -a "$d.disk/." "$d/"
rm -rf "$d.disk"
echo ready
exec sleep 2147483647"#;
        let mut cmd = netns::command(&self.node.ns, "unshare");
        cmd.args(["--mount", "--propagation", "slave", "--", "sh", "-c", script, "small-disk"]).arg(&dir).arg(size);
        let pid = inner.spawn(&format!("small disk of {}", self.name), cmd, Some(&log))?;
        measure::wait_for(Duration::from_secs(10), "the small disk to be mounted", || {
            if let Some(status) = inner.child_exited(pid) {
                return Some(Err(anyhow::anyhow!(
                    "the small disk of {} could not be made ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            std::fs::read_to_string(&log).ok()?.contains("ready").then_some(Ok(()))
        })??;
        Ok(SmallDisk { pid, dir, inner: Arc::clone(inner) })
    }

    /// Adds a container: a namespace whose `eth0` (address `cidr`, MAC derived from it as
    /// overlayd derives MACs, MTU of the bridge, and the GSO size overlayd's attach gives an
    /// interface of that MTU, [`dataplane::segment::endpoint_gso_max_size`]) is a veth on
    /// `bridge` of this host. Every path of the benchmarks gets the same containers.
    pub fn add_container(&self, name: &str, bridge: &str, cidr: &str) -> Result<Container> {
        let (ip, _) = cidr.split_once('/').context("the container address needs a prefix length, e.g. 10.0.0.1/24")?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("{cidr:?} is not an IPv4 address"))?;
        let inner = &self.node.inner;
        let ns = format!("{}-{}-{name}", inner.prefix, self.name);
        let veth: String = format!("v{name}").chars().take(15).collect();
        let mtu_out = netns::ip(["-n", &self.node.ns, "-o", "link", "show", "dev", bridge])?;
        let mtu_text = String::from_utf8_lossy(&mtu_out.stdout).into_owned();
        let mtu = mtu_text.split_whitespace().skip_while(|w| *w != "mtu").nth(1).context("no bridge MTU")?.to_owned();
        inner.add_namespace(&ns)?;
        quiet_ipv6(&ns)?;
        let o = ip.octets();
        let mac = format!("02:4f:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        netns::ip([
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "mtu",
            &mtu,
            "address",
            &mac,
            "type",
            "veth",
            "peer",
            "name",
            &veth,
            "netns",
            &self.node.ns,
            "mtu",
            &mtu,
        ])?;
        netns::ip(["-n", &self.node.ns, "link", "set", &veth, "master", bridge, "up"])?;
        netns::ip(["-n", &ns, "addr", "add", cidr, "dev", "eth0"])?;
        let gso = dataplane::segment::endpoint_gso_max_size(mtu.parse().context("the bridge's MTU")?, false);
        if gso > 0 {
            netns::ip(["-n", &ns, "link", "set", "eth0", "gso_max_size", &gso.to_string()])?;
        }
        netns::ip(["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(Container { node: Node { ns, inner: Arc::clone(inner) }, ip: IpAddr::V4(ip), mac })
    }

    /// Adds an empty container namespace (loopback only), for `overlayd attach` to fill.
    pub fn add_netns(&self, name: &str) -> Result<Node> {
        let inner = &self.node.inner;
        let ns = format!("{}-{}-{name}", inner.prefix, self.name);
        inner.add_namespace(&ns)?;
        quiet_ipv6(&ns)?;
        Ok(Node { ns, inner: Arc::clone(inner) })
    }

    /// Makes this host a Linux kernel VTEP instead of running overlayd: a vxlan device
    /// (`dstport 4789`, learning on) on `bridge`, with the peers in its all-zeros FDB entry
    /// (head-end replication), as one would to talk to overlayd.
    pub fn add_kernel_vxlan(&self, vni: u32, bridge: &str, peers: &[IpAddr]) -> Result<()> {
        self.add_kernel_vxlan_with(vni, bridge, peers, &[])
    }

    /// [`Host::add_kernel_vxlan`] with more `ip link add … type vxlan` options (e.g. `udpcsum
    /// remcsumtx remcsumrx`).
    pub fn add_kernel_vxlan_with(&self, vni: u32, bridge: &str, peers: &[IpAddr], options: &[&str]) -> Result<()> {
        let ns = &self.node.ns;
        let dev = format!("vx{vni}");
        let (vni_s, local) = (vni.to_string(), self.addr.to_string());
        let mut args =
            vec!["-n", ns, "link", "add", &dev, "type", "vxlan", "id", &vni_s, "local", &local, "dstport", "4789"];
        args.extend_from_slice(options);
        args.extend_from_slice(&["dev", "ul0"]);
        netns::ip(args)?;
        netns::ip(["-n", ns, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0"])?;
        netns::ip(["-n", ns, "link", "set", &dev, "master", bridge, "up"])?;
        netns::ip(["-n", ns, "link", "set", bridge, "up"])?;
        for p in peers {
            netns::run("bridge", ["-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", &dev, "dst", &p.to_string()])?;
        }
        Ok(())
    }
}

/// A host's state dir on a small tmpfs, in a mount namespace of its own ([`Host::small_disk`]).
pub struct SmallDisk {
    pid: u32,
    dir: PathBuf,
    inner: Arc<Inner>,
}

impl SmallDisk {
    /// The command prefix that runs a program in this disk's mount namespace.
    fn enter(&self) -> Vec<String> {
        ["nsenter", "-t", &self.pid.to_string(), "-m", "--"].map(str::to_owned).to_vec()
    }

    /// Runs `program args` in the disk's mount namespace; fails unless it succeeds.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, program: &str, args: &[S]) -> Result<Vec<u8>> {
        let mut all: Vec<std::ffi::OsString> = self.enter().into_iter().skip(1).map(Into::into).collect();
        all.push(program.into());
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        Ok(netns::run("nsenter", all)?.stdout)
    }

    /// The state dir (as the daemon sees it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The contents of a file of the state dir (`name` relative to it).
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.exec("cat", &[self.dir.join(name)])
    }

    /// Replaces a file of the state dir.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write as _;
        let path = self.dir.join(name);
        let mut child = std::process::Command::new("nsenter")
            .args(self.enter().into_iter().skip(1))
            .args(["sh", "-c", "cat > \"$1\"", "write"])
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nsenter")?;
        child.stdin.take().context("no stdin")?.write_all(bytes)?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "writing {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }

    /// The names of the files in the state dir.
    pub fn files(&self) -> Result<Vec<String>> {
        let out = self.exec("ls", &["-1a", &self.dir.to_string_lossy()])?;
        Ok(String::from_utf8_lossy(&out).lines().filter(|l| *l != "." && *l != "..").map(str::to_owned).collect())
    }

    /// Fills the disk: a file `fill` in the state dir that takes every free byte.
    pub fn fill(&self) -> Result<()> {
        let fill = self.dir.join("fill");
        // dd stops with "No space left on device", which is the point.
        let _ = std::process::Command::new("nsenter")
            .args(self.enter().into_iter().skip(1))
            .args(["dd", "if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", fill.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run dd")?;
        let df = String::from_utf8_lossy(&self.exec("df", &["--output=avail", "-B1", &self.dir.to_string_lossy()])?)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok());
        ensure!(df == Some(0), "the small disk still has {df:?} bytes free");
        Ok(())
    }

    /// Frees what [`fill`](Self::fill) took.
    pub fn free(&self) -> Result<()> {
        self.exec("rm", &["-f", &self.dir.join("fill").to_string_lossy()])?;
        Ok(())
    }

    /// Stops the process that holds the namespace (daemons started in it keep it alive).
    pub fn release(&self) {
        self.inner.stop_child(self.pid, libc::SIGTERM, Duration::from_secs(2));
    }
}

/// A container: a namespace with `eth0` on a host's bridge.
#[derive(Clone)]
pub struct Container {
    node: Node,
    ip: IpAddr,
    mac: String,
}

impl std::ops::Deref for Container {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Container {
    /// Its address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Its MAC.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Frames its `eth0` received.
    pub fn rx_packets(&self) -> Result<u64> {
        self.if_stat("eth0", "rx_packets")
    }
}

/// A running overlayd (or one of the tunnel daemons of [`peers`]).
pub struct Agent {
    inner: Arc<Inner>,
    pid: u32,
    state_dir: PathBuf,
    log: PathBuf,
    host: String,
    /// A command prefix for the CLI (entering the daemon's mount namespace), if any.
    wrapper: Vec<String>,
}

impl Agent {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its state dir.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Runs the overlayd CLI against this daemon (`overlayd --state-dir … <args>`).
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        let overlayd = self.inner.options.overlayd.to_string_lossy().into_owned();
        let mut all: Vec<std::ffi::OsString> = self.wrapper.iter().skip(1).map(Into::into).collect();
        if !self.wrapper.is_empty() {
            all.push(overlayd.clone().into());
        }
        all.extend(["--state-dir".into(), self.state_dir.clone().into()]);
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let program = self.wrapper.first().unwrap_or(&overlayd);
        let out = netns::run(program, all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the CLI with `--json` appended and parses the answer.
    pub fn json<S: AsRef<str>>(&self, args: &[S]) -> Result<Value> {
        let mut all: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        all.push("--json".into());
        let out = self.cli(&all)?;
        serde_json::from_str(&out).with_context(|| format!("overlayd {all:?} printed no JSON: {out}"))
    }

    /// `overlayd status --json`.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// `overlayd fdb --json`.
    pub fn fdb(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["fdb", "--json"])?)?)
    }

    /// The counters from `status --json`.
    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters(self.status()?["counters"].clone()))
    }

    /// Sends SIGTERM and waits (10 s at most) for the exit.
    pub fn terminate(&self) -> Result<ExitStatus> {
        self.inner.stop_child(self.pid, libc::SIGTERM, Duration::from_secs(10)).context("overlayd was not running")
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.inner.stop_child(self.pid, libc::SIGKILL, Duration::from_secs(5)).context("overlayd was not running")
    }

    /// How it exited, if it has.
    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        self.inner.child_exited(self.pid)
    }

    /// CPU seconds it has used.
    pub fn cpu_seconds(&self) -> Result<f64> {
        measure::process_cpu_seconds(self.pid)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        format!("[{}] {}", self.host, std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// A counters snapshot from `overlayd status --json`.
#[derive(Debug, Clone)]
pub struct Counters(pub Value);

impl Counters {
    /// A counter (`tx_unicast`, `rx_delivered`, …); 0 if absent.
    pub fn get(&self, name: &str) -> u64 {
        self.0["values"][name].as_u64().unwrap_or(0)
    }

    /// Drops for one reason (`not_member`, `bad_flags`, …).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.0["dropped"][reason].as_u64().unwrap_or(0)
    }

    /// Drops over every reason.
    pub fn total_dropped(&self) -> u64 {
        self.0["dropped"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }
}

/// The overlayd binary next to the running executable (target/<profile>/overlayd), for
/// binaries of this workspace; `OVERLAYD_BIN` overrides.
pub fn overlayd_next_to_me() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OVERLAYD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("no directory")?;
    for cand in [dir.join("overlayd"), dir.join("..").join("overlayd")] {
        if cand.exists() {
            return Ok(cand);
        }
    }
    bail!(
        "no overlayd binary next to {}: build it (cargo build --release -p overlayd) or set OVERLAYD_BIN",
        me.display()
    )
}
