//! overlayd with real container runtimes (issue 13, tests 1, 2, 4 and the CNI part of 6), on a
//! two-host cluster of real daemons:
//! - podman (CNI backend, runc, a busybox `--rootfs`), inside each host's namespace, its CNI
//!   configuration pointing at that host's daemon: containers on two hosts ping each other, are
//!   listed by name on both, and `podman stop` withdraws one everywhere; a second ADD for a
//!   container fails as the spec says, and DEL twice succeeds;
//! - containerd's `ctr run --cni`: a container joins, pings a podman container on the other
//!   host, and is withdrawn when its task exits (ctr's DEL comes with an empty `CNI_NETNS`);
//! - a namespace attached with `overlayd attach --pid` is withdrawn on every host within 2 s of
//!   its process being killed;
//! - the plugin called directly with bad input (malformed JSON, an unknown network, no daemon,
//!   a namespace that does not exist, an address outside the host's block) answers with the
//!   spec's error object and code, exits non-zero, and leaves nothing behind.
//! - GC for one conflist on an overlayd network that another conflist shares detaches only
//!   the first conflist's containers.
//!
//! These tests need root and the runtimes (`scripts/install-deps` installs them). They fail,
//! never skip, when they cannot run. Timings they print (with --nocapture) are indications.
#![allow(clippy::print_stderr)]

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::runtimes::{CniOutcome, Containerd, Podman, cni_call};
use testbed::{Agent, Host, Options, Testbed};

const T: Duration = Duration::from_secs(20);
/// How long an endpoint whose container went may stay listed on any host.
const WITHDRAW_BOUND: Duration = Duration::from_secs(2);
const OVERLAYD: &str = env!("CARGO_BIN_EXE_overlayd");

fn bed() -> Testbed {
    Testbed::new(Options::new(OVERLAYD)).expect("cannot build the testbed (run as root)")
}

/// A cluster of a manager and `workers` workers, all ready, with the network `web`.
fn cluster(bed: &Testbed, workers: usize) -> Cluster {
    let c = Cluster::form(bed, 1, workers).expect("cannot form the cluster");
    c.await_nodes(1 + workers, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    c
}

/// The endpoints of `web` as `network inspect` on `agent` lists them: (name, address).
fn listed(agent: &Agent) -> Vec<(String, Ipv4Addr)> {
    let inspect = agent.json(&["network", "inspect", "web"]).unwrap();
    inspect["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("network inspect printed no endpoints: {inspect}"))
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["ip"].as_str().unwrap().parse().unwrap()))
        .collect()
}

/// Waits until every agent lists `name` at `ip`.
fn await_listed(c: &Cluster, name: &str, ip: Ipv4Addr) {
    for (i, a) in c.agents.iter().enumerate() {
        wait_for(T, &format!("{name} ({ip}) in network inspect on {}", c.hosts[i].name()), || {
            listed(a).contains(&(name.to_owned(), ip)).then_some(())
        })
        .unwrap();
    }
}

/// Waits until no agent lists `name`; how long that took from `since`, on the slowest host.
fn await_withdrawn(c: &Cluster, name: &str, since: Instant) -> Duration {
    let mut pending: Vec<usize> = (0..c.agents.len()).collect();
    let mut slowest = Duration::ZERO;
    wait_for(T, &format!("{name} to be withdrawn on every host"), || {
        pending.retain(|&i| {
            let still = listed(&c.agents[i]).iter().any(|(n, _)| n == name);
            if !still {
                slowest = slowest.max(since.elapsed());
            }
            still
        });
        pending.is_empty().then_some(())
    })
    .unwrap();
    slowest
}

