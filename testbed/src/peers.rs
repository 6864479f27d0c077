//! The userspace tunnels a user would pick instead of an overlay — tinc 1.0, n2n, nebula and
//! vpncloud — set up between the two hosts of a [`scenario`](crate::scenario) pair, so that the
//! end-to-end benchmark measures them in the same topology and the same run as overlayd.
//!
//! Each runs unmodified (Debian's packages; vpncloud from crates.io) inside the testbed's host
//! namespaces, with its configuration, keys and log in the testbed's temp dir, and is stopped by
//! PID with the testbed. Settings favour speed: no encryption where the tool can turn it off, and
//! the largest inner MTU whose packets fit one 1500-byte underlay packet (measured with
//! `ping -M do` and tcpdump on the underlay). The L2 tunnels (tinc, n2n, vpncloud) put their TAP
//! on a bridge with the container's veth, as the kernel-VXLAN path does with its vxlan device;
//! nebula is L3 and is measured host to host over its own addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::scenario::Path;
use crate::{Agent, Host, Node, Options, netns};

/// Inner MTU of tinc: a frame gains 4 bytes (sequence number; no MAC, no cipher padding) and
/// the outer IPv4 and UDP headers, so up to 1454 fits; 1450 as for kernel VXLAN.
pub const TINC_MTU: u32 = 1450;
/// Inner MTU of tinc with its default cipher and digest: the sequence number and the frame are
/// padded to Blowfish's 8-byte block (1 to 8 bytes) and a 4-byte MAC follows, so an inner MTU
/// up to 1442 always fits (tinc 1.0's `net_packet.c`); 1440.
pub const TINC_ENCRYPTED_MTU: u32 = 1440;
/// Inner MTU of n2n 1.3: a frame gains 94 bytes (its header and the Twofish envelope) plus the
/// outer headers, so up to 1364 fits; its default of 1400 is fragmented on the underlay.
pub const N2N_MTU: u32 = 1360;
/// Inner MTU of nebula: a packet gains a 16-byte header and a 16-byte AES-GCM tag plus the outer
/// headers, so 1440 fits exactly (its default is 1300).
pub const NEBULA_MTU: u32 = 1440;
/// Inner MTU of vpncloud with `--algorithm plain`: a frame gains one message-type byte plus the
/// outer headers, so up to 1457 fits; 1450 as for kernel VXLAN.
pub const VPNCLOUD_MTU: u32 = 1450;
/// Inner MTU of vpncloud with `--algorithm aes256`: the frame also gains an 8-byte crypto
/// header and the 16-byte AES-GCM tag (`EXTRA_LEN`, `TAG_LEN` in its `crypto/core.rs`), so up
/// to 1433 fits; 1420.
pub const VPNCLOUD_ENCRYPTED_MTU: u32 = 1420;

/// Inner MTU of `tap-floor`: the same as kernel VXLAN's, so that the containers' TCP sees the
/// same MSS (its chunks are cut to fit a 1500-byte underlay whatever the frame size).
pub const TAP_FLOOR_MTU: u32 = 1450;

/// How long a tunnel may take to carry its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The container addresses of the L2 tunnels (the same as the kernel-VXLAN path's).
const C1: &str = "10.100.0.1/24";
const C2: &str = "10.100.0.2/24";

/// A built peer path, for `scenario::build_with`.
pub(crate) struct Built {
    pub client: Node,
    pub server: Node,
    pub server_ip: IpAddr,
    /// The tunnel daemons, one per host, whose CPU time the benchmark reports as the agents'.
    pub daemons: Vec<Agent>,
}

/// Sets up `path`'s tunnel between `h1` and `h2`; fails (the testbed then removes what was
/// made) with what is missing or what the daemon logged.
pub(crate) fn build(path: Path, h1: &Host, h2: &Host, options: &Options) -> Result<Built> {
    ensure!(options.underlay_mtu >= 1500, "the peer tunnels' MTUs are chosen for an underlay MTU of 1500");
    match path {
        Path::Tinc => tinc(h1, h2, false),
        Path::TincEncrypted => tinc(h1, h2, true),
        Path::N2n => n2n(h1, h2),
        Path::Nebula => nebula(h1, h2),
        Path::Vpncloud => vpncloud(h1, h2, &vpncloud_binary(options)?, false),
        Path::VpncloudEncrypted => vpncloud(h1, h2, &vpncloud_binary(options)?, true),
        Path::TapFloor => tap_floor(h1, h2, &tap_floor_binary()?),
        Path::Veth | Path::KernelVxlan | Path::Overlayd | Path::OverlaydEncrypted => {
            bail!("{path:?} is not a peer tunnel")
        }
    }
}

