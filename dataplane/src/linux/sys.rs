//! The system calls the shell needs that std and socket2 do not offer: eventfd, epoll, poll,
//! sendmmsg/recvmmsg and socket addresses in C form. Every `unsafe` of the shell except the
//! TAP ioctls (in `tap.rs`) lives here.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// An eventfd used to wake a hot loop out of its wait (configuration change, shutdown).
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the eventfd readable. Failure is impossible short of a counter overflow, which
    /// still leaves it readable, so the result is not needed.
    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own fd.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets it to unreadable.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own fd; EAGAIN is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut v).cast(), 8) };
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll instance (level-triggered).
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: no pointers; a non-negative return is a new fd we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn add(&self, fd: RawFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) }).map(drop)
    }

    /// Waits for readiness; returns how many entries of `events` were filled (0 on timeout
    /// or signal).
    pub(crate) fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: the kernel writes at most `max` entries into `events`, which has that many.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        match cvt(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Waits until one of `fds` is readable, or the timeout passes. Errors count as a wake-up:
/// the caller's next non-blocking read tells what happened.
pub(crate) fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) {
    let mut polls = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    // SAFETY: `polls` holds exactly N valid pollfd entries for the duration of the call.
    let _ = unsafe { libc::poll(polls.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
}

/// A socket address in C form, big enough for IPv4 and IPv6.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) union SockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl SockAddr {
    pub(crate) fn zeroed() -> SockAddr {
        // SAFETY: both members are plain C structs for which all-zero bytes are valid.
        unsafe { zeroed() }
    }

    /// Writes `ip:port` and returns the length to pass to the kernel.
    #[inline]
    pub(crate) fn set(&mut self, ip: IpAddr, port: u16) -> libc::socklen_t {
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
    pub(crate) fn ip(&self) -> Option<IpAddr> {
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

    pub(crate) const CAPACITY: libc::socklen_t = size_of::<SockAddr>() as libc::socklen_t;
}

/// An all-zero mmsghdr, to be pointed at buffers before use.
pub(crate) fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct (pointers, lengths, flags); all-zero is valid.
    unsafe { zeroed() }
}

/// sendmmsg(2): returns how many messages the kernel took.
///
/// # Safety
/// Every header must point at live iovecs, buffers and addresses for the duration of the call.
pub(crate) unsafe fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let len = msgs.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
    // SAFETY: the caller guarantees the headers' pointers are live; `msgs` has `len` entries.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), len, 0) };
    cvt(n).map(|n| n as usize)
}

/// recvmmsg(2) without waiting: returns how many messages were filled.
///
/// # Safety
/// Every header must point at live, writable iovecs, buffers and address storage.
pub(crate) unsafe fn recvmmsg_nowait(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let len = msgs.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
    // SAFETY: the caller guarantees the headers' pointers are live and writable.
    let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), len, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    cvt(n).map(|n| n as usize)
}

/// Sets an integer socket option.
pub(crate) fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(fd, level, name, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t)
    })
    .map(drop)
}

/// read(2) into `buf`.
#[inline]
pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// write(2) of `buf`.
#[inline]
pub(crate) fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// writev(2) of `pieces`.
///
/// The iovecs must point at live, readable memory of their stated lengths.
#[inline]
pub(crate) fn writev(fd: RawFd, pieces: &[libc::iovec]) -> io::Result<usize> {
    let n = pieces.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: the kernel reads each iovec's memory, which the caller keeps live and readable.
    let r = unsafe { libc::writev(fd, pieces.as_ptr(), n) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

// From <linux/udp.h>: segmentation offload on send, and coalescing on receive.
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Room for one control message carrying a small integer, aligned as `cmsghdr` needs.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct CmsgBuf([u8; 64]);

impl CmsgBuf {
    pub(crate) const fn new() -> CmsgBuf {
        CmsgBuf([0; 64])
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }

    /// Writes a `UDP_SEGMENT` control message of `size` and returns the control length.
    pub(crate) fn set_udp_segment(&mut self, size: u16) -> usize {
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

    pub(crate) const CAPACITY: usize = 64;
}

/// The `UDP_GRO` segment size in a received message's control data, if any.
///
/// # Safety
/// `msg.msg_control`/`msg_controllen` must describe control data the kernel wrote.
pub(crate) unsafe fn udp_gro_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: the CMSG_* macros walk control data the kernel wrote and bounded by
    // msg_controllen; each header's data holds at least an int for UDP_GRO.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
