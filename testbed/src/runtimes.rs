//! Real container runtimes with overlayd as their CNI plugin, for the tests: podman (CNI
//! backend, runc, `--rootfs`) and containerd (`ctr run --cni`), each run inside a host
//! namespace of a [`Testbed`](crate::Testbed) and pointed at that host's daemon; a busybox root
//! filesystem and image, so that no registry is needed. `shared/notes/runtimes.md` has the
//! recipes these follow and why (runc rather than crun, the ulimits, ctr's fixed paths).
//!
//! **Safety.** Every runtime runs under `nsenter --net=/run/netns/<host>`: the bridges,
//! addresses and rules it makes land in the host's namespace, never in the root one. Its state
//! lives in a directory of the testbed's. Dropping a harness, also while a test panics, removes
//! its containers, ends the processes it started by PID, unmounts what was mounted under its
//! directory and removes the directory. `ctr` reads CNI configuration only from fixed paths:
//! [`Containerd`] writes `/etc/cni/net.d/00-<prefix>.conflist` and `/opt/cni/bin/overlayd` (a
//! wrapper that names its testbed process), holds a lock so that one harness at a time uses
//! them, refuses to replace a plugin that is not a testbed's, and removes exactly what it wrote.
//! What the runtimes keep per container in their own fixed places (podman's namespaces in
//! `/run/netns/netns-<uuid>`, runc's state in `/run/runc`, libcni's cached results in
//! `/var/lib/cni/results`, containerd's shim sockets in `/run/containerd/s`) goes with each
//! container.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{Agent, Host, Inner, measure};

/// Where `ctr` looks for CNI configurations (the first in sort order wins) and plugins.
pub const CTR_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// See [`CTR_CNI_CONF_DIR`].
pub const CTR_CNI_BIN_DIR: &str = "/opt/cni/bin";

/// The busybox a root filesystem is made of (`busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// Fails unless `program` is on PATH, naming the package that brings it.
fn need(program: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        || Path::new(program).is_file();
    ensure!(found, "{program} is not installed: apt-get install {package} (scripts/install-deps installs it)");
    Ok(())
}

/// Runs `cmd` and fails, with its output, unless it succeeds.
fn checked(mut cmd: Command, what: &str) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(out)
}

