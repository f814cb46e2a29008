//! KVM's manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
//!
//! Without it, reading the dirty log write-protects every page it reports at once: the guest
//! then takes a fault on the first write to each of them, a storm right after every pre-copy
//! round, which on a shadow-paging host stalls the guest for a noticeable time. With it,
//! reading the log changes nothing; the migration re-arms (clears and write-protects) each
//! chunk of pages just before it copies them, so the faults are spread over the round and a
//! page the guest keeps writing is protected only once it is about to be sent. With
//! `KVM_DIRTY_LOG_INITIALLY_SET`, switching the log on protects nothing either: every page
//! starts dirty and is protected when first sent.
//!
//! kvm-ioctls has no wrapper for `KVM_CLEAR_DIRTY_LOG`; this module holds the one ioctl.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Turns manual protection on for `vm` (before any slot logs dirty pages), with every page
/// initially dirty when the log starts. False if this KVM cannot: reading the log then
/// protects what it reports, as before.
pub fn enable_manual_protect(vm: &VmFd) -> bool {
    let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported < 0 || (supported as u32) & wanted != wanted {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(wanted);
    match vm.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("manual dirty-log protection unavailable ({e}); using the plain log");
            false
        }
    }
}

/// Clears the dirty bits of `bits` (bit i = page `first_page + i` of `slot`, a slot of
/// `slot_pages` pages) and write-protects those pages again, so that a later write shows in
/// the log. `first_page` must be a multiple of 64 (KVM checks); bits past the slot's end are
/// ignored.
pub fn clear(
    vm: &VmFd,
    slot: u32,
    slot_pages: u64,
    first_page: u64,
    bits: &[u64],
) -> std::io::Result<()> {
    let pages = (bits.len() as u64 * 64).min(slot_pages.saturating_sub(first_page));
    if pages == 0 {
        return Ok(());
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages: u32::try_from(pages)
            .map_err(|_| std::io::Error::other("too many pages to clear at once"))?,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which points at `bits`
    // (exactly `num_pages / 64` words, alive for the call); it writes nothing back.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
