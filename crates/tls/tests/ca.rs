//! A pool CA: certificates it issued are trusted while valid, and for the right name.

mod common;

use std::sync::Arc;

use common::{handshake, Ca, Validity};
use tern_tls::{client_config, server_config, Identity, Role, TlsError, Trust};

fn configs(
    ca: &Ca,
    client: &Identity,
    server: &Identity,
) -> (
    Arc<tern_tls::rustls::ClientConfig>,
    Arc<tern_tls::rustls::ServerConfig>,
) {
    let trust = Trust::new([], Some(ca.path())).unwrap();
    assert!(trust.has_ca());
    (
        client_config(client, trust.clone()).unwrap(),
        server_config(server, trust).unwrap(),
    )
}

#[test]
fn valid_certificates_are_accepted() {
    let ca = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Now);
    let server = ca.issue("server", "127.0.0.1", Validity::Now);
    let (c, s) = configs(&ca, &client, &server);
    let (c, s) = handshake(c, s, "127.0.0.1");
    assert_eq!(c.unwrap().peer_fingerprint(), server.fingerprint());
    assert_eq!(s.unwrap().peer_fingerprint(), client.fingerprint());
}

#[test]
fn expired_server_certificate_is_refused() {
    let ca = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Now);
    let server = ca.issue("server", "127.0.0.1", Validity::Expired);
    let (c, s) = configs(&ca, &client, &server);
    let (c, s) = handshake(c, s, "127.0.0.1");
    let err = c.err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(&err, TlsError::PeerNotTrusted { role: Role::Client, fingerprint, reason: Some(_) } if *fingerprint == server.fingerprint()),
        "{msg}"
    );
    assert!(
        msg.contains("certificate expired (valid until 2001-01-01 00:00:00 UTC)"),
        "{msg}"
    );
    assert!(msg.contains(&server.fingerprint().to_string()), "{msg}");
    let msg = s.err().unwrap().to_string();
    assert!(msg.contains("as expired or not valid yet"), "{msg}");
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Expired);
    let server = ca.issue("server", "127.0.0.1", Validity::Now);
    let (c, s) = configs(&ca, &client, &server);
    let (c, s) = handshake(c, s, "127.0.0.1");
    let msg = s.err().unwrap().to_string();
    assert!(msg.contains("certificate expired"), "{msg}");
    assert!(msg.contains(&client.fingerprint().to_string()), "{msg}");
    let msg = c.err().unwrap().to_string();
    assert!(
        msg.contains(&format!(
            "the destination refused this host's certificate ({}) as expired or not valid yet",
            client.fingerprint()
        )),
        "{msg}"
    );
}

#[test]
fn not_yet_valid_certificate_is_refused() {
    let ca = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Now);
    let server = ca.issue("server", "127.0.0.1", Validity::NotYet);
    let (c, s) = configs(&ca, &client, &server);
    let (c, _) = handshake(c, s, "127.0.0.1");
    let msg = c.err().unwrap().to_string();
    assert!(
        msg.contains("certificate not valid yet (valid from 2990-01-01 00:00:00 UTC"),
        "{msg}"
    );
}

#[test]
fn wrong_server_name_is_refused() {
    let ca = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Now);
    let server = ca.issue("server", "192.0.2.7", Validity::Now);
    let (c, s) = configs(&ca, &client, &server);
    let (c, _) = handshake(c.clone(), s.clone(), "127.0.0.1");
    let msg = c.err().unwrap().to_string();
    assert!(
        msg.contains("certificate not valid for 127.0.0.1 (it names 192.0.2.7)"),
        "{msg}"
    );
    // A DNS name in the certificate, and the same name typed by the user.
    let server = ca.issue("named", "dest.pool.example", Validity::Now);
    let (c, s) = configs(&ca, &client, &server);
    let (c2, _) = handshake(c.clone(), s.clone(), "dest.pool.example");
    c2.unwrap();
    let (c3, _) = handshake(c, s, "other.pool.example");
    assert!(c3
        .err()
        .unwrap()
        .to_string()
        .contains("not valid for other.pool.example"));
}

#[test]
fn another_ca_is_not_trusted_but_a_pinned_key_is() {
    let ca = Ca::new();
    let other = Ca::new();
    let client = ca.issue("client", "127.0.0.1", Validity::Now);
    let server = other.issue("server", "127.0.0.1", Validity::Now);
    let (c, s) = configs(&ca, &client, &server);
    let (c, _) = handshake(c, s, "127.0.0.1");
    let msg = c.err().unwrap().to_string();
    assert!(
        msg.contains("certificate signature does not verify with the pool CA"),
        "{msg}"
    );
    // Pinned keys are trusted like ssh's: dates, names and issuer do not matter.
    let server = other.issue("old", "192.0.2.9", Validity::Expired);
    let (_, s) = configs(&ca, &client, &server);
    let trust = Trust::new([server.fingerprint()], Some(ca.path())).unwrap();
    let c = client_config(&client, trust).unwrap();
    let (c, s) = handshake(c, s, "127.0.0.1");
    c.unwrap();
    s.unwrap();
}

#[test]
fn bad_ca_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let err = Trust::new([], Some(&missing)).unwrap_err().to_string();
    assert!(
        err.contains("reading the pool CA") && err.contains("missing.crt"),
        "{err}"
    );
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let err = Trust::new([], Some(&empty)).unwrap_err().to_string();
    assert!(err.contains("holds no CA certificate"), "{err}");
}
