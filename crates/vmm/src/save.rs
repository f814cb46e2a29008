//! Writing a checkpoint of a paused machine.
//!
//! Records: INFO, CONFIG, MACHINE, one VCPU per vCPU, one DEVICE per device, then PAGES for
//! every guest page that is neither a hole in the RAM file nor all zero, then END. The file is
//! written under a temporary name next to its final one, flushed to disk and renamed, so a
//! checkpoint never exists half-written under its final name.
//!
//! The daemon opens the temporary file ([`CheckpointFiles::create`]) and hands it to the guest
//! process, which writes and flushes it ([`write_checkpoint`]); the daemon then gives it its
//! name ([`place`]). The guest process never opens a path for a save: the daemon decides where
//! a checkpoint may go, and sees the file system as the user does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use tern_api::{Progress, SavePhases, SaveSummary};
use tern_machine::memory::{PausedRam, RamSlot};
use tern_machine::Machine;
use tern_snapshot::{is_zero_page, CpuFeatureWord, Info, PageRun, RecordType, SnapshotWriter};

use crate::direct_io::DirectFileWriter;
use crate::record::DomainRecord;

/// Pages per checksum block: the unit a lazy restore loads on a fault.
pub const BLOCK_PAGES: u32 = 64;
/// Most pages per PAGES record (64 MiB of data): progress is reported between records.
const RECORD_PAGES: u64 = 16 * 1024;
const PAGE: u64 = 4096;

/// Temporary name of a checkpoint of the guest `uuid` being written (one save of a guest at
/// a time; its process's PID would not do: in a PID namespace of its own, every one is 1).
pub fn partial_path(path: &Path, uuid: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{uuid}.partial"))
}

/// Removes temporary files a save of `path` left behind (after its writer died).
pub fn remove_partials(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n.ends_with(".partial") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A new checkpoint file, opened twice: once for records, once with O_DIRECT for page data
/// (none where the file system has no O_DIRECT).
pub struct CheckpointFiles {
    pub file: File,
    pub direct: Option<File>,
}

impl CheckpointFiles {
    /// Creates `partial` (it must not exist), mode 0600.
    pub fn create(partial: &Path) -> std::io::Result<CheckpointFiles> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(partial)
            .ok();
        Ok(CheckpointFiles { file, direct })
    }
}

/// Gives a written checkpoint its final name: renames `partial` over `path` and makes the
/// rename durable.
pub fn place(partial: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::rename(partial, path).with_context(|| {
        format!(
            "cannot move the checkpoint into place as {}",
            path.display()
        )
    })?;
    sync_dir(path);
    Ok(())
}

