//! The sending side of a migration.
//!
//! Warm: pause the guest, send every page worth sending and the state, hand over.
//! Live: send every page while the guest runs (round 0), then rounds of the pages it dirtied
//! meanwhile, each ended by a MARK the destination acknowledges once it has applied the round
//! (so each round measures what the whole path sustains and nothing is left in buffers when
//! the guest pauses). [`crate::policy`] decides when to stop; then the guest is paused, the
//! last dirty pages and the state go out, and the handover follows.
//!
//! With `--copy-storage` the guest's disks go first (a bulk pass over their images), and each
//! round then also carries the disk blocks written meanwhile (see [`crate::disks`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tern_api::{DiskProgress, MigrationProgress, MigrationRound, MigrationSummary};
use tern_snapshot::{is_zero_page, PageRun, RecordType, SnapshotWriter, PAGE_SIZE};

use crate::disks::{DiskCopy, DiskTally, SourceDisk};
use crate::error::MigrationError;
use crate::memory::{guest_slice, push_page, PageSet, RamRegion};
use crate::policy::{Convergence, Decision, Limits, RoundMeasure, StopReason};
use crate::postcopy::{PostcopyFailure, PostcopyReport, PostcopySource, Redial, SwitchWatch};
use crate::protocol::{Offer, ToDestination, ToSource};
use crate::transport::{Channel, Transport};
use crate::{HANDOVER_TIMEOUT, OFFER_TIMEOUT, STALL_TIMEOUT};

const PAGE: usize = PAGE_SIZE;
/// Pages per PAGES record (1 MiB): progress, cancellation and the peer are looked at
/// between records.
const RECORD_PAGES: usize = 256;
/// Pages per checksum block in the stream.
const BLOCK_PAGES: u32 = 64;
/// Most runs per ZEROS record.
const ZERO_RUNS_PER_RECORD: usize = 1 << 16;
/// Least time between two progress reports.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The state captured from a paused machine: opaque record bodies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateRecords {
    pub machine: Vec<u8>,
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(String, Vec<u8>)>,
}

