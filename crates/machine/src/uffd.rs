//! userfaultfd: lets a restore start the guest before its memory is loaded. Missing pages of
//! registered ranges fault into a handler thread (also when KVM touches them on the guest's
//! behalf), which installs their content with [`Uffd::copy`] or [`Uffd::zero`].
//!
//! The ioctls are the `userfaultfd` crate's. Ranges are given as vm-memory `VolatileSlice`s of
//! guest RAM: bounds-checked views of a live mapping, so every address handed to the kernel
//! lies inside guest memory and stays mapped for the call.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Mutex;
use std::time::Duration;

use userfaultfd::{Error as UffdError, Event, UffdBuilder};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

const PAGE: usize = 4096;

/// A userfaultfd with MISSING-mode registrations.
pub struct Uffd {
    uffd: userfaultfd::Uffd,
    /// Registered ranges (start, length), for [`Uffd::unregister_all`].
    ranges: Mutex<Vec<(usize, usize)>>,
}

/// The crate's errors as I/O errors (errno kept where there is one).
fn io_err(e: UffdError) -> io::Error {
    match e {
        UffdError::CopyFailed(errno)
        | UffdError::ZeropageFailed(errno)
        | UffdError::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        UffdError::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn errno(e: &UffdError) -> Option<i32> {
    match e {
        UffdError::CopyFailed(errno)
        | UffdError::ZeropageFailed(errno)
        | UffdError::SystemError(errno) => Some(*errno as i32),
        _ => None,
    }
}

/// Start and length of `range` for the kernel.
fn span<B: BitmapSlice>(range: &VolatileSlice<B>) -> (*mut libc::c_void, usize) {
    (range.ptr_guard_mut().as_ptr().cast(), range.len())
}

impl Uffd {
    /// Opens a non-blocking userfaultfd that also handles faults KVM takes in kernel mode.
    pub fn new() -> io::Result<Uffd> {
        let created = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create();
        let uffd = match created {
            Ok(uffd) => uffd,
            // The crate opens /dev/userfaultfd when it exists and then never falls back to the
            // system call. Where the device is root's only (mode 0600, the default) but this
            // process may use the system call for kernel-mode faults (CAP_SYS_PTRACE, or
            // vm.unprivileged_userfaultfd=1), tern still wants a descriptor.
            Err(UffdError::OpenDevUserfaultfd(e))
                if e.kind() == io::ErrorKind::PermissionDenied =>
            {
                from_syscall()?
            }
            Err(e) => return Err(io_err(e)),
        };
        Ok(Uffd {
            uffd,
            ranges: Mutex::new(Vec::new()),
        })
    }

    /// Makes missing pages of `range` fault into this descriptor.
    pub fn register<B: BitmapSlice>(&self, range: &VolatileSlice<B>) -> io::Result<()> {
        let (start, len) = span(range);
        self.uffd.register(start, len).map_err(io_err)?;
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((start as usize, len));
        Ok(())
    }

    /// Removes every registration: from now on missing pages are simply zero.
    pub fn unregister_all(&self) -> io::Result<()> {
        let ranges = std::mem::take(&mut *self.ranges.lock().unwrap_or_else(|p| p.into_inner()));
        for (start, len) in ranges {
            self.uffd
                .unregister(start as *mut libc::c_void, len)
                .map_err(io_err)?;
        }
        Ok(())
    }

    /// Installs `src` in `dst` (page-aligned, as long as `src`), page by page unless already
    /// there, waking threads waiting on `dst`.
    pub fn copy<B: BitmapSlice>(&self, dst: &VolatileSlice<B>, src: &[u8]) -> io::Result<()> {
        if src.len() != dst.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "userfaultfd copy of a slice into a range of another size",
            ));
        }
        let (start, len) = span(dst);
        let mut done = 0usize;
        while done < len {
            // SAFETY: `src[done..]` is readable for `len - done` bytes; `start + done ..
            // start + len` lies inside the mapping `dst` views (bounds-checked when the
            // VolatileSlice was made, and kept mapped by its borrow for this call). The kernel
            // only fills pages that are missing, atomically; it never touches present ones.
            let copied = unsafe {
                self.uffd.copy(
                    src[done..].as_ptr().cast(),
                    start.cast::<u8>().add(done).cast(),
                    len - done,
                    true,
                )
            };
            match copied {
                Ok(_) => done = len,
                // Part was copied, then a present page (or the address space changed): go on
                // from there.
                Err(UffdError::PartiallyCopied(n)) => done += n,
                // A present page first: skip it.
                Err(e) if errno(&e) == Some(libc::EEXIST) => done += PAGE,
                Err(e) => return Err(io_err(e)),
            }
        }
        self.wake(dst)
    }

    /// Installs zero pages in `dst` unless already present.
    pub fn zero<B: BitmapSlice>(&self, dst: &VolatileSlice<B>) -> io::Result<()> {
        let (start, len) = span(dst);
        // SAFETY: `start..start + len` lies inside the mapping `dst` views, kept mapped by its
        // borrow; the kernel maps the zero page only where a page is missing.
        match unsafe { self.uffd.zeropage(start, len, true) } {
            Ok(_) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(io_err(e)),
        }
        self.wake(dst)
    }

    /// Wakes threads waiting on `range`.
    pub fn wake<B: BitmapSlice>(&self, range: &VolatileSlice<B>) -> io::Result<()> {
        let (start, len) = span(range);
        self.uffd.wake(start, len).map_err(io_err)
    }

    /// Waits up to `timeout` for an event to read.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one descriptor we own, through a pollfd that lives for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        match ready {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(pfd.revents & libc::POLLIN != 0),
        }
    }

    /// Reads the next pending page fault without blocking; returns the host address of the
    /// faulting page (to look up in guest RAM, never to dereference), or `None` when nothing
    /// is pending or the event is not a page fault.
    pub fn next_fault(&self) -> io::Result<Option<usize>> {
        match self.uffd.read_event().map_err(io_err)? {
            Some(Event::Pagefault { addr, .. }) => Ok(Some(addr as usize & !(PAGE - 1))),
            _ => Ok(None),
        }
    }
}

