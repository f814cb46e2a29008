//! The guest process's states as the user meets them (`crates/vmm/src/lifecycle.rs`): a long
//! save to a really slow disk is listed as `saving` and never blocks `tern list`, and a guest
//! whose migration's outcome is unknown stays paused unless the user forces a decision.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_migration::destination;
use tern_migration::link::Link;
use tern_migration::transport::Channel;
use tern_migration::{Outcome, RamRegion, ToDestination, ToSource};

/// The row `tern list --json` has for `name`.
fn row(host: &Host, name: &str) -> Value {
    host.list()
        .into_iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

// ---------------------------------------------------------------------------------------------
// A slow disk: an ext4 file system on a loop device whose writes by one process are throttled
// with the blkio cgroup (cgroup v1 `blkio.throttle.write_bps_device`; checkpoints are written
// with O_DIRECT, which the throttle sees). Device-mapper is not in this machine's kernel.

fn run(program: &str, args: &[&str]) -> String {
    let bin = tern_testkit::find_program(program).unwrap_or_else(|| panic!("{program} missing"));
    let out = Command::new(bin).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";

struct SlowDisk {
    loop_dev: String,
    mount: PathBuf,
    cgroup: PathBuf,
    _dir: tempfile::TempDir,
}

impl SlowDisk {
    /// A `size_mib` file system where processes given to [`SlowDisk::throttle`] write at
    /// `bytes_per_second`.
    fn new(size_mib: u64, bytes_per_second: u64) -> SlowDisk {
        let dir = tempfile::Builder::new()
            .prefix("tern-slow-disk-")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("disk image");
        let loop_dev = run("losetup", &["-f", "--show", image.to_str().expect("path")]);
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        let disk = SlowDisk {
            cgroup: PathBuf::from(BLKIO).join(format!("tern-test-{}", std::process::id())),
            loop_dev,
            mount,
            _dir: dir,
        };
        run("mkfs.ext4", &["-q", &disk.loop_dev]);
        run(
            "mount",
            &[&disk.loop_dev, disk.mount.to_str().expect("path")],
        );
        let name = disk.loop_dev.trim_start_matches("/dev/");
        let dev = std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))
            .expect("loop device number");
        assert!(
            Path::new(BLKIO)
                .join("blkio.throttle.write_bps_device")
                .exists(),
            "this kernel has no blkio write throttling at {BLKIO}"
        );
        std::fs::create_dir_all(&disk.cgroup).expect("blkio cgroup");
        std::fs::write(
            disk.cgroup.join("blkio.throttle.write_bps_device"),
            format!("{} {bytes_per_second}", dev.trim()),
        )
        .expect("throttle the loop device");
        disk
    }

    /// Throttles the writes of process `pid` (all its threads) to this disk.
    fn throttle(&self, pid: u32) {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let umount = tern_testkit::find_program("umount").expect("umount");
        let _ = Command::new(umount).arg("-l").arg(&self.mount).status();
        let losetup = tern_testkit::find_program("losetup").expect("losetup");
        let _ = Command::new(losetup).args(["-d", &self.loop_dev]).status();
    }
}

