//! Which system calls each kind of thread of a guest process may make: the one table to read
//! and to change when a thread needs something new.
//!
//! Every list was taken from what the threads do in the whole test suite (`[sandbox] seccomp =
//! "log"` and the kernel's audit lines), not from guesses; what is missing from a list kills the
//! guest process and names the call.

use libc::c_long;

use crate::ThreadKind;

/// What every thread does because it is a Rust thread on glibc: memory, locks, signals, time,
/// logging to stderr, and ending.
const RUNTIME: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A vCPU: `KVM_RUN` and the device models it calls on an exit (the UART's console log, the
/// virtio doorbells' eventfds), kicks from other threads.
const VCPU: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // The console log is rotated by whichever thread writes past its limit.
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_fcntl,
    // Activating a device (its driver's register write) makes the worker's eventfds here.
    libc::SYS_eventfd2,
    libc::SYS_tgkill,
];

/// A virtio device worker: its queues' eventfds, the TAP device, a disk file or an NBD
/// connection (which it may have to make again).
const DEVICE: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_tgkill,
];

/// Serving guest pages through userfaultfd (lazy restore, post-copy): the descriptor's events
/// and copies, the checkpoint file or the connection to the source.
const PAGE_SERVER: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
    libc::SYS_fallocate,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_tgkill,
];

/// The control threads — requests from the daemon, saves, migrations in and out, helpers —
/// which also start every other thread, so their list holds everything the others have too.
const CONTROL: &[c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_seccomp,
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_ftruncate,
    libc::SYS_sync_file_range,
    libc::SYS_getdents64,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_accept4,
    libc::SYS_listen,
    libc::SYS_bind,
    libc::SYS_pipe2,
    libc::SYS_socketpair,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_userfaultfd,
    libc::SYS_memfd_create,
    libc::SYS_rt_sigaction,
];

/// The system calls a thread of `kind` may make, apart from `prctl` (see [`PRCTL_OPTIONS`]).
pub fn syscalls(kind: ThreadKind) -> Vec<c_long> {
    let mut list = RUNTIME.to_vec();
    match kind {
        ThreadKind::Vcpu => list.extend_from_slice(VCPU),
        ThreadKind::Device => list.extend_from_slice(DEVICE),
        ThreadKind::PageServer => list.extend_from_slice(PAGE_SERVER),
        // Threads inherit the filter of the thread that started them and add their own:
        // control threads start all the others, so they may do all the others do.
        ThreadKind::Control => {
            for part in [VCPU, DEVICE, PAGE_SERVER, CONTROL] {
                list.extend_from_slice(part);
            }
        }
    }
    list.sort_unstable();
    list.dedup();
    list
}

/// The `prctl` options any thread may use: naming threads (std does it as a thread starts) and
/// `no_new_privs`, which installing a filter sets.
pub const PRCTL_OPTIONS: &[c_long] = &[
    libc::PR_SET_NAME as c_long,
    libc::PR_GET_NAME as c_long,
    libc::PR_SET_NO_NEW_PRIVS as c_long,
    libc::PR_GET_NO_NEW_PRIVS as c_long,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_may_do_what_every_thread_it_starts_does() {
        let control = syscalls(ThreadKind::Control);
        for kind in [ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::PageServer] {
            for nr in syscalls(kind) {
                assert!(
                    control.contains(&nr),
                    "{kind:?} needs {nr} which control lacks"
                );
            }
        }
    }

    #[test]
    fn no_thread_may_start_programs_or_trace() {
        for kind in ThreadKind::ALL {
            let list = syscalls(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_init_module,
                libc::SYS_kexec_load,
            ] {
                assert!(!list.contains(&nr), "{kind:?} may make {nr}");
            }
        }
    }
}
