//! The underlay → TAP hot loop: receive datagrams in batches of `recvmmsg`, check and
//! decapsulate them, and write the inner frames to their TAPs from the receive buffers,
//! consecutive TCP segments joined into one super-frame. Nothing is allocated per datagram.

// Raw pointers and system calls stay in `batch` and `sys`.
#![forbid(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::batch::{Gather, RecvBatch, RecvMeta};
use super::sys::{self, Epoll};
use super::threads::{JOIN_WINDOW, JoinMeter};
use super::{HEADROOM, Shared, Tap, UNDERLAY};
use crate::alloc_count;
use crate::counters::{Counters, DropReason, NetworkCounters, bump};
use crate::learn::Learner;
use crate::offload::{self, Coalescer, TcpSegment, VNET_HDR_LEN, VirtioNetHdr};
use crate::segment::SuperFrame;
use crate::switch::{self, Openers, UnderlayVerdict};
use crate::tables::{Tables, TablesReader};
use crate::wire::vxlan::RemoteChecksum;
use crate::wire::{ethernet, vxlan};

/// Most messages taken per `recvmmsg`.
pub(crate) const BATCH: usize = 32;
/// Fewest messages taken per `recvmmsg`.
const MIN_BATCH: usize = 4;
/// Bytes one `recvmmsg` aims at: the next call asks for as many messages as the last call's
/// average size fits in this (4 GRO runs of 64 KB, or [`BATCH`] single datagrams), so that a
/// batch is still in the cache when it is checked, coalesced and written to the TAP.
const BATCH_BYTES: usize = 256 * 1024;
/// Largest message: a GRO run of up to 64 datagrams, or one datagram of up to 64 KB.
const MESSAGE_CAP: usize = 65_536;
/// Most datagrams in one GRO run (`UDP_MAX_SEGMENTS`; a smaller stride is refused below).
const MAX_RUN: usize = 64;
/// Most pieces of one coalesced write: the virtio-net header, the first frame, and a payload
/// per further segment (a 64 KB super-frame at an MSS of 512 has 128).
const MAX_PIECES: usize = 256;

/// How many TCP flows a batch coalesces at once.
const FLOWS: usize = 8;

// A run's `holds` has a bit per receive buffer.
const _: () = assert!(BATCH <= u32::BITS as usize);

/// A coalesced super-frame in the making, written with one `writev`: the rewritten headers of
/// its first segment, then every segment's payload where it lies. Its network's slot, its first
/// segment (buffer, offset and length in it), where the further segments' payloads lie, the
/// buffers it holds, and the rest of its state.
struct PendingRun {
    slot: usize,
    coalescer: Coalescer,
    buf: usize,
    /// Bit `b` set: a payload lies in buffer `b`, which must not be refilled before the write.
    holds: u32,
    start: usize,
    len: usize,
    /// At most [`MAX_PIECES`] − 2 (the virtio-net header and the first segment come first).
    payloads: Vec<Piece>,
}

/// Bytes `start..end` of receive buffer `buf`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    buf: usize,
    start: usize,
    end: usize,
}

const NO_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

pub(crate) struct RxLoop {
    shared: Arc<Shared>,
    fd: RawFd,
    tables: TablesReader<Arc<Tap>>,
    learner: Learner,
    batch: RecvBatch,
    /// The receive buffers; a datagram lies behind [`HEADROOM`] bytes.
    bufs: Box<[Box<[u8]>]>,
    /// Verdicts of the datagrams of the message being handled.
    verdicts: Box<[Option<UnderlayVerdict>]>,
    /// The coalesced super-frames being built, one per TCP flow (up to [`FLOWS`]); each may
    /// take segments from several messages of a batch (a 64 KB TSO frame arrives as two GSO
    /// runs, and flows interleave).
    runs: Box<[Option<PendingRun>]>,
    /// Payload lists not in use by a run (allocated once, passed between runs).
    spare: Vec<Vec<Piece>>,
    /// The iovecs of a coalesced write.
    gather: Gather,
    /// Where segments of an oversized frame are written when the TAP cannot take it whole.
    scratch: Box<[u8]>,
    /// Messages the next `recvmmsg` asks for (see [`BATCH_BYTES`]).
    asked: usize,
    /// The encrypted networks' openers, and the tables' generation they follow.
    openers: Openers,
    openers_generation: u64,
}

