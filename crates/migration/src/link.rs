//! Securing a relocation connection: who may talk, and in what form.
//!
//! A secured connection carries two TLS 1.3 sessions, one after the other, each mutually
//! authenticated:
//!
//! ```text
//! source guest process                      destination
//!   session 1 ── Offer | Query, close_notify ▶  daemon: admission (before any guest process)
//!             ◀── Accept | Refuse | Outcome, close_notify
//!   session 2 ── record stream, handover ───▶  guest process (the connection is its own now)
//! ```
//!
//! Two sessions because the destination decides on the offer before a guest process exists,
//! and a TLS session cannot move from the daemon into that process. The second session pins
//! the very key each side showed in the first, so the stream goes to the host that accepted
//! the offer and comes from the host that made it. Each side ends the first session with
//! close_notify and nothing of the second is sent before both have, so no process reads what
//! is meant for another: the daemon has read all the source sent before it starts the guest
//! process, and that process speaks only when the source's second handshake reaches it.
//!
//! With `insecure` both sides speak plaintext on one connection, as before TLS. A host of one
//! kind meeting a peer of the other says so in a plaintext refusal, which a TLS client still
//! reads (see [`TlsError::Plaintext`]), so both ends learn what to change.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use tern_api::vmm::LinkSecurity;
use tern_tls::{Fingerprint, Identity, TlsError, TlsStream, Trust};

use crate::error::MigrationError;
use crate::protocol::{ToDestination, ToSource};
use crate::transport::{Channel, Transport};

/// How long a handshake, with the first message after it, may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`LinkSecurity`] with its identity loaded and its trust built.
pub enum Security {
    Insecure,
    Tls {
        identity: Identity,
        trust: Arc<Trust>,
    },
}

impl Security {
    /// Loads what `spec` names.
    pub fn load(spec: &LinkSecurity) -> Result<Security, MigrationError> {
        match spec {
            LinkSecurity::Insecure => Ok(Security::Insecure),
            LinkSecurity::Tls {
                cert_file,
                key_file,
                trusted,
                ca_file,
            } => Ok(Security::Tls {
                identity: Identity::load(cert_file, key_file).map_err(secure_err)?,
                trust: Trust::new(
                    trusted
                        .iter()
                        .map(|f| f.parse::<Fingerprint>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(secure_err)?,
                    ca_file.as_deref(),
                )
                .map_err(secure_err)?,
            }),
        }
    }

    /// A daemon's security: its identity and its (shared, live) trust.
    pub fn tls(identity: Identity, trust: Arc<Trust>) -> Security {
        Security::Tls { identity, trust }
    }
}

fn secure_err(e: TlsError) -> MigrationError {
    MigrationError::Security(e.to_string())
}

/// A relocation connection, in clear or in a TLS session.
pub enum Link {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Tls(s) => s.tcp(),
        }
    }

    /// The TCP connection under the session (to pass it to another process).
    pub fn tcp_stream(&self) -> &TcpStream {
        self.tcp()
    }

    /// The key the peer authenticated with (None in clear).
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        match self {
            Link::Plain(_) => None,
            Link::Tls(s) => Some(s.peer_fingerprint()),
        }
    }
}

impl std::os::fd::AsRawFd for Link {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.tcp().as_raw_fd()
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write_vectored(bufs),
            Link::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Tls(s) => s.flush(),
        }
    }
}

impl Transport for Link {
    fn has_input(&self) -> io::Result<bool> {
        match self {
            Link::Tls(s) if s.has_buffered_plaintext() => Ok(true),
            _ => self.tcp().has_input(),
        }
    }

    fn wait_for_input(&self, timeout: Duration) -> io::Result<bool> {
        match self {
            Link::Tls(s) if s.has_buffered_plaintext() => Ok(true),
            _ => self.tcp().wait_for_input(timeout),
        }
    }

    fn unacknowledged(&self) -> io::Result<usize> {
        let pending = match self {
            Link::Plain(_) => 0,
            Link::Tls(s) => s.pending_output(),
        };
        Ok(self.tcp().unacknowledged()? + pending)
    }

    fn unsent(&self) -> io::Result<usize> {
        let pending = match self {
            Link::Plain(_) => 0,
            Link::Tls(s) => s.pending_output(),
        };
        Ok(self.tcp().unsent()? + pending)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(timeout)
    }

    fn finish_writing(&self) {
        // A TLS session's close_notify needs `&mut`; ending the TCP write side tells the peer
        // just as well that nothing more comes (it then reports a truncated session).
        let _ = self.tcp().shutdown(Shutdown::Write);
    }

    fn peer(&self) -> String {
        self.tcp().peer()
    }
}

