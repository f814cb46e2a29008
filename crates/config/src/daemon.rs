//! The daemon's own configuration, a TOML file:
//!
//! ```toml
//! state_dir = "/var/lib/tern"
//! socket = "/run/tern/ternd.sock"
//!
//! # Features of this host's CPU that guests do not get (a common set for a pool of hosts,
//! # so that guests can move between any two of them).
//! hide_cpu_features = ["avx512f"]
//! # The most memory all guests of this host may have together (MiB).
//! guest_memory_mib = 16384
//!
//! [relocation]
//! server = true
//! address = "192.0.2.10"
//! port = 8002
//! hosts_allow = ['^localhost$', '^192\.0\.2\.[0-9]+$']
//! # Who may migrate guests here, besides the run-time trust store (`tern trust add`):
//! trusted = ["sha256:…"]          # pinned host keys
//! ca_file = "/etc/tern/pool-ca.pem" # certificates this CA signed (and still valid)
//! # What an incoming guest may use on this host (default: no disks, every bridge).
//! storage = ["/srv/guests", "/dev/vg0/web"]
//! # Where disks copied here (`tern migrate --copy-storage`) go; the first storage directory
//! # by default.
//! disk_dir = "/srv/guests"
//! nbd_servers = ["192.0.2.200:10809"]
//! bridges = ["br0"]
//!
//! # Joining a pool of hosts kept in etcd (without this table the host is on its own).
//! [pool]
//! name = "rack1"
//! endpoints = ["https://192.0.2.50:2379", "https://192.0.2.51:2379", "https://192.0.2.52:2379"]
//! host = "node10"                 # this host's name in the pool (default: its hostname)
//! address = "192.0.2.10:8002"     # where other hosts reach its relocation server
//! ca_file = "/etc/tern/etcd-ca.pem"       # TLS to etcd, and the client certificate
//! cert_file = "/etc/tern/etcd-client.pem"
//! key_file = "/etc/tern/etcd-client.key"
//! lease_ttl_s = 10                # a host silent this long is down
//!
//! # How guest processes are contained; every key relaxes the default, full sandbox, and the
//! # daemon warns at start for each one relaxed (for debugging only).
//! [sandbox]
//! seccomp = "enforce"             # "enforce" (default), "log" (the kernel logs what a
//!                                 # filter would have stopped) or "off"
//! namespaces = true               # own PID, mount and IPC namespaces per guest process
//! cgroups = true                  # memory, CPU and task limits per guest
//! memory_overhead_mib = 512       # memory a guest process may use beyond its guest's RAM
//! cpu_overhead_percent = 100      # CPU beyond one CPU per vCPU (migrations, devices)
//! tasks = 256                     # threads a guest process may have
//! ```
//!
//! Every key is optional. Unlike guest configs, unknown keys are errors: this file belongs to
//! tern alone, so an unknown key is a typo that would otherwise silently change nothing.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{de::Error as _, Deserialize, Deserializer, Serialize};

use crate::error::{quote, ConfigError};

/// Settings of the tern daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where guest records and saved images live; `/var/lib/tern` by default.
    #[serde(deserialize_with = "non_empty_path")]
    pub state_dir: PathBuf,
    /// The control socket; `/run/tern/ternd.sock` by default.
    #[serde(deserialize_with = "non_empty_path")]
    pub socket: PathBuf,
    /// CPU features (names such as `avx2`) this host does not offer its guests.
    pub hide_cpu_features: Vec<String>,
    /// The most RAM all guests of this host may have together, in MiB; `None`: as much as the
    /// host has available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_memory_mib: Option<u64>,
    /// The `[relocation]` table: accepting guests migrated from other hosts.
    pub relocation: RelocationConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolConfig>,
    /// The `[sandbox]` table: how guest processes are contained.
    pub sandbox: SandboxConfig,
}

/// What a guest process's system-call filters do with a call they do not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// The process is killed and the daemon names the call.
    #[default]
    Enforce,
    /// The call goes ahead and the kernel logs it.
    Log,
    /// No filters.
    Off,
}

