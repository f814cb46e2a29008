//! The guest process: one per guest, started by the daemon as `tern vmm --dir <domain dir>`.
//!
//! It builds the machine from `domain.json`, serves the daemon on `control.sock`, and keeps
//! running when the daemon goes away (a restarted daemon finds it again through the domain
//! directory). When the guest ends it records why in `exit.json` before exiting.

pub mod console;
pub mod console_log;
pub mod cpuid;
pub mod devices;
pub mod direct_io;
mod disk_copy;
mod lifecycle;
pub mod logging;
mod migrate_in;
mod migrate_out;
mod postcopy_in;
pub mod record;
pub mod restore;
pub mod save;

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_api::vmm::{ExitReason, VmmEvent, VmmReply, VmmRequest, VmmStartup, VmmStatus};
use tern_api::{read_message, write_message, RestoreSummary, SaveSummary};
use tern_devices::serial::SerialDevice;
use tern_devices::GuestEvent;
use tern_machine::{Machine, MachineConfig};
use tern_sandbox::ThreadKind;

use console::ConsoleHub;
use lifecycle::{Event, Lifecycle, State};
use record::{write_atomically, DomainDir, DomainRecord};

/// What ends the main loop.
enum MainEvent {
    Guest(GuestEvent),
    Destroy,
    Saved,
    /// The guest runs on this destination now.
    Migrated(String),
    /// An incoming migration failed; nothing ran here.
    IncomingAborted(String),
}

/// Shared state of the guest process.
pub(crate) struct Vmm {
    record: DomainRecord,
    /// Held for as long as an operation needs the machine (a save: all of it). Requests that
    /// must answer at once (status, console) do not take it.
    machine: Mutex<Machine>,
    /// What the process is doing with the guest; every request goes through it first.
    life: Lifecycle,
    /// The UART, for console input without the machine's lock.
    serial: Arc<Mutex<SerialDevice>>,
    console: Arc<ConsoleHub>,
    monitors: Mutex<Vec<UnixStream>>,
    /// Monitor connections open now: the daemon is there.
    monitors_open: AtomicUsize,
    /// A monitor connection was open and closed: the daemon went away.
    daemon_lost: AtomicBool,
    /// Where the daemon's answers on a monitor connection go (whether an arriving guest may
    /// arrive), while someone waits for one.
    daemon_answers: Mutex<Option<mpsc::Sender<VmmRequest>>>,
    /// Migrations after whose handover the guest stayed here, not yet told to a daemon.
    stayed: Mutex<Vec<String>>,
    main: Sender<MainEvent>,
    /// The vCPUs used a good part of a CPU over the last sample period.
    busy: AtomicBool,
    /// Host CPU time of the vCPUs at the last sample (`status` answers without the machine).
    cpu_time_ns: AtomicU64,
    /// Post-copy arriving here: where connections the source comes back on go.
    postcopy_links: Mutex<Option<mpsc::Sender<tern_migration::link::Link>>>,
    /// The guest's disks, with the logs of what it writes (for `--copy-storage`).
    disks: Vec<devices::GuestDisk>,
}

/// Share of one host CPU above which `tern list` calls a guest running rather than blocked.
const BUSY_SHARE: f64 = 0.25;
const SAMPLE_PERIOD: Duration = Duration::from_millis(500);

