//! What sealing a datagram costs, and which AEAD to seal with (issue 16, BENCHMARKS.md
//! "Sealing (issue 16): the AEAD, by measurement").
//!
//! Three AEADs seal and open the exact layout of `dataplane::crypto` (a 56-byte AAD, a 1400-byte
//! segment encrypted in place, a separate 16-byte tag): ring's AES-256-GCM (what the module
//! uses), ring's ChaCha20-Poly1305, and aws-lc-rs's AES-256-GCM. Each is timed on one segment
//! and on a 64 KB batch (46 segments of 1400 bytes sealed one by one with consecutive counters,
//! as a GSO send is). Then the module itself (`Sealer::seal`, `Opener::open` with its replay
//! window) on the same sizes, and the per-session key derivation (HKDF-SHA256 and the AES key
//! schedule), which is paid once per sender session.
//!
//! Run: `cargo bench -p dataplane --bench seal -- --warm-up-time 1 --measurement-time 3`.
//! Before timing, the module's seal and open are checked not to allocate.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::Vni;
use dataplane::alloc_count::{self, CountingAllocator};
use dataplane::crypto::{NetworkKey, Opener, SEALED_HEADER_LEN, Sealer, TAG_LEN};

// Counts this process's allocations, so that "sealing does not allocate" is checked rather
// than assumed.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// One segment's inner frame: what a 1450-byte overlay MTU leaves after the 32 bytes of
/// sealing overhead, rounded.
const SEGMENT: usize = 1400;
/// Segments in a 64 KB GSO batch.
const BATCH: usize = 46;
/// One sealed datagram.
const DATAGRAM: usize = SEALED_HEADER_LEN + SEGMENT + TAG_LEN;
/// The AAD the module authenticates: the sealed header and both outer addresses.
const AAD_LEN: usize = SEALED_HEADER_LEN + 32;

const SENDER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const KEY: NetworkKey = NetworkKey { epoch: 1, secret: [0x5a; 32] };

fn vni() -> Vni {
    Vni::new(4242).expect("fits in 24 bits")
}

/// The AEAD operations the module needs, over the module's layout.
trait Aead {
    /// Encrypts `text` in place and returns the tag.
    fn seal(&self, counter: u64, aad: &[u8; AAD_LEN], text: &mut [u8]) -> [u8; TAG_LEN];
    /// Decrypts `text_and_tag` in place; whether the tag verified.
    fn open(&self, counter: u64, aad: &[u8; AAD_LEN], text_and_tag: &mut [u8]) -> bool;
}

fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

struct Ring(ring::aead::LessSafeKey);

impl Ring {
    fn new(alg: &'static ring::aead::Algorithm) -> Ring {
        Ring(ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, &[7; 32]).expect("32-byte key")))
    }
}

impl Aead for Ring {
    fn seal(&self, counter: u64, aad: &[u8; AAD_LEN], text: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        let tag = self.0.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), text).expect("seals");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    fn open(&self, counter: u64, aad: &[u8; AAD_LEN], text_and_tag: &mut [u8]) -> bool {
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        self.0.open_in_place(nonce, ring::aead::Aad::from(aad), text_and_tag).is_ok()
    }
}

#[cfg(feature = "aws-lc")]
struct AwsLc(aws_lc_rs::aead::LessSafeKey);

#[cfg(feature = "aws-lc")]
impl AwsLc {
    fn new() -> AwsLc {
        let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[7; 32]).expect("32-byte key");
        AwsLc(aws_lc_rs::aead::LessSafeKey::new(key))
    }
}

