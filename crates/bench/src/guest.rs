//! The benchmarked guest: tern's test guest with a working set of half its memory, and the
//! checks that decide from its own console reports whether a restore really worked.
//!
//! A benchmark of a broken restore is worthless, so every restore is followed by a full
//! verification pass of the working set that started after the restore, and any reported
//! mismatch, fault or gap in the heartbeat sequence fails the run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
pub use tern_testguest::Heartbeat;

/// Heartbeat period. A restored guest carries on in its rhythm (its clock continues from the
/// save), so its next heartbeat comes up to this long after it runs again: the shorter, the
/// closer "first heartbeat" is to "running". It cannot be 1 ms here: KVM emulates `rep outsb`
/// one byte per exit to the VMM (about 25 µs each on this nested KVM), so a ~140-byte
/// heartbeat line costs the guest about 3.7 ms, and at 1 ms it would do nothing but print.
/// At 10 ms printing takes about 37% of the vCPU.
pub const HEARTBEAT_MS: u64 = 10;
/// Rate of the memory writer. The test guest moves only about 350 MiB/s per vCPU here
/// (writing or verifying), and it prints a heartbeat only between batches of work: printing,
/// writing and verifying together must leave it idle part of the time, or a heartbeat can lag
/// by a batch (a few ms) and that lag would be measured as restore time.
pub const WRITE_MIBPS: u64 = 48;
/// Rate of the verifier: one full pass over the working set takes `wss / VERIFY_MIBPS`.
pub const VERIFY_MIBPS: u64 = 128;
/// Pages per MiB.
const PAGES_PER_MIB: u64 = 256;

/// The guest's size and workload, as its command line sets them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub mem_mib: u64,
    pub wss_mib: u64,
    pub write_mibps: u64,
    pub verify_ms: u64,
    pub heartbeat_ms: u64,
    pub vcpus: u32,
    /// Write the working set once at full speed first (`prefill=1`).
    pub prefill: bool,
    /// The disk workload, for a guest with a disk.
    pub disk: Option<DiskLoad>,
}

/// The test guest's disk workload: it writes numbered, checksummed blocks over the first
/// `mib` MiB of its disk at `kibps` and reads all it wrote back every `verify_ms`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiskLoad {
    pub mib: u64,
    pub kibps: u64,
    pub verify_ms: u64,
}

impl Workload {
    /// The benchmark's workload for a guest of `mem_mib`: a working set of half its memory.
    pub fn for_memory(mem_mib: u64) -> Workload {
        let wss_mib = mem_mib / 2;
        Workload {
            mem_mib,
            wss_mib,
            write_mibps: WRITE_MIBPS,
            verify_ms: (wss_mib * 1000 / VERIFY_MIBPS).max(100),
            heartbeat_ms: HEARTBEAT_MS,
            vcpus: 1,
            prefill: false,
            disk: None,
        }
    }

    /// The kernel command line that sets this workload.
    pub fn cmdline(&self) -> String {
        let write = if self.write_mibps == u64::MAX {
            "max".to_string()
        } else {
            self.write_mibps.to_string()
        };
        let disk = match &self.disk {
            Some(d) => format!(
                " disk_mib={} disk_kibps={} disk_verify_ms={}",
                d.mib, d.kibps, d.verify_ms
            ),
            None => String::new(),
        };
        format!(
            "heartbeat_ms={} wss_mib={} write_mibps={write} verify_ms={} prefill={}{disk}",
            self.heartbeat_ms,
            self.wss_mib,
            self.verify_ms,
            u8::from(self.prefill)
        )
    }

    /// Pages in the working set.
    pub fn ws_pages(&self) -> u64 {
        self.wss_mib * PAGES_PER_MIB
    }

    /// Bytes the guest has touched once the working set is written, by its own layout: the
    /// working set, its table of one u32 generation per page, and the kernel image (loaded
    /// at 1 MiB; about 2.6 MiB with its stacks, most of them never used). Used only when the
    /// guest's memory cannot be read from the host.
    pub fn touched_estimate(&self) -> u64 {
        const IMAGE_BYTES: u64 = 0x0029_0000;
        let gens = (self.ws_pages() * 4).div_ceil(4096) * 4096;
        (self.wss_mib << 20) + gens + IMAGE_BYTES
    }

