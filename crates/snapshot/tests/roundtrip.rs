//! Round trips through the writer and both readers, and the reader's answers to foreign,
//! newer, unknown and badly ended input.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};

use common::*;
use tern_snapshot::{
    verify_all, PageRun, PagesIndex, RecordType, SnapshotError, SnapshotIndex, SnapshotWriter,
    StreamItem, StreamReader, PAGE_SIZE,
};

/// The current contents of every page of `pages` (later records win).
fn latest_pages(pages: &[PagesSpec]) -> HashMap<u64, Vec<u8>> {
    let mut map = HashMap::new();
    for p in pages {
        for r in &p.runs {
            for pfn in r.first_pfn..r.end_pfn() {
                map.insert(pfn, page(pfn, p.salt));
            }
        }
    }
    map
}

/// Checks everything an index says against what was written.
fn check_index(index: &SnapshotIndex, src: &File, expected: &Expected, aligned: bool) {
    assert_eq!(index.header.version, tern_snapshot::FORMAT_VERSION);
    assert_eq!(index.header.aligned, aligned);
    assert_eq!(index.info().unwrap(), sample_info());
    assert_eq!(index.record(RecordType::CONFIG).unwrap().body, CONFIG);
    assert_eq!(index.record(RecordType::MACHINE).unwrap().body, MACHINE);
    let vcpus: Vec<&[u8]> = index
        .all(RecordType::VCPU)
        .map(|r| r.body.as_slice())
        .collect();
    assert_eq!(vcpus, [&b"vcpu0 registers"[..], b"vcpu1 registers"]);
    assert_eq!(
        index.devices().unwrap(),
        [
            ("serial0".to_string(), &b"\x01\x02uart"[..]),
            ("i8042".to_string(), &b""[..])
        ]
    );
    assert_eq!(
        index.record(RecordType::NOTE).unwrap().body,
        b"saved by the tests"
    );
    let non_pages: Vec<RecordType> = index.records.iter().map(|r| r.ty).collect();
    let want: Vec<RecordType> = expected
        .items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Record { ty, .. } => Some(*ty),
            StreamItem::Pages { .. }
            | StreamItem::Zeros { .. }
            | StreamItem::Missing { .. }
            | StreamItem::Disk { .. }
            | StreamItem::DiskZeros { .. } => None,
        })
        .collect();
    assert_eq!(non_pages, want);
    // Every record, including PAGES and the unknown optional one, is counted.
    assert_eq!(index.record_count(), expected.items.len() as u64 + 1);
    for r in &index.records {
        let mut hdr = [0u8; 24];
        std::os::unix::fs::FileExt::read_exact_at(src, &mut hdr, r.offset).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), r.ty.0);
    }
    assert_eq!(index.pages.len(), expected.pages.len());
    for (p, spec) in index.pages.iter().zip(&expected.pages) {
        check_pages(p, spec, src, aligned);
    }
    check_lookups(index, src, &expected.pages);
    verify_all(src, index).unwrap();
}

fn check_pages(p: &PagesIndex, spec: &PagesSpec, src: &File, aligned: bool) {
    assert_eq!(p.runs, spec.runs);
    assert_eq!(p.block_pages, spec.block_pages);
    let data = spec.data();
    assert_eq!(p.total_pages * PAGE_SIZE as u64, data.len() as u64);
    let block_bytes = spec.block_pages as usize * PAGE_SIZE;
    assert_eq!(p.blocks() as usize, data.len().div_ceil(block_bytes));
    assert_eq!(p.block_crcs.len() as u64, p.blocks());
    if aligned {
        assert_eq!(p.data_file_offset % PAGE_SIZE as u64, 0);
    }
    let mut buf = Vec::new();
    for b in 0..p.blocks() {
        let block = p.block(b);
        let start = b as usize * block_bytes;
        let want = &data[start..(start + block_bytes).min(data.len())];
        assert_eq!(block.len, want.len() as u64);
        assert_eq!(block.file_offset, p.data_file_offset + start as u64);
        p.read_block(src, b, &mut buf).unwrap();
        assert_eq!(buf, want);
        // The segments name the pages of the block, in data order.
        let mut at = 0;
        for &(first, pages) in &block.segments {
            for pfn in first..first + u64::from(pages) {
                assert_eq!(&buf[at..at + PAGE_SIZE], page(pfn, spec.salt));
                assert_eq!(p.find(pfn), Some(b));
                at += PAGE_SIZE;
            }
        }
        assert_eq!(at, buf.len());
    }
    assert_eq!(p.block(p.blocks()).len, 0);
    assert!(p.read_block(src, p.blocks(), &mut buf).is_err());
}

