//! Guest-physical address map of a tern machine (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT used for the boot vCPU
//! 0x0000_6000  PVH start_info, then its memory map
//! 0x0000_7000  bzImage zero page (boot_params)
//! 0x0000_9000  boot page tables for the 64-bit Linux boot protocol
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  .. 0x0010_0000  reserved (EBDA and legacy BIOS area)
//! 0x0010_0000  RAM continues
//! 0xc000_0000  .. 0x1_0000_0000  MMIO hole: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

/// Size of one guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Where the boot GDT lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after the start info.
pub const PVH_MEMMAP_START: u64 = PVH_INFO_START + 0x40;
/// Linux zero page (boot_params) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PML4 of the identity map used by the 64-bit Linux boot protocol.
pub const BOOT_PML4_START: u64 = 0x9000;
/// PDPT of that identity map.
pub const BOOT_PDPT_START: u64 = 0xa000;
/// First page directory of that identity map.
pub const BOOT_PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the legacy hole below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, where a legacy scan of 0xe0000..0xfffff also finds it).
pub const ACPI_START: u64 = 0xe0000;
/// First byte of RAM above the legacy hole.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The boot structures above must not be overwritten by a kernel image.
pub const BOOT_STRUCTURES_END: u64 = CMDLINE_START + CMDLINE_MAX_SIZE as u64;

/// Start of the 32-bit MMIO hole; RAM above this address is relocated above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio device windows start inside the hole: device `i` of a machine is at
/// `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE` and raises GSI `VIRTIO_GSI_BASE + i` (IOAPIC pins
/// 16..23). This fixed layout is also how the test guest finds its devices when its command line
/// has no `virtio_mmio.device=` entries.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of virtio-mmio device 0.
pub const VIRTIO_GSI_BASE: u32 = 16;
/// Most virtio-mmio devices per machine (IOAPIC pins 16..23).
pub const VIRTIO_MAX_DEVICES: u32 = 8;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Port of the first 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// i8042 controller data/command ports start here.
pub const I8042_PORT: u16 = 0x60;
/// ACPI PM1a event block (status + enable, 4 bytes).
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes).
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// GSI used for the ACPI system control interrupt.
pub const ACPI_SCI_GSI: u32 = 9;
/// pvpanic port: the guest writes here when it panics.
pub const PVPANIC_PORT: u16 = 0x505;

/// Guest-physical RAM ranges for a machine of `mem_bytes` bytes: below the hole, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_machine_has_one_range() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
    }

    #[test]
    fn large_machine_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }
}
