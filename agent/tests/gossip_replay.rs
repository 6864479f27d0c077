//! Gossip replay end to end (issue 12, item 7): authentic gossip datagrams captured on the
//! underlay as one daemon sends them to another, replayed many times to their receiver with
//! the original source address, are refused as replays and counted, and none is answered.
//!
//! Needs root (namespaces, a packet socket). Fails, never skips, when it cannot run.
#![allow(clippy::print_stderr)]

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::{Agent, Host, Options, Testbed};

const T: Duration = Duration::from_secs(20);
const GOSSIP_PORT: u16 = 7946;

/// The gossip counters of `overlayd peers` (0 for one it does not have).
fn counters<const N: usize>(agent: &Agent, names: [&str; N]) -> [u64; N] {
    let p: Value = agent.json(&["peers"]).unwrap();
    names.map(|name| p["counters"][name].as_u64().unwrap_or(0))
}

const WATCHED: [&str; 4] = ["rx_replayed", "rx_stale_generation", "rx_datagrams", "tx_datagrams"];

/// The UDP payloads of the gossip datagrams `from` sends to `to` during `d`, read with a packet
/// socket inside `host`'s namespace as they leave it: the exact bytes on the wire.
fn capture(host: &Host, from: IpAddr, to: IpAddr, d: Duration) -> Vec<Vec<u8>> {
    let (IpAddr::V4(from), IpAddr::V4(to)) = (from, to) else { panic!("the testbed's underlay is IPv4") };
    testbed::netns::within(host.ns(), move || {
        // ETH_P_ALL: only such taps see outgoing packets. A SOCK_DGRAM packet socket hands
        // over the network-layer packet.
        let all = i32::from((libc::ETH_P_ALL as u16).to_be());
        let s = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::DGRAM, Some(all.into()))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::new();
        let end = Instant::now() + d;
        while Instant::now() < end {
            let n = match (&s).read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(e.into()),
            };
            let p = &buf[..n];
            if n < 28 || p[0] >> 4 != 4 || p[9] != 17 || p[12..16] != from.octets() || p[16..20] != to.octets() {
                continue;
            }
            let udp = usize::from(p[0] & 0x0f) * 4;
            let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
            let len = usize::from(port(udp + 4));
            if port(udp) != GOSSIP_PORT || port(udp + 2) != GOSSIP_PORT || len < 8 || udp + len > n {
                continue;
            }
            out.push(p[udp + 8..udp + len].to_vec());
        }
        Ok(out)
    })
    .expect("cannot capture on the sender's underlay (run as root)")
}

#[test]
fn captured_gossip_replayed_to_its_receiver_is_refused_counted_and_never_answered() {
    let bed =
        Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)");
    let c = Cluster::form(&bed, 1, 2).expect("cannot form the cluster");
    c.await_nodes(3, &[], T).unwrap();
    let (sender, victim) = (1usize, 2usize);
    let (sender_ip, victim_ip) = (c.hosts[sender].addr(), c.hosts[victim].addr());

    // What the sender's daemon sends the victim's over a few seconds: probes, anti-entropy.
    let captured = capture(&c.hosts[sender], sender_ip, victim_ip, Duration::from_secs(6));
    eprintln!("captured {} datagrams from {sender_ip} to {victim_ip}", captured.len());
    assert!(captured.len() >= 5, "too few gossip datagrams captured: {}", captured.len());

    // The attacker: a machine on the underlay (no daemon) that takes the sender's address as
    // an alias, so the replays carry the original source address and port. The others'
    // neighbour entries stay pinned to the real sender.
    let attacker = bed.add_host().unwrap();
    attacker.exec("ip", ["addr", "add", &format!("{sender_ip}/32"), "dev", "ul0"]).unwrap();
    let from = SocketAddr::new(sender_ip, GOSSIP_PORT);
    let to = SocketAddr::new(victim_ip, GOSSIP_PORT);

    let rounds = 100u64;
    let pause = Duration::from_millis(50);
    let v = &c.agents[victim];
    // What the victim sends on its own over as long as the replays take.
    let [quiet_start] = counters(v, ["tx_datagrams"]);
    std::thread::sleep(pause * rounds as u32 + Duration::from_secs(1));
    let [quiet_end] = counters(v, ["tx_datagrams"]);
    let background = quiet_end - quiet_start;

    let before = counters(v, WATCHED);
    for _ in 0..rounds {
        attacker.send_udp(from, to, captured.clone()).unwrap();
        std::thread::sleep(pause);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = counters(v, WATCHED);
    let [replayed, stale, received, tx] = std::array::from_fn(|i| after[i] - before[i]);
    let sent = rounds * captured.len() as u64;
    eprintln!(
        "{sent} replays sent; the victim received {received} datagrams, refused {replayed} as replays and \
         {stale} as of an old generation, and sent {tx} (on its own over as long: {background})"
    );
    assert!(received >= sent, "the replays reached the victim's gossip socket: {received} of {sent}");
    assert_eq!(replayed + stale, sent, "every replay was refused and counted");
    assert!(tx <= 2 * background + 20, "the victim answered replays: it sent {tx}, {background} when left alone");

    // Nothing changed: every host is still alive as the victim sees it.
    let p: Value = v.json(&["peers"]).unwrap();
    let peers = p["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 3, "{p}");
    assert!(peers.iter().all(|x| x["state"] == "alive" || x["state"] == "self"), "{p}");
}
