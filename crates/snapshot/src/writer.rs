//! The writer, for files and migration streams alike.

use std::io::{self, IoSlice, Write};

use crate::disk::{check_disk_runs, check_disk_write, encode_disk_prefix, encode_disk_zeros};
use crate::format::{
    check_body, device_prefix, Header, RecordHeader, RecordType, FORMAT_VERSION, HEADER_LEN,
    MAX_BLOCK_PAGES, PAGE_SIZE, RECORD_HEADER_LEN,
};
use crate::info::Info;
use crate::pages::{
    block_count, block_crcs, check_runs, descriptor_len, encode_descriptor, encode_zeros, PageRun,
};

/// Most buffers handed to one `write_vectored` call (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes a checkpoint: the header, then records, then END on [`SnapshotWriter::finish`].
///
/// A writer that is dropped without `finish` leaves data without END, which readers report
/// as truncated: an interrupted save can never pass for a complete one. After any write error
/// the writer refuses further writes, since the output no longer ends at a record boundary.
pub struct SnapshotWriter<W: Write> {
    w: W,
    aligned: bool,
    /// Bytes written so far, header included: the offset of the next record.
    offset: u64,
    /// Records written so far.
    count: u64,
    failed: bool,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header. `aligned` places each PAGES record's data at a 4096-aligned offset
    /// from the start of `w` (for files, so that page data can be read with direct I/O or
    /// mapped); streams leave it off and save the padding.
    pub fn new(mut w: W, aligned: bool) -> io::Result<Self> {
        let header = Header {
            version: FORMAT_VERSION,
            aligned,
        };
        w.write_all(&header.encode())?;
        Ok(SnapshotWriter {
            w,
            aligned,
            offset: HEADER_LEN as u64,
            count: 0,
            failed: false,
        })
    }

    /// Bytes written so far (the header included).
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Records written so far.
    pub fn records_written(&self) -> u64 {
        self.count
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// The underlying writer, e.g. to read a reply on a migration connection between records.
    /// Writing to it directly would corrupt the stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Writes a MARK record with sequence number `seq`.
    pub fn mark(&mut self, seq: u64) -> io::Result<()> {
        self.record(RecordType::MARK, &seq.to_le_bytes())
    }

    /// Writes a record of type `ty`. PAGES and END have their own methods; the bodies of the
    /// other known types are checked as a reader will check them (size limit, DEVICE layout,
    /// NOTE text), so that the writer never produces something its readers refuse.
    pub fn record(&mut self, ty: RecordType, body: &[u8]) -> io::Result<()> {
        if ty == RecordType::PAGES || ty == RecordType::END {
            return Err(invalid(format!(
                "{ty} records are written by their own methods"
            )));
        }
        if body.len() as u64 > ty.body_limit() {
            return Err(invalid(format!(
                "a {}-byte {ty} body is larger than the {}-byte limit",
                body.len(),
                ty.body_limit()
            )));
        }
        if ty.is_known() {
            check_body(ty, body, self.count)
                .map_err(|f| invalid(format!("invalid {ty} record: {f}")))?;
        }
        self.write_record(ty, &[body])
    }

    /// Writes the INFO record.
    pub fn info(&mut self, info: &Info) -> io::Result<()> {
        let body = info.to_json().map_err(io::Error::other)?;
        self.record(RecordType::INFO, &body)
    }

    /// Writes a DEVICE record for device `id` (1 to 64 bytes) with state `state`.
    pub fn device(&mut self, id: &str, state: &[u8]) -> io::Result<()> {
        let prefix = device_prefix(id).map_err(invalid)?;
        let len = prefix.len() + id.len() + state.len();
        if len as u64 > RecordType::DEVICE.body_limit() {
            return Err(invalid(format!(
                "the state of device {id} ({} bytes) is larger than the record limit",
                state.len()
            )));
        }
        self.write_record(RecordType::DEVICE, &[&prefix, id.as_bytes(), state])
    }

    /// Writes a NOTE record (a comment that readers may ignore).
    pub fn note(&mut self, text: &str) -> io::Result<()> {
        self.record(RecordType::NOTE, text.as_bytes())
    }

    /// Writes a PAGES record holding the pages of `runs`, whose contents are `data[i]` for
    /// `runs[i]` (`runs[i].pages * 4096` bytes each, typically borrowed from guest memory).
    ///
    /// Block checksums are computed in a first pass over the data; then the record header,
    /// descriptor and padding go out in one buffer and the data straight from `data` in large
    /// vectored writes, never copied. Runs must be increasing and non-overlapping. Nothing is
    /// written for an empty `runs`.
    pub fn pages(&mut self, runs: &[PageRun], data: &[&[u8]], block_pages: u32) -> io::Result<()> {
        if runs.is_empty() && data.is_empty() {
            return Ok(());
        }
        check_pages_args(runs, data, block_pages)?;
        let crcs = block_crcs(data, block_pages as usize * PAGE_SIZE);
        self.pages_with_crcs(runs, data, block_pages, &crcs)
    }

    /// Like [`SnapshotWriter::pages`], with the block checksums already computed by the caller
    /// (CRC32C of each block's data: `block_pages` pages in data order, the last one possibly
    /// shorter), e.g. while it scanned the pages anyway. Saves a pass over the data.
    pub fn pages_with_crcs(
        &mut self,
        runs: &[PageRun],
        data: &[&[u8]],
        block_pages: u32,
        crcs: &[u32],
    ) -> io::Result<()> {
        if runs.is_empty() && data.is_empty() {
            return Ok(());
        }
        let total_pages = check_pages_args(runs, data, block_pages)?;
        let blocks = block_count(total_pages, block_pages);
        if crcs.len() as u64 != blocks {
            return Err(invalid(format!(
                "{} block checksums for {blocks} blocks",
                crcs.len()
            )));
        }
        let data_offset = self.data_offset(descriptor_len(runs.len(), blocks));
        let desc = encode_descriptor(runs, block_pages, crcs, data_offset as u32);
        let length = data_offset + total_pages * PAGE_SIZE as u64;
        let header = RecordHeader::new(RecordType::PAGES, length, crc32c::crc32c(&desc));
        let mut head = Vec::with_capacity(RECORD_HEADER_LEN + desc.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(&desc);
        let mut parts = Vec::with_capacity(1 + data.len());
        parts.push(head.as_slice());
        parts.extend_from_slice(data);
        self.emit(&parts)
    }

    /// Writes a ZEROS record: the pages of `runs` are all zero now. Runs must be increasing and
    /// non-overlapping. Nothing is written for an empty `runs`.
    pub fn zeros(&mut self, runs: &[PageRun]) -> io::Result<()> {
        self.runs_record(RecordType::ZEROS, runs)
    }

    /// Writes a MISSING record (post-copy): the receiver does not hold the pages of `runs`
    /// yet. Runs must be increasing and non-overlapping. Nothing is written for an empty
    /// `runs`.
    pub fn missing(&mut self, runs: &[PageRun]) -> io::Result<()> {
        self.runs_record(RecordType::MISSING, runs)
    }

    /// Writes a DISK record: `data` (whole sectors, at most [`crate::MAX_DISK_DATA`]) is
    /// what disk `disk` holds at byte `offset`.
    pub fn disk(&mut self, disk: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        check_disk_write(offset, data.len())
            .map_err(|f| invalid(format!("the DISK record {f}")))?;
        let prefix = encode_disk_prefix(disk, offset);
        self.write_record(RecordType::DISK, &[&prefix, data])
    }

    /// Writes a DISK_ZEROS record: the byte `runs` of disk `disk` read as zeros now. Runs must
    /// be whole sectors, increasing and apart, at most [`crate::MAX_DISK_ZERO_RUNS`]; nothing
    /// is written for an empty `runs`.
    pub fn disk_zeros(&mut self, disk: u32, runs: &[std::ops::Range<u64>]) -> io::Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        check_disk_runs(runs).map_err(|f| invalid(format!("the DISK_ZEROS record {f}")))?;
        self.write_record(RecordType::DISK_ZEROS, &[&encode_disk_zeros(disk, runs)])
    }

    /// A ZEROS or MISSING record of `runs`.
    fn runs_record(&mut self, ty: RecordType, runs: &[PageRun]) -> io::Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        check_runs(runs).map_err(|f| invalid(format!("the {ty} record {f}")))?;
        let body = encode_zeros(runs);
        if body.len() as u64 > ty.body_limit() {
            return Err(invalid(format!(
                "{} runs do not fit in one {ty} record",
                runs.len()
            )));
        }
        self.write_record(ty, &[&body])
    }

