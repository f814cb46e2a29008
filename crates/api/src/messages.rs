//! The CLI ↔ daemon API.

use serde::{Deserialize, Serialize};

/// A request from `tern` to the daemon. Domains are named by name or numeric ID.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    /// Create a guest from a parsed config (as JSON, see tern-config's `DomainConfig`).
    Create {
        config: serde_json::Value,
        paused: bool,
    },
    Console {
        domain: String,
        dump: bool,
        timestamps: bool,
    },
    Pause {
        domain: String,
    },
    Unpause {
        domain: String,
        /// Even when a migration's outcome is unresolved (the guest may then run on two hosts).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    Shutdown {
        domain: String,
        wait: bool,
    },
    Destroy {
        domain: String,
    },
    /// Write the guest's state to `path` (absolute); the guest ends unless `keep_running`.
    Save {
        domain: String,
        path: String,
        keep_running: bool,
    },
    /// Bring a guest back from a checkpoint (absolute `path`). `copy` loads all memory
    /// before the guest runs instead of on demand.
    Restore {
        path: String,
        paused: bool,
        copy: bool,
    },
    /// Move a guest to the daemon whose relocation server listens at `destination`
    /// (`host[:port]`).
    Migrate {
        domain: String,
        destination: String,
        #[serde(flatten)]
        options: MigrateOptions,
    },
    /// Cancel the outgoing migration of a guest of this host (before the handover's commit
    /// point: the guest stays here as it was and the destination discards what it built).
    /// Answered with a [`MigrationCancel`] once the migration has stopped.
    CancelMigration {
        domain: String,
    },
    /// This host's relocation key fingerprint (`sha256:…`).
    Fingerprint,
    /// Trust the host whose key has `fingerprint` for migrations in both directions.
    TrustAdd {
        fingerprint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The trusted hosts.
    TrustList,
    /// Stop trusting a host, named by fingerprint or name.
    TrustRemove {
        host: String,
    },
    /// The hosts of this host's pool, with their state (a list of tern-pool `HostView`s).
    PoolHosts,
    /// Every guest of the pool and its host (a list of tern-pool `GuestRecord`s).
    PoolGuests,
    /// Move every guest of `host` (this host) to the other hosts of the pool, as planned from
    /// their free memory, CPU features and policies; `host` is in maintenance from then on.
    /// Progress: [`EvacuationEvent`]s; answered with an [`EvacuationSummary`] (with
    /// `dry_run`, the plan only, nothing moved or changed).
    Evacuate {
        host: String,
        live: bool,
        parallel: u32,
        dry_run: bool,
    },
    /// End `host`'s maintenance: guests may be placed on it again.
    ResumeHost {
        host: String,
    },
}

/// One step of an evacuation, as it happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EvacuationEvent {
    /// What goes where (the plan, as `EvacuationSummary::moves`).
    Plan { moves: Vec<PlannedMove> },
    /// A guest's migration progressed.
    Progress {
        guest: String,
        to: String,
        progress: MigrationProgress,
    },
    /// A guest's migration ended.
    Moved {
        guest: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<f64>,
    },
}

/// One guest's place in an evacuation plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub guest: String,
    pub uuid: String,
    pub memory_mib: u64,
    /// The destination's name in the pool, and its relocation address.
    pub to: String,
    pub address: String,
}

/// What an evacuation did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvacuationSummary {
    pub host: String,
    pub dry_run: bool,
    pub moves: Vec<PlannedMove>,
    /// Guests that now run elsewhere.
    pub moved: Vec<String>,
    /// Guests still here, and why.
    pub failed: Vec<(String, String)>,
    pub total_seconds: f64,
}

/// How to migrate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Pre-copy memory while the guest runs (otherwise: pause, copy, resume there).
    pub live: bool,
    /// Cap on the transfer rate, in megabits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_mbit: Option<u64>,
    /// The longest the guest may be paused at the end of a live migration, in milliseconds.
    pub max_downtime_ms: u64,
    /// Migrate even a guest whose last migration's outcome is unresolved (it may then run on
    /// two hosts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Post-copy: after a short pre-copy the guest runs on the destination at once, and the
    /// pages it lacks follow (on demand first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    /// Copy the guest's `file:` disks to the destination's storage too, while it runs (for
    /// hosts that share no storage).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_storage: bool,
    /// With `copy_storage`: once the guest runs on the destination, remove the images it
    /// left here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remove_source_images: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            live: false,
            resource_mbit: None,
            max_downtime_ms: DEFAULT_MAX_DOWNTIME_MS,
            force: false,
            postcopy: false,
            copy_storage: false,
            remove_source_images: false,
        }
    }
}

/// The downtime budget of a live migration unless the user gives one.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 30;

/// One message from the daemon. A request gets any number of `Warning`s and `Progress`es,
/// then exactly one `Ok` or `Error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        #[serde(default)]
        data: serde_json::Value,
    },
    Error {
        message: String,
    },
    Warning {
        message: String,
    },
    Progress {
        data: serde_json::Value,
    },
}

