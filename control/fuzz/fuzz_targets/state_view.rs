//! The follower's cache of the cluster view (`view.json` in the state dir), read back at
//! start by `follower::read_cache` as `Follower::start` reads it: a view that loads survives
//! the trip to the protobuf messages and back, reads back as itself once written again, takes
//! the watch's changes, and answers the questions the agent and the control port ask of it (a
//! node's standing, a block, a name).
#![no_main]

use control::authz::Standing;
use control::follower::read_cache;
use control::state::{Change, ClusterView};
use control_fuzz::cluster::{new_node, running};
use libfuzzer_sys::fuzz_target;
use proto as pb;

fuzz_target!(|data: &[u8]| {
    let Some(view) = read_cache(data) else { return };
    let json = serde_json::to_vec(&view).expect("a view encodes");
    assert_eq!(read_cache(&json).as_ref(), Some(&view), "what the follower writes it reads back");
    let back = ClusterView::try_from(&pb::ClusterView::from(&view)).expect("a cached view converts");
    assert_eq!(back, view, "protobuf round trip");
    for id in view.nodes.keys().chain(view.removed.iter()).copied().chain([0, 1, u64::MAX]) {
        let _ = Standing::of(id, &view.nodes, &view.removed);
        for net in view.networks.keys() {
            let _ = view.block(net, id);
        }
    }
    for n in view.nodes.values() {
        assert!(view.node_by_name(&n.name).is_some());
    }
    // The watch resumes from the cached revision.
    let mut next = view.clone();
    let running = running().view();
    let mut changes: Vec<Change> = running.nodes.values().cloned().map(Change::NodeUpsert).collect();
    changes.extend(running.networks.values().cloned().map(Change::NetworkUpsert));
    let first = view.nodes.keys().next().copied().unwrap_or(1);
    changes.push(Change::NodeRemove(first));
    changes.push(Change::BlockRemove { network: "blue".into(), node: 2 });
    changes.push(Change::NodeUpsert(control::state::NodeRecord {
        id: first,
        name: "m9".into(),
        underlay_addr: new_node("m9", 9, control::state::Role::Manager).underlay_addr,
        ..running.nodes.values().next().expect("a node").clone()
    }));
    next.apply_changes(view.revision.wrapping_add(1), &changes);
    assert!(next.removed.contains(&first));
});