/// What the engine needs of the machine it migrates. Errors are messages for the user.
pub trait SourceVm {
    /// Guest RAM, region by region.
    fn regions(&self) -> Vec<RamRegion>;
    /// Page ranges that may hold data (the rest was never written and is zero).
    fn populated(&self) -> Result<Vec<std::ops::Range<u64>>, String>;
    fn is_paused(&self) -> bool;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Starts recording written pages (vCPUs and devices). Pages may start out dirty (KVM's
    /// manual protection with every page initially set), until re-armed.
    fn start_dirty_log(&self) -> Result<(), String>;
    fn stop_dirty_log(&self) -> Result<(), String>;
    /// Pages written since they were last re-armed (or since the log started), one bitmap
    /// per region. Reading may re-arm them (a plain KVM dirty log does).
    fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, String>;
    /// Re-arms the log for the pages `bits` of region `region` from its page `first_page` (a
    /// multiple of 64), just before the engine reads them: a later write shows in the next
    /// [`SourceVm::dirty_pages`]. Re-arming only the pages about to be sent spreads the
    /// write-protection faults the guest takes over the round.
    fn rearm(&self, region: usize, first_page: u64, bits: &[u64]) -> Result<(), String>;
    /// Slows the vCPUs to run `100 - percent` percent of the time.
    fn set_throttle(&self, percent: u8) -> Result<(), String>;
    /// The longest any vCPU was kept out of the guest by throttling since the last call.
    fn take_longest_throttle_hold(&self) -> Duration;
    /// Captures VM, vCPU and device state; the machine is paused.
    fn capture(&self) -> Result<StateRecords, String>;
    /// The disks to copy with the guest (`--copy-storage`), in the order of
    /// [`Offer::copy_disks`]; none by default.
    fn copied_disks(&self) -> Vec<Arc<dyn SourceDisk>> {
        Vec::new()
    }
}

/// Who watches a migration.
pub trait Observer {
    fn progress(&mut self, progress: &MigrationProgress);
    /// Asked between records and while waiting for the destination; an error cancels the
    /// migration (the guest stays here).
    fn keep_going(&mut self) -> Result<(), String>;
    /// Asked once, at the commit point, just before `Go`: an error cancels the migration as
    /// [`Observer::keep_going`] does; `Ok` hands the guest over, so from then on the observer
    /// must refuse to cancel. By default the same question as `keep_going`.
    fn commit(&mut self) -> Result<(), String> {
        self.keep_going()
    }
    /// Post-copy: `Go` went out; the guest is the destination's from now on, and this host
    /// serves it the pages it lacks.
    fn postcopy_started(&mut self) {}
    /// Asked while serving pages in post-copy (the daemon going away does not matter any
    /// more); an error stops serving: the guest is being destroyed here, or the user ran this
    /// copy instead.
    fn keep_serving(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// What to migrate, where, and how.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The guest's name, for the summary.
    pub domain: String,
    /// Where to, as the user said it, for the summary.
    pub destination: String,
    pub offer: Offer,
    pub live: bool,
    /// Post-copy (a live migration of a running guest only): a short pre-copy, then the
    /// guest runs on the destination while the rest of its pages follow.
    pub postcopy: bool,
    pub limits: Limits,
}

/// How a migration failed.
#[derive(Debug)]
pub enum SendError {
    /// The guest is as before the migration, here; the destination keeps nothing.
    Failed(MigrationError),
    /// The destination was told to run the guest but did not confirm it: the guest stays
    /// paused here until [`crate::protocol::Outcome`] is known.
    Unresolved(MigrationError),
    /// Post-copy: the destination ran the guest and its guest process ended before every page
    /// arrived. The guest's current state is gone; the paused copy here is its last whole
    /// state (from the handover).
    Lost(String),
    /// Post-copy: this host stopped serving pages (the guest was destroyed here, or the user
    /// ran this copy instead).
    Abandoned(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Failed(e) | SendError::Unresolved(e) => e.fmt(f),
            SendError::Lost(reason) | SendError::Abandoned(reason) => f.write_str(reason),
        }
    }
}

/// Offers the guest on `ch`; the destination's domain ID if it accepts.
pub fn offer<T: Transport>(ch: &mut Channel<T>, offer: &Offer) -> Result<u32, MigrationError> {
    ch.send(&ToDestination::Offer(Box::new(offer.clone())))?;
    accepted(ch.receive::<ToSource>(OFFER_TIMEOUT)?)
}

/// The destination's domain ID if `answer` to an offer accepts it.
pub fn accepted(answer: ToSource) -> Result<u32, MigrationError> {
    match answer {
        ToSource::Accept { domain_id } => Ok(domain_id),
        ToSource::Refuse { reason } => Err(MigrationError::Refused(reason)),
        other => Err(MigrationError::Protocol(format!(
            "expected Accept or Refuse, got {other:?}"
        ))),
    }
}

/// Migrates the guest of `vm` as `plan` says over `transport`, on which destination domain
/// `destination_id` accepted its [`offer`]. Not for post-copy (see [`send_postcopy`]).
pub fn send<T: Transport>(
    vm: &dyn SourceVm,
    transport: T,
    destination_id: u32,
    plan: &Plan,
    observer: &mut dyn Observer,
) -> Result<MigrationSummary, SendError> {
    sender(vm, plan, observer).run(transport, destination_id, None)
}

/// [`send`], for any plan, post-copy included: `redial` reaches the destination again if the
/// connection is lost during post-copy.
pub fn send_postcopy<T: Transport>(
    vm: &dyn SourceVm,
    transport: T,
    destination_id: u32,
    plan: &Plan,
    observer: &mut dyn Observer,
    redial: &mut dyn Redial<T>,
) -> Result<MigrationSummary, SendError> {
    sender(vm, plan, observer).run(transport, destination_id, Some(redial))
}

fn sender<'a>(vm: &'a dyn SourceVm, plan: &'a Plan, observer: &'a mut dyn Observer) -> Sender<'a> {
    Sender {
        vm,
        observer,
        plan,
        regions: vm.regions(),
        started: Instant::now(),
        rounds: Vec::new(),
        throttle: 0,
        max_throttle: 0,
        last_progress: None,
        buf: vec![0u8; RECORD_PAGES * PAGE],
        zero_buf: Vec::new(),
        missing: None,
        disks: DiskCopy::new(Vec::new()),
        disk_progress: None,
    }
}

/// Pages and bytes a round sent.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// A round's pages on their way out: the PAGES record being assembled and the tally.
#[derive(Default)]
struct Outgoing {
    round: u32,
    first_pass: bool,
    /// Pages of the round not yet copied.
    left: u64,
    tally: Tally,
    /// The runs of the record being assembled; their pages are the first `filled` pages of
    /// the sender's buffer.
    batch: Vec<PageRun>,
    filled: usize,
}

/// A first pass that post-copy cut short.
struct Cut {
    /// The pages of the pass left unsent.
    unsent: PageSet,
    /// Why, for the summary.
    reason: String,
}

/// When the guest paused and what the stop-and-copy cost, for the summary.
struct StopTimes {
    paused: Instant,
    paused_unix_ns: u64,
    last_pages: Duration,
    state: Duration,
    /// Why the pre-copy ended, for the summary.
    stop_reason: String,
}

/// When the handover's steps happened, for the downtime.
struct HandoverTimes {
    state_sent: Instant,
    ready: Instant,
    go_sent: Instant,
}

