//! The CLI refuses bad input with a message that says what to fix, before touching the host.

use std::process::Command;

fn overlayd(args: &[&str]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("overlayd-cli-test-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_overlayd")).arg("--state-dir").arg(&dir).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn daemon_without_an_underlay_address_says_how_to_give_one() {
    let (ok, msg) = overlayd(&["daemon", "--vni", "1"]);
    assert!(!ok);
    assert!(msg.contains("--underlay-addr"), "{msg}");
}

#[test]
fn daemon_without_a_network_says_how_to_give_one() {
    let (ok, msg) = overlayd(&["daemon", "--underlay-addr", "198.18.0.1"]);
    assert!(!ok);
    assert!(msg.contains("--vni") && msg.contains("[[network]]"), "{msg}");
}

#[test]
fn malformed_values_are_refused() {
    for (args, needle) in [
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "16777216"], "24 bits"),
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "0", "--peer", "198.18.0.2"], "VNI 0 is refused"),
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "1", "--fdb", "02:00:00:00:00:01"], "MAC=VTEP"),
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "1", "--arp", "10.0.0.1=nope"], "MAC address"),
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "1", "--peer", "198.18.0.1"], "own underlay address"),
        (vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "1", "--source-ports", "9-1"], "first port"),
        (
            vec!["daemon", "--underlay-addr", "198.18.0.1", "--vni", "1", "--name", "waytoolongname"],
            "1 to 10 characters",
        ),
        (vec!["daemon", "--log", "verbose"], "is not a level"),
        (vec!["daemon", "--listen-addr", "every"], "--listen-addr"),
    ] {
        let (ok, msg) = overlayd(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(msg.contains(needle), "{args:?}: {msg}");
    }
}

#[test]
fn a_bad_config_file_names_the_problem() {
    let path = std::env::temp_dir().join(format!("overlayd-cli-test-{}.toml", std::process::id()));
    std::fs::write(&path, "underlay_addr = \"198.18.0.1\"\n[[network]]\nvni = 1\npeerz = []\n").unwrap();
    let (ok, msg) = overlayd(&["daemon", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(msg.contains("unknown field") && msg.contains("peerz"), "{msg}");
    std::fs::write(&path, "[[network]]\nvni = 1\n[[network]]\nvni = 1\n").unwrap();
    let (ok, msg) = overlayd(&["daemon", "--underlay-addr", "198.18.0.1", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(msg.contains("configured twice"), "{msg}");
    std::fs::write(&path, "[[network]]\nvni = 0\npeers = [\"198.18.0.2\"]\n").unwrap();
    let (ok, msg) = overlayd(&["daemon", "--underlay-addr", "198.18.0.1", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(msg.contains("VNI 0 is refused"), "{msg}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn status_without_a_daemon_says_so() {
    let (ok, msg) = overlayd(&["status"]);
    assert!(!ok);
    assert!(msg.contains("cannot reach the overlayd daemon"), "{msg}");
}

#[test]
fn help_teaches_the_config_format() {
    let (ok, msg) = overlayd(&["daemon", "--help"]);
    assert!(ok);
    for needle in ["[[network]]", "--peer", "--underlay-addr", "dstport 4789"] {
        assert!(msg.contains(needle), "daemon --help lacks {needle}");
    }
}

/// Runs a copy of the binary (in a directory anyone may enter: the build's may not be) as the
/// unprivileged user `nobody`, with setpriv (util-linux).
fn as_nobody(args: &[&str]) -> (bool, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("overlayd-cli-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("overlayd");
    std::fs::copy(env!("CARGO_BIN_EXE_overlayd"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A state dir as the daemon makes it: root's, mode 0700.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(&bin)
        .arg("--state-dir")
        .arg(&state)
        .args(args)
        .output()
        .expect("cannot run setpriv (util-linux)");
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn without_root_the_daemon_and_the_commands_say_so() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test drops root itself: run it as root");
    let (ok, msg) = as_nobody(&["daemon"]);
    assert!(!ok, "a daemon without root started: {msg}");
    assert!(msg.contains("needs root (or CAP_NET_ADMIN"), "{msg}");
    assert!(!msg.contains("ready"), "it never says it is ready: {msg}");
    for cmd in
        [vec!["status"], vec!["network", "ls"], vec!["node", "list"], vec!["attach", "--network", "x", "--pid", "1"]]
    {
        let (ok, msg) = as_nobody(&cmd);
        assert!(!ok, "{cmd:?} succeeded without root: {msg}");
        assert!(msg.contains("only root may use") && msg.contains("sudo"), "{cmd:?}: {msg}");
    }
    // leave --force needs no daemon, but it does need to read the state dir: it is refused,
    // never answered with "no cluster membership" because the dir could not be looked into.
    let (ok, msg) = as_nobody(&["leave", "--force"]);
    assert!(!ok, "leave --force succeeded without root: {msg}");
    assert!(msg.contains("only root may use") && msg.contains("sudo"), "leave --force: {msg}");
    assert!(!msg.contains("no cluster membership"), "leave --force: {msg}");
}

/// A command line clap refuses, given `--json`, prints the README's error object on stdout with
/// the usage exit code (2); without `--json`, clap's message on stderr and nothing on stdout.
#[test]
fn a_usage_error_with_json_is_printed_as_json() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_overlayd")).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["network", "create", "web", "--mtu", "abc", "--json"]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    assert_eq!(v["error"]["class"], "usage", "{v}");
    assert_eq!(v["error"]["exit_code"], 2, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--mtu") && message.contains("abc"), "{v}");
    assert!(stderr.contains("--mtu"), "the message goes to stderr too: {stderr}");

    let (code, stdout, stderr) = run(&["network", "create", "web", "--mtu", "abc"]);
    assert_eq!(code, Some(2));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("--mtu"), "{stderr}");
}

/// A port out of range is refused in words, not with a Rust range.
#[test]
fn a_port_out_of_range_says_which_ports_are_valid() {
    for (args, needle) in [
        (vec!["init", "--gossip-port", "0"], "--gossip-port"),
        (vec!["daemon", "--vxlan-port", "0"], "--vxlan-port"),
        (vec!["service", "create", "s", "--network", "n", "--health-tcp", "70000"], "--health-tcp"),
    ] {
        let (ok, msg) = overlayd(&args);
        assert!(!ok, "{args:?}");
        assert!(msg.contains(needle) && msg.contains("port from 1 to 65535"), "{args:?}: {msg}");
        assert!(!msg.contains("..="), "{args:?}: {msg}");
    }
}
