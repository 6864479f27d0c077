//! Services end to end (issue 15), with real daemons, real servers (busybox `httpd` and `nc`
//! answering with their own name) and real clients (`curl`, `dig`, sockets in a container's
//! namespace):
//! - three replicas on three hosts and a client on a fourth container: requests to
//!   `http://NAME/` reach all three through the VIP; `tasks.NAME` gives the three; a dnsrr
//!   service answers its replicas;
//! - a replica's server killed: its health check fails, no new request reaches it within 5 s,
//!   a connection held open to it through the VIP is reset at once, DNS leaves it; restarted,
//!   it is back;
//! - a connection through the VIP survives a restart of the client's agent and an idle time
//!   that outlasts its entry in the client's conntrack table (checked gone, then back);
//! - published ports: "the outside" (a namespace on the underlay) reaches a replica through
//!   every host's address, also one with no replica, and the replica sees the outside's
//!   address; the host mode serves each host's own replicas; `service rm` takes every rule;
//! - bad input: clear errors, nothing changed.
//!
//! These tests need root (namespaces), busybox-static, curl and dig. They fail, never skip.
#![allow(clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Node, Options, Testbed};

const T: Duration = Duration::from_secs(20);

/// Held by the test that times a replica's death (test 2) and by the one that starts dockerd
/// and podman, so that they never run side by side on a 2-core machine.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// A container attached with `overlayd attach --netns` (and `--service`).
struct Ct {
    node: Node,
    ip: Ipv4Addr,
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str, service: Option<&str>) -> Ct {
    let node = c.hosts[i].add_netns(name).unwrap();
    let path = node.netns_path();
    let mut args = vec!["attach", "--network", network, "--netns", &path, "--name", name];
    if let Some(s) = service {
        args.extend(["--service", s]);
    }
    let ep = c.agents[i].json(&args).unwrap_or_else(|e| panic!("cannot attach {name}: {e:#}"));
    let ip = ep["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no address: {ep}"));
    Ct { node, ip }
}

/// A replica's servers: busybox httpd on port 80 (its name as the page) and nc on port 9000
/// (its name, then an echo for as long as the client holds the connection).
struct Servers {
    httpd: Agent,
    _nc: Agent,
    dir: std::path::PathBuf,
}