    /// How long writing the working set once may take (its nominal time three times over,
    /// plus boot).
    pub fn fill_timeout(&self) -> Duration {
        Duration::from_secs(30 + 3 * self.wss_mib / self.write_mibps.max(1))
    }

    /// How long one verification pass may take, including faults of a lazy restore.
    pub fn pass_timeout(&self) -> Duration {
        Duration::from_millis(30_000 + 3 * self.verify_ms)
    }
}

/// One console line with the host time (Unix seconds) at which it arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamped {
    pub at: f64,
    pub line: String,
}

impl Stamped {
    /// Parses a `tern console --timestamps` line (`1763721234.123456 text`).
    pub fn parse_timestamped(line: &str) -> Option<Stamped> {
        let (ts, rest) = line.split_once(' ')?;
        Some(Stamped {
            at: ts.parse().ok()?,
            line: rest.to_string(),
        })
    }
}

/// Where the benchmark reads a guest's console from: tern's console log or QEMU's serial.
pub trait Console {
    /// Every line the guest printed so far (on this host, for this incarnation).
    fn lines(&self) -> anyhow::Result<Vec<Stamped>>;
}

/// The heartbeats among `lines`, with their arrival times.
pub fn beats(lines: &[Stamped]) -> Vec<(f64, Heartbeat)> {
    lines
        .iter()
        .filter_map(|s| Heartbeat::parse(&s.line).map(|h| (s.at, h)))
        .collect()
}

