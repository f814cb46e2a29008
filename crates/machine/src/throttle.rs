//! Auto-converge: slowing a guest's vCPUs down so that a live migration can catch up with the
//! memory it dirties.
//!
//! A thread keeps every vCPU out of the guest for `percent` percent of each [`CYCLE`] and lets
//! it run the rest. The cycle is short so that the guest feels a slower CPU rather than a
//! frozen one: no vCPU is kept out for more than [`CYCLE`] at a time, whatever the throttle
//! (a 1-second cycle would freeze a 99% throttled guest for 990 ms at a stretch). A guest at
//! CPL3 rarely leaves `KVM_RUN` by itself, so the thread kicks each vCPU out to make it wait.
//!
//! (KVM's dirty ring could limit each vCPU's dirty rate instead, as QEMU's dirty-limit does;
//! tern keeps the dirty bitmap, which the rest of its migration is built on, and slices time.)

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vcpu::ThrottleHandle;

/// One throttle cycle: a vCPU is kept out for part of it and runs the rest.
pub const CYCLE: Duration = Duration::from_millis(5);
/// The strongest throttle: a vCPU runs 1% of the time.
pub const MAX_PERCENT: u8 = 99;

/// How long each vCPU is kept out of the guest in every cycle at `percent` percent.
pub fn hold_per_cycle(percent: u8) -> Duration {
    CYCLE * u32::from(percent.min(MAX_PERCENT)) / 100
}

/// A running throttle thread (this module's time slices, or the dirty ring's limit), told
/// the percentage at any time; stopped and joined on drop.
pub(crate) struct Throttler {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    /// Starts throttling `vcpus` at `percent` percent by time slices.
    pub(crate) fn start(vcpus: Vec<ThrottleHandle>, percent: u8) -> std::io::Result<Throttler> {
        Throttler::spawn("throttle", percent, move |p, s| run(&vcpus, p, s))
    }

    /// Runs `body(percent, stop)` on a thread named `name`, starting at `percent`.
    pub(crate) fn spawn(
        name: &str,
        percent: u8,
        body: impl FnOnce(&AtomicU8, &AtomicBool) + Send + 'static,
    ) -> std::io::Result<Throttler> {
        let shared = Arc::new(AtomicU8::new(percent.min(MAX_PERCENT)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(&p, &s))?;
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
    let mut cycle_start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let hold = hold_per_cycle(percent.load(Ordering::Relaxed));
        for v in vcpus {
            if v.throttle(hold).is_err() {
                return;
            }
        }
        // Cycles follow a fixed schedule, so the time the kicks take does not add up; after
        // a delay (a loaded host) the schedule starts again from now rather than catching up.
        cycle_start += CYCLE;
        let now = Instant::now();
        if cycle_start <= now {
            cycle_start = now;
        } else {
            std::thread::sleep(cycle_start - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_vcpu_is_held_out_longer_than_a_cycle() {
        assert_eq!(hold_per_cycle(0), Duration::ZERO);
        assert_eq!(hold_per_cycle(50), CYCLE / 2);
        assert_eq!(hold_per_cycle(80), CYCLE * 4 / 5);
        assert_eq!(hold_per_cycle(99), CYCLE * 99 / 100);
        assert_eq!(hold_per_cycle(100), CYCLE * 99 / 100);
        assert!(CYCLE <= Duration::from_millis(5));
    }
}
