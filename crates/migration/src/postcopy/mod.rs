//! Post-copy: the guest runs on the destination before all its pages have arrived.
//!
//! A post-copy migration pre-copies as usual, but briefly: never throttled, and only while
//! little of what it sends is written again before the switch ([`switch`]: the first pass,
//! cut short if the guest writes fast, and at most two rounds more). Then the source
//! pauses the guest and sends, instead of the last dirty pages, MISSING records naming them,
//! then the machine state and END. The destination drops what it holds of those pages (they
//! are stale) so that touching them faults, and the usual handover follows: `Ready`, `Go`,
//! `Running`. From `Go` on the guest runs on the destination only; the source keeps its paused
//! copy, the only complete one, until the destination reports `Arrived`.
//!
//! ```text
//! source (paused copy)                         destination (guest running)
//!   post-copy stream: header ────────────────▶
//!   PAGES/ZEROS records, pushed in the  ─────▶  installed where still missing; a vCPU (or
//!   background, 256 KiB each, at most             KVM, or a device) touching a missing page
//!   MAX_IN_FLIGHT queued unsent                    faults and waits
//!         ◀───────────────────────────────────  Want { runs }   (for each faulting page)
//!   the wanted pages, next, in one record ───▶  installed: the faulting threads go on
//!         ◀───────────────────────────────────  Arrived { report }   (every page is in)
//!   END, close ──────────────────────────────▶
//! ```
//!
//! The connection is full duplex: each side runs one loop that polls for the other's input
//! between its own writes (the destination also polls its userfaultfd). A lost connection
//! loses nothing: the destination's vCPUs wait in their faults, the source redials the
//! destination's relocation server with `Resume { migration_id }`, whose daemon hands the
//! connection to the guest process; that one first says what it still lacks (`Lacking`), and
//! the push starts over with those pages. See `docs/migration-protocol.md`.
//!
//! * [`switch`]: when pre-copy ends.
//! * [`schedule`]: which pages the source sends next (requests first, then the push).
//! * [`serve`]: the source's side, with reconnection.
//! * [`receive`]: the destination's side, over any [`PostcopyTarget`] (userfaultfd), with
//!   its faults read by a thread of their own (`faults`).

mod faults;
pub mod receive;
pub mod schedule;
pub mod serve;
pub mod switch;

use crate::error::MigrationError;
use crate::memory::PageSet;
use crate::protocol::Run;

pub use receive::{drop_stale, PostcopyDestination, PostcopyTarget};
pub use schedule::PushSchedule;
pub use serve::{PostcopyFailure, PostcopyReport, PostcopySource, Redial, Redialed};
pub use switch::SwitchWatch;

/// Most runs in one `Want` or `Lacking` message (a JSON line of about 40 KiB).
pub const MAX_MESSAGE_RUNS: usize = 1024;
/// Most pages one `Want` may ask for.
pub const MAX_WANT_PAGES: u64 = 1024;
/// Pages per record the source pushes (256 KiB): a wanted page waits behind at most this
/// much besides what is in flight.
pub const PUSH_RECORD_PAGES: usize = 64;
/// Bytes the source lets wait unsent in its socket while it pushes: what a wanted page waits
/// behind (2 ms at 1 Gbit/s).
pub const MAX_IN_FLIGHT: usize = 256 << 10;

/// The runs of `set` as messages of at most [`MAX_MESSAGE_RUNS`] runs each (runs longer than
/// a `u32` of pages do not exist: [`PageSet::runs`] splits them).
pub fn message_runs(set: &PageSet) -> Vec<Vec<Run>> {
    let runs: Vec<Run> = set
        .runs()
        .into_iter()
        .map(|r| Run {
            first_pfn: r.first_pfn,
            pages: r.pages,
        })
        .collect();
    runs.chunks(MAX_MESSAGE_RUNS).map(<[Run]>::to_vec).collect()
}

/// Adds the runs of a message from the peer to `set`, refusing more than
/// [`MAX_MESSAGE_RUNS`] runs, more than `max_pages` pages in all, and any run outside guest
/// RAM; `set` is unchanged on error. Returns the number of pages.
pub fn add_runs(set: &mut PageSet, runs: &[Run], max_pages: u64) -> Result<u64, MigrationError> {
    if runs.len() > MAX_MESSAGE_RUNS {
        return Err(MigrationError::Protocol(format!(
            "a message names {} page runs; at most {MAX_MESSAGE_RUNS} are allowed",
            runs.len()
        )));
    }
    let mut pages = 0u64;
    for run in runs {
        let n = u64::from(run.pages);
        if n == 0 || !set.spans(run.first_pfn, n) {
            return Err(MigrationError::Protocol(format!(
                "a message names pages {:#x}+{} outside the guest's RAM",
                run.first_pfn, run.pages
            )));
        }
        pages = pages.saturating_add(n);
    }
    if pages > max_pages {
        return Err(MigrationError::Protocol(format!(
            "a message names {pages} pages; at most {max_pages} are allowed"
        )));
    }
    for run in runs {
        set.insert_run(run.first_pfn, u64::from(run.pages));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRegion, RamRegion};
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    fn regions() -> Vec<RamRegion> {
        let mapping = GuestRegion::from_range(GuestAddress(0x10_0000), 4096 * 4096, None).unwrap();
        vec![RamRegion::new(Arc::new(mapping))]
    }

    #[test]
    fn message_runs_are_checked() {
        let r = regions();
        let mut set = PageSet::empty(&r);
        let run = |first_pfn, pages| Run { first_pfn, pages };
        assert_eq!(
            add_runs(&mut set, &[run(0x100, 2), run(0x200, 1)], 8).unwrap(),
            3
        );
        assert!(set.contains(0x101) && set.contains(0x200));
        // Outside RAM, empty, too many pages, too many runs: refused, nothing added.
        for bad in [
            vec![run(0xff, 1)],
            vec![run(0x100 + 4096, 1)],
            vec![run(0x300, 0)],
            vec![run(0x300, 9)],
            vec![run(u64::MAX, 2)],
            (0..MAX_MESSAGE_RUNS as u64 + 1)
                .map(|i| run(0x400 + 2 * i, 1))
                .collect(),
        ] {
            assert!(add_runs(&mut set, &bad, 8).is_err(), "{:?}", &bad[..1]);
        }
        assert_eq!(set.count(), 3);
        let all = PageSet::all(&r);
        let messages = message_runs(&all);
        assert_eq!(messages.len(), 1);
        let mut sparse = PageSet::empty(&r);
        for i in 0..(MAX_MESSAGE_RUNS as u64 + 5) {
            sparse.insert(0x100 + 2 * i);
        }
        let messages = message_runs(&sparse);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].len(), MAX_MESSAGE_RUNS);
        assert_eq!(messages[1].len(), 5);
    }
}
