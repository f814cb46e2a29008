//! The tern daemon (the role of xend): owns the domains of one host, runs each guest in its
//! own process, and serves the `tern` CLI on a Unix socket.

pub mod admission;
pub mod checkpoint;
pub mod console;
pub mod evacuation;
pub mod guest_process;
pub mod peer_log;
pub mod pool;
pub mod registry;
pub mod relocation;
pub mod sandbox;
pub mod server;
pub mod trust;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tern_config::DaemonConfig;

/// Runs the daemon until it is killed.
pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    tern_vmm::logging::init("daemon");
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.state_dir.display()
        )
    })?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let listener = bind_socket(&config.socket)?;
    check_cpu_features(&config.hide_cpu_features)?;
    sandbox::check(&config.sandbox)?;
    let policy = registry::HostPolicy {
        hidden_cpu_features: config.hide_cpu_features.clone(),
        guest_memory_mib: config.guest_memory_mib,
        sandbox: config.sandbox.clone(),
    };
    let trust = Arc::new(trust::HostTrust::open(
        &config.state_dir,
        &config.relocation,
    )?);
    let pool = pool::PoolLink::join(&config, &trust)?;
    let registry = registry::Registry::new(&config.state_dir, policy, trust.clone(), pool)?;
    registry.adopt_existing();
    if config.relocation.server {
        relocation::start(&config.relocation, registry.clone(), trust)?;
    }
    log::info!(
        "listening on {} (state in {})",
        config.socket.display(),
        config.state_dir.display()
    );
    server::serve(listener, registry);
    Ok(())
}

/// Refuses unknown names in `hide_cpu_features` at start-up rather than at the first guest.
fn check_cpu_features(names: &[String]) -> anyhow::Result<()> {
    for name in names {
        if !tern_machine::cpuid::is_known_feature(name) {
            bail!(
                "hide_cpu_features: unknown CPU feature '{name}' (known: {})",
                tern_machine::cpuid::known_feature_names().join(", ")
            );
        }
    }
    Ok(())
}

/// Whether process `pid` exists.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// One daemon per state directory: an exclusive lock held for the daemon's lifetime.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = state_dir.join("ternd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another tern daemon is using {}", state_dir.display());
    }
    Ok(file)
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("a daemon is already listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}
