//! The TAP → underlay hot loop: read frames from the TAPs, decide, encapsulate them in place
//! and send them in batches of `sendmmsg`, a super-frame cut into GSO runs without copying its
//! payload. Nothing is allocated per frame.

// Raw pointers and system calls stay in `batch` and `sys`.
#![forbid(unsafe_code)]

use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::batch::{SegmentArena, SendBatch};
use super::rx::RxLoop;
use super::sys::Epoll;
use super::threads::SplitMeter;
use super::{HEADROOM, Shared, Tap, UNDERLAY, WAKE};
use crate::alloc_count;
use crate::counters::{DropReason, NetworkCounters, bump};
use crate::crypto::{self, Sealer};
use crate::learn::LearnedReader;
use crate::offload::{self, TxShape, VNET_HDR_LEN, VirtioNetHdr};
use crate::segment::Transport;
use crate::segment::{MAX_UDP_PAYLOAD, SuperFrame};
use crate::switch::{self, TapVerdict};
use crate::tables::{Tables, TablesReader};
use crate::wire::arp;
use crate::wire::flow::{flow_hash, port_index};
use crate::wire::vxlan::{self, RemoteChecksum, VxlanPacket, VxlanRepr};

/// Frames (or super-frames) read from one TAP before their datagrams are sent.
pub(crate) const BATCH: usize = 64;
/// Bytes read from one TAP before their datagrams are sent: four 64 KB super-frames. Reading
/// a whole [`BATCH`] of super-frames (4 MB) first would push them out of a core's L2 cache
/// before the checksums and the kernel's copy in `sendmsg` read them again.
const BATCH_BYTES: usize = 256 * 1024;
/// Rounds of [`BATCH`] frames taken from one TAP before looking at the others.
const ROUNDS_PER_WAKEUP: usize = 8;
/// Messages per `sendmmsg` call (a flood to many VTEPs may need several calls).
const MMSG_CAP: usize = 512;
/// Largest frame read from a TAP (a 64 KB super-frame and its Ethernet header).
const FRAME_CAP: usize = 65_536 + 64;
/// The kernel's limit of segments per GSO send (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most segments one super-frame may be cut into (64 KB at an MSS of 512).
const MAX_SEGMENTS: usize = 128;
/// Segments the header arena holds for one batch; when a super-frame does not fit any more,
/// what is queued is sent first and the arena starts over.
const ARENA_SEGMENTS: usize = 1024;
/// Room per segment in the header arena: VXLAN, Ethernet with two VLAN tags, IPv6 or IPv4
/// with options, TCP with options.
const SEG_HDR_CAP: usize = 160;
/// Segments the sealed arena holds: an encrypted network's segments are written there whole
/// (header, copied payload, tag), each sealed in place.
const SEALED_ARENA_SEGMENTS: usize = 2 * MAX_SEGMENTS;
/// Room per sealed segment: the sealed header, the segment's headers, a payload of up to a
/// 9000-byte MTU, the tag.
const SEALED_SEG_CAP: usize = crypto::SEALED_HEADER_LEN + SEG_HDR_CAP + 9000 + crypto::TAG_LEN;

/// The datagrams of a batch for one source-port socket: plain datagrams, GSO runs and copies
/// for each flood-list member leave in one `sendmmsg` (more if there are more than
/// [`MMSG_CAP`]).
struct SendQueue {
    fd: RawFd,
    batch: SendBatch,
    /// The last message queued, when it is a run of segments that the next ones may continue.
    open: Option<OpenRun>,
}

/// A run of equal segments at the end of a send queue that may still grow: its last segment
/// is full-sized, and it ends at segment `end` of the arena.
#[derive(Clone, Copy)]
struct OpenRun {
    dst: IpAddr,
    seg_size: usize,
    segments: usize,
    end: usize,
}

impl SendQueue {
    fn new(fd: RawFd) -> SendQueue {
        SendQueue { fd, batch: SendBatch::new(MMSG_CAP), open: None }
    }

