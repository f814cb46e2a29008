//! The connection a migration runs over.
//!
//! [`Transport`] is what the engine needs of it: a byte stream in both directions, used one
//! direction at a time (so that a TLS session can wrap a TCP connection without change), plus
//! a few socket-level controls. [`Channel`] adds what both sides build on top: buffered reads
//! of JSON-line messages, writes metered and optionally capped by a token bucket.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tern_api::framing::{read_message, write_message, FramingError};

use crate::error::{is_timeout, MigrationError};

/// A migration connection.
pub trait Transport: Read + Write + Send {
    /// Whether data (or the end of the connection) is waiting to be read; never blocks.
    fn has_input(&self) -> io::Result<bool>;
    /// Waits up to `timeout` for [`Transport::has_input`] to hold; whether it does. The
    /// default looks every millisecond; transports with a descriptor wait on it instead.
    fn wait_for_input(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_input()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    /// Bytes written but not yet acknowledged by the peer's host.
    fn unacknowledged(&self) -> io::Result<usize>;
    /// Bytes written but not yet sent out (queued on this host): what a message written now
    /// waits behind before it leaves.
    fn unsent(&self) -> io::Result<usize> {
        self.unacknowledged()
    }
    /// Fails reads that wait longer than `timeout` (None: wait for ever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Fails writes that wait longer than `timeout`.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Ends the write direction: the peer reads end of stream.
    fn finish_writing(&self);
    /// The peer, for messages.
    fn peer(&self) -> String;
}

impl Transport for TcpStream {
    fn has_input(&self) -> io::Result<bool> {
        poll_readable(&[self.as_raw_fd()], Duration::ZERO).map(|r| r[0])
    }

    fn wait_for_input(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so that a wait never ends before `timeout`.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: polling one descriptor we own.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0);
        }
    }

    fn unacknowledged(&self) -> io::Result<usize> {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        if unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(queued.max(0) as usize)
    }

    fn unsent(&self) -> io::Result<usize> {
        /// SIOCOUTQNSD: bytes in the send queue not sent yet (linux/sockios.h).
        const SIOCOUTQNSD: libc::c_ulong = 0x894b;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQNSD writes one int.
        if unsafe { libc::ioctl(self.as_raw_fd(), SIOCOUTQNSD, &mut queued) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(queued.max(0) as usize)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }

    fn finish_writing(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }

    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "the peer".into())
    }
}

