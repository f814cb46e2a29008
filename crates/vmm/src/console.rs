//! The guest's console inside its process: the UART's output goes to the console log and to
//! every attached console stream; console input goes to the UART.

use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tern_api::console::Frame;
use tern_devices::serial::ConsoleOut;

use crate::console_log::ConsoleLogWriter;

/// Frames an attached console may fall behind by before it is dropped (the guest never waits
/// for a slow console client).
const SUBSCRIBER_BACKLOG: usize = 16 * 1024;

struct Inner {
    log: Option<ConsoleLogWriter>,
    line_time_us: u64,
    subscribers: Vec<SyncSender<Frame>>,
}

/// Fans guest output out to the log and to attached consoles.
pub struct ConsoleHub {
    inner: Mutex<Inner>,
}

/// Host wall-clock time in Unix microseconds.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl ConsoleHub {
    /// A hub logging into `dir`.
    pub fn open(dir: &Path) -> io::Result<Arc<Self>> {
        Ok(Arc::new(ConsoleHub {
            inner: Mutex::new(Inner {
                log: Some(ConsoleLogWriter::open(dir)?),
                line_time_us: 0,
                subscribers: Vec::new(),
            }),
        }))
    }

    /// The sink to give the UART.
    pub fn output(self: &Arc<Self>) -> ConsoleOut {
        Box::new(HubWriter(self.clone()))
    }

    /// A new console stream, starting with the next byte the guest writes.
    pub fn subscribe(&self) -> Receiver<Frame> {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_BACKLOG);
        self.lock().subscribers.push(tx);
        rx
    }

    /// Ends every console stream (the guest is leaving this process).
    pub fn close(&self) {
        self.lock().subscribers.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let now = now_us();
        let mut inner = self.lock();
        let pieces: Vec<(bool, Vec<u8>)> = match inner.log.as_mut().map(|l| l.append(bytes, now)) {
            Some(Ok(pieces)) => pieces.into_iter().map(|(s, p)| (s, p.to_vec())).collect(),
            Some(Err(e)) => {
                log::warn!("console log disabled: {e}");
                inner.log = None;
                vec![(false, bytes.to_vec())]
            }
            None => vec![(false, bytes.to_vec())],
        };
        for (starts_line, data) in pieces {
            if starts_line {
                inner.line_time_us = now;
            }
            let frame = Frame {
                line_time_us: inner.line_time_us,
                starts_line,
                data,
            };
            inner
                .subscribers
                .retain(|s| match s.try_send(frame.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
                });
        }
    }
}

struct HubWriter(Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Merges consecutive frames of the same line (the UART hands over one byte at a time).
pub fn coalesce(first: Frame, more: &Receiver<Frame>) -> Vec<Frame> {
    let mut out = vec![first];
    while let Ok(next) = more.try_recv() {
        match out.last_mut() {
            Some(last)
                if !next.starts_line
                    && last.data.len() + next.data.len() <= tern_api::console::MAX_FRAME =>
            {
                last.data.extend_from_slice(&next.data);
            }
            _ => out.push(next),
        }
        if out.len() >= 256 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_frames_with_line_times() {
        let dir = tempfile::tempdir().unwrap();
        let hub = ConsoleHub::open(dir.path()).unwrap();
        let rx = hub.subscribe();
        let mut out = hub.output();
        out.write_all(b"a").unwrap();
        out.write_all(b"b\nc").unwrap();
        let first = rx.recv().unwrap();
        let frames = coalesce(first, &rx);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].data, b"ab\n");
        assert!(frames[0].starts_line);
        assert_eq!(frames[1].data, b"c");
        assert!(frames[1].starts_line);
        hub.close();
        assert!(rx.recv().is_err());
    }
}
