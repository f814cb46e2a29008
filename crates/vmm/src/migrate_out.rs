//! Sending this guest to another host: the daemon opens the connection to the destination's
//! relocation server and hands it over; this process runs the migration engine on its own
//! machine and reports progress and the outcome back.
//!
//! The daemon must stay for the whole transfer: if its connection closes before the commit
//! point the migration is cancelled and the guest keeps running here (a restarted daemon
//! adopts it). After the commit point the migration completes without it.
//!
//! The user cancels a migration through the lifecycle (`Event::CancelMigration`, on another
//! control connection): the engine asks [`DaemonObserver`] between records and while it waits
//! for the destination, and at the commit point the observer moves the lifecycle past it in
//! one step or refuses because a cancel came first.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_api::vmm::VmmReply;
use tern_api::{write_message, MigrateOptions, MigrationProgress};
use tern_migration::link::{self, Link, LinkSecurity, Security};
use tern_migration::postcopy::{Redial, Redialed};
use tern_migration::source::{send_postcopy, Observer, Plan, SendError, SourceVm, StateRecords};
use tern_migration::transport::{tune_tcp, Channel};
use tern_migration::{
    protocol_for, Limits, MigrationError, Offer, Outcome, RamRegion, SourceDisk, ToDestination,
    ToSource, OFFER_TIMEOUT,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::disk_copy;
use crate::lifecycle::{Event, OutStage, ResolverStep, State, CANCELLED_ON_REQUEST};
use crate::{MainEvent, Vmm};

/// A migration the daemon asked for.
pub(crate) struct Request {
    pub destination: String,
    /// The destination's host as the user named it.
    pub server_name: String,
    pub migration_id: String,
    pub options: MigrateOptions,
    pub security: LinkSecurity,
    /// Ask the daemon at the commit point (it moves the guest's ownership in its pool).
    pub ask_handover: bool,
}

/// How long the daemon may take to decide a handover: an etcd transaction, read back if its
/// answer was lost, each call trying every endpoint. Longer than the daemon can take, so that
/// the daemon (or its death) decides, not this timeout.
const HANDOVER_DECISION_TIMEOUT: Duration = Duration::from_secs(90);

/// Serves a Migrate request: moves to `MigratingOut` (one check-and-set, so that of two
/// requests at once exactly one starts), takes the connection's descriptor, migrates, answers.
pub(crate) fn serve(
    vmm: &Arc<Vmm>,
    mut reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    request: Request,
) {
    let start = Event::Migrate {
        destination: request.destination.clone(),
        force: request.options.force,
    };
    let before = match vmm.life.apply(start) {
        Ok(before) => before,
        Err(message) => {
            let _ = write_message(&mut writer, &VmmReply::Error { message });
            return;
        }
    };
    if let State::Unresolved { destination, .. } = &before {
        log::warn!(
            "the migration to {destination} is unresolved; migrating to {} as forced",
            request.destination
        );
        crate::end_migration_leftovers(&mut vmm.machine());
    }
    let reply = match take_connection(&reader, &mut writer) {
        Ok(stream) => migrate(vmm, stream, &request, &mut reader, &mut writer),
        Err(e) => {
            let _ = vmm.life.apply(Event::MigrationFailed);
            VmmReply::Error {
                message: format!("{e:#}"),
            }
        }
    };
    let _ = write_message(&mut writer, &reply);
    if matches!(reply, VmmReply::Migrated(_)) {
        // The guest lives on the destination now.
        let _ = vmm.main.send(MainEvent::Migrated(request.destination));
    }
}

/// Says Ok, then receives the connection's descriptor with one byte.
pub(crate) fn take_connection(
    reader: &BufReader<UnixStream>,
    writer: &mut UnixStream,
) -> anyhow::Result<TcpStream> {
    write_message(writer, &VmmReply::Ok).context("the daemon went away")?;
    anyhow::ensure!(
        reader.buffer().is_empty(),
        "the daemon sent more than the request before the connection"
    );
    writer.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    let (n, file) = reader
        .get_ref()
        .recv_with_fd(&mut byte)
        .context("cannot receive the migration connection")?;
    writer.set_read_timeout(None)?;
    let file = file
        .filter(|_| n == 1)
        .context("the daemon sent no connection")?;
    // SAFETY: the descriptor was just received and is owned by nobody else; it is a TCP socket
    // the daemon connected.
    let stream = unsafe { TcpStream::from_raw_fd(file.into_raw_fd()) };
    tune_tcp(&stream).context("cannot set up the migration connection")?;
    Ok(stream)
}

fn migrate(
    vmm: &Arc<Vmm>,
    stream: TcpStream,
    request: &Request,
    answers: &mut BufReader<UnixStream>,
    daemon: &mut UnixStream,
) -> VmmReply {
    let mut images = Vec::new();
    let mut asked_handover = false;
    let result = plan(vmm, request).map(|(plan, disks)| {
        images = disks.iter().map(|d| d.path()).collect();
        let source = MachineSource { vmm, disks };
        let mut observer = DaemonObserver {
            vmm,
            daemon: &mut *daemon,
            answers: request.ask_handover.then_some(&mut *answers),
            asked_handover: &mut asked_handover,
            destination: &request.destination,
            migration_id: &request.migration_id,
        };
        offer_and_send(&source, stream, request, &plan, &mut observer)
    });
    if asked_handover && matches!(result, Ok(Err(SendError::Failed(_)))) {
        // The handover may have moved the guest's ownership, but no `Go` left: it stays here.
        vmm.stays_here(&request.migration_id);
    }
    match result {
        Err(e) => {
            let _ = vmm.life.apply(Event::MigrationFailed);
            error(format!("cannot migrate: {e:#}"))
        }
        Ok(Ok(summary)) => {
            log::info!(
                "migrated to {} in {:.3} s, downtime {:.1} ms",
                request.destination,
                summary.total_seconds,
                summary.downtime_ms
            );
            let _ = vmm.life.apply(Event::Migrated);
            let mut summary = summary;
            if request.options.remove_source_images {
                let removed = remove_images(&images);
                for disk in summary.disks.iter_mut().flat_map(|d| d.disks.iter_mut()) {
                    disk.source_removed = removed.contains(&disk.source_path);
                }
            }
            VmmReply::Migrated(Box::new(summary))
        }
        Ok(Err(SendError::Failed(e))) => {
            let before = vmm.life.apply(Event::MigrationFailed);
            let here = where_the_guest_stays(&vmm.life.state());
            if let Ok(State::MigratingOut {
                stage: OutStage::Cancelling,
                ..
            }) = before
            {
                log::info!(
                    "migration to {} cancelled on request ({e})",
                    request.destination
                );
                return error(format!(
                    "the migration of '{}' to {} was cancelled; {here}",
                    vmm.record.config.name, request.destination
                ));
            }
            log::warn!("migration to {} failed: {e}", request.destination);
            error(format!("the migration failed: {e}; {here}"))
        }
        Ok(Err(SendError::Lost(reason))) => {
            log::error!(
                "migration to {}: the destination lost the guest during post-copy: {reason}",
                request.destination
            );
            let _ = vmm.life.apply(Event::PostcopyLost {
                reason: reason.clone(),
            });
            let name = &vmm.record.config.name;
            error(format!(
                "the destination lost the guest during post-copy ({reason}): its state since \
                 the handover is gone. The last whole copy, from the handover, stays paused \
                 here; `tern unpause --force {name}` runs it (its disks may have moved on since)"
            ))
        }
        Ok(Err(SendError::Abandoned(reason))) => {
            log::warn!(
                "migration to {}: stopped serving post-copy: {reason}",
                request.destination
            );
            error(format!("post-copy stopped: {reason}"))
        }
        Ok(Err(SendError::Unresolved(e))) => {
            log::error!(
                "migration to {}: the destination did not confirm the handover: {e}",
                request.destination
            );
            let unresolved = Event::MigrationUnresolved {
                migration_id: request.migration_id.clone(),
            };
            if let Ok(State::MigratingOut { .. }) = vmm.life.apply(unresolved) {
                start_resolver(vmm, request);
            }
            error(format!(
                "the migration's outcome is unknown: {e}. The guest stays paused here and is \
                 never resumed on both hosts; tern asks {} until it knows (tern list shows it)",
                request.destination
            ))
        }
    }
}

/// Secures the connection, offers the guest and, once the destination accepts, sends it.
fn offer_and_send(
    source: &MachineSource,
    stream: TcpStream,
    request: &Request,
    plan: &Plan,
    observer: &mut DaemonObserver,
) -> Result<tern_api::MigrationSummary, SendError> {
    let security = Security::load(&request.security).map_err(SendError::Failed)?;
    if matches!(security, Security::Insecure) {
        log::warn!(
            "migrating to {} without authentication or encryption (insecure = true)",
            request.destination
        );
    }
    let mut ch = link::open(stream, &security, &request.server_name).map_err(SendError::Failed)?;
    let offer = ToDestination::Offer(Box::new(plan.offer.clone()));
    // The destination builds the guest's machine before it answers: a cancel is heard meanwhile.
    let answer = link::ask_unless(&mut ch, &offer, OFFER_TIMEOUT, || {
        observer.keep_going().map_err(MigrationError::Cancelled)
    });
    let destination_id = match answer {
        Ok(answer) => tern_migration::source::accepted(answer),
        Err(e) => Err(e),
    }
    .map_err(|e| SendError::Failed(postcopy_hint(e, plan.postcopy)))?;
    // A cancel that came with the answer: stop before the stream starts.
    observer
        .keep_going()
        .map_err(|reason| SendError::Failed(MigrationError::Cancelled(reason)))?;
    let stream =
        link::reopen_for_stream(ch, &security, &request.server_name).map_err(SendError::Failed)?;
    let mut redial = Redialer {
        destination: Destination::of(request),
        migration_id: request.migration_id.clone(),
    };
    let mut summary = send_postcopy(source, stream, destination_id, plan, observer, &mut redial)?;
    summary.insecure = matches!(security, Security::Insecure);
    Ok(summary)
}

/// The source's hint when a destination refuses a post-copy offer for its protocol version.
fn postcopy_hint(e: MigrationError, postcopy: bool) -> MigrationError {
    match e {
        MigrationError::Refused(reason) if postcopy && reason.contains("protocol version") => {
            MigrationError::Refused(format!(
                "{reason} (post-copy needs relocation protocol version 2 on both hosts: \
                 upgrade the destination, or migrate without --postcopy)"
            ))
        }
        other => other,
    }
}

/// Removes the disk images the guest left here when it moved with them; those removed.
fn remove_images(images: &[String]) -> Vec<String> {
    let mut removed = Vec::new();
    for image in images {
        match std::fs::remove_file(image) {
            Ok(()) => {
                log::info!("removed {image}: the guest's disk lives on the destination");
                removed.push(image.clone());
            }
            Err(e) => log::warn!("cannot remove {image}: {e}"),
        }
    }
    removed
}

fn error(message: String) -> VmmReply {
    VmmReply::Error { message }
}

/// Where the guest is after a migration that did not happen, in `state`.
fn where_the_guest_stays(state: &State) -> &'static str {
    match state {
        State::Paused => "the guest stays here, paused",
        State::Unresolved { .. } => {
            "the guest stays paused here (its earlier migration is still unresolved)"
        }
        State::Ending => "the guest is ending",
        _ => "the guest keeps running here",
    }
}

