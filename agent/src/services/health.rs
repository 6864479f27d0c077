//! Health checks of this host's replicas (issue 15, item 4), run by the host each replica is
//! on, with Docker's semantics; their outcome travels in gossip, in the replica's endpoint
//! record, so that every host's DNS and VIPs follow it.
//!
//! - [`Tracker`] is the pure state machine: a replica whose service has a check starts
//!   `Starting` (no traffic); a pass makes it `Healthy`; `retries` failures in a row make it
//!   `Unhealthy`; failures within the start period do not count, unless the replica had passed
//!   already.
//! - [`ClusterRuntime::check_replicas`] is the shell: one task per replica of this host, which
//!   probes it every interval — a TCP connect or an HTTP GET from the host (the bridge's
//!   gateway reaches every container of its network), or a command run with `sh -c` in the
//!   replica's network namespace — and republishes the host's endpoints when the state
//!   changes. A replica that goes, a service removed or its check changed: its task stops.
//!
//! Not here: the service's definition (`control::service`), what DNS and the load balancer
//! do with the outcome (`crate::dns`, [`super::lb`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::gossip::Health;
use control::service::{HealthCheck, HealthProbe, Protocol, Service};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cluster::ClusterRuntime;
use crate::endpoints::gossiped;

/// One replica's health, from the outcomes of its checks.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: Health,
    failures: u32,
    /// When the replica appeared: failures before `started + start_period` do not count.
    started: Instant,
    passed_once: bool,
}

impl Tracker {
    /// A replica that appeared at `now`.
    pub fn new(now: Instant) -> Tracker {
        Tracker { state: Health::Starting, failures: 0, started: now, passed_once: false }
    }

    /// Takes a check's outcome at `now`; the new state if it changed.
    pub fn record(&mut self, check: &HealthCheck, now: Instant, passed: bool) -> Option<Health> {
        let before = self.state;
        if passed {
            self.failures = 0;
            self.passed_once = true;
            self.state = Health::Healthy;
        } else {
            let starting = !self.passed_once && now < self.started + Duration::from_millis(check.start_period_ms);
            if !starting {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= check.retries {
                    self.state = Health::Unhealthy;
                }
            }
        }
        (self.state != before).then_some(self.state)
    }
}

/// What one probe task checks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Probe {
    ip: Ipv4Addr,
    netns: PathBuf,
    check: HealthCheck,
    /// The port of an HTTP check: the service's first TCP port.
    http_port: u16,
}

/// Runs one check: whether it passed, within the check's timeout.
async fn probe_once(p: &Probe) -> bool {
    let timeout = Duration::from_millis(p.check.timeout_ms);
    let run = async {
        match &p.check.probe {
            HealthProbe::Tcp(port) => tokio::net::TcpStream::connect(SocketAddr::from((p.ip, *port))).await.is_ok(),
            HealthProbe::Http(path) => http_ok(SocketAddr::from((p.ip, p.http_port)), path).await,
            HealthProbe::Cmd(cmd) => {
                let (netns, cmd) = (p.netns.clone(), cmd.clone());
                tokio::task::spawn_blocking(move || run_in_netns(&netns, &cmd, timeout)).await.unwrap_or(false)
            }
        }
    };
    tokio::time::timeout(timeout, run).await.unwrap_or(false)
}

/// Runs `sh -c cmd` in the network namespace at `netns` (blocking): whether it exited 0
/// within `timeout` (killed, and failed, if not).
fn run_in_netns(netns: &std::path::Path, cmd: &str, timeout: Duration) -> bool {
    use std::process::{Command, Stdio};
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["sh", "-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// `GET path` answered 2xx or 3xx.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: overlayd-health\r\n\r\n", addr.ip());
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    status_passes(&head[..n])
}

/// Whether an HTTP status line says 2xx or 3xx.
fn status_passes(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"HTTP/1.") else { return false };
    matches!(rest.get(2..4), Some([b'2' | b'3', _]) if rest.get(1) == Some(&b' '))
        && rest.get(4).is_some_and(u8::is_ascii_digit)
}

