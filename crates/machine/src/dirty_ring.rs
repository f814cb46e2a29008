//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): each vCPU pushes the pages it writes into a
//! ring of its own, so tern knows not only which pages changed but which vCPU changed them.
//! Auto-converge uses that to slow down only the vCPUs that dirty memory faster than their
//! share (QEMU calls this dirty-limit): a vCPU that computes, prints or serves I/O without
//! writing much memory runs on at full speed, where a time-slice throttle would stall it as
//! much as the writers (see `throttle`).
//!
//! The ring must be enabled before the vCPUs are made, and on x86 it replaces the dirty
//! bitmap: with it, `KVM_GET_DIRTY_LOG` is not available. [`DirtyRings`] harvests every
//! vCPU's ring into per-slot bitmaps, the shape the rest of tern reads.
//!
//! Protocol (Documentation/virt/kvm/api.rst): KVM publishes an entry by setting its DIRTY flag;
//! the reader takes entries in order from its own index while DIRTY is set, marks each one
//! RESET, and `KVM_RESET_DIRTY_RINGS` then write-protects those pages again and frees the
//! entries. A ring that fills makes its vCPU exit with `KVM_EXIT_DIRTY_RING_FULL` until it is
//! reset.

use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::memory::LogSlice;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Bytes of each vCPU's ring: 4096 entries, about 60 ms of a vCPU writing 256 MiB/s between
/// two harvests (they come every 1 to 10 ms while the log is on).
pub const RING_BYTES: u32 = 64 << 10;
const ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;
const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;
const PAGE: usize = 4096;

/// Whether guests made by this process use the dirty ring where KVM has it: yes, unless
/// `TERN_DIRTY_RING=0` is in the daemon's environment (then the dirty bitmap).
pub fn wanted() -> bool {
    std::env::var("TERN_DIRTY_RING").map_or(true, |v| v != "0")
}

/// Enables the dirty ring on `vm` (before any vCPU exists), if wanted and this KVM has it;
/// false otherwise (tern then uses the dirty bitmap).
pub fn enable(vm: &VmFd) -> bool {
    if !wanted() {
        return false;
    }
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = vm.check_extension_raw(u64::from(cap));
        if max < i32::try_from(RING_BYTES).unwrap_or(i32::MAX) {
            continue;
        }
        let mut c = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        c.args[0] = u64::from(RING_BYTES);
        match vm.enable_cap(&c) {
            Ok(()) => return true,
            Err(e) => log::warn!("the dirty ring (capability {cap}) is unavailable: {e}"),
        }
    }
    false
}

/// One vCPU's ring, mapped.
struct Ring {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    /// The next entry to read.
    next: u32,
}

// SAFETY: the mapping is only read and written through `harvest`, under the `DirtyRings`
// mutex; KVM writes it concurrently, which the flag protocol (acquire/release) is made for.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd) -> std::io::Result<Ring> {
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET as i32) * PAGE as libc::off_t;
        // SAFETY: a new shared mapping of the vCPU's ring pages; it overlaps nothing of ours
        // and `Drop` unmaps exactly it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BYTES as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let entries = NonNull::new(addr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(Ring {
            entries,
            count: RING_BYTES / ENTRY_BYTES,
            next: 0,
        })
    }

    /// Reads every published entry, calling `f(slot, page offset)` for each and marking it
    /// for reset. Returns how many.
    fn harvest(&mut self, f: &mut impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.next % self.count) as usize;
            // SAFETY: `i < count`: inside the mapping, alive while `self` is.
            let entry = unsafe { self.entries.as_ptr().add(i) };
            // SAFETY: `flags` is the entry's first u32, naturally aligned; KVM sets it with a
            // release store after writing the entry, and we read it with acquire.
            let flags = unsafe { &*(std::ptr::addr_of_mut!((*entry).flags).cast::<AtomicU32>()) };
            if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire): its fields are stable.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).offset)),
                )
            };
            f(slot, offset);
            flags.store(F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), RING_BYTES as usize);
        }
    }
}

/// Every vCPU's ring, harvested into one dirty bitmap per RAM slot, and how many pages each
/// vCPU dirtied.
///
/// Logging is switched on one log slice (KVM slot) at a time, by the machine, as the first
/// pass reaches it ([`DirtyRings::start_logging`]): until then a slice is not tracked, and
/// the machine counts every page of it that holds data as written.
pub struct DirtyRings {
    vm: RawFd,
    inner: Mutex<Harvest>,
}

struct Harvest {
    rings: Vec<Ring>,
    /// The log slices, indexed by KVM slot number.
    slices: Vec<LogSlice>,
    /// Whether each slice logs (KVM write-protected it and reports its writes).
    logging: Vec<bool>,
    bitmaps: Vec<Vec<u64>>,
    /// Pages read from the rings since the last reset: still writable without an entry.
    unreset_pages: Vec<Vec<u64>>,
    /// Entries read from each vCPU's ring since the last `take_counts`.
    counts: Vec<u64>,
    /// Entries marked for reset since the last `KVM_RESET_DIRTY_RINGS`.
    unreset: u32,
}

