//! Adoption: guest processes outlive the daemon, so a restarted daemon finds them in its
//! state directory and takes them over.

use std::path::Path;
use std::sync::Arc;

use tern_vmm::record::{DomainDir, DomainRecord, IncomingState};

use super::{domains_dir, Domain, Life, Registry};

impl Registry {
    /// Finds guest processes left by a previous daemon and takes them over.
    pub fn adopt_existing(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(domains_dir(&self.state_dir)) else {
            return;
        };
        for entry in entries.flatten() {
            // Only directories named by a domain ID are domains.
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            {
                self.adopt(id, &entry.path());
            }
        }
    }

    /// Takes over domain `id` from its directory `path`; a process that is gone ends it.
    fn adopt(self: &Arc<Self>, id: u32, path: &Path) {
        let dir = DomainDir::new(path.to_path_buf());
        let record = match dir.load_record() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ignoring {}: {e:#}", path.display());
                return;
            }
        };
        let domain = Domain::starting(id, record.uuid.clone(), record.config.clone(), dir.clone());
        self.lock().insert(id, domain);
        self.set_life(id, adopted_life(&record, read_pid(&dir)));
        match self.watch(id, &dir, None) {
            Ok(()) => log::info!("adopted running domain {id} ('{}')", record.config.name),
            Err(_) => self.guest_ended(id, None),
        }
    }
}

/// The pid its guest process wrote down; 0 if none.
fn read_pid(dir: &DomainDir) -> u32 {
    std::fs::read_to_string(dir.pid_file())
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

/// An adopted domain is still arriving unless its migration was committed (in post-copy
/// too: the guest runs here then).
fn adopted_life(record: &DomainRecord, pid: u32) -> Life {
    let arrived = |spec: &tern_vmm::record::IncomingSpec| {
        matches!(
            IncomingState::load(&spec.state_file),
            Some(IncomingState::Committed | IncomingState::Postcopy)
        )
    };
    match &record.incoming {
        Some(spec) if !arrived(spec) => Life::Incoming {
            pid,
            migration_id: spec.offer.migration_id.clone(),
            source: spec.source.clone(),
        },
        _ => Life::Live { pid },
    }
}
