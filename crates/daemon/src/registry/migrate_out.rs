//! Sending a running domain to another host: connecting to the destination's relocation
//! server and handing the connection to the domain's guest process, which migrates it; and
//! cancelling that.
//!
//! From the request until it ends, a migration is recorded in its domain ([`Outgoing`]), so
//! that a cancel finds it at every step: while this daemon still connects, the record takes
//! the cancel and the migration stops before it starts (or the cancel is handed on once the
//! guest process has the connection); afterwards the cancel goes to the guest process, whose
//! engine gives up unless it passed the commit point. Either way the canceller waits for the
//! record to go, which is when the guest is as before the migration.

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};
use std::sync::Arc;

use tern_api::vmm::{VmmReply, VmmRequest, VmmRunState};
use tern_api::{
    read_message, write_message, MigrateOptions, MigrationCancel, MigrationProgress,
    MigrationSummary,
};

use super::{list_state, Life, Registry};
use crate::guest_process::{self, Control};
use crate::pool::PoolLink;

/// How long connecting to another host's relocation server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The relocation server's port when a destination names none.
const DEFAULT_PORT: u16 = 8002;
/// How long `tern migrate --cancel` waits for the migration to stop. The engine looks between
/// records and every 50 ms while it waits for the destination; only a link that accepts
/// nothing (up to the engine's 10 s stall timeout) or a slow connect keeps it longer.
const CANCEL_WAIT: Duration = Duration::from_secs(15);

/// A domain's migration to another host, from the request until it ends.
#[derive(Clone, Debug)]
pub(super) struct Outgoing {
    /// The destination's relocation server.
    destination: String,
    /// The user cancelled it before the guest process had the connection: the migration stops
    /// before it starts, or the cancel is handed on to the guest process with it.
    cancel_requested: bool,
    /// The guest process runs it: cancels go to it.
    handed_over: bool,
}

/// Ends a domain's [`Outgoing`] record when its migration ends, however it does.
struct OutgoingRecord<'a> {
    registry: &'a Registry,
    id: u32,
}

impl Drop for OutgoingRecord<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.registry.lock().get_mut(&self.id) {
            d.outgoing = None;
        }
        self.registry.changed.notify_all();
    }
}

impl Registry {
    /// Migrates a running domain to the relocation server at `destination` (`host[:port]`);
    /// on success the domain is gone from here.
    pub fn migrate(
        &self,
        key: &str,
        destination: &str,
        options: &MigrateOptions,
        progress: impl FnMut(&MigrationProgress),
    ) -> anyhow::Result<MigrationSummary> {
        let result = self.migrate_out(key, destination, options, progress);
        match &result {
            Ok(s) => log::info!(
                "migrated '{}' to {}: {:.1} ms downtime, {:.2} s in all",
                s.domain,
                s.destination,
                s.downtime_ms,
                s.total_seconds
            ),
            Err(e) => log::warn!("migration of '{key}' to {destination} failed: {e:#}"),
        }
        result
    }

    fn migrate_out(
        &self,
        key: &str,
        destination: &str,
        options: &MigrateOptions,
        progress: impl FnMut(&MigrationProgress),
    ) -> anyhow::Result<MigrationSummary> {
        let (id, dir) = self.find_live(key)?;
        let addr = resolve(destination)?;
        let handover = self.pool_handover(id, &addr)?;
        let _record = self.begin_outgoing(id, &addr.to_string())?;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot reach the relocation server at {addr}"))?;
        self.stop_if_cancelled(id, &addr.to_string())?;
        let migration_id = uuid::Uuid::new_v4().to_string();
        log::info!("migrating domain {id} to {addr} (migration {migration_id})");
        let mut control = Control::connect(&dir)?;
        let (reader, writer) = control.parts_mut();
        let request = VmmRequest::Migrate {
            destination: addr.to_string(),
            server_name: server_name(destination),
            migration_id,
            options: options.clone(),
            security: self.trust.outgoing(),
            ask_handover: handover.is_some(),
        };
        hand_over_connection(reader, writer, &request, stream)?;
        if self.outgoing_handed_over(id) {
            // Cancelled while the guest process took the connection: hand the cancel on.
            if let Err(e) = guest_process::request(&dir, &VmmRequest::CancelMigration) {
                log::warn!("cannot hand on the cancel of domain {id}'s migration: {e:#}");
            }
        }
        let summary = follow_migration(reader, writer, handover.as_ref(), progress)?;
        if !self.wait_gone(id, Duration::from_secs(30)) {
            bail!("migrated, but domain '{key}' did not stop here afterwards");
        }
        Ok(summary)
    }
}

