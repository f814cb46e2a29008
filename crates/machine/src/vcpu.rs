//! vCPUs: creation and configuration, the run loop on its own thread, and state capture.
//!
//! Each vCPU thread owns its `VcpuFd`. The machine talks to it through a command channel; a
//! command sent while the vCPU is inside `KVM_RUN` is noticed because the sender also "kicks"
//! the thread: it sets `immediate_exit` in the vCPU's `kvm_run` page and sends a signal, so
//! `KVM_RUN` returns `EINTR` whether or not the thread had entered it yet. The kicker writes
//! through a mapping of that page of its own ([`RunPage`]), never through the thread's: the
//! thread unmaps its mapping when it ends, the kicker's lives as long as the kicker.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs, Xsave, KVM_EXIT_DIRTY_RING_FULL,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use tern_devices::{Bus, GuestEvent, GuestEventSender};
use tern_sandbox::ThreadKind;

use crate::cpuid;

/// Errors of vCPU set-up and state handling.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {message}")]
    Other { index: u32, message: String },
    #[error("vCPU {0} thread is gone")]
    Gone(u32),
}

fn kvm_err(index: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

/// MSRs whose write order matters on restore: the TSC first, its deadline last.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The complete architectural state of one vCPU as KVM exposes it.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// XSAVE area (FPU, SSE, AVX, ...), as 32-bit words.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// LAPIC register page.
    pub lapic: Vec<u8>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
    /// Guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl tern_devices::VersionedState for VcpuState {
    const KIND: &'static str = "vCPU";
    const VERSION: u16 = 1;
}

/// Checks saved vCPU states against the vCPUs of a machine, created with `cpuids` (one per
/// vCPU), and returns them in vCPU order: there must be one state per vCPU, each naming a
/// vCPU that exists (`index`) and no vCPU twice, each with the CPUID that vCPU was created
/// with and a LAPIC page of the right size. (What depends on the host, such as the XSAVE
/// size, is checked when a state is put back.)
pub fn order_states(
    states: Vec<VcpuState>,
    cpuids: &[Vec<kvm_cpuid_entry2>],
) -> Result<Vec<VcpuState>, String> {
    if states.len() != cpuids.len() {
        return Err(format!(
            "{} vCPU states for {} vCPUs",
            states.len(),
            cpuids.len()
        ));
    }
    let mut slots: Vec<Option<VcpuState>> = cpuids.iter().map(|_| None).collect();
    for state in states {
        let i = state.index;
        let slot = slots
            .get_mut(i as usize)
            .ok_or_else(|| format!("a state for vCPU {i}, of {}", cpuids.len()))?;
        if slot.is_some() {
            return Err(format!("two states for vCPU {i}"));
        }
        if !same_cpuid(&state.cpuid, &cpuids[i as usize]) {
            return Err(format!(
                "the state of vCPU {i} has another CPUID than the vCPU"
            ));
        }
        if state.lapic.len() != std::mem::size_of::<kvm_lapic_state>() {
            return Err(format!(
                "the LAPIC page of vCPU {i} is {} bytes",
                state.lapic.len()
            ));
        }
        *slot = Some(state);
    }
    // Every slot is filled: as many states as vCPUs, none twice.
    Ok(slots.into_iter().flatten().collect())
}

/// Whether two CPUID tables are the same, entry by entry (padding aside).
fn same_cpuid(a: &[kvm_cpuid_entry2], b: &[kvm_cpuid_entry2]) -> bool {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| key(x) == key(y))
}

/// A created, configured vCPU that has not started running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    cpuid: Vec<kvm_cpuid_entry2>,
    msr_indices: Vec<u32>,
    xsave_size: usize,
}