/// The installed version of a peer's program, as it reports it (for the benchmark's header).
pub fn version(path: Path, options: &Options) -> Result<String> {
    let (program, args): (PathBuf, &[&str]) = match path {
        Path::Tinc | Path::TincEncrypted => (find("tincd", "apt-get install tinc")?, &["--version"]),
        Path::N2n => (find("edge", "apt-get install n2n")?, &["-h"]),
        Path::Nebula => (find("nebula", "apt-get install nebula")?, &["-version"]),
        Path::Vpncloud | Path::VpncloudEncrypted => (vpncloud_binary(options)?, &["--version"]),
        Path::TapFloor => return Ok(format!("tap-floor at {} (this repository)", tap_floor_binary()?.display())),
        Path::Veth | Path::KernelVxlan | Path::Overlayd | Path::OverlaydEncrypted => {
            bail!("{path:?} is not a peer tunnel")
        }
    };
    // n2n's edge prints its version in the usage text and exits with 1; any output will do.
    let out = Command::new(&program).args(args).stdin(Stdio::null()).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.chars().any(|c| c.is_ascii_digit())).unwrap_or("").trim();
    Ok(line.to_owned())
}

/// The vpncloud binary: `options.vpncloud`, else `vpncloud` on `$PATH`, else where
/// `cargo install vpncloud --root target/vpncloud-install` puts it (next to this executable's
/// target dir), else `~/.cargo/bin/vpncloud`.
pub fn vpncloud_binary(options: &Options) -> Result<PathBuf> {
    if let Some(p) = &options.vpncloud {
        ensure!(p.is_file(), "vpncloud: no binary at {}", p.display());
        return Ok(p.clone());
    }
    let install = "cargo install vpncloud --root target/vpncloud-install, or pass --vpncloud PATH";
    if let Ok(p) = find("vpncloud", install) {
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Some(target) = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.parent()?.to_owned())) {
        candidates.push(target.join("vpncloud-install/bin/vpncloud"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/vpncloud"));
    }
    candidates.into_iter().find(|p| p.is_file()).with_context(|| format!("vpncloud: not installed ({install})"))
}

/// `program` on `$PATH` or in the sbin directories (which `sudo` may leave off the path).
fn find(program: &str, install: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program}: not installed ({install})"))
}

/// tinc 1.0 in switch mode, `Cipher = none` and `Digest = none` (so no MAC either) unless
/// `encrypted` (then its defaults, Blowfish-CBC and HMAC-SHA1 cut to 4 bytes), path MTU
/// discovery off (the MTU is chosen to fit, and with discovery on tinc 1.0 sends frames larger
/// than the MTU found so far over its TCP meta connection), RSA keys for the meta connection.
fn tinc(h1: &Host, h2: &Host, encrypted: bool) -> Result<Built> {
    let tincd = find("tincd", "apt-get install tinc")?;
    let hosts = [h1, h2];
    let dirs: Vec<PathBuf> = hosts.iter().map(|h| h.node.inner.dir.join(format!("tinc-{}", h.name()))).collect();
    for (i, (h, dir)) in hosts.iter().zip(&dirs).enumerate() {
        std::fs::create_dir_all(dir.join("hosts")).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut conf = format!(
            "Name = {}\nMode = switch\nInterface = tinc0\nAddressFamily = ipv4\nBindToAddress = {}\nPMTUDiscovery = no\n",
            h.name(),
            h.addr()
        );
        // Host 2's tincd starts second, so it connects to host 1's, which is already listening
        // (the other way round, tinc 1.0 would wait 5 s before retrying).
        if i == 1 {
            conf.push_str(&format!("ConnectTo = {}\n", h1.name()));
        }
        std::fs::write(dir.join("tinc.conf"), conf)?;
        // The node's own host file holds the settings peers must use towards it.
        let mut host_file = format!("Address = {}\nPort = 655\n", h.addr());
        if !encrypted {
            host_file.push_str("Cipher = none\nDigest = none\n");
        }
        std::fs::write(dir.join("hosts").join(h.name()), host_file)?;
        // Appends the public key to the host file; with stdin not a terminal it asks nothing.
        netns::exec(h.ns(), &tincd.to_string_lossy(), ["-c", &dir.to_string_lossy(), "-K2048"])
            .context("tinc key generation")?;
    }
    for (i, h) in hosts.iter().enumerate() {
        let from = dirs[i].join("hosts").join(h.name());
        std::fs::copy(&from, dirs[1 - i].join("hosts").join(h.name()))
            .with_context(|| format!("cannot copy {}", from.display()))?;
    }
    let mtu = if encrypted { TINC_ENCRYPTED_MTU } else { TINC_MTU };
    l2_pair(h1, h2, "brtinc", "tinc0", mtu, |i, h| {
        let dir = dirs[i].to_string_lossy().into_owned();
        let pidfile = dirs[i].join("tincd.pid").to_string_lossy().into_owned();
        let args = ["-c", &dir, "-D", "-d1", "--pidfile", &pidfile];
        let log = h.node.inner.dir.join(format!("tinc-{}.log", h.name()));
        h.spawn_daemon(&format!("tincd on {}", h.name()), &tincd, &args, &log)
    })
}

