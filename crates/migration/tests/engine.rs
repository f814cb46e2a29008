//! The engine end to end over real TCP on loopback, with a simulated machine: a "guest"
//! thread that keeps writing pages while it runs, and dirty tracking of its own. The
//! destination's memory must end up equal to the source's.

use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_api::MigrationProgress;
use tern_migration::destination::{self, Received};
use tern_migration::source::{send, Observer, Plan, SendError, SourceVm};
use tern_migration::transport::Channel;
use tern_migration::{
    Limits, MigrationError, Offer, RamRegion, ToDestination, ToSource, PROTOCOL_VERSION,
};
use tern_snapshot::{Info, FORMAT_VERSION};

mod common;

use common::{memory, same_memory, FakeVm, MemDisks, Writes, PAGE};

/// A machine with `pages` pages, the first `prefilled` written, and a writer dirtying `hot`
/// at `pages_per_ms`.
fn vm(pages: usize, prefilled: usize, hot: Range<usize>, pages_per_ms: u64) -> FakeVm {
    FakeVm::new(pages, |p| p < prefilled, Writes::new(hot, pages_per_ms))
}

#[derive(Default)]
struct Watch {
    reports: Vec<MigrationProgress>,
    cancel_after: Option<usize>,
    asked: usize,
}

impl Observer for Watch {
    fn progress(&mut self, p: &MigrationProgress) {
        self.reports.push(p.clone());
    }

    fn keep_going(&mut self) -> Result<(), String> {
        self.asked += 1;
        match self.cancel_after {
            Some(n) if self.asked > n => Err("cancelled by the test".into()),
            _ => Ok(()),
        }
    }
}

fn offer(vm: &FakeVm) -> Offer {
    Offer {
        protocol: PROTOCOL_VERSION,
        stream_format: FORMAT_VERSION,
        migration_id: "m-1".into(),
        live: true,
        postcopy: false,
        copy_disks: vm.offered_disks(),
        info: Info {
            tern_version: "test".into(),
            created_unix: 0,
            host: "src".into(),
            guest_name: "g".into(),
            guest_uuid: "00000000-0000-0000-0000-000000000001".into(),
            memory_bytes: (vm.pages * PAGE) as u64,
            vcpus: 1,
            cpu_features: vec![],
        },
        config: serde_json::json!({ "name": "g" }),
        vcpu_cpuid: vec![vec![]],
    }
}

/// How the simulated destination behaves.
#[derive(Clone, Copy, PartialEq)]
enum Dest {
    /// Does everything right.
    Good,
    /// Refuses the offer.
    Refuse,
    /// Gives up after this many records of the stream.
    AbortMidStream,
    /// Disappears after Ready: never answers Go.
    VanishAfterReady,
    /// Takes [`SLOW_ACK`] to acknowledge the first MARK (of a guest small enough that its
    /// first round is one PAGES record: the MARK is the stream's fourth item).
    SlowToAcknowledge,
}

/// How long [`Dest::SlowToAcknowledge`] sits on the first MARK.
const SLOW_ACK: Duration = Duration::from_secs(4);

struct DestResult {
    memory: RamRegion,
    disks: Vec<Vec<u8>>,
    received: Option<Received>,
    committed: bool,
}

