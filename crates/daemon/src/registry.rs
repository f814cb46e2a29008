//! The domains of this host: the table the daemon keeps of them, and lookups in it.
//!
//! What happens to a domain is in the submodules, one concern each: [`launch`] (starting its
//! guest process), [`lifecycle`] (watching it, what happens when it ends, shutdown and
//! destroy), [`save_restore`], [`migrate_out`] (sending it to another host), [`incoming`]
//! (the bookkeeping of guests arriving) and [`adoption`] (guests left by a previous daemon).
//! Whether a guest may start at all is decided in [`crate::admission`].

mod adoption;
mod incoming;
mod launch;
mod lifecycle;
mod migrate_out;
mod save_restore;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_api::vmm::VmmRunState;
use tern_api::{DomainInfo, DomainState};
use tern_config::DomainConfig;
use tern_vmm::record::{write_atomically, DomainDir};

use crate::admission::Resident;
use crate::guest_process::Control;
use crate::pool::PoolLink;
use crate::trust::HostTrust;

pub use incoming::Resumption;
pub(crate) use launch::Launch;
pub(crate) use migrate_out::{resolve, server_name};

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
    /// Its migration to another host, from the request until it ends.
    outgoing: Option<migrate_out::Outgoing>,
}

impl Domain {
    /// A domain entering the table; its process is not started yet.
    fn starting(id: u32, uuid: String, config: DomainConfig, dir: DomainDir) -> Self {
        Domain {
            id,
            uuid,
            config,
            dir,
            life: Life::Starting,
            restarts: Vec::new(),
            outgoing: None,
        }
    }

    /// How admission sees this domain beside a new one.
    fn resident(&self) -> Resident<'_> {
        Resident {
            id: self.id,
            name: &self.config.name,
            uuid: &self.uuid,
            memory_mib: self.config.memory_mib,
            holds_memory: !matches!(self.life, Life::Ended(_)),
        }
    }
}

/// What this host lets its guests have.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    /// CPU features guests do not get (see `tern_machine::cpuid::hide_features`).
    pub hidden_cpu_features: Vec<String>,
    /// The most RAM all guests may have together, MiB.
    pub guest_memory_mib: Option<u64>,
    /// How guest processes are contained.
    pub sandbox: tern_config::SandboxConfig,
}

/// The daemon's view of its domains.
pub struct Registry {
    state_dir: PathBuf,
    policy: HostPolicy,
    /// This host's relocation identity and whom it trusts.
    trust: Arc<HostTrust>,
    /// The pool this host is one of, if any.
    pool: Option<Arc<PoolLink>>,
    domains: Mutex<BTreeMap<u32, Domain>>,
    /// Signalled on every change, for requests that wait for one.
    changed: Condvar,
}

/// Where each domain's directory is (named by its ID).
fn domains_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("domains")
}

