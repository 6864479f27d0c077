//! Every protobuf message the control port, the host API and the local agent API receive
//! (and the replies their clients read), decoded by prost as tonic decodes them, then taken
//! where the code takes them: the manager's checks and the command each request becomes,
//! applied to a running cluster's state; the follower's conversions of the watch stream into
//! its view; the joiner's reading of the join reply. Whatever decodes re-encodes to itself.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use control::convert::{self, role_from_pb};
use control::pki::{ClusterCa, JoinToken, NodeKey};
use control::state::{
    Block, Change, ClusterView, Command, Network, NewNetwork, NewNode, NodeRecord, Role, check_network_name,
};
use control::types::StateEvent;
use control::watch::{self, History};
use control_fuzz::Input;
use control_fuzz::cluster::{apply_checked, running};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto as pb;

static CA: LazyLock<ClusterCa> = LazyLock::new(|| ClusterCa::generate("fuzz").expect("a CA"));

/// Decodes `data` as `M`; what decodes encodes and decodes to the same message.
fn decode<M: Message + Default + PartialEq>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("what prost encodes decodes");
    assert!(again == m, "{} does not round-trip", std::any::type_name::<M>());
    Some(m)
}

/// What the manager's Join does with a request before and after the token check.
fn join(r: &pb::JoinRequest) {
    let _ = JoinToken::secret_hash(&r.secret);
    let (Ok(underlay_addr), Ok(api_addr)) = (r.underlay_addr.parse::<IpAddr>(), r.api_addr.parse::<SocketAddr>())
    else {
        return;
    };
    if r.name.is_empty() || r.name.len() > 64 {
        return;
    }
    if CA.sign_node(&r.csr_der, 0, Role::Worker).is_err() {
        return;
    }
    let Ok(gossip_addr) = r.gossip_addr.parse::<SocketAddr>() else { return };
    let Ok(gossip_public_key) = r.gossip_public_key.as_slice().try_into() else { return };
    let Ok(underlay_networks) = convert::underlay_networks(&r.underlay_networks) else { return };
    let new = NewNode {
        name: r.name.clone(),
        underlay_addr,
        api_addr,
        role: Role::Worker,
        joined_at: 1_700_000_100,
        gossip_addr,
        gossip_public_key,
        underlay_networks,
    };
    apply_checked(&mut running(), &Command::AddNode(new));
}

/// What the manager's CreateNetwork does.
fn create_network(r: &pb::CreateNetworkRequest) {
    if check_network_name(&r.name).is_err() {
        return;
    }
    let subnet = match r.subnet.as_str() {
        "" => None,
        s => match s.parse() {
            Ok(s) => Some(s),
            Err(_) => return,
        },
    };
    let block_prefix = match r.block_prefix {
        0 => None,
        p => match u8::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => return,
        },
    };
    let spec = NewNetwork {
        name: r.name.clone(),
        vni: (r.vni != 0).then_some(r.vni),
        subnet,
        mtu: if r.mtu == 0 { 1450 } else { r.mtu },
        block_prefix,
        created_at: 1_700_000_100,
        internal: r.internal,
    };
    apply_checked(&mut running(), &Command::CreateNetwork(spec));
}

/// What a follower does with a watch event.
fn watch_event(e: &pb::WatchEvent) {
    let mut view = running().view();
    match &e.body {
        Some(pb::watch_event::Body::Snapshot(s)) => {
            let Ok(mut snapshot) = ClusterView::try_from(s) else { return };
            snapshot.revision = e.revision;
            let back = ClusterView::try_from(&pb::ClusterView::from(&snapshot)).expect("a view converts back");
            assert_eq!(back, snapshot, "a view survives the round trip");
            assert!(watch::follow(&mut view, e.revision, Some(snapshot.clone()), &[]));
            assert_eq!(view, snapshot);
        }
        Some(pb::watch_event::Body::Changes(set)) => {
            let Ok(changes) = set.changes.iter().map(Change::try_from).collect::<Result<Vec<_>, _>>() else { return };
            for c in &changes {
                let back = Change::try_from(&pb::Change::from(c)).expect("a change converts back");
                assert_eq!(&back, c, "a change survives the round trip");
            }
            view.apply_changes(e.revision, &changes);
            let mut history = History::new(view.revision, 4);
            history.record(StateEvent::Applied { revision: e.revision, changes });
            let _ = history.catchup(e.revision.wrapping_sub(1));
        }
        None => {}
    }
}

/// What a joiner does with the join reply.
fn join_reply(r: &pb::JoinReply) {
    let _ = role_from_pb(r.role);
    let _: Vec<SocketAddr> = r.managers.iter().filter_map(|m| m.api_addr.parse().ok()).collect();
    for m in &r.managers {
        let _ = NodeRecord::try_from(m);
    }
    let _: Result<[u8; 32], _> = r.gossip_key.as_slice().try_into();
    if !r.node_cert_pem.is_empty() && !r.ca_cert_pem.is_empty() {
        let key = NodeKey::generate().expect("a key");
        let _ = key.into_identity(&r.node_cert_pem, &r.ca_cert_pem);
    }
}

