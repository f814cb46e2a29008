//! User-mode (CPL3) main loops.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::clock::{self, now_ns};
use crate::cmdline::{self, Params};
use crate::devices;
use crate::disk::{self, Disk};
use crate::http;
use crate::hw;
use crate::memtest::{self, Share, WorkingSet};
use crate::net::{self, Net};
use crate::netdev;
use crate::println;
use crate::regs;
use crate::smp::{self, Handoff};

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

/// The disk workload, for the CPU that runs it (`DISK_CPU`) when that is not the boot CPU.
static DISK: Handoff<Disk> = Handoff::new();
static DISK_CPU: AtomicUsize = AtomicUsize::new(0);
/// Whether the guest drives a network device and a disk (whichever CPU runs them): the
/// heartbeat prints their counters only then.
static HAS_NET: AtomicBool = AtomicBool::new(false);
static HAS_DISK: AtomicBool = AtomicBool::new(false);

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
    let p = &unsafe { &*core::ptr::addr_of!(SHARED) }.params;
    // Devices are set up before the other CPUs go: the disk workload is handed to its CPU.
    let found = devices::find(line.as_bytes());
    let now = now_ns(0);
    let net = devices::setup_net(found.net, p, now);
    // The disk workload runs on the last CPU, away from the network on CPU 0.
    let disk_cpu = if online == cpus { cpus - 1 } else { 0 };
    let mut disk = devices::setup_disk(found.blk, p, disk_cpu, now);
    HAS_NET.store(net.is_some(), Ordering::Relaxed);
    HAS_DISK.store(disk.is_some(), Ordering::Relaxed);
    if disk_cpu != 0 {
        if let Some(d) = disk.take() {
            DISK_CPU.store(disk_cpu, Ordering::Relaxed);
            DISK.put(d); // published to the APs by GO
        }
    }
    smp::GO.store(true, Ordering::Release);
    println!(
        "ready cpus={online}/{cpus} heartbeat_ms={} wss_mib={} write_mibps={} verify_ms={} ws_base={:#x}",
        p.heartbeat_ms,
        (ws.pages * memtest::PAGE) >> 20,
        if p.write_mibps == u64::MAX { -1i64 } else { p.write_mibps as i64 },
        p.verify_ms,
        ws.base
    );
    run(0, net, disk)
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
    let disk = if DISK_CPU.load(Ordering::Relaxed) == cpu {
        DISK.take()
    } else {
        None
    };
    run(cpu, None, disk)
}

/// How often CPU 0 looks at the ACPI power button.
const POLL_NS: u64 = 10_000_000;
/// Work is batched: a CPU with nothing due sleeps at least this long. A trip through the CPL0
/// sleep path is expensive on an emulating host (~0.1 ms), so waking per page would cost a core.
const QUANTUM_NS: u64 = 2_000_000;

/// One CPU's main loop: heartbeat and power button (CPU 0), network (CPU 0), disk workload
/// (its CPU), its share of the memory writer, and the register check in every sleep.
fn run(cpu: usize, mut net: Option<Net>, mut disk: Option<Disk>) -> ! {
    let shared = unsafe { &*core::ptr::addr_of!(SHARED) };
    let p = &shared.params;
    let expected = regs::expected(cpu);
    if p.prefill {
        Share::prefill(cpu, shared.cpus, shared.ws);
    }
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
    let mut power_button = true;
    let mut next_poll = start;
    loop {
        // Before the devices are polled: an interrupt from now on cancels the next sleep.
        clock::clear_wake(cpu);
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
            // Each look is an exit to the host (~40 µs here): at most one per POLL_NS, not one
            // per turn of this loop (thousands a second while the writer is busy).
            if power_button && now >= next_poll {
                power_button = poll_power_button();
                next_poll = now + POLL_NS;
            }
            wake = wake.min(next_poll);
        }
        let mut busy = false;
        if let Some(n) = net.as_mut() {
            let a = n.poll(now);
            busy |= a.busy;
            if let Some(d) = a.due_in {
                wake = wake.min(now.saturating_add(d));
            }
            if !n.has_irq() {
                wake = wake.min(now + QUANTUM_NS); // no interrupt will say a frame came in
            }
        }
        if let Some(d) = disk.as_mut() {
            d.step(now);
            wake = wake.min(now.saturating_add(d.next_due_in(now).max(QUANTUM_NS)));
        }
        // CPU 0 breaks off its share of the work when the next heartbeat is due.
        let until = if cpu == 0 { next_hb } else { u64::MAX };
        share.step(now, until);
        let now = now_ns(cpu);
        let due_in = share.next_due_in(now);
        if due_in == 0 || busy {
            continue; // more work is due right away, or frames are moving
        }
        wake = wake.min(now.saturating_add(due_in.max(QUANTUM_NS)));
        let sleep = wake.saturating_sub(now);
        if sleep < clock::MIN_SLEEP_NS {
            continue;
        }
        // Interrupts on for the sleep only; a completion that came in meanwhile cancels it.
        let mut quiet = true;
        if let Some(n) = net.as_mut() {
            quiet &= n.arm();
        }
        if let Some(d) = disk.as_mut() {
            quiet &= d.arm();
        }
        if quiet {
            regs::sleep_checked(cpu, &expected, sleep);
        }
        if let Some(n) = net.as_mut() {
            n.disarm();
        }
        if let Some(d) = disk.as_mut() {
            d.disarm();
        }
    }
}

