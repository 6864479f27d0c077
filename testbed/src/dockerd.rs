//! A real Docker daemon (`docker.io`) inside a host namespace of a [`Testbed`](crate::Testbed),
//! for the tests of overlayd's Docker driver: dockerd with no bridge, no iptables and no
//! masquerade of its own, its state in a directory of the testbed's, and a busybox image
//! imported from a root filesystem (no registry). `shared/notes/runtimes.md` has the recipe.
//!
//! **Safety.** dockerd runs under `nsenter --net=/run/netns/<host>`: whatever it makes lands in
//! the host's namespace. Dropping the harness, also while a test panics, removes its
//! containers, stops dockerd by its PID (it stops its own containerd) and removes its
//! directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::runtimes::busybox_rootfs;
use crate::{Host, Inner, measure};

/// The Docker client of the `docker.io` package (a newer one may come first in PATH).
const DOCKER: &str = "/usr/bin/docker";
/// The image every container runs.
pub const IMAGE: &str = "ovtb-busybox:1";

/// Where the dockerd of the host with namespace `ns` keeps its sockets (short: a Unix socket
/// path is at most 107 bytes).
fn exec_root(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/{ns}-dk"))
}

/// The API socket of the dockerd of the host with namespace `ns` (the testbed's overlayd there
/// is pointed at it, whether a test starts one or not).
pub fn socket_of(ns: &str) -> PathBuf {
    exec_root(ns).join("docker.sock")
}

/// A dockerd of a test, on one host.
pub struct Dockerd {
    inner: std::sync::Arc<Inner>,
    host_ns: String,
    dir: PathBuf,
    /// A short directory for dockerd's sockets (a Unix socket path is at most 107 bytes).
    exec: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
    live_restore: bool,
    /// dockerd's `--dns`: the resolvers its containers forward to (the host's resolv.conf,
    /// outside the testbed, unless set).
    dns: Vec<std::net::Ipv4Addr>,
}

impl Dockerd {
    /// Starts dockerd on `host` and imports the busybox image; `live_restore` keeps its
    /// containers running while dockerd restarts.
    pub fn start(host: &Host, live_restore: bool) -> Result<Dockerd> {
        Dockerd::start_with_dns(host, live_restore, &[])
    }

    /// [`Dockerd::start`], with `dns` as dockerd's `--dns` (the resolvers its containers'
    /// embedded resolver forwards to, instead of the host's): a resolver of the testbed's.
    pub fn start_with_dns(host: &Host, live_restore: bool, dns: &[std::net::Ipv4Addr]) -> Result<Dockerd> {
        ensure!(Path::new(DOCKER).is_file(), "{DOCKER} is missing: apt-get install docker.io (scripts/install-deps)");
        ensure!(
            which("dockerd"),
            "dockerd is not installed: apt-get install docker.io (scripts/install-deps installs it)"
        );
        let inner = std::sync::Arc::clone(&host.node.inner);
        let dir = inner.dir.join(format!("docker-{}", host.name));
        let exec = exec_root(&host.node.ns);
        let mut d = Dockerd {
            log: inner.dir.join(format!("dockerd-{}.log", host.name)),
            inner,
            host_ns: host.node.ns.clone(),
            dir,
            exec,
            pid: None,
            live_restore,
            dns: dns.to_vec(),
        };
        std::fs::create_dir_all(d.dir.join("data"))?;
        d.launch()?;
        let rootfs = d.dir.join("rootfs");
        busybox_rootfs(&rootfs)?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run tar")?;
        let mut import = d.command();
        import.args(["import", "-", IMAGE]).stdin(tar.stdout.context("no pipe from tar")?);
        let out = import.output().context("cannot run docker import")?;
        ensure!(out.status.success(), "docker import failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(d)
    }

    /// Starts dockerd and waits until it answers.
    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host_ns)).args([
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
        ]);
        if self.live_restore {
            cmd.arg("--live-restore");
        }
        for ip in &self.dns {
            cmd.arg(format!("--dns={ip}"));
        }
        cmd.arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(&self.exec)
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--pidfile")
            .arg(self.exec.join("docker.pid"));
        self.pid = Some(self.inner.spawn("dockerd", cmd, Some(&self.log))?);
        let up = measure::wait_for(Duration::from_secs(60), "dockerd to answer", || {
            if self.pid.is_some_and(|p| self.inner.child_exited(p).is_some()) {
                return Some(false);
            }
            self.docker(&["version"]).is_ok().then_some(true)
        })?;
        ensure!(up, "dockerd exited at start: see {}", self.log.display());
        Ok(())
    }

    /// Stops dockerd (SIGTERM, as a service manager would) and starts it again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.inner.stop_child(pid, libc::SIGTERM, Duration::from_secs(30));
        }
    }

    /// dockerd's API socket.
    pub fn socket(&self) -> PathBuf {
        socket_of(&self.host_ns)
    }

    /// `DOCKER_HOST` for this dockerd.
    pub fn host_url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// A docker client command for this dockerd.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_HOST", self.host_url());
        cmd
    }

    /// Runs the client; its output, or an error with what it said.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let out = self.command().args(args).stdin(Stdio::null()).output().context("cannot run docker")?;
        Ok(out)
    }

    /// Runs the client and fails unless it succeeds; its standard output, trimmed.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        ensure!(
            out.status.success(),
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `docker run -d --name NAME --network NETWORK [extra] IMAGE sleep 600`.
    pub fn run(&self, name: &str, network: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["run", "-d", "--name", name, "--network", network];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "/bin/sleep", "600"]);
        self.docker(&args)
    }

    /// A container's address on `network`.
    pub fn ip(&self, name: &str, network: &str) -> Result<std::net::Ipv4Addr> {
        let f = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let s = self.docker(&["inspect", "-f", &f, name])?;
        s.parse().with_context(|| format!("{name} has no address on {network}: {s:?}"))
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.pid.is_some()
            && let Ok(ids) = self.docker(&["ps", "-aq"])
        {
            for id in ids.split_whitespace() {
                let _ = self.output(&["rm", "-f", id]);
            }
        }
        self.stop();
        // What dockerd mounted under its directories (overlay2, netns) goes before them.
        for root in [&self.dir, &self.exec] {
            if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
                let mut under: Vec<&str> = mounts
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .filter(|m| Path::new(m).starts_with(root))
                    .collect();
                under.sort_by_key(|m| std::cmp::Reverse(m.len()));
                for m in under {
                    let _ = Command::new("umount").arg("-l").arg(m).status();
                }
            }
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
