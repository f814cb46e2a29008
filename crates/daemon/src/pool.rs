//! This host in a pool (`[pool]`): it joins at start, publishes its record as its guests
//! change, and guards its guests' ownership records. Every place where the pool decides what
//! may run here is in this module:
//!
//! - a guest is created or restored here only if no other host owns it ([`PoolLink::claim`]);
//! - an incoming guest is taken only from the host that owns it ([`PoolLink::check_incoming`]);
//! - a migration hands the guest over in one etcd transaction at its commit point, just before
//!   the destination is told to run it ([`PoolLink::hand_over`]); a host that cannot reach
//!   etcd then cannot hand a guest over, and the migration fails with the guest still here;
//! - a guest that ends here for good drops its record ([`PoolLink::release`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_config::{DaemonConfig, DiskBackend, DomainConfig, PoolConfig};
use tern_pool::{
    ownership, Admits, Etcd, EtcdTls, GuestRecord, Health, HostRecord, HostView, Keys, Membership,
    Needs, PoolView,
};

use crate::trust::{host_name, HostTrust};

/// How long one etcd call may take per endpoint.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a handover whose answer was lost keeps reading the record back.
const HANDOVER_SETTLE: Duration = Duration::from_secs(5);

/// This host's place in its pool.
pub struct PoolLink {
    name: String,
    etcd: Arc<Etcd>,
    keys: Keys,
    membership: Arc<Membership>,
    /// The CPU features guests get here.
    cpu_features: Vec<String>,
}

impl PoolLink {
    /// Joins the pool `config.pool` names; fails if etcd cannot be reached.
    pub fn join(config: &DaemonConfig, trust: &HostTrust) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(pool) = &config.pool else {
            return Ok(None);
        };
        let tls = etcd_tls(pool)?;
        let etcd = Arc::new(Etcd::new(&pool.endpoints, tls.as_ref(), ETCD_TIMEOUT)?);
        let keys = Keys::new(&pool.name);
        let cpu_features = tern_machine::cpuid::guest_visible_features(&config.hide_cpu_features)
            .map_err(anyhow::Error::msg)?;
        let total = config.guest_memory_mib.unwrap_or_else(host_memory_mib);
        let record = HostRecord {
            name: pool.host.clone().unwrap_or_else(host_name),
            address: relocation_address(config, pool),
            fingerprint: (!trust.insecure()).then(|| trust.fingerprint().to_string()),
            memory_total_mib: total,
            memory_free_mib: total,
            cpu_features: cpu_features.clone(),
            guests: 0,
            admits: admits(config),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let name = record.name.clone();
        let membership =
            Membership::join(etcd.clone(), keys.clone(), record, pool.lease_ttl_s as i64)
                .with_context(|| format!("cannot join pool '{}'", pool.name))?;
        log::info!(
            "joined pool '{}' as host {name} (etcd {})",
            pool.name,
            pool.endpoints.join(", ")
        );
        Ok(Some(Arc::new(PoolLink {
            name,
            etcd,
            keys,
            membership,
            cpu_features,
        })))
    }

    /// This host's name in the pool.
    pub fn host(&self) -> &str {
        &self.name
    }

    /// Whether etcd answered lately.
    pub fn health(&self) -> Health {
        self.membership.health()
    }

