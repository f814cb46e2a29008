//! A pool of three hosts on a three-member etcd (real etcd with TLS, in the lab's
//! namespaces): evacuating a host, and ownership refusing a guest to a host that does not own
//! it.

mod common;

use std::time::Duration;

use common::{relocation_toml, Host};
use tern_testkit::{EtcdCluster, KvmLock, Member, NetLab, LAB_HOSTS_ALLOW};

/// Each guest's memory; host2 and host3 let their guests have 512 MiB together.
const GUEST_MIB: u64 = 128;
/// A guest that writes and verifies its memory stamps and checks its registers.
const CHECKING: &str = "heartbeat_ms=100 wss_mib=16 write_mibps=4";

/// Dropped in this order: the daemons, etcd, the lab.
struct Pool {
    hosts: Vec<Host>,
    etcd: EtcdCluster,
    lab: NetLab,
    _lock: KvmLock,
}

impl Pool {
    /// host1 (room for anything), host2 and host3 (512 MiB of guests each), all trusting each
    /// other, in pool "lab", on 3 s leases.
    fn start() -> Pool {
        Pool::start_with_lease(3)
    }

    /// [`Pool::start`] with leases of `ttl_s` seconds.
    fn start_with_lease(ttl_s: u64) -> Pool {
        let lock = KvmLock::acquire();
        let lab = NetLab::new().expect("build the network lab");
        let etcd = EtcdCluster::in_lab(&lab).expect("start etcd");
        let hosts: Vec<Host> = Member::HOSTS
            .iter()
            .map(|&m| {
                let top = if m == Member::Host1 {
                    ""
                } else {
                    "guest_memory_mib = 512"
                };
                let pool = etcd.pool_toml(
                    "lab",
                    m.name(),
                    &format!("{}:8002", m.ip()),
                    &format!("lease_ttl_s = {ttl_s}"),
                );
                Host::in_lab(
                    &lab,
                    m,
                    &format!("{}\n{pool}", relocation_toml(m, &[LAB_HOSTS_ALLOW], top)),
                )
            })
            .collect();
        for (i, a) in hosts.iter().enumerate() {
            for (j, b) in hosts.iter().enumerate().skip(i + 1) {
                a.trust(b, &format!("host{}", j + 1)).expect("trust");
                b.trust(a, &format!("host{}", i + 1)).expect("trust");
            }
        }
        Pool {
            hosts,
            etcd,
            lab,
            _lock: lock,
        }
    }

    /// Cuts `member` off from every etcd member (blackhole routes in its namespace); it still
    /// reaches the other hosts.
    fn cut_off_from_etcd(&self, member: Member) {
        for e in Member::ETCD {
            let out = self
                .lab
                .exec(
                    member,
                    "ip",
                    &["route", "add", "blackhole", &format!("{}/32", e.ip())],
                )
                .expect("ip route");
            assert!(out.status.success(), "blackhole route to {}", e.ip());
        }
    }

