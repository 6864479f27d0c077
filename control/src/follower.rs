//! How a host follows the cluster state: a watch stream from any manager, resumed from the
//! revision it has after a disconnect (another manager if that one is gone), with the view
//! cached on disk so a restarted host programs its dataplane before it reconnects; and a
//! heartbeat to the leader so the cluster knows the host is alive. A manager that says this
//! host was removed from the cluster is believed: the follower stops, and says so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto as pb;
use proto::manager_client::ManagerClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::convert::Malformed;
use crate::manager::HOST_HEARTBEAT;
use crate::pki::NodeIdentity;
use crate::raft_net::CONNECT_TIMEOUT;
use crate::state::{Change, ClusterView, Role};
use crate::transport::{self, TransportError};

/// Pause between rounds of reconnection attempts.
const RETRY: Duration = Duration::from_millis(500);

/// Why no manager could be reached.
#[derive(Debug, thiserror::Error)]
#[error("no manager is reachable (tried {tried}): {last}")]
pub struct Unreachable {
    /// The addresses tried.
    pub tried: String,
    /// The last error.
    pub last: String,
}

/// Why a watch stream from a manager ended in error, or a heartbeat failed. The follower
/// tries another manager (or beats again) after each.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// The manager could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No manager could be reached (a heartbeat tries them all).
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// The manager refused the call, or the stream broke off.
    #[error("the manager answered {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A watch event did not convert to cluster state (a manager of another version).
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// A change set that does not follow the revision this host has: the manager skipped one.
    #[error("revision {got} does not follow {have}")]
    RevisionGap {
        /// The revision of the change set received.
        got: u64,
        /// The revision of the view this host has.
        have: u64,
    },
}

/// The view a cache file holds (`None`: none that can be used; the first snapshot of the
/// watch replaces it), read as the watch's snapshots are: keyed by the names and ids its
/// records carry, so that a damaged or hand-edited file cannot file a network under another
/// network's name or a node under another node's id.
pub fn read_cache(bytes: &[u8]) -> Option<ClusterView> {
    let view: ClusterView = serde_json::from_slice(bytes).ok()?;
    ClusterView::try_from(&pb::ClusterView::from(&view)).ok()
}

/// A host's live copy of the cluster state.
pub struct Follower {
    identity: Arc<NodeIdentity>,
    managers: Mutex<Vec<SocketAddr>>,
    preferred: Mutex<Option<SocketAddr>>,
    view: watch::Sender<Arc<ClusterView>>,
    cache: PathBuf,
    connected: AtomicBool,
    connected_to: Mutex<Option<SocketAddr>>,
    /// The newest revision the manager watched now said it had (0: none said yet).
    head: AtomicU64,
    removed: AtomicBool,
}

impl Follower {
    /// Starts following: loads the cached view from `cache` if there is one, then watches
    /// and heartbeats on the current tokio runtime. `managers` seeds where to connect; the
    /// view's managers are added as they become known.
    pub fn start(identity: Arc<NodeIdentity>, managers: Vec<SocketAddr>, cache: PathBuf) -> Arc<Follower> {
        let cached = std::fs::read(&cache).ok().and_then(|b| read_cache(&b)).unwrap_or_default();
        let f = Arc::new(Follower {
            identity,
            managers: Mutex::new(managers),
            preferred: Mutex::new(None),
            view: watch::channel(Arc::new(cached)).0,
            cache,
            connected: AtomicBool::new(false),
            connected_to: Mutex::new(None),
            head: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        });
        tokio::spawn(Arc::clone(&f).watch_loop());
        tokio::spawn(Arc::clone(&f).heartbeat_loop());
        f
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Changes whenever the view does.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.subscribe()
    }

