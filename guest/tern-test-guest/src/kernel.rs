//! CPL0 set-up for one CPU: IDT (once), TSS with an open I/O bitmap, LAPIC timer, kvmclock;
//! then `iretq` into user mode. Kept short: this code is instruction-emulated here.

use core::arch::asm;
use core::ptr::addr_of_mut;

use crate::clock::PVCLOCK;
use crate::hw::LAPIC_BASE;
use crate::MAX_CPUS;

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    zero: u32,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

static mut IDT: Idt = Idt([IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    zero: 0,
}; 256]);

/// 64-bit TSS followed by its I/O permission bitmap (all zero: every port allowed) and the
/// mandatory trailing 0xff byte.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    iomap: [u8; 8192],
    iomap_end: u8,
}

const TSS_SIZE: usize = core::mem::size_of::<Tss>();

#[repr(C, align(4096))]
struct TssSlot(Tss);

const EMPTY_TSS: TssSlot = TssSlot(Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 0,
    iomap: [0; 8192],
    iomap_end: 0,
});
static mut TSS: [TssSlot; MAX_CPUS] = [EMPTY_TSS; MAX_CPUS];

const KSTACK_SIZE: usize = 16384;
const USTACK_SIZE: usize = 128 * 1024;

#[repr(C, align(4096))]
struct UserStacks([[u8; USTACK_SIZE]; MAX_CPUS]);
static mut USER_STACKS: UserStacks = UserStacks([[0; USTACK_SIZE]; MAX_CPUS]);

pub const VECTOR_TIMER: usize = 0x40;
/// Device interrupts meant to wake CPU n use vector `VECTOR_WAKE + n` (see `isr_wake_*`).
pub const VECTOR_WAKE: usize = 0x41;
const VECTOR_SPURIOUS: usize = 0xff;

extern "C" {
    static exception_stubs: [u64; 32];
    static wake_stubs: [u64; MAX_CPUS];
    static mut gdt64: [u64; 5 + 2 * MAX_CPUS];
    static kernel_stacks: u8;
    fn isr_timer();
    fn isr_other();
    fn isr_spurious();
}

fn gate(handler: u64, dpl: u8) -> IdtEntry {
    IdtEntry {
        offset_low: handler as u16,
        selector: 0x08,
        ist: 0,
        type_attr: 0x8e | (dpl << 5), // present interrupt gate: interrupts off inside
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        zero: 0,
    }
}

unsafe fn fill_idt() {
    let idt = &mut *addr_of_mut!(IDT);
    let other = gate(isr_other as *const () as u64, 0);
    for e in idt.0.iter_mut() {
        *e = other;
    }
    for (i, &stub) in exception_stubs.iter().enumerate() {
        idt.0[i] = gate(stub, 0);
    }
    idt.0[VECTOR_TIMER] = gate(isr_timer as *const () as u64, 0);
    for (i, &stub) in wake_stubs.iter().enumerate() {
        idt.0[VECTOR_WAKE + i] = gate(stub, 0);
    }
    idt.0[VECTOR_SPURIOUS] = gate(isr_spurious as *const () as u64, 0);
}

unsafe fn load_idt() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let p = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: addr_of_mut!(IDT) as u64,
    };
    asm!("lidt [{}]", in(reg) &p, options(nostack, readonly));
}

unsafe fn load_tss(cpu: usize) {
    let tss = addr_of_mut!(TSS[cpu].0);
    (*tss).rsp0 = (&kernel_stacks as *const u8 as u64) + ((cpu as u64 + 1) * KSTACK_SIZE as u64);
    (*tss).iomap_base = 104;
    (*tss).iomap_end = 0xff;
    let base = tss as u64;
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let gdt = &mut *addr_of_mut!(gdt64);
    gdt[5 + 2 * cpu] = low;
    gdt[6 + 2 * cpu] = base >> 32;
    let selector = (0x28 + 16 * cpu) as u16;
    asm!("ltr {0:x}", in(reg) selector, options(nostack));
}

unsafe fn init_lapic() {
    crate::hw::mmio_write32(LAPIC_BASE + 0xf0, 0x100 | VECTOR_SPURIOUS as u32); // enable
    crate::hw::mmio_write32(LAPIC_BASE + 0x80, 0); // accept every priority
    crate::hw::mmio_write32(LAPIC_BASE + 0x3e0, 0xb); // timer divide by 1: 1 tick = 1 ns on KVM
    crate::hw::mmio_write32(LAPIC_BASE + 0x320, VECTOR_TIMER as u32); // one-shot, unmasked
}

unsafe fn init_kvmclock(cpu: usize) {
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    let area = addr_of_mut!(PVCLOCK.0[cpu]) as u64 | 1;
    asm!("wrmsr", in("ecx") MSR_KVM_SYSTEM_TIME_NEW, in("eax") area as u32, in("edx") (area >> 32) as u32,
         options(nostack));
}

/// Entered from `boot.s` on every CPU with paging and long mode on.
#[no_mangle]
unsafe extern "C" fn kernel_main(cpu: u64, start_info: u64) -> ! {
    let cpu = cpu as usize;
    if cpu >= MAX_CPUS {
        loop {
            asm!("cli", "hlt");
        }
    }
    if cpu == 0 {
        // Mask the legacy PIC: its timer tick (vector 8 after reset) is not ours to handle.
        crate::hw::outb(0x21, 0xff);
        crate::hw::outb(0xa1, 0xff);
        fill_idt();
        // CPUID is read here, at CPL0: on the nested KVM of the build machine CPUID executed at
        // CPL3 returns the outer host's values instead of the ones tern configured.
        let l1 = core::arch::x86_64::__cpuid(1);
        crate::smp::BOOT_CPUID1_EBX.store(l1.ebx, core::sync::atomic::Ordering::Relaxed);
        crate::smp::BOOT_CPUID1_EDX.store(l1.edx, core::sync::atomic::Ordering::Relaxed);
    }
    load_idt();
    load_tss(cpu);
    init_lapic();
    init_kvmclock(cpu);
    let stack_top = addr_of_mut!(USER_STACKS.0[cpu]) as u64 + USTACK_SIZE as u64 - 8;
    asm!(
        "push 0x1b",      // user SS
        "push {stack}",
        "push 0x202",     // IF set
        "push 0x23",      // user CS
        "push {entry}",
        "iretq",
        stack = in(reg) stack_top,
        entry = in(reg) crate::user::user_entry as *const () as usize,
        in("rdi") cpu as u64,
        in("rsi") start_info,
        options(noreturn),
    );
}

/// Frame pushed by the exception stubs.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
unsafe extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack));
    crate::console::print_fmt(format_args!(
        "tern-guest: EXCEPTION vector={} error={:#x} rip={:#x} cs={:#x} rsp={:#x} cr2={:#x}\n",
        frame.vector, frame.error, frame.rip, frame.cs, frame.rsp, cr2
    ));
    crate::hw::pvpanic();
    loop {
        asm!("cli", "hlt");
    }
}
