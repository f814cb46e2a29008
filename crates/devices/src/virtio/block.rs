//! virtio-blk: a disk whose sectors live in a host backend (a raw image file or an NBD export).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Work, Worker};
use super::{
    lock_queue, next_chain, read_config_bytes, Activation, Interrupt, SharedQueue, VirtioDevice,
    TYPE_BLOCK,
};
use crate::state::{decode_state, encode_state, SavedState, StateError, VersionedState};
use crate::GuestMem;
use tern_storage::WriteLog;

/// Feature: the disk is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature: the device understands flush requests.
pub const F_FLUSH: u64 = 1 << 9;
/// Feature: `blk_size` in the configuration space is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Granularity of the write log: the block size guests use, so a 4 KiB write costs one
/// 4 KiB block sent again.
pub const WRITE_LOG_BLOCK: u64 = 4096;
/// Largest data transfer of one request (bounds the bounce buffer a guest can make us
/// allocate).
const MAX_REQUEST: usize = 4 << 20;

/// Where a disk's sectors are.
pub trait BlockBackend: Send + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes earlier writes durable (and visible to another host sharing the storage).
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens `path` (read-write unless `read_only`).
    pub fn open(path: &std::path::Path, read_only: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBackend {
            file,
            size,
            read_only,
        })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Saved state of the disk: its size, to refuse a restore onto a different disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub size: u64,
}

impl VersionedState for BlockState {
    const KIND: &'static str = "virtio-blk";
    const VERSION: u16 = 1;
}

/// A virtio block device.
pub struct VirtioBlock {
    id: String,
    serial: String,
    size: u64,
    read_only: bool,
    backend: Option<Box<dyn BlockBackend>>,
    worker: Option<Worker<BlockWork>>,
    sizes: [u16; 1],
    written: Arc<WriteLog>,
}

impl VirtioBlock {
    /// A disk `id` over `backend`; `serial` is what GET_ID returns (at most 20 bytes used).
    pub fn new(id: &str, serial: &str, backend: Box<dyn BlockBackend>) -> Self {
        VirtioBlock {
            id: id.to_string(),
            serial: serial.to_string(),
            size: backend.size(),
            read_only: backend.read_only(),
            written: Arc::new(WriteLog::new(backend.size(), WRITE_LOG_BLOCK)),
            backend: Some(backend),
            worker: None,
            sizes: [QUEUE_SIZE],
        }
    }

    /// The log of the blocks the guest writes (off until a migration starts it).
    pub fn write_log(&self) -> Arc<WriteLog> {
        self.written.clone()
    }

    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&(self.size / SECTOR).to_le_bytes());
        // size_max (8..12) and seg_max (12..16) are not offered; blk_size at 20..24.
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioBlock {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_FLUSH | F_BLK_SIZE | if self.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let backend = self.backend.take().ok_or("the disk backend is in use")?;
        let queue = a
            .queues
            .into_iter()
            .next()
            .ok_or("virtio-blk needs a queue")?;
        let event = a
            .queue_events
            .into_iter()
            .next()
            .ok_or("virtio-blk needs a queue")?;
        let mut serial = [0u8; 20];
        for (d, s) in serial.iter_mut().zip(self.serial.bytes()) {
            *d = s;
        }
        let work = BlockWork {
            mem: a.mem,
            queue,
            event,
            interrupt: a.interrupt,
            requests: Requests {
                backend,
                written: self.written.clone(),
                serial,
                buf: Vec::new(),
            },
        };
        self.worker = Some(
            Worker::spawn(&format!("{}-io", self.id), work, a.start_paused)
                .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.backend = w.stop().map(|work| work.requests.backend);
        }
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn state(&self) -> Result<Vec<u8>, StateError> {
        encode_state(&self.id, &BlockState { size: self.size })
    }

    fn set_state(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        let state: BlockState = decode_state(&self.id, saved)?;
        if state.size != self.size {
            return Err(StateError::Apply {
                id: self.id.clone(),
                reason: format!(
                    "the disk is {} bytes here but was {} bytes when saved",
                    self.size, state.size
                ),
            });
        }
        Ok(())
    }
}

/// The disk's worker: serves requests one after the other.
pub struct BlockWork {
    mem: GuestMem,
    queue: SharedQueue,
    event: EventFd,
    interrupt: Arc<Interrupt>,
    requests: Requests,
}

