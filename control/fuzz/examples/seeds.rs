//! Writes the seed corpora of the control plane's fuzz targets into `corpus/<target>/`: real
//! examples made by the code's own encoders — datagrams three gossip nodes exchanged, records
//! they signed, the protobuf encoding of every message, the JSON the Raft store wrote, a token
//! `init` printed, a follower's view cache, an identity `init` issued.
//!
//! ```sh
//! cd control/fuzz && cargo run --example seeds
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use control::gossip::record::{Change, Record};
use control::gossip::ring::RingMessage;
use control::gossip::seal::Kind;
use control::gossip::sync::{MemberInfo, Summary, SyncMessage, Want, serde_bytes_vec::Bytes};
use control::gossip::tables::Position;
use control::gossip::{GossipKey, GossipNode, Output, Timer};
use control::manager::{LeaderOp, LeaderReply};
use control::pki::{ClusterCa, JoinToken, NodeKey};
use control::state::{Command, NodeId, Response, Role};
use control::store::{self, Opening, StoreOwner};
use control::types::{RaftNode, TypeConfig};
use control_fuzz::cluster::{history, running};
use control_fuzz::gossip::{self as g, GENERATION, Step, script};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest, VoteResponse};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
use prost::Message;
use proto as pb;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("a corpus directory");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).expect("a seed");
}

/// `which` (the target's selector byte), then `bytes`.
fn tagged(which: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![which];
    v.extend_from_slice(bytes);
    v
}

/// A datagram or a timer due in the lab: (when, order, to host index, datagram, timer, from
/// host index).
type Queued = (Duration, u64, usize, Option<Vec<u8>>, Option<Timer>, usize);

/// Hosts 1 to 3 of the fuzz cluster, started cold, run for a few seconds with endpoints
/// coming and going: every datagram host 1 received, as (sender, kind, payload), opened.
fn gossip_lab() -> Vec<(NodeId, Kind, Vec<u8>)> {
    let key = GossipKey::new(&g::CLUSTER_KEY);
    let mut nodes: Vec<GossipNode> = (1..=3)
        .map(|n| GossipNode::new(g::peer(n), g::config(), GossipKey::new(&g::CLUSTER_KEY), g::signer(n), GENERATION, n))
        .collect();
    let mut queue: Vec<Queued> = Vec::new();
    let mut seq = 0;
    let mut now = Duration::from_secs(1);
    let mut received = Vec::new();
    let dispatch = |i: usize, out: &mut Output, now: Duration, queue: &mut Vec<_>, seq: &mut u64| {
        for (after, t) in out.timers.drain(..) {
            *seq += 1;
            queue.push((now + after, *seq, i, None, Some(t), i));
        }
        for (to, d) in out.datagrams.drain(..) {
            let j = (1..=3).position(|n| g::addr(n) == to).expect("a lab host");
            *seq += 1;
            queue.push((now + Duration::from_millis(1), *seq, j, Some(d), None, i));
        }
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut out = Output::default();
        node.start(&mut out);
        node.set_directory(g::directory(), &mut out);
        dispatch(i, &mut out, now, &mut queue, &mut seq);
    }
    let end = now + Duration::from_secs(6);
    let mut changes = 0;
    while let Some(pos) = queue.iter().enumerate().min_by_key(|(_, (at, s, ..))| (*at, *s)).map(|(p, _)| p) {
        let (at, _, to, data, timer, from) = queue.swap_remove(pos);
        if at > end {
            break;
        }
        now = at;
        let mut out = Output::default();
        if let Some(mut d) = data {
            if to == 0 {
                let mut copy = d.clone();
                let opened = key.open(&mut copy).expect("lab datagrams open");
                received.push((from as NodeId + 1, opened.kind, opened.payload.to_vec()));
            }
            nodes[to].handle_datagram(now, g::addr(from as NodeId + 1), &mut d, &mut out);
        } else if let Some(t) = timer {
            nodes[to].handle_timer(now, t, &mut out);
        }
        // Every second, an endpoint of host 2 or 3 comes or goes.
        if now.as_secs() > changes + 1 {
            changes += 1;
            let host = 1 + (changes as usize % 2);
            let (k, e) = g::endpoint(host as NodeId + 1, 2 + (changes % 3) as u8);
            if changes % 4 == 3 {
                nodes[host].delete(k, &mut out);
            } else {
                nodes[host].put(k, e, &mut out);
            }
            dispatch(host, &mut out, now, &mut queue, &mut seq);
        }
        dispatch(to, &mut out, now, &mut queue, &mut seq);
    }
    received
}

