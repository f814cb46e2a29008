//! The fixed parts of format version 1: constants, the file header, record types and record
//! headers, shared by the writer and both readers so that they cannot disagree.

use std::fmt;

use crate::error::{Fault, SnapshotError};

/// The first 8 bytes of every checkpoint file and migration stream.
pub const MAGIC: [u8; 8] = *b"TERNSNAP";
/// The format version this crate writes, and the newest it reads. Version 2 (tern 0.2) has
/// the records of version 1; its VCPU, MACHINE and DEVICE bodies are versioned records
/// (`tern_devices::state`) instead of positional ones.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this crate reads (tern 0.1's checkpoints and streams).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Length of the file/stream header.
pub const HEADER_LEN: usize = 32;
/// Length of every record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Guest page size: page records carry whole 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`: a pfn is a guest-physical address shifted right by this.
pub const PAGE_SHIFT: u32 = 12;

/// Header flag: the data of each PAGES record starts at a 4096-aligned offset.
pub const FLAG_ALIGNED: u32 = 1;
/// Record type bit: a reader that does not know the type may skip the record.
pub const RECORD_OPTIONAL: u32 = 1 << 31;

/// Largest body of an INFO, CONFIG, MACHINE, VCPU, DEVICE or NOTE record.
pub const MAX_BODY_LEN: u64 = 16 << 20;
/// Most runs in one PAGES record.
pub const MAX_RUNS: u32 = 1 << 20;
/// Most pages in one checksum block.
pub const MAX_BLOCK_PAGES: u32 = 1024;
/// Most pages in one PAGES record (16 GiB of data).
pub const MAX_RECORD_PAGES: u64 = 1 << 22;
/// Largest PAGES descriptor (fields, runs, block checksums and padding).
pub const MAX_DESCRIPTOR_LEN: u64 = 64 << 20;
/// Page runs must end at or below this pfn (52-bit guest-physical page numbers).
pub const MAX_PFN_END: u64 = 1 << 52;
/// Longest DEVICE id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Largest PAGES body: a full descriptor plus a full record's data.
pub const MAX_PAGES_BODY_LEN: u64 = MAX_DESCRIPTOR_LEN + MAX_RECORD_PAGES * PAGE_SIZE as u64;
/// Largest body of a record of an unknown optional type that a reader will skip. Nothing in
/// version 1 is larger than a PAGES record, so neither may a future optional record be.
pub const MAX_SKIPPED_BODY_LEN: u64 = MAX_PAGES_BODY_LEN;

/// The type of a record: a `u32` whose bit 31 marks it optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordType(pub u32);

impl RecordType {
    /// Who wrote the checkpoint, when, and what the guest looks like (JSON [`crate::Info`]).
    pub const INFO: RecordType = RecordType(1);
    /// The guest's configuration (JSON, opaque to this crate).
    pub const CONFIG: RecordType = RecordType(2);
    /// Machine-wide state (memory layout, VM state), opaque bytes.
    pub const MACHINE: RecordType = RecordType(3);
    /// The state of one vCPU, opaque bytes.
    pub const VCPU: RecordType = RecordType(4);
    /// The state of one device: `u16` id length, id, state bytes.
    pub const DEVICE: RecordType = RecordType(5);
    /// Guest pages: descriptor, padding, data.
    pub const PAGES: RecordType = RecordType(6);
    /// The last record: how many records came before it.
    pub const END: RecordType = RecordType(7);
    /// Guest pages that are all zero now (a migration round sends this for dirtied pages
    /// that became zero, instead of their data): a run count and the runs.
    pub const ZEROS: RecordType = RecordType(8);
    /// Guest pages the receiver of a post-copy migration does not hold yet, or holds stale
    /// content of (streams only): a run count and the runs, as in ZEROS. The receiver drops
    /// what it holds of them and fetches them after the handover.
    pub const MISSING: RecordType = RecordType(9);
    /// Part of a guest's disk image (streams only, `--copy-storage`): a disk, an offset and
    /// the data there (see [`crate::disk`]).
    pub const DISK: RecordType = RecordType(10);
    /// Parts of a guest's disk image that read as zeros now (streams only): a disk and byte
    /// runs.
    pub const DISK_ZEROS: RecordType = RecordType(11);
    /// A free-form UTF-8 comment; optional, so readers may skip it.
    pub const NOTE: RecordType = RecordType(RECORD_OPTIONAL | 1);
    /// A position in a migration stream (body: an 8-byte sequence number) that the receiver
    /// acknowledges once it has applied every record before it; optional, files do not need it.
    pub const MARK: RecordType = RecordType(RECORD_OPTIONAL | 2);

