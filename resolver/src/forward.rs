//! Forwards the names a network does not have to the host's upstream resolvers, with Docker's
//! rules, as a state machine in the manner of quinn-proto: the shell hands it queries, upstream
//! replies and the time, and sends what it returns; it owns no socket and no clock.
//!
//! Per query: a fresh ID (the client's is restored in the reply), upstream 1 first; on a
//! timeout, SERVFAIL or REFUSED the next upstream, with a fresh ID again; any other reply
//! (NXDOMAIN included) goes back to the client as it is; all upstreams failed, or the query's
//! deadline passed → SERVFAIL. Replies are accepted only from the upstream asked, with the ID
//! it was given and the question asked. At most [`ForwarderConfig::max_in_flight`] queries are
//! in flight; beyond that a query gets SERVFAIL at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::counters::{Counters, DropReason};
use crate::wire::{Header, MIN_UDP_PAYLOAD, Question, ResponseWriter, rcode};

/// Upstreams kept from resolv.conf, as glibc's `MAXNS`.
pub const MAX_UPSTREAMS: usize = 3;

/// The port upstreams are asked on (resolv.conf has no port).
pub const DNS_PORT: u16 = 53;

/// The longest query forwarded; longer ones are answered REFUSED. A query is one question
/// (at most 259 bytes) and an OPT record with a few options: 4 KiB is generous, and it bounds
/// what the in-flight table holds (1,024 × 4 KiB) whatever TCP clients send.
pub const MAX_FORWARDED_QUERY_LEN: usize = 4096;

/// The host's upstream resolvers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    ignored: Vec<Ignored>,
}

/// A `nameserver` line of resolv.conf that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The address as written.
    pub text: String,
    /// Why it was not kept.
    pub reason: IgnoreReason,
}

/// Why a `nameserver` was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreReason {
    /// Not an IP address (or no address on the line).
    #[error("not an IP address")]
    NotAnAddress,
    /// An IPv6 address with a zone (`fe80::1%eth0`): the zone names an interface, which only
    /// the shell could resolve to an index.
    #[error("addresses with a zone are not supported")]
    Zone,
    /// 0.0.0.0 or `::`.
    #[error("unspecified address")]
    Unspecified,
    /// One of the addresses the resolvers listen on: forwarding there would loop.
    #[error("the resolver's own address")]
    OwnAddress,
    /// After the first [`MAX_UPSTREAMS`].
    #[error("more than 3 nameservers")]
    TooMany,
}

impl Upstreams {
    /// The `nameserver` lines of a resolv.conf text, in order, at most [`MAX_UPSTREAMS`], on
    /// port 53, leaving out the addresses in `own` (where the resolvers listen).
    ///
    /// Loopback addresses are kept, unlike Docker: Docker's resolver lives in the container's
    /// namespace, where the host's 127.0.0.53 is not; ours forwards from the host's namespace
    /// (it listens on the bridge's gateway address there), so systemd-resolved or a local
    /// dnsmasq answer it as they answer the host.
    pub fn from_resolv_conf(text: &str, own: &[IpAddr]) -> Upstreams {
        let mut u = Upstreams::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            let word = words.next().unwrap_or("");
            let reason = match word.parse::<IpAddr>() {
                _ if word.contains('%') => IgnoreReason::Zone,
                Err(_) => IgnoreReason::NotAnAddress,
                Ok(ip) if ip.is_unspecified() => IgnoreReason::Unspecified,
                Ok(ip) if own.contains(&ip) => IgnoreReason::OwnAddress,
                Ok(_) if u.servers.len() == MAX_UPSTREAMS => IgnoreReason::TooMany,
                Ok(ip) => {
                    u.servers.push(SocketAddr::new(ip, DNS_PORT));
                    continue;
                }
            };
            u.ignored.push(Ignored { text: word.to_owned(), reason });
        }
        u
    }

    /// These servers, the first [`MAX_UPSTREAMS`] of them.
    pub fn new(servers: impl IntoIterator<Item = SocketAddr>) -> Upstreams {
        Upstreams { servers: servers.into_iter().take(MAX_UPSTREAMS).collect(), ignored: Vec::new() }
    }

    /// The servers, in the order they are asked.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The `nameserver` lines left out.
    pub fn ignored(&self) -> &[Ignored] {
        &self.ignored
    }
}

