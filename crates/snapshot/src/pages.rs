//! PAGES records: runs of guest pages, the descriptor that lists them with one checksum per
//! block of pages, and the index a lazy restore uses to find and verify one block at a time.

use std::ops::Range;

use crate::error::{Fault, SnapshotError};
use crate::format::{
    le_u32, le_u64, size, RecordLoc, RecordType, MAX_BLOCK_PAGES, MAX_DESCRIPTOR_LEN, MAX_PFN_END,
    MAX_RECORD_PAGES, MAX_RUNS, PAGE_SIZE,
};
use crate::source::{read_at, ReadAt};

/// Length of the fixed fields at the start of a PAGES descriptor.
pub(crate) const DESC_FIXED_LEN: usize = 16;
/// Length of one run in a PAGES descriptor.
const RUN_LEN: usize = 16;

/// `pages` consecutive guest pages starting at page number `first_pfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// Guest-physical page number (address >> 12) of the first page.
    pub first_pfn: u64,
    /// Number of pages, at least 1.
    pub pages: u32,
}

impl PageRun {
    /// The page number just past the run.
    pub fn end_pfn(&self) -> u64 {
        self.first_pfn.saturating_add(u64::from(self.pages))
    }

    /// Whether `pfn` is one of the run's pages.
    pub fn contains(&self, pfn: u64) -> bool {
        pfn >= self.first_pfn && pfn < self.end_pfn()
    }
}

/// Checks the rules every run list obeys (at least one run, no empty run, below 2^52, strictly
/// increasing and non-overlapping, bounded counts) and returns the total number of pages.
pub(crate) fn check_runs(runs: &[PageRun]) -> Result<u64, Fault> {
    if runs.is_empty() {
        return Err(Fault::Corrupt("has no page runs".into()));
    }
    if runs.len() > MAX_RUNS as usize {
        return Err(Fault::TooLarge(format!(
            "has {} page runs; the limit is {MAX_RUNS}",
            runs.len()
        )));
    }
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for (i, run) in runs.iter().enumerate() {
        check_run(i, run, prev_end)?;
        prev_end = run.first_pfn + u64::from(run.pages);
        total += u64::from(run.pages);
        if total > MAX_RECORD_PAGES {
            return Err(Fault::TooLarge(format!(
                "has more than {MAX_RECORD_PAGES} pages"
            )));
        }
    }
    Ok(total)
}

fn check_run(i: usize, run: &PageRun, prev_end: u64) -> Result<(), Fault> {
    if run.pages == 0 {
        return Err(Fault::Corrupt(format!("page run {i} is empty")));
    }
    if run.first_pfn > MAX_PFN_END - u64::from(run.pages) {
        return Err(Fault::Corrupt(format!(
            "page run {i} (pfn {:#x}, {} pages) goes past the 52-bit page number space",
            run.first_pfn, run.pages
        )));
    }
    if i > 0 && run.first_pfn < prev_end {
        return Err(Fault::Corrupt(format!(
            "page run {i} (pfn {:#x}) does not come after the run before it",
            run.first_pfn
        )));
    }
    Ok(())
}

/// True if `page` holds only zero bytes: such pages need no data in a checkpoint or stream.
pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: reinterpreting bytes as u128 words; align_to handles the unaligned edges.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(16)
            .all(|c| c.iter().fold(0u128, |a, &w| a | w) == 0)
}

/// Length of the fixed fields at the start of a ZEROS body (run count, reserved).
const ZEROS_FIXED_LEN: usize = 8;

