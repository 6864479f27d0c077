//! Egress end to end (issue 13, item 4): a cluster network's containers leave the overlay
//! through their own host, masqueraded to its underlay address, and nothing more:
//! - a container reaches "the outside" (a namespace on the underlay that runs no overlayd and
//!   has no route into the overlay), which sees the container's own host as the source;
//! - on an `--internal` network the same attempt fails and is counted;
//! - egress opens neither the host's own services to its containers nor the containers to the
//!   outside, and two networks do not reach each other by routing through a gateway;
//! - what overlayd adds to a host's nftables ruleset goes with the network and the daemon,
//!   and a table of someone else's is never touched;
//! - egress outlives a crash of the daemon (a network removed meanwhile loses its rules when
//!   it is back), and the gateway keeps its MAC while the bridge's ports come and go.
//!
//! Each refusal comes with a control that must succeed (the same connection from where it is
//! allowed), so that "it failed" means it was refused and not that the test was broken.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
#![allow(clippy::print_stderr)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Host, Node, Options, Testbed};

const T: Duration = Duration::from_secs(20);
const GOSSIP_PORT: u16 = 7946;
const CONTROL_PORT: u16 = 7947;
/// Where the test's TCP listeners (the outside's, a host's, a container's) listen.
const SERVICE_PORT: u16 = 8080;

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("the overlay is IPv4"),
    }
}

/// A cluster of `hosts` hosts (the first a manager, the others workers), every one ready.
fn cluster(bed: &Testbed, hosts: usize) -> Cluster {
    let c = Cluster::form(bed, 1, hosts - 1).expect("cannot form the cluster");
    c.await_nodes(hosts, &[], T).unwrap();
    c
}

/// `network create name <args>` on the first host; the network as printed.
fn create(c: &Cluster, name: &str, args: &[&str]) -> Value {
    let mut all = vec!["network", "create", name];
    all.extend(args);
    c.agents[0].json(&all).unwrap_or_else(|e| panic!("cannot create the network {name}: {e:#}"))
}

struct Ct {
    node: Node,
    ip: Ipv4Addr,
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str) -> Ct {
    let (node, ip) = c.attach(i, network, name).unwrap_or_else(|e| panic!("cannot attach {name}: {e:#}"));
    Ct { node, ip: v4(ip) }
}

fn dropped(agent: &Agent, reason: &str) -> u64 {
    agent.counters().unwrap().dropped(reason)
}

fn host_ip(h: &Host) -> Ipv4Addr {
    v4(h.addr())
}

/// The address `ns` would leave from towards `dst`'s listener: what a [`Listener`] at `dst`
/// saw as the peer of a TCP connection from namespace `ns`, or None when no connection came
/// about within two seconds. The listener writes the peer back, so Some means packets went
/// both ways.
fn seen_by(ns: &str, dst: SocketAddr) -> Option<SocketAddr> {
    testbed::netns::within(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else { return Ok(None) };
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        Ok(text.trim().parse().ok())
    })
    .unwrap()
}

/// Pings from a node; true if any of `count` came back.
fn pings(node: &Node, dst: Ipv4Addr, count: u32) -> bool {
    node.ping(dst.into(), count).unwrap().received > 0
}

/// A TCP listener on [`SERVICE_PORT`] (every address) inside a namespace: it writes each
/// peer's address to it and records it.
struct Listener {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start(node: &Node) -> Listener {
        let (stop, peers) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (ns, s, p) = (node.ns().to_owned(), Arc::clone(&stop), Arc::clone(&peers));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            testbed::netns::within(&ns, move || {
                let l = TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), SERVICE_PORT))?;
                l.set_nonblocking(true)?;
                ready_tx.send(()).ok();
                while !s.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut conn, peer)) => {
                            p.lock().unwrap().push(peer);
                            conn.set_nonblocking(false)?;
                            let _ = writeln!(conn, "{peer}");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                Ok(())
            })
            .expect("cannot listen inside the namespace")
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("the listener did not start");
        Listener { stop, peers, thread: Some(thread) }
    }

    /// The peers it accepted so far.
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The addresses a listener's peers came from.
fn ips(l: &Listener) -> Vec<IpAddr> {
    l.peers().iter().map(SocketAddr::ip).collect()
}

