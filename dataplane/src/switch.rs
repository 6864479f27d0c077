//! The switching core: a frame (or datagram) in, a decision out. No I/O, no clock, no
//! allocation; the Linux shell (or a test) carries the decision out.
//!
//! From the TAP side a frame goes to the one VTEP that owns its destination MAC, to the flood
//! list of its network (broadcast, multicast, unknown unicast: head-end replication), or, if it
//! is an ARP request the tables can answer, nowhere: the answer is written for the shell to
//! hand back to the TAP. From the underlay side a datagram must carry a valid VXLAN header, a
//! VNI this host serves, and come from a member VTEP of that network; then it may teach the
//! learner where its source MAC lives, and its inner frame goes to the network's TAP.
//! Every refusal is counted under its [`DropReason`].

use std::net::IpAddr;
use std::ops::Range;

use crate::counters::{Counters, DropReason, bump};
use crate::learn::{LearnedFdb, Learner};
use crate::tables::{NetworkTable, Tables};
use crate::wire::arp;
use crate::wire::ethernet;
use crate::wire::vxlan::{self, VxlanError, VxlanPacket};

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
    /// Write `datagram[inner]` to the TAP of the network in slot `port`.
    Deliver {
        /// The network's slot in the tables.
        port: usize,
        /// Where the inner Ethernet frame is in the datagram.
        inner: Range<usize>,
    },
    /// Drop it (already counted).
    Drop(DropReason),
}

/// Decides where a frame read from `net`'s TAP goes. `reply` receives an ARP answer when the
/// verdict is [`TapVerdict::ArpReply`].
#[inline]
pub fn from_tap<'t, P>(
    net: &'t NetworkTable<P>,
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
    } else if dst.is_broadcast() {
        if let Some(req) = arp::parse_request(frame) {
            if let Some(mac) = net.arp(&req.target_ip) {
                let n = arp::write_reply(frame, &req, mac, reply);
                bump(&counters.tx.arp_replies, 1);
                return TapVerdict::ArpReply(n);
            }
        }
    }
    let flood = net.flood_list();
    if flood.is_empty() {
        counters.dropped(DropReason::NoDestination);
        return TapVerdict::Drop(DropReason::NoDestination);
    }
    bump(&counters.tx.flooded, 1);
    TapVerdict::Flood(flood)
}

