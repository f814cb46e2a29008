//! Receiving a guest from another host. The daemon accepted the offer and started this process
//! with the connection as an inherited descriptor; the machine is built (paused, with the
//! CPUID the guest was started with) before the first page arrives, so that building it costs
//! no downtime.
//!
//! The guest runs here only once the source says `Go`. Before that, any failure (the stream
//! breaks or is bad, the daemon here goes away, the guest is destroyed here) ends this process
//! with nothing left behind, and the source keeps its guest.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_api::vmm::VmmEvent;
use tern_devices::serial::ConsoleOut;
use tern_devices::state::StateEncoding;
use tern_machine::{Machine, MachineState};
use tern_migration::destination::{self, Received};
use tern_migration::link::{self, Link, LinkSecurity, Security};
use tern_migration::transport::{tune_tcp, Channel};
use tern_migration::{DiskTarget, MigrationError, Offer, PageSet, RamRegion, HANDOVER_TIMEOUT};

use crate::devices::GuestDisk;
use crate::disk_copy::ArrivingDisks;
use crate::lifecycle::{Event, State};
use crate::postcopy_in::{self, Postcopy};
use crate::record::{DomainRecord, IncomingState};
use crate::{MainEvent, Vmm};

/// How long the daemon may take to attach to this process before the handover.
const DAEMON_ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to say whether the guest may arrive (etcd reads, each endpoint
/// tried in turn).
const ARRIVAL_DECISION_TIMEOUT: Duration = Duration::from_secs(20);

/// An incoming migration waiting for its stream.
pub(crate) struct Incoming {
    /// The connection, until the stream's session is established on it.
    connection: Option<TcpStream>,
    security: LinkSecurity,
    channel: Option<Channel<Link>>,
    offer: Offer,
    source: String,
    state_file: PathBuf,
    /// Post-copy: the pages still to come, once the stream named them.
    postcopy: Option<Postcopy>,
    /// The guest's disks arriving in the stream (`--copy-storage`), under temporary names
    /// until `Go`; removed if the migration fails.
    disks: Option<ArrivingDisks>,
    /// Ask the daemon before `Ready` (it keeps the guest's ownership in a pool).
    ask_arrival: bool,
}

impl Incoming {
    /// The source host.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }
}

/// Takes the inherited connection and builds the machine the guest will arrive in (its copied
/// disks, if any, open at their temporary names).
pub(crate) fn prepare(
    record: &DomainRecord,
    console: ConsoleOut,
) -> anyhow::Result<(Machine, Incoming, Vec<GuestDisk>)> {
    let spec = record
        .incoming
        .as_ref()
        .context("no incoming migration to receive")?;
    let stream = inherited_socket(spec.fd)?;
    tune_tcp(&stream).context("cannot set up the migration connection")?;
    let offer = spec.offer.clone();
    if offer.info.memory_bytes != record.config.memory_mib << 20 {
        bail!("the offered guest's memory does not match its config");
    }
    let cpuids = offer
        .vcpu_cpuid
        .iter()
        .map(|entries| entries.iter().map(crate::cpuid::to_kvm).collect())
        .collect();
    let (disks, arriving) = if offer.copy_disks.is_empty() {
        (None, record.clone())
    } else {
        let (disks, arriving) = ArrivingDisks::prepare(record, &offer)?;
        (Some(disks), arriving)
    };
    let mut built = crate::devices::build(&arriving)?;
    // The images get their final names at the handover: a later move reads them there.
    for (disk, spec) in built.disks.iter_mut().zip(&record.config.disks) {
        disk.spec = spec.clone();
    }
    let mut machine = Machine::new_blank(record.config.memory_mib, cpuids, console, built.virtio)?;
    machine.start(true)?;
    IncomingState::Receiving.store(&spec.state_file)?;
    Ok((
        machine,
        Incoming {
            connection: Some(stream),
            security: spec.security.clone(),
            channel: None,
            offer,
            source: spec.source.clone(),
            state_file: spec.state_file.clone(),
            postcopy: None,
            disks,
            ask_arrival: spec.ask_arrival,
        },
        built.disks,
    ))
}

/// The connection the daemon passed as descriptor `fd`, checked to be a socket and kept from
/// any child process.
fn inherited_socket(fd: i32) -> anyhow::Result<TcpStream> {
    // SAFETY: fstat fills a stat struct for a descriptor number; an invalid one fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 3
        || unsafe { libc::fstat(fd, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
    {
        bail!("descriptor {fd} is not the migration connection");
    }
    // SAFETY: the daemon passed this descriptor for us alone; it is a connected TCP socket.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: setting FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(stream)
}

/// Receives the guest, waits for `Go` and runs it; or gives up and ends this process.
pub(crate) fn run(vmm: &Arc<Vmm>, mut job: Incoming) {
    let started = Instant::now();
    match receive(vmm, &mut job) {
        Ok(resume) => commit(vmm, &mut job, resume),
        Err(e) => {
            let reason = format!("{e:#}");
            log::warn!(
                "incoming migration from {} failed after {:.3} s: {reason}",
                job.source,
                started.elapsed().as_secs_f64()
            );
            if let Err(e) = IncomingState::Aborted.store(&job.state_file) {
                log::error!("{e:#}");
            }
            if let Some(channel) = job.channel.as_mut() {
                destination::abort(channel, &reason);
            }
            let _ = vmm.life.apply(Event::IncomingAborted);
            let _ = vmm.main.send(MainEvent::IncomingAborted(reason));
        }
    }
}

/// Everything up to `Go`: the stream, the state loaded into the paused machine, `Ready`.
/// Returns whether the source wants the guest resumed.
fn receive(vmm: &Vmm, job: &mut Incoming) -> anyhow::Result<bool> {
    let regions = regions(&vmm.machine());
    let connection = job
        .connection
        .take()
        .context("the migration connection is gone")?;
    // The source starts this session once the daemon here accepted its offer.
    let security = Security::load(&job.security)?;
    let channel = job
        .channel
        .insert(Channel::new(link::accept_stream(connection, &security)?));
    let t = Instant::now();
    let mut keep_going = || still_wanted(vmm);
    let disks = job.disks.as_mut().map(|d| d as &mut dyn DiskTarget);
    let mut received =
        destination::receive_with_disks(channel, &regions, disks, &job.offer, &mut keep_going)?;
    let streamed = t.elapsed();
    load(&vmm.machine(), &received)?;
    if let Some(missing) = received.missing.take().filter(|m| !m.is_empty()) {
        job.postcopy = Some(prepare_postcopy(vmm, missing)?);
    }
    log::info!(
        "incoming: {} pages ({} zeroed) in {:.3} s, state loaded in {:.1} ms",
        received.pages,
        received.zero_pages,
        streamed.as_secs_f64(),
        (t.elapsed() - streamed).as_secs_f64() * 1e3
    );
    wait_for_daemon(vmm)?;
    if job.ask_arrival {
        may_arrive(vmm, &job.offer.migration_id)?;
    }
    IncomingState::Ready.store(&job.state_file)?;
    Ok(destination::ready_and_wait_for_go(
        channel,
        HANDOVER_TIMEOUT,
    )?)
}

/// Post-copy: the pages of `missing` are still to come; the guest will fault on them.
fn prepare_postcopy(vmm: &Vmm, missing: PageSet) -> anyhow::Result<Postcopy> {
    let pages = missing.count();
    let prepared = postcopy_in::prepare(&vmm.machine(), missing)?;
    log::info!("incoming: post-copy, {pages} pages to come after the handover");
    Ok(prepared)
}

/// `Go` arrived: the guest is this host's. Record it, run it, tell the daemon and the source;
/// in post-copy, then serve its faults until every page is here.
fn commit(vmm: &Vmm, job: &mut Incoming, resume: bool) {
    let go = Instant::now();
    let postcopy = job.postcopy.take();
    let Some(ch) = job.channel.as_mut() else {
        return;
    };
    let committed = if postcopy.is_some() {
        IncomingState::Postcopy
    } else {
        IncomingState::Committed
    };
    if let Err(e) = committed.store(&job.state_file) {
        // Without the record the daemon could not vouch for the guest: do not run it.
        let reason = format!("cannot record the handover: {e:#}");
        log::error!("{reason}");
        let _ = IncomingState::Aborted.store(&job.state_file);
        destination::abort(ch, &reason);
        let _ = vmm.life.apply(Event::IncomingAborted);
        let _ = vmm.main.send(MainEvent::IncomingAborted(reason));
        return;
    }
    if let Some(disks) = job.disks.take() {
        // Synced at END; only the names change now.
        if let Err(e) = disks.commit() {
            log::error!("the arrived guest's disks keep their temporary names: {e:#}");
        }
    }
    // Running (or paused, if it was paused on the source) unless destroyed meanwhile; a
    // post-copy guest runs (only running guests are sent in post-copy).
    let event = if postcopy.is_some() {
        Event::IncomingPostcopy
    } else {
        Event::IncomingCommitted { resume }
    };
    let _ = vmm.life.apply(event);
    {
        let mut machine = vmm.machine();
        if matches!(vmm.life.state(), State::Running | State::PostcopyIn { .. }) {
            if let Err(e) = machine.resume() {
                log::error!("cannot run the arrived guest: {e}");
            }
        }
        machine.announce_restored();
    }
    let resumed = Instant::now();
    let resumed_unix_ns = tern_migration::source::unix_ns();
    vmm.notify_monitors(&VmmEvent::Committed);
    if let Err(e) = destination::confirm_running(ch, go, resumed, resumed_unix_ns) {
        // The guest is ours either way; the source finds out by asking.
        log::warn!("cannot confirm the handover to the source: {e}");
    }
    log::info!(
        "incoming migration handed over: running {:.2} ms after Go",
        resumed.duration_since(go).as_secs_f64() * 1e3
    );
    if let (Some(postcopy), Some(ch)) = (postcopy, job.channel.take()) {
        postcopy_in::serve(vmm, postcopy, ch, resumed, &job.state_file);
    }
}

/// Whether the migration may go on: the daemon is still here and nobody destroyed the guest.
fn still_wanted(vmm: &Vmm) -> Result<(), String> {
    if vmm.life.ending() {
        return Err("the arriving guest was destroyed on the destination".into());
    }
    if vmm.daemon_lost.load(Ordering::Acquire) {
        return Err("the destination's daemon went away".into());
    }
    Ok(())
}

/// The daemon attaches to this process right after it started; before the handover it must
/// be there (it answers the source's questions if the handover's end is lost).
fn wait_for_daemon(vmm: &Vmm) -> Result<(), MigrationError> {
    let deadline = Instant::now() + DAEMON_ATTACH_TIMEOUT;
    loop {
        still_wanted(vmm).map_err(MigrationError::Cancelled)?;
        if vmm.monitors_open.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Cancelled(
                "the destination's daemon did not attach to the arriving guest".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asks the daemon whether the guest may arrive here (in a pool: whether this host can reach
/// etcd and may own it); a refusal ends the migration with the guest still on the source.
fn may_arrive(vmm: &Vmm, migration_id: &str) -> Result<(), MigrationError> {
    let question = VmmEvent::MayArrive {
        migration_id: migration_id.to_string(),
    };
    match vmm.ask_daemon(&question, ARRIVAL_DECISION_TIMEOUT) {
        Ok(tern_api::vmm::VmmRequest::HandoverDecision { allowed: true, .. }) => Ok(()),
        Ok(tern_api::vmm::VmmRequest::HandoverDecision { reason, .. }) => {
            Err(MigrationError::Cancelled(format!(
                "the destination may not take the guest: {}",
                reason.unwrap_or_else(|| "no reason given".into())
            )))
        }
        Ok(other) => Err(MigrationError::Cancelled(format!(
            "the destination's daemon answered {other:?}"
        ))),
        Err(e) => Err(MigrationError::Cancelled(e)),
    }
}

/// The machine's RAM slots as the migration engine sees them.
pub(crate) fn regions(machine: &Machine) -> Vec<RamRegion> {
    machine
        .ram()
        .slots()
        .iter()
        .map(|s| RamRegion::new(s.mapping.clone()))
        .collect()
}

/// Loads the received machine state into the paused machine. The bodies come from the peer:
/// `MachineState` decodes them completely and the machine and its devices refuse what they
/// could not have produced (see `Machine::restore_state`).
fn load(machine: &Machine, received: &Received) -> anyhow::Result<()> {
    let encoding = StateEncoding::of_format(received.format)
        .with_context(|| format!("stream format {} is not supported", received.format))?;
    let state = MachineState::decode(
        encoding,
        &received.machine,
        &received.vcpus,
        received.devices.clone(),
    )?;
    machine.restore_state(state)?;
    Ok(())
}
