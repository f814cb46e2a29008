//! Hostile inputs that declare huge lengths and counts fail fast, and neither reader
//! allocates much more than the input it was given. This test binary counts every allocation
//! (a wrapping global allocator) and has a single test, so nothing else allocates meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tern_snapshot::{SnapshotError, StreamReader, MAX_SKIPPED_BODY_LEN};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, keeping track of the bytes allocated now and at the peak.
struct Counting;

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Ordering::SeqCst);
}

// SAFETY: every call is passed on to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` hold for `System` too.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with this layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the most memory it had allocated at once.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let result = f();
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(base);
    (result, peak)
}

const MIB: usize = 1 << 20;

/// What the readers may allocate for an input of `len` bytes: a small constant plus a small
/// factor of the input (the stream reader's buffers double as data arrives).
fn allowance(len: usize) -> usize {
    2 * MIB + 4 * len
}

/// Both readers refuse `bytes`, quickly, within their allowance; returns the errors.
fn refuse(name: &str, bytes: &[u8]) -> (SnapshotError, SnapshotError) {
    let start = Instant::now();
    let (index, index_peak) = peak_of(|| read_index(bytes));
    let (stream, stream_peak) = peak_of(|| read_stream(bytes));
    let elapsed = start.elapsed();
    let index = index
        .err()
        .unwrap_or_else(|| panic!("{name}: index accepted it"));
    let stream = stream
        .err()
        .unwrap_or_else(|| panic!("{name}: stream accepted it"));
    let allowed = allowance(bytes.len());
    assert!(
        index_peak <= allowed,
        "{name}: index peak {index_peak} > {allowed}"
    );
    assert!(
        stream_peak <= allowed,
        "{name}: stream peak {stream_peak} > {allowed}"
    );
    assert!(elapsed < Duration::from_secs(2), "{name}: took {elapsed:?}");
    (index, stream)
}

fn file(records: &[Vec<u8>]) -> Vec<u8> {
    let mut b = header(1, false);
    for r in records {
        b.extend_from_slice(r);
    }
    b
}

/// A PAGES descriptor's fixed fields.
fn fixed(run_count: u32, block_pages: u32, data_offset: u32) -> Vec<u8> {
    [run_count, block_pages, data_offset, 0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// A PAGES record header declaring `length`, with a body checksum over `desc`, then `desc`.
fn pages_record(length: u64, desc: &[u8]) -> Vec<u8> {
    let mut b = raw_header(6, length, crc32c::crc32c(desc));
    b.extend_from_slice(desc);
    b
}

/// A complete descriptor for `runs` (pfn, pages) in blocks of `block_pages`, zero checksums.
fn descriptor(runs: &[(u64, u32)], block_pages: u32) -> Vec<u8> {
    let total: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
    let blocks = total.div_ceil(u64::from(block_pages)) as usize;
    let len = 16 + 16 * runs.len() + 4 * blocks;
    let mut d = fixed(runs.len() as u32, block_pages, len as u32);
    for (pfn, pages) in runs {
        d.extend_from_slice(&pfn.to_le_bytes());
        d.extend_from_slice(&pages.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
    }
    d.resize(len, 0);
    d
}

fn is_too_large(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::TooLarge { .. })
}

fn is_truncated(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Truncated { .. })
}

fn is_corrupt(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Corrupt { .. })
}

fn declared_lengths() {
    let body = b"0123456789";
    let crc = crc32c::crc32c(body);
    let with_body = |ty: u32, len: u64| {
        let mut r = raw_header(ty, len, crc);
        r.extend_from_slice(body);
        file(&[r])
    };
    let (i, s) = refuse("CONFIG of u64::MAX bytes", &with_body(2, u64::MAX));
    assert!(is_too_large(&i) && is_too_large(&s), "{i:?} {s:?}");
    let (i, s) = refuse("CONFIG of 16 MiB, 10 sent", &with_body(2, 16 << 20));
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
    let (i, s) = refuse(
        "optional record of 16 GiB",
        &with_body(0x8000_0100, 1 << 34),
    );
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
    let too_big = with_body(0x8000_0100, MAX_SKIPPED_BODY_LEN + 1);
    let (i, s) = refuse("optional record over the limit", &too_big);
    assert!(is_too_large(&i) && is_too_large(&s), "{i:?} {s:?}");
    let (i, s) = refuse("END of u64::MAX bytes", &with_body(7, u64::MAX));
    assert!(is_corrupt(&i) && is_corrupt(&s), "{i:?} {s:?}");
    let (i, s) = refuse("PAGES of u64::MAX bytes", &with_body(6, u64::MAX));
    assert!(is_too_large(&i) && is_too_large(&s), "{i:?} {s:?}");
    let device = raw_record(5, &[0xff, 0xff, b'x']);
    let (i, s) = refuse("DEVICE id of 65535 bytes", &file(&[device]));
    assert!(is_corrupt(&i) && is_corrupt(&s), "{i:?} {s:?}");
}