/// Bounds of the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// How long one upstream is given before the next is asked.
    pub attempt_timeout: Duration,
    /// How long a query may take in all, whatever the number of upstreams: then SERVFAIL.
    pub query_timeout: Duration,
    /// Queries in flight at most; more get SERVFAIL at once. At most 32,767 (half the ID
    /// space, so that a fresh ID is found in two draws on average).
    pub max_in_flight: usize,
}

impl Default for ForwarderConfig {
    /// 2 s per upstream (Docker gives 4, and a dead first upstream then costs every lookup
    /// 4 s: moby #32622), 5 s in all (glibc's default timeout, after which the client has
    /// given up anyway), 1,024 in flight (Docker's bound).
    fn default() -> Self {
        ForwarderConfig {
            attempt_timeout: Duration::from_secs(2),
            query_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
        }
    }
}

/// What the shell sends after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit<C> {
    /// Send `out[..len]` (the client's query with our ID) to `upstream`, over the transport
    /// the client used (a UDP reply with TC set goes back to the client, which retries over TCP).
    Upstream {
        /// The upstream to ask.
        upstream: SocketAddr,
        /// Length of the query in `out`.
        len: usize,
        /// The client it is for: after a timeout or a SERVFAIL the shell learns here which
        /// transport the next try takes.
        client: C,
    },
    /// Send `out[..len]` to `client`: the upstream's reply with the client's ID, or SERVFAIL.
    Client {
        /// The client, as the shell gave it to [`Forwarder::forward`].
        client: C,
        /// Length of the reply in `out`.
        len: usize,
    },
}

#[derive(Debug)]
struct Flight<C> {
    client: C,
    client_id: u16,
    /// The ID the current upstream was given.
    id: u16,
    /// How many upstreams were asked, the current one included.
    tries: usize,
    upstream: SocketAddr,
    started: Instant,
    deadline: Instant,
    /// Where the slot sits in `active`.
    active_at: usize,
}

#[derive(Debug)]
struct Slot<C> {
    /// The client's query as it came; its buffer is reused by the next query of the slot.
    query: Vec<u8>,
    flight: Option<Flight<C>>,
}

/// The forwarding state machine of one resolver. `C` is how the shell names a client (its
/// address, and its TCP connection if any); `R` makes the IDs (a cryptographic generator in
/// the shell, such as `rand::rngs::StdRng::from_entropy()`, since IDs are what stops
/// off-path spoofing; a seeded one in tests).
///
/// In steady state it allocates nothing: slots, their query buffers and the ID map are reused.
#[derive(Debug)]
pub struct Forwarder<C, R> {
    upstreams: Upstreams,
    config: ForwarderConfig,
    rng: R,
    slots: Vec<Slot<C>>,
    free: Vec<usize>,
    /// Slots in flight, for the timeout scan.
    active: Vec<usize>,
    ids: HashMap<u16, usize, foldhash::fast::RandomState>,
}

impl<C: Copy, R: RngCore> Forwarder<C, R> {
    /// A forwarder to `upstreams`.
    pub fn new(upstreams: Upstreams, config: ForwarderConfig, rng: R) -> Self {
        let max = config.max_in_flight.min(u16::MAX as usize / 2);
        let config = ForwarderConfig { max_in_flight: max, ..config };
        let mut ids = HashMap::default();
        ids.reserve(max);
        Forwarder {
            upstreams,
            config,
            rng,
            slots: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            active: Vec::with_capacity(max),
            ids,
        }
    }

    /// Replaces the upstreams (resolv.conf changed). Queries in flight go on with the new
    /// list from where they are.
    pub fn set_upstreams(&mut self, upstreams: Upstreams) {
        self.upstreams = upstreams;
    }

    /// The upstreams in use.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Queries waiting for an upstream.
    pub fn in_flight(&self) -> usize {
        self.active.len()
    }

