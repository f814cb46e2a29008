//! Test hosts for tern's integration tests, benchmarks and demo.
//!
//! A [`TernHost`] is a real `tern daemon` with its own socket and state directory in a scratch
//! directory, driven through the real `tern` CLI; dropping it destroys its guests and stops the
//! daemon. Nothing here panics: callers decide (tests assert, benchmarks report).
//!
//! For networking, a [`NetLab`] builds two hosts, a client and a storage server on one
//! layer-2 segment out of network namespaces (root and iproute2 needed); a `TernHost` can run
//! its daemon in a lab host ([`TernHost::start_in_netns`]) and an [`NbdExport`] serves a
//! shared disk from the storage namespace. `scripts/testnet` builds the same lab for manual
//! use through the `tern-testnet` binary.

mod cmd;
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
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the tern executable is not built (looked at {candidates:?}); run `cargo build --release --workspace`"
            )
        })
}
