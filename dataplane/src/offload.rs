//! Offloads between a TAP and the agent: the virtio-net header a TAP opened with
//! `IFF_VNET_HDR` puts in front of every frame, what the TX side does with the metadata it
//! carries ([`prepare_tx`]), and how the RX side coalesces TCP segments ([`Coalescer`]). Sans-IO.

use etherparse::{EtherType, IpNumber};

use crate::segment::{SegmentError, SuperFrame, Transport};
use crate::wire::checksum;
use crate::wire::ethernet;

/// Length of `struct virtio_net_hdr` (without `num_buffers`), the TAP's default.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; whoever handles the frame finishes it.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, fragmentation; never enabled by us).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: the TCP super-frame carries CWR.
pub const GSO_ECN: u8 = 0x80;

/// The virtio-net header (native byte order, as the TAP uses without `TUNSETVNETLE`/`BE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM` or 0.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (untrusted from the kernel: we compute our own).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the Ethernet header.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads a header.
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_ne_bytes([b[2], b[3]]),
            gso_size: u16::from_ne_bytes([b[4], b[5]]),
            csum_start: u16::from_ne_bytes([b[6], b[7]]),
            csum_offset: u16::from_ne_bytes([b[8], b[9]]),
        }
    }

    /// Writes it.
    pub fn emit(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// As bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0; VNET_HDR_LEN];
        self.emit(&mut b);
        b
    }
}

/// Why a frame from the TAP cannot be sent as the kernel described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// `csum_start`/`csum_offset` point outside the frame.
    #[error("checksum offsets outside the frame")]
    BadChecksumOffsets,
    /// A GSO type we did not enable (UFO) or do not know.
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
    /// The super-frame does not match its GSO type or cannot be cut.
    #[error("cannot segment: {0}")]
    Segment(#[from] SegmentError),
}

/// What a frame read from an offloading TAP needs before encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxShape {
    /// Send as it is (its checksum, if it was left to us, is now complete).
    Whole,
    /// A super-frame: cut it into segments of `mss` payload bytes.
    Segment {
        /// Payload bytes per segment.
        mss: usize,
    },
}

/// Completes a checksum the kernel left (`F_NEEDS_CSUM` without GSO) and says whether the
/// frame must be segmented. With `TUNSETOFFLOAD` the kernel hands over TCP (and UDP)
/// super-frames of up to 64 KB, which [`crate::segment`] cuts; they keep their partial checksum
/// here, as segmentation computes every segment's in full.
pub fn prepare_tx(hdr: &VirtioNetHdr, frame: &mut [u8]) -> Result<TxShape, OffloadError> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 && !finish_checksum(frame, hdr.csum_start.into(), hdr.csum_offset.into()) {
                return Err(OffloadError::BadChecksumOffsets);
            }
            Ok(TxShape::Whole)
        }
        g @ (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4) => {
            let sf = SuperFrame::parse(frame)?;
            let want = if g == GSO_UDP_L4 { Transport::Udp } else { Transport::Tcp };
            if sf.transport() != want || hdr.gso_size == 0 {
                return Err(OffloadError::Segment(SegmentError::Malformed));
            }
            Ok(TxShape::Segment { mss: usize::from(hdr.gso_size) })
        }
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// Finishes a partial checksum (the field at `start + offset` holds the pseudo-header sum):
/// sums `frame[start..]` into it. False, and nothing written, if the field lies outside.
pub fn finish_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start + offset;
    if field + 2 > frame.len() {
        return false;
    }
    // The field holds the pseudo-header sum, which the sum over the range includes.
    let c = !checksum::fold(checksum::sum(&frame[start..], 0));
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// The header to write an over-MTU TCP or UDP frame to the TAP as one GSO frame cut at `mss`
/// (the kernel cuts it if it must); fixes the frame's IP lengths and puts the pseudo-header sum
/// in its checksum field. `None` if it is neither TCP nor UDP, or UDP without `uso`.
pub fn gso_for_oversized(frame: &mut [u8], mss: usize, uso: bool) -> Option<VirtioNetHdr> {
    let sf = SuperFrame::parse(frame).ok()?;
    let (l3, l4, payload) = (sf.l3_offset(), sf.l4_offset(), sf.header_len());
    let ipv4 = sf.is_ipv4();
    let gso_type = match (sf.transport(), ipv4) {
        (Transport::Tcp, true) => GSO_TCPV4,
        (Transport::Tcp, false) => GSO_TCPV6,
        (Transport::Udp, _) if uso => GSO_UDP_L4,
        _ => return None,
    };
    let l4_len = frame.len() - l4;
    let field = set_lengths_and_pseudo(frame, l3, l4, l4_len, ipv4, sf.transport())?;
    Some(VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: payload as u16,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: (field - l4) as u16,
    })
}

