//! Output that scripts can trust (issue 17): `--json` of every command parses, gives the
//! same keys in the same order twice in a row, has the top-level keys the README documents
//! ("Scripting: JSON and exit codes"), prints `null` (never an empty string) for what is absent,
//! keys as hex strings; a failed command prints its error as JSON on stdout with the documented
//! exit code. Real daemons in a two-host cluster; needs root. Fails, never skips.
#![allow(clippy::print_stderr)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::{Options, Testbed};

const T: Duration = Duration::from_secs(20);

/// Every key path of `v` in the order printed (arrays: their first element's).
fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{prefix}.{k}");
                out.push(p.clone());
                key_paths(x, &p, out);
            }
        }
        Value::Array(a) => {
            if let Some(first) = a.first() {
                key_paths(first, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// No string value is empty (an absent value is null).
fn no_empty_strings(v: &Value, path: &str) {
    match v {
        Value::String(s) => assert!(!s.is_empty(), "{path} is an empty string where null is meant"),
        Value::Array(a) => a.iter().for_each(|x| no_empty_strings(x, &format!("{path}[]"))),
        Value::Object(m) => m.iter().for_each(|(k, x)| no_empty_strings(x, &format!("{path}.{k}"))),
        _ => {}
    }
}

/// The README's table of each command's top-level JSON keys: command → keys.
fn documented() -> BTreeMap<String, Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let Some(section) = readme.split("### JSON shapes").nth(1) else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with("| command")).skip(2) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let command = cells[1].trim_matches('`').to_owned();
        let keys =
            cells[2].split(',').map(|k| k.trim().trim_matches('`').to_owned()).filter(|k| !k.is_empty()).collect();
        out.insert(command, keys);
    }
    out
}

