//! Protocol edge cases against a tiny scripted NBD server in a thread: what real servers
//! rarely do (old handshakes, no `NBD_OPT_GO`, option errors) and what only broken or hostile
//! ones do (wrong cookies, truncated replies, absurd sizes). Every socket has a timeout, so a
//! test that goes wrong fails instead of hanging.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_nbd::proto::*;
use tern_nbd::{ConnectOptions, NbdClient, NbdError};

/// The scripted server's end of the connection, with helpers speaking the server side.
struct Peer(TcpStream);

/// A request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

impl Peer {
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("server send");
    }

    fn recv<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b).expect("server recv");
        b
    }

    /// Newstyle greeting with `flags`; returns the client's flags.
    fn greet(&mut self, flags: u16) -> u32 {
        self.send(&NBD_MAGIC.to_be_bytes());
        self.send(&IHAVEOPT.to_be_bytes());
        self.send(&flags.to_be_bytes());
        u32::from_be_bytes(self.recv::<4>())
    }

    /// Reads one option: (option, data).
    fn option(&mut self) -> (u32, Vec<u8>) {
        let h = self.recv::<16>();
        assert_eq!(be_u64(&h[0..8]), IHAVEOPT, "option magic");
        let len = be_u32(&h[12..16]) as usize;
        assert!(len <= 8192, "option of {len} bytes");
        let mut data = vec![0u8; len];
        self.0.read_exact(&mut data).expect("option data");
        (be_u32(&h[8..12]), data)
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.reply_with_len(option, reply_type, data.len() as u32, data);
    }

    fn reply_with_len(&mut self, option: u32, reply_type: u32, len: u32, data: &[u8]) {
        let mut m = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&reply_type.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    fn info_export(&mut self, size: u64, flags: u16) {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(OPT_GO, REP_INFO, &d);
    }

    fn info_block_size(&mut self, min: u32, preferred: u32, max: u32) {
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, preferred, max] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(OPT_GO, REP_INFO, &d);
    }

    /// Expects `NBD_OPT_GO` for `export` asking for block sizes; returns nothing, replies
    /// are up to the caller.
    fn expect_go(&mut self, export: &str) {
        let (opt, data) = self.option();
        assert_eq!(opt, OPT_GO);
        assert_eq!(data, encode_go_data(export, &[INFO_BLOCK_SIZE]));
    }

    /// The usual successful handshake: fixed newstyle, GO accepted with `size` and `flags`.
    fn handshake(&mut self, size: u64, flags: u16) {
        let client_flags = self.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(client_flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        self.expect_go("");
        self.info_export(size, flags);
        self.reply(OPT_GO, REP_ACK, &[]);
    }

    fn request(&mut self) -> Request {
        let h = self.recv::<REQUEST_LEN>();
        assert_eq!(be_u32(&h[0..4]), REQUEST_MAGIC, "request magic");
        let mut r = Request {
            flags: be_u16(&h[4..6]),
            command: be_u16(&h[6..8]),
            cookie: be_u64(&h[8..16]),
            offset: be_u64(&h[16..24]),
            length: be_u32(&h[24..28]),
            payload: Vec::new(),
        };
        if r.command == CMD_WRITE {
            r.payload = vec![0u8; r.length as usize];
            self.0.read_exact(&mut r.payload).expect("write payload");
        }
        r
    }

    fn simple_reply(&mut self, error: u32, cookie: u64, data: &[u8]) {
        let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&error.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Answers a read with bytes equal to the low byte of their offset.
    fn serve_read(&mut self, r: &Request) {
        assert_eq!(r.command, CMD_READ);
        let data: Vec<u8> = (0..u64::from(r.length))
            .map(|i| (r.offset + i) as u8)
            .collect();
        self.simple_reply(0, r.cookie, &data);
    }

    /// Expects the client's `NBD_CMD_DISC` (or, with `or_eof`, a plain close).
    fn expect_disc(&mut self) {
        let r = self.request();
        assert_eq!(r.command, CMD_DISC, "expected NBD_CMD_DISC, got {r:?}");
    }

    /// True if the client closed the connection (reads EOF) within the timeout.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A one-connection scripted server.
struct Fake {
    addr: String,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(script: impl FnOnce(&mut Peer) + Send + 'static) -> Fake {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no client connected");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            script(&mut Peer(stream));
        });
        Fake {
            addr,
            thread: Some(thread),
        }
    }

    /// Waits for the script to finish; its panics fail the test.
    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    }
}

