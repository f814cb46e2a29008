//! The memory writer: stamps every page of a working set with content that is a function of
//! (page, generation), at a given rate, and verifies every page against the generation it
//! remembers. A page never written (generation 0) must read as zeros.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::MAX_CPUS;

pub const PAGE: u64 = 4096;
const WORDS: usize = 512;

/// Layout shared by all CPUs (set by the boot CPU before the others start).
#[derive(Clone, Copy)]
pub struct WorkingSet {
    /// Base of the generation table: one u32 per page.
    pub gens: u64,
    /// Base of the pages (2 MiB aligned).
    pub base: u64,
    /// Number of pages.
    pub pages: u64,
}

pub static WRITTEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
pub static VERIFIED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
pub static PASSES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
pub static ERRORS: AtomicU64 = AtomicU64::new(0);

#[inline]
fn word(page: u64, gen: u32, i: usize) -> u64 {
    if i == 0 {
        // Readable header, to make a mismatch report self-explanatory.
        return (page << 32) | u64::from(gen);
    }
    let seed = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(gen) << 17) ^ 0x7e57_9e57;
    (seed ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)).wrapping_mul(0x94d0_49bb_1331_11eb)
}

/// One CPU's share of the working set and its pacing state.
pub struct Share {
    cpu: usize,
    ws: WorkingSet,
    first: u64,
    count: u64,
    write_cursor: u64,
    verify_cursor: u64,
    /// Pages per second for writing and verifying.
    write_rate: u64,
    verify_rate: u64,
    start_ns: u64,
    writes_done: u64,
    verifies_done: u64,
    /// Pages still to write before the writer stops (`u64::MAX`: never stops).
    writes_left: u64,
}

/// Most pages handled in one step (a step also breaks off when a heartbeat is due).
const STEP_PAGES: u64 = 64;
/// Unpaid work older than this is forgiven: a guest slowed down (paused, throttled) does
/// not catch up in a burst.
const MAX_DEBT_NS: u64 = 100_000_000;

impl Share {
    pub fn new(
        cpu: usize,
        cpus: usize,
        ws: WorkingSet,
        write_mibps: u64,
        verify_ms: u64,
        now: u64,
    ) -> Self {
        let per = ws.pages / cpus as u64;
        let first = per * cpu as u64;
        let count = if cpu + 1 == cpus {
            ws.pages - first
        } else {
            per
        };
        let write_rate = if write_mibps == u64::MAX {
            u64::MAX
        } else {
            write_mibps * (1 << 20) / PAGE / cpus as u64
        };
        let verify_rate = if count == 0 {
            0
        } else {
            (count * 1000 / verify_ms.max(1)).max(1)
        };
        Share {
            cpu,
            ws,
            first,
            count,
            write_cursor: 0,
            verify_cursor: 0,
            write_rate,
            verify_rate,
            start_ns: now,
            writes_done: 0,
            verifies_done: 0,
            writes_left: u64::MAX,
        }
    }

    /// Writes every page of CPU `cpu`'s share once, as fast as it can: a working set in use
    /// from the start, as a guest's memory after it has been up a while. The pages are then
    /// at generation 1, which the verifier expects; the paced writer goes on from there.
    pub fn prefill(cpu: usize, cpus: usize, ws: WorkingSet) {
        let share = Share::new(cpu, cpus, ws, 0, 1000, 0);
        for page in share.first..share.first + share.count {
            share.write_page(page);
        }
        WRITTEN[cpu].fetch_add(share.count, Ordering::Relaxed);
    }

    /// Stops the writer after `passes` passes over this share (0: never).
    pub fn limit_write_passes(&mut self, passes: u64) {
        if passes > 0 {
            self.writes_left = passes.saturating_mul(self.count);
        }
    }

    fn gen_ptr(&self, page: u64) -> *mut u32 {
        (self.ws.gens + page * 4) as *mut u32
    }

    fn page_ptr(&self, page: u64) -> *mut u64 {
        (self.ws.base + page * PAGE) as *mut u64
    }

