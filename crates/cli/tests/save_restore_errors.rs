//! Every way a save or a restore can fail: each gets one clear `Error:` line and a non-zero
//! exit, the guest (for saves) keeps running as before, and nothing is left behind (no file, no
//! temporary file, no domain, no guest process) while the daemon keeps serving.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tern_snapshot::{RecordType, SnapshotWriter, StreamItem, StreamReader};

const GUEST: &str = "heartbeat_ms=100 wss_mib=64 write_mibps=32 verify_ms=1000";

/// A tmpfs mounted for the duration of a test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot mount a tmpfs (tests run as root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The guest is still running: listed, and its heartbeats go on without any failure.
fn assert_still_running(host: &Host, name: &str) {
    assert!(
        matches!(host.state(name).as_deref(), Some("running" | "blocked")),
        "state {:?}",
        host.state(name)
    );
    let last = host.heartbeats(name).last().expect("beats").1.seq;
    host.wait_heartbeat(name, last + 5, Duration::from_secs(10));
    host.assert_no_failures(name);
}

/// Nothing was created: no domain, no guest process, no domain directory.
fn assert_nothing_left(host: &Host, before: usize) {
    assert_eq!(
        host.list().len(),
        before,
        "domains after a failed restore: {:?}",
        host.list()
    );
    assert_eq!(host.live_guest_processes().len(), before);
    let dirs = entries(&host.state_dir.join("domains"));
    assert_eq!(dirs.len(), before, "domain directories left: {dirs:?}");
}

#[test]
fn save_to_a_full_disk_fails_and_the_guest_keeps_running() {
    let host = Host::start();
    host.create_guest("full", 512, 2, GUEST);
    // Enough written (16 MiB) that the checkpoint cannot fit in the 8 MiB file system.
    assert!(
        wait_for(Duration::from_secs(20), || {
            host.heartbeats("full")
                .last()
                .is_some_and(|b| b.1.written >= 4096)
        }),
        "the guest did not write 16 MiB"
    );
    let mnt = host.dir.join("small");
    let _fs = Tmpfs::mount(&mnt, "size=8m");
    // An existing checkpoint of the same name must survive a failed save untouched.
    let target = mnt.join("full.tern");
    std::fs::write(&target, b"previous checkpoint").expect("write");
    let err = host.fails(&["save", "full", target.to_str().expect("path")]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(target.to_str().expect("path")), "{err}");
    assert_eq!(
        std::fs::read(&target).expect("read"),
        b"previous checkpoint"
    );
    assert_eq!(
        entries(&mnt),
        vec!["full.tern"],
        "a temporary file was left behind"
    );
    assert_still_running(&host, "full");
}

#[test]
fn save_to_a_read_only_directory_fails_and_the_guest_keeps_running() {
    let host = Host::start();
    host.create_guest("ro", 256, 1, GUEST);
    host.wait_heartbeat("ro", 3, Duration::from_secs(20));
    let mnt = host.dir.join("ro");
    let _fs = Tmpfs::mount(&mnt, "ro,size=1m");
    let err = host.fails(&["save", "ro", mnt.join("x.tern").to_str().expect("path")]);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(entries(&mnt).is_empty());
    assert_still_running(&host, "ro");
    // And a paused guest stays paused after a failed save.
    host.ok(&["pause", "ro"]);
    host.fails(&["save", "ro", mnt.join("x.tern").to_str().expect("path")]);
    assert_eq!(host.state("ro").as_deref(), Some("paused"));
}

#[test]
fn a_successful_save_replaces_an_existing_file_only_when_complete() {
    let host = Host::start();
    host.create_guest("rep", 256, 1, GUEST);
    host.wait_heartbeat("rep", 3, Duration::from_secs(20));
    let target = host.dir.join("rep.tern");
    std::fs::write(&target, b"old").expect("write");
    host.ok(&["save", "rep", target.to_str().expect("path")]);
    let data = std::fs::read(&target).expect("read");
    assert_eq!(&data[..8], b"TERNSNAP");
    assert_eq!(
        entries(&host.dir)
            .iter()
            .filter(|n| n.ends_with(".partial"))
            .count(),
        0
    );
    let err = host.fails(&["save", "rep", target.to_str().expect("path")]);
    assert!(err.contains("no domain 'rep'"), "{err}");
}

