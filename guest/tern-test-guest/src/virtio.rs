//! virtio over MMIO (virtio 1.x, the "modern" register layout: `Version` = 2) and split
//! virtqueues, polled from user mode (the MMIO window is identity-mapped and user-accessible).
//!
//! The device is not trusted: every index and length it writes into a used ring is bounded
//! before use, and a device that reports impossible values is marked broken and left alone
//! rather than allowed to steer the guest into undefined behaviour.

use core::sync::atomic::{fence, Ordering};

use crate::hw::{mmio_read32, mmio_write32};

/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;

/// Feature bits shared by every device type.
pub const F_VERSION_1: u64 = 1 << 32;
/// The device sits behind an IOMMU or needs platform-specific address handling; with none
/// here (physical = virtual, no IOMMU), accepting it changes nothing and keeps devices that
/// insist on it working.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// One virtio-mmio window: where it is and which interrupt line it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub base: u64,
    pub size: u64,
    /// GSI (IOAPIC pin).
    pub irq: u32,
}

/// Most virtio-mmio windows the guest looks at.
pub const MAX_SLOTS: usize = 16;

/// tern's fixed layout, used when the command line names no device: slot `i` at
/// `0xd000_0000 + i * 0x1000`, GSI `16 + i`.
const TERN_BASE: u64 = 0xd000_0000;
const TERN_STRIDE: u64 = 0x1000;
const TERN_SLOTS: u64 = 8;
const TERN_FIRST_GSI: u32 = 16;

/// Lowest size a window must have to hold the registers and a small config space.
const MIN_WINDOW: u64 = 0x200;

/// The virtio-mmio windows to probe: the command line's `virtio_mmio.device=` entries (as
/// Linux reads them, and as QEMU's `microvm` writes them), or else tern's fixed layout.
/// Returns how many of `out` it filled.
pub fn slots(cmdline: &[u8], out: &mut [Slot; MAX_SLOTS]) -> usize {
    let mut n = 0;
    for word in cmdline.split(|&c| c == b' ') {
        let Some(spec) = word.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        match parse_device_spec(spec) {
            Some(slot) if n < MAX_SLOTS => {
                out[n] = slot;
                n += 1;
            }
            Some(_) => {
                crate::println!("virtio: too many virtio_mmio.device entries; extra ignored")
            }
            None => crate::println!(
                "virtio: cannot parse virtio_mmio.device={}",
                core::str::from_utf8(spec).unwrap_or("?")
            ),
        }
    }
    if n > 0 {
        return n;
    }
    for i in 0..TERN_SLOTS {
        out[n] = Slot {
            base: TERN_BASE + i * TERN_STRIDE,
            size: TERN_STRIDE,
            irq: TERN_FIRST_GSI + i as u32,
        };
        n += 1;
    }
    n
}

/// `<size>@<base>:<irq>[:<id>]`, size with an optional K/M/G suffix, numbers decimal or `0x` hex.
pub fn parse_device_spec(spec: &[u8]) -> Option<Slot> {
    let at = spec.iter().position(|&c| c == b'@')?;
    let (size, rest) = (&spec[..at], &spec[at + 1..]);
    let colon = rest.iter().position(|&c| c == b':')?;
    let (base, irq) = (&rest[..colon], &rest[colon + 1..]);
    let irq = match irq.iter().position(|&c| c == b':') {
        Some(i) => &irq[..i], // Linux's optional platform device id
        None => irq,
    };
    let (size, mult) = match size.last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&size[..size.len() - 1], 1 << 20),
        b'g' | b'G' => (&size[..size.len() - 1], 1 << 30),
        _ => (size, 1),
    };
    let size = parse_number(size)?.checked_mul(mult)?;
    let base = parse_number(base)?;
    let irq = u32::try_from(parse_number(irq)?).ok()?;
    if size < MIN_WINDOW || base.checked_add(size)? > crate::MAPPED_LIMIT {
        return None;
    }
    Some(Slot { base, size, irq })
}

/// A decimal or `0x` hexadecimal number.
pub fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// A virtio-mmio device's register window.
#[derive(Clone, Copy)]
pub struct Transport {
    base: usize,
    pub slot: Slot,
}

impl Transport {
    /// The device in `slot`, if its magic reads "virt" and it is a modern (version 2) device
    /// with a non-zero device ID. Returns the device ID with it.
    pub fn probe(slot: Slot) -> Option<(Transport, u32)> {
        let t = Transport {
            base: slot.base as usize,
            slot,
        };
        if t.read(reg::MAGIC) != MAGIC {
            return None;
        }
        let version = t.read(reg::VERSION);
        let id = t.read(reg::DEVICE_ID);
        if id == 0 {
            return None; // an empty slot
        }
        if version != 2 {
            crate::println!(
                "virtio: device id={id} at {:#x} has version {version} (only modern devices, version 2, are supported); ignored",
                slot.base
            );
            return None;
        }
        Some((t, id))
    }

