//! The trust store: the host keys this host accepts, like ssh's known_hosts.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::fsutil::{create_private_dir, parent_of, read_limited, write_atomic};
use crate::{Fingerprint, TlsError};

/// A trust store larger than this is refused (an entry is about 130 bytes).
const STORE_LIMIT: u64 = 16 << 20;

/// One trusted host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrustedHost {
    pub fingerprint: Fingerprint,
    /// A name to refer to it by (`tern trust remove NAME`); informational only: trust is in
    /// the key, never in a name.
    pub name: Option<String>,
    /// When it was first added, seconds since the Unix epoch.
    pub added_unix: u64,
}

/// The file's form: an object, so that fields can be added later.
#[derive(Serialize, Deserialize)]
struct StoreFile {
    hosts: Vec<TrustedHost>,
}

/// The run-time trust store, a JSON file the daemon owns (mode 0600, replaced atomically on
/// every change).
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    hosts: Vec<TrustedHost>,
}

impl TrustStore {
    /// Opens the store at `path`; a missing file is an empty store (created on the first
    /// `add`).
    pub fn open(path: &Path) -> Result<TrustStore, TlsError> {
        let data = match read_limited(path, STORE_LIMIT) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(TrustStore {
                    path: path.to_path_buf(),
                    hosts: Vec::new(),
                })
            }
            Err(e) => {
                return Err(TlsError::Io {
                    context: format!("reading the trust store {}", path.display()),
                    source: e,
                })
            }
        };
        let damaged = |problem: String| TlsError::BadFile {
            path: path.to_path_buf(),
            problem: format!("damaged trust store ({problem}); fix or remove it"),
        };
        let file: StoreFile = serde_json::from_slice(&data).map_err(|e| damaged(e.to_string()))?;
        let mut fingerprints = HashSet::new();
        let mut names = HashSet::new();
        for host in &file.hosts {
            if !fingerprints.insert(host.fingerprint) {
                return Err(damaged(format!("{} appears twice", host.fingerprint)));
            }
            if let Some(name) = &host.name {
                check_name(name).map_err(|e| damaged(e.to_string()))?;
                if !names.insert(name.as_str()) {
                    return Err(damaged(format!("the name {name:?} appears twice")));
                }
            }
        }
        Ok(TrustStore {
            path: path.to_path_buf(),
            hosts: file.hosts,
        })
    }

    /// Trusts `fingerprint`, saving the store. Adding a key already trusted keeps its entry
    /// and, if `name` is given, renames it. A name already given to another key is an error.
    pub fn add(&mut self, fingerprint: Fingerprint, name: Option<String>) -> Result<(), TlsError> {
        if let Some(name) = &name {
            check_name(name)?;
            if let Some(other) = self
                .hosts
                .iter()
                .find(|h| h.name.as_ref() == Some(name) && h.fingerprint != fingerprint)
            {
                return Err(TlsError::NameTaken {
                    name: name.clone(),
                    fingerprint: other.fingerprint,
                });
            }
        }
        let mut hosts = self.hosts.clone();
        match hosts.iter_mut().find(|h| h.fingerprint == fingerprint) {
            Some(host) => {
                if name.is_some() {
                    host.name = name;
                }
            }
            None => hosts.push(TrustedHost {
                fingerprint,
                name,
                added_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            }),
        }
        self.save(&hosts)?;
        self.hosts = hosts;
        Ok(())
    }

    /// Stops trusting the host with this fingerprint (`sha256:…`) or name, saving the store,
    /// and returns its entry.
    pub fn remove(&mut self, fingerprint_or_name: &str) -> Result<TrustedHost, TlsError> {
        let index = if fingerprint_or_name.starts_with("sha256:") {
            let fingerprint: Fingerprint = fingerprint_or_name.parse()?;
            self.hosts.iter().position(|h| h.fingerprint == fingerprint)
        } else {
            self.hosts
                .iter()
                .position(|h| h.name.as_deref() == Some(fingerprint_or_name))
        };
        let Some(index) = index else {
            return Err(TlsError::UnknownHost(
                fingerprint_or_name.chars().take(80).collect(),
            ));
        };
        let mut hosts = self.hosts.clone();
        let removed = hosts.remove(index);
        self.save(&hosts)?;
        self.hosts = hosts;
        Ok(removed)
    }

    /// The trusted hosts, in the order they were added.
    pub fn hosts(&self) -> &[TrustedHost] {
        &self.hosts
    }

    /// The trusted keys, for [`crate::Trust`].
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.hosts.iter().map(|h| h.fingerprint).collect()
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self, hosts: &[TrustedHost]) -> Result<(), TlsError> {
        let io_error = |source| TlsError::Io {
            context: format!("saving the trust store {}", self.path.display()),
            source,
        };
        let mut json = serde_json::to_vec_pretty(&StoreFile {
            hosts: hosts.to_vec(),
        })
        .map_err(|e| io_error(io::Error::other(e)))?;
        json.push(b'\n');
        create_private_dir(&parent_of(&self.path)).map_err(io_error)?;
        write_atomic(&self.path, &json, 0o600).map_err(io_error)
    }
}

/// Names are for typing on a command line and showing in lists: 1 to 64 characters of
/// `[A-Za-z0-9._-]`.
fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName {
            name: name.chars().take(80).collect(),
        })
    }
}
