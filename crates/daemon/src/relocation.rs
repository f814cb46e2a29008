//! The relocation server: other hosts' daemons' guest processes connect here to migrate guests
//! to this host (or to ask what became of a migration whose handover they did not see end).
//!
//! Every connection passes, in order: a free handshake slot (at most `max_handshakes` at a
//! time, the rest are closed at once), `hosts_allow` on the peer's address (before a byte is
//! read), the TLS handshake with a trusted key (or, with `insecure`, plaintext on both sides)
//! and its first message, all within `handshake_timeout_s`. An offer then goes to
//! [`crate::admission`], which decides from this host's config what the guest may use; only
//! then is a guest process started, with the connection, and the offer accepted. Failed
//! connections are logged once per peer and kind and then counted ([`PeerLog`]).

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_config::RelocationConfig;
use tern_migration::link::{self, AcceptError, Link, LinkSecurity};
use tern_migration::transport::tune_tcp;
use tern_migration::{Channel, Offer, ToDestination, ToSource};
use tern_vmm::record::{IncomingSpec, IncomingState};

use crate::admission::{admit_new_migration, admit_offer, admit_peer, IncomingPolicy};
use crate::guest_process::INCOMING_FD;
use crate::peer_log::PeerLog;
use crate::registry::{Launch, Registry, Resumption};
use crate::trust::HostTrust;

/// Where failures not tied to a peer are counted.
const UNKNOWN_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// A connection waiting for a handshake slot, and when it arrived.
type Arrival = (TcpStream, SocketAddr, Instant);

struct Server {
    config: RelocationConfig,
    registry: Arc<Registry>,
    trust: Arc<HostTrust>,
    failures: PeerLog,
}

/// Listens for other hosts as `config` says.
pub fn start(
    config: &RelocationConfig,
    registry: Arc<Registry>,
    trust: Arc<HostTrust>,
) -> anyhow::Result<()> {
    let address = config.address.as_deref().unwrap_or("0.0.0.0");
    let listener = TcpListener::bind((address, config.port))
        .with_context(|| format!("cannot listen for migrations on {address}:{}", config.port))?;
    announce(config, address, &trust);
    let server = Arc::new(Server {
        config: config.clone(),
        registry,
        trust,
        failures: PeerLog::default(),
    });
    let slots = config.max_handshakes.max(1);
    let (queue, arrivals) = sync_channel::<Arrival>(slots);
    let arrivals = Arc::new(Mutex::new(arrivals));
    for i in 0..slots {
        let (server, arrivals) = (server.clone(), arrivals.clone());
        std::thread::Builder::new()
            .name(format!("relocation-{i}"))
            .spawn(move || server.handshakes(&arrivals))?;
    }
    std::thread::Builder::new()
        .name("relocation".into())
        .spawn(move || server.accept_loop(&listener, &queue))?;
    Ok(())
}

/// Says at start how the server is secured and whom it lets in.
fn announce(config: &RelocationConfig, address: &str, trust: &HostTrust) {
    if config.insecure {
        log::warn!(
            "relocation server on {address}:{}: insecure = true: migrations are neither \
             authenticated nor encrypted; any host that reaches this port can send guests here \
             and read their memory on the wire",
            config.port
        );
    } else {
        log::info!(
            "relocation server on {address}:{} (TLS 1.3, this host is {})",
            config.port,
            trust.fingerprint()
        );
    }
    for warning in crate::admission::policy_warnings(config) {
        log::warn!("relocation server: {warning}");
    }
    if config.hosts_allow.is_empty() {
        log::info!("relocation server: hosts_allow is empty: any address may try to connect");
    } else {
        log::info!(
            "relocation server: hosts_allow {:?}",
            config.hosts_allow.patterns()
        );
    }
}

