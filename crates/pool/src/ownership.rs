//! Guests' ownership records: taken when a guest is created or restored, moved by a
//! migration's handover, dropped when the guest ends. Every change is one etcd transaction on
//! the record's revision, so two hosts racing for a guest cannot both win, and the index
//! `on/<host>/` moves with it.

use std::time::{Duration, Instant};

use crate::etcd::{Compare, Etcd, EtcdError, KeyValue, Op, Txn};
use crate::keys::Keys;
use crate::records::{GuestRecord, Handover};

/// Why an ownership change was refused.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("guest '{name}' ({uuid}) belongs to host {owner} of the pool, not to this host")]
    OwnedElsewhere {
        name: String,
        uuid: String,
        owner: String,
    },
    #[error("guest {uuid} has no ownership record in the pool")]
    Unknown { uuid: String },
    #[error("host {host} {why}")]
    Destination { host: String, why: String },
    #[error("the ownership of guest {uuid} kept changing under this host")]
    Contended { uuid: String },
    #[error("the ownership record of guest {uuid} is not readable: {reason}")]
    Corrupt { uuid: String, reason: String },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// How often a transaction is retried when the record changed between reading and writing.
const ATTEMPTS: usize = 4;

/// The ownership record of `uuid` and its revision.
pub fn read(
    etcd: &Etcd,
    keys: &Keys,
    uuid: &str,
) -> Result<Option<(GuestRecord, i64)>, OwnershipError> {
    match etcd.get(&keys.guest(uuid))? {
        None => Ok(None),
        Some(kv) => Ok(Some((decode(uuid, &kv)?, kv.mod_revision))),
    }
}

fn decode(uuid: &str, kv: &KeyValue) -> Result<GuestRecord, OwnershipError> {
    serde_json::from_slice(&kv.value).map_err(|e| OwnershipError::Corrupt {
        uuid: uuid.to_string(),
        reason: e.to_string(),
    })
}