/// Whether the ELF executable `bytes` asks for a dynamic loader (a `PT_INTERP` header).
fn elf_is_dynamic(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if bytes.get(..4)? != b"\x7fELF" || *bytes.get(4)? != 2 || *bytes.get(5)? != 1 {
        return None; // not a little-endian 64-bit ELF: cannot tell
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(bytes.get(0x20..0x28)?.try_into().ok()?) as usize;
    let (entsize, count) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    Some((0..count).any(|i| {
        let o = phoff + i * entsize;
        bytes.get(o..o + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) == Some(PT_INTERP)
    }))
}

/// Makes a busybox root filesystem in `dir`: `bin/busybox`, one symlink per applet, `etc/passwd`
/// and `etc/group`, and the directories a runtime mounts over.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let bytes = std::fs::read(BUSYBOX)
        .with_context(|| format!("no {BUSYBOX}: apt-get install busybox-static (scripts/install-deps installs it)"))?;
    ensure!(
        elf_is_dynamic(&bytes) != Some(true),
        "{BUSYBOX} is linked dynamically and would find no libraries in a container: install busybox-static"
    );
    for d in ["bin", "etc", "dev", "proc", "sys", "tmp", "root", "run", "var"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let bin = dir.join("bin");
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    let list = checked(
        {
            let mut c = Command::new(BUSYBOX);
            c.arg("--list");
            c
        },
        "busybox --list",
    )?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .with_context(|| format!("cannot link applet {applet}"))?;
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// The architecture as OCI images name it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The SHA-256 of a file, in hex.
fn sha256_file(path: &Path) -> Result<String> {
    let out = checked(
        {
            let mut c = Command::new("sha256sum");
            c.arg(path);
            c
        },
        "sha256sum",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().context("sha256sum printed nothing")?;
    ensure!(hex.len() == 64, "sha256sum printed {text:?}");
    Ok(hex.to_owned())
}

/// Builds an OCI image archive (an image layout in a tar: one uncompressed layer holding
/// `rootfs`) named `reference` (`docker.io/library/NAME:TAG`), in `work`; returns its path.
/// `ctr images import` takes it as it is.
pub fn oci_image(rootfs: &Path, work: &Path, reference: &str) -> Result<PathBuf> {
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    // Puts a file into the layout under its digest; returns (digest, size).
    let add_blob = |path: &Path| -> Result<(String, u64)> {
        let hex = sha256_file(path)?;
        let size = std::fs::metadata(path)?.len();
        std::fs::rename(path, blobs.join(&hex))?;
        Ok((format!("sha256:{hex}"), size))
    };
    let layer = work.join("layer.tar");
    let mut tar = Command::new("tar");
    tar.args(["--numeric-owner", "--owner=0", "--group=0", "-C"]).arg(rootfs).arg("-cf").arg(&layer).arg(".");
    checked(tar, "tar (the image layer)")?;
    let (layer_digest, layer_size) = add_blob(&layer)?;
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let config_path = work.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let (config_digest, config_size) = add_blob(&config_path)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size }],
    });
    let manifest_path = work.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
    let (manifest_digest, manifest_size) = add_blob(&manifest_path)?;
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let archive = work.join("image.tar");
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&layout).arg("-cf").arg(&archive).args(["oci-layout", "index.json", "blobs"]);
    checked(tar, "tar (the image archive)")?;
    std::fs::remove_dir_all(&layout)?;
    Ok(archive)
}

/// A CNI configuration list of one overlayd plugin: the minimal one users write.
pub fn conflist(network: &str) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{ "type": "overlayd", "network": network }],
    })
    .to_string()
}

/// What a CNI plugin printed and how it exited.
#[derive(Debug)]
pub struct CniOutcome {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl CniOutcome {
    /// Its stdout as JSON (`null` when empty).
    pub fn json(&self) -> Result<Value> {
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout).with_context(|| format!("the plugin printed no JSON: {:?}", self.stdout))
    }
}

/// Runs a CNI plugin as a runtime does: the `CNI_*` variables of `vars` (and whatever else it
/// lists, such as `OVERLAYD_STATE_DIR`), the configuration on stdin, no arguments. Variables of
/// this process that a plugin reads are not passed on.
pub fn cni_call(plugin: &Path, vars: &[(&str, &str)], stdin: &[u8]) -> Result<CniOutcome> {
    let mut cmd = Command::new(plugin);
    for k in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", "OVERLAYD_STATE_DIR"]
    {
        cmd.env_remove(k);
    }
    cmd.envs(vars.iter().copied()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run the plugin {}", plugin.display()))?;
    child.stdin.take().context("no stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    Ok(CniOutcome {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
    })
}

/// Unmounts (lazily, deepest first) whatever is mounted under `dir`.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).stderr(Stdio::null()).status();
    }
}

/// Whether process `pid` runs and its command line mentions `word`.
fn alive_as(pid: u32, word: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(word))
}

