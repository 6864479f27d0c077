//! The gossip shell: runs control's sans-IO [`GossipNode`] on this host's gossip socket (UDP,
//! 7946 by default) with tokio timers. It takes the directory of hosts from the Raft view and
//! this host's endpoints from attach and detach; it publishes which hosts are alive and every
//! host's endpoints for the reconciler (which programs the dataplane) and the leader (which
//! records host status in Raft), and answers `overlayd peers`. When the view says the cluster
//! key was rotated (a node was removed), it fetches the new one from a manager and hands it
//! over (see [`follow_key_rotations`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use control::gossip::record::{Endpoint, EndpointKey, Signer};
use control::gossip::{DirectoryEntry, Event, GossipConfig, GossipCounters, GossipKey, GossipNode, Output, Peer};
use control::gossip::{PeerStatus, Timer};
use control::state::NodeId;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

mod keyfiles;

use self::keyfiles::{CLUSTER_KEY_FILE, EPOCH_FILE, KEY_GENERATION_FILE};

const SIGNER_FILE: &str = "gossip-signing.pk8";
/// Receive buffer of the gossip socket.
const RECV_BUFFER: usize = 2 << 20;
/// Shortest gap between two publications of the view (bursts of events coalesce).
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// This host's gossip secrets: the cluster's key (and which rotation of it) and its own
/// signing key.
pub struct GossipKeys {
    pub cluster: [u8; 32],
    /// How many times the cluster key had been rotated when this host got it (0: never).
    pub generation: u64,
    pub signer: Signer,
}

