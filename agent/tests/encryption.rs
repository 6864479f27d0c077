//! Encrypted networks end to end (issue 16), with real daemons, a capture of the underlay
//! (tcpdump on the switch's bridge) and real traffic (ping, iperf3, nc):
//! - three hosts on an encrypted network and a plain one side by side: ping and iperf3 work on
//!   both; a marker sent with nc over the encrypted one is nowhere on the wire (and the same
//!   marker over the plain one is, so the capture sees what it should); every datagram of the
//!   encrypted network is sealed, every one of the plain one is RFC 7348;
//! - replayed, tampered, truncated, foreign-key, unknown-epoch and plaintext datagrams injected
//!   into a host: all dropped and counted by reason (in `status` and `network inspect`),
//!   nothing reaches the container there (its eth0 received nothing), good traffic goes on;
//! - an agent restart: the host seals in a new session afterwards, no (session, counter) pair
//!   is ever sent twice, traffic resumes;
//! - a key rotation during an iperf3 run: the run goes on with no datagram refused, both epochs
//!   are on the wire and opened by the receiver, and a datagram of the old key opens nothing
//!   once the window is over;
//! - a node removed from a three-host encrypted network: its certificate fetches no keys, and
//!   once the window is over a datagram sealed with the last key it had opens nothing.
//! - static mode, a network encrypted with a pre-shared key beside a plain one, with a Linux
//!   kernel VTEP in both: the plain one interoperates with the kernel as before, the encrypted
//!   one refuses the kernel's plaintext (each datagram counted) and never sends any.
//!
//! These tests need root (namespaces), tcpdump, iperf3, busybox-static. They fail, never skip.
#![allow(clippy::print_stderr)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use control::pki::NodeIdentity;
use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Host, Node, Options, Testbed};
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(20);
const MARKER: &str = "overlayd-marker-5f1c2e9a";

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// A container attached with `overlayd attach --netns`.
struct Ct {
    node: Node,
    ip: Ipv4Addr,
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str) -> Ct {
    let node = c.hosts[i].add_netns(name).unwrap();
    let path = node.netns_path();
    let ep = c.agents[i]
        .json(&["attach", "--network", network, "--netns", &path, "--name", name])
        .unwrap_or_else(|e| panic!("cannot attach {name}: {e:#}"));
    let ip = ep["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no address: {ep}"));
    Ct { node, ip }
}

/// Two hosts (a manager, a worker), the encrypted network `sec`, a container on each: `a` on
/// the first host, `b` on the second.
fn sealed_pair(bed: &Testbed) -> (Cluster, Ct, Ct) {
    let c = Cluster::form(bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "sec", "--encrypted"]).unwrap();
    let (a, b) = (attach(&c, 0, "sec", "a"), attach(&c, 1, "sec", "b"));
    (c, a, b)
}

/// tcpdump on the underlay's bridge, writing VXLAN datagrams to a file until [`Capture::stop`].
struct Capture {
    tcpdump: Agent,
    file: PathBuf,
}

impl Capture {
    /// Lets what is in flight be written, then ends tcpdump; the file is complete.
    fn stop(self) -> PathBuf {
        std::thread::sleep(Duration::from_millis(500));
        drop(self.tcpdump);
        self.file
    }
}

fn capture(bed: &Testbed, name: &str) -> Capture {
    let file = bed.dir().join(format!("{name}.pcap"));
    let path = file.to_string_lossy().into_owned();
    let tcpdump = bed
        .switch()
        .spawn(
            &format!("tcpdump-{name}"),
            "tcpdump",
            &["-i", "br0", "--immediate-mode", "-U", "-s", "0", "-w", &path, "udp port 4789"],
        )
        .expect("cannot run tcpdump (scripts/install-deps)");
    wait_for(T, "tcpdump to start", || file.exists().then_some(())).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Capture { tcpdump, file }
}

/// A captured VXLAN datagram: outer source and destination, and the UDP payload.
struct Datagram {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: Vec<u8>,
}

