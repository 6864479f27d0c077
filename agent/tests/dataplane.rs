//! The static-mode dataplane, end to end: real overlayd processes in network namespaces,
//! real TAPs and bridges, real ping and iperf3, and the Linux kernel's vxlan device as peer.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.

use std::net::SocketAddr;
use std::time::Duration;

use testbed::{Agent, Container, Host, Options, Testbed};

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// `overlayd daemon --vni <vni> --peer <each other host>` on `host`.
fn start(host: &Host, vni: u32, peers: &[&Host], extra: &[&str]) -> Agent {
    let mut args = vec!["--vni".to_owned(), vni.to_string()];
    for p in peers {
        args.push("--peer".into());
        args.push(p.addr().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    host.start_overlayd(&args).expect("overlayd did not start")
}

/// The learned FDB entries of `agent` for one network, as (mac, vtep).
fn fdb_entries(agent: &Agent, vni: u64) -> Vec<(String, String, String)> {
    let fdb = agent.fdb().unwrap();
    fdb["networks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["vni"].as_u64() == Some(vni))
        .flat_map(|n| n["fdb"].as_array().unwrap().clone())
        .map(|e| {
            (
                e["mac"].as_str().unwrap().to_owned(),
                e["vtep"].as_str().unwrap().to_owned(),
                e["origin"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Two hosts running overlayd with VNI 100 and each other as peer, a container on each
/// (10.0.0.1 and 10.0.0.2).
fn two_hosts(bed: &Testbed) -> (Agent, Agent, Container, Container) {
    let h = bed.add_hosts(2).unwrap();
    let a1 = start(&h[0], 100, &[&h[1]], &[]);
    let a2 = start(&h[1], 100, &[&h[0]], &[]);
    let c1 = h[0].add_container("c1", "ovbr-100", "10.0.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-100", "10.0.0.2/24").unwrap();
    (a1, a2, c1, c2)
}

/// A counter of the TCP stack of a container (`TcpExt` or `Tcp` in /proc/net/netstat and
/// /proc/net/snmp), e.g. `TCPOFOQueue` or `InSegs`.
fn tcp_stat(c: &Container, name: &str) -> u64 {
    let out =
        testbed::netns::run("ip", ["netns", "exec", c.ns(), "cat", "/proc/net/netstat", "/proc/net/snmp"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if !(names.starts_with("TcpExt:") || names.starts_with("Tcp:")) {
            continue;
        }
        if let Some(i) = names.split_whitespace().position(|n| n == name) {
            return values.split_whitespace().nth(i).unwrap().parse().unwrap();
        }
    }
    panic!("no TCP counter {name} in {}", c.ns());
}

/// The bulk went the offload way through every agent: TSO super-frames cut and sent as GSO
/// runs, received as runs and coalesced again; and nothing was dropped on the way.
fn offloaded_without_drops(agents: &[&Agent]) {
    for a in agents {
        let c = a.counters().unwrap();
        assert!(c.get("tx_segmented") > 0 && c.get("tx_gso_sends") > 0, "{:?}", c.0);
        assert!(c.get("rx_coalesced") > 0, "{:?}", c.0);
        assert_eq!(c.total_dropped(), 0, "{:?}", c.0["dropped"]);
    }
}

#[test]
fn two_hosts_ping_both_ways_and_iperf3_moves_data() {
    let bed = bed();
    let (a1, a2, c1, c2) = two_hosts(&bed);
    c1.ping_ok(c2.ip(), 3).unwrap();
    c2.ping_ok(c1.ip(), 3).unwrap();
    let r = c1.iperf3_to(&c2, c2.ip(), 3, 1).unwrap();
    assert!(r.bytes > 10_000_000, "iperf3 moved only {} bytes", r.bytes);
    // Coalescing keeps each connection's order: the receiver queued (almost) nothing out of
    // order (a run written after a later one of the same connection once put 9.5 % there).
    let (ofo, segs) = (tcp_stat(&c2, "TCPOFOQueue"), tcp_stat(&c2, "InSegs"));
    assert!(ofo * 200 < segs, "{ofo} of {segs} segments arrived out of order");
    let r = c2.iperf3_to(&c1, c1.ip(), 2, 1).unwrap();
    assert!(r.bytes > 10_000_000, "iperf3 back moved only {} bytes", r.bytes);
    offloaded_without_drops(&[&a1, &a2]);
}

#[test]
fn broadcast_reaches_every_host_then_unicast_goes_to_the_owner_only() {
    let bed = bed();
    let h = bed.add_hosts(3).unwrap();
    let a1 = start(&h[0], 7, &[&h[1], &h[2]], &[]);
    let a2 = start(&h[1], 7, &[&h[0], &h[2]], &[]);
    let a3 = start(&h[2], 7, &[&h[0], &h[1]], &[]);
    let c1 = h[0].add_container("c1", "ovbr-7", "10.7.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-7", "10.7.0.2/24").unwrap();
    let c3 = h[2].add_container("c3", "ovbr-7", "10.7.0.3/24").unwrap();

    // The first ping needs ARP: c1's broadcast request is flooded to both other hosts.
    let (c2_rx, c3_rx) = (c2.rx_packets().unwrap(), c3.rx_packets().unwrap());
    let before1 = a1.counters().unwrap();
    c1.ping_ok(c2.ip(), 1).unwrap();
    let after1 = a1.counters().unwrap();
    assert_eq!(after1.get("tx_flooded") - before1.get("tx_flooded"), 1, "one flooded frame: the ARP request");
    assert!(c3.rx_packets().unwrap() > c3_rx, "the broadcast ARP request reached c3 on h3");
    assert!(c2.rx_packets().unwrap() >= c2_rx + 2, "c2 got the ARP request and the echo request");
    assert!(
        fdb_entries(&a1, 7).contains(&(c2.mac().to_owned(), h[1].addr().to_string(), "learned".to_owned())),
        "h1 learned that c2 lives behind h2: {:?}",
        fdb_entries(&a1, 7)
    );

    // From now on, c1 -> c2 is unicast to h2 alone: h3 and c3 see nothing.
    let (b1, b2, b3) = (a1.counters().unwrap(), a2.counters().unwrap(), a3.counters().unwrap());
    let c3_rx = c3.rx_packets().unwrap();
    c1.ping_ok(c2.ip(), 20).unwrap();
    let (e1, e2, e3) = (a1.counters().unwrap(), a2.counters().unwrap(), a3.counters().unwrap());
    assert_eq!(e1.get("tx_flooded"), b1.get("tx_flooded"), "nothing flooded once the MAC is known");
    assert!(e1.get("tx_unicast") - b1.get("tx_unicast") >= 20);
    assert!(e2.get("rx_delivered") - b2.get("rx_delivered") >= 20, "h2 delivered the echo requests");
    assert_eq!(e3.get("rx_datagrams"), b3.get("rx_datagrams"), "h3 received no datagram at all");
    assert_eq!(c3.rx_packets().unwrap(), c3_rx, "c3 received no frame");
}

/// Host 1 runs overlayd for `vni`, host 2 is a Linux kernel VTEP (bridge `brk`); a container
/// on each, 10.<vni % 256>.0.1 and .2.
fn overlayd_and_a_kernel_vtep(bed: &Testbed, vni: u32) -> (Agent, Container, Container) {
    let h = bed.add_hosts(2).unwrap();
    let a1 = start(&h[0], vni, &[&h[1]], &[]);
    h[1].add_kernel_vxlan(vni, "brk", &[h[0].addr()]).unwrap();
    let net = vni % 256;
    let c1 = h[0].add_container("c1", &format!("ovbr-{vni}"), &format!("10.{net}.0.1/24")).unwrap();
    let c2 = h[1].add_container("c2", "brk", &format!("10.{net}.0.2/24")).unwrap();
    (a1, c1, c2)
}

#[test]
fn interop_with_the_linux_kernel_vxlan_both_ways() {
    let bed = bed();
    let (a1, c1, c2) = overlayd_and_a_kernel_vtep(&bed, 4242);
    c1.ping_ok(c2.ip(), 3).unwrap();
    c2.ping_ok(c1.ip(), 3).unwrap();
    let r = c1.iperf3_to(&c2, c2.ip(), 3, 1).unwrap();
    assert!(r.bytes > 10_000_000, "overlayd -> kernel moved only {} bytes", r.bytes);
    let r = c2.iperf3_to(&c1, c1.ip(), 3, 1).unwrap();
    assert!(r.bytes > 10_000_000, "kernel -> overlayd moved only {} bytes", r.bytes);
    let c = a1.counters().unwrap();
    assert_eq!(c.total_dropped(), 0, "the kernel's datagrams were all accepted: {:?}", c.0["dropped"]);
}

#[test]
fn two_networks_on_the_same_hosts_are_isolated() {
    let bed = bed();
    let h = bed.add_hosts(2).unwrap();
    // Two VNIs from a config file, with the same container addresses (and so the same MACs)
    // in both: only the VNI keeps them apart.
    let mut agents = Vec::new();
    for (me, other) in [(&h[0], &h[1]), (&h[1], &h[0])] {
        let path = bed.dir().join(format!("{}.toml", me.name()));
        std::fs::write(
            &path,
            format!(
                "[[network]]\nname = \"red\"\nvni = 100\npeers = [\"{o}\"]\n\n[[network]]\nname = \"blue\"\nvni = 200\npeers = [\"{o}\"]\n",
                o = other.addr()
            ),
        )
        .unwrap();
        agents.push(me.start_overlayd(&["--config", path.to_str().unwrap()]).unwrap());
    }
    let red1 = h[0].add_container("r1", "ovbr-red", "10.9.0.1/24").unwrap();
    let red2 = h[1].add_container("r2", "ovbr-red", "10.9.0.2/24").unwrap();
    let blue1 = h[0].add_container("b1", "ovbr-blue", "10.9.0.1/24").unwrap();
    let blue2 = h[1].add_container("b2", "ovbr-blue", "10.9.0.2/24").unwrap();

    let (b1, b2) = (blue1.rx_packets().unwrap(), blue2.rx_packets().unwrap());
    red1.ping_ok(red2.ip(), 5).unwrap();
    let r = red1.iperf3_to(&red2, red2.ip(), 2, 1).unwrap();
    assert!(r.bytes > 1_000_000);
    assert_eq!(
        (blue1.rx_packets().unwrap(), blue2.rx_packets().unwrap()),
        (b1, b2),
        "no red frame reached a blue container"
    );

    let (r1, r2) = (red1.rx_packets().unwrap(), red2.rx_packets().unwrap());
    blue2.ping_ok(blue1.ip(), 5).unwrap();
    assert_eq!(
        (red1.rx_packets().unwrap(), red2.rx_packets().unwrap()),
        (r1, r2),
        "no blue frame reached a red container"
    );
    for a in &agents {
        assert_eq!(a.counters().unwrap().dropped("unknown_vni"), 0);
    }
}

/// A VXLAN datagram carrying an Ethernet frame to `dst_mac`, with the given header bytes.
fn vxlan_to(header: [u8; 8], dst_mac: &str) -> Vec<u8> {
    let mut d = header.to_vec();
    let mac: Vec<u8> = dst_mac.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
    d.extend_from_slice(&mac);
    d.extend_from_slice(&[0x02, 0x4f, 0x0a, 0x00, 0x00, 0x63, 0x08, 0x00]);
    // An IPv4/ICMP echo request to 10.0.0.1, enough to be a frame c1 would count.
    d.extend_from_slice(&[
        0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 0, 99, 10, 0, 0, 1, 8, 0, 0xf7, 0xff, 0, 0, 0, 0,
    ]);
    d
}

#[test]
fn bad_datagrams_are_dropped_counted_and_harmless() {
    let bed = bed();
    let h = bed.add_hosts(3).unwrap(); // h3 is on the underlay but in no network: a stranger
    let a1 = start(&h[0], 100, &[&h[1]], &[]);
    let _a2 = start(&h[1], 100, &[&h[0]], &[]);
    let c1 = h[0].add_container("c1", "ovbr-100", "10.0.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-100", "10.0.0.2/24").unwrap();
    c2.ping_ok(c1.ip(), 2).unwrap();

    let vni100 = [0x08, 0, 0, 0, 0, 0, 100, 0];
    let good = vxlan_to(vni100, c1.mac());
    let mut bad_flags = good.clone();
    bad_flags[0] = 0x09;
    // The flags of a sealed datagram (an encrypted network's), to a plain network.
    let mut sealed = good.clone();
    sealed[0] = 0x0c;
    let mut reserved_1 = good.clone();
    reserved_1[2] = 0x01;
    let mut reserved_2 = good.clone();
    reserved_2[7] = 0x01;
    let unknown_vni = vxlan_to([0x08, 0, 0, 0, 0, 0x03, 0xe7, 0], c1.mac());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..5].to_vec()),
        ("truncated", good[..8 + 13].to_vec()),
        ("bad_flags", bad_flags),
        ("reserved_bits", reserved_1),
        ("reserved_bits", reserved_2),
        ("unknown_vni", unknown_vni),
        ("sealed_on_plain_network", sealed),
    ];
    let to = SocketAddr::new(h[0].addr(), 4789);
    let before = a1.counters().unwrap();
    let c1_rx = c1.rx_packets().unwrap();
    // From the member VTEP h2 (its address, any port): each malformed kind 3 times.
    let from_member = SocketAddr::new(h[1].addr(), 0);
    h[1].send_udp(from_member, to, cases.iter().flat_map(|(_, d)| std::iter::repeat_n(d.clone(), 3)).collect())
        .unwrap();
    // From the stranger h3: a perfectly valid datagram, 3 times.
    h[2].send_udp(SocketAddr::new(h[2].addr(), 0), to, vec![good.clone(); 3]).unwrap();
    // And 500 datagrams of garbage from both (first byte never 0x08 nor 0x0c, so none is valid
    // or taken for sealed).
    let garbage: Vec<Vec<u8>> = (0..250u32)
        .map(|i| {
            let len = (i as usize * 7919) % 1400;
            let mut g: Vec<u8> =
                (0..len).map(|j| (i.wrapping_mul(2654435761).wrapping_add(j as u32 * 40503) >> 7) as u8).collect();
            if let Some(b) = g.first_mut() {
                *b = if *b == 0x08 || *b == 0x0c { 0x09 } else { *b };
            }
            g
        })
        .collect();
    h[1].send_udp(from_member, to, garbage.clone()).unwrap();
    h[2].send_udp(SocketAddr::new(h[2].addr(), 0), to, garbage).unwrap();

    let expected_total = cases.len() as u64 * 3 + 3 + 500;
    let after = testbed::measure::wait_for(Duration::from_secs(5), "the drops to be counted", || {
        let c = a1.counters().ok()?;
        (c.total_dropped() - before.total_dropped() >= expected_total).then_some(c)
    })
    .unwrap();
    let delta = |r: &str| after.dropped(r) - before.dropped(r);
    assert_eq!(
        delta("bad_flags") + delta("reserved_bits") + delta("truncated") + delta("not_member"),
        expected_total - 6,
        "{:?}",
        after.0
    );
    assert_eq!(delta("unknown_vni"), 3);
    assert_eq!(delta("sealed_on_plain_network"), 3);
    assert!(delta("truncated") >= 6 && delta("bad_flags") >= 3 && delta("reserved_bits") >= 6);
    assert!(delta("not_member") >= 3, "the stranger's valid datagrams are refused");
    assert_eq!(
        after.total_dropped() - before.total_dropped(),
        expected_total,
        "every bad datagram dropped exactly once"
    );
    assert_eq!(after.get("rx_delivered"), before.get("rx_delivered"), "nothing was delivered");
    assert_eq!(c1.rx_packets().unwrap(), c1_rx, "nothing reached the container");
    // The stranger taught nothing, and good traffic still flows.
    assert!(!fdb_entries(&a1, 100).iter().any(|(_, vtep, _)| vtep == &h[2].addr().to_string()));
    c1.ping_ok(c2.ip(), 3).unwrap();
    c2.ping_ok(c1.ip(), 3).unwrap();
}

#[test]
fn sigterm_removes_what_the_agent_created_and_keeps_what_it_did_not() {
    let bed = bed();
    let h = bed.add_hosts(2).unwrap();
    // A bridge the operator made beforehand, used by the second network.
    h[0].exec("ip", ["link", "add", "mybr", "type", "bridge"]).unwrap();
    let path = bed.dir().join("h1.toml");
    std::fs::write(
        &path,
        format!(
            "[[network]]\nname = \"one\"\nvni = 1\npeers = [\"{p}\"]\n\n[[network]]\nname = \"two\"\nvni = 2\nbridge = \"mybr\"\npeers = [\"{p}\"]\n",
            p = h[1].addr()
        ),
    )
    .unwrap();
    let a1 = h[0].start_overlayd(&["--config", path.to_str().unwrap()]).unwrap();
    let links = || h[0].exec("ip", ["-o", "link", "show"]).unwrap();
    let up = links();
    for dev in ["ovbr-one", "ovt-one", "ovt-two", "mybr"] {
        assert!(up.contains(&format!(" {dev}:")), "{dev} exists while running:\n{up}");
    }
    let status = a1.terminate().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{}", a1.log());
    let down = links();
    for dev in ["ovbr-one", "ovt-one", "ovt-two"] {
        assert!(!down.contains(&format!(" {dev}:")), "{dev} is gone after SIGTERM:\n{down}");
    }
    assert!(down.contains(" mybr:"), "the operator's bridge stays");
    assert!(!a1.state_dir().join("overlayd.sock").exists(), "the socket is removed");
}

#[test]
fn the_hot_loops_allocate_nothing_per_packet() {
    let bed = bed();
    let (a1, a2, c1, c2) = two_hosts(&bed);
    c1.ping_ok(c2.ip(), 2).unwrap(); // ARP, learning: the only moments that may allocate
    let status = a1.status().unwrap();
    assert_eq!(status["allocation_counting"], true, "overlayd counts allocations per thread");
    let before = [a1.counters().unwrap(), a2.counters().unwrap()];
    let r = c1.iperf3_to(&c2, c2.ip(), 3, 2).unwrap();
    c2.ping_ok(c1.ip(), 5).unwrap();
    let after = [a1.counters().unwrap(), a2.counters().unwrap()];
    for (b, a) in before.iter().zip(&after) {
        // Datagrams, not frames: with offloads one frame from the TAP may be a 64 KB super-frame.
        let frames = (a.get("tx_datagrams") - b.get("tx_datagrams")) + (a.get("rx_datagrams") - b.get("rx_datagrams"));
        assert!(frames > 10_000, "enough traffic to mean something: {frames} datagrams, {} bytes by iperf3", r.bytes);
        for key in ["tx_loop_allocations", "rx_loop_allocations"] {
            assert_eq!(a.get(key), b.get(key), "{key} grew while forwarding {frames} frames");
        }
        assert!(
            b.get("tx_loop_allocations") > 0 || b.get("rx_loop_allocations") > 0,
            "the counter is live (thread start allocates)"
        );
    }
}

#[test]
fn static_fdb_and_arp_entries_answer_locally_without_flooding() {
    let bed = bed();
    let h = bed.add_hosts(2).unwrap();
    let (ip1, ip2) = ("10.5.0.1", "10.5.0.2");
    let (mac1, mac2) = ("02:4f:0a:05:00:01", "02:4f:0a:05:00:02");
    let a1 = start(
        &h[0],
        5,
        &[&h[1]],
        &["--no-learning", "--fdb", &format!("{mac2}={}", h[1].addr()), "--arp", &format!("{ip2}={mac2}")],
    );
    let _a2 = start(
        &h[1],
        5,
        &[&h[0]],
        &["--no-learning", "--fdb", &format!("{mac1}={}", h[0].addr()), "--arp", &format!("{ip1}={mac1}")],
    );
    let c1 = h[0].add_container("c1", "ovbr-5", "10.5.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-5", "10.5.0.2/24").unwrap();
    let before = a1.counters().unwrap();
    c1.ping_ok(c2.ip(), 3).unwrap();
    let after = a1.counters().unwrap();
    assert_eq!(after.get("arp_replies") - before.get("arp_replies"), 1, "c1's ARP request answered by the agent");
    assert_eq!(after.get("tx_flooded"), before.get("tx_flooded"), "nothing flooded");
    assert!(after.get("tx_unicast") - before.get("tx_unicast") >= 3);
    let neigh = c1.exec("ip", ["neigh", "show", ip2]).unwrap();
    assert!(neigh.contains(mac2), "c1 resolved c2 to its MAC: {neigh}");
    assert!(fdb_entries(&a1, 5).iter().all(|(_, _, origin)| origin == "static"), "no learning");
}

#[test]
fn one_thread_for_both_directions_forwards_like_a_thread_per_direction() {
    let bed = bed();
    let h = bed.add_hosts(2).unwrap();
    let a1 = start(&h[0], 7, &[&h[1]], &["--dataplane-threads", "1"]);
    let a2 = start(&h[1], 7, &[&h[0]], &["--dataplane-threads", "2"]);
    let c1 = h[0].add_container("c1", "ovbr-7", "10.7.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-7", "10.7.0.2/24").unwrap();
    assert_eq!(a1.status().unwrap()["dataplane_threads"], 1);
    assert_eq!(a2.status().unwrap()["dataplane_threads"], 2);
    for (a, b) in [(&c1, &c2), (&c2, &c1)] {
        a.ping_ok(b.ip(), 3).unwrap();
        let r = a.iperf3_to(b, b.ip(), 2, 2).unwrap();
        assert!(r.bytes > 5_000_000, "{} -> {}: only {} bytes", a.ip(), b.ip(), r.bytes);
    }
    offloaded_without_drops(&[&a1, &a2]);
}

#[test]
fn auto_threads_split_under_load_and_join_again_when_idle() {
    let bed = bed();
    let h = bed.add_hosts(2).unwrap();
    let a1 = start(&h[0], 8, &[&h[1]], &[]);
    let a2 = start(&h[1], 8, &[&h[0]], &[]);
    let c1 = h[0].add_container("c1", "ovbr-8", "10.8.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-8", "10.8.0.2/24").unwrap();
    let loops = |a: &Agent| {
        let s = a.status().unwrap();
        assert_eq!(s["dataplane_threads_setting"], "auto", "auto is the default");
        (s["dataplane_threads"].as_u64().unwrap(), s["dataplane_loop_switches"].as_u64().unwrap_or(0))
    };
    c1.ping_ok(c2.ip(), 3).unwrap();
    for a in [&a1, &a2] {
        assert_eq!(loops(a), (1, 0), "pings keep both directions on one thread");
    }
    for (a, b) in [(&c1, &c2), (&c2, &c1)] {
        let r = a.iperf3_to(b, b.ip(), 2, 1).unwrap();
        assert!(r.bytes > 50_000_000, "{} -> {}: only {} bytes", a.ip(), b.ip(), r.bytes);
    }
    for a in [&a1, &a2] {
        let (_, switches) = loops(a);
        assert!(switches >= 1, "the loops split under load (switches: {switches})");
    }
    // Idle again: both agents hand the receive loop back to one thread within a few windows.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while [&a1, &a2].iter().any(|a| loops(a).0 != 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "still split 5 s after the load: {:?} {:?}",
            loops(&a1),
            loops(&a2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for a in [&a1, &a2] {
        let (_, switches) = loops(a);
        assert!(switches >= 2 && switches % 2 == 0, "split and joined (switches: {switches})");
    }
    // And everything still flows, in both directions, on one thread again and across a split.
    c2.ping_ok(c1.ip(), 3).unwrap();
    let r = c1.iperf3_to(&c2, c2.ip(), 1, 2).unwrap();
    assert!(r.bytes > 20_000_000, "only {} bytes after joining", r.bytes);
    offloaded_without_drops(&[&a1, &a2]);
}

#[test]
fn the_plain_path_without_offloads_works_alone_and_against_an_offloading_peer() {
    let bed = bed();
    let h = bed.add_hosts(3).unwrap();
    // h1 without any offload, h2 with all, h3 a kernel VTEP: every pair must work.
    let a1 = start(&h[0], 9, &[&h[1], &h[2]], &["--offloads", "none"]);
    let a2 = start(&h[1], 9, &[&h[0], &h[2]], &[]);
    h[2].add_kernel_vxlan(9, "brk", &[h[0].addr(), h[1].addr()]).unwrap();
    let c1 = h[0].add_container("c1", "ovbr-9", "10.9.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-9", "10.9.0.2/24").unwrap();
    let c3 = h[2].add_container("c3", "brk", "10.9.0.3/24").unwrap();
    assert_eq!(a1.status().unwrap()["offloads"]["tap"], false);
    assert_eq!(a2.status().unwrap()["offloads"]["tap"], true);
    for (a, b) in [(&c1, &c2), (&c2, &c1), (&c1, &c3), (&c3, &c1)] {
        a.ping_ok(b.ip(), 2).unwrap();
        let r = a.iperf3_to(b, b.ip(), 2, 1).unwrap();
        assert!(r.bytes > 5_000_000, "{} -> {}: only {} bytes", a.ip(), b.ip(), r.bytes);
    }
    let c = a2.counters().unwrap();
    assert!(c.get("tx_gso_sends") > 0, "the offloading agent sent GSO runs: {:?}", c.0);
    assert_eq!(a1.counters().unwrap().get("tx_gso_sends"), 0, "the plain agent did not");
    for a in [&a1, &a2] {
        assert_eq!(a.counters().unwrap().total_dropped(), 0, "{:?}", a.counters().unwrap().0["dropped"]);
    }
}

#[test]
fn when_the_kernel_refuses_udp_gso_the_agent_falls_back_and_loses_nothing() {
    let bed = bed();
    let (a1, _a2, c1, c2) = two_hosts(&bed);
    // The underlay MTU shrinks below the datagrams' size after the agent started (a changed
    // link): the kernel refuses UDP_SEGMENT (EINVAL); single datagrams still go (fragmented).
    let h1 = c1.ns().rsplit_once("-c1").unwrap().0.to_owned();
    testbed::netns::ip(["-n", &h1, "link", "set", "ul0", "mtu", "1400"]).unwrap();
    c1.ping_ok(c2.ip(), 2).unwrap();
    let r = c1.iperf3_to(&c2, c2.ip(), 3, 1).unwrap();
    assert!(r.bytes > 10_000_000, "iperf3 moved only {} bytes", r.bytes);
    let c = a1.counters().unwrap();
    assert_eq!(c.get("tx_gso_disabled"), 1, "GSO was refused once and switched off: {:?}", c.0);
    assert!(c.get("tx_segmented") > 0, "super-frames were still cut");
    assert_eq!(c.dropped("send_failed"), 0, "the refused runs were resent datagram by datagram");
}

/// A deterministic byte stream per seed (xorshift64*), for checking content end to end.
struct Stream(u64);

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with the stream's next bytes (a whole number of words).
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

/// Bytes per connection of the content test, and connections per direction.
const STREAM_BYTES: usize = 24 << 20;
const STREAMS_PER_DIRECTION: u64 = 2;

/// Accepts `n` connections on `addr` inside `ns`; each starts with its seed (8 bytes), then
/// must carry exactly [`STREAM_BYTES`] of that seed's stream. Returns the first difference.
fn content_server(ns: String, addr: SocketAddr, n: u64) -> std::thread::JoinHandle<anyhow::Result<Vec<String>>> {
    let listener = testbed::netns::within(&ns, move || Ok(std::net::TcpListener::bind(addr)?)).unwrap();
    std::thread::spawn(move || {
        let readers: Vec<_> = (0..n)
            .map(|_| {
                let (mut conn, _) = listener.accept()?;
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                Ok(std::thread::spawn(move || -> anyhow::Result<String> {
                    use std::io::Read;
                    let mut seed = [0u8; 8];
                    conn.read_exact(&mut seed)?;
                    let seed = u64::from_le_bytes(seed);
                    let mut want = Stream::new(seed);
                    let (mut got, mut expected) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
                    let mut total = 0usize;
                    loop {
                        // Read in whole words so the expected stream stays aligned.
                        let mut filled = 0;
                        while filled == 0 || filled % 8 != 0 {
                            let k = conn.read(&mut got[filled..])?;
                            if k == 0 {
                                break;
                            }
                            filled += k;
                        }
                        if filled == 0 {
                            break;
                        }
                        want.fill(&mut expected[..filled]);
                        if let Some(at) = (0..filled).find(|&i| got[i] != expected[i]) {
                            return Ok(format!("stream {seed}: byte {} differs", total + at));
                        }
                        total += filled;
                        if filled % 8 != 0 {
                            break;
                        }
                    }
                    Ok(if total == STREAM_BYTES {
                        String::new()
                    } else {
                        format!("stream {seed}: {total} of {STREAM_BYTES} bytes")
                    })
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        readers.into_iter().map(|r| r.join().map_err(|_| anyhow::anyhow!("a reader panicked"))?).collect()
    })
}

/// Sends `n` streams to `addr` from inside `ns`, in writes of varying sizes.
fn content_client(
    ns: String,
    addr: SocketAddr,
    seeds: std::ops::Range<u64>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        testbed::netns::within(&ns, move || {
            // Threads started here inherit this thread's namespace.
            let writers: Vec<_> = seeds
                .map(|seed| {
                    std::thread::spawn(move || -> anyhow::Result<()> {
                        use std::io::Write;
                        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                        conn.write_all(&seed.to_le_bytes())?;
                        let (mut stream, mut sizes) = (Stream::new(seed), Stream::new(!seed));
                        let mut buf = vec![0u8; 1 << 18];
                        let mut sent = 0;
                        while sent < STREAM_BYTES {
                            // 8 B to 256 KB per write: super-frames of every size, PSH anywhere.
                            let n = (8 + (sizes.next() as usize % (1 << 18))).min(STREAM_BYTES - sent) & !7;
                            stream.fill(&mut buf[..n]);
                            conn.write_all(&buf[..n])?;
                            sent += n;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in writers {
                w.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
            }
            Ok(())
        })
    })
}

/// Two streams each way at once between `c1` and `c2`; panics at the first wrong byte.
fn streams_both_ways_arrive_intact(c1: &Container, c2: &Container) {
    c1.ping_ok(c2.ip(), 3).unwrap();
    let to_c2 = SocketAddr::new(c2.ip(), 7101);
    let to_c1 = SocketAddr::new(c1.ip(), 7102);
    let s2 = content_server(c2.ns().to_owned(), to_c2, STREAMS_PER_DIRECTION);
    let s1 = content_server(c1.ns().to_owned(), to_c1, STREAMS_PER_DIRECTION);
    let w1 = content_client(c1.ns().to_owned(), to_c2, 1..1 + STREAMS_PER_DIRECTION);
    let w2 = content_client(c2.ns().to_owned(), to_c1, 100..100 + STREAMS_PER_DIRECTION);
    // A reader stops at the first wrong byte, which breaks its writer: check the readers first.
    let sent = [w1.join().unwrap(), w2.join().unwrap()];
    for s in [s1, s2] {
        let faults: Vec<String> =
            s.join().unwrap().expect("the streams were received").into_iter().filter(|f| !f.is_empty()).collect();
        assert!(faults.is_empty(), "content differs: {faults:?}");
    }
    for r in sent {
        r.expect("every stream was sent");
    }
}

#[test]
fn bulk_tcp_arrives_byte_for_byte_through_segmentation_and_coalescing() {
    let bed = bed();
    let (a1, a2, c1, c2) = two_hosts(&bed);
    // Both agents cut super-frames into GSO runs and coalesce what they receive, with data and
    // ACKs of four flows interleaved.
    streams_both_ways_arrive_intact(&c1, &c2);
    offloaded_without_drops(&[&a1, &a2]);
}

#[test]
fn bulk_tcp_arrives_byte_for_byte_between_overlayd_and_a_kernel_vtep() {
    let bed = bed();
    let (a1, c1, c2) = overlayd_and_a_kernel_vtep(&bed, 4343);
    // The kernel VTEP sends UDP-tunnel GSO packets and zero UDP checksums; overlayd's segments
    // and coalesced frames meet the kernel's own GRO and segmentation.
    streams_both_ways_arrive_intact(&c1, &c2);
    let c = a1.counters().unwrap();
    assert!(c.get("tx_gso_sends") > 0, "{:?}", c.0);
    assert_eq!(c.total_dropped(), 0, "{:?}", c.0["dropped"]);
    // A kernel VTEP not told of remote checksum offload gets plain RFC 7348 only.
    assert_eq!(c.get("tx_remote_checksums"), 0, "{:?}", c.0);
}

#[test]
fn remote_checksum_offload_between_agents_and_with_a_kernel_vtep_arrives_byte_for_byte() {
    let bed = bed();
    let h = bed.add_hosts(4).unwrap();
    // Two agents that both take RCO.
    let a1 = start(&h[0], 100, &[&h[1]], &["--remote-checksum"]);
    let a2 = start(&h[1], 100, &[&h[0]], &["--remote-checksum"]);
    let c1 = h[0].add_container("c1", "ovbr-100", "10.0.0.1/24").unwrap();
    let c2 = h[1].add_container("c2", "ovbr-100", "10.0.0.2/24").unwrap();
    streams_both_ways_arrive_intact(&c1, &c2);
    for a in [&a1, &a2] {
        let c = a.counters().unwrap();
        // Segments left their inner checksums to the receiver, which coalesced them unsummed.
        assert!(c.get("tx_remote_checksums") > 1000, "{:?}", c.0);
        assert!(c.get("rx_remote_checksums") > 1000, "{:?}", c.0);
        assert!(c.get("rx_coalesced") > 0, "{:?}", c.0);
        assert_eq!(c.total_dropped(), 0, "{:?}", c.0["dropped"]);
    }
    // An agent and a Linux kernel VTEP with `remcsumtx remcsumrx` (and outer UDP checksums,
    // which RCO relies on): each sends the other RCO, and both understand it.
    let a3 = start(&h[2], 200, &[&h[3]], &["--remote-checksum"]);
    h[3].add_kernel_vxlan_with(200, "brk", &[h[2].addr()], &["udpcsum", "remcsumtx", "remcsumrx"]).unwrap();
    let c3 = h[2].add_container("c3", "ovbr-200", "10.200.0.1/24").unwrap();
    let c4 = h[3].add_container("c4", "brk", "10.200.0.2/24").unwrap();
    c3.ping_ok(c4.ip(), 2).unwrap();
    streams_both_ways_arrive_intact(&c3, &c4);
    let c = a3.counters().unwrap();
    assert!(c.get("tx_remote_checksums") > 1000, "{:?}", c.0);
    assert!(c.get("rx_remote_checksums") > 0, "the kernel sent RCO: {:?}", c.0);
    assert_eq!(c.total_dropped(), 0, "{:?}", c.0["dropped"]);
}