fn serve(bed: &Testbed, ct: &Ct, name: &str) -> Servers {
    let dir = bed.dir().join(format!("www-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), format!("{name}\n")).unwrap();
    let httpd = start_httpd(ct, name, &dir);
    let greeting = format!("echo {name}; exec cat");
    let nc = ct
        .node
        .spawn(&format!("nc-{name}"), "busybox", &["nc", "-ll", "-p", "9000", "-e", "sh", "-c", &greeting])
        .unwrap();
    Servers { httpd, _nc: nc, dir }
}

fn start_httpd(ct: &Ct, name: &str, dir: &std::path::Path) -> Agent {
    let d = dir.to_string_lossy().into_owned();
    ct.node.spawn(&format!("httpd-{name}"), "busybox", &["httpd", "-f", "-p", "80", "-h", &d]).unwrap()
}

/// `curl URL` in the container (glibc's resolver through its resolv.conf; busybox-static's
/// wget cannot resolve names outside a container image): the page, or None.
fn get(ct: &Ct, url: &str) -> Option<String> {
    get_in(ct.node.ns(), url)
}

/// `curl URL` in the namespace `ns`: the page, or None.
fn get_in(ns: &str, url: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sf", "-m", "2", url])
        .output()
        .expect("cannot run curl (scripts/install-deps)");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `dig +short NAME [TYPE]` in the container: the answers, sorted.
fn dig(ct: &Ct, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ct.node.ns(), "dig", "+short", "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("cannot run dig (dnsutils)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    v.sort();
    v
}

fn service(agent: &Agent, name: &str) -> Value {
    agent.json(&["service", "inspect", name]).unwrap_or_else(|e| panic!("service inspect {name}: {e:#}"))
}

/// How many requests out of `n` reached each replica.
fn spread(client: &Ct, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let page = get(client, url).unwrap_or_else(|| "FAILED".into());
        *seen.entry(page).or_default() += 1;
    }
    seen
}

/// Opens a connection from the container to `to` (port 9000, the nc servers) and reads the
/// replica's greeting: the connection and the replica's name.
fn hold(client: &Ct, to: Ipv4Addr) -> (TcpStream, String) {
    hold_at(client.node.ns(), SocketAddr::from((to, 9000)))
}

/// [`hold`] from the namespace `ns` to `to`.
fn hold_at(ns: &str, to: SocketAddr) -> (TcpStream, String) {
    testbed::netns::within(ns, move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok((s, line.trim().to_owned()))
    })
    .expect("a connection through the VIP")
}

/// Whether a held connection still carries data both ways (its echo answers).
fn alive(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

/// Replicas web1, web2, web3 of service `web` on network `front`, on hosts 1 to 3, each serving.
fn three_web_replicas(bed: &Testbed, c: &Cluster) -> (Vec<Ct>, Vec<Servers>) {
    let replicas: Vec<Ct> = (0..3).map(|i| attach(c, i, "front", &format!("web{}", i + 1), Some("web"))).collect();
    let servers = replicas.iter().enumerate().map(|(i, r)| serve(bed, r, &format!("web{}", i + 1))).collect();
    (replicas, servers)
}

/// Waits until every host counts `web`'s three replicas healthy.
fn await_three_healthy(c: &Cluster) {
    wait_for(T, "three healthy replicas on every host", || {
        c.agents
            .iter()
            .all(|a| {
                service(a, "web")["replicas"]
                    .as_array()
                    .is_some_and(|r| r.len() == 3 && r.iter().all(|x| x["health"] == "healthy"))
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", service(&c.agents[3], "web")));
}

/// Test 1 (and 2's DNS half): three replicas on three hosts behind one VIP, health-checked;
/// a client on a fourth host.
#[test]
fn a_service_spreads_over_its_healthy_replicas_and_drops_a_dead_one_at_once() {
    let _alone = TIMED.lock().unwrap_or_else(|p| p.into_inner());
    let bed = bed();
    let c = Cluster::form(&bed, 1, 3).expect("cluster");
    c.await_nodes(4, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "front"]).unwrap();
    let svc = c.agents[0]
        .json(&[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--port",
            "80/tcp",
            "--port",
            "9000/tcp",
            "--health-http",
            "/",
            "--health-interval",
            "500ms",
            "--health-timeout",
            "400ms",
            "--health-retries",
            "2",
        ])
        .expect("service create");
    let vip: Ipv4Addr = svc["vip"].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no VIP: {svc}"));
    let (replicas, mut servers) = three_web_replicas(&bed, &c);
    let client = attach(&c, 3, "front", "client", None);
    await_three_healthy(&c);

    // DNS: the name is the VIP, tasks.NAME the replicas.
    assert_eq!(dig(&client, &["web"]), [vip.to_string()]);
    let mut all: Vec<String> = replicas.iter().map(|r| r.ip.to_string()).collect();
    all.sort();
    assert_eq!(dig(&client, &["tasks.web"]), all);
    assert_eq!(dig(&client, &["tasks.web.front"]), all);
    assert_eq!(dig(&client, &["_80._tcp.web", "SRV"]), ["0 10 80 web.front."]);
    assert_eq!(dig(&client, &["_9000._tcp.web.front", "SRV"]), ["0 10 9000 web.front."]);

    // Through the VIP: every request answered, every replica reached.
    let seen = spread(&client, "http://web/", 30);
    eprintln!("30 requests through the VIP: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 30);
    assert!(!seen.contains_key("FAILED"), "{seen:?}");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["web1", "web2", "web3"], "{seen:?}");

    // A connection held open to web1 through the VIP.
    let mut held = None;
    let mut others = Vec::new();
    for _ in 0..40 {
        let (s, who) = hold(&client, vip);
        if who == "web1" {
            held = Some(s);
            break;
        }
        others.push(s);
    }
    let mut held = held.expect("no connection through the VIP reached web1 in 40");
    assert!(alive(&mut held), "the held connection carries data");

    // web1's web server dies: its check fails; within 5 s it gets nothing new, its held
    // connection is reset, and DNS leaves it.
    let t = Instant::now();
    servers[0].httpd.kill().unwrap();
    held.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut buf = [0u8; 16];
    let outcome = held.read(&mut buf);
    let reset_after = t.elapsed();
    eprintln!("web1 killed: the held connection ended after {reset_after:?} with {outcome:?}");
    assert!(
        matches!(&outcome, Ok(0)) || outcome.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the held connection neither reset nor ended: {outcome:?}"
    );
    assert!(reset_after < Duration::from_secs(5), "{reset_after:?}");
    wait_for(Duration::from_secs(5).saturating_sub(t.elapsed()), "web1 to leave tasks.web", || {
        (dig(&client, &["tasks.web"]).len() == 2).then_some(())
    })
    .unwrap();
    let seen = spread(&client, "http://web/", 20);
    eprintln!("20 requests with web1 dead: {seen:?}");
    assert!(!seen.contains_key("web1") && !seen.contains_key("FAILED"), "{seen:?}");
    assert!(others.iter_mut().all(alive), "connections to the others are untouched");
    let web = service(&c.agents[3], "web");
    let health: Vec<&str> =
        web["replicas"].as_array().unwrap().iter().map(|r| r["health"].as_str().unwrap_or("")).collect();
    assert_eq!(health.iter().filter(|h| **h == "unhealthy").count(), 1, "{web}");

    // Restarted: back in DNS and in the spread.
    servers[0].httpd = start_httpd(&replicas[0], "web1", &servers[0].dir);
    wait_for(T, "web1 back in tasks.web", || (dig(&client, &["tasks.web"]).len() == 3).then_some(())).unwrap();
    let seen = spread(&client, "http://web/", 30);
    assert!(seen.contains_key("web1") && !seen.contains_key("FAILED"), "{seen:?}");
}

/// Test 3: a connection through the VIP outlives a restart of the client host's agent (killed
/// with SIGKILL, started again) and an idle time longer than the flow table's own expiry: the
/// flow table is the kernel's conntrack in the client's namespace (overlayd keeps none), whose
/// expiry of established TCP flows is that namespace's
/// `net.netfilter.nf_conntrack_tcp_timeout_established` (5 days by default; 3 s here). A flow
/// forgotten is picked up again when the client next sends, and the consistent hash of its
/// addresses and ports picks the same replica.
#[test]
fn a_connection_through_the_vip_outlives_an_agent_restart_and_its_flow_entry() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 2).expect("cluster");
    c.await_nodes(3, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "front"]).unwrap();
    let svc = c.agents[0].json(&["service", "create", "echo", "--network", "front", "--port", "9000/tcp"]).unwrap();
    let vip: Ipv4Addr = svc["vip"].as_str().and_then(|v| v.parse().ok()).unwrap();
    let replicas: Vec<Ct> = (0..2).map(|i| attach(&c, i, "front", &format!("echo{}", i + 1), Some("echo"))).collect();
    let _servers: Vec<Servers> =
        replicas.iter().enumerate().map(|(i, r)| serve(&bed, r, &format!("echo{}", i + 1))).collect();
    let client = attach(&c, 2, "front", "client", None);
    wait_for(T, "two replicas on the client's host", || {
        service(&c.agents[2], "echo")["replicas"].as_array().is_some_and(|r| r.len() == 2).then_some(())
    })
    .unwrap();
    wait_for(T, "the VIP to answer", || hold_maybe(&client, vip)).unwrap();
    client.node.exec("sysctl", ["-qw", "net.netfilter.nf_conntrack_tcp_timeout_established=3"]).unwrap();
    let (mut s, who) = hold(&client, vip);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(alive(&mut s));

    // The client's host's agent killed and started again.
    c.agents[2].kill().unwrap();
    let _again = c.hosts[2].start_daemon::<&str>(&[]).unwrap();
    wait_for(T, "the restarted agent to know the service", || {
        c.agents[2]
            .json(&["service", "inspect", "echo"])
            .ok()
            .filter(|v| v["replicas"].as_array().is_some_and(|r| r.len() == 2))
    })
    .unwrap();
    assert!(alive(&mut s), "the connection to {who} outlived the restart");
    let local = s.local_addr().unwrap();
    let tracked = flow_entries(&client, local, SocketAddr::from((vip, 9000)));
    eprintln!("the connection's conntrack entry before the idle time: {tracked:?}");
    assert_eq!(tracked.len(), 1, "the client's conntrack tracks the connection to the VIP");

    // Idle for longer than its conntrack entry lives: the entry goes, the connection does not.
    std::thread::sleep(Duration::from_secs(6));
    let tracked = flow_entries(&client, local, SocketAddr::from((vip, 9000)));
    assert_eq!(tracked, Vec::<String>::new(), "the connection's conntrack entry outlived its 3 s expiry");
    assert!(alive(&mut s), "the connection to {who} outlived its idle time");
    let tracked = flow_entries(&client, local, SocketAddr::from((vip, 9000)));
    eprintln!("the connection's conntrack entry once it sent again: {tracked:?}");
    assert_eq!(tracked.len(), 1, "the flow is picked up again when the client sends");
}

/// The entries of the client's conntrack table (its namespace's /proc/net/nf_conntrack; the
/// `conntrack` tool is not installed) whose original direction is `from` → `to`.
fn flow_entries(client: &Ct, from: SocketAddr, to: SocketAddr) -> Vec<String> {
    let table = client.node.exec("cat", ["/proc/net/nf_conntrack"]).expect("the client's conntrack table");
    let tuple = format!("src={} dst={} sport={} dport={} ", from.ip(), to.ip(), from.port(), to.port());
    table.lines().filter(|l| l.contains(&tuple)).map(str::to_owned).collect()
}

/// Test 4: a published port on every host, a host-mode port on the replicas' hosts, from
/// "the outside", with the client's address kept; and nothing left after `service rm`.
#[test]
fn a_published_port_answers_on_every_host_and_the_replica_sees_the_client() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 3).expect("cluster");
    c.await_nodes(4, &[], T).unwrap();
    let outside = bed.add_outside().unwrap();
    // A table of someone else's, in every host: overlayd never touches it.
    for h in &c.hosts {
        h.nft("table ip someone_else {\n chain input { type filter hook input priority 10; policy accept; }\n}\n")
            .unwrap();
    }
    c.agents[0].json(&["network", "create", "front"]).unwrap();
    c.agents[0]
        .json(&[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--port",
            "80/tcp",
            "--publish",
            "8080:80/tcp",
            "--publish",
            "9000:9000/tcp",
            "--publish",
            "8081:80/tcp,host",
            "--health-tcp",
            "80",
            "--health-interval",
            "500ms",
            "--health-timeout",
            "400ms",
        ])
        .expect("service create");
    let (replicas, _servers) = three_web_replicas(&bed, &c);
    await_three_healthy(&c);
    let at = |h: &testbed::Host, port: u16| format!("http://{}:{port}/", h.addr());

    // Every host answers on the published port, host 4 with no replica too, and the requests
    // reach every replica.
    wait_for(T, "the published port on every host", || {
        c.hosts.iter().all(|h| get_in(outside.ns(), &at(h, 8080)).is_some()).then_some(())
    })
    .unwrap();
    let mut seen = BTreeMap::new();
    for h in &c.hosts {
        for _ in 0..8 {
            let page = get_in(outside.ns(), &at(h, 8080)).unwrap_or_else(|| format!("FAILED at {}", h.addr()));
            *seen.entry(page).or_insert(0) += 1;
        }
    }
    eprintln!("32 requests from the outside to the four hosts' port 8080: {seen:?}");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["web1", "web2", "web3"], "{seen:?}");

    // The replica sees the outside's own address, through the host with no replica.
    let (mut s, who) = hold_at(outside.ns(), SocketAddr::new(c.hosts[3].addr(), 9000));
    assert!(alive(&mut s), "a connection through the mesh carries data both ways");
    let replica = &replicas[who.trim_start_matches("web").parse::<usize>().expect("a replica's name") - 1];
    let peers = replica.node.exec("ss", ["-Htn", "state", "established", "( sport = :9000 )"]).unwrap();
    eprintln!("{who} sees: {peers}");
    let peer = peers.split_whitespace().last().unwrap_or_default();
    assert!(peer.contains(&format!("{}", outside.addr())), "{who} does not see the outside's address: {peers}");
    drop(s);

    // A container cannot use its host's mesh port as a way into the host or beyond it: routed
    // to it, the host's control port and another host's stay closed, and the drops are counted.
    let ovm = c.hosts[0].exec("ip", ["-4", "-o", "addr", "show", "ovm-front"]).unwrap();
    let mesh = ovm.split_whitespace().skip_while(|w| *w != "inet").nth(1).and_then(|a| a.split('/').next()).unwrap();
    let web1 = &replicas[0];
    for h in [&c.hosts[0], &c.hosts[1]] {
        web1.node.exec("ip", ["route", "replace", &format!("{}/32", h.addr()), "via", mesh]).unwrap();
        let to = SocketAddr::new(h.addr(), 7947);
        let opened = testbed::netns::within(web1.node.ns(), move || {
            Ok(TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok())
        })
        .unwrap();
        assert!(!opened, "a container reached {to} through its host's mesh port");
    }
    let counted = |name: &str| -> u64 {
        let out = c.hosts[0].exec("nft", ["list", "counter", "inet", "overlayd", name]).unwrap();
        out.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap()
    };
    assert!(counted("mesh_to_host") > 0, "the attempt on the host was not counted");
    assert!(counted("mesh_unsolicited") > 0, "the attempt through the host was not counted");

    // Host mode: each host's own replica; the host with none refuses at once.
    for (i, h) in c.hosts.iter().enumerate().take(3) {
        for _ in 0..3 {
            assert_eq!(get_in(outside.ns(), &at(h, 8081)), Some(format!("web{}", i + 1)), "host mode on {}", h.addr());
        }
    }
    let refused = Instant::now();
    assert_eq!(get_in(outside.ns(), &at(&c.hosts[3], 8081)), None, "host mode on a host with no replica");
    assert!(refused.elapsed() < Duration::from_secs(1), "refused, not left to time out");

    // `service rm`: every rule overlayd made goes, on the hosts and in the replicas; the
    // host that had joined the network only for the mesh leaves it; someone else's table stays.
    c.agents[0].json(&["service", "rm", "web"]).unwrap();
    wait_for(T, "the published ports to go from every host", || {
        c.hosts
            .iter()
            .all(|h| h.exec("nft", ["list", "tables"]).is_ok_and(|t| !t.contains("overlayd_published")))
            .then_some(())
    })
    .unwrap();
    wait_for(T, "the replicas' mesh rules to go", || {
        replicas
            .iter()
            .all(|r| {
                r.node.exec("nft", ["list", "tables"]).is_ok_and(|t| !t.contains("overlayd_mesh"))
                    && r.node.exec("ip", ["rule"]).is_ok_and(|t| !t.contains("0x6f6d"))
            })
            .then_some(())
    })
    .unwrap();
    wait_for(T, "host 4 to leave the network it joined for the mesh", || {
        c.hosts[3].exec("ip", ["link", "show", "ovm-front"]).is_err().then_some(())
    })
    .unwrap();
    for h in &c.hosts {
        assert!(get_in(outside.ns(), &at(h, 8080)).is_none(), "{} still publishes 8080", h.addr());
        let tables = h.exec("nft", ["list", "tables"]).unwrap();
        assert!(tables.contains("someone_else"), "a table overlayd did not make went: {tables}");
    }
    assert!(c.hosts[0].exec("ip", ["link", "show", "ovm-front"]).is_ok(), "a host with a container keeps the network");
}

