//! When a post-copy migration stops pre-copying and hands the guest over.
//!
//! Post-copy sends every page once after the switch; what pre-copy sent before it is wasted
//! for each page the guest writes again before the switch. Pre-copy still pays while little
//! is wasted (each page it sends is one fault less on the destination), so it goes on until
//! the waste would pass a share of the memory in use ([`WASTE_SHARE`]): then the switch
//! comes at once, in the middle of the first pass if need be. That bounds what a post-copy
//! migration sends, and so its total time, to about `1 + WASTE_SHARE` times the memory in
//! use over the link, however fast the guest writes.

use std::time::{Duration, Instant};

use crate::memory::{Chunk, PageSet};
use crate::policy::Decision;

/// Pre-copy rounds a post-copy migration runs after the first pass, at most.
pub const MAX_EXTRA_ROUNDS: u32 = 2;
/// The share of the memory in use that pre-copy may send in vain (pages written again
/// before the switch).
pub const WASTE_SHARE: f64 = 0.125;
/// How often the first pass looks at the dirty log to count the pages written again.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Watches the pre-copy of a post-copy migration and says when to switch.
#[derive(Debug)]
pub struct SwitchWatch {
    /// Pages that may be sent in vain.
    budget: u64,
    /// Pages sent in rounds after the first pass (each a page sent before, or one written
    /// for the first time since).
    resent: u64,
    /// Pages written since the first pass sent them, as read from the log during the pass
    /// (reading may re-arm the log: these pages must not be forgotten).
    written_again: PageSet,
    last_look: Instant,
    /// Pages sent and written again, at the last look.
    wasted_at_last_look: u64,
}

impl SwitchWatch {
    /// A watch over a pre-copy whose first pass sends `in_use`.
    pub fn new(in_use: &PageSet) -> Self {
        SwitchWatch {
            budget: (in_use.count() as f64 * WASTE_SHARE) as u64,
            resent: 0,
            written_again: in_use.cleared(),
            last_look: Instant::now(),
            wasted_at_last_look: 0,
        }
    }

    /// Whether the first pass should look at the dirty log now.
    pub fn look_due(&self) -> bool {
        self.last_look.elapsed() >= LOOK_EVERY
    }

    /// The first pass read `dirty` from the log before sending `next` (the pages of the
    /// chunks before it are sent). Why to switch now, if the guest wrote too much of what was
    /// sent again.
    ///
    /// Looks are far apart on a slow link (one per chunk sent), so the switch comes a look
    /// early if the waste, growing as it did since the last look, would pass the budget by
    /// the next one.
    pub fn look(&mut self, dirty: &PageSet, next: &Chunk<'_>) -> Option<String> {
        self.last_look = Instant::now();
        self.written_again.union_with(dirty);
        let wasted = self
            .written_again
            .count_before(next.region, next.first_page);
        let growth = wasted.saturating_sub(self.wasted_at_last_look);
        self.wasted_at_last_look = wasted;
        (wasted + growth > self.budget).then(|| {
            format!(
                "the guest wrote {wasted} of the pages sent again during the first pass \
                 (about {:.1}% of its memory in use may be sent twice)",
                WASTE_SHARE * 100.0
            )
        })
    }

    /// The first pass is about to send `chunk` (its log re-armed): what the guest wrote
    /// there before is sent now.
    pub fn sending(&mut self, chunk: &Chunk<'_>) {
        self.written_again.remove_chunk(chunk);
    }

    /// What the first pass read from the log and did not send since: part of the next
    /// round's pages.
    pub fn take_written_again(&mut self) -> PageSet {
        let empty = self.written_again.cleared();
        std::mem::replace(&mut self.written_again, empty)
    }

    /// After round `round` (0: the first pass) sent `pages` and `next` pages are dirty, with
    /// the convergence policy's `decision`: why pre-copy ends, if it does.
    pub fn after_round(
        &mut self,
        round: u32,
        pages: u64,
        next: u64,
        decision: Decision,
    ) -> Option<String> {
        if round > 0 {
            self.resent += pages;
        }
        match decision {
            Decision::Stop(reason) => Some(reason.describe().to_string()),
            Decision::Continue { throttle } if throttle > 0 => {
                Some("the guest dirtied memory faster than it could be sent".to_string())
            }
            Decision::Continue { .. } if round >= MAX_EXTRA_ROUNDS => Some(format!(
                "the first pass and {MAX_EXTRA_ROUNDS} more rounds are done"
            )),
            Decision::Continue { .. } if self.resent + next > self.budget => Some(format!(
                "another round would send more than {:.1}% of the memory in use again",
                WASTE_SHARE * 100.0
            )),
            Decision::Continue { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRegion, RamRegion};
    use crate::policy::StopReason;
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    /// 4096 pages from pfn 0x100.
    fn regions() -> Vec<RamRegion> {
        let mapping = GuestRegion::from_range(GuestAddress(0x10_0000), 4096 * 4096, None).unwrap();
        vec![RamRegion::new(Arc::new(mapping))]
    }

    fn all_in_use() -> PageSet {
        PageSet::all(&regions())
    }

    #[test]
    fn rounds_end_by_policy_count_and_waste() {
        let go_on = Decision::Continue { throttle: 0 };
        let mut w = SwitchWatch::new(&all_in_use());
        assert_eq!(w.after_round(0, 4096, 100, go_on), None);
        assert_eq!(w.after_round(1, 100, 50, go_on), None);
        assert!(w.after_round(MAX_EXTRA_ROUNDS, 50, 10, go_on).is_some());

        let mut w = SwitchWatch::new(&all_in_use());
        let slow = w
            .after_round(0, 4096, 100, Decision::Continue { throttle: 20 })
            .unwrap();
        assert!(slow.contains("faster"), "{slow}");
        let fits = w
            .after_round(1, 100, 10, Decision::Stop(StopReason::FitsBudget))
            .unwrap();
        assert!(fits.contains("budget"), "{fits}");

        // 12.5% of 4096 pages: 512 may be sent again.
        let mut w = SwitchWatch::new(&all_in_use());
        assert_eq!(w.after_round(0, 4096, 400, go_on), None);
        let waste = w.after_round(1, 400, 200, go_on).unwrap();
        assert!(waste.contains("again"), "{waste}");
    }

    #[test]
    fn the_first_pass_switches_when_sent_pages_are_written_again() {
        let in_use = all_in_use();
        let mut w = SwitchWatch::new(&in_use);
        let chunks: Vec<Chunk<'_>> = in_use.chunks(16).collect();
        // The first 3 chunks (1024 pages each) sent, then some of their pages written again:
        // the log also shows the unsent chunks' pages (initially set), which do not count.
        for c in &chunks[..3] {
            w.sending(c);
        }
        let mut dirty = in_use.cleared();
        dirty.insert_run(0x100, 200);
        dirty.insert_run(0x100 + 3 * 1024, 1024);
        assert_eq!(w.look(&dirty, &chunks[3]), None);
        // 300 more: 500, and 800 by the next look at this pace (over 512).
        dirty.insert_run(0x100 + 1024, 300);
        assert!(w.look(&dirty, &chunks[3]).is_some());
        // Sending a chunk forgets what was written there before.
        w.sending(&chunks[3]);
        let again = w.take_written_again();
        assert_eq!(again.count(), 500);
        assert!(!again.contains(0x100 + 3 * 1024));
    }
}
