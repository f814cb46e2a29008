//! A minimal logger for tern's processes: one line per record on stderr, with the host time.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    prefix: &'static str,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= Level::Info
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{} {} {}: {}",
                tern_api::console::format_time(crate::console::now_us()),
                self.prefix,
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Sends `log` records to stderr, tagged with `prefix` (the process's role).
pub fn init(prefix: &'static str) {
    let logger = Box::leak(Box::new(StderrLogger { prefix }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}
