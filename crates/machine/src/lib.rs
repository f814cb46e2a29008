//! The tern machine: a KVM virtual machine with its RAM, vCPUs, interrupt controllers and
//! devices, booted from a kernel image.
//!
//! A [`Machine`] is built stopped ([`Machine::new`]), then [`Machine::start`]ed; while running
//! it can be paused and resumed, and reports what the guest did through [`Machine::next_event`].

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod dirty_limit;
pub mod dirty_log;
pub mod dirty_ring;
pub mod layout;
pub mod memory;
pub mod state;
pub mod throttle;
pub mod uffd;
pub mod vcpu;
pub mod vm_state;

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_cpuid_entry2, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use tern_devices::acpi_pm::{AcpiPm, Pm1Block, Pm1Port};
use tern_devices::bus::lock;
use tern_devices::i8042::I8042;
use tern_devices::irq::IrqLine;
use tern_devices::pvpanic::PvPanic;
use tern_devices::serial::{ConsoleOut, SerialDevice};
use tern_devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use tern_devices::virtio::VirtioDevice;
use tern_devices::{Bus, GuestEvent, GuestEventSender, Pausable, Snapshottable};

pub use memory::GuestRam;
pub use state::{DeviceState, MachineState, StateRecords};
pub use vcpu::{VcpuHandle, VcpuState};
pub use vm_state::VmState;

use layout::*;

/// Errors while building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability tern needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs requested; this host supports 1 to {1}")]
    BadVcpuCount(u32, u32),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("device set-up failed: {0}")]
    Device(String),
    #[error("the machine is not in a state that allows this ({0})")]
    BadState(&'static str),
    /// Saved VM or vCPU state this machine could not have produced.
    #[error("the saved machine state is not acceptable: {0}")]
    SavedState(String),
    #[error("vCPU {0} did not stop within {1:?}")]
    PauseTimeout(u32, Duration),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub mem_mib: u64,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// CPU features (by name, see [`cpuid::hide_features`]) this host does not offer guests.
    pub hidden_cpu_features: Vec<String>,
}

/// Handles on the machine's devices.
pub struct Devices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub pvpanic: Arc<Mutex<PvPanic>>,
    /// virtio devices, in slot order (slot i at `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE`).
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Devices {
    /// Every device with state, for checkpoints (the engine only sees the trait).
    fn stateful(&self) -> Vec<Arc<Mutex<dyn Snapshottable + Send>>> {
        let mut all: Vec<Arc<Mutex<dyn Snapshottable + Send>>> = vec![
            self.serial.clone(),
            self.acpi_pm.clone(),
            self.i8042.clone(),
            self.pvpanic.clone(),
        ];
        all.extend(
            self.virtio
                .iter()
                .map(|v| v.clone() as Arc<Mutex<dyn Snapshottable + Send>>),
        );
        all
    }

    fn pause_all(&self) {
        for v in &self.virtio {
            lock(v).pause();
        }
    }

    fn resume_all(&self) {
        for v in &self.virtio {
            lock(v).resume();
        }
    }
}

enum Vcpus {
    Created(Vec<vcpu::Vcpu>),
    Running(Vec<VcpuHandle>),
}

/// A KVM virtual machine.
pub struct Machine {
    // Field order is drop order: vCPU threads stop before the VM and its RAM go away.
    vcpus: Vcpus,
    devices: Devices,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: GuestEventSender,
    events_rx: Option<Receiver<GuestEvent>>,
    cpuid: Vec<kvm_cpuid_entry2>,
    /// The CPUID each vCPU was created with.
    vcpu_cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    paused: bool,
    /// Present while auto-converge slows the vCPUs down; dropped before the vCPUs stop.
    throttler: Option<throttle::Throttler>,
    /// With the dirty ring: harvests it while the dirty log is on, and limits each vCPU's
    /// dirty rate when throttled (instead of `throttler`).
    limiter: Option<throttle::Throttler>,
    /// Every vCPU's dirty ring, if this KVM has them (then there is no dirty bitmap).
    rings: Option<Arc<dirty_ring::DirtyRings>>,
    vm: VmFd,
    ram: GuestRam,
    _kvm: Kvm,
}