    /// Queues bytes `range` of frame buffer `frame` as one datagram.
    #[inline]
    fn push_datagram(&mut self, frame: usize, range: Range<usize>, dst: IpAddr, port: u16) {
        self.open = None;
        self.batch.push_datagram(frame, range, dst, port);
    }

    /// Queues `segments` of the arena as one message; with `gso_size > 0` it is a GSO run of
    /// datagrams of that size.
    #[inline]
    fn push_segments(&mut self, segments: Range<usize>, dst: IpAddr, port: u16, gso_size: u16) {
        self.open = None;
        self.batch.push_segments(segments, dst, port, gso_size);
    }

    /// Continues the open run with the `segments` that follow it in the arena; the caller
    /// checked [`SendQueue::open_for`]. Returns whether the message became a GSO run only now,
    /// or `None` if nothing was continued.
    fn extend_open(&mut self, segments: usize, full_last: bool, max_run: usize) -> Option<bool> {
        let mut open = self.open.take()?;
        // A run of one went as a plain datagram so far; it needs UDP_SEGMENT now.
        let became_gso = self.batch.extend_last(segments, open.seg_size as u16)?;
        open.segments += segments;
        open.end += segments;
        if full_last && open.segments < max_run {
            self.open = Some(open);
        }
        Some(became_gso)
    }

    /// How many segments the open run can still take, if it goes to `dst` in datagrams of
    /// `seg_size` and ends where arena segment `next` begins.
    fn open_for(&self, dst: IpAddr, seg_size: usize, next: usize, max_run: usize) -> usize {
        match self.open {
            Some(o) if o.dst == dst && o.seg_size == seg_size && o.end == next => max_run - o.segments,
            _ => 0,
        }
    }

    /// Sends everything queued, its bytes read from `frames` and `arena`; what the kernel
    /// refuses is charged to `net`, the network whose frames these are (a queue is flushed
    /// before the loop turns to another TAP).
    fn flush(&mut self, shared: &Shared, net: &NetworkCounters, frames: &[Box<[u8]>], arena: &mut SegmentArena) {
        self.open = None;
        let c = &shared.counters;
        let mut sent = 0;
        while sent < self.batch.len() {
            match self.batch.send(self.fd, sent, frames, arena) {
                Ok(n) => {
                    sent += n.max(1);
                    bump(&c.tx.send_calls, 1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The first unsent message is the one the kernel refused.
                    if self.batch.is_gso(sent) {
                        // UDP GSO refused (EIO without checksum offload on the route, EINVAL,
                        // EMSGSIZE …): stop using it and send this run datagram by datagram.
                        if shared.gso_ok.swap(false, Ordering::Relaxed) {
                            bump(&c.tx.gso_disabled, 1);
                        }
                        for _ in 0..self.batch.send_each_segment(self.fd, sent, frames, arena) {
                            c.dropped_in(net, DropReason::SendFailed);
                        }
                    } else {
                        c.dropped_in(net, DropReason::SendFailed);
                    }
                    sent += 1;
                }
            }
        }
        self.batch.clear();
    }
}

pub(crate) struct TxLoop {
    shared: Arc<Shared>,
    tables: TablesReader<Arc<Tap>>,
    learned: LearnedReader,
    epoll: Arc<Epoll>,
    /// TAPs registered with epoll: (slot, TAP). Capacity reserved up front.
    registered: Vec<(usize, Arc<Tap>)>,
    registered_generation: u64,
    queues: Box<[SendQueue]>,
    /// A frame per buffer, read behind [`HEADROOM`] bytes so that the VXLAN header is written
    /// in front of it in place.
    bufs: Box<[Box<[u8]>]>,
    arena: SegmentArena,
    /// The arena of an encrypted network's round (swapped with `arena` for the round).
    sealed_arena: SegmentArena,
    reply: [u8; VNET_HDR_LEN + arp::MAX_REPLY_LEN],
}

impl TxLoop {
    pub(crate) fn new(shared: Arc<Shared>, tx_fds: &[RawFd]) -> io::Result<TxLoop> {
        let epoll = Arc::new(Epoll::new()?);
        epoll.add(shared.tx_wake.fd(), WAKE)?;
        Ok(TxLoop {
            tables: shared.tables.reader(),
            learned: arc_swap::Cache::new(Arc::clone(&shared.learned)),
            epoll,
            registered: Vec::with_capacity(256),
            registered_generation: u64::MAX,
            queues: tx_fds.iter().map(|&fd| SendQueue::new(fd)).collect(),
            bufs: (0..BATCH).map(|_| vec![0u8; HEADROOM + FRAME_CAP].into_boxed_slice()).collect(),
            arena: SegmentArena::new(ARENA_SEGMENTS, SEG_HDR_CAP),
            sealed_arena: SegmentArena::new(SEALED_ARENA_SEGMENTS, SEALED_SEG_CAP),
            reply: [0; VNET_HDR_LEN + arp::MAX_REPLY_LEN],
            shared,
        })
    }

