//! The disk workload: writes numbered, checksummed 4 KiB blocks over an area of the disk at a
//! given rate and reads every written block back once per verification period, comparing it
//! with the generation the guest remembers for it (kept in guest memory, like the memory
//! writer's page generations).
//!
//! Block layout (little endian), for block `b` at generation `g` (g >= 1):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | `TERNBLK1` |
//! | 8..16 | `b` |
//! | 16..24 | `g` |
//! | 24..28 | CRC-32 (IEEE) of bytes 32..4096 |
//! | 28..32 | zero |
//! | 32..4096 | 508 words, word `j` = `payload_word(b, g, j)` |
//!
//! Generation 0 means "never written since boot": such a block is not read back (the disk may
//! hold anything there, e.g. blocks of an earlier boot). A write that fails leaves its blocks at
//! generation 0 (their content is unknown). Writes and reads never overlap in flight, so a read
//! always sees a block whose generation is settled.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::blk::{Op, VirtioBlk, NO_STATUS, SECTOR, SLOTS, SLOT_BYTES, S_OK};

pub const BLOCK: u64 = 4096;
const BLOCK_BYTES: usize = BLOCK as usize;
const HEADER: usize = 32;
const WORDS: usize = (BLOCK_BYTES - HEADER) / 8;
pub const MAGIC: &[u8; 8] = b"TERNBLK1";

/// Largest area the workload keeps generations for (1 GiB of blocks: 1 MiB of table).
pub const MAX_BLOCKS: usize = 1 << 18;
static mut GENS: [u32; MAX_BLOCKS] = [0; MAX_BLOCKS];

/// Blocks written and verified, and failures (mismatches and I/O errors), since boot.
pub static WRITTEN: AtomicU64 = AtomicU64::new(0);
pub static VERIFIED: AtomicU64 = AtomicU64::new(0);
pub static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Mismatch and I/O error lines printed at most; later ones are only counted.
const MAX_REPORTS: u64 = 8;
/// Work is submitted in batches of at least this much time's worth (or a full request), so
/// that a slow rate does not cost a wake-up per block.
const BATCH_NS: u64 = 20_000_000;
/// Unpaid work older than this is forgiven (see memtest): a paused guest does not burst.
const MAX_DEBT_NS: u64 = 100_000_000;
/// Written data is flushed at least this often (and after each pass over the area).
const FLUSH_NS: u64 = 1_000_000_000;
/// Without interrupts, how often to look for completions.
const POLL_NS: u64 = 1_000_000;

/// Word `j` of the payload of block `b` at generation `g` (the same function as
/// `tern_testguest::disk_block`).
pub fn payload_word(b: u64, g: u64, j: u64) -> u64 {
    let seed = b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (g << 20) ^ 0xd15c_b10c;
    (seed ^ (j + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)).wrapping_mul(0x94d0_49bb_1331_11eb)
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 (IEEE 802.3, as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn fill_block(out: &mut [u8], b: u64, g: u64) {
    for (j, w) in out[HEADER..BLOCK_BYTES].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&payload_word(b, g, j as u64).to_le_bytes());
    }
    let crc = crc32(&out[HEADER..BLOCK_BYTES]);
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&b.to_le_bytes());
    out[16..24].copy_from_slice(&g.to_le_bytes());
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out[28..32].fill(0);
}

fn le64(s: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[..8]);
    u64::from_le_bytes(b)
}

/// What is wrong with a block read back, if anything.
fn check_block(data: &[u8], b: u64, g: u64) -> Option<Mismatch> {
    let found_block = le64(&data[8..16]);
    let found_gen = le64(&data[16..24]);
    let crc_ok = crc32(&data[HEADER..BLOCK_BYTES])
        == u32::from_le_bytes([data[24], data[25], data[26], data[27]]);
    let reason = if &data[0..8] != MAGIC {
        "magic"
    } else if found_block != b {
        "block"
    } else if found_gen != g {
        "generation"
    } else if !crc_ok {
        "crc"
    } else if data[28..32] != [0; 4] {
        "header"
    } else {
        let bad = (0..WORDS).find(|&j| {
            le64(&data[HEADER + 8 * j..HEADER + 8 * j + 8]) != payload_word(b, g, j as u64)
        });
        match bad {
            Some(j) => {
                return Some(Mismatch {
                    reason: "payload",
                    found_block,
                    found_gen,
                    crc_ok,
                    offset: Some(HEADER + 8 * j),
                })
            }
            None => return None,
        }
    };
    Some(Mismatch {
        reason,
        found_block,
        found_gen,
        crc_ok,
        offset: None,
    })
}