impl GossipKeys {
    /// Saves all into `dir` (mode 0600).
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_cluster_key(dir, &self.cluster, self.generation)?;
        write_secret(&dir.join(SIGNER_FILE), self.signer.pkcs8())
    }

    /// Loads what [`GossipKeys::save`] wrote (a state dir from before key rotations has no
    /// generation: 0).
    pub fn load(dir: &Path) -> Result<GossipKeys> {
        let path = dir.join(CLUSTER_KEY_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let cluster =
            keyfiles::cluster_key(&text).with_context(|| format!("{} is not a 32-byte hex key", path.display()))?;
        let path = dir.join(SIGNER_FILE);
        let doc = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let signer = Signer::from_pkcs8(&doc).with_context(|| format!("{} is not a signing key", path.display()))?;
        let path = dir.join(KEY_GENERATION_FILE);
        let generation = match std::fs::read_to_string(&path) {
            Ok(text) => {
                keyfiles::key_generation(&text).with_context(|| format!("{} is not a number", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(GossipKeys { cluster, generation, signer })
    }
}

/// Saves the cluster key of `generation` into `dir`: the generation last, so that a crash in
/// between leaves an older generation, whose key is fetched again.
fn save_cluster_key(dir: &Path, key: &[u8; 32], generation: u64) -> Result<()> {
    write_secret(&dir.join(CLUSTER_KEY_FILE), hex::encode(key).as_bytes())?;
    write_secret(&dir.join(KEY_GENERATION_FILE), generation.to_string().as_bytes())
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    // The rename is durable once the directory is: after a crash the epoch must not come back
    // lower (with the clock gone back, a generation would repeat, and with it gossip nonces).
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// The epoch (and identity generation) of this start of the agent: above every earlier one
/// even if the clock went back (the last is kept in the state dir).
pub fn next_epoch(state_dir: &Path) -> Result<u64> {
    let path = state_dir.join(EPOCH_FILE);
    let last = std::fs::read_to_string(&path).ok();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let epoch = keyfiles::next_epoch(last.as_deref(), now).with_context(|| {
        format!(
            "{} holds {:?}, above every epoch this host can have: the file is damaged (remove it, and the clock gives the epoch)",
            path.display(),
            last.as_deref().unwrap_or_default().trim()
        )
    })?;
    write_secret(&path, epoch.to_string().as_bytes())?;
    Ok(epoch)
}

/// What gossip says, for the reconciler and the leader.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GossipView {
    /// The other hosts alive (or suspected, not yet confirmed down).
    pub alive: BTreeSet<NodeId>,
    /// Every host's live endpoints (alive or not: the reconciler installs the alive ones').
    pub endpoints: BTreeMap<NodeId, Vec<(EndpointKey, Endpoint)>>,
}

/// `overlayd peers`' material.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub me: Peer,
    pub peers: Vec<PeerStatus>,
    pub counters: GossipCounters,
}

enum Cmd {
    Put(EndpointKey, Endpoint),
    Delete(EndpointKey),
    Directory(Vec<(NodeId, DirectoryEntry)>),
    Snapshot(oneshot::Sender<Snapshot>),
    Leave(oneshot::Sender<()>),
    RotateKey(Box<[u8; 32]>),
}

/// The running gossip of this host.
pub struct Gossip {
    tx: mpsc::UnboundedSender<Cmd>,
    view: watch::Receiver<Arc<GossipView>>,
    alive: watch::Receiver<BTreeSet<NodeId>>,
    published: Mutex<HashMap<EndpointKey, Endpoint>>,
    /// This host's endpoints as last published, for the DNS resolver (whose names are every
    /// host's endpoints as gossip carries them, this host's included).
    local: watch::Sender<Arc<HashMap<EndpointKey, Endpoint>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gossip {
    /// Binds the gossip socket and starts. `me.addr` is where others reach it.
    pub async fn start(me: Peer, keys: &GossipKeys, config: GossipConfig) -> Result<Gossip> {
        let socket = bind(me.addr).with_context(|| {
            format!("cannot bind the gossip socket {} (is another overlayd using it? see --gossip-port)", me.addr)
        })?;
        let signer = Signer::from_pkcs8(keys.signer.pkcs8()).context("the signing key")?;
        let seed = rand::random();
        let epoch = me.generation;
        let node = GossipNode::new(me.clone(), config, GossipKey::new(&keys.cluster), signer, epoch, seed);
        let (tx, rx) = mpsc::unbounded_channel();
        let (view_tx, view) = watch::channel(Arc::new(GossipView::default()));
        let (alive_tx, alive) = watch::channel(BTreeSet::from([me.node]));
        let task = tokio::spawn(run(socket, node, rx, view_tx, alive_tx));
        tracing::info!(addr = %me.addr, generation = me.generation, "gossip started");
        let (local, _) = watch::channel(Arc::default());
        Ok(Gossip { tx, view, alive, published: Mutex::new(HashMap::new()), local, task })
    }

    /// What gossip says now, and changes to come.
    pub fn subscribe(&self) -> watch::Receiver<Arc<GossipView>> {
        self.view.clone()
    }

    /// The hosts alive, this one included, and changes to come (for the leader).
    pub fn liveness(&self) -> watch::Receiver<BTreeSet<NodeId>> {
        self.alive.clone()
    }

    /// The hosts of the cluster, from the Raft view.
    pub fn set_directory(&self, entries: Vec<(NodeId, DirectoryEntry)>) {
        let _ = self.tx.send(Cmd::Directory(entries));
    }

    /// Makes this host's published endpoints `wanted`: what changed goes out as records.
    pub fn publish_local(&self, wanted: impl IntoIterator<Item = (EndpointKey, Endpoint)>) {
        let wanted: HashMap<EndpointKey, Endpoint> = wanted.into_iter().collect();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        for (k, e) in &wanted {
            if published.get(k) != Some(e) {
                let _ = self.tx.send(Cmd::Put(*k, e.clone()));
            }
        }
        for k in published.keys().filter(|k| !wanted.contains_key(k)) {
            let _ = self.tx.send(Cmd::Delete(*k));
        }
        if *published != wanted {
            self.local.send_replace(Arc::new(wanted.clone()));
        }
        *published = wanted;
    }

    /// This host's endpoints as published, and changes to come.
    pub fn local(&self) -> watch::Receiver<Arc<HashMap<EndpointKey, Endpoint>>> {
        self.local.subscribe()
    }

    /// Peers and counters as the node sees them now.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Snapshot(tx)).ok().context("gossip is not running")?;
        rx.await.context("gossip is not running")
    }

    /// The cluster key was rotated: gossip opens with `key` from now on, and seals with it
    /// after a changeover (see [`GossipNode::rotate_key`]).
    pub fn rotate_key(&self, key: [u8; 32]) {
        if self.tx.send(Cmd::RotateKey(Box::new(key))).is_err() {
            tracing::warn!("gossip is not running: the new cluster key was not handed over");
        }
    }

    /// Tells a few members this host is leaving (they withdraw it at once, and tell others).
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

/// The gossip socket, with room for bursts (a flood of garbage must not crowd out the
/// cluster's messages before they are read).
fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

async fn run(
    socket: UdpSocket,
    mut node: GossipNode,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    view_tx: watch::Sender<Arc<GossipView>>,
    alive_tx: watch::Sender<BTreeSet<NodeId>>,
) {
    let origin = Instant::now();
    let me = node.identity().node;
    let mut out = Output::default();
    let mut timers: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut armed: HashMap<u64, Timer> = HashMap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut view = GossipView::default();
    let (mut dirty, mut last_publish) = (false, Instant::now());
    let mut leaving: Option<oneshot::Sender<()>> = None;
    node.start(&mut out);
    loop {
        let next_timer = timers.peek().map(|Reverse((at, _))| *at);
        let publish_at = dirty.then(|| last_publish + PUBLISH_EVERY);
        let wake = [next_timer, publish_at].into_iter().flatten().min();
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => node.handle_datagram(origin.elapsed(), from, &mut buf[..n], &mut out),
                Err(e) => tracing::debug!(error = %e, "gossip receive failed"),
            },
            () = sleep_until(wake) => {
                let now = Instant::now();
                while let Some(Reverse((at, id))) = timers.peek().copied() {
                    if at > now {
                        break;
                    }
                    timers.pop();
                    if let Some(t) = armed.remove(&id) {
                        node.handle_timer(origin.elapsed(), t, &mut out);
                    }
                }
            }
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Put(k, e)) => {
                    tracing::debug!(vni = k.vni, ip = %k.ip, "endpoint published");
                    node.put(k, e, &mut out);
                }
                Some(Cmd::Delete(k)) => {
                    tracing::debug!(vni = k.vni, ip = %k.ip, "endpoint withdrawn");
                    node.delete(k, &mut out);
                }
                Some(Cmd::Directory(entries)) => {
                    let directory: Vec<NodeId> = entries.iter().map(|(n, _)| *n).collect();
                    node.set_directory(entries, &mut out);
                    // Hosts that left the cluster leave the view too.
                    view.endpoints.retain(|o, _| directory.contains(o));
                    view.alive.retain(|o| directory.contains(o));
                    for owner in directory.iter().copied().filter(|o| *o != me) {
                        refresh(&node, &mut view, owner);
                    }
                    dirty = true;
                }
                Some(Cmd::Snapshot(reply)) => {
                    let _ = reply.send(Snapshot { me: node.identity().clone(), peers: node.peers(), counters: node.counters() });
                }
                Some(Cmd::Leave(done)) => {
                    node.leave(&mut out);
                    leaving = Some(done);
                }
                Some(Cmd::RotateKey(key)) => {
                    node.rotate_key(GossipKey::new(&key), &mut out);
                    tracing::info!("gossip key rotated");
                }
            },
        }
        for (to, datagram) in out.datagrams.drain(..) {
            if let Err(e) = socket.send_to(&datagram, to).await {
                tracing::debug!(%to, error = %e, "gossip send failed");
            }
        }
        if let Some(done) = leaving.take() {
            let _ = done.send(());
        }
        let now = Instant::now();
        for (after, t) in out.timers.drain(..) {
            seq += 1;
            armed.insert(seq, t);
            timers.push(Reverse((now + after, seq)));
        }
        for ev in out.events.drain(..) {
            dirty = true;
            match ev {
                Event::PeerUp(n) if n != me => {
                    view.alive.insert(n);
                    tracing::info!(node = n, "host alive");
                }
                Event::PeerDown(n) => {
                    view.alive.remove(&n);
                    tracing::info!(node = n, "host down");
                }
                Event::Endpoints(owner) if owner != me => refresh(&node, &mut view, owner),
                _ => {}
            }
        }
        if dirty && now >= last_publish + PUBLISH_EVERY {
            dirty = false;
            last_publish = now;
            let mut alive = view.alive.clone();
            alive.insert(me);
            alive_tx.send_if_modified(|a| std::mem::replace(a, alive) != *a);
            view_tx.send_if_modified(|v| {
                let changed = **v != view;
                if changed {
                    *v = Arc::new(view.clone());
                }
                changed
            });
        }
    }
}

