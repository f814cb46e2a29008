//! The reader's errors.
//!
//! Every message is one line that completes a sentence such as
//! `cannot restore /x.tern: <message>`, so it names what is wrong and where.

use std::io;

/// Why a checkpoint file or migration stream cannot be read.
///
/// `offset` is the byte offset (from the start of the file or stream) of the structure at
/// fault: the record whose header or body is bad, or the page block that fails its checksum.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The data does not start with tern's magic: some other kind of file.
    #[error("it is not a tern checkpoint")]
    NotTern,
    /// A tern checkpoint in a format version this reader does not read.
    #[error(
        "it has format version {found}, {relation} than tern {ours} reads (versions {oldest} to {newest})",
        relation = if *found > crate::FORMAT_VERSION { "newer" } else { "older" },
        ours = env!("CARGO_PKG_VERSION"),
        oldest = crate::OLDEST_FORMAT_VERSION,
        newest = crate::FORMAT_VERSION
    )]
    UnsupportedVersion { found: u32 },
    /// The data ends inside a structure, or before the END record.
    #[error("it is truncated: {what}")]
    Truncated { offset: u64, what: String },
    /// A checksum or a consistency check failed; `what` says which.
    #[error("it is corrupt: {what}")]
    Corrupt { offset: u64, what: String },
    /// A record type this reader does not know and that is not marked optional.
    #[error(
        "it needs a newer tern: the record at offset {offset} has type {ty:#010x}, which this tern does not know and cannot skip"
    )]
    UnknownMandatory { ty: u32, offset: u64 },
    /// A length beyond what this reader accepts (a record body, a page count, a descriptor).
    #[error("it is too large to read: {what}")]
    TooLarge { offset: u64, what: String },
    /// Reading failed for a reason other than the data ending.
    #[error("cannot read it: {0}")]
    Io(io::Error),
}

impl SnapshotError {
    /// The offset the error refers to, when it refers to one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            SnapshotError::Truncated { offset, .. }
            | SnapshotError::Corrupt { offset, .. }
            | SnapshotError::TooLarge { offset, .. }
            | SnapshotError::UnknownMandatory { offset, .. } => Some(*offset),
            SnapshotError::NotTern
            | SnapshotError::UnsupportedVersion { .. }
            | SnapshotError::Io(_) => None,
        }
    }

    pub(crate) fn corrupt(offset: u64, what: impl Into<String>) -> Self {
        SnapshotError::Corrupt {
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn truncated(offset: u64, what: impl Into<String>) -> Self {
        SnapshotError::Truncated {
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn too_large(offset: u64, what: impl Into<String>) -> Self {
        SnapshotError::TooLarge {
            offset,
            what: what.into(),
        }
    }
}

/// A problem found inside a record body, before the caller has attached where the record is.
///
/// Parsing code that only sees a body (a page descriptor, a device record) returns this; the
/// reader turns it into a [`SnapshotError`] naming the record with [`Fault::at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    Corrupt(String),
    TooLarge(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Corrupt(detail) | Fault::TooLarge(detail) => f.write_str(detail),
        }
    }
}

impl Fault {
    /// The error for this fault in the record described by `loc`.
    pub(crate) fn at(self, loc: &crate::format::RecordLoc) -> SnapshotError {
        match self {
            Fault::Corrupt(detail) => {
                SnapshotError::corrupt(loc.offset, format!("{loc}: {detail}"))
            }
            Fault::TooLarge(detail) => {
                SnapshotError::too_large(loc.offset, format!("{loc}: {detail}"))
            }
        }
    }
}