/// In a pool: whose guest moves where, for the handover.
struct PoolHandover {
    pool: Arc<PoolLink>,
    uuid: String,
    /// The destination's name in the pool.
    to: String,
}

impl PoolHandover {
    /// Moves the guest's ownership to the destination, or says why it cannot.
    fn decide(&self, migration_id: &str) -> VmmRequest {
        match self.pool.hand_over(&self.uuid, &self.to, migration_id) {
            Ok(()) => VmmRequest::HandoverDecision {
                allowed: true,
                reason: None,
            },
            Err(e) => {
                log::warn!(
                    "pool: no handover of guest {} to {}: {e:#}",
                    self.uuid,
                    self.to
                );
                VmmRequest::HandoverDecision {
                    allowed: false,
                    reason: Some(format!("{e:#}")),
                }
            }
        }
    }
}

impl Registry {
    /// In a pool, the destination must be one of its hosts: the handover names it.
    fn pool_handover(&self, id: u32, addr: &SocketAddr) -> anyhow::Result<Option<PoolHandover>> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let uuid = self
            .lock()
            .get(&id)
            .map(|d| d.uuid.clone())
            .with_context(|| format!("domain {id} is gone"))?;
        Ok(Some(PoolHandover {
            pool: pool.clone(),
            uuid,
            to: pool.host_at(addr)?,
        }))
    }

    /// Records that domain `id` is about to migrate to `destination`; refused if it already is.
    fn begin_outgoing(&self, id: u32, destination: &str) -> anyhow::Result<OutgoingRecord<'_>> {
        let mut domains = self.lock();
        let domain = domains
            .get_mut(&id)
            .with_context(|| format!("domain {id} is gone"))?;
        if let Some(o) = &domain.outgoing {
            bail!(
                "'{}' is already migrating (to {})",
                domain.config.name,
                o.destination
            );
        }
        domain.outgoing = Some(Outgoing {
            destination: destination.to_string(),
            cancel_requested: false,
            handed_over: false,
        });
        Ok(OutgoingRecord { registry: self, id })
    }

    /// Fails if the user cancelled domain `id`'s migration before it started.
    fn stop_if_cancelled(&self, id: u32, destination: &str) -> anyhow::Result<()> {
        let domains = self.lock();
        let Some(domain) = domains.get(&id) else {
            bail!("domain {id} is gone");
        };
        if domain.outgoing.as_ref().is_some_and(|o| o.cancel_requested) {
            bail!(
                "the migration of '{}' to {destination} was cancelled before it started; \
                 nothing changed here",
                domain.config.name
            );
        }
        Ok(())
    }

    /// Notes that the guest process of domain `id` has its migration now; whether the user
    /// cancelled it meanwhile (the cancel is then the caller's to hand on).
    fn outgoing_handed_over(&self, id: u32) -> bool {
        let mut domains = self.lock();
        match domains.get_mut(&id).and_then(|d| d.outgoing.as_mut()) {
            Some(o) => {
                o.handed_over = true;
                o.cancel_requested
            }
            None => false,
        }
    }

    /// Cancels the outgoing migration of a domain and waits (a while) for it to stop: the
    /// guest is then here as before the migration and the destination discards what it built.
    /// Refused if the domain is not migrating, or once the migration passed its commit point.
    pub fn cancel_migration(&self, key: &str) -> anyhow::Result<MigrationCancel> {
        let (id, dir, life) = self.find(key)?;
        let name = self
            .lock()
            .get(&id)
            .map(|d| d.config.name.clone())
            .with_context(|| format!("no domain '{key}' on this host"))?;
        match life {
            Life::Live { .. } => {}
            Life::Incoming { source, .. } => bail!(
                "'{name}' is arriving from {source}, not leaving: cancel its migration there \
                 (tern migrate --cancel on {source})"
            ),
            Life::Starting | Life::Ended(_) => bail!("'{name}' is not migrating"),
        }
        let outgoing = {
            let mut domains = self.lock();
            domains
                .get_mut(&id)
                .and_then(|d| d.outgoing.as_mut())
                .map(|o| {
                    if !o.handed_over {
                        o.cancel_requested = true;
                    }
                    o.clone()
                })
        };
        let Some(outgoing) = outgoing else {
            // No migration of this daemon's: the guest process says why there is nothing to
            // cancel (or, if one is still unwinding, cancels it).
            guest_process::request(&dir, &VmmRequest::CancelMigration)?;
            let stopped = wait_not_migrating(&dir, CANCEL_WAIT);
            return Ok(MigrationCancel {
                domain: name,
                destination: None,
                stopped,
                state: list_state(&dir, Life::Live { pid: 0 }).0,
            });
        };
        if outgoing.handed_over {
            guest_process::request(&dir, &VmmRequest::CancelMigration)?;
        }
        log::info!(
            "cancelling the migration of '{name}' to {}",
            outgoing.destination
        );
        let stopped = self.wait_until(CANCEL_WAIT, |domains| {
            domains.get(&id).is_none_or(|d| d.outgoing.is_none())
        });
        let life = self.lock().get(&id).map(|d| d.life.clone());
        let state = match life {
            Some(life) => list_state(&dir, life).0,
            None => bail!(
                "the migration of '{name}' to {} completed before the cancel reached it: the \
                 guest runs there now",
                outgoing.destination
            ),
        };
        Ok(MigrationCancel {
            domain: name,
            destination: Some(outgoing.destination),
            stopped,
            state,
        })
    }
}

