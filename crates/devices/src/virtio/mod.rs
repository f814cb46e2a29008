//! virtio 1.x devices over the MMIO transport.
//!
//! A [`VirtioDevice`] knows its own features, configuration space and queues' work; the
//! [`mmio::MmioTransport`] speaks the register protocol with the driver and hands the device
//! its queues when the driver sets DRIVER_OK. Devices do their work on a [`worker::Worker`]
//! thread that stops (after finishing what it holds) when the machine pauses, so a checkpoint
//! sees queues with nothing in flight.

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue_state;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqLine;
use crate::state::{SavedState, StateError};
use crate::GuestMem;

/// Device ID of a network card.
pub const TYPE_NET: u32 = 1;
/// Device ID of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// The device speaks virtio 1.x (mandatory on this transport).
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a queue has new used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status register the driver reads and acknowledges, and the line.
pub struct Interrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        let _ = self.line.raise();
    }

    /// Current interrupt status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status (restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// A queue shared between the transport (configuration, snapshots) and a device's worker.
pub type SharedQueue = Arc<Mutex<Queue>>;

/// Locks a queue even if a holder panicked.
pub fn lock_queue(q: &SharedQueue) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// The next buffer the driver made available on `q`, except one whose head index is outside
/// the queue: that one could never be returned, so the queue stops in front of it (until the
/// driver resets the device) rather than keep a buffer in flight for ever. A device so never
/// has more buffers in flight than its queue holds, which a restore checks.
pub fn next_chain<'m>(q: &mut Queue, mem: &'m GuestMem) -> Option<DescriptorChain<&'m GuestMem>> {
    let chain = q.pop_descriptor_chain(mem)?;
    if chain.head_index() >= q.size() {
        q.go_to_previous_position();
        log::warn!(
            "virtio: the driver made descriptor {} available on a queue of {}; the queue stops",
            chain.head_index(),
            q.size()
        );
        return None;
    }
    Some(chain)
}

/// What a device gets when the driver has set it up.
pub struct Activation {
    pub mem: GuestMem,
    pub queues: Vec<SharedQueue>,
    /// One per queue: signalled when the driver notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    /// Features the driver acknowledged.
    pub features: u64,
    /// The machine is paused: do not start working before `resume`.
    pub start_paused: bool,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// Name in checkpoints and messages ("net0", "blk0").
    fn id(&self) -> String;
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is this slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts working on the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Stops working (driver reset); the device can be activated again.
    fn reset(&mut self);
    /// Stops touching guest memory and queues until [`VirtioDevice::resume`]; returns once
    /// requests in flight are complete.
    fn pause(&mut self);
    /// Starts again after [`VirtioDevice::pause`].
    fn resume(&mut self);
    /// Device-specific state for a checkpoint (queues are saved by the transport).
    fn state(&self) -> Result<Vec<u8>, StateError>;
    /// Puts back device-specific state (before [`VirtioDevice::activate`]).
    fn set_state(&mut self, saved: SavedState<'_>) -> Result<(), StateError>;
    /// Called once the machine runs again after a restore or an incoming migration.
    fn restored(&mut self) {}
}

/// Copies `value`'s little-endian bytes at `offset` of a configuration space into `data`.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| space.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
