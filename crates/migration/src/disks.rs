//! Copying a guest's disk images along with its memory (`tern migrate --copy-storage`), for
//! hosts that share no storage.
//!
//! The disks go the way memory does, and in the same stream: a bulk pass over each image's
//! allocated extents while the guest runs (holes and zero blocks are not sent: the
//! destination's copy starts as holes), then, in every pre-copy round, the blocks the guest
//! wrote meanwhile (the disk's write log, the counterpart of KVM's dirty log), and the last of
//! them with the guest paused. Blocks count as pages in the convergence policy, so the
//! rounds, the throttle and the downtime budget account for disk writes too, and disk and
//! memory share the link and its rate cap.
//!
//! Rounds were chosen over mirroring every guest write to both hosts: the guest never waits
//! on the network for a write, and a guest that writes faster than the link is slowed by the
//! same auto-converge as one that dirties memory too fast.
//!
//! The source's image stays the authority until the handover: the destination writes into a
//! copy of its own under a temporary name, and removes it if the migration fails.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tern_api::{CopiedDiskSummary, DiskCopySummary};
use tern_snapshot::{SnapshotWriter, DISK_SECTOR, MAX_DISK_ZERO_RUNS};

use crate::error::MigrationError;
use crate::transport::{Channel, Transport};

/// Bytes read and sent at a time (one DISK record at most).
const CHUNK: usize = 1 << 20;
/// Zero detection works on blocks of this many bytes (a zero block is not sent).
const ZERO_BLOCK: usize = 4096;

/// A disk of the guest as the engine copies it: an image and the log of blocks the guest
/// writes. The engine never knows the device behind it.
pub trait SourceDisk: Send + Sync {
    /// The disk's name in the guest config (`xvda`).
    fn vdev(&self) -> String;
    /// The image on this host (for the summary).
    fn path(&self) -> String;
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Byte ranges that may hold data, in order: the rest of the image reads as zeros.
    fn allocated(&self) -> Result<Vec<Range<u64>>, String>;
    /// Starts logging the guest's writes, with nothing logged.
    fn start_write_log(&self);
    /// Stops logging.
    fn stop_write_log(&self);
    /// The size of the blocks the log marks (a power of two, at least 512).
    fn block_size(&self) -> u64;
    /// The blocks written since the log started or was last taken (bit i: block i).
    fn take_written(&self) -> Vec<u64>;
    /// The engine is about to read `range`: forgets the marks of the blocks wholly inside it
    /// (what was written there so far goes with the read; a later write marks them again).
    fn rearm(&self, range: Range<u64>);
    /// Caps the guest's writes to this disk at `bytes_per_sec` (None: no cap).
    fn limit_writes(&self, bytes_per_sec: Option<u64>);
    /// Reads `buf.len()` bytes at `offset` of the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String>;
}

/// Where an arriving stream's disk records go, on the destination.
pub trait DiskTarget {
    /// The size of each disk, in the order of the offer.
    fn sizes(&self) -> Vec<u64>;
    /// Disk `disk` holds `data` at `offset`.
    fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Disk `disk` reads as zeros in `range`.
    fn zero(&mut self, disk: u32, range: Range<u64>) -> Result<(), String>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), String>;
}

/// Runs between two disk records with the bytes left in the pass or round and the bytes
/// sent so far: progress, cancel, the peer.
pub(crate) type Between<'a, T> =
    dyn FnMut(&mut SnapshotWriter<Channel<T>>, u64, u64) -> Result<(), MigrationError> + 'a;

/// What a pass or round of the disks sent.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DiskTally {
    /// Data bytes sent.
    pub bytes: u64,
    /// Bytes sent as zero runs (rounds) or skipped (the bulk pass).
    pub zero_bytes: u64,
}

impl DiskTally {
    /// The tally as a count of 4 KiB pages, for the convergence policy.
    pub fn pages(&self) -> u64 {
        (self.bytes + self.zero_bytes).div_ceil(4096)
    }
}

/// The disks being copied, and what is left to send of them.
pub(crate) struct DiskCopy {
    disks: Vec<Arc<dyn SourceDisk>>,
    /// Per disk: byte ranges to send in the next round.
    pending: Vec<Vec<Range<u64>>>,
    buf: Vec<u8>,
    bulk: DiskTally,
    bulk_seconds: f64,
    rounds: Vec<u64>,
    skipped: u64,
    /// Data bytes sent so far.
    sent: u64,
    /// Bytes allocated in the images when the bulk pass began.
    allocated: u64,
    /// Per disk: the rate the guest wrote at over the last round, bytes per second.
    write_rates: Vec<f64>,
    last_take: Instant,
}

/// The least a throttled guest may still write to a disk, bytes per second.
const MIN_WRITE_RATE: f64 = 1048576.0;

