//! The table answers come from: for each network, its endpoints' names and aliases → IPv4
//! addresses, and addresses → names for PTR. Built once from the agent's snapshot with a
//! [`NameTableBuilder`] and immutable afterwards (the agent swaps an `Arc<NameTable>` on every
//! change); lookups allocate nothing.
//!
//! Names are compared case-insensitively (RFC 4343), without the trailing dot, as bytes after
//! ASCII lower-casing. Memory: about 90 bytes per endpoint with one name and its PTR (0.9 MB
//! per 10,000 names, as asked of the allocator: `tests/memory.rs`).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::wire::{MAX_LABEL_LEN, MAX_TEXT_LEN};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why a name given to the builder cannot be a DNS name (and so is not in the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty (or just a dot).
    #[error("empty name")]
    Empty,
    /// The name has an empty label (`a..b`, or a leading dot).
    #[error("empty label")]
    EmptyLabel,
    /// A label is longer than 63 bytes.
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    /// The name is longer than 253 bytes in dotted text.
    #[error("name longer than 253 bytes")]
    TooLong,
}

/// A name the builder left out, and why (for the agent's log and `overlayd dns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The network it was given for.
    pub network: Box<str>,
    /// The name as given.
    pub name: Box<str>,
    /// Why it was left out.
    pub error: NameError,
}

/// Lower-cases `name`, drops one trailing dot, and checks it is a DNS name in dotted text.
pub fn normalize(name: &str) -> Result<Box<[u8]>, NameError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_TEXT_LEN {
        return Err(NameError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
    }
    Ok(name.to_ascii_lowercase().into_bytes().into_boxed_slice())
}

/// A range of a flat array, in 8 bytes instead of a `Range<usize>`'s 16.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of<T>(v: &[T], start: usize) -> Span {
        Span { start: start as u32, len: (v.len() - start) as u32 }
    }

    fn get<T>(self, v: &[T]) -> &[T] {
        &v[self.start as usize..(self.start + self.len) as usize]
    }
}

/// Builds a [`NameTable`] from the agent's view of every network's endpoints.
///
/// ```
/// # use std::net::Ipv4Addr;
/// let mut b = resolver::NameTable::builder();
/// b.network("blue", false)
///     .endpoint("web1", ["www"], Ipv4Addr::new(10, 1, 0, 2))
///     .endpoint("web2", ["www"], Ipv4Addr::new(10, 1, 0, 3));
/// let table = b.build();
/// assert_eq!(table.network("blue").unwrap().addresses(b"www").unwrap().len(), 2);
/// ```
#[derive(Debug, Default)]
pub struct NameTableBuilder {
    networks: Vec<NetworkBuild>,
    rejected: Vec<Rejected>,
}

#[derive(Debug)]
struct NetworkBuild {
    name: Box<str>,
    internal: bool,
    names: Map<Box<[u8]>, Vec<Ipv4Addr>>,
    ptr: Map<Ipv4Addr, Vec<Box<[u8]>>>,
    srv: Map<Box<[u8]>, Vec<Target>>,
}

/// What an SRV record of a service names: a port and a target name of the same network
/// (lower-case dotted, without the network's name: [`PtrNames`] adds it as for PTR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The port.
    pub port: u16,
    /// The target's name on its network (a service's name, or a replica's).
    pub name: Box<[u8]>,
}

/// Adds endpoints to one network of a [`NameTableBuilder`].
#[derive(Debug)]
pub struct NetworkBuilder<'b> {
    builder: &'b mut NameTableBuilder,
    index: usize,
}