impl Reply {
    /// An `Ok` carrying `data`.
    pub fn ok<T: Serialize>(data: &T) -> Reply {
        Reply::Ok {
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    /// An `Error` with `message`.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
        }
    }
}

/// A domain's state as `tern list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Its vCPUs are busy.
    Running,
    /// Its vCPUs are mostly idle (halted, waiting for an interrupt).
    Blocked,
    Paused,
    /// It powered off and is kept (on_poweroff = "preserve").
    Shutdown,
    /// It crashed, or its process died; kept until destroyed.
    Crashed,
    /// It is arriving from another host (a migration in progress).
    Incoming,
    /// A checkpoint of it is being written.
    Saving,
    /// It is being sent to another host.
    Migrating,
}

impl DomainState {
    /// The word `tern list` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "shutdown",
            DomainState::Crashed => "crashed",
            DomainState::Incoming => "incoming",
            DomainState::Saving => "saving",
            DomainState::Migrating => "migrating",
        }
    }
}

/// One row of `tern list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub id: u32,
    pub uuid: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub state: DomainState,
    pub cpu_time_s: f64,
    /// Something the state alone does not say, e.g. that a migration is in progress or that
    /// its outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The guest's disks as this host has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DomainDisk>,
}

/// A disk of a domain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainDisk {
    pub vdev: String,
    /// `file`, `phy` or `nbd`.
    pub kind: String,
    /// The image file or block device, or `HOST:PORT/EXPORT` for NBD.
    pub target: String,
    pub writable: bool,
}

/// What a save did (the summary `tern save` prints).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SaveSummary {
    pub path: String,
    pub file_bytes: u64,
    pub memory_bytes: u64,
    /// Guest pages written (pages never touched or all zero are not stored).
    pub pages_stored: u64,
    /// From the pause to the last byte handed to the kernel.
    pub write_seconds: f64,
    /// Including fsync and rename: the file is durable and complete.
    pub total_seconds: f64,
    pub kept_running: bool,
    /// Where the time went (seconds): capturing device and CPU state, finding the pages to
    /// store, writing them.
    #[serde(default)]
    pub phases: SavePhases,
}

/// Time spent in each phase of a save, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavePhases {
    pub capture: f64,
    pub scan: f64,
    pub write: f64,
    pub fsync: f64,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub id: u32,
    pub name: String,
    pub uuid: String,
    /// "lazy" or "copy".
    pub mode: String,
    /// From the start of the guest process until its vCPUs ran (or were ready, if paused).
    pub running_after_ms: f64,
    /// Until every page of the checkpoint was verified and in memory.
    pub loaded_after_ms: f64,
    pub pages_loaded: u64,
}

/// Progress of a long operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Where a migration is (sent as it goes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// "pre-copy" while the guest runs, "stop-and-copy" once it is paused, "handover".
    pub phase: String,
    /// Round of the pre-copy, from 0 (the first pass over all memory).
    pub round: u32,
    /// Pages of this round still to send.
    pub pages_left: u64,
    /// Bytes sent so far, over all rounds.
    pub bytes_sent: u64,
    /// Current transfer rate, bytes per second.
    pub rate_bps: f64,
    /// Time to send the rest of this round at the current rate.
    pub eta_seconds: Option<f64>,
    /// How much the guest's vCPUs are slowed down (auto-converge), percent.
    pub throttle_percent: u8,
    /// With `--copy-storage`: the disks' part (memory's is the rest of the fields above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskProgress>,
}

/// How far the copy of a guest's disks is (`--copy-storage`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    /// Bytes of disk data still to send in this pass or round.
    pub bytes_left: u64,
    /// Disk bytes sent so far (data only, over all rounds).
    pub bytes_sent: u64,
    /// The disks' share of the current transfer rate, bytes per second.
    pub rate_bps: f64,
    /// Time to send what is left of the disks at that rate.
    pub eta_seconds: Option<f64>,
}

/// One round of a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationRound {
    pub round: u32,
    /// Pages sent with their data.
    pub pages: u64,
    /// Pages found all zero (round 0: skipped; later: sent as a zero run).
    pub zero_pages: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Throttle in force during the round, percent.
    pub throttle_percent: u8,
    /// The last round, with the guest paused.
    pub stop_and_copy: bool,
}

