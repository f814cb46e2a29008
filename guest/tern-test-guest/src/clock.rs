//! Time from kvmclock (one pvclock page per CPU, written by KVM) and sleeping through the
//! LAPIC timer gate.

use core::sync::atomic::{fence, AtomicU8, Ordering};

use crate::MAX_CPUS;

/// `pvclock_vcpu_time_info` as KVM writes it.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

#[repr(C, align(4096))]
pub struct PvClockPage(pub [PvClock; MAX_CPUS]);

pub static mut PVCLOCK: PvClockPage = PvClockPage(
    [PvClock {
        version: 0,
        pad0: 0,
        tsc_timestamp: 0,
        system_time: 0,
        tsc_to_system_mul: 0,
        tsc_shift: 0,
        flags: 0,
        pad: [0; 2],
    }; MAX_CPUS],
);

/// Guest time in nanoseconds, read from `cpu`'s pvclock page.
pub fn now_ns(cpu: usize) -> u64 {
    let p = unsafe { core::ptr::addr_of!(PVCLOCK.0[cpu]) };
    loop {
        let v1 = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).version)) };
        fence(Ordering::Acquire);
        let c = unsafe { core::ptr::read_volatile(p) };
        let tsc = crate::hw::rdtsc();
        fence(Ordering::Acquire);
        let v2 = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).version)) };
        if v1 & 1 != 0 || v1 != v2 {
            continue;
        }
        let mut delta = tsc.wrapping_sub(c.tsc_timestamp);
        if c.tsc_shift >= 0 {
            delta <<= c.tsc_shift;
        } else {
            delta >>= -c.tsc_shift;
        }
        let scaled = ((u128::from(delta) * u128::from(c.tsc_to_system_mul)) >> 32) as u64;
        return c.system_time.wrapping_add(scaled);
    }
}

/// True once KVM has filled `cpu`'s pvclock page.
pub fn available(cpu: usize) -> bool {
    let p = unsafe { core::ptr::addr_of!(PVCLOCK.0[cpu]) };
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).tsc_to_system_mul)) != 0 }
}

/// Longest single sleep: the LAPIC initial count is 32 bits of nanoseconds.
pub const MAX_SLEEP_NS: u64 = 1_000_000_000;
/// Shortest sleep worth a trip through the gate.
pub const MIN_SLEEP_NS: u64 = 20_000;

extern "C" {
    fn guest_sleep(ns: u64, wake_flag: *const u8);
}

/// One flag per CPU, set by that CPU's device-interrupt stub (`isr_wake_*` in boot.s) and
/// checked by the sleep gate with interrupts off. A CPU clears its flag before it polls its
/// devices; an interrupt that arrives between that poll and the sleep then cancels the sleep
/// instead of being lost in user mode.
#[no_mangle]
pub static WAKE_FLAGS: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// Clears `cpu`'s wake flag (before polling the devices whose interrupts set it).
pub fn clear_wake(cpu: usize) {
    WAKE_FLAGS[cpu].store(0, Ordering::SeqCst);
}

/// The address of `cpu`'s wake flag, for the sleep gate.
pub fn wake_flag(cpu: usize) -> *const u8 {
    WAKE_FLAGS[cpu].as_ptr()
}

/// Sleeps about `ns` nanoseconds (or until any interrupt) without the register check.
pub fn sleep_plain(ns: u64) {
    unsafe { guest_sleep(ns.clamp(MIN_SLEEP_NS, MAX_SLEEP_NS), core::ptr::null()) };
}
