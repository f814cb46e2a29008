//! When to stop pre-copying: decided from what the rounds measured, not from a fixed count.
//!
//! After each round the engine knows how long the round took, how many bytes it moved (so the
//! rate the whole path sustains, the destination's work included) and how many pages the guest
//! dirtied meanwhile. It stops and copies the rest with the guest paused as soon as those pages
//! can be sent within the downtime budget. Rounds that shrink are left to shrink as long as
//! they would reach the budget in bounded time (within the limits, and no longer than one more
//! pass over memory); only a guest that would not converge so is slowed down (auto-converge,
//! in fine slices: see tern-machine's `throttle`), to the step its measured dirty rate calls
//! for. If the rounds stop shrinking even at the strongest throttle, the pre-copy ends.
//! The number of rounds and the bytes sent are bounded whatever happens.

use std::time::Duration;

use tern_snapshot::PAGE_SIZE;

/// Limits of a live migration.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// The longest the guest may be paused for the last round and the handover.
    pub max_downtime: Duration,
    /// Most pre-copy rounds, the first pass included.
    pub max_rounds: u32,
    /// Most bytes sent before stopping anyway, as a multiple of guest memory.
    pub max_bytes_factor: u64,
    /// Whether to slow the guest down when the rounds stop shrinking.
    pub auto_converge: bool,
    /// The transfer rate cap, bytes per second, if any.
    pub rate_limit: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_downtime: Duration::from_millis(30),
            // Xen's limits: 30 rounds, 3x the guest's memory.
            max_rounds: 30,
            max_bytes_factor: 3,
            auto_converge: true,
            rate_limit: None,
        }
    }
}

/// Time the stop-and-copy needs besides sending pages: capturing and loading CPU and device
/// state and the handover messages. Measured at 2 to 4 ms on the build machine.
pub const FIXED_DOWNTIME: Duration = Duration::from_millis(4);

/// The throttle steps of auto-converge, percent of vCPU time taken away.
pub const THROTTLE_STEPS: [u8; 7] = [20, 40, 60, 80, 90, 95, 99];

/// Rounds that shrink are left to shrink (no throttle) as long as they reach the downtime
/// budget within the round and byte limits and within this long, or the time a whole pass
/// over memory takes if that is longer.
const MIN_TIME_BOUND: Duration = Duration::from_secs(5);
/// What auto-converge aims for: each round at most this share of the one before.
const TARGET_RATIO: f64 = 0.3;
/// A guest only a little over the budget is slowed just enough to reach it in this many
/// rounds.
const ROUNDS_TO_BUDGET: f64 = 3.0;
/// A round is "not shrinking" if the next one would be at least this share of it.
const STALL_RATIO: f64 = 0.9;

/// At most this many rounds are added to shorten a downtime that already fits the budget.
const MAX_REFINEMENTS: u32 = 8;
/// Such a round is worth it if it should leave at most this share of the pages for the
/// pause: the guest's clients feel the pause, not the budget.
const REFINE_RATIO: f64 = 0.75;
/// A stop-and-copy whose pages take less than this to send is not worth another round.
const MIN_WORTH_SHORTENING: Duration = Duration::from_millis(1);

/// What one round measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundMeasure {
    /// Pages the round sent (data or zero runs).
    pub pages: u64,
    /// Bytes the round put on the connection.
    pub bytes: u64,
    /// From its start until the destination acknowledged its end.
    pub seconds: f64,
}

/// Why the pre-copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The remaining pages fit in the downtime budget.
    FitsBudget,
    /// The round limit was reached.
    RoundLimit,
    /// The byte limit was reached.
    ByteLimit,
    /// The rounds stopped shrinking and the guest cannot be slowed further.
    NotConverging,
    /// Not a live migration: everything was sent with the guest paused.
    Warm,
}

impl StopReason {
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::FitsBudget => "the remaining pages fit the downtime budget",
            StopReason::RoundLimit => "the round limit was reached",
            StopReason::ByteLimit => {
                "the byte limit (3x guest memory and copied disks) was reached"
            }
            StopReason::NotConverging => {
                "the guest dirtied memory faster than it could be sent, even slowed down"
            }
            StopReason::Warm => "warm migration: the guest was paused for the whole transfer",
        }
    }
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send another round, with the vCPUs throttled to this many percent (0: not at all).
    Continue { throttle: u8 },
    /// Pause the guest and send the rest.
    Stop(StopReason),
}