/// Re-reads one owner's endpoints into the view.
fn refresh(node: &GossipNode, view: &mut GossipView, owner: NodeId) {
    let mut list = Vec::new();
    node.for_each_endpoint(owner, |k, e| list.push((*k, e.clone())));
    if tracing::enabled!(tracing::Level::DEBUG) && view.endpoints.get(&owner).map_or(!list.is_empty(), |l| *l != list) {
        let ips: Vec<String> = list.iter().map(|(k, _)| k.ip.to_string()).collect();
        tracing::debug!(owner, endpoints = %ips.join(","), "endpoints changed");
    }
    if list.is_empty() {
        view.endpoints.remove(&owner);
    } else {
        view.endpoints.insert(owner, list);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The directory entries of a Raft view.
pub fn directory(view: &control::state::ClusterView) -> Vec<(NodeId, DirectoryEntry)> {
    view.nodes
        .values()
        .map(|n| (n.id, DirectoryEntry { public_key: n.gossip_public_key, addr: n.gossip_addr }))
        .collect()
}

/// Keeps this host's cluster key current: whenever the view says the key was rotated past the
/// `generation` this host has, fetches the current one from a manager (over mutual TLS: a
/// removed node gets nothing), saves it in `pki_dir` and hands it to gossip. Runs until the
/// follower's view is gone.
pub fn follow_key_rotations(
    gossip: Arc<Gossip>,
    follower: Arc<control::follower::Follower>,
    pki_dir: std::path::PathBuf,
    mut generation: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut views = follower.subscribe();
        loop {
            let wanted = views.borrow_and_update().gossip_key_generation;
            if follower.removed() {
                return;
            }
            if wanted > generation {
                let fetched = async {
                    let mut manager = follower.manager().await?;
                    let reply = manager.gossip_key(proto::Empty {}).await?.into_inner();
                    let key: [u8; 32] =
                        reply.key.as_slice().try_into().context("the manager sent a gossip key of the wrong length")?;
                    anyhow::Ok((reply.generation, key))
                };
                match fetched.await {
                    // A manager behind the view has the same key or an older one: ask again.
                    Ok((g, _)) if g <= generation => {}
                    Ok((g, key)) => match save_cluster_key(&pki_dir, &key, g) {
                        Ok(()) => {
                            gossip.rotate_key(key);
                            generation = g;
                            continue;
                        }
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot save the new gossip key"),
                    },
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "cannot fetch the new gossip key yet"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if views.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The gossip address of a host that advertises its control API at `advertise`.
pub fn gossip_addr(advertise: SocketAddr, port: u16) -> SocketAddr {
    SocketAddr::new(advertise.ip(), if port == 0 { control::gossip::DEFAULT_PORT } else { port })
}