impl RxLoop {
    pub(crate) fn new(shared: Arc<Shared>, fd: RawFd) -> RxLoop {
        let cfg = &shared.settings;
        let learner = Learner::new(Arc::clone(&shared.learned), cfg.max_learned, cfg.ageing_secs);
        RxLoop {
            tables: shared.tables.reader(),
            learner,
            fd,
            batch: RecvBatch::new(BATCH),
            bufs: (0..BATCH).map(|_| vec![0u8; HEADROOM + MESSAGE_CAP].into_boxed_slice()).collect(),
            verdicts: (0..MAX_RUN).map(|_| None).collect(),
            runs: (0..FLOWS).map(|_| None).collect(),
            spare: (0..FLOWS).map(|_| Vec::with_capacity(MAX_PIECES - 2)).collect(),
            gather: Gather::new(MAX_PIECES),
            scratch: vec![0u8; MESSAGE_CAP].into_boxed_slice(),
            asked: BATCH,
            openers: Openers::default(),
            openers_generation: u64::MAX,
            shared,
        }
    }

    /// The buffers the next batch may be received into: those no pending run holds (after
    /// writing the pending runs, if too few are free).
    fn free_bufs(&mut self, tables: &Tables<Arc<Tap>>, c: &Counters) -> u32 {
        let held = self.held();
        if (BATCH as u32 - held.count_ones()) < self.asked as u32 {
            self.flush(tables, c);
            return u32::MAX;
        }
        !held
    }

    /// The receive thread: runs the receive loop whenever the loops are split, until the
    /// dataplane stops. With a thread per direction they always are (`join` is `None`). With
    /// [`LoopThreads::Auto`](super::LoopThreads::Auto) (`join` is the transmit thread's `epoll`
    /// set) it waits until the transmit thread splits them, runs the receive loop until its
    /// [`JoinMeter`] finds both threads together mostly idle, then writes what is pending, puts
    /// the socket back into that `epoll` set and waits again.
    pub(crate) fn run(this: &Mutex<RxLoop>, join: Option<&Epoll>) {
        let shared = Arc::clone(&this.lock().unwrap_or_else(|p| p.into_inner()).shared);
        let wait_ms = if join.is_some() { JOIN_WINDOW.as_millis() as i32 } else { 1000 };
        while !shared.stop.load(Ordering::Acquire) {
            if !shared.split.load(Ordering::Acquire) {
                sys::poll_readable([shared.rx_wake.fd()], 1000);
                shared.rx_wake.drain();
                continue;
            }
            let mut rx = this.lock().unwrap_or_else(|p| p.into_inner());
            shared.rx_wake.drain();
            let mut meter = JoinMeter::new(Instant::now(), shared.tx_busy_ns.load(Ordering::Relaxed));
            while !shared.stop.load(Ordering::Acquire) {
                shared.counters.rx.loop_allocations.store(alloc_count::thread_allocations(), Ordering::Relaxed);
                let start = join.map(|_| Instant::now());
                let more = rx.receive();
                if let Some(start) = start {
                    meter.add_busy(start.elapsed());
                }
                if more {
                    continue;
                }
                if let Some(epoll) = join
                    && meter.poll(Instant::now(), shared.tx_busy_ns.load(Ordering::Relaxed)) == Some(true)
                {
                    rx.finish();
                    shared.split.store(false, Ordering::Release);
                    if epoll.add(rx.fd, UNDERLAY).is_ok() {
                        shared.loop_switches.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    shared.split.store(true, Ordering::Release);
                }
                sys::poll_readable([rx.fd, shared.rx_wake.fd()], wait_ms);
            }
        }
    }

    /// The socket this loop receives from.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd
    }

