//! The underlay → TAP hot loop: receive datagrams in batches, check and decapsulate, write the
//! inner frames to their networks' TAPs from the receive buffers.
//!
//! With `UDP_GRO` on the socket, one received message holds a run of datagrams of one outer
//! flow cut at a stride (the `UDP_GRO` control message); over veth, a peer's GSO send arrives
//! here whole, never split into packets. Each datagram is checked by the switching core; then,
//! on a TAP with offloads, consecutive TCP segments of one inner flow are joined into one
//! super-frame ([`crate::offload::Coalescer`]) and written with one `writev`: the rewritten
//! headers of the first segment, then every segment's payload where it lies. A connection has
//! at most one such run pending, so its bytes reach the container in order. When a batch came
//! back full, its pending runs wait for the next `recvmmsg` to extend them (that call receives
//! into buffers no pending run holds); they are written as soon as the socket is found drained.
//! Learning is published before anything of a message is delivered, so a container's answer
//! never finds its sender unknown. Nothing is allocated per datagram.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::sys::{self, CmsgBuf, Epoll, SockAddr};
use super::threads::{JOIN_WINDOW, JoinMeter};
use super::{HEADROOM, Shared, Tap, UNDERLAY};
use crate::alloc_count;
use crate::counters::{Counters, DropReason, bump};
use crate::learn::Learner;
use crate::offload::{self, Coalescer, TcpSegment, VNET_HDR_LEN};
use crate::segment::SuperFrame;
use crate::switch::{self, UnderlayVerdict};
use crate::tables::{Tables, TablesReader};
use crate::wire::{ethernet, vxlan};

/// Most messages taken per `recvmmsg`.
pub(crate) const BATCH: usize = 32;
/// Fewest messages taken per `recvmmsg`.
const MIN_BATCH: usize = 4;
/// Bytes one `recvmmsg` aims at: the next call asks for as many messages as the last call's
/// average size fits in this (4 GRO runs of 64 KB, or [`BATCH`] single datagrams), so that a
/// batch is still in the cache when it is checked, coalesced and written to the TAP
/// (measured: fewer retransmits and up to 7 % less CPU per GB than 32 runs of 64 KB).
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

/// A coalesced super-frame in the making: its network's slot, its first segment (buffer, offset
/// and length in it), the pieces of its write, the buffers those point into, and the rest of
/// its state.
struct PendingRun {
    slot: usize,
    coalescer: Coalescer,
    buf: usize,
    /// Bit `b` set: a piece points into buffer `b`, which must not be refilled before the write.
    holds: u32,
    start: usize,
    len: usize,
    pieces: Box<[libc::iovec]>,
    npieces: usize,
}

const NO_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

pub(crate) struct RxLoop {
    shared: Arc<Shared>,
    fd: RawFd,
    tables: TablesReader<Arc<Tap>>,
    learner: Learner,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
    cmsgs: Box<[CmsgBuf]>,
    bufs: Box<[Box<[u8]>]>,
    /// The buffer each message of the current batch is received into.
    message_buf: [usize; BATCH],
    /// Verdicts of the datagrams of the message being handled.
    verdicts: Box<[Option<UnderlayVerdict>]>,
    /// The coalesced super-frames being built, one per TCP flow (up to [`FLOWS`]); each may
    /// take segments from several messages of a batch (a 64 KB TSO frame arrives as two GSO
    /// runs, and flows interleave).
    runs: Box<[Option<PendingRun>]>,
    /// Piece arrays not in use by a run (allocated once, passed between runs).
    spare: Vec<Box<[libc::iovec]>>,
    /// Where segments of an oversized frame are written when the TAP cannot take it whole.
    scratch: Box<[u8]>,
    /// Messages the next `recvmmsg` asks for (see [`BATCH_BYTES`]).
    batch: usize,
}

// SAFETY: the raw pointers in `msgs`, `iovs` and `pieces` point only into `addrs`, `cmsgs`,
// `iovs` and `bufs`, heap allocations owned by this same struct that move with it; nothing else
// refers to them, so handing the whole loop to another thread is sound.
unsafe impl Send for RxLoop {}

