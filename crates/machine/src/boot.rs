//! Loading a kernel and putting the boot vCPU where its boot protocol expects it.
//!
//! * ELF kernels with a `XEN_ELFNOTE_PHYS32_ENTRY` note (Linux `vmlinux`, the test guest) boot
//!   through PVH: 32-bit protected mode, paging off, `%ebx` pointing at `hvm_start_info`.
//! * bzImage kernels boot through the Linux 64-bit boot protocol: long mode on an identity map,
//!   `%rsi` pointing at the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use tern_devices::GuestMem as GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

/// Errors while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open ramdisk {path}: {source}")]
    OpenInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF kernel nor a bzImage")]
    UnknownFormat { path: String },
    #[error("ELF kernel {path} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry { path: String },
    #[error("bzImage {path} does not support the 64-bit boot protocol")]
    No64BitEntry { path: String },
    #[error("cannot load kernel {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("kernel command line is {0} bytes; at most {max} are supported", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("ramdisk of {size} bytes does not fit in guest memory")]
    InitrdTooLarge { size: u64 },
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(String),
    #[error("cannot set boot registers: {0}")]
    Registers(#[source] kvm_ioctls::Error),
}

/// What the boot vCPU must be set to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH 32-bit entry.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol entry.
    Linux64 { entry: u64 },
}

/// A kernel to boot.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    /// Where the ACPI RSDP is, if the machine has ACPI tables.
    pub rsdp: Option<u64>,
}

fn mem_err<E: std::fmt::Display>(e: E) -> BootError {
    BootError::Memory(e.to_string())
}

/// Loads kernel, ramdisk and command line, writes the boot information the protocol needs,
/// and returns where the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, ram_size: u64, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let path = spec.kernel.display().to_string();
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    if spec.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(spec.cmdline.len()));
    }
    let format = detect_format(&mut kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: path.clone(),
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry { path });
            };
            let initrd = load_initrd(mem, ram_size, spec.initrd, result.kernel_end)?;
            write_cmdline(mem, spec.cmdline)?;
            write_pvh_start_info(mem, ram_size, initrd, spec.rsdp)?;
            Ok(BootEntry::Pvh { entry: entry.0 })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            let header = result.setup_header.ok_or_else(|| BootError::Load {
                path: path.clone(),
                reason: "no setup header".into(),
            })?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry { path });
            }
            let entry = BootEntry::Linux64 {
                entry: result.kernel_load.0 + 0x200,
            };
            let initrd = load_initrd(mem, ram_size, spec.initrd, result.kernel_end)?;
            write_zero_page(mem, ram_size, header, spec.cmdline, initrd, spec.rsdp)?;
            write_cmdline(mem, spec.cmdline)?;
            write_identity_map(mem)?;
            Ok(entry)
        }
    }
}

enum KernelFormat {
    Elf,
    BzImage,
}

const XLF_KERNEL_64: u16 = 1;

fn detect_format(f: &mut File) -> std::io::Result<KernelFormat> {
    let mut head = [0u8; 0x206];
    f.seek(SeekFrom::Start(0))?;
    let n = read_up_to(f, &mut head)?;
    f.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "neither an ELF kernel nor a bzImage",
        ))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Guest RAM as the firmware would report it: type 1 = usable, 2 = reserved.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, 1),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, 2),
    ];
    for (start, len) in ram_ranges(ram_size) {
        let end = start + len;
        let start = start.max(HIGH_MEMORY_START);
        if end > start {
            map.push((start, end - start, 1));
        }
    }
    map
}

/// End of RAM below the MMIO hole.
fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO_HOLE_START)
}

/// Places the ramdisk page-aligned at the top of low RAM; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<&Path>,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = initrd else {
        return Ok(None);
    };
    let open_err = |source| BootError::OpenInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = low_ram_end(ram_size);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    match addr {
        Some(addr) if addr >= kernel_end && size > 0 => {
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(mem_err)?;
            Ok(Some((addr, size)))
        }
        _ => Err(BootError::InitrdTooLarge { size }),
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(mem_err)
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let map = e820_map(ram_size);
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )
        .map_err(mem_err)?;
    }
    let modlist_paddr = PVH_MEMMAP_START + map.len() as u64 * entry_size;
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_paddr))
            .map_err(mem_err)?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_paddr } else { 0 },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(mem_err)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    header: linux_loader::loader::bootparam::setup_header,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const CAN_USE_HEAP: u8 = 0x80;
    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    // hdr.cmdline_size is the kernel's limit, for the loader to read: check, do not write.
    if header.version >= 0x0206 && cmdline.len() as u32 >= header.cmdline_size {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(ram_size);
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err)
}

/// Identity map of the first 1 GiB with 2 MiB pages, for the 64-bit boot protocol.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(BOOT_PDPT_START | PRESENT_RW, GuestAddress(BOOT_PML4_START))
        .map_err(mem_err)?;
    mem.write_obj(BOOT_PD_START | PRESENT_RW, GuestAddress(BOOT_PDPT_START))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PRESENT_RW | HUGE,
            GuestAddress(BOOT_PD_START + i * 8),
        )
        .map_err(mem_err)?;
    }
    Ok(())
}

/// A GDT descriptor from access flags (`0xf0ff` form), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register a descriptor loads.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets the boot vCPU's registers for `entry`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), BootError> {
    let mut sregs = vcpu.get_sregs().map_err(BootError::Registers)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry } => {
            // Null, 32-bit code, data, 32-bit TSS.
            let gdt = [
                0,
                gdt_entry(0xc09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x008b, 0, 0x67),
            ];
            write_gdt(mem, &gdt, &mut sregs)?;
            load_segments(&mut sregs, &gdt, 0x08, 0x10, 0x18);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        BootEntry::Linux64 { entry } => {
            // The protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
            let gdt = [
                0,
                0,
                gdt_entry(0xa09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x008b, 0, 0x67),
            ];
            write_gdt(mem, &gdt, &mut sregs)?;
            load_segments(&mut sregs, &gdt, 0x10, 0x18, 0x20);
            sregs.cr3 = BOOT_PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(BootError::Registers)?;
    vcpu.set_regs(&regs).map_err(BootError::Registers)
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64], sregs: &mut kvm_sregs) -> Result<(), BootError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(mem_err)?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    Ok(())
}

fn load_segments(sregs: &mut kvm_sregs, gdt: &[u64], code: u16, data: u16, tss: u16) {
    let at = |sel: u16| gdt[usize::from(sel / 8)];
    sregs.cs = segment(at(code), code);
    let ds = segment(at(data), data);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment(at(tss), tss);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_back() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(code, 0x10);
        assert_eq!(s.l, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.present, 1);
        assert_eq!(s.limit, 0xffff_ffff);
        let tss = segment(gdt_entry(0x008b, 0x1234_5678, 0x67), 0x18);
        assert_eq!(tss.base, 0x1234_5678);
        assert_eq!(tss.limit, 0x67);
        assert_eq!(tss.s, 0);
    }

    #[test]
    fn e820_describes_all_ram() {
        let map = e820_map(1 << 30);
        let usable: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(usable, (1 << 30) - (HIGH_MEMORY_START - EBDA_START));
        let big = e820_map(4 << 30);
        assert_eq!(big.last().unwrap().0, MMIO_HOLE_END);
        assert_eq!(big.last().unwrap().1, (4 << 30) - MMIO_HOLE_START);
    }
}
