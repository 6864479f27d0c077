//! The switching core: a frame (or datagram) in, a decision out. No I/O, no clock, no
//! allocation; the Linux shell (or a test) carries the decision out. Every refusal is counted
//! under its [`DropReason`], and charged to its network once that is known
//! ([`NetworkTable::counters`]); a datagram is counted for its network as it comes in.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::Arc;

use crate::counters::{Counters, DropReason, bump};
use crate::crypto::{self, Opener};
use crate::learn::{LearnedFdb, Learner};
use crate::segment::SuperFrame;
use crate::tables::{BlockOwner, NetworkCrypto, NetworkTable, Tables};
use crate::wire::MacAddr;
use crate::wire::arp;
use crate::wire::checksum::{self, Completion};
use crate::wire::ethernet;
use crate::wire::vxlan::{self, RemoteChecksum, VxlanError, VxlanPacket, VxlanRepr};
use etherparse::EtherType;

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
        /// The sender left the inner TCP/UDP checksum partial (VXLAN remote checksum
        /// offload, checked to lie within the frame): the TAP is told so (`NEEDS_CSUM`), or
        /// it is completed before the write.
        partial: Option<RemoteChecksum>,
    },
    /// Drop it (already counted).
    Drop(DropReason),
}

/// Decides where a frame read from `net`'s TAP goes: to the one VTEP that owns its destination
/// MAC, to the network's flood list (broadcast, multicast, unknown unicast: head-end
/// replication), or, if it is an ARP request the tables can answer, nowhere: `reply` then
/// receives the answer ([`TapVerdict::ArpReply`]) for the shell to hand back to the TAP.
///
/// On a cluster network a frame is sent only if it comes from one of this host's endpoints
/// with that endpoint's own address ([`DropReason::SourceNotLocal`]); the check is made once
/// the frame is known to leave, so what stays on this host (the gateway's own frames, answered
/// ARP) is dropped, or answered, for what it is.
#[inline]
pub fn from_tap<'t, T>(
    net: &'t NetworkTable<T>,
    learned: &LearnedFdb,
    frame: &[u8],
    reply: &mut [u8; arp::MAX_REPLY_LEN],
    counters: &Counters,
) -> TapVerdict<'t> {
    if frame.len() < ethernet::HEADER_LEN {
        return drop_tap(net, DropReason::RuntFrame, counters);
    }
    let dst = ethernet::destination(frame);
    if !dst.is_multicast() {
        if let Some(vtep) = net.fdb(&dst).or_else(|| learned.lookup(net.vni(), dst)) {
            return unicast(net, frame, vtep, counters);
        }
        match dst.derived_ipv4().and_then(|ip| net.block(ip)) {
            Some(BlockOwner::Remote(vtep)) => return unicast(net, frame, vtep, counters),
            Some(BlockOwner::Local) => {
                return drop_tap(net, DropReason::NoDestination, counters);
            }
            Some(BlockOwner::Down(_)) => {
                return drop_tap(net, DropReason::DestinationDown, counters);
            }
            None => {}
        }
    } else if dst.is_broadcast()
        && let Some(req) = arp::parse_request(frame)
    {
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
            return drop_tap(net, reason, counters);
        }
    }
    let flood = net.flood_list();
    if flood.is_empty() {
        return drop_tap(net, DropReason::NoDestination, counters);
    }
    if net.checks_sources() && !sent_by_local_endpoint(net, frame) {
        return drop_tap(net, DropReason::SourceNotLocal, counters);
    }
    bump(&counters.tx.flooded, 1);
    if dst.is_broadcast() && arp::parse_request(frame).is_some() {
        bump(&counters.tx.arp_flooded, 1);
    }
    TapVerdict::Flood(flood)
}

/// A frame from the TAP that goes to `vtep` alone, if its source may send.
#[inline]
fn unicast<'t, T>(net: &'t NetworkTable<T>, frame: &[u8], vtep: IpAddr, counters: &Counters) -> TapVerdict<'t> {
    if net.checks_sources() && !sent_by_local_endpoint(net, frame) {
        return drop_tap(net, DropReason::SourceNotLocal, counters);
    }
    bump(&counters.tx.unicast, 1);
    TapVerdict::Unicast(vtep)
}

/// Drops a frame read from `net`'s TAP, counted in all and for the network.
#[inline]
fn drop_tap<'t, T>(net: &NetworkTable<T>, reason: DropReason, counters: &Counters) -> TapVerdict<'t> {
    counters.dropped_in(net.counters(), reason);
    TapVerdict::Drop(reason)
}

