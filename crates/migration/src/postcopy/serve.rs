//! The source's side of post-copy: pushing the pages the destination lacks, wanted ones
//! first, from the paused copy, and coming back after a lost connection.

use std::io::Write;
use std::time::{Duration, Instant};

use tern_api::MigrationProgress;
use tern_snapshot::{is_zero_page, PageRun, SnapshotWriter, PAGE_SIZE};

use crate::error::MigrationError;
use crate::memory::{guest_slice, push_page, PageSet, RamRegion};
use crate::postcopy::schedule::{Batch, PushSchedule};
use crate::postcopy::{add_runs, MAX_IN_FLIGHT, MAX_MESSAGE_RUNS, PUSH_RECORD_PAGES};
use crate::protocol::{ArrivedReport, ToSource};
use crate::source::Observer;
use crate::transport::{Channel, Transport};
use crate::STALL_TIMEOUT;

const PAGE: usize = PAGE_SIZE;
/// Pages per checksum block in the post-copy stream.
const BLOCK_PAGES: u32 = 16;
/// Least time between two progress reports.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How long a wanted page may wait behind one pushed record or the data in flight, on a
/// capped link: records and what is in flight are sized to take about this long.
const PUSH_SLICE: Duration = Duration::from_millis(2);
/// The smallest push record, in pages.
const MIN_PUSH_PAGES: usize = 8;

/// Pages per pushed record and bytes in flight at most, for a link capped at `rate` bytes
/// per second (uncapped: [`PUSH_RECORD_PAGES`] and [`MAX_IN_FLIGHT`]).
fn push_sizes(rate: Option<u64>) -> (usize, usize) {
    match rate {
        None => (PUSH_RECORD_PAGES, MAX_IN_FLIGHT),
        Some(rate) => {
            let bytes = (rate as f64 * PUSH_SLICE.as_secs_f64()) as usize;
            let pages = (bytes / PAGE).clamp(MIN_PUSH_PAGES, PUSH_RECORD_PAGES);
            (pages, bytes.clamp(MIN_PUSH_PAGES * PAGE, MAX_IN_FLIGHT))
        }
    }
}

/// The first wait before redialing, doubled after each failed attempt up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How the source reaches the destination again after losing the connection.
pub trait Redial<T> {
    /// One attempt: connect to the destination's relocation server and ask it to resume the
    /// migration (`Resume`).
    fn redial(&mut self) -> Redialed<T>;
}

/// What one redial found.
pub enum Redialed<T> {
    /// The destination's guest process took this connection over; it says what it lacks
    /// first.
    Resumed(T),
    /// The destination has every page (its `Arrived` was lost with the connection).
    Complete,
    /// The destination never ran the guest (`Go` did not arrive there): this copy is the
    /// guest.
    NeverRan,
    /// The destination's guest process ended before every page arrived: the guest's current
    /// state is gone.
    Lost(String),
    /// Not now (the link is down, the destination busy or undecided): try again later.
    Retry(MigrationError),
}

/// What the post-copy phase did, seen from the source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyReport {
    /// Pages the destination lacked at the handover.
    pub missing_at_handover: u64,
    /// Pages sent because the destination wanted them (a fault waited).
    pub served: u64,
    /// Pages sent in the background push.
    pub pushed: u64,
    /// Connections made again after one was lost.
    pub reconnects: u32,
    /// Bytes sent in the post-copy phase.
    pub bytes: u64,
    /// The destination's report; `None` if its `Arrived` was lost and its daemon said the
    /// guest is complete.
    pub arrived: Option<ArrivedReport>,
    /// From the source's first post-copy byte until it knew every page had arrived.
    pub seconds: f64,
}

/// Why post-copy did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyFailure {
    /// The destination's guest process ended before every page arrived.
    #[error("the destination lost the guest during post-copy: {0}")]
    Lost(String),
    /// The destination never ran the guest: this copy is the guest.
    #[error("the destination never ran the guest")]
    NeverRan,
    /// The source stopped serving pages: the guest was destroyed here, or the user ran this
    /// copy instead.
    #[error("post-copy stopped: {0}")]
    Abandoned(String),
}

/// Why serving one connection ended.
enum Stop {
    Lost(MigrationError),
    Abandoned(String),
}

