//! Guest RAM: one memfd, mapped shared, split into KVM memory slots around the MMIO hole.
//!
//! Backing guest RAM by a memfd (rather than anonymous memory) lets a checkpoint be written
//! straight from the file, lets holes (never-touched pages) be found with `SEEK_DATA`, and lets a
//! restored guest map a checkpoint file in place of the memfd.

use std::fs::File;
use std::ops::Range;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use std::num::NonZeroUsize;

use tern_devices::GuestMem;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::layout::{ram_ranges, PAGE_SIZE};

/// Errors of guest RAM set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} MiB is not supported (1 MiB .. 1 TiB)")]
    BadSize(u64),
    #[error("cannot create the guest memory file: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot assemble guest memory: {0}")]
    Assemble(String),
    #[error("KVM refused memory slot {slot}: {source}")]
    Slot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot drop guest pages {gpa:#x}+{len:#x}: {source}")]
    Discard {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the dirty log of slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot find which guest pages hold data: {0}")]
    Extents(#[source] std::io::Error),
    #[error("cannot re-arm the dirty log of slot {slot}: {source}")]
    Rearm {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The mapping of one slot of guest RAM (vm-memory: bounds-checked `VolatileSlice`s of it,
/// its dirty bitmap). Whoever holds an `Arc` of it keeps the mapping alive.
pub type GuestRegion = GuestRegionMmap<AtomicBitmap>;

/// One KVM memory slot: a contiguous guest-physical range backed by part of the RAM file.
#[derive(Clone, Debug)]
pub struct RamSlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub size: u64,
    /// Offset of this range inside the backing file.
    pub file_offset: u64,
    /// The mapping that holds this slot's pages: the only way to reach them (no raw host
    /// addresses leave this module, except to KVM and userfaultfd).
    pub mapping: Arc<GuestRegion>,
}

impl RamSlot {
    /// Number of guest pages in this slot.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// A part of a RAM slot registered with KVM as a memory slot of its own, so that its dirty
/// logging can be switched on apart from the rest. Without the dirty ring every RAM slot is one
/// slice; with it, RAM is cut into many (see [`GuestRam::split_log_slices`]): switching the
/// ring's log on write-protects the whole KVM slot at once, and a slice at a time lets the
/// first pre-copy pass protect pages only as it reaches them.
#[derive(Clone, Debug)]
pub struct LogSlice {
    /// KVM slot number: also this slice's index in [`GuestRam::log_slices`].
    pub kvm_slot: u32,
    /// Index of the RAM slot it is part of, in [`GuestRam::slots`].
    pub ram_slot: usize,
    /// Its first page, counted from the RAM slot's first page.
    pub first_page: u64,
    /// Its length in pages.
    pub pages: u64,
}

/// Smallest log slice: a first pass at 1 Gbit/s crosses one in about 0.15 s.
const LOG_SLICE_MIN_BYTES: u64 = 16 << 20;
/// Most log slices per machine (KVM allows thousands of slots; each costs a little memory and
/// a slot change is a synchronisation of every vCPU).
const LOG_SLICES_MAX: u64 = 512;

/// How the guest's RAM is backed on the host.
pub enum RamBacking {
    /// A fresh memfd, shared mapping: the normal case for a booted guest.
    Memfd(File),
}

/// The guest's RAM.
pub struct GuestRam {
    memory: GuestMem,
    slots: Vec<RamSlot>,
    /// The KVM memory slots, one or more per RAM slot.
    log_slices: Vec<LogSlice>,
    /// Per slice, its pages known to hold data (see [`GuestRam::slice_data_pages`]).
    data_known: std::sync::Mutex<Vec<Option<Vec<Range<u64>>>>>,
    backing: RamBacking,
    size: u64,
    /// KVM's manual dirty-log protection is on (see [`crate::dirty_log`]): reading the log
    /// leaves pages writable until [`GuestRam::rearm_dirty`].
    manual_protect: bool,
}

impl GuestRam {
    /// Creates zero-filled RAM of `mib` MiB backed by a new memfd.
    pub fn new_memfd(mib: u64) -> Result<Self, MemoryError> {
        if mib == 0 || mib > (1 << 20) {
            return Err(MemoryError::BadSize(mib));
        }
        let size = mib << 20;
        let file = create_memfd(size).map_err(MemoryError::Memfd)?;
        let (memory, slots) = map_file(&file, size, libc::MAP_SHARED | libc::MAP_NORESERVE)?;
        let log_slices = slice_slots(&slots, u64::MAX);
        Ok(GuestRam {
            memory,
            slots,
            data_known: std::sync::Mutex::new(vec![None; log_slices.len()]),
            log_slices,
            backing: RamBacking::Memfd(file),
            size,
            manual_protect: false,
        })
    }

    /// The vm-memory view used by loaders and devices.
    pub fn memory(&self) -> &GuestMem {
        &self.memory
    }

    /// The KVM slots of this RAM.
    pub fn slots(&self) -> &[RamSlot] {
        &self.slots
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file that backs the RAM.
    pub fn backing_file(&self) -> &File {
        match &self.backing {
            RamBacking::Memfd(f) => f,
        }
    }

    /// The KVM memory slots of this RAM.
    pub fn log_slices(&self) -> &[LogSlice] {
        &self.log_slices
    }

    /// Cuts the RAM into KVM slots of 16 MiB or more (at most `LOG_SLICES_MAX`, and fewer than
    /// `kvm_slots` — what KVM allows), before [`GuestRam::register`]. Only for the dirty
    /// ring: the dirty bitmap is read one RAM slot at a time, as one KVM slot.
    pub fn split_log_slices(&mut self, kvm_slots: u64) {
        let count = LOG_SLICES_MAX.min(kvm_slots.saturating_sub(8)).max(1);
        let slice = self
            .size
            .div_ceil(count)
            .next_multiple_of(LOG_SLICE_MIN_BYTES)
            .max(LOG_SLICE_MIN_BYTES);
        self.log_slices = slice_slots(&self.slots, slice / PAGE_SIZE);
        self.forget_data();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(first) = self.log_slices.iter().find(|s| s.ram_slot == index) {
                slot.slot = first.kvm_slot;
            }
        }
    }

    /// Registers every slice with KVM, without dirty logging.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_dirty_logging(vm, false)
    }

    /// Switches KVM dirty-page logging for every slice on or off.
    pub fn set_dirty_logging(&self, vm: &VmFd, enabled: bool) -> Result<(), MemoryError> {
        for index in 0..self.log_slices.len() {
            self.set_slice_dirty_logging(vm, index, enabled)?;
        }
        Ok(())
    }

    /// Switches dirty-page logging of the slice `index` (of [`GuestRam::log_slices`]).
    pub fn set_slice_dirty_logging(
        &self,
        vm: &VmFd,
        index: usize,
        enabled: bool,
    ) -> Result<(), MemoryError> {
        let bad = || MemoryError::Assemble(format!("no memory slice {index}"));
        let slice = self.log_slices.get(index).ok_or_else(bad)?;
        let slot = self.slots.get(slice.ram_slot).ok_or_else(bad)?;
        set_slot(vm, slot, slice, enabled)
    }

    /// The pages of slice `index` that hold data (were ever written), as page ranges counted
    /// from its RAM slot's first page: the others read as zero.
    ///
    /// Finding where data ends (`SEEK_HOLE`) on a memfd walks every page of it (60 ms for
    /// 512 MiB here), where finding data in a hole is quick: so what is known is kept, and
    /// later calls look only in its holes for pages written since. Guest RAM gains data and
    /// loses it only by [`GuestRam::discard`] (which forgets what is known) or
    /// [`GuestRam::forget_data`].
    pub fn slice_data_pages(&self, index: usize) -> Result<Vec<Range<u64>>, MemoryError> {
        let bad = || MemoryError::Assemble(format!("no memory slice {index}"));
        let slice = self.log_slices.get(index).ok_or_else(bad)?;
        let slot = self.slots.get(slice.ram_slot).ok_or_else(bad)?;
        let mut known = self.data_known.lock().unwrap_or_else(|p| p.into_inner());
        let entry = known.get_mut(index).ok_or_else(bad)?;
        let whole = slice.first_page..slice.first_page + slice.pages;
        let holes = match entry {
            Some(data) => gaps(data, whole),
            None => vec![whole],
        };
        let mut data = entry.take().unwrap_or_default();
        for hole in holes {
            let within =
                slot.file_offset + hole.start * PAGE_SIZE..slot.file_offset + hole.end * PAGE_SIZE;
            let extents = tern_storage::allocated(self.backing_file(), within, PAGE_SIZE)
                .map_err(MemoryError::Extents)?;
            let page = |offset: u64| (offset - slot.file_offset) / PAGE_SIZE;
            data.extend(extents.iter().map(|e| page(e.start)..page(e.end)));
        }
        let data = joined(data);
        *entry = Some(data.clone());
        Ok(data)
    }

    /// Forgets which pages are known to hold data: the next look scans each slice whole.
    pub fn forget_data(&self) {
        let mut known = self.data_known.lock().unwrap_or_else(|p| p.into_inner());
        *known = vec![None; self.log_slices.len()];
    }

    /// Fetches and clears the pages of one slot that devices wrote through [`GuestRam::memory`]
    /// (bit i = page i of the slot): the part of the dirty set KVM's log does not see.
    pub fn take_device_dirty(&self, slot: &RamSlot) -> Vec<u64> {
        use vm_memory::GuestMemoryBackend;
        self.memory
            .find_region(GuestAddress(slot.guest_addr))
            .map(|r| r.bitmap().get_and_reset())
            .unwrap_or_default()
    }

    /// Drops the content of guest-physical `[gpa, gpa + len)` (page-aligned, inside one
    /// slot) from the RAM file: the pages read as zero again, or, while registered with
    /// userfaultfd, fault as missing. KVM's mappings of them go too (its MMU notifier).
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.forget_data();
        discard(self.backing_file(), &self.slots, gpa, len)
    }

    /// Says whether KVM's manual dirty-log protection was turned on for the VM.
    pub fn set_manual_protect(&mut self, on: bool) {
        self.manual_protect = on;
    }

    /// Whether pages stay writable after the log is read, until re-armed.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The dirty bitmap of one slot. With manual protection the bits stay set and the pages
    /// writable until [`GuestRam::rearm_dirty`]; without it, reading clears and protects them.
    pub fn dirty_bitmap(&self, vm: &VmFd, slot: &RamSlot) -> Result<Vec<u64>, MemoryError> {
        vm.get_dirty_log(slot.slot, slot.size as usize)
            .map_err(|source| MemoryError::DirtyLog {
                slot: slot.slot,
                source,
            })
    }

    /// Clears the dirty bits `bits` of `slot` from page `first_page` (a multiple of 64) on
    /// and write-protects those pages, so that their next write is logged. Nothing to do
    /// without manual protection (reading the log did it).
    pub fn rearm_dirty(
        &self,
        vm: &VmFd,
        slot: &RamSlot,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), MemoryError> {
        if !self.manual_protect || bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        crate::dirty_log::clear(vm, slot.slot, slot.size / PAGE_SIZE, first_page, bits).map_err(
            |e| MemoryError::Rearm {
                slot: slot.slot,
                source: e,
            },
        )
    }
}

/// Guest RAM of a paused machine, readable as plain bytes: what a checkpoint writes straight
/// from guest memory to its file (direct I/O, no copy) and checksums. Only
/// [`crate::Machine::paused_ram`] makes one, and it borrows the machine: while it lives the
/// machine cannot be resumed (that takes `&mut Machine`).
pub struct PausedRam<'a> {
    ram: &'a GuestRam,
}

impl<'a> PausedRam<'a> {
    /// Callers guarantee that nothing writes guest RAM while the view lives (see
    /// [`crate::Machine::paused_ram`]).
    pub(crate) fn new(ram: &'a GuestRam) -> Self {
        PausedRam { ram }
    }

    /// The bytes of guest-physical `[gpa, gpa + len)`, if they lie inside one RAM slot.
    pub fn bytes(&self, gpa: u64, len: usize) -> Option<&'a [u8]> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let region = self.ram.memory.find_region(GuestAddress(gpa))?;
        let at = region.to_region_addr(GuestAddress(gpa))?;
        // Bounds: vm-memory checks that `at + len` lies inside the region's mapping.
        let slice = region.get_slice(at, len).ok()?;
        // SAFETY: the one place where guest memory becomes a `&[u8]` (vm-memory only hands
        // out `VolatileSlice`s, and the checkpoint writer needs byte slices to checksum and to
        // write with O_DIRECT without copying 2 GB/s through a bounce buffer). It is sound:
        // * the pointer and `len` come from a bounds-checked `VolatileSlice` of a mapping that
        //   `self.ram` owns, and `'a` borrows that `GuestRam`, so the bytes stay mapped for the
        //   whole lifetime of the returned slice;
        // * nothing writes them meanwhile: a `PausedRam` exists only while the machine is
        //   paused (every vCPU acknowledged the pause, so none is in KVM_RUN, and every device
        //   worker is paused), and it borrows the machine, so `Machine::resume` (`&mut self`)
        //   cannot run before the slice is gone. (A lazy restore still loading pages only
        //   fills pages that were missing, before any read of them returns.)
        Some(unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), len) })
    }
}

