//! The test guest kernel, built from `guest/` by this crate's build script.
//!
//! Tests, benchmarks and the demo boot it with `kernel = path()`. Its command-line parameters:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `heartbeat_ms` | period of the `hb seq=…` console line | 100 |
//! | `wss_mib` | working set stamped by the memory writer, MiB | 0 |
//! | `write_mibps` | write rate over all vCPUs, MiB/s, or `max` | 0 |
//! | `verify_ms` | period of one full verification pass | 2000 |
//! | `write_passes` | stop writing after this many passes over the working set (0: never) | 0 |

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Serialises tests that run guests: the build machine has two cores, and timing-sensitive
/// tests must not starve each other. Held across threads and test binaries (a file lock).
pub struct KvmLock(#[allow(dead_code)] File);

impl KvmLock {
    /// Blocks until no other guest-running test holds the lock.
    pub fn acquire() -> KvmLock {
        let path = std::env::temp_dir().join("tern-kvm-tests.lock");
        let file = File::create(&path).expect("cannot create the KVM test lock file");
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "cannot take the KVM test lock");
        KvmLock(file)
    }
}

/// Path of the built test guest ELF (PVH entry).
pub fn path() -> &'static Path {
    Path::new(env!("TERN_TEST_GUEST_ELF"))
}

/// One heartbeat line of the test guest, as printed on its console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    /// Guest time (kvmclock) in microseconds.
    pub t_us: u64,
    pub cpus: u64,
    pub written: u64,
    pub verified: u64,
    pub passes: u64,
    pub mem_errors: u64,
    pub reg_checks: u64,
    pub reg_errors: u64,
}

impl Heartbeat {
    /// Parses a console line (with or without a host timestamp prefix); None if it is not a
    /// complete heartbeat. A line cut short (a guest paused in the middle of printing it) lacks
    /// its last field and is refused rather than misread.
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let rest = &line[line.find("tern-guest: hb ")? + "tern-guest: hb ".len()..];
        if !rest.contains(" reg_errors=") {
            return None;
        }
        let mut hb = Heartbeat::default();
        for field in rest.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            if key == "t" {
                let (s, us) = value.split_once('.')?;
                hb.t_us = s.parse::<u64>().ok()? * 1_000_000 + us.parse::<u64>().ok()?;
                continue;
            }
            let v: u64 = value.parse().ok()?;
            match key {
                "seq" => hb.seq = v,
                "cpus" => hb.cpus = v,
                "written" => hb.written = v,
                "verified" => hb.verified = v,
                "passes" => hb.passes = v,
                "mem_errors" => hb.mem_errors = v,
                "reg_checks" => hb.reg_checks = v,
                "reg_errors" => hb.reg_errors = v,
                _ => {}
            }
        }
        Some(hb)
    }
}

/// The complete lines of console output (a last line without its newline is still being
/// written, or was cut by a pause, and is left out).
pub fn complete_lines(output: &str) -> std::str::Lines<'_> {
    let complete = match output.rfind('\n') {
        Some(i) => &output[..i],
        None => "",
    };
    complete.lines()
}

/// True for a console line in which the guest reports a failed check or a fault.
pub fn is_failure_line(line: &str) -> bool {
    ["MEMORY MISMATCH", "REGISTER MISMATCH", "EXCEPTION", "PANIC"]
        .iter()
        .any(|m| line.contains(&format!("tern-guest: {m}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_was_built() {
        let data = std::fs::read(path()).unwrap();
        assert_eq!(&data[..4], b"\x7fELF");
    }

    #[test]
    fn parses_heartbeats() {
        let line = "1763721234.123456 tern-guest: hb seq=12 t=3.000120 cpus=2 written=5 verified=6 passes=1 mem_errors=0 reg_checks=9 reg_errors=0";
        let hb = Heartbeat::parse(line).unwrap();
        assert_eq!(hb.seq, 12);
        assert_eq!(hb.t_us, 3_000_120);
        assert_eq!(hb.cpus, 2);
        assert_eq!(hb.reg_checks, 9);
        assert!(Heartbeat::parse("tern-guest: ready cpus=1/1").is_none());
        assert!(Heartbeat::parse("tern-guest: hb seq=13").is_none());
        assert!(is_failure_line("tern-guest: MEMORY MISMATCH cpu=0 page=1"));
        assert!(!is_failure_line(line));
    }
}