/// Saves a busy guest and returns the checkpoint path (the guest is gone afterwards).
fn checkpoint(host: &Host, name: &str) -> PathBuf {
    host.create_guest(name, 256, 2, GUEST);
    host.wait_heartbeat(name, 3, Duration::from_secs(20));
    let file = host.dir.join(format!("{name}.tern"));
    host.ok(&["save", name, file.to_str().expect("path")]);
    file
}

fn restore_fails(host: &Host, file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["restore", file.to_str().expect("path")];
    args.extend_from_slice(extra);
    let err = host.fails(&args);
    assert_nothing_left(host, 0);
    err
}

#[test]
fn restore_of_a_missing_or_unreadable_file() {
    let host = Host::start();
    let err = restore_fails(&host, Path::new("/nonexistent/guest.tern"), &[]);
    assert!(
        err.contains("cannot read checkpoint /nonexistent/guest.tern")
            && err.contains("No such file"),
        "{err}"
    );
    let err = restore_fails(&host, &host.dir, &[]);
    assert!(
        err.contains("cannot") && err.contains(host.dir.to_str().expect("path")),
        "{err}"
    );
    let foreign = Path::new("/bin/true");
    let err = restore_fails(&host, foreign, &[]);
    assert!(err.contains("not a tern checkpoint"), "{err}");
    let empty = host.dir.join("empty.tern");
    std::fs::write(&empty, b"").expect("write");
    let err = restore_fails(&host, &empty, &[]);
    assert!(err.contains("not a tern checkpoint"), "{err}");
}