/// The `[sandbox]` table. The defaults are the full sandbox; anything else is for debugging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    pub seccomp: SeccompMode,
    /// Each guest process in PID, mount and IPC namespaces of its own.
    pub namespaces: bool,
    /// Each guest process in its own control group with memory, CPU and task limits.
    pub cgroups: bool,
    /// Memory a guest process may use beyond its guest's RAM (page tables, buffers, page
    /// cache of its files), in MiB.
    pub memory_overhead_mib: u64,
    /// CPU a guest process may use beyond one CPU per vCPU, in hundredths of a CPU.
    pub cpu_overhead_percent: u64,
    /// Threads a guest process may have.
    pub tasks: u64,
    /// Guest processes accept requests that only tests make (attempting a forbidden system
    /// call); never set on a real host.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub test_requests: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            seccomp: SeccompMode::Enforce,
            namespaces: true,
            cgroups: true,
            memory_overhead_mib: 512,
            cpu_overhead_percent: 100,
            tasks: 256,
            test_requests: false,
        }
    }
}

impl SandboxConfig {
    /// Below this many tasks a guest process could not even start its threads.
    const MIN_TASKS: u64 = 32;

    fn check(&self) -> Result<(), String> {
        if self.cgroups && self.tasks < Self::MIN_TASKS {
            return Err(format!(
                "[sandbox] tasks = {} is too few: a guest process needs at least {}",
                self.tasks,
                Self::MIN_TASKS
            ));
        }
        Ok(())
    }

    /// What this config relaxes of the full sandbox, one line each (the daemon warns of them).
    pub fn relaxed(&self) -> Vec<String> {
        let mut relaxed = Vec::new();
        match self.seccomp {
            SeccompMode::Enforce => {}
            SeccompMode::Log => relaxed.push(
                "[sandbox] seccomp = \"log\": guest processes may make any system call (logged)"
                    .to_string(),
            ),
            SeccompMode::Off => relaxed.push(
                "[sandbox] seccomp = \"off\": guest processes may make any system call".into(),
            ),
        }
        if !self.namespaces {
            relaxed.push(
                "[sandbox] namespaces = false: guest processes share the host's PID, mount \
                 and IPC namespaces"
                    .into(),
            );
        }
        if !self.cgroups {
            relaxed.push(
                "[sandbox] cgroups = false: guest processes have no memory, CPU or task limits"
                    .into(),
            );
        }
        if self.test_requests {
            relaxed.push(
                "[sandbox] test_requests = true: guest processes take test-only requests".into(),
            );
        }
        relaxed
    }
}

/// The `[pool]` table: this host is one of a pool whose state is kept in etcd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
}

fn default_lease_ttl() -> u64 {
    10
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: PathBuf::from("/var/lib/tern"),
            socket: PathBuf::from("/run/tern/ternd.sock"),
            hide_cpu_features: Vec::new(),
            guest_memory_mib: None,
            relocation: RelocationConfig::default(),
            pool: None,
            sandbox: SandboxConfig::default(),
        }
    }
}

/// The relocation (incoming migration) server, like xend's `xend-relocation-*` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelocationConfig {
    /// Whether to listen at all; off by default.
    pub server: bool,
    /// The address to listen on; `None` (or `""` in the file) means all addresses.
    #[serde(
        deserialize_with = "empty_means_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub address: Option<String>,
    /// The TCP port, 1 to 65535; 8002 by default, as xend's.
    #[serde(deserialize_with = "nonzero_port")]
    pub port: u16,
    /// Which peers may connect; empty allows all.
    pub hosts_allow: HostsAllow,
    /// Plaintext relocation, without authentication or encryption (both hosts must say so).
    pub insecure: bool,
    /// This host's certificate (PEM); `None`: `<state_dir>/tls/host.crt`, created on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// This host's private key (PEM); `None`: `<state_dir>/tls/host.key`, created on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Host key fingerprints (`sha256:<64 hex>`) trusted besides the run-time trust store.
    pub trusted: Vec<String>,
    /// A pool CA: hosts whose certificates it signed (and that are valid now) are trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Directories whose files, and block devices, an incoming guest's disks may name.
    pub storage: Vec<PathBuf>,
    /// Where the images of disks copied here (`tern migrate --copy-storage`) are written: a
    /// directory of `storage`; `None`: the first directory listed there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_dir: Option<PathBuf>,
    /// NBD servers (`host:port`) an incoming guest's disks may connect to.
    pub nbd_servers: Vec<String>,
    /// Bridges an incoming guest may join; `None`: every bridge of this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridges: Option<Vec<String>>,
    /// Relocation handshakes served at the same time; further connections are closed at once.
    pub max_handshakes: usize,
    /// Seconds a peer has to complete its handshake and send its first message.
    pub handshake_timeout_s: u64,
}