/// Encodes the body of a ZEROS record: the run count, a reserved zero, then the runs as in a
/// PAGES descriptor.
pub(crate) fn encode_zeros(runs: &[PageRun]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ZEROS_FIXED_LEN + RUN_LEN * runs.len());
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for run in runs {
        b.extend_from_slice(&run.first_pfn.to_le_bytes());
        b.extend_from_slice(&run.pages.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b
}

/// Parses and checks the body of a ZEROS record (its checksum already verified).
pub(crate) fn parse_zeros(body: &[u8]) -> Result<Vec<PageRun>, Fault> {
    if body.len() < ZEROS_FIXED_LEN {
        return Err(Fault::Corrupt("is too short for a run count".into()));
    }
    let run_count = le_u32(body, 0) as usize;
    if le_u32(body, 4) != 0 {
        return Err(Fault::Corrupt("has a nonzero reserved field".into()));
    }
    if body.len() != ZEROS_FIXED_LEN + RUN_LEN * run_count {
        return Err(Fault::Corrupt(format!(
            "is {} bytes long, but {run_count} runs take {}",
            body.len(),
            ZEROS_FIXED_LEN + RUN_LEN * run_count
        )));
    }
    let runs = parse_runs(&body[ZEROS_FIXED_LEN..])?;
    check_runs(&runs)?;
    Ok(runs)
}

/// Number of checksum blocks for `total_pages` pages in blocks of `block_pages`.
pub(crate) fn block_count(total_pages: u64, block_pages: u32) -> u64 {
    total_pages.div_ceil(u64::from(block_pages.max(1)))
}

/// Length of a descriptor's fields, run table and block checksums (padding not included).
pub(crate) fn descriptor_len(runs: usize, blocks: u64) -> u64 {
    DESC_FIXED_LEN as u64 + (RUN_LEN as u64) * runs as u64 + 4 * blocks
}

/// Encodes a descriptor followed by zero padding up to `data_offset`.
pub(crate) fn encode_descriptor(
    runs: &[PageRun],
    block_pages: u32,
    block_crcs: &[u32],
    data_offset: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(data_offset as usize);
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    b.extend_from_slice(&block_pages.to_le_bytes());
    b.extend_from_slice(&data_offset.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for run in runs {
        b.extend_from_slice(&run.first_pfn.to_le_bytes());
        b.extend_from_slice(&run.pages.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    for crc in block_crcs {
        b.extend_from_slice(&crc.to_le_bytes());
    }
    b.resize(data_offset as usize, 0);
    b
}

/// Below this much data the block checksums are computed on the calling thread only.
const PARALLEL_CRC_MIN: usize = 32 << 20;
/// Most threads used to compute block checksums.
const MAX_CRC_THREADS: usize = 8;

/// The CRC32C of each block of `block_bytes` bytes of the concatenation of `data` (the last
/// block may be shorter). Blocks run across slice boundaries, as they run across runs.
///
/// This is the first pass of a save over guest memory, so large inputs are split between a
/// few threads (the guest is paused, its vCPU threads idle).
pub(crate) fn block_crcs(data: &[&[u8]], block_bytes: usize) -> Vec<u32> {
    let block_bytes = block_bytes.max(1);
    let total: usize = data.iter().map(|d| d.len()).sum();
    let blocks = total.div_ceil(block_bytes);
    let threads = if total < PARALLEL_CRC_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_CRC_THREADS))
    };
    if threads <= 1 || blocks < threads {
        return range_crcs(data, block_bytes, 0..total);
    }
    let per_thread = blocks.div_ceil(threads) * block_bytes;
    let ranges: Vec<Range<usize>> = (0..total)
        .step_by(per_thread)
        .map(|start| start..(start + per_thread).min(total))
        .collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = ranges
            .iter()
            .map(|r| {
                let r = r.clone();
                scope.spawn(move || range_crcs(data, block_bytes, r))
            })
            .collect();
        let mut crcs = Vec::with_capacity(blocks);
        for (worker, r) in workers.into_iter().zip(&ranges) {
            // A worker cannot panic; if one did, its share is simply computed again here.
            let part = worker
                .join()
                .unwrap_or_else(|_| range_crcs(data, block_bytes, r.clone()));
            crcs.extend(part);
        }
        crcs
    })
}

