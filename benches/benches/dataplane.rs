//! Micro-benchmarks of the dataplane's per-frame work, in nanoseconds per frame.
//!
//! Each benchmark times one frame (or one lookup) per iteration, so Criterion's `time:` line
//! is the cost per frame. The groups follow a frame through the hot loops:
//! - `encap`: what the TX loop does after the decision — the VXLAN header written into the
//!   headroom in front of a 1450-byte TCP/IPv4 frame, and the flow hash that picks one of 16
//!   outer source ports; `flow_hash` times the hash alone for IPv4/TCP and IPv6/TCP;
//! - `decap`: [`switch::from_underlay`] on a valid datagram with learning off and on (refresh
//!   of an entry already learned), on one whose inner TCP checksum it must complete (as a
//!   kernel VTEP over veth sends them), on one the header check drops (bad flags), and on a
//!   cluster network, where the inner source must be the sending VTEP's (`source_checked`);
//! - `fdb_lookup` and `learned_fdb_lookup`: hits and misses in the control plane's FDB
//!   (10, 1,000 and 100,000 entries) and in the learned FDB (up to its default bound), each
//!   call taking the next of 1,024 distinct keys so that one hot bucket is not all we time;
//! - `from_tap`: the switching decision for known unicast, unknown unicast (flooded to three
//!   VTEPs), an ARP request answered locally, and one that is flooded; and known unicast on a
//!   cluster network, where the source must be one of this host's endpoints (`source_checked`).
//!
//! Frames are built by hand, inputs go through `black_box`, and before it is timed every
//! routine is run under the dataplane's counting allocator and must not allocate, as the hot
//! loops promise. Run with `cargo bench -p overlayd-benches --bench dataplane` (append
//! `-- decap` to run one group, `-- --warm-up-time 1 --measurement-time 2` for a quick pass).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::alloc_count::{self, CountingAllocator};
use dataplane::learn::{DEFAULT_AGEING_SECS, DEFAULT_MAX_ENTRIES, LearnedFdb, Learner, shared_learned};
use dataplane::switch::{self, TapVerdict, UnderlayVerdict};
use dataplane::tables::{BlockOwner, NetworkSettings, SharedTables, TableError, Tables};
use dataplane::wire::arp;
use dataplane::wire::flow::{flow_hash, port_index};
use dataplane::wire::vxlan::{self, VxlanPacket, VxlanRepr};
use dataplane::{Counters, DropReason, MacAddr, Vni};

// Counts this process's allocations, so that "the measured routine does not allocate" is
// checked rather than assumed.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The network every benchmark switches in.
const VNI: Vni = match Vni::new(4242) {
    Some(vni) => vni,
    None => panic!("4242 fits in 24 bits"),
};

/// Length of the inner TCP/IPv4 (and IPv6) frames.
const FRAME_LEN: usize = 1450;

/// The network's IP MTU: a 1500-byte underlay less 50 bytes of outer IPv4, UDP, VXLAN and
/// inner Ethernet headers. Every frame here fits it, so nothing is segmented.
const NETWORK_MTU: u32 = 1450;

/// Bytes the TX loop keeps free in front of each frame it reads (`HEADROOM` in the Linux
/// shell's TX loop, which is crate-private).
const HEADROOM: usize = 64;

/// Outer source ports (one UDP socket each) the flow hash chooses between.
const SOURCE_PORTS: usize = 16;

/// The three peer VTEPs: the flood list, and where the FDB's MACs live.
const PEERS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 4)),
];

/// The container on this host that sends the TAP-side frames.
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Distinct lookup keys a lookup benchmark cycles through, so that it does not time one
/// cache-hot bucket. A power of two, so the cycling is a mask.
const PROBES: usize = 1024;

/// Calls of a routine checked for allocations before it is timed.
const ALLOCATION_CHECK_CALLS: usize = 1000;

/// Container `i` behind a peer VTEP: addresses from 10.64.0.0, MACs derived as overlayd does.
fn remote_ip(i: usize) -> Ipv4Addr {
    offset_ip(Ipv4Addr::new(10, 64, 0, 0), i)
}

/// Addresses that are in no table: from 10.128.0.0.
fn unknown_ip(i: usize) -> Ipv4Addr {
    offset_ip(Ipv4Addr::new(10, 128, 0, 0), i)
}

/// Addresses only the learned FDB knows: from 10.192.0.0.
fn learned_ip(i: usize) -> Ipv4Addr {
    offset_ip(Ipv4Addr::new(10, 192, 0, 0), i)
}

