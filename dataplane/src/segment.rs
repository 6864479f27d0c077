//! Splitting TCP and UDP super-frames into frames that fit the MTU, as a NIC's TSO and USO do.
//! Sans-IO: the caller decides where segments go.

use std::ops::Range;

use etherparse::{EtherType, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice};

use crate::wire::checksum;
use crate::wire::ethernet;

/// Why a frame cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Not IPv4 or IPv6 behind the Ethernet (and VLAN) headers.
    #[error("not an IP frame")]
    NotIp,
    /// Neither TCP nor UDP directly behind the IP header (IPv6 extension headers included).
    #[error("neither TCP nor UDP")]
    NotTcpOrUdp,
    /// An IPv4 fragment or a header that does not fit the frame.
    #[error("malformed or fragmented headers")]
    Malformed,
    /// The MTU leaves no room for payload behind these headers.
    #[error("the MTU is smaller than the headers")]
    MtuTooSmall,
}

/// Largest UDP payload of one IPv4 datagram or GSO send (65,535 − 20 − 8).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// The kernel's `MAX_TCP_HEADER` (`L1_CACHE_ALIGN(128 + MAX_HEADER)`: 256 or 320 bytes on
/// x86-64, by configuration), the larger value; [`endpoint_gso_max_size`] holds for both.
const KERNEL_MAX_TCP_HEADER: u32 = 320;

/// The `gso_max_size` to give a container's interface on a network of MTU `mtu` (sealed or
/// not), so that every TCP super-frame it sends is cut into segments that leave in **one** UDP
/// GSO send. A full segment is an MTU-sized IP packet behind Ethernet (14) and VXLAN (8) (and
/// the seal's overhead); one send carries at most [`MAX_UDP_PAYLOAD`] bytes and 64 segments.
/// With the kernel's default of 64 KB, a super-frame of an MTU of 1450 is 46 segments, 68 KB
/// on the wire: two sends, the second of 2 segments, and as many skbs, system calls, firewall
/// and socket passes as the first (measured in `BENCHMARKS.md`, issue 18).
///
/// The kernel's TCP sizes a super-frame as `gso_max_size − 1 − MAX_TCP_HEADER` rounded down
/// to a whole number of segments (`tcp_xmit_size_goal`); the size returned makes that exactly
/// the most segments that fit one send, for IPv4 with timestamps (MSS `mtu − 52`). Without
/// timestamps the segments are larger and fewer; over IPv6 inside, a frame may still need a
/// second send (as it does today). Returns 0 (leave the kernel's default) for an MTU too small
/// to matter.
pub fn endpoint_gso_max_size(mtu: u32, sealed: bool) -> u32 {
    let seal = if sealed { crate::crypto::OVERHEAD as u32 } else { 0 };
    let datagram = mtu + ethernet::HEADER_LEN as u32 + crate::wire::vxlan::HEADER_LEN as u32 + seal;
    let Some(mss) = mtu.checked_sub(20 + 20 + 12).filter(|&m| m >= 512) else { return 0 };
    let segments = (MAX_UDP_PAYLOAD as u32 / datagram).min(64);
    segments * mss + 1 + KERNEL_MAX_TCP_HEADER
}

/// The transport of a super-frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP: segments continue the sequence space.
    Tcp,
    /// UDP: each segment is its own datagram (UDP GSO semantics).
    Udp,
}

// TCP flag bits in byte 13 of the header.
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A parsed super-frame, ready to be cut: one Ethernet frame carrying up to 64 KB of TCP (or
/// UDP) payload behind a single set of headers, the way a Linux stack with segmentation
/// offload hands data to a device.
///
/// [`SuperFrame::write_segment`] writes segment *i* — the headers copied, then `mss` bytes of
/// payload — into a caller's buffer and fixes what differs per segment: IPv4 total length,
/// identification and header checksum (IPv6 payload length); TCP sequence number, the flags
/// only the first or last segment may carry, and a full checksum; UDP length and checksum.
#[derive(Debug, Clone, Copy)]
pub struct SuperFrame<'a> {
    frame: &'a [u8],
    l3: usize,
    l4: usize,
    payload: usize,
    ipv4: bool,
    transport: Transport,
}

