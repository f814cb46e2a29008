//! The bookkeeping of guests arriving from other hosts: one record per migration ID
//! (`migrations/<id>.json`), kept after the domain is gone so that a source that lost the
//! connection can still learn whether the guest runs here.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tern_api::vmm::{ExitReason, VmmRequest};

use tern_config::DiskBackend;
use tern_migration::Outcome;
use tern_storage::IncomingImage;
use tern_vmm::record::{DomainDir, IncomingSpec, IncomingState};

use super::{Life, Registry};
use crate::admission::{admit_resume, Refusal};
use crate::guest_process::Control;

/// What became of a source's request to resume a post-copy migration.
pub enum Resumption {
    /// The guest process of domain `id` took the connection over.
    Taken { id: u32 },
    /// The migration cannot go on: how it ended (or that it is not decided yet).
    Over(Outcome),
    /// This peer may not resume it.
    Refused(Refusal),
}

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
            Some(IncomingState::Lost) => Outcome::Lost,
            // The guest runs here but is not whole yet: its source must keep its copy.
            Some(IncomingState::Postcopy) => match self.postcopy_domain(migration_id) {
                Some((_, _, pid, _)) if crate::process_alive(pid) => Outcome::Pending,
                _ => Outcome::Lost,
            },
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

    /// The running domain that receives post-copy migration `migration_id`: its ID,
    /// directory, process and incoming spec.
    fn postcopy_domain(&self, migration_id: &str) -> Option<(u32, DomainDir, u32, IncomingSpec)> {
        let live: Vec<(u32, DomainDir, u32)> = self
            .lock()
            .values()
            .filter_map(|d| match d.life {
                Life::Live { pid } => Some((d.id, d.dir.clone(), pid)),
                _ => None,
            })
            .collect();
        live.into_iter().find_map(|(id, dir, pid)| {
            let spec = dir.load_record().ok()?.incoming?;
            (spec.offer.migration_id == migration_id).then_some((id, dir, pid, spec))
        })
    }

    /// The source of post-copy migration `migration_id` came back on `connection` (after a
    /// lost one), showing key `peer`: hands the connection to the guest process receiving
    /// it, or says why it cannot go on.
    pub fn resume_postcopy(
        &self,
        migration_id: &str,
        peer: Option<&str>,
        connection: &TcpStream,
    ) -> Resumption {
        if !valid_migration_id(migration_id)
            || IncomingState::load(&self.migration_file(migration_id))
                != Some(IncomingState::Postcopy)
        {
            return Resumption::Over(self.migration_outcome(migration_id));
        }
        let Some((id, dir, pid, spec)) = self.postcopy_domain(migration_id) else {
            return Resumption::Over(Outcome::Lost);
        };
        if let Err(refusal) = admit_resume(migration_id, peer, &spec.security) {
            return Resumption::Refused(refusal);
        }
        let request = VmmRequest::ResumePostcopy {
            migration_id: migration_id.to_string(),
        };
        let passed = Control::connect(&dir)
            .and_then(|mut control| control.hand_over(&request, connection.as_raw_fd()));
        match passed {
            Ok(()) => Resumption::Taken { id },
            Err(e) => {
                log::warn!("cannot resume migration {migration_id} in domain {id}: {e:#}");
                // A process that died has not been noticed yet: the source asks again.
                Resumption::Over(if crate::process_alive(pid) {
                    Outcome::Pending
                } else {
                    Outcome::Lost
                })
            }
        }
    }

    /// A running domain's process ended: if it was still receiving its memory in post-copy,
    /// its state since the handover is gone. Records that (the source, asking, learns it),
    /// forgets the domain, and says so.
    pub(super) fn postcopy_died(&self, id: u32, dir: &DomainDir) -> bool {
        let Some(spec) = dir.load_record().ok().and_then(|r| r.incoming) else {
            return false;
        };
        if IncomingState::load(&spec.state_file) != Some(IncomingState::Postcopy) {
            return false;
        }
        if let Err(e) = IncomingState::Lost.store(&spec.state_file) {
            log::error!("{e:#}");
        }
        log::error!(
            "domain {id} ended during post-copy (migration {}): its state since the handover \
             is lost; its source keeps its last whole copy, paused",
            spec.offer.migration_id
        );
        self.forget(id);
        true
    }

    /// The guest arriving in domain `id` is loaded: may it arrive? In a pool, only if this host
    /// can reach etcd now and the guest is still another host's to hand over.
    pub(super) fn may_arrive(&self, id: u32, migration_id: &str) -> VmmRequest {
        let uuid = self.lock().get(&id).map(|d| d.uuid.clone());
        let verdict = match (&self.pool, uuid) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(anyhow::anyhow!("domain {id} is gone")),
            (Some(pool), Some(uuid)) => pool.confirm_arrival(&uuid).map(|_| ()),
        };
        match verdict {
            Ok(()) => VmmRequest::HandoverDecision {
                allowed: true,
                reason: None,
            },
            Err(e) => {
                log::warn!("incoming migration {migration_id} may not arrive: {e:#}");
                VmmRequest::HandoverDecision {
                    allowed: false,
                    reason: Some(format!("{e:#}")),
                }
            }
        }
    }

    /// Domain `id` stayed here after migration `migration_id` passed its handover (the
    /// destination never ran it): in a pool, its ownership record comes back here.
    pub(super) fn stays_here(&self, id: u32, migration_id: &str) {
        let uuid = self.lock().get(&id).map(|d| d.uuid.clone());
        if let (Some(pool), Some(uuid)) = (&self.pool, uuid) {
            pool.take_back(&uuid, migration_id);
        }
    }

    /// An arriving guest was handed over: it is this host's now. (Told again, in post-copy,
    /// once every page is here.)
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
        let arrived = domains.get(&id).map(|d| (d.uuid.clone(), d.dir.clone()));
        drop(domains);
        self.note_change();
        // Final once the guest is whole here: a post-copy guest lost before its last page
        // goes back to its source, which runs its copy.
        if let (Some(pool), Some((uuid, dir))) = (&self.pool, arrived) {
            let state = dir
                .load_record()
                .ok()
                .and_then(|r| r.incoming)
                .and_then(|spec| IncomingState::load(&spec.state_file));
            if state == Some(IncomingState::Committed) {
                pool.settle(&uuid);
            }
        }
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
        } else {
            if let Err(e) = IncomingState::Aborted.store(&file) {
                log::error!("{e:#}");
            }
            // A process killed outright could not remove the disks it was receiving.
            let dir = self.lock().get(&id).map(|d| d.dir.clone());
            if let Some(dir) = dir {
                remove_arriving_disks(&dir);
            }
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

/// Removes the temporary images of the disks an incoming migration into domain directory
/// `dir` was copying (`--copy-storage`); their final names were never given.
fn remove_arriving_disks(dir: &DomainDir) {
    let Ok(record) = dir.load_record() else {
        return;
    };
    let Some(spec) = &record.incoming else {
        return;
    };
    for copied in &spec.offer.copy_disks {
        let disk = record.config.disks.iter().find(|d| d.vdev == copied.vdev);
        let Some(DiskBackend::File(path)) = disk.map(|d| &d.backend) else {
            continue;
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            continue;
        };
        let partial = IncomingImage::partial_path_of(parent, name);
        match std::fs::remove_file(&partial) {
            Ok(()) => log::info!(
                "removed {} (the migration did not complete)",
                partial.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", partial.display()),
        }
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
