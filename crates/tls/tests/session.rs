//! Sessions over real loopback TCP: trust, refusals, data, ending and restarting sessions,
//! plaintext and silent peers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{handshake, spawn_accept, tcp_pair, trusting_pair, within, Host};
use tern_tls::{peer_speaks_tls, pinned, Role, TlsError, TlsStream, Trust};

fn read_exactly(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn pinned_both_ways_data_finish_and_a_second_session() {
    let a = Host::new("source");
    let b = Host::new("destination");
    let (a_fp, b_fp) = (a.identity.fingerprint(), b.identity.fingerprint());
    let (c, s) = tcp_pair();
    let deadline = within(5.0);
    let server = spawn_accept(s, b.server(Trust::new([a_fp], None).unwrap()), deadline);
    let mut client = TlsStream::connect(
        c,
        a.client(Trust::new([b_fp], None).unwrap()),
        "127.0.0.1",
        deadline,
    )
    .unwrap();
    let mut server = server.join().unwrap().unwrap();
    assert_eq!(client.peer_fingerprint(), b_fp);
    assert_eq!(server.peer_fingerprint(), a_fp);
    // After the handshake nothing is buffered or pending on either side.
    assert!(!client.has_buffered_plaintext() && !server.has_buffered_plaintext());
    assert_eq!(client.pending_output(), 0);

    client.write_all(b"offer\n").unwrap();
    assert_eq!(read_exactly(&mut server, 6), b"offer\n");
    server.write_all(b"accept\n").unwrap();
    assert_eq!(read_exactly(&mut client, 7), b"accept\n");
    // Data the reader has not asked for yet stays buffered in the session.
    server.write_all(b"0123456789").unwrap();
    assert_eq!(read_exactly(&mut client, 4), b"0123");
    assert!(client.has_buffered_plaintext());
    assert_eq!(read_exactly(&mut client, 6), b"456789");
    assert!(!client.has_buffered_plaintext());

    // End both sessions at once, then start a second one on the same connection, the
    // server-side host now acting as the client (its peer already authenticated: pinned).
    let server_end = thread::spawn(move || server.finish(within(5.0)));
    let c_tcp = client.finish(within(5.0)).unwrap();
    let s_tcp = server_end.join().unwrap().unwrap();

    let server = spawn_accept(c_tcp, a.server(pinned(b_fp)), within(5.0));
    let mut second =
        TlsStream::connect(s_tcp, b.client(pinned(a_fp)), "127.0.0.1", within(5.0)).unwrap();
    let mut second_server = server.join().unwrap().unwrap();
    assert_eq!(second.peer_fingerprint(), a_fp);
    assert_eq!(second_server.peer_fingerprint(), b_fp);
    second.write_all(b"second").unwrap();
    assert_eq!(read_exactly(&mut second_server, 6), b"second");

    // After this one ends too, the TCP connection is exactly after the close_notify:
    // plain bytes written next arrive intact.
    let end = thread::spawn(move || second_server.finish(within(5.0)));
    let mut tcp1 = second.finish(within(5.0)).unwrap();
    let mut tcp2 = end.join().unwrap().unwrap();
    tcp1.write_all(b"plain").unwrap();
    tcp2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_exactly(&mut tcp2, 5), b"plain");
}

#[test]
fn half_close_and_timeouts_restored() {
    let a = Host::new("a");
    let b = Host::new("b");
    let (c, s) = tcp_pair();
    c.set_read_timeout(Some(Duration::from_secs(7))).unwrap();
    let server = spawn_accept(s, b.server(pinned(a.identity.fingerprint())), within(5.0));
    let mut client = TlsStream::connect(
        c,
        a.client(pinned(b.identity.fingerprint())),
        "localhost",
        within(5.0),
    )
    .unwrap();
    let mut server = server.join().unwrap().unwrap();
    // The handshake's deadline-driven timeouts are gone again.
    assert_eq!(
        client.tcp().read_timeout().unwrap(),
        Some(Duration::from_secs(7))
    );
    assert_eq!(server.tcp().read_timeout().unwrap(), None);
    assert!(!client.tcp().nodelay().unwrap() && !server.tcp().nodelay().unwrap());

    client.write_all(b"last words").unwrap();
    client.close_write().unwrap();
    assert!(client.write_all(b"more").is_err());
    // The server reads the data, then end of stream; it can still write, and the client
    // still reads after its close_notify.
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    assert!(server.has_buffered_plaintext(), "end of stream is buffered");
    server.write_all(b"reply").unwrap();
    assert_eq!(read_exactly(&mut client, 5), b"reply");
    let end = thread::spawn(move || server.finish(within(5.0)));
    let tcp = client.finish(within(5.0)).unwrap();
    assert_eq!(tcp.read_timeout().unwrap(), Some(Duration::from_secs(7)));
    end.join().unwrap().unwrap();
}