/// Sends SIGKILL to `pid` if it still runs as `word` (a runtime's process a harness saw start).
fn kill_if_alive(pid: u32, word: &str) {
    if pid > 1 && alive_as(pid, word) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is a process this harness's
        // runtime started for it, still running as what it was.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Ends what the runtimes of a testbed process that is gone (killed with SIGKILL, say) left,
/// from its directory `dir` (named by its prefix): podman's containers (`podman rm`, inside a
/// network namespace of its own that goes with it, as the host's is gone) and their runc state,
/// ctr's containers (runc on the root the harness gave ctr) and their shims' sockets, ctr's CNI
/// files, libcni's cached results of them all, and what was mounted under `dir`.
pub(crate) fn sweep_stale_dir(dir: &Path) {
    let quiet = |mut c: Command| c.stdin(Stdio::null()).stderr(Stdio::null()).output().ok();
    let runc = |root: &Path, args: &[&str]| {
        let mut c = Command::new("runc");
        c.arg("--root").arg(root).args(args);
        quiet(c)
    };
    let end_runc = |root: &Path, id: &str| {
        runc(root, &["kill", id, "KILL"]);
        std::thread::sleep(Duration::from_millis(100));
        runc(root, &["delete", "--force", id]);
    };
    // The ids the plugin was called with, whose results libcni cached (their DEL cannot reach
    // the daemon, which is gone too).
    let mut cni_ids: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let (name, d) = (entry.file_name().to_string_lossy().into_owned(), entry.path());
        if name.starts_with("podman-") && d.join("storage").exists() {
            let containers = std::fs::read_dir(d.join("storage/vfs-containers")).into_iter().flatten().flatten();
            cni_ids.extend(containers.map(|e| e.file_name().to_string_lossy().into_owned()));
            let mut c = Command::new("unshare");
            c.args(["--net", "--", "podman", "--root"]).arg(d.join("storage"));
            c.arg("--runroot").arg(d.join("run")).arg("--tmpdir").arg(d.join("tmp"));
            c.args(["--storage-driver", "vfs", "rm", "--all", "--force", "--time", "0"]);
            c.env("CONTAINERS_CONF", d.join("containers.conf"));
            quiet(c);
            // podman's runc keeps its state in its default root: the containers whose bundle
            // is here.
            let root = Path::new("/run/runc");
            let listed = runc(root, &["list", "--format", "json"]).map(|o| o.stdout).unwrap_or_default();
            let listed: Vec<Value> = serde_json::from_slice(&listed).unwrap_or_default();
            for c in listed {
                if c["bundle"].as_str().is_some_and(|b| Path::new(b).starts_with(&d)) {
                    end_runc(root, c["id"].as_str().unwrap_or_default());
                }
            }
        }
        if name.starts_with("containerd-") {
            for root in std::fs::read_dir(d.join("runc")).into_iter().flatten().flatten().map(|e| e.path()) {
                let listed = runc(&root, &["list", "-q"]).map(|o| o.stdout).unwrap_or_default();
                for id in String::from_utf8_lossy(&listed).lines().filter(|l| !l.is_empty()) {
                    end_runc(&root, id);
                }
            }
            // A shim's socket is named by the hash of containerd's address, namespace and id.
            let tasks = d.join("state/io.containerd.runtime.v2.task");
            for ns in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
                for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                    cni_ids.push(format!(
                        "{}-{}",
                        ns.file_name().to_string_lossy(),
                        task.file_name().to_string_lossy()
                    ));
                    let key = d.join("containerd.sock").join(ns.file_name()).join(task.file_name());
                    let Ok(mut child) = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()
                    else {
                        continue;
                    };
                    let _ = child.stdin.take().map(|mut i| i.write_all(key.as_os_str().as_encoded_bytes()));
                    if let Ok(out) = child.wait_with_output()
                        && let Some(hex) = String::from_utf8_lossy(&out.stdout).split_whitespace().next()
                    {
                        let _ = std::fs::remove_file(Path::new(SHIM_SOCKET_DIR).join(hex));
                    }
                }
            }
        }
    }
    // libcni names them `<network>-<container id>-<ifname>`.
    for f in std::fs::read_dir("/var/lib/cni/results").into_iter().flatten().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if cni_ids.iter().any(|id| name.contains(&format!("-{id}-"))) {
            let _ = std::fs::remove_file(f.path());
        }
    }
    if let Some(prefix) = dir.file_name().and_then(|n| n.to_str()) {
        let _ = std::fs::remove_file(Path::new(CTR_CNI_CONF_DIR).join(format!("00-{prefix}.conflist")));
        let plugin = Path::new(CTR_CNI_BIN_DIR).join("overlayd");
        if std::fs::read_to_string(&plugin).is_ok_and(|t| t.contains(&format!("({prefix})"))) {
            let _ = std::fs::remove_file(&plugin);
        }
    }
    unmount_under(dir);
}