/// What to send: the offer from the running machine, and the user's options; the disks to
/// copy with it (`--copy-storage`).
fn plan(vmm: &Vmm, request: &Request) -> anyhow::Result<(Plan, Vec<Arc<dyn SourceDisk>>)> {
    let machine = vmm.machine();
    let mut config = vmm.record.config.clone();
    config.uuid = vmm.record.uuid.parse().ok();
    // Post-copy moves a running guest: a paused one goes warm.
    let postcopy = request.options.postcopy && request.options.live && !machine.is_paused();
    let disks = if request.options.copy_storage {
        disk_copy::copied(&vmm.disks)?
    } else {
        Vec::new()
    };
    let copy_disks = disk_copy::offered(&disks)?;
    let disks = disks
        .into_iter()
        .map(|d| Arc::new(d) as Arc<dyn SourceDisk>)
        .collect();
    let offer = Offer {
        protocol: protocol_for(postcopy, !copy_disks.is_empty()),
        stream_format: tern_snapshot::FORMAT_VERSION,
        migration_id: request.migration_id.clone(),
        live: request.options.live,
        postcopy,
        copy_disks,
        info: crate::save::guest_info(&machine, &vmm.record),
        config: serde_json::to_value(&config)?,
        vcpu_cpuid: machine
            .vcpu_cpuids()
            .iter()
            .map(|entries| entries.iter().map(crate::cpuid::from_kvm).collect())
            .collect(),
    };
    let limits = Limits {
        max_downtime: Duration::from_millis(request.options.max_downtime_ms),
        rate_limit: request.options.resource_mbit.map(|m| m * 1_000_000 / 8),
        ..Limits::default()
    };
    let plan = Plan {
        domain: vmm.record.config.name.clone(),
        destination: request.destination.clone(),
        offer,
        live: request.options.live,
        postcopy,
        limits,
    };
    Ok((plan, disks))
}

