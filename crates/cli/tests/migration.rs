//! Migration between the two hosts of the test lab: real daemons talking TCP through their
//! relocation servers, the guest checking its own memory and registers on every arrival, a
//! client pinging and downloading from it while it moves, and faults injected at several
//! points (processes killed, the link cut).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_testkit::{Member, PingReport};

/// The guest of most tests: it writes 64 MiB/s over a 128 MiB working set and verifies all
/// of it every half second.
const WORKLOAD: &str = "heartbeat_ms=100 wss_mib=128 write_mibps=64 verify_ms=500 disk_mib=0";

/// Asserts the guest runs on `to` only, carried on from heartbeat `last_seq` (no reboot, no
/// lost state), and completed a clean pass over its memory and registers there.
fn assert_arrived(from: &Host, to: &Host, name: &str, last_seq: u64, took: Duration) {
    assert!(!from.has(name), "{name} is still listed on the source");
    let state = to.state(name).expect("listed on the destination");
    assert!(
        state == "running" || state == "blocked",
        "{name} is {state} on the destination"
    );
    // Heartbeats come every 100 ms; allow for the time the move took, and some slack.
    let max_beats = took.as_millis() as u64 / 100 + 20;
    let first = to.wait_heartbeat(name, last_seq + 1, Duration::from_secs(10));
    let beats = to.heartbeats(name);
    let earliest = beats.first().map(|(_, h)| h.seq).unwrap_or(0);
    assert!(
        earliest > last_seq.saturating_sub(1) && earliest <= last_seq + max_beats,
        "heartbeats on the destination start at {earliest}, the source was at {last_seq}"
    );
    let after = to.wait_heartbeat(name, first.seq + 1, Duration::from_secs(10));
    to.assert_checks_clean(name, &after);
}

/// Moves `name` from `from` to `to` (at `address`) and checks its arrival.
fn move_guest(from: &Host, to: &Host, address: &str, name: &str, args: &[&str]) -> Value {
    let before = from.last_beat(name);
    let started = Instant::now();
    let summary = from.migrate(name, address, args);
    assert_arrived(from, to, name, before.seq, started.elapsed());
    summary
}

