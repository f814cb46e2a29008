//! The receiving side of a migration: the record stream into guest memory, then the handover.
//!
//! The stream is hostile until proven otherwise: every record is verified before it is used
//! (the stream reader checks all checksums), pages must land inside guest RAM, and the INFO
//! record must describe the guest that was offered. Nothing of what arrives runs until the
//! source says `Go`.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use tern_snapshot::{split_device, Info, RecordType, StreamItem, StreamReader, PAGE_SIZE};

use crate::error::MigrationError;
use crate::memory::{host_range, RamRegion};
use crate::protocol::{Offer, ToDestination, ToSource};
use crate::transport::{Channel, Transport};
use crate::STALL_TIMEOUT;

const PAGE: u64 = PAGE_SIZE as u64;

/// Everything a stream carried besides the pages, which are in guest memory already.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Received {
    pub machine: Vec<u8>,
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(String, Vec<u8>)>,
    /// Pages written with data, counting each time a page came.
    pub pages: u64,
    pub zero_pages: u64,
}

impl<T: Transport> Read for Channel<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader().read(buf)
    }
}

/// Reads the record stream that follows an accepted offer into guest memory `regions`, until
/// END. Acknowledges every MARK once the pages before it are in. `keep_going` is asked between
/// records; an error from it ends the transfer.
pub fn receive<T: Transport>(
    ch: &mut Channel<T>,
    regions: &[RamRegion],
    offer: &Offer,
    keep_going: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Received, MigrationError> {
    ch.transport()
        .set_read_timeout(Some(STALL_TIMEOUT))
        .map_err(|e| MigrationError::io("set a timeout", e))?;
    let mut reader = StreamReader::new(&mut *ch).map_err(MigrationError::from_stream)?;
    let mut got = Received::default();
    let mut info_seen = false;
    while let Some(item) = reader.next().map_err(MigrationError::from_stream)? {
        keep_going().map_err(MigrationError::Cancelled)?;
        match item {
            StreamItem::Pages { runs, data } => {
                let mut off = 0usize;
                for run in &runs {
                    let len = run.pages as usize * PAGE_SIZE;
                    let dst = host_range(regions, run.first_pfn, u64::from(run.pages))
                        .ok_or_else(|| outside(run.first_pfn))?;
                    let src = data.get(off..off + len).ok_or_else(|| {
                        MigrationError::Protocol("a PAGES record is short of data".into())
                    })?;
                    // SAFETY: dst..dst+len lies in guest RAM (checked), which no vCPU runs on yet.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, len) };
                    off += len;
                    got.pages += u64::from(run.pages);
                }
                reader.recycle(data);
            }
            StreamItem::Zeros { runs } => {
                for run in &runs {
                    let dst = host_range(regions, run.first_pfn, u64::from(run.pages))
                        .ok_or_else(|| outside(run.first_pfn))?;
                    // SAFETY: as above.
                    unsafe {
                        std::ptr::write_bytes(
                            dst as *mut u8,
                            0,
                            (u64::from(run.pages) * PAGE) as usize,
                        )
                    };
                    got.zero_pages += u64::from(run.pages);
                }
            }
            StreamItem::Record { ty, body } => match ty {
                RecordType::INFO => {
                    check_info(&body, offer)?;
                    info_seen = true;
                }
                RecordType::MARK => {
                    let seq = u64::from_le_bytes(body.try_into().unwrap_or_default());
                    reader.get_mut().send(&ToSource::Marked { seq })?;
                }
                RecordType::MACHINE => got.machine = body,
                RecordType::VCPU => got.vcpus.push(body),
                RecordType::DEVICE => {
                    let (id, state) = split_device(&body).map_err(MigrationError::Stream)?;
                    got.devices.push((id.to_string(), state.to_vec()));
                }
                _ => {}
            },
        }
    }
    if !info_seen {
        return Err(MigrationError::Protocol(
            "the stream has no INFO record".into(),
        ));
    }
    if got.machine.is_empty() || got.vcpus.len() != offer.vcpu_cpuid.len() {
        return Err(MigrationError::Protocol(format!(
            "the stream ended without the machine state ({} of {} vCPUs)",
            got.vcpus.len(),
            offer.vcpu_cpuid.len()
        )));
    }
    Ok(got)
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
