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
                    let regs = feature_registers(function, index, [e.eax, e.ebx, e.ecx, e.edx]);
                    (function, index, regs)
                })
        })
        .collect()
}

/// The feature bits of a leaf's registers, the rest cleared: leaf 1 EAX is the signature and
/// EBX topology, leaf 7.0 EAX the highest subleaf, 0x8000_0001 EAX/EBX the signature and brand,
/// and of 0x8000_0008 only EBX holds features. Two hosts differing there run the same guests.
fn feature_registers(function: u32, index: u32, regs: [u32; 4]) -> [u32; 4] {
    let [_, ebx, ecx, edx] = regs;
    match (function, index) {
        (0x1, _) => [0, 0, ecx & !LEAF1_ECX_HYPERVISOR, edx & !LEAF1_EDX_HTT],
        (0x7, 0) => [0, ebx, ecx, edx],
        (0x8000_0001, _) => [0, 0, ecx, edx],
        (0x8000_0008, _) => [0, ebx, 0, 0],
        _ => regs,
    }
}

/// Names of well-known feature bits, by (leaf, subleaf, register index 0..4 = eax..edx, bit).
const FEATURE_NAMES: &[(u32, u32, usize, u32, &str)] = &[
    (0x1, 0, 2, 0, "sse3"),
    (0x1, 0, 2, 1, "pclmulqdq"),
    (0x1, 0, 2, 9, "ssse3"),
    (0x1, 0, 2, 12, "fma"),
    (0x1, 0, 2, 13, "cx16"),
    (0x1, 0, 2, 19, "sse4.1"),
    (0x1, 0, 2, 20, "sse4.2"),
    (0x1, 0, 2, 21, "x2apic"),
    (0x1, 0, 2, 22, "movbe"),
    (0x1, 0, 2, 23, "popcnt"),
    (0x1, 0, 2, 24, "tsc-deadline"),
    (0x1, 0, 2, 25, "aes"),
    (0x1, 0, 2, 26, "xsave"),
    (0x1, 0, 2, 28, "avx"),
    (0x1, 0, 2, 29, "f16c"),
    (0x1, 0, 2, 30, "rdrand"),
    (0x1, 0, 3, 25, "sse"),
    (0x1, 0, 3, 26, "sse2"),
    (0x7, 0, 1, 0, "fsgsbase"),
    (0x7, 0, 1, 3, "bmi1"),
    (0x7, 0, 1, 5, "avx2"),
    (0x7, 0, 1, 7, "smep"),
    (0x7, 0, 1, 8, "bmi2"),
    (0x7, 0, 1, 9, "erms"),
    (0x7, 0, 1, 16, "avx512f"),
    (0x7, 0, 1, 18, "rdseed"),
    (0x7, 0, 1, 19, "adx"),
    (0x7, 0, 1, 20, "smap"),
    (0x7, 0, 1, 29, "sha"),
    (0x7, 0, 2, 9, "vaes"),
    (0x7, 0, 2, 10, "vpclmulqdq"),
    (0x8000_0001, 0, 2, 0, "lahf_lm"),
    (0x8000_0001, 0, 2, 5, "abm"),
    (0x8000_0001, 0, 3, 20, "nx"),
    (0x8000_0001, 0, 3, 26, "pdpe1gb"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
    (0x8000_0001, 0, 3, 29, "lm"),
];

const REG_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

/// Whether `name` is a feature [`hide_features`] knows.
pub fn is_known_feature(name: &str) -> bool {
    FEATURE_NAMES.iter().any(|f| f.4 == name)
}

/// The names [`hide_features`] knows, for messages.
pub fn known_feature_names() -> Vec<&'static str> {
    FEATURE_NAMES.iter().map(|f| f.4).collect()
}

