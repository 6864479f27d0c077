//! TAP devices, created and opened with the tun driver's ioctls (no `tun-tap` crate: see
//! DESIGN.md). A TAP made here is not persistent: it disappears when the last fd closes,
//! so a crashed agent leaves no TAP behind.

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sys;

/// Longest interface name Linux accepts (IFNAMSIZ − 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// The offloads a TAP was opened with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// Every frame read or written carries a virtio-net header (`IFF_VNET_HDR`), and the
    /// kernel hands over checksum-partial frames and TCP super-frames (`TUN_F_CSUM|TSO4|TSO6`).
    pub vnet_hdr: bool,
    /// The kernel also hands over, and accepts, UDP super-frames (`TUN_F_USO4|USO6`, Linux 6.2+).
    pub uso: bool,
}

/// An open TAP device. Reads and writes whole Ethernet frames, without the tun packet-info
/// header (`IFF_NO_PI`), behind a virtio-net header if opened with offloads. The fd is
/// non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    offloads: TapOffloads,
}

impl Tap {
    /// Creates the TAP `name` (or attaches to an existing, unused, persistent one), with
    /// offloads if `offload` (TSO always when offloading; USO where the kernel has it).
    ///
    /// Fails with `InvalidInput` for a bad name, `PermissionDenied` without CAP_NET_ADMIN,
    /// and `ResourceBusy` (EBUSY) if another process holds the device.
    pub fn create(name: &str, offload: bool) -> io::Result<Tap> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(['/', ' ', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid interface name (1 to {MAX_NAME_LEN} characters, no '/' or spaces)"),
            ));
        }
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string; a non-negative return is an fd we own.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e} (is the tun module loaded?)")));
        }
        // SAFETY: `raw` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: ifreq is a plain C struct; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let vnet = if offload { libc::IFF_VNET_HDR } else { 0 };
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | vnet) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is, for the call's duration.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel NUL-terminates ifr_name (IFNAMSIZ bytes, name ≤ 15).
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
        let mut offloads = TapOffloads::default();
        if offload {
            let hdr_len = crate::offload::VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which is live.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw const hdr_len) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
            // Unknown bits make the kernel refuse (EINVAL), which is how USO is probed.
            if set_offload(&fd, tso | uso).is_ok() {
                offloads = TapOffloads { vnet_hdr: true, uso: true };
            } else {
                set_offload(&fd, tso)?;
                offloads = TapOffloads { vnet_hdr: true, uso: false };
            }
        }
        Ok(Tap { fd, name: actual, offloads })
    }

    /// The offloads it was opened with.
    pub fn offloads(&self) -> TapOffloads {
        self.offloads
    }

    /// Writes one frame from several pieces (virtio-net header first, if offloading).
    #[inline]
    pub fn writev(&self, pieces: &[IoSlice<'_>]) -> io::Result<usize> {
        sys::writev(self.fd.as_raw_fd(), pieces)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.fd.as_raw_fd(), buf)
    }

    /// Writes one frame.
    #[inline]
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        sys::write(self.fd.as_raw_fd(), frame)
    }
}

fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
