//! tern's benchmarks. The save/restore benchmark (`benches/save_restore.rs`) repeats the
//! reference chapter's Table 13.1 on this machine: it boots the test guest under the real
//! `tern` daemon and under QEMU, lets it touch a known working set, then measures checkpoint
//! size, save time and the time until the restored guest prints its next heartbeat.
//!
//! The modules are the instruments; `save_restore` composes them. Everything that talks to a
//! process returns `anyhow` errors with the context a reader of a failed run needs.

pub mod felt;
pub mod guest;
pub mod lab;
pub mod machine_info;
pub mod memory;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod save_restore;
pub mod stats;
pub mod tern;

use std::time::{SystemTime, UNIX_EPOCH};

/// Host wall-clock time in Unix seconds: the clock tern's console timestamps use, so that
/// a time taken here and a console line's timestamp can be subtracted.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A benchmark's exit: success, or its error as one `Error: …` line and a failure code.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
