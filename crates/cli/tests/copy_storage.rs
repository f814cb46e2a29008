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
    create_guest_with_disk(host, name, WORKLOAD)
}

/// [`create_disk_guest`] running `workload`.
fn create_guest_with_disk(host: &Host, name: &str, workload: &str) -> PathBuf {
    let image = disk_dir(host).join(format!("{name}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .expect("disk image");
    let cfg = host.net_guest_config(name, 1024, 2, GUEST_IP, GUEST_MAC, workload);
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
    let source_image = disk_dir(from).join(format!("{name}.img"));
    let source_allocated = allocated(&source_image);
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
    // Sparse as the source's: what the guest wrote during the move aside.
    assert!(
        allocated(&image) <= source_allocated + (8 << 20) && allocated(&image) < IMAGE_BYTES,
        "the copy is not sparse: {} bytes allocated, {source_allocated} on the source",
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
/// guest reads back all it wrote), and each destination's copy is sparse; moved paused, its
/// image arrives byte for byte as it was at the pause.
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
    // A paused guest moves with its disk (warm): the image arrives byte for byte as the
    // source's at the pause, and the guest runs on there when unpaused.
    let seq = pair.h1.last_beat("g").seq;
    pair.h1.ok(&["pause", "g"]);
    let source_image = disk_dir(&pair.h1).join("g.img");
    let summary = pair
        .h1
        .migrate("g", &host_ip(Member::Host2), &["--copy-storage"]);
    assert_eq!(summary["disks"]["disks"][0]["source_removed"], false);
    let arrived = disk_dir(&pair.h2).join("g.img");
    assert!(
        std::fs::read(&source_image).expect("source image")
            == std::fs::read(&arrived).expect("arrived image"),
        "the arrived image differs from the source's"
    );
    assert_eq!(pair.h2.state("g").as_deref(), Some("paused"));
    std::fs::remove_file(&source_image).expect("remove the stale image");
    pair.h2.ok(&["unpause", "g"]);
    let before = pair
        .h2
        .wait_heartbeat("g", seq + 1, Duration::from_secs(10));
    pair.h2.assert_checks_clean("g", &before);
    move_with_disk(&pair.h2, &pair.h1, &host_ip(Member::Host1), "g");

    // The blocks on the image itself check out (written by the guest, read here).
    let image = disk_dir(&pair.h1).join("g.img");
    let last = pair.h1.last_beat("g");
    pair.h1.ok(&["destroy", "g"]);
    let valid = valid_disk_blocks(&image, 8192);
    // The guest writes its area in order from block 0: every block it wrote is there.
    let written = last.disk_written.min(8192) as usize;
    assert!(
        valid + 16 >= written && written > 1000,
        "{valid} valid blocks on the disk; the guest wrote {written}"
    );
    pair.h2.assert_empty(&pair.lab, Member::Host2);
}

/// A migration whose disk phase lasts seconds: a 400 Mbit/s cap over 128 MiB of disk data.
const SLOW: &[&str] = &["--live", "--copy-storage", "-r", "400"];
/// The guest of the fault tests: memory written at 8 MiB/s, its disk as in [`WORKLOAD`].
const GENTLE: &str = "heartbeat_ms=100 wss_mib=128 write_mibps=8 verify_ms=500 \
                      disk_mib=32 disk_kibps=4096 disk_verify_ms=1000";

/// Creates the guest `name` whose image holds 128 MiB of data (past its workload's area).
fn create_full_disk_guest(host: &Host, name: &str) -> PathBuf {
    let image = create_guest_with_disk(host, name, GENTLE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("image");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251 + 1) as u8).collect();
    for mib in 64..192u64 {
        std::os::unix::fs::FileExt::write_all_at(&file, &block, mib << 20).expect("fill");
    }
    file.sync_all().expect("sync");
    image
}

/// What `host`'s disk directory holds.
fn disk_files(host: &Host) -> Vec<String> {
    std::fs::read_dir(disk_dir(host))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the image arriving on `host` has grown past 8 MiB: the disk phase is on.
fn wait_disk_phase(host: &Host, name: &str) {
    let partial = disk_dir(host).join(format!(".{name}.img.incoming"));
    let copying = wait_for(Duration::from_secs(20), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.blocks() * 512 > 8 << 20)
    });
    assert!(copying, "no disk copy under way on the destination");
}

/// The guest runs on the source only, its image in place and its checks clean; nothing of
/// it is left on the destination, no temporary image either.
fn assert_left_on_source(pair: &Pair, name: &str, image: &Path) {
    assert_still_runs(&pair.h1, name);
    assert!(image.exists(), "the source's image is gone");
    assert_eq!(pair.h1.last_beat(name).disk_errors, 0);
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    let clean = wait_for(Duration::from_secs(20), || disk_files(&pair.h2).is_empty());
    assert!(clean, "left on the destination: {:?}", disk_files(&pair.h2));
}

/// Runs `cmd args` in the mount namespace of `host`'s daemon (its guest processes share it;
/// `ip netns exec` gave it one of its own), asserting success.
fn in_daemon_mounts(host: &Host, cmd: &str, args: &[&str]) {
    let pid = host.daemon_pid().expect("a running daemon").to_string();
    let ok = std::process::Command::new("nsenter")
        .args(["--target", &pid, "--mount", cmd])
        .args(args)
        .status()
        .expect("nsenter")
        .success();
    assert!(ok, "{cmd} {args:?} in the daemon's mount namespace");
}

/// A tmpfs of `size` over `host`'s disk directory, as its daemon sees it; unmounted on drop.
struct Tmpfs<'a> {
    host: &'a Host,
    dir: String,
}

