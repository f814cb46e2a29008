//! A TLS session over a blocking TCP connection.
//!
//! rustls does the protocol; this module moves bytes. It keeps its own buffer of received TLS
//! bytes so that it decides how far it reads: during the handshake and while a session ends it
//! never reads past the end of the current record (whatever follows belongs to the caller,
//! perhaps to the next session on the connection); in between, bulk reads read ahead in large
//! chunks.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, Connection, ServerConfig};

use crate::verify::{clear_notes, local_key, rejection_error, take_rejection};
use crate::{Fingerprint, Role, TlsError};

/// A TLS record header: type, version, length.
const HEADER: usize = 5;
/// The largest record body accepted (rustls' own limit: 2^14 plus expansion).
const MAX_BODY: usize = 16_384 + 2_048;
/// How much a bulk read asks the socket for.
const READ_AHEAD: usize = 256 * 1024;
/// How much plaintext one write accepts: bounds what is buffered when the socket is slow.
const SEND_LIMIT: usize = 1 << 20;
/// Records are decrypted ahead of the reader while less than this is waiting to be read.
const PLAINTEXT_HIGH: usize = 16 * 1024;
/// How much of a plaintext peer's first line is kept.
const FIRST_LINE_MAX: usize = 512;
/// The server's first application byte, written when it has accepted the client: in TLS 1.3
/// the client's handshake ends before the server has seen the client's certificate, so
/// without it a refused client would learn of the refusal only at its first read.
const CONFIRM: u8 = 0x06;

const HANDSHAKE: &str = "during the TLS handshake";
const ENDING: &str = "while ending the TLS session";

/// Whether `byte` can start a TLS record (change_cipher_spec, alert, handshake,
/// application_data, heartbeat); a JSON line starts with `{`.
fn is_record_type(byte: u8) -> bool {
    (20..=24).contains(&byte)
}

/// An established TLS 1.3 session over a blocking `TcpStream`, with a peer that presented a
/// trusted key.
///
/// Reads and writes block, honouring the `TcpStream`'s read and write timeouts (set them
/// through [`TlsStream::tcp`]); a timeout surfaces as the `TcpStream`'s own `WouldBlock` or
/// `TimedOut` error and loses nothing, so the call can be repeated. A read after the peer's
/// close_notify returns `Ok(0)`; TCP end of stream without it is an `UnexpectedEof` error.
pub struct TlsStream {
    conn: Connection,
    tcp: TcpStream,
    role: Role,
    peer: Fingerprint,
    /// Received TLS bytes not yet given to rustls: `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// TLS bytes rustls produced that the socket did not take yet: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// Decrypted bytes waiting in rustls.
    plain: usize,
    peer_closed: bool,
    sent_close: bool,
    /// The error that broke the session: reads repeat it.
    failed: Option<String>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Client handshake. `server_name` is what the user typed: an IP address or a DNS name.
    /// Completes only if the server is trusted and has accepted this host's certificate; sends
    /// no application data before that. `deadline` bounds the whole handshake, whatever the
    /// server does.
    pub fn connect(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        server_name: &str,
        deadline: Instant,
    ) -> Result<TlsStream, TlsError> {
        let bare = server_name
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(server_name);
        let name = ServerName::try_from(bare.to_string())
            .map_err(|_| TlsError::BadServerName(server_name.chars().take(80).collect()))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(|source| TlsError::Tls {
            during: "starting the TLS handshake",
            source,
        })?;
        TlsStream::establish(Connection::Client(conn), tcp, Role::Client, deadline)
    }