/// The block checksums of bytes `range` of the concatenation of `data`; `range.start` is at
/// a block boundary.
fn range_crcs(data: &[&[u8]], block_bytes: usize, range: Range<usize>) -> Vec<u32> {
    let mut crcs = Vec::with_capacity(range.len().div_ceil(block_bytes));
    let mut crc = 0u32;
    let mut filled = 0usize;
    let mut pos = 0usize;
    for slice in data {
        let (start, end) = (pos, pos + slice.len());
        pos = end;
        if end <= range.start || start >= range.end {
            continue;
        }
        let mut rest = &slice[range.start.saturating_sub(start)..range.end.min(end) - start];
        while !rest.is_empty() {
            let take = (block_bytes - filled).min(rest.len());
            crc = crc32c::crc32c_append(crc, &rest[..take]);
            filled += take;
            rest = &rest[take..];
            if filled == block_bytes {
                crcs.push(crc);
                crc = 0;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        crcs.push(crc);
    }
    crcs
}

/// Compares the checksum of each `block_bytes` chunk of `data` with `expected`; returns the
/// position (in `expected`) of the first block that differs.
pub(crate) fn first_bad_block(data: &[u8], block_bytes: usize, expected: &[u32]) -> Option<usize> {
    let chunks = data.chunks(block_bytes.max(1));
    if chunks.len() != expected.len() {
        return Some(0);
    }
    chunks
        .zip(expected)
        .position(|(chunk, &crc)| crc32c::crc32c(chunk) != crc)
}

/// `data_offset` from a descriptor's fixed fields, checked so that reading the descriptor stays
/// inside the body and inside [`crate::MAX_DESCRIPTOR_LEN`].
pub(crate) fn descriptor_extent(fixed: &[u8], body_len: u64) -> Result<u64, Fault> {
    if fixed.len() < DESC_FIXED_LEN {
        return Err(Fault::Corrupt("is too short for a page descriptor".into()));
    }
    let data_offset = u64::from(le_u32(fixed, 8));
    if data_offset < DESC_FIXED_LEN as u64 {
        return Err(Fault::Corrupt(format!(
            "has data offset {data_offset}, inside its descriptor's fixed fields"
        )));
    }
    if data_offset > MAX_DESCRIPTOR_LEN {
        return Err(Fault::TooLarge(format!(
            "has a page descriptor of {}; the limit is {}",
            size(data_offset),
            size(MAX_DESCRIPTOR_LEN)
        )));
    }
    if data_offset > body_len {
        return Err(Fault::Corrupt(format!(
            "has data offset {data_offset}, past the end of its {body_len}-byte body"
        )));
    }
    Ok(data_offset)
}

/// A parsed and checked PAGES descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub runs: Vec<PageRun>,
    pub block_pages: u32,
    pub block_crcs: Vec<u32>,
    pub data_offset: u64,
    pub total_pages: u64,
}

/// Parses the descriptor bytes `desc` (body bytes `0..data_offset`, checksum already verified)
/// of a PAGES record whose body is `body_len` bytes long.
///
/// Nothing is allocated before the bytes it describes are known to be in `desc`.
pub(crate) fn parse_descriptor(desc: &[u8], body_len: u64) -> Result<Descriptor, Fault> {
    if desc.len() < DESC_FIXED_LEN {
        return Err(Fault::Corrupt("is too short for a page descriptor".into()));
    }
    let (run_count, block_pages) = parse_fixed(desc)?;
    if le_u32(desc, 8) as usize != desc.len() {
        return Err(Fault::Corrupt(
            "its descriptor does not end at its data offset".into(),
        ));
    }
    let runs_end = DESC_FIXED_LEN + RUN_LEN * run_count;
    if runs_end > desc.len() {
        return Err(Fault::Corrupt(format!(
            "lists {run_count} page runs, which do not fit before its data offset"
        )));
    }
    let runs = parse_runs(&desc[DESC_FIXED_LEN..runs_end])?;
    let total_pages = check_runs(&runs)?;
    let blocks = block_count(total_pages, block_pages) as usize;
    let crcs_end = runs_end + 4 * blocks;
    if crcs_end > desc.len() {
        return Err(Fault::Corrupt(format!(
            "has {blocks} block checksums, which do not fit before its data offset"
        )));
    }
    let block_crcs = desc[runs_end..crcs_end]
        .chunks_exact(4)
        .map(|c| le_u32(c, 0))
        .collect();
    if desc[crcs_end..].iter().any(|&b| b != 0) {
        return Err(Fault::Corrupt(
            "has nonzero padding before its page data".into(),
        ));
    }
    let data_offset = desc.len() as u64;
    let expected = data_offset + total_pages * PAGE_SIZE as u64;
    if body_len != expected {
        return Err(Fault::Corrupt(format!(
            "is {body_len} bytes long, but its descriptor and {total_pages} pages take {expected}"
        )));
    }
    Ok(Descriptor {
        runs,
        block_pages,
        block_crcs,
        data_offset,
        total_pages,
    })
}

/// The run count and block size, checked; `desc` is at least [`DESC_FIXED_LEN`] bytes.
fn parse_fixed(desc: &[u8]) -> Result<(usize, u32), Fault> {
    let run_count = le_u32(desc, 0);
    let block_pages = le_u32(desc, 4);
    if run_count == 0 {
        return Err(Fault::Corrupt("has no page runs".into()));
    }
    if run_count > MAX_RUNS {
        return Err(Fault::TooLarge(format!(
            "has {run_count} page runs; the limit is {MAX_RUNS}"
        )));
    }
    if block_pages == 0 || block_pages > MAX_BLOCK_PAGES {
        return Err(Fault::Corrupt(format!(
            "has {block_pages} pages per checksum block (1 to {MAX_BLOCK_PAGES} allowed)"
        )));
    }
    if le_u32(desc, 12) != 0 {
        return Err(Fault::Corrupt(
            "has a nonzero reserved descriptor field".into(),
        ));
    }
    Ok((run_count as usize, block_pages))
}

fn parse_runs(table: &[u8]) -> Result<Vec<PageRun>, Fault> {
    let mut runs = Vec::with_capacity(table.len() / RUN_LEN);
    for (i, r) in table.chunks_exact(RUN_LEN).enumerate() {
        if le_u32(r, 12) != 0 {
            return Err(Fault::Corrupt(format!(
                "page run {i} has a nonzero reserved field"
            )));
        }
        runs.push(PageRun {
            first_pfn: le_u64(r, 0),
            pages: le_u32(r, 8),
        });
    }
    Ok(runs)
}

/// One checksum block of a PAGES record: where its data is and which pages it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Block number within the record.
    pub index: u64,
    /// Offset of the block's data from the start of the file.
    pub file_offset: u64,
    /// Length of the block's data in bytes (a multiple of 4096; 0 for a block that does not
    /// exist).
    pub len: u64,
    /// The pages the data holds, as `(first_pfn, pages)` in data order: the first
    /// `segments[0].1` pages of the block are pfns `segments[0].0..`, and so on.
    pub segments: Vec<(u64, u32)>,
}