    /// Whether a reader that does not know this type may skip the record.
    pub const fn is_optional(self) -> bool {
        self.0 & RECORD_OPTIONAL != 0
    }

    /// Whether this is one of the types of format version 1.
    pub fn is_known(self) -> bool {
        self.known_name().is_some()
    }

    /// The type's name for messages ("PAGES"), or "unknown" for a type this crate does not
    /// know. [`fmt::Display`] shows unknown types by number instead.
    pub fn name(self) -> &'static str {
        self.known_name().unwrap_or("unknown")
    }

    fn known_name(self) -> Option<&'static str> {
        Some(match self {
            RecordType::INFO => "INFO",
            RecordType::CONFIG => "CONFIG",
            RecordType::MACHINE => "MACHINE",
            RecordType::VCPU => "VCPU",
            RecordType::DEVICE => "DEVICE",
            RecordType::PAGES => "PAGES",
            RecordType::END => "END",
            RecordType::ZEROS => "ZEROS",
            RecordType::MISSING => "MISSING",
            RecordType::DISK => "DISK",
            RecordType::DISK_ZEROS => "DISK_ZEROS",
            RecordType::NOTE => "NOTE",
            RecordType::MARK => "MARK",
            _ => return None,
        })
    }

    /// The largest body a reader accepts for this type; longer ones are `TooLarge`.
    pub(crate) fn body_limit(self) -> u64 {
        match self {
            RecordType::PAGES => MAX_PAGES_BODY_LEN,
            RecordType::END => 8,
            RecordType::DISK => (crate::disk::DISK_FIXED_LEN + crate::disk::MAX_DISK_DATA) as u64,
            t if t.is_known() => MAX_BODY_LEN,
            _ => MAX_SKIPPED_BODY_LEN,
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "type {:#010x}", self.0),
        }
    }
}

/// The file/stream header, as far as a reader cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// Whether page data starts at 4096-aligned offsets (set for files, clear for streams).
    pub aligned: bool,
}

impl Header {
    /// The 32 bytes of a version-1 header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let flags = if self.aligned { FLAG_ALIGNED } else { 0 };
        b[16..20].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header from the first bytes of a file or stream: `b` holds up to 32 bytes,
    /// fewer when the data is shorter.
    ///
    /// The magic is checked first (anything else is `NotTern`), then the version (so a newer
    /// tern's file says so even if its header is laid out differently), then the checksum.
    pub(crate) fn decode(b: &[u8]) -> Result<Header, SnapshotError> {
        let magic_len = b.len().min(MAGIC.len());
        if b.is_empty() || b[..magic_len] != MAGIC[..magic_len] {
            return Err(SnapshotError::NotTern);
        }
        if b.len() < 12 {
            return Err(header_truncated());
        }
        let version = le_u32(b, 8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SnapshotError::UnsupportedVersion { found: version });
        }
        if b.len() < HEADER_LEN {
            return Err(header_truncated());
        }
        if crc32c::crc32c(&b[0..28]) != le_u32(b, 28) {
            return Err(SnapshotError::corrupt(0, "the header fails its checksum"));
        }
        Self::check_fields(b, version)
    }

    /// The checks on a header whose checksum is good.
    fn check_fields(b: &[u8], version: u32) -> Result<Header, SnapshotError> {
        let bad = |what: String| Err(SnapshotError::corrupt(0, what));
        let header_len = le_u32(b, 12);
        if header_len != HEADER_LEN as u32 {
            return bad(format!(
                "the header says it is {header_len} bytes long, not 32"
            ));
        }
        let flags = le_u32(b, 16);
        if flags & !FLAG_ALIGNED != 0 {
            return bad(format!("the header has unknown flags {flags:#x}"));
        }
        if b[20..28].iter().any(|&x| x != 0) {
            return bad("the header's reserved bytes are not zero".into());
        }
        Ok(Header {
            version,
            aligned: flags & FLAG_ALIGNED != 0,
        })
    }
}

