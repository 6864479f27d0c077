//! The inner-flow hash that picks the outer UDP source port, so that routers and NICs that
//! spread load by 5-tuple (ECMP, RSS) keep each inner flow on one path, as Linux's
//! `udp_flow_src_port()` does.

use etherparse::{EtherType, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice};

use super::ethernet;

const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xc2b2_ae3d_27d4_eb4f;

#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a ^ K0) * u128::from(b ^ K1);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

#[inline]
fn has_ports(proto: IpNumber) -> bool {
    matches!(proto, IpNumber::TCP | IpNumber::UDP | IpNumber::UDP_LITE | IpNumber::SCTP)
}

/// Source and destination port of an L4 header, if at least 4 bytes of it are present.
#[inline]
fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    let p = l4.get(..4)?;
    Some((u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])))
}

/// Orders (address, port) pairs so that both directions of a flow give the same key.
#[inline]
fn consistent<A: Ord>(src: A, dst: A, sport: u16, dport: u16) -> (A, A, u32) {
    if (&dst, dport) < (&src, sport) {
        (dst, src, (u32::from(dport) << 16) | u32::from(sport))
    } else {
        (src, dst, (u32::from(sport) << 16) | u32::from(dport))
    }
}

/// The flow hash of an Ethernet frame. Never panics, whatever the bytes.
///
/// Like the kernel's flow dissector, the hash covers the inner IP addresses, protocol and
/// ports (ports only for unfragmented TCP, UDP, UDP-Lite and SCTP), orders both endpoints the
/// same way so that the two directions of a flow hash alike, and falls back to the MAC
/// addresses and EtherType for anything that is not IP.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let Some((ether_type, off)) = ethernet::network_layer(frame) else {
        return mac_hash(frame, 0);
    };
    let l3 = &frame[off..];
    match ether_type {
        EtherType::IPV4 => match Ipv4HeaderSlice::from_slice(l3) {
            Ok(ip) => {
                let proto = ip.protocol();
                let (sport, dport) = if has_ports(proto) && !ip.is_fragmenting_payload() {
                    ports(&l3[ip.slice().len()..]).unwrap_or((0, 0))
                } else {
                    (0, 0)
                };
                let (a, b, p) =
                    consistent(u32::from_be_bytes(ip.source()), u32::from_be_bytes(ip.destination()), sport, dport);
                fold(mix((u64::from(a) << 32) | u64::from(b), (u64::from(p) << 8) | u64::from(proto.0)))
            }
            Err(_) => mac_hash(frame, ether_type.0),
        },
        EtherType::IPV6 => match Ipv6HeaderSlice::from_slice(l3) {
            Ok(ip) => {
                let proto = ip.next_header();
                let (sport, dport) = if has_ports(proto) { ports(&l3[40..]).unwrap_or((0, 0)) } else { (0, 0) };
                let (a, b, p) =
                    consistent(u128::from_be_bytes(ip.source()), u128::from_be_bytes(ip.destination()), sport, dport);
                let h = mix(a as u64, (a >> 64) as u64) ^ mix(b as u64, (b >> 64) as u64).rotate_left(17);
                fold(mix(h, (u64::from(p) << 8) | u64::from(proto.0)))
            }
            Err(_) => mac_hash(frame, ether_type.0),
        },
        other => mac_hash(frame, other.0),
    }
}

fn mac_hash(frame: &[u8], ether_type: u16) -> u32 {
    if frame.len() < ethernet::HEADER_LEN {
        return 0;
    }
    let dst = ethernet::destination(frame).0;
    let src = ethernet::source(frame).0;
    let (a, b) = if dst < src { (dst, src) } else { (src, dst) };
    let w = |m: [u8; 6]| u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]]);
    fold(mix(w(a), w(b) ^ (u64::from(ether_type) << 48)))
}

/// Maps a flow hash onto `count` consecutive source ports, the way Linux maps it onto
/// `[min, max)`: `((hash ^ hash << 16) * count) >> 32`. Returns the index into the range.
#[inline]
pub fn port_index(hash: u32, count: usize) -> usize {
    let h = hash ^ (hash << 16);
    ((u64::from(h) * count as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0u8; 16]);
        f
    }

    #[test]
    fn same_flow_same_hash_both_ways() {
        let a = flow_hash(&tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 5201));
        let b = flow_hash(&tcp4([10, 0, 0, 2], [10, 0, 0, 1], 5201, 40000));
        assert_eq!(a, b);
        let c = flow_hash(&tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40001, 5201));
        assert_ne!(a, c, "another source port is another flow");
    }

    #[test]
    fn flows_spread_over_the_ports() {
        let mut seen = [0u32; 16];
        for sport in 0..4096u16 {
            let h = flow_hash(&tcp4([10, 0, 0, 1], [10, 0, 0, 2], 30000 + sport, 5201));
            seen[port_index(h, 16)] += 1;
        }
        // 256 expected per port; a bad hash leaves ports empty or doubles others.
        assert!(seen.iter().all(|&n| (160..360).contains(&n)), "{seen:?}");
    }

    #[test]
    fn port_index_stays_in_range() {
        for h in [0, 1, u32::MAX, 0x8000_0000, 0xdead_beef] {
            assert!(port_index(h, 16) < 16);
            assert_eq!(port_index(h, 1), 0);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = flow_hash(&bytes);
        }
    }
}
