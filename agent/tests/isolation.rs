//! Isolation end to end (issue 12, items 5 and 6), each attack made by hand from inside a
//! container of a real cluster, the frames written with a packet socket:
//! - a container sends VXLAN (to its host's underlay address and, through a host that
//!   forwards, to another host's; with its own source address and a member host's) into
//!   another network: nothing is delivered, and the drop is counted; gossip, the control port
//!   and the host's other services are closed to it too, while its gateway answers ping;
//! - a container sends with another container's IP or MAC, to a container on its own host and
//!   on another: nothing is delivered, the drop is counted; a member host that forges frames
//!   of another host's container is refused by the receiver's dataplane;
//! - a container's gratuitous ARP claims another's address, on the same host and across
//!   hosts: a third container's neighbour entry keeps the right MAC and its pings arrive.
//!
//! Every attack comes with a control (the same frames from where they are legitimate, or with
//! the sender's own identity) that must be delivered, so that "nothing arrived" means the
//! attack was refused and not that the frames were malformed.
//!
//! These tests need root (they create namespaces and packet sockets). They fail, never skip,
//! when they cannot run.
#![allow(clippy::print_stderr)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Node, Options, Testbed};

const T: Duration = Duration::from_secs(20);
const VXLAN_PORT: u16 = 4789;
const GOSSIP_PORT: u16 = 7946;
const CONTROL_PORT: u16 = 7947;
/// Where the victims listen for the attackers' UDP datagrams.
const PROBE_PORT: u16 = 9999;
/// What every probe datagram starts with.
const MARK: &[u8] = b"ovtb-isolation-probe";
/// Frames an attack sends.
const ATTEMPTS: usize = 5;

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("the overlay is IPv4"),
    }
}

/// The MAC overlayd gives the endpoint with address `ip`.
fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x4f, o[0], o[1], o[2], o[3]]
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------------------------------------
// Frames, by hand.

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying IPv4/UDP from `src` to `dst` (UDP checksum 0: none).
fn udp_frame(eth_src: [u8; 6], eth_dst: [u8; 6], src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else { panic!("IPv4 only") };
    let mut f = Vec::new();
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&s.octets());
    ip[16..20].copy_from_slice(&d.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A probe frame from `(mac, ip)` to the victim `(mac, ip)`'s [`PROBE_PORT`].
fn probe(from: ([u8; 6], Ipv4Addr), to: ([u8; 6], Ipv4Addr)) -> Vec<u8> {
    udp_frame(from.0, to.0, SocketAddr::new(from.1.into(), 40_000), SocketAddr::new(to.1.into(), PROBE_PORT), MARK)
}

/// A broadcast ARP frame (1: request, 2: reply) from `eth_src` saying `sender_ip` is at
/// `sender_mac`, with the target fields set to the sender's (gratuitous ARP).
fn gratuitous_arp(op: u16, eth_src: [u8; 6], sender_mac: [u8; 6], sender_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&if op == 1 { [0; 6] } else { [0xff; 6] });
    f.extend_from_slice(&sender_ip.octets());
    f
}

/// A VXLAN datagram's payload: the 8-byte header (flags 0x08, `vni`) and the inner frame.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0];
    d.extend_from_slice(&(vni << 8).to_be_bytes());
    d.extend_from_slice(inner);
    d
}

// ---------------------------------------------------------------------------------------------
// Sending and receiving inside namespaces.