impl DiskCopy {
    pub fn new(disks: Vec<Arc<dyn SourceDisk>>) -> DiskCopy {
        DiskCopy {
            pending: vec![Vec::new(); disks.len()],
            disks,
            buf: vec![0; CHUNK],
            bulk: DiskTally::default(),
            bulk_seconds: 0.0,
            rounds: Vec::new(),
            skipped: 0,
            sent: 0,
            allocated: 0,
            write_rates: Vec::new(),
            last_take: Instant::now(),
        }
    }

    /// Bytes allocated in the images when the bulk pass began.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Slows the guest's disk writes as auto-converge slows its vCPUs: to `100 - percent`
    /// percent of the rate it wrote at over the last round (at least 1 MiB/s); no cap at 0.
    pub fn throttle(&mut self, percent: u8) {
        for (disk, rate) in self.disks.iter().zip(&self.write_rates) {
            let cap = (percent > 0).then(|| {
                (rate * f64::from(100 - percent.min(100)) / 100.0).max(MIN_WRITE_RATE) as u64
            });
            disk.limit_writes(cap);
        }
    }

    /// Lifts the caps on the guest's writes (before the pause: a write waiting for its turn
    /// would hold the pause up).
    pub fn unthrottle(&mut self) {
        for disk in &self.disks {
            disk.limit_writes(None);
        }
    }

    /// Data bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Starts every disk's write log. Before the bulk pass looks at the extents: a block
    /// written in between is then in both, never in neither.
    pub fn start(&mut self) {
        for disk in &self.disks {
            disk.start_write_log();
        }
    }

    /// Stops every disk's write log (the migration is over, or failed).
    pub fn stop(&mut self) {
        for disk in &self.disks {
            disk.stop_write_log();
        }
    }

    /// The bulk pass: every allocated block of every image that is not all zero.
    /// `between(w, bytes left)` runs between records (progress, cancel, the peer).
    pub fn send_bulk<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        between: &mut Between<'_, T>,
    ) -> Result<DiskTally, MigrationError> {
        let started = Instant::now();
        let extents: Vec<Vec<Range<u64>>> = self
            .disks
            .iter()
            .map(|d| d.allocated().map_err(|e| disk_err(d.as_ref(), e)))
            .collect::<Result<_, _>>()?;
        self.allocated = extents.iter().flatten().map(|r| r.end - r.start).sum();
        let tally = self.send_ranges(w, &extents, false, between)?;
        self.bulk = tally;
        self.bulk_seconds = started.elapsed().as_secs_f64();
        self.skipped += tally.zero_bytes;
        Ok(tally)
    }

    /// Adds the blocks written since the last look to what the next round sends; returns
    /// the bytes it will send.
    pub fn take_written(&mut self) -> u64 {
        let seconds = self.last_take.elapsed().as_secs_f64().max(1e-3);
        self.last_take = Instant::now();
        self.write_rates.clear();
        for (disk, pending) in self.disks.iter().zip(self.pending.iter_mut()) {
            let written = blocks_to_ranges(&disk.take_written(), disk.block_size(), disk.size());
            let bytes: u64 = written.iter().map(|r| r.end - r.start).sum();
            self.write_rates.push(bytes as f64 / seconds);
            *pending = merge(std::mem::take(pending), written);
        }
        self.pending_bytes()
    }

    /// Bytes the next round sends.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.iter().flatten().map(|r| r.end - r.start).sum()
    }

    /// Sends what was written (as taken by [`DiskCopy::take_written`]): data, or zero runs
    /// for blocks that read as zeros now.
    pub fn send_round<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        between: &mut Between<'_, T>,
    ) -> Result<DiskTally, MigrationError> {
        let pending = std::mem::replace(&mut self.pending, vec![Vec::new(); self.disks.len()]);
        let tally = self.send_ranges(w, &pending, true, between)?;
        self.rounds.push(tally.bytes);
        Ok(tally)
    }

    /// Sends the byte `ranges` of each disk chunk by chunk (see [`DiskCopy::send_chunk`]).
    fn send_ranges<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        ranges: &[Vec<Range<u64>>],
        send_zeros: bool,
        between: &mut Between<'_, T>,
    ) -> Result<DiskTally, MigrationError> {
        let mut tally = DiskTally::default();
        let mut left: u64 = ranges.iter().flatten().map(|r| r.end - r.start).sum();
        for (index, ranges) in ranges.iter().enumerate() {
            for range in ranges {
                let mut at = range.start;
                while at < range.end {
                    between(w, left, self.sent)?;
                    let len = (range.end - at).min(CHUNK as u64);
                    let t = self.send_chunk(w, index, at, len, send_zeros)?;
                    tally.bytes += t.bytes;
                    tally.zero_bytes += t.zero_bytes;
                    left = left.saturating_sub(len);
                    at += len;
                }
            }
        }
        Ok(tally)
    }

    /// Reads `len` bytes at `offset` of disk `index` and sends its non-zero blocks as DISK
    /// records; its zero blocks as a DISK_ZEROS record if `send_zeros` (the destination may
    /// hold older data there), else not at all.
    fn send_chunk<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        index: usize,
        offset: u64,
        len: u64,
        send_zeros: bool,
    ) -> Result<DiskTally, MigrationError> {
        let disk = self.disks[index].clone();
        let buf = &mut self.buf[..len as usize];
        disk.rearm(offset..offset + len);
        disk.read_at(buf, offset)
            .map_err(|e| disk_err(disk.as_ref(), e))?;
        let mut tally = DiskTally::default();
        let mut zeros: Vec<Range<u64>> = Vec::new();
        let io = |e| MigrationError::io("send disk data", e);
        for (start, end, zero) in zero_split(buf) {
            let at = offset + start as u64;
            if zero {
                tally.zero_bytes += (end - start) as u64;
                push_range(&mut zeros, at..offset + end as u64);
            } else {
                w.disk(index as u32, at, &buf[start..end]).map_err(io)?;
                tally.bytes += (end - start) as u64;
            }
        }
        if send_zeros {
            for part in zeros.chunks(MAX_DISK_ZERO_RUNS) {
                w.disk_zeros(index as u32, part).map_err(io)?;
            }
        }
        self.sent += tally.bytes;
        Ok(tally)
    }

    /// The summary's disk part.
    pub fn summary(&self) -> DiskCopySummary {
        DiskCopySummary {
            disks: self
                .disks
                .iter()
                .map(|d| CopiedDiskSummary {
                    vdev: d.vdev(),
                    size: d.size(),
                    source_path: d.path(),
                    source_removed: false,
                })
                .collect(),
            bulk_bytes: self.bulk.bytes,
            bulk_seconds: self.bulk_seconds,
            round_bytes: self.rounds.clone(),
            bytes_sent: self.sent,
            bytes_skipped: self.skipped,
        }
    }
}