/// The engine's view of this process's machine.
struct MachineSource<'a> {
    vmm: &'a Vmm,
    /// The disks the offer copies.
    disks: Vec<Arc<dyn SourceDisk>>,
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl SourceVm for MachineSource<'_> {
    fn regions(&self) -> Vec<RamRegion> {
        crate::migrate_in::regions(&self.vmm.machine())
    }

    fn populated(&self) -> Result<Vec<std::ops::Range<u64>>, String> {
        crate::save::populated_pages(&self.vmm.machine()).map_err(|e| format!("{e:#}"))
    }

    fn is_paused(&self) -> bool {
        self.vmm.machine().is_paused()
    }

    fn pause(&self) -> Result<(), String> {
        self.vmm.machine().pause().map_err(msg)
    }

    fn resume(&self) -> Result<(), String> {
        self.vmm.machine().resume().map_err(msg)
    }

    fn start_dirty_log(&self) -> Result<(), String> {
        self.vmm.machine().start_dirty_log().map_err(msg)
    }

    fn stop_dirty_log(&self) -> Result<(), String> {
        self.vmm.machine().stop_dirty_log().map_err(msg)
    }

    fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, String> {
        self.vmm.machine().dirty_pages().map_err(msg)
    }

    fn rearm(&self, region: usize, first_page: u64, bits: &[u64]) -> Result<(), String> {
        self.vmm
            .machine()
            .rearm_dirty(region, first_page, bits)
            .map_err(msg)
    }

    fn set_throttle(&self, percent: u8) -> Result<(), String> {
        self.vmm.machine().set_throttle(percent).map_err(msg)
    }

    fn take_longest_throttle_hold(&self) -> Duration {
        self.vmm.machine().take_longest_throttle_hold()
    }

    fn copied_disks(&self) -> Vec<Arc<dyn SourceDisk>> {
        self.disks.clone()
    }

    fn capture(&self) -> Result<StateRecords, String> {
        let state = self.vmm.machine().save_state().map_err(msg)?;
        let records = state.encode().map_err(msg)?;
        Ok(StateRecords {
            machine: records.machine,
            vcpus: records.vcpus,
            devices: records.devices,
        })
    }
}

