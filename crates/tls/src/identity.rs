//! A host's own key and certificate.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::fsutil::{create_private_dir, parent_of, read_limited, write_atomic};
use crate::{civil_from_days, Fingerprint, TlsError};

/// PEM files larger than this are refused (a chain of a few certificates is a few KiB).
const PEM_LIMIT: u64 = 1 << 20;

/// How long a host's self-signed certificate is valid: pinned keys ignore dates, so this is
/// only a formality that should never be what stops a relocation.
const SELF_SIGNED_YEARS: i64 = 20;

/// A host's key and certificate chain: what it presents to peers, as a server and as a
/// client alike.
#[derive(Clone)]
pub struct Identity {
    certified: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the PEM certificate (chain) and PEM private key; if NEITHER file exists, creates
    /// them first: a new ECDSA P-256 key and a self-signed certificate for `host_name` (its
    /// SAN) valid for 20 years, in directories created with mode 0700, the key with mode 0600
    /// (from its creation on) and the certificate 0644, each written atomically. If only one
    /// of them exists, that is an error: a lost key or certificate should be noticed, not
    /// silently replaced by a new host key that no peer trusts.
    pub fn load_or_create(cert: &Path, key: &Path, host_name: &str) -> Result<Identity, TlsError> {
        let cert_exists = exists(cert)?;
        let key_exists = exists(key)?;
        match (cert_exists, key_exists) {
            (true, true) => {}
            (false, false) => create(cert, key, host_name)?,
            (true, false) | (false, true) => {
                let (present, missing) = if cert_exists {
                    (cert, key)
                } else {
                    (key, cert)
                };
                return Err(TlsError::BadFile {
                    path: missing.to_path_buf(),
                    problem: format!(
                        "missing while {} exists; restore it, or remove {} to make a new host key (which peers must trust anew)",
                        present.display(),
                        present.display()
                    ),
                });
            }
        }
        Identity::load(cert, key)
    }

    /// Loads a PEM certificate (chain, end-entity first) and its PEM private key (PKCS#8,
    /// SEC1 or PKCS#1), and checks that the key belongs to the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let cert_pem = read_limited(cert, PEM_LIMIT).map_err(|e| io_error("reading", cert, e))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_file(cert, format!("not a PEM certificate file: {e}")))?;
        let Some(end_entity) = chain.first() else {
            return Err(bad_file(cert, "holds no certificate".into()));
        };
        let fingerprint =
            Fingerprint::of_certificate(end_entity).map_err(|e| bad_file(cert, e.to_string()))?;

        let key_pem = read_limited(key, PEM_LIMIT).map_err(|e| io_error("reading", key, e))?;
        warn_if_exposed(key);
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad_file(key, format!("holds no usable PEM private key: {e}")))?;
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad_file(key, format!("unsupported private key: {e}")))?;

        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|_| {
            bad_file(
                key,
                format!(
                    "this private key does not belong to the certificate in {} (host key {fingerprint})",
                    cert.display()
                ),
            )
        })?;
        Ok(Identity {
            certified: Arc::new(certified),
            fingerprint,
        })
    }

    /// The fingerprint of this host's key, which peers put in their trust stores.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate chain, end-entity first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists()
        .map_err(|e| io_error("looking for", path, e))
}

fn io_error(verb: &str, path: &Path, source: io::Error) -> TlsError {
    TlsError::Io {
        context: format!("{verb} {}", path.display()),
        source,
    }
}

fn bad_file(path: &Path, problem: String) -> TlsError {
    TlsError::BadFile {
        path: path.to_path_buf(),
        problem,
    }
}

fn warn_if_exposed(key: &Path) {
    if let Ok(meta) = std::fs::metadata(key) {
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "{} is readable by other users; `chmod 600` it",
                key.display()
            );
        }
    }
}

/// Makes a new key and a self-signed certificate for `host_name`.
fn create(cert: &Path, key: &Path, host_name: &str) -> Result<(), TlsError> {
    let cert_error = |problem: String| bad_file(cert, problem);
    if host_name.is_empty() {
        return Err(cert_error(
            "cannot make a certificate for an empty host name".into(),
        ));
    }
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| cert_error(format!("cannot make a key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![host_name.to_string()])
        .map_err(|e| cert_error(format!("cannot make a certificate for {host_name:?}: {e}")))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, host_name);
    params.distinguished_name = dn;
    // From yesterday, in case this host's clock is ahead of a peer's (only CA-verified
    // certificates are checked for dates, but other TLS tools look too).
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 / 86_400)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y as i32, m, d);
    params.not_after = rcgen::date_time_ymd((y + SELF_SIGNED_YEARS) as i32, m, d.min(28));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    // The same certificate serves as a relocation server and as a client.
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let certificate = params
        .self_signed(&key_pair)
        .map_err(|e| cert_error(format!("cannot sign the certificate: {e}")))?;

    for path in [cert, key] {
        let dir = parent_of(path);
        create_private_dir(&dir).map_err(|e| io_error("creating", &dir, e))?;
    }
    // Key first: a crash in between leaves a key without a certificate, which
    // `load_or_create` reports rather than silently replacing.
    write_atomic(key, key_pair.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| io_error("writing", key, e))?;
    write_atomic(cert, certificate.pem().as_bytes(), 0o644)
        .map_err(|e| io_error("writing", cert, e))?;
    log::info!(
        "made a new host key {} with a certificate for {host_name} ({})",
        key.display(),
        cert.display()
    );
    Ok(())
}
