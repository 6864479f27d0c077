//! Properties over arbitrary input: no input makes the resolver or the forwarder panic, no
//! reply exceeds the caller's buffer or the transport's limit, every reply is DNS that an
//! independent implementation (hickory-proto) reads, and answers hold exactly the table's
//! addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::{Counters, Forwarder, ForwarderConfig, NameTable, Outcome, Resolver, Transmit, Transport, Upstreams};

fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, edns.is_some() as u8]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0]);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    if let Some(size) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    m
}

fn table() -> NameTable {
    let mut b = NameTable::builder();
    let mut blue = b.network("blue", false);
    for i in 0..60u8 {
        blue.endpoint(&format!("web{i}"), ["www"], Ipv4Addr::new(10, 1, 0, i));
    }
    b.network("red", true).endpoint("db", [], Ipv4Addr::new(10, 2, 0, 2));
    b.build()
}

/// Runs one query and checks what every reply must satisfy.
fn check(table: &NameTable, network: &str, q: &[u8], tcp: bool, out_len: usize, seed: u64) {
    let mut out = vec![0u8; out_len];
    let mut c = Counters::default();
    let transport = if tcp { Transport::Tcp } else { Transport::Udp };
    let outcome =
        Resolver::default().answer(table, network, q, transport, &mut StdRng::seed_from_u64(seed), &mut out, &mut c);
    assert_eq!(c.queries, 1);
    if let Some(len) = outcome.reply_len() {
        assert!(len <= out_len, "{len} > buffer {out_len}");
        assert!(tcp || len <= 1232, "UDP reply of {len}");
        let m = Message::from_vec(&out[..len]).unwrap_or_else(|e| panic!("reply {:?} unreadable: {e}", &out[..len]));
        assert_eq!(m.id(), u16::from_be_bytes([q[0], q[1]]));
        assert_eq!(c.answers.iter().sum::<u64>(), 1);
    } else {
        assert_eq!(c.answers.iter().sum::<u64>(), 0);
    }
}

fn valid_query() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        "(web[0-9]{1,2}|www|db|x)(\\.blue|\\.red)?",
        prop::sample::select(vec![1u16, 12, 28, 255, 15]),
        prop::option::of(any::<u16>()),
    )
        .prop_map(|(id, name, qtype, edns)| query(id, &name, qtype, edns))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_nor_overflow(
        q in prop::collection::vec(any::<u8>(), 0..600),
        tcp: bool,
        out_len in prop_oneof![Just(65535usize), 0usize..700],
        seed: u64,
    ) {
        check(&table(), "blue", &q, tcp, out_len, seed);
    }

    #[test]
    fn mutated_queries_never_panic_nor_overflow(
        q in valid_query(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        tcp: bool,
        network in prop::sample::select(vec!["blue", "red", "green"]),
        out_len in prop_oneof![Just(65535usize), 0usize..700],
        seed: u64,
    ) {
        let mut q = q;
        for (at, v) in flips {
            let i = at.index(q.len());
            q[i] = v;
        }
        if cut.index(4) == 0 {
            q.truncate(cut.index(q.len() + 1));
        }
        check(&table(), network, &q, tcp, out_len, seed);
    }

    #[test]
    fn answers_hold_exactly_the_addresses_of_the_name(
        endpoints in prop::collection::vec(("[a-c]{1,2}", prop::collection::vec("[a-c]{1,2}", 0..3), any::<[u8; 4]>()), 1..40),
        asked in "[a-cA-C]{1,2}",
        qualified: bool,
        seed: u64,
    ) {
        let mut b = NameTable::builder();
        let mut net = b.network("n", false);
        let mut model: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for (name, aliases, addr) in &endpoints {
            let addr = Ipv4Addr::from(*addr);
            net.endpoint(name, aliases.iter().map(String::as_str), addr);
            for n in std::iter::once(name).chain(aliases) {
                model.entry(n.clone()).or_default().insert(addr);
            }
        }
        let table = b.build();
        let name = if qualified { format!("{asked}.N") } else { asked.clone() };
        let q = query(1, &name, 1, None);
        let mut out = vec![0u8; 65535];
        let mut c = Counters::default();
        let outcome = Resolver::default().answer(&table, "n", &q, Transport::Tcp, &mut StdRng::seed_from_u64(seed), &mut out, &mut c);
        match model.get(&asked.to_ascii_lowercase()) {
            Some(want) => {
                let len = outcome.reply_len().expect("answered");
                let m = Message::from_vec(&out[..len]).unwrap();
                let got: Vec<Ipv4Addr> = m.answers().iter().map(|r| match r.data() { RData::A(a) => a.0, other => panic!("{other:?}") }).collect();
                prop_assert_eq!(got.len(), want.len(), "no duplicates");
                prop_assert_eq!(&got.into_iter().collect::<BTreeSet<_>>(), want);
            }
            None => prop_assert_eq!(outcome, Outcome::Forward),
        }
    }

    #[test]
    fn the_forwarder_survives_arbitrary_replies(
        replies in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..80), 0u8..3, any::<bool>()), 1..30),
        seed: u64,
    ) {
        let up = |i: u8| SocketAddr::from(([192, 0, 2, i], 53));
        let mut f: Forwarder<u8, StdRng> = Forwarder::new(Upstreams::new([up(1), up(2)]), ForwarderConfig::default(), StdRng::seed_from_u64(seed));
        let mut c = Counters::default();
        let mut out = vec![0u8; 65535];
        let t0 = Instant::now();
        let mut sent = Vec::new();
        for client in 0..3u8 {
            let q = query(client as u16, "example.com", 1, None);
            if let Some(Transmit::Upstream { len, .. }) = f.forward(&q, client, t0, &mut out, &mut c) {
                sent.push(out[..len].to_vec());
            }
        }
        prop_assert_eq!(f.in_flight(), 3);
        for (i, (mut bytes, from, keep_id)) in replies.into_iter().enumerate() {
            // Half the time, the junk carries an ID in flight, to reach the deeper checks.
            if keep_id && bytes.len() >= 2 {
                let s = &sent[i % sent.len()];
                bytes[..2].copy_from_slice(&s[..2]);
            }
            let now = t0 + Duration::from_millis(i as u64 * 300);
            if let Some(Transmit::Client { len, .. } | Transmit::Upstream { len, .. }) = f.handle_reply(up(from), &bytes, now, &mut out, &mut c) {
                prop_assert!(len <= out.len());
            }
            while let Some(t) = f.handle_timeout(now, &mut out, &mut c) {
                if let Transmit::Upstream { len, .. } = t {
                    sent.push(out[..len].to_vec());
                }
            }
        }
        prop_assert!(f.in_flight() <= 3);
        // Whatever happened, everything ends by the 5 s deadline.
        while f.handle_timeout(t0 + Duration::from_secs(60), &mut out, &mut c).is_some() {}
        prop_assert_eq!(f.in_flight(), 0);
        prop_assert_eq!(f.poll_timeout(), None);
    }
}
