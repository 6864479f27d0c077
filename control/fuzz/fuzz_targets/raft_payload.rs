//! The JSON the managers exchange and keep: openraft's requests and replies as the Raft
//! service and its client decode them from `RaftMessage` payloads, the proposals a manager
//! forwards to the leader, the records of the Raft store (log entries, vote, log ids, snapshot
//! meta, owner), and a snapshot's data. Every command that decodes is applied to a running
//! cluster's state, as the state machine applies the log (see `control_fuzz::cluster`); a
//! snapshot's state then takes the commands a running cluster makes.
#![no_main]

use control::manager::{LeaderOp, LeaderReply};
use control::state::{ClusterState, Command, NodeId};
use control::store::{StoreOwner, snapshot_state};
use control::types::{RaftNode, TypeConfig};
use control_fuzz::Input;
use control_fuzz::cluster::{apply_checked, history, running};
use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{Entry, EntryPayload, LogId, SnapshotMeta, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes `data` as `T` (as `serde_json::from_slice` does everywhere these are read); what
/// decodes encodes and decodes again.
fn decode<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&v).expect("what decoded encodes");
    let again: T = serde_json::from_slice(&json).expect("what encoded decodes");
    assert_eq!(serde_json::to_vec(&again).expect("encodes"), json, "{} round-trips", std::any::type_name::<T>());
    Some(v)
}

fn apply_entries(entries: &[Entry<TypeConfig>]) {
    let mut state = running();
    for e in entries {
        if let EntryPayload::Normal(cmd) = &e.payload {
            apply_checked(&mut state, cmd);
        }
    }
}

/// A state from a snapshot (or the store's record) takes what a running cluster does next.
fn from_snapshot(mut state: ClusterState) {
    for cmd in history().iter().skip(1) {
        apply_checked(&mut state, cmd);
    }
    apply_checked(&mut state, &Command::LeaseBlock { network: "blue".into(), node: 1 });
    let first = state.nodes.keys().next().copied().unwrap_or(1);
    apply_checked(&mut state, &Command::RemoveNode { id: first, gossip_key: None });
}

type Reply<T, E = openraft::error::Infallible> = Result<T, RaftError<NodeId, E>>;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let which = input.u8();
    let data = input.rest();
    match which % 16 {
        // What the Raft service receives.
        0 => {
            if let Some(r) = decode::<AppendEntriesRequest<TypeConfig>>(data) {
                apply_entries(&r.entries)
            }
        }
        1 => drop(decode::<VoteRequest<NodeId>>(data)),
        2 => {
            if let Some(r) = decode::<InstallSnapshotRequest<TypeConfig>>(data)
                && let Ok(state) = snapshot_state(&r.data)
            {
                from_snapshot(state)
            }
        }
        3 => {
            if let Some(LeaderOp::Command(cmd)) = decode::<LeaderOp>(data) {
                apply_checked(&mut running(), &cmd)
            }
        }
        // What its client reads back.
        4 => drop(decode::<Reply<AppendEntriesResponse<NodeId>>>(data)),
        5 => drop(decode::<Reply<VoteResponse<NodeId>>>(data)),
        6 => drop(decode::<Reply<InstallSnapshotResponse<NodeId>, InstallSnapshotError>>(data)),
        7 => drop(decode::<Result<LeaderReply, String>>(data)),
        // What the Raft store reads back from its database.
        8 => {
            if let Some(e) = decode::<Entry<TypeConfig>>(data) {
                apply_entries(std::slice::from_ref(&e))
            }
        }
        9 => drop(decode::<Vote<NodeId>>(data)),
        10 => drop(decode::<Option<Option<LogId<NodeId>>>>(data)),
        11 => drop(decode::<LogId<NodeId>>(data)),
        12 => drop(decode::<SnapshotMeta<NodeId, RaftNode>>(data)),
        13 => drop(decode::<StoreOwner>(data)),
        14 => {
            if let Some(cmd) = decode::<Command>(data) {
                apply_checked(&mut running(), &cmd)
            }
        }
        // A snapshot's data, or the state machine's record.
        _ => {
            if let Ok(state) = snapshot_state(data) {
                from_snapshot(state)
            }
        }
    }
});
