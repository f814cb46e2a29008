//! The file reader: indexes a checkpoint file with positioned reads, verifying every header,
//! every non-page body and every page descriptor, without reading page data. Page data is
//! verified block by block when it is read ([`PagesIndex::read_block`], [`verify_all`]).

use crate::error::{Fault, SnapshotError};
use crate::format::{
    check_body, parse_device, Header, RecordHeader, RecordLoc, RecordType, HEADER_LEN, PAGE_SIZE,
    RECORD_HEADER_LEN,
};
use crate::info::Info;
use crate::pages::{descriptor_extent, parse_descriptor, PageLocation, PagesIndex, DESC_FIXED_LEN};
use crate::source::{read_at, ReadAt};

/// Bytes read at a time when skipping (and verifying) a record of an unknown optional type.
const SKIP_CHUNK: u64 = 1 << 20;
/// Bytes of page data read at a time by [`verify_all`].
const VERIFY_CHUNK: u64 = 8 << 20;

/// A verified record other than PAGES and END.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedRecord {
    pub ty: RecordType,
    /// Position among the records, counting from 1 (as in error messages).
    pub seq: u64,
    /// Offset of the record header from the start of the file.
    pub offset: u64,
    pub body: Vec<u8>,
}

impl IndexedRecord {
    fn loc(&self) -> RecordLoc {
        RecordLoc {
            seq: self.seq,
            ty: self.ty,
            offset: self.offset,
        }
    }
}

/// Everything in a checkpoint file except page data, verified.
#[derive(Clone, Debug)]
pub struct SnapshotIndex {
    pub header: Header,
    /// The non-PAGES records (END excluded), in file order.
    pub records: Vec<IndexedRecord>,
    /// The PAGES records, in file order. A page held by several records has the contents of
    /// the last one (see [`SnapshotIndex::find_page`]).
    pub pages: Vec<PagesIndex>,
    record_count: u64,
    file_len: u64,
}

impl SnapshotIndex {
    /// Indexes a checkpoint file: reads the header, every record header, every non-PAGES body
    /// and every page descriptor, and skips page data.
    ///
    /// `src` is usually a [`std::fs::File`]; anything [`ReadAt`] works. Allocation is bounded
    /// by the format's limits and by the file's length, so a hostile file cannot exhaust
    /// memory.
    pub fn open<S: ReadAt + ?Sized>(src: &S) -> Result<SnapshotIndex, SnapshotError> {
        let file_len = src.size().map_err(SnapshotError::Io)?;
        let header = read_header(src, file_len)?;
        let mut ix = Indexer {
            src,
            file_len,
            aligned: header.aligned,
            offset: HEADER_LEN as u64,
            count: 0,
            records: Vec::new(),
            pages: Vec::new(),
        };
        while ix.next_record()? {}
        Ok(SnapshotIndex {
            header,
            records: ix.records,
            pages: ix.pages,
            record_count: ix.count - 1,
            file_len,
        })
    }

    /// The number of records before END (as END states).
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    /// Length of the file when it was indexed.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The first record of type `ty`.
    pub fn record(&self, ty: RecordType) -> Option<&IndexedRecord> {
        self.all(ty).next()
    }

    /// All records of type `ty`, in file order.
    pub fn all(&self, ty: RecordType) -> impl Iterator<Item = &IndexedRecord> {
        self.records.iter().filter(move |r| r.ty == ty)
    }

    /// The parsed INFO record.
    pub fn info(&self) -> Result<Info, SnapshotError> {
        let r = self
            .record(RecordType::INFO)
            .ok_or_else(|| SnapshotError::corrupt(0, "it has no INFO record"))?;
        Info::from_json(&r.body)
            .map_err(|e| Fault::Corrupt(format!("its JSON is not valid: {e}")).at(&r.loc()))
    }

    /// The DEVICE records as (id, state), in file order. (Their structure was checked when
    /// the file was indexed, so this fails only if `records` was changed since.)
    pub fn devices(&self) -> Result<Vec<(String, &[u8])>, SnapshotError> {
        self.all(RecordType::DEVICE)
            .map(|r| {
                let (id, state) =
                    parse_device(&r.body).map_err(|d| Fault::Corrupt(d).at(&r.loc()))?;
                Ok((id.to_string(), state))
            })
            .collect()
    }