/// Reads a pcap file of Ethernet frames: the IPv4/UDP ones' payloads.
fn datagrams(file: &Path) -> Vec<Datagram> {
    let bytes = std::fs::read(file).unwrap();
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &bytes[at + 16..(at + 16 + len).min(bytes.len())];
        at += 16 + len;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        out.push(Datagram { src, dst, payload: ip[ihl + 8..].to_vec() });
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn vni_of(d: &Datagram) -> u32 {
    u32::from_be_bytes([0, d.payload[4], d.payload[5], d.payload[6]])
}

fn network_vni(agent: &Agent, name: &str) -> u32 {
    let n = agent.json(&["network", "inspect", name]).unwrap();
    n["network"]["vni"].as_u64().unwrap_or_else(|| panic!("no VNI: {n}")) as u32
}

/// Sends `text` with busybox nc from `from` to `to`'s listener on port 7000.
fn send_marker(from: &Ct, to: &Ct, text: &str) {
    let _listener = to.node.spawn("nc-listen", "busybox", &["nc", "-l", "-p", "7000"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let script = format!("echo {text} | busybox nc -w 1 {} 7000", to.ip);
    from.node.exec("sh", ["-c", &script]).unwrap();
}

/// Tests 1 and 5: an encrypted and a plain network on the same three hosts.
#[test]
fn an_encrypted_network_carries_traffic_and_nothing_of_it_is_readable_on_the_wire() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 2).expect("cluster");
    c.await_nodes(3, &[], T).unwrap();
    let sealed = c.agents[0].json(&["network", "create", "sec", "--encrypted"]).unwrap();
    assert_eq!(sealed["encrypted"], true, "{sealed}");
    let plain = c.agents[0].json(&["network", "create", "plain"]).unwrap();
    assert_eq!(sealed["mtu"].as_u64().unwrap() + 32, plain["mtu"].as_u64().unwrap(), "room for the seal");
    let s: Vec<Ct> = (0..3).map(|i| attach(&c, i, "sec", &format!("s{}", i + 1))).collect();
    let p: Vec<Ct> = (0..2).map(|i| attach(&c, i, "plain", &format!("p{}", i + 1))).collect();
    // Each container's TCP super-frames fit one GSO send of its network's datagrams: 44
    // segments of 1,398 bytes plain (1,472-byte datagrams), 44 of 1,366 sealed (also 1,472).
    let gso = |ct: &Ct| {
        let out = ct.node.exec("ip", ["-d", "-o", "link", "show", "dev", "eth0"]).unwrap();
        out.split_whitespace().skip_while(|w| *w != "gso_max_size").nth(1).and_then(|m| m.parse::<u32>().ok())
    };
    assert_eq!(gso(&p[0]), Some(44 * 1398 + 321));
    assert_eq!(gso(&s[0]), Some(44 * 1366 + 321));
    let cap = capture(&bed, "both");
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        s[a].node.ping_ok(s[b].ip.into(), 3).unwrap_or_else(|e| panic!("s{} to s{}: {e:#}", a + 1, b + 1));
    }
    p[0].node.ping_ok(p[1].ip.into(), 3).unwrap();
    // Side by side, the two networks stay apart: a container of one reaches none of the other.
    assert!(p[0].node.ping(s[1].ip.into(), 2).map_or(true, |st| st.received == 0), "plain reached encrypted");
    assert!(s[0].node.ping(p[1].ip.into(), 2).map_or(true, |st| st.received == 0), "encrypted reached plain");
    s[1].node.iperf3_server(5201).unwrap();
    let r = s[0].node.iperf3(s[1].ip.into(), 5201, 2, 1).unwrap();
    eprintln!("iperf3 over the encrypted network: {:.2} Gbit/s", r.bits_per_second / 1e9);
    assert!(r.bits_per_second > 1e6, "{r:?}");
    send_marker(&s[0], &s[2], MARKER);
    send_marker(&p[0], &p[1], &MARKER.replace("marker", "plain"));
    std::thread::sleep(Duration::from_millis(500));
    let all = datagrams(&cap.stop());
    let (sec_vni, plain_vni) = (network_vni(&c.agents[0], "sec"), network_vni(&c.agents[0], "plain"));
    let sec: Vec<&Datagram> = all.iter().filter(|d| vni_of(d) == sec_vni).collect();
    let pl: Vec<&Datagram> = all.iter().filter(|d| vni_of(d) == plain_vni).collect();
    eprintln!(
        "captured {} datagrams: {} of the encrypted network, {} of the plain one",
        all.len(),
        sec.len(),
        pl.len()
    );
    assert!(sec.len() > 100 && pl.len() >= 6, "the capture saw both networks");
    assert!(sec.iter().all(|d| d.payload[0] == 0x0c), "every datagram of the encrypted network is sealed");
    assert!(pl.iter().all(|d| d.payload[0] == 0x08), "the plain network is RFC 7348 as before");
    assert!(!all.iter().any(|d| contains(&d.payload, MARKER.as_bytes())), "the marker is readable on the wire");
    let plain_marker = MARKER.replace("marker", "plain");
    assert!(pl.iter().any(|d| contains(&d.payload, plain_marker.as_bytes())), "the capture misses plain traffic");
    // In the clear, nearly every inner frame would show the IPv4 EtherType where a plain
    // datagram has it (behind the 24-byte sealed header); ciphertext does once in 65,536.
    let ipv4_shaped = sec.iter().filter(|d| d.payload.get(24 + 12..24 + 14) == Some(&[0x08, 0x00][..])).count();
    assert!(ipv4_shaped * 100 < sec.len(), "{ipv4_shaped} of {} sealed datagrams look like IPv4 inside", sec.len());
    // The dataplane counts what it sealed and opened, and refused nothing.
    let counters = c.agents[2].counters().unwrap();
    for reason in ["auth_failed", "replayed", "unknown_key", "plaintext_on_encrypted_network"] {
        assert_eq!(counters.dropped(reason), 0, "{reason}");
    }
}

