//! ioctl numbers, `struct ifreq`, and the control socket interface ioctls go through.
//!
//! The numbers are the kernel's stable ABI (x86-64 encodings of `_IOW('T', n, int)` and the
//! `SIOC*` constants); defining them here keeps the crate independent of which of them a given
//! `libc` release exports and with which integer type.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::name::{self, IFNAMSIZ};
use crate::NetError;

pub(crate) const TUNSETIFF: u64 = 0x4004_54ca;
pub(crate) const TUNSETOFFLOAD: u64 = 0x4004_54d0;
pub(crate) const TUNGETIFF: u64 = 0x8004_54d2;
pub(crate) const TUNGETVNETHDRSZ: u64 = 0x8004_54d7;
pub(crate) const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

pub(crate) const IFF_TAP: i16 = 0x0002;
pub(crate) const IFF_NO_PI: i16 = 0x1000;
pub(crate) const IFF_VNET_HDR: i16 = 0x4000;

const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCGIFINDEX: u64 = 0x8933;
const SIOCSIFHWADDR: u64 = 0x8924;
/// `ARPHRD_ETHER`: the hardware address family of Ethernet devices.
const ARPHRD_ETHER: libc::sa_family_t = 1;
const SIOCETHTOOL: u64 = 0x8946;
const SIOCBRADDBR: u64 = 0x89a0;
const SIOCBRDELBR: u64 = 0x89a1;
const SIOCBRADDIF: u64 = 0x89a2;

