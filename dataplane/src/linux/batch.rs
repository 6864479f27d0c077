//! Batched datagram I/O (`sendmmsg`, `recvmmsg`, their control messages, gathering `writev`)
//! over buffers the hot loops own and name by index. The loops' only raw pointers live here,
//! built inside the call that hands them to the kernel and never read after it returns.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::os::fd::RawFd;

use super::sys::{UDP_GRO, UDP_SEGMENT, cvt};

/// A socket address in C form, big enough for IPv4 and IPv6.
#[derive(Clone, Copy)]
#[repr(C)]
union SockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl SockAddr {
    fn zeroed() -> SockAddr {
        // SAFETY: both members are plain C structs for which all-zero bytes are valid.
        unsafe { zeroed() }
    }

    /// Writes `ip:port` and returns the length to pass to the kernel.
    #[inline]
    fn set(&mut self, ip: IpAddr, port: u16) -> libc::socklen_t {
        match ip {
            IpAddr::V4(a) => {
                self.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: port.to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
                    sin_zero: [0; 8],
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            IpAddr::V6(a) => {
                self.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: port.to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.octets() },
                    sin6_scope_id: 0,
                };
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    /// The address the kernel wrote (IPv4-mapped IPv6 addresses come back as IPv4).
    #[inline]
    fn ip(&self) -> Option<IpAddr> {
        // SAFETY: every member starts with the family field, and all bytes are initialised
        // (the union is zeroed before the kernel writes into it), so reading either member
        // after checking the family is sound.
        unsafe {
            match i32::from(self.v4.sin_family) {
                libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(self.v4.sin_addr.s_addr.to_ne_bytes()))),
                libc::AF_INET6 => Some(Ipv6Addr::from(self.v6.sin6_addr.s6_addr).to_canonical()),
                _ => None,
            }
        }
    }

    const CAPACITY: libc::socklen_t = size_of::<SockAddr>() as libc::socklen_t;
}

/// Room for one control message carrying a small integer, aligned as `cmsghdr` needs.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CmsgBuf::CAPACITY]);

impl CmsgBuf {
    const CAPACITY: usize = 64;

    const fn new() -> CmsgBuf {
        CmsgBuf([0; CmsgBuf::CAPACITY])
    }

    /// Writes a `UDP_SEGMENT` control message of `size` and returns the control length.
    fn set_udp_segment(&mut self, size: u16) -> usize {
        // SAFETY: the buffer is 8-aligned and 64 bytes, more than CMSG_SPACE(2); the header is
        // written whole (zeroed first, as some libcs pad it), the data right behind it.
        unsafe {
            let mut h: libc::cmsghdr = zeroed();
            h.cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            h.cmsg_level = libc::SOL_UDP;
            h.cmsg_type = UDP_SEGMENT;
            std::ptr::write(self.0.as_mut_ptr().cast::<libc::cmsghdr>(), h);
            let data = self.0.as_mut_ptr().add(size_of::<libc::cmsghdr>());
            std::ptr::write_unaligned(data.cast::<u16>(), size);
            libc::CMSG_SPACE(size_of::<u16>() as u32) as usize
        }
    }

    /// The `UDP_GRO` segment size in the first `len` bytes, control data the kernel wrote.
    /// Walks the headers as `CMSG_NXTHDR` does, refusing any that does not lie inside.
    fn udp_gro_size(&self, len: usize) -> Option<usize> {
        const HDR: usize = size_of::<libc::cmsghdr>();
        const ALIGN: usize = size_of::<usize>();
        let len = len.min(CmsgBuf::CAPACITY);
        let mut at = 0;
        while at + HDR <= len {
            // SAFETY: `at + HDR <= len <= CAPACITY`, so the header lies inside the buffer; it
            // is read unaligned and is only integers, valid for any bytes.
            let h = unsafe { std::ptr::read_unaligned(self.0.as_ptr().add(at).cast::<libc::cmsghdr>()) };
            #[allow(clippy::unnecessary_cast)] // cmsg_len is not usize on every libc
            let c_len = h.cmsg_len as usize;
            if c_len < HDR || c_len > len - at {
                return None;
            }
            if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == UDP_GRO {
                let data = self.0.get(at + HDR..at + HDR + size_of::<libc::c_int>()).filter(|_| c_len >= HDR + 4)?;
                let v = libc::c_int::from_ne_bytes(data.try_into().ok()?);
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            at += c_len.div_ceil(ALIGN) * ALIGN;
        }
        None
    }
}

/// An all-zero mmsghdr, to be pointed at buffers before use.
fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct (pointers, lengths, flags); all-zero is valid.
    unsafe { zeroed() }
}

