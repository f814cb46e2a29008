//! A disk image arriving from another host: written under a temporary name in a directory
//! of this host's choosing, sparse, and given its final name only when the migration
//! commits. Dropped before that, it is removed: a failed migration leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why an incoming image cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("the image name {0:?} is not a plain file name")]
    BadName(String),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{dir} has {free} bytes free; the image needs {needed}")]
    NoSpace {
        dir: PathBuf,
        free: u64,
        needed: u64,
    },
    #[error("a write of {len} bytes at {offset} is outside the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// An image being received; removed on drop unless committed.
#[derive(Debug)]
pub struct IncomingImage {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    size: u64,
    committed: bool,
    /// Bytes written since writeback was last started.
    unflushed: std::sync::atomic::AtomicU64,
}

/// Writeback of what arrived is started every this many bytes, so that a sync (at the end of
/// each round, and the last one inside the guest's downtime) finds little left to write.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl IncomingImage {
    /// Starts receiving image `name` (a plain file name) of `size` bytes in `dir`, of which
    /// `needed` bytes will be allocated: refused if `dir/name` exists or `dir` has less room.
    pub fn create(
        dir: &Path,
        name: &str,
        size: u64,
        needed: u64,
    ) -> Result<IncomingImage, IncomingError> {
        // Not empty, no directory part, not hidden (`..` and our own `.NAME.incoming` files).
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(IncomingError::BadName(name.to_string()));
        }
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(IncomingError::Exists(path));
        }
        let free = free_bytes(dir).map_err(|source| IncomingError::Io {
            what: "cannot look at the free space of",
            path: dir.to_path_buf(),
            source,
        })?;
        if free < needed {
            return Err(IncomingError::NoSpace {
                dir: dir.to_path_buf(),
                free,
                needed,
            });
        }
        let partial = Self::partial_path_of(dir, name);
        remove_if_stale(&partial);
        let io = |what| {
            let partial = partial.clone();
            move |source| IncomingError::Io {
                what,
                path: partial,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(io("cannot create"))?;
        // Held while this receiver lives: a later one tells a live image from a leftover.
        if !lock(&file) {
            return Err(io("cannot lock")(std::io::Error::last_os_error()));
        }
        let image = IncomingImage {
            file,
            partial: partial.clone(),
            path,
            size,
            committed: false,
            unflushed: std::sync::atomic::AtomicU64::new(0),
        };
        // Holes everywhere to start with: what never arrives reads as zeros.
        image.file.set_len(size).map_err(io("cannot size"))?;
        Ok(image)
    }

    /// Where the image will be once committed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the image is until committed.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// The temporary name under which image `name` arrives in `dir` (for whoever cleans up
    /// after a receiver that was killed).
    pub fn partial_path_of(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!(".{name}.incoming"))
    }

    /// Makes what was written so far durable.
    pub fn sync(&self) -> Result<(), IncomingError> {
        self.file
            .sync_data()
            .map_err(|source| self.io_error("cannot sync", source))
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), IncomingError> {
        use std::sync::atomic::Ordering;
        self.check(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| self.io_error("cannot write", source))?;
        let pending = self
            .unflushed
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if pending + data.len() as u64 >= WRITEBACK_EVERY {
            self.unflushed.store(0, Ordering::Relaxed);
            // SAFETY: starts writeback of the file's dirty pages; waits for nothing, touches
            // no memory of ours. A failure only means the later sync has more to do.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros, holding no blocks.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), IncomingError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.out_of_range(offset, len));
        };
        // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // A file system that cannot punch holes gets zeros written.
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// The image is the guest's now: made durable and given its final name.
    pub fn commit(mut self) -> Result<PathBuf, IncomingError> {
        self.file
            .sync_all()
            .map_err(|source| self.io_error("cannot sync", source))?;
        if self.path.symlink_metadata().is_ok() {
            return Err(IncomingError::Exists(self.path.clone()));
        }
        std::fs::rename(&self.partial, &self.path)
            .map_err(|source| self.io_error("cannot rename", source))?;
        self.committed = true;
        Ok(self.path.clone())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), IncomingError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(self.out_of_range(offset, len)),
        }
    }

    fn out_of_range(&self, offset: u64, len: u64) -> IncomingError {
        IncomingError::OutOfRange {
            offset,
            len,
            size: self.size,
        }
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> IncomingError {
        IncomingError::Io {
            what,
            path: self.partial.clone(),
            source,
        }
    }
}

