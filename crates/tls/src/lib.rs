//! TLS 1.3 for tern's relocation connections.
//!
//! Both ends authenticate with a host key, like ssh: each host has an [`Identity`] (an ECDSA
//! key and a certificate, made on first use), and trusts a peer whose key's [`Fingerprint`] is
//! in its [`TrustStore`] (`tern trust add sha256:…`). A pool may instead (or also) run a CA:
//! with [`Trust::new`]'s `ca_file`, certificates it issued are trusted while they are valid.
//!
//! - [`server_config`] and [`client_config`] build rustls configurations that accept nothing
//!   but TLS 1.3, require a client certificate and never resume or send session tickets, so
//!   after the handshake the only bytes on the wire are the application's.
//! - [`TlsStream`] runs a session over a blocking `TcpStream`: deadlines that hold against
//!   silent or trickling peers, bulk reads and vectored writes for page transfer, and
//!   [`TlsStream::finish`], which ends a session cleanly so that another one can start on the
//!   same connection.
//! - [`peer_speaks_tls`] tells a TLS peer from a plaintext one without consuming anything.
//!
//! Errors are one line that says what to do, naming fingerprints (see [`TlsError`]).

mod fingerprint;
mod fsutil;
mod identity;
mod store;
mod stream;
mod verify;

use std::io;
use std::path::PathBuf;

pub use fingerprint::Fingerprint;
pub use identity::Identity;
pub use store::{TrustStore, TrustedHost};
pub use stream::{peer_speaks_tls, TlsStream};
pub use verify::{client_config, pinned, server_config, Trust};

/// The rustls this crate is built on, so that users name the same `ServerConfig` and
/// `ClientConfig` types without depending on it themselves.
pub use rustls;

/// Which end of the connection this host is: the client is the host that connected (the
/// source of a relocation), the server the one that accepted (the destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// Why a TLS operation, an identity, the trust store or a CA file failed.
///
/// Every message is one line meant for the person at the console: it says what happened and
/// what to do, and names the fingerprints involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A certificate or key file holds something unusable; `problem` says what.
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    /// Bytes that should be a certificate are not one.
    #[error("not a usable X.509 certificate: {0}")]
    BadCertificate(String),
    /// A string that should be a fingerprint is not one.
    #[error(
        "{input:?} is not a host key fingerprint: expected `sha256:` followed by 64 hex digits"
    )]
    BadFingerprint { input: String },
    /// A trust-store name outside the allowed alphabet or length.
    #[error(
        "{name:?} cannot name a trusted host: use 1 to 64 characters of letters, digits, '.', '_' and '-'"
    )]
    BadName { name: String },
    /// The name is already given to another fingerprint in the trust store.
    #[error(
        "the name {name:?} is already given to trusted host {fingerprint}; remove that entry first (`tern trust remove {name}`)"
    )]
    NameTaken {
        name: String,
        fingerprint: Fingerprint,
    },
    /// `TrustStore::remove` found no entry with that fingerprint or name.
    #[error("no trusted host has the fingerprint or name {0:?} (see `tern trust list`)")]
    UnknownHost(String),
    /// What the user gave as the server's name is neither an IP address nor a DNS name.
    #[error("{0:?} is not a host name or an IP address")]
    BadServerName(String),
    /// This host does not trust the peer's certificate; `reason` is set when a pool CA was
    /// tried and says why it refused (expired, not valid yet, wrong name, another issuer).
    #[error("{}", untrusted_message(*role, fingerprint, reason.as_deref()))]
    PeerNotTrusted {
        role: Role,
        fingerprint: Fingerprint,
        reason: Option<String>,
    },
    /// The peer refused this host's certificate (it sent a certificate alert); `ours` is this
    /// host's fingerprint when known.
    #[error("{}", refused_message(*role, ours.as_ref(), *alert))]
    RefusedByPeer {
        role: Role,
        ours: Option<Fingerprint>,
        alert: rustls::AlertDescription,
    },
    /// The peer does not speak TLS: `first_line` is the start of what it sent (up to 512
    /// bytes, up to its first newline), typically a plaintext peer's JSON refusal.
    #[error("the peer does not speak TLS; it sent: {first_line}")]
    Plaintext { first_line: String },
    /// The deadline passed (or the socket's own timeout, during `close_write`) before the
    /// peer sent enough: a silent, slow or hostile peer.
    #[error("timed out: the TLS peer did not answer in time")]
    Timeout,
    /// The peer closed or reset the connection.
    #[error("the peer closed the connection {during}")]
    Closed { during: &'static str },
    /// The peer sent application data while the session was being ended.
    #[error(
        "the peer sent data while the TLS session was being ended; the session cannot end cleanly"
    )]
    UnexpectedData,
    /// Any other TLS failure: a broken or hostile peer, or a configuration rustls refused.
    #[error("TLS failed {during}: {source}")]
    Tls {
        during: &'static str,
        #[source]
        source: rustls::Error,
    },
}

fn untrusted_message(role: Role, fp: &Fingerprint, reason: Option<&str>) -> String {
    match (role, reason) {
        (Role::Client, None) => format!(
            "the destination's host key {fp} is not trusted here; if it is the right host, run `tern trust add {fp}` on this host"
        ),
        (Role::Client, Some(why)) => format!(
            "the destination's certificate (host key {fp}) is refused: {why}; if it is the right host, run `tern trust add {fp}` on this host"
        ),
        (Role::Server, None) => {
            format!("host key {fp} is not trusted (tern trust add {fp} to accept it)")
        }
        (Role::Server, Some(why)) => format!(
            "the certificate of host key {fp} is refused: {why} (tern trust add {fp} to accept the key anyway)"
        ),
    }
}

fn refused_message(
    role: Role,
    ours: Option<&Fingerprint>,
    alert: rustls::AlertDescription,
) -> String {
    let peer = match role {
        Role::Client => "the destination",
        Role::Server => "the connecting host",
    };
    let Some(fp) = ours else {
        return format!("{peer} does not trust this host's certificate ({alert:?})");
    };
    if alert == rustls::AlertDescription::CertificateExpired {
        format!(
            "{peer} refused this host's certificate ({fp}) as expired or not valid yet; renew it, or run `tern trust add {fp}` there"
        )
    } else {
        format!("{peer} does not trust this host ({fp}); run `tern trust add {fp}` there")
    }
}

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Days since 1970-01-01 to a (year, month, day) civil date, proleptic Gregorian.
pub(crate) fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A Unix time as "YYYY-MM-DD HH:MM:SS UTC", for messages about certificate validity.
pub(crate) fn format_unix(secs: u64) -> String {
    let secs = secs as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(format_unix(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