fn at(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(ip.into(), SERVICE_PORT)
}

/// The container's default gateway.
fn gateway_of(ct: &Ct) -> Ipv4Addr {
    let route = ct.node.exec("ip", ["route", "show", "default"]).unwrap();
    route.split_whitespace().nth(2).and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("no default route: {route}"))
}

// ---------------------------------------------------------------------------------------------

/// A container on host 1 reaches the outside (ping, TCP), and the outside sees host 1's
/// underlay address; a container on host 2 leaves through host 2. The outside has no route
/// into the overlay, so the replies' coming back proves the masquerade.
#[test]
fn a_container_reaches_the_outside_through_its_own_host_masqueraded() {
    let bed = bed();
    let c = cluster(&bed, 2);
    let outside = bed.add_outside().unwrap();
    create(&c, "web", &[]);
    let a = attach(&c, 0, "web", "a");
    let b = attach(&c, 1, "web", "b");
    let out = host_ip(&outside);
    let listener = Listener::start(&outside);

    a.node.ping_ok(out.into(), 3).expect("a container pings the outside");
    b.node.ping_ok(out.into(), 3).expect("a container on the other host pings the outside");
    let from_a = seen_by(a.node.ns(), at(out));
    let from_b = seen_by(b.node.ns(), at(out));
    eprintln!("the outside saw {from_a:?} for {} on h1, {from_b:?} for {} on h2", a.ip, b.ip);
    assert_eq!(from_a.map(|p| p.ip()), Some(c.hosts[0].addr()), "a container on h1 leaves as h1");
    assert_eq!(from_b.map(|p| p.ip()), Some(c.hosts[1].addr()), "a container on h2 leaves as h2");
    assert_eq!(listener.peers().len(), 2, "{:?}", listener.peers());
    // Forwarding is on where egress needs it.
    for h in &c.hosts {
        assert_eq!(h.exec("sysctl", ["-n", "net.ipv4.ip_forward"]).unwrap().trim(), "1", "on {}", h.name());
    }
    // And the overlay itself is not masqueraded: containers see each other's own addresses.
    let _l = Listener::start(&b.node);
    let seen = wait_for(T, "a to reach b", || seen_by(a.node.ns(), at(b.ip))).unwrap();
    assert_eq!(v4(seen.ip()), a.ip, "a container on another host sees the sender's own address");
}

/// On an `--internal` network a container reaches nothing outside the overlay, and the host
/// counts what it dropped; on an egress network of the same host the same attempt works.
#[test]
fn an_internal_network_has_no_way_out() {
    let bed = bed();
    let c = cluster(&bed, 2);
    let outside = bed.add_outside().unwrap();
    let closed = create(&c, "closed", &["--internal"]);
    create(&c, "open", &[]);
    let x = attach(&c, 0, "closed", "x");
    let y = attach(&c, 1, "closed", "y");
    let z = attach(&c, 0, "open", "z");
    let out = host_ip(&outside);
    let listener = Listener::start(&outside);
    let list = c.agents[0].cli(&["network", "ls"]).unwrap();
    assert!(list.contains("off (internal)"), "network ls shows the internal network: {list}");
    assert_eq!(closed["internal"], true, "{closed}");

    // Controls: the open network leaves; the internal one still works inside the overlay.
    assert_eq!(seen_by(z.node.ns(), at(out)).map(|p| p.ip()), Some(c.hosts[0].addr()));
    wait_for(T, "x to reach y", || pings(&x.node, y.ip, 1).then_some(())).unwrap();
    x.node.ping_ok(gateway_of(&x).into(), 1).expect("the gateway of an internal network answers ping");

    let before = dropped(&c.agents[0], "egress_internal");
    let tcp = seen_by(x.node.ns(), at(out));
    let ping = pings(&x.node, out, 3);
    let counted = dropped(&c.agents[0], "egress_internal") - before;
    eprintln!("from the internal network: TCP {tcp:?}, ping {ping}; egress_internal counted {counted}");
    assert_eq!(tcp, None, "a container of an internal network connected to the outside");
    assert!(!ping, "a container of an internal network pinged the outside");
    assert_eq!(listener.peers().len(), 1, "the outside saw only the open network's container: {:?}", listener.peers());
    assert!(counted >= 4, "egress from an internal network not counted: {counted}");
    // Its subnet is masqueraded nowhere.
    let table = c.hosts[0].exec("nft", ["list", "chain", "inet", "overlayd", "egress_nat"]).unwrap();
    let subnet = closed["subnet"].as_str().unwrap();
    assert!(!table.contains(subnet), "the internal network's subnet is masqueraded:\n{table}");
}