/// The endpoint veths (`ovl…`) in a host's namespace.
fn ovl_veths(host: &Host) -> Vec<String> {
    host.exec("ip", ["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("ovl"))
        .collect()
}

/// The network configuration a runtime passes the plugin for the conflist `web`.
fn conf(network: &str) -> Vec<u8> {
    json!({ "cniVersion": "1.0.0", "name": network, "type": "overlayd", "network": network }).to_string().into_bytes()
}

/// Checks a failed plugin call: non-zero exit, the spec's error object with `code` on stdout.
fn spec_error(out: &CniOutcome, code: u64, case: &str) -> Value {
    assert!(!out.status.success(), "{case}: the plugin succeeded: {out:?}");
    let e = out.json().unwrap_or_else(|e| panic!("{case}: {e:#}"));
    eprintln!("{case}: exit {}, {e}", out.status);
    assert_eq!(e["code"].as_u64(), Some(code), "{case}: {e}");
    assert!(e["cniVersion"].is_string(), "{case}: no cniVersion: {e}");
    assert!(e["msg"].as_str().is_some_and(|m| !m.is_empty()), "{case}: no msg: {e}");
    assert!(e.get("details").is_none_or(Value::is_string), "{case}: {e}");
    e
}

/// A process in a network namespace of its own (`unshare --net sleep`), killed when dropped.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Sleeper {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "sleep", "600"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the sleeper dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot run unshare (util-linux)");
        // unshare execs sleep in the new namespace: wait until it has.
        let pid = child.id();
        wait_for(Duration::from_secs(5), "unshare to enter its namespace", || {
            let mine = std::fs::read_link("/proc/self/ns/net").ok()?;
            let its = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            (mine != its).then_some(())
        })
        .unwrap();
        Sleeper(child)
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn podman_containers_on_two_hosts_reach_each_other_and_are_withdrawn_when_stopped() {
    let bed = bed();
    let c = cluster(&bed, 1);
    let p1 = Podman::new(&c.hosts[0], &c.agents[0], "web").unwrap();
    let p2 = Podman::new(&c.hosts[1], &c.agents[1], "web").unwrap();
    // The second host's conflist asks for podman's network aliases.
    let with_aliases = json!({ "cniVersion": "1.0.0", "name": "web",
        "plugins": [{ "type": "overlayd", "network": "web", "capabilities": { "aliases": true } }] });
    p2.write_conflist(&with_aliases.to_string()).unwrap();
    p1.run("web1", &[]).unwrap();
    let ip1 = p1.ip("web1").unwrap();
    // From `podman run` on the second host to its first ping answered from the first host.
    let started = Instant::now();
    p2.run("web2", &["--network-alias", "db"]).unwrap();
    let ran = started.elapsed();
    wait_for(T, "a first ping from web2 to web1", || {
        p2.exec("web2", &["ping", "-c", "1", "-W", "1", &ip1.to_string()]).ok()
    })
    .unwrap();
    eprintln!("podman run -> first ping across hosts: {:?} (podman run itself: {ran:?})", started.elapsed());
    let ip2 = p2.ip("web2").unwrap();
    let id2 = p2.id("web2").unwrap();
    assert_ne!(ip1, ip2);
    p1.exec("web1", &["ping", "-c", "3", "-W", "1", &ip2.to_string()]).unwrap();
    p2.exec("web2", &["ping", "-c", "3", "-W", "1", &ip1.to_string()]).unwrap();
    // Both hosts list both containers by the names podman gave them.
    await_listed(&c, "web1", ip1);
    await_listed(&c, "web2", ip2);
    let own = c.agents[1].json(&["network", "inspect", "web"]).unwrap();
    let web2 = own["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "web2").unwrap();
    assert!(web2["aliases"].as_array().unwrap().contains(&json!("db")), "podman's alias reached the endpoint: {web2}");

    // A second ADD for a container that has its interface: the spec's error, nothing changed.
    let id1 = p1.id("web1").unwrap();
    let netns1 = p1.netns("web1").unwrap();
    let state1 = c.agents[0].state_dir().to_string_lossy().into_owned();
    let cni = |verb: &str, netns: &str| {
        let vars = [
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", id1.as_str()),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", p1.plugin().parent().unwrap().to_str().unwrap()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web1"),
            ("OVERLAYD_STATE_DIR", state1.as_str()),
        ];
        cni_call(p1.plugin(), &vars, &conf("web")).unwrap()
    };
    let again = cni("ADD", &netns1);
    let e = spec_error(&again, 101, "a second ADD");
    assert!(e["msg"].as_str().unwrap().contains("already attached"), "{e}");
    assert_eq!(listed(&c.agents[0]).iter().filter(|(n, _)| n == "web1").count(), 1);
    p2.exec("web2", &["ping", "-c", "1", "-W", "1", &ip1.to_string()]).unwrap();

    // podman stop: the endpoint goes on its host and, through gossip, on the other.
    let stopped = Instant::now();
    p2.podman(&["stop", "--time", "0", "web2"]).unwrap();
    let took = await_withdrawn(&c, "web2", stopped);
    eprintln!("podman stop -> withdrawn on every host: {took:?}");
    assert!(took <= WITHDRAW_BOUND, "web2 was listed {took:?} after podman stop began");
    p2.podman(&["rm", "web2"]).unwrap();
    // podman's own DEL reached the daemon (its cleanup runs in a process of conmon's, without
    // the environment of the `podman` command): libcni drops its cached result only then.
    let cached = Path::new("/var/lib/cni/results").join(format!("web-{id2}-eth0"));
    assert!(!cached.exists(), "podman's DEL failed: libcni kept {}", cached.display());
    assert_eq!(ovl_veths(&c.hosts[1]), Vec::<String>::new(), "a veth of web2 stayed on h2");

    // DEL twice (here by hand, as a runtime retrying would): both succeed, silently; then
    // podman's own DEL at rm is a third.
    for n in 1..=2 {
        let del = cni("DEL", &netns1);
        assert!(del.status.success(), "DEL number {n} failed: {del:?}");
        assert_eq!(del.json().unwrap(), Value::Null, "DEL prints nothing: {del:?}");
    }
    await_withdrawn(&c, "web1", Instant::now());
    p1.podman(&["rm", "--force", "--time", "0", "web1"]).unwrap();
    assert_eq!(ovl_veths(&c.hosts[0]), Vec::<String>::new(), "a veth of web1 stayed on h1");
    // Nothing is left on the network: both blocks are given back.
    wait_for(T, "the blocks to be given back", || {
        let inspect = c.agents[0].json(&["network", "inspect", "web"]).ok()?;
        inspect["peers"].as_array().is_none_or(Vec::is_empty).then_some(())
    })
    .unwrap();
}

#[test]
fn a_ctr_run_cni_container_joins_pings_across_hosts_and_is_withdrawn_when_its_task_exits() {
    let bed = bed();
    let c = cluster(&bed, 1);
    let podman = Podman::new(&c.hosts[0], &c.agents[0], "web").unwrap();
    podman.run("target", &[]).unwrap();
    let target = podman.ip("target").unwrap();
    let ctr = Containerd::start(&c.hosts[1], &c.agents[1], "web").unwrap();
    // PID 1 of the container leaves on SIGTERM, so that `ctr run` ends as it does for a user.
    let pid1 = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"];
    // Its address as its host lists it (ctr's exec may lose a short output).
    let ip_of = |id: &str| -> Ipv4Addr {
        let name = Containerd::cni_container_id(id);
        wait_for(T, &format!("{name} on h2"), || listed(&c.agents[1]).into_iter().find(|(n, _)| *n == name)).unwrap().1
    };
    // Two containers whose names (ctr gives `<namespace>-<id>`) differ only past 12 characters.
    ctr.run_cni("worker-1", &pid1).unwrap();
    ctr.run_cni("worker-2", &pid1).unwrap();
    let (name, other) = (Containerd::cni_container_id("worker-1"), Containerd::cni_container_id("worker-2"));
    let (ip, other_ip) = (ip_of("worker-1"), ip_of("worker-2"));
    ctr.exec("worker-1", &["ping", "-c", "3", "-W", "1", &target.to_string()]).unwrap();
    ctr.exec("worker-2", &["ping", "-c", "1", "-W", "1", &ip.to_string()]).unwrap();
    await_listed(&c, &name, ip);
    await_listed(&c, &other, other_ip);

    // The task exits: ctr tears the network down (DEL with an empty CNI_NETNS) and succeeds.
    let stopped = Instant::now();
    ctr.kill("worker-1", "SIGTERM").unwrap();
    let took = await_withdrawn(&c, &name, stopped);
    let exit = ctr.wait_run("worker-1", T).unwrap();
    eprintln!("ctr task exit -> withdrawn on every host: {took:?}");
    assert!(exit.success(), "ctr run failed at the end ({exit}): {}", ctr.run_output("worker-1"));
    assert!(took <= WITHDRAW_BOUND, "listed {took:?} after the task was told to exit");
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 1, "a veth of worker-1 stayed on h2");
    // The others are still there.
    let left = listed(&c.agents[0]);
    assert!(left.contains(&("target".into(), target)) && left.contains(&(other, other_ip)), "{left:?}");
}

#[test]
fn an_attach_by_pid_is_withdrawn_everywhere_within_2s_of_its_process_dying() {
    let bed = bed();
    let c = cluster(&bed, 1);
    let victim = Sleeper::start();
    let pid = victim.0.id().to_string();
    let ep = c.agents[0].json(&["attach", "--network", "web", "--pid", &pid, "--name", "victim"]).unwrap();
    let ip: Ipv4Addr = ep["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{ep}"));
    let (peer, _) = c.attach(1, "web", "peer").unwrap();
    peer.ping_ok(ip.into(), 1).unwrap();
    await_listed(&c, "victim", ip);

    let mut victim = victim;
    let killed = Instant::now();
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    let took = await_withdrawn(&c, "victim", killed);
    eprintln!("attach --pid: process killed -> withdrawn on every host: {took:?}");
    assert!(took <= WITHDRAW_BOUND, "the endpoint of a dead process was listed for {took:?}");
    assert_eq!(ovl_veths(&c.hosts[0]), Vec::<String>::new());
    // Its address went back to the block: the next attach on that host gets it.
    let (_, again) = c.attach(0, "web", "next").unwrap();
    assert_eq!(again, std::net::IpAddr::V4(ip));
}

/// A socket the test process makes inside the network namespace at `path`: while it is open,
/// the kernel cannot tear that namespace down (nor delete the veth in it), though no process
/// is in it and nothing names it — as when the kernel is slow to get to a namespace it must free.
fn socket_in_netns(path: &str) -> std::net::UdpSocket {
    let ns = std::fs::File::open(path).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns with an open namespace fd; it moves only this thread, which ends here.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        std::net::UdpSocket::bind("0.0.0.0:0").unwrap()
    })
    .join()
    .unwrap()
}