/// The post-copy phase at the source.
pub struct PostcopySource<'a> {
    regions: Vec<RamRegion>,
    observer: &'a mut dyn Observer,
    schedule: PushSchedule,
    report: PostcopyReport,
    rate_limit: Option<u64>,
    /// Pages per pushed record, and bytes in flight at most while pushing.
    push_pages: usize,
    max_in_flight: usize,
    /// Copies of the pages of the record being sent.
    buf: Vec<u8>,
    started: Instant,
    last_progress: Option<Instant>,
    /// Most `Lacking` messages a resumed connection may bring.
    max_lacking_messages: u64,
    /// What the current connection had sent before the post-copy stream.
    sent_before: u64,
}

impl<'a> PostcopySource<'a> {
    /// Post-copy of the pages of `missing` from the paused guest memory `regions`, at most
    /// `rate_limit` bytes per second.
    pub fn new(
        regions: Vec<RamRegion>,
        missing: PageSet,
        rate_limit: Option<u64>,
        observer: &'a mut dyn Observer,
    ) -> Self {
        let total_pages: u64 = regions.iter().map(RamRegion::pages).sum();
        let report = PostcopyReport {
            missing_at_handover: missing.count(),
            ..PostcopyReport::default()
        };
        let (push_pages, max_in_flight) = push_sizes(rate_limit);
        PostcopySource {
            regions,
            observer,
            schedule: PushSchedule::new(missing),
            report,
            rate_limit,
            push_pages,
            max_in_flight,
            buf: vec![0u8; PUSH_RECORD_PAGES * PAGE],
            started: Instant::now(),
            last_progress: None,
            max_lacking_messages: total_pages / (2 * MAX_MESSAGE_RUNS as u64) + 1,
            sent_before: 0,
        }
    }

    /// Serves the destination until it has every page: over `first` (the connection the
    /// handover went over, if it still stands), then over connections `redial` makes again.
    pub fn run<T: Transport>(
        mut self,
        first: Option<Channel<T>>,
        redial: &mut dyn Redial<T>,
    ) -> Result<PostcopyReport, PostcopyFailure> {
        let mut link = first.map(|ch| self.prepare(ch));
        loop {
            let ch = match link.take() {
                Some(ch) => ch,
                None => match self.reconnect(redial)? {
                    Some(ch) => ch,
                    None => return Ok(self.finish()),
                },
            };
            match self.serve(ch) {
                Ok(arrived) => {
                    self.report.arrived = Some(arrived);
                    return Ok(self.finish());
                }
                Err(Stop::Abandoned(reason)) => return Err(PostcopyFailure::Abandoned(reason)),
                Err(Stop::Lost(e)) => {
                    log::warn!(
                        "post-copy: the connection to the destination broke ({e}); reconnecting"
                    )
                }
            }
        }
    }

    fn finish(mut self) -> PostcopyReport {
        self.report.seconds = self.started.elapsed().as_secs_f64();
        self.report
    }

    /// Rate cap and stall timeout on a connection.
    fn prepare<T: Transport>(&self, mut ch: Channel<T>) -> Channel<T> {
        if let Some(rate) = self.rate_limit {
            ch.limit_rate(rate);
        }
        if let Err(e) = ch.transport().set_write_timeout(Some(STALL_TIMEOUT)) {
            log::warn!("post-copy: cannot set a write timeout: {e}");
        }
        ch
    }

    /// One connection: the post-copy stream until the destination reports `Arrived`.
    fn serve<T: Transport>(&mut self, ch: Channel<T>) -> Result<ArrivedReport, Stop> {
        let lost = |what| move |e| Stop::Lost(MigrationError::io(what, e));
        // The handover's connection counts the pre-copy too.
        self.sent_before = ch.sent();
        let mut w = SnapshotWriter::new(ch, false).map_err(lost("start the post-copy stream"))?;
        let result = self.serve_stream(&mut w);
        self.report.bytes += w.get_ref().sent() - self.sent_before;
        if result.is_ok() {
            // The destination reads to END and closes; nothing waits on it.
            if let Err(e) = w.finish() {
                log::debug!("post-copy: cannot end the stream: {e}");
            }
        }
        result
    }