    /// Writes END (the number of records before it), flushes, and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let count = self.count;
        self.write_record(RecordType::END, &[&count.to_le_bytes()])?;
        self.w.flush()?;
        Ok(self.w)
    }

    /// The data offset for a PAGES record written now whose descriptor is `desc_len` bytes:
    /// just after the descriptor, or, in an aligned file, at the next 4096-aligned offset.
    fn data_offset(&self, desc_len: u64) -> u64 {
        if !self.aligned {
            return desc_len;
        }
        let body_start = self.offset + RECORD_HEADER_LEN as u64;
        (body_start + desc_len).next_multiple_of(PAGE_SIZE as u64) - body_start
    }

    /// Writes a record whose body is the concatenation of `body`.
    fn write_record(&mut self, ty: RecordType, body: &[&[u8]]) -> io::Result<()> {
        let length = body.iter().map(|b| b.len() as u64).sum();
        let crc = body.iter().fold(0, |crc, b| crc32c::crc32c_append(crc, b));
        let header = RecordHeader::new(ty, length, crc).encode();
        let mut parts = Vec::with_capacity(1 + body.len());
        parts.push(&header[..]);
        parts.extend_from_slice(body);
        self.emit(&parts)
    }

    /// Writes one whole record given as consecutive parts, keeping count of records and bytes.
    fn emit(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write failed; the checkpoint is incomplete",
            ));
        }
        let result = write_all_vectored(&mut self.w, parts);
        if result.is_err() {
            self.failed = true;
        }
        result?;
        self.offset += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        self.count += 1;
        Ok(())
    }
}

/// Checks the arguments of [`SnapshotWriter::pages`]; returns the number of pages.
fn check_pages_args(runs: &[PageRun], data: &[&[u8]], block_pages: u32) -> io::Result<u64> {
    if block_pages == 0 || block_pages > MAX_BLOCK_PAGES {
        return Err(invalid(format!(
            "{block_pages} pages per checksum block (1 to {MAX_BLOCK_PAGES} allowed)"
        )));
    }
    let total = check_runs(runs).map_err(|f| invalid(format!("the PAGES record {f}")))?;
    if data.len() != runs.len() {
        return Err(invalid(format!(
            "{} page runs but {} data slices",
            runs.len(),
            data.len()
        )));
    }
    for (i, (run, d)) in runs.iter().zip(data).enumerate() {
        if d.len() as u64 != u64::from(run.pages) * PAGE_SIZE as u64 {
            return Err(invalid(format!(
                "page run {i} has {} pages but {} bytes of data",
                run.pages,
                d.len()
            )));
        }
    }
    Ok(total)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Writes all of `parts`, in order, with as few `write_vectored` calls as `w` allows.
fn write_all_vectored<W: Write>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = bufs.len().min(MAX_IOVECS);
        match w.write_vectored(&bufs[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut bufs, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