struct Mismatch {
    reason: &'static str,
    found_block: u64,
    found_gen: u64,
    crc_ok: bool,
    offset: Option<usize>,
}

fn next_gen(g: u32) -> u32 {
    g.wrapping_add(1).max(1)
}

/// A request in flight: which blocks it covers.
#[derive(Clone, Copy)]
struct Pending {
    op: Op,
    first: u64,
    count: u64,
}

/// Workload settings.
pub struct Settings {
    /// Area size in blocks (from block 0 of the disk).
    pub blocks: u64,
    pub kibps: u64,
    pub verify_ms: u64,
}

pub struct Disk {
    blk: VirtioBlk,
    gens: &'static mut [u32],
    blocks: u64,
    per_request: u64,
    write_rate: u64,
    verify_rate: u64,
    start_ns: u64,
    writes_done: u64,
    verifies_done: u64,
    write_cursor: u64,
    verify_cursor: u64,
    pending: [Option<Pending>; SLOTS],
    unflushed: bool,
    pass_done: bool,
    flushing: bool,
    last_flush_ns: u64,
    /// The device's interrupt reaches the CPU that runs the workload.
    irq: bool,
}

impl Disk {
    /// The area that fits the device and the generation table, in blocks.
    pub fn area_blocks(blk: &VirtioBlk, mib: u64) -> u64 {
        let disk_blocks = blk.capacity.saturating_mul(SECTOR) / BLOCK;
        (mib.saturating_mul(1 << 20) / BLOCK)
            .min(disk_blocks)
            .min(MAX_BLOCKS as u64)
    }

    /// The workload on `blk` (once: the generation table is a static).
    pub fn new(blk: VirtioBlk, s: &Settings, now_ns: u64) -> Disk {
        // SAFETY: called once (the block device, which is needed to call it, exists once).
        let gens = unsafe { &mut *addr_of_mut!(GENS) };
        let blocks = s.blocks.min(MAX_BLOCKS as u64);
        let per_request = (blk.max_bytes.min(SLOT_BYTES) / BLOCK_BYTES).max(1) as u64;
        let write_rate = if blk.read_only || s.kibps == 0 {
            0
        } else {
            (s.kibps / 4).max(1)
        };
        let verify_rate = if blocks == 0 {
            0
        } else {
            (blocks * 1000 / s.verify_ms.max(1)).max(1)
        };
        Disk {
            blk,
            gens: &mut gens[..blocks as usize],
            blocks,
            per_request,
            write_rate,
            verify_rate,
            start_ns: now_ns,
            writes_done: 0,
            verifies_done: 0,
            write_cursor: 0,
            verify_cursor: 0,
            pending: [None; SLOTS],
            unflushed: false,
            pass_done: false,
            flushing: false,
            last_flush_ns: now_ns,
            irq: false,
        }
    }

    /// Records whether the device's interrupt was routed to the workload's CPU.
    pub fn set_irq(&mut self, irq: bool) {
        self.irq = irq;
    }

    /// Work due by `now` at `rate` per second, `done` so far; forgives debt older than
    /// MAX_DEBT_NS.
    fn due(rate: u64, start: u64, now: u64, done: &mut u64) -> u64 {
        if rate == 0 {
            return 0;
        }
        let target =
            (u128::from(now.saturating_sub(start)) * u128::from(rate) / 1_000_000_000) as u64;
        let max_debt = (u128::from(rate) * u128::from(MAX_DEBT_NS) / 1_000_000_000) as u64 + 1;
        if target > *done + max_debt {
            *done = target - max_debt;
        }
        target.saturating_sub(*done)
    }

