//! `overlayd daemon`: the long-running agent. It runs in one of three modes — static (networks
//! from the configuration), cluster (after `init`/`join`, resumed from the state dir after a
//! restart) or idle (waiting for `init` or `join`) — answers the CLI on its Unix socket, and
//! on SIGTERM or SIGINT removes the bridges and TAPs it created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::RwLock;

use crate::api;
use crate::cluster::{self, ClusterContext, ClusterRuntime, RoleChangeError};
use crate::config::DaemonConfig;
use crate::docker;
use crate::host::Host;
use crate::metrics;
use crate::netdev;
use crate::static_mode;

/// What the daemon is doing.
pub enum Mode {
    /// Waiting for `overlayd init` or `overlayd join`.
    Idle,
    /// Static networks.
    Static(Arc<Host>),
    /// A cluster member.
    Cluster(Arc<ClusterRuntime>),
}

impl Mode {
    /// The mode's name in `status`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Static(_) => "static",
            Mode::Cluster(_) => "cluster",
        }
    }

    /// The host side, if there is one.
    pub fn host(&self) -> Option<&Arc<Host>> {
        match self {
            Mode::Idle => None,
            Mode::Static(h) => Some(h),
            Mode::Cluster(c) => Some(&c.host),
        }
    }
}

/// The running daemon.
pub struct Daemon {
    pub mode: RwLock<Mode>,
    pub ctx: ClusterContext,
    /// When `run` began: `status` counts the uptime from here.
    pub started: Instant,
}

/// Creates (0700) or checks the state dir, and makes sure no other daemon uses it.
fn claim_state_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict the state dir {} to its owner", dir.display()))?;
    let sock = api::socket_path(dir);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "another overlayd daemon is running with the state dir {}: stop it first, or give this one its own --state-dir",
            dir.display()
        );
    }
    match std::fs::remove_file(&sock) {
        Ok(()) => tracing::info!(socket = %sock.display(), "removed a stale socket left by an earlier daemon"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove the stale socket {}", sock.display())),
    }
    Ok(sock)
}

/// Bit of CAP_NET_ADMIN in the capability sets of /proc/self/status.
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process may configure the network: root, or CAP_NET_ADMIN in its effective set.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Refuses to start the daemon without the privileges it needs, before it claims anything.
pub fn require_privileges() -> Result<()> {
    if !privileged() {
        return Err(crate::output::Classified(
            crate::output::Failure::NotPermitted,
            "overlayd daemon needs root (or CAP_NET_ADMIN with the capabilities of the systemd unit): it creates \
             bridges, TAPs and veths and programs nftables. Run it as root, or as the overlayd service \
             (systemctl start overlayd)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: DaemonConfig, state_dir: PathBuf) -> Result<()> {
    let started = Instant::now();
    // Watch the signals first: from here on SIGTERM means "clean up and leave", even mid-setup.
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let sock = claim_state_dir(&state_dir)?;
    let nl = netdev::connect()?;
    let ctx = ClusterContext { state_dir: state_dir.clone(), nl: nl.clone(), settings: config.settings.clone() };
    let start = async {
        if config.is_static() {
            if cluster::is_member(&state_dir) {
                bail!(
                    "the state dir {} holds a cluster membership: static mode needs a state dir of its own (--state-dir)",
                    state_dir.display()
                );
            }
            return Ok(Mode::Static(Arc::new(static_mode::start(nl.clone(), &config).await?)));
        }
        match ClusterRuntime::resume(&ctx).await? {
            Some(rt) => Ok(Mode::Cluster(ClusterRuntime::running(rt))),
            None => Ok(Mode::Idle),
        }
    };
    let mode = tokio::select! {
        m = start => m?,
        _ = term.recv() => bail!("SIGTERM during setup"),
        _ = int.recv() => bail!("SIGINT during setup"),
    };
    let daemon = Arc::new(Daemon { mode: RwLock::new(mode), ctx, started });
    tracing::info!(socket = %sock.display(), mode = daemon.mode.read().await.name(), "overlayd is ready");

    let result = tokio::select! {
        r = api::serve(&sock, Arc::clone(&daemon)) => r,
        r = metrics::serve(config.settings.metrics_addr, Arc::clone(&daemon)) => r,
        r = docker::serve(&config.settings, Arc::clone(&daemon)) => r,
        r = watchdog(Arc::clone(&daemon)) => r,
        r = follow_role(Arc::clone(&daemon)) => r,
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
    };
    notify_service_manager("STOPPING=1");
    match &*daemon.mode.read().await {
        Mode::Idle => {}
        Mode::Static(h) => h.shutdown().await,
        Mode::Cluster(c) => c.shutdown().await,
    }
    let _ = std::fs::remove_file(&sock);
    result
}

/// Tells the service manager that started this process (systemd, `Type=notify`) about its
/// state (`READY=1`, `STOPPING=1`): one datagram to `$NOTIFY_SOCKET` (a path, or an abstract
/// socket when it starts with `@`), as `sd_notify(3)` does. Without that variable (a terminal,
/// a test) nothing happens; a failure is logged and changes nothing else.
pub fn notify_service_manager(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let target = target.as_encoded_bytes();
        let addr = match target.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(std::ffi::OsStr::from_bytes(target)))?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, %state, "cannot tell the service manager");
    }
}

/// A hot loop that died is a bug: stop, so that the service manager restarts overlayd.
/// Runs this node in the role the cluster gives it: when a manager promotes or demotes it,
/// the cluster runtime starts again in the new role. A failed change is retried (and logged).
async fn follow_role(daemon: Arc<Daemon>) -> Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let rt = match &*daemon.mode.read().await {
            Mode::Cluster(c) => Arc::clone(c),
            _ => continue,
        };
        let Some(role) = rt.role_changed() else { continue };
        let mut mode = daemon.mode.write().await;
        // Still the same runtime (not left or replaced meanwhile)?
        if !matches!(&*mode, Mode::Cluster(c) if Arc::ptr_eq(c, &rt)) {
            continue;
        }
        // The runtime is handed over: no reference to it may stay here.
        let Mode::Cluster(held) = std::mem::replace(&mut *mode, Mode::Idle) else { continue };
        drop(held);
        match rt.change_role(&daemon.ctx, role).await {
            Ok(new) => {
                *mode = Mode::Cluster(ClusterRuntime::running(new));
                tracing::info!(%role, "running in the new role");
            }
            Err((Some(old), RoleChangeError::NotStarted(e))) => {
                *mode = Mode::Cluster(old);
                tracing::warn!(error = %format!("{e:#}"), %role, "could not change this node's role yet; will try again");
            }
            Err((_, RoleChangeError::NotStarted(e) | RoleChangeError::Stopped(e))) => {
                tracing::error!(error = %format!("{e:#}"), %role, "could not start in the new role; resuming as before");
                match ClusterRuntime::resume(&daemon.ctx).await {
                    Ok(Some(again)) => *mode = Mode::Cluster(ClusterRuntime::running(again)),
                    Ok(None) => *mode = Mode::Idle,
                    Err(e) => bail!("cannot resume the cluster membership after a failed role change: {e:#}"),
                }
            }
        }
    }
}

async fn watchdog(daemon: Arc<Daemon>) -> Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let failure = daemon.mode.read().await.host().and_then(|h| h.dataplane.failure());
        if let Some(why) = failure {
            tracing::error!(%why, "a dataplane loop died; stopping so that the service manager restarts overlayd");
            bail!("the dataplane stopped: {why}");
        }
    }
}
