//! What can go wrong, with the interface it concerns.
//!
//! Public functions return `io::Result` so that callers living in `io::Result` code (the
//! virtio-net device, the guest process) can use `?` directly; the `io::Error` keeps the OS
//! error's kind and carries a [`NetError`] that names the interface and the operation. Get it
//! back with [`NetError::of`].

use std::io;

/// A failed network operation on a named interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The name cannot be a Linux interface name.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// An interface of that name already exists in this network namespace.
    #[error("cannot create TAP {iface}: an interface of that name already exists")]
    AlreadyExists { iface: String },

    /// The bridge to attach to does not exist in this network namespace.
    #[error(
        "cannot attach {iface} to bridge {bridge}: no interface {bridge} in this network namespace"
    )]
    NoSuchBridge { iface: String, bridge: String },

    /// The interface to attach to exists but is not a bridge.
    #[error("cannot attach {iface} to bridge {bridge}: {bridge} is not a bridge")]
    NotABridge { iface: String, bridge: String },

    /// The kernel refused to make the interface a bridge port.
    #[error("cannot attach {iface} to bridge {bridge}: {cause}")]
    AttachFailed {
        iface: String,
        bridge: String,
        cause: io::Error,
    },

    /// A system call on the interface failed.
    // The OS error is part of the message rather than a `source`: these errors usually reach a
    // user as one line, and the kind is kept on the enclosing io::Error.
    #[error("{iface}: {op}: {cause}")]
    Os {
        iface: String,
        op: &'static str,
        cause: io::Error,
    },
}

impl NetError {
    /// The `NetError` inside an `io::Error` returned by this crate, if there is one.
    pub fn of(err: &io::Error) -> Option<&NetError> {
        err.get_ref().and_then(|e| e.downcast_ref::<NetError>())
    }

    /// The `io::ErrorKind` this error is reported with.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            NetError::InvalidName { .. } | NetError::NotABridge { .. } => {
                io::ErrorKind::InvalidInput
            }
            NetError::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            NetError::NoSuchBridge { .. } => io::ErrorKind::NotFound,
            NetError::Os { cause, .. } | NetError::AttachFailed { cause, .. } => cause.kind(),
        }
    }

    /// A failed system call `op` on `iface`, with the calling thread's `errno`.
    pub(crate) fn last_os(iface: &str, op: &'static str) -> NetError {
        NetError::os(iface, op, io::Error::last_os_error())
    }

    pub(crate) fn os(iface: &str, op: &'static str, cause: io::Error) -> NetError {
        NetError::Os {
            iface: iface.to_string(),
            op,
            cause,
        }
    }
}

impl From<NetError> for io::Error {
    fn from(e: NetError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_keeps_kind_message_and_detail() {
        let e: io::Error = NetError::os(
            "tern3.0",
            "TUNSETIFF",
            io::Error::from_raw_os_error(libc::EBUSY),
        )
        .into();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        let msg = e.to_string();
        assert!(msg.starts_with("tern3.0: TUNSETIFF: "), "{msg}");
        assert!(matches!(
            NetError::of(&e),
            Some(NetError::Os {
                op: "TUNSETIFF",
                ..
            })
        ));

        let e: io::Error = NetError::NoSuchBridge {
            iface: "tap0".into(),
            bridge: "br9".into(),
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("br9"));
        assert!(NetError::of(&io::Error::other("x")).is_none());
    }
}
