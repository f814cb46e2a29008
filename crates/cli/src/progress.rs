//! Progress display for long operations: one line, redrawn in place, on a terminal only.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Redraws a progress line (bytes done, rate, ETA, or any text) at most ten times a second.
pub struct ProgressLine {
    label: String,
    started: Instant,
    last_draw: Option<Instant>,
    enabled: bool,
    drawn: bool,
}

/// Formats a byte count with a binary unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl ProgressLine {
    /// A progress line labelled `label`, shown only if stderr is a terminal.
    pub fn new(label: &str) -> Self {
        ProgressLine {
            label: label.to_string(),
            started: Instant::now(),
            last_draw: None,
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Shows `done` of `total` bytes.
    pub fn update(&mut self, done: u64, total: u64) {
        let started = self.started;
        self.draw(|| {
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 && total > done {
                format!("{:.1} s", (total - done) as f64 / rate)
            } else {
                "-".into()
            };
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            format!(
                "{} / {} ({pct}%), {}/s, ETA {eta}",
                bytes(done),
                bytes(total),
                bytes(rate as u64)
            )
        });
    }

    /// Redraws the line as `label: text`, unless it was drawn less than 100 ms ago (`text` is
    /// only built when it will be shown).
    pub fn draw(&mut self, text: impl FnOnce() -> String) {
        if !self.enabled
            || self
                .last_draw
                .is_some_and(|t| t.elapsed().as_millis() < 100)
        {
            return;
        }
        self.last_draw = Some(Instant::now());
        eprint!("\r\x1b[2K{}: {}", self.label, text());
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}