/// Waits until the guest process of `dir` is no longer migrating, or `timeout` passes;
/// whether it stopped.
fn wait_not_migrating(dir: &tern_vmm::record::DomainDir, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let migrating = Control::connect(dir)
            .and_then(|mut c| c.status())
            .is_ok_and(|s| s.state == VmmRunState::Migrating);
        if !migrating {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks the guest process to migrate and, once it agrees, passes it the connection to the
/// destination: the process speaks to the destination itself.
fn hand_over_connection(
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    request: &VmmRequest,
    stream: TcpStream,
) -> anyhow::Result<()> {
    guest_process::hand_over(reader, writer, request, stream.as_raw_fd())?;
    // The guest process has its own copy now; the connection closes with it.
    drop(stream);
    Ok(())
}

/// Passes on the migration's progress until the guest process reports it done; in a pool,
/// decides its handover when it asks.
fn follow_migration(
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    handover: Option<&PoolHandover>,
    mut progress: impl FnMut(&MigrationProgress),
) -> anyhow::Result<MigrationSummary> {
    loop {
        match read_message::<VmmReply>(reader) {
            Ok(VmmReply::MigrationProgress(p)) => progress(&p),
            Ok(VmmReply::HandingOver { migration_id }) => {
                let decision = match handover {
                    Some(h) => h.decide(&migration_id),
                    None => VmmRequest::HandoverDecision {
                        allowed: true,
                        reason: None,
                    },
                };
                write_message(writer, &decision).context("the guest process went away")?;
            }
            Ok(VmmReply::Migrated(summary)) => return Ok(*summary),
            Ok(VmmReply::Error { message }) => bail!(message),
            Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
            Err(e) => bail!("the guest process went away during the migration ({e})"),
        }
    }
}

/// The host part of `destination` as the user wrote it (a name or an address), which a
/// destination's CA-signed certificate must be valid for.
pub(crate) fn server_name(destination: &str) -> String {
    if let Ok(addr) = destination.parse::<SocketAddr>() {
        return addr.ip().to_string();
    }
    if destination.parse::<IpAddr>().is_ok() {
        return destination.to_string();
    }
    match destination.rsplit_once(':') {
        Some((host, _)) => host.trim_matches(|c| c == '[' || c == ']').to_string(),
        None => destination.to_string(),
    }
}

/// The address of the relocation server `destination` names: `host`, `host:port`, `a.b.c.d`,
/// `[v6]:port`; the port is [`DEFAULT_PORT`] unless given.
pub(crate) fn resolve(destination: &str) -> anyhow::Result<SocketAddr> {
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
    fn server_names_are_the_host_part() {
        assert_eq!(server_name("dst.example:8002"), "dst.example");
        assert_eq!(server_name("dst.example"), "dst.example");
        assert_eq!(server_name("10.0.0.2:9000"), "10.0.0.2");
        assert_eq!(server_name("[::1]:7"), "::1");
        assert_eq!(server_name("::1"), "::1");
    }
}