fn empty_iovec() -> libc::iovec {
    libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }
}

/// An iovec over `bytes`, which the kernel only reads.
fn iovec_of(bytes: &[u8]) -> libc::iovec {
    libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() }
}

/// sendmmsg(2): returns how many messages the kernel took.
///
/// # Safety
/// Every header must point at live iovecs, buffers and addresses for the duration of the call.
unsafe fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let len = msgs.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
    // SAFETY: the caller guarantees the headers' pointers are live; `msgs` has `len` entries.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), len, 0) };
    cvt(n).map(|n| n as usize)
}

/// Segments cut from a batch's super-frames: each one's headers, written here, and where its
/// payload lies in the frame buffers. A run of segments sent as one GSO message may span
/// super-frames, so its segments follow each other here.
pub(crate) struct SegmentArena {
    /// `header_cap` bytes of room per segment.
    headers: Box<[u8]>,
    header_cap: usize,
    segments: Box<[Segment]>,
    /// Two per segment (header, payload), pointed at them by [`SendBatch::send`].
    iovs: Box<[libc::iovec]>,
    used: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Segment {
    header_len: usize,
    frame: usize,
    payload: (usize, usize),
}

impl SegmentArena {
    /// An arena for `capacity` segments with headers of up to `header_cap` bytes.
    pub(crate) fn new(capacity: usize, header_cap: usize) -> SegmentArena {
        SegmentArena {
            headers: vec![0u8; capacity * header_cap].into_boxed_slice(),
            header_cap,
            segments: vec![Segment::default(); capacity].into_boxed_slice(),
            iovs: (0..2 * capacity).map(|_| empty_iovec()).collect(),
            used: 0,
        }
    }

    /// Segments added since the last [`SegmentArena::clear`]; the next one gets this index.
    pub(crate) fn len(&self) -> usize {
        self.used
    }

    /// How many more segments fit.
    pub(crate) fn room(&self) -> usize {
        self.segments.len() - self.used
    }

    /// Forgets every segment; messages that name them must have been sent.
    pub(crate) fn clear(&mut self) {
        self.used = 0;
    }

    /// Adds a segment: a header of `header_len` bytes, returned for the caller to write,
    /// followed by bytes `payload` of frame buffer `frame`. `None` if the arena is full or
    /// the header does not fit its room.
    pub(crate) fn push(&mut self, frame: usize, payload: Range<usize>, header_len: usize) -> Option<&mut [u8]> {
        let i = self.used;
        if i == self.segments.len() || header_len > self.header_cap {
            return None;
        }
        self.segments[i] = Segment { header_len, frame, payload: (payload.start, payload.end) };
        self.used += 1;
        Some(&mut self.headers[i * self.header_cap..i * self.header_cap + header_len])
    }

    /// Points the iovecs of `segments` at their headers and payloads in `frames`.
    fn fill_iovecs(&mut self, segments: Range<usize>, frames: &[Box<[u8]>]) {
        for s in segments {
            let seg = self.segments[s];
            let at = s * self.header_cap;
            self.iovs[2 * s] = iovec_of(&self.headers[at..at + seg.header_len]);
            self.iovs[2 * s + 1] = iovec_of(&frames[seg.frame][seg.payload.0..seg.payload.1]);
        }
    }
}

// SAFETY: the iovecs are written and handed to the kernel within one call of `SendBatch`,
// pointing into memory borrowed for that call; between calls they are never read, so the arena
// may move to another thread.
unsafe impl Send for SegmentArena {}

/// What a queued message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Bytes `start..end` of frame buffer `frame`, as one datagram.
    Datagram { frame: usize, start: usize, end: usize },
    /// Segments `first..end` of the arena, a datagram each.
    Segments { first: usize, end: usize },
}

#[derive(Debug, Clone, Copy)]
struct Message {
    payload: Payload,
    addr_len: libc::socklen_t,
    /// Non-zero: a GSO run of datagrams of this size (`UDP_SEGMENT`).
    gso_size: u16,
}

