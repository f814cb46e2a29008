//! pvpanic: a one-port device through which the guest reports that it panicked.

use crate::bus::BusDevice;
use crate::events::{GuestEvent, GuestEventSender};
use crate::state::{SavedState, Snapshottable, StateError};

/// Bit the guest writes when it panicked.
pub const PANICKED: u8 = 1;
/// Bit the guest writes when a crash kernel was loaded.
pub const CRASH_LOADED: u8 = 2;

/// The device; reading it tells the guest which events are supported.
pub struct PvPanic {
    events: GuestEventSender,
}

impl PvPanic {
    /// A device reporting to `events`.
    pub fn new(events: GuestEventSender) -> Self {
        PvPanic { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PANICKED != 0) {
            self.events.send(GuestEvent::Panic);
        }
    }
}

/// Stateless: the snapshot is empty.
impl Snapshottable for PvPanic {
    fn snapshot_id(&self) -> String {
        "pvpanic".into()
    }

    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        Ok(Vec::new())
    }

    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        crate::state::expect_no_state(&self.snapshot_id(), saved)
    }
}
