//! The VXLAN header of RFC 7348 §5, as a view over bytes ([`VxlanPacket`]) and as a typed value
//! ([`VxlanRepr`]): what the TX loop writes in front of a frame and the RX loop checks.
//!
//! With the one extension Linux implements that saves work per byte: **remote checksum
//! offload** (RCO, draft-herbert-vxlan-rco; Linux's `remcsumtx`/`remcsumrx`). The sender
//! leaves the inner TCP/UDP checksum partial (the field holds the pseudo-header sum, as a
//! NIC with checksum offload would be handed it), sets the RCO flag and says in the low byte
//! of the VNI word where the checksummed part starts and whether the field is UDP's or TCP's.
//! The outer UDP checksum covers the datagram on the underlay; the receiver completes the inner
//! checksum or, as Linux does by default, hands the frame on as still partial. A VTEP that does
//! not take RCO refuses such a header (bits outside RFC 7348), so it is sent only to VTEPs known
//! to take it.

use super::Vni;

mod field {
    pub const FLAGS: usize = 0;
    pub const RESERVED_1: core::ops::Range<usize> = 1..4;
    pub const VNI: core::ops::Range<usize> = 4..7;
    pub const RESERVED_2: usize = 7;
    pub const PAYLOAD: usize = 8;
}

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// The flags value of every valid header: the I bit ("VNI is valid").
pub const FLAGS_VNI_VALID: u8 = 0x08;

/// The RCO flag, bit 21 of the first word (Linux's `VXLAN_HF_RCO`): in the second byte.
const RCO_FLAG: u8 = 0x20;
/// In the byte after the VNI with RCO: the checksum field is UDP's (else TCP's).
const RCO_UDP: u8 = 0x80;
/// In the byte after the VNI with RCO: where checksumming starts, in 2-byte units from the
/// inner Ethernet header.
const RCO_START_MASK: u8 = 0x7f;

/// Remote checksum offload (RCO) of one datagram: its inner frame's TCP/UDP checksum is
/// partial, to be completed over bytes `start..` of the inner frame into the field at
/// `start + offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteChecksum {
    /// Where the checksummed part (the TCP/UDP header) starts, from the inner Ethernet header:
    /// even, at most 254.
    pub start: u16,
    /// The field is UDP's (offset 6), else TCP's (offset 16).
    pub udp: bool,
}

impl RemoteChecksum {
    /// Largest start the header can carry.
    pub const MAX_START: usize = (RCO_START_MASK as usize) << 1;

    /// For a checksum that starts at `start` of the inner frame: `None` if the header cannot
    /// carry it (odd, or beyond [`RemoteChecksum::MAX_START`]).
    #[inline]
    pub fn new(start: usize, udp: bool) -> Option<RemoteChecksum> {
        (start.is_multiple_of(2) && start <= Self::MAX_START).then_some(RemoteChecksum { start: start as u16, udp })
    }

    /// Where the checksum field is, from [`RemoteChecksum::start`].
    #[inline]
    pub fn offset(&self) -> u16 {
        if self.udp { 6 } else { 16 }
    }

    fn byte(&self) -> u8 {
        ((self.start >> 1) as u8 & RCO_START_MASK) | if self.udp { RCO_UDP } else { 0 }
    }
}

/// Why a VXLAN header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    /// The datagram is shorter than the 8-byte header.
    #[error("datagram shorter than the 8-byte VXLAN header")]
    Truncated,
    /// The flags byte is not exactly 0x08 (I bit set, every other bit clear).
    #[error("VXLAN flags are {0:#04x}, expected 0x08")]
    BadFlags(u8),
    /// Remote checksum offload with a start of zero (no header to checksum from).
    #[error("VXLAN remote checksum offload without a start")]
    BadRemoteChecksum,
    /// One of the reserved fields is not zero.
    #[error("VXLAN reserved bits are not zero")]
    ReservedBits,
}