fn page_counts() {
    let huge_desc = fixed(1 << 20, 1024, 64 << 20);
    let b = file(&[pages_record(1 << 34, &huge_desc)]);
    let (i, s) = refuse("PAGES of 16 GiB with a 64 MiB descriptor", &b);
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
    let b = file(&[pages_record((64 << 20) + 1000, &huge_desc)]);
    let (i, s) = refuse("a 64 MiB descriptor, 16 bytes sent", &b);
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
    let tiny = fixed(1 << 20, 1, 16);
    let b = file(&[pages_record(16, &tiny), raw_end(1)]);
    let (i, s) = refuse("a million runs in a 16-byte body", &b);
    assert!(is_corrupt(&i) && is_corrupt(&s), "{i:?} {s:?}");
    let b = file(&[pages_record(16, &fixed((1 << 20) + 1, 1, 16))]);
    let (i, s) = refuse("too many runs", &b);
    assert!(is_too_large(&i) && is_too_large(&s), "{i:?} {s:?}");
    let d = descriptor(&[(0, 1 << 22)], 1024);
    let b = file(&[pages_record(d.len() as u64 + (1u64 << 34), &d)]);
    let (i, s) = refuse("16 GiB of pages declared, none sent", &b);
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
    let d = descriptor(&[(0, 1 << 21), (1 << 30, (1 << 21) + 1)], 1024);
    let b = file(&[pages_record(d.len() as u64 + ((1u64 << 22) + 1) * 4096, &d)]);
    let (i, s) = refuse("more than 2^22 pages", &b);
    // The file reader sees first that the file is shorter than the record.
    assert!(is_truncated(&i) && is_too_large(&s), "{i:?} {s:?}");
    let d = descriptor(&[(u64::MAX - 1, 4)], 1);
    let mut b = file(&[pages_record(d.len() as u64 + 4 * 4096, &d)]);
    b.resize(b.len() + 4 * 4096, 0);
    let (i, s) = refuse("a run past 2^52", &b);
    for e in [i, s] {
        assert!(e.to_string().contains("52-bit page number space"), "{e}");
    }
}

fn many_small_records() {
    let note = raw_record(0x8000_0001, b"n");
    let records: Vec<Vec<u8>> = (0..20_000).map(|_| note.clone()).collect();
    let b = file(&records);
    let (i, s) = refuse("20000 notes without END", &b);
    assert!(is_truncated(&i) && is_truncated(&s), "{i:?} {s:?}");
}

/// Every boundary value in every field of every record of a valid file, checksums fixed up.
fn resealed_fields() {
    for aligned in [false, true] {
        let (clean, _) = small(aligned);
        for rec in record_offsets(&clean) {
            for at in (rec..(rec + 96).min(clean.len())).step_by(4) {
                for value in [u64::MAX, 1 << 40, 1 << 22, 64 << 20, 1 << 20, 4096, 16, 0] {
                    let mut b = clean.clone();
                    let end = (at + 8).min(b.len());
                    b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
                    fix_checksums(&mut b, rec);
                    let (_, index_peak) = peak_of(|| read_index(&b).is_ok());
                    let (_, stream_peak) = peak_of(|| read_stream(&b).is_ok());
                    let allowed = allowance(b.len());
                    assert!(index_peak <= allowed, "record {rec} +{at}: {index_peak}");
                    assert!(stream_peak <= allowed, "record {rec} +{at}: {stream_peak}");
                }
            }
        }
    }
}

/// Recomputes the header checksum (and, where the body is all there, the body checksum) of
/// the record at `rec`.
fn fix_checksums(b: &mut [u8], rec: usize) {
    let len = u64::from_le_bytes(b[rec + 8..rec + 16].try_into().unwrap());
    let body = rec + 24;
    let avail = b.len().saturating_sub(body) as u64;
    let mut covered = len.min(avail);
    if b[rec] == 6 && covered >= 16 {
        let data_offset = u32::from_le_bytes(b[body + 8..body + 12].try_into().unwrap());
        covered = covered.min(u64::from(data_offset));
    }
    let crc = crc32c::crc32c(&b[body..body + covered as usize]);
    b[rec + 16..rec + 20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&b[rec..rec + 20]);
    b[rec + 20..rec + 24].copy_from_slice(&hcrc.to_le_bytes());
}

/// A peer that declares 16 GiB of pages and sends 8 MiB: the reader holds about what it got.
fn stream_grows_with_the_data() {
    let d = descriptor(&[(0, 1 << 22)], 1024);
    let mut prefix = header(1, false);
    prefix.extend(pages_record(d.len() as u64 + (1u64 << 34), &d));
    let sent = 8 * MIB;
    let input = io::Cursor::new(prefix).chain(io::repeat(0x55).take(sent as u64));
    let (result, peak) = peak_of(|| {
        let mut r = StreamReader::new(input).unwrap();
        r.next().map(|_| ())
    });
    assert!(
        matches!(result, Err(SnapshotError::Truncated { .. })),
        "{result:?}"
    );
    assert!(peak <= 2 * sent + 2 * MIB, "peak {peak}");
}

#[test]
fn hostile_lengths_fail_fast_without_big_allocations() {
    // The counter sees allocations at all.
    let (v, peak) = peak_of(|| vec![1u8; 3 * MIB]);
    assert!(peak >= 3 * MIB && v.len() == 3 * MIB);
    declared_lengths();
    page_counts();
    many_small_records();
    resealed_fields();
    stream_grows_with_the_data();
}