fn header_truncated() -> SnapshotError {
    SnapshotError::truncated(0, "it ends inside the header")
}

/// Where a record is, for messages: "record 5 (VCPU) at offset 123456".
///
/// `seq` counts records from 1, the header not included.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordLoc {
    pub seq: u64,
    pub ty: RecordType,
    pub offset: u64,
}

impl fmt::Display for RecordLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record {} ({}) at offset {}",
            self.seq, self.ty, self.offset
        )
    }
}

impl RecordLoc {
    /// The error for data that ends inside this record.
    pub(crate) fn truncated(&self) -> SnapshotError {
        SnapshotError::truncated(self.offset, format!("it ends inside {self}"))
    }

    /// The error for a body whose checksum does not match.
    pub(crate) fn bad_checksum(&self) -> SnapshotError {
        SnapshotError::corrupt(self.offset, format!("{self} fails its checksum"))
    }
}

/// A record header whose own checksum has been verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub ty: RecordType,
    pub flags: u32,
    pub length: u64,
    pub body_crc: u32,
}

impl RecordHeader {
    pub(crate) fn new(ty: RecordType, length: u64, body_crc: u32) -> Self {
        RecordHeader {
            ty,
            flags: 0,
            length,
            body_crc,
        }
    }

    pub(crate) fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.0.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the record header of record number `seq` found at `offset`.
    ///
    /// Its checksum is checked before anything in it is believed; then its flags, its type
    /// (unknown mandatory types are refused) and its length against the type's limit.
    pub(crate) fn decode(
        b: &[u8; RECORD_HEADER_LEN],
        seq: u64,
        offset: u64,
    ) -> Result<(RecordHeader, RecordLoc), SnapshotError> {
        if crc32c::crc32c(&b[0..20]) != le_u32(b, 20) {
            return Err(SnapshotError::corrupt(
                offset,
                format!("the header of record {seq} at offset {offset} fails its checksum"),
            ));
        }
        let h = RecordHeader {
            ty: RecordType(le_u32(b, 0)),
            flags: le_u32(b, 4),
            length: le_u64(b, 8),
            body_crc: le_u32(b, 16),
        };
        let loc = RecordLoc {
            seq,
            ty: h.ty,
            offset,
        };
        h.check(&loc)?;
        Ok((h, loc))
    }

    fn check(&self, loc: &RecordLoc) -> Result<(), SnapshotError> {
        if self.flags != 0 {
            let detail = format!(
                "has flags {:#x}, which format version 1 does not define",
                self.flags
            );
            return Err(Fault::Corrupt(detail).at(loc));
        }
        if !self.ty.is_known() && !self.ty.is_optional() {
            return Err(SnapshotError::UnknownMandatory {
                ty: self.ty.0,
                offset: loc.offset,
            });
        }
        if self.ty == RecordType::END && self.length != 8 {
            let detail = format!("is {} bytes long instead of 8", self.length);
            return Err(Fault::Corrupt(detail).at(loc));
        }
        let limit = self.ty.body_limit();
        if self.length > limit {
            let detail = format!(
                "declares a body of {}; the limit is {}",
                size(self.length),
                size(limit)
            );
            return Err(Fault::TooLarge(detail).at(loc));
        }
        Ok(())
    }
}

/// A byte count for messages: "16 MiB" when it is a whole number of KiB, MiB, GiB or TiB,
/// else "1234567 bytes".
pub(crate) fn size(n: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, unit) in UNITS {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

/// Splits a DEVICE body into the device's id and its state.
pub(crate) fn parse_device(body: &[u8]) -> Result<(&str, &[u8]), String> {
    if body.len() < 2 {
        return Err("the DEVICE body is too short for its id length".into());
    }
    let id_len = usize::from(u16::from_le_bytes([body[0], body[1]]));
    if id_len == 0 || id_len > MAX_DEVICE_ID_LEN {
        return Err(format!(
            "the device id is {id_len} bytes long (1 to 64 allowed)"
        ));
    }
    let rest = &body[2..];
    if rest.len() < id_len {
        return Err("the device id runs past the end of the record".into());
    }
    let (id, state) = rest.split_at(id_len);
    let id = std::str::from_utf8(id).map_err(|_| "the device id is not UTF-8".to_string())?;
    Ok((id, state))
}

/// The two bytes before a device id in a DEVICE body, or why the id is not acceptable.
pub(crate) fn device_prefix(id: &str) -> Result<[u8; 2], String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!(
            "device id {id:?} is {} bytes long (1 to 64 allowed)",
            id.len()
        ));
    }
    Ok((id.len() as u16).to_le_bytes())
}