    /// One `recvmmsg` of up to [`BATCH`] messages, handled and delivered. Returns false when
    /// the socket was found drained (nothing waiting, or fewer messages than asked for): then
    /// everything is written and what was learned is published.
    ///
    /// With `UDP_GRO`, a message holds a run of datagrams of one outer flow (over veth, a
    /// peer's GSO send arrives whole). When a batch came back full, its pending coalesced
    /// super-frames wait for the next call to extend them (their buffers are not refilled
    /// meanwhile); they are written as soon as the socket is found drained. Call
    /// [`RxLoop::finish`] before sleeping.
    pub(crate) fn receive(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        let tables = Arc::clone(self.tables.load());
        let free = self.free_bufs(&tables, c);
        let asked = self.asked;
        let received = self.batch.recv(self.fd, &mut self.bufs, HEADROOM, asked, |b| free & (1 << b) != 0);
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flush(&tables, c);
                self.learner.end_batch(shared.now_secs(), c);
                return false;
            }
            Err(_) => return true, // EINTR, or an ICMP error queued on the socket: try again
        };
        bump(&c.rx.recv_calls, 1);
        if tables.generation() != self.openers_generation {
            self.openers.sync(&tables);
            self.openers_generation = tables.generation();
        }
        let bytes: usize = (0..n).map(|i| self.batch.len_of(i)).sum();
        self.asked = (BATCH_BYTES * n / bytes.max(1)).clamp(MIN_BATCH, BATCH);
        let now = shared.now_secs();
        for i in 0..n {
            let meta = self.batch.meta(i);
            self.message(&tables, meta, now, c);
        }
        if n < asked {
            // The socket was drained: nothing is coming right away to extend a pending run,
            // and another call would only find it empty (a system call per wake-up saved,
            // which a request and its answer pay on every hop).
            self.flush(&tables, c);
            self.learner.end_batch(now, c);
            return false;
        }
        true
    }

    /// Moves to the newest tables, letting go of the older snapshot and with it the TAPs of
    /// networks removed since: a caller that runs this loop only when the socket is readable
    /// would otherwise keep a removed network's TAP open (and its name busy) until a datagram
    /// comes.
    pub(crate) fn refresh_tables(&mut self) {
        self.tables.load();
    }

    /// Writes whatever is pending; for a caller that stops calling [`RxLoop::receive`] before
    /// it said nothing was waiting.
    pub(crate) fn finish(&mut self) {
        let shared = Arc::clone(&self.shared);
        let tables = Arc::clone(self.tables.load());
        self.flush(&tables, &shared.counters);
    }

    /// The buffers that pending runs hold.
    fn held(&self) -> u32 {
        self.runs.iter().flatten().fold(0, |m, r| m | r.holds)
    }

    /// Handles a received message: one datagram, or a GRO run of them cut at a stride. Each
    /// datagram is checked by the switching core, and what they taught is published before
    /// anything is delivered, so a container's answer never finds its sender unknown.
    fn message(&mut self, tables: &Tables<Arc<Tap>>, m: RecvMeta, now: u64, c: &Counters) {
        let len = m.len;
        if m.truncated {
            bump(&c.rx.datagrams, 1);
            c.dropped(DropReason::Oversized);
            return;
        }
        let Some(src) = m.source else { return };
        let b = m.buf;
        let buf = &mut self.bufs[b][HEADROOM..HEADROOM + len];
        let stride = match m.gro_size {
            Some(s) if s < len && is_run(buf, s) => s,
            _ => len.max(1), // an empty datagram is one (truncated) datagram
        };
        let count = len.div_ceil(stride).max(1);
        if count > MAX_RUN {
            bump(&c.rx.datagrams, count as u64);
            c.dropped(DropReason::Oversized);
            return;
        }
        // Decide every datagram of the message, publish what they taught, then deliver.
        for (k, v) in self.verdicts.iter_mut().enumerate().take(count) {
            let d = &mut buf[k * stride..len.min((k + 1) * stride)];
            bump(&c.rx.datagrams, 1);
            bump(&c.rx.bytes, d.len() as u64);
            *v = Some(switch::from_underlay(tables, &mut self.openers, &mut self.learner, src, d, now, c));
        }
        self.learner.end_batch(now, c);

        let coalesce = self.shared.settings.offloads.coalesce;
        for k in 0..count {
            let Some(UnderlayVerdict::Deliver { slot, inner, segment_mss, partial }) = self.verdicts[k].take() else {
                continue;
            };
            let Some(net) = tables.network(slot) else { continue };
            let tap = net.tap();
            let (start, end) = (k * stride + inner.start, k * stride + inner.end);
            if let Some(mss) = segment_mss {
                self.flush(tables, c);
                let frame = &mut self.bufs[b][HEADROOM + start..HEADROOM + end];
                deliver_oversized(tap, frame, mss, &mut self.scratch, c, net.counters());
                continue;
            }
            if tap.offloads().vnet_hdr && coalesce {
                let frame = &self.bufs[b][HEADROOM + start..HEADROOM + end];
                let seg = match partial {
                    None => TcpSegment::parse(frame),
                    Some(r) if !r.udp => TcpSegment::parse_partial(frame, r.start.into()),
                    Some(_) => None,
                };
                if let Some(seg) = seg {
                    self.coalesce(tables, c, slot, b, start, end, seg);
                    continue;
                }
            }
            // Anything else may belong to a flow with a pending run: keep the order.
            self.flush(tables, c);
            let frame = &mut self.bufs[b][HEADROOM + start..HEADROOM + end];
            match partial {
                None => write_frame(tap, frame, c, net.counters()),
                Some(r) => write_partial(tap, frame, r, c, net.counters()),
            }
        }
    }

    /// Adds a TCP segment to its flow's pending super-frame ([`Coalescer`]), or starts one. A
    /// connection has at most one pending run, so its bytes reach the container in order.
    #[allow(clippy::too_many_arguments)]
    fn coalesce(
        &mut self,
        tables: &Tables<Arc<Tap>>,
        c: &Counters,
        slot: usize,
        buf: usize,
        start: usize,
        end: usize,
        seg: TcpSegment,
    ) {
        let frame = &self.bufs[buf][HEADROOM + start..HEADROOM + end];
        let mut same_conn = None;
        for (i, run) in self.runs.iter_mut().enumerate() {
            let Some(r) = run else { continue };
            if r.slot != slot {
                continue;
            }
            let first = &self.bufs[r.buf][HEADROOM + r.start..HEADROOM + r.start + r.len];
            if r.payloads.len() < MAX_PIECES - 2 && r.coalescer.try_push(first, frame, &seg) {
                let payload_start = HEADROOM + start + seg.payload_offset();
                r.payloads.push(Piece { buf, start: payload_start, end: HEADROOM + end });
                r.holds |= 1 << buf;
                return;
            }
            if r.coalescer.same_connection(first, frame, &seg) {
                same_conn = Some(i);
                break;
            }
        }
        // A segment that cannot extend its connection's run ends it (the connection's order is
        // kept); a new connection takes a free place, or the first run goes out to make room.
        let i = same_conn.or_else(|| self.runs.iter().position(Option::is_none)).unwrap_or(0);
        self.flush_run(tables, c, i);
        let payloads = self.spare.pop().expect("a payload list per run");
        self.runs[i] = Some(PendingRun {
            slot,
            coalescer: Coalescer::new(seg),
            buf,
            holds: 1 << buf,
            start,
            len: end - start,
            payloads,
        });
    }

    /// Writes every pending coalesced super-frame.
    fn flush(&mut self, tables: &Tables<Arc<Tap>>, c: &Counters) {
        for i in 0..FLOWS {
            self.flush_run(tables, c, i);
        }
    }

    /// Writes the pending super-frame `runs[i]`, if any.
    fn flush_run(&mut self, tables: &Tables<Arc<Tap>>, c: &Counters, i: usize) {
        let Some(mut r) = self.runs[i].take() else { return };
        if let Some(net) = tables.network(r.slot) {
            let first = HEADROOM + r.start..HEADROOM + r.start + r.len;
            let hdr = r.coalescer.finish(&mut self.bufs[r.buf][first.clone()]).to_bytes();
            let bufs = &self.bufs;
            let payloads = r.payloads.iter().map(|p| &bufs[p.buf][p.start..p.end]);
            let pieces = [&hdr[..], &bufs[r.buf][first]].into_iter().chain(payloads);
            match self.gather.writev(net.tap().as_raw_fd(), pieces) {
                Ok(_) => {
                    bump(&c.rx.delivered, r.coalescer.count() as u64);
                    if r.coalescer.count() > 1 {
                        bump(&c.rx.coalesced, 1);
                    }
                }
                Err(_) => c.dropped_in(net.counters(), DropReason::TapWriteFailed),
            }
        }
        r.payloads.clear();
        self.spare.push(r.payloads);
    }
}

