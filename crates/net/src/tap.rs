//! TAP devices carrying virtio-net frames.

use std::ffi::CStr;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::name::{self, validate_ifname};
use crate::sys::{self, CtlSocket, IfReq};
use crate::NetError;

/// Size of the `virtio_net_hdr_v1` (the header with `num_buffers`) that prefixes every frame
/// read from or written to a [`Tap`].
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &CStr = c"/dev/net/tun";

/// A TAP device owned by this process: one guest NIC's end on the host.
///
/// The device is not persistent: it exists while a descriptor for it is open (this one, or a
/// [`Tap::try_clone`] of it) and the kernel removes it, and its bridge port, when the last one
/// closes, whether the process exits or is killed. Every [`read`](Tap::read) returns one frame
/// and every [`write`](Tap::write) sends one, each starting with a [`VNET_HDR_LEN`]-byte
/// virtio-net header in the guest's (little-endian, x86) byte order. No offloads are enabled,
/// so frames from the host carry no GSO and need no checksum completion, and frames written
/// must be complete (header flags 0, `gso_type` NONE).
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// The host end of every TAP carries this address. A Linux bridge without an address of its
/// own takes the lowest of its ports' addresses; a random TAP address could become the
/// bridge's, and change again when the guest leaves (a migration), leaving the host's
/// neighbours with a stale ARP entry. The highest unicast, locally administered address is
/// never the lowest (the convention Xen's vif devices follow).
pub const HOST_SIDE_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];

