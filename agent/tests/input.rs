//! Bad input is refused before it touches a host (issue 12, item 11): a network subnet that
//! would cut hosts off, a `--netns` that is not a network namespace (VNI 0 in static mode is
//! with the other static-mode flags, in cli.rs).
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.

use std::time::Duration;

use testbed::cluster::Cluster;
use testbed::{Options, Testbed};

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

const T: Duration = Duration::from_secs(20);

/// `overlayd network create NAME --subnet SUBNET` on agent `i`: the error, if it failed.
fn create(c: &Cluster, i: usize, name: &str, subnet: &str) -> Option<String> {
    c.agents[i].json(&["network", "create", name, "--subnet", subnet]).err().map(|e| format!("{e:#}"))
}

#[test]
fn network_create_refuses_subnets_that_would_cut_a_host_off() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 1).expect("cannot form the cluster");
    c.await_nodes(2, &[], T).unwrap();
    // The testbed's underlay is 198.18.0.0/15 on every host.
    let e = create(&c, 0, "under", "198.18.0.0/24").expect("the underlay's own subnet was accepted");
    assert!(e.contains("198.18.0.0/15") && e.contains("h1"), "{e}");
    for (subnet, why) in [("127.0.0.0/16", "loopback"), ("169.254.0.0/16", "link-local"), ("224.1.0.0/16", "multicast")]
    {
        let e = create(&c, 0, "bad", subnet).unwrap_or_else(|| panic!("{subnet} was accepted"));
        assert!(e.contains(why), "{subnet}: {e}");
    }
    assert_eq!(create(&c, 0, "good", "10.9.0.0/16"), None);

    // A host that gained a network reports it when its daemon starts again.
    c.hosts[1].exec("ip", ["link", "add", "extra0", "type", "veth", "peer", "name", "extra1"]).unwrap();
    c.hosts[1].exec("ip", ["addr", "add", "10.77.0.1/16", "dev", "extra0"]).unwrap();
    c.agents[1].terminate().unwrap();
    let _worker = c.hosts[1].start_daemon::<&str>(&[]).unwrap();
    testbed::measure::wait_for(T, "the worker's new network in its node record", || {
        let ls = c.agents[0].json(&["node", "ls"]).ok()?;
        let h2 = ls["nodes"].as_array()?.iter().find(|n| n["name"] == "h2")?.clone();
        h2["underlay_networks"].as_array()?.iter().any(|n| n == "10.77.0.0/16").then_some(())
    })
    .unwrap();
    let e = create(&c, 0, "newer", "10.77.0.0/20").expect("a subnet of the worker's new network was accepted");
    assert!(e.contains("10.77.0.0/16") && e.contains("h2"), "{e}");
}

#[test]
fn attach_to_a_file_that_is_not_a_network_namespace_says_so() {
    let bed = bed();
    let c = Cluster::form(&bed, 1, 0).expect("cannot form the cluster");
    c.agents[0].json(&["network", "create", "blue"]).unwrap();
    let file = bed.dir().join("not-a-namespace");
    std::fs::write(&file, b"").unwrap();
    for path in [file.to_string_lossy().into_owned(), "/proc/self/ns/mnt".to_owned()] {
        let e = c.agents[0]
            .json(&["attach", "--network", "blue", "--netns", &path, "--name", "x"])
            .map(|v| v.to_string())
            .expect_err("attached to something that is not a network namespace");
        let e = format!("{e:#}");
        assert!(e.contains(&format!("{path} is not a network namespace")), "{e}");
    }
}