impl NameTableBuilder {
    /// The network named `name` (its name in `NAME.NETWORK`, and the key the resolver is asked
    /// with), created if new. `internal`: the network never forwards (the last call says).
    pub fn network(&mut self, name: &str, internal: bool) -> NetworkBuilder<'_> {
        let index = match self.networks.iter().position(|n| &*n.name == name) {
            Some(i) => i,
            None => {
                self.networks.push(NetworkBuild {
                    name: name.into(),
                    internal,
                    names: Map::default(),
                    ptr: Map::default(),
                    srv: Map::default(),
                });
                self.networks.len() - 1
            }
        };
        self.networks[index].internal = internal;
        NetworkBuilder { builder: self, index }
    }

    /// The table. Names that are not DNS names are left out and listed by
    /// [`NameTable::rejected`].
    pub fn build(self) -> NameTable {
        let mut networks = Map::default();
        networks.reserve(self.networks.len());
        for n in self.networks {
            networks.insert(n.name.clone(), NetworkNames::from_build(n));
        }
        NameTable { networks, rejected: self.rejected }
    }
}

impl NetworkBuilder<'_> {
    /// Adds an endpoint: its name and aliases resolve to `ipv4` (with every other endpoint of
    /// the same name or alias), and `ipv4` resolves back to `name.NETWORK`.
    pub fn endpoint<'s, I>(&mut self, name: &'s str, aliases: I, ipv4: Ipv4Addr) -> &mut Self
    where
        I: IntoIterator<Item = &'s str>,
    {
        let net = &mut self.builder.networks[self.index];
        for (i, given) in std::iter::once(name).chain(aliases).enumerate() {
            match normalize(given) {
                Ok(key) => {
                    if i == 0 {
                        let names = net.ptr.entry(ipv4).or_default();
                        if !names.contains(&key) {
                            names.push(key.clone());
                        }
                    }
                    let addrs = net.names.entry(key).or_default();
                    if !addrs.contains(&ipv4) {
                        addrs.push(ipv4);
                    }
                }
                Err(error) => {
                    self.builder.rejected.push(Rejected { network: net.name.clone(), name: given.into(), error })
                }
            }
        }
        self
    }
}

impl NetworkBuilder<'_> {
    /// Adds an SRV record: `name` (`_80._tcp.web`) → `port` on `target` (a name of this
    /// network, which the table answers; the answer adds the network's name).
    pub fn srv(&mut self, name: &str, port: u16, target: &str) -> &mut Self {
        let net = &mut self.builder.networks[self.index];
        match (normalize(name), normalize(target)) {
            (Ok(key), Ok(target)) => {
                let list = net.srv.entry(key).or_default();
                let t = Target { port, name: target };
                if !list.contains(&t) {
                    list.push(t);
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                self.builder.rejected.push(Rejected { network: net.name.clone(), name: name.into(), error })
            }
        }
        self
    }

    /// Adds a name that resolves to `ipv4` (with whatever else has that name) and nothing
    /// that resolves back: a service's name to its VIP or replicas, `tasks.NAME` (the
    /// replicas' own names point back to them).
    pub fn name(&mut self, name: &str, ipv4: Ipv4Addr) -> &mut Self {
        let net = &mut self.builder.networks[self.index];
        match normalize(name) {
            Ok(key) => {
                let addrs = net.names.entry(key).or_default();
                if !addrs.contains(&ipv4) {
                    addrs.push(ipv4);
                }
            }
            Err(error) => self.builder.rejected.push(Rejected { network: net.name.clone(), name: name.into(), error }),
        }
        self
    }
}

/// Every network's names: what the resolvers of one host answer from. Immutable.
#[derive(Debug, Default)]
pub struct NameTable {
    networks: Map<Box<str>, NetworkNames>,
    rejected: Vec<Rejected>,
}

impl NameTable {
    /// Starts a table.
    pub fn builder() -> NameTableBuilder {
        NameTableBuilder::default()
    }

    /// The network named `name`, if the snapshot had it.
    #[inline]
    pub fn network(&self, name: &str) -> Option<&NetworkNames> {
        self.networks.get(name)
    }

    /// Every network, in no particular order.
    pub fn networks(&self) -> impl Iterator<Item = &NetworkNames> {
        self.networks.values()
    }

    /// The names left out because they are not DNS names.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }
}