/// A read/write view of a VXLAN header followed by its payload (the inner Ethernet frame):
///
/// ```text
///  0               1               2               3
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |R|R|R|R|I|R|R|R|            Reserved                           |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                VXLAN Network Identifier (VNI) |   Reserved    |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
///
/// [`VxlanPacket::new_checked`], the only constructor, validates the length once, so no
/// accessor can panic afterwards.
#[derive(Debug, Clone, Copy)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// Wraps a buffer after checking that it holds at least a full header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, VxlanError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(VxlanError::Truncated);
        }
        Ok(VxlanPacket { buffer })
    }

    /// Checks the fields the way Linux's `vxlan_rcv` does with `remcsumrx` on: flags exactly
    /// 0x08, reserved zero, except the RCO flag and its byte. That is stricter than the RFC's
    /// "ignore on receipt", so that an overlayd VTEP and a kernel VTEP accept exactly the same
    /// packets. Returns the remote checksum offload the header carries, if any.
    #[inline]
    pub fn check(&self) -> Result<Option<RemoteChecksum>, VxlanError> {
        let flags = self.flags();
        if flags != FLAGS_VNI_VALID {
            return Err(VxlanError::BadFlags(flags));
        }
        let b = self.buffer.as_ref();
        match b[field::RESERVED_1] {
            [0, 0, 0] if b[field::RESERVED_2] == 0 => Ok(None),
            [RCO_FLAG, 0, 0] => {
                let byte = b[field::RESERVED_2];
                let start = u16::from(byte & RCO_START_MASK) << 1;
                if start == 0 {
                    return Err(VxlanError::BadRemoteChecksum);
                }
                Ok(Some(RemoteChecksum { start, udp: byte & RCO_UDP != 0 }))
            }
            _ => Err(VxlanError::ReservedBits),
        }
    }

    /// The flags byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The 24-bit VXLAN Network Identifier.
    #[inline]
    pub fn vni(&self) -> Vni {
        let b = &self.buffer.as_ref()[field::VNI];
        Vni::from_be_bytes([b[0], b[1], b[2]])
    }

    /// The inner Ethernet frame.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// The inner Ethernet frame, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }

    /// The whole header, writable.
    #[inline]
    fn header_mut(&mut self) -> &mut [u8; HEADER_LEN] {
        let header = self.buffer.as_mut().first_chunk_mut();
        header.expect("new_checked made sure the buffer holds a header")
    }
}

/// The typed content of a valid VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    /// The network the inner frame belongs to.
    pub vni: Vni,
    /// Remote checksum offload: the inner checksum is partial (see the module doc).
    pub rco: Option<RemoteChecksum>,
}

impl VxlanRepr {
    /// A plain RFC 7348 header for `vni`.
    #[inline]
    pub fn plain(vni: Vni) -> VxlanRepr {
        VxlanRepr { vni, rco: None }
    }

    /// Parses and validates a header (see [`VxlanPacket::check`]).
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(packet: &VxlanPacket<T>) -> Result<VxlanRepr, VxlanError> {
        let rco = packet.check()?;
        Ok(VxlanRepr { vni: packet.vni(), rco })
    }

