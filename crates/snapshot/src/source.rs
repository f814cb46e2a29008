//! Positioned reads, so that the file reader needs neither `Seek` nor `&mut`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::SnapshotError;

/// Something the file reader can read at arbitrary offsets: a [`File`] (with `pread`), or
/// bytes in memory (tests, tools that already hold a checkpoint).
///
/// Positioned reads let several threads (a fault handler and a background loader) read one
/// file through a shared reference.
pub trait ReadAt {
    /// Total length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails with [`io::ErrorKind::UnexpectedEof`] if the data ends
    /// first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len() as u64 => {
                // Both bounds are at most self.len(), which is a usize.
                buf.copy_from_slice(&self[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

/// Reads `buf` at `offset`, turning the data ending early into the error `on_eof` makes.
pub(crate) fn read_at<S: ReadAt + ?Sized>(
    src: &S,
    buf: &mut [u8],
    offset: u64,
    on_eof: impl FnOnce() -> SnapshotError,
) -> Result<(), SnapshotError> {
    src.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            on_eof()
        } else {
            SnapshotError::Io(e)
        }
    })
}