impl Vmm {
    fn machine(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers from the controller and the last CPU sample: never waits for the machine.
    fn status(&self) -> VmmStatus {
        let (state, note) = self.life.report(self.busy.load(Ordering::Relaxed));
        VmmStatus {
            state,
            cpu_time_ns: self.cpu_time_ns.load(Ordering::Relaxed),
            pid: std::process::id(),
            note,
        }
    }

    /// Makes the machine do what the state says, unless an operation under way owns it.
    fn settle_machine(&self) -> Result<(), String> {
        let mut machine = self.machine();
        match self.life.wants_running() {
            Some(true) if machine.is_paused() => machine.resume().map_err(|e| e.to_string()),
            Some(false) if !machine.is_paused() => machine.pause().map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    fn handle(&self, req: VmmRequest) -> VmmReply {
        let result = match req {
            VmmRequest::Status => return VmmReply::Status(self.status()),
            VmmRequest::Pause => self
                .life
                .apply(Event::Pause)
                .and_then(|_| self.settle_machine()),
            VmmRequest::Unpause { force } => {
                let warning = self
                    .life
                    .apply(Event::Unpause { force })
                    .and_then(|before| {
                        let warning = self.forced_unpause(&before);
                        self.settle_machine().map(|()| warning)
                    });
                return match warning {
                    Ok(Some(message)) => VmmReply::Warning { message },
                    Ok(None) => VmmReply::Ok,
                    Err(message) => VmmReply::Error { message },
                };
            }
            VmmRequest::PowerButton => self.life.apply(Event::PowerButton).map(|_| {
                self.machine().press_power_button();
            }),
            VmmRequest::CancelMigration => self.life.apply(Event::CancelMigration).map(|before| {
                if let State::MigratingOut { destination, .. } = before {
                    log::info!("the migration to {destination} is cancelled on request");
                }
            }),
            VmmRequest::Destroy => {
                let _ = self.life.apply(Event::Destroy);
                let _ = self.main.send(MainEvent::Destroy);
                Ok(())
            }
            VmmRequest::TestForbiddenCall => self.attempt_forbidden_call(),
            VmmRequest::Console
            | VmmRequest::Monitor
            | VmmRequest::SaveInto { .. }
            | VmmRequest::Migrate { .. }
            | VmmRequest::ResumePostcopy { .. } => Ok(()),
            VmmRequest::HandoverDecision { .. } => {
                Err("no migration asked about a handover".into())
            }
            VmmRequest::SavePlaced { .. } => Err("no save waits for its file to be placed".into()),
            VmmRequest::Save { .. } => {
                Err("this guest process saves only into a file its daemon opens (save_into)".into())
            }
        };
        match result {
            Ok(()) => VmmReply::Ok,
            Err(message) => VmmReply::Error { message },
        }
    }
}

impl Vmm {
    /// [`VmmRequest::TestForbiddenCall`]: only when tests asked for such requests and the
    /// filters kill, so that the call can never go through.
    fn attempt_forbidden_call(&self) -> Result<(), String> {
        let sandbox = &self.record.sandbox;
        if !sandbox.test_requests {
            return Err("this host takes no test requests ([sandbox] test_requests)".into());
        }
        if sandbox.seccomp != tern_config::SeccompMode::Enforce || !tern_sandbox::seccomp::armed() {
            return Err("no system-call filter is enforced here".into());
        }
        log::warn!("test request: attempting execve, which the sandbox forbids");
        let argv = [c"true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: null-terminated argument and environment arrays of C strings; the filter
        // stops the call before it replaces anything.
        unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(format!(
            "execve was not stopped: {}",
            std::io::Error::last_os_error()
        ))
    }

    /// Ends what a migration left on when the user forces the guest to run from `before`;
    /// what the user should know about it.
    fn forced_unpause(&self, before: &State) -> Option<String> {
        let name = &self.record.config.name;
        let warning = match before {
            State::Unresolved { destination, .. } => {
                // The user decided: the guest runs here; its resolver stops asking.
                log::warn!(
                    "the migration to {destination} is unresolved; resuming the guest here as forced"
                );
                None
            }
            State::PostcopyLost { destination, .. } => Some(format!(
                "'{name}' runs from its copy of the handover to {destination}: what it did there \
                 since is lost, and its disks may have moved on since (writes made on \
                 {destination} stay)"
            )),
            State::PostcopyOut { destination, .. } => Some(format!(
                "'{name}' runs here from its copy of the handover to {destination}: what it did \
                 there since is lost, its disks may have moved on since, and {destination} must \
                 not run its copy (it gets no more pages from here)"
            )),
            _ => return None,
        };
        if let Some(w) = &warning {
            log::warn!("forced unpause: {w}");
        }
        // The user runs this copy: in a pool its ownership comes back here.
        if let State::PostcopyLost { migration_id, .. } | State::PostcopyOut { migration_id, .. } =
            before
        {
            self.stays_here(migration_id);
        }
        end_migration_leftovers(&mut self.machine());
        warning
    }

    /// Pauses, writes a checkpoint into `files` (to be `path`), then either lets the guest run
    /// on or ends it. `report` is told the summary once the file is on disk; without
    /// `keep_running` it says whether the daemon gave the file its final name, and only then
    /// does the guest end. A failed save leaves the guest running as before.
    fn save(
        &self,
        files: save::CheckpointFiles,
        path: &str,
        keep_running: bool,
        progress: impl FnMut(&tern_api::Progress),
        report: impl FnOnce(&SaveSummary) -> bool,
    ) -> anyhow::Result<SaveSummary> {
        let before = self
            .life
            .apply(Event::Save { path: path.into() })
            .map_err(anyhow::Error::msg)?;
        // Whether the guest runs on afterwards: what it did before, not what the machine does
        // now (a pause just accepted may not have reached it yet).
        let resume = before == State::Running;
        let started = Instant::now();
        let mut machine = self.machine();
        let result = if machine.is_paused() {
            Ok(())
        } else {
            machine.pause().map_err(anyhow::Error::from)
        }
        .and_then(|()| {
            save::write_checkpoint(&machine, &self.record, files, path, started, progress)
        });
        let resumed = |machine: &mut Machine| {
            if resume && !self.life.ending() {
                machine.resume()?;
            }
            anyhow::Ok(())
        };
        match result {
            Ok(mut summary) if keep_running => {
                let resumed = resumed(&mut machine);
                let _ = self.life.apply(Event::Saved { keep_running: true });
                resumed?;
                summary.kept_running = true;
                report(&summary);
                Ok(summary)
            }
            Ok(summary) if report(&summary) => {
                // The guest stays paused until the process ends: it now lives in the file.
                let _ = self.life.apply(Event::Saved {
                    keep_running: false,
                });
                let _ = self.main.send(MainEvent::Saved);
                Ok(summary)
            }
            Ok(_) => {
                log::warn!("the checkpoint was not put in place as {path}; the guest runs on");
                let resumed = resumed(&mut machine);
                let _ = self.life.apply(Event::SaveFailed);
                resumed?;
                anyhow::bail!("the checkpoint was not put in place as {path}")
            }
            Err(e) => {
                let resumed = resumed(&mut machine);
                let _ = self.life.apply(Event::SaveFailed);
                resumed?;
                Err(e)
            }
        }
    }
}

/// Ends what a migration that never completed left on: throttling and the dirty log.
pub(crate) fn end_migration_leftovers(machine: &mut Machine) {
    if let Err(e) = machine.set_throttle(0) {
        log::error!("cannot end throttling: {e}");
    }
    if let Err(e) = machine.stop_dirty_log() {
        log::debug!("dirty log: {e}");
    }
}

/// Runs the guest of `dir` until it ends; returns the process exit code.
pub fn run(dir: &Path) -> i32 {
    logging::init("vmm");
    let started = Instant::now();
    let dir = DomainDir::new(dir);
    let started = start(&dir, started).and_then(|s| {
        // Set up: from here on this thread, and every thread it starts, is filtered (the
        // vCPUs, devices and page servers already entered their own filters).
        tern_sandbox::seccomp::enter(ThreadKind::Control)?;
        Ok(s)
    });
    match started {
        Ok((vmm, listener, events, restore, incoming)) => {
            announce(&VmmStartup::Ready {
                pid: std::process::id(),
                restore,
            });
            if let Some(incoming) = incoming {
                let vmm = vmm.clone();
                let spawned = std::thread::Builder::new()
                    .name("incoming".into())
                    .spawn(move || migrate_in::run(&vmm, incoming));
                if let Err(e) = spawned {
                    fail(&dir, &anyhow::anyhow!("cannot start receiving: {e}"));
                }
            }
            serve(vmm, listener, events, &dir)
        }
        Err(e) => fail(&dir, &e),
    }
}

/// Builds the filters every thread enters as it starts (none have started yet), as the
/// daemon's `[sandbox]` says.
fn arm_sandbox(dir: &DomainDir, sandbox: &tern_config::SandboxConfig) -> anyhow::Result<()> {
    use tern_config::SeccompMode;
    use tern_sandbox::seccomp::OnViolation;
    let on_violation = match sandbox.seccomp {
        SeccompMode::Enforce => OnViolation::Kill,
        SeccompMode::Log => OnViolation::Log,
        SeccompMode::Off => return Ok(()),
    };
    let report = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.violation_file())
        .with_context(|| format!("cannot create {}", dir.violation_file().display()))?;
    tern_sandbox::seccomp::arm(on_violation, report)?;
    Ok(())
}

/// Reports a start-up failure and ends the process at once: threads of a half-built guest
/// (a vCPU waiting for a page that will never come) must not be waited for.
fn fail(dir: &DomainDir, e: &anyhow::Error) -> ! {
    let message = format!("{e:#}");
    log::error!("cannot start the guest: {message}");
    let _ = std::fs::remove_file(dir.control_socket());
    let _ = std::fs::remove_file(dir.pid_file());
    announce(&VmmStartup::Failed { message });
    std::process::exit(1);
}

/// Tells the daemon (on stdout, one line) whether the guest started, then lets go of stdout.
fn announce(msg: &VmmStartup) {
    let mut out = std::io::stdout();
    let _ = write_message(&mut out, msg);
    // SAFETY: replacing fd 1 by /dev/null; nothing else writes to stdout afterwards.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

type Started = (
    Arc<Vmm>,
    UnixListener,
    mpsc::Receiver<MainEvent>,
    Option<RestoreSummary>,
    Option<migrate_in::Incoming>,
);

fn machine_config(record: &DomainRecord) -> anyhow::Result<MachineConfig> {
    let c = &record.config;
    let kernel = c
        .kernel
        .clone()
        .context("the guest config names no kernel (tern boots kernels directly; bootloaders are not supported)")?;
    Ok(MachineConfig {
        mem_mib: c.memory_mib,
        vcpus: c.vcpus,
        kernel,
        initrd: c.ramdisk.clone(),
        cmdline: c.cmdline.clone(),
        hidden_cpu_features: record.hidden_cpu_features.clone(),
    })
}

fn start(dir: &DomainDir, started: Instant) -> anyhow::Result<Started> {
    let record = dir.load_record()?;
    arm_sandbox(dir, &record.sandbox)?;
    let console = ConsoleHub::open(dir.path()).context("cannot open the console log")?;
    let socket = dir.control_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;

    let mut incoming = None;
    let disks;
    let (mut machine, restore) = match &record.restore {
        None if record.incoming.is_some() => {
            let (machine, job, built) = migrate_in::prepare(&record, console.output())?;
            incoming = Some(job);
            disks = built;
            (machine, None)
        }
        None => {
            let built = devices::build(&record)?;
            disks = built.disks;
            let config = machine_config(&record)?;
            let mut machine = Machine::new(&config, console.output(), built.virtio)?;
            machine.start(record.start_paused)?;
            (machine, None)
        }
        Some(spec) => {
            let restored = restore::prepare(&record, spec, console.output())?;
            disks = restored.disks;
            let mut machine = restored.machine;
            if !record.start_paused {
                machine.resume()?;
            }
            machine.announce_restored();
            let running_after_ms = started.elapsed().as_secs_f64() * 1e3;
            if let Some(loader) = restored.loader {
                if let Err(e) = loader.wait() {
                    fail(dir, &e);
                }
            }
            let summary = RestoreSummary {
                id: record.id,
                name: record.config.name.clone(),
                uuid: record.uuid.clone(),
                mode: if spec.copy { "copy" } else { "lazy" }.into(),
                running_after_ms,
                loaded_after_ms: started.elapsed().as_secs_f64() * 1e3,
                pages_loaded: restored.pages,
            };
            (machine, Some(summary))
        }
    };
    let guest_events = machine
        .take_events()
        .context("machine events already taken")?;

    let (main, main_rx) = mpsc::channel();
    let forward = main.clone();
    std::thread::Builder::new()
        .name("guest-events".into())
        .spawn(move || {
            tern_sandbox::seccomp::enter_or_abort(ThreadKind::Control);
            while let Ok(e) = guest_events.recv() {
                if forward.send(MainEvent::Guest(e)).is_err() {
                    break;
                }
            }
        })?;
    let initial = match &incoming {
        Some(job) => State::Incoming {
            source: job.source().to_string(),
        },
        None if machine.is_paused() => State::Paused,
        None => State::Running,
    };
    let life = Lifecycle::new(&record.config.name, initial);
    let serial = machine.devices().serial.clone();
    let cpu_time_ns = AtomicU64::new(machine.cpu_time_ns());
    let vmm = Arc::new(Vmm {
        record,
        machine: Mutex::new(machine),
        life,
        serial,
        console,
        monitors: Mutex::new(Vec::new()),
        monitors_open: AtomicUsize::new(0),
        daemon_lost: AtomicBool::new(false),
        daemon_answers: Mutex::new(None),
        stayed: Mutex::new(Vec::new()),
        main,
        busy: AtomicBool::new(false),
        cpu_time_ns,
        postcopy_links: Mutex::new(None),
        disks,
    });
    Ok((vmm, listener, main_rx, restore, incoming))
}

fn serve(
    vmm: Arc<Vmm>,
    listener: UnixListener,
    events: mpsc::Receiver<MainEvent>,
    dir: &DomainDir,
) -> i32 {
    let sampler = vmm.clone();
    let _ = std::thread::Builder::new()
        .name("cpu-sampler".into())
        .spawn(move || sample_cpu(&sampler));
    let acceptor = vmm.clone();
    let _ = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let vmm = acceptor.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(&vmm, stream));
            }
        });
    let event = events.recv();
    let _ = vmm.life.apply(Event::GuestEnded);
    let reason = match event {
        Ok(MainEvent::Destroy) | Err(_) => ExitReason::Destroyed,
        Ok(MainEvent::Saved) => ExitReason::Saved,
        Ok(MainEvent::Guest(GuestEvent::PowerOff)) => ExitReason::Poweroff,
        Ok(MainEvent::Guest(GuestEvent::Reset)) => ExitReason::Reboot,
        Ok(MainEvent::Guest(GuestEvent::Panic)) => ExitReason::Crash {
            message: "the guest reported a panic".into(),
        },
        Ok(MainEvent::Guest(GuestEvent::Crashed(message))) => ExitReason::Crash { message },
        Ok(MainEvent::Migrated(destination)) => ExitReason::Migrated { destination },
        Ok(MainEvent::IncomingAborted(message)) => ExitReason::IncomingAborted { message },
    };
    finish(&vmm, dir, reason)
}