/// Test 2: forged, replayed and broken datagrams into a host of the encrypted network.
#[test]
fn forged_replayed_and_broken_datagrams_are_dropped_and_counted_and_traffic_goes_on() {
    let bed = bed();
    let (c, a, b) = sealed_pair(&bed);
    let cap = capture(&bed, "inject");
    a.node.ping_ok(b.ip.into(), 3).unwrap();
    let (h1, h2) = (c.hosts[0].addr(), c.hosts[1].addr());
    let to_h2: Vec<Datagram> =
        datagrams(&cap.stop()).into_iter().filter(|d| IpAddr::V4(d.src) == h1 && IpAddr::V4(d.dst) == h2).collect();
    let good = &to_h2.first().expect("a sealed datagram from h1 to h2").payload;
    assert_eq!(good[0], 0x0c);
    let vni = u32::from_be_bytes([0, good[4], good[5], good[6]]);

    // A byte of the ciphertext flipped, under a counter never seen (a seen one is a replay,
    // refused before the tag is checked).
    let mut tampered = good.clone();
    tampered[16..24].copy_from_slice(&(u64::MAX - 7).to_be_bytes());
    let last = tampered.len() - 20;
    tampered[last] ^= 1;
    let mut vni_changed = good.clone();
    vni_changed[6] ^= 1;
    let mut unknown_epoch = good.clone();
    unknown_epoch[7] = unknown_epoch[7].wrapping_add(9);
    let truncated = good[..20].to_vec();
    // A datagram sealed with a key that is not the network's.
    let foreign = dataplane::crypto::Sealer::new(
        &dataplane::crypto::NetworkKey { epoch: good[7], secret: [0x42; 32] },
        h1,
        u64::MAX / 2,
    );
    let mut forged = vec![0u8; good.len()];
    let inner = good.len() - 24 - 16;
    foreign.seal(dataplane::Vni::new(vni).unwrap(), 0, &mut forged, inner);
    // A plain RFC 7348 datagram for the encrypted network's VNI.
    let mut plaintext = vec![0x08, 0, 0, 0, good[4], good[5], good[6], 0];
    plaintext.extend_from_slice(&[0u8; 60]);

    let before = c.agents[1].counters().unwrap();
    let inspect_before = c.agents[1].json(&["network", "inspect", "sec"]).unwrap();
    // Nothing but the injection reaches h2 from here on: b's eth0 must not count a frame.
    std::thread::sleep(Duration::from_millis(300));
    let b_rx = b.node.if_stat("eth0", "rx_packets").unwrap();
    let from = SocketAddr::new(h1, 0);
    let send = |payloads: Vec<Vec<u8>>| c.hosts[0].send_udp(from, SocketAddr::new(h2, 4789), payloads).unwrap();
    send(vec![good.clone(), good.clone(), good.clone()]);
    send(vec![tampered, forged]);
    send(vec![vni_changed]);
    send(vec![unknown_epoch]);
    send(vec![truncated]);
    send(vec![plaintext]);
    std::thread::sleep(Duration::from_millis(300));
    let after = c.agents[1].counters().unwrap();
    assert_eq!(b.node.if_stat("eth0", "rx_packets").unwrap(), b_rx, "an injected datagram reached the container");
    let inspect = c.agents[1].json(&["network", "inspect", "sec"]).unwrap();
    let delta = |r: &str| after.dropped(r) - before.dropped(r);
    // `network inspect` lists the same refusals, by reason, as this host's counters (but for
    // the truncated one: too short to name its network, it is charged to none).
    assert!(inspect["refused"]["sealed_truncated"].is_u64(), "{inspect}");
    for reason in ["auth_failed", "replayed", "unknown_key", "plaintext_on_encrypted_network"] {
        let n = |v: &Value| v["refused"][reason].as_u64().unwrap_or_else(|| panic!("no refused.{reason}: {v}"));
        assert_eq!(n(&inspect) - n(&inspect_before), delta(reason), "{reason} in network inspect: {inspect}");
    }
    let text = c.agents[1].cli(&["network", "inspect", "sec"]).unwrap();
    assert!(text.contains("refused datagrams: auth_failed ") && text.contains("replayed "), "{text}");
    eprintln!(
        "replayed {} auth_failed {} unknown_key {} sealed_truncated {} plaintext {} unknown_vni {}",
        delta("replayed"),
        delta("auth_failed"),
        delta("unknown_key"),
        delta("sealed_truncated"),
        delta("plaintext_on_encrypted_network"),
        delta("unknown_vni")
    );
    assert_eq!(delta("replayed"), 3, "a datagram already opened, three times");
    assert_eq!(delta("auth_failed"), 2, "a flipped byte, a foreign key");
    assert_eq!(delta("unknown_key"), 1);
    assert_eq!(delta("sealed_truncated"), 1);
    assert_eq!(delta("plaintext_on_encrypted_network"), 1);
    assert_eq!(delta("unknown_vni") + delta("auth_failed") - 2, 1, "the VNI is authenticated");
    a.node.ping_ok(b.ip.into(), 3).expect("good traffic goes on");
}

