//! Auto-converge: slowing a guest's vCPUs down so that a live migration can catch up with the
//! memory it dirties.
//!
//! A thread lets every vCPU run for a slice of [`RUN_SLICE`], then keeps it out of the guest
//! for long enough that it runs `100 - percent` percent of the time. A guest at CPL3 rarely
//! leaves `KVM_RUN` by itself, so the thread kicks each vCPU out to make it sleep.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vcpu::ThrottleHandle;

/// How long a throttled vCPU runs between two sleeps.
pub const RUN_SLICE: Duration = Duration::from_millis(10);
/// The strongest throttle: a vCPU runs 1% of the time.
pub const MAX_PERCENT: u8 = 99;

/// The sleep that follows each run slice at `percent` percent throttling.
pub fn sleep_per_slice(percent: u8) -> Duration {
    let p = u32::from(percent.min(MAX_PERCENT));
    RUN_SLICE * p / (100 - p)
}

/// A running throttle thread; stopped and joined on drop.
pub(crate) struct Throttler {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    /// Starts throttling `vcpus` at `percent` percent.
    pub(crate) fn start(vcpus: Vec<ThrottleHandle>, percent: u8) -> std::io::Result<Throttler> {
        let shared = Arc::new(AtomicU8::new(percent.min(MAX_PERCENT)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || run(&vcpus, &p, &s))?;
        Ok(Throttler {
            percent: shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Changes the throttle.
    pub(crate) fn set(&self, percent: u8) {
        self.percent
            .store(percent.min(MAX_PERCENT), Ordering::Relaxed);
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(vcpus: &[ThrottleHandle], percent: &AtomicU8, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let pause = sleep_per_slice(percent.load(Ordering::Relaxed));
        for v in vcpus {
            if v.throttle(pause).is_err() {
                return;
            }
        }
        // Sleep through the vCPUs' pause and their next run slice, checking for the stop in
        // short steps so that ending a migration does not wait for a long pause.
        let until = Instant::now() + pause + RUN_SLICE;
        while !stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(5)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_grows_with_the_throttle() {
        assert_eq!(sleep_per_slice(0), Duration::ZERO);
        assert_eq!(sleep_per_slice(50), RUN_SLICE);
        assert_eq!(sleep_per_slice(90), RUN_SLICE * 9);
        assert_eq!(sleep_per_slice(99), RUN_SLICE * 99);
        assert_eq!(sleep_per_slice(100), RUN_SLICE * 99);
    }
}
