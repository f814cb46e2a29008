//! Containing a guest process: what its threads may ask of the kernel (`seccomp`), how a
//! forbidden call is reported (`violation`), and the resource limits the daemon puts it under
//! (`cgroup`).
//!
//! A guest process arms the filters once it is set up ([`seccomp::arm`]); from then on every
//! thread enters its kind's filter as it starts ([`seccomp::enter`]). Threads inherit the filter
//! of the thread that started them, and filters only ever narrow, so a vCPU started by a
//! control thread can do at most what both allow.

pub mod allowed;
pub mod cgroup;
pub mod process;
pub mod seccomp;
mod syscall_names;
pub mod thread;
pub mod violation;

pub use syscall_names::name as syscall_name;

/// What a thread of a guest process does, and so which system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// Requests from the daemon, saves, migrations in and out, and the helpers they start.
    Control = 1,
    /// Runs a vCPU (`KVM_RUN`) and the device models it calls on an exit.
    Vcpu = 2,
    /// A virtio device's worker: queues, TAP, disk files, NBD.
    Device = 3,
    /// Serves guest pages through userfaultfd (lazy restore, post-copy).
    PageServer = 4,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::PageServer,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
            ThreadKind::PageServer => "page server",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the {kind} system-call filter: {message}")]
    Filter { kind: &'static str, message: String },
    #[error("cannot install the {kind} system-call filter: {message}")]
    Install { kind: &'static str, message: String },
    #[error("cannot catch forbidden system calls: {0}")]
    Handler(std::io::Error),
    #[error("{what}: {source}")]
    Cgroup {
        what: String,
        source: std::io::Error,
    },
}
