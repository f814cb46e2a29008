//! Machine-wide KVM state besides RAM and vCPUs: the in-kernel interrupt controllers, the PIT
//! and the guest clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::MachineError;

/// Everything KVM keeps per VM that a checkpoint needs.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM size in bytes (the layout around the MMIO hole follows from it).
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// kvmclock at the moment of capture, in nanoseconds.
    pub clock_ns: u64,
}

impl tern_devices::VersionedState for VmState {
    const KIND: &'static str = "VM";
    const VERSION: u16 = 1;
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, MachineError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm_err("get irqchip"))?;
    Ok(chip)
}

/// Captures the VM-wide state (vCPUs must be stopped).
pub fn capture(vm: &VmFd, memory_bytes: u64, vcpus: u32) -> Result<VmState, MachineError> {
    Ok(VmState {
        memory_bytes,
        vcpus,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("get PIT"))?,
        clock_ns: vm.get_clock().map_err(kvm_err("get clock"))?.clock,
    })
}

/// Puts interrupt controllers and PIT back (before the vCPUs run again).
pub fn restore_devices(vm: &VmFd, state: &VmState) -> Result<(), MachineError> {
    let chips = [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in chips {
        if chip.chip_id != id {
            return Err(MachineError::BadState(
                "interrupt controller state out of order",
            ));
        }
        vm.set_irqchip(chip).map_err(kvm_err("set irqchip"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_err("set PIT"))
}

/// Sets kvmclock so the guest's clock continues from `clock_ns` (never backwards).
pub fn restore_clock(vm: &VmFd, clock_ns: u64) -> Result<(), MachineError> {
    let clock = kvm_clock_data {
        clock: clock_ns,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("set clock"))
}
