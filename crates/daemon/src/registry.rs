//! The domains of this host and their life cycle.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tern_api::vmm::{ExitReason, VmmEvent, VmmReply, VmmRequest, VmmRunState};
use tern_api::{
    read_message, write_message, DomainInfo, DomainState, MigrateOptions, MigrationProgress,
    MigrationSummary, Progress, RestoreSummary, SaveSummary,
};
use tern_config::{Action, DomainConfig};
use tern_vmm::record::{
    write_atomically, DomainDir, DomainRecord, IncomingSpec, IncomingState, RestoreSpec,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::guest_process::{self, Control};
use crate::trust::HostTrust;

/// Where a domain is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum Life {
    /// Its process is being started.
    Starting,
    /// Its process runs.
    Live { pid: u32 },
    /// Its process is receiving it from another host (migration `migration_id` from
    /// `source`); it becomes `Live` when the source hands it over.
    Incoming {
        pid: u32,
        migration_id: String,
        source: String,
    },
    /// It ended and is kept for inspection (shutdown or crashed) until destroyed.
    Ended(DomainState),
}

/// One domain of this host.
pub struct Domain {
    pub id: u32,
    pub uuid: String,
    pub config: DomainConfig,
    pub dir: DomainDir,
    pub life: Life,
    /// Recent automatic restarts, to stop a crash loop.
    restarts: Vec<Instant>,
}

/// Most automatic restarts within [`RESTART_WINDOW`] before a domain is left crashed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Memory a guest process needs beyond the guest's RAM (page tables, buffers, the process).
const OVERHEAD_MIB: u64 = 64;
/// How long connecting to another host's relocation server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What this host lets its guests have.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    /// CPU features guests do not get (see `tern_machine::cpuid::hide_features`).
    pub hidden_cpu_features: Vec<String>,
    /// The most RAM all guests may have together, MiB.
    pub guest_memory_mib: Option<u64>,
}

/// How a domain's process starts.
pub(crate) enum Launch {
    /// Boot its kernel.
    Boot,
    /// From a checkpoint file.
    Restore(RestoreSpec),
    /// From a migration arriving on connection `fd`.
    Incoming { spec: Box<IncomingSpec>, fd: RawFd },
}

/// The daemon's view of its domains.
pub struct Registry {
    state_dir: PathBuf,
    policy: HostPolicy,
    /// This host's relocation identity and whom it trusts.
    trust: Arc<HostTrust>,
    domains: Mutex<BTreeMap<u32, Domain>>,
    /// Signalled on every change, for requests that wait for one.
    changed: Condvar,
}

fn domains_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("domains")
}

/// Where the states of incoming migrations are kept (one file per migration ID), so that a
/// source can learn a migration's outcome even after the domain is gone.
fn migrations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("migrations")
}

/// How long records of incoming migrations are kept.
const MIGRATION_RECORD_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

