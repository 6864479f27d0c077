//! IPv4 prefixes (CIDR blocks): networks' subnets and the per-host address blocks leased
//! from them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 prefix whose address has no bits set below the prefix length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// A prefix; `None` if `prefix > 32` or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Cidr> {
        (prefix <= 32 && u32::from(addr) & !mask(prefix) == 0).then_some(Ipv4Cidr { addr, prefix })
    }

    /// The prefix of length `prefix` that holds `addr` (its host bits cleared); `None` if
    /// `prefix > 32`.
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Cidr> {
        (prefix <= 32).then(|| Ipv4Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix })
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as a number.
    pub fn mask(&self) -> u32 {
        mask(self.prefix)
    }

    /// How many addresses it spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        let m = mask(self.prefix.min(other.prefix));
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// The `index`-th sub-prefix of length `prefix`, if it exists.
    pub fn subnet(&self, prefix: u8, index: u64) -> Option<Ipv4Cidr> {
        if prefix < self.prefix || prefix > 32 || index >= 1u64 << (prefix - self.prefix) {
            return None;
        }
        let base = u64::from(u32::from(self.addr)) + index * (1u64 << (32 - u32::from(prefix)));
        Ipv4Cidr::new(Ipv4Addr::from(base as u32), prefix)
    }

    /// The `n`-th address (0 is the network address).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a prefix: write it as ADDRESS/LENGTH, e.g. 10.20.0.0/16"))?;
        if a.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(format!("{s:?} is an IPv6 subnet: overlay networks are IPv4 only for now (give an IPv4 one)"));
        }
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 =
            p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: the length must be 0 to 32"))?;
        Ipv4Cidr::new(addr, prefix).ok_or_else(|| {
            let net = Ipv4Addr::from(u32::from(addr) & mask(prefix));
            format!("{s:?} has host bits set: did you mean {net}/{prefix}?")
        })
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_contains_overlap_subnets() {
        let n: Ipv4Cidr = "10.128.0.0/16".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 128, 255, 255)) && !n.contains(Ipv4Addr::new(10, 129, 0, 0)));
        assert_eq!(n.subnet(24, 3).unwrap().to_string(), "10.128.3.0/24");
        assert!(n.subnet(24, 256).is_none());
        assert!(n.overlaps(&"10.128.7.0/24".parse().unwrap()));
        assert!(n.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!n.overlaps(&"10.129.0.0/16".parse().unwrap()));
        assert_eq!(n.nth(1), Some(Ipv4Addr::new(10, 128, 0, 1)));
        assert!("10.128.0.1/16".parse::<Ipv4Cidr>().unwrap_err().contains("did you mean 10.128.0.0/16"));
        assert!("10.128.0.0".parse::<Ipv4Cidr>().unwrap_err().contains("ADDRESS/LENGTH"));
        assert!("10.128.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00:1::/64".parse::<Ipv4Cidr>().unwrap_err().contains("IPv4 only for now"));
    }
}