impl Tap {
    /// Creates TAP `name` in the calling thread's network namespace and sets it up.
    ///
    /// Fails if `name` is not a valid interface name, if an interface of that name already
    /// exists (tern never adopts somebody else's device, persistent TAPs included), or if the
    /// kernel refuses (no `/dev/net/tun`, no `CAP_NET_ADMIN`).
    pub fn create(name: &str) -> io::Result<Tap> {
        validate_ifname(name)?;
        let sock = CtlSocket::new(name)?;
        if sock.ifindex(name).is_ok() {
            return Err(NetError::AlreadyExists {
                iface: name.to_string(),
            }
            .into());
        }

        // SAFETY: open(2) on a constant NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(TUN_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(NetError::last_os(name, "open /dev/net/tun").into());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut ifr = IfReq::new(name);
        ifr.data.flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        // SAFETY: TUNSETIFF takes a struct ifreq.
        unsafe { sys::ioctl(fd.as_raw_fd(), sys::TUNSETIFF, &mut ifr as *mut IfReq) }
            .map_err(|e| NetError::os(name, "TUNSETIFF", e))?;
        let got = name::from_buf(&ifr.name);
        if got != name {
            return Err(NetError::os(
                name,
                "TUNSETIFF",
                io::Error::other(format!("the kernel named the device {got:?}")),
            )
            .into());
        }

        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
        unsafe { sys::ioctl(fd.as_raw_fd(), sys::TUNSETVNETHDRSZ, &mut hdr_len) }
            .map_err(|e| NetError::os(name, "TUNSETVNETHDRSZ", e))?;
        // TUNSETOFFLOAD takes the flags as the argument itself, not a pointer.
        // SAFETY: with a zero argument the kernel dereferences nothing.
        unsafe {
            sys::ioctl::<libc::c_void>(fd.as_raw_fd(), sys::TUNSETOFFLOAD, std::ptr::null_mut())
        }
        .map_err(|e| NetError::os(name, "TUNSETOFFLOAD", e))?;

        sock.set_mac(name, HOST_SIDE_MAC)
            .map_err(|e| NetError::os(name, "set address (SIOCSIFHWADDR)", e))?;
        sock.set_up(name, true)
            .map_err(|e| NetError::os(name, "set up (SIOCSIFFLAGS)", e))?;
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index in its network namespace.
    pub fn ifindex(&self) -> io::Result<u32> {
        let sock = CtlSocket::new(&self.name)?;
        let idx = sock
            .ifindex(&self.name)
            .map_err(|e| NetError::os(&self.name, "SIOCGIFINDEX", e))?;
        Ok(idx as u32)
    }

    /// Whether the interface is administratively up.
    pub fn is_up(&self) -> io::Result<bool> {
        let sock = CtlSocket::new(&self.name)?;
        let flags = sock
            .flags(&self.name)
            .map_err(|e| NetError::os(&self.name, "SIOCGIFFLAGS", e))?;
        Ok(flags & libc::IFF_UP as libc::c_short != 0)
    }

    /// The virtio-net header size the kernel uses on this descriptor (always
    /// [`VNET_HDR_LEN`]; exposed so that tests and sanity checks can see it).
    pub fn vnet_hdr_len(&self) -> io::Result<usize> {
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes an int.
        unsafe { sys::ioctl(self.fd.as_raw_fd(), sys::TUNGETVNETHDRSZ, &mut len) }
            .map_err(|e| NetError::os(&self.name, "TUNGETVNETHDRSZ", e))?;
        Ok(len as usize)
    }

    /// The `IFF_*` flags the descriptor was attached with (`TUNGETIFF`).
    pub fn tun_flags(&self) -> io::Result<u16> {
        let mut ifr = IfReq::new("");
        // SAFETY: TUNGETIFF fills in a struct ifreq.
        unsafe { sys::ioctl(self.fd.as_raw_fd(), sys::TUNGETIFF, &mut ifr as *mut IfReq) }
            .map_err(|e| NetError::os(&self.name, "TUNGETIFF", e))?;
        // SAFETY: TUNGETIFF filled in the flags member.
        Ok(unsafe { ifr.data.flags } as u16)
    }

    /// Makes reads (and writes) return `WouldBlock` instead of waiting, for an event loop.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(NetError::last_os(&self.name, "fcntl(F_GETFL)").into());
        }
        let new = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
            return Err(NetError::last_os(&self.name, "fcntl(F_SETFL)").into());
        }
        Ok(())
    }

    /// A second descriptor for the same device (it keeps the device alive too).
    pub fn try_clone(&self) -> io::Result<Tap> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| NetError::os(&self.name, "dup", e))?;
        Ok(Tap {
            fd,
            name: self.name.clone(),
        })
    }

    /// Reads one frame, virtio-net header first, into `buf`; returns its length. A frame
    /// longer than `buf` is truncated, so give it room for the header and the MTU (65550 bytes
    /// covers any MTU).
    ///
    /// The kernel fills in the first 10 header bytes (`virtio_net_hdr`) and skips the last two
    /// (`num_buffers`), leaving whatever `buf` held there: the device sets that field itself.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if let Some(n) = self.check(n, "read")? {
                return Ok(n);
            }
        }
    }

    /// Reads one frame scattered over `bufs` (a virtio descriptor chain); the header is filled
    /// in as by [`read`](Tap::read).
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let cnt = bufs.len().min(libc::c_int::MAX as usize) as libc::c_int;
        loop {
            // SAFETY: IoSliceMut is ABI-compatible with struct iovec; each is valid for writes.
            let n = unsafe { libc::readv(self.fd.as_raw_fd(), bufs.as_ptr().cast(), cnt) };
            if let Some(n) = self.check(n, "readv")? {
                return Ok(n);
            }
        }
    }

    /// Sends one frame, virtio-net header first.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: frame is valid for reads of frame.len() bytes.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if let Some(n) = self.check(n, "write")? {
                return self.whole(n, frame.len());
            }
        }
    }

    /// Sends one frame gathered from `bufs` (header first).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let cnt = bufs.len().min(libc::c_int::MAX as usize) as libc::c_int;
        let total = bufs.iter().map(|b| b.len()).sum();
        loop {
            // SAFETY: IoSlice is ABI-compatible with struct iovec; each is valid for reads.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast(), cnt) };
            if let Some(n) = self.check(n, "writev")? {
                return self.whole(n, total);
            }
        }
    }

    /// Sends one Ethernet frame (no header) with an all-zero virtio-net header in front: no
    /// checksum to complete, no segmentation. For frames the host makes up (announcements).
    pub fn write_frame(&self, ethernet: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        self.write_vectored(&[IoSlice::new(&hdr), IoSlice::new(ethernet)])
            .map(|_| ())
    }

    /// Makes this TAP a port of `bridge` (in the calling thread's network namespace).
    pub fn attach_to_bridge(&self, bridge: &str) -> io::Result<()> {
        crate::bridge::add_port(bridge, &self.name)
    }

    /// `Ok(Some(n))` for a completed call, `Ok(None)` to retry after EINTR.
    fn check(&self, n: isize, op: &'static str) -> io::Result<Option<usize>> {
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => Ok(None),
            // An event loop expects a bare WouldBlock, as from any other non-blocking fd.
            io::ErrorKind::WouldBlock => Err(err),
            _ => Err(NetError::os(&self.name, op, err).into()),
        }
    }

    fn whole(&self, n: usize, len: usize) -> io::Result<usize> {
        if n == len {
            Ok(n)
        } else {
            Err(NetError::os(
                &self.name,
                "write",
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {len} bytes"),
                ),
            )
            .into())
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}
