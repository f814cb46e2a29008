//! The relocation protocol: what the two sides of a migration say to each other around the
//! record stream.
//!
//! Messages are JSON lines (see `tern_api::framing`). A migration goes:
//!
//! ```text
//! source                                   destination (relocation server, then guest process)
//!   Offer ───────────────────────────────▶  checks version, CPU, memory, name/UUID, devices
//!         ◀─────────────────────────────── Accept { domain_id }  |  Refuse { reason }
//!   record stream: header, INFO, CONFIG,
//!   rounds of PAGES/ZEROS, MARK after each ▶ applies pages in order
//!         ◀─────────────────────────────── Marked { seq }  (for each MARK)
//!   (guest paused) last PAGES, MACHINE,
//!   VCPU…, DEVICE…, END ─────────────────▶  loads the state, guest paused
//!         ◀─────────────────────────────── Ready   |  Abort { reason } at any time before
//!   Go { resume } ───────────────────────▶  commits, resumes, announces the guest's MACs
//!         ◀─────────────────────────────── Running { … }
//! ```
//!
//! Until `Go` is sent the guest belongs to the source: any failure leaves (or puts) it running
//! there and the destination discards what it built. After `Go` it belongs to the
//! destination. If `Running` does not arrive the source cannot know whether `Go` did, so it
//! keeps the guest paused and asks the destination with `Query` until it gets a definite
//! `Outcome`.
//!
//! Version 2 adds post-copy (see [`crate::postcopy`]): the state goes with MISSING records
//! naming the pages the destination still lacks, and after `Running` the destination asks for
//! pages (`Want`) while the source pushes the rest, until it reports `Arrived`. A source
//! that lost the connection then comes back with `Resume`; the destination first says what it
//! still lacks (`Lacking`). A source offers version 2 only for a post-copy migration, so a
//! destination of the previous release takes its other migrations and refuses post-copy ones
//! at admission, naming the versions.

use serde::{Deserialize, Serialize};
use tern_snapshot::Info;

/// Newest version of this protocol (the messages and their order): 2 adds post-copy, 3
/// copying disks (DISK and DISK_ZEROS records).
pub const PROTOCOL_VERSION: u32 = 3;
/// Oldest version a destination accepts: what sources offer for migrations without
/// post-copy (and what the previous release speaks).
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
/// The first version with post-copy.
pub const POSTCOPY_PROTOCOL_VERSION: u32 = 2;

/// The first version with disks copied in the stream (`--copy-storage`).
pub const COPY_STORAGE_PROTOCOL_VERSION: u32 = 3;

/// The version a source offers: the oldest that has what the migration needs.
pub fn protocol_for(postcopy: bool, copy_storage: bool) -> u32 {
    if copy_storage {
        COPY_STORAGE_PROTOCOL_VERSION
    } else if postcopy {
        POSTCOPY_PROTOCOL_VERSION
    } else {
        OLDEST_PROTOCOL_VERSION
    }
}

/// A disk the source copies to the destination (`--copy-storage`); DISK records name it by
/// its position in [`Offer::copy_disks`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedDisk {
    /// Its vdev in the guest config (a `file:` disk there).
    pub vdev: String,
    /// Size of the image, bytes.
    pub size: u64,
    /// Bytes allocated in the image on the source: what the destination must have room for.
    pub allocated: u64,
}

/// One CPUID entry of a vCPU (KVM's `kvm_cpuid_entry2` without padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The source's proposal: who the guest is and what it needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// [`PROTOCOL_VERSION`] of the source.
    pub protocol: u32,
    /// Checkpoint format version of the record stream that follows.
    pub stream_format: u32,
    /// Names this attempt in queries and logs.
    pub migration_id: String,
    pub live: bool,
    /// Post-copy: the guest may run on the destination before all its pages have arrived
    /// (protocol version 2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    /// Disks whose images come in the stream (protocol version 3); the destination places
    /// them in storage of its own choosing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_disks: Vec<CopiedDisk>,
    /// What the stream's INFO record will say (name, UUID, memory, vCPUs, CPU features).
    pub info: Info,
    /// The guest's configuration (tern-config's `DomainConfig` as JSON).
    pub config: serde_json::Value,
    /// The CPUID of each vCPU, so that the destination can build the machine before the state
    /// arrives.
    pub vcpu_cpuid: Vec<Vec<CpuidEntry>>,
}

/// Messages from the source to the destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToDestination {
    Offer(Box<Offer>),
    /// The destination may run the guest now (and resume it if `resume`).
    Go {
        resume: bool,
    },
    /// What became of migration `migration_id`? (The source lost the connection after `Go`.)
    Query {
        migration_id: String,
    },
    /// Post-copy migration `migration_id` goes on over this connection (the source lost the
    /// last one): the destination's guest process takes it over and says what it lacks.
    Resume {
        migration_id: String,
    },
    /// A host of the same pool asks this host to evacuate itself (`tern host evacuate HOST`
    /// run elsewhere): answered with [`ToSource::Evacuation`] events as it goes, then
    /// [`ToSource::Evacuated`] (or `Refuse`).
    Evacuate {
        host: String,
        live: bool,
        parallel: u32,
        dry_run: bool,
    },
}

/// A run of guest pages in a post-copy message: `pages` pages from `first_pfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub first_pfn: u64,
    pub pages: u32,
}

