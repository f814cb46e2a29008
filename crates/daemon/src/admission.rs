//! Admission: every reason this host refuses a guest before a guest process is started for
//! it, whether the guest migrates in, is restored from a checkpoint or is created.
//!
//! For every guest, wherever it comes from ([`admit_on_host`], [`admit_beside`]): free memory
//! for it and its process, its bridges and disks present, its name and UUID not taken by a
//! domain here, and the host's `guest_memory_mib` not exceeded. A created guest must also have
//! a readable kernel ([`admit_create`]); a restored one a UUID in its checkpoint
//! ([`admit_checkpoint`]). The conflicts need the registry's table of domains: the registry
//! passes it in ([`Resident`]) with the table locked, so that two starts cannot both pass.
//!
//! One check comes later, in the guest process: restoring a checkpoint refuses it if this
//! host's CPU lacks features the guest was started with (`tern_vmm::restore`), as that needs
//! the checkpoint's machine state, which only the guest process reads.
//!
//! A migrating guest's connection is refused before a byte is read if its peer is not in
//! `hosts_allow` ([`admit_peer`]); its offer is refused as below ([`admit_offer`]), and if its
//! migration ID was seen here before ([`admit_new_migration`]). Keys and handshake slots are
//! the relocation server's to check (`crate::relocation`), before any offer.
//!
//! The offer comes from another host, so every field of it is untrusted input, checked here
//! against this host's own config, never the source's: the versions spoken, the migration ID,
//! the offer agreeing with itself, each field of the guest's config (as tern-config's parser
//! would accept it), this host's CPU, and what the guest would touch here:
//!
//! - `file:` disks, the kernel and the ramdisk (the guest boots from them if it reboots here)
//!   must resolve, symlinks and `..` followed, to regular files inside a directory listed in
//!   `[relocation] storage`;
//! - `phy:` disks must be block devices listed one by one in `[relocation] storage`;
//! - `nbd:` disks must name a server of `[relocation] nbd_servers`;
//! - network interfaces must join a bridge of `[relocation] bridges` (when given) that exists
//!   here.
//!
//! A refusal is one line for the source's terminal. It names what the guest asked for, but a
//! path outside this host's storage is refused the same way whether or not it exists here, so
//! that a peer cannot probe this host's file system.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use kvm_bindings::kvm_cpuid_entry2;
use tern_config::{DiskBackend, DiskSpec, DomainConfig, RelocationConfig, VifSpec};
use tern_migration::link::LinkSecurity;
use tern_migration::{Offer, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Guest RAM an incoming guest may have, MiB: what tern-config accepts in a guest config.
pub const MEMORY_MIB: RangeInclusive<u64> = 16..=1_048_576;
/// vCPUs an incoming guest may have: what tern-config accepts in a guest config.
pub const VCPUS: RangeInclusive<u32> = 1..=255;
/// Disks and network interfaces together: the machine's virtio slots.
pub const MAX_DEVICES: usize = tern_machine::layout::VIRTIO_MAX_DEVICES as usize;
/// The longest kernel command line the boot code writes (it needs a NUL after it).
pub const CMDLINE_MAX: usize = tern_machine::layout::CMDLINE_MAX_SIZE - 1;
/// The longest guest name, as in tern-config.
const NAME_MAX: usize = 64;
/// The longest migration ID (a UUID is 36).
const MIGRATION_ID_MAX: usize = 64;
/// The longest disk vdev (`xvda`, `xvdaa1`).
const VDEV_MAX: usize = 16;
/// The longest path (PATH_MAX, NUL included).
const PATH_MAX: usize = 4095;
/// The longest NBD export name (the NBD protocol's limit).
const EXPORT_MAX: usize = 4096;
/// The longest host name (DNS).
const HOST_MAX: usize = 253;
/// The longest free-text field of an offer that is only shown or logged (`ip`, versions).
const TEXT_MAX: usize = 256;
/// The longest NIC model name.
const MODEL_MAX: usize = 32;
/// The most CPUID entries of one vCPU (`KVM_SET_CPUID2`'s limit).
const CPUID_ENTRIES_MAX: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// The most CPU feature words in an offer's description.
const FEATURE_WORDS_MAX: usize = 64;
/// How much of an untrusted string a refusal shows.
const SHOWN_MAX: usize = 160;
/// Memory a guest process needs beyond the guest's RAM (page tables, buffers, the process).
const OVERHEAD_MIB: u64 = 64;

/// Everything an incoming guest is checked against on this host.
pub struct IncomingPolicy<'a> {
    /// What incoming guests may use here: `storage`, `nbd_servers`, `bridges`.
    pub relocation: &'a RelocationConfig,
    /// CPU features this host does not offer its guests (`hide_cpu_features`).
    pub hidden_cpu_features: &'a [String],
}

/// Why this host does not take an offered guest. Each message is one line, for the source's
/// terminal; untrusted text in it is shortened and its control characters escaped.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this host speaks relocation protocol versions {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}, the source version {theirs}"
    )]
    ProtocolVersion { theirs: u32 },
    #[error("the offer asks for post-copy, which relocation protocol version {theirs} does not have (version {} does)", tern_migration::protocol::POSTCOPY_PROTOCOL_VERSION)]
    PostcopyVersion { theirs: u32 },
    #[error("the offer asks for post-copy of a migration that is not live")]
    PostcopyNotLive,
    #[error("the offer copies disks, which relocation protocol version {theirs} does not have (version {} does)", tern_migration::protocol::COPY_STORAGE_PROTOCOL_VERSION)]
    CopyStorageVersion { theirs: u32 },
    #[error("the offer copies disk {vdev}: {reason}")]
    CopiedDisk { vdev: String, reason: String },
    #[error(
        "the offer copies disk {vdev}; this host has no storage directory for incoming guests: add one to [relocation] storage on this host"
    )]
    NoDiskStorage { vdev: String },
    #[error("the offer copies disk {vdev} to {path}, which already exists on this host")]
    CopiedDiskExists { vdev: String, path: String },
    #[error("the offer copies {needed} bytes of disk images; {dir} has {free} bytes free")]
    NoRoomForDisks { dir: String, needed: u64, free: u64 },
    #[error("migration {migration_id} may be resumed only by the host that started it")]
    ResumeKey { migration_id: String },
    #[error(
        "this host (tern {ours}) reads migration stream format versions {oldest} to {newest}, the source (tern {source_tern}) sends version {theirs}",
        ours = env!("CARGO_PKG_VERSION"),
        oldest = tern_snapshot::OLDEST_FORMAT_VERSION,
        newest = tern_snapshot::FORMAT_VERSION
    )]
    StreamFormat { theirs: u32, source_tern: String },
    #[error("the offer's migration ID is not a UUID")]
    MigrationId,
    /// The offer apart from the guest's config: its description or the vCPUs' CPUID.
    #[error("the offer is malformed: {0}")]
    MalformedOffer(String),
    #[error("the offered guest config is malformed: {0}")]
    MalformedConfig(String),
    #[error("the offer contradicts itself: {0}")]
    Contradiction(String),
    #[error(
        "the offered guest's name {name} is not valid: use 1 to {NAME_MAX} of A-Z a-z 0-9 _ . - and do not start with '-' or '.'"
    )]
    Name { name: String },
    #[error(
        "the offered guest has {mib} MiB of memory; a guest may have {} to {} MiB",
        MEMORY_MIB.start(),
        MEMORY_MIB.end()
    )]
    Memory { mib: u64 },
    #[error(
        "the offered guest has {vcpus} vCPUs; a guest may have {} to {}",
        VCPUS.start(),
        VCPUS.end()
    )]
    Vcpus { vcpus: u32 },
    #[error(
        "the offered guest has {disks} disks and {vifs} network interfaces; a guest may have at most {MAX_DEVICES} devices"
    )]
    Devices { disks: usize, vifs: usize },
    #[error("the offered guest's kernel command line {0}")]
    Cmdline(String),
    /// A network interface's MAC, IP, model or bridge name is not acceptable.
    #[error("network interface {nic}: {reason}")]
    Vif { nic: usize, reason: String },
    #[error(
        "network interface {nic}: bridge {bridge} is not one this host gives incoming guests ([relocation] bridges)"
    )]
    BridgeNotAllowed { nic: usize, bridge: String },
    #[error("network interface {nic}: bridge {bridge} does not exist on this host")]
    BridgeMissing { nic: usize, bridge: String },
    #[error(
        "disk {vdev} is not a valid vdev (1 to {VDEV_MAX} letters then letters or digits, like xvda)"
    )]
    Vdev { vdev: String },
    #[error("disk vdev {vdev} is used twice")]
    DuplicateVdev { vdev: String },
    /// `what` is `disk <vdev>`, `kernel` or `ramdisk`.
    #[error("{what}: {path} is not an absolute path")]
    NotAbsolute { what: String, path: String },
    #[error(
        "{what}: {path}: this host has no storage for incoming guests; add {add} to [relocation] storage on this host"
    )]
    NoStorage {
        what: String,
        path: String,
        add: &'static str,
    },
    #[error("disk {vdev}: {path} is outside this host's storage for incoming guests ([relocation] storage)")]
    DiskOutsideStorage { vdev: String, path: String },
    #[error(
        "{which} {path} is outside this host's storage for incoming guests ([relocation] storage), and the guest boots from it if it reboots here"
    )]
    BootFileOutsideStorage { which: &'static str, path: String },
    #[error("{what}: cannot use {path} on this host: {error}")]
    Unusable {
        what: String,
        path: String,
        error: String,
    },
    #[error("{what}: {path} is not a regular file")]
    NotAFile { what: String, path: String },
    #[error(
        "disk {vdev}: block device {path} is not listed in this host's storage for incoming guests ([relocation] storage)"
    )]
    DeviceNotListed { vdev: String, path: String },
    #[error("disk {vdev}: phy:{path} is not a block device")]
    NotABlockDevice { vdev: String, path: String },
    #[error("disk {vdev}: {reason}")]
    NbdTarget { vdev: String, reason: String },
    #[error(
        "disk {vdev}: NBD server {server} is not one this host lets incoming guests use ([relocation] nbd_servers)"
    )]
    NbdNotListed { vdev: String, server: String },
    #[error("this host cannot tell which CPU features it offers: {0}")]
    HostCpu(String),
    #[error(
        "this host's CPU lacks features the guest was started with: {}",
        .0.join(", ")
    )]
    MissingCpuFeatures(Vec<String>),
    /// A last check: the config must be one tern-config's parser reads back as itself.
    #[error("the offered guest config is not one this host would accept from a file: {0}")]
    NotReadBack(String),
}