/// Prints one heartbeat line. The network and disk counters are left out when the guest has
/// no such device: every byte costs an exit to the host (~25 µs here), and a shorter line
/// leaves the guest's rhythm less disturbed.
fn heartbeat(seq: u64, now: u64) {
    let secs = now / 1_000_000_000;
    let micros = (now % 1_000_000_000) / 1000;
    println!(
        "hb seq={seq} t={secs}.{micros:06} cpus={} written={} verified={} passes={} mem_errors={} reg_checks={}{}{} reg_errors={}",
        smp::ONLINE.load(Ordering::Relaxed) + 1,
        memtest::total(&memtest::WRITTEN),
        memtest::total(&memtest::VERIFIED),
        memtest::full_passes(unsafe { (*core::ptr::addr_of!(SHARED)).cpus }),
        memtest::ERRORS.load(Ordering::Relaxed),
        regs::total_checks(),
        NetCounters(HAS_NET.load(Ordering::Relaxed)),
        DiskCounters(HAS_DISK.load(Ordering::Relaxed)),
        regs::total_errors(),
    );
}

/// The network counters of a heartbeat, if the guest has a network device.
struct NetCounters(bool);

impl core::fmt::Display for NetCounters {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if !self.0 {
            return Ok(());
        }
        write!(
            f,
            " net_rx={} net_tx={} tcp_conns={} http_reqs={}",
            netdev::RX_PACKETS.load(Ordering::Relaxed),
            netdev::TX_PACKETS.load(Ordering::Relaxed),
            net::TCP_CONNS.load(Ordering::Relaxed),
            http::REQUESTS.load(Ordering::Relaxed),
        )
    }
}

/// The disk counters of a heartbeat, if the guest has a disk.
struct DiskCounters(bool);

impl core::fmt::Display for DiskCounters {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if !self.0 {
            return Ok(());
        }
        write!(
            f,
            " disk_written={} disk_verified={} disk_errors={}",
            disk::WRITTEN.load(Ordering::Relaxed),
            disk::VERIFIED.load(Ordering::Relaxed),
            disk::ERRORS.load(Ordering::Relaxed),
        )
    }
}

/// Looks at the ACPI power button; false when there is no PM1 block at all (all ones, as on
/// QEMU's `microvm`), so the caller stops looking.
fn poll_power_button() -> bool {
    const PWRBTN: u16 = 1 << 8;
    const SLP_TYP_S5: u16 = 5 << 10;
    const SLP_EN: u16 = 1 << 13;
    let status = hw::inw(hw::PM1A_EVT_PORT);
    if status == 0xffff {
        return false;
    }
    if status & PWRBTN == 0 {
        return true;
    }
    hw::outw(hw::PM1A_EVT_PORT, PWRBTN);
    println!("power button pressed: powering off");
    hw::outw(hw::PM1A_CNT_PORT, SLP_TYP_S5 | SLP_EN);
    true
}