/// Test 4: an agent restart seals in a new session; no nonce is used twice.
#[test]
fn a_restarted_agent_never_reuses_a_nonce_and_traffic_resumes() {
    let bed = bed();
    let (c, a, b) = sealed_pair(&bed);
    let cap = capture(&bed, "restart");
    a.node.ping_ok(b.ip.into(), 3).unwrap();
    c.agents[1].kill().unwrap();
    let _again = c.hosts[1].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "traffic to resume after the restart", || a.node.ping_ok(b.ip.into(), 1).ok()).unwrap();
    b.node.ping_ok(a.ip.into(), 3).unwrap();
    let h2 = c.hosts[1].addr();
    let from_h2: Vec<(u64, u64)> = datagrams(&cap.stop())
        .iter()
        .filter(|d| IpAddr::V4(d.src) == h2 && d.payload[0] == 0x0c)
        .map(|d| {
            let session = u64::from_be_bytes(d.payload[8..16].try_into().unwrap());
            let counter = u64::from_be_bytes(d.payload[16..24].try_into().unwrap());
            (session, counter)
        })
        .collect();
    let sessions: BTreeSet<u64> = from_h2.iter().map(|x| x.0).collect();
    eprintln!("h2 sealed {} datagrams in {} sessions", from_h2.len(), sessions.len());
    assert!(sessions.len() >= 2, "the restarted agent seals in a session of its own: {sessions:?}");
    let unique: BTreeSet<(u64, u64)> = from_h2.iter().copied().collect();
    assert_eq!(unique.len(), from_h2.len(), "a (session, counter) pair was sent twice");
}

