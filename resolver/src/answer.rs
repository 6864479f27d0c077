//! Answers a query from a network's names with Docker's semantics, or tells the shell to
//! forward it or drop it. Query bytes in, reply bytes out into the caller's buffer; randomness
//! (the order of several addresses) is passed in.

use rand::Rng;

use crate::counters::{Counters, DropReason};
use crate::names::{Hit, NameTable, NetworkNames};
use crate::wire::{
    self, A_RECORD_LEN, CLASS_IN, Edns, Header, MAX_MESSAGE_LEN, MAX_TEXT_LEN, MIN_UDP_PAYLOAD, OPCODE_QUERY, Question,
    ResponseWriter, rcode, rtype,
};

/// The TTL of our answers unless configured: short, as CoreDNS's 5 s, so that a container
/// that went away leaves clients' caches quickly (Docker's 600 s is a common complaint).
pub const DEFAULT_TTL: u32 = 5;

/// The largest UDP reply unless configured, whatever a client's EDNS says: the DNS flag day
/// 2020 value, which fits in one unfragmented datagram on any path.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1232;

/// How a [`Resolver`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverConfig {
    /// TTL of every record answered, in seconds.
    pub ttl: u32,
    /// The cap on a UDP reply's size when the query's EDNS offers more (at least 512). It is
    /// also the size advertised in our OPT record.
    pub max_udp_payload: u16,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig { ttl: DEFAULT_TTL, max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD }
    }
}

/// How the query came, which bounds the reply's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A datagram: the reply fits 512 bytes, or the query's EDNS size capped by
    /// [`ResolverConfig::max_udp_payload`]; what does not fit is left out and TC is set.
    Udp,
    /// A TCP message (the shell adds the 2-byte length prefix): up to 65,535 bytes.
    Tcp,
}

/// What the shell does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send `out[..len]` to the client: an answer, NODATA, or an error reply (FORMERR,
    /// NOTIMP, REFUSED).
    Answer {
        /// Length of the reply in `out`.
        len: usize,
    },
    /// The name is not on the network and the network is internal, so it is not forwarded:
    /// `out[..len]` holds NXDOMAIN; send it to the client.
    ///
    /// NXDOMAIN rather than REFUSED: with a search list, glibc stops searching at the first
    /// REFUSED (`NO_RECOVERY`) but goes on after NXDOMAIN, so `web1` must not be lost because
    /// `web1.corp.example` was tried first; and for a container on an internal network, a name
    /// outside it does not exist.
    NotFoundInternal {
        /// Length of the reply in `out`.
        len: usize,
    },
    /// Not a name of the network: hand the query, unchanged, to the
    /// [`Forwarder`](crate::Forwarder). Nothing was written.
    Forward,
    /// Send nothing.
    Drop(DropReason),
}

impl Outcome {
    /// The length of the reply to send, if there is one.
    pub fn reply_len(&self) -> Option<usize> {
        match *self {
            Outcome::Answer { len } | Outcome::NotFoundInternal { len } => Some(len),
            Outcome::Forward | Outcome::Drop(_) => None,
        }
    }
}

/// Answers queries for the names of one network. Holds only its configuration, so one
/// resolver can serve every network of a host, from any thread.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    config: ResolverConfig,
}

