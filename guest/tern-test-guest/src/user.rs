//! User-mode (CPL3) main loops.

use core::sync::atomic::Ordering;

use crate::clock::{self, now_ns};
use crate::cmdline::{self, Params};
use crate::hw;
use crate::memtest::{self, Share, WorkingSet};
use crate::println;
use crate::regs;
use crate::smp;

/// `hvm_start_info` fields the guest uses.
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// Set-up shared by all CPUs; written by CPU 0 before `smp::GO`.
struct Shared {
    params: Params,
    ws: WorkingSet,
    cpus: usize,
}

static mut SHARED: Shared = Shared {
    params: Params::DEFAULT,
    ws: WorkingSet {
        gens: 0,
        base: 0,
        pages: 0,
    },
    cpus: 1,
};

extern "C" {
    static __image_end: u8;
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const TWO_MIB: u64 = 2 << 20;

/// End of the RAM range that holds the image (the working set goes right after it).
fn ram_end_after_image(info: &StartInfo, image_end: u64) -> u64 {
    let entries = info.memmap_paddr as *const MemmapEntry;
    for i in 0..info.memmap_entries as usize {
        let e = unsafe { &*entries.add(i) };
        if e.kind == 1 && e.addr <= image_end && image_end < e.addr + e.size {
            return e.addr + e.size;
        }
    }
    image_end
}

fn layout_working_set(info: &StartInfo, wss_mib: u64) -> WorkingSet {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let ram_end = ram_end_after_image(info, image_end);
    let wanted = wss_mib << 20;
    let gens = image_end;
    let base_for = |pages: u64| (gens + pages * 4 + TWO_MIB - 1) & !(TWO_MIB - 1);
    let mut pages = wanted / memtest::PAGE;
    while pages > 0 && base_for(pages) + pages * memtest::PAGE > ram_end {
        pages -= 256; // shrink in 1 MiB steps until it fits
    }
    if pages * memtest::PAGE < wanted {
        println!(
            "warning: working set reduced to {} MiB to fit in RAM",
            (pages * memtest::PAGE) >> 20
        );
    }
    WorkingSet {
        gens,
        base: base_for(pages),
        pages,
    }
}

/// Entered by `iretq` from `kernel.rs` on every CPU.
#[no_mangle]
pub extern "C" fn user_entry(cpu: u64, start_info: u64) -> ! {
    let cpu = cpu as usize;
    if cpu == 0 {
        boot_cpu_main(start_info)
    } else {
        ap_main(cpu)
    }
}

fn boot_cpu_main(start_info: u64) -> ! {
    let info = unsafe { &*(start_info as *const StartInfo) };
    if info.magic != XEN_HVM_START_MAGIC {
        println!("no PVH start info (magic {:#x})", info.magic);
        hw::pvpanic();
    }
    let (params, line) = cmdline::parse(info.cmdline_paddr);
    let line = core::str::from_utf8(line).unwrap_or("?");
    println!("boot cmdline=\"{line}\"");
    report_modules(info);
    if !clock::available(0) {
        println!("kvmclock is not available; cannot keep time");
        hw::pvpanic();
    }
    let cpus = smp::cpu_count();
    let ws = layout_working_set(info, params.wss_mib);
    unsafe {
        let shared = &mut *core::ptr::addr_of_mut!(SHARED);
        shared.params = params;
        shared.ws = ws;
        shared.cpus = cpus;
    }
    let online = 1 + smp::start_aps(cpus - 1);
    smp::GO.store(true, Ordering::Release);
    let p = &unsafe { &*core::ptr::addr_of!(SHARED) }.params;
    println!(
        "ready cpus={online}/{cpus} heartbeat_ms={} wss_mib={} write_mibps={} verify_ms={} ws_base={:#x}",
        p.heartbeat_ms,
        (ws.pages * memtest::PAGE) >> 20,
        if p.write_mibps == u64::MAX { -1i64 } else { p.write_mibps as i64 },
        p.verify_ms,
        ws.base
    );
    run(0)
}

#[repr(C)]
struct ModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

/// Reports each boot module (the initrd) with an FNV-1a checksum, so that a test can check
/// it arrived intact.
fn report_modules(info: &StartInfo) {
    let entries = info.modlist_paddr as *const ModlistEntry;
    for i in 0..info.nr_modules as usize {
        let m = unsafe { &*entries.add(i) };
        let data = unsafe { core::slice::from_raw_parts(m.paddr as *const u8, m.size as usize) };
        let sum = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        println!(
            "module {i} paddr={:#x} size={} fnv1a={sum:#018x}",
            m.paddr, m.size
        );
    }
}

fn ap_main(cpu: usize) -> ! {
    smp::ONLINE.fetch_add(1, Ordering::AcqRel);
    while !smp::GO.load(Ordering::Acquire) {
        clock::sleep_plain(1_000_000);
    }
    run(cpu)
}

/// How often CPU 0 looks at the ACPI power button at most.
const POLL_NS: u64 = 20_000_000;
/// Work is batched: a CPU with nothing due sleeps at least this long. A trip through the CPL0
/// sleep path is expensive on an emulating host (~0.1 ms), so waking per page would cost a core.
const QUANTUM_NS: u64 = 2_000_000;

fn run(cpu: usize) -> ! {
    let shared = unsafe { &*core::ptr::addr_of!(SHARED) };
    let p = &shared.params;
    let expected = regs::expected(cpu);
    let start = now_ns(cpu);
    let mut share = Share::new(
        cpu,
        shared.cpus,
        shared.ws,
        p.write_mibps,
        p.verify_ms,
        start,
    );
    share.limit_write_passes(p.write_passes);
    let hb_ns = p.heartbeat_ms * 1_000_000;
    let mut next_hb = start;
    let mut seq = 0u64;
    loop {
        let now = now_ns(cpu);
        let mut wake = now + POLL_NS;
        if cpu == 0 {
            if now >= next_hb {
                seq += 1;
                heartbeat(seq, now);
                next_hb += hb_ns;
                if next_hb <= now {
                    next_hb = now + hb_ns; // missed beats (paused): resume the rhythm, no burst
                }
            }
            wake = wake.min(next_hb);
            poll_power_button();
        }
        share.step(now);
        let now = now_ns(cpu);
        let due_in = share.next_due_in(now);
        if due_in == 0 {
            continue; // more work is due right away
        }
        wake = wake.min(now.saturating_add(due_in.max(QUANTUM_NS)));
        let sleep = wake.saturating_sub(now);
        if sleep >= clock::MIN_SLEEP_NS {
            regs::sleep_checked(cpu, &expected, sleep);
        }
    }
}

fn heartbeat(seq: u64, now: u64) {
    let secs = now / 1_000_000_000;
    let micros = (now % 1_000_000_000) / 1000;
    println!(
        "hb seq={seq} t={secs}.{micros:06} cpus={} written={} verified={} passes={} mem_errors={} reg_checks={} reg_errors={}",
        smp::ONLINE.load(Ordering::Relaxed) + 1,
        memtest::total(&memtest::WRITTEN),
        memtest::total(&memtest::VERIFIED),
        memtest::full_passes(unsafe { (*core::ptr::addr_of!(SHARED)).cpus }),
        memtest::ERRORS.load(Ordering::Relaxed),
        regs::total_checks(),
        regs::total_errors(),
    );
}

fn poll_power_button() {
    const PWRBTN: u16 = 1 << 8;
    const SLP_TYP_S5: u16 = 5 << 10;
    const SLP_EN: u16 = 1 << 13;
    if hw::inw(hw::PM1A_EVT_PORT) & PWRBTN == 0 {
        return;
    }
    hw::outw(hw::PM1A_EVT_PORT, PWRBTN);
    println!("power button pressed: powering off");
    hw::outw(hw::PM1A_CNT_PORT, SLP_TYP_S5 | SLP_EN);
}
