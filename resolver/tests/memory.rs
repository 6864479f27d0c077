//! Measured with a counting allocator: the memory a table of 10,000 names takes, and that
//! answering allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::{Counters, NameTable, Outcome, Resolver, Transport};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` with the caller's arguments unchanged; counting touches only
// atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | i)
}

/// 10,000 endpoints named like containers (`web-1234`), no alias: 10,000 names, 10,000 PTRs.
fn build(n: u32, aliases: bool) -> NameTable {
    let mut b = NameTable::builder();
    let mut net = b.network("blue", false);
    for i in 0..n {
        let alias = format!("svc-{}", i / 10);
        net.endpoint(&format!("web-{i}"), aliases.then_some(alias.as_str()), addr(i));
    }
    b.build()
}

// One test, so the two measurements do not run on two threads at once and count each other.
#[test]
fn memory_per_10000_names_and_no_allocation_per_query() {
    let before = LIVE.load(Relaxed);
    let table = build(10_000, false);
    let bytes = LIVE.load(Relaxed) - before;
    println!("10,000 endpoints, one name each: {bytes} bytes ({} per endpoint)", bytes / 10_000);
    // Measured: 901,172 bytes, 90 per endpoint (the name's key and its allocation, the hash
    // entries for name and address, the address, the PTR text), before malloc's own overhead.
    assert!(bytes < 2_000_000, "{bytes} bytes for 10,000 names");

    let before = LIVE.load(Relaxed);
    let with_aliases = build(10_000, true);
    let bytes = LIVE.load(Relaxed) - before;
    println!("10,000 endpoints with an alias shared by 10: {bytes} bytes ({} per endpoint)", bytes / 10_000);
    drop(with_aliases);

    let resolver = Resolver::default();
    let mut rng = StdRng::seed_from_u64(1);
    let mut out = vec![0u8; 65535];
    let mut c = Counters::default();
    let queries: Vec<Vec<u8>> = ["web-42", "WEB-9999.blue", "nope", "42.0.0.10.in-addr.arpa", "web-1"]
        .iter()
        .map(|name| {
            let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for l in name.split('.') {
                m.push(l.len() as u8);
                m.extend_from_slice(l.as_bytes());
            }
            m.extend_from_slice(&[0, 0, if name.ends_with("arpa") { 12 } else { 1 }, 0, 1]);
            m
        })
        .collect();
    let before = ALLOCATIONS.load(Relaxed);
    for _ in 0..1000 {
        for q in &queries {
            let o = resolver.answer(&table, "blue", q, Transport::Udp, &mut rng, &mut out, &mut c);
            assert!(matches!(o, Outcome::Answer { .. } | Outcome::Forward));
        }
    }
    assert_eq!(ALLOCATIONS.load(Relaxed) - before, 0, "answering allocates nothing");
    assert_eq!(c.forwarded, 1000);
}