    fn host(&self, name: &str) -> &Host {
        let i = Member::HOSTS
            .iter()
            .position(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no host {name}"));
        &self.hosts[i]
    }

    /// `tern list --pool --json` on `on`: (guest name, host) sorted.
    fn pool_guests(&self, on: &Host) -> Vec<(String, String)> {
        let out = on.ok(&["list", "--pool", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("pool list");
        let mut rows: Vec<(String, String)> = list
            .iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap_or("").to_string(),
                    g["host"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    /// Every host's own `tern list`: (guest name, host) sorted.
    fn local_guests(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for (m, h) in Member::HOSTS.iter().zip(&self.hosts) {
            for d in h.list() {
                rows.push((
                    d["name"].as_str().unwrap_or("").to_string(),
                    m.name().to_string(),
                ));
            }
        }
        rows.sort();
        rows
    }

    /// `tern host list --json` on `on`: (host, state, guests).
    fn host_states(&self, on: &Host) -> Vec<(String, String, u64)> {
        let out = on.ok(&["host", "list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("host list");
        list.iter()
            .map(|h| {
                (
                    h["name"].as_str().unwrap_or("").to_string(),
                    h["state"].as_str().unwrap_or("").to_string(),
                    h["guests"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

#[test]
fn six_guests_are_evacuated_live_as_planned_and_a_plan_that_cannot_fit_moves_nothing() {
    let pool = Pool::start();
    let h1 = pool.host("host1");
    let names: Vec<String> = (1..=6).map(|i| format!("g{i}")).collect();
    for name in &names {
        h1.create_guest(name, GUEST_MIB, 1, CHECKING);
    }
    assert!(
        common::wait_for(Duration::from_secs(10), || {
            pool.host_states(h1)
                .iter()
                .any(|h| h.0 == "host1" && h.2 == 6)
        }),
        "host1 did not publish its 6 guests: {:?}",
        pool.host_states(h1)
    );

    // The plan, first without moving anything.
    let out = h1.ok(&["host", "evacuate", "host1", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&out).expect("plan");
    let planned: Vec<(String, String)> = plan["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .map(|m| {
            (
                m["guest"].as_str().unwrap().to_string(),
                m["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(planned.len(), 6, "{plan}");
    for to in ["host2", "host3"] {
        assert_eq!(planned.iter().filter(|m| m.1 == to).count(), 3, "{plan}");
    }
    assert_eq!(
        pool.local_guests()
            .iter()
            .filter(|g| g.1 == "host1")
            .count(),
        6
    );
    let before: Vec<_> = names.iter().map(|n| (n.clone(), h1.last_beat(n))).collect();

    // Asked from host2: host1's daemon moves its guests (over the relocation channel).
    let out = pool.host("host2").ok(&[
        "host",
        "evacuate",
        "host1",
        "--live",
        "--parallel",
        "2",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&out).expect("summary");
    assert_eq!(
        summary["moved"].as_array().map(Vec::len),
        Some(6),
        "{summary}"
    );
    assert!(
        summary["failed"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );

    // Each guest runs where the plan said, with its checks clean and its heartbeat going on.
    for (name, beat) in &before {
        let to = &planned.iter().find(|m| &m.0 == name).expect("planned").1;
        let host = pool.host(to);
        let now = host.wait_heartbeat(name, beat.seq + 1, Duration::from_secs(30));
        assert!(now.seq > beat.seq);
        host.assert_checks_clean(name, beat);
        assert!(!h1.has(name), "{name} still on host1");
    }
    let mut expected = planned.clone();
    expected.sort();
    assert_eq!(pool.local_guests(), expected);
    for h in &pool.hosts {
        assert_eq!(pool.pool_guests(h), expected, "the pool as host sees it");
    }
    let states = pool.host_states(h1);
    assert!(
        states.contains(&("host1".into(), "maintenance".into(), 0)),
        "{states:?}"
    );

    // host2 cannot go: host1 is in maintenance and host3 has 128 MiB left for 3 guests.
    // (Asked from host3: the refusal comes back from host2.)
    let err = pool
        .host("host3")
        .fails(&["host", "evacuate", "host2", "--live"]);
    assert!(err.contains("no host can take guest"), "{err}");
    assert_eq!(pool.local_guests(), expected, "nothing moved");
    let states = pool.host_states(h1);
    assert!(
        states.contains(&("host2".into(), "up".into(), 3)),
        "{states:?}"
    );

    // host1 takes guests again once resumed.
    h1.ok(&["host", "resume", "host1"]);
    let states = pool.host_states(h1);
    assert!(
        states.contains(&("host1".into(), "up".into(), 0)),
        "{states:?}"
    );
}

#[test]
fn only_the_owner_restores_a_guest_and_a_saved_guest_is_free_to_go() {
    let pool = Pool::start();
    let (h1, h2) = (pool.host("host1"), pool.host("host2"));
    h1.create_guest("g", GUEST_MIB, 1, CHECKING);
    let file = h1.dir.join("g.ckpt");
    let file = file.to_str().expect("path");
    h1.ok(&["save", "-c", "g", file]);

    // The guest runs on host1: host2 may not bring a copy of it to life.
    let err = h2.fails(&["restore", file]);
    assert!(
        err.contains("belongs to host host1") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!h2.has("g"));
    assert_eq!(
        pool.pool_guests(h2),
        vec![("g".to_string(), "host1".to_string())]
    );
    // Nor may host1 run a second copy; the record of the one that runs stays.
    h1.fails(&["restore", file]);
    assert_eq!(
        pool.pool_guests(h2),
        vec![("g".to_string(), "host1".to_string())]
    );

    // Saved and stopped, it belongs to no host: restored on host2, it is host2's.
    h1.ok(&["save", "g", file]);
    assert!(pool.pool_guests(h2).is_empty());
    h2.ok(&["restore", file]);
    let beat = h2.wait_heartbeat("g", 1, Duration::from_secs(30));
    h2.assert_checks_clean("g", &beat);
    assert_eq!(
        pool.pool_guests(h1),
        vec![("g".to_string(), "host2".to_string())]
    );
    let err = h1.fails(&["restore", file]);
    assert!(err.contains("belongs to host host2"), "{err}");
}

/// How many of `names` the pool says run on a host other than host1.
fn moved_off_host1(pool: &Pool, names: &[String]) -> usize {
    pool.local_guests()
        .iter()
        .filter(|(n, h)| names.contains(n) && h != "host1")
        .count()
}

#[test]
fn an_evacuation_survives_a_killed_etcd_member_and_a_killed_daemon_run_again_finishes_it() {
    let mut pool = Pool::start();
    let names: Vec<String> = (1..=6).map(|i| format!("g{i}")).collect();
    for name in &names {
        pool.host("host1")
            .create_guest(name, GUEST_MIB, 1, CHECKING);
    }
    let before: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), pool.host("host1").last_beat(n)))
        .collect();
    let mut first = pool
        .host("host1")
        .spawn(&["host", "evacuate", "host1", "--live", "--json"]);

    // One etcd member dies once the first guest has moved: the others carry on.
    assert!(common::wait_for(
        Duration::from_secs(60),
        || moved_off_host1(&pool, &names) >= 1
    ));
    pool.etcd.kill(0);
    // The evacuating daemon dies halfway.
    assert!(
        common::wait_for(Duration::from_secs(60), || moved_off_host1(&pool, &names)
            >= 3),
        "{:?}",
        pool.local_guests()
    );
    pool.hosts[0].kill_daemon();
    let status = first.wait().expect("first evacuate");
    assert!(
        !status.success(),
        "the first evacuation ended with its daemon"
    );

    // Restarted (it adopts the guests still there), run again: it moves what is left — once
    // the move the killed daemon had under way has ended one way or the other (its guest
    // process finishes or gives it up by itself; until then the guest is still migrating).
    pool.hosts[0].start_daemon();
    assert!(
        common::wait_for(Duration::from_secs(30), || pool
            .host("host1")
            .list()
            .iter()
            .all(|d| d["state"] != "migrating")),
        "a migration the killed daemon started never ended: {:?}",
        pool.host("host1").list()
    );
    let out = pool
        .host("host1")
        .ok(&["host", "evacuate", "host1", "--live", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&out).expect("summary");
    assert!(
        summary["failed"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );
    let left = 6 - summary["moved"].as_array().map_or(0, Vec::len);
    assert!((1..6).contains(&left), "{summary}");

    // Every guest runs on exactly one host, the one its ownership record names.
    let local = pool.local_guests();
    assert_eq!(local.len(), 6, "{local:?}");
    assert!(local.iter().all(|(_, h)| h != "host1"), "{local:?}");
    for h in &pool.hosts {
        assert_eq!(pool.pool_guests(h), local);
    }
    for (name, beat) in &before {
        let host = &local.iter().find(|g| &g.0 == name).expect("placed").1;
        pool.host(host).assert_checks_clean(name, beat);
    }
}

#[test]
fn a_destination_cut_off_from_etcd_during_a_handover_leaves_the_guest_on_the_source() {
    let pool = Pool::start();
    let (h1, h3) = (pool.host("host1"), pool.host("host3"));
    h1.create_guest("g", GUEST_MIB, 1, CHECKING);
    let before = h1.last_beat("g");
    // Slow enough to cut host3 off while the guest is on its way.
    let migrate = h1.spawn_migrate("g", "10.77.0.3", &["--live", "--resource", "20"]);
    assert!(
        common::wait_for(Duration::from_secs(30), || h3.has("g")),
        "the guest never started arriving on host3"
    );
    pool.cut_off_from_etcd(Member::Host3);
    let err = common::assert_migrate_failed(migrate, "host3 cannot reach etcd");
    assert!(err.contains("may not take the guest"), "{err}");

    // The guest runs on host1 as before, which still owns it; nothing of it on host3.
    let state = h1.state("g");
    assert!(
        matches!(state.as_deref(), Some("running" | "blocked")),
        "{state:?}"
    );
    h1.assert_checks_clean("g", &before);
    assert!(common::wait_for(Duration::from_secs(20), || !h3.has("g")));
    assert_eq!(
        pool.pool_guests(h1),
        vec![("g".to_string(), "host1".to_string())]
    );
}

#[test]
fn an_evacuation_with_a_destination_cut_off_from_etcd_moves_the_others() {
    // Long leases: host3 stays up in the pool while the evacuation plans, however loaded the
    // machine is when the cut comes.
    let pool = Pool::start_with_lease(20);
    let h1 = pool.host("host1");
    let names: Vec<String> = (1..=6).map(|i| format!("g{i}")).collect();
    for name in &names {
        h1.create_guest(name, GUEST_MIB, 1, CHECKING);
    }
    let before: Vec<_> = names.iter().map(|n| (n.clone(), h1.last_beat(n))).collect();
    let out = h1.ok(&["host", "evacuate", "host1", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&out).expect("plan");
    let to_host3: Vec<String> = plan["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .filter(|m| m["to"] == "host3")
        .map(|m| m["guest"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(to_host3.len(), 3, "{plan}");

    // host3 loses etcd as the evacuation starts (its lease still shows it up for a while).
    let evacuation = h1.spawn(&["host", "evacuate", "host1", "--live", "--json"]);
    pool.cut_off_from_etcd(Member::Host3);
    let out = evacuation.wait_with_output().expect("evacuate");
    assert!(!out.status.success(), "some guests could not go");
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("summary on stdout");
    let mut failed: Vec<String> = summary["failed"]
        .as_array()
        .expect("failed")
        .iter()
        .map(|f| f[0].as_str().unwrap_or("").to_string())
        .collect();
    failed.sort();
    assert_eq!(failed, to_host3, "{summary}");

    // Those run on host1 still, the others on host2; each on one host, the one its record names.
    let local = pool.local_guests();
    for (name, host) in &local {
        let expected = if to_host3.contains(name) {
            "host1"
        } else {
            "host2"
        };
        assert_eq!(host, expected, "{local:?}");
    }
    assert_eq!(local.len(), 6, "{local:?}");
    assert_eq!(pool.pool_guests(pool.host("host2")), local);
    for (name, beat) in &before {
        let host = &local.iter().find(|g| &g.0 == name).expect("placed").1;
        pool.host(host).assert_checks_clean(name, beat);
    }
}

#[test]
fn a_host_cut_off_from_etcd_keeps_its_guests_and_says_so() {
    let pool = Pool::start();
    let (h1, h2) = (pool.host("host1"), pool.host("host2"));
    h1.create_guest("g", GUEST_MIB, 1, CHECKING);
    let before = h1.last_beat("g");
    pool.cut_off_from_etcd(Member::Host1);
    let says_so = |h: &Host| {
        h.list().iter().any(|d| {
            d["note"]
                .as_str()
                .is_some_and(|n| n.contains("etcd unreachable"))
        })
    };
    assert!(
        common::wait_for(Duration::from_secs(20), || says_so(h1)),
        "{:?}",
        h1.list()
    );
    let err = h1.fails(&["migrate", "g", "10.77.0.2", "--live"]);
    assert!(err.contains("cannot reach etcd"), "{err}");
    let state = h1.state("g");
    assert!(
        matches!(state.as_deref(), Some("running" | "blocked")),
        "{state:?}"
    );
    h1.assert_checks_clean("g", &before);
    assert!(!h2.has("g"));
    // The others see host1 down once its lease ran out; the record still names it.
    assert!(common::wait_for(Duration::from_secs(20), || {
        pool.host_states(h2)
            .iter()
            .any(|h| h.0 == "host1" && h.1 == "down")
    }));
    assert_eq!(
        pool.pool_guests(h2),
        vec![("g".to_string(), "host1".to_string())]
    );
}

#[test]
fn a_guest_lost_in_post_copy_and_forced_back_on_its_source_is_owned_there_again() {
    let pool = Pool::start();
    let (h1, h2) = (pool.host("host1"), pool.host("host2"));
    // A post-copy that completes makes the handover final once the last page is in.
    h1.create_guest("ok", GUEST_MIB, 1, CHECKING);
    h1.migrate("ok", "10.77.0.3", &["--live", "--postcopy"]);
    let settled = || {
        let out = h1.ok(&["list", "--pool", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("pool list");
        list.iter()
            .any(|g| g["name"] == "ok" && g["host"] == "host3" && g["handover"].is_null())
    };
    assert!(common::wait_for(Duration::from_secs(30), settled));
    // Destroyed there, it leaves the pool.
    pool.host("host3").ok(&["destroy", "ok"]);
    assert!(pool.pool_guests(h1).is_empty());
    h1.create_guest(
        "pc",
        256,
        1,
        "heartbeat_ms=100 wss_mib=128 write_mibps=256 verify_ms=1000",
    );
    // Slow enough that the destination still lacks pages when it is killed.
    let migrate = h1.spawn_migrate("pc", "10.77.0.2", &["--live", "--postcopy", "-r", "100"]);
    let in_postcopy = || {
        h1.list().iter().any(|d| {
            d["name"] == "pc" && d["note"].as_str().is_some_and(|n| n.contains("post-copy"))
        })
    };
    assert!(common::wait_for(Duration::from_secs(120), in_postcopy));
    // Running there, owned there; not yet final.
    assert_eq!(pool.pool_guests(h1), vec![("pc".into(), "host2".into())]);
    common::kill9(h2.guest_pid("pc"));
    let err = common::assert_migrate_failed(migrate, "destination killed in post-copy");
    assert!(err.contains("lost the guest during post-copy"), "{err}");

    // The user runs the source's copy: the pool gives it back to host1.
    let forced = h1.tern(&["unpause", "--force", "pc"]);
    assert!(forced.status.success());
    assert!(
        common::wait_for(Duration::from_secs(20), || pool.pool_guests(h2)
            == vec![("pc".to_string(), "host1".to_string())]),
        "{:?}",
        pool.pool_guests(h2)
    );
    let beat = h1.wait_heartbeat("pc", 1, Duration::from_secs(20));
    h1.assert_checks_clean("pc", &beat);
    assert!(!h2.has("pc"));
}
