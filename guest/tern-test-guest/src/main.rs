//! tern test guest: a tiny x86_64 kernel that runs its workloads in user mode (CPL3) and
//! reports on the serial console what it observes about itself: a heartbeat, whether every page
//! of its working set still holds what it wrote, and whether fixed values in its registers
//! survived. tern's tests assert on these reports.
//!
//! Start-up at CPL0 is minimal (it is instruction-emulated on the build machine's nested KVM):
//! see `boot.s` and `kernel.rs`. Everything else is in `user`.
#![no_std]
#![no_main]

mod blk;
mod clock;
mod cmdline;
mod console;
mod devices;
mod disk;
mod http;
mod hw;
mod kernel;
mod memtest;
mod net;
mod netdev;
mod regs;
mod rt;
mod smp;
mod user;
mod virtio;

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// Most vCPUs the guest will bring up.
pub const MAX_CPUS: usize = 16;
/// End of the identity map set up in boot.s (16 GiB): nothing above it is reachable.
pub const MAPPED_LIMIT: u64 = 16 << 30;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::print_fmt(format_args!("tern-guest: PANIC: {info}\n"));
    hw::pvpanic();
    loop {
        clock::sleep_plain(100_000_000);
    }
}
