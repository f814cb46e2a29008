//! Which pages the source of a post-copy migration sends next: pages a fault waits for first,
//! then the background push of the rest, which continues after the last wanted page (a guest
//! that faults on a page tends to touch the ones after it next).

use std::collections::VecDeque;

use crate::error::MigrationError;
use crate::memory::PageSet;
use crate::postcopy::{add_runs, MAX_WANT_PAGES};
use crate::protocol::Run;

/// Wanted pages queued at most; more are pushed in their turn (the destination asks again if
/// it still waits for one after a reconnection).
const MAX_QUEUED: usize = 64 << 10;

/// The pages still to send on the current connection.
#[derive(Debug)]
pub struct PushSchedule {
    /// Pages not yet sent on this connection.
    pending: PageSet,
    /// Wanted pages, oldest first (each may have been sent since).
    wanted: VecDeque<u64>,
    /// Where the background push goes on.
    cursor: u64,
    /// An empty set over the same regions, to check runs from the peer against.
    blank: PageSet,
}

/// The pages of one record, and whether a fault waits for any of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Increasing guest page numbers.
    pub pfns: Vec<u64>,
    pub wanted: bool,
}

impl PushSchedule {
    /// A schedule for sending `missing`.
    pub fn new(missing: PageSet) -> Self {
        let blank = missing.cleared();
        PushSchedule {
            pending: missing,
            wanted: VecDeque::new(),
            cursor: 0,
            blank,
        }
    }

    /// Pages not yet sent on this connection.
    pub fn remaining(&self) -> u64 {
        self.pending.count()
    }

    /// Whether everything was sent on this connection.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether pages a fault waits for are queued (and not sent yet).
    pub fn has_wanted(&mut self) -> bool {
        while let Some(&pfn) = self.wanted.front() {
            if self.pending.contains(pfn) {
                return true;
            }
            self.wanted.pop_front();
        }
        false
    }

    /// Queues the pages of a `Want` message from the destination (checked: inside guest RAM,
    /// at most [`crate::postcopy::MAX_MESSAGE_RUNS`] runs and [`MAX_WANT_PAGES`] pages). Pages
    /// already sent on this connection are on their way and not sent again. The push goes on
    /// after the last wanted page. Returns how many pages were queued.
    pub fn want(&mut self, runs: &[Run]) -> Result<u64, MigrationError> {
        let mut asked = self.blank.clone();
        add_runs(&mut asked, runs, MAX_WANT_PAGES)?;
        let mut queued = 0;
        for run in asked.runs() {
            for pfn in run.first_pfn..run.end_pfn() {
                if self.pending.contains(pfn) && self.wanted.len() < MAX_QUEUED {
                    self.wanted.push_back(pfn);
                    queued += 1;
                }
            }
            self.cursor = run.end_pfn();
        }
        Ok(queued)
    }

    /// The next record's pages, at most `max`: wanted pages first (all that are queued, up
    /// to `max`), else the next pending pages from the push cursor. `None` when everything
    /// was sent. The pages count as sent.
    pub fn next_batch(&mut self, max: usize) -> Option<Batch> {
        let mut pfns = Vec::with_capacity(max);
        let wanted = self.has_wanted();
        if wanted {
            while pfns.len() < max {
                let Some(pfn) = self.wanted.pop_front() else {
                    break;
                };
                if self.pending.remove(pfn) {
                    pfns.push(pfn);
                }
            }
            pfns.sort_unstable();
        } else {
            while pfns.len() < max {
                let Some(pfn) = self.pending.next_from(self.cursor) else {
                    break;
                };
                self.pending.remove(pfn);
                pfns.push(pfn);
                self.cursor = pfn + 1;
            }
            pfns.sort_unstable();
        }
        (!pfns.is_empty()).then_some(Batch { pfns, wanted })
    }

    /// Starts over on a new connection: `lacking` is what the destination says it still
    /// lacks (checked by the caller to lie in guest RAM).
    pub fn restart(&mut self, lacking: PageSet) {
        self.pending = lacking;
        self.wanted.clear();
        self.cursor = 0;
    }

    /// An empty set over guest RAM, for collecting what the destination lacks.
    pub fn blank(&self) -> PageSet {
        self.blank.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRegion, RamRegion};
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    fn regions() -> Vec<RamRegion> {
        let region = |pfn: u64, pages: usize| {
            let m = GuestRegion::from_range(GuestAddress(pfn * 4096), pages * 4096, None).unwrap();
            RamRegion::new(Arc::new(m))
        };
        vec![region(0, 512), region(4096, 512)]
    }

    fn run(first_pfn: u64, pages: u32) -> Run {
        Run { first_pfn, pages }
    }

    #[test]
    fn wanted_pages_go_first_then_the_push_continues_after_them() {
        let r = regions();
        let missing = PageSet::from_ranges(&r, &[10..20, 100..110, 4100..4104]);
        let mut s = PushSchedule::new(missing);
        assert_eq!(s.remaining(), 24);
        let b = s.next_batch(4).unwrap();
        assert_eq!(
            b,
            Batch {
                pfns: vec![10, 11, 12, 13],
                wanted: false
            }
        );
        // A fault on page 105 (and one on 11, sent already: not again).
        assert_eq!(s.want(&[run(105, 1), run(11, 1)]).unwrap(), 1);
        let b = s.next_batch(4).unwrap();
        assert_eq!(
            b,
            Batch {
                pfns: vec![105],
                wanted: true
            }
        );
        // The push goes on after the wanted page, then wraps around.
        let b = s.next_batch(8).unwrap();
        assert_eq!(b.pfns, vec![106, 107, 108, 109, 4100, 4101, 4102, 4103]);
        assert!(!b.wanted);
        let b = s.next_batch(100).unwrap();
        assert_eq!(
            b.pfns,
            vec![14, 15, 16, 17, 18, 19, 100, 101, 102, 103, 104]
        );
        assert!(s.next_batch(4).is_none());
        assert!(s.is_done());
        // A new connection starts over with what the destination lacks.
        let mut lacking = PageSet::empty(&r);
        lacking.insert(4101);
        s.restart(lacking);
        assert_eq!(s.next_batch(4).unwrap().pfns, vec![4101]);
    }

    #[test]
    fn wants_from_the_peer_are_checked() {
        let r = regions();
        let mut s = PushSchedule::new(PageSet::all(&r));
        assert!(s.want(&[run(600, 1)]).is_err(), "in the hole");
        assert!(s.want(&[run(0, 2000)]).is_err(), "too many pages");
        assert!(s.want(&[run(510, 4)]).is_err(), "across a region's end");
        assert!(!s.has_wanted());
        assert_eq!(s.blank().count(), 0);
    }
}
