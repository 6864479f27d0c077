//! Docker's network and IPAM driver: the remote plugin protocol (libnetwork's `remote.md` and
//! `ipam.md`), served by the daemon in cluster mode on `/run/docker/plugins/NAME.sock`, so that
//! `docker network create -d overlayd --ipam-driver overlayd NAME` and `docker run --network
//! NAME` put containers on an overlayd network, as swarm's own overlay driver does.
//!
//! What it is: a thin translation. A Docker network is an overlayd network, found by its subnet
//! (the IPAM pool this driver handed out); a pool without a subnet gets the one the cluster
//! would give, and the overlayd network is created under the Docker network's name once Docker
//! has it (Docker tells its drivers no names). Addresses come from this host's block, reserved
//! in the endpoint store from Docker's `RequestAddress` to its `ReleaseAddress`; a join is an
//! attach ([`ClusterRuntime::attach`], origin `docker`) whose veth Docker moves into the
//! container itself, with the network's gateway as the container's (so Docker adds no
//! `docker_gwbridge`). The container's name is learned from the Engine API after the join.
//! Every overlayd network also appears in this host's Docker under its own name (created once;
//! removed when the overlayd network goes), so that a network made on one host is there on every
//! host, as swarm's are.
//!
//! What it is not: an orchestrator, or a global-scope driver (Docker would want a key-value
//! store). Its neighbours: `endpoints` (attach, detach, reservations), `engine` (the few Engine
//! API calls), `daemon` (which serves it).

mod driver;
mod engine;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

pub use driver::Driver;

use crate::config::DaemonSettings;
use crate::daemon::Daemon;

/// Where Docker looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";

/// The content type of every answer.
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// Removes the socket when the server stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves the driver until the daemon stops (never returns unless the socket cannot be made).
/// With no plugin name, or a socket of that name that another process serves, it serves none.
pub async fn serve(settings: &DaemonSettings, daemon: Arc<Daemon>) -> Result<()> {
    let name = settings.docker_plugin.as_str();
    if name.is_empty() {
        return std::future::pending().await;
    }
    let path = Path::new(PLUGIN_DIR).join(format!("{name}.sock"));
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        tracing::warn!(
            socket = %path.display(),
            "another process serves Docker's plugin {name:?}: no Docker driver here (give this daemon another --docker-plugin)"
        );
        return std::future::pending().await;
    }
    let _ = std::fs::remove_file(&path);
    std::fs::create_dir_all(PLUGIN_DIR).with_context(|| format!("cannot create {PLUGIN_DIR}"))?;
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen for Docker on {} (see --docker-plugin)", path.display()))?;
    let _socket = SocketFile(path.clone());
    let driver = Arc::new(Driver::new(name, &settings.docker_host, daemon)?);
    tracing::info!(socket = %path.display(), "serving Docker's network and IPAM driver {name:?}");
    let mirror = tokio::spawn(Arc::clone(&driver).mirror_networks());
    let _mirror = AbortOnDrop(mirror);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a Docker plugin connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let driver = Arc::clone(&driver);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let driver = Arc::clone(&driver);
                async move { Ok::<_, hyper::Error>(answer(&driver, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "a Docker plugin connection ended badly");
            }
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request, answered: `POST /<Interface>.<Call>` with a JSON body.
async fn answer(driver: &Arc<Driver>, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let call = req.uri().path().trim_start_matches('/').to_owned();
    let (status, body) = match req.into_body().collect().await {
        Ok(b) => driver.call(&call, &b.to_bytes()).await,
        Err(e) => (400, wire::error(format!("cannot read the request: {e}"))),
    };
    hyper::Response::builder()
        .status(status)
        .header("Content-Type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}