fn destination(listener: TcpListener, pages: usize, mode: Dest) -> JoinHandle<DestResult> {
    std::thread::spawn(move || {
        let memory = memory(pages);
        let regions = [memory.clone()];
        let (stream, _) = listener.accept().unwrap();
        let mut ch = Channel::new(stream);
        let offer = match ch.receive::<ToDestination>(Duration::from_secs(5)).unwrap() {
            ToDestination::Offer(o) => *o,
            other => panic!("{other:?}"),
        };
        let mut disks = MemDisks(
            offer
                .copy_disks
                .iter()
                .map(|d| vec![0u8; d.size as usize])
                .collect(),
        );
        if mode == Dest::Refuse {
            ch.send(&ToSource::Refuse {
                reason: "not today".into(),
            })
            .unwrap();
            return DestResult {
                memory,
                disks: disks.0,
                received: None,
                committed: false,
            };
        }
        ch.send(&ToSource::Accept { domain_id: 7 }).unwrap();
        let mut records = 0;
        let mut keep_going = || {
            records += 1;
            if mode == Dest::AbortMidStream && records > 20 {
                return Err("the destination ran out of patience".to_string());
            }
            if mode == Dest::SlowToAcknowledge && records == 4 {
                std::thread::sleep(SLOW_ACK);
            }
            Ok(())
        };
        let received = match destination::receive_with_disks(
            &mut ch,
            &regions,
            Some(&mut disks),
            &offer,
            &mut keep_going,
        ) {
            Ok(r) => r,
            Err(e) => {
                destination::abort(&mut ch, &e.to_string());
                return DestResult {
                    memory,
                    disks: disks.0,
                    received: None,
                    committed: false,
                };
            }
        };
        if mode == Dest::VanishAfterReady {
            ch.send(&ToSource::Ready).unwrap();
            return DestResult {
                memory,
                disks: disks.0,
                received: Some(received),
                committed: false,
            };
        }
        let resume = destination::ready_and_wait_for_go(&mut ch, Duration::from_secs(5)).unwrap();
        assert!(resume);
        let go = Instant::now();
        destination::confirm_running(&mut ch, go, Instant::now(), 1).unwrap();
        DestResult {
            memory,
            disks: disks.0,
            received: Some(received),
            committed: true,
        }
    })
}

fn migrate(
    vm: &FakeVm,
    live: bool,
    limits: Limits,
    mode: Dest,
    watch: &mut Watch,
) -> (Result<tern_api::MigrationSummary, SendError>, DestResult) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, vm.pages, mode);
    let stream = TcpStream::connect(addr).unwrap();
    let plan = Plan {
        domain: "g".into(),
        destination: addr.to_string(),
        offer: offer(vm),
        live,
        postcopy: false,
        limits,
    };
    let mut ch = Channel::new(stream);
    let result = match tern_migration::source::offer(&mut ch, &plan.offer) {
        Ok(id) => send(vm, ch.into_transport().unwrap(), id, &plan, watch),
        Err(e) => Err(SendError::Failed(e)),
    };
    (result, dest.join().unwrap())
}

#[test]
fn warm_migration_copies_every_page() {
    let mut vm = vm(2048, 1500, 0..1500, 5);
    let mut watch = Watch::default();
    let (result, dest) = migrate(&vm, false, Limits::default(), Dest::Good, &mut watch);
    let summary = result.unwrap();
    vm.stop_writer();
    assert!(dest.committed);
    assert!(same_memory(&vm.memory, &dest.memory));
    let received = dest.received.unwrap();
    assert_eq!(received.machine, b"machine");
    assert_eq!(
        received.devices,
        vec![("serial0".to_string(), b"uart".to_vec())]
    );
    // Zero pages are not sent; the destination starts zeroed.
    assert_eq!(received.pages, 1500);
    assert_eq!(summary.rounds.len(), 1);
    assert!(summary.rounds[0].stop_and_copy);
    assert_eq!(summary.rounds[0].zero_pages, 548);
    assert_eq!(summary.destination_id, 7);
    assert!(!summary.live);
}

#[test]
fn live_migration_converges_and_copies_the_final_memory() {
    live_migration_copies_the_final_memory(vm(8192, 6000, 100..1100, 20));
}

/// With manual protection, pages are re-armed only as they are sent (and untouched pages
/// at the start): nothing written may be missed.
#[test]
fn live_migration_with_manual_dirty_protection_copies_the_final_memory() {
    live_migration_copies_the_final_memory(vm(8192, 6000, 100..1100, 20).manual());
}

fn live_migration_copies_the_final_memory(mut vm: FakeVm) {
    let mut watch = Watch::default();
    let (result, dest) = migrate(&vm, true, Limits::default(), Dest::Good, &mut watch);
    let summary = result.unwrap();
    vm.stop_writer();
    assert!(dest.committed);
    assert!(
        same_memory(&vm.memory, &dest.memory),
        "memory differs after the migration"
    );
    assert!(summary.live);
    assert!(summary.rounds.len() >= 2, "{:?}", summary.rounds);
    assert!(summary.rounds.last().unwrap().stop_and_copy);
    assert!(summary.downtime_ms > 0.0 && summary.downtime_ms < 1000.0);
    assert!(!watch.reports.is_empty());
    // The source is left paused: its guest runs on the destination now.
    assert!(vm.is_paused());
}