fn node_record(n: &pb::Node) {
    if let Ok(rec) = NodeRecord::try_from(n) {
        let back = NodeRecord::try_from(&pb::Node::from(&rec)).expect("a node converts back");
        assert_eq!(back, rec);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let which = input.u8();
    let data = input.rest();
    let mut state = running();
    match which % 40 {
        // The manager API (control port).
        0 => {
            if let Some(r) = decode::<pb::JoinRequest>(data) {
                join(&r)
            }
        }
        1 => drop(decode::<pb::PromoteRequest>(data)),
        2 => {
            if let Some(r) = decode::<pb::WatchRequest>(data) {
                let mut h = History::new(3, 2);
                h.record(StateEvent::Applied { revision: 4, changes: vec![] });
                let _ = h.catchup(r.from_revision);
            }
        }
        3 => {
            if let Some(r) = decode::<pb::CreateNetworkRequest>(data) {
                create_network(&r)
            }
        }
        4 => {
            if let Some(r) = decode::<pb::RemoveNetworkRequest>(data) {
                apply_checked(&mut state, &Command::RemoveNetwork { name: r.name, force: r.force });
            }
        }
        5 => {
            if let Some(r) = decode::<pb::LeaseBlockRequest>(data) {
                apply_checked(&mut state, &Command::LeaseBlock { network: r.network, node: 1 });
            }
        }
        6 => {
            if let Some(r) = decode::<pb::ReleaseBlockRequest>(data) {
                apply_checked(&mut state, &Command::ReleaseBlock { network: r.network, node: 2 });
            }
        }
        7 => {
            if let Some(r) = decode::<pb::HeartbeatRequest>(data)
                && let Ok(networks) = convert::underlay_networks(&r.underlay_networks)
            {
                apply_checked(&mut state, &Command::SetUnderlayNetworks { id: 2, networks });
            }
        }
        8 => {
            if let Some(r) = decode::<pb::RemoveNodeRequest>(data) {
                let id = state
                    .nodes
                    .values()
                    .find(|n| n.name == r.node)
                    .map(|n| n.id)
                    .or_else(|| r.node.parse().ok().filter(|id| state.nodes.contains_key(id)));
                if let Some(id) = id {
                    apply_checked(&mut state, &Command::RemoveNode { id, gossip_key: Some("11".repeat(32)) });
                }
            }
        }
        9 => drop(decode::<pb::LeaveRequest>(data)),
        10 => drop(decode::<pb::Empty>(data)),
        11 => drop(decode::<pb::RaftMessage>(data)),
        // The host API.
        12 => drop(decode::<pb::EndpointsRequest>(data)),
        // What the manager API's clients read.
        13 => {
            if let Some(r) = decode::<pb::JoinReply>(data) {
                join_reply(&r)
            }
        }
        14 => {
            if let Some(e) = decode::<pb::WatchEvent>(data) {
                watch_event(&e)
            }
        }
        15 => {
            if let Some(n) = decode::<pb::Network>(data)
                && let Ok(net) = Network::try_from(&n)
            {
                assert_eq!(Network::try_from(&pb::Network::from(&net)).expect("converts back"), net);
            }
        }
        16 => {
            if let Some(b) = decode::<pb::Block>(data)
                && let Ok(block) = Block::try_from(&b)
            {
                assert_eq!(Block::try_from(&pb::Block::from(&block)).expect("converts back"), block);
            }
        }
        17 => drop(decode::<pb::ClusterInfo>(data)),
        18 => {
            if let Some(r) = decode::<pb::GossipKeyReply>(data) {
                let _: Result<[u8; 32], _> = r.key.as_slice().try_into();
            }
        }
        19 => drop(decode::<pb::EndpointsReply>(data)),
        20 => {
            if let Some(n) = decode::<pb::Node>(data) {
                node_record(&n)
            }
        }
        21 => {
            if let Some(v) = decode::<pb::ClusterView>(data)
                && let Ok(view) = ClusterView::try_from(&v)
            {
                assert_eq!(ClusterView::try_from(&pb::ClusterView::from(&view)).expect("converts back"), view);
            }
        }
        // The local agent API (Unix socket): what the daemon receives.
        22 => drop(decode::<pb::InitRequest>(data)),
        23 => {
            if let Some(r) = decode::<pb::JoinClusterRequest>(data) {
                let _ = r.token.trim().parse::<JoinToken>();
            }
        }
        24 => drop(decode::<pb::LeaveClusterRequest>(data)),
        25 => drop(decode::<pb::NameRequest>(data)),
        26 => drop(decode::<pb::AttachRequest>(data)),
        27 => drop(decode::<pb::DetachRequest>(data)),
        28 => {
            if let Some(r) = decode::<pb::JoinTokenRequest>(data) {
                let _ = role_from_pb(r.role);
            }
        }
        // ... and what the CLI reads back.
        29 => drop(decode::<pb::StatusReply>(data)),
        30 => drop(decode::<pb::FdbReply>(data)),
        31 => drop(decode::<pb::InitReply>(data)),
        32 => drop(decode::<pb::JoinClusterReply>(data)),
        33 => drop(decode::<pb::NodeListReply>(data)),
        34 => drop(decode::<pb::NetworkListReply>(data)),
        35 => drop(decode::<pb::NetworkInspectReply>(data)),
        36 => drop(decode::<pb::Endpoint>(data)),
        37 => drop(decode::<pb::DetachReply>(data)),
        38 => drop(decode::<pb::PeersReply>(data)),
        _ => drop(decode::<pb::JoinTokenReply>(data)),
    }
});
