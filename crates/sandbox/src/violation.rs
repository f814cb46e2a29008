//! A forbidden system call: the kernel stops it with `SIGSYS`; the handler here writes one line
//! naming the thread and the call to the violation report (and the process log on stderr), and
//! ends the process. The daemon reads the report once the process is gone.
//!
//! The handler runs inside the offending thread, under its filter: it only writes to
//! descriptors opened beforehand and ends with `exit_group`, which every filter allows.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::{syscall_name, SandboxError, ThreadKind};

/// The report's descriptor, set once when the process arms its filters.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// How the process ends after a violation: as a shell reports a death by SIGSYS.
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// What the handler needs to know about the thread it runs in, set as the thread enters its
/// filter (const-initialised and without a destructor: safe to read in a signal handler).
struct ThreadLabel {
    kind: Cell<u8>,
    name: Cell<[u8; 16]>,
}

thread_local! {
    static LABEL: ThreadLabel = const {
        ThreadLabel {
            kind: Cell::new(0),
            name: Cell::new([0; 16]),
        }
    };
}

/// Remembers, for the report, which thread this is.
pub(crate) fn name_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    LABEL.with(|l| {
        l.kind.set(kind as u8);
        l.name.set(name);
    });
}

/// Installs the `SIGSYS` handler that reports to `report`.
pub(crate) fn catch(report: File) -> Result<(), SandboxError> {
    REPORT_FD.store(report.into_raw_fd(), Ordering::Release);
    // SAFETY: a zeroed sigaction with a handler address and flags is a valid argument; the
    // handler only does async-signal-safe work.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Where `si_syscall` sits in a `siginfo_t` on x86_64: after signo, errno, code and padding
/// (16 bytes), then `_sigsys { void *_call_addr; int _syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo for SIGSYS; the offset is the x86_64 layout.
    let nr = unsafe { *(info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>() };
    let (kind, mut name) = LABEL.with(|l| (l.kind.get(), l.name.get()));
    if name[0] == 0 {
        // A thread that inherited its filter never named itself here: ask the kernel (the
        // name std gave it), which every filter allows.
        // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    let mut line = Line::default();
    line.push(b"thread ");
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(&name[..name_len]);
    line.push(b" (");
    // Threads started by a filtered thread without entering a filter of their own run under
    // the one they inherited: the control filter, for every such thread tern starts.
    let kind = ThreadKind::from_u8(kind).map_or("inherited control", ThreadKind::label);
    line.push(kind.as_bytes());
    line.push(b") made system call ");
    line.push_number(nr as i64);
    line.push(b" (");
    line.push(syscall_name(nr as i64).as_bytes());
    line.push(b"), which its sandbox forbids\n");
    let fd = REPORT_FD.load(Ordering::Acquire);
    // SAFETY: write and exit_group are async-signal-safe; the buffer lives on this stack.
    unsafe {
        if fd >= 0 {
            libc::write(fd, line.bytes().as_ptr().cast(), line.bytes().len());
        }
        libc::write(2, b"Error: ".as_ptr().cast(), 7);
        libc::write(2, line.bytes().as_ptr().cast(), line.bytes().len());
        libc::syscall(libc::SYS_exit_group, EXIT_CODE);
    }
}

/// A line built without allocating (the handler must not).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report a killed guest process left in `path`, if it left one: its first line.
pub fn read_report(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text[..text.len().min(4096)]);
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_numbers_and_stop_at_their_end() {
        let mut l = Line::default();
        l.push(b"call ");
        l.push_number(59);
        l.push(b" ");
        l.push_number(0);
        assert_eq!(l.bytes(), b"call 59 0");
        for _ in 0..100 {
            l.push(b"xxxx");
        }
        assert_eq!(l.bytes().len(), 192);
    }

    #[test]
    fn a_report_is_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        assert_eq!(read_report(&path), None);
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_report(&path), None);
        std::fs::write(&path, "thread a (vCPU) made\nsecond\n").unwrap();
        assert_eq!(read_report(&path).as_deref(), Some("thread a (vCPU) made"));
    }
}