    /// Server handshake; completes only if the client presented a trusted certificate.
    /// `deadline` bounds the whole handshake, whatever the client does.
    pub fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        deadline: Instant,
    ) -> Result<TlsStream, TlsError> {
        let conn = rustls::ServerConnection::new(config).map_err(|source| TlsError::Tls {
            during: "starting the TLS handshake",
            source,
        })?;
        TlsStream::establish(Connection::Server(conn), tcp, Role::Server, deadline)
    }

    fn establish(
        conn: Connection,
        tcp: TcpStream,
        role: Role,
        deadline: Instant,
    ) -> Result<TlsStream, TlsError> {
        let saved = Saved::save(&tcp).map_err(|e| io_failure(e, HANDSHAKE))?;
        let mut s = TlsStream {
            conn,
            tcp,
            role,
            peer: Fingerprint([0; 32]),
            inbuf: vec![0; HEADER + MAX_BODY],
            in_start: 0,
            in_end: 0,
            out: Vec::new(),
            out_pos: 0,
            plain: 0,
            peer_closed: false,
            sent_close: false,
            failed: None,
        };
        clear_notes();
        let result = s.handshake(deadline).and_then(|()| match role {
            Role::Client => s.await_confirmation(deadline),
            Role::Server => s.confirm(deadline),
        });
        if let Err(e) = result {
            s.abandon(deadline, &e);
            return Err(e);
        }
        let peer = s
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| TlsError::Tls {
                during: HANDSHAKE,
                source: rustls::Error::NoCertificatesPresented,
            })?;
        s.peer = Fingerprint::of_certificate(peer)?;
        saved
            .restore(&s.tcp)
            .map_err(|e| io_failure(e, HANDSHAKE))?;
        s.conn.set_buffer_limit(Some(SEND_LIMIT));
        log::debug!("TLS session with {} ({:?} side)", s.peer, s.role);
        Ok(s)
    }

    /// The peer's host key.
    pub fn peer_fingerprint(&self) -> Fingerprint {
        self.peer
    }

    /// The connection, for its address, timeouts and polling. Reading or writing it directly
    /// breaks the session.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether a read returns at once without touching the socket: decrypted bytes are
    /// buffered, or the peer's close_notify has arrived (the read returns `Ok(0)`), or the
    /// session has failed (the read returns the error). Polling the socket alone misses these.
    pub fn has_buffered_plaintext(&self) -> bool {
        self.plain > 0 || self.peer_closed || self.failed.is_some()
    }

    /// TLS bytes produced but not yet written to the socket (after a write timed out);
    /// the next write or flush sends them first.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Sends close_notify: a half-close, this side writes no more (writes fail with
    /// `BrokenPipe`) but can still read until the peer's close_notify.
    pub fn close_write(&mut self) -> Result<(), TlsError> {
        if !self.sent_close {
            self.conn.send_close_notify();
            self.sent_close = true;
        }
        self.flush_out(None).map_err(|e| io_failure(e, ENDING))
    }

    /// Ends the session cleanly: sends close_notify (unless [`TlsStream::close_write`] did),
    /// then reads until the peer's close_notify, and returns the TCP connection positioned
    /// exactly after it (its timeouts and TCP_NODELAY as they were), so that a new TLS
    /// session can start on it. Application data arriving before the peer's close_notify, or
    /// left unread, is an error: it would be lost.
    pub fn finish(mut self, deadline: Instant) -> Result<TcpStream, TlsError> {
        let saved = Saved::save(&self.tcp).map_err(|e| io_failure(e, ENDING))?;
        if !self.sent_close {
            self.conn.send_close_notify();
            self.sent_close = true;
        }
        self.flush_out(Some(deadline))
            .map_err(|e| io_failure(e, ENDING))?;
        loop {
            if self.plain > 0 {
                return Err(TlsError::UnexpectedData);
            }
            if self.peer_closed {
                break;
            }
            if let Some(why) = &self.failed {
                return Err(TlsError::Tls {
                    during: ENDING,
                    source: rustls::Error::General(why.clone()),
                });
            }
            if self
                .complete_record()
                .map_err(|e| self.tls_failure(e, ENDING))?
                .is_some()
            {
                self.pump().map_err(|e| self.tls_failure(e, ENDING))?;
                continue;
            }
            match self.fill(true, Some(deadline)) {
                Ok(0) => return Err(TlsError::Closed { during: ENDING }),
                Ok(_) => {}
                Err(e) => return Err(io_failure(e, ENDING)),
            }
        }
        if self.in_end > self.in_start {
            // Bytes after the peer's close_notify that a bulk read took: a peer that follows
            // the protocol sends nothing more before it has our close_notify, and this side
            // reads record by record once it has sent that.
            return Err(TlsError::UnexpectedData);
        }
        saved
            .restore(&self.tcp)
            .map_err(|e| io_failure(e, ENDING))?;
        Ok(self.tcp)
    }

    /// Runs the handshake proper, one record at a time.
    fn handshake(&mut self, deadline: Instant) -> Result<(), TlsError> {
        let mut first = true;
        loop {
            self.flush_out(Some(deadline))
                .map_err(|e| io_failure(e, HANDSHAKE))?;
            if !self.conn.is_handshaking() {
                return Ok(());
            }
            self.read_record(deadline, first)?;
            first = false;
            self.pump().map_err(|e| self.tls_failure(e, HANDSHAKE))?;
        }
    }

    /// Client: waits for the server's confirmation that it accepted this host.
    fn await_confirmation(&mut self, deadline: Instant) -> Result<(), TlsError> {
        loop {
            if self.plain > 0 {
                let mut byte = [0u8];
                let n = self
                    .conn
                    .reader()
                    .read(&mut byte)
                    .map_err(|e| io_failure(e, HANDSHAKE))?;
                self.plain = self.plain.saturating_sub(n);
                if n == 1 && byte[0] == CONFIRM {
                    return Ok(());
                }
                return Err(TlsError::Tls {
                    during: HANDSHAKE,
                    source: rustls::Error::General(
                        "the server did not confirm the session; is it a tern relocation server?"
                            .into(),
                    ),
                });
            }
            if self.peer_closed {
                return Err(TlsError::Closed { during: HANDSHAKE });
            }
            self.read_record(deadline, false)?;
            self.pump().map_err(|e| self.tls_failure(e, HANDSHAKE))?;
        }
    }

    /// Server: tells the client it was accepted.
    fn confirm(&mut self, deadline: Instant) -> Result<(), TlsError> {
        self.conn
            .writer()
            .write_all(&[CONFIRM])
            .map_err(|e| io_failure(e, HANDSHAKE))?;
        self.flush_out(Some(deadline))
            .map_err(|e| io_failure(e, HANDSHAKE))
    }

    /// Reads until one complete record is buffered, reading nothing beyond it. The first
    /// record of a connection is checked for plaintext.
    fn read_record(&mut self, deadline: Instant, first: bool) -> Result<(), TlsError> {
        loop {
            if first && self.in_end > self.in_start && !is_record_type(self.inbuf[self.in_start]) {
                return Err(self.plaintext_line(deadline));
            }
            if self
                .complete_record()
                .map_err(|e| self.tls_failure(e, HANDSHAKE))?
                .is_some()
            {
                return Ok(());
            }
            match self.fill(true, Some(deadline)) {
                Ok(0) => return Err(TlsError::Closed { during: HANDSHAKE }),
                Ok(_) => {}
                Err(e) => return Err(io_failure(e, HANDSHAKE)),
            }
        }
    }

    /// A plaintext peer: collects the start of what it sent, up to its first newline.
    fn plaintext_line(&mut self, deadline: Instant) -> TlsError {
        let mut line = self.inbuf[self.in_start..self.in_end].to_vec();
        // A line arrives at once; do not wait for the rest of the handshake's time.
        let until = deadline.min(Instant::now() + Duration::from_secs(2));
        let mut chunk = [0u8; FIRST_LINE_MAX];
        while !line.contains(&b'\n') && line.len() < FIRST_LINE_MAX {
            let Some(left) = remaining(until) else { break };
            if self.tcp.set_read_timeout(Some(left)).is_err() {
                break;
            }
            let room = FIRST_LINE_MAX - line.len();
            match self.tcp.read(&mut chunk[..room]) {
                Ok(0) => break,
                Ok(n) => line.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
        }
        line.truncate(FIRST_LINE_MAX);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        TlsError::Plaintext {
            first_line: String::from_utf8_lossy(&line).into_owned(),
        }
    }

    /// After a failed handshake: sends the alert rustls queued so the peer learns why, then
    /// half-closes and drains briefly, because closing with unread input resets the
    /// connection, and a reset can destroy the alert before the peer reads it.
    fn abandon(&mut self, deadline: Instant, error: &TlsError) {
        if matches!(
            error,
            TlsError::Timeout | TlsError::Closed { .. } | TlsError::Plaintext { .. }
        ) {
            return;
        }
        let now = Instant::now();
        let until = (now + Duration::from_millis(250))
            .min(deadline)
            .max(now + Duration::from_millis(20));
        self.stash_output();
        if self.flush_out(Some(until)).is_err() {
            return;
        }
        let _ = self.tcp.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            let Some(left) = remaining(until) else { break };
            if self.tcp.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.tcp.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Turns a rustls failure into the error to show, using what the verifier noted.
    fn tls_failure(&self, error: rustls::Error, during: &'static str) -> TlsError {
        match &error {
            rustls::Error::InvalidCertificate(_) => {
                if let Some(rejection) = take_rejection() {
                    return rejection_error(self.role, rejection);
                }
            }
            rustls::Error::AlertReceived(alert) if is_certificate_alert(*alert) => {
                return TlsError::RefusedByPeer {
                    role: self.role,
                    ours: local_key(),
                    alert: *alert,
                };
            }
            _ => {}
        }
        TlsError::Tls {
            during,
            source: error,
        }
    }

    /// The length of the complete record at the front of the buffer, if there is one. A
    /// header that is not TLS's goes to rustls, which names the problem.
    fn complete_record(&mut self) -> Result<Option<usize>, rustls::Error> {
        let avail = self.in_end - self.in_start;
        if avail < HEADER {
            return Ok(None);
        }
        let h = &self.inbuf[self.in_start..self.in_start + HEADER];
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !is_record_type(h[0]) || len > MAX_BODY {
            self.feed(HEADER)?;
            return Err(rustls::Error::General(
                "the peer sent something that is not a TLS record".into(),
            ));
        }
        Ok((avail >= HEADER + len).then_some(HEADER + len))
    }

    /// The bytes missing to complete the record at the front of the buffer.
    fn record_need(&self) -> usize {
        let avail = self.in_end - self.in_start;
        if avail < HEADER {
            return HEADER - avail;
        }
        let h = &self.inbuf[self.in_start..self.in_start + HEADER];
        let len = usize::from(u16::from_be_bytes([h[3], h[4]])).min(MAX_BODY);
        (HEADER + len).saturating_sub(avail).max(1)
    }

    /// Gives rustls complete records while it has room for their plaintext.
    fn pump(&mut self) -> Result<(), rustls::Error> {
        while !self.peer_closed && self.plain <= PLAINTEXT_HIGH {
            let Some(len) = self.complete_record()? else {
                break;
            };
            self.feed(len)?;
        }
        Ok(())
    }

    /// Gives rustls the first `n` buffered bytes and has it process them.
    fn feed(&mut self, n: usize) -> Result<(), rustls::Error> {
        let mut bytes = &self.inbuf[self.in_start..self.in_start + n];
        while !bytes.is_empty() {
            match self.conn.read_tls(&mut bytes) {
                // Only after the peer's close_notify, which callers check first.
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let why = format!("rustls refused input: {e}");
                    self.failed = Some(why.clone());
                    return Err(rustls::Error::General(why));
                }
            }
        }
        self.in_start += n;
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.plain = state.plaintext_bytes_to_read();
                self.peer_closed = state.peer_has_closed();
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                // The alert rustls queued goes out with the next flush.
                self.stash_output();
                Err(e)
            }
        }
    }

    /// Reads from the socket: in `exact` mode no further than the end of the current record,
    /// otherwise as much as is there, up to `READ_AHEAD`. With a deadline, the read timeout
    /// is set to the time left before each read.
    fn fill(&mut self, exact: bool, deadline: Option<Instant>) -> io::Result<usize> {
        let avail = self.in_end - self.in_start;
        let need = self.record_need();
        let want = if exact {
            need
        } else {
            need.max(READ_AHEAD.saturating_sub(avail))
        };
        if self.in_end + want > self.inbuf.len() && self.in_start > 0 {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_start = 0;
            self.in_end = avail;
        }
        if self.in_end + want > self.inbuf.len() {
            self.inbuf.resize(self.in_end + want, 0);
        }
        loop {
            if let Some(deadline) = deadline {
                let left = remaining(deadline).ok_or(io::ErrorKind::TimedOut)?;
                self.tcp.set_read_timeout(Some(left))?;
            }
            match self
                .tcp
                .read(&mut self.inbuf[self.in_end..self.in_end + want])
            {
                Ok(n) => {
                    self.in_end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes what is pending, then whatever rustls has queued. On an error the rest is kept
    /// (moved out of rustls, so that it can be counted) for the next attempt.
    fn flush_out(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            let pending = self.out_pos < self.out.len();
            if !pending && !self.conn.wants_write() {
                return Ok(());
            }
            if let Some(deadline) = deadline {
                let set = match remaining(deadline) {
                    Some(left) => self.tcp.set_write_timeout(Some(left)),
                    None => Err(io::ErrorKind::TimedOut.into()),
                };
                if let Err(e) = set {
                    self.stash_output();
                    return Err(e);
                }
            }
            let result = if pending {
                let written = self.tcp.write(&self.out[self.out_pos..]);
                if let Ok(n) = written {
                    self.out_pos += n;
                    if self.out_pos == self.out.len() {
                        self.out.clear();
                        self.out_pos = 0;
                    }
                }
                written
            } else {
                self.conn.write_tls(&mut self.tcp)
            };
            match result {
                Ok(0) => {
                    self.stash_output();
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stash_output();
                    return Err(e);
                }
            }
        }
    }

    /// Moves what rustls has queued into `out`, without I/O.
    fn stash_output(&mut self) {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.out).is_err() {
                break;
            }
        }
    }

    fn broken(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|why| io::Error::new(io::ErrorKind::InvalidData, why.clone()))
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.plain > 0 {
                let mut n = 0;
                while n < buf.len() && self.plain > 0 {
                    let k = self.conn.reader().read(&mut buf[n..])?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    self.plain = self.plain.saturating_sub(k);
                    // Decrypt what is already here; an error shows at the next read.
                    if self.pump().is_err() {
                        break;
                    }
                }
                self.stash_output();
                return Ok(n);
            }
            if self.peer_closed {
                return Ok(0);
            }
            if let Some(e) = self.broken() {
                return Err(e);
            }
            // Once this side has sent close_notify the peer may start a new session right
            // after its own: read record by record so that nothing of it is taken.
            let exact = self.sent_close;
            if self.fill(exact, None)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without ending the TLS session",
                ));
            }
            if let Err(e) = self.pump() {
                self.stash_output();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Sends what is pending first, then encrypts up to 1 MiB of `bufs` and writes it with
    /// one `writev` per 64 records. If the socket times out after the plaintext was accepted,
    /// the rest stays pending (see [`TlsStream::pending_output`]) and the next call sends it.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.sent_close {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "this side has ended the TLS session",
            ));
        }
        self.flush_out(None)?;
        let n = self.conn.writer().write_vectored(bufs)?;
        if n > 0 {
            // Accepted: whatever fails from here is seen by the next write or flush.
            let _ = self.flush_out(None);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_out(None)?;
        self.tcp.flush()
    }
}

