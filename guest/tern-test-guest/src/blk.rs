//! virtio-blk driver: one request queue, a fixed set of request slots (header, data buffer and
//! status byte each, as a three-descriptor chain at descriptors 3r..3r+2), polled like the net
//! device: interrupts are asked for only just before the owning CPU sleeps.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::virtio::{
    self, QueueError, QueueMem, SplitQueue, Transport, DESC_F_NEXT, DESC_F_WRITE, QMAX,
};

const F_SIZE_MAX: u64 = 1 << 1;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Status values (`VIRTIO_BLK_S_*`); `NO_STATUS` is what the guest leaves in the status byte,
/// so a device that completes a request without writing one is noticed.
pub const S_OK: u8 = 0;
pub const NO_STATUS: u8 = 0xff;

/// Requests in flight at most.
pub const SLOTS: usize = 16;
/// Largest data buffer of one request.
pub const SLOT_BYTES: usize = 64 * 1024;
pub const SECTOR: u64 = 512;

#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
struct Slots {
    data: [[u8; SLOT_BYTES]; SLOTS],
    headers: [Header; SLOTS],
    status: [u8; SLOTS],
}

static mut QUEUE: QueueMem = QueueMem::EMPTY;
static mut SLOT_MEM: Slots = Slots {
    data: [[0; SLOT_BYTES]; SLOTS],
    headers: [Header {
        kind: 0,
        reserved: 0,
        sector: 0,
    }; SLOTS],
    status: [0; SLOTS],
};
static TAKEN: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    Read,
    Write,
    Flush,
}

pub struct VirtioBlk {
    t: Transport,
    q: SplitQueue,
    mem: &'static mut Slots,
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub can_flush: bool,
    /// Largest data buffer per request (at most `SLOT_BYTES`, less if the device says so).
    pub max_bytes: usize,
    /// Usable slots (the queue must hold three descriptors per slot).
    slots: usize,
    busy: [bool; SLOTS],
    broken: bool,
}

impl VirtioBlk {
    /// Initialises the block device behind `t` (the first one only: its queue is a static).
    pub fn new(t: Transport) -> Result<VirtioBlk, &'static str> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err("only one virtio-blk device is supported");
        }
        let features = t.negotiate(
            virtio::F_VERSION_1,
            F_SIZE_MAX | F_RO | F_FLUSH | virtio::F_ACCESS_PLATFORM,
        )?;
        // SAFETY: TAKEN makes these the only references to the statics.
        let (qmem, mem) = unsafe { (&mut *addr_of_mut!(QUEUE), &mut *addr_of_mut!(SLOT_MEM)) };
        let mut q = t.setup_queue(0, qmem, QMAX as u16)?;
        let slots = (usize::from(q.size()) / 3).min(SLOTS);
        if slots == 0 {
            t.fail();
            return Err("the request queue is too small");
        }
        let capacity = t.config_u64(0);
        let mut max_bytes = SLOT_BYTES;
        if features & F_SIZE_MAX != 0 {
            let size_max = t.config_u32(8) as usize;
            max_bytes = max_bytes.min(size_max & !4095);
            if max_bytes == 0 {
                t.fail();
                return Err("the device's size_max is below 4 KiB");
            }
        }
        q.set_interrupts(false);
        t.driver_ok();
        Ok(VirtioBlk {
            t,
            q,
            mem,
            capacity,
            read_only: features & F_RO != 0,
            can_flush: features & F_FLUSH != 0,
            max_bytes,
            slots,
            busy: [false; SLOTS],
            broken: false,
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// A slot with no request in flight.
    pub fn free_slot(&self) -> Option<usize> {
        if self.broken {
            return None;
        }
        (0..self.slots).find(|&s| !self.busy[s])
    }

    /// Slots with requests in flight.
    pub fn in_flight(&self) -> usize {
        self.busy[..self.slots].iter().filter(|&&b| b).count()
    }

    /// The data buffer of `slot` (fill it before a write; read it after a read completes).
    pub fn data(&mut self, slot: usize) -> &mut [u8; SLOT_BYTES] {
        &mut self.mem.data[slot % SLOTS]
    }

    /// Queues a request on a free `slot`: `len` bytes (a multiple of 512, at most `max_bytes`)
    /// at `sector`. Published to the device by `kick`.
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, len: usize) {
        if slot >= self.slots || self.busy[slot] || self.broken {
            return;
        }
        let len = len.min(self.max_bytes);
        self.mem.headers[slot] = Header {
            kind: match op {
                Op::Read => T_IN,
                Op::Write => T_OUT,
                Op::Flush => T_FLUSH,
            },
            reserved: 0,
            sector: if op == Op::Flush { 0 } else { sector },
        };
        unsafe { core::ptr::write_volatile(&mut self.mem.status[slot], NO_STATUS) };
        let head = (3 * slot) as u16;
        let header = core::ptr::addr_of!(self.mem.headers[slot]) as u64;
        let data = self.mem.data[slot].as_ptr() as u64;
        let status = core::ptr::addr_of!(self.mem.status[slot]) as u64;
        let header_len = core::mem::size_of::<Header>() as u32;
        match op {
            Op::Flush => {
                self.q
                    .set_desc(head, header, header_len, DESC_F_NEXT, head + 2);
            }
            Op::Read | Op::Write => {
                let data_flags = DESC_F_NEXT | if op == Op::Read { DESC_F_WRITE } else { 0 };
                self.q
                    .set_desc(head, header, header_len, DESC_F_NEXT, head + 1);
                self.q
                    .set_desc(head + 1, data, len as u32, data_flags, head + 2);
            }
        }
        self.q.set_desc(head + 2, status, 1, DESC_F_WRITE, 0);
        self.q.push(head);
        self.busy[slot] = true;
    }

    /// Publishes queued requests and notifies the device if it asks for it.
    pub fn kick(&mut self) {
        if !self.broken && self.q.publish() && self.q.device_wants_notify() {
            self.t.notify(0);
        }
    }

    /// The next completed request: its slot and status byte.
    pub fn complete(&mut self) -> Option<(usize, u8)> {
        if self.broken {
            return None;
        }
        match self.q.pop_used() {
            Ok(Some((head, _len))) => {
                let slot = usize::from(head) / 3;
                if usize::from(head) % 3 != 0 || slot >= self.slots {
                    self.fault(QueueError::UsedId(u32::from(head)));
                    return None;
                }
                self.busy[slot] = false;
                let status = unsafe { core::ptr::read_volatile(&self.mem.status[slot]) };
                Some((slot, status))
            }
            Ok(None) => None,
            Err(e) => {
                self.fault(e);
                None
            }
        }
    }

    fn fault(&mut self, e: QueueError) {
        if !self.broken {
            self.broken = true;
            crate::println!("VIRTIO ERROR dev=blk {e}; the device is no longer used");
            self.t.fail();
        }
    }

    /// See `VirtioNet::arm`: false if a completion is already waiting.
    pub fn arm(&mut self) -> bool {
        if self.broken {
            return true;
        }
        self.t.ack_interrupt();
        self.q.set_interrupts(true);
        !self.q.has_used()
    }

    pub fn disarm(&mut self) {
        self.q.set_interrupts(false);
    }
}
