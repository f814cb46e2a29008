//! A guest process's own control group, with its memory, CPU and task limits: under
//! `<controller>/tern/<name>` for each controller of a cgroup v1 hierarchy, or `tern/<name>`
//! of a unified (v2) one whose root offers the controllers.
//!
//! The daemon creates the group before the process starts, and the new process joins it
//! before it executes anything (writing `0` to `cgroup.procs`), so that every page and thread
//! it ever has is counted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::SandboxError;

const ROOT: &str = "/sys/fs/cgroup";
/// The directory under each hierarchy that holds the groups of tern's guest processes.
const PARENT: &str = "tern";
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Limits of one guest process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory, page cache and kernel memory charged to it, in bytes.
    pub memory_bytes: u64,
    /// CPU time per period, in hundredths of a CPU (200: two CPUs).
    pub cpu_percent: u64,
    /// Tasks: the process and its threads.
    pub tasks: u64,
}

/// How the host's control groups are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// One hierarchy per controller (`/sys/fs/cgroup/memory`, …).
    V1,
    /// The unified hierarchy, with the controllers enabled at its root.
    V2,
}

fn layout() -> Option<Layout> {
    let unified = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"));
    if let Ok(controllers) = unified {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("cpu") && has("pids") {
            return Some(Layout::V2);
        }
    }
    V1_CONTROLLERS
        .iter()
        .all(|c| Path::new(ROOT).join(c).join("cgroup.procs").exists())
        .then_some(Layout::V1)
}

/// A guest process's group: one directory per hierarchy it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

fn cgroup_err(what: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Cgroup { what, source }
}

fn write_value(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(cgroup_err(format!(
        "cannot write {value:?} to {}",
        path.display()
    )))
}

fn make_dir(dir: &Path) -> Result<(), SandboxError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(cgroup_err(format!("cannot create {}", dir.display()))(e))
        }
        _ => Ok(()),
    }
}

impl Cgroup {
    /// Whether this host has the controllers tern limits guests with.
    pub fn available() -> bool {
        layout().is_some()
    }

    /// Creates the group `name` (unique on this host) with `limits`.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, SandboxError> {
        let Some(layout) = layout() else {
            return Err(SandboxError::Cgroup {
                what: format!("no memory, cpu and pids controllers under {ROOT}"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        };
        let cgroup = match layout {
            Layout::V1 => Cgroup {
                dirs: V1_CONTROLLERS
                    .iter()
                    .map(|c| Path::new(ROOT).join(c).join(PARENT).join(name))
                    .collect(),
            },
            Layout::V2 => Cgroup {
                dirs: vec![Path::new(ROOT).join(PARENT).join(name)],
            },
        };
        let made = cgroup.make(layout, limits);
        if made.is_err() {
            cgroup.remove();
        }
        made.map(|()| cgroup)
    }

    fn make(&self, layout: Layout, limits: &Limits) -> Result<(), SandboxError> {
        const PERIOD_US: u64 = 100_000;
        let quota_us = (PERIOD_US * limits.cpu_percent / 100).max(1000);
        for dir in &self.dirs {
            if let Some(parent) = dir.parent() {
                make_dir(parent)?;
                if layout == Layout::V2 {
                    write_value(
                        Path::new(ROOT),
                        "cgroup.subtree_control",
                        "+memory +cpu +pids",
                    )?;
                    write_value(parent, "cgroup.subtree_control", "+memory +cpu +pids")?;
                }
            }
            make_dir(dir)?;
        }
        match layout {
            Layout::V1 => {
                for (dir, controller) in self.dirs.iter().zip(V1_CONTROLLERS) {
                    match controller {
                        "memory" => write_value(
                            dir,
                            "memory.limit_in_bytes",
                            &limits.memory_bytes.to_string(),
                        )?,
                        "cpu" => {
                            write_value(dir, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
                            write_value(dir, "cpu.cfs_quota_us", &quota_us.to_string())?;
                        }
                        _ => write_value(dir, "pids.max", &limits.tasks.to_string())?,
                    }
                }
            }
            Layout::V2 => {
                let dir = &self.dirs[0];
                write_value(dir, "memory.max", &limits.memory_bytes.to_string())?;
                write_value(dir, "cpu.max", &format!("{quota_us} {PERIOD_US}"))?;
                write_value(dir, "pids.max", &limits.tasks.to_string())?;
            }
        }
        Ok(())
    }

    /// The group's directories (recorded by the daemon, to remove them when the process ended).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The group made of `dirs`, as recorded.
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Cgroup {
        Cgroup { dirs }
    }

    /// Opens the files through which a process joins the group, for [`Joiner::join`] in a
    /// process about to start.
    pub fn joiner(&self) -> Result<Joiner, SandboxError> {
        let files = self
            .dirs
            .iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(cgroup_err(format!("cannot open {}", path.display())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Joiner { files })
    }

    /// Removes the group. A process that just ended may still be leaving it (one the daemon
    /// adopted is not its child to wait for): a busy group is tried again for up to two
    /// seconds. Failures are logged: a leftover empty group costs nothing.
    pub fn remove(&self) {
        for dir in &self.dirs {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        log::warn!("cannot remove {}: {e}", dir.display());
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// The value of `file` in the group's directory that has it (for tests and status).
    pub fn read(&self, file: &str) -> Option<String> {
        self.dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|s| s.trim().to_string())
    }
}

/// Open `cgroup.procs` files of a group: a process just forked joins it with [`Joiner::join`]
/// before it executes anything.
pub struct Joiner {
    files: Vec<File>,
}

impl Joiner {
    /// Raw descriptors, for use between `fork` and `exec` where nothing may allocate.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Moves the calling process into the group. Async-signal-safe: only `write`.
    pub fn join(fds: &[RawFd]) -> std::io::Result<()> {
        for &fd in fds {
            // SAFETY: writing two bytes from a static buffer to an open descriptor.
            let n = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the group (a process adopted after it started).
    pub fn join_pid(&mut self, pid: u32) -> Result<(), SandboxError> {
        for f in &mut self.files {
            f.write_all(pid.to_string().as_bytes())
                .map_err(cgroup_err(format!("cannot move process {pid}")))?;
        }
        Ok(())
    }
}