/// Samples the vCPUs' CPU time for `status`. An operation holding the machine (a save) is not
/// waited for: the sample is skipped, the last one stands.
fn sample_cpu(vmm: &Vmm) {
    let mut last = (Instant::now(), vmm.cpu_time_ns.load(Ordering::Relaxed));
    loop {
        std::thread::sleep(SAMPLE_PERIOD);
        let cpu_ns = match vmm.machine.try_lock() {
            Ok(machine) => machine.cpu_time_ns(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().cpu_time_ns(),
            Err(std::sync::TryLockError::WouldBlock) => continue,
        };
        vmm.cpu_time_ns.store(cpu_ns, Ordering::Relaxed);
        let now = (Instant::now(), cpu_ns);
        let wall = now.0.duration_since(last.0).as_nanos() as f64;
        let used = now.1.saturating_sub(last.1) as f64;
        vmm.busy
            .store(wall > 0.0 && used / wall > BUSY_SHARE, Ordering::Relaxed);
        last = now;
    }
}

fn serve_connection(vmm: &Arc<Vmm>, stream: UnixStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Ok(req) = read_message::<VmmRequest>(&mut reader) {
        if let VmmRequest::Migrate {
            destination,
            server_name,
            migration_id,
            options,
            security,
            ask_handover,
        } = req
        {
            let job = migrate_out::Request {
                destination,
                server_name,
                security,
                migration_id,
                options,
                ask_handover,
            };
            return migrate_out::serve(vmm, reader, writer, job);
        }
        if let VmmRequest::ResumePostcopy { migration_id } = &req {
            return postcopy_in::take_resumed(vmm, reader, writer, migration_id);
        }
        if let VmmRequest::SaveInto { path, keep_running } = &req {
            if !save_into(vmm, &mut reader, &mut writer, path, *keep_running) {
                return;
            }
            continue;
        }
        let reply = vmm.handle(req.clone());
        if write_message(&mut writer, &reply).is_err() {
            return;
        }
        match req {
            VmmRequest::Console => return stream_console(vmm, reader, writer),
            VmmRequest::Monitor => return keep_monitor(vmm, reader, writer),
            _ => {}
        }
    }
}

/// How long a guest saved to a file waits for the daemon to give the file its name.
const PLACE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`VmmRequest::SaveInto`] on a control connection; whether the connection is still usable.
fn save_into(
    vmm: &Vmm,
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    path: &str,
    keep_running: bool,
) -> bool {
    let files = match take_checkpoint_files(reader, writer) {
        Ok(files) => files,
        Err(e) => {
            let message = format!("{e:#}");
            return write_message(writer, &VmmReply::Error { message }).is_ok();
        }
    };
    let out: &UnixStream = writer;
    let mut progress_out = out;
    let report = |summary: &SaveSummary| {
        let mut out = out;
        if write_message(&mut out, &VmmReply::Saved(summary.clone())).is_err() {
            return false;
        }
        if keep_running {
            return true;
        }
        let _ = out.set_read_timeout(Some(PLACE_TIMEOUT));
        let placed = read_message::<VmmRequest>(reader);
        let _ = out.set_read_timeout(None);
        matches!(placed, Ok(VmmRequest::SavePlaced { placed: true }))
    };
    let result = vmm.save(
        files,
        path,
        keep_running,
        |p| {
            let _ = write_message(&mut progress_out, &VmmReply::Progress(p.clone()));
        },
        report,
    );
    match result {
        Ok(_) => true,
        Err(e) => {
            let message = format!("{e:#}");
            write_message(&mut (&*writer), &VmmReply::Error { message }).is_ok()
        }
    }
}

