//! The embedded DNS resolver end to end (issue 14, tests 1–6), with real daemons and real
//! clients: glibc's `getent hosts` through the resolv.conf overlayd writes for each container
//! namespace (`ip netns exec NAME` mounts /etc/netns/NAME/resolv.conf), `dig`, busybox
//! `nslookup` and `ping` in podman and Docker containers, and raw datagrams from a socket inside
//! a container.
//! - every container resolves every other, on every host, by name, alias and NAME.NETWORK,
//!   and each address back (PTR); over TCP too;
//! - a container that goes (its namespace deleted, or the process of an `attach --pid` killed)
//!   and the containers of a host whose agent is SIGKILLed leave every host's answers within
//!   5 s; the agent restarted, they are back;
//! - a container on one network does not resolve names that exist only on another, nor reach
//!   another network's resolver or the host's port 53;
//! - names outside the overlay go to the host's upstream (dnsmasq in a namespace that plays
//!   the outside); with it dead, overlay names still answer at once; an `--internal` network
//!   answers NXDOMAIN for them;
//! - a podman container and a Docker container on two hosts find each other by name (Docker's
//!   embedded resolver forwards to the host's resolvers; overlayd answers those queries);
//! - malformed, truncated, oversized queries, other classes and types, a flood of 20,000
//!   datagrams and too many TCP connections: no crash, all counted, good queries answered.
//!
//! The daemons forward only to the testbed's upstreams file (empty unless a test writes it):
//! no query leaves the testbed. These tests need root (they create namespaces) and dig and
//! dnsmasq (scripts/install-deps), and podman and docker.io for test 5. They fail, never skip,
//! when they cannot run.
#![allow(clippy::print_stderr)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::dockerd::Dockerd;
use testbed::measure::wait_for;
use testbed::runtimes::Podman;
use testbed::{Agent, Node, Options, Testbed};

const T: Duration = Duration::from_secs(20);
/// How soon a name that went must be gone from every host's answers.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// Held by the tests that time how soon names go (test 2) and by the one that starts dockerd
/// and podman (test 5), so that they never run side by side on this 2-core machine: the
/// runtimes' start makes the kernel's namespace teardown, by which a dead container's veth
/// goes, queue for seconds.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("the overlay is IPv4"),
    }
}

/// A cluster of `hosts` hosts (the first a manager), every one ready.
fn cluster(bed: &Testbed, hosts: usize) -> Cluster {
    let c = Cluster::form(bed, 1, hosts - 1).expect("cannot form the cluster");
    c.await_nodes(hosts, &[], T).unwrap();
    c
}

/// `network create name <args>` on the first host; its gateway.
fn create(c: &Cluster, name: &str, args: &[&str]) -> Ipv4Addr {
    let mut all = vec!["network", "create", name];
    all.extend(args);
    let net = c.agents[0].json(&all).unwrap_or_else(|e| panic!("cannot create the network {name}: {e:#}"));
    net["gateway"].as_str().and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("no gateway: {net}"))
}

/// A container attached with `overlayd attach --netns`.
struct Ct {
    node: Node,
    name: String,
    ip: Ipv4Addr,
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str, aliases: &[&str]) -> Ct {
    let node = c.hosts[i].add_netns(name).unwrap();
    let path = node.netns_path();
    let mut args = vec!["attach", "--network", network, "--netns", &path, "--name", name];
    for a in aliases {
        args.extend(["--alias", a]);
    }
    let ep = c.agents[i].json(&args).unwrap_or_else(|e| panic!("cannot attach {name}: {e:#}"));
    let ip = ep["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no address: {ep}"));
    Ct { node, name: name.to_owned(), ip }
}

/// Runs a program in a namespace through `ip netns exec` (which mounts its /etc/netns files):
/// (success, stdout).
fn run_in(ns: &str, program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/install-deps): {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `getent hosts NAME` in the container: the addresses glibc found, sorted (empty: not found).
fn getent(ct: &Ct, name: &str) -> Vec<Ipv4Addr> {
    let (ok, out) = run_in(ct.node.ns(), "getent", &["hosts", name]);
    let mut v: Vec<Ipv4Addr> =
        if ok { out.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect() } else { Vec::new() };
    v.sort();
    v
}

/// What `dig` printed: the status and the answer section's data.
#[derive(Debug, PartialEq)]
struct Dig {
    status: String,
    answers: Vec<String>,
    flags: String,
}

fn parse_dig(out: &str) -> Dig {
    let status = out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("NO REPLY").to_owned();
    let flags = out.split(";; flags: ").nth(1).and_then(|s| s.split(';').next()).unwrap_or_default().to_owned();
    let mut answers: Vec<String> = out
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|s| {
            s.lines()
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    answers.sort();
    Dig { status, answers, flags }
}

/// `dig ARGS` in namespace `ns` (through its resolv.conf unless ARGS name a server).
fn dig_in(ns: &str, args: &[&str]) -> Dig {
    let mut all = vec!["+tries=1", "+time=2"];
    all.extend(args);
    parse_dig(&run_in(ns, "dig", &all).1)
}

fn dig(ct: &Ct, args: &[&str]) -> Dig {
    dig_in(ct.node.ns(), args)
}

fn addrs(ips: &[Ipv4Addr]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// A DNS query in wire format (RD set).
fn query(id: u16, name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(qtype.to_be_bytes());
    q.extend(qclass.to_be_bytes());
    q
}

const A: u16 = 1;
const IN: u16 = 1;

fn rcode(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

fn ancount(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[6], reply[7]])
}

/// Sends each message from a socket inside `ns` to `server` and waits `wait` for each reply:
/// the replies (None: none came).
fn ask_raw(ns: &str, server: SocketAddr, messages: Vec<Vec<u8>>, wait: Duration) -> Vec<Option<Vec<u8>>> {
    testbed::netns::within(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(wait))?;
        let mut replies = Vec::new();
        for m in &messages {
            s.send_to(m, server)?;
            let mut buf = vec![0u8; 65535];
            let got = loop {
                match s.recv_from(&mut buf) {
                    // A late reply to an earlier message is not this one's.
                    Ok((n, _)) if n >= 2 && buf[..2] != m[..2.min(m.len())] && m.len() >= 2 => continue,
                    Ok((n, _)) => break Some(buf[..n].to_vec()),
                    Err(_) => break None,
                }
            };
            replies.push(got);
        }
        Ok(replies)
    })
    .unwrap()
}

