//! overlayd as Docker's network and IPAM driver (issue 13, item 2), with a real dockerd
//! (`docker.io`) in a host namespace of a real cluster:
//! - `docker network create -d overlayd --ipam-driver overlayd web` makes the overlayd network
//!   `web` with the cluster's address plan (every host sees it); `docker run --network web`
//!   gives the container an address of its host's block and the network's gateway, it pings a
//!   podman container on the other host (and back), every host lists it by its Docker name, `docker rm -f`
//!   withdraws it everywhere; `--ip` works within the block and is refused outside it;
//! - an overlayd network made with `overlayd network create` appears in Docker, and goes when
//!   it is removed;
//! - dockerd and overlayd restarted: the running container keeps its address and the next
//!   `docker run` gets a free one;
//! - bad requests (wrong field types, unknown calls, no overlayd IPAM) get Docker's error
//!   format and leave nothing behind.
//!
//! These tests need root and `docker.io`. They fail, never skip, when they cannot run.

#![allow(clippy::print_stderr)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::dockerd::Dockerd;
use testbed::measure::wait_for;
use testbed::runtimes::Podman;
use testbed::{Agent, Options, Testbed};

const T: Duration = Duration::from_secs(20);

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// The names of the endpoints `agent` lists on `network`.
fn listed(agent: &Agent, network: &str) -> Vec<(String, String)> {
    let v = agent.json(&["network", "inspect", network]).expect("network inspect");
    v["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (e["name"].as_str().unwrap_or_default().to_owned(), e["ip"].as_str().unwrap_or_default().to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn block_of(agent: &Agent, network: &str, host: &str) -> String {
    let v = agent.json(&["network", "inspect", network]).expect("network inspect");
    v["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["node_name"] == host))
        .and_then(|p| p["block"].as_str())
        .unwrap_or_else(|| panic!("{host} has no block of {network}: {v}"))
        .to_owned()
}

fn in_block(ip: Ipv4Addr, block: &str) -> bool {
    let (base, len) = block.split_once('/').unwrap();
    let (base, len): (Ipv4Addr, u32) = (base.parse().unwrap(), len.parse().unwrap());
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(base) & mask
}

/// One raw request to a plugin socket: the status and the JSON answer.
fn plugin_call(socket: &Path, call: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("cannot reach {}: {e}", socket.display()));
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "POST /{call} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn plugin_socket(ns: &str) -> std::path::PathBuf {
    Path::new("/run/docker/plugins").join(format!("{ns}.sock"))
}

/// The `gso_max_size` of `eth0` in process `pid`'s network namespace.
fn gso_max_size(pid: &str) -> Option<u32> {
    let out = std::process::Command::new("nsenter")
        .args([&format!("--net=/proc/{pid}/ns/net"), "ip", "-d", "-o", "link", "show", "dev", "eth0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().skip_while(|w| *w != "gso_max_size").nth(1)?.parse().ok()
}

#[test]
fn docker_containers_join_the_overlay_reach_the_other_host_and_leave_it() {
    let bed = bed();
    let mut c = Cluster::form(&bed, 1, 1).expect("cluster");
    let mut docker = Dockerd::start(&c.hosts[0], true).expect("dockerd");
    let plugin = c.hosts[0].ns().to_owned();

    // Made from Docker: an overlayd network of the same name, with the cluster's plan.
    let started = Instant::now();
    docker
        .docker(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "web"])
        .expect("docker network create");
    let made =
        wait_for(T, "the overlayd network web", || c.agents[1].json(&["network", "inspect", "web"]).ok().map(|_| true))
            .unwrap();
    assert!(made, "web is not an overlayd network on the other host");
    eprintln!("docker network create → overlayd network on every host: {:?}", started.elapsed());

    // --internal reaches overlayd: no way out of that network.
    docker
        .docker(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "--internal", "priv"])
        .expect("docker network create --internal");
    let internal = wait_for(T, "the overlayd network priv", || {
        c.agents[0].json(&["network", "inspect", "priv"]).ok().map(|v| v["network"]["internal"] == true)
    })
    .unwrap();
    assert!(internal, "{}", c.agents[0].json(&["network", "inspect", "priv"]).unwrap());

    // A podman container on the other host (overlayd as its CNI plugin).
    let podman = Podman::new(&c.hosts[1], &c.agents[1], "web").expect("podman on host 1");
    podman.run("peer", &[]).expect("podman run");
    let peer_ip = podman.ip("peer").unwrap();

    let started = Instant::now();
    let id = docker.run("c1", "web", &[]).expect("docker run");
    let ip = docker.ip("c1", "web").unwrap();
    let block = block_of(&c.agents[0], "web", c.hosts[0].name());
    assert!(in_block(ip, &block), "{ip} is not in host 0's block {block}");
    let out = docker.docker(&["exec", "c1", "ping", "-c", "1", "-W", "5", &peer_ip.to_string()]);
    eprintln!("docker run → first ping across hosts: {:?}", started.elapsed());
    out.expect("c1 pings the container on the other host");
    podman.exec("peer", &["ping", "-c", "1", "-W", "5", &ip.to_string()]).expect("the podman container pings c1");
    // Its gateway is the network's: no docker_gwbridge, no second interface.
    let routes = docker.docker(&["exec", "c1", "ip", "route"]).unwrap();
    let gw = c.agents[0].json(&["network", "inspect", "web"]).unwrap()["network"]["gateway"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(routes.contains(&format!("default via {gw}")), "c1's routes: {routes}");
    assert!(!docker.docker(&["network", "ls"]).unwrap().contains("docker_gwbridge"));
    // Its TCP super-frames leave in one GSO send each (44 segments at MTU 1450), as the CNI
    // container's do.
    let pid = docker.docker(&["inspect", "-f", "{{.State.Pid}}", "c1"]).unwrap();
    assert_eq!(gso_max_size(pid.trim()), Some(44 * 1398 + 321), "c1's eth0");
    let pid = podman.podman(&["inspect", "-f", "{{.State.Pid}}", "peer"]).unwrap();
    assert_eq!(gso_max_size(pid.trim()), Some(44 * 1398 + 321), "the podman container's eth0");
    // Listed by its Docker name on every host.
    let named = wait_for(T, "c1 listed by name on host 1", || {
        listed(&c.agents[1], "web").iter().any(|(n, i)| n == "c1" && *i == ip.to_string()).then_some(true)
    })
    .unwrap();
    assert!(named, "host 1 lists {:?}", listed(&c.agents[1], "web"));

    // docker rm -f: withdrawn on every host, its address free again.
    let started = Instant::now();
    docker.docker(&["rm", "-f", &id]).unwrap();
    let gone = wait_for(T, "c1 withdrawn on host 1", || {
        (!listed(&c.agents[1], "web").iter().any(|(n, _)| n == "c1")).then_some(true)
    })
    .unwrap();
    assert!(gone, "c1 still listed: {:?}", listed(&c.agents[1], "web"));
    eprintln!("docker rm -f → withdrawn on the other host: {:?}", started.elapsed());
    assert!(
        podman.exec("peer", &["ping", "-c", "1", "-W", "1", &ip.to_string()]).is_err(),
        "c1's address still answers"
    );

    // An overlayd network appears in Docker (with its subnet, so --ip works there: Docker
    // takes --ip only on networks with a configured subnet), and goes when it is removed.
    let in_docker = |name: &str| {
        docker
            .docker(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"])
            .map(|l| l.lines().any(|l| l == format!("{name} {plugin}")))
            .unwrap_or(false)
    };
    for net in ["blue", "green"] {
        c.agents[0].json(&["network", "create", net]).expect("network create");
        let shown = wait_for(T, "the network in Docker", || in_docker(net).then_some(true)).unwrap();
        assert!(shown, "{net}: {}", docker.docker(&["network", "ls"]).unwrap());
    }
    c.agents[0].json(&["network", "rm", "green"]).expect("network rm green");
    let taken_out = wait_for(T, "green out of Docker", || (!in_docker("green")).then_some(true)).unwrap();
    assert!(taken_out, "{}", docker.docker(&["network", "ls"]).unwrap());
    let (peer, _) = c.attach(1, "blue", "peer2").expect("attach on host 1");
    docker.run("b1", "blue", &[]).expect("docker run on a network overlayd made");
    let block = block_of(&c.agents[0], "blue", c.hosts[0].name());

    // --ip within the block works; outside it, Docker says why.
    let wanted = {
        let (base, _) = block.split_once('/').unwrap();
        Ipv4Addr::from(u32::from(base.parse::<Ipv4Addr>().unwrap()) + 9)
    };
    docker.run("c2", "blue", &["--ip", &wanted.to_string()]).expect("docker run --ip within the block");
    assert_eq!(docker.ip("c2", "blue").unwrap(), wanted);
    let other_block = block_of(&c.agents[0], "blue", c.hosts[1].name());
    let outside = Ipv4Addr::from(u32::from(other_block.split_once('/').unwrap().0.parse::<Ipv4Addr>().unwrap()) + 9);
    let refused = docker
        .output(&[
            "run",
            "-d",
            "--name",
            "c3",
            "--network",
            "blue",
            "--ip",
            &outside.to_string(),
            testbed::dockerd::IMAGE,
            "/bin/sleep",
            "60",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("block"), "--ip {outside} outside the block: {err}");
    let _ = docker.output(&["rm", "-f", "c3"]);

    // Restarts: c2 keeps its address (live-restore), the next container gets another.
    c.agents[0].terminate().expect("stop overlayd");
    c.agents[0] = c.hosts[0].start_daemon::<&str>(&[]).expect("overlayd again");
    docker.restart().expect("dockerd again");
    assert_eq!(docker.ip("c2", "blue").unwrap(), wanted, "c2 lost its address");
    peer.ping_ok(IpAddr::V4(wanted), 2).expect("c2 still answers across hosts");
    docker.run("c4", "blue", &[]).expect("docker run after the restarts");
    let fresh = docker.ip("c4", "blue").unwrap();
    let b1 = docker.ip("b1", "blue").unwrap();
    assert!(fresh != wanted && fresh != b1, "c4 got an address in use: {fresh}");
    assert!(in_block(fresh, &block));
    peer.ping_ok(IpAddr::V4(fresh), 2).expect("c4 answers across hosts");
    let ips: Vec<String> = listed(&c.agents[0], "blue").into_iter().map(|(_, i)| i).collect();
    assert!(ips.contains(&wanted.to_string()) && ips.contains(&fresh.to_string()), "{ips:?}");
}

#[test]
fn docker_requests_that_are_wrong_get_docker_errors_and_leave_nothing() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 0).expect("cluster");
    let docker = Dockerd::start(&c.hosts[0], false).expect("dockerd");
    let plugin = c.hosts[0].ns().to_owned();
    let socket = plugin_socket(&plugin);
    c.agents[0].json(&["network", "create", "web"]).expect("network create");

    // Fields of the wrong type, a body that is no JSON, an unknown call: Docker's error form.
    for (call, body, want) in [
        ("NetworkDriver.Join", r#"{"NetworkID": 7, "EndpointID": "e", "SandboxKey": "/x"}"#, 400),
        ("NetworkDriver.CreateEndpoint", r#"{"NetworkID": "n", "EndpointID": ["e"]}"#, 400),
        ("IpamDriver.RequestAddress", "not json", 400),
        ("IpamDriver.RequestPool", r#"{"Pool": "10.300.0.0/16"}"#, 500),
        ("IpamDriver.RequestPool", r#"{"V6": true}"#, 500),
        ("NetworkDriver.Join", r#"{"NetworkID": "n", "EndpointID": "unknown", "SandboxKey": "/nonexistent"}"#, 500),
        ("NetworkDriver.Frobnicate", "{}", 404),
    ] {
        let (status, v) = plugin_call(&socket, call, body);
        assert_eq!(status, want, "{call} {body}: {v}");
        let err = v["Err"].as_str().unwrap_or_default();
        assert!(!err.is_empty(), "{call} {body}: no Err in {v}");
        eprintln!("{call} {body} → {status} {err}");
    }
    // An endpoint whose address is not this host's (a Docker that lost its state, say): the
    // join is refused, nothing is attached, and the address Docker holds is given back.
    let (s, pool) = plugin_call(&socket, "IpamDriver.RequestPool", r#"{"Options": {"network": "web"}}"#);
    assert_eq!(s, 200, "{pool}");
    let pool_id = pool["PoolID"].as_str().unwrap().to_owned();
    let (s, addr) = plugin_call(&socket, "IpamDriver.RequestAddress", &format!(r#"{{"PoolID": "{pool_id}"}}"#));
    assert_eq!(s, 200, "{addr}");
    let address = addr["Address"].as_str().unwrap().to_owned();
    let net = format!(r#"{{"NetworkID": "n1", "IPv4Data": [{{"AddressSpace": "overlayd", "Pool": "{pool_id}"}}]}}"#);
    assert_eq!(plugin_call(&socket, "NetworkDriver.CreateNetwork", &net).0, 200);
    let ep = format!(r#"{{"NetworkID": "n1", "EndpointID": "e1", "Interface": {{"Address": "{address}"}}}}"#);
    let (s, v) = plugin_call(&socket, "NetworkDriver.CreateEndpoint", &ep);
    assert_eq!(s, 200, "{v}");
    assert!(v["Interface"]["MacAddress"].as_str().is_some_and(|m| m.starts_with("02:4f:")), "{v}");
    let (base, _) = pool_id.split_once('/').unwrap();
    let foreign = Ipv4Addr::from(u32::from(base.parse::<Ipv4Addr>().unwrap()) + 0xfe05);
    let ep = format!(r#"{{"NetworkID": "n1", "EndpointID": "e2", "Interface": {{"Address": "{foreign}/16"}}}}"#);
    assert_eq!(plugin_call(&socket, "NetworkDriver.CreateEndpoint", &ep).0, 200);
    let (s, v) = plugin_call(
        &socket,
        "NetworkDriver.Join",
        r#"{"NetworkID": "n1", "EndpointID": "e2", "SandboxKey": "/run/docker/netns/0123456789ab"}"#,
    );
    assert_eq!(s, 500, "{v}");
    assert!(v["Err"].as_str().unwrap().contains("block"), "{v}");
    assert!(listed(&c.agents[0], "web").is_empty(), "a failed join left an endpoint");
    let veths = c.hosts[0].exec("ip", ["-o", "link", "show"]).unwrap();
    assert!(!veths.contains("ovl"), "a failed join left a veth: {veths}");
    for _ in 0..2 {
        for e in ["e1", "e2"] {
            let body = format!(r#"{{"NetworkID": "n1", "EndpointID": "{e}"}}"#);
            assert_eq!(plugin_call(&socket, "NetworkDriver.DeleteEndpoint", &body).0, 200, "twice is fine");
        }
    }
    let release = format!(r#"{{"PoolID": "{pool_id}", "Address": "{address}"}}"#);
    assert_eq!(plugin_call(&socket, "IpamDriver.ReleaseAddress", &release).0, 200);
    let store: Value =
        serde_json::from_slice(&std::fs::read(c.agents[0].state_dir().join("endpoints.json")).unwrap()).unwrap();
    assert!(store["reserved"].as_array().is_none_or(|r| r.is_empty()), "an address is still reserved: {store}");

    // A network with Docker's own IPAM: refused with what to add.
    let out = docker.output(&["network", "create", "-d", &plugin, "plain"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--ipam-driver"), "{err}");
    // A --subnet inside an overlayd network's for another network: refused.
    let web = c.agents[0].json(&["network", "inspect", "web"]).unwrap();
    let subnet = web["network"]["subnet"].as_str().unwrap().to_owned();
    let (base, _) = subnet.split_once('/').unwrap();
    let inner = format!("{base}/24");
    let out = docker
        .output(&["network", "create", "-d", &plugin, "--ipam-driver", &plugin, "--subnet", &inner, "clash"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("overlaps"), "{err}");
}