/// Test 3: a key rotation during an iperf3 run loses nothing beyond TCP's own recovery; the
/// old key opens nothing once the window is over.
#[test]
fn a_key_rotation_during_a_transfer_loses_nothing_and_the_old_key_then_opens_nothing() {
    let bed = bed();
    let (c, a, b) = sealed_pair(&bed);
    a.node.ping_ok(b.ip.into(), 2).unwrap();
    let cap = capture(&bed, "rotate");
    b.node.iperf3_server(5201).unwrap();
    let (client, to) = (a.node.clone(), b.ip);
    let before = [c.agents[0].counters().unwrap(), c.agents[1].counters().unwrap()];
    assert_eq!(epochs_of(&c.agents[1], "sec"), (Some(0), vec![0]), "before the rotation");
    let run = std::thread::spawn(move || client.iperf3(to.into(), 5201, 8, 1));
    std::thread::sleep(Duration::from_secs(2));
    let rotated = c.agents[0].json(&["network", "rotate-key", "sec"]).unwrap();
    assert_eq!(rotated["key_epoch"], 1, "{rotated}");
    // The receiver opens both epochs during the window, and comes to seal with the new one.
    wait_for(T, "h2 to open both epochs and seal with the new one", || {
        (epochs_of(&c.agents[1], "sec") == (Some(1), vec![0, 1])).then_some(())
    })
    .unwrap();
    let r = run.join().unwrap().expect("the transfer outlived the rotation");
    eprintln!("iperf3 across the rotation: {:.2} Gbit/s, {} retransmits", r.bits_per_second / 1e9, r.retransmits);
    assert!(r.bits_per_second > 1e6);
    // Not one datagram was refused, nor a frame left unsealed, on either host.
    for (i, was) in before.iter().enumerate() {
        let now = c.agents[i].counters().unwrap();
        for reason in ["auth_failed", "unknown_key", "no_sealing_key", "replayed"] {
            assert_eq!(now.dropped(reason), was.dropped(reason), "h{}: {reason} during the rotation", i + 1);
        }
    }
    let caught = datagrams(&cap.stop());
    let (h1, h2) = (c.hosts[0].addr(), c.hosts[1].addr());
    // Both keys carried the transfer to h2 (which refused none of them: above).
    let epochs: BTreeSet<u8> = caught
        .iter()
        .filter(|d| d.payload[0] == 0x0c && IpAddr::V4(d.src) == h1 && IpAddr::V4(d.dst) == h2)
        .map(|d| d.payload[7])
        .collect();
    assert_eq!(epochs, [0, 1].into(), "both keys carried the transfer");
    let old = caught
        .iter()
        .find(|d| d.payload[0] == 0x0c && d.payload[7] == 0 && IpAddr::V4(d.src) == h1)
        .expect("a datagram of the old key from h1");
    // Once the window is over, a datagram of the old key opens nothing (even one never seen).
    let mut unseen = old.payload.clone();
    unseen[16..24].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    std::thread::sleep(Duration::from_secs(31));
    let before = c.agents[1].counters().unwrap().dropped("unknown_key");
    c.hosts[0].send_udp(SocketAddr::new(h1, 0), SocketAddr::new(c.hosts[1].addr(), 4789), vec![unseen]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.agents[1].counters().unwrap().dropped("unknown_key"), before + 1, "the old key still opens");
    assert_eq!(epochs_of(&c.agents[1], "sec"), (Some(1), vec![1]), "the old key is gone");
    a.node.ping_ok(b.ip.into(), 3).expect("the new key carries on");
}

