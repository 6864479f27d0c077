//! The TAP → underlay hot loop: read frames from the TAPs, decide, encapsulate in place, send
//! in batches.
//!
//! Each frame is read into its own buffer behind [`HEADROOM`] bytes, so the VXLAN header is
//! written in front of it without moving it; the datagrams of a batch go out with one
//! `sendmmsg` per source-port socket, a flooded frame as one datagram per flood-list member
//! that all point at the same bytes. Nothing is allocated per frame: buffers, message headers
//! and addresses are allocated once when the loop starts.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::sys::{self, Epoll, SockAddr};
use super::{Port, Shared};
use crate::alloc_count;
use crate::counters::{DropReason, bump};
use crate::learn::LearnedReader;
use crate::switch::{self, TapVerdict};
use crate::tables::{Tables, TablesReader};
use crate::wire::arp;
use crate::wire::flow::{flow_hash, port_index};
use crate::wire::vxlan;

/// Frames read from one TAP before their datagrams are sent.
pub(crate) const BATCH: usize = 64;
/// Rounds of [`BATCH`] frames taken from one TAP before looking at the others.
const ROUNDS_PER_WAKEUP: usize = 8;
/// Datagrams per `sendmmsg` call (a flood to many VTEPs may need several calls).
const MMSG_CAP: usize = 256;
/// Room in front of each frame for headers written in place.
pub(crate) const HEADROOM: usize = 64;
/// Largest frame read from a TAP.
pub(crate) const FRAME_CAP: usize = 65_536;
/// Largest UDP payload on IPv4 (65535 − 20 − 8).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// epoll data value of the wake-up eventfd.
const WAKE: u64 = u64::MAX;

/// Datagrams waiting for one socket's `sendmmsg`.
struct SendQueue {
    fd: RawFd,
    len: usize,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
}

impl SendQueue {
    fn new(fd: RawFd) -> SendQueue {
        SendQueue {
            fd,
            len: 0,
            msgs: (0..MMSG_CAP).map(|_| sys::empty_mmsghdr()).collect(),
            iovs: (0..MMSG_CAP).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            addrs: (0..MMSG_CAP).map(|_| SockAddr::zeroed()).collect(),
        }
    }

    fn is_full(&self) -> bool {
        self.len == MMSG_CAP
    }

    /// Queues one datagram. `data` must stay valid and unchanged until the next `flush`.
    #[inline]
    fn push(&mut self, data: *mut u8, len: usize, dst: std::net::IpAddr, port: u16) {
        let i = self.len;
        self.iovs[i] = libc::iovec { iov_base: data.cast(), iov_len: len };
        let addr_len = self.addrs[i].set(dst, port);
        let h = &mut self.msgs[i].msg_hdr;
        h.msg_name = (&raw mut self.addrs[i]).cast();
        h.msg_namelen = addr_len;
        h.msg_iov = &raw mut self.iovs[i];
        h.msg_iovlen = 1;
        self.len += 1;
    }

    fn flush(&mut self, shared: &Shared) {
        let c = &shared.counters;
        let mut sent = 0;
        while sent < self.len {
            // SAFETY: headers 0..len were filled by `push`, pointing at this queue's iovecs and
            // addresses (boxed, never moved) and at frame buffers that the loop leaves untouched
            // until this flush returns.
            match unsafe { sys::sendmmsg(self.fd, &mut self.msgs[sent..self.len]) } {
                Ok(n) => {
                    sent += n.max(1);
                    bump(&c.tx.datagrams, n as u64);
                    bump(&c.tx.send_calls, 1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The first unsent datagram is the one the kernel refused: count and skip it.
                    c.dropped(DropReason::SendFailed);
                    sent += 1;
                }
            }
        }
        self.len = 0;
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
    reply: [u8; arp::MAX_REPLY_LEN],
}

// SAFETY: the raw pointers in the send queues point only into the queues' own boxed arrays
// and into `bufs`, heap allocations owned by this same struct; they are rewritten before each
// use, and nothing else refers to them, so handing the whole loop to another thread is sound.
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
            reply: [0; arp::MAX_REPLY_LEN],
            shared,
        })
    }

    pub(crate) fn run(mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        while !self.shared.stop.load(Ordering::Acquire) {
            self.shared.counters.tx.loop_allocations.store(alloc_count::thread_allocations(), Ordering::Relaxed);
            let tables = Arc::clone(self.tables.load());
            if tables.generation() != self.registered_generation {
                self.sync_ports(&tables);
            }
            let n = self.epoll.wait(&mut events, 1000).unwrap_or(0);
            for ev in &events[..n] {
                let data = ev.u64;
                if data == WAKE {
                    self.shared.tx_wake.drain();
                } else {
                    self.drain_port(&tables, data as usize);
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
        let Some(net) = tables.network(slot) else {
            return;
        };
        let tap = net.port();
        let learned = Arc::clone(self.learned.load());
        let c = &self.shared.counters;
        let udp_port = self.shared.config.port;
        for _ in 0..ROUNDS_PER_WAKEUP {
            // Read up to a batch of frames, each into its own buffer.
            let mut lens = [0usize; BATCH];
            let mut count = 0;
            let mut drained = false;
            while count < BATCH {
                match tap.read(&mut self.bufs[count][HEADROOM..]) {
                    Ok(n) => {
                        lens[count] = n;
                        count += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        drained = true; // WouldBlock, or the TAP went away
                        break;
                    }
                }
            }
            for (buf, &len) in self.bufs[..count].iter_mut().zip(&lens[..count]) {
                bump(&c.tx.frames, 1);
                bump(&c.tx.bytes, len as u64);
                let frame = &buf[HEADROOM..HEADROOM + len];
                let verdict = switch::from_tap(net, &learned, frame, &mut self.reply, c);
                let (dsts, sock): (&[std::net::IpAddr], usize) = match verdict {
                    TapVerdict::Drop(_) => continue,
                    TapVerdict::ArpReply(n) => {
                        if tap.write(&self.reply[..n]).is_err() {
                            c.dropped(DropReason::ArpReplyFailed);
                        }
                        continue;
                    }
                    TapVerdict::Unicast(ref vtep) => {
                        (std::slice::from_ref(vtep), port_index(flow_hash(frame), self.queues.len()))
                    }
                    TapVerdict::Flood(list) => (list, port_index(flow_hash(frame), self.queues.len())),
                };
                if len + vxlan::HEADER_LEN > MAX_UDP_PAYLOAD {
                    c.dropped(DropReason::FrameTooLarge);
                    continue;
                }
                let header: &mut [u8; vxlan::HEADER_LEN] =
                    (&mut buf[HEADROOM - vxlan::HEADER_LEN..HEADROOM]).try_into().expect("8-byte slice");
                vxlan::write_header(header, net.vni());
                let datagram = buf[HEADROOM - vxlan::HEADER_LEN..].as_mut_ptr();
                let queue = &mut self.queues[sock];
                for &dst in dsts {
                    if queue.is_full() {
                        queue.flush(&self.shared);
                    }
                    queue.push(datagram, len + vxlan::HEADER_LEN, dst, udp_port);
                }
            }
            for q in self.queues.iter_mut().filter(|q| q.len > 0) {
                q.flush(&self.shared);
            }
            if drained {
                break;
            }
        }
    }
}
