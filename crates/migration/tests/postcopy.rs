//! Post-copy end to end over TCP on loopback: a simulated source machine (a writer thread
//! dirtying pages), a destination whose guest memory is registered with a real userfaultfd and
//! a "guest" thread on it that touches every page while the rest arrives. The destination's
//! memory must end up equal to the source's paused copy, through a cut connection too.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_api::{MigrationProgress, MigrationSummary};
use tern_machine::uffd::Uffd;
use tern_migration::destination;
use tern_migration::postcopy::{drop_stale, PostcopyDestination, PostcopyTarget, Redial, Redialed};
use tern_migration::source::{send_postcopy, Observer, Plan, SendError, SourceVm};
use tern_migration::transport::Channel;
use tern_migration::{
    ArrivedReport, Limits, MigrationError, Offer, RamRegion, ToDestination, ToSource,
    PROTOCOL_VERSION,
};
use tern_snapshot::{Info, PageRun, RecordType, SnapshotWriter, FORMAT_VERSION};

mod common;

use common::{memory, read_page, same_memory, FakeVm, Writes, FIRST_PFN, PAGE};

/// A source machine with `pages` pages (the `hot` ones and every other cold one written, the
/// rest zero, as never-written memory is) and a writer dirtying `hot` at `pages_per_ms`, every
/// tenth page it writes a zero page (post-copy sends those as ZEROS).
fn source(pages: usize, hot: Range<usize>, pages_per_ms: u64) -> FakeVm {
    let filled = |p: usize| hot.contains(&p) || p % 2 == 0;
    let writes = Writes {
        hot: hot.clone(),
        pages_per_ms,
        zero_every: 10,
    };
    FakeVm::new(pages, filled, writes)
}

/// Destination memory behind a real userfaultfd.
struct UffdTarget {
    uffd: Uffd,
    memory: RamRegion,
}

impl UffdTarget {
    fn slice(&self, pfn: u64, pages: u64) -> Result<tern_migration::GuestSlice<'_>, String> {
        self.memory
            .slice(pfn, pages)
            .ok_or_else(|| format!("pages {pfn:#x}+{pages} outside memory"))
    }
}

