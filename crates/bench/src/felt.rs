//! What a guest felt during a migration, read from its own heartbeats: the longest gap
//! between two of them over the whole move, the gap across the switch from the source to the
//! destination, and how much of its speed it kept.
//!
//! Heartbeats come every few milliseconds of guest time, each stamped with the host clock as
//! it arrives on the console (tern's console log, QEMU's serial reader). A vCPU kept out of
//! the guest — paused, throttled, or stalled on faults — shows as a gap, whoever caused it,
//! so tern and QEMU are measured the same way.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;
pub use tern_testguest::Heartbeat;

use crate::guest::Stamped;

/// How long before the migration the guest's normal speed is measured.
pub const BASELINE_S: f64 = 2.0;
/// How long after the migration ended gaps still count: the destination's first touches
/// of memory slow the guest right after the switch.
pub const AFTERMATH_S: f64 = 1.0;

/// The guest's view of one migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Felt {
    /// Longest time between two heartbeats from the start of the migration until
    /// [`AFTERMATH_S`] after it ended, milliseconds.
    pub longest_gap_ms: f64,
    /// When the longest gap began, seconds after the start of the migration.
    pub longest_gap_at_s: f64,
    /// From the last heartbeat on the source to the first on the destination, milliseconds.
    pub switch_gap_ms: f64,
    /// The guest's work rate during the migration over its rate before (1.0: unslowed).
    pub speed_kept: f64,
    /// Heartbeats seen during the migration.
    pub beats: usize,
    /// Host times (Unix seconds) of the last heartbeat on the source and the first on the
    /// destination, to set beside the tool's pause and resume.
    pub last_source_at: f64,
    pub first_destination_at: f64,
}

impl Felt {
    /// How the gap at the switch splits around the tool's pause and resume (Unix seconds):
    /// from the last heartbeat to the pause, and from the resume to the first heartbeat,
    /// milliseconds.
    pub fn around(&self, paused: f64, resumed: f64) -> (f64, f64) {
        (
            (paused - self.last_source_at) * 1e3,
            (self.first_destination_at - resumed) * 1e3,
        )
    }
}

/// A heartbeat and the host time (Unix seconds) it arrived.
pub type Beat = (f64, Heartbeat);

/// The guest's work so far: pages written and pages verified (both paced by the guest's
/// clock, so a slowed guest falls behind; debt older than 100 ms is forgiven in the guest).
fn work(h: &Heartbeat) -> f64 {
    (h.written + h.verified) as f64
}

/// Measures a migration that ran from `start` to `end` (host Unix seconds) from the
/// heartbeats the guest printed on the source and then on the destination.
pub fn measure(
    source: &[Beat],
    destination: &[Beat],
    start: f64,
    end: f64,
) -> anyhow::Result<Felt> {
    let Some(last_source) = source.last() else {
        bail!("no heartbeat on the source");
    };
    // The destination's console starts where the guest arrived; a line the source printed
    // whole is not printed again, so the sequence carries on.
    let arrived: Vec<&Beat> = destination
        .iter()
        .filter(|(_, h)| h.seq > last_source.1.seq)
        .collect();
    let Some(first_destination) = arrived.first() else {
        bail!(
            "no heartbeat on the destination after the source's last (seq {})",
            last_source.1.seq
        );
    };
    let beats: Vec<&Beat> = source.iter().chain(arrived.iter().copied()).collect();
    let until = end + AFTERMATH_S;
    let (longest_gap, longest_gap_at) = beats
        .windows(2)
        .filter(|w| w[1].0 > start && w[0].0 < until)
        .map(|w| (w[1].0 - w[0].0, w[0].0))
        .fold(
            (0.0, start),
            |best, gap| if gap.0 > best.0 { gap } else { best },
        );
    let before = last_at_or_before(&beats, start)
        .ok_or_else(|| anyhow::anyhow!("no heartbeat before the migration started"))?;
    let baseline_from = last_at_or_before(&beats, start - BASELINE_S).unwrap_or(beats[0]);
    let after = beats
        .iter()
        .find(|(at, _)| *at >= end)
        .ok_or_else(|| anyhow::anyhow!("no heartbeat after the migration ended"))?;
    let rate = |a: &Beat, b: &Beat| -> Option<f64> {
        let dt = b.0 - a.0;
        (dt > 0.0).then(|| (work(&b.1) - work(&a.1)) / dt)
    };
    let baseline = rate(baseline_from, before).filter(|r| *r > 0.0);
    let during = rate(before, after);
    let speed_kept = match (baseline, during) {
        (Some(b), Some(d)) => d / b,
        // A guest doing no paced work: judge by its heartbeats alone.
        _ => 1.0,
    };
    Ok(Felt {
        longest_gap_ms: longest_gap * 1e3,
        longest_gap_at_s: longest_gap_at - start,
        switch_gap_ms: (first_destination.0 - last_source.0) * 1e3,
        speed_kept,
        beats: beats
            .iter()
            .filter(|(at, _)| *at >= start && *at <= end)
            .count(),
        last_source_at: last_source.0,
        first_destination_at: first_destination.0,
    })
}