/// What admission asks of this host beyond its config; a trait so that tests need neither KVM
/// nor bridges.
pub trait HostProbe {
    /// The CPU features this host offers its guests, as `tern_machine::offered_features`.
    fn offered_cpu_features(&self, hidden: &[String]) -> Result<Vec<(u32, u32, [u32; 4])>, String>;
    /// Whether `name` is a bridge of this host.
    fn bridge_exists(&self, name: &str) -> bool;
    /// Host memory available for new guests, MiB, if the host says.
    fn available_memory_mib(&self) -> Option<u64>;
}

/// This host, through KVM and the network stack of the daemon's namespace.
pub struct ThisHost;

impl HostProbe for ThisHost {
    fn offered_cpu_features(&self, hidden: &[String]) -> Result<Vec<(u32, u32, [u32; 4])>, String> {
        tern_machine::offered_features(hidden).map_err(|e| e.to_string())
    }

    fn bridge_exists(&self, name: &str) -> bool {
        tern_net::bridge_exists(name)
    }

    fn available_memory_mib(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }
}

/// Decides whether this host takes the offered guest; returns its config, checked field by
/// field as untrusted input.
pub fn admit_offer(policy: &IncomingPolicy, offer: &Offer) -> Result<DomainConfig, Refusal> {
    admit_offer_on(policy, offer, &ThisHost)
}

/// [`admit_offer`] with the host's CPU and bridges as `host` says.
pub fn admit_offer_on(
    policy: &IncomingPolicy,
    offer: &Offer,
    host: &dyn HostProbe,
) -> Result<DomainConfig, Refusal> {
    check_versions(offer)?;
    check_migration_id(&offer.migration_id)?;
    check_description(offer)?;
    let config: DomainConfig = serde_json::from_value(offer.config.clone())
        .map_err(|e| Refusal::MalformedConfig(shown(&e.to_string())))?;
    check_fields(&config)?;
    check_reads_back(&config)?;
    check_consistency(offer, &config)?;
    check_cpu(policy, offer, host)?;
    let storage = Storage::new(&policy.relocation.storage);
    check_boot_files(&config, &storage)?;
    let mut config = config;
    let disk_dir = policy.relocation.disk_dir.as_deref();
    place_copied_disks(offer, &mut config, &storage, disk_dir)?;
    for disk in &config.disks {
        if offer.copy_disks.iter().any(|c| c.vdev == disk.vdev) {
            continue; // placed above, in this host's storage
        }
        check_disk(disk, &storage, &policy.relocation.nbd_servers)?;
    }
    for (nic, vif) in config.vifs.iter().enumerate() {
        check_bridge(nic, vif, policy.relocation.bridges.as_deref(), host)?;
    }
    Ok(config)
}

/// What is wrong with this host's `[relocation]` storage, NBD servers and bridges, one line
/// each, for the daemon to log at start: entries that can never admit anything.
pub fn policy_warnings(relocation: &RelocationConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    for entry in &relocation.storage {
        let problem = if !entry.is_absolute() {
            Some("is not an absolute path".to_string())
        } else {
            match std::fs::metadata(entry) {
                Err(e) => Some(format!("cannot be used: {}", error_text(&e))),
                Ok(m) if m.is_dir() || m.file_type().is_block_device() => None,
                Ok(_) => Some("is neither a directory nor a block device".to_string()),
            }
        };
        if let Some(problem) = problem {
            warnings.push(format!(
                "[relocation] storage: {} {problem}; incoming guests cannot use it",
                entry.display()
            ));
        }
    }
    if let Some(dir) = &relocation.disk_dir {
        let storage = Storage::new(&relocation.storage);
        let listed =
            std::fs::canonicalize(dir).is_ok_and(|d| storage.directories().any(|s| s == d));
        if !listed {
            warnings.push(format!(
                "[relocation] disk_dir: {} is not a directory of [relocation] storage; disks cannot be copied here",
                dir.display()
            ));
        }
    }
    for server in &relocation.nbd_servers {
        if parse_server(server).is_none() {
            warnings.push(format!(
                "[relocation] nbd_servers: '{server}' is not host:port (or [address]:port); incoming guests cannot use it"
            ));
        }
    }
    for bridge in relocation.bridges.iter().flatten() {
        if let Err(e) = tern_net::validate_ifname(bridge) {
            warnings.push(format!("[relocation] bridges: {e}"));
        }
    }
    warnings
}

/// A domain already on this host, as the checks of a new one see it.
pub struct Resident<'a> {
    pub id: u32,
    pub name: &'a str,
    pub uuid: &'a str,
    pub memory_mib: u64,
    /// Whether it still holds its memory (its process is starting or runs).
    pub holds_memory: bool,
}

/// Decides whether a guest config from the CLI may be created: it boots from its kernel, so
/// the kernel (and ramdisk) must be readable now rather than fail in the guest process.
pub fn admit_create(config: &DomainConfig) -> anyhow::Result<()> {
    check_local_boot_files(config)
}

/// Decides whether the guest config read from checkpoint `path` may be restored: the UUID is
/// what makes it the same guest, so a checkpoint must carry one.
pub fn admit_checkpoint(path: &Path, config: &DomainConfig) -> anyhow::Result<()> {
    if config.uuid.is_none() {
        bail!(
            "cannot restore {}: its guest config has no UUID",
            path.display()
        );
    }
    Ok(())
}

/// Decides whether this host has room for a guest about to start here (created, restored or
/// arriving): free memory for it and its process, and its bridges and disks (but for the
/// disks `arriving` in a migration's stream).
pub fn admit_on_host(config: &DomainConfig, arriving: &[String]) -> anyhow::Result<()> {
    admit_on_host_with(config, arriving, &ThisHost)
}

/// [`admit_on_host`] with the host's memory and bridges as `host` says.
pub fn admit_on_host_with(
    config: &DomainConfig,
    arriving: &[String],
    host: &dyn HostProbe,
) -> anyhow::Result<()> {
    check_free_memory(config.memory_mib, host.available_memory_mib())?;
    check_local_devices(config, arriving, host)
}

/// Decides whether a guest with `uuid` may join the domains already here: its UUID and name
/// unused, and all guests together within `guest_memory_mib` (MiB) if the host sets it.
pub fn admit_beside(
    config: &DomainConfig,
    uuid: &str,
    residents: &[Resident],
    guest_memory_mib: Option<u64>,
) -> anyhow::Result<()> {
    if let Some(d) = residents.iter().find(|d| d.uuid == uuid) {
        bail!(
            "a domain with UUID {uuid} is already running on this host ('{}')",
            d.name
        );
    }
    if let Some(d) = residents.iter().find(|d| d.name == config.name) {
        bail!(
            "a domain named '{}' already exists on this host (ID {})",
            config.name,
            d.id
        );
    }
    check_memory_policy(config.memory_mib, residents, guest_memory_mib)
}

/// Decides whether a peer may connect at all: `hosts_allow` lets it in by address, or by the
/// name `confirmed_name` gives (asked only if the address alone is not enough, as it may
/// need DNS). The reason is one line, for the peer and the log.
pub fn admit_peer(
    config: &RelocationConfig,
    ip: IpAddr,
    confirmed_name: impl FnOnce() -> Option<String>,
) -> Result<(), String> {
    let addr = ip.to_string();
    if config.allows(&addr, None) {
        return Ok(());
    }
    let name = confirmed_name();
    if config.allows(&addr, name.as_deref()) {
        return Ok(());
    }
    Err(format!(
        "this host does not accept migrations from {addr}{} (it is not in the relocation server's hosts_allow)",
        name.map(|n| format!(" ({n})")).unwrap_or_default()
    ))
}

/// Decides whether the peer that showed key `peer` (None: plaintext) may resume post-copy
/// migration `migration_id`, whose stream this host accepts only as `pinned` says (the key
/// that made the offer, or plaintext).
pub fn admit_resume(
    migration_id: &str,
    peer: Option<&str>,
    pinned: &LinkSecurity,
) -> Result<(), Refusal> {
    let allowed = match (pinned, peer) {
        (LinkSecurity::Insecure, None) => true,
        (LinkSecurity::Tls { trusted, .. }, Some(key)) => trusted.iter().any(|k| k == key),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Refusal::ResumeKey {
            migration_id: migration_id.to_string(),
        })
    }
}

/// Decides whether migration `migration_id` is new here: a replayed or repeated offer would
/// reuse its record in `state_file`.
pub fn admit_new_migration(migration_id: &str, state_file: &Path) -> anyhow::Result<()> {
    if state_file.exists() {
        bail!("migration {migration_id} was seen here before");
    }
    Ok(())
}

fn check_local_boot_files(config: &DomainConfig) -> anyhow::Result<()> {
    let kernel = config
        .kernel
        .as_ref()
        .ok_or_else(|| anyhow!("the config of '{}' names no kernel", config.name))?;
    std::fs::File::open(kernel)
        .with_context(|| format!("cannot read kernel {}", kernel.display()))?;
    if let Some(ramdisk) = &config.ramdisk {
        std::fs::File::open(ramdisk)
            .with_context(|| format!("cannot read ramdisk {}", ramdisk.display()))?;
    }
    Ok(())
}

/// Refuses a guest whose bridges or disks are not there, before anything is created for it.
fn check_local_devices(
    config: &DomainConfig,
    arriving: &[String],
    host: &dyn HostProbe,
) -> anyhow::Result<()> {
    for (i, vif) in config.vifs.iter().enumerate() {
        let bridge = vif.bridge.as_deref().ok_or_else(|| {
            anyhow!("network interface {i} names no bridge (vif = ['bridge=br0'])")
        })?;
        if !host.bridge_exists(bridge) {
            bail!("network interface {i}: bridge {bridge} does not exist on this host");
        }
    }
    for disk in config.disks.iter().filter(|d| !arriving.contains(&d.vdev)) {
        if let DiskBackend::File(path) | DiskBackend::Phy(path) = &disk.backend {
            std::fs::metadata(path)
                .with_context(|| format!("disk {}: cannot use {}", disk.vdev, path.display()))?;
        }
    }
    Ok(())
}

/// Refuses a guest that would not fit in the host's free memory; a host that does not say
/// how much it has free takes it.
fn check_free_memory(memory_mib: u64, available: Option<u64>) -> anyhow::Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let needed = memory_mib + OVERHEAD_MIB;
    if needed > available {
        bail!(
            "not enough free memory on this host: the guest needs {memory_mib} MiB plus {OVERHEAD_MIB} MiB overhead, {available} MiB are available"
        );
    }
    Ok(())
}

