//! Cluster mode end to end: real overlayd daemons in network namespaces form a cluster with
//! `init` and `join`, create networks, attach containers, and survive the loss of their leader
//! and of their connection to the managers.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
//! Timings they print (with --nocapture) are indications; the figures are in BENCHMARKS.md.
#![allow(clippy::print_stderr)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Node, Options, Testbed};

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn form(bed: &Testbed, managers: usize, workers: usize) -> Cluster {
    Cluster::form(bed, managers, workers).expect("cannot form the cluster")
}

fn attach(c: &Cluster, i: usize, network: &str, name: &str) -> (Node, IpAddr) {
    c.attach(i, network, name).unwrap()
}

const T: Duration = Duration::from_secs(20);

#[test]
fn three_managers_and_two_workers_form_a_cluster_with_init_and_join() {
    let bed = bed();
    let c = form(&bed, 3, 2);
    c.await_nodes(5, &[], T).unwrap();
    let ls = c.agents[4].json(&["node", "ls"]).unwrap();
    let roles: Vec<&str> = ls["nodes"].as_array().unwrap().iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["manager", "manager", "manager", "worker", "worker"]);
    assert!(c.leader(4).is_some(), "a worker knows the leader");
    // Each manager is a Raft voter.
    let status = c.agents[1].status().unwrap();
    assert_eq!(status["mode"], "cluster");
    assert_eq!(status["cluster"]["role"], "manager");
}

