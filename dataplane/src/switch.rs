//! The switching core: a frame (or datagram) in, a decision out. No I/O, no clock, no
//! allocation; the Linux shell (or a test) carries the decision out. Every refusal is counted
//! under its [`DropReason`].

use std::net::IpAddr;
use std::ops::Range;

use crate::counters::{Counters, DropReason, bump};
use crate::learn::{LearnedFdb, Learner};
use crate::segment::SuperFrame;
use crate::tables::{BlockOwner, NetworkTable, Tables};
use crate::wire::arp;
use crate::wire::checksum::{self, Completion};
use crate::wire::ethernet;
use crate::wire::vxlan::{self, VxlanError, VxlanPacket, VxlanRepr};

/// What to do with a frame read from a network's TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapVerdict<'t> {
    /// Encapsulate and send to this VTEP.
    Unicast(IpAddr),
    /// Encapsulate once and send a copy to each of these VTEPs.
    Flood(&'t [IpAddr]),
    /// An ARP reply of this many bytes is in the reply buffer: write it to the TAP.
    ArpReply(usize),
    /// Drop it (already counted).
    Drop(DropReason),
}

/// What to do with a datagram received on the VXLAN port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnderlayVerdict {
    /// Write `datagram[inner]` to the TAP of the network in `slot`.
    Deliver {
        /// The network's slot in the tables.
        slot: usize,
        /// Where the inner Ethernet frame is in the datagram.
        inner: Range<usize>,
        /// `Some(mss)`: the frame is a TCP/UDP super-frame larger than the network's MTU, to
        /// be cut into segments of `mss` payload bytes (see [`crate::segment`]) first.
        segment_mss: Option<usize>,
    },
    /// Drop it (already counted).
    Drop(DropReason),
}

/// Decides where a frame read from `net`'s TAP goes: to the one VTEP that owns its destination
/// MAC, to the network's flood list (broadcast, multicast, unknown unicast: head-end
/// replication), or, if it is an ARP request the tables can answer, nowhere: `reply` then
/// receives the answer ([`TapVerdict::ArpReply`]) for the shell to hand back to the TAP.
#[inline]
pub fn from_tap<'t, T>(
    net: &'t NetworkTable<T>,
    learned: &LearnedFdb,
    frame: &[u8],
    reply: &mut [u8; arp::MAX_REPLY_LEN],
    counters: &Counters,
) -> TapVerdict<'t> {
    if frame.len() < ethernet::HEADER_LEN {
        counters.dropped(DropReason::RuntFrame);
        return TapVerdict::Drop(DropReason::RuntFrame);
    }
    let dst = ethernet::destination(frame);
    if !dst.is_multicast() {
        if let Some(vtep) = net.fdb(&dst).or_else(|| learned.lookup(net.vni(), dst)) {
            bump(&counters.tx.unicast, 1);
            return TapVerdict::Unicast(vtep);
        }
        match dst.derived_ipv4().and_then(|ip| net.block(ip)) {
            Some(BlockOwner::Remote(vtep)) => {
                bump(&counters.tx.unicast, 1);
                return TapVerdict::Unicast(vtep);
            }
            Some(BlockOwner::Local) => {
                counters.dropped(DropReason::NoDestination);
                return TapVerdict::Drop(DropReason::NoDestination);
            }
            Some(BlockOwner::Down(_)) => {
                counters.dropped(DropReason::DestinationDown);
                return TapVerdict::Drop(DropReason::DestinationDown);
            }
            None => {}
        }
    } else if dst.is_broadcast() {
        if let Some(req) = arp::parse_request(frame) {
            if let Some(mac) = net.arp(&req.target_ip) {
                let n = arp::write_reply(frame, &req, mac, reply);
                bump(&counters.tx.arp_replies, 1);
                return TapVerdict::ArpReply(n);
            }
            // A cluster network knows every endpoint: what it cannot answer, nobody holds
            // (or its owner here answers itself), and flooding would not change that.
            if net.has_blocks() {
                let local =
                    net.gateway() == Some(req.target_ip) || matches!(net.block(req.target_ip), Some(BlockOwner::Local));
                let reason = if local { DropReason::ArpForLocal } else { DropReason::ArpUnknownTarget };
                counters.dropped(reason);
                return TapVerdict::Drop(reason);
            }
        }
    }
    let flood = net.flood_list();
    if flood.is_empty() {
        counters.dropped(DropReason::NoDestination);
        return TapVerdict::Drop(DropReason::NoDestination);
    }
    bump(&counters.tx.flooded, 1);
    if dst.is_broadcast() && arp::parse_request(frame).is_some() {
        bump(&counters.tx.arp_flooded, 1);
    }
    TapVerdict::Flood(flood)
}