fn connect(f: &Fake) -> Result<NbdClient, NbdError> {
    NbdClient::connect(&f.addr, "", &opts())
}

const RW: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM;

// ---- handshake ----

#[test]
fn go_with_block_sizes_splits_and_aligns() {
    let f = Fake::start(|p| {
        p.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        p.expect_go("");
        // Unrequested and unknown information comes first: must be taken or skipped.
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"canonical");
        p.reply(OPT_GO, REP_INFO, &name);
        p.reply(OPT_GO, REP_INFO, &[0x77, 0x77, 1, 2, 3]);
        p.info_block_size(512, 4096, 65536);
        p.info_export(1 << 20, RW);
        p.reply(OPT_GO, REP_ACK, &[]);
        // A 160 KiB read arrives as 64 + 64 + 32 KiB.
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = p.request();
            seen.push((r.offset, r.length));
            p.serve_read(&r);
        }
        assert_eq!(
            seen,
            [(4096, 65536), (4096 + 65536, 65536), (4096 + 131072, 32768)]
        );
        p.expect_disc();
    });
    let mut c = connect(&f).expect("connect");
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.alignment(), 512);
    assert_eq!(c.max_request(), 65536);
    assert_eq!(c.info().name.as_deref(), Some("canonical"));
    let mut buf = vec![0u8; 160 * 1024];
    c.read(4096, &mut buf).expect("read");
    assert!(buf.iter().enumerate().all(|(i, &b)| b == (4096 + i) as u8));
    // Unaligned: refused before anything is sent.
    let e = c.read(100, &mut buf[..512]).unwrap_err();
    assert!(matches!(e, NbdError::Unaligned { minimum: 512, .. }), "{e}");
    let e = c.write(0, &buf[..100]).unwrap_err();
    assert!(matches!(e, NbdError::Unaligned { .. }), "{e}");
    assert!(c.is_usable());
    drop(c);
    f.join();
}