/// `--copy-storage`: the disk's bulk pass skips holes and zero blocks, the rounds carry what
/// the guest wrote meanwhile (zeroed blocks as zero runs), and the destination's disk equals
/// the source's at the pause.
#[test]
fn a_live_migration_copies_the_disk_the_guest_writes_meanwhile() {
    let mut vm = vm(4096, 3000, 100..600, 10).with_disk(4096, 2048, 1000..3000, 8);
    let mut watch = Watch::default();
    let (result, dest) = migrate(&vm, true, Limits::default(), Dest::Good, &mut watch);
    let summary = result.unwrap();
    vm.stop_writer();
    assert!(dest.committed);
    assert!(same_memory(&vm.memory, &dest.memory));
    let source_disk = vm.disks[0].data.lock().unwrap().clone();
    assert!(dest.disks[0] == source_disk, "the disks differ");
    let disks = summary.disks.expect("a disk summary");
    // A third of the prefilled blocks are zero (some written since), the rest a hole: not
    // sent.
    assert!(disks.bulk_bytes < 2048 * 4096 * 3 / 4, "{disks:?}");
    assert!(disks.bytes_skipped >= 600 * 4096, "{disks:?}");
    assert!(!disks.round_bytes.is_empty(), "{disks:?}");
    assert!(watch.reports.iter().any(|p| p.disk.is_some()));
}

#[test]
fn a_warm_migration_copies_the_disk() {
    let mut vm = vm(1024, 500, 0..100, 5).with_disk(1024, 700, 0..100, 5);
    let mut watch = Watch::default();
    let (result, dest) = migrate(&vm, false, Limits::default(), Dest::Good, &mut watch);
    result.unwrap();
    vm.stop_writer();
    assert!(dest.committed);
    assert!(dest.disks[0] == *vm.disks[0].data.lock().unwrap());
}

/// A migration that fails during the disk's bulk pass leaves the guest running, its disk's
/// write log off.
#[test]
fn a_failure_during_the_disk_copy_leaves_the_guest_running() {
    let vm = vm(256, 100, 0..10, 1).with_disk(16384, 16384, 0..100, 5);
    let mut watch = Watch::default();
    let (result, dest) = migrate(
        &vm,
        true,
        Limits::default(),
        Dest::AbortMidStream,
        &mut watch,
    );
    assert!(matches!(result, Err(SendError::Failed(_))), "{result:?}");
    assert!(!dest.committed);
    assert!(!vm.is_paused());
}

#[test]
fn a_refusal_leaves_the_guest_running() {
    let vm = vm(256, 10, 0..10, 1);
    let mut watch = Watch::default();
    let (result, _) = migrate(&vm, true, Limits::default(), Dest::Refuse, &mut watch);
    match result {
        Err(SendError::Failed(MigrationError::Refused(reason))) => assert_eq!(reason, "not today"),
        other => panic!("{other:?}"),
    }
    assert!(!vm.is_paused());
}

