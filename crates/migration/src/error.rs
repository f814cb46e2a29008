//! Why a migration failed.

use std::io;

use tern_api::framing::FramingError;
use tern_snapshot::SnapshotError;

/// Errors of either side of a migration. Each displays as one line that completes "the
/// migration failed: …".
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination said no before anything was sent.
    #[error("the destination refused it: {0}")]
    Refused(String),
    /// The other side gave up and said why.
    #[error("the {side} gave up: {reason}")]
    PeerAborted { side: &'static str, reason: String },
    /// The other side stopped answering.
    #[error("{0}")]
    Timeout(String),
    /// The connection ended or failed.
    #[error("the connection was lost while trying to {what}: {detail}")]
    ConnectionLost { what: &'static str, detail: String },
    /// Other I/O failures.
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow here.
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    /// The record stream is not acceptable.
    #[error("the migration stream is bad: {0}")]
    Stream(SnapshotError),
    /// The machine could not do what the migration needed.
    #[error("{0}")]
    Vm(String),
    /// The connection could not be secured: a key not trusted, a failed handshake.
    #[error("{0}")]
    Security(String),
    /// Stopped on request, or because the daemon went away.
    #[error("it was cancelled: {0}")]
    Cancelled(String),
}

impl MigrationError {
    /// An I/O error, classified: a reset, broken pipe or end of stream means the connection is
    /// gone, a socket timeout means the peer stalled.
    pub fn io(what: &'static str, e: io::Error) -> MigrationError {
        if is_timeout(&e) {
            return MigrationError::Timeout(format!(
                "no progress for too long while trying to {what} (is the link down?)"
            ));
        }
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected => MigrationError::ConnectionLost {
                what,
                detail: e.to_string(),
            },
            _ => MigrationError::Io { what, source: e },
        }
    }

    pub(crate) fn from_framing(e: FramingError, what: &'static str) -> MigrationError {
        match e {
            FramingError::Closed => MigrationError::ConnectionLost {
                what,
                detail: "the peer closed it".into(),
            },
            FramingError::Io(io) => MigrationError::io(what, io),
            FramingError::TooLong(_) => MigrationError::Protocol("a message is too long".into()),
            FramingError::Malformed(m) => {
                MigrationError::Protocol(format!("malformed message: {m}"))
            }
        }
    }

    pub(crate) fn from_stream(e: SnapshotError) -> MigrationError {
        match e {
            SnapshotError::Io(io) => MigrationError::io("receive the stream", io),
            SnapshotError::Truncated { .. } => MigrationError::ConnectionLost {
                what: "receive the stream",
                detail: e.to_string(),
            },
            other => MigrationError::Stream(other),
        }
    }
}

/// Whether an I/O error is a socket timeout. Here, with the classification of I/O errors,
/// so that the transport and the link use it without the error type depending on them.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
