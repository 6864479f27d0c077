//! The Prometheus endpoint of a cluster (issue 17, item 6), with real daemons: two hosts (a
//! manager and a worker) started with `--metrics-addr`, a network with a container on each
//! that ping each other; then `/metrics` of each host, fetched inside its namespace, is parsed
//! by the Python `prometheus_client` text parser (Debian's python3-prometheus-client, which
//! scripts/install-deps installs): it parses, every family has HELP and TYPE, two scrapes list
//! the same series in the same order, and it says what the cluster did — frames of the network
//! on both sides, both hosts alive in gossip, a Raft term and leader on the manager, the watch
//! caught up, the build.
//!
//! This test needs root (namespaces) and /usr/bin/python3 with prometheus_client. It fails,
//! never skips.
#![allow(clippy::print_stderr)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Host, Options, Testbed};

const T: Duration = Duration::from_secs(20);
/// Where each daemon serves its metrics, inside its host's namespace.
const METRICS: &str = "127.0.0.1:9477";

/// Parses Prometheus text with `prometheus_client` and prints the families as JSON: name,
/// type, help, and the samples as (name, labels, value).
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = [
    {"name": f.name, "type": f.type, "help": f.documentation,
     "samples": [[s.name, s.labels, s.value] for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
print(json.dumps(families))
"#;

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

/// The body of `GET /metrics` from the daemon on `host`, asked from inside its namespace.
fn scrape(host: &Host) -> String {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let reply = testbed::netns::within(host.ns(), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: overlayd\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .unwrap_or_else(|e| panic!("no metrics from {}: {e:#}", host.name()));
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {reply}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// `text` as `prometheus_client` reads it; a parse failure fails the test.
fn parse(text: &str) -> Vec<Value> {
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run /usr/bin/python3 (scripts/install-deps installs it, with python3-prometheus-client)");
    py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client did not parse the metrics (is python3-prometheus-client installed?):\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().cloned().unwrap()
}

/// The value of sample `name` whose labels include `labels`.
fn sample(families: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families.iter().flat_map(|f| f["samples"].as_array().into_iter().flatten()).find_map(|s| {
        let matches = s[0] == name && labels.iter().all(|(k, v)| s[1][k] == *v);
        matches.then(|| s[2].as_f64()).flatten()
    })
}

/// Every series of `text`, name and labels, in order (values left out).
fn series(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s)).collect()
}

/// Checks what holds for any host: the parse, HELP and TYPE, names, no address in a label,
/// the build, the network's frames in both directions, gossip and the watch.
fn check_common(host: &Host, text: &str, families: &[Value]) {
    let name = host.name();
    assert!(!families.is_empty(), "{name}: no family");
    for f in families {
        let help = f["help"].as_str().unwrap_or_default();
        assert!(!help.trim().is_empty(), "{name}: {} has no HELP", f["name"]);
        assert!(["counter", "gauge"].contains(&f["type"].as_str().unwrap_or_default()), "{name}: TYPE of {f}");
        for s in f["samples"].as_array().unwrap() {
            for (k, v) in s[1].as_object().unwrap() {
                let v = v.as_str().unwrap_or_default();
                assert!(v.parse::<IpAddr>().is_err(), "{name}: an address in label {k} of {s}");
            }
        }
    }
    // The raw text too: every series' family has its HELP and TYPE lines, once.
    for s in series(text) {
        let family = s.split('{').next().unwrap();
        for kind in ["HELP", "TYPE"] {
            let line = format!("# {kind} {family} ");
            assert_eq!(text.matches(&line).count(), 1, "{name}: {family} needs one {kind} line:\n{text}");
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(sample(families, "overlayd_build_info", &[("version", version)]), Some(1.0), "{name}:\n{text}");
    for series in ["overlayd_network_tx_frames_total", "overlayd_network_rx_frames_total"] {
        let v = sample(families, series, &[("network", "web")]).unwrap_or(0.0);
        assert!(v > 0.0, "{name}: {series}{{network=\"web\"}} is {v}:\n{text}");
    }
    assert!(sample(families, "overlayd_network_tx_bytes_total", &[("network", "web")]).unwrap_or(0.0) > 0.0);
    assert!(
        sample(families, "overlayd_network_dropped_total", &[("network", "web"), ("reason", "not_member")]).is_some()
    );
    assert_eq!(sample(families, "overlayd_gossip_members", &[("state", "alive")]), Some(2.0), "{name}:\n{text}");
    assert_eq!(sample(families, "overlayd_gossip_members", &[("state", "down")]), Some(0.0), "{name}");
    for series in ["overlayd_gossip_suspicions_total", "overlayd_gossip_refutations_total"] {
        assert!(sample(families, series, &[]).is_some(), "{name}: no {series}");
    }
    assert!(sample(families, "overlayd_gossip_rx_datagrams_total", &[]).unwrap_or(0.0) > 0.0, "{name}");
    assert!(sample(families, "overlayd_gossip_sync_repairs_total", &[]).is_some(), "{name}");
    assert!(sample(families, "overlayd_gossip_dropped_total", &[("reason", "bad_auth")]).is_some(), "{name}");
    assert!(sample(families, "overlayd_watch_revision", &[]).unwrap_or(0.0) >= 1.0, "{name}:\n{text}");
    assert_eq!(sample(families, "overlayd_watch_connected", &[]), Some(1.0), "{name}");
    assert!(sample(families, "overlayd_watch_lag_revisions", &[]).is_some(), "{name}");
}

#[test]
fn metrics_of_a_cluster_parse_and_say_what_it_did() {
    let bed = bed();
    let c = Cluster::form_with(&bed, 1, 1, &["--metrics-addr", METRICS]).expect("cannot form the cluster");
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    let (a, _) = c.attach(0, "web", "a").unwrap();
    let (_, b_ip) = c.attach(1, "web", "b").unwrap();
    wait_for(T, "a to reach b across the hosts", || a.ping_ok(b_ip, 1).ok()).unwrap();
    a.ping_ok(b_ip, 3).unwrap();
    // An encrypted network beside it: its key epochs are gauges.
    c.agents[0].json(&["network", "create", "sec", "--encrypted"]).unwrap();
    let (s1, _) = c.attach(0, "sec", "s1").unwrap();
    let (_, s2_ip) = c.attach(1, "sec", "s2").unwrap();
    wait_for(T, "s1 to reach s2", || s1.ping_ok(s2_ip, 1).ok()).unwrap();

    for (i, host) in c.hosts.iter().enumerate() {
        // Gossip counts the other host alive within a round or two of the join.
        let text = wait_for(T, &format!("both hosts alive in the metrics of {}", host.name()), || {
            let text = scrape(host);
            (sample(&parse(&text), "overlayd_gossip_members", &[("state", "alive")]) == Some(2.0)).then_some(text)
        })
        .unwrap();
        let families = parse(&text);
        check_common(host, &text, &families);
        assert_eq!(series(&scrape(host)), series(&text), "{}: two scrapes list other series", host.name());
        let raft = |s: &str| sample(&families, s, &[]);
        if i == 0 {
            let me = c.agents[0].status().unwrap()["cluster"]["node_id"].as_f64().unwrap();
            assert!(raft("overlayd_raft_term").unwrap_or(0.0) >= 1.0, "no term:\n{text}");
            assert_eq!(raft("overlayd_raft_leader_id"), Some(me), "the only manager leads:\n{text}");
            assert_eq!(raft("overlayd_raft_is_leader"), Some(1.0));
            assert_eq!(raft("overlayd_raft_voters"), Some(1.0));
            let (last, commit, applied) = (
                raft("overlayd_raft_last_log_index").unwrap(),
                raft("overlayd_raft_commit_index").unwrap(),
                raft("overlayd_raft_applied_index").unwrap(),
            );
            assert!(applied >= 1.0 && applied <= commit && commit <= last, "{applied} {commit} {last}:\n{text}");
            assert_eq!(raft("overlayd_raft_proposals_failed_total"), Some(0.0), "{text}");
        } else {
            assert_eq!(raft("overlayd_raft_term"), None, "a worker runs no Raft:\n{text}");
        }
        let key = |role: &str| sample(&families, "overlayd_network_key_epoch", &[("network", "sec"), ("role", role)]);
        assert_eq!((key("sealing"), key("opening")), (Some(0.0), Some(0.0)), "{text}");
        assert_eq!(sample(&families, "overlayd_network_keys_opening", &[("network", "sec")]), Some(1.0), "{text}");
        assert_eq!(
            sample(&families, "overlayd_network_key_epoch", &[("network", "web")]),
            None,
            "a plain network has no key:\n{text}"
        );
        eprintln!("{}: {} families, {} series", host.name(), families.len(), series(&text).len());
    }
    // A rotation: both epochs opened during the window, the new one sealed with after a moment.
    c.agents[0].json(&["network", "rotate-key", "sec"]).unwrap();
    wait_for(T, "h2's metrics to show the new key", || {
        let families = parse(&scrape(&c.hosts[1]));
        let key = |role: &str| sample(&families, "overlayd_network_key_epoch", &[("network", "sec"), ("role", role)]);
        let opening = sample(&families, "overlayd_network_keys_opening", &[("network", "sec")]);
        (key("sealing") == Some(1.0) && key("opening") == Some(1.0) && opening == Some(2.0)).then_some(())
    })
    .unwrap();
}
