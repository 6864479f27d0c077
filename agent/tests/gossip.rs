//! Gossip end to end: real overlayd daemons in network namespaces learn every endpoint and
//! every host's liveness by gossip, withdraw a dead host everywhere, converge after a
//! partition, and refuse what does not come from the cluster or from an endpoint's owner.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
//! Timings they print (with --nocapture) are indications; the figures are in BENCHMARKS.md.
#![allow(clippy::print_stderr)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use control::gossip::record::{Change, Endpoint, EndpointKey, Record, Signer};
use control::gossip::seal::{GossipKey, Header, Kind};
use control::gossip::sync::{SyncMessage, serde_bytes_vec::Bytes};
use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Agent, Node, Options, Testbed};

const T: Duration = Duration::from_secs(20);

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn form(bed: &Testbed, managers: usize, workers: usize) -> Cluster {
    let c = Cluster::form(bed, managers, workers).expect("cannot form the cluster");
    c.await_nodes(managers + workers, &[], T).unwrap();
    c
}

/// The remote endpoint addresses a host's dataplane answers ARP for, on every network.
fn arp_ips(agent: &Agent) -> Option<BTreeSet<IpAddr>> {
    let fdb = agent.fdb().ok()?;
    let mut out = BTreeSet::new();
    for n in fdb["networks"].as_array()? {
        for a in n["arp"].as_array().into_iter().flatten() {
            out.insert(a["ip"].as_str()?.parse().ok()?);
        }
    }
    Some(out)
}

