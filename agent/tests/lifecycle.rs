//! The cluster's whole lifecycle as an operator runs it (issue 17), on real daemons: a token
//! from `join-token` joins a host; an even number of managers is warned about; `detach` on the
//! wrong host names the right one; `network rm` and `leave` leave no device or address overlayd
//! made; a removed node that comes back is told so and `leave --force` returns it to a clean
//! idle state from which it joins again; the last manager dissolves the cluster with
//! `leave --force`. Needs root; fails, never skips.
#![allow(clippy::print_stderr)]

use std::time::Duration;

use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Host, Options, Testbed};

const T: Duration = Duration::from_secs(20);

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// What overlayd made on a host: its links (bridges `ovbr-`, TAPs `ovt-`, veths `ovl`, mesh
/// ports `ovm`) and the IPv4 addresses on them.
fn made(h: &Host) -> Vec<String> {
    let links = h.exec("ip", ["-o", "link", "show"]).unwrap();
    let mut out: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("ov"))
        .collect();
    let addrs = h.exec("ip", ["-o", "-4", "addr", "show"]).unwrap();
    out.extend(
        addrs
            .lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|dev| dev.starts_with("ov")))
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" ")),
    );
    out
}

#[test]
fn an_operator_runs_the_whole_lifecycle_and_nothing_is_left_behind() {
    let bed = bed();
    let mut c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();

    // A manager prints the tokens; the printed one joins a new host.
    let worker_token = c.agents[0].json(&["join-token", "worker"]).unwrap()["token"].as_str().unwrap().to_owned();
    let manager_token = c.agents[0].json(&["join-token", "manager"]).unwrap()["token"].as_str().unwrap().to_owned();
    let h3 = c.add_host(&bed).unwrap();
    c.join(h3, 0, &worker_token).unwrap();
    // A second manager makes two: the join says that an even number tolerates no more loss.
    let h4 = c.add_host(&bed).unwrap();
    let joined = c.agents[h4].cli(&[
        "join",
        &c.hosts[0].addr().to_string(),
        "--token",
        &manager_token,
        "--advertise-addr",
        &c.hosts[h4].addr().to_string(),
        "--name",
        c.hosts[h4].name(),
    ]);
    let joined = joined.unwrap();
    eprintln!("{joined}");
    assert!(joined.contains("2 managers") && joined.contains("odd number"), "no warning: {joined}");
    c.await_nodes(4, &[], T).unwrap();

    // detach on the wrong host names the host that holds the container.
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    let (a, _) = c.attach(h3, "web", "a").unwrap();
    let (_, d_ip) = c.attach(1, "web", "d").unwrap();
    a.ping_ok(d_ip, 2).unwrap();
    let e = c.agents[0].json(&["detach", "--name", "a"]).unwrap_err().to_string();
    assert!(e.contains(c.hosts[h3].name()) && e.contains("detach"), "{e}");

    // network rm: every device and address of it goes at once, on every host.
    c.agents[h3].json(&["detach", "--name", "a"]).unwrap();
    c.agents[1].json(&["detach", "--name", "d"]).unwrap();
    c.agents[0].json(&["network", "rm", "web"]).unwrap();
    for (i, h) in c.hosts.iter().enumerate() {
        wait_for(Duration::from_secs(5), &format!("h{} to remove what it made", i + 1), || {
            made(h).is_empty().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", made(h)));
    }

    // leave: nothing of the network is left on the host, and it can join again.
    c.agents[0].json(&["network", "create", "api"]).unwrap();
    let (_, _) = c.attach(h3, "api", "b").unwrap();
    assert!(!made(&c.hosts[h3]).is_empty());
    c.agents[h3].json(&["leave"]).unwrap();
    assert_eq!(made(&c.hosts[h3]), Vec::<String>::new(), "leave left these");
    c.join(h3, 0, &worker_token).unwrap();
    c.await_nodes(4, &[], T).unwrap();

    // A node removed while it runs is told so; `leave --force` makes it clean and idle.
    c.attach(h3, "api", "e").unwrap();
    c.agents[0].json(&["node", "rm", c.hosts[h3].name(), "--force"]).unwrap();
    wait_for(T, "the removed node to know it", || {
        let s = c.agents[h3].status().ok()?;
        let text = s.to_string();
        text.contains("removed").then_some(())
    })
    .unwrap();
    let human = c.agents[h3].cli(&["status"]).unwrap();
    assert!(human.contains("leave --force"), "the way out is offered: {human}");
    c.agents[h3].json(&["leave", "--force"]).unwrap();
    assert_eq!(c.agents[h3].status().unwrap()["mode"], "idle");
    assert_eq!(made(&c.hosts[h3]), Vec::<String>::new(), "leave --force left these");
    c.join(h3, 0, &worker_token).unwrap();

    // A manager whose leave leaves an even number of managers is warned, as join and promote
    // warn: h3 made a third manager, then leaving.
    c.agents[0].json(&["node", "promote", c.hosts[h3].name()]).unwrap();
    wait_for(Duration::from_secs(30), "h3 to run as a manager", || {
        c.agents[h3].json(&["network", "create", "n3"]).ok().map(drop)
    })
    .unwrap();
    let left = c.agents[h3].cli(&["leave"]).unwrap();
    assert!(left.contains("left the cluster") && left.contains("2 managers") && left.contains("odd number"), "{left}");

    // The cluster is dissolved from its managers: the other manager leaves (one is odd: no
    // warning), then the last one leaves with --force; each host is idle and clean.
    c.agents[1].json(&["leave"]).unwrap();
    let left = c.agents[h4].json(&["leave"]).unwrap();
    assert_eq!(left["warning"], serde_json::Value::Null, "{left}");
    let e = c.agents[0].json(&["leave"]).unwrap_err().to_string();
    assert!(e.contains("--force"), "the last manager is told how to dissolve the cluster: {e}");
    c.agents[0].json(&["leave", "--force"]).unwrap();
    for (i, h) in c.hosts.iter().enumerate() {
        assert_eq!(c.agents[i].status().unwrap()["mode"], "idle", "h{}", i + 1);
        assert_eq!(made(h), Vec::<String>::new(), "h{} kept these", i + 1);
    }
}

/// A node removed with `node rm` while its daemon is down: started again, it says it was
/// removed, and `leave --force` returns the host to a clean idle state (from which it joins
/// again, as a new node).
#[test]
fn a_node_removed_while_its_daemon_is_down_is_told_so_when_it_starts() {
    let bed = bed();
    let mut c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    let worker_token = c.agents[0].json(&["join-token", "worker"]).unwrap()["token"].as_str().unwrap().to_owned();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    let (_, _) = c.attach(1, "web", "a").unwrap();
    let id = c.agents[1].status().unwrap()["cluster"]["node_id"].as_u64().unwrap();
    // The bridge says it is overlayd's, so that a daemon after a crash adopts it as its own.
    let bridge = c.hosts[1].exec("ip", ["link", "show", "ovbr-web"]).unwrap();
    assert!(bridge.contains("alias created by overlayd"), "{bridge}");

    c.agents[1].kill().unwrap();
    c.agents[0].json(&["node", "rm", c.hosts[1].name()]).unwrap();
    c.agents[1] = c.hosts[1].start_daemon::<&str>(&[]).unwrap();

    wait_for(T, "the node removed while down to know it", || {
        let s = c.agents[1].status().ok()?;
        (s["cluster"]["removed"] == true).then_some(())
    })
    .unwrap();
    let human = c.agents[1].cli(&["status"]).unwrap();
    assert!(human.contains("removed from the cluster") && human.contains("leave --force"), "{human}");
    c.agents[1].json(&["leave", "--force"]).unwrap();
    assert_eq!(c.agents[1].status().unwrap()["mode"], "idle");
    assert_eq!(made(&c.hosts[1]), Vec::<String>::new(), "leave --force left these");
    let again = c.join(1, 0, &worker_token).unwrap();
    assert_ne!(again["node_id"].as_u64().unwrap(), id, "a removed id never comes back");
}

/// A state dir wiped under a running container: the daemon starts idle, knows nothing of the
/// container, and `detach --name` still removes the veth overlayd left.
#[test]
fn a_veth_left_by_a_wiped_state_dir_is_removed_by_detach() {
    let bed = bed();
    let mut c = Cluster::form(&bed, 1, 0).expect("cluster");
    c.await_nodes(1, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    let (ct, _) = c.attach(0, "web", "stray").unwrap();
    c.agents[0].kill().unwrap();
    let dir = c.hosts[0].state_dir();
    std::fs::remove_dir_all(&dir).unwrap();
    c.agents[0] = c.hosts[0].start_daemon::<&str>(&[]).unwrap();
    assert_eq!(c.agents[0].status().unwrap()["mode"], "idle");
    let veths = |h: &Host| made(h).into_iter().filter(|n| n.starts_with("ovl")).collect::<Vec<_>>();
    assert_eq!(veths(&c.hosts[0]).len(), 1, "the container's veth is still there: {:?}", made(&c.hosts[0]));
    let out = c.agents[0].json(&["detach", "--name", "stray"]).unwrap();
    assert_eq!(out["detached"][0]["name"], "stray", "{out}");
    assert_eq!(veths(&c.hosts[0]), Vec::<String>::new());
    let left = ct.exec("ip", ["-o", "link", "show"]).unwrap();
    assert!(!left.contains("eth0"), "the container's end went with it: {left}");
    let e = c.agents[0].json(&["detach", "--name", "stray"]).unwrap_err().to_string();
    assert!(e.contains("no veth overlayd left here matches"), "{e}");
}

/// `node promote` and `node demote`: a worker becomes a manager (it can then manage, and it
/// is a Raft voter: the cluster survives its first manager's death), then a worker again;
/// the last manager cannot be demoted; a change to an even number of managers warns.
#[test]
fn a_worker_is_promoted_and_demoted_and_quorum_holds() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 2).expect("cluster");
    c.await_nodes(3, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    let (a, _) = c.attach(1, "web", "a").unwrap();
    let (_, b_ip) = c.attach(2, "web", "b").unwrap();
    a.ping_ok(b_ip, 2).unwrap();
    let e = c.agents[1].json(&["network", "create", "x"]).unwrap_err().to_string();
    assert!(e.contains("run this on a manager"), "{e}");

    let out = c.agents[0].cli(&["node", "promote", c.hosts[1].name()]).unwrap();
    assert!(out.contains("is now a manager") && out.contains("2 managers"), "{out}");
    let out = c.agents[0].json(&["node", "promote", c.hosts[2].name()]).unwrap();
    assert_eq!((out["role"].as_str(), &out["warning"]), (Some("manager"), &serde_json::Value::Null), "{out}");
    // Each runs as a manager within seconds: it manages, and it votes.
    for i in [1, 2] {
        wait_for(Duration::from_secs(30), &format!("h{} to run as a manager", i + 1), || {
            c.agents[i].json(&["network", "create", &format!("n{i}")]).ok().map(drop)
        })
        .unwrap();
    }
    c.await_nodes(3, &[], T).unwrap();
    // Containers stayed attached through the restarts.
    wait_for(T, "a to reach b again", || a.ping(b_ip, 1).ok().filter(|p| p.received == 1)).unwrap();
    // Three voters: the first manager's death leaves a majority, which elects a leader.
    c.agents[0].kill().unwrap();
    wait_for(Duration::from_secs(30), "a leader among the promoted managers", || {
        c.agents[1].json(&["network", "create", "after"]).ok().map(drop)
    })
    .unwrap();

    // A demotion that would leave no majority is refused: h1 is down and still a manager.
    wait_for(T, "h1 to be marked down", || {
        let ls = c.agents[1].json(&["node", "ls"]).ok()?;
        ls["nodes"].as_array()?.iter().any(|n| n["name"] == c.hosts[0].name() && n["status"] == "down").then_some(())
    })
    .unwrap();
    let e = c.agents[1].json(&["node", "demote", c.hosts[2].name()]).unwrap_err().to_string();
    assert!(e.contains("no majority"), "{e}");
    c.agents[1].json(&["node", "rm", c.hosts[0].name(), "--force"]).unwrap();

    // Demoted again: it no longer manages, and it is no voter.
    let out = c.agents[1].json(&["node", "demote", c.hosts[2].name()]).unwrap();
    assert_eq!(out["role"], "worker", "{out}");
    wait_for(Duration::from_secs(30), "h3 to run as a worker", || {
        let e = c.agents[2].json(&["network", "create", "y"]).err()?.to_string();
        e.contains("run this on a manager").then_some(())
    })
    .unwrap();
    let e = c.agents[1].json(&["node", "demote", c.hosts[1].name()]).unwrap_err().to_string();
    assert!(e.contains("last manager"), "{e}");
    wait_for(T, "b to answer on its worker", || a.ping(b_ip, 1).ok().filter(|p| p.received == 1)).unwrap();
}
