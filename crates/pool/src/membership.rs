//! A host's membership: its record (`hosts/<host>`) and a lease it keeps alive
//! (`alive/<host>`). A thread renews the lease every third of its time to live and publishes
//! the record when it changed; if the lease expired (etcd unreachable for longer than that),
//! it takes a new one. What the thread last learnt is [`Health`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::etcd::{Etcd, EtcdError};
use crate::keys::Keys;
use crate::records::HostRecord;

/// Whether this host can reach etcd, as the membership thread last found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The lease is held and etcd answered the last renewal.
    pub reachable: bool,
    /// Why not, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when (Unix seconds) it has not been reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable_since_unix_s: Option<u64>,
}

struct State {
    lease: i64,
    record: HostRecord,
    /// The record changed since it was last published.
    dirty: bool,
    health: Health,
    stop: bool,
}

/// This host in the pool.
pub struct Membership {
    etcd: Arc<Etcd>,
    keys: Keys,
    ttl_s: i64,
    state: Mutex<State>,
    wake: Condvar,
}

impl Membership {
    /// Joins the pool with `record` (its name is this host's) and keeps the lease alive on a
    /// thread. Fails if etcd cannot be reached now: a host that never joined has nothing to
    /// say about its guests.
    pub fn join(
        etcd: Arc<Etcd>,
        keys: Keys,
        record: HostRecord,
        ttl_s: i64,
    ) -> Result<Arc<Membership>, EtcdError> {
        let lease = etcd.grant(ttl_s)?;
        publish(&etcd, &keys, &record, lease)?;
        let membership = Arc::new(Membership {
            etcd,
            keys,
            ttl_s,
            state: Mutex::new(State {
                lease,
                record,
                dirty: false,
                health: Health {
                    reachable: true,
                    error: None,
                    unreachable_since_unix_s: None,
                },
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let thread = membership.clone();
        let spawned = std::thread::Builder::new()
            .name("pool-lease".into())
            .spawn(move || thread.keep_alive());
        if let Err(e) = spawned {
            log::error!("cannot start the pool lease thread: {e}");
        }
        Ok(membership)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record as last set.
    pub fn record(&self) -> HostRecord {
        self.lock().record.clone()
    }

    /// Changes the record; published at once by the thread.
    pub fn update(&self, change: impl FnOnce(&mut HostRecord)) {
        let mut state = self.lock();
        let before = state.record.clone();
        change(&mut state.record);
        if state.record != before {
            state.dirty = true;
            self.wake.notify_all();
        }
    }

    pub fn health(&self) -> Health {
        self.lock().health.clone()
    }

    /// Leaves the pool: the lease ends, so the host shows down at once.
    pub fn leave(&self) {
        let lease = {
            let mut state = self.lock();
            state.stop = true;
            self.wake.notify_all();
            state.lease
        };
        if let Err(e) = self.etcd.revoke(lease) {
            log::warn!("pool: cannot end this host's lease: {e}");
        }
    }

    fn keep_alive(&self) {
        let period = Duration::from_secs_f64(self.ttl_s as f64 / 3.0);
        let mut next_renewal = Instant::now() + period;
        // A record that could not be published is tried again with every renewal.
        let mut unpublished: Option<HostRecord> = None;
        loop {
            let (lease, changed) = {
                let mut state = self.lock();
                loop {
                    if state.stop {
                        return;
                    }
                    let now = Instant::now();
                    if state.dirty || now >= next_renewal {
                        break;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, next_renewal - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                let changed = std::mem::take(&mut state.dirty).then(|| state.record.clone());
                (state.lease, changed)
            };
            let mut failure = None;
            if Instant::now() >= next_renewal {
                next_renewal = Instant::now() + period;
                failure = self.renew(lease).err();
            }
            if let Some(record) = changed.or(unpublished.take()) {
                let lease = self.lock().lease;
                if let Err(e) = publish(&self.etcd, &self.keys, &record, lease) {
                    unpublished = Some(record);
                    failure.get_or_insert(e);
                }
            }
            self.note(failure);
        }
    }

    /// Renews the lease, or takes a new one and republishes if it expired.
    fn renew(&self, lease: i64) -> Result<(), EtcdError> {
        if self.etcd.keep_alive(lease)? > 0 {
            return Ok(());
        }
        let fresh = self.etcd.grant(self.ttl_s)?;
        let record = self.record();
        publish(&self.etcd, &self.keys, &record, fresh)?;
        log::warn!("pool: this host's lease had expired; it is back in the pool");
        self.lock().lease = fresh;
        Ok(())
    }

    fn note(&self, failure: Option<EtcdError>) {
        let mut state = self.lock();
        match failure {
            None => {
                if !state.health.reachable {
                    log::info!("pool: etcd is reachable again");
                }
                state.health = Health {
                    reachable: true,
                    error: None,
                    unreachable_since_unix_s: None,
                };
            }
            Some(e) => {
                if state.health.reachable {
                    log::warn!("pool: {e}");
                }
                let since = state
                    .health
                    .unreachable_since_unix_s
                    .unwrap_or_else(unix_now);
                state.health = Health {
                    reachable: false,
                    error: Some(e.to_string()),
                    unreachable_since_unix_s: Some(since),
                };
            }
        }
    }
}

/// Writes the host's record and its liveness key on `lease`.
fn publish(etcd: &Etcd, keys: &Keys, record: &HostRecord, lease: i64) -> Result<(), EtcdError> {
    let value = serde_json::to_vec(record).unwrap_or_default();
    etcd.put(&keys.host(&record.name), &value, 0)?;
    etcd.put(&keys.alive(&record.name), b"", lease)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
