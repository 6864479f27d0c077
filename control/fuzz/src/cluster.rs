//! An initialized cluster state for commands to apply to: a manager, a worker, a network with
//! a block leased, as a running cluster has them.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use control::state::{ClusterState, Command, NewNetwork, NewNode, Response, Role, Secrets};

/// A new node as `join` records it, its addresses ending in `last`.
pub fn new_node(name: &str, last: u8, role: Role) -> NewNode {
    NewNode {
        name: name.into(),
        underlay_addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)),
        api_addr: format!("198.18.0.{last}:7947").parse().expect("an address"),
        role,
        joined_at: 1_700_000_000,
        gossip_addr: format!("198.18.0.{last}:7946").parse().expect("an address"),
        gossip_public_key: [last; 32],
        underlay_networks: vec!["198.18.0.0/15".parse().expect("a subnet")],
    }
}

/// Secrets as `init` makes them (not a real CA: commands never look inside).
pub fn secrets() -> Secrets {
    Secrets {
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        ca_key_pem: "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n".into(),
        worker_token_hash: control::pki::JoinToken::secret_hash("worker"),
        manager_token_hash: control::pki::JoinToken::secret_hash("manager"),
        gossip_key: "00".repeat(32),
        worker_token: String::new(),
        manager_token: String::new(),
        network_keys: Default::default(),
    }
}

/// The commands that made [`running`]: init, a worker joins, network "blue", its block, an
/// encrypted network "red".
pub fn history() -> Vec<Command> {
    vec![
        Command::Init { cluster_id: "c0ffee".into(), secrets: secrets(), node: new_node("m1", 1, Role::Manager) },
        Command::AddNode(new_node("w2", 2, Role::Worker)),
        Command::CreateNetwork(NewNetwork {
            name: "blue".into(),
            vni: None,
            subnet: None,
            mtu: 1450,
            block_prefix: None,
            created_at: 1_700_000_000,
            internal: false,
            key: None,
        }),
        Command::LeaseBlock { network: "blue".into(), node: 2 },
        Command::CreateNetwork(NewNetwork {
            name: "red".into(),
            vni: None,
            subnet: None,
            mtu: 1418,
            block_prefix: None,
            created_at: 1_700_000_000,
            internal: false,
            key: Some("11".repeat(32)),
        }),
    ]
}

/// The state of a small running cluster (see [`history`]).
pub fn running() -> ClusterState {
    static STATE: LazyLock<ClusterState> = LazyLock::new(|| {
        let mut s = ClusterState::default();
        for cmd in history() {
            let (r, _) = s.apply(&cmd);
            assert!(!matches!(r, Response::Rejected(_)), "{cmd:?}: {r:?}");
        }
        s
    });
    STATE.clone()
}

/// Applies `cmd` as every manager does, and checks what must hold whatever the command: the
/// same command on the same state gives the same answer and state (replicas agree), a
/// rejected command changes nothing, and the view a host gets survives its trip through the
/// protobuf messages.
pub fn apply_checked(state: &mut ClusterState, cmd: &Command) {
    let before = state.clone();
    let mut twin = state.clone();
    let (response, changes) = state.apply(cmd);
    let (twin_response, twin_changes) = twin.apply(cmd);
    assert_eq!((&response, &changes), (&twin_response, &twin_changes), "apply is deterministic");
    assert_eq!(state, &twin, "apply is deterministic");
    if matches!(response, Response::Rejected(_)) {
        assert_eq!(state, &before, "a rejected command changes nothing");
        assert!(changes.is_empty(), "a rejected command changes nothing");
    }
    // A follower that had the view before applies the changes and has the view after.
    let mut followed = before.view();
    followed.apply_changes(state.revision, &changes);
    assert_eq!(followed, state.view(), "the changes of {cmd:?} take a follower's view where the state went");
    let mut view = state.view();
    let pb = proto::ClusterView::from(&view);
    let back = control::state::ClusterView::try_from(&pb).expect("a manager's view converts back");
    // A network's empty block map (a snapshot may hold one) says nothing: messages leave it out.
    view.blocks.retain(|_, m| !m.is_empty());
    assert_eq!(back, view, "the view survives the protobuf round trip");
}