/// `find_page` returns the last record holding each page, and only pages that were saved.
fn check_lookups(index: &SnapshotIndex, src: &File, pages: &[PagesSpec]) {
    let mut buf = Vec::new();
    for (pfn, contents) in latest_pages(pages) {
        let (p, loc) = index.find_page(pfn).unwrap();
        p.read_block(src, loc.block, &mut buf).unwrap();
        let block_start = loc.block * u64::from(p.block_pages);
        let at = ((loc.data_index - block_start) as usize) * PAGE_SIZE;
        assert_eq!(&buf[at..at + PAGE_SIZE], contents, "pfn {pfn:#x}");
        let mut one = vec![0u8; PAGE_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(src, &mut one, loc.file_offset).unwrap();
        assert_eq!(one, contents);
    }
    for pfn in [
        16,
        31,
        37,
        39,
        48,
        0xffff,
        0x1_0003,
        (1 << 40) + 9,
        u64::MAX,
    ] {
        assert!(index.find_page(pfn).is_none(), "pfn {pfn:#x}");
    }
}

fn write_file(bytes: &[u8]) -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

#[test]
fn aligned_file_round_trip() {
    let (bytes, expected) = full(true);
    let file = write_file(&bytes);
    let index = SnapshotIndex::open(&file).unwrap();
    check_index(&index, &file, &expected, true);
    assert_eq!(index.file_len(), bytes.len() as u64);
    // An aligned file is also a valid stream.
    let mut r = StreamReader::new(io::BufReader::new(&file)).unwrap();
    assert!(r.header().aligned);
    let mut items = Vec::new();
    while let Some(item) = r.next().unwrap() {
        items.push(item);
    }
    assert_eq!(items, expected.items);
    assert!(r.next().unwrap().is_none());
    assert_eq!(r.position(), bytes.len() as u64);
    let mut rest = Vec::new();
    r.into_inner().read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn stream_round_trip() {
    let (bytes, expected) = full(false);
    assert_eq!(read_stream(&bytes).unwrap(), expected.items);
    // An unaligned stream saved to a file can be indexed too.
    let file = write_file(&bytes);
    let index = SnapshotIndex::open(&file).unwrap();
    check_index(&index, &file, &expected, false);
}

#[test]
fn writing_straight_to_a_file() {
    let file = tempfile::tempfile().unwrap();
    let pages = [
        PagesSpec::new(vec![run(7, 3)], 2, 9),
        PagesSpec::new(vec![run(1, 1), run(2, 300)], 64, 8),
    ];
    let mut w = SnapshotWriter::new(BufWriter::new(&file), true).unwrap();
    w.info(&sample_info()).unwrap();
    for p in &pages {
        p.write(&mut w);
    }
    let written = w.bytes_written();
    w.finish().unwrap().flush().unwrap();
    let index = SnapshotIndex::open(&file).unwrap();
    assert_eq!(index.file_len(), written + 24 + 8);
    for (p, spec) in index.pages.iter().zip(&pages) {
        check_pages(p, spec, &file, true);
    }
    verify_all(&file, &index).unwrap();
}

#[test]
fn aligned_data_offsets() {
    // Descriptors of many sizes put the data at every possible misalignment before padding.
    let mut w = SnapshotWriter::new(Vec::new(), true).unwrap();
    let mut specs = Vec::new();
    for n in 1..40u64 {
        let runs: Vec<PageRun> = (0..n).map(|i| run(i * 10, 1)).collect();
        let spec = PagesSpec::new(runs, 1 + (n as u32 % 3), n as u8);
        w.note(&"x".repeat(n as usize * 37)).unwrap();
        spec.write(&mut w);
        specs.push(spec);
    }
    let bytes = w.finish().unwrap();
    let index = read_index(&bytes).unwrap();
    assert_eq!(index.pages.len(), specs.len());
    for p in &index.pages {
        assert_eq!(p.data_file_offset % PAGE_SIZE as u64, 0);
    }
    let items = read_stream(&bytes).unwrap();
    assert_eq!(items.len(), 2 * specs.len());
}

#[test]
fn many_runs_need_several_vectored_writes() {
    let runs: Vec<PageRun> = (0..3000).map(|i| run(i * 2, 1)).collect();
    let spec = PagesSpec::new(runs, 3, 4);
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    spec.write(&mut w);
    let bytes = w.finish().unwrap();
    let items = read_stream(&bytes).unwrap();
    assert_eq!(
        items,
        [StreamItem::Pages {
            runs: spec.runs.clone(),
            data: spec.data()
        }]
    );
}

/// A writer that takes a few bytes at a time and is sometimes interrupted.
struct Dribble {
    out: Vec<u8>,
    calls: usize,
}

impl Write for Dribble {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 5 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(1 + self.calls % 7);
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn short_and_interrupted_writes() {
    let (bytes, _) = small(true);
    let mut w = SnapshotWriter::new(
        Dribble {
            out: Vec::new(),
            calls: 1,
        },
        true,
    )
    .unwrap();
    w.info(&sample_info()).unwrap();
    w.record(RecordType::CONFIG, CONFIG).unwrap();
    w.record(RecordType::MACHINE, MACHINE).unwrap();
    w.record(RecordType::VCPU, b"vcpu0 registers").unwrap();
    PagesSpec::new(vec![run(0, 2), run(5, 1)], 2, 1).write(&mut w);
    w.device("serial0", b"\x01\x02uart").unwrap();
    w.note("saved by the tests").unwrap();
    PagesSpec::new(vec![run(1, 1), run(100, 2)], 2, 2).write(&mut w);
    assert_eq!(w.finish().unwrap().out, bytes);
}

/// A writer that fails after `budget` bytes.
struct Failing {
    budget: usize,
}

impl Write for Failing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.budget);
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_stops_after_an_error() {
    let mut w = SnapshotWriter::new(Failing { budget: 40 }, false).unwrap();
    assert!(w.record(RecordType::CONFIG, CONFIG).is_err());
    let err = w.record(RecordType::VCPU, b"").unwrap_err();
    assert!(err.to_string().contains("earlier write failed"), "{err}");
    assert!(w.finish().is_err());
}

#[test]
fn writer_refuses_what_readers_would_refuse() {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    let page = vec![0u8; PAGE_SIZE];
    let two = vec![0u8; 2 * PAGE_SIZE];
    let bad = |e: io::Error| assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    bad(w.record(RecordType::PAGES, b"").unwrap_err());
    bad(w.record(RecordType::END, b"").unwrap_err());
    bad(w.record(RecordType::DEVICE, b"\x00\x00").unwrap_err());
    bad(w.record(RecordType::NOTE, b"\xff").unwrap_err());
    bad(w
        .record(RecordType::CONFIG, &vec![0; (16 << 20) + 1])
        .unwrap_err());
    bad(w.device("", b"").unwrap_err());
    bad(w.device(&"d".repeat(65), b"").unwrap_err());
    bad(w.pages(&[run(0, 1)], &[&page], 0).unwrap_err());
    bad(w.pages(&[run(0, 1)], &[&page], 1025).unwrap_err());
    bad(w.pages(&[run(0, 1)], &[&two], 1).unwrap_err());
    bad(w.pages(&[run(0, 1)], &[], 1).unwrap_err());
    bad(w.pages(&[run(0, 0)], &[&[]], 1).unwrap_err());
    bad(w
        .pages(&[run(4, 1), run(4, 1)], &[&page, &page], 1)
        .unwrap_err());
    bad(w
        .pages(&[run(5, 1), run(4, 1)], &[&page, &page], 1)
        .unwrap_err());
    bad(w.pages(&[run(1 << 52, 1)], &[&page], 1).unwrap_err());
    // Nothing was written by the refused calls, and an empty page set writes nothing.
    w.pages(&[], &[], 1).unwrap();
    assert_eq!(w.records_written(), 0);
    let bytes = w.finish().unwrap();
    assert_eq!(bytes.len(), 32 + 24 + 8);
    assert!(read_stream(&bytes).unwrap().is_empty());
    assert!(read_index(&bytes).unwrap().records.is_empty());
}

#[test]
fn unknown_optional_records_are_skipped() {
    let mut b = header(1, false);
    b.extend(raw_record(0x8000_7777, b"something new"));
    b.extend(raw_record(3, b"m"));
    b.extend(raw_record(0x8000_0999, &[0xaa; 3000]));
    b.extend(raw_end(3));
    assert_eq!(
        read_stream(&b).unwrap(),
        [StreamItem::Record {
            ty: RecordType::MACHINE,
            body: b"m".to_vec()
        }]
    );
    let index = read_index(&b).unwrap();
    assert_eq!(index.records.len(), 1);
    assert_eq!(index.records[0].seq, 2);
    // Their bodies are still checked.
    let at = 32 + 24 + 2;
    b[at] ^= 1;
    assert!(matches!(
        read_index(&b),
        Err(SnapshotError::Corrupt { offset: 32, .. })
    ));
    assert!(matches!(
        read_stream(&b),
        Err(SnapshotError::Corrupt { offset: 32, .. })
    ));
}

#[test]
fn unknown_mandatory_records_are_refused() {
    let mut b = header(1, false);
    b.extend(raw_record(3, b"m"));
    let offset = b.len() as u64;
    b.extend(raw_record(0x42, b"needs understanding"));
    b.extend(raw_end(2));
    for err in [read_index(&b).unwrap_err(), read_stream(&b).unwrap_err()] {
        match &err {
            SnapshotError::UnknownMandatory {
                ty: 0x42,
                offset: o,
            } if *o == offset => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!("it needs a newer tern: the record at offset {offset} has type 0x00000042, which this tern does not know and cannot skip")
        );
    }
}

#[test]
fn unsupported_versions_are_refused_naming_both() {
    let ours = env!("CARGO_PKG_VERSION");
    let mut b = header(3, true);
    b[20] = 0xff; // a header layout this tern does not know
    b.extend(b"whatever version 3 has");
    for err in [read_index(&b).unwrap_err(), read_stream(&b).unwrap_err()] {
        assert!(matches!(
            err,
            SnapshotError::UnsupportedVersion { found: 3 }
        ));
        assert_eq!(
            err.to_string(),
            format!("it has format version 3, newer than tern {ours} reads (versions 1 to 2)")
        );
    }
    // Version 0 never existed: older than anything this tern reads.
    let mut b = header(0, false);
    b.extend(raw_end(0));
    let err = read_index(&b).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("it has format version 0, older than tern {ours} reads (versions 1 to 2)")
    );
}

#[test]
fn tern_0_1_format_is_still_read() {
    let mut b = header(1, false);
    b.extend(raw_end(0));
    let index = read_index(&b).expect("a version-1 file");
    assert_eq!(index.header.version, 1);
}

#[test]
fn foreign_files_are_not_tern() {
    let elf = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00";
    let random: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let inputs: [&[u8]; 5] = [elf, b"", &random, b"TERNSNAQ and more", b"x"];
    for input in inputs {
        for err in [
            read_index(input).unwrap_err(),
            read_stream(input).unwrap_err(),
        ] {
            assert!(matches!(err, SnapshotError::NotTern), "{err:?}");
            assert_eq!(err.to_string(), "it is not a tern checkpoint");
        }
    }
    let empty = tempfile::tempfile().unwrap();
    assert!(matches!(
        SnapshotIndex::open(&empty),
        Err(SnapshotError::NotTern)
    ));
}

#[test]
fn end_rules() {
    let mut b = header(1, true);
    b.extend(raw_record(3, b"m"));
    // No END at all.
    for err in [read_index(&b).unwrap_err(), read_stream(&b).unwrap_err()] {
        assert_eq!(
            err.to_string(),
            "it is truncated: it ends after record 1, without an END record"
        );
    }
    // An END that miscounts.
    let mut wrong = b.clone();
    wrong.extend(raw_end(5));
    let err = read_index(&wrong).unwrap_err();
    assert_eq!(
        err.to_string(),
        "it is corrupt: record 2 (END) at offset 57: says 5 records precede it, but 1 do"
    );
    assert!(matches!(
        read_stream(&wrong),
        Err(SnapshotError::Corrupt { .. })
    ));
    // Bytes after END: a file must end there; a stream stops reading at END.
    b.extend(raw_end(1));
    let mut trailing = b.clone();
    trailing.extend(b"junk");
    let err = read_index(&trailing).unwrap_err();
    assert!(matches!(err, SnapshotError::Corrupt { offset: 89, .. }));
    assert!(
        err.to_string().contains("4 bytes follow its END record"),
        "{err}"
    );
    assert_eq!(read_stream(&trailing).unwrap().len(), 1);
    let mut r = StreamReader::new(&trailing[..]).unwrap();
    while r.next().unwrap().is_some() {}
    assert_eq!(r.into_inner(), b"junk");
}

#[test]
fn messages_name_the_record() {
    let (mut bytes, _) = small(false);
    let offsets = record_offsets(&bytes);
    // Record 4 is the VCPU record: cut the file inside it.
    let vcpu = offsets[3];
    let err = read_index(&bytes[..vcpu + 30]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("it is truncated: it ends inside record 4 (VCPU) at offset {vcpu}")
    );
    let err = read_stream(&bytes[..vcpu + 30]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("it is truncated: it ends inside record 4 (VCPU) at offset {vcpu}")
    );
    // A changed byte in the CONFIG body.
    let config = offsets[1];
    bytes[config + 24] ^= 0x80;
    let err = read_index(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("it is corrupt: record 2 (CONFIG) at offset {config} fails its checksum")
    );
    bytes[config + 24] ^= 0x80;
    // A changed byte in the page data of record 8 (the second PAGES record), block 1.
    let pages = offsets[7];
    let index = read_index(&bytes).unwrap();
    let block = index.pages[1].block(1);
    bytes[block.file_offset as usize + 5] ^= 1;
    let err = read_index(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "it is corrupt: record 8 (PAGES) at offset {pages}: page block 1 fails its checksum"
        )
    );
    assert_eq!(err.offset(), Some(block.file_offset));
    let err = read_stream(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "it is corrupt: record 8 (PAGES) at offset {pages}: page block 1 fails its checksum"
        )
    );
    // The header of a record.
    bytes[block.file_offset as usize + 5] ^= 1;
    bytes[pages + 9] ^= 1;
    let err = read_index(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("it is corrupt: the header of record 8 at offset {pages} fails its checksum")
    );
}