impl PostcopyTarget for UffdTarget {
    fn discard(&self, first_pfn: u64, pages: u64) -> Result<(), String> {
        let s = self.slice(first_pfn, pages)?;
        // SAFETY: drops the pages of anonymous memory this test owns; nothing holds a
        // reference into them (they fault back in through the userfaultfd).
        let rc = unsafe {
            libc::madvise(
                s.ptr_guard_mut().as_ptr().cast(),
                s.len(),
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    }

    fn fault_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    fn next_fault(&self) -> Result<Option<u64>, String> {
        match self.uffd.next_fault() {
            Ok(Some(addr)) => self
                .memory
                .pfn_at(addr)
                .map(Some)
                .ok_or_else(|| "a fault outside memory".to_string()),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn install(&self, first_pfn: u64, data: &[u8]) -> Result<(), String> {
        let s = self.slice(first_pfn, (data.len() / PAGE) as u64)?;
        self.uffd.copy(&s, data).map_err(|e| e.to_string())
    }

    fn install_zeros(&self, first_pfn: u64, pages: u64) -> Result<(), String> {
        let s = self.slice(first_pfn, pages)?;
        self.uffd.zero(&s).map_err(|e| e.to_string())
    }

    fn finish(&self) -> Result<(), String> {
        self.uffd.unregister_all().map_err(|e| e.to_string())
    }
}

#[derive(Default)]
struct Watch {
    phases: Vec<String>,
    postcopy_started: Arc<AtomicBool>,
}

impl Observer for Watch {
    fn progress(&mut self, p: &MigrationProgress) {
        if self.phases.last() != Some(&p.phase) {
            self.phases.push(p.phase.clone());
        }
    }

    fn keep_going(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn postcopy_started(&mut self) {
        self.postcopy_started.store(true, Ordering::Release);
    }
}

fn offer(pages: usize) -> Offer {
    Offer {
        protocol: PROTOCOL_VERSION,
        stream_format: FORMAT_VERSION,
        migration_id: "m-pc".into(),
        live: true,
        postcopy: true,
        copy_disks: vec![],
        info: Info {
            tern_version: "test".into(),
            created_unix: 0,
            host: "src".into(),
            guest_name: "g".into(),
            guest_uuid: "00000000-0000-0000-0000-000000000002".into(),
            memory_bytes: (pages * PAGE) as u64,
            vcpus: 1,
            cpu_features: vec![],
        },
        config: serde_json::json!({ "name": "g" }),
        vcpu_cpuid: vec![vec![]],
    }
}

/// What the simulated destination ended with.
struct DestResult {
    memory: RamRegion,
    report: Result<ArrivedReport, String>,
    /// Pages the "guest" read, and how many of them it found missing first.
    touched: usize,
}

/// A connection through this host that the test can cut.
struct Proxy {
    addr: SocketAddr,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn to(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let kept = sockets.clone();
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let server = TcpStream::connect(target).unwrap();
            for s in [&client, &server] {
                s.set_nodelay(true).unwrap();
            }
            for s in [&client, &server] {
                kept.lock().unwrap().push(s.try_clone().unwrap());
            }
            pump(client.try_clone().unwrap(), server.try_clone().unwrap());
            pump(server, client);
        });
        Proxy { addr, sockets }
    }

    /// Breaks both connections: each end reads end of stream or a reset.
    fn cut(&self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// How a redial goes.
#[derive(Clone, Copy, PartialEq)]
enum Comeback {
    /// Connects to the destination's second listener.
    Reconnect,
    /// Says the destination lost the guest.
    Lost,
}

struct TestRedial {
    addr: SocketAddr,
    how: Comeback,
    attempts: u32,
}

impl Redial<TcpStream> for TestRedial {
    fn redial(&mut self) -> Redialed<TcpStream> {
        self.attempts += 1;
        match self.how {
            Comeback::Lost => Redialed::Lost("its guest process died".into()),
            Comeback::Reconnect => match TcpStream::connect(self.addr) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    Redialed::Resumed(s)
                }
                Err(e) => Redialed::Retry(MigrationError::io("connect", e)),
            },
        }
    }
}

/// The destination: receives, drops stale pages, hands over, runs a "guest" that reads every
/// page, and serves post-copy until complete (or until `dead` is set).
fn destination(
    listener: TcpListener,
    links: Receiver<TcpStream>,
    pages: usize,
    dead: Arc<AtomicBool>,
) -> JoinHandle<DestResult> {
    std::thread::spawn(move || {
        let memory = memory(pages);
        let regions = [memory.clone()];
        let (stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut ch = Channel::new(stream);
        let offer = match ch.receive::<ToDestination>(Duration::from_secs(5)).unwrap() {
            ToDestination::Offer(o) => *o,
            other => panic!("{other:?}"),
        };
        assert!(offer.postcopy);
        ch.send(&ToSource::Accept { domain_id: 9 }).unwrap();
        let received = destination::receive(&mut ch, &regions, &offer, &mut || Ok(())).unwrap();
        let missing = received
            .missing
            .expect("a post-copy stream names missing pages");
        let target = UffdTarget {
            uffd: Uffd::new().expect("userfaultfd"),
            memory: memory.clone(),
        };
        target.uffd.register(&memory.whole().unwrap()).unwrap();
        drop_stale(&target, &missing).unwrap();
        assert!(destination::ready_and_wait_for_go(&mut ch, Duration::from_secs(10)).unwrap());
        let resumed = Instant::now();
        destination::confirm_running(&mut ch, resumed, resumed, 1).unwrap();
        // The guest runs: it reads every page, the missing ones first (they fault).
        let guest = {
            let m = memory.clone();
            let order: Vec<usize> = missing
                .runs()
                .iter()
                .flat_map(|r| r.first_pfn..r.end_pfn())
                .map(|pfn| (pfn - FIRST_PFN) as usize)
                .chain(0..pages)
                .collect();
            std::thread::spawn(move || {
                for &p in &order {
                    read_page(&m, p);
                }
                order.len()
            })
        };
        let mut keep_going = || {
            if dead.load(Ordering::Acquire) {
                Err("the destination was killed".to_string())
            } else {
                Ok(())
            }
        };
        let pc =
            PostcopyDestination::new(&target, &regions, missing, resumed, &links, &mut keep_going);
        let report = pc.run(ch).map_err(|e| e.to_string());
        // Closing the userfaultfd lets a guest thread still waiting in a fault go on.
        drop(target);
        let touched = guest.join().unwrap();
        DestResult {
            memory,
            report,
            touched,
        }
    })
}

/// Runs a post-copy migration of `vm`; `cut_after` breaks the first connection that long
/// after post-copy began.
fn migrate(
    vm: &FakeVm,
    limits: Limits,
    how: Comeback,
    cut_after: Option<Duration>,
) -> (Result<MigrationSummary, SendError>, DestResult, u32) {
    if Uffd::new().is_err() {
        panic!("userfaultfd is not available to this test");
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let again = TcpListener::bind("127.0.0.1:0").unwrap();
    let again_addr = again.local_addr().unwrap();
    let (links_tx, links): (Sender<TcpStream>, Receiver<TcpStream>) = mpsc::channel();
    std::thread::spawn(move || {
        for s in again.incoming().flatten() {
            let _ = s.set_nodelay(true);
            if links_tx.send(s).is_err() {
                return;
            }
        }
    });
    let dead = Arc::new(AtomicBool::new(false));
    let dest = destination(listener, links, vm.pages, dead.clone());
    let proxy = Proxy::to(addr);
    let stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let plan = Plan {
        domain: "g".into(),
        destination: addr.to_string(),
        offer: offer(vm.pages),
        live: true,
        postcopy: true,
        limits,
    };
    let mut watch = Watch::default();
    let started = watch.postcopy_started.clone();
    let cutter = cut_after.map(|after| {
        std::thread::spawn(move || {
            let t = Instant::now();
            while !started.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(after);
            proxy.cut();
        })
    });
    let mut ch = Channel::new(stream);
    let mut redial = TestRedial {
        addr: again_addr,
        how,
        attempts: 0,
    };
    let result = match tern_migration::source::offer(&mut ch, &plan.offer) {
        Ok(id) => send_postcopy(
            vm,
            ch.into_transport().unwrap(),
            id,
            &plan,
            &mut watch,
            &mut redial,
        ),
        Err(e) => Err(SendError::Failed(e)),
    };
    if let Some(c) = cutter {
        c.join().unwrap();
    }
    if result.is_err() {
        dead.store(true, Ordering::Release);
    }
    assert!(
        watch.phases.iter().any(|p| p == "post-copy"),
        "{:?}",
        watch.phases
    );
    (result, dest.join().unwrap(), redial.attempts)
}

/// A post-copy migration of `vm` over a link capped at `rate` bytes per second, completing
/// with the destination's memory equal to the source's paused copy: the summary, what the
/// destination saw, and how often the source redialed.
fn migrate_whole(vm: &mut FakeVm, rate: u64) -> (MigrationSummary, DestResult, u32) {
    let limits = Limits {
        rate_limit: Some(rate),
        ..Limits::default()
    };
    let (result, dest, attempts) = migrate(vm, limits, Comeback::Reconnect, None);
    let summary = result.unwrap();
    vm.stop_writer();
    if let Err(e) = &dest.report {
        panic!("the destination did not complete: {e}");
    }
    assert!(same_memory(&vm.memory, &dest.memory), "memory differs");
    (summary, dest, attempts)
}

#[test]
fn post_copy_arrives_whole_with_faults_served_first() {
    let mut vm = source(6144, 1000..3000, 40);
    // 8 MB/s: the guest touches the missing pages faster than the push brings them.
    let (summary, dest, attempts) = migrate_whole(&mut vm, 8_000_000);
    let report = dest.report.unwrap();
    assert_eq!(
        dest.touched,
        vm.pages + report.fetched as usize + report.pushed as usize
    );
    let pc = summary.postcopy.clone().expect("a post-copy summary");
    println!(
        "{pc:?}; rounds {:?}",
        summary.rounds.iter().map(|r| r.pages).collect::<Vec<_>>()
    );
    assert!(pc.pages_missing > 0, "{pc:?}");
    assert_eq!(
        pc.pages_fetched + pc.pages_pushed,
        pc.pages_missing,
        "{pc:?}"
    );
    assert!(
        pc.faults > 0 && pc.pages_fetched > 0,
        "nothing was fetched on demand: {pc:?}"
    );
    assert_eq!(pc.reconnects, 0);
    assert_eq!(attempts, 0);
    assert!(
        summary.stop_reason.contains("post-copy"),
        "{}",
        summary.stop_reason
    );
    // The pre-copy of a post-copy migration is short and never throttled.
    assert!(summary.rounds.len() <= 3, "{:?}", summary.rounds);
    assert_eq!(vm.max_throttle.load(Ordering::Relaxed), 0);
    // The source's copy stays paused: the guest runs on the destination.
    assert!(vm.is_paused());
    assert_eq!(vm.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_guest_that_outruns_a_capped_link_is_not_throttled() {
    // 4 MB/s: the writer dirties about 8 MB/s.
    let mut vm = source(4096, 0..2000, 2);
    let (summary, _, _) = migrate_whole(&mut vm, 4_000_000);
    assert_eq!(vm.max_throttle.load(Ordering::Relaxed), 0);
    assert_eq!(summary.max_throttle_percent, 0);
    assert!(summary.postcopy.unwrap().pages_missing > 0);
}

#[test]
fn a_guest_that_rewrites_what_was_sent_switches_during_the_first_pass() {
    // 4 MB/s (about 1000 pages a second) while every page is written again about once a
    // second: waiting for the first pass to end would send most pages twice.
    let pages = 4096;
    let mut vm = source(pages, 0..pages, 4);
    let (summary, _, _) = migrate_whole(&mut vm, 4_000_000);
    assert!(
        summary.stop_reason.contains("during the first pass"),
        "{}",
        summary.stop_reason
    );
    assert_eq!(summary.rounds.len(), 1, "{:?}", summary.rounds);
    let first = &summary.rounds[0];
    let pc = summary.postcopy.clone().expect("a post-copy summary");
    // Every page goes once, and what the guest wrote again after it went once more: that
    // share is bounded, by 12.5% and what the guest writes between two looks at the log
    // (here, on a slow link, one per 250 ms chunk: the writer sweeps a quarter of memory).
    let sent = first.pages + first.zero_pages + pc.pages_missing;
    assert!(
        sent <= pages as u64 * 3 / 2,
        "{sent} pages sent for {pages}: {first:?} {pc:?}"
    );
    assert!(first.pages < pages as u64 / 2, "{first:?}");
}

#[test]
fn a_cut_connection_is_resumed_and_the_memory_arrives_whole() {
    let mut vm = source(4096, 0..3000, 20);
    // 6 MB/s: about 2 s of post-copy for 3000 pages.
    let limits = Limits {
        rate_limit: Some(6_000_000),
        ..Limits::default()
    };
    let (result, dest, attempts) = migrate(
        &vm,
        limits,
        Comeback::Reconnect,
        Some(Duration::from_millis(300)),
    );
    let summary = result.unwrap();
    vm.stop_writer();
    let report = dest.report.unwrap();
    assert!(same_memory(&vm.memory, &dest.memory), "memory differs");
    let pc = summary.postcopy.unwrap();
    assert!(pc.reconnects >= 1 && attempts >= 1, "{pc:?}");
    assert_eq!(report.fetched + report.pushed, pc.pages_missing);
    assert!(vm.is_paused());
}

#[test]
fn a_destination_that_dies_in_post_copy_leaves_the_source_paused() {
    let vm = source(4096, 0..3000, 20);
    let limits = Limits {
        rate_limit: Some(6_000_000),
        ..Limits::default()
    };
    let (result, dest, _) = migrate(
        &vm,
        limits,
        Comeback::Lost,
        Some(Duration::from_millis(300)),
    );
    match result {
        Err(SendError::Lost(reason)) => assert!(reason.contains("died"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(dest.report.is_err());
    assert!(vm.is_paused(), "the last whole copy stays paused");
    assert_eq!(vm.resumes.load(Ordering::Relaxed), 0);
}

/// A stream as a source writes it: INFO, CONFIG, one page, `between` (records written by the
/// test), the state and END.
fn stream(offer: &Offer, between: impl FnOnce(&mut SnapshotWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    w.info(&offer.info).unwrap();
    w.record(
        RecordType::CONFIG,
        &serde_json::to_vec(&offer.config).unwrap(),
    )
    .unwrap();
    let page = vec![7u8; PAGE];
    let one = |pfn| PageRun {
        first_pfn: pfn,
        pages: 1,
    };
    w.pages(&[one(FIRST_PFN)], &[&page], 1).unwrap();
    between(&mut w);
    w.record(RecordType::MACHINE, b"machine").unwrap();
    w.record(RecordType::VCPU, b"vcpu0").unwrap();
    w.finish().unwrap()
}

/// Feeds `bytes` to a destination over loopback; what it received, or why it refused.
fn receive(offer: &Offer, bytes: Vec<u8>) -> Result<destination::Received, String> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let (stream, _) = listener.accept().unwrap();
    let region = memory(64);
    let mut ch = Channel::new(stream);
    let result =
        destination::receive(&mut ch, &[region], offer, &mut || Ok(())).map_err(|e| e.to_string());
    drop(ch);
    writer.join().unwrap();
    result
}

#[test]
fn missing_records_are_held_to_the_protocol() {
    let run = |first_pfn, pages| PageRun { first_pfn, pages };
    let postcopy = offer(64);
    let missing = stream(&postcopy, |w| {
        w.missing(&[run(FIRST_PFN, 2), run(FIRST_PFN + 10, 5)])
            .unwrap();
        w.missing(&[run(FIRST_PFN + 63, 1)]).unwrap();
    });
    let got = receive(&postcopy, missing.clone()).unwrap();
    let set = got.missing.expect("the missing pages");
    assert_eq!(set.count(), 8);
    assert!(set.contains(FIRST_PFN + 1) && set.contains(FIRST_PFN + 63));

    let mut plain = offer(64);
    plain.postcopy = false;
    let e = receive(&plain, missing).unwrap_err();
    assert!(e.contains("not for post-copy"), "{e}");

    let page = vec![1u8; PAGE];
    let late = stream(&postcopy, |w| {
        w.missing(&[run(FIRST_PFN, 1)]).unwrap();
        w.pages(&[run(FIRST_PFN + 1, 1)], &[&page], 1).unwrap();
    });
    let e = receive(&postcopy, late).unwrap_err();
    assert!(e.contains("PAGES record after a MISSING record"), "{e}");

    for outside in [
        run(FIRST_PFN - 1, 1),
        run(FIRST_PFN + 63, 2),
        run(FIRST_PFN + 64, 1),
    ] {
        let bad = stream(&postcopy, |w| w.missing(&[outside]).unwrap());
        let e = receive(&postcopy, bad).unwrap_err();
        assert!(e.contains("outside"), "{outside:?}: {e}");
    }
}
