//! The underlay → TAP hot loop: receive datagrams in batches, check and decapsulate, write the
//! inner frames to their networks' TAPs straight from the receive buffers.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::sys::{self, SockAddr};
use super::tx::HEADROOM;
use super::{Port, Shared, Tap};
use crate::alloc_count;
use crate::counters::{Counters, DropReason, bump};
use crate::learn::Learner;
use crate::segment::SuperFrame;
use crate::switch::{self, UnderlayVerdict};
use crate::tables::TablesReader;

/// Datagrams taken per `recvmmsg`.
pub(crate) const BATCH: usize = 64;
/// Largest datagram received whole; anything longer is cut by the kernel and dropped.
const DATAGRAM_CAP: usize = 65_536;

pub(crate) struct RxLoop {
    shared: Arc<Shared>,
    fd: RawFd,
    tables: TablesReader<Port>,
    learner: Learner,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
    bufs: Box<[Box<[u8]>]>,
    /// Where segments of an oversized frame are written before they go to the TAP.
    scratch: Box<[u8]>,
}

// SAFETY: the raw pointers in `msgs` and `iovs` point only into `addrs`, `iovs` and `bufs`,
// heap allocations owned by this same struct that move with it; nothing else refers to them,
// so handing the whole loop to another thread is sound.
unsafe impl Send for RxLoop {}

impl RxLoop {
    pub(crate) fn new(shared: Arc<Shared>, fd: RawFd) -> RxLoop {
        let cfg = &shared.config;
        let learner = Learner::new(Arc::clone(&shared.learned), cfg.max_learned, cfg.ageing_secs);
        let mut bufs: Box<[Box<[u8]>]> =
            (0..BATCH).map(|_| vec![0u8; HEADROOM + DATAGRAM_CAP].into_boxed_slice()).collect();
        let iovs: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b[HEADROOM..].as_mut_ptr().cast(), iov_len: DATAGRAM_CAP })
            .collect();
        RxLoop {
            tables: shared.tables.reader(),
            learner,
            fd,
            msgs: (0..BATCH).map(|_| sys::empty_mmsghdr()).collect(),
            iovs,
            addrs: (0..BATCH).map(|_| SockAddr::zeroed()).collect(),
            bufs,
            scratch: vec![0u8; DATAGRAM_CAP].into_boxed_slice(),
            shared,
        }
    }

    /// Points every header at its buffer and address slot again (the kernel overwrites the
    /// lengths and flags).
    fn arm(&mut self) {
        for (i, m) in self.msgs.iter_mut().enumerate() {
            let h = &mut m.msg_hdr;
            h.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_namelen = SockAddr::CAPACITY;
            h.msg_iov = &raw mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            m.msg_len = 0;
        }
    }

    pub(crate) fn run(mut self) {
        let c = Arc::clone(&self.shared);
        let c = &c.counters;
        while !self.shared.stop.load(Ordering::Acquire) {
            c.rx.loop_allocations.store(alloc_count::thread_allocations(), Ordering::Relaxed);
            self.arm();
            // SAFETY: `arm` pointed every header at this loop's boxed iovecs (each covering
            // DATAGRAM_CAP bytes of its own buffer) and address slots, none of which move or are
            // otherwise borrowed during the call.
            let n = match unsafe { sys::recvmmsg_nowait(self.fd, &mut self.msgs) } {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.learner.end_batch(self.shared.now_secs(), c);
                    sys::poll_either(self.fd, self.shared.rx_wake.fd(), 1000);
                    continue;
                }
                Err(_) => continue, // EINTR, or an ICMP error queued on the socket: try again
            };
            bump(&c.rx.recv_calls, 1);
            let now = self.shared.now_secs();
            let tables = Arc::clone(self.tables.load());
            // Decide the whole batch first, then publish what it taught the learner, and only
            // then deliver: a container's answer to a frame must find the sender already
            // learned, or it would be flooded.
            let mut verdicts: [Option<UnderlayVerdict>; BATCH] = [const { None }; BATCH];
            for (i, verdict) in verdicts.iter_mut().enumerate().take(n) {
                let len = self.msgs[i].msg_len as usize;
                bump(&c.rx.datagrams, 1);
                bump(&c.rx.bytes, len as u64);
                if self.msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    c.dropped(DropReason::Oversized);
                    continue;
                }
                let Some(src) = self.addrs[i].ip() else { continue };
                let datagram = &mut self.bufs[i][HEADROOM..HEADROOM + len];
                *verdict = Some(switch::from_underlay(&tables, &mut self.learner, src, datagram, now, c));
            }
            self.learner.end_batch(now, c);
            for (i, verdict) in verdicts.iter_mut().enumerate().take(n) {
                let Some(UnderlayVerdict::Deliver { port, inner, segment_mss }) = verdict.take() else { continue };
                let Some(net) = tables.network(port) else { continue };
                let tap = net.port();
                let frame = &self.bufs[i][HEADROOM + inner.start..HEADROOM + inner.end];
                match segment_mss {
                    None => match tap.write(frame) {
                        Ok(_) => bump(&c.rx.delivered, 1),
                        Err(_) => c.dropped(DropReason::TapWriteFailed),
                    },
                    Some(mss) => deliver_segments(tap, frame, mss, &mut self.scratch, c),
                }
            }
        }
    }
}

/// Cuts an oversized TCP/UDP frame (the core checked that it can be cut) and writes each
/// segment to the TAP.
#[cold]
fn deliver_segments(tap: &Tap, frame: &[u8], mss: usize, scratch: &mut [u8], c: &Counters) {
    let Ok(sf) = SuperFrame::parse(frame) else { return };
    for i in 0..sf.segment_count(mss) {
        let n = sf.write_segment(i, mss, scratch);
        match tap.write(&scratch[..n]) {
            Ok(_) => bump(&c.rx.delivered, 1),
            Err(_) => c.dropped(DropReason::TapWriteFailed),
        }
    }
}