/// xend's relocation port.
const DEFAULT_RELOCATION_PORT: u16 = 8002;

impl Default for RelocationConfig {
    fn default() -> Self {
        RelocationConfig {
            server: false,
            address: None,
            port: DEFAULT_RELOCATION_PORT,
            hosts_allow: HostsAllow::default(),
            insecure: false,
            cert_file: None,
            key_file: None,
            trusted: Vec::new(),
            ca_file: None,
            storage: Vec::new(),
            disk_dir: None,
            nbd_servers: Vec::new(),
            bridges: None,
            max_handshakes: 4,
            handshake_timeout_s: 5,
        }
    }
}

impl RelocationConfig {
    /// Whether a peer may migrate guests here: true if `hosts_allow` is empty, or if any of
    /// its patterns matches the peer's address or, when known, its name. Patterns are not
    /// anchored for the user, as in xend's `xend-relocation-hosts-allow`.
    pub fn allows(&self, peer_addr: &str, peer_name: Option<&str>) -> bool {
        self.hosts_allow.is_empty()
            || self.hosts_allow.is_match(peer_addr)
            || peer_name.is_some_and(|name| self.hosts_allow.is_match(name))
    }
}

/// A list of regular expressions, compiled once when the list is built.
///
/// Serialises as the list of patterns; deserialising compiles them and fails on the first
/// pattern that does not compile. Two lists are equal if their patterns are.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct HostsAllow {
    patterns: Vec<String>,
    regexes: Vec<Regex>,
}

/// A `hosts_allow` pattern that is not a valid regular expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid regular expression {} in hosts_allow: {reason}", quote(.pattern))]
pub struct InvalidPattern {
    /// The pattern as given.
    pub pattern: String,
    /// What the regex compiler said, on one line.
    pub reason: String,
}

impl HostsAllow {
    /// Compiles `patterns`, in order.
    pub fn new<I, S>(patterns: I) -> Result<Self, InvalidPattern>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let patterns: Vec<String> = patterns.into_iter().map(Into::into).collect();
        let regexes = patterns
            .iter()
            .map(|pattern| {
                Regex::new(pattern).map_err(|e| InvalidPattern {
                    pattern: pattern.clone(),
                    reason: regex_error_summary(&e),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HostsAllow { patterns, regexes })
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any pattern matches anywhere in `text`.
    pub fn is_match(&self, text: &str) -> bool {
        self.regexes.iter().any(|r| r.is_match(text))
    }
}

impl PartialEq for HostsAllow {
    fn eq(&self, other: &Self) -> bool {
        // The regexes are compiled from the patterns, so the patterns say it all.
        self.patterns == other.patterns
    }
}

impl TryFrom<Vec<String>> for HostsAllow {
    type Error = InvalidPattern;

    fn try_from(patterns: Vec<String>) -> Result<Self, Self::Error> {
        HostsAllow::new(patterns)
    }
}

impl From<HostsAllow> for Vec<String> {
    fn from(hosts: HostsAllow) -> Self {
        hosts.patterns
    }
}

/// Parses a daemon config from TOML text. Absent keys take their defaults.
pub fn parse_daemon_config(text: &str) -> Result<DaemonConfig, ConfigError> {
    let config: DaemonConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    if let Some(pool) = &config.pool {
        pool.check()
            .map_err(|message| ConfigError::Invalid { message })?;
    }
    config
        .sandbox
        .check()
        .map_err(|message| ConfigError::Invalid { message })?;
    Ok(config)
}

impl PoolConfig {
    /// Refuses what cannot work: names that cannot be keys, endpoints that are not URLs, a
    /// certificate without its key.
    fn check(&self) -> Result<(), String> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 63
                && n != "."
                && n != ".."
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&self.name) {
            return Err(format!(
                "[pool] name {}: use up to 63 of a-z, A-Z, 0-9, '-', '_', '.'",
                quote(&self.name)
            ));
        }
        if let Some(host) = self.host.as_deref().filter(|h| !name_ok(h)) {
            return Err(format!(
                "[pool] host {}: use up to 63 of a-z, A-Z, 0-9, '-', '_', '.'",
                quote(host)
            ));
        }
        if self.endpoints.is_empty() {
            return Err("[pool] endpoints: name at least one etcd endpoint".into());
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(format!(
                "[pool] endpoints: {} is not an http:// or https:// URL",
                quote(bad)
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("[pool] cert_file and key_file go together".into());
        }
        if !(2..=600).contains(&self.lease_ttl_s) {
            return Err("[pool] lease_ttl_s must be between 2 and 600".into());
        }
        Ok(())
    }
}

/// Reads and parses the daemon config file at `path`. Errors start with `path`.
pub fn load_daemon_config(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_daemon_config(&text).map_err(|e| e.in_file(path))
}

/// A toml error as `line N: message`; toml's own Display spans several lines with a snippet.
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = one_line(error.message());
    match error.span() {
        Some(span) => ConfigError::at(line_of(text, span.start), message),
        None => ConfigError::Invalid { message },
    }
}

/// The 1-based line that byte `offset` of `text` is on.
fn line_of(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

/// Joins the non-empty lines of `message` with `; `.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The gist of a regex error; a syntax error's Display draws the pattern and a caret over
/// several lines, and its last line says what is wrong.
fn regex_error_summary(error: &regex::Error) -> String {
    let text = error.to_string();
    match text.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
        Some(reason) => reason.trim().to_string(),
        None => one_line(&text),
    }
}

fn non_empty_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    let path = PathBuf::deserialize(deserializer)?;
    if path.as_os_str().is_empty() {
        return Err(D::Error::custom("path must not be empty"));
    }
    Ok(path)
}

fn empty_means_none<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let address = Option::<String>::deserialize(deserializer)?;
    Ok(address.filter(|a| !a.is_empty()))
}

