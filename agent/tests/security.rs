//! The control port under a handshake flood (issue 12, item 4): a host on the underlay keeps
//! 400 connections to a manager's port 7947 that never finish a TLS handshake, and the cluster
//! goes on answering — a worker's `node ls`, `network create` on the manager, a new host's
//! `join` — within a few seconds; from many addresses, it still answers its members.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
#![allow(clippy::print_stderr)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Host, Options, Testbed};

/// How many connections the attacker keeps open.
const FLOOD: usize = 400;
/// How many addresses the attacker has in the many-source flood: 10 connections each, more
/// than the control port lets one source handshake at once, and in all more than it lets
/// non-members have.
const SOURCES: u8 = 40;
/// How long an operation may take during the flood.
const QUICK: Duration = Duration::from_secs(5);
/// The control port.
const CONTROL_PORT: u16 = 7947;

/// Connections from a namespace that never complete a TLS handshake, topped up to `FLOOD`
/// every 50 ms as the server closes them, spread over `sources`: every other one sends
/// nothing, the rest the first bytes of a ClientHello and then stall. Stops when dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(from: &Host, sources: Vec<IpAddr>, target: SocketAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (ns, s, o) = (from.ns().to_owned(), Arc::clone(&stop), Arc::clone(&opened));
        let thread = std::thread::spawn(move || {
            testbed::netns::within(&ns, move || {
                flood(&sources, target, &s, &o);
                Ok(())
            })
            .expect("the flood could not run in its namespace");
        });
        Flood { stop, opened, thread: Some(thread) }
    }

    /// Connections opened so far (not counting those still open).
    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One of the flood's connections: non-blocking, so that opening 400 never waits on a
/// server whose accept queue is full.
struct HalfOpen {
    tcp: TcpStream,
    /// Whether its partial ClientHello is still to be sent.
    hello_due: bool,
}

fn flood(sources: &[IpAddr], target: SocketAddr, stop: &AtomicBool, opened: &AtomicUsize) {
    // A handshake record announcing 512 bytes, of which the ClientHello's first 6 come.
    const PARTIAL_CLIENT_HELLO: [u8; 11] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    let mut conns: Vec<Option<HalfOpen>> = (0..FLOOD).map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        for (i, slot) in conns.iter_mut().enumerate() {
            if let Some(c) = slot {
                if c.hello_due {
                    // Fails (would block) until the connection is up; then it goes once.
                    c.hello_due = c.tcp.write_all(&PARTIAL_CLIENT_HELLO).is_err();
                }
                let mut byte = [0u8; 1];
                let alive = match c.tcp.read(&mut byte) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                };
                if !alive {
                    *slot = None;
                }
            }
            if slot.is_none() {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                socket.set_nonblocking(true).unwrap();
                socket.bind(&SocketAddr::new(sources[i % sources.len()], 0).into()).unwrap();
                match socket.connect(&target.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => panic!("the flood cannot connect to {target}: {e}"),
                }
                opened.fetch_add(1, Ordering::Relaxed);
                *slot = Some(HalfOpen { tcp: socket.into(), hello_due: i % 2 == 1 });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f`, which must succeed within [`QUICK`]; returns what it gave and how long it took.
fn quickly<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> (T, Duration) {
    let start = Instant::now();
    let r = f().unwrap_or_else(|e| panic!("{what} failed during the flood after {:?}: {e:#}", start.elapsed()));
    let took = start.elapsed();
    eprintln!("{what}: {took:?}");
    assert!(took < QUICK, "{what} took {took:?} during the flood");
    (r, took)
}

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// A manager and a worker, and a host on the underlay (no daemon) flooding the manager's
/// control port from `sources` addresses (its own, then more on its underlay link).
fn flooded(bed: &Testbed, sources: u8) -> (Cluster, Flood) {
    let c = Cluster::form(bed, 1, 1).expect("cannot form the cluster");
    c.await_nodes(2, &[], Duration::from_secs(20)).unwrap();
    let manager = SocketAddr::new(c.hosts[0].addr(), CONTROL_PORT);
    let attacker = bed.add_host().unwrap();
    let mut addrs = vec![attacker.addr()];
    for k in 1..sources {
        // The testbed's underlay is 198.18.0.0/15 and its hosts are numbered from 198.18.0.1.
        let extra = Ipv4Addr::new(198, 19, 255, k);
        let cidr = format!("{extra}/{}", testbed::UNDERLAY_PREFIX_LEN);
        testbed::netns::ip(["-n", attacker.ns(), "addr", "add", &cidr, "dev", "ul0"]).unwrap();
        addrs.push(extra.into());
    }
    let flood = Flood::start(&attacker, addrs, manager);
    wait_for(Duration::from_secs(5), "the flood's connections", || (flood.opened() >= FLOOD).then_some(())).unwrap();
    // Long enough for every handshake slot of an unprotected server to be taken.
    std::thread::sleep(Duration::from_secs(1));
    (c, flood)
}

/// A worker's `node ls` asks a manager for the leader over a new connection, and `network
/// create` on the manager goes through its own control port (the follower's client): both
/// answer quickly.
fn members_are_served(c: &Cluster, network: &str) {
    let (ls, _) = quickly("node ls on the worker", || c.agents[1].json(&["node", "ls"]));
    assert_ne!(ls["leader_id"], 0, "the worker reached no manager: {ls}");
    let (net, _) = quickly("network create on the manager", || c.agents[0].json(&["network", "create", network]));
    assert_eq!(net["name"], network);
}

#[test]
fn the_control_port_survives_a_handshake_flood() {
    let bed = bed();
    let (mut c, flood) = flooded(&bed, 1);
    members_are_served(&c, "blue");
    // A new host joins through the flooded manager.
    let joiner = c.add_host(&bed).unwrap();
    let token = c.worker_token.clone();
    quickly("join of a new host", || c.join(joiner, 0, &token));
    c.await_nodes(3, &[], QUICK).unwrap();

    let opened = flood.opened();
    drop(flood);
    eprintln!("the flood opened {opened} connections");
    assert!(opened > FLOOD, "the server closed none of the flood's connections");
    // The manager says what it refused (and the metrics carry the same counters).
    let status = c.agents[0].json(&["status"]).unwrap();
    let h = &status["cluster"]["handshakes"];
    assert!(h["refused_source_busy"].as_u64().unwrap_or(0) > 0, "no refusal counted: {h}");
    assert!(h["completed"].as_u64().unwrap_or(0) > 0, "no handshake counted: {h}");
}

/// Enough sources take every handshake slot a non-member may have; the members' own stay
/// free. (A joiner is not a member yet: it may have to wait out such a flood.)
#[test]
fn members_get_through_a_handshake_flood_from_many_sources() {
    let bed = bed();
    let (c, flood) = flooded(&bed, SOURCES);
    members_are_served(&c, "blue");
    let opened = flood.opened();
    drop(flood);
    eprintln!("the flood opened {opened} connections from {SOURCES} addresses");
}