    /// Starts forwarding `query` (which [`crate::Resolver::answer`] said to forward) for
    /// `client`. `out` must hold the query (64 KiB always does).
    pub fn forward(
        &mut self,
        query: &[u8],
        client: C,
        now: Instant,
        out: &mut [u8],
        counters: &mut Counters,
    ) -> Option<Transmit<C>> {
        let Some(header) = Header::new_checked(query).ok().filter(|h| Question::parse(h).is_ok()) else {
            counters.drop(DropReason::NotForwardable);
            return None;
        };
        if query.len() > MAX_FORWARDED_QUERY_LEN {
            counters.forward_query_too_large += 1;
            return error_reply(query, client, rcode::REFUSED, out, counters);
        }
        if self.upstreams.servers.is_empty() {
            counters.forward_no_upstream += 1;
            return servfail(query, client, out, counters);
        }
        if self.active.len() >= self.config.max_in_flight {
            counters.forward_table_full += 1;
            return servfail(query, client, out, counters);
        }
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { query: Vec::new(), flight: None });
                self.slots.len() - 1
            }
        };
        self.slots[slot].query.clear();
        self.slots[slot].query.extend_from_slice(query);
        self.slots[slot].flight = Some(Flight {
            client,
            client_id: header.id(),
            id: 0,
            tries: 0,
            upstream: self.upstreams.servers[0],
            started: now,
            deadline: now,
            active_at: self.active.len(),
        });
        self.active.push(slot);
        self.ask_next(slot, now, out, counters)
    }

    /// Handles a reply that came from `from`. Replies that match no query in flight are
    /// dropped and counted.
    pub fn handle_reply(
        &mut self,
        from: SocketAddr,
        reply: &[u8],
        now: Instant,
        out: &mut [u8],
        counters: &mut Counters,
    ) -> Option<Transmit<C>> {
        let Some(header) = Header::new_checked(reply).ok().filter(|h| h.is_response()) else {
            counters.drop(DropReason::ReplyMalformed);
            return None;
        };
        let Some(&slot) = self.ids.get(&header.id()) else {
            counters.drop(DropReason::ReplyUnknownId);
            return None;
        };
        let Slot { query, flight: Some(flight) } = &self.slots[slot] else {
            counters.drop(DropReason::ReplyUnknownId);
            return None;
        };
        if from != flight.upstream {
            counters.drop(DropReason::ReplyWrongSource);
            return None;
        }
        // Some servers leave the question out of an error reply; when it is there, it must be
        // the one asked (a cheap check against a blind spoofer that guessed the ID).
        if header.qdcount() > 0 {
            let Ok(theirs) = Question::parse_first(reply) else {
                counters.drop(DropReason::ReplyMalformed);
                return None;
            };
            let ours = Question::parse_first(query);
            if !ours.is_ok_and(|ours| ours.same_as(&theirs)) {
                counters.drop(DropReason::ReplyWrongQuestion);
                return None;
            }
        }
        match header.rcode() {
            rcode::SERVFAIL => {
                counters.upstream_servfail += 1;
                self.ask_next(slot, now, out, counters)
            }
            rcode::REFUSED => {
                counters.upstream_refused += 1;
                self.ask_next(slot, now, out, counters)
            }
            code => {
                if out.len() < reply.len() {
                    counters.forward_reply_too_large += 1;
                    return self.fail(slot, out, counters);
                }
                let client_id = flight.client_id;
                let client = flight.client;
                out[..reply.len()].copy_from_slice(reply);
                if let Ok(mut h) = Header::new_checked(&mut out[..reply.len()]) {
                    h.set_id(client_id);
                }
                counters.answer(code);
                self.release(slot);
                Some(Transmit::Client { client, len: reply.len() })
            }
        }
    }

    /// When [`Self::handle_timeout`] should next be called, if anything is in flight.
    /// O(queries in flight).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active.iter().filter_map(|&s| self.slots[s].flight.as_ref()).map(|f| f.deadline).min()
    }

    /// Moves on one query whose upstream's time is up at `now`: the next upstream, or
    /// SERVFAIL to its client. Call it until it returns `None`.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut [u8], counters: &mut Counters) -> Option<Transmit<C>> {
        loop {
            let slot =
                *self.active.iter().find(|&&s| self.slots[s].flight.as_ref().is_some_and(|f| f.deadline <= now))?;
            counters.upstream_timeouts += 1;
            // `ask_next` only returns `None` after releasing the slot (the reply did not fit
            // `out`, counted): look for the next expired one then.
            if let Some(t) = self.ask_next(slot, now, out, counters) {
                return Some(t);
            }
        }
    }

    /// Asks the next upstream for the query of `slot`, or fails it.
    fn ask_next(&mut self, slot: usize, now: Instant, out: &mut [u8], counters: &mut Counters) -> Option<Transmit<C>> {
        let (tries, started, old_id) = match &self.slots[slot].flight {
            Some(f) => (f.tries, f.started, f.id),
            None => return None,
        };
        if tries > 0 {
            self.ids.remove(&old_id);
        }
        if out.len() < self.slots[slot].query.len() {
            counters.drop(DropReason::OutputTooSmall);
            return self.fail(slot, out, counters);
        }
        let give_up = now.saturating_duration_since(started) >= self.config.query_timeout;
        let Some(&upstream) = self.upstreams.servers.get(tries).filter(|_| !give_up) else {
            counters.forward_failed += 1;
            return self.fail(slot, out, counters);
        };
        let id = loop {
            // At most half the ID space is in use, so this ends after 2 draws on average.
            let id = self.rng.next_u32() as u16;
            if !self.ids.contains_key(&id) {
                break id;
            }
        };
        self.ids.insert(id, slot);
        let Slot { query, flight: Some(f) } = &mut self.slots[slot] else { return None };
        let client = f.client;
        f.id = id;
        f.tries = tries + 1;
        f.upstream = upstream;
        f.deadline = (now + self.config.attempt_timeout).min(started + self.config.query_timeout);
        out[..query.len()].copy_from_slice(query);
        out[..2].copy_from_slice(&id.to_be_bytes());
        counters.upstream_queries += 1;
        Some(Transmit::Upstream { upstream, len: query.len(), client })
    }

    /// Answers the client of `slot` SERVFAIL and frees the slot.
    fn fail(&mut self, slot: usize, out: &mut [u8], counters: &mut Counters) -> Option<Transmit<C>> {
        let client = self.slots[slot].flight.as_ref()?.client;
        let t = servfail(&self.slots[slot].query, client, out, counters);
        self.release(slot);
        t
    }

    fn release(&mut self, slot: usize) {
        let Some(f) = self.slots[slot].flight.take() else { return };
        if f.tries > 0 && self.ids.get(&f.id) == Some(&slot) {
            self.ids.remove(&f.id);
        }
        self.active.swap_remove(f.active_at);
        if let Some(&moved) = self.active.get(f.active_at)
            && let Some(m) = self.slots[moved].flight.as_mut()
        {
            m.active_at = f.active_at;
        }
        self.free.push(slot);
    }
}

