//! userfaultfd: lets a restore start the guest before its memory is loaded. Missing pages of
//! registered ranges fault into a handler thread (also when KVM touches them on the guest's
//! behalf), which installs their content with [`Uffd::copy`] or [`Uffd::zero`].

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

// ioctl numbers: _IOWR(0xaa, nr, size).
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = (2 << 30) | (16 << 16) | (0xaa << 8) | 0x01; // _IOR
const UFFDIO_WAKE: u64 = (2 << 30) | (16 << 16) | (0xaa << 8) | 0x02; // _IOR
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// A userfaultfd with MISSING-mode registrations.
pub struct Uffd {
    file: File,
    ranges: std::sync::Mutex<Vec<Range>>,
}

fn ioctl<T>(fd: &File, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the structure this request expects, alive for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd that also handles faults KVM takes in kernel mode.
    pub fn new() -> std::io::Result<Uffd> {
        // SAFETY: plain syscall.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = ApiArg {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(&file, UFFDIO_API, &mut api)?;
        Ok(Uffd {
            file,
            ranges: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Makes missing pages of `[start, start + len)` fault into this descriptor.
    pub fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut arg = RegisterArg {
            range: Range { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.file, UFFDIO_REGISTER, &mut arg)?;
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Range { start, len });
        Ok(())
    }

    /// Removes every registration: from now on missing pages are simply zero.
    pub fn unregister_all(&self) -> std::io::Result<()> {
        let ranges = std::mem::take(&mut *self.ranges.lock().unwrap_or_else(|p| p.into_inner()));
        for mut r in ranges {
            ioctl(&self.file, UFFDIO_UNREGISTER, &mut r)?;
        }
        Ok(())
    }

    /// Installs `src` at `dst` (page-aligned) unless already there, waking waiting threads.
    /// Pages that are already present are skipped.
    pub fn copy(&self, dst: u64, src: &[u8]) -> std::io::Result<()> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut arg = CopyArg {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            match ioctl(&self.file, UFFDIO_COPY, &mut arg) {
                Ok(()) => done = len,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Part was copied, then a present page: skip that page.
                    done += arg.copy.max(0) as u64 + 4096;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    done += arg.copy.max(0) as u64;
                }
                Err(e) => return Err(e),
            }
        }
        self.wake(dst, len)
    }

    /// Installs zero pages at `[dst, dst + len)` unless already present.
    pub fn zero(&self, dst: u64, len: u64) -> std::io::Result<()> {
        let mut arg = ZeroArg {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(&self.file, UFFDIO_ZEROPAGE, &mut arg) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        self.wake(dst, len)
    }

    /// Wakes threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = Range { start, len };
        ioctl(&self.file, UFFDIO_WAKE, &mut r)
    }

    /// Reads the next pending page fault (the descriptor is non-blocking: poll it first);
    /// returns its address, or `None` for a non-fault event.
    pub fn next_fault(&self) -> std::io::Result<Option<u64>> {
        let mut msg = [0u8; 32];
        (&self.file).read_exact(&mut msg)?;
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let mut addr = [0u8; 8];
        // uffd_msg: event (1), reserved (7), then pagefault { flags u64, address u64, ... }.
        addr.copy_from_slice(&msg[16..24]);
        Ok(Some(u64::from_le_bytes(addr)))
    }

    /// Raw descriptor, for polling with a timeout.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}