/// Who a frame says it is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Its source MAC, and the IPv4 address it speaks for: an IPv4 packet's source, an
    /// Ethernet/IPv4 ARP packet's sender (none for an address probe's 0.0.0.0); none for
    /// anything else (IPv6, other protocols), whose sender is its MAC.
    Sender(MacAddr, Option<Ipv4Addr>),
    /// An IPv4 or ARP header too short to read, headers behind more VLAN tags than we look
    /// through, or an ARP sender MAC other than the frame's source: nothing to believe.
    Malformed,
}

/// Reads who `frame` (at least an Ethernet header long) says sent it: a few bytes at fixed
/// offsets behind the Ethernet header and its VLAN tags.
#[inline]
fn claim(frame: &[u8]) -> Claim {
    let mac = ethernet::source(frame);
    // Untagged IPv4, nearly every frame, without a parser.
    let (ether_type, l3) = match [frame[12], frame[13]] {
        [0x08, 0x00] => (EtherType::IPV4, ethernet::HEADER_LEN),
        _ => match ethernet::network_layer(frame) {
            Some(found) => found,
            None => return Claim::Malformed,
        },
    };
    match ether_type {
        EtherType::IPV4 => match frame.get(l3..l3 + 20) {
            Some(ip) => Claim::Sender(mac, Some(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]))),
            None => Claim::Malformed,
        },
        EtherType::ARP => match frame.get(l3..l3 + arp::ARP_ETH_IPV4_LEN) {
            // Hardware Ethernet (1), protocol IPv4 (0x0800), address lengths 6 and 4.
            Some(a) if a[..6] == [0, 1, 8, 0, 6, 4] => {
                if a[8..14] != mac.0 {
                    return Claim::Malformed;
                }
                let sender = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
                Claim::Sender(mac, (!sender.is_unspecified()).then_some(sender))
            }
            Some(_) => Claim::Sender(mac, None),
            None => Claim::Malformed,
        },
        _ => Claim::Sender(mac, None),
    }
}

/// Whether a frame from the TAP comes from one of this host's endpoints, with its address,
/// or from this host's mesh address, for itself or for a client from outside the subnet.
#[inline]
fn sent_by_local_endpoint<T>(net: &NetworkTable<T>, frame: &[u8]) -> bool {
    match claim(frame) {
        Claim::Sender(mac, ip) => match net.local_endpoint(&mac) {
            Some(own) => ip.is_none_or(|ip| ip == own),
            None => mac
                .derived_ipv4()
                .is_some_and(|d| net.is_mesh(d) && net.block(d) == Some(BlockOwner::Local) && from_mesh(net, d, ip)),
        },
        Claim::Malformed => false,
    }
}

/// Whether what a host's mesh address `mesh` sends may claim `ip` as its source: the mesh
/// address itself (its ARP), or a client outside the subnet.
#[inline]
fn from_mesh<T>(net: &NetworkTable<T>, mesh: Ipv4Addr, ip: Option<Ipv4Addr>) -> bool {
    ip.is_some_and(|ip| ip == mesh || net.outside_subnet(ip))
}

/// Whether a frame that `vtep` sent comes from one of its endpoints: its IPv4 source (or ARP
/// sender) in `vtep`'s block, and its MAC derived from an address of that block (or, for a MAC
/// of another form, an endpoint gossip places at `vtep`); or from `vtep`'s mesh address, with
/// a client's source from outside the subnet. No host speaks for the gateway,
/// which each host serves to its own containers only.
#[inline]
fn sent_by_vtep<T>(net: &NetworkTable<T>, vtep: IpAddr, frame: &[u8]) -> bool {
    let Claim::Sender(mac, ip) = claim(frame) else { return false };
    let holds = |a: Ipv4Addr| net.gateway() != Some(a) && net.block(a) == Some(BlockOwner::Remote(vtep));
    let derived = mac.derived_ipv4();
    match ip {
        // The usual case, a container's own packet: one lookup answers for both.
        Some(a) if derived == Some(a) => holds(a),
        _ => {
            let mac_ok = match derived {
                Some(d) => holds(d),
                None => net.fdb(&mac) == Some(vtep),
            };
            // A host's mesh address forwards the clients it took in on a published port.
            let mesh = || derived.is_some_and(|d| net.is_mesh(d) && from_mesh(net, d, ip));
            mac_ok && (ip.is_none_or(holds) || mesh())
        }
    }
}

