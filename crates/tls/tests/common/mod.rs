//! Test hosts, certificates and loopback connections.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tern_tls::rustls::{ClientConfig, ServerConfig};
use tern_tls::{client_config, server_config, Identity, TlsError, TlsStream, Trust};

/// A deadline `secs` from now.
pub fn within(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

/// A host with a self-signed identity made by `Identity::load_or_create`.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub identity: Identity,
}

impl Host {
    pub fn new(name: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::load_or_create(
            &dir.path().join("tls/host.crt"),
            &dir.path().join("tls/host.key"),
            name,
        )
        .unwrap();
        Host { dir, identity }
    }

    pub fn server(&self, trust: Arc<Trust>) -> Arc<ServerConfig> {
        server_config(&self.identity, trust).unwrap()
    }

    pub fn client(&self, trust: Arc<Trust>) -> Arc<ClientConfig> {
        client_config(&self.identity, trust).unwrap()
    }
}

/// A pool CA that issues host certificates.
pub struct Ca {
    pub dir: tempfile::TempDir,
    pub cert_path: PathBuf,
    params: CertificateParams,
    key: KeyPair,
}

/// When an issued certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    Now,
    Expired,
    NotYet,
}

impl Ca {
    pub fn new() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "tern test pool CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.path().join("ca.crt");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        Ca {
            dir,
            cert_path,
            params,
            key,
        }
    }

    /// Issues a certificate for `san` (an IP address or a DNS name) with a new key, writes
    /// it and the key under the CA's directory and loads it as an identity.
    pub fn issue(&self, file: &str, san: &str, validity: Validity) -> Identity {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, san);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (from, until) = match validity {
            Validity::Now => ((2000, 1, 1), (2999, 1, 1)),
            Validity::Expired => ((2000, 1, 1), (2001, 1, 1)),
            Validity::NotYet => ((2990, 1, 1), (2999, 1, 1)),
        };
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Identity::load(&cert_path, &key_path).unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.cert_path
    }
}

/// A connected loopback TCP pair: (client end, server end).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Runs the server handshake in a thread.
pub fn spawn_accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> JoinHandle<Result<TlsStream, TlsError>> {
    thread::spawn(move || TlsStream::accept(tcp, config, deadline))
}

/// Both handshakes over a fresh loopback connection: (client result, server result).
pub fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
    let (c, s) = tcp_pair();
    let deadline = within(5.0);
    let server = spawn_accept(s, server, deadline);
    let client = TlsStream::connect(c, client, server_name, deadline);
    (client, server.join().unwrap())
}

/// Two hosts that trust each other's keys, in session: (client, server).
pub fn trusting_pair() -> (TlsStream, TlsStream) {
    let a = Host::new("a");
    let b = Host::new("b");
    let (client, server) = handshake(
        a.client(tern_tls::pinned(b.identity.fingerprint())),
        b.server(tern_tls::pinned(a.identity.fingerprint())),
        "127.0.0.1",
    );
    (client.unwrap(), server.unwrap())
}
