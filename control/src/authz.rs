//! Who may call what on the control port. Managers manage; workers follow the state, report in
//! and lease their own blocks; a removed node's certificate, still valid TLS, opens nothing.
//!
//! The caller's node id comes from its certificate; its standing — member and with which role,
//! removed, or unknown — from the cluster state, which is the truth: the certificate says what
//! the node was issued as, the state what it is now. [`authorize`] is the table; the services
//! ask it before anything else.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;

use crate::state::{NodeId, NodeRecord, Role};

/// A call of the control port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    /// Manager.Join: a joiner has no certificate yet, its token is checked instead.
    Join,
    /// Manager.Promote.
    Promote,
    /// Manager.Watch.
    Watch,
    /// Manager.CreateNetwork.
    CreateNetwork,
    /// Manager.RemoveNetwork.
    RemoveNetwork,
    /// Manager.CreateService.
    CreateService,
    /// Manager.RemoveService.
    RemoveService,
    /// Manager.LeaseBlock (for the caller).
    LeaseBlock,
    /// Manager.ReleaseBlock (the caller's).
    ReleaseBlock,
    /// Manager.Heartbeat.
    Heartbeat,
    /// Manager.RemoveNode.
    RemoveNode,
    /// Manager.Leave (the caller leaves).
    Leave,
    /// Manager.Info.
    Info,
    /// Manager.GossipKey.
    GossipKey,
    /// Manager.NetworkKeys: the encrypted networks' keys.
    NetworkKeys,
    /// Manager.RotateNetworkKey.
    RotateNetworkKey,
    /// Manager.UpdateNetwork.
    UpdateNetwork,
    /// Manager.SetNodeRole: promote or demote a node.
    SetNodeRole,
    /// Manager.Certify: a certificate of the caller's current role.
    Certify,
    /// Host.Endpoints.
    Endpoints,
    /// Raft.Propose: a manager hands a write to the leader.
    Propose,
    /// Raft.AppendEntries.
    AppendEntries,
    /// Raft.Vote.
    Vote,
    /// Raft.InstallSnapshot.
    InstallSnapshot,
}

/// What a call asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the call checks a join token itself.
    Token,
    /// A current member of the cluster.
    Member,
    /// A current member that is a manager (in the state and in its certificate).
    Manager,
    /// A voter of this node's Raft membership; or a manager this node's copy may be too old to
    /// know (not in its state at all, or no membership yet: a new manager before its first
    /// entries).
    Voter,
    /// A manager not removed: Raft's leader replicating its log. Only a leader elected by the
    /// voters sends entries, and it may have become a voter after this node's last entry (a
    /// manager that was down while another joined must take the log from that one).
    Leader,
}

impl Call {
    /// Every call, for tables and tests.
    pub const ALL: [Call; 24] = [
        Call::Join,
        Call::Promote,
        Call::Watch,
        Call::CreateNetwork,
        Call::RemoveNetwork,
        Call::CreateService,
        Call::RemoveService,
        Call::LeaseBlock,
        Call::ReleaseBlock,
        Call::Heartbeat,
        Call::RemoveNode,
        Call::Leave,
        Call::Info,
        Call::GossipKey,
        Call::NetworkKeys,
        Call::RotateNetworkKey,
        Call::UpdateNetwork,
        Call::SetNodeRole,
        Call::Certify,
        Call::Endpoints,
        Call::Propose,
        Call::AppendEntries,
        Call::Vote,
        Call::InstallSnapshot,
    ];

    /// What the call asks of its caller.
    pub fn needs(self) -> Need {
        match self {
            Call::Join => Need::Token,
            Call::Watch
            | Call::LeaseBlock
            | Call::ReleaseBlock
            | Call::Heartbeat
            | Call::Leave
            | Call::Info
            | Call::GossipKey
            | Call::NetworkKeys
            | Call::Certify
            | Call::Endpoints => Need::Member,
            Call::Promote
            | Call::CreateNetwork
            | Call::RemoveNetwork
            | Call::CreateService
            | Call::RemoveService
            | Call::RemoveNode
            | Call::RotateNetworkKey
            | Call::UpdateNetwork
            | Call::SetNodeRole
            | Call::Propose => Need::Manager,
            Call::Vote => Need::Voter,
            Call::AppendEntries | Call::InstallSnapshot => Need::Leader,
        }
    }