#[test]
fn falls_back_to_export_name_without_go() {
    for no_zeroes in [true, false] {
        let f = Fake::start(move |p| {
            let hs = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
            let cf = p.greet(hs);
            let expected = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
            assert_eq!(cf, expected);
            let (opt, _) = p.option();
            assert_eq!(opt, OPT_GO);
            p.reply(OPT_GO, REP_ERR_UNSUP, b"what is GO?");
            let (opt, name) = p.option();
            assert_eq!((opt, &name[..]), (OPT_EXPORT_NAME, &b"disk7"[..]));
            p.send(&(8192u64).to_be_bytes());
            p.send(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
            if !no_zeroes {
                p.send(&[0u8; 124]);
            }
            let r = p.request();
            p.serve_read(&r);
            p.expect_disc();
        });
        let mut c = NbdClient::connect(&f.addr, "disk7", &opts()).expect("connect");
        assert!(!c.info().negotiated_with_go);
        assert_eq!((c.size(), c.read_only(), c.alignment()), (8192, true, 1));
        let mut b = [0u8; 16];
        c.read(16, &mut b).expect("read");
        assert_eq!(b[0], 16);
        c.disconnect().expect("disconnect");
        f.join();
    }
}

#[test]
fn plain_newstyle_server_gets_export_name_directly() {
    let f = Fake::start(|p| {
        assert_eq!(p.greet(0), 0, "no flags the server did not offer");
        let (opt, name) = p.option();
        assert_eq!((opt, name.len()), (OPT_EXPORT_NAME, 0));
        p.send(&(4096u64).to_be_bytes());
        p.send(&FLAG_HAS_FLAGS.to_be_bytes());
        p.send(&[0u8; 124]);
        p.expect_disc();
    });
    let c = connect(&f).expect("connect");
    assert_eq!(c.size(), 4096);
    drop(c);
    f.join();
}

#[test]
fn export_name_refusal_is_a_closed_connection() {
    let f = Fake::start(|p| {
        p.greet(FLAG_FIXED_NEWSTYLE);
        p.option();
        p.reply(OPT_GO, REP_ERR_UNSUP, &[]);
        p.option();
        // An old server's way of saying "no such export".
    });
    let e = NbdClient::connect(&f.addr, "ghost", &opts()).unwrap_err();
    assert!(matches!(e, NbdError::ExportNameRejected { .. }), "{e}");
    assert!(e.to_string().contains("'ghost'"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    f.join();
}

#[test]
fn oldstyle_server_is_refused() {
    // One write: the client hangs up once it has read the magics, and a later write of the
    // rest would find the connection gone.
    let f = Fake::start(|p| {
        let mut greeting = NBD_MAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&(1u64 << 30).to_be_bytes());
        greeting.extend_from_slice(&[0u8; 4 + 124]);
        p.send(&greeting);
    });
    let e = connect(&f).unwrap_err();
    assert!(matches!(e, NbdError::OldStyle { .. }), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::Unsupported);
    f.join();
}

#[test]
fn unknown_magics_are_protocol_errors() {
    // Eight bytes are enough to tell, even if the other side then waits.
    let f = Fake::start(|p| {
        p.send(b"SSH-2.0-");
        assert!(p.closed());
    });
    let e = connect(&f).unwrap_err();
    assert!(e.to_string().contains("\"SSH-2.0-\""), "{e}");
    f.join();

    let f = Fake::start(|p| p.send(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
    let e = connect(&f).unwrap_err();
    assert!(matches!(e, NbdError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("not an NBD server") && e.to_string().contains("HTTP/1.1"));
    f.join();

    let f = Fake::start(|p| {
        p.send(&NBD_MAGIC.to_be_bytes());
        p.send(b"SOMETHIN");
    });
    let e = connect(&f).unwrap_err();
    assert!(e.to_string().contains("unknown handshake style"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidData);
    f.join();
}

#[test]
fn option_errors_are_reported_with_the_server_message() {
    let cases = [
        (REP_ERR_UNKNOWN, io::ErrorKind::NotFound, "no such export"),
        (REP_ERR_POLICY, io::ErrorKind::PermissionDenied, "policy"),
        (REP_ERR_TLS_REQD, io::ErrorKind::PermissionDenied, "TLS"),
        (
            REP_ERR_SHUTDOWN,
            io::ErrorKind::ConnectionAborted,
            "shutting down",
        ),
        (REP_ERR_BIT | 0x55, io::ErrorKind::Other, "0x80000055"),
    ];
    for (reply, kind, words) in cases {
        let f = Fake::start(move |p| {
            p.greet(FLAG_FIXED_NEWSTYLE);
            p.expect_go("vm1");
            p.reply(OPT_GO, reply, b"not today");
            // The client leaves politely: NBD_OPT_ABORT, then closes.
            let (opt, _) = p.option();
            assert_eq!(opt, OPT_ABORT);
            assert!(p.closed());
        });
        let e = NbdClient::connect(&f.addr, "vm1", &opts()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, NbdError::Refused { .. }), "{msg}");
        assert!(msg.contains("'vm1'") && msg.contains(words) && msg.contains("not today"));
        assert!(msg.contains(&f.addr), "{msg}");
        assert_eq!(io::Error::from(e).kind(), kind, "{msg}");
        f.join();
    }
}

/// Runs a handshake in which the server answers GO with `replies`, and returns the error.
fn go_error(replies: impl FnOnce(&mut Peer) + Send + 'static) -> NbdError {
    let f = Fake::start(move |p| {
        p.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        p.expect_go("");
        replies(p);
    });
    let e = connect(&f).expect_err("handshake must fail");
    f.join();
    e
}

fn assert_protocol(e: &NbdError, words: &str) {
    assert!(matches!(e, NbdError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains(words), "{e} (expected '{words}')");
}

#[test]
fn oversized_option_reply_is_refused_unread() {
    // A 2 GiB reply announced, never sent: refused from its header alone.
    let e = go_error(|p| p.reply_with_len(OPT_GO, REP_ERR_POLICY, 0x7fff_ffff, b""));
    assert_protocol(&e, "at most 65536");
    let e = go_error(|p| p.reply_with_len(OPT_GO, REP_INFO, u32::MAX, b""));
    assert_protocol(&e, "at most 65536");
}

#[test]
fn absurd_export_sizes_are_refused() {
    let e = go_error(|p| {
        p.info_export(u64::MAX, RW);
        p.reply(OPT_GO, REP_ACK, &[]);
    });
    assert_protocol(&e, "export size");
    // The same through NBD_OPT_EXPORT_NAME.
    let f = Fake::start(|p| {
        p.greet(0);
        p.option();
        p.send(&(1u64 << 63).to_be_bytes());
        p.send(&RW.to_be_bytes());
        p.send(&[0u8; 124]);
    });
    let e = connect(&f).unwrap_err();
    assert_protocol(&e, "export size");
    f.join();
}

#[test]
fn absurd_block_sizes_are_refused() {
    for (min, pref, max) in [
        (3, 4096, 65536),            // not a power of two
        (1 << 20, 1 << 20, 1 << 21), // minimum above 64 KiB
        (512, 4096, 256),            // maximum below minimum
        (512, 4096, 1000),           // maximum not a multiple of the minimum
        (4096, 512, 65536),          // preferred below minimum
        (0, 4096, 65536),            // zero
    ] {
        let e = go_error(move |p| {
            p.info_block_size(min, pref, max);
            p.info_export(1 << 20, RW);
            p.reply(OPT_GO, REP_ACK, &[]);
        });
        assert_protocol(&e, "invalid block size");
    }
}

#[test]
fn malformed_go_replies_are_refused() {
    // NBD_INFO_EXPORT of the wrong length.
    let e = go_error(|p| p.reply(OPT_GO, REP_INFO, &[0, 0, 1, 2, 3]));
    assert_protocol(&e, "NBD_INFO_EXPORT payload of 3 bytes");
    // Accepted without the export's size.
    let e = go_error(|p| p.reply(OPT_GO, REP_ACK, &[]));
    assert_protocol(&e, "without sending NBD_INFO_EXPORT");
    // A reply to some other option.
    let e = go_error(|p| p.reply(OPT_EXPORT_NAME, REP_ACK, &[]));
    assert_protocol(&e, "reply to option 1");
    // Bad reply magic.
    let e = go_error(|p| p.send(&[0xee; 20]));
    assert_protocol(&e, "reply magic");
    // Replies that never end.
    let e = go_error(|p| {
        for _ in 0..MAX_OPTION_REPLIES {
            p.reply(OPT_GO, REP_INFO, &[0x12, 0x34]);
        }
    });
    assert_protocol(&e, "without a final one");
    // Closed mid-reply.
    let e = go_error(|p| p.send(&OPTION_REPLY_MAGIC.to_be_bytes()));
    assert!(matches!(e, NbdError::ConnectionLost { .. }), "{e}");
}

#[test]
fn silent_server_times_out_in_the_handshake() {
    let f = Fake::start(|p| {
        // Accepts, says nothing, until the client gives up.
        assert!(p.closed());
    });
    let short = ConnectOptions {
        io_timeout: Duration::from_millis(300),
        ..opts()
    };
    let start = Instant::now();
    let e = NbdClient::connect(&f.addr, "", &short).unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("greeting"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    f.join();
}

// ---- transmission ----

#[test]
fn wrong_cookie_is_a_protocol_error_and_breaks_the_connection() {
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        let r = p.request();
        p.simple_reply(0, r.cookie + 1, &[0u8; 512]);
        // The client hangs up (hard disconnect after a violation): no NBD_CMD_DISC.
        assert!(p.closed());
    });
    let mut c = connect(&f).expect("connect");
    let mut b = [0u8; 512];
    let e = c.read(0, &mut b).unwrap_err();
    assert_protocol(&e, "cookie");
    assert!(!c.is_usable());
    let e = c.read(0, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::Broken { .. }), "{e}");
    assert!(
        e.to_string().contains("cookie"),
        "the first failure is remembered: {e}"
    );
    drop(c);
    f.join();
}

#[test]
fn bad_and_structured_reply_magics_are_protocol_errors() {
    for (magic, words) in [
        (STRUCTURED_REPLY_MAGIC, "structured reply"),
        (0xdead_beef, "0xdeadbeef"),
    ] {
        let f = Fake::start(move |p| {
            p.handshake(1 << 20, RW);
            let r = p.request();
            let mut m = magic.to_be_bytes().to_vec();
            m.extend_from_slice(&[0u8; 4]);
            m.extend_from_slice(&r.cookie.to_be_bytes());
            p.send(&m);
            assert!(p.closed());
        });
        let mut c = connect(&f).expect("connect");
        let e = c.flush().unwrap_err();
        assert_protocol(&e, words);
        drop(c);
        f.join();
    }
}

#[test]
fn truncated_replies_are_lost_connections() {
    // Header, then half the data, then gone.
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        let r = p.request();
        let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&r.cookie.to_be_bytes());
        m.extend_from_slice(&[1u8; 2048]);
        p.send(&m);
    });
    let mut c = connect(&f).expect("connect");
    let mut b = vec![0u8; 4096];
    let e = c.read(0, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::ConnectionLost { .. }), "{e}");
    assert!(e.to_string().contains("receiving the data of read"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::UnexpectedEof);
    f.join();

    // Half a header.
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        p.request();
        p.send(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    });
    let mut c = connect(&f).expect("connect");
    let e = c.write(0, &[0u8; 512]).unwrap_err();
    assert!(matches!(e, NbdError::ConnectionLost { .. }), "{e}");
    assert!(
        e.to_string().contains("waiting for the reply to write"),
        "{e}"
    );
    f.join();
}