impl Drop for IncomingImage {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Removes `partial` if it was left by a receiver that died: every receiver holds a lock
/// on its temporary image for as long as it lives, so one that can be locked has none. A
/// receiver's image stays, and creating the image again fails on it.
fn remove_if_stale(partial: &Path) {
    let Ok(file) = File::options().read(true).open(partial) else {
        return;
    };
    if lock(&file) {
        let _ = std::fs::remove_file(partial);
    }
}

/// Takes an exclusive lock on `file` without waiting; false if another holds one.
fn lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor we hold; it touches no memory.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Bytes an unprivileged writer may still allocate in the file system of `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs writes into the struct we pass and reads the NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocated;

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_image_arrives_sparse_and_is_named_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let img = IncomingImage::create(dir.path(), "web.img", 64 * MIB, MIB).unwrap();
        img.write(8 * MIB, &[5u8; 4096]).unwrap();
        img.write(9 * MIB, &[6u8; 4096]).unwrap();
        img.zero(9 * MIB, 4096).unwrap();
        assert!(
            !dir.path().join("web.img").exists(),
            "named before the commit"
        );
        let path = img.commit().unwrap();
        assert_eq!(path, dir.path().join("web.img"));
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 64 * MIB);
        let data = allocated(&file, 0..64 * MIB, 4096).unwrap();
        let bytes: u64 = data.iter().map(|r| r.end - r.start).sum();
        assert!(bytes < 2 * MIB, "not sparse: {data:?}");
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 8 * MIB).unwrap();
        assert_eq!(back, [5u8; 4096]);
        file.read_exact_at(&mut back, 9 * MIB).unwrap();
        assert_eq!(back, [0u8; 4096]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_leftover_of_a_dead_receiver_is_replaced_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let live = IncomingImage::create(dir.path(), "a.img", MIB, 0).unwrap();
        assert!(
            IncomingImage::create(dir.path(), "a.img", MIB, 0).is_err(),
            "a receiver is writing it"
        );
        drop(live);
        // A killed receiver leaves its image, and its lock goes with its process.
        let partial = IncomingImage::partial_path_of(dir.path(), "a.img");
        std::fs::write(&partial, b"half").unwrap();
        let img = IncomingImage::create(dir.path(), "a.img", MIB, 0).unwrap();
        img.commit().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_dropped_image_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = IncomingImage::create(dir.path(), "a.img", MIB, 0).unwrap();
        img.write(0, b"data").unwrap();
        drop(img);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn clashes_bad_names_full_disks_and_stray_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("taken.img"), b"mine").unwrap();
        assert!(matches!(
            IncomingImage::create(dir.path(), "taken.img", MIB, 0),
            Err(IncomingError::Exists(_))
        ));
        for bad in ["", "../x", "a/b", ".hidden", ".."] {
            assert!(
                matches!(
                    IncomingImage::create(dir.path(), bad, MIB, 0),
                    Err(IncomingError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        let e = IncomingImage::create(dir.path(), "big.img", MIB, u64::MAX).unwrap_err();
        assert!(e.to_string().contains("bytes free"), "{e}");
        let img = IncomingImage::create(dir.path(), "b.img", MIB, 0).unwrap();
        assert!(matches!(
            img.write(MIB - 2, b"abc"),
            Err(IncomingError::OutOfRange { .. })
        ));
        assert!(img.write(u64::MAX, b"a").is_err());
        assert!(img.zero(MIB, 1).is_err());
        // The image that was there is untouched.
        assert_eq!(
            std::fs::read(dir.path().join("taken.img")).unwrap(),
            b"mine"
        );
    }
}
