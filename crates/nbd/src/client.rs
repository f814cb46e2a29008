//! The connection and the transmission phase: reads, writes, flushes and trims with simple
//! replies.
//!
//! Requests are sent and answered one at a time, but sending ([`NbdClient::send`]) and
//! receiving ([`NbdClient::recv`]) are separate steps tied together by the request's cookie,
//! which every reply must echo: pipelining later means keeping a table of cookies in flight
//! instead of one. Any I/O failure or protocol violation leaves the byte stream in an unknown
//! place, so the client then refuses further requests ([`NbdError::Broken`]) rather than
//! misread a later reply; an error the server reports (`EIO`, `ENOSPC`, ...) keeps it usable.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{io_failure, NbdError};
use crate::handshake::{BlockSize, ExportInfo, Handshake, TransmissionFlags};
use crate::proto::*;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Longest wait for the TCP connection to be accepted.
    pub connect_timeout: Duration,
    /// Longest wait for any single send or receive on the socket (handshake included); a
    /// server that stops answering makes a request fail with [`NbdError::Timeout`] after this.
    pub io_timeout: Duration,
    /// Largest read or write sent in one request; larger ones are split. Lowered further to
    /// the server's advertised maximum, and rounded down to its minimum block size.
    pub max_request: u32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

#[derive(Debug)]
enum State {
    Ready,
    /// The stream can no longer be trusted; the reason, for later errors.
    Broken(String),
    Closed,
}

/// One request, for error messages.
#[derive(Clone, Copy)]
struct Req {
    op: &'static str,
    offset: u64,
    len: u64,
}

impl Req {
    fn describe(self) -> String {
        match self.op {
            "flush" => "flush".to_string(),
            op => format!("{op} of {} bytes at offset {}", self.len, self.offset),
        }
    }
}

/// A connection to one export of an NBD server, in the transmission phase.
///
/// Dropping it sends `NBD_CMD_DISC` (if the connection is still sound) and closes the socket.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    peer: String,
    export: String,
    info: ExportInfo,
    io_timeout: Duration,
    next_cookie: u64,
    /// Offsets and lengths must be multiples of this: the minimum block size the server
    /// advertised in reply to our `NBD_INFO_BLOCK_SIZE` request (which binds us), else 1.
    align: u32,
    /// Largest read or write payload per request.
    max_io: u32,
    /// Largest trim per request.
    max_trim: u32,
    state: State,
}

