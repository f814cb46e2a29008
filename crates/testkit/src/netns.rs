//! Running programs and code inside a named network namespace (`ip netns add NAME`, which
//! keeps it at `/run/netns/NAME`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

/// Where `ip netns` keeps namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Whether namespace `name` exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Makes `cmd` run in network namespace `ns`, as `ip netns exec` would: the child joins the
/// namespace and gets a private mount namespace with `/sys` remounted, so that
/// `/sys/class/net` shows the namespace's interfaces. The host's control-group hierarchies
/// are mounted again under the new `/sys` (the same hierarchies: a daemon there limits its
/// guests as on the host). Unlike wrapping the program in
/// `ip netns exec`, everything else set on `cmd` (stdio, environment, directory) is kept and
/// the child's PID is the program's.
pub fn enter_netns(cmd: &mut Command, ns: &str) -> anyhow::Result<()> {
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("no network namespace {ns} ({})", path.display()))?;
    let ns_name = CString::new(ns).context("namespace name with a NUL byte")?;
    let cgroups = cgroup_mounts();
    // SAFETY: the hook only makes system calls on data prepared before the fork (no
    // allocation, no locks), which is what a pre_exec hook may do.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            check(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET))?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Keep our mounts from propagating back to the host.
            check(libc::mount(
                c"".as_ptr(),
                c"/".as_ptr(),
                c"none".as_ptr(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ))?;
            let mut flags = 0;
            if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) != 0 {
                // Cannot unmount it: mount over it, read-only if it was (as `ip` does).
                let mut st: libc::statvfs = std::mem::zeroed();
                if libc::statvfs(c"/sys".as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
                {
                    flags = libc::MS_RDONLY;
                }
            }
            check(libc::mount(
                ns_name.as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                flags,
                std::ptr::null(),
            ))?;
            if !cgroups.is_empty() {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/sys/fs/cgroup".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    c"mode=755".as_ptr().cast(),
                ))?;
            }
            for m in &cgroups {
                libc::mkdir(m.target.as_ptr(), 0o755);
                check(libc::mount(
                    m.fstype.as_ptr(),
                    m.target.as_ptr(),
                    m.fstype.as_ptr(),
                    0,
                    m.options.as_ptr().cast(),
                ))?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// A control-group hierarchy mounted under `/sys/fs/cgroup`.
struct CgroupMount {
    target: CString,
    fstype: CString,
    options: CString,
}

/// The host's control-group hierarchies under `/sys/fs/cgroup`, from `/proc/self/mountinfo`
/// (fields: id, parent, dev, root, mount point, options, optional fields, `-`, type, source,
/// super options).
fn cgroup_mounts() -> Vec<CgroupMount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, target) = (*fields.get(3)?, *fields.get(4)?);
            let mut after = after.split(' ');
            let (fstype, _source, options) = (after.next()?, after.next()?, after.next()?);
            let wanted = root == "/"
                && target.starts_with("/sys/fs/cgroup/")
                && matches!(fstype, "cgroup" | "cgroup2");
            let options: Vec<&str> = options
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro"))
                .collect();
            if !wanted {
                return None;
            }
            Some(CgroupMount {
                target: CString::new(target).ok()?,
                fstype: CString::new(fstype).ok()?,
                options: CString::new(options.join(",")).ok()?,
            })
        })
        .collect()
}

/// Runs `f` on a thread that has joined network namespace `ns`, and returns its result.
/// Sockets `f` creates belong to `ns` for their whole life, whichever thread uses them later,
/// so this is how the test process itself talks to the lab (connects, listens) without a
/// helper program.
pub fn run_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("no network namespace {ns} ({})", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) with CLONE_NEWNET only changes this thread's namespace; the
            // thread ends when f returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("cannot enter network namespace {ns}"));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