    /// What the call does, for a refusal ("only managers may …").
    pub fn what(self) -> &'static str {
        match self {
            Call::Join => "join",
            Call::Promote => "become Raft voters",
            Call::Watch => "watch the cluster state",
            Call::CreateNetwork => "create networks",
            Call::RemoveNetwork => "remove networks",
            Call::CreateService => "create services",
            Call::RemoveService => "remove services",
            Call::LeaseBlock => "lease address blocks",
            Call::ReleaseBlock => "release address blocks",
            Call::Heartbeat => "report in",
            Call::RemoveNode => "remove nodes",
            Call::Leave => "leave",
            Call::Info => "ask for the cluster's information",
            Call::GossipKey => "fetch the gossip key",
            Call::NetworkKeys => "fetch the network keys",
            Call::RotateNetworkKey => "rotate network keys",
            Call::UpdateNetwork => "change networks",
            Call::SetNodeRole => "promote or demote nodes",
            Call::Certify => "renew its certificate",
            Call::Endpoints => "list a host's endpoints",
            Call::Propose => "propose writes to the Raft leader",
            Call::AppendEntries | Call::Vote | Call::InstallSnapshot => "take part in Raft",
        }
    }
}

/// What the cluster state says of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A current member, with the role its record has.
    Member(Role),
    /// Removed from the cluster: never a member again.
    Removed,
    /// Neither: a node that joined after this copy of the state was last brought up to date.
    Unknown,
}

impl Standing {
    /// Node `id`'s standing in a state (or view) with these nodes and removed ids.
    pub fn of(id: NodeId, nodes: &BTreeMap<NodeId, NodeRecord>, removed: &BTreeSet<NodeId>) -> Standing {
        match nodes.get(&id) {
            Some(n) => Standing::Member(n.role),
            None if removed.contains(&id) => Standing::Removed,
            None => Standing::Unknown,
        }
    }
}

/// Whether a caller is a voter of this node's Raft membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voting {
    /// It is a voter.
    Voter,
    /// It is not.
    NotVoter,
    /// This node has no membership yet (a new manager before the leader's first entries).
    NoMembership,
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Its node id, from its certificate.
    pub id: NodeId,
    /// The role its certificate was issued with.
    pub certified: Role,
    /// What the state says of it.
    pub standing: Standing,
    /// Whether it is a Raft voter here (asked for Raft calls only).
    pub voting: Voting,
}

/// Why a call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No cluster node certificate came with the call.
    #[error("this call needs a cluster node certificate (join the cluster first)")]
    NoCertificate,
    /// The caller was removed from the cluster.
    #[error(
        "this node (node {0}) was removed from the cluster: its certificate is no longer accepted; \
         run `overlayd leave --force` on it, then join again with a token"
    )]
    Removed(NodeId),
    /// The state this host has does not know the caller (yet).
    #[error("node {0} is not known here yet (this copy of the cluster state may be behind): try another manager")]
    Unknown(NodeId),
    /// A manager's call from a worker.
    #[error("node {id} is a worker: only managers may {what}; run this on a manager")]
    NotManager {
        /// The caller.
        id: NodeId,
        /// What it asked to do.
        what: &'static str,
    },
    /// A Raft message from a node that is not a voter here.
    #[error("node {0} is not a Raft voter of this cluster")]
    NotVoter(NodeId),
}

/// The metadata key a refusal carries, with the reason as its value (`removed`), so that a
/// client tells a removal from other refusals without reading the message.
pub const REFUSAL_KEY: &str = "overlayd-refusal";

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        let msg = d.to_string();
        match d {
            Denied::NoCertificate => Status::unauthenticated(msg),
            Denied::Unknown(_) => Status::unavailable(msg),
            Denied::Removed(_) => {
                let mut s = Status::permission_denied(msg);
                s.metadata_mut().insert(REFUSAL_KEY, tonic::metadata::MetadataValue::from_static("removed"));
                s
            }
            Denied::NotManager { .. } | Denied::NotVoter(_) => Status::permission_denied(msg),
        }
    }
}

