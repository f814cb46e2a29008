//! A small NBD (Network Block Device) client, so a guest's disk can live on storage that two
//! hosts both reach and the guest can migrate between them (issue 4).
//!
//! It speaks what `qemu-nbd` and `nbd-server` speak: the fixed newstyle handshake with
//! `NBD_OPT_GO` (asking for block size constraints, which it then obeys), falling back to
//! `NBD_OPT_EXPORT_NAME` for servers without it, and a transmission phase with simple replies
//! only. Requests go one at a time over one TCP connection (`TCP_NODELAY`, with connect and I/O
//! timeouts); large reads and writes are split at the server's maximum (32 MiB by default).
//! No TLS, no structured replies, no reconnection: a caller that loses the connection calls
//! [`NbdClient::connect`] again.
//!
//! Robustness: every length from the wire is bounded before it is used, every reply's cookie
//! must match its request, and a server that stops answering makes the request fail after the
//! I/O timeout. Errors are [`NbdError`]s, each converting to an `io::Error` of a fitting kind.
//!
//! ```no_run
//! use tern_nbd::{ConnectOptions, NbdClient};
//!
//! let mut disk = NbdClient::connect("127.0.0.1:10809", "", &ConnectOptions::default())?;
//! let mut sector = [0u8; 512];
//! disk.read(0, &mut sector)?;
//! if !disk.read_only() {
//!     disk.write_fua(0, &sector)?;
//! }
//! disk.disconnect()?;
//! # Ok::<(), tern_nbd::NbdError>(())
//! ```
//!
//! Modules: [`proto`] (constants and encoding), `handshake` (option haggling), `client`
//! (transmission), `disk` ([`NbdDisk`], the shape a block device back-end wants).

mod client;
mod disk;
mod error;
mod handshake;
pub mod proto;

pub use client::{ConnectOptions, NbdClient};
pub use disk::NbdDisk;
pub use error::NbdError;
pub use handshake::{BlockSize, ExportInfo, TransmissionFlags};
