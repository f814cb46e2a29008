//! Cancelling a migration (`tern migrate --cancel`, Ctrl-C on `tern migrate`) between the two
//! hosts of the test lab: at several points of the transfer, the guest stays on the source
//! only — running, at its speed, its memory and register checks clean — the destination keeps
//! nothing, and the guest migrates normally afterwards.

mod common;

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_testkit::Member;

/// A guest that writes 64 MiB/s over a 128 MiB working set, all of it in use from the start.
const WRITER: &str =
    "heartbeat_ms=100 wss_mib=128 prefill=1 write_mibps=64 verify_ms=1000 disk_mib=0";
/// Behind a 400 Mbit/s cap (50 MB/s) the first round of that guest takes about 3 s, and it
/// dirties pages faster than the link carries them: pre-copy goes on round after round.
const CAPPED_LIVE: &[&str] = &["--live", "-r", "400"];
/// A warm migration behind the same cap: the guest is paused for about 3 s of transfer.
const CAPPED_WARM: &[&str] = &["-r", "400"];
/// How long a cancel may take to show, on a loaded two-core machine: the engine looks every
/// 1 MiB record (20 ms at the cap) and every 50 ms while waiting for the destination.
const CANCEL_BOUND: Duration = Duration::from_secs(15);

fn host2_relocation() -> String {
    format!("{}:8002", Member::Host2.ip())
}

/// Creates the networked guest `name` (1 GiB, 2 vCPUs) on `host` and waits until its writer
/// has made a pass over its working set.
fn create_net_guest(host: &Host, name: &str) {
    host.create_net_guest(name, WRITER);
    let written = wait_for(Duration::from_secs(30), || host.last_beat(name).passes >= 1);
    assert!(written, "no memory pass: {:?}", host.last_beat(name));
}

