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
use tern_migration::link::{self, LinkSecurity, Security};
use tern_migration::source::{send, Observer, Plan, SendError, SourceVm, StateRecords};
use tern_migration::transport::tune_tcp;
use tern_migration::{
    Limits, MigrationError, Offer, Outcome, RamRegion, ToDestination, ToSource, OFFER_TIMEOUT,
    PROTOCOL_VERSION,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

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
}

/// Serves a Migrate request: moves to `MigratingOut` (one check-and-set, so that of two
/// requests at once exactly one starts), takes the connection's descriptor, migrates, answers.
pub(crate) fn serve(
    vmm: &Arc<Vmm>,
    reader: BufReader<UnixStream>,
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
        Ok(stream) => migrate(vmm, stream, &request, &mut writer),
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
fn take_connection(
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
    daemon: &mut UnixStream,
) -> VmmReply {
    let result = plan(vmm, request).map(|plan| {
        let source = MachineSource { vmm };
        let mut observer = DaemonObserver { vmm, daemon };
        offer_and_send(&source, stream, request, &plan, &mut observer)
    });
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
            VmmReply::Migrated(summary)
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
    .map_err(SendError::Failed)?;
    // A cancel that came with the answer: stop before the stream starts.
    observer
        .keep_going()
        .map_err(|reason| SendError::Failed(MigrationError::Cancelled(reason)))?;
    let stream =
        link::reopen_for_stream(ch, &security, &request.server_name).map_err(SendError::Failed)?;
    let mut summary = send(source, stream, destination_id, plan, observer)?;
    summary.insecure = matches!(security, Security::Insecure);
    Ok(summary)
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

/// What to send: the offer from the running machine, and the user's options.
fn plan(vmm: &Vmm, request: &Request) -> anyhow::Result<Plan> {
    let machine = vmm.machine();
    let mut config = vmm.record.config.clone();
    config.uuid = vmm.record.uuid.parse().ok();
    let offer = Offer {
        protocol: PROTOCOL_VERSION,
        stream_format: tern_snapshot::FORMAT_VERSION,
        migration_id: request.migration_id.clone(),
        live: request.options.live,
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
    Ok(Plan {
        domain: vmm.record.config.name.clone(),
        destination: request.destination.clone(),
        offer,
        live: request.options.live,
        limits,
    })
}

/// The engine's view of this process's machine.
struct MachineSource<'a> {
    vmm: &'a Vmm,
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
/// or the guest is being destroyed.
struct DaemonObserver<'a> {
    vmm: &'a Vmm,
    daemon: &'a mut UnixStream,
}

impl Observer for DaemonObserver<'_> {
    fn progress(&mut self, progress: &MigrationProgress) {
        self.vmm.life.set_progress(format!(
            "migrating ({}, round {})",
            progress.phase, progress.round
        ));
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
        self.vmm.life.apply(Event::CommitPoint).map(|_| ())
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
    let destination = Destination {
        address: request.destination.clone(),
        server_name: request.server_name.clone(),
        security: request.security.clone(),
    };
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
                crate::end_migration_leftovers(&mut vmm.machine());
                if let Err(e) = vmm.settle_machine() {
                    log::error!("cannot resume the guest: {e}");
                }
                return;
            }
            Ok(Outcome::Pending) => {
                log::info!("migration {migration_id}: {destination} has not decided yet")
            }
            Err(e) => log::warn!("migration {migration_id}: cannot ask {destination}: {e:#}"),
        }
    }
}

/// Asks the relocation server at `destination` about `migration_id`.
fn query(destination: &Destination, migration_id: &str) -> anyhow::Result<Outcome> {
    let addr: SocketAddr = destination
        .address
        .parse()
        .with_context(|| format!("bad address {destination}"))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    tune_tcp(&stream)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let security = Security::load(&destination.security)?;
    let mut ch = link::open(stream, &security, &destination.server_name)?;
    let query = ToDestination::Query {
        migration_id: migration_id.to_string(),
    };
    match link::ask(&mut ch, &query, Duration::from_secs(5))? {
        ToSource::Outcome { outcome } => Ok(outcome),
        ToSource::Refuse { reason } => anyhow::bail!("refused: {reason}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}
