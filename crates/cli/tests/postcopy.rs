//! Post-copy migration between the two hosts of the test lab: real daemons, real KVM, the
//! networked test guest writing 256 MiB/s and checking its own memory and registers. The
//! guest must arrive whole, through a cut link too; a destination killed during post-copy
//! leaves the guest's last whole copy paused on the source, which only a forced unpause runs.

mod common;

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_testkit::Member;

/// A guest that writes 256 MiB/s over a 128 MiB working set and verifies all of it every
/// second: every round of pre-copy finds most of it dirty again.
const WRITER: &str = "heartbeat_ms=100 wss_mib=128 write_mibps=256 verify_ms=1000 disk_mib=0";
/// Post-copy behind a 200 Mbit/s cap (25 MB/s): the pages the destination lacks take seconds
/// to arrive, long enough to cut the link or kill the destination meanwhile.
const SLOW_POSTCOPY: &[&str] = &["--json", "--live", "--postcopy", "-r", "200"];
/// The longest any one migration in these tests may take.
const MIGRATION_BOUND: Duration = Duration::from_secs(180);

/// The `tern list --json` row of `name` on `host`, if listed.
fn row(host: &Host, name: &str) -> Option<Value> {
    host.list().into_iter().find(|d| d["name"] == name)
}

/// The note `tern list` shows for `name` on `host`.
fn note(host: &Host, name: &str) -> String {
    row(host, name)
        .and_then(|d| d["note"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Waits until the note of `name` on `host` contains `text`.
fn wait_note(host: &Host, name: &str, text: &str, timeout: Duration) {
    let seen = wait_for(timeout, || note(host, name).contains(text));
    assert!(
        seen,
        "the note of {name} never said {text:?}; it says {:?}\n{}",
        note(host, name),
        host.daemon_log()
    );
}

/// Waits for a backgrounded `tern migrate`, at most [`MIGRATION_BOUND`].
fn finish(mut child: Child) -> Output {
    let ended = wait_for(MIGRATION_BOUND, || !matches!(child.try_wait(), Ok(None)));
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("tern migrate");
    assert!(ended, "tern migrate did not end within {MIGRATION_BOUND:?}");
    out
}

/// The summary of a `tern migrate --json` that must have succeeded.
fn summary_of(out: &Output, host: &Host) -> Value {
    assert!(
        out.status.success(),
        "the migration failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        host.daemon_log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("summary {text:?}: {e}"))
}

/// The post-copy part of a summary, checked to account for every missing page.
fn postcopy_of(summary: &Value) -> &Value {
    let pc = &summary["postcopy"];
    let count = |k: &str| {
        pc[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {summary}"))
    };
    assert!(
        count("pages_missing") > 0,
        "nothing was left for post-copy: {summary}"
    );
    assert_eq!(
        count("pages_fetched") + count("pages_pushed"),
        count("pages_missing"),
        "{summary}"
    );
    assert!(pc["seconds_until_complete"].as_f64().is_some(), "{summary}");
    assert!(
        summary["stop_reason"]
            .as_str()
            .is_some_and(|r| r.contains("post-copy")),
        "{summary}"
    );
    pc
}

/// Asserts the guest runs on `to` only, carried on from heartbeat `last_seq`, and completed
/// a full pass over its memory and registers there, clean.
fn assert_arrived(from: &Host, to: &Host, name: &str, last_seq: u64) {
    let gone = wait_for(Duration::from_secs(30), || !from.has(name));
    assert!(gone, "{name} is still listed on the source");
    let state = to.state(name).expect("listed on the destination");
    assert!(
        state == "running" || state == "blocked",
        "{name} is {state} on the destination"
    );
    assert!(
        !note(to, name).contains("post-copy"),
        "every page arrived, yet: {}",
        note(to, name)
    );
    let first = to.wait_heartbeat(name, last_seq + 1, Duration::from_secs(20));
    let earliest = to.heartbeats(name).first().map(|(_, h)| h.seq).unwrap_or(0);
    assert!(
        earliest >= last_seq && earliest <= first.seq,
        "heartbeats on the destination start at {earliest}, the source was at {last_seq}"
    );
    to.assert_checks_clean(name, &first);
}

#[test]
fn post_copy_of_a_fast_writer_arrives_with_every_page_verified() {
    let pair = Pair::start();
    pair.h1.create_net_guest("pc", WRITER);
    let before = pair.h1.last_beat("pc");
    let started = Instant::now();
    let out = finish(pair.h1.spawn_migrate(
        "pc",
        &host_ip(Member::Host2),
        &["--json", "--live", "--postcopy"],
    ));
    let summary = summary_of(&out, &pair.h1);
    let pc = postcopy_of(&summary);
    assert!(
        pc["faults"].as_u64().unwrap_or(0) > 0,
        "the guest touched no missing page: {summary}"
    );
    assert_eq!(summary["max_throttle_percent"], 0, "{summary}");
    assert_arrived(&pair.h1, &pair.h2, "pc", before.seq);
    println!(
        "post-copy in {:.2} s: downtime {} ms, {pc}",
        started.elapsed().as_secs_f64(),
        summary["downtime_ms"]
    );
    // And it can go on moving: back to host1, pre-copy this time.
    let last = pair.h2.last_beat("pc");
    let back = pair
        .h2
        .migrate("pc", &Member::Host1.ip().to_string(), &["--live"]);
    assert!(back["postcopy"].is_null(), "{back}");
    assert_arrived(&pair.h2, &pair.h1, "pc", last.seq);
}

#[test]
fn a_link_cut_during_post_copy_is_resumed_and_the_guest_arrives_whole() {
    let pair = Pair::start();
    pair.h1.create_net_guest("lc", WRITER);
    let before = pair.h1.last_beat("lc");
    let child = pair
        .h1
        .spawn_migrate("lc", &host_ip(Member::Host2), SLOW_POSTCOPY);
    wait_note(&pair.h1, "lc", "post-copy", Duration::from_secs(120));
    // The guest's memory is split between the hosts: too late to cancel.
    let refused = pair.h1.fails(&["migrate", "--cancel", "lc"]);
    assert!(refused.contains("refused during post-copy"), "{refused}");
    pair.set_link(Member::Host2, "down");
    // The source notices the stall and starts redialing the destination.
    wait_note(&pair.h1, "lc", "reconnecting", Duration::from_secs(60));
    assert_eq!(pair.h1.state("lc").as_deref(), Some("migrating"));
    pair.set_link(Member::Host2, "up");
    let out = finish(child);
    let summary = summary_of(&out, &pair.h1);
    let pc = postcopy_of(&summary);
    assert!(
        pc["reconnects"].as_u64().unwrap_or(0) >= 1,
        "no reconnection: {summary}"
    );
    assert_arrived(&pair.h1, &pair.h2, "lc", before.seq);
    println!("through a cut link: {pc}");
}

#[test]
fn a_destination_killed_during_post_copy_leaves_the_paused_copy_on_the_source() {
    let pair = Pair::start();
    pair.h1.create_net_guest("dk", WRITER);
    let child = pair
        .h1
        .spawn_migrate("dk", &host_ip(Member::Host2), SLOW_POSTCOPY);
    wait_note(&pair.h1, "dk", "post-copy", Duration::from_secs(120));
    let pid = pair.h2.guest_pid("dk");
    kill9(pid);
    let out = finish(child);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the migration succeeded");
    assert!(stderr.starts_with("Error: "), "{stderr:?}");
    assert!(
        stderr.contains("lost the guest during post-copy")
            && stderr.contains("tern unpause --force dk"),
        "{stderr}"
    );
    // The source keeps the last whole copy, paused, and says why; the destination has
    // nothing left.
    assert_eq!(pair.h1.state("dk").as_deref(), Some("paused"));
    let why = note(&pair.h1, "dk");
    assert!(why.contains("lost during post-copy"), "{why}");
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    let refused = pair.h1.fails(&["unpause", "dk"]);
    assert!(refused.contains("--force"), "{refused}");
    assert_eq!(pair.h1.state("dk").as_deref(), Some("paused"));
    // Forced, it runs again from the handover's state, with a warning.
    let before = pair.h1.last_beat("dk");
    let forced = pair.h1.tern(&["unpause", "--force", "dk"]);
    let warned = String::from_utf8_lossy(&forced.stderr).into_owned();
    assert!(forced.status.success(), "{warned}");
    assert!(
        warned.starts_with("Warning: ") && warned.contains("disks"),
        "{warned}"
    );
    let state = pair.h1.state("dk").expect("listed");
    assert!(state == "running" || state == "blocked", "{state}");
    assert!(note(&pair.h1, "dk").is_empty(), "{}", note(&pair.h1, "dk"));
    let next = pair
        .h1
        .wait_heartbeat("dk", before.seq + 1, Duration::from_secs(20));
    pair.h1.assert_checks_clean("dk", &next);
    println!("lost in post-copy, then forced: {}", stderr.trim());
}