    /// Watches the underlay socket `fd` too, for running the receive loop on this thread.
    pub(crate) fn watch_underlay(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.add(fd, UNDERLAY)
    }

    /// The epoll set this loop waits on (the receive loop of
    /// [`LoopThreads::Auto`](super::LoopThreads::Auto) adds its socket back when it joins).
    pub(crate) fn epoll(&self) -> Arc<Epoll> {
        Arc::clone(&self.epoll)
    }

    /// Runs until the dataplane stops. Without `rx`, this thread only transmits (the receive
    /// loop has a thread of its own). With `rx` (whose socket [`TxLoop::watch_underlay`]
    /// added), this thread also runs the receive loop, woken by the same epoll; and with
    /// `may_split` ([`LoopThreads::Auto`](super::LoopThreads::Auto)), once its [`SplitMeter`]
    /// finds this thread busy more than half the time, it takes the socket out of its
    /// epoll set and wakes the receive thread ([`RxLoop::run`]), which runs the receive
    /// loop until the load falls and hands it back. `rx` is locked once per wake-up while
    /// this thread receives, never per packet, and not at all while the loops are split.
    pub(crate) fn run(mut self, rx: Option<&Mutex<RxLoop>>, may_split: bool) {
        let rx_fd = rx.map(|rx| rx.lock().unwrap_or_else(|p| p.into_inner()).fd());
        let shared = Arc::clone(&self.shared);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        let mut meter = SplitMeter::new(Instant::now());
        while !shared.stop.load(Ordering::Acquire) {
            let split = shared.split.load(Ordering::Acquire);
            let allocations = alloc_count::thread_allocations();
            shared.counters.tx.loop_allocations.store(allocations, Ordering::Relaxed);
            let tables = Arc::clone(self.tables.load());
            if tables.generation() != self.registered_generation {
                self.sync_taps(&tables);
                // Joined, the receive loop runs only when a datagram comes: without this it
                // would hold a removed network's TAP open, and the network could not come back.
                // Split, it is busy on its own thread and loads the tables itself.
                if let Some(rx) = rx
                    && !split
                    && let Ok(mut rx) = rx.try_lock()
                {
                    rx.refresh_tables();
                }
            }
            let n = self.epoll.wait(&mut events, 1000).unwrap_or(0);
            let start = may_split.then(Instant::now);
            for ev in &events[..n] {
                match ev.u64 {
                    WAKE => shared.tx_wake.drain(),
                    UNDERLAY => {
                        // A readiness reported before the socket left the set is the receive
                        // thread's now.
                        if let Some(rx) = rx
                            && !shared.split.load(Ordering::Acquire)
                        {
                            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                            shared.counters.rx.loop_allocations.store(allocations, Ordering::Relaxed);
                            receive_rounds(&mut rx);
                        }
                    }
                    slot => self.drain_tap(&tables, slot as usize),
                }
            }
            let Some(start) = start else { continue };
            let now = Instant::now();
            let spent = now.saturating_duration_since(start);
            meter.add_busy(spent);
            shared.tx_busy_ns.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
            if meter.poll(now) == Some(true)
                && let Some(fd) = rx_fd
                && !split
                && self.epoll.delete(fd).is_ok()
            {
                shared.split.store(true, Ordering::Release);
                shared.loop_switches.fetch_add(1, Ordering::Relaxed);
                shared.rx_wake.notify();
            }
        }
    }

