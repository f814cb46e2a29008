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
}

/// Where and how to restore from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub path: PathBuf,
    /// Load and verify all memory before the guest runs (instead of on demand).
    pub copy: bool,
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

/// Writes `data` to `path` through a temporary file and a rename, so that readers see either
/// the old or the new content, never a torn one.
pub fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot rename {} into place: {e}", tmp.display()))?;
    Ok(())
}