#[test]
fn a_destination_that_gives_up_is_heard_and_the_guest_runs_on() {
    let vm = vm(16384, 16000, 0..100, 5);
    let mut watch = Watch::default();
    let (result, dest) = migrate(
        &vm,
        true,
        Limits::default(),
        Dest::AbortMidStream,
        &mut watch,
    );
    match result {
        Err(SendError::Failed(e)) => {
            let text = e.to_string();
            assert!(text.contains("ran out of patience"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!dest.committed);
    assert!(!vm.is_paused(), "the guest must run on at the source");
}

#[test]
fn cancelling_before_the_commit_point_resumes_the_guest() {
    let vm = vm(4096, 4000, 0..100, 5);
    let mut watch = Watch {
        cancel_after: Some(3),
        ..Watch::default()
    };
    let (result, dest) = migrate(&vm, true, Limits::default(), Dest::Good, &mut watch);
    assert!(matches!(
        result,
        Err(SendError::Failed(MigrationError::Cancelled(_)))
    ));
    assert!(!dest.committed);
    assert!(!vm.is_paused());
}

#[test]
fn a_cancel_is_noticed_while_the_destination_applies_a_round() {
    // 64 pages: round 0 is one record, so the first question is asked while the engine waits
    // for the destination's acknowledgement, which takes seconds.
    let vm = vm(64, 64, 0..0, 0);
    vm.set_throttle(30).expect("throttle");
    let mut watch = Watch {
        cancel_after: Some(0),
        ..Watch::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, 64, Dest::SlowToAcknowledge);
    let plan = Plan {
        domain: "g".into(),
        destination: addr.to_string(),
        offer: offer(&vm),
        live: true,
        postcopy: false,
        limits: Limits::default(),
    };
    let mut ch = Channel::new(TcpStream::connect(addr).unwrap());
    let id = tern_migration::source::offer(&mut ch, &plan.offer).unwrap();
    let started = Instant::now();
    let result = send(&vm, ch.into_transport().unwrap(), id, &plan, &mut watch);
    let cancelled_after = started.elapsed();
    match result {
        Err(SendError::Failed(MigrationError::Cancelled(reason))) => {
            assert_eq!(reason, "cancelled by the test")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        cancelled_after < SLOW_ACK / 2,
        "the cancel waited for the acknowledgement: {cancelled_after:?}"
    );
    assert_eq!(watch.asked, 1, "asked once, while waiting");
    // As before the migration: running, at full speed, no dirty log.
    assert!(!vm.is_paused());
    assert_eq!(vm.throttle.load(Ordering::Relaxed), 0);
    assert!(!vm.dirty_log_on(), "the dirty log is still on");
    assert!(!dest.join().unwrap().committed);
}

#[test]
fn a_missing_confirmation_leaves_the_guest_paused_and_unresolved() {
    let vm = vm(512, 100, 0..10, 1);
    let mut watch = Watch::default();
    let (result, dest) = migrate(
        &vm,
        true,
        Limits::default(),
        Dest::VanishAfterReady,
        &mut watch,
    );
    assert!(
        matches!(result, Err(SendError::Unresolved(_))),
        "{result:?}"
    );
    assert!(!dest.committed);
    assert!(
        vm.is_paused(),
        "never resumed while the destination may run it"
    );
    assert_eq!(vm.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn the_rate_cap_holds() {
    // 12 MiB of data at 40 Mbit/s (5 MB/s): about 2.5 s.
    let vm = vm(4096, 3072, 0..0, 0);
    let mut watch = Watch::default();
    let limits = Limits {
        rate_limit: Some(5_000_000),
        ..Limits::default()
    };
    let started = Instant::now();
    let (result, dest) = migrate(&vm, false, limits, Dest::Good, &mut watch);
    let summary = result.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(dest.committed);
    let rate = summary.bytes_sent as f64 / secs;
    assert!(
        (rate - 5e6).abs() < 0.1 * 5e6,
        "{rate} B/s over {secs} s is not within 10% of the cap"
    );
    assert_eq!(summary.resource_mbit, Some(40));
}

#[test]
fn auto_converge_slows_a_guest_that_outruns_the_link() {
    // The link is capped at 4 MB/s; the guest dirties about 2000 pages (8 MB) a second
    // among 1000 hot pages: the rounds do not shrink until it is slowed down.
    let mut vm = vm(4096, 1000, 0..1000, 2);
    let mut watch = Watch::default();
    let limits = Limits {
        rate_limit: Some(4_000_000),
        max_downtime: Duration::from_millis(100),
        ..Limits::default()
    };
    let (result, dest) = migrate(&vm, true, limits, Dest::Good, &mut watch);
    let summary = result.unwrap();
    vm.stop_writer();
    assert!(dest.committed);
    assert!(same_memory(&vm.memory, &dest.memory));
    assert!(summary.max_throttle_percent > 0, "{summary:?}");
}
