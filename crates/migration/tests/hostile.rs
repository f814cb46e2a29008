//! The destination of a migration against a hostile source.
//!
//! Everything the destination reads from its peer is fed to it through the real code: valid
//! streams written with the real writer, then mutated (bit flips, truncation, insertions,
//! spliced, duplicated, dropped and reordered records, forged records with correct checksums:
//! pages outside guest memory, huge lengths and counts, unknown types, bad descriptors, MARKs
//! going backwards, another guest's INFO, records after END, another format version), go
//! through `destination::receive` and the handover over a real connection (a socket pair)
//! into real memory (an mmap with canary pages around and between the regions and
//! inaccessible guard pages beyond). Each case checks: no panic; an error whenever the stream
//! is not a valid one, and for a valid one the exact memory, state and acknowledgements; no
//! byte written outside the regions; memory allocated while receiving bounded by a constant
//! plus a small multiple of what was sent.
//!
//! The same goes for the relocation protocol's messages (`Channel::receive`: oversized lines,
//! garbage, wrong types) and for the state records, through the real restore functions of the
//! devices (virtio-mmio transport and queues, virtio-net, virtio-blk, the UART, ACPI PM,
//! i8042, pvpanic) and the vCPU state checks of the machine, none of which needs /dev/kvm.
//!
//! The default number of cases keeps this test to a few seconds; a longer run:
//! `TERN_FUZZ_CASES=200000 cargo test -p tern-migration --test hostile -- --nocapture`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};
use tern_devices::acpi_pm::{AcpiPm, AcpiPmState, PWRBTN, SLP_EN};
use tern_devices::i8042::I8042;
use tern_devices::irq::IrqLine;
use tern_devices::pvpanic::PvPanic;
use tern_devices::serial::{SerialDevice, SerialDeviceState};
use tern_devices::state::{decode_state, encode_state, SavedState};
use tern_devices::virtio::block::{BlockBackend, BlockState, VirtioBlock};
use tern_devices::virtio::mmio::{
    MmioState, MmioTransport, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use tern_devices::virtio::net::{NetBackend, NetState, VirtioNet};
use tern_devices::virtio::F_VERSION_1;
use tern_devices::{BusDevice, GuestEventSender, GuestMem, Pausable, Snapshottable};
use tern_machine::VcpuState;
use tern_migration::destination::{self, Received};
use tern_migration::transport::{Channel, Transport};
use tern_migration::{GuestRegion, Offer, RamRegion, ToDestination, ToSource, PROTOCOL_VERSION};
use tern_snapshot::{Info, PageRun, RecordType, SnapshotWriter, FORMAT_VERSION, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::MmapRegion;
use vm_memory::{Bytes, GuestAddress};

// ---------------------------------------------------------------------------------------------
// Case counts, panics, allocations.

/// Cases per property: `TERN_FUZZ_CASES`, or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("TERN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Panics on any thread (device workers included) since the test binary started.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

thread_local! {
    /// Bytes this thread has allocated and not freed (frees of memory allocated elsewhere
    /// count too, so it can go below zero), and the highest value since the last reset.
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system allocator, counting what each thread allocates: the destination runs on the
/// test's thread, so its count is not disturbed by tests running beside it.
struct Counting;

fn account(delta: isize) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get() + delta;
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is passed on to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` hold for `System` too.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with this layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the most memory this thread had allocated at once
/// meanwhile (beyond what it held before).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(|c| c.get());
    PEAK.with(|p| p.set(base));
    let result = f();
    let peak = PEAK.with(|p| p.get()) - base;
    (result, peak.max(0) as usize)
}

const MIB: usize = 1 << 20;

/// What the destination may allocate while it receives `sent` bytes: a constant (buffers,
/// the first step of a body buffer) plus a small multiple of the input.
fn allowance(sent: usize) -> usize {
    4 * MIB + 4 * sent
}

// ---------------------------------------------------------------------------------------------
// A connection: one end of a Unix socket pair as the migration's transport.

struct Sock(UnixStream);

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Transport for Sock {
    fn has_input(&self) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one descriptor we own, without waiting.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n > 0)
    }

    fn unacknowledged(&self) -> io::Result<usize> {
        Ok(0)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_write_timeout(timeout)
    }

    fn finish_writing(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }

    fn peer(&self) -> String {
        "the test's source".into()
    }
}

/// A source that sends `bytes` (in pieces of `chunk` bytes), ends its side, and collects what
/// the destination says until it closes. Returns the destination's end and the source.
fn source(bytes: Vec<u8>, chunk: usize) -> (Sock, std::thread::JoinHandle<Vec<u8>>) {
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let handle = std::thread::spawn(move || {
        let mut s = theirs;
        s.set_write_timeout(Some(Duration::from_secs(20))).ok();
        for piece in bytes.chunks(chunk.max(1)) {
            if s.write_all(piece).is_err() {
                break; // the destination gave up and closed
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut replies = Vec::new();
        let _ = s.read_to_end(&mut replies);
        replies
    });
    (Sock(ours), handle)
}

// ---------------------------------------------------------------------------------------------
// Guest memory: two regions with a hole between them, canary pages around and between, and
// inaccessible guard pages at both ends.

const PAGE: usize = PAGE_SIZE;
const A_PFN: u64 = 0x10;
const A_PAGES: usize = 48;
const B_PFN: u64 = 0x100;
const B_PAGES: usize = 16;
/// Pages a stream can address: region A then region B.
const SLOTS: usize = A_PAGES + B_PAGES;
const CANARY: u8 = 0xc5;

fn slot_pfn(slot: usize) -> u64 {
    if slot < A_PAGES {
        A_PFN + slot as u64
    } else {
        B_PFN + (slot - A_PAGES) as u64
    }
}

fn pfn_slot(pfn: u64) -> Option<usize> {
    if (A_PFN..A_PFN + A_PAGES as u64).contains(&pfn) {
        Some((pfn - A_PFN) as usize)
    } else if (B_PFN..B_PFN + B_PAGES as u64).contains(&pfn) {
        Some(A_PAGES + (pfn - B_PFN) as usize)
    } else {
        None
    }
}

/// Layout in pages: guard, canary, A, canary ×2 (the hole), B, canary, guard.
struct Ram {
    base: *mut u8,
    len: usize,
}

const RAM_PAGES: usize = 1 + 1 + A_PAGES + 2 + B_PAGES + 1 + 1;
const A_AT: usize = 2;
const B_AT: usize = A_AT + A_PAGES + 2;

impl Ram {
    fn new() -> Ram {
        let len = RAM_PAGES * PAGE;
        // SAFETY: a fresh anonymous private mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        let base = base.cast::<u8>();
        // SAFETY: the whole mapping is ours; the first and last page become guards.
        unsafe {
            std::ptr::write_bytes(base, CANARY, len);
            std::ptr::write_bytes(base.add(A_AT * PAGE), 0, A_PAGES * PAGE);
            std::ptr::write_bytes(base.add(B_AT * PAGE), 0, B_PAGES * PAGE);
            assert_eq!(libc::mprotect(base.cast(), PAGE, libc::PROT_NONE), 0);
            assert_eq!(
                libc::mprotect(base.add(len - PAGE).cast(), PAGE, libc::PROT_NONE),
                0
            );
        }
        Ram { base, len }
    }

    /// Regions A and B as the engine sees them. They borrow this mapping without holding it:
    /// callers drop them before the `Ram`.
    fn regions(&self) -> Vec<RamRegion> {
        let region = |at: usize, pfn: u64, pages: usize| {
            // SAFETY: pages `at..at + pages` lie inside this mapping, readable and writable,
            // created with these prot and flags; the MmapRegion does not own (unmap) them.
            let mapping = unsafe {
                MmapRegion::<AtomicBitmap>::build_raw(
                    self.base.add(at * PAGE),
                    pages * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("region");
            let region =
                GuestRegion::new(mapping, GuestAddress(pfn * PAGE as u64)).expect("guest region");
            RamRegion::new(Arc::new(region))
        };
        vec![region(A_AT, A_PFN, A_PAGES), region(B_AT, B_PFN, B_PAGES)]
    }

    fn page(&self, at: usize) -> &[u8] {
        // SAFETY: `at` is a readable page of the mapping (callers never pass a guard).
        unsafe { std::slice::from_raw_parts(self.base.add(at * PAGE), PAGE) }
    }

    fn slot(&self, slot: usize) -> &[u8] {
        if slot < A_PAGES {
            self.page(A_AT + slot)
        } else {
            self.page(B_AT + slot - A_PAGES)
        }
    }

    /// Whether every page outside the regions (guards aside) still holds the canary.
    fn canaries_intact(&self) -> bool {
        let canaries = [1, A_AT + A_PAGES, A_AT + A_PAGES + 1, B_AT + B_PAGES];
        canaries
            .iter()
            .all(|&p| self.page(p).iter().all(|&b| b == CANARY))
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// The offered guest and valid streams.

const VCPUS: usize = 2;

fn offer() -> Offer {
    Offer {
        protocol: PROTOCOL_VERSION,
        stream_format: FORMAT_VERSION,
        migration_id: "m-hostile".into(),
        live: true,
        postcopy: false,
        copy_disks: vec![],
        info: Info {
            tern_version: "test".into(),
            created_unix: 0,
            host: "source".into(),
            guest_name: "g".into(),
            guest_uuid: "00000000-0000-0000-0000-00000000beef".into(),
            memory_bytes: (SLOTS * PAGE) as u64,
            vcpus: VCPUS as u32,
            cpu_features: vec![],
        },
        config: serde_json::json!({ "name": "g", "memory_mib": 1, "vcpus": VCPUS }),
        vcpu_cpuid: vec![vec![]; VCPUS],
    }
}

/// Contents of a page with data: never all zero.
fn page_data(pfn: u64, seed: u8) -> Vec<u8> {
    let mut x = pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(seed) << 32) ^ 1;
    let mut out = Vec::with_capacity(PAGE);
    while out.len() < PAGE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out[0] |= 1;
    out
}

/// What a record means, for the oracle.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Info,
    Config,
    /// Pages with data: (pfn, contents).
    Pages(Vec<(u64, Vec<u8>)>),
    Zeros(Vec<u64>),
    Mark(u64),
    Machine(Vec<u8>),
    Vcpu(Vec<u8>),
    Device(String, Vec<u8>),
    /// A NOTE or an unknown optional record: skipped by any reader.
    Skipped,
    /// A record no valid stream holds (forged); the stream must be refused.
    Bad,
}

#[derive(Clone)]
struct Rec {
    kind: Kind,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Pages(p) => write!(f, "PAGES({} pages, {} B)", p.len(), self.bytes.len()),
            k => write!(f, "{k:?}({} B)", self.bytes.len()),
        }
    }
}

/// A valid migration to generate.
#[derive(Clone, Debug)]
struct Plan {
    /// Rounds of (page slot, seed): seed 0 is a page that is all zero now.
    rounds: Vec<Vec<(usize, u8)>>,
    /// MARK after every round but the last (a live migration) or none (warm).
    live: bool,
    per_record: usize,
    block_pages: u32,
    machine: Vec<u8>,
    vcpus: Vec<Vec<u8>>,
    devices: Vec<(String, Vec<u8>)>,
}

fn plan() -> impl Strategy<Value = Plan> {
    let round = prop::collection::vec((0..SLOTS, any::<u8>()), 0..24);
    let ids = vec!["serial0", "acpi-pm", "i8042", "pvpanic", "net0", "blk0"];
    (
        prop::collection::vec(round, 1..4),
        any::<bool>(),
        1usize..10,
        1u32..9,
        prop::collection::vec(any::<u8>(), 1..64),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..48), VCPUS),
        prop::sample::subsequence(ids, 0..=4),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 4),
    )
        .prop_map(
            |(rounds, live, per_record, block_pages, machine, vcpus, ids, bodies)| Plan {
                rounds,
                live,
                per_record,
                block_pages,
                machine,
                vcpus,
                devices: ids
                    .into_iter()
                    .zip(bodies)
                    .map(|(id, b)| (id.to_string(), b))
                    .collect(),
            },
        )
}

/// A stream: its header, its records (END not included) and what follows END.
#[derive(Clone, Debug)]
struct Stream {
    header: Vec<u8>,
    recs: Vec<Rec>,
}

/// Writes `plan` with the real writer, record by record.
fn write_stream(plan: &Plan, offer: &Offer) -> Stream {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    let header = w.get_ref().clone();
    let mut recs = Vec::new();
    let mut taken = header.len();
    let mut take = |w: &SnapshotWriter<Vec<u8>>, kind: Kind, recs: &mut Vec<Rec>| {
        let bytes = w.get_ref()[taken..].to_vec();
        taken = w.get_ref().len();
        recs.push(Rec { kind, bytes });
    };
    w.info(&offer.info).unwrap();
    take(&w, Kind::Info, &mut recs);
    w.record(
        RecordType::CONFIG,
        &serde_json::to_vec(&offer.config).unwrap(),
    )
    .unwrap();
    take(&w, Kind::Config, &mut recs);
    let last = plan.rounds.len() - 1;
    for (r, round) in plan.rounds.iter().enumerate() {
        let pages: BTreeMap<u64, u8> = round.iter().map(|&(s, seed)| (slot_pfn(s), seed)).collect();
        let data: Vec<(u64, u8)> = pages
            .iter()
            .filter(|p| *p.1 != 0)
            .map(|(&p, &s)| (p, s))
            .collect();
        for chunk in data.chunks(plan.per_record) {
            let mut runs: Vec<PageRun> = Vec::new();
            for &(pfn, _) in chunk {
                match runs.last_mut() {
                    Some(run) if run.end_pfn() == pfn => run.pages += 1,
                    _ => runs.push(PageRun {
                        first_pfn: pfn,
                        pages: 1,
                    }),
                }
            }
            let contents: Vec<(u64, Vec<u8>)> =
                chunk.iter().map(|&(p, s)| (p, page_data(p, s))).collect();
            let mut per_run = Vec::new();
            let mut i = 0;
            for run in &runs {
                let n = run.pages as usize;
                per_run.push(
                    contents[i..i + n]
                        .iter()
                        .flat_map(|c| c.1.iter().copied())
                        .collect::<Vec<u8>>(),
                );
                i += n;
            }
            let slices: Vec<&[u8]> = per_run.iter().map(|d| d.as_slice()).collect();
            w.pages(&runs, &slices, plan.block_pages).unwrap();
            take(&w, Kind::Pages(contents), &mut recs);
        }
        // The first pass leaves zero pages out: the destination's memory starts zeroed.
        let zeros: Vec<u64> = pages.iter().filter(|p| *p.1 == 0).map(|p| *p.0).collect();
        if r > 0 && !zeros.is_empty() {
            let runs: Vec<PageRun> = zeros
                .iter()
                .map(|&p| PageRun {
                    first_pfn: p,
                    pages: 1,
                })
                .collect();
            w.zeros(&runs).unwrap();
            take(&w, Kind::Zeros(zeros), &mut recs);
        }
        if plan.live && r < last {
            w.mark(r as u64).unwrap();
            take(&w, Kind::Mark(r as u64), &mut recs);
        }
    }
    w.record(RecordType::MACHINE, &plan.machine).unwrap();
    take(&w, Kind::Machine(plan.machine.clone()), &mut recs);
    for v in &plan.vcpus {
        w.record(RecordType::VCPU, v).unwrap();
        take(&w, Kind::Vcpu(v.clone()), &mut recs);
    }
    for (id, state) in &plan.devices {
        w.device(id, state).unwrap();
        take(&w, Kind::Device(id.clone(), state.clone()), &mut recs);
    }
    let written = w.finish().unwrap();
    let stream = Stream { header, recs };
    // The test's END is the writer's.
    assert_eq!(stream.bytes(None), [written, go_line()].concat());
    stream
}

/// One record of `ty` with `body`, checksums right.
fn raw_record(ty: u32, body: &[u8]) -> Vec<u8> {
    raw_header(ty, body.len() as u64, crc32c::crc32c(body))
        .into_iter()
        .chain(body.iter().copied())
        .collect()
}

/// A record header declaring `length` bytes of body with checksum `body_crc`.
fn raw_header(ty: u32, length: u64, body_crc: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn go_line() -> Vec<u8> {
    let mut line = serde_json::to_vec(&ToDestination::Go { resume: true }).unwrap();
    line.push(b'\n');
    line
}

impl Stream {
    /// The bytes: header, records, END (counting the records unless `end_count` says
    /// otherwise), then the source's `Go`.
    fn bytes(&self, end_count: Option<u64>) -> Vec<u8> {
        let mut b = self.header.clone();
        for r in &self.recs {
            b.extend_from_slice(&r.bytes);
        }
        let count = end_count.unwrap_or(self.recs.len() as u64);
        b.extend(raw_record(RecordType::END.0, &count.to_le_bytes()));
        b.extend(go_line());
        b
    }
}

/// What a valid stream must leave behind.
#[derive(Debug, PartialEq)]
struct Expected {
    memory: Vec<Vec<u8>>,
    received: Received,
    marks: Vec<u64>,
}

/// The protocol's rules, written out independently of the destination: after leaving out
/// skipped records, INFO, CONFIG, then PAGES, ZEROS and increasing MARKs, then MACHINE, one
/// VCPU per vCPU and DEVICEs with distinct ids. `None` if the records break them.
fn judge(recs: &[Rec]) -> Option<Expected> {
    let mut memory = vec![vec![0u8; PAGE]; SLOTS];
    let mut received = Received {
        format: FORMAT_VERSION,
        ..Received::default()
    };
    let mut marks: Vec<u64> = Vec::new();
    let mut it = recs
        .iter()
        .map(|r| &r.kind)
        .filter(|k| **k != Kind::Skipped)
        .peekable();
    if it.next() != Some(&Kind::Info) || it.next() != Some(&Kind::Config) {
        return None;
    }
    loop {
        match it.next()? {
            Kind::Pages(pages) => {
                for (pfn, data) in pages {
                    memory[pfn_slot(*pfn)?] = data.clone();
                    received.pages += 1;
                }
            }
            Kind::Zeros(pfns) => {
                for pfn in pfns {
                    memory[pfn_slot(*pfn)?] = vec![0; PAGE];
                    received.zero_pages += 1;
                }
            }
            Kind::Mark(seq) => {
                if marks.last().is_some_and(|last| seq <= last) {
                    return None;
                }
                marks.push(*seq);
            }
            Kind::Machine(body) => {
                received.machine = body.clone();
                break;
            }
            _ => return None,
        }
    }
    for _ in 0..VCPUS {
        match it.next()? {
            Kind::Vcpu(body) => received.vcpus.push(body.clone()),
            _ => return None,
        }
    }
    for kind in it {
        match kind {
            Kind::Device(id, state) if !received.devices.iter().any(|d| d.0 == *id) => {
                received.devices.push((id.clone(), state.clone()))
            }
            _ => return None,
        }
    }
    Some(Expected {
        memory,
        received,
        marks,
    })
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Lengths and counts at and around every limit.
const INTERESTING: &[u64] = &[
    0,
    1,
    7,
    8,
    9,
    15,
    16,
    17,
    24,
    4095,
    4096,
    4097,
    1 << 16,
    (1 << 14) + 1,
    1 << 20,
    (1 << 20) + 1,
    1 << 22,
    (1 << 22) + 1,
    16 << 20,
    (16 << 20) + 1,
    64 << 20,
    (64 << 20) + 1,
    u32::MAX as u64,
    1 << 40,
    (1 << 52) - 1,
    1 << 52,
    u64::MAX - 23,
    u64::MAX,
];

fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![prop::sample::select(INTERESTING), any::<u64>()]
}

/// Page runs no destination may accept: in the hole, past the end, straddling a region's
/// end, at the end of the pfn space, wrapping around.
fn outside_run() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        Just((0, 1)),
        Just((A_PFN - 1, 1)),
        Just((A_PFN - 1, 2)),
        Just((A_PFN + A_PAGES as u64 - 1, 2)),
        Just((A_PFN + A_PAGES as u64, 1)),
        (A_PFN + A_PAGES as u64..B_PFN, 1u32..4),
        Just((B_PFN + B_PAGES as u64 - 3, 4)),
        Just((B_PFN + B_PAGES as u64, 1)),
        Just((A_PFN, A_PAGES as u32 + 1)),
        Just((A_PFN, u32::MAX)),
        Just(((1 << 52) - 1, 1)),
        Just((1 << 52, 1)),
        Just((u64::MAX, 1)),
        Just((u64::MAX - 1, 4)),
        (B_PFN + B_PAGES as u64..1 << 40, 1u32..3),
    ]
}

/// A forged record (checksums right) that no valid stream holds.
#[derive(Clone, Debug)]
enum Forged {
    /// A DISK record of `len` bytes at `offset` of disk `disk`.
    Disk {
        disk: u32,
        offset: u64,
        len: usize,
    },
    /// PAGES written by the real writer with one run outside guest memory.
    PagesOutside {
        inside: bool,
        run: (u64, u32),
    },
    /// ZEROS with one run outside guest memory (raw: the writer refuses some of these).
    ZerosOutside {
        run: (u64, u32),
    },
    /// A PAGES record over more pages than a destination takes (all inside... as far as the
    /// record can say: it declares them, its data is not sent).
    PagesTooMany,
    /// A PAGES descriptor with arbitrary fields and a declared body length.
    Descriptor {
        run_count: u32,
        block_pages: u32,
        data_offset: u32,
        runs: Vec<(u64, u32)>,
        length: u64,
    },
    /// A record header declaring `length` bytes that are not sent.
    Length {
        ty: u32,
        length: u64,
    },
    /// A DEVICE body whose id is empty, too long, longer than the body or not UTF-8.
    Device {
        body: Vec<u8>,
    },
    /// A MARK of the wrong length.
    MarkLength {
        len: usize,
    },
    /// INFO of another guest, CONFIG of another config.
    OtherInfo,
    OtherConfig,
    /// An unknown mandatory type.
    Mandatory {
        ty: u32,
    },
    /// A ZEROS body whose run count does not match its length.
    ZerosCount {
        count: u32,
    },
}

fn forged() -> impl Strategy<Value = Forged> {
    prop_oneof![
        (any::<bool>(), outside_run())
            .prop_map(|(inside, run)| Forged::PagesOutside { inside, run }),
        outside_run().prop_map(|run| Forged::ZerosOutside { run }),
        Just(Forged::PagesTooMany),
        (
            prop_oneof![
                prop::sample::select(&[0u32, 1, 2, 1 << 20, (1 << 20) + 1, u32::MAX][..]),
                any::<u32>()
            ],
            prop_oneof![
                prop::sample::select(&[0u32, 1, 64, 1024, 1025, u32::MAX][..]),
                any::<u32>()
            ],
            prop_oneof![
                prop::sample::select(
                    &[
                        0u32,
                        15,
                        16,
                        32,
                        48,
                        4096,
                        64 << 20,
                        (64 << 20) + 1,
                        u32::MAX
                    ][..]
                ),
                any::<u32>()
            ],
            prop::collection::vec(
                (
                    interesting(),
                    prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()]
                ),
                0..3
            ),
            interesting(),
        )
            .prop_map(|(run_count, block_pages, data_offset, runs, length)| {
                Forged::Descriptor {
                    run_count,
                    block_pages,
                    data_offset,
                    runs,
                    length,
                }
            }),
        (
            prop::sample::select(
                &[
                    1u32,
                    2,
                    3,
                    4,
                    5,
                    6,
                    7,
                    8,
                    0x8000_0001,
                    0x8000_0002,
                    0x8000_0100
                ][..]
            ),
            interesting(),
        )
            .prop_map(|(ty, length)| Forged::Length { ty, length }),
        prop_oneof![
            Just(vec![0, 0]),
            Just(vec![0]),
            Just(vec![65, 0].into_iter().chain([b'x'; 65]).collect()),
            Just(vec![0xff, 0xff, b'x']),
            Just(vec![3, 0, b'a', 0xff, 0xfe]),
            Just(vec![8, 0, b's', b'h', b'o', b'r', b't']),
        ]
        .prop_map(|body| Forged::Device { body }),
        prop::sample::select(&[0usize, 1, 7, 9, 16][..]).prop_map(|len| Forged::MarkLength { len }),
        (any::<u32>(), any::<u64>(), 0usize..2048).prop_map(|(disk, offset, len)| Forged::Disk {
            disk,
            offset,
            len
        }),
        Just(Forged::OtherInfo),
        Just(Forged::OtherConfig),
        prop_oneof![Just(0u32), Just(10), Just(0x7fff_ffff), 10u32..0x8000_0000]
            .prop_map(|ty| Forged::Mandatory { ty }),
        prop_oneof![Just(0u32), Just(2), Just(u32::MAX), any::<u32>()]
            .prop_map(|count| Forged::ZerosCount { count }),
    ]
}

/// The bytes of the forged record (a header only for `Length`).
fn forge(f: &Forged) -> Vec<u8> {
    let mut w = SnapshotWriter::new(Vec::new(), false).unwrap();
    let start = w.get_ref().len();
    match f {
        Forged::PagesOutside { inside, run } => {
            let mut runs = Vec::new();
            if *inside && run.0 > A_PFN {
                runs.push(PageRun {
                    first_pfn: A_PFN,
                    pages: 1,
                });
            }
            let pages = run.1.min(8); // the data actually sent; the run may declare more
            runs.push(PageRun {
                first_pfn: run.0,
                pages: run.1,
            });
            let writable = runs.iter().all(|r| {
                r.first_pfn
                    .checked_add(u64::from(r.pages))
                    .is_some_and(|e| e <= 1 << 52)
            }) && u64::from(run.1) <= 64;
            if writable {
                let data: Vec<Vec<u8>> = runs
                    .iter()
                    .map(|r| vec![0x42; r.pages as usize * PAGE])
                    .collect();
                let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
                w.pages(&runs, &slices, 4).unwrap();
            } else {
                // Past what the writer writes: a raw descriptor, some data.
                let mut desc = descriptor(&runs, 1);
                let declared = desc.len() as u64
                    + runs.iter().map(|r| u64::from(r.pages)).sum::<u64>() * PAGE as u64;
                let mut rec = raw_header(6, declared, crc32c::crc32c(&desc));
                rec.append(&mut desc);
                rec.extend(std::iter::repeat_n(0x42, pages as usize * PAGE));
                return rec;
            }
        }
        Forged::ZerosOutside { run } => {
            let mut body = 1u32.to_le_bytes().to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&run.0.to_le_bytes());
            body.extend_from_slice(&run.1.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            return raw_record(8, &body);
        }
        Forged::PagesTooMany => {
            let n = destination::MAX_RECORD_PAGES as u32 + 1;
            let runs = [PageRun {
                first_pfn: A_PFN,
                pages: n,
            }];
            let desc = descriptor(&runs, 1024);
            let mut rec = raw_header(
                6,
                desc.len() as u64 + u64::from(n) * PAGE as u64,
                crc32c::crc32c(&desc),
            );
            rec.extend(desc);
            return rec;
        }
        Forged::Descriptor {
            run_count,
            block_pages,
            data_offset,
            runs,
            length,
        } => {
            let mut desc = Vec::new();
            for x in [*run_count, *block_pages, *data_offset, 0] {
                desc.extend_from_slice(&x.to_le_bytes());
            }
            for (pfn, pages) in runs {
                desc.extend_from_slice(&pfn.to_le_bytes());
                desc.extend_from_slice(&pages.to_le_bytes());
                desc.extend_from_slice(&0u32.to_le_bytes());
            }
            desc.resize(desc.len() + 8, 0); // a few "checksums"
            let covered = (*data_offset as usize).min(desc.len());
            let mut rec = raw_header(6, *length, crc32c::crc32c(&desc[..covered]));
            rec.extend(desc);
            return rec;
        }
        // (A checksum no body has: an empty body's is 0.)
        Forged::Length { ty, length } => return raw_header(*ty, *length, 0xdead_beef),
        Forged::Device { body } => return raw_record(5, body),
        Forged::MarkLength { len } => return raw_record(RecordType::MARK.0, &vec![0; *len]),
        Forged::OtherInfo => {
            let mut info = offer().info;
            info.memory_bytes += PAGE as u64;
            w.info(&info).unwrap();
        }
        Forged::OtherConfig => w
            .record(RecordType::CONFIG, br#"{"name":"another"}"#)
            .unwrap(),
        Forged::Mandatory { ty } => return raw_record(*ty, b"mandatory"),
        Forged::Disk { disk, offset, len } => {
            let mut body = disk.to_le_bytes().to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend(std::iter::repeat_n(7u8, *len));
            return raw_record(RecordType::DISK.0, &body);
        }
        Forged::ZerosCount { count } => {
            let mut body = count.to_le_bytes().to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&A_PFN.to_le_bytes());
            body.extend_from_slice(&1u32.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            return raw_record(8, &body);
        }
    }
    w.get_ref()[start..].to_vec()
}

/// A PAGES descriptor for `runs` in blocks of `block_pages`, zero checksums: complete for up
/// to 4096 blocks, else with only that many checksums (its data offset says so).
fn descriptor(runs: &[PageRun], block_pages: u32) -> Vec<u8> {
    let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    let blocks = total.div_ceil(u64::from(block_pages)).min(4096) as usize;
    let len = 16 + 16 * runs.len() + 4 * blocks;
    let mut d = Vec::with_capacity(len);
    for x in [runs.len() as u32, block_pages, len as u32, 0] {
        d.extend_from_slice(&x.to_le_bytes());
    }
    for r in runs {
        d.extend_from_slice(&r.first_pfn.to_le_bytes());
        d.extend_from_slice(&r.pages.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
    }
    d.resize(len, 0);
    d
}

/// Changes to the list of records; END is recounted afterwards (a hostile source computes
/// its checksums and counts as easily as a real one).
#[derive(Clone, Debug)]
enum RecordChange {
    Duplicate(Index, Index),
    Drop(Index),
    Swap(Index, Index),
    Move(Index, Index),
    /// A NOTE or an unknown optional record: allowed anywhere.
    Skippable {
        at: Index,
        note: bool,
        len: usize,
    },
    /// A MARK of any sequence number.
    Mark {
        at: Index,
        seq: u64,
    },
    Forged {
        at: Index,
        forged: Forged,
    },
}

fn record_change() -> impl Strategy<Value = RecordChange> {
    prop_oneof![
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| RecordChange::Duplicate(a, b)),
        any::<Index>().prop_map(RecordChange::Drop),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| RecordChange::Swap(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| RecordChange::Move(a, b)),
        (any::<Index>(), any::<bool>(), 0usize..300)
            .prop_map(|(at, note, len)| RecordChange::Skippable { at, note, len }),
        (any::<Index>(), prop_oneof![0u64..4, any::<u64>()])
            .prop_map(|(at, seq)| RecordChange::Mark { at, seq }),
        (any::<Index>(), forged()).prop_map(|(at, forged)| RecordChange::Forged { at, forged }),
    ]
}

fn apply_change(recs: &mut Vec<Rec>, change: &RecordChange) {
    let n = recs.len();
    match change {
        RecordChange::Duplicate(a, b) => {
            let r = recs[a.index(n)].clone();
            recs.insert(b.index(n + 1), r);
        }
        RecordChange::Drop(a) => {
            recs.remove(a.index(n));
        }
        RecordChange::Swap(a, b) => recs.swap(a.index(n), b.index(n)),
        RecordChange::Move(a, b) => {
            let r = recs.remove(a.index(n));
            recs.insert(b.index(n), r);
        }
        RecordChange::Skippable { at, note, len } => {
            let body: Vec<u8> = (0..*len).map(|i| b'a' + (i % 26) as u8).collect();
            let ty = if *note {
                RecordType::NOTE.0
            } else {
                0x8000_0100
            };
            recs.insert(
                at.index(n + 1),
                Rec {
                    kind: Kind::Skipped,
                    bytes: raw_record(ty, &body),
                },
            );
        }
        RecordChange::Mark { at, seq } => recs.insert(
            at.index(n + 1),
            Rec {
                kind: Kind::Mark(*seq),
                bytes: raw_record(RecordType::MARK.0, &seq.to_le_bytes()),
            },
        ),
        RecordChange::Forged { at, forged } => recs.insert(
            at.index(n + 1),
            Rec {
                kind: Kind::Bad,
                bytes: forge(forged),
            },
        ),
    }
}

/// Changes to the bytes of a valid stream: each makes it invalid.
#[derive(Clone, Debug)]
enum ByteChange {
    /// Up to three bits flipped anywhere (CRC32C detects them all).
    Flip(Vec<(Index, u8)>),
    /// The stream (or the message after it) ends early.
    Truncate(Index),
    /// Up to four bytes replaced (a burst CRC32C always detects).
    Overwrite(Index, Vec<u8>),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// END with another count.
    EndCount(u64),
    /// A record after END, before the source's next message.
    AfterEnd(Forged),
    /// A header of another version (checksum right), or other flags.
    Header {
        version: u32,
        flags: u32,
    },
}

fn byte_change() -> impl Strategy<Value = ByteChange> {
    prop_oneof![
        prop::collection::vec((any::<Index>(), 0u8..8), 1..=3).prop_map(ByteChange::Flip),
        any::<Index>().prop_map(ByteChange::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..=4))
            .prop_map(|(at, b)| ByteChange::Overwrite(at, b)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, b)| ByteChange::Insert(at, b)),
        (any::<Index>(), 1usize..5000).prop_map(|(at, n)| ByteChange::Delete(at, n)),
        interesting().prop_map(ByteChange::EndCount),
        forged().prop_map(ByteChange::AfterEnd),
        (
            prop_oneof![Just(0u32), Just(1), Just(3), Just(u32::MAX), any::<u32>()],
            prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()],
        )
            .prop_map(|(version, flags)| ByteChange::Header { version, flags }),
    ]
}

/// The mutated bytes; `None` if the change happens to change nothing.
fn apply_bytes(stream: &Stream, change: &ByteChange) -> Option<Vec<u8>> {
    let clean = stream.bytes(None);
    let mut b = clean.clone();
    let n = b.len();
    match change {
        ByteChange::Flip(flips) => {
            for (at, bit) in flips {
                b[at.index(n)] ^= 1 << bit;
            }
        }
        ByteChange::Truncate(at) => b.truncate(at.index(n)),
        ByteChange::Overwrite(at, bytes) => {
            let at = at.index(n);
            let end = (at + bytes.len()).min(n);
            b[at..end].copy_from_slice(&bytes[..end - at]);
        }
        ByteChange::Insert(at, bytes) => {
            // Into the stream: whitespace inserted into the JSON message after it is fine.
            let at = at.index(n - go_line().len());
            b.splice(at..at, bytes.iter().copied());
        }
        ByteChange::Delete(at, len) => {
            let at = at.index(n);
            b.drain(at..(at + len).min(n));
        }
        ByteChange::EndCount(count) => b = stream.bytes(Some(*count)),
        ByteChange::AfterEnd(forged) => {
            let go = go_line();
            b.truncate(n - go.len());
            b.extend(forge(forged));
            b.extend(go);
        }
        ByteChange::Header { version, flags } => {
            // This format with only ALIGNED set is a valid header (harmless in a stream).
            let flags = if *version == FORMAT_VERSION {
                flags | 2
            } else {
                *flags
            };
            b[8..12].copy_from_slice(&version.to_le_bytes());
            b[16..20].copy_from_slice(&flags.to_le_bytes());
            let crc = crc32c::crc32c(&b[..28]);
            b[28..32].copy_from_slice(&crc.to_le_bytes());
        }
    }
    // Multiple flips of one bit cancel out; an overwrite may write what was there.
    (b != clean).then_some(b)
}

// ---------------------------------------------------------------------------------------------
// The destination, run on one stream.

/// What came of one stream.
struct Outcome {
    result: Result<(Received, bool), String>,
    replies: Vec<u8>,
    peak: usize,
    elapsed: Duration,
}

/// Runs the destination's side (receive, then Ready and the wait for Go) on `bytes`, sent in
/// pieces of `chunk` bytes, into `ram`.
fn run_destination(bytes: Vec<u8>, chunk: usize, ram: &Ram) -> Outcome {
    let offer = offer();
    let regions = ram.regions();
    let (sock, src) = source(bytes, chunk);
    let start = Instant::now();
    let (result, peak) = peak_of(|| {
        let mut ch = Channel::new(sock);
        let result = destination::receive(&mut ch, &regions, &offer, &mut || Ok(()))
            .and_then(|r| {
                destination::ready_and_wait_for_go(&mut ch, Duration::from_secs(10))
                    .map(|resume| (r, resume))
            })
            .map_err(|e| e.to_string());
        drop(ch);
        result
    });
    let elapsed = start.elapsed();
    let replies = src.join().expect("the source thread");
    Outcome {
        result,
        replies,
        peak,
        elapsed,
    }
}

/// The destination's acknowledgements: MARKs, then Ready.
fn acknowledgements(replies: &[u8]) -> Vec<ToSource> {
    replies
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a message from the destination"))
        .collect()
}

/// Checks what every case must satisfy, and the outcome against `expected` (`None`: the
/// stream is invalid and must be refused).
fn check(
    out: &Outcome,
    ram: &Ram,
    sent: usize,
    expected: Option<&Expected>,
) -> Result<(), TestCaseError> {
    prop_assert!(ram.canaries_intact(), "a write outside guest memory");
    prop_assert!(
        out.peak <= allowance(sent),
        "{} bytes allocated for {sent} bytes sent",
        out.peak
    );
    prop_assert!(
        out.elapsed < Duration::from_secs(20),
        "took {:?}",
        out.elapsed
    );
    match (expected, &out.result) {
        (None, Ok(_)) => prop_assert!(false, "an invalid stream was accepted"),
        (None, Err(_)) => {}
        (Some(_), Err(e)) => prop_assert!(false, "a valid stream was refused: {e}"),
        (Some(x), Ok((received, resume))) => {
            prop_assert!(*resume);
            prop_assert_eq!(received, &x.received);
            for (slot, page) in x.memory.iter().enumerate() {
                prop_assert!(
                    ram.slot(slot) == page.as_slice(),
                    "page slot {} differs",
                    slot
                );
            }
            let mut want: Vec<ToSource> = x
                .marks
                .iter()
                .map(|&seq| ToSource::Marked { seq })
                .collect();
            want.push(ToSource::Ready);
            prop_assert_eq!(acknowledgements(&out.replies), want);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The stream properties.

proptest! {
    #![proptest_config(config(1000))]

    /// Valid streams are received exactly, whatever the piece sizes on the wire.
    #[test]
    fn valid_streams_arrive_exactly(plan in plan(), chunk in prop_oneof![Just(1usize << 20), 1usize..5000]) {
        count_panics();
        let stream = write_stream(&plan, &offer());
        let expected = judge(&stream.recs);
        prop_assert!(expected.is_some(), "the writer's stream breaks the rules: {:?}", stream.recs);
        let bytes = stream.bytes(None);
        let sent = bytes.len();
        let ram = Ram::new();
        let out = run_destination(bytes, chunk, &ram);
        check(&out, &ram, sent, expected.as_ref())?;
    }

    /// Any change to the bytes of a valid stream is refused.
    #[test]
    fn changed_bytes_are_refused(plan in plan(), change in byte_change()) {
        count_panics();
        let stream = write_stream(&plan, &offer());
        let Some(bytes) = apply_bytes(&stream, &change) else {
            return Ok(());
        };
        let sent = bytes.len();
        let ram = Ram::new();
        let out = run_destination(bytes, 1 << 16, &ram);
        check(&out, &ram, sent, None)?;
    }

    /// Records spliced, duplicated, dropped, reordered, inserted or forged (checksums and END
    /// count right): accepted exactly when the protocol's rules allow them, with exactly the
    /// pages and state they carry.
    #[test]
    fn changed_records_follow_the_rules(
        plan in plan(),
        changes in prop::collection::vec(record_change(), 1..4),
    ) {
        count_panics();
        let mut stream = write_stream(&plan, &offer());
        for change in &changes {
            apply_change(&mut stream.recs, change);
        }
        let expected = if stream.recs.iter().any(|r| r.kind == Kind::Bad) {
            None
        } else {
            judge(&stream.recs)
        };
        let bytes = stream.bytes(None);
        let sent = bytes.len();
        let ram = Ram::new();
        let out = run_destination(bytes, 1 << 16, &ram);
        check(&out, &ram, sent, expected.as_ref())?;
    }

    /// Arbitrary bytes, with or without a valid header in front.
    #[test]
    fn garbage_is_refused(
        header in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..3000),
    ) {
        count_panics();
        let mut bytes = if header { write_stream(&tiny_plan(), &offer()).header } else { Vec::new() };
        bytes.extend(garbage);
        let sent = bytes.len();
        let ram = Ram::new();
        let out = run_destination(bytes, 1 << 16, &ram);
        check(&out, &ram, sent, None)?;
    }
}

fn tiny_plan() -> Plan {
    Plan {
        rounds: vec![vec![(0, 1)]],
        live: false,
        per_record: 1,
        block_pages: 1,
        machine: vec![1],
        vcpus: vec![vec![2]; VCPUS],
        devices: vec![],
    }
}

/// The cases the CVE list names, each once, with its own message.
#[test]
fn each_listed_attack_is_refused_with_a_clear_error() {
    count_panics();
    let offer = offer();
    let plan = Plan {
        rounds: vec![vec![(0, 1), (1, 2), (50, 3)], vec![(1, 0), (2, 4)]],
        live: true,
        per_record: 2,
        block_pages: 2,
        machine: b"machine".to_vec(),
        vcpus: vec![b"vcpu0".to_vec(), b"vcpu1".to_vec()],
        devices: vec![("serial0".into(), b"uart".to_vec())],
    };
    let clean = write_stream(&plan, &offer);
    let find = |want: fn(&Kind) -> bool| clean.recs.iter().position(|r| want(&r.kind)).unwrap();
    let machine = find(|k| matches!(k, Kind::Machine(_)));
    let vcpu = find(|k| matches!(k, Kind::Vcpu(_)));
    let end_of_pages = machine;
    let forged_at = |forged: Forged, at: usize| {
        let mut s = clean.clone();
        s.recs.insert(
            at,
            Rec {
                kind: Kind::Bad,
                bytes: forge(&forged),
            },
        );
        s.bytes(None)
    };
    let changed = |f: &dyn Fn(&mut Vec<Rec>)| {
        let mut s = clean.clone();
        f(&mut s.recs);
        s.bytes(None)
    };
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a page past the end of a region",
            forged_at(
                Forged::PagesOutside {
                    inside: false,
                    run: (B_PFN + B_PAGES as u64, 1),
                },
                end_of_pages,
            ),
            "outside the guest's memory",
        ),
        (
            "a run straddling a region's end",
            forged_at(
                Forged::PagesOutside {
                    inside: true,
                    run: (A_PFN + A_PAGES as u64 - 1, 2),
                },
                end_of_pages,
            ),
            "outside the guest's memory",
        ),
        (
            "zero pages in the hole",
            forged_at(
                Forged::ZerosOutside {
                    run: (A_PFN + A_PAGES as u64, 1),
                },
                end_of_pages,
            ),
            "outside the guest's memory",
        ),
        (
            "a run that overflows u64",
            forged_at(Forged::ZerosOutside { run: (u64::MAX, 2) }, end_of_pages),
            "52-bit",
        ),
        (
            "more pages in a record than a destination takes",
            forged_at(Forged::PagesTooMany, end_of_pages),
            "at most 16384 per record",
        ),
        (
            "a record claiming 2^40 bytes",
            forged_at(
                Forged::Length {
                    ty: RecordType::VCPU.0,
                    length: 1 << 40,
                },
                vcpu,
            ),
            "too large",
        ),
        (
            "a descriptor claiming 2^20 runs in 16 bytes",
            forged_at(
                Forged::Descriptor {
                    run_count: 1 << 20,
                    block_pages: 1,
                    data_offset: 16,
                    runs: vec![],
                    length: 16,
                },
                end_of_pages,
            ),
            "do not fit",
        ),
        (
            "state before the pages end",
            changed(&|r| {
                let m = r.remove(machine);
                r.insert(2, m);
            }),
            "PAGES record after the machine state",
        ),
        (
            "two MACHINE records",
            changed(&|r| {
                let m = r[machine].clone();
                r.insert(machine + 1, m);
            }),
            "MACHINE record twice",
        ),
        (
            "a VCPU more than the guest has",
            changed(&|r| {
                let v = r[vcpu].clone();
                r.insert(vcpu + 2, v);
            }),
            "more VCPU records",
        ),
        (
            "END before the state",
            changed(&|r| r.truncate(machine)),
            "without the machine state",
        ),
        (
            "END before the last VCPU",
            changed(&|r| r.truncate(vcpu + 1)),
            "1 of the guest's 2 VCPU",
        ),
        (
            "a device twice",
            changed(&|r| {
                let d = r.last().unwrap().clone();
                r.push(d);
            }),
            "two DEVICE records",
        ),
        (
            "an unknown mandatory record",
            forged_at(Forged::Mandatory { ty: 0x100 }, 2),
            "needs a newer tern",
        ),
        (
            "disk data when no disk is copied",
            forged_at(
                Forged::Disk {
                    disk: 0,
                    offset: 0,
                    len: 512,
                },
                2,
            ),
            "0 disks are being copied",
        ),
        (
            "a MARK going backwards",
            changed(&|r| {
                r.insert(
                    end_of_pages,
                    Rec {
                        kind: Kind::Mark(0),
                        bytes: raw_record(RecordType::MARK.0, &0u64.to_le_bytes()),
                    },
                )
            }),
            "MARK 0 comes after MARK 0",
        ),
        (
            "another guest's INFO",
            changed(&|r| {
                r[0] = Rec {
                    kind: Kind::Bad,
                    bytes: forge(&Forged::OtherInfo),
                }
            }),
            "another guest",
        ),
        (
            "another config",
            changed(&|r| {
                r[1] = Rec {
                    kind: Kind::Bad,
                    bytes: forge(&Forged::OtherConfig),
                }
            }),
            "differs from the offered config",
        ),
        (
            "a record after END",
            apply_bytes(&clean, &ByteChange::AfterEnd(Forged::Mandatory { ty: 4 })).unwrap(),
            "malformed message",
        ),
        (
            "a wrong END count",
            clean.bytes(Some(3)),
            "records precede it",
        ),
        (
            "a header of another version",
            apply_bytes(
                &clean,
                &ByteChange::Header {
                    version: 3,
                    flags: 0,
                },
            )
            .unwrap(),
            "format version 3, newer than tern",
        ),
        (
            "a header of the previous version, after an offer of this one",
            apply_bytes(
                &clean,
                &ByteChange::Header {
                    version: 1,
                    flags: 0,
                },
            )
            .unwrap(),
            "the stream has format version 1, the offer said 2",
        ),
    ];
    let mut truncated = clean.bytes(None);
    truncated.truncate(clean.header.len() + clean.recs[0].bytes.len() + 30);
    cases.push((
        "truncation mid-record",
        truncated,
        "the connection was lost",
    ));
    let mut flipped = clean.bytes(None);
    let at = clean.header.len() + clean.recs[0].bytes.len() + 40;
    flipped[at] ^= 4;
    cases.push(("a wrong checksum", flipped, "fails its checksum"));

    for (name, bytes, expected) in cases {
        let ram = Ram::new();
        let sent = bytes.len();
        let out = run_destination(bytes, 1 << 16, &ram);
        let e = match &out.result {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => e.clone(),
        };
        assert!(e.contains(expected), "{name}: {e}");
        assert!(
            ram.canaries_intact(),
            "{name}: a write outside guest memory"
        );
        assert!(out.peak <= allowance(sent), "{name}: {} bytes", out.peak);
        println!("{name}: {e}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// Over real TCP on loopback too, for one valid stream and one hostile one.
#[test]
fn over_tcp() {
    let plan = Plan {
        rounds: vec![vec![(3, 9), (60, 1)]],
        ..tiny_plan()
    };
    let good = write_stream(&plan, &offer());
    let expected = judge(&good.recs).unwrap();
    for (bytes, valid) in [(good.bytes(None), true), (good.bytes(Some(99)), false)] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(&bytes).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut replies = Vec::new();
            let _ = s.read_to_end(&mut replies);
            replies
        });
        let (stream, _) = listener.accept().unwrap();
        let ram = Ram::new();
        let mut ch = Channel::new(stream);
        let result = destination::receive(&mut ch, &ram.regions(), &offer(), &mut || Ok(()))
            .and_then(|r| {
                destination::ready_and_wait_for_go(&mut ch, Duration::from_secs(5)).map(|g| (r, g))
            });
        drop(ch);
        let replies = writer.join().unwrap();
        assert!(ram.canaries_intact());
        if valid {
            let (received, resume) = result.unwrap();
            assert!(resume);
            assert_eq!(received, expected.received);
            assert_eq!(ram.slot(3), page_data(slot_pfn(3), 9).as_slice());
            assert_eq!(acknowledgements(&replies), [ToSource::Ready]);
        } else {
            let e = result.unwrap_err().to_string();
            assert!(e.contains("records precede it"), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relocation protocol's messages.

/// What the destination reads from `input` as one message, and how much it allocated.
fn receive_message(input: Vec<u8>, chunk: usize) -> (Result<ToDestination, String>, usize) {
    let (sock, src) = source(input, chunk);
    let (result, peak) = peak_of(|| {
        let mut ch = Channel::new(sock);
        let r = ch
            .receive::<ToDestination>(Duration::from_secs(10))
            .map_err(|e| e.to_string());
        drop(ch);
        r
    });
    src.join().unwrap();
    (result, peak)
}

/// Lines that are nearly messages.
fn message_text() -> impl Strategy<Value = Vec<u8>> {
    let valid = [
        serde_json::to_string(&ToDestination::Go { resume: true }).unwrap(),
        serde_json::to_string(&ToDestination::Query {
            migration_id: "m".into(),
        })
        .unwrap(),
        serde_json::to_string(&ToDestination::Offer(Box::new(offer()))).unwrap(),
        r#"{"type":"go","resume":"yes"}"#.to_string(),
        r#"{"type":"launch"}"#.to_string(),
        r#"{"type":"offer"}"#.to_string(),
        r#"{"type":"go","resume":true,"resume":false}"#.to_string(),
        r#"[1,2,3]"#.to_string(),
        "null".to_string(),
        "\"go\"".to_string(),
        "{".repeat(200),
        "[".repeat(100_000),
        format!(
            r#"{{"type":"query","migration_id":"{}"}}"#,
            "x".repeat(1 << 20)
        ),
    ];
    (
        prop::sample::select(valid.to_vec()),
        prop::collection::vec((any::<Index>(), any::<u8>()), 0..3),
        prop_oneof![Just(None), any::<Index>().prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(text, edits, cut, newline)| {
            let mut b = text.into_bytes();
            for (at, byte) in edits {
                let n = b.len();
                b[at.index(n)] = byte;
            }
            if let Some(cut) = cut {
                let n = b.len();
                b.truncate(cut.index(n));
            }
            if newline {
                b.push(b'\n');
            }
            b
        })
}

proptest! {
    #![proptest_config(config(1000))]

    /// A message is accepted exactly when it is one well-formed line of at most 1 MiB; else
    /// an error, never a panic, and no more memory than the line limit allows.
    #[test]
    fn hostile_messages_are_refused(
        line in prop_oneof![message_text(), prop::collection::vec(any::<u8>(), 0..2000)],
        chunk in prop_oneof![Just(1usize << 20), 1usize..300],
    ) {
        count_panics();
        let expected = match line.iter().position(|&b| b == b'\n') {
            Some(end) if end <= tern_api::framing::MAX_LINE => {
                serde_json::from_slice::<ToDestination>(&line[..end]).ok()
            }
            _ => None,
        };
        let (result, peak) = receive_message(line, chunk);
        prop_assert!(peak <= 8 * MIB, "{} bytes allocated", peak);
        match (expected, result) {
            (Some(want), Ok(got)) => prop_assert_eq!(want, got),
            (None, Err(_)) => {}
            (want, got) => prop_assert!(false, "expected {:?}, got {:?}", want, got),
        }
    }
}

/// A line that never ends (a peer sending a gigabyte without a newline) is refused after the
/// limit, having cost about the limit.
#[test]
fn an_endless_line_is_cut_at_the_limit() {
    count_panics();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = theirs;
        let chunk = vec![b'a'; 64 << 10];
        let mut sent = 0u64;
        while sent < 1 << 30 {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(_) => break,
            }
        }
        sent
    });
    let start = Instant::now();
    let (result, peak) = peak_of(|| {
        let mut ch = Channel::new(Sock(ours));
        let r = ch.receive::<ToDestination>(Duration::from_secs(10));
        drop(ch);
        r
    });
    let sent = writer.join().unwrap();
    let e = result.unwrap_err().to_string();
    assert!(e.contains("too long"), "{e}");
    assert!(sent < 64 << 20, "{sent} bytes were read");
    assert!(peak <= 4 * MIB, "{peak} bytes allocated");
    assert!(start.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------------
// Device state, through the devices' own restore.

const DEV_MEM_A: (u64, usize) = (0, 1 << 20);
const DEV_MEM_B: (u64, usize) = (2 << 20, 512 << 10);

fn device_memory() -> GuestMem {
    GuestMem::from_ranges(&[
        (GuestAddress(DEV_MEM_A.0), DEV_MEM_A.1),
        (GuestAddress(DEV_MEM_B.0), DEV_MEM_B.1),
    ])
    .unwrap()
}

/// A TAP stand-in: one end of a datagram socket pair (the other end is dropped at once; sends
/// fail, receives find nothing).
struct Tap(OwnedFd);

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into our buffer.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: sending our buffer.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn tap() -> Tap {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors; the peer end is closed right away.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[1]));
        Tap(OwnedFd::from_raw_fd(fds[0]))
    }
}

/// A disk in memory.
struct MemDisk(Arc<Mutex<Vec<u8>>>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let disk = self.0.lock().unwrap();
        let at = offset as usize;
        buf.copy_from_slice(
            disk.get(at..at + buf.len())
                .ok_or(io::ErrorKind::InvalidInput)?,
        );
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap();
        let at = offset as usize;
        disk.get_mut(at..at + buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DISK_BYTES: usize = 64 << 10;

#[derive(Clone, Copy, Debug)]
enum Virtio {
    Net,
    Block,
}

fn transport(kind: Virtio, mem: &GuestMem) -> MmioTransport {
    let device: Box<dyn tern_devices::virtio::VirtioDevice> = match kind {
        Virtio::Net => Box::new(VirtioNet::new("net0", MAC, Box::new(tap()), None)),
        Virtio::Block => Box::new(VirtioBlock::new(
            "blk0",
            "serial",
            Box::new(MemDisk(Arc::new(Mutex::new(vec![0; DISK_BYTES])))),
        )),
    };
    MmioTransport::new(device, mem.clone(), IrqLine::new(16).unwrap()).unwrap()
}

fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn offered_features(t: &mut MmioTransport) -> u64 {
    w32(t, 0x14, 0);
    let low = r32(t, 0x10);
    w32(t, 0x14, 1);
    let high = r32(t, 0x10);
    w32(t, 0x14, 0);
    u64::from(low) | (u64::from(high) << 32)
}

/// A state the transport really produced: a driver negotiated, set up its queues at
/// `rings` (16-entry rings, one 8 KiB slot per queue) and started the device, which was then
/// paused and saved.
fn driven_state(kind: Virtio, mem: &GuestMem, rings: u64) -> Vec<u8> {
    let mut t = transport(kind, mem);
    w32(&mut t, 0x70, 1 | 2);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1); // VERSION_1
    w32(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
    let queues = match kind {
        Virtio::Net => 2,
        Virtio::Block => 1,
    };
    for i in 0..queues {
        let base = rings + i * 0x2000;
        w32(&mut t, 0x30, i as u32);
        w32(&mut t, 0x38, 16);
        w32(&mut t, 0x80, base as u32);
        w32(&mut t, 0x84, (base >> 32) as u32);
        w32(&mut t, 0x90, (base + 0x100) as u32);
        w32(&mut t, 0xa0, (base + 0x1000) as u32);
        w32(&mut t, 0x44, 1);
    }
    w32(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(
        r32(&mut t, 0x70) & STATUS_NEEDS_RESET,
        0,
        "the device did not start"
    );
    t.pause();
    t.snapshot().unwrap()
}

/// Whether `len` bytes at `addr` lie in one region of the test's device memory.
fn in_device_memory(addr: u64, len: u64) -> bool {
    [DEV_MEM_A, DEV_MEM_B].iter().any(|&(start, size)| {
        addr >= start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= start + size as u64)
    })
}

/// The rules a restored transport state obeys, written out independently: what the
/// transport could have produced.
fn transport_state_is_sane(s: &MmioState, kind: Virtio, offered: u64) -> bool {
    let max: &[u16] = match kind {
        Virtio::Net => &[256, 256],
        Virtio::Block => &[256],
    };
    let device_ok = match kind {
        Virtio::Net => decode_state::<NetState>("net0", SavedState::current(&s.device))
            .is_ok_and(|d| d.mac == MAC),
        Virtio::Block => decode_state::<BlockState>("blk0", SavedState::current(&s.device))
            .is_ok_and(|d| d.size == DISK_BYTES as u64),
    };
    let running = s.status & STATUS_DRIVER_OK != 0 && s.status & STATUS_NEEDS_RESET == 0;
    let features_ok = s.status & STATUS_FEATURES_OK == 0
        || (s.acked_features & !offered == 0 && s.acked_features & F_VERSION_1 != 0);
    device_ok
        && s.queues.len() == max.len()
        && s.queue_select as usize <= max.len()
        && s.interrupt_status & !3 == 0
        && features_ok
        && (!running || s.status & STATUS_FEATURES_OK != 0)
        && s.queues.iter().zip(max).all(|(q, &m)| {
            let size = u64::from(q.size);
            q.max_size == m
                && q.size.is_power_of_two()
                && q.size <= m
                && q.desc_table % 16 == 0
                && q.avail_ring % 2 == 0
                && q.used_ring % 4 == 0
                && !q.event_idx
                && q.next_avail.wrapping_sub(q.next_used) <= q.size
                && (!running
                    || !q.ready
                    || (in_device_memory(q.desc_table, 16 * size)
                        && in_device_memory(q.avail_ring, 6 + 2 * size)
                        && in_device_memory(q.used_ring, 6 + 8 * size)))
        })
}

/// Addresses near every edge of the test's device memory.
fn ring_address() -> impl Strategy<Value = u64> {
    let a_end = DEV_MEM_A.0 + DEV_MEM_A.1 as u64;
    let b_end = DEV_MEM_B.0 + DEV_MEM_B.1 as u64;
    prop_oneof![
        prop::sample::select(vec![
            0,
            8,
            a_end - 0x1000,
            a_end - 16,
            a_end - 6,
            a_end,
            DEV_MEM_B.0 - 16,
            DEV_MEM_B.0,
            b_end - 0x110,
            b_end - 16,
            b_end,
            1 << 32,
            u64::MAX - 15,
            u64::MAX - 1,
        ]),
        (0u64..b_end + 0x1000).prop_map(|a| a & !1),
        any::<u64>(),
    ]
}

/// One change to a saved transport state.
#[derive(Clone, Debug)]
enum StateChange {
    Size(usize, u16),
    MaxSize(usize, u16),
    Indices(usize, u16, u16),
    Desc(usize, u64),
    Avail(usize, u64),
    Used(usize, u64),
    Ready(usize, bool),
    EventIdx(usize, bool),
    QueueSelect(u32),
    InterruptStatus(u32),
    Status(u32),
    Features(u64),
    Device(Vec<u8>),
    DropQueue,
    AddQueue,
}

fn state_change() -> impl Strategy<Value = StateChange> {
    let q = 0usize..2;
    let size = prop_oneof![
        prop::sample::select(vec![0u16, 1, 3, 16, 255, 256, 257, 512, 32768, u16::MAX]),
        any::<u16>()
    ];
    prop_oneof![
        (q.clone(), size.clone()).prop_map(|(i, s)| StateChange::Size(i, s)),
        (q.clone(), size).prop_map(|(i, s)| StateChange::MaxSize(i, s)),
        (q.clone(), any::<u16>(), any::<u16>()).prop_map(|(i, a, u)| StateChange::Indices(i, a, u)),
        (q.clone(), 0u16..20, 0u16..20).prop_map(|(i, a, u)| StateChange::Indices(i, a, u)),
        (q.clone(), ring_address()).prop_map(|(i, a)| StateChange::Desc(i, a)),
        (q.clone(), ring_address()).prop_map(|(i, a)| StateChange::Avail(i, a)),
        (q.clone(), ring_address()).prop_map(|(i, a)| StateChange::Used(i, a)),
        (q.clone(), any::<bool>()).prop_map(|(i, r)| StateChange::Ready(i, r)),
        (q, any::<bool>()).prop_map(|(i, e)| StateChange::EventIdx(i, e)),
        prop_oneof![0u32..4, any::<u32>()].prop_map(StateChange::QueueSelect),
        prop_oneof![0u32..8, any::<u32>()].prop_map(StateChange::InterruptStatus),
        prop_oneof![
            prop::sample::select(vec![0u32, 1, 3, 4, 7, 11, 15, 0x4f, 0x8f]),
            any::<u32>()
        ]
        .prop_map(StateChange::Status),
        prop_oneof![
            prop::sample::select(vec![
                0u64,
                F_VERSION_1,
                F_VERSION_1 | (1 << 5),
                F_VERSION_1 | (1 << 9),
                F_VERSION_1 | (1 << 29),
                u64::MAX
            ]),
            any::<u64>()
        ]
        .prop_map(StateChange::Features),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(StateChange::Device),
        Just(StateChange::DropQueue),
        Just(StateChange::AddQueue),
    ]
}

fn change_state(s: &mut MmioState, change: &StateChange) {
    let n = s.queues.len();
    let q = |i: usize| i % n.max(1);
    let queue_change = !matches!(
        change,
        StateChange::QueueSelect(_)
            | StateChange::InterruptStatus(_)
            | StateChange::Status(_)
            | StateChange::Features(_)
            | StateChange::Device(_)
            | StateChange::DropQueue
            | StateChange::AddQueue
    );
    if n == 0 && queue_change {
        return;
    }
    match change {
        StateChange::Size(i, v) => s.queues[q(*i)].size = *v,
        StateChange::MaxSize(i, v) => s.queues[q(*i)].max_size = *v,
        StateChange::Indices(i, a, u) => {
            s.queues[q(*i)].next_avail = *a;
            s.queues[q(*i)].next_used = *u;
        }
        StateChange::Desc(i, a) => s.queues[q(*i)].desc_table = *a,
        StateChange::Avail(i, a) => s.queues[q(*i)].avail_ring = *a,
        StateChange::Used(i, a) => s.queues[q(*i)].used_ring = *a,
        StateChange::Ready(i, r) => s.queues[q(*i)].ready = *r,
        StateChange::EventIdx(i, e) => s.queues[q(*i)].event_idx = *e,
        StateChange::QueueSelect(v) => s.queue_select = *v,
        StateChange::InterruptStatus(v) => s.interrupt_status = *v,
        StateChange::Status(v) => s.status = *v,
        StateChange::Features(v) => s.acked_features = *v,
        StateChange::Device(b) => s.device = b.clone(),
        StateChange::DropQueue => {
            s.queues.pop();
        }
        StateChange::AddQueue => s.queues.push(s.queues.first().copied().unwrap_or_default()),
    }
}

/// Drives a restored transport like a driver and its device would: every register, the
/// configuration space, a notification of every queue (the device works on whatever the
/// rings in guest memory hold), pause, a reset.
fn exercise(t: &mut MmioTransport, pokes: &[(u8, u32)]) {
    let mut b = [0u8; 4];
    for off in (0..0x100).step_by(4) {
        t.read(off, &mut b);
    }
    for off in 0x100..0x120 {
        let mut one = [0u8; 1];
        t.read(off, &mut one);
    }
    t.resume();
    for q in 0..3 {
        w32(t, 0x50, q);
    }
    for &(reg, value) in pokes {
        w32(t, u64::from(reg & 0xfc), value);
    }
    std::thread::sleep(Duration::from_micros(200));
    t.pause();
    w32(t, 0x70, 0);
}

proptest! {
    #![proptest_config(config(1000))]

    /// A transport restores exactly the states it could have produced, and nothing it
    /// restores makes it or its device misbehave.
    #[test]
    fn virtio_transports_refuse_states_they_could_not_have_produced(
        net in any::<bool>(),
        rings in prop_oneof![Just(0x10000u64), Just(DEV_MEM_B.0 + 0x1000)],
        changes in prop::collection::vec(state_change(), 0..4),
        bytes in prop_oneof![
            Just(None),
            (any::<Index>(), any::<u8>()).prop_map(Some),
        ],
        memory_noise in prop::collection::vec(any::<u8>(), 0..0x3000),
        pokes in prop::collection::vec((any::<u8>(), any::<u32>()), 0..6),
    ) {
        count_panics();
        let before = PANICS.load(Ordering::SeqCst);
        let kind = if net { Virtio::Net } else { Virtio::Block };
        let mem = device_memory();
        let saved = driven_state(kind, &mem, rings);
        let mut state: MmioState = decode_state("x", SavedState::current(&saved)).unwrap();
        for c in &changes {
            change_state(&mut state, c);
        }
        let mut encoded = encode_state("x", &state).unwrap();
        if let Some((at, xor)) = bytes {
            let n = encoded.len();
            encoded[at.index(n)] ^= xor;
        }
        // The guest's rings hold anything.
        mem.write_slice(&memory_noise, GuestAddress(rings)).unwrap();

        let mut t = transport(kind, &mem);
        let offered = offered_features(&mut t);
        let expect_ok = decode_state::<MmioState>("x", SavedState::current(&encoded))
            .is_ok_and(|s| transport_state_is_sane(&s, kind, offered));
        let result = t.restore(SavedState::current(&encoded));
        prop_assert_eq!(result.is_ok(), expect_ok, "{:?}", result);
        if result.is_ok() {
            let back: MmioState = decode_state("x", SavedState::current(&t.snapshot().unwrap())).unwrap();
            prop_assert!(transport_state_is_sane(&back, kind, offered));
        }
        // A device that spins on what the guest left in its rings never pauses: watch it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            exercise(&mut t, &pokes);
            drop(t);
            let _ = done.send(());
        });
        prop_assert!(
            finished.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the device did not pause or stop"
        );
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a panic");
    }

    /// The UART, ACPI PM, i8042 and pvpanic: anything decodable that they could have held is
    /// restored, anything else refused, and they work afterwards.
    #[test]
    fn legacy_devices_refuse_states_they_could_not_have_produced(
        serial in (any::<[u8; 9]>(), prop::collection::vec(any::<u8>(), 0..80)),
        pm in (prop_oneof![Just(0u16), Just(PWRBTN), any::<u16>()], any::<u16>(), any::<u16>()),
        raw in prop::collection::vec(any::<u8>(), 0..40),
        flip in prop_oneof![Just(None), (any::<Index>(), 1u8..).prop_map(Some)],
        pokes in prop::collection::vec((0u8..8, any::<u8>()), 0..16),
    ) {
        count_panics();
        let before = PANICS.load(Ordering::SeqCst);
        let (r, fifo) = serial;
        let state = SerialDeviceState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2] & if r[8] & 1 == 0 { 0x0f } else { 0xff },
            interrupt_identification: if r[8] & 2 == 0 { [1, 2, 4, 6][usize::from(r[3] & 3)] } else { r[3] },
            line_control: r[4],
            line_status: r[5] & if r[8] & 4 == 0 { 0x61 } else { 0xff },
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: fifo,
        };
        let mut bytes = encode_state("serial0", &state).unwrap();
        if let Some((at, xor)) = flip {
            let n = bytes.len();
            bytes[at.index(n)] ^= xor;
        }
        let expect = decode_state::<SerialDeviceState>("serial0", SavedState::current(&bytes)).is_ok_and(|s| {
            s.in_buffer.len() <= 64
                && s.interrupt_enable & !0x0f == 0
                && [1, 2, 4, 6].contains(&s.interrupt_identification)
                && s.line_status & !0x61 == 0
        });
        let mut uart = SerialDevice::new(IrqLine::new(4).unwrap(), Box::new(io::sink()));
        prop_assert_eq!(uart.restore(SavedState::current(&bytes)).is_ok(), expect);
        for &(off, v) in &pokes {
            uart.write(u64::from(off), &[v]);
            let mut b = [0u8];
            uart.read(u64::from(off), &mut b);
        }
        uart.enqueue_input(&[1; 100]);

        let pm_state = AcpiPmState { status: pm.0, enable: pm.1, control: pm.2 };
        let mut bytes = encode_state("acpi-pm", &pm_state).unwrap();
        if let Some((at, xor)) = flip {
            let n = bytes.len();
            bytes[at.index(n)] ^= xor;
        }
        let expect = decode_state::<AcpiPmState>("acpi-pm", SavedState::current(&bytes))
            .is_ok_and(|s| s.status & !PWRBTN == 0 && s.control & SLP_EN == 0);
        let (events, _rx) = GuestEventSender::channel();
        let mut acpi = AcpiPm::new(IrqLine::new(9).unwrap(), events.clone());
        prop_assert_eq!(acpi.restore(SavedState::current(&bytes)).is_ok(), expect);
        acpi.press_power_button();

        let mut kbd = I8042::new(events.clone());
        prop_assert_eq!(kbd.restore(SavedState::current(&raw)).is_ok(), raw.is_empty());
        let mut panic_dev = PvPanic::new(events);
        prop_assert_eq!(panic_dev.restore(SavedState::current(&raw)).is_ok(), raw.is_empty());
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a panic");
    }

    /// vCPU states: decoded completely or refused, then put in vCPU order only if each vCPU
    /// exists, comes once, and has the CPUID it was created with.
    #[test]
    fn vcpu_states_name_each_vcpu_once(
        indices in prop::collection::vec(prop_oneof![0u32..3, any::<u32>()], 0..4),
        cpuid_of in prop::collection::vec(0u32..3, 4),
        lapic_len in prop_oneof![Just(1024usize), 0usize..1100],
        flip in prop_oneof![Just(None), (any::<Index>(), 1u8..).prop_map(Some)],
    ) {
        count_panics();
        let cpuids: Vec<Vec<kvm_cpuid_entry2>> = (0..2u32).map(cpuid).collect();
        let mut states = Vec::new();
        for (k, &index) in indices.iter().enumerate() {
            let mut bytes = encode_state("VCPU", &vcpu_state(index, cpuid(cpuid_of[k]), lapic_len)).unwrap();
            if let Some((at, xor)) = flip {
                let n = bytes.len();
                bytes[at.index(n)] ^= xor;
            }
            match decode_state::<VcpuState>("VCPU", SavedState::current(&bytes)) {
                Ok(s) => states.push(s),
                Err(_) => return Ok(()),
            }
        }
        let keys: Vec<(u32, usize)> = states.iter().map(|s| (s.index, s.lapic.len())).collect();
        let mut sorted: Vec<u32> = keys.iter().map(|k| k.0).collect();
        sorted.sort_unstable();
        let expect = sorted == [0, 1]
            && states
                .iter()
                .all(|s| s.lapic.len() == 1024 && same(&s.cpuid, &cpuids[s.index as usize]));
        match tern_machine::vcpu::order_states(states, &cpuids) {
            Ok(ordered) => {
                prop_assert!(expect, "accepted {:?}", keys);
                let order: Vec<u32> = ordered.iter().map(|s| s.index).collect();
                prop_assert_eq!(order, vec![0, 1]);
            }
            Err(_) => prop_assert!(!expect, "refused {:?}", keys),
        }
    }
}

fn cpuid(n: u32) -> Vec<kvm_cpuid_entry2> {
    vec![kvm_cpuid_entry2 {
        function: 1,
        eax: n,
        ..Default::default()
    }]
}

fn same(a: &[kvm_cpuid_entry2], b: &[kvm_cpuid_entry2]) -> bool {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| key(x) == key(y))
}

fn vcpu_state(index: u32, cpuid: Vec<kvm_cpuid_entry2>, lapic: usize) -> VcpuState {
    VcpuState {
        index,
        cpuid,
        regs: Default::default(),
        sregs: Default::default(),
        xsave: vec![0; 16],
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: vec![0; lapic],
        mp_state: Default::default(),
        events: Default::default(),
        msrs: vec![],
        tsc_khz: Some(1),
    }
}
