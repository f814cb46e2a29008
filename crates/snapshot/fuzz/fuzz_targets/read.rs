//! Both readers on arbitrary bytes: they must return (an error, usually) without panicking,
//! and without allocating more than libFuzzer's `-malloc_limit_mb` allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_snapshot::{verify_all, SnapshotIndex, StreamReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = SnapshotIndex::open(data) {
        let _ = verify_all(data, &index);
        let _ = index.info();
        let _ = index.devices();
        let mut buf = Vec::new();
        for p in &index.pages {
            for b in 0..p.blocks().min(16) {
                let _ = p.block(b);
                let _ = p.read_block(data, b, &mut buf);
            }
            for run in p.runs.iter().take(16) {
                let _ = index.find_page(run.first_pfn);
                let _ = index.find_page(run.end_pfn());
            }
        }
    }
    if let Ok(mut reader) = StreamReader::new(data) {
        while let Ok(Some(_)) = reader.next() {}
    }
});
