//! ACPI tables, so that a stock Linux guest finds what PVH and the boot protocol do not tell
//! it: its processors and IOAPIC (MADT), the power-management blocks and the power button
//! (FADT), and the virtio-mmio devices with their windows and interrupts (DSDT, `LNRO0005`
//! devices, as Firecracker and Cloud Hypervisor describe them). The test guest does not read
//! them; it finds its devices by the fixed layout in `layout.rs`.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use tern_devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"TERN  ";
const OEM_TABLE: [u8; 8] = *b"TERNVMM ";
const OEM_REVISION: u32 = 1;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
}

/// The tables of a machine with `vcpus` processors and `virtio` devices.
pub struct AcpiTables {
    /// Each table with the guest-physical address it goes to.
    pub tables: Vec<(u64, Vec<u8>)>,
    /// Where the RSDP is (the entry point a loader passes on, e.g. in PVH start info).
    pub rsdp: u64,
}

/// Appends `table` at the next `align`-aligned address; returns its address.
fn place(tables: &mut Vec<(u64, Vec<u8>)>, next: &mut u64, align: u64, table: Vec<u8>) -> u64 {
    let at = next.next_multiple_of(align);
    *next = at + table.len() as u64;
    tables.push((at, table));
    at
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Builds all tables for placement at [`ACPI_START`].
pub fn build(vcpus: u32, virtio: &[VirtioSlot]) -> AcpiTables {
    let mut tables = Vec::new();
    let rsdp_at = ACPI_START;
    let mut next = rsdp_at + 64;
    let dsdt = place(&mut tables, &mut next, 16, dsdt(virtio));
    let facs = place(&mut tables, &mut next, 64, bytes(&FACS::new()));
    let fadt = place(&mut tables, &mut next, 16, fadt(dsdt, facs));
    let madt = place(&mut tables, &mut next, 16, madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(&mut tables, &mut next, 16, bytes(&xsdt));
    tables.push((rsdp_at, bytes(&Rsdp::new(OEM_ID, xsdt))));
    AcpiTables {
        tables,
        rsdp: rsdp_at,
    }
}

impl AcpiTables {
    /// Copies the tables into guest memory.
    pub fn write(&self, mem: &GuestMem) -> Result<(), vm_memory::GuestMemoryError> {
        for (at, table) in &self.tables {
            mem.write_slice(table, GuestAddress(*at))?;
        }
        Ok(())
    }

    /// Bytes from the first to the last byte of all tables.
    pub fn span(&self) -> u64 {
        let end = self
            .tables
            .iter()
            .map(|(a, t)| a + t.len() as u64)
            .max()
            .unwrap_or(ACPI_START);
        end - ACPI_START
    }
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const SLP_BUTTON: u32 = 1 << 5; // no sleep button (the power button is a fixed feature)
    const RESET_REG_SUP: u32 = 1 << 10;
    const IAPC_8042: u16 = 1 << 1;
    const IAPC_NO_VGA: u16 = 1 << 2;
    const IAPC_NO_MSI: u16 = 1 << 3;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    f.sci_int = (ACPI_SCI_GSI as u16).into();
    f.pm1a_evt_blk = u32::from(ACPI_PM1A_EVT_PORT).into();
    f.pm1a_cnt_blk = u32::from(ACPI_PM1A_CNT_PORT).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.flags = (WBINVD | SLP_BUTTON | RESET_REG_SUP).into();
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_MSI).into();
    // Reset through the i8042 (value 0xfe at port 0x64), which tern turns into a reset event.
    f.reset_reg = acpi_tables::gas::GAS::new(
        acpi_tables::gas::AddressSpace::SystemIo,
        8,
        0,
        acpi_tables::gas::AccessSize::ByteAccess,
        u64::from(I8042_PORT) + 4,
    );
    f.reset_value = 0xfe;
    f.firmware_ctrl = (facs as u32).into();
    f.dsdt = (dsdt as u32).into();
    f.x_dsdt = dsdt.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"TERNVMM\0").into();
    bytes(&f.finalize())
}

/// MADT: one enabled local APIC per vCPU, the IOAPIC, and the ISA overrides a PC has.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s too
    for i in 0..vcpus {
        body.extend_from_slice(&[0, 8, i as u8, i as u8]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    let ioapic_id = vcpus as u8;
    body.extend_from_slice(&[1, 12, ioapic_id, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                                 // ISA IRQ 0 (PIT) is GSI 2; the SCI is level-triggered, active high.
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (ACPI_SCI_GSI as u8, ACPI_SCI_GSI, 0x000d),
    ] {
        body.extend_from_slice(&[2, 10, 0, irq]);
        body.extend_from_slice(&gsi.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
    }
    let mut sdt = Sdt::new(*b"APIC", 36, 4, OEM_ID, OEM_TABLE, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// DSDT: the virtio-mmio devices, the console UART, and the S5 sleep type.
fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = Vec::new();
    for (i, slot) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, slot.base as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_value = i as u64;
        let uid = aml::Name::new("_UID".into(), &uid_value);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("VR{i:02X}");
        devices.push(bytes(&aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &crs],
        )));
    }
    let com_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid_value = 1u64;
    let com_uid = aml::Name::new("_UID".into(), &com_uid_value);
    let com_crs = aml::Name::new("_CRS".into(), &com_crs);
    let com = bytes(&aml::Device::new(
        "COM1".into(),
        vec![&com_hid, &com_uid, &com_crs],
    ));

    let mut sb_children: Vec<&dyn Aml> = Vec::new();
    let raw_devices: Vec<RawAml> = devices
        .into_iter()
        .chain(std::iter::once(com))
        .map(RawAml)
        .collect();
    for d in &raw_devices {
        sb_children.push(d);
    }
    let sb = aml::Scope::new("\\_SB_".into(), sb_children);
    let s5_typ = u64::from(tern_devices::acpi_pm::SLP_TYP_S5);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &aml::ZERO, &aml::ZERO]),
    );
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    sdt.append_slice(&bytes(&sb));
    sdt.append_slice(&bytes(&s5));
    sdt.as_slice().to_vec()
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
    }

    #[test]
    fn tables_are_consistent() {
        let virtio = [
            VirtioSlot {
                base: VIRTIO_MMIO_START,
                gsi: 16,
            },
            VirtioSlot {
                base: VIRTIO_MMIO_START + 0x1000,
                gsi: 17,
            },
        ];
        let t = build(2, &virtio);
        assert!(t.span() < 0x1_0000, "tables spill out of the BIOS area");
        for (at, table) in &t.tables {
            assert!(*at >= ACPI_START && *at + table.len() as u64 <= HIGH_MEMORY_START);
            if *at == t.rsdp {
                assert_eq!(&table[..8], b"RSD PTR ");
                assert!(checksum_ok(&table[..20]) && checksum_ok(table));
            } else if &table[..4] != b"FACS" {
                let len = u32::from_le_bytes([table[4], table[5], table[6], table[7]]) as usize;
                assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
                assert!(
                    checksum_ok(table),
                    "{}",
                    String::from_utf8_lossy(&table[..4])
                );
            }
        }
        let dsdt = &t.tables.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().1;
        let text = String::from_utf8_lossy(dsdt);
        assert!(text.contains("LNRO0005") && text.contains("VR01") && text.contains("_S5_"));
        let madt = &t.tables.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
        assert_eq!(madt[36..40], (LAPIC_START as u32).to_le_bytes());
    }
}