    fn view(&self) -> PoolView<'_> {
        PoolView {
            etcd: &self.etcd,
            keys: &self.keys,
        }
    }

    /// Every host of the pool.
    pub fn hosts(&self) -> anyhow::Result<Vec<HostView>> {
        Ok(self.view().hosts()?)
    }

    /// Every guest of the pool.
    pub fn guests(&self) -> anyhow::Result<Vec<GuestRecord>> {
        Ok(self.view().guests()?)
    }

    /// The guests this host owns.
    pub fn guests_on_me(&self) -> anyhow::Result<Vec<GuestRecord>> {
        Ok(self.view().guests_on(&self.name)?)
    }

    /// Puts this host in maintenance (no guest is placed on it), or ends it.
    pub fn set_maintenance(&self, on: bool) -> anyhow::Result<()> {
        self.set_maintenance_of(&self.name, on)
    }

    /// Puts `host` in maintenance, or ends it.
    pub fn set_maintenance_of(&self, host: &str, on: bool) -> anyhow::Result<()> {
        if !self.hosts()?.iter().any(|h| h.record.name == host) {
            bail!("no host {host} in this pool");
        }
        self.view().set_maintenance(host, on, &self.name)?;
        log::info!(
            "pool: host {host} {}",
            if on {
                "is in maintenance"
            } else {
                "takes guests again"
            }
        );
        Ok(())
    }

    /// Says how many guests run here and what memory they hold.
    pub fn publish_load(&self, guests: u32, memory_mib: u64) {
        self.membership.update(|r| {
            r.guests = guests;
            r.memory_free_mib = r.memory_total_mib.saturating_sub(memory_mib);
        });
    }

    /// Makes this host the owner of a guest about to start or be restored here; refused if
    /// another host owns it.
    pub fn claim(&self, config: &DomainConfig, uuid: &str) -> anyhow::Result<()> {
        let record = GuestRecord {
            uuid: uuid.to_string(),
            name: config.name.clone(),
            host: self.name.clone(),
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            cpu_features: self.cpu_features.clone(),
            needs: needs(config),
            handover: None,
        };
        ownership::claim(&self.etcd, &self.keys, &record)?;
        Ok(())
    }

    /// A guest ended here for good: its record goes (unless it moved to another host).
    pub fn release(&self, uuid: &str) {
        match ownership::release(&self.etcd, &self.keys, uuid, &self.name) {
            Ok(true) => log::info!("pool: released guest {uuid}"),
            Ok(false) => {}
            Err(e) => log::warn!("pool: cannot release guest {uuid}: {e}"),
        }
    }

    /// An offer of guest `uuid` came from a peer with key `peer_key` at `peer_ip`: besides
    /// [`PoolLink::confirm_arrival`], the guest must be owned by that peer.
    pub fn check_incoming(
        &self,
        uuid: &str,
        peer_key: Option<&str>,
        peer_ip: IpAddr,
    ) -> anyhow::Result<()> {
        let record = self.confirm_arrival(uuid)?;
        let owner = self
            .hosts()?
            .into_iter()
            .find(|h| h.record.name == record.host)
            .with_context(|| {
                format!(
                    "guest '{}' belongs to unknown host {}",
                    record.name, record.host
                )
            })?;
        let same_peer = match (&owner.record.fingerprint, peer_key) {
            (Some(theirs), Some(peer)) => theirs == peer,
            _ => crate::registry::resolve(&owner.record.address).is_ok_and(|a| a.ip() == peer_ip),
        };
        if !same_peer {
            bail!(
                "guest '{}' belongs to host {}, which is not the host offering it",
                record.name,
                record.host
            );
        }
        Ok(())
    }

    /// May guest `uuid` come here (at its offer, and again just before it is ready to run)?
    /// etcd answers now, the guest is another host's (the handover has not happened), and this
    /// host is not in maintenance: a host cut off from etcd takes no guest. Its record.
    pub fn confirm_arrival(&self, uuid: &str) -> anyhow::Result<GuestRecord> {
        let Some((record, _)) = ownership::read(&self.etcd, &self.keys, uuid)? else {
            bail!("guest {uuid} has no ownership record in this pool: no host of it owns it");
        };
        if record.host == self.name {
            bail!("this host owns guest '{}' already", record.name);
        }
        if self.etcd.get(&self.keys.maintenance(&self.name))?.is_some() {
            bail!("this host is in maintenance: it takes no guests");
        }
        Ok(record)
    }

    /// The pool host whose relocation server is at `addr` (a migration's destination).
    pub fn host_at(&self, addr: &SocketAddr) -> anyhow::Result<String> {
        let hosts = self.hosts()?;
        hosts
            .iter()
            .find(|h| crate::registry::resolve(&h.record.address).is_ok_and(|a| a == *addr))
            .map(|h| h.record.name.clone())
            .with_context(|| format!("{addr} is not the relocation server of a host of this pool"))
    }

    /// The handover of migration `migration_id`: guest `uuid` becomes host `to`'s.
    pub fn hand_over(&self, uuid: &str, to: &str, migration_id: &str) -> anyhow::Result<()> {
        ownership::hand_over(
            &self.etcd,
            &self.keys,
            uuid,
            &self.name,
            to,
            migration_id,
            HANDOVER_SETTLE,
        )?;
        log::info!("pool: guest {uuid} handed over to {to} (migration {migration_id})");
        Ok(())
    }

    /// Migration `migration_id` did not complete after its handover: the guest is this
    /// host's again. Retried in the background until etcd answers.
    pub fn take_back(self: &Arc<Self>, uuid: &str, migration_id: &str) {
        let (link, uuid, migration_id) = (self.clone(), uuid.to_string(), migration_id.to_string());
        let retry = move || {
            for attempt in 0.. {
                match ownership::take_back(&link.etcd, &link.keys, &uuid, &link.name, &migration_id)
                {
                    Ok(taken) => {
                        if taken {
                            log::info!("pool: guest {uuid} is this host's again (migration {migration_id} did not complete)");
                        }
                        return;
                    }
                    Err(e) => {
                        if attempt == 0 {
                            log::warn!("pool: cannot take guest {uuid} back yet: {e}");
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("pool-take-back".into())
            .spawn(retry)
        {
            log::error!("pool: cannot start taking a guest back: {e}");
        }
    }

    /// A guest arrived and runs here: its handover is final.
    pub fn settle(&self, uuid: &str) {
        if let Err(e) = ownership::settle(&self.etcd, &self.keys, uuid, &self.name) {
            log::warn!("pool: cannot record that guest {uuid} arrived: {e}");
        }
    }
}

fn etcd_tls(pool: &PoolConfig) -> anyhow::Result<Option<EtcdTls>> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("[pool]: cannot read {}", p.display()))
    };
    let Some(ca) = &pool.ca_file else {
        return Ok(None);
    };
    let client = match (&pool.cert_file, &pool.key_file) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(EtcdTls {
        ca_pem: read(ca)?,
        client,
    }))
}