    #[inline]
    fn read(&self, off: usize) -> u32 {
        mmio_read32(self.base + off)
    }

    #[inline]
    fn write(&self, off: usize, value: u32) {
        mmio_write32(self.base + off, value)
    }

    fn set_status(&self, bits: u32) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | bits);
    }

    /// Marks the device failed (it will do nothing more for this driver).
    pub fn fail(&self) {
        self.set_status(status::FAILED);
    }

    /// Resets the device and negotiates features: `required` must all be offered, `optional`
    /// are taken when offered. Returns the features agreed.
    pub fn negotiate(&self, required: u64, optional: u64) -> Result<u64, &'static str> {
        self.write(reg::STATUS, 0);
        let mut reset = false;
        for _ in 0..1000 {
            if self.read(reg::STATUS) == 0 {
                reset = true;
                break;
            }
            core::hint::spin_loop();
        }
        if !reset {
            return Err("the device does not reset");
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        if offered & required != required {
            self.fail();
            return Err("the device lacks a required feature (VERSION_1?)");
        }
        let chosen = offered & (required | optional);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, chosen as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (chosen >> 32) as u32);
        self.set_status(status::FEATURES_OK);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err("the device refused the features");
        }
        Ok(chosen)
    }

    /// Sets up queue `index` on `mem` with at most `max` entries (a power of two); returns
    /// the queue.
    pub fn setup_queue(
        &self,
        index: u32,
        mem: &'static mut QueueMem,
        max: u16,
    ) -> Result<SplitQueue, &'static str> {
        self.write(reg::QUEUE_SEL, index);
        if self.read(reg::QUEUE_READY) != 0 {
            return Err("the queue is already in use");
        }
        let device_max = self.read(reg::QUEUE_NUM_MAX);
        if device_max == 0 {
            return Err("the queue does not exist");
        }
        let limit = device_max.min(u32::from(max)).min(QMAX as u32);
        // Split queues have power-of-two sizes: the largest one that fits.
        let size = 1u32 << (31 - limit.leading_zeros());
        let size = size as u16;
        let q = SplitQueue::new(mem, size);
        let desc = q.desc_addr();
        let avail = q.avail_addr();
        let used = q.used_addr();
        self.write(reg::QUEUE_NUM, u32::from(size));
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, used as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
        Ok(q)
    }

    /// Tells the device the driver is ready: queues may now be used.
    pub fn driver_ok(&self) {
        self.set_status(status::DRIVER_OK);
    }

    /// Tells the device that queue `index` has new buffers.
    #[inline]
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }

    /// Acknowledges whatever interrupt the device raised, so that its line drops and the next
    /// notification is a new edge at the IOAPIC. Two MMIO exits when one was pending, one
    /// otherwise: done before sleeping, not per packet.
    pub fn ack_interrupt(&self) -> u32 {
        let s = self.read(reg::INTERRUPT_STATUS);
        if s != 0 {
            self.write(reg::INTERRUPT_ACK, s);
        }
        s
    }

    /// Reads `out.len()` bytes of device config at `offset`, consistently (retried while the
    /// config generation changes under it).
    pub fn read_config(&self, offset: usize, out: &mut [u8]) {
        for _ in 0..100 {
            let before = self.read(reg::CONFIG_GENERATION);
            for (i, b) in out.iter_mut().enumerate() {
                *b = unsafe {
                    core::ptr::read_volatile((self.base + reg::CONFIG + offset + i) as *const u8)
                };
            }
            if self.read(reg::CONFIG_GENERATION) == before {
                return;
            }
        }
    }

    /// A little-endian u32 from the device config.
    pub fn config_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64 from the device config.
    pub fn config_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read_config(offset, &mut b);
        u64::from_le_bytes(b)
    }
}

/// Largest queue the guest sets up.
pub const QMAX: usize = 256;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

#[repr(C, align(2))]
pub struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QMAX],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
pub struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QMAX],
    avail_event: u16,
}

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// The memory of one split virtqueue (descriptor table, driver and device areas), for queues
/// of up to `QMAX` entries. Lives in a static: the guest has no allocator, and physical =
/// virtual, so its address is what the device is given.
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QMAX],
    avail: Avail,
    used: Used,
}

