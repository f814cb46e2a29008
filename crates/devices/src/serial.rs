//! 16550 UART (COM1) used as the guest console, built on vm-superio.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::state::{
    decode_state, encode_state, SavedState, Snapshottable, StateError, VersionedState,
};

/// Where the guest's console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The console UART.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, ConsoleOut>,
}

/// Saved registers and receive FIFO of the UART.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl VersionedState for SerialDeviceState {
    const KIND: &'static str = "serial port";
    const VERSION: u16 = 1;
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Size of the UART's receive FIFO as emulated by vm-superio.
const MAX_INPUT_FIFO: usize = 64;
/// IER bits the UART keeps (vm-superio masks the rest away).
const IER_VALID: u8 = 0x0f;
/// LSR bits the UART ever sets: data ready, transmitter holding register empty, idle.
const LSR_VALID: u8 = 0x61;
/// IIR values the UART can hold: no interrupt, THR empty, data available, or both.
const IIR_VALID: [u8; 4] = [0x01, 0x02, 0x04, 0x06];

/// Refuses register values the UART could not have produced.
fn check_registers(state: &SerialDeviceState) -> Result<(), String> {
    if state.in_buffer.len() > MAX_INPUT_FIFO {
        return Err(format!("receive FIFO of {} bytes", state.in_buffer.len()));
    }
    if state.interrupt_enable & !IER_VALID != 0 {
        return Err(format!("IER {:#04x}", state.interrupt_enable));
    }
    if !IIR_VALID.contains(&state.interrupt_identification) {
        return Err(format!("IIR {:#04x}", state.interrupt_identification));
    }
    if state.line_status & !LSR_VALID != 0 {
        return Err(format!("LSR {:#04x}", state.line_status));
    }
    Ok(())
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: IrqLine, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(irq, out),
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Current registers and FIFO.
    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    fn set_state(&mut self, state: &SerialDeviceState) -> Result<(), StateError> {
        let apply_error = |reason: String| StateError::Apply {
            id: "serial0".into(),
            reason,
        };
        check_registers(state).map_err(apply_error)?;
        // vm-superio builds a UART from a state only by value: move the interrupt line and the
        // output into the new one, leaving a sink behind for the instant in between.
        let irq = self.uart.interrupt_evt().try_clone();
        let irq = irq.map_err(|e| apply_error(e.to_string()))?;
        let old = std::mem::replace(&mut self.uart, Serial::new(irq, Box::new(std::io::sink())));
        let irq = old.interrupt_evt().try_clone();
        let irq = irq.map_err(|e| apply_error(e.to_string()))?;
        self.uart = Serial::from_state(&state.into(), irq, NoEvents, old.into_writer())
            .map_err(|e| apply_error(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, value) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

impl Snapshottable for SerialDevice {
    fn snapshot_id(&self) -> String {
        "serial0".into()
    }

    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        encode_state(&self.snapshot_id(), &self.state())
    }

    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        let state: SerialDeviceState = decode_state(&self.snapshot_id(), saved)?;
        self.set_state(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_state_round_trip() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(IrqLine::new(4).unwrap(), Box::new(out.clone()));
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        dev.write(7, &[0x5a]); // scratch register
        dev.enqueue_input(b"abc");
        let saved = dev.snapshot().unwrap();

        let out2 = Shared::default();
        let mut other = SerialDevice::new(IrqLine::new(4).unwrap(), Box::new(out2.clone()));
        other.restore(SavedState::current(&saved)).unwrap();
        let mut b = [0u8];
        other.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        other.read(0, &mut b);
        assert_eq!(b[0], b'a');
        other.write(0, b"!");
        assert_eq!(&*out2.0.lock().unwrap(), b"!");
    }

    #[test]
    fn oversized_fifo_is_refused() {
        let mut dev = SerialDevice::new(IrqLine::new(4).unwrap(), Box::new(std::io::sink()));
        let bad = SerialDeviceState {
            in_buffer: vec![0; 1000],
            ..Default::default()
        };
        let bytes = encode_state("serial0", &bad).unwrap();
        assert!(dev.restore(SavedState::current(&bytes)).is_err());
    }

    #[test]
    fn registers_it_never_holds_are_refused() {
        let mut dev = SerialDevice::new(IrqLine::new(4).unwrap(), Box::new(std::io::sink()));
        let good = dev.state();
        let bad = [
            SerialDeviceState {
                interrupt_enable: 0x10,
                ..good.clone()
            },
            SerialDeviceState {
                interrupt_identification: 0,
                ..good.clone()
            },
            SerialDeviceState {
                interrupt_identification: 0xc1,
                ..good.clone()
            },
            SerialDeviceState {
                line_status: 0x80,
                ..good.clone()
            },
        ];
        for state in bad {
            let bytes = encode_state("serial0", &state).unwrap();
            assert!(
                dev.restore(SavedState::current(&bytes)).is_err(),
                "{state:?}"
            );
        }
        let bytes = encode_state("serial0", &good).unwrap();
        dev.restore(SavedState::current(&bytes)).unwrap();
    }
}
