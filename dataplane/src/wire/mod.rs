//! Wire formats as zero-copy views over caller-owned bytes, beyond etherparse's slices (which
//! read Ethernet, 802.1Q, ARP, IPv4, IPv6 and UDP). Nothing here allocates; every parser
//! validates lengths before it reads.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod flow;
pub mod vxlan;

use core::fmt;
use core::str::FromStr;
use std::net::Ipv4Addr;

/// A 24-bit VXLAN Network Identifier: one overlay network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI, 2^24 − 1.
    pub const MAX: u32 = (1 << 24) - 1;

    /// A VNI, or `None` if `value` does not fit in 24 bits.
    pub const fn new(value: u32) -> Option<Vni> {
        if value <= Self::MAX { Some(Vni(value)) } else { None }
    }

    /// The VNI as a number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Reads the 3 bytes of the header field.
    pub const fn from_be_bytes(b: [u8; 3]) -> Vni {
        Vni(((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32)
    }

    /// The 3 bytes of the header field.
    pub const fn to_be_bytes(self) -> [u8; 3] {
        [(self.0 >> 16) as u8, (self.0 >> 8) as u8, self.0 as u8]
    }
}

impl TryFrom<u32> for Vni {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        Vni::new(v).ok_or_else(|| format!("VNI {v} does not fit in 24 bits (0 to {})", Vni::MAX))
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Vni {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: u32 = s.parse().map_err(|_| format!("VNI {s:?} is not a number"))?;
        Vni::try_from(v)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The first octet of every MAC that [`MacAddr::from_ipv4`] derives: locally administered,
    /// unicast (bit 1 set, bit 0 clear), "O" for overlay.
    pub const DERIVED_PREFIX: [u8; 2] = [0x02, 0x4f];

    /// Whether this is a group (broadcast or multicast) address.
    #[inline]
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this is the broadcast address.
    #[inline]
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The MAC overlayd gives a container with this IPv4 address (02:4f + the four octets), so
    /// that an address alone tells its MAC, as Docker's bridge does with 02:42.
    pub const fn from_ipv4(ip: Ipv4Addr) -> MacAddr {
        let o = ip.octets();
        MacAddr([Self::DERIVED_PREFIX[0], Self::DERIVED_PREFIX[1], o[0], o[1], o[2], o[3]])
    }
}

impl MacAddr {
    /// The IPv4 address a MAC made by [`MacAddr::from_ipv4`] was derived from.
    #[inline]
    pub const fn derived_ipv4(&self) -> Option<Ipv4Addr> {
        let m = self.0;
        if m[0] == Self::DERIVED_PREFIX[0] && m[1] == Self::DERIVED_PREFIX[1] {
            Some(Ipv4Addr::new(m[2], m[3], m[4], m[5]))
        } else {
            None
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (expected six hex pairs like 02:4f:0a:00:00:02)");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_bounds_and_bytes() {
        assert!(Vni::new(Vni::MAX).is_some());
        assert!(Vni::new(Vni::MAX + 1).is_none());
        let v = Vni::new(0x123456).unwrap();
        assert_eq!(v.to_be_bytes(), [0x12, 0x34, 0x56]);
        assert_eq!(Vni::from_be_bytes([0x12, 0x34, 0x56]), v);
        assert!("16777216".parse::<Vni>().unwrap_err().contains("24 bits"));
        assert!("x".parse::<Vni>().is_err());
    }

    #[test]
    fn mac_parse_print() {
        let m: MacAddr = "02:4F:0a:00:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "02:4f:0a:00:00:02");
        assert_eq!(m, MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        for bad in ["", "02:4f:0a:00:00", "02:4f:0a:00:00:02:03", "0g:00:00:00:00:00", "2:4f:0a:00:00:02"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
