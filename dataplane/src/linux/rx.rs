//! The underlay → TAP hot loop: receive datagrams in batches, check and decapsulate, write the
//! inner frames to their networks' TAPs from the receive buffers.
//!
//! With `UDP_GRO` on the socket, one received message holds a run of datagrams of one outer
//! flow cut at a stride (the `UDP_GRO` control message); over veth, a peer's GSO send arrives
//! here whole, never split into packets. Each datagram is checked by the switching core; then,
//! on a TAP with offloads, consecutive TCP segments of one inner flow are joined into one
//! super-frame ([`crate::offload::Coalescer`]) and written with one `writev`: the rewritten
//! headers of the first segment, then every segment's payload where it lies. Learning is
//! published before anything of a message is delivered, so a container's answer never finds
//! its sender unknown. Nothing is allocated per datagram.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::sys::{self, CmsgBuf, SockAddr};
use super::tx::HEADROOM;
use super::{Port, Shared, Tap};
use crate::alloc_count;
use crate::counters::{Counters, DropReason, bump};
use crate::learn::Learner;
use crate::offload::{self, Coalescer, TcpSegment, VNET_HDR_LEN};
use crate::segment::SuperFrame;
use crate::switch::{self, UnderlayVerdict};
use crate::tables::TablesReader;
use crate::wire::{ethernet, vxlan};

/// Messages taken per `recvmmsg`.
pub(crate) const BATCH: usize = 32;
/// Largest message: a GRO run of up to 64 datagrams, or one datagram of up to 64 KB.
const MESSAGE_CAP: usize = 65_536;
/// Most datagrams in one GRO run (`UDP_MAX_SEGMENTS`; a smaller stride is refused below).
const MAX_RUN: usize = 64;
/// Most pieces of one coalesced write: the virtio-net header, the first frame, and a payload
/// per further segment.
const MAX_PIECES: usize = MAX_RUN + 2;

const NO_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

pub(crate) struct RxLoop {
    shared: Arc<Shared>,
    fd: RawFd,
    tables: TablesReader<Port>,
    learner: Learner,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
    cmsgs: Box<[CmsgBuf]>,
    bufs: Box<[Box<[u8]>]>,
    /// Verdicts of the datagrams of the message being handled.
    verdicts: Box<[Option<UnderlayVerdict>]>,
    /// Pieces of one coalesced write.
    pieces: Box<[libc::iovec]>,
    /// Where segments of an oversized frame are written when the TAP cannot take it whole.
    scratch: Box<[u8]>,
}

// SAFETY: the raw pointers in `msgs`, `iovs` and `pieces` point only into `addrs`, `cmsgs`,
// `iovs` and `bufs`, heap allocations owned by this same struct that move with it; nothing else
// refers to them, so handing the whole loop to another thread is sound.
unsafe impl Send for RxLoop {}

