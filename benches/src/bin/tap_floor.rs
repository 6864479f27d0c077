//! `tap-floor`: the cheapest userspace TAP tunnel this kernel allows, as a reference for the
//! end-to-end benchmark. It is **not** VXLAN and not a product: it measures what the mechanism
//! overlayd is built on (a TAP with offloads and a UDP socket with GSO and GRO) costs by itself,
//! so that the benchmark can tell how much of overlayd's distance to kernel VXLAN is overlayd's
//! own work and how much is the floor every TAP + UDP-socket design stands on.
//!
//! What it does per frame and nothing more: read a (super-)frame from the TAP with its
//! virtio-net header, send it to the one peer as a UDP GSO run of 1470-byte chunks, each behind
//! a 2-byte first/last marker (one `sendmsg` per 44 chunks); on the other side receive with
//! `UDP_GRO`, and write the chunks of each frame, header included, to the TAP with one `writev`.
//! The virtio-net header travels with the frame, so a super-frame arrives as the same
//! super-frame with its checksum still to be completed: no segmentation, no checksum, no
//! header rewriting, no table lookup. Those are the parts of overlayd's work this leaves out.
//!
//! Usage (inside the host's namespace, run by the e2e runner's `floor` path):
//! `tap-floor TAP LOCAL_ADDR:PORT PEER_ADDR:PORT`. It creates the TAP (the caller puts it on a
//! bridge) and runs until killed.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

/// Payload bytes per datagram: a 1500-byte underlay less IPv4, UDP and the marker.
const CHUNK: usize = 1500 - 20 - 8 - MARK;
/// The marker in front of every chunk: flags, then a pad byte.
const MARK: usize = 2;
const FIRST: u8 = 1;
const LAST: u8 = 2;
/// Chunks per GSO send (44 × 1472 bytes stays under IPv4's 65,507-byte UDP payload).
const SEND_CHUNKS: usize = 44;
/// Largest read from the TAP: a 64 KB super-frame, its Ethernet and virtio-net headers.
const FRAME_CAP: usize = 65_536 + 64;
/// Receive buffers a frame's chunks may be spread over.
const RX_BUFS: usize = 4;
const RX_CAP: usize = 65_536;
/// Most chunks of one frame.
const MAX_CHUNKS: usize = FRAME_CAP / CHUNK + 1;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [tap_name, local, peer] = args.as_slice() else {
        bail!("usage: tap-floor TAP LOCAL_ADDR:PORT PEER_ADDR:PORT (a benchmark reference, not a tunnel to use)");
    };
    let local: SocketAddr = local.parse().with_context(|| format!("{local:?} is not ADDR:PORT"))?;
    let peer: SocketAddr = peer.parse().with_context(|| format!("{peer:?} is not ADDR:PORT"))?;
    let tap = open_tap(tap_name).with_context(|| format!("creating TAP {tap_name}"))?;
    let sock = UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
    sock.connect(peer).with_context(|| format!("connecting to {peer}"))?;
    let fd = sock.as_raw_fd();
    set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    set_int(fd, SOL_UDP, UDP_GRO, 1)?;
    let tap_fd = tap.as_raw_fd();
    let rx = std::thread::spawn(move || receive(fd, tap_fd));
    transmit(tap_fd, fd);
    let _ = rx.join();
    drop(sock);
    drop(tap);
    Ok(())
}

fn open_tap(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: a constant, NUL-terminated path; a non-negative result is a new fd we own.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain C data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tap)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: the option value is one c_int that lives for the call.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setsockopt {level}/{name}"));
    }
    Ok(())
}

