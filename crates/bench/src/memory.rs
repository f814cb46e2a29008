//! "Memory the guest has touched", measured from the host: tern backs guest RAM by a memfd
//! (`tern-guest-ram`), which the guest process holds open. With the guest paused, the
//! benchmark opens that file through `/proc/PID/fd`, finds its allocated extents with
//! `SEEK_DATA`/`SEEK_HOLE` and counts the pages that are not all zero. That is an
//! independent count of what a checkpoint has to hold, to compare the file size against.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{bail, Context};

const PAGE: usize = 4096;
/// Bytes read per `pread`.
const CHUNK: usize = 1 << 20;

/// What a guest's RAM holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Bytes of RAM the host has allocated (pages the guest wrote or read).
    pub allocated_bytes: u64,
    /// Bytes in pages that are not all zero: what the guest has written.
    pub nonzero_bytes: u64,
}

/// The guest RAM memfd held by process `pid`.
fn find_memfd(pid: u32) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir:?}"))?;
    for e in entries.flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            if target
                .to_string_lossy()
                .starts_with("/memfd:tern-guest-ram")
            {
                return Ok(e.path());
            }
        }
    }
    bail!("process {pid} holds no tern-guest-ram memfd")
}

/// Measures the RAM of the (paused) guest whose process is `pid`.
pub fn footprint(pid: u32) -> anyhow::Result<Footprint> {
    let path = find_memfd(pid)?;
    let file = File::open(&path).with_context(|| format!("cannot open {path:?}"))?;
    let size = file.metadata()?.len();
    let mut fp = Footprint::default();
    let mut buf = vec![0u8; CHUNK];
    let extents = tern_storage::allocated(&file, 0..size, PAGE as u64)
        .context("SEEK_DATA on guest memory")?;
    for std::ops::Range { start, end } in extents {
        fp.allocated_bytes += end - start;
        let mut off = start;
        while off < end {
            let len = ((end - off) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..len], off)
                .with_context(|| format!("cannot read guest memory at {off:#x}"))?;
            fp.nonzero_bytes += nonzero_pages(&buf[..len]) * PAGE as u64;
            off += len as u64;
        }
    }
    Ok(fp)
}

/// Number of 4 KiB pages of `data` that hold a non-zero byte (a partial page counts).
fn nonzero_pages(data: &[u8]) -> u64 {
    data.chunks(PAGE)
        .filter(|page| page.iter().any(|&b| b != 0))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nonzero_pages() {
        let mut data = vec![0u8; 3 * PAGE];
        assert_eq!(nonzero_pages(&data), 0);
        data[PAGE + 7] = 1;
        assert_eq!(nonzero_pages(&data), 1);
    }
}