fn offset_ip(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("fewer than 2^32 addresses");
    Ipv4Addr::from(u32::from(base) + i)
}

fn mac(ip: Ipv4Addr) -> MacAddr {
    MacAddr::from_ipv4(ip)
}

/// Probe indices spread over `0..n` (a prime stride, so a table of any size is visited
/// beyond its first entries).
fn probe_indices(n: usize) -> impl Iterator<Item = usize> {
    (0..PROBES).map(move |k| (k * 7919) % n)
}

// ---------------------------------------------------------------------------------------------
// Frames, built by hand.

/// Where the TCP checksum is in a TCP/IPv4 frame without options.
const TCP_V4_CHECKSUM_AT: usize = 14 + 20 + 16;

/// The RFC 1071 one's-complement sum of `parts` taken as one byte string (every part but the
/// last of even length), folded to 16 bits and not inverted. Written here rather than taken
/// from `dataplane::wire::checksum`, so that the frames also check that module.
fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = parts
        .iter()
        .flat_map(|p| p.chunks(2))
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header of a TCP segment of `len` bytes.
fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&src.octets());
    h[4..8].copy_from_slice(&dst.octets());
    h[9] = 6; // TCP
    h[10..12].copy_from_slice(&u16::try_from(len).expect("fits a segment length").to_be_bytes());
    h
}

/// The IPv6 pseudo-header of a TCP segment of `len` bytes.
fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0..16].copy_from_slice(&src.octets());
    h[16..32].copy_from_slice(&dst.octets());
    h[32..36].copy_from_slice(&u32::try_from(len).expect("fits a segment length").to_be_bytes());
    h[39] = 6; // TCP
    h
}

/// Writes the TCP checksum of the segment `frame[l4..]` behind `pseudo_header`.
fn set_tcp_checksum(frame: &mut [u8], l4: usize, pseudo_header: &[u8]) {
    frame[l4 + 16..l4 + 18].fill(0);
    let checksum = !ones_complement_sum(&[pseudo_header, &frame[l4..]]);
    frame[l4 + 16..l4 + 18].copy_from_slice(&checksum.to_be_bytes());
}

fn ethernet_header(dst: MacAddr, src: MacAddr, ether_type: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// A 20-byte TCP header (ACK|PSH, iperf3's port) as one segment of a bulk transfer carries,
/// checksum still zero.
fn tcp_header(sport: u16, dport: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence number
    h[8..12].copy_from_slice(&0x0abc_def0u32.to_be_bytes()); // acknowledgment number
    h[12] = 5 << 4; // data offset: 5 words, no options
    h[13] = 0x18; // PSH | ACK
    h[14..16].copy_from_slice(&502u16.to_be_bytes()); // window
    h
}

/// Fills the frame up to [`FRAME_LEN`] with a payload pattern.
fn pad_payload(mut f: Vec<u8>) -> Vec<u8> {
    let n = FRAME_LEN - f.len();
    f.extend((0..n).map(|i| i as u8));
    f
}

/// A [`FRAME_LEN`]-byte Ethernet + IPv4 + TCP frame from `src` port 40000 to `dst` port 5201.
fn tcp_ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet_header(mac(dst), mac(src), 0x0800);
    let total_len = u16::try_from(FRAME_LEN - 14).expect("fits an IPv4 total length");
    let mut ip = [0u8; 20];
    ip[0] = 0x45; // version 4, 5-word header
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1c46u16.to_be_bytes()); // identification
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let checksum = !ones_complement_sum(&[&ip]);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(40000, 5201));
    let mut f = pad_payload(f);
    set_tcp_checksum(&mut f, 34, &pseudo_header_v4(src, dst, FRAME_LEN - 34));
    f
}

/// A [`FRAME_LEN`]-byte Ethernet + IPv6 + TCP frame from `src` port 40000 to `dst` port 5201.
fn tcp_ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut f = ethernet_header(MacAddr([0x02, 0x4f, 0, 0, 0, 3]), MacAddr([0x02, 0x4f, 0, 0, 0, 2]), 0x86dd);
    let payload_len = u16::try_from(FRAME_LEN - 14 - 40).expect("fits an IPv6 payload length");
    let mut ip = [0u8; 40];
    ip[0] = 0x60; // version 6
    ip[1..4].copy_from_slice(&[0x0b, 0xee, 0xf0]); // flow label
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = 6; // next header: TCP
    ip[7] = 64; // hop limit
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(40000, 5201));
    let mut f = pad_payload(f);
    set_tcp_checksum(&mut f, 54, &pseudo_header_v6(src, dst, FRAME_LEN - 54));
    f
}

