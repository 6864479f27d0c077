//! Any message a client sends to the resolver: [`Resolver::answer`] must never panic, and a
//! reply never exceeds the caller's buffer nor, over UDP, the configured payload cap.
//!
//! The first byte picks the transport (bit 0), the network (bits 1-2: open, internal,
//! unknown) and the output buffer's size (bits 3-7: 64 KiB, or smaller); the rest is the query.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::{Counters, NameTable, Resolver, Transport};

static TABLE: LazyLock<NameTable> = LazyLock::new(|| {
    let mut b = NameTable::builder();
    let mut blue = b.network("blue", false);
    for i in 0..200u32 {
        blue.endpoint(&format!("web{i}"), ["www", "svc"], Ipv4Addr::from(0x0a01_0000 | i));
    }
    b.network("red", true).endpoint("db", ["www"], Ipv4Addr::new(10, 2, 0, 2));
    b.build()
});

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, query)) = data.split_first() else { return };
    let transport = if knobs & 1 == 0 { Transport::Udp } else { Transport::Tcp };
    let network = ["blue", "red", "green", "blue"][(knobs >> 1 & 3) as usize];
    let out_len = match knobs >> 3 {
        0 => 65535,
        n => n as usize * 37,
    };
    let mut out = vec![0u8; out_len];
    let mut counters = Counters::default();
    let resolver = Resolver::default();
    let mut rng = StdRng::seed_from_u64(query.len() as u64);
    let outcome = resolver.answer(&TABLE, network, query, transport, &mut rng, &mut out, &mut counters);
    if let Some(len) = outcome.reply_len() {
        assert!(len <= out_len);
        assert!(transport == Transport::Tcp || len <= resolver.config().max_udp_payload as usize);
        assert_eq!(out[..2], query[..2], "the reply carries the query's ID");
    }
    assert_eq!(counters.queries, 1);
});
