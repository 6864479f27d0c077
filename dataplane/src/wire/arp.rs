//! ARP requests the agent answers itself (read with etherparse's [`ArpPacketSlice`]), and the
//! replies it writes into a caller's buffer, so answering needs no allocation.

use std::net::Ipv4Addr;

use etherparse::{ArpEthIpv4Packet, ArpHardwareId, ArpOperation, ArpPacketSlice, EtherType};

use super::{MacAddr, ethernet};

/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_ETH_IPV4_LEN: usize = ArpEthIpv4Packet::LEN;

/// Longest reply [`write_reply`] writes: two VLAN tags, Ethernet header and ARP.
pub const MAX_REPLY_LEN: usize =
    ethernet::HEADER_LEN + ethernet::MAX_VLAN_TAGS * ethernet::VLAN_TAG_LEN + ARP_ETH_IPV4_LEN;

/// An Ethernet/IPv4 ARP request that asks for someone else's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRequest {
    /// Offset of the ARP packet in the frame (14, or more behind VLAN tags).
    pub arp_offset: usize,
    /// Who asks.
    pub sender_mac: MacAddr,
    /// The asker's address.
    pub sender_ip: Ipv4Addr,
    /// The address asked for.
    pub target_ip: Ipv4Addr,
}

/// Reads `frame` as an ARP request worth answering: Ethernet/IPv4, operation 1, and neither a
/// gratuitous announcement (sender = target) nor a duplicate-address probe (sender 0.0.0.0),
/// which are for every host on the segment to see and so are flooded, not answered.
pub fn parse_request(frame: &[u8]) -> Option<ArpRequest> {
    let (ether_type, arp_offset) = ethernet::network_layer(frame)?;
    if ether_type != EtherType::ARP {
        return None;
    }
    let arp = ArpPacketSlice::from_slice(&frame[arp_offset..]).ok()?;
    if arp.hw_addr_type() != ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
        || arp.operation() != ArpOperation::REQUEST
    {
        return None;
    }
    let sender_mac = MacAddr(arp.sender_hw_addr().try_into().ok()?);
    let sender_ip = Ipv4Addr::from(<[u8; 4]>::try_from(arp.sender_protocol_addr()).ok()?);
    let target_ip = Ipv4Addr::from(<[u8; 4]>::try_from(arp.target_protocol_addr()).ok()?);
    if sender_ip == target_ip || sender_ip.is_unspecified() || sender_mac.is_multicast() {
        return None;
    }
    Some(ArpRequest { arp_offset, sender_mac, sender_ip, target_ip })
}

/// Writes the reply to `request` (read from `frame`) saying `target_ip` is at `answer`, and
/// returns its length: the fixed 28-byte Ethernet/IPv4 form behind the request's own Ethernet
/// header, to the asker's MAC, with the same VLAN tags. `out` must hold at least
/// [`MAX_REPLY_LEN`] bytes.
pub fn write_reply(frame: &[u8], request: &ArpRequest, answer: MacAddr, out: &mut [u8]) -> usize {
    let l2 = request.arp_offset;
    let len = l2 + ARP_ETH_IPV4_LEN;
    let asker = ethernet::source(frame);
    out[0..6].copy_from_slice(&asker.0);
    out[6..12].copy_from_slice(&answer.0);
    out[12..l2].copy_from_slice(&frame[12..l2]); // VLAN tags and the ARP EtherType
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REPLY,
        sender_mac: answer.0,
        sender_ipv4: request.target_ip.octets(),
        target_mac: request.sender_mac.0,
        target_ipv4: request.sender_ip.octets(),
    };
    out[l2..len].copy_from_slice(&arp.to_bytes());
    len
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A broadcast ARP request as Linux sends it: who has `target`? tell `sender`.
    pub(crate) fn request(sender_mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MacAddr::BROADCAST.0);
        f.extend_from_slice(&sender_mac.0);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        let arp = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: sender_mac.0,
            sender_ipv4: sender.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        };
        f.extend_from_slice(&arp.to_bytes());
        f
    }

    #[test]
    fn answers_a_request_in_place() {
        let asker = MacAddr([2, 0, 0, 0, 0, 1]);
        let answer = MacAddr([2, 0, 0, 0, 0, 2]);
        let f = request(asker, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let req = parse_request(&f).unwrap();
        assert_eq!(req.target_ip, Ipv4Addr::new(10, 0, 0, 2));
        let mut out = [0u8; MAX_REPLY_LEN];
        let n = write_reply(&f, &req, answer, &mut out);
        assert_eq!(n, 42);
        assert_eq!(ethernet::destination(&out), asker);
        assert_eq!(ethernet::source(&out), answer);
        let arp = ArpPacketSlice::from_slice(&out[14..n]).unwrap();
        assert_eq!(arp.operation(), ArpOperation::REPLY);
        assert_eq!(arp.sender_hw_addr(), &answer.0);
        assert_eq!(arp.sender_protocol_addr(), &[10, 0, 0, 2]);
        assert_eq!(arp.target_hw_addr(), &asker.0);
        assert_eq!(arp.target_protocol_addr(), &[10, 0, 0, 1]);
    }

    #[test]
    fn keeps_the_vlan_tag() {
        let asker = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut f = request(asker, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        f.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        let req = parse_request(&f).unwrap();
        assert_eq!(req.arp_offset, 18);
        let mut out = [0u8; MAX_REPLY_LEN];
        let n = write_reply(&f, &req, MacAddr([2, 0, 0, 0, 0, 2]), &mut out);
        assert_eq!(n, 46);
        assert_eq!(&out[12..18], &[0x81, 0x00, 0x00, 0x07, 0x08, 0x06]);
    }

    #[test]
    fn leaves_announcements_and_probes_to_the_flood() {
        let m = MacAddr([2, 0, 0, 0, 0, 1]);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(parse_request(&request(m, ip, ip)), None, "gratuitous");
        assert_eq!(parse_request(&request(m, Ipv4Addr::UNSPECIFIED, ip)), None, "probe");
        let mut reply = request(m, ip, Ipv4Addr::new(10, 0, 0, 2));
        reply[21] = 2;
        assert_eq!(parse_request(&reply), None, "a reply is not a request");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(req) = parse_request(&bytes) {
                let mut out = [0u8; MAX_REPLY_LEN];
                let n = write_reply(&bytes, &req, MacAddr([2, 0, 0, 0, 0, 9]), &mut out);
                prop_assert!(n <= MAX_REPLY_LEN);
            }
        }
    }
}