impl NbdClient {
    /// Connects to `addr` (`host:port`; `[v6addr]:port` for IPv6) and opens `export` (`""`
    /// for the server's default export).
    pub fn connect(
        addr: &str,
        export: &str,
        options: &ConnectOptions,
    ) -> Result<NbdClient, NbdError> {
        if options.connect_timeout.is_zero() || options.io_timeout.is_zero() {
            return Err(NbdError::BadOptions("timeouts must not be zero"));
        }
        crate::handshake::validate_export_name(export)?;
        let mut stream = connect_tcp(addr, options.connect_timeout)?;
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(options.io_timeout)))
            .and_then(|()| stream.set_write_timeout(Some(options.io_timeout)));
        if let Err(e) = setup {
            return Err(NbdError::Connect {
                addr: addr.to_string(),
                source: e,
            });
        }
        let info = Handshake {
            stream: &mut stream,
            peer: addr,
            export,
            timeout: options.io_timeout,
        }
        .run()?;

        let (align, server_max) = match info.block_size {
            Some(bs) => (bs.minimum, bs.maximum),
            None => (1, u32::MAX),
        };
        let max_io = round_down(options.max_request.min(server_max), align).max(align);
        // Trims carry no payload: only the server's own limit (or 2 GiB) applies.
        let max_trim = round_down(server_max.min(1 << 31), align).max(align);
        log::debug!(
            "NBD {addr} export '{export}': {} bytes, flags {:#x}, block sizes {:?}, {}",
            info.size,
            info.flags.0,
            info.block_size,
            if info.negotiated_with_go {
                "NBD_OPT_GO"
            } else {
                "NBD_OPT_EXPORT_NAME"
            },
        );
        Ok(NbdClient {
            stream,
            peer: addr.to_string(),
            export: export.to_string(),
            info,
            io_timeout: options.io_timeout,
            next_cookie: 1,
            align,
            max_io,
            max_trim,
            state: State::Ready,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Everything the handshake learned about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.info.flags
    }

    /// True if the server refuses writes and trims.
    pub fn read_only(&self) -> bool {
        self.info.flags.read_only()
    }

    /// The block size constraints the server advertised, if any.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.info.block_size
    }

    /// The alignment every offset and length must keep (1 if the server set none).
    pub fn alignment(&self) -> u32 {
        self.align
    }

    /// Largest read or write sent in one request.
    pub fn max_request(&self) -> u32 {
        self.max_io
    }

    /// The server address as given to [`NbdClient::connect`].
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The export name as given to [`NbdClient::connect`].
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// False once a failure has made the connection unusable (or after a disconnect).
    pub fn is_usable(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Changes the socket's I/O timeout.
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), NbdError> {
        if timeout.is_zero() {
            return Err(NbdError::BadOptions("timeouts must not be zero"));
        }
        let r = self
            .stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| self.stream.set_write_timeout(Some(timeout)));
        if let Err(e) = r {
            return Err(self.fail(io_failure(&self.peer, "setting the timeout", timeout, e)));
        }
        self.io_timeout = timeout;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_request("read", offset, buf.len() as u64)?;
        let mut off = offset;
        for chunk in buf.chunks_mut(self.max_io as usize) {
            let req = Req {
                op: "read",
                offset: off,
                len: chunk.len() as u64,
            };
            let cookie = self.send(req, CMD_READ, 0, &[])?;
            self.recv(req, cookie, Some(chunk))?;
            off += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`. Done when the server has it, not necessarily on stable
    /// storage: see [`NbdClient::flush`] and [`NbdClient::write_fua`].
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), NbdError> {
        self.write_impl(offset, buf, false)
    }

    /// Writes `buf` at `offset` and returns only once it is on stable storage (forced unit
    /// access). Without `NBD_FLAG_SEND_FUA` this is a write followed by a flush; a server
    /// that offers neither has nothing to make durable on request, so it is a plain write.
    pub fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<(), NbdError> {
        self.write_impl(offset, buf, true)
    }

    fn write_impl(&mut self, offset: u64, buf: &[u8], fua: bool) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_request("write", offset, buf.len() as u64)?;
        let native_fua = fua && self.info.flags.can_fua();
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let mut off = offset;
        for chunk in buf.chunks(self.max_io as usize) {
            let req = Req {
                op: "write",
                offset: off,
                len: chunk.len() as u64,
            };
            let cookie = self.send(req, CMD_WRITE, flags, chunk)?;
            self.recv(req, cookie, None)?;
            off += chunk.len() as u64;
        }
        if fua && !native_fua && !buf.is_empty() {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write the server has acknowledged durable. A server that does not offer
    /// `NBD_CMD_FLUSH` has no volatile cache to flush, so this then does nothing.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.check_usable()?;
        if !self.info.flags.can_flush() {
            return Ok(());
        }
        let req = Req {
            op: "flush",
            offset: 0,
            len: 0,
        };
        let cookie = self.send(req, CMD_FLUSH, 0, &[])?;
        self.recv(req, cookie, None)
    }

    /// Tells the server `len` bytes at `offset` are no longer needed (their content is then
    /// undefined until written). Fails with [`NbdError::Unsupported`] if the server does not
    /// offer `NBD_CMD_TRIM`.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_writable()?;
        if !self.info.flags.can_trim() {
            return Err(NbdError::Unsupported {
                peer: self.peer.clone(),
                what: "trim (NBD_CMD_TRIM)",
            });
        }
        self.check_request("trim", offset, len)?;
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let n = (end - off).min(self.max_trim as u64);
            let req = Req {
                op: "trim",
                offset: off,
                len: n,
            };
            // n <= max_trim, a u32.
            let cookie = self.send(req, CMD_TRIM, 0, &[])?;
            self.recv(req, cookie, None)?;
            off += n;
        }
        Ok(())
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`) and closes the socket.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), NbdError> {
        let was_ready = matches!(self.state, State::Ready);
        self.state = State::Closed;
        let mut result = Ok(());
        if was_ready {
            let header = encode_request(0, CMD_DISC, 0, 0, 0);
            if let Err(e) = self.stream.write_all(&header) {
                result = Err(io_failure(&self.peer, "disconnecting", self.io_timeout, e));
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        result
    }

    fn check_usable(&self) -> Result<(), NbdError> {
        match &self.state {
            State::Ready => Ok(()),
            State::Broken(reason) => Err(NbdError::Broken {
                peer: self.peer.clone(),
                reason: reason.clone(),
            }),
            State::Closed => Err(NbdError::Broken {
                peer: self.peer.clone(),
                reason: "disconnected".to_string(),
            }),
        }
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        self.check_usable()?;
        if self.info.flags.read_only() {
            return Err(NbdError::ReadOnly {
                peer: self.peer.clone(),
                export: self.export.clone(),
            });
        }
        Ok(())
    }

    /// Checks a request against the export before anything is sent: within the export, and
    /// aligned as the server asked.
    fn check_request(&self, op: &'static str, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_usable()?;
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => {}
            _ => {
                return Err(NbdError::OutOfRange {
                    op,
                    offset,
                    len,
                    size: self.info.size,
                })
            }
        }
        let a = u64::from(self.align);
        if offset % a != 0 || len % a != 0 {
            return Err(NbdError::Unaligned {
                op,
                offset,
                len,
                minimum: self.align,
            });
        }
        Ok(())
    }

    /// Sends one request (with its payload, for a write) and returns its cookie.
    fn send(
        &mut self,
        req: Req,
        command: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        // Callers split requests so lengths fit (max_io and max_trim are u32).
        let header = encode_request(flags, command, cookie, req.offset, req.len as u32);
        let result = if payload.is_empty() {
            self.stream.write_all(&header)
        } else {
            write_all_vectored(
                &mut self.stream,
                &mut [IoSlice::new(&header), IoSlice::new(payload)],
            )
        };
        match result {
            Ok(()) => Ok(cookie),
            Err(e) => {
                let during = format!("sending {}", req.describe());
                Err(self.fail(io_failure(&self.peer, &during, self.io_timeout, e)))
            }
        }
    }

    /// Receives the simple reply to the request with `cookie`, and for a successful read its
    /// data into `data`.
    fn recv(&mut self, req: Req, cookie: u64, data: Option<&mut [u8]>) -> Result<(), NbdError> {
        let mut hb = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = self.stream.read_exact(&mut hb) {
            let during = format!("waiting for the reply to {}", req.describe());
            return Err(self.fail(io_failure(&self.peer, &during, self.io_timeout, e)));
        }
        let h = decode_reply(&hb);
        if h.magic != SIMPLE_REPLY_MAGIC {
            let detail = if h.magic == STRUCTURED_REPLY_MAGIC {
                format!(
                    "structured reply to {} although structured replies were not negotiated",
                    req.describe()
                )
            } else {
                format!(
                    "reply to {} starts with {:#010x} instead of the simple reply magic",
                    req.describe(),
                    h.magic
                )
            };
            return Err(self.protocol(detail));
        }
        if h.cookie != cookie {
            let detail = format!(
                "reply cookie {:#x} does not match the request in flight ({}, cookie {cookie:#x})",
                h.cookie,
                req.describe()
            );
            return Err(self.protocol(detail));
        }
        if h.error != 0 {
            if h.error == ESHUTDOWN {
                // The protocol asks for a soft disconnect on ESHUTDOWN.
                let _ = self.close();
                self.state = State::Broken("the server is shutting down".to_string());
            }
            return Err(NbdError::Server {
                peer: self.peer.clone(),
                op: req.op,
                offset: req.offset,
                len: req.len,
                errno: h.error,
            });
        }
        if let Some(buf) = data {
            if let Err(e) = self.stream.read_exact(buf) {
                let during = format!("receiving the data of {}", req.describe());
                return Err(self.fail(io_failure(&self.peer, &during, self.io_timeout, e)));
            }
        }
        Ok(())
    }

    fn protocol(&mut self, detail: String) -> NbdError {
        let e = NbdError::Protocol {
            peer: self.peer.clone(),
            detail,
        };
        self.fail(e)
    }

    /// Marks the connection unusable after `e` and returns `e`. The socket is shut down: the
    /// server sees the hard disconnect the protocol prescribes after a violation.
    fn fail(&mut self, e: NbdError) -> NbdError {
        self.state = State::Broken(e.to_string());
        let _ = self.stream.shutdown(Shutdown::Both);
        e
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if matches!(self.state, State::Ready) {
            // A server that stopped reading must not hold up the drop for the full timeout.
            let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
            if let Err(e) = self.close() {
                log::debug!("NBD disconnect from {}: {e}", self.peer);
            }
        }
    }
}

