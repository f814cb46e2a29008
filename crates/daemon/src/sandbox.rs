//! How this daemon contains its guest processes (`[sandbox]`): the limits each gets from its
//! guest's config, its control group's life, and why the sandbox killed one.
//!
//! What a guest process's threads may do is the process's own business (`tern_sandbox`, armed
//! in `tern vmm`); the daemon decides the limits, since a process cannot be trusted to limit
//! itself.

use anyhow::{bail, Context};
use tern_config::{DomainConfig, SandboxConfig};
use tern_sandbox::cgroup::{Cgroup, Limits};
use tern_vmm::record::DomainDir;

/// Checks at start-up that the sandbox asked for can be had, and warns of what is relaxed.
pub fn check(config: &SandboxConfig) -> anyhow::Result<()> {
    for relaxed in config.relaxed() {
        log::warn!("sandbox relaxed: {relaxed}");
    }
    if config.cgroups && !Cgroup::available() {
        bail!(
            "this host has no memory, cpu and pids cgroup controllers to limit guests with; \
             set cgroups = false under [sandbox] to run guests without limits"
        );
    }
    Ok(())
}

/// What a guest process may use: its guest's RAM and one CPU per vCPU, plus the overheads.
pub fn limits(guest: &DomainConfig, config: &SandboxConfig) -> Limits {
    Limits {
        memory_bytes: (guest.memory_mib + config.memory_overhead_mib) << 20,
        cpu_percent: u64::from(guest.vcpus) * 100 + config.cpu_overhead_percent,
        tasks: config.tasks,
    }
}

/// Creates the control group the next process of the domain in `dir` will join, and records
/// it in the domain directory (so that it is removed once that process ended, also by a
/// daemon that adopted it). `None` when cgroups are off.
pub fn create_cgroup(
    dir: &DomainDir,
    guest: &DomainConfig,
    config: &SandboxConfig,
) -> anyhow::Result<Option<Cgroup>> {
    if !config.cgroups {
        return Ok(None);
    }
    remove_cgroup(dir);
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{}.{}", guest.name, &unique[..12]);
    let cgroup = Cgroup::create(&name, &limits(guest, config))
        .with_context(|| format!("cannot limit guest '{}'", guest.name))?;
    let listed: String = cgroup
        .dirs()
        .iter()
        .map(|d| format!("{}\n", d.display()))
        .collect();
    if let Err(e) = std::fs::write(dir.cgroup_file(), listed) {
        cgroup.remove();
        return Err(e).context("cannot record the guest's control group");
    }
    Ok(Some(cgroup))
}

/// The control group recorded for the domain in `dir`, if any. The guest process can write
/// in its directory: only paths that can be a tern guest's group are taken.
pub fn recorded_cgroup(dir: &DomainDir) -> Option<Cgroup> {
    let text = std::fs::read_to_string(dir.cgroup_file()).ok()?;
    let dirs: Vec<_> = text
        .lines()
        .map(std::path::Path::new)
        .filter(|p| is_guest_group(p))
        .map(std::path::Path::to_path_buf)
        .collect();
    (!dirs.is_empty()).then(|| Cgroup::from_dirs(dirs))
}

fn is_guest_group(path: &std::path::Path) -> bool {
    use std::path::Component;
    path.starts_with("/sys/fs/cgroup")
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.parent().and_then(|p| p.file_name()) == Some("tern".as_ref())
}

/// Removes the control group of a process that ended.
pub fn remove_cgroup(dir: &DomainDir) {
    if let Some(cgroup) = recorded_cgroup(dir) {
        cgroup.remove();
    }
    let _ = std::fs::remove_file(dir.cgroup_file());
}

/// Why the sandbox killed the process of the domain in `dir`, if it did.
pub fn violation(dir: &DomainDir) -> Option<String> {
    tern_sandbox::violation::read_report(&dir.violation_file())
        .map(|report| format!("killed by its sandbox: {report}"))
}