/// Checks a body of a known non-PAGES type beyond its checksum: the structure of DEVICE and
/// END records and the text of NOTE records. `count` is the number of records before this one.
pub(crate) fn check_body(ty: RecordType, body: &[u8], count: u64) -> Result<(), Fault> {
    match ty {
        RecordType::DEVICE => parse_device(body).map(|_| ()).map_err(Fault::Corrupt),
        RecordType::ZEROS | RecordType::MISSING => crate::pages::parse_zeros(body).map(|_| ()),
        RecordType::DISK => crate::disk::parse_disk(body).map(|_| ()),
        RecordType::DISK_ZEROS => crate::disk::parse_disk_zeros(body).map(|_| ()),
        RecordType::NOTE => std::str::from_utf8(body)
            .map(|_| ())
            .map_err(|_| Fault::Corrupt("the note is not UTF-8".into())),
        RecordType::MARK if body.len() != 8 => Err(Fault::Corrupt(format!(
            "is {} bytes long instead of 8",
            body.len()
        ))),
        RecordType::END => {
            if body.len() != 8 {
                return Err(Fault::Corrupt(format!(
                    "is {} bytes long instead of 8",
                    body.len()
                )));
            }
            let said = le_u64(body, 0);
            if said != count {
                return Err(Fault::Corrupt(format!(
                    "says {said} records precede it, but {count} do"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Little-endian `u32` at `at`; callers have checked the length.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Little-endian `u64` at `at`; callers have checked the length.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for aligned in [false, true] {
            let h = Header {
                version: 1,
                aligned,
            };
            assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn header_prefixes() {
        let b = Header {
            version: 1,
            aligned: true,
        }
        .encode();
        assert!(matches!(Header::decode(&[]), Err(SnapshotError::NotTern)));
        for n in 1..HEADER_LEN {
            assert!(matches!(
                Header::decode(&b[..n]),
                Err(SnapshotError::Truncated { .. })
            ));
        }
        assert!(matches!(
            Header::decode(b"TERNSNAX"),
            Err(SnapshotError::NotTern)
        ));
    }

    #[test]
    fn newer_version_wins_over_checksum() {
        let mut b = Header {
            version: 1,
            aligned: false,
        }
        .encode();
        b[8] = 3;
        match Header::decode(&b[..12]) {
            Err(SnapshotError::UnsupportedVersion { found }) => assert_eq!(found, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn record_header_round_trip() {
        let h = RecordHeader::new(RecordType::VCPU, 1234, 0xdead_beef);
        let (d, loc) = RecordHeader::decode(&h.encode(), 3, 100).unwrap();
        assert_eq!(d, h);
        assert_eq!(loc.to_string(), "record 3 (VCPU) at offset 100");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size((16 << 30) + (64 << 20)), "16448 MiB");
        assert_eq!(size(u64::MAX), "18446744073709551615 bytes");
        assert_eq!(size(0), "0 bytes");
    }

    #[test]
    fn record_type_names() {
        assert_eq!(RecordType::NOTE.to_string(), "NOTE");
        assert!(RecordType::NOTE.is_optional());
        assert_eq!(RecordType(0x8000_0009).to_string(), "type 0x80000009");
        assert_eq!(RecordType::MISSING.name(), "MISSING");
        assert_eq!(RecordType::DISK.name(), "DISK");
        assert_eq!(RecordType(12).name(), "unknown");
    }

    #[test]
    fn device_bodies() {
        let mut body = device_prefix("serial0").unwrap().to_vec();
        body.extend_from_slice(b"serial0state");
        assert_eq!(parse_device(&body).unwrap(), ("serial0", &b"state"[..]));
        assert!(device_prefix("").is_err());
        assert!(device_prefix(&"x".repeat(65)).is_err());
        assert!(parse_device(&[0, 0]).is_err());
        assert!(parse_device(&[5, 0, b'a']).is_err());
        assert!(parse_device(&[1, 0, 0xff]).is_err());
    }
}