/// Where one page of a PAGES record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLocation {
    /// The checksum block holding the page.
    pub block: u64,
    /// Position of the page within the record's data (0 = first page of the data).
    pub data_index: u64,
    /// Offset of the page's 4096 bytes from the start of the file.
    pub file_offset: u64,
}

/// What a file reader knows about one PAGES record without having read its data: the runs,
/// the block checksums and where the data lies.
///
/// The public fields are as read (and checked) from the file; the lookups assume they are left
/// as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagesIndex {
    /// The record's page runs, in increasing pfn order (which is also data order).
    pub runs: Vec<PageRun>,
    /// Pages per checksum block.
    pub block_pages: u32,
    /// The checksum of each block.
    pub block_crcs: Vec<u32>,
    /// Offset of the first page's data from the start of the file.
    pub data_file_offset: u64,
    /// Number of pages in the record.
    pub total_pages: u64,
    seq: u64,
    record_offset: u64,
    /// `run_starts[i]` is the position in the data of the first page of `runs[i]`.
    run_starts: Vec<u64>,
}

impl PagesIndex {
    /// The index of a checked descriptor for record `seq` at `record_offset`, whose data starts
    /// at `data_file_offset`.
    pub(crate) fn new(d: Descriptor, seq: u64, record_offset: u64, data_file_offset: u64) -> Self {
        let mut run_starts = Vec::with_capacity(d.runs.len());
        let mut next = 0u64;
        for run in &d.runs {
            run_starts.push(next);
            next += u64::from(run.pages);
        }
        PagesIndex {
            runs: d.runs,
            block_pages: d.block_pages,
            block_crcs: d.block_crcs,
            data_file_offset,
            total_pages: d.total_pages,
            seq,
            record_offset,
            run_starts,
        }
    }

