//! Any single changed byte and any truncation of a checkpoint is detected by both readers.

mod common;

use std::fs::File;
use std::io::Write;

use common::*;
use tern_snapshot::{verify_all, SnapshotError, SnapshotIndex};

#[test]
fn the_small_file_is_valid() {
    for aligned in [false, true] {
        let (bytes, expected) = small(aligned);
        assert!(bytes.len() < 40 << 10, "{} bytes", bytes.len());
        let index = read_index(&bytes).unwrap();
        assert_eq!(index.pages.len(), 2);
        assert_eq!(read_stream(&bytes).unwrap(), expected.items);
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    for aligned in [false, true] {
        let (mut bytes, _) = small(aligned);
        for pos in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                bytes[pos] ^= bit;
                let index = read_index(&bytes);
                assert!(
                    index.is_err(),
                    "aligned {aligned}: byte {pos} ^ {bit:#x} passed the index"
                );
                let stream = read_stream(&bytes);
                assert!(
                    stream.is_err(),
                    "aligned {aligned}: byte {pos} ^ {bit:#x} passed the stream"
                );
                bytes[pos] ^= bit;
            }
        }
    }
}

#[test]
fn every_truncation_is_detected() {
    for aligned in [false, true] {
        let (bytes, _) = small(aligned);
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            for err in [read_index(cut).unwrap_err(), read_stream(cut).unwrap_err()] {
                if len == 0 {
                    assert!(matches!(err, SnapshotError::NotTern), "{err:?}");
                } else {
                    assert!(
                        matches!(err, SnapshotError::Truncated { .. }),
                        "length {len}: {err:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn flipped_page_data_in_a_real_file() {
    // The lazy path: indexing succeeds (page data is not read), the block read fails.
    let (mut bytes, _) = small(true);
    let clean = read_index(&bytes).unwrap();
    let block = clean.pages[0].block(1);
    bytes[block.file_offset as usize] ^= 0x40;
    let mut file: File = tempfile::tempfile().unwrap();
    file.write_all(&bytes).unwrap();
    let index = SnapshotIndex::open(&file).unwrap();
    let mut buf = Vec::new();
    index.pages[0].read_block(&file, 0, &mut buf).unwrap();
    let err = index.pages[0].read_block(&file, 1, &mut buf).unwrap_err();
    assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err:?}");
    assert!(verify_all(&file, &index).is_err());
    // A file cut after indexing reads as truncated.
    file.set_len(block.file_offset + 1).unwrap();
    let err = index.pages[0].read_block(&file, 1, &mut buf).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err:?}");
}
