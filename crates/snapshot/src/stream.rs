//! The sequential reader: reads a migration stream (or a file, front to back) from any
//! [`Read`], verifying each record completely before handing it out.

use std::io::{self, Read};
use std::ops::Range;

use crate::disk::{parse_disk, parse_disk_zeros, DISK_FIXED_LEN};
use crate::error::{Fault, SnapshotError};
use crate::format::{
    check_body, Header, RecordHeader, RecordLoc, RecordType, HEADER_LEN, PAGE_SIZE,
    RECORD_HEADER_LEN,
};
use crate::pages::{
    descriptor_extent, first_bad_block, parse_descriptor, parse_zeros, PageRun, DESC_FIXED_LEN,
};

/// A body buffer starts at this size (or the body's length, if smaller) and doubles as data
/// arrives, so a peer that declares a large body but does not send it cannot make the reader
/// allocate it.
const GROW_MIN: u64 = 1 << 20;
/// Bytes read at a time when skipping a record of an unknown optional type.
const SKIP_CHUNK: usize = 64 << 10;

/// One verified record of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// An INFO, CONFIG, MACHINE, VCPU, DEVICE or NOTE record. DEVICE bodies have been
    /// checked; [`crate::split_device`] splits them into id and state.
    Record { ty: RecordType, body: Vec<u8> },
    /// A PAGES record: `data` holds the pages of `runs`, in order, 4096 bytes each. Pages
    /// in later records replace the same pages from earlier ones.
    Pages { runs: Vec<PageRun>, data: Vec<u8> },
    /// A ZEROS record: the pages of `runs` are all zero from here on.
    Zeros { runs: Vec<PageRun> },
    /// A MISSING record (post-copy): the receiver does not hold the pages of `runs` yet.
    Missing { runs: Vec<PageRun> },
    /// A DISK record: disk `disk` holds `data` at byte `offset`.
    Disk {
        disk: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// A DISK_ZEROS record: the byte `runs` of disk `disk` read as zeros.
    DiskZeros { disk: u32, runs: Vec<Range<u64>> },
}

/// Where the reader is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Reading,
    Ended,
    Failed,
}

/// Reads a checkpoint front to back from a [`Read`] without seeking: what a migration target
/// does with its socket. Records of unknown optional types are verified and skipped.
pub struct StreamReader<R> {
    r: R,
    header: Header,
    /// Bytes consumed so far.
    offset: u64,
    /// Records read so far.
    count: u64,
    state: State,
    /// A page-data buffer handed back with [`StreamReader::recycle`], reused for the next
    /// PAGES record.
    spare: Option<Vec<u8>>,
    /// What the caller accepts of PAGES and ZEROS records, beyond the format's limits.
    pages: Option<PageLimits>,
    /// The size of each disk DISK and DISK_ZEROS records may write (none unless
    /// [`StreamReader::limit_disks`] says).
    disk_sizes: Vec<u64>,
}

/// Limits a reader applies to PAGES and ZEROS records on top of the format's own, set with
/// [`StreamReader::limit_pages`]: a migration destination knows its guest's memory, so a run
/// outside it, or a record larger than any source sends, is refused before its data is read
/// (and before anything is allocated for it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PageLimits {
    /// Every run must lie within one of these pfn ranges.
    ranges: Vec<Range<u64>>,
    /// Most pages in one PAGES record.
    max_record_pages: u64,
}

