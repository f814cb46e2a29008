//! A pool of tern hosts kept in etcd.
//!
//! - [`membership`]: each daemon's lease and host record; a host whose lease expired is down.
//! - [`ownership`]: one record per guest naming the one host that may run it, changed only in
//!   transactions; a migration's handover moves it.
//! - [`plan`]: where the guests of a host go when it is evacuated.
//! - [`keys`]: the layout of the keys; [`etcd`]: the client.
//!
//! docs/pool.md describes the design: what is in etcd, who writes it, what happens when etcd
//! cannot be reached.

pub mod etcd;
pub mod keys;
pub mod membership;
pub mod ownership;
pub mod plan;
pub mod records;

use std::collections::BTreeSet;

pub use etcd::{Etcd, EtcdError, EtcdTls};
pub use keys::Keys;
pub use membership::{Health, Membership};
pub use ownership::OwnershipError;
pub use plan::{plan_evacuation, EvacuationPlan, HostView, Move, NoRoom};
pub use records::{Admits, GuestRecord, Handover, HostRecord, HostState, Maintenance, Needs};

/// Reading a pool: its hosts and guests as etcd has them now.
pub struct PoolView<'a> {
    pub etcd: &'a Etcd,
    pub keys: &'a Keys,
}

impl PoolView<'_> {
    /// Every host that ever joined, with its state.
    pub fn hosts(&self) -> Result<Vec<HostView>, EtcdError> {
        let records = self.etcd.get_prefix(&self.keys.hosts())?;
        let alive = self.leaves(&self.keys.alive_all())?;
        let maintenance = self.leaves(&self.keys.maintenance_all())?;
        Ok(records
            .iter()
            .filter_map(|kv| serde_json::from_slice::<HostRecord>(&kv.value).ok())
            .map(|record| {
                let state = if !alive.contains(&record.name) {
                    HostState::Down
                } else if maintenance.contains(&record.name) {
                    HostState::Maintenance
                } else {
                    HostState::Up
                };
                HostView { record, state }
            })
            .collect())
    }

    /// Every guest of the pool.
    pub fn guests(&self) -> Result<Vec<GuestRecord>, EtcdError> {
        self.records(&self.keys.guests())
    }

    /// The guests `host` owns.
    pub fn guests_on(&self, host: &str) -> Result<Vec<GuestRecord>, EtcdError> {
        self.records(&self.keys.on_host(host))
    }

    /// Puts `host` in maintenance (no guest is placed on it) or ends it.
    pub fn set_maintenance(&self, host: &str, on: bool, by: &str) -> Result<(), EtcdError> {
        if on {
            let why = Maintenance {
                since_unix_s: membership::unix_now(),
                by: by.to_string(),
            };
            let value = serde_json::to_vec(&why).unwrap_or_default();
            self.etcd.put(&self.keys.maintenance(host), &value, 0)
        } else {
            self.etcd.delete(&self.keys.maintenance(host))
        }
    }

    fn records(&self, prefix: &str) -> Result<Vec<GuestRecord>, EtcdError> {
        Ok(self
            .etcd
            .get_prefix(prefix)?
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The last path elements of the keys under `prefix`.
    fn leaves(&self, prefix: &str) -> Result<BTreeSet<String>, EtcdError> {
        Ok(self
            .etcd
            .get_prefix(prefix)?
            .into_iter()
            .map(|kv| Keys::leaf(&kv.key).to_string())
            .collect())
    }
}
