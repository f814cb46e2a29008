//! Boots Debian 12's stock cloud kernel (fetched by `scripts/fetch-linux-kernel`) through both
//! of tern's Linux boot paths and checks, on tern's serial console, that Linux starts.
//!
//! What the build machine allows (see DEVELOPERS.md): its nested KVM instruction-emulates all
//! CPL0 code at about a million instructions per second and cannot emulate `lock cmpxchg16b`,
//! so the kernel prints its banner and e820 map, reaches "Memory:" and then stops with a KVM
//! internal error. These tests therefore stop waiting as soon as the banner and the e820 map
//! are on the console; a crash after that point is expected. Observed on that machine:
//!
//! * `vmlinux` through PVH: banner and e820 map at about 13 s (nothing comes out before the
//!   banner; `earlyprintk`, `earlycon`, `nokaslr` or `mitigations=off` made no difference),
//!   "Memory:" and the internal error at about 35 s.
//! * `bzImage` through the 64-bit boot protocol: Debian's cloud config has no
//!   CONFIG_X86_VERBOSE_BOOTUP, so the decompressor never prints "Decompressing Linux...";
//!   its only output is the warning that `nokaslr` triggers, at about 2 s. Decompressing the
//!   LZ4 payload in emulated code then takes until about 84-90 s for the banner and e820 map;
//!   "Memory:" and the internal error follow at about 112-116 s.
//!
//! If the kernel cannot be downloaded (no apt access to the Debian repositories) the tests
//! fail: they must not pass without having booted Linux.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tern_devices::GuestEvent;
use tern_machine::{Machine, MachineConfig};
use tern_testguest::KvmLock;

/// The kernel's first line; it comes out when the early console registers.
const BANNER: &str = "Linux version";
/// The bzImage decompressor's warning for `nokaslr`: its only output without
/// CONFIG_X86_VERBOSE_BOOTUP, and the proof that tern entered it correctly.
const DECOMPRESSOR: &str = "KASLR disabled: 'nokaslr' on cmdline.";

/// PVH boot: the early serial console makes the banner appear before the kernel dies.
const PVH_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 noapic nolapic_timer";
/// bzImage boot: the decompressor's serial console reads `earlyprintk`, and `nokaslr` makes
/// it print a line (timing is the same with KASLR: banner at about 90 s either way).
const BZIMAGE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr";

const MEM_MIB: u64 = 256;

/// Where the fetch script and its output live, relative to this crate.
fn workspace_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

/// The two images the fetch script produces.
struct KernelFiles {
    bz_image: PathBuf,
    vmlinux: PathBuf,
}

/// Runs `scripts/fetch-linux-kernel` once per test binary; panics with its error output if
/// the kernel cannot be had, so that a missing network fails the tests instead of skipping them.
fn kernel_files() -> &'static KernelFiles {
    static FILES: OnceLock<Result<KernelFiles, String>> = OnceLock::new();
    let files = FILES.get_or_init(|| {
        let workspace = workspace_dir();
        let out_dir = workspace.join("target/linux");
        let script = workspace.join("scripts/fetch-linux-kernel");
        let output = Command::new("bash")
            .arg(&script)
            .arg(&out_dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): these tests need Debian 12's cloud kernel, downloaded with apt \
                 (network access to the Debian repositories).\n{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        print!("{}", String::from_utf8_lossy(&output.stdout));
        Ok(KernelFiles {
            bz_image: out_dir.join("bzImage"),
            vmlinux: out_dir.join("vmlinux"),
        })
    });
    match files {
        Ok(files) => files,
        Err(message) => panic!("{message}"),
    }
}

/// The guest's console, collected in memory while the vCPU thread writes it.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    fn text(&self) -> String {
        let bytes = self.0.lock().expect("console buffer lock");
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("console buffer lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Something the console must show (a line containing each of `all_of`) within `within` of
/// the start.
struct Milestone {
    name: &'static str,
    all_of: Vec<String>,
    within: Duration,
}

impl Milestone {
    fn new(name: &'static str, all_of: Vec<String>, secs: u64) -> Self {
        Milestone {
            name,
            all_of,
            within: Duration::from_secs(secs),
        }
    }

    /// The console lines that show this milestone, or None while one is missing.
    fn lines_in<'a>(&self, console: &'a str) -> Option<Vec<&'a str>> {
        self.all_of
            .iter()
            .map(|needle| console.lines().find(|line| line.contains(needle.as_str())))
            .collect()
    }
}

/// The kernel's banner.
fn banner(secs: u64) -> Milestone {
    Milestone::new("kernel banner", vec![BANNER.into()], secs)
}

/// Linux echoing the command line tern passed it (printed between banner and e820 map).
fn command_line(cmdline: &str, secs: u64) -> Milestone {
    Milestone::new(
        "command line",
        vec![format!("Command line: {cmdline}")],
        secs,
    )
}

/// Every entry of the memory map tern handed over, as Linux prints it (`BIOS-e820: [mem
/// 0x...-0x...] usable`): proves the map arrived intact, not just that a map was printed.
/// Linux found tern's ACPI tables: the RSDP where tern put it, and each table it points to.
fn acpi_tables(secs: u64) -> Milestone {
    let lines = [
        format!("ACPI: RSDP {:#018X}", tern_machine::layout::ACPI_START).replace("0X", "0x"),
        "ACPI: XSDT".to_string(),
        "ACPI: FACP".to_string(),
        "ACPI: DSDT".to_string(),
        "ACPI: FACS".to_string(),
        "ACPI: APIC".to_string(),
    ];
    Milestone::new("ACPI tables", lines.to_vec(), secs)
}