#[test]
fn silent_server_times_out_mid_request() {
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        p.request();
        assert!(p.closed());
    });
    let short = ConnectOptions {
        io_timeout: Duration::from_millis(300),
        ..opts()
    };
    let mut c = NbdClient::connect(&f.addr, "", &short).expect("connect");
    let start = Instant::now();
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(c);
    f.join();
}

#[test]
fn server_errors_keep_the_connection_usable() {
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        let r = p.request();
        p.simple_reply(EIO, r.cookie, &[]); // no data after an error
        let r = p.request();
        assert_eq!(r.command, CMD_WRITE);
        p.simple_reply(ENOSPC, r.cookie, &[]);
        let r = p.request();
        p.simple_reply(12345, r.cookie, &[]);
        let r = p.request();
        p.serve_read(&r);
        let r = p.request();
        p.simple_reply(ESHUTDOWN, r.cookie, &[]);
        // On ESHUTDOWN the client disconnects softly.
        p.expect_disc();
    });
    let mut c = connect(&f).expect("connect");
    let mut b = [0u8; 512];
    let e = c.read(512, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::Server { errno: EIO, .. }), "{e}");
    assert!(
        e.to_string().contains("EIO") && e.to_string().contains("offset 512"),
        "{e}"
    );
    let e = io::Error::from(c.write(0, &b).unwrap_err());
    assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
    let e = c.flush().unwrap_err();
    assert!(e.to_string().contains("12345"), "{e}");
    c.read(1024, &mut b).expect("still usable");
    assert_eq!(b[0], 0);
    let e = c.read(0, &mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    assert!(!c.is_usable());
    drop(c);
    f.join();
}