/// A namespace name (as `ip netns attach` or a runtime's bind mount makes) that goes when
/// dropped.
struct Named(String);

impl Named {
    fn of(bed: &Testbed, what: &str, pid: u32) -> Named {
        let name = format!("{}-{what}", bed.prefix());
        let out = Command::new("ip").args(["netns", "attach", &name, &pid.to_string()]).output().unwrap();
        assert!(out.status.success(), "ip netns attach: {}", String::from_utf8_lossy(&out.stderr));
        Named(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        testbed::netns::delete(&self.0);
    }
}

/// An attached container follows what makes it a container — its process (`--pid`), its
/// namespace's name (`--netns`) — not the kernel's teardown of its namespace: each time, the
/// namespace is kept alive by a socket (as when the kernel is slow to free it; its veth stays),
/// and the endpoint still goes at once. A namespace that something else still holds is still
/// a container, and keeps its endpoint until that goes too.
#[test]
fn an_attached_container_follows_its_process_or_name_not_the_teardown_of_its_namespace() {
    let bed = bed();
    let c = cluster(&bed, 0);
    let attach = |name: &str, how: &str, what: &str| -> Ipv4Addr {
        let ep = c.agents[0].json(&["attach", "--network", "web", how, what, "--name", name]).unwrap();
        ep["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{ep}"))
    };
    let check = |name: &str, since: Instant, bound: Duration, how: &str| {
        let took = await_withdrawn(&c, name, since);
        eprintln!("{how} -> withdrawn in {took:?}");
        assert!(took <= bound, "{how}: listed for {took:?}");
        assert_eq!(ovl_veths(&c.hosts[0]), Vec::<String>::new(), "{how}: its veth was not removed");
    };