/// A save that takes longer than the daemon gives a guest process to answer `status` (10 s):
/// meanwhile `tern list` answers within a second and shows the guest `saving` (it used to
/// show it crashed), and a pause is refused at once rather than queued behind the save.
#[test]
fn a_long_save_is_listed_as_saving_and_never_blocks_list() {
    const WSS_MIB: u64 = 96;
    const RATE: u64 = 6 << 20;
    let host = Host::start();
    let disk = SlowDisk::new(256, RATE);
    host.create_guest(
        "s",
        256,
        1,
        &format!("heartbeat_ms=100 wss_mib={WSS_MIB} prefill=1 verify_ms=1000"),
    );
    // Its working set is written (and verified once): that much memory is in use.
    assert!(
        wait_for(Duration::from_secs(30), || host.last_beat("s").passes >= 1),
        "no memory pass: {:?}",
        host.last_beat("s")
    );
    disk.throttle(host.guest_pid("s"));

    let file = disk.mount.join("s.tern");
    let mut save = host.command(&[
        "save",
        "--keep-running",
        "s",
        file.to_str().expect("path"),
        "--json",
    ]);
    save.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut save = save.spawn().expect("tern save");

    let mut last_saving = None;
    let mut states = Vec::new();
    let deadline = started + Duration::from_secs(60);
    loop {
        let asked = Instant::now();
        let r = row(&host, "s");
        let took = asked.elapsed();
        let done = save.try_wait().expect("tern save").is_some();
        let state = r["state"].as_str().unwrap_or("").to_string();
        assert!(
            took < Duration::from_secs(1),
            "tern list took {took:?} during the save ({state})"
        );
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the save did not end: {states:?}"
        );
        if state == "saving" {
            assert!(
                r["note"].as_str().unwrap_or("").contains("s.tern"),
                "note: {r}"
            );
            if last_saving.is_none() {
                // Requests that would need the machine are refused at once.
                let asked = Instant::now();
                let err = host.fails(&["pause", "s"]);
                assert!(err.contains("'s' is being saved"), "{err}");
                assert!(asked.elapsed() < Duration::from_secs(1));
            }
            last_saving = Some(started.elapsed());
        }
        if states.last() != Some(&state) {
            states.push(state);
        }
        // Poll again shortly (each poll is an assertion, not a wait for the save).
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = save.wait_with_output().expect("tern save");
    assert!(
        out.status.success(),
        "the save failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    println!(
        "save took {:.1} s; list showed {states:?}, saving until {last_saving:?}",
        summary["total_seconds"].as_f64().unwrap_or(0.0)
    );
    assert!(
        states
            .iter()
            .all(|s| s == "saving" || s == "running" || s == "blocked"),
        "states during the save: {states:?}"
    );
    let last_saving = last_saving.expect("tern list never showed the guest saving");
    assert!(
        last_saving > Duration::from_secs(10),
        "the save was over after {last_saving:?}: not slow enough to outlast the status timeout"
    );
    assert!(file.metadata().expect("checkpoint").len() >= WSS_MIB << 20);

    // And the guest goes on.
    let at = host.last_beat("s");
    host.wait_heartbeat("s", at.seq + 3, Duration::from_secs(20));
    host.assert_checks_clean("s", &at);
    host.ok(&["destroy", "s"]);
}

// ---------------------------------------------------------------------------------------------
// An unresolved handover, made deterministic with a destination written here: a plaintext
// relocation server that takes the whole guest, says Ready, receives Go and then, unless told
// to confirm, never says Running; asked about the outcome it always answers Pending.

struct FakeDestination {
    addr: SocketAddr,
    /// Confirm the next Go with Running.
    confirm: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    /// The `resume` of each Go received.
    goes: Arc<Mutex<Vec<bool>>>,
    stop: Arc<AtomicBool>,
}

impl FakeDestination {
    fn start() -> FakeDestination {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let fake = FakeDestination {
            addr: listener.local_addr().expect("address"),
            confirm: Arc::default(),
            queries: Arc::default(),
            goes: Arc::default(),
            stop: Arc::default(),
        };
        let (confirm, queries, goes, stop) = (
            fake.confirm.clone(),
            fake.queries.clone(),
            fake.goes.clone(),
            fake.stop.clone(),
        );
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let (confirm, queries, goes, stop) =
                    (confirm.clone(), queries.clone(), goes.clone(), stop.clone());
                std::thread::spawn(move || {
                    let _ = serve(tcp, &confirm, &queries, &goes, &stop);
                });
            }
        });
        fake
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Acquire)
    }
}

