//! A minimal QMP client (QEMU's JSON monitor protocol over a Unix socket): enough to stop a
//! guest, migrate it to a file and watch the migration, keeping the events QEMU sends with
//! their own host timestamps.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Longest wait for one reply: a migration command returns at once, the waiting is done by
/// polling `query-migrate`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying while QEMU starts, up to `timeout`)
    /// and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let stream = crate::guest::wait_for(
            timeout,
            Duration::from_millis(2),
            "QEMU's QMP socket",
            || Ok(UnixStream::connect(path).ok()),
        )?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("QEMU's QMP socket greeted with {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("cannot read from QMP")?;
        if n == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    /// Runs one command; its `return` value, or its `error` as an error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        writeln!(self.writer, "{msg}").context("cannot write to QMP")?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                bail!("QMP {command} failed: {err}");
            }
            if reply.get("event").is_some() {
                self.events.push(reply);
            }
        }
    }

    /// Host time (Unix seconds) of the first event named `name` received so far.
    pub fn event_time(&self, name: &str) -> Option<f64> {
        self.events
            .iter()
            .find(|e| e["event"] == name)
            .and_then(|e| {
                let t = &e["timestamp"];
                Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
            })
    }
}
