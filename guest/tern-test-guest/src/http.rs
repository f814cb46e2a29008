//! A minimal HTTP/1.1 server for downloads whose every byte a client can check.
//!
//! `GET /download/<n>` answers `200 OK` with `Content-Length: n` and a body whose byte at
//! offset `i` is `download_byte(i)`; `HEAD` the same headers without the body; anything else
//! `404` (or `400`/`405`/`431` for what is not a request it understands). Connections are
//! persistent (HTTP/1.1) unless the client sends `Connection: close` or speaks HTTP/1.0
//! without `keep-alive`; pipelined requests are answered in order. The body is generated
//! straight into the socket's transmit buffer.

use core::sync::atomic::{AtomicU64, Ordering};

use smoltcp::socket::tcp::{Socket, State};

/// Requests answered since boot.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Fills `buf` with the body bytes from offset `start` on: byte `i` of a download is
/// `(i * K) >> 56` (wrapping multiplication; `tern_testguest::download_byte` on the host), and
/// `i * K` advances by `K` per byte.
fn fill(buf: &mut [u8], start: u64) {
    let mut x = start.wrapping_mul(K);
    for b in buf {
        *b = (x >> 56) as u8;
        x = x.wrapping_add(K);
    }
}

/// Longest request head (request line and headers) the server reads.
const REQ_MAX: usize = 2048;

/// One connection's progress (the socket itself lives in the socket set).
pub struct Conn {
    req: [u8; REQ_MAX],
    req_len: usize,
    head: [u8; 256],
    head_len: usize,
    head_sent: usize,
    body_pos: u64,
    body_len: u64,
    sending: bool,
    close_after: bool,
    closing: bool,
}

impl Conn {
    pub const NEW: Conn = Conn {
        req: [0; REQ_MAX],
        req_len: 0,
        head: [0; 256],
        head_len: 0,
        head_sent: 0,
        body_pos: 0,
        body_len: 0,
        sending: false,
        close_after: false,
        closing: false,
    };

    fn reset(&mut self) {
        self.req_len = 0;
        self.head_len = 0;
        self.head_sent = 0;
        self.body_pos = 0;
        self.body_len = 0;
        self.sending = false;
        self.close_after = false;
        self.closing = false;
    }
}

/// Recycles a socket that is done (closed, or in TIME-WAIT after the guest closed first: its
/// 10 s there would keep the slot from the next client) into a listening one. Returns true if
/// the socket is connected and has work for its server.
pub fn recycle(sock: &mut Socket, port: u16) -> bool {
    match sock.state() {
        State::Closed | State::TimeWait => {
            sock.abort();
            let _ = sock.listen(port);
            false
        }
        State::Listen | State::SynReceived | State::SynSent => false,
        _ => true,
    }
}

/// Advances one HTTP connection: reads requests, queues responses.
pub fn step(sock: &mut Socket, c: &mut Conn, port: u16) {
    if !recycle(sock, port) {
        c.reset();
        return;
    }
    // Bounded: each round either answers a request or returns.
    for _ in 0..16 {
        if c.sending {
            send_response(sock, c);
            if c.sending {
                return; // transmit buffer full
            }
            if c.close_after {
                sock.close();
                c.closing = true;
            }
        }
        if c.closing {
            return;
        }
        if sock.can_recv() {
            if let Ok(n) = sock.recv_slice(&mut c.req[c.req_len..]) {
                c.req_len += n;
            }
        }
        match parse(&c.req[..c.req_len]) {
            Parse::Incomplete if c.req_len == REQ_MAX => {
                c.req_len = 0;
                respond_error(c, "431 Request Header Fields Too Large");
            }
            Parse::Incomplete => {
                if !sock.may_recv() {
                    // The client closed its side and has no request pending: close ours.
                    sock.close();
                    c.closing = true;
                }
                return;
            }
            Parse::Request(r) => {
                let consumed = r.consumed.min(c.req_len);
                c.req.copy_within(consumed..c.req_len, 0);
                c.req_len -= consumed;
                respond(c, &r);
            }
        }
    }
}

