//! [`NbdDisk`]: an NBD export as a disk for a block device back-end.
//!
//! A virtio-blk worker wants `read_at`/`write_at` on a shared handle returning `io::Result`,
//! and the disk's geometry up front; this wraps one [`NbdClient`] behind a mutex (uncontended
//! with one worker thread, and it keeps requests on the connection strictly sequential).

use std::io;
use std::sync::{Mutex, MutexGuard};

use crate::client::{ConnectOptions, NbdClient};

/// An NBD export used as a disk.
#[derive(Debug)]
pub struct NbdDisk {
    client: Mutex<NbdClient>,
    size: u64,
    read_only: bool,
    alignment: u32,
    can_discard: bool,
    can_flush: bool,
}

impl NbdDisk {
    /// Connects to `export` on `addr` (`host:port`).
    pub fn connect(addr: &str, export: &str, options: &ConnectOptions) -> io::Result<NbdDisk> {
        Ok(NbdDisk::new(NbdClient::connect(addr, export, options)?))
    }

    /// Wraps a connected client.
    pub fn new(client: NbdClient) -> NbdDisk {
        NbdDisk {
            size: client.size(),
            read_only: client.read_only(),
            alignment: client.alignment(),
            can_discard: client.flags().can_trim() && !client.read_only(),
            can_flush: client.flags().can_flush(),
            client: Mutex::new(client),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if writes will be refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The alignment every offset and length must keep (1 if the server set none; at most
    /// 64 KiB). A virtio-blk device should advertise a logical block size of at least this.
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// True if [`NbdDisk::discard`] does something.
    pub fn can_discard(&self) -> bool {
        self.can_discard
    }

    /// True if the server has a write cache that [`NbdDisk::flush`] flushes (virtio-blk's
    /// `VIRTIO_BLK_F_FLUSH`).
    pub fn can_flush(&self) -> bool {
        self.can_flush
    }

    /// Reads `buf.len()` bytes at `offset` (argument order as `std::os::unix::fs::FileExt`
    /// and the virtio-blk back-end trait).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Ok(self.lock()?.read(offset, buf)?)
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.lock()?.write(offset, buf)?)
    }

    /// Writes `buf` at `offset`, durably.
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.lock()?.write_fua(offset, buf)?)
    }

    /// Makes acknowledged writes durable.
    pub fn flush(&self) -> io::Result<()> {
        Ok(self.lock()?.flush()?)
    }

    /// Discards `len` bytes at `offset`; fails with `Unsupported` if the server cannot.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(self.lock()?.trim(offset, len)?)
    }

    /// True while the connection is sound; after a failure the caller reconnects.
    pub fn is_usable(&self) -> bool {
        self.lock().map(|c| c.is_usable()).unwrap_or(false)
    }

    /// The client, e.g. to disconnect explicitly.
    pub fn into_client(self) -> io::Result<NbdClient> {
        self.client.into_inner().map_err(|_| poisoned())
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, NbdClient>> {
        // Poisoned only if a thread panicked mid-request, leaving the stream in an unknown
        // state: refuse rather than misread replies.
        self.client.lock().map_err(|_| poisoned())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("NBD connection unusable: a thread panicked while using it")
}