/// The known features (by name) that guests of this host get: what KVM supports here, less
/// `hidden`. A pool publishes them, so that a guest goes only where all it was given is.
pub fn guest_visible_features(hidden: &[String]) -> Result<Vec<String>, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut entries = supported(&kvm).map_err(|e| format!("cannot read KVM's CPUID: {e}"))?;
    hide_features(&mut entries, hidden)?;
    Ok(FEATURE_NAMES
        .iter()
        .filter(|&&(leaf, subleaf, reg, bit, _)| {
            entries
                .iter()
                .filter(|e| e.function == leaf && e.index == subleaf)
                .any(|e| [e.eax, e.ebx, e.ecx, e.edx][reg] & (1 << bit) != 0)
        })
        .map(|f| f.4.to_string())
        .collect())
}

/// Clears the feature bits named in `names` (e.g. `avx2`) in `entries`, so that guests do not
/// see them: a pool of hosts offers its guests a common set of features, and guests can move
/// between any two of them. An unknown name is an error.
pub fn hide_features(entries: &mut [kvm_cpuid_entry2], names: &[String]) -> Result<(), String> {
    for name in names {
        let &(leaf, subleaf, reg, bit, _) = FEATURE_NAMES
            .iter()
            .find(|f| f.4 == name)
            .ok_or_else(|| format!("unknown CPU feature '{name}'"))?;
        for e in entries
            .iter_mut()
            .filter(|e| e.function == leaf && e.index == subleaf)
        {
            let r = match reg {
                0 => &mut e.eax,
                1 => &mut e.ebx,
                2 => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r &= !(1 << bit);
        }
    }
    Ok(())
}

/// Features present in `saved` but missing from `host` (both from [`feature_words`]), by name
/// where known, else as `cpuid <leaf>.<subleaf> <reg> bit <n>`.
pub fn missing_features(
    saved: &[(u32, u32, [u32; 4])],
    host: &[(u32, u32, [u32; 4])],
) -> Vec<String> {
    let mut missing = Vec::new();
    for &(leaf, subleaf, regs) in saved {
        // Words saved by earlier builds may hold more than features.
        let regs = feature_registers(leaf, subleaf, regs);
        let have = host
            .iter()
            .find(|h| h.0 == leaf && h.1 == subleaf)
            .map(|h| h.2)
            .unwrap_or([0; 4]);
        for (r, (&want, &got)) in regs.iter().zip(have.iter()).enumerate() {
            let lacking = want & !got;
            for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
                let name = FEATURE_NAMES
                    .iter()
                    .find(|f| f.0 == leaf && f.1 == subleaf && f.2 == r && f.3 == bit)
                    .map(|f| f.4.to_string())
                    .unwrap_or_else(|| {
                        format!("cpuid {leaf:#x}.{subleaf} {} bit {bit}", REG_NAMES[r])
                    });
                missing.push(name);
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_and_subleaf_counts_are_not_features() {
        let saved = vec![
            (0x7, 0, [2, 1 << 5, 0, 0]),
            (0x8000_0001, 0, [0xa50f00, 0x2000_0000, 0, 0]),
        ];
        let host = vec![(0x7, 0, [0, 1 << 5, 0, 0]), (0x8000_0001, 0, [0; 4])];
        assert!(super::missing_features(&saved, &host).is_empty());
    }

    #[test]
    fn missing_features_are_named() {
        let saved = vec![(0x7, 0, [0, (1 << 5) | (1 << 12), 0, 0])];
        let host = vec![(0x7, 0, [0, 0, 0, 0])];
        assert_eq!(
            super::missing_features(&saved, &host),
            vec!["avx2", "cpuid 0x7.0 ebx bit 12"]
        );
        assert!(super::missing_features(&saved, &saved).is_empty());
    }

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
    fn hidden_features_disappear() {
        let mut l7 = entry(7, 0);
        l7.ebx = (1 << 5) | 1;
        let mut entries = vec![l7];
        hide_features(&mut entries, &["avx2".to_string()]).unwrap();
        assert_eq!(entries[0].ebx, 1);
        assert!(hide_features(&mut entries, &["warp-drive".to_string()]).is_err());
        assert!(is_known_feature("sse2"));
        assert!(!is_known_feature("warp-drive"));
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