fn e820_map(secs: u64) -> Milestone {
    let lines = tern_machine::boot::e820_map(MEM_MIB << 20)
        .into_iter()
        .map(|(start, size, kind)| {
            let kind = if kind == 1 { "usable" } else { "reserved" };
            format!(
                "BIOS-e820: [mem {start:#018x}-{:#018x}] {kind}",
                start + size - 1
            )
        })
        .collect();
    Milestone::new("e820 map", lines, secs)
}

/// What a boot showed: the console, when each milestone appeared, and the event (if any)
/// that ended the guest's run before all of them did.
struct BootRun {
    console: String,
    seen_at: Vec<Option<Duration>>,
    event: Option<(Duration, GuestEvent)>,
    elapsed: Duration,
}

/// How often the console is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Boots `kernel` on 1 vCPU and watches the console until every milestone appeared, the guest
/// stopped, or a milestone is overdue.
fn boot_and_watch(kernel: &Path, cmdline: &str, milestones: &[Milestone]) -> BootRun {
    let config = MachineConfig {
        mem_mib: MEM_MIB,
        vcpus: 1,
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: cmdline.to_string(),
        hidden_cpu_features: Vec::new(),
    };
    let console = Console::default();
    let mut machine = Machine::new(&config, Box::new(console.clone()), Vec::new())
        .unwrap_or_else(|e| panic!("cannot build a machine for {}: {e}", kernel.display()));
    let start = Instant::now();
    machine.start(false).expect("start the vCPU");
    let mut seen_at = vec![None; milestones.len()];
    let mut event = None;
    loop {
        let text = console.text();
        for (seen, milestone) in seen_at.iter_mut().zip(milestones) {
            if seen.is_none() && milestone.lines_in(&text).is_some() {
                *seen = Some(start.elapsed());
            }
        }
        let overdue = seen_at
            .iter()
            .zip(milestones)
            .any(|(seen, m)| seen.is_none() && start.elapsed() > m.within);
        if seen_at.iter().all(Option::is_some) || event.is_some() || overdue {
            break;
        }
        // The vCPU thread writes the console before it reports a crash, so one more look at
        // the console after an event sees everything the guest printed.
        event = machine.next_event(POLL).map(|e| (start.elapsed(), e));
    }
    let elapsed = start.elapsed();
    machine.shut_down();
    BootRun {
        console: console.text(),
        seen_at,
        event,
        elapsed,
    }
}

/// Prints the console and the timings, then asserts every milestone appeared in time.
fn report_and_check(what: &str, run: &BootRun, milestones: &[Milestone]) {
    println!("===== {what}: guest console =====\n{}", run.console);
    println!("===== {what}: end of console ({:.1?}) =====", run.elapsed);
    for (milestone, seen) in milestones.iter().zip(&run.seen_at) {
        match (seen, milestone.lines_in(&run.console)) {
            (Some(at), Some(lines)) => {
                println!("{what}: {} at {at:.1?}:", milestone.name);
                for line in lines {
                    println!("    {line}");
                }
            }
            _ => println!("{what}: {} not seen", milestone.name),
        }
    }
    if let Some((at, event)) = &run.event {
        println!("{what}: guest stopped at {at:.1?}: {event:?}");
    }
    for (milestone, seen) in milestones.iter().zip(&run.seen_at) {
        assert!(
            seen.is_some_and(|at| at <= milestone.within),
            "{what}: no {} ({:?}) on the console within {:?}; guest event: {:?}",
            milestone.name,
            milestone.all_of,
            milestone.within,
            run.event,
        );
    }
}

/// `vmlinux` through PVH: tern's start info (command line, e820 map) reaches Linux, and
/// Linux's early serial console comes out of tern's UART.
#[test]
fn vmlinux_boots_through_pvh() {
    let _lock = KvmLock::acquire();
    let files = kernel_files();
    // About 13 s on the build machine.
    let milestones = [
        banner(90),
        command_line(PVH_CMDLINE, 90),
        e820_map(90),
        acpi_tables(90),
    ];
    let run = boot_and_watch(&files.vmlinux, PVH_CMDLINE, &milestones);
    report_and_check("vmlinux/PVH", &run, &milestones);
}

/// `bzImage` through the 64-bit boot protocol: the decompressor runs (its `nokaslr` warning),
/// decompresses and enters the kernel, which then finds tern's zero page (command line, e820).
#[test]
fn bzimage_boots_through_64bit_protocol() {
    let _lock = KvmLock::acquire();
    let files = kernel_files();
    // About 2 s and 84-90 s on the build machine; the margin is for a loaded host.
    let milestones = [
        Milestone::new("decompressor line", vec![DECOMPRESSOR.into()], 30),
        banner(150),
        command_line(BZIMAGE_CMDLINE, 150),
        e820_map(150),
    ];
    let run = boot_and_watch(&files.bz_image, BZIMAGE_CMDLINE, &milestones);
    report_and_check("bzImage/64-bit", &run, &milestones);
}