impl Resolver {
    /// A resolver with this configuration (`max_udp_payload` is raised to 512 if lower).
    pub fn new(mut config: ResolverConfig) -> Resolver {
        config.max_udp_payload = config.max_udp_payload.max(MIN_UDP_PAYLOAD as u16);
        Resolver { config }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    /// Answers `query`, which a client of `network` sent over `transport`, from `table`,
    /// writing any reply into `out` (64 KiB always suffices; the reply never exceeds `out`).
    ///
    /// The rules (Docker's embedded resolver, as users know it):
    /// - A (or ANY) for a name, an alias or `NAME.NETWORK` of `network`: every address that
    ///   has it, shuffled per query, TTL [`ResolverConfig::ttl`], AA set;
    /// - PTR (or ANY) for `d.c.b.a.in-addr.arpa` of an endpoint address of `network`:
    ///   `name.NETWORK.`;
    /// - any other type for such a name (AAAA above all): NOERROR with no answer, not
    ///   forwarded;
    /// - any other name, including one that exists only on another network: forwarded, or
    ///   NXDOMAIN on an internal network ([`Outcome::NotFoundInternal`]);
    /// - a class other than IN, or a network the table does not have: REFUSED (a well-formed
    ///   query we choose not to serve, not an unimplemented feature, hence not NOTIMP);
    /// - an opcode other than QUERY: NOTIMP; QDCOUNT ≠ 1 or a malformed message after the
    ///   header: FORMERR, counted by reason;
    /// - a message with QR set, or shorter than a header: dropped, counted by reason.
    ///
    /// It allocates nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn answer<R: Rng + ?Sized>(
        &self,
        table: &NameTable,
        network: &str,
        query: &[u8],
        transport: Transport,
        rng: &mut R,
        out: &mut [u8],
        counters: &mut Counters,
    ) -> Outcome {
        counters.queries += 1;
        let Ok(header) = Header::new_checked(query) else {
            counters.drop(DropReason::ShortQuery);
            return Outcome::Drop(DropReason::ShortQuery);
        };
        if header.is_response() {
            counters.drop(DropReason::NotAQuery);
            return Outcome::Drop(DropReason::NotAQuery);
        }
        let net = table.network(network);
        let reply = Reply {
            header: &header,
            recursion_available: net.is_some_and(|n| !n.is_internal()),
            udp_payload: self.config.max_udp_payload,
        };
        if header.opcode() != OPCODE_QUERY {
            return reply.error(None, None, rcode::NOTIMP, out, counters);
        }
        let question = match Question::parse(&header) {
            Ok(q) => q,
            Err(e) => {
                counters.malformed[e as usize] += 1;
                return reply.error(None, None, rcode::FORMERR, out, counters);
            }
        };
        let edns = match wire::find_edns(&header, question.end) {
            Ok(edns) => edns,
            Err(e) => {
                counters.malformed[e as usize] += 1;
                return reply.error(Some(&question), None, rcode::FORMERR, out, counters);
            }
        };
        if question.qclass != CLASS_IN {
            counters.refused_class += 1;
            return reply.error(Some(&question), edns, rcode::REFUSED, out, counters);
        }
        let Some(net) = net else {
            counters.unknown_network += 1;
            return reply.error(Some(&question), edns, rcode::REFUSED, out, counters);
        };
        let limit = match (transport, edns) {
            (Transport::Tcp, _) => MAX_MESSAGE_LEN,
            (Transport::Udp, None) => MIN_UDP_PAYLOAD,
            (Transport::Udp, Some(e)) => {
                (e.udp_payload as usize).clamp(MIN_UDP_PAYLOAD, self.config.max_udp_payload as usize)
            }
        };
        self.answer_from(net, &reply, &question, edns, limit, rng, out, counters)
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_from<R: Rng + ?Sized>(
        &self,
        net: &NetworkNames,
        reply: &Reply<'_, '_>,
        question: &Question<'_>,
        edns: Option<Edns>,
        limit: usize,
        rng: &mut R,
        out: &mut [u8],
        counters: &mut Counters,
    ) -> Outcome {
        let mut text = [0u8; MAX_TEXT_LEN];
        let hit = question.name.lower_text(&mut text).and_then(|t| net.lookup(t));
        let Some(hit) = hit else {
            if !net.is_internal() {
                counters.forwarded += 1;
                return Outcome::Forward;
            }
            counters.internal_nxdomain += 1;
            return match reply.error(Some(question), edns, rcode::NXDOMAIN, out, counters) {
                Outcome::Answer { len } => Outcome::NotFoundInternal { len },
                other => other,
            };
        };
        let Some(mut w) = reply.start(Some(question), edns, rcode::NOERROR, limit, out) else {
            counters.drop(DropReason::OutputTooSmall);
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        w.set_authoritative(true);
        let ttl = self.config.ttl;
        let mut truncated = false;
        match hit {
            Hit::Addresses(addrs) if matches!(question.qtype, rtype::A | rtype::ANY) => {
                let n = addrs.len();
                let fit = n.min(w.room() / A_RECORD_LEN);
                // All of them if they fit; else `fit` of them from a random point on, so each
                // address is left out equally often (the client retries over TCP anyway).
                let first = if fit < n { rng.gen_range(0..n) } else { 0 };
                let answers_at = w.len();
                for i in 0..fit {
                    // Cannot fail: `fit` records fit.
                    let _ = w.a(ttl, addrs[(first + i) % n]);
                }
                w.shuffle_a(answers_at, rng);
                truncated = fit < n;
            }
            Hit::Services(targets, suffix) if matches!(question.qtype, rtype::SRV | rtype::ANY) => {
                for t in targets {
                    if w.srv(ttl, 0, 10, t.port, &[&t.name, suffix.unwrap_or_default()]).is_err() {
                        truncated = true;
                        break;
                    }
                }
            }
            Hit::Pointers(targets) if matches!(question.qtype, rtype::PTR | rtype::ANY) => {
                for target in targets {
                    if w.ptr(ttl, &target).is_err() {
                        truncated = true;
                        break;
                    }
                }
            }
            _ => counters.nodata += 1,
        }
        if truncated {
            w.set_truncated();
            counters.truncated += 1;
        }
        counters.answer(rcode::NOERROR);
        Outcome::Answer { len: w.finish() }
    }
}

/// The parts of a reply every path shares.
struct Reply<'h, 'q> {
    header: &'h Header<&'q [u8]>,
    recursion_available: bool,
    /// The UDP size our OPT record advertises.
    udp_payload: u16,
}

impl Reply<'_, '_> {
    /// A writer with the header, the question (if any) and room for our OPT record (if the
    /// query had one, and it fits); `None` if `out` cannot hold the header and the question.
    fn start<'o>(
        &self,
        question: Option<&Question<'_>>,
        edns: Option<Edns>,
        rcode: u8,
        limit: usize,
        out: &'o mut [u8],
    ) -> Option<ResponseWriter<'o>> {
        let mut w = ResponseWriter::new(out, limit, self.header, rcode, self.recursion_available).ok()?;
        if let Some(q) = question {
            w.question(q).ok()?;
        }
        if let Some(e) = edns {
            // Without room for it the reply goes without; it is never the case at 512 bytes.
            let _ = w.edns(self.udp_payload, e.dnssec_ok);
        }
        Some(w)
    }

