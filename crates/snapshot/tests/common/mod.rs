//! Helpers shared by the integration tests: sample checkpoints, raw record crafting, and
//! readers that run to the end.
#![allow(dead_code)]

use tern_snapshot::{
    verify_all, CpuFeatureWord, Info, PageRun, RecordType, SnapshotError, SnapshotIndex,
    SnapshotWriter, StreamItem, StreamReader, PAGE_SIZE,
};

/// Deterministic, page-specific contents for page `pfn` of generation `salt`.
pub fn page(pfn: u64, salt: u8) -> Vec<u8> {
    let mut x = pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(salt).wrapping_mul(0x1234_5678_9abc_def1)
        ^ 1;
    let mut out = Vec::with_capacity(PAGE_SIZE);
    while out.len() < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The contents of the pages of `run`, generation `salt`.
pub fn run_data(run: PageRun, salt: u8) -> Vec<u8> {
    (run.first_pfn..run.end_pfn())
        .flat_map(|pfn| page(pfn, salt))
        .collect()
}

pub fn run(first_pfn: u64, pages: u32) -> PageRun {
    PageRun { first_pfn, pages }
}

/// A PAGES record to write: runs, block size, and the generation of its contents.
#[derive(Clone, Debug)]
pub struct PagesSpec {
    pub runs: Vec<PageRun>,
    pub block_pages: u32,
    pub salt: u8,
}

impl PagesSpec {
    pub fn new(runs: Vec<PageRun>, block_pages: u32, salt: u8) -> Self {
        PagesSpec {
            runs,
            block_pages,
            salt,
        }
    }

    /// The record's data, in run order.
    pub fn data(&self) -> Vec<u8> {
        self.runs
            .iter()
            .flat_map(|r| run_data(*r, self.salt))
            .collect()
    }

    pub fn write<W: std::io::Write>(&self, w: &mut SnapshotWriter<W>) {
        let bufs: Vec<Vec<u8>> = self.runs.iter().map(|r| run_data(*r, self.salt)).collect();
        let slices: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        w.pages(&self.runs, &slices, self.block_pages).unwrap();
    }
}

pub fn sample_info() -> Info {
    Info {
        tern_version: "0.1.0".into(),
        created_unix: 1_700_000_000,
        host: "host1".into(),
        guest_name: "web".into(),
        guest_uuid: "6f1c3d2e-0000-4000-8000-000000000001".into(),
        memory_bytes: 64 << 20,
        vcpus: 2,
        cpu_features: vec![
            CpuFeatureWord {
                leaf: 1,
                subleaf: 0,
                regs: [0x806f8, 0x800, 0xfffa3203, 0x178bfbff],
            },
            CpuFeatureWord {
                leaf: 7,
                subleaf: 0,
                regs: [0, 0x219c07ab, 0x4, 0],
            },
        ],
    }
}

pub const CONFIG: &[u8] = br#"{"name":"web","memory":64,"vcpus":2}"#;
pub const MACHINE: &[u8] = b"machine-state: layout, clock, irqchip";

/// What a sample checkpoint holds, to compare readers' results with.
#[derive(Clone, Debug)]
pub struct Expected {
    pub items: Vec<StreamItem>,
    pub pages: Vec<PagesSpec>,
}

/// The items (in stream order) a reader should return for the records `build` writes.
fn expected_items(pages: &[PagesSpec], full: bool) -> Vec<StreamItem> {
    let rec = |ty, body: &[u8]| StreamItem::Record {
        ty,
        body: body.to_vec(),
    };
    let dev = |id: &str, state: &[u8]| {
        let mut body = (id.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(state);
        StreamItem::Record {
            ty: RecordType::DEVICE,
            body,
        }
    };
    let pages_item = |p: &PagesSpec| StreamItem::Pages {
        runs: p.runs.clone(),
        data: p.data(),
    };
    let mut items = vec![
        rec(RecordType::INFO, &sample_info().to_json().unwrap()),
        rec(RecordType::CONFIG, CONFIG),
        rec(RecordType::MACHINE, MACHINE),
        rec(RecordType::VCPU, b"vcpu0 registers"),
    ];
    if full {
        items.push(rec(RecordType::VCPU, b"vcpu1 registers"));
    }
    items.push(pages_item(&pages[0]));
    items.push(dev("serial0", b"\x01\x02uart"));
    if full {
        items.push(dev("i8042", b""));
    }
    items.push(rec(RecordType::NOTE, b"saved by the tests"));
    for p in &pages[1..] {
        items.push(pages_item(p));
    }
    items
}

/// Writes a checkpoint: every record type, the given PAGES records, and (when `full`) an
/// unknown optional record as well.
pub fn build(aligned: bool, pages: &[PagesSpec], full: bool) -> (Vec<u8>, Expected) {
    let mut w = SnapshotWriter::new(Vec::new(), aligned).unwrap();
    w.info(&sample_info()).unwrap();
    w.record(RecordType::CONFIG, CONFIG).unwrap();
    w.record(RecordType::MACHINE, MACHINE).unwrap();
    w.record(RecordType::VCPU, b"vcpu0 registers").unwrap();
    if full {
        w.record(RecordType::VCPU, b"vcpu1 registers").unwrap();
    }
    pages[0].write(&mut w);
    w.device("serial0", b"\x01\x02uart").unwrap();
    if full {
        w.device("i8042", b"").unwrap();
        w.record(RecordType(0x8000_0042), b"from a newer tern")
            .unwrap();
    }
    w.note("saved by the tests").unwrap();
    for p in &pages[1..] {
        p.write(&mut w);
    }
    let bytes = w.finish().unwrap();
    let expected = Expected {
        items: expected_items(pages, full),
        pages: pages.to_vec(),
    };
    (bytes, expected)
}

/// The small but complete checkpoint of the corruption tests: two PAGES records of a few
/// pages in blocks of 2.
pub fn small(aligned: bool) -> (Vec<u8>, Expected) {
    let pages = [
        PagesSpec::new(vec![run(0, 2), run(5, 1)], 2, 1),
        PagesSpec::new(vec![run(1, 1), run(100, 2)], 2, 2),
    ];
    build(aligned, &pages, false)
}

/// A larger checkpoint with several PAGES records of several block sizes, overlapping pages,
/// and an unknown optional record.
pub fn full(aligned: bool) -> (Vec<u8>, Expected) {
    let pages = [
        PagesSpec::new(vec![run(0, 16), run(32, 5), run(0x1_0000, 3)], 4, 1),
        PagesSpec::new(vec![run(3, 2), run(33, 1)], 1, 2),
        PagesSpec::new(vec![run(40, 1), run(41, 7), run(1 << 40, 9)], 1024, 3),
    ];
    build(aligned, &pages, true)
}

/// Indexes `bytes` and verifies all page data.
pub fn read_index(bytes: &[u8]) -> Result<SnapshotIndex, SnapshotError> {
    let index = SnapshotIndex::open(bytes)?;
    verify_all(bytes, &index)?;
    Ok(index)
}

/// Reads `bytes` as a stream up to END.
pub fn read_stream(bytes: &[u8]) -> Result<Vec<StreamItem>, SnapshotError> {
    let mut r = StreamReader::new(bytes)?;
    let mut items = Vec::new();
    while let Some(item) = r.next()? {
        items.push(item);
    }
    Ok(items)
}

/// A file header for `version`, with a correct checksum.
pub fn header(version: u32, aligned: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"TERNSNAP");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&32u32.to_le_bytes());
    b.extend_from_slice(&u32::from(aligned).to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A record header declaring `length` for `ty`, with correct checksums for `body`.
pub fn raw_header(ty: u32, length: u64, body_crc: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A complete record of type `ty` with body `body`.
pub fn raw_record(ty: u32, body: &[u8]) -> Vec<u8> {
    let mut b = raw_header(ty, body.len() as u64, crc32c::crc32c(body));
    b.extend_from_slice(body);
    b
}

/// An END record stating `count` records before it.
pub fn raw_end(count: u64) -> Vec<u8> {
    raw_record(7, &count.to_le_bytes())
}

/// The offsets of the records of a valid checkpoint.
pub fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 32;
    while at + 24 <= bytes.len() {
        offsets.push(at);
        let len = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        at += 24 + len as usize;
    }
    offsets
}
