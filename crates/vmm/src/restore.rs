//! Restoring a machine from a checkpoint file.
//!
//! Two ways to bring memory back:
//! * copy: every page block is read, verified and copied in before any vCPU runs;
//! * lazy (default): guest RAM is registered with userfaultfd and the guest starts at once.
//!   A page the guest (or KVM on its behalf) touches first faults into a handler thread that
//!   loads the page's block from the file, verifies its checksum and installs it; a prefetch
//!   thread loads all other blocks meanwhile. No page is ever installed unverified.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_devices::serial::ConsoleOut;
use tern_devices::state::StateEncoding;
use tern_machine::uffd::Uffd;
use tern_machine::{Machine, MachineState};
use tern_migration::{guest_slice, GuestSlice, RamRegion};
use tern_sandbox::ThreadKind;
use tern_snapshot::{PagesIndex, RecordType, SnapshotIndex};

use crate::direct_io::{self, AlignedBuf};
use crate::record::{DomainRecord, RestoreSpec};

const PAGE: u64 = 4096;

/// A machine rebuilt from a checkpoint, stopped, with memory loaded or loading.
pub struct Restored {
    pub machine: Machine,
    /// Present in lazy mode until every page is in.
    pub loader: Option<LazyLoader>,
    /// Pages the checkpoint holds.
    pub pages: u64,
    /// The guest's disks.
    pub disks: Vec<crate::devices::GuestDisk>,
}

/// Rebuilds the machine of `record` from its checkpoint; its vCPUs exist but are paused.
pub fn prepare(
    record: &DomainRecord,
    spec: &RestoreSpec,
    console: ConsoleOut,
) -> anyhow::Result<Restored> {
    let t = std::time::Instant::now();
    let shown = spec.path.display().to_string();
    let file = File::open(&spec.path).with_context(|| format!("cannot read checkpoint {shown}"))?;
    let index = SnapshotIndex::open(&file).with_context(|| format!("cannot restore {shown}"))?;
    let info = index
        .info()
        .with_context(|| format!("cannot restore {shown}"))?;
    check_cpu_features(&info.cpu_features)?;

    let state = read_state(&index).with_context(|| format!("cannot restore {shown}"))?;
    let indexed = t.elapsed();
    let devices = crate::devices::build(record)?;
    let mut machine =
        Machine::for_state(&state, record.config.memory_mib, console, devices.virtio)?;
    let built = t.elapsed();
    let pages: u64 = index.pages.iter().map(|p| p.total_pages).sum();
    let source = BlockSource::open(file, &spec.path, index.header.aligned);
    let loader = if spec.copy {
        copy_all(&machine, &source, &index.pages)
            .with_context(|| format!("cannot restore {shown}"))?;
        None
    } else {
        Some(LazyLoader::start(
            &machine,
            source,
            index.pages.clone(),
            shown.clone(),
        )?)
    };
    machine.start(true)?;
    let started = t.elapsed();
    machine
        .restore_state(state)
        .with_context(|| format!("cannot restore {shown}"))?;
    log::info!(
        "restore: vcpu threads by {started:?}, state restored by {:?}",
        t.elapsed()
    );
    log::info!(
        "restore: checkpoint indexed in {indexed:?}, machine built by {built:?}, state restored by {:?}",
        t.elapsed()
    );
    Ok(Restored {
        machine,
        loader,
        pages,
        disks: devices.disks,
    })
}

/// The machine state a checkpoint holds, decoded the way its format version says.
fn read_state(index: &SnapshotIndex) -> anyhow::Result<MachineState> {
    let encoding = StateEncoding::of_format(index.header.version)
        .with_context(|| format!("format version {} is not supported", index.header.version))?;
    let machine = index
        .record(RecordType::MACHINE)
        .context("it has no MACHINE record")?;
    let vcpus = index.all(RecordType::VCPU).map(|r| r.body.as_slice());
    let devices = index
        .devices()?
        .into_iter()
        .map(|(id, bytes)| (id, bytes.to_vec()))
        .collect();
    Ok(MachineState::decode(
        encoding,
        &machine.body,
        vcpus,
        devices,
    )?)
}