/// SERVFAIL for `query`: its ID and question, RA set.
fn servfail<C>(query: &[u8], client: C, out: &mut [u8], counters: &mut Counters) -> Option<Transmit<C>> {
    error_reply(query, client, rcode::SERVFAIL, out, counters)
}

/// A reply with `rcode` and no records for `query`: its ID and question, RA set.
fn error_reply<C>(query: &[u8], client: C, rcode: u8, out: &mut [u8], counters: &mut Counters) -> Option<Transmit<C>> {
    let header = Header::new_checked(query).ok()?;
    let question = Question::parse(&header).ok()?;
    let Ok(mut w) = ResponseWriter::new(out, MIN_UDP_PAYLOAD, &header, rcode, true) else {
        counters.drop(DropReason::OutputTooSmall);
        return None;
    };
    if w.question(&question).is_err() {
        counters.drop(DropReason::OutputTooSmall);
        return None;
    }
    counters.answer(rcode);
    Some(Transmit::Client { client, len: w.finish() })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{Message, ResponseCode};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::wire::tests::query;
    use crate::wire::{CLASS_IN, rtype};

    type Client = u32;

    fn up(i: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)), 53)
    }

    fn fwd(n: u8) -> Forwarder<Client, StdRng> {
        Forwarder::new(Upstreams::new((1..=n).map(up)), ForwarderConfig::default(), StdRng::seed_from_u64(7))
    }

    /// The upstream's reply to `sent` (the query as forwarded): same ID and question.
    fn reply_to(sent: &[u8], rcode: u8) -> Vec<u8> {
        let mut r = sent.to_vec();
        r[2] |= 0x80;
        r[3] = 0x80 | rcode;
        r
    }

    struct Run {
        f: Forwarder<Client, StdRng>,
        c: Counters,
        out: Vec<u8>,
        t0: Instant,
    }

    impl Run {
        fn new(upstreams: u8) -> Run {
            Run { f: fwd(upstreams), c: Counters::default(), out: vec![0; 65535], t0: Instant::now() }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Forwards a query for `name` from client `client` at `ms`; returns the query sent.
        fn forward(&mut self, client: Client, name: &str, ms: u64) -> (SocketAddr, Vec<u8>) {
            let q = query(0x1111, name, rtype::A, CLASS_IN, None);
            let now = self.at(ms);
            match self.f.forward(&q, client, now, &mut self.out, &mut self.c) {
                Some(Transmit::Upstream { upstream, len, client: c }) => {
                    assert_eq!(c, client, "the transmit names its client");
                    (upstream, self.out[..len].to_vec())
                }
                other => panic!("{other:?}"),
            }
        }

        fn reply(&mut self, from: SocketAddr, reply: &[u8], ms: u64) -> Option<(Transmit<Client>, Vec<u8>)> {
            let now = self.at(ms);
            let t = self.f.handle_reply(from, reply, now, &mut self.out, &mut self.c)?;
            let len = match t {
                Transmit::Upstream { len, .. } | Transmit::Client { len, .. } => len,
            };
            Some((t, self.out[..len].to_vec()))
        }

        fn timeout(&mut self, ms: u64) -> Option<(Transmit<Client>, Vec<u8>)> {
            let now = self.at(ms);
            let t = self.f.handle_timeout(now, &mut self.out, &mut self.c)?;
            let len = match t {
                Transmit::Upstream { len, .. } | Transmit::Client { len, .. } => len,
            };
            Some((t, self.out[..len].to_vec()))
        }
    }

    fn id(m: &[u8]) -> u16 {
        u16::from_be_bytes([m[0], m[1]])
    }

    #[test]
    fn the_reply_goes_back_with_the_clients_id() {
        let mut r = Run::new(2);
        let (to, sent) = r.forward(5, "example.com", 0);
        assert_eq!(to, up(1));
        let original = query(0x1111, "example.com", rtype::A, CLASS_IN, None);
        assert_eq!(&sent[2..], &original[2..], "only the ID changes");
        assert_eq!(r.f.in_flight(), 1);
        let (t, back) = r.reply(up(1), &reply_to(&sent, rcode::NOERROR), 10).unwrap();
        assert_eq!(t, Transmit::Client { client: 5, len: sent.len() });
        assert_eq!(id(&back), 0x1111);
        assert_eq!(r.f.in_flight(), 0);
        assert_eq!(r.f.poll_timeout(), None);
        assert_eq!((r.c.upstream_queries, r.c.answered(rcode::NOERROR)), (1, 1));
    }

    #[test]
    fn nxdomain_is_returned_as_is_without_asking_the_next_upstream() {
        let mut r = Run::new(3);
        let (_, sent) = r.forward(5, "nope.example", 0);
        let (t, back) = r.reply(up(1), &reply_to(&sent, rcode::NXDOMAIN), 10).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
        assert_eq!(Message::from_vec(&back).unwrap().response_code(), ResponseCode::NXDomain);
        assert_eq!((r.c.upstream_queries, r.c.answered(rcode::NXDOMAIN)), (1, 1));
    }

    #[test]
    fn servfail_and_refused_move_to_the_next_upstream_then_servfail() {
        let mut r = Run::new(3);
        let (_, first) = r.forward(5, "example.com", 0);
        let (t, second) = r.reply(up(1), &reply_to(&first, rcode::SERVFAIL), 10).unwrap();
        assert_eq!(t, Transmit::Upstream { upstream: up(2), len: first.len(), client: 5 });
        assert_ne!(id(&first), id(&second), "a fresh ID per upstream");
        // Upstream 1 answering late is not listened to any more.
        assert!(r.reply(up(1), &reply_to(&first, rcode::NOERROR), 20).is_none());
        assert_eq!(r.c.dropped_for(DropReason::ReplyUnknownId), 1);
        let (t, third) = r.reply(up(2), &reply_to(&second, rcode::REFUSED), 30).unwrap();
        assert_eq!(t, Transmit::Upstream { upstream: up(3), len: first.len(), client: 5 });
        let (t, back) = r.reply(up(3), &reply_to(&third, rcode::SERVFAIL), 40).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
        let m = Message::from_vec(&back).unwrap();
        assert_eq!((m.id(), m.response_code(), m.queries().len()), (0x1111, ResponseCode::ServFail, 1));
        assert_eq!((r.c.upstream_servfail, r.c.upstream_refused, r.c.forward_failed), (2, 1, 1));
        assert_eq!((r.c.upstream_queries, r.c.answered(rcode::SERVFAIL), r.f.in_flight()), (3, 1, 0));
    }

    #[test]
    fn timeouts_move_on_and_the_whole_query_is_bounded() {
        let mut r = Run::new(3);
        let (_, first) = r.forward(5, "slow.example", 0);
        assert_eq!(r.f.poll_timeout(), Some(r.at(2000)));
        assert!(r.timeout(1999).is_none(), "not yet");
        let (t, second) = r.timeout(2000).unwrap();
        assert_eq!(t, Transmit::Upstream { upstream: up(2), len: first.len(), client: 5 });
        assert!(r.timeout(2000).is_none());
        assert_eq!(r.f.poll_timeout(), Some(r.at(4000)));
        let (t, _) = r.timeout(4000).unwrap();
        assert_eq!(t, Transmit::Upstream { upstream: up(3), len: first.len(), client: 5 });
        assert_eq!(r.f.poll_timeout(), Some(r.at(5000)), "third try cut to the 5 s deadline");
        let (t, back) = r.timeout(5000).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
        assert_eq!(Message::from_vec(&back).unwrap().response_code(), ResponseCode::ServFail);
        assert_eq!((r.c.upstream_timeouts, r.c.forward_failed, r.f.in_flight()), (3, 1, 0));
        assert!(r.reply(up(2), &reply_to(&second, 0), 5001).is_none(), "too late");
    }

    #[test]
    fn a_servfail_after_the_deadline_does_not_start_another_try() {
        let mut r = Run::new(3);
        r.forward(5, "example.com", 0);
        let (_, second) = r.timeout(2000).unwrap();
        // Upstream 2 answers SERVFAIL just at the 5 s deadline (its timer was 4 s, but say the
        // shell was late): no third try.
        let (t, _) = r.reply(up(2), &reply_to(&second, rcode::SERVFAIL), 5000).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
    }

    #[test]
    fn replies_that_match_nothing_are_dropped_and_counted() {
        let mut r = Run::new(2);
        let (_, sent) = r.forward(5, "example.com", 0);
        let good = reply_to(&sent, 0);
        assert!(r.reply(up(2), &good, 1).is_none());
        assert_eq!(r.c.dropped_for(DropReason::ReplyWrongSource), 1);
        let mut other_id = good.clone();
        other_id[0] ^= 0xff;
        assert!(r.reply(up(1), &other_id, 1).is_none());
        assert_eq!(r.c.dropped_for(DropReason::ReplyUnknownId), 1);
        let other_q = reply_to(&query(id(&sent), "example.org", 1, 1, None), 0);
        assert!(r.reply(up(1), &other_q, 1).is_none());
        assert_eq!(r.c.dropped_for(DropReason::ReplyWrongQuestion), 1);
        assert!(r.reply(up(1), &sent, 1).is_none(), "QR clear");
        assert!(r.reply(up(1), &good[..11], 1).is_none());
        assert_eq!(r.c.dropped_for(DropReason::ReplyMalformed), 2);
        // Still in flight, and the real reply still gets through, question in any case.
        let mut upper = good.clone();
        upper[13..20].make_ascii_uppercase();
        assert!(matches!(r.reply(up(1), &upper, 2), Some((Transmit::Client { client: 5, .. }, _))));
        // A reply without a question (some servers' errors) is accepted on ID and source.
        let (_, sent) = r.forward(6, "example.com", 3);
        let mut bare = reply_to(&sent, rcode::NOTIMP);
        bare[5] = 0;
        bare.truncate(12);
        assert!(matches!(r.reply(up(1), &bare, 4), Some((Transmit::Client { client: 6, .. }, _))));
    }

    #[test]
    fn a_full_table_and_no_upstream_answer_servfail_at_once() {
        let mut r = Run::new(1);
        r.f = Forwarder::new(
            Upstreams::new([up(1)]),
            ForwarderConfig { max_in_flight: 4, ..Default::default() },
            StdRng::seed_from_u64(1),
        );
        let sent: Vec<_> = (0..4).map(|c| r.forward(c, "example.com", 0).1).collect();
        let ids: std::collections::HashSet<_> = sent.iter().map(|s| id(s)).collect();
        assert_eq!(ids.len(), 4, "IDs in flight are unique");
        let q = query(0x2222, "example.com", 1, 1, None);
        let t = r.f.forward(&q, 9, r.t0, &mut r.out, &mut r.c).unwrap();
        assert!(matches!(t, Transmit::Client { client: 9, .. }));
        assert_eq!((id(&r.out), r.out[3] & 0x0f), (0x2222, rcode::SERVFAIL));
        assert_eq!(r.c.forward_table_full, 1);
        // One answered: room again, and the slot is reused.
        r.reply(up(1), &reply_to(&sent[2], 0), 1).unwrap();
        let (_, again) = r.forward(9, "example.com", 2);
        assert_eq!(r.f.in_flight(), 4);
        assert_eq!(r.f.slots.len(), 4);
        // Every remaining one is answered by its own ID.
        for s in [&sent[0], &sent[1], &sent[3], &again] {
            assert!(r.reply(up(1), &reply_to(s, 0), 3).is_some());
        }
        assert_eq!(r.f.in_flight(), 0);

        let mut none = Run::new(0);
        let t = none.f.forward(&q, 9, none.t0, &mut none.out, &mut none.c).unwrap();
        assert!(matches!(t, Transmit::Client { client: 9, .. }));
        assert_eq!(none.c.forward_no_upstream, 1);
    }

    #[test]
    fn a_reply_larger_than_the_buffer_is_servfail() {
        let mut r = Run::new(1);
        let (_, sent) = r.forward(5, "example.com", 0);
        let mut big = reply_to(&sent, 0);
        big.resize(70_000, 0);
        let (t, back) = r.reply(up(1), &big, 1).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
        assert_eq!(back[3] & 0x0f, rcode::SERVFAIL);
        assert_eq!(r.c.forward_reply_too_large, 1);
    }

    #[test]
    fn new_upstreams_apply_to_queries_in_flight() {
        let mut r = Run::new(1);
        let (_, sent) = r.forward(5, "example.com", 0);
        r.f.set_upstreams(Upstreams::new([up(8), up(9)]));
        let (t, _) = r.reply(up(1), &reply_to(&sent, rcode::SERVFAIL), 1).unwrap();
        assert_eq!(t, Transmit::Upstream { upstream: up(9), len: sent.len(), client: 5 }, "the second of the new list");
    }

    #[test]
    fn malformed_queries_are_not_forwarded() {
        let mut r = Run::new(1);
        let q = query(1, "example.com", 1, 1, None);
        assert!(r.f.forward(&q[..q.len() - 1], 5, r.t0, &mut r.out, &mut r.c).is_none());
        assert!(r.f.forward(&q[..5], 5, r.t0, &mut r.out, &mut r.c).is_none());
        assert_eq!((r.c.dropped_for(DropReason::NotForwardable), r.f.in_flight()), (2, 0));
        let mut long = query(1, "example.com", 1, 1, Some(1232));
        long[11] = 2;
        long.extend_from_slice(&[0, 0, 16, 0, 1, 0, 0, 0, 0, 0x10, 0x00]);
        long.resize(long.len() + 4096, 0);
        let t = r.f.forward(&long, 5, r.t0, &mut r.out, &mut r.c).unwrap();
        assert!(matches!(t, Transmit::Client { client: 5, .. }));
        assert_eq!((r.out[3] & 0x0f, r.c.forward_query_too_large), (rcode::REFUSED, 1));
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch corp.example\nnameserver 127.0.0.53\n  nameserver\t10.0.0.1 # office\n\
                    ;nameserver 9.9.9.9\nnameserver fe80::1%eth0\nnameserver 0.0.0.0\nnameserver 10.9.0.1\n\
                    nameserver bogus\nnameserver\nnameserver 2001:db8::53\nnameserver 1.1.1.1\noptions ndots:2\n";
        let u = Upstreams::from_resolv_conf(text, &["10.9.0.1".parse().unwrap()]);
        let want: Vec<SocketAddr> =
            ["127.0.0.53:53", "10.0.0.1:53", "[2001:db8::53]:53"].map(|s| s.parse().unwrap()).into();
        assert_eq!(u.servers(), &want[..], "loopback kept, at most 3");
        let ignored: Vec<_> = u.ignored().iter().map(|i| (i.text.as_str(), i.reason)).collect();
        assert_eq!(
            ignored,
            vec![
                ("fe80::1%eth0", IgnoreReason::Zone),
                ("0.0.0.0", IgnoreReason::Unspecified),
                ("10.9.0.1", IgnoreReason::OwnAddress),
                ("bogus", IgnoreReason::NotAnAddress),
                ("", IgnoreReason::NotAnAddress),
                ("1.1.1.1", IgnoreReason::TooMany),
            ]
        );
        assert!(Upstreams::from_resolv_conf("", &[]).servers().is_empty());
    }
}