fn nonzero_port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let port = u16::deserialize(deserializer)?;
    if port == 0 {
        return Err(D::Error::custom("port must be between 1 and 65535, got 0"));
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_daemon_config(text).unwrap_err().to_string()
    }

    #[test]
    fn pool_tables_are_checked() {
        let ok = parse_daemon_config(
            "[pool]\nname = \"lab\"\nendpoints = [\"https://10.0.0.1:2379\"]\nhost = \"h1\"\n",
        )
        .unwrap();
        let pool = ok.pool.unwrap();
        assert_eq!(pool.lease_ttl_s, 10);
        assert_eq!(pool.host.as_deref(), Some("h1"));
        for (bad, says) in [
            ("name = \"a/b\"\nendpoints = [\"http://x:1\"]", "name"),
            ("name = \"p\"\nendpoints = []", "endpoints"),
            ("name = \"p\"\nendpoints = [\"x:1\"]", "URL"),
            (
                "name = \"p\"\nendpoints = [\"http://x:1\"]\ncert_file = \"/c\"",
                "key_file",
            ),
            (
                "name = \"p\"\nendpoints = [\"http://x:1\"]\nlease_ttl_s = 1",
                "lease_ttl_s",
            ),
            (
                "name = \"p\"\nendpoints = [\"http://x:1\"]\nnope = 1",
                "nope",
            ),
        ] {
            let err = parse_daemon_config(&format!("[pool]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse_daemon_config("").unwrap();
        assert_eq!(c, DaemonConfig::default());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/tern"));
        assert_eq!(c.socket, PathBuf::from("/run/tern/ternd.sock"));
        assert!(!c.relocation.server);
        assert_eq!(c.relocation.address, None);
        assert_eq!(c.relocation.port, 8002);
        assert!(c.relocation.hosts_allow.is_empty());
    }

    #[test]
    fn full_file() {
        let c = parse_daemon_config(
            r#"
state_dir = "/srv/tern"
socket = "/tmp/t.sock"
hide_cpu_features = ["avx2", "sha"]
guest_memory_mib = 4096

[relocation]
server = true
address = "192.0.2.10"
port = 9000
hosts_allow = ['^localhost$', '^192\.0\.2\.[0-9]+$']
"#,
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/tern"));
        assert_eq!(c.socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(c.hide_cpu_features, ["avx2", "sha"]);
        assert_eq!(c.guest_memory_mib, Some(4096));
        assert!(c.relocation.server);
        assert_eq!(c.relocation.address.as_deref(), Some("192.0.2.10"));
        assert_eq!(c.relocation.port, 9000);
        assert_eq!(
            c.relocation.hosts_allow.patterns(),
            ["^localhost$", r"^192\.0\.2\.[0-9]+$"]
        );
    }

    #[test]
    fn empty_address_means_all() {
        let c = parse_daemon_config("[relocation]\naddress = ''").unwrap();
        assert_eq!(c.relocation.address, None);
    }

    #[test]
    fn errors_name_line_and_key() {
        assert_eq!(
            err("state_dir = '/x'\nsokcet = '/y'\n"),
            "line 2: unknown field `sokcet`, expected one of `state_dir`, `socket`, `hide_cpu_features`, `guest_memory_mib`, `relocation`, `pool`, `sandbox`"
        );
        assert_eq!(
            err("[relocation]\nserver = true\nportt = 1\n"),
            "line 3: unknown field `portt`, expected one of `server`, `address`, `port`, `hosts_allow`, `insecure`, `cert_file`, `key_file`, `trusted`, `ca_file`, `storage`, `disk_dir`, `nbd_servers`, `bridges`, `max_handshakes`, `handshake_timeout_s`"
        );
        assert_eq!(
            err("[relocation]\nport = 0\n"),
            "line 2: port must be between 1 and 65535, got 0"
        );
        assert!(err("[relocation]\nport = 70000\n").starts_with("line 2: "));
        assert!(err("[relocation]\nserver = 'yes'\n").starts_with("line 2: invalid type"));
        assert_eq!(err("state_dir = ''"), "line 1: path must not be empty");
        assert_eq!(err("a = \n"), "line 1: invalid string; expected `\"`, `'`");
        assert!(err("x = 1\n[relocation\n").starts_with("line 2: "));
    }

    #[test]
    fn the_sandbox_is_full_unless_relaxed() {
        let full = parse_daemon_config("").expect("empty config");
        assert_eq!(full.sandbox, SandboxConfig::default());
        assert!(full.sandbox.relaxed().is_empty());
        let relaxed = parse_daemon_config(
            "[sandbox]\nseccomp = 'log'\nnamespaces = false\ncgroups = false\n",
        )
        .expect("relaxed sandbox");
        assert_eq!(relaxed.sandbox.seccomp, SeccompMode::Log);
        assert_eq!(relaxed.sandbox.relaxed().len(), 3);
        assert_eq!(
            err("[sandbox]\nseccomp = 'lenient'\n")
                .split(',')
                .next()
                .unwrap_or_default(),
            "line 2: unknown variant `lenient`"
        );
        assert_eq!(
            err("[sandbox]\ntasks = 8\n"),
            "[sandbox] tasks = 8 is too few: a guest process needs at least 32"
        );
    }

    #[test]
    fn bad_pattern_is_named() {
        let e = err("[relocation]\nhosts_allow = [\n  '^ok$',\n  '(unclosed',\n]\n");
        assert!(
            e.contains("invalid regular expression '(unclosed' in hosts_allow: unclosed group"),
            "{e}"
        );
        assert!(e.starts_with("line "), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn allows() {
        let mut r = RelocationConfig::default();
        assert!(r.allows("203.0.113.9", None));
        r.hosts_allow = HostsAllow::new([r"^localhost$", r"^192\.0\.2\."]).unwrap();
        assert!(r.allows("192.0.2.44", None));
        assert!(!r.allows("203.0.113.9", None));
        assert!(r.allows("203.0.113.9", Some("localhost")));
        assert!(!r.allows("203.0.113.9", Some("localhost.example")));
        // Unanchored patterns match anywhere, as in xend.
        r.hosts_allow = HostsAllow::new(["example"]).unwrap();
        assert!(r.allows("10.1.1.1", Some("a.example.org")));
    }

    #[test]
    fn serde_round_trip() {
        let mut c = DaemonConfig::default();
        c.relocation.server = true;
        c.guest_memory_mib = Some(512);
        c.relocation.address = Some("::1".into());
        c.relocation.hosts_allow = HostsAllow::new(["^a$", "b"]).unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse_daemon_config(&text).unwrap(), c);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<DaemonConfig>(&json).unwrap(), c);
        let bad = json.replace("^a$", "(");
        assert!(serde_json::from_str::<DaemonConfig>(&bad).is_err());
    }

    #[test]
    fn load_prefixes_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ternd.toml");
        std::fs::write(&path, "[relocation]\nport = 0\n").unwrap();
        let e = load_daemon_config(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: line 2: port must be between 1 and 65535, got 0",
                path.display()
            )
        );
        let missing = dir.path().join("nope.toml");
        let e = load_daemon_config(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", missing.display())), "{e}");
        std::fs::write(&path, "state_dir = '/s'\n").unwrap();
        assert_eq!(
            load_daemon_config(&path).unwrap().state_dir,
            PathBuf::from("/s")
        );
    }
}