/// With egress on, a container still cannot reach its host's own services (a service on the
/// underlay address, the control port, gossip) nor, through its host, another host's control
/// port; and the outside cannot open a connection into a container, even with a route to it.
#[test]
fn egress_opens_neither_the_host_to_its_containers_nor_the_containers_to_the_outside() {
    let bed = bed();
    let c = cluster(&bed, 2);
    let outside = bed.add_outside().unwrap();
    let web = create(&c, "web", &[]);
    let a = attach(&c, 0, "web", "a");
    let peer = attach(&c, 0, "web", "peer");
    let (h1, h2, out) = (host_ip(&c.hosts[0]), host_ip(&c.hosts[1]), host_ip(&outside));
    let gateway = gateway_of(&a);

    // The control: the outside's service is reached.
    let outside_service = Listener::start(&outside);
    assert_eq!(seen_by(a.node.ns(), at(out)).map(|p| p.ip()), Some(h1.into()), "egress works");

    // The host's own: a service on every address of host 1, its control port, its gossip.
    let host_service = Listener::start(&c.hosts[0]);
    assert!(seen_by(c.hosts[1].ns(), at(h1)).is_some(), "the host's service answers the underlay");
    let before = |what: &str| dropped(&c.agents[0], what);
    let (host0, control0, gossip0) =
        (before("host_from_overlay"), before("control_from_overlay"), before("gossip_from_overlay"));
    let attempts = [
        ("a service of its host", at(h1)),
        ("a service of its host on its gateway", at(gateway)),
        ("the control port of its host", SocketAddr::new(h1.into(), CONTROL_PORT)),
        ("the control port on its gateway", SocketAddr::new(gateway.into(), CONTROL_PORT)),
        ("the control port of another host", SocketAddr::new(h2.into(), CONTROL_PORT)),
    ];
    let reached: Vec<(&str, bool)> = attempts
        .iter()
        .map(|(what, dst)| {
            let ok = testbed::netns::within(a.node.ns(), {
                let dst = *dst;
                move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok())
            })
            .unwrap();
            (*what, ok)
        })
        .collect();
    let own = SocketAddr::new(a.ip.into(), 0);
    for h in [h1, h2] {
        a.node.send_udp(own, SocketAddr::new(h.into(), GOSSIP_PORT), vec![vec![0; 64]; 3]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (host, control, gossip) = (
        before("host_from_overlay") - host0,
        before("control_from_overlay") - control0,
        before("gossip_from_overlay") - gossip0,
    );
    eprintln!("connected: {reached:?}; dropped: {host} host, {control} control, {gossip} gossip");
    for (what, ok) in &reached {
        assert!(!ok, "with egress on, a container connected to {what}");
    }
    assert_eq!(ips(&host_service), [IpAddr::from(h2)], "the host's service saw others than host 2");
    assert!(host >= 2, "connections to the host's service not counted: {host}");
    assert!(control >= 3, "connections to control ports not counted: {control}");
    assert!(gossip >= 6, "gossip datagrams not counted: {gossip}");

    // Into the container: the outside, with a route to the network through host 1, neither
    // connects nor pings; another container of the network does.
    let subnet = web["subnet"].as_str().unwrap();
    outside.exec("ip", ["route", "add", subnet, "via", &h1.to_string()]).unwrap();
    let inside = Listener::start(&a.node);
    assert_eq!(seen_by(peer.node.ns(), at(a.ip)).map(|p| v4(p.ip())), Some(peer.ip), "the container's service");
    let into0 = dropped(&c.agents[0], "into_network");
    let tcp = seen_by(outside.ns(), at(a.ip));
    let ping = pings(&outside, a.ip, 3);
    let into = dropped(&c.agents[0], "into_network") - into0;
    eprintln!("from the outside into the container: TCP {tcp:?}, ping {ping}; into_network counted {into}");
    assert_eq!(tcp, None, "the outside connected to a container");
    assert!(!ping, "the outside pinged a container");
    assert_eq!(ips(&inside), [IpAddr::from(peer.ip)], "the container's service saw others than its peer");
    assert!(into >= 4, "connections into the network not counted: {into}");
    drop(outside_service);
}

/// Two networks on a host do not reach each other through their gateways, on one host
/// (counted as between_networks) nor across hosts when a host routes the other network's
/// subnet to the host that has it (refused there as into_network); each still reaches the
/// outside and its own members.
#[test]
fn networks_do_not_reach_each_other_through_the_gateways() {
    let bed = bed();
    let c = cluster(&bed, 2);
    let outside = bed.add_outside().unwrap();
    create(&c, "red", &[]);
    let blue = create(&c, "blue", &[]);
    let x = attach(&c, 0, "red", "x");
    let y = attach(&c, 0, "blue", "y");
    let z = attach(&c, 1, "blue", "z");
    let out = host_ip(&outside);
    let _outside_service = Listener::start(&outside);
    let (ly, lz) = (Listener::start(&y.node), Listener::start(&z.node));

    // Controls: both networks leave; blue's members reach each other.
    assert!(seen_by(x.node.ns(), at(out)).is_some(), "red leaves");
    assert!(seen_by(y.node.ns(), at(out)).is_some(), "blue leaves");
    wait_for(T, "y to reach z", || seen_by(y.node.ns(), at(z.ip))).unwrap();

    let between0 = dropped(&c.agents[0], "between_networks");
    let (tcp, ping) = (seen_by(x.node.ns(), at(y.ip)), pings(&x.node, y.ip, 3));
    let back = pings(&y.node, x.ip, 3);
    let between = dropped(&c.agents[0], "between_networks") - between0;
    eprintln!("red -> blue on one host: TCP {tcp:?}, ping {ping}, back {back}; between_networks counted {between}");
    assert_eq!(tcp, None, "red connected to blue through the gateway");
    assert!(!ping && !back, "red and blue pinged each other through the gateway");
    assert!(between >= 7, "traffic between networks not counted: {between}");

    // Across hosts: host 1 routes blue's subnet to host 2, so red's packets for z leave host
    // 1 (masqueraded, as any egress) and reach host 2, which does not let them into blue.
    let subnet = blue["subnet"].as_str().unwrap();
    c.hosts[0].exec("ip", ["route", "add", subnet, "via", &c.hosts[1].addr().to_string()]).unwrap();
    let into0 = dropped(&c.agents[1], "into_network");
    let (tcp, ping) = (seen_by(x.node.ns(), at(z.ip)), pings(&x.node, z.ip, 3));
    let into = dropped(&c.agents[1], "into_network") - into0;
    eprintln!("red on h1 -> blue on h2: TCP {tcp:?}, ping {ping}; into_network counted on h2 {into}");
    assert_eq!(tcp, None, "red connected to blue on another host");
    assert!(!ping, "red pinged blue on another host");
    assert!(into >= 4, "traffic into blue on h2 not counted: {into}");
    let peers: Vec<Ipv4Addr> = ly.peers().iter().chain(&lz.peers()).map(|p| v4(p.ip())).collect();
    assert!(peers.iter().all(|p| *p == y.ip), "blue's services saw others than blue: {peers:?}");
}

/// What a host's ruleset holds before overlayd starts there (a table of the test's own among
/// it) is exactly what it holds after the networks are removed and the daemon stopped; a
/// removed network's chain and masquerade go with it while the daemon runs; and the foreign
/// table is the same throughout.
#[test]
fn the_hosts_ruleset_is_what_it_was_once_the_networks_and_the_daemon_are_gone() {
    let bed = bed();
    let host = bed.add_host().unwrap();
    let outside = bed.add_outside().unwrap();
    // Someone else's rules, in the hooks overlayd uses too. They match only TEST-NET-1, which
    // nothing here sends from or to, so their counters stay as they are.
    host.nft(
        "table inet testfw {
            counter seen { }
            set blocked { type ipv4_addr; elements = { 192.0.2.7 }; }
            chain forward {
                type filter hook forward priority 10; policy accept;
                ip saddr 192.0.2.0/24 counter name seen drop
                ip daddr @blocked counter drop
            }
            chain input {
                type filter hook input priority 0; policy accept;
                ip saddr 192.0.2.0/24 counter drop
            }
            chain postrouting {
                type nat hook postrouting priority srcnat; policy accept;
                ip saddr 192.0.2.0/24 masquerade
            }
        }",
    )
    .unwrap();
    let ruleset = || host.exec("nft", ["list", "ruleset"]).unwrap();
    let foreign = || host.exec("nft", ["list", "table", "inet", "testfw"]).unwrap();
    let (before, foreign_before) = (ruleset(), foreign());
    assert!(before.contains("table inet testfw"), "{before}");

    let c = Cluster::form_on(vec![host.clone()], 1).expect("cannot form the cluster");
    c.await_nodes(1, &[], T).unwrap();
    let web = create(&c, "web", &[]);
    let db = create(&c, "db", &["--internal"]);
    let a = attach(&c, 0, "web", "a");
    let d = attach(&c, 0, "db", "d");
    let _service = Listener::start(&outside);
    let out = host_ip(&outside);
    assert_eq!(seen_by(a.node.ns(), at(out)).map(|p| p.ip()), Some(host.addr()), "egress works");
    assert_eq!(seen_by(d.node.ns(), at(out)), None, "an internal network leaves");
    let running = ruleset();
    assert_eq!(foreign(), foreign_before, "overlayd changed someone else's table");
    let (web_subnet, db_subnet) = (web["subnet"].as_str().unwrap(), db["subnet"].as_str().unwrap());
    for want in ["chain net-ovbr-web", "chain net-ovbr-db", &format!("ip saddr {web_subnet}")] {
        assert!(running.contains(want), "{want:?} not in the running ruleset:\n{running}");
    }
    assert!(!running.contains(&format!("ip saddr {db_subnet}")), "the internal network is masqueraded:\n{running}");

    // network rm alone: the network's chain, its element of the networks map and its
    // masquerade go; the other network's stay.
    c.agents[0].json(&["detach", "--name", "a"]).unwrap();
    c.agents[0].json(&["network", "rm", "web", "--force"]).unwrap();
    let overlayd = || c.hosts[0].exec("nft", ["list", "table", "inet", "overlayd"]).unwrap();
    wait_for(T, "web's rules to go", || (!overlayd().contains("net-ovbr-web")).then_some(())).unwrap();
    let table = overlayd();
    assert!(!table.contains(web_subnet), "web's masquerade is left:\n{table}");
    assert!(!table.contains("\"ovbr-web\""), "web's bridge is left in a set or map:\n{table}");
    assert!(table.contains("chain net-ovbr-db"), "db's chain went with web's:\n{table}");
    // Made again, web leaves again, with one masquerade rule.
    create(&c, "web", &[]);
    let a = attach(&c, 0, "web", "a2");
    assert_eq!(seen_by(a.node.ns(), at(out)).map(|p| p.ip()), Some(host.addr()), "egress of web made again");
    assert_eq!(overlayd().matches("masquerade").count(), 1, "{}", overlayd());
    c.agents[0].json(&["detach", "--name", "a2"]).unwrap();
    c.agents[0].json(&["network", "rm", "web", "--force"]).unwrap();
    wait_for(T, "web's rules to go again", || (!overlayd().contains("net-ovbr-web")).then_some(())).unwrap();
    c.agents[0].json(&["detach", "--name", "d"]).unwrap();
    c.agents[0].json(&["network", "rm", "db", "--force"]).unwrap();
    wait_for(T, "db's rules to go", || (!overlayd().contains("net-ovbr-db")).then_some(())).unwrap();
    let table = overlayd();
    assert!(!table.contains("net-ovbr") && !table.contains("masquerade"), "rules of networks left:\n{table}");

    // The daemon stops: the ruleset is what it was.
    c.agents[0].terminate().unwrap();
    let after = ruleset();
    assert_eq!(foreign(), foreign_before, "overlayd changed someone else's table");
    assert_eq!(after, before, "the ruleset differs from before overlayd started");
}