/// Refuses a checkpoint whose guest was started with CPU features this host lacks.
fn check_cpu_features(saved: &[tern_snapshot::CpuFeatureWord]) -> anyhow::Result<()> {
    let host = tern_machine::host_cpuid()?;
    let host_words = tern_machine::cpuid::feature_words(&host);
    let saved_words: Vec<(u32, u32, [u32; 4])> =
        saved.iter().map(|w| (w.leaf, w.subleaf, w.regs)).collect();
    let missing = tern_machine::cpuid::missing_features(&saved_words, &host_words);
    if !missing.is_empty() {
        bail!(
            "this host's CPU lacks features the guest was started with: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The guest memory of a block's segment `pfn..pfn + pages`, checked to lie inside one
/// region of guest RAM.
fn segment(regions: &[RamRegion], pfn: u64, pages: u64) -> anyhow::Result<GuestSlice<'_>> {
    if let Some(slice) = guest_slice(regions, pfn, pages) {
        return Ok(slice);
    }
    let inside = |pfn: u64| guest_slice(regions, pfn, 1).is_some();
    if pages > 0 && inside(pfn) && pfn.checked_add(pages - 1).is_some_and(inside) {
        bail!("the checkpoint holds a page run across the MMIO hole");
    }
    bail!("the checkpoint holds a page outside guest RAM")
}

/// Where page blocks are read from: the checkpoint, directly (no page cache) if possible.
pub struct BlockSource {
    file: File,
    direct: Option<File>,
}

impl BlockSource {
    fn open(file: File, path: &std::path::Path, aligned: bool) -> Self {
        let direct = if aligned {
            direct_io::open_direct(path)
        } else {
            None
        };
        BlockSource { file, direct }
    }

    /// Reads and verifies block `b` of `p` into `buf`.
    fn read<'a>(
        &self,
        p: &PagesIndex,
        b: u64,
        buf: &'a mut AlignedBuf,
    ) -> anyhow::Result<&'a [u8]> {
        self.read_range(p, b..b + 1, buf)
    }

    /// Reads and verifies the consecutive blocks `blocks` of `p` (adjacent in the file) with
    /// one read.
    fn read_range<'a>(
        &self,
        p: &PagesIndex,
        blocks: std::ops::Range<u64>,
        buf: &'a mut AlignedBuf,
    ) -> anyhow::Result<&'a [u8]> {
        let first = p.block(blocks.start);
        let last = p.block(blocks.end - 1);
        let len = (last.file_offset + last.len - first.file_offset) as usize;
        let data = direct_io::read_at(
            &self.file,
            self.direct.as_ref(),
            first.file_offset,
            len,
            buf,
        )
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                anyhow::anyhow!("it is truncated inside page blocks {blocks:?}")
            } else {
                anyhow::anyhow!("cannot read page blocks {blocks:?}: {e}")
            }
        })?;
        p.verify_blocks(data, blocks.start)?;
        Ok(data)
    }
}

/// Blocks read with one I/O by copy mode and by the prefetcher (2 MiB with 64-page blocks).
const BATCH_BLOCKS: u64 = 8;

/// Batches of at most [`BATCH_BLOCKS`] blocks covering all of `p`.
fn batches(p: &PagesIndex) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
    (0..p.blocks())
        .step_by(BATCH_BLOCKS as usize)
        .map(|b| b..(b + BATCH_BLOCKS).min(p.blocks()))
}

/// The data of block `b` inside the data read for the batch starting at block `first`.
fn block_data<'a>(p: &PagesIndex, first: u64, b: u64, data: &'a [u8]) -> anyhow::Result<&'a [u8]> {
    let start = (p.block(b).file_offset - p.block(first).file_offset) as usize;
    data.get(start..start + p.block(b).len as usize)
        .context("page batch shorter than its blocks")
}

