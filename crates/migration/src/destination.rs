//! The receiving side of a migration: the record stream into guest memory, then the handover.
//!
//! The stream is hostile until proven otherwise: every record is verified before it is used
//! (the stream reader checks all checksums), pages must land inside guest RAM, and the INFO
//! record must describe the guest that was offered. Nothing of what arrives runs until the
//! source says `Go`.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use tern_snapshot::{split_device, Info, RecordType, StreamItem, StreamReader, PAGE_SIZE};

use crate::disks::DiskTarget;
use crate::error::MigrationError;
use crate::memory::{guest_slice, PageSet, RamRegion};
use crate::protocol::{Offer, ToDestination, ToSource};
use crate::transport::{Channel, Transport};
use crate::STALL_TIMEOUT;

/// What a ZEROS record writes, page by page.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Most pages in one PAGES record a destination accepts (64 MiB). The source sends 256 pages
/// (1 MiB) a record; the margin leaves room for a later source, and the limit bounds what a
/// peer can make the destination buffer before it writes a record's pages.
pub const MAX_RECORD_PAGES: u64 = 16 << 10;
/// Most bytes of MACHINE, VCPU and DEVICE bodies a destination keeps (a guest's real state is
/// a few hundred KiB).
pub const MAX_STATE_BYTES: usize = 64 << 20;
/// Most DEVICE records in a stream.
pub const MAX_DEVICES: usize = 256;
/// Most MISSING records in a stream (the source sends up to 65,536 runs a record).
pub const MAX_MISSING_RECORDS: usize = 256;

/// Everything a stream carried besides the pages, which are in guest memory already.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Received {
    /// The stream's format version (it says how the state records are encoded).
    pub format: u32,
    pub machine: Vec<u8>,
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(String, Vec<u8>)>,
    /// Pages written with data, counting each time a page came.
    pub pages: u64,
    pub zero_pages: u64,
    /// Post-copy: the pages still to come after the handover (from MISSING records), if the
    /// stream had any.
    pub missing: Option<PageSet>,
    /// Disk data bytes written (`--copy-storage`), counting each time a block came.
    pub disk_bytes: u64,
}

impl<T: Transport> Read for Channel<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader().read(buf)
    }
}

/// Where a stream is in the order the protocol gives its records: INFO, CONFIG, then rounds of
/// PAGES, ZEROS and MARK, then MACHINE, the VCPUs, the DEVICEs and END. (NOTE and unknown
/// optional records may come anywhere; the reader skips the latter.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Info,
    Config,
    Pages,
    Vcpus,
    Devices,
}