fn gossip_seeds() {
    let received = gossip_lab();
    let pick = |n: NodeId| (n - 2) as u8;
    let sealed: Vec<Step> = received
        .iter()
        .map(|(from, kind, payload)| Step::Sealed { from: pick(*from), kind: *kind, payload: payload.clone() })
        .collect();
    let swim: Vec<Step> =
        sealed.iter().filter(|s| matches!(s, Step::Sealed { kind: Kind::Swim, .. })).cloned().collect();
    let sync: Vec<Step> =
        sealed.iter().filter(|s| matches!(s, Step::Sealed { kind: Kind::Sync, .. })).cloned().collect();
    let mut conversation = Vec::new();
    for s in sealed.iter().take(60) {
        conversation.push(s.clone());
        conversation.push(Step::Timers(40));
    }
    write("gossip_datagram", "conversation", &script(&conversation));
    write("gossip_datagram", "swim", &script(&swim[..swim.len().min(24)]));
    write("gossip_datagram", "sync", &script(&sync[..sync.len().min(24)]));
    // The ring watch: the lab's pings and acks to host 1 with time passing between them (so
    // that its own pings' deadlines fire), then pings and acks of any number from a member
    // and from a stranger.
    let mut ring: Vec<Step> = Vec::new();
    for s in sealed.iter().filter(|s| matches!(s, Step::Sealed { kind: Kind::Ring, .. })).take(16) {
        ring.push(s.clone());
        ring.push(Step::Timers(60));
    }
    for (from, m) in [
        (0, RingMessage::Ping(7)),
        (1, RingMessage::Ack(0)),
        (1, RingMessage::Ack(1)),
        (2, RingMessage::Ping(1)),
        (2, RingMessage::Ack(1)),
        (0, RingMessage::Ack(u32::MAX)),
    ] {
        ring.push(Step::Sealed { from, kind: Kind::Ring, payload: m.encode().to_vec() });
        ring.push(Step::Timers(200));
    }
    ring.push(Step::Sealed { from: 0, kind: Kind::Ring, payload: vec![9, 0, 0] });
    assert!(ring.len() > 14, "the lab's hosts watch each other");
    write("gossip_datagram", "ring", &script(&ring));

    // The same datagrams as they went on the wire (host 2's, sealed by the harness's sealer
    // would number them from 0 too).
    let key = GossipKey::new(&g::CLUSTER_KEY);
    let mut sealer = key.sealer(2, GENERATION);
    let mut raw = Vec::new();
    for (_, kind, payload) in received.iter().filter(|(f, ..)| *f == 2).take(12) {
        let mut d = Vec::new();
        sealer.seal(1, *kind, payload, &mut d);
        raw.push(Step::Raw(d));
    }
    raw.push(Step::Raw(b"not gossip at all".to_vec()));
    write("gossip_datagram", "raw", &script(&raw));

    // Each anti-entropy message, from host 2.
    let enc = |m: &SyncMessage| {
        let mut v = Vec::new();
        m.encode(&mut v);
        v
    };
    let records = g::member_records();
    let positions = [Summary { owner: 2, position: Position { epoch: GENERATION, watermark: 5 } }];
    let more: Vec<Record> = (6..9u64)
        .map(|v| {
            let (k, e) = g::endpoint(2, v as u8);
            Record::sign(&g::signer(2), 2, GENERATION, v, Change::Put(k, e))
        })
        .collect();
    let messages = [
        ("hello", SyncMessage::Hello { hashes: vec![0, 1, 2, 3], members: 1 }),
        ("members", SyncMessage::Members { members: vec![MemberInfo { peer: g::peer(3), incarnation: 2 }] }),
        ("suspected", SyncMessage::Suspected { by: 2, incarnation: 0 }),
        ("digest", SyncMessage::Digest { buckets: 1, covered: vec![0], summaries: positions.to_vec() }),
        ("pull", SyncMessage::Pull { wants: vec![Want { owner: 1, epoch: GENERATION, from: 0 }] }),
        (
            "records",
            SyncMessage::Records {
                owner: 2,
                epoch: GENERATION,
                from: 5,
                upto: 8,
                items: more.iter().map(|r| Bytes(r.wire().to_vec())).collect(),
            },
        ),
    ];
    for (name, m) in &messages {
        let payload = enc(m);
        let step = match m {
            SyncMessage::Records { .. } => Step::Resigned { from: 0, payload },
            _ => Step::Sealed { from: 0, kind: Kind::Sync, payload },
        };
        write("gossip_datagram", &format!("sync_{name}"), &script(&[step, Step::Timers(200)]));
    }
    let swim_payload = swim.first().map_or_else(Vec::new, |s| match s {
        Step::Sealed { payload, .. } => payload.clone(),
        _ => Vec::new(),
    });
    let headers = [
        Step::Header { from: 0, to: 3, generation: 1, counter: 0, kind: Kind::Swim, payload: swim_payload.clone() },
        Step::Header { from: 0, to: 0, generation: 0, counter: 7, kind: Kind::Swim, payload: swim_payload.clone() },
        Step::Header { from: 2, to: 3, generation: 0, counter: 0, kind: Kind::Swim, payload: swim_payload.clone() },
        Step::Header {
            from: 1,
            to: 3,
            generation: 2,
            counter: u64::MAX,
            kind: Kind::Sync,
            payload: enc(&messages[0].1),
        },
    ];
    write("gossip_datagram", "headers", &script(&headers));
    let local = [Step::Put(3), Step::Timers(80), Step::Delete(2), Step::Timers(255), Step::Timers(255)];
    write("gossip_datagram", "local_changes", &script(&local));

    // gossip_records: records, sync messages, a tables script.
    for (i, r) in records.iter().chain(&more).enumerate() {
        write("gossip_records", &format!("record_{i}"), &tagged(0, r.wire()));
    }
    for (name, m) in &messages {
        write("gossip_records", &format!("sync_{name}"), &tagged(1, &enc(m)));
    }
    let mut t = vec![2u8];
    for r in records.iter().chain(&more).rev() {
        t.push(0);
        control_fuzz::put_chunk(&mut t, r.wire());
    }
    t.push(1);
    t.push(2);
    t.extend_from_slice(&GENERATION.to_be_bytes());
    t.extend_from_slice(&5u64.to_be_bytes());
    t.extend_from_slice(&12u64.to_be_bytes());
    t.extend_from_slice(&[2, 2]);
    write("gossip_records", "tables", &t);
}

