//! `pages_with_crcs` writes exactly what `pages` writes when given the same checksums, and
//! refuses checksums that do not match the number of blocks.

use tern_snapshot::{PageRun, SnapshotWriter};

fn page(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect()
}

#[test]
fn precomputed_checksums_give_the_same_file() {
    let runs = [
        PageRun {
            first_pfn: 3,
            pages: 3,
        },
        PageRun {
            first_pfn: 10,
            pages: 2,
        },
    ];
    let a: Vec<u8> = [page(1), page(2), page(3)].concat();
    let b: Vec<u8> = [page(4), page(5)].concat();
    let data: [&[u8]; 2] = [&a, &b];

    let mut plain = SnapshotWriter::new(Vec::new(), true).unwrap();
    plain.pages(&runs, &data, 2).unwrap();
    let plain = plain.finish().unwrap();

    // Blocks of 2 pages over the data in order: [p1 p2] [p3 p4] [p5].
    let all: Vec<u8> = [a.clone(), b.clone()].concat();
    let crcs: Vec<u32> = all.chunks(2 * 4096).map(crc32c::crc32c).collect();
    let mut pre = SnapshotWriter::new(Vec::new(), true).unwrap();
    pre.pages_with_crcs(&runs, &data, 2, &crcs).unwrap();
    assert_eq!(pre.finish().unwrap(), plain);

    let mut short = SnapshotWriter::new(Vec::new(), true).unwrap();
    assert!(short.pages_with_crcs(&runs, &data, 2, &crcs[..2]).is_err());
}