    /// The PAGES record holding the current contents of page `pfn` (the last one that holds
    /// it) and where the page is in it.
    pub fn find_page(&self, pfn: u64) -> Option<(&PagesIndex, PageLocation)> {
        self.pages
            .iter()
            .rev()
            .find_map(|p| p.locate(pfn).map(|loc| (p, loc)))
    }

    /// Number of pages in all PAGES records (a page held by several records counts each time).
    pub fn total_pages(&self) -> u64 {
        self.pages.iter().map(|p| p.total_pages).sum()
    }
}

/// Splits the body of a DEVICE record into the device's id and its state.
///
/// Both readers have checked the bodies they return, so this fails only on other bytes.
pub fn split_device(body: &[u8]) -> Result<(&str, &[u8]), SnapshotError> {
    parse_device(body).map_err(|detail| SnapshotError::corrupt(0, detail))
}

/// Reads and verifies every page block of an indexed file, in large reads. Copy-mode restore
/// and verification tools use it; lazy restore verifies blocks as it reads them instead.
pub fn verify_all<S: ReadAt + ?Sized>(src: &S, index: &SnapshotIndex) -> Result<(), SnapshotError> {
    let mut buf = Vec::new();
    for p in &index.pages {
        let block_bytes = u64::from(p.block_pages.max(1)) * PAGE_SIZE as u64;
        let per_read = (VERIFY_CHUNK / block_bytes).max(1);
        let mut b = 0;
        while b < p.blocks() {
            let end = (b + per_read).min(p.blocks());
            p.read_blocks(src, b..end, &mut buf)?;
            b = end;
        }
    }
    Ok(())
}

/// Reads and checks the file header; `file_len` tells how much of it there can be.
fn read_header<S: ReadAt + ?Sized>(src: &S, file_len: u64) -> Result<Header, SnapshotError> {
    let n = file_len.min(HEADER_LEN as u64) as usize;
    let mut b = [0u8; HEADER_LEN];
    read_at(src, &mut b[..n], 0, || {
        SnapshotError::truncated(0, "it ends inside the header")
    })?;
    Header::decode(&b[..n])
}

/// The state of indexing: where the next record starts and what has been found so far.
struct Indexer<'a, S: ?Sized> {
    src: &'a S,
    file_len: u64,
    aligned: bool,
    /// Offset of the next record; never past `file_len`.
    offset: u64,
    /// Records read so far.
    count: u64,
    records: Vec<IndexedRecord>,
    pages: Vec<PagesIndex>,
}

