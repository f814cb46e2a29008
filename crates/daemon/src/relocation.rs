//! The relocation server: other hosts' daemons connect here to migrate guests to this host
//! (or to ask what became of a migration whose handover they did not see end).
//!
//! A peer must be allowed by `hosts_allow` (its address or reverse-resolved name). An offer is
//! checked before a single page is sent: protocol and stream versions, CPU features, memory,
//! no guest of that name or UUID here, the guest's bridges and disks. Then a guest process is
//! started with the connection, builds the machine, and the offer is accepted; the process
//! receives the guest directly from the source's guest process.

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_config::{DomainConfig, RelocationConfig};
use tern_migration::transport::{tune_tcp, Channel};
use tern_migration::{Offer, ToDestination, ToSource, PROTOCOL_VERSION};
use tern_vmm::record::{IncomingSpec, IncomingState};

use crate::guest_process::INCOMING_FD;
use crate::registry::{Launch, Registry};

/// How long a peer may take to say what it wants.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens for other hosts' daemons as `config` says.
pub fn start(config: &RelocationConfig, registry: Arc<Registry>) -> anyhow::Result<()> {
    let address = config.address.as_deref().unwrap_or("0.0.0.0");
    let listener = TcpListener::bind((address, config.port))
        .with_context(|| format!("cannot listen for migrations on {address}:{}", config.port))?;
    if config.hosts_allow.is_empty() {
        log::warn!(
            "relocation server on {address}:{}: hosts_allow is empty, so every host that can reach this port may migrate guests here",
            config.port
        );
    } else {
        log::info!(
            "relocation server on {address}:{}, for hosts matching {:?}",
            config.port,
            config.hosts_allow.patterns()
        );
    }
    let config = Arc::new(config.clone());
    std::thread::Builder::new()
        .name("relocation".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let (config, registry) = (config.clone(), registry.clone());
                        let _ = std::thread::Builder::new()
                            .name("relocation-peer".into())
                            .spawn(move || serve_peer(stream, &config, &registry));
                    }
                    Err(e) => log::warn!("relocation server: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

fn serve_peer(stream: TcpStream, config: &RelocationConfig, registry: &Arc<Registry>) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    if let Err(e) =
        tune_tcp(&stream).and_then(|()| stream.set_write_timeout(Some(FIRST_MESSAGE_TIMEOUT)))
    {
        log::warn!("relocation from {peer}: {e}");
        return;
    }
    let mut ch = Channel::new(stream);
    let first = match ch.receive::<ToDestination>(FIRST_MESSAGE_TIMEOUT) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("relocation from {peer}: {e}");
            return;
        }
    };
    if let Err(reason) = check_peer(config, peer.ip()) {
        log::warn!("refused relocation from {peer}: {reason}");
        let _ = ch.send(&ToSource::Refuse { reason });
        return;
    }
    match first {
        ToDestination::Query { migration_id } => {
            let outcome = registry.migration_outcome(&migration_id);
            log::info!("{peer} asked about migration {migration_id}: {outcome:?}");
            let _ = ch.send(&ToSource::Outcome { outcome });
        }
        ToDestination::Offer(offer) => {
            let reply = match accept(registry, &ch, *offer, peer) {
                Ok(domain_id) => ToSource::Accept { domain_id },
                Err(e) => {
                    let reason = format!("{e:#}");
                    log::warn!("refused a migration from {peer}: {reason}");
                    ToSource::Refuse { reason }
                }
            };
            let _ = ch.send(&reply);
        }
        ToDestination::Go { .. } => {
            let _ = ch.send(&ToSource::Refuse {
                reason: "Go without a migration".into(),
            });
        }
    }
}

/// Whether `hosts_allow` lets `ip` in: by address, or by the name its address resolves to.
fn check_peer(config: &RelocationConfig, ip: IpAddr) -> Result<(), String> {
    let addr = ip.to_string();
    if config.allows(&addr, None) {
        return Ok(());
    }
    let name = reverse_name(ip);
    if config.allows(&addr, name.as_deref()) {
        return Ok(());
    }
    Err(format!(
        "this host does not accept migrations from {addr}{} (it is not in the relocation server's hosts_allow)",
        name.map(|n| format!(" ({n})")).unwrap_or_default()
    ))
}

