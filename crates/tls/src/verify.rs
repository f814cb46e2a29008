//! Who is trusted, and the rustls configurations that enforce it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::fsutil::read_limited;
use crate::{format_unix, Fingerprint, Identity, Role, TlsError};

/// What a verifier trusts: pinned host keys, replaceable at run time (the daemon replaces them
/// when its trust store changes, and sessions started afterwards see the new set), and
/// optionally a pool CA whose certificates are trusted while they are valid.
pub struct Trust {
    pinned: RwLock<BTreeSet<Fingerprint>>,
    ca: Option<PoolCa>,
}

struct PoolCa {
    path: PathBuf,
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("pinned", &self.fingerprints())
            .field("ca", &self.ca.as_ref().map(|ca| &ca.path))
            .finish()
    }
}

/// A CA file larger than this is refused.
const CA_LIMIT: u64 = 4 << 20;

impl Trust {
    /// Trusts `fingerprints` and, with `ca_file` (PEM, one or more CA certificates), whatever
    /// that CA issued.
    pub fn new(
        fingerprints: impl IntoIterator<Item = Fingerprint>,
        ca_file: Option<&Path>,
    ) -> Result<Arc<Trust>, TlsError> {
        let ca = ca_file.map(load_ca).transpose()?;
        Ok(Arc::new(Trust {
            pinned: RwLock::new(fingerprints.into_iter().collect()),
            ca,
        }))
    }

    /// Replaces the pinned keys; handshakes already past certificate verification are not
    /// affected.
    pub fn replace_fingerprints(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        let new = fingerprints.into_iter().collect();
        *self.pinned.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// The pinned keys, sorted.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Whether `fingerprint` is pinned.
    pub fn is_pinned(&self, fingerprint: &Fingerprint) -> bool {
        self.pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fingerprint)
    }

    /// Whether a pool CA is configured.
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// The common part of both verifiers: a pinned key passes whatever its certificate says
    /// (like ssh, no dates and no names); otherwise the pool CA decides, through `ca_check`.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        ca_check: impl FnOnce(&PoolCa) -> Result<(), rustls::Error>,
    ) -> Result<(), rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.is_pinned(&fingerprint) {
            return Ok(());
        }
        let Some(ca) = &self.ca else {
            note_rejection(fingerprint, None);
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        };
        ca_check(ca).inspect_err(|e| note_rejection(fingerprint, Some(describe_ca_error(e))))
    }
}

fn load_ca(path: &Path) -> Result<PoolCa, TlsError> {
    let bad = |problem: String| TlsError::BadFile {
        path: path.to_path_buf(),
        problem,
    };
    let pem = read_limited(path, CA_LIMIT).map_err(|e| TlsError::Io {
        context: format!("reading the pool CA {}", path.display()),
        source: e,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no CA certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(format!("cannot verify with it: {e}")))?;
    let client = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| bad(format!("cannot verify with it: {e}")))?;
    Ok(PoolCa {
        path: path.to_path_buf(),
        server,
        client,
    })
}