/// Writes `frames` as they are to `eth0` of namespace `ns`, with a packet socket: source MAC,
/// source address and everything else are whatever the frames say.
fn inject(ns: &str, frames: Vec<Vec<u8>>) {
    testbed::netns::within(ns, move || {
        let all = (libc::ETH_P_ALL as u16).to_be();
        let s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(i32::from(all))))?;
        // SAFETY: a NUL-terminated interface name; if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        anyhow::ensure!(index != 0, "no eth0 in {}", std::process::id());
        // SAFETY: sockaddr_ll is plain C data, valid zeroed.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = index as i32;
        // SAFETY: binds our own packet socket to a sockaddr_ll that lives across the call,
        // with its exact size.
        let r = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(r == 0, "bind a packet socket to eth0: {}", std::io::Error::last_os_error());
        for f in &frames {
            s.send(f)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
    .expect("cannot write frames inside the container (run as root)");
}

/// Sends UDP `payloads` from `from` (an address of namespace `ns`) to `dst`.
fn send_udp(ns: &str, from: SocketAddr, dst: SocketAddr, payloads: Vec<Vec<u8>>) {
    testbed::netns::within(ns, move || {
        let s = UdpSocket::bind(from)?;
        for p in &payloads {
            s.send_to(p, dst)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("cannot send UDP from {from} to {dst}: {e:#}"));
}

/// Whether a TCP connection from namespace `ns` to `dst` is accepted within a second.
fn connects(ns: &str, dst: SocketAddr) -> bool {
    testbed::netns::within(ns, move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok())).unwrap()
}

/// Counts the probe datagrams ([`MARK`]) that reach [`PROBE_PORT`] in a namespace.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Probe {
    fn listen(node: &Node) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, s) = (node.ns().to_owned(), Arc::clone(&stop));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            testbed::netns::within(&ns, move || {
                let sock = UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PROBE_PORT))?;
                sock.set_read_timeout(Some(Duration::from_millis(50)))?;
                ready_tx.send(()).ok();
                let mut buf = [0u8; 2048];
                let mut n = 0;
                while !s.load(Ordering::Relaxed) {
                    if let Ok((len, _)) = sock.recv_from(&mut buf) {
                        n += usize::from(buf[..len].starts_with(MARK));
                    }
                }
                Ok(n)
            })
            .expect("cannot listen inside the victim")
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("the probe listener did not start");
        Probe { stop, thread: Some(thread) }
    }

    /// Probes received so far, after letting frames in flight arrive.
    fn count(mut self) -> usize {
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster.

fn dropped(agent: &Agent, reason: &str) -> u64 {
    agent.counters().unwrap().dropped(reason)
}

fn gossip_counter(agent: &Agent, name: &str) -> u64 {
    let p: Value = agent.json(&["peers"]).unwrap();
    p["counters"][name].as_u64().unwrap_or(0)
}

/// A cluster of `hosts` hosts (the first a manager, the others workers), every one ready.
fn cluster(bed: &Testbed, hosts: usize) -> Cluster {
    let c = Cluster::form(bed, 1, hosts - 1).expect("cannot form the cluster");
    c.await_nodes(hosts, &[], T).unwrap();
    c
}

/// A network's VNI, created on the first host.
fn create(c: &Cluster, name: &str) -> u32 {
    let n = c.agents[0].json(&["network", "create", name]).unwrap();
    n["vni"].as_u64().unwrap_or_else(|| panic!("network create printed no VNI: {n}")) as u32
}

/// A container attached to `network` on host `i`, with its address and MAC.
struct Ct {
    node: Node,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

impl Ct {
    fn id(&self) -> ([u8; 6], Ipv4Addr) {
        (self.mac, self.ip)
    }
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str) -> Ct {
    let (node, ip) = c.attach(i, network, name).unwrap();
    let ip = v4(ip);
    Ct { node, ip, mac: mac_of(ip) }
}

/// Waits until every host's tables list the endpoints of every other host in the network.
fn await_reachable(pairs: &[(&Ct, &Ct)]) {
    for (a, b) in pairs {
        wait_for(T, &format!("{} to reach {}", a.ip, b.ip), || {
            a.node.ping(b.ip.into(), 1).ok().filter(|p| p.received == 1)
        })
        .unwrap();
    }
}

fn host_ip(c: &Cluster, i: usize) -> Ipv4Addr {
    v4(c.hosts[i].addr())
}

/// Turns forwarding on in a host, as egress to the world needs.
fn forward(c: &Cluster, i: usize) {
    c.hosts[i].exec("sysctl", ["-qw", "net.ipv4.ip_forward=1"]).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (a) No VXLAN, gossip or control from inside the overlay.

/// A container of network red crafts VXLAN datagrams of network blue: to its own host's
/// underlay address (from its own address, and from a member host's it put on its interface),
/// and, through its host forwarding, to another host's (from a third member's address, and
/// its own). Nothing reaches blue's containers, and the hosts count what they dropped.
#[test]
fn a_container_cannot_send_vxlan_into_any_network() {
    let bed = bed();
    let c = cluster(&bed, 3);
    create(&c, "red");
    let blue = create(&c, "blue");
    let attacker = attach(&c, 0, "red", "attacker");
    let v1 = attach(&c, 0, "blue", "v1");
    let v2 = attach(&c, 1, "blue", "v2");
    let v3 = attach(&c, 2, "blue", "v3");
    await_reachable(&[(&v1, &v2), (&v2, &v3), (&v3, &v1)]);
    let (h1, h2, h3) = (host_ip(&c, 0), host_ip(&c, 1), host_ip(&c, 2));
    // Each inner frame comes from a container of the host the datagram claims to be from, as
    // that host's would: only where the datagram came from can give it away.
    let into = |from: &Ct, victim: &Ct| vxlan(blue, &probe(from.id(), victim.id()));
    let vxlan_at = |ip: Ipv4Addr| SocketAddr::new(ip.into(), VXLAN_PORT);
    let n = || 0..ATTEMPTS;

    // The control: the same datagrams from member host h3's underlay are delivered.
    let p1 = Probe::listen(&v1.node);
    send_udp(c.hosts[2].ns(), SocketAddr::new(h3.into(), 0), vxlan_at(h1), n().map(|_| into(&v3, &v1)).collect());
    assert_eq!(p1.count(), ATTEMPTS, "crafted VXLAN from a member host's underlay is delivered");

    let drops_before = dropped(&c.agents[0], "vxlan_from_overlay");
    let spoofed_before = dropped(&c.agents[0], "spoofed_ip");
    // To its own host, with its own address and with member host h2's.
    let p1 = Probe::listen(&v1.node);
    let own = SocketAddr::new(attacker.ip.into(), 0);
    send_udp(attacker.node.ns(), own, vxlan_at(h1), n().map(|_| into(&v2, &v1)).collect());
    attacker.node.exec("ip", ["addr", "add", &format!("{h2}/32"), "dev", "eth0"]).unwrap();
    send_udp(attacker.node.ns(), SocketAddr::new(h2.into(), 0), vxlan_at(h1), n().map(|_| into(&v2, &v1)).collect());
    let delivered_here = p1.count();

    // Through its host, forwarding, to host h2: from member h3's address and from its own.
    forward(&c, 0);
    let p2 = Probe::listen(&v2.node);
    attacker.node.exec("ip", ["addr", "del", &format!("{h2}/32"), "dev", "eth0"]).unwrap();
    attacker.node.exec("ip", ["addr", "add", &format!("{h3}/32"), "dev", "eth0"]).unwrap();
    send_udp(attacker.node.ns(), SocketAddr::new(h3.into(), 0), vxlan_at(h2), n().map(|_| into(&v3, &v2)).collect());
    send_udp(attacker.node.ns(), own, vxlan_at(h2), n().map(|_| into(&v3, &v2)).collect());
    let delivered_there = p2.count();

    let vxlan_drops = dropped(&c.agents[0], "vxlan_from_overlay") - drops_before;
    let spoofed = dropped(&c.agents[0], "spoofed_ip") - spoofed_before;
    eprintln!(
        "delivered: {delivered_here} on the attacker's host, {delivered_there} on another; dropped on the attacker's \
         host: {vxlan_drops} as VXLAN from the overlay, {spoofed} with a spoofed source"
    );
    assert_eq!(delivered_here, 0, "VXLAN from a container was delivered into blue on its own host");
    assert_eq!(delivered_there, 0, "VXLAN from a container was delivered into blue on another host");
    assert!(vxlan_drops >= 2 * ATTEMPTS as u64, "VXLAN from the container's own address not counted: {vxlan_drops}");
    assert!(spoofed >= 2 * ATTEMPTS as u64, "datagrams from a member host's address not counted: {spoofed}");
}

/// A container cannot reach gossip, the control port or any other service of its host (nor,
/// through its host, of another host), but its gateway answers ping.
#[test]
fn gossip_control_and_host_services_are_closed_to_containers() {
    let bed = bed();
    let c = cluster(&bed, 2);
    create(&c, "red");
    let attacker = attach(&c, 0, "red", "attacker");
    let (h1, h2) = (host_ip(&c, 0), host_ip(&c, 1));
    let gateway = v4(attacker
        .node
        .exec("ip", ["route", "show", "default"])
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap());
    attacker.node.ping_ok(gateway.into(), 1).expect("the gateway answers ping");
    // A service of the host's own, listening on every address.
    let service = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 8080);
    let listener = {
        let ns = c.hosts[0].ns().to_owned();
        testbed::netns::within(&ns, move || Ok(std::net::TcpListener::bind(service)?)).unwrap()
    };
    forward(&c, 0);
    let own = SocketAddr::new(attacker.ip.into(), 0);
    let before = |what: &str| dropped(&c.agents[0], what);
    let (gossip0, control0, host0) =
        (before("gossip_from_overlay"), before("control_from_overlay"), before("host_from_overlay"));
    let not_gossip0 = gossip_counter(&c.agents[0], "rx_not_gossip") + gossip_counter(&c.agents[1], "rx_not_gossip");

    let garbage: Vec<Vec<u8>> = (0..ATTEMPTS).map(|i| vec![i as u8; 64]).collect();
    send_udp(attacker.node.ns(), own, SocketAddr::new(h1.into(), GOSSIP_PORT), garbage.clone());
    send_udp(attacker.node.ns(), own, SocketAddr::new(h2.into(), GOSSIP_PORT), garbage);
    let control: Vec<(&str, SocketAddr, bool)> = vec![
        (
            "the control port of its host",
            SocketAddr::new(h1.into(), CONTROL_PORT),
            connects(attacker.node.ns(), SocketAddr::new(h1.into(), CONTROL_PORT)),
        ),
        (
            "the control port on its gateway",
            SocketAddr::new(gateway.into(), CONTROL_PORT),
            connects(attacker.node.ns(), SocketAddr::new(gateway.into(), CONTROL_PORT)),
        ),
        (
            "the control port of another host",
            SocketAddr::new(h2.into(), CONTROL_PORT),
            connects(attacker.node.ns(), SocketAddr::new(h2.into(), CONTROL_PORT)),
        ),
        (
            "a service of its host",
            SocketAddr::new(h1.into(), 8080),
            connects(attacker.node.ns(), SocketAddr::new(h1.into(), 8080)),
        ),
        (
            "a service of its host on its gateway",
            SocketAddr::new(gateway.into(), 8080),
            connects(attacker.node.ns(), SocketAddr::new(gateway.into(), 8080)),
        ),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let not_gossip =
        gossip_counter(&c.agents[0], "rx_not_gossip") + gossip_counter(&c.agents[1], "rx_not_gossip") - not_gossip0;
    let (gossip, control_drops, host) = (
        before("gossip_from_overlay") - gossip0,
        before("control_from_overlay") - control0,
        before("host_from_overlay") - host0,
    );
    drop(listener);
    eprintln!(
        "gossip read {not_gossip} of the container's datagrams; connected: {:?}",
        control.iter().map(|(w, _, ok)| (*w, *ok)).collect::<Vec<_>>()
    );
    eprintln!("dropped: {gossip} gossip datagrams, {control_drops} control-port and {host} other packets");
    assert_eq!(not_gossip, 0, "the gossip layer read datagrams from a container");
    for (what, dst, connected) in &control {
        assert!(!connected, "a container connected to {what} ({dst})");
    }
    assert!(gossip >= 2 * ATTEMPTS as u64, "gossip datagrams from a container not counted: {gossip}");
    assert!(control_drops >= 3, "control-port connections from a container not counted: {control_drops}");
    assert!(host >= 2, "connections to the host's service not counted: {host}");
    // Its gateway still answers.
    attacker.node.ping_ok(gateway.into(), 1).expect("the gateway answers ping");
}

// ---------------------------------------------------------------------------------------------
// (b) No spoofing between containers.

/// A container sends with another container's address, MAC or both, or an outsider's, to a
/// container on its host and one on another: none arrives, each is counted; with its own
/// identity the same frames arrive. A member host that forges another host's container is
/// refused by the receiving dataplane.
#[test]
fn a_container_sends_only_with_its_own_mac_and_ip() {
    let bed = bed();
    let c = cluster(&bed, 3);
    let blue = create(&c, "blue");
    let attacker = attach(&c, 0, "blue", "attacker");
    let other = attach(&c, 0, "blue", "other");
    let here = attach(&c, 0, "blue", "here");
    let there = attach(&c, 1, "blue", "there");
    let third = attach(&c, 2, "blue", "third");
    await_reachable(&[(&attacker, &there), (&attacker, &here), (&there, &third), (&third, &here)]);
    let outsider = ([0x02, 0x66, 0, 0, 0, 1], Ipv4Addr::new(192, 0, 2, 66));

    // With its own identity, to both: delivered.
    let (ph, pt) = (Probe::listen(&here.node), Probe::listen(&there.node));
    inject(attacker.node.ns(), vec![probe(attacker.id(), here.id()), probe(attacker.id(), there.id())]);
    assert_eq!((ph.count(), pt.count()), (1, 1), "the attacker's own frames are delivered");

    let names = ["spoofed_mac", "spoofed_ip"];
    let before: Vec<u64> = names.iter().map(|n| dropped(&c.agents[0], n)).collect();
    let forged = [
        ("another container's IP", (attacker.mac, other.ip)),
        ("another container's MAC", (other.mac, attacker.ip)),
        ("another container's MAC and IP", other.id()),
        ("an outsider's MAC and IP", outsider),
        ("an outsider's IP", (attacker.mac, outsider.1)),
    ];
    for (what, id) in forged {
        let (ph, pt) = (Probe::listen(&here.node), Probe::listen(&there.node));
        let frames = (0..ATTEMPTS).flat_map(|_| [probe(id, here.id()), probe(id, there.id())]).collect();
        inject(attacker.node.ns(), frames);
        let (h, t) = (ph.count(), pt.count());
        eprintln!("with {what}: {h} delivered on its host, {t} on another");
        assert_eq!((h, t), (0, 0), "a frame with {what} was delivered");
    }
    let counted: Vec<u64> = names.iter().zip(&before).map(|(n, b)| dropped(&c.agents[0], n) - b).collect();
    eprintln!("dropped on the attacker's host: {names:?} = {counted:?}");
    assert!(counted[0] >= 3 * 2 * ATTEMPTS as u64, "spoofed MACs not counted: {counted:?}");
    assert!(counted[1] >= 2 * 2 * ATTEMPTS as u64, "spoofed addresses not counted: {counted:?}");

    // A member host (h2) forging frames of h3's container, straight onto the underlay: the
    // receiver's dataplane refuses them; h2's own container's identity passes.
    let (h1, h2) = (host_ip(&c, 0), host_ip(&c, 1));
    let refused0 = dropped(&c.agents[0], "source_not_of_sender");
    let ph = Probe::listen(&here.node);
    let from_h2 = SocketAddr::new(h2.into(), 0);
    send_udp(
        c.hosts[1].ns(),
        from_h2,
        SocketAddr::new(h1.into(), VXLAN_PORT),
        vec![vxlan(blue, &probe(there.id(), here.id()))],
    );
    assert_eq!(ph.count(), 1, "a host's own container's frame is delivered");
    let ph = Probe::listen(&here.node);
    let forged: Vec<Vec<u8>> = (0..ATTEMPTS)
        .flat_map(|_| {
            [
                vxlan(blue, &probe(third.id(), here.id())),
                vxlan(blue, &probe((there.mac, third.ip), here.id())),
                vxlan(blue, &probe((third.mac, there.ip), here.id())),
            ]
        })
        .collect();
    send_udp(c.hosts[1].ns(), from_h2, SocketAddr::new(h1.into(), VXLAN_PORT), forged);
    let delivered = ph.count();
    let refused = dropped(&c.agents[0], "source_not_of_sender") - refused0;
    eprintln!("forged by a member host: {delivered} delivered, {refused} refused");
    assert_eq!(delivered, 0, "a host's forged frames of another host's container were delivered");
    assert_eq!(refused, 3 * ATTEMPTS as u64, "forged frames not counted");
}

// ---------------------------------------------------------------------------------------------
// (c) Gratuitous ARP.

/// While `attacker` keeps announcing `victim`'s address with its own MAC (gratuitous ARP
/// requests and replies, every 100 ms), `witness` pings `victim` 10 times: every ping must
/// arrive and `witness`'s neighbour entry must keep `victim`'s MAC.
fn arp_spoofing_fails(attacker: &Ct, victim: &Ct, witness: &Ct) {
    witness.node.ping_ok(victim.ip.into(), 1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spam = {
        let (ns, stop, a, v) = (attacker.node.ns().to_owned(), Arc::clone(&stop), attacker.mac, victim.ip);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                inject(&ns, vec![gratuitous_arp(1, a, a, v), gratuitous_arp(2, a, a, v)]);
                std::thread::sleep(Duration::from_millis(60));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let pings = witness.node.ping(victim.ip.into(), 10).unwrap();
    let neigh = witness.node.exec("ip", ["neigh", "show", &victim.ip.to_string()]).unwrap();
    stop.store(true, Ordering::Relaxed);
    spam.join().unwrap();
    eprintln!(
        "pings during the spoofing ({:?}): {}/{}; neighbour entry: {}",
        started.elapsed(),
        pings.received,
        pings.transmitted,
        neigh.trim()
    );
    assert!(neigh.contains(&mac_text(victim.mac)), "the witness's neighbour entry was rewritten: {neigh}");
    assert_eq!((pings.received, pings.transmitted), (10, 10), "pings were diverted");
}

#[test]
fn gratuitous_arp_cannot_take_another_containers_address() {
    let bed = bed();
    let c = cluster(&bed, 2);
    create(&c, "blue");
    let victim = attach(&c, 0, "blue", "victim");
    let witness = attach(&c, 0, "blue", "witness");
    let near = attach(&c, 0, "blue", "near");
    let far = attach(&c, 1, "blue", "far");
    await_reachable(&[(&witness, &victim), (&far, &victim), (&near, &victim)]);
    let before = [dropped(&c.agents[0], "spoofed_arp"), dropped(&c.agents[1], "spoofed_arp")];
    // From a container on the victim's host, then from one on another host.
    arp_spoofing_fails(&near, &victim, &witness);
    arp_spoofing_fails(&far, &victim, &witness);
    let counted = [dropped(&c.agents[0], "spoofed_arp") - before[0], dropped(&c.agents[1], "spoofed_arp") - before[1]];
    eprintln!("gratuitous ARP dropped: {counted:?} (the victim's host, the other)");
    assert!(counted[0] >= 10 && counted[1] >= 10, "spoofed ARP not counted: {counted:?}");
}

// ---------------------------------------------------------------------------------------------
// The rules' lifecycle.

/// The bridge ports overlayd has rules for, from `nft list map bridge overlayd ports`.
fn guarded_ports(c: &Cluster, i: usize) -> Vec<String> {
    let out = c.hosts[i].exec("nft", ["-j", "list", "map", "bridge", "overlayd", "ports"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut ports: Vec<String> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["map"]["elem"].as_array().cloned())
        .flatten()
        .filter_map(|e| e[0].as_str().map(str::to_owned))
        .collect();
    ports.sort();
    ports
}

fn host_ifname(c: &Cluster, name: &str) -> String {
    let inspect = c.agents[0].json(&["network", "inspect", "blue"]).unwrap();
    let e = inspect["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    e.and_then(|e| e["host_ifname"].as_str().map(str::to_owned)).unwrap_or_else(|| panic!("no {name}: {inspect}"))
}

/// A port's rules come with its endpoint and go with it; a daemon killed with SIGKILL leaves
/// them in force, and when it is back it keeps those of its endpoints and removes the others;
/// a daemon that stops removes its tables.
#[test]
fn port_rules_live_as_long_as_their_endpoints_and_the_tables_as_the_daemon() {
    let bed = bed();
    let mut c = Cluster::form(&bed, 1, 0).expect("cannot form the cluster");
    create(&c, "blue");
    let x = attach(&c, 0, "blue", "x");
    let y = attach(&c, 0, "blue", "y");
    let z = attach(&c, 0, "blue", "z");
    let (xp, yp, zp) = (host_ifname(&c, "x"), host_ifname(&c, "y"), host_ifname(&c, "z"));
    let mut all = vec![xp.clone(), yp.clone(), zp.clone()];
    all.sort();
    assert_eq!(guarded_ports(&c, 0), all);
    c.agents[0].json(&["detach", "--name", "y"]).unwrap();
    let mut kept = vec![xp.clone(), zp.clone()];
    kept.sort();
    assert_eq!(guarded_ports(&c, 0), kept, "detach removes the port's rules");

    // Killed: the rules stay in force. A stale port chain is added meanwhile.
    c.agents[0].kill().unwrap();
    assert_eq!(guarded_ports(&c, 0), kept);
    c.hosts[0]
        .nft("add chain bridge overlayd port-ovlstale\nadd element bridge overlayd ports { \"ovlstale\" : goto port-ovlstale }\n")
        .unwrap();
    let spoofed = || {
        let p = Probe::listen(&z.node);
        inject(x.node.ns(), vec![probe((x.mac, y.ip), z.id())]);
        p.count()
    };
    assert_eq!(spoofed(), 0, "while the daemon is down");
    c.agents[0] = c.hosts[0].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "the stale port's rules to go", || (guarded_ports(&c, 0) == kept).then_some(())).unwrap();
    await_reachable(&[(&x, &z)]);
    let before = dropped(&c.agents[0], "spoofed_ip");
    assert_eq!(spoofed(), 0, "after the restart");
    assert!(dropped(&c.agents[0], "spoofed_ip") > before, "not counted after the restart");

    // Stopped: both tables are gone.
    c.agents[0].terminate().unwrap();
    let tables = c.hosts[0].exec("nft", ["list", "tables"]).unwrap();
    assert!(!tables.contains("overlayd"), "tables left after SIGTERM: {tables}");
}