fn hold_maybe(client: &Ct, to: Ipv4Addr) -> Option<()> {
    let ns = client.node.ns().to_owned();
    testbed::netns::within(&ns, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((to, 9000)), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(())
    })
    .ok()
}

/// Replicas from the runtimes: a podman container whose CNI configuration names the service
/// (`"service": "web"`) and a Docker container labelled `io.overlayd.service=web`, on two
/// hosts; an `overlayd attach` client and a Docker client reach both through the VIP.
#[test]
fn podman_and_docker_containers_are_replicas_and_docker_clients_reach_the_vip() {
    let _alone = TIMED.lock().unwrap_or_else(|p| p.into_inner());
    let bed = bed();
    // The hosts' resolver, as their resolv.conf would name it (dockerd's --dns for its
    // containers): no server answers there, overlayd answers the queries containers send it.
    let resolver = Ipv4Addr::new(198, 18, 255, 53);
    std::fs::write(bed.upstreams_file(), format!("nameserver {resolver}\n")).unwrap();
    let c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    let docker = testbed::dockerd::Dockerd::start_with_dns(&c.hosts[0], false, &[resolver]).expect("dockerd on host 1");
    let plugin = c.hosts[0].ns().to_owned();
    docker.docker(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "front"]).expect("docker network");
    wait_for(T, "front on host 2", || c.agents[1].json(&["network", "inspect", "front"]).ok()).unwrap();
    c.agents[0].json(&["service", "create", "web", "--network", "front", "--port", "80/tcp"]).unwrap();
    let podman = testbed::runtimes::Podman::new(&c.hosts[1], &c.agents[1], "front").expect("podman on host 2");
    podman
        .write_conflist(
            &serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "front",
                "plugins": [{ "type": "overlayd", "network": "front", "service": "web" }],
            })
            .to_string(),
        )
        .unwrap();
    let serve = |name: &str| {
        format!("mkdir -p /tmp/{name} && echo {name} > /tmp/{name}/index.html && httpd -p 80 -h /tmp/{name}")
    };
    podman.run("pod1", &[]).expect("podman run");
    podman.exec("pod1", &["sh", "-c", &serve("pod1")]).expect("httpd in pod1");
    docker.run("dock1", "front", &["--label", "io.overlayd.service=web"]).expect("docker run dock1");
    docker.docker(&["exec", "dock1", "sh", "-c", &serve("dock1")]).expect("httpd in dock1");
    docker.run("dock2", "front", &[]).expect("docker run dock2");
    wait_for(T, "two replicas on both hosts", || {
        c.agents.iter().all(|a| service(a, "web")["replicas"].as_array().is_some_and(|r| r.len() == 2)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", service(&c.agents[1], "web")));
    let client = attach(&c, 1, "front", "client", None);
    // The attach answers once the client's VIP table is in place: its first request must not
    // race the balancing loop (it did: 1 request in 20 failed under load).
    let table = std::process::Command::new("ip")
        .args(["netns", "exec", client.node.ns(), "nft", "list", "table", "ip", "overlayd_lb"])
        .output()
        .unwrap();
    assert!(table.status.success(), "no VIP table right after the attach: {}", String::from_utf8_lossy(&table.stderr));
    let seen = spread(&client, "http://web/", 20);
    eprintln!("20 requests from an attached client: {seen:?}");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["dock1", "pod1"], "{seen:?}");
    // A Docker container's namespace is known once Docker shows the container (its process's
    // /proc/PID/ns/net): its VIP table follows within a second or so.
    let from_dock2 = || {
        let out = docker.output(&["exec", "dock2", "wget", "-q", "-O", "-", "http://web/"]).unwrap();
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            eprintln!("dock2: {}", String::from_utf8_lossy(&out.stderr).trim());
            "FAILED".into()
        }
    };
    let t = Instant::now();
    wait_for(Duration::from_secs(60), "the VIP to answer dock2", || (from_dock2() != "FAILED").then_some(()))
        .unwrap_or_else(|e| {
            let eps = c.agents[0].json(&["network", "inspect", "front"]).unwrap()["endpoints"].clone();
            let out = docker.output(&["exec", "dock2", "wget", "-O", "-", "http://web/"]).unwrap();
            let log: Vec<String> =
                c.agents[0].log().lines().filter(|l| l.contains("WARN")).map(str::to_owned).collect();
            panic!("{e:#}: {eps}\n{out:?}\n{}", log.join("\n"))
        });
    eprintln!("dock2 reached the VIP {:?} after the wait began", t.elapsed());
    let mut from_docker: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..20 {
        *from_docker.entry(from_dock2()).or_default() += 1;
    }
    eprintln!("20 requests from a Docker client: {from_docker:?}");
    assert!(from_docker.contains_key("dock1") && from_docker.contains_key("pod1"), "{from_docker:?}");
}