impl ClusterRuntime {
    /// Checks this host's replicas whose service has a health check, for as long as the
    /// runtime lives.
    pub async fn check_replicas(self: Arc<Self>) {
        let mut views = self.follower.subscribe();
        let mut local = self.gossip.local();
        let mut running: HashMap<(String, Ipv4Addr), (Probe, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let view = self.follower.view();
            let wanted: HashMap<(String, Ipv4Addr), Probe> = {
                let store = self.endpoints.lock().await;
                store
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        let svc: &Service = view.services.get(e.service.as_ref()?)?;
                        let check = svc.health.clone()?;
                        let http_port =
                            svc.ports.iter().find(|p| p.protocol == Protocol::Tcp).map(|p| p.port).unwrap_or(80);
                        Some((
                            (e.network.clone(), e.ip),
                            Probe { ip: e.ip, netns: PathBuf::from(&e.netns), check, http_port },
                        ))
                    })
                    .collect()
            };
            running.retain(|key, (probe, task)| {
                let keep = wanted.get(key) == Some(probe) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            let mut forget = Vec::new();
            {
                let store = self.endpoints.lock().await;
                for key in store.health.keys() {
                    if !wanted.contains_key(key) {
                        forget.push(key.clone());
                    }
                }
            }
            if !forget.is_empty() {
                let mut store = self.endpoints.lock().await;
                for key in forget {
                    store.health.remove(&key);
                }
            }
            for (key, probe) in wanted {
                if running.contains_key(&key) {
                    continue;
                }
                let task = tokio::spawn(Arc::clone(&self).run_probe(key.clone(), probe.clone()));
                running.insert(key, (probe, task));
            }
            tokio::select! {
                r = views.changed() => if r.is_err() { break },
                r = local.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    }

    /// Probes one replica every interval and publishes each change of its health.
    async fn run_probe(self: Arc<Self>, key: (String, Ipv4Addr), probe: Probe) {
        let mut tracker = Tracker::new(Instant::now());
        let mut tick = tokio::time::interval(Duration::from_millis(probe.check.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let passed = probe_once(&probe).await;
            if let Some(state) = tracker.record(&probe.check, Instant::now(), passed) {
                tracing::info!(network = %key.0, replica = %key.1, health = state.as_str(), "replica health");
                let mut store = self.endpoints.lock().await;
                store.health.insert(key.clone(), state);
                self.gossip.publish_local(gossiped(&self.follower.view(), &store));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck { probe: HealthProbe::Tcp(80), interval_ms: 1_000, timeout_ms: 500, retries, start_period_ms }
    }

    #[test]
    fn starting_then_healthy_then_unhealthy_after_retries_and_back() {
        let t0 = Instant::now();
        let c = check(2, 0);
        let mut t = Tracker::new(t0);
        assert_eq!(t.state, Health::Starting);
        assert_eq!(t.record(&c, t0, true), Some(Health::Healthy));
        assert_eq!(t.record(&c, t0 + Duration::from_secs(1), false), None, "one failure is not enough");
        assert_eq!(t.record(&c, t0 + Duration::from_secs(2), true), None, "a pass resets the count");
        assert_eq!(t.record(&c, t0 + Duration::from_secs(3), false), None);
        assert_eq!(t.record(&c, t0 + Duration::from_secs(4), false), Some(Health::Unhealthy));
        assert_eq!(t.record(&c, t0 + Duration::from_secs(5), false), None);
        assert_eq!(t.record(&c, t0 + Duration::from_secs(6), true), Some(Health::Healthy));
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_it_passed_once() {
        let t0 = Instant::now();
        let c = check(1, 10_000);
        let mut t = Tracker::new(t0);
        for s in 1..10 {
            assert_eq!(t.record(&c, t0 + Duration::from_secs(s), false), None, "{s} s: still starting");
        }
        assert_eq!(t.state, Health::Starting);
        assert_eq!(t.record(&c, t0 + Duration::from_secs(11), false), Some(Health::Unhealthy));
        let mut u = Tracker::new(t0);
        u.record(&c, t0, true);
        assert_eq!(u.record(&c, t0 + Duration::from_secs(1), false), Some(Health::Unhealthy), "passed once: it counts");
    }

    #[test]
    fn http_status_lines() {
        assert!(status_passes(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_passes(b"HTTP/1.0 302 Found"));
        assert!(!status_passes(b"HTTP/1.1 404 Not Found"));
        assert!(!status_passes(b"HTTP/1.1 500"));
        assert!(!status_passes(b"SSH-2.0-OpenSSH"));
        assert!(!status_passes(b"HTTP/1.1 2"));
    }
}