impl<'a> SuperFrame<'a> {
    /// Parses the headers. The frame's length, not the IP length fields (which a stack may
    /// leave unset in a super-frame), says where the payload ends.
    pub fn parse(frame: &'a [u8]) -> Result<SuperFrame<'a>, SegmentError> {
        let (ether_type, l3) = ethernet::network_layer(frame).ok_or(SegmentError::NotIp)?;
        let (l4, proto, ipv4) = match ether_type {
            EtherType::IPV4 => {
                let ip = Ipv4HeaderSlice::from_slice(&frame[l3..]).map_err(|_| SegmentError::Malformed)?;
                if ip.more_fragments() || ip.fragments_offset().value() != 0 {
                    return Err(SegmentError::Malformed);
                }
                (l3 + ip.slice().len(), ip.protocol(), true)
            }
            EtherType::IPV6 => {
                let ip = Ipv6HeaderSlice::from_slice(&frame[l3..]).map_err(|_| SegmentError::Malformed)?;
                (l3 + 40, ip.next_header(), false)
            }
            _ => return Err(SegmentError::NotIp),
        };
        let (transport, l4_len) = match proto {
            IpNumber::TCP => {
                let off = frame.get(l4 + 12).ok_or(SegmentError::Malformed)?;
                let len = usize::from(off >> 4) * 4;
                if len < 20 {
                    return Err(SegmentError::Malformed);
                }
                (Transport::Tcp, len)
            }
            IpNumber::UDP => (Transport::Udp, 8),
            _ => return Err(SegmentError::NotTcpOrUdp),
        };
        let payload = l4 + l4_len;
        if payload > frame.len() {
            return Err(SegmentError::Malformed);
        }
        Ok(SuperFrame { frame, l3, l4, payload, ipv4, transport })
    }

    /// TCP or UDP.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Whether the IP header is IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.ipv4
    }

    /// Offset of the IP header.
    pub fn l3_offset(&self) -> usize {
        self.l3
    }

    /// Offset of the TCP or UDP header.
    pub fn l4_offset(&self) -> usize {
        self.l4
    }

    /// Bytes of headers (Ethernet through TCP/UDP) every segment repeats.
    pub fn header_len(&self) -> usize {
        self.payload
    }

    /// Bytes of payload to spread over the segments.
    pub fn payload_len(&self) -> usize {
        self.frame.len() - self.payload
    }

    /// The largest payload per segment for an IP MTU of `mtu`.
    pub fn mss_for_mtu(&self, mtu: usize) -> Result<usize, SegmentError> {
        match mtu.checked_sub(self.payload - self.l3) {
            Some(m) if m > 0 => Ok(m),
            _ => Err(SegmentError::MtuTooSmall),
        }
    }

    /// How many segments of `mss` payload bytes the frame makes (at least one).
    pub fn segment_count(&self, mss: usize) -> usize {
        self.payload_len().div_ceil(mss).max(1)
    }

    /// The payload bytes of segment `index` of `mss` bytes, as a range of the frame.
    pub fn segment_payload(&self, index: usize, mss: usize) -> Range<usize> {
        let start = (index * mss).min(self.payload_len());
        let len = mss.min(self.payload_len() - start);
        self.payload + start..self.payload + start + len
    }

    /// Writes the headers of segment `index` of `mss` payload bytes into `hdr` (which must
    /// hold [`SuperFrame::header_len`] bytes) and returns where its payload is in the frame.
    /// The checksums cover that payload where it lies, so a sender can gather headers and
    /// payloads with iovecs instead of copying the payload.
    pub fn write_segment_headers(&self, index: usize, mss: usize, hdr: &mut [u8]) -> Range<usize> {
        self.headers(index, mss, hdr, true)
    }

    /// [`SuperFrame::write_segment_headers`] with the TCP/UDP checksum left partial: the field
    /// holds the pseudo-header sum only, as a NIC with checksum offload is handed it, and the
    /// payload is not read at all. For a receiver that finishes it (VXLAN remote checksum
    /// offload, checksum starting at [`SuperFrame::l4_offset`]).
    pub fn write_segment_headers_partial(&self, index: usize, mss: usize, hdr: &mut [u8]) -> Range<usize> {
        self.headers(index, mss, hdr, false)
    }