/// Copy mode: read, verify and copy every block before the guest runs.
fn copy_all(machine: &Machine, source: &BlockSource, records: &[PagesIndex]) -> anyhow::Result<()> {
    let regions = crate::migrate_in::regions(machine);
    let mut buf = AlignedBuf::new();
    for p in records {
        for batch in batches(p) {
            let data = source.read_range(p, batch.clone(), &mut buf)?;
            for b in batch.clone() {
                copy_block(&regions, p, b, block_data(p, batch.start, b, data)?)?;
            }
        }
    }
    Ok(())
}

/// Copies one verified block into guest memory (copy mode: no vCPU runs yet).
fn copy_block(regions: &[RamRegion], p: &PagesIndex, b: u64, data: &[u8]) -> anyhow::Result<()> {
    let mut off = 0usize;
    for (pfn, pages) in p.block(b).segments {
        let len = (u64::from(pages) * PAGE) as usize;
        let dst = segment(regions, pfn, u64::from(pages))?;
        let src = data
            .get(off..off + len)
            .context("block shorter than its pages")?;
        // `dst` is exactly `len` bytes (checked): one memcpy.
        dst.copy_from(src);
        off += len;
    }
    Ok(())
}

/// Load state of one page block (lazy restore).
const NOT_LOADED: u8 = 0;
const LOADING: u8 = 1;
const LOADED: u8 = 2;

/// What the fault handler and the prefetcher share. Each block has its own state, so the two
/// load different blocks in parallel and a fault never waits behind unrelated work.
struct LoaderState {
    source: BlockSource,
    records: Vec<PagesIndex>,
    /// Guest RAM, held mapped by the loader for as long as it runs.
    regions: Vec<RamRegion>,
    uffd: Uffd,
    blocks: Vec<Vec<AtomicU8>>,
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
    shown: String,
}