/// Where other hosts reach this host's relocation server.
fn relocation_address(config: &DaemonConfig, pool: &PoolConfig) -> String {
    if let Some(address) = &pool.address {
        return address.clone();
    }
    let host = config
        .relocation
        .address
        .clone()
        .filter(|a| a != "0.0.0.0")
        .unwrap_or_else(host_name);
    format!("{host}:{}", config.relocation.port)
}

/// What this host lets incoming guests use.
fn admits(config: &DaemonConfig) -> Admits {
    let r = &config.relocation;
    Admits {
        incoming: r.server,
        storage: r.storage.iter().map(|p| p.display().to_string()).collect(),
        nbd_servers: r.nbd_servers.clone(),
        bridges: r.bridges.clone(),
    }
}

/// What a guest uses that a destination must let in.
fn needs(config: &DomainConfig) -> Needs {
    let mut needs = Needs::default();
    for path in config.kernel.iter().chain(config.ramdisk.iter()) {
        needs.files.push(path.display().to_string());
    }
    for disk in &config.disks {
        match &disk.backend {
            DiskBackend::File(p) | DiskBackend::Phy(p) => needs.files.push(p.display().to_string()),
            DiskBackend::Nbd { host, port, .. } => needs.nbd_servers.push(format!("{host}:{port}")),
        }
    }
    needs.bridges = config
        .vifs
        .iter()
        .filter_map(|v| v.bridge.clone())
        .collect();
    needs
}

/// The host's RAM, MiB (from /proc/meminfo).
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_needs_its_files_nbd_servers_and_bridges() {
        let text = "name = 'g'\nmemory = 64\nkernel = '/srv/k/vmlinux'\n\
                    disk = [ 'file:/srv/g/a.img,xvda,w', 'nbd:10.0.0.9:10809,xvdb,w' ]\n\
                    vif = [ 'bridge=br1', '' ]\n";
        let config = tern_config::parse_domain_config(text, None).unwrap().config;
        let needs = needs(&config);
        assert_eq!(needs.files, ["/srv/k/vmlinux", "/srv/g/a.img"]);
        assert_eq!(needs.nbd_servers, ["10.0.0.9:10809"]);
        assert_eq!(needs.bridges, ["br1"]);
    }

    #[test]
    fn the_relocation_address_comes_from_the_pool_or_the_relocation_table() {
        let mut config = tern_config::parse_daemon_config(
            "[relocation]\nserver = true\naddress = '10.0.0.1'\nport = 9000\n\
             [pool]\nname = 'p'\nendpoints = ['http://e:2379']\n",
        )
        .unwrap();
        let pool = config.pool.clone().unwrap();
        assert_eq!(relocation_address(&config, &pool), "10.0.0.1:9000");
        let with_address = PoolConfig {
            address: Some("node1:8002".into()),
            ..pool.clone()
        };
        assert_eq!(relocation_address(&config, &with_address), "node1:8002");
        config.relocation.storage = vec!["/srv".into()];
        let a = admits(&config);
        assert!(a.incoming);
        assert_eq!(a.storage, ["/srv"]);
        assert_eq!(a.bridges, None);
    }
}