fn encode(record: &GuestRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// Makes `record.host` the owner of a guest that has no owner or is its already (starting,
/// restoring); refused if another host owns it.
pub fn claim(etcd: &Etcd, keys: &Keys, record: &GuestRecord) -> Result<(), OwnershipError> {
    let key = keys.guest(&record.uuid);
    for _ in 0..ATTEMPTS {
        let current = read(etcd, keys, &record.uuid)?;
        let when = match &current {
            None => Compare::Absent(key.clone()),
            Some((owner, revision)) => {
                if owner.host != record.host {
                    return Err(OwnershipError::OwnedElsewhere {
                        name: owner.name.clone(),
                        uuid: record.uuid.clone(),
                        owner: owner.host.clone(),
                    });
                }
                Compare::ModRevision(key.clone(), *revision)
            }
        };
        let mut claimed = record.clone();
        claimed.handover = None;
        let txn = Txn {
            when: vec![when],
            then: vec![
                put(&key, encode(&claimed)),
                put(&keys.on(&record.host, &record.uuid), encode(&claimed)),
            ],
            otherwise: vec![],
        };
        if etcd.txn(&txn)?.succeeded {
            return Ok(());
        }
    }
    Err(OwnershipError::Contended {
        uuid: record.uuid.clone(),
    })
}

/// Drops the record of a guest that ended on `host`; nothing if another host owns it (it
/// moved there) or it has none. Whether a record was dropped.
pub fn release(etcd: &Etcd, keys: &Keys, uuid: &str, host: &str) -> Result<bool, OwnershipError> {
    for _ in 0..ATTEMPTS {
        let Some((owner, revision)) = read(etcd, keys, uuid)? else {
            return Ok(false);
        };
        if owner.host != host {
            return Ok(false);
        }
        let txn = Txn {
            when: vec![Compare::ModRevision(keys.guest(uuid), revision)],
            then: vec![
                Op::Delete(keys.guest(uuid)),
                Op::Delete(keys.on(host, uuid)),
            ],
            otherwise: vec![],
        };
        if etcd.txn(&txn)?.succeeded {
            return Ok(true);
        }
    }
    Err(OwnershipError::Contended {
        uuid: uuid.to_string(),
    })
}

/// The handover of migration `migration_id`: `from` (which owns the guest) makes `to` the
/// owner, if `to` is alive in the pool and not in maintenance. Checked and done in one
/// transaction. If etcd's answer is lost, the record is read back (for up to `settle`) to
/// learn whether it was applied.
pub fn hand_over(
    etcd: &Etcd,
    keys: &Keys,
    uuid: &str,
    from: &str,
    to: &str,
    migration_id: &str,
    settle: Duration,
) -> Result<(), OwnershipError> {
    let (owner, revision) = read(etcd, keys, uuid)?.ok_or_else(|| OwnershipError::Unknown {
        uuid: uuid.to_string(),
    })?;
    if owner.host != from {
        return Err(OwnershipError::OwnedElsewhere {
            name: owner.name,
            uuid: uuid.to_string(),
            owner: owner.host,
        });
    }
    let moved = GuestRecord {
        host: to.to_string(),
        handover: Some(Handover {
            migration_id: migration_id.to_string(),
            from: from.to_string(),
        }),
        ..owner
    };
    let txn = Txn {
        when: vec![
            Compare::ModRevision(keys.guest(uuid), revision),
            Compare::Exists(keys.alive(to)),
            Compare::Absent(keys.maintenance(to)),
        ],
        then: vec![
            put(&keys.guest(uuid), encode(&moved)),
            Op::Delete(keys.on(from, uuid)),
            put(&keys.on(to, uuid), encode(&moved)),
        ],
        otherwise: vec![Op::Get(keys.alive(to)), Op::Get(keys.maintenance(to))],
    };
    match etcd.txn(&txn) {
        Ok(result) if result.succeeded => Ok(()),
        Ok(result) => Err(refusal(etcd, keys, uuid, to, &result.gets)),
        Err(e) if e.is_unreachable() => {
            // Applied or not: the record says.
            let deadline = Instant::now() + settle;
            loop {
                match read(etcd, keys, uuid) {
                    Ok(Some((now, _))) => {
                        let ours = now.host == to
                            && now
                                .handover
                                .as_ref()
                                .is_some_and(|h| h.migration_id == migration_id);
                        return if ours { Ok(()) } else { Err(e.into()) };
                    }
                    Ok(None) => return Err(e.into()),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(later) => return Err(later),
                }
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Why a handover's conditions failed.
fn refusal(
    etcd: &Etcd,
    keys: &Keys,
    uuid: &str,
    to: &str,
    gets: &[Option<KeyValue>],
) -> OwnershipError {
    match gets {
        [None, _] => OwnershipError::Destination {
            host: to.to_string(),
            why: "is down in the pool (its lease expired: its daemon is gone or cannot reach etcd)"
                .into(),
        },
        [_, Some(_)] => OwnershipError::Destination {
            host: to.to_string(),
            why: "is in maintenance".into(),
        },
        _ => match read(etcd, keys, uuid) {
            Ok(Some((owner, _))) => OwnershipError::OwnedElsewhere {
                name: owner.name,
                uuid: uuid.to_string(),
                owner: owner.host,
            },
            Ok(None) => OwnershipError::Unknown {
                uuid: uuid.to_string(),
            },
            Err(e) => e,
        },
    }
}

/// A migration whose handover moved the guest to another host did not complete: the guest
/// runs on `host` again, and the record says so once more. Nothing if the record moved on.
/// Whether it was taken back.
pub fn take_back(
    etcd: &Etcd,
    keys: &Keys,
    uuid: &str,
    host: &str,
    migration_id: &str,
) -> Result<bool, OwnershipError> {
    let Some((owner, revision)) = read(etcd, keys, uuid)? else {
        return Ok(false);
    };
    let ours = owner
        .handover
        .as_ref()
        .is_some_and(|h| h.migration_id == migration_id && h.from == host);
    if !ours {
        return Ok(false);
    }
    let back = GuestRecord {
        host: host.to_string(),
        handover: None,
        ..owner.clone()
    };
    let txn = Txn {
        when: vec![Compare::ModRevision(keys.guest(uuid), revision)],
        then: vec![
            put(&keys.guest(uuid), encode(&back)),
            Op::Delete(keys.on(&owner.host, uuid)),
            put(&keys.on(host, uuid), encode(&back)),
        ],
        otherwise: vec![],
    };
    Ok(etcd.txn(&txn)?.succeeded)
}

/// The guest arrived and runs on its new owner `host`: the handover can no longer be undone.
pub fn settle(etcd: &Etcd, keys: &Keys, uuid: &str, host: &str) -> Result<(), OwnershipError> {
    let Some((owner, revision)) = read(etcd, keys, uuid)? else {
        return Ok(());
    };
    if owner.host != host || owner.handover.is_none() {
        return Ok(());
    }
    let settled = GuestRecord {
        handover: None,
        ..owner
    };
    let txn = Txn {
        when: vec![Compare::ModRevision(keys.guest(uuid), revision)],
        then: vec![
            put(&keys.guest(uuid), encode(&settled)),
            put(&keys.on(host, uuid), encode(&settled)),
        ],
        otherwise: vec![],
    };
    etcd.txn(&txn)?;
    Ok(())
}

fn put(key: &str, value: Vec<u8>) -> Op {
    Op::Put {
        key: key.to_string(),
        value,
        lease: 0,
    }
}
