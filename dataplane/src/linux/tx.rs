//! The TAP → underlay hot loop: read frames from the TAPs, decide, encapsulate, send in batches.
//!
//! A frame is read behind [`HEADROOM`] bytes so that the VXLAN header is written in front of it
//! in place. With TAP offloads the kernel hands over TCP/UDP super-frames of up to 64 KB; each
//! is cut without copying its payload: only the headers of every segment (VXLAN, Ethernet, IP,
//! TCP, with checksums computed over the payload where it lies) are written, into a per-frame
//! header arena, and the datagrams are described by iovecs alternating header and payload. The
//! whole run goes to the kernel as one `sendmsg` with `UDP_SEGMENT` (UDP GSO), so one system
//! call and one pass through the UDP stack carry up to 64 datagrams. Everything of a batch —
//! plain datagrams, GSO runs, copies for each flood-list member — leaves in one `sendmmsg` per
//! source-port socket. Nothing is allocated per frame.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::rx::RxLoop;
use super::sys::{self, CmsgBuf, Epoll, SockAddr};
use super::{Port, Shared};
use crate::alloc_count;
use crate::counters::{Counters, DropReason, bump};
use crate::learn::LearnedReader;
use crate::offload::{self, TxShape, VNET_HDR_LEN, VirtioNetHdr};
use crate::segment::SuperFrame;
use crate::switch::{self, TapVerdict};
use crate::tables::{Tables, TablesReader};
use crate::wire::arp;
use crate::wire::flow::{flow_hash, port_index};
use crate::wire::vxlan;

/// Frames (or super-frames) read from one TAP before their datagrams are sent.
pub(crate) const BATCH: usize = 64;
/// Rounds of [`BATCH`] frames taken from one TAP before looking at the others.
const ROUNDS_PER_WAKEUP: usize = 8;
/// Messages per `sendmmsg` call (a flood to many VTEPs may need several calls).
const MMSG_CAP: usize = 512;
/// Room in front of each frame for headers written in place (virtio-net header on read,
/// then the VXLAN header).
pub(crate) const HEADROOM: usize = 64;
/// Largest frame read from a TAP (a 64 KB super-frame and its Ethernet header).
pub(crate) const FRAME_CAP: usize = 65_536 + 64;
/// Largest UDP payload on IPv4 (65535 − 20 − 8), for one datagram or one GSO run.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// The kernel's limit of segments per GSO send (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most segments one super-frame may be cut into (64 KB at an MSS of 512).
const MAX_SEGMENTS: usize = 128;
/// Room per segment in the header arena: VXLAN, Ethernet with two VLAN tags, IPv6 or IPv4
/// with options, TCP with options.
const SEG_HDR_CAP: usize = 160;
/// epoll data value of the wake-up eventfd.
const WAKE: u64 = u64::MAX;
/// epoll data value of the underlay socket, when this loop also receives.
const UNDERLAY: u64 = u64::MAX - 1;

/// Datagrams waiting for one socket's `sendmmsg`.
struct SendQueue {
    fd: RawFd,
    len: usize,
    msgs: Box<[libc::mmsghdr]>,
    /// One iovec per message for datagrams in a single piece.
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
    cmsgs: Box<[CmsgBuf]>,
}

impl SendQueue {
    fn new(fd: RawFd) -> SendQueue {
        SendQueue {
            fd,
            len: 0,
            msgs: (0..MMSG_CAP).map(|_| sys::empty_mmsghdr()).collect(),
            iovs: (0..MMSG_CAP).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            addrs: (0..MMSG_CAP).map(|_| SockAddr::zeroed()).collect(),
            cmsgs: (0..MMSG_CAP).map(|_| CmsgBuf::new()).collect(),
        }
    }

    fn is_full(&self) -> bool {
        self.len == MMSG_CAP
    }

    /// Queues a datagram in one piece. `data` must stay valid until the next `flush`.
    #[inline]
    fn push(&mut self, data: *mut u8, len: usize, dst: IpAddr, port: u16) {
        let i = self.len;
        self.iovs[i] = libc::iovec { iov_base: data.cast(), iov_len: len };
        let iov = &raw mut self.iovs[i];
        self.push_iovecs(iov, 1, dst, port, 0);
    }