#[test]
fn every_json_output_is_stable_documented_and_says_null_for_what_is_absent_and_errors_are_json_too() {
    let bed =
        Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)");
    let c = Cluster::form(&bed, 1, 1).expect("cluster");
    c.await_nodes(2, &[], T).unwrap();
    c.agents[0].json(&["network", "create", "web"]).unwrap();
    c.agents[0].json(&["service", "create", "api", "--network", "web", "--port", "80/tcp"]).unwrap();
    let (a, _) = c.attach(0, "web", "a").unwrap();
    let (_, b_ip) = c.attach(1, "web", "b").unwrap();
    a.ping_ok(b_ip, 2).unwrap();

    let docs = documented();
    let mut undocumented = Vec::new();
    let commands: &[&[&str]] = &[
        &["status"],
        &["fdb"],
        &["peers"],
        &["node", "ls"],
        &["network", "ls"],
        &["network", "inspect", "web"],
        &["service", "ls"],
        &["service", "inspect", "api"],
        &["dns"],
        &["join-token", "worker"],
    ];
    for cmd in commands {
        let name = cmd
            .iter()
            .take_while(|w| *w != &"web" && *w != &"api" && *w != &"worker")
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        let first = c.agents[0].json(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e:#}"));
        let second = c.agents[0].json(cmd).unwrap();
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        key_paths(&first, "", &mut k1);
        key_paths(&second, "", &mut k2);
        assert_eq!(k1, k2, "{name}: the keys or their order changed between two calls");
        no_empty_strings(&first, &name);
        let top: Vec<String> =
            first.as_object().unwrap_or_else(|| panic!("{name}: not an object")).keys().cloned().collect();
        if docs.get(&name) != Some(&top) {
            undocumented.push(format!(
                "| `{name}` | {} |",
                top.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        eprintln!("{name}: {} key paths, stable", k1.len());
    }
    assert!(
        undocumented.is_empty(),
        "the README's JSON shapes differ; these rows are right:\n{}",
        undocumented.join("\n")
    );
    // Keys are hex strings, not arrays of numbers.
    let nodes = c.agents[0].json(&["node", "ls"]).unwrap();
    let key = nodes["nodes"][0]["gossip_public_key"].as_str().unwrap_or_else(|| panic!("not a string: {nodes}"));
    assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
    // This host's own block has no VTEP: null, and `local`.
    let fdb = c.agents[0].json(&["fdb"]).unwrap();
    let own = fdb["networks"][0]["blocks"].as_array().unwrap().iter().find(|b| b["local"] == true).cloned();
    assert_eq!(own.unwrap_or_else(|| panic!("no local block: {fdb}"))["vtep"], Value::Null);

    // Errors: JSON on stdout, the class's exit code.
    let run = |args: &[&str], state: &std::path::Path| {
        let out = Command::new("ip")
            .args(["netns", "exec", c.hosts[1].ns(), env!("CARGO_BIN_EXE_overlayd"), "--state-dir"])
            .arg(state)
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: no JSON on stdout ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), v)
    };
    let state = c.agents[1].state_dir();
    for (args, code, class) in [
        (vec!["network", "inspect", "nope", "--json"], 5, "not_found"),
        (vec!["network", "create", "x", "--json"], 4, "not_permitted"),
        (vec!["network", "create", "x", "--subnet", "fd00::/64", "--json"], 4, "not_permitted"),
    ] {
        let (got, v) = run(&args, state);
        eprintln!("{args:?}: exit {got:?}, {v}");
        assert_eq!((got, v["error"]["class"].as_str()), (Some(code), Some(class)), "{args:?}: {v}");
        assert_eq!(v["error"]["exit_code"], code);
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (got, v) = run(&["status", "--json"], &bed.dir().join("no-daemon-here"));
    assert_eq!((got, v["error"]["class"].as_str()), (Some(3), Some("unreachable")), "{v}");
    // On a manager, an IPv6 subnet is bad usage, said in words.
    let out = Command::new("ip")
        .args(["netns", "exec", c.hosts[0].ns(), env!("CARGO_BIN_EXE_overlayd"), "--state-dir"])
        .arg(c.agents[0].state_dir())
        .args(["network", "create", "six", "--subnet", "fd00::/64", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("IPv6 subnet: exit {:?}, {v}", out.status.code());
    assert!(v["error"]["message"].as_str().unwrap().contains("IPv4 only"), "{v}");
    assert_eq!(out.status.code(), Some(2), "{v}");
}

/// The commands that change something answer JSON too: each parses, prints `null` for what is
/// absent, has the top-level keys the README documents, and the same command twice (on two
/// networks, containers, nodes) gives the same keys in the same order.
#[test]
fn every_write_command_answers_json_of_the_documented_shape() {
    let bed =
        Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)");
    let mut c = Cluster::form(&bed, 1, 0).expect("cluster");
    let docs = documented();
    let mut outputs: Vec<(String, Value)> = Vec::new();
    let run = |outputs: &mut Vec<(String, Value)>, c: &Cluster, i: usize, name: &str, args: &[&str]| {
        let v = c.agents[i].json(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
        outputs.push((name.to_owned(), v));
    };
    // A cluster of its own on another host: init.
    let lone = c.add_host(&bed).unwrap();
    let addr = c.hosts[lone].addr().to_string();
    let lone_name = c.hosts[lone].name().to_owned();
    run(&mut outputs, &c, lone, "init", &["init", "--advertise-addr", &addr, "--name", &lone_name]);
    // Two hosts join this one's cluster.
    let (w1, w2) = (c.add_host(&bed).unwrap(), c.add_host(&bed).unwrap());
    for w in [w1, w2] {
        let v = c.join(w, 0, &c.worker_token.clone()).unwrap();
        outputs.push(("join".into(), v));
    }
    c.await_nodes(3, &[lone], T).unwrap();
    for w in [w1, w2] {
        let name = c.hosts[w].name().to_owned();
        run(&mut outputs, &c, 0, "node promote", &["node", "promote", &name]);
    }
    for w in [w1, w2] {
        let name = c.hosts[w].name().to_owned();
        run(&mut outputs, &c, 0, "node demote", &["node", "demote", &name]);
    }
    for n in ["x1", "x2"] {
        run(&mut outputs, &c, 0, "network create", &["network", "create", n]);
    }
    for n in ["x1", "x2"] {
        run(&mut outputs, &c, 0, "network update", &["network", "update", n, "--mtu", "1400"]);
    }
    run(&mut outputs, &c, 0, "network create", &["network", "create", "sec", "--encrypted"]);
    for _ in 0..2 {
        run(&mut outputs, &c, 0, "network rotate-key", &["network", "rotate-key", "sec"]);
    }
    for s in ["s1", "s2"] {
        run(&mut outputs, &c, 0, "service create", &["service", "create", s, "--network", "x1", "--port", "80/tcp"]);
    }
    for s in ["s1", "s2"] {
        let ns = c.hosts[0].add_netns(&format!("{s}-a")).unwrap();
        run(
            &mut outputs,
            &c,
            0,
            "attach",
            &["attach", "--network", "x1", "--netns", &ns.netns_path(), "--name", s, "--service", s],
        );
    }
    for s in ["s1", "s2"] {
        run(&mut outputs, &c, 0, "detach", &["detach", "--name", s]);
    }
    for s in ["s1", "s2"] {
        run(&mut outputs, &c, 0, "service rm", &["service", "rm", s]);
    }
    for n in ["x1", "x2"] {
        run(&mut outputs, &c, 0, "network rm", &["network", "rm", n]);
    }
    run(&mut outputs, &c, w1, "leave", &["leave"]);
    run(&mut outputs, &c, lone, "leave", &["leave", "--force"]);
    let gone = c.hosts[w2].name().to_owned();
    run(&mut outputs, &c, 0, "node rm", &["node", "rm", &gone, "--force"]);

    let mut undocumented = Vec::new();
    let mut first_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, v) in &outputs {
        no_empty_strings(v, name);
        let mut paths = Vec::new();
        key_paths(v, "", &mut paths);
        match first_of.get(name) {
            Some(before) => assert_eq!(before, &paths, "{name}: the keys or their order changed between two calls"),
            None => {
                let top: Vec<String> =
                    v.as_object().unwrap_or_else(|| panic!("{name}: not an object: {v}")).keys().cloned().collect();
                if docs.get(name) != Some(&top) {
                    undocumented.push(format!(
                        "| `{name}` | {} |",
                        top.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                    ));
                }
                eprintln!("{name}: {} key paths", paths.len());
                first_of.insert(name.clone(), paths);
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "the README's JSON shapes differ; these rows are right:\n{}",
        undocumented.join("\n")
    );
}