/// Whether a refusal says the caller was removed from the cluster.
pub fn is_removed(status: &Status) -> bool {
    status.code() == tonic::Code::PermissionDenied
        && status.metadata().get(REFUSAL_KEY).is_some_and(|v| v.as_bytes() == b"removed")
}

/// Whether `caller` may make `call`.
pub fn authorize(call: Call, caller: &Caller) -> Result<(), Denied> {
    let id = caller.id;
    match (call.needs(), caller.standing) {
        (Need::Token, _) => Ok(()),
        (_, Standing::Removed) => Err(Denied::Removed(id)),
        (Need::Voter | Need::Leader, Standing::Member(Role::Worker)) => Err(Denied::NotVoter(id)),
        (Need::Voter | Need::Leader, _) if caller.certified != Role::Manager => Err(Denied::NotVoter(id)),
        (Need::Leader, _) => Ok(()),
        (Need::Voter, standing) => match (caller.voting, standing) {
            (Voting::Voter, _) => Ok(()),
            // This node is behind the caller: a new manager before its first entries, or
            // one that has not heard of the caller's joining yet.
            (Voting::NoMembership, _) | (_, Standing::Unknown) => Ok(()),
            (Voting::NotVoter, _) => Err(Denied::NotVoter(id)),
        },
        (_, Standing::Unknown) => Err(Denied::Unknown(id)),
        (Need::Member, Standing::Member(_)) => Ok(()),
        (Need::Manager, Standing::Member(Role::Manager)) if caller.certified == Role::Manager => Ok(()),
        (Need::Manager, Standing::Member(_)) => Err(Denied::NotManager { id, what: call.what() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(certified: Role, standing: Standing, voting: Voting) -> Caller {
        Caller { id: 7, certified, standing, voting }
    }

    /// The table, call by call: what a manager, a worker, a removed node and a node this host
    /// does not know may do; Raft calls by voters only.
    #[test]
    fn every_call_by_every_kind_of_caller() {
        use Role::{Manager as M, Worker as W};
        let manager = caller(M, Standing::Member(M), Voting::NotVoter);
        let worker = caller(W, Standing::Member(W), Voting::NotVoter);
        // A worker whose certificate claims more than its record: the record wins.
        let promoted_cert = caller(M, Standing::Member(W), Voting::NotVoter);
        let removed_manager = caller(M, Standing::Removed, Voting::NotVoter);
        let removed_worker = caller(W, Standing::Removed, Voting::NotVoter);
        let unknown = caller(W, Standing::Unknown, Voting::NotVoter);
        use Call::*;
        let for_members =
            [Watch, LeaseBlock, ReleaseBlock, Heartbeat, Leave, Info, GossipKey, NetworkKeys, Certify, Endpoints];
        let for_managers = [
            Promote,
            CreateNetwork,
            RemoveNetwork,
            CreateService,
            RemoveService,
            RemoveNode,
            RotateNetworkKey,
            UpdateNetwork,
            SetNodeRole,
            Propose,
        ];
        for call in Call::ALL {
            let (m, w, pc) = (authorize(call, &manager), authorize(call, &worker), authorize(call, &promoted_cert));
            let (rm, rw, u) =
                (authorize(call, &removed_manager), authorize(call, &removed_worker), authorize(call, &unknown));
            let gone = (Err(Denied::Removed(7)), Err(Denied::Removed(7)), Err(Denied::Unknown(7)));
            match call {
                Join => assert!([m, w, pc, rm, rw, u].iter().all(Result::is_ok), "{call:?}"),
                _ if for_members.contains(&call) => {
                    assert_eq!((m, w, pc), (Ok(()), Ok(()), Ok(())), "{call:?}");
                    assert_eq!((rm, rw, u), gone, "{call:?}");
                }
                _ if for_managers.contains(&call) => {
                    let not = Err(Denied::NotManager { id: 7, what: call.what() });
                    assert_eq!((m, w, pc), (Ok(()), not, not), "{call:?}");
                    assert_eq!((rm, rw, u), gone, "{call:?}");
                }
                AppendEntries | Vote | InstallSnapshot => {
                    // Workers never, whatever their certificate says; removed nodes never.
                    assert_eq!(
                        (w, pc, u),
                        (Err(Denied::NotVoter(7)), Err(Denied::NotVoter(7)), Err(Denied::NotVoter(7)))
                    );
                    assert_eq!((rm, rw), (Err(Denied::Removed(7)), Err(Denied::Removed(7))));
                    let voter = caller(M, Standing::Member(M), Voting::Voter);
                    assert_eq!(authorize(call, &voter), Ok(()));
                    // This node behind the caller: a new manager with no membership yet, or
                    // one whose state does not know the caller: the certificate is all it has.
                    let fresh = |certified| caller(certified, Standing::Unknown, Voting::NoMembership);
                    assert_eq!(authorize(call, &fresh(M)), Ok(()));
                    assert_eq!(authorize(call, &fresh(W)), Err(Denied::NotVoter(7)));
                    let newer = caller(M, Standing::Unknown, Voting::NotVoter);
                    assert_eq!(authorize(call, &newer), Ok(()));
                    // A removed manager, even one this node still counts a voter, is not heard.
                    let stale = caller(M, Standing::Removed, Voting::Voter);
                    assert_eq!(authorize(call, &stale), Err(Denied::Removed(7)));
                    // A manager of the state that is no voter here: it may lead (promoted
                    // after this node's last entry), it may not ask for votes.
                    let want = if call == Vote { Err(Denied::NotVoter(7)) } else { Ok(()) };
                    assert_eq!(m, want, "{call:?}");
                }
                _ => panic!("{call:?} is in no row of the table"),
            }
        }
    }

    #[test]
    fn refusals_map_to_status_codes_and_a_removal_is_recognisable() {
        let removed = Status::from(Denied::Removed(3));
        assert_eq!(removed.code(), tonic::Code::PermissionDenied);
        assert!(removed.message().contains("removed from the cluster") && removed.message().contains("leave --force"));
        assert!(is_removed(&removed));
        let worker = Status::from(Denied::NotManager { id: 3, what: Call::RemoveNode.what() });
        assert_eq!(worker.code(), tonic::Code::PermissionDenied);
        assert!(!is_removed(&worker));
        assert!(worker.message().contains("only managers may remove nodes"), "{}", worker.message());
        assert_eq!(Status::from(Denied::Unknown(3)).code(), tonic::Code::Unavailable);
        assert_eq!(Status::from(Denied::NoCertificate).code(), tonic::Code::Unauthenticated);
        // A forged message that says "removed" without the metadata is not a removal.
        assert!(!is_removed(&Status::permission_denied(Denied::Removed(3).to_string())));
    }

    #[test]
    fn standing_from_the_state() {
        use crate::state::testing::{new_node, secrets};
        use crate::state::{ClusterState, Command};
        let mut s = ClusterState::default();
        let node = new_node("m", 1, Role::Manager);
        s.apply(&Command::Init { cluster_id: "c".into(), secrets: secrets(), node });
        s.apply(&Command::AddNode(new_node("w", 2, Role::Worker)));
        s.apply(&Command::AddNode(new_node("x", 3, Role::Worker)));
        s.apply(&Command::RemoveNode { id: 3, gossip_key: None, network_keys: Default::default(), at: 0 });
        assert_eq!(Standing::of(1, &s.nodes, &s.removed), Standing::Member(Role::Manager));
        assert_eq!(Standing::of(2, &s.nodes, &s.removed), Standing::Member(Role::Worker));
        assert_eq!(Standing::of(3, &s.nodes, &s.removed), Standing::Removed);
        assert_eq!(Standing::of(4, &s.nodes, &s.removed), Standing::Unknown);
    }
}