/// n2n 1.3 (Debian's `n2n` is the 1.x line): the supernode on host 1, an edge on each host with
/// `-r` (else an edge drops IPv4 packets not addressed to its own `-a` address) and `-M 1360`.
/// n2n 1.x always encrypts with Twofish: `-k` is required and there is no cipher-off flag (the
/// null transform and `-A1` arrived in n2n 2.x / 3.x).
fn n2n(h1: &Host, h2: &Host) -> Result<Built> {
    let edge = find("edge", "apt-get install n2n")?;
    let supernode = find("supernode", "apt-get install n2n")?;
    let port = "7654";
    let log = h1.node.inner.dir.join("n2n-supernode.log");
    let sn = h1.spawn_daemon("n2n supernode on h1", &supernode, &["-l", port], &log)?;
    let needle = format!(":{port} ");
    crate::measure::wait_for(Duration::from_secs(5), "the n2n supernode to listen", || {
        let out = netns::exec(h1.ns(), "ss", ["-lunH"]).ok()?;
        String::from_utf8_lossy(&out.stdout).contains(&needle).then_some(())
    })
    .with_context(|| daemon_logs(&[&sn]))?;
    let supernode_at = format!("{}:{port}", h1.addr());
    l2_pair(h1, h2, "brn2n", "n2n0", N2N_MTU, |i, h| {
        let n = i + 1;
        let args = [
            "-d".to_owned(),
            "n2n0".into(),
            "-a".into(),
            format!("10.200.0.{n}"),
            "-s".into(),
            "255.255.255.0".into(),
            "-c".into(),
            "overlayd-bench".into(),
            "-k".into(),
            "overlayd-bench".into(),
            "-l".into(),
            supernode_at.clone(),
            "-m".into(),
            format!("02:6e:32:6e:00:{n:02x}"),
            "-M".into(),
            N2N_MTU.to_string(),
            "-r".into(),
        ];
        let log = h.node.inner.dir.join(format!("n2n-edge-{}.log", h.name()));
        h.spawn_daemon(&format!("n2n edge on {}", h.name()), &edge, &args, &log)
    })
}

