//! Guest memory as the migration engine (and save and restore) sees it: regions of guest RAM
//! reached through vm-memory, and sets of pages to send.
//!
//! A [`RamRegion`] owns an `Arc` of one mapping of guest RAM and hands out bounds-checked
//! `VolatileSlice`s of page runs in it: no raw host address, no `unsafe` here. Copies in and out
//! of guest memory go through `VolatileSlice::copy_to`/`copy_from` (a `memcpy` for page-sized
//! runs), which stay sound while vCPUs write the same pages (a page changed under the source's
//! copy is dirty again and sent in a later round). Writes with `copy_from` also set their pages
//! in the mapping's dirty bitmap (the log of device writes), which a machine clears when it
//! starts tracking for a migration.

use std::ops::Range;
use std::sync::Arc;

use tern_snapshot::{PageRun, PAGE_SIZE};
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap, VolatileSlice};

use crate::error::MigrationError;

const PAGE: u64 = PAGE_SIZE as u64;

/// One mapping of guest RAM (tern-machine's `GuestRegion`).
pub type GuestRegion = GuestRegionMmap<AtomicBitmap>;

/// A bounds-checked view of guest pages.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// Guest pages `first_pfn..first_pfn + pages`, held mapped by this region for as long as it
/// (or a clone) exists.
#[derive(Clone)]
pub struct RamRegion {
    first_pfn: u64,
    pages: u64,
    mapping: Arc<GuestRegion>,
}

impl std::fmt::Debug for RamRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamRegion")
            .field("first_pfn", &self.first_pfn)
            .field("pages", &self.pages)
            .finish()
    }
}

impl RamRegion {
    /// The whole pages of `mapping`.
    pub fn new(mapping: Arc<GuestRegion>) -> Self {
        let start = mapping.start_addr().0;
        let end = start + mapping.len();
        let first_pfn = start.div_ceil(PAGE);
        RamRegion {
            first_pfn,
            pages: (end / PAGE).saturating_sub(first_pfn),
            mapping,
        }
    }

    pub fn first_pfn(&self) -> u64 {
        self.first_pfn
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn end_pfn(&self) -> u64 {
        self.first_pfn + self.pages
    }

    /// The pages `pfn..pfn + pages` if they all lie in this region.
    pub fn slice(&self, pfn: u64, pages: u64) -> Option<GuestSlice<'_>> {
        let end = pfn.checked_add(pages)?;
        if pfn < self.first_pfn || end > self.end_pfn() {
            return None;
        }
        let at = self.mapping.to_region_addr(GuestAddress(pfn * PAGE))?;
        self.mapping
            .get_slice(at, usize::try_from(pages * PAGE).ok()?)
            .ok()
    }

    /// Every page of the region.
    pub fn whole(&self) -> Option<GuestSlice<'_>> {
        self.slice(self.first_pfn, self.pages)
    }

    /// The guest page a host address inside this region's mapping belongs to (for a fault
    /// userfaultfd reports; the address is compared, never dereferenced).
    pub fn pfn_at(&self, host_addr: usize) -> Option<u64> {
        let whole = self.whole()?;
        let base = whole.ptr_guard().as_ptr() as usize;
        let offset = host_addr.checked_sub(base)?;
        (offset < whole.len()).then(|| self.first_pfn + offset as u64 / PAGE)
    }
}

/// The run `pfn..pfn + pages` if it lies within one region.
pub fn guest_slice(regions: &[RamRegion], pfn: u64, pages: u64) -> Option<GuestSlice<'_>> {
    regions.iter().find_map(|r| r.slice(pfn, pages))
}

/// Adds page `pfn` to `runs` (pages come in increasing order).
pub(crate) fn push_page(runs: &mut Vec<PageRun>, pfn: u64) {
    match runs.last_mut() {
        Some(r) if r.end_pfn() == pfn && r.pages < u32::MAX => r.pages += 1,
        _ => runs.push(PageRun {
            first_pfn: pfn,
            pages: 1,
        }),
    }
}

/// The pfn ranges of `regions`.
fn spans(regions: &[RamRegion]) -> Vec<Range<u64>> {
    regions.iter().map(|r| r.first_pfn..r.end_pfn()).collect()
}

/// A set of guest pages: one bitmap per region (bit i = page `first_pfn + i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    /// The regions' pfn ranges.
    regions: Vec<Range<u64>>,
    bits: Vec<Vec<u64>>,
}