    /// Writes this header (flags 0x08, the VNI, reserved zero or the RCO flag and byte) in
    /// front of the payload: the hot path's encapsulation in place, all eight bytes in one
    /// store.
    #[inline]
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut VxlanPacket<T>) {
        let v = self.vni.to_be_bytes();
        *packet.header_mut() = match self.rco {
            None => [FLAGS_VNI_VALID, 0, 0, 0, v[0], v[1], v[2], 0],
            Some(r) => [FLAGS_VNI_VALID, RCO_FLAG, 0, 0, v[0], v[1], v[2], r.byte()],
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A header captured from `ip link add … type vxlan id 4242 dstport 4789`.
    const KERNEL_HEADER: [u8; 8] = [0x08, 0, 0, 0, 0x00, 0x10, 0x92, 0x00];

    #[test]
    fn parses_a_kernel_header() {
        let p = VxlanPacket::new_checked(&KERNEL_HEADER[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr::plain(Vni::new(4242).unwrap())));
        assert!(p.payload().is_empty());
    }

    #[test]
    fn emit_matches_the_kernel_bytes() {
        let mut buf = [0xffu8; 8];
        let mut p = VxlanPacket::new_checked(&mut buf[..]).unwrap();
        VxlanRepr::plain(Vni::new(4242).unwrap()).emit(&mut p);
        assert_eq!(buf, KERNEL_HEADER);
    }

    // The header Linux writes with `remcsumtx` for a TCP segment behind Ethernet and IPv4
    // (checksum start 34 = 17 two-byte units): `vxlan_compute_rco` and `VXLAN_HF_RCO`.
    const KERNEL_RCO_TCP: [u8; 8] = [0x08, 0x20, 0, 0, 0x00, 0x10, 0x92, 17];

    #[test]
    fn remote_checksum_offload_reads_and_writes_the_kernel_bytes() {
        let vni = Vni::new(4242).unwrap();
        let p = VxlanPacket::new_checked(&KERNEL_RCO_TCP[..]).unwrap();
        let tcp = RemoteChecksum { start: 34, udp: false };
        assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni, rco: Some(tcp) }));
        assert_eq!(tcp.offset(), 16);
        let mut buf = [0u8; 8];
        VxlanRepr { vni, rco: Some(tcp) }.emit(&mut VxlanPacket::new_checked(&mut buf[..]).unwrap());
        assert_eq!(buf, KERNEL_RCO_TCP);
        // UDP behind IPv6: start 54, the UDP bit.
        let udp = RemoteChecksum::new(54, true).unwrap();
        VxlanRepr { vni, rco: Some(udp) }.emit(&mut VxlanPacket::new_checked(&mut buf[..]).unwrap());
        assert_eq!(buf[7], 0x80 | 27);
        assert_eq!(VxlanRepr::parse(&VxlanPacket::new_checked(&buf[..]).unwrap()).unwrap().rco, Some(udp));
        assert_eq!(udp.offset(), 6);
        // What the header cannot carry.
        assert_eq!(RemoteChecksum::new(35, false), None);
        assert_eq!(RemoteChecksum::new(256, false), None);
        assert!(RemoteChecksum::new(RemoteChecksum::MAX_START, false).is_some());
    }

    #[test]
    fn remote_checksum_offload_is_refused_when_malformed() {
        // The RCO flag with a start of zero; the byte without the flag; other reserved bits.
        let mut zero = KERNEL_RCO_TCP;
        zero[7] = 0x80;
        assert_eq!(VxlanPacket::new_checked(&zero[..]).unwrap().check(), Err(VxlanError::BadRemoteChecksum));
        let mut no_flag = KERNEL_RCO_TCP;
        no_flag[1] = 0;
        assert_eq!(VxlanPacket::new_checked(&no_flag[..]).unwrap().check(), Err(VxlanError::ReservedBits));
        let mut more = KERNEL_RCO_TCP;
        more[1] = 0x21;
        assert_eq!(VxlanPacket::new_checked(&more[..]).unwrap().check(), Err(VxlanError::ReservedBits));
    }

    #[test]
    fn refuses_what_linux_refuses() {
        let short = VxlanPacket::new_checked(&KERNEL_HEADER[..7]);
        assert_eq!(short.err(), Some(VxlanError::Truncated));
        let mut g = KERNEL_HEADER;
        g[0] = 0x0c; // G bit (group policy extension): not ours
        let p = VxlanPacket::new_checked(&g[..]).unwrap();
        assert_eq!(p.check(), Err(VxlanError::BadFlags(0x0c)));
        for i in [1usize, 2, 3, 7] {
            let mut r = KERNEL_HEADER;
            r[i] = 1;
            let p = VxlanPacket::new_checked(&r[..]).unwrap();
            assert_eq!(p.check(), Err(VxlanError::ReservedBits), "byte {i}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(vni in 0u32..(1 << 24), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let vni = Vni::new(vni).unwrap();
            let mut buf = vec![0xaa; HEADER_LEN + payload.len()];
            buf[HEADER_LEN..].copy_from_slice(&payload);
            let mut p = VxlanPacket::new_checked(&mut buf[..]).unwrap();
            VxlanRepr::plain(vni).emit(&mut p);
            let p = VxlanPacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr::plain(vni)));
            prop_assert_eq!(p.payload(), &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(p) = VxlanPacket::new_checked(&bytes[..]) {
                let ok = p.check().is_ok();
                let plain = bytes[1..4] == [0, 0, 0] && bytes[7] == 0;
                let rco = bytes[1..4] == [0x20, 0, 0] && bytes[7] & 0x7f != 0;
                prop_assert_eq!(ok, bytes[0] == 0x08 && (plain || rco));
                let _ = p.vni();
                let _ = p.payload();
            } else {
                prop_assert!(bytes.len() < HEADER_LEN);
            }
        }
    }
}