    /// Queues a message made of `iovlen` iovecs at `iov`; with `gso_size > 0` it is a GSO run
    /// of datagrams of that size. The iovecs and what they point at must stay valid until the
    /// next `flush`.
    #[inline]
    fn push_iovecs(&mut self, iov: *mut libc::iovec, iovlen: usize, dst: IpAddr, port: u16, gso_size: u16) {
        let i = self.len;
        let addr_len = self.addrs[i].set(dst, port);
        let h = &mut self.msgs[i].msg_hdr;
        h.msg_name = (&raw mut self.addrs[i]).cast();
        h.msg_namelen = addr_len;
        h.msg_iov = iov;
        h.msg_iovlen = iovlen as _;
        if gso_size > 0 {
            let n = self.cmsgs[i].set_udp_segment(gso_size);
            h.msg_control = self.cmsgs[i].as_mut_ptr();
            h.msg_controllen = n as _;
        } else {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        self.len += 1;
    }

    fn flush(&mut self, shared: &Shared) {
        let c = &shared.counters;
        let mut sent = 0;
        while sent < self.len {
            // SAFETY: headers 0..len were filled by `push_iovecs`, pointing at this queue's
            // boxed addresses and control buffers and at iovecs and buffers that the loop
            // leaves untouched until this flush returns.
            match unsafe { sys::sendmmsg(self.fd, &mut self.msgs[sent..self.len]) } {
                Ok(n) => {
                    sent += n.max(1);
                    bump(&c.tx.send_calls, 1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first unsent message is the one the kernel refused.
                    let m = self.msgs[sent].msg_hdr;
                    if !m.msg_control.is_null() {
                        // UDP GSO refused (EIO without checksum offload on the route, EINVAL,
                        // EMSGSIZE …): stop using it and send this run datagram by datagram.
                        if shared.gso_ok.swap(false, Ordering::Relaxed) {
                            bump(&c.tx.gso_disabled, 1);
                        }
                        resend_without_gso(self.fd, &m, c, &e);
                    } else {
                        c.dropped(DropReason::SendFailed);
                    }
                    sent += 1;
                }
            }
        }
        self.len = 0;
    }
}

/// Sends a refused GSO run as separate datagrams: its iovecs alternate header and payload.
#[cold]
fn resend_without_gso(fd: RawFd, m: &libc::msghdr, c: &Counters, _why: &io::Error) {
    #[allow(clippy::unnecessary_cast)] // msg_iovlen is not usize on every libc
    let iovlen = m.msg_iovlen as usize;
    for pair in (0..iovlen).step_by(2) {
        let mut one = *m;
        // SAFETY: `pair` and `pair + 1` are within the message's iovec array (runs always have
        // an even count), which the caller keeps alive.
        one.msg_iov = unsafe { m.msg_iov.add(pair) };
        one.msg_iovlen = 2.min(iovlen - pair) as _;
        one.msg_control = std::ptr::null_mut();
        one.msg_controllen = 0;
        let mut mm = sys::empty_mmsghdr();
        mm.msg_hdr = one;
        // SAFETY: as for the GSO message: name, iovecs and buffers are live for the call.
        if unsafe { sys::sendmmsg(fd, std::slice::from_mut(&mut mm)) }.is_err() {
            c.dropped(DropReason::SendFailed);
        }
    }
}

/// Where the segments of one super-frame are described: their headers and the iovecs.
struct SegmentArena {
    headers: Box<[u8]>,
    iovs: Box<[libc::iovec]>,
}

impl SegmentArena {
    fn new() -> SegmentArena {
        SegmentArena {
            headers: vec![0u8; MAX_SEGMENTS * SEG_HDR_CAP].into_boxed_slice(),
            iovs: (0..2 * MAX_SEGMENTS).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
        }
    }
}

pub(crate) struct TxLoop {
    shared: Arc<Shared>,
    tables: TablesReader<Port>,
    learned: LearnedReader,
    epoll: Epoll,
    /// TAPs registered with epoll: (slot, TAP). Capacity reserved up front.
    registered: Vec<(usize, Port)>,
    registered_generation: u64,
    queues: Box<[SendQueue]>,
    bufs: Box<[Box<[u8]>]>,
    arenas: Box<[SegmentArena]>,
    reply: [u8; VNET_HDR_LEN + arp::MAX_REPLY_LEN],
}

// SAFETY: the raw pointers in the send queues and arenas point only into boxed arrays owned by
// this same struct (queues, arenas, `bufs`); they are rewritten before each use, and nothing
// else refers to them, so handing the whole loop to another thread is sound.
unsafe impl Send for TxLoop {}

impl TxLoop {
    pub(crate) fn new(shared: Arc<Shared>, tx_fds: &[RawFd]) -> io::Result<TxLoop> {
        let epoll = Epoll::new()?;
        epoll.add(shared.tx_wake.fd(), WAKE)?;
        Ok(TxLoop {
            tables: shared.tables.reader(),
            learned: arc_swap::Cache::new(Arc::clone(&shared.learned)),
            epoll,
            registered: Vec::with_capacity(256),
            registered_generation: u64::MAX,
            queues: tx_fds.iter().map(|&fd| SendQueue::new(fd)).collect(),
            bufs: (0..BATCH).map(|_| vec![0u8; HEADROOM + FRAME_CAP].into_boxed_slice()).collect(),
            arenas: (0..BATCH).map(|_| SegmentArena::new()).collect(),
            reply: [0; VNET_HDR_LEN + arp::MAX_REPLY_LEN],
            shared,
        })
    }

    /// Watches the underlay socket `fd` too, for running the receive loop on this thread.
    pub(crate) fn watch_underlay(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.add(fd, UNDERLAY)
    }

    /// Runs until the dataplane stops; with `rx` (whose socket [`TxLoop::watch_underlay`]
    /// added), this one thread also runs the receive loop, woken by the same epoll.
    pub(crate) fn run(mut self, mut rx: Option<RxLoop>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        while !self.shared.stop.load(Ordering::Acquire) {
            let allocations = alloc_count::thread_allocations();
            self.shared.counters.tx.loop_allocations.store(allocations, Ordering::Relaxed);
            if rx.is_some() {
                self.shared.counters.rx.loop_allocations.store(allocations, Ordering::Relaxed);
            }
            let tables = Arc::clone(self.tables.load());
            if tables.generation() != self.registered_generation {
                self.sync_ports(&tables);
            }
            let n = self.epoll.wait(&mut events, 1000).unwrap_or(0);
            for ev in &events[..n] {
                match ev.u64 {
                    WAKE => self.shared.tx_wake.drain(),
                    UNDERLAY => {
                        if let Some(rx) = rx.as_mut() {
                            for _ in 0..ROUNDS_PER_WAKEUP {
                                if !rx.receive() {
                                    break;
                                }
                            }
                        }
                    }
                    slot => self.drain_port(&tables, slot as usize),
                }
            }
        }
    }

    /// Makes the epoll set match the tables' networks. Allocates nothing unless a network
    /// appeared beyond the reserved capacity.
    fn sync_ports(&mut self, tables: &Tables<Port>) {
        let epoll = &self.epoll;
        self.registered.retain(|(slot, tap)| {
            let keep = tables.network(*slot).is_some_and(|n| Arc::ptr_eq(n.port(), tap));
            if !keep {
                let _ = epoll.delete(tap.as_raw_fd());
            }
            keep
        });
        for (slot, net) in tables.networks() {
            if !self.registered.iter().any(|(s, _)| *s == slot)
                && epoll.add(net.port().as_raw_fd(), slot as u64).is_ok()
            {
                self.registered.push((slot, Arc::clone(net.port())));
            }
        }
        self.registered_generation = tables.generation();
    }

    fn drain_port(&mut self, tables: &Tables<Port>, slot: usize) {
        let Some(net) = tables.network(slot) else { return };
        let tap = net.port();
        let vnet = tap.offloads().vnet_hdr;
        let read_at = if vnet { HEADROOM - VNET_HDR_LEN } else { HEADROOM };
        let learned = Arc::clone(self.learned.load());
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        let udp_port = shared.config.port;
        let gso = shared.gso_ok.load(Ordering::Relaxed);
        for _ in 0..ROUNDS_PER_WAKEUP {
            // Read up to a batch of frames, each into its own buffer.
            let mut lens = [0usize; BATCH];
            let mut count = 0;
            let mut drained = false;
            while count < BATCH {
                match tap.read(&mut self.bufs[count][read_at..]) {
                    Ok(n) if n >= read_at.abs_diff(HEADROOM) => {
                        lens[count] = n - (HEADROOM - read_at);
                        count += 1;
                    }
                    Ok(_) => c.dropped(DropReason::RuntFrame),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        drained = true; // WouldBlock, or the TAP went away
                        break;
                    }
                }
            }
            for (i, &len) in lens.iter().enumerate().take(count) {
                bump(&c.tx.frames, 1);
                bump(&c.tx.bytes, len as u64);
                let buf = &mut self.bufs[i];
                let shape = if vnet {
                    let hdr = VirtioNetHdr::parse(buf[read_at..HEADROOM].try_into().expect("10 bytes"));
                    match offload::prepare_tx(&hdr, &mut buf[HEADROOM..HEADROOM + len]) {
                        Ok(shape) => shape,
                        Err(_) => {
                            c.dropped(DropReason::UnsupportedOffload);
                            continue;
                        }
                    }
                } else {
                    TxShape::Whole
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
                        let piece = libc::iovec {
                            iov_base: self.reply[start..].as_mut_ptr().cast(),
                            iov_len: VNET_HDR_LEN + n - start,
                        };
                        if tap.writev(std::slice::from_ref(&piece)).is_err() {
                            c.dropped(DropReason::ArpReplyFailed);
                        }
                        continue;
                    }
                    TapVerdict::Unicast(vtep) => {
                        one = [vtep];
                        &one
                    }
                    TapVerdict::Flood(list) => list,
                };
                let queue = &mut self.queues[port_index(flow_hash(frame), self.queues.len())];
                match shape {
                    TxShape::Whole => {
                        if len + vxlan::HEADER_LEN > MAX_UDP_PAYLOAD {
                            c.dropped(DropReason::FrameTooLarge);
                            continue;
                        }
                        let header: &mut [u8; vxlan::HEADER_LEN] =
                            (&mut buf[HEADROOM - vxlan::HEADER_LEN..HEADROOM]).try_into().expect("8 bytes");
                        vxlan::write_header(header, net.vni());
                        let datagram = buf[HEADROOM - vxlan::HEADER_LEN..].as_mut_ptr();
                        for &dst in dsts {
                            if queue.is_full() {
                                queue.flush(&shared);
                            }
                            queue.push(datagram, len + vxlan::HEADER_LEN, dst, udp_port);
                            bump(&c.tx.datagrams, 1);
                        }
                    }
                    TxShape::Segment { mss } => {
                        let frame = &buf[HEADROOM..HEADROOM + len];
                        let arena = &mut self.arenas[i];
                        let Some((segments, seg_size)) = cut(frame, mss, net.vni(), arena) else {
                            c.dropped(DropReason::UnsupportedOffload);
                            continue;
                        };
                        bump(&c.tx.segmented, 1);
                        send_segments(queue, &shared, arena, segments, seg_size, dsts, udp_port, gso);
                    }
                }
            }
            for q in self.queues.iter_mut().filter(|q| q.len > 0) {
                q.flush(&shared);
            }
            if drained {
                break;
            }
        }
    }
}

