//! The Prometheus endpoint: `GET /metrics` on `--metrics-addr` (`metrics_addr` in the config
//! file), in the text format 0.0.4. Every family has its HELP and TYPE lines, and families and
//! their series come in a fixed order, so two scrapes differ only in their values. The shell
//! ([`serve`]) gathers what the daemon knows into a [`Scrape`]; [`render`] is a plain function
//! of it. No label carries an address: a network is named by its name, a host by its node id.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use control::gossip::GossipCounters;
use control::manager::RaftStatus;
use proto as pb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::daemon::{Daemon, Mode};

/// Everything one scrape reports.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The dataplane (counters, networks, hot-loop threads) and, in cluster mode, the control
    /// port's handshakes.
    pub status: pb::StatusReply,
    /// Cluster mode only.
    pub cluster: Option<ClusterScrape>,
    /// The DNS resolvers of a cluster host's networks.
    pub dns: Option<pb::DnsReply>,
}

/// What a cluster host reports besides its dataplane.
#[derive(Debug, Default)]
pub struct ClusterScrape {
    /// `None` when gossip did not answer.
    pub gossip: Option<GossipScrape>,
    /// Managers only.
    pub raft: Option<RaftStatus>,
    pub watch: WatchScrape,
}

/// Gossip as this host sees it.
#[derive(Debug, Default)]
pub struct GossipScrape {
    /// The cluster's hosts by gossip state, this host included (as alive).
    pub members: MemberStates,
    pub counters: GossipCounters,
}

/// Hosts by their gossip state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemberStates {
    pub alive: u64,
    pub suspect: u64,
    pub down: u64,
    /// Listed by the cluster state, never heard from (or long down).
    pub unknown: u64,
}

impl MemberStates {
    /// Counts `peers` (the other hosts, as [`control::gossip::PeerStatus::state`] names their
    /// states) and this host.
    pub fn count<'a>(peers: impl IntoIterator<Item = &'a str>) -> MemberStates {
        let mut m = MemberStates { alive: 1, ..MemberStates::default() };
        for state in peers {
            match state {
                "alive" => m.alive += 1,
                "suspect" => m.suspect += 1,
                "down" => m.down += 1,
                _ => m.unknown += 1,
            }
        }
        m
    }
}

/// Where this host's copy of the cluster state stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WatchScrape {
    pub revision: u64,
    pub lag: u64,
    pub connected: bool,
}