/// Says Ok, then receives the checkpoint file and its O_DIRECT twin, one byte each.
fn take_checkpoint_files(
    reader: &BufReader<UnixStream>,
    writer: &mut UnixStream,
) -> anyhow::Result<save::CheckpointFiles> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    write_message(writer, &VmmReply::Ok).context("the daemon went away")?;
    anyhow::ensure!(
        reader.buffer().is_empty(),
        "the daemon sent more than the request before the checkpoint file"
    );
    writer.set_read_timeout(Some(Duration::from_secs(10)))?;
    let receive = || {
        let mut byte = [0u8; 1];
        let (n, file) = reader
            .get_ref()
            .recv_with_fd(&mut byte)
            .context("cannot receive the checkpoint file")?;
        anyhow::ensure!(n == 1, "the daemon hung up before the checkpoint file");
        anyhow::Ok(file)
    };
    let file = receive().and_then(|f| f.context("the daemon sent no checkpoint file"));
    let direct = file.as_ref().ok().map(|_| receive()).transpose();
    writer.set_read_timeout(None)?;
    Ok(save::CheckpointFiles {
        file: file?,
        direct: direct?.flatten(),
    })
}

/// Console stream: frames of guest output out, raw console input in.
fn stream_console(vmm: &Arc<Vmm>, mut input: BufReader<UnixStream>, output: UnixStream) {
    let frames = vmm.console.subscribe();
    let Ok(out_half) = output.try_clone() else {
        return;
    };
    let writer = std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::new(out_half);
            while let Ok(first) = frames.recv() {
                for frame in console::coalesce(first, &frames) {
                    if frame.write_to(&mut out).is_err() {
                        return;
                    }
                }
                if out.flush().is_err() {
                    return;
                }
            }
        });
    let mut buf = [0u8; 256];
    loop {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => feed_console(vmm, &buf[..n]),
        }
    }
    // Input ended; output goes on until the guest leaves or the peer goes away.
    if let Ok(w) = writer {
        let _ = w.join();
    }
    let _ = output.shutdown(std::net::Shutdown::Both);
}