/// The last lines of a console, for error messages.
pub fn tail(lines: &[Stamped], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|s| format!("{:.6} {}", s.at, s.line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails if the guest reported a failed check or a fault anywhere in `lines`.
pub fn ensure_no_failures(lines: &[Stamped]) -> anyhow::Result<()> {
    let bad: Vec<&str> = lines
        .iter()
        .map(|s| s.line.as_str())
        .filter(|l| tern_testguest::is_failure_line(l))
        .collect();
    if !bad.is_empty() {
        bail!(
            "the guest reported failures:\n{}",
            bad.iter().take(10).copied().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// Polls `probe` every `every` until it yields a value or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// The last heartbeat the guest printed.
pub fn last_beat(console: &dyn Console) -> anyhow::Result<Heartbeat> {
    let lines = console.lines()?;
    beats(&lines)
        .pop()
        .map(|(_, h)| h)
        .with_context(|| format!("the guest printed no heartbeat:\n{}", tail(&lines, 20)))
}

/// Waits until the guest has written every page of its working set at least once.
pub fn wait_filled(console: &dyn Console, w: &Workload) -> anyhow::Result<Heartbeat> {
    let mut last = None;
    let result = wait_for(
        w.fill_timeout(),
        Duration::from_millis(500),
        "the guest to write its working set",
        || {
            let lines = console.lines()?;
            ensure_no_failures(&lines)?;
            last = beats(&lines).pop().map(|(_, h)| h);
            Ok(last.clone().filter(|h| h.written >= w.ws_pages()))
        },
    );
    result.with_context(|| format!("last heartbeat: {last:?}"))
}

/// What the guest showed after a restore.
#[derive(Clone, Debug)]
pub struct Resumed {
    /// Host time at which its first heartbeat arrived.
    pub first_at: f64,
    pub first: Heartbeat,
    /// Its last heartbeat once a whole verification pass had run after the restore.
    pub verified: Heartbeat,
}

/// Waits for the first heartbeat of a restored guest (short polls: console timestamps, not
/// the polling, give the time it arrived).
pub fn first_beat(console: &dyn Console) -> anyhow::Result<(f64, Heartbeat)> {
    let mut seen = Vec::new();
    let found = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(10),
        "the restored guest's first heartbeat",
        || {
            seen = console.lines()?;
            Ok(beats(&seen).into_iter().next())
        },
    );
    found.with_context(|| format!("console so far:\n{}", tail(&seen, 20)))
}

/// Checks that a restored guest carries on from `before` (its last heartbeat before the
/// save): the next heartbeat follows (`slack` allows heartbeats printed after `before` was
/// read, or one cut in half by the save), time does not go back, and a whole verification
/// pass of the working set runs after the restore without a mismatch.
pub fn check_resumed(
    console: &dyn Console,
    before: &Heartbeat,
    slack: u64,
    w: &Workload,
) -> anyhow::Result<Resumed> {
    let (first_at, first) = first_beat(console)?;
    let expected = before.seq + 1..=before.seq + 1 + slack;
    if !expected.contains(&first.seq) {
        bail!(
            "the restored guest's first heartbeat is seq {} after seq {} before the save",
            first.seq,
            before.seq
        );
    }
    if first.t_us < before.t_us || first.written < before.written {
        bail!("the restored guest went back in time: {before:?} -> {first:?}");
    }
    let verified = wait_verified(console, &first, w)?;
    if verified.reg_checks <= before.reg_checks {
        bail!("no register check ran after the restore: {before:?} -> {verified:?}");
    }
    Ok(Resumed {
        first_at,
        first,
        verified,
    })
}

/// Waits until the guest has verified a whole working set's worth of pages since `first`
/// (the verifier walks the pages in a cycle, so that is every page once), checking its
/// reports all along.
fn wait_verified(
    console: &dyn Console,
    first: &Heartbeat,
    w: &Workload,
) -> anyhow::Result<Heartbeat> {
    let goal = first.verified + w.ws_pages();
    let mut last = None;
    let result = wait_for(
        w.pass_timeout(),
        Duration::from_millis(250),
        "a verification pass after the restore",
        || {
            let lines = console.lines()?;
            ensure_no_failures(&lines)?;
            let hbs = beats(&lines);
            ensure_contiguous(&hbs).with_context(|| tail(&lines, 10))?;
            last = hbs.last().map(|(_, h)| h.clone());
            let Some(h) = &last else { return Ok(None) };
            if h.mem_errors != 0 || h.reg_errors != 0 {
                bail!("the restored guest counts errors: {h:?}");
            }
            Ok(last.clone().filter(|h| h.verified >= goal))
        },
    );
    result.with_context(|| format!("last heartbeat: {last:?}"))
}

/// Fails on a gap or repeat in the heartbeat sequence.
fn ensure_contiguous(hbs: &[(f64, Heartbeat)]) -> anyhow::Result<()> {
    for pair in hbs.windows(2) {
        if pair[1].1.seq != pair[0].1.seq + 1 {
            bail!(
                "heartbeat sequence broken after the restore: {} then {}",
                pair[0].1.seq,
                pair[1].1.seq
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_half_the_memory() {
        let w = Workload::for_memory(4096);
        assert_eq!(w.wss_mib, 2048);
        assert_eq!(w.ws_pages(), 524_288);
        assert_eq!(
            w.cmdline(),
            "heartbeat_ms=10 wss_mib=2048 write_mibps=48 verify_ms=16000 prefill=0"
        );
        assert!(w.touched_estimate() > 2048 << 20);
        assert_eq!(Workload::for_memory(64).verify_ms, 250);
    }

    #[test]
    fn timestamped_lines_parse() {
        let s = Stamped::parse_timestamped("1763721234.123456 tern-guest: hb seq=3 t=0.1").unwrap();
        assert_eq!(s.at, 1763721234.123456);
        assert_eq!(s.line, "tern-guest: hb seq=3 t=0.1");
        assert!(Stamped::parse_timestamped("garbage").is_none());
    }

    fn hb_line(at: f64, seq: u64, errors: u64) -> Stamped {
        Stamped {
            at,
            line: format!(
                "tern-guest: hb seq={seq} t=1.000000 cpus=1 written=9 verified=9 passes=1 mem_errors={errors} reg_checks=1 reg_errors=0"
            ),
        }
    }

    #[test]
    fn failures_and_gaps_are_found() {
        let good = vec![hb_line(1.0, 4, 0), hb_line(1.001, 5, 0)];
        assert!(ensure_no_failures(&good).is_ok());
        assert!(ensure_contiguous(&beats(&good)).is_ok());
        let gap = vec![hb_line(1.0, 4, 0), hb_line(1.001, 6, 0)];
        assert!(ensure_contiguous(&beats(&gap)).is_err());
        let mut bad = good.clone();
        bad.push(Stamped {
            at: 2.0,
            line: "tern-guest: MEMORY MISMATCH cpu=0 page=1".into(),
        });
        assert!(ensure_no_failures(&bad).is_err());
    }
}
