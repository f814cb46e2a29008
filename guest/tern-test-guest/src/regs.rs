//! Fixed values held in registers across every sleep, and their check.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::MAX_CPUS;

/// rbx, rbp, r8..r15, then xmm0..xmm15 (the layout `regcheck_sleep` in boot.s uses).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RegSet {
    pub gpr: [u64; 10],
    pub xmm: [[u64; 2]; 16],
}

const GPR_NAMES: [&str; 10] = [
    "rbx", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
];

extern "C" {
    fn regcheck_sleep(ns: u64, expected: *const RegSet, found: *mut RegSet, wake_flag: *const u8);
}

/// The fixed values for `cpu`: different on every CPU and in every register.
pub fn expected(cpu: usize) -> RegSet {
    let c = cpu as u64;
    let mut r = RegSet {
        gpr: [0; 10],
        xmm: [[0; 2]; 16],
    };
    for (i, g) in r.gpr.iter_mut().enumerate() {
        *g = 0x7e57_0000_0000_0000
            | (c << 40)
            | ((i as u64) << 32)
            | 0xa5a5_0000
            | (i as u64 * 0x1111);
    }
    for (i, x) in r.xmm.iter_mut().enumerate() {
        x[0] = 0x5e5e_0000_0000_0000 | (c << 40) | ((i as u64) << 32) | 0x0123_4567;
        x[1] = 0x89ab_cdef_0000_0000 | (c << 16) | i as u64;
    }
    r
}

/// Register mismatches seen so far, per CPU.
pub static ERRORS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Sleeps with a register check, per CPU.
pub static CHECKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Sleeps `ns` with the fixed values live in the registers, then checks them. The sleep ends
/// early on any interrupt, and does not begin if `cpu`'s wake flag is set.
pub fn sleep_checked(cpu: usize, expected: &RegSet, ns: u64) {
    let ns = ns.clamp(crate::clock::MIN_SLEEP_NS, crate::clock::MAX_SLEEP_NS);
    let mut found = RegSet {
        gpr: [0; 10],
        xmm: [[0; 2]; 16],
    };
    unsafe { regcheck_sleep(ns, expected, &mut found, crate::clock::wake_flag(cpu)) };
    CHECKS[cpu].fetch_add(1, Ordering::Relaxed);
    if found == *expected {
        return;
    }
    for (i, (e, f)) in expected.gpr.iter().zip(found.gpr.iter()).enumerate() {
        if e != f {
            report(
                cpu,
                format_args!("{}", GPR_NAMES[i]),
                *e as u128,
                *f as u128,
            );
        }
    }
    for (i, (e, f)) in expected.xmm.iter().zip(found.xmm.iter()).enumerate() {
        if e != f {
            let e = (u128::from(e[1]) << 64) | u128::from(e[0]);
            let f = (u128::from(f[1]) << 64) | u128::from(f[0]);
            report(cpu, format_args!("xmm{i}"), e, f);
        }
    }
}

fn report(cpu: usize, reg: core::fmt::Arguments, expected: u128, found: u128) {
    let n = ERRORS[cpu].fetch_add(1, Ordering::Relaxed);
    if n < 32 {
        crate::println!(
            "REGISTER MISMATCH cpu={cpu} reg={reg} expected={expected:#x} found={found:#x}"
        );
    }
}

/// Total mismatches over all CPUs.
pub fn total_errors() -> u64 {
    ERRORS.iter().map(|e| e.load(Ordering::Relaxed)).sum()
}

/// Total checks over all CPUs.
pub fn total_checks() -> u64 {
    CHECKS.iter().map(|e| e.load(Ordering::Relaxed)).sum()
}