impl RxLoop {
    pub(crate) fn new(shared: Arc<Shared>, fd: RawFd) -> RxLoop {
        let cfg = &shared.config;
        let learner = Learner::new(Arc::clone(&shared.learned), cfg.max_learned, cfg.ageing_secs);
        let bufs: Box<[Box<[u8]>]> = (0..BATCH).map(|_| vec![0u8; HEADROOM + MESSAGE_CAP].into_boxed_slice()).collect();
        // Pointed at the buffers by `arm` before every receive.
        let iovs: Box<[libc::iovec]> =
            (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect();
        RxLoop {
            tables: shared.tables.reader(),
            learner,
            fd,
            msgs: (0..BATCH).map(|_| sys::empty_mmsghdr()).collect(),
            iovs,
            addrs: (0..BATCH).map(|_| SockAddr::zeroed()).collect(),
            cmsgs: (0..BATCH).map(|_| CmsgBuf::new()).collect(),
            bufs,
            message_buf: std::array::from_fn(|i| i),
            verdicts: (0..MAX_RUN).map(|_| None).collect(),
            runs: (0..FLOWS).map(|_| None).collect(),
            spare: (0..FLOWS)
                .map(|_| (0..MAX_PIECES).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect())
                .collect(),
            scratch: vec![0u8; MESSAGE_CAP].into_boxed_slice(),
            batch: BATCH,
            shared,
        }
    }

    /// Picks a buffer for each of the next batch's messages among those no pending run holds
    /// (writing the pending runs first if too few are free), and points every header at its
    /// buffer, address and control buffer again (the kernel overwrites lengths and flags).
    fn arm(&mut self, tables: &Tables<Arc<Tap>>, c: &Counters) {
        let mut held = self.held();
        if (BATCH as u32 - held.count_ones()) < self.batch as u32 {
            self.flush(tables, c);
            held = 0;
        }
        let free = (0..BATCH).filter(|b| held & (1 << b) == 0);
        for (m, b) in self.message_buf.iter_mut().take(self.batch).zip(free) {
            *m = b;
        }
        for (i, m) in self.msgs.iter_mut().enumerate().take(self.batch) {
            let buf = &mut self.bufs[self.message_buf[i]];
            self.iovs[i] = libc::iovec { iov_base: buf[HEADROOM..].as_mut_ptr().cast(), iov_len: MESSAGE_CAP };
            let h = &mut m.msg_hdr;
            h.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_namelen = SockAddr::CAPACITY;
            h.msg_iov = &raw mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr();
            h.msg_controllen = CmsgBuf::CAPACITY as _;
            h.msg_flags = 0;
            m.msg_len = 0;
        }
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
    /// nothing was waiting: then everything is written and what was learned is published. A
    /// full batch may leave coalesced super-frames pending for the next call to extend (their
    /// buffers are not refilled meanwhile); call [`RxLoop::finish`] before sleeping.
    pub(crate) fn receive(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        let tables = Arc::clone(self.tables.load());
        self.arm(&tables, c);
        let asked = self.batch;
        // SAFETY: `arm` pointed the first `asked` headers at this loop's boxed iovecs (each
        // covering MESSAGE_CAP bytes of its own buffer, none of which a pending run holds),
        // addresses and control buffers, none of which move or are otherwise borrowed
        // during the call.
        let n = match unsafe { sys::recvmmsg_nowait(self.fd, &mut self.msgs[..asked]) } {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flush(&tables, c);
                self.learner.end_batch(shared.now_secs(), c);
                return false;
            }
            Err(_) => return true, // EINTR, or an ICMP error queued on the socket: try again
        };
        bump(&c.rx.recv_calls, 1);
        let bytes: usize = self.msgs[..n].iter().map(|m| m.msg_len as usize).sum();
        self.batch = (BATCH_BYTES * n / bytes.max(1)).clamp(MIN_BATCH, BATCH);
        let now = shared.now_secs();
        for i in 0..n {
            self.message(&tables, i, now, c);
        }
        if n < asked {
            // The socket was drained: nothing is coming right away to extend a pending run.
            self.flush(&tables, c);
        }
        true
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

    /// Handles message `i`: one datagram, or a GRO run of them.
    fn message(&mut self, tables: &Tables<Arc<Tap>>, i: usize, now: u64, c: &Counters) {
        let m = &self.msgs[i];
        let len = m.msg_len as usize;
        if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            bump(&c.rx.datagrams, 1);
            c.dropped(DropReason::Oversized);
            return;
        }
        // SAFETY: the kernel wrote this message's control data, bounded by msg_controllen.
        let gro = unsafe { sys::udp_gro_size(&m.msg_hdr) };
        let Some(src) = self.addrs[i].ip() else { return };
        let b = self.message_buf[i];
        let buf = &mut self.bufs[b][HEADROOM..HEADROOM + len];
        let stride = match gro {
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
            *v = Some(switch::from_underlay(tables, &mut self.learner, src, d, now, c));
        }
        self.learner.end_batch(now, c);

        let coalesce = self.shared.config.offloads.coalesce;
        for k in 0..count {
            let Some(UnderlayVerdict::Deliver { slot, inner, segment_mss }) = self.verdicts[k].take() else { continue };
            let Some(net) = tables.network(slot) else { continue };
            let tap = net.tap();
            let (start, end) = (k * stride + inner.start, k * stride + inner.end);
            if let Some(mss) = segment_mss {
                self.flush(tables, c);
                deliver_oversized(tap, &mut self.bufs[b][HEADROOM + start..HEADROOM + end], mss, &mut self.scratch, c);
                continue;
            }
            if tap.offloads().vnet_hdr && coalesce {
                let frame = &self.bufs[b][HEADROOM + start..HEADROOM + end];
                if let Some(seg) = TcpSegment::parse(frame) {
                    self.coalesce(tables, c, slot, b, start, end, seg);
                    continue;
                }
            }
            // Anything else may belong to a flow with a pending run: keep the order.
            self.flush(tables, c);
            write_frame(tap, &self.bufs[b][HEADROOM + start..HEADROOM + end], c);
        }
    }

    /// Adds a TCP segment to its flow's pending super-frame, or starts one.
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
            if r.npieces < MAX_PIECES && r.coalescer.try_push(first, frame, &seg) {
                r.pieces[r.npieces] = piece(&frame[seg.payload_offset()..]);
                r.npieces += 1;
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
        let pieces = self.spare.pop().expect("a piece array per run");
        self.runs[i] = Some(PendingRun {
            slot,
            coalescer: Coalescer::new(seg),
            buf,
            holds: 1 << buf,
            start,
            len: end - start,
            pieces,
            npieces: 2,
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
            let first = &mut self.bufs[r.buf][HEADROOM + r.start..HEADROOM + r.start + r.len];
            let hdr = r.coalescer.finish(first).to_bytes();
            r.pieces[0] = piece(&hdr);
            r.pieces[1] = piece(first);
            match net.tap().writev(&r.pieces[..r.npieces]) {
                Ok(_) => {
                    bump(&c.rx.delivered, r.coalescer.count() as u64);
                    if r.coalescer.count() > 1 {
                        bump(&c.rx.coalesced, 1);
                    }
                }
                Err(_) => c.dropped(DropReason::TapWriteFailed),
            }
        }
        self.spare.push(r.pieces);
    }
}

/// Whether a message cut at `stride` is a run of VXLAN datagrams, rather than one datagram the
/// kernel tagged with a segment size of its inner TCP (a UDP-tunnel GSO packet from a kernel
/// VTEP over veth, whose first `stride` bytes hold only the start of one big inner frame).
fn is_run(buf: &[u8], stride: usize) -> bool {
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

fn piece(b: &[u8]) -> libc::iovec {
    // The kernel only reads through this pointer.
    libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() }
}

/// Writes one frame as it is.
#[inline]
fn write_frame(tap: &Tap, frame: &[u8], c: &Counters) {
    let r = if tap.offloads().vnet_hdr { tap.writev(&[piece(&NO_VNET_HDR), piece(frame)]) } else { tap.write(frame) };
    match r {
        Ok(_) => bump(&c.rx.delivered, 1),
        Err(_) => c.dropped(DropReason::TapWriteFailed),
    }
}

/// Delivers a TCP/UDP frame above the MTU (the core checked it can be cut): whole, as a GSO
/// frame, when the TAP takes offloads; else cut here.
#[cold]
fn deliver_oversized(tap: &Tap, frame: &mut [u8], mss: usize, scratch: &mut [u8], c: &Counters) {
    let o = tap.offloads();
    if o.vnet_hdr {
        if let Some(hdr) = offload::gso_for_oversized(frame, mss, o.uso) {
            match tap.writev(&[piece(&hdr.to_bytes()), piece(frame)]) {
                Ok(_) => bump(&c.rx.delivered, 1),
                Err(_) => c.dropped(DropReason::TapWriteFailed),
            }
            return;
        }
    }
    let Ok(sf) = SuperFrame::parse(frame) else { return };
    for i in 0..sf.segment_count(mss) {
        let n = sf.write_segment(i, mss, scratch);
        write_frame(tap, &scratch[..n], c);
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