#[test]
fn read_timeout_surfaces_and_loses_nothing() {
    let (mut client, mut server) = trusting_pair();
    server
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = server.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    client.write_all(b"after").unwrap();
    assert_eq!(read_exactly(&mut server, 5), b"after");
}

#[test]
fn unfinished_data_makes_finish_fail() {
    let a = Host::new("a");
    let b = Host::new("b");
    let (client, server) = handshake(
        a.client(pinned(b.identity.fingerprint())),
        b.server(pinned(a.identity.fingerprint())),
        "127.0.0.1",
    );
    let (mut client, server) = (client.unwrap(), server.unwrap());
    client.write_all(b"unread").unwrap();
    let end = thread::spawn(move || client.finish(within(3.0)));
    let err = server.finish(within(3.0)).unwrap_err();
    assert!(matches!(err, TlsError::UnexpectedData), "{err}");
    drop(end.join().unwrap());
}

#[test]
fn untrusted_client_is_refused() {
    let a = Host::new("a");
    let b = Host::new("b");
    let a_fp = a.identity.fingerprint();
    let (client, server) = handshake(
        a.client(pinned(b.identity.fingerprint())),
        b.server(Trust::new([], None).unwrap()),
        "127.0.0.1",
    );
    let server_err = server.unwrap_err();
    let msg = server_err.to_string();
    assert!(
        matches!(server_err, TlsError::PeerNotTrusted { role: Role::Server, fingerprint, .. } if fingerprint == a_fp),
        "{msg}"
    );
    assert!(msg.contains(&format!("tern trust add {a_fp}")), "{msg}");
    let client_err = client.expect_err("the client must learn of the refusal");
    let msg = client_err.to_string();
    assert!(
        matches!(client_err, TlsError::RefusedByPeer { role: Role::Client, ours: Some(fp), .. } if fp == a_fp),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "the destination does not trust this host ({a_fp})"
        )),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn untrusted_server_is_refused_before_any_data() {
    let a = Host::new("a");
    let b = Host::new("b");
    let b_fp = b.identity.fingerprint();
    let (c, s) = tcp_pair();
    let deadline = within(5.0);
    let server = spawn_accept(s, b.server(pinned(a.identity.fingerprint())), deadline);
    let client_err = TlsStream::connect(
        c,
        a.client(Trust::new([], None).unwrap()),
        "127.0.0.1",
        deadline,
    )
    .err()
    .unwrap();
    let msg = client_err.to_string();
    assert!(
        msg.contains(&format!(
            "the destination's host key {b_fp} is not trusted here; if it is the right host, run `tern trust add {b_fp}` on this host"
        )),
        "{msg}"
    );
    // The server never gets a session, so it cannot have received application data; it
    // learns that the client does not trust it.
    let server_err = server.join().unwrap().err().unwrap();
    let msg = server_err.to_string();
    assert!(
        matches!(server_err, TlsError::RefusedByPeer { role: Role::Server, ours: Some(fp), .. } if fp == b_fp),
        "{msg}"
    );
    assert!(msg.contains(&format!("tern trust add {b_fp}")), "{msg}");
}

#[test]
fn replaced_fingerprints_apply_to_new_sessions() {
    let a = Host::new("a");
    let b = Host::new("b");
    let trust = Trust::new([], None).unwrap();
    let server_config = b.server(trust.clone());
    let client_config = a.client(pinned(b.identity.fingerprint()));
    let (_, server) = handshake(client_config.clone(), server_config.clone(), "127.0.0.1");
    assert!(server.is_err());
    trust.replace_fingerprints([a.identity.fingerprint()]);
    assert_eq!(trust.fingerprints(), [a.identity.fingerprint()]);
    let (client, server) = handshake(client_config, server_config, "127.0.0.1");
    client.unwrap();
    server.unwrap();
}