    /// Smallest amount of work worth a wake-up at `rate`: BATCH_NS worth, at most what half
    /// the request slots carry.
    fn batch(&self, rate: u64) -> u64 {
        let most = self.per_request * (SLOTS as u64 / 2);
        ((u128::from(rate) * u128::from(BATCH_NS) / 1_000_000_000) as u64).clamp(1, most)
    }

    fn overlaps(&self, op: Op, first: u64, count: u64) -> bool {
        self.pending.iter().flatten().any(|p| {
            p.op != op && p.op != Op::Flush && first < p.first + p.count && p.first < first + count
        })
    }

    /// Reaps completions, then submits whatever writing, verifying and flushing is due.
    pub fn step(&mut self, now: u64) {
        if self.blocks == 0 || self.blk.is_broken() {
            return;
        }
        while let Some((slot, status)) = self.blk.complete() {
            if let Some(p) = self.pending.get_mut(slot).and_then(Option::take) {
                self.completed(slot, p, status);
            }
        }
        self.submit_writes(now);
        self.submit_verifies(now);
        if self.blk.can_flush
            && self.unflushed
            && !self.flushing
            && (self.pass_done || now.saturating_sub(self.last_flush_ns) >= FLUSH_NS)
        {
            if let Some(slot) = self.blk.free_slot() {
                self.blk.submit(slot, Op::Flush, 0, 0);
                self.pending[slot] = Some(Pending {
                    op: Op::Flush,
                    first: 0,
                    count: 0,
                });
                self.flushing = true;
                self.unflushed = false;
                self.pass_done = false;
                self.last_flush_ns = now;
            }
        }
        self.blk.kick();
    }

    fn submit_writes(&mut self, now: u64) {
        let mut due = Self::due(self.write_rate, self.start_ns, now, &mut self.writes_done);
        if due < self.batch(self.write_rate) {
            return;
        }
        while due > 0 {
            let first = self.write_cursor;
            let count = due.min(self.per_request).min(self.blocks - first);
            if self.overlaps(Op::Write, first, count) {
                return; // wait for the read of these blocks
            }
            let Some(slot) = self.blk.free_slot() else {
                return;
            };
            let data = self.blk.data(slot);
            for k in 0..count {
                let b = first + k;
                let g = next_gen(self.gens[b as usize]);
                let off = k as usize * BLOCK_BYTES;
                fill_block(&mut data[off..off + BLOCK_BYTES], b, u64::from(g));
            }
            self.blk.submit(
                slot,
                Op::Write,
                first * (BLOCK / SECTOR),
                (count * BLOCK) as usize,
            );
            self.pending[slot] = Some(Pending {
                op: Op::Write,
                first,
                count,
            });
            self.writes_done += count;
            due -= count;
            self.write_cursor += count;
            if self.write_cursor == self.blocks {
                self.write_cursor = 0;
                self.pass_done = true;
            }
        }
    }

    fn submit_verifies(&mut self, now: u64) {
        let mut due = Self::due(
            self.verify_rate,
            self.start_ns,
            now,
            &mut self.verifies_done,
        );
        if due < self.batch(self.verify_rate) {
            return;
        }
        while due > 0 {
            let first = self.verify_cursor;
            // Never-written blocks are passed over without I/O.
            if self.gens[first as usize] == 0 {
                self.advance_verify(1);
                due -= 1;
                continue;
            }
            let mut count = 1;
            let limit = due.min(self.per_request).min(self.blocks - first);
            while count < limit && self.gens[(first + count) as usize] != 0 {
                count += 1;
            }
            if self.overlaps(Op::Read, first, count) {
                return; // wait for the write of these blocks
            }
            let Some(slot) = self.blk.free_slot() else {
                return;
            };
            self.blk.submit(
                slot,
                Op::Read,
                first * (BLOCK / SECTOR),
                (count * BLOCK) as usize,
            );
            self.pending[slot] = Some(Pending {
                op: Op::Read,
                first,
                count,
            });
            self.advance_verify(count);
            due -= count;
        }
    }

