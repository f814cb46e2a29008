//! What crosses tern's sockets: the CLI ↔ daemon API, the daemon ↔ guest-process (VMM)
//! control protocol, and the console stream.
//!
//! Requests and replies are single JSON lines ([`framing`]). A console stream, once accepted,
//! carries binary [`console`] frames.

pub mod console;
pub mod framing;
pub mod messages;
pub mod vmm;

pub use framing::{read_message, read_message_within, write_message, FramingError, MAX_REPLY};
pub use messages::{
    CopiedDiskSummary, DiskCopySummary, DiskProgress, DomainDisk, DomainInfo, DomainState,
    DowntimeParts, EvacuationEvent, EvacuationSummary, MigrateOptions, MigrationCancel,
    MigrationProgress, MigrationRound, MigrationSummary, PlannedMove, PostcopySummary, Progress,
    Reply, Request, RestoreSummary, SavePhases, SaveSummary, DEFAULT_MAX_DOWNTIME_MS,
};
