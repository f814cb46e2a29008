//! The save/restore benchmark of issue 3: the reference chapter's Table 13.1 (guests of 64,
//! 128 and 256 MiB, plus 1 and 4 GiB) on this machine, tern and QEMU in the same run.
//!
//! For each size, under tern: boot the test guest with a working set of half its memory,
//! wait until it has written every page once, then `reps` times save and restore lazily and
//! `reps` times save and restore with `--copy`, each restore checked by the guest's own
//! verification pass. Under QEMU: the same guest, `reps` times `migrate` to a file and
//! `-incoming` from it. Checkpoint files stay in the page cache (nothing drops caches).
//!
//! Before each save the guest is paused and its memory measured from the host, so "touched"
//! is what the guest had really written when the file was made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::guest::{self, Workload};
use crate::memory::{self, Footprint};
use crate::qemu::{self, Qemu, QemuSave};
use crate::tern::{self, BenchHost, RestoreSummary, SaveSummary, TernHost};

/// Guest memory sizes, MiB: the chapter's three and the two.
pub const SIZES_MIB: [u64; 5] = [64, 128, 256, 1024, 4096];
/// Repetitions of each measurement; the median is reported.
pub const REPS: usize = 3;

/// What to run; the defaults are the recorded benchmark, the environment can narrow it for
/// a quick look (`TERN_BENCH_SIZES=64,256`, `TERN_BENCH_REPS=1`, `TERN_BENCH_QEMU=off`).
#[derive(Clone, Debug)]
pub struct Config {
    pub sizes: Vec<u64>,
    pub reps: usize,
    pub qemu: bool,
    /// Where checkpoint files go (a directory on the normal disk; `TERN_BENCH_DIR`).
    pub work_dir: PathBuf,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        let sizes = match std::env::var("TERN_BENCH_SIZES") {
            Ok(s) => s
                .split(',')
                .map(|v| v.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("TERN_BENCH_SIZES={s:?} is not a list of MiB"))?,
            Err(_) => SIZES_MIB.to_vec(),
        };
        let reps = match std::env::var("TERN_BENCH_REPS") {
            Ok(r) => r
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("TERN_BENCH_REPS={r:?} is not a positive count"))?,
            Err(_) => REPS,
        };
        Ok(Config {
            sizes,
            reps,
            qemu: std::env::var("TERN_BENCH_QEMU").map_or(true, |v| v != "off"),
            work_dir: std::env::var_os("TERN_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        })
    }

    /// True for the full benchmark, whose results are recorded in the repository.
    pub fn is_full(&self) -> bool {
        self.sizes == SIZES_MIB && self.reps == REPS && self.qemu
    }
}

/// One tern save followed by one restore.
#[derive(Clone, Debug, Serialize)]
pub struct TernRound {
    /// "lazy" or "copy": how the checkpoint was restored.
    pub mode: String,
    /// The guest's RAM just before the save, measured from the host.
    pub footprint: Option<Footprint>,
    pub save: SaveSummary,
    /// Wall time of the `tern save` command.
    pub save_wall_seconds: f64,
    pub restore: RestoreSummary,
    /// Wall time of the `tern restore` command (lazy: it returns once all pages are in).
    pub restore_wall_seconds: f64,
    /// From just before `tern restore` was spawned to the arrival of the restored guest's
    /// first heartbeat line.
    pub first_heartbeat_ms: f64,
}

/// One QEMU save followed by one restore.
#[derive(Clone, Debug, Serialize)]
pub struct QemuRound {
    pub save: QemuSave,
    /// From just before the `-incoming` QEMU was spawned to its RESUME event, if QMP saw it.
    pub running_ms: Option<f64>,
    /// From just before the `-incoming` QEMU was spawned to the first heartbeat line.
    pub first_heartbeat_ms: f64,
}

/// QEMU's part for one size.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuOutcome {
    Measured(Vec<QemuRound>),
    NotAvailable(String),
}

/// Everything measured for one guest size.
#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    pub workload: Workload,
    pub tern: Vec<TernRound>,
    pub qemu: QemuOutcome,
}