    /// Makes the epoll set match the tables' networks. Allocates nothing unless a network
    /// appeared beyond the reserved capacity.
    fn sync_taps(&mut self, tables: &Tables<Arc<Tap>>) {
        let epoll = &self.epoll;
        self.registered.retain(|(slot, tap)| {
            let keep = tables.network(*slot).is_some_and(|n| Arc::ptr_eq(n.tap(), tap));
            if !keep {
                let _ = epoll.delete(tap.as_raw_fd());
            }
            keep
        });
        for (slot, net) in tables.networks() {
            if !self.registered.iter().any(|(s, _)| *s == slot) && epoll.add(net.tap().as_raw_fd(), slot as u64).is_ok()
            {
                self.registered.push((slot, Arc::clone(net.tap())));
            }
        }
        self.registered_generation = tables.generation();
    }

    /// Reads, switches, encapsulates and sends what the TAP of `slot` holds: up to
    /// [`ROUNDS_PER_WAKEUP`] batches of frames, each sent before the next is read.
    fn drain_tap(&mut self, tables: &Tables<Arc<Tap>>, slot: usize) {
        let Some(net) = tables.network(slot) else { return };
        let tap = net.tap();
        let vnet = tap.offloads().vnet_hdr;
        let read_at = if vnet { HEADROOM - VNET_HDR_LEN } else { HEADROOM };
        let learned = Arc::clone(self.learned.load());
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        let nc = net.counters();
        let udp_port = shared.settings.vxlan_port;
        let gso = shared.gso_ok.load(Ordering::Relaxed);
        // An encrypted network seals every datagram, or sends nothing (never plaintext). Its
        // rounds cut into the sealed arena: everything is sent before the swap back.
        let crypto = net.crypto();
        if crypto.is_some() {
            std::mem::swap(&mut self.arena, &mut self.sealed_arena);
        }
        for _ in 0..ROUNDS_PER_WAKEUP {
            // Read up to a batch of frames, each into its own buffer.
            let mut lens = [0usize; BATCH];
            let mut count = 0;
            let mut drained = false;
            let mut bytes = 0;
            while count < BATCH && bytes < BATCH_BYTES {
                match tap.read(&mut self.bufs[count][read_at..]) {
                    Ok(n) if n >= read_at.abs_diff(HEADROOM) => {
                        lens[count] = n - (HEADROOM - read_at);
                        bytes += n;
                        count += 1;
                    }
                    Ok(_) => c.dropped_in(nc, DropReason::RuntFrame),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        drained = true; // WouldBlock, or the TAP went away
                        break;
                    }
                }
            }
            self.arena.clear();
            // The network's counters once per batch; the dataplane's per frame, as they were.
            bump(&nc.tx.frames, count as u64);
            bump(&nc.tx.bytes, lens[..count].iter().sum::<usize>() as u64);
            for (i, &len) in lens.iter().enumerate().take(count) {
                bump(&c.tx.frames, 1);
                bump(&c.tx.bytes, len as u64);
                let buf = &mut self.bufs[i];
                let shape = if vnet {
                    let hdr = VirtioNetHdr::parse(buf[read_at..HEADROOM].try_into().expect("10 bytes"));
                    match offload::prepare_tx(&hdr, &mut buf[HEADROOM..HEADROOM + len]) {
                        Ok(shape) => shape,
                        Err(_) => {
                            c.dropped_in(nc, DropReason::UnsupportedOffload);
                            continue;
                        }
                    }
                } else {
                    TxShape::Whole
                };
                let sealer = match crypto.map(|c| c.sealer()) {
                    None => None,
                    Some(Some(s)) => Some(s),
                    Some(None) => {
                        c.dropped_in(nc, DropReason::NoSealingKey);
                        continue;
                    }
                };
                let frame = &buf[HEADROOM..HEADROOM + len];
                let reply = &mut self.reply;
                let (reply_hdr, reply_frame) = reply.split_at_mut(VNET_HDR_LEN);
                let reply_frame: &mut [u8; arp::MAX_REPLY_LEN] = reply_frame.try_into().expect("reply size");
                let verdict = switch::from_tap(net, &learned, frame, reply_frame, c);
                let one;
                let dsts: &[IpAddr] = match verdict {
                    TapVerdict::Drop(_) => continue,
                    TapVerdict::ArpReply(n) => {
                        reply_hdr.fill(0);
                        let start = if vnet { 0 } else { VNET_HDR_LEN };
                        if tap.write(&self.reply[start..VNET_HDR_LEN + n]).is_err() {
                            c.dropped_in(nc, DropReason::ArpReplyFailed);
                        }
                        continue;
                    }
                    TapVerdict::Unicast(vtep) => {
                        one = [vtep];
                        &one
                    }
                    TapVerdict::Flood(list) => list,
                };
                let q = port_index(flow_hash(frame), self.queues.len());
                match shape {
                    TxShape::Whole => {
                        let datagram = if let Some(sealer) = sealer {
                            let start = HEADROOM - crypto::SEALED_HEADER_LEN;
                            let end = HEADROOM + len + crypto::TAG_LEN;
                            if end - start > MAX_UDP_PAYLOAD || end > buf.len() {
                                c.dropped_in(nc, DropReason::FrameTooLarge);
                                continue;
                            }
                            // Sealed once, the same bytes go to every destination.
                            sealer.seal(net.vni(), sealer.reserve(1), &mut buf[start..end], len);
                            start..end
                        } else {
                            if len + vxlan::HEADER_LEN > MAX_UDP_PAYLOAD {
                                c.dropped_in(nc, DropReason::FrameTooLarge);
                                continue;
                            }
                            let datagram = HEADROOM - vxlan::HEADER_LEN..HEADROOM + len;
                            let mut packet =
                                VxlanPacket::new_checked(&mut buf[datagram.clone()]).expect("headroom for the header");
                            VxlanRepr::plain(net.vni()).emit(&mut packet);
                            datagram
                        };
                        let queue = &mut self.queues[q];
                        for &dst in dsts {
                            if queue.batch.is_full() {
                                queue.flush(&shared, nc, &self.bufs, &mut self.arena);
                            }
                            queue.push_datagram(i, datagram.clone(), dst, udp_port);
                            bump(&c.tx.datagrams, 1);
                        }
                    }
                    TxShape::Segment { mss } => {
                        if self.arena.room() < MAX_SEGMENTS {
                            // Everything queued may name segments of the arena: send it, then
                            // reuse the arena.
                            flush_all(&mut self.queues, &shared, nc, &self.bufs, &mut self.arena);
                            self.arena.clear();
                        }
                        let frame = &self.bufs[i][HEADROOM..HEADROOM + len];
                        let cut = match sealer {
                            None => {
                                let rco = matches!(dsts, [one] if tables.takes_remote_checksum(one));
                                let cut = cut(frame, i, mss, net.vni(), &mut self.arena, rco);
                                if let Some(cut) = cut.filter(|cut| cut.remote_checksum) {
                                    bump(&c.tx.remote_checksums, cut.segments as u64);
                                }
                                cut
                            }
                            Some(sealer) => cut_sealed(frame, i, mss, net.vni(), &mut self.arena, sealer),
                        };
                        let Some(cut) = cut else {
                            c.dropped_in(nc, DropReason::UnsupportedOffload);
                            continue;
                        };
                        bump(&c.tx.segmented, 1);
                        let queue = &mut self.queues[q];
                        send_segments(queue, &shared, nc, &self.bufs, &mut self.arena, cut, dsts, udp_port, gso);
                    }
                }
            }
            flush_all(&mut self.queues, &shared, nc, &self.bufs, &mut self.arena);
            if drained {
                break;
            }
        }
        if crypto.is_some() {
            std::mem::swap(&mut self.arena, &mut self.sealed_arena);
        }
    }
}