/// Writes a checkpoint of `machine` (paused) into `files` and flushes it to disk; `shown` is
/// where it is going, for messages.
pub fn write_checkpoint(
    machine: &Machine,
    record: &DomainRecord,
    files: CheckpointFiles,
    shown: &str,
    started: Instant,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<SaveSummary> {
    let result = write_to(machine, record, files, &mut progress).and_then(|mut written| {
        let write_seconds = started.elapsed().as_secs_f64();
        let t = Instant::now();
        written
            .file
            .sync_all()
            .context("cannot flush the checkpoint to disk")?;
        written.phases.fsync = t.elapsed().as_secs_f64();
        Ok((written, write_seconds))
    });
    let (written, write_seconds) =
        result.map_err(|e| e.context(format!("cannot write checkpoint {shown}")))?;
    log::info!("save to {shown}: {:?}", written.phases);
    Ok(SaveSummary {
        path: shown.to_string(),
        file_bytes: written.bytes,
        memory_bytes: machine.ram().size(),
        pages_stored: written.pages,
        write_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        kept_running: false,
        phases: written.phases,
    })
}

/// A checkpoint written but not yet flushed.
struct Written {
    file: File,
    bytes: u64,
    pages: u64,
    phases: SavePhases,
}

/// Writes all records into `files`.
fn write_to(
    machine: &Machine,
    record: &DomainRecord,
    files: CheckpointFiles,
    progress: &mut impl FnMut(&Progress),
) -> anyhow::Result<Written> {
    let mut phases = SavePhases::default();
    let t = Instant::now();
    let state = machine.save_state()?.encode()?;
    phases.capture = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (runs, crcs) = stored_pages(machine)?;
    let total_pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    phases.scan = t.elapsed().as_secs_f64();
    let t = Instant::now();

    let file = DirectFileWriter::new(files.file, files.direct);
    let mut w = SnapshotWriter::new(file, true)?;
    let info = guest_info(machine, record);
    w.record(RecordType::INFO, &serde_json::to_vec(&info)?)?;
    let mut config = record.config.clone();
    config.uuid = record.uuid.parse().ok();
    w.record(RecordType::CONFIG, &serde_json::to_vec(&config)?)?;
    w.record(RecordType::MACHINE, &state.machine)?;
    for v in &state.vcpus {
        w.record(RecordType::VCPU, v)?;
    }
    for (id, bytes) in &state.devices {
        w.device(id, bytes)?;
    }
    let mut done = 0u64;
    let ram = paused_ram(machine)?;
    for chunk in split_runs(&runs, RECORD_PAGES) {
        let data: Vec<&[u8]> = chunk
            .iter()
            .map(|r| guest_slice(&ram, r))
            .collect::<anyhow::Result<_>>()?;
        let pages: u64 = chunk.iter().map(|r| u64::from(r.pages)).sum();
        // Records start at multiples of RECORD_PAGES, itself a multiple of BLOCK_PAGES: the
        // record's blocks are a slice of the checksums the scan computed.
        let first_block = (done / u64::from(BLOCK_PAGES)) as usize;
        let blocks = pages.div_ceil(u64::from(BLOCK_PAGES)) as usize;
        let block_crcs = crcs
            .get(first_block..first_block + blocks)
            .context("page checksums out of step with the pages")?;
        w.pages_with_crcs(&chunk, &data, BLOCK_PAGES, block_crcs)?;
        done += pages;
        progress(&Progress {
            done_bytes: done * PAGE,
            total_bytes: total_pages * PAGE,
        });
    }
    let mut writer = w.finish()?;
    writer.flush()?;
    let file = writer.into_file();
    let bytes = file.metadata()?.len();
    phases.write = t.elapsed().as_secs_f64();
    Ok(Written {
        file,
        bytes,
        pages: total_pages,
        phases,
    })
}

/// The INFO of a checkpoint or migration of `machine`.
pub fn guest_info(machine: &Machine, record: &DomainRecord) -> Info {
    Info {
        tern_version: env!("CARGO_PKG_VERSION").into(),
        created_unix: crate::console::now_us() / 1_000_000,
        host: hostname(),
        guest_name: record.config.name.clone(),
        guest_uuid: record.uuid.clone(),
        memory_bytes: machine.ram().size(),
        vcpus: machine.vcpu_cpuids().len() as u32,
        cpu_features: machine
            .vcpu_cpuids()
            .first()
            .map(|c| feature_words(c))
            .unwrap_or_default(),
    }
}

/// Guest page ranges (pfns) that may hold data: the allocated parts of the RAM file. The
/// rest was never written and reads as zero.
pub fn populated_pages(machine: &Machine) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
    let file = machine.ram().backing_file();
    let mut ranges = Vec::new();
    for slot in machine.ram().slots() {
        for std::ops::Range { start, end } in data_extents(file, slot)? {
            let first = (slot.guest_addr + start - slot.file_offset) / PAGE;
            let last = (slot.guest_addr + end - slot.file_offset).div_ceil(PAGE);
            ranges.push(first..last);
        }
    }
    Ok(ranges)
}

fn feature_words(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuFeatureWord> {
    tern_machine::cpuid::feature_words(cpuid)
        .into_iter()
        .map(|(leaf, subleaf, regs)| CpuFeatureWord {
            leaf,
            subleaf,
            regs,
        })
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Guest RAM as bytes: the machine is paused (and stays so while this borrows it).
fn paused_ram(machine: &Machine) -> anyhow::Result<PausedRam<'_>> {
    machine
        .paused_ram()
        .context("the machine must be paused to write its memory")
}

/// Guest memory holding the pages of `run`, written to the file straight from there.
fn guest_slice<'a>(ram: &PausedRam<'a>, run: &PageRun) -> anyhow::Result<&'a [u8]> {
    let len = usize::try_from(u64::from(run.pages) * PAGE)?;
    run.first_pfn
        .checked_mul(PAGE)
        .and_then(|gpa| ram.bytes(gpa, len))
        .context("page run outside guest RAM")
}