/// What serving a request needs besides the queue and guest memory.
struct Requests {
    backend: Box<dyn BlockBackend>,
    /// The blocks written, while a migration copies the disk.
    written: Arc<WriteLog>,
    serial: [u8; 20],
    /// Bounce buffer between guest memory and the backend.
    buf: Vec<u8>,
}

impl BlockWork {
    fn serve_queue(&mut self) {
        let mut served = false;
        let mut q = lock_queue(&self.queue);
        while let Some(chain) = next_chain(&mut q, &self.mem) {
            let head = chain.head_index();
            let written = match (chain.clone().reader(&self.mem), chain.writer(&self.mem)) {
                (Ok(reader), Ok(writer)) => self.requests.serve(reader, writer),
                _ => 0,
            };
            if q.add_used(&self.mem, head, written).is_err() {
                log::warn!("blk: cannot return a request");
            }
            served = true;
        }
        drop(q);
        if served {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Requests {
    /// Serves one request; returns the bytes written into guest buffers (data + status).
    fn serve<B: BitmapSlice>(
        &mut self,
        mut reader: Reader<'_, B>,
        mut writer: Writer<'_, B>,
    ) -> u32 {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let offset = u64::from_le_bytes(sector).checked_mul(SECTOR);
        // The status byte is the last writable byte of the chain, whatever happens before it.
        let data_room = writer.available_bytes().saturating_sub(1);
        let Ok(mut status_writer) = writer.split_at(data_room) else {
            return 0;
        };
        let (status, data_written) = match (kind, offset) {
            (T_IN, Some(offset)) => self.read_request(offset, data_room, &mut writer),
            (T_OUT, Some(offset)) => (self.write_request(offset, &mut reader), 0),
            (T_FLUSH, _) => (status_of(self.backend.flush()), 0),
            (T_GET_ID, _) => {
                let n = data_room.min(self.serial.len());
                let ok = writer.write_all(&self.serial[..n]).is_ok();
                (if ok { S_OK } else { S_IOERR }, n)
            }
            (T_IN | T_OUT, None) => (S_IOERR, 0),
            _ => (S_UNSUPP, 0),
        };
        if status_writer.write_all(&[status]).is_err() {
            return data_written as u32;
        }
        data_written as u32 + 1
    }

    fn in_range(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.backend.size())
    }

    fn read_request(&mut self, offset: u64, len: usize, writer: &mut impl Write) -> (u8, usize) {
        if len > MAX_REQUEST || !self.in_range(offset, len) || len as u64 % SECTOR != 0 {
            return (S_IOERR, 0);
        }
        self.buf.resize(len, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let result = self
            .backend
            .read_at(&mut buf, offset)
            .and_then(|_| writer.write_all(&buf));
        self.buf = buf;
        match result {
            Ok(()) => (S_OK, len),
            Err(e) => {
                log::warn!("blk: read of {len} bytes at {offset} failed: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn write_request<B: BitmapSlice>(&mut self, offset: u64, reader: &mut Reader<'_, B>) -> u8 {
        let len = reader.available_bytes();
        if self.backend.read_only() {
            return S_IOERR;
        }
        if len > MAX_REQUEST || !self.in_range(offset, len) || len as u64 % SECTOR != 0 {
            return S_IOERR;
        }
        // A migration slowing the guest down caps its writes too (auto-converge).
        self.written.throttle(len as u64);
        self.buf.resize(len, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let result = reader
            .read_exact(&mut buf)
            .and_then(|_| self.backend.write_at(&buf, offset));
        self.buf = buf;
        // After the write (a failed one may have written part): see `tern_storage::write_log`.
        self.written.mark(offset, len as u64);
        status_of(result)
    }
}

fn status_of(r: io::Result<()>) -> u8 {
    match r {
        Ok(()) => S_OK,
        Err(e) => {
            log::warn!("blk: request failed: {e}");
            S_IOERR
        }
    }
}

impl Work for BlockWork {
    fn sources(&self) -> Vec<(RawFd, bool)> {
        vec![(self.event.as_raw_fd(), false)]
    }

    fn handle(&mut self, _index: usize) {
        let _ = self.event.read();
        self.serve_queue();
    }

    fn wake(&mut self) {
        self.serve_queue();
    }

    fn quiesce(&mut self) {
        // Every request is complete when `serve_queue` returns; make the writes durable so the
        // other host of a migration sees them.
        if let Err(e) = self.requests.backend.flush() {
            log::warn!("blk: flush at pause failed: {e}");
        }
    }
}