/// nebula, L3: a CA and one certificate per host made with `nebula-cert`, each host given the
/// other's underlay address in `static_host_map` (no lighthouse, no punching), every protocol
/// allowed by the firewall, `cipher: aes` (its default, AES-256-GCM; the other choice is
/// ChaCha20-Poly1305, there is no null cipher), tun MTU 1440, its default one routine.
/// Measured between the two host namespaces over the nebula addresses 10.201.0.1 → .2.
fn nebula(h1: &Host, h2: &Host) -> Result<Built> {
    let nebula = find("nebula", "apt-get install nebula")?;
    let cert = find("nebula-cert", "apt-get install nebula")?;
    let dir = h1.node.inner.dir.join("nebula");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let cert_tool = cert.to_string_lossy();
    let (ca_crt, ca_key) = (path("ca.crt"), path("ca.key"));
    netns::exec(h1.ns(), &cert_tool, ["ca", "-name", "overlayd-bench", "-out-crt", &ca_crt, "-out-key", &ca_key])
        .context("nebula-cert ca")?;
    let hosts = [h1, h2];
    let overlay_ip = |i: usize| Ipv4Addr::new(10, 201, 0, i as u8 + 1);
    let mut daemons = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let (crt, key) = (path(&format!("{}.crt", h.name())), path(&format!("{}.key", h.name())));
        let ip = format!("{}/24", overlay_ip(i));
        netns::exec(
            h.ns(),
            &cert_tool,
            [
                "sign",
                "-ca-crt",
                &ca_crt,
                "-ca-key",
                &ca_key,
                "-name",
                h.name(),
                "-ip",
                &ip,
                "-out-crt",
                &crt,
                "-out-key",
                &key,
            ],
        )
        .context("nebula-cert sign")?;
        let peer = hosts[1 - i];
        let config = format!(
            r#"pki:
  ca: "{ca_crt}"
  cert: "{crt}"
  key: "{key}"
static_host_map:
  "{peer_ip}": ["{peer_addr}:4242"]
lighthouse:
  am_lighthouse: false
  hosts: []
listen:
  host: "{addr}"
  port: 4242
punchy:
  punch: false
cipher: aes
tun:
  disabled: false
  dev: nebula1
  mtu: {NEBULA_MTU}
logging:
  level: info
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
"#,
            peer_ip = overlay_ip(1 - i),
            peer_addr = peer.addr(),
            addr = h.addr(),
        );
        let conf = path(&format!("{}.yml", h.name()));
        std::fs::write(&conf, config)?;
        let log = h.node.inner.dir.join(format!("nebula-{}.log", h.name()));
        daemons.push(h.spawn_daemon(&format!("nebula on {}", h.name()), &nebula, &["-config", &conf], &log)?);
    }
    let server_ip = IpAddr::V4(overlay_ip(1));
    wait_reachable(h1, server_ip, &daemons)?;
    Ok(Built { client: h1.node.clone(), server: h2.node.clone(), server_ip, daemons })
}

/// vpncloud 2.x: TAP, `--mode switch`, `--algorithm plain` (no encryption; the password only
/// authenticates the handshake) or, if `encrypted`, `--algorithm aes256` (AES-256-GCM),
/// `--no-port-forwarding`, one peer given with `-c`.
///
/// vpncloud learns its own address by `connect`ing a UDP socket to 8.8.8.8 (no packet is
/// sent) and panics when the namespace has no route there; each host namespace therefore gets
/// a route to 8.8.8.8/32 via its underlay veth, and an nftables rule in that namespace that
/// drops anything addressed there, so not a packet can leave for it (nor could one get
/// anywhere: the switch namespace has no uplink).
fn vpncloud(h1: &Host, h2: &Host, vpncloud: &FsPath, encrypted: bool) -> Result<Built> {
    for h in [h1, h2] {
        h.node.nft(
            "table ip ovtb_guard {\n  chain output {\n    type filter hook output priority 0; policy accept;\n    ip daddr 8.8.8.8 counter drop\n  }\n}\n",
        )?;
        netns::ip(["-n", h.ns(), "route", "add", "8.8.8.8/32", "dev", "ul0"])?;
    }
    let mtu = if encrypted { VPNCLOUD_ENCRYPTED_MTU } else { VPNCLOUD_MTU };
    l2_pair(h1, h2, "brvpc", "vpc0", mtu, |i, h| {
        let peer = if i == 0 { h2 } else { h1 };
        let args = [
            "--type".to_owned(),
            "tap".into(),
            "--device".into(),
            "vpc0".into(),
            "--mode".into(),
            "switch".into(),
            "--listen".into(),
            format!("{}:3210", h.addr()),
            "--peer".into(),
            format!("{}:3210", peer.addr()),
            "--password".into(),
            "overlayd-bench".into(),
            "--algorithm".into(),
            if encrypted { "aes256" } else { "plain" }.into(),
            "--no-port-forwarding".into(),
        ];
        let log = h.node.inner.dir.join(format!("vpncloud-{}.log", h.name()));
        h.spawn_daemon(&format!("vpncloud on {}", h.name()), vpncloud, &args, &log)
    })
}

