//! The questions the hot path asks of an Ethernet frame: where it goes, where it came from,
//! and what it carries once 802.1Q/802.1ad tags are skipped.

use etherparse::{EtherType, Ethernet2Slice, SingleVlanSlice};

use super::MacAddr;

/// Length of an untagged Ethernet header (no FCS: TAP devices neither add nor expect one).
pub const HEADER_LEN: usize = 14;

/// Length of one VLAN tag.
pub const VLAN_TAG_LEN: usize = 4;

/// How many stacked VLAN tags (QinQ) we look through.
pub const MAX_VLAN_TAGS: usize = 2;

/// The destination MAC. The caller has checked `frame.len() >= HEADER_LEN`.
#[inline]
pub fn destination(frame: &[u8]) -> MacAddr {
    MacAddr([frame[0], frame[1], frame[2], frame[3], frame[4], frame[5]])
}

/// The source MAC. The caller has checked `frame.len() >= HEADER_LEN`.
#[inline]
pub fn source(frame: &[u8]) -> MacAddr {
    MacAddr([frame[6], frame[7], frame[8], frame[9], frame[10], frame[11]])
}

/// Whether an EtherType announces a VLAN tag (802.1Q, 802.1ad, or the old 0x9100 QinQ).
#[inline]
pub fn is_vlan(ether_type: EtherType) -> bool {
    matches!(
        ether_type,
        EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING | EtherType::VLAN_DOUBLE_TAGGED_FRAME
    )
}

/// The payload's EtherType and its offset in the frame, after up to [`MAX_VLAN_TAGS`] tags.
/// `None` if the frame is too short for its headers or has more tags than that.
#[inline]
pub fn network_layer(frame: &[u8]) -> Option<(EtherType, usize)> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame).ok()?;
    let mut ether_type = eth.ether_type();
    let mut offset = HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ether_type) {
            return Some((ether_type, offset));
        }
        let vlan = SingleVlanSlice::from_slice(&frame[offset..]).ok()?;
        ether_type = vlan.ether_type();
        offset += VLAN_TAG_LEN;
    }
    (!is_vlan(ether_type)).then_some((ether_type, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tags: &[u16], ether_type: u16) -> Vec<u8> {
        let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1];
        for t in tags {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x64]); // VLAN 100
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(&[0u8; 28]);
        f
    }

    #[test]
    fn looks_through_vlan_tags() {
        assert_eq!(network_layer(&frame(&[], 0x0800)), Some((EtherType::IPV4, 14)));
        assert_eq!(network_layer(&frame(&[0x8100], 0x0806)), Some((EtherType::ARP, 18)));
        assert_eq!(network_layer(&frame(&[0x88a8, 0x8100], 0x86dd)), Some((EtherType::IPV6, 22)));
        assert_eq!(network_layer(&frame(&[0x88a8, 0x8100, 0x8100], 0x0800)), None);
        assert_eq!(network_layer(&frame(&[0x8100], 0x0800)[..16]), None);
        let f = frame(&[], 0x0800);
        assert_eq!(destination(&f), MacAddr::BROADCAST);
        assert_eq!(source(&f), MacAddr([2, 0, 0, 0, 0, 1]));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some((_, off)) = network_layer(&bytes) {
                prop_assert!(off <= bytes.len());
            }
        }
    }
}