    /// A reply with no answer: an error, or NXDOMAIN on an internal network (authoritative).
    fn error(
        &self,
        question: Option<&Question<'_>>,
        edns: Option<Edns>,
        rcode: u8,
        out: &mut [u8],
        counters: &mut Counters,
    ) -> Outcome {
        let Some(mut w) = self.start(question, edns, rcode, MIN_UDP_PAYLOAD, out) else {
            counters.drop(DropReason::OutputTooSmall);
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        w.set_authoritative(rcode == rcode::NXDOMAIN);
        counters.answer(rcode);
        Outcome::Answer { len: w.finish() }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    use hickory_proto::op::{Edns as HEdns, Message, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
    use hickory_proto::serialize::binary::BinEncodable;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::wire::WireError;
    use crate::wire::tests::query;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 1, 0, d)
    }

    /// blue: web1 (aliases www, front), web2 (www), db, and 100 endpoints with the alias
    /// "many"; red (internal): cache.
    fn table() -> NameTable {
        let mut b = NameTable::builder();
        let mut blue = b.network("blue", false);
        blue.endpoint("web1", ["www", "Front"], ip(2)).endpoint("web2", ["www"], ip(3)).endpoint("db", [], ip(4));
        for i in 0..100u8 {
            blue.endpoint(&format!("m{i}"), ["many"], Ipv4Addr::new(10, 1, 1, i));
        }
        blue.name("api", ip(250)).srv("_80._tcp.api", 80, "api").srv("_53._udp.api", 53, "api");
        blue.srv("_5432._tcp.pg", 5432, "db").srv("_5432._tcp.pg", 5432, "web2");
        b.network("red", true).endpoint("cache", [], Ipv4Addr::new(10, 2, 0, 2));
        b.build()
    }

    struct Asked {
        outcome: Outcome,
        /// The reply as hickory reads it, if there is one.
        msg: Option<Message>,
        len: usize,
        counters: Counters,
    }

    fn ask_with(resolver: &Resolver, network: &str, q: &[u8], transport: Transport, seed: u64) -> Asked {
        let mut out = vec![0u8; 65535];
        let mut counters = Counters::default();
        let mut rng = StdRng::seed_from_u64(seed);
        let outcome = resolver.answer(&table(), network, q, transport, &mut rng, &mut out, &mut counters);
        let len = outcome.reply_len().unwrap_or(0);
        let msg = outcome.reply_len().map(|len| Message::from_vec(&out[..len]).expect("hickory parses the reply"));
        Asked { outcome, msg, len, counters }
    }

    fn ask(network: &str, name: &str, qtype: u16) -> Asked {
        ask_with(&Resolver::default(), network, &query(0x1234, name, qtype, CLASS_IN, None), Transport::Udp, 1)
    }

    fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> =
            m.answers().iter().map(|r| if let RData::A(a) = r.data() { a.0 } else { panic!("{r:?}") }).collect();
        v.sort();
        v
    }

