//! Port I/O and MMIO helpers. Port I/O works from CPL3 because every TSS carries an all-zero
//! I/O permission bitmap; MMIO works because the identity map is user-accessible.

use core::arch::asm;

pub const SERIAL_PORT: u16 = 0x3f8;
pub const PVPANIC_PORT: u16 = 0x505;
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const LAPIC_BASE: usize = 0xfee0_0000;

#[inline]
pub fn outb(port: u16, value: u8) {
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn outw(port: u16, value: u16) {
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes a byte string to a port with one `rep outsb` (one exit for the whole string).
pub fn outsb(port: u16, bytes: &[u8]) {
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(nostack, preserves_flags));
    }
}

#[inline]
pub fn mmio_write32(addr: usize, value: u32) {
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

#[inline]
pub fn mmio_read32(addr: usize) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

#[inline]
pub fn rdtsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Tells the host the guest panicked.
pub fn pvpanic() {
    outb(PVPANIC_PORT, 1);
}

/// The IOAPIC (the only one on tern; QEMU's `microvm` without ACPI has the same).
const IOAPIC_BASE: usize = 0xfec0_0000;

fn ioapic_read(reg: u32) -> u32 {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_read32(IOAPIC_BASE + 0x10)
}

fn ioapic_write(reg: u32, value: u32) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, value);
}

/// Routes IOAPIC pin `irq` to `vector` on the CPU whose APIC ID is `apic_id`: fixed delivery,
/// physical destination, edge-triggered, active high, unmasked. A virtio-mmio device holds its
/// line high until its interrupt is acknowledged, so each acknowledged-then-raised interrupt is
/// one edge. Returns false (and changes nothing) when there is no such pin.
pub fn ioapic_route(irq: u32, vector: u8, apic_id: u8) -> bool {
    let version = ioapic_read(1);
    if version == 0 || version == u32::MAX {
        return false;
    }
    let max_entry = (version >> 16) & 0xff;
    if irq > max_entry {
        return false;
    }
    // Destination first, then the low word, which unmasks the pin.
    ioapic_write(0x11 + 2 * irq, u32::from(apic_id) << 24);
    ioapic_write(0x10 + 2 * irq, u32::from(vector));
    true
}
