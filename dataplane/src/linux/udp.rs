//! The underlay sockets: one bound to the VXLAN port that receives everything, and one per
//! outer source port that sends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use super::sys;

// From <linux/asm-generic/socket.h>: set buffer sizes above net.core.{r,w}mem_max (needs
// CAP_NET_ADMIN), as wireguard-go does to reach full speed.
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// The bound sockets.
///
/// A UDP socket sends from the port it is bound to, and the outer source port must follow the
/// inner flow (ECMP/RSS entropy, as Linux's vxlan does), so a small range of source ports is
/// bound and the socket picked by flow hash. Real UDP sockets (rather than a raw socket that
/// writes its own UDP header) keep the kernel's UDP checksum offload and UDP GSO.
#[derive(Debug)]
pub(crate) struct UnderlaySockets {
    pub(crate) rx: Socket,
    pub(crate) tx: Vec<Socket>,
}

fn new_socket(local: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(local), Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&local.into())?;
    Ok(s)
}

/// Sets a buffer size, forcing past the sysctl limit when allowed, else as large as allowed.
fn set_buffer(s: &Socket, force: libc::c_int, bytes: usize) -> io::Result<()> {
    let v = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    if sys::setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, force, v).is_ok() {
        return Ok(());
    }
    if force == SO_RCVBUFFORCE { s.set_recv_buffer_size(bytes) } else { s.set_send_buffer_size(bytes) }
}

/// Why a socket could not be set up, with the address it was for.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind UDP {addr}: {source}")]
pub struct BindError {
    /// The address that could not be bound.
    pub addr: SocketAddr,
    /// The system error.
    #[source]
    pub source: io::Error,
}

impl UnderlaySockets {
    /// Turns on `UDP_GRO` for the receiving socket; false if the kernel refuses (before 5.0).
    pub(crate) fn enable_gro(&self) -> bool {
        sys::setsockopt_int(self.rx.as_raw_fd(), libc::SOL_UDP, sys::UDP_GRO, 1).is_ok()
    }
}

pub(crate) fn bind(
    local: IpAddr,
    port: u16,
    source_ports: (u16, u16),
    buffer_bytes: usize,
) -> Result<UnderlaySockets, BindError> {
    let open = |port: u16, force: libc::c_int| {
        let addr = SocketAddr::new(local, port);
        new_socket(addr)
            .and_then(|s| set_buffer(&s, force, buffer_bytes).map(|()| s))
            .map_err(|source| BindError { addr, source })
    };
    let rx = open(port, SO_RCVBUFFORCE)?;
    let (first, count) = source_ports;
    let tx = (0..count)
        .map(|i| {
            let s = open(first.wrapping_add(i), SO_SNDBUFFORCE)?;
            // Nothing is sent to these ports; keep their receive queues tiny.
            let _ = s.set_recv_buffer_size(4096);
            Ok(s)
        })
        .collect::<Result<Vec<_>, BindError>>()?;
    Ok(UnderlaySockets { rx, tx })
}
