//! The resolver's answer path in nanoseconds per query, from a table of 10,000 endpoints
//! (10,000 names, 1,000 aliases shared by 10 endpoints each, 10,000 PTRs), UDP, 512 bytes:
//! - `hit`: A for a container name (one address), cycling over 1,024 distinct names so that
//!   one hot bucket is not all we time; `hit_qualified`: the same as `NAME.NETWORK`;
//! - `alias_10`: A for an alias of 10 endpoints (10 records, shuffled);
//! - `aaaa_nodata`: AAAA for a known name (NOERROR, no answer);
//! - `miss`: a name the network does not have (the verdict "forward", nothing written);
//! - `ptr`: a reverse lookup of an endpoint address.
//!
//! Each query is parsed, looked up and (but for `miss`) written as a full reply. Measured on
//! the shared 2-core development machine under load (median): hit 134 ns, hit_qualified
//! 120 ns, alias_10 299 ns, aaaa_nodata 86 ns, miss 72 ns, ptr 180 ns. Run with
//! `cargo bench -p resolver --bench answer` (append `-- --warm-up-time 1 --measurement-time 2`
//! for a quick pass).

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::{Counters, NameTable, Outcome, Resolver, Transport};

const ENDPOINTS: u32 = 10_000;

fn table() -> NameTable {
    let mut b = NameTable::builder();
    let mut net = b.network("blue", false);
    for i in 0..ENDPOINTS {
        let alias = format!("svc-{}", i / 10);
        net.endpoint(&format!("web-{i}"), [alias.as_str()], Ipv4Addr::from(0x0a00_0000 | i));
    }
    b.build()
}

fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m
}

fn answer(c: &mut Criterion) {
    let table = table();
    let resolver = Resolver::default();
    let mut group = c.benchmark_group("answer");
    type MakeQuery = Box<dyn Fn(u32) -> Vec<u8>>;
    let cases: [(&str, MakeQuery); 6] = [
        ("hit", Box::new(|i| query(&format!("web-{}", i * 9), 1))),
        ("hit_qualified", Box::new(|i| query(&format!("web-{}.blue", i * 9), 1))),
        ("alias_10", Box::new(|i| query(&format!("svc-{}", i % 1000), 1))),
        ("aaaa_nodata", Box::new(|i| query(&format!("web-{}", i * 9), 28))),
        ("miss", Box::new(|i| query(&format!("host-{i}.example.com"), 1))),
        (
            "ptr",
            Box::new(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 | (i * 9)).octets();
                query(&format!("{}.{}.{}.{}.in-addr.arpa", a[3], a[2], a[1], a[0]), 12)
            }),
        ),
    ];
    for (name, make) in cases {
        let queries: Vec<Vec<u8>> = (0..1024).map(make).collect();
        let mut out = [0u8; 512];
        let mut counters = Counters::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let o = resolver.answer(
                    &table,
                    "blue",
                    black_box(&queries[i]),
                    Transport::Udp,
                    &mut rng,
                    &mut out,
                    &mut counters,
                );
                black_box(o)
            })
        });
        let want_forward = name == "miss";
        let o = resolver.answer(&table, "blue", &queries[0], Transport::Udp, &mut rng, &mut out, &mut counters);
        assert_eq!(o == Outcome::Forward, want_forward, "{name}: {o:?}");
    }
    group.finish();
}

criterion_group!(benches, answer);
criterion_main!(benches);