#[test]
fn flags_drive_fua_flush_and_trim() {
    // FUA natively; trims split at the server's maximum.
    let f = Fake::start(|p| {
        p.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        p.expect_go("");
        p.info_block_size(512, 4096, 1 << 20);
        p.info_export(8 << 20, RW);
        p.reply(OPT_GO, REP_ACK, &[]);
        let r = p.request();
        assert_eq!(
            (r.command, r.flags, r.payload.len()),
            (CMD_WRITE, CMD_FLAG_FUA, 512)
        );
        assert!(r.payload.iter().all(|&b| b == 9));
        p.simple_reply(0, r.cookie, &[]);
        let r = p.request();
        assert_eq!((r.command, r.offset, r.length), (CMD_FLUSH, 0, 0));
        p.simple_reply(0, r.cookie, &[]);
        for i in 0..3u64 {
            let r = p.request();
            let len = if i < 2 { 1 << 20 } else { 512 };
            assert_eq!((r.command, r.offset, r.length), (CMD_TRIM, i << 20, len));
            p.simple_reply(0, r.cookie, &[]);
        }
        p.expect_disc();
    });
    let mut c = connect(&f).expect("connect");
    c.write_fua(0, &[9u8; 512]).expect("fua write");
    c.flush().expect("flush");
    c.trim(0, (2 << 20) + 512).expect("trim");
    c.disconnect().expect("disconnect");
    f.join();

    // No FUA: a write then a flush. No flush either: flush does nothing, trim unsupported.
    let f = Fake::start(|p| {
        p.handshake(1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
        let r = p.request();
        assert_eq!((r.command, r.flags), (CMD_WRITE, 0));
        p.simple_reply(0, r.cookie, &[]);
        let r = p.request();
        assert_eq!(r.command, CMD_FLUSH);
        p.simple_reply(0, r.cookie, &[]);
        p.expect_disc();
    });
    let mut c = connect(&f).expect("connect");
    c.write_fua(0, &[1u8; 512]).expect("emulated fua");
    let e = c.trim(0, 512).unwrap_err();
    assert!(matches!(e, NbdError::Unsupported { .. }), "{e}");
    drop(c);
    f.join();

    let f = Fake::start(|p| {
        p.handshake(1 << 20, FLAG_HAS_FLAGS);
        p.expect_disc(); // the flush sent nothing
    });
    let mut c = connect(&f).expect("connect");
    c.flush().expect("flush without NBD_FLAG_SEND_FLUSH");
    drop(c);
    f.join();
}

#[test]
fn read_only_flag_refuses_writes_locally() {
    let f = Fake::start(|p| {
        p.handshake(1 << 20, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_TRIM);
        p.expect_disc(); // nothing else reached the server
    });
    let mut c = connect(&f).expect("connect");
    assert!(c.read_only());
    let e = c.write(0, &[0u8; 512]).unwrap_err();
    assert!(matches!(e, NbdError::ReadOnly { .. }), "{e}");
    let e = c.trim(0, 512).unwrap_err();
    assert!(matches!(e, NbdError::ReadOnly { .. }), "{e}");
    drop(c);
    f.join();
}

#[test]
fn cookies_are_distinct_per_request() {
    let f = Fake::start(|p| {
        p.handshake(1 << 20, RW);
        let mut cookies = Vec::new();
        for _ in 0..4 {
            let r = p.request();
            cookies.push(r.cookie);
            p.serve_read(&r);
        }
        cookies.sort_unstable();
        cookies.dedup();
        assert_eq!(cookies.len(), 4);
        p.expect_disc();
    });
    let mut c = connect(&f).expect("connect");
    for i in 0..4 {
        c.read(i * 512, &mut [0u8; 512]).expect("read");
    }
    drop(c);
    f.join();
}