    #[test]
    fn names_aliases_and_qualified_names_answer_a_with_the_question_case() {
        for (name, want) in [
            ("web1", vec![ip(2)]),
            ("WEB1.", vec![ip(2)]),
            ("front", vec![ip(2)]),
            ("web1.blue", vec![ip(2)]),
            ("Front.BLUE.", vec![ip(2)]),
            ("www", vec![ip(2), ip(3)]),
            ("www.blue", vec![ip(2), ip(3)]),
        ] {
            let a = ask("blue", name, rtype::A);
            let m = a.msg.unwrap();
            assert_eq!(m.id(), 0x1234);
            assert_eq!(m.response_code(), ResponseCode::NoError, "{name}");
            assert!(m.authoritative() && m.recursion_available() && m.recursion_desired() && !m.truncated());
            assert_eq!(m.op_code(), OpCode::Query);
            assert_eq!(addrs(&m), want, "{name}");
            assert_eq!(m.queries()[0].name().to_string().trim_end_matches('.'), name.trim_end_matches('.'));
            for r in m.answers() {
                // Owner = the question's name as asked (0x20 case randomisation survives).
                assert_eq!(r.name().to_string().trim_end_matches('.'), name.trim_end_matches('.'));
                assert_eq!((r.ttl(), r.dns_class()), (DEFAULT_TTL, DNSClass::IN));
            }
            assert_eq!((a.counters.queries, a.counters.answered(rcode::NOERROR)), (1, 1));
        }
    }

