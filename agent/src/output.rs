//! Human-readable output of the CLI (JSON is the reports themselves).

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use crate::api::{FdbReport, StatusReport};

/// Prints `report` as JSON or through `human`.
pub fn print<T: Serialize>(json: bool, report: &T, human: fn(&T) -> String) -> Result<()> {
    let text = if json { serde_json::to_string_pretty(report)? + "\n" } else { human(report) };
    use std::io::Write as _;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

pub fn status(s: &StatusReport) -> String {
    let mut o = String::new();
    let c = &s.counters;
    let _ = writeln!(o, "overlayd {} (pid {}), {} mode, up {}s", s.version, s.pid, s.mode, s.uptime_secs);
    let _ = writeln!(
        o,
        "underlay   {} on {} (MTU {}), VXLAN port {}, source ports {}",
        s.underlay_addr, s.underlay_interface, s.underlay_mtu, s.vxlan_port, s.source_ports
    );
    let f = &s.offloads;
    let _ = writeln!(
        o,
        "offloads   tap {}  udp gso {}  udp gro {}  coalesce {}",
        on(f.tap),
        on(f.udp_gso),
        on(f.udp_gro),
        on(f.coalesce)
    );
    let _ =
        writeln!(o, "\nNETWORK     VNI       BRIDGE         TAP            MTU    LEARN  FLOOD  FDB    LEARNED  ARP");
    for n in &s.networks {
        let _ = writeln!(
            o,
            "{:<11} {:<9} {:<14} {:<14} {:<6} {:<6} {:<6} {:<6} {:<8} {}",
            n.name,
            n.vni,
            n.bridge,
            n.tap,
            n.mtu,
            if n.learning { "yes" } else { "no" },
            n.flood_list.len(),
            n.fdb_entries,
            n.learned_entries,
            n.arp_entries
        );
    }
    let _ = writeln!(
        o,
        "\nTAP -> underlay   frames {}  bytes {}  unicast {}  flooded {}  datagrams {}  arp answered {}",
        c.tx_frames, c.tx_bytes, c.tx_unicast, c.tx_flooded, c.tx_datagrams, c.arp_replies
    );
    let _ = writeln!(
        o,
        "underlay -> TAP   datagrams {}  bytes {}  delivered {}  learned {}  aged out {}",
        c.rx_datagrams, c.rx_bytes, c.rx_delivered, c.learned, c.aged_out
    );
    let drops: Vec<String> = c.dropped.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(o, "dropped           {}", if drops.is_empty() { "none".to_owned() } else { drops.join("  ") });
    if s.allocation_counting {
        let _ = writeln!(
            o,
            "hot-loop heap allocations since start: tx {}  rx {}",
            c.tx_loop_allocations, c.rx_loop_allocations
        );
    }
    o
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

pub fn fdb(r: &FdbReport) -> String {
    let mut o = String::new();
    for n in &r.networks {
        let flood: Vec<String> = n.flood_list.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            o,
            "network {} (vni {})  flood list: {}",
            n.name,
            n.vni,
            if flood.is_empty() { "(empty)".into() } else { flood.join(", ") }
        );
        let _ = writeln!(o, "  MAC                 VTEP                                     ORIGIN   AGE");
        for e in &n.fdb {
            let age = e.age_secs.map(|a| format!("{a}s")).unwrap_or_else(|| "-".into());
            let _ = writeln!(o, "  {:<19} {:<40} {:<8} {}", e.mac.to_string(), e.vtep.to_string(), e.origin, age);
        }
        if !n.arp.is_empty() {
            let _ = writeln!(o, "  ARP answers:");
            for a in &n.arp {
                let _ = writeln!(o, "  {:<19} is-at {}", a.ip.to_string(), a.mac);
            }
        }
        o.push('\n');
    }
    if r.networks.is_empty() {
        o.push_str("no networks\n");
    }
    o
}