impl Drop for FakeDestination {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    tcp: TcpStream,
    confirm: &AtomicBool,
    queries: &AtomicU64,
    goes: &Mutex<Vec<bool>>,
    stop: &AtomicBool,
) -> Result<(), tern_migration::MigrationError> {
    let mut ch = Channel::new(Link::Plain(tcp));
    let offer = match ch.receive::<ToDestination>(Duration::from_secs(10))? {
        ToDestination::Offer(offer) => offer,
        ToDestination::Query { .. } => {
            queries.fetch_add(1, Ordering::AcqRel);
            return ch.send(&ToSource::Outcome {
                outcome: Outcome::Pending,
            });
        }
        ToDestination::Go { .. }
        | ToDestination::Resume { .. }
        | ToDestination::Evacuate { .. } => return Ok(()),
    };
    ch.send(&ToSource::Accept { domain_id: 99 })?;
    let bytes = offer.info.memory_bytes as usize;
    let mapping = tern_migration::GuestRegion::from_range(vm_memory::GuestAddress(0), bytes, None)
        .map_err(|e| tern_migration::MigrationError::Protocol(format!("guest memory: {e}")))?;
    let regions = [RamRegion::new(std::sync::Arc::new(mapping))];
    destination::receive(&mut ch, &regions, &offer, &mut || Ok(()))?;
    let resume = destination::ready_and_wait_for_go(&mut ch, Duration::from_secs(30))?;
    goes.lock().unwrap().push(resume);
    if confirm.load(Ordering::Acquire) {
        let now = Instant::now();
        return destination::confirm_running(&mut ch, now, now, 0);
    }
    // Silence: hold the connection until the source hangs up.
    let mut sink = [0u8; 64];
    let tcp = match ch.into_transport()? {
        Link::Plain(tcp) => tcp,
        Link::Tls(_) => return Ok(()),
    };
    tcp.set_read_timeout(Some(Duration::from_millis(500))).ok();
    let mut tcp = tcp;
    while !stop.load(Ordering::Acquire) {
        match tcp.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if tern_migration::error::is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    drop(regions);
    Ok(())
}

/// Migrates `name` to `fake`, which never confirms: the outcome is unknown and the guest is
/// paused here, listed with a note saying so.
fn make_unresolved(host: &Host, fake: &FakeDestination, name: &str) {
    let err = host.fails(&["migrate", name, &fake.address()]);
    assert!(err.contains("outcome is unknown"), "{err}");
    let r = row(host, name);
    assert_eq!(r["state"], "paused", "{r}");
    let note = r["note"].as_str().unwrap_or("");
    assert!(
        note.contains("unresolved") && note.contains(&fake.address()),
        "note: {r}"
    );
}

#[test]
fn an_unresolved_guest_stays_paused_unless_forced() {
    let host = Host::start_with_toml("[relocation]\ninsecure = true\n");
    host.create_guest("u", 64, 1, "heartbeat_ms=100");
    let fake = FakeDestination::start();

    make_unresolved(&host, &fake, "u");
    let at = host.last_beat("u");
    for args in [
        &["unpause", "u"][..],
        &["migrate", "u", &fake.address()],
        &["migrate", "u", &fake.address(), "--live"],
    ] {
        let err = host.fails(args);
        println!("tern {args:?}: {}", err.trim());
        assert!(
            err.contains(&format!(
                "the migration of 'u' to {} is unresolved",
                fake.address()
            )),
            "{err}"
        );
        assert!(
            err.contains("--force") && err.contains("two hosts"),
            "{err}"
        );
    }
    // The source keeps asking the destination (which does not know yet); all that while the
    // guest stays paused.
    let asked = fake.queries();
    assert!(
        wait_for(Duration::from_secs(20), || fake.queries() >= asked + 2),
        "the source stopped asking the destination"
    );
    assert_eq!(host.last_beat("u").seq, at.seq, "the guest ran meanwhile");
    assert_eq!(row(&host, "u")["state"], "paused");

    // Forced, it runs here, and the question is no longer asked.
    host.ok(&["unpause", "--force", "u"]);
    host.wait_heartbeat("u", at.seq + 3, Duration::from_secs(20));
    let r = row(&host, "u");
    assert!(r["state"] == "running" || r["state"] == "blocked", "{r}");
    assert!(r.get("note").is_none(), "{r}");
    assert_eq!(host.last_beat("u").reg_errors, 0);
    host.assert_no_failures("u");

    // A forced migration from an unresolved state goes ahead; the guest arrives paused.
    make_unresolved(&host, &fake, "u");
    fake.confirm.store(true, Ordering::Release);
    host.ok(&["migrate", "u", &fake.address(), "--force"]);
    assert!(
        wait_for(Duration::from_secs(20), || !host.has("u")),
        "the migrated guest is still listed"
    );
    assert_eq!(*fake.goes.lock().unwrap(), vec![true, true, false]);
}