/// The name `ip` resolves to, if any.
fn reverse_name(ip: IpAddr) -> Option<String> {
    let addr = SocketAddr::new(ip, 0);
    let (storage, len) = sockaddr(&addr);
    let mut host = [0 as libc::c_char; 256];
    // SAFETY: getnameinfo reads `len` bytes of `storage` and writes at most `host.len()` bytes
    // (NUL included) into `host`.
    let r = unsafe {
        libc::getnameinfo(
            &storage as *const libc::sockaddr_storage as *const libc::sockaddr,
            len,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: on success getnameinfo wrote a NUL-terminated string into `host`.
    let name = unsafe { CStr::from_ptr(host.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific view is filled in.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Checks an offer and starts the guest process that receives the guest; the domain ID.
fn accept(
    registry: &Arc<Registry>,
    ch: &Channel<TcpStream>,
    offer: Offer,
    peer: SocketAddr,
) -> anyhow::Result<u32> {
    if ch.buffered() != 0 {
        bail!("the source sent data before its offer was accepted");
    }
    let config = check_offer(registry, &offer)?;
    log::info!(
        "accepting '{}' from {peer} (migration {}, {}, {} MiB)",
        config.name,
        offer.migration_id,
        if offer.live { "live" } else { "warm" },
        config.memory_mib
    );
    let state_file = registry.migration_file(&offer.migration_id);
    if state_file.exists() {
        bail!("migration {} was seen here before", offer.migration_id);
    }
    IncomingState::Receiving.store(&state_file)?;
    let spec = IncomingSpec {
        fd: INCOMING_FD,
        source: peer.ip().to_string(),
        state_file: state_file.clone(),
        offer,
    };
    let launch = Launch::Incoming {
        spec: Box::new(spec),
        fd: ch.transport().as_raw_fd(),
    };
    match registry.start_domain(config, false, launch) {
        Ok((id, _, _)) => Ok(id),
        Err(e) => {
            let _ = IncomingState::Aborted.store(&state_file);
            Err(e)
        }
    }
}

/// The checks that do not need a guest process: versions, the guest's description, CPU.
/// Name, UUID, memory and devices are checked as for any new domain.
fn check_offer(registry: &Registry, offer: &Offer) -> anyhow::Result<DomainConfig> {
    if offer.protocol != PROTOCOL_VERSION {
        bail!(
            "this host speaks relocation protocol version {PROTOCOL_VERSION}, the source version {}",
            offer.protocol
        );
    }
    if offer.stream_format != tern_snapshot::FORMAT_VERSION {
        bail!(
            "this host reads migration stream version {}, the source sends version {}",
            tern_snapshot::FORMAT_VERSION,
            offer.stream_format
        );
    }
    if offer.migration_id.is_empty()
        || offer.migration_id.len() > 64
        || !offer
            .migration_id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        bail!("the offer's migration ID is not a UUID");
    }
    let config: DomainConfig = serde_json::from_value(offer.config.clone())
        .map_err(|e| anyhow::anyhow!("the offered guest config is malformed: {e}"))?;
    let info = &offer.info;
    let uuid_matches = config.uuid.map(|u| u.to_string()) == Some(info.guest_uuid.clone());
    if !uuid_matches
        || config.name != info.guest_name
        || info.memory_bytes != config.memory_mib << 20
        || info.vcpus != config.vcpus
        || offer.vcpu_cpuid.len() != config.vcpus as usize
    {
        bail!("the offer contradicts itself (its config and its description differ)");
    }
    let offered = tern_machine::offered_features(&registry.policy().hidden_cpu_features)?;
    let wanted: Vec<(u32, u32, [u32; 4])> = info
        .cpu_features
        .iter()
        .map(|w| (w.leaf, w.subleaf, w.regs))
        .collect();
    let missing = tern_machine::cpuid::missing_features(&wanted, &offered);
    if !missing.is_empty() {
        bail!(
            "this host's CPU lacks features the guest was started with: {}",
            missing.join(", ")
        );
    }
    Ok(config)
}

/// The address of the relocation server `destination` names: `host`, `host:port`, `a.b.c.d`,
/// `[v6]:port`; the port is 8002 unless given.
pub fn resolve(destination: &str) -> anyhow::Result<SocketAddr> {
    const DEFAULT_PORT: u16 = 8002;
    if let Ok(addr) = destination.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = destination.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let (host, port) = match destination.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .with_context(|| format!("bad port in '{destination}'"))?,
        ),
        None => (destination, DEFAULT_PORT),
    };
    if host.is_empty() {
        bail!("no host in '{destination}'");
    }
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve '{host}'"))?
        .next()
        .with_context(|| format!("'{host}' has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_resolve_with_the_default_port() {
        assert_eq!(
            resolve("10.0.0.2").unwrap(),
            "10.0.0.2:8002".parse().unwrap()
        );
        assert_eq!(
            resolve("10.0.0.2:9000").unwrap(),
            "10.0.0.2:9000".parse().unwrap()
        );
        assert_eq!(resolve("[::1]:7").unwrap(), "[::1]:7".parse().unwrap());
        assert_eq!(resolve("::1").unwrap(), "[::1]:8002".parse().unwrap());
        assert_eq!(resolve("localhost:8100").unwrap().port(), 8100);
        assert!(resolve("localhost:0").is_err());
        assert!(resolve("localhost:x").is_err());
        assert!(resolve(":80").is_err());
    }

    #[test]
    fn peers_are_checked_by_address() {
        let mut config = RelocationConfig::default();
        assert!(check_peer(&config, "10.9.9.9".parse().unwrap()).is_ok());
        config.hosts_allow = tern_config::HostsAllow::new([r"^10\.77\.0\.1$"]).unwrap();
        assert!(check_peer(&config, "10.77.0.1".parse().unwrap()).is_ok());
        let e = check_peer(&config, "10.77.0.100".parse().unwrap()).unwrap_err();
        assert!(
            e.contains("10.77.0.100") && e.contains("hosts_allow"),
            "{e}"
        );
        // Loopback has a name (localhost) that a pattern can allow.
        config.hosts_allow = tern_config::HostsAllow::new(["^localhost$"]).unwrap();
        assert!(check_peer(&config, "127.0.0.1".parse().unwrap()).is_ok());
    }
}