/// One query from inside `ns`: the reply and how long it took.
fn timed(ns: &str, server: SocketAddr, name: &str) -> (Option<Vec<u8>>, Duration) {
    let t = Instant::now();
    let r = ask_raw(ns, server, vec![query(0x5151, name, A, IN)], Duration::from_secs(3)).pop().flatten();
    (r, t.elapsed())
}

fn dns53(gw: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(gw.into(), 53)
}

/// `overlayd dns --json` of a host: its network `name`.
fn dns_report(agent: &Agent, name: &str) -> Value {
    let r = agent.json(&["dns", name]).unwrap();
    r["networks"].as_array().and_then(|n| n.first().cloned()).unwrap_or_else(|| panic!("no network in {r}"))
}

fn counter(net: &Value, key: &str) -> u64 {
    net["counters"][key].as_u64().unwrap_or(0)
}

/// The sum of a report's counters whose key starts with `prefix`.
fn counted(net: &Value, prefix: &str) -> u64 {
    net["counters"]
        .as_object()
        .map_or(0, |m| m.iter().filter(|(k, _)| k.starts_with(prefix)).filter_map(|(_, v)| v.as_u64()).sum())
}

/// Test 1: three hosts, a container on each; every container resolves every other by name,
/// alias and NAME.NETWORK, with getent (glibc, through the resolv.conf overlayd wrote) and
/// dig; an alias of two containers answers both; PTR gives NAME.NETWORK back; names are
/// case-insensitive; AAAA gets NOERROR with no answer; TCP answers too; `overlayd dns` lists
/// the names; detach removes the resolv.conf.
#[test]
fn every_container_resolves_every_other_by_name_alias_and_network_name_on_every_host() {
    let bed = bed();
    let c = cluster(&bed, 3);
    create(&c, "web", &[]);
    let cts = [
        attach(&c, 0, "web", "web1", &["www", "front"]),
        attach(&c, 1, "web", "web2", &["www"]),
        attach(&c, 2, "web", "web3", &["db"]),
    ];
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", cts[0].node.ns())).unwrap();
    eprintln!("web1's resolv.conf:\n{resolv}");
    assert!(resolv.starts_with("# Written by overlayd"), "{resolv}");
    let www = addrs(&[cts[0].ip, cts[1].ip]);
    // Gossip brings every host's names within a moment.
    for from in &cts {
        for to in &cts {
            wait_for(T, &format!("{} to resolve {}", from.name, to.name), || {
                (getent(from, &to.name) == [to.ip]).then_some(())
            })
            .unwrap();
        }
    }
    for from in &cts {
        for to in &cts {
            let qualified = format!("{}.web", to.name);
            assert_eq!(getent(from, &qualified), [to.ip], "{} → {qualified}", from.name);
            let d = dig(from, &[&to.name]);
            assert_eq!((d.status.as_str(), d.answers.clone()), ("NOERROR", vec![to.ip.to_string()]), "{d:?}");
            assert!(d.flags.contains("aa"), "authoritative: {d:?}");
            let d = dig(from, &[&qualified.to_uppercase()]);
            assert_eq!(d.answers, [to.ip.to_string()], "case-insensitive: {d:?}");
            let d = dig(from, &["-x", &to.ip.to_string()]);
            assert_eq!(d.answers, [format!("{qualified}.")], "PTR: {d:?}");
            let d = dig(from, &["+tcp", &qualified]);
            assert_eq!(d.answers, [to.ip.to_string()], "over TCP: {d:?}");
        }
        let mut got: Vec<String> = getent(from, "www").iter().map(ToString::to_string).collect();
        got.sort();
        assert_eq!(got, www, "{}: www is an alias of web1 and web2", from.name);
        assert_eq!(dig(from, &["www.web"]).answers, www);
        assert_eq!(getent(from, "front"), [cts[0].ip]);
        assert_eq!(getent(from, "db"), [cts[2].ip]);
        let aaaa = dig(from, &["AAAA", "web2"]);
        assert_eq!((aaaa.status.as_str(), aaaa.answers.len()), ("NOERROR", 0), "a name without AAAA: {aaaa:?}");
    }
    // As the README's walkthrough does: ping by name, across hosts.
    for (from, to) in [(&cts[0], "web2"), (&cts[1], "web3.web"), (&cts[2], "front")] {
        let (ok, out) = run_in(from.node.ns(), "ping", &["-n", "-c", "1", "-W", "2", to]);
        assert!(ok, "{} could not ping {to}: {out}", from.name);
    }
    // What each host says it answers.
    for a in &c.agents {
        let net = dns_report(a, "web");
        assert_eq!(net["listening"], true, "{net}");
        let names: Vec<&str> = net["names"].as_array().unwrap().iter().filter_map(|n| n["name"].as_str()).collect();
        for n in ["db", "front", "web1", "web2", "web3", "www"] {
            assert!(names.contains(&n), "{n} not in {names:?}");
        }
        assert!(counter(&net, "queries") > 0, "{net}");
    }
    let text = c.agents[0].cli(&["dns"]).unwrap();
    eprintln!("overlayd dns on h1:\n{text}");
    assert!(text.contains("www") && text.contains("alias of web1, web2"), "{text}");

    // Detach: the file goes (it was overlayd's), and web1's name leaves every host.
    c.agents[0].cli(&["detach", "--name", "web1"]).unwrap();
    assert!(!std::path::Path::new(&format!("/etc/netns/{}", cts[0].node.ns())).exists(), "resolv.conf left behind");
    wait_for(GONE_WITHIN, "web1 to leave web3's answers", || getent(&cts[2], "web1").is_empty().then_some(())).unwrap();
}