impl DirtyRings {
    /// Maps the rings of `vcpus` of the VM `vm` (which must outlive this), for RAM slots of
    /// `slot_pages` pages cut into KVM slots `slices` (indexed by KVM slot number).
    pub fn new(
        vm: &VmFd,
        vcpus: &[&VcpuFd],
        slot_pages: &[u64],
        slices: Vec<LogSlice>,
    ) -> std::io::Result<Self> {
        let rings = vcpus
            .iter()
            .map(|v| Ring::map(v))
            .collect::<std::io::Result<Vec<_>>>()?;
        let bitmaps: Vec<Vec<u64>> = slot_pages
            .iter()
            .map(|&pages| vec![0u64; pages.div_ceil(64) as usize])
            .collect();
        let counts = vec![0; rings.len()];
        let unreset_pages = bitmaps.clone();
        Ok(DirtyRings {
            vm: vm.as_raw_fd(),
            inner: Mutex::new(Harvest {
                rings,
                logging: vec![false; slices.len()],
                slices,
                bitmaps,
                unreset_pages,
                counts,
                unreset: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads every ring into the bitmaps; resets the rings (write-protecting the pages read
    /// again) once `reset_after` entries or more wait for it (0: always).
    pub fn harvest(&self, reset_after: u32) -> std::io::Result<()> {
        let mut h = self.lock();
        let Harvest {
            rings,
            slices,
            bitmaps,
            unreset_pages,
            counts,
            unreset,
            ..
        } = &mut *h;
        for (ring, count) in rings.iter_mut().zip(counts.iter_mut()) {
            let n = ring.harvest(&mut |slot, offset| {
                // Address space 0 only (the upper half of `slot` is the address space).
                let Some(slice) = slices.get(slot as usize) else {
                    return;
                };
                if offset >= slice.pages {
                    return;
                }
                let page = slice.first_page + offset;
                let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
                if let (Some(b), Some(u)) = (
                    bitmaps.get_mut(slice.ram_slot).and_then(|b| b.get_mut(w)),
                    unreset_pages
                        .get_mut(slice.ram_slot)
                        .and_then(|b| b.get_mut(w)),
                ) {
                    *b |= bit;
                    *u |= bit;
                }
            });
            *count += u64::from(n);
            *unreset += n;
        }
        if *unreset > 0 && *unreset >= reset_after {
            // SAFETY: an ioctl without arguments on the VM descriptor, alive while `self` is.
            let rc = unsafe { ioctl(&Fd(self.vm), KVM_RESET_DIRTY_RINGS()) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            *unreset = 0;
            unreset_pages.iter_mut().flatten().for_each(|w| *w = 0);
        }
        Ok(())
    }

    /// Harvests, and returns the pages written since the last take, one bitmap per slot (of
    /// the slices that log: the machine adds the others).
    pub fn take(&self) -> std::io::Result<Vec<Vec<u64>>> {
        self.harvest(0)?;
        let mut h = self.lock();
        let fresh = h.bitmaps.iter().map(|b| vec![0; b.len()]).collect();
        Ok(std::mem::replace(&mut h.bitmaps, fresh))
    }

    /// The slices (KVM slot numbers) that do not log yet.
    pub fn unlogged_slices(&self) -> Vec<usize> {
        let h = self.lock();
        (0..h.logging.len()).filter(|&i| !h.logging[i]).collect()
    }

    /// KVM now logs slice `index` (its slot was just switched to logging, which
    /// write-protected it): its pages `data` (those holding data, read after the switch) count
    /// as written until re-armed, the rest (never written before the switch) as clean.
    pub fn start_logging(&self, index: usize, data: &[Range<u64>]) {
        let mut h = self.lock();
        let Some(slice) = h.slices.get(index).cloned() else {
            return;
        };
        if let Some(bitmap) = h.bitmaps.get_mut(slice.ram_slot) {
            for range in data {
                set_pages(bitmap, range.clone());
            }
        }
        if let Some(on) = h.logging.get_mut(index) {
            *on = true;
        }
    }

    /// Entries each vCPU pushed since the last call (pages it wrote, counted again when
    /// written again after a reset).
    pub fn take_counts(&self) -> Vec<u64> {
        let mut h = self.lock();
        let zero = vec![0; h.counts.len()];
        std::mem::replace(&mut h.counts, zero)
    }

    /// The engine is about to read pages `bits` (bit i: page `first_page + i`) of slot number
    /// `slot_index`: what was written there so far is in the copy, so their marks go — but
    /// only for pages that are write-protected now (read from a ring and reset since) or have
    /// an entry still to come: a page read from a ring but not yet reset is writable without
    /// a new entry, so it keeps its mark and goes again. A write after the read is never
    /// missed, and no reset (which would protect every page read, the guest's hot ones too) is
    /// needed here.
    pub fn rearm(&self, slot_index: usize, first_page: u64, bits: &[u64]) -> std::io::Result<()> {
        self.harvest(u32::MAX)?;
        let mut h = self.lock();
        let Harvest {
            bitmaps,
            unreset_pages,
            ..
        } = &mut *h;
        if let (Some(bitmap), Some(unreset)) =
            (bitmaps.get_mut(slot_index), unreset_pages.get(slot_index))
        {
            let first = (first_page / 64) as usize;
            for ((w, clear), writable) in bitmap
                .iter_mut()
                .skip(first)
                .zip(bits)
                .zip(unreset.iter().skip(first))
            {
                *w &= !(clear & !writable);
            }
        }
        Ok(())
    }

    /// Forgets what was harvested, and that any slice logs (the log starts afresh, or KVM's
    /// logging was switched off).
    pub fn clear(&self) -> std::io::Result<()> {
        self.take()?;
        self.lock().logging.iter_mut().for_each(|on| *on = false);
        Ok(())
    }
}

/// Sets the bits of `pages` in `bitmap` (bits past its end are ignored).
pub fn set_pages(bitmap: &mut [u64], pages: Range<u64>) {
    let end = pages.end.min(bitmap.len() as u64 * 64);
    let mut page = pages.start;
    while page < end {
        let (w, bit) = ((page / 64) as usize, page % 64);
        if bit == 0 && end - page >= 64 {
            bitmap[w] = u64::MAX;
            page += 64;
        } else {
            bitmap[w] |= 1 << bit;
            page += 1;
        }
    }
}

/// A borrowed descriptor for `ioctl`.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}
