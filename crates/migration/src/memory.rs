//! Guest memory as the migration engine sees it: regions of host memory holding guest pages,
//! and sets of pages to send.

use std::ops::Range;

use tern_snapshot::{PageRun, PAGE_SIZE};

use crate::error::MigrationError;

const PAGE: u64 = PAGE_SIZE as u64;

/// Guest pages `first_pfn..first_pfn + pages`, mapped at `host_addr` in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub first_pfn: u64,
    pub pages: u64,
    pub host_addr: u64,
}

impl RamRegion {
    pub fn end_pfn(&self) -> u64 {
        self.first_pfn + self.pages
    }

    /// Host address of `pages` pages from `pfn` if they all lie in this region.
    pub fn host_range(&self, pfn: u64, pages: u64) -> Option<u64> {
        let end = pfn.checked_add(pages)?;
        (pfn >= self.first_pfn && end <= self.end_pfn())
            .then(|| self.host_addr + (pfn - self.first_pfn) * PAGE)
    }
}

/// Host address of the run `pfn..pfn + pages` if it lies within one region.
pub fn host_range(regions: &[RamRegion], pfn: u64, pages: u64) -> Option<u64> {
    regions.iter().find_map(|r| r.host_range(pfn, pages))
}

/// A set of guest pages: one bitmap per region (bit i = page `first_pfn + i`).
#[derive(Clone, Debug)]
pub struct PageSet {
    regions: Vec<RamRegion>,
    bits: Vec<Vec<u64>>,
}

impl PageSet {
    /// The empty set over `regions`.
    pub fn empty(regions: &[RamRegion]) -> Self {
        PageSet {
            regions: regions.to_vec(),
            bits: regions
                .iter()
                .map(|r| vec![0; r.pages.div_ceil(64) as usize])
                .collect(),
        }
    }

    /// The set given by per-region bitmaps (KVM's dirty log layout).
    pub fn from_bitmaps(
        regions: &[RamRegion],
        bits: Vec<Vec<u64>>,
    ) -> Result<Self, MigrationError> {
        if bits.len() != regions.len()
            || bits
                .iter()
                .zip(regions)
                .any(|(b, r)| (b.len() as u64) < r.pages.div_ceil(64))
        {
            return Err(MigrationError::Vm(
                "the dirty bitmaps do not match guest memory".into(),
            ));
        }
        let mut set = PageSet {
            regions: regions.to_vec(),
            bits,
        };
        set.clear_tails();
        Ok(set)
    }

    /// The set of the pages in `ranges` (pfn ranges; parts outside every region are ignored).
    pub fn from_ranges(regions: &[RamRegion], ranges: &[Range<u64>]) -> Self {
        let mut set = PageSet::empty(regions);
        for range in ranges {
            for (r, bits) in set.regions.iter().zip(set.bits.iter_mut()) {
                let start = range.start.max(r.first_pfn);
                let end = range.end.min(r.end_pfn());
                for pfn in start..end {
                    let i = pfn - r.first_pfn;
                    bits[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
        }
        set
    }

    /// Every page of every region.
    pub fn all(regions: &[RamRegion]) -> Self {
        let ranges: Vec<Range<u64>> = regions.iter().map(|r| r.first_pfn..r.end_pfn()).collect();
        PageSet::from_ranges(regions, &ranges)
    }

    /// Clears bits past the end of each region (bitmaps come in whole words).
    fn clear_tails(&mut self) {
        for (r, bits) in self.regions.iter().zip(self.bits.iter_mut()) {
            let used = r.pages.div_ceil(64) as usize;
            bits.truncate(used);
            let tail = r.pages % 64;
            if tail != 0 {
                if let Some(last) = bits.last_mut() {
                    *last &= (1u64 << tail) - 1;
                }
            }
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Adds every page of `other` (over the same regions).
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }

    /// The pages as maximal runs in increasing pfn order; a run never spans two regions.
    pub fn runs(&self) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for (r, bits) in self.regions.iter().zip(&self.bits) {
            let mut open: Option<PageRun> = None;
            for (w, &word) in bits.iter().enumerate() {
                if word == 0 {
                    if let Some(run) = open.take() {
                        runs.push(run);
                    }
                    continue;
                }
                for b in 0..64 {
                    let set = word & (1 << b) != 0;
                    let pfn = r.first_pfn + w as u64 * 64 + b;
                    match (&mut open, set) {
                        (Some(run), true) if run.pages < u32::MAX => run.pages += 1,
                        (open_run, true) => {
                            if let Some(run) = open_run.take() {
                                runs.push(run);
                            }
                            *open_run = Some(PageRun {
                                first_pfn: pfn,
                                pages: 1,
                            });
                        }
                        (open_run, false) => {
                            if let Some(run) = open_run.take() {
                                runs.push(run);
                            }
                        }
                    }
                }
            }
            if let Some(run) = open {
                runs.push(run);
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regions() -> Vec<RamRegion> {
        vec![
            RamRegion {
                first_pfn: 0,
                pages: 100,
                host_addr: 0x1000_0000,
            },
            RamRegion {
                first_pfn: 1000,
                pages: 70,
                host_addr: 0x2000_0000,
            },
        ]
    }

    #[test]
    fn runs_follow_the_bits_and_stop_at_region_ends() {
        let set = PageSet::from_ranges(&regions(), &[3..7, 98..1003, 1069..2000]);
        let runs = set.runs();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    first_pfn: 3,
                    pages: 4
                },
                PageRun {
                    first_pfn: 98,
                    pages: 2
                },
                PageRun {
                    first_pfn: 1000,
                    pages: 3
                },
                PageRun {
                    first_pfn: 1069,
                    pages: 1
                },
            ]
        );
        assert_eq!(set.count(), 10);
        assert_eq!(PageSet::all(&regions()).count(), 170);
    }

    #[test]
    fn bitmaps_are_checked_and_trimmed() {
        let r = regions();
        assert!(PageSet::from_bitmaps(&r, vec![vec![0; 2]]).is_err());
        let set =
            PageSet::from_bitmaps(&r, vec![vec![0, u64::MAX], vec![u64::MAX, u64::MAX]]).unwrap();
        // Region 0 has pages 64..100 set (36), region 1 all 70.
        assert_eq!(set.count(), 36 + 70);
    }

    #[test]
    fn host_ranges_stay_inside_one_region() {
        let r = regions();
        assert_eq!(host_range(&r, 1, 2), Some(0x1000_1000));
        assert_eq!(host_range(&r, 1001, 69), Some(0x2000_1000));
        assert_eq!(host_range(&r, 99, 2), None);
        assert_eq!(host_range(&r, 1069, 2), None);
        assert_eq!(host_range(&r, u64::MAX, 2), None);
    }

    proptest! {
        #[test]
        fn runs_hold_exactly_the_set_pages(words in proptest::collection::vec(any::<u64>(), 4)) {
            let regions = [RamRegion { first_pfn: 10, pages: 250, host_addr: 0 }];
            let set = PageSet::from_bitmaps(&regions, vec![words.clone()]).unwrap();
            let runs = set.runs();
            let mut from_runs = Vec::new();
            for w in runs.windows(2) {
                prop_assert!(w[0].end_pfn() < w[1].first_pfn, "runs are maximal and ordered");
            }
            for run in &runs {
                from_runs.extend(run.first_pfn..run.end_pfn());
            }
            let expected: Vec<u64> = (0..250u64)
                .filter(|i| words[(i / 64) as usize] & (1 << (i % 64)) != 0)
                .map(|i| 10 + i)
                .collect();
            prop_assert_eq!(from_runs, expected);
        }
    }
}
