//! The Internet checksum (RFC 1071), and completing the inner TCP/UDP checksums that a sender
//! left partial.

use etherparse::{EtherType, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice};

use super::ethernet;

/// Adds `data` as big-endian 16-bit words to `initial` (the result is not folded).
///
/// The one's-complement sum does not depend on byte order up to a final swap (RFC 1071 §2), so
/// the bytes are read as little-endian 32-bit words into four independent 64-bit accumulators
/// — no carry to propagate for any buffer under 16 GB, and four additions in flight — and the
/// folded result is byte-swapped once.
#[inline]
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = [0u64; 4];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        let w = |i: usize| u64::from(u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
        acc[0] += w(0) + w(16);
        acc[1] += w(4) + w(20);
        acc[2] += w(8) + w(24);
        acc[3] += w(12) + w(28);
    }
    let mut words = blocks.remainder().chunks_exact(4);
    for w in &mut words {
        acc[0] += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc[1] += u64::from(u16::from_le_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        // In big-endian terms the odd byte is the high half of a word padded with zero.
        acc[2] += u64::from(*last);
    }
    let le = fold(acc[0] + acc[1] + acc[2] + acc[3]);
    add(initial, u64::from(le.swap_bytes()))
}

/// One's-complement addition of two unfolded sums (an end-around carry).
#[inline]
pub fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Folds a sum to 16 bits (not inverted).
#[inline]
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The pseudo-header sum of IPv4 (RFC 793 §3.1 / RFC 768).
#[inline]
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u64 {
    u64::from(u32::from_be_bytes(src)) + u64::from(u32::from_be_bytes(dst)) + u64::from(proto) + u64::from(len)
}

/// The pseudo-header sum of IPv6 (RFC 8200 §8.1).
#[inline]
pub fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> u64 {
    sum(&dst, sum(&src, u64::from(proto) + u64::from(len)))
}

/// What [`complete_partial`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The frame carries no TCP/UDP checksum we look at (not IP, fragment, other protocol,
    /// UDP without checksum) or its checksum is not a partial one.
    Untouched,
    /// The checksum was partial and is now complete.
    Completed,
}

/// Finishes the TCP or UDP checksum of `frame` if the sender left it partial.
///
/// A Linux sender hands its NIC a frame with `CHECKSUM_PARTIAL`: the checksum field holds only
/// the pseudo-header sum and the NIC finishes it. On a real wire every frame arrives finished.
/// Between namespaces over veth nobody finishes it, so a kernel VTEP on the same machine sends
/// VXLAN whose inner TCP checksums are partial; the kernel's own receiver trusts the metadata,
/// but a UDP socket only sees the bytes. Such a frame is recognised (the field equals the
/// pseudo-header sum and the full sum does not verify; a genuine checksum equals the
/// pseudo-header sum once in 65,536) and finished, so a container's stack accepts it.
pub fn complete_partial(frame: &mut [u8]) -> Completion {
    let Some((ether_type, l3)) = ethernet::network_layer(frame) else { return Completion::Untouched };
    let (l4, l4_len, proto, pseudo) = match ether_type {
        EtherType::IPV4 => {
            let Ok(ip) = Ipv4HeaderSlice::from_slice(&frame[l3..]) else { return Completion::Untouched };
            if ip.is_fragmenting_payload() {
                return Completion::Untouched;
            }
            let hl = ip.slice().len();
            let total = usize::from(ip.total_len());
            if total < hl || l3 + total > frame.len() {
                return Completion::Untouched;
            }
            let len = total - hl;
            let p = ip.protocol();
            (l3 + hl, len, p, pseudo_v4(ip.source(), ip.destination(), p.0, len as u16))
        }
        EtherType::IPV6 => {
            let Ok(ip) = Ipv6HeaderSlice::from_slice(&frame[l3..]) else { return Completion::Untouched };
            let len = usize::from(ip.payload_length());
            if l3 + 40 + len > frame.len() {
                return Completion::Untouched;
            }
            let p = ip.next_header();
            (l3 + 40, len, p, pseudo_v6(ip.source(), ip.destination(), p.0, len as u32))
        }
        _ => return Completion::Untouched,
    };
    let field = match proto {
        IpNumber::TCP if l4_len >= 20 => l4 + 16,
        IpNumber::UDP if l4_len >= 8 => l4 + 6,
        _ => return Completion::Untouched,
    };
    let current = u16::from_be_bytes([frame[field], frame[field + 1]]);
    if proto == IpNumber::UDP && current == 0 {
        return Completion::Untouched; // IPv4 UDP without a checksum
    }
    // Cheap test first: only a partial checksum equals the folded pseudo-header sum.
    if current != fold(pseudo) {
        return Completion::Untouched;
    }
    // One pass: the sum with the field as it is. A genuine checksum makes it 0xffff; otherwise
    // taking the field's value back out (adding its complement, RFC 1624) leaves the sum the
    // checksum must complete.
    let with_field = fold(sum(&frame[l4..l4 + l4_len], pseudo));
    if with_field == 0xffff {
        return Completion::Untouched; // a genuine checksum that happens to look partial
    }
    let mut c = !fold(u64::from(with_field) + u64::from(!current));
    if proto == IpNumber::UDP && c == 0 {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Completion::Completed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ethernet + IPv4 + TCP with a correct checksum.
    fn tcp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = !fold(sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
        tcp.extend_from_slice(payload);
        let p = pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, tcp.len() as u16);
        let c = !fold(sum(&tcp, p));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&tcp);
        f
    }

    fn make_partial(f: &mut [u8]) {
        let len = (f.len() - 34) as u16;
        let p = fold(pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, len));
        f[34 + 16..34 + 18].copy_from_slice(&p.to_be_bytes());
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)), 0xddf2);
        assert_eq!(fold(sum(&[0xff], 0)), 0xff00, "an odd byte is padded with zero");
    }

    #[test]
    fn completes_a_partial_tcp_checksum_and_leaves_a_good_one() {
        let good = tcp4(b"hello, overlay");
        let mut f = good.clone();
        assert_eq!(complete_partial(&mut f), Completion::Untouched);
        assert_eq!(f, good);
        make_partial(&mut f);
        assert_ne!(f, good);
        assert_eq!(complete_partial(&mut f), Completion::Completed);
        assert_eq!(f, good);
    }

    proptest! {
        #[test]
        fn partial_then_completed_equals_the_original(payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let good = tcp4(&payload);
            let mut f = good.clone();
            make_partial(&mut f);
            complete_partial(&mut f);
            prop_assert_eq!(f, good);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = complete_partial(&mut bytes);
        }

        #[test]
        fn sum_matches_a_plain_16_bit_sum(data in proptest::collection::vec(any::<u8>(), 0..300), initial in any::<u64>()) {
            let mut naive: u64 = 0;
            for c in data.chunks(2) {
                naive += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            prop_assert_eq!(fold(sum(&data, 0)), fold(naive));
            prop_assert_eq!(fold(sum(&data, initial)), fold(add(fold(naive).into(), initial)));
        }
    }
}