/// Reports to the daemon and stops the migration if the user cancels it, the daemon goes away
/// or the guest is being destroyed (before the commit point); in post-copy, serves until the
/// pages arrived, the guest is destroyed here or the user ran this copy.
struct DaemonObserver<'a> {
    vmm: &'a Vmm,
    daemon: &'a mut UnixStream,
    /// Where the daemon's answers come, when it decides the handover.
    answers: Option<&'a mut BufReader<UnixStream>>,
    /// The daemon was asked for the handover (the guest's ownership may have moved).
    asked_handover: &'a mut bool,
    destination: &'a str,
    migration_id: &'a str,
}

impl DaemonObserver<'_> {
    /// Asks the daemon whether the guest may become the destination's.
    fn ask_handover(&mut self) -> Result<(), String> {
        let Some(answers) = self.answers.as_mut() else {
            return Ok(());
        };
        let question = VmmReply::HandingOver {
            migration_id: self.migration_id.to_string(),
        };
        write_message(self.daemon, &question).map_err(|e| format!("the daemon went away ({e})"))?;
        *self.asked_handover = true;
        let _ = answers
            .get_ref()
            .set_read_timeout(Some(HANDOVER_DECISION_TIMEOUT));
        let answer = tern_api::read_message::<tern_api::vmm::VmmRequest>(&mut **answers);
        let _ = answers.get_ref().set_read_timeout(None);
        match answer {
            Ok(tern_api::vmm::VmmRequest::HandoverDecision { allowed: true, .. }) => Ok(()),
            Ok(tern_api::vmm::VmmRequest::HandoverDecision { reason, .. }) => Err(format!(
                "the handover was refused: {}",
                reason.unwrap_or_else(|| "no reason given".into())
            )),
            Ok(other) => Err(format!("the daemon answered the handover with {other:?}")),
            Err(e) => Err(format!("the daemon did not decide the handover ({e})")),
        }
    }
}

