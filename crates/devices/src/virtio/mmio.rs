//! The virtio-mmio transport (version 2): the register window a driver uses to discover a
//! device, negotiate features, set up queues and receive interrupts.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue_state::SavedQueue;
use super::{
    lock_queue, Activation, Interrupt, SharedQueue, VirtioDevice, F_VERSION_1, INT_CONFIG,
    INT_USED_RING,
};
use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::state::{
    decode_state, encode_state, Pausable, SavedState, Snapshottable, StateEncoding, StateError,
    VersionedState,
};
use crate::GuestMem;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x6e72_6574; // "tern"

/// Offset of the queue-notify register, where ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// One device behind its MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    queues: Vec<SharedQueue>,
    queue_events: Vec<EventFd>,
    status: u32,
    features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
    paused: bool,
}

/// Saved transport registers, queues and the device's own state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<SavedQueue>,
    pub device: Vec<u8>,
}

impl VersionedState for MmioState {
    const KIND: &'static str = "virtio transport";
    const VERSION: u16 = 1;
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<SharedQueue>, String> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| {
            Queue::new(max)
                .map(|q| Arc::new(Mutex::new(q)))
                .map_err(|e| format!("queue of {max}: {e:?}"))
        })
        .collect()
}

impl MmioTransport {
    /// Puts `device` behind a transport raising `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        irq: IrqLine,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref()).map_err(std::io::Error::other)?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_events,
            status: 0,
            features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
            paused: false,
        })
    }

    /// The eventfd signalled when the driver notifies queue `i` (for KVM ioeventfds).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's name.
    pub fn device_id(&self) -> String {
        self.device.id()
    }

    /// The device's type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn selected_queue(&self) -> Option<&SharedQueue> {
        self.queues.get(self.queue_select as usize)
    }

    fn with_queue(&self, f: impl FnOnce(&mut Queue)) {
        // Queue configuration may only change before the device runs.
        if self.status & STATUS_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(&mut lock_queue(q));
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .selected_queue()
                .map_or(0, |q| u32::from(lock_queue(q).max_size())),
            0x44 => self
                .selected_queue()
                .map_or(0, |q| u32::from(lock_queue(q).ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.features_select = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_select = value,
            // Any selector past the last queue selects none; keep one such value, so that a
            // saved state names either a queue or "none".
            0x30 => self.queue_select = value.min(self.queues.len() as u32),
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            NOTIFY_OFFSET => {
                if let Some(e) = self.queue_events.get(value as usize) {
                    let _ = e.write(1);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.write_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let acceptable = self.acked_features & !self.offered_features() == 0
                && self.acked_features & F_VERSION_1 != 0;
            if !acceptable {
                value &= !STATUS_FEATURES_OK;
            }
        }
        let starting = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if starting && !self.activated {
            if let Err(e) = self.activate() {
                log::warn!("{}: cannot start: {e}", self.device.id());
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.status & STATUS_FEATURES_OK == 0 {
            return Err("driver set DRIVER_OK without FEATURES_OK".into());
        }
        for (i, q) in self.queues.iter().enumerate() {
            let q = lock_queue(q);
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {i} is not valid"));
            }
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues: self.queues.clone(),
            queue_events,
            interrupt: self.interrupt.clone(),
            features: self.acked_features,
            start_paused: self.paused,
        })?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        if let Ok(queues) = new_queues(self.device.as_ref()) {
            self.queues = queues;
        }
        self.status = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt.set_status(0);
    }

    fn state(&self) -> Result<MmioState, StateError> {
        Ok(MmioState {
            status: self.status,
            features_select: self.features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| SavedQueue::from(&*lock_queue(q)))
                .collect(),
            device: self.device.state()?,
        })
    }

    /// Checks a saved state against this transport and builds its queues, without changing
    /// anything: the state must be one this transport could have produced (queues of this
    /// device, sizes and rings a driver could set, no more buffers in flight than a queue
    /// holds, a selector naming a queue or none, interrupt bits the transport sets, features
    /// it offered) and, if the device was running, rings inside guest memory.
    fn check_state(&self, state: &MmioState) -> Result<Vec<Queue>, String> {
        let max = self.device.queue_max_sizes();
        if state.queues.len() != max.len()
            || state.queues.iter().zip(max).any(|(q, &m)| q.max_size != m)
        {
            return Err("the saved queues do not match this device".into());
        }
        if state.queue_select > max.len() as u32 {
            return Err(format!(
                "queue selector {} is out of range (the device has {} queues)",
                state.queue_select,
                max.len()
            ));
        }
        let stray = state.interrupt_status & !(INT_USED_RING | INT_CONFIG);
        if stray != 0 {
            return Err(format!("unknown interrupt status bits {stray:#x}"));
        }
        if state.status & STATUS_FEATURES_OK != 0 {
            let offered = self.offered_features();
            let extra = state.acked_features & !offered;
            if extra != 0 {
                return Err(format!(
                    "acknowledged features {extra:#x} were never offered"
                ));
            }
            if state.acked_features & F_VERSION_1 == 0 {
                return Err("FEATURES_OK without VERSION_1".into());
            }
        }
        let running =
            state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_NEEDS_RESET == 0;
        if running && state.status & STATUS_FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, saved) in state.queues.iter().enumerate() {
            let q = saved.to_queue().map_err(|e| format!("queue {i}: {e}"))?;
            if saved.event_idx {
                // The transport never offers VIRTIO_RING_F_EVENT_IDX.
                return Err(format!("queue {i} uses event indices, never offered"));
            }
            let in_flight = saved.next_avail.wrapping_sub(saved.next_used);
            if in_flight > saved.size {
                return Err(format!(
                    "queue {i} of {} entries has {in_flight} buffers in flight",
                    saved.size
                ));
            }
            if running && q.ready() && !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}'s rings (descriptors {:#x}, available {:#x}, used {:#x}, {} entries) are not inside guest memory",
                    saved.desc_table, saved.avail_ring, saved.used_ring, saved.size
                ));
            }
            queues.push(q);
        }
        Ok(queues)
    }

    fn set_state(&mut self, state: MmioState, encoding: StateEncoding) -> Result<(), StateError> {
        let id = self.device.id();
        let apply = |reason: String| StateError::Apply {
            id: id.clone(),
            reason,
        };
        let queues = self.check_state(&state).map_err(apply)?;
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        // The device's own state is nested inside, encoded the same way.
        self.device
            .set_state(SavedState::new(encoding, &state.device))?;
        self.queues = queues
            .into_iter()
            .map(|q| Arc::new(Mutex::new(q)))
            .collect();
        self.status = state.status;
        self.features_select = state.features_select;
        self.driver_features_select = state.driver_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            // A restore happens with the machine paused: the device starts paused too.
            self.paused = true;
            self.activate().map_err(apply)?;
        }
        Ok(())
    }

    /// Tells the device the machine runs again after a restore or migration.
    pub fn restored(&mut self) {
        self.device.restored();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl Pausable for MmioTransport {
    fn pause(&mut self) {
        if !self.paused {
            self.paused = true;
            if self.activated {
                self.device.pause();
            }
        }
    }

    fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            if self.activated {
                self.device.resume();
            }
        }
    }
}

impl Snapshottable for MmioTransport {
    fn snapshot_id(&self) -> String {
        self.device.id()
    }

    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        encode_state(&self.snapshot_id(), &self.state()?)
    }

    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        let state: MmioState = decode_state(&self.snapshot_id(), saved)?;
        self.set_state(state, saved.encoding)
    }
}