/// Datagrams queued for one socket's `sendmmsg`, named by index into the frame buffers and the
/// [`SegmentArena`] that [`SendBatch::send`] is given.
pub(crate) struct SendBatch {
    messages: Box<[Message]>,
    len: usize,
    addrs: Box<[SockAddr]>,
    headers: Box<[libc::mmsghdr]>,
    /// One iovec per message in one piece.
    iovs: Box<[libc::iovec]>,
    cmsgs: Box<[CmsgBuf]>,
}

// SAFETY: the headers' pointers are written and handed to the kernel within one call of
// `send` or `send_each_segment`, pointing into this batch and memory borrowed for that call;
// between calls they are never read, so the batch may move to another thread.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// A batch of up to `capacity` messages.
    pub(crate) fn new(capacity: usize) -> SendBatch {
        let none = Message { payload: Payload::Segments { first: 0, end: 0 }, addr_len: 0, gso_size: 0 };
        SendBatch {
            messages: vec![none; capacity].into_boxed_slice(),
            len: 0,
            addrs: (0..capacity).map(|_| SockAddr::zeroed()).collect(),
            headers: (0..capacity).map(|_| empty_mmsghdr()).collect(),
            iovs: (0..capacity).map(|_| empty_iovec()).collect(),
            cmsgs: (0..capacity).map(|_| CmsgBuf::new()).collect(),
        }
    }

    /// Messages queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == self.messages.len()
    }

    /// Forgets every queued message.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    fn push(&mut self, payload: Payload, dst: IpAddr, port: u16, gso_size: u16) {
        let i = self.len;
        let addr_len = self.addrs[i].set(dst, port);
        self.messages[i] = Message { payload, addr_len, gso_size };
        self.len += 1;
    }

    /// Queues bytes `range` of frame buffer `frame` as one datagram to `dst:port`.
    #[inline]
    pub(crate) fn push_datagram(&mut self, frame: usize, range: Range<usize>, dst: IpAddr, port: u16) {
        self.push(Payload::Datagram { frame, start: range.start, end: range.end }, dst, port, 0);
    }

    /// Queues `segments` of the arena to `dst:port`, a datagram each, in one message: a GSO
    /// run of datagrams of `gso_size` bytes (but the last) unless `gso_size` is 0.
    #[inline]
    pub(crate) fn push_segments(&mut self, segments: Range<usize>, dst: IpAddr, port: u16, gso_size: u16) {
        self.push(Payload::Segments { first: segments.start, end: segments.end }, dst, port, gso_size);
    }

    /// Adds to the last message the `n` arena segments that follow its own, making it a GSO
    /// run of `gso_size`-byte datagrams. `None` if the last message is no run of segments;
    /// else whether it became a GSO run only now.
    pub(crate) fn extend_last(&mut self, n: usize, gso_size: u16) -> Option<bool> {
        let m = self.messages[..self.len].last_mut()?;
        let Payload::Segments { end, .. } = &mut m.payload else { return None };
        *end += n;
        let became_gso = m.gso_size == 0;
        m.gso_size = gso_size;
        Some(became_gso)
    }

    /// Whether message `i` is a GSO run.
    pub(crate) fn is_gso(&self, i: usize) -> bool {
        self.messages[..self.len].get(i).is_some_and(|m| m.gso_size > 0)
    }

    /// Sends the messages from `from` on with one `sendmmsg`; returns how many the kernel
    /// took. Their bytes are read from `frames` and `arena`.
    pub(crate) fn send(
        &mut self,
        fd: RawFd,
        from: usize,
        frames: &[Box<[u8]>],
        arena: &mut SegmentArena,
    ) -> io::Result<usize> {
        let range = from..self.len;
        // What the kernel reads is written first, and every pointer to it taken after the
        // last write, so that no later borrow invalidates one.
        let mut control_len = 0;
        for i in range.clone() {
            let m = self.messages[i];
            match m.payload {
                Payload::Datagram { frame, start, end } => self.iovs[i] = iovec_of(&frames[frame][start..end]),
                Payload::Segments { first, end } => arena.fill_iovecs(first..end, frames),
            }
            if m.gso_size > 0 {
                control_len = self.cmsgs[i].set_udp_segment(m.gso_size);
            }
        }
        let iovs = self.iovs.as_mut_ptr();
        let segment_iovs = arena.iovs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for i in range.clone() {
            let m = self.messages[i];
            let h = &mut self.headers[i].msg_hdr;
            h.msg_name = addrs.wrapping_add(i).cast();
            h.msg_namelen = m.addr_len;
            let (iov, iovlen) = match m.payload {
                Payload::Datagram { .. } => (iovs.wrapping_add(i), 1),
                Payload::Segments { first, end } => (segment_iovs.wrapping_add(2 * first), 2 * (end - first)),
            };
            h.msg_iov = iov;
            h.msg_iovlen = iovlen as _;
            if m.gso_size > 0 {
                h.msg_control = cmsgs.wrapping_add(i).cast();
                h.msg_controllen = control_len as _;
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        // SAFETY: the headers of `range` point at this batch's addresses and control messages
        // and at iovecs (this batch's, or the arena's) written above, which cover bytes of
        // `frames` and of the arena's headers; all of it is borrowed for this call and nothing
        // writes to it until the call returns.
        unsafe { sendmmsg(fd, &mut self.headers[range]) }
    }

    /// Sends the segments of message `i` a datagram per call, without GSO (after the kernel
    /// refused the run); returns how many it refused.
    pub(crate) fn send_each_segment(
        &mut self,
        fd: RawFd,
        i: usize,
        frames: &[Box<[u8]>],
        arena: &mut SegmentArena,
    ) -> usize {
        let m = self.messages[..self.len][i];
        let Payload::Segments { first, end } = m.payload else { return 0 };
        arena.fill_iovecs(first..end, frames);
        let segment_iovs = arena.iovs.as_mut_ptr();
        let addr = self.addrs.as_mut_ptr().wrapping_add(i);
        let mut refused = 0;
        for s in first..end {
            let mut one = empty_mmsghdr();
            one.msg_hdr.msg_name = addr.cast();
            one.msg_hdr.msg_namelen = m.addr_len;
            one.msg_hdr.msg_iov = segment_iovs.wrapping_add(2 * s);
            one.msg_hdr.msg_iovlen = 2;
            // SAFETY: the header points at this batch's address of message `i` and at the two
            // iovecs of segment `s` written above, which cover the segment's header in the
            // arena and its payload in `frames`, all borrowed for this call.
            if unsafe { sendmmsg(fd, std::slice::from_mut(&mut one)) }.is_err() {
                refused += 1;
            }
        }
        refused
    }

    /// How many iovecs message `i` is made of.
    #[cfg(test)]
    pub(crate) fn iovecs(&self, i: usize) -> usize {
        match self.messages[..self.len][i].payload {
            Payload::Datagram { .. } => 1,
            Payload::Segments { first, end } => 2 * (end - first),
        }
    }
}

/// What the kernel said about one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecvMeta {
    /// The buffer it was received into.
    pub(crate) buf: usize,
    /// Its length.
    pub(crate) len: usize,
    /// It did not fit the buffer and was cut (`MSG_TRUNC`).
    pub(crate) truncated: bool,
    /// Its sender.
    pub(crate) source: Option<IpAddr>,
    /// With `UDP_GRO`: the size of the datagrams it is a run of.
    pub(crate) gro_size: Option<usize>,
}