    fn serve_stream<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
    ) -> Result<ArrivedReport, Stop> {
        let mut stall = Stall::new();
        loop {
            self.observer.keep_serving().map_err(Stop::Abandoned)?;
            if let Some(arrived) = self.read_messages(w.get_mut(), &mut stall)? {
                return Ok(arrived);
            }
            let in_flight = w.get_ref().transport().unsent().unwrap_or(0);
            stall.in_flight(in_flight);
            let push = !self.schedule.is_done() && in_flight < self.max_in_flight;
            if self.schedule.has_wanted() || push {
                if let Some(batch) = self.schedule.next_batch(self.push_pages) {
                    self.send_batch(w, &batch).map_err(Stop::Lost)?;
                    stall.progress();
                    self.progress(w.get_ref());
                }
                continue;
            }
            if stall.expired() {
                return Err(Stop::Lost(MigrationError::Timeout(format!(
                    "no progress for {STALL_TIMEOUT:?} in post-copy (is the link down?)"
                ))));
            }
            let wait = if self.schedule.is_done() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(1)
            };
            w.get_ref().wait_input(wait);
        }
    }

    /// Handles every message waiting; the destination's report once it has every page.
    fn read_messages<T: Transport>(
        &mut self,
        ch: &mut Channel<T>,
        stall: &mut Stall,
    ) -> Result<Option<ArrivedReport>, Stop> {
        while let Some(msg) = ch.poll::<ToSource>().map_err(Stop::Lost)? {
            stall.progress();
            match msg {
                ToSource::Want { runs } => {
                    self.schedule.want(&runs).map_err(Stop::Lost)?;
                }
                ToSource::Arrived(report) => return Ok(Some(report)),
                other => {
                    return Err(Stop::Lost(MigrationError::Protocol(format!(
                        "unexpected {} in post-copy",
                        message_name(&other)
                    ))))
                }
            }
        }
        Ok(None)
    }

    /// Sends the pages of `batch`: a PAGES record for those with data, a ZEROS record for
    /// those that are zero (the destination dropped what it held of them).
    fn send_batch<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        batch: &Batch,
    ) -> Result<(), MigrationError> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut zeros: Vec<PageRun> = Vec::new();
        let mut filled = 0usize;
        for &pfn in &batch.pfns {
            let page = guest_slice(&self.regions, pfn, 1)
                .ok_or_else(|| MigrationError::Vm(format!("page {pfn:#x} is outside guest RAM")))?;
            let dst = self
                .buf
                .get_mut(filled * PAGE..(filled + 1) * PAGE)
                .ok_or_else(|| MigrationError::Vm("a post-copy batch is too large".into()))?;
            // The guest is paused here: the copy is what the destination must get.
            page.copy_to(dst);
            if is_zero_page(dst) {
                push_page(&mut zeros, pfn);
            } else {
                push_page(&mut runs, pfn);
                filled += 1;
            }
        }
        if !runs.is_empty() {
            let mut slices = Vec::with_capacity(runs.len());
            let mut off = 0usize;
            for run in &runs {
                let len = run.pages as usize * PAGE;
                slices.push(&self.buf[off..off + len]);
                off += len;
            }
            w.pages(&runs, &slices, BLOCK_PAGES)
                .map_err(|e| MigrationError::io("send pages", e))?;
        }
        w.zeros(&zeros)
            .map_err(|e| MigrationError::io("send zero pages", e))?;
        let pages = batch.pfns.len() as u64;
        if batch.wanted {
            self.report.served += pages;
        } else {
            self.report.pushed += pages;
        }
        w.get_mut()
            .flush()
            .map_err(|e| MigrationError::io("send pages", e))
    }

    /// Redials until the destination takes a connection over (then it says what it lacks),
    /// or says the migration is over one way or the other. `None`: it has every page.
    fn reconnect<T: Transport>(
        &mut self,
        redial: &mut dyn Redial<T>,
    ) -> Result<Option<Channel<T>>, PostcopyFailure> {
        let mut wait = RETRY_FIRST;
        let mut last_error = String::new();
        loop {
            self.observer
                .keep_serving()
                .map_err(PostcopyFailure::Abandoned)?;
            self.report_phase("post-copy: link lost, reconnecting", 0);
            match redial.redial() {
                Redialed::Resumed(t) => match self.resume(self.prepare(Channel::new(t))) {
                    Ok(Some(ch)) => {
                        self.report.reconnects += 1;
                        log::info!("post-copy: reconnected to the destination");
                        return Ok(Some(ch));
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => log::warn!("post-copy: the resumed connection failed: {e}"),
                },
                Redialed::Complete => return Ok(None),
                Redialed::NeverRan => return Err(PostcopyFailure::NeverRan),
                Redialed::Lost(reason) => return Err(PostcopyFailure::Lost(reason)),
                Redialed::Retry(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        log::warn!("post-copy: cannot resume yet: {text}");
                        last_error = text;
                    }
                }
            }
            self.pause(wait).map_err(PostcopyFailure::Abandoned)?;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Waits `d`, still answering to the observer.
    fn pause(&mut self, d: Duration) -> Result<(), String> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.observer.keep_serving()?;
            std::thread::sleep(Duration::from_millis(50).min(d));
        }
        Ok(())
    }

    /// On a resumed connection: what the destination lacks (`Lacking` messages), which the
    /// push starts over with. `None` if it reports it has every page instead.
    fn resume<T: Transport>(
        &mut self,
        mut ch: Channel<T>,
    ) -> Result<Option<Channel<T>>, MigrationError> {
        let mut lacking = self.schedule.blank();
        let mut messages = 0u64;
        loop {
            match ch.receive::<ToSource>(STALL_TIMEOUT)? {
                ToSource::Lacking { runs, last } => {
                    messages += 1;
                    if messages > self.max_lacking_messages {
                        return Err(MigrationError::Protocol(
                            "the destination sent more Lacking messages than guest RAM needs"
                                .into(),
                        ));
                    }
                    add_runs(&mut lacking, &runs, u64::MAX)?;
                    if last {
                        break;
                    }
                }
                ToSource::Arrived(report) => {
                    self.report.arrived = Some(report);
                    return Ok(None);
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected Lacking on a resumed connection, got {}",
                        message_name(&other)
                    )))
                }
            }
        }
        log::info!(
            "post-copy: the destination lacks {} pages after the reconnection",
            lacking.count()
        );
        self.schedule.restart(lacking);
        Ok(Some(ch))
    }

    fn progress<T: Transport>(&mut self, ch: &Channel<T>) {
        let now = Instant::now();
        if self
            .last_progress
            .is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY)
        {
            return;
        }
        self.last_progress = Some(now);
        self.report_phase(
            "post-copy",
            self.report.bytes + ch.sent() - self.sent_before,
        );
    }

    fn report_phase(&mut self, phase: &str, bytes: u64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            bytes as f64 / elapsed
        } else {
            0.0
        };
        let left = self.schedule.remaining();
        self.observer.progress(&MigrationProgress {
            phase: phase.into(),
            round: 0,
            pages_left: left,
            bytes_sent: bytes,
            rate_bps: rate,
            eta_seconds: (rate > 0.0).then(|| (left * PAGE as u64) as f64 / rate),
            throttle_percent: 0,
            disk: None,
        });
    }
}

