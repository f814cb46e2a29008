//! The destination's side of post-copy: the guest runs, its faults on missing pages become
//! requests, and pages from the source are installed where still missing, until none is.
//!
//! A thread reads the faults ([`super::faults`]); one loop polls its queue and the connection.
//! A lost connection ends nothing: the guest's threads wait in their faults, faults on pages
//! that were never written are still served (zero pages), and the loop waits for the source
//! to come back through the daemon, which passes the new connection on `links`.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_snapshot::{PageRun, RecordType, StreamItem, StreamReader, PAGE_SIZE};

use crate::destination::MAX_RECORD_PAGES;
use crate::error::MigrationError;
use crate::memory::{push_page, PageSet, RamRegion};
use crate::postcopy::faults::{self, FaultEvent, FaultQueue};
use crate::postcopy::{message_runs, MAX_MESSAGE_RUNS, MAX_WANT_PAGES};
use crate::protocol::{ArrivedReport, Run, ToSource};
use crate::transport::{poll_readable, Channel, Transport};
use crate::STALL_TIMEOUT;

/// How long one wait for faults or input lasts (new connections are looked for between).
const TURN: Duration = Duration::from_millis(100);
/// How long the destination reads the rest of the stream after it reported `Arrived`.
const END_WAIT: Duration = Duration::from_secs(5);

/// The guest memory post-copy fills, as the engine needs it (userfaultfd in tern).
pub trait PostcopyTarget {
    /// Drops what guest memory holds of pages `first_pfn..first_pfn + pages` (inside one
    /// region), so that touching them faults. Before the guest runs.
    fn discard(&self, first_pfn: u64, pages: u64) -> Result<(), String>;
    /// A descriptor that polls readable while faults wait.
    fn fault_fd(&self) -> RawFd;
    /// The guest page of the next waiting fault, if any; never blocks.
    fn next_fault(&self) -> Result<Option<u64>, String>;
    /// Installs `data` (whole pages) from page `first_pfn` on, where still missing, and wakes
    /// the threads waiting on them.
    fn install(&self, first_pfn: u64, data: &[u8]) -> Result<(), String>;
    /// Installs zero pages `first_pfn..first_pfn + pages` where missing and wakes the threads
    /// waiting on them (also for a fault on a page present by now).
    fn install_zeros(&self, first_pfn: u64, pages: u64) -> Result<(), String>;
    /// Every page is in: faults are no longer handled.
    fn finish(&self) -> Result<(), String>;
}

/// Before the guest runs here: drops the stale copies the pre-copy left of the pages of
/// `missing`, so that the guest faults on them until their current content arrives.
pub fn drop_stale(target: &dyn PostcopyTarget, missing: &PageSet) -> Result<(), MigrationError> {
    for run in missing.runs() {
        target
            .discard(run.first_pfn, u64::from(run.pages))
            .map_err(|e| {
                MigrationError::Vm(format!(
                    "cannot drop the stale copies of pages {:#x}+{}: {e}",
                    run.first_pfn, run.pages
                ))
            })?;
    }
    Ok(())
}

/// How serving one connection ended.
enum Served<T> {
    Complete,
    Lost(MigrationError),
    /// The source came back on a new connection (it gave up on this one first).
    Replaced(T),
}

/// Why serving a connection stopped, inside the loop.
enum Break {
    /// The connection is no good: wait for another.
    Lost(MigrationError),
    /// Nothing more can be done here (the guest is destroyed, guest memory fails).
    Fatal(MigrationError),
}

impl From<MigrationError> for Break {
    fn from(e: MigrationError) -> Break {
        Break::Lost(e)
    }
}

/// The post-copy phase at the destination.
pub struct PostcopyDestination<'a, T> {
    target: &'a (dyn PostcopyTarget + Sync),
    ranges: Vec<Range<u64>>,
    /// Shared with the fault thread, which serves faults on other pages itself.
    missing: Arc<Mutex<PageSet>>,
    /// Faults on missing pages, from the fault thread (while it runs).
    faults: Option<FaultQueue>,
    /// Pages faults wait for, since when.
    waiting: HashMap<u64, Instant>,
    /// Waiting pages not asked for on the current connection yet.
    unasked: Vec<u64>,
    report: ArrivedReport,
    resumed: Instant,
    links: &'a Receiver<T>,
    keep_going: &'a mut dyn FnMut() -> Result<(), String>,
    /// Called once every page is in, before the source hears of it.
    on_complete: Option<&'a mut dyn FnMut()>,
}