impl QueueMem {
    pub const EMPTY: QueueMem = QueueMem {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QMAX],
        avail: Avail {
            flags: 0,
            idx: 0,
            ring: [0; QMAX],
            used_event: 0,
        },
        used: Used {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QMAX],
            avail_event: 0,
        },
    };
}

/// Why a queue stopped being usable.
#[derive(Clone, Copy, Debug)]
pub enum QueueError {
    /// The device's used index ran more than a queue's worth ahead of the driver.
    UsedIndex { used: u16, seen: u16 },
    /// A used entry named a descriptor that is not the head of a chain in flight.
    UsedId(u32),
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            QueueError::UsedIndex { used, seen } => {
                write!(f, "used index {used} is more than a queue ahead of {seen}")
            }
            QueueError::UsedId(id) => write!(f, "used id {id} is not a chain in flight"),
        }
    }
}

/// Driver side of one split virtqueue. Descriptor chains are laid out by the caller (whose
/// buffers have fixed descriptors); the queue tracks which heads are in flight, so that a used
/// entry can be checked before its buffer is touched.
pub struct SplitQueue {
    mem: *mut QueueMem,
    size: u16,
    /// Our shadow of `avail.idx` (entries made available so far, wrapping).
    next_avail: u16,
    /// Used entries consumed so far (wrapping).
    last_used: u16,
    /// `avail.idx` as last published to the device.
    published: u16,
    in_flight: [bool; QMAX],
}

// SAFETY: a queue's memory is a static given to exactly one `SplitQueue`, and the queue is
// used by one CPU at a time (handed over before the other CPU starts using it).
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    fn new(mem: &'static mut QueueMem, size: u16) -> SplitQueue {
        *mem = QueueMem::EMPTY;
        SplitQueue {
            mem,
            size,
            next_avail: 0,
            last_used: 0,
            published: 0,
            in_flight: [false; QMAX],
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn desc_addr(&self) -> u64 {
        unsafe { core::ptr::addr_of!((*self.mem).desc) as u64 }
    }

    fn avail_addr(&self) -> u64 {
        unsafe { core::ptr::addr_of!((*self.mem).avail) as u64 }
    }

    fn used_addr(&self) -> u64 {
        unsafe { core::ptr::addr_of!((*self.mem).used) as u64 }
    }

    /// Writes descriptor `i` (`i < size`, checked by the caller's fixed layout).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = usize::from(i % self.size);
        unsafe {
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*self.mem).desc[i]),
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
    }

    /// Makes the chain starting at descriptor `head` available (published by `publish`).
    pub fn push(&mut self, head: u16) {
        let head = head % self.size;
        let slot = usize::from(self.next_avail % self.size);
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*self.mem).avail.ring[slot]), head);
        }
        self.in_flight[usize::from(head)] = true;
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the entries pushed so far to the device. Returns whether any were new.
    pub fn publish(&mut self) -> bool {
        if self.published == self.next_avail {
            return false;
        }
        // Ring entries and descriptors before the index that makes them visible.
        fence(Ordering::Release);
        unsafe {
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!((*self.mem).avail.idx),
                self.next_avail,
            );
        }
        self.published = self.next_avail;
        true
    }

    /// Whether the device wants to be notified of new buffers (it clears `NO_NOTIFY` when it
    /// has stopped looking at the ring on its own).
    pub fn device_wants_notify(&self) -> bool {
        // The index store must be visible before the flag is read (store-load ordering).
        fence(Ordering::SeqCst);
        let flags =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.mem).used.flags)) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Asks the device for an interrupt on each used buffer (`true`) or for none (`false`,
    /// while the driver polls anyway: an interrupt costs a trip through CPL0).
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*self.mem).avail.flags), flags);
        }
        fence(Ordering::SeqCst);
    }

    fn used_idx(&self) -> u16 {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.mem).used.idx)) }
    }

    /// Whether the device has returned buffers not yet taken with `pop_used`.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// The next buffer the device returned: (head descriptor, bytes written). The head is
    /// checked to be a chain in flight; the length is the device's word, for the caller to
    /// bound.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        let used = self.used_idx();
        if used == self.last_used {
            return Ok(None);
        }
        let ahead = used.wrapping_sub(self.last_used);
        if ahead > self.published.wrapping_sub(self.last_used) || ahead > self.size {
            return Err(QueueError::UsedIndex {
                used,
                seen: self.last_used,
            });
        }
        // The entry is read only after the index that published it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let e =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.mem).used.ring[slot])) };
        if e.id >= u32::from(self.size) || !self.in_flight[e.id as usize] {
            return Err(QueueError::UsedId(e.id));
        }
        self.in_flight[e.id as usize] = false;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((e.id as u16, e.len)))
    }
}