impl PageSet {
    /// The empty set over `regions`.
    pub fn empty(regions: &[RamRegion]) -> Self {
        PageSet {
            regions: spans(regions),
            bits: regions
                .iter()
                .map(|r| vec![0; r.pages.div_ceil(64) as usize])
                .collect(),
        }
    }

    /// The empty set over the same regions as `self`.
    pub fn cleared(&self) -> Self {
        PageSet {
            regions: self.regions.clone(),
            bits: self.bits.iter().map(|b| vec![0; b.len()]).collect(),
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
            regions: spans(regions),
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
                let start = range.start.max(r.start);
                let end = range.end.min(r.end);
                for pfn in start..end {
                    let i = pfn - r.start;
                    bits[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
        }
        set
    }

    /// Adds the pages `first_pfn..first_pfn + pages` (a word at a time); false, adding
    /// nothing, unless they lie inside one region.
    pub fn insert_run(&mut self, first_pfn: u64, pages: u64) -> bool {
        let Some(end) = first_pfn.checked_add(pages) else {
            return false;
        };
        let Some(i) = self
            .regions
            .iter()
            .position(|r| first_pfn >= r.start && end <= r.end)
        else {
            return false;
        };
        let (start, bits) = (self.regions[i].start, &mut self.bits[i]);
        let mut bit = first_pfn - start;
        let end_bit = end - start;
        while bit < end_bit {
            let w = (bit / 64) as usize;
            let from = bit % 64;
            let to = (end_bit - w as u64 * 64).min(64);
            let mask = if to - from == 64 {
                u64::MAX
            } else {
                ((1u64 << (to - from)) - 1) << from
            };
            bits[w] |= mask;
            bit = w as u64 * 64 + to;
        }
        true
    }

    /// Every page of every region.
    pub fn all(regions: &[RamRegion]) -> Self {
        PageSet::from_ranges(regions, &spans(regions))
    }

    /// Clears bits past the end of each region (bitmaps come in whole words).
    fn clear_tails(&mut self) {
        for (r, bits) in self.regions.iter().zip(self.bits.iter_mut()) {
            let pages = r.end - r.start;
            let used = pages.div_ceil(64) as usize;
            bits.truncate(used);
            let tail = pages % 64;
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

    /// Where page `pfn` is: its region and its bit there, if it lies in one.
    fn locate(&self, pfn: u64) -> Option<(usize, usize, u64)> {
        let (i, r) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(&pfn))?;
        let bit = pfn - r.start;
        Some((i, (bit / 64) as usize, 1u64 << (bit % 64)))
    }

    /// Whether page `pfn` is in the set.
    pub fn contains(&self, pfn: u64) -> bool {
        self.locate(pfn)
            .is_some_and(|(r, w, m)| self.bits[r][w] & m != 0)
    }

    /// Adds page `pfn`; false if it lies outside every region.
    pub fn insert(&mut self, pfn: u64) -> bool {
        match self.locate(pfn) {
            Some((r, w, m)) => {
                self.bits[r][w] |= m;
                true
            }
            None => false,
        }
    }

    /// Removes page `pfn`; whether it was in the set.
    pub fn remove(&mut self, pfn: u64) -> bool {
        match self.locate(pfn) {
            Some((r, w, m)) if self.bits[r][w] & m != 0 => {
                self.bits[r][w] &= !m;
                true
            }
            _ => false,
        }
    }

    /// Whether no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().flatten().all(|&w| w == 0)
    }

    /// Whether the run `pfn..pfn + pages` lies inside one region.
    pub fn spans(&self, pfn: u64, pages: u64) -> bool {
        pfn.checked_add(pages)
            .is_some_and(|end| self.regions.iter().any(|r| pfn >= r.start && end <= r.end))
    }

    /// The first page of the set at or after `pfn`, wrapping around to the start once.
    pub fn next_from(&self, pfn: u64) -> Option<u64> {
        self.first_at_or_after(pfn)
            .or_else(|| self.first_at_or_after(0))
    }

    fn first_at_or_after(&self, pfn: u64) -> Option<u64> {
        for (r, bits) in self.regions.iter().zip(&self.bits) {
            if r.end <= pfn {
                continue;
            }
            let from = pfn.saturating_sub(r.start);
            let mut w = (from / 64) as usize;
            let mut word = bits.get(w)? & (u64::MAX << (from % 64));
            loop {
                if word != 0 {
                    return Some(r.start + w as u64 * 64 + u64::from(word.trailing_zeros()));
                }
                w += 1;
                match bits.get(w) {
                    Some(&next) => word = next,
                    None => break,
                }
            }
        }
        None
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
        let mut runs = Vec::new();
        for (r, bits) in self.regions.iter().zip(&self.bits) {
            push_runs(&mut runs, r.start, bits);
        }
        runs
    }

    /// The pages in chunks of at most `words` bitmap words (64 pages each), in increasing
    /// pfn order, leaving out chunks with no page.
    pub fn chunks(&self, words: usize) -> impl Iterator<Item = Chunk<'_>> {
        let words = words.max(1);
        self.regions
            .iter()
            .zip(&self.bits)
            .enumerate()
            .flat_map(move |(region, (r, bits))| {
                bits.chunks(words)
                    .enumerate()
                    .filter(|(_, c)| c.iter().any(|&w| w != 0))
                    .map(move |(i, c)| Chunk {
                        region,
                        region_start: r.start,
                        first_page: (i * words * 64) as u64,
                        bits: c,
                    })
            })
    }

    /// Pages of the set before page `first_page` of region `region` (and in the regions
    /// before it).
    pub fn count_before(&self, region: usize, first_page: u64) -> u64 {
        let ones = |words: &[u64]| words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        let whole: u64 = self.bits.iter().take(region).map(|b| ones(b)).sum();
        let Some(bits) = self.bits.get(region) else {
            return whole;
        };
        let words = ((first_page / 64) as usize).min(bits.len());
        let mut part = ones(&bits[..words]);
        let tail = first_page % 64;
        if tail != 0 {
            if let Some(w) = bits.get(words) {
                part += u64::from((w & ((1u64 << tail) - 1)).count_ones());
            }
        }
        whole + part
    }

    /// Adds the pages of `chunk` (of a set over the same regions).
    pub fn insert_chunk(&mut self, chunk: &Chunk<'_>) {
        let Some(bits) = self.bits.get_mut(chunk.region) else {
            return;
        };
        let first = (chunk.first_page / 64) as usize;
        for (w, c) in bits.iter_mut().skip(first).zip(chunk.bits) {
            *w |= c;
        }
    }

    /// Removes the pages of `chunk` (of a set over the same regions).
    pub fn remove_chunk(&mut self, chunk: &Chunk<'_>) {
        let Some(bits) = self.bits.get_mut(chunk.region) else {
            return;
        };
        let first = (chunk.first_page / 64) as usize;
        for (w, c) in bits.iter_mut().skip(first).zip(chunk.bits) {
            *w &= !c;
        }
    }

    /// The pages of every region not in this set.
    pub fn complement(&self) -> PageSet {
        let mut set = PageSet {
            regions: self.regions.clone(),
            bits: self
                .bits
                .iter()
                .map(|b| b.iter().map(|w| !w).collect())
                .collect(),
        };
        set.clear_tails();
        set
    }

    /// Each region's bitmap, with the region's index.
    pub fn bitmaps(&self) -> impl Iterator<Item = (usize, &[u64])> {
        self.bits.iter().map(Vec::as_slice).enumerate()
    }
}

/// Part of a [`PageSet`] within one region.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// The region's index.
    pub region: usize,
    region_start: u64,
    /// The chunk's first page, counted from the region's first (a multiple of 64).
    pub first_page: u64,
    /// Bit i: page `first_page + i` of the region.
    pub bits: &'a [u64],
}