/// The openers of the encrypted networks, by slot: the receive loop's own, each with its
/// senders' sessions and replay windows.
#[derive(Debug, Default)]
pub struct Openers {
    by_slot: Vec<Option<(Arc<NetworkCrypto>, Opener)>>,
}

impl Openers {
    /// Follows `tables`: a network whose keys changed opens with the new ones (its senders'
    /// state for the epochs kept stays), one gone or plain loses its opener. Allocates only when
    /// a network's keys change.
    pub fn sync<T>(&mut self, tables: &Tables<T>) {
        if self.by_slot.len() < tables.slots() {
            self.by_slot.resize_with(tables.slots(), || None);
        }
        for (slot, entry) in self.by_slot.iter_mut().enumerate() {
            let wanted = tables.network(slot).and_then(|n| n.crypto());
            match (wanted, entry.as_mut()) {
                (None, _) => *entry = None,
                (Some(w), Some((have, _))) if Arc::ptr_eq(w, have) => {}
                (Some(w), Some((have, opener))) => {
                    opener.set_keys(w.keys());
                    *have = Arc::clone(w);
                }
                (Some(w), None) => {
                    let mut opener = Opener::new();
                    opener.set_keys(w.keys());
                    *entry = Some((Arc::clone(w), opener));
                }
            }
        }
    }

    fn get(&mut self, slot: usize) -> Option<&mut Opener> {
        self.by_slot.get_mut(slot)?.as_mut().map(|(_, o)| o)
    }
}