/// Passes input to the UART as its 64-byte FIFO drains.
fn feed_console(vmm: &Vmm, mut bytes: &[u8]) {
    for _ in 0..10_000 {
        if bytes.is_empty() {
            return;
        }
        let taken = vmm
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes);
        bytes = &bytes[taken..];
        if taken == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn keep_monitor(vmm: &Arc<Vmm>, mut reader: BufReader<UnixStream>, writer: UnixStream) {
    if let Ok(w) = writer.try_clone() {
        vmm.monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
    }
    vmm.monitors_open.fetch_add(1, Ordering::AcqRel);
    vmm.tell_stays();
    // The daemon sends only answers to questions asked on the connection; then it hangs up.
    while let Ok(answer) = read_message::<VmmRequest>(&mut reader) {
        let waiting = vmm
            .daemon_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match waiting {
            Some(to) => {
                let _ = to.send(answer);
            }
            None => log::warn!("the daemon answered a question nobody asked: {answer:?}"),
        }
    }
    let mut sink = [0u8; 64];
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    if vmm.monitors_open.fetch_sub(1, Ordering::AcqRel) == 1 {
        vmm.daemon_lost.store(true, Ordering::Release);
    }
}

impl Vmm {
    /// Asks the daemon `question` on its monitor connections and waits up to `timeout` for its
    /// answer.
    fn ask_daemon(&self, question: &VmmEvent, timeout: Duration) -> Result<VmmRequest, String> {
        let (tx, rx) = mpsc::channel();
        *self
            .daemon_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.notify_monitors(question);
        let answer = rx.recv_timeout(timeout);
        *self
            .daemon_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        answer.map_err(|_| format!("the daemon did not answer within {timeout:?}"))
    }

    /// Tells the daemon's monitor connections about `event`; how many took it.
    fn notify_monitors(&self, event: &VmmEvent) -> usize {
        let mut monitors = self.monitors.lock().unwrap_or_else(|p| p.into_inner());
        monitors.retain_mut(|m| write_message(m, event).is_ok());
        monitors.len()
    }

    /// Migration `migration_id` passed its handover and the guest stays here: the daemon (now,
    /// or the next one to attach) gives it its ownership back.
    fn stays_here(&self, migration_id: &str) {
        self.stayed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(migration_id.to_string());
        self.tell_stays();
    }

    /// Tells the daemon of the migrations after which the guest stayed here.
    fn tell_stays(&self) {
        let mut stayed = self.stayed.lock().unwrap_or_else(|p| p.into_inner());
        stayed.retain(|migration_id| {
            let event = VmmEvent::StaysHere {
                migration_id: migration_id.clone(),
            };
            self.notify_monitors(&event) == 0
        });
    }
}

fn finish(vmm: &Vmm, dir: &DomainDir, reason: ExitReason) -> i32 {
    log::info!("guest ends: {reason:?}");
    if let Ok(json) = serde_json::to_vec(&reason) {
        if let Err(e) = write_atomically(&dir.exit_file(), &json) {
            log::error!("{e:#}");
        }
    }
    vmm.machine().shut_down();
    let monitors = std::mem::take(&mut *vmm.monitors.lock().unwrap_or_else(|p| p.into_inner()));
    for mut m in monitors {
        let _ = write_message(&mut m, &VmmEvent::Exiting(reason.clone()));
    }
    vmm.console.close();
    let _ = std::fs::remove_file(dir.control_socket());
    let _ = std::fs::remove_file(dir.pid_file());
    0
}