impl<'a> Tmpfs<'a> {
    fn mount(host: &'a Host, size: &str) -> Tmpfs<'a> {
        let dir = disk_dir(host).display().to_string();
        let options = format!("size={size}");
        in_daemon_mounts(
            host,
            "mount",
            &["-t", "tmpfs", "-o", &options, "tmpfs", &dir],
        );
        Tmpfs { host, dir }
    }

    /// Takes `bytes` of its room.
    fn fill(&self, bytes: u64) {
        let filler = format!("{}/filler", self.dir);
        let len = bytes.to_string();
        in_daemon_mounts(self.host, "fallocate", &["-l", &len, &filler]);
    }

    /// Whether anything but the filler is in it.
    fn holds_images(&self) -> bool {
        let pid = self
            .host
            .daemon_pid()
            .expect("a running daemon")
            .to_string();
        let out = std::process::Command::new("nsenter")
            .args(["--target", &pid, "--mount", "ls", "-A", &self.dir])
            .output()
            .expect("nsenter ls");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l != "filler")
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.host.daemon_pid() {
            let _ = std::process::Command::new("nsenter")
                .args(["--target", &pid.to_string(), "--mount", "umount", &self.dir])
                .status();
        }
    }
}

/// Faults during the disk phase: the destination's guest process or either daemon killed,
/// the link cut, the destination's disk directory too small or filled up meanwhile. Each
/// ends with the guest running on the source only, its disk intact, nothing left on the
/// destination; then the move succeeds.
#[test]
fn faults_during_the_disk_copy_leave_the_guest_on_the_source() {
    let mut pair = hosts();
    let image = create_full_disk_guest(&pair.h1, "f");
    let to = host_ip(Member::Host2);

    let child = pair.h1.spawn_migrate("f", &to, SLOW);
    let pid = incoming_pid(&pair.h2);
    wait_disk_phase(&pair.h2, "f");
    kill9(pid);
    assert_migrate_failed(child, "destination guest process killed");
    assert_left_on_source(&pair, "f", &image);

    let child = pair.h1.spawn_migrate("f", &to, SLOW);
    wait_disk_phase(&pair.h2, "f");
    pair.h2.kill_daemon();
    assert_migrate_failed(child, "destination daemon killed");
    pair.h2.start_daemon();
    assert_left_on_source(&pair, "f", &image);

    let child = pair.h1.spawn_migrate("f", &to, SLOW);
    wait_disk_phase(&pair.h2, "f");
    pair.h1.kill_daemon();
    assert_migrate_failed(child, "source daemon killed");
    pair.h1.start_daemon();
    assert_left_on_source(&pair, "f", &image);

    let child = pair.h1.spawn_migrate("f", &to, SLOW);
    wait_disk_phase(&pair.h2, "f");
    pair.set_link(Member::Host2, "down");
    assert_migrate_failed(child, "link cut");
    pair.set_link(Member::Host2, "up");
    assert_left_on_source(&pair, "f", &image);

    {
        let small = Tmpfs::mount(&pair.h2, "64m");
        let child = pair.h1.spawn_migrate("f", &to, SLOW);
        let err = assert_migrate_failed(child, "destination disk directory too small");
        assert!(err.contains("bytes free"), "{err}");
        assert_left_on_source(&pair, "f", &image);
        assert!(!small.holds_images());
    }
    {
        let fills = Tmpfs::mount(&pair.h2, "200m");
        let child = pair.h1.spawn_migrate("f", &to, SLOW);
        incoming_pid(&pair.h2);
        // Room for the image when admitted, taken meanwhile.
        fills.fill(150 << 20);
        assert_migrate_failed(child, "destination disk directory filled up");
        assert_left_on_source(&pair, "f", &image);
        assert!(
            !fills.holds_images(),
            "a partial image is left in the full directory"
        );
    }

    move_with_disk(&pair.h1, &pair.h2, &to, "f");
}
