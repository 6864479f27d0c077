//! Any datagram arriving from an upstream, at any time: the forwarder must never panic, never
//! deliver more than the buffer, and every query must end (answered or SERVFAIL) by its
//! deadline whatever the upstreams sent.
//!
//! The input is a sequence of replies, each: a length byte, a knobs byte (bits 0-1: which
//! address sent it; bit 2: replace its first two bytes with an ID in flight, to get past the
//! ID check; bits 3-7: how many 100 ms pass before it), then the bytes.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::{Counters, Forwarder, ForwarderConfig, Transmit, Upstreams};

fn query(id: u16, name: &[u8]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.push(name.len() as u8);
    m.extend_from_slice(name);
    m.extend_from_slice(&[7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 0, 1, 0, 1]);
    m
}

fuzz_target!(|data: &[u8]| {
    let up = |i: u8| SocketAddr::from(([192, 0, 2, i], 53));
    let upstreams = Upstreams::new([up(1), up(2), up(3)]);
    let mut f: Forwarder<u8, StdRng> =
        Forwarder::new(upstreams, ForwarderConfig::default(), StdRng::seed_from_u64(data.len() as u64));
    let mut counters = Counters::default();
    let mut out = vec![0u8; 65535];
    let t0 = Instant::now();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for (client, name) in [&b"a"[..], b"bb", b"ccc"].into_iter().enumerate() {
        if let Some(Transmit::Upstream { len, .. }) =
            f.forward(&query(client as u16, name), client as u8, t0, &mut out, &mut counters)
        {
            sent.push(out[..len].to_vec());
        }
    }
    let mut now = t0;
    let mut rest = data;
    while let [len, knobs, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let mut reply = tail[..n].to_vec();
        rest = &tail[n..];
        now += Duration::from_millis(100 * (knobs >> 3) as u64);
        if knobs & 4 != 0 && reply.len() >= 2 && !sent.is_empty() {
            let s = &sent[reply[reply.len() - 1] as usize % sent.len()];
            reply[..2].copy_from_slice(&s[..2]);
        }
        let from = up(knobs & 3);
        let mut emit = |t: Transmit<u8>, out: &[u8], sent: &mut Vec<Vec<u8>>| match t {
            Transmit::Upstream { len, .. } => sent.push(out[..len].to_vec()),
            Transmit::Client { len, .. } => assert!(len <= out.len()),
        };
        if let Some(t) = f.handle_reply(from, &reply, now, &mut out, &mut counters) {
            emit(t, &out, &mut sent);
        }
        while let Some(t) = f.handle_timeout(now, &mut out, &mut counters) {
            emit(t, &out, &mut sent);
        }
        assert!(f.in_flight() <= 3);
    }
    while f.handle_timeout(t0 + Duration::from_secs(3600), &mut out, &mut counters).is_some() {}
    assert_eq!(f.in_flight(), 0, "every query ends by its deadline");
});