    // By process: it dies.
    let mut p = Sleeper::start();
    let pid = p.0.id();
    attach("by-pid", "--pid", &pid.to_string());
    let socket = socket_in_netns(&format!("/proc/{pid}/ns/net"));
    let t = Instant::now();
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    check("by-pid", t, WITHDRAW_BOUND, "attach --pid, process killed");
    drop(socket);

    // The process in a named namespace dies: the name keeps the container, and its endpoint;
    // then the name goes (the namespace again kept alive by a socket), and so does the endpoint.
    let outlive_then_unname = |mut p: Sleeper, named: Named, name: &str, ip: Ipv4Addr, bound: Duration, how: &str| {
        p.0.kill().unwrap();
        p.0.wait().unwrap();
        std::thread::sleep(WITHDRAW_BOUND + Duration::from_secs(1));
        assert!(listed(&c.agents[0]).contains(&(name.into(), ip)), "{how}: withdrawn while its name holds it");
        let socket = socket_in_netns(&named.path());
        let t = Instant::now();
        drop(named);
        check(name, t, bound, how);
        drop(socket);
    };

    // By name.
    let p = Sleeper::start();
    let named = Named::of(&bed, "by-name", p.0.id());
    let ip = attach("by-name", "--netns", &named.path());
    outlive_then_unname(p, named, "by-name", ip, WITHDRAW_BOUND, "attach --netns, name deleted");