    /// Whether the watch stream is up, and to which manager.
    pub fn connection(&self) -> (bool, Option<SocketAddr>) {
        (self.connected.load(Ordering::Relaxed), *self.connected_to.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// How many revisions the view is behind the newest one the watched manager said it had
    /// (0: caught up, or nothing heard from it yet).
    pub fn lag(&self) -> u64 {
        self.head.load(Ordering::Relaxed).saturating_sub(self.view().revision)
    }

    /// Whether a manager refused this host as removed from the cluster (then it follows no
    /// more: `overlayd leave --force` is all that is left to do).
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// The host's identity.
    pub fn identity(&self) -> &Arc<NodeIdentity> {
        &self.identity
    }

    fn candidates(&self) -> Vec<SocketAddr> {
        let mut list = self.managers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for n in self.view().nodes.values().filter(|n| n.role == Role::Manager) {
            if !list.contains(&n.api_addr) {
                list.push(n.api_addr);
            }
        }
        // The manager that worked last goes first.
        if let Some(p) = *self.preferred.lock().unwrap_or_else(|p| p.into_inner())
            && let Some(i) = list.iter().position(|a| *a == p)
        {
            list[..=i].rotate_right(1);
        }
        list
    }

    /// A client of the first manager that answers.
    pub async fn manager(&self) -> Result<ManagerClient<Channel>, Unreachable> {
        let candidates = self.candidates();
        let mut last = String::from("no manager known");
        for addr in &candidates {
            match transport::connect(*addr, &self.identity, CONNECT_TIMEOUT).await {
                Ok(ch) => {
                    *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(*addr);
                    return Ok(ManagerClient::new(ch));
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let tried = candidates.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        Err(Unreachable { tried, last })
    }

    /// A client of another host's API.
    pub async fn host(&self, addr: SocketAddr) -> Result<pb::host_client::HostClient<Channel>, TransportError> {
        Ok(pb::host_client::HostClient::new(transport::connect(addr, &self.identity, CONNECT_TIMEOUT).await?))
    }

    async fn watch_loop(self: Arc<Self>) {
        loop {
            for addr in self.candidates() {
                match self.watch_from(addr).await {
                    Ok(()) => tracing::info!(manager = %addr, "watch stream ended"),
                    Err(FollowerError::Status(s)) if crate::authz::is_removed(&s) => {
                        self.connected.store(false, Ordering::Relaxed);
                        self.removed.store(true, Ordering::Relaxed);
                        tracing::warn!(manager = %addr, "{}", s.message());
                        return;
                    }
                    Err(e) => tracing::debug!(manager = %addr, error = %e, "watch failed"),
                }
                self.connected.store(false, Ordering::Relaxed);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn watch_from(&self, addr: SocketAddr) -> Result<(), FollowerError> {
        let channel = transport::connect(addr, &self.identity, CONNECT_TIMEOUT).await?;
        let from = self.view().revision;
        let mut stream =
            ManagerClient::new(channel).watch(pb::WatchRequest { from_revision: from }).await?.into_inner();
        self.connected.store(true, Ordering::Relaxed);
        // This manager's history, not the last one's, tells how far behind the view is.
        self.head.store(0, Ordering::Relaxed);
        *self.connected_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
        *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
        tracing::info!(manager = %addr, from_revision = from, "following the cluster state");
        while let Some(event) = stream.message().await? {
            let mut view = ClusterView::clone(&self.view());
            match event.body {
                Some(pb::watch_event::Body::Snapshot(s)) => {
                    view = ClusterView::try_from(&s)?;
                    view.revision = event.revision;
                }
                Some(pb::watch_event::Body::Changes(set)) => {
                    if event.revision != view.revision + 1 {
                        return Err(FollowerError::RevisionGap { got: event.revision, have: view.revision });
                    }
                    let changes = set.changes.iter().map(Change::try_from).collect::<Result<Vec<_>, _>>()?;
                    view.apply_changes(event.revision, &changes);
                }
                None => continue,
            }
            self.save(&view);
            self.head.store(event.head.max(event.revision), Ordering::Relaxed);
            self.view.send_replace(Arc::new(view));
        }
        Ok(())
    }

    fn save(&self, view: &ClusterView) {
        let tmp = self.cache.with_extension("tmp");
        let ok = serde_json::to_vec(view)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.cache));
        if let Err(e) = ok {
            tracing::warn!(error = %e, path = %self.cache.display(), "cannot cache the cluster view");
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HOST_HEARTBEAT);
        loop {
            tick.tick().await;
            if self.removed() {
                return;
            }
            let beat = async {
                let mut m = self.manager().await?;
                m.heartbeat(pb::HeartbeatRequest::default()).await?;
                Ok::<(), FollowerError>(())
            };
            match tokio::time::timeout(HOST_HEARTBEAT * 2, beat).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat failed"),
                Err(_) => tracing::debug!("heartbeat timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `state_view` fuzz target: a cache whose network "bdue" is filed under
    /// "blue" (one byte changed) was taken as it was, a network under another's name.
    #[test]
    fn a_cached_view_is_keyed_by_what_its_records_say() {
        let damaged = include_bytes!("../testdata/fuzz/state_view-network_under_another_name");
        let as_written: ClusterView = serde_json::from_slice(damaged).unwrap();
        assert_eq!(as_written.networks.keys().collect::<Vec<_>>(), ["blue"]);
        let view = read_cache(damaged).unwrap();
        assert!(view.networks.iter().all(|(name, n)| *name == n.name), "{:?}", view.networks);
        assert!(view.nodes.iter().all(|(id, n)| *id == n.id), "{:?}", view.nodes);
        assert_eq!(view.revision, as_written.revision);
        let again = serde_json::to_vec(&view).unwrap();
        assert_eq!(read_cache(&again), Some(view), "a cache the follower writes reads back as it was");
        assert_eq!(read_cache(b"{\"cluster_id\":"), None);
        assert_eq!(read_cache(b""), None);
    }
}