    #[test]
    fn a_query_built_by_hickory_is_answered() {
        let mut q = Message::new();
        q.set_id(77)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_str("web2.blue.").unwrap(), RecordType::A));
        let mut edns = HEdns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        q.set_edns(edns);
        let a = ask_with(&Resolver::default(), "blue", &q.to_bytes().unwrap(), Transport::Udp, 1);
        let m = a.msg.unwrap();
        assert_eq!((m.id(), addrs(&m)), (77, vec![ip(3)]));
        let e = m.extensions().as_ref().expect("OPT echoed");
        assert_eq!(e.max_payload(), DEFAULT_MAX_UDP_PAYLOAD);
        assert!(e.flags().dnssec_ok, "DO copied (RFC 3225)");
    }

    #[test]
    fn several_addresses_are_shuffled_per_query() {
        let q = query(1, "many", rtype::A, CLASS_IN, None);
        let tcp = |seed| {
            let m = ask_with(&Resolver::default(), "blue", &q, Transport::Tcp, seed).msg.unwrap();
            m.answers().iter().map(|r| r.data().to_string()).collect::<Vec<_>>()
        };
        let orders: std::collections::HashSet<_> = (0..20).map(tcp).collect();
        assert!(orders.len() > 15, "20 queries, {} orders", orders.len());
        let m = ask_with(&Resolver::default(), "blue", &q, Transport::Tcp, 3).msg.unwrap();
        let want: Vec<_> = (0..100).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect();
        assert_eq!(addrs(&m), want, "every one of them, once");
        let firsts: std::collections::HashSet<_> = (0..50)
            .map(|s| {
                ask_with(&Resolver::default(), "blue", &query(1, "www", 1, 1, None), Transport::Udp, s)
                    .msg
                    .unwrap()
                    .answers()[0]
                    .data()
                    .to_string()
            })
            .collect();
        assert_eq!(firsts.len(), 2, "either of two comes first");
    }

    #[test]
    fn udp_replies_that_do_not_fit_are_truncated_with_tc() {
        // No EDNS: 512 bytes. Header 12 + question 10 → 490 / 16 = 30 records.
        let a = ask("blue", "many", rtype::A);
        let m = a.msg.unwrap();
        assert!(m.truncated() && a.len <= 512);
        assert_eq!(m.answers().len(), 30);
        let got = addrs(&m);
        assert!(got.windows(2).all(|w| w[0] < w[1]) && got.iter().all(|a| a.octets()[2] == 1));
        assert_eq!(a.counters.truncated, 1);

        // EDNS 4096 is capped at 1232: (1232 - 22 - 11) / 16 = 74 records.
        let a = ask_with(&Resolver::default(), "blue", &query(1, "many", 1, 1, Some(4096)), Transport::Udp, 1);
        assert!(a.len <= 1232);
        assert_eq!((a.msg.as_ref().unwrap().answers().len(), a.msg.unwrap().truncated()), (74, true));
        // An EDNS size under 512 counts as 512.
        let a = ask_with(&Resolver::default(), "blue", &query(1, "many", 1, 1, Some(100)), Transport::Udp, 1);
        assert_eq!(a.msg.unwrap().answers().len(), (512 - 22 - 11) / 16);
        // A larger cap, configured.
        let big = Resolver::new(ResolverConfig { max_udp_payload: 4096, ..Default::default() });
        let a = ask_with(&big, "blue", &query(1, "many", 1, 1, Some(4096)), Transport::Udp, 1);
        assert_eq!((a.msg.as_ref().unwrap().answers().len(), a.msg.unwrap().truncated()), (100, false));
        // TCP: everything.
        let a = ask_with(&Resolver::default(), "blue", &query(1, "many", 1, 1, None), Transport::Tcp, 1);
        assert_eq!((a.msg.as_ref().unwrap().answers().len(), a.msg.unwrap().truncated()), (100, false));
        // The truncated subsets differ between queries, so no address is always left out.
        let seen: std::collections::HashSet<_> = (0..40)
            .flat_map(|s| {
                addrs(
                    &ask_with(&Resolver::default(), "blue", &query(1, "many", 1, 1, None), Transport::Udp, s)
                        .msg
                        .unwrap(),
                )
            })
            .collect();
        assert!(seen.len() > 90, "{} of 100 seen in 40 truncated replies", seen.len());
    }

    #[test]
    fn services_answer_srv_with_their_targets_on_the_network() {
        use hickory_proto::rr::rdata::SRV;
        let srv = |name: &str| -> Vec<(u16, String)> {
            let a = ask("blue", name, rtype::SRV);
            let m = a.msg.unwrap();
            assert_eq!(m.response_code(), ResponseCode::NoError, "{name}");
            let mut v: Vec<(u16, String)> = m
                .answers()
                .iter()
                .map(|r| match r.data() {
                    RData::SRV(s) => {
                        let s: &SRV = s;
                        (s.port(), s.target().to_string())
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(srv("_80._tcp.api"), [(80, "api.blue.".to_owned())]);
        assert_eq!(srv("_80._TCP.api.blue"), [(80, "api.blue.".to_owned())], "NAME.NETWORK, any case");
        assert_eq!(srv("_5432._tcp.pg"), [(5432, "db.blue.".to_owned()), (5432, "web2.blue.".to_owned())]);
        let a = ask("blue", "_80._tcp.api", rtype::A);
        assert_eq!(a.msg.unwrap().answers().len(), 0, "no A for an SRV name");
        assert_eq!(ask("blue", "_81._tcp.api", rtype::SRV).outcome, Outcome::Forward, "not ours");
        assert_eq!(ask("red", "_80._tcp.api", rtype::SRV).msg.unwrap().response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn known_names_without_that_type_get_nodata_not_forwarded() {
        for qtype in [rtype::AAAA, 15 /* MX */, 16 /* TXT */, 33 /* SRV */] {
            let a = ask("blue", "web1", qtype);
            let m = a.msg.unwrap();
            assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::NoError, 0), "type {qtype}");
            assert!(m.authoritative());
            assert_eq!((a.counters.nodata, a.counters.forwarded), (1, 0));
        }
        assert_eq!(addrs(&ask("blue", "web1", rtype::ANY).msg.unwrap()), vec![ip(2)], "ANY gives the A records");
        assert_eq!(ask("blue", "example.com", rtype::AAAA).outcome, Outcome::Forward);
    }

    #[test]
    fn names_of_other_networks_are_not_answered() {
        // `cache` is only on red: blue forwards it like any unknown name.
        let a = ask("blue", "cache", rtype::A);
        assert_eq!((a.outcome, a.counters.forwarded), (Outcome::Forward, 1));
        assert_eq!(ask("blue", "cache.red", rtype::A).outcome, Outcome::Forward);
        // red is internal: its unknown names (blue's included) are NXDOMAIN, never forwarded.
        for name in ["web1", "web1.blue", "example.com", "2.0.1.10.in-addr.arpa"] {
            let a = ask("red", name, rtype::A);
            let Outcome::NotFoundInternal { len } = a.outcome else { panic!("{name}: {:?}", a.outcome) };
            assert_eq!(len, a.len);
            let m = a.msg.unwrap();
            assert_eq!(m.response_code(), ResponseCode::NXDomain);
            assert!(m.authoritative() && !m.recursion_available(), "an internal network offers no recursion");
            assert_eq!((a.counters.internal_nxdomain, a.counters.answered(rcode::NXDOMAIN)), (1, 1));
        }
        assert_eq!(addrs(&ask("red", "cache.red", rtype::A).msg.unwrap()), vec![Ipv4Addr::new(10, 2, 0, 2)]);
    }

    #[test]
    fn ptr_for_every_endpoint_address() {
        let a = ask("blue", "2.0.1.10.in-addr.arpa", rtype::PTR);
        let m = a.msg.unwrap();
        assert_eq!(m.answers().len(), 1);
        let RData::PTR(target) = m.answers()[0].data() else { panic!() };
        assert_eq!(target.to_string(), "web1.blue.");
        assert_eq!(m.answers()[0].ttl(), DEFAULT_TTL);
        let m = ask("blue", "7.1.1.10.IN-ADDR.ARPA.", rtype::PTR).msg.unwrap();
        assert_eq!(m.answers()[0].data().to_string(), "m7.blue.");
        // A reverse name of ours asked for A: NODATA; of no endpoint (or of red's): forwarded.
        assert_eq!(ask("blue", "2.0.1.10.in-addr.arpa", rtype::A).msg.unwrap().answers().len(), 0);
        assert_eq!(ask("blue", "99.0.1.10.in-addr.arpa", rtype::PTR).outcome, Outcome::Forward);
        assert_eq!(ask("blue", "2.0.2.10.in-addr.arpa", rtype::PTR).outcome, Outcome::Forward);
    }

    #[test]
    fn ttl_is_configurable() {
        let r = Resolver::new(ResolverConfig { ttl: 30, ..Default::default() });
        let m = ask_with(&r, "blue", &query(1, "web1", 1, 1, None), Transport::Udp, 1).msg.unwrap();
        assert_eq!(m.answers()[0].ttl(), 30);
        assert_eq!(r.config().ttl, 30);
    }

    fn rcode_of(network: &str, q: &[u8]) -> (u8, Asked) {
        let a = ask_with(&Resolver::default(), network, q, Transport::Udp, 1);
        let Outcome::Answer { len } = a.outcome else { panic!("{:?}", a.outcome) };
        assert!(len >= 12);
        (a.msg.as_ref().unwrap().response_code().low(), a)
    }

    #[test]
    fn other_opcodes_classes_and_counts_get_their_error() {
        let mut notify = query(9, "web1", 1, 1, None);
        notify[2] |= 4 << 3; // opcode 4, NOTIFY
        let (code, a) = rcode_of("blue", &notify);
        assert_eq!(code, rcode::NOTIMP);
        assert_eq!(a.msg.unwrap().op_code(), OpCode::Notify, "opcode echoed");

        let (code, a) = rcode_of("blue", &query(9, "version.bind", 1, 3 /* CH */, None));
        assert_eq!((code, a.counters.refused_class), (rcode::REFUSED, 1));
        assert_eq!(a.msg.unwrap().queries().len(), 1, "the question is echoed");

        for qdcount in [0u8, 2] {
            let mut q = query(9, "web1", 1, 1, None);
            q[5] = qdcount;
            let (code, a) = rcode_of("blue", &q);
            assert_eq!(code, rcode::FORMERR);
            assert_eq!(a.counters.malformed_for(WireError::QuestionCount), 1);
        }
        let q = query(9, "web1", 1, 1, None);
        let (code, a) = rcode_of("blue", &q[..q.len() - 2]);
        assert_eq!((code, a.counters.malformed_for(WireError::QuestionTruncated)), (rcode::FORMERR, 1));
        let mut loop_ = q.clone();
        loop_[12..14].copy_from_slice(&[0xc0, 12]);
        let (code, a) = rcode_of("blue", &loop_);
        assert_eq!((code, a.counters.malformed_for(WireError::BadPointer)), (rcode::FORMERR, 1));

        let (code, a) = rcode_of("green", &q);
        assert_eq!((code, a.counters.unknown_network), (rcode::REFUSED, 1));
    }

    #[test]
    fn responses_and_runts_are_dropped_with_a_reason() {
        let mut resp = query(9, "web1", 1, 1, None);
        resp[2] |= 0x80;
        let a = ask_with(&Resolver::default(), "blue", &resp, Transport::Udp, 1);
        assert_eq!(a.outcome, Outcome::Drop(DropReason::NotAQuery));
        assert_eq!(a.counters.dropped_for(DropReason::NotAQuery), 1);
        let a = ask_with(&Resolver::default(), "blue", &resp[..11], Transport::Udp, 1);
        assert_eq!(a.outcome, Outcome::Drop(DropReason::ShortQuery));
        assert_eq!((a.counters.queries, a.counters.dropped_total()), (1, 1));
    }

    #[test]
    fn the_reply_never_exceeds_the_callers_buffer() {
        let q = query(9, "many", 1, 1, None);
        let table = table();
        let mut rng = StdRng::seed_from_u64(1);
        for size in [0, 11, 12, 21, 22, 37, 38, 100, 511] {
            let mut out = vec![0u8; size];
            let mut c = Counters::default();
            match Resolver::default().answer(&table, "blue", &q, Transport::Tcp, &mut rng, &mut out, &mut c) {
                Outcome::Answer { len } => {
                    assert!(len <= size);
                    let m = Message::from_vec(&out[..len]).unwrap();
                    assert_eq!(m.answers().len(), (size - 22) / 16);
                    assert!(m.truncated());
                }
                Outcome::Drop(DropReason::OutputTooSmall) => assert!(size < 22),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_additional_section_is_formerr_with_the_question() {
        let mut q = query(9, "web1", 1, 1, Some(1232));
        q[11] = 2; // two OPT records announced, one present
        let (code, a) = rcode_of("blue", &q);
        assert_eq!((code, a.counters.malformed_for(WireError::RecordTruncated)), (rcode::FORMERR, 1));
        assert_eq!(a.msg.unwrap().queries().len(), 1);
    }
}
