//! The daemon ↔ guest-process control protocol, spoken on `<domain dir>/control.sock`.

use serde::{Deserialize, Serialize};

/// What the daemon asks a guest process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VmmRequest {
    Status,
    Pause,
    /// Let the guest run again. `force`: even when a migration's outcome is unresolved (the
    /// guest may then run on two hosts).
    Unpause {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Press the ACPI power button.
    PowerButton,
    /// Stop the guest and end the process.
    Destroy,
    /// Tests only (the daemon's `[sandbox] test_requests`): attempt a system call no thread of
    /// a guest process may make (`execve`), which its filter must stop by ending the process.
    TestForbiddenCall,
    /// Switch this connection to a console stream ([`crate::console`] frames out, raw input in).
    Console,
    /// Keep this connection open and send [`VmmEvent`]s until the process ends.
    Monitor,
    /// Write a checkpoint to `path`; the process ends afterwards unless `keep_running`. What
    /// a daemon asks of a guest process of an earlier build, which opens the file itself.
    Save {
        path: String,
        keep_running: bool,
    },
    /// Write a checkpoint into a file the daemon opened (its final place is `path`). The
    /// process answers `Ok`; the daemon passes two descriptors, one byte with `SCM_RIGHTS`
    /// each: the file, then the same file opened with O_DIRECT (the byte alone where the file
    /// system has no O_DIRECT). Progress and `Saved` follow, the file flushed to disk. Unless
    /// `keep_running`, the process then waits for [`VmmRequest::SavePlaced`] before it ends.
    SaveInto {
        path: String,
        keep_running: bool,
    },
    /// After `SaveInto`: whether the daemon gave the checkpoint its final name. Without it
    /// (`placed: false`, or no answer), the save failed and the guest runs on.
    SavePlaced {
        placed: bool,
    },
    /// Migrate the guest over a connection the daemon opened to `destination`'s relocation
    /// server. The process answers `Ok`; the daemon then passes the connection's descriptor
    /// (one byte with `SCM_RIGHTS`), and progress and the outcome follow.
    Migrate {
        destination: String,
        /// The destination's host as the user named it (for a CA-signed certificate's name).
        server_name: String,
        migration_id: String,
        #[serde(flatten)]
        options: crate::messages::MigrateOptions,
        security: LinkSecurity,
        /// The daemon keeps the guest's ownership in a pool: at the commit point the process
        /// asks it ([`VmmReply::HandingOver`]) and goes on only if it answers
        /// [`VmmRequest::HandoverDecision`] with `allowed`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ask_handover: bool,
    },
    /// The daemon's answer to [`VmmReply::HandingOver`]: whether the guest is the
    /// destination's now (its ownership moved), or why not.
    HandoverDecision {
        allowed: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Post-copy migration `migration_id`, arriving here, goes on over a new connection from
    /// the source: the process answers `Ok`, then the daemon passes the connection's
    /// descriptor (one byte with `SCM_RIGHTS`).
    ResumePostcopy {
        migration_id: String,
    },
    /// Cancel the migration under way: the engine gives up at its next check (within a
    /// record or a short wait) unless it is past the commit point. Answered at once: `Ok` if
    /// the cancel is accepted (it cannot pass the commit point any more), `Error` saying why
    /// not (not migrating, or already handing over).
    CancelMigration,
}

/// How a guest process secures a relocation connection, as its daemon tells it: paths and
/// fingerprints (`sha256:…`), not key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LinkSecurity {
    /// Plaintext (`[relocation] insecure = true`).
    Insecure,
    /// Mutual TLS 1.3 with this host's identity; the peer's key must be one of `trusted` or
    /// certified by the CA in `ca_file`.
    Tls {
        cert_file: std::path::PathBuf,
        key_file: std::path::PathBuf,
        trusted: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<std::path::PathBuf>,
    },
}

impl LinkSecurity {
    /// The same identity, trusting only the key `peer` (for a second session with a peer
    /// already authenticated).
    pub fn pinned_to(&self, peer: String) -> LinkSecurity {
        match self {
            LinkSecurity::Insecure => LinkSecurity::Insecure,
            LinkSecurity::Tls {
                cert_file,
                key_file,
                ..
            } => LinkSecurity::Tls {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                trusted: vec![peer],
                ca_file: None,
            },
        }
    }
}

/// Run state of the guest inside its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmRunState {
    Running,
    Blocked,
    Paused,
    /// A checkpoint is being written.
    Saving,
    /// The guest is being sent to another host.
    Migrating,
}

/// Answer to [`VmmRequest::Status`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmStatus {
    pub state: VmmRunState,
    pub cpu_time_ns: u64,
    pub pid: u32,
    /// A migration in progress or unresolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a guest process ended (also written to `<domain dir>/exit.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off.
    Poweroff,
    /// The guest asked for a reset.
    Reboot,
    /// The guest crashed or panicked.
    Crash { message: String },
    /// Destroyed on request.
    Destroyed,
    /// Saved to a checkpoint and stopped.
    Saved,
    /// Migrated: the guest runs on `destination` now.
    Migrated { destination: String },
    /// An incoming migration did not complete; nothing of the guest ran here.
    IncomingAborted { message: String },
}

/// Pushed on a monitor connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VmmEvent {
    /// The process is about to end, for this reason.
    Exiting(ExitReason),
    /// An incoming migration completed: the guest is this host's now.
    Committed,
    /// An incoming migration has the guest loaded: may it arrive? The daemon answers on the
    /// monitor connection with [`VmmRequest::HandoverDecision`]; the process says `Ready` to
    /// the source only if allowed.
    MayArrive { migration_id: String },
    /// Migration `migration_id` reached its handover and the guest stays here after all (the
    /// destination never ran it): in a pool its ownership comes back. Sent to the monitors of
    /// the moment, or kept until a daemon attaches.
    StaysHere { migration_id: String },
}

/// Reply of the guest process to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmmReply {
    Ok,
    /// Done, and the user should know `message` (e.g. a forced unpause of a guest lost in
    /// post-copy).
    Warning {
        message: String,
    },
    Status(VmmStatus),
    Error {
        message: String,
    },
    Progress(crate::messages::Progress),
    Saved(crate::messages::SaveSummary),
    MigrationProgress(crate::messages::MigrationProgress),
    Migrated(Box<crate::messages::MigrationSummary>),
    /// A migration reached its commit point: may the guest become the destination's? (Asked
    /// only when the daemon said `ask_handover`.)
    HandingOver {
        migration_id: String,
    },
}

/// First line a guest process prints on stdout: it is ready, or it failed to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmmStartup {
    Ready {
        pid: u32,
        /// Present when the guest was restored from a checkpoint.
        #[serde(default)]
        restore: Option<crate::messages::RestoreSummary>,
    },
    Failed {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpause_without_force_is_the_old_request() {
        let old: VmmRequest = serde_json::from_str(r#"{"op":"unpause"}"#).unwrap();
        assert_eq!(old, VmmRequest::Unpause { force: false });
        let s = serde_json::to_string(&VmmRequest::Unpause { force: false }).unwrap();
        assert_eq!(s, r#"{"op":"unpause"}"#);
        let forced: VmmRequest = serde_json::from_str(r#"{"op":"unpause","force":true}"#).unwrap();
        assert_eq!(forced, VmmRequest::Unpause { force: true });
    }
}