/// Decides what to do with a datagram from `src` received on the VXLAN port. It must carry a
/// valid VXLAN header and a VNI this host serves, and come from a member VTEP of that network
/// (on a cluster network, from one of that VTEP's endpoints: [`DropReason::SourceNotOfSender`]);
/// then it may teach the learner where its source MAC lives (`now`, in seconds, stamps what is
/// learned), and its inner frame goes to the network's TAP. A frame to deliver whose TCP/UDP
/// checksum the sender left partial (see [`checksum`]) is completed in place.
///
/// An encrypted network takes only sealed datagrams ([`crypto`]), opened in place by its
/// opener in `openers` (which [`Openers::sync`] keeps in line with `tables`) before any of the
/// above; a plain network takes only plain ones.
#[inline]
pub fn from_underlay<T>(
    tables: &Tables<T>,
    openers: &mut Openers,
    learner: &mut Learner,
    src: IpAddr,
    datagram: &mut [u8],
    now: u64,
    counters: &Counters,
) -> UnderlayVerdict {
    // Before its VNI is known a datagram is nobody's; after, its network's.
    let drop = |reason| {
        counters.dropped(reason);
        UnderlayVerdict::Drop(reason)
    };
    let drop_in = |net: &NetworkTable<T>, reason| {
        counters.dropped_in(net.counters(), reason);
        UnderlayVerdict::Drop(reason)
    };
    let came_in = |net: &NetworkTable<T>, bytes: usize| {
        let c = net.counters();
        bump(&c.rx.frames, 1);
        bump(&c.rx.bytes, bytes as u64);
    };
    let len = datagram.len();
    let (slot, net, inner, rco) = if crypto::is_sealed(datagram) {
        if len < crypto::SEALED_HEADER_LEN {
            return drop(DropReason::SealTruncated);
        }
        let vni = crate::wire::Vni::new(u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]));
        let Some((slot, net)) = vni.and_then(|v| tables.by_vni(v)) else {
            return drop(DropReason::UnknownVni);
        };
        came_in(net, len.saturating_sub(crypto::SEALED_HEADER_LEN + crypto::TAG_LEN));
        if net.crypto().is_none() {
            return drop_in(net, DropReason::SealedOnPlain);
        }
        if !net.is_member(&src) {
            return drop_in(net, DropReason::NotMember);
        }
        let Some(opener) = openers.get(slot) else {
            return drop_in(net, DropReason::UnknownKey);
        };
        match opener.open(src, datagram) {
            Ok(inner) if inner.len() >= ethernet::HEADER_LEN => (slot, net, inner, None),
            Ok(_) => return drop_in(net, DropReason::SealTruncated),
            Err(e) => return drop_in(net, e.into()),
        }
    } else {
        let packet = match VxlanPacket::new_checked(&mut *datagram) {
            Ok(p) if p.payload().len() >= ethernet::HEADER_LEN => p,
            _ => return drop(DropReason::Truncated), // no room for the VXLAN and Ethernet headers
        };
        let (vni, rco) = match VxlanRepr::parse(&packet) {
            Ok(VxlanRepr { vni, rco }) => (vni, rco),
            Err(VxlanError::BadFlags(_)) => return drop(DropReason::BadFlags),
            Err(VxlanError::ReservedBits) => return drop(DropReason::ReservedBits),
            Err(VxlanError::BadRemoteChecksum) => return drop(DropReason::BadRemoteChecksum),
            Err(VxlanError::Truncated) => return drop(DropReason::Truncated),
        };
        // The partial checksum's field must lie within the inner frame, past its Ethernet
        // header, before anything trusts it.
        if let Some(r) = rco
            && (usize::from(r.start) < ethernet::HEADER_LEN
                || usize::from(r.start + r.offset()) + 2 > packet.payload().len())
        {
            return drop(DropReason::BadRemoteChecksum);
        }
        let Some((slot, net)) = tables.by_vni(vni) else {
            return drop(DropReason::UnknownVni);
        };
        came_in(net, len - vxlan::HEADER_LEN);
        if net.crypto().is_some() {
            return drop_in(net, DropReason::PlainOnEncrypted);
        }
        (slot, net, vxlan::HEADER_LEN..len, rco)
    };
    let frame = &mut datagram[inner.clone()];
    if net.has_blocks() {
        // A frame whose source lies in the block of the VTEP that sent it comes from a member:
        // one lookup answers both questions, and which one failed is asked only on a drop.
        if !sent_by_vtep(net, src, frame) {
            let reason = if net.is_member(&src) { DropReason::SourceNotOfSender } else { DropReason::NotMember };
            return drop_in(net, reason);
        }
    } else if !net.is_member(&src) {
        return drop_in(net, DropReason::NotMember);
    }
    let mut segment_mss = None;
    let mtu = net.mtu() as usize;
    if frame.len() > mtu + ethernet::HEADER_LEN {
        // Only a sender on the same machine (over veth) can hand us a frame above the MTU: its
        // kernel left segmentation to a NIC that does not exist. Cut it as that NIC would.
        match oversized(frame, mtu) {
            Ok(mss) => segment_mss = mss,
            Err(()) => return drop_in(net, DropReason::OversizedFrame),
        }
    }
    if net.learning() {
        let mac = ethernet::source(frame);
        if !mac.is_multicast() && net.fdb(&mac).is_none() {
            learner.observe(net.vni(), mac, src, now);
        }
    }
    let mut partial = None;
    if segment_mss.is_some() {
        // Cutting computes every segment's checksums whole.
        bump(&counters.rx.resegmented, 1);
    } else if rco.is_some() {
        // Covered on the underlay by the outer UDP checksum, finished by the receiver.
        partial = rco;
        bump(&counters.rx.remote_checksums, 1);
    } else if checksum::complete_partial(frame) == Completion::Completed {
        bump(&counters.rx.checksums_completed, 1);
    }
    UnderlayVerdict::Deliver { slot, inner, segment_mss, partial }
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
    use crate::tables::{NetworkSettings, SharedTables, TableError, Transaction};
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
            tx.add_network(vni(), (), NetworkSettings { learning, mtu: 1450, encrypted: false })?;
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
        VxlanRepr::plain(vni).emit(&mut VxlanPacket::new_checked(&mut d[..]).unwrap());
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
        assert_eq!(net.counters().snapshot().dropped["runt_frame"], 1, "charged to the network too");
    }

    #[test]
    fn an_empty_flood_list_drops_with_a_reason() {
        let t = Arc::new(SharedTables::default());
        t.update(|tx| tx.add_network(vni(), (), NetworkSettings { learning: false, mtu: 1450, encrypted: false }))
            .unwrap();
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
            from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut good.clone(), 0, &c),
            UnderlayVerdict::Deliver { slot: 0, inner: 8..good.len(), segment_mss: None, partial: None }
        );

        let cases: [(Vec<u8>, IpAddr, DropReason); 6] = [
            (good[..8 + 13].to_vec(), B, DropReason::Truncated),
            (vec![], B, DropReason::Truncated),
            (
                {
                    let mut d = good.clone();
                    d[0] = 0x09;
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
            assert_eq!(
                from_underlay(&snap, &mut Openers::default(), &mut l, src, &mut d.clone(), 0, &c),
                UnderlayVerdict::Drop(reason)
            );
            assert!(c.drops(reason) >= 1, "{reason:?}");
        }
        assert_eq!(c.snapshot().total_drops(), 6);
        // The network counts what came in with its VNI (the good datagram and the rogue's), and
        // is charged only the drop made once the VNI was known.
        let n = snap.by_vni(vni()).unwrap().1.counters().snapshot();
        assert_eq!((n.rx_frames, n.rx_bytes), (2, 2 * inner.len() as u64));
        assert_eq!(n.dropped.values().sum::<u64>(), 1);
        assert_eq!(n.dropped["not_member"], 1);
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
            from_underlay(&snap, &mut Openers::default(), &mut l, C, &mut d.clone(), 5, &c),
            UnderlayVerdict::Deliver { .. }
        ));
        l.end_batch(5, &c);
        // The answer to REMOTE now goes to C alone.
        let net = snap.by_vni(vni()).unwrap().1;
        let v = from_tap(net, &shared.load(), &frame(REMOTE, LOCAL), &mut [0; arp::MAX_REPLY_LEN], &c);
        assert_eq!(v, TapVerdict::Unicast(C));
        // A non-member cannot teach anything.
        let spoof = datagram(vni(), &frame(LOCAL, MacAddr([2, 0, 0, 0, 0, 66])));
        from_underlay(&snap, &mut Openers::default(), &mut l, ROGUE, &mut spoof.clone(), 6, &c);
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
        let v = from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut d, 0, &c);
        assert_eq!(
            v,
            UnderlayVerdict::Deliver { slot: 0, inner: 8..d.len(), segment_mss: Some(1450 - 20 - 32), partial: None }
        );
        let mut icmp = tcp.clone();
        icmp[23] = 1; // protocol ICMP: no way to cut it
        let mut d = datagram(vni(), &icmp);
        assert_eq!(
            from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut d, 0, &c),
            UnderlayVerdict::Drop(DropReason::OversizedFrame)
        );
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
        assert!(matches!(
            from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut d, 0, &c),
            UnderlayVerdict::Deliver { .. }
        ));
        assert_eq!(&d[8..], &good[..]);
        assert_eq!(c.snapshot().rx_checksums_completed, 1);
    }

    #[test]
    fn remote_checksum_offload_is_delivered_partial_and_refused_outside_the_frame() {
        let t = tables(false);
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        let sf = crate::segment::tests::tcp4_super(&[5u8; 100], 0, 0x18, 1);
        let parsed = crate::segment::SuperFrame::parse(&sf).unwrap();
        let mut partial = vec![0u8; parsed.header_len()];
        let payload = parsed.write_segment_headers_partial(0, 1000, &mut partial);
        partial.extend_from_slice(&sf[payload]);
        let with_rco = |start: usize| {
            let mut d = vec![0u8; 8 + partial.len()];
            d[8..].copy_from_slice(&partial);
            let rco = RemoteChecksum::new(start, false).unwrap();
            VxlanRepr { vni: vni(), rco: Some(rco) }.emit(&mut VxlanPacket::new_checked(&mut d[..]).unwrap());
            d
        };
        // Delivered as it came (nothing summed here), marked partial for the TAP.
        let mut d = with_rco(34);
        let v = from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut d, 0, &c);
        let rco = RemoteChecksum::new(34, false);
        assert_eq!(v, UnderlayVerdict::Deliver { slot: 0, inner: 8..d.len(), segment_mss: None, partial: rco });
        assert_eq!(&d[8..], &partial[..], "the frame is not touched");
        assert_eq!((c.snapshot().rx_remote_checksums, c.snapshot().rx_checksums_completed), (1, 0));
        // A start inside the Ethernet header, or a field past the frame's end: dropped, counted.
        for start in [12, 254] {
            let mut d = with_rco(start);
            let v = from_underlay(&snap, &mut Openers::default(), &mut l, B, &mut d, 0, &c);
            assert_eq!(v, UnderlayVerdict::Drop(DropReason::BadRemoteChecksum), "start {start}");
        }
        assert_eq!(c.drops(DropReason::BadRemoteChecksum), 2);
    }

    /// Gateway 10.128.0.1; blocks 10.128.0.0/24 (this host), 10.128.1.0/24 (C's) and
    /// 10.128.2.0/24 (`third`'s).
    fn gateway_and_blocks(tx: &mut Transaction<()>, third: BlockOwner) -> Result<(), TableError> {
        tx.set_gateway(vni(), Some(Ipv4Addr::new(10, 128, 0, 1)))?;
        tx.set_blocks(
            vni(),
            24,
            [
                (Ipv4Addr::new(10, 128, 0, 0), BlockOwner::Local),
                (Ipv4Addr::new(10, 128, 1, 0), BlockOwner::Remote(C)),
                (Ipv4Addr::new(10, 128, 2, 0), third),
            ],
        )
    }

    #[test]
    fn blocks_resolve_derived_macs_and_arp_is_answered_for_known_endpoints_only() {
        let t = tables(false);
        t.update(|tx| {
            gateway_and_blocks(tx, BlockOwner::Down(DOWN))?;
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

    /// An IPv4 frame from `(src_mac, src)` to `dst_mac`.
    fn ip_frame(dst_mac: MacAddr, src_mac: MacAddr, src: Ipv4Addr) -> Vec<u8> {
        let mut f = frame(dst_mac, src_mac);
        f[14 + 12..14 + 16].copy_from_slice(&src.octets());
        f
    }

    /// A broadcast gratuitous ARP reply: `sender_ip` is at `sender_mac`, sent from `eth_src`.
    fn garp(eth_src: MacAddr, sender_mac: MacAddr, sender_ip: Ipv4Addr) -> Vec<u8> {
        let mut f = request(eth_src, sender_ip, sender_ip);
        f[14 + 7] = 2; // a reply
        f[14 + 8..14 + 14].copy_from_slice(&sender_mac.0);
        f
    }

    /// A cluster network: this host (10.128.0.0/24) has endpoints .5 and .6; host C holds
    /// 10.128.1.0/24, host B 10.128.2.0/24.
    fn cluster_tables() -> Arc<SharedTables<()>> {
        let t = tables(false);
        t.update(|tx| {
            gateway_and_blocks(tx, BlockOwner::Remote(B))?;
            tx.set_local_endpoints(vni(), [5, 6].map(|n| (MacAddr::from_ipv4(v(0, n)), v(0, n))))
        })
        .unwrap();
        t
    }

    fn v(block: u8, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 128, block, n)
    }

    fn mac(block: u8, n: u8) -> MacAddr {
        MacAddr::from_ipv4(v(block, n))
    }

    #[test]
    fn a_cluster_network_sends_only_frames_of_its_own_endpoints() {
        let t = cluster_tables();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let learned = LearnedFdb::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        let mut send = |f: &[u8]| from_tap(net, &learned, f, &mut reply, &c);
        let remote = mac(1, 9);
        // An endpoint with its own identity: sent, unicast and flooded.
        assert_eq!(send(&ip_frame(remote, mac(0, 5), v(0, 5))), TapVerdict::Unicast(C));
        assert_eq!(send(&ip_frame(MacAddr::BROADCAST, mac(0, 6), v(0, 6))), TapVerdict::Flood(&[B, C]));
        let mut ipv6 = frame(MacAddr([0x33, 0x33, 0, 0, 0, 1]), mac(0, 5));
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(send(&ipv6), TapVerdict::Flood(&[B, C]), "IPv6 from an endpoint's MAC");
        let mut probe = garp(mac(0, 5), mac(0, 5), v(0, 5));
        probe[14 + 14..14 + 18].fill(0); // an address probe: sender 0.0.0.0
        assert_eq!(send(&probe), TapVerdict::Flood(&[B, C]));
        // Anything else: dropped and counted.
        let spoofed = [
            ip_frame(remote, mac(0, 5), v(0, 6)),             // another endpoint's address
            ip_frame(remote, mac(0, 6), v(0, 5)),             // another endpoint's MAC
            ip_frame(remote, mac(0, 7), v(0, 7)),             // no endpoint of this host
            ip_frame(remote, mac(1, 9), v(1, 9)),             // a remote endpoint's identity
            ip_frame(MacAddr::BROADCAST, mac(0, 5), v(2, 3)), // flooded, another address
            garp(mac(0, 5), mac(0, 5), v(0, 6)),              // ARP: another endpoint's address
            garp(mac(0, 5), mac(0, 6), v(0, 6)),              // ARP: sender MAC not the frame's
            ip_frame(remote, mac(0, 5), v(0, 5))[..14 + 15].to_vec(), // an IPv4 header cut short
        ];
        for f in &spoofed {
            assert_eq!(send(f), TapVerdict::Drop(DropReason::SourceNotLocal), "{:02x?}", &f[..34.min(f.len())]);
        }
        assert_eq!(c.drops(DropReason::SourceNotLocal), spoofed.len() as u64);
        // What stays on this host is dropped for what it is, whoever sent it: the gateway's
        // ARP for a local container, a frame for a local address.
        let bridge = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(send(&request(bridge, v(0, 1), v(0, 5))), TapVerdict::Drop(DropReason::ArpForLocal));
        assert_eq!(send(&ip_frame(mac(0, 6), bridge, v(0, 1))), TapVerdict::Drop(DropReason::NoDestination));
        // A static network (no endpoints set) sends what its bridge gives it, as before.
        let s = tables(false);
        let snap = s.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let f = ip_frame(REMOTE, LOCAL, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(from_tap(net, &learned, &f, &mut reply, &c), TapVerdict::Flood(&[B, C]));
    }

    #[test]
    fn a_vtep_speaks_only_for_the_endpoints_of_its_own_block() {
        let t = cluster_tables();
        t.update(|tx| tx.set_endpoints(vni(), [(v(1, 20), MacAddr([0x02, 0, 0, 0, 0, 0x20]), C)])).unwrap();
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        let mut receive = |from: IpAddr, inner: &[u8]| {
            from_underlay(&snap, &mut Openers::default(), &mut l, from, &mut datagram(vni(), inner), 0, &c)
        };
        let to = mac(0, 5);
        let legit = [
            ip_frame(to, mac(1, 9), v(1, 9)),                          // C's container
            ip_frame(to, MacAddr([0x02, 0, 0, 0, 0, 0x20]), v(1, 20)), // C's, a MAC gossip placed at C
            garp(mac(1, 9), mac(1, 9), v(1, 9)),                       // C's container announcing itself
        ];
        for f in &legit {
            assert!(matches!(receive(C, f), UnderlayVerdict::Deliver { .. }), "{:02x?}", &f[..34]);
        }
        let mut ipv6 = frame(MacAddr([0x33, 0x33, 0, 0, 0, 1]), mac(1, 9));
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(matches!(receive(C, &ipv6), UnderlayVerdict::Deliver { .. }), "IPv6 from a MAC of C's block");
        let forged = [
            ip_frame(to, mac(2, 9), v(2, 9)),                         // B's container, from C
            ip_frame(to, mac(1, 9), v(2, 9)),                         // C's MAC, B's address
            ip_frame(to, mac(2, 9), v(1, 9)),                         // B's MAC, C's address
            ip_frame(to, mac(0, 6), v(0, 6)),                         // this host's own endpoint
            ip_frame(to, mac(1, 9), Ipv4Addr::new(192, 0, 2, 1)),     // an address in no block
            ip_frame(to, mac(0, 1), v(0, 1)),                         // the gateway
            ip_frame(to, MacAddr([0x02, 0, 0, 0, 0, 0x21]), v(1, 9)), // a MAC nobody placed at C
            garp(mac(1, 9), mac(1, 9), v(2, 9)),                      // ARP for B's address
            garp(mac(1, 9), mac(2, 9), v(1, 9)),                      // ARP sender MAC not the frame's
        ];
        for f in &forged {
            assert_eq!(receive(C, f), UnderlayVerdict::Drop(DropReason::SourceNotOfSender), "{:02x?}", &f[..34]);
        }
        assert_eq!(c.drops(DropReason::SourceNotOfSender), forged.len() as u64);
        // B speaks for its own block; a stranger for nobody, and is told apart.
        assert!(matches!(receive(B, &ip_frame(to, mac(2, 9), v(2, 9))), UnderlayVerdict::Deliver { .. }));
        assert_eq!(receive(ROGUE, &ip_frame(to, mac(1, 9), v(1, 9))), UnderlayVerdict::Drop(DropReason::NotMember));
    }

    #[test]
    fn a_hosts_mesh_address_carries_outside_clients_and_nothing_else() {
        let t = cluster_tables();
        let outside = Ipv4Addr::new(192, 0, 2, 1);
        let mesh = |block| v(block, 255);
        let (to_remote, to_local) = (mac(1, 9), mac(0, 5));
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let c = Counters::default();
        let learned = LearnedFdb::default();
        let mut reply = [0; arp::MAX_REPLY_LEN];
        // Before the mesh is known, this host's mesh address is nobody.
        let f = ip_frame(to_remote, mac(0, 255), outside);
        assert_eq!(from_tap(net, &learned, &f, &mut reply, &c), TapVerdict::Drop(DropReason::SourceNotLocal));
        t.update(|tx| tx.set_mesh(vni(), (v(0, 0), 16), [mesh(0), mesh(1), mesh(2)])).unwrap();
        let snap = t.load();
        let net = snap.by_vni(vni()).unwrap().1;
        let mut send = |f: &[u8]| from_tap(net, &learned, f, &mut reply, &c);
        assert_eq!(send(&ip_frame(to_remote, mac(0, 255), outside)), TapVerdict::Unicast(C), "an outside client");
        assert_eq!(send(&ip_frame(to_remote, mac(0, 255), mesh(0))), TapVerdict::Unicast(C), "its own address");
        let mut ipv6 = frame(to_remote, mac(0, 255));
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        let refused = [
            ip_frame(to_remote, mac(0, 255), v(0, 5)), // an endpoint's address
            ip_frame(to_remote, mac(0, 255), v(2, 9)), // an address of another block
            ip_frame(to_remote, mac(1, 255), outside), // another host's mesh address
            ip_frame(to_remote, mac(0, 5), outside),   // a container claiming an outside client
            ipv6,                                      // no address to judge
        ];
        for f in &refused {
            assert_eq!(send(f), TapVerdict::Drop(DropReason::SourceNotLocal), "{:02x?}", &f[..34]);
        }
        let mut l = Learner::new(shared_learned(), 16, 300);
        let mut receive = |from: IpAddr, inner: &[u8]| {
            from_underlay(&snap, &mut Openers::default(), &mut l, from, &mut datagram(vni(), inner), 0, &c)
        };
        assert!(matches!(receive(C, &ip_frame(to_local, mac(1, 255), outside)), UnderlayVerdict::Deliver { .. }));
        let forged = [
            ip_frame(to_local, mac(1, 255), v(2, 9)), // C's mesh address with B's address
            ip_frame(to_local, mac(1, 255), v(0, 6)), // ... with this host's endpoint's
            ip_frame(to_local, mac(2, 255), outside), // B's mesh address, from C
            ip_frame(to_local, mac(1, 9), outside),   // C's container claiming an outside client
        ];
        for f in &forged {
            assert_eq!(receive(C, f), UnderlayVerdict::Drop(DropReason::SourceNotOfSender), "{:02x?}", &f[..34]);
        }
    }

    #[test]
    fn an_encrypted_network_takes_only_datagrams_sealed_with_its_key() {
        use crate::crypto::{NetworkKey, Sealer};
        let key = NetworkKey { epoch: 3, secret: [7; 32] };
        let t = tables(false);
        let snap = t.load();
        let c = Counters::default();
        let mut l = Learner::new(shared_learned(), 16, 300);
        let mut openers = Openers::default();
        let inner = frame(LOCAL, REMOTE);
        let seal = |sealer: &Sealer| {
            let mut d = vec![0u8; crate::crypto::SEALED_HEADER_LEN + inner.len() + crate::crypto::TAG_LEN];
            d[crate::crypto::SEALED_HEADER_LEN..][..inner.len()].copy_from_slice(&inner);
            sealer.seal(vni(), sealer.reserve(1), &mut d, inner.len());
            d
        };
        let from_b = Sealer::new(&key, B, 1);
        // A plain network: a sealed datagram is not its.
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut seal(&from_b), 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::SealedOnPlain));
        // Encrypted, with no key yet: nothing opens, nothing plain comes in.
        let keyless = Arc::new(NetworkCrypto::keyless());
        t.update(|tx| tx.set_crypto(vni(), Some(keyless))).unwrap();
        let snap = t.load();
        openers.sync(&snap);
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut seal(&from_b), 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::UnknownKey));
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut datagram(vni(), &inner), 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::PlainOnEncrypted));
        // With the key: opened in place, the inner frame where the verdict says.
        let crypto = Arc::new(NetworkCrypto::new(vec![key.clone()], Some(3), C, 9));
        t.update(|tx| tx.set_crypto(vni(), Some(crypto))).unwrap();
        let snap = t.load();
        openers.sync(&snap);
        let mut d = seal(&from_b);
        let len = d.len();
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut d, 0, &c);
        assert_eq!(v, UnderlayVerdict::Deliver { slot: 0, inner: 24..len - 16, segment_mss: None, partial: None });
        assert_eq!(&d[24..len - 16], &inner[..]);
        // Replayed, from a stranger, sealed with another key: refused.
        let mut again = seal(&from_b);
        from_underlay(&snap, &mut openers, &mut l, B, &mut again.clone(), 0, &c);
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut again, 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::Replayed));
        let v = from_underlay(&snap, &mut openers, &mut l, ROGUE, &mut seal(&from_b), 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::NotMember));
        let other = Sealer::new(&NetworkKey { epoch: 3, secret: [8; 32] }, B, 2);
        let v = from_underlay(&snap, &mut openers, &mut l, B, &mut seal(&other), 0, &c);
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::AuthFailed));
    }
}