// ---------------------------------------------------------------------------------------------
// podman

/// A container podman started, with what is needed to be sure it is gone.
#[derive(Debug, Clone)]
struct Started {
    name: String,
    pid: u32,
    conmon: u32,
    netns: String,
}

/// podman (CNI backend, runc) inside a host's namespace, its CNI configuration naming an
/// overlayd network and its environment pointing at that host's daemon; its storage and run
/// dirs are the harness's.
pub struct Podman {
    host_ns: String,
    dir: PathBuf,
    log: PathBuf,
    conf: PathBuf,
    rootfs: PathBuf,
    plugin: PathBuf,
    network: String,
    state_dir: PathBuf,
    started: Mutex<Vec<Started>>,
}

impl Podman {
    /// podman on `host`, whose daemon is `agent`, with the CNI network `network` (an overlayd
    /// network of that name) and a busybox root filesystem.
    pub fn new(host: &Host, agent: &Agent, network: &str) -> Result<Podman> {
        need("podman", "podman")?;
        need("runc", "runc")?;
        need("nsenter", "util-linux")?;
        let inner = &host.node.inner;
        let dir = inner.dir.join(format!("podman-{}", host.name));
        let _ = std::fs::remove_dir_all(&dir);
        let p = Podman {
            host_ns: host.node.ns.clone(),
            log: inner.dir.join(format!("podman-{}.log", host.name)),
            conf: dir.join("containers.conf"),
            rootfs: dir.join("rootfs"),
            plugin: dir.join("cni-bin/overlayd"),
            network: network.to_owned(),
            state_dir: agent.state_dir().to_owned(),
            started: Mutex::new(Vec::new()),
            dir,
        };
        // From here on, Drop cleans up whatever was made.
        for d in ["net.d", "cni-bin", "storage", "run", "tmp", "rootfs"] {
            std::fs::create_dir_all(p.dir.join(d))?;
        }
        std::os::unix::fs::symlink(&inner.options.overlayd, &p.plugin)?;
        std::fs::write(p.dir.join("net.d").join(format!("{network}.conflist")), conflist(network))?;
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[network]
network_backend = "cni"
network_config_dir = "{net_d}"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
default_network = "{network}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}"
# Also for the processes podman does not pass its environment to: conmon's cleanup, which
# runs the DEL of a container that stopped, reads this file again.
env = ["OVERLAYD_STATE_DIR={state}"]
"#,
            net_d = p.dir.join("net.d").display(),
            bin = p.dir.join("cni-bin").display(),
            tmp = p.dir.join("tmp").display(),
            state = p.state_dir.display(),
        );
        std::fs::write(&p.conf, conf)?;
        busybox_rootfs(&p.rootfs)?;
        Ok(p)
    }

    /// Replaces the network's conflist (the minimal one of [`conflist`] at first).
    pub fn write_conflist(&self, text: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join("net.d").join(format!("{}.conflist", self.network)), text)?)
    }

    /// The plugin binary podman runs (a symlink to the testbed's overlayd).
    pub fn plugin(&self) -> &Path {
        &self.plugin
    }

    /// The busybox root filesystem containers run from.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// A `podman` command with this harness's configuration, run in the host's namespace.
    pub fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns)).arg("podman");
        c.arg("--root").arg(self.dir.join("storage"));
        c.arg("--runroot").arg(self.dir.join("run"));
        c.arg("--tmpdir").arg(self.dir.join("tmp"));
        c.args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        c.env("CONTAINERS_CONF", &self.conf).env("OVERLAYD_STATE_DIR", &self.state_dir);
        c.stdin(Stdio::null());
        c
    }

    /// Runs `podman args` and fails, with podman's words, unless it succeeds; its stdout.
    pub fn podman<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = self.output(args)?;
        let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        ensure!(
            out.status.success(),
            "podman {} failed ({}): {}",
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `podman args`, whatever the outcome; stderr is also appended to the harness's log.
    pub fn output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<Output> {
        let out = self.command().args(args).output().context("cannot run podman (apt-get install podman)")?;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log) {
            let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
            let _ = writeln!(f, "$ podman {}\n{}", shown.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }

    /// `podman run -d --name NAME --network <network> --rootfs <busybox> <extra> sleep 3600`:
    /// a container on the overlay network (`extra`: more `run` options, e.g. `--ip`).
    pub fn run(&self, name: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec!["run", "-d", "--name", name, "--network", &self.network, "--cap-add", "NET_RAW"];
        args.extend_from_slice(extra);
        let rootfs = self.rootfs.to_string_lossy().into_owned();
        args.extend(["--rootfs", &rootfs, "/bin/sleep", "3600"]);
        let run = self.podman(&args);
        // Whatever happened, remember what to be sure of at the end.
        let f = "{{.State.Pid}} {{.State.ConmonPid}} {{.NetworkSettings.SandboxKey}}";
        if let Ok(text) = self.podman(&["inspect", "--format", f, name]) {
            let mut w = text.split_whitespace();
            let mut num = || w.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            let (pid, conmon) = (num(), num());
            let netns = text.split_whitespace().nth(2).unwrap_or_default().to_owned();
            self.started.lock().unwrap_or_else(|p| p.into_inner()).push(Started {
                name: name.to_owned(),
                pid,
                conmon,
                netns,
            });
        }
        run.map(drop)
    }

    /// Runs `cmd` inside container `name` (`podman exec`).
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    /// The IPv4 address of `eth0` in container `name`, as the container sees it.
    pub fn ip(&self, name: &str) -> Result<std::net::Ipv4Addr> {
        let out = self.exec(name, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        let cidr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .with_context(|| format!("no IPv4 address on eth0 of {name}: {out}"))?;
        cidr.split('/').next().unwrap_or_default().parse().with_context(|| format!("{cidr:?}"))
    }

    /// podman's id of container `name` (what the plugin gets as `CNI_CONTAINERID`).
    pub fn id(&self, name: &str) -> Result<String> {
        Ok(self.podman(&["inspect", "--format", "{{.Id}}", name])?.trim().to_owned())
    }

    /// The network namespace of container `name` (what the plugin gets as `CNI_NETNS`).
    pub fn netns(&self, name: &str) -> Result<String> {
        Ok(self.podman(&["inspect", "--format", "{{.NetworkSettings.SandboxKey}}", name])?.trim().to_owned())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // podman removes its containers (and their network namespaces) itself; what it could not
        // remove is ended and unmounted here.
        let _ = self.output(&["rm", "--all", "--force", "--time", "0"]);
        for s in self.started.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            kill_if_alive(s.pid, "sleep");
            kill_if_alive(s.conmon, "conmon");
            if !s.netns.is_empty() && Path::new(&s.netns).exists() && s.netns.starts_with("/run/netns/netns-") {
                let _ = Command::new("umount").arg(&s.netns).stderr(Stdio::null()).status();
                let _ = std::fs::remove_file(&s.netns);
                #[allow(clippy::print_stderr)] // a leak worth seeing next to the test's output
                {
                    eprintln!("podman left the namespace {} of {}: removed", s.netns, s.name);
                }
            }
        }
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// containerd

/// The CNI configuration and plugin `ctr` will find, written to its fixed paths for the life of
/// one harness, under a lock (an `flock` on the configuration dir) that keeps any other harness,
/// in this process or another, from writing its own meanwhile.
struct CtrCniFiles {
    _lock: File,
    written: Vec<PathBuf>,
    made_dirs: Vec<PathBuf>,
}

/// What the plugin wrapper says of itself, to recognise a testbed's (and a dead one's).
const WRAPPER_MARK: &str = "# overlayd testbed CNI plugin of process ";

impl CtrCniFiles {
    fn install(prefix: &str, overlayd: &Path, network: &str) -> Result<CtrCniFiles> {
        let mut made_dirs = Vec::new();
        for d in [CTR_CNI_CONF_DIR, CTR_CNI_BIN_DIR] {
            // Parents first, noting each dir made, so that exactly those go at the end.
            let mut missing: Vec<&Path> = Path::new(d).ancestors().take_while(|a| !a.exists()).collect();
            missing.reverse();
            for m in missing {
                std::fs::create_dir(m).with_context(|| format!("cannot create {}", m.display()))?;
                made_dirs.push(m.to_owned());
            }
        }
        let lock = File::open(CTR_CNI_CONF_DIR)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            ensure!(Instant::now() < deadline, "another test holds {CTR_CNI_CONF_DIR} for ctr's CNI for 5 minutes");
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut files = CtrCniFiles { _lock: lock, written: Vec::new(), made_dirs };
        let plugin = Path::new(CTR_CNI_BIN_DIR).join("overlayd");
        if let Ok(text) = std::fs::read_to_string(&plugin) {
            let owner = text
                .lines()
                .find_map(|l| l.strip_prefix(WRAPPER_MARK))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u32>().ok());
            match owner {
                // A testbed process that died without cleaning up left it.
                Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => std::fs::remove_file(&plugin)?,
                Some(pid) => bail!("{} belongs to another running test (process {pid})", plugin.display()),
                None => bail!(
                    "{} exists and is not the testbed's: the containerd tests will not replace it (move it away to run them)",
                    plugin.display()
                ),
            }
        } else if plugin.symlink_metadata().is_ok() {
            bail!("{} exists and is not the testbed's: move it away to run the containerd tests", plugin.display());
        }
        let wrapper = format!(
            "#!/bin/sh\n{WRAPPER_MARK}{} ({prefix}): removed when that test ends\nexec {} \"$@\"\n",
            std::process::id(),
            overlayd.display()
        );
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&plugin)?;
            files.written.push(plugin.clone());
            f.write_all(wrapper.as_bytes())?;
        }
        // Configurations testbed processes that died without cleaning up left: they would sort
        // before this one.
        for e in std::fs::read_dir(CTR_CNI_CONF_DIR)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(&format!("00-{}-", crate::PREFIX))
                .and_then(|r| r.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                std::fs::remove_file(e.path())?;
            }
        }
        let conf = Path::new(CTR_CNI_CONF_DIR).join(format!("00-{prefix}.conflist"));
        std::fs::write(&conf, conflist(network))?;
        files.written.push(conf.clone());
        let first = std::fs::read_dir(CTR_CNI_CONF_DIR)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conf" || x == "conflist" || x == "json"))
            .min();
        ensure!(
            first.as_ref() == Some(&conf),
            "{} sorts before {}: ctr would use it instead",
            first.unwrap_or_default().display(),
            conf.display()
        );
        Ok(files)
    }
}