/// A CA verification failure in words a person can act on.
fn describe_ca_error(e: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(e) = e else {
        return e.to_string();
    };
    match e {
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "certificate expired (valid until {})",
            format_unix(not_after.as_secs())
        ),
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "certificate not valid yet (valid from {}; check both hosts' clocks)",
            format_unix(not_before.as_secs())
        ),
        CertificateError::NotValidYet => "certificate not valid yet".into(),
        CertificateError::UnknownIssuer => "certificate not issued by the pool CA".into(),
        // Also what a certificate from another CA of the same name gets.
        CertificateError::BadSignature => {
            "certificate signature does not verify with the pool CA".into()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "certificate not valid for {} (it names {})",
            expected.to_str(),
            if presented.is_empty() {
                "no host".into()
            } else {
                presented
                    .iter()
                    .map(|name| plain_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        CertificateError::NotValidForName => "certificate not valid for this host name".into(),
        other => format!("certificate refused: {other}"),
    }
}

/// A name as webpki shows it (`DnsName("a.example")`, `IpAddress(192.0.2.1)`) as a person
/// would write it.
fn plain_name(shown: &str) -> &str {
    for (prefix, suffix) in [("DnsName(\"", "\")"), ("IpAddress(", ")")] {
        if let Some(inner) = shown
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
        {
            return inner;
        }
    }
    shown
}

/// Why the last verification on this thread refused a certificate. Verifiers run inside
/// rustls on the thread driving the handshake, but can only return rustls' own error types;
/// this carries the fingerprint and the reason to the code that turns the failure into a
/// [`TlsError`].
pub(crate) struct Rejection {
    pub fingerprint: Fingerprint,
    pub reason: Option<String>,
}

thread_local! {
    static REJECTION: RefCell<Option<Rejection>> = const { RefCell::new(None) };
    static LOCAL_KEY: Cell<Option<Fingerprint>> = const { Cell::new(None) };
}

fn note_rejection(fingerprint: Fingerprint, reason: Option<String>) {
    REJECTION.with(|r| {
        *r.borrow_mut() = Some(Rejection {
            fingerprint,
            reason,
        })
    });
}

/// Forgets what earlier handshakes on this thread noted.
pub(crate) fn clear_notes() {
    REJECTION.with(|r| r.borrow_mut().take());
    LOCAL_KEY.with(|k| k.set(None));
}

pub(crate) fn take_rejection() -> Option<Rejection> {
    REJECTION.with(|r| r.borrow_mut().take())
}

/// The fingerprint of the key this thread's handshake presented (or is about to).
pub(crate) fn local_key() -> Option<Fingerprint> {
    LOCAL_KEY.with(|k| k.get())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The client's check of the server.
#[derive(Debug)]
struct ServerVerifier {
    trust: Arc<Trust>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust.check(end_entity, |ca| {
            ca.server
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ())
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's check of the client.
#[derive(Debug)]
struct ClientVerifier {
    trust: Arc<Trust>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a pinned host's self-signed certificate matches no CA name, and the
        // client has one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust.check(end_entity, |ca| {
            ca.client
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ())
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Presents the host's certificate, and notes its fingerprint for error messages.
#[derive(Debug)]
struct HostKey {
    key: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
}

impl HostKey {
    fn new(identity: &Identity) -> Arc<HostKey> {
        Arc::new(HostKey {
            key: identity.certified_key(),
            fingerprint: identity.fingerprint(),
        })
    }

    fn present(&self) -> Option<Arc<CertifiedKey>> {
        LOCAL_KEY.with(|k| k.set(Some(self.fingerprint)));
        Some(self.key.clone())
    }
}

impl ResolvesServerCert for HostKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.present()
    }
}

impl ResolvesClientCert for HostKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.present()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn config_error(source: rustls::Error) -> TlsError {
    TlsError::Tls {
        during: "building the configuration",
        source,
    }
}

/// The configuration of a relocation server: TLS 1.3 only, a client certificate required and
/// checked against `trust`, no session tickets (so that the server never sends anything the
/// application did not write) and no resumption.
pub fn server_config(
    identity: &Identity,
    trust: Arc<Trust>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = Arc::new(ClientVerifier {
        trust,
        algorithms: algorithms(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(HostKey::new(identity));
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The configuration of a relocation client: TLS 1.3 only, the server checked against
/// `trust`, this host's certificate presented, no resumption.
pub fn client_config(
    identity: &Identity,
    trust: Arc<Trust>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(ServerVerifier {
        trust,
        algorithms: algorithms(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(HostKey::new(identity));
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// Trust in exactly one key: for a further session with a peer already authenticated, so that
/// it cannot be another host, whatever the trust store or the CA would accept.
pub fn pinned(fingerprint: Fingerprint) -> Arc<Trust> {
    Arc::new(Trust {
        pinned: RwLock::new(BTreeSet::from([fingerprint])),
        ca: None,
    })
}

/// The role-specific error for a certificate this host refused.
pub(crate) fn rejection_error(role: Role, rejection: Rejection) -> TlsError {
    TlsError::PeerNotTrusted {
        role,
        fingerprint: rejection.fingerprint,
        reason: rejection.reason,
    }
}
