//! Starting a domain: admission, its entry in the table, its record and its guest process.

use std::os::fd::RawFd;
use std::sync::Arc;

use anyhow::Context;
use tern_api::RestoreSummary;
use tern_config::DomainConfig;
use tern_vmm::record::{DomainDir, DomainRecord, IncomingSpec, RestoreSpec};

use super::{domains_dir, Domain, Life, Registry};
use crate::admission;
use crate::guest_process;
use crate::sandbox;

/// How a domain's process starts.
pub(crate) enum Launch {
    /// Boot its kernel.
    Boot,
    /// From a checkpoint file.
    Restore(RestoreSpec),
    /// From a migration arriving on connection `fd`.
    Incoming { spec: Box<IncomingSpec>, fd: RawFd },
}

impl Registry {
    /// Creates and starts a domain from a config; returns its ID and UUID.
    pub fn create(
        self: &Arc<Self>,
        mut config: DomainConfig,
        paused: bool,
    ) -> anyhow::Result<(u32, String)> {
        admission::admit_create(&config)?;
        assign_macs(&mut config);
        let (id, uuid, _) = self.start_domain(config, paused, Launch::Boot)?;
        Ok((id, uuid))
    }

    /// Admits, registers and starts a domain; its ID, UUID and, if restored, the summary.
    pub(crate) fn start_domain(
        self: &Arc<Self>,
        mut config: DomainConfig,
        paused: bool,
        launch: Launch,
    ) -> anyhow::Result<(u32, String, Option<RestoreSummary>)> {
        let arriving: Vec<String> = match &launch {
            Launch::Incoming { spec, .. } => spec
                .offer
                .copy_disks
                .iter()
                .map(|d| d.vdev.clone())
                .collect(),
            _ => Vec::new(),
        };
        admission::admit_on_host(&config, &arriving)?;
        let uuid = config
            .uuid
            .get_or_insert_with(uuid::Uuid::new_v4)
            .to_string();
        let (id, dir) = self.register(&config, &uuid)?;
        // In a pool only the owner runs a guest (an arriving one was checked at its offer).
        // Claimed once this host's own admission let it in, so that a refusal here (the same
        // guest already here, say) never touches the record of a guest that runs.
        let claims = self.pool.is_some() && !matches!(launch, Launch::Incoming { .. });
        if let (true, Some(pool)) = (claims, &self.pool) {
            if let Err(e) = pool.claim(&config, &uuid) {
                self.forget(id);
                return Err(e);
            }
        }
        let (restore, incoming, fd) = match launch {
            Launch::Boot => (None, None, None),
            Launch::Restore(spec) => (Some(spec), None, None),
            Launch::Incoming { spec, fd } => (None, Some(*spec), Some(fd)),
        };
        let record = DomainRecord {
            id,
            uuid: uuid.clone(),
            config,
            start_paused: paused,
            restore,
            hidden_cpu_features: self.policy.hidden_cpu_features.clone(),
            incoming,
            sandbox: self.policy.sandbox.clone(),
        };
        let started = std::fs::create_dir_all(dir.path())
            .with_context(|| format!("cannot create {}", dir.path().display()))
            .and_then(|_| dir.save_record(&record))
            .and_then(|_| self.launch(id, &dir, fd, record.incoming.as_ref()));
        match started {
            Ok(summary) => Ok((id, uuid, summary)),
            Err(e) => {
                if claims {
                    self.forget_for_good(id);
                } else {
                    self.forget(id);
                }
                Err(e)
            }
        }
    }

    /// Enters a new domain in the table, starting, if admission lets it join the others:
    /// decided and entered under one lock, so that two starts cannot both take a name.
    fn register(&self, config: &DomainConfig, uuid: &str) -> anyhow::Result<(u32, DomainDir)> {
        let mut domains = self.lock();
        {
            let residents: Vec<_> = domains.values().map(Domain::resident).collect();
            admission::admit_beside(config, uuid, &residents, self.policy.guest_memory_mib)?;
        }
        let id = self.allocate_id(&domains)?;
        let dir = DomainDir::new(domains_dir(&self.state_dir).join(id.to_string()));
        let domain = Domain::starting(id, uuid.to_string(), config.clone(), dir.clone());
        domains.insert(id, domain);
        Ok((id, dir))
    }

    /// Starts the process of domain `id` (receiving a migration on `connection` if given)
    /// and watches it.
    pub(super) fn launch(
        self: &Arc<Self>,
        id: u32,
        dir: &DomainDir,
        connection: Option<RawFd>,
        incoming: Option<&IncomingSpec>,
    ) -> anyhow::Result<Option<RestoreSummary>> {
        let _ = std::fs::remove_file(dir.exit_file());
        let _ = std::fs::remove_file(dir.violation_file());
        let record = dir.load_record()?;
        let cgroup = sandbox::create_cgroup(dir, &record.config, &self.policy.sandbox)?;
        let joiner = cgroup.as_ref().map(|c| c.joiner()).transpose();
        let started = joiner.map_err(anyhow::Error::from).and_then(|joiner| {
            guest_process::spawn(
                dir,
                connection,
                joiner.as_ref(),
                self.policy.sandbox.namespaces,
            )
        });
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                sandbox::remove_cgroup(dir);
                return Err(e);
            }
        };
        let pid = started.pid;
        let life = match incoming {
            Some(spec) => Life::Incoming {
                pid,
                migration_id: spec.offer.migration_id.clone(),
                source: spec.source.clone(),
            },
            None => Life::Live { pid },
        };
        // Set before the monitor starts, so that a process that ends at once is seen ending
        // in the right life.
        self.set_life(id, life);
        self.watch(id, dir, Some(started.child))?;
        Ok(started.restore)
    }
}

/// Gives every network interface without a MAC one, once, at creation: the address is part of
/// the guest from then on (its checkpoints and migrations carry it). Locally administered
/// unicast addresses, prefix 02:54 (tern), the rest random.
fn assign_macs(config: &mut DomainConfig) {
    for vif in config.vifs.iter_mut().filter(|v| v.mac.is_none()) {
        let r = uuid::Uuid::new_v4().into_bytes();
        vif.mac = Some(tern_config::MacAddr([0x02, 0x54, r[0], r[1], r[2], r[3]]));
    }
}