#[cfg(feature = "aws-lc")]
impl Aead for AwsLc {
    fn seal(&self, counter: u64, aad: &[u8; AAD_LEN], text: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        let tag = self.0.seal_in_place_separate_tag(nonce, aws_lc_rs::aead::Aad::from(aad), text).expect("seals");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    fn open(&self, counter: u64, aad: &[u8; AAD_LEN], text_and_tag: &mut [u8]) -> bool {
        let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        self.0.open_in_place(nonce, aws_lc_rs::aead::Aad::from(aad), text_and_tag).is_ok()
    }
}

/// Seals the datagrams of `buf` (each `DATAGRAM` bytes) with counters from `first`, the way
/// the module does: header bytes into the AAD, text in place, tag after it.
fn seal_all(aead: &impl Aead, first: u64, buf: &mut [u8]) {
    for (i, d) in buf.chunks_exact_mut(DATAGRAM).enumerate() {
        let counter = first + i as u64;
        let mut aad = [0u8; AAD_LEN];
        aad[16..24].copy_from_slice(&counter.to_be_bytes());
        let (text, tag) = d[SEALED_HEADER_LEN..].split_at_mut(SEGMENT);
        tag.copy_from_slice(&aead.seal(counter, &aad, text));
    }
}

/// Opens what [`seal_all`] sealed.
fn open_all(aead: &impl Aead, first: u64, buf: &mut [u8]) {
    for (i, d) in buf.chunks_exact_mut(DATAGRAM).enumerate() {
        let counter = first + i as u64;
        let mut aad = [0u8; AAD_LEN];
        aad[16..24].copy_from_slice(&counter.to_be_bytes());
        assert!(aead.open(counter, &aad, &mut d[SEALED_HEADER_LEN..]), "tag verifies");
    }
}

/// One AEAD's four timings: seal and open of one segment and of a 64 KB batch.
fn bench_aead(c: &mut Criterion, name: &str, aead: impl Aead) {
    let mut g = c.benchmark_group(name);
    for (id, n) in [("1400", 1), ("64k_batch", BATCH)] {
        let mut buf = vec![0x42u8; n * DATAGRAM];
        g.throughput(Throughput::Bytes((n * SEGMENT) as u64));
        let mut counter = 0u64;
        g.bench_function(format!("seal_{id}"), |b| {
            b.iter(|| {
                seal_all(&aead, counter, black_box(&mut buf));
                counter += n as u64;
            })
        });
        seal_all(&aead, 0, &mut buf);
        let sealed = buf.clone();
        let size = if n == 1 { BatchSize::SmallInput } else { BatchSize::LargeInput };
        g.bench_function(format!("open_{id}"), |b| {
            b.iter_batched_ref(|| sealed.clone(), |d| open_all(&aead, 0, black_box(d)), size)
        });
    }
    g.finish();
}

fn aeads(c: &mut Criterion) {
    bench_aead(c, "ring_aes256gcm", Ring::new(&ring::aead::AES_256_GCM));
    bench_aead(c, "ring_chacha20poly1305", Ring::new(&ring::aead::CHACHA20_POLY1305));
    #[cfg(feature = "aws-lc")]
    bench_aead(c, "awslc_aes256gcm", AwsLc::new());
}

/// A batch of `n` inner frames laid out as sealed datagrams, ready to seal.
fn datagrams(n: usize) -> Vec<u8> {
    vec![0x42u8; n * DATAGRAM]
}

fn seal_batch(sealer: &Sealer, buf: &mut [u8]) {
    let n = buf.len() / DATAGRAM;
    let first = sealer.reserve(n as u64);
    for (i, d) in buf.chunks_exact_mut(DATAGRAM).enumerate() {
        sealer.seal(vni(), first + i as u64, d, SEGMENT);
    }
}

fn open_batch(opener: &mut Opener, buf: &mut [u8]) {
    for d in buf.chunks_exact_mut(DATAGRAM) {
        assert!(opener.open(SENDER, d).is_ok(), "opens");
    }
}

/// Panics if sealing and opening `n`-datagram batches allocates, after the sender's first.
fn check_no_allocation(n: usize) {
    assert!(alloc_count::is_installed(), "the counting allocator is the global allocator");
    let sealer = Sealer::new(&KEY, SENDER, 1);
    let mut opener = Opener::new();
    opener.set_keys(&[KEY]);
    let mut buf = datagrams(n);
    seal_batch(&sealer, &mut buf);
    open_batch(&mut opener, &mut buf); // creates the sender's state
    let before = alloc_count::thread_allocations();
    for _ in 0..100 {
        seal_batch(&sealer, &mut buf);
        open_batch(&mut opener, &mut buf);
    }
    let allocations = alloc_count::thread_allocations() - before;
    assert_eq!(allocations, 0, "sealing and opening {n}-datagram batches allocated {allocations} times");
}

fn bench_module_size(g: &mut BenchmarkGroup<'_, WallTime>, id: &str, n: usize) {
    check_no_allocation(n);
    g.throughput(Throughput::Bytes((n * SEGMENT) as u64));
    let sealer = Sealer::new(&KEY, SENDER, 1);
    let mut buf = datagrams(n);
    g.bench_function(format!("seal_{id}"), |b| b.iter(|| seal_batch(&sealer, black_box(&mut buf))));

    // Each opened batch must be new to the replay window: sealed afresh, untimed.
    let sealer = Sealer::new(&KEY, SENDER, 2);
    let mut opener = Opener::new();
    opener.set_keys(&[KEY]);
    let size = if n == 1 { BatchSize::SmallInput } else { BatchSize::LargeInput };
    g.bench_function(format!("open_{id}"), |b| {
        b.iter_batched_ref(
            || {
                let mut buf = datagrams(n);
                seal_batch(&sealer, &mut buf);
                buf
            },
            |d| open_batch(&mut opener, black_box(d)),
            size,
        )
    });
}

fn module(c: &mut Criterion) {
    let mut g = c.benchmark_group("module");
    bench_module_size(&mut g, "1400", 1);
    bench_module_size(&mut g, "64k_batch", BATCH);
    g.throughput(Throughput::Elements(1));
    let mut session = 0u64;
    g.bench_function("session_key", |b| {
        b.iter(|| {
            session += 1;
            Sealer::new(black_box(&KEY), SENDER, session)
        })
    });
    g.bench_function("hkdf_sha256_alone", |b| {
        b.iter(|| {
            session += 1;
            let session = session.to_be_bytes();
            let info = [&[0u8; 16][..], &session[..]];
            let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"overlayd vxlan seal v1");
            let prk = salt.extract(black_box(&KEY.secret));
            let okm = prk.expand(&info, ring::hkdf::HKDF_SHA256).expect("32 bytes");
            let mut out = [0u8; 32];
            okm.fill(&mut out).expect("32 bytes");
            out
        })
    });
    g.finish();
}

criterion_group!(benches, aeads, module);
criterion_main!(benches);
