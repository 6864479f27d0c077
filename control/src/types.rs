//! openraft's type configuration for overlayd, and what the state machine tells the rest of
//! the manager when it applies entries.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Change, Command, NodeId, Response};

/// What Raft knows of a member: where to reach its control API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// `ip:port` of its control API (gRPC over mutual TLS).
    pub api_addr: String,
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// overlayd's Raft types: the log carries [`Command`]s, applying one answers a [`Response`].
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What the state machine reports as it goes, in order: each batch of changes an applied
/// command made, or that the whole state was replaced (a snapshot was installed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    /// A command changed the state; the state is now at `revision`.
    Applied {
        /// The state's revision after the change.
        revision: u64,
        /// What changed.
        changes: Vec<Change>,
    },
    /// The state was replaced wholesale (snapshot installed, or loaded at start).
    Replaced {
        /// The state's revision now.
        revision: u64,
    },
}