/// Refuses a guest of `memory_mib` that would take the guests past `limit` (MiB), counting
/// only those that still hold their memory.
fn check_memory_policy(
    memory_mib: u64,
    residents: &[Resident],
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let used: u64 = residents
        .iter()
        .filter(|d| d.holds_memory)
        .map(|d| d.memory_mib)
        .sum();
    if used + memory_mib > limit {
        bail!(
            "not enough memory for guests on this host: the guest needs {memory_mib} MiB; {} of the {limit} MiB this host gives its guests are free",
            limit.saturating_sub(used)
        );
    }
    Ok(())
}

fn check_versions(offer: &Offer) -> Result<(), Refusal> {
    if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&offer.protocol) {
        return Err(Refusal::ProtocolVersion {
            theirs: offer.protocol,
        });
    }
    if offer.postcopy && offer.protocol < tern_migration::protocol::POSTCOPY_PROTOCOL_VERSION {
        return Err(Refusal::PostcopyVersion {
            theirs: offer.protocol,
        });
    }
    if offer.postcopy && !offer.live {
        return Err(Refusal::PostcopyNotLive);
    }
    // A source of the previous release sends the previous format: upgrading a host means
    // migrating its guests away and back.
    let readable = tern_snapshot::OLDEST_FORMAT_VERSION..=tern_snapshot::FORMAT_VERSION;
    if !readable.contains(&offer.stream_format) {
        return Err(Refusal::StreamFormat {
            theirs: offer.stream_format,
            source_tern: shown(&offer.info.tern_version),
        });
    }
    Ok(())
}

/// The ID names a file in the state directory: a UUID's characters only.
fn check_migration_id(id: &str) -> Result<(), Refusal> {
    let valid = !id.is_empty()
        && id.len() <= MIGRATION_ID_MAX
        && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(Refusal::MigrationId)
    }
}

/// The offer's description of the guest and the vCPUs' CPUID, as far as they stand alone.
fn check_description(offer: &Offer) -> Result<(), Refusal> {
    let bad = |m: String| Err(Refusal::MalformedOffer(m));
    let info = &offer.info;
    for (what, text) in [
        ("the source's tern version", &info.tern_version),
        ("the source's host name", &info.host),
    ] {
        if text.len() > TEXT_MAX || text.chars().any(char::is_control) {
            return bad(format!("{what} {} is not plain text", quote(text)));
        }
    }
    if info.cpu_features.len() > FEATURE_WORDS_MAX {
        return bad(format!(
            "it describes {} CPU feature words (at most {FEATURE_WORDS_MAX})",
            info.cpu_features.len()
        ));
    }
    // Bounded by the number of vCPUs (checked against the config later) before anything is
    // done per vCPU.
    if offer.vcpu_cpuid.len() > *VCPUS.end() as usize {
        return bad(format!(
            "it has the CPUID of {} vCPUs (at most {})",
            offer.vcpu_cpuid.len(),
            VCPUS.end()
        ));
    }
    for (i, entries) in offer.vcpu_cpuid.iter().enumerate() {
        if entries.len() > CPUID_ENTRIES_MAX {
            return bad(format!(
                "vCPU {i} has {} CPUID entries (at most {CPUID_ENTRIES_MAX})",
                entries.len()
            ));
        }
    }
    Ok(())
}

/// Each field of the offered config on its own.
fn check_fields(config: &DomainConfig) -> Result<(), Refusal> {
    if !is_valid_name(&config.name) {
        return Err(Refusal::Name {
            name: quote(&config.name),
        });
    }
    if !MEMORY_MIB.contains(&config.memory_mib) {
        return Err(Refusal::Memory {
            mib: config.memory_mib,
        });
    }
    if !VCPUS.contains(&config.vcpus) {
        return Err(Refusal::Vcpus {
            vcpus: config.vcpus,
        });
    }
    if config.cmdline.len() > CMDLINE_MAX {
        return Err(Refusal::Cmdline(format!(
            "is {} bytes (at most {CMDLINE_MAX})",
            config.cmdline.len()
        )));
    }
    // The boot code ends the line with a NUL; one inside would cut it short. (Tabs and
    // newlines are whitespace to Linux, and xl.cfg can carry them.)
    if config.cmdline.contains('\0') {
        return Err(Refusal::Cmdline(format!(
            "{} contains a NUL byte",
            quote(&config.cmdline)
        )));
    }
    let (disks, vifs) = (config.disks.len(), config.vifs.len());
    if disks + vifs > MAX_DEVICES {
        return Err(Refusal::Devices { disks, vifs });
    }
    let mut vdevs = HashSet::new();
    for disk in &config.disks {
        if !is_valid_vdev(&disk.vdev) {
            return Err(Refusal::Vdev {
                vdev: quote(&disk.vdev),
            });
        }
        if !vdevs.insert(disk.vdev.as_str()) {
            return Err(Refusal::DuplicateVdev {
                vdev: disk.vdev.clone(),
            });
        }
        if let DiskBackend::Nbd { host, port, export } = &disk.backend {
            check_nbd_target(host, *port, export.as_deref()).map_err(|reason| {
                Refusal::NbdTarget {
                    vdev: disk.vdev.clone(),
                    reason,
                }
            })?;
        }
    }
    let mut macs = HashSet::new();
    for (nic, vif) in config.vifs.iter().enumerate() {
        check_vif_fields(vif).map_err(|reason| Refusal::Vif { nic, reason })?;
        if let Some(mac) = vif.mac {
            if !macs.insert(mac) {
                return Err(Refusal::Vif {
                    nic,
                    reason: format!("MAC address {mac} is used twice"),
                });
            }
        }
    }
    Ok(())
}

/// A vif's MAC, bridge name, IP and model; the bridge itself is checked later.
fn check_vif_fields(vif: &VifSpec) -> Result<(), String> {
    // A guest gets its MACs when it is created; one without is not a guest that ran.
    let mac = vif
        .mac
        .ok_or("has no MAC address (a running guest's interfaces have one)")?;
    if mac.is_multicast() {
        return Err(format!("MAC address {mac} is multicast"));
    }
    if mac.0 == [0; 6] {
        return Err(format!("MAC address {mac} is all zero"));
    }
    let bridge = vif.bridge.as_deref().ok_or("names no bridge")?;
    if let Err(e) = tern_net::validate_ifname(bridge) {
        return Err(shown(&e.to_string()));
    }
    if let Some(ip) = &vif.ip {
        if ip.is_empty() || ip.len() > TEXT_MAX || ip.chars().any(|c| c.is_control() || c == ',') {
            return Err(format!("ip {} is not acceptable", quote(ip)));
        }
    }
    if let Some(model) = &vif.model {
        let valid = !model.is_empty()
            && model.len() <= MODEL_MAX
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(format!("model {} is not acceptable", quote(model)));
        }
    }
    Ok(())
}

/// As tern-config's parser: names end up in file names and on command lines.
fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// As tern-config's parser: letters, then letters or digits.
fn is_valid_vdev(vdev: &str) -> bool {
    vdev.len() <= VDEV_MAX
        && vdev.starts_with(|c: char| c.is_ascii_alphabetic())
        && vdev.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The config, written as xl.cfg and parsed again, must come back unchanged: whatever the
/// checks above miss, this host does not take a guest it would not take from a file.
fn check_reads_back(config: &DomainConfig) -> Result<(), Refusal> {
    let text = config.to_xl();
    match tern_config::parse_domain_config(&text, None) {
        Ok(parsed) if parsed.config == *config => Ok(()),
        Ok(_) => Err(Refusal::NotReadBack(
            "it reads back differently".to_string(),
        )),
        Err(e) => Err(Refusal::NotReadBack(shown(&e.to_string()))),
    }
}

/// The offer's description (what the stream's INFO will say) and its config must agree.
fn check_consistency(offer: &Offer, config: &DomainConfig) -> Result<(), Refusal> {
    let contradiction = |m: String| Err(Refusal::Contradiction(m));
    let info = &offer.info;
    let Some(uuid) = config.uuid else {
        return contradiction("its config has no UUID".into());
    };
    if uuid::Uuid::parse_str(&info.guest_uuid).ok() != Some(uuid) {
        return contradiction(format!(
            "its config says UUID {uuid}, its description {}",
            quote(&info.guest_uuid)
        ));
    }
    if info.guest_name != config.name {
        return contradiction(format!(
            "its config says name '{}', its description {}",
            config.name,
            quote(&info.guest_name)
        ));
    }
    // memory_mib is bounded, so this does not overflow.
    let memory_bytes = config.memory_mib << 20;
    if info.memory_bytes != memory_bytes {
        return contradiction(format!(
            "its config says {} MiB of memory, its description {} bytes",
            config.memory_mib, info.memory_bytes
        ));
    }
    if info.vcpus != config.vcpus || offer.vcpu_cpuid.len() != config.vcpus as usize {
        return contradiction(format!(
            "its config says {} vCPUs, its description {}, and it has the CPUID of {}",
            config.vcpus,
            info.vcpus,
            offer.vcpu_cpuid.len()
        ));
    }
    Ok(())
}

/// The features the guest was started with must all be offered here: those the description
/// names and those in the vCPUs' CPUID (which the machine here is built with).
fn check_cpu(policy: &IncomingPolicy, offer: &Offer, host: &dyn HostProbe) -> Result<(), Refusal> {
    let mut wanted: Vec<(u32, u32, [u32; 4])> = Vec::new();
    let mut add = |leaf: u32, subleaf: u32, regs: [u32; 4]| match wanted
        .iter_mut()
        .find(|w| w.0 == leaf && w.1 == subleaf)
    {
        Some(w) => w.2.iter_mut().zip(regs).for_each(|(have, r)| *have |= r),
        None => wanted.push((leaf, subleaf, regs)),
    };
    for w in &offer.info.cpu_features {
        add(w.leaf, w.subleaf, w.regs);
    }
    for entries in &offer.vcpu_cpuid {
        let entries: Vec<kvm_cpuid_entry2> = entries.iter().map(tern_vmm::cpuid::to_kvm).collect();
        for (leaf, subleaf, regs) in tern_machine::cpuid::feature_words(&entries) {
            add(leaf, subleaf, regs);
        }
    }
    let offered = host
        .offered_cpu_features(policy.hidden_cpu_features)
        .map_err(|e| Refusal::HostCpu(shown(&e)))?;
    let mut missing = tern_machine::cpuid::missing_features(&wanted, &offered);
    missing.dedup();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Refusal::MissingCpuFeatures(missing))
    }
}