/// Decides what to do with a datagram from `src` received on the VXLAN port. It must carry a
/// valid VXLAN header and a VNI this host serves, and come from a member VTEP of that network;
/// then it may teach the learner where its source MAC lives (`now`, in seconds, stamps what is
/// learned), and its inner frame goes to the network's TAP. A frame to deliver whose TCP/UDP
/// checksum the sender left partial (see [`checksum`]) is completed in place.
#[inline]
pub fn from_underlay<T>(
    tables: &Tables<T>,
    learner: &mut Learner,
    src: IpAddr,
    datagram: &mut [u8],
    now: u64,
    counters: &Counters,
) -> UnderlayVerdict {
    let drop = |reason| {
        counters.dropped(reason);
        UnderlayVerdict::Drop(reason)
    };
    let len = datagram.len();
    let mut packet = match VxlanPacket::new_checked(datagram) {
        Ok(p) if p.payload().len() >= ethernet::HEADER_LEN => p,
        _ => return drop(DropReason::Truncated), // no room for the VXLAN and Ethernet headers
    };
    let vni = match VxlanRepr::parse(&packet) {
        Ok(VxlanRepr { vni }) => vni,
        Err(VxlanError::BadFlags(_)) => return drop(DropReason::BadFlags),
        Err(VxlanError::ReservedBits) => return drop(DropReason::ReservedBits),
        Err(VxlanError::Truncated) => return drop(DropReason::Truncated),
    };
    let Some((slot, net)) = tables.by_vni(vni) else {
        return drop(DropReason::UnknownVni);
    };
    if !net.is_member(&src) {
        return drop(DropReason::NotMember);
    }
    let inner = packet.payload();
    let mut segment_mss = None;
    let mtu = net.mtu() as usize;
    if inner.len() > mtu + ethernet::HEADER_LEN {
        // Only a sender on the same machine (over veth) can hand us a frame above the MTU: its
        // kernel left segmentation to a NIC that does not exist. Cut it as that NIC would.
        match oversized(inner, mtu) {
            Ok(mss) => segment_mss = mss,
            Err(()) => return drop(DropReason::OversizedFrame),
        }
    }
    if net.learning() {
        let mac = ethernet::source(inner);
        if !mac.is_multicast() && net.fdb(&mac).is_none() {
            learner.observe(net.vni(), mac, src, now);
        }
    }
    if segment_mss.is_some() {
        bump(&counters.rx.resegmented, 1);
    } else if checksum::complete_partial(packet.payload_mut()) == Completion::Completed {
        bump(&counters.rx.checksums_completed, 1);
    }
    UnderlayVerdict::Deliver { slot, inner: vxlan::HEADER_LEN..len, segment_mss }
}