/// The protobuf messages, each with its selector in `proto_messages`.
fn proto_seeds() {
    let view = running().view();
    let pv = pb::ClusterView::from(&view);
    let node = pv.nodes[0].clone();
    let key = NodeKey::generate().expect("a key");
    let ca = ClusterCa::generate("seed").expect("a CA");
    let id = ca.issue_node(2, Role::Worker).expect("an identity");
    let change = |c: &control::state::Change| pb::Change::from(c);
    let changes = pb::ChangeSet {
        changes: vec![
            change(&control::state::Change::NodeRemove(2)),
            change(&control::state::Change::NetworkUpsert(view.networks["blue"].clone())),
            change(&control::state::Change::BlockRemove { network: "blue".into(), node: 2 }),
            change(&control::state::Change::GossipKeyRotated(1)),
        ],
    };
    let messages: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "join_request",
            pb::JoinRequest {
                secret: "abcdefghijklmnopqrstuvwxyz".into(),
                name: "w3".into(),
                underlay_addr: "198.18.0.3".into(),
                api_addr: "198.18.0.3:7947".into(),
                csr_der: key.csr_der("w3").expect("a CSR"),
                gossip_addr: "198.18.0.3:7946".into(),
                gossip_public_key: vec![3; 32],
                underlay_networks: vec!["198.18.0.0/15".into(), "172.17.0.0/16".into()],
            }
            .encode_to_vec(),
        ),
        (1, "promote", pb::PromoteRequest {}.encode_to_vec()),
        (2, "watch", pb::WatchRequest { from_revision: 3 }.encode_to_vec()),
        (
            3,
            "create_network",
            pb::CreateNetworkRequest {
                name: "red".into(),
                subnet: "10.9.0.0/16".into(),
                vni: 0,
                mtu: 0,
                block_prefix: 24,
                internal: true,
                encrypted: true,
            }
            .encode_to_vec(),
        ),
        (4, "remove_network", pb::RemoveNetworkRequest { name: "blue".into(), force: true }.encode_to_vec()),
        (5, "lease_block", pb::LeaseBlockRequest { network: "blue".into() }.encode_to_vec()),
        (6, "release_block", pb::ReleaseBlockRequest { network: "blue".into() }.encode_to_vec()),
        (
            7,
            "heartbeat",
            pb::HeartbeatRequest {
                report_networks: true,
                underlay_networks: vec!["198.18.0.0/15".into()],
                underlay_mtu: 1500,
            }
            .encode_to_vec(),
        ),
        (8, "remove_node", pb::RemoveNodeRequest { node: "w2".into(), force: false }.encode_to_vec()),
        (9, "leave", pb::LeaveRequest {}.encode_to_vec()),
        (10, "empty", pb::Empty {}.encode_to_vec()),
        (11, "raft_message", pb::RaftMessage { payload: b"{\"vote\":{}}".to_vec() }.encode_to_vec()),
        (12, "endpoints_request", pb::EndpointsRequest { network: "blue".into() }.encode_to_vec()),
        (
            13,
            "join_reply",
            pb::JoinReply {
                node_id: 2,
                cluster_id: "c0ffee".into(),
                role: pb::Role::Worker as i32,
                ca_cert_pem: id.ca_pem().into(),
                node_cert_pem: id.cert_pem().into(),
                managers: vec![node.clone()],
                gossip_key: vec![7; 32],
                gossip_key_generation: 0,
            }
            .encode_to_vec(),
        ),
        (
            14,
            "watch_snapshot",
            pb::WatchEvent {
                revision: view.revision,
                body: Some(pb::watch_event::Body::Snapshot(pv.clone())),
                head: 0,
            }
            .encode_to_vec(),
        ),
        (
            14,
            "watch_changes",
            pb::WatchEvent {
                revision: view.revision + 1,
                body: Some(pb::watch_event::Body::Changes(changes)),
                head: 0,
            }
            .encode_to_vec(),
        ),
        (15, "network", pv.networks[0].encode_to_vec()),
        (16, "block", pv.blocks[0].encode_to_vec()),
        (
            17,
            "cluster_info",
            pb::ClusterInfo {
                cluster_id: "c0ffee".into(),
                leader_id: 1,
                revision: 4,
                voters: vec![1],
                learners: vec![],
            }
            .encode_to_vec(),
        ),
        (18, "gossip_key_reply", pb::GossipKeyReply { generation: 1, key: vec![7; 32] }.encode_to_vec()),
        (
            19,
            "endpoints_reply",
            pb::EndpointsReply {
                endpoints: vec![pb::Endpoint {
                    network: "blue".into(),
                    name: "web".into(),
                    ip: "10.128.0.2".into(),
                    prefix_len: 16,
                    mac: "02:4f:0a:80:00:02".into(),
                    node_id: 2,
                    node_name: "w2".into(),
                    host_ifname: "ovh-blue-web".into(),
                    netns: "/run/netns/web".into(),
                    ..Default::default()
                }],
            }
            .encode_to_vec(),
        ),
        (20, "node", node.encode_to_vec()),
        (21, "cluster_view", pv.encode_to_vec()),
        (
            22,
            "init",
            pb::InitRequest {
                advertise_addr: "198.18.0.1".into(),
                underlay_addr: String::new(),
                name: "m1".into(),
                gossip_port: 0,
            }
            .encode_to_vec(),
        ),
        (
            23,
            "join_cluster",
            pb::JoinClusterRequest {
                manager_addr: "198.18.0.1".into(),
                token: JoinToken::generate(&ca).to_string(),
                advertise_addr: "198.18.0.2".into(),
                underlay_addr: String::new(),
                name: "w2".into(),
                gossip_port: 0,
            }
            .encode_to_vec(),
        ),
        (24, "leave_cluster", pb::LeaveClusterRequest { force: true }.encode_to_vec()),
        (25, "name", pb::NameRequest { name: "blue".into() }.encode_to_vec()),
        (
            26,
            "attach",
            pb::AttachRequest { network: "blue".into(), netns: "/run/netns/web".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        (27, "detach", pb::DetachRequest { name: "web".into(), ..Default::default() }.encode_to_vec()),
        (28, "join_token_request", pb::JoinTokenRequest { role: 2, rotate: true }.encode_to_vec()),
        (
            29,
            "status",
            pb::StatusReply {
                version: "0.1.0".into(),
                pid: 42,
                mode: "cluster".into(),
                networks: vec![pb::NetworkStatus { name: "blue".into(), vni: 4096, ..Default::default() }],
                counters: Some(pb::Counters {
                    values: [("rx_frames".to_owned(), 3)].into(),
                    dropped: [("no_fdb".to_owned(), 1)].into(),
                }),
                cluster: Some(pb::ClusterStatus { cluster_id: "c0ffee".into(), node_id: 1, ..Default::default() }),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            30,
            "fdb",
            pb::FdbReply {
                networks: vec![pb::NetworkFdb {
                    name: "blue".into(),
                    vni: 4096,
                    fdb: vec![pb::FdbEntry {
                        mac: "02:4f:0a:80:00:02".into(),
                        vtep: "198.18.0.2".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec(),
        ),
        (
            31,
            "init_reply",
            pb::InitReply { node_id: 1, cluster_id: "c0ffee".into(), ..Default::default() }.encode_to_vec(),
        ),
        (
            32,
            "join_cluster_reply",
            pb::JoinClusterReply {
                node_id: 2,
                cluster_id: "c0ffee".into(),
                role: 2,
                managers: vec![node.clone()],
                warning: String::new(),
            }
            .encode_to_vec(),
        ),
        (33, "node_list", pb::NodeListReply { nodes: pv.nodes.clone(), leader_id: 1, self_id: 1 }.encode_to_vec()),
        (34, "network_list", pb::NetworkListReply { networks: pv.networks.clone() }.encode_to_vec()),
        (
            35,
            "network_inspect",
            pb::NetworkInspectReply { network: Some(pv.networks[0].clone()), ..Default::default() }.encode_to_vec(),
        ),
        (
            36,
            "endpoint",
            pb::Endpoint { name: "web".into(), ip: "10.128.0.2".into(), ..Default::default() }.encode_to_vec(),
        ),
        (37, "detach_reply", pb::DetachReply { detached: vec![] }.encode_to_vec()),
        (
            38,
            "peers",
            pb::PeersReply {
                peers: vec![pb::PeerInfo { node_id: 2, state: "alive".into(), ..Default::default() }],
                self_id: 1,
                counters: [("rx_datagrams".to_owned(), 9)].into(),
            }
            .encode_to_vec(),
        ),
        (
            39,
            "join_token_reply",
            pb::JoinTokenReply { role: 2, token: "OVL1-".into(), ..Default::default() }.encode_to_vec(),
        ),
    ];
    for (which, name, bytes) in messages {
        write("proto_messages", name, &tagged(which, &bytes));
    }
}

/// What the Raft store and the Raft service write, made by the real store.
fn raft_seeds() {
    let json = |v: &dyn erased::Json| v.json();
    let log_id = |term: u64, index: u64| LogId::new(CommittedLeaderId::new(term, 1), index);
    let node = RaftNode { api_addr: "198.18.0.1:7947".into() };
    let membership = Membership::<NodeId, RaftNode>::new(vec![[1].into()], BTreeMap::from([(1, node.clone())]));
    let mut entries: Vec<Entry<TypeConfig>> = vec![Entry { log_id: log_id(1, 1), payload: EntryPayload::Blank }];
    entries.push(Entry { log_id: log_id(1, 2), payload: EntryPayload::Membership(membership.clone()) });
    for (i, cmd) in history().into_iter().enumerate() {
        entries.push(Entry { log_id: log_id(1, 3 + i as u64), payload: EntryPayload::Normal(cmd) });
    }
    let vote = Vote::new_committed(1, 1);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(log_id(1, 2)),
        entries: entries[2..].to_vec(),
        leader_commit: Some(log_id(1, 2)),
    };
    write("raft_payload", "append_entries", &tagged(0, &json(&append)));
    let vote_req = VoteRequest::<NodeId> { vote: Vote::new(2, 1), last_log_id: Some(log_id(1, 6)) };
    write("raft_payload", "vote", &tagged(1, &json(&vote_req)));

    // The state machine, applied and snapshotted by the store itself.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let owner = StoreOwner { cluster_id: "c0ffee".into(), node_id: 1 };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let (snapshot_meta, snapshot_data) = rt.block_on(async {
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        let (_log, mut sm, _handle) = store::open(dir.path(), &owner, Opening::Create, events).expect("a store");
        sm.apply(entries.clone()).await.expect("applied");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("a snapshot");
        (snapshot.meta, snapshot.snapshot.into_inner())
    });
    let install = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: snapshot_meta.clone(),
        offset: 0,
        data: snapshot_data.clone(),
        done: true,
    };
    write("raft_payload", "install_snapshot", &tagged(2, &json(&install)));
    let op = LeaderOp::Command(Box::new(Command::LeaseBlock { network: "blue".into(), node: 1 }));
    write("raft_payload", "propose_command", &tagged(3, &json(&op)));
    write("raft_payload", "propose_heartbeat", &tagged(3, &json(&LeaderOp::Heartbeat { id: 2 })));
    let ok: Result<AppendEntriesResponse<NodeId>, ()> = Ok(AppendEntriesResponse::Success);
    write("raft_payload", "append_reply", &tagged(4, &json(&ok)));
    let granted: Result<VoteResponse<NodeId>, ()> =
        Ok(VoteResponse { vote: Vote::new(2, 1), vote_granted: true, last_log_id: Some(log_id(1, 6)) });
    write("raft_payload", "vote_reply", &tagged(5, &json(&granted)));
    let installed: Result<openraft::raft::InstallSnapshotResponse<NodeId>, ()> =
        Ok(openraft::raft::InstallSnapshotResponse { vote });
    write("raft_payload", "install_reply", &tagged(6, &json(&installed)));
    let reply: Result<LeaderReply, String> = Ok(LeaderReply::Response(Response::Done));
    write("raft_payload", "propose_reply", &tagged(7, &json(&reply)));
    for (i, e) in entries.iter().enumerate() {
        write("raft_payload", &format!("log_entry_{i}"), &tagged(8, &json(e)));
    }
    write("raft_payload", "stored_vote", &tagged(9, &json(&vote)));
    write("raft_payload", "stored_committed", &tagged(10, &json(&Some(log_id(1, 6)))));
    write("raft_payload", "stored_purged", &tagged(11, &json(&log_id(1, 2))));
    let meta: SnapshotMeta<NodeId, RaftNode> = SnapshotMeta {
        last_log_id: Some(log_id(1, 6)),
        last_membership: StoredMembership::new(Some(log_id(1, 2)), membership),
        snapshot_id: "1-6-1".into(),
    };
    write("raft_payload", "stored_snapshot_meta", &tagged(12, &json(&meta)));
    write("raft_payload", "stored_owner", &tagged(13, &json(&owner)));
    write("raft_payload", "command", &tagged(14, &json(&history()[2])));
    write("raft_payload", "snapshot_data", &tagged(15, &snapshot_data));
}

/// `serde_json::to_vec` behind a trait object, so that one closure encodes every type.
mod erased {
    pub trait Json {
        fn json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("encodes")
        }
    }
}

fn token_and_file_seeds() {
    let ca = ClusterCa::generate("seed").expect("a CA");
    let token = JoinToken::generate(&ca).to_string();
    write("join_token", "token", token.as_bytes());
    write("join_token", "pasted", format!("  {token}\n").as_bytes());
    write("join_token", "upper_digest", token.replacen(&token[5..69], &token[5..69].to_uppercase(), 1).as_bytes());
    write("join_token", "cut", &token.as_bytes()[..40]);

    write("state_view", "view", &serde_json::to_vec(&running().view()).expect("encodes"));
    write("state_view", "empty", &serde_json::to_vec(&control::state::ClusterView::default()).expect("encodes"));
    // A cache written before key rotations and removals were recorded.
    let mut old: serde_json::Value = serde_json::to_value(running().view()).expect("encodes");
    let o = old.as_object_mut().expect("an object");
    o.remove("gossip_key_generation");
    o.remove("removed");
    write("state_view", "older", &serde_json::to_vec(&old).expect("encodes"));

    let id = ca.issue_node(1, Role::Manager).expect("an identity");
    let files = [id.key_pem(), id.cert_pem(), id.ca_pem()].join("\0");
    write("identity_files", "node_identity", &tagged(0, files.as_bytes()));
    let ca_files = [ca.cert_pem(), ca.key_pem()].join("\0");
    write("identity_files", "cluster_ca", &tagged(1, ca_files.as_bytes()));
    write("identity_files", "gossip_signer", &tagged(2, g::signer(1).pkcs8()));
    let der = CertificateDer::from_pem_slice(id.cert_pem().as_bytes()).expect("a certificate");
    write("identity_files", "peer_certificate", &tagged(3, &der));
}

fn main() {
    gossip_seeds();
    proto_seeds();
    raft_seeds();
    token_and_file_seeds();
    for target in [
        "gossip_datagram",
        "gossip_records",
        "proto_messages",
        "raft_payload",
        "join_token",
        "state_view",
        "identity_files",
    ] {
        let n = std::fs::read_dir(corpus(target)).expect("written").count();
        println!("{target}: {n} seeds");
    }
}
