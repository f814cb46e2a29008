//! tern's migration engine: moving a running guest to another host.
//!
//! * [`protocol`]: the messages the two sides exchange around the record stream, and the
//!   handover that makes sure a guest runs on exactly one host.
//! * [`link`]: securing the connection (mutual TLS 1.3, or plaintext when both hosts say
//!   `insecure`), and which process speaks in which session.
//! * [`transport`]: the connection ([`Transport`], TLS-ready) and [`Channel`] on top of it
//!   (message framing, metering, the `--resource` rate cap).
//! * [`policy`]: when to stop pre-copying and when to slow the guest down (auto-converge).
//! * [`postcopy`]: running the guest on the destination before all its pages have arrived:
//!   the page requests, the push of the rest, reconnection.
//! * [`source`]: the sending side, over any machine that implements [`SourceVm`].
//! * [`destination`]: the receiving side: the stream into guest memory, then the handover.
//! * [`disks`]: copying the guest's disk images in the same stream (`--copy-storage`).
//!
//! The engine never looks inside devices or vCPUs: their state travels as the opaque bodies
//! of MACHINE, VCPU and DEVICE records (one format for checkpoint files and for the wire).

pub mod destination;
pub mod disks;
pub mod error;
pub mod link;
pub mod memory;
pub mod policy;
pub mod postcopy;
pub mod protocol;
pub mod source;
pub mod transport;

pub use disks::{DiskTarget, SourceDisk};
pub use error::MigrationError;
pub use memory::{guest_slice, GuestRegion, GuestSlice, PageSet, RamRegion};
pub use policy::{Limits, StopReason};
pub use protocol::{
    protocol_for, ArrivedReport, CopiedDisk, CpuidEntry, Offer, Outcome, Run, ToDestination,
    ToSource, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use source::{Observer, Plan, SendError, SourceVm, StateRecords};
pub use transport::{Channel, Transport};

use std::time::Duration;

/// How long either side waits for the other to make progress (bytes accepted, a round
/// acknowledged) before it gives up: the link is down or the peer hangs.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source waits for the destination's answer to its offer (the destination
/// builds the guest's machine first).
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the source waits for Ready after END, and the destination for Go after Ready.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
