//! ACPI fixed-hardware power management: the power button and the S5 (soft-off) request.
//!
//! PM1a event block (4 bytes): status (write 1 to clear) and enable. PM1a control block
//! (2 bytes): SCI_EN is always set (there is no legacy mode to leave); writing SLP_EN with
//! SLP_TYP = [`SLP_TYP_S5`] powers the machine off.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::events::{GuestEvent, GuestEventSender};
use crate::irq::IrqLine;
use crate::state::{
    decode_state, encode_state, SavedState, Snapshottable, StateError, VersionedState,
};

/// PM1 status/enable bit of the power button.
pub const PWRBTN: u16 = 1 << 8;
/// PM1 control: SCI enabled.
pub const SCI_EN: u16 = 1;
/// PM1 control: enter the sleep state in SLP_TYP.
pub const SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value tern's ACPI tables give for S5.
pub const SLP_TYP_S5: u16 = 5;

/// Which part of the device a bus range maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pm1Block {
    Event,
    Control,
}

/// Saved PM1 registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl VersionedState for AcpiPmState {
    const KIND: &'static str = "ACPI power management";
    const VERSION: u16 = 1;
}

/// The PM1a register blocks.
pub struct AcpiPm {
    state: AcpiPmState,
    sci: IrqLine,
    events: GuestEventSender,
}

impl AcpiPm {
    /// A device raising `sci` and reporting power-off to `events`.
    pub fn new(sci: IrqLine, events: GuestEventSender) -> Self {
        AcpiPm {
            state: AcpiPmState {
                control: SCI_EN,
                ..Default::default()
            },
            sci,
            events,
        }
    }

    /// Presses the power button: the guest sees PWRBTN_STS and, if it enabled it, an SCI.
    pub fn press_power_button(&mut self) {
        self.state.status |= PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        if self.state.status & self.state.enable != 0 {
            let _ = self.sci.raise();
        }
    }

    /// Reads from one of the two blocks.
    pub fn read_block(&self, block: Pm1Block, offset: u64, data: &mut [u8]) {
        let regs: [u8; 4] = match block {
            Pm1Block::Event => {
                let [s0, s1] = self.state.status.to_le_bytes();
                let [e0, e1] = self.state.enable.to_le_bytes();
                [s0, s1, e0, e1]
            }
            Pm1Block::Control => {
                let [c0, c1] = self.state.control.to_le_bytes();
                [c0, c1, 0, 0]
            }
        };
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// Writes to one of the two blocks.
    pub fn write_block(&mut self, block: Pm1Block, offset: u64, data: &[u8]) {
        // Assemble a 16-bit register write from byte or word accesses.
        let value = data
            .iter()
            .take(2)
            .enumerate()
            .fold(0u16, |v, (i, &b)| v | (u16::from(b) << (8 * i)));
        let mask = if data.len() >= 2 { 0xffff } else { 0x00ff };
        match (block, offset) {
            (Pm1Block::Event, 0) => self.state.status &= !(value & mask),
            (Pm1Block::Event, 1) => self.state.status &= !((value & 0xff) << 8),
            (Pm1Block::Event, 2) => {
                self.state.enable = (self.state.enable & !mask) | (value & mask);
                self.update_sci();
            }
            (Pm1Block::Event, 3) => {
                self.state.enable = (self.state.enable & 0x00ff) | ((value & 0xff) << 8)
            }
            (Pm1Block::Control, 0) => self.write_control(value, mask),
            (Pm1Block::Control, 1) => self.write_control((value & 0xff) << 8, 0xff00),
            _ => {}
        }
    }

    fn write_control(&mut self, value: u16, mask: u16) {
        let merged = (self.state.control & !mask) | (value & mask);
        // SLP_EN is write-only and SCI_EN stays set.
        self.state.control = (merged & !SLP_EN) | SCI_EN;
        if merged & SLP_EN != 0 {
            let slp_typ = (merged >> 10) & 7;
            if slp_typ == SLP_TYP_S5 {
                self.events.send(GuestEvent::PowerOff);
            } else {
                log::info!("acpi: ignoring request for sleep type {slp_typ}");
            }
        }
    }
}

impl Snapshottable for AcpiPm {
    fn snapshot_id(&self) -> String {
        "acpi-pm".into()
    }

    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        encode_state(&self.snapshot_id(), &self.state)
    }

    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        let state: AcpiPmState = decode_state(&self.snapshot_id(), saved)?;
        // Only the power button ever sets a status bit, and SLP_EN is never kept.
        let reason = if state.status & !PWRBTN != 0 {
            Some(format!("PM1 status {:#06x}", state.status))
        } else if state.control & SLP_EN != 0 {
            Some(format!("PM1 control {:#06x} with SLP_EN", state.control))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(StateError::Apply {
                id: self.snapshot_id(),
                reason,
            });
        }
        self.state = state;
        self.state.control |= SCI_EN;
        Ok(())
    }
}

/// One of the two PM1 blocks as placed on the port bus.
pub struct Pm1Port {
    pub pm: std::sync::Arc<std::sync::Mutex<AcpiPm>>,
    pub block: Pm1Block,
}

impl BusDevice for Pm1Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        crate::bus::lock(&self.pm).read_block(self.block, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        crate::bus::lock(&self.pm).write_block(self.block, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, std::sync::mpsc::Receiver<GuestEvent>) {
        let (tx, rx) = GuestEventSender::channel();
        (AcpiPm::new(IrqLine::new(9).unwrap(), tx), rx)
    }

    #[test]
    fn power_button_sets_status_until_cleared() {
        let (mut pm, _rx) = pm();
        pm.press_power_button();
        let mut sts = [0u8; 2];
        pm.read_block(Pm1Block::Event, 0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts) & PWRBTN, PWRBTN);
        pm.write_block(Pm1Block::Event, 0, &PWRBTN.to_le_bytes());
        pm.read_block(Pm1Block::Event, 0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts), 0);
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, rx) = pm();
        let v = SLP_EN | (SLP_TYP_S5 << 10);
        pm.write_block(Pm1Block::Control, 0, &v.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), GuestEvent::PowerOff);
        let mut cnt = [0u8; 2];
        pm.read_block(Pm1Block::Control, 0, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt), SCI_EN | (SLP_TYP_S5 << 10));
    }

    #[test]
    fn other_sleep_types_do_nothing() {
        let (mut pm, rx) = pm();
        let v = SLP_EN | (1 << 10);
        pm.write_block(Pm1Block::Control, 0, &v.to_le_bytes());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn state_round_trip() {
        let (mut pm, _rx) = pm();
        pm.write_block(Pm1Block::Event, 2, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        let bytes = pm.snapshot().unwrap();
        let (mut other, _rx2) = self::pm();
        other.restore(SavedState::current(&bytes)).unwrap();
        assert_eq!(other.state, pm.state);
    }

    #[test]
    fn states_it_never_holds_are_refused() {
        let (mut pm, _rx) = pm();
        for state in [
            AcpiPmState {
                status: 1,
                enable: 0,
                control: SCI_EN,
            },
            AcpiPmState {
                status: 0,
                enable: 0,
                control: SCI_EN | SLP_EN,
            },
        ] {
            let bytes = encode_state("acpi-pm", &state).unwrap();
            assert!(
                pm.restore(SavedState::current(&bytes)).is_err(),
                "{state:?}"
            );
        }
    }
}
