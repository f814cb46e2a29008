//! What the engine's tests share: guest memory, and a simulated source machine (a writer
//! thread dirtying pages, a plain or manual dirty log, pause and throttle).

// Each test crate uses part of this.
#![allow(dead_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_migration::source::{SourceVm, StateRecords};
use tern_migration::{CopiedDisk, DiskTarget, GuestRegion, RamRegion, SourceDisk};
use tern_storage::WriteLog;
use vm_memory::GuestAddress;

pub const PAGE: usize = 4096;
/// The guest's first page: RAM starts at 1 MiB.
pub const FIRST_PFN: u64 = 0x100;

/// Anonymous guest memory of `pages` pages from [`FIRST_PFN`].
pub fn memory(pages: usize) -> RamRegion {
    let mapping =
        GuestRegion::from_range(GuestAddress(FIRST_PFN * PAGE as u64), pages * PAGE, None)
            .expect("guest memory");
    RamRegion::new(Arc::new(mapping))
}

/// Writes a pattern made from `value` over page `p` (the guest's store; racing with the
/// engine's reads is what a real guest does too).
pub fn write_page(m: &RamRegion, p: usize, value: u64) {
    let words: Vec<u64> = (0..PAGE as u64 / 8).map(|i| value ^ i).collect();
    m.slice(FIRST_PFN + p as u64, 1)
        .expect("page")
        .copy_from(&words);
}

pub fn zero_page(m: &RamRegion, p: usize) {
    m.slice(FIRST_PFN + p as u64, 1)
        .expect("page")
        .copy_from(&[0u8; PAGE][..]);
}

pub fn read_page(m: &RamRegion, p: usize) -> Vec<u8> {
    let mut out = vec![0u8; PAGE];
    m.slice(FIRST_PFN + p as u64, 1)
        .expect("page")
        .copy_to(&mut out[..]);
    out
}

/// Whether two memories hold the same pages.
pub fn same_memory(a: &RamRegion, b: &RamRegion) -> bool {
    let pages = a.pages() as usize;
    a.pages() == b.pages() && (0..pages).all(|p| read_page(a, p) == read_page(b, p))
}

/// What the simulated guest writes while it runs.
#[derive(Clone)]
pub struct Writes {
    /// The pages it writes, in turn, from the first.
    pub hot: Range<usize>,
    /// Pages written per millisecond (slower when throttled).
    pub pages_per_ms: u64,
    /// Every this many writes zeroes its page instead (0: never).
    pub zero_every: u64,
}

impl Writes {
    pub fn new(hot: Range<usize>, pages_per_ms: u64) -> Writes {
        Writes {
            hot,
            pages_per_ms,
            zero_every: 0,
        }
    }
}

/// A simulated machine: memory, a writer thread, a dirty log, pause and throttle.
pub struct FakeVm {
    pub memory: RamRegion,
    pub pages: usize,
    /// Held by the writer while it writes one page; pausing takes it too.
    gate: Arc<Mutex<()>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    dirty: Arc<Mutex<Option<Vec<u64>>>>,
    /// The throttle now, and the strongest one set.
    pub throttle: Arc<AtomicU64>,
    pub max_throttle: AtomicU8,
    pub resumes: AtomicU64,
    writer: Option<JoinHandle<()>>,
    /// Behave like KVM's manual dirty-log protection: every page starts dirty, reading the
    /// log clears nothing, and only `rearm` clears bits.
    manual: AtomicBool,
    /// Disks copied with the guest, and their writers.
    pub disks: Vec<Arc<FakeDisk>>,
    disk_writers: Vec<JoinHandle<()>>,
}

impl FakeVm {
    /// A machine with `pages` pages, those for which `filled` holds written at the start,
    /// and a writer doing `writes`.
    pub fn new(pages: usize, filled: impl Fn(usize) -> bool, writes: Writes) -> FakeVm {
        let memory = memory(pages);
        for p in (0..pages).filter(|&p| filled(p)) {
            write_page(&memory, p, p as u64 * 7 + 1);
        }
        let gate = Arc::new(Mutex::new(()));
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let dirty: Arc<Mutex<Option<Vec<u64>>>> = Arc::new(Mutex::new(None));
        let throttle = Arc::new(AtomicU64::new(0));
        let writer = {
            let (memory, gate, paused, stop, dirty, throttle) = (
                memory.clone(),
                gate.clone(),
                paused.clone(),
                stop.clone(),
                dirty.clone(),
                throttle.clone(),
            );
            std::thread::spawn(move || write(memory, writes, gate, paused, stop, dirty, throttle))
        };
        FakeVm {
            memory,
            pages,
            gate,
            paused,
            stop,
            dirty,
            throttle,
            max_throttle: AtomicU8::new(0),
            resumes: AtomicU64::new(0),
            writer: Some(writer),
            manual: AtomicBool::new(false),
            disks: Vec::new(),
            disk_writers: Vec::new(),
        }
    }