/// What one entry of `[relocation] storage` is on this host now.
enum Kind {
    Directory,
    BlockDevice,
    /// Missing, or something else (a regular file is not storage: list its directory).
    Unusable,
}

/// `[relocation] storage`, resolved when an offer is checked (so that a directory mounted or
/// a volume created since the daemon started counts).
struct Storage {
    configured: bool,
    /// Each entry as written, its canonical path when it resolves, and what it is.
    entries: Vec<(PathBuf, Option<PathBuf>, Kind)>,
}

impl Storage {
    fn new(configured: &[PathBuf]) -> Self {
        let entries = configured
            .iter()
            .filter(|e| e.is_absolute())
            .map(|entry| {
                let canonical = std::fs::canonicalize(entry).ok();
                let kind = match canonical.as_ref().map(std::fs::metadata) {
                    Some(Ok(m)) if m.is_dir() => Kind::Directory,
                    Some(Ok(m)) if m.file_type().is_block_device() => Kind::BlockDevice,
                    _ => Kind::Unusable,
                };
                (entry.clone(), canonical, kind)
            })
            .collect();
        Storage {
            configured: !configured.is_empty(),
            entries,
        }
    }

    fn directories(&self) -> impl Iterator<Item = &Path> {
        self.entries
            .iter()
            .filter_map(|(_, canonical, kind)| match kind {
                Kind::Directory => canonical.as_deref(),
                _ => None,
            })
    }

    /// Whether the canonical `path` is inside one of the directories (not one itself).
    fn contains(&self, path: &Path) -> bool {
        self.directories()
            .any(|dir| path != dir && path.starts_with(dir))
    }

    /// Whether `path`, which does not resolve, names something inside a directory entry as
    /// written or resolved; only then does a refusal say why it does not resolve.
    fn lexically_contains(&self, path: &Path) -> bool {
        let plain = path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        plain
            && self.entries.iter().any(|(entry, canonical, kind)| {
                matches!(kind, Kind::Directory)
                    && [Some(entry.as_path()), canonical.as_deref()]
                        .into_iter()
                        .flatten()
                        .any(|dir| path != dir && path.starts_with(dir))
            })
    }

    /// The entry `path` (canonical, or as written if `canonical` is None) is listed as.
    fn listed(&self, path: &Path, canonical: Option<&Path>) -> Option<&Kind> {
        self.entries
            .iter()
            .find(|(entry, entry_canonical, _)| match canonical {
                Some(c) => entry_canonical.as_deref() == Some(c),
                None => entry == path,
            })
            .map(|(_, _, kind)| kind)
    }
}

/// A file an incoming guest uses: a `file:` disk, its kernel or its ramdisk.
enum FileUse {
    Disk(String),
    Boot(&'static str),
}

impl FileUse {
    fn what(&self) -> String {
        match self {
            FileUse::Disk(vdev) => format!("disk {vdev}"),
            FileUse::Boot(which) => which.to_string(),
        }
    }

    fn outside(&self, path: String) -> Refusal {
        match self {
            FileUse::Disk(vdev) => Refusal::DiskOutsideStorage {
                vdev: vdev.clone(),
                path,
            },
            FileUse::Boot(which) => Refusal::BootFileOutsideStorage { which, path },
        }
    }
}

fn check_boot_files(config: &DomainConfig, storage: &Storage) -> Result<(), Refusal> {
    for (which, path) in [("kernel", &config.kernel), ("ramdisk", &config.ramdisk)] {
        if let Some(path) = path {
            check_file(&FileUse::Boot(which), path, storage)?;
        }
    }
    Ok(())
}

/// `path` must resolve to a regular file inside a storage directory.
fn check_file(usage: &FileUse, path: &Path, storage: &Storage) -> Result<(), Refusal> {
    let shown_path = shown_path(path);
    check_absolute(&usage.what(), path)?;
    if !storage.configured {
        return Err(Refusal::NoStorage {
            what: usage.what(),
            path: shown_path,
            add: "its directory",
        });
    }
    match std::fs::canonicalize(path) {
        Ok(canonical) => {
            if !storage.contains(&canonical) {
                return Err(usage.outside(shown_path));
            }
            match std::fs::metadata(&canonical) {
                Ok(m) if m.is_file() => Ok(()),
                Ok(_) => Err(Refusal::NotAFile {
                    what: usage.what(),
                    path: shown_path,
                }),
                Err(e) => Err(Refusal::Unusable {
                    what: usage.what(),
                    path: shown_path,
                    error: error_text(&e),
                }),
            }
        }
        // Whether a path outside the storage exists is none of the peer's business.
        Err(e) if storage.lexically_contains(path) => Err(Refusal::Unusable {
            what: usage.what(),
            path: shown_path,
            error: error_text(&e),
        }),
        Err(_) => Err(usage.outside(shown_path)),
    }
}

fn check_absolute(what: &str, path: &Path) -> Result<(), Refusal> {
    if !path.is_absolute() {
        return Err(Refusal::NotAbsolute {
            what: what.to_string(),
            path: shown_path(path),
        });
    }
    if path.as_os_str().len() > PATH_MAX {
        return Err(Refusal::Unusable {
            what: what.to_string(),
            path: shown_path(path),
            error: format!("the path is longer than {PATH_MAX} bytes"),
        });
    }
    Ok(())
}

/// Where disks copied here go: `disk_dir` if it is a directory of the storage (canonical),
/// else (not set) the first directory of the storage; None if there is none.
fn copied_disk_dir(storage: &Storage, disk_dir: Option<&Path>) -> Option<PathBuf> {
    match disk_dir {
        Some(dir) => std::fs::canonicalize(dir)
            .ok()
            .filter(|d| storage.directories().any(|s| s == d)),
        None => storage.directories().next().map(Path::to_path_buf),
    }
}

/// The largest disk image a migration may copy here (64 TiB).
const COPIED_DISK_MAX: u64 = 64 << 40;

/// Places the disks the offer copies (`--copy-storage`): each a `file:` disk of the config,
/// named once, of a plausible size; its image goes into this host's `disk_dir` (a storage
/// directory; by default the first) under the file name it has on the source, which must be
/// a plain name not taken there, and all of them must fit in the free space. The config then
/// names the new paths.
fn place_copied_disks(
    offer: &Offer,
    config: &mut DomainConfig,
    storage: &Storage,
    disk_dir: Option<&Path>,
) -> Result<(), Refusal> {
    let Some(first) = offer.copy_disks.first() else {
        return Ok(());
    };
    if offer.protocol < tern_migration::protocol::COPY_STORAGE_PROTOCOL_VERSION {
        return Err(Refusal::CopyStorageVersion {
            theirs: offer.protocol,
        });
    }
    let dir = copied_disk_dir(storage, disk_dir).ok_or_else(|| Refusal::NoDiskStorage {
        vdev: shown(&first.vdev),
    })?;
    let mut names = HashSet::new();
    let mut needed = 0u64;
    for copied in &offer.copy_disks {
        let bad = |reason: &str| Refusal::CopiedDisk {
            vdev: shown(&copied.vdev),
            reason: reason.to_string(),
        };
        if copied.size == 0
            || copied.size > COPIED_DISK_MAX
            || copied.size % tern_snapshot::DISK_SECTOR != 0
            || copied.allocated > copied.size
        {
            return Err(bad("its size is not plausible"));
        }
        let disk = config
            .disks
            .iter_mut()
            .find(|d| d.vdev == copied.vdev)
            .ok_or_else(|| bad("the guest has no such disk"))?;
        let DiskBackend::File(path) = &disk.backend else {
            return Err(bad("only file: disks can be copied"));
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.starts_with('.'))
            .ok_or_else(|| bad("its image has no usable file name"))?
            .to_string();
        if !names.insert(name.clone()) {
            return Err(bad("another copied disk has the same file name"));
        }
        let target = dir.join(&name);
        if target.symlink_metadata().is_ok() {
            return Err(Refusal::CopiedDiskExists {
                vdev: shown(&copied.vdev),
                path: shown_path(&target),
            });
        }
        disk.backend = DiskBackend::File(target);
        needed = needed.saturating_add(copied.allocated);
    }
    let free = tern_storage::incoming::free_bytes(&dir).unwrap_or(0);
    if free < needed {
        return Err(Refusal::NoRoomForDisks {
            dir: shown_path(&dir),
            needed,
            free,
        });
    }
    Ok(())
}

fn check_disk(disk: &DiskSpec, storage: &Storage, nbd_servers: &[String]) -> Result<(), Refusal> {
    let vdev = disk.vdev.clone();
    match &disk.backend {
        DiskBackend::File(path) => check_file(&FileUse::Disk(vdev), path, storage),
        DiskBackend::Phy(path) => check_device(vdev, path, storage),
        DiskBackend::Nbd { host, port, .. } => check_nbd(vdev, host, *port, nbd_servers),
    }
}

/// `path` must be a block device listed itself in the storage.
fn check_device(vdev: String, path: &Path, storage: &Storage) -> Result<(), Refusal> {
    let what = format!("disk {vdev}");
    check_absolute(&what, path)?;
    if !storage.configured {
        return Err(Refusal::NoStorage {
            what,
            path: shown_path(path),
            add: "the device",
        });
    }
    let canonical = std::fs::canonicalize(path);
    let not_listed = || Refusal::DeviceNotListed {
        vdev: vdev.clone(),
        path: shown_path(path),
    };
    match (storage.listed(path, canonical.as_deref().ok()), &canonical) {
        (Some(Kind::BlockDevice), Ok(_)) => Ok(()),
        (Some(_), Ok(_)) => Err(Refusal::NotABlockDevice {
            vdev,
            path: shown_path(path),
        }),
        (Some(_), Err(e)) => Err(Refusal::Unusable {
            what,
            path: shown_path(path),
            error: error_text(e),
        }),
        (None, _) => Err(not_listed()),
    }
}

/// The server must be listed in `nbd_servers`: the same host name, or the same address, and
/// the same port. Names are not resolved: what is listed is what the guest may reach.
fn check_nbd(vdev: String, host: &str, port: u16, servers: &[String]) -> Result<(), Refusal> {
    let listed = servers
        .iter()
        .filter_map(|s| parse_server(s))
        .any(|(h, p)| p == port && same_host(&h, host));
    if listed {
        Ok(())
    } else {
        Err(Refusal::NbdNotListed {
            vdev,
            server: server_text(host, port),
        })
    }
}

/// An NBD target's host, port and export name as such.
fn check_nbd_target(host: &str, port: u16, export: Option<&str>) -> Result<(), String> {
    let host_ok = !host.is_empty()
        && host.len() <= HOST_MAX
        && !host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '[' | ']'));
    if !host_ok || port == 0 {
        return Err(format!("NBD server {} is not host:port", quote(host)));
    }
    if let Some(export) = export {
        if export.is_empty() || export.len() > EXPORT_MAX || export.chars().any(char::is_control) {
            return Err(format!(
                "NBD export name {} is not acceptable",
                quote(export)
            ));
        }
    }
    Ok(())
}

