//! Page data to and from disk without the page cache.
//!
//! A checkpoint's page data is guest memory, already resident and page-aligned, and page
//! records put it at 4096-aligned file offsets. Writing it with O_DIRECT moves it from guest
//! memory to the disk with no copy and, above all, without allocating a page-cache page per
//! guest page: on hosts whose free memory is handed back to a hypervisor (free page reporting,
//! as on the build machine) those allocations, not the disk, dominate a buffered save
//! (0.5 GB/s buffered against 3.5 GB/s direct there). The data is also on the disk when the
//! write returns, so the final fsync has little left to do.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment O_DIRECT needs for buffers, offsets and lengths.
pub const ALIGN: usize = 4096;

fn aligned(x: usize) -> bool {
    x % ALIGN == 0
}

/// Writes a new file sequentially: page-aligned runs of whole pages at page-aligned offsets go
/// through an O_DIRECT descriptor, everything else through the page cache. The two never share
/// a page of the file, so neither sees stale data of the other.
pub struct DirectFileWriter {
    buffered: File,
    direct: Option<File>,
    offset: u64,
}

impl DirectFileWriter {
    /// Writes a new, empty file through `buffered` and, where the file system has O_DIRECT,
    /// through `direct`, the same file opened with it.
    pub fn new(buffered: File, direct: Option<File>) -> Self {
        DirectFileWriter {
            buffered,
            direct,
            offset: 0,
        }
    }

    /// The file, for flushing to disk.
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Gives back the file.
    pub fn into_file(self) -> File {
        self.buffered
    }

    /// Writes a run of consecutive slices that are all direct-capable.
    fn write_direct(&mut self, direct: &File, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices outlive the call.
        let n = unsafe {
            libc::pwritev(
                direct.as_raw_fd(),
                bufs.as_ptr() as *const libc::iovec,
                bufs.len().min(1024) as i32,
                self.offset as i64,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn direct_capable(&self, buf: &[u8]) -> bool {
        !buf.is_empty() && aligned(buf.as_ptr() as usize) && aligned(buf.len())
    }
}

impl Write for DirectFileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let bufs = &bufs[first..];
        let direct_run = bufs.iter().take_while(|b| self.direct_capable(b)).count();
        let n = match &self.direct {
            Some(direct) if direct_run > 0 && aligned(self.offset as usize) => {
                let direct = direct.try_clone()?;
                self.write_direct(&direct, &bufs[..direct_run])?
            }
            _ => self.buffered.write_at(&bufs[0], self.offset)?,
        };
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
            len: 0,
        }
    }

    /// Makes the buffer `len` bytes long (contents unspecified) and returns it.
    pub fn resize(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(ALIGN).max(ALIGN);
            let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
            // SAFETY: non-zero size, valid alignment.
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        self.len = len;
        // SAFETY: ptr..ptr+len is owned, initialised memory (zeroed at allocation).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    /// The current contents.
    pub fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: as in `resize`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            let layout = Layout::from_size_align(self.cap, ALIGN).expect("valid layout");
            // SAFETY: allocated with this layout in `resize`.
            unsafe { dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

/// Opens `path` for reading with O_DIRECT, if the file system allows it.
pub fn open_direct(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Reads `len` bytes at `offset` into `buf`: directly when `direct` is given and the request is
/// aligned, through `file` otherwise.
pub fn read_at<'a>(
    file: &File,
    direct: Option<&File>,
    offset: u64,
    len: usize,
    buf: &'a mut AlignedBuf,
) -> io::Result<&'a [u8]> {
    let src = match direct {
        Some(d) if aligned(offset as usize) && aligned(len) => d,
        _ => file,
    };
    let data = buf.resize(len);
    src.read_exact_at(data, offset)?;
    Ok(buf.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn mixed_writes_produce_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let files = crate::save::CheckpointFiles::create(&path).unwrap();
        let mut w = DirectFileWriter::new(files.file, files.direct);
        let mut page = AlignedBuf::new();
        page.resize(2 * ALIGN).fill(7);
        let head = vec![1u8; ALIGN - 10];
        let pad = vec![0u8; 10];
        let mut slices = [
            IoSlice::new(&head),
            IoSlice::new(&pad),
            IoSlice::new(page.as_slice()),
        ];
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = w.write_vectored(rest).unwrap();
            IoSlice::advance_slices(&mut rest, n);
        }
        w.write_all(b"tail").unwrap();
        let file = w.into_file();
        file.sync_all().unwrap();
        let mut data = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut data).unwrap();
        let mut expected = head.clone();
        expected.extend_from_slice(&pad);
        expected.extend_from_slice(&[7u8; 2 * ALIGN]);
        expected.extend_from_slice(b"tail");
        assert_eq!(data, expected);

        let direct = open_direct(&path);
        let mut buf = AlignedBuf::new();
        let got = read_at(
            &file_for_read(&path),
            direct.as_ref(),
            ALIGN as u64,
            2 * ALIGN,
            &mut buf,
        )
        .unwrap();
        assert!(got.iter().all(|&b| b == 7));
    }

    fn file_for_read(path: &Path) -> File {
        File::open(path).unwrap()
    }
}