/// Test 1's dnsrr half: the name answers the replicas, no VIP.
#[test]
fn a_dnsrr_service_answers_its_replicas() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "back"]).unwrap();
    let svc = c.agents[0]
        .json(&["service", "create", "db", "--network", "back", "--mode", "dnsrr", "--port", "5432/tcp"])
        .unwrap();
    assert_eq!(svc["vip"], serde_json::Value::Null, "a dnsrr service has no VIP: {svc}");
    let a = attach(&c, 0, "back", "db1", Some("db"));
    let b = attach(&c, 1, "back", "db2", Some("db"));
    let client = attach(&c, 1, "back", "app", None);
    let mut want = vec![a.ip.to_string(), b.ip.to_string()];
    want.sort();
    wait_for(T, "db to answer both replicas", || (dig(&client, &["db"]) == want).then_some(())).unwrap();
    assert_eq!(dig(&client, &["tasks.db"]), want);
    assert_eq!(dig(&client, &["_5432._tcp.db", "SRV"]), ["0 10 5432 db1.back.", "0 10 5432 db2.back."]);
    // Detached: gone from the name.
    c.agents[0].json(&["detach", "--name", "db1"]).unwrap();
    wait_for(T, "db1 to leave db", || (dig(&client, &["db"]) == [b.ip.to_string()]).then_some(())).unwrap();
}