/// How long a vCPU may take to leave KVM_RUN when asked to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Machine {
    /// Builds a machine with `virtio` devices and loads its kernel; no vCPU runs yet.
    pub fn new(
        config: &MachineConfig,
        console: ConsoleOut,
        virtio: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, MachineError> {
        let kvm = open_kvm()?;
        check_vcpu_count(&kvm, config.vcpus)?;
        let mut base = cpuid::supported(&kvm).map_err(kvm_err("get supported CPUID"))?;
        cpuid::hide_features(&mut base, &config.hidden_cpu_features)
            .map_err(MachineError::Device)?;
        let cpuids = (0..config.vcpus)
            .map(|i| cpuid::for_vcpu(&base, i, config.vcpus))
            .collect();
        let machine = Machine::build(kvm, config.mem_mib, cpuids, console, virtio)?;
        let rsdp = machine.write_acpi_tables(config.vcpus)?;
        let spec = boot::BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
            rsdp: Some(rsdp),
        };
        let entry = boot::load(machine.ram.memory(), machine.ram.size(), &spec)?;
        if let Vcpus::Created(vcpus) = &machine.vcpus {
            boot::setup_boot_vcpu(vcpus[0].fd(), machine.ram.memory(), entry)?;
        }
        Ok(machine)
    }

    /// Builds a machine to restore a checkpoint into: zeroed RAM of `mem_mib`, and one vCPU per
    /// entry of `cpuids`, each with exactly that CPUID (the one the guest was started with).
    pub fn new_blank(
        mem_mib: u64,
        cpuids: Vec<Vec<kvm_cpuid_entry2>>,
        console: ConsoleOut,
        virtio: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, MachineError> {
        let kvm = open_kvm()?;
        check_vcpu_count(&kvm, cpuids.len() as u32)?;
        Machine::build(kvm, mem_mib, cpuids, console, virtio)
    }

    fn build(
        kvm: Kvm,
        mem_mib: u64,
        cpuids: Vec<Vec<kvm_cpuid_entry2>>,
        console: ConsoleOut,
        virtio: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, MachineError> {
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        // RAM before the irqchip: with an in-kernel irqchip present, the VM's first memory
        // slot costs several milliseconds on some hosts (7 ms here), without it well under one.
        let mut ram = GuestRam::new_memfd(mem_mib)?;
        // The dirty ring if this KVM has one (it tells which vCPU dirties what); else the
        // bitmap with manual protection. The two do not mix.
        let ring = dirty_ring::enable(&vm);
        if ring {
            let kvm_slots = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_NR_MEMSLOTS));
            ram.split_log_slices(u64::try_from(kvm_slots).unwrap_or(0));
        } else {
            ram.set_manual_protect(dirty_log::enable_manual_protect(&vm));
        }
        ram.register(&vm)?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;

        let (events, events_rx) = GuestEventSender::channel();
        let (devices, pio, mmio) = build_devices(&vm, &ram, console, &events, virtio)?;
        let cpuid = cpuid::supported(&kvm).map_err(kvm_err("get supported CPUID"))?;
        let vcpu_cpuids = cpuids.clone();
        let vcpus = create_vcpus(&kvm, &vm, cpuids)?;
        let rings = if ring {
            let fds: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().map(|v| v.fd()).collect();
            let slot_pages: Vec<u64> = ram.slots().iter().map(|s| s.pages()).collect();
            let slices = ram.log_slices().to_vec();
            let rings = dirty_ring::DirtyRings::new(&vm, &fds, &slot_pages, slices)
                .map_err(|e| MachineError::Device(format!("cannot map the dirty rings: {e}")))?;
            Some(Arc::new(rings))
        } else {
            None
        };
        Ok(Machine {
            vcpus: Vcpus::Created(vcpus),
            devices,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            events,
            events_rx: Some(events_rx),
            cpuid,
            vcpu_cpuids,
            paused: false,
            throttler: None,
            limiter: None,
            rings,
            vm,
            ram,
            _kvm: kvm,
        })
    }

    /// Writes the ACPI tables describing this machine into guest memory; returns the RSDP.
    fn write_acpi_tables(&self, vcpus: u32) -> Result<u64, MachineError> {
        let slots: Vec<acpi::VirtioSlot> = (0..self.devices.virtio.len() as u64)
            .map(|i| acpi::VirtioSlot {
                base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_GSI_BASE + i as u32,
            })
            .collect();
        let tables = acpi::build(vcpus, &slots);
        tables
            .write(self.ram.memory())
            .map_err(|e| MachineError::Device(format!("cannot write ACPI tables: {e}")))?;
        Ok(tables.rsdp)
    }

    /// Starts the vCPU threads (paused if `paused`).
    pub fn start(&mut self, paused: bool) -> Result<(), MachineError> {
        let Vcpus::Created(created) = std::mem::replace(&mut self.vcpus, Vcpus::Running(vec![]))
        else {
            return Err(MachineError::BadState("already started"));
        };
        let mut handles = Vec::with_capacity(created.len());
        for vcpu in created {
            handles.push(vcpu.spawn(
                self.pio.clone(),
                self.mmio.clone(),
                self.events.clone(),
                paused,
            )?);
        }
        self.vcpus = Vcpus::Running(handles);
        self.paused = paused;
        Ok(())
    }

    fn handles(&self) -> Result<&[VcpuHandle], MachineError> {
        match &self.vcpus {
            Vcpus::Running(h) => Ok(h),
            Vcpus::Created(_) => Err(MachineError::BadState("not started")),
        }
    }

    /// Stops every vCPU, then every device; returns once none of them touches guest memory.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        let handles = self.handles()?;
        let acks = handles
            .iter()
            .map(|h| h.request_pause())
            .collect::<Result<Vec<_>, _>>()?;
        for (h, ack) in handles.iter().zip(acks) {
            ack.recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| MachineError::PauseTimeout(h.index(), PAUSE_TIMEOUT))?;
        }
        self.devices.pause_all();
        self.paused = true;
        Ok(())
    }

    /// Lets the devices, then the vCPUs run again.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        self.devices.resume_all();
        for h in self.handles()? {
            h.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    /// Tells devices the machine runs on a new host or from a checkpoint now (a network card
    /// announces its MAC so that switches learn the new location).
    pub fn announce_restored(&self) {
        for v in &self.devices.virtio {
            lock(v).restored();
        }
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Waits up to `timeout` for the next thing the guest did (None once the receiver was
    /// taken with [`Machine::take_events`]).
    pub fn next_event(&self, timeout: Duration) -> Option<GuestEvent> {
        match self.events_rx.as_ref()?.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            // Impossible while `self.events` exists; treat as nothing happened.
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Takes the receiver of guest events, for a caller that waits on it without holding the
    /// machine (which other threads need for pause, console input, ...).
    pub fn take_events(&mut self) -> Option<Receiver<GuestEvent>> {
        self.events_rx.take()
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) {
        lock(&self.devices.acpi_pm).press_power_button();
    }

    /// Queues console input; returns how many bytes the UART accepted.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        lock(&self.devices.serial).enqueue_input(bytes)
    }

    /// Host CPU time used by all vCPUs, in nanoseconds.
    pub fn cpu_time_ns(&self) -> u64 {
        self.handles()
            .map(|h| h.iter().map(|v| v.cpu_time_ns()).sum())
            .unwrap_or(0)
    }

    /// Slows the vCPUs down so they run `100 - percent` percent of the time (0: full speed).
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), MachineError> {
        if let Some(limiter) = &self.limiter {
            limiter.set(percent);
            return Ok(());
        }
        if percent == 0 {
            self.throttler = None;
            return Ok(());
        }
        if let Some(t) = &self.throttler {
            t.set(percent);
            return Ok(());
        }
        let handles = self
            .handles()?
            .iter()
            .map(|h| h.throttle_handle())
            .collect();
        let throttler = throttle::Throttler::start(handles, percent)
            .map_err(|e| MachineError::Device(format!("cannot start the throttle thread: {e}")))?;
        self.throttler = Some(throttler);
        Ok(())
    }

    /// The longest any vCPU was kept out of the guest by throttling since the last call.
    pub fn take_longest_throttle_hold(&self) -> Duration {
        self.handles()
            .map(|hs| {
                hs.iter()
                    .map(|h| h.take_longest_hold())
                    .max()
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Starts tracking which guest pages change: KVM's dirty log (for writes by the vCPUs)
    /// and the RAM's own bitmap (for writes by devices), both cleared. Every page counts as
    /// written until re-armed: with the bitmap, KVM's `KVM_DIRTY_LOG_INITIALLY_SET`; with the
    /// dirty ring, a slice logs only from its first re-arming on (only slices that hold no
    /// data log at once, which costs nothing: nothing there is mapped to protect).
    pub fn start_dirty_log(&mut self) -> Result<(), MachineError> {
        for slot in self.ram.slots() {
            self.ram.take_device_dirty(slot);
        }
        let Some(rings) = self.rings.clone() else {
            return Ok(self.ram.set_dirty_logging(&self.vm, true)?);
        };
        rings.clear().map_err(ring_err)?;
        // Looked at whole once here, before the first pass, in its holes only after.
        self.ram.forget_data();
        for index in 0..self.ram.log_slices().len() {
            if self.ram.slice_data_pages(index)?.is_empty() {
                self.start_slice_log(&rings, index)?;
            }
        }
        if self.limiter.is_none() {
            let handles = self
                .handles()?
                .iter()
                .map(|h| h.throttle_handle())
                .collect();
            let limiter = dirty_limit::start(rings, handles)
                .map_err(|e| MachineError::Device(format!("cannot start dirty-limit: {e}")))?;
            self.limiter = Some(limiter);
        }
        Ok(())
    }

    /// Switches KVM's log on for log slice `index` (write-protecting it), then marks the
    /// pages that hold data as written: a write before the switch is in the data, one after
    /// it in the ring.
    fn start_slice_log(
        &self,
        rings: &dirty_ring::DirtyRings,
        index: usize,
    ) -> Result<(), MachineError> {
        self.ram.set_slice_dirty_logging(&self.vm, index, true)?;
        rings.start_logging(index, &self.ram.slice_data_pages(index)?);
        Ok(())
    }

    /// Stops KVM's dirty log (and the dirty limit, which needs it).
    pub fn stop_dirty_log(&mut self) -> Result<(), MachineError> {
        self.limiter = None;
        self.ram.set_dirty_logging(&self.vm, false)?;
        if let Some(rings) = &self.rings {
            rings.clear().map_err(ring_err)?;
        }
        Ok(())
    }

    /// Whether auto-converge limits each vCPU's dirty rate (the dirty ring) rather than
    /// slicing every vCPU's time.
    pub fn limits_dirty_rate(&self) -> bool {
        self.rings.is_some()
    }

    /// The pages written since tracking started or since they were last re-armed (by vCPUs),
    /// or since the last call (by devices): one bitmap per RAM slot (in [`GuestRam::slots`]
    /// order, bit i = page i of the slot). Whoever reads the pages re-arms them first with
    /// [`Machine::rearm_dirty`]; without manual protection this call already did.
    pub fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, MachineError> {
        let mut bitmaps = match &self.rings {
            Some(rings) => self.ring_dirty_pages(rings)?,
            None => self
                .ram
                .slots()
                .iter()
                .map(|slot| self.ram.dirty_bitmap(&self.vm, slot))
                .collect::<Result<Vec<_>, _>>()?,
        };
        for (bits, slot) in bitmaps.iter_mut().zip(self.ram.slots()) {
            for (b, d) in bits.iter_mut().zip(self.ram.take_device_dirty(slot)) {
                *b |= d;
            }
        }
        Ok(bitmaps)
    }

    /// The dirty ring's pages, and every page holding data in a slice that does not log yet
    /// (written at some time, maybe since the log started).
    fn ring_dirty_pages(
        &self,
        rings: &dirty_ring::DirtyRings,
    ) -> Result<Vec<Vec<u64>>, MachineError> {
        let mut bitmaps = rings.take().map_err(ring_err)?;
        for index in rings.unlogged_slices() {
            let Some(slice) = self.ram.log_slices().get(index) else {
                continue;
            };
            if let Some(bitmap) = bitmaps.get_mut(slice.ram_slot) {
                for pages in self.ram.slice_data_pages(index)? {
                    dirty_ring::set_pages(bitmap, pages);
                }
            }
        }
        Ok(bitmaps)
    }

    /// Re-arms the dirty log for the pages `bits` of slot number `slot_index` (in
    /// [`GuestRam::slots`] order) from page `first_page` (a multiple of 64): just before they
    /// are read, so that a write after the read shows in the next [`Machine::dirty_pages`].
    pub fn rearm_dirty(
        &self,
        slot_index: usize,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), MachineError> {
        if let Some(rings) = &self.rings {
            // A slice that holds data among these pages starts logging now, just before the
            // first pass reads it. (Pages without data need nothing: the slice's switch marks
            // whatever was written before it.)
            let end = first_page + bits.len() as u64 * 64;
            for index in rings.unlogged_slices() {
                let Some(slice) = self.ram.log_slices().get(index) else {
                    continue;
                };
                if slice.ram_slot != slot_index
                    || slice.first_page >= end
                    || slice.first_page + slice.pages <= first_page
                {
                    continue;
                }
                let data = self.ram.slice_data_pages(index)?;
                if data.iter().any(|d| any_bit_in(bits, first_page, d.clone())) {
                    self.start_slice_log(rings, index)?;
                }
            }
            return rings.rearm(slot_index, first_page, bits).map_err(ring_err);
        }
        let slot = self
            .ram
            .slots()
            .get(slot_index)
            .ok_or(MachineError::BadState("no such memory slot"))?;
        Ok(self.ram.rearm_dirty(&self.vm, slot, first_page, bits)?)
    }

    /// Stops and joins every vCPU thread. The machine cannot run again afterwards.
    pub fn shut_down(&mut self) {
        self.throttler = None;
        self.limiter = None;
        if let Vcpus::Running(handles) = &mut self.vcpus {
            for h in handles.iter_mut() {
                h.stop();
            }
        }
    }

    /// The KVM VM handle (dirty logging, interrupt controller state).
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM as plain bytes, while the machine is paused (None otherwise). The view
    /// borrows the machine, so the machine stays paused for as long as it is used.
    pub fn paused_ram(&self) -> Option<memory::PausedRam<'_>> {
        self.paused.then(|| memory::PausedRam::new(&self.ram))
    }

    /// The devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// CPUID entries KVM supports on this host (before per-vCPU patching).
    pub fn host_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// The CPUID of each vCPU, in index order (what the guest was started with).
    pub fn vcpu_cpuids(&self) -> &[Vec<kvm_cpuid_entry2>] {
        &self.vcpu_cpuids
    }

    /// Captures every vCPU; the machine must be paused.
    pub fn capture_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        if !self.paused {
            return Err(MachineError::BadState(
                "vCPU state can only be captured while paused",
            ));
        }
        Ok(self
            .handles()?
            .iter()
            .map(|h| h.capture())
            .collect::<Result<Vec<_>, _>>()?)
    }
}

impl Machine {
    /// Captures the VM-wide state (interrupt controllers, PIT, clock); the machine must be
    /// paused.
    pub(crate) fn capture_vm_state(&self) -> Result<VmState, MachineError> {
        if !self.paused {
            return Err(MachineError::BadState(
                "VM state can only be captured while paused",
            ));
        }
        vm_state::capture(&self.vm, self.ram.size(), self.handles()?.len() as u32)
    }

    /// Restores interrupt controllers, PIT and clock; the machine must be paused.
    pub(crate) fn restore_vm_state(&self, state: &VmState) -> Result<(), MachineError> {
        if !self.paused {
            return Err(MachineError::BadState(
                "VM state can only be restored while paused",
            ));
        }
        if state.memory_bytes != self.ram.size() || state.vcpus as usize != self.handles()?.len() {
            return Err(MachineError::BadState(
                "the saved machine has a different shape",
            ));
        }
        vm_state::restore_devices(&self.vm, state)?;
        vm_state::restore_clock(&self.vm, state.clock_ns)
    }

    /// Captures every device's state.
    pub(crate) fn capture_devices(&self) -> Result<Vec<DeviceState>, MachineError> {
        self.devices
            .stateful()
            .iter()
            .map(|d| {
                let d = lock(d);
                let bytes = d
                    .snapshot()
                    .map_err(|e| MachineError::Device(e.to_string()))?;
                Ok(DeviceState {
                    id: d.snapshot_id(),
                    bytes,
                })
            })
            .collect()
    }

    /// Restores device states captured by [`Machine::capture_devices`]. A state for a device
    /// this machine does not have is an error; a device without saved state keeps its reset
    /// state.
    pub(crate) fn restore_devices(
        &self,
        states: &[DeviceState],
        encoding: tern_devices::state::StateEncoding,
    ) -> Result<(), MachineError> {
        let devices = self.devices.stateful();
        for DeviceState { id, bytes } in states {
            let device = devices
                .iter()
                .find(|d| lock(d).snapshot_id() == *id)
                .ok_or_else(|| {
                    MachineError::Device(format!("no device '{id}' to restore state into"))
                })?;
            lock(device)
                .restore(tern_devices::SavedState::new(encoding, bytes))
                .map_err(|e| MachineError::Device(e.to_string()))?;
        }
        Ok(())
    }

    /// Restores every vCPU from captured states (one per vCPU, each put back into the vCPU its
    /// `index` names; see [`vcpu::order_states`] for what is refused); the machine must be
    /// paused.
    pub fn restore_vcpus(&self, states: Vec<VcpuState>) -> Result<(), MachineError> {
        if !self.paused {
            return Err(MachineError::BadState(
                "vCPU state can only be restored while paused",
            ));
        }
        let handles = self.handles()?;
        let states =
            vcpu::order_states(states, &self.vcpu_cpuids).map_err(MachineError::SavedState)?;
        if states.len() != handles.len() {
            return Err(MachineError::BadState(
                "vCPU count differs from the saved state",
            ));
        }
        for (h, state) in handles.iter().zip(states) {
            h.restore(state)?;
        }
        Ok(())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn open_kvm() -> Result<Kvm, MachineError> {
    let kvm = Kvm::new().map_err(MachineError::NoKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::UserMemory, "user memory"),
        (Cap::ImmediateExit, "immediate exit"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "PIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(MachineError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

fn check_vcpu_count(kvm: &Kvm, vcpus: u32) -> Result<(), MachineError> {
    let max = (kvm.get_max_vcpus() as u32).min(255);
    if vcpus == 0 || vcpus > max {
        return Err(MachineError::BadVcpuCount(vcpus, max));
    }
    Ok(())
}

/// Whether any of the pages `pages` is set in `bits` (bit i: page `first_page + i`).
fn any_bit_in(bits: &[u64], first_page: u64, pages: std::ops::Range<u64>) -> bool {
    let end = pages.end.min(first_page + bits.len() as u64 * 64);
    (pages.start.max(first_page)..end).any(|page| {
        let i = page - first_page;
        bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    })
}

fn ring_err(e: std::io::Error) -> MachineError {
    MachineError::Device(format!("dirty ring: {e}"))
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cpuids: Vec<Vec<kvm_cpuid_entry2>>,
) -> Result<Vec<vcpu::Vcpu>, MachineError> {
    let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    let mut vcpus: Vec<vcpu::Vcpu> = Vec::with_capacity(cpuids.len());
    let mut msrs: Vec<u32> = Vec::new();
    for (index, cpuid) in cpuids.into_iter().enumerate() {
        let index = index as u32;
        let vcpu = vcpu::Vcpu::new(vm, index, cpuid, &msrs, xsave_size)?;
        if index == 0 {
            msrs = vcpu::saveable_msrs(kvm, vcpu.fd());
        }
        vcpus.push(vcpu);
    }
    if let Some(first) = vcpus.first_mut() {
        first.set_msr_indices(&msrs);
    }
    Ok(vcpus)
}

fn build_devices(
    vm: &VmFd,
    ram: &GuestRam,
    console: ConsoleOut,
    events: &GuestEventSender,
    virtio: Vec<Box<dyn VirtioDevice>>,
) -> Result<(Devices, Bus, Bus), MachineError> {
    let dev_err = |e: std::io::Error| MachineError::Device(e.to_string());
    let irq = |gsi: u32| -> Result<IrqLine, MachineError> {
        let line = IrqLine::new(gsi).map_err(dev_err)?;
        vm.register_irqfd(line.eventfd(), gsi)
            .map_err(kvm_err("register irqfd"))?;
        Ok(line)
    };
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq(SERIAL_GSI)?, console)));
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(irq(ACPI_SCI_GSI)?, events.clone())));
    let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
    let pvpanic = Arc::new(Mutex::new(PvPanic::new(events.clone())));

    let mut pio = Bus::new();
    let bus_err = |e: tern_devices::BusError| MachineError::Device(e.to_string());
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
        .map_err(bus_err)?;
    pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)
        .map_err(bus_err)?;
    for (block, port, len) in [
        (Pm1Block::Event, ACPI_PM1A_EVT_PORT, 4),
        (Pm1Block::Control, ACPI_PM1A_CNT_PORT, 2),
    ] {
        let port_dev = Arc::new(Mutex::new(Pm1Port {
            pm: acpi_pm.clone(),
            block,
        }));
        pio.insert(port_dev, u64::from(port), len)
            .map_err(bus_err)?;
    }
    pio.insert(pvpanic.clone(), u64::from(PVPANIC_PORT), 1)
        .map_err(bus_err)?;
    let mut mmio = Bus::new();
    if virtio.len() > VIRTIO_MAX_DEVICES as usize {
        return Err(MachineError::Device(format!(
            "{} virtio devices; at most {VIRTIO_MAX_DEVICES} are supported",
            virtio.len()
        )));
    }
    let mut transports = Vec::new();
    for (slot, device) in virtio.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_SIZE;
        let transport = MmioTransport::new(
            device,
            ram.memory().clone(),
            irq(VIRTIO_GSI_BASE + slot as u32)?,
        )
        .map_err(dev_err)?;
        // Queue notifications go straight to the device's worker, without a userspace exit.
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                event,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(kvm_err("register ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)
            .map_err(bus_err)?;
        transports.push(transport);
    }
    Ok((
        Devices {
            serial,
            acpi_pm,
            i8042,
            pvpanic,
            virtio: transports,
        },
        pio,
        mmio,
    ))
}

/// The CPUID KVM supports on this host (what a guest started here may use).
pub fn host_cpuid() -> Result<Vec<kvm_cpuid_entry2>, MachineError> {
    let kvm = open_kvm()?;
    cpuid::supported(&kvm).map_err(kvm_err("get supported CPUID"))
}

/// The CPU features this host offers guests, as [`cpuid::feature_words`]: what KVM supports
/// minus the features the host hides.
pub fn offered_features(hidden: &[String]) -> Result<Vec<(u32, u32, [u32; 4])>, MachineError> {
    let mut entries = host_cpuid()?;
    cpuid::hide_features(&mut entries, hidden).map_err(MachineError::Device)?;
    Ok(cpuid::feature_words(&entries))
}

/// A console sink that discards output (tests, benchmarks).
pub fn null_console() -> ConsoleOut {
    Box::new(std::io::sink()) as Box<dyn Write + Send>
}