impl Chunk<'_> {
    /// The chunk's pages as maximal runs.
    pub fn runs(&self) -> Vec<PageRun> {
        let mut runs = Vec::new();
        push_runs(&mut runs, self.region_start + self.first_page, self.bits);
        runs
    }
}

/// Appends the runs of `bits` (bit i: page `first_pfn + i`) to `runs`.
fn push_runs(runs: &mut Vec<PageRun>, first_pfn: u64, bits: &[u64]) {
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
            let pfn = first_pfn + w as u64 * 64 + b;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Anonymous guest memory for pages `first_pfn..first_pfn + pages`.
    fn region(first_pfn: u64, pages: u64) -> RamRegion {
        let mapping = GuestRegion::from_range(
            GuestAddress(first_pfn * PAGE),
            (pages * PAGE) as usize,
            None,
        )
        .unwrap();
        RamRegion::new(Arc::new(mapping))
    }

    fn regions() -> Vec<RamRegion> {
        vec![region(0, 100), region(1000, 70)]
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
    fn pages_are_added_found_and_removed() {
        let r = regions();
        let mut set = PageSet::empty(&r);
        assert!(set.is_empty());
        assert_eq!(set.next_from(0), None);
        assert!(set.insert(1005));
        assert!(set.insert(64));
        assert!(!set.insert(100), "outside every region");
        assert!(set.contains(1005) && set.contains(64) && !set.contains(65));
        assert_eq!(set.next_from(0), Some(64));
        assert_eq!(set.next_from(65), Some(1005));
        assert_eq!(set.next_from(1006), Some(64), "wraps around");
        assert!(set.remove(64));
        assert!(!set.remove(64));
        assert_eq!(set.next_from(0), Some(1005));
        assert_eq!(set.count(), 1);
        assert!(set.spans(1000, 70) && !set.spans(1000, 71) && !set.spans(u64::MAX, 2));
        let mut runs = PageSet::empty(&r);
        assert!(runs.insert_run(3, 90));
        assert!(runs.insert_run(1000, 70));
        assert!(!runs.insert_run(99, 2), "across a region's end");
        assert!(!runs.insert_run(u64::MAX, 2));
        assert_eq!(runs, PageSet::from_ranges(&r, &[3..93, 1000..1070]));
    }

    #[test]
    fn chunks_cover_the_set_and_its_complement_the_rest() {
        let r = regions();
        let set = PageSet::from_ranges(&r, &[3..7, 70..99, 1065..1070]);
        let chunks: Vec<_> = set.chunks(1).collect();
        assert_eq!(
            chunks
                .iter()
                .map(|c| (c.region, c.first_page))
                .collect::<Vec<_>>(),
            [(0, 0), (0, 64), (1, 64)]
        );
        let pages: Vec<u64> = chunks
            .iter()
            .flat_map(|c| c.runs())
            .flat_map(|run| run.first_pfn..run.end_pfn())
            .collect();
        let expected: Vec<u64> = (3..7).chain(70..99).chain(1065..1070).collect();
        assert_eq!(pages, expected);
        let rest = set.complement();
        assert_eq!(rest.count() + set.count(), 170);
        let mut both = rest.clone();
        both.union_with(&set);
        assert_eq!(both.count(), 170);
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
    fn slices_stay_inside_one_region() {
        let r = regions();
        let base = |i: usize| r[i].whole().unwrap().ptr_guard().as_ptr() as usize;
        let s = guest_slice(&r, 1, 2).unwrap();
        assert_eq!(s.len(), 2 * PAGE as usize);
        assert_eq!(s.ptr_guard().as_ptr() as usize, base(0) + PAGE as usize);
        let s = guest_slice(&r, 1001, 69).unwrap();
        assert_eq!(s.ptr_guard().as_ptr() as usize, base(1) + PAGE as usize);
        assert!(guest_slice(&r, 99, 2).is_none());
        assert!(guest_slice(&r, 1069, 2).is_none());
        assert!(guest_slice(&r, u64::MAX, 2).is_none());
        assert!(guest_slice(&r, 5, u64::MAX).is_none());
        // Host addresses (userfaultfd faults) map back to their pages.
        assert_eq!(r[1].pfn_at(base(1) + 5 * PAGE as usize + 17), Some(1005));
        assert_eq!(r[1].pfn_at(base(1) + 70 * PAGE as usize), None);
        assert_eq!(r[1].pfn_at(base(1).wrapping_sub(1)), None);
        // Writes and reads go through the slices.
        let page = guest_slice(&r, 1002, 1).unwrap();
        page.copy_from(&[0xabu8; PAGE as usize][..]);
        let mut back = [0u8; PAGE as usize];
        guest_slice(&r, 1002, 1).unwrap().copy_to(&mut back[..]);
        assert!(back.iter().all(|&b| b == 0xab));
    }

    proptest! {
        #[test]
        fn runs_hold_exactly_the_set_pages(words in proptest::collection::vec(any::<u64>(), 4)) {
            let regions = [region(10, 250)];
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