    /// The same machine with a disk of `blocks` 4 KiB blocks, the first `filled` written
    /// (every third of them zero), and a writer that writes blocks `hot` in turn,
    /// `blocks_per_ms` a millisecond while the guest runs (every fourth write zeroes).
    pub fn with_disk(
        mut self,
        blocks: u64,
        filled: u64,
        hot: Range<u64>,
        blocks_per_ms: u64,
    ) -> FakeVm {
        let disk = Arc::new(FakeDisk::new(blocks, filled));
        let (gate, paused, stop) = (self.gate.clone(), self.paused.clone(), self.stop.clone());
        let writer = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut seq = 1u64;
                let mut block = hot.start;
                while !stop.load(Ordering::Relaxed) && blocks_per_ms > 0 && !hot.is_empty() {
                    for _ in 0..blocks_per_ms {
                        let _g = gate.lock().unwrap();
                        if paused.load(Ordering::Relaxed) {
                            break;
                        }
                        let value = if seq % 4 == 0 { 0 } else { seq };
                        disk.write_block(block, value);
                        seq += 1;
                        block = if block + 1 >= hot.end {
                            hot.start
                        } else {
                            block + 1
                        };
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        self.disks.push(disk);
        self.disk_writers.push(writer);
        self
    }

    /// What the offer says of the disks.
    pub fn offered_disks(&self) -> Vec<CopiedDisk> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| CopiedDisk {
                vdev: format!("xvd{}", (b'a' + i as u8) as char),
                size: d.size(),
                allocated: d.size(),
            })
            .collect()
    }

    /// The same machine with manual dirty-log protection.
    pub fn manual(self) -> FakeVm {
        self.manual.store(true, Ordering::Relaxed);
        self
    }

    pub fn dirty_log_on(&self) -> bool {
        self.dirty.lock().unwrap().is_some()
    }

    pub fn stop_writer(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            w.join().unwrap();
        }
        for w in self.disk_writers.drain(..) {
            w.join().unwrap();
        }
    }
}

/// A simulated disk: an image in memory, its allocated prefix, and a write log.
pub struct FakeDisk {
    pub data: Mutex<Vec<u8>>,
    /// Bytes from the start that count as allocated (the rest is a hole, unless written).
    allocated: AtomicU64,
    log: WriteLog,
}

impl FakeDisk {
    /// `blocks` 4 KiB blocks, the first `filled` written (every third zero).
    pub fn new(blocks: u64, filled: u64) -> FakeDisk {
        let disk = FakeDisk {
            data: Mutex::new(vec![0; (blocks * 4096) as usize]),
            allocated: AtomicU64::new(filled * 4096),
            log: WriteLog::new(blocks * 4096, 4096),
        };
        for b in 0..filled {
            disk.write_block(b, if b % 3 == 0 { 0 } else { b * 11 + 1 });
        }
        disk
    }

    /// Fills block `block` with `value`'s bytes (zeros if 0) and logs it.
    pub fn write_block(&self, block: u64, value: u64) {
        let at = (block * 4096) as usize;
        let mut data = self.data.lock().unwrap();
        for word in data[at..at + 4096].chunks_mut(8) {
            word.copy_from_slice(&value.to_le_bytes());
        }
        drop(data);
        self.allocated
            .fetch_max((block + 1) * 4096, Ordering::SeqCst);
        self.log.mark(block * 4096, 4096);
    }
}

impl SourceDisk for FakeDisk {
    fn vdev(&self) -> String {
        "xvda".into()
    }

    fn path(&self) -> String {
        "/fake/disk.img".into()
    }

    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn allocated(&self) -> Result<Vec<Range<u64>>, String> {
        Ok(std::iter::once(0..self.allocated.load(Ordering::SeqCst)).collect())
    }

    fn start_write_log(&self) {
        self.log.start();
    }

    fn stop_write_log(&self) {
        self.log.stop();
    }

    fn block_size(&self) -> u64 {
        self.log.block_size()
    }

    fn take_written(&self) -> Vec<u64> {
        self.log.take()
    }

    fn rearm(&self, range: Range<u64>) {
        self.log.clear_range(range.start, range.end - range.start);
    }