/// Waits until every host but `skip` answers ARP for exactly the endpoints of the other
/// hosts in `endpoints` (host index, address).
fn await_tables(c: &Cluster, endpoints: &[(usize, IpAddr)], skip: &[usize], timeout: Duration) -> Duration {
    let started = Instant::now();
    for (i, a) in c.agents.iter().enumerate().filter(|(i, _)| !skip.contains(i)) {
        let want: BTreeSet<IpAddr> =
            endpoints.iter().filter(|(h, _)| *h != i && !skip.contains(h)).map(|e| e.1).collect();
        wait_for(timeout.saturating_sub(started.elapsed()), &format!("host {i}'s tables to list {want:?}"), || {
            (arp_ips(a)? == want).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; it has {:?}", arp_ips(a)));
    }
    started.elapsed()
}

fn peers(agent: &Agent) -> Value {
    agent.json(&["peers"]).unwrap()
}

fn gossip_counter(agent: &Agent, name: &str) -> u64 {
    peers(agent)["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_container_is_pingable_from_every_host_without_one_flooded_arp_request() {
    let bed = bed();
    let c = form(&bed, 1, 4);
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let (_, target) = c.attach(0, "blue", "target").unwrap();
    let clients: Vec<(Node, IpAddr)> = (1..5).map(|i| c.attach(i, "blue", &format!("c{i}")).unwrap()).collect();
    let mut endpoints = vec![(0, target)];
    endpoints.extend(clients.iter().enumerate().map(|(i, (_, ip))| (i + 1, *ip)));
    let took = await_tables(&c, &endpoints, &[], T);
    eprintln!("every endpoint in every host's tables {took:?} after the last attach");
    for (node, _) in &clients {
        node.ping_ok(target, 2).unwrap();
    }
    // An address of a remote block that no container holds: nobody answers, nothing floods.
    let IpAddr::V4(t) = target else { panic!() };
    let nobody = IpAddr::V4(Ipv4Addr::from(u32::from(t) + 100));
    assert!(clients[0].0.ping(nobody, 1).map(|p| p.received).unwrap_or(0) == 0);
    for (i, a) in c.agents.iter().enumerate() {
        let counters = a.counters().unwrap();
        assert_eq!(counters.get("tx_arp_flooded"), 0, "host {i} flooded an ARP request: {:?}", counters.0);
        if i > 0 {
            assert!(counters.get("arp_replies") >= 1, "host {i} answered no ARP: {:?}", counters.0);
        }
    }
    assert!(c.agents[1].counters().unwrap().dropped("arp_for_unknown_address") >= 1);
    // `overlayd peers` on a worker: every host alive, with its endpoint table.
    let p = peers(&c.agents[4]);
    let list = p["peers"].as_array().unwrap();
    assert_eq!(list.len(), 5, "{p}");
    for peer in list {
        let state = peer["state"].as_str().unwrap();
        assert!(state == "alive" || state == "self", "{p}");
        assert_eq!(peer["endpoints"].as_u64(), Some(1), "{p}");
    }
}

#[test]
fn a_killed_host_is_withdrawn_everywhere_and_returns_when_restarted() {
    let bed = bed();
    let mut c = form(&bed, 1, 4);
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let containers: Vec<(Node, IpAddr)> = (0..5).map(|i| c.attach(i, "blue", &format!("c{i}")).unwrap()).collect();
    let endpoints: Vec<(usize, IpAddr)> = containers.iter().enumerate().map(|(i, (_, ip))| (i, *ip)).collect();
    await_tables(&c, &endpoints, &[], T);
    for (a, _) in &containers {
        for (_, ip) in &containers {
            a.ping_ok(*ip, 1).unwrap();
        }
    }
    let dead = 4;
    let dead_vtep = c.hosts[dead].addr().to_string();
    // Count every VXLAN datagram that reaches the dead host's namespace.
    c.hosts[dead]
        .nft("table inet ovtb_count {\n  chain in { type filter hook input priority 0; udp dport 4789 counter; }\n}\n")
        .unwrap();
    c.agents[dead].kill().unwrap();
    let killed = Instant::now();
    let alive: Vec<usize> = (0..4).collect();
    let mut withdrawn = Vec::new();
    for &i in &alive {
        wait_for(Duration::from_secs(10), &format!("host {i} to withdraw host {dead}"), || {
            let fdb = c.agents[i].fdb().ok()?;
            let net = &fdb["networks"][0];
            let listed = net["arp"].as_array()?.iter().any(|a| a["ip"] == containers[dead].1.to_string());
            let flooded = net["flood_list"].as_array()?.iter().any(|v| v == &dead_vtep);
            let fdb_to = net["fdb"].as_array()?.iter().any(|e| e["vtep"] == dead_vtep);
            let down = net["blocks"].as_array()?.iter().any(|b| b["vtep"] == dead_vtep && b["down"] == true);
            (!listed && !flooded && !fdb_to && down).then_some(())
        })
        .unwrap();
        withdrawn.push(killed.elapsed());
    }
    let everywhere = killed.elapsed();
    eprintln!("withdrawn on each host after {withdrawn:?}; everywhere after {everywhere:?}");
    assert!(everywhere < Duration::from_secs(5), "withdrawn everywhere only after {everywhere:?}");
    // Nothing is sent to it: traffic for its container stops at the senders.
    let counted = || c.hosts[dead].exec("nft", ["list", "table", "inet", "ovtb_count"]).unwrap();
    let before = counted();
    for &i in &alive {
        let _ = containers[i].0.ping(containers[dead].1, 1);
    }
    assert_eq!(counted(), before, "VXLAN reached the dead host");
    let drops: u64 = alive.iter().map(|&i| c.agents[i].counters().unwrap().dropped("destination_host_down")).sum();
    eprintln!("{drops} frames for the dead host dropped at the senders");
    assert!(drops >= 1, "the senders' cached neighbour entries sent frames that were dropped and counted");
    // The Raft status follows.
    wait_for(T, "the leader to mark it down", || {
        let ls = c.agents[0].json(&["node", "ls"]).ok()?;
        ls["nodes"].as_array()?.iter().any(|n| n["name"] == "h5" && n["status"] == "down").then_some(())
    })
    .unwrap();
    // Restarted, it is a new incarnation and everything returns.
    let generation = |p: &Value| {
        p["peers"].as_array().unwrap().iter().find(|x| x["name"] == "h5").and_then(|x| x["generation"].as_u64())
    };
    let old = generation(&peers(&c.agents[0]));
    c.agents[dead] = c.hosts[dead].start_daemon::<&str>(&[]).unwrap();
    let restarted = Instant::now();
    await_tables(&c, &endpoints, &[], T);
    eprintln!("entries back everywhere {:?} after the restart", restarted.elapsed());
    let p = peers(&c.agents[0]);
    assert!(generation(&p) > old, "a restarted host is a new incarnation: {old:?} then {p}");
    // The senders' kernels gave up on its address while it was dead (their neighbour entries
    // failed); they resolve it again within a few seconds.
    for &i in &alive {
        wait_for(T, "the restarted host's container to answer", || containers[i].0.ping_ok(containers[dead].1, 1).ok())
            .unwrap();
    }
    eprintln!("reachable from every host {:?} after the restart", restarted.elapsed());
    c.await_nodes(5, &[], T).unwrap();
}

#[test]
fn a_partitioned_host_converges_after_healing_with_nothing_stale() {
    let bed = bed();
    let c = form(&bed, 1, 3);
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let mut eps: Vec<(usize, String, IpAddr)> = Vec::new();
    for i in 0..4 {
        for k in 0..2 {
            let name = format!("c{i}{k}");
            let (_, ip) = c.attach(i, "blue", &name).unwrap();
            eps.push((i, name, ip));
        }
    }
    let pairs = |eps: &[(usize, String, IpAddr)]| eps.iter().map(|(h, _, ip)| (*h, *ip)).collect::<Vec<_>>();
    await_tables(&c, &pairs(&eps), &[], T);
    // Cut h4 off: gossip, control and VXLAN, both ways.
    let cut = 3;
    c.hosts[cut]
        .nft(
            "table inet ovtb_cut {\n\
               chain out { type filter hook output priority 0; udp dport { 4789, 7946 } drop; udp sport 7946 drop; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
               chain in { type filter hook input priority 0; udp dport { 4789, 7946 } drop; udp sport 7946 drop; tcp dport 7947 drop; tcp sport 7947 drop; }\n\
             }\n",
        )
        .unwrap();
    let cut_at = Instant::now();
    // Both sides change while apart: one detach and one attach each.
    std::thread::sleep(Duration::from_secs(8));
    for side in [0, cut] {
        let gone = eps.iter().position(|(h, _, _)| *h == side).unwrap();
        let (_, name, _) = eps.remove(gone);
        c.agents[side].json(&["detach", "--name", &name]).unwrap();
        let name = format!("n{side}");
        let (_, ip) = c.attach(side, "blue", &name).unwrap();
        eps.push((side, name, ip));
    }
    // Meanwhile the others withdrew the cut-off host.
    let others: Vec<usize> = (0..4).filter(|i| *i != cut).collect();
    let visible: Vec<(usize, IpAddr)> = pairs(&eps).into_iter().filter(|(h, _)| *h != cut).collect();
    await_tables(&c, &visible, &[cut], T);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed()));
    c.hosts[cut].nft("delete table inet ovtb_cut\n").unwrap();
    let healed = Instant::now();
    let took = await_tables(&c, &pairs(&eps), &[], Duration::from_secs(30));
    eprintln!("every host's tables identical {took:?} after the partition healed");
    for &i in &others {
        let p = peers(&c.agents[i]);
        let h = p["peers"].as_array().unwrap().iter().find(|x| x["name"] == "h4").cloned().unwrap();
        assert_eq!(h["state"], "alive", "{p}");
    }
    assert!(healed.elapsed() < Duration::from_secs(30) + Duration::from_secs(5));
}