/// A daemon killed with SIGKILL leaves egress in force (its containers keep their way out,
/// an internal network's stay in); back, it has one masquerade rule per network, the chain
/// and masquerade of a network removed while it was down are gone, and an internal network
/// is still internal. A manager restarted from its own store keeps it internal too.
#[test]
fn egress_outlives_a_crash_and_a_network_removed_meanwhile_is_pruned() {
    let bed = bed();
    let mut c = cluster(&bed, 2);
    let outside = bed.add_outside().unwrap();
    let web = create(&c, "web", &[]);
    let tmp = create(&c, "tmp", &[]);
    create(&c, "closed", &["--internal"]);
    let a = attach(&c, 1, "web", "a");
    let t = attach(&c, 1, "tmp", "t");
    let k = attach(&c, 1, "closed", "k");
    let k1 = attach(&c, 0, "closed", "k1");
    let a1 = attach(&c, 0, "web", "a1");
    let _service = Listener::start(&outside);
    let (h1, h2, out) = (c.hosts[0].addr(), c.hosts[1].addr(), host_ip(&outside));
    let leaves_as = |ct: &Ct| seen_by(ct.node.ns(), at(out)).map(|p| p.ip());
    assert_eq!(leaves_as(&a), Some(h2));
    assert_eq!(leaves_as(&t), Some(h2));
    assert_eq!(leaves_as(&k), None);
    let table = |c: &Cluster, i: usize| c.hosts[i].exec("nft", ["list", "table", "inet", "overlayd"]).unwrap();
    let (web_subnet, tmp_subnet) = (web["subnet"].as_str().unwrap(), tmp["subnet"].as_str().unwrap());

    c.agents[1].kill().unwrap();
    assert_eq!(leaves_as(&a), Some(h2), "egress while the daemon is down");
    assert_eq!(leaves_as(&k), None, "an internal network leaves while the daemon is down");
    c.agents[0].json(&["network", "rm", "tmp", "--force"]).unwrap();
    c.agents[1] = c.hosts[1].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "tmp's chain to go", || (!table(&c, 1).contains("net-ovbr-tmp")).then_some(())).unwrap();
    let nat = c.hosts[1].exec("nft", ["list", "chain", "inet", "overlayd", "egress_nat"]).unwrap();
    eprintln!("egress_nat after the restart:\n{nat}");
    assert_eq!(nat.matches("masquerade").count(), 1, "one masquerade rule, web's:\n{nat}");
    assert!(nat.contains(web_subnet) && !nat.contains(tmp_subnet), "{nat}");
    assert_eq!(leaves_as(&a), Some(h2), "egress after the restart");
    let before = dropped(&c.agents[1], "egress_internal");
    assert_eq!(leaves_as(&k), None, "an internal network leaves after the restart");
    assert!(dropped(&c.agents[1], "egress_internal") > before, "not counted after the restart");

    // The manager stops (its tables go) and comes back from its own store.
    c.agents[0].terminate().unwrap();
    c.agents[0] = c.hosts[0].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "h1's networks to be back", || {
        let t = table(&c, 0);
        (t.contains("net-ovbr-web") && t.contains("net-ovbr-closed")).then_some(())
    })
    .unwrap();
    let a1_leaves = wait_for(T, "a1 to leave again", || leaves_as(&a1)).unwrap();
    assert_eq!(a1_leaves, h1, "egress after the manager's restart");
    assert_eq!(leaves_as(&k1), None, "an internal network leaves after the manager's restart");
}

