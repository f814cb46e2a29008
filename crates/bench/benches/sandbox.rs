//! What the sandbox costs (issue 14): the same work done by guest processes under the default
//! sandbox (per-thread system-call filters, a control group with limits) and with it off
//! (`[sandbox] seccomp = "off"`, `cgroups = false`), alternated run by run so that a drift of
//! the machine hits both alike:
//!
//! - live migration of a 1 GiB, 2-vCPU guest with 512 MiB in use, over TLS, between two lab
//!   hosts on the unshaped link (where the CPU, not the link, sets the pace, so that any cost
//!   of the filters shows): the pre-copy rate, the guest's longest heartbeat gap and the speed
//!   it kept;
//! - saving that guest on its new host: tern's save time;
//! - the guest's heartbeat rhythm while it only runs: the intervals between heartbeats over
//!   the seconds before the migration (median, 99th percentile, longest).
//!
//! Prints the table and records it in `benchmarks/sandbox.md`. `TERN_BENCH_RUNS=N` runs each
//! configuration N times (default 3).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_bench::felt;
use tern_bench::guest::{self, Workload};
use tern_bench::machine_info::MachineInfo;
use tern_bench::stats::median;
use tern_bench::tern::BenchHost;
use tern_testkit::{relocation_toml_with, KvmLock, Member, NetLab, LAB_HOSTS_ALLOW};

const UNSANDBOXED: &str = "[sandbox]\nseccomp = \"off\"\ncgroups = false\n";
/// Seconds of plain running whose heartbeat intervals make the rhythm.
const RHYTHM_S: f64 = 5.0;

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
    save_s: f64,
    rhythm_median_ms: f64,
    rhythm_p99_ms: f64,
    rhythm_max_ms: f64,
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let runs: usize = std::env::var("TERN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let _lock = KvmLock::acquire();
    let lab = NetLab::new()?;
    let (mut sandboxed, mut unsandboxed) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (label, extra, into) in [
            ("sandboxed", "", &mut sandboxed),
            ("unsandboxed", UNSANDBOXED, &mut unsandboxed),
        ] {
            let f =
                one_run(&lab, &tern, extra).with_context(|| format!("{label}, run {}", i + 1))?;
            println!(
                "{label:>11} run {}: pre-copy {:.0} Mbit/s, longest gap {:.1} ms, speed kept {:.1}%, save {:.3} s, heartbeat intervals median {:.2} / p99 {:.2} / max {:.2} ms",
                i + 1,
                f.precopy_mbit,
                f.longest_gap_ms,
                f.speed_kept * 100.0,
                f.save_s,
                f.rhythm_median_ms,
                f.rhythm_p99_ms,
                f.rhythm_max_ms
            );
            into.push(f);
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let md = report(&sandboxed, &unsandboxed, &MachineInfo::collect(&repo));
    println!("\n{md}");
    if std::env::var_os("TERN_BENCH_RUNS").is_none() {
        std::fs::write(repo.join("benchmarks/sandbox.md"), &md)?;
        println!("Recorded in benchmarks/sandbox.md");
    }
    Ok(())
}

/// Two hosts with `extra` in their config: a migration from host1 to host2, then a save on
/// host2.
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
    let source_beats = felt::kept_beats(kept.path())?;
    let rhythm = intervals_ms(&source_beats, start - RHYTHM_S, start);
    let felt = felt::measure(&source_beats, &h2.heartbeats("bench")?, start, end)
        .context("the guest's heartbeats")?;
    ensure_clean(&h2.heartbeats("bench")?)?;
    let file = kept.path().join("bench.tern");
    let (save, _) = h2.save("bench", &file)?;
    Ok(Figures {
        precopy_mbit: summary.precopy_rate_mbit(),
        longest_gap_ms: felt.longest_gap_ms,
        speed_kept: felt.speed_kept,
        save_s: save.total_seconds,
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

fn report(sandboxed: &[Figures], unsandboxed: &[Figures], info: &MachineInfo) -> String {
    let med = |v: &[Figures], f: Metric| {
        median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let rows: [(&str, Metric); 7] = [
        ("pre-copy rate (Mbit/s, unshaped link, TLS)", |f| {
            f.precopy_mbit
        }),
        ("longest guest gap over the migration (ms)", |f| {
            f.longest_gap_ms
        }),
        ("guest speed kept during the migration (%)", |f| {
            f.speed_kept * 100.0
        }),
        ("save of the 1 GiB guest (s)", |f| f.save_s),
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
         (`[sandbox] seccomp = \"off\"`, `cgroups = false`), {} runs of each, alternated; \
         medians. Each run: a 1 GiB, 2-vCPU test guest with 512 MiB in use live-migrated over \
         TLS from host1 to host2 of the lab on the unshaped link (the CPU sets the pace there, \
         so a cost of the filters would show), then saved on host2. The heartbeat rhythm is \
         the intervals between the guest's heartbeats (every {} ms of guest time) over the \
         {RHYTHM_S:.0} s before the migration.\n\n\
         | | sandboxed | unsandboxed | sandboxed / unsandboxed |\n|---|---:|---:|---:|\n",
        info.markdown(),
        sandboxed.len(),
        guest::HEARTBEAT_MS
    );
    for (name, f) in rows {
        let (s, u) = (med(sandboxed, f), med(unsandboxed, f));
        md += &format!("| {name} | {s:.2} | {u:.2} | {:.3} |\n", s / u.max(1e-9));
    }
    let throughput =
        med(sandboxed, |f| f.precopy_mbit) / med(unsandboxed, |f| f.precopy_mbit).max(1e-9);
    let save = med(sandboxed, |f| f.save_s) / med(unsandboxed, |f| f.save_s).max(1e-9);
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
