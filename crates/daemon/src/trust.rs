//! This host's identity and the hosts it trusts for relocation, in both directions.
//!
//! The identity (a key and a certificate) is created in `<state_dir>/tls/` on the first start
//! unless the config names one. Trust is the union of the config's pinned fingerprints, the
//! run-time trust store (`tern trust …`, `<state_dir>/trusted-hosts.json`) and, if named, a
//! pool CA. Changes to the store take effect for the next connection, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context};
use tern_config::RelocationConfig;
use tern_migration::link::{LinkSecurity, Security};
use tern_tls::{Fingerprint, Identity, TrustStore, TrustedHost};

pub struct HostTrust {
    cert_file: PathBuf,
    key_file: PathBuf,
    fingerprint: Fingerprint,
    pinned: Vec<Fingerprint>,
    ca_file: Option<PathBuf>,
    store: Mutex<TrustStore>,
    trust: Arc<tern_tls::Trust>,
    /// Plaintext relocation (`[relocation] insecure = true`).
    insecure: bool,
    /// How the relocation server secures its side (the identity and the live trust).
    security: Security,
}

impl HostTrust {
    /// Loads (or on the first start creates) this host's identity and its trust.
    pub fn open(state_dir: &Path, config: &RelocationConfig) -> anyhow::Result<HostTrust> {
        let tls_dir = state_dir.join("tls");
        let cert_file = config
            .cert_file
            .clone()
            .unwrap_or_else(|| tls_dir.join("host.crt"));
        let key_file = config
            .key_file
            .clone()
            .unwrap_or_else(|| tls_dir.join("host.key"));
        let identity = Identity::load_or_create(&cert_file, &key_file, &host_name())
            .with_context(|| format!("host identity {}", cert_file.display()))?;
        let pinned = config
            .trusted
            .iter()
            .map(|f| {
                f.parse::<Fingerprint>()
                    .map_err(|e| anyhow::anyhow!("[relocation] trusted: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let store = TrustStore::open(&state_dir.join("trusted-hosts.json"))?;
        let trust = tern_tls::Trust::new(
            pinned.iter().chain(store.fingerprints().iter()).copied(),
            config.ca_file.as_deref(),
        )
        .with_context(|| "[relocation] ca_file".to_string())?;
        Ok(HostTrust {
            fingerprint: identity.fingerprint(),
            security: Security::tls(identity, trust.clone()),
            cert_file,
            key_file,
            pinned,
            ca_file: config.ca_file.clone(),
            store: Mutex::new(store),
            trust,
            insecure: config.insecure,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    fn store(&self) -> MutexGuard<'_, TrustStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Trusts `fingerprint` from now on.
    pub fn add(&self, fingerprint: &str, name: Option<String>) -> anyhow::Result<Fingerprint> {
        let fingerprint: Fingerprint = fingerprint.trim().parse()?;
        if fingerprint == self.fingerprint {
            bail!("{fingerprint} is this host's own key");
        }
        let mut store = self.store();
        store.add(fingerprint, name)?;
        self.refresh(&store);
        log::info!("now trusting {fingerprint}");
        Ok(fingerprint)
    }

    /// Stops trusting the host named by its fingerprint or name.
    pub fn remove(&self, key: &str) -> anyhow::Result<TrustedHost> {
        let mut store = self.store();
        let removed = store.remove(key.trim())?;
        self.refresh(&store);
        if self.pinned.contains(&removed.fingerprint) {
            log::warn!(
                "{} is still trusted: the config pins it ([relocation] trusted)",
                removed.fingerprint
            );
        }
        log::info!("no longer trusting {}", removed.fingerprint);
        Ok(removed)
    }

    /// The trust store's hosts, then the config's pinned keys (named "(config)").
    pub fn list(&self) -> Vec<TrustedEntry> {
        let store = self.store();
        let mut all: Vec<TrustedEntry> = store
            .hosts()
            .iter()
            .map(|h| TrustedEntry {
                fingerprint: h.fingerprint.to_string(),
                name: h.name.clone(),
                source: "trust store".into(),
            })
            .collect();
        all.extend(self.pinned.iter().map(|f| TrustedEntry {
            fingerprint: f.to_string(),
            name: None,
            source: "config".into(),
        }));
        if let Some(ca) = &self.ca_file {
            all.push(TrustedEntry {
                fingerprint: String::new(),
                name: Some(ca.display().to_string()),
                source: "ca_file".into(),
            });
        }
        all
    }

    fn refresh(&self, store: &TrustStore) {
        self.trust.replace_fingerprints(
            self.pinned
                .iter()
                .chain(store.fingerprints().iter())
                .copied(),
        );
    }

    /// How the relocation server secures connections.
    pub fn server_security(&self) -> &Security {
        if self.insecure {
            &INSECURE
        } else {
            &self.security
        }
    }

    /// Whether relocation runs in plaintext (`insecure`).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// What a guest process leaving this host trusts in its destination.
    pub fn outgoing(&self) -> LinkSecurity {
        if self.insecure {
            return LinkSecurity::Insecure;
        }
        LinkSecurity::Tls {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted: self
                .trust
                .fingerprints()
                .iter()
                .map(|f| f.to_string())
                .collect(),
            ca_file: self.ca_file.clone(),
        }
    }
}

static INSECURE: Security = Security::Insecure;

/// One line of `tern trust list`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrustedEntry {
    pub fingerprint: String,
    pub name: Option<String>,
    /// Where the trust comes from: the trust store, the config, a CA.
    pub source: String,
}

/// This host's name, for its certificate.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tern-host".into())
}