/// Sets IP length fields for an L4 length, recomputes the IPv4 header checksum, writes the
/// pseudo-header sum into the L4 checksum field (and the UDP length); returns the field's
/// offset. `None` if the lengths do not fit 16 bits.
fn set_lengths_and_pseudo(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    l4_len: usize,
    ipv4: bool,
    t: Transport,
) -> Option<usize> {
    let proto = if t == Transport::Tcp { 6 } else { 17 };
    let pseudo = if ipv4 {
        let total = u16::try_from(l4 - l3 + l4_len).ok()?;
        frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = !checksum::fold(checksum::sum(&frame[l3..l4], 0));
        frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        let src: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().ok()?;
        let dst: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().ok()?;
        checksum::pseudo_v4(src, dst, proto, l4_len as u16)
    } else {
        let plen = u16::try_from(l4 - l3 - 40 + l4_len).ok()?;
        frame[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        let src: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().ok()?;
        let dst: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().ok()?;
        checksum::pseudo_v6(src, dst, proto, l4_len as u32)
    };
    let field = match t {
        Transport::Tcp => l4 + 16,
        Transport::Udp => {
            frame[l4 + 4..l4 + 6].copy_from_slice(&u16::try_from(l4_len).ok()?.to_be_bytes());
            l4 + 6
        }
    };
    frame[field..field + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    Some(field)
}

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// A TCP segment that may join a coalesced super-frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment {
    l3: usize,
    l4: usize,
    payload: usize,
    len: usize,
    ipv4: bool,
    seq: u32,
    flags: u8,
    /// Its checksum field holds the pseudo-header sum only (remote checksum offload).
    partial: bool,
}

impl TcpSegment {
    /// Reads `frame` as a segment fit for coalescing: IPv4 without options (or IPv6 without
    /// extension headers), not a fragment, IP length matching the frame exactly, TCP with only
    /// ACK (and PSH), some payload, and a checksum that verifies.
    pub fn parse(frame: &[u8]) -> Option<TcpSegment> {
        Self::parse_as(frame, false)
    }

    /// [`TcpSegment::parse`] for a segment whose checksum the sender left partial, to be
    /// finished by the receiver (VXLAN remote checksum offload, whose `rco_start` must be
    /// this segment's TCP header): the payload is not summed; the outer UDP checksum covered
    /// it on the underlay. Written alone, it goes to the TAP as `NEEDS_CSUM`.
    pub fn parse_partial(frame: &[u8], rco_start: usize) -> Option<TcpSegment> {
        Self::parse_as(frame, true).filter(|s| s.l4 == rco_start)
    }

    fn parse_as(frame: &[u8], partial: bool) -> Option<TcpSegment> {
        let (ether_type, l3) = ethernet::network_layer(frame)?;
        let (l4, ipv4) = match ether_type {
            EtherType::IPV4 => {
                let ip = frame.get(l3..l3 + 20)?;
                let frag = u16::from_be_bytes([ip[6], ip[7]]);
                if ip[0] != 0x45 || frag & 0x3fff != 0 || ip[9] != IpNumber::TCP.0 {
                    return None;
                }
                if usize::from(u16::from_be_bytes([ip[2], ip[3]])) != frame.len() - l3 {
                    return None;
                }
                (l3 + 20, true)
            }
            EtherType::IPV6 => {
                let ip = frame.get(l3..l3 + 40)?;
                if ip[0] >> 4 != 6 || ip[6] != IpNumber::TCP.0 {
                    return None;
                }
                if usize::from(u16::from_be_bytes([ip[4], ip[5]])) != frame.len() - l3 - 40 {
                    return None;
                }
                (l3 + 40, false)
            }
            _ => return None,
        };
        let tcp = frame.get(l4..l4 + 20)?;
        let hl = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        let payload = l4 + hl;
        if hl < 20 || payload >= frame.len() || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
            return None;
        }
        let pseudo = if ipv4 {
            let src: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().ok()?;
            let dst: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().ok()?;
            checksum::pseudo_v4(src, dst, 6, (frame.len() - l4) as u16)
        } else {
            let src: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().ok()?;
            let dst: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().ok()?;
            checksum::pseudo_v6(src, dst, 6, (frame.len() - l4) as u32)
        };
        if !partial && checksum::fold(checksum::sum(&frame[l4..], pseudo)) != 0xffff {
            return None;
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        Some(TcpSegment { l3, l4, payload, len: frame.len(), ipv4, seq, flags, partial })
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        self.len - self.payload
    }

    /// Where the payload starts in the frame.
    pub fn payload_offset(&self) -> usize {
        self.payload
    }
}

/// Largest IP packet a coalesced super-frame may become.
const MAX_SUPER_IP_LEN: usize = 65_535;

/// Builds one super-frame out of consecutive segments of a TCP flow: same Ethernet and IP
/// headers, same ports, ACK, window and options, contiguous sequence numbers, equal sizes but
/// for the last, checksums verified. It is written to the TAP with a header that says
/// `NEEDS_CSUM` and `GSO_TCPV4/6`, as wireguard-go's TCP GRO does; on a TAP the Ethernet
/// header counts in every offset.
///
/// Feed segments with [`Coalescer::try_push`]; when it refuses one (or the run ends),
/// [`Coalescer::finish`] rewrites the first segment's headers for the whole run and gives the
/// header to write in front of it; the other segments contribute only their payloads.
#[derive(Debug, Clone, Copy)]
pub struct Coalescer {
    first: TcpSegment,
    last: TcpSegment,
    count: usize,
    payload: usize,
}

impl Coalescer {
    /// Starts a run with `first`.
    pub fn new(first: TcpSegment) -> Coalescer {
        Coalescer { first, last: first, count: 1, payload: first.payload_len() }
    }

    /// Segments in the run.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Appends `next` (from `next_frame`) if it continues the run begun by `first_frame`.
    pub fn try_push(&mut self, first_frame: &[u8], next_frame: &[u8], next: &TcpSegment) -> bool {
        let (f, p) = (&self.first, &self.last);
        let ok = next.ipv4 == f.ipv4
            && next.l3 == f.l3
            && next.payload == f.payload
            && p.flags & TCP_PSH == 0
            && p.payload_len() == f.payload_len()
            && next.payload_len() <= f.payload_len()
            && next.seq == p.seq.wrapping_add(p.payload_len() as u32)
            && self.payload + next.payload_len() + (f.payload - f.l3) <= MAX_SUPER_IP_LEN
            && same_flow(first_frame, next_frame, f);
        if ok {
            self.last = *next;
            self.count += 1;
            self.payload += next.payload_len();
        }
        ok
    }

    /// Whether `next` (from `next_frame`) belongs to the same TCP connection (addresses and
    /// ports) as the run begun by `first_frame`, whether or not it can extend it: if it cannot,
    /// the run must be written before it, or the receiver sees the connection's bytes out of
    /// order (a new timestamp, window or ACK number starts a new run of the same connection).
    pub fn same_connection(&self, first_frame: &[u8], next_frame: &[u8], next: &TcpSegment) -> bool {
        let f = &self.first;
        next.ipv4 == f.ipv4 && connection(first_frame, f) == connection(next_frame, next)
    }

    /// Rewrites the first segment's headers (in `first_frame`) to describe the whole run and
    /// returns the virtio-net header to write in front. A run of one needs no header flags,
    /// unless its checksum is partial.
    pub fn finish(&self, first_frame: &mut [u8]) -> VirtioNetHdr {
        let f = &self.first;
        if self.count == 1 {
            if !f.partial {
                return VirtioNetHdr::default();
            }
            return VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: f.l4 as u16,
                csum_offset: 16,
                ..Default::default()
            };
        }
        if self.last.flags & TCP_PSH != 0 {
            first_frame[f.l4 + 13] |= TCP_PSH;
        }
        let l4_len = f.payload - f.l4 + self.payload;
        let field = set_lengths_and_pseudo(first_frame, f.l3, f.l4, l4_len, f.ipv4, Transport::Tcp)
            .expect("run length bounded by MAX_SUPER_IP_LEN");
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if f.ipv4 { GSO_TCPV4 } else { GSO_TCPV6 },
            hdr_len: f.payload as u16,
            gso_size: f.payload_len() as u16,
            csum_start: f.l4 as u16,
            csum_offset: (field - f.l4) as u16,
        }
    }
}