    // By process, and named too: a namespace that outlived its process is looked at again by
    // the sweep (5 s).
    let p = Sleeper::start();
    let ip = attach("both", "--pid", &p.0.id().to_string());
    let named = Named::of(&bed, "both", p.0.id());
    outlive_then_unname(
        p,
        named,
        "both",
        ip,
        Duration::from_secs(6),
        "attach --pid, process killed, then its name deleted",
    );
}

#[test]
fn bad_input_to_the_plugin_gets_the_specs_error_and_leaves_nothing_behind() {
    let bed = bed();
    let c = cluster(&bed, 0);
    let host = &c.hosts[0];
    let ns = host.add_netns("cni-bad").unwrap();
    let state = c.agents[0].state_dir().to_string_lossy().into_owned();
    let empty = bed.dir().join("no-daemon");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.to_string_lossy().into_owned();
    let missing = format!("/run/netns/{}-no-such-namespace", bed.prefix());
    assert!(!Path::new(&missing).exists());
    let path = ns.netns_path();
    let add = |netns: &str, args: &str, state: &str, stdin: &[u8]| {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "0123456789abcdef0123456789abcdef"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
            ("CNI_ARGS", args),
            ("OVERLAYD_STATE_DIR", state),
        ];
        cni_call(Path::new(OVERLAYD), &vars, stdin).unwrap()
    };
    spec_error(&add(&path, "", &state, b"{\"cniVersion\": \"1.0.0\", \"name\": "), 6, "malformed JSON");
    let e = spec_error(&add(&path, "", &state, &conf("nope")), 7, "an unknown network");
    assert!(e.to_string().contains("nope"), "the error names the network: {e}");
    let e = spec_error(&add(&path, "", &empty, &conf("web")), 5, "no daemon");
    let details = e["details"].as_str().unwrap_or_default();
    assert!(details.contains(&empty) && details.contains("OVERLAYD_STATE_DIR"), "where and why there: {e}");
    let e = spec_error(&add(&missing, "", &state, &conf("web")), 3, "a namespace that does not exist");
    assert!(e.to_string().contains("no-such-namespace"), "the error names the path: {e}");
    let e = spec_error(&add(&path, "IP=10.200.0.9", &state, &conf("web")), 7, "an address outside the block");
    assert!(e.to_string().contains("10.200.0.9"), "{e}");
    // A configuration that asks for encryption, on a plain network: refused, nothing attached.
    let sealed =
        json!({ "cniVersion": "1.0.0", "name": "web", "type": "overlayd", "network": "web", "encrypted": true });
    let e =
        spec_error(&add(&path, "", &state, sealed.to_string().as_bytes()), 7, "encryption asked of a plain network");
    assert!(e.to_string().contains("overlayd network create web --encrypted"), "{e}");
    // The interface exists already in the namespace (not overlayd's): ADD fails, as the spec says.
    let taken = host.add_netns("cni-taken").unwrap();
    taken.exec("ip", ["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]).unwrap();
    let out = add(&taken.netns_path(), "", &state, &conf("web"));
    assert!(!out.status.success() && out.json().unwrap()["code"].is_u64(), "an existing eth0: {out:?}");
    eprintln!("an existing eth0: exit {}, {}", out.status, out.stdout.trim());
    let left = taken.exec("ip", ["-o", "link"]).unwrap();
    assert_eq!(left.lines().count(), 3, "only lo, eth0 and its peer are left: {left}");

    // Nothing half-made: no endpoint, no veth on the host or in the namespace, no block leased.
    let inspect = c.agents[0].json(&["network", "inspect", "web"]).unwrap();
    let none = |v: &Value| v.as_array().is_none_or(Vec::is_empty);
    assert!(none(&inspect["endpoints"]), "{inspect}");
    assert!(none(&inspect["peers"]), "a failed ADD left this host's block leased: {inspect}");
    assert_eq!(ovl_veths(host), Vec::<String>::new());
    assert!(!ns.exec("ip", ["-o", "link"]).unwrap().contains("eth0"), "an eth0 was left in the namespace");
    // And the same ADD, well formed, works: the failures changed nothing that is in the way.
    let ok = add(&path, "", &state, &conf("web"));
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(ok.json().unwrap()["interfaces"][0]["name"], "eth0");
}

#[test]
fn gc_of_one_conflist_detaches_only_what_that_conflist_attached() {
    // Two conflists (one per service, as the README has it) on the one overlayd network `web`:
    // GC for the first, with no valid attachments, is about the first's containers only.
    let bed = bed();
    let c = cluster(&bed, 0);
    let state = c.agents[0].state_dir().to_string_lossy().into_owned();
    let conflist = |name: &str| {
        json!({ "cniVersion": "1.1.0", "name": name, "type": "overlayd", "network": "web" }).to_string().into_bytes()
    };
    let mut namespaces = Vec::new();
    for (id, list) in [("gc-scope-a", "web-a"), ("gc-scope-b", "web-b")] {
        let ns = c.hosts[0].add_netns(id).unwrap();
        let path = ns.netns_path();
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
            ("OVERLAYD_STATE_DIR", state.as_str()),
        ];
        let out = cni_call(Path::new(OVERLAYD), &vars, &conflist(list)).unwrap();
        assert!(out.status.success(), "ADD of {id} by {list}: {out:?}");
        namespaces.push(ns);
    }
    let names = |a: &Agent| listed(a).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let before = names(&c.agents[0]);
    assert!(before.contains(&"gc-scope-a".to_owned()) && before.contains(&"gc-scope-b".to_owned()), "{before:?}");

    let mut gc: Value = serde_json::from_slice(&conflist("web-a")).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    let vars = [("CNI_COMMAND", "GC"), ("CNI_PATH", "/nonexistent"), ("OVERLAYD_STATE_DIR", state.as_str())];
    let out = cni_call(Path::new(OVERLAYD), &vars, gc.to_string().as_bytes()).unwrap();
    assert!(out.status.success(), "GC of web-a: {out:?}");
    let after = names(&c.agents[0]);
    assert!(!after.contains(&"gc-scope-a".to_owned()), "web-a's container outlived web-a's GC: {after:?}");
    assert!(after.contains(&"gc-scope-b".to_owned()), "web-a's GC detached web-b's container: {after:?}");
    assert_eq!(ovl_veths(&c.hosts[0]).len(), 1, "web-b's veth stays, web-a's goes");
}