/// A broadcast ARP request as Linux sends it: who has `target`? Tell `sender`.
fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet_header(MacAddr::BROADCAST, mac(sender), 0x0806);
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac(sender).0);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A datagram as the RX loop receives it on the VXLAN port: header and inner frame.
fn vxlan_datagram(vni: Vni, inner: &[u8]) -> Vec<u8> {
    let mut datagram = [&[0u8; vxlan::HEADER_LEN][..], inner].concat();
    let mut packet = VxlanPacket::new_checked(&mut datagram[..]).expect("room for the header");
    VxlanRepr::plain(vni).emit(&mut packet);
    datagram
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// A snapshot holding network [`VNI`] with the three [`PEERS`] as flood list, `fdb_entries`
/// remote containers spread over them in the FDB and, if `arp`, in the ARP table too.
fn tables(fdb_entries: usize, arp: bool, learning: bool) -> Arc<Tables<()>> {
    let shared = SharedTables::<()>::default();
    shared
        .update(|tx| {
            tx.add_network(VNI, (), NetworkSettings { learning, mtu: NETWORK_MTU, encrypted: false })?;
            tx.set_flood_list(VNI, PEERS)?;
            for i in 0..fdb_entries {
                tx.set_fdb(VNI, mac(remote_ip(i)), PEERS[i % PEERS.len()])?;
                if arp {
                    tx.set_arp(VNI, remote_ip(i), mac(remote_ip(i)))?;
                }
            }
            Ok::<_, TableError>(())
        })
        .expect("a valid table update");
    shared.load()
}

/// [`tables`] as a cluster network: this host holds 10.0.0.0/24 (with [`LOCAL_IP`] its one
/// endpoint), the peers the /24 blocks of the remote and learned containers, each block the
/// first container in it is placed at.
fn cluster_tables(fdb_entries: usize) -> Arc<Tables<()>> {
    let shared = SharedTables::<()>::default();
    shared
        .update(|tx| {
            tx.add_network(VNI, (), NetworkSettings { learning: false, mtu: NETWORK_MTU, encrypted: false })?;
            tx.set_flood_list(VNI, PEERS)?;
            for i in 0..fdb_entries {
                tx.set_fdb(VNI, mac(remote_ip(i)), PEERS[i % PEERS.len()])?;
                tx.set_arp(VNI, remote_ip(i), mac(remote_ip(i)))?;
            }
            let blocks = (0..fdb_entries.div_ceil(256)).map(|b| (remote_ip(b * 256), BlockOwner::Remote(PEERS[b % 3])));
            let learned = (learned_ip(0), BlockOwner::Remote(PEERS[1]));
            let local = (Ipv4Addr::new(10, 0, 0, 0), BlockOwner::Local);
            tx.set_blocks(VNI, 24, blocks.chain([learned, local]))?;
            tx.set_gateway(VNI, Some(Ipv4Addr::new(10, 0, 0, 1)))?;
            tx.set_local_endpoints(VNI, [(mac(LOCAL_IP), LOCAL_IP)])
        })
        .expect("a valid table update");
    shared.load()
}

/// A published learned FDB with `n` containers of network [`VNI`] learned behind the peers.
fn learned_fdb(n: usize) -> Arc<LearnedFdb> {
    // The learner queues a bounded number of new entries per batch; stay well under it.
    const BATCH: usize = 128;
    let shared = shared_learned();
    let mut learner = Learner::new(Arc::clone(&shared), n.max(1), DEFAULT_AGEING_SECS);
    let counters = Counters::default();
    for start in (0..n).step_by(BATCH) {
        for i in start..(start + BATCH).min(n) {
            learner.observe(VNI, mac(learned_ip(i)), PEERS[i % PEERS.len()], 0);
        }
        learner.end_batch(0, &counters);
    }
    let fdb = shared.load_full();
    assert_eq!(fdb.len(), n, "every entry learned");
    fdb
}

// ---------------------------------------------------------------------------------------------
// Timing.

/// Times `routine` as one frame per iteration, after checking that it does not allocate: the
/// hot loops promise no per-frame allocation, and a benchmark that allocated would be timing
/// the allocator.
fn bench_frame<O>(group: &mut BenchmarkGroup<'_, WallTime>, id: &str, mut routine: impl FnMut() -> O) {
    assert!(alloc_count::is_installed(), "the counting allocator is the global allocator");
    black_box(routine()); // the first call may warm lazily initialised state
    let before = alloc_count::thread_allocations();
    for _ in 0..ALLOCATION_CHECK_CALLS {
        black_box(routine());
    }
    let allocations = alloc_count::thread_allocations() - before;
    assert_eq!(allocations, 0, "{id} allocated {allocations} times in {ALLOCATION_CHECK_CALLS} calls");
    group.throughput(Throughput::Elements(1));
    group.bench_function(id, |b| b.iter(&mut routine));
}

/// A routine that looks up `probes[0]`, `probes[1]`, … in turn, one per call.
fn cycling<'p, K, O>(probes: &'p [K], mut lookup: impl FnMut(&'p K) -> O) -> impl FnMut() -> O {
    assert!(probes.len().is_power_of_two());
    let mask = probes.len() - 1;
    let mut next = 0usize;
    move || {
        let key = &probes[next & mask];
        next = next.wrapping_add(1);
        lookup(black_box(key))
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmarks.

fn encap(c: &mut Criterion) {
    let frame = tcp_ipv4_frame(LOCAL_IP, remote_ip(0));
    let mut buf = vec![0u8; HEADROOM + frame.len()];
    buf[HEADROOM..].copy_from_slice(&frame);
    // The datagram: the headroom's last bytes, for the VXLAN header, and the frame behind them.
    let (_, datagram) = buf.split_at_mut(HEADROOM - vxlan::HEADER_LEN);

    let mut g = c.benchmark_group("encap");
    bench_frame(&mut g, "ipv4_tcp_1450", || {
        let mut packet = VxlanPacket::new_checked(black_box(&mut *datagram)).expect("room for the header");
        let sock = port_index(flow_hash(black_box(packet.payload())), black_box(SOURCE_PORTS));
        VxlanRepr::plain(black_box(VNI)).emit(&mut packet);
        sock
    });
    g.finish();

    let v4 = tcp_ipv4_frame(LOCAL_IP, remote_ip(0));
    let v6 = tcp_ipv6_frame(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3));
    let mut g = c.benchmark_group("flow_hash");
    bench_frame(&mut g, "ipv4_tcp", || flow_hash(black_box(&v4[..])));
    bench_frame(&mut g, "ipv6_tcp", || flow_hash(black_box(&v6[..])));
    g.finish();
}

fn decap(c: &mut Criterion) {
    // The network knows 1,000 remote containers (so the FDB check before learning is a real
    // lookup), but not this segment's sender, so with learning on the learner is asked about
    // it on every datagram.
    const CONTAINERS: usize = 1_000;
    let sender = PEERS[1];
    let now = 1_000;
    let counters = Counters::default();
    let (src, dst) = (learned_ip(0), LOCAL_IP);
    let mut datagram = vxlan_datagram(VNI, &tcp_ipv4_frame(src, dst));
    let deliver = UnderlayVerdict::Deliver {
        slot: 0,
        inner: vxlan::HEADER_LEN..datagram.len(),
        segment_mss: None,
        partial: None,
    };
    let mut bad_flags = datagram.clone();
    bad_flags[0] = 0x0c; // the G bit of the group-policy extension, which we do not speak
    // The same segment as a kernel VTEP over veth sends it: the TCP checksum field holds only
    // the pseudo-header sum, which the RX path completes in place.
    let field = vxlan::HEADER_LEN + TCP_V4_CHECKSUM_AT..vxlan::HEADER_LEN + TCP_V4_CHECKSUM_AT + 2;
    let partial_sum = ones_complement_sum(&[&pseudo_header_v4(src, dst, FRAME_LEN - 34)]).to_be_bytes();
    let mut partial = datagram.clone();
    partial[field.clone()].copy_from_slice(&partial_sum);

    let mut g = c.benchmark_group("decap");

    let snapshot = tables(CONTAINERS, false, false);
    let mut learner = Learner::new(shared_learned(), DEFAULT_MAX_ENTRIES, DEFAULT_AGEING_SECS);
    let mut decap = |d: &mut [u8]| {
        switch::from_underlay(
            &snapshot,
            &mut switch::Openers::default(),
            &mut learner,
            black_box(sender),
            black_box(d),
            black_box(now),
            &counters,
        )
    };
    assert_eq!(decap(&mut datagram), deliver);
    assert_eq!(decap(&mut bad_flags), UnderlayVerdict::Drop(DropReason::BadFlags));
    assert_eq!(decap(&mut partial), deliver);
    assert_eq!(partial, datagram, "the completed checksum is the genuine one");
    assert_eq!(counters.rx.checksums_completed.load(Relaxed), 1);
    bench_frame(&mut g, "deliver_learning_off", || decap(&mut datagram));
    bench_frame(&mut g, "drop_bad_flags", || decap(&mut bad_flags));
    bench_frame(&mut g, "deliver_checksum_completed", || {
        // The previous call completed the checksum in place; make it partial again.
        partial[field.clone()].copy_from_slice(&partial_sum);
        decap(&mut partial)
    });

    let snapshot = tables(CONTAINERS, false, true);
    let shared = shared_learned();
    let mut learner = Learner::new(Arc::clone(&shared), DEFAULT_MAX_ENTRIES, DEFAULT_AGEING_SECS);
    // Learn the sender's container once, so the timed calls take the refresh path.
    let verdict = switch::from_underlay(
        &snapshot,
        &mut switch::Openers::default(),
        &mut learner,
        sender,
        &mut datagram,
        now,
        &counters,
    );
    assert_eq!(verdict, deliver);
    learner.end_batch(now, &counters);
    assert_eq!(shared.load().lookup(VNI, mac(src)), Some(sender));
    bench_frame(&mut g, "deliver_learning_refresh", || {
        switch::from_underlay(
            &snapshot,
            &mut switch::Openers::default(),
            &mut learner,
            black_box(sender),
            black_box(&mut datagram),
            black_box(now),
            &counters,
        )
    });
    let published = Arc::as_ptr(&shared.load_full());
    learner.end_batch(now, &counters);
    assert_eq!(Arc::as_ptr(&shared.load_full()), published, "refreshing published nothing new");

    // A cluster network: the segment's source must lie in the sender's block.
    let snapshot = cluster_tables(CONTAINERS);
    let mut learner = Learner::new(shared_learned(), DEFAULT_MAX_ENTRIES, DEFAULT_AGEING_SECS);
    let mut decap = |d: &mut [u8]| {
        switch::from_underlay(
            &snapshot,
            &mut switch::Openers::default(),
            &mut learner,
            black_box(sender),
            black_box(d),
            black_box(now),
            &counters,
        )
    };
    assert_eq!(decap(&mut datagram), deliver);
    bench_frame(&mut g, "deliver_source_checked", || decap(&mut datagram));
    assert_eq!(counters.drops(DropReason::SourceNotOfSender), 0);

    g.finish();
}

fn fdb_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("fdb_lookup");
    for n in [10, 1_000, 100_000] {
        let snapshot = tables(n, false, false);
        let net = snapshot.by_vni(VNI).expect("the network exists").1;
        let hits: Vec<MacAddr> = probe_indices(n).map(|i| mac(remote_ip(i))).collect();
        let misses: Vec<MacAddr> = (0..PROBES).map(|i| mac(unknown_ip(i))).collect();
        assert!(hits.iter().all(|m| net.fdb(m).is_some()) && misses.iter().all(|m| net.fdb(m).is_none()));
        bench_frame(&mut g, &format!("hit/{n}"), cycling(&hits, |m| net.fdb(m)));
        bench_frame(&mut g, &format!("miss/{n}"), cycling(&misses, |m| net.fdb(m)));
    }
    g.finish();

    let mut g = c.benchmark_group("learned_fdb_lookup");
    for n in [10, 1_000, DEFAULT_MAX_ENTRIES] {
        let learned = learned_fdb(n);
        let hits: Vec<MacAddr> = probe_indices(n).map(|i| mac(learned_ip(i))).collect();
        let misses: Vec<MacAddr> = (0..PROBES).map(|i| mac(unknown_ip(i))).collect();
        assert!(hits.iter().all(|&m| learned.lookup(VNI, m).is_some()));
        assert!(misses.iter().all(|&m| learned.lookup(VNI, m).is_none()));
        bench_frame(&mut g, &format!("hit/{n}"), cycling(&hits, |&m| learned.lookup(black_box(VNI), m)));
        bench_frame(&mut g, &format!("miss/{n}"), cycling(&misses, |&m| learned.lookup(black_box(VNI), m)));
    }
    g.finish();
}

fn from_tap(c: &mut Criterion) {
    // A network of 1,000 remote containers, each in the FDB and the ARP table, and 1,000 more
    // learned from the data plane, so that misses go through both maps.
    const CONTAINERS: usize = 1_000;
    let snapshot = tables(CONTAINERS, true, false);
    let net = snapshot.by_vni(VNI).expect("the network exists").1;
    let learned = learned_fdb(CONTAINERS);
    let counters = Counters::default();
    let mut reply = [0u8; arp::MAX_REPLY_LEN];

    let known = tcp_ipv4_frame(LOCAL_IP, remote_ip(500));
    let unknown = tcp_ipv4_frame(LOCAL_IP, unknown_ip(500));
    let arp_known = arp_request(LOCAL_IP, remote_ip(500));
    let arp_unknown = arp_request(LOCAL_IP, unknown_ip(500));

    let mut decide = |frame: &[u8]| switch::from_tap(net, &learned, black_box(frame), &mut reply, &counters);
    assert_eq!(decide(&known), TapVerdict::Unicast(PEERS[500 % PEERS.len()]));
    assert_eq!(decide(&unknown), TapVerdict::Flood(&PEERS));
    assert_eq!(decide(&arp_known), TapVerdict::ArpReply(42));
    assert_eq!(decide(&arp_unknown), TapVerdict::Flood(&PEERS));

    let mut g = c.benchmark_group("from_tap");
    bench_frame(&mut g, "known_unicast", || decide(&known));
    bench_frame(&mut g, "unknown_unicast_flood", || decide(&unknown));
    bench_frame(&mut g, "arp_answered", || decide(&arp_known));
    bench_frame(&mut g, "arp_flood", || decide(&arp_unknown));

    // A cluster network: the frame's source must be this host's endpoint.
    let snapshot = cluster_tables(CONTAINERS);
    let net = snapshot.by_vni(VNI).expect("the network exists").1;
    let mut decide = |frame: &[u8]| switch::from_tap(net, &learned, black_box(frame), &mut reply, &counters);
    assert_eq!(decide(&known), TapVerdict::Unicast(PEERS[500 % PEERS.len()]));
    bench_frame(&mut g, "known_unicast_source_checked", || decide(&known));
    assert_eq!(counters.drops(DropReason::SourceNotLocal), 0);
    g.finish();
    assert_eq!(counters.drops(DropReason::NoDestination), 0);
}

/// The offload path's own work, per 64 KB TCP super-frame: the Internet checksum, cutting a
/// super-frame into segments (headers only: the payload stays where it is, as the TX loop
/// sends it), and joining the segments again (verifying each segment's checksum).
fn offload(c: &mut Criterion) {
    use dataplane::offload::{Coalescer, TcpSegment};
    use dataplane::segment::SuperFrame;
    use dataplane::wire::checksum;

    let mut group = c.benchmark_group("offload");
    for len in [1448usize, 65_536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("checksum_{len}"), |b| {
            b.iter(|| checksum::fold(checksum::sum(black_box(&data), 0)))
        });
    }
    // A 64 KB super-frame as a TAP hands it over: 46 segments of 1398 bytes after 66 bytes of headers.
    let mut frame = tcp_ipv4_frame(remote_ip(1), remote_ip(2));
    frame.truncate(14 + 20 + 20);
    frame[14 + 20 + 12] = 0x80; // TCP header of 32 bytes (timestamps)
    frame.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    frame.extend((0..64_000u32).map(|i| (i * 13) as u8));
    let sf = SuperFrame::parse(&frame).expect("super-frame");
    let mss = 1398;
    let n = sf.segment_count(mss);
    let mut headers = vec![0u8; 160 * n];
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("segment_64k_headers_only", |b| {
        b.iter(|| {
            for i in 0..n {
                black_box(sf.write_segment_headers(i, mss, &mut headers[i * 160..]));
            }
        })
    });
    let segments = sf.to_segments(mss);
    let mut first = segments[0].clone();
    group.bench_function("coalesce_64k", |b| {
        b.iter(|| {
            first.copy_from_slice(&segments[0]);
            let mut run = Coalescer::new(TcpSegment::parse(&first).expect("segment"));
            for s in &segments[1..] {
                let seg = TcpSegment::parse(s).expect("segment");
                assert!(run.try_push(&first, s, &seg));
            }
            black_box(run.finish(&mut first))
        })
    });
    group.finish();
}

criterion_group!(benches, encap, decap, fdb_lookup, from_tap, offload);
criterion_main!(benches);