#[test]
fn info_is_required_by_info() {
    let mut b = header(1, false);
    b.extend(raw_record(1, b"{not json"));
    b.extend(raw_end(1));
    let index = read_index(&b).unwrap();
    let err = index.info().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("it is corrupt: record 1 (INFO) at offset 32: its JSON is not valid"),
        "{err}"
    );
    let mut b = header(1, false);
    b.extend(raw_end(0));
    let err = read_index(&b).unwrap().info().unwrap_err();
    assert_eq!(err.to_string(), "it is corrupt: it has no INFO record");
}

#[test]
fn zeros_records_travel_in_streams() {
    let spec = PagesSpec::new(vec![run(0x10, 2), run(0x20, 1)], 2, 9);
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    spec.write(&mut w);
    w.zeros(&[run(0x11, 1), run(0x40, 3)]).unwrap();
    w.zeros(&[]).unwrap();
    let bytes = w.finish().unwrap();
    let items = read_stream(&bytes).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1],
        StreamItem::Zeros {
            runs: vec![run(0x11, 1), run(0x40, 3)]
        }
    );
    // A file never holds them: a checkpoint stores each page once.
    let err = SnapshotIndex::open(&bytes).unwrap_err().to_string();
    assert!(err.contains("ZEROS"), "{err}");
}