/// Whether a message cut at `stride` is a run of VXLAN datagrams, rather than one datagram the
/// kernel tagged with a segment size of its inner TCP (a UDP-tunnel GSO packet from a kernel
/// VTEP over veth, whose first `stride` bytes hold only the start of one big inner frame).
fn is_run(buf: &[u8], stride: usize) -> bool {
    // Sealed datagrams hide their inner headers; the kernel joins only datagrams of one size.
    if crate::crypto::is_sealed(buf) {
        return true;
    }
    let Some(first) = buf.get(vxlan::HEADER_LEN..stride) else { return false };
    match ethernet::network_layer(first) {
        Some((etherparse::EtherType::IPV4, l3)) if first.len() >= l3 + 4 => {
            usize::from(u16::from_be_bytes([first[l3 + 2], first[l3 + 3]])) <= first.len() - l3
        }
        Some((etherparse::EtherType::IPV6, l3)) if first.len() >= l3 + 6 => {
            usize::from(u16::from_be_bytes([first[l3 + 4], first[l3 + 5]])) + 40 <= first.len() - l3
        }
        _ => true,
    }
}

/// Writes one frame of the network `net` counts for as it is.
#[inline]
fn write_frame(tap: &Tap, frame: &[u8], c: &Counters, net: &NetworkCounters) {
    let r = if tap.offloads().vnet_hdr {
        tap.writev(&[IoSlice::new(&NO_VNET_HDR), IoSlice::new(frame)])
    } else {
        tap.write(frame)
    };
    match r {
        Ok(_) => bump(&c.rx.delivered, 1),
        Err(_) => c.dropped_in(net, DropReason::TapWriteFailed),
    }
}

