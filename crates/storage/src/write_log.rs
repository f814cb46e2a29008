//! Which blocks of a disk the guest wrote: what a migration that copies the disk while the
//! guest runs must send again.
//!
//! The disk's request worker marks the blocks a write covered once the write is done; the
//! migration takes the marks (clearing them) and then reads those blocks. A write that lands
//! after the read is marked after it, so it shows in the next take; one that lands between
//! the take and the read is read already and sent once more, which is harmless. Nothing
//! written is ever missed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The written blocks of a disk of `size` bytes, in blocks of `block_size` bytes (a power of
/// two), while the log is on. Shared between the disk's worker and a migration.
#[derive(Debug)]
pub struct WriteLog {
    block_size: u64,
    size: u64,
    on: AtomicBool,
    /// Bit i of word w: block `w * 64 + i` was written.
    words: Vec<AtomicU64>,
    /// A cap on the guest's write rate, while a migration slows the guest down.
    limit: Mutex<Option<Bucket>>,
}

/// A token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    bytes_per_sec: f64,
    tokens: f64,
    at: Instant,
}

/// The most a bucket holds: 20 ms of its rate (a burst the guest may write at once).
const BURST_SECONDS: f64 = 0.02;
/// The longest a throttled write sleeps before it looks whether the cap was lifted.
pub const WAIT_STEP: Duration = Duration::from_millis(2);

impl WriteLog {
    /// An empty log, off.
    pub fn new(size: u64, block_size: u64) -> WriteLog {
        assert!(block_size.is_power_of_two(), "block size {block_size}");
        let blocks = size.div_ceil(block_size);
        WriteLog {
            block_size,
            size,
            on: AtomicBool::new(false),
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            limit: Mutex::new(None),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks of the disk (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// Starts logging, with no block marked.
    pub fn start(&self) {
        self.clear();
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops logging and forgets the marks.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
        self.clear();
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// The guest wrote `len` bytes at `offset` (the write is done). Parts outside the disk
    /// are ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.is_on() {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset / self.block_size;
        let last = (end - 1) / self.block_size;
        for block in first..=last {
            if let Some(word) = self.words.get((block / 64) as usize) {
                word.fetch_or(1 << (block % 64), Ordering::SeqCst);
            }
        }
    }

    /// Forgets the marks of the blocks wholly inside `len` bytes at `offset`: the migration
    /// is about to read them, so what was written there so far goes with the read; a write
    /// after this marks them again.
    pub fn clear_range(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(self.block_size);
        let end = offset.saturating_add(len).min(self.size) / self.block_size;
        for block in first..end {
            if let Some(word) = self.words.get((block / 64) as usize) {
                word.fetch_and(!(1 << (block % 64)), Ordering::SeqCst);
            }
        }
    }

    /// Caps the guest's writes at `bytes_per_sec` (None: no cap), as a migration's
    /// auto-converge slows the guest down.
    pub fn set_limit(&self, bytes_per_sec: Option<u64>) {
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        *limit = bytes_per_sec.map(|rate| Bucket {
            bytes_per_sec: rate.max(1) as f64,
            tokens: rate as f64 * BURST_SECONDS,
            at: Instant::now(),
        });
    }

    /// How long a write of `len` bytes must wait under the cap (zero without one); the
    /// writer waits that long before it writes.
    pub fn delay(&self, len: u64) -> Duration {
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bucket) = limit.as_mut() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let burst = bucket.bytes_per_sec * BURST_SECONDS;
        let refill = now.duration_since(bucket.at).as_secs_f64() * bucket.bytes_per_sec;
        bucket.tokens = (bucket.tokens + refill).min(burst.max(len as f64));
        bucket.at = now;
        bucket.tokens -= len as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / bucket.bytes_per_sec)
        }
    }

    /// Waits as long as a write of `len` bytes must under the cap, in short steps, so that
    /// lifting the cap (as a migration does before it pauses the guest) ends the wait within
    /// [`WAIT_STEP`].
    pub fn throttle(&self, len: u64) {
        let until = Instant::now() + self.delay(len);
        loop {
            let now = Instant::now();
            if now >= until || !self.is_limited() {
                return;
            }
            std::thread::sleep((until - now).min(WAIT_STEP));
        }
    }

    fn is_limited(&self) -> bool {
        self.limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The blocks marked since the last take (bit i of word w: block `w * 64 + i`), clearing
    /// them.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }

    fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 64 << 10;

    fn marked(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64)
            .filter(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
            .collect()
    }

    #[test]
    fn writes_mark_the_blocks_they_cover_while_on() {
        let log = WriteLog::new(100 * BLOCK + 512, BLOCK);
        assert_eq!(log.blocks(), 101);
        log.mark(0, 512);
        assert!(marked(&log.take()).is_empty(), "off: nothing marked");
        log.start();
        log.mark(BLOCK - 512, 1024); // straddles blocks 0 and 1
        log.mark(70 * BLOCK, 1);
        log.mark(100 * BLOCK, 512); // the short last block
        log.mark(101 * BLOCK, 4096); // past the end: ignored
        log.mark(5 * BLOCK, 0);
        assert_eq!(marked(&log.take()), vec![0, 1, 70, 100]);
        assert!(marked(&log.take()).is_empty(), "a take clears");
        log.mark(3 * BLOCK, 1);
        log.stop();
        assert!(marked(&log.take()).is_empty(), "stop forgets");
        assert!(!log.is_on());
    }

    #[test]
    fn a_cleared_range_forgets_only_its_whole_blocks() {
        let log = WriteLog::new(8 * BLOCK, BLOCK);
        log.start();
        for b in 0..8 {
            log.mark(b * BLOCK, 1);
        }
        log.clear_range(BLOCK + 512, 3 * BLOCK); // blocks 2 and 3 whole, 1 and 4 in part
        assert_eq!(marked(&log.take()), vec![0, 1, 4, 5, 6, 7]);
    }

    #[test]
    fn a_write_limit_delays_writes_past_its_rate() {
        let log = WriteLog::new(BLOCK, BLOCK);
        assert_eq!(log.delay(1 << 20), Duration::ZERO, "no limit");
        log.set_limit(Some(10 << 20));
        let first = log.delay(1 << 20);
        let second = log.delay(1 << 20);
        // 1 MiB at 10 MiB/s is 100 ms; the bucket's burst (20 ms) goes first.
        assert!(first > Duration::from_millis(60) && first < Duration::from_millis(100));
        assert!(second > Duration::from_millis(150), "{second:?}");
        log.set_limit(None);
        assert_eq!(log.delay(1 << 20), Duration::ZERO);
    }

    #[test]
    fn nothing_written_is_missed_by_a_take_racing_the_writes() {
        let log = std::sync::Arc::new(WriteLog::new(4096 * BLOCK, BLOCK));
        log.start();
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    log.mark((i % 4096) * BLOCK, 1);
                }
            })
        };
        let mut seen = vec![0u64; 64];
        while !writer.is_finished() {
            for (s, w) in seen.iter_mut().zip(log.take()) {
                *s |= w;
            }
        }
        writer.join().unwrap();
        for (s, w) in seen.iter_mut().zip(log.take()) {
            *s |= w;
        }
        assert_eq!(marked(&seen).len(), 4096);
    }
}