    #[inline]
    fn headers(&self, index: usize, mss: usize, hdr: &mut [u8], full_checksum: bool) -> Range<usize> {
        let h = self.payload;
        let payload = self.segment_payload(index, mss);
        let len = payload.len();
        let last = payload.end >= self.frame.len();
        let hdr = &mut hdr[..h];
        hdr.copy_from_slice(&self.frame[..h]);
        let (l3, l4) = (self.l3, self.l4);
        let l4_len = h - l4 + len;
        let pseudo = if self.ipv4 {
            let ihl = l4 - l3;
            let total = (ihl + l4_len) as u16;
            hdr[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([hdr[l3 + 4], hdr[l3 + 5]]).wrapping_add(index as u16);
            hdr[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            hdr[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = !checksum::fold(checksum::sum(&hdr[l3..l4], 0));
            hdr[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            let src: [u8; 4] = hdr[l3 + 12..l3 + 16].try_into().expect("4 bytes");
            let dst: [u8; 4] = hdr[l3 + 16..l3 + 20].try_into().expect("4 bytes");
            checksum::pseudo_v4(src, dst, hdr[l3 + 9], l4_len as u16)
        } else {
            hdr[l3 + 4..l3 + 6].copy_from_slice(&((l4 - l3 - 40 + l4_len) as u16).to_be_bytes());
            let src: [u8; 16] = hdr[l3 + 8..l3 + 24].try_into().expect("16 bytes");
            let dst: [u8; 16] = hdr[l3 + 24..l3 + 40].try_into().expect("16 bytes");
            checksum::pseudo_v6(src, dst, hdr[l3 + 6], l4_len as u32)
        };
        let field = match self.transport {
            Transport::Tcp => {
                let start = (payload.start - self.payload) as u32;
                let seq = u32::from_be_bytes([hdr[l4 + 4], hdr[l4 + 5], hdr[l4 + 6], hdr[l4 + 7]]).wrapping_add(start);
                hdr[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                if !last {
                    hdr[l4 + 13] &= !(TCP_FIN | TCP_PSH);
                }
                if index > 0 {
                    hdr[l4 + 13] &= !TCP_CWR;
                }
                l4 + 16
            }
            Transport::Udp => {
                hdr[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4 + 6
            }
        };
        if !full_checksum {
            hdr[field..field + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
            return payload;
        }
        hdr[field..field + 2].copy_from_slice(&[0, 0]);
        let sum = checksum::sum(&self.frame[payload.clone()], checksum::sum(&hdr[l4..h], pseudo));
        let mut c = !checksum::fold(sum);
        if self.transport == Transport::Udp && c == 0 {
            c = 0xffff;
        }
        hdr[field..field + 2].copy_from_slice(&c.to_be_bytes());
        payload
    }

    /// Writes segment `index` of `mss` payload bytes, headers and payload, into `out` and
    /// returns its length. `out` must hold `header_len() + mss` bytes.
    pub fn write_segment(&self, index: usize, mss: usize, out: &mut [u8]) -> usize {
        let h = self.payload;
        let payload = self.write_segment_headers(index, mss, out);
        let len = payload.len();
        out[h..h + len].copy_from_slice(&self.frame[payload]);
        h + len
    }

    /// Every segment of `mss` payload bytes, each in its own buffer: what a sender's frames
    /// look like, for tests, fuzzing and benchmarks. Allocates; the hot loops cut in place.
    pub fn to_segments(&self, mss: usize) -> Vec<Vec<u8>> {
        (0..self.segment_count(mss))
            .map(|i| {
                let mut out = vec![0u8; self.header_len() + mss];
                let n = self.write_segment(i, mss, &mut out);
                out.truncate(n);
                out
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The kernel's `tcp_xmit_size_goal` at a given `gso_max_size`, in segments.
    fn kernel_segments(gso_max_size: u32, max_tcp_header: u32, mss: u32) -> u32 {
        (gso_max_size - 1 - max_tcp_header) / mss
    }

    #[test]
    fn an_endpoint_super_frame_is_the_most_segments_one_gso_send_carries() {
        // The figure the benchmark runs at: an underlay of 1500, VXLAN over IPv4.
        assert_eq!(endpoint_gso_max_size(1450, false), 44 * 1398 + 321);
        for sealed in [false, true] {
            for mtu in (576..=9000).step_by(7) {
                let g = endpoint_gso_max_size(mtu, sealed);
                let datagram = mtu + 22 + if sealed { crate::crypto::OVERHEAD as u32 } else { 0 };
                let fits = (MAX_UDP_PAYLOAD as u32 / datagram).min(64);
                for header in [256, 320] {
                    let n = kernel_segments(g, header, mtu - 52);
                    assert!(
                        n * datagram <= MAX_UDP_PAYLOAD as u32 && n <= 64,
                        "mtu {mtu}: {n} segments overflow one send"
                    );
                    assert_eq!(
                        n, fits,
                        "mtu {mtu} sealed {sealed} header {header}: the super-frame is smaller than a send"
                    );
                    // Without timestamps each segment carries more: no more of them.
                    assert!(kernel_segments(g, header, mtu - 40) <= fits);
                }
            }
        }
        assert_eq!(endpoint_gso_max_size(500, false), 0, "too small an MTU leaves the default");
    }

    #[test]
    fn partial_headers_finished_by_the_receiver_are_the_full_ones() {
        let sf = tcp4_super(&(0..5000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(), 12, 0x18, 9);
        let f = SuperFrame::parse(&sf).unwrap();
        let h = f.header_len();
        for s in 0..f.segment_count(1400) {
            let mut full = vec![0u8; h];
            let mut partial = vec![0u8; h];
            let payload = f.write_segment_headers(s, 1400, &mut full);
            assert_eq!(f.write_segment_headers_partial(s, 1400, &mut partial), payload);
            // Finishing the partial checksum as a NIC or the receiving kernel would.
            let mut seg = [&partial[..], &sf[payload.clone()]].concat();
            assert!(crate::offload::finish_checksum(&mut seg, f.l4_offset(), 16));
            assert_eq!(seg, [&full[..], &sf[payload]].concat(), "segment {s}");
        }
    }

    /// An Ethernet/IPv4/TCP super-frame (checksums not set; segmentation computes them).
    pub(crate) fn tcp4_super(payload: &[u8], options: usize, flags: u8, seq: u32) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let tcp_len = 20 + options;
        let total = (20 + tcp_len + payload.len()).min(65_535) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, ((tcp_len / 4) as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(1u8, options));
        f.extend_from_slice(payload);
        f
    }

    fn tcp6_super(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 6, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 7, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn udp4_super(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[0x30, 0x39, 0x30, 0x3a, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn verify(seg: &[u8]) {
        let (_, l3) = ethernet::network_layer(seg).unwrap();
        let v4 = seg[l3] >> 4 == 4;
        let (l4, pseudo) = if v4 {
            let ihl = usize::from(seg[l3] & 0xf) * 4;
            assert_eq!(checksum::fold(checksum::sum(&seg[l3..l3 + ihl], 0)), 0xffff, "IPv4 header checksum");
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[l3 + 2], seg[l3 + 3]])),
                seg.len() - l3,
                "IPv4 total length"
            );
            let l4_len = seg.len() - l3 - ihl;
            (
                l3 + ihl,
                checksum::pseudo_v4(
                    seg[l3 + 12..l3 + 16].try_into().unwrap(),
                    seg[l3 + 16..l3 + 20].try_into().unwrap(),
                    seg[l3 + 9],
                    l4_len as u16,
                ),
            )
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([seg[l3 + 4], seg[l3 + 5]])), seg.len() - l3 - 40);
            let l4_len = seg.len() - l3 - 40;
            (
                l3 + 40,
                checksum::pseudo_v6(
                    seg[l3 + 8..l3 + 24].try_into().unwrap(),
                    seg[l3 + 24..l3 + 40].try_into().unwrap(),
                    seg[l3 + 6],
                    l4_len as u32,
                ),
            )
        };
        assert_eq!(checksum::fold(checksum::sum(&seg[l4..], pseudo)), 0xffff, "L4 checksum");
    }

    fn cut(frame: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let s = SuperFrame::parse(frame).unwrap();
        s.to_segments(s.mss_for_mtu(mtu).unwrap())
    }

    #[test]
    fn tcp_segments_continue_the_stream() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let f = tcp4_super(&payload, 12, TCP_PSH | TCP_FIN | TCP_CWR | 0x10, 1000);
        let segs = cut(&f, 1450);
        assert_eq!(segs.len(), 4, "1398-byte MSS behind 20+32 bytes of headers");
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            verify(s);
            assert!(s.len() - 14 <= 1450);
            let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
            assert_eq!(seq, 1000 + data.len() as u32);
            let flags = s[47];
            assert_eq!(flags & (TCP_PSH | TCP_FIN) != 0, i == segs.len() - 1, "PSH/FIN only on the last");
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
            assert_eq!(u16::from_be_bytes([s[18], s[19]]), 0x1234u16.wrapping_add(i as u16), "IP ID counts up");
            data.extend_from_slice(&s[14 + 20 + 32..]);
        }
        assert_eq!(data, payload);
    }

    #[test]
    fn ipv6_and_udp_are_cut_too() {
        let payload = vec![7u8; 3000];
        for s in cut(&tcp6_super(&payload), 1430) {
            verify(&s);
            assert!(s.len() - 14 <= 1430);
        }
        let segs = cut(&udp4_super(&payload), 1450);
        assert_eq!(segs.len(), 3);
        for s in &segs {
            verify(s);
            assert_eq!(usize::from(u16::from_be_bytes([s[38], s[39]])), s.len() - 34, "UDP length");
        }
    }

    #[test]
    fn refuses_what_it_cannot_cut() {
        let mut frag = tcp4_super(&[0; 100], 0, 0x10, 0);
        frag[20] = 0x20; // more fragments
        assert_eq!(SuperFrame::parse(&frag).err(), Some(SegmentError::Malformed));
        let mut icmp = tcp4_super(&[0; 100], 0, 0x10, 0);
        icmp[23] = 1;
        assert_eq!(SuperFrame::parse(&icmp).err(), Some(SegmentError::NotTcpOrUdp));
        let arp = crate::wire::arp::tests::request(
            crate::MacAddr([2, 0, 0, 0, 0, 1]),
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
        );
        assert_eq!(SuperFrame::parse(&arp).err(), Some(SegmentError::NotIp));
        let small = tcp4_super(&[0; 100], 0, 0x10, 0);
        let s = SuperFrame::parse(&small).unwrap();
        assert_eq!(s.mss_for_mtu(40), Err(SegmentError::MtuTooSmall));
    }

    proptest! {
        #[test]
        fn any_tcp_super_frame_cuts_into_valid_segments_that_rejoin(
            len in 0usize..66_000, options in 0usize..=10, mtu in 576usize..9001, seq in any::<u32>(), flags in any::<u8>()
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let f = tcp4_super(&payload, options * 4, flags, seq);
            let segs = cut(&f, mtu);
            let mut data = Vec::new();
            for s in &segs {
                verify(s);
                prop_assert!(s.len() - 14 <= mtu);
                let off = 14 + 20 + 20 + options * 4;
                prop_assert_eq!(u32::from_be_bytes([s[38], s[39], s[40], s[41]]), seq.wrapping_add(data.len() as u32));
                data.extend_from_slice(&s[off..]);
            }
            prop_assert_eq!(data, payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), mtu in 0usize..2000) {
            if let Ok(s) = SuperFrame::parse(&bytes)
                && let Ok(mss) = s.mss_for_mtu(mtu) {
                    let mut out = vec![0u8; s.header_len() + mss];
                    for i in 0..s.segment_count(mss) {
                        let n = s.write_segment(i, mss, &mut out);
                        prop_assert!(n <= out.len());
                    }
                }
        }
    }
}