/// Decides what to do with a datagram from `src` received on the VXLAN port. `now` (seconds)
/// stamps what the learner learns.
#[inline]
pub fn from_underlay<P>(
    tables: &Tables<P>,
    learner: &mut Learner,
    src: IpAddr,
    datagram: &[u8],
    now: u64,
    counters: &Counters,
) -> UnderlayVerdict {
    let drop = |reason| {
        counters.dropped(reason);
        UnderlayVerdict::Drop(reason)
    };
    if datagram.len() < vxlan::HEADER_LEN + ethernet::HEADER_LEN {
        return drop(DropReason::Truncated);
    }
    let packet = VxlanPacket::new_unchecked(datagram);
    match packet.check() {
        Ok(()) => {}
        Err(VxlanError::BadFlags(_)) => return drop(DropReason::BadFlags),
        Err(VxlanError::ReservedBits) => return drop(DropReason::ReservedBits),
        Err(VxlanError::Truncated) => return drop(DropReason::Truncated),
    }
    let Some((port, net)) = tables.by_vni(packet.vni()) else {
        return drop(DropReason::UnknownVni);
    };
    if !net.is_member(&src) {
        return drop(DropReason::NotMember);
    }
    let inner = packet.payload();
    if net.learning() {
        let mac = ethernet::source(inner);
        if !mac.is_multicast() && net.fdb(&mac).is_none() {
            learner.observe(net.vni(), mac, src, now);
        }
    }
    UnderlayVerdict::Deliver {
        port,
        inner: vxlan::HEADER_LEN..datagram.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::{Learner, shared_learned};
    use crate::tables::SharedTables;
    use crate::wire::arp::tests::request;
    use crate::wire::vxlan::write_header;
    use crate::wire::{MacAddr, Vni};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    const LOCAL: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const REMOTE: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));
    const ROGUE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 99));

    fn vni() -> Vni {
        Vni::new(100).unwrap()
    }

    fn tables(learning: bool) -> Arc<SharedTables<()>> {
        let t = Arc::new(SharedTables::default());
        t.update(|tx| {
            tx.add_network(vni(), (), learning)?;
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
        let mut h = [0u8; 8];
        write_header(&mut h, vni);
        [&h[..], inner].concat()
    }

    #[test]
    fn unknown_and_broadcast_flood_known_unicast_does_not() {
        let t = tables(false);
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let learned = LearnedFdb::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        assert_eq!(
            from_tap(net, &learned, &frame(REMOTE, LOCAL), &mut reply, &c),
            TapVerdict::Flood(&[B, C])
        );
        assert_eq!(
            from_tap(
                net,
                &learned,
                &frame(MacAddr::BROADCAST, LOCAL),
                &mut reply,
                &c
            ),
            TapVerdict::Flood(&[B, C])
        );
        t.update(|tx| tx.set_fdb(vni(), REMOTE, C)).unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        assert_eq!(
            from_tap(net, &learned, &frame(REMOTE, LOCAL), &mut reply, &c),
            TapVerdict::Unicast(C)
        );
        assert_eq!(
            from_tap(net, &learned, &frame(REMOTE, LOCAL)[..13], &mut reply, &c),
            TapVerdict::Drop(DropReason::RuntFrame)
        );
        let s = c.snapshot();
        assert_eq!(
            (s.tx_flooded, s.tx_unicast, s.drops(DropReason::RuntFrame)),
            (2, 1, 1)
        );
    }

    #[test]
    fn an_empty_flood_list_drops_with_a_reason() {
        let t = Arc::new(SharedTables::default());
        t.update(|tx| tx.add_network(vni(), (), false)).unwrap();
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
        let TapVerdict::ArpReply(n) = from_tap(net, &LearnedFdb::default(), &req, &mut reply, &c)
        else {
            panic!("not answered")
        };
        assert_eq!(ethernet::destination(&reply[..n]), LOCAL);
        assert_eq!(
            &reply[14 + 8..14 + 14],
            &REMOTE.0,
            "sender hardware address is the answer"
        );
        // An address nobody listed is flooded as usual.
        let other = request(
            LOCAL,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        assert_eq!(
            from_tap(net, &LearnedFdb::default(), &other, &mut reply, &c),
            TapVerdict::Flood(&[B, C])
        );
        assert_eq!(c.snapshot().arp_replies, 1);
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
            from_underlay(&snap, &mut l, B, &good, 0, &c),
            UnderlayVerdict::Deliver {
                port: 0,
                inner: 8..good.len()
            }
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
            (
                datagram(Vni::new(200).unwrap(), &inner),
                B,
                DropReason::UnknownVni,
            ),
            (good.clone(), ROGUE, DropReason::NotMember),
        ];
        for (d, src, reason) in cases {
            assert_eq!(
                from_underlay(&snap, &mut l, src, &d, 0, &c),
                UnderlayVerdict::Drop(reason)
            );
            assert_eq!(c.drops(reason) >= 1, true, "{reason:?}");
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
        assert!(matches!(
            from_underlay(&snap, &mut l, C, &d, 5, &c),
            UnderlayVerdict::Deliver { .. }
        ));
        l.end_batch(5, &c);
        // The answer to REMOTE now goes to C alone.
        let net = snap.by_vni(vni()).unwrap().1;
        let v = from_tap(
            net,
            &shared.load(),
            &frame(REMOTE, LOCAL),
            &mut [0; arp::MAX_REPLY_LEN],
            &c,
        );
        assert_eq!(v, TapVerdict::Unicast(C));
        // A non-member cannot teach anything.
        let spoof = datagram(vni(), &frame(LOCAL, MacAddr([2, 0, 0, 0, 0, 66])));
        from_underlay(&snap, &mut l, ROGUE, &spoof, 6, &c);
        l.end_batch(6, &c);
        assert_eq!(shared.load().len(), 1);
    }
}
