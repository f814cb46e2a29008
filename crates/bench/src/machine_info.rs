//! What a recorded result was measured on: figures mean little without the machine, the
//! kernel, the tern commit and how busy the host was.

use std::path::Path;
use std::process::Command;

/// The measuring machine and software.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MachineInfo {
    /// UTC date and time, `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// /proc/loadavg when the benchmark started: other guests on this host skew the figures.
    pub load_at_start: String,
    /// `git describe` of the tern checkout, with `-dirty` for uncommitted changes.
    pub tern_commit: String,
}

impl MachineInfo {
    /// Collects the facts; a missing one is left empty rather than failing the benchmark.
    pub fn collect(repo: &Path) -> MachineInfo {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        MachineInfo {
            date: utc_date(crate::unix_now() as i64),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
                .unwrap_or_default(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            load_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            tern_commit: git_describe(repo),
        }
    }
}

impl MachineInfo {
    /// One paragraph saying when and on what the figures were measured.
    pub fn markdown(&self) -> String {
        format!(
            "Measured on {} on a {}-core {} (Linux {}, load {} at start), tern {}.",
            self.date,
            self.cores,
            self.cpu_model,
            self.kernel,
            self.load_at_start,
            self.tern_commit
        )
    }
}

fn git_describe(repo: &Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM UTC` for Unix time `secs` (days to civil date: Howard Hinnant's
/// algorithm, to need no date crate).
pub fn utc_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_763_721_234), "2025-11-21 10:33 UTC");
    }
}