fn disk_err(disk: &dyn SourceDisk, e: String) -> MigrationError {
    MigrationError::Vm(format!("disk {}: {e}", disk.vdev()))
}

/// `buf` cut into stretches of whole zero blocks and of the rest: (start, end, all zero).
/// A short last block counts as data unless it is zero.
fn zero_split(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut parts: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        let start = i * ZERO_BLOCK;
        let end = start + block.len();
        match parts.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => parts.push((start, end, zero)),
        }
    }
    parts
}

/// The byte ranges of the blocks set in `bits` (blocks of `block` bytes of a disk of `size`
/// bytes), merged, in order, whole sectors.
fn blocks_to_ranges(bits: &[u64], block: u64, size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for (w, word) in bits.iter().enumerate() {
        let mut word = *word;
        while word != 0 {
            let bit = word.trailing_zeros() as u64;
            word &= word - 1;
            let start = (w as u64 * 64 + bit) * block;
            if start >= size {
                break;
            }
            let end = (start + block).min(size).next_multiple_of(DISK_SECTOR);
            push_range(&mut out, start..end.min(size.next_multiple_of(DISK_SECTOR)));
        }
    }
    out
}

/// Appends `r` to increasing ranges `out`, joining it to the last if they touch.
fn push_range(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    match out.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => out.push(r),
    }
}

/// The union of two increasing lists of ranges.
fn merge(a: Vec<Range<u64>>, b: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.into_iter().chain(b).collect();
    all.sort_by_key(|r| r.start);
    let mut out = Vec::with_capacity(all.len());
    for r in all {
        push_range(&mut out, r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_found_and_runs_joined() {
        let mut buf = vec![0u8; 5 * ZERO_BLOCK];
        buf[ZERO_BLOCK + 7] = 1;
        buf[2 * ZERO_BLOCK] = 1;
        assert_eq!(
            zero_split(&buf),
            vec![
                (0, ZERO_BLOCK, true),
                (ZERO_BLOCK, 3 * ZERO_BLOCK, false),
                (3 * ZERO_BLOCK, 5 * ZERO_BLOCK, true)
            ]
        );
        assert_eq!(zero_split(&[0u8; 512]), vec![(0, 512, true)]);
    }

    #[test]
    fn written_blocks_become_merged_ranges_within_the_disk() {
        let mut bits = vec![0u64; 2];
        bits[0] = 0b1011;
        bits[1] = 1 << 1; // block 65
        let ranges = blocks_to_ranges(&bits, 4096, 65 * 4096 + 1024);
        assert_eq!(
            ranges,
            vec![0..8192, 3 * 4096..4 * 4096, 65 * 4096..65 * 4096 + 1024]
        );
        assert_eq!(
            merge(vec![0..10, 20..30], vec![5..12, 30..40, 50..60]),
            vec![0..12, 20..40, 50..60]
        );
    }
}