impl SizeResult {
    /// Bytes the guest had touched (median of the measurements before each save), and
    /// whether that was measured or estimated from the guest's layout.
    pub fn touched(&self) -> (u64, &'static str) {
        let measured: Vec<u64> = self
            .tern
            .iter()
            .filter_map(|r| r.footprint.map(|f| f.nonzero_bytes))
            .collect();
        match crate::stats::median_u64(&measured) {
            Some(t) => (t, "measured"),
            None => (self.workload.touched_estimate(), "estimated"),
        }
    }
}

/// The whole run.
pub struct Run {
    pub config: Config,
    pub qemu: Result<Qemu, String>,
    pub sizes: Vec<SizeResult>,
}

/// Runs the benchmark; progress goes to stderr.
pub fn run(config: Config) -> anyhow::Result<Run> {
    let tern_bin = tern::find_tern()?;
    let mut qemu_state = if config.qemu {
        qemu::detect()
    } else {
        Err("not measured (TERN_BENCH_QEMU=off)".into())
    };
    eprintln!("tern: {}", tern_bin.display());
    match &qemu_state {
        Ok(q) => eprintln!("QEMU: {} ({})", q.version_line, q.binary.display()),
        Err(why) => eprintln!("QEMU: not available ({why})"),
    }
    std::fs::create_dir_all(&config.work_dir)?;
    let work = tempfile::Builder::new()
        .prefix("tern-bench-")
        .tempdir_in(&config.work_dir)?;
    // The daemon starts guest processes from its own executable: a private copy keeps the
    // whole run on one tern even if someone rebuilds target/release meanwhile.
    let tern_copy = work.path().join("tern");
    std::fs::copy(&tern_bin, &tern_copy)
        .with_context(|| format!("cannot copy {}", tern_bin.display()))?;
    let host = TernHost::start_in(&tern_copy, work.path())?;
    let mut sizes = Vec::new();
    for &mem in &config.sizes {
        let w = Workload::for_memory(mem);
        let tern = bench_tern(&host, &w, config.reps, work.path())
            .with_context(|| format!("tern, {mem} MiB guest"))?;
        let qemu = match &qemu_state {
            Ok(q) => bench_qemu(q, &w, config.reps, work.path())
                .with_context(|| format!("QEMU, {mem} MiB guest"))?,
            Err(why) => QemuOutcome::NotAvailable(why.clone()),
        };
        if let QemuOutcome::NotAvailable(why) = &qemu {
            qemu_state = Err(why.clone());
        }
        sizes.push(SizeResult {
            workload: w,
            tern,
            qemu,
        });
    }
    Ok(Run {
        config,
        qemu: qemu_state,
        sizes,
    })
}

/// Boots the guest under tern, lets it write its working set, then measures `reps` lazy and
/// `reps` copy round trips (each save is of the guest the previous restore brought back).
fn bench_tern(
    host: &TernHost,
    w: &Workload,
    reps: usize,
    dir: &Path,
) -> anyhow::Result<Vec<TernRound>> {
    let _lock = tern_testguest::KvmLock::acquire();
    let name = format!("bench{}", w.mem_mib);
    eprintln!("tern: {} MiB guest, {}", w.mem_mib, w.cmdline());
    host.create(&name, w)?;
    guest::wait_filled(&host.guest_console(&name), w)?;
    let file = dir.join(format!("{name}.tern"));
    let mut rounds = Vec::new();
    for copy in [false, true] {
        for rep in 0..reps {
            let round = tern_round(host, &name, w, &file, copy)
                .with_context(|| format!("round {} ({})", rep + 1, mode(copy)))?;
            eprintln!(
                "  {}: file {:.1} MiB, save {:.3} s (+{:.3} s fsync), running after {:.1} ms, first heartbeat after {:.1} ms",
                round.mode,
                mib(round.save.file_bytes),
                round.save.write_seconds,
                round.save.total_seconds - round.save.write_seconds,
                round.restore.running_after_ms,
                round.first_heartbeat_ms
            );
            rounds.push(round);
        }
    }
    host.run(&["destroy", &name])?;
    let _ = std::fs::remove_file(&file);
    Ok(rounds)
}