#[test]
fn plaintext_client_is_recognised() {
    let b = Host::new("b");
    let (mut c, s) = tcp_pair();
    c.write_all(b"{\"type\":\"offer\"}\nmore after the line")
        .unwrap();
    assert!(!peer_speaks_tls(&s, within(2.0)).unwrap());
    // Peeking consumed nothing: accept sees the same line.
    let err = TlsStream::accept(s, b.server(Trust::new([], None).unwrap()), within(2.0))
        .err()
        .unwrap();
    match err {
        TlsError::Plaintext { first_line } => assert_eq!(first_line, "{\"type\":\"offer\"}"),
        other => panic!("{other}"),
    }
}

#[test]
fn tls_client_is_recognised_without_consuming() {
    let a = Host::new("a");
    let b = Host::new("b");
    let (c, s) = tcp_pair();
    let client_config = a.client(pinned(b.identity.fingerprint()));
    let client =
        thread::spawn(move || TlsStream::connect(c, client_config, "127.0.0.1", within(5.0)));
    assert!(peer_speaks_tls(&s, within(5.0)).unwrap());
    let server = TlsStream::accept(s, b.server(pinned(a.identity.fingerprint())), within(5.0));
    server.unwrap();
    client.join().unwrap().unwrap();
}

#[test]
fn plaintext_server_is_recognised() {
    let a = Host::new("a");
    let (c, mut s) = tcp_pair();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        s.write_all(b"{\"type\":\"refused\",\"reason\":\"TLS is not enabled here\"}\r\n")
            .unwrap();
        s
    });
    let err = TlsStream::connect(
        c,
        a.client(Trust::new([], None).unwrap()),
        "127.0.0.1",
        within(3.0),
    )
    .err()
    .unwrap();
    match &err {
        TlsError::Plaintext { first_line } => assert_eq!(
            first_line,
            "{\"type\":\"refused\",\"reason\":\"TLS is not enabled here\"}"
        ),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("does not speak TLS"));
    drop(server.join().unwrap());
}

#[test]
fn plaintext_line_is_bounded() {
    let b = Host::new("b");
    let (mut c, s) = tcp_pair();
    c.write_all(&[b'x'; 2000]).unwrap();
    let err = TlsStream::accept(s, b.server(Trust::new([], None).unwrap()), within(2.0))
        .err()
        .unwrap();
    match err {
        TlsError::Plaintext { first_line } => assert_eq!(first_line.len(), 512),
        other => panic!("{other}"),
    }
}

fn assert_times_out(result: Result<TlsStream, TlsError>, started: Instant, deadline: Instant) {
    let err = result.expect_err("must fail");
    assert!(matches!(err, TlsError::Timeout), "{err}");
    let now = Instant::now();
    assert!(now >= deadline - Duration::from_millis(50), "too early");
    assert!(
        now < deadline + Duration::from_secs(1),
        "{:?} after the start for a {:?} deadline",
        now - started,
        deadline - started
    );
}

#[test]
fn silent_client_times_out_by_the_deadline() {
    let b = Host::new("b");
    let (_c, s) = tcp_pair();
    let started = Instant::now();
    let deadline = within(1.0);
    let result = TlsStream::accept(s, b.server(Trust::new([], None).unwrap()), deadline);
    assert_times_out(result, started, deadline);
    let (_c, s) = tcp_pair();
    let started = Instant::now();
    assert!(matches!(
        peer_speaks_tls(&s, within(0.3)),
        Err(TlsError::Timeout)
    ));
    assert!(started.elapsed() < Duration::from_millis(1500));
    drop(_c);
    assert!(matches!(
        peer_speaks_tls(&s, within(1.0)),
        Err(TlsError::Closed { .. })
    ));
}

#[test]
fn silent_server_times_out_by_the_deadline() {
    let a = Host::new("a");
    let (c, _s) = tcp_pair();
    let started = Instant::now();
    let deadline = within(1.0);
    let result = TlsStream::connect(
        c,
        a.client(Trust::new([], None).unwrap()),
        "127.0.0.1",
        deadline,
    );
    assert_times_out(result, started, deadline);
}