/// Source: opens the first session to a relocation server (`server_name` is the host as the
/// user named it). In TLS, the session exists only once the server proved a trusted key, so
/// nothing is sent to any other.
pub fn open(
    tcp: TcpStream,
    security: &Security,
    server_name: &str,
) -> Result<Channel<Link>, MigrationError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let link = match security {
        Security::Insecure => Link::Plain(tcp),
        Security::Tls { identity, trust } => {
            let config = tern_tls::client_config(identity, trust.clone()).map_err(secure_err)?;
            match TlsStream::connect(tcp, config, server_name, deadline) {
                Ok(s) => Link::Tls(Box::new(s)),
                Err(TlsError::Plaintext { first_line }) => {
                    return Err(plaintext_answer(&first_line));
                }
                Err(e) => return Err(secure_err(e)),
            }
        }
    };
    Ok(Channel::new(link))
}

/// Source: sends the one message of the first session, ends this side of it and waits at
/// most `timeout` for the answer.
pub fn ask(
    ch: &mut Channel<Link>,
    message: &ToDestination,
    timeout: Duration,
) -> Result<ToSource, MigrationError> {
    ask_unless(ch, message, timeout, || Ok(()))
}

/// [`ask`], asking `check` while it waits for the answer: an error from it ends the wait
/// (see [`Channel::receive_unless`]).
pub fn ask_unless(
    ch: &mut Channel<Link>,
    message: &ToDestination,
    timeout: Duration,
    check: impl FnMut() -> Result<(), MigrationError>,
) -> Result<ToSource, MigrationError> {
    ch.send(message)?;
    if let Link::Tls(s) = ch.transport_mut() {
        s.close_write().map_err(secure_err)?;
    }
    ch.receive_unless(timeout, check)
}

/// A plaintext server answered a TLS client: its refusal if it sent one.
fn plaintext_answer(first_line: &str) -> MigrationError {
    match serde_json::from_str::<ToSource>(first_line) {
        Ok(ToSource::Refuse { reason }) => MigrationError::Refused(reason),
        _ => MigrationError::Security(
            "the destination does not speak TLS on its relocation port".into(),
        ),
    }
}

/// Source: after the destination accepted on `first`, the connection the stream goes over
/// (for TLS a second session, pinned to the key the destination showed in the first).
pub fn reopen_for_stream(
    first: Channel<Link>,
    security: &Security,
    server_name: &str,
) -> Result<Link, MigrationError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    match (first.into_transport()?, security) {
        (Link::Plain(tcp), _) => Ok(Link::Plain(tcp)),
        (Link::Tls(session), Security::Tls { identity, .. }) => {
            let peer = session.peer_fingerprint();
            let tcp = session.finish(deadline).map_err(secure_err)?;
            let config =
                tern_tls::client_config(identity, tern_tls::pinned(peer)).map_err(secure_err)?;
            let s = TlsStream::connect(tcp, config, server_name, deadline).map_err(secure_err)?;
            Ok(Link::Tls(Box::new(s)))
        }
        (Link::Tls(_), Security::Insecure) => Err(MigrationError::Security(
            "a TLS session on an insecure link".into(),
        )),
    }
}

/// Destination guest process: the session the stream arrives in (TLS: from the source's key
/// only, which the daemon pinned in `security`).
pub fn accept_stream(tcp: TcpStream, security: &Security) -> Result<Link, MigrationError> {
    match security {
        Security::Insecure => Ok(Link::Plain(tcp)),
        Security::Tls { identity, trust } => {
            let config = tern_tls::server_config(identity, trust.clone()).map_err(secure_err)?;
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let s = TlsStream::accept(tcp, config, deadline).map_err(secure_err)?;
            Ok(Link::Tls(Box::new(s)))
        }
    }
}

/// What the first session of an incoming connection brought.
pub struct Incoming {
    pub channel: Channel<Link>,
    pub first: ToDestination,
}

/// Why an incoming connection did not get as far as its first message.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The peer speaks plaintext to this TLS host, or TLS to this plaintext host. The answer
    /// was sent.
    #[error("{0}")]
    WrongMode(String),
    /// The handshake failed (untrusted key, bad certificate, not TLS 1.3, …).
    #[error("{0}")]
    Handshake(String),
    /// The peer took longer than it may.
    #[error("it did not complete its handshake and first message in time")]
    Timeout,
    /// Anything else: the connection broke, the message was malformed.
    #[error("{0}")]
    Other(MigrationError),
}

