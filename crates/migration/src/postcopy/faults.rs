//! The destination's page faults, read as they happen by a thread of their own: each is
//! stamped when read (so a fault's wait counts from then, even while the fault loop reads a
//! record or waits for the source to come back); a fault on a page that will never come from
//! the source (it was never written) gets a zero page at once; the others are queued for the
//! fault loop, which the thread wakes through a socket it polls with the connection.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::PageSet;
use crate::postcopy::PostcopyTarget;
use crate::transport::poll_readable;

/// How long the thread waits for a fault before it looks whether to stop.
const TURN: Duration = Duration::from_millis(50);

/// What the fault thread reports.
pub(crate) enum FaultEvent {
    /// A fault waits for page `pfn`, still to come from the source, since `since`.
    Missing { pfn: u64, since: Instant },
    /// The faults cannot be served any more.
    Failed(String),
}

/// The fault loop's end: the queued faults, and the descriptor that polls readable when
/// there are new ones.
pub(crate) struct FaultQueue {
    events: Receiver<FaultEvent>,
    wake: UnixStream,
}

impl FaultQueue {
    /// The descriptor to poll (with the connection).
    pub(crate) fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Every event queued so far; never blocks.
    pub(crate) fn drain(&mut self) -> Vec<FaultEvent> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        let mut events = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(e) => events.push(e),
                Err(TryRecvError::Empty) => return events,
                Err(TryRecvError::Disconnected) => {
                    events.push(FaultEvent::Failed("the fault reader ended".into()));
                    return events;
                }
            }
        }
    }
}

/// The thread's side.
pub(crate) struct FaultReader<'a> {
    target: &'a (dyn PostcopyTarget + Sync),
    missing: Arc<Mutex<PageSet>>,
    events: Sender<FaultEvent>,
    wake: UnixStream,
    stop: &'a AtomicBool,
}

/// A reader of `target`'s faults against the pages still `missing`, until `stop`, and the
/// queue it fills.
pub(crate) fn pair<'a>(
    target: &'a (dyn PostcopyTarget + Sync),
    missing: Arc<Mutex<PageSet>>,
    stop: &'a AtomicBool,
) -> std::io::Result<(FaultReader<'a>, FaultQueue)> {
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let (events_tx, events) = mpsc::channel();
    Ok((
        FaultReader {
            target,
            missing,
            events: events_tx,
            wake: wake_tx,
            stop,
        },
        FaultQueue {
            events,
            wake: wake_rx,
        },
    ))
}

impl FaultReader<'_> {
    /// Reads faults until told to stop, or until they cannot be served.
    pub(crate) fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = poll_readable(&[self.target.fault_fd()], TURN) {
                self.fail(format!("cannot wait for page faults: {e}"));
                return;
            }
            match self.take_faults() {
                Ok(true) => {
                    // The queue holds the faults; a full wake socket already wakes the loop.
                    let _ = (&self.wake).write(&[1]);
                }
                Ok(false) => {}
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Serves or queues every waiting fault; whether any was queued.
    fn take_faults(&mut self) -> Result<bool, String> {
        let mut queued = false;
        while let Some(pfn) = self
            .target
            .next_fault()
            .map_err(|e| format!("cannot read a page fault: {e}"))?
        {
            let since = Instant::now();
            let missing = self
                .missing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(pfn);
            if missing {
                if self
                    .events
                    .send(FaultEvent::Missing { pfn, since })
                    .is_err()
                {
                    return Ok(queued);
                }
                queued = true;
            } else {
                // Never written (a hole), or installed meanwhile (then this only wakes).
                self.target
                    .install_zeros(pfn, 1)
                    .map_err(|e| format!("cannot serve a fault on page {pfn:#x}: {e}"))?;
            }
        }
        Ok(queued)
    }

    fn fail(&mut self, message: String) {
        let _ = self.events.send(FaultEvent::Failed(message));
        let _ = (&self.wake).write(&[1]);
    }
}
