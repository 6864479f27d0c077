//! Installing and running overlayd as a service (issue 17, item 1): `scripts/install` into a
//! staging directory puts the binary, the systemd unit, the manual page and the bash completions
//! where they belong; the unit passes `systemd-analyze verify`; the manual page renders with
//! `man -l`; the completions load in bash and complete; and the daemon tells systemd it is ready
//! (`Type=notify`) once it answers commands, and that it is stopping on SIGTERM.
//!
//! They need root (the daemon's namespace), systemd-analyze (systemd), man (man-db) and bash.
//! They fail, never skip.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testbed::{Options, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_overlayd");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_install_script_puts_a_unit_a_manual_page_and_completions_that_work() {
    let stage = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let said = run(Command::new(root.join("scripts/install")).env("DESTDIR", stage.path()).env("OVERLAYD_BIN", BIN));
    assert!(said.contains("4789/udp") && said.contains("7947/tcp"), "the ports to open: {said}");
    let at = |p: &str| stage.path().join(p.trim_start_matches('/'));
    let bin = at("/usr/local/bin/overlayd");
    assert!(bin.is_file());

    // The unit, pointed at the staged binary (the installed one is not on this machine).
    let unit = std::fs::read_to_string(at("/etc/systemd/system/overlayd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/overlayd daemon") && unit.contains("Type=notify"));
    let check = stage.path().join("overlayd.service");
    std::fs::write(&check, unit.replace("/usr/local/bin/overlayd", &bin.to_string_lossy())).unwrap();
    run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&check));

    // The manual page renders, and has every command.
    let page =
        run(Command::new("man").env("MANWIDTH", "100").arg("-l").arg(at("/usr/local/share/man/man8/overlayd.8")));
    for word in ["overlayd", "SYNOPSIS", "network", "service", "attach", "join"] {
        assert!(page.contains(word), "the manual page lacks {word:?}: {page}");
    }

    // The completions load and complete a subcommand.
    let completions = at("/usr/share/bash-completion/completions/overlayd");
    let script = format!(
        "source '{}' && COMP_WORDS=(overlayd netw) && COMP_CWORD=1 && _overlayd overlayd netw overlayd && echo \"${{COMPREPLY[@]}}\"",
        completions.display()
    );
    let offered = run(Command::new("bash").args(["-c", &script]));
    assert_eq!(offered.trim(), "network", "bash completion of `overlayd netw`");
}

#[test]
fn the_daemon_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let bed = Testbed::new(Options::new(BIN)).expect("cannot build the testbed (run as root)");
    let host = bed.add_host().unwrap();
    let socket_path = bed.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let notify = socket_path.to_string_lossy().into_owned();
    // start_daemon returns once the daemon answers `overlayd status`: it said so before.
    let agent = host.start_daemon_env::<&str>(&[("NOTIFY_SOCKET", &notify)], &[]).unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("no READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    agent.terminate().unwrap();
    let n = socket.recv(&mut buf).expect("no STOPPING=1 from the daemon");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn the_debian_package_holds_the_binary_the_unit_the_manual_page_and_the_completions() {
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let deb = run(Command::new(root.join("scripts/deb"))
        .env("OVERLAYD_BIN", BIN)
        .env("OUT", out.path())
        .env("COMPRESS", "gzip"));
    let deb = Path::new(deb.trim());
    assert!(deb.is_file() && deb.to_string_lossy().ends_with(".deb"), "{}", deb.display());
    let info = run(Command::new("dpkg-deb").arg("--info").arg(deb));
    for field in ["Package: overlayd", "Depends: iproute2, nftables", "Architecture: "] {
        assert!(info.contains(field), "the control file lacks {field:?}: {info}");
    }
    let version = run(Command::new(BIN).arg("--version"));
    assert!(info.contains(&format!("Version: {}", version.split_whitespace().nth(1).unwrap())), "{info}");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for file in [
        "./usr/bin/overlayd",
        "./lib/systemd/system/overlayd.service",
        "./usr/share/man/man8/overlayd.8.gz",
        "./usr/share/bash-completion/completions/overlayd",
        "./usr/share/doc/overlayd/copyright",
    ] {
        assert!(contents.contains(file), "the package lacks {file}: {contents}");
    }
    assert!(contents.lines().next().is_some_and(|l| l.starts_with("drwxr-xr-x root/root")), "{contents}");
    // Unpacked, the binary runs and the unit points at it.
    let x = out.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x));
    assert_eq!(run(Command::new(x.join("usr/bin/overlayd")).arg("--version")), version);
    let unit = std::fs::read_to_string(x.join("lib/systemd/system/overlayd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/overlayd daemon"), "{unit}");
}