/// Test 5: bad input gets a clear error and changes nothing.
#[test]
fn bad_services_are_refused_with_what_to_fix() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "front", "--subnet", "10.77.0.0/16"]).unwrap();
    c.agents[0].json(&["service", "create", "web", "--network", "front", "--publish", "8080:80"]).unwrap();
    // Host 1 leases its block (10.77.0.0/24) with its first container.
    attach(&c, 0, "front", "c0", None);
    let before = c.agents[0].json(&["service", "ls"]).unwrap();
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["service", "create"];
        all.extend(args);
        let e = c.agents[0].json(&all).expect_err("refused");
        let e = format!("{e:#}");
        assert!(e.contains(want), "{args:?}: {e}");
    };
    refused(&["api", "--network", "front", "--publish", "8080:81"], "already published by service \"web\"");
    refused(&["api", "--network", "front", "--publish", "9090:80", "--publish", "9090:81"], "published twice");
    refused(&["api", "--network", "nowhere"], "no network named \"nowhere\"");
    refused(&["api", "--network", "front", "--vip", "10.99.0.9"], "not a host address of network \"front\"");
    refused(&["api", "--network", "front", "--vip", "10.77.0.5"], "in the block 10.77.0.0/24 a host holds");
    refused(&["api", "--network", "front", "--health-http", "health"], "not an HTTP path");
    refused(&["api", "--network", "front", "--health-tcp", "80", "--health-timeout", "5s"], "--health-timeout");
    refused(&["api", "--network", "front", "--health-interval", "soon"], "not a duration");
    refused(&["api", "--network", "front", "--publish", "7947:80"], "overlayd's own");
    refused(&["Web_1", "--network", "front"], "not a valid service name");
    refused(&["web", "--network", "front"], "already exists");
    assert_eq!(c.agents[0].json(&["service", "ls"]).unwrap(), before, "nothing changed");
    // A replica of a service of another network, or of no service.
    c.agents[0].json(&["network", "create", "back"]).unwrap();
    let node = c.hosts[1].add_netns("stray").unwrap();
    let path = node.netns_path();
    let e = c.agents[1]
        .json(&["attach", "--network", "back", "--netns", &path, "--service", "web"])
        .expect_err("a replica on the wrong network");
    assert!(format!("{e:#}").contains("service \"web\" is on network \"front\""), "{e:#}");
    let e = c.agents[1]
        .json(&["attach", "--network", "back", "--netns", &path, "--service", "nope"])
        .expect_err("a replica of no service");
    assert!(format!("{e:#}").contains("no service named \"nope\""), "{e:#}");
    // A worker is told to ask a manager.
    let e = c.agents[1].json(&["service", "create", "x", "--network", "front"]).expect_err("a worker");
    assert!(format!("{e:#}").contains("manager"), "{e:#}");
    // Removed: gone everywhere; again: not found.
    c.agents[0].json(&["service", "rm", "web"]).unwrap();
    wait_for(T, "web to go on host 2", || {
        c.agents[1].json(&["service", "ls"]).ok().filter(|v| v["services"].as_array().is_none_or(Vec::is_empty))
    })
    .unwrap();
    let e = c.agents[0].json(&["service", "rm", "web"]).expect_err("twice");
    assert!(format!("{e:#}").contains("no service named \"web\""), "{e:#}");
}
