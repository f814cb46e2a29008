//! Which blocks of a disk the guest wrote: what a migration that copies the disk while the
//! guest runs must send again.
//!
//! The disk's request worker marks the blocks a write covered once the write is done; the
//! migration takes the marks (clearing them) and then reads those blocks. A write that lands
//! after the read is marked after it, so it shows in the next take; one that lands between
//! the take and the read is read already and sent once more, which is harmless. Nothing
//! written is ever missed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The written blocks of a disk of `size` bytes, in blocks of `block_size` bytes (a power of
/// two), while the log is on. Shared between the disk's worker and a migration.
#[derive(Debug)]
pub struct WriteLog {
    block_size: u64,
    size: u64,
    on: AtomicBool,
    /// Bit i of word w: block `w * 64 + i` was written.
    words: Vec<AtomicU64>,
}

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