/// Writes one frame whose TCP/UDP checksum the sender left partial (remote checksum offload,
/// its field checked to lie in the frame): marked `NEEDS_CSUM` for the kernel, which trusts it
/// on local delivery as it trusts its own, or finished here for a TAP without offloads.
fn write_partial(tap: &Tap, frame: &mut [u8], r: RemoteChecksum, c: &Counters, net: &NetworkCounters) {
    if tap.offloads().vnet_hdr {
        let hdr = VirtioNetHdr {
            flags: offload::F_NEEDS_CSUM,
            csum_start: r.start,
            csum_offset: r.offset(),
            ..Default::default()
        };
        match tap.writev(&[IoSlice::new(&hdr.to_bytes()), IoSlice::new(frame)]) {
            Ok(_) => bump(&c.rx.delivered, 1),
            Err(_) => c.dropped_in(net, DropReason::TapWriteFailed),
        }
        return;
    }
    offload::finish_checksum(frame, r.start.into(), r.offset().into());
    write_frame(tap, frame, c, net);
}

/// Delivers a TCP/UDP frame above the MTU (the core checked it can be cut): whole, as a GSO
/// frame, when the TAP takes offloads; else cut here.
#[cold]
fn deliver_oversized(tap: &Tap, frame: &mut [u8], mss: usize, scratch: &mut [u8], c: &Counters, net: &NetworkCounters) {
    let o = tap.offloads();
    if o.vnet_hdr
        && let Some(hdr) = offload::gso_for_oversized(frame, mss, o.uso)
    {
        match tap.writev(&[IoSlice::new(&hdr.to_bytes()), IoSlice::new(frame)]) {
            Ok(_) => bump(&c.rx.delivered, 1),
            Err(_) => c.dropped_in(net, DropReason::TapWriteFailed),
        }
        return;
    }
    let Ok(sf) = SuperFrame::parse(frame) else { return };
    for i in 0..sf.segment_count(mss) {
        let n = sf.write_segment(i, mss, scratch);
        write_frame(tap, &scratch[..n], c, net);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::tcp4_super;

    fn datagram(inner: &[u8]) -> Vec<u8> {
        [&[0x08, 0, 0, 0, 0, 0, 1, 0][..], inner].concat()
    }

    #[test]
    fn a_gro_run_is_told_from_one_tunnel_gso_datagram() {
        // Two 1000-byte datagrams back to back, as UDP GRO hands them over.
        let sf = tcp4_super(&[1u8; 2000], 0, 0x10, 0);
        let seg = SuperFrame::parse(&sf).unwrap();
        let mut a = vec![0u8; 2000];
        let n = seg.write_segment(0, 946, &mut a);
        a.truncate(n);
        let one = datagram(&a);
        let run = [one.clone(), one.clone()].concat();
        assert!(is_run(&run, one.len()));
        // One datagram carrying a 2000-byte inner frame, tagged with its inner MSS.
        let big = datagram(&tcp4_super(&[1u8; 2000], 0, 0x10, 0));
        assert!(!is_run(&big, 1000), "the inner IP length runs past the stride");
        assert!(!is_run(&big, 4), "a stride shorter than a VXLAN header");
    }
}