#[test]
fn gossip_refuses_wrong_keys_forgeries_and_garbage_and_counts_them() {
    let bed = bed();
    let mut c = form(&bed, 1, 2);
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let containers: Vec<(Node, IpAddr)> = (0..3).map(|i| c.attach(i, "blue", &format!("c{i}")).unwrap()).collect();
    let eps: Vec<(usize, IpAddr)> = containers.iter().enumerate().map(|(i, (_, ip))| (i, *ip)).collect();
    await_tables(&c, &eps, &[], T);
    let (owner, attacker, victim) = (0usize, 1usize, 2usize);
    let victim_gossip = SocketAddr::new(c.hosts[victim].addr(), 7946);
    let from = SocketAddr::new(c.hosts[attacker].addr(), 0);
    let pki = |i: usize| c.agents[i].state_dir().join("pki");
    let cluster_key: [u8; 32] = hex::decode(std::fs::read_to_string(pki(attacker).join("gossip.key")).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let key = GossipKey::new(&cluster_key);
    let attacker_signer =
        Signer::from_pkcs8(&std::fs::read(pki(attacker).join("gossip-signing.pk8")).unwrap()).unwrap();
    let vni = c.agents[0].json(&["network", "ls"]).unwrap()["networks"][0]["vni"].as_u64().unwrap() as u32;
    let IpAddr::V4(owner_ip) = eps[owner].1 else { panic!() };
    let table = |i: usize, node: u64| {
        let p = peers(&c.agents[i]);
        let x = p["peers"].as_array().unwrap().iter().find(|x| x["node_id"] == node).cloned().unwrap();
        (x["table_epoch"].as_u64().unwrap(), x["table_version"].as_u64().unwrap())
    };
    let (epoch, version) = table(victim, 1);
    // A holder of the cluster key seals under any sender it likes. As a host outside the
    // cluster it is not heard at all; so it seals as the member it is (node 2), in a life of
    // its own a little ahead of its daemon's (which the victim then no longer hears, until
    // the daemon restarts below), numbering its datagrams as a sender does.
    let victim_id = peers(&c.agents[victim])["self_id"].as_u64().unwrap();
    let attacker_id = peers(&c.agents[attacker])["self_id"].as_u64().unwrap();
    let p = peers(&c.agents[victim]);
    let daemon_life =
        p["peers"].as_array().unwrap().iter().find(|x| x["node_id"] == attacker_id).unwrap()["generation"]
            .as_u64()
            .unwrap();
    let counter = std::cell::Cell::new(0u64);
    let sealed_by = |sender: u64, m: &SyncMessage, key: &GossipKey| {
        let mut payload = Vec::new();
        m.encode(&mut payload);
        let mut d = Vec::new();
        let generation = if sender == attacker_id { daemon_life + 500_000 } else { 1 };
        let header = Header { sender, generation, counter: counter.replace(counter.get() + 1), receiver: victim_id };
        key.seal(&header, Kind::Sync, &payload, &mut d);
        d
    };
    let sealed = |m: &SyncMessage, key: &GossipKey| sealed_by(attacker_id, m, key);
    // 1. A tombstone for the owner's endpoint, signed by another member of the cluster and
    //    sealed with the right cluster key.
    let forged =
        Record::sign(&attacker_signer, 1, epoch, version + 1, Change::Delete(EndpointKey { vni, ip: owner_ip }));
    let records = SyncMessage::Records {
        owner: 1,
        epoch,
        from: version,
        upto: version + 1,
        items: vec![Bytes(forged.wire().to_vec())],
    };
    c.hosts[attacker].send_udp(from, victim_gossip, vec![sealed(&records, &key)]).unwrap();
    // 1b. The same, as a sender outside the cluster (a removed host holding the key).
    c.hosts[attacker].send_udp(from, victim_gossip, vec![sealed_by(1000, &records, &key); 3]).unwrap();
    // 2. The same, sealed with a key that is not the cluster's.
    let outsider = GossipKey::new(&[0x5a; 32]);
    c.hosts[attacker].send_udp(from, victim_gossip, vec![sealed(&records, &outsider); 5]).unwrap();
    // 3. A flood of garbage on the gossip port.
    for burst in 0..10u32 {
        let garbage: Vec<Vec<u8>> = (0..200u32)
            .map(|i| (0..((burst * 200 + i) % 1400 + 1)).map(|j| (i * 31 + j * 7 + burst) as u8).collect())
            .collect();
        c.hosts[attacker].send_udp(from, victim_gossip, garbage).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // 4. A record the attacker may sign (its own table) claiming an address of the owner's block.
    let IpAddr::V4(o) = eps[owner].1 else { panic!() };
    let stolen = Ipv4Addr::from(u32::from(o) + 50);
    let (a_epoch, a_version) = table(victim, 2);
    let claim = Record::sign(
        &attacker_signer,
        2,
        a_epoch,
        a_version + 1000,
        Change::Put(
            EndpointKey { vni, ip: stolen },
            Endpoint {
                mac: [2, 0x4f, 1, 2, 3, 4],
                name: "evil".into(),
                aliases: Vec::new(),
                service: None,
                health: Default::default(),
            },
        ),
    );
    let claim_msg = SyncMessage::Records {
        owner: 2,
        epoch: a_epoch,
        from: a_version + 999,
        upto: a_version + 1000,
        items: vec![Bytes(claim.wire().to_vec())],
    };
    c.hosts[attacker].send_udp(from, victim_gossip, vec![sealed(&claim_msg, &key)]).unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let counters = peers(&c.agents[victim])["counters"].clone();
    eprintln!("victim's gossip counters: {counters}");
    assert!(gossip_counter(&c.agents[victim], "records_forged") >= 1, "{counters}");
    assert!(gossip_counter(&c.agents[victim], "rx_unknown_sender") >= 3, "{counters}");
    assert!(gossip_counter(&c.agents[victim], "rx_bad_auth") >= 5, "{counters}");
    assert!(gossip_counter(&c.agents[victim], "rx_not_gossip") >= 1900, "{counters}");
    // Nothing changed: the victim still answers for the owner's endpoint (and not for the
    // stolen address), every host is alive, and traffic flows.
    let ips = arp_ips(&c.agents[victim]).unwrap();
    assert!(ips.contains(&eps[owner].1), "{ips:?}");
    assert!(!ips.contains(&IpAddr::V4(stolen)), "an address outside the claimer's block was installed: {ips:?}");
    // The attacker's daemon starts a new life, which the victim hears again.
    c.agents[attacker].kill().unwrap();
    c.agents[attacker] = c.hosts[attacker].start_daemon::<&str>(&[]).unwrap();
    await_tables(&c, &eps, &[], T);
    wait_for(T, "every host alive to the victim", || {
        let p = peers(&c.agents[victim]);
        p["peers"].as_array()?.iter().all(|x| x["state"] == "alive" || x["state"] == "self").then_some(())
    })
    .unwrap();
    let p = peers(&c.agents[victim]);
    assert!(p["peers"].as_array().unwrap().iter().all(|x| x["state"] == "alive" || x["state"] == "self"), "{p}");
    containers[victim].0.ping_ok(eps[owner].1, 2).unwrap();
}

#[test]
fn a_graceful_leave_is_withdrawn_everywhere_at_once() {
    let bed = bed();
    let c = form(&bed, 1, 3);
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let eps: Vec<(usize, IpAddr)> = (0..4).map(|i| (i, c.attach(i, "blue", &format!("c{i}")).unwrap().1)).collect();
    await_tables(&c, &eps, &[], T);
    let leaving = 3;
    let vtep = c.hosts[leaving].addr().to_string();
    let started = Instant::now();
    c.agents[leaving].json(&["leave"]).unwrap();
    let left = started.elapsed();
    let remaining: Vec<(usize, IpAddr)> = eps.iter().copied().filter(|(h, _)| *h != leaving).collect();
    let took = await_tables(&c, &remaining, &[leaving], Duration::from_secs(5));
    for i in 0..leaving {
        let fdb = c.agents[i].fdb().unwrap();
        let flood = fdb["networks"][0]["flood_list"].as_array().unwrap();
        assert!(!flood.iter().any(|v| v == &vtep), "host {i} still floods to the host that left: {fdb}");
    }
    eprintln!("`overlayd leave` took {left:?}; withdrawn everywhere {took:?} after it returned");
    assert!(took < Duration::from_secs(1), "a graceful leave took {took:?} to be withdrawn everywhere");
}
