//! Auto-converge with the dirty ring: each vCPU may dirty its share of a page budget, and only
//! a vCPU over its share is held out of the guest, for just long enough to get back under it.
//!
//! While the dirty log is on, a thread harvests every vCPU's ring (each millisecond while
//! throttled, every 10 ms otherwise; the rings also feed the dirty bitmaps the migration
//! reads). Unthrottled, it measures how fast the guest dirties pages. At a throttle of `p`
//! percent the guest may dirty `(1 - p)` of that rate, split evenly between the vCPUs, each as
//! a token bucket: a vCPU that ran out of tokens is held (as the time-slice throttle holds
//! it, see `throttle`) until it has earned them back, at most [`MAX_HOLD`] at a time. A vCPU
//! that writes little never waits.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dirty_ring::DirtyRings;
use crate::throttle::Throttler;
use crate::vcpu::ThrottleHandle;

/// How often the rings are harvested and the budgets settled while throttled.
const TICK: Duration = Duration::from_millis(1);
/// How often the rings are harvested otherwise (a ring holds over 60 ms of a fast writer).
const IDLE_TICK: Duration = Duration::from_millis(10);
/// The longest one hold: the guest feels a slower vCPU, not a frozen one.
pub const MAX_HOLD: Duration = Duration::from_millis(5);
/// A vCPU may save up this much of its budget (a burst after a quiet spell).
const BURST: Duration = Duration::from_millis(5);
/// Entries marked for reset before the rings are reset (write-protecting those pages again):
/// not every tick, so that a page written continuously is not faulted on every millisecond.
const RESET_AFTER: u32 = 1024;
/// Weight of the newest tick in the measured dirty rate.
const RATE_WEIGHT: f64 = 0.1;

/// Starts harvesting `rings` for `vcpus`, unthrottled; the throttle it returns limits each
/// vCPU's dirty rate.
pub(crate) fn start(
    rings: Arc<DirtyRings>,
    vcpus: Vec<ThrottleHandle>,
) -> std::io::Result<Throttler> {
    Throttler::spawn("dirty-limit", 0, move |p, s| run(&rings, &vcpus, p, s))
}

/// One vCPU's budget.
#[derive(Clone, Copy, Default)]
struct Budget {
    /// Pages it may still dirty (negative: over its share).
    tokens: f64,
    /// It is held until then.
    held_until: Option<Instant>,
}

fn run(rings: &DirtyRings, vcpus: &[ThrottleHandle], percent: &AtomicU8, stop: &AtomicBool) {
    let mut last = Instant::now();
    // Pages per second the whole guest dirties unthrottled.
    let mut rate: Option<f64> = None;
    let mut budgets = vec![Budget::default(); vcpus.len()];
    while !stop.load(Ordering::Relaxed) {
        let throttled = percent.load(Ordering::Relaxed) > 0;
        std::thread::sleep(if throttled { TICK } else { IDLE_TICK });
        if let Err(e) = rings.harvest(RESET_AFTER) {
            log::warn!("dirty-limit: cannot harvest the dirty rings: {e}");
            return;
        }
        let counts = rings.take_counts();
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let p = percent.load(Ordering::Relaxed);
        if p == 0 || rate.is_none() {
            let r = counts.iter().sum::<u64>() as f64 / dt.max(1e-6);
            rate = Some(rate.map_or(r, |old| old + RATE_WEIGHT * (r - old)));
            budgets.iter_mut().for_each(|b| *b = Budget::default());
            continue;
        }
        let total = rate.unwrap_or(0.0) * (1.0 - f64::from(p) / 100.0);
        let share = total / vcpus.len().max(1) as f64;
        for ((budget, &dirtied), vcpu) in budgets.iter_mut().zip(&counts).zip(vcpus) {
            budget.tokens = (budget.tokens + share * dt).min(share * BURST.as_secs_f64());
            budget.tokens -= dirtied as f64;
            if budget.held_until.is_some_and(|t| t > now) || budget.tokens >= 0.0 {
                continue;
            }
            let hold = if share > 0.0 {
                Duration::from_secs_f64(-budget.tokens / share).min(MAX_HOLD)
            } else {
                MAX_HOLD
            };
            if vcpu.throttle(hold).is_err() {
                return;
            }
            budget.held_until = Some(now + hold);
        }
    }
}