impl LoaderState {
    fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Makes sure block `b` of record `r` is in memory (for a fault: reading it, or waiting
    /// while the prefetcher installs it).
    fn load(&self, r: usize, b: u64, buf: &mut AlignedBuf) -> anyhow::Result<()> {
        let state = &self.blocks[r][b as usize];
        if state.load(Ordering::Acquire) == LOADED {
            return Ok(());
        }
        let p = &self.records[r];
        let data = self
            .source
            .read(p, b, buf)
            .with_context(|| format!("cannot restore {}", self.shown))?;
        self.claim_and_install(r, b, data)
    }

    /// Installs already verified data of block `b` unless the other thread did or does; waits
    /// for that other thread if it is installing the block right now.
    fn claim_and_install(&self, r: usize, b: u64, data: &[u8]) -> anyhow::Result<()> {
        let state = &self.blocks[r][b as usize];
        loop {
            match state.compare_exchange(NOT_LOADED, LOADING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(LOADED) => return Ok(()),
                Err(_) if self.has_failed() => bail!("lazy restore failed"),
                Err(_) => std::thread::yield_now(),
            }
        }
        match self.install(r, b, data) {
            Ok(()) => {
                state.store(LOADED, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                state.store(NOT_LOADED, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Installs the verified `data` of block `b` of record `r`.
    fn install(&self, r: usize, b: u64, data: &[u8]) -> anyhow::Result<()> {
        let p = &self.records[r];
        let mut off = 0usize;
        for (pfn, pages) in p.block(b).segments {
            let len = (u64::from(pages) * PAGE) as usize;
            let dst = segment(&self.regions, pfn, u64::from(pages))?;
            let src = data
                .get(off..off + len)
                .context("block shorter than its pages")?;
            self.uffd
                .copy(&dst, src)
                .context("cannot install restored pages")?;
            off += len;
        }
        Ok(())
    }

    /// Serves one fault at host address `addr` (as userfaultfd reports it).
    fn serve(&self, addr: usize, buf: &mut AlignedBuf) -> anyhow::Result<()> {
        let (region, pfn) = self
            .regions
            .iter()
            .find_map(|r| Some((r, r.pfn_at(addr)?)))
            .context("fault outside guest RAM")?;
        let page = region.slice(pfn, 1).context("fault outside guest RAM")?;
        for (r, p) in self.records.iter().enumerate() {
            if let Some(b) = p.find(pfn) {
                self.load(r, b, buf)?;
                return self
                    .uffd
                    .wake(&page)
                    .context("cannot wake the faulting thread");
            }
        }
        // Not in the checkpoint: the page was zero.
        self.uffd.zero(&page).context("cannot install a zero page")
    }

    fn fail(&self, e: &anyhow::Error) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get_or_insert_with(|| format!("{e:#}"));
    }
}

/// Lazy loading in progress.
pub struct LazyLoader {
    state: Arc<LoaderState>,
    prefetcher: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
}

impl LazyLoader {
    fn start(
        machine: &Machine,
        source: BlockSource,
        records: Vec<PagesIndex>,
        shown: String,
    ) -> anyhow::Result<Self> {
        let uffd =
            Uffd::new().context("userfaultfd is not available for lazy restore (try --copy)")?;
        let regions = crate::migrate_in::regions(machine);
        for r in &regions {
            let whole = r.whole().context("guest RAM is not page-aligned")?;
            uffd.register(&whole)
                .context("cannot register guest RAM with userfaultfd")?;
        }
        let blocks = records
            .iter()
            .map(|p| (0..p.blocks()).map(|_| AtomicU8::new(NOT_LOADED)).collect())
            .collect();
        let state = Arc::new(LoaderState {
            source,
            records,
            regions,
            uffd,
            blocks,
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            shown,
        });
        let handler_state = state.clone();
        let handler = tern_sandbox::thread::spawn(
            ThreadKind::PageServer,
            "restore-faults".into(),
            move || serve_faults(&handler_state),
        )?;
        let prefetch_state = state.clone();
        let prefetcher = tern_sandbox::thread::spawn(
            ThreadKind::PageServer,
            "restore-prefetch".into(),
            move || prefetch(&prefetch_state),
        )?;
        Ok(LazyLoader {
            state,
            prefetcher: Some(prefetcher),
            handler: Some(handler),
        })
    }

    /// Waits until every page is in; an error if any block failed its check.
    pub fn wait(mut self) -> anyhow::Result<()> {
        if let Some(p) = self.prefetcher.take() {
            let _ = p.join();
        }
        self.state.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        match self
            .state
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(message) => bail!(message),
            None => Ok(()),
        }
    }
}

/// Loads every block in batches; a block a fault brought in meanwhile is skipped.
fn prefetch(state: &LoaderState) {
    let mut buf = AlignedBuf::new();
    for (r, p) in state.records.iter().enumerate() {
        for batch in batches(p) {
            if state.has_failed() {
                return;
            }
            let all_in = batch
                .clone()
                .all(|b| state.blocks[r][b as usize].load(Ordering::Acquire) == LOADED);
            if all_in {
                continue;
            }
            let result = state
                .source
                .read_range(p, batch.clone(), &mut buf)
                .with_context(|| format!("cannot restore {}", state.shown))
                .and_then(|data| {
                    for b in batch.clone() {
                        state.claim_and_install(r, b, block_data(p, batch.start, b, data)?)?;
                    }
                    Ok(())
                });
            if let Err(e) = result {
                state.fail(&e);
                return;
            }
        }
    }
    // Everything is in: from now on, missing pages are just zero pages of the RAM file.
    if let Err(e) = state.uffd.unregister_all() {
        state.fail(&anyhow::anyhow!("cannot end lazy loading: {e}"));
    }
}

fn serve_faults(state: &LoaderState) {
    let mut buf = AlignedBuf::new();
    loop {
        match state.uffd.wait(Duration::from_millis(50)) {
            Ok(true) => {}
            Ok(false) => {
                if state.stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(e) => {
                state.fail(&anyhow::anyhow!("userfaultfd poll failed: {e}"));
                return;
            }
        }
        match state.uffd.next_fault() {
            Ok(Some(addr)) => {
                if let Err(e) = state.serve(addr, &mut buf) {
                    log::error!("lazy restore: {e:#}");
                    state.fail(&e);
                }
            }
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                state.fail(&anyhow::anyhow!("userfaultfd read failed: {e}"));
                return;
            }
        }
    }
}
