//! What the sandbox costs (issue 14): the same work done by guest processes under the default
//! sandbox (per-thread system-call filters, a control group with limits) and with it off
//! (`[sandbox] seccomp = "off"`, `cgroups = false`), alternated run by run so that a drift of
//! the machine hits both alike:
//!
//! - live migration of a 1 GiB, 2-vCPU guest with 512 MiB in use, over TLS, between two lab
//!   hosts on the unshaped link (where the CPU, not the link, sets the pace, so that any cost
//!   of the filters shows): the pre-copy rate, the guest's longest heartbeat gap and the speed
//!   it kept;
//! - saving such a guest (`--keep-running`), on a sandboxed and an unsandboxed host side by
//!   side, alternated save by save, the hosts' roles swapped halfway: tern's save time;
//! - the guest's heartbeat rhythm while it only runs: the intervals between heartbeats over
//!   the seconds before the migration (median, 99th percentile, longest).
//!
//! Prints the table and records it in `benchmarks/sandbox.md`. `TERN_BENCH_RUNS=N` migrates
//! under each configuration N times (default 10).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_bench::felt;
use tern_bench::guest::{self, Workload};
use tern_bench::machine_info::MachineInfo;
use tern_bench::stats::median;
use tern_bench::tern::BenchHost;
use tern_testkit::{relocation_toml_with, KvmLock, Member, NetLab, TernHost, LAB_HOSTS_ALLOW};

const UNSANDBOXED: &str = "[sandbox]\nseccomp = \"off\"\ncgroups = false\n";
/// Seconds of plain running whose heartbeat intervals make the rhythm.
const RHYTHM_S: f64 = 5.0;
/// Saves of each kind per pair of hosts (two pairs): a save takes a few tenths of a second.
const SAVES: usize = 10;

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

fn workload() -> Workload {
    Workload {
        mem_mib: 1024,
        wss_mib: 512,
        write_mibps: 0,
        verify_ms: 4000,
        heartbeat_ms: guest::HEARTBEAT_MS,
        vcpus: 2,
        prefill: true,
        disk: None,
    }
}

/// One run's figures for one configuration.
#[derive(Clone, Debug, Default)]
struct Figures {
    precopy_mbit: f64,
    longest_gap_ms: f64,
    speed_kept: f64,
    rhythm_median_ms: f64,
    rhythm_p99_ms: f64,
    rhythm_max_ms: f64,
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let runs: usize = std::env::var("TERN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let _lock = KvmLock::acquire();
    let lab = NetLab::new()?;
    let (mut sandboxed, mut unsandboxed) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mut turns = [
            ("sandboxed", "", &mut sandboxed),
            ("unsandboxed", UNSANDBOXED, &mut unsandboxed),
        ];
        // Which goes first alternates: neither gets the machine fresher every time.
        if i % 2 == 1 {
            turns.reverse();
        }
        for (label, extra, into) in turns {
            let f =
                one_run(&lab, &tern, extra).with_context(|| format!("{label}, run {}", i + 1))?;
            println!(
                "{label:>11} run {}: pre-copy {:.0} Mbit/s, longest gap {:.1} ms, speed kept {:.1}%, heartbeat intervals median {:.2} / p99 {:.2} / max {:.2} ms",
                i + 1,
                f.precopy_mbit,
                f.longest_gap_ms,
                f.speed_kept * 100.0,
                f.rhythm_median_ms,
                f.rhythm_p99_ms,
                f.rhythm_max_ms
            );
            into.push(f);
        }
    }
    let saves = save_times(&lab, &tern).context("saves")?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let md = report(
        &sandboxed,
        &unsandboxed,
        &saves,
        &MachineInfo::collect(&repo),
    );
    println!("\n{md}");
    if std::env::var_os("TERN_BENCH_RUNS").is_none() {
        std::fs::write(repo.join("benchmarks/sandbox.md"), &md)?;
        println!("Recorded in benchmarks/sandbox.md");
    }
    Ok(())
}

/// Save times (seconds) of the same guest on a sandboxed host and on an unsandboxed one.
struct SaveTimes {
    sandboxed: Vec<f64>,
    unsandboxed: Vec<f64>,
}