/// Waits up to `timeout` until one of `fds` (at most 4) has input, the end of its stream or an
/// error; which ones do. An interrupted wait returns with none.
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .take(4)
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: polls descriptors the caller owns, through pollfds that live for the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; pfds.len()]);
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// Prepares a TCP connection for a migration: no Nagle delay (the handover messages are small
/// and their latency is downtime).
pub fn tune_tcp(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// A token bucket: lets through `rate` bytes per second on average, in bursts of at most
/// `burst` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `rate` bytes per second; it starts empty, so the cap holds from the start.
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        TokenBucket {
            rate,
            // 5 ms worth of data, at least 16 KiB: small enough to keep the rate smooth.
            burst: (rate * 0.005).max(16.0 * 1024.0),
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Waits until some bytes may be sent and returns how many (1 to `want`).
    pub fn take(&mut self, want: usize) -> usize {
        loop {
            self.refill();
            if self.tokens >= 1.0 {
                let n = (self.tokens as usize).min(want).max(1);
                self.tokens -= n as f64;
                return n;
            }
            let wait = (1.0 - self.tokens).max(self.burst / 4.0) / self.rate;
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }

    /// Gives back tokens taken for bytes that were not sent after all.
    pub fn refund(&mut self, n: usize) {
        self.tokens += n as f64;
    }
}

/// How often [`Channel::receive_unless`] asks whether to go on waiting.
pub const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Largest piece handed to the transport in one write.
const MAX_WRITE: usize = 4 << 20;

/// Both directions of a migration connection: buffered message reads; metered, optionally
/// capped writes.
pub struct Channel<T: Transport> {
    inner: BufReader<T>,
    limit: Option<TokenBucket>,
    sent: u64,
}

impl<T: Transport> Channel<T> {
    pub fn new(transport: T) -> Self {
        Channel {
            inner: BufReader::new(transport),
            limit: None,
            sent: 0,
        }
    }

    /// Caps the write rate at `bytes_per_second`.
    pub fn limit_rate(&mut self, bytes_per_second: u64) {
        self.limit = Some(TokenBucket::new(bytes_per_second));
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn transport(&self) -> &T {
        self.inner.get_ref()
    }

    pub fn transport_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// The connection back, for what follows the messages; refused if the peer already sent
    /// more than this side has read (it would be lost).
    pub fn into_transport(self) -> Result<T, MigrationError> {
        if !self.inner.buffer().is_empty() {
            return Err(MigrationError::Protocol(
                "the peer sent data before it was answered".into(),
            ));
        }
        Ok(self.inner.into_inner())
    }

    /// The buffered reader, for a record stream that follows messages on the same connection.
    pub fn reader(&mut self) -> &mut BufReader<T> {
        &mut self.inner
    }

    /// Sends one message.
    pub fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), MigrationError> {
        write_message(self, msg).map_err(|e| MigrationError::from_framing(e, "send a message"))
    }

    /// Receives one message, waiting at most `timeout`.
    pub fn receive<M: DeserializeOwned>(&mut self, timeout: Duration) -> Result<M, MigrationError> {
        self.inner
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| MigrationError::io("set a timeout", e))?;
        read_message(&mut self.inner).map_err(|e| match e {
            FramingError::Io(io) if is_timeout(&io) => MigrationError::Timeout(format!(
                "{} did not answer within {timeout:?}",
                self.inner.get_ref().peer()
            )),
            other => MigrationError::from_framing(other, "receive a message"),
        })
    }

    /// Receives one message, waiting at most `timeout`, and asks `check` every
    /// [`CHECK_EVERY`] while nothing arrives: an error from it ends the wait at once (a
    /// migration cancelled while the peer is busy). A message is only read once its first
    /// bytes are there, so a check never interrupts one half read.
    pub fn receive_unless<M: DeserializeOwned>(
        &mut self,
        timeout: Duration,
        mut check: impl FnMut() -> Result<(), MigrationError>,
    ) -> Result<M, MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.inner.buffer().is_empty() || left.is_zero() {
                break;
            }
            let waiting = self
                .inner
                .get_ref()
                .wait_for_input(left.min(CHECK_EVERY))
                .map_err(|e| MigrationError::io("wait for the peer", e))?;
            if waiting {
                break;
            }
            check()?;
        }
        // A zero timeout is not a timeout to the socket: wait a moment at least.
        let left = deadline.saturating_duration_since(Instant::now());
        self.receive(left.max(Duration::from_millis(1)))
    }

    /// A message if one is waiting (or the connection ended); never blocks for long.
    pub fn poll<M: DeserializeOwned>(&mut self) -> Result<Option<M>, MigrationError> {
        let waiting = !self.inner.buffer().is_empty()
            || self
                .inner
                .get_ref()
                .has_input()
                .map_err(|e| MigrationError::io("poll the connection", e))?;
        if !waiting {
            return Ok(None);
        }
        self.receive(Duration::from_secs(5)).map(Some)
    }

    /// Whether buffered or unread input is waiting.
    pub fn input_waiting(&self) -> bool {
        !self.inner.buffer().is_empty() || self.inner.get_ref().has_input().unwrap_or(true)
    }

    /// Waits up to `timeout` for input (buffered or unread); an error counts as input (the
    /// next read reports it).
    pub fn wait_input(&self, timeout: Duration) -> bool {
        !self.inner.buffer().is_empty()
            || self.inner.get_ref().wait_for_input(timeout).unwrap_or(true)
    }

    /// Reads and drops whatever the peer still sends, for up to `timeout` or until it closes,
    /// so that closing afterwards does not reset the connection under data the peer has yet
    /// to read (it would lose a message written just before).
    pub fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let _ = self
            .inner
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)));
        let mut sink = [0u8; 64 << 10];
        while Instant::now() < deadline {
            match self.inner.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Consumes already buffered bytes (after a message, before a record stream reader takes
    /// over the reader).
    pub fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }

    /// Discards `n` buffered bytes.
    pub fn consume(&mut self, n: usize) {
        self.inner.consume(n);
    }
}

impl<T: Transport> Write for Channel<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let want: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_WRITE);
        if want == 0 {
            return Ok(0);
        }
        let allowed = match &mut self.limit {
            Some(bucket) => bucket.take(want),
            None => want,
        };
        let mut left = allowed;
        let mut slices = Vec::with_capacity(bufs.len());
        for b in bufs {
            if left == 0 {
                break;
            }
            let n = b.len().min(left);
            if n > 0 {
                slices.push(IoSlice::new(&b[..n]));
            }
            left -= n;
        }
        let result = self.inner.get_mut().write_vectored(&slices);
        let written = *result.as_ref().unwrap_or(&0);
        if let Some(bucket) = &mut self.limit {
            bucket.refund(allowed - written);
        }
        self.sent += written as u64;
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.get_mut().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_the_rate() {
        let rate = 4 << 20; // 4 MiB/s
        let mut bucket = TokenBucket::new(rate);
        let start = Instant::now();
        let mut sent = 0usize;
        while sent < 1 << 20 {
            sent += bucket.take(64 << 10);
        }
        let secs = start.elapsed().as_secs_f64();
        // 1 MiB at 4 MiB/s: 0.25 s, give or take one burst and the scheduler.
        assert!(secs > 0.22 && secs < 0.40, "{secs} s");
    }

    #[test]
    fn refunds_are_spent_again() {
        let mut bucket = TokenBucket::new(1 << 30);
        std::thread::sleep(Duration::from_millis(2));
        let n = bucket.take(1 << 20);
        bucket.refund(n);
        assert!(bucket.take(n) >= n / 2);
    }
}