impl Vcpu {
    /// Creates vCPU `index` with exactly the CPUID `cpuid` (see [`cpuid::for_vcpu`]).
    pub fn new(
        vm: &VmFd,
        index: u32,
        cpuid: Vec<kvm_cpuid_entry2>,
        msr_indices: &[u32],
        xsave_size: usize,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(index, "create"))?;
        let kvm_cpuid = cpuid::to_kvm(&cpuid).map_err(|e| VcpuError::Other {
            index,
            message: format!("CPUID table: {e:?}"),
        })?;
        fd.set_cpuid2(&kvm_cpuid)
            .map_err(kvm_err(index, "set CPUID"))?;
        let vcpu = Vcpu {
            index,
            fd,
            cpuid,
            msr_indices: msr_indices.to_vec(),
            xsave_size,
        };
        vcpu.set_boot_msrs()?;
        vcpu.set_lapic_lints()?;
        vcpu.set_boot_fpu()?;
        Ok(vcpu)
    }

    /// Sets the MSRs captured with the state (probed once per machine, see [`saveable_msrs`]).
    pub fn set_msr_indices(&mut self, indices: &[u32]) {
        self.msr_indices = indices.to_vec();
    }

    /// Index (also the APIC ID) of this vCPU.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM handle, for boot-time register set-up.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The CPUID this vCPU was created with.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let entries = [
            msr(MSR_IA32_MISC_ENABLE, 1),          // fast string operations
            msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Other {
            index: self.index,
            message: format!("MSR table: {e:?}"),
        })?;
        self.fd
            .set_msrs(&msrs)
            .map_err(kvm_err(self.index, "set MSRs"))?;
        Ok(())
    }

    /// LINT0 delivers ExtINT (the legacy PIC) and LINT1 NMI, as firmware would set them.
    fn set_lapic_lints(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_EXTINT: u32 = 0x7;
        const MODE_NMI: u32 = 0x4;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(kvm_err(self.index, "get LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
            let v = lapic_reg(&lapic, reg);
            set_lapic_reg(&mut lapic, reg, (v & !0x700) | (mode << 8));
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err(self.index, "set LAPIC"))
    }

    fn set_boot_fpu(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(kvm_err(self.index, "set FPU"))
    }

    /// Where the vCPU is, in one line: for crash reports.
    pub fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Captures the full state. Only valid while the vCPU is not running.
    pub fn capture(&self) -> Result<VcpuState, VcpuError> {
        let i = self.index;
        let fd = &self.fd;
        // MP state and events first: KVM may have to flush pending work into them.
        let mp_state = fd.get_mp_state().map_err(kvm_err(i, "get MP state"))?;
        let events = fd.get_vcpu_events().map_err(kvm_err(i, "get events"))?;
        let regs = fd.get_regs().map_err(kvm_err(i, "get registers"))?;
        let sregs = fd
            .get_sregs()
            .map_err(kvm_err(i, "get segment registers"))?;
        let xsave = self.get_xsave()?;
        let xcrs = fd.get_xcrs().map_err(kvm_err(i, "get XCRs"))?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(kvm_err(i, "get debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm_err(i, "get LAPIC"))?;
        let msrs = self.get_msrs()?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            index: i,
            cpuid: self.cpuid.clone(),
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
            mp_state,
            events,
            msrs,
            tsc_khz,
        })
    }

    /// Puts a captured state back. The CPUID must be the one this vCPU was created with.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let i = self.index;
        let fd = &self.fd;
        if state.lapic.len() != std::mem::size_of::<kvm_lapic_state>() {
            return Err(VcpuError::Other {
                index: i,
                message: format!("LAPIC state of {} bytes", state.lapic.len()),
            });
        }
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // Keep the guest's TSC rate where the host can scale it; otherwise the guest
                // still runs, with its clocksource re-calibrated by kvmclock.
                let _ = fd.set_tsc_khz(khz);
            }
        }
        fd.set_mp_state(state.mp_state)
            .map_err(kvm_err(i, "set MP state"))?;
        fd.set_regs(&state.regs)
            .map_err(kvm_err(i, "set registers"))?;
        fd.set_sregs(&state.sregs)
            .map_err(kvm_err(i, "set segment registers"))?;
        self.set_xsave(&state.xsave)?;
        fd.set_xcrs(&state.xcrs).map_err(kvm_err(i, "set XCRs"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(kvm_err(i, "set debug registers"))?;
        let mut lapic = kvm_lapic_state::default();
        for (dst, &src) in lapic.regs.iter_mut().zip(&state.lapic) {
            *dst = src as _;
        }
        fd.set_lapic(&lapic).map_err(kvm_err(i, "set LAPIC"))?;
        self.set_msrs(&state.msrs)?;
        fd.set_vcpu_events(&state.events)
            .map_err(kvm_err(i, "set events"))?;
        Ok(())
    }

    fn get_xsave(&self) -> Result<Vec<u32>, VcpuError> {
        let i = self.index;
        let base = std::mem::size_of::<kvm_bindings::kvm_xsave>();
        if self.xsave_size <= base {
            let x = self.fd.get_xsave().map_err(kvm_err(i, "get XSAVE"))?;
            return Ok(x.region.to_vec());
        }
        let extra = (self.xsave_size - base).div_ceil(4);
        let mut x = Xsave::new(extra).map_err(|e| VcpuError::Other {
            index: i,
            message: format!("XSAVE buffer: {e:?}"),
        })?;
        // SAFETY: the buffer was sized from KVM_CAP_XSAVE2.
        unsafe { self.fd.get_xsave2(&mut x) }.map_err(kvm_err(i, "get XSAVE2"))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        Ok(words)
    }

    fn set_xsave(&self, words: &[u32]) -> Result<(), VcpuError> {
        let i = self.index;
        let base_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
        let expected = self.xsave_size.max(base_words * 4).div_ceil(4);
        if words.len() != expected {
            return Err(VcpuError::Other {
                index: i,
                message: format!(
                    "XSAVE area of {} bytes, this host uses {}",
                    words.len() * 4,
                    expected * 4
                ),
            });
        }
        let mut x = Xsave::new(words.len() - base_words).map_err(|e| VcpuError::Other {
            index: i,
            message: format!("XSAVE buffer: {e:?}"),
        })?;
        // SAFETY: header and FAM are filled from a buffer of exactly their combined size.
        unsafe {
            x.as_mut_fam_struct()
                .xsave
                .region
                .copy_from_slice(&words[..base_words]);
            x.as_mut_slice().copy_from_slice(&words[base_words..]);
            self.fd.set_xsave2(&x)
        }
        .map_err(kvm_err(i, "set XSAVE"))
    }

    fn get_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let i = self.index;
        let entries: Vec<kvm_msr_entry> = self.msr_indices.iter().map(|&m| msr(m, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Other {
            index: i,
            message: format!("MSR table: {e:?}"),
        })?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(i, "get MSRs"))?;
        if read != entries.len() {
            return Err(VcpuError::Other {
                index: i,
                message: format!("KVM read {read} of {} MSRs", entries.len()),
            });
        }
        Ok(msrs.as_slice().to_vec())
    }

    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let i = self.index;
        let msrs = Msrs::from_entries(entries).map_err(|e| VcpuError::Other {
            index: i,
            message: format!("MSR table: {e:?}"),
        })?;
        let written = self.fd.set_msrs(&msrs).map_err(kvm_err(i, "set MSRs"))?;
        if written != entries.len() {
            let failed = entries.get(written).map(|e| e.index).unwrap_or(0);
            return Err(VcpuError::Other {
                index: i,
                message: format!("KVM refused MSR {failed:#x}"),
            });
        }
        Ok(())
    }

    /// Starts the run loop on a new thread.
    pub fn spawn(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: GuestEventSender,
        start_paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let index = self.index;
        let (tx, rx) = mpsc::channel();
        let tid = Arc::new(AtomicI32::new(0));
        let longest_hold_us = Arc::new(AtomicU64::new(0));
        let mut runner = VcpuRunner {
            vcpu: self,
            pio,
            mmio,
            events,
            rx,
            paused: start_paused,
            stopped: false,
            throttled_until: None,
            held_since: None,
            longest_hold_us: longest_hold_us.clone(),
            tid: tid.clone(),
            kvm_run: 0,
        };
        runner.kvm_run = runner.vcpu.fd.get_kvm_run() as *mut kvm_run as usize;
        let run_page = RunPage::map(&runner.vcpu.fd).map_err(|e| VcpuError::Other {
            index,
            message: format!("cannot map kvm_run for kicks: {e}"),
        })?;
        let thread =
            tern_sandbox::thread::spawn(ThreadKind::Vcpu, format!("vcpu{index}"), move || {
                runner.run()
            })
            .map_err(|e| VcpuError::Other {
                index,
                message: format!("cannot start thread: {e}"),
            })?;
        let kick = Arc::new(Kick {
            run_page,
            thread: Mutex::new(Some(std::os::unix::thread::JoinHandleExt::as_pthread_t(
                &thread,
            ))),
        });
        Ok(VcpuHandle {
            index,
            tx,
            kick,
            thread: Some(thread),
            tid,
            longest_hold_us,
        })
    }
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// MSRs worth saving: those KVM lists and can actually read on this host, TSC first and the
/// TSC deadline last so that a restore sets the deadline relative to the restored TSC.
pub fn saveable_msrs(kvm: &kvm_ioctls::Kvm, probe: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    let mut readable: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[msr(index, 0)]) else {
                return false;
            };
            matches!(probe.get_msrs(&mut one), Ok(1))
        })
        .collect();
    readable.sort_by_key(|&m| match m {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    readable
}

/// Requests to a running vCPU thread.
enum Command {
    Pause(Sender<()>),
    Resume,
    Capture(Sender<Result<VcpuState, VcpuError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VcpuError>>),
    /// Stay out of the guest for this long (auto-converge slows a guest that dirties memory
    /// faster than a migration can send it); any other command ends the sleep early.
    Throttle(Duration),
    Exit,
}

/// The vCPU's `kvm_run` page, mapped once more for the kicker alone. The mapping holds its own
/// reference to the vCPU's file (and so to the VM, whose vCPUs and their run pages live until
/// the last reference goes), so it stays valid whatever the vCPU thread does: the thread's
/// `VcpuFd` unmaps the thread's mapping when the thread ends, this one is unmapped when the
/// last [`Kick`] is dropped.
struct RunPage {
    run: NonNull<kvm_run>,
}

// SAFETY: the page is only written through `set_immediate_exit`, one volatile byte store
// (atomic on x86), from any thread; KVM and the vCPU thread read and write the same byte
// through their own mappings, which is what `immediate_exit` is made for.
unsafe impl Send for RunPage {}
// SAFETY: as above: `&RunPage` only allows that byte store.
unsafe impl Sync for RunPage {}

impl RunPage {
    /// Maps the first page of `fd`'s mmap area: `struct kvm_run`.
    fn map(fd: &VcpuFd) -> std::io::Result<RunPage> {
        const _: () = assert!(std::mem::size_of::<kvm_run>() <= 4096);
        // SAFETY: a new shared mapping of one page of the vCPU file at offset 0 (the kvm_run
        // page); it overlaps nothing of ours, and `Drop` unmaps exactly it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RUN_PAGE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let run = NonNull::new(addr.cast::<kvm_run>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(RunPage { run })
    }

    fn set_immediate_exit(&self) {
        // SAFETY: `run` points at this mapping of the kvm_run page, mapped until `self` is
        // dropped; a byte store to `immediate_exit` is what KVM expects from other threads.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*self.run.as_ptr()).immediate_exit),
                1,
            )
        };
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page `map` mapped; no reference into it outlives `self`.
        unsafe { libc::munmap(self.run.as_ptr().cast(), RUN_PAGE_BYTES) };
    }
}

