//! Reading what the tools report: ping, iperf3 (its JSON), CPU time from /proc.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What `ping` reported.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// Average round trip, milliseconds.
    pub rtt_avg_ms: f64,
    /// Smallest round trip, milliseconds.
    pub rtt_min_ms: f64,
    /// Median and 90th percentile of the per-reply round trips, milliseconds (NaN when ping
    /// ran with `-q` and printed no per-reply lines).
    pub rtt_p50_ms: f64,
    pub rtt_p90_ms: f64,
}

/// Parses ping's summary lines.
pub fn parse_ping(out: &str) -> Result<PingStats> {
    let stats = out.lines().find(|l| l.contains("packets transmitted")).context("no ping summary")?;
    let num = |key: &str| -> Result<u32> {
        let field = stats.split(',').find(|f| f.contains(key)).with_context(|| format!("no {key:?} in {stats:?}"))?;
        field.split_whitespace().next().unwrap_or("").parse().with_context(|| format!("bad {key:?} in {stats:?}"))
    };
    let (transmitted, received) = (num("transmitted")?, num("received")?);
    let (mut rtt_avg_ms, mut rtt_min_ms) = (f64::NAN, f64::NAN);
    if let Some(rtt) = out.lines().find(|l| l.starts_with("rtt") || l.starts_with("round-trip")) {
        let vals: Vec<f64> = rtt
            .split('=')
            .nth(1)
            .unwrap_or("")
            .split('/')
            .filter_map(|v| v.trim().trim_end_matches(" ms").parse().ok())
            .collect();
        if vals.len() >= 2 {
            rtt_min_ms = vals[0];
            rtt_avg_ms = vals[1];
        }
    }
    let mut times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim().trim_end_matches("ms").trim().parse().ok())
        .collect();
    times.sort_by(f64::total_cmp);
    let quantile = |q: f64| match times.len() {
        0 => f64::NAN,
        n => times[((n - 1) as f64 * q).round() as usize],
    };
    let (rtt_p50_ms, rtt_p90_ms) = (quantile(0.5), quantile(0.9));
    Ok(PingStats { transmitted, received, rtt_avg_ms, rtt_min_ms, rtt_p50_ms, rtt_p90_ms })
}

/// What an iperf3 client run reported.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IperfStats {
    /// Receiver-side throughput, bits per second.
    pub bits_per_second: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
    /// TCP retransmissions at the sender.
    pub retransmits: u64,
    /// Wall time of the test.
    pub seconds: f64,
}

/// Parses `iperf3 -J` client output.
pub fn parse_iperf3(json: &str) -> Result<IperfStats> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 did not print JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let recv = &end["sum_received"];
    Ok(IperfStats {
        bits_per_second: recv["bits_per_second"].as_f64().context("no sum_received.bits_per_second")?,
        bytes: recv["bytes"].as_u64().unwrap_or(0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        seconds: recv["seconds"].as_f64().unwrap_or(0.0),
    })
}

/// Busy and total CPU time of the whole machine, from /proc/stat (in clock ticks).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    pub busy_ticks: u64,
    pub total_ticks: u64,
}

/// Clock ticks per second (USER_HZ).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

impl MachineCpu {
    /// Reads /proc/stat now.
    pub fn sample() -> Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already inside user, so only the first eight count.
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok(MachineCpu { busy_ticks: total - idle, total_ticks: total })
    }

    /// Busy CPU-seconds between two samples.
    pub fn busy_seconds_since(&self, earlier: &MachineCpu) -> f64 {
        (self.busy_ticks.saturating_sub(earlier.busy_ticks)) as f64 / ticks_per_second()
    }
}

/// User + system CPU seconds a process has used (all its threads).
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("no process {pid}"))?;
    // The command name may hold spaces; fields start after its closing parenthesis.
    let rest = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / ticks_per_second())
}

/// A process's resident set size, KiB (`VmRSS` of /proc/PID/status).
pub fn process_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("no process {pid}"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("bad VmRSS")?.parse().context("bad VmRSS")
}

/// The median of some values (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if std::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ping() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n\
                   rtt min/avg/max/mdev = 0.435/0.668/1.109/0.311 ms\n";
        let p = parse_ping(out).unwrap();
        assert_eq!((p.transmitted, p.received), (3, 2));
        assert!((p.rtt_avg_ms - 0.668).abs() < 1e-9 && (p.rtt_min_ms - 0.435).abs() < 1e-9);
        let lost = parse_ping("4 packets transmitted, 0 received, +4 errors, 100% packet loss, time 3000ms\n").unwrap();
        assert_eq!(lost.received, 0);
        assert!(lost.rtt_avg_ms.is_nan());
        assert!(p.rtt_p50_ms.is_nan(), "no per-reply lines, no percentiles");
    }

    #[test]
    fn reads_each_replys_time_for_percentiles() {
        let mut out = String::from("PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n");
        for (i, t) in [0.30, 0.10, 0.20, 0.50, 2.00].iter().enumerate() {
            out += &format!("64 bytes from 10.0.0.2: icmp_seq={} ttl=64 time={t:.3} ms\n", i + 1);
        }
        out += "\n5 packets transmitted, 5 received, 0% packet loss, time 40ms\n\
                rtt min/avg/max/mdev = 0.100/0.620/2.000/0.700 ms\n";
        let p = parse_ping(&out).unwrap();
        assert_eq!((p.rtt_p50_ms, p.rtt_p90_ms), (0.30, 2.00));
        assert!((p.rtt_avg_ms - 0.62).abs() < 1e-9);
    }

    #[test]
    fn reads_iperf3() {
        let j = r#"{"end":{"sum_sent":{"retransmits":3},"sum_received":{"bits_per_second":1.5e9,"bytes":1000,"seconds":2.0}}}"#;
        let s = parse_iperf3(j).unwrap();
        assert_eq!((s.bytes, s.retransmits), (1000, 3));
        assert!(parse_iperf3(r#"{"error":"unable to connect"}"#).unwrap_err().to_string().contains("unable"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