#[test]
fn trickling_client_times_out_by_the_deadline() {
    let b = Host::new("b");
    let (mut c, s) = tcp_pair();
    // A handshake record header announcing a large record, then one byte every 50 ms.
    let trickle = thread::spawn(move || {
        let _ = c.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        for _ in 0..60 {
            if c.write_all(&[0]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let started = Instant::now();
    let deadline = within(1.0);
    let result = TlsStream::accept(s, b.server(Trust::new([], None).unwrap()), deadline);
    assert_times_out(result, started, deadline);
    trickle.join().unwrap();
}

#[test]
fn bad_server_name_is_refused_early() {
    let a = Host::new("a");
    let (c, _s) = tcp_pair();
    let err = TlsStream::connect(
        c,
        a.client(Trust::new([], None).unwrap()),
        "not a name!",
        within(1.0),
    )
    .err()
    .unwrap();
    assert!(matches!(err, TlsError::BadServerName(_)), "{err}");
    // An IPv6 address in brackets, as users type it with a port, is accepted.
    let (c, _s) = tcp_pair();
    let err = TlsStream::connect(
        c,
        a.client(Trust::new([], None).unwrap()),
        "[::1]",
        within(0.3),
    )
    .err()
    .unwrap();
    assert!(matches!(err, TlsError::Timeout), "{err}");
}

#[test]
fn peer_closing_mid_handshake_is_reported() {
    let b = Host::new("b");
    let (mut c, s) = tcp_pair();
    c.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10, 1, 2]).unwrap();
    c.shutdown(std::net::Shutdown::Both).unwrap();
    let err = TlsStream::accept(s, b.server(Trust::new([], None).unwrap()), within(2.0))
        .err()
        .unwrap();
    assert!(matches!(err, TlsError::Closed { .. }), "{err}");
    drop::<TcpStream>(c);
}

#[test]
fn write_timeout_keeps_the_rest_pending() {
    let (mut client, mut server) = trusting_pair();
    client
        .tcp()
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let pattern: Vec<u8> = (0..(1usize << 20) + 251).map(|i| (i % 251) as u8).collect();
    // Write with nobody reading until the socket buffers are full.
    let mut accepted = 0usize;
    let mut timed_out = false;
    while accepted < (256 << 20) {
        let start = accepted % 251;
        match client.write(&pattern[start..start + (1 << 20)]) {
            Ok(n) => accepted += n,
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e:?}"
                );
                timed_out = true;
                break;
            }
        }
        if client.pending_output() > 0 {
            timed_out = true;
            break;
        }
    }
    assert!(timed_out, "the socket never filled");
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; accepted];
        server.read_exact(&mut got).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        server
    });
    // Flushing sends what was pending once the reader drains the socket.
    let flushed_by = Instant::now() + Duration::from_secs(10);
    while let Err(e) = client.flush() {
        assert!(Instant::now() < flushed_by, "{e:?}");
    }
    assert_eq!(client.pending_output(), 0);
    reader.join().unwrap();
}

#[test]
fn streams_and_trust_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send::<TlsStream>();
    send_sync::<Trust>();
    send_sync::<TlsError>();
}

/// The relocation's pattern: the destination answers and half-closes; the source reads the
/// answer, ends its side and at once starts the next session, while the destination is still
/// ending its own.
#[test]
fn answer_half_close_and_an_immediate_next_session() {
    let a = Host::new("source");
    let b = Host::new("destination");
    let (a_fp, b_fp) = (a.identity.fingerprint(), b.identity.fingerprint());
    for _ in 0..20 {
        let (client, server) =
            handshake(a.client(pinned(b_fp)), b.server(pinned(a_fp)), "127.0.0.1");
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let b_server = b.server(pinned(a_fp));
        let destination = thread::spawn(move || {
            assert_eq!(read_exactly(&mut server, 6), b"offer\n");
            server.write_all(b"accept\n").unwrap();
            server.close_write().unwrap();
            let tcp = server.finish(within(5.0)).unwrap();
            let mut next = TlsStream::accept(tcp, b_server, within(5.0)).unwrap();
            assert_eq!(read_exactly(&mut next, 6), b"stream");
        });
        client.write_all(b"offer\n").unwrap();
        assert_eq!(read_exactly(&mut client, 7), b"accept\n");
        let tcp = client.finish(within(5.0)).unwrap();
        let mut next =
            TlsStream::connect(tcp, a.client(pinned(b_fp)), "127.0.0.1", within(5.0)).unwrap();
        next.write_all(b"stream").unwrap();
        destination.join().unwrap();
    }
}
