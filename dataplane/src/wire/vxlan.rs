//! The VXLAN header of RFC 7348 §5, as a view over bytes ([`VxlanPacket`]) and as a typed value
//! ([`VxlanRepr`]): what the TX loop writes in front of a frame and the RX loop checks.

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

/// The only flags value a valid header carries: the I bit ("VNI is valid").
pub const FLAGS_VNI_VALID: u8 = 0x08;

/// Why a VXLAN header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    /// The datagram is shorter than the 8-byte header.
    #[error("datagram shorter than the 8-byte VXLAN header")]
    Truncated,
    /// The flags byte is not exactly 0x08 (I bit set, every other bit clear).
    #[error("VXLAN flags are {0:#04x}, expected 0x08")]
    BadFlags(u8),
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

    /// Checks the fields the way Linux's `vxlan_rcv` does: flags exactly 0x08, reserved zero.
    /// That is stricter than the RFC's "ignore on receipt", so that an overlayd VTEP and a
    /// kernel VTEP accept exactly the same packets.
    #[inline]
    pub fn check(&self) -> Result<(), VxlanError> {
        let flags = self.flags();
        if flags != FLAGS_VNI_VALID {
            return Err(VxlanError::BadFlags(flags));
        }
        if !self.reserved_is_zero() {
            return Err(VxlanError::ReservedBits);
        }
        Ok(())
    }

    /// The flags byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether both reserved fields are zero.
    #[inline]
    pub fn reserved_is_zero(&self) -> bool {
        let b = self.buffer.as_ref();
        b[field::RESERVED_1] == [0, 0, 0] && b[field::RESERVED_2] == 0
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
    /// Sets the flags byte.
    #[inline]
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Sets the VNI.
    #[inline]
    pub fn set_vni(&mut self, vni: Vni) {
        self.buffer.as_mut()[field::VNI].copy_from_slice(&vni.to_be_bytes());
    }

    /// Zeroes both reserved fields.
    #[inline]
    pub fn clear_reserved(&mut self) {
        let b = self.buffer.as_mut();
        b[field::RESERVED_1].fill(0);
        b[field::RESERVED_2] = 0;
    }

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
}

impl VxlanRepr {
    /// Parses and validates a header (see [`VxlanPacket::check`]).
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(packet: &VxlanPacket<T>) -> Result<VxlanRepr, VxlanError> {
        packet.check()?;
        Ok(VxlanRepr { vni: packet.vni() })
    }

    /// Writes this header (flags 0x08, reserved zero, the VNI) in front of the payload: the
    /// hot path's encapsulation in place, all eight bytes in one store.
    #[inline]
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut VxlanPacket<T>) {
        let v = self.vni.to_be_bytes();
        *packet.header_mut() = [FLAGS_VNI_VALID, 0, 0, 0, v[0], v[1], v[2], 0];
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
        assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni: Vni::new(4242).unwrap() }));
        assert!(p.payload().is_empty());
    }

    #[test]
    fn emit_matches_the_kernel_bytes() {
        let mut buf = [0xffu8; 8];
        let mut p = VxlanPacket::new_checked(&mut buf[..]).unwrap();
        VxlanRepr { vni: Vni::new(4242).unwrap() }.emit(&mut p);
        assert_eq!(buf, KERNEL_HEADER);
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
            VxlanRepr { vni }.emit(&mut p);
            let p = VxlanPacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni }));
            prop_assert_eq!(p.payload(), &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(p) = VxlanPacket::new_checked(&bytes[..]) {
                let ok = p.check().is_ok();
                prop_assert_eq!(ok, bytes[0] == 0x08 && bytes[1..4] == [0, 0, 0] && bytes[7] == 0);
                let _ = p.vni();
                let _ = p.payload();
            } else {
                prop_assert!(bytes.len() < HEADER_LEN);
            }
        }
    }
}