/// Resolves `addr` and connects to the first address that accepts within `timeout`.
fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, NbdError> {
    let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return Err(NbdError::BadAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
        }
    };
    if addrs.is_empty() {
        return Err(NbdError::BadAddress {
            addr: addr.to_string(),
            reason: "the host name has no addresses".to_string(),
        });
    }
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            Err(NbdError::ConnectTimeout {
                addr: addr.to_string(),
                timeout,
            })
        }
        Some(e) => Err(NbdError::Connect {
            addr: addr.to_string(),
            source: e,
        }),
        None => Err(NbdError::BadAddress {
            addr: addr.to_string(),
            reason: "no address to connect to".to_string(),
        }),
    }
}

/// Writes all of `bufs` (header and payload in one system call where the kernel allows).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection accepted no more data",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn round_down(x: u32, align: u32) -> u32 {
    x - x % align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(round_down(DEFAULT_MAX_REQUEST, 4096), DEFAULT_MAX_REQUEST);
        assert_eq!(round_down(u32::MAX, 512), u32::MAX - 511);
        assert_eq!(round_down(1000, 1), 1000);
    }

    #[test]
    fn vectored_write_handles_short_writes() {
        /// Accepts at most 3 bytes per call.
        struct Dribble(Vec<u8>);
        impl Write for Dribble {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(3);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Dribble(Vec::new());
        write_all_vectored(
            &mut w,
            &mut [IoSlice::new(b"header"), IoSlice::new(b"payload!")],
        )
        .unwrap();
        assert_eq!(w.0, b"headerpayload!");
    }

    #[test]
    fn bad_addresses_are_refused_before_connecting() {
        let o = ConnectOptions::default();
        let e = NbdClient::connect("no-port-here", "", &o).unwrap_err();
        assert!(matches!(e, NbdError::BadAddress { .. }), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = NbdClient::connect("127.0.0.1:1", "a\0b", &o).unwrap_err();
        assert!(matches!(e, NbdError::BadExportName { .. }), "{e}");
        let zero = ConnectOptions {
            io_timeout: Duration::ZERO,
            ..o
        };
        assert!(NbdClient::connect("127.0.0.1:1", "", &zero).is_err());
    }
}
