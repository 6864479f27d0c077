//! The two-host comparisons shared by the demo and the end-to-end benchmark: a container on
//! each of two hosts talking over overlayd, over the Linux kernel's vxlan device, or over one of
//! the userspace tunnels of [`peers`], or (the ceiling) the two hosts talking directly over their
//! underlay veths.

use std::net::IpAddr;

use anyhow::Result;

use crate::measure::{self, IperfStats, MachineCpu, PingStats};
use crate::{Agent, Node, Options, Testbed, peers};

/// What carries the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Path {
    /// Host to host over the underlay veths and bridge: no overlay at all (the ceiling).
    Veth,
    /// Container to container over Linux kernel VXLAN (vxlan device on a bridge).
    KernelVxlan,
    /// Container to container over overlayd.
    Overlayd,
    /// Container to container over overlayd on an encrypted network (static mode as
    /// [`Path::Overlayd`], with a pre-shared `--key-file`: AES-256-GCM, the same sealing as a
    /// cluster's `network create --encrypted`).
    OverlaydEncrypted,
    /// Container to container over tinc 1.0 in switch mode, without encryption ([`peers`]).
    Tinc,
    /// Container to container over n2n 1.x edges (Twofish: 1.x cannot turn it off) ([`peers`]).
    N2n,
    /// Host to host over nebula (L3, AES-256-GCM) ([`peers`]).
    Nebula,
    /// Container to container over vpncloud in TAP switch mode, unencrypted ([`peers`]).
    Vpncloud,
    /// tinc 1.0 in switch mode with its default cipher and digest (Blowfish-CBC, HMAC-SHA1
    /// truncated to 4 bytes) ([`peers`]).
    TincEncrypted,
    /// vpncloud in TAP switch mode with `--algorithm aes256` (AES-256-GCM) ([`peers`]).
    VpncloudEncrypted,
    /// Container to container over `tap-floor`, the bare TAP + UDP-socket forwarder (TAP
    /// offloads, UDP GSO and GRO, no segmentation, checksums or tables; not VXLAN): the floor
    /// under any TAP-based userspace dataplane ([`peers`]).
    TapFloor,
}

impl Path {
    /// Name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Path::Veth => "plain veth (ceiling)",
            Path::KernelVxlan => "Linux kernel VXLAN",
            Path::Overlayd => "overlayd",
            Path::OverlaydEncrypted => "overlayd --encrypted (AES-256-GCM, MTU 1418)",
            Path::Tinc => "tinc 1.0 (switch, Cipher = none, Digest = none, MTU 1450)",
            Path::N2n => "n2n 1.3 (TAP, Twofish: no off switch in 1.x, MTU 1360)",
            Path::Nebula => "nebula (L3, host to host, AES-256-GCM, MTU 1440)",
            Path::Vpncloud => "vpncloud 2 (TAP switch, --algorithm plain, MTU 1450)",
            Path::TincEncrypted => "tinc 1.0 (switch, default Blowfish-CBC + SHA1, MTU 1440)",
            Path::VpncloudEncrypted => "vpncloud 2 (TAP switch, --algorithm aes256, MTU 1420)",
            Path::TapFloor => "tap-floor (bare TAP + UDP GSO/GRO forwarder, not VXLAN; the floor)",
        }
    }
}

/// The VNI the comparisons use.
pub const VNI: u32 = 100;

/// A built two-host setup, ready to measure. Dropping it removes it.
pub struct Pair {
    pub path: Path,
    /// Name in tables (the path's label, or a variant's).
    pub label: String,
    pub client: Node,
    pub server: Node,
    pub server_ip: IpAddr,
    /// The overlayd agents; on a [`peers`] path, the tunnel daemons (for their CPU time).
    pub agents: Vec<Agent>,
    // Declared last: dropped after the handles above.
    pub bed: Testbed,
}

/// Builds one setup.
pub fn build(path: Path, options: &Options) -> Result<Pair> {
    build_with(path, options, path.label(), &[])
}