impl<S: ReadAt + ?Sized> Indexer<'_, S> {
    /// Reads the record at `self.offset`; returns false after END.
    fn next_record(&mut self) -> Result<bool, SnapshotError> {
        let (h, loc) = self.read_record_header()?;
        let body_offset = loc.offset + RECORD_HEADER_LEN as u64;
        if h.length > self.file_len - body_offset {
            return Err(loc.truncated());
        }
        let more = match h.ty {
            RecordType::PAGES => self.pages_record(&h, &loc, body_offset).map(|()| true)?,
            // Files hold each page once; zeroing a page again only happens in a stream.
            RecordType::ZEROS | RecordType::MISSING | RecordType::DISK | RecordType::DISK_ZEROS => {
                return Err(Fault::Corrupt(format!(
                    "is a {} record, which belongs in migration streams, not files",
                    h.ty
                ))
                .at(&loc))
            }
            t if t.is_known() => self.plain_record(&h, &loc, body_offset)?,
            _ => self.skip_record(&h, &loc, body_offset).map(|()| true)?,
        };
        self.offset = body_offset + h.length;
        self.count += 1;
        if !more && self.offset != self.file_len {
            let extra = self.file_len - self.offset;
            return Err(SnapshotError::corrupt(
                self.offset,
                format!("{extra} bytes follow its END record ({loc})"),
            ));
        }
        Ok(more)
    }

    fn read_record_header(&self) -> Result<(RecordHeader, RecordLoc), SnapshotError> {
        let remaining = self.file_len - self.offset;
        let seq = self.count + 1;
        if remaining == 0 {
            return Err(SnapshotError::truncated(self.offset, self.missing_end()));
        }
        let inside_header = || {
            SnapshotError::truncated(
                self.offset,
                format!(
                    "it ends inside the header of record {seq} at offset {}",
                    self.offset
                ),
            )
        };
        if remaining < RECORD_HEADER_LEN as u64 {
            return Err(inside_header());
        }
        let mut b = [0u8; RECORD_HEADER_LEN];
        read_at(self.src, &mut b, self.offset, inside_header)?;
        RecordHeader::decode(&b, seq, self.offset)
    }

    fn missing_end(&self) -> String {
        match self.count {
            0 => "it ends after the header, without an END record".into(),
            n => format!("it ends after record {n}, without an END record"),
        }
    }

    /// Reads, verifies and keeps a known non-PAGES record; returns false for END.
    fn plain_record(
        &mut self,
        h: &RecordHeader,
        loc: &RecordLoc,
        body_offset: u64,
    ) -> Result<bool, SnapshotError> {
        // The length is within the type's limit (16 MiB) and within the file.
        let mut body = vec![0u8; h.length as usize];
        read_at(self.src, &mut body, body_offset, || loc.truncated())?;
        if crc32c::crc32c(&body) != h.body_crc {
            return Err(loc.bad_checksum());
        }
        check_body(h.ty, &body, self.count).map_err(|f| f.at(loc))?;
        if h.ty == RecordType::END {
            return Ok(false);
        }
        self.records.push(IndexedRecord {
            ty: h.ty,
            seq: loc.seq,
            offset: loc.offset,
            body,
        });
        Ok(true)
    }

    /// Reads and checks a PAGES descriptor and indexes the record; the data is not read.
    fn pages_record(
        &mut self,
        h: &RecordHeader,
        loc: &RecordLoc,
        body_offset: u64,
    ) -> Result<(), SnapshotError> {
        let desc = self.read_descriptor(h, loc, body_offset)?;
        let d = parse_descriptor(&desc, h.length).map_err(|f| f.at(loc))?;
        let data_file_offset = body_offset + d.data_offset;
        if self.aligned && data_file_offset % PAGE_SIZE as u64 != 0 {
            return Err(SnapshotError::corrupt(
                loc.offset,
                format!("{loc}: its page data is not 4096-aligned, yet the file says it is"),
            ));
        }
        self.pages
            .push(PagesIndex::new(d, loc.seq, loc.offset, data_file_offset));
        Ok(())
    }

    /// Reads the descriptor part of a PAGES body (up to its data offset) and checks it against
    /// the body checksum.
    fn read_descriptor(
        &self,
        h: &RecordHeader,
        loc: &RecordLoc,
        body_offset: u64,
    ) -> Result<Vec<u8>, SnapshotError> {
        if h.length < DESC_FIXED_LEN as u64 {
            return Err(Fault::Corrupt(format!(
                "is {} bytes long, too short for a page descriptor",
                h.length
            ))
            .at(loc));
        }
        let mut fixed = [0u8; DESC_FIXED_LEN];
        read_at(self.src, &mut fixed, body_offset, || loc.truncated())?;
        let data_offset = descriptor_extent(&fixed, h.length).map_err(|f| f.at(loc))?;
        // data_offset is at most 64 MiB and within the body, which is within the file.
        let mut desc = vec![0u8; data_offset as usize];
        desc[..DESC_FIXED_LEN].copy_from_slice(&fixed);
        let rest_offset = body_offset + DESC_FIXED_LEN as u64;
        read_at(self.src, &mut desc[DESC_FIXED_LEN..], rest_offset, || {
            loc.truncated()
        })?;
        if crc32c::crc32c(&desc) != h.body_crc {
            return Err(loc.bad_checksum());
        }
        Ok(desc)
    }

    /// Verifies the body of a record of an unknown optional type in bounded chunks, and
    /// otherwise ignores it.
    fn skip_record(
        &mut self,
        h: &RecordHeader,
        loc: &RecordLoc,
        body_offset: u64,
    ) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; h.length.min(SKIP_CHUNK) as usize];
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < h.length {
            let n = (h.length - done).min(SKIP_CHUNK) as usize;
            read_at(self.src, &mut buf[..n], body_offset + done, || {
                loc.truncated()
            })?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            done += n as u64;
        }
        if crc != h.body_crc {
            return Err(loc.bad_checksum());
        }
        Ok(())
    }
}