#[test]
fn missing_records_travel_in_streams_only() {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    w.missing(&[run(0x11, 1), run(0x40, 3)]).unwrap();
    w.missing(&[]).unwrap();
    let bytes = w.finish().unwrap();
    let items = read_stream(&bytes).unwrap();
    assert_eq!(
        items,
        vec![StreamItem::Missing {
            runs: vec![run(0x11, 1), run(0x40, 3)]
        }]
    );
    let err = SnapshotIndex::open(&bytes).unwrap_err().to_string();
    assert!(err.contains("MISSING"), "{err}");
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    assert!(w.missing(&[run(5, 1), run(5, 1)]).is_err());
}

#[test]
fn zeros_runs_are_checked_like_page_runs() {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    assert!(w.zeros(&[run(5, 1), run(5, 1)]).is_err());
    assert!(w.zeros(&[run(5, 0)]).is_err());
}

#[test]
fn a_recycled_buffer_is_reused_for_the_next_pages_record() {
    let a = PagesSpec::new(vec![run(0, 8)], 4, 1);
    let b = PagesSpec::new(vec![run(100, 2)], 4, 2);
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    a.write(&mut w);
    b.write(&mut w);
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let Some(StreamItem::Pages { data, .. }) = r.next().unwrap() else {
        panic!("expected pages");
    };
    assert_eq!(data, a.data());
    let ptr = data.as_ptr();
    r.recycle(data);
    let Some(StreamItem::Pages { data, runs }) = r.next().unwrap() else {
        panic!("expected pages");
    };
    assert_eq!(runs, b.runs);
    assert_eq!(data, b.data());
    assert_eq!(data.as_ptr(), ptr, "the recycled buffer is used again");
    assert!(r.next().unwrap().is_none());
}

#[test]
fn marks_are_read_as_records() {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    w.mark(7).unwrap();
    let bytes = w.finish().unwrap();
    assert_eq!(
        read_stream(&bytes).unwrap(),
        [StreamItem::Record {
            ty: RecordType::MARK,
            body: 7u64.to_le_bytes().to_vec()
        }]
    );
    let mut b = header(1, false);
    b.extend(raw_record(RecordType::MARK.0, b"short"));
    b.extend(raw_end(1));
    assert!(read_stream(&b)
        .unwrap_err()
        .to_string()
        .contains("instead of 8"));
}