/// A TCP segment's addresses and ports, as they lie in its frame.
fn connection<'a>(frame: &'a [u8], s: &TcpSegment) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    let ips = if s.ipv4 { s.l3 + 12..s.l3 + 20 } else { s.l3 + 8..s.l3 + 40 };
    (frame.get(ips), frame.get(s.l4..s.l4 + 4))
}

/// Whether `b` belongs to the flow of `a` (whose shape `f` describes) for coalescing: same
/// Ethernet header (VLAN tags included), same IP addresses, TOS/traffic class, TTL and
/// fragment flags, same ports, ACK number, data offset, window and options.
fn same_flow(a: &[u8], b: &[u8], f: &TcpSegment) -> bool {
    let (l3, l4, p) = (f.l3, f.l4, f.payload);
    if a[..l3] != b[..l3] {
        return false;
    }
    let ip_same = if f.ipv4 {
        a[l3 + 1] == b[l3 + 1] && a[l3 + 6..l3 + 10] == b[l3 + 6..l3 + 10] && a[l3 + 12..l3 + 20] == b[l3 + 12..l3 + 20]
    } else {
        a[l3..l3 + 4] == b[l3..l3 + 4] && a[l3 + 6..l3 + 40] == b[l3 + 6..l3 + 40]
    };
    ip_same
        && a[l4..l4 + 4] == b[l4..l4 + 4]
        && a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
        && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
        && a[l4 + 20..p] == b[l4 + 20..p]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::tcp4_super;
    use proptest::prelude::*;

    /// Cuts a super-frame into segments the way a sender would.
    fn cut(frame: &[u8], mss: usize) -> Vec<Vec<u8>> {
        SuperFrame::parse(frame).unwrap().to_segments(mss)
    }

    /// Coalesces segments the way the RX side does and returns the rebuilt frame and header.
    fn rejoin(segs: &[Vec<u8>]) -> (Vec<u8>, VirtioNetHdr, usize) {
        let mut first = segs[0].clone();
        let mut run = Coalescer::new(TcpSegment::parse(&first).expect("first segment coalescable"));
        let mut payloads = Vec::new();
        for s in &segs[1..] {
            let seg = TcpSegment::parse(s).expect("segment coalescable");
            if !run.try_push(&first, s, &seg) {
                break;
            }
            payloads.extend_from_slice(&s[seg.payload_offset()..]);
        }
        let hdr = run.finish(&mut first);
        first.extend_from_slice(&payloads);
        (first, hdr, run.count())
    }

    #[test]
    fn a_partial_segment_coalesces_unsummed_and_goes_alone_as_needs_csum() {
        let sf = tcp4_super(&[3u8; 3000], 0, 0x10, 5);
        let f = SuperFrame::parse(&sf).unwrap();
        let segs: Vec<Vec<u8>> = (0..2)
            .map(|s| {
                let mut h = vec![0u8; f.header_len()];
                let p = f.write_segment_headers_partial(s, 1400, &mut h);
                [&h[..], &sf[p]].concat()
            })
            .collect();
        // The sum does not verify (the field holds the pseudo-header sum): refused as a
        // checked segment, taken as a partial one whose checksum starts at its TCP header only.
        assert!(TcpSegment::parse(&segs[0]).is_none());
        assert!(TcpSegment::parse_partial(&segs[0], 30).is_none());
        let first = TcpSegment::parse_partial(&segs[0], 34).expect("partial segment");
        let alone = Coalescer::new(first).finish(&mut segs[0].clone());
        assert_eq!(
            (alone.flags, alone.gso_type, alone.csum_start, alone.csum_offset),
            (F_NEEDS_CSUM, GSO_NONE, 34, 16)
        );
        let mut run = Coalescer::new(first);
        assert!(run.try_push(&segs[0], &segs[1], &TcpSegment::parse_partial(&segs[1], 34).unwrap()));
        let mut head = segs[0].clone();
        let hdr = run.finish(&mut head);
        assert_eq!((hdr.flags, hdr.gso_type, hdr.gso_size), (F_NEEDS_CSUM, GSO_TCPV4, 1400));
    }

    #[test]
    fn header_round_trips() {
        let h = VirtioNetHdr { flags: 1, gso_type: 4, hdr_len: 66, gso_size: 1398, csum_start: 54, csum_offset: 16 };
        assert_eq!(VirtioNetHdr::parse(&h.to_bytes()), h);
    }

    #[test]
    fn needs_csum_is_completed() {
        // A segment with a correct checksum, made partial as a TAP hands it over.
        let segs = cut(&tcp4_super(&[3u8; 300], 12, 0x18, 9), 1000);
        let good = segs[0].clone();
        let mut f = good.clone();
        let pseudo = checksum::fold(checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, (f.len() - 34) as u16));
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VirtioNetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..Default::default() };
        assert_eq!(prepare_tx(&hdr, &mut f), Ok(TxShape::Whole));
        assert_eq!(f, good);
        let bad = VirtioNetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 4000, ..Default::default() };
        assert_eq!(prepare_tx(&bad, &mut f), Err(OffloadError::BadChecksumOffsets));
        let ufo = VirtioNetHdr { gso_type: GSO_UDP, gso_size: 1000, ..Default::default() };
        assert_eq!(prepare_tx(&ufo, &mut f), Err(OffloadError::UnsupportedGso(GSO_UDP)));
    }

    #[test]
    fn a_tso_frame_is_cut_at_gso_size() {
        let mut f = tcp4_super(&[1u8; 4000], 12, 0x18, 0);
        let hdr = VirtioNetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 1398, ..Default::default() };
        assert_eq!(prepare_tx(&hdr, &mut f), Ok(TxShape::Segment { mss: 1398 }));
        let wrong = VirtioNetHdr { gso_type: GSO_UDP_L4, gso_size: 1398, ..Default::default() };
        assert!(prepare_tx(&wrong, &mut f).is_err(), "a TCP frame announced as UDP");
    }

    #[test]
    fn segments_of_another_flow_or_after_a_gap_do_not_join() {
        let segs = cut(&tcp4_super(&[1u8; 4000], 12, 0x10, 100), 1000);
        let mut first = segs[0].clone();
        let mut run = Coalescer::new(TcpSegment::parse(&first).unwrap());
        // A gap: segment 2 without segment 1.
        assert!(!run.try_push(&first, &segs[2], &TcpSegment::parse(&segs[2]).unwrap()));
        // Another source port.
        let mut other = segs[1].clone();
        other[35] ^= 1; // IP ID differs (fine) …
        other[34 + 20] ^= 1; // … but the source port differs
        let other = cut(&other, 2000).remove(0); // rechecksummed
        assert!(!run.try_push(&first, &other, &TcpSegment::parse(&other).unwrap()));
        assert!(run.try_push(&first, &segs[1], &TcpSegment::parse(&segs[1]).unwrap()));
        assert_eq!(run.finish(&mut first).gso_type, GSO_TCPV4);
    }

    #[test]
    fn a_segment_of_the_same_connection_that_cannot_extend_a_run_is_told_apart_from_another_connection() {
        let segs = cut(&tcp4_super(&[5u8; 3000], 0, 0x10, 0), 1000);
        let first = segs[0].clone();
        let mut run = Coalescer::new(TcpSegment::parse(&first).unwrap());
        // The next segment with another window: same connection, but not the same run.
        let mut other_window = segs[1].clone();
        other_window[34 + 14] ^= 0x01;
        rechecksum(&mut other_window);
        let seg = TcpSegment::parse(&other_window).expect("still a valid segment");
        assert!(run.same_connection(&first, &other_window, &seg));
        assert!(!run.try_push(&first, &other_window, &seg), "a new window starts a new run");
        // Another source port: another connection.
        let mut other_port = segs[1].clone();
        other_port[34] ^= 0x01;
        rechecksum(&mut other_port);
        let seg = TcpSegment::parse(&other_port).expect("still a valid segment");
        assert!(!run.same_connection(&first, &other_port, &seg));
    }

    /// Recomputes the TCP checksum of an IPv4 frame without options.
    fn rechecksum(f: &mut [u8]) {
        f[34 + 16..34 + 18].fill(0);
        let pseudo =
            checksum::pseudo_v4(f[26..30].try_into().unwrap(), f[30..34].try_into().unwrap(), 6, (f.len() - 34) as u16);
        let c = !checksum::fold(checksum::sum(&f[34..], pseudo));
        f[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn a_bad_checksum_or_a_syn_is_never_coalesced() {
        let segs = cut(&tcp4_super(&[1u8; 2000], 0, 0x10, 0), 1000);
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        assert_eq!(TcpSegment::parse(&bad), None);
        let syn = cut(&tcp4_super(&[1u8; 10], 0, 0x02, 0), 1000).remove(0);
        assert_eq!(TcpSegment::parse(&syn), None);
    }

    proptest! {
        /// Issue 4's property: for any valid super-frame, the segments re-coalesce to the
        /// same bytes (the checksum field aside, which becomes the pseudo-header sum the
        /// NEEDS_CSUM header asks the kernel to finish).
        #[test]
        fn segments_recoalesce_to_the_same_super_frame(
            len in 1usize..60_000, options in 0usize..=10, mss in 500usize..9000, seq in any::<u32>(), psh in any::<bool>()
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
            let original = tcp4_super(&payload, options * 4, if psh { 0x18 } else { 0x10 }, seq);
            let segs = cut(&original, mss);
            let (rebuilt, hdr, count) = rejoin(&segs);
            prop_assert_eq!(count, segs.len());
            prop_assert_eq!(rebuilt.len(), original.len());
            // Every byte matches except the IP checksum (recomputed) and the TCP checksum field.
            let tcp_csum = 14 + 20 + 16;
            for (i, (a, b)) in rebuilt.iter().zip(&original).enumerate() {
                if i != 24 && i != 25 && i != tcp_csum && i != tcp_csum + 1 {
                    prop_assert_eq!(a, b, "byte {}", i);
                }
            }
            prop_assert_eq!(checksum::fold(checksum::sum(&rebuilt[14..34], 0)), 0xffff, "IPv4 header checksum");
            if count > 1 {
                prop_assert_eq!(hdr.gso_type, GSO_TCPV4);
                prop_assert_eq!(usize::from(hdr.gso_size), mss.min(len));
                prop_assert_eq!(hdr.csum_start, 34);
                // Finishing the checksum as the kernel would gives a valid segment stream.
                let mut done = rebuilt.clone();
                let c = !checksum::fold(checksum::sum(&done[34..], 0));
                done[tcp_csum..tcp_csum + 2].copy_from_slice(&c.to_be_bytes());
                let recut = cut(&done, usize::from(hdr.gso_size));
                prop_assert_eq!(recut, segs);
            }
        }

        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), other in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = bytes.clone();
            let _ = prepare_tx(&VirtioNetHdr::parse(&[1, 0, 0, 0, 0, 0, 34, 0, 16, 0]), &mut b);
            let _ = gso_for_oversized(&mut b, 1000, true);
            if let (Some(s1), Some(s2)) = (TcpSegment::parse(&bytes), TcpSegment::parse(&other)) {
                let mut run = Coalescer::new(s1);
                let _ = run.try_push(&bytes, &other, &s2);
                let mut first = bytes.clone();
                let _ = run.finish(&mut first);
            }
        }
    }
}