const RUN_PAGE_BYTES: usize = 4096;

/// Forces a vCPU out of `KVM_RUN`. Shared by the vCPU's handle and the throttle thread; owns
/// everything it touches, so a kick is harmless at any time, also after the thread ended.
struct Kick {
    run_page: RunPage,
    /// The vCPU thread, while it may be signalled: cleared (under this lock) before the
    /// thread is joined, so that no signal goes to a thread ID that is no longer valid.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl Kick {
    fn kick(&self) {
        self.run_page.set_immediate_exit();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: `thread` has not been joined (`retire` clears it first, under the same
            // lock), so the ID is valid even if the thread has returned.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// No more signals: the thread is about to be joined.
    fn retire(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// The machine's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u32,
    tx: Sender<Command>,
    kick: Arc<Kick>,
    thread: Option<JoinHandle<()>>,
    tid: Arc<AtomicI32>,
    /// The longest the vCPU was kept out of the guest by throttling, microseconds, since
    /// [`VcpuHandle::take_longest_hold`] last read it.
    longest_hold_us: Arc<AtomicU64>,
}

impl VcpuHandle {
    /// vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn send(&self, cmd: Command) -> Result<(), VcpuError> {
        self.tx.send(cmd).map_err(|_| VcpuError::Gone(self.index))?;
        self.kick.kick();
        Ok(())
    }

    /// Asks the vCPU to stop; wait for it with the returned receiver.
    pub fn request_pause(&self) -> Result<Receiver<()>, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Pause(tx))?;
        Ok(rx)
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(Command::Resume)
    }