/// [`GuestRam::discard`] on RAM file `file` laid out as `slots` (for a thread that does not
/// hold the machine: a clone of the file and of the slots).
pub fn discard(file: &File, slots: &[RamSlot], gpa: u64, len: u64) -> Result<(), MemoryError> {
    let bad = |source| MemoryError::Discard { gpa, len, source };
    let slot = slots
        .iter()
        .find(|s| gpa >= s.guest_addr && gpa.saturating_add(len) <= s.guest_addr + s.size)
        .ok_or_else(|| bad(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(bad(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let offset = slot.file_offset + (gpa - slot.guest_addr);
    // SAFETY: fallocate on a descriptor we own; it changes the file, not our memory layout
    // (the mappings stay, their pages are gone).
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(bad(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The parts of `within` that no range of `data` (sorted, apart) covers.
fn gaps(data: &[Range<u64>], within: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = within.start;
    for r in data {
        if r.start > at {
            out.push(at..r.start.min(within.end));
        }
        at = at.max(r.end);
    }
    if at < within.end {
        out.push(at..within.end);
    }
    out
}

/// `ranges` sorted and joined where they touch.
fn joined(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// RAM slots `slots` cut into log slices of at most `slice_pages` pages each.
fn slice_slots(slots: &[RamSlot], slice_pages: u64) -> Vec<LogSlice> {
    let mut slices = Vec::new();
    for (ram_slot, slot) in slots.iter().enumerate() {
        let mut first_page = 0;
        while first_page < slot.pages() {
            let pages = slice_pages.min(slot.pages() - first_page);
            slices.push(LogSlice {
                kvm_slot: slices.len() as u32,
                ram_slot,
                first_page,
                pages,
            });
            first_page += pages;
        }
    }
    slices
}

fn set_slot(
    vm: &VmFd,
    slot: &RamSlot,
    slice: &LogSlice,
    dirty_log: bool,
) -> Result<(), MemoryError> {
    let offset = slice.first_page * PAGE_SIZE;
    let size = slice.pages * PAGE_SIZE;
    if offset + size > slot.size {
        return Err(MemoryError::Assemble(format!(
            "memory slice {} overruns its slot",
            slice.kvm_slot
        )));
    }
    let region = kvm_userspace_memory_region {
        slot: slice.kvm_slot,
        flags: if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: slot.guest_addr + offset,
        memory_size: size,
        userspace_addr: slot.mapping.as_ptr() as u64 + offset,
    };
    // SAFETY: the slice lies inside the slot's mapping (checked above), which lives as long
    // as GuestRam, which the machine keeps for as long as the VM exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
        slot: slice.kvm_slot,
        source,
    })
}

fn create_memfd(size: u64) -> std::io::Result<File> {
    let name = c"tern-guest-ram";
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Maps `size` bytes of `file` as guest RAM laid out around the MMIO hole.
fn map_file(file: &File, size: u64, flags: i32) -> Result<(GuestMem, Vec<RamSlot>), MemoryError> {
    let mut regions = Vec::new();
    let mut slots = Vec::new();
    let mut file_offset = 0u64;
    for (index, (guest_addr, len)) in ram_ranges(size).into_iter().enumerate() {
        let dup = file.try_clone().map_err(MemoryError::Memfd)?;
        let page = NonZeroUsize::new(PAGE_SIZE as usize)
            .ok_or_else(|| MemoryError::Assemble("page size".into()))?;
        let bitmap = AtomicBitmap::new(len as usize, page);
        let mapping = MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
            .with_file_offset(FileOffset::new(dup, file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(MemoryError::Mmap)?;
        let region = Arc::new(
            GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
                .ok_or_else(|| MemoryError::Assemble("region overflows".into()))?,
        );
        regions.push(region.clone());
        slots.push(RamSlot {
            slot: index as u32,
            guest_addr,
            size: len,
            file_offset,
            mapping: region,
        });
        file_offset += len;
    }
    let memory =
        GuestMem::from_arc_regions(regions).map_err(|e| MemoryError::Assemble(e.to_string()))?;
    Ok((memory, slots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memfd_ram_is_zeroed_and_writable() {
        let ram = GuestRam::new_memfd(16).unwrap();
        assert_eq!(ram.size(), 16 << 20);
        assert_eq!(ram.slots().len(), 1);
        let v: u64 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0);
        ram.memory()
            .write_obj(0xdead_beefu64, GuestAddress(0x1000))
            .unwrap();
        let v: u64 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
    }

    #[test]
    fn ram_above_the_hole_is_a_second_slot() {
        let ram = GuestRam::new_memfd(4096).unwrap();
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].guest_addr, crate::layout::MMIO_HOLE_END);
        assert_eq!(slots[1].file_offset, crate::layout::MMIO_HOLE_START);
    }

    #[test]
    fn discarded_pages_read_as_zero_again() {
        let ram = GuestRam::new_memfd(4).unwrap();
        for gpa in [0x1000u64, 0x2000, 0x3000] {
            ram.memory()
                .write_obj(0xabcdu64, GuestAddress(gpa))
                .unwrap();
        }
        ram.discard(0x2000, 0x1000).unwrap();
        let read = |gpa| ram.memory().read_obj::<u64>(GuestAddress(gpa)).unwrap();
        assert_eq!(
            (read(0x1000), read(0x2000), read(0x3000)),
            (0xabcd, 0, 0xabcd)
        );
        assert!(ram.discard(0x2001, 0x1000).is_err());
        assert!(ram.discard(3 << 20, 2 << 20).is_err(), "past the end");
    }

    #[test]
    fn data_pages_are_found_and_new_ones_in_the_holes_later() {
        let ram = GuestRam::new_memfd(4).unwrap();
        let write = |page: u64| {
            ram.memory()
                .write_obj(1u64, GuestAddress(page * PAGE_SIZE))
                .unwrap()
        };
        write(1);
        write(2);
        assert_eq!(ram.slice_data_pages(0).unwrap(), vec![1..3]);
        write(3);
        write(700);
        assert_eq!(ram.slice_data_pages(0).unwrap(), vec![1..4, 700..701]);
        ram.discard(PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(ram.slice_data_pages(0).unwrap(), vec![2..4, 700..701]);
        assert_eq!(
            gaps(&[2..4, 700..701], 0..1024),
            vec![0..2, 4..700, 701..1024]
        );
    }

    #[test]
    fn zero_size_is_refused() {
        assert!(matches!(
            GuestRam::new_memfd(0),
            Err(MemoryError::BadSize(0))
        ));
    }
}