/// Cuts a super-frame into `arena`: VXLAN + segment headers in the header arena, iovecs
/// alternating those headers and the payload where it lies. Returns the number of segments
/// and the size of every datagram but the last, or `None` if the frame cannot be cut here.
fn cut(frame: &[u8], mss: usize, vni: crate::Vni, arena: &mut SegmentArena) -> Option<(usize, usize)> {
    let sf = SuperFrame::parse(frame).ok()?;
    let n = sf.segment_count(mss);
    let hdr_len = vxlan::HEADER_LEN + sf.header_len();
    if n > MAX_SEGMENTS || hdr_len > SEG_HDR_CAP || hdr_len + mss > MAX_UDP_PAYLOAD {
        return None;
    }
    for s in 0..n {
        let h = &mut arena.headers[s * SEG_HDR_CAP..s * SEG_HDR_CAP + hdr_len];
        let (vx, rest) = h.split_at_mut(vxlan::HEADER_LEN);
        vxlan::write_header(vx.try_into().expect("8 bytes"), vni);
        let payload = sf.write_segment_headers(s, mss, rest);
        arena.iovs[2 * s] = libc::iovec { iov_base: h.as_mut_ptr().cast(), iov_len: hdr_len };
        // The kernel only reads through this pointer.
        arena.iovs[2 * s + 1] =
            libc::iovec { iov_base: frame[payload.clone()].as_ptr().cast_mut().cast(), iov_len: payload.len() };
    }
    Some((n, hdr_len + mss))
}

/// Queues the segments in `arena` to every destination: as GSO runs when allowed, else one
/// datagram per segment.
#[allow(clippy::too_many_arguments)]
fn send_segments(
    queue: &mut SendQueue,
    shared: &Shared,
    arena: &mut SegmentArena,
    segments: usize,
    seg_size: usize,
    dsts: &[IpAddr],
    port: u16,
    gso: bool,
) {
    let c = &shared.counters;
    let per_run = if gso { MAX_GSO_SEGMENTS.min(MAX_UDP_PAYLOAD / seg_size).max(1) } else { 1 };
    let mut first = 0;
    while first < segments {
        let run = per_run.min(segments - first);
        let iov = &raw mut arena.iovs[2 * first];
        for &dst in dsts {
            if queue.is_full() {
                queue.flush(shared);
            }
            // A run of one is sent as a plain datagram (no GSO needed).
            let gso_size = if run > 1 { seg_size as u16 } else { 0 };
            queue.push_iovecs(iov, 2 * run, dst, port, gso_size);
            bump(&c.tx.datagrams, run as u64);
            if run > 1 {
                bump(&c.tx.gso_sends, 1);
            }
        }
        first += run;
    }
}