/// `host:port`, `[v6]:port`, or an unbracketed IPv6 address and port (`::1:10809`).
fn parse_server(server: &str) -> Option<(String, u16)> {
    let server = server.trim();
    let (host, port) = match server.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once("]:")?;
            (host, port)
        }
        None => {
            let (host, port) = server.rsplit_once(':')?;
            if host.contains(':') && host.parse::<IpAddr>().is_err() {
                return None;
            }
            (host, port)
        }
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0 && port.bytes().all(|b| b.is_ascii_digit()))?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The same name (DNS names are case-insensitive) or the same address however written.
fn same_host(listed: &str, offered: &str) -> bool {
    if listed.eq_ignore_ascii_case(offered) {
        return true;
    }
    match (listed.parse::<IpAddr>(), offered.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => false,
    }
}

fn server_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{}]:{port}", shown(host))
    } else {
        format!("{}:{port}", shown(host))
    }
}

fn check_bridge(
    nic: usize,
    vif: &VifSpec,
    allowed: Option<&[String]>,
    host: &dyn HostProbe,
) -> Result<(), Refusal> {
    // check_vif_fields made sure there is a valid name.
    let bridge = vif.bridge.clone().unwrap_or_default();
    if let Some(allowed) = allowed {
        if !allowed.contains(&bridge) {
            return Err(Refusal::BridgeNotAllowed { nic, bridge });
        }
    }
    if !host.bridge_exists(&bridge) {
        return Err(Refusal::BridgeMissing { nic, bridge });
    }
    Ok(())
}

