//! virtio-net driver: one receive and one transmit queue, one fixed 2 KiB buffer per
//! descriptor, and smoltcp's `phy::Device` on top of them without copies (smoltcp reads frames
//! in place in the receive buffers and writes frames straight into the transmit buffers).
//!
//! The guest polls: device interrupts stay off (`NO_INTERRUPT`) while it works, and are asked
//! for only just before it sleeps (`arm`), because each interrupt taken in user mode costs a
//! trip through CPL0. Notifications to the device are batched: one `QueueNotify` per poll at
//! most, and none while the device says it is looking at the ring anyway.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{self, QueueError, QueueMem, SplitQueue, Transport, DESC_F_WRITE, QMAX};

/// The device has a MAC address in its config space.
const F_MAC: u64 = 1 << 5;

/// `virtio_net_hdr` with `num_buffers` (always 12 bytes with VERSION_1).
const HDR: usize = 12;
/// One buffer per descriptor: header plus a full Ethernet frame (1514) fits.
const BUF: usize = 2048;
/// Largest Ethernet frame (without FCS) the guest sends or accepts: 1500-byte MTU.
pub const MAX_FRAME: usize = 1514;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; QMAX]);

static mut RX_MEM: QueueMem = QueueMem::EMPTY;
static mut TX_MEM: QueueMem = QueueMem::EMPTY;
static mut RX_BUFS: Buffers = Buffers([[0; BUF]; QMAX]);
static mut TX_BUFS: Buffers = Buffers([[0; BUF]; QMAX]);
/// The statics above are handed out once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Frames received and sent since boot.
pub static RX_PACKETS: AtomicU64 = AtomicU64::new(0);
pub static TX_PACKETS: AtomicU64 = AtomicU64::new(0);

struct RxRing {
    q: SplitQueue,
    bufs: &'static mut Buffers,
}

struct TxRing {
    q: SplitQueue,
    bufs: &'static mut Buffers,
    /// Descriptors (= buffers) not in flight.
    free: [u16; QMAX],
    nfree: usize,
}

pub struct VirtioNet {
    t: Transport,
    rx: RxRing,
    tx: TxRing,
    pub mac: [u8; 6],
    /// The device misbehaved: it is left alone from then on.
    broken: bool,
}