#[test]
fn restore_of_a_truncated_or_corrupt_file() {
    let host = Host::start();
    let file = checkpoint(&host, "c");
    let good = std::fs::read(&file).expect("read");
    let bad = host.dir.join("bad.tern");

    for cut in [good.len() / 2, good.len() - 1, 100] {
        std::fs::write(&bad, &good[..cut]).expect("write");
        let err = restore_fails(&host, &bad, &[]);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
    // One flipped byte anywhere: in the header, record headers and bodies, the page
    // descriptor, the first, a middle and the last page block, and the END record.
    let positions = [
        12,
        40,
        60,
        200,
        1000,
        5000,
        8192 + 100,
        good.len() / 2,
        good.len() - 4096 - 7,
        good.len() - 33,
        good.len() - 1,
    ];
    for (i, &pos) in positions.iter().enumerate() {
        let mut data = good.clone();
        data[pos] ^= 0x10;
        std::fs::write(&bad, &data).expect("write");
        // Alternate the restore modes: lazy finds bad pages while loading, copy before starting.
        let mode: &[&str] = if i % 2 == 0 { &[] } else { &["--copy"] };
        let err = restore_fails(&host, &bad, mode);
        assert!(
            err.contains("corrupt") || err.contains("truncated"),
            "byte {pos}: {err}"
        );
    }
    // The intact file still restores.
    host.ok(&["restore", file.to_str().expect("path")]);
    host.wait_heartbeat("c", 5, Duration::from_secs(20));
    host.assert_no_failures("c");
}

#[test]
fn restore_of_a_file_from_a_newer_format() {
    let host = Host::start();
    let file = checkpoint(&host, "n");
    let mut data = std::fs::read(&file).expect("read");
    let future = tern_snapshot::FORMAT_VERSION + 1;
    data[8..12].copy_from_slice(&future.to_le_bytes());
    let newer = host.dir.join("newer.tern");
    std::fs::write(&newer, &data).expect("write");
    let err = restore_fails(&host, &newer, &[]);
    assert!(
        err.contains(&format!(
            "format version {future}, newer than tern {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{err}"
    );
}

/// A file of this format whose vCPU states a later build wrote (state version 9): refused,
/// naming the state's version and the versions this tern reads.
#[test]
fn restore_of_a_file_with_newer_vcpu_states() {
    let host = Host::start();
    let file = checkpoint(&host, "s");
    let newer = host.dir.join("newer-state.tern");
    rewrite(&file, &newer, |ty, mut body| {
        if ty == RecordType::VCPU {
            // A versioned state record begins {"v": <version>: CBOR a2 61 76 <uint>.
            assert_eq!(
                body[..4],
                [0xa2, 0x61, 0x76, 0x01],
                "a version-1 state record"
            );
            body[3] = 0x09;
        }
        body
    });
    let err = restore_fails(&host, &newer, &[]);
    assert!(
        err.contains(&format!(
            "vCPU state version 9 is newer than tern {} reads (versions 1 to 1)",
            env!("CARGO_PKG_VERSION")
        )),
        "{err}"
    );
}

#[test]
fn restore_of_a_guest_whose_uuid_is_running() {
    let host = Host::start();
    host.create_guest("u", 256, 1, GUEST);
    host.wait_heartbeat("u", 3, Duration::from_secs(20));
    let file = host.dir.join("u.tern");
    host.ok(&["save", "--keep-running", "u", file.to_str().expect("path")]);
    let err = host.fails(&["restore", file.to_str().expect("path")]);
    assert!(err.contains("is already running on this host"), "{err}");
    assert_nothing_left(&host, 1);
    assert_still_running(&host, "u");
}

/// Copies a checkpoint, letting `edit` change record bodies (checksums are recomputed).
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(RecordType, Vec<u8>) -> Vec<u8>) {
    let mut reader = StreamReader::new(std::fs::File::open(src).expect("open")).expect("header");
    let mut writer =
        SnapshotWriter::new(std::fs::File::create(dst).expect("create"), true).expect("writer");
    while let Some(item) = reader.next().expect("item") {
        match item {
            StreamItem::Record { ty, body } if ty == RecordType::END => {
                let _ = body;
            }
            StreamItem::Record { ty, body } => writer.record(ty, &edit(ty, body)).expect("record"),
            StreamItem::Pages { runs, data } => {
                let mut slices = Vec::new();
                let mut off = 0;
                for r in &runs {
                    let len = r.pages as usize * 4096;
                    slices.push(&data[off..off + len]);
                    off += len;
                }
                writer.pages(&runs, &slices, 64).expect("pages");
            }
            StreamItem::Zeros { runs } => writer.zeros(&runs).expect("zeros"),
            StreamItem::Missing { runs } => writer.missing(&runs).expect("missing"),
            StreamItem::Disk { disk, offset, data } => {
                writer.disk(disk, offset, &data).expect("disk")
            }
            StreamItem::DiskZeros { disk, runs } => {
                writer.disk_zeros(disk, &runs).expect("disk zeros")
            }
        }
    }
    writer.finish().expect("finish");
}

fn edit_json(body: Vec<u8>, f: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    f(&mut v);
    serde_json::to_vec(&v).expect("json")
}

#[test]
fn restore_when_the_host_has_not_enough_memory() {
    let host = Host::start();
    let file = checkpoint(&host, "m");
    let big = host.dir.join("big.tern");
    rewrite(&file, &big, |ty, body| {
        if ty == RecordType::CONFIG {
            edit_json(body, |c| c["memory_mib"] = serde_json::json!(1 << 20))
        } else {
            body
        }
    });
    let err = restore_fails(&host, &big, &[]);
    assert!(err.contains("not enough free memory"), "{err}");
}

#[test]
fn restore_when_the_host_cpu_lacks_features() {
    let host = Host::start();
    let file = checkpoint(&host, "f");
    let alien = host.dir.join("alien.tern");
    // Claim the guest was started on a CPU with every leaf-7 feature bit.
    rewrite(&file, &alien, |ty, body| {
        if ty == RecordType::INFO {
            edit_json(body, |info| {
                info["cpu_features"]
                    .as_array_mut()
                    .expect("features")
                    .push(serde_json::json!({"leaf": 7, "subleaf": 0, "regs": [0, u32::MAX, u32::MAX, 0]}));
            })
        } else {
            body
        }
    });
    let err = restore_fails(&host, &alien, &[]);
    assert!(
        err.contains("CPU lacks features") && err.contains("avx512f"),
        "{err}"
    );
    // The rewritten-but-honest copy restores fine: rewriting itself is not the problem.
    let honest = host.dir.join("honest.tern");
    rewrite(&file, &honest, |_, body| body);
    host.ok(&["restore", honest.to_str().expect("path")]);
    host.wait_heartbeat("f", 5, Duration::from_secs(20));
}
