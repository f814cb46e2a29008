//! Bringing up the other vCPUs with INIT-SIPI-SIPI through the LAPIC (from user mode: the LAPIC
//! page is mapped user-accessible) and the real-mode trampoline in boot.s.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::hw::{mmio_read32, mmio_write32, LAPIC_BASE};

/// CPUID leaf 1 EBX and EDX as seen at CPL0 by the boot CPU.
pub static BOOT_CPUID1_EBX: AtomicU32 = AtomicU32::new(0);
pub static BOOT_CPUID1_EDX: AtomicU32 = AtomicU32::new(0);

/// APs that reached user mode.
pub static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// Set by the boot CPU once the shared set-up is done; APs wait for it.
pub static GO: AtomicBool = AtomicBool::new(false);

extern "C" {
    static __ap_trampoline_start: u8;
    static __ap_trampoline_end: u8;
    static __ap_trampoline_load: u8;
}

/// Number of vCPUs the machine has, from CPUID leaf 1 (tern sets EBX[23:16] to the count).
pub fn cpu_count() -> usize {
    let ebx = BOOT_CPUID1_EBX.load(Ordering::Relaxed);
    let edx = BOOT_CPUID1_EDX.load(Ordering::Relaxed);
    if edx & (1 << 28) == 0 {
        return 1;
    }
    (((ebx >> 16) & 0xff) as usize).clamp(1, crate::MAX_CPUS)
}

fn send_ipi(icr_low: u32) {
    mmio_write32(LAPIC_BASE + 0x310, 0);
    mmio_write32(LAPIC_BASE + 0x300, icr_low);
    // Wait for delivery.
    for _ in 0..1000 {
        if mmio_read32(LAPIC_BASE + 0x300) & (1 << 12) == 0 {
            break;
        }
    }
}

/// Starts every AP and waits (up to about two seconds) until `expected` of them are online.
pub fn start_aps(expected: usize) -> usize {
    if expected == 0 {
        return 0;
    }
    unsafe {
        let start = core::ptr::addr_of!(__ap_trampoline_start) as usize;
        let end = core::ptr::addr_of!(__ap_trampoline_end) as usize;
        let load = core::ptr::addr_of!(__ap_trampoline_load);
        core::ptr::copy_nonoverlapping(load, start as *mut u8, end - start);
    }
    const ALL_BUT_SELF: u32 = 3 << 18;
    const ASSERT: u32 = 1 << 14;
    send_ipi(ALL_BUT_SELF | ASSERT | (5 << 8)); // INIT
    crate::clock::sleep_plain(10_000_000);
    for _ in 0..2 {
        send_ipi(ALL_BUT_SELF | ASSERT | (6 << 8) | 0x08); // SIPI, vector 8 -> 0x8000
        crate::clock::sleep_plain(1_000_000);
    }
    for _ in 0..200 {
        if ONLINE.load(Ordering::Acquire) >= expected {
            break;
        }
        crate::clock::sleep_plain(10_000_000);
    }
    ONLINE.load(Ordering::Acquire)
}

/// A value handed from the boot CPU to another CPU once (put before `GO`, taken after).
pub struct Handoff<T> {
    /// 0 empty, 1 being written, 2 full, 3 taken.
    state: AtomicU32,
    cell: core::cell::UnsafeCell<Option<T>>,
}

// SAFETY: the state machine gives the cell to one CPU at a time: the putter between 0 -> 1 and
// 1 -> 2, the taker after 2 -> 3.
unsafe impl<T: Send> Sync for Handoff<T> {}

impl<T> Handoff<T> {
    pub const fn new() -> Self {
        Handoff {
            state: AtomicU32::new(0),
            cell: core::cell::UnsafeCell::new(None),
        }
    }

    /// Stores `v` (once; a second value is dropped).
    pub fn put(&self, v: T) {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            unsafe { *self.cell.get() = Some(v) };
            self.state.store(2, Ordering::Release);
        }
    }

    /// The value, to the first CPU that asks once it is there.
    pub fn take(&self) -> Option<T> {
        self.state
            .compare_exchange(2, 3, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        unsafe { (*self.cell.get()).take() }
    }
}