/// Splits runs into groups of at most `max_pages` pages (a long run is cut).
fn split_runs(runs: &[PageRun], max_pages: u64) -> Vec<Vec<PageRun>> {
    let mut out = vec![Vec::new()];
    let mut in_current = 0u64;
    for r in runs {
        let mut first = r.first_pfn;
        let mut left = u64::from(r.pages);
        while left > 0 {
            if in_current == max_pages {
                out.push(Vec::new());
                in_current = 0;
            }
            let take = left.min(max_pages - in_current);
            if let Some(cur) = out.last_mut() {
                cur.push(PageRun {
                    first_pfn: first,
                    pages: take as u32,
                });
            }
            in_current += take;
            first += take;
            left -= take;
        }
    }
    out.retain(|c| !c.is_empty());
    out
}

/// Block checksums computed while scanning: a running CRC32C over the stored pages, closed
/// every [`BLOCK_PAGES`] pages (the page is hot in cache right after its zero check).
#[derive(Default)]
struct BlockCrcs {
    crcs: Vec<u32>,
    current: u32,
    pages: u32,
}

impl BlockCrcs {
    fn add(&mut self, page: &[u8]) {
        self.current = crc32c::crc32c_append(self.current, page);
        self.pages += 1;
        if self.pages == BLOCK_PAGES {
            self.crcs.push(self.current);
            self.current = 0;
            self.pages = 0;
        }
    }

    fn finish(mut self) -> Vec<u32> {
        if self.pages > 0 {
            self.crcs.push(self.current);
        }
        self.crcs
    }
}

/// Guest pages worth storing (allocated in the RAM file and not all zero), and the checksum
/// of every block of them in order.
fn stored_pages(machine: &Machine) -> anyhow::Result<(Vec<PageRun>, Vec<u32>)> {
    let file = machine.ram().backing_file();
    let ram = paused_ram(machine)?;
    let mut runs: Vec<PageRun> = Vec::new();
    let mut crcs = BlockCrcs::default();
    for slot in machine.ram().slots() {
        for std::ops::Range { start, end } in data_extents(file, slot)? {
            let extent = ram
                .bytes(
                    slot.guest_addr + start - slot.file_offset,
                    usize::try_from((end - start).div_ceil(PAGE) * PAGE)?,
                )
                .context("a RAM file extent outside its slot")?;
            for (i, page) in extent.chunks(PAGE as usize).enumerate() {
                let off = start + i as u64 * PAGE;
                if !is_zero_page(page) {
                    crcs.add(page);
                    let pfn = (slot.guest_addr + off - slot.file_offset) / PAGE;
                    match runs.last_mut() {
                        Some(r)
                            if r.first_pfn + u64::from(r.pages) == pfn && r.pages < u32::MAX =>
                        {
                            r.pages += 1
                        }
                        _ => runs.push(PageRun {
                            first_pfn: pfn,
                            pages: 1,
                        }),
                    }
                }
            }
        }
    }
    Ok((runs, crcs.finish()))
}

/// Allocated byte ranges of `slot` in the RAM file `file`, as file offsets.
fn data_extents(file: &std::fs::File, slot: &RamSlot) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
    let within = slot.file_offset..slot.file_offset + slot.size;
    tern_storage::allocated(file, within, PAGE).context("cannot scan guest memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_split_at_the_limit() {
        let runs = [
            PageRun {
                first_pfn: 10,
                pages: 5,
            },
            PageRun {
                first_pfn: 100,
                pages: 7,
            },
        ];
        let parts = split_runs(&runs, 4);
        let sizes: Vec<u64> = parts
            .iter()
            .map(|p| p.iter().map(|r| u64::from(r.pages)).sum())
            .collect();
        assert_eq!(sizes, vec![4, 4, 4]);
        assert_eq!(parts[1][0].first_pfn, 14);
        assert_eq!(parts[1][1].first_pfn, 100);
        assert_eq!(parts[2][0].first_pfn, 103);
    }

    #[test]
    fn partial_files_are_named_and_found() {
        let dir = tempfile::tempdir().unwrap();
        let final_path = dir.path().join("g.tern");
        let tmp = partial_path(&final_path, "42");
        assert_eq!(tmp.file_name().unwrap(), ".g.tern.42.partial");
        std::fs::write(&tmp, b"x").unwrap();
        std::fs::write(dir.path().join("other"), b"y").unwrap();
        remove_partials(&final_path);
        assert!(!tmp.exists());
        assert!(dir.path().join("other").exists());
    }
}