/// What a migration did (the summary `tern migrate` prints).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub domain: String,
    pub destination: String,
    /// The guest's domain ID on the destination.
    pub destination_id: u32,
    pub live: bool,
    /// From the request to the destination confirming the guest runs there.
    pub total_seconds: f64,
    /// From pausing the guest here to its vCPUs running there.
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    pub rounds: Vec<MigrationRound>,
    /// Everything sent on the connection (records, state, handshake).
    pub bytes_sent: u64,
    /// Mean transfer rate over the whole migration, megabits per second.
    pub mean_rate_mbit: f64,
    /// The strongest auto-converge throttle used, percent (0: none).
    pub max_throttle_percent: u8,
    /// The longest any vCPU was kept out of the guest at one time, milliseconds: by a
    /// throttle slice, or by the pause until it ran on the destination (the downtime). What
    /// the guest feels as a stall, without a probe inside it.
    #[serde(default)]
    pub longest_vcpu_stall_ms: f64,
    /// The rate cap asked for, megabits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_mbit: Option<u64>,
    /// Why the pre-copy ended.
    pub stop_reason: String,
    /// Wall-clock times (Unix ns) of the pause here and of the resume there; comparable when
    /// both hosts' clocks agree (the same machine, or NTP).
    pub paused_unix_ns: u64,
    pub resumed_unix_ns: u64,
    /// The connection was neither authenticated nor encrypted (`insecure = true`).
    #[serde(default)]
    pub insecure: bool,
    /// A post-copy migration's last phase: the guest ran on the destination while the rest
    /// of its pages arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopySummary>,
    /// The guest's disks, copied with `--copy-storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskCopySummary>,
}

/// The copy of a guest's disks (`--copy-storage`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskCopySummary {
    /// Each disk copied: its vdev, size, and where it is on the destination.
    pub disks: Vec<CopiedDiskSummary>,
    /// Data bytes of the first pass over the images (allocated, non-zero blocks).
    pub bulk_bytes: u64,
    pub bulk_seconds: f64,
    /// Data bytes of the blocks the guest wrote meanwhile, sent again, per round after the
    /// bulk pass (the last with the guest paused).
    pub round_bytes: Vec<u64>,
    /// Disk bytes sent in all (data only).
    pub bytes_sent: u64,
    /// Bytes skipped as holes or zero blocks.
    pub bytes_skipped: u64,
}

/// One disk copied to the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CopiedDiskSummary {
    pub vdev: String,
    pub size: u64,
    /// The image on the source.
    pub source_path: String,
    /// Whether it was removed there after the move (`--remove-source-images`); else it is
    /// left in place.
    #[serde(default)]
    pub source_removed: bool,
}

/// The post-copy phase of a migration (`--postcopy`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopySummary {
    /// Pages the destination lacked when the guest started running there.
    pub pages_missing: u64,
    /// Pages fetched on demand: a fault on the destination waited for them.
    pub pages_fetched: u64,
    /// Pages pushed in the background before anything touched them.
    pub pages_pushed: u64,
    /// Faults on the destination that waited for a page from the source.
    pub faults: u64,
    /// From the guest running on the destination until every page was there, seconds.
    pub seconds_until_complete: f64,
    /// The longest any fault waited for its page, milliseconds.
    pub longest_fault_wait_ms: f64,
    /// Connections made again after one was lost.
    pub reconnects: u32,
}

impl MigrationSummary {
    /// The rate the pre-copy rounds drove the link at, megabits per second (guest data, as
    /// sent before any encryption).
    pub fn precopy_rate_mbit(&self) -> f64 {
        let (bytes, seconds) = self
            .rounds
            .iter()
            .filter(|r| !r.stop_and_copy)
            .fold((0u64, 0.0), |(b, s), r| (b + r.bytes, s + r.seconds));
        bytes as f64 * 8.0 / seconds.max(1e-9) / 1e6
    }
}

/// What cancelling a migration did (the confirmation `tern migrate --cancel` prints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationCancel {
    pub domain: String,
    /// Where the guest was going (the relocation server's address), when this daemon started
    /// the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The migration has ended and the guest is here as before it. False: the cancel is
    /// recorded but the migration had not stopped yet when the daemon stopped waiting (it
    /// stops at its next check, and cannot pass the commit point any more).
    pub stopped: bool,
    /// The guest's state here afterwards.
    pub state: DomainState,
}

/// The parts of a migration's downtime, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeParts {
    /// Sending the pages dirtied since the last round.
    pub last_pages_ms: f64,
    /// Capturing vCPU, VM and device state and sending it.
    pub state_ms: f64,
    /// The destination loading the state (until it said it is ready).
    pub load_ms: f64,
    /// Ready, go and the resume there.
    pub handover_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::Pause {
            domain: "g1".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"pause","domain":"g1"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn force_is_optional() {
        let old: Request = serde_json::from_str(r#"{"op":"unpause","domain":"g1"}"#).unwrap();
        assert_eq!(
            old,
            Request::Unpause {
                domain: "g1".into(),
                force: false
            }
        );
        let r = Request::Migrate {
            domain: "g1".into(),
            destination: "h2".into(),
            options: MigrateOptions {
                force: true,
                ..MigrateOptions::default()
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""force":true"#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let old =
            r#"{"op":"migrate","domain":"g1","destination":"h2","live":true,"max_downtime_ms":30}"#;
        match serde_json::from_str::<Request>(old).unwrap() {
            Request::Migrate { options, .. } => assert!(!options.force),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cancel_names_the_domain() {
        let r = Request::CancelMigration {
            domain: "g1".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"cancel_migration","domain":"g1"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::ok(&vec![1]);
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), r);
    }
}