    fn advance_verify(&mut self, n: u64) {
        self.verifies_done += n;
        self.verify_cursor += n;
        if self.verify_cursor >= self.blocks {
            self.verify_cursor = 0;
        }
    }

    fn completed(&mut self, slot: usize, p: Pending, status: u8) {
        if status != S_OK {
            let n = ERRORS.fetch_add(1, Ordering::Relaxed);
            if n < MAX_REPORTS {
                let what = if status == NO_STATUS {
                    "no status"
                } else {
                    "error status"
                };
                crate::println!(
                    "DISK IO ERROR op={:?} block={} count={} status={status} ({what})",
                    p.op,
                    p.first,
                    p.count
                );
            }
            match p.op {
                // The blocks now hold who knows what: unwritten again.
                Op::Write => self.gens[p.first as usize..(p.first + p.count) as usize].fill(0),
                Op::Flush => {
                    self.flushing = false;
                    self.unflushed = true;
                }
                Op::Read => {}
            }
            return;
        }
        match p.op {
            Op::Write => {
                for g in &mut self.gens[p.first as usize..(p.first + p.count) as usize] {
                    *g = next_gen(*g);
                }
                self.unflushed = true;
                WRITTEN.fetch_add(p.count, Ordering::Relaxed);
            }
            Op::Read => {
                let mut verified = 0;
                for k in 0..p.count {
                    let b = p.first + k;
                    let g = self.gens[b as usize];
                    if g == 0 {
                        continue;
                    }
                    let off = k as usize * BLOCK_BYTES;
                    let data = &self.blk.data(slot)[off..off + BLOCK_BYTES];
                    match check_block(data, b, u64::from(g)) {
                        None => verified += 1,
                        Some(m) => report(b, g, &m),
                    }
                }
                VERIFIED.fetch_add(verified, Ordering::Relaxed);
            }
            Op::Flush => self.flushing = false,
        }
    }

    /// Nanoseconds until the workload next needs to run.
    pub fn next_due_in(&self, now: u64) -> u64 {
        if self.blocks == 0 || self.blk.is_broken() {
            return u64::MAX;
        }
        let next = |rate: u64, done: u64, batch: u64| -> u64 {
            if rate == 0 {
                return u64::MAX;
            }
            let at = self.start_ns
                + ((u128::from(done + batch) * 1_000_000_000) / u128::from(rate)) as u64;
            at.saturating_sub(now)
        };
        let mut due = next(
            self.write_rate,
            self.writes_done,
            self.batch(self.write_rate),
        )
        .min(next(
            self.verify_rate,
            self.verifies_done,
            self.batch(self.verify_rate),
        ));
        if self.blk.in_flight() > 0 && !self.irq {
            due = due.min(POLL_NS);
        }
        if self.blk.can_flush && self.unflushed && !self.flushing {
            due = due.min((self.last_flush_ns + FLUSH_NS).saturating_sub(now));
        }
        due
    }

    /// See `VirtioNet::arm`.
    pub fn arm(&mut self) -> bool {
        if !self.irq {
            return true;
        }
        self.blk.arm()
    }

    pub fn disarm(&mut self) {
        if self.irq {
            self.blk.disarm();
        }
    }
}

fn report(b: u64, g: u32, m: &Mismatch) {
    let n = ERRORS.fetch_add(1, Ordering::Relaxed);
    if n >= MAX_REPORTS {
        return;
    }
    match m.offset {
        Some(off) => crate::println!(
            "DISK MISMATCH block={b} gen={g} reason={} found_block={} found_gen={} crc_ok={} offset={off}",
            m.reason, m.found_block, m.found_gen, m.crc_ok
        ),
        None => crate::println!(
            "DISK MISMATCH block={b} gen={g} reason={} found_block={} found_gen={} crc_ok={}",
            m.reason, m.found_block, m.found_gen, m.crc_ok
        ),
    }
}
