//! The pool's records against a real etcd (Debian's `etcd`, three members on loopback).

use std::sync::Arc;
use std::time::Duration;

use tern_pool::{
    ownership, Admits, GuestRecord, HostRecord, HostState, Keys, Membership, OwnershipError,
    PoolView,
};
use tern_testkit::EtcdCluster;

fn guest(uuid: &str, host: &str) -> GuestRecord {
    GuestRecord {
        uuid: uuid.into(),
        name: format!("g-{uuid}"),
        host: host.into(),
        memory_mib: 256,
        vcpus: 1,
        ..GuestRecord::default()
    }
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        address: format!("{name}:8002"),
        memory_total_mib: 4096,
        memory_free_mib: 4096,
        admits: Admits {
            incoming: true,
            ..Admits::default()
        },
        ..HostRecord::default()
    }
}

fn owner(etcd: &tern_pool::Etcd, keys: &Keys, uuid: &str) -> Option<GuestRecord> {
    ownership::read(etcd, keys, uuid).unwrap().map(|(r, _)| r)
}

#[test]
fn ownership_is_claimed_handed_over_taken_back_and_released() {
    let cluster = EtcdCluster::local(3).expect("etcd");
    let etcd = Arc::new(cluster.client().unwrap());
    let keys = Keys::new("t1");
    let _h1 = Membership::join(etcd.clone(), keys.clone(), host("h1"), 5).unwrap();
    let h2 = Membership::join(etcd.clone(), keys.clone(), host("h2"), 5).unwrap();
    let view = PoolView {
        etcd: &etcd,
        keys: &keys,
    };

    ownership::claim(&etcd, &keys, &guest("u1", "h1")).unwrap();
    // Claiming again where it is owned is fine (a restart); elsewhere it is refused.
    ownership::claim(&etcd, &keys, &guest("u1", "h1")).unwrap();
    let err = ownership::claim(&etcd, &keys, &guest("u1", "h2")).unwrap_err();
    assert!(
        matches!(&err, OwnershipError::OwnedElsewhere { owner, .. } if owner == "h1"),
        "{err}"
    );
    assert_eq!(view.guests_on("h1").unwrap().len(), 1);

    // Only the owner hands over, and only to a live host out of maintenance.
    assert!(ownership::hand_over(&etcd, &keys, "u1", "h2", "h1", "m0", Duration::ZERO).is_err());
    view.set_maintenance("h2", true, "test").unwrap();
    let err =
        ownership::hand_over(&etcd, &keys, "u1", "h1", "h2", "m1", Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("maintenance"), "{err}");
    view.set_maintenance("h2", false, "test").unwrap();
    let err =
        ownership::hand_over(&etcd, &keys, "u1", "h1", "h3", "m1", Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("down"), "{err}");

    ownership::hand_over(&etcd, &keys, "u1", "h1", "h2", "m1", Duration::ZERO).unwrap();
    let moved = owner(&etcd, &keys, "u1").unwrap();
    assert_eq!(moved.host, "h2");
    assert_eq!(moved.handover.as_ref().unwrap().migration_id, "m1");
    assert!(view.guests_on("h1").unwrap().is_empty());
    assert_eq!(view.guests_on("h2").unwrap()[0].uuid, "u1");
    // h1 no longer owns it: releasing it there changes nothing.
    assert!(!ownership::release(&etcd, &keys, "u1", "h1").unwrap());

    // The migration did not complete: h1 takes it back (only for that migration).
    assert!(!ownership::take_back(&etcd, &keys, "u1", "h1", "other").unwrap());
    assert!(ownership::take_back(&etcd, &keys, "u1", "h1", "m1").unwrap());
    assert_eq!(owner(&etcd, &keys, "u1").unwrap().host, "h1");
    assert_eq!(view.guests_on("h1").unwrap().len(), 1);
    assert!(view.guests_on("h2").unwrap().is_empty());

    // Moved again and settled there: no taking back any more.
    ownership::hand_over(&etcd, &keys, "u1", "h1", "h2", "m2", Duration::ZERO).unwrap();
    ownership::settle(&etcd, &keys, "u1", "h2").unwrap();
    assert!(owner(&etcd, &keys, "u1").unwrap().handover.is_none());
    assert!(!ownership::take_back(&etcd, &keys, "u1", "h1", "m2").unwrap());

    assert!(ownership::release(&etcd, &keys, "u1", "h2").unwrap());
    assert!(owner(&etcd, &keys, "u1").is_none());
    assert!(view.guests_on("h2").unwrap().is_empty());

    // A host that leaves shows down; maintenance shows.
    view.set_maintenance("h1", true, "test").unwrap();
    h2.leave();
    let states: Vec<(String, HostState)> = view
        .hosts()
        .unwrap()
        .into_iter()
        .map(|h| (h.record.name, h.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("h1".to_string(), HostState::Maintenance),
            ("h2".to_string(), HostState::Down)
        ]
    );
}

#[test]
fn of_hosts_racing_for_one_guest_exactly_one_wins() {
    let cluster = EtcdCluster::local(1).expect("etcd");
    let etcd = Arc::new(cluster.client().unwrap());
    let keys = Keys::new("t2");
    for round in 0..20 {
        let uuid = format!("race-{round}");
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|h| {
                    let (etcd, keys, uuid) = (&etcd, &keys, &uuid);
                    s.spawn(move || {
                        ownership::claim(etcd, keys, &guest(uuid, &format!("h{h}"))).is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "round {round}");
    }
}

#[test]
fn a_lease_that_expires_shows_the_host_down_and_its_return_up() {
    let mut cluster = EtcdCluster::local(1).expect("etcd");
    let etcd = Arc::new(cluster.client().unwrap());
    let keys = Keys::new("t3");
    let h1 = Membership::join(etcd.clone(), keys.clone(), host("h1"), 2).unwrap();
    let view_state = |etcd: &tern_pool::Etcd| {
        PoolView { etcd, keys: &keys }
            .hosts()
            .ok()
            .and_then(|h| h.first().map(|h| h.state))
    };
    assert_eq!(view_state(&etcd), Some(HostState::Up));
    // etcd away for longer than the lease: the host cannot renew; back, it joins again.
    cluster.kill(0);
    assert!(tern_testkit::wait_for(Duration::from_secs(10), || !h1
        .health()
        .reachable));
    std::thread::sleep(Duration::from_secs(3));
    cluster.restart(0).unwrap();
    let client = cluster.client().unwrap();
    assert!(tern_testkit::wait_for(Duration::from_secs(20), || {
        h1.health().reachable && view_state(&client) == Some(HostState::Up)
    }));
}