/// `tap-floor`, built next to the running benchmark (`cargo build --release -p
/// overlayd-benches` builds both).
pub fn tap_floor_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let p = exe.with_file_name("tap-floor");
    ensure!(p.is_file(), "tap-floor: not next to {} (cargo build --release -p overlayd-benches)", exe.display());
    Ok(p)
}

/// `tap-floor` on each host: a TAP on the bridge, UDP port 4790 to the other host.
fn tap_floor(h1: &Host, h2: &Host, program: &FsPath) -> Result<Built> {
    l2_pair(h1, h2, "brfl", "fl0", TAP_FLOOR_MTU, |i, h| {
        let peer = if i == 0 { h2 } else { h1 };
        let args = ["fl0".to_owned(), format!("{}:4790", h.addr()), format!("{}:4790", peer.addr())];
        let log = h.node.inner.dir.join(format!("tap-floor-{}.log", h.name()));
        h.spawn_daemon(&format!("tap-floor on {}", h.name()), program, &args, &log)
    })
}

/// An L2 tunnel between two hosts: on each, a bridge of MTU `mtu`, the daemon `start` makes
/// (it creates the TAP `dev`, which then goes on the bridge), and a container on the bridge
/// (10.100.0.1 on `h1`, 10.100.0.2 on `h2`); ready once the containers ping each other.
fn l2_pair(
    h1: &Host,
    h2: &Host,
    bridge: &str,
    dev: &str,
    mtu: u32,
    mut start: impl FnMut(usize, &Host) -> Result<Agent>,
) -> Result<Built> {
    let mtu_s = mtu.to_string();
    let mut daemons = Vec::new();
    for (i, h) in [h1, h2].into_iter().enumerate() {
        let ns = h.ns();
        netns::ip(["-n", ns, "link", "add", bridge, "mtu", &mtu_s, "type", "bridge", "mcast_snooping", "0"])?;
        netns::ip(["-n", ns, "link", "set", bridge, "up"])?;
        let daemon = start(i, h)?;
        wait_until(Duration::from_secs(10), &format!("{dev} in {ns}"), &[&daemon], || {
            netns::ip(["-n", ns, "link", "show", "dev", dev]).is_ok()
        })?;
        netns::ip(["-n", ns, "link", "set", dev, "mtu", &mtu_s, "master", bridge, "up"])?;
        daemons.push(daemon);
    }
    let c1 = h1.add_container("c1", bridge, C1)?;
    let c2 = h2.add_container("c2", bridge, C2)?;
    wait_reachable(&c1, c2.ip(), &daemons)?;
    Ok(Built { client: c1.node.clone(), server: c2.node.clone(), server_ip: c2.ip(), daemons })
}

/// Waits until `from` gets a ping reply from `to` through the tunnel.
fn wait_reachable(from: &Node, to: IpAddr, daemons: &[Agent]) -> Result<()> {
    let refs: Vec<&Agent> = daemons.iter().collect();
    wait_until(READY_TIMEOUT, &format!("a ping reply from {to}"), &refs, || {
        from.ping(to, 1).is_ok_and(|p| p.received == 1)
    })
}

/// Polls `ready` until it holds; fails at once if a daemon exits, or after `timeout`, with the
/// daemons' last log lines.
fn wait_until(timeout: Duration, what: &str, daemons: &[&Agent], mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((d, status)) = daemons.iter().find_map(|d| Some((d, d.exited()?))) {
            bail!(
                "the tunnel daemon on {} exited ({status}) while waiting for {what}; {}",
                d.host,
                daemon_logs(daemons)
            );
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; {}", daemon_logs(daemons));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines each daemon logged, for an error message.
fn daemon_logs(daemons: &[&Agent]) -> String {
    let mut o = String::from("last log lines:");
    for d in daemons {
        let text = std::fs::read_to_string(&d.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(4).collect();
        let tail = if tail.is_empty() {
            "(nothing)".to_owned()
        } else {
            tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        };
        o.push_str(&format!("\n[{}] {tail}", d.host));
    }
    o
}