/// Whether a connection still makes progress: messages arrive, records go out, or what waits
/// to be sent shrinks.
struct Stall {
    last: Instant,
    in_flight: usize,
}

impl Stall {
    fn new() -> Self {
        Stall {
            last: Instant::now(),
            in_flight: 0,
        }
    }

    fn progress(&mut self) {
        self.last = Instant::now();
    }

    fn in_flight(&mut self, now: usize) {
        if now < self.in_flight {
            self.progress();
        }
        self.in_flight = now;
    }

    fn expired(&self) -> bool {
        self.last.elapsed() >= STALL_TIMEOUT
    }
}

/// A message's name for errors (not its contents: they may be long).
fn message_name(m: &ToSource) -> &'static str {
    match m {
        ToSource::Accept { .. } => "Accept",
        ToSource::Refuse { .. } => "Refuse",
        ToSource::Marked { .. } => "Marked",
        ToSource::Ready => "Ready",
        ToSource::Abort { .. } => "Abort",
        ToSource::Running { .. } => "Running",
        ToSource::Outcome { .. } => "Outcome",
        ToSource::Want { .. } => "Want",
        ToSource::Lacking { .. } => "Lacking",
        ToSource::Arrived(_) => "Arrived",
        ToSource::Evacuation { .. } => "Evacuation",
        ToSource::Evacuated { .. } => "Evacuated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_links_push_in_smaller_records() {
        assert_eq!(push_sizes(None), (PUSH_RECORD_PAGES, MAX_IN_FLIGHT));
        // 1 Gbit/s: 250 kB in 2 ms.
        assert_eq!(push_sizes(Some(125_000_000)), (61, 250_000));
        // 8 MB/s: 16 kB in 2 ms, but records of at least 8 pages.
        assert_eq!(
            push_sizes(Some(8_000_000)),
            (MIN_PUSH_PAGES, MIN_PUSH_PAGES * PAGE)
        );
        assert_eq!(push_sizes(Some(u64::MAX)).0, PUSH_RECORD_PAGES);
    }
}