impl Drop for CtrCniFiles {
    fn drop(&mut self) {
        for f in &self.written {
            let _ = std::fs::remove_file(f);
        }
        for d in self.made_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// containerd inside a host's namespace (its own config, root, state and socket), a busybox
/// image imported, and `ctr run --cni` with overlayd as the CNI plugin, pointed at that host's
/// daemon.
pub struct Containerd {
    inner: Arc<Inner>,
    pid: u32,
    host_ns: String,
    dir: PathBuf,
    log: PathBuf,
    sock: PathBuf,
    state_dir: PathBuf,
    image: String,
    runs: Mutex<HashMap<String, Child>>,
    /// containerd's fixed dir for its shims' sockets, if this harness made it (removed when
    /// empty at the end).
    made_shim_dir: bool,
    /// Last, so that it goes after the containers and containerd.
    _cni: CtrCniFiles,
}

/// The containerd namespace the harness works in (only its own containerd sees it).
const CTR_NAMESPACE: &str = "ovtb";
/// Where containerd's shims put their sockets, whatever containerd's own state dir.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

impl Containerd {
    /// Starts containerd on `host`, whose daemon is `agent`, with `ctr`'s CNI pointing at the
    /// overlayd network `network`, and imports a busybox image.
    pub fn start(host: &Host, agent: &Agent, network: &str) -> Result<Containerd> {
        need("containerd", "containerd")?;
        need("ctr", "containerd")?;
        need("runc", "runc")?;
        let inner = &host.node.inner;
        let dir = inner.dir.join(format!("containerd-{}", host.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let cni = CtrCniFiles::install(&inner.prefix, &inner.options.overlayd, network)?;
        let sock = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            opt = dir.join("opt").display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = inner.dir.join(format!("containerd-{}.log", host.name));
        let made_shim_dir = !Path::new(SHIM_SOCKET_DIR).parent().is_some_and(Path::exists);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", host.node.ns))
            .arg("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"));
        let pid = inner.spawn(&format!("containerd on {}", host.name), cmd, Some(&log))?;
        let c = Containerd {
            inner: Arc::clone(inner),
            pid,
            host_ns: host.node.ns.clone(),
            log,
            sock,
            state_dir: agent.state_dir().to_owned(),
            image: format!("docker.io/library/{}-busybox:1", inner.prefix),
            runs: Mutex::new(HashMap::new()),
            made_shim_dir,
            _cni: cni,
            dir,
        };
        measure::wait_for(Duration::from_secs(30), "containerd to answer", || {
            if let Some(st) = c.inner.child_exited(pid) {
                return Some(Err(anyhow::anyhow!(
                    "containerd exited ({st}): {}",
                    std::fs::read_to_string(&c.log).unwrap_or_default()
                )));
            }
            c.ctr(&["version"]).is_ok().then_some(Ok(()))
        })??;
        let rootfs = c.dir.join("rootfs");
        busybox_rootfs(&rootfs)?;
        let archive = oci_image(&rootfs, &c.dir, &c.image)?;
        c.ctr(&["images", "import", &archive.to_string_lossy()])?;
        let listed = c.ctr(&["images", "ls", "-q"])?;
        ensure!(listed.lines().any(|l| l.trim() == c.image), "ctr imported no {}: {listed}", c.image);
        Ok(c)
    }

    /// The image containers run from.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// A `ctr` command against this containerd, in the host's namespace, with the daemon's
    /// state dir in its environment (the CNI plugin runs as ctr's child).
    pub fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns)).arg("ctr");
        c.arg("--address").arg(&self.sock).args(["--namespace", CTR_NAMESPACE]);
        c.env("OVERLAYD_STATE_DIR", &self.state_dir).stdin(Stdio::null());
        c
    }