/// For a frame longer than `mtu` plus an untagged Ethernet header: `Ok(None)` if its IP packet
/// fits after all (VLAN tags), `Ok(Some(mss))` to segment it, `Err` if it cannot be cut.
#[cold]
fn oversized(frame: &[u8], mtu: usize) -> Result<Option<usize>, ()> {
    let (_, l3) = ethernet::network_layer(frame).ok_or(())?;
    if frame.len() - l3 <= mtu {
        return Ok(None);
    }
    let sf = SuperFrame::parse(frame).map_err(drop)?;
    sf.mss_for_mtu(mtu).map(Some).map_err(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::{Learner, shared_learned};
    use crate::tables::{NetworkSettings, SharedTables};
    use crate::wire::arp::tests::request;
    use crate::wire::{MacAddr, Vni};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    const LOCAL: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const REMOTE: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));
    const DOWN: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 4));
    const ROGUE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 99));

    fn vni() -> Vni {
        Vni::new(100).unwrap()
    }

    fn tables(learning: bool) -> Arc<SharedTables<()>> {
        let t = Arc::new(SharedTables::default());
        t.update(|tx| {
            tx.add_network(vni(), (), NetworkSettings { learning, mtu: 1450 })?;
            tx.set_flood_list(vni(), [B, C])
        })
        .unwrap();
        t
    }

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45; 50]);
        f
    }

    fn datagram(vni: Vni, inner: &[u8]) -> Vec<u8> {
        let mut d = [&[0u8; vxlan::HEADER_LEN][..], inner].concat();
        VxlanRepr { vni }.emit(&mut VxlanPacket::new_checked(&mut d[..]).unwrap());
        d
    }

    #[test]
    fn unknown_and_broadcast_flood_known_unicast_does_not() {
        let t = tables(false);
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let learned = LearnedFdb::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        assert_eq!(from_tap(net, &learned, &frame(REMOTE, LOCAL), &mut reply, &c), TapVerdict::Flood(&[B, C]));
        assert_eq!(
            from_tap(net, &learned, &frame(MacAddr::BROADCAST, LOCAL), &mut reply, &c),
            TapVerdict::Flood(&[B, C])
        );
        t.update(|tx| tx.set_fdb(vni(), REMOTE, C)).unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        assert_eq!(from_tap(net, &learned, &frame(REMOTE, LOCAL), &mut reply, &c), TapVerdict::Unicast(C));
        assert_eq!(
            from_tap(net, &learned, &frame(REMOTE, LOCAL)[..13], &mut reply, &c),
            TapVerdict::Drop(DropReason::RuntFrame)
        );
        let s = c.snapshot();
        assert_eq!((s.tx_flooded, s.tx_unicast, s.drops(DropReason::RuntFrame)), (2, 1, 1));
    }

    #[test]
    fn an_empty_flood_list_drops_with_a_reason() {
        let t = Arc::new(SharedTables::default());
        t.update(|tx| tx.add_network(vni(), (), NetworkSettings { learning: false, mtu: 1450 })).unwrap();
        let snap = t.load();
        let c = Counters::default();
        let v = from_tap(
            snap.by_vni(vni()).unwrap().1,
            &LearnedFdb::default(),
            &frame(REMOTE, LOCAL),
            &mut [0; arp::MAX_REPLY_LEN],
            &c,
        );
        assert_eq!(v, TapVerdict::Drop(DropReason::NoDestination));
        assert_eq!(c.drops(DropReason::NoDestination), 1);
    }

    #[test]
    fn arp_for_a_known_address_is_answered_locally() {
        let t = tables(false);
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        t.update(|tx| tx.set_arp(vni(), ip, REMOTE)).unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        let req = request(LOCAL, Ipv4Addr::new(10, 0, 0, 1), ip);
        let TapVerdict::ArpReply(n) = from_tap(net, &LearnedFdb::default(), &req, &mut reply, &c) else {
            panic!("not answered")
        };
        assert_eq!(ethernet::destination(&reply[..n]), LOCAL);
        assert_eq!(&reply[14 + 8..14 + 14], &REMOTE.0, "sender hardware address is the answer");
        // On a static network, an address nobody listed is flooded as usual (and counted).
        let other = request(LOCAL, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(from_tap(net, &LearnedFdb::default(), &other, &mut reply, &c), TapVerdict::Flood(&[B, C]));
        assert_eq!((c.snapshot().arp_replies, c.snapshot().tx_arp_flooded), (1, 1));
    }

    #[test]
    fn underlay_checks_header_vni_and_membership() {
        let t = tables(false);
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        let inner = frame(LOCAL, REMOTE);
        let good = datagram(vni(), &inner);
        assert_eq!(
            from_underlay(&snap, &mut l, B, &mut good.clone(), 0, &c),
            UnderlayVerdict::Deliver { slot: 0, inner: 8..good.len(), segment_mss: None }
        );

        let cases: [(Vec<u8>, IpAddr, DropReason); 6] = [
            (good[..8 + 13].to_vec(), B, DropReason::Truncated),
            (vec![], B, DropReason::Truncated),
            (
                {
                    let mut d = good.clone();
                    d[0] = 0x0c;
                    d
                },
                B,
                DropReason::BadFlags,
            ),
            (
                {
                    let mut d = good.clone();
                    d[7] = 1;
                    d
                },
                B,
                DropReason::ReservedBits,
            ),
            (datagram(Vni::new(200).unwrap(), &inner), B, DropReason::UnknownVni),
            (good.clone(), ROGUE, DropReason::NotMember),
        ];
        for (d, src, reason) in cases {
            assert_eq!(from_underlay(&snap, &mut l, src, &mut d.clone(), 0, &c), UnderlayVerdict::Drop(reason));
            assert!(c.drops(reason) >= 1, "{reason:?}");
        }
        assert_eq!(c.snapshot().total_drops(), 6);
    }

    #[test]
    fn learning_sends_the_reply_straight_back() {
        let t = tables(true);
        let snap = t.load();
        let c = Counters::default();
        let shared = shared_learned();
        let mut l = Learner::new(Arc::clone(&shared), 16, 300);
        // A frame from REMOTE arrives from VTEP C: learn it.
        let d = datagram(vni(), &frame(LOCAL, REMOTE));
        assert!(matches!(from_underlay(&snap, &mut l, C, &mut d.clone(), 5, &c), UnderlayVerdict::Deliver { .. }));
        l.end_batch(5, &c);
        // The answer to REMOTE now goes to C alone.
        let net = snap.by_vni(vni()).unwrap().1;
        let v = from_tap(net, &shared.load(), &frame(REMOTE, LOCAL), &mut [0; arp::MAX_REPLY_LEN], &c);
        assert_eq!(v, TapVerdict::Unicast(C));
        // A non-member cannot teach anything.
        let spoof = datagram(vni(), &frame(LOCAL, MacAddr([2, 0, 0, 0, 0, 66])));
        from_underlay(&snap, &mut l, ROGUE, &mut spoof.clone(), 6, &c);
        l.end_batch(6, &c);
        assert_eq!(shared.load().len(), 1);
    }

    #[test]
    fn a_super_frame_above_the_mtu_is_cut_and_anything_else_that_big_dropped() {
        let t = tables(false);
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        let tcp = crate::segment::tests::tcp4_super(&[9u8; 5000], 12, 0x18, 1);
        let mut d = datagram(vni(), &tcp);
        let v = from_underlay(&snap, &mut l, B, &mut d, 0, &c);
        assert_eq!(v, UnderlayVerdict::Deliver { slot: 0, inner: 8..d.len(), segment_mss: Some(1450 - 20 - 32) });
        let mut icmp = tcp.clone();
        icmp[23] = 1; // protocol ICMP: no way to cut it
        let mut d = datagram(vni(), &icmp);
        assert_eq!(from_underlay(&snap, &mut l, B, &mut d, 0, &c), UnderlayVerdict::Drop(DropReason::OversizedFrame));
        assert_eq!(c.snapshot().rx_resegmented, 1);
    }

    #[test]
    fn a_partial_inner_checksum_is_completed_before_delivery() {
        let t = tables(false);
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        // Segment a small super-frame to get a frame with a correct checksum, then make it partial.
        let sf = crate::segment::tests::tcp4_super(&[5u8; 100], 0, 0x18, 1);
        let parsed = crate::segment::SuperFrame::parse(&sf).unwrap();
        let mut good = vec![0u8; 200];
        let n = parsed.write_segment(0, 1000, &mut good);
        good.truncate(n);
        let mut partial = good.clone();
        let p = checksum::fold(checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, (n - 34) as u16));
        partial[34 + 16..34 + 18].copy_from_slice(&p.to_be_bytes());
        let mut d = datagram(vni(), &partial);
        assert!(matches!(from_underlay(&snap, &mut l, B, &mut d, 0, &c), UnderlayVerdict::Deliver { .. }));
        assert_eq!(&d[8..], &good[..]);
        assert_eq!(c.snapshot().rx_checksums_completed, 1);
    }

    #[test]
    fn blocks_resolve_derived_macs_and_arp_is_answered_for_known_endpoints_only() {
        let t = tables(false);
        t.update(|tx| {
            tx.set_gateway(vni(), Some(Ipv4Addr::new(10, 128, 0, 1)))?;
            tx.set_blocks(
                vni(),
                24,
                [
                    (Ipv4Addr::new(10, 128, 0, 0), BlockOwner::Local),
                    (Ipv4Addr::new(10, 128, 1, 0), BlockOwner::Remote(C)),
                    (Ipv4Addr::new(10, 128, 2, 0), BlockOwner::Down(DOWN)),
                ],
            )?;
            tx.set_arp(vni(), Ipv4Addr::new(10, 128, 1, 9), MacAddr::from_ipv4(Ipv4Addr::new(10, 128, 1, 9)))
        })
        .unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let learned = LearnedFdb::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        let remote = Ipv4Addr::new(10, 128, 1, 9);
        let me = MacAddr::from_ipv4(Ipv4Addr::new(10, 128, 0, 5));
        // A frame to a remote container's derived MAC goes to its block's VTEP.
        assert_eq!(
            from_tap(net, &learned, &frame(MacAddr::from_ipv4(remote), me), &mut reply, &c),
            TapVerdict::Unicast(C)
        );
        // ARP for a remote endpoint that gossip reported is answered.
        let req = request(me, Ipv4Addr::new(10, 128, 0, 5), remote);
        let TapVerdict::ArpReply(n) = from_tap(net, &learned, &req, &mut reply, &c) else { panic!("not answered") };
        assert_eq!(&reply[14 + 8..14 + 14], &MacAddr::from_ipv4(remote).0);
        assert!(n >= 42);
        // ARP for an address nobody holds (in a remote block, a dead host's block, or no block)
        // is neither answered nor flooded.
        for target in [Ipv4Addr::new(10, 128, 1, 10), Ipv4Addr::new(10, 128, 2, 3), Ipv4Addr::new(10, 128, 9, 3)] {
            let req = request(me, Ipv4Addr::new(10, 128, 0, 5), target);
            assert_eq!(from_tap(net, &learned, &req, &mut reply, &c), TapVerdict::Drop(DropReason::ArpUnknownTarget));
        }
        // Frames for a dead host's addresses go nowhere.
        assert_eq!(
            from_tap(net, &learned, &frame(MacAddr::from_ipv4(Ipv4Addr::new(10, 128, 2, 3)), me), &mut reply, &c),
            TapVerdict::Drop(DropReason::DestinationDown)
        );
        assert!(!net.is_member(&DOWN), "a dead host's VTEP is no member");
        // ARP for a local address or the gateway is left to this host: dropped, not flooded.
        for target in [Ipv4Addr::new(10, 128, 0, 7), Ipv4Addr::new(10, 128, 0, 1)] {
            let req = request(me, Ipv4Addr::new(10, 128, 0, 5), target);
            assert_eq!(from_tap(net, &learned, &req, &mut reply, &c), TapVerdict::Drop(DropReason::ArpForLocal));
        }
        // A frame to a local derived MAC that reached the TAP has nowhere to go.
        let local = MacAddr::from_ipv4(Ipv4Addr::new(10, 128, 0, 8));
        assert_eq!(
            from_tap(net, &learned, &frame(local, me), &mut reply, &c),
            TapVerdict::Drop(DropReason::NoDestination)
        );
        assert_eq!(c.snapshot().tx_flooded, 0, "nothing flooded");
        // Frames from the remote block's VTEP are accepted.
        assert!(net.is_member(&C));
    }
}