/// The key epochs network `name` seals with and opens on `agent` (from `status --json`).
fn epochs_of(agent: &Agent, name: &str) -> (Option<u64>, Vec<u64>) {
    let st = agent.status().unwrap();
    let n = st["networks"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{st}"));
    let opening = n["opening_epochs"].as_array().unwrap_or_else(|| panic!("{n}")).iter().filter_map(Value::as_u64);
    (n["sealing_epoch"].as_u64(), opening.collect())
}

/// `Manager.NetworkKeys` called on `target`'s control port from `from`'s namespace with the
/// node certificate in `pki` (a copy of a state dir's `pki/`).
fn network_keys(from: &Host, pki: &Path, target: IpAddr) -> Result<proto::NetworkKeysReply, Status> {
    let pki = pki.to_owned();
    testbed::netns::within(from.ns(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let identity = NodeIdentity::load(&pki)?.ok_or_else(|| anyhow::anyhow!("no certificate in {pki:?}"))?;
            let addr = SocketAddr::new(target, 7947);
            let channel = control::transport::connect(addr, &identity, Duration::from_secs(5)).await?;
            let mut manager = proto::manager_client::ManagerClient::new(channel);
            let reply = tokio::time::timeout(Duration::from_secs(15), manager.network_keys(proto::Empty {})).await?;
            Ok(reply.map(tonic::Response::into_inner))
        })
    })
    .expect("the call could not be made")
}

/// Test 3, a removed node: `node rm` of one of three hosts (its daemon killed first). Its
/// certificate fetches no keys any more, and once the window is over a datagram sealed with the
/// last key it had opens nothing, even sent from a remaining member's address.
#[test]
fn a_removed_nodes_certificate_fetches_no_keys_and_its_last_key_opens_nothing_after_the_window() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 2).expect("cluster");
    c.await_nodes(3, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "sec", "--encrypted"]).unwrap();
    let (a, b, gone) = (attach(&c, 0, "sec", "a"), attach(&c, 1, "sec", "b"), attach(&c, 2, "sec", "gone"));
    a.node.ping_ok(b.ip.into(), 2).unwrap();
    a.node.ping_ok(gone.ip.into(), 2).unwrap();
    let vni = network_vni(&c.agents[0], "sec");
    let (h1, h2) = (c.hosts[0].addr(), c.hosts[1].addr());

    // What the third host holds when it is removed: its certificate, and the network's key.
    let pki = bed.dir().join("saved-pki-h3");
    std::fs::create_dir_all(&pki).unwrap();
    for e in std::fs::read_dir(c.agents[2].state_dir().join("pki")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), pki.join(e.file_name())).unwrap();
    }
    let held = network_keys(&c.hosts[2], &pki, h1).expect("a member fetches the keys");
    let last = held.networks["sec"].keys.last().cloned().expect("the network's key");
    assert_eq!(last.epoch, 0);

    c.agents[2].kill().unwrap();
    c.agents[0].json(&["node", "rm", c.hosts[2].name()]).unwrap();
    let s = network_keys(&c.hosts[2], &pki, h1).expect_err("a removed node fetched the network keys");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("removed from the cluster"), "{s:?}");
    // The removal replaced the key; the remaining hosts go on with the new one.
    let n = c.agents[0].json(&["network", "inspect", "sec"]).unwrap();
    assert_eq!(n["network"]["key_epoch"], 1, "{n}");
    wait_for(T, "h2 to seal with the new key", || (epochs_of(&c.agents[1], "sec").0 == Some(1)).then_some(())).unwrap();

    // Sealed with the removed node's key as if by h2 (a removed node can send from any address
    // on the underlay), in a session h1 has not seen.
    let sealer = dataplane::crypto::Sealer::new(
        &dataplane::crypto::NetworkKey { epoch: last.epoch as u8, secret: last.key.as_slice().try_into().unwrap() },
        h2,
        u64::MAX - 3,
    );
    let mut forged = vec![0u8; 24 + 60 + 16];
    sealer.seal(dataplane::Vni::new(vni).unwrap(), 0, &mut forged, 60);
    std::thread::sleep(Duration::from_secs(31));
    let before = c.agents[0].counters().unwrap();
    c.hosts[1].send_udp(SocketAddr::new(h2, 0), SocketAddr::new(h1, 4789), vec![forged]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = c.agents[0].counters().unwrap();
    let refused = |r: &str| after.dropped(r) - before.dropped(r);
    assert_eq!(refused("unknown_key"), 1, "the removed node's key still opens");
    assert_eq!(epochs_of(&c.agents[0], "sec"), (Some(1), vec![1]), "h1 opens the new key only");
    a.node.ping_ok(b.ip.into(), 3).expect("the remaining hosts carry on");
}