/// Waits (at most `timeout`) for a background `tern` to end; its output.
fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Output {
    let ended = wait_for(timeout, || matches!(child.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = child.kill();
        let out = child.wait_with_output().expect("tern output");
        panic!(
            "{what} did not end within {timeout:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().expect("tern output")
}

/// Asserts that a `tern migrate` ended non-zero with the message of a cancelled migration of
/// `name` (its last line: other lines, a Ctrl-C notice, may come first); returns its stderr.
fn assert_reports_cancelled(out: &Output, name: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the cancelled migration succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let last = stderr.lines().last().unwrap_or_default();
    let expected = format!(
        "Error: the migration of '{name}' to {} was cancelled; the guest keeps running here",
        host2_relocation()
    );
    assert_eq!(last, expected, "stderr: {stderr:?}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("Error: ")).count(),
        1,
        "{stderr:?}"
    );
    stderr
}

/// Where a migration is, as `tern list` on the source shows it in its note:
/// `migrating (PHASE, round N)`.
#[derive(Debug, PartialEq)]
struct Progress {
    phase: String,
    round: u32,
}

fn progress(host: &Host, name: &str) -> Option<Progress> {
    let row = host.list().into_iter().find(|d| d["name"] == name)?;
    if row["state"] != "migrating" {
        return None;
    }
    let note = row["note"].as_str()?;
    let inner = note.strip_prefix("migrating (")?.strip_suffix(')')?;
    let (phase, round) = inner.split_once(", round ")?;
    Some(Progress {
        phase: phase.to_string(),
        round: round.parse().ok()?,
    })
}

/// Waits until the migration of `name` reports progress that `reached` accepts; returns it.
fn wait_progress(host: &Host, name: &str, reached: impl Fn(&Progress) -> bool) -> Progress {
    let mut last = None;
    let seen = wait_for(Duration::from_secs(60), || {
        last = progress(host, name);
        last.as_ref().is_some_and(&reached)
    });
    assert!(
        seen,
        "the migration of {name} did not get there; last progress {last:?}, list {:?}\n{}",
        host.list(),
        host.daemon_log()
    );
    last.expect("progress")
}

/// The guest's write rate over about two seconds of its own time, pages per second.
fn write_rate(host: &Host, name: &str) -> f64 {
    let from = host.last_beat(name);
    let to = host.wait_heartbeat(name, from.seq + 20, Duration::from_secs(20));
    let pages = to.written.saturating_sub(from.written) as f64;
    let seconds = to.t_us.saturating_sub(from.t_us) as f64 / 1e6;
    pages / seconds.max(1e-3)
}

/// After a cancel at `cancelled`: the destination keeps nothing (and let go of it promptly),
/// and the guest runs on the source only, no longer migrating, at the speed it wrote before
/// (`baseline`, pages per second: no throttle left on), with clean memory and register checks.
fn assert_stays_on_the_source(pair: &Pair, name: &str, cancelled: Instant, baseline: f64) {
    let emptied = wait_for(CANCEL_BOUND, || {
        pair.h2.list().is_empty() && pair.h2.live_guest_processes().is_empty()
    });
    assert!(
        emptied,
        "the destination still has {:?}, processes {:?}, {:?} after the cancel\n{}",
        pair.h2.list(),
        pair.h2.live_guest_processes(),
        cancelled.elapsed(),
        pair.h2.daemon_log()
    );
    println!(
        "destination empty {:.2} s after the cancel",
        cancelled.elapsed().as_secs_f64()
    );
    pair.h2.assert_empty(&pair.lab, Member::Host2);

    let row = pair
        .h1
        .list()
        .into_iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed on the source"));
    let state = row["state"].as_str().unwrap_or_default();
    assert!(
        state == "running" || state == "blocked",
        "{name} is {state} on the source after the cancel: {row}"
    );
    assert!(row["note"].is_null(), "{name} still has a note: {row}");
    let before = pair.h1.last_beat(name);
    pair.h1
        .wait_heartbeat(name, before.seq + 3, Duration::from_secs(10));
    pair.h1.assert_checks_clean(name, &before);
    let rate = write_rate(&pair.h1, name);
    println!("writes {rate:.0} pages/s after the cancel, {baseline:.0} before the migration");
    assert!(
        rate > 0.8 * baseline,
        "the guest writes {rate:.0} pages/s after the cancel, {baseline:.0} before: still slowed down?"
    );
}

/// Asserts that `name` arrived on host2 from host1 with its checks clean there.
fn migrate_and_check_arrival(pair: &Pair, name: &str) {
    let before = pair.h1.last_beat(name);
    let summary = pair.h1.migrate(name, &host_ip(Member::Host2), &["--live"]);
    assert_eq!(summary["live"], true, "{summary}");
    assert!(!pair.h1.has(name), "{name} is still listed on the source");
    let first = pair
        .h2
        .wait_heartbeat(name, before.seq + 1, Duration::from_secs(10));
    let after = pair
        .h2
        .wait_heartbeat(name, first.seq + 1, Duration::from_secs(10));
    pair.h2.assert_checks_clean(name, &after);
}

/// Where in a migration to cancel it.
#[derive(Clone, Copy, Debug)]
enum CancelPoint {
    /// Live, at the first progress of round 0.
    FirstRound,
    /// Live, once round 2 is under way (the writer keeps pre-copy going; auto-converge may
    /// be slowing the guest down by then).
    LaterRound,
    /// Warm: while the guest is paused and its memory goes out.
    WhilePaused,
}

impl CancelPoint {
    fn migrate_args(self) -> &'static [&'static str] {
        match self {
            CancelPoint::FirstRound | CancelPoint::LaterRound => CAPPED_LIVE,
            CancelPoint::WhilePaused => CAPPED_WARM,
        }
    }

    /// Whether the migration got to this point.
    fn reached(self, p: &Progress) -> bool {
        match self {
            CancelPoint::FirstRound => p.phase == "pre-copy" && p.round == 0,
            CancelPoint::LaterRound => p.phase == "pre-copy" && p.round >= 2,
            CancelPoint::WhilePaused => p.phase == "stop-and-copy",
        }
    }
}

#[test]
fn cancelling_before_the_handover_leaves_the_guest_on_the_source() {
    let pair = Pair::start();
    create_net_guest(&pair.h1, "c");
    let baseline = write_rate(&pair.h1, "c");
    for point in [
        CancelPoint::FirstRound,
        CancelPoint::LaterRound,
        CancelPoint::WhilePaused,
    ] {
        let child = pair
            .h1
            .spawn_migrate("c", &host_ip(Member::Host2), point.migrate_args());
        let at = wait_progress(&pair.h1, "c", |p| point.reached(p));
        if let CancelPoint::LaterRound = point {
            // The arriving guest is not the destination's to cancel.
            let err = pair.h2.fails(&["migrate", "--cancel", "c"]);
            assert!(err.contains("is arriving from"), "{err}");
        }
        let cancelled = Instant::now();
        let answer = pair.h1.ok(&["migrate", "--cancel", "c", "--json"]);
        let answered = cancelled.elapsed();
        let answer: Value = serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("cancel answer {answer:?}: {e}"));
        assert_eq!(answer["domain"], "c", "{answer}");
        assert_eq!(
            answer["destination"],
            host2_relocation().as_str(),
            "{answer}"
        );
        assert_eq!(answer["stopped"], true, "{answer}");
        assert!(
            answer["state"] == "running" || answer["state"] == "blocked",
            "{answer}"
        );
        let out = wait_output(child, CANCEL_BOUND, "the cancelled tern migrate");
        assert_reports_cancelled(&out, "c");
        println!(
            "{point:?}: cancelled at {at:?}, confirmed in {:.2} s",
            answered.as_secs_f64()
        );
        assert_stays_on_the_source(&pair, "c", cancelled, baseline);
    }

    // The confirmation in words.
    let child = pair
        .h1
        .spawn_migrate("c", &host_ip(Member::Host2), CAPPED_LIVE);
    wait_progress(&pair.h1, "c", |p| p.phase == "pre-copy");
    let cancelled = Instant::now();
    let text = pair.h1.ok(&["migrate", "--cancel", "c"]);
    assert_eq!(
        text.trim(),
        format!(
            "Cancelled the migration of c to {}; it keeps running here",
            host2_relocation()
        )
    );
    assert_reports_cancelled(&wait_output(child, CANCEL_BOUND, "tern migrate"), "c");
    assert_stays_on_the_source(&pair, "c", cancelled, baseline);

    // Nothing was left in the way of the next migration.
    migrate_and_check_arrival(&pair, "c");
}

#[test]
fn ctrl_c_on_tern_migrate_cancels_the_migration() {
    let pair = Pair::start();
    create_net_guest(&pair.h1, "i");
    let baseline = write_rate(&pair.h1, "i");
    let child = pair
        .h1
        .spawn_migrate("i", &host_ip(Member::Host2), CAPPED_LIVE);
    let at = wait_progress(&pair.h1, "i", |p| p.phase == "pre-copy");
    let interrupted = Instant::now();
    // SAFETY: sending a signal to our own child has no memory-safety preconditions.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0, "cannot send SIGINT to tern migrate");
    let out = wait_output(child, CANCEL_BOUND, "tern migrate after Ctrl-C");
    println!(
        "Ctrl-C at {at:?}: tern migrate ended {:.2} s later",
        interrupted.elapsed().as_secs_f64()
    );
    let stderr = assert_reports_cancelled(&out, "i");
    assert!(
        stderr.contains("Ctrl-C: cancelling the migration of i"),
        "{stderr:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_stays_on_the_source(&pair, "i", interrupted, baseline);

    // Cancelled means over: nothing is left to cancel, and the guest migrates again.
    let err = pair.h1.fails(&["migrate", "--cancel", "i"]);
    assert_eq!(err.trim(), "Error: 'i' is not migrating");
    migrate_and_check_arrival(&pair, "i");
}

#[test]
fn cancelling_a_guest_that_is_not_migrating_is_refused() {
    let host = Host::start();
    host.create_guest("n", 64, 1, "heartbeat_ms=100 wss_mib=8 verify_ms=500");
    let before = host.last_beat("n");
    let err = host.fails(&["migrate", "--cancel", "n"]);
    assert_eq!(err.trim(), "Error: 'n' is not migrating");
    let id = host.domain_id("n").expect("domain id").to_string();
    let err = host.fails(&["migrate", "--cancel", &id, "--json"]);
    assert_eq!(err.trim(), "Error: 'n' is not migrating");
    host.ok(&["pause", "n"]);
    let err = host.fails(&["migrate", "--cancel", "n"]);
    assert_eq!(err.trim(), "Error: 'n' is not migrating");
    assert_eq!(host.state("n").as_deref(), Some("paused"));
    host.ok(&["unpause", "n"]);
    let err = host.fails(&["migrate", "--cancel", "nope"]);
    assert!(err.contains("no domain 'nope'"), "{err}");
    // --cancel takes no destination or migration options.
    let err = host.fails(&["migrate", "--cancel", "n", "10.0.0.2"]);
    assert!(err.contains("cannot be used with"), "{err}");
    host.wait_heartbeat("n", before.seq + 3, Duration::from_secs(10));
    host.assert_checks_clean("n", &before);
}
