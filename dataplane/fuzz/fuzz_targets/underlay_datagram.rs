//! Any datagram on the VXLAN port: the switching core (header checks, membership, learning,
//! partial-checksum completion, oversize detection) must never panic, and a frame it delivers
//! lies inside the datagram.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dataplane::counters::Counters;
use dataplane::learn::{Learner, shared_learned};
use dataplane::switch::{Openers, UnderlayVerdict, from_underlay};
use dataplane::tables::{NetworkSettings, SharedTables};
use dataplane::{MacAddr, Vni};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tables = Arc::new(SharedTables::<()>::default());
    let peer = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    tables
        .update(|tx| {
            tx.add_network(Vni::new(100).unwrap(), (), NetworkSettings { learning: true, mtu: 1450, encrypted: false })?;
            tx.set_flood_list(Vni::new(100).unwrap(), [peer])?;
            tx.set_fdb(Vni::new(100).unwrap(), MacAddr([2, 0, 0, 0, 0, 9]), peer)
        })
        .unwrap();
    let snap = tables.load();
    let counters = Counters::default();
    let mut learner = Learner::new(shared_learned(), 64, 300);
    let mut datagram = data.to_vec();
    let len = datagram.len();
    match from_underlay(&snap, &mut Openers::default(), &mut learner, peer, &mut datagram, 0, &counters) {
        UnderlayVerdict::Deliver { inner, .. } => assert!(inner.start <= inner.end && inner.end <= len),
        UnderlayVerdict::Drop(_) => {}
    }
    learner.end_batch(1, &counters);
});
