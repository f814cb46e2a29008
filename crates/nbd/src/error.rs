//! The client's errors: one variant per thing a caller (or a person reading a log) needs to tell
//! apart, each converting to an `io::Error` of a fitting kind, so the virtio-blk back-end can
//! use `?` into `io::Result` and still report a full disk as a full disk.

use std::io;
use std::time::Duration;

use crate::proto;

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// `addr` is not `host:port`, or the host does not resolve.
    #[error("invalid NBD server address '{addr}': {reason}")]
    BadAddress { addr: String, reason: String },

    /// The TCP connection could not be made (refused, unreachable, ...).
    #[error("cannot connect to NBD server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// The TCP connection was not made within the connect timeout.
    #[error("connecting to NBD server {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },

    /// A connect option is unusable (a zero timeout, ...).
    #[error("invalid NBD connect options: {0}")]
    BadOptions(&'static str),

    /// The export name cannot be sent (too long, or contains NUL).
    #[error("invalid NBD export name {name:?}: {reason}")]
    BadExportName { name: String, reason: &'static str },

    /// The server answered `NBD_OPT_GO` with an error: the export does not exist, policy, TLS...
    #[error("NBD server {peer} refused export '{export}': {}{}", proto::option_error_name(*reply_type), server_says(message))]
    Refused {
        peer: String,
        export: String,
        reply_type: u32,
        message: String,
    },

    /// After `NBD_OPT_EXPORT_NAME` (a server without `NBD_OPT_GO`) the server closed the
    /// connection: that option has no way to report errors, and this is how it refuses.
    #[error("NBD server {peer} closed the connection when asked for export '{export}' (an old server without NBD_OPT_GO): the export does not exist or was refused")]
    ExportNameRejected { peer: String, export: String },

    /// The server speaks the oldstyle handshake, which cannot select an export.
    #[error("NBD server {peer} uses the oldstyle handshake, which has no export names; a newstyle server (qemu-nbd, nbd-server >= 3.10) is needed")]
    OldStyle { peer: String },

    /// The server broke the protocol: bad magic, wrong cookie, impossible sizes, ...
    #[error("NBD protocol violation by {peer}: {detail}")]
    Protocol { peer: String, detail: String },

    /// The connection failed (closed, reset) while a message was being sent or received.
    #[error("connection to NBD server {peer} lost while {during}: {source}")]
    ConnectionLost {
        peer: String,
        during: String,
        #[source]
        source: io::Error,
    },

    /// The server did not answer within the I/O timeout.
    #[error("NBD server {peer} did not answer within {timeout:?} while {during}")]
    Timeout {
        peer: String,
        during: String,
        timeout: Duration,
    },

    /// A write or trim on an export the server declared read-only.
    #[error("NBD export '{export}' on {peer} is read-only")]
    ReadOnly { peer: String, export: String },

    /// A request reaching past the end of the export; nothing was sent.
    #[error(
        "{op} of {len} bytes at offset {offset} is beyond the end of the NBD export ({size} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },

    /// A request not aligned to the minimum block size the server asked for; nothing was sent.
    #[error("{op} of {len} bytes at offset {offset} is not aligned to the NBD export's minimum block size of {minimum} bytes")]
    Unaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        minimum: u32,
    },

    /// The server does not offer this operation (trim, ...).
    #[error("NBD server {peer} does not support {what}")]
    Unsupported { peer: String, what: &'static str },

    /// The server answered a request with an error; the connection stays usable.
    #[error("NBD server {peer} failed {op} of {len} bytes at offset {offset}: {}", proto::errno_name(*errno))]
    Server {
        peer: String,
        op: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
    },

    /// An earlier failure left the connection in an unknown state (or it was disconnected):
    /// reconnect with `NbdClient::connect`.
    #[error("connection to NBD server {peer} is no longer usable: {reason}")]
    Broken { peer: String, reason: String },
}

fn server_says(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": server says \"{message}\"")
    }
}

impl NbdError {
    /// The `io::ErrorKind` this error converts to.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            NbdError::BadAddress { .. }
            | NbdError::BadOptions(_)
            | NbdError::BadExportName { .. } => io::ErrorKind::InvalidInput,
            NbdError::Connect { source, .. } => source.kind(),
            NbdError::ConnectTimeout { .. } | NbdError::Timeout { .. } => io::ErrorKind::TimedOut,
            NbdError::Refused { reply_type, .. } => proto::option_error_kind(*reply_type),
            NbdError::ExportNameRejected { .. } => io::ErrorKind::NotFound,
            NbdError::OldStyle { .. } | NbdError::Unsupported { .. } => io::ErrorKind::Unsupported,
            NbdError::Protocol { .. } => io::ErrorKind::InvalidData,
            NbdError::ConnectionLost { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => source.kind(),
                _ => io::ErrorKind::UnexpectedEof,
            },
            NbdError::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            NbdError::OutOfRange { .. } | NbdError::Unaligned { .. } => io::ErrorKind::InvalidInput,
            NbdError::Server { errno, .. } => proto::errno_kind(*errno),
            NbdError::Broken { .. } => io::ErrorKind::NotConnected,
        }
    }
}

impl From<NbdError> for io::Error {
    fn from(e: NbdError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Classifies an I/O failure on the connection: a socket timeout (`EAGAIN` from
/// `SO_RCVTIMEO`/`SO_SNDTIMEO` surfaces as `WouldBlock`) or anything else, which means the
/// connection is gone (closed, reset) or unusable.
pub(crate) fn io_failure(peer: &str, during: &str, timeout: Duration, e: io::Error) -> NbdError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::Timeout {
            peer: peer.to_string(),
            during: during.to_string(),
            timeout,
        },
        kind => NbdError::ConnectionLost {
            peer: peer.to_string(),
            during: during.to_string(),
            // "failed to fill whole buffer" says less than this.
            source: if kind == io::ErrorKind::UnexpectedEof {
                io::Error::new(kind, "the server closed the connection")
            } else {
                e
            },
        },
    }
}
