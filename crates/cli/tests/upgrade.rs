//! Upgrading a host: this build restores the previous release's checkpoints and accepts live
//! migrations from it, and refuses formats it does not read, naming both versions. The
//! previous release is named once, in `tern_testkit::release::PREVIOUS`; its fixture checkpoint
//! is committed under `tests/fixtures/`, and its `tern` is built from this repository's own
//! history.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tern_testkit::release::PREVIOUS;
use tern_testkit::{Member, NetLab, LAB_HOSTS_ALLOW};

/// What the fixture's guest printed last before it was paused and saved.
const FIXTURE_LAST_SEQ: u64 = 7;

fn restore(host: &Host, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["restore", file.to_str().expect("path"), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&host.ok(&args)).expect("restore --json")
}

/// The restored fixture guest goes on from its last heartbeat and checks itself clean.
fn assert_fixture_guest_continues(host: &Host) {
    let first = host.wait_heartbeat("fixture", FIXTURE_LAST_SEQ + 1, Duration::from_secs(20));
    let seqs: Vec<u64> = host
        .heartbeats("fixture")
        .iter()
        .map(|(_, b)| b.seq)
        .collect();
    let after: Vec<u64> = seqs
        .iter()
        .copied()
        .skip_while(|&s| s <= FIXTURE_LAST_SEQ)
        .collect();
    assert_eq!(
        after.first(),
        Some(&(FIXTURE_LAST_SEQ + 1)),
        "heartbeats: {seqs:?}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "gap: {seqs:?}");
    host.assert_checks_clean("fixture", &first);
}

#[test]
fn a_checkpoint_of_the_previous_release_restores_and_its_guest_checks_pass() {
    let host = Host::start();
    let fixture = PREVIOUS.fixture();
    for mode in [&[][..], &["--copy"][..]] {
        let restored = restore(&host, &fixture, mode);
        assert_eq!(restored["name"], "fixture");
        assert_fixture_guest_continues(&host);
        host.ok(&["destroy", "fixture"]);
        assert!(wait_for(Duration::from_secs(10), || !host.has("fixture")));
    }
    // Saved again by this build (the current format), it restores as well.
    restore(&host, &fixture, &[]);
    host.wait_heartbeat("fixture", FIXTURE_LAST_SEQ + 3, Duration::from_secs(20));
    host.ok(&["pause", "fixture"]);
    let before = host.last_beat("fixture");
    let resaved = host.dir.join("resaved.tern");
    host.ok(&["save", "fixture", resaved.to_str().expect("path")]);
    restore(&host, &resaved, &[]);
    let next = host.wait_heartbeat("fixture", before.seq + 1, Duration::from_secs(20));
    assert!(next.t_us >= before.t_us);
    host.assert_checks_clean("fixture", &before);
}

/// The fixture with its header's format version replaced (and its checksum fixed up).
fn with_format_version(fixture: &Path, version: u32, out: &Path) {
    let mut bytes = std::fs::read(fixture).expect("fixture");
    let header = tern_snapshot::Header {
        version,
        aligned: true,
    }
    .encode();
    bytes[..header.len()].copy_from_slice(&header);
    std::fs::write(out, bytes).expect("write");
}

#[test]
fn checkpoints_of_unsupported_format_versions_are_refused_naming_both() {
    let host = Host::start();
    let ours = env!("CARGO_PKG_VERSION");
    for (version, relation) in [(3, "newer"), (0, "older")] {
        let file = host.dir.join(format!("v{version}.tern"));
        with_format_version(&PREVIOUS.fixture(), version, &file);
        let e = host.fails(&["restore", file.to_str().expect("path")]);
        assert!(
            e.contains(&format!(
                "format version {version}, {relation} than tern {ours} reads (versions 1 to {})",
                tern_snapshot::FORMAT_VERSION
            )),
            "{e}"
        );
        assert!(host.list().is_empty());
    }
}

/// The previous release's daemon on lab host 1 live-migrates a busy guest to this build's
/// daemon on host 2. (Before relocation was secured, tern spoke plaintext: the destination
/// runs `insecure = true` for it, as a host being upgraded would during the move.)
#[test]
fn a_guest_migrates_live_from_the_previous_release() {
    let previous = PREVIOUS
        .build()
        .unwrap_or_else(|e| panic!("cannot build tern {}: {e:#}", PREVIOUS.version));
    let _lock = KvmLock::acquire();
    let lab = NetLab::new().expect("build the network lab");
    let old_table = format!(
        "[relocation]\nserver = true\naddress = \"{}\"\nhosts_allow = ['{LAB_HOSTS_ALLOW}']\n",
        Member::Host1.ip()
    );
    let old = lab
        .start_host(&previous, Member::Host1, &old_table)
        .expect("start the previous release's daemon");
    let new = Host::in_lab(
        &lab,
        Member::Host2,
        &tern_testkit::relocation_toml_with(Member::Host2, &[LAB_HOSTS_ALLOW], "insecure = true"),
    );
    let config = old
        .guest_config(
            "up",
            512,
            2,
            "heartbeat_ms=100 wss_mib=128 write_mibps=32 verify_ms=1000",
        )
        .expect("guest config");
    old.run(&["create", config.to_str().expect("path")])
        .expect("create on the previous release");
    let mut before = None;
    assert!(wait_for(Duration::from_secs(20), || {
        before = old
            .heartbeats("up")
            .ok()
            .and_then(|b| b.last().map(|(_, h)| h.clone()));
        before.as_ref().is_some_and(|b| b.passes >= 1)
    }));
    let before = before.expect("a heartbeat");
    let summary = old
        .run(&[
            "migrate",
            "up",
            &Member::Host2.ip().to_string(),
            "--live",
            "--json",
        ])
        .expect("migrate from the previous release");
    assert!(summary.contains("downtime_ms"), "{summary}");
    assert!(
        wait_for(Duration::from_secs(10), || old
            .list()
            .is_ok_and(|l| l.is_empty())),
        "the guest is still listed on the previous release's host"
    );
    assert!(new.has("up"));
    let arrived = new.wait_heartbeat("up", before.seq + 1, Duration::from_secs(20));
    assert!(arrived.t_us >= before.t_us);
    new.assert_checks_clean("up", &before);
}