struct Sender<'a> {
    vm: &'a dyn SourceVm,
    observer: &'a mut dyn Observer,
    plan: &'a Plan,
    regions: Vec<RamRegion>,
    started: Instant,
    rounds: Vec<MigrationRound>,
    throttle: u8,
    max_throttle: u8,
    last_progress: Option<Instant>,
    /// Copies of the pages of the PAGES record being assembled: the guest may change its
    /// memory at any time, and a record's checksums must match what is sent.
    buf: Vec<u8>,
    zero_buf: Vec<PageRun>,
    /// Post-copy: the pages the destination lacks at the handover (sent as MISSING).
    missing: Option<PageSet>,
    /// The disks copied with the guest (none without `--copy-storage`).
    disks: DiskCopy,
    /// Disk bytes left in the current pass or round, and sent so far, for progress.
    disk_progress: Option<(u64, u64)>,
}

impl Sender<'_> {
    fn run<T: Transport>(
        &mut self,
        transport: T,
        destination_id: u32,
        redial: Option<&mut dyn Redial<T>>,
    ) -> Result<MigrationSummary, SendError> {
        if self.plan.postcopy && redial.is_none() {
            return Err(SendError::Failed(MigrationError::Vm(
                "post-copy needs a way to reach the destination again".into(),
            )));
        }
        if let Err(e) = self.take_disks() {
            return Err(SendError::Failed(e));
        }
        let mut ch = Channel::new(transport);
        if let Some(rate) = self.plan.limits.rate_limit {
            ch.limit_rate(rate);
        }
        ch.transport()
            .set_write_timeout(Some(STALL_TIMEOUT))
            .map_err(|e| SendError::Failed(MigrationError::io("set a timeout", e)))?;
        let was_running = !self.vm.is_paused();
        let live = self.plan.live && was_running;
        let mut w = SnapshotWriter::new(ch, false)
            .map_err(|e| SendError::Failed(MigrationError::io("send the stream header", e)))?;
        let stop = match self.transfer(&mut w, live, was_running) {
            Ok(stop) => stop,
            Err(e) => {
                self.undo(live, was_running);
                return Err(SendError::Failed(e));
            }
        };
        let mut ch = match w.finish() {
            Ok(ch) => ch,
            Err(e) => {
                self.undo(live, was_running);
                return Err(SendError::Failed(MigrationError::io(
                    "send the END record",
                    e,
                )));
            }
        };
        let state_sent = Instant::now();
        if let Err(e) = self.await_ready(&mut ch) {
            self.undo(live, was_running);
            return Err(SendError::Failed(e));
        }
        let ready = Instant::now();
        // The commit point: past it the guest is the destination's.
        if let Err(reason) = self.observer.commit() {
            self.undo(live, was_running);
            return Err(SendError::Failed(MigrationError::Cancelled(reason)));
        }
        self.report("handover", 0, 0, &ch);
        let before_go = ch.sent();
        let go = ToDestination::Go {
            resume: was_running,
        };
        let sent = ch.send(&go);
        let times = HandoverTimes {
            state_sent,
            ready,
            go_sent: Instant::now(),
        };
        let postcopy = match (self.missing.take(), redial) {
            (Some(missing), Some(redial)) => Some((missing, redial)),
            _ => None,
        };
        if let Err(e) = sent {
            if ch.sent() == before_go {
                // Not one byte of Go left this host: the destination cannot run the guest.
                self.undo(live, was_running);
                return Err(SendError::Failed(e));
            }
            if let Some((missing, redial)) = postcopy {
                // Go may have arrived: the source must be there to serve the pages.
                return self.postcopy(None, missing, &stop, &times, destination_id, redial);
            }
            return Err(SendError::Unresolved(e));
        }
        if let Some((missing, redial)) = postcopy {
            return self.postcopy(Some(ch), missing, &stop, &times, destination_id, redial);
        }
        let go_sent = times.go_sent;
        let running = ch.receive::<ToSource>(HANDOVER_TIMEOUT);
        let confirmed = Instant::now();
        match running {
            Ok(ToSource::Running {
                resume_us,
                reply_us,
                resumed_unix_ns,
            }) => {
                let resume = Duration::from_micros(resume_us);
                let one_way = confirmed
                    .duration_since(go_sent)
                    .saturating_sub(Duration::from_micros(reply_us))
                    / 2;
                let downtime = go_sent.duration_since(stop.paused) + one_way + resume;
                let parts = tern_api::DowntimeParts {
                    last_pages_ms: ms(stop.last_pages),
                    state_ms: ms(stop.state),
                    load_ms: ms(ready.duration_since(state_sent)),
                    handover_ms: ms(go_sent.duration_since(ready) + one_way + resume),
                };
                Ok(self.summary_of(
                    ch.sent(),
                    destination_id,
                    live,
                    &stop,
                    downtime,
                    parts,
                    resumed_unix_ns,
                ))
            }
            Ok(other) => Err(SendError::Unresolved(MigrationError::Protocol(format!(
                "expected Running after Go, got {other:?}"
            )))),
            Err(e) => Err(SendError::Unresolved(e)),
        }
    }

    /// Sends everything up to END (not included): the pages in rounds, then the state.
    fn transfer<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        live: bool,
        was_running: bool,
    ) -> Result<StopTimes, MigrationError> {
        let offer = &self.plan.offer;
        w.info(&offer.info)
            .map_err(|e| MigrationError::io("send the INFO record", e))?;
        let config = serde_json::to_vec(&offer.config)
            .map_err(|e| MigrationError::Vm(format!("cannot encode the guest config: {e}")))?;
        w.record(RecordType::CONFIG, &config)
            .map_err(|e| MigrationError::io("send the CONFIG record", e))?;
        let mut stop = if live {
            self.precopy(w)?
        } else {
            let paused = self.pause(was_running)?;
            if !self.disks.is_empty() {
                self.disk_bulk(w)?;
            }
            // Only now: a page the guest touched first before the pause must be in the set.
            let first = self.populated()?;
            let t = Instant::now();
            let tally = self.send_pages(w, &first, 0, true)?;
            self.record_round(0, tally, t.elapsed(), true);
            StopTimes {
                last_pages: t.elapsed(),
                ..paused
            }
        };
        let t = Instant::now();
        let state = self.vm.capture().map_err(vm_err)?;
        self.send_state(w, &state)?;
        stop.state = t.elapsed();
        Ok(stop)
    }

    /// The disks the plan copies, from the machine: as many as the offer names, or none.
    fn take_disks(&mut self) -> Result<(), MigrationError> {
        let disks = self.vm.copied_disks();
        let offered = &self.plan.offer.copy_disks;
        if disks.len() != offered.len() {
            return Err(MigrationError::Vm(format!(
                "the offer copies {} disks, the machine has {} to copy",
                offered.len(),
                disks.len()
            )));
        }
        if !disks.is_empty() && self.plan.postcopy {
            return Err(MigrationError::Vm(
                "post-copy cannot copy disks yet: migrate with --copy-storage but without --postcopy"
                    .into(),
            ));
        }
        self.disks = DiskCopy::new(disks);
        Ok(())
    }

    /// The disks' bulk pass.
    fn disk_bulk<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
    ) -> Result<DiskTally, MigrationError> {
        let mut disks = std::mem::replace(&mut self.disks, DiskCopy::new(Vec::new()));
        let result = disks.send_bulk(w, &mut |w, left, sent| {
            self.disk_progress = Some((left, sent));
            self.between_records(w, 0, 0)
        });
        self.disks = disks;
        result
    }

    /// A round of the disk blocks written since the last one (taken already).
    fn disk_round<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        round: u32,
    ) -> Result<DiskTally, MigrationError> {
        if self.disks.is_empty() {
            return Ok(DiskTally::default());
        }
        let mut disks = std::mem::replace(&mut self.disks, DiskCopy::new(Vec::new()));
        let result = disks.send_round(w, &mut |w, left, sent| {
            self.disk_progress = Some((left, sent));
            self.between_records(w, round, 0)
        });
        self.disk_progress = Some((0, disks.sent()));
        self.disks = disks;
        result
    }

    /// Pauses the guest (if it runs) and notes when.
    fn pause(&mut self, was_running: bool) -> Result<StopTimes, MigrationError> {
        let paused = Instant::now();
        let paused_unix_ns = unix_ns();
        if was_running {
            self.vm.pause().map_err(vm_err)?;
        }
        Ok(StopTimes {
            paused,
            paused_unix_ns,
            last_pages: Duration::ZERO,
            state: Duration::ZERO,
            stop_reason: StopReason::Warm.describe().to_string(),
        })
    }

    /// Rounds while the guest runs, then the pause and the last dirty pages.
    fn precopy<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
    ) -> Result<StopTimes, MigrationError> {
        // The log first, then the pages in use: a page first written in between is then in
        // both, never in neither. Pages never touched are re-armed at once (they have no
        // mappings to protect, so it costs nothing); the pages in use are re-armed chunk by
        // chunk as the first pass sends them. Any page touched after the first look is
        // either re-armed after its write (so in the second look) or dirty again.
        // The disks' bulk pass comes first: memory dirtied meanwhile would be sent again.
        if !self.disks.is_empty() {
            self.disks.start();
            self.disk_bulk(w)?;
            self.disks.take_written();
        }
        self.vm.start_dirty_log().map_err(vm_err)?;
        self.vm.take_longest_throttle_hold();
        let untouched = self.populated()?.complement();
        for (region, bits) in untouched.bitmaps() {
            self.vm.rearm(region, 0, bits).map_err(vm_err)?;
        }
        let first = self.populated()?;
        // The disks count as memory here: a pass over both, three times both sent at most.
        let memory_bytes = self.plan.offer.info.memory_bytes + self.disks.allocated();
        let mut convergence = Convergence::new(self.plan.limits.clone(), memory_bytes);
        // Post-copy's pre-copy is never throttled and ends early (see `postcopy::switch`).
        let mut watch = self.plan.postcopy.then(|| SwitchWatch::new(&first));
        let mut set = first;
        let mut round = 0u32;
        let reason = loop {
            let started = Instant::now();
            let first_pass = round == 0;
            let (tally, cut) = if first_pass {
                self.send_pages_watched(w, &set, round, true, watch.as_mut())?
            } else {
                (self.send_pages(w, &set, round, false)?, None)
            };
            let disk = self.disk_round(w, round)?;
            self.end_round(w, round)?;
            let took = started.elapsed();
            self.record_round(round, tally, took, false);
            set = self.take_dirty()?;
            // Disk blocks count as pages: the policy weighs what is left of both.
            let disk_left = self.disks.take_written().div_ceil(PAGE as u64);
            if let Some(watch) = watch.as_mut() {
                set.union_with(&watch.take_written_again());
            }
            if let Some(cut) = cut {
                set.union_with(&cut.unsent);
                break format!(
                    "switched to post-copy during the first pass: {}",
                    cut.reason
                );
            }
            let pages = tally.pages + tally.zero_pages + disk.pages();
            let measure = RoundMeasure {
                pages,
                bytes: tally.bytes + disk.bytes,
                seconds: took.as_secs_f64(),
            };
            let left = set.count() + disk_left;
            let decision = convergence.after_round(measure, left, w.get_ref().sent());
            if let Some(watch) = watch.as_mut() {
                if let Some(why) = watch.after_round(round, pages, set.count(), decision) {
                    break format!("switched to post-copy after round {round}: {why}");
                }
            } else {
                match decision {
                    Decision::Stop(reason) => break reason.describe().to_string(),
                    Decision::Continue { throttle } => self.set_throttle(throttle)?,
                }
            }
            round += 1;
        };
        self.disks.unthrottle();
        let mut stop = self.pause(true)?;
        stop.stop_reason = reason;
        let t = Instant::now();
        set.union_with(&self.take_dirty()?);
        // The dirty log and the throttle stay as they are while the guest is paused: ending
        // them costs downtime, and only matters if the guest runs here again (`undo`).
        if self.plan.postcopy {
            self.send_missing(w, &set)?;
            stop.last_pages = t.elapsed();
            self.missing = Some(set);
            return Ok(stop);
        }
        let tally = self.send_pages(w, &set, round + 1, false)?;
        self.disks.take_written();
        self.disk_round(w, round + 1)?;
        stop.last_pages = t.elapsed();
        self.record_round(round + 1, tally, stop.last_pages, true);
        Ok(stop)
    }

    /// Post-copy: names the pages the destination lacks (MISSING records) instead of sending
    /// them.
    fn send_missing<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        set: &PageSet,
    ) -> Result<(), MigrationError> {
        let runs = set.runs();
        for chunk in runs.chunks(ZERO_RUNS_PER_RECORD) {
            w.missing(chunk)
                .map_err(|e| MigrationError::io("send the missing pages", e))?;
        }
        Ok(())
    }

    /// After `Go` in a post-copy migration: the guest is the destination's; serve it the
    /// pages it lacks until it has every one.
    fn postcopy<T: Transport>(
        &mut self,
        link: Option<Channel<T>>,
        missing: PageSet,
        stop: &StopTimes,
        times: &HandoverTimes,
        destination_id: u32,
        redial: &mut dyn Redial<T>,
    ) -> Result<MigrationSummary, SendError> {
        self.observer.postcopy_started();
        let handover_bytes = link.as_ref().map_or(0, |ch| ch.sent());
        let Some(mut ch) = link else {
            log::warn!("post-copy: Go may not have arrived; reconnecting to find out");
            return self.serve_postcopy(
                None,
                None,
                missing,
                stop,
                times,
                destination_id,
                redial,
                0,
            );
        };
        let running = ch.receive::<ToSource>(HANDOVER_TIMEOUT);
        let confirmed = Instant::now();
        let (link, resumed) = match running {
            Ok(ToSource::Running {
                resume_us,
                reply_us,
                resumed_unix_ns,
            }) => {
                let one_way = confirmed
                    .duration_since(times.go_sent)
                    .saturating_sub(Duration::from_micros(reply_us))
                    / 2;
                let resume = one_way + Duration::from_micros(resume_us);
                (Some(ch), Some((resume, resumed_unix_ns)))
            }
            Ok(other) => {
                log::warn!("post-copy: expected Running after Go, got {other:?}; reconnecting");
                (None, None)
            }
            Err(e) => {
                log::warn!("post-copy: the handover was not confirmed ({e}); reconnecting");
                (None, None)
            }
        };
        self.serve_postcopy(
            link,
            resumed,
            missing,
            stop,
            times,
            destination_id,
            redial,
            handover_bytes,
        )
    }

    /// Serves the post-copy phase, over `link` if the handover's connection still stands;
    /// `resumed`: how long the resume took there (one way included), and when it was.
    #[allow(clippy::too_many_arguments)]
    fn serve_postcopy<T: Transport>(
        &mut self,
        link: Option<Channel<T>>,
        resumed: Option<(Duration, u64)>,
        missing: PageSet,
        stop: &StopTimes,
        times: &HandoverTimes,
        destination_id: u32,
        redial: &mut dyn Redial<T>,
        handover_bytes: u64,
    ) -> Result<MigrationSummary, SendError> {
        let pages = missing.count();
        log::info!("post-copy: the guest runs on the destination; {pages} pages to go");
        let limit = self.plan.limits.rate_limit;
        let source = PostcopySource::new(self.regions.clone(), missing, limit, &mut *self.observer);
        let report = match source.run(link, redial) {
            Ok(report) => report,
            Err(PostcopyFailure::NeverRan) => {
                self.undo(true, true);
                return Err(SendError::Failed(MigrationError::PeerAborted {
                    side: "destination",
                    reason: "it never ran the guest (Go did not arrive)".into(),
                }));
            }
            Err(PostcopyFailure::Lost(reason)) => return Err(SendError::Lost(reason)),
            Err(PostcopyFailure::Abandoned(reason)) => return Err(SendError::Abandoned(reason)),
        };
        let (resume, resumed_unix_ns) = resumed.unwrap_or((Duration::ZERO, 0));
        let parts = tern_api::DowntimeParts {
            last_pages_ms: ms(stop.last_pages),
            state_ms: ms(stop.state),
            load_ms: ms(times.ready.duration_since(times.state_sent)),
            handover_ms: ms(times.go_sent.duration_since(times.ready) + resume),
        };
        let downtime = times.go_sent.duration_since(stop.paused) + resume;
        let mut summary = self.summary_of(
            handover_bytes + report.bytes,
            destination_id,
            true,
            stop,
            downtime,
            parts,
            resumed_unix_ns,
        );
        let postcopy = postcopy_summary(&report);
        summary.longest_vcpu_stall_ms = summary
            .longest_vcpu_stall_ms
            .max(postcopy.longest_fault_wait_ms);
        summary.postcopy = Some(postcopy);
        Ok(summary)
    }

    /// The pages the guest has in use (the first pass sends these).
    fn populated(&self) -> Result<PageSet, MigrationError> {
        let ranges = self.vm.populated().map_err(vm_err)?;
        Ok(PageSet::from_ranges(&self.regions, &ranges))
    }

    fn take_dirty(&self) -> Result<PageSet, MigrationError> {
        let bits = self.vm.dirty_pages().map_err(vm_err)?;
        PageSet::from_bitmaps(&self.regions, bits)
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), MigrationError> {
        if percent != self.throttle {
            log::info!("auto-converge: vCPUs throttled to {percent}%");
            self.vm.set_throttle(percent).map_err(vm_err)?;
            self.disks.throttle(percent);
            self.throttle = percent;
            self.max_throttle = self.max_throttle.max(percent);
        }
        Ok(())
    }

    fn record_round(&mut self, round: u32, tally: Tally, took: Duration, stop_and_copy: bool) {
        self.rounds.push(MigrationRound {
            round,
            pages: tally.pages,
            zero_pages: tally.zero_pages,
            bytes: tally.bytes,
            seconds: took.as_secs_f64(),
            throttle_percent: self.throttle,
            stop_and_copy,
        });
    }

    /// Sends the pages of `set`: PAGES records for pages with data; zero pages are left out
    /// in the first pass (the destination's memory starts zeroed) and sent as ZEROS runs
    /// later (they were written since).
    fn send_pages<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        set: &PageSet,
        round: u32,
        first_pass: bool,
    ) -> Result<Tally, MigrationError> {
        self.send_pages_watched(w, set, round, first_pass, None)
            .map(|(tally, _)| tally)
    }

    /// [`Sender::send_pages`], cut short when `watch` (post-copy's first pass) says to
    /// switch: then also the pages of `set` left unsent.
    fn send_pages_watched<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        set: &PageSet,
        round: u32,
        first_pass: bool,
        mut watch: Option<&mut SwitchWatch>,
    ) -> Result<(Tally, Option<Cut>), MigrationError> {
        let start_bytes = w.get_ref().sent();
        let mut out = Outgoing {
            round,
            first_pass,
            left: set.count(),
            ..Outgoing::default()
        };
        self.zero_buf.clear();
        // The regions hold the mappings; a clone (of their `Arc`s) leaves `self` free to flush.
        let regions = self.regions.clone();
        // A paused guest writes nothing: its pages need no re-arming.
        let rearm = !self.vm.is_paused();
        let mut cut: Option<Cut> = None;
        for chunk in set.chunks(RECORD_PAGES / 64) {
            if let Some(cut) = cut.as_mut() {
                cut.unsent.insert_chunk(&chunk);
                continue;
            }
            if let Some(watch) = watch.as_deref_mut() {
                if watch.look_due() {
                    let dirty = self.take_dirty()?;
                    if let Some(reason) = watch.look(&dirty, &chunk) {
                        let mut unsent = set.cleared();
                        unsent.insert_chunk(&chunk);
                        cut = Some(Cut { unsent, reason });
                        continue;
                    }
                }
                watch.sending(&chunk);
            }
            if rearm {
                self.vm
                    .rearm(chunk.region, chunk.first_page, chunk.bits)
                    .map_err(vm_err)?;
            }
            for run in chunk.runs() {
                self.send_run(w, &regions, run, &mut out)?;
            }
        }
        self.flush_pages(w, &mut out)?;
        for chunk in self.zero_buf.chunks(ZERO_RUNS_PER_RECORD) {
            w.zeros(chunk)
                .map_err(|e| MigrationError::io("send zero pages", e))?;
        }
        out.tally.bytes = w.get_ref().sent() - start_bytes;
        Ok((out.tally, cut))
    }

    /// Copies the pages of `run` into the PAGES record being assembled (data) or the zero
    /// runs (zeros), sending each record once it is full.
    fn send_run<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        regions: &[RamRegion],
        run: PageRun,
        out: &mut Outgoing,
    ) -> Result<(), MigrationError> {
        let pages = guest_slice(regions, run.first_pfn, u64::from(run.pages))
            .ok_or_else(|| MigrationError::Vm("a page to send is outside guest RAM".into()))?;
        for i in 0..u64::from(run.pages) {
            let pfn = run.first_pfn + i;
            let dst = &mut self.buf[out.filled * PAGE..(out.filled + 1) * PAGE];
            // The one copy of a page on its way out (the record's checksums must match what
            // is sent). The guest may write the page meanwhile: the copy is then stale and
            // the page dirty again, sent in a later round.
            let page = pages
                .subslice(i as usize * PAGE, PAGE)
                .map_err(|e| MigrationError::Vm(format!("a page to send: {e}")))?;
            page.copy_to(dst);
            if is_zero_page(dst) {
                out.tally.zero_pages += 1;
                if !out.first_pass {
                    push_page(&mut self.zero_buf, pfn);
                }
            } else {
                push_page(&mut out.batch, pfn);
                out.filled += 1;
                out.tally.pages += 1;
            }
            out.left -= 1;
            if out.filled == RECORD_PAGES {
                self.flush_pages(w, out)?;
                self.between_records(w, out.round, out.left)?;
            }
        }
        Ok(())
    }

    /// Sends the assembled PAGES record, if any.
    fn flush_pages<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        out: &mut Outgoing,
    ) -> Result<(), MigrationError> {
        if out.batch.is_empty() {
            return Ok(());
        }
        let mut slices = Vec::with_capacity(out.batch.len());
        let mut off = 0usize;
        for run in out.batch.iter() {
            let len = run.pages as usize * PAGE;
            slices.push(&self.buf[off..off + len]);
            off += len;
        }
        w.pages(&out.batch, &slices, BLOCK_PAGES)
            .map_err(|e| MigrationError::io("send pages", e))?;
        out.batch.clear();
        out.filled = 0;
        Ok(())
    }

    /// Between two records: report progress, let the observer cancel, and look for an
    /// early word from the destination (it only speaks out of turn to give up).
    fn between_records<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        round: u32,
        left: u64,
    ) -> Result<(), MigrationError> {
        let phase = if self.vm.is_paused() {
            "stop-and-copy"
        } else {
            "pre-copy"
        };
        self.report(phase, round, left, w.get_ref());
        self.observer
            .keep_going()
            .map_err(MigrationError::Cancelled)?;
        let ch = w.get_mut();
        if ch.input_waiting() {
            return Err(match ch.receive::<ToSource>(Duration::from_secs(5))? {
                ToSource::Abort { reason } => MigrationError::PeerAborted {
                    side: "destination",
                    reason,
                },
                other => {
                    MigrationError::Protocol(format!("unexpected {other:?} during the stream"))
                }
            });
        }
        Ok(())
    }

    /// Ends a pre-copy round: a MARK, and the destination's acknowledgement that it applied
    /// everything up to it.
    fn end_round<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        round: u32,
    ) -> Result<(), MigrationError> {
        w.mark(u64::from(round))
            .map_err(|e| MigrationError::io("send a round mark", e))?;
        let ch = w.get_mut();
        let observer = &mut self.observer;
        loop {
            // The destination may take a while to apply the round: a cancel is noticed meanwhile.
            let answer = ch.receive_unless(STALL_TIMEOUT, || {
                observer.keep_going().map_err(MigrationError::Cancelled)
            });
            match answer? {
                ToSource::Marked { seq } if seq == u64::from(round) => return Ok(()),
                ToSource::Marked { .. } => {}
                ToSource::Abort { reason } => {
                    return Err(MigrationError::PeerAborted {
                        side: "destination",
                        reason,
                    })
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected Marked, got {other:?}"
                    )))
                }
            }
        }
    }

    fn send_state<T: Transport>(
        &mut self,
        w: &mut SnapshotWriter<Channel<T>>,
        state: &StateRecords,
    ) -> Result<(), MigrationError> {
        let io = |e| MigrationError::io("send the machine state", e);
        w.record(RecordType::MACHINE, &state.machine).map_err(io)?;
        for v in &state.vcpus {
            w.record(RecordType::VCPU, v).map_err(io)?;
        }
        for (id, bytes) in &state.devices {
            w.device(id, bytes).map_err(io)?;
        }
        Ok(())
    }

    fn await_ready<T: Transport>(&mut self, ch: &mut Channel<T>) -> Result<(), MigrationError> {
        let observer = &mut self.observer;
        let answer = ch.receive_unless(HANDOVER_TIMEOUT, || {
            observer.keep_going().map_err(MigrationError::Cancelled)
        });
        match answer? {
            ToSource::Ready => Ok(()),
            ToSource::Abort { reason } => Err(MigrationError::PeerAborted {
                side: "destination",
                reason,
            }),
            other => Err(MigrationError::Protocol(format!(
                "expected Ready, got {other:?}"
            ))),
        }
    }

    /// Puts the guest back as it was: full speed, no dirty log, running if it ran.
    fn undo(&mut self, live: bool, was_running: bool) {
        self.disks.unthrottle();
        self.disks.stop();
        if let Err(e) = self.vm.set_throttle(0) {
            log::error!("cannot end throttling: {e}");
        }
        if live {
            if let Err(e) = self.vm.stop_dirty_log() {
                log::error!("cannot stop the dirty log: {e}");
            }
        }
        if was_running && self.vm.is_paused() {
            if let Err(e) = self.vm.resume() {
                log::error!("cannot resume the guest after the failed migration: {e}");
            }
        }
    }

    fn report<T: Transport>(&mut self, phase: &str, round: u32, left: u64, ch: &Channel<T>) {
        let now = Instant::now();
        if self
            .last_progress
            .is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY)
            && phase != "handover"
        {
            return;
        }
        self.last_progress = Some(now);
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let rate = if elapsed > 0.0 {
            ch.sent() as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0).then(|| (left * PAGE as u64) as f64 / rate);
        // Disk and memory share the link: each part's ETA is at the whole rate.
        let disk = self.disk_progress.map(|(left, sent)| DiskProgress {
            bytes_left: left,
            bytes_sent: sent,
            rate_bps: rate,
            eta_seconds: (rate > 0.0).then(|| left as f64 / rate),
        });
        self.observer.progress(&MigrationProgress {
            phase: phase.into(),
            round,
            pages_left: left,
            bytes_sent: ch.sent(),
            rate_bps: rate,
            eta_seconds: eta,
            throttle_percent: self.throttle,
            disk,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn summary_of(
        &self,
        bytes_sent: u64,
        destination_id: u32,
        live: bool,
        stop: &StopTimes,
        downtime: Duration,
        parts: tern_api::DowntimeParts,
        resumed_unix_ns: u64,
    ) -> MigrationSummary {
        let total = self.started.elapsed().as_secs_f64();
        MigrationSummary {
            domain: self.plan.domain.clone(),
            destination: self.plan.destination.clone(),
            destination_id,
            live,
            total_seconds: total,
            downtime_ms: ms(downtime),
            downtime_parts: parts,
            rounds: self.rounds.clone(),
            bytes_sent,
            mean_rate_mbit: if total > 0.0 {
                bytes_sent as f64 * 8.0 / total / 1e6
            } else {
                0.0
            },
            max_throttle_percent: self.max_throttle,
            longest_vcpu_stall_ms: ms(downtime.max(self.vm.take_longest_throttle_hold())),
            resource_mbit: self.plan.limits.rate_limit.map(|r| r * 8 / 1_000_000),
            stop_reason: stop.stop_reason.clone(),
            paused_unix_ns: stop.paused_unix_ns,
            resumed_unix_ns,
            insecure: false,
            postcopy: None,
            disks: (!self.disks.is_empty()).then(|| self.disks.summary()),
        }
    }
}

/// The summary's post-copy part: the destination's counts if it could report them, else the
/// source's.
fn postcopy_summary(r: &PostcopyReport) -> tern_api::PostcopySummary {
    let mut s = tern_api::PostcopySummary {
        pages_missing: r.missing_at_handover,
        pages_fetched: r.served,
        pages_pushed: r.pushed,
        reconnects: r.reconnects,
        seconds_until_complete: r.seconds,
        ..Default::default()
    };
    if let Some(a) = &r.arrived {
        s.pages_fetched = a.fetched;
        s.pages_pushed = a.pushed;
        s.faults = a.faults;
        s.seconds_until_complete = a.complete_after_us as f64 / 1e6;
        s.longest_fault_wait_ms = a.longest_wait_us as f64 / 1e3;
    }
    s
}

fn vm_err(message: String) -> MigrationError {
    MigrationError::Vm(message)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Now, in nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