/// The heartbeats in a tern console log kept by `TernHost::keep_console` in `dir`.
pub fn kept_beats(dir: &Path) -> anyhow::Result<Vec<Beat>> {
    let log = tern_vmm::console_log::read_log(dir, true)
        .with_context(|| format!("cannot read the console log in {}", dir.display()))?;
    let text = String::from_utf8_lossy(&log);
    Ok(tern_testguest::complete_lines(&text)
        .filter_map(|line| {
            let s = Stamped::parse_timestamped(line)?;
            Some((s.at, Heartbeat::parse(&s.line)?))
        })
        .collect())
}

fn last_at_or_before<'a>(beats: &[&'a Beat], t: f64) -> Option<&'a Beat> {
    beats.iter().rev().find(|(at, _)| *at <= t).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(at: f64, seq: u64, written: u64) -> Beat {
        (
            at,
            Heartbeat {
                seq,
                written,
                ..Heartbeat::default()
            },
        )
    }

    /// Beats every 10 ms from `from` to `to` (exclusive), 100 pages each.
    fn steady(from: f64, to: f64, seq: &mut u64, written: &mut u64) -> Vec<Beat> {
        let mut out = Vec::new();
        let mut at = from;
        while at < to - 1e-9 {
            *seq += 1;
            *written += 100;
            out.push(beat(at, *seq, *written));
            at += 0.01;
        }
        out
    }

    #[test]
    fn an_unfelt_migration_keeps_its_rhythm_and_speed() {
        let (mut seq, mut w) = (0, 0);
        let source = steady(0.0, 5.0, &mut seq, &mut w);
        let destination = steady(5.0, 8.0, &mut seq, &mut w);
        let felt = measure(&source, &destination, 3.0, 5.5).unwrap();
        assert!((felt.longest_gap_ms - 10.0).abs() < 0.5, "{felt:?}");
        assert!((felt.switch_gap_ms - 10.0).abs() < 0.5);
        assert!((felt.speed_kept - 1.0).abs() < 0.02);
    }

    #[test]
    fn a_freeze_in_pre_copy_and_a_slow_switch_are_both_seen() {
        let (mut seq, mut w) = (0, 0);
        let mut source = steady(0.0, 4.0, &mut seq, &mut w);
        // Frozen 300 ms in pre-copy: no beats and no work.
        source.extend(steady(4.3, 5.0, &mut seq, &mut w));
        let destination = steady(5.08, 8.0, &mut seq, &mut w);
        // A line the source printed is not counted twice when the destination shows it too.
        let mut dup = destination.clone();
        dup.insert(0, source[source.len() - 1].clone());
        let felt = measure(&source, &dup, 3.0, 5.5).unwrap();
        assert!((felt.longest_gap_ms - 310.0).abs() < 0.5, "{felt:?}");
        assert!((felt.switch_gap_ms - 90.0).abs() < 0.5);
        assert!(felt.speed_kept < 0.9 && felt.speed_kept > 0.7, "{felt:?}");
    }

    #[test]
    fn gaps_outside_the_migration_do_not_count() {
        let (mut seq, mut w) = (0, 0);
        let mut source = steady(0.0, 1.0, &mut seq, &mut w);
        source.extend(steady(1.5, 5.0, &mut seq, &mut w));
        let destination = steady(5.0, 9.0, &mut seq, &mut w);
        let felt = measure(&source, &destination, 3.0, 5.0).unwrap();
        assert!(felt.longest_gap_ms < 11.0, "{felt:?}");
    }

    #[test]
    fn missing_heartbeats_are_an_error() {
        let (mut seq, mut w) = (0, 0);
        let source = steady(0.0, 5.0, &mut seq, &mut w);
        assert!(measure(&source, &[], 3.0, 5.0).is_err());
        assert!(measure(&[], &source, 3.0, 5.0).is_err());
    }
}