    fn limit_writes(&self, bytes_per_sec: Option<u64>) {
        self.log.set_limit(bytes_per_sec);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let data = self.data.lock().unwrap();
        let at = offset as usize;
        let src = data.get(at..at + buf.len()).ok_or("read past the end")?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Disks arriving in memory.
pub struct MemDisks(pub Vec<Vec<u8>>);

impl DiskTarget for MemDisks {
    fn sizes(&self) -> Vec<u64> {
        self.0.iter().map(|d| d.len() as u64).collect()
    }

    fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        let d = self.0.get_mut(disk as usize).ok_or("no such disk")?;
        let at = offset as usize;
        d.get_mut(at..at + data.len())
            .ok_or("past the end")?
            .copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, disk: u32, range: Range<u64>) -> Result<(), String> {
        let d = self.0.get_mut(disk as usize).ok_or("no such disk")?;
        d.get_mut(range.start as usize..range.end as usize)
            .ok_or("past the end")?
            .fill(0);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// The writer thread: `writes.pages_per_ms` pages a millisecond (slower as throttled) until
/// stopped, none while paused.
fn write(
    memory: RamRegion,
    writes: Writes,
    gate: Arc<Mutex<()>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    dirty: Arc<Mutex<Option<Vec<u64>>>>,
    throttle: Arc<AtomicU64>,
) {
    let hot = writes.hot;
    let mut seq = 1u64;
    let mut page = hot.start;
    while !stop.load(Ordering::Relaxed) && writes.pages_per_ms > 0 && !hot.is_empty() {
        for _ in 0..writes.pages_per_ms {
            let _g = gate.lock().unwrap();
            if paused.load(Ordering::Relaxed) {
                break;
            }
            if writes.zero_every > 0 && seq % writes.zero_every == 0 {
                zero_page(&memory, page);
            } else {
                write_page(&memory, page, seq);
            }
            if let Some(bits) = dirty.lock().unwrap().as_mut() {
                bits[page / 64] |= 1 << (page % 64);
            }
            seq += 1;
            page = if page + 1 >= hot.end {
                hot.start
            } else {
                page + 1
            };
        }
        let t = throttle.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(1000 + t * 200));
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

impl SourceVm for FakeVm {
    fn regions(&self) -> Vec<RamRegion> {
        vec![self.memory.clone()]
    }

    fn populated(&self) -> Result<Vec<Range<u64>>, String> {
        Ok(std::iter::once(FIRST_PFN..FIRST_PFN + self.pages as u64).collect())
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    fn pause(&self) -> Result<(), String> {
        let _g = self.gate.lock().unwrap();
        self.paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&self) -> Result<(), String> {
        self.paused.store(false, Ordering::Relaxed);
        self.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn start_dirty_log(&self) -> Result<(), String> {
        let initially = if self.manual.load(Ordering::Relaxed) {
            u64::MAX
        } else {
            0
        };
        *self.dirty.lock().unwrap() = Some(vec![initially; self.pages.div_ceil(64)]);
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), String> {
        *self.dirty.lock().unwrap() = None;
        Ok(())
    }

    fn rearm(&self, region: usize, first_page: u64, bits: &[u64]) -> Result<(), String> {
        assert_eq!(region, 0);
        assert_eq!(first_page % 64, 0);
        if !self.manual.load(Ordering::Relaxed) {
            return Ok(()); // reading the log re-armed it, as a plain KVM dirty log does
        }
        let mut d = self.dirty.lock().unwrap();
        let log = d.as_mut().ok_or("no dirty log")?;
        let first_word = (first_page / 64) as usize;
        for (w, clear) in log[first_word..].iter_mut().zip(bits) {
            *w &= !clear;
        }
        Ok(())
    }

    fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, String> {
        let mut d = self.dirty.lock().unwrap();
        let bits = d.as_mut().ok_or("no dirty log")?;
        if self.manual.load(Ordering::Relaxed) {
            return Ok(vec![bits.clone()]);
        }
        Ok(vec![std::mem::replace(bits, vec![0; bits.len()])])
    }

    fn set_throttle(&self, percent: u8) -> Result<(), String> {
        self.throttle.store(u64::from(percent), Ordering::Relaxed);
        self.max_throttle.fetch_max(percent, Ordering::Relaxed);
        Ok(())
    }

    fn take_longest_throttle_hold(&self) -> Duration {
        Duration::ZERO
    }

    fn copied_disks(&self) -> Vec<Arc<dyn SourceDisk>> {
        self.disks
            .iter()
            .map(|d| d.clone() as Arc<dyn SourceDisk>)
            .collect()
    }

    fn capture(&self) -> Result<StateRecords, String> {
        assert!(self.is_paused(), "state is captured from a paused machine");
        Ok(StateRecords {
            machine: b"machine".to_vec(),
            vcpus: vec![b"vcpu0".to_vec()],
            devices: vec![("serial0".into(), b"uart".to_vec())],
        })
    }
}
