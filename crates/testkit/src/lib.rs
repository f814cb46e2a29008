//! Test hosts for tern's integration tests, benchmarks and demo.
//!
//! A [`TernHost`] is a real `tern daemon` with its own socket and state directory in a scratch
//! directory, driven through the real `tern` CLI; dropping it destroys its guests and stops the
//! daemon. Nothing here panics: callers decide (tests assert, benchmarks report).
//!
//! For networking, a [`NetLab`] builds three hosts, a client, a storage server and three etcd
//! members on one layer-2 segment out of network namespaces (root and iproute2 needed); a `TernHost` can run
//! its daemon in a lab host ([`TernHost::start_in_netns`]) and an [`NbdExport`] serves a
//! shared disk from the storage namespace. `scripts/testnet` builds the same lab for manual
//! use through the `tern-testnet` binary. An [`EtcdCluster`] runs a real etcd for pools.

mod cmd;
mod etcd;
mod host;
mod nbd;
mod netlab;
mod netns;
mod ping;
pub mod release;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use cmd::{ensure_program, find_program, output_within, run_within};
pub use etcd::{EtcdCerts, EtcdCluster};
pub use host::{path_arg, TernHost};
pub use nbd::NbdExport;
pub use netlab::{
    guest_ip, relocation_toml, relocation_toml_with, Member, NetLab, FIXED_PREFIX, GUEST_BRIDGE,
    LAB_HOSTS_ALLOW, LAB_PREFIX_LEN, LAB_SUBNET, UPLINK,
};
pub use netns::{enter_netns, netns_exists, netns_path, run_in_netns};
pub use ping::{PingReply, PingReport};
pub use tern_testguest::{complete_lines, is_failure_line, Heartbeat, KvmLock};

/// Polls `cond` every 20 ms until it holds or `timeout` passes; true if it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True if a process with this PID exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Finds the `tern` executable for a benchmark or the demo: `$TERN_BIN`, else next to the
/// running executable (or one directory up, where cargo puts bench binaries' siblings), else
/// under `$CARGO_TARGET_DIR/release`.
pub fn find_tern() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TERN_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut candidates = Vec::new();
    if let Ok(me) = std::env::current_exe() {
        for dir in me.ancestors().skip(1).take(2) {
            candidates.push(dir.join("tern"));
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("release/tern"));
    }
    let tern = candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the tern executable is not built (looked at {candidates:?}); run `cargo build --release --workspace`"
            )
        })?;
    ensure_newer_than_sources(&tern)?;
    Ok(tern)
}

/// Refuses a `tern` older than a source file of this workspace: `cargo bench -p tern-bench`
/// builds the benchmark, not the `tern` it drives, and a stale one measures old code.
fn ensure_newer_than_sources(tern: &std::path::Path) -> anyhow::Result<()> {
    let built = std::fs::metadata(tern)?.modified()?;
    let testkit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(crates) = testkit.parent() else {
        return Ok(());
    };
    if let Some(newer) = newest_source(crates).filter(|(t, _)| *t > built) {
        anyhow::bail!(
            "{} is older than {}: run `cargo build --release --workspace` (or set TERN_BIN)",
            tern.display(),
            newer.1.display()
        );
    }
    Ok(())
}

/// The most recently changed `.rs` file under `dir`'s crates' `src` folders, with its time.
fn newest_source(dir: &std::path::Path) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(dir: &std::path::Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, best);
            } else if path.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        *best = Some((t, path));
                    }
                }
            }
        }
    }
    // The crates the tern executable is not built from: changing them does not relink it.
    const NOT_IN_TERN: [&str; 3] = ["bench", "demo", "testkit"];
    let mut best = None;
    for krate in std::fs::read_dir(dir).ok()?.flatten() {
        if NOT_IN_TERN.iter().any(|n| krate.file_name() == *n) {
            continue;
        }
        walk(&krate.path().join("src"), &mut best);
    }
    best
}