fn mode(copy: bool) -> &'static str {
    if copy {
        "copy"
    } else {
        "lazy"
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Pause, measure, save, restore, check.
fn tern_round(
    host: &TernHost,
    name: &str,
    w: &Workload,
    file: &Path,
    copy: bool,
) -> anyhow::Result<TernRound> {
    host.run(&["pause", name])?;
    // The console log is written by its own thread: let the last lines reach it.
    std::thread::sleep(Duration::from_millis(50));
    let before = guest::last_beat(&host.guest_console(name))?;
    let footprint = host
        .guest_pid(name)
        .and_then(memory::footprint)
        .map_err(|e| eprintln!("  (cannot measure the guest's memory: {e:#})"))
        .ok();
    let (save, save_wall_seconds) = host.save(name, file)?;
    let on_disk = std::fs::metadata(file)?.len();
    anyhow::ensure!(
        on_disk == save.file_bytes,
        "tern save reported {} bytes, the file has {on_disk}",
        save.file_bytes
    );
    let (restore, started, restore_wall_seconds) = host.restore(file, copy)?;
    // Slack 1: the pause can cut a heartbeat line in half (the guest prints byte by byte).
    let resumed = guest::check_resumed(&host.guest_console(name), &before, 1, w)?;
    Ok(TernRound {
        mode: mode(copy).into(),
        footprint,
        save,
        save_wall_seconds,
        restore,
        restore_wall_seconds,
        first_heartbeat_ms: (resumed.first_at - started) * 1e3,
    })
}

/// The same under QEMU. A QEMU that cannot boot the guest makes QEMU "not available"; a
/// restore that breaks the guest is an error like under tern.
fn bench_qemu(q: &Qemu, w: &Workload, reps: usize, dir: &Path) -> anyhow::Result<QemuOutcome> {
    let _lock = tern_testguest::KvmLock::acquire();
    eprintln!("QEMU: {} MiB guest", w.mem_mib);
    let qdir = dir.join(format!("qemu{}", w.mem_mib));
    std::fs::create_dir_all(&qdir)?;
    let mut guest = match q.boot(w, &qdir) {
        Ok(g) => g,
        Err(e) => {
            let why = format!("cannot boot the test guest: {e:#}");
            eprintln!("QEMU: not available ({why})");
            return Ok(QemuOutcome::NotAvailable(why));
        }
    };
    guest::wait_filled(&guest, w)?;
    let file = dir.join(format!("bench{}.qemu", w.mem_mib));
    let mut rounds = Vec::new();
    for rep in 0..reps {
        guest.stop()?;
        // Let the serial reader take in what the guest printed up to the stop.
        std::thread::sleep(Duration::from_millis(50));
        let before = guest::last_beat(&guest)?;
        let save = guest.save(&q.save_uri(&file)?, &file)?;
        guest.quit()?;
        let (mut restored, started) = q.restore(w, &qdir, &file)?;
        // Slack 1: QEMU can stop the guest in the middle of a heartbeat line.
        let resumed = guest::check_resumed(&restored, &before, 1, w)
            .with_context(|| format!("round {} ({})", rep + 1, restored.stderr_tail()))?;
        let running_ms = restored.resumed_at()?.map(|t| (t - started) * 1e3);
        let round = QemuRound {
            save,
            running_ms,
            first_heartbeat_ms: (resumed.first_at - started) * 1e3,
        };
        eprintln!(
            "  file {:.1} MiB, save {:.3} s, first heartbeat after {:.1} ms",
            mib(round.save.file_bytes),
            round.save.seconds,
            round.first_heartbeat_ms
        );
        rounds.push(round);
        guest = restored;
    }
    guest.quit()?;
    let _ = std::fs::remove_file(&file);
    Ok(QemuOutcome::Measured(rounds))
}
