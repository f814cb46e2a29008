//! Sending a running domain to another host: connecting to the destination's relocation
//! server and handing the connection to the domain's guest process, which migrates it.

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_api::vmm::{VmmReply, VmmRequest};
use tern_api::{read_message, MigrateOptions, MigrationProgress, MigrationSummary};

use super::Registry;
use crate::guest_process::{self, Control};

/// How long connecting to another host's relocation server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The relocation server's port when a destination names none.
const DEFAULT_PORT: u16 = 8002;

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
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot reach the relocation server at {addr}"))?;
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
        };
        hand_over_connection(reader, writer, &request, stream)?;
        let summary = follow_migration(reader, progress)?;
        if !self.wait_gone(id, Duration::from_secs(30)) {
            bail!("migrated, but domain '{key}' did not stop here afterwards");
        }
        Ok(summary)
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

/// Passes on the migration's progress until the guest process reports it done.
fn follow_migration(
    reader: &mut BufReader<UnixStream>,
    mut progress: impl FnMut(&MigrationProgress),
) -> anyhow::Result<MigrationSummary> {
    loop {
        match read_message::<VmmReply>(reader) {
            Ok(VmmReply::MigrationProgress(p)) => progress(&p),
            Ok(VmmReply::Migrated(summary)) => return Ok(summary),
            Ok(VmmReply::Error { message }) => bail!(message),
            Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
            Err(e) => bail!("the guest process went away during the migration ({e})"),
        }
    }
}

/// The host part of `destination` as the user wrote it (a name or an address), which a
/// destination's CA-signed certificate must be valid for.
fn server_name(destination: &str) -> String {
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
fn resolve(destination: &str) -> anyhow::Result<SocketAddr> {
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
