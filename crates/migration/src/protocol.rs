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

use serde::{Deserialize, Serialize};
use tern_snapshot::Info;

/// Version of this protocol (the messages and their order). Both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;

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
}

/// Messages from the destination to the source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSource {
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
    /// Answer to a [`ToDestination::Query`].
    Outcome { outcome: Outcome },
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
}
