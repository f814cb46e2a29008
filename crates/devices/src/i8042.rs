//! i8042 keyboard controller, only as far as guests use it to reset the machine.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::events::{GuestEvent, GuestEventSender};
use crate::state::{SavedState, Snapshottable, StateError};

/// Turns the i8042 "pulse reset line" command into a [`GuestEvent::Reset`].
#[derive(Debug)]
pub struct ResetLine(GuestEventSender);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(GuestEvent::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60..0x65.
pub struct I8042 {
    device: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller that reports resets to `events`.
    pub fn new(events: GuestEventSender) -> Self {
        I8042 {
            device: I8042Device::new(ResetLine(events)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.device.write(off, value);
        }
    }
}

/// The emulated controller keeps no state between accesses: its snapshot is empty.
impl Snapshottable for I8042 {
    fn snapshot_id(&self) -> String {
        "i8042".into()
    }

    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        Ok(Vec::new())
    }

    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        crate::state::expect_no_state(&self.snapshot_id(), saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_raises_reset() {
        let (tx, rx) = GuestEventSender::channel();
        let mut dev = I8042::new(tx);
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), GuestEvent::Reset);
        dev.write(4, &[0x01]);
        assert!(rx.try_recv().is_err());
    }
}