/// The convergence state of one live migration.
#[derive(Debug)]
pub struct Convergence {
    limits: Limits,
    memory_bytes: u64,
    rounds: u32,
    /// Transfer rate (bytes per second) of the most recent round big enough to measure it.
    rate: Option<f64>,
    throttle_step: Option<usize>,
    stalled_at_max: u32,
    /// Rounds run although the rest already fitted the budget.
    refinements: u32,
}

/// Rounds smaller than this are too short to measure a rate.
const MIN_MEASURED_BYTES: u64 = 256 << 10;
/// The rate assumed until one is measured (or the cap, if lower): 100 MB/s, a slow LAN.
const ASSUMED_RATE: f64 = 100e6;

impl Convergence {
    pub fn new(limits: Limits, memory_bytes: u64) -> Self {
        Convergence {
            limits,
            memory_bytes,
            rounds: 0,
            rate: None,
            throttle_step: None,
            stalled_at_max: 0,
            refinements: 0,
        }
    }

    /// The rate the rounds so far sustained, bytes per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The rate to plan with: the measured one, or a cautious guess before any round was big
    /// enough to measure; never above the cap.
    fn planning_rate(&self) -> f64 {
        let cap = self.limits.rate_limit.map_or(f64::INFINITY, |r| r as f64);
        self.rate.unwrap_or(ASSUMED_RATE).min(cap)
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle_step.map_or(0, |s| THROTTLE_STEPS[s])
    }

    /// The downtime `pages` would cost at the rate measured so far (or assumed).
    pub fn estimated_downtime(&self, pages: u64) -> Duration {
        let send = (pages * PAGE_SIZE as u64) as f64 / self.planning_rate();
        Duration::from_secs_f64(send) + FIXED_DOWNTIME
    }

    /// Decides after a round that measured `round`, with `dirty` pages dirtied meanwhile and
    /// `total_bytes` sent so far.
    pub fn after_round(&mut self, round: RoundMeasure, dirty: u64, total_bytes: u64) -> Decision {
        self.rounds += 1;
        if round.bytes >= MIN_MEASURED_BYTES && round.seconds > 0.0 {
            self.rate = Some(round.bytes as f64 / round.seconds);
        }
        let within_limits = self.rounds < self.limits.max_rounds
            && total_bytes + dirty * PAGE_SIZE as u64
                <= self.limits.max_bytes_factor * self.memory_bytes;
        if self.estimated_downtime(dirty) <= self.limits.max_downtime {
            if within_limits && self.another_round_pays(round, dirty) {
                self.refinements += 1;
                return Decision::Continue {
                    throttle: self.throttle(),
                };
            }
            return Decision::Stop(StopReason::FitsBudget);
        }
        if self.rounds >= self.limits.max_rounds {
            return Decision::Stop(StopReason::RoundLimit);
        }
        if !within_limits {
            return Decision::Stop(StopReason::ByteLimit);
        }
        // The first pass says little about the dirty rate: it is slowed by the destination
        // touching its memory for the first time, so its rounds look slower than the link.
        let ratio = dirty as f64 / (round.pages.max(1)) as f64;
        if self.rounds > 1 && !self.converges_unaided(ratio, dirty, total_bytes) {
            if let Some(throttle) = self.throttle_harder(ratio, dirty) {
                return Decision::Continue { throttle };
            }
            if ratio >= STALL_RATIO {
                self.stalled_at_max += 1;
                if self.stalled_at_max >= 2 {
                    return Decision::Stop(StopReason::NotConverging);
                }
            }
        }
        Decision::Continue {
            throttle: self.throttle(),
        }
    }

