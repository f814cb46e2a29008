//! `tern save` and `tern restore`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tern_api::{Progress, Request, RestoreSummary, SaveSummary};

use crate::client;
use crate::progress::{bytes, ProgressLine};

/// Makes `file` absolute against the current directory: the daemon has its own.
fn absolute(file: &Path) -> anyhow::Result<PathBuf> {
    if file.is_absolute() {
        return Ok(file.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot find the current directory")?
        .join(file))
}

pub fn save(
    socket: &Path,
    domain: &str,
    file: &Path,
    keep_running: bool,
    json: bool,
) -> anyhow::Result<()> {
    let path = absolute(file)?;
    let mut conn = client::send(
        socket,
        &Request::Save {
            domain: domain.into(),
            path: path.display().to_string(),
            keep_running,
        },
    )?;
    let mut line = ProgressLine::new(&format!("saving {domain}"));
    let result = client::finish(&mut conn, |data| {
        if let Ok(p) = serde_json::from_value::<Progress>(data.clone()) {
            line.update(p.done_bytes, p.total_bytes);
        }
    });
    line.finish();
    let summary: SaveSummary = serde_json::from_value(result?).context("malformed save summary")?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let rate = summary.memory_bytes.min(summary.pages_stored * 4096) as f64
        / summary.write_seconds.max(1e-9);
    println!(
        "Saved {domain} to {}: {} file for {} of guest memory ({} pages stored) in {:.3} s ({}/s of stored memory; {:.3} s with fsync){}",
        summary.path,
        bytes(summary.file_bytes),
        bytes(summary.memory_bytes),
        summary.pages_stored,
        summary.write_seconds,
        bytes(rate as u64),
        summary.total_seconds,
        if summary.kept_running { "; the guest keeps running" } else { "" }
    );
    Ok(())
}

pub fn restore(
    socket: &Path,
    file: &Path,
    paused: bool,
    copy: bool,
    json: bool,
) -> anyhow::Result<()> {
    let path = absolute(file)?;
    let data = client::call(
        socket,
        &Request::Restore {
            path: path.display().to_string(),
            paused,
            copy,
        },
    )?;
    let summary: RestoreSummary =
        serde_json::from_value(data).context("malformed restore summary")?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "Restored {} (id={}) from {}: {} after {:.1} ms, all {} pages verified and loaded after {:.1} ms ({} mode)",
        summary.name,
        summary.id,
        path.display(),
        if paused { "ready (paused)" } else { "running" },
        summary.running_after_ms,
        summary.pages_loaded,
        summary.loaded_after_ms,
        summary.mode
    );
    Ok(())
}