impl Registry {
    /// A registry keeping its domains under `state_dir`.
    pub fn new(
        state_dir: &Path,
        policy: HostPolicy,
        trust: Arc<HostTrust>,
    ) -> anyhow::Result<Arc<Self>> {
        for dir in [domains_dir(state_dir), migrations_dir(state_dir)] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        prune_old_files(&migrations_dir(state_dir), MIGRATION_RECORD_AGE);
        Ok(Arc::new(Registry {
            state_dir: state_dir.to_path_buf(),
            policy,
            trust,
            domains: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Domain>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates the next domain ID. IDs are never reused: the counter is kept on disk.
    fn allocate_id(&self, domains: &BTreeMap<u32, Domain>) -> anyhow::Result<u32> {
        let path = self.state_dir.join("next-domid");
        let stored = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(1);
        let after_existing = domains.keys().max().map_or(1, |m| m + 1);
        let id = stored.max(after_existing).max(1);
        write_atomically(&path, (id + 1).to_string().as_bytes())?;
        Ok(id)
    }

    /// Finds a domain by name or numeric ID.
    pub fn find(&self, key: &str) -> anyhow::Result<(u32, DomainDir, Life)> {
        let domains = self.lock();
        let by_id = key.parse::<u32>().ok().and_then(|id| domains.get(&id));
        let found = by_id.or_else(|| domains.values().find(|d| d.config.name == key));
        match found {
            Some(d) => Ok((d.id, d.dir.clone(), d.life.clone())),
            None => bail!("no domain '{key}' on this host"),
        }
    }

    /// Finds a domain whose process runs.
    pub fn find_live(&self, key: &str) -> anyhow::Result<(u32, DomainDir)> {
        let (id, dir, life) = self.find(key)?;
        match life {
            Life::Live { .. } => Ok((id, dir)),
            Life::Starting => bail!("domain '{key}' is still starting"),
            Life::Incoming { source, .. } => {
                bail!("domain '{key}' is still arriving from {source}")
            }
            Life::Ended(state) => bail!("domain '{key}' is not running (it is {})", state.as_str()),
        }
    }

    /// Creates and starts a domain from a config; returns its ID and UUID.
    pub fn create(
        self: &Arc<Self>,
        mut config: DomainConfig,
        paused: bool,
    ) -> anyhow::Result<(u32, String)> {
        check_boot_files(&config)?;
        assign_macs(&mut config);
        let (id, uuid, _) = self.start_domain(config, paused, Launch::Boot)?;
        Ok((id, uuid))
    }

    /// Restores a domain from a checkpoint file.
    pub fn restore(
        self: &Arc<Self>,
        path: &Path,
        paused: bool,
        copy: bool,
    ) -> anyhow::Result<RestoreSummary> {
        let config = crate::checkpoint::read_config(path)?;
        let spec = RestoreSpec {
            path: path.to_path_buf(),
            copy,
        };
        let (id, _, summary) = self.start_domain(config, paused, Launch::Restore(spec))?;
        summary.ok_or_else(|| anyhow!("guest process {id} did not report its restore"))
    }

    /// Checks, registers and starts a domain.
    pub(crate) fn start_domain(
        self: &Arc<Self>,
        mut config: DomainConfig,
        paused: bool,
        launch: Launch,
    ) -> anyhow::Result<(u32, String, Option<RestoreSummary>)> {
        check_free_memory(config.memory_mib)?;
        check_devices(&config)?;
        let uuid = config
            .uuid
            .get_or_insert_with(uuid::Uuid::new_v4)
            .to_string();
        let (id, dir) = {
            let mut domains = self.lock();
            if let Some(d) = domains.values().find(|d| d.uuid == uuid) {
                bail!(
                    "a domain with UUID {uuid} is already running on this host ('{}')",
                    d.config.name
                );
            }
            if let Some(d) = domains.values().find(|d| d.config.name == config.name) {
                bail!(
                    "a domain named '{}' already exists on this host (ID {})",
                    config.name,
                    d.id
                );
            }
            self.check_memory_policy(config.memory_mib, &domains)?;
            let id = self.allocate_id(&domains)?;
            let dir = DomainDir::new(domains_dir(&self.state_dir).join(id.to_string()));
            domains.insert(
                id,
                Domain {
                    id,
                    uuid: uuid.clone(),
                    config: config.clone(),
                    dir: dir.clone(),
                    life: Life::Starting,
                    restarts: Vec::new(),
                },
            );
            (id, dir)
        };
        let (restore, incoming, fd) = match launch {
            Launch::Boot => (None, None, None),
            Launch::Restore(spec) => (Some(spec), None, None),
            Launch::Incoming { spec, fd } => (None, Some(*spec), Some(fd)),
        };
        let record = DomainRecord {
            id,
            uuid: uuid.clone(),
            config,
            start_paused: paused,
            restore,
            hidden_cpu_features: self.policy.hidden_cpu_features.clone(),
            incoming,
        };
        let started = std::fs::create_dir_all(dir.path())
            .with_context(|| format!("cannot create {}", dir.path().display()))
            .and_then(|_| dir.save_record(&record))
            .and_then(|_| self.launch(id, &dir, fd, record.incoming.as_ref()));
        match started {
            Ok(summary) => Ok((id, uuid, summary)),
            Err(e) => {
                self.forget(id);
                Err(e)
            }
        }
    }

    /// Starts the process of domain `id` (receiving a migration on `connection` if given)
    /// and watches it.
    fn launch(
        self: &Arc<Self>,
        id: u32,
        dir: &DomainDir,
        connection: Option<RawFd>,
        incoming: Option<&IncomingSpec>,
    ) -> anyhow::Result<Option<RestoreSummary>> {
        let _ = std::fs::remove_file(dir.exit_file());
        let started = guest_process::spawn(dir, connection)?;
        let pid = started.pid;
        let life = match incoming {
            Some(spec) => Life::Incoming {
                pid,
                migration_id: spec.offer.migration_id.clone(),
                source: spec.source.clone(),
            },
            None => Life::Live { pid },
        };
        // Set before the monitor starts, so that a process that ends at once is seen ending
        // in the right life.
        self.set_life(id, life);
        self.watch(id, dir, Some(started.child))?;
        Ok(started.restore)
    }

    /// Saves a running domain to `path`; unless `keep_running`, it is gone afterwards.
    pub fn save(
        &self,
        key: &str,
        path: &Path,
        keep_running: bool,
        mut progress: impl FnMut(&Progress),
    ) -> anyhow::Result<SaveSummary> {
        let (id, dir) = self.find_live(key)?;
        let mut control = Control::connect(&dir)?;
        let request = VmmRequest::Save {
            path: path.display().to_string(),
            keep_running,
        };
        let (mut reader, mut writer) = control_parts(&mut control);
        write_message(&mut writer, &request).context("guest process went away")?;
        let summary = loop {
            match read_message::<VmmReply>(&mut reader) {
                Ok(VmmReply::Progress(p)) => progress(&p),
                Ok(VmmReply::Saved(summary)) => break summary,
                Ok(VmmReply::Error { message }) => bail!(message),
                Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
                Err(e) => {
                    tern_vmm::save::remove_partials(path);
                    bail!("the guest process went away while saving ({e})");
                }
            }
        };
        if !keep_running {
            let gone = |d: &BTreeMap<u32, Domain>| !d.contains_key(&id);
            if !self.wait_until(Duration::from_secs(30), gone) {
                bail!("saved, but domain '{key}' did not stop afterwards");
            }
        }
        Ok(summary)
    }

    /// Migrates a running domain to the relocation server at `destination` (`host[:port]`);
    /// on success the domain is gone from here.
    pub fn migrate(
        &self,
        key: &str,
        destination: &str,
        options: &MigrateOptions,
        progress: impl FnMut(&MigrationProgress),
    ) -> anyhow::Result<MigrationSummary> {
        let result = self.migrate_out(key, destination, options, progress);
        match &result {
            Ok(s) => log::info!(
                "migrated '{}' to {}: {:.1} ms downtime, {:.2} s in all",
                s.domain,
                s.destination,
                s.downtime_ms,
                s.total_seconds
            ),
            Err(e) => log::warn!("migration of '{key}' to {destination} failed: {e:#}"),
        }
        result
    }

    fn migrate_out(
        &self,
        key: &str,
        destination: &str,
        options: &MigrateOptions,
        mut progress: impl FnMut(&MigrationProgress),
    ) -> anyhow::Result<MigrationSummary> {
        let (id, dir) = self.find_live(key)?;
        let addr = crate::relocation::resolve(destination)?;
        let stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot reach the relocation server at {addr}"))?;
        let migration_id = uuid::Uuid::new_v4().to_string();
        log::info!("migrating domain {id} to {addr} (migration {migration_id})");
        let mut control = Control::connect(&dir)?;
        let (reader, writer) = control_parts(&mut control);
        let request = VmmRequest::Migrate {
            destination: addr.to_string(),
            server_name: crate::relocation::server_name(destination),
            migration_id,
            options: options.clone(),
            security: self.trust.outgoing(),
        };
        write_message(writer, &request).context("guest process went away")?;
        match read_message::<VmmReply>(reader) {
            Ok(VmmReply::Ok) => {}
            Ok(VmmReply::Error { message }) => bail!(message),
            Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
            Err(e) => bail!("the guest process went away ({e})"),
        }
        writer
            .send_with_fd(&[0u8][..], stream.as_raw_fd())
            .context("cannot pass the connection to the guest process")?;
        // The guest process has its own copy now; the connection closes with it.
        drop(stream);
        let summary = loop {
            match read_message::<VmmReply>(reader) {
                Ok(VmmReply::MigrationProgress(p)) => progress(&p),
                Ok(VmmReply::Migrated(summary)) => break summary,
                Ok(VmmReply::Error { message }) => bail!(message),
                Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
                Err(e) => bail!("the guest process went away during the migration ({e})"),
            }
        };
        let gone = |d: &BTreeMap<u32, Domain>| !d.contains_key(&id);
        if !self.wait_until(Duration::from_secs(30), gone) {
            bail!("migrated, but domain '{key}' did not stop here afterwards");
        }
        Ok(summary)
    }

    /// Opens a monitor connection to a running process and reacts when it ends.
    fn watch(
        self: &Arc<Self>,
        id: u32,
        dir: &DomainDir,
        child: Option<Child>,
    ) -> anyhow::Result<()> {
        let mut control = Control::connect(dir)?;
        control.expect_ok(&VmmRequest::Monitor)?;
        let (mut reader, _writer) = control.into_parts();
        reader.get_ref().set_read_timeout(None)?;
        let registry = self.clone();
        std::thread::Builder::new()
            .name(format!("monitor-{id}"))
            .spawn(move || {
                let _keep_open = _writer;
                let mut reason = None;
                while let Ok(event) = read_message::<VmmEvent>(&mut reader) {
                    match event {
                        VmmEvent::Exiting(r) => reason = Some(r),
                        VmmEvent::Committed => registry.incoming_committed(id),
                    }
                }
                // Drain until the process really closed the socket.
                let mut sink = [0u8; 64];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                if let Some(mut child) = child {
                    let _ = child.wait();
                }
                registry.guest_ended(id, reason);
            })?;
        Ok(())
    }

    fn set_life(&self, id: u32, life: Life) {
        if let Some(d) = self.lock().get_mut(&id) {
            d.life = life;
        }
        self.changed.notify_all();
    }

    /// Removes a domain and its directory.
    fn forget(&self, id: u32) {
        if let Some(d) = self.lock().remove(&id) {
            let _ = std::fs::remove_dir_all(d.dir.path());
        }
        self.changed.notify_all();
    }

    /// An arriving guest was handed over: it is this host's now.
    fn incoming_committed(&self, id: u32) {
        let mut domains = self.lock();
        if let Some(d) = domains.get_mut(&id) {
            if let Life::Incoming {
                pid, migration_id, ..
            } = &d.life
            {
                log::info!(
                    "domain {id} ('{}') arrived (migration {migration_id})",
                    d.config.name
                );
                d.life = Life::Live { pid: *pid };
            }
        }
        drop(domains);
        self.changed.notify_all();
    }

    /// Applies the domain's policy after its process ended.
    fn guest_ended(self: &Arc<Self>, id: u32, reason: Option<ExitReason>) {
        let Some((dir, life)) = self
            .lock()
            .get(&id)
            .map(|d| (d.dir.clone(), d.life.clone()))
        else {
            return;
        };
        if let Life::Incoming { migration_id, .. } = life {
            self.incoming_ended(id, &migration_id, reason);
            return;
        }
        let reason = reason
            .or_else(|| read_exit_file(&dir))
            .unwrap_or(ExitReason::Crash {
                message: "the guest process died".into(),
            });
        log::info!("domain {id} ended: {reason:?}");
        let action = {
            let mut domains = self.lock();
            let Some(d) = domains.get_mut(&id) else {
                return;
            };
            let action = match &reason {
                ExitReason::Destroyed
                | ExitReason::Saved
                | ExitReason::Migrated { .. }
                | ExitReason::IncomingAborted { .. } => Action::Destroy,
                ExitReason::Poweroff => d.config.on_poweroff,
                ExitReason::Reboot => d.config.on_reboot,
                ExitReason::Crash { .. } => d.config.on_crash,
            };
            let restart = matches!(
                action,
                Action::Restart | Action::RenameRestart | Action::CoredumpRestart
            );
            if restart {
                d.restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
                if d.restarts.len() >= MAX_RESTARTS {
                    log::warn!("domain {id} restarted {MAX_RESTARTS} times within {RESTART_WINDOW:?}; leaving it crashed");
                    d.life = Life::Ended(DomainState::Crashed);
                    self.changed.notify_all();
                    return;
                }
                d.restarts.push(Instant::now());
                d.life = Life::Starting;
            }
            action
        };
        match action {
            Action::Destroy | Action::CoredumpDestroy => self.forget(id),
            Action::Preserve => {
                let state = match reason {
                    ExitReason::Poweroff | ExitReason::Reboot => DomainState::Shutdown,
                    _ => DomainState::Crashed,
                };
                self.set_life(id, Life::Ended(state));
            }
            Action::Restart | Action::RenameRestart | Action::CoredumpRestart => {
                if let Err(e) = boot_fresh(&dir).and_then(|_| self.launch(id, &dir, None, None)) {
                    log::error!("cannot restart domain {id}: {e:#}");
                    self.set_life(id, Life::Ended(DomainState::Crashed));
                }
            }
        }
    }

    /// The process of an arriving guest ended before the guest was handed over: nothing of it
    /// ran here. Remove everything, and remember that it did not arrive.
    fn incoming_ended(&self, id: u32, migration_id: &str, reason: Option<ExitReason>) {
        let file = self.migration_file(migration_id);
        let state = IncomingState::load(&file);
        if state == Some(IncomingState::Committed) {
            // Committed, and the process died before it could say so: the guest was this
            // host's and crashed here.
            log::error!("domain {id} crashed right after it arrived (migration {migration_id})");
        } else if let Err(e) = IncomingState::Aborted.store(&file) {
            log::error!("{e:#}");
        }
        let why = match reason {
            Some(ExitReason::IncomingAborted { message }) => message,
            Some(other) => format!("{other:?}"),
            None => "its guest process died".into(),
        };
        log::warn!("incoming migration {migration_id} (domain {id}) did not complete: {why}");
        self.forget(id);
    }

    /// The state file of incoming migration `migration_id`.
    pub(crate) fn migration_file(&self, migration_id: &str) -> PathBuf {
        migrations_dir(&self.state_dir).join(format!("{migration_id}.json"))
    }

    /// What became of incoming migration `migration_id`, for a source that lost the
    /// connection after telling this host to run the guest.
    pub fn migration_outcome(&self, migration_id: &str) -> tern_migration::Outcome {
        use tern_migration::Outcome;
        if !valid_migration_id(migration_id) {
            return Outcome::Aborted;
        }
        match IncomingState::load(&self.migration_file(migration_id)) {
            // Never accepted here (or so long ago that it was forgotten).
            None | Some(IncomingState::Aborted) => Outcome::Aborted,
            Some(IncomingState::Committed) => Outcome::Committed,
            Some(IncomingState::Receiving | IncomingState::Ready) => {
                let alive = self.lock().values().any(|d| {
                    matches!(&d.life, Life::Incoming { pid, migration_id: m, .. }
                        if m == migration_id && crate::process_alive(*pid))
                });
                // A process that died undecided never ran the guest.
                if alive {
                    Outcome::Pending
                } else {
                    Outcome::Aborted
                }
            }
        }
    }

    /// Checks the host's memory policy for a new guest of `memory_mib` beside `domains`.
    fn check_memory_policy(
        &self,
        memory_mib: u64,
        domains: &BTreeMap<u32, Domain>,
    ) -> anyhow::Result<()> {
        let Some(limit) = self.policy.guest_memory_mib else {
            return Ok(());
        };
        let used: u64 = domains
            .values()
            .filter(|d| !matches!(d.life, Life::Ended(_)))
            .map(|d| d.config.memory_mib)
            .sum();
        if used + memory_mib > limit {
            bail!(
                "not enough memory for guests on this host: the guest needs {memory_mib} MiB; {} of the {limit} MiB this host gives its guests are free",
                limit.saturating_sub(used)
            );
        }
        Ok(())
    }

    /// The host's policy.
    pub fn trust(&self) -> &HostTrust {
        &self.trust
    }

    pub fn policy(&self) -> &HostPolicy {
        &self.policy
    }

    /// Waits until `done` holds for the domain map, or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&BTreeMap<u32, Domain>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut domains = self.lock();
        loop {
            if done(&domains) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            domains = self
                .changed
                .wait_timeout(domains, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Destroys a domain: stops its process if it runs, forgets it.
    pub fn destroy(&self, key: &str) -> anyhow::Result<()> {
        let (id, dir, life) = self.find(key)?;
        match life {
            Life::Ended(_) => {
                self.forget(id);
                Ok(())
            }
            Life::Starting => bail!("domain '{key}' is still starting; try again"),
            Life::Live { pid } | Life::Incoming { pid, .. } => {
                if let Err(e) = guest_process::request(&dir, &VmmRequest::Destroy) {
                    log::warn!("domain {id} did not take the destroy request ({e:#}); killing it");
                    kill(pid);
                }
                let gone = |d: &BTreeMap<u32, Domain>| !d.contains_key(&id);
                if !self.wait_until(Duration::from_secs(10), gone) {
                    kill(pid);
                    if !self.wait_until(Duration::from_secs(10), gone) {
                        bail!("domain '{key}' did not go away after being killed");
                    }
                }
                Ok(())
            }
        }
    }

    /// Presses the guest's power button; with `wait`, returns once it is gone or shut down.
    pub fn shutdown(&self, key: &str, wait: bool) -> anyhow::Result<()> {
        let (id, dir) = self.find_live(key)?;
        guest_process::request(&dir, &VmmRequest::PowerButton)?;
        if wait {
            let down = |d: &BTreeMap<u32, Domain>| {
                d.get(&id)
                    .is_none_or(|d| !matches!(d.life, Life::Live { .. } | Life::Starting))
            };
            if !self.wait_until(Duration::from_secs(120), down) {
                bail!("domain '{key}' did not shut down within 120 s");
            }
        }
        Ok(())
    }

    /// Rows for `tern list`.
    pub fn list(&self) -> Vec<DomainInfo> {
        let snapshot: Vec<(u32, String, String, u64, u32, DomainDir, Life)> = self
            .lock()
            .values()
            .map(|d| {
                (
                    d.id,
                    d.config.name.clone(),
                    d.uuid.clone(),
                    d.config.memory_mib,
                    d.config.vcpus,
                    d.dir.clone(),
                    d.life.clone(),
                )
            })
            .collect();
        snapshot
            .into_iter()
            .map(|(id, name, uuid, memory_mib, vcpus, dir, life)| {
                let (state, cpu_ns, note) = match life {
                    Life::Live { .. } => {
                        match Control::connect(&dir).and_then(|mut c| c.status()) {
                            Ok(s) => (run_state(s.state), s.cpu_time_ns, s.note),
                            Err(_) => (DomainState::Crashed, 0, None),
                        }
                    }
                    Life::Incoming { source, .. } => (
                        DomainState::Incoming,
                        0,
                        Some(format!("arriving from {source}")),
                    ),
                    Life::Starting => (DomainState::Paused, 0, None),
                    Life::Ended(state) => (state, 0, None),
                };
                DomainInfo {
                    name,
                    id,
                    uuid,
                    memory_mib,
                    vcpus,
                    state,
                    cpu_time_s: cpu_ns as f64 / 1e9,
                    note,
                }
            })
            .collect()
    }

    /// Finds guest processes left by a previous daemon and takes them over.
    pub fn adopt_existing(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(domains_dir(&self.state_dir)) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = DomainDir::new(entry.path());
            let record = match dir.load_record() {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("ignoring {}: {e:#}", entry.path().display());
                    continue;
                }
            };
            self.lock().insert(
                id,
                Domain {
                    id,
                    uuid: record.uuid.clone(),
                    config: record.config.clone(),
                    dir: dir.clone(),
                    life: Life::Starting,
                    restarts: Vec::new(),
                },
            );
            let pid = std::fs::read_to_string(dir.pid_file())
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            let life = match &record.incoming {
                Some(spec)
                    if IncomingState::load(&spec.state_file) != Some(IncomingState::Committed) =>
                {
                    Life::Incoming {
                        pid,
                        migration_id: spec.offer.migration_id.clone(),
                        source: spec.source.clone(),
                    }
                }
                _ => Life::Live { pid },
            };
            self.set_life(id, life);
            match self.watch(id, &dir, None) {
                Ok(()) => log::info!("adopted running domain {id} ('{}')", record.config.name),
                Err(_) => self.guest_ended(id, None),
            }
        }
    }

    /// Domain IDs and directories, for requests that need them.
    pub fn dir_of(&self, key: &str) -> anyhow::Result<DomainDir> {
        self.find(key).map(|(_, dir, _)| dir)
    }
}

/// A restarted domain boots its kernel, whatever it was restored or migrated from.
fn boot_fresh(dir: &DomainDir) -> anyhow::Result<()> {
    let mut record = dir.load_record()?;
    record.restore = None;
    record.incoming = None;
    record.start_paused = false;
    dir.save_record(&record)
}

fn control_parts(
    control: &mut Control,
) -> (
    &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    &mut std::os::unix::net::UnixStream,
) {
    control.parts_mut()
}

fn run_state(s: VmmRunState) -> DomainState {
    match s {
        VmmRunState::Running => DomainState::Running,
        VmmRunState::Blocked => DomainState::Blocked,
        VmmRunState::Paused => DomainState::Paused,
        VmmRunState::Saving => DomainState::Saving,
        VmmRunState::Migrating => DomainState::Migrating,
    }
}

fn read_exit_file(dir: &DomainDir) -> Option<ExitReason> {
    let text = std::fs::read(dir.exit_file()).ok()?;
    serde_json::from_slice(&text).ok()
}

fn kill(pid: u32) {
    if pid > 1 {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn check_boot_files(config: &DomainConfig) -> anyhow::Result<()> {
    let kernel = config
        .kernel
        .as_ref()
        .ok_or_else(|| anyhow!("the config of '{}' names no kernel", config.name))?;
    std::fs::File::open(kernel)
        .with_context(|| format!("cannot read kernel {}", kernel.display()))?;
    if let Some(ramdisk) = &config.ramdisk {
        std::fs::File::open(ramdisk)
            .with_context(|| format!("cannot read ramdisk {}", ramdisk.display()))?;
    }
    Ok(())
}

/// Gives every network interface without a MAC one, once, at creation: the address is part of
/// the guest from then on (its checkpoints and migrations carry it). Locally administered
/// unicast addresses, prefix 02:54 (tern), the rest random.
fn assign_macs(config: &mut DomainConfig) {
    for vif in config.vifs.iter_mut().filter(|v| v.mac.is_none()) {
        let r = uuid::Uuid::new_v4().into_bytes();
        vif.mac = Some(tern_config::MacAddr([0x02, 0x54, r[0], r[1], r[2], r[3]]));
    }
}

/// Refuses a guest whose bridges or disks are not there, before anything is created for it.
fn check_devices(config: &DomainConfig) -> anyhow::Result<()> {
    for (i, vif) in config.vifs.iter().enumerate() {
        let bridge = vif.bridge.as_deref().ok_or_else(|| {
            anyhow!("network interface {i} names no bridge (vif = ['bridge=br0'])")
        })?;
        if !tern_net::bridge_exists(bridge) {
            bail!("network interface {i}: bridge {bridge} does not exist on this host");
        }
    }
    for disk in &config.disks {
        if let tern_config::DiskBackend::File(path) | tern_config::DiskBackend::Phy(path) =
            &disk.backend
        {
            std::fs::metadata(path)
                .with_context(|| format!("disk {}: cannot use {}", disk.vdev, path.display()))?;
        }
    }
    Ok(())
}

/// Whether `id` can name a migration file: a UUID's characters only.
fn valid_migration_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Removes files in `dir` not modified for `age`.
fn prune_old_files(dir: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Host memory available for new guests, in MiB.
pub fn available_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn check_free_memory(memory_mib: u64) -> anyhow::Result<()> {
    let Some(available) = available_memory_mib() else {
        return Ok(());
    };
    let needed = memory_mib + OVERHEAD_MIB;
    if needed > available {
        bail!(
            "not enough free memory on this host: the guest needs {memory_mib} MiB plus {OVERHEAD_MIB} MiB overhead, {available} MiB are available"
        );
    }
    Ok(())
}
