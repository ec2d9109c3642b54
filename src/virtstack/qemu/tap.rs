//! Tap devices, opened by uvmctl and handed to QEMU as descriptors: QEMU
//! runs as its service user, which may not open `/dev/net/tun` or make an
//! interface.

use std::os::fd::{AsRawFd, OwnedFd};

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// `struct ifreq`: the name (IFNAMSIZ), then a union the flags start.
const IFREQ_BYTES: usize = 40;
const IFNAMSIZ: usize = 16;

/// Opens the tap device `name` (made if missing, for as long as a
/// descriptor of it is open: QEMU's, once handed over), without packet
/// information and with virtio-net headers, as QEMU's tap backend expects.
///
/// # Errors
/// The OS error: no `/dev/net/tun`, no permission, a name in use by a
/// device that is not a tap, or a name longer than the kernel's 15 bytes.
pub fn open(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a tap name is 1 to 15 bytes",
        ));
    }
    let tun: OwnedFd = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut ifr = [0u8; IFREQ_BYTES];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[IFNAMSIZ..IFNAMSIZ + 2]
        .copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is
    // (40 bytes, the name NUL-terminated by the checks above).
    let r = unsafe { nix::libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_kernel_would_cut_are_refused_before_any_open() {
        assert!(super::open("").is_err());
        assert!(super::open("sixteen-bytes-xx").is_err());
    }
}