/// What the destination reports once every page has arrived (times measured there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivedReport {
    /// Faults that waited for a page from the source.
    pub faults: u64,
    /// Pages installed because a fault asked for them.
    pub fetched: u64,
    /// Pages installed as the source pushed them, before anything asked.
    pub pushed: u64,
    /// From the guest running there until the last page was in, microseconds.
    pub complete_after_us: u64,
    /// The longest any fault waited for its page, microseconds.
    pub longest_wait_us: u64,
}

/// What a destination knows about a migration it was asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The destination took the guest over: the source must discard its copy.
    Committed,
    /// Nothing of the guest runs or will run there: the source may resume its copy.
    Aborted,
    /// The destination's guest process has not decided yet: ask again.
    Pending,
    /// The destination ran the guest in post-copy and its guest process ended before every
    /// page had arrived: the guest's current state is gone; the source holds its last whole
    /// copy (from the handover).
    Lost,
}

/// Messages from the destination to the source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSource {
    /// An evacuation asked for with [`ToDestination::Evacuate`] went a step further (a
    /// tern-api `EvacuationEvent`).
    Evacuation { event: serde_json::Value },
    /// The evacuation ended (a tern-api `EvacuationSummary`).
    Evacuated { summary: serde_json::Value },
    /// The destination accepts the guest; it will be domain `domain_id` there.
    Accept { domain_id: u32 },
    /// The destination does not take the guest, for `reason`.
    Refuse { reason: String },
    /// Everything before MARK `seq` is applied.
    Marked { seq: u64 },
    /// The destination holds the complete state, loaded into a paused machine.
    Ready,
    /// The destination gives up, for `reason`; it keeps nothing.
    Abort { reason: String },
    /// The guest is the destination's now. Times are measured there: from receiving `Go` to
    /// the vCPUs running (`resume_us`) and to sending this (`reply_us`), and the wall-clock
    /// time of the resume.
    Running {
        resume_us: u64,
        reply_us: u64,
        resumed_unix_ns: u64,
    },
    /// Answer to a [`ToDestination::Query`] (and to a `Resume` that cannot go on).
    Outcome { outcome: Outcome },
    /// Post-copy: send these pages first (a fault waits for them). At most
    /// [`crate::postcopy::MAX_MESSAGE_RUNS`] runs of at most
    /// [`crate::postcopy::MAX_WANT_PAGES`] pages in all.
    Want { runs: Vec<Run> },
    /// Post-copy, on a resumed connection: pages the destination still lacks, in messages of
    /// at most [`crate::postcopy::MAX_MESSAGE_RUNS`] runs; `last` on the final one.
    Lacking { runs: Vec<Run>, last: bool },
    /// Post-copy: every page is in; the source may let its copy go.
    Arrived(ArrivedReport),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let go = serde_json::to_string(&ToDestination::Go { resume: true }).unwrap();
        assert_eq!(go, r#"{"type":"go","resume":true}"#);
        let o = ToSource::Outcome {
            outcome: Outcome::Committed,
        };
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(text, r#"{"type":"outcome","outcome":"committed"}"#);
        assert_eq!(serde_json::from_str::<ToSource>(&text).unwrap(), o);
        assert!(serde_json::from_str::<ToSource>(r#"{"type":"launch"}"#).is_err());
    }

    #[test]
    fn post_copy_messages_are_tagged_json() {
        let want = ToSource::Want {
            runs: vec![Run {
                first_pfn: 7,
                pages: 2,
            }],
        };
        let text = serde_json::to_string(&want).unwrap();
        assert_eq!(
            text,
            r#"{"type":"want","runs":[{"first_pfn":7,"pages":2}]}"#
        );
        assert_eq!(serde_json::from_str::<ToSource>(&text).unwrap(), want);
        let resume = ToDestination::Resume {
            migration_id: "m".into(),
        };
        let text = serde_json::to_string(&resume).unwrap();
        assert_eq!(text, r#"{"type":"resume","migration_id":"m"}"#);
        let lost = serde_json::to_string(&Outcome::Lost).unwrap();
        assert_eq!(lost, r#""lost""#);
        assert_eq!(protocol_for(false, false), 1);
        assert_eq!(protocol_for(true, false), 2);
        assert_eq!(protocol_for(false, true), 3);
        assert_eq!(protocol_for(true, true), 3);
    }

    #[test]
    fn an_offer_without_post_copy_reads_as_the_previous_release_wrote_it() {
        let offer = Offer {
            protocol: protocol_for(false, false),
            stream_format: 2,
            migration_id: "m".into(),
            live: true,
            postcopy: false,
            copy_disks: vec![],
            info: Info {
                tern_version: "0.2.0".into(),
                created_unix: 0,
                host: "h".into(),
                guest_name: "g".into(),
                guest_uuid: "u".into(),
                memory_bytes: 1 << 20,
                vcpus: 1,
                cpu_features: vec![],
            },
            config: serde_json::json!({}),
            vcpu_cpuid: vec![],
        };
        let text = serde_json::to_string(&offer).unwrap();
        assert!(!text.contains("postcopy"), "{text}");
        assert!(text.contains(r#""protocol":1"#), "{text}");
        let back: Offer = serde_json::from_str(&text).unwrap();
        assert!(!back.postcopy);
        let with = Offer {
            protocol: protocol_for(true, false),
            postcopy: true,
            ..offer
        };
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.contains(r#""postcopy":true"#), "{text}");
    }
}