/// `recvmmsg` into buffers named by index.
pub(crate) struct RecvBatch {
    headers: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[SockAddr]>,
    cmsgs: Box<[CmsgBuf]>,
    /// The buffer each message is received into.
    bufs: Box<[usize]>,
}

// SAFETY: the headers' pointers are written and handed to the kernel within one call of
// `recv`, pointing into this batch and buffers borrowed for that call; between calls they are
// never read, so the batch may move to another thread.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// A batch of up to `capacity` messages.
    pub(crate) fn new(capacity: usize) -> RecvBatch {
        RecvBatch {
            headers: (0..capacity).map(|_| empty_mmsghdr()).collect(),
            iovs: (0..capacity).map(|_| empty_iovec()).collect(),
            addrs: (0..capacity).map(|_| SockAddr::zeroed()).collect(),
            cmsgs: (0..capacity).map(|_| CmsgBuf::new()).collect(),
            bufs: vec![0; capacity].into_boxed_slice(),
        }
    }

    /// One `recvmmsg` without waiting (`WouldBlock` if nothing is queued) of up to `max`
    /// messages, each into `bufs[b][offset..]` of a buffer `b` for which `free(b)` holds, in
    /// order. Returns how many arrived.
    pub(crate) fn recv(
        &mut self,
        fd: RawFd,
        bufs: &mut [Box<[u8]>],
        offset: usize,
        max: usize,
        free: impl Fn(usize) -> bool,
    ) -> io::Result<usize> {
        let mut n = 0;
        let usable = bufs.iter_mut().enumerate().filter(|(b, _)| free(*b));
        for (((iov, into), (b, buf)), h) in
            self.iovs.iter_mut().zip(self.bufs.iter_mut()).zip(usable).zip(&mut self.headers[..]).take(max)
        {
            let room = &mut buf[offset..];
            *iov = libc::iovec { iov_base: room.as_mut_ptr().cast(), iov_len: room.len() };
            *into = b;
            // The kernel overwrites these.
            h.msg_hdr.msg_namelen = SockAddr::CAPACITY;
            h.msg_hdr.msg_controllen = CmsgBuf::CAPACITY as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            n += 1;
        }
        let iovs = self.iovs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for (i, h) in self.headers[..n].iter_mut().enumerate() {
            h.msg_hdr.msg_name = addrs.wrapping_add(i).cast();
            h.msg_hdr.msg_iov = iovs.wrapping_add(i);
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = cmsgs.wrapping_add(i).cast();
        }
        let len = n.min(libc::c_uint::MAX as usize) as libc::c_uint;
        // SAFETY: the first `n` headers point at this batch's address and control buffers and
        // at iovecs, written above, that each cover the rest of a distinct buffer of `bufs`
        // (each borrowed mutably once, for this call); nothing else touches them meanwhile.
        let r = unsafe { libc::recvmmsg(fd, self.headers.as_mut_ptr(), len, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        cvt(r).map(|r| r as usize)
    }

    /// The length of message `i` of the last receive.
    #[inline]
    pub(crate) fn len_of(&self, i: usize) -> usize {
        self.headers[i].msg_len as usize
    }

    /// What the kernel said about message `i` of the last receive.
    #[inline]
    pub(crate) fn meta(&self, i: usize) -> RecvMeta {
        let h = &self.headers[i];
        #[allow(clippy::unnecessary_cast)] // msg_controllen is not usize on every libc
        let control_len = h.msg_hdr.msg_controllen as usize;
        RecvMeta {
            buf: self.bufs[i],
            len: h.msg_len as usize,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            source: self.addrs[i].ip(),
            gro_size: self.cmsgs[i].udp_gro_size(control_len),
        }
    }
}

/// An iovec array for gathering writes of pieces borrowed only for the call.
pub(crate) struct Gather {
    iovs: Box<[libc::iovec]>,
}

// SAFETY: the iovecs are written and handed to the kernel within one call of `writev`; between
// calls they are never read, so the array may move to another thread.
unsafe impl Send for Gather {}

impl Gather {
    /// Room for writes of up to `capacity` pieces.
    pub(crate) fn new(capacity: usize) -> Gather {
        Gather { iovs: (0..capacity).map(|_| empty_iovec()).collect() }
    }

    /// writev(2) of `pieces` to `fd`, as one frame; `InvalidInput` if there are more pieces
    /// than room.
    pub(crate) fn writev<'a>(&mut self, fd: RawFd, pieces: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
        let mut pieces = pieces.into_iter();
        let mut n = 0;
        for (iov, piece) in self.iovs.iter_mut().zip(&mut pieces) {
            *iov = iovec_of(piece);
            n += 1;
        }
        if pieces.next().is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "more pieces than iovecs"));
        }
        // SAFETY: the kernel reads the first `n` iovecs, written above over `pieces`, which are
        // borrowed for this call.
        let r = unsafe { libc::writev(fd, self.iovs.as_ptr(), n as libc::c_int) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn sockaddr_round_trips() {
        let mut s = SockAddr::zeroed();
        for ip in ["198.18.0.1".parse::<IpAddr>().unwrap(), "fd00::1".parse().unwrap()] {
            s.set(ip, 4789);
            assert_eq!(s.ip(), Some(ip));
        }
        s.set("::ffff:198.18.0.7".parse().unwrap(), 1);
        assert_eq!(s.ip(), Some("198.18.0.7".parse().unwrap()));
    }

    #[test]
    fn a_control_buffer_without_gro_or_with_garbage_gives_no_size() {
        let mut c = CmsgBuf::new();
        assert_eq!(c.udp_gro_size(0), None);
        c.set_udp_segment(1400);
        assert_eq!(c.udp_gro_size(CmsgBuf::CAPACITY), None, "UDP_SEGMENT is not UDP_GRO");
        let mut garbage = CmsgBuf([0xff; CmsgBuf::CAPACITY]);
        assert_eq!(garbage.udp_gro_size(CmsgBuf::CAPACITY), None);
        garbage.0[..8].copy_from_slice(&8u64.to_ne_bytes()); // a header too short for its data
        assert_eq!(garbage.udp_gro_size(CmsgBuf::CAPACITY), None);
    }

    #[test]
    fn datagrams_and_segments_go_out_by_index_and_come_back_in_free_buffers() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let frames: Vec<Box<[u8]>> = vec![b"..hello".to_vec().into(), b"xxpayload-a|payload-b".to_vec().into()];
        let mut arena = SegmentArena::new(4, 16);
        arena.push(1, 2..11, 3).unwrap().copy_from_slice(b"H1:");
        arena.push(1, 12..21, 3).unwrap().copy_from_slice(b"H2:");
        let mut batch = SendBatch::new(4);
        batch.push_datagram(0, 2..7, to.ip(), to.port());
        batch.push_segments(0..1, to.ip(), to.port(), 0);
        assert_eq!(batch.extend_last(1, 12), Some(true), "a GSO run of two now");
        assert!(batch.is_gso(1));
        batch.push_segments(0..2, to.ip(), to.port(), 0);
        assert_eq!(batch.iovecs(1), 4);
        let mut sent = 0;
        while sent < batch.len() {
            sent += batch.send(sender.as_raw_fd(), sent, &frames, &mut arena).unwrap().max(1);
        }
        assert_eq!(batch.send_each_segment(sender.as_raw_fd(), 2, &frames, &mut arena), 0);

        receiver.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut one = [0u8; 64];
        let n = receiver.peek(&mut one).unwrap();
        assert_eq!(&one[..n], b"hello");
        let mut bufs: Vec<Box<[u8]>> = (0..6).map(|_| vec![0u8; 64].into_boxed_slice()).collect();
        let mut rx = RecvBatch::new(8);
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = match rx.recv(receiver.as_raw_fd(), &mut bufs, 4, 8, |b| b % 2 == 1) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            };
            for i in 0..n {
                let m = rx.meta(i);
                assert_eq!(m.buf % 2, 1, "only free buffers are used");
                assert_eq!(m.source, Some(sender.local_addr().unwrap().ip()));
                assert!(!m.truncated && m.len == rx.len_of(i));
                got.push(bufs[m.buf][4..4 + m.len].to_vec());
            }
        }
        // The GSO run as two datagrams, the run without GSO as one, then its segments one by one.
        let want: [&[u8]; 6] =
            [b"hello", b"H1:payload-a", b"H2:payload-b", b"H1:payload-aH2:payload-b", b"H1:payload-a", b"H2:payload-b"];
        assert_eq!(got, want);
    }

    #[test]
    fn a_gso_run_comes_back_whole_with_its_gro_size() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::linux::sys::setsockopt_int(receiver.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let frames: Vec<Box<[u8]>> = vec![b"payload-a|payload-b".to_vec().into()];
        let mut arena = SegmentArena::new(2, 8);
        arena.push(0, 0..9, 3).unwrap().copy_from_slice(b"H1:");
        arena.push(0, 10..19, 3).unwrap().copy_from_slice(b"H2:");
        let mut batch = SendBatch::new(1);
        batch.push_segments(0..2, to.ip(), to.port(), 12);
        assert_eq!(batch.send(sender.as_raw_fd(), 0, &frames, &mut arena).unwrap(), 1);

        let mut bufs: Vec<Box<[u8]>> = vec![vec![0u8; 64].into_boxed_slice()];
        let mut rx = RecvBatch::new(1);
        let n = loop {
            match rx.recv(receiver.as_raw_fd(), &mut bufs, 0, 1, |_| true) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.unwrap(),
            }
        };
        assert_eq!(n, 1);
        let m = rx.meta(0);
        assert_eq!((m.len, m.gro_size), (24, Some(12)));
        assert_eq!(&bufs[0][..24], b"H1:payload-aH2:payload-b");
    }

    #[test]
    fn a_gathering_write_takes_every_piece_or_none() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut g = Gather::new(2);
        assert_eq!(g.writev(a.as_raw_fd(), [&b"ab"[..], b"cd"]).unwrap(), 4);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
        let e = g.writev(a.as_raw_fd(), [&b"a"[..], b"b", b"c"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