/// Up to [`ROUNDS_PER_WAKEUP`] receive calls on a thread that also reads the TAPs, with
/// nothing left pending when it turns back to them.
fn receive_rounds(rx: &mut RxLoop) {
    for _ in 0..ROUNDS_PER_WAKEUP {
        if !rx.receive() {
            return;
        }
    }
    rx.finish();
}

/// Sends what every queue holds (all of it `net`'s).
fn flush_all(
    queues: &mut [SendQueue],
    shared: &Shared,
    net: &NetworkCounters,
    frames: &[Box<[u8]>],
    arena: &mut SegmentArena,
) {
    for q in queues.iter_mut().filter(|q| q.batch.len() > 0) {
        q.flush(shared, net, frames, arena);
    }
}

/// A super-frame cut into the arena.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// Its first segment's index in the arena.
    first: usize,
    segments: usize,
    /// The size of every datagram but the last.
    seg_size: usize,
    /// Whether the last datagram has that size too (a run may go on after it).
    full_last: bool,
    /// The inner checksums are left partial (VXLAN remote checksum offload).
    remote_checksum: bool,
}

/// Cuts `frame`, a super-frame read into buffer `buf` (behind [`HEADROOM`] bytes), into
/// `arena` after the segments already there, without copying its payload: only the headers of
/// every segment (VXLAN, Ethernet, IP, TCP or UDP, with checksums computed over the payload
/// where it lies) are written, and each segment's datagram is that header followed by its
/// payload in `buf`. `None` if the frame cannot be cut here. The caller made room for
/// [`MAX_SEGMENTS`].
///
/// With `remote_checksum` (the one destination takes VXLAN remote checksum offload) the
/// checksums are left partial, the payload not read at all, and each VXLAN header says so.
fn cut(
    frame: &[u8],
    buf: usize,
    mss: usize,
    vni: crate::Vni,
    arena: &mut SegmentArena,
    remote_checksum: bool,
) -> Option<Cut> {
    let sf = SuperFrame::parse(frame).ok()?;
    let n = sf.segment_count(mss);
    let hdr_len = vxlan::HEADER_LEN + sf.header_len();
    if n > MAX_SEGMENTS || hdr_len > SEG_HDR_CAP || hdr_len + mss > MAX_UDP_PAYLOAD || arena.room() < n {
        return None;
    }
    let rco = remote_checksum.then(|| RemoteChecksum::new(sf.l4_offset(), sf.transport() == Transport::Udp)).flatten();
    let vxlan = VxlanRepr { vni, rco };
    let first = arena.len();
    let mut full_last = false;
    for s in 0..n {
        let payload = sf.segment_payload(s, mss);
        full_last = payload.len() == mss;
        let header = arena.push(buf, HEADROOM + payload.start..HEADROOM + payload.end, hdr_len)?;
        let mut packet = VxlanPacket::new_checked(header).ok()?;
        vxlan.emit(&mut packet);
        if rco.is_some() {
            sf.write_segment_headers_partial(s, mss, packet.payload_mut());
        } else {
            sf.write_segment_headers(s, mss, packet.payload_mut());
        }
    }
    Some(Cut { first, segments: n, seg_size: hdr_len + mss, full_last, remote_checksum: rco.is_some() })
}

