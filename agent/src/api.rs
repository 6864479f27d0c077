//! The local API: the running daemon answers the CLI on a Unix socket in its state dir
//! (`overlayd.sock`, mode 0600), one JSON request line and one JSON response line per
//! connection, as `docker` talks to `dockerd`. Also the optional Prometheus metrics endpoint.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dataplane::{CountersSnapshot, DropReason, MacAddr, Vni};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The socket's file name in the state dir.
pub const SOCKET_NAME: &str = "overlayd.sock";

/// What the CLI can ask.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Fdb,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// `overlayd status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub mode: String,
    pub uptime_secs: u64,
    pub underlay_addr: IpAddr,
    pub underlay_interface: String,
    pub underlay_mtu: u32,
    pub vxlan_port: u16,
    pub source_ports: String,
    /// Whether heap allocations are counted per thread (the `*_loop_allocations` counters).
    pub allocation_counting: bool,
    /// Offloads the dataplane uses (UDP GRO off if the kernel refused it).
    pub offloads: dataplane::linux::Offloads,
    pub networks: Vec<NetworkStatus>,
    pub counters: CountersSnapshot,
}

/// One network in `overlayd status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub vni: Vni,
    pub bridge: String,
    pub tap: String,
    /// What the TAP was opened with: none, or csum,tso(,uso).
    pub tap_offloads: String,
    pub mtu: u32,
    pub learning: bool,
    pub flood_list: Vec<IpAddr>,
    pub fdb_entries: usize,
    pub learned_entries: usize,
    pub arp_entries: usize,
}

/// `overlayd fdb`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdbReport {
    pub networks: Vec<NetworkFdb>,
}

/// One network's tables in `overlayd fdb`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkFdb {
    pub name: String,
    pub vni: Vni,
    pub flood_list: Vec<IpAddr>,
    pub fdb: Vec<FdbEntry>,
    pub arp: Vec<ArpEntry>,
}

/// Where a MAC lives, and who said so.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub vtep: IpAddr,
    /// `static` (configuration or control plane) or `learned` (from the data plane).
    pub origin: String,
    /// Seconds since a learned entry was last refreshed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub age_secs: Option<u64>,
}

/// An address the agent answers ARP requests for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArpEntry {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// Serves requests on `path` until the task is dropped.
pub async fn serve<F>(path: &Path, handler: F) -> Result<()>
where
    F: Fn(Request) -> Result<serde_json::Value> + Send + Sync + 'static,
{
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "local API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = tokio::io::BufReader::new(rd);
            let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
            let response = match read {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match handler(req) {
                        Ok(v) => Response::Ok(v),
                        Err(e) => Response::Error(format!("{e:#}")),
                    },
                    Err(e) => Response::Error(format!("malformed request: {e}")),
                },
                _ => return,
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = wr.write_all(&out).await;
        });
    }
}

/// Asks the daemon whose state dir is `state_dir`.
pub fn call<T: for<'de> Deserialize<'de>>(state_dir: &Path, req: Request) -> Result<T> {
    let path = socket_path(state_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the overlayd daemon at {}: is `overlayd daemon` running with --state-dir {}?",
            path.display(),
            state_dir.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    stream.write_all(&line).context("cannot send the request to the daemon")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).context("no answer from the daemon")?;
    match serde_json::from_str::<Response>(&reply).context("the daemon's answer is not valid JSON")? {
        Response::Ok(v) => {
            serde_json::from_value(v).context("the daemon's answer has an unexpected shape (different versions?)")
        }
        Response::Error(e) => bail!("the daemon refused: {e}"),
    }
}

/// Where the daemon of `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Renders counters as Prometheus text (`overlayd_<what>_total`).
pub fn prometheus(status: &StatusReport) -> String {
    use std::fmt::Write as _;
    let c = &status.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP overlayd_{name} {help}\n# TYPE overlayd_{name} counter\noverlayd_{name} {v}");
    };
    counter("tx_frames_total", "Frames read from the TAPs.", c.tx_frames);
    counter("tx_bytes_total", "Bytes of frames read from the TAPs.", c.tx_bytes);
    counter("tx_unicast_frames_total", "Frames sent to exactly one VTEP.", c.tx_unicast);
    counter("tx_flooded_frames_total", "Frames replicated to a flood list.", c.tx_flooded);
    counter("tx_datagrams_total", "Datagrams sent to the underlay.", c.tx_datagrams);
    counter("arp_replies_total", "ARP requests answered locally.", c.arp_replies);
    counter("rx_datagrams_total", "Datagrams received on the VXLAN port.", c.rx_datagrams);
    counter("rx_bytes_total", "Bytes received on the VXLAN port.", c.rx_bytes);
    counter("rx_delivered_frames_total", "Frames written to a TAP.", c.rx_delivered);
    counter("learned_entries_total", "FDB entries learned from the data plane.", c.learned);
    let _ = writeln!(
        out,
        "# HELP overlayd_dropped_total Frames and datagrams dropped, by reason.\n# TYPE overlayd_dropped_total counter"
    );
    for r in DropReason::ALL {
        let _ = writeln!(out, "overlayd_dropped_total{{reason=\"{}\"}} {}", r.name(), c.drops(*r));
    }
    out
}

/// Serves `GET /metrics` on `addr` with whatever `status` returns.
pub async fn serve_metrics<F>(addr: SocketAddr, status: F) -> Result<()>
where
    F: Fn() -> Result<StatusReport> + Send + Sync + 'static,
{
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let status = Arc::new(status);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut request_line = String::new();
            if tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut request_line)).await.is_err() {
                return;
            }
            let (code, body) = if request_line.starts_with("GET /metrics") {
                match status() {
                    Ok(s) => ("200 OK", prometheus(&s)),
                    Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
                }
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(body.as_bytes()).await;
        });
    }
}
