//! The bookkeeping of guests arriving from other hosts: one record per migration ID
//! (`migrations/<id>.json`), kept after the domain is gone so that a source that lost the
//! connection can still learn whether the guest runs here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tern_api::vmm::ExitReason;
use tern_migration::Outcome;
use tern_vmm::record::IncomingState;

use super::{Life, Registry};

/// How long records of incoming migrations are kept.
const MIGRATION_RECORD_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where the records of incoming migrations are kept.
fn migrations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("migrations")
}

/// Creates the records' directory and drops records older than [`MIGRATION_RECORD_AGE`].
pub(super) fn prepare_records(state_dir: &Path) -> anyhow::Result<()> {
    let dir = migrations_dir(state_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    prune_old_files(&dir, MIGRATION_RECORD_AGE);
    Ok(())
}

impl Registry {
    /// The state file of incoming migration `migration_id`.
    pub(crate) fn migration_file(&self, migration_id: &str) -> PathBuf {
        migrations_dir(&self.state_dir).join(format!("{migration_id}.json"))
    }

    /// What became of incoming migration `migration_id`, for a source that lost the
    /// connection after telling this host to run the guest.
    pub fn migration_outcome(&self, migration_id: &str) -> Outcome {
        if !valid_migration_id(migration_id) {
            return Outcome::Aborted;
        }
        match IncomingState::load(&self.migration_file(migration_id)) {
            // Never accepted here (or so long ago that it was forgotten).
            None | Some(IncomingState::Aborted) => Outcome::Aborted,
            Some(IncomingState::Committed) => Outcome::Committed,
            // A process that died undecided never ran the guest.
            Some(IncomingState::Receiving | IncomingState::Ready) => {
                if self.receiving_alive(migration_id) {
                    Outcome::Pending
                } else {
                    Outcome::Aborted
                }
            }
        }
    }

    /// Whether a guest process still receives migration `migration_id`.
    fn receiving_alive(&self, migration_id: &str) -> bool {
        self.lock().values().any(|d| {
            matches!(&d.life, Life::Incoming { pid, migration_id: m, .. }
                if m == migration_id && crate::process_alive(*pid))
        })
    }

    /// An arriving guest was handed over: it is this host's now.
    pub(super) fn incoming_committed(&self, id: u32) {
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

    /// The process of an arriving guest ended before the guest was handed over: nothing of it
    /// ran here. Remove everything, and remember that it did not arrive.
    pub(super) fn incoming_ended(&self, id: u32, migration_id: &str, reason: Option<ExitReason>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uuid_characters_name_a_migration_file() {
        assert!(valid_migration_id("cc0029f5-10a1-e6d0-3c92-19b0ea021f21"));
        assert!(!valid_migration_id(""));
        assert!(!valid_migration_id("../../etc/passwd"));
        assert!(!valid_migration_id(&"a".repeat(65)));
    }
}