/// Sends what the transmit buffer takes of the pending response; `c.sending` turns false once
/// all of it is queued.
fn send_response(sock: &mut Socket, c: &mut Conn) {
    while c.head_sent < c.head_len {
        match sock.send_slice(&c.head[c.head_sent..c.head_len]) {
            Ok(n) if n > 0 => c.head_sent += n,
            _ => return,
        }
    }
    // The transmit buffer is a ring: up to two contiguous pieces per call.
    while c.body_pos < c.body_len {
        let start = c.body_pos;
        let left = c.body_len - start;
        let sent = sock.send(|buf| {
            let n = (buf.len() as u64).min(left) as usize;
            fill(&mut buf[..n], start);
            (n, n)
        });
        match sent {
            Ok(n) if n > 0 => c.body_pos += n as u64,
            _ => return,
        }
    }
    c.sending = false;
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

struct Request {
    /// Bytes of the buffer the request head took.
    consumed: usize,
    head_only: bool,
    method_ok: bool,
    /// `Some(n)` for `/download/<n>`.
    download: Option<u64>,
    /// The path looked like a download but its size did not parse.
    bad_size: bool,
    close: bool,
}

enum Parse {
    Incomplete,
    Request(Request),
}

fn eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| eq_ignore_case(w, needle))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse(buf: &[u8]) -> Parse {
    // Leading empty lines are allowed before a request (RFC 9112 2.2).
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let Some(end) = buf[start..].windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parse::Incomplete;
    };
    let head = &buf[start..start + end];
    let mut lines = head
        .split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or(b"");
    let mut words = line.split(|&c| c == b' ').filter(|w| !w.is_empty());
    let method = words.next().unwrap_or(b"");
    let target = words.next().unwrap_or(b"");
    let version = words.next().unwrap_or(b"");
    let http10 = version == b"HTTP/1.0";
    let mut close = http10 || !version.starts_with(b"HTTP/1.");
    for h in lines {
        let Some(colon) = h.iter().position(|&c| c == b':') else {
            continue;
        };
        if eq_ignore_case(trim(&h[..colon]), b"connection") {
            let v = &h[colon + 1..];
            if contains_ignore_case(v, b"close") {
                close = true;
            } else if contains_ignore_case(v, b"keep-alive") && http10 {
                close = false;
            }
        }
    }
    let path = match target.iter().position(|&c| c == b'?') {
        Some(q) => &target[..q],
        None => target,
    };
    let (download, bad_size) = match path.strip_prefix(b"/download/") {
        Some(n) => match parse_size(n) {
            Some(n) => (Some(n), false),
            None => (None, true),
        },
        None => (None, false),
    };
    Parse::Request(Request {
        consumed: start + end + 4,
        head_only: method == b"HEAD",
        method_ok: method == b"GET" || method == b"HEAD",
        download,
        bad_size,
        close,
    })
}

fn parse_size(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// Formats into a fixed buffer (the response head).
struct Head<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Head<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        let end = self.len.checked_add(b.len()).ok_or(core::fmt::Error)?;
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(b);
        self.len = end;
        Ok(())
    }
}

fn set_head(c: &mut Conn, args: core::fmt::Arguments) {
    let mut h = Head {
        buf: &mut c.head,
        len: 0,
    };
    // The head buffer is sized for every response below.
    let _ = core::fmt::write(&mut h, args);
    c.head_len = h.len;
    c.head_sent = 0;
    c.sending = true;
}

fn connection(close: bool) -> &'static str {
    if close {
        "close"
    } else {
        "keep-alive"
    }
}

fn respond(c: &mut Conn, r: &Request) {
    c.close_after = r.close;
    c.body_pos = 0;
    c.body_len = 0;
    if !r.method_ok {
        c.close_after = true;
        return respond_error(c, "405 Method Not Allowed");
    }
    if r.bad_size {
        return respond_error(c, "400 Bad Request");
    }
    let Some(n) = r.download else {
        let body = "not found\n";
        let (conn, ct) = (connection(c.close_after), "text/plain");
        let shown = if r.head_only { "" } else { body };
        return set_head(
            c,
            format_args!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{shown}",
                body.len()
            ),
        );
    };
    let conn = connection(c.close_after);
    set_head(
        c,
        format_args!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {conn}\r\n\r\n"
        ),
    );
    if !r.head_only {
        c.body_len = n;
    }
}

/// An error response without a body; the connection closes after it (the request stream may
/// be out of step).
fn respond_error(c: &mut Conn, status: &str) {
    c.close_after = true;
    c.body_pos = 0;
    c.body_len = 0;
    set_head(
        c,
        format_args!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
}
