//! The allocated parts of a sparse file.

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The allocated byte ranges of `file` within `within`, widened to multiples of `align` (a
/// power of two) and clipped to `within`, in increasing order, touching ranges merged.
/// A file system that does not know holes reports the whole file as data.
pub fn allocated(
    file: &impl AsRawFd,
    within: Range<u64>,
    align: u64,
) -> io::Result<Vec<Range<u64>>> {
    debug_assert!(align.is_power_of_two());
    let fd = file.as_raw_fd();
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = within.start;
    while pos < within.end {
        let Some(data) = seek(fd, pos, libc::SEEK_DATA)? else {
            break; // nothing allocated from here on
        };
        if data >= within.end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(within.end);
        let start = (data & !(align - 1)).max(within.start);
        let end = hole
            .min(within.end)
            .checked_next_multiple_of(align)
            .unwrap_or(u64::MAX)
            .min(within.end);
        match out.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
        pos = end.max(data + 1);
    }
    Ok(out)
}

/// `lseek(fd, pos, whence)`; `None` where there is no more data (`ENXIO`).
fn seek(fd: i32, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let pos = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor the caller holds open; it touches no memory.
    let at = unsafe { libc::lseek(fd, pos, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn holes_are_left_out_and_ranges_aligned() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 * MIB).unwrap();
        file.write_all_at(b"x", 3 * MIB + 10).unwrap();
        file.write_all_at(&[7u8; 8192], 40 * MIB).unwrap();
        let all = allocated(&file, 0..64 * MIB, 4096).unwrap();
        // File systems allocate in blocks of their own (4 KiB or more): the data lies inside.
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].contains(&(3 * MIB + 10)) && all[0].end - all[0].start < MIB);
        assert!(all[1].start <= 40 * MIB && all[1].end >= 40 * MIB + 8192);
        assert!(all.iter().all(|r| r.start % 4096 == 0 && r.end % 4096 == 0));
        // Within a window: clipped to it.
        let window = allocated(&file, 40 * MIB + 4096..48 * MIB, 4096).unwrap();
        assert_eq!(window.first().map(|r| r.start), Some(40 * MIB + 4096));
        assert!(allocated(&file, 50 * MIB..64 * MIB, 4096)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_empty_file_has_nothing_allocated() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(MIB).unwrap();
        assert!(allocated(&file, 0..MIB, 4096).unwrap().is_empty());
    }
}
