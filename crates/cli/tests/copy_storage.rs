//! Live migration with the guest's local disk (`tern migrate --copy-storage`): hosts that
//! share no storage, each with a disk directory of its own; a networked test guest writing
//! and verifying numbered, checksummed disk blocks throughout.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_testkit::Member;

/// The guest: memory written at 32 MiB/s, its disk's first 32 MiB written at 4 MiB/s and
/// read back every second.
const WORKLOAD: &str = "heartbeat_ms=100 wss_mib=128 write_mibps=32 verify_ms=500 \
                        disk_mib=32 disk_kibps=4096 disk_verify_ms=1000";
/// The disk image: 256 MiB, sparse.
const IMAGE_BYTES: u64 = 256 << 20;

/// Where `host` keeps guest disks: its only place for copied ones.
fn disk_dir(host: &Host) -> PathBuf {
    host.dir.join("disks")
}

/// Two lab hosts, each with its own disk directory as `[relocation] disk_dir`.
fn hosts() -> Pair {
    let mut pair = Pair::start();
    let kernels = tern_testguest::path()
        .parent()
        .expect("test guest directory")
        .to_path_buf();
    for (host, member) in [(&mut pair.h1, Member::Host1), (&mut pair.h2, Member::Host2)] {
        let disks = disk_dir(host);
        std::fs::create_dir_all(&disks).expect("disk directory");
        let lines = format!(
            "storage = [\"{}\", \"{}\"]\ndisk_dir = \"{}\"",
            kernels.display(),
            disks.display(),
            disks.display()
        );
        host.reconfigure(member, "", &lines);
    }
    pair
}

/// Creates the guest `name` on `host` with a sparse image in its disk directory.
fn create_disk_guest(host: &Host, name: &str) -> PathBuf {
    let image = disk_dir(host).join(format!("{name}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .expect("disk image");
    let cfg = host.net_guest_config(name, 1024, 2, GUEST_IP, GUEST_MAC, WORKLOAD);
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!("disk = [ 'file:{},xvda,w' ]\n", image.display()));
    std::fs::write(&cfg, text).expect("config");
    host.ok(&["create", cfg.to_str().expect("path")]);
    host.wait_heartbeat(name, 3, Duration::from_secs(30));
    image
}

/// Waits until the guest's disk workload wrote and verified some blocks since `since`.
fn wait_disk_work(host: &Host, name: &str, since: &tern_testguest::Heartbeat) {
    let busy = wait_for(Duration::from_secs(20), || {
        let now = host.last_beat(name);
        now.disk_written > since.disk_written + 256 && now.disk_verified > since.disk_verified
    });
    assert!(
        busy,
        "{name}'s disk workload made no progress on the destination"
    );
    let now = host.last_beat(name);
    assert_eq!(now.disk_errors, 0, "disk errors: {now:?}");
}

/// The disk `tern list --json` shows for `name` on `host`.
fn listed_disk(host: &Host, name: &str) -> String {
    let list = host.list();
    let domain = list.iter().find(|d| d["name"] == name).expect("listed");
    domain["disks"][0]["target"]
        .as_str()
        .expect("a disk target")
        .to_string()
}

/// Bytes allocated to `path`.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("image").blocks() * 512
}

/// Moves the guest and its disk from `from` to `to`; checks the guest there, its image in the
/// destination's disk directory (sparse), and the source's image gone (removed on request).
fn move_with_disk(from: &Host, to: &Host, address: &str, name: &str) -> Value {
    let before = from.last_beat(name);
    let started = Instant::now();
    let summary = from.migrate(
        name,
        address,
        &["--live", "--copy-storage", "--remove-source-images"],
    );
    let took = started.elapsed();
    assert!(!from.has(name), "{name} is still listed on the source");
    let arrived = to.wait_heartbeat(name, before.seq + 1, Duration::from_secs(10));
    to.assert_checks_clean(name, &arrived);
    wait_disk_work(to, name, &arrived);
    let image = disk_dir(to).join(format!("{name}.img"));
    let canonical = std::fs::canonicalize(&image).expect("the image arrived");
    assert_eq!(listed_disk(to, name), canonical.display().to_string());
    assert_eq!(std::fs::metadata(&image).expect("image").len(), IMAGE_BYTES);
    assert!(
        allocated(&image) < 64 << 20,
        "the copy is not sparse: {} bytes allocated",
        allocated(&image)
    );
    assert!(
        !disk_dir(from).join(format!("{name}.img")).exists(),
        "the source's image was not removed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(disk_dir(to))
        .expect("disk directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let disks = &summary["disks"];
    assert!(disks["bulk_bytes"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert_eq!(disks["disks"][0]["source_removed"], true, "{summary}");
    println!(
        "moved in {:.2} s: downtime {:.1} ms, disk {} bytes (bulk {}), rounds {}",
        took.as_secs_f64(),
        summary["downtime_ms"].as_f64().unwrap_or(0.0),
        disks["bytes_sent"],
        disks["bulk_bytes"],
        disks["round_bytes"]
    );
    summary
}

/// The guest moves back and forth with its disk several times; its memory, register and disk
/// checks pass after every move, blocks written during each move are there on arrival (the
/// guest reads back all it wrote), and each destination's copy is sparse.
#[test]
fn a_guest_moves_back_and_forth_with_its_local_disk() {
    let pair = hosts();
    create_disk_guest(&pair.h1, "g");
    let start = pair.h1.last_beat("g");
    wait_disk_work(&pair.h1, "g", &start);
    for _ in 0..3 {
        move_with_disk(&pair.h1, &pair.h2, &host_ip(Member::Host2), "g");
        move_with_disk(&pair.h2, &pair.h1, &host_ip(Member::Host1), "g");
    }
    // The blocks on the image itself check out (written by the guest, read here).
    let image = disk_dir(&pair.h1).join("g.img");
    let last = pair.h1.last_beat("g");
    pair.h1.ok(&["destroy", "g"]);
    let data = std::fs::read(&image).expect("image");
    let valid = data
        .chunks(4096)
        .take(8192)
        .enumerate()
        .filter(|(i, block)| {
            matches!(
                tern_testguest::check_disk_block(block, *i as u64),
                Ok(Some(_))
            )
        })
        .count();
    // The guest writes its area in order from block 0: every block it wrote is there.
    let written = last.disk_written.min(8192) as usize;
    assert!(
        valid + 16 >= written && written > 1000,
        "{valid} valid blocks on the disk; the guest wrote {written}"
    );
    pair.h2.assert_empty(&pair.lab, Member::Host2);
}