/// Whether the first byte the peer sent can start a TLS record (a TLS client's first byte is
/// 0x16; a plaintext peer's JSON line starts with `{`). Peeks, so it consumes nothing; waits
/// until `deadline` for that byte.
pub fn peer_speaks_tls(tcp: &TcpStream, deadline: Instant) -> Result<bool, TlsError> {
    const DURING: &str = "waiting for the peer's first message";
    let saved = tcp.read_timeout().map_err(|e| io_failure(e, DURING))?;
    let mut byte = [0u8];
    let result = loop {
        let Some(left) = remaining(deadline) else {
            break Err(TlsError::Timeout);
        };
        if let Err(e) = tcp.set_read_timeout(Some(left)) {
            break Err(io_failure(e, DURING));
        }
        match tcp.peek(&mut byte) {
            Ok(0) => break Err(TlsError::Closed { during: DURING }),
            Ok(_) => break Ok(is_record_type(byte[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(io_failure(e, DURING)),
        }
    };
    let _ = tcp.set_read_timeout(saved);
    result
}

/// Alerts a peer sends when it refuses a certificate.
fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
    )
}

fn io_failure(e: io::Error, during: &'static str) -> TlsError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TlsError::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsError::Closed { during },
        _ => TlsError::Io {
            context: format!("TLS I/O failed {during}"),
            source: e,
        },
    }
}

/// The time left before `deadline`, if any (a zero timeout would mean "none" to the socket).
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}

/// A socket's settings, changed for the handshake and `finish` and put back afterwards: the
/// timeouts (set from the deadline before each read and write) and Nagle's algorithm (off,
/// or the handshake's small flights, such as the client's compatibility change_cipher_spec
/// and its certificate, wait for a delayed acknowledgement: 40 ms per handshake on Linux).
struct Saved {
    read: Option<Duration>,
    write: Option<Duration>,
    nodelay: bool,
}

impl Saved {
    fn save(tcp: &TcpStream) -> io::Result<Saved> {
        let saved = Saved {
            read: tcp.read_timeout()?,
            write: tcp.write_timeout()?,
            nodelay: tcp.nodelay()?,
        };
        tcp.set_nodelay(true)?;
        Ok(saved)
    }

    fn restore(&self, tcp: &TcpStream) -> io::Result<()> {
        tcp.set_read_timeout(self.read)?;
        tcp.set_write_timeout(self.write)?;
        tcp.set_nodelay(self.nodelay)
    }
}