    /// Captures the state of a paused vCPU.
    pub fn capture(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Capture(tx))?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index))?
    }

    /// Restores the state of a paused vCPU.
    pub fn restore(&self, state: VcpuState) -> Result<(), VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restore(Box::new(state), tx))?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index))?
    }

    /// Keeps the vCPU out of the guest for `pause` (ended early by any other command).
    pub fn throttle(&self, pause: Duration) -> Result<(), VcpuError> {
        self.send(Command::Throttle(pause))
    }

    /// A handle that can only throttle this vCPU, for the machine's throttle thread. It must
    /// not be used after the vCPU is stopped (the machine stops its throttle thread first).
    pub(crate) fn throttle_handle(&self) -> ThrottleHandle {
        ThrottleHandle {
            index: self.index,
            tx: self.tx.clone(),
            kick: self.kick.clone(),
        }
    }

    /// The longest the vCPU was kept out of the guest by throttling since the last call:
    /// from taking the throttle command to entering the guest again.
    pub fn take_longest_hold(&self) -> Duration {
        Duration::from_micros(self.longest_hold_us.swap(0, Ordering::Relaxed))
    }

    /// Host CPU time consumed by this vCPU's thread, in nanoseconds.
    pub fn cpu_time_ns(&self) -> u64 {
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 {
            return 0;
        }
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            self.kick.retire();
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the throttle thread holds of a vCPU: its command queue and its kick (usable at any
/// time, also after the vCPU stopped).
pub(crate) struct ThrottleHandle {
    index: u32,
    tx: Sender<Command>,
    kick: Arc<Kick>,
}

impl ThrottleHandle {
    /// Asks the vCPU to sleep for `pause`.
    pub(crate) fn throttle(&self, pause: Duration) -> Result<(), VcpuError> {
        self.tx
            .send(Command::Throttle(pause))
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.kick.kick();
        Ok(())
    }
}

/// State of the vCPU thread.
struct VcpuRunner {
    vcpu: Vcpu,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: GuestEventSender,
    rx: Receiver<Command>,
    paused: bool,
    /// Set after a fatal exit: the vCPU never runs again.
    stopped: bool,
    /// While set and in the future, the vCPU is throttled: it waits for commands instead of
    /// running.
    throttled_until: Option<Instant>,
    /// When the current throttle hold began (the vCPU is out of the guest since).
    held_since: Option<Instant>,
    longest_hold_us: Arc<AtomicU64>,
    tid: Arc<AtomicI32>,
    /// The vCPU's kvm_run page, read for the element size of string I/O.
    kvm_run: usize,
}

impl VcpuRunner {
    fn run(&mut self) {
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        while self.handle_commands() {
            self.run_once();
        }
    }

    fn set_immediate_exit(&mut self, value: u8) {
        self.vcpu.fd.set_kvm_immediate_exit(value);
    }

    /// Handles queued commands; blocks while paused. Returns false when the thread must end.
    fn handle_commands(&mut self) -> bool {
        // Clear the kick before looking at the queue: a command queued after this point sets
        // it again, so it cannot be missed.
        self.set_immediate_exit(0);
        loop {
            let throttle_left = self
                .throttled_until
                .map(|until| until.saturating_duration_since(Instant::now()))
                .filter(|left| !left.is_zero());
            let cmd = if self.paused || self.stopped {
                match self.rx.recv() {
                    Ok(c) => c,
                    Err(_) => return false,
                }
            } else if let Some(left) = throttle_left {
                match self.rx.recv_timeout(left) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        self.throttled_until = None;
                        self.end_hold();
                        return true;
                    }
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => {
                        self.end_hold();
                        return true;
                    }
                    Err(TryRecvError::Disconnected) => return false,
                }
            };
            match cmd {
                Command::Pause(ack) => {
                    self.complete_pending_io();
                    self.paused = true;
                    // Tell a kvmclock guest it was stopped on purpose (no soft-lockup alarms).
                    let _ = self.vcpu.fd.kvmclock_ctrl();
                    let _ = ack.send(());
                }
                Command::Resume => self.paused = false,
                // A vCPU that has not run since its last hold began (its thread woke late on
                // a busy host) is held on, but never past two holds from that start: holds
                // must not add up to a freeze, and skipping one would let the vCPU run a
                // whole cycle.
                Command::Throttle(pause) => {
                    let now = Instant::now();
                    let since = *self.held_since.get_or_insert(now);
                    self.throttled_until = Some((now + pause).min(since + pause * 2));
                }
                Command::Capture(reply) => {
                    let _ = reply.send(self.vcpu.capture());
                }
                Command::Restore(state, reply) => {
                    let _ = reply.send(self.vcpu.restore(&state));
                }
                Command::Exit => return false,
            }
        }
    }

    /// The vCPU is about to enter the guest: a throttle hold, if any, ends here.
    fn end_hold(&mut self) {
        if let Some(since) = self.held_since.take() {
            let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.longest_hold_us.fetch_max(us, Ordering::Relaxed);
        }
    }

    /// An I/O or MMIO exit is only complete once KVM_RUN is entered again; do that with
    /// immediate_exit set so that captured registers are past the instruction.
    fn complete_pending_io(&mut self) {
        if self.stopped {
            return;
        }
        self.set_immediate_exit(1);
        let _ = self.vcpu.fd.run();
        self.set_immediate_exit(0);
    }

    fn run_once(&mut self) {
        let index = self.vcpu.index;
        let kvm_run = self.kvm_run;
        let fatal = match self.vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    for chunk in data.chunks(io_size(kvm_run)) {
                        self.pio.write(u64::from(port), chunk);
                    }
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    for chunk in data.chunks_mut(io_size(kvm_run)) {
                        self.pio.read(u64::from(port), chunk);
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                VcpuExit::Shutdown => Some("triple fault".to_string()),
                VcpuExit::InternalError => Some(internal_error(self.vcpu.fd.get_kvm_run())),
                VcpuExit::FailEntry(reason, cpu) => {
                    Some(format!("VM entry failed (reason {reason:#x}, cpu {cpu})"))
                }
                VcpuExit::SystemEvent(kind, _) => Some(format!("system event {kind}")),
                // The dirty ring is full: the dirty-limit thread harvests it within 10 ms;
                // KVM lets the vCPU in again once it is reset.
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    std::thread::sleep(Duration::from_micros(200));
                    None
                }
                other => Some(format!("unexpected exit {other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(reason) = fatal {
            let reason = format!("{reason} ({})", self.vcpu.describe());
            log::error!("vcpu{index}: {reason}");
            self.stopped = true;
            self.events
                .send(GuestEvent::Crashed(format!("vCPU {index}: {reason}")));
        }
    }
}

/// Element size of the port I/O that caused the current exit (a string instruction
/// transfers `count` elements of this size in one exit).
fn io_size(kvm_run: usize) -> usize {
    // SAFETY: called only while handling a KVM_EXIT_IO, when `io` is the active member of the
    // vCPU's mapped kvm_run page.
    let size = unsafe { (*(kvm_run as *const kvm_run)).__bindgen_anon_1.io.size };
    usize::from(size).max(1)
}

fn internal_error(run: &kvm_run) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..ndata]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        "KVM internal error (suberror {}, data [{}])",
        internal.suberror,
        data.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(n: u32) -> Vec<kvm_cpuid_entry2> {
        vec![kvm_cpuid_entry2 {
            function: 1,
            eax: n,
            ..Default::default()
        }]
    }

    fn state(index: u32, cpuid: Vec<kvm_cpuid_entry2>) -> VcpuState {
        VcpuState {
            index,
            cpuid,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: vec![0; std::mem::size_of::<kvm_lapic_state>()],
            mp_state: Default::default(),
            events: Default::default(),
            msrs: vec![],
            tsc_khz: None,
        }
    }

    #[test]
    fn states_are_put_in_vcpu_order() {
        let cpuids = [cpuid(0), cpuid(1), cpuid(2)];
        let states = vec![state(2, cpuid(2)), state(0, cpuid(0)), state(1, cpuid(1))];
        let ordered = order_states(states, &cpuids).unwrap();
        let indices: Vec<u32> = ordered.iter().map(|s| s.index).collect();
        assert_eq!(indices, [0, 1, 2]);
    }

    #[test]
    fn states_it_could_not_have_saved_are_refused() {
        let cpuids = [cpuid(0), cpuid(1)];
        let mut short_lapic = state(1, cpuid(1));
        short_lapic.lapic.pop();
        for (states, expected) in [
            (vec![state(0, cpuid(0))], "1 vCPU states for 2"),
            (vec![state(0, cpuid(0)), state(0, cpuid(0))], "two states"),
            (vec![state(0, cpuid(0)), state(2, cpuid(1))], "vCPU 2, of 2"),
            (vec![state(0, cpuid(0)), state(u32::MAX, cpuid(1))], "of 2"),
            (
                vec![state(0, cpuid(0)), state(1, cpuid(0))],
                "another CPUID",
            ),
            (vec![state(0, cpuid(0)), short_lapic], "LAPIC page"),
        ] {
            match order_states(states, &cpuids) {
                Err(e) => assert!(e.contains(expected), "{e}"),
                Ok(_) => panic!("accepted, expected {expected}"),
            }
        }
    }

    /// Kicks race with the vCPU thread's end and go on after it: pauses and throttles are
    /// requested while the thread exits, and every kick writes to a page the kicker owns, so
    /// none touches unmapped memory (with the old kick, which wrote through the thread's own
    /// mapping, these kicks wrote to a page the thread had unmapped, or to whatever was mapped
    /// there next). Runs on real KVM vCPUs. Neither Miri (no KVM ioctls) nor AddressSanitizer
    /// (needs a nightly toolchain; only stable is installed here) can run it, and ASan would
    /// not see a store to an unmapped page anyway: a fault (SIGSEGV) or a silently corrupted
    /// unrelated mapping is what this test can catch, and it loops to make that likely.
    #[test]
    fn kicks_after_the_vcpu_thread_ended_touch_only_the_kickers_page() {
        use vm_memory::{Bytes, GuestAddress};
        let _lock = tern_testguest::KvmLock::acquire();
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        let ram = crate::memory::GuestRam::new_memfd(1).expect("RAM");
        ram.register(&vm).expect("register RAM");
        // Real mode at 0x1000: `hlt; jmp -3`, an idle guest waiting in KVM_RUN.
        ram.memory()
            .write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(0x1000))
            .expect("code");
        vm.create_irq_chip().expect("irqchip");
        let base = cpuid::supported(&kvm).expect("CPUID");
        let (events, _events_rx) = GuestEventSender::channel();
        for round in 0..16u32 {
            let vcpu = Vcpu::new(&vm, round, cpuid::for_vcpu(&base, 0, 1), &[], 0).expect("vCPU");
            let mut sregs = vcpu.fd().get_sregs().expect("sregs");
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.fd().set_sregs(&sregs).expect("sregs");
            let regs = kvm_regs {
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            };
            vcpu.fd().set_regs(&regs).expect("regs");
            let mut handle = vcpu
                .spawn(
                    Arc::new(Bus::new()),
                    Arc::new(Bus::new()),
                    events.clone(),
                    false,
                )
                .expect("spawn");
            // The kick still gets a running vCPU out of KVM_RUN at once.
            let asked = Instant::now();
            handle
                .request_pause()
                .expect("pause")
                .recv_timeout(Duration::from_secs(5))
                .expect("pause acknowledged");
            assert!(asked.elapsed() < Duration::from_secs(1), "slow pause");
            handle.resume().expect("resume");

            // Kickers that keep going while the thread ends and after it is joined.
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let kickers: Vec<_> = (0..2)
                .map(|_| {
                    let throttle = handle.throttle_handle();
                    let done = done.clone();
                    std::thread::spawn(move || {
                        let mut n = 0u64;
                        while !done.load(Ordering::Relaxed) || n < 2_000 {
                            let _ = throttle.throttle(Duration::from_micros(1));
                            throttle.kick.kick();
                            n += 1;
                        }
                    })
                })
                .collect();
            // A pause requested just as the thread is told to end.
            let pause = handle.request_pause();
            handle.stop();
            drop(pause);
            for _ in 0..2_000 {
                handle.kick.kick();
            }
            assert!(
                handle.request_pause().is_err(),
                "a stopped vCPU takes commands"
            );
            drop(handle);
            done.store(true, Ordering::Relaxed);
            for k in kickers {
                k.join().expect("kicker");
            }
        }
    }
}