impl Observer for DaemonObserver<'_> {
    fn progress(&mut self, progress: &MigrationProgress) {
        let text = if progress.phase.starts_with("post-copy") {
            format!(
                "{} to {}: {} pages to go",
                progress.phase, self.destination, progress.pages_left
            )
        } else {
            format!("migrating ({}, round {})", progress.phase, progress.round)
        };
        self.vmm.life.set_progress(text);
        let _ = write_message(self.daemon, &VmmReply::MigrationProgress(progress.clone()));
    }

    fn keep_going(&mut self) -> Result<(), String> {
        if self.vmm.life.ending() {
            return Err("the guest is being destroyed".into());
        }
        if self.vmm.life.cancel_requested() {
            return Err(CANCELLED_ON_REQUEST.into());
        }
        if peer_closed(self.daemon) {
            return Err("the daemon went away".into());
        }
        Ok(())
    }

    /// Passes the commit point in the lifecycle, unless a cancel (or a destroy) came first:
    /// from here on a cancel is refused.
    fn commit(&mut self) -> Result<(), String> {
        self.keep_going()?;
        self.vmm.life.apply(Event::CommitPoint)?;
        self.ask_handover()
    }

    fn postcopy_started(&mut self) {
        let started = Event::PostcopyStarted {
            migration_id: self.migration_id.to_string(),
        };
        if let Err(e) = self.vmm.life.apply(started) {
            log::warn!("post-copy: {e}");
        }
    }

    fn keep_serving(&mut self) -> Result<(), String> {
        if self.vmm.life.serving_postcopy(self.migration_id) {
            return Ok(());
        }
        if self.vmm.life.ending() {
            return Err("the guest is being destroyed here".into());
        }
        Err("the copy here was run instead (tern unpause --force)".into())
    }
}

/// Whether the other end of a Unix stream has closed it.
fn peer_closed(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: polling one descriptor we own, without waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// After an unconfirmed handover: asks the destination what became of the migration until it
/// knows, then ends here (it runs there) or resumes here (it does not). Stops asking if the
/// user decides first (forces an unpause or another migration, or destroys the guest).
fn start_resolver(vmm: &Arc<Vmm>, request: &Request) {
    let vmm = vmm.clone();
    let destination = Destination::of(request);
    let migration_id = request.migration_id.clone();
    let spawned = std::thread::Builder::new()
        .name("resolve".into())
        .spawn(move || resolve(&vmm, &destination, &migration_id));
    if let Err(e) = spawned {
        log::error!("cannot start asking {}: {e}", request.destination);
    }
}

/// Where to ask about an unresolved migration, and how to secure the question.
struct Destination {
    address: String,
    server_name: String,
    security: LinkSecurity,
}

impl Destination {
    fn of(request: &Request) -> Destination {
        Destination {
            address: request.destination.clone(),
            server_name: request.server_name.clone(),
            security: request.security.clone(),
        }
    }

    /// Opens a first session to the destination's relocation server and asks `message`; the
    /// answer, and the session with what secures it (for a second session).
    fn ask(
        &self,
        message: &ToDestination,
    ) -> Result<(ToSource, Channel<Link>, Security), MigrationError> {
        let addr: SocketAddr = self
            .address
            .parse()
            .map_err(|_| MigrationError::Vm(format!("bad destination address {}", self.address)))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| MigrationError::io("reach the destination", e))?;
        tune_tcp(&stream).map_err(|e| MigrationError::io("set up the connection", e))?;
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| MigrationError::io("set a timeout", e))?;
        let security = Security::load(&self.security)?;
        let mut ch = link::open(stream, &security, &self.server_name)?;
        let answer = link::ask(&mut ch, message, Duration::from_secs(5))?;
        Ok((answer, ch, security))
    }
}

/// Reaches the destination of a post-copy migration again after the connection broke.
struct Redialer {
    destination: Destination,
    migration_id: String,
}