impl<'a, T: Transport + AsRawFd> PostcopyDestination<'a, T> {
    /// Post-copy into `target` (guest RAM `regions`) of the pages of `missing`; the guest
    /// runs since `resumed`. New connections from the source arrive on `links`; `keep_going`
    /// is asked on every turn, and an error from it ends post-copy (the guest is destroyed).
    pub fn new(
        target: &'a (dyn PostcopyTarget + Sync),
        regions: &[RamRegion],
        missing: PageSet,
        resumed: Instant,
        links: &'a Receiver<T>,
        keep_going: &'a mut dyn FnMut() -> Result<(), String>,
    ) -> Self {
        PostcopyDestination {
            target,
            ranges: regions.iter().map(|r| r.first_pfn()..r.end_pfn()).collect(),
            missing: Arc::new(Mutex::new(missing)),
            faults: None,
            waiting: HashMap::new(),
            unasked: Vec::new(),
            report: ArrivedReport::default(),
            resumed,
            links,
            keep_going,
            on_complete: None,
        }
    }

    /// Calls `f` once every page is in, before the source hears of it (to record that the
    /// guest is whole here first).
    pub fn on_complete(mut self, f: &'a mut dyn FnMut()) -> Self {
        self.on_complete = Some(f);
        self
    }

    /// The pages still missing.
    fn missing(&self) -> MutexGuard<'_, PageSet> {
        self.missing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs post-copy over `first` (the connection of the handover), then over whatever
    /// connections the source comes back on, until every page is in. The faults are read by
    /// a thread of their own meanwhile.
    pub fn run(mut self, first: Channel<T>) -> Result<ArrivedReport, MigrationError> {
        let stop = AtomicBool::new(false);
        let (reader, queue) = faults::pair(self.target, self.missing.clone(), &stop)
            .map_err(|e| MigrationError::io("start reading page faults", e))?;
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn_scoped(scope, move || {
                    tern_sandbox::seccomp::enter_or_abort(tern_sandbox::ThreadKind::PageServer);
                    reader.run()
                });
            if let Err(e) = spawned {
                return Err(MigrationError::io("start reading page faults", e));
            }
            self.faults = Some(queue);
            let result = self.serve_all(first);
            stop.store(true, Ordering::Release);
            result
        })
    }

    fn serve_all(&mut self, first: Channel<T>) -> Result<ArrivedReport, MigrationError> {
        let mut next = Some((first, false));
        loop {
            let (ch, resumed) = match next.take() {
                Some(link) => link,
                None => (Channel::new(self.await_link()?), true),
            };
            match self.serve(ch, resumed)? {
                Served::Complete => return Ok(self.report),
                Served::Replaced(t) => {
                    log::info!("post-copy: the source came back on a new connection");
                    next = Some((Channel::new(t), true));
                }
                Served::Lost(e) => log::warn!(
                    "post-copy: lost the connection to the source ({e}); the guest waits for \
                     {} pages until the source comes back",
                    self.missing().count()
                ),
            }
        }
    }

    fn serve(&mut self, ch: Channel<T>, resumed: bool) -> Result<Served<T>, MigrationError> {
        match self.serve_link(ch, resumed) {
            Ok(served) => Ok(served),
            Err(Break::Lost(e)) => Ok(Served::Lost(e)),
            Err(Break::Fatal(e)) => Err(e),
        }
    }

    fn serve_link(&mut self, mut ch: Channel<T>, resumed: bool) -> Result<Served<T>, Break> {
        for timeout in [
            ch.transport().set_read_timeout(Some(STALL_TIMEOUT)),
            ch.transport().set_write_timeout(Some(STALL_TIMEOUT)),
        ] {
            timeout.map_err(|e| MigrationError::io("set a timeout", e))?;
        }
        if resumed {
            self.say_lacking(&mut ch)?;
        }
        let mut reader = StreamReader::new(ch).map_err(MigrationError::from_stream)?;
        reader.limit_pages(self.ranges.clone(), MAX_RECORD_PAGES);
        loop {
            (self.keep_going)().map_err(|e| Break::Fatal(MigrationError::Cancelled(e)))?;
            match self.links.try_recv() {
                Ok(t) => return Ok(Served::Replaced(t)),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            self.take_faults()?;
            self.ask(reader.get_mut())?;
            if self.missing().is_empty() {
                self.complete(&mut reader)?;
                return Ok(Served::Complete);
            }
            if !self.wait(reader.get_mut())? {
                continue;
            }
            match reader.next().map_err(MigrationError::from_stream)? {
                Some(item) => self.apply(item, &mut reader)?,
                None => {
                    return Err(Break::Lost(MigrationError::Protocol(format!(
                        "the source ended the post-copy stream with {} pages missing",
                        self.missing().count()
                    ))))
                }
            }
        }
    }

    /// On a resumed connection: every page still missing, then the pages faults wait for.
    fn say_lacking(&mut self, ch: &mut Channel<T>) -> Result<(), MigrationError> {
        let messages = message_runs(&self.missing());
        let count = messages.len();
        if count == 0 {
            ch.send(&ToSource::Lacking {
                runs: Vec::new(),
                last: true,
            })?;
        }
        for (i, runs) in messages.into_iter().enumerate() {
            ch.send(&ToSource::Lacking {
                runs,
                last: i + 1 == count,
            })?;
        }
        self.unasked = self.waiting.keys().copied().collect();
        Ok(())
    }

    /// Waits for faults or input; whether input is waiting.
    fn wait(&mut self, ch: &Channel<T>) -> Result<bool, Break> {
        if ch.input_waiting() {
            return Ok(true);
        }
        let mut fds = vec![ch.transport().as_raw_fd()];
        fds.extend(self.faults.as_ref().map(FaultQueue::fd));
        let ready =
            poll_readable(&fds, TURN).map_err(|e| MigrationError::io("wait for input", e))?;
        Ok(ready.first().copied().unwrap_or(false))
    }

    /// Takes the faults the fault thread queued: each page still to come is asked for once
    /// (a fault on a page installed meanwhile was woken by the install).
    fn take_faults(&mut self) -> Result<(), Break> {
        let events = self
            .faults
            .as_mut()
            .map(FaultQueue::drain)
            .unwrap_or_default();
        for event in events {
            match event {
                FaultEvent::Missing { pfn, since } => {
                    if !self.missing().contains(pfn) {
                        continue;
                    }
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.waiting.entry(pfn)
                    {
                        slot.insert(since);
                        self.unasked.push(pfn);
                        self.report.faults += 1;
                    }
                }
                FaultEvent::Failed(message) => return Err(fatal(message)),
            }
        }
        Ok(())
    }

    /// Asks for the pages faults wait for and that were not asked for yet.
    fn ask(&mut self, ch: &mut Channel<T>) -> Result<(), MigrationError> {
        if self.unasked.is_empty() {
            return Ok(());
        }
        let mut pfns = std::mem::take(&mut self.unasked);
        pfns.sort_unstable();
        pfns.dedup();
        let mut runs: Vec<PageRun> = Vec::new();
        for pfn in pfns {
            push_page(&mut runs, pfn);
        }
        let mut message: Vec<Run> = Vec::new();
        let mut pages = 0u64;
        for run in runs {
            let (mut first, mut left) = (run.first_pfn, u64::from(run.pages));
            while left > 0 {
                if message.len() == MAX_MESSAGE_RUNS || pages == MAX_WANT_PAGES {
                    ch.send(&ToSource::Want {
                        runs: std::mem::take(&mut message),
                    })?;
                    pages = 0;
                }
                let n = left.min(MAX_WANT_PAGES - pages);
                message.push(Run {
                    first_pfn: first,
                    pages: n as u32,
                });
                pages += n;
                first += n;
                left -= n;
            }
        }
        if !message.is_empty() {
            ch.send(&ToSource::Want { runs: message })?;
        }
        Ok(())
    }

    /// Installs what a record of the post-copy stream brings.
    fn apply(
        &mut self,
        item: StreamItem,
        reader: &mut StreamReader<Channel<T>>,
    ) -> Result<(), Break> {
        match item {
            StreamItem::Pages { runs, data } => {
                let mut off = 0usize;
                for run in &runs {
                    let len = run.pages as usize * PAGE_SIZE;
                    let pages = off
                        .checked_add(len)
                        .and_then(|end| data.get(off..end))
                        .ok_or_else(|| {
                            MigrationError::Protocol("a PAGES record is short of data".into())
                        })?;
                    self.install_run(run, Some(pages))?;
                    off += len;
                }
                reader.recycle(data);
                Ok(())
            }
            StreamItem::Zeros { runs } => {
                for run in &runs {
                    self.install_run(run, None)?;
                }
                Ok(())
            }
            StreamItem::Record {
                ty: RecordType::NOTE,
                ..
            } => Ok(()),
            StreamItem::Record { ty, .. } => Err(Break::Lost(MigrationError::Protocol(format!(
                "the post-copy stream has a {ty} record"
            )))),
            StreamItem::Missing { .. } => Err(Break::Lost(MigrationError::Protocol(
                "the post-copy stream has a MISSING record".into(),
            ))),
            StreamItem::Disk { .. } | StreamItem::DiskZeros { .. } => Err(Break::Lost(
                MigrationError::Protocol("the post-copy stream has disk records".into()),
            )),
        }
    }

    /// Installs the pages of `run` that are still missing: from `data` (the run's pages), or
    /// zero pages.
    fn install_run(&mut self, run: &PageRun, data: Option<&[u8]>) -> Result<(), Break> {
        let pages = u64::from(run.pages);
        let mut i = 0u64;
        while i < pages {
            if !self.missing().contains(run.first_pfn + i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages && self.missing().contains(run.first_pfn + i) {
                i += 1;
            }
            let first = run.first_pfn + start;
            let installed = match data {
                Some(bytes) => {
                    let part = bytes
                        .get(start as usize * PAGE_SIZE..i as usize * PAGE_SIZE)
                        .ok_or_else(|| fatal("a page run outside its record".into()))?;
                    self.target.install(first, part)
                }
                None => self.target.install_zeros(first, i - start),
            };
            installed.map_err(|e| fatal(format!("cannot install pages at {first:#x}: {e}")))?;
            for pfn in first..run.first_pfn + i {
                self.arrived(pfn);
            }
        }
        Ok(())
    }

    /// Page `pfn` is in.
    fn arrived(&mut self, pfn: u64) {
        self.missing().remove(pfn);
        match self.waiting.remove(&pfn) {
            Some(since) => {
                self.report.fetched += 1;
                let waited = since.elapsed().as_micros() as u64;
                self.report.longest_wait_us = self.report.longest_wait_us.max(waited);
            }
            None => self.report.pushed += 1,
        }
    }

    /// Every page is in: faults are the kernel's again; tell the source, read to the end of
    /// its stream.
    fn complete(&mut self, reader: &mut StreamReader<Channel<T>>) -> Result<(), Break> {
        self.report.complete_after_us = self.resumed.elapsed().as_micros() as u64;
        self.target
            .finish()
            .map_err(|e| fatal(format!("cannot end post-copy: {e}")))?;
        if let Some(f) = self.on_complete.as_mut() {
            f();
        }
        if let Err(e) = reader.get_mut().send(&ToSource::Arrived(self.report)) {
            // The guest is whole here either way; the source learns it from the daemon.
            log::warn!("post-copy: cannot tell the source that every page arrived: {e}");
            return Ok(());
        }
        let deadline = Instant::now() + END_WAIT;
        while Instant::now() < deadline {
            match reader.next() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Between connections: waits for the source (the fault thread serves what can be served
    /// here meanwhile, and stamps the rest).
    fn await_link(&mut self) -> Result<T, MigrationError> {
        loop {
            (self.keep_going)().map_err(MigrationError::Cancelled)?;
            match self.take_faults() {
                Ok(()) => {}
                Err(Break::Lost(e) | Break::Fatal(e)) => return Err(e),
            }
            match self.links.recv_timeout(TURN) {
                Ok(t) => return Ok(t),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Cancelled(
                        "nothing can bring the source back".into(),
                    ))
                }
            }
        }
    }
}

fn fatal(message: String) -> Break {
    Break::Fatal(MigrationError::Vm(message))
}
