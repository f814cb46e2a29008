//! `tern save` / `tern restore` on a running test guest: repeated round trips in both restore
//! modes, paused restores, keep-running saves. The guest's own reports decide: its heartbeat
//! sequence continues, its clock never goes backwards, every page verifies, every register
//! holds its value.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const BUSY_GUEST: &str = "heartbeat_ms=100 wss_mib=256 write_mibps=64 verify_ms=1000";

fn save(host: &Host, name: &str, file: &Path) -> serde_json::Value {
    let out = host.ok(&["save", name, file.to_str().expect("path"), "--json"]);
    serde_json::from_str(&out).expect("save --json")
}

fn restore(host: &Host, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["restore", file.to_str().expect("path"), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&host.ok(&args)).expect("restore --json")
}

/// Checks a restored guest picked up where the saved one stopped (`exact`: the first
/// heartbeat after the restore is the next one; otherwise the guest may have printed up to two
/// more after `before` was read), and that it completes a full verification pass of its
/// working set after the restore without any failure.
fn assert_continues(host: &Host, name: &str, before: &Heartbeat, exact: bool) {
    let first = host.wait_heartbeat(name, before.seq + 1, Duration::from_secs(20));
    let beats = host.heartbeats(name);
    let seqs: Vec<u64> = beats.iter().map(|b| b.1.seq).collect();
    let slack = if exact { 0 } else { 2 };
    assert!(
        (before.seq + 1..=before.seq + 1 + slack).contains(&seqs[0]),
        "sequence after restore, last seen {}: {seqs:?}",
        before.seq
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap after restore: {seqs:?}"
    );
    assert!(
        first.t_us >= before.t_us,
        "guest clock went back: {} -> {}",
        before.t_us,
        first.t_us
    );
    assert!(first.written >= before.written && first.passes >= before.passes);
    // A pass that starts after the restore: two more passes counted.
    let after = host.wait_heartbeat(name, first.seq + 1, Duration::from_secs(20));
    let mut last = after;
    assert!(
        wait_for(Duration::from_secs(20), || {
            last = host.last_beat(name);
            last.passes >= first.passes + 2
        }),
        "no full verification pass after restore: {last:?}"
    );
    assert_eq!(last.mem_errors, 0);
    assert_eq!(last.reg_errors, 0);
    assert!(last.reg_checks > before.reg_checks);
    host.assert_no_failures(name);
}

fn round_trips(copy: bool) {
    let host = Host::start();
    host.create_guest("rt", 1024, 2, BUSY_GUEST);
    host.wait_heartbeat("rt", 20, Duration::from_secs(20));
    let file = host.dir.join("rt.tern");
    let extra: &[&str] = if copy { &["--copy"] } else { &[] };
    for round in 0..10 {
        // Even rounds save a paused guest (its last heartbeat is then known exactly), odd
        // rounds a running one (the save pauses it itself).
        let exact = round % 2 == 0;
        if exact {
            host.ok(&["pause", "rt"]);
        }
        let before = host.last_beat("rt");
        let summary = save(&host, "rt", &file);
        assert!(
            host.list().is_empty(),
            "round {round}: guest still listed after save"
        );
        // Zero pages are not stored: the file holds what the guest touched, not its 1 GiB.
        let file_bytes = summary["file_bytes"].as_u64().expect("file_bytes");
        let stored = summary["pages_stored"].as_u64().expect("pages") * 4096;
        assert!(
            file_bytes < 300 << 20,
            "round {round}: {file_bytes}-byte file for a 256 MiB working set"
        );
        assert!(
            file_bytes - stored < 1 << 20,
            "round {round}: {} bytes of overhead",
            file_bytes - stored
        );
        assert_eq!(std::fs::metadata(&file).expect("file").len(), file_bytes);

        let restored = restore(&host, &file, extra);
        assert_eq!(restored["mode"], if copy { "copy" } else { "lazy" });
        assert_eq!(host.list().len(), 1);
        assert_continues(&host, "rt", &before, exact);
    }
}

#[test]
fn ten_save_restore_round_trips_lazy() {
    round_trips(false);
}

#[test]
fn ten_save_restore_round_trips_copy() {
    round_trips(true);
}

/// `--paused` restores without running; `unpause` continues the sequence.
#[test]
fn restore_paused_then_unpause() {
    let host = Host::start();
    host.create_guest("p", 256, 2, "heartbeat_ms=100 wss_mib=32 write_mibps=16");
    host.wait_heartbeat("p", 5, Duration::from_secs(20));
    let file = host.dir.join("p.tern");
    save(&host, "p", &file);
    restore(&host, &file, &["--paused"]);
    assert_eq!(host.state("p").as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_millis(800));
    assert!(host.heartbeats("p").is_empty(), "a paused restore ran");
    host.ok(&["unpause", "p"]);
    let hb = host.wait_heartbeat("p", 1, Duration::from_secs(20));
    let beats = host.heartbeats("p");
    assert!(beats[0].1.seq > 5, "sequence restarted: {hb:?}");
    assert!(beats.windows(2).all(|w| w[1].1.seq == w[0].1.seq + 1));
    host.assert_no_failures("p");
}

/// `--keep-running` writes the checkpoint and the guest goes on; the checkpoint restores
/// later to the moment it was taken.
#[test]
fn keep_running_saves_a_checkpoint_and_the_guest_goes_on() {
    let host = Host::start();
    host.create_guest(
        "k",
        512,
        1,
        "heartbeat_ms=100 wss_mib=64 write_mibps=32 verify_ms=1000",
    );
    host.wait_heartbeat("k", 5, Duration::from_secs(20));
    let file = host.dir.join("k.tern");
    let summary = save_keep(&host, "k", &file);
    assert_eq!(summary["kept_running"], true);
    let at_save = host.last_beat("k");
    host.wait_heartbeat("k", at_save.seq + 10, Duration::from_secs(20));
    host.assert_no_failures("k");
    // The checkpoint is the guest as it was at the save: roll back to it.
    host.ok(&["destroy", "k"]);
    restore(&host, &file, &[]);
    let first = host.wait_heartbeat("k", 1, Duration::from_secs(20));
    assert!(
        first.seq <= at_save.seq + 1,
        "restored seq {} after a save at {}",
        first.seq,
        at_save.seq
    );
    let later = host.wait_heartbeat("k", first.seq + 15, Duration::from_secs(20));
    assert_eq!(later.mem_errors, 0);
    assert_eq!(later.reg_errors, 0);
    host.assert_no_failures("k");
}

fn save_keep(host: &Host, name: &str, file: &Path) -> serde_json::Value {
    let out = host.ok(&[
        "save",
        "--keep-running",
        name,
        file.to_str().expect("path"),
        "--json",
    ]);
    serde_json::from_str(&out).expect("save --json")
}