impl Redialer {
    fn try_redial(&self) -> Result<Redialed<Link>, MigrationError> {
        let resume = ToDestination::Resume {
            migration_id: self.migration_id.clone(),
        };
        let (answer, ch, security) = self.destination.ask(&resume)?;
        Ok(match answer {
            ToSource::Accept { .. } => Redialed::Resumed(link::reopen_for_stream(
                ch,
                &security,
                &self.destination.server_name,
            )?),
            ToSource::Outcome { outcome } => match outcome {
                Outcome::Committed => Redialed::Complete,
                Outcome::Aborted => Redialed::NeverRan,
                Outcome::Lost => Redialed::Lost(
                    "the destination's guest process ended before every page \
                                    arrived"
                        .into(),
                ),
                Outcome::Pending => Redialed::Retry(MigrationError::Timeout(
                    "the destination has not taken the migration back yet".into(),
                )),
            },
            ToSource::Refuse { reason } => Redialed::Retry(MigrationError::Refused(reason)),
            other => Redialed::Retry(MigrationError::Protocol(format!(
                "unexpected answer {other:?} to Resume"
            ))),
        })
    }
}

impl Redial<Link> for Redialer {
    fn redial(&mut self) -> Redialed<Link> {
        self.try_redial().unwrap_or_else(Redialed::Retry)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.address)
    }
}

fn resolve(vmm: &Vmm, destination: &Destination, migration_id: &str) {
    let mut wait = Duration::from_millis(500);
    loop {
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_secs(5));
        match vmm.life.resolver_step(migration_id) {
            ResolverStep::Ask => {}
            ResolverStep::Wait => continue,
            ResolverStep::Stop => {
                log::info!("migration {migration_id}: resolved by the user");
                return;
            }
        }
        let answer = |committed| Event::Resolved {
            migration_id: migration_id.to_string(),
            committed,
        };
        match query(destination, migration_id) {
            Ok(Outcome::Committed) => {
                if vmm.life.apply(answer(true)).is_err() {
                    log::info!("migration {migration_id}: resolved by the user");
                    return;
                }
                log::info!("migration {migration_id}: {destination} runs the guest; ending here");
                let _ = vmm.main.send(MainEvent::Migrated(destination.to_string()));
                return;
            }
            Ok(Outcome::Aborted) => {
                if vmm.life.apply(answer(false)).is_err() {
                    log::info!("migration {migration_id}: resolved by the user");
                    return;
                }
                log::warn!("migration {migration_id}: {destination} does not run the guest; resuming it here");
                vmm.stays_here(migration_id);
                crate::end_migration_leftovers(&mut vmm.machine());
                if let Err(e) = vmm.settle_machine() {
                    log::error!("cannot resume the guest: {e}");
                }
                return;
            }
            Ok(Outcome::Pending) => {
                log::info!("migration {migration_id}: {destination} has not decided yet")
            }
            Ok(Outcome::Lost) => {
                log::error!(
                    "migration {migration_id}: {destination} ran the guest and lost it; it \
                     stays paused here until the user decides (tern unpause --force)"
                );
                return;
            }
            Err(e) => log::warn!("migration {migration_id}: cannot ask {destination}: {e:#}"),
        }
    }
}

/// Asks the relocation server at `destination` about `migration_id`.
fn query(destination: &Destination, migration_id: &str) -> anyhow::Result<Outcome> {
    let query = ToDestination::Query {
        migration_id: migration_id.to_string(),
    };
    match destination.ask(&query)?.0 {
        ToSource::Outcome { outcome } => Ok(outcome),
        ToSource::Refuse { reason } => anyhow::bail!("refused: {reason}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_destination_refusing_post_copy_is_explained() {
        // What tern 0.1 (relocation protocol 1 only) answers a post-copy offer.
        let old = "this host speaks relocation protocol version 1, the source version 2";
        let e = postcopy_hint(MigrationError::Refused(old.into()), true).to_string();
        assert!(e.contains(old), "{e}");
        assert!(e.contains("migrate without --postcopy"), "{e}");
        // Other refusals, and refusals of other migrations, are left as they are.
        let e = postcopy_hint(MigrationError::Refused(old.into()), false).to_string();
        assert!(!e.contains("--postcopy"), "{e}");
        let e = postcopy_hint(MigrationError::Refused("no memory".into()), true).to_string();
        assert_eq!(e, "the destination refused it: no memory");
    }
}