/// The gateway keeps its MAC while ports come and go (a port with a lower MAC than any joins,
/// the daemon is killed and its TAP goes, it comes back with a new TAP): containers keep the
/// gateway they resolved, and with it their way out, without a new ARP. (A Linux bridge whose
/// address was never set takes its lowest port's, so each of these could move it.)
#[test]
fn the_gateway_keeps_its_mac_while_ports_come_and_go() {
    let bed = bed();
    let mut c = cluster(&bed, 1);
    let outside = bed.add_outside().unwrap();
    create(&c, "web", &[]);
    let a = attach(&c, 0, "web", "a");
    let _service = Listener::start(&outside);
    let (h1, out) = (c.hosts[0].addr(), host_ip(&outside));
    let host = c.hosts[0].clone();
    let bridge_mac = || host.exec("cat", ["/sys/class/net/ovbr-web/address"]).unwrap().trim().to_owned();
    assert_eq!(seen_by(a.node.ns(), at(out)).map(|p| p.ip()), Some(h1));
    let mac = bridge_mac();
    let gateway = gateway_of(&a).to_string();
    let resolved = a.node.exec("ip", ["neigh", "show", &gateway]).unwrap();
    assert!(resolved.contains(&mac), "the container resolved the gateway to the bridge's MAC {mac}: {resolved}");

    let mut steps: Vec<(&str, Option<IpAddr>, String)> = Vec::new();
    // A port of the test's own, with about the lowest MAC a port can have, joins and leaves.
    host.exec("ip", ["link", "add", "lowmac0", "address", "02:00:00:00:00:01", "type", "veth", "peer", "lowmac1"])
        .unwrap();
    host.exec("ip", ["link", "set", "lowmac0", "master", "ovbr-web", "up"]).unwrap();
    steps.push(("a low MAC joined", seen_by(a.node.ns(), at(out)).map(|p| p.ip()), bridge_mac()));
    host.exec("ip", ["link", "del", "lowmac0"]).unwrap();
    c.agents[0].kill().unwrap();
    steps.push(("the daemon was killed", seen_by(a.node.ns(), at(out)).map(|p| p.ip()), bridge_mac()));
    c.agents[0] = c.hosts[0].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "the TAP to be back", || host.exec("ip", ["link", "show", "ovt-web"]).ok()).unwrap();
    steps.push(("the daemon came back", seen_by(a.node.ns(), at(out)).map(|p| p.ip()), bridge_mac()));
    eprintln!("the bridge's MAC was {mac}; then {steps:?}");
    for (when, left_as, now) in &steps {
        assert_eq!(now, &mac, "the gateway's MAC changed when {when}");
        assert_eq!(*left_as, Some(h1), "no way out when {when}");
    }
}