/// An io error without Rust's ` (os error N)` suffix.
fn error_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Untrusted text for a one-line message: control characters escaped, at most
/// [`SHOWN_MAX`] characters.
fn shown(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn shown_path(path: &Path) -> String {
    shown(&path.to_string_lossy())
}

/// [`shown`] in single quotes.
fn quote(text: &str) -> String {
    format!("'{}'", shown(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tern_config::{Action, MacAddr};
    use tern_migration::CpuidEntry;
    use tern_snapshot::{CpuFeatureWord, Info};

    /// Leaf 7 EBX bit 16.
    const AVX512F: (u32, u32, [u32; 4]) = (0x7, 0, [0, 1 << 16, 0, 0]);
    /// Leaf 1 EDX bits 25, 26.
    const SSE2: (u32, u32, [u32; 4]) = (0x1, 0, [0, 0, 0, (1 << 25) | (1 << 26)]);

    struct FakeHost {
        features: Result<Vec<(u32, u32, [u32; 4])>, String>,
        bridges: Vec<&'static str>,
        memory_mib: Option<u64>,
    }

    impl Default for FakeHost {
        fn default() -> Self {
            FakeHost {
                features: Ok(vec![SSE2, AVX512F]),
                bridges: vec!["br0", "br1"],
                memory_mib: Some(4096),
            }
        }
    }

    impl HostProbe for FakeHost {
        fn offered_cpu_features(
            &self,
            _hidden: &[String],
        ) -> Result<Vec<(u32, u32, [u32; 4])>, String> {
            self.features.clone()
        }

        fn bridge_exists(&self, name: &str) -> bool {
            self.bridges.contains(&name)
        }

        fn available_memory_mib(&self) -> Option<u64> {
            self.memory_mib
        }
    }

    /// A storage directory with a kernel and a disk image in it, and a file beside it.
    struct Fixture {
        dir: tempfile::TempDir,
        relocation: RelocationConfig,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let storage = dir.path().join("storage");
            std::fs::create_dir(&storage).unwrap();
            std::fs::create_dir(storage.join("sub")).unwrap();
            for f in ["vmlinux", "initrd", "web.img", "sub/data.img"] {
                std::fs::write(storage.join(f), b"x").unwrap();
            }
            std::fs::write(dir.path().join("secret"), b"x").unwrap();
            let relocation = RelocationConfig {
                storage: vec![storage],
                nbd_servers: vec!["10.77.0.200:10809".into(), "[fd00::2]:10809".into()],
                ..RelocationConfig::default()
            };
            Fixture { dir, relocation }
        }

        fn storage(&self) -> PathBuf {
            self.dir.path().join("storage")
        }

        fn config(&self) -> DomainConfig {
            let s = self.storage();
            DomainConfig {
                name: "web".into(),
                uuid: Some("cc0029f5-10a1-e6d0-3c92-19b0ea021f21".parse().unwrap()),
                memory_mib: 256,
                vcpus: 2,
                kernel: Some(s.join("vmlinux")),
                ramdisk: Some(s.join("initrd")),
                cmdline: "console=ttyS0".into(),
                disks: vec![
                    disk(DiskBackend::File(s.join("web.img")), "xvda"),
                    disk(
                        DiskBackend::Nbd {
                            host: "10.77.0.200".into(),
                            port: 10809,
                            export: Some("data".into()),
                        },
                        "xvdb",
                    ),
                ],
                vifs: vec![VifSpec {
                    mac: Some(MacAddr([0x02, 0x54, 0, 0, 0, 1])),
                    bridge: Some("br0".into()),
                    ip: Some("10.77.0.10".into()),
                    model: Some("virtio".into()),
                }],
                on_poweroff: Action::Destroy,
                on_reboot: Action::Restart,
                on_crash: Action::Preserve,
            }
        }

        fn admit(&self, offer: &Offer) -> Result<DomainConfig, Refusal> {
            self.admit_on(offer, &FakeHost::default())
        }

        fn admit_on(&self, offer: &Offer, host: &FakeHost) -> Result<DomainConfig, Refusal> {
            let policy = IncomingPolicy {
                relocation: &self.relocation,
                hidden_cpu_features: &[],
            };
            admit_offer_on(&policy, offer, host)
        }

        /// The refusal of an offer of `config`, checked to be one line.
        fn refusal(&self, config: &DomainConfig) -> String {
            let e = self.admit(&offer(config)).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
            e
        }

        /// The refusal of the fixture's config with `change` made to it.
        fn refused(&self, change: impl FnOnce(&mut DomainConfig)) -> String {
            let mut config = self.config();
            change(&mut config);
            self.refusal(&config)
        }

        fn admits(&self, change: impl FnOnce(&mut DomainConfig)) {
            let mut config = self.config();
            change(&mut config);
            let admitted = self.admit(&offer(&config));
            assert_eq!(admitted.unwrap(), config);
        }
    }

    fn disk(backend: DiskBackend, vdev: &str) -> DiskSpec {
        DiskSpec {
            backend,
            vdev: vdev.into(),
            writable: true,
        }
    }

    /// A sound offer of `config`: its description agrees with it.
    fn offer(config: &DomainConfig) -> Offer {
        let cpuid = vec![
            CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0,
                ebx: 0,
                ecx: 1 << 31,
                edx: SSE2.2[3],
            };
            1
        ];
        Offer {
            protocol: PROTOCOL_VERSION,
            stream_format: tern_snapshot::FORMAT_VERSION,
            migration_id: "6f1c1d5e-0f43-4d38-9a55-3f1a0b1f7c11".into(),
            live: true,
            postcopy: false,
            copy_disks: vec![],
            info: Info {
                tern_version: "0.1.0".into(),
                created_unix: 0,
                host: "host1".into(),
                guest_name: config.name.clone(),
                guest_uuid: config.uuid.map(|u| u.to_string()).unwrap_or_default(),
                memory_bytes: config.memory_mib.wrapping_shl(20),
                vcpus: config.vcpus,
                cpu_features: vec![CpuFeatureWord {
                    leaf: 1,
                    subleaf: 0,
                    regs: SSE2.2,
                }],
            },
            config: serde_json::to_value(config).unwrap(),
            vcpu_cpuid: vec![cpuid; config.vcpus.min(255) as usize],
        }
    }

    /// An offer of `config` copying its disk `vdev` from `path` on the source (size 1 MiB).
    fn copying(config: &DomainConfig, vdev: &str, source_path: &str) -> Offer {
        let mut config = config.clone();
        for d in config.disks.iter_mut().filter(|d| d.vdev == vdev) {
            d.backend = DiskBackend::File(source_path.into());
        }
        Offer {
            copy_disks: vec![tern_migration::CopiedDisk {
                vdev: vdev.into(),
                size: 1 << 20,
                allocated: 4096,
            }],
            ..offer(&config)
        }
    }

    /// `--copy-storage`: the copied disk goes into this host's storage directory under its
    /// file name on the source, wherever it was there; the other disks are checked as ever.
    #[test]
    fn a_copied_disk_is_placed_in_this_hosts_storage() {
        let f = Fixture::new();
        let offer = copying(&f.config(), "xvda", "/var/lib/elsewhere/db.img");
        let admitted = f.admit(&offer).unwrap();
        assert_eq!(
            admitted.disks[0].backend,
            DiskBackend::File(std::fs::canonicalize(f.storage()).unwrap().join("db.img"))
        );
        assert_eq!(admitted.disks[1], f.config().disks[1]);
    }

    #[test]
    fn copied_disks_that_clash_do_not_fit_or_are_not_files_are_refused() {
        let f = Fixture::new();
        let config = f.config();
        let e = f
            .admit(&copying(&config, "xvda", "/src/web.img"))
            .unwrap_err();
        assert!(matches!(e, Refusal::CopiedDiskExists { .. }), "{e}");
        let mut old = copying(&config, "xvda", "/src/db.img");
        old.protocol = 2;
        let e = f.admit(&old).unwrap_err();
        assert!(
            matches!(e, Refusal::CopyStorageVersion { theirs: 2 }),
            "{e}"
        );
        let nbd = Offer {
            copy_disks: vec![tern_migration::CopiedDisk {
                vdev: "xvdb".into(),
                size: 1 << 20,
                allocated: 0,
            }],
            ..offer(&config)
        };
        let e = f.admit(&nbd).unwrap_err().to_string();
        assert!(e.contains("only file: disks"), "{e}");
        let mut huge = copying(&config, "xvda", "/src/db.img");
        huge.copy_disks[0].size = 1 << 50;
        huge.copy_disks[0].allocated = 1 << 50;
        assert!(f.admit(&huge).is_err());
        let mut full = copying(&config, "xvda", "/src/db.img");
        full.copy_disks[0].size = 63 << 40;
        full.copy_disks[0].allocated = 63 << 40;
        let e = f.admit(&full).unwrap_err();
        assert!(matches!(e, Refusal::NoRoomForDisks { .. }), "{e}");
        let mut odd = copying(&config, "xvda", "/src/db.img");
        odd.copy_disks[0].size = 1000;
        assert!(f.admit(&odd).is_err());
        let hidden = copying(&config, "xvda", "/src/.db.img");
        assert!(f.admit(&hidden).is_err());
        let mut unknown = copying(&config, "xvda", "/src/db.img");
        unknown.copy_disks[0].vdev = "xvdz".into();
        assert!(f.admit(&unknown).is_err());
        let nowhere = Fixture {
            relocation: RelocationConfig {
                storage: vec![],
                ..f.relocation.clone()
            },
            dir: tempfile::tempdir().unwrap(),
        };
        let mut lone = config.clone();
        lone.kernel = None;
        lone.ramdisk = None;
        lone.disks.truncate(1);
        let e = nowhere
            .admit(&copying(&lone, "xvda", "/src/db.img"))
            .unwrap_err();
        assert!(matches!(e, Refusal::NoDiskStorage { .. }), "{e}");
    }

    #[test]
    fn a_sound_offer_is_admitted() {
        let f = Fixture::new();
        f.admits(|_| {});
        // No kernel, ramdisk, disks or interfaces: nothing to check on this host.
        f.admits(|c| {
            c.kernel = None;
            c.ramdisk = None;
            c.disks.clear();
            c.vifs.clear();
        });
    }

    #[test]
    fn versions_and_migration_id() {
        let f = Fixture::new();
        let mut o = offer(&f.config());
        o.protocol = 999;
        o.stream_format = 999;
        let e = f.admit(&o).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("this host speaks relocation protocol versions 1 to {PROTOCOL_VERSION}, the source version 999")
        );
        assert!(e.contains("protocol version"));
        // Post-copy needs version 2, and a live migration; version 1 is still taken.
        o.stream_format = tern_snapshot::FORMAT_VERSION;
        o.protocol = 1;
        f.admit(&o).expect("a migration of the previous protocol");
        o.postcopy = true;
        let e = f.admit(&o).unwrap_err().to_string();
        assert!(e.contains("post-copy") && e.contains("version 1"), "{e}");
        o.protocol = PROTOCOL_VERSION;
        f.admit(&o).expect("a post-copy offer");
        o.live = false;
        let e = f.admit(&o).unwrap_err().to_string();
        assert!(e.contains("not live"), "{e}");
        o.live = true;
        o.postcopy = false;
        o.stream_format = 999;
        let e = f.admit(&o).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "this host (tern {}) reads migration stream format versions 1 to {}, the source (tern {}) sends version 999",
                env!("CARGO_PKG_VERSION"),
                tern_snapshot::FORMAT_VERSION,
                o.info.tern_version
            )
        );
        // The previous release's format is accepted.
        o.stream_format = tern_snapshot::OLDEST_FORMAT_VERSION;
        f.admit(&o).expect("a stream of the previous format");
        o.stream_format = tern_snapshot::FORMAT_VERSION;
        for bad in ["", "../../etc/passwd", "from-the-future", &"a".repeat(65)] {
            o.migration_id = bad.into();
            let e = f.admit(&o).unwrap_err().to_string();
            assert_eq!(e, "the offer's migration ID is not a UUID", "{bad}");
        }
    }

    #[test]
    fn only_the_source_resumes_its_post_copy() {
        let pinned = LinkSecurity::Tls {
            cert_file: "/c".into(),
            key_file: "/k".into(),
            trusted: vec!["sha256:aa".into()],
            ca_file: None,
        };
        assert!(admit_resume("m", Some("sha256:aa"), &pinned).is_ok());
        let e = admit_resume("m", Some("sha256:bb"), &pinned).unwrap_err();
        assert_eq!(
            e.to_string(),
            "migration m may be resumed only by the host that started it"
        );
        assert!(admit_resume("m", None, &pinned).is_err());
        assert!(admit_resume("m", None, &LinkSecurity::Insecure).is_ok());
        assert!(admit_resume("m", Some("sha256:aa"), &LinkSecurity::Insecure).is_err());
    }

    #[test]
    fn a_malformed_config_is_refused() {
        let f = Fixture::new();
        let mut o = offer(&f.config());
        o.config = serde_json::json!({});
        let e = f.admit(&o).unwrap_err().to_string();
        assert!(
            e.starts_with("the offered guest config is malformed: "),
            "{e}"
        );
        o.config = serde_json::json!({"name": "web\n"});
        assert!(matches!(f.admit(&o), Err(Refusal::MalformedConfig(_))));
    }

    #[test]
    fn the_offer_must_agree_with_itself() {
        let f = Fixture::new();
        let config = f.config();
        let contradicts = |change: &dyn Fn(&mut Offer), detail: &str| {
            let mut o = offer(&config);
            change(&mut o);
            let e = f.admit(&o).unwrap_err().to_string();
            assert!(e.starts_with("the offer contradicts itself: "), "{e}");
            assert!(e.contains(detail), "{e}");
        };
        contradicts(&|o| o.info.guest_name = "other".into(), "'other'");
        contradicts(
            &|o| o.info.guest_uuid = "00000000-0000-0000-0000-000000000001".into(),
            "00000000-0000-0000-0000-000000000001",
        );
        contradicts(&|o| o.info.guest_uuid = "nonsense".into(), "'nonsense'");
        contradicts(&|o| o.info.memory_bytes += 4096, "256 MiB");
        contradicts(&|o| o.info.vcpus = 4, "2 vCPUs");
        contradicts(&|o| o.vcpu_cpuid.truncate(1), "the CPUID of 1");
        let mut no_uuid = config.clone();
        no_uuid.uuid = None;
        assert!(f.refusal(&no_uuid).contains("its config has no UUID"));
        // An upper-case UUID in the description is the same UUID.
        let mut o = offer(&config);
        o.info.guest_uuid = o.info.guest_uuid.to_uppercase();
        assert!(f.admit(&o).is_ok());
    }

    #[test]
    fn the_description_is_bounded() {
        let f = Fixture::new();
        let config = f.config();
        let mut o = offer(&config);
        o.info.host = "evil\nhost".into();
        let e = f.admit(&o).unwrap_err().to_string();
        assert_eq!(
            e,
            "the offer is malformed: the source's host name 'evil\\nhost' is not plain text"
        );
        let mut o = offer(&config);
        o.vcpu_cpuid[1] = vec![o.vcpu_cpuid[1][0]; 257];
        let e = f.admit(&o).unwrap_err().to_string();
        assert_eq!(
            e,
            "the offer is malformed: vCPU 1 has 257 CPUID entries (at most 256)"
        );
        let mut o = offer(&config);
        o.vcpu_cpuid = vec![vec![]; 1000];
        assert!(matches!(f.admit(&o), Err(Refusal::MalformedOffer(_))));
    }

    #[test]
    fn names() {
        let f = Fixture::new();
        for bad in [
            "",
            "-a",
            ".a",
            "..",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\nb",
        ] {
            let e = f.refused(|c| c.name = bad.into());
            assert!(e.starts_with("the offered guest's name "), "{e}");
            assert!(e.ends_with("do not start with '-' or '.'"), "{e}");
        }
        assert!(f.refused(|c| c.name = "a\nb".into()).contains("'a\\nb'"));
        f.admits(|c| c.name = "x".repeat(64));
        f.admits(|c| c.name = "web-01.example_2".into());
    }

    #[test]
    fn memory_and_vcpus() {
        let f = Fixture::new();
        for mib in [0, 15, 1_048_577, u64::MAX >> 10, u64::MAX] {
            let e = f.refused(|c| c.memory_mib = mib);
            assert_eq!(
                e,
                format!(
                    "the offered guest has {mib} MiB of memory; a guest may have 16 to 1048576 MiB"
                )
            );
        }
        f.admits(|c| c.memory_mib = 16);
        for vcpus in [0, 256, u32::MAX] {
            let e = f.refused(|c| c.vcpus = vcpus);
            assert_eq!(
                e,
                format!("the offered guest has {vcpus} vCPUs; a guest may have 1 to 255")
            );
        }
        f.admits(|c| c.vcpus = 1);
    }

    #[test]
    fn command_line() {
        let f = Fixture::new();
        assert_eq!(
            f.refused(|c| c.cmdline = "x".repeat(CMDLINE_MAX + 1)),
            "the offered guest's kernel command line is 4096 bytes (at most 4095)"
        );
        f.admits(|c| c.cmdline = "x".repeat(CMDLINE_MAX));
        assert_eq!(
            f.refused(|c| c.cmdline = "quiet\0init=/bin/sh".into()),
            "the offered guest's kernel command line 'quiet\\u{0}init=/bin/sh' contains a NUL byte"
        );
        f.admits(|c| c.cmdline = "console=hvc0\tquiet\nro".into());
    }

    #[test]
    fn device_counts_and_vdevs() {
        let f = Fixture::new();
        let e = f.refused(|c| {
            for i in 0..8 {
                c.vifs.push(VifSpec {
                    mac: Some(MacAddr([2, 0, 0, 0, 1, i])),
                    ..c.vifs[0].clone()
                });
            }
        });
        assert_eq!(
            e,
            "the offered guest has 2 disks and 9 network interfaces; a guest may have at most 8 devices"
        );
        for bad in ["", "1xvda", "xv/da", "xvda ", &"x".repeat(17)] {
            let e = f.refused(|c| c.disks[0].vdev = bad.into());
            assert_eq!(
                e,
                format!("disk '{bad}' is not a valid vdev (1 to 16 letters then letters or digits, like xvda)")
            );
        }
        assert_eq!(
            f.refused(|c| c.disks[1].vdev = "xvda".into()),
            "disk vdev xvda is used twice"
        );
    }

    #[test]
    fn network_interfaces() {
        let f = Fixture::new();
        let vif = |change: &dyn Fn(&mut VifSpec)| f.refused(|c| change(&mut c.vifs[0]));
        assert_eq!(
            vif(&|v| v.mac = Some(MacAddr([1, 0, 0x5e, 0, 0, 1]))),
            "network interface 0: MAC address 01:00:5e:00:00:01 is multicast"
        );
        assert_eq!(
            vif(&|v| v.mac = Some(MacAddr([0xff; 6]))),
            "network interface 0: MAC address ff:ff:ff:ff:ff:ff is multicast"
        );
        assert_eq!(
            vif(&|v| v.mac = Some(MacAddr([0; 6]))),
            "network interface 0: MAC address 00:00:00:00:00:00 is all zero"
        );
        assert_eq!(
            vif(&|v| v.mac = None),
            "network interface 0: has no MAC address (a running guest's interfaces have one)"
        );
        assert_eq!(
            vif(&|v| v.bridge = None),
            "network interface 0: names no bridge"
        );
        assert!(vif(&|v| v.bridge = Some("../br0".into())).contains("'/'"));
        assert!(vif(&|v| v.bridge = Some("averyveryverylongbridge".into())).contains("15 bytes"));
        assert_eq!(
            vif(&|v| v.ip = Some("10.0.0.1,script=x".into())),
            "network interface 0: ip '10.0.0.1,script=x' is not acceptable"
        );
        assert_eq!(
            vif(&|v| v.model = Some("e1000 x".into())),
            "network interface 0: model 'e1000 x' is not acceptable"
        );
        let e = f.refused(|c| {
            let second = c.vifs[0].clone();
            c.vifs.push(second);
        });
        assert_eq!(
            e,
            "network interface 1: MAC address 02:54:00:00:00:01 is used twice"
        );
    }

    #[test]
    fn bridges_must_be_allowed_and_exist() {
        let mut f = Fixture::new();
        // No list: every bridge of this host.
        f.admits(|c| c.vifs[0].bridge = Some("br1".into()));
        assert_eq!(
            f.refused(|c| c.vifs[0].bridge = Some("br9".into())),
            "network interface 0: bridge br9 does not exist on this host"
        );
        f.relocation.bridges = Some(vec!["br0".into(), "br9".into()]);
        f.admits(|_| {});
        assert_eq!(
            f.refused(|c| c.vifs[0].bridge = Some("br1".into())),
            "network interface 0: bridge br1 is not one this host gives incoming guests ([relocation] bridges)"
        );
        // Listed, but not there.
        assert_eq!(
            f.refused(|c| c.vifs[0].bridge = Some("br9".into())),
            "network interface 0: bridge br9 does not exist on this host"
        );
        f.relocation.bridges = Some(vec![]);
        assert!(f.refused(|_| {}).contains("bridge br0 is not one"));
        f.admits(|c| c.vifs.clear());
    }

    #[test]
    fn file_disks_must_be_inside_a_storage_directory() {
        let f = Fixture::new();
        let s = f.storage();
        let file = |path: PathBuf| {
            move |c: &mut DomainConfig| c.disks[0].backend = DiskBackend::File(path)
        };
        f.admits(file(s.join("sub/data.img")));
        // A storage entry written another way is the same directory.
        let mut g = Fixture::new();
        let other = g.storage();
        g.relocation.storage = vec![other.join("sub/..").join(".")];
        g.admits(|_| {});

        assert_eq!(
            f.refused(file("/etc/shadow".into())),
            "disk xvda: /etc/shadow is outside this host's storage for incoming guests ([relocation] storage)"
        );
        let secret = f.dir.path().join("secret");
        let outside = |p: &Path| {
            format!(
                "disk xvda: {} is outside this host's storage for incoming guests ([relocation] storage)",
                p.display()
            )
        };
        assert_eq!(f.refused(file(secret.clone())), outside(&secret));
        // `..` out of the storage.
        let dotdot = s.join("../secret");
        assert_eq!(f.refused(file(dotdot.clone())), outside(&dotdot));
        let dotdot = s.join("sub/../../secret");
        assert_eq!(f.refused(file(dotdot.clone())), outside(&dotdot));
        // A symlink in the storage that leads out of it, to a file or a directory.
        let link = s.join("escape.img");
        symlink(&secret, &link).unwrap();
        assert_eq!(f.refused(file(link.clone())), outside(&link));
        symlink(f.dir.path(), s.join("up")).unwrap();
        let through = s.join("up/secret");
        assert_eq!(f.refused(file(through.clone())), outside(&through));
        // A symlink that stays inside is fine.
        symlink(s.join("web.img"), s.join("alias.img")).unwrap();
        f.admits(file(s.join("alias.img")));
        // `..` that stays inside is fine.
        f.admits(file(s.join("sub/../web.img")));
        // A missing file outside is refused as outside: whether it exists is not said.
        let missing = f.dir.path().join("nope.img");
        assert_eq!(f.refused(file(missing.clone())), outside(&missing));
        // Inside, the refusal says why.
        let missing = s.join("gone.img");
        assert_eq!(
            f.refused(file(missing.clone())),
            format!(
                "disk xvda: cannot use {} on this host: No such file or directory",
                missing.display()
            )
        );
        // The storage directory itself, or one inside it, is not a disk.
        assert_eq!(f.refused(file(s.clone())), outside(&s));
        assert_eq!(
            f.refused(file(s.join("sub"))),
            format!(
                "disk xvda: {} is not a regular file",
                s.join("sub").display()
            )
        );
        assert_eq!(
            f.refused(file("web.img".into())),
            "disk xvda: web.img is not an absolute path"
        );
        // A sibling whose name starts like the storage directory is not inside it.
        let sibling = f.dir.path().join("storage2");
        std::fs::create_dir(&sibling).unwrap();
        std::fs::write(sibling.join("a.img"), b"x").unwrap();
        assert_eq!(
            f.refused(file(sibling.join("a.img"))),
            outside(&sibling.join("a.img"))
        );
    }

    #[test]
    fn without_storage_no_file_or_device_is_admitted() {
        let mut f = Fixture::new();
        f.relocation.storage.clear();
        let image = f.storage().join("web.img");
        assert_eq!(
            f.refused(|c| {
                c.kernel = None;
                c.ramdisk = None;
            }),
            format!(
                "disk xvda: {}: this host has no storage for incoming guests; add its directory to [relocation] storage on this host",
                image.display()
            )
        );
        let e = f.refused(|c| {
            c.kernel = None;
            c.ramdisk = None;
            c.disks[0].backend = DiskBackend::Phy("/dev/sda".into());
        });
        assert_eq!(
            e,
            "disk xvda: /dev/sda: this host has no storage for incoming guests; add the device to [relocation] storage on this host"
        );
        assert!(f.refused(|_| {}).starts_with("kernel: "));
        // NBD and no disk at all are still fine.
        f.admits(|c| {
            c.kernel = None;
            c.ramdisk = None;
            c.disks.remove(0);
        });
    }

    #[test]
    fn kernel_and_ramdisk_must_be_inside_storage() {
        let f = Fixture::new();
        assert_eq!(
            f.refused(|c| c.kernel = Some("/boot/vmlinuz".into())),
            "kernel /boot/vmlinuz is outside this host's storage for incoming guests ([relocation] storage), and the guest boots from it if it reboots here"
        );
        let secret = f.dir.path().join("secret");
        assert_eq!(
            f.refused(|c| c.ramdisk = Some(f.storage().join("../secret"))),
            format!(
                "ramdisk {} is outside this host's storage for incoming guests ([relocation] storage), and the guest boots from it if it reboots here",
                f.storage().join("../secret").display()
            )
        );
        symlink(&secret, f.storage().join("k")).unwrap();
        assert!(f
            .refused(|c| c.kernel = Some(f.storage().join("k")))
            .starts_with("kernel "));
        assert_eq!(
            f.refused(|c| c.kernel = Some("vmlinux".into())),
            "kernel: vmlinux is not an absolute path"
        );
        f.admits(|c| c.ramdisk = None);
    }

    #[test]
    fn phy_disks_must_be_listed_block_devices() {
        let mut f = Fixture::new();
        let s = f.storage();
        let phy =
            |path: PathBuf| move |c: &mut DomainConfig| c.disks[0].backend = DiskBackend::Phy(path);
        assert_eq!(
            f.refused(phy("/dev/sda".into())),
            "disk xvda: block device /dev/sda is not listed in this host's storage for incoming guests ([relocation] storage)"
        );
        // In a storage directory is not enough: devices are listed one by one.
        let image = s.join("web.img");
        assert_eq!(
            f.refused(phy(image.clone())),
            format!(
                "disk xvda: block device {} is not listed in this host's storage for incoming guests ([relocation] storage)",
                image.display()
            )
        );
        // Listed, but not a block device (a file, a directory).
        f.relocation.storage.push(image.clone());
        assert_eq!(
            f.refused(phy(image.clone())),
            format!("disk xvda: phy:{} is not a block device", image.display())
        );
        assert_eq!(
            f.refused(phy(s.clone())),
            format!("disk xvda: phy:{} is not a block device", s.display())
        );
        // Listed and gone.
        let gone = f.dir.path().join("gone");
        f.relocation.storage.push(gone.clone());
        assert_eq!(
            f.refused(phy(gone.clone())),
            format!(
                "disk xvda: cannot use {} on this host: No such file or directory",
                gone.display()
            )
        );
        // A block device, when this machine has one to look at (no root needed to stat it).
        let loop0 = PathBuf::from("/dev/loop0");
        let is_block = std::fs::metadata(&loop0).is_ok_and(|m| m.file_type().is_block_device());
        if is_block {
            assert!(f.refused(phy(loop0.clone())).contains("is not listed"));
            f.relocation.storage.push(loop0.clone());
            f.admits(phy(loop0.clone()));
            // Reached through a symlink, it is the same device.
            let link = s.join("vol");
            symlink(&loop0, &link).unwrap();
            f.admits(phy(link.clone()));
            // But not as a file: a file disk is a regular file.
            f.relocation.storage.push("/dev".into());
            assert_eq!(
                f.refused(|c| c.disks[0].backend = DiskBackend::File(loop0.clone())),
                "disk xvda: /dev/loop0 is not a regular file"
            );
        }
    }

    #[test]
    fn nbd_servers_must_be_listed() {
        let mut f = Fixture::new();
        let nbd = |host: &str, port: u16| {
            let host = host.to_string();
            move |c: &mut DomainConfig| {
                c.disks[1].backend = DiskBackend::Nbd {
                    host,
                    port,
                    export: None,
                }
            }
        };
        f.admits(nbd("10.77.0.200", 10809));
        f.admits(nbd("fd00::2", 10809));
        f.admits(nbd("fd00:0::0:2", 10809));
        assert_eq!(
            f.refused(nbd("10.77.0.200", 10810)),
            "disk xvdb: NBD server 10.77.0.200:10810 is not one this host lets incoming guests use ([relocation] nbd_servers)"
        );
        assert_eq!(
            f.refused(nbd("10.77.0.201", 10809)),
            "disk xvdb: NBD server 10.77.0.201:10809 is not one this host lets incoming guests use ([relocation] nbd_servers)"
        );
        assert!(f
            .refused(nbd("fd00::3", 10809))
            .contains("NBD server [fd00::3]:10809 is not one"));
        // Names are compared as written, not resolved.
        assert!(f
            .refused(nbd("storage.lab", 10809))
            .contains("storage.lab:10809"));
        f.relocation.nbd_servers.push("Storage.Lab:10809".into());
        f.admits(nbd("storage.lab", 10809));
        f.relocation.nbd_servers = vec!["::ffff:10.77.0.200:10809".into()];
        f.admits(nbd("10.77.0.200", 10809));
        f.relocation.nbd_servers.clear();
        assert!(f.refused(nbd("10.77.0.200", 10809)).contains("nbd_servers"));
        assert_eq!(
            f.refused(nbd("a b", 10809)),
            "disk xvdb: NBD server 'a b' is not host:port"
        );
        let e = f.refused(|c| {
            c.disks[1].backend = DiskBackend::Nbd {
                host: "10.77.0.200".into(),
                port: 10809,
                export: Some("x\ny".into()),
            }
        });
        assert_eq!(e, "disk xvdb: NBD export name 'x\\ny' is not acceptable");
    }

    #[test]
    fn servers_parse() {
        assert_eq!(parse_server("h:1"), Some(("h".into(), 1)));
        assert_eq!(parse_server("[::1]:10809"), Some(("::1".into(), 10809)));
        assert_eq!(parse_server("::1:10809"), Some(("::1".into(), 10809)));
        for bad in [
            "",
            "h",
            "h:0",
            "h:+1",
            ":1",
            "[::1]",
            "fe80::x:1",
            "h:70000",
        ] {
            assert_eq!(parse_server(bad), None, "{bad}");
        }
    }

    #[test]
    fn cpu_features_missing_here() {
        let f = Fixture::new();
        let config = f.config();
        let without_avx512 = FakeHost {
            features: Ok(vec![SSE2]),
            ..FakeHost::default()
        };
        assert!(f.admit_on(&offer(&config), &without_avx512).is_ok());
        // Named in the description.
        let mut o = offer(&config);
        o.info.cpu_features.push(CpuFeatureWord {
            leaf: AVX512F.0,
            subleaf: AVX512F.1,
            regs: AVX512F.2,
        });
        assert!(f.admit(&o).is_ok());
        let e = f.admit_on(&o, &without_avx512).unwrap_err().to_string();
        assert_eq!(
            e,
            "this host's CPU lacks features the guest was started with: avx512f"
        );
        assert!(e.contains("lacks features"));
        // Only in the vCPUs' CPUID, which the machine here is built with.
        let mut o = offer(&config);
        for cpuid in &mut o.vcpu_cpuid {
            cpuid.push(CpuidEntry {
                function: 7,
                index: 0,
                flags: 1,
                eax: 0,
                ebx: 1 << 16,
                ecx: 0,
                edx: 0,
            });
        }
        let e = f.admit_on(&o, &without_avx512).unwrap_err().to_string();
        assert_eq!(
            e,
            "this host's CPU lacks features the guest was started with: avx512f"
        );
        let broken = FakeHost {
            features: Err("cannot open /dev/kvm".into()),
            ..FakeHost::default()
        };
        assert_eq!(
            f.admit_on(&offer(&config), &broken)
                .unwrap_err()
                .to_string(),
            "this host cannot tell which CPU features it offers: cannot open /dev/kvm"
        );
    }

    #[test]
    fn the_config_must_read_back() {
        let f = Fixture::new();
        // A bridge name that check_vif_fields lets through, but xl.cfg cannot carry.
        let e = f.refused(|c| c.vifs[0].bridge = Some("br,0".into()));
        assert!(
            e.starts_with(
                "the offered guest config is not one this host would accept from a file: "
            ),
            "{e}"
        );
    }

    #[test]
    fn warnings_about_the_policy() {
        let f = Fixture::new();
        let mut r = f.relocation.clone();
        assert!(policy_warnings(&r).is_empty(), "{:?}", policy_warnings(&r));
        r.storage.push("relative".into());
        r.storage.push(f.dir.path().join("secret"));
        r.storage.push(f.dir.path().join("none"));
        r.nbd_servers.push("storage".into());
        r.bridges = Some(vec!["a/b".into()]);
        let w = policy_warnings(&r);
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(w[0].contains("relative is not an absolute path"), "{w:?}");
        assert!(
            w[1].contains("neither a directory nor a block device"),
            "{w:?}"
        );
        assert!(w[2].contains("No such file or directory"), "{w:?}");
        assert!(w[3].contains("'storage' is not host:port"), "{w:?}");
        assert!(w[4].starts_with("[relocation] bridges: "), "{w:?}");
    }

    /// Residents `web` (ID 1, 256 MiB, running) and `old` (ID 2, 512 MiB, ended).
    fn residents() -> Vec<Resident<'static>> {
        vec![
            Resident {
                id: 1,
                name: "web",
                uuid: "cc0029f5-10a1-e6d0-3c92-19b0ea021f21",
                memory_mib: 256,
                holds_memory: true,
            },
            Resident {
                id: 2,
                name: "old",
                uuid: "00000000-0000-0000-0000-000000000002",
                memory_mib: 512,
                holds_memory: false,
            },
        ]
    }

    #[test]
    fn a_new_guest_needs_its_own_name_and_uuid() {
        let f = Fixture::new();
        let mut config = f.config();
        let e = admit_beside(
            &config,
            "cc0029f5-10a1-e6d0-3c92-19b0ea021f21",
            &residents(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "a domain with UUID cc0029f5-10a1-e6d0-3c92-19b0ea021f21 is already running on this host ('web')"
        );
        let uuid = "11111111-1111-1111-1111-111111111111";
        let e = admit_beside(&config, uuid, &residents(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "a domain named 'web' already exists on this host (ID 1)");
        config.name = "db".into();
        assert!(admit_beside(&config, uuid, &residents(), None).is_ok());
    }

    #[test]
    fn guest_memory_counts_only_guests_that_hold_it() {
        let f = Fixture::new();
        let mut config = f.config();
        config.name = "db".into();
        let uuid = "11111111-1111-1111-1111-111111111111";
        // 256 MiB used by web; old has ended.
        assert!(admit_beside(&config, uuid, &residents(), Some(512)).is_ok());
        let e = admit_beside(&config, uuid, &residents(), Some(500))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "not enough memory for guests on this host: the guest needs 256 MiB; 244 of the 500 MiB this host gives its guests are free"
        );
    }

    #[test]
    fn a_new_guest_needs_free_memory_and_its_devices() {
        let f = Fixture::new();
        let mut config = f.config();
        assert!(admit_on_host_with(&config, &[], &FakeHost::default()).is_ok());
        let small = FakeHost {
            memory_mib: Some(300),
            ..FakeHost::default()
        };
        let e = admit_on_host_with(&config, &[], &small)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "not enough free memory on this host: the guest needs 256 MiB plus 64 MiB overhead, 300 MiB are available"
        );
        let unknown = FakeHost {
            memory_mib: None,
            ..FakeHost::default()
        };
        assert!(admit_on_host_with(&config, &[], &unknown).is_ok());
        config.vifs[0].bridge = Some("br9".into());
        let e = admit_on_host_with(&config, &[], &FakeHost::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "network interface 0: bridge br9 does not exist on this host"
        );
        config.vifs[0].bridge = None;
        let e = admit_on_host_with(&config, &[], &FakeHost::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "network interface 0 names no bridge (vif = ['bridge=br0'])"
        );
        config.vifs.clear();
        config.disks[0].backend = DiskBackend::File(f.dir.path().join("none.img"));
        let e = admit_on_host_with(&config, &[], &FakeHost::default()).unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!(
                "disk xvda: cannot use {}: ",
                f.dir.path().join("none.img").display()
            )),
            "{e:#}"
        );
    }

    #[test]
    fn a_created_guest_needs_a_readable_kernel() {
        let f = Fixture::new();
        let mut config = f.config();
        assert!(admit_create(&config).is_ok());
        config.ramdisk = Some(f.dir.path().join("none"));
        let e = format!("{:#}", admit_create(&config).unwrap_err());
        assert!(e.starts_with("cannot read ramdisk "), "{e}");
        config.kernel = None;
        let e = admit_create(&config).unwrap_err().to_string();
        assert_eq!(e, "the config of 'web' names no kernel");
    }

    #[test]
    fn a_checkpoint_needs_a_uuid() {
        let f = Fixture::new();
        let mut config = f.config();
        let path = Path::new("/var/lib/tern/web.chk");
        assert!(admit_checkpoint(path, &config).is_ok());
        config.uuid = None;
        let e = admit_checkpoint(path, &config).unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot restore /var/lib/tern/web.chk: its guest config has no UUID"
        );
    }

    #[test]
    fn a_migration_id_is_taken_once() {
        let f = Fixture::new();
        let file = f.dir.path().join("m.json");
        assert!(admit_new_migration("m", &file).is_ok());
        std::fs::write(&file, b"{}").unwrap();
        let e = admit_new_migration("m", &file).unwrap_err().to_string();
        assert_eq!(e, "migration m was seen here before");
    }

    #[test]
    fn peers_are_let_in_by_address_or_confirmed_name() {
        let mut config = RelocationConfig::default();
        let ip: IpAddr = "10.77.0.100".parse().unwrap();
        assert!(admit_peer(&config, ip, || None).is_ok());
        config.hosts_allow = tern_config::HostsAllow::new([r"^src\.lab$"]).unwrap();
        assert!(admit_peer(&config, ip, || Some("src.lab".into())).is_ok());
        let e = admit_peer(&config, ip, || Some("other.lab".into())).unwrap_err();
        assert_eq!(
            e,
            "this host does not accept migrations from 10.77.0.100 (other.lab) (it is not in the relocation server's hosts_allow)"
        );
        let e = admit_peer(&config, ip, || None).unwrap_err();
        assert_eq!(
            e,
            "this host does not accept migrations from 10.77.0.100 (it is not in the relocation server's hosts_allow)"
        );
    }
}