/// [`cut`] for an encrypted network: each segment is written whole into `arena` (whose room
/// per segment is [`SEALED_SEG_CAP`]) — the sealed header, the segment's headers (checksums
/// computed over the payload where it lies), its payload copied, the tag — and sealed in
/// place with consecutive counters, in the same pass. The datagrams have one size but the
/// last, so they still leave as GSO runs.
fn cut_sealed(
    frame: &[u8],
    buf: usize,
    mss: usize,
    vni: crate::Vni,
    arena: &mut SegmentArena,
    sealer: &Sealer,
) -> Option<Cut> {
    let sf = SuperFrame::parse(frame).ok()?;
    let n = sf.segment_count(mss);
    let hl = sf.header_len();
    let seg_size = crypto::SEALED_HEADER_LEN + hl + mss + crypto::TAG_LEN;
    if n > MAX_SEGMENTS
        || hl > SEG_HDR_CAP
        || seg_size > SEALED_SEG_CAP
        || seg_size > MAX_UDP_PAYLOAD
        || arena.room() < n
    {
        return None;
    }
    let first = arena.len();
    let counter = sealer.reserve(n as u64);
    let mut full_last = false;
    for s in 0..n {
        let payload = sf.segment_payload(s, mss);
        full_last = payload.len() == mss;
        let plain = hl + payload.len();
        // The payload is in the segment itself: none follows it from the frame buffer.
        let at = HEADROOM + payload.start;
        let out = arena.push(buf, at..at, crypto::SEALED_HEADER_LEN + plain + crypto::TAG_LEN)?;
        let body = &mut out[crypto::SEALED_HEADER_LEN..];
        sf.write_segment_headers(s, mss, &mut body[..hl]);
        body[hl..plain].copy_from_slice(&frame[payload]);
        sealer.seal(vni, counter + s as u64, out, plain);
    }
    Some(Cut { first, segments: n, seg_size, full_last, remote_checksum: false })
}