/// Builds one setup named `label`; overlayd daemons get `overlayd_args` too (e.g. an
/// `--offloads` variant).
pub fn build_with(path: Path, options: &Options, label: &str, overlayd_args: &[String]) -> Result<Pair> {
    let bed = Testbed::new(options.clone())?;
    let h = bed.add_hosts(2)?;
    let (client, server, server_ip, agents) = match path {
        Path::Veth => (h[0].node.clone(), h[1].node.clone(), h[1].addr(), Vec::new()),
        Path::KernelVxlan => {
            h[0].add_kernel_vxlan(VNI, "br100", &[h[1].addr()])?;
            h[1].add_kernel_vxlan(VNI, "br100", &[h[0].addr()])?;
            let c1 = h[0].add_container("c1", "br100", "10.100.0.1/24")?;
            let c2 = h[1].add_container("c2", "br100", "10.100.0.2/24")?;
            (c1.node.clone(), c2.node.clone(), c2.ip(), Vec::new())
        }
        Path::Overlayd | Path::OverlaydEncrypted => {
            let mut extra = Vec::new();
            if path == Path::OverlaydEncrypted {
                let key = bed.dir().join("network.key");
                std::fs::write(&key, "4f7665726c6179642062656e63686d61726b206b657920666f72206532652121\n")?;
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                extra = vec!["--key-file".to_owned(), key.to_string_lossy().into_owned()];
            }
            let args = |peer: IpAddr| {
                let mut a = vec!["--vni".to_owned(), VNI.to_string(), "--peer".into(), peer.to_string()];
                a.extend(extra.iter().cloned());
                a.extend(overlayd_args.iter().cloned());
                a
            };
            let a1 = h[0].start_overlayd(&args(h[1].addr()))?;
            let a2 = h[1].start_overlayd(&args(h[0].addr()))?;
            let bridge = format!("ovbr-{VNI}");
            let c1 = h[0].add_container("c1", &bridge, "10.100.0.1/24")?;
            let c2 = h[1].add_container("c2", &bridge, "10.100.0.2/24")?;
            (c1.node.clone(), c2.node.clone(), c2.ip(), vec![a1, a2])
        }
        Path::Tinc
        | Path::N2n
        | Path::Nebula
        | Path::Vpncloud
        | Path::TincEncrypted
        | Path::VpncloudEncrypted
        | Path::TapFloor => {
            let b = peers::build(path, &h[0], &h[1], options)?;
            (b.client, b.server, b.server_ip, b.daemons)
        }
    };
    // Resolve ARP and warm up the path before anything is measured.
    client.ping_ok(server_ip, 2)?;
    Ok(Pair { path, label: label.to_owned(), client, server, server_ip, agents, bed })
}

/// One throughput run with its CPU cost.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Run {
    pub iperf: IperfStats,
    /// Busy CPU-seconds of the whole machine (kernel, iperf3, agents) per GB moved.
    pub machine_cpu_s_per_gb: f64,
    /// CPU-seconds of the overlayd processes per GB moved (NaN without agents).
    pub agent_cpu_s_per_gb: f64,
}

impl Pair {
    /// One iperf3 TCP run of `seconds` with `streams` streams, client → server.
    pub fn throughput(&self, seconds: u32, streams: u32) -> Result<Run> {
        let agents_before: f64 = self.agents.iter().map(|a| a.cpu_seconds().unwrap_or(0.0)).sum();
        let before = MachineCpu::sample()?;
        let iperf = self.client.iperf3_to(&self.server, self.server_ip, seconds, streams)?;
        let after = MachineCpu::sample()?;
        let agents_after: f64 = self.agents.iter().map(|a| a.cpu_seconds().unwrap_or(0.0)).sum();
        let gb = iperf.bytes as f64 / 1e9;
        Ok(Run {
            iperf,
            machine_cpu_s_per_gb: after.busy_seconds_since(&before) / gb,
            agent_cpu_s_per_gb: if self.agents.is_empty() { f64::NAN } else { (agents_after - agents_before) / gb },
        })
    }

    /// `count` pings 10 ms apart from client to server: average, percentiles.
    pub fn rtt(&self, count: u32) -> Result<PingStats> {
        self.client.ping_rtt(self.server_ip, count)
    }
}

/// Medians over several runs of one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub path: Path,
    pub label: String,
    pub gbps_1: f64,
    pub gbps_4: f64,
    pub rtt_ms: f64,
    /// Median of the rounds' median round trips.
    pub rtt_p50_ms: f64,
    pub machine_cpu_s_per_gb: f64,
    pub machine_cpu_s_per_gb_4: f64,
    pub agent_cpu_s_per_gb: f64,
    pub retransmits_1: f64,
    pub runs: usize,
}