    fn due(rate: u64, start: u64, now: u64, done: &mut u64) -> u64 {
        if rate == 0 {
            return 0;
        }
        if rate == u64::MAX {
            return STEP_PAGES;
        }
        let target =
            (u128::from(now.saturating_sub(start)) * u128::from(rate) / 1_000_000_000) as u64;
        let max_debt = (u128::from(rate) * u128::from(MAX_DEBT_NS) / 1_000_000_000) as u64 + 1;
        if target > *done + max_debt {
            *done = target - max_debt;
        }
        target.saturating_sub(*done).min(STEP_PAGES)
    }

    /// Nanoseconds until the next page is due (0 if one is due now, `u64::MAX` if never).
    pub fn next_due_in(&self, now: u64) -> u64 {
        let next = |rate: u64, done: u64| -> u64 {
            if rate == 0 || self.count == 0 {
                return u64::MAX;
            }
            if rate == u64::MAX {
                return 0;
            }
            let at =
                self.start_ns + ((u128::from(done + 1) * 1_000_000_000) / u128::from(rate)) as u64;
            at.saturating_sub(now)
        };
        let write_rate = if self.writes_left == 0 {
            0
        } else {
            self.write_rate
        };
        next(write_rate, self.writes_done).min(next(self.verify_rate, self.verifies_done))
    }

    /// Does whatever writing and verifying is due at `now`, breaking off at guest time
    /// `until` (CPU 0's next heartbeat): a timer interrupt would preempt a real guest's work
    /// there, and a heartbeat that waited for a whole step would measure the step's length
    /// (long when every write takes a fault and the vCPU is throttled), not the guest's.
    pub fn step(&mut self, now: u64, until: u64) {
        if self.count == 0 {
            return;
        }
        let rate = if self.writes_left == 0 {
            0
        } else {
            self.write_rate
        };
        let due = Self::due(rate, self.start_ns, now, &mut self.writes_done).min(self.writes_left);
        let mut writes = 0;
        while writes < due && !self.past(until) {
            let page = self.first + self.write_cursor;
            self.write_page(page);
            self.write_cursor = (self.write_cursor + 1) % self.count;
            writes += 1;
        }
        if self.writes_left != u64::MAX {
            self.writes_left -= writes;
        }
        self.writes_done += writes;
        WRITTEN[self.cpu].fetch_add(writes, Ordering::Relaxed);

        let due = Self::due(
            self.verify_rate,
            self.start_ns,
            now,
            &mut self.verifies_done,
        );
        let mut verifies = 0;
        while verifies < due && !self.past(until) {
            let page = self.first + self.verify_cursor;
            self.verify_page(page);
            self.verify_cursor += 1;
            if self.verify_cursor == self.count {
                self.verify_cursor = 0;
                PASSES[self.cpu].fetch_add(1, Ordering::Relaxed);
            }
            verifies += 1;
        }
        self.verifies_done += verifies;
        VERIFIED[self.cpu].fetch_add(verifies, Ordering::Relaxed);
    }

    fn past(&self, until: u64) -> bool {
        until != u64::MAX && crate::clock::now_ns(self.cpu) >= until
    }

    fn write_page(&self, page: u64) {
        unsafe {
            let gen = self.gen_ptr(page).read_volatile().wrapping_add(1).max(1);
            let p = self.page_ptr(page);
            for i in 0..WORDS {
                p.add(i).write_volatile(word(page, gen, i));
            }
            self.gen_ptr(page).write_volatile(gen);
        }
    }

    fn verify_page(&self, page: u64) {
        unsafe {
            let gen = self.gen_ptr(page).read_volatile();
            let p = self.page_ptr(page);
            for i in 0..WORDS {
                let found = p.add(i).read_volatile();
                let expected = if gen == 0 { 0 } else { word(page, gen, i) };
                if found != expected {
                    let n = ERRORS.fetch_add(1, Ordering::Relaxed);
                    if n < 32 {
                        crate::println!(
                            "MEMORY MISMATCH cpu={} page={} gen={} word={} expected={:#x} found={:#x}",
                            self.cpu, page, gen, i, expected, found
                        );
                    }
                    return;
                }
            }
        }
    }
}

/// Verification passes completed over the whole working set (every CPU's share).
pub fn full_passes(cpus: usize) -> u64 {
    PASSES[..cpus.clamp(1, MAX_CPUS)]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0)
}

pub fn total(counters: &[AtomicU64]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}