impl Server {
    /// Takes connections as they come and queues them for a handshake slot; with every slot
    /// busy and the queue full, closes them at once.
    fn accept_loop(&self, listener: &TcpListener, queue: &SyncSender<Arrival>) {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, say: let some close before trying again.
                    self.failures.failed(
                        UNKNOWN_PEER,
                        "accept failed",
                        &format!("accept failed: {e}"),
                    );
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            if let Err(TrySendError::Full((stream, peer, _))) =
                queue.try_send((stream, peer, Instant::now()))
            {
                self.failures.failed(
                    peer.ip(),
                    "turned away (all handshake slots busy)",
                    "turned away: all handshake slots are busy ([relocation] max_handshakes)",
                );
                drop(stream);
            }
        }
    }

    /// A handshake slot: serves one waiting connection after another.
    fn handshakes(&self, arrivals: &Mutex<Receiver<Arrival>>) {
        loop {
            let next = arrivals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(Duration::from_secs(5));
            match next {
                Ok((stream, peer, arrived)) => {
                    let deadline = arrived + Duration::from_secs(self.config.handshake_timeout_s);
                    self.serve(stream, peer, deadline);
                }
                Err(RecvTimeoutError::Timeout) => self.failures.tick(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn serve(&self, stream: TcpStream, peer: SocketAddr, deadline: Instant) {
        if let Err(reason) = check_peer(&self.config, peer.ip()) {
            self.failures.failed(
                peer.ip(),
                "not in hosts_allow",
                &format!("refused: {reason}"),
            );
            link::refuse_unread(stream, deadline, &reason);
            return;
        }
        if let Err(e) = tune_tcp(&stream) {
            log::warn!("relocation from {peer}: {e}");
            return;
        }
        let incoming = match link::accept_first(stream, self.trust.server_security(), deadline) {
            Ok(incoming) => incoming,
            Err(e) => {
                let kind = match &e {
                    AcceptError::WrongMode(_) => "refused: TLS on one side only",
                    AcceptError::Handshake(_) => "refused in the TLS handshake",
                    AcceptError::Timeout => "handshake timed out",
                    AcceptError::Other(_) => "broken first message",
                };
                self.failures
                    .failed(peer.ip(), kind, &format!("{kind}: {e}"));
                return;
            }
        };
        let mut channel = incoming.channel;
        let reply = match incoming.first {
            ToDestination::Query { migration_id } => {
                let outcome = self.registry.migration_outcome(&migration_id);
                log::info!("{peer} asked about migration {migration_id}: {outcome:?}");
                ToSource::Outcome { outcome }
            }
            ToDestination::Offer(offer) => match self.accept(&channel, *offer, peer) {
                Ok(domain_id) => ToSource::Accept { domain_id },
                Err(e) => {
                    let reason = format!("{e:#}");
                    log::warn!("refused a migration from {peer}: {reason}");
                    ToSource::Refuse { reason }
                }
            },
            ToDestination::Resume { migration_id } => self.resume(&channel, &migration_id, peer),
            ToDestination::Evacuate {
                host,
                live,
                parallel,
                dry_run,
            } => {
                let options = crate::evacuation::EvacuateOptions {
                    live,
                    parallel,
                    dry_run,
                };
                match self.may_evacuate(&channel) {
                    Ok(()) => return self.evacuate_on_request(channel, peer, host, options),
                    Err(reason) => ToSource::Refuse { reason },
                }
            }
            ToDestination::Go { .. } => ToSource::Refuse {
                reason: "Go without a migration".into(),
            },
        };
        if let Err(e) = link::answer(&mut channel, &reply) {
            log::warn!("relocation from {peer}: cannot answer: {e}");
        }
    }

    /// Whether a peer may have this host evacuated: only over TLS, from a trusted key (which
    /// the session proves), when this host is in a pool.
    fn may_evacuate(&self, ch: &Channel<Link>) -> Result<(), String> {
        if self.registry.pool().is_none() {
            return Err("this host is not in a pool".into());
        }
        if ch.transport().peer_fingerprint().is_none() {
            return Err("evacuations are asked for over TLS only (this host is insecure)".into());
        }
        Ok(())
    }

    /// Evacuates this host for a peer of its pool, on a thread of its own (an evacuation
    /// takes minutes; the handshake slot is freed at once), telling the peer as it goes.
    fn evacuate_on_request(
        &self,
        mut channel: Channel<Link>,
        peer: SocketAddr,
        host: String,
        options: crate::evacuation::EvacuateOptions,
    ) {
        let registry = self.registry.clone();
        let run = move || {
            log::info!("{peer} asks this host ({host}) to evacuate");
            let result = crate::evacuation::evacuate_here(&registry, &host, options, |event| {
                let event = serde_json::to_value(event).unwrap_or_default();
                let _ = channel.send(&ToSource::Evacuation { event });
            });
            let reply = match result {
                Ok(summary) => ToSource::Evacuated {
                    summary: serde_json::to_value(summary).unwrap_or_default(),
                },
                Err(e) => ToSource::Refuse {
                    reason: format!("{e:#}"),
                },
            };
            if let Err(e) = link::answer(&mut channel, &reply) {
                log::warn!("evacuation for {peer}: cannot answer: {e}");
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("evacuation".into())
            .spawn(run)
        {
            log::error!("cannot start an evacuation: {e}");
        }
    }

    /// The source of a post-copy migration came back: the guest process receiving it takes
    /// the connection over (and speaks next, in the stream's session), or the answer says why
    /// the migration cannot go on.
    fn resume(&self, ch: &Channel<Link>, migration_id: &str, peer: SocketAddr) -> ToSource {
        let key = ch.transport().peer_fingerprint().map(|k| k.to_string());
        let tcp = ch.transport().tcp_stream();
        match self
            .registry
            .resume_postcopy(migration_id, key.as_deref(), tcp)
        {
            Resumption::Taken { id } => {
                log::info!("{peer} resumed post-copy migration {migration_id} (domain {id})");
                ToSource::Accept { domain_id: id }
            }
            Resumption::Over(outcome) => {
                log::info!("{peer} asked to resume migration {migration_id}: {outcome:?}");
                ToSource::Outcome { outcome }
            }
            Resumption::Refused(refusal) => {
                let reason = refusal.to_string();
                log::warn!("refused to resume migration {migration_id} for {peer}: {reason}");
                ToSource::Refuse { reason }
            }
        }
    }

    /// Admits an offer and starts the guest process that receives the guest; the domain ID.
    fn accept(&self, ch: &Channel<Link>, offer: Offer, peer: SocketAddr) -> anyhow::Result<u32> {
        let policy = IncomingPolicy {
            relocation: &self.config,
            hidden_cpu_features: &self.registry.policy().hidden_cpu_features,
        };
        let config = admit_offer(&policy, &offer)?;
        let source_key = ch.transport().peer_fingerprint();
        if let Some(pool) = self.registry.pool() {
            let uuid = config
                .uuid
                .map(|u| u.to_string())
                .context("a guest of the pool must have a UUID")?;
            let key = source_key.map(|k| k.to_string());
            pool.check_incoming(&uuid, key.as_deref(), peer.ip())?;
        }
        log::info!(
            "accepting '{}' from {peer}{} (migration {}, {}, {} MiB)",
            config.name,
            source_key.map(|k| format!(" ({k})")).unwrap_or_default(),
            offer.migration_id,
            if offer.live { "live" } else { "warm" },
            config.memory_mib
        );
        let state_file = self.registry.migration_file(&offer.migration_id);
        admit_new_migration(&offer.migration_id, &state_file)?;
        IncomingState::Receiving.store(&state_file)?;
        // The stream's session must come from the key that made the offer.
        let security = match source_key {
            Some(key) => self.trust.outgoing().pinned_to(key.to_string()),
            None => LinkSecurity::Insecure,
        };
        let spec = IncomingSpec {
            fd: INCOMING_FD,
            source: peer.ip().to_string(),
            state_file: state_file.clone(),
            offer,
            security,
            ask_arrival: self.registry.pool().is_some(),
        };
        let launch = Launch::Incoming {
            spec: Box::new(spec),
            fd: ch.transport().as_raw_fd(),
        };
        match self.registry.start_domain(config, false, launch) {
            Ok((id, _, _)) => Ok(id),
            Err(e) => {
                let _ = IncomingState::Aborted.store(&state_file);
                Err(e)
            }
        }
    }
}

/// Whether `hosts_allow` lets `ip` in (decided in [`crate::admission::admit_peer`]): by
/// address, or by the name its address resolves to if that name resolves back to the address
/// (a reverse name alone is the peer's to choose).
fn check_peer(config: &RelocationConfig, ip: IpAddr) -> Result<(), String> {
    admit_peer(config, ip, || confirmed_name(ip))
}

/// The name `ip` resolves to, if that name also resolves to `ip`.
fn confirmed_name(ip: IpAddr) -> Option<String> {
    let name = reverse_name(ip)?;
    let forward = (name.as_str(), 0).to_socket_addrs().ok()?;
    forward.into_iter().any(|a| a.ip() == ip).then_some(name)
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

#[cfg(test)]
mod tests {
    use super::*;

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
