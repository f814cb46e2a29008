//! DISK and DISK_ZEROS records: a guest's disk images copied in a migration stream
//! (`tern migrate --copy-storage`). Streams only; files never hold them.
//!
//! ```text
//! DISK       u32 disk, u32 reserved (0), u64 offset, data (a multiple of 512 bytes, 1 .. 4 MiB)
//! DISK_ZEROS u32 disk, u32 run count, runs of (u64 offset, u64 length), each a multiple of 512
//! ```
//!
//! `disk` is the disk's position among the disks the offer lists for copying. Later records
//! replace what earlier ones wrote at the same place; the record's checksum covers its data.

use std::ops::Range;

use crate::error::Fault;
use crate::format::le_u32;
use crate::format::le_u64;

/// Disk offsets and lengths are multiples of this (a sector).
pub const DISK_SECTOR: u64 = 512;
/// Most data in one DISK record.
pub const MAX_DISK_DATA: usize = 4 << 20;
/// Most runs in one DISK_ZEROS record.
pub const MAX_DISK_ZERO_RUNS: usize = 1 << 16;
pub(crate) const DISK_FIXED_LEN: usize = 16;
const RUN_LEN: usize = 16;

/// The fixed part of a DISK record's body for `len` bytes at `offset` of disk `disk`.
pub(crate) fn encode_disk_prefix(disk: u32, offset: u64) -> [u8; DISK_FIXED_LEN] {
    let mut b = [0u8; DISK_FIXED_LEN];
    b[0..4].copy_from_slice(&disk.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b
}

/// Checks what a DISK record's writer is asked to write.
pub(crate) fn check_disk_write(offset: u64, len: usize) -> Result<(), Fault> {
    if len == 0 || len > MAX_DISK_DATA {
        return Err(Fault::Corrupt(format!(
            "holds {len} bytes of disk data; a record holds 1 to {MAX_DISK_DATA}"
        )));
    }
    check_extent(offset, len as u64)
}

/// A DISK record's disk, offset and data, checked.
pub(crate) fn parse_disk(body: &[u8]) -> Result<(u32, u64, &[u8]), Fault> {
    if body.len() < DISK_FIXED_LEN {
        return Err(Fault::Corrupt(
            "is too short for a disk and an offset".into(),
        ));
    }
    if le_u32(body, 4) != 0 {
        return Err(Fault::Corrupt("has a nonzero reserved field".into()));
    }
    let (disk, offset) = (le_u32(body, 0), le_u64(body, 8));
    let data = &body[DISK_FIXED_LEN..];
    check_disk_write(offset, data.len())?;
    Ok((disk, offset, data))
}

/// The body of a DISK_ZEROS record for `runs` (byte ranges) of disk `disk`.
pub(crate) fn encode_disk_zeros(disk: u32, runs: &[Range<u64>]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + RUN_LEN * runs.len());
    b.extend_from_slice(&disk.to_le_bytes());
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for run in runs {
        b.extend_from_slice(&run.start.to_le_bytes());
        b.extend_from_slice(&(run.end - run.start).to_le_bytes());
    }
    b
}

/// Checks the runs of a DISK_ZEROS record: sector multiples, not empty, increasing, apart.
pub(crate) fn check_disk_runs(runs: &[Range<u64>]) -> Result<(), Fault> {
    if runs.is_empty() || runs.len() > MAX_DISK_ZERO_RUNS {
        return Err(Fault::Corrupt(format!(
            "has {} runs; a record has 1 to {MAX_DISK_ZERO_RUNS}",
            runs.len()
        )));
    }
    let mut end = 0;
    for (i, run) in runs.iter().enumerate() {
        if run.end <= run.start {
            return Err(Fault::Corrupt(format!("has an empty run {i}")));
        }
        check_extent(run.start, run.end - run.start)?;
        if i > 0 && run.start < end {
            return Err(Fault::Corrupt(format!(
                "has run {i} at {} before the end of the one before it",
                run.start
            )));
        }
        end = run.end;
    }
    Ok(())
}

/// A DISK_ZEROS record's disk and runs, checked.
pub(crate) fn parse_disk_zeros(body: &[u8]) -> Result<(u32, Vec<Range<u64>>), Fault> {
    if body.len() < 8 {
        return Err(Fault::Corrupt(
            "is too short for a disk and a run count".into(),
        ));
    }
    let (disk, count) = (le_u32(body, 0), le_u32(body, 4) as usize);
    if body.len() != 8 + RUN_LEN * count {
        return Err(Fault::Corrupt(format!(
            "is {} bytes long, but {count} runs take {}",
            body.len(),
            8 + RUN_LEN * count
        )));
    }
    let runs: Vec<Range<u64>> = body[8..]
        .chunks_exact(RUN_LEN)
        .map(|r| {
            let (start, len) = (le_u64(r, 0), le_u64(r, 8));
            start..start.saturating_add(len)
        })
        .collect();
    check_disk_runs(&runs)?;
    Ok((disk, runs))
}

fn check_extent(offset: u64, len: u64) -> Result<(), Fault> {
    if offset % DISK_SECTOR != 0 || len % DISK_SECTOR != 0 {
        return Err(Fault::Corrupt(format!(
            "has {len} bytes at offset {offset}: not whole 512-byte sectors"
        )));
    }
    if offset.checked_add(len).is_none() {
        return Err(Fault::Corrupt(format!(
            "has {len} bytes at offset {offset}, past any disk's end"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_bodies_round_trip_and_bad_ones_are_refused() {
        let mut body = encode_disk_prefix(2, 4096).to_vec();
        body.extend_from_slice(&[7u8; 1024]);
        let (disk, offset, data) = parse_disk(&body).unwrap();
        assert_eq!((disk, offset, data.len()), (2, 4096, 1024));
        assert!(parse_disk(&body[..DISK_FIXED_LEN]).is_err(), "no data");
        assert!(
            parse_disk(&body[..DISK_FIXED_LEN + 100]).is_err(),
            "part of a sector"
        );
        let odd = encode_disk_prefix(0, 100);
        assert!(parse_disk(&[&odd[..], &[0u8; 512][..]].concat()).is_err());
        let past = encode_disk_prefix(0, u64::MAX - 511);
        assert!(parse_disk(&[&past[..], &[0u8; 1024][..]].concat()).is_err());
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // runs are lists of ranges
    fn zero_runs_round_trip_and_bad_ones_are_refused() {
        let runs = vec![0..512, 4096..8192];
        let (disk, back) = parse_disk_zeros(&encode_disk_zeros(1, &runs)).unwrap();
        assert_eq!((disk, back), (1, runs));
        for bad in [
            vec![],
            vec![0..0],
            vec![0..100],
            vec![4096..8192, 0..512],
            vec![0..1024, 512..2048],
        ] {
            assert!(check_disk_runs(&bad).is_err(), "{bad:?}");
        }
        let mut body = encode_disk_zeros(0, &[0..512]);
        body.push(0);
        assert!(parse_disk_zeros(&body).is_err(), "a stray byte");
    }
}