/// Guests on two hosts side by side, one sandboxed and one not, saved with `--keep-running`
/// in turn. Which host and which turn go with the sandbox swap, so that neither biases the
/// figures (on this machine the same save is some 10% slower on one side than the other).
fn save_times(lab: &NetLab, tern: &std::path::Path) -> anyhow::Result<SaveTimes> {
    let mut times = SaveTimes {
        sandboxed: Vec::new(),
        unsandboxed: Vec::new(),
    };
    for sandboxed_on_host1 in [true, false] {
        let (c1, c2) = if sandboxed_on_host1 {
            ("", UNSANDBOXED)
        } else {
            (UNSANDBOXED, "")
        };
        let h1 = lab.start_host(tern, Member::Host1, c1)?;
        let h2 = lab.start_host(tern, Member::Host2, c2)?;
        let w = workload();
        for h in [&h1, &h2] {
            h.create("bench", &w)?;
            guest::wait_filled(&h.guest_console("bench"), &w)?;
        }
        let (sandboxed, unsandboxed) = if sandboxed_on_host1 {
            (&h1, &h2)
        } else {
            (&h2, &h1)
        };
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("bench.tern");
        for i in 0..SAVES {
            let mut turns = [
                (sandboxed, &mut times.sandboxed),
                (unsandboxed, &mut times.unsandboxed),
            ];
            if i % 2 == 1 {
                turns.reverse();
            }
            for (h, into) in turns {
                into.push(save_seconds(h, &file)?);
            }
        }
        for h in [&h1, &h2] {
            ensure_clean(&h.heartbeats("bench")?)?;
        }
    }
    println!(
        "saves: sandboxed {:.3?} s, unsandboxed {:.3?} s",
        times.sandboxed, times.unsandboxed
    );
    Ok(times)
}

/// `tern save bench FILE --keep-running`: tern's save time; the file is removed.
fn save_seconds(h: &TernHost, file: &std::path::Path) -> anyhow::Result<f64> {
    let path = tern_testkit::path_arg(file)?;
    let out = h.run(&["save", "bench", path, "--keep-running", "--json"])?;
    let summary: tern_api::SaveSummary =
        serde_json::from_str(out.trim()).context("tern's save summary")?;
    std::fs::remove_file(file)?;
    Ok(summary.total_seconds)
}

/// Two hosts with `extra` in their config: a migration from host1 to host2.
fn one_run(lab: &NetLab, tern: &std::path::Path, extra: &str) -> anyhow::Result<Figures> {
    let config = |m: Member| relocation_toml_with(m, &[LAB_HOSTS_ALLOW], "") + extra;
    let h1 = lab.start_host(tern, Member::Host1, &config(Member::Host1))?;
    let h2 = lab.start_host(tern, Member::Host2, &config(Member::Host2))?;
    h1.trust_each_other(&h2)?;
    let w = workload();
    h1.create("bench", &w)?;
    guest::wait_filled(&h1.guest_console("bench"), &w)?;
    let kept = tempfile::tempdir()?;
    h1.keep_console("bench", kept.path())?;
    std::thread::sleep(Duration::from_secs_f64(
        RHYTHM_S.max(felt::BASELINE_S) + 0.5,
    ));
    let start = tern_bench::unix_now();
    let out = h1.run(&["migrate", "bench", "10.77.0.2", "--live", "--json"])?;
    let end = tern_bench::unix_now();
    let summary: tern_api::MigrationSummary =
        serde_json::from_str(out.trim()).context("tern's migration summary")?;
    // The guest's view of the move ends a moment after it: wait until it has been running
    // on the destination that long.
    guest::wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "heartbeats on the destination after the migration",
        || {
            let last = h2.heartbeats("bench")?.pop().map(|(at, _)| at);
            Ok(last.filter(|at| *at > end + felt::AFTERMATH_S).map(|_| ()))
        },
    )?;
    let source_beats = felt::kept_beats(kept.path())?;
    let rhythm = intervals_ms(&source_beats, start - RHYTHM_S, start);
    let felt = felt::measure(&source_beats, &h2.heartbeats("bench")?, start, end)
        .context("the guest's heartbeats")?;
    ensure_clean(&h2.heartbeats("bench")?)?;
    Ok(Figures {
        precopy_mbit: summary.precopy_rate_mbit(),
        longest_gap_ms: felt.longest_gap_ms,
        speed_kept: felt.speed_kept,
        rhythm_median_ms: percentile(&rhythm, 0.5),
        rhythm_p99_ms: percentile(&rhythm, 0.99),
        rhythm_max_ms: percentile(&rhythm, 1.0),
    })
}

/// The intervals between heartbeats that arrived between `from` and `to` (host seconds), ms.
fn intervals_ms(beats: &[felt::Beat], from: f64, to: f64) -> Vec<f64> {
    let times: Vec<f64> = beats
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| (from..=to).contains(at))
        .collect();
    times.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    sorted[((last as f64) * p).round() as usize]
}

/// One figure of a run.
type Metric = fn(&Figures) -> f64;