#[test]
fn containers_attached_on_every_host_reach_each_other() {
    let bed = bed();
    let c = form(&bed, 3, 2);
    c.await_nodes(5, &[], T).unwrap();
    let net = c.agents[1].json(&["network", "create", "blue"]).unwrap();
    assert_eq!(net["subnet"], "10.128.0.0/16");
    assert_eq!(net["gateway"], "10.128.0.1");
    let containers: Vec<(Node, IpAddr)> = (0..5).map(|i| attach(&c, i, "blue", &format!("c{}", i + 1))).collect();
    let ips: BTreeSet<IpAddr> = containers.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(ips.len(), 5, "distinct addresses: {ips:?}");
    // Each host learns the others' containers by gossip (a few hundred ms): once its dataplane
    // answers ARP for the other four, its container reaches them.
    for (i, agent) in c.agents.iter().enumerate() {
        wait_for(T, &format!("h{} to answer ARP for every container", i + 1), || {
            let fdb = agent.json(&["fdb"]).ok()?;
            let arp: BTreeSet<String> = fdb["networks"][0]["arp"]
                .as_array()?
                .iter()
                .filter_map(|e| Some(e["ip"].as_str()?.to_owned()))
                .collect();
            // Its own container is on its bridge; the others' it answers for.
            let others = containers.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, (_, ip))| ip.to_string());
            others.into_iter().all(|ip| arp.contains(&ip)).then_some(())
        })
        .unwrap();
    }
    // Inside a container: the derived MAC, the network's MTU, a default route via the gateway.
    let (ns, ip) = &containers[3];
    let link = ns.exec("ip", ["-o", "link", "show", "eth0"]).unwrap();
    let IpAddr::V4(v4) = ip else { panic!() };
    let o = v4.octets();
    assert!(link.contains(&format!("02:4f:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])), "{link}");
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(ns.exec("ip", ["route"]).unwrap().contains("default via 10.128.0.1"));
    for (a, _) in &containers {
        for (_, ip) in &containers {
            a.ping_ok(*ip, 1).unwrap_or_else(|e| panic!("{}: {e}", a.ns()));
        }
    }
    let r = containers[0].0.iperf3_to(&containers[4].0, containers[4].1, 2, 1).unwrap();
    assert!(r.bytes > 10_000_000, "iperf3 moved only {} bytes", r.bytes);
    // No flooding and no learning: ARP is answered from the blocks.
    for a in &c.agents {
        let counters = a.counters().unwrap();
        assert_eq!(counters.get("learned"), 0);
        assert!(counters.get("tx_flooded") <= 2, "{:?}", counters.0);
    }
    // `network inspect` on a worker: every host's block and every container.
    let inspect = c.agents[4].json(&["network", "inspect", "blue"]).unwrap();
    assert_eq!(inspect["peers"].as_array().unwrap().len(), 5);
    let listed: BTreeSet<String> =
        inspect["endpoints"].as_array().unwrap().iter().map(|e| e["ip"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, ips.iter().map(ToString::to_string).collect(), "{inspect}");
}

#[test]
fn the_leader_can_die_and_come_back() {
    let bed = bed();
    let mut c = form(&bed, 3, 2);
    c.await_nodes(5, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let containers: Vec<(Node, IpAddr)> = (0..5).map(|i| attach(&c, i, "blue", &format!("c{}", i + 1))).collect();
    let leader = c.leader(3).unwrap();
    let dead = c.host_of(leader);
    assert!(dead < 3, "the leader is a manager");
    c.agents[dead].kill().unwrap();
    let other = (0..3).find(|i| *i != dead).unwrap();
    let started = Instant::now();
    let new = wait_for(Duration::from_secs(20), "a new leader", || c.leader(other).filter(|l| *l != leader)).unwrap();
    assert_ne!(new, leader);
    // Writes work again, and containers on the other hosts keep talking.
    wait_for(Duration::from_secs(20), "network create to succeed", || {
        c.agents[other].json(&["network", "create", "red"]).ok()
    })
    .unwrap();
    eprintln!("failover and first write after {:?}", started.elapsed());
    let alive: Vec<usize> = (0..5).filter(|i| *i != dead).collect();
    for &a in &alive {
        for &b in &alive {
            containers[a].0.ping_ok(containers[b].1, 1).unwrap();
        }
    }
    // The killed manager comes back from its state dir and catches up.
    c.agents[dead] = c.hosts[dead].start_daemon::<&str>(&[]).unwrap();
    let want = c.agents[other].status().unwrap()["cluster"]["revision"].as_u64().unwrap();
    wait_for(Duration::from_secs(30), "the restarted manager to catch up", || {
        let s = c.agents[dead].status().ok()?;
        let nets = c.agents[dead].json(&["network", "ls"]).ok()?;
        (s["cluster"]["revision"].as_u64()? >= want && nets["networks"].as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    c.await_nodes(5, &[], T).unwrap();
    // Ready in Raft is not yet everything learned: the restarted agent is a new gossip
    // incarnation and pulls the others' endpoints in its first anti-entropy rounds.
    for &a in &alive {
        wait_for(Duration::from_secs(10), "the restarted manager's container to reach the others", || {
            containers[dead].0.ping_ok(containers[a].1, 1).ok()
        })
        .unwrap();
    }
}

#[test]
fn twenty_concurrent_attaches_get_distinct_addresses_and_a_detached_address_is_reused() {
    let bed = bed();
    let c = form(&bed, 1, 3);
    c.await_nodes(4, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let namespaces: Vec<(usize, Node)> =
        (0..20).map(|k| (k % 4, c.hosts[k % 4].add_netns(&format!("p{k}")).unwrap())).collect();
    let ips: Vec<(usize, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .iter()
            .map(|(h, ns)| {
                let agent = &c.agents[*h];
                s.spawn(move || {
                    let ep = agent.json(&["attach", "--network", "blue", "--netns", &ns.netns_path()]).unwrap();
                    assert_eq!(ep["name"].as_str().unwrap(), ns.ns(), "named after its namespace by default");
                    (*h, ns.netns_path(), ep["ip"].as_str().unwrap().to_owned())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: BTreeSet<&String> = ips.iter().map(|(_, _, ip)| ip).collect();
    assert_eq!(distinct.len(), 20, "{ips:?}");
    // Detach one, attach another on the same host: it gets the freed address.
    let (h, netns, ip) = &ips[5];
    let gone = c.agents[*h].json(&["detach", "--netns", netns]).unwrap();
    assert_eq!(gone["detached"][0]["ip"].as_str().unwrap(), ip);
    let (_, again) = attach(&c, *h, "blue", "fresh");
    assert_eq!(again.to_string(), *ip, "the lowest free address is the one just freed");
}

#[test]
fn mistakes_get_a_clear_error_and_change_nothing() {
    let bed = bed();
    let mut c = form(&bed, 1, 1);
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue", "--subnet", "10.20.0.0/16"]).unwrap();
    c.add_host(&bed).unwrap();
    c.add_host(&bed).unwrap();
    let err = |r: anyhow::Result<serde_json::Value>| r.unwrap_err().to_string();

    // A token with the right CA digest but a wrong secret.
    let (digest, _) = c.worker_token.rsplit_once('-').unwrap();
    let wrong = format!("{digest}-{}", "a".repeat(26));
    assert!(err(c.join(2, 0, &wrong)).contains("not valid for this cluster"));
    // A malformed token.
    assert!(err(c.join(2, 0, "SWMTKN-1-abc")).contains("malformed"));
    // A token of another cluster.
    let other =
        c.agents[3].json(&["init", "--advertise-addr", &c.hosts[3].addr().to_string(), "--name", "other"]).unwrap();
    let foreign = other["worker_token"].as_str().unwrap().to_owned();
    assert!(err(c.join(2, 0, &foreign)).contains("does not belong to the cluster this token is for"));
    // An address nobody answers at.
    let e = err(c.agents[2].json(&[
        "join",
        "198.18.99.99",
        "--token",
        &c.worker_token.clone(),
        "--advertise-addr",
        &c.hosts[2].addr().to_string(),
    ]));
    assert!(e.contains("cannot reach the manager"), "{e}");
    // A second init over existing state.
    assert!(
        err(c.agents[0].json(&["init", "--advertise-addr", &c.hosts[0].addr().to_string()])).contains("already node")
    );
    // A duplicate name.
    assert!(
        err(c.agents[2].json(&[
            "join",
            &c.hosts[0].addr().to_string(),
            "--token",
            &c.worker_token.clone(),
            "--advertise-addr",
            &c.hosts[2].addr().to_string(),
            "--name",
            "h1"
        ]))
        .contains("already in the cluster")
    );
    // An overlapping subnet, and an unknown network.
    assert!(err(c.agents[0].json(&["network", "create", "red", "--subnet", "10.20.128.0/17"])).contains("overlaps"));
    // A worker manages nothing: it names a manager to run it on.
    let e = err(c.agents[1].json(&["network", "create", "red"]));
    assert!(e.contains("this host is a worker: run this on a manager (e.g. h1 at"), "{e}");
    let ns = c.hosts[1].add_netns("x").unwrap();
    assert!(
        err(c.agents[1].json(&["attach", "--network", "nope", "--netns", &ns.netns_path()]))
            .contains("no network named")
    );
    // Nothing changed.
    let ls = c.agents[0].json(&["node", "ls"]).unwrap();
    assert_eq!(ls["nodes"].as_array().unwrap().len(), 2, "{ls}");
    let nets = c.agents[1].json(&["network", "ls"]).unwrap();
    assert_eq!(nets["networks"].as_array().unwrap().len(), 1, "{nets}");
    assert_eq!(c.agents[2].status().unwrap()["mode"], "idle", "the refused host is still outside any cluster");
    // And the refused host can still join with the right token.
    c.join(2, 0, &c.worker_token.clone()).unwrap();
    c.await_nodes(3, &[3], T).unwrap();
}

#[test]
fn a_worker_cut_off_from_the_managers_keeps_forwarding_and_catches_up() {
    let bed = bed();
    let c = form(&bed, 1, 2);
    c.await_nodes(3, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let a = attach(&c, 1, "blue", "a");
    let b = attach(&c, 2, "blue", "b");
    // Once gossip has brought b to h2 (a few hundred ms), a reaches it.
    wait_for(T, "a to reach b", || a.0.ping_ok(b.1, 1).ok()).unwrap();
    // Cut h2's control traffic (the control port, both ways); VXLAN is untouched.
    c.hosts[1]
        .nft(
            "table inet ovtb_cut {\n\
               chain out { type filter hook output priority 0; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
               chain in { type filter hook input priority 0; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
             }\n",
        )
        .unwrap();
    wait_for(Duration::from_secs(15), "the worker to notice", || {
        (c.agents[1].status().ok()?["cluster"]["connected"] == false).then_some(())
    })
    .unwrap();
    // The cluster changes meanwhile; the dataplane keeps forwarding.
    c.agents[0].json(&["network", "create", "late"]).unwrap();
    let c3 = attach(&c, 2, "blue", "c3");
    for _ in 0..3 {
        a.0.ping_ok(b.1, 2).unwrap();
    }
    let before = c.agents[1].json(&["network", "ls"]).unwrap();
    assert_eq!(before["networks"].as_array().unwrap().len(), 1, "the cut-off worker has not seen the new network");
    // Heal: it catches up on what it missed.
    c.hosts[1].nft("delete table inet ovtb_cut\n").unwrap();
    let healed = Instant::now();
    wait_for(Duration::from_secs(30), "the worker to catch up", || {
        let nets = c.agents[1].json(&["network", "ls"]).ok()?;
        (nets["networks"].as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    eprintln!("caught up {:?} after the partition healed", healed.elapsed());
    a.0.ping_ok(c3.1, 2).unwrap();
    c.await_nodes(3, &[], T).unwrap();
}

#[test]
fn leave_node_rm_and_network_rm_clean_up_after_themselves() {
    let bed = bed();
    let c = form(&bed, 1, 3);
    c.await_nodes(4, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let (a, _) = attach(&c, 1, "blue", "a");
    let (_, b_ip) = attach(&c, 2, "blue", "b");
    // Once gossip has brought b to h2 (a few hundred ms), a reaches it.
    wait_for(T, "a to reach b", || a.ping_ok(b_ip, 1).ok()).unwrap();

    // A network in use is not removed; once its containers are gone it is, everywhere.
    let e = c.agents[0].json(&["network", "rm", "blue"]).unwrap_err().to_string();
    assert!(e.contains("in use on 2 host(s)"), "{e}");
    c.agents[1].json(&["detach", "--name", "a"]).unwrap();
    c.agents[2].json(&["detach", "--name", "b"]).unwrap();
    c.agents[0].json(&["network", "rm", "blue"]).unwrap();
    for (i, agent) in c.agents.iter().enumerate() {
        wait_for(T, "the network to go", || {
            (agent.json(&["network", "ls"]).ok()?["networks"].as_array()?.is_empty()).then_some(())
        })
        .unwrap();
        let links = c.hosts[i].exec("ip", ["-o", "link", "show"]).unwrap();
        wait_for(T, "its bridge to go", || {
            (!c.hosts[i].exec("ip", ["-o", "link", "show"]).ok()?.contains("ovbr-blue")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {links}"));
    }

    // A worker leaves: it is idle again, and the others no longer list it.
    c.agents[3].json(&["leave"]).unwrap();
    assert_eq!(c.agents[3].status().unwrap()["mode"], "idle");
    c.await_nodes(3, &[3], T).unwrap();
    // It can join again, under its old name.
    c.join(3, 0, &c.worker_token.clone()).unwrap();
    c.await_nodes(4, &[], T).unwrap();

    // A host that dies is marked down, and `node rm` removes it for good.
    c.agents[2].kill().unwrap();
    wait_for(Duration::from_secs(30), "the dead host to be marked down", || {
        let ls = c.agents[0].json(&["node", "ls"]).ok()?;
        ls["nodes"].as_array()?.iter().any(|n| n["name"] == "h3" && n["status"] == "down").then_some(())
    })
    .unwrap();
    c.agents[0].json(&["node", "rm", "h3"]).unwrap();
    let ls = c.agents[1].json(&["node", "ls"]).unwrap();
    wait_for(T, "h3 to be gone everywhere", || {
        let ls = c.agents[1].json(&["node", "ls"]).ok()?;
        (!ls["nodes"].as_array()?.iter().any(|n| n["name"] == "h3")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {ls}"));
    let e = c.agents[0].json(&["node", "rm", "h1"]).unwrap_err().to_string();
    assert!(e.contains("running manager"), "{e}");
}