/// Queues the segments of `cut` to every destination: as GSO runs when allowed, so that one
/// system call and one pass through the UDP stack carry up to [`MAX_GSO_SEGMENTS`] datagrams,
/// else one datagram per segment. A unicast super-frame first continues the run its queue left
/// open (one whose last segment was full), so a stream of 64 KB super-frames leaves as runs of
/// 64 KB, not as a long and a short run per super-frame.
#[allow(clippy::too_many_arguments)]
fn send_segments(
    queue: &mut SendQueue,
    shared: &Shared,
    net: &NetworkCounters,
    frames: &[Box<[u8]>],
    arena: &mut SegmentArena,
    cut: Cut,
    dsts: &[IpAddr],
    port: u16,
    gso: bool,
) {
    let c = &shared.counters;
    let Cut { first: base, segments, seg_size, full_last, .. } = cut;
    let per_run = if gso { MAX_GSO_SEGMENTS.min(MAX_UDP_PAYLOAD / seg_size).max(1) } else { 1 };
    let mut first = 0;
    if let [dst] = dsts {
        let room = queue.open_for(*dst, seg_size, base, per_run);
        if room > 0 {
            let taken = room.min(segments);
            if let Some(became_gso) = queue.extend_open(taken, full_last || taken < segments, per_run) {
                first = taken;
                if became_gso {
                    bump(&c.tx.gso_sends, 1);
                }
                bump(&c.tx.datagrams, first as u64);
            }
        }
    }
    while first < segments {
        let run = per_run.min(segments - first);
        let run_segments = base + first..base + first + run;
        for &dst in dsts {
            if queue.batch.is_full() {
                queue.flush(shared, net, frames, arena);
            }
            // A run of one is sent as a plain datagram (no GSO needed).
            let gso_size = if run > 1 { seg_size as u16 } else { 0 };
            queue.push_segments(run_segments.clone(), dst, port, gso_size);
            bump(&c.tx.datagrams, run as u64);
            if run > 1 {
                bump(&c.tx.gso_sends, 1);
            }
        }
        first += run;
        let ends_full = full_last || first < segments;
        if gso && dsts.len() == 1 && ends_full && run < per_run {
            queue.open = Some(OpenRun { dst: dsts[0], seg_size, segments: run, end: run_segments.end });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::tcp4_super;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn iovlen(q: &SendQueue, i: usize) -> usize {
        q.batch.iovecs(i)
    }

    /// Frame buffers as the loop reads them: each frame behind [`HEADROOM`] bytes.
    fn frame_bufs(frames: &[Vec<u8>]) -> Vec<Box<[u8]>> {
        frames.iter().map(|f| [&[0u8; HEADROOM][..], f].concat().into_boxed_slice()).collect()
    }

    /// Cuts the super-frame in buffer `i` into the arena and queues its segments to `dst`.
    #[allow(clippy::too_many_arguments)]
    fn queue_frame(
        q: &mut SendQueue,
        shared: &Shared,
        bufs: &[Box<[u8]>],
        arena: &mut SegmentArena,
        i: usize,
        mss: usize,
        dst: IpAddr,
        port: u16,
    ) {
        let vni = crate::Vni::new(100).unwrap();
        let cut = cut(&bufs[i][HEADROOM..], i, mss, vni, arena, false).expect("a frame that can be cut");
        send_segments(q, shared, &NetworkCounters::default(), bufs, arena, cut, &[dst], port, true);
    }

    #[test]
    fn a_run_ending_on_a_full_segment_is_continued_by_the_next_super_frame() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (dst, port) = (receiver.local_addr().unwrap().ip(), receiver.local_addr().unwrap().port());
        let shared = Shared::for_tests();
        let mut q = SendQueue::new(sender.as_raw_fd());
        let mut arena = SegmentArena::new(ARENA_SEGMENTS, SEG_HDR_CAP);
        let mss = 1000;
        // Three super-frames of one flow: 47 full segments; 10 full and a short one; 5 full.
        let frames: Vec<Vec<u8>> = [(47 * mss, 0u32), (10 * mss + 500, 47_000), (5 * mss, 57_500)]
            .iter()
            .map(|&(len, seq)| {
                let payload: Vec<u8> = (0..len).map(|i| (i as u32 + seq) as u8).collect();
                tcp4_super(&payload, 0, 0x10, seq)
            })
            .collect();
        let bufs = frame_bufs(&frames);
        for i in 0..frames.len() {
            queue_frame(&mut q, &shared, &bufs, &mut arena, i, mss, dst, port);
        }
        // The second frame continues the first's run (all its 11 segments fit: 58 of at most
        // 61 datagrams of 1062 bytes in 64 KB); its short last segment ends that run, so the
        // third starts a run of its own.
        assert_eq!(q.batch.len(), 2, "two runs for three super-frames");
        assert_eq!(iovlen(&q, 0), 2 * 58);
        assert_eq!(iovlen(&q, 1), 2 * 5);
        assert_eq!(shared.counters.tx.gso_sends.load(Ordering::Relaxed), 2);
        assert_eq!(shared.counters.tx.datagrams.load(Ordering::Relaxed), 63);
        q.flush(&shared, &NetworkCounters::default(), &bufs, &mut arena);

        // On the wire: every segment of every frame, in order, each behind its VXLAN header.
        let expected: Vec<Vec<u8>> = frames
            .iter()
            .flat_map(|f| SuperFrame::parse(f).unwrap().to_segments(mss))
            .map(|seg| [&[0x08, 0, 0, 0, 0, 0, 100, 0][..], &seg].concat())
            .collect();
        let mut buf = vec![0u8; 2048];
        for (i, want) in expected.iter().enumerate() {
            let n = receiver.recv(&mut buf).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(&buf[..n], &want[..], "datagram {i}");
        }
    }

    #[test]
    fn a_run_is_not_continued_to_another_vtep_or_past_the_gso_limit() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let shared = Shared::for_tests();
        let mut q = SendQueue::new(sender.as_raw_fd());
        let mut arena = SegmentArena::new(ARENA_SEGMENTS, SEG_HDR_CAP);
        let mss = 1000;
        let bufs = frame_bufs(&[tcp4_super(&vec![7u8; 40 * mss], 0, 0x10, 0)]);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        queue_frame(&mut q, &shared, &bufs, &mut arena, 0, mss, a, 9);
        queue_frame(&mut q, &shared, &bufs, &mut arena, 0, mss, b, 9);
        assert_eq!(q.batch.len(), 2, "another VTEP, another run");
        queue_frame(&mut q, &shared, &bufs, &mut arena, 0, mss, b, 9);
        // 40 + 40 segments to b: the open run takes 21 (up to 61), the rest starts a new one.
        assert_eq!(q.batch.len(), 3);
        assert_eq!(iovlen(&q, 1), 2 * 61);
        assert_eq!(iovlen(&q, 2), 2 * 19);
        q.batch.clear(); // nothing is sent: the addresses are not ours
    }
}