impl VirtioNet {
    /// Initialises the net device behind `t` (the first one only: its queues are statics).
    pub fn new(t: Transport) -> Result<VirtioNet, &'static str> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err("only one virtio-net device is supported");
        }
        let features = t.negotiate(virtio::F_VERSION_1, F_MAC | virtio::F_ACCESS_PLATFORM)?;
        // SAFETY: TAKEN makes these the only references to the statics.
        let (rx_mem, tx_mem, rx_bufs, tx_bufs) = unsafe {
            (
                &mut *addr_of_mut!(RX_MEM),
                &mut *addr_of_mut!(TX_MEM),
                &mut *addr_of_mut!(RX_BUFS),
                &mut *addr_of_mut!(TX_BUFS),
            )
        };
        let rxq = t.setup_queue(RX_QUEUE, rx_mem, QMAX as u16)?;
        let txq = t.setup_queue(TX_QUEUE, tx_mem, QMAX as u16)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            t.read_config(0, &mut mac);
        }
        if features & F_MAC == 0 || mac[0] & 1 != 0 || mac == [0; 6] {
            // No usable address from the device: a fixed locally administered one.
            mac = [0x02, 0x74, 0x65, 0x72, 0x6e, 0x01];
        }
        let mut dev = VirtioNet {
            t,
            rx: RxRing {
                q: rxq,
                bufs: rx_bufs,
            },
            tx: TxRing {
                q: txq,
                bufs: tx_bufs,
                free: [0; QMAX],
                nfree: 0,
            },
            mac,
            broken: false,
        };
        dev.rx.q.set_interrupts(false);
        dev.tx.q.set_interrupts(false);
        for i in 0..dev.rx.q.size() {
            let addr = dev.rx.bufs.0[usize::from(i)].as_ptr() as u64;
            dev.rx.q.set_desc(i, addr, BUF as u32, DESC_F_WRITE, 0);
            dev.rx.q.push(i);
        }
        for i in 0..dev.tx.q.size() {
            dev.tx.free[dev.tx.nfree] = i;
            dev.tx.nfree += 1;
        }
        dev.t.driver_ok();
        dev.rx.q.publish();
        dev.t.notify(RX_QUEUE);
        Ok(dev)
    }

    /// Queue sizes (receive, transmit).
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.rx.q.size(), self.tx.q.size())
    }

    fn fault(&mut self, what: &str, e: QueueError) {
        if !self.broken {
            self.broken = true;
            crate::println!("VIRTIO ERROR dev=net {what}: {e}; the device is no longer used");
            self.t.fail();
        }
    }

    /// Takes back transmit buffers the device is done with.
    fn reclaim_tx(&mut self) {
        loop {
            match self.tx.q.pop_used() {
                Ok(Some((id, _len))) => {
                    if self.tx.nfree < QMAX {
                        self.tx.free[self.tx.nfree] = id;
                        self.tx.nfree += 1;
                    }
                }
                Ok(None) => return,
                Err(e) => return self.fault("tx", e),
            }
        }
    }

    /// Publishes new receive and transmit buffers and notifies the device where it asks for it.
    pub fn flush(&mut self) {
        if self.broken {
            return;
        }
        if self.rx.q.publish() && self.rx.q.device_wants_notify() {
            self.t.notify(RX_QUEUE);
        }
        if self.tx.q.publish() && self.tx.q.device_wants_notify() {
            self.t.notify(TX_QUEUE);
        }
    }

    /// Prepares for a sleep: acknowledges the device's interrupt (so the next one is a new edge)
    /// and asks for one on the next received frame. False if a frame is already waiting (do
    /// not sleep; call `disarm`).
    pub fn arm(&mut self) -> bool {
        if self.broken {
            return true;
        }
        self.t.ack_interrupt();
        self.rx.q.set_interrupts(true);
        !self.rx.q.has_used()
    }

    /// The device misbehaved and is no longer used.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Back to polling without interrupts.
    pub fn disarm(&mut self) {
        self.rx.q.set_interrupts(false);
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.broken {
            return None;
        }
        self.reclaim_tx();
        if self.tx.nfree == 0 {
            return None; // a reply could not be sent: leave the frame until there is room
        }
        match self.rx.q.pop_used() {
            Ok(Some((id, len))) => Some((
                RxToken {
                    ring: &mut self.rx,
                    id,
                    len,
                },
                TxToken { ring: &mut self.tx },
            )),
            Ok(None) => None,
            Err(e) => {
                self.fault("rx", e);
                None
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.broken {
            return None;
        }
        self.reclaim_tx();
        if self.tx.nfree == 0 {
            return None;
        }
        Some(TxToken { ring: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

pub struct RxToken<'a> {
    ring: &'a mut RxRing,
    id: u16,
    /// Bytes the device says it wrote (its word: bounded before use).
    len: u32,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let len = (self.len as usize).min(BUF);
        let buf = &self.ring.bufs.0[usize::from(self.id)];
        // A frame shorter than the header is empty (smoltcp ignores empty frames).
        let r = f(if len > HDR { &buf[HDR..len] } else { &[] });
        RX_PACKETS.fetch_add(1, Ordering::Relaxed);
        // The buffer goes straight back to the device (its descriptor is unchanged).
        self.ring.q.push(self.id);
        r
    }
}

pub struct TxToken<'a> {
    ring: &'a mut TxRing,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let ring = self.ring;
        if ring.nfree == 0 || len > BUF - HDR {
            // Cannot happen (a token is only handed out with a free buffer, and smoltcp keeps
            // to the MTU); the frame is built and dropped rather than panicking.
            let mut scratch = [0u8; BUF];
            let n = len.min(BUF);
            return f(&mut scratch[..n]);
        }
        ring.nfree -= 1;
        let id = ring.free[ring.nfree];
        let buf = &mut ring.bufs.0[usize::from(id)];
        buf[..HDR].fill(0); // no offloads: flags 0, GSO none
        let r = f(&mut buf[HDR..HDR + len]);
        let addr = buf.as_ptr() as u64;
        ring.q.set_desc(id, addr, (HDR + len) as u32, 0, 0);
        ring.q.push(id);
        TX_PACKETS.fetch_add(1, Ordering::Relaxed);
        r
    }
}
