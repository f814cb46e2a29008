//! The domain directory shared by the daemon and a guest process.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_config::DomainConfig;

/// What the daemon tells a guest process to run (`domain.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub id: u32,
    pub uuid: String,
    pub config: DomainConfig,
    /// Start with the vCPUs paused.
    pub start_paused: bool,
    /// Restore from a checkpoint instead of booting the kernel.
    #[serde(default)]
    pub restore: Option<RestoreSpec>,
    /// CPU features the host does not offer guests (the daemon's `hide_cpu_features`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_cpu_features: Vec<String>,
    /// Receive the guest from a migration instead of booting the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingSpec>,
    /// How the process contains itself (the daemon's `[sandbox]`).
    #[serde(default)]
    pub sandbox: tern_config::SandboxConfig,
}

/// An incoming migration, as the daemon hands it to the guest process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncomingSpec {
    /// The connection from the source, inherited as this file descriptor.
    pub fd: i32,
    /// The source's address, for messages.
    pub source: String,
    /// Where the process records the migration's [`IncomingState`] (outside the domain
    /// directory: the answer to a source's question must outlive the domain).
    pub state_file: PathBuf,
    /// What the source offered (and the daemon accepted).
    pub offer: tern_migration::Offer,
    /// How the stream's session is secured: TLS pinned to the key the source showed the
    /// daemon, or plaintext when this host runs `insecure`.
    pub security: tern_migration::link::LinkSecurity,
    /// The daemon keeps guests' ownership in a pool: before saying `Ready` the process asks it
    /// whether the guest may arrive ([`tern_api::vmm::VmmEvent::MayArrive`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ask_arrival: bool,
}

/// Where an incoming migration stands (`incoming.json`). The guest process moves it forward;
/// the daemon reads it to answer a source that lost the connection after `Go`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingState {
    /// The stream is arriving.
    Receiving,
    /// The state is loaded; waiting for `Go`.
    Ready,
    /// `Go` arrived for a post-copy migration: the guest is this host's and runs, and the
    /// rest of its pages are arriving.
    Postcopy,
    /// `Go` arrived (and, for post-copy, every page): the guest is this host's.
    Committed,
    /// The migration failed here; the guest never ran here.
    Aborted,
    /// Post-copy: the guest ran here and its process ended before every page had arrived;
    /// its state since the handover is gone.
    Lost,
}

/// Where and how to restore from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub path: PathBuf,
    /// Load and verify all memory before the guest runs (instead of on demand).
    pub copy: bool,
}

impl IncomingState {
    /// The state recorded in `path`, if any.
    pub fn load(path: &Path) -> Option<IncomingState> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records the state in `path` before it is acted on. Not flushed to disk: it must survive
    /// the process, not the host (after a host crash the guest is gone anyway), and the commit
    /// is on the downtime's critical path.
    pub fn store(self, path: &Path) -> anyhow::Result<()> {
        replace_file(path, &serde_json::to_vec(&self)?)
    }
}

/// Paths inside one domain's directory (`<state_dir>/domains/<id>`).
#[derive(Clone, Debug)]
pub struct DomainDir(PathBuf);

impl DomainDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DomainDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn record(&self) -> PathBuf {
        self.0.join("domain.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    pub fn exit_file(&self) -> PathBuf {
        self.0.join("exit.json")
    }

    pub fn process_log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.0.join("vmm.pid")
    }

    /// Where the process names the system call its sandbox killed it for.
    pub fn violation_file(&self) -> PathBuf {
        self.0.join("sandbox-violation")
    }

    /// The control-group directories the daemon put the process in (one per line).
    pub fn cgroup_file(&self) -> PathBuf {
        self.0.join("cgroup")
    }

    /// Reads `domain.json`.
    pub fn load_record(&self) -> anyhow::Result<DomainRecord> {
        let text = std::fs::read_to_string(self.record())
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.record().display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is malformed: {e}", self.record().display()))
    }

    /// Writes `domain.json` atomically.
    pub fn save_record(&self, record: &DomainRecord) -> anyhow::Result<()> {
        write_atomically(&self.record(), &serde_json::to_vec_pretty(record)?)
    }
}

/// Writes `data` to `path` through a temporary file, flushed to disk, and a rename, so that
/// readers see either the old or the new content, never a torn one, even after a crash.
pub fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_and_rename(path, data, true)
}

/// Like [`write_atomically`] without the flush: atomic for readers and across a crash of the
/// process, not of the host.
pub fn replace_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_and_rename(path, data, false)
}

fn write_and_rename(path: &Path, data: &[u8], flush: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(data)?;
    if flush {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot rename {} into place: {e}", tmp.display()))?;
    Ok(())
}