/// What a name of a network's table stands for.
#[derive(Debug, Clone)]
pub enum Hit<'t> {
    /// A name, alias or `NAME.NETWORK`: the addresses of every endpoint that has it.
    Addresses(&'t [Ipv4Addr]),
    /// A reverse name (`d.c.b.a.in-addr.arpa`) of an endpoint address: the names to answer.
    Pointers(PtrNames<'t>),
    /// A service's `_PORT._PROTO.NAME`: its SRV targets, and the network's name to add to
    /// them (if it is a DNS name).
    Services(&'t [Target], Option<&'t [u8]>),
}

/// One network's names.
#[derive(Debug)]
pub struct NetworkNames {
    name: Box<str>,
    /// The network's name, lower-cased, if it is a DNS name (`NAME.NETWORK` works then).
    suffix: Option<Box<[u8]>>,
    internal: bool,
    by_name: Map<Box<[u8]>, Span>,
    addrs: Box<[Ipv4Addr]>,
    by_addr: Map<Ipv4Addr, Span>,
    /// Spans of `text`: the endpoint names an address points back to.
    ptr_names: Box<[Span]>,
    text: Box<[u8]>,
    /// SRV names (few: one per service port).
    srv: Map<Box<[u8]>, Box<[Target]>>,
}

impl NetworkNames {
    fn from_build(n: NetworkBuild) -> NetworkNames {
        let mut addrs = Vec::with_capacity(n.names.values().map(Vec::len).sum());
        let mut by_name = Map::default();
        by_name.reserve(n.names.len());
        for (key, list) in n.names {
            let start = addrs.len();
            addrs.extend_from_slice(&list);
            by_name.insert(key, Span::of(&addrs, start));
        }
        let mut text = Vec::new();
        let mut ptr_names = Vec::new();
        let mut by_addr = Map::default();
        by_addr.reserve(n.ptr.len());
        for (addr, names) in n.ptr {
            let start = ptr_names.len();
            for name in names {
                let at = text.len();
                text.extend_from_slice(&name);
                ptr_names.push(Span::of(&text, at));
            }
            by_addr.insert(addr, Span::of(&ptr_names, start));
        }
        NetworkNames {
            suffix: normalize(&n.name).ok(),
            name: n.name,
            internal: n.internal,
            by_name,
            addrs: addrs.into_boxed_slice(),
            by_addr,
            ptr_names: ptr_names.into_boxed_slice(),
            text: text.into_boxed_slice(),
            srv: n.srv.into_iter().map(|(k, v)| (k, v.into_boxed_slice())).collect(),
        }
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An internal network never forwards: names it does not have get NXDOMAIN.
    pub fn is_internal(&self) -> bool {
        self.internal
    }

    /// What `text` (lower-case dotted, no trailing dot) stands for on this network.
    #[inline]
    pub fn lookup(&self, text: &[u8]) -> Option<Hit<'_>> {
        if let Some(addr) = parse_reverse(text) {
            let span = self.by_addr.get(&addr)?;
            return Some(Hit::Pointers(PtrNames { names: span.get(&self.ptr_names).iter(), network: self }));
        }
        if text.first() == Some(&b'_') && !self.srv.is_empty() {
            let key = match self.suffix.as_deref() {
                Some(suffix) => text.strip_suffix(suffix).and_then(|p| p.strip_suffix(b".")).unwrap_or(text),
                None => text,
            };
            if let Some(targets) = self.srv.get(key) {
                return Some(Hit::Services(targets, self.suffix.as_deref()));
            }
        }
        self.addresses(text).map(Hit::Addresses)
    }

    /// The addresses of a name, alias or `NAME.NETWORK` (lower-case dotted, no trailing dot).
    #[inline]
    pub fn addresses(&self, text: &[u8]) -> Option<&[Ipv4Addr]> {
        let span = match self.by_name.get(text) {
            Some(span) => span,
            None => {
                let suffix = self.suffix.as_deref()?;
                let prefix = text.strip_suffix(suffix)?.strip_suffix(b".")?;
                self.by_name.get(prefix)?
            }
        };
        Some(span.get(&self.addrs))
    }

    /// The names the network answers and their addresses (for `overlayd dns`), unordered.
    pub fn names(&self) -> impl Iterator<Item = (&str, &[Ipv4Addr])> {
        self.by_name.iter().map(|(k, span)| (std::str::from_utf8(k).unwrap_or_default(), span.get(&self.addrs)))
    }

    /// How many names and aliases the network answers.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// No names at all.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The names a reverse lookup answers, each as the two parts of a PTR target: `[name,
/// network]` (`web1.blue.`), or `[name, b""]` when the network's name is not a DNS name or the
/// whole would be too long.
#[derive(Debug, Clone)]
pub struct PtrNames<'t> {
    names: std::slice::Iter<'t, Span>,
    network: &'t NetworkNames,
}

impl<'t> Iterator for PtrNames<'t> {
    type Item = [&'t [u8]; 2];

    fn next(&mut self) -> Option<Self::Item> {
        let name = self.names.next()?.get(&self.network.text);
        match self.network.suffix.as_deref() {
            Some(suffix) if name.len() + 1 + suffix.len() <= MAX_TEXT_LEN => Some([name, suffix]),
            _ => Some([name, &[]]),
        }
    }
}

/// The address of a reverse name `d.c.b.a.in-addr.arpa` (lower-case text): four decimal
/// octets without leading zeros.
pub fn parse_reverse(text: &[u8]) -> Option<Ipv4Addr> {
    let rest = text.strip_suffix(b".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut labels = rest.split(|&b| b == b'.');
    for o in octets.iter_mut().rev() {
        let label = labels.next()?;
        if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
            return None;
        }
        let mut v = 0u16;
        for &d in label {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (d - b'0') as u16;
        }
        *o = u8::try_from(v).ok()?;
    }
    if labels.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 1, 0, d)
    }

    fn table() -> NameTable {
        let mut b = NameTable::builder();
        b.network("blue", false).endpoint("Web1", ["www", "Front."], ip(2)).endpoint("web2", ["www"], ip(3)).endpoint(
            "db",
            [],
            ip(4),
        );
        b.network("red", true).endpoint("cache", [], ip(9));
        b.build()
    }

    #[test]
    fn names_aliases_and_qualified_names() {
        let t = table();
        let blue = t.network("blue").unwrap();
        assert_eq!(blue.addresses(b"web1"), Some(&[ip(2)][..]));
        assert_eq!(blue.addresses(b"front"), Some(&[ip(2)][..]));
        assert_eq!(blue.addresses(b"web1.blue"), Some(&[ip(2)][..]));
        assert_eq!(blue.addresses(b"front.blue"), Some(&[ip(2)][..]));
        let mut www = blue.addresses(b"www").unwrap().to_vec();
        www.sort();
        assert_eq!(www, vec![ip(2), ip(3)]);
        assert_eq!(blue.addresses(b"www.blue").unwrap().len(), 2);
        for miss in [&b"cache"[..], b"web1.red", b"blue", b".blue", b"web1.blu", b"web1blue", b"web1.blue.blue"] {
            assert!(blue.addresses(miss).is_none(), "{}", String::from_utf8_lossy(miss));
        }
        assert!(t.network("red").unwrap().is_internal());
        assert_eq!(blue.len(), 5);
    }

    #[test]
    fn reverse_names() {
        assert_eq!(parse_reverse(b"2.0.1.10.in-addr.arpa"), Some(ip(2)));
        assert_eq!(parse_reverse(b"255.255.255.255.in-addr.arpa"), Some(Ipv4Addr::BROADCAST));
        for bad in [
            &b"0.1.10.in-addr.arpa"[..],
            b"1.2.0.1.10.in-addr.arpa",
            b"02.0.1.10.in-addr.arpa",
            b"256.0.1.10.in-addr.arpa",
            b"a.0.1.10.in-addr.arpa",
            b".0.1.10.in-addr.arpa",
            b"in-addr.arpa",
            b"2.0.1.10.ip6.arpa",
        ] {
            assert_eq!(parse_reverse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let t = table();
        let blue = t.network("blue").unwrap();
        let Some(Hit::Pointers(mut names)) = blue.lookup(b"2.0.1.10.in-addr.arpa") else { panic!() };
        assert_eq!(names.next(), Some([&b"web1"[..], b"blue"]));
        assert_eq!(names.next(), None);
        assert!(blue.lookup(b"9.0.1.10.in-addr.arpa").is_none(), "red's address is not blue's");
    }

    #[test]
    fn bad_names_are_rejected_and_listed() {
        let mut b = NameTable::builder();
        b.network("blue", false).endpoint("", ["a..b", &"x".repeat(64), "ok"], ip(2));
        let t = b.build();
        let errors: Vec<_> = t.rejected().iter().map(|r| r.error).collect();
        assert_eq!(errors, vec![NameError::Empty, NameError::EmptyLabel, NameError::LabelTooLong]);
        let blue = t.network("blue").unwrap();
        assert_eq!(blue.addresses(b"ok"), Some(&[ip(2)][..]));
        assert!(blue.lookup(b"2.0.1.10.in-addr.arpa").is_none(), "no valid name, no PTR");
        assert_eq!(normalize(&"x.".repeat(127)).unwrap().len(), 253, "the trailing dot is not counted");
        assert_eq!(normalize(&format!("{}xy", "x.".repeat(126))).unwrap_err(), NameError::TooLong);
    }

    #[test]
    fn a_network_whose_name_is_not_a_dns_name_still_answers_plain_names() {
        let mut b = NameTable::builder();
        b.network("a..b", false).endpoint("web1", [], ip(2));
        let t = b.build();
        let n = t.network("a..b").unwrap();
        assert_eq!(n.addresses(b"web1"), Some(&[ip(2)][..]));
        assert!(n.addresses(b"web1.a..b").is_none());
        let Some(Hit::Pointers(mut names)) = n.lookup(b"2.0.1.10.in-addr.arpa") else { panic!() };
        assert_eq!(names.next(), Some([&b"web1"[..], &[][..]]));
    }

    #[test]
    fn the_same_endpoint_twice_is_one_address() {
        let mut b = NameTable::builder();
        b.network("blue", false).endpoint("web1", ["web1"], ip(2)).endpoint("web1", [], ip(2));
        let t = b.build();
        let blue = t.network("blue").unwrap();
        assert_eq!(blue.addresses(b"web1"), Some(&[ip(2)][..]));
        let Some(Hit::Pointers(names)) = blue.lookup(b"2.0.1.10.in-addr.arpa") else { panic!() };
        assert_eq!(names.count(), 1);
    }

    #[test]
    fn a_name_without_a_pointer_back() {
        let mut b = NameTable::builder();
        b.network("blue", false)
            .endpoint("web1", [], Ipv4Addr::new(10, 1, 0, 2))
            .name("web", Ipv4Addr::new(10, 1, 255, 254))
            .name("tasks.web", Ipv4Addr::new(10, 1, 0, 2))
            .name("Tasks.Web", Ipv4Addr::new(10, 1, 0, 2))
            .name("bad..name", Ipv4Addr::new(10, 1, 0, 2));
        let t = b.build();
        let blue = t.network("blue").unwrap();
        assert_eq!(blue.addresses(b"web").unwrap(), [Ipv4Addr::new(10, 1, 255, 254)]);
        assert_eq!(blue.addresses(b"tasks.web.blue").unwrap(), [Ipv4Addr::new(10, 1, 0, 2)], "once, and NAME.NETWORK");
        assert!(blue.lookup(b"254.255.1.10.in-addr.arpa").is_none(), "no PTR for a VIP");
        assert!(matches!(blue.lookup(b"2.0.1.10.in-addr.arpa"), Some(Hit::Pointers(p)) if p.clone().count() == 1));
        assert_eq!(t.rejected().len(), 1);
    }
}