impl Registry {
    /// A registry keeping its domains under `state_dir`.
    pub fn new(
        state_dir: &Path,
        policy: HostPolicy,
        trust: Arc<HostTrust>,
        pool: Option<Arc<PoolLink>>,
    ) -> anyhow::Result<Arc<Self>> {
        let dir = domains_dir(state_dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        incoming::prepare_records(state_dir)?;
        Ok(Arc::new(Registry {
            state_dir: state_dir.to_path_buf(),
            policy,
            trust,
            pool,
            domains: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
        }))
    }

    /// The table; a panic elsewhere while holding it leaves it usable.
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

    /// The directory of a domain, for requests that need only it.
    pub fn dir_of(&self, key: &str) -> anyhow::Result<DomainDir> {
        self.find(key).map(|(_, dir, _)| dir)
    }

    fn set_life(&self, id: u32, life: Life) {
        if let Some(d) = self.lock().get_mut(&id) {
            d.life = life;
        }
        self.note_change();
    }

    /// Removes a domain and its directory.
    fn forget(&self, id: u32) {
        if let Some(d) = self.lock().remove(&id) {
            let _ = std::fs::remove_dir_all(d.dir.path());
        }
        self.note_change();
    }

    /// Removes a domain that ended here for good, and in a pool its ownership record (kept if
    /// the guest moved to another host: the record names that host then).
    fn forget_for_good(&self, id: u32) {
        // Released first: whoever waits for the domain to go then finds the record gone too.
        let uuid = self.lock().get(&id).map(|d| d.uuid.clone());
        if let (Some(pool), Some(uuid)) = (&self.pool, uuid) {
            pool.release(&uuid);
        }
        self.forget(id);
    }

    /// Wakes whoever waits for a change, and tells the pool this host's load.
    fn note_change(&self) {
        self.changed.notify_all();
        if let Some(pool) = &self.pool {
            let (guests, memory) = self
                .lock()
                .values()
                .filter(|d| !matches!(d.life, Life::Ended(_)))
                .fold((0u32, 0u64), |(n, m), d| (n + 1, m + d.config.memory_mib));
            pool.publish_load(guests, memory);
        }
    }

    /// The pool this host is one of, if any.
    pub fn pool(&self) -> Option<&Arc<PoolLink>> {
        self.pool.as_ref()
    }

    /// This host's relocation identity and whom it trusts.
    pub fn trust(&self) -> &HostTrust {
        &self.trust
    }

    /// What this host lets its guests have.
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

    /// Waits until domain `id` is gone from the table, or `timeout` passes.
    fn wait_gone(&self, id: u32, timeout: Duration) -> bool {
        self.wait_until(timeout, |d| !d.contains_key(&id))
    }

    /// Every domain's UUID and life.
    pub fn list_lives(&self) -> Vec<(String, Life)> {
        self.lock()
            .values()
            .map(|d| (d.uuid.clone(), d.life.clone()))
            .collect()
    }

    /// Rows for `tern list`.
    pub fn list(&self) -> Vec<DomainInfo> {
        // Copied out first: asking guest processes for their status must not hold the table.
        // Taken under the lock; the guest processes are asked after it.
        let snapshot: Vec<(DomainInfo, DomainDir, Life)> = self
            .lock()
            .values()
            .map(|d| {
                let info = DomainInfo {
                    name: d.config.name.clone(),
                    id: d.id,
                    uuid: d.uuid.clone(),
                    memory_mib: d.config.memory_mib,
                    vcpus: d.config.vcpus,
                    state: DomainState::Paused,
                    cpu_time_s: 0.0,
                    note: None,
                    disks: d.config.disks.iter().map(domain_disk).collect(),
                };
                (info, d.dir.clone(), d.life.clone())
            })
            .collect();
        // A host cut off from etcd cannot hand its guests over: say so on each.
        let pool_note = self
            .pool
            .as_ref()
            .map(|p| p.health())
            .filter(|h| !h.reachable)
            .map(|h| {
                format!(
                    "pool: etcd unreachable, no migration until it is back ({})",
                    h.error.unwrap_or_default()
                )
            });
        snapshot
            .into_iter()
            .map(|(info, dir, life)| {
                let (state, cpu_ns, note) = list_state(&dir, life);
                DomainInfo {
                    state,
                    cpu_time_s: cpu_ns as f64 / 1e9,
                    note: note.or_else(|| pool_note.clone()),
                    ..info
                }
            })
            .collect()
    }
}

/// A disk as `tern list` shows it.
fn domain_disk(disk: &tern_config::DiskSpec) -> tern_api::DomainDisk {
    use tern_config::DiskBackend;
    let (kind, target) = match &disk.backend {
        DiskBackend::File(path) => ("file", path.display().to_string()),
        DiskBackend::Phy(path) => ("phy", path.display().to_string()),
        DiskBackend::Nbd { host, port, export } => (
            "nbd",
            format!("{host}:{port}/{}", export.as_deref().unwrap_or("")),
        ),
    };
    tern_api::DomainDisk {
        vdev: disk.vdev.clone(),
        kind: kind.into(),
        target,
        writable: disk.writable,
    }
}

/// A domain's state, CPU time (ns) and note for `tern list`; a live one is asked.
fn list_state(dir: &DomainDir, life: Life) -> (DomainState, u64, Option<String>) {
    match life {
        Life::Live { .. } => match Control::connect(dir).and_then(|mut c| c.status()) {
            Ok(s) => (run_state(s.state), s.cpu_time_ns, s.note),
            Err(_) => (DomainState::Crashed, 0, None),
        },
        Life::Incoming { source, .. } => (
            DomainState::Incoming,
            0,
            Some(format!("arriving from {source}")),
        ),
        Life::Starting => (DomainState::Paused, 0, None),
        Life::Ended(state) => (state, 0, crash_note(dir, state)),
    }
}

/// Why a crashed domain's process ended, as it or its sandbox recorded it.
fn crash_note(dir: &DomainDir, state: DomainState) -> Option<String> {
    if state != DomainState::Crashed {
        return None;
    }
    let text = std::fs::read(dir.exit_file()).ok()?;
    match serde_json::from_slice(&text).ok()? {
        tern_api::vmm::ExitReason::Crash { message } => Some(message),
        _ => None,
    }
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