impl std::os::fd::AsRawFd for Uffd {
    /// The descriptor, to poll for faults together with other descriptors.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }
}

/// A userfaultfd from the system call, for kernel-mode faults too, with the API handshake the
/// crate does not offer on a descriptor it did not open (the one hand-written ioctl here).
fn from_syscall() -> io::Result<userfaultfd::Uffd> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns; the Uffd closes it.
    let uffd = unsafe { userfaultfd::Uffd::from_raw_fd(fd as i32) };
    let mut api = userfaultfd_sys::uffdio_api {
        api: userfaultfd_sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, alive for the call.
    let rc = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            userfaultfd_sys::UFFDIO_API as _,
            &mut api as *mut userfaultfd_sys::uffdio_api,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uffd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    /// Registers guest RAM, faults a page from another thread, and serves it.
    #[test]
    fn missing_pages_fault_and_are_served() {
        let ram = GuestRam::new_memfd(2).unwrap();
        let Ok(uffd) = Uffd::new() else {
            eprintln!("userfaultfd unavailable: skipped");
            return;
        };
        let region = ram.memory().find_region(GuestAddress(0)).unwrap();
        let whole = region.as_volatile_slice().unwrap();
        uffd.register(&whole).unwrap();
        let page3 = whole.subslice(3 * PAGE, PAGE).unwrap();
        let host3 = page3.ptr_guard().as_ptr() as usize;
        let memory = ram.memory().clone();
        let reader = std::thread::spawn(move || {
            use vm_memory::Bytes;
            let v: u64 = memory.read_obj(GuestAddress(3 * PAGE as u64 + 8)).unwrap();
            v
        });
        let mut served = false;
        for _ in 0..100 {
            if !uffd.wait(Duration::from_millis(50)).unwrap() {
                continue;
            }
            if let Some(addr) = uffd.next_fault().unwrap() {
                assert_eq!(addr, host3);
                let mut data = vec![0u8; PAGE];
                data[8..16].copy_from_slice(&0x1234_5678u64.to_le_bytes());
                uffd.copy(&page3, &data).unwrap();
                // A second copy finds the page present and skips it.
                uffd.copy(&page3, &vec![0xffu8; PAGE]).unwrap();
                served = true;
                break;
            }
        }
        assert!(served, "no fault arrived");
        assert_eq!(reader.join().unwrap(), 0x1234_5678);
        // Zero pages install, and a wrong-sized copy is refused.
        let page5 = whole.subslice(5 * PAGE, PAGE).unwrap();
        uffd.zero(&page5).unwrap();
        assert!(uffd.copy(&page5, &[0u8; 10]).is_err());
        uffd.unregister_all().unwrap();
    }

    /// The fallback descriptor (system call plus the hand-written handshake) works as well.
    #[test]
    fn the_system_call_descriptor_works() {
        let Ok(raw) = from_syscall() else {
            eprintln!("userfaultfd system call unavailable: skipped");
            return;
        };
        let uffd = Uffd {
            uffd: raw,
            ranges: Mutex::new(Vec::new()),
        };
        let ram = GuestRam::new_memfd(1).unwrap();
        let region = ram.memory().find_region(GuestAddress(0)).unwrap();
        let whole = region.as_volatile_slice().unwrap();
        uffd.register(&whole).unwrap();
        let page = whole.subslice(PAGE, PAGE).unwrap();
        uffd.copy(&page, &[7u8; PAGE]).unwrap();
        uffd.unregister_all().unwrap();
        let mut byte = [0u8; 1];
        page.copy_to(&mut byte[..]);
        assert_eq!(byte[0], 7);
    }
}