impl RxLoop {
    pub(crate) fn new(shared: Arc<Shared>, fd: RawFd) -> RxLoop {
        let cfg = &shared.config;
        let learner = Learner::new(Arc::clone(&shared.learned), cfg.max_learned, cfg.ageing_secs);
        let mut bufs: Box<[Box<[u8]>]> =
            (0..BATCH).map(|_| vec![0u8; HEADROOM + MESSAGE_CAP].into_boxed_slice()).collect();
        let iovs: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b[HEADROOM..].as_mut_ptr().cast(), iov_len: MESSAGE_CAP })
            .collect();
        RxLoop {
            tables: shared.tables.reader(),
            learner,
            fd,
            msgs: (0..BATCH).map(|_| sys::empty_mmsghdr()).collect(),
            iovs,
            addrs: (0..BATCH).map(|_| SockAddr::zeroed()).collect(),
            cmsgs: (0..BATCH).map(|_| CmsgBuf::new()).collect(),
            bufs,
            verdicts: (0..MAX_RUN).map(|_| None).collect(),
            pieces: (0..MAX_PIECES).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            scratch: vec![0u8; MESSAGE_CAP].into_boxed_slice(),
            shared,
        }
    }

    /// Points every header at its buffer, address and control slots again (the kernel
    /// overwrites lengths and flags).
    fn arm(&mut self) {
        for (i, m) in self.msgs.iter_mut().enumerate() {
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

    pub(crate) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        while !shared.stop.load(Ordering::Acquire) {
            c.rx.loop_allocations.store(alloc_count::thread_allocations(), Ordering::Relaxed);
            self.arm();
            // SAFETY: `arm` pointed every header at this loop's boxed iovecs (each covering
            // MESSAGE_CAP bytes of its own buffer), address slots and control buffers, none of
            // which move or are otherwise borrowed during the call.
            let n = match unsafe { sys::recvmmsg_nowait(self.fd, &mut self.msgs) } {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.learner.end_batch(shared.now_secs(), c);
                    sys::poll_either(self.fd, shared.rx_wake.fd(), 1000);
                    continue;
                }
                Err(_) => continue, // EINTR, or an ICMP error queued on the socket: try again
            };
            bump(&c.rx.recv_calls, 1);
            let now = shared.now_secs();
            for i in 0..n {
                self.message(i, now, c);
            }
        }
    }

    /// Handles message `i`: one datagram, or a GRO run of them.
    fn message(&mut self, i: usize, now: u64, c: &Counters) {
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
        let tables = Arc::clone(self.tables.load());
        let buf = &mut self.bufs[i][HEADROOM..HEADROOM + len];
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
            *v = Some(switch::from_underlay(&tables, &mut self.learner, src, d, now, c));
        }
        self.learner.end_batch(now, c);

        let coalesce = self.shared.config.offloads.coalesce;
        let mut run: Option<(usize, Coalescer, usize, usize)> = None; // (port, run, first offset, first len)
        let mut pieces = 0usize;
        for k in 0..count {
            let Some(UnderlayVerdict::Deliver { port, inner, segment_mss }) = self.verdicts[k].take() else { continue };
            let Some(net) = tables.network(port) else { continue };
            let tap = net.port();
            let start = k * stride + inner.start;
            let end = k * stride + inner.end;
            let vnet = tap.offloads().vnet_hdr;
            if let Some(mss) = segment_mss {
                flush(&mut run, &mut pieces, &mut self.pieces, buf, &tables, c);
                deliver_oversized(tap, &mut buf[start..end], mss, &mut self.scratch, c);
                continue;
            }
            if vnet && coalesce {
                if let Some(seg) = TcpSegment::parse(&buf[start..end]) {
                    if let Some((p, r, first, first_len)) = &mut run {
                        let (head, rest) = buf.split_at(start);
                        if *p == port && r.try_push(&head[*first..*first + *first_len], &rest[..end - start], &seg) {
                            self.pieces[pieces] = piece(&buf[start + seg.payload_offset()..end]);
                            pieces += 1;
                            continue;
                        }
                    }
                    flush(&mut run, &mut pieces, &mut self.pieces, buf, &tables, c);
                    run = Some((port, Coalescer::new(seg), start, end - start));
                    pieces = 2; // the header and the first frame go in front
                    continue;
                }
            }
            flush(&mut run, &mut pieces, &mut self.pieces, buf, &tables, c);
            write_frame(tap, &buf[start..end], c);
        }
        flush(&mut run, &mut pieces, &mut self.pieces, buf, &tables, c);
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

/// Writes the pending coalesced run, if any.
fn flush(
    run: &mut Option<(usize, Coalescer, usize, usize)>,
    pieces: &mut usize,
    slots: &mut [libc::iovec],
    buf: &mut [u8],
    tables: &crate::tables::Tables<Port>,
    c: &Counters,
) {
    let Some((port, r, first, first_len)) = run.take() else { return };
    let Some(net) = tables.network(port) else { return };
    let hdr = r.finish(&mut buf[first..first + first_len]).to_bytes();
    slots[0] = piece(&hdr);
    slots[1] = piece(&buf[first..first + first_len]);
    match net.port().writev(&slots[..*pieces]) {
        Ok(_) => {
            bump(&c.rx.delivered, r.count() as u64);
            if r.count() > 1 {
                bump(&c.rx.coalesced, 1);
            }
        }
        Err(_) => c.dropped(DropReason::TapWriteFailed),
    }
    *pieces = 0;
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
