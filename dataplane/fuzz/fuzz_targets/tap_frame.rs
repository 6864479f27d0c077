//! Any frame a TAP could hand over, with any virtio-net header: completing checksums,
//! deciding segmentation, the switching decision, and cutting a super-frame must never
//! panic, and no segment may exceed its buffer or the MSS it was cut at.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dataplane::counters::Counters;
use dataplane::learn::LearnedFdb;
use dataplane::offload::{TxShape, VNET_HDR_LEN, VirtioNetHdr, prepare_tx};
use dataplane::segment::SuperFrame;
use dataplane::switch::from_tap;
use dataplane::tables::{NetworkSettings, SharedTables};
use dataplane::wire::arp;
use dataplane::Vni;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN {
        return;
    }
    let hdr = VirtioNetHdr::parse(data[..VNET_HDR_LEN].try_into().unwrap());
    let mut frame = data[VNET_HDR_LEN..].to_vec();
    let tables = Arc::new(SharedTables::<()>::default());
    let vni = Vni::new(7).unwrap();
    tables
        .update(|tx| {
            tx.add_network(vni, (), NetworkSettings { learning: false, mtu: 1450, encrypted: false })?;
            tx.set_flood_list(vni, [IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2))])
        })
        .unwrap();
    let snap = tables.load();
    let net = snap.by_vni(vni).unwrap().1;
    let counters = Counters::default();
    let Ok(shape) = prepare_tx(&hdr, &mut frame) else { return };
    let mut reply = [0u8; arp::MAX_REPLY_LEN];
    let _ = from_tap(net, &LearnedFdb::default(), &frame, &mut reply, &counters);
    if let TxShape::Segment { mss } = shape {
        let sf = SuperFrame::parse(&frame).expect("prepare_tx parsed it");
        let count = sf.segment_count(mss);
        if count > 256 {
            return; // the TX loop refuses these too
        }
        let mut out = vec![0u8; sf.header_len() + mss];
        for i in 0..count {
            let n = sf.write_segment(i, mss, &mut out);
            assert!(n <= sf.header_len() + mss);
        }
    }
});