#[test]
fn warm_and_live_round_trips_keep_the_guest_whole() {
    let pair = Pair::start();
    pair.h1.create_net_guest("g", WORKLOAD);
    let started = Instant::now();
    for kind in [&[][..], &["--live"][..]] {
        for trip in 0..10 {
            let there = move_guest(&pair.h1, &pair.h2, &host_ip(Member::Host2), "g", kind);
            let back = move_guest(&pair.h2, &pair.h1, &host_ip(Member::Host1), "g", kind);
            for s in [&there, &back] {
                assert_eq!(s["live"], !kind.is_empty());
                assert!(s["downtime_ms"].as_f64().unwrap_or(-1.0) > 0.0, "{s}");
            }
            println!(
                "{} trip {trip}: downtime {:.1} / {:.1} ms, total {:.2} / {:.2} s",
                if kind.is_empty() { "warm" } else { "live" },
                there["downtime_ms"].as_f64().unwrap_or(0.0),
                back["downtime_ms"].as_f64().unwrap_or(0.0),
                there["total_seconds"].as_f64().unwrap_or(0.0),
                back["total_seconds"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!("40 moves in {:.1} s", started.elapsed().as_secs_f64());
    pair.h2.assert_empty(&pair.lab, Member::Host2);
}

#[test]
fn clients_barely_notice_a_live_migration() {
    let pair = Pair::start();
    pair.h1.create_net_guest("web", WORKLOAD);
    let mut download = Download::start(&pair.lab, pair.h1.dir.join("download.bin"), "25M");
    let mut ping = std::process::Command::new(tern_testkit::find_program("ping").expect("ping"));
    ping.args(["-n", "-D", "-i", "0.01", "-c", "500", "10.77.0.10"]);
    ping.stdout(Stdio::piped());
    let ping = pair.lab.spawn_in(Member::Client, ping).expect("ping");
    std::thread::sleep(Duration::from_secs(2));
    assert!(download.running(), "the download should span the migration");
    let summary = move_guest(
        &pair.h1,
        &pair.h2,
        &host_ip(Member::Host2),
        "web",
        &["--live"],
    );
    let out = ping.wait_with_output().expect("ping output");
    let report = PingReport::parse(&String::from_utf8_lossy(&out.stdout)).expect("ping report");
    // What the guest's clients feel: no reply slower than 100 ms, and at most the one ping
    // in flight to the source's TAP at the switch lost.
    assert!(
        report.lost() <= 1,
        "lost {} pings: {:?}; downtime {} ms",
        report.lost(),
        report.missing_seqs(),
        summary["downtime_ms"]
    );
    let slowest = report.max_rtt().unwrap_or_default();
    assert!(
        slowest <= Duration::from_millis(100),
        "a ping took {slowest:?} ({}); downtime {} ms, longest vCPU stall {} ms",
        slow_replies(&report, &summary),
        summary["downtime_ms"],
        summary["longest_vcpu_stall_ms"]
    );
    download.assert_complete();
    println!(
        "downtime {} ms; {} pings lost of {}; slowest reply {:?}",
        summary["downtime_ms"],
        report.lost(),
        report.transmitted,
        report.max_rtt()
    );
}

/// The slowest ping replies and when each ping was sent, relative to the guest's pause.
fn slow_replies(report: &PingReport, summary: &Value) -> String {
    let paused = summary["paused_unix_ns"].as_f64().unwrap_or(0.0) / 1e9;
    let mut slow: Vec<_> = report.replies.iter().collect();
    slow.sort_by_key(|r| std::cmp::Reverse(r.rtt));
    slow.iter()
        .take(3)
        .map(|r| {
            let sent = r.timestamp.unwrap_or(0.0) - r.rtt.as_secs_f64();
            format!(
                "seq {} took {:?}, sent {:+.1} ms from the pause",
                r.seq,
                r.rtt,
                (sent - paused) * 1e3
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rate the pre-copy rounds drove the link at.
fn precopy_rate_mbit(summary: &Value) -> f64 {
    serde_json::from_value::<tern_api::MigrationSummary>(summary.clone())
        .expect("a migration summary")
        .precopy_rate_mbit()
}

#[test]
fn fast_writers_converge_and_the_rate_cap_holds() {
    let pair = Pair::start();
    // 256 MiB/s: the link is faster, the rounds shrink on their own.
    pair.h1.create_net_guest(
        "w",
        "heartbeat_ms=100 wss_mib=128 write_mibps=256 verify_ms=1000 disk_mib=0",
    );
    let fast = move_guest(
        &pair.h1,
        &pair.h2,
        &host_ip(Member::Host2),
        "w",
        &["--live"],
    );
    println!("256 MiB/s writer: {fast}");
    // The same writer behind a 800 Mbit/s cap (100 MB/s): it writes faster than the cap
    // lets pages through, so the guest is slowed down until the rounds shrink.
    let capped = move_guest(
        &pair.h2,
        &pair.h1,
        &host_ip(Member::Host1),
        "w",
        &["--live", "-r", "800"],
    );
    println!("behind a 800 Mbit/s cap: {capped}");
    assert!(
        capped["max_throttle_percent"].as_u64().unwrap_or(0) > 0,
        "no throttling: {capped}"
    );
    assert!(
        capped["downtime_ms"].as_f64().unwrap_or(f64::MAX) < 100.0,
        "a long pause: {capped}"
    );
    // Throttled in fine slices: no vCPU kept out long at a time.
    assert!(
        capped["longest_vcpu_stall_ms"].as_f64().unwrap_or(f64::MAX) < 100.0,
        "a long vCPU stall: {capped}"
    );
    let text = pair.h1.ok(&["destroy", "w"]);
    assert!(text.is_empty());

    // --resource 200: the rate stays within 10% of 200 Mbit/s.
    pair.h1.create_net_guest(
        "r",
        "heartbeat_ms=100 wss_mib=64 prefill=1 verify_ms=1000 disk_mib=0",
    );
    let limited = move_guest(
        &pair.h1,
        &pair.h2,
        &host_ip(Member::Host2),
        "r",
        &["--live", "-r", "200"],
    );
    let rate = precopy_rate_mbit(&limited);
    println!("--resource 200: {rate:.1} Mbit/s");
    assert!(
        (180.0..=220.0).contains(&rate),
        "{rate:.1} Mbit/s with a 200 Mbit/s cap"
    );
}

/// A slow live migration (a 400 Mbit/s cap over 256 MiB in use: about 6 s) to fail on purpose.
const SLOW: &[&str] = &["--live", "-r", "400"];
const SLOW_WORKLOAD: &str =
    "heartbeat_ms=100 wss_mib=256 prefill=1 write_mibps=32 verify_ms=1000 disk_mib=0";

#[test]
fn a_dying_destination_leaves_the_guest_on_the_source() {
    let mut pair = Pair::start();
    pair.h1.create_net_guest("f", SLOW_WORKLOAD);
    for delay in [Duration::from_millis(300), Duration::from_secs(3)] {
        let child = pair.h1.spawn_migrate("f", &host_ip(Member::Host2), SLOW);
        let pid = incoming_pid(&pair.h2);
        std::thread::sleep(delay);
        kill9(pid);
        assert_migrate_failed(child, &format!("destination guest killed after {delay:?}"));
        assert_still_runs(&pair.h1, "f");
        pair.h2.assert_empty(&pair.lab, Member::Host2);
    }

    let child = pair.h1.spawn_migrate("f", &host_ip(Member::Host2), SLOW);
    incoming_pid(&pair.h2);
    std::thread::sleep(Duration::from_secs(1));
    pair.h2.kill_daemon();
    assert_migrate_failed(child, "destination daemon killed");
    assert_still_runs(&pair.h1, "f");
    pair.h2.start_daemon();
    pair.h2.assert_empty(&pair.lab, Member::Host2);

    // And a migration still works afterwards.
    move_guest(
        &pair.h1,
        &pair.h2,
        &host_ip(Member::Host2),
        "f",
        &["--live"],
    );
}

#[test]
fn a_cut_link_or_a_killed_source_daemon_leaves_the_guest_on_the_source() {
    let mut pair = Pair::start();
    pair.h1.create_net_guest("c", SLOW_WORKLOAD);
    for delay in [Duration::from_millis(300), Duration::from_secs(3)] {
        let child = pair.h1.spawn_migrate("c", &host_ip(Member::Host2), SLOW);
        incoming_pid(&pair.h2);
        std::thread::sleep(delay);
        pair.set_link(Member::Host2, "down");
        let err = assert_migrate_failed(child, &format!("link cut after {delay:?}"));
        pair.set_link(Member::Host2, "up");
        assert!(!err.contains("unknown"), "{err}");
        assert_still_runs(&pair.h1, "c");
        pair.h2.assert_empty(&pair.lab, Member::Host2);
    }

    let child = pair.h1.spawn_migrate("c", &host_ip(Member::Host2), SLOW);
    incoming_pid(&pair.h2);
    std::thread::sleep(Duration::from_secs(1));
    pair.h1.kill_daemon();
    assert_migrate_failed(child, "source daemon killed");
    pair.h1.start_daemon();
    assert_still_runs(&pair.h1, "c");
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    move_guest(
        &pair.h1,
        &pair.h2,
        &host_ip(Member::Host2),
        "c",
        &["--live"],
    );
}

/// Migrates `name` and asserts a refusal containing `reason`, logged on both hosts, with the
/// guest still running on the source and nothing on the destination.
fn assert_refused(pair: &Pair, name: &str, reason: &str) {
    let err = pair
        .h1
        .fails(&["migrate", name, &host_ip(Member::Host2), "--live"]);
    assert!(err.contains(reason), "expected {reason:?} in {err:?}");
    assert!(
        pair.h2.daemon_log().contains(reason),
        "the destination did not log the refusal:\n{}",
        pair.h2.daemon_log()
    );
    assert!(
        pair.h1.daemon_log().contains(reason),
        "the source did not log the refusal"
    );
    assert_still_runs(&pair.h1, name);
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    println!("refused: {}", err.trim());
}

#[test]
fn the_destination_refuses_what_it_cannot_take() {
    let mut pair = Pair::start();
    pair.h1
        .create_net_guest("x", "heartbeat_ms=100 wss_mib=16 verify_ms=500 disk_mib=0");

    // CPU: the destination hides a feature the guest was started with.
    pair.h2
        .reconfigure(Member::Host2, "hide_cpu_features = [\"cx16\"]", "");
    assert_refused(&pair, "x", "cx16");
    // Memory: the destination can give guests 512 MiB, the guest has 1 GiB.
    pair.h2
        .reconfigure(Member::Host2, "guest_memory_mib = 512", "");
    assert_refused(&pair, "x", "memory");
    // Storage: host1's scratch directory is host2's too, so that a disk there is refused
    // only when it is gone.
    let storage = format!(
        "storage = [\"{}\", \"{}\"]",
        tern_testguest::path().parent().expect("dir").display(),
        pair.h1.dir.display()
    );
    pair.h2.reconfigure(Member::Host2, "", &storage);

    // Name, then UUID: a guest of that name (or UUID) already runs there.
    let cfg = pair.h2.guest_config("x", 64, 1, "heartbeat_ms=500");
    pair.h2.ok(&["create", cfg.to_str().expect("path")]);
    let err = pair.h1.fails(&["migrate", "x", &host_ip(Member::Host2)]);
    assert!(err.contains("already"), "{err}");
    pair.h2.ok(&["destroy", "x"]);
    let uuid = pair.h1.list()[0]["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let cfg = pair.h2.guest_config("other", 64, 1, "heartbeat_ms=500");
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!("uuid = \"{uuid}\"\n"));
    std::fs::write(&cfg, text).expect("config");
    pair.h2.ok(&["create", cfg.to_str().expect("path")]);
    let err = pair.h1.fails(&["migrate", "x", &host_ip(Member::Host2)]);
    assert!(err.contains(&uuid), "{err}");
    pair.h2.ok(&["destroy", "other"]);
    assert_still_runs(&pair.h1, "x");
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    pair.h1.ok(&["destroy", "x"]);

    // Devices: a bridge only host1 has, and a disk that is gone.
    for args in [
        &["link", "add", "br9", "type", "bridge"][..],
        &["link", "set", "br9", "up"],
    ] {
        pair.lab.exec(Member::Host1, "ip", args).expect("ip");
    }
    let disk = pair.h1.dir.join("only-here.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk");
    let cfg = pair.h1.guest_config(
        "d",
        256,
        1,
        "heartbeat_ms=100 wss_mib=16 verify_ms=500 disk_mib=4",
    );
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str("vif = [ 'mac=02:77:00:00:00:19, bridge=br9' ]\n");
    text.push_str(&format!("disk = [ 'file:{},xvda,w' ]\n", disk.display()));
    std::fs::write(&cfg, text).expect("config");
    pair.h1.ok(&["create", cfg.to_str().expect("path")]);
    pair.h1.wait_heartbeat("d", 3, Duration::from_secs(30));
    assert_refused(&pair, "d", "br9");
    pair.lab
        .exec(
            Member::Host2,
            "ip",
            &["link", "add", "br9", "type", "bridge"],
        )
        .expect("ip");
    std::fs::remove_file(&disk).expect("remove the disk");
    assert_refused(&pair, "d", "only-here.img");
}

#[test]
fn unknown_hosts_and_other_versions_are_refused() {
    let pair = Pair::start_with(&["^10\\.77\\.0\\.100$"], "", "");
    pair.h1
        .create_net_guest("a", "heartbeat_ms=100 wss_mib=16 verify_ms=500 disk_mib=0");
    assert_refused(&pair, "a", "hosts_allow");

    // A source speaking another protocol version (the client's address is allowed), over TLS
    // with a key the destination trusts (host1's).
    let addr = SocketAddr::from((Member::Host2.ip(), 8002));
    let conn = pair
        .lab
        .tcp_connect(Member::Client, addr, Duration::from_secs(5))
        .expect("connect to the relocation server");
    let tls_dir = pair.h1.state_dir.join("tls");
    let identity = tern_tls::Identity::load(&tls_dir.join("host.crt"), &tls_dir.join("host.key"))
        .expect("host1's identity");
    let h2_key = pair
        .h2
        .fingerprint()
        .expect("fingerprint")
        .parse()
        .expect("a fingerprint");
    let config = tern_tls::client_config(&identity, tern_tls::pinned(h2_key)).expect("config");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut conn = tern_tls::TlsStream::connect(conn, config, &host_ip(Member::Host2), deadline)
        .expect("a TLS session with host2");
    conn.tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let offer = serde_json::json!({
        "type": "offer",
        "protocol": 999,
        "stream_format": 999,
        "migration_id": "from-the-future",
        "live": true,
        "info": {
            "tern_version": "99.0.0", "created_unix": 0, "host": "future",
            "guest_name": "visitor", "guest_uuid": "00000000-0000-0000-0000-000000000099",
            "memory_bytes": 134217728u64, "vcpus": 1, "cpu_features": []
        },
        "config": {},
        "vcpu_cpuid": []
    });
    writeln!(conn, "{offer}").expect("send the offer");
    conn.close_write().expect("end the request");
    let mut reply = String::new();
    BufReader::new(&mut conn)
        .read_line(&mut reply)
        .expect("read the answer");
    let reply: Value = serde_json::from_str(&reply).expect("a JSON answer");
    assert_eq!(reply["type"], "refuse", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .unwrap_or("")
            .contains("protocol version"),
        "{reply}"
    );
    pair.h2.assert_empty(&pair.lab, Member::Host2);
}

#[test]
fn of_two_migrations_at_once_exactly_one_starts() {
    let pair = Pair::start();
    pair.h1.create_net_guest("t", SLOW_WORKLOAD);
    let before = pair.h1.last_beat("t");
    let started = Instant::now();
    let first = pair.h1.spawn_migrate("t", &host_ip(Member::Host2), SLOW);
    incoming_pid(&pair.h2);
    let second = pair
        .h1
        .fails(&["migrate", "t", &host_ip(Member::Host2), "--live"]);
    assert!(second.contains("'t' is already migrating"), "{second}");
    let out = first.wait_with_output().expect("tern migrate");
    assert!(
        out.status.success(),
        "the first migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_arrived(&pair.h1, &pair.h2, "t", before.seq, started.elapsed());
}
