//! The state dir under damage (issue 12, items 8 to 10): real daemons in network namespaces
//! whose files are deleted, emptied, truncated, edited or corrupted between two runs, or whose
//! disk fills up in the middle of an attach.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Host, Node, Options, Testbed};

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn form(bed: &Testbed, managers: usize, workers: usize) -> Cluster {
    Cluster::form(bed, managers, workers).expect("cannot form the cluster")
}

const T: Duration = Duration::from_secs(20);

/// A manager and a worker, and the network "blue".
fn blue(bed: &Testbed) -> Cluster {
    let c = form(bed, 1, 1);
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    c
}

/// The error of a daemon start that must fail (with the daemon's log in it).
fn refused(host: &Host, what: &str) -> String {
    match host.start_daemon::<&str>(&[]) {
        Ok(agent) => {
            let _ = agent.kill();
            panic!("the daemon started with {what}");
        }
        Err(e) => format!("{e:#}"),
    }
}

/// The host-side veths overlayd made on a host (names `ovl…`).
fn ovl_veths(host: &Host) -> Vec<String> {
    let out = host.exec("ip", ["-o", "link", "show", "type", "veth"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("ovl"))
        .collect()
}

/// The interfaces of a container namespace, but loopback.
fn links(ns: &Node) -> Vec<String> {
    let out = ns.exec("ip", ["-o", "link", "show"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n != "lo")
        .collect()
}

fn endpoint_names(file: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(file).expect("endpoints.json is JSON");
    let mut names: Vec<String> = v["endpoints"]
        .as_array()
        .expect("an endpoints list")
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn pending(file: &[u8]) -> usize {
    let v: Value = serde_json::from_slice(file).expect("endpoints.json is JSON");
    v["pending"].as_array().map_or(0, Vec::len)
}

fn attach(c: &Cluster, i: usize, ns: &Node, name: &str) -> anyhow::Result<Value> {
    c.agents[i].json(&["attach", "--network", "blue", "--netns", &ns.netns_path(), "--name", name])
}

/// Item 8, and the truncated store of item 9: a manager whose Raft store is gone, empty,
/// truncated or of another node id never starts as a voter, and says which file and what to do.
#[test]
fn a_manager_without_its_own_raft_store_refuses_to_start() {
    let bed = bed();
    let mut c = form(&bed, 3, 0);
    c.await_nodes(3, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let dir = c.agents[2].state_dir().to_owned();
    c.agents[2].terminate().unwrap();
    let db = dir.join("raft/raft.redb");
    let db_name = db.display().to_string();
    let saved = std::fs::read(&db).unwrap();

    std::fs::remove_file(&db).unwrap();
    let e = refused(&c.hosts[2], "its raft.redb deleted");
    assert!(e.contains(&db_name) && e.contains("missing") && e.contains("leave --force"), "{e}");

    std::fs::write(&db, b"").unwrap();
    let e = refused(&c.hosts[2], "its raft.redb emptied");
    assert!(e.contains(&db_name) && e.contains("empty") && e.contains("leave --force"), "{e}");

    std::fs::write(&db, &saved[..saved.len() / 2]).unwrap();
    let e = refused(&c.hosts[2], "its raft.redb truncated");
    assert!(e.contains(&db_name) && e.contains("damaged"), "{e}");
    assert!(!e.contains("another overlayd"), "a damaged file is not another daemon: {e}");

    // The store is back, but cluster.json now says this host is node 2.
    std::fs::write(&db, &saved).unwrap();
    let membership = dir.join("cluster.json");
    let original = std::fs::read(&membership).unwrap();
    let mut edited: Value = serde_json::from_slice(&original).unwrap();
    assert_eq!(edited["node_id"], 3);
    edited["node_id"] = 2.into();
    std::fs::write(&membership, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
    let e = refused(&c.hosts[2], "cluster.json saying node 2");
    assert!(e.contains(&membership.display().to_string()) && e.contains("node 3") && e.contains("node 2"), "{e}");

    // Meanwhile the two other managers go on.
    c.agents[0].json(&["network", "create", "red"]).unwrap();

    // Everything as it was: the manager starts and catches up.
    std::fs::write(&membership, &original).unwrap();
    c.agents[2] = c.hosts[2].start_daemon::<&str>(&[]).unwrap();
    wait_for(Duration::from_secs(30), "the restarted manager to catch up", || {
        let nets = c.agents[2].json(&["network", "ls"]).ok()?;
        (nets["networks"].as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    c.await_nodes(3, &[], T).unwrap();

    // The way back the refusal gives: the store is gone for good; the cluster forgets node 3,
    // this host forgets its membership (no daemon runs to ask), and it joins as a new node.
    c.agents[2].kill().unwrap();
    std::fs::remove_file(&db).unwrap();
    refused(&c.hosts[2], "its raft.redb deleted");
    c.agents[0].json(&["node", "rm", "h3", "--force"]).unwrap();
    let left = c.agents[2].json(&["leave", "--force"]).unwrap();
    assert_eq!(left["left"], true, "{left}");
    assert!(!membership.exists() && !dir.join("pki").exists(), "the membership is forgotten");
    c.agents[2] = c.hosts[2].start_daemon::<&str>(&[]).unwrap();
    assert_eq!(c.agents[2].status().unwrap()["mode"], "idle");
    let joined = c.join(2, 0, &c.manager_token).unwrap();
    assert_eq!(joined["node_id"], 4, "{joined}");
    c.await_nodes(3, &[], T).unwrap();
    let nets = c.agents[2].json(&["network", "ls"]).unwrap();
    assert_eq!(nets["networks"].as_array().map(Vec::len), Some(2));
}

/// Item 9: a damaged key or membership file is named, with what to do.
#[test]
fn a_damaged_identity_file_is_named_with_what_to_do() {
    let bed = bed();
    let c = form(&bed, 1, 1);
    c.await_nodes(2, &[], T).unwrap();
    let dir = c.agents[1].state_dir().to_owned();
    c.agents[1].terminate().unwrap();

    let key = dir.join("pki/node.key");
    let saved = std::fs::read(&key).unwrap();
    std::fs::write(&key, b"").unwrap();
    let e = refused(&c.hosts[1], "an empty node.key");
    assert!(e.contains(&key.display().to_string()) && e.contains("leave --force"), "{e}");
    std::fs::write(&key, &saved).unwrap();

    let membership = dir.join("cluster.json");
    let saved = std::fs::read(&membership).unwrap();
    std::fs::write(&membership, &saved[..saved.len() / 2]).unwrap();
    let e = refused(&c.hosts[1], "a truncated cluster.json");
    assert!(e.contains(&membership.display().to_string()) && e.contains("leave --force"), "{e}");
    std::fs::write(&membership, &saved).unwrap();

    c.hosts[1].start_daemon::<&str>(&[]).expect("the repaired state dir starts");
}

/// Item 9: a corrupt endpoints.json is set aside and the endpoints are rebuilt from the
/// veths; a veth that cannot be rebuilt is reported and removed.
#[test]
fn a_corrupt_endpoints_file_is_set_aside_and_rebuilt_from_the_veths() {
    let bed = bed();
    let mut c = blue(&bed);
    let (c0, _) = c.attach(0, "blue", "c0").unwrap();
    let (_c1, ip1) = c.attach(1, "blue", "c1").unwrap();
    let (_c2, ip2) = c.attach(1, "blue", "c2").unwrap();
    // A veth by overlayd's naming that no endpoint explains (an older overlayd's, say).
    c.hosts[1].exec("ip", ["link", "add", "ovl00000000ab", "type", "veth", "peer", "name", "ovp00000000ab"]).unwrap();
    let dir = c.agents[1].state_dir().to_owned();
    c.agents[1].terminate().unwrap();
    let file = dir.join("endpoints.json");
    std::fs::write(&file, b"{\"endpoints\": [{\"network\": \"bl").unwrap();

    c.agents[1] =
        c.hosts[1].start_daemon::<&str>(&[]).expect("the daemon refused to start with a corrupt endpoints.json");
    let aside: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("endpoints.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside: {aside:?}");
    assert_eq!(std::fs::read(dir.join(&aside[0])).unwrap(), b"{\"endpoints\": [{\"network\": \"bl");
    assert_eq!(endpoint_names(&std::fs::read(&file).unwrap()), ["c1", "c2"]);
    let log = c.agents[1].log();
    assert!(log.contains("ovl00000000ab"), "the veth that could not be rebuilt is reported:\n{log}");
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 2, "only the two endpoints' veths are left");

    // The rebuilt endpoints are the same: listed, reachable, detachable.
    let inspect = c.agents[0].json(&["network", "inspect", "blue"]).unwrap();
    let listed: Vec<&str> = inspect["endpoints"].as_array().unwrap().iter().filter_map(|e| e["ip"].as_str()).collect();
    for ip in [ip1, ip2] {
        assert!(listed.contains(&ip.to_string().as_str()), "{ip} is not listed: {inspect}");
    }
    wait_for(T, "c0 to reach c1 and c2", || {
        (c0.ping(ip1, 1).ok()?.received == 1 && c0.ping(ip2, 1).ok()?.received == 1).then_some(())
    })
    .unwrap();
    c.agents[1].json(&["detach", "--name", "c1"]).unwrap();
    assert_eq!(endpoint_names(&std::fs::read(&file).unwrap()), ["c2"]);
}

/// Item 10: an attach on a full disk leaves nothing behind, on the host or on disk; a crash
/// between plumbing and commit is rolled back at start; a veth no endpoint owns is removed.
#[test]
fn a_full_disk_or_a_crash_leaves_no_half_done_attach() {
    let bed = bed();
    let mut c = blue(&bed);
    let (_c1, _) = c.attach(1, "blue", "c1").unwrap();
    let c2 = c.hosts[1].add_netns("c2").unwrap();
    c.agents[1].terminate().unwrap();
    let disk = c.hosts[1].small_disk("1m").unwrap();
    c.agents[1] = c.hosts[1].start_daemon_on(&disk, &[] as &[&str]).unwrap();
    wait_for(T, "c1 to be back", || ovl_veths(&c.hosts[1]).len().eq(&1).then_some(())).unwrap();

    // The disk is full: the attach fails and changes nothing.
    disk.fill().unwrap();
    let e = format!("{:#}", attach(&c, 1, &c2, "c2").unwrap_err());
    assert!(e.contains("No space left on device"), "{e}");
    assert!(links(&c2).is_empty(), "the container was left configured: {:?}", links(&c2));
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 1, "a veth was left behind");
    disk.free().unwrap();
    assert_eq!(endpoint_names(&disk.read("endpoints.json").unwrap()), ["c1"]);
    assert_eq!(pending(&disk.read("endpoints.json").unwrap()), 0);

    // The daemon restarts (SIGKILL) with nothing to clean, and the attach now works.
    c.agents[1].kill().unwrap();
    c.agents[1] = c.hosts[1].start_daemon_on(&disk, &[] as &[&str]).unwrap();
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 1);
    attach(&c, 1, &c2, "c2").expect("the attach works once there is space");
    assert_eq!(links(&c2), ["eth0"]);

    // A crash between plumbing and commit: c2's record is still an intent on disk.
    c.agents[1].kill().unwrap();
    let mut file: Value = serde_json::from_slice(&disk.read("endpoints.json").unwrap()).unwrap();
    let endpoints = file["endpoints"].as_array_mut().unwrap();
    let at = endpoints.iter().position(|e| e["name"] == "c2").unwrap();
    let intent = endpoints.remove(at);
    file["pending"] = Value::Array(vec![intent]);
    disk.write("endpoints.json", &serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    c.agents[1] = c.hosts[1].start_daemon_on(&disk, &[] as &[&str]).unwrap();
    assert!(links(&c2).is_empty(), "the unfinished attach was not rolled back: {:?}", links(&c2));
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 1);
    let now = disk.read("endpoints.json").unwrap();
    assert_eq!((endpoint_names(&now), pending(&now)), (vec!["c1".to_owned()], 0));
    attach(&c, 1, &c2, "c2").expect("re-attach after the rollback");

    // A veth no record owns (the record lost, as older overlayds lost it on a full disk).
    c.agents[1].kill().unwrap();
    let mut file: Value = serde_json::from_slice(&disk.read("endpoints.json").unwrap()).unwrap();
    file["endpoints"].as_array_mut().unwrap().retain(|e| e["name"] != "c2");
    disk.write("endpoints.json", &serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    c.agents[1] = c.hosts[1].start_daemon_on(&disk, &[] as &[&str]).unwrap();
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 1, "the orphan veth is removed at start");
    assert!(links(&c2).is_empty());
    let e = format!("{:#}", c.agents[1].json(&["detach", "--name", "c2"]).unwrap_err());
    assert!(e.contains("nothing to detach"), "{e}");
    attach(&c, 1, &c2, "c2").expect("re-attach after the orphan is gone");

    // A plumbing error (the interface name is taken inside) leaves nothing either.
    let c3 = c.hosts[1].add_netns("c3").unwrap();
    let e = format!(
        "{:#}",
        c.agents[1]
            .json(&["attach", "--network", "blue", "--netns", &c3.netns_path(), "--name", "c3", "--ifname", "lo"])
            .unwrap_err()
    );
    assert!(e.contains("lo"), "{e}");
    assert_eq!(ovl_veths(&c.hosts[1]).len(), 2);
    let now = disk.read("endpoints.json").unwrap();
    assert_eq!((endpoint_names(&now), pending(&now)), (vec!["c1".to_owned(), "c2".to_owned()], 0));
    assert!(Path::new(&c3.netns_path()).exists());
}