/// Collected runs of one path.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub one: Vec<Run>,
    pub four: Vec<Run>,
    pub rtt: Vec<f64>,
    pub rtt_p50: Vec<f64>,
}

impl Samples {
    /// Medians.
    pub fn summary(&self, path: Path, label: &str) -> Summary {
        let m = |v: Vec<f64>| measure::median(&v);
        Summary {
            path,
            label: label.to_owned(),
            runs: self.one.len(),
            machine_cpu_s_per_gb_4: m(self.four.iter().map(|r| r.machine_cpu_s_per_gb).collect()),
            gbps_1: m(self.one.iter().map(|r| r.iperf.bits_per_second / 1e9).collect()),
            gbps_4: m(self.four.iter().map(|r| r.iperf.bits_per_second / 1e9).collect()),
            rtt_ms: m(self.rtt.clone()),
            rtt_p50_ms: m(self.rtt_p50.clone()),
            machine_cpu_s_per_gb: m(self.one.iter().map(|r| r.machine_cpu_s_per_gb).collect()),
            agent_cpu_s_per_gb: m(self.one.iter().map(|r| r.agent_cpu_s_per_gb).collect()),
            retransmits_1: m(self.one.iter().map(|r| r.iperf.retransmits as f64).collect()),
        }
    }
}

/// Measures every pair `runs` times, interleaving the paths round by round so that drift in
/// the machine's load hits all of them alike. `progress` is told each result.
pub fn compare(pairs: &[Pair], seconds: u32, runs: u32, mut progress: impl FnMut(&str)) -> Result<Vec<Summary>> {
    let mut samples = vec![Samples::default(); pairs.len()];
    for round in 1..=runs {
        for (pair, s) in pairs.iter().zip(&mut samples) {
            let one = pair.throughput(seconds, 1)?;
            let four = pair.throughput(seconds, 4)?;
            let rtt = pair.rtt(100)?;
            progress(&format!(
                "round {round}/{runs} {:<22} 1 stream {:>6.2} Gbit/s  4 streams {:>6.2} Gbit/s  rtt {:.3} ms (median {:.3}, p90 {:.3})",
                pair.label,
                one.iperf.bits_per_second / 1e9,
                four.iperf.bits_per_second / 1e9,
                rtt.rtt_avg_ms,
                rtt.rtt_p50_ms,
                rtt.rtt_p90_ms
            ));
            s.one.push(one);
            s.four.push(four);
            s.rtt.push(rtt.rtt_avg_ms);
            s.rtt_p50.push(rtt.rtt_p50_ms);
        }
    }
    Ok(pairs.iter().zip(&samples).map(|(p, s)| s.summary(p.path, &p.label)).collect())
}

/// A Markdown table of summaries, each row with its ratio to kernel VXLAN.
pub fn table(summaries: &[Summary]) -> String {
    use std::fmt::Write as _;
    let kernel = summaries.iter().find(|s| s.path == Path::KernelVxlan);
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 && !a.is_nan() => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| path | 1 stream Gbit/s | vs kernel | 4 streams Gbit/s | vs kernel | ping RTT ms | vs kernel | RTT median ms | machine CPU s/GB, 1 stream | vs kernel | machine CPU s/GB, 4 streams | agents' CPU s/GB, 1 stream | retransmits, 1 stream |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in summaries {
        let agent = if s.agent_cpu_s_per_gb.is_nan() { "-".to_owned() } else { format!("{:.2}", s.agent_cpu_s_per_gb) };
        let _ = writeln!(
            o,
            "| {} | {:.2} | {} | {:.2} | {} | {:.3} | {} | {:.3} | {:.2} | {} | {:.2} | {} | {:.0} |",
            s.label,
            s.gbps_1,
            ratio(s.gbps_1, kernel.map(|k| k.gbps_1)),
            s.gbps_4,
            ratio(s.gbps_4, kernel.map(|k| k.gbps_4)),
            s.rtt_ms,
            ratio(s.rtt_ms, kernel.map(|k| k.rtt_ms)),
            s.rtt_p50_ms,
            s.machine_cpu_s_per_gb,
            ratio(s.machine_cpu_s_per_gb, kernel.map(|k| k.machine_cpu_s_per_gb)),
            s.machine_cpu_s_per_gb_4,
            agent,
            s.retransmits_1
        );
    }
    o
}
