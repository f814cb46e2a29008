//! Starting a guest process in namespaces of its own: a PID namespace (it is its own init
//! there, and its `/proc` shows no other process), a mount namespace (what it mounts stays
//! its own, and the host's later mounts need not show: it opens no path chosen after it
//! started — a checkpoint is opened by the daemon and handed over) and an IPC namespace —
//! and, before it executes anything, in its own session and control group.
//!
//! `std::process::Command` cannot create a PID namespace for the program itself (`unshare`
//! only moves later children), so the child is made with `clone(2)` and these flags. Between
//! `clone` and `execve` the child only makes system calls on data prepared beforehand: the
//! parent has other threads, whose locks the child must not touch.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What to start and how.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: &'a [OsString],
    /// Becomes the child's stderr.
    pub stderr: &'a File,
    /// A descriptor the child gets under a given number.
    pub pass: Option<(RawFd, RawFd)>,
    /// `cgroup.procs` files the child writes `0` to.
    pub cgroup_procs: &'a [RawFd],
    /// New PID, mount and IPC namespaces.
    pub namespaces: bool,
}

/// A started child: its PID (in this daemon's namespace) and the read end of its stdout.
pub struct Child {
    pub pid: u32,
    pub stdout: File,
}

impl Child {
    /// Waits for the child to end; its wait status.
    pub fn wait(&self) -> io::Result<i32> {
        wait_pid(self.pid)
    }

    /// Kills the child (it is not waited for).
    pub fn kill(&self) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
        }
    }
}

/// Waits for process `pid` (a child of this process) to end; its wait status.
pub fn wait_pid(pid: u32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        if r >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"))
}

/// Starts `spec.program` with `spec.args`, stdin on `/dev/null`, stdout on a pipe.
pub fn spawn(spec: &Spawn) -> io::Result<Child> {
    let program = c_string(spec.program.as_os_str())?;
    let mut argv_owned = vec![program.clone()];
    for a in spec.args {
        argv_owned.push(c_string(a)?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_owned: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            c_string(&kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let null = File::open("/dev/null")?;
    let (stdout_read, stdout_write) = pipe()?;

    let mut flags = libc::SIGCHLD as libc::c_ulong;
    if spec.namespaces {
        flags |= (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC) as libc::c_ulong;
    }
    let fds = ChildFds {
        stdin: null.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: spec.stderr.as_raw_fd(),
        pass: spec.pass,
    };
    // SAFETY: clone without a new stack behaves like fork: the child continues here on a copy
    // of this stack, and only runs `child_main`, which makes raw system calls on the data
    // prepared above and then executes the program or exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            child_main(
                &fds,
                spec.cgroup_procs,
                spec.namespaces,
                &program,
                &argv,
                &envp,
            )
        },
        pid => {
            drop(stdout_write);
            Ok(Child {
                pid: pid as u32,
                stdout: File::from(stdout_read),
            })
        }
    }
}

struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    pass: Option<(RawFd, RawFd)>,
}

/// The child between `clone` and `execve`: only async-signal-safe calls.
unsafe fn child_main(
    fds: &ChildFds,
    cgroup_procs: &[RawFd],
    namespaces: bool,
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let fail = |step: u8| -> ! {
        // The parent sees the child end before it reports; the step shows in the status.
        libc::_exit(120 + i32::from(step))
    };
    // Its own session: signals for the daemon's terminal or group never reach guests.
    if libc::setsid() < 0 {
        fail(0);
    }
    if crate::cgroup::Joiner::join(cgroup_procs).is_err() {
        fail(1);
    }
    // Nothing mounted in the new namespace propagates back to the host's.
    let slave = libc::MS_SLAVE | libc::MS_REC;
    let root = c"/".as_ptr();
    if namespaces
        && libc::mount(
            c"".as_ptr(),
            root,
            std::ptr::null(),
            slave,
            std::ptr::null(),
        ) != 0
    {
        fail(2);
    }
    // A /proc of its own PID namespace, which shows no other process.
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if namespaces
        && libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            proc_flags,
            std::ptr::null(),
        ) != 0
    {
        fail(3);
    }
    for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
        if libc::dup2(from, to) < 0 {
            fail(4);
        }
    }
    if let Some((fd, number)) = fds.pass {
        // dup2 clears close-on-exec on the copy; a descriptor that already has the number
        // keeps its flag, so clear it by hand.
        let r = if fd == number {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, number)
        };
        if r < 0 {
            fail(5);
        }
    }
    libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(6)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_child_runs_with_its_stdout_piped_back() {
        let stderr = File::create("/dev/null").unwrap();
        let child = spawn(&Spawn {
            program: Path::new("/bin/echo"),
            args: &["hello".into()],
            stderr: &stderr,
            pass: None,
            cgroup_procs: &[],
            namespaces: false,
        })
        .unwrap();
        let mut out = String::new();
        let mut stdout = child.stdout.try_clone().unwrap();
        stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello\n");
        let status = child.wait().unwrap();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