/// Reads the record stream that follows an accepted offer into guest memory `regions`, until
/// END. Acknowledges every MARK once the pages before it are in. `keep_going` is asked between
/// records; an error from it ends the transfer.
///
/// The peer is not trusted: besides the reader's checks (checksums, lengths, the format's
/// limits), pages must lie in `regions` and come in records of at most [`MAX_RECORD_PAGES`],
/// records must come in the protocol's order (each of INFO, CONFIG and MACHINE once, one VCPU
/// per offered vCPU, each device once, MARKs increasing), INFO and CONFIG must describe the
/// offered guest, and the state kept is bounded by [`MAX_STATE_BYTES`] and [`MAX_DEVICES`].
/// The bodies of MACHINE, VCPU and DEVICE records stay opaque here: the machine and its
/// devices check them when they load them.
pub fn receive<T: Transport>(
    ch: &mut Channel<T>,
    regions: &[RamRegion],
    offer: &Offer,
    keep_going: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Received, MigrationError> {
    receive_with_disks(ch, regions, None, offer, keep_going)
}

/// [`receive`], with the guest's disks arriving too (`--copy-storage`) into `disks`: DISK and
/// DISK_ZEROS records must name a disk the offer copies and stay within its size; what
/// arrived is made durable at every MARK and at END (so the last sync, inside the downtime,
/// has only the last round to write).
pub fn receive_with_disks<T: Transport>(
    ch: &mut Channel<T>,
    regions: &[RamRegion],
    mut disks: Option<&mut dyn DiskTarget>,
    offer: &Offer,
    keep_going: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Received, MigrationError> {
    let sizes = disks.as_ref().map(|d| d.sizes()).unwrap_or_default();
    let offered: Vec<u64> = offer.copy_disks.iter().map(|d| d.size).collect();
    if sizes != offered {
        return Err(MigrationError::Vm(format!(
            "the offer copies disks of {offered:?} bytes; this side has {sizes:?}"
        )));
    }
    ch.transport()
        .set_read_timeout(Some(STALL_TIMEOUT))
        .map_err(|e| MigrationError::io("set a timeout", e))?;
    let mut reader = StreamReader::new(&mut *ch).map_err(MigrationError::from_stream)?;
    reader.limit_pages(
        regions
            .iter()
            .map(|r| r.first_pfn()..r.first_pfn().saturating_add(r.pages()))
            .collect(),
        MAX_RECORD_PAGES,
    );
    reader.limit_disks(sizes);
    let format = reader.header().version;
    if format != offer.stream_format {
        return Err(MigrationError::Protocol(format!(
            "the stream has format version {format}, the offer said {}",
            offer.stream_format
        )));
    }
    let vcpus = offer.vcpu_cpuid.len();
    let mut got = Received {
        format,
        ..Received::default()
    };
    let mut phase = Phase::Info;
    let mut last_mark: Option<u64> = None;
    let mut state_bytes = 0usize;
    let mut missing_records = 0usize;
    while let Some(item) = reader.next().map_err(MigrationError::from_stream)? {
        keep_going().map_err(MigrationError::Cancelled)?;
        match item {
            StreamItem::Pages { runs, data } => {
                expect(phase, Phase::Pages, RecordType::PAGES)?;
                before_missing(&got, RecordType::PAGES)?;
                let mut off = 0usize;
                for run in &runs {
                    let len = run.pages as usize * PAGE_SIZE;
                    let dst = guest_slice(regions, run.first_pfn, u64::from(run.pages))
                        .ok_or_else(|| outside(run.first_pfn))?;
                    let src = off
                        .checked_add(len)
                        .and_then(|end| data.get(off..end))
                        .ok_or_else(|| {
                            MigrationError::Protocol("a PAGES record is short of data".into())
                        })?;
                    // `dst` is exactly `len` bytes of guest RAM (checked), which no vCPU runs
                    // on yet.
                    dst.copy_from(src);
                    off += len;
                    got.pages += u64::from(run.pages);
                }
                reader.recycle(data);
            }
            StreamItem::Zeros { runs } => {
                expect(phase, Phase::Pages, RecordType::ZEROS)?;
                before_missing(&got, RecordType::ZEROS)?;
                for run in &runs {
                    let dst = guest_slice(regions, run.first_pfn, u64::from(run.pages))
                        .ok_or_else(|| outside(run.first_pfn))?;
                    for page in 0..run.pages as usize {
                        dst.subslice(page * PAGE_SIZE, PAGE_SIZE)
                            .map_err(|e| MigrationError::Protocol(format!("zero pages: {e}")))?
                            .copy_from(&ZERO_PAGE[..]);
                    }
                    got.zero_pages += u64::from(run.pages);
                }
            }
            StreamItem::Disk { disk, offset, data } => {
                expect(phase, Phase::Pages, RecordType::DISK)?;
                before_missing(&got, RecordType::DISK)?;
                // The reader checked `disk` and the extent against the sizes given.
                if let Some(target) = disks.as_deref_mut() {
                    target
                        .write(disk, offset, &data)
                        .map_err(|e| MigrationError::Vm(format!("disk {disk}: {e}")))?;
                }
                got.disk_bytes += data.len() as u64;
            }
            StreamItem::DiskZeros { disk, runs } => {
                expect(phase, Phase::Pages, RecordType::DISK_ZEROS)?;
                before_missing(&got, RecordType::DISK_ZEROS)?;
                if let Some(target) = disks.as_deref_mut() {
                    for run in runs {
                        target
                            .zero(disk, run)
                            .map_err(|e| MigrationError::Vm(format!("disk {disk}: {e}")))?;
                    }
                }
            }
            StreamItem::Missing { runs } => {
                expect(phase, Phase::Pages, RecordType::MISSING)?;
                if !offer.postcopy {
                    return Err(MigrationError::Protocol(
                        "the stream has a MISSING record, but the offer was not for post-copy"
                            .into(),
                    ));
                }
                missing_records += 1;
                if missing_records > MAX_MISSING_RECORDS {
                    return Err(MigrationError::Protocol(format!(
                        "the stream has more than {MAX_MISSING_RECORDS} MISSING records"
                    )));
                }
                let set = got.missing.get_or_insert_with(|| PageSet::empty(regions));
                for run in &runs {
                    if !set.insert_run(run.first_pfn, u64::from(run.pages)) {
                        return Err(outside(run.first_pfn));
                    }
                }
            }
            StreamItem::Record { ty, body } => match ty {
                RecordType::INFO => {
                    expect(phase, Phase::Info, ty)?;
                    check_info(&body, offer)?;
                    phase = Phase::Config;
                }
                RecordType::CONFIG => {
                    expect(phase, Phase::Config, ty)?;
                    check_config(&body, offer)?;
                    phase = Phase::Pages;
                }
                RecordType::MARK => {
                    expect(phase, Phase::Pages, ty)?;
                    before_missing(&got, ty)?;
                    let seq = u64::from_le_bytes(body.as_slice().try_into().map_err(|_| {
                        MigrationError::Protocol("a MARK record is not 8 bytes long".into())
                    })?);
                    if last_mark.is_some_and(|last| seq <= last) {
                        return Err(MigrationError::Protocol(format!(
                            "MARK {seq} comes after MARK {}",
                            last_mark.unwrap_or_default()
                        )));
                    }
                    last_mark = Some(seq);
                    sync_disks(&mut disks)?;
                    reader.get_mut().send(&ToSource::Marked { seq })?;
                }
                RecordType::MACHINE => {
                    expect(phase, Phase::Pages, ty)?;
                    keep_state(&mut state_bytes, &body)?;
                    got.machine = body;
                    phase = Phase::Vcpus;
                }
                RecordType::VCPU => {
                    expect(phase, Phase::Vcpus, ty)?;
                    if got.vcpus.len() >= vcpus {
                        return Err(MigrationError::Protocol(format!(
                            "the stream has more VCPU records than the guest's {vcpus} vCPUs"
                        )));
                    }
                    keep_state(&mut state_bytes, &body)?;
                    got.vcpus.push(body);
                }
                RecordType::DEVICE => {
                    if phase == Phase::Vcpus && got.vcpus.len() == vcpus {
                        phase = Phase::Devices;
                    }
                    expect(phase, Phase::Devices, ty)?;
                    let (id, state) = split_device(&body).map_err(MigrationError::Stream)?;
                    if got.devices.iter().any(|(known, _)| known == id) {
                        return Err(MigrationError::Protocol(format!(
                            "the stream has two DEVICE records for {id:?}"
                        )));
                    }
                    if got.devices.len() >= MAX_DEVICES {
                        return Err(MigrationError::Protocol(format!(
                            "the stream has more than {MAX_DEVICES} DEVICE records"
                        )));
                    }
                    keep_state(&mut state_bytes, state)?;
                    got.devices.push((id.to_string(), state.to_vec()));
                }
                // NOTE: a comment, allowed anywhere.
                _ => {}
            },
        }
    }
    let complete = match phase {
        Phase::Vcpus => got.vcpus.len() == vcpus,
        Phase::Devices => true,
        Phase::Info | Phase::Config | Phase::Pages => false,
    };
    if !complete {
        let what = match phase {
            Phase::Info => "the stream has no INFO record".to_string(),
            Phase::Config => "the stream has no CONFIG record".to_string(),
            Phase::Pages => "the stream ended without the machine state".to_string(),
            Phase::Vcpus | Phase::Devices => format!(
                "the stream ended with {} of the guest's {vcpus} VCPU records",
                got.vcpus.len()
            ),
        };
        return Err(MigrationError::Protocol(what));
    }
    sync_disks(&mut disks)?;
    Ok(got)
}

/// Makes the disk data that arrived durable.
fn sync_disks(disks: &mut Option<&mut dyn DiskTarget>) -> Result<(), MigrationError> {
    match disks.as_deref_mut() {
        Some(target) => target
            .sync()
            .map_err(|e| MigrationError::Vm(format!("cannot sync the disks: {e}"))),
        None => Ok(()),
    }
}

/// A record of type `ty` may come only in phase `wanted`.
fn expect(phase: Phase, wanted: Phase, ty: RecordType) -> Result<(), MigrationError> {
    if phase == wanted {
        return Ok(());
    }
    let why = match phase {
        Phase::Info => "before INFO, which comes first",
        Phase::Config => "before CONFIG, which follows INFO",
        Phase::Pages => match ty {
            RecordType::INFO | RecordType::CONFIG => "twice",
            _ => "before the MACHINE record",
        },
        Phase::Vcpus => match ty {
            RecordType::DEVICE => "before all VCPU records",
            RecordType::MACHINE => "twice",
            _ => "after the machine state",
        },
        Phase::Devices => "after the DEVICE records",
    };
    Err(MigrationError::Protocol(format!(
        "the stream has a {ty} record {why}"
    )))
}

/// Pages, zeros and marks come before the MISSING records: once the source named what is
/// missing, the rounds are over.
fn before_missing(got: &Received, ty: RecordType) -> Result<(), MigrationError> {
    if got.missing.is_some() {
        return Err(MigrationError::Protocol(format!(
            "the stream has a {ty} record after a MISSING record"
        )));
    }
    Ok(())
}

/// Counts `body` against [`MAX_STATE_BYTES`].
fn keep_state(total: &mut usize, body: &[u8]) -> Result<(), MigrationError> {
    *total = total.saturating_add(body.len());
    if *total > MAX_STATE_BYTES {
        return Err(MigrationError::Protocol(format!(
            "the stream's machine state is larger than {} MiB",
            MAX_STATE_BYTES >> 20
        )));
    }
    Ok(())
}

fn outside(pfn: u64) -> MigrationError {
    MigrationError::Protocol(format!("page {pfn:#x} is outside the guest's RAM"))
}

/// The stream's INFO must describe the offered guest.
fn check_info(body: &[u8], offer: &Offer) -> Result<(), MigrationError> {
    let info = Info::from_json(body)
        .map_err(|e| MigrationError::Protocol(format!("the INFO record is malformed: {e}")))?;
    let o = &offer.info;
    if info.guest_uuid != o.guest_uuid
        || info.memory_bytes != o.memory_bytes
        || info.vcpus != o.vcpus
    {
        return Err(MigrationError::Protocol(
            "the stream describes another guest than the one offered".into(),
        ));
    }
    Ok(())
}

/// The stream's CONFIG must be the offered config.
fn check_config(body: &[u8], offer: &Offer) -> Result<(), MigrationError> {
    let config: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| MigrationError::Protocol(format!("the CONFIG record is malformed: {e}")))?;
    if config != offer.config {
        return Err(MigrationError::Protocol(
            "the stream's CONFIG differs from the offered config".into(),
        ));
    }
    Ok(())
}

/// Tells the source that the complete state is loaded, then waits for `Go`; returns whether
/// the guest is to resume. Any failure means the guest must not run here.
pub fn ready_and_wait_for_go<T: Transport>(
    ch: &mut Channel<T>,
    timeout: Duration,
) -> Result<bool, MigrationError> {
    ch.send(&ToSource::Ready)?;
    match ch.receive::<ToDestination>(timeout)? {
        ToDestination::Go { resume } => Ok(resume),
        other => Err(MigrationError::Protocol(format!(
            "expected Go, got {other:?}"
        ))),
    }
}

/// Confirms that the guest runs here; `go` is when `Go` arrived, `resumed` when the vCPUs ran.
pub fn confirm_running<T: Transport>(
    ch: &mut Channel<T>,
    go: Instant,
    resumed: Instant,
    resumed_unix_ns: u64,
) -> Result<(), MigrationError> {
    let msg = ToSource::Running {
        resume_us: resumed.duration_since(go).as_micros() as u64,
        reply_us: go.elapsed().as_micros() as u64,
        resumed_unix_ns,
    };
    ch.send(&msg)
}

/// Gives up: tells the source why (if it still listens) and lets the connection go without
/// resetting it under a message the source has not read yet.
pub fn abort<T: Transport>(ch: &mut Channel<T>, reason: &str) {
    let _ = ch.send(&ToSource::Abort {
        reason: reason.to_string(),
    });
    ch.transport().finish_writing();
    ch.drain(Duration::from_secs(2));
}