/// TAP → peer, until the TAP fails.
fn transmit(tap: RawFd, sock: RawFd) {
    let mut frame = vec![0u8; FRAME_CAP];
    let mut marks = [[0u8; MARK]; MAX_CHUNKS];
    let mut iovs = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2 * MAX_CHUNKS];
    let mut cmsg = [0u64; 4];
    loop {
        // SAFETY: `frame` has FRAME_CAP writable bytes.
        let n = unsafe { libc::read(tap, frame.as_mut_ptr().cast(), FRAME_CAP) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let n = n as usize;
        let chunks = n.div_ceil(CHUNK);
        for (i, m) in marks.iter_mut().enumerate().take(chunks) {
            m[0] = if i == 0 { FIRST } else { 0 } | if i + 1 == chunks { LAST } else { 0 };
        }
        let mut first = 0;
        while first < chunks {
            let count = (chunks - first).min(SEND_CHUNKS);
            for k in 0..count {
                let c = first + k;
                let end = ((c + 1) * CHUNK).min(n);
                iovs[2 * k] = libc::iovec { iov_base: marks[c].as_mut_ptr().cast(), iov_len: MARK };
                iovs[2 * k + 1] =
                    libc::iovec { iov_base: frame[c * CHUNK..].as_mut_ptr().cast(), iov_len: end - c * CHUNK };
            }
            // SAFETY: msghdr is plain C data; all-zero is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovs.as_mut_ptr();
            msg.msg_iovlen = 2 * count;
            if count > 1 {
                msg.msg_control = cmsg.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure computation.
                msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
                // SAFETY: msg_control points at 32 zeroed bytes, room for one cmsg of 2 bytes.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), (MARK + CHUNK) as u16);
                }
            }
            // SAFETY: every iovec points into `marks` or `frame`, live for the call.
            unsafe { libc::sendmsg(sock, &msg, 0) };
            first += count;
        }
    }
}

/// Peer → TAP, until the socket fails.
fn receive(sock: RawFd, tap: RawFd) {
    let mut bufs: Vec<Vec<u8>> = (0..RX_BUFS).map(|_| vec![0u8; RX_CAP]).collect();
    let mut pieces = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_CHUNKS];
    let mut npieces = 0usize;
    // Receive buffer of the current frame's first chunk; the next receive must not reuse it.
    let mut frame_buf: Option<usize> = None;
    let mut next = 0usize;
    let mut cmsg = [0u64; 8];
    loop {
        if frame_buf == Some(next) {
            npieces = 0; // a frame longer than RX_BUFS receives: give it up
            frame_buf = None;
        }
        let b = next;
        next = (next + 1) % RX_BUFS;
        let mut iov = libc::iovec { iov_base: bufs[b].as_mut_ptr().cast(), iov_len: RX_CAP };
        // SAFETY: msghdr is plain C data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&cmsg);
        // SAFETY: the iovec covers RX_CAP bytes of `bufs[b]`, the control buffer is ours.
        let n = unsafe { libc::recvmsg(sock, &mut msg, 0) };
        if n < 0 {
            // EINTR, or the ICMP error of a datagram sent before the peer was up
            // (ECONNREFUSED on a connected socket): go on.
            if io::Error::last_os_error().raw_os_error() == Some(libc::EBADF) {
                return;
            }
            continue;
        }
        let n = n as usize;
        let mut stride = n;
        // SAFETY: the kernel wrote msg_controllen bytes of control messages.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    stride = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>()) as usize;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let mut off = 0;
        while off < n {
            let end = (off + stride.max(MARK + 1)).min(n);
            let flags = bufs[b][off];
            if flags & FIRST != 0 {
                npieces = 0;
                frame_buf = Some(b);
            }
            if npieces < MAX_CHUNKS && (npieces > 0 || flags & FIRST != 0) {
                pieces[npieces] =
                    libc::iovec { iov_base: bufs[b][off + MARK..].as_mut_ptr().cast(), iov_len: end - off - MARK };
                npieces += 1;
                if flags & LAST != 0 {
                    // SAFETY: every piece points into a receive buffer not reused since.
                    unsafe { libc::writev(tap, pieces.as_ptr(), npieces as libc::c_int) };
                    npieces = 0;
                    frame_buf = None;
                }
            }
            off = end;
        }
    }
}