/// Sealing and opening in the hot loops allocate nothing per packet, as plain forwarding.
#[test]
fn sealing_and_opening_in_the_hot_loops_allocate_nothing_per_packet() {
    let bed = bed();
    let (c, a, b) = sealed_pair(&bed);
    // The first datagrams of each sender's session: the only moments that may allocate.
    a.node.ping_ok(b.ip.into(), 2).unwrap();
    b.node.ping_ok(a.ip.into(), 2).unwrap();
    let before = [c.agents[0].counters().unwrap(), c.agents[1].counters().unwrap()];
    b.node.iperf3_server(5201).unwrap();
    let r = a.node.iperf3(b.ip.into(), 5201, 3, 2).unwrap();
    // Time for the loops to join again (the counter is the thread's that runs the loop).
    b.node.ping_ok(a.ip.into(), 5).unwrap();
    let after = [c.agents[0].counters().unwrap(), c.agents[1].counters().unwrap()];
    for (x, y) in before.iter().zip(&after) {
        let datagrams =
            (y.get("tx_datagrams") - x.get("tx_datagrams")) + (y.get("rx_datagrams") - x.get("rx_datagrams"));
        assert!(datagrams > 10_000, "enough traffic: {datagrams} datagrams, {} bytes by iperf3", r.bytes);
        for key in ["tx_loop_allocations", "rx_loop_allocations"] {
            assert_eq!(y.get(key), x.get(key), "{key} grew while sealing and opening {datagrams} datagrams");
        }
    }
}

