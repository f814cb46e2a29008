//! tern's checkpoint and migration-stream format, version 1.
//!
//! `tern save` writes a checkpoint **file** and `tern migrate` sends the **same records over
//! TCP**, so there is one format, described in `docs/checkpoint-format.md`: a 32-byte header,
//! then records (INFO, CONFIG, MACHINE, VCPU, DEVICE, PAGES, ..., END), each with a
//! checksummed header and a checksummed body. Page data is checksummed per block of pages so a
//! lazy restore can read and verify just the block holding a faulting page.
//!
//! - [`SnapshotWriter`] writes files and streams.
//! - [`SnapshotIndex`] indexes a file without reading page data; [`PagesIndex`] finds and
//!   reads (and verifies) single blocks; [`verify_all`] checks all page data.
//! - [`StreamReader`] reads a stream (or a file) front to back from any [`std::io::Read`].
//!
//! ```
//! use tern_snapshot::{PageRun, RecordType, SnapshotIndex, SnapshotWriter, StreamItem, StreamReader};
//!
//! let memory = vec![7u8; 3 * 4096];
//! let runs = [PageRun { first_pfn: 0x100, pages: 3 }];
//! let mut w = SnapshotWriter::new(Vec::new(), true)?;
//! w.record(RecordType::MACHINE, b"machine state")?;
//! w.device("serial0", b"uart state")?;
//! w.pages(&runs, &[&memory], 2)?;
//! let bytes = w.finish()?;
//!
//! // As a file: index, then read a block on demand.
//! let index = SnapshotIndex::open(&bytes)?;
//! let block = index.pages[0].find(0x102).unwrap();
//! let mut buf = Vec::new();
//! index.pages[0].read_block(&bytes, block, &mut buf)?;
//! assert_eq!(buf, &memory[2 * 4096..]);
//! assert_eq!(index.devices()?, [("serial0".to_string(), &b"uart state"[..])]);
//!
//! // As a stream: front to back.
//! let mut r = StreamReader::new(&bytes[..])?;
//! let mut pages = 0;
//! while let Some(item) = r.next()? {
//!     if let StreamItem::Pages { runs, .. } = item {
//!         pages += runs.iter().map(|r| r.pages).sum::<u32>();
//!     }
//! }
//! assert_eq!(pages, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The readers treat their input as hostile: they never panic on it, bound every allocation by
//! a constant limit (and, for files, by the file's length, for streams by the data actually
//! received), and detect any single changed byte anywhere.

mod disk;
mod error;
mod format;
mod index;
mod info;
mod pages;
mod source;
mod stream;
mod writer;

pub use disk::{DISK_SECTOR, MAX_DISK_DATA, MAX_DISK_ZERO_RUNS};
pub use error::SnapshotError;
pub use format::{
    Header, RecordType, FLAG_ALIGNED, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_BLOCK_PAGES,
    MAX_BODY_LEN, MAX_DESCRIPTOR_LEN, MAX_DEVICE_ID_LEN, MAX_PAGES_BODY_LEN, MAX_PFN_END,
    MAX_RECORD_PAGES, MAX_RUNS, MAX_SKIPPED_BODY_LEN, OLDEST_FORMAT_VERSION, PAGE_SHIFT, PAGE_SIZE,
    RECORD_HEADER_LEN, RECORD_OPTIONAL,
};
pub use index::{split_device, verify_all, IndexedRecord, SnapshotIndex};
pub use info::{CpuFeatureWord, Info};
pub use pages::{is_zero_page, BlockRef, PageLocation, PageRun, PagesIndex};
pub use source::ReadAt;
pub use stream::{StreamItem, StreamReader};
pub use writer::SnapshotWriter;
