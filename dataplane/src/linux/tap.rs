//! TAP devices, created and opened with the tun driver's ioctls (no `tun-tap` crate: see
//! DESIGN.md). A TAP made here is not persistent: it disappears when the last fd closes,
//! so a crashed agent leaves no TAP behind.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sys;

/// Longest interface name Linux accepts (IFNAMSIZ − 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// An open TAP device. Reads and writes whole Ethernet frames, without the tun packet-info
/// header (`IFF_NO_PI`). The fd is non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP `name` (or attaches to an existing, unused, persistent one).
    ///
    /// Fails with `InvalidInput` for a bad name, `PermissionDenied` without CAP_NET_ADMIN,
    /// and `ResourceBusy` (EBUSY) if another process holds the device.
    pub fn create(name: &str) -> io::Result<Tap> {
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
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is, for the call's duration.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel NUL-terminates ifr_name (IFNAMSIZ bytes, name ≤ 15).
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
        Ok(Tap { fd, name: actual })
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

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
