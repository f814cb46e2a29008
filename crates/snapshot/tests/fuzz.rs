//! Property tests: arbitrary bytes, and mutations of valid checkpoints, never make either
//! reader panic, and changed files are never accepted. (The allocation bound is checked in
//! `alloc_bound.rs`, which counts allocations.)

mod common;

use common::*;
use proptest::prelude::*;

/// Numbers that make interesting lengths and counts.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    15,
    16,
    17,
    24,
    4095,
    4096,
    4097,
    1 << 16,
    1 << 20,
    (1 << 20) + 1,
    1 << 22,
    (1 << 22) + 1,
    16 << 20,
    (16 << 20) + 1,
    64 << 20,
    (64 << 20) + 1,
    u32::MAX as u64,
    1 << 40,
    1 << 52,
    (1 << 52) - 1,
    u64::MAX,
    u64::MAX - 23,
];

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Overwrites 8 bytes with a large or boundary value.
    Overwrite {
        at: usize,
        value: u64,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..5000usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), prop::sample::select(INTERESTING))
            .prop_map(|(at, value)| Mutation::Overwrite { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip { at, xor } => bytes[at % len] ^= xor,
        Mutation::Insert { at, bytes: ins } => {
            let at = at % (len + 1);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Delete { at, len: n } => {
            let at = at % len;
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Overwrite { at, value } => {
            let at = at % len;
            let end = (at + 8).min(len);
            bytes[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
        }
    }
}

/// Runs both readers to the end; only panics matter to the caller (and the result).
fn run_readers(bytes: &[u8]) -> (bool, bool) {
    (read_index(bytes).is_ok(), read_stream(bytes).is_ok())
}

/// Writes `value` over field `field` (in 4-byte units) of the record at `rec`, then makes the
/// record's header and body checksums match again, so the reader looks past them.
fn reseal(bytes: &mut [u8], rec: usize, field: usize, value: u64, wide: bool) {
    let body = rec + 24;
    let body_len = u64::from_le_bytes(bytes[rec + 8..rec + 16].try_into().unwrap());
    let span = 24 + body_len.min(256) as usize;
    let at = rec + (field * 4) % span;
    let n = if wide { 8 } else { 4 };
    let end = (at + n).min(bytes.len());
    bytes[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
    // The body checksum (PAGES: over the descriptor only), then the header checksum.
    let ty = u32::from_le_bytes(bytes[rec..rec + 4].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[rec + 8..rec + 16].try_into().unwrap());
    let avail = (bytes.len() - body.min(bytes.len())) as u64;
    let mut covered = len.min(avail);
    if ty == 6 && covered >= 16 {
        let data_offset = u32::from_le_bytes(bytes[body + 8..body + 12].try_into().unwrap());
        covered = covered.min(u64::from(data_offset));
    }
    let crc = crc32c::crc32c(&bytes[body.min(bytes.len())..body + covered as usize]);
    bytes[rec + 16..rec + 20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&bytes[rec..rec + 20]);
    bytes[rec + 20..rec + 24].copy_from_slice(&hcrc.to_le_bytes());
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (index_ok, stream_ok) = run_readers(&bytes);
        prop_assert!(!index_ok && !stream_ok);
    }

    #[test]
    fn arbitrary_records_after_a_valid_header(
        aligned in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut bytes = header(1, aligned);
        bytes.extend(tail);
        let (index_ok, stream_ok) = run_readers(&bytes);
        prop_assert!(!index_ok && !stream_ok);
    }

    #[test]
    fn mutated_files_are_refused(
        aligned in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let (original, _) = small(aligned);
        let mut bytes = original.clone();
        for m in &mutations {
            if bytes.is_empty() {
                break;
            }
            apply(&mut bytes, m);
        }
        let (index_ok, _) = run_readers(&bytes);
        prop_assert!(!index_ok || bytes == original, "{:?}", mutations);
    }

    #[test]
    fn resealed_fields_never_panic(
        aligned in any::<bool>(),
        rec in any::<usize>(),
        field in 0usize..64,
        value in prop::sample::select(INTERESTING),
        wide in any::<bool>(),
    ) {
        let (mut bytes, _) = small(aligned);
        let offsets = record_offsets(&bytes);
        reseal(&mut bytes, offsets[rec % offsets.len()], field, value, wide);
        run_readers(&bytes);
    }
}