    /// Whether rounds shrinking by `ratio` each (pages dirtied during a round over pages it
    /// sent), starting from `dirty` pages, reach the downtime budget within the limits left
    /// and within [`Convergence::time_bound`]. A guest whose rounds shrink that way is left
    /// alone: slowing it would cost it speed for nothing.
    fn converges_unaided(&self, ratio: f64, dirty: u64, total_bytes: u64) -> bool {
        if ratio >= STALL_RATIO {
            return false;
        }
        let rate = self.planning_rate();
        let budget_pages = self.budget_pages();
        let rounds_needed = ((budget_pages / dirty.max(1) as f64).ln() / ratio.ln())
            .ceil()
            .max(1.0);
        let rounds_left = f64::from(self.limits.max_rounds.saturating_sub(self.rounds));
        // The rounds to come send dirty * (1 + ratio + ratio^2 + ...) pages.
        let pages_to_come = dirty as f64 * (1.0 - ratio.powf(rounds_needed)) / (1.0 - ratio);
        let bytes_to_come = pages_to_come * PAGE_SIZE as f64;
        let byte_room =
            (self.limits.max_bytes_factor * self.memory_bytes).saturating_sub(total_bytes) as f64;
        rounds_needed <= rounds_left
            && bytes_to_come <= byte_room
            && bytes_to_come / rate <= self.time_bound().as_secs_f64()
    }

    /// How long the rest of a pre-copy may take before the guest is slowed down to make it
    /// shorter: as long as sending its whole memory once more, and at least
    /// [`MIN_TIME_BOUND`].
    fn time_bound(&self) -> Duration {
        let pass = self.memory_bytes as f64 / self.planning_rate();
        Duration::from_secs_f64(pass).max(MIN_TIME_BOUND)
    }

    /// Whether one more round, though the rest already fits the budget, would likely shorten
    /// the downtime by a quarter or more: the guest dirties pages slowly compared with the
    /// rate they are sent, so the pages dirtied while these `dirty` ones are sent are fewer.
    /// The budget is an upper bound, not a target; a few more cheap rounds buy a shorter pause.
    fn another_round_pays(&self, round: RoundMeasure, dirty: u64) -> bool {
        if self.refinements >= MAX_REFINEMENTS || round.seconds <= 0.0 {
            return false;
        }
        let send = self
            .estimated_downtime(dirty)
            .saturating_sub(FIXED_DOWNTIME);
        if send < MIN_WORTH_SHORTENING {
            return false;
        }
        let dirty_per_second = dirty as f64 / round.seconds;
        let next = dirty_per_second * send.as_secs_f64();
        next <= dirty as f64 * REFINE_RATIO
    }

    /// The next throttle step, if auto-converge may go further: the smallest step that should
    /// make the rounds shrink enough, judging by `ratio` (pages dirtied during the round over
    /// pages it sent) under the current throttle, and at least one step up. Far from the
    /// budget "enough" is [`TARGET_RATIO`]: on a slow link every round is long, so going one
    /// step at a time could use up the round and byte limits before the guest is slow
    /// enough. Close to it (`dirty` pages are only a little over budget) a gentle step that
    /// gets there in [`ROUNDS_TO_BUDGET`] rounds is enough.
    fn throttle_harder(&mut self, ratio: f64, dirty: u64) -> Option<u8> {
        if !self.limits.auto_converge {
            return None;
        }
        let running = 1.0 - f64::from(self.throttle()) / 100.0;
        let unthrottled = ratio / running.max(0.01);
        let enough = (self.budget_pages() / dirty.max(1) as f64)
            .powf(1.0 / ROUNDS_TO_BUDGET)
            .clamp(TARGET_RATIO, STALL_RATIO);
        let wanted = (1.0 - enough / unthrottled) * 100.0;
        let first = self.throttle_step.map_or(0, |s| s + 1);
        let next = (first..THROTTLE_STEPS.len())
            .find(|&i| f64::from(THROTTLE_STEPS[i]) + 0.5 >= wanted)
            .or_else(|| (first < THROTTLE_STEPS.len()).then_some(THROTTLE_STEPS.len() - 1))?;
        self.throttle_step = Some(next);
        Some(THROTTLE_STEPS[next])
    }