/// Waits until `name` resolves (`Some`) or not (`None`) from every host's resolver, asked in
/// the host's own namespace on the network's gateway.
fn await_everywhere(c: &Cluster, hosts: &[usize], gw: Ipv4Addr, name: &str, want: Option<Ipv4Addr>, within: Duration) {
    let server = format!("@{gw}");
    let t = Instant::now();
    for &i in hosts {
        wait_for(within.saturating_sub(t.elapsed()), &format!("{name} → {want:?} on {}", c.hosts[i].name()), || {
            let d = dig_in(c.hosts[i].ns(), &[&server, name]);
            let now: Option<Ipv4Addr> = d.answers.first().and_then(|a| a.parse().ok());
            (now == want).then_some(())
        })
        .unwrap();
    }
}

/// Test 2: a container whose namespace is deleted and one attached by PID whose process is
/// SIGKILLed leave every host's answers within 5 s; a host's agent SIGKILLed, its containers
/// leave the others' answers within 5 s; restarted, they are back everywhere; a host cut off
/// until it is declared down and healed answers exactly what the others answer.
#[test]
fn names_leave_every_host_within_5_s_when_their_container_or_host_dies_and_come_back() {
    let _alone = TIMED.lock().unwrap_or_else(|p| p.into_inner());
    let bed = bed();
    let c = cluster(&bed, 3);
    let gw = create(&c, "web", &[]);
    let a = attach(&c, 0, "web", "alpha", &[]);
    let b = attach(&c, 1, "web", "bravo", &["b-alias"]);
    // Host 2 keeps a container, so that the network (and its resolver) stays up there.
    let _d = attach(&c, 1, "web", "delta", &[]);
    let far = attach(&c, 2, "web", "charlie", &["c-alias"]);
    // A container that is a process: its own network namespace, attached by PID.
    let proc = c.hosts[1].spawn("pid container", "unshare", &["--net", "--", "sleep", "100000"]).unwrap();
    let pid = proc.pid().to_string();
    wait_for(Duration::from_secs(5), "the process to have its namespace", || {
        let own = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
        let host = std::fs::read_link(format!("/proc/{}/ns/net", c.agents[1].pid())).ok()?;
        (own != host).then_some(())
    })
    .unwrap();
    let p = c.agents[1]
        .json(&["attach", "--network", "web", "--pid", &pid, "--name", "papa", "--alias", "p-alias"])
        .unwrap();
    let p_ip: Ipv4Addr = p["ip"].as_str().unwrap().parse().unwrap();
    let all = [0, 1, 2];
    for (name, ip) in [("bravo", b.ip), ("b-alias", b.ip), ("papa", p_ip), ("p-alias", p_ip), ("charlie", far.ip)] {
        await_everywhere(&c, &all, gw, name, Some(ip), T);
    }
    assert_eq!(getent(&a, "papa.web"), [p_ip]);

    // Bravo's namespace deleted, papa's process killed: gone from every host within 5 s.
    let t = Instant::now();
    testbed::netns::delete(b.node.ns());
    proc.kill().unwrap();
    for name in ["bravo", "b-alias", "papa", "p-alias"] {
        await_everywhere(&c, &all, gw, name, None, GONE_WITHIN.saturating_sub(t.elapsed()));
    }
    eprintln!("a deleted namespace and a killed process left every host's answers in {:?}", t.elapsed());
    assert!(getent(&a, "bravo").is_empty() && getent(&far, "papa").is_empty());
    assert_eq!(getent(&a, "charlie"), [far.ip], "the others stay");

    // Host 3's agent SIGKILLed: charlie leaves hosts 1 and 2 within 5 s.
    let t = Instant::now();
    c.agents[2].kill().unwrap();
    for name in ["charlie", "c-alias"] {
        await_everywhere(&c, &[0, 1], gw, name, None, GONE_WITHIN.saturating_sub(t.elapsed()));
    }
    eprintln!("a dead host's containers left the others' answers in {:?}", t.elapsed());
    assert!(getent(&a, "charlie.web").is_empty());
    assert_eq!(getent(&a, "alpha"), [a.ip]);

    // Restarted: back everywhere, and host 3 answers again.
    let again = c.hosts[2].start_daemon::<&str>(&[]).unwrap();
    for name in ["charlie", "c-alias"] {
        await_everywhere(&c, &all, gw, name, Some(far.ip), T);
    }
    await_everywhere(&c, &[2], gw, "alpha", Some(a.ip), T);
    wait_for(T, "charlie to resolve alpha again", || (getent(&far, "alpha") == [a.ip]).then_some(())).unwrap();
    for name in ["bravo", "papa"] {
        await_everywhere(&c, &all, gw, name, None, T);
    }

    // Host 3 cut off (gossip, control and VXLAN, both ways), long enough to be declared down,
    // then healed: suspended, not forgotten, it answers exactly what every other host answers.
    c.hosts[2]
        .nft(
            "table inet ovtb_cut {\n\
               chain out { type filter hook output priority 0; udp dport { 4789, 7946 } drop; udp sport 7946 drop; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
               chain in { type filter hook input priority 0; udp dport { 4789, 7946 } drop; udp sport 7946 drop; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
             }\n",
        )
        .unwrap();
    await_everywhere(&c, &[0, 1], gw, "charlie", None, T);
    c.hosts[2].nft("delete table inet ovtb_cut\n").unwrap();
    let healed = Instant::now();
    for name in ["charlie", "c-alias"] {
        await_everywhere(&c, &all, gw, name, Some(far.ip), T);
    }
    let answers = |i: usize| {
        let net = dns_report(&c.agents[i], "web");
        net["names"].clone()
    };
    wait_for(T, "every host to answer the same names", || {
        let first = answers(0);
        (first.as_array().is_some_and(|a| a.len() == 4) && answers(1) == first && answers(2) == first).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {} / {} / {}", answers(0), answers(1), answers(2)));
    eprintln!("a partitioned host answered like every other {:?} after healing", healed.elapsed());
    drop(again);
}

/// Test 3: two networks. A container on one resolves its own network's names only: not a
/// name, alias, NAME.NETWORK or address (PTR) of the other; nor can it ask the other
/// network's resolver, or port 53 of its host's other addresses.
#[test]
fn a_container_does_not_resolve_names_that_exist_only_on_another_network() {
    let bed = bed();
    let c = cluster(&bed, 2);
    let blue_gw = create(&c, "blue", &[]);
    let red_gw = create(&c, "red", &[]);
    let b1 = attach(&c, 0, "blue", "b1", &["bee"]);
    let b2 = attach(&c, 1, "blue", "b2", &[]);
    let r1 = attach(&c, 0, "red", "r1", &["ar"]);
    let r2 = attach(&c, 1, "red", "r2", &[]);
    wait_for(T, "b1 to resolve b2", || (getent(&b1, "b2") == [b2.ip]).then_some(())).unwrap();
    wait_for(T, "r1 to resolve r2", || (getent(&r1, "r2") == [r2.ip]).then_some(())).unwrap();
    for (me, own, others) in [(&b1, &b2, [&r1, &r2]), (&r2, &r1, [&b1, &b2])] {
        assert_eq!(getent(me, &own.name), [own.ip]);
        for o in others {
            let net = if o.name.starts_with('r') { "red" } else { "blue" };
            for name in [o.name.clone(), format!("{}.{net}", o.name)] {
                assert!(getent(me, &name).is_empty(), "{} resolved {name}", me.name);
                let d = dig(me, &[&name]);
                assert!(d.answers.is_empty(), "{} got {name}: {d:?}", me.name);
            }
            let d = dig(me, &["-x", &o.ip.to_string()]);
            assert!(d.answers.is_empty(), "{} got the PTR of {}: {d:?}", me.name, o.ip);
        }
    }
    assert!(getent(&b1, "ar").is_empty() && getent(&r2, "bee").is_empty(), "aliases stay on their network");

    // A container on both networks resolves the names of both (through its first nameserver,
    // blue's), and is known on each by the address it has there.
    let both = attach(&c, 0, "blue", "both", &[]);
    let path = both.node.netns_path();
    let on_red = c.agents[0]
        .json(&["attach", "--network", "red", "--netns", &path, "--name", "both", "--ifname", "eth1"])
        .unwrap();
    let red_ip: Ipv4Addr = on_red["ip"].as_str().unwrap().parse().unwrap();
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", both.node.ns())).unwrap();
    let servers: Vec<&str> = resolv.lines().filter_map(|l| l.strip_prefix("nameserver ")).collect();
    assert_eq!(servers, [blue_gw.to_string(), red_gw.to_string()], "{resolv}");
    wait_for(T, "both to resolve r2", || (getent(&both, "r2") == [r2.ip]).then_some(())).unwrap();
    assert_eq!(getent(&both, "b2"), [b2.ip]);
    assert_eq!(getent(&both, "ar.red"), [r1.ip]);
    assert_eq!(dig(&both, &["-x", &r2.ip.to_string()]).answers, ["r2.red."]);
    wait_for(T, "r2 to resolve both", || (getent(&r2, "both") == [red_ip]).then_some(())).unwrap();
    assert_eq!(getent(&b2, "both"), [both.ip]);
    c.agents[0].cli(&["detach", "--netns", &path, "--network", "red"]).unwrap();
    wait_for(T, "both to forget red's names", || getent(&both, "r2").is_empty().then_some(())).unwrap();
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", both.node.ns())).unwrap();
    assert!(!resolv.contains(&red_gw.to_string()), "red's resolver left the file: {resolv}");

    // Asking the other network's resolver, or the host's underlay address, gets nothing (and
    // is counted), while its own network's resolver answers.
    let before = c.agents[0].counters().unwrap().dropped("host_from_overlay");
    let elsewhere = c.agents[0].counters().unwrap().dropped("dns_from_elsewhere");
    let host_ip = v4(c.hosts[0].addr());
    for server in [red_gw, host_ip] {
        let d = dig(&b1, &[&format!("@{server}"), "r1"]);
        assert_eq!(d.status, "NO REPLY", "b1 asked {server}: {d:?}");
        let d = dig(&b1, &["+tcp", &format!("@{server}"), "r1"]);
        assert_eq!(d.status, "NO REPLY", "b1 asked {server} over TCP: {d:?}");
    }
    // Only port 53 is open on the gateway: another port of it stays closed.
    let d = dig(&b1, &[&format!("@{blue_gw}"), "-p", "5353", "b2"]);
    assert_eq!(d.status, "NO REPLY", "port 5353 of the gateway: {d:?}");
    assert!(c.agents[0].counters().unwrap().dropped("host_from_overlay") >= before + 3);
    assert!(c.agents[0].counters().unwrap().dropped("dns_from_elsewhere") >= elsewhere + 2, "red's resolver");
    assert_eq!(dig(&b1, &[&format!("@{blue_gw}"), "b2"]).answers, [b2.ip.to_string()]);
}

/// The hosts' upstream resolver: dnsmasq in a namespace that plays the outside, answering
/// 192.0.2.7 for every name under ext.test, and written into the testbed's upstreams file.
fn upstream(bed: &Testbed) -> (testbed::Host, Ipv4Addr, Agent) {
    let outside = bed.add_outside().unwrap();
    let upstream = v4(outside.addr());
    std::fs::write(bed.upstreams_file(), format!("# the test's upstream\nnameserver {upstream}\n")).unwrap();
    // An empty configuration of its own (not /etc/dnsmasq.conf).
    let conf = bed.dir().join("dnsmasq.conf");
    std::fs::write(&conf, "").unwrap();
    let dnsmasq = outside
        .spawn(
            "dnsmasq",
            "dnsmasq",
            &[
                "--keep-in-foreground",
                &format!("--conf-file={}", conf.display()),
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--group=root",
                "--bind-interfaces",
                &format!("--listen-address={upstream}"),
                "--port=53",
                "--address=/ext.test/192.0.2.7",
                "--log-facility=-",
                "--pid-file=",
            ],
        )
        .unwrap();
    wait_for(Duration::from_secs(10), "dnsmasq to answer", || {
        let d = dig_in(outside.ns(), &[&format!("@{upstream}"), "www.ext.test"]);
        (d.answers == ["192.0.2.7"]).then_some(())
    })
    .unwrap();
    (outside, upstream, dnsmasq)
}

/// Test 4: names outside the overlay are forwarded to the host's upstream (dnsmasq in the
/// outside namespace, from the daemons' upstreams file), and reach the container; with the
/// upstream dead, overlay names still answer at once (< 100 ms), also while a forwarded query
/// waits; an `--internal` network answers NXDOMAIN for them and never forwards.
#[test]
fn other_names_go_to_the_hosts_upstream_but_never_delay_overlay_names_nor_leave_internal_networks() {
    let bed = bed();
    let (outside, upstream, dnsmasq) = upstream(&bed);
    let c = cluster(&bed, 2);
    let gw = create(&c, "web", &[]);
    create(&c, "vault", &["--internal"]);
    let web1 = attach(&c, 0, "web", "web1", &[]);
    let web2 = attach(&c, 1, "web", "web2", &[]);
    let safe = attach(&c, 0, "vault", "safe", &[]);
    let safe2 = attach(&c, 1, "vault", "safe2", &[]);
    wait_for(T, "web1 to resolve web2", || (getent(&web1, "web2") == [web2.ip]).then_some(())).unwrap();
    wait_for(T, "the daemons to read their upstream", || {
        (getent(&web1, "www.ext.test") == [Ipv4Addr::new(192, 0, 2, 7)]).then_some(())
    })
    .unwrap();
    let d = dig(&web1, &["www.ext.test"]);
    assert_eq!((d.status.as_str(), d.answers.clone()), ("NOERROR", vec!["192.0.2.7".to_owned()]), "{d:?}");
    assert!(d.flags.contains("ra"), "recursion available: {d:?}");
    assert_eq!(dig(&web1, &["+tcp", "mail.ext.test"]).answers, ["192.0.2.7"], "forwarded over TCP");
    assert_eq!(getent(&web2, "www.ext.test"), [Ipv4Addr::new(192, 0, 2, 7)], "from the other host too");
    let net = dns_report(&c.agents[0], "web");
    assert!(counter(&net, "forwarded") >= 2 && counter(&net, "upstream_queries") >= 2, "{net}");
    let upstreams = c.agents[0].json(&["dns"]).unwrap()["upstreams"].clone();
    assert_eq!(upstreams, serde_json::json!([format!("{upstream}:53")]));

    // No open resolver: the outside, with a route to the gateway through host 1, gets nothing.
    let h1 = c.hosts[0].addr().to_string();
    testbed::netns::ip(["-n", outside.ns(), "route", "add", &format!("{gw}/32"), "via", &h1]).unwrap();
    let before = c.agents[0].counters().unwrap().dropped("dns_from_elsewhere");
    for args in [vec![format!("@{gw}"), "web1".to_owned()], vec!["+tcp".into(), format!("@{gw}"), "web1".into()]] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = dig_in(outside.ns(), &args);
        assert_eq!(d.status, "NO REPLY", "the outside asked {gw}: {d:?}");
    }
    assert!(c.agents[0].counters().unwrap().dropped("dns_from_elsewhere") >= before + 2);
    assert_eq!(
        dig_in(c.hosts[0].ns(), &[&format!("@{gw}"), "web2"]).answers,
        [web2.ip.to_string()],
        "the host itself may ask"
    );

    // The internal network: its own names answer, the outside's are NXDOMAIN, never forwarded.
    wait_for(T, "safe to resolve safe2", || (getent(&safe, "safe2") == [safe2.ip]).then_some(())).unwrap();
    let before = counter(&dns_report(&c.agents[0], "vault"), "forwarded");
    let d = dig(&safe, &["www.ext.test"]);
    assert_eq!((d.status.as_str(), d.answers.len()), ("NXDOMAIN", 0), "{d:?}");
    assert!(getent(&safe, "www.ext.test").is_empty());
    let vault = dns_report(&c.agents[0], "vault");
    assert_eq!(counter(&vault, "forwarded"), before, "{vault}");
    assert!(counter(&vault, "internal_nxdomain") >= 1, "{vault}");
    assert_eq!(vault["internal"], true);

    // The upstream dies: overlay names answer at once, even while a forwarded query waits.
    dnsmasq.kill().unwrap();
    let waiting = {
        let ns = web1.node.ns().to_owned();
        std::thread::spawn(move || timed(&ns, dns53(gw), "slow.ext.test"))
    };
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..10 {
        let (reply, took) = timed(web1.node.ns(), dns53(gw), "web2");
        let reply = reply.expect("web2 answered");
        assert_eq!((rcode(&reply), ancount(&reply)), (0, 1));
        assert!(took < Duration::from_millis(100), "an overlay name took {took:?} with the upstream dead");
    }
    let t = Instant::now();
    assert_eq!(getent(&web1, "web2"), [web2.ip], "glibc too");
    assert!(t.elapsed() < Duration::from_secs(1), "getent took {:?}", t.elapsed());
    let (reply, took) = waiting.join().unwrap();
    let reply = reply.expect("the forwarded query is answered, SERVFAIL");
    assert_eq!(rcode(&reply), 2, "SERVFAIL once the upstream's time is up");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let net = dns_report(&c.agents[0], "web");
    assert!(counter(&net, "upstream_failures:timeout") >= 1, "{net}");
}

/// What busybox `nslookup NAME` printed: the addresses of the answer (empty: none).
fn nslookup_answers(out: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = out
        .split_once("Name:")
        .map(|(_, answer)| {
            answer.lines().filter_map(|l| l.trim().strip_prefix("Address:")?.trim().parse().ok()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Test 5: a podman container (overlayd as its CNI plugin) on one host and a Docker container
/// (overlayd's Docker driver) on the other find each other by name — and the Docker one by its
/// `--network-alias` — with busybox `nslookup` and `ping NAME`, with no DNS setting of their own. The podman container asks its network's
/// resolver (the CNI result's `dns`); the Docker one asks Docker's embedded resolver
/// (127.0.0.11), which forwards names it does not have to the host's resolvers (here dockerd's
/// `--dns`, the testbed's upstream, as the host's resolv.conf would be), and overlayd answers
/// those queries from the network's resolver: the overlay's names, and the outside's forwarded.
#[test]
fn podman_and_docker_containers_resolve_each_other_by_name_across_hosts() {
    let _alone = TIMED.lock().unwrap_or_else(|p| p.into_inner());
    let bed = bed();
    let (_outside, upstream, _dnsmasq) = upstream(&bed);
    let c = cluster(&bed, 2);
    let docker = Dockerd::start_with_dns(&c.hosts[0], false, &[upstream]).expect("dockerd on host 0");
    let plugin = c.hosts[0].ns().to_owned();
    docker
        .docker(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "web"])
        .expect("docker network create");
    wait_for(T, "the network web on host 1", || c.agents[1].json(&["network", "inspect", "web"]).ok().map(|_| ()))
        .unwrap();
    let podman = Podman::new(&c.hosts[1], &c.agents[1], "web").expect("podman on host 1");
    podman.run("pod1", &[]).expect("podman run pod1");
    docker.run("dock1", "web", &["--network-alias", "dock-api"]).expect("docker run dock1");
    let (pod1, dock1) = (podman.ip("pod1").unwrap(), docker.ip("dock1", "web").unwrap());
    eprintln!("pod1 {pod1} on host 1, dock1 {dock1} on host 0");
    eprintln!("pod1's resolv.conf:\n{}", podman.exec("pod1", &["cat", "/etc/resolv.conf"]).unwrap_or_default());

    // Whatever the exit status: busybox asks for A and AAAA, and fails when either fails (the
    // test's upstream refuses AAAA for the outside's names).
    let stdout = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let from_pod = |name: &str| nslookup_answers(&stdout(podman.output(&["exec", "pod1", "nslookup", name]).unwrap()));
    let from_docker =
        |name: &str| nslookup_answers(&stdout(docker.output(&["exec", "dock1", "nslookup", name]).unwrap()));
    wait_for(T, "pod1 to resolve dock1", || (from_pod("dock1") == [dock1]).then_some(())).unwrap_or_else(|e| {
        panic!("{e:#}: {}", podman.output(&["exec", "pod1", "nslookup", "dock1"]).map(|o| format!("{o:?}")).unwrap())
    });
    wait_for(T, "dock1 to resolve pod1", || (from_docker("pod1") == [pod1]).then_some(()))
        .unwrap_or_else(|e| panic!("{e:#}: {:?}", docker.output(&["exec", "dock1", "nslookup", "pod1"]).unwrap()));
    wait_for(T, "pod1 to resolve dock1's Docker alias", || (from_pod("dock-api") == [dock1]).then_some(())).unwrap();
    assert_eq!(from_pod("dock-api.web"), [dock1], "a Docker alias, as NAME.NETWORK");
    assert_eq!(from_docker("pod1.web"), [pod1], "NAME.NETWORK from Docker");
    assert_eq!(from_pod("dock1.web"), [dock1], "NAME.NETWORK from podman");
    assert_eq!(from_docker("www.ext.test"), [Ipv4Addr::new(192, 0, 2, 7)], "the outside's names, forwarded");
    assert_eq!(from_pod("www.ext.test"), [Ipv4Addr::new(192, 0, 2, 7)]);
    assert!(from_docker("nothere").is_empty() && from_pod("nothere").is_empty());

    // ping by name, each way (busybox's resolver, through the container's resolv.conf).
    let out = docker.docker(&["exec", "dock1", "ping", "-c", "1", "-W", "5", "pod1"]).expect("dock1 pings pod1");
    assert!(out.contains(&format!("from {pod1}")) || out.contains(&format!("({pod1})")), "{out}");
    let out = podman.exec("pod1", &["ping", "-c", "1", "-W", "5", "dock1"]).expect("pod1 pings dock1");
    assert!(out.contains(&format!("({dock1})")), "{out}");

    let dns = c.agents[0].json(&["dns"]).unwrap();
    assert_eq!(dns["intercepted"], serde_json::json!([upstream.to_string()]), "{dns}");

    // On an internal network, a Docker container finds the containers of every host too (Docker
    // routes it through the driver's gateway, where overlayd answers), and the outside's names
    // are NXDOMAIN: nothing leaves the network.
    docker
        .docker(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "--internal", "vault"])
        .expect("docker network create --internal vault");
    wait_for(T, "the network vault on host 1", || c.agents[1].json(&["network", "inspect", "vault"]).ok().map(|_| ()))
        .unwrap();
    let safe = attach(&c, 1, "vault", "safe1", &[]);
    docker.run("dock2", "vault", &[]).expect("docker run dock2 on vault");
    let from_dock2 =
        |name: &str| nslookup_answers(&stdout(docker.output(&["exec", "dock2", "nslookup", name]).unwrap()));
    wait_for(T, "dock2 (internal network) to resolve safe1 on the other host", || {
        (from_dock2("safe1") == [safe.ip]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", docker.output(&["exec", "dock2", "nslookup", "safe1"]).unwrap()));
    assert!(from_dock2("www.ext.test").is_empty(), "an internal network's container resolved an outside name");
    let out = docker.docker(&["exec", "dock2", "ping", "-c", "1", "-W", "5", "safe1"]).expect("dock2 pings safe1");
    assert!(out.contains(&format!("({})", safe.ip)), "{out}");
}

/// Test 6: bad input from a container, and a flood: no crash, every kind counted, and good
/// queries answered during and after.
#[test]
fn bad_queries_and_a_flood_are_counted_and_good_queries_still_answer() {
    let bed = bed();
    let c = cluster(&bed, 1);
    let gw = create(&c, "web", &[]);
    let web1 = attach(&c, 0, "web", "web1", &[]);
    let attacker = attach(&c, 0, "web", "attacker", &[]);
    wait_for(T, "the resolver to answer", || (getent(&web1, "attacker") == [attacker.ip]).then_some(())).unwrap();
    let server = dns53(gw);
    let ns = attacker.node.ns().to_owned();
    let before = dns_report(&c.agents[0], "web");

    let good = query(1, "web1", A, IN);
    let mut header_only = good[..12].to_vec();
    header_only[0] = 2;
    let mut cut_label = query(3, "web1", A, IN);
    cut_label.truncate(14);
    let mut pointer_loop = good[..12].to_vec();
    pointer_loop[0] = 4;
    pointer_loop.extend([0xc0, 12, 0, 1, 0, 1]);
    let mut response = query(5, "web1", A, IN);
    response[2] |= 0x80;
    let mut status_opcode = query(6, "web1", A, IN);
    status_opcode[2] |= 2 << 3;
    let mut two_questions = query(7, "web1", A, IN);
    two_questions[5] = 2;
    let long_name = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63), "e".repeat(10)].join(".");
    let mut oversized = query(10, "web1", A, IN);
    oversized.extend(std::iter::repeat_n(0xab, 60_000));
    let cases: Vec<(&str, Vec<u8>, Option<u8>)> = vec![
        ("an empty datagram", Vec::new(), None),
        ("five bytes", vec![1, 2, 3, 4, 5], None),
        ("a header without its question", header_only, Some(1)),
        ("a label cut short", cut_label, Some(1)),
        ("a compression pointer to itself", pointer_loop, Some(1)),
        ("a response", response, None),
        ("opcode STATUS", status_opcode, Some(4)),
        ("two questions announced, one there", two_questions, Some(1)),
        ("class CH", query(8, "web1", A, 3), Some(5)),
        ("class 254", query(9, "web1", A, 254), Some(5)),
        ("a name longer than 255 bytes", query(11, &long_name, A, IN), Some(1)),
        ("type 99 of a name of the network", query(12, "web1", 99, IN), Some(0)),
        ("type 65535 of a name of the network", query(13, "web1", 65535, IN), Some(0)),
        ("60 kB after a query", oversized, None),
    ];
    for (what, msg, want) in &cases {
        let reply = ask_raw(&ns, server, vec![msg.clone()], Duration::from_millis(500)).pop().flatten();
        match want {
            None => {}
            Some(code) => {
                let reply = reply.unwrap_or_else(|| panic!("{what}: no reply"));
                assert_eq!(rcode(&reply), *code, "{what}: {reply:?}");
                assert_eq!(ancount(&reply), 0, "{what}");
            }
        }
        let ok = ask_raw(&ns, server, vec![good.clone()], Duration::from_secs(1)).pop().flatten();
        assert_eq!(ok.map(|r| (rcode(&r), ancount(&r))), Some((0, 1)), "a good query after {what}");
    }
    // The same over TCP: a zero-length message, then garbage, each closes its connection.
    for bytes in [vec![0u8, 0], vec![0, 5, 1, 2, 3, 4, 5]] {
        let got = testbed::netns::within(&ns, move || {
            use std::io::{Read as _, Write as _};
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(&bytes)?;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            Ok(buf)
        })
        .unwrap();
        assert!(got.is_empty(), "no reply over TCP to {got:?}");
    }
    let after = dns_report(&c.agents[0], "web");
    let grew = |key: &str| counted(&after, key) - counted(&before, key);
    eprintln!("counters after the bad input: {}", after["counters"]);
    assert!(grew("dropped:short_query") >= 2, "empty and five bytes");
    assert!(grew("dropped:not_a_query") >= 1);
    assert!(grew("malformed:") >= 5, "FORMERRs by reason");
    assert!(grew("answers:formerr") >= 5 && grew("answers:notimp") >= 1 && grew("refused:class") >= 2);
    assert!(grew("nodata") >= 2, "unknown types of a known name");
    assert!(grew("dropped:tcp_malformed") >= 1);

    // Too many TCP connections: the ones beyond the bound are closed at once and counted;
    // a good query gets through once they are gone.
    let held = testbed::netns::within(&ns, move || {
        Ok((0..80).filter_map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok()).collect::<Vec<_>>())
    })
    .unwrap();
    wait_for(Duration::from_secs(5), "connections over the bound to be counted", || {
        (counted(&dns_report(&c.agents[0], "web"), "dropped:tcp_busy") >= 10).then_some(())
    })
    .unwrap();
    drop(held);
    wait_for(Duration::from_secs(5), "a TCP query to be answered", || {
        (dig(&web1, &["+tcp", "attacker"]).answers == [attacker.ip.to_string()]).then_some(())
    })
    .unwrap();

    // A flood: 20,000 datagrams as fast as one socket sends them (half junk, half queries, a
    // tenth of those for names outside the overlay), while web1 asks every 20 ms.
    let before = dns_report(&c.agents[0], "web");
    let flood = {
        let ns = ns.clone();
        std::thread::spawn(move || {
            testbed::netns::within(&ns, move || {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                let t = Instant::now();
                for i in 0..20_000u32 {
                    let msg = match i % 4 {
                        0 => query(i as u16, "web1", A, IN),
                        1 => vec![(i % 251) as u8; (i % 300) as usize],
                        2 => query(i as u16, &format!("n{i}.ext.test"), A, IN),
                        _ => query(i as u16, "attacker.web", A, 3),
                    };
                    let _ = s.send_to(&msg, server);
                }
                Ok(t.elapsed())
            })
        })
    };
    let (mut asked, mut answered) = (0, 0);
    while !flood.is_finished() {
        asked += 1;
        let r = ask_raw(web1.node.ns(), server, vec![query(0x7777, "attacker", A, IN)], Duration::from_millis(200));
        if r[0].as_ref().is_some_and(|r| rcode(r) == 0 && ancount(r) == 1) {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = flood.join().unwrap().unwrap();
    eprintln!("flood of 20,000 datagrams sent in {took:?}; {answered} of {asked} good queries answered meanwhile");
    assert!(answered >= 1 || asked == 0, "no good query answered during the flood");
    for _ in 0..20 {
        let (reply, t) = timed(web1.node.ns(), server, "attacker");
        assert_eq!(reply.map(|r| (rcode(&r), ancount(&r))), Some((0, 1)), "after the flood");
        assert!(t < Duration::from_millis(100), "{t:?}");
    }
    assert_eq!(getent(&web1, "attacker"), [attacker.ip]);
    c.agents[0].status().expect("the daemon lives");
    let after = wait_for(Duration::from_secs(3), "the counters to be published", || {
        let r = dns_report(&c.agents[0], "web");
        (counter(&r, "queries") > counter(&before, "queries") + 1000).then_some(r)
    })
    .unwrap();
    let grew = |key: &str| counted(&after, key) - counted(&before, key);
    eprintln!(
        "the flood: {} queries, {} malformed, {} short, {} refused, {} forwarded (answered SERVFAIL: no upstream)",
        grew("queries"),
        grew("malformed:"),
        grew("dropped:short_query"),
        grew("refused:"),
        grew("forwarded")
    );
    assert!(grew("queries") <= 20_000 + asked as u64 + 40, "counted no more than came");
    assert!(grew("malformed:") + grew("dropped:short_query") > 0 && grew("refused:class") > 0 && grew("forwarded") > 0);
    assert!(grew("forward_failed:no_upstream") > 0, "the testbed's daemons have no upstream");

    // The same counters in Prometheus' text, from a daemon with a metrics address.
    c.agents[0].terminate().unwrap();
    let metrics = SocketAddr::new(c.hosts[0].addr(), 9477);
    let _again = c.hosts[0].start_daemon(&["--metrics-addr", &metrics.to_string()]).unwrap();
    wait_for(T, "the resolver to answer after the restart", || {
        (getent(&web1, "attacker") == [attacker.ip]).then_some(())
    })
    .unwrap();
    let ns = c.hosts[0].ns().to_owned();
    let text = testbed::netns::within(&ns, move || {
        use std::io::{Read as _, Write as _};
        let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(2))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
    .unwrap();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    let queries = line("overlayd_dns_queries_total{network=\"web\"} ").unwrap_or_else(|| panic!("{text}"));
    assert!(queries.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v >= 2), "{queries}");
    for family in [
        "overlayd_dns_answers_total{network=\"web\",rcode=\"noerror\"}",
        "overlayd_dns_forwarded_total{network=\"web\"}",
        "overlayd_dns_upstream_failures_total{network=\"web\",reason=\"timeout\"}",
        "overlayd_dns_truncated_total{network=\"web\"}",
        "overlayd_dns_dropped_total{network=\"web\",reason=\"short_query\"}",
    ] {
        assert!(line(family).is_some(), "{family} not in\n{text}");
    }
}