    /// Offset of the record's header from the start of the file.
    pub fn record_offset(&self) -> u64 {
        self.record_offset
    }

    /// Number of checksum blocks.
    pub fn blocks(&self) -> u64 {
        self.block_crcs.len() as u64
    }

    /// Pages per block, never 0.
    fn bp(&self) -> u64 {
        u64::from(self.block_pages.max(1))
    }

    /// The position in the data of the pages of block `b` (empty if there is no such block).
    fn block_pages_range(&self, b: u64) -> Range<u64> {
        if b >= self.blocks() {
            return 0..0;
        }
        let start = b.saturating_mul(self.bp()).min(self.total_pages);
        let end = start.saturating_add(self.bp()).min(self.total_pages);
        start..end
    }

    /// Where block `b`'s data lies in the file and which pages it holds. A block number past
    /// the last block gives a `BlockRef` of length 0 without segments.
    pub fn block(&self, b: u64) -> BlockRef {
        let pages = self.block_pages_range(b);
        BlockRef {
            index: b,
            file_offset: self.data_file_offset + pages.start * PAGE_SIZE as u64,
            len: (pages.end - pages.start) * PAGE_SIZE as u64,
            segments: self.segments(pages),
        }
    }

    /// The pfns of the pages at positions `pages` of the data, as `(first_pfn, pages)` in data
    /// order.
    pub fn segments(&self, pages: Range<u64>) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        let end = pages.end.min(self.total_pages);
        let mut pos = pages.start;
        let mut i = self.run_starts.partition_point(|&s| s <= pos);
        while pos < end && i > 0 {
            let (Some(run), Some(&start)) = (self.runs.get(i - 1), self.run_starts.get(i - 1))
            else {
                break;
            };
            let skip = pos - start;
            let take = u64::from(run.pages).saturating_sub(skip).min(end - pos);
            if take == 0 {
                break;
            }
            out.push((run.first_pfn + skip, take as u32));
            pos += take;
            i += 1;
        }
        out
    }

    /// Where page `pfn` is in this record, if the record holds it (binary search over runs).
    pub fn locate(&self, pfn: u64) -> Option<PageLocation> {
        let i = self
            .runs
            .partition_point(|r| r.first_pfn <= pfn)
            .checked_sub(1)?;
        let run = self.runs.get(i)?;
        if !run.contains(pfn) {
            return None;
        }
        let data_index = self.run_starts.get(i)? + (pfn - run.first_pfn);
        Some(PageLocation {
            block: data_index / self.bp(),
            data_index,
            file_offset: self.data_file_offset + data_index * PAGE_SIZE as u64,
        })
    }

    /// The block holding page `pfn`, if this record holds it.
    pub fn find(&self, pfn: u64) -> Option<u64> {
        self.locate(pfn).map(|l| l.block)
    }

    /// Reads block `b` into `buf` (resized to the block's length) and verifies its checksum.
    pub fn read_block<S: ReadAt + ?Sized>(
        &self,
        src: &S,
        b: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), SnapshotError> {
        self.read_blocks(src, b..b.saturating_add(1), buf)
    }

    /// Reads the consecutive blocks `blocks` into `buf` with one positioned read (resizing it
    /// to their length) and verifies each block's checksum. Large ranges suit a background
    /// loader; the buffer can be reused from call to call.
    pub fn read_blocks<S: ReadAt + ?Sized>(
        &self,
        src: &S,
        blocks: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<(), SnapshotError> {
        if blocks.start >= blocks.end || blocks.end > self.blocks() {
            return Err(SnapshotError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "blocks {}..{} are not within the {} blocks of {}",
                    blocks.start,
                    blocks.end,
                    self.blocks(),
                    self.loc()
                ),
            )));
        }
        let first = blocks.start * self.bp();
        let end = (blocks.end * self.bp()).min(self.total_pages);
        let len = usize::try_from((end - first) * PAGE_SIZE as u64).map_err(|_| {
            SnapshotError::too_large(self.record_offset, "a page range does not fit in memory")
        })?;
        buf.resize(len, 0);
        let offset = self.data_file_offset + first * PAGE_SIZE as u64;
        read_at(src, buf, offset, || self.loc().truncated())?;
        self.verify_blocks(buf, blocks.start)
    }

    /// Verifies `data`, the page data of consecutive blocks starting at block `first` (read by
    /// the caller in whatever way suits it, e.g. direct I/O), against their checksums.
    pub fn verify_blocks(&self, data: &[u8], first: u64) -> Result<(), SnapshotError> {
        let block_bytes = self.bp() as usize * PAGE_SIZE;
        let n = data.len().div_ceil(block_bytes);
        let start = first as usize;
        let expected = self.block_crcs.get(start..start + n).unwrap_or(&[]);
        match first_bad_block(data, block_bytes, expected) {
            None => Ok(()),
            Some(i) => {
                let b = first + i as u64;
                let offset = self.data_file_offset + b * block_bytes as u64;
                Err(SnapshotError::corrupt(
                    offset,
                    format!("{}: page block {b} fails its checksum", self.loc()),
                ))
            }
        }
    }

    fn loc(&self) -> RecordLoc {
        RecordLoc {
            seq: self.seq,
            ty: RecordType::PAGES,
            offset: self.record_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; 4096];
        assert!(super::is_zero_page(&page));
        page[4095] = 1;
        assert!(!super::is_zero_page(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!super::is_zero_page(&page[..17]));
    }

    use super::*;

    fn run(first_pfn: u64, pages: u32) -> PageRun {
        PageRun { first_pfn, pages }
    }

    fn index(runs: Vec<PageRun>, block_pages: u32) -> PagesIndex {
        let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        let d = Descriptor {
            runs,
            block_pages,
            block_crcs: vec![0; block_count(total, block_pages) as usize],
            data_offset: 4096,
            total_pages: total,
        };
        PagesIndex::new(d, 1, 32, 8192)
    }

    #[test]
    fn run_rules() {
        assert_eq!(check_runs(&[run(0, 2), run(2, 3)]), Ok(5));
        assert!(check_runs(&[]).is_err());
        assert!(check_runs(&[run(0, 0)]).is_err());
        assert!(check_runs(&[run(4, 2), run(5, 1)]).is_err());
        assert!(check_runs(&[run(4, 2), run(1, 1)]).is_err());
        assert!(check_runs(&[run(MAX_PFN_END - 1, 1)]).is_ok());
        assert!(check_runs(&[run(MAX_PFN_END - 1, 2)]).is_err());
        assert!(check_runs(&[run(u64::MAX, 1)]).is_err());
        assert!(matches!(
            check_runs(&[run(0, u32::MAX)]),
            Err(Fault::TooLarge(_))
        ));
    }

    #[test]
    fn descriptor_round_trip() {
        let runs = [run(1, 3), run(10, 2)];
        let desc = encode_descriptor(&runs, 2, &[7, 8, 9], 100);
        assert_eq!(desc.len(), 100);
        assert_eq!(descriptor_extent(&desc, 100 + 5 * 4096), Ok(100));
        let d = parse_descriptor(&desc, 100 + 5 * 4096).unwrap();
        assert_eq!(d.runs, runs);
        assert_eq!(d.block_crcs, [7, 8, 9]);
        assert_eq!(d.total_pages, 5);
        assert!(parse_descriptor(&desc, 100 + 4 * 4096).is_err());
        assert!(parse_descriptor(&desc[..64], 64 + 5 * 4096).is_err());
    }

    #[test]
    fn crcs_span_slices() {
        let a = vec![1u8; 4096 * 3];
        let b = vec![2u8; 4096];
        let joined: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let crcs = block_crcs(&[&a, &b], 2 * 4096);
        assert_eq!(crcs.len(), 2);
        assert_eq!(crcs[0], crc32c::crc32c(&joined[..8192]));
        assert_eq!(crcs[1], crc32c::crc32c(&joined[8192..]));
        assert_eq!(first_bad_block(&joined, 8192, &crcs), None);
        assert_eq!(first_bad_block(&joined, 8192, &[crcs[0], 0]), Some(1));
    }

    #[test]
    fn parallel_crcs_match_serial_ones() {
        let data: Vec<u8> = (0..(40usize << 20) + 3 * 4096)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        let slices: Vec<&[u8]> = data.chunks(5 * 4096 + 4096 * 7).collect();
        for block_bytes in [4096, 3 * 4096, 1 << 22] {
            let serial = range_crcs(&slices, block_bytes, 0..data.len());
            assert_eq!(block_crcs(&slices, block_bytes), serial);
            let whole: Vec<u32> = data.chunks(block_bytes).map(crc32c::crc32c).collect();
            assert_eq!(serial, whole);
        }
    }

    #[test]
    fn lookups() {
        let idx = index(vec![run(10, 3), run(20, 1), run(30, 4)], 2);
        assert_eq!(idx.blocks(), 4);
        assert_eq!(idx.find(9), None);
        assert_eq!(idx.find(10), Some(0));
        assert_eq!(idx.find(12), Some(1));
        assert_eq!(idx.find(13), None);
        assert_eq!(idx.find(20), Some(1));
        assert_eq!(idx.find(33), Some(3));
        assert_eq!(idx.find(34), None);
        let loc = idx.locate(31).unwrap();
        assert_eq!((loc.block, loc.data_index), (2, 5));
        assert_eq!(loc.file_offset, 8192 + 5 * 4096);
        let b1 = idx.block(1);
        assert_eq!(b1.segments, [(12, 1), (20, 1)]);
        assert_eq!((b1.file_offset, b1.len), (8192 + 2 * 4096, 8192));
        let b3 = idx.block(3);
        assert_eq!(b3.segments, [(32, 2)]);
        let b4 = idx.block(4);
        assert!(b4.segments.is_empty() && b4.len == 0);
        let whole: Vec<(u64, u32)> = idx.runs.iter().map(|r| (r.first_pfn, r.pages)).collect();
        assert_eq!(idx.segments(0..8), whole);
        assert_eq!(idx.segments(7..100), [(33, 1)]);
        assert!(idx.segments(8..9).is_empty());
    }

    #[test]
    fn short_last_block() {
        let idx = index(vec![run(0, 5)], 2);
        let b = idx.block(2);
        assert_eq!(b.len, 4096);
        assert_eq!(b.segments, [(4, 1)]);
    }
}
