//! A machine's whole state besides its RAM — VM-wide state, every vCPU, every device — in the
//! order it is put back. This is the one place where a machine's state is captured
//! ([`Machine::save_state`]), turned into records for a checkpoint or a stream
//! ([`MachineState::encode`], [`MachineState::decode`]) and checked and applied to a machine
//! ([`Machine::restore_state`]). Save, restore, migrate out and migrate in all go through it.

use kvm_bindings::kvm_cpuid_entry2;
use tern_devices::bus::lock;
use tern_devices::serial::ConsoleOut;
use tern_devices::state::{decode_state, encode_state, SavedState, StateEncoding, StateError};
use tern_devices::virtio::VirtioDevice;

use crate::vcpu::{self, VcpuState};
use crate::vm_state::VmState;
use crate::{Machine, MachineError};

/// The state of one device, as the device encoded it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceState {
    /// The device's snapshot id ("serial0", "net0").
    pub id: String,
    pub bytes: Vec<u8>,
}

/// Everything but RAM that makes up a running machine.
#[derive(Clone)]
pub struct MachineState {
    pub vm: VmState,
    /// One per vCPU, in index order once checked against a machine.
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<DeviceState>,
    /// How the device states are encoded (devices decode their own).
    pub device_encoding: StateEncoding,
}

/// A machine state as the records of a checkpoint or stream: MACHINE, one VCPU per vCPU,
/// one DEVICE per device.
#[derive(Clone, Debug, Default)]
pub struct StateRecords {
    pub machine: Vec<u8>,
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(String, Vec<u8>)>,
}

impl MachineState {
    /// Encodes the state in the form this build writes.
    pub fn encode(&self) -> Result<StateRecords, StateError> {
        if self.device_encoding != StateEncoding::Versioned {
            // Device states read from an older source are re-encoded only by their devices.
            return Err(StateError::Encode {
                id: "machine".into(),
                reason: "device states of an older format cannot be written again as they are"
                    .into(),
            });
        }
        Ok(StateRecords {
            machine: encode_state("MACHINE", &self.vm)?,
            vcpus: self
                .vcpus
                .iter()
                .map(|v| encode_state(&format!("vCPU {}", v.index), v))
                .collect::<Result<_, _>>()?,
            devices: self
                .devices
                .iter()
                .map(|d| (d.id.clone(), d.bytes.clone()))
                .collect(),
        })
    }

    /// Decodes the records of a checkpoint or stream whose state records are in `encoding`.
    /// They come from a file or a peer: every body must decode completely, and the vCPU
    /// states must be as many as the VM state says. What depends on the machine they are put
    /// into is checked by [`Machine::restore_state`].
    pub fn decode<B: AsRef<[u8]>>(
        encoding: StateEncoding,
        machine: &[u8],
        vcpus: impl IntoIterator<Item = B>,
        devices: Vec<(String, Vec<u8>)>,
    ) -> Result<MachineState, MachineError> {
        let vm: VmState =
            decode_state("MACHINE", SavedState::new(encoding, machine)).map_err(bad_state)?;
        let vcpus: Vec<VcpuState> = vcpus
            .into_iter()
            .map(|b| decode_state("VCPU", SavedState::new(encoding, b.as_ref())))
            .collect::<Result<_, _>>()
            .map_err(bad_state)?;
        if vcpus.is_empty() || vcpus.len() != vm.vcpus as usize {
            return Err(MachineError::SavedState(format!(
                "{} vCPU states for {} vCPUs",
                vcpus.len(),
                vm.vcpus
            )));
        }
        Ok(MachineState {
            vm,
            vcpus,
            devices: devices
                .into_iter()
                .map(|(id, bytes)| DeviceState { id, bytes })
                .collect(),
            device_encoding: encoding,
        })
    }

    /// The CPUID of each vCPU, in the order of the states: what a machine to restore this
    /// state into must be built with.
    pub fn vcpu_cpuids(&self) -> Vec<Vec<kvm_cpuid_entry2>> {
        let mut states: Vec<&VcpuState> = self.vcpus.iter().collect();
        states.sort_by_key(|v| v.index);
        states.iter().map(|v| v.cpuid.clone()).collect()
    }
}

fn bad_state(e: StateError) -> MachineError {
    MachineError::SavedState(e.to_string())
}

impl Machine {
    /// A machine to restore `state` into: zeroed RAM of `mem_mib` (what this host admitted)
    /// and vCPUs with exactly the CPUID the guest was started with.
    pub fn for_state(
        state: &MachineState,
        mem_mib: u64,
        console: ConsoleOut,
        virtio: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Machine, MachineError> {
        Machine::new_blank(mem_mib, state.vcpu_cpuids(), console, virtio)
    }

    /// Captures the machine's state; it must be paused.
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        Ok(MachineState {
            vm: self.capture_vm_state()?,
            vcpus: self.capture_vcpus()?,
            devices: self.capture_devices()?,
            device_encoding: StateEncoding::Versioned,
        })
    }

    /// Puts `state` back into this paused machine: VM-wide state first (interrupt
    /// controllers, PIT, clock), then the vCPUs, then the devices. Refuses, before changing
    /// anything it can check up front, a state of another shape (memory size, vCPU count), vCPU
    /// states that do not match the vCPUs (see [`vcpu::order_states`]) and a device state for a
    /// device this machine does not have.
    pub fn restore_state(&self, state: MachineState) -> Result<(), MachineError> {
        self.check_state(&state)?;
        self.restore_vm_state(&state.vm)?;
        self.restore_vcpus(state.vcpus)?;
        self.restore_devices(&state.devices, state.device_encoding)
    }

    fn check_state(&self, state: &MachineState) -> Result<(), MachineError> {
        let memory = self.ram().size();
        if state.vm.memory_bytes != memory {
            return Err(MachineError::SavedState(format!(
                "the saved machine has {} MiB of memory, this one {} MiB",
                state.vm.memory_bytes >> 20,
                memory >> 20
            )));
        }
        if state.vm.vcpus as usize != self.vcpu_cpuids().len() {
            return Err(MachineError::SavedState(format!(
                "the saved machine has {} vCPUs, this one {}",
                state.vm.vcpus,
                self.vcpu_cpuids().len()
            )));
        }
        let stateful = self.devices().stateful();
        for d in &state.devices {
            if !stateful.iter().any(|s| lock(s).snapshot_id() == d.id) {
                return Err(MachineError::Device(format!(
                    "no device '{}' to restore state into",
                    d.id
                )));
            }
        }
        // Ordering checks the vCPU states without applying them.
        vcpu::order_states(state.vcpus.clone(), self.vcpu_cpuids())
            .map(|_| ())
            .map_err(MachineError::SavedState)
    }
}