const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ifreq`: a name and a 24-byte union (on 64-bit Linux the union is as large as
/// `struct ifmap`), 40 bytes in all.
#[repr(C)]
pub(crate) struct IfReq {
    pub name: [u8; IFNAMSIZ],
    pub data: IfReqData,
}

#[repr(C)]
pub(crate) union IfReqData {
    pub flags: libc::c_short,
    pub ifindex: libc::c_int,
    pub ptr: *mut libc::c_void,
    pub hwaddr: libc::sockaddr,
    _size: [u8; 24],
}

impl IfReq {
    /// An `ifreq` for `name`, which must already be validated, with a zero union.
    pub(crate) fn new(name: &str) -> IfReq {
        IfReq {
            name: name::to_buf(name),
            data: IfReqData { _size: [0; 24] },
        }
    }
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Runs `ioctl(fd, req, arg)`, returning errno as an `io::Error`.
///
/// # Safety
/// `arg` must be what the kernel expects for `req`, valid for reads and writes.
pub(crate) unsafe fn ioctl<T>(fd: libc::c_int, req: u64, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: forwarded to the caller.
    let rc = unsafe { libc::ioctl(fd, req as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A datagram Unix socket for interface ioctls. The kernel resolves interface names in the
/// network namespace of the thread that created the socket, so one is made per operation on
/// the calling thread.
pub(crate) struct CtlSocket {
    fd: OwnedFd,
}

impl CtlSocket {
    pub(crate) fn new(iface: &str) -> Result<CtlSocket, NetError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::last_os(iface, "socket(AF_UNIX)"));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(CtlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ifreq_ioctl(&self, req: u64, ifr: &mut IfReq) -> io::Result<()> {
        // SAFETY: every request issued through here takes a `struct ifreq`.
        unsafe { ioctl(self.fd.as_raw_fd(), req, ifr as *mut IfReq) }.map(|_| ())
    }

    /// The interface's index, or an error (ENODEV when there is no such interface).
    pub(crate) fn ifindex(&self, name: &str) -> io::Result<libc::c_int> {
        let mut ifr = IfReq::new(name);
        self.ifreq_ioctl(SIOCGIFINDEX, &mut ifr)?;
        // SAFETY: SIOCGIFINDEX filled in the ifindex member.
        Ok(unsafe { ifr.data.ifindex })
    }

    pub(crate) fn flags(&self, name: &str) -> io::Result<libc::c_short> {
        let mut ifr = IfReq::new(name);
        self.ifreq_ioctl(SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member.
        Ok(unsafe { ifr.data.flags })
    }

    pub(crate) fn set_flags(&self, name: &str, flags: libc::c_short) -> io::Result<()> {
        let mut ifr = IfReq::new(name);
        ifr.data.flags = flags;
        self.ifreq_ioctl(SIOCSIFFLAGS, &mut ifr)
    }

    /// Sets the interface's Ethernet address.
    pub(crate) fn set_mac(&self, name: &str, mac: [u8; 6]) -> io::Result<()> {
        let mut ifr = IfReq::new(name);
        // SAFETY: sockaddr is plain old data; all zero is a valid value.
        let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
        addr.sa_family = ARPHRD_ETHER;
        for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        ifr.data.hwaddr = addr;
        self.ifreq_ioctl(SIOCSIFHWADDR, &mut ifr)
    }

    /// Sets or clears `IFF_UP`.
    pub(crate) fn set_up(&self, name: &str, up: bool) -> io::Result<()> {
        let flags = self.flags(name)?;
        let up_flag = libc::IFF_UP as libc::c_short;
        let new = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        if new == flags {
            return Ok(());
        }
        self.set_flags(name, new)
    }

    /// The name of the driver behind the interface (`"bridge"`, `"tun"`, `"veth"`, …).
    pub(crate) fn driver(&self, name: &str) -> io::Result<String> {
        // SAFETY: EthtoolDrvInfo is plain old data; all zero is a valid value.
        let mut info: EthtoolDrvInfo = unsafe { std::mem::zeroed() };
        info.cmd = ETHTOOL_GDRVINFO;
        let mut ifr = IfReq::new(name);
        ifr.data.ptr = (&mut info as *mut EthtoolDrvInfo).cast();
        self.ifreq_ioctl(SIOCETHTOOL, &mut ifr)?;
        let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
        Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }

    /// Makes interface `ifindex` a port of `bridge`.
    pub(crate) fn add_bridge_port(&self, bridge: &str, ifindex: libc::c_int) -> io::Result<()> {
        let mut ifr = IfReq::new(bridge);
        ifr.data.ifindex = ifindex;
        self.ifreq_ioctl(SIOCBRADDIF, &mut ifr)
    }

    /// Creates (`add`) or deletes a bridge; the argument is the NUL-terminated name.
    pub(crate) fn bridge_ctl(&self, name: &str, add: bool) -> io::Result<()> {
        let mut buf = name::to_buf(name);
        let req = if add { SIOCBRADDBR } else { SIOCBRDELBR };
        // SAFETY: SIOCBRADDBR/SIOCBRDELBR take a pointer to a NUL-terminated name of at most
        // IFNAMSIZ bytes; `buf` is that (validated names are at most 15 bytes).
        unsafe { ioctl(self.fd.as_raw_fd(), req, buf.as_mut_ptr()) }.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<EthtoolDrvInfo>(), 196);
    }

    #[test]
    fn ioctl_numbers_match_their_encodings() {
        // _IOW(type, nr, int) = (1 << 30) | (size << 16) | (type << 8) | nr
        let iow = |nr: u64| (1u64 << 30) | (4 << 16) | ((b'T' as u64) << 8) | nr;
        let ior = |nr: u64| (2u64 << 30) | (4 << 16) | ((b'T' as u64) << 8) | nr;
        assert_eq!(TUNSETIFF, iow(202));
        assert_eq!(TUNSETOFFLOAD, iow(208));
        assert_eq!(TUNGETIFF, ior(210));
        assert_eq!(TUNGETVNETHDRSZ, ior(215));
        assert_eq!(TUNSETVNETHDRSZ, iow(216));
        assert_eq!(IFF_TAP as i32, libc::IFF_TAP);
        assert_eq!(IFF_NO_PI as i32, libc::IFF_NO_PI);
        assert_eq!(IFF_VNET_HDR as i32, libc::IFF_VNET_HDR);
    }
}