/// A family's TYPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// Prometheus text, written family by family: a family's HELP and TYPE lines, then its
/// samples.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts family `name` (a counter's ends in `_total`, as its samples are named).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(kind == Kind::Gauge || name.ends_with("_total"), "{name}");
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the family just started.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if let Some(((first, v), rest)) = labels.split_first() {
            let _ = write!(self.out, "{{{first}=\"{}\"", escape(v));
            for (k, v) in rest {
                let _ = write!(self.out, ",{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family of one sample per `(label value, value)`, under label `label`.
    fn labelled<'a>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        self.family(name, kind, help);
        for (v, n) in samples {
            self.sample(name, &[(label, v)], n);
        }
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The dataplane's counters (`overlayd_<key>_total`), in this order, with their HELP. The
/// keys are those of [`pb::Counters::values`]; the loops' allocation counts are for tests.
const DATAPLANE: &[(&str, &str)] = &[
    ("tx_frames", "Frames read from the TAPs (a super-frame counts once)."),
    ("tx_bytes", "Bytes of the frames read from the TAPs."),
    ("tx_unicast", "Frames sent to exactly one VTEP."),
    ("tx_flooded", "Frames replicated to a network's flood list (broadcast, multicast, unknown unicast)."),
    ("tx_arp_flooded", "ARP requests among the flooded frames (a cluster network never floods one)."),
    ("tx_datagrams", "VXLAN datagrams handed to the kernel (one per frame or segment, and per flood-list member)."),
    ("tx_send_calls", "Send system calls (each carries a batch of datagrams)."),
    ("tx_segmented", "Super-frames from the TAPs cut into segments."),
    ("tx_gso_sends", "UDP GSO sends: runs of datagrams handed to the kernel as one."),
    ("tx_gso_disabled", "Times the kernel refused UDP GSO and the agent switched it off."),
    (
        "tx_remote_checksums",
        "VXLAN datagrams sent with remote checksum offload (inner checksum left to the receiving VTEP).",
    ),
    ("arp_replies", "ARP requests answered on this host instead of flooded."),
    ("rx_datagrams", "VXLAN datagrams received."),
    ("rx_bytes", "Bytes of the VXLAN datagrams received."),
    ("rx_delivered", "Frames written to a TAP."),
    ("rx_recv_calls", "Receive system calls that returned data."),
    ("rx_checksums_completed", "Inner TCP/UDP checksums a sender left partial that the agent completed."),
    (
        "rx_remote_checksums",
        "VXLAN datagrams received with remote checksum offload (delivered with the inner checksum partial).",
    ),
    ("rx_resegmented", "Received super-frames above the network's MTU cut into segments before delivery."),
    ("rx_coalesced", "Super-frames written to a TAP that joined two or more received TCP segments."),
    ("learned", "FDB entries learned (new or moved) from the data plane."),
    ("learn_table_full", "FDB entries not learned because the learned table was full."),
    ("aged_out", "Learned FDB entries removed after the ageing time."),
];

/// The DNS resolvers' families (`overlayd_dns_<family>_total`) with their HELP.
const DNS: &[(&str, &str)] = &[
    ("queries", "Messages the DNS resolver received from containers."),
    ("answers", "Replies sent to containers, by RCODE (the resolver's own and the upstreams')."),
    ("nodata", "NOERROR replies without an answer (a name of the network, another type than A)."),
    ("truncated", "UDP replies cut to the client's size, with TC set."),
    ("internal_nxdomain", "Names not on an internal network, answered NXDOMAIN instead of forwarded."),
    ("refused", "Queries answered REFUSED, by reason."),
    ("forwarded", "Queries for names outside the overlay, handed to the upstreams."),
    ("upstream_queries", "Queries sent to an upstream (first tries and retries)."),
    ("upstream_failures", "Upstream tries that failed, by reason (the next upstream is asked)."),
    ("forward_failed", "Forwarded queries answered SERVFAIL, by reason."),
    ("malformed", "Malformed queries, answered FORMERR, by reason."),
    ("dropped", "Messages that got no reply, by reason."),
    ("tcp_connections", "TCP connections accepted."),
];

/// The text of one scrape.
pub fn render(s: &Scrape) -> String {
    let mut x = Exposition::default();
    x.labelled(
        "overlayd_build_info",
        Kind::Gauge,
        "The overlayd that answers, by version; always 1.",
        "version",
        [(env!("CARGO_PKG_VERSION"), 1)],
    );
    dataplane(&mut x, &s.status);
    networks(&mut x, &s.status.networks);
    key_epochs(&mut x, &s.status.networks);
    if let Some(h) = s.status.cluster.as_ref().and_then(|c| c.handshakes.as_ref()) {
        handshakes(&mut x, h);
    }
    if let Some(c) = &s.cluster {
        if let Some(g) = &c.gossip {
            gossip(&mut x, g);
        }
        if let Some(r) = &c.raft {
            raft(&mut x, r);
        }
        watch(&mut x, &c.watch);
    }
    if let Some(d) = &s.dns {
        dns(&mut x, d);
    }
    x.out
}

fn dataplane(x: &mut Exposition, status: &pb::StatusReply) {
    let Some(c) = &status.counters else { return };
    for (key, help) in DATAPLANE {
        if let Some(v) = c.values.get(*key) {
            x.single(&format!("overlayd_{key}_total"), Kind::Counter, help, *v);
        }
    }
    // A counter the table does not know yet still shows (a test keeps the table complete).
    for (key, v) in &c.values {
        if !key.ends_with("allocations") && !DATAPLANE.iter().any(|(k, _)| k == key) {
            x.single(&format!("overlayd_{key}_total"), Kind::Counter, "Dataplane counter.", *v);
        }
    }
    x.labelled(
        "overlayd_dropped_total",
        Kind::Counter,
        "Frames and datagrams dropped, by reason (the firewall's drops among them).",
        "reason",
        c.dropped.iter().map(|(r, v)| (r.as_str(), *v)),
    );
    x.single(
        "overlayd_dataplane_threads",
        Kind::Gauge,
        "Hot-loop threads running now (1: both directions on one, 2: one per direction).",
        u64::from(status.dataplane_threads),
    );
    x.single(
        "overlayd_dataplane_loop_switches_total",
        Kind::Counter,
        "Times --dataplane-threads auto split or joined the hot loops.",
        status.dataplane_loop_switches,
    );
}

/// Per network: what came in from each side and what was dropped, by network name.
fn networks(x: &mut Exposition, networks: &[pb::NetworkStatus]) {
    let mut nets: Vec<(&str, &pb::NetworkCounters)> =
        networks.iter().filter_map(|n| Some((n.name.as_str(), n.counters.as_ref()?))).collect();
    if nets.is_empty() {
        return;
    }
    nets.sort_by_key(|(name, _)| *name);
    type Field = fn(&pb::NetworkCounters) -> u64;
    let flows: [(&str, &str, Field); 4] = [
        (
            "overlayd_network_tx_frames_total",
            "Frames read from the network's TAP on this host (sent by its containers), before the checks that may \
             drop them.",
            |c| c.tx_frames,
        ),
        ("overlayd_network_tx_bytes_total", "Bytes of the frames read from the network's TAP.", |c| c.tx_bytes),
        (
            "overlayd_network_rx_frames_total",
            "Datagrams received from other hosts with the network's VNI, before the checks that may drop them.",
            |c| c.rx_frames,
        ),
        (
            "overlayd_network_rx_bytes_total",
            "Bytes of the frames those datagrams carry (without the VXLAN or sealing header).",
            |c| c.rx_bytes,
        ),
    ];
    for (name, help, field) in flows {
        x.labelled(name, Kind::Counter, help, "network", nets.iter().map(|(n, c)| (*n, field(c))));
    }
    let name = "overlayd_network_dropped_total";
    x.family(
        name,
        Kind::Counter,
        "The network's frames and datagrams dropped, by reason (each also counted in overlayd_dropped_total).",
    );
    for (net, c) in &nets {
        for (reason, v) in &c.dropped {
            x.sample(name, &[("network", net), ("reason", reason)], *v);
        }
    }
}

/// Per encrypted network: the key epochs it seals with and opens on this host.
fn key_epochs(x: &mut Exposition, networks: &[pb::NetworkStatus]) {
    let mut nets: Vec<&pb::NetworkStatus> = networks.iter().filter(|n| !n.opening_epochs.is_empty()).collect();
    if nets.is_empty() {
        return;
    }
    nets.sort_by_key(|n| n.name.as_str());
    let name = "overlayd_network_key_epoch";
    x.family(
        name,
        Kind::Gauge,
        "An encrypted network's key epochs on this host: the one it seals with (role sealing, absent while it \
         has no key to seal with) and the newest it opens (role opening).",
    );
    for n in &nets {
        if let Some(e) = n.sealing_epoch {
            x.sample(name, &[("network", &n.name), ("role", "sealing")], u64::from(e));
        }
        let newest = n.opening_epochs.iter().max().copied().unwrap_or_default();
        x.sample(name, &[("network", &n.name), ("role", "opening")], u64::from(newest));
    }
    x.labelled(
        "overlayd_network_keys_opening",
        Kind::Gauge,
        "How many key epochs an encrypted network opens on this host (2 during a rotation's window).",
        "network",
        nets.iter().map(|n| (n.name.as_str(), n.opening_epochs.len() as u64)),
    );
}

fn handshakes(x: &mut Exposition, h: &pb::ControlHandshakes) {
    x.labelled(
        "overlayd_control_handshakes_total",
        Kind::Counter,
        "TLS handshakes on the control port, by result.",
        "result",
        [("completed", h.completed), ("failed", h.failed), ("timed_out", h.timed_out)],
    );
    x.labelled(
        "overlayd_control_connections_refused_total",
        Kind::Counter,
        "Control connections closed before a handshake, by reason.",
        "reason",
        [("source_busy", h.refused_source_busy), ("full", h.refused_full)],
    );
    x.single(
        "overlayd_control_handshakes_in_progress",
        Kind::Gauge,
        "TLS handshakes on the control port in progress.",
        h.in_progress,
    );
}

fn gossip(x: &mut Exposition, g: &GossipScrape) {
    // Every counter is named here: one added to GossipCounters does not compile until it is.
    let GossipCounters {
        rx_datagrams,
        rx_bytes,
        tx_datagrams,
        tx_bytes,
        rx_not_gossip,
        rx_other_version,
        rx_bad_auth,
        rx_malformed,
        rx_replayed,
        rx_stale_generation,
        rx_misdirected,
        rx_unknown_sender,
        tx_not_in_directory,
        records_applied,
        records_stale,
        records_forged,
        records_unknown_owner,
        records_malformed,
        sync_rounds,
        rebirths,
        suspicions,
        refutations,
        sync_repaired,
        sync_records_sent,
        probe_cycles_incomplete,
        probe_timers_disconnected,
        swim_unencodable,
        records_not_piggybacked,
        cluster_size_refused,
        swim_unexpected,
        ring_pings,
        ring_acks,
        ring_suspicions,
        ring_unproven,
    } = g.counters;
    let m = g.members;
    x.labelled(
        "overlayd_gossip_members",
        Kind::Gauge,
        "The cluster's hosts by their gossip state as this host sees them (itself counted alive; unknown: never \
         heard from, or long down).",
        "state",
        [("alive", m.alive), ("suspect", m.suspect), ("down", m.down), ("unknown", m.unknown)],
    );
    x.single(
        "overlayd_gossip_suspicions_total",
        Kind::Counter,
        "Hosts this host suspected: a probe of one, direct and through others, went unanswered.",
        suspicions,
    );
    x.single(
        "overlayd_gossip_refutations_total",
        Kind::Counter,
        "Suspicions of this host that it refuted.",
        refutations,
    );
    x.single(
        "overlayd_gossip_ring_pings_total",
        Kind::Counter,
        "Ring pings this host sent the member it watches (its successor by node id), retries included.",
        ring_pings,
    );
    x.single(
        "overlayd_gossip_ring_acks_total",
        Kind::Counter,
        "Ring acks this host received for its current ping.",
        ring_acks,
    );
    x.single(
        "overlayd_gossip_ring_suspicions_total",
        Kind::Counter,
        "Hosts this host's ring watch suspected: no try of a period's ring ping was answered.",
        ring_suspicions,
    );
    x.single(
        "overlayd_gossip_ring_unproven_total",
        Kind::Counter,
        "Ring pings unanswered by a host that never answered one (an earlier overlayd release): not suspected.",
        ring_unproven,
    );
    x.single(
        "overlayd_gossip_rebirths_total",
        Kind::Counter,
        "Times this host came back from a silence (cut off, or stalled) as a new incarnation.",
        rebirths,
    );
    x.single("overlayd_gossip_rx_datagrams_total", Kind::Counter, "Gossip datagrams received.", rx_datagrams);
    x.single("overlayd_gossip_rx_bytes_total", Kind::Counter, "Bytes of the gossip datagrams received.", rx_bytes);
    x.single("overlayd_gossip_tx_datagrams_total", Kind::Counter, "Gossip datagrams sent.", tx_datagrams);
    x.single("overlayd_gossip_tx_bytes_total", Kind::Counter, "Bytes of the gossip datagrams sent.", tx_bytes);
    x.single(
        "overlayd_gossip_tx_not_in_directory_total",
        Kind::Counter,
        "Gossip datagrams not sent because their receiver is not a host of the cluster (any longer).",
        tx_not_in_directory,
    );
    x.labelled(
        "overlayd_gossip_dropped_total",
        Kind::Counter,
        "Gossip datagrams received and dropped, by reason.",
        "reason",
        [
            ("not_gossip", rx_not_gossip),
            ("other_version", rx_other_version),
            ("bad_auth", rx_bad_auth),
            ("malformed", rx_malformed),
            ("replayed", rx_replayed),
            ("stale_generation", rx_stale_generation),
            ("misdirected", rx_misdirected),
            ("unknown_sender", rx_unknown_sender),
        ],
    );
    x.labelled(
        "overlayd_gossip_records_total",
        Kind::Counter,
        "Endpoint records received from other hosts, by what became of them.",
        "result",
        [
            ("applied", records_applied),
            ("stale", records_stale),
            ("forged", records_forged),
            ("unknown_owner", records_unknown_owner),
            ("malformed", records_malformed),
        ],
    );
    x.single(
        "overlayd_gossip_records_not_piggybacked_total",
        Kind::Counter,
        "This host's records too large to ride on SWIM messages (only anti-entropy carries them).",
        records_not_piggybacked,
    );
    x.single("overlayd_gossip_sync_rounds_total", Kind::Counter, "Anti-entropy rounds started.", sync_rounds);
    x.single(
        "overlayd_gossip_sync_repairs_total",
        Kind::Counter,
        "Records anti-entropy brought that were new here (repairs of what gossip missed).",
        sync_repaired,
    );
    x.single(
        "overlayd_gossip_sync_records_sent_total",
        Kind::Counter,
        "Records sent in anti-entropy answers.",
        sync_records_sent,
    );
    x.labelled(
        "overlayd_gossip_swim_errors_total",
        Kind::Counter,
        "SWIM steps that did not run, by kind (SWIM's next round repairs them).",
        "kind",
        [
            ("probe_cycle_incomplete", probe_cycles_incomplete),
            ("probe_timer_disconnected", probe_timers_disconnected),
            ("unencodable", swim_unencodable),
            ("cluster_size_refused", cluster_size_refused),
            ("unexpected", swim_unexpected),
        ],
    );
}

fn raft(x: &mut Exposition, r: &RaftStatus) {
    x.single("overlayd_raft_term", Kind::Gauge, "This manager's current Raft term.", r.term);
    x.single(
        "overlayd_raft_leader_id",
        Kind::Gauge,
        "Node id of the Raft leader this manager knows of (0: none).",
        r.leader.unwrap_or(0),
    );
    x.single("overlayd_raft_is_leader", Kind::Gauge, "1 if this manager is the Raft leader.", u64::from(r.leading));
    x.single("overlayd_raft_voters", Kind::Gauge, "Voters of the Raft membership.", r.voters as u64);
    x.single(
        "overlayd_raft_last_log_index",
        Kind::Gauge,
        "Index of the last entry in this manager's Raft log.",
        r.last_log_index,
    );
    x.single(
        "overlayd_raft_commit_index",
        Kind::Gauge,
        "Index of the last Raft entry committed (stored by a majority of the voters).",
        r.committed_index,
    );
    x.single(
        "overlayd_raft_applied_index",
        Kind::Gauge,
        "Index of the last Raft entry applied to this manager's cluster state.",
        r.applied_index,
    );
    x.single(
        "overlayd_raft_proposals_failed_total",
        Kind::Counter,
        "Writes this manager handed to Raft as the leader that Raft refused (leadership moved, quorum lost); \
         their proposer tries again.",
        r.proposals_failed,
    );
}

fn watch(x: &mut Exposition, w: &WatchScrape) {
    x.single(
        "overlayd_watch_revision",
        Kind::Gauge,
        "Revision of the cluster state this host follows (its copy, from a manager's watch).",
        w.revision,
    );
    x.single(
        "overlayd_watch_lag_revisions",
        Kind::Gauge,
        "Revisions the watched manager had that this host has not applied yet.",
        w.lag,
    );
    x.single(
        "overlayd_watch_connected",
        Kind::Gauge,
        "1 while the watch stream to a manager is up.",
        u64::from(w.connected),
    );
}

/// The DNS resolvers' counters: `overlayd_dns_<family>_total` with the network and, for
/// families with a label, the RCODE (`answers`) or the reason.
fn dns(x: &mut Exposition, reply: &pb::DnsReply) {
    use std::collections::BTreeMap;
    // By family: (network, label, count), sorted below.
    type Rows<'a> = Vec<(&'a str, Option<&'a str>, u64)>;
    let mut families: BTreeMap<&str, Rows<'_>> = BTreeMap::new();
    for n in &reply.networks {
        for (key, v) in &n.counters {
            let (family, label) = match key.split_once(':') {
                Some((f, l)) => (f, Some(l)),
                None => (key.as_str(), None),
            };
            families.entry(family).or_default().push((n.name.as_str(), label, *v));
        }
    }
    for (family, mut rows) in families {
        rows.sort();
        let help = DNS.iter().find(|(f, _)| *f == family).map_or("DNS resolver counter.", |(_, h)| h);
        let name = format!("overlayd_dns_{family}_total");
        x.family(&name, Kind::Counter, help);
        let label_name = if family == "answers" { "rcode" } else { "reason" };
        for (network, label, v) in rows {
            match label {
                Some(l) => x.sample(&name, &[("network", network), (label_name, l)], v),
                None => x.sample(&name, &[("network", network)], v),
            }
        }
    }
}

/// What the daemon knows now, in whatever mode it runs.
async fn scrape(daemon: &Daemon) -> Scrape {
    let mode = daemon.mode.read().await;
    match &*mode {
        Mode::Cluster(c) => {
            let status = pb::StatusReply { cluster: Some(c.status().await), ..c.host.status("cluster").await };
            let gossip = match c.gossip.snapshot().await {
                Ok(s) => Some(GossipScrape {
                    members: MemberStates::count(s.peers.iter().map(|p| p.state)),
                    counters: s.counters,
                }),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "no gossip metrics");
                    None
                }
            };
            let (connected, _) = c.follower.connection();
            let watch = WatchScrape { revision: c.follower.view().revision, lag: c.follower.lag(), connected };
            let raft = c.manager.as_ref().map(|m| m.raft_status());
            Scrape { status, cluster: Some(ClusterScrape { gossip, raft, watch }), dns: c.dns.report("").ok() }
        }
        m => Scrape {
            status: match m.host() {
                Some(h) => h.status(m.name()).await,
                None => pb::StatusReply::default(),
            },
            ..Scrape::default()
        },
    }
}

/// Serves `GET /metrics` on `addr`, if one is given; else never returns.
pub async fn serve(addr: Option<SocketAddr>, daemon: Arc<Daemon>) -> Result<()> {
    let Some(addr) = addr else { return std::future::pending().await };
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut request_line = String::new();
            if tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut request_line)).await.is_err() {
                return;
            }
            let (code, body) = if request_line.starts_with("GET /metrics") {
                ("200 OK", render(&scrape(&daemon).await))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// A scrape with something in every part.
    fn full() -> Scrape {
        let mut snap = dataplane::CountersSnapshot { tx_frames: 7, tx_loop_allocations: 2, ..Default::default() };
        snap.dropped = [("runt_frame".to_owned(), 3), ("not_member".to_owned(), 1)].into();
        let mut counters = crate::host::counters(&snap);
        counters.dropped.insert("firewall_spoofed".into(), 4);
        let net = |name: &str, frames: u64| pb::NetworkStatus {
            name: name.into(),
            counters: Some(pb::NetworkCounters {
                tx_frames: frames,
                tx_bytes: frames * 100,
                rx_frames: frames + 1,
                rx_bytes: 0,
                dropped: dataplane::NetworkCounters::default().snapshot().dropped,
            }),
            ..Default::default()
        };
        let status = pb::StatusReply {
            counters: Some(counters),
            // Not in name order: the metrics are. `web` is encrypted, in a rotation's window.
            networks: vec![
                pb::NetworkStatus { sealing_epoch: Some(3), opening_epochs: vec![2, 3], ..net("web", 5) },
                net("db", 2),
            ],
            dataplane_threads: 2,
            dataplane_threads_setting: "auto".into(),
            dataplane_loop_switches: 5,
            cluster: Some(pb::ClusterStatus {
                handshakes: Some(pb::ControlHandshakes {
                    completed: 4,
                    refused_source_busy: 392,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut dns = crate::dns::counter_map(&resolver::Counters::default(), &Default::default());
        dns.insert("queries".into(), 12);
        dns.insert("answers:nxdomain".into(), 3);
        dns.insert("dropped:short_query".into(), 2);
        let dns = pb::DnsReply {
            networks: ["web", "db"]
                .into_iter()
                .map(|name| pb::DnsNetwork { name: name.into(), counters: dns.clone(), ..Default::default() })
                .collect(),
            ..Default::default()
        };
        Scrape {
            status,
            cluster: Some(ClusterScrape {
                gossip: Some(GossipScrape {
                    members: MemberStates::count(["alive", "suspect", "unknown"]),
                    counters: GossipCounters { suspicions: 2, refutations: 1, sync_repaired: 9, ..Default::default() },
                }),
                raft: Some(RaftStatus {
                    term: 3,
                    leader: Some(1),
                    leading: true,
                    last_log_index: 40,
                    committed_index: 40,
                    applied_index: 39,
                    voters: 1,
                    proposals_failed: 0,
                }),
                watch: WatchScrape { revision: 17, lag: 2, connected: true },
            }),
            dns: Some(dns),
        }
    }

    /// The families of `text`, in order: (name, TYPE), each checked to come with HELP and TYPE
    /// lines before its samples, and every sample checked to belong to the family just started.
    fn families(text: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut help: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
                assert!(!h.trim().is_empty(), "{line}");
                help = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
                assert_eq!(help.take().as_deref(), Some(name), "TYPE of {name} right after its HELP");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(kind != "counter" || name.ends_with("_total"), "{line}");
                out.push((name.to_owned(), kind.to_owned()));
            } else {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let (family, _) = out.last().unwrap_or_else(|| panic!("a sample before any family: {line}"));
                assert_eq!(name, family, "a sample outside its family: {line}");
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(value.parse::<u64>().is_ok(), "{line}");
            }
        }
        assert!(help.is_none(), "a HELP without TYPE");
        out
    }

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_has_help_and_type_and_two_scrapes_list_them_alike() {
        let text = render(&full());
        let fams = families(&text);
        let names: BTreeSet<&str> = fams.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), fams.len(), "a family twice:\n{text}");
        assert_eq!(render(&full()), text, "two scrapes of the same values differ");
        for want in [
            "overlayd_build_info",
            "overlayd_tx_frames_total",
            "overlayd_network_tx_frames_total",
            "overlayd_network_dropped_total",
            "overlayd_network_key_epoch",
            "overlayd_control_handshakes_total",
            "overlayd_gossip_members",
            "overlayd_gossip_suspicions_total",
            "overlayd_gossip_refutations_total",
            "overlayd_gossip_ring_suspicions_total",
            "overlayd_gossip_dropped_total",
            "overlayd_gossip_sync_repairs_total",
            "overlayd_raft_term",
            "overlayd_raft_leader_id",
            "overlayd_raft_commit_index",
            "overlayd_raft_applied_index",
            "overlayd_raft_proposals_failed_total",
            "overlayd_watch_revision",
            "overlayd_watch_lag_revisions",
            "overlayd_dns_queries_total",
        ] {
            assert!(names.contains(want), "no {want} in\n{text}");
        }
        for (series, v) in [
            (format!("overlayd_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1),
            ("overlayd_tx_frames_total".into(), 7),
            ("overlayd_dropped_total{reason=\"firewall_spoofed\"}".into(), 4),
            ("overlayd_network_rx_frames_total{network=\"web\"}".into(), 6),
            ("overlayd_network_dropped_total{network=\"db\",reason=\"not_member\"}".into(), 0),
            ("overlayd_gossip_members{state=\"alive\"}".into(), 2),
            ("overlayd_gossip_members{state=\"down\"}".into(), 0),
            ("overlayd_gossip_refutations_total".into(), 1),
            ("overlayd_raft_is_leader".into(), 1),
            ("overlayd_watch_lag_revisions".into(), 2),
            ("overlayd_control_connections_refused_total{reason=\"source_busy\"}".into(), 392),
            ("overlayd_dns_answers_total{network=\"web\",rcode=\"nxdomain\"}".into(), 3),
            ("overlayd_network_key_epoch{network=\"web\",role=\"sealing\"}".into(), 3),
            ("overlayd_network_key_epoch{network=\"web\",role=\"opening\"}".into(), 3),
            ("overlayd_network_keys_opening{network=\"web\"}".into(), 2),
        ] {
            assert_eq!(value(&text, &series), Some(v), "{series} in\n{text}");
        }
        // Networks by name; the dataplane's counters in their table's order.
        let db = text.find("overlayd_network_tx_frames_total{network=\"db\"}").unwrap();
        let web = text.find("overlayd_network_tx_frames_total{network=\"web\"}").unwrap();
        assert!(db < web, "{text}");
        assert!(!text.contains("overlayd_network_key_epoch{network=\"db\""), "a plain network has no key:\n{text}");
        let at = |name: &str| text.find(&format!("\n{name} ")).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert!(at("overlayd_tx_frames_total") < at("overlayd_tx_bytes_total"));
        assert!(at("overlayd_tx_bytes_total") < at("overlayd_aged_out_total"));
        assert!(!text.contains("allocations"), "allocation counters are for tests, not for Prometheus:\n{text}");
        // No address anywhere: labels name networks, states and reasons.
        assert!(!text.contains("vtep") && !text.contains("198.18."), "{text}");
    }

    /// The HELP table names every counter the dataplane reports (a counter added without
    /// its HELP fails here, not in a scrape).
    #[test]
    fn every_dataplane_counter_has_its_help() {
        let keys: BTreeSet<String> = crate::host::counters(&dataplane::CountersSnapshot::default())
            .values
            .into_keys()
            .filter(|k| !k.ends_with("allocations"))
            .collect();
        let table: BTreeSet<String> = DATAPLANE.iter().map(|(k, _)| (*k).to_owned()).collect();
        assert_eq!(keys, table);
        let dns: BTreeSet<String> = crate::dns::counter_map(&resolver::Counters::default(), &Default::default())
            .into_keys()
            .map(|k| k.split(':').next().unwrap_or_default().to_owned())
            .collect();
        let table: BTreeSet<String> = DNS.iter().map(|(f, _)| (*f).to_owned()).collect();
        assert!(dns.is_subset(&table), "DNS families without HELP: {:?}", dns.difference(&table));
    }

    #[test]
    fn a_static_or_idle_daemon_reports_what_it_has() {
        let text = render(&Scrape::default());
        assert_eq!(families(&text), [("overlayd_build_info".to_owned(), "gauge".to_owned())]);
        let s = full();
        let text = render(&Scrape { status: s.status, ..Scrape::default() });
        let fams: BTreeMap<String, String> = families(&text).into_iter().collect();
        assert!(fams.contains_key("overlayd_network_tx_frames_total") && !fams.contains_key("overlayd_raft_term"));
        assert_eq!(fams["overlayd_dataplane_threads"], "gauge");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut x = Exposition::default();
        x.labelled("t_total", Kind::Counter, "A test.", "network", [("a\"b\\c\nd", 1)]);
        assert!(x.out.ends_with("t_total{network=\"a\\\"b\\\\c\\nd\"} 1\n"), "{}", x.out);
    }
}