    /// Pages that fit the downtime budget at the planning rate.
    fn budget_pages(&self) -> f64 {
        let budget = self
            .limits
            .max_downtime
            .saturating_sub(FIXED_DOWNTIME)
            .as_secs_f64();
        (budget * self.planning_rate() / PAGE_SIZE as f64).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const PAGES_PER_MIB: u64 = 256;

    fn round(mib: u64, seconds: f64) -> RoundMeasure {
        RoundMeasure {
            pages: mib * PAGES_PER_MIB,
            bytes: mib << 20,
            seconds,
        }
    }

    #[test]
    fn stops_when_the_rest_fits_the_budget() {
        let mut c = Convergence::new(Limits::default(), GIB);
        // 10 MiB at 1 GiB/s while 8 MiB were dirtied: sending them takes about 8 ms (within
        // 30 ms), and the guest would dirty about 6.4 MiB meanwhile, so another round would
        // not shorten the pause by a quarter.
        let d = c.after_round(round(10, 0.01), 8 * PAGES_PER_MIB, 10 << 20);
        assert_eq!(d, Decision::Stop(StopReason::FitsBudget));
        assert!(c.estimated_downtime(8 * PAGES_PER_MIB) < Duration::from_millis(13));
    }

    #[test]
    fn a_slow_dirtier_gets_another_round_to_shorten_the_pause() {
        let mut c = Convergence::new(Limits::default(), GIB);
        // 4 MiB dirtied in 100 ms fit the budget, but sending them (about 4 ms) lets the guest
        // dirty only about 0.16 MiB: one more round cuts the pause.
        let d = c.after_round(round(100, 0.1), 4 * PAGES_PER_MIB, 100 << 20);
        assert_eq!(d, Decision::Continue { throttle: 0 });
        // Then 64 KiB: not worth a round.
        let d = c.after_round(round(4, 0.004), 16, 104 << 20);
        assert_eq!(d, Decision::Stop(StopReason::FitsBudget));
    }

    #[test]
    fn extra_rounds_are_bounded() {
        let mut c = Convergence::new(Limits::default(), GIB);
        let mut total = 0;
        let mut extra = 0;
        loop {
            // 4 MiB at 1 GiB/s while 2 MiB were dirtied: each round would halve the pause.
            total += 4 << 20;
            match c.after_round(round(4, 0.004), 2 * PAGES_PER_MIB, total) {
                Decision::Continue { .. } => extra += 1,
                Decision::Stop(reason) => {
                    assert_eq!(reason, StopReason::FitsBudget);
                    break;
                }
            }
        }
        assert_eq!(extra, MAX_REFINEMENTS);
    }

    #[test]
    fn rounds_that_shrink_are_left_to_shrink() {
        let mut c = Convergence::new(Limits::default(), GIB);
        let d = c.after_round(round(100, 1.0), 40 * PAGES_PER_MIB, 100 << 20);
        assert_eq!(d, Decision::Continue { throttle: 0 });
        // 30 of 40 MiB dirtied again: rounds shrink to 75% each, so about nine more rounds
        // (111 MiB, about a second) reach the budget. No throttle.
        let d = c.after_round(round(40, 0.4), 30 * PAGES_PER_MIB, 140 << 20);
        assert_eq!(d, Decision::Continue { throttle: 0 });
    }

    #[test]
    fn rounds_that_shrink_too_slowly_are_throttled() {
        let mut c = Convergence::new(Limits::default(), GIB);
        let d = c.after_round(round(512, 5.0), 400 * PAGES_PER_MIB, 512 << 20);
        assert_eq!(d, Decision::Continue { throttle: 0 });
        // 340 of 400 MiB dirtied again: at 85% a round the budget is 30 rounds away, more
        // than the limit leaves. To make rounds shrink to 30%, the guest must run at about
        // 35%: the 80% step.
        let d = c.after_round(round(400, 4.0), 340 * PAGES_PER_MIB, 912 << 20);
        assert_eq!(d, Decision::Continue { throttle: 80 });
        // Now they shrink fast: the throttle stays, no stronger.
        let d = c.after_round(round(340, 3.4), 100 * PAGES_PER_MIB, 1252 << 20);
        assert_eq!(d, Decision::Continue { throttle: 80 });
    }

    #[test]
    fn a_guest_a_little_over_the_budget_is_slowed_gently() {
        let mut c = Convergence::new(Limits::default(), GIB);
        c.after_round(round(512, 5.0), 100 * PAGES_PER_MIB, 512 << 20);
        // Rounds of about 5 MiB that stopped shrinking, 2 MiB over the budget (about 2.7 MiB
        // at 100 MiB/s): the smallest step does.
        let d = c.after_round(round(5, 0.05), 5 * PAGES_PER_MIB, 517 << 20);
        assert_eq!(d, Decision::Continue { throttle: 20 });
    }

    #[test]
    fn throttles_step_by_step_when_rounds_do_not_shrink() {
        let mut c = Convergence::new(Limits::default(), 64 * GIB);
        let mut total = 64 << 20;
        // The first pass does not count: it is slowed by the destination's first touch.
        assert_eq!(
            c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, total),
            Decision::Continue { throttle: 0 }
        );
        // Rounds that do not shrink at all: each throttle step is chosen for the rate the
        // guest would dirty at unthrottled, skipping steps that cannot be enough.
        let mut seen = Vec::new();
        for _ in 0..3 {
            total += 64 << 20;
            match c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, total) {
                Decision::Continue { throttle } => seen.push(throttle),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, [80, 95, 99]);
        // At the strongest throttle, two more rounds that do not shrink end the pre-copy.
        total += 64 << 20;
        assert_eq!(
            c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, total),
            Decision::Continue { throttle: 99 }
        );
        total += 64 << 20;
        assert_eq!(
            c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, total),
            Decision::Stop(StopReason::NotConverging)
        );
    }

    #[test]
    fn without_auto_converge_a_stall_stops_it() {
        let limits = Limits {
            auto_converge: false,
            ..Limits::default()
        };
        let mut c = Convergence::new(limits, 64 * GIB);
        let d0 = c.after_round(round(64, 1.0), 40 * PAGES_PER_MIB, 64 << 20);
        assert_eq!(d0, Decision::Continue { throttle: 0 });
        let d1 = c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, 64 << 20);
        assert_eq!(d1, Decision::Continue { throttle: 0 });
        let d2 = c.after_round(round(64, 1.0), 64 * PAGES_PER_MIB, 128 << 20);
        assert_eq!(d2, Decision::Stop(StopReason::NotConverging));
    }

    #[test]
    fn rounds_and_bytes_are_bounded() {
        let limits = Limits {
            max_rounds: 3,
            ..Limits::default()
        };
        let mut c = Convergence::new(limits, GIB);
        assert!(matches!(
            c.after_round(round(512, 10.0), 256 * PAGES_PER_MIB, 512 << 20),
            Decision::Continue { .. }
        ));
        assert!(matches!(
            c.after_round(round(256, 5.0), 128 * PAGES_PER_MIB, 768 << 20),
            Decision::Continue { .. }
        ));
        assert_eq!(
            c.after_round(round(128, 2.5), 64 * PAGES_PER_MIB, 896 << 20),
            Decision::Stop(StopReason::RoundLimit)
        );
        let mut c = Convergence::new(Limits::default(), GIB);
        assert_eq!(
            c.after_round(round(512, 10.0), 512 * PAGES_PER_MIB, 3 * GIB - (256 << 20)),
            Decision::Stop(StopReason::ByteLimit)
        );
    }

    #[test]
    fn tiny_rounds_do_not_make_up_a_rate() {
        let mut c = Convergence::new(Limits::default(), GIB);
        // 16 KiB in 10 ms would be 1.6 MB/s; not believed. At the assumed 100 MB/s, 1500
        // pages take 61 ms: another round.
        let tiny = RoundMeasure {
            pages: 4000,
            bytes: 16 << 10,
            seconds: 0.01,
        };
        assert_eq!(
            c.after_round(tiny, 1500, 16 << 10),
            Decision::Continue { throttle: 0 }
        );
        assert_eq!(c.rate(), None);
        assert_eq!(
            c.after_round(tiny, 20, 32 << 10),
            Decision::Stop(StopReason::FitsBudget)
        );
    }

    #[test]
    fn a_rate_cap_is_planned_with() {
        let limits = Limits {
            rate_limit: Some(25_000_000),
            ..Limits::default()
        };
        let mut c = Convergence::new(limits, GIB);
        // Nothing measured yet: 1 MiB at 25 MB/s is 42 ms, over the budget.
        assert_eq!(
            c.after_round(round(0, 0.0), PAGES_PER_MIB, 0),
            Decision::Continue { throttle: 0 }
        );
        assert!(c.estimated_downtime(PAGES_PER_MIB) > Duration::from_millis(40));
    }
}
