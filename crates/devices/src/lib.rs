//! Devices of a tern machine and the small traits every stateful component implements.
//!
//! Devices are passive: a vCPU thread calls into them through a [`bus::Bus`] on a port or MMIO
//! exit. Each device keeps a plain serialisable `State` next to its code so that a checkpoint or
//! a migration can capture and restore it without knowing its insides ([`state::Snapshottable`]).

pub mod acpi_pm;
pub mod bus;
pub mod events;
pub mod i8042;
pub mod irq;
pub mod pvpanic;
pub mod serial;
pub mod state;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as devices and loaders see it. The bitmap records every page written through
/// it (device DMA), which KVM's dirty log cannot see: live migration needs both.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub use events::{GuestEvent, GuestEventSender};
pub use state::{Pausable, SavedState, Snapshottable, StateError, VersionedState};