fn report(
    sandboxed: &[Figures],
    unsandboxed: &[Figures],
    saves: &SaveTimes,
    info: &MachineInfo,
) -> String {
    let med =
        |v: &[Figures], f: Metric| median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    let rows: [(&str, Metric); 6] = [
        ("pre-copy rate (Mbit/s, unshaped link, TLS)", |f| {
            f.precopy_mbit
        }),
        ("longest guest gap over the migration (ms)", |f| {
            f.longest_gap_ms
        }),
        ("guest speed kept during the migration (%)", |f| {
            f.speed_kept * 100.0
        }),
        ("heartbeat interval, median (ms)", |f| f.rhythm_median_ms),
        ("heartbeat interval, 99th percentile (ms)", |f| {
            f.rhythm_p99_ms
        }),
        ("heartbeat interval, longest (ms)", |f| f.rhythm_max_ms),
    ];
    let mut md = format!(
        "# The sandbox's cost\n\n\
         `cargo bench -p tern-bench --bench sandbox`\n\n\
         {}\n\n\
         The same work by guest processes under the default sandbox (a system-call filter on \
         every thread, a control group with memory, CPU and task limits) and with it off \
         (`[sandbox] seccomp = \"off\"`, `cgroups = false`), {} migrations of each, alternated, \
         which goes first alternating; \
         medians. Each run: a 1 GiB, 2-vCPU test guest with 512 MiB in use live-migrated over \
         TLS from host1 to host2 of the lab on the unshaped link (the CPU sets the pace there, \
         so a cost of the filters would show). The heartbeat rhythm is the intervals between \
         the guest's heartbeats (every {} ms of guest time) over the {RHYTHM_S:.0} s before \
         the migration. Saves: the same guest on a sandboxed host and on an unsandboxed one \
         side by side, saved with `--keep-running` in turn (which goes first alternating), \
         {SAVES} times each, then again with the hosts' roles swapped; tern's save time (pause \
         to file flushed).\n\n\
         | | sandboxed | unsandboxed | sandboxed / unsandboxed |\n|---|---:|---:|---:|\n",
        info.markdown(),
        sandboxed.len(),
        guest::HEARTBEAT_MS
    );
    for (name, f) in rows {
        let (s, u) = (med(sandboxed, f), med(unsandboxed, f));
        md += &format!("| {name} | {s:.2} | {u:.2} | {:.3} |\n", s / u.max(1e-9));
    }
    let (save_s, save_u) = (
        median(&saves.sandboxed).unwrap_or(0.0),
        median(&saves.unsandboxed).unwrap_or(0.0),
    );
    md += &format!(
        "| save of the guest, median (s) | {save_s:.3} | {save_u:.3} | {:.3} |\n",
        save_s / save_u.max(1e-9)
    );
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let rates = |v: &[Figures]| range(&v.iter().map(|f| f.precopy_mbit).collect::<Vec<_>>());
    let ((rs_lo, rs_hi), (ru_lo, ru_hi)) = (rates(sandboxed), rates(unsandboxed));
    let ((ss_lo, ss_hi), (su_lo, su_hi)) = (range(&saves.sandboxed), range(&saves.unsandboxed));
    md += &format!(
        "\nRun to run the machine varies more than the sandbox costs: pre-copy rates of \
         {rs_lo:.0}–{rs_hi:.0} Mbit/s sandboxed and {ru_lo:.0}–{ru_hi:.0} unsandboxed, saves of \
         {ss_lo:.3}–{ss_hi:.3} s and {su_lo:.3}–{su_hi:.3} s; hence the alternation and the \
         medians.\n"
    );
    let throughput =
        med(sandboxed, |f| f.precopy_mbit) / med(unsandboxed, |f| f.precopy_mbit).max(1e-9);
    let save = save_s / save_u.max(1e-9);
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    md += &format!(
        "\n## Targets\n\n\
         - migration throughput under the sandbox: {:.1}% of unsandboxed, target at least 98%: {}\n\
         - save time under the sandbox: {:.1}% of unsandboxed, target at most 102%: {}\n",
        throughput * 100.0,
        verdict(throughput >= 0.98),
        save * 100.0,
        verdict(save <= 1.02)
    );
    md
}

/// The guest's own word: no error found in its memory or registers.
fn ensure_clean(beats: &[felt::Beat]) -> anyhow::Result<()> {
    if beats
        .iter()
        .any(|(_, h)| h.mem_errors > 0 || h.reg_errors > 0)
    {
        bail!("the guest found errors in its memory or registers");
    }
    Ok(())
}