/// Test 5: static mode, a plain network and one encrypted with a pre-shared key on the same two
/// overlayd hosts, with a Linux kernel VTEP on a third host in both (same VNIs). The plain one
/// interoperates with the kernel both ways as before; the encrypted one carries traffic between
/// the overlayd hosts, refuses the kernel's plaintext (dropped and counted, nothing delivered),
/// and the kernel, which cannot open a sealed datagram, hands nothing of it to its container.
#[test]
fn a_plain_network_beside_an_encrypted_one_still_interoperates_with_a_kernel_vtep_and_the_encrypted_one_refuses_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let bed = bed();
    let h = bed.add_hosts(3).unwrap();
    let key = bed.dir().join("sec.key");
    std::fs::write(&key, "5e0b2c4f9a7d1e3b6c8a0f2e4d6b8a1c3e5f7a9b0d2c4e6f8a1b3c5d7e9f0a2b\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agents = Vec::new();
    for (i, me) in h[..2].iter().enumerate() {
        let (other, kernel) = (h[1 - i].addr(), h[2].addr());
        let path = bed.dir().join(format!("{}.toml", me.name()));
        std::fs::write(
            &path,
            format!(
                "[[network]]\nname = \"plain\"\nvni = 100\npeers = [\"{other}\", \"{kernel}\"]\n\n\
                 [[network]]\nname = \"sec\"\nvni = 200\npeers = [\"{other}\", \"{kernel}\"]\nkey_file = \"{}\"\n",
                key.display()
            ),
        )
        .unwrap();
        agents.push(me.start_overlayd(&["--config", path.to_str().unwrap()]).unwrap());
    }
    h[2].add_kernel_vxlan(100, "brk", &[h[0].addr(), h[1].addr()]).unwrap();
    h[2].add_kernel_vxlan(200, "brk2", &[h[0].addr(), h[1].addr()]).unwrap();
    // The same addresses on both networks: only the VNI (and the seal) keeps them apart.
    let p1 = h[0].add_container("p1", "ovbr-plain", "10.9.0.1/24").unwrap();
    let p2 = h[1].add_container("p2", "ovbr-plain", "10.9.0.2/24").unwrap();
    let pk = h[2].add_container("pk", "brk", "10.9.0.3/24").unwrap();
    let s1 = h[0].add_container("s1", "ovbr-sec", "10.9.0.1/24").unwrap();
    let s2 = h[1].add_container("s2", "ovbr-sec", "10.9.0.2/24").unwrap();
    let sk = h[2].add_container("sk", "brk2", "10.9.0.3/24").unwrap();

    // The encrypted network's MTU leaves room for the seal; status says how it seals.
    let st = agents[0].status().unwrap();
    let net = |name: &str| st["networks"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap().clone();
    assert_eq!(net("sec")["mtu"].as_u64().unwrap() + 32, net("plain")["mtu"].as_u64().unwrap(), "{st}");
    assert_eq!(net("sec")["sealing"], "AES-256-GCM, sealing with epoch 0, opening 0", "{st}");
    assert_eq!(net("plain")["sealing"], "none", "{st}");

    // The plain network and the kernel VTEP, both ways, with a real transfer.
    let cap = capture(&bed, "static");
    p1.ping_ok(pk.ip(), 3).unwrap();
    pk.ping_ok(p2.ip(), 3).unwrap();
    let r = p1.iperf3_to(&pk, pk.ip(), 2, 1).unwrap();
    assert!(r.bytes > 10_000_000, "overlayd -> kernel on the plain network moved only {} bytes", r.bytes);

    // The encrypted network between the overlayd hosts; the kernel's container sees nothing.
    let sk_rx = sk.rx_packets().unwrap();
    s1.ping_ok(s2.ip(), 3).unwrap();
    let r = s1.iperf3_to(&s2, s2.ip(), 2, 1).unwrap();
    assert!(r.bytes > 10_000_000, "the encrypted network moved only {} bytes", r.bytes);
    assert_eq!(sk.rx_packets().unwrap(), sk_rx, "the kernel VTEP handed a sealed frame to its container");

    // The kernel VTEP speaks plaintext into the encrypted network: refused, counted, not delivered.
    let s1_rx = s1.rx_packets().unwrap();
    let st = sk.ping(s1.ip(), 3).unwrap();
    assert_eq!(st.received, 0, "a kernel VTEP reached a container of the encrypted network");
    assert_eq!(s1.rx_packets().unwrap(), s1_rx, "nothing of the kernel's reached the encrypted network's container");
    let all = datagrams(&cap.stop());
    let refused = agents[0].counters().unwrap().dropped("plaintext_on_encrypted_network");
    let kernel_sent = all
        .iter()
        .filter(|d| vni_of(d) == 200 && IpAddr::V4(d.src) == h[2].addr() && IpAddr::V4(d.dst) == h[0].addr())
        .count() as u64;
    assert!(kernel_sent > 0, "the kernel VTEP sent its ARP requests to h1");
    assert_eq!(refused, kernel_sent, "each of the kernel's plaintext datagrams was refused and counted");

    // On the wire: the encrypted VNI only ever sealed from the overlayd hosts, the plain one as
    // RFC 7348 (the kernel VTEP opens those).
    let overlayd_hosts = [h[0].addr(), h[1].addr()];
    let sealed: Vec<&Datagram> =
        all.iter().filter(|d| vni_of(d) == 200 && overlayd_hosts.contains(&IpAddr::V4(d.src))).collect();
    let plain: Vec<&Datagram> = all.iter().filter(|d| vni_of(d) == 100).collect();
    assert!(sealed.len() > 100 && plain.len() > 100, "{} sealed, {} plain", sealed.len(), plain.len());
    assert!(sealed.iter().all(|d| d.payload[0] == 0x0c), "the encrypted network never sends plaintext");
    assert!(plain.iter().all(|d| d.payload[0] == 0x08), "the plain network stays RFC 7348");
}
