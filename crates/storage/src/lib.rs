//! Disk images and RAM files as tern copies them.
//!
//! * [`extents`]: the allocated byte ranges of a sparse file (`SEEK_DATA`/`SEEK_HOLE`), so
//!   that holes are neither read nor sent.
//! * [`write_log`]: which blocks of a disk the guest wrote since the log was last read, the
//!   disk's counterpart of KVM's dirty log for memory.
//! * [`incoming`]: an image arriving from another host: sparse, under a temporary name until
//!   the migration commits, removed if it does not; free space checked first.

pub mod extents;
pub mod incoming;
pub mod write_log;

pub use extents::allocated;
pub use incoming::{IncomingError, IncomingImage};
pub use write_log::WriteLog;