impl PageLimits {
    fn check(&self, runs: &[PageRun], total_pages: u64) -> Result<(), Fault> {
        if total_pages > self.max_record_pages {
            return Err(Fault::TooLarge(format!(
                "holds {total_pages} pages; this reader takes at most {} per record",
                self.max_record_pages
            )));
        }
        for (i, run) in runs.iter().enumerate() {
            let inside = self
                .ranges
                .iter()
                .any(|r| run.first_pfn >= r.start && run.end_pfn() <= r.end);
            if !inside {
                return Err(Fault::Corrupt(format!(
                    "page run {i} (pfn {:#x}, {} pages) is outside the guest's memory",
                    run.first_pfn, run.pages
                )));
            }
        }
        Ok(())
    }
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut r: R) -> Result<Self, SnapshotError> {
        let mut b = [0u8; HEADER_LEN];
        let n = fill(&mut r, &mut b)?;
        let header = Header::decode(&b[..n])?;
        Ok(StreamReader {
            r,
            header,
            offset: HEADER_LEN as u64,
            count: 0,
            state: State::Reading,
            spare: None,
            pages: None,
            disk_sizes: Vec::new(),
        })
    }

    /// Refuses PAGES, ZEROS and MISSING records with a run outside `ranges` (pfn ranges; a run must lie
    /// within one of them) and PAGES records of more than `max_record_pages` pages, before
    /// their data is read. A migration destination passes its guest's RAM, so that a hostile
    /// peer can neither aim pages outside it nor make the reader buffer more than one
    /// reasonable record.
    pub fn limit_pages(&mut self, ranges: Vec<Range<u64>>, max_record_pages: u64) {
        self.pages = Some(PageLimits {
            ranges,
            max_record_pages,
        });
    }

    /// Accepts DISK and DISK_ZEROS records for disks `0..sizes.len()`, within `sizes[disk]`
    /// bytes; without this call every such record is refused.
    pub fn limit_disks(&mut self, sizes: Vec<u64>) {
        self.disk_sizes = sizes;
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// Bytes consumed from the reader so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// The next record, or `None` once END has been read. After an error the stream's
    /// position is unknown, and every later call fails.
    ///
    /// (Not an [`Iterator`]: the stream ends with a verified END, not when the data does, and
    /// every step can fail.)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<StreamItem>, SnapshotError> {
        match self.state {
            State::Ended => return Ok(None),
            State::Failed => {
                return Err(SnapshotError::Io(io::Error::other(
                    "the stream cannot be read further after an earlier error",
                )))
            }
            State::Reading => {}
        }
        let item = self.read_item();
        match item {
            Err(_) => self.state = State::Failed,
            Ok(None) => self.state = State::Ended,
            Ok(Some(_)) => {}
        }
        item
    }

    /// Hands back the data buffer of a PAGES item once its pages are consumed: the next PAGES
    /// record is read into it, so a long stream does not allocate (and fault in) a fresh
    /// buffer per record.
    pub fn recycle(&mut self, mut data: Vec<u8>) {
        data.clear();
        if self
            .spare
            .as_ref()
            .is_none_or(|s| s.capacity() < data.capacity())
        {
            self.spare = Some(data);
        }
    }

    /// The underlying reader (e.g. to answer on a migration connection between records).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Gives the reader back, positioned just after END if `next` returned `None`.
    pub fn into_inner(self) -> R {
        self.r
    }

    fn read_item(&mut self) -> Result<Option<StreamItem>, SnapshotError> {
        loop {
            let (h, loc) = self.read_record_header()?;
            let item = match h.ty {
                RecordType::PAGES => Some(self.pages_record(&h, &loc)?),
                RecordType::END => {
                    self.plain_body(&h, &loc)?;
                    self.count += 1;
                    return Ok(None);
                }
                RecordType::ZEROS | RecordType::MISSING => {
                    let body = self.plain_body(&h, &loc)?;
                    let runs = parse_zeros(&body).map_err(|f| f.at(&loc))?;
                    if let Some(limits) = &self.pages {
                        // These records allocate nothing per page: only where their runs are
                        // matters.
                        limits.check(&runs, 0).map_err(|f| f.at(&loc))?;
                    }
                    Some(if h.ty == RecordType::ZEROS {
                        StreamItem::Zeros { runs }
                    } else {
                        StreamItem::Missing { runs }
                    })
                }
                RecordType::DISK => {
                    let mut body = self.plain_body(&h, &loc)?;
                    let (disk, offset, data) = parse_disk(&body).map_err(|f| f.at(&loc))?;
                    self.check_disk(disk, offset, data.len() as u64)
                        .map_err(|f| f.at(&loc))?;
                    body.drain(..DISK_FIXED_LEN);
                    Some(StreamItem::Disk {
                        disk,
                        offset,
                        data: body,
                    })
                }
                RecordType::DISK_ZEROS => {
                    let body = self.plain_body(&h, &loc)?;
                    let (disk, runs) = parse_disk_zeros(&body).map_err(|f| f.at(&loc))?;
                    if let Some(last) = runs.last() {
                        self.check_disk(disk, 0, last.end).map_err(|f| f.at(&loc))?;
                    }
                    Some(StreamItem::DiskZeros { disk, runs })
                }
                t if t.is_known() => Some(StreamItem::Record {
                    ty: t,
                    body: self.plain_body(&h, &loc)?,
                }),
                _ => {
                    self.skip_record(&h, &loc)?;
                    None
                }
            };
            self.count += 1;
            if item.is_some() {
                return Ok(item);
            }
        }
    }

    /// Whether `len` bytes at `offset` of disk `disk` are within what the caller accepts.
    fn check_disk(&self, disk: u32, offset: u64, len: u64) -> Result<(), Fault> {
        let size = self.disk_sizes.get(disk as usize).ok_or_else(|| {
            Fault::Corrupt(format!(
                "is for disk {disk}, but {} disks are being copied",
                self.disk_sizes.len()
            ))
        })?;
        if offset.saturating_add(len) > *size {
            return Err(Fault::Corrupt(format!(
                "writes {len} bytes at offset {offset} of disk {disk}, past its {size} bytes"
            )));
        }
        Ok(())
    }

    fn read_record_header(&mut self) -> Result<(RecordHeader, RecordLoc), SnapshotError> {
        let (offset, seq) = (self.offset, self.count + 1);
        let mut b = [0u8; RECORD_HEADER_LEN];
        let n = self.fill(&mut b)?;
        if n == 0 {
            let what = match self.count {
                0 => "it ends after the header, without an END record".to_string(),
                c => format!("it ends after record {c}, without an END record"),
            };
            return Err(SnapshotError::truncated(offset, what));
        }
        if n < b.len() {
            return Err(SnapshotError::truncated(
                offset,
                format!("it ends inside the header of record {seq} at offset {offset}"),
            ));
        }
        RecordHeader::decode(&b, seq, offset)
    }

    /// Reads and verifies the body of a known non-PAGES record (END included).
    fn plain_body(&mut self, h: &RecordHeader, loc: &RecordLoc) -> Result<Vec<u8>, SnapshotError> {
        let mut body = Vec::new();
        self.read_into(&mut body, h.length, loc)?;
        if crc32c::crc32c(&body) != h.body_crc {
            return Err(loc.bad_checksum());
        }
        check_body(h.ty, &body, self.count).map_err(|f| f.at(loc))?;
        Ok(body)
    }

    /// Reads, verifies and returns a PAGES record.
    fn pages_record(
        &mut self,
        h: &RecordHeader,
        loc: &RecordLoc,
    ) -> Result<StreamItem, SnapshotError> {
        let body_offset = self.offset;
        let desc = self.read_descriptor(h, loc)?;
        let d = parse_descriptor(&desc, h.length).map_err(|f| f.at(loc))?;
        if let Some(limits) = &self.pages {
            limits
                .check(&d.runs, d.total_pages)
                .map_err(|f| f.at(loc))?;
        }
        let data_offset = body_offset + d.data_offset;
        if self.header.aligned && data_offset % PAGE_SIZE as u64 != 0 {
            return Err(Fault::Corrupt(
                "its page data is not 4096-aligned, yet the header says it is".into(),
            )
            .at(loc));
        }
        let mut data = self.spare.take().unwrap_or_default();
        self.read_into(&mut data, d.total_pages * PAGE_SIZE as u64, loc)?;
        let block_bytes = d.block_pages as usize * PAGE_SIZE;
        if let Some(b) = first_bad_block(&data, block_bytes, &d.block_crcs) {
            return Err(SnapshotError::corrupt(
                data_offset + (b * block_bytes) as u64,
                format!("{loc}: page block {b} fails its checksum"),
            ));
        }
        Ok(StreamItem::Pages { runs: d.runs, data })
    }

    /// Reads the descriptor part of a PAGES body and checks it against the body checksum.
    fn read_descriptor(
        &mut self,
        h: &RecordHeader,
        loc: &RecordLoc,
    ) -> Result<Vec<u8>, SnapshotError> {
        if h.length < DESC_FIXED_LEN as u64 {
            return Err(Fault::Corrupt(format!(
                "is {} bytes long, too short for a page descriptor",
                h.length
            ))
            .at(loc));
        }
        let mut desc = Vec::new();
        self.read_into(&mut desc, DESC_FIXED_LEN as u64, loc)?;
        let data_offset = descriptor_extent(&desc, h.length).map_err(|f| f.at(loc))?;
        self.read_into(&mut desc, data_offset - DESC_FIXED_LEN as u64, loc)?;
        if crc32c::crc32c(&desc) != h.body_crc {
            return Err(loc.bad_checksum());
        }
        Ok(desc)
    }

    /// Reads and verifies the body of a record of an unknown optional type, keeping none of it.
    fn skip_record(&mut self, h: &RecordHeader, loc: &RecordLoc) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; SKIP_CHUNK];
        let mut crc = 0u32;
        let mut left = h.length;
        while left > 0 {
            let n = left.min(SKIP_CHUNK as u64) as usize;
            let got = self.fill(&mut buf[..n])?;
            if got < n {
                return Err(loc.truncated());
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            left -= n as u64;
        }
        if crc != h.body_crc {
            return Err(loc.bad_checksum());
        }
        Ok(())
    }

    /// Appends `len` bytes to `v`, growing it only as the data arrives (see [`GROW_MIN`]).
    fn read_into(
        &mut self,
        v: &mut Vec<u8>,
        len: u64,
        loc: &RecordLoc,
    ) -> Result<(), SnapshotError> {
        let mut left = len;
        while left > 0 {
            let step = left.min((v.len() as u64).max(GROW_MIN));
            v.try_reserve_exact(step as usize).map_err(|_| {
                SnapshotError::too_large(loc.offset, format!("{loc} does not fit in memory"))
            })?;
            let got = (&mut self.r)
                .take(step)
                .read_to_end(v)
                .map_err(SnapshotError::Io)?;
            self.offset += got as u64;
            if (got as u64) < step {
                return Err(loc.truncated());
            }
            left -= step;
        }
        Ok(())
    }

    /// Reads until `buf` is full or the data ends; returns how much was read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        let n = fill(&mut self.r, buf)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Reads from `r` until `buf` is full or `r` ends; returns how much was read.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SnapshotError::Io(e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SnapshotWriter;

    fn stream_with(runs: &[PageRun], zeros: &[PageRun]) -> Vec<u8> {
        let data: Vec<Vec<u8>> = runs
            .iter()
            .map(|r| vec![0x5a; r.pages as usize * PAGE_SIZE])
            .collect();
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
        w.pages(runs, &slices, 4).unwrap();
        w.zeros(zeros).unwrap();
        w.finish().unwrap()
    }

    fn read_limited(bytes: &[u8]) -> Result<usize, SnapshotError> {
        let mut r = StreamReader::new(bytes)?;
        r.limit_pages(vec![0x100..0x200, 0x1000..0x1010], 64);
        let mut items = 0;
        while r.next()?.is_some() {
            items += 1;
        }
        Ok(items)
    }

    fn run(first_pfn: u64, pages: u32) -> PageRun {
        PageRun { first_pfn, pages }
    }

    #[test]
    fn page_limits_pass_runs_inside_the_ranges() {
        let b = stream_with(&[run(0x100, 3), run(0x1ff, 1), run(0x1000, 16)], &[]);
        assert_eq!(read_limited(&b).unwrap(), 1);
        let b = stream_with(&[run(0x100, 1)], &[run(0x100, 0x100), run(0x1000, 16)]);
        assert_eq!(read_limited(&b).unwrap(), 2);
    }

    #[test]
    fn disk_records_arrive_only_for_the_disks_given_and_within_them() {
        let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
        w.disk(1, 8192, &[5u8; 4096]).unwrap();
        w.disk_zeros(0, &[0..512, 1 << 20..2 << 20]).unwrap();
        let b = w.finish().unwrap();
        let mut r = StreamReader::new(&b[..]).unwrap();
        r.limit_disks(vec![2 << 20, 12288]);
        assert_eq!(
            r.next().unwrap(),
            Some(StreamItem::Disk {
                disk: 1,
                offset: 8192,
                data: vec![5u8; 4096]
            })
        );
        assert_eq!(
            r.next().unwrap(),
            Some(StreamItem::DiskZeros {
                disk: 0,
                runs: vec![0..512, 1 << 20..2 << 20]
            })
        );
        assert_eq!(r.next().unwrap(), None);
        for sizes in [vec![], vec![2 << 20], vec![2 << 20, 8192]] {
            let mut r = StreamReader::new(&b[..]).unwrap();
            r.limit_disks(sizes.clone());
            assert!(r.next().is_err(), "disk sizes {sizes:?}");
        }
        let mut r = StreamReader::new(&b[..]).unwrap();
        r.limit_disks(vec![(2 << 20) - 512, 12288]);
        assert!(r.next().is_ok());
        assert!(r.next().is_err(), "zeros past the end of disk 0");
    }

    #[test]
    fn missing_records_carry_runs_within_the_limits() {
        let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
        w.missing(&[run(0x100, 2), run(0x1000, 16)]).unwrap();
        let b = w.finish().unwrap();
        let mut r = StreamReader::new(&b[..]).unwrap();
        r.limit_pages(vec![0x100..0x200, 0x1000..0x1010], 64);
        assert_eq!(
            r.next().unwrap(),
            Some(StreamItem::Missing {
                runs: vec![run(0x100, 2), run(0x1000, 16)]
            })
        );
        assert_eq!(r.next().unwrap(), None);
        let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
        w.missing(&[run(0x200, 1)]).unwrap();
        let b = w.finish().unwrap();
        assert!(read_limited(&b).is_err(), "a missing page outside memory");
    }

    #[test]
    fn page_limits_refuse_runs_outside_and_large_records() {
        for (runs, zeros) in [
            (vec![run(0xff, 1)], vec![]),
            (vec![run(0x1ff, 2)], vec![]),
            (vec![run(0x200, 1)], vec![]),
            (vec![run(0x1f0, 0x20)], vec![]),
            (vec![run(0x100, 1)], vec![run(0x800, 1)]),
            (vec![run(0x100, 1)], vec![run(0x1000, 17)]),
            (vec![run(0x100, 1)], vec![run((1 << 52) - 1, 1)]),
        ] {
            let b = stream_with(&runs, &zeros);
            match read_limited(&b) {
                Err(SnapshotError::Corrupt { what, .. }) => {
                    assert!(what.contains("outside the guest's memory"), "{what}")
                }
                other => panic!("{runs:?} {zeros:?}: {other:?}"),
            }
        }
        let b = stream_with(&[run(0x100, 65)], &[]);
        assert!(matches!(
            read_limited(&b),
            Err(SnapshotError::TooLarge { .. })
        ));
    }
}