/// Destination daemon: the first session of a connection, up to its first message, by
/// `deadline`. A peer of the other mode is answered in plaintext and refused.
pub fn accept_first(
    tcp: TcpStream,
    security: &Security,
    deadline: Instant,
) -> Result<Incoming, AcceptError> {
    let speaks_tls = tern_tls::peer_speaks_tls(&tcp, deadline).map_err(accept_error)?;
    let link = match (security, speaks_tls) {
        (Security::Insecure, false) => Link::Plain(tcp),
        (Security::Tls { identity, trust }, true) => {
            let config = tern_tls::server_config(identity, trust.clone()).map_err(accept_error)?;
            let s = TlsStream::accept(tcp, config, deadline).map_err(accept_error)?;
            Link::Tls(Box::new(s))
        }
        (Security::Insecure, true) => {
            return Err(refuse_in_clear(
                tcp,
                deadline,
                "this host's relocation server runs with `insecure = true` and does not speak \
                 TLS: set `insecure = true` in [relocation] on the source too, or remove it here",
            ))
        }
        (Security::Tls { .. }, false) => {
            return Err(refuse_in_clear(
                tcp,
                deadline,
                "this host accepts only TLS-secured migrations, and the source sent plaintext: \
                 remove `insecure = true` from [relocation] on the source and make the two \
                 hosts trust each other (tern fingerprint, tern trust add)",
            ))
        }
    };
    let mut channel = Channel::new(link);
    let wait = deadline.saturating_duration_since(Instant::now());
    if wait.is_zero() {
        return Err(AcceptError::Timeout);
    }
    let first = match channel.receive::<ToDestination>(wait) {
        Ok(first) => first,
        Err(MigrationError::Timeout(_)) => return Err(AcceptError::Timeout),
        Err(e) => return Err(AcceptError::Other(e)),
    };
    match channel.transport() {
        Link::Tls(_) => await_end_of_request(&mut channel, deadline)?,
        // In clear the source waits for the answer: anything more is not ours to read.
        Link::Plain(_) if channel.buffered() != 0 => {
            return Err(AcceptError::Other(MigrationError::Protocol(
                "the source sent data before its request was answered".into(),
            )))
        }
        Link::Plain(_) => {}
    }
    Ok(Incoming { channel, first })
}

/// Reads the source's close_notify after its message, so that nothing it sent in the first
/// session is left for the guest process to read.
fn await_end_of_request(channel: &mut Channel<Link>, deadline: Instant) -> Result<(), AcceptError> {
    if channel.buffered() != 0 {
        return Err(AcceptError::Other(MigrationError::Protocol(
            "the source sent more than one message".into(),
        )));
    }
    let wait = deadline.saturating_duration_since(Instant::now());
    if wait.is_zero() {
        return Err(AcceptError::Timeout);
    }
    let link = channel.transport_mut();
    link.set_read_timeout(Some(wait))
        .map_err(|e| AcceptError::Other(MigrationError::io("set a timeout", e)))?;
    let mut byte = [0u8; 1];
    match link.read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err(AcceptError::Other(MigrationError::Protocol(
            "the source sent more than one message".into(),
        ))),
        Err(e) if crate::error::is_timeout(&e) => Err(AcceptError::Timeout),
        Err(e) => Err(AcceptError::Other(MigrationError::io(
            "read the end of the request",
            e,
        ))),
    }
}

fn accept_error(e: TlsError) -> AcceptError {
    match e {
        TlsError::Timeout => AcceptError::Timeout,
        other => AcceptError::Handshake(other.to_string()),
    }
}

/// Sends `reason` as a plaintext refusal, then waits briefly for the peer to close, so that
/// closing does not reset the connection under the refusal before the peer read it.
fn refuse_in_clear(tcp: TcpStream, deadline: Instant, reason: &str) -> AcceptError {
    let mut ch = Channel::new(Link::Plain(tcp));
    let _ = ch.send(&ToSource::Refuse {
        reason: reason.to_string(),
    });
    ch.transport().finish_writing();
    ch.drain(
        deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1)),
    );
    AcceptError::WrongMode(reason.to_string())
}

/// Refuses a peer before its first byte is read (hosts_allow), in plaintext: a TLS client
/// reads it as the server's answer all the same.
pub fn refuse_unread(tcp: TcpStream, deadline: Instant, reason: &str) {
    refuse_in_clear(tcp, deadline, reason);
}

/// Destination daemon: the last words of the first session. For TLS also close_notify, so the
/// source knows the first session is over and the next bytes belong to the stream's.
pub fn answer(channel: &mut Channel<Link>, reply: &ToSource) -> Result<(), MigrationError> {
    channel.send(reply)?;
    if let Link::Tls(s) = channel.transport_mut() {
        s.close_write().map_err(secure_err)?;
    }
    Ok(())
}
