//! The machine's state handles on a running test guest: dirty-page logging, and capturing and
//! restoring vCPUs. The guest itself reports whether what came back is what it had.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_machine::{Machine, MachineConfig};
use tern_testguest::{Heartbeat, KvmLock};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn last_heartbeat(&self) -> Option<Heartbeat> {
        tern_testguest::complete_lines(&self.text())
            .filter_map(Heartbeat::parse)
            .next_back()
    }
    fn wait_heartbeat(&self, seq: u64) -> Heartbeat {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(hb) = self.last_heartbeat().filter(|h| h.seq >= seq) {
                return hb;
            }
            assert!(
                Instant::now() < deadline,
                "no heartbeat {seq}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn boot(mem_mib: u64, vcpus: u32, cmdline: &str) -> (Machine, Console) {
    let console = Console::default();
    let config = MachineConfig {
        mem_mib,
        vcpus,
        kernel: tern_testguest::path().to_path_buf(),
        initrd: None,
        cmdline: cmdline.into(),
        hidden_cpu_features: Vec::new(),
    };
    let mut m = Machine::new(&config, Box::new(console.clone()), Vec::new()).expect("machine");
    m.start(false).expect("start");
    console.wait_heartbeat(1);
    (m, console)
}

fn count_dirty(m: &Machine) -> u64 {
    m.dirty_pages()
        .expect("dirty log")
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Which dirty log a test machine uses.
#[derive(Clone, Copy, Debug)]
enum DirtyLog {
    Ring,
    Bitmap,
}

/// [`boot`] with the dirty ring or the bitmap (the ring is the default where KVM has it).
fn boot_with_log(log: DirtyLog, mem_mib: u64, vcpus: u32, cmdline: &str) -> (Machine, Console) {
    // Read when the machine is made; no other test makes one while the KVM lock is held.
    let value = match log {
        DirtyLog::Ring => "1",
        DirtyLog::Bitmap => "0",
    };
    std::env::set_var("TERN_DIRTY_RING", value);
    let booted = boot(mem_mib, vcpus, cmdline);
    std::env::remove_var("TERN_DIRTY_RING");
    booted
}

/// Starts the dirty log and re-arms every page, as a first pass does (every page starts out
/// dirty), then forgets what was logged meanwhile.
fn start_and_rearm_everything(m: &mut Machine) {
    m.start_dirty_log().expect("enable logging");
    for (i, bits) in m.dirty_pages().expect("dirty log").iter().enumerate() {
        m.rearm_dirty(i, 0, bits).expect("re-arm");
    }
    count_dirty(m);
}

/// With dirty logging on, KVM reports about as many pages as the guest's writer touched, by
/// the dirty ring and by the bitmap.
#[test]
fn dirty_logging_counts_the_pages_the_guest_writes() {
    let _lock = KvmLock::acquire();
    for log in [DirtyLog::Ring, DirtyLog::Bitmap] {
        count_the_pages_written(log);
    }
}

fn count_the_pages_written(log: DirtyLog) {
    let (mut m, console) = boot_with_log(
        log,
        256,
        1,
        "heartbeat_ms=100 wss_mib=64 write_mibps=32 verify_ms=100000 prefill=1",
    );
    // Before any re-arming every page in use counts as written: at least the working set.
    m.start_dirty_log().expect("enable logging");
    let initially = count_dirty(&m);
    assert!(
        initially >= 16384,
        "{log:?}: {initially} pages dirty at first"
    );
    start_and_rearm_everything(&mut m);
    let before = console.last_heartbeat().expect("hb").written;
    std::thread::sleep(Duration::from_millis(1000));
    let dirty = count_dirty(&m);
    let written = console.last_heartbeat().expect("hb").written - before;
    // 32 MiB/s is 8192 pages/s; the working set is 16384 pages, so pages are not rewritten
    // within the second and each write dirties a distinct page (plus a few for stacks, tables).
    assert!(written > 6000, "guest wrote {written} pages");
    assert!(
        dirty >= written * 9 / 10 && dirty <= written + 1000,
        "{dirty} dirty pages for {written} written (dirty ring: {})",
        m.limits_dirty_rate()
    );
    m.stop_dirty_log().expect("disable logging");
}

/// Capture and restore every vCPU of a paused 2-vCPU guest: it goes on as if nothing happened.
#[test]
fn vcpu_state_round_trip_is_invisible_to_the_guest() {
    let _lock = KvmLock::acquire();
    let (mut m, console) = boot(
        512,
        2,
        "heartbeat_ms=50 wss_mib=128 write_mibps=64 verify_ms=1000",
    );
    for _ in 0..5 {
        m.pause().expect("pause");
        let states = m.capture_vcpus().expect("capture");
        assert_eq!(states.len(), 2);
        assert!(states
            .iter()
            .all(|s| s.xsave.len() >= 1024 && !s.msrs.is_empty()));
        m.restore_vcpus(states).expect("restore");
        m.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = console.last_heartbeat().expect("hb").seq;
    let hb = console.wait_heartbeat(last + 20);
    assert_eq!(hb.reg_errors, 0, "{}", console.text());
    assert_eq!(hb.mem_errors, 0, "{}", console.text());
    assert!(!console.text().lines().any(tern_testguest::is_failure_line));
}

/// The other way round: a register changed in the captured state is what the guest sees.
#[test]
fn a_changed_register_in_a_restored_state_is_reported_by_the_guest() {
    let _lock = KvmLock::acquire();
    let (mut m, console) = boot(256, 1, "heartbeat_ms=50");
    // The fixed value the guest keeps in rbx on vCPU 0 while it sleeps.
    const FIXED_RBX: u64 = 0x7e57_0000_a5a5_0000;
    let mut changed = false;
    for _ in 0..50 {
        m.pause().expect("pause");
        let mut states = m.capture_vcpus().expect("capture");
        if states[0].regs.rbx == FIXED_RBX {
            states[0].regs.rbx ^= 0xff;
            m.restore_vcpus(states).expect("restore");
            changed = true;
        }
        m.resume().expect("resume");
        if changed {
            break;
        }
        std::thread::sleep(Duration::from_millis(7));
    }
    assert!(
        changed,
        "never caught the guest asleep with its fixed values"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !console.text().contains("REGISTER MISMATCH cpu=0 reg=rbx") {
        assert!(
            Instant::now() < deadline,
            "guest did not notice:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(console.text().contains(&format!(
        "expected={FIXED_RBX:#x} found={:#x}",
        FIXED_RBX ^ 0xff
    )));
}

/// A ramdisk reaches the guest intact, described in the PVH module list.
#[test]
fn the_ramdisk_arrives_intact() {
    let _lock = KvmLock::acquire();
    let dir = std::env::temp_dir().join(format!("tern-initrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.img");
    let data: Vec<u8> = (0..3_000_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &data).unwrap();
    let sum = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let console = Console::default();
    let config = MachineConfig {
        mem_mib: 128,
        vcpus: 1,
        kernel: tern_testguest::path().to_path_buf(),
        initrd: Some(initrd),
        cmdline: "heartbeat_ms=100".into(),
        hidden_cpu_features: Vec::new(),
    };
    let mut m = Machine::new(&config, Box::new(console.clone()), Vec::new()).expect("machine");
    m.start(false).expect("start");
    console.wait_heartbeat(1);
    let _ = std::fs::remove_dir_all(&dir);
    let expected = format!("size={} fnv1a={sum:#018x}", data.len());
    assert!(
        console.text().contains(&expected),
        "want {expected}:\n{}",
        console.text()
    );
}

/// The heartbeats printed so far.
fn beats(console: &Console) -> Vec<Heartbeat> {
    tern_testguest::complete_lines(&console.text())
        .filter_map(Heartbeat::parse)
        .collect()
}

/// Pages written per second over `d`, and the longest time between two heartbeats then (by
/// the guest's own clock).
fn write_rate_and_longest_gap(console: &Console, d: Duration) -> (f64, Duration) {
    let from = console.last_heartbeat().expect("hb");
    std::thread::sleep(d);
    let to = console.last_heartbeat().expect("hb");
    let gap = beats(console)
        .windows(2)
        .filter(|w| w[0].seq >= from.seq && w[1].seq <= to.seq)
        .map(|w| w[1].t_us.saturating_sub(w[0].t_us))
        .max()
        .unwrap_or(0);
    let secs = (to.t_us - from.t_us) as f64 / 1e6;
    (
        (to.written - from.written) as f64 / secs,
        Duration::from_micros(gap),
    )
}

/// With the dirty ring (opt-in): dirty pages are counted as with the bitmap, and a throttle
/// slows the guest's writing down while the vCPU that also prints the heartbeat keeps its
/// rhythm (a time-slice throttle would stall it as much as the writer).
#[test]
fn the_dirty_ring_limits_writing_not_the_heartbeat() {
    let _lock = KvmLock::acquire();
    // Read when the machine is made; no other test makes one while the lock is held.
    let (mut m, console) = boot_with_log(
        DirtyLog::Ring,
        512,
        2,
        "heartbeat_ms=10 wss_mib=128 write_mibps=128 verify_ms=100000",
    );
    if !m.limits_dirty_rate() {
        eprintln!("this KVM has no dirty ring: nothing to test");
        return;
    }
    start_and_rearm_everything(&mut m);
    let (free, _) = write_rate_and_longest_gap(&console, Duration::from_millis(1000));
    let dirty = count_dirty(&m) as f64;
    assert!(
        dirty >= free * 0.8,
        "{dirty} dirty pages for {free:.0} pages/s written"
    );
    m.set_throttle(80).expect("throttle");
    std::thread::sleep(Duration::from_millis(200));
    let (slowed, gap) = write_rate_and_longest_gap(&console, Duration::from_millis(1500));
    m.set_throttle(0).expect("unthrottle");
    m.stop_dirty_log().expect("disable logging");
    // Holds are short (a few ms), and a writer that falls behind catches up in a burst when
    // let go: an 80% throttle slows it well, though not to a fifth.
    assert!(
        slowed <= free * 0.75,
        "writing at {slowed:.0} pages/s throttled, {free:.0} before"
    );
    assert!(
        gap <= Duration::from_millis(50),
        "a heartbeat waited {gap:?} under the dirty limit"
    );
    let last = console.last_heartbeat().expect("hb");
    assert_eq!((last.mem_errors, last.reg_errors), (0, 0));
}
