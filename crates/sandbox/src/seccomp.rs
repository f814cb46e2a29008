//! System-call filters per thread kind: built once when the guest process arms them, entered
//! by each thread as it starts.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{allowed, violation, SandboxError, ThreadKind};

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnViolation {
    /// The process ends; the call is named in its violation report first.
    Kill,
    /// The call goes ahead and the kernel logs it (audit, `dmesg`): for finding what a thread
    /// needs, never for running guests one cares about.
    Log,
}

struct Armed {
    filters: Vec<(ThreadKind, BpfProgram)>,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Builds every kind's filter and, with [`OnViolation::Kill`], the handler that reports a
/// forbidden call to `report` (a file the daemon reads when the process ended) before the
/// process ends. From now on [`enter`] installs filters; before, it does nothing. Arming twice
/// keeps the first.
pub fn arm(on_violation: OnViolation, report: std::fs::File) -> Result<(), SandboxError> {
    let action = match on_violation {
        OnViolation::Kill => SeccompAction::Trap,
        OnViolation::Log => SeccompAction::Log,
    };
    let mut filters = Vec::new();
    for kind in ThreadKind::ALL {
        filters.push((kind, build(kind, action.clone())?));
    }
    if on_violation == OnViolation::Kill {
        violation::catch(report)?;
    }
    let _ = ARMED.set(Armed { filters });
    crate::thread::start_spawner().map_err(SandboxError::Handler)
}

/// Whether filters were armed in this process.
pub fn armed() -> bool {
    ARMED.get().is_some()
}

/// Puts the calling thread under the filter of `kind`, if the process armed them; for the rest
/// of its life the thread (and every thread it starts) can make only those calls.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(armed) = ARMED.get() else {
        return Ok(());
    };
    violation::name_thread(kind);
    let program = armed
        .filters
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, p)| p)
        .ok_or(SandboxError::Install {
            kind: kind.label(),
            message: "no filter was built".into(),
        })?;
    seccompiler::apply_filter(program).map_err(|e| SandboxError::Install {
        kind: kind.label(),
        message: e.to_string(),
    })
}

/// [`enter`] for threads that cannot return an error: a thread that fails to enter its filter
/// must not run unfiltered, so the process ends.
pub fn enter_or_abort(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("Error: {e}");
        std::process::abort();
    }
}

fn build(kind: ThreadKind, on_violation: SeccompAction) -> Result<BpfProgram, SandboxError> {
    let filter_error = |e: &dyn std::fmt::Display| SandboxError::Filter {
        kind: kind.label(),
        message: e.to_string(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed::syscalls(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let mut prctl = Vec::new();
    for &option in allowed::PRCTL_OPTIONS {
        let condition =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, option as u64)
                .map_err(|e| filter_error(&e))?;
        prctl.push(SeccompRule::new(vec![condition]).map_err(|e| filter_error(&e))?);
    }
    rules.insert(libc::SYS_prctl, prctl);
    let filter = SeccompFilter::new(
        rules,
        on_violation,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| filter_error(&e))?;
    filter.try_into().map_err(|e| filter_error(&e))
}

/// The seccomp mode of the calling thread (0 none, 2 filter), from `/proc/thread-self/status`.
pub fn mode_of_this_thread() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds() {
        for kind in ThreadKind::ALL {
            build(kind, SeccompAction::Trap).expect("filter builds");
        }
    }
}