    /// Runs `ctr args`; its stdout, or an error with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        let out = checked(cmd, &format!("ctr {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr run --rm --cni IMAGE ID cmd…`, in the foreground as a user types it (ctr sets the
    /// network up, waits for the task, and tears the network down when it exits); returns once
    /// the task runs (its network is set up by then).
    pub fn run_cni(&self, id: &str, cmd: &[&str]) -> Result<()> {
        let fifo = self.dir.join("fifo");
        std::fs::create_dir_all(&fifo)?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(self.run_log(id))?;
        let mut c = self.command();
        c.args(["run", "--rm", "--cni", "--null-io"]);
        c.arg("--fifo-dir").arg(&fifo).arg("--runc-root").arg(self.dir.join("runc"));
        c.args([&self.image, id]).args(cmd).stdout(out.try_clone()?).stderr(out);
        // SAFETY: prctl is async-signal-safe; ctr goes if the test process dies.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = c.spawn().context("cannot run ctr")?;
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), child);
        measure::wait_for(Duration::from_secs(30), &format!("ctr's task {id} to run"), || {
            if let Some(st) = self.try_exited(id) {
                return Some(Err(anyhow::anyhow!("ctr run {id} exited ({st}): {}", self.run_output(id))));
            }
            (self.task_status(id).as_deref() == Some("RUNNING")).then_some(Ok(()))
        })?
    }

    fn run_log(&self, id: &str) -> PathBuf {
        self.log.with_file_name(format!("ctr-run-{id}.log"))
    }

    /// What `ctr run` for `id` printed so far.
    pub fn run_output(&self, id: &str) -> String {
        std::fs::read_to_string(self.run_log(id)).unwrap_or_default()
    }

    fn try_exited(&self, id: &str) -> Option<ExitStatus> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id)?.try_wait().ok().flatten()
    }

    /// How `ctr run` for `id` exited, waiting up to `timeout`.
    pub fn wait_run(&self, id: &str, timeout: Duration) -> Result<ExitStatus> {
        measure::wait_for(timeout, &format!("ctr run {id} to exit"), || self.try_exited(id))
    }

    /// The task's status (`RUNNING`, `STOPPED`, …), if it has one.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.task_field(id, 2)
    }

    /// The PID of the task's process.
    pub fn task_pid(&self, id: &str) -> Result<u32> {
        self.task_field(id, 1).and_then(|p| p.parse().ok()).with_context(|| format!("ctr lists no task {id}"))
    }

    fn task_field(&self, id: &str, n: usize) -> Option<String> {
        let ls = self.ctr(&["tasks", "ls"]).ok()?;
        ls.lines().find(|l| l.split_whitespace().next() == Some(id))?.split_whitespace().nth(n).map(str::to_owned)
    }

    /// Runs `cmd` in task `id` (`ctr task exec`).
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<String> {
        static EXEC: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let exec_id = format!("x{}", EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let fifo = self.dir.join("fifo").to_string_lossy().into_owned();
        let mut args = vec!["tasks", "exec", "--fifo-dir", &fifo, "--exec-id", &exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr task kill -s SIGNAL id`.
    pub fn kill(&self, id: &str, signal: &str) -> Result<()> {
        self.ctr(&["tasks", "kill", "--signal", signal, id]).map(drop)
    }

    /// The full id ctr gives the CNI plugin (`CNI_CONTAINERID`): `<namespace>-<id>`.
    pub fn cni_container_id(id: &str) -> String {
        format!("{CTR_NAMESPACE}-{id}")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The tasks first (each `ctr run` then tears its network down and exits), then anything
        // left, then containerd; shims whose task could not be deleted are ended by PID.
        let runs: Vec<(String, Child)> = self.runs.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (id, _) in &runs {
            let _ = self.kill(id, "SIGKILL");
        }
        for (_, mut child) in runs {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let shims = self.dir.join("state/io.containerd.runtime.v2.task").join(CTR_NAMESPACE);
        let shim_pids: Vec<u32> = std::fs::read_dir(&shims)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("shim.pid")).ok()?.trim().parse().ok())
            .collect();
        if let Ok(ls) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in ls.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id]);
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(&["tasks", "delete", "--force", id]);
            }
        }
        if let Ok(ls) = self.ctr(&["containers", "ls", "-q"]) {
            for id in ls.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        self.inner.stop_child(self.pid, libc::SIGTERM, Duration::from_secs(10));
        for pid in shim_pids {
            kill_if_alive(pid, "containerd-shim");
        }
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.made_shim_dir {
            // Only if empty: another containerd may have come to use it meanwhile.
            let _ = std::fs::remove_dir(SHIM_SOCKET_DIR);
            let _ = std::fs::remove_dir(Path::new(SHIM_SOCKET_DIR).parent().unwrap_or(Path::new("/")));
        }
    }
}
