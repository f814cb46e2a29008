//! The CPUID a vCPU sees: what KVM supports on this host, with the topology of this machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Leaf 1 ECX: hypervisor present.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: VMX. Hidden: nested virtualisation state is not saved or migrated.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 EDX: more than one logical processor.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM. Hidden for the same reason as VMX.
const EXT1_ECX_SVM: u32 = 1 << 2;

/// Host-supported CPUID entries, before per-vCPU patching.
pub fn supported(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    Ok(cpuid.as_slice().to_vec())
}

/// Number of APIC-ID bits needed to number `count` processors.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Patches `entries` for vCPU `index` of a machine with `count` vCPUs (one core per vCPU, one
/// socket). The APIC ID of a vCPU is its index.
pub fn for_vcpu(entries: &[kvm_cpuid_entry2], index: u32, count: u32) -> Vec<kvm_cpuid_entry2> {
    let mut out = entries.to_vec();
    for e in out.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count & 0xff) << 16);
                e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_VMX;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb | 0x1f => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x4 => {
                // Intel deterministic cache parameters: cores per package in EAX[31:26].
                let cores = count.saturating_sub(1).min(63);
                e.eax = (e.eax & 0x03ff_ffff) | (cores << 26);
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_SVM,
            0x8000_0008 => {
                // AMD: number of cores minus one, and the APIC-ID size.
                e.ecx =
                    (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (id_bits(count) << 12);
            }
            0x8000_001e => {
                e.eax = index;
                e.ebx = index & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    out
}

/// Wraps entries for `KVM_SET_CPUID2`.
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(entries)
}

/// Compact, comparable description of the CPU features in a set of entries: leaf 1 and leaf 7
/// feature words and the extended feature words. Used to check that a host can run a guest
/// that was started elsewhere.
pub fn feature_words(entries: &[kvm_cpuid_entry2]) -> Vec<(u32, u32, [u32; 4])> {
    const FEATURE_LEAVES: [(u32, u32); 6] = [
        (0x1, 0),
        (0x7, 0),
        (0x7, 1),
        (0xd, 1),
        (0x8000_0001, 0),
        (0x8000_0008, 0),
    ];
    FEATURE_LEAVES
        .iter()
        .filter_map(|&(function, index)| {
            entries
                .iter()
                .find(|e| e.function == function && e.index == index)
                .map(|e| {
                    // Leaf 1 EBX is topology, not features; 0x8000_0008 only EBX has features.
                    let regs = match function {
                        0x1 => [0, 0, e.ecx & !LEAF1_ECX_HYPERVISOR, e.edx & !LEAF1_EDX_HTT],
                        0x8000_0008 => [0, e.ebx, 0, 0],
                        _ => [e.eax, e.ebx, e.ecx, e.edx],
                    };
                    (function, index, regs)
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let base = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0001, 0),
        ];
        let patched = for_vcpu(&base, 3, 4);
        assert_eq!(patched[0].ebx >> 24, 3);
        assert_eq!((patched[0].ebx >> 16) & 0xff, 4);
        assert_ne!(patched[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(patched[2].ebx, 4);
        assert_eq!(patched[2].eax, 2);
        assert_eq!(patched[1].edx, 3);
    }

    #[test]
    fn nested_virtualisation_is_hidden() {
        let mut l1 = entry(1, 0);
        l1.ecx = LEAF1_ECX_VMX;
        let mut ext = entry(0x8000_0001, 0);
        ext.ecx = EXT1_ECX_SVM;
        let patched = for_vcpu(&[l1, ext], 0, 1);
        assert_eq!(patched[0].ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(patched[1].ecx & EXT1_ECX_SVM, 0);
    }

    #[test]
    fn id_bits_cover_the_count() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
