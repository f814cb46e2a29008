//! The migration benchmark of issues 5 and 11: a 1 GiB, 2-vCPU test guest with 512 MiB in use,
//! writing 0, 64, 256 MiB/s and as fast as it can, live-migrated from host1 to host2 of the
//! test lab over a link shaped to 1 Gbit/s, by tern and, in the same run, by QEMU (`-incoming
//! tcp:`, auto-converge, the same 30 ms downtime limit, no bandwidth cap). Both are judged
//! first by what the guest felt, from its own heartbeats (`tern_bench::felt`: the longest gap
//! over the whole move, the gap at the switch, the speed it kept), then by their own figures.
//! Downtime is measured the same way for both: from the pause on the source to the resume on
//! the destination, as the two processes stamp them with the host clock (tern's summary;
//! QEMU's STOP and RESUME events). Prints the table and records it in
//! `benchmarks/migration.md` and `.json`.
//!
//! Then, tern alone: what encryption costs, the pre-copy rate in clear and over TLS on the
//! shaped link and on the unshaped one.
//!
//! `TERN_BENCH_QEMU=off` leaves QEMU out; `TERN_BENCH_RATES=0,256` runs some rates only
//! (`TERN_BENCH_RATES=none`: none); `TERN_BENCH_ENCRYPTION=off` leaves the encryption part out;
//! `TERN_BENCH_POSTCOPY=off` leaves tern's `--postcopy` rows out, `TERN_BENCH_BITMAP=off` its
//! dirty-bitmap rows (`TERN_DIRTY_RING=0`: the dirty log and time-slice throttle tern uses where
//! KVM has no dirty ring).
//! `TERN_BENCH_DUMP=FILE` writes every heartbeat of tern's last run (host time, seq, pages
//! written, pages verified) after a line with the migration's start, end, pause and resume,
//! to see where a gap falls.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tern_bench::felt::{self, Felt};
use tern_bench::guest::{self, Console, Workload};
use tern_bench::lab::{shaped, unshape};
use tern_bench::machine_info::MachineInfo;
use tern_bench::qemu::{self, Qemu};
use tern_testkit::{relocation_toml_with, KvmLock, Member, NetLab, TernHost, LAB_HOSTS_ALLOW};

const MEM_MIB: u64 = 1024;
const VCPUS: u32 = 2;
const WSS_MIB: u64 = 512;
/// The shaped link between the hosts (and to the rest of the lab).
const LINK_MBIT: u64 = 1000;
const DOWNTIME_MS: u64 = 30;
const QEMU_PORT: u16 = 4444;
/// Write rates from which tern is also measured with `--postcopy`.
const POSTCOPY_FROM_MIBPS: u64 = 256;
/// A QEMU migration still running after this long is cancelled and reported as not
/// converging.
const QEMU_GIVE_UP: Duration = Duration::from_secs(60);
/// Write rates (MiB/s); `u64::MAX`: as fast as the guest can.
const RATES: [u64; 4] = [0, 64, 256, u64::MAX];

#[derive(Clone, Debug, Default, Serialize)]
struct Figures {
    tool: String,
    write_mibps: Option<u64>,
    /// False when the migration was given up after [`QEMU_GIVE_UP`]: it did not converge.
    converged: bool,
    /// What the guest felt, from its own heartbeats.
    felt: Felt,
    /// The tool's own figures.
    downtime_ms: f64,
    /// The gap at the switch before the pause and after the resume, milliseconds.
    before_pause_ms: f64,
    after_resume_ms: f64,
    /// tern's longest vCPU stall, from its summary (QEMU reports none).
    longest_vcpu_stall_ms: Option<f64>,
    total_s: f64,
    bytes: u64,
    rounds: u64,
    throttle_percent: u64,
    /// The guest's own word after arrival: memory and register checks clean.
    checks_clean: bool,
}

impl Figures {
    /// The write rate as the table shows it.
    fn rate_label(&self) -> String {
        self.write_mibps.map_or("max".to_string(), label)
    }

    fn checks_word(&self) -> &'static str {
        if !self.converged {
            "-"
        } else if self.checks_clean {
            "clean"
        } else {
            "FAILED"
        }
    }

    /// Total time over the time the bytes alone take on the link.
    fn over_link(&self, link_bps: f64) -> f64 {
        self.total_s / (self.bytes as f64 / link_bps)
    }
}

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

fn workload(write_mibps: u64) -> Workload {
    Workload {
        mem_mib: MEM_MIB,
        wss_mib: WSS_MIB,
        write_mibps,
        verify_ms: 4000,
        heartbeat_ms: guest::HEARTBEAT_MS,
        vcpus: VCPUS,
        prefill: true,
        disk: None,
    }
}

fn rates() -> Vec<u64> {
    match std::env::var("TERN_BENCH_RATES") {
        Ok(list) => list
            .split(',')
            .filter_map(|r| match r.trim() {
                "max" => Some(u64::MAX),
                n => n.parse().ok(),
            })
            .collect(),
        Err(_) => RATES.to_vec(),
    }
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let qemu = qemu::unless_off();
    let _lock = KvmLock::acquire();
    let (lab, link_bps) = shaped(LINK_MBIT)?;
    let mut results = Vec::new();
    for rate in rates() {
        let w = workload(rate);
        let t = tern_once(&lab, &tern, &w).with_context(|| format!("tern at {}", label(rate)))?;
        print_row(&t, link_bps);
        results.push(t);
        if rate >= POSTCOPY_FROM_MIBPS
            && std::env::var("TERN_BENCH_POSTCOPY").as_deref() != Ok("off")
        {
            let (p, _) = tern_migration(&lab, &tern, &w, "", &["--postcopy"])
                .with_context(|| format!("tern --postcopy at {}", label(rate)))?;
            print_row(&p, link_bps);
            results.push(p);
        }
        if rate >= POSTCOPY_FROM_MIBPS && std::env::var("TERN_BENCH_BITMAP").as_deref() != Ok("off")
        {
            let r = tern_with_dirty_bitmap(&lab, &tern, &w)
                .with_context(|| format!("tern with the dirty bitmap at {}", label(rate)))?;
            print_row(&r, link_bps);
            results.push(r);
        }
        if let Some(q) = &qemu {
            let f = qemu_once(&lab, q, &w).with_context(|| format!("QEMU at {}", label(rate)))?;
            print_row(&f, link_bps);
            results.push(f);
        }
    }
    let mut encryption = Vec::new();
    if std::env::var("TERN_BENCH_ENCRYPTION").as_deref() != Ok("off") {
        let shaped = format!("{LINK_MBIT} Mbit/s (shaped)");
        encryption.push(encryption_cost(&lab, &tern, &shaped).context("encryption, shaped")?);
        unshape(&lab)?;
        encryption.push(encryption_cost(&lab, &tern, "unshaped").context("encryption, unshaped")?);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let info = MachineInfo::collect(&repo);
    let mut md = report(&results, link_bps, &info, qemu.as_ref());
    md += &encryption_report(&encryption);
    println!("\n{md}");
    if std::env::var_os("TERN_BENCH_RATES").is_none() {
        std::fs::write(repo.join("benchmarks/migration.md"), &md)?;
        let json = serde_json::json!({
            "link_mbit_shaped": LINK_MBIT,
            "link_mbit_measured": link_bps * 8.0 / 1e6,
            "results": results,
            "encryption": encryption,
        });
        std::fs::write(
            repo.join("benchmarks/migration.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        println!("Recorded in benchmarks/migration.md and benchmarks/migration.json");
    }
    Ok(())
}

fn label(rate: u64) -> String {
    match rate {
        u64::MAX => "max".into(),
        r => format!("{r} MiB/s"),
    }
}

fn tern_once(lab: &NetLab, tern: &std::path::Path, w: &Workload) -> anyhow::Result<Figures> {
    tern_migration(lab, tern, w, "", &[]).map(|(figures, _)| figures)
}

/// One live migration by tern without the dirty ring (`TERN_DIRTY_RING=0` in both daemons'
/// environment), as on a KVM without one: the dirty bitmap, and auto-converge slices every
/// vCPU's time instead of limiting each vCPU's dirty rate.
fn tern_with_dirty_bitmap(
    lab: &NetLab,
    tern: &std::path::Path,
    w: &Workload,
) -> anyhow::Result<Figures> {
    // The daemons (and their guest processes) inherit it; nothing else runs meanwhile.
    std::env::set_var("TERN_DIRTY_RING", "0");
    let result = tern_migration(lab, tern, w, "", &[]);
    std::env::remove_var("TERN_DIRTY_RING");
    let (mut figures, _) = result?;
    figures.tool = "tern, dirty bitmap".into();
    Ok(figures)
}

/// One live migration by tern with `relocation` lines in both hosts' `[relocation]` table
/// and `options` added to `tern migrate`; the figures and tern's summary.
fn tern_migration(
    lab: &NetLab,
    tern: &std::path::Path,
    w: &Workload,
    relocation: &str,
    options: &[&str],
) -> anyhow::Result<(Figures, serde_json::Value)> {
    let h1 = lab.start_host(
        tern,
        Member::Host1,
        &relocation_toml_with(Member::Host1, &[LAB_HOSTS_ALLOW], relocation),
    )?;
    let h2 = lab.start_host(
        tern,
        Member::Host2,
        &relocation_toml_with(Member::Host2, &[LAB_HOSTS_ALLOW], relocation),
    )?;
    h1.trust_each_other(&h2)?;
    let cfg = h1.guest_config("bench", w.mem_mib, w.vcpus, &w.cmdline())?;
    h1.run(&["create", tern_testkit::path_arg(&cfg)?])?;
    wait_filled_tern(&h1, w)?;
    let kept = tempfile::tempdir()?;
    h1.keep_console("bench", kept.path())?;
    std::thread::sleep(Duration::from_secs(2) + Duration::from_secs_f64(felt::BASELINE_S));
    let start = tern_bench::unix_now();
    let mut args = vec!["migrate", "bench", "10.77.0.2", "--live", "--json"];
    args.extend_from_slice(options);
    let out = h1.run(&args)?;
    let end = tern_bench::unix_now();
    let s: serde_json::Value = serde_json::from_str(out.trim()).context("tern's summary")?;
    let ns = |k: &str| s[k].as_u64().unwrap_or(0) as f64;
    let rounds: Vec<String> = s["rounds"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    format!(
                        "{}p/{:.2}s@{}%",
                        r["pages"].as_u64().unwrap_or(0) + r["zero_pages"].as_u64().unwrap_or(0),
                        r["seconds"].as_f64().unwrap_or(0.0),
                        r["throttle_percent"].as_u64().unwrap_or(0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "  tern rounds: {} ({})",
        rounds.join(" "),
        s["stop_reason"].as_str().unwrap_or("")
    );
    if !s["postcopy"].is_null() {
        println!("  tern post-copy: {}", s["postcopy"]);
    }
    let last_seq = h2
        .heartbeats("bench")?
        .pop()
        .map(|(_, h)| h.seq)
        .unwrap_or(0);
    let checks_clean = checks_clean_tern(&h2, last_seq)?;
    if let Some(path) = std::env::var_os("TERN_BENCH_DUMP") {
        let src = felt::kept_beats(kept.path())?;
        let mut text = format!(
            "start {start} end {end} paused {} resumed {}\n",
            ns("paused_unix_ns") / 1e9,
            ns("resumed_unix_ns") / 1e9
        );
        for (at, h) in src.iter().chain(h2.heartbeats("bench")?.iter()) {
            text += &format!("{at:.6} {} {} {}\n", h.seq, h.written, h.verified);
        }
        std::fs::write(path, text)?;
    }
    let felt = felt::measure(
        &felt::kept_beats(kept.path())?,
        &h2.heartbeats("bench")?,
        start,
        end,
    )
    .context("the guest's heartbeats")?;
    h2.run(&["destroy", "bench"])?;
    let (before_pause_ms, after_resume_ms) =
        felt.around(ns("paused_unix_ns") / 1e9, ns("resumed_unix_ns") / 1e9);
    let figures = Figures {
        before_pause_ms,
        after_resume_ms,
        tool: if options.contains(&"--postcopy") {
            "tern --postcopy".into()
        } else {
            "tern".into()
        },
        write_mibps: (w.write_mibps != u64::MAX).then_some(w.write_mibps),
        converged: true,
        felt,
        downtime_ms: (ns("resumed_unix_ns") - ns("paused_unix_ns")) / 1e6,
        longest_vcpu_stall_ms: s["longest_vcpu_stall_ms"].as_f64(),
        total_s: s["total_seconds"].as_f64().unwrap_or(0.0),
        bytes: s["bytes_sent"].as_u64().unwrap_or(0),
        rounds: s["rounds"].as_array().map_or(0, |r| r.len() as u64),
        throttle_percent: s["max_throttle_percent"].as_u64().unwrap_or(0),
        checks_clean,
    };
    Ok((figures, s))
}

/// What encryption costs: the pre-copy rate of a guest that writes nothing, in clear and
/// over TLS, on one link.
#[derive(Clone, Debug, Serialize)]
struct EncryptionCost {
    link: String,
    plaintext_mbit: f64,
    tls_mbit: f64,
    runs_each: usize,
}

impl EncryptionCost {
    fn ratio(&self) -> f64 {
        self.tls_mbit / self.plaintext_mbit.max(1e-9)
    }
}

/// Runs of each kind, alternated so that a drift of the machine hits both alike.
const ENCRYPTION_RUNS: usize = 3;

/// Measures [`EncryptionCost`] on the lab's link as it is now.
fn encryption_cost(
    lab: &NetLab,
    tern: &std::path::Path,
    link: &str,
) -> anyhow::Result<EncryptionCost> {
    let w = workload(0);
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..ENCRYPTION_RUNS {
        for (lines, rates) in [("insecure = true", &mut plain), ("", &mut tls)] {
            let (figures, summary) = tern_migration(lab, tern, &w, lines, &[])?;
            if !figures.checks_clean {
                bail!("the guest's checks failed after a migration ({lines:?})");
            }
            let summary: tern_api::MigrationSummary =
                serde_json::from_value(summary).context("tern's summary")?;
            rates.push(summary.precopy_rate_mbit());
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let cost = EncryptionCost {
        link: link.into(),
        plaintext_mbit: mean(&plain),
        tls_mbit: mean(&tls),
        runs_each: ENCRYPTION_RUNS,
    };
    println!(
        "encryption, {link}: plaintext {:.0} Mbit/s {plain:.0?}, TLS {:.0} Mbit/s {tls:.0?}: {:.1}%",
        cost.plaintext_mbit,
        cost.tls_mbit,
        cost.ratio() * 100.0
    );
    Ok(cost)
}

fn wait_filled_tern(h: &TernHost, w: &Workload) -> anyhow::Result<()> {
    guest::wait_for(
        w.fill_timeout(),
        Duration::from_millis(200),
        "the guest to fill its working set",
        || {
            let beats = h.heartbeats("bench")?;
            Ok(beats
                .last()
                .filter(|(_, b)| b.written >= w.ws_pages())
                .map(|_| ()))
        },
    )
}

/// Waits for a full verification pass on the destination; whether it found everything intact.
fn checks_clean_tern(h: &TernHost, from_seq: u64) -> anyhow::Result<bool> {
    let first = guest::wait_for(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "heartbeats on the destination",
        || Ok(h.heartbeats("bench")?.pop().map(|(_, b)| b)),
    )?;
    let last = guest::wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "a full memory check on the destination",
        || {
            Ok(h.heartbeats("bench")?
                .pop()
                .map(|(_, b)| b)
                .filter(|b| b.passes > first.passes && b.seq > from_seq))
        },
    )?;
    Ok(last.mem_errors == 0 && last.reg_errors == 0)
}

fn qemu_once(lab: &NetLab, q: &Qemu, w: &Workload) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let mut src = q.spawn_in(w, &src_dir, &[], Some(lab.ns(Member::Host1)))?;
    guest::first_beat(&src).with_context(|| src.stderr_tail())?;
    guest::wait_filled(&src, w)?;
    std::thread::sleep(Duration::from_secs(2) + Duration::from_secs_f64(felt::BASELINE_S));
    let uri = format!("tcp:{}:{QEMU_PORT}", Member::Host2.ip());
    let mut dst = q.spawn_in(
        w,
        &dst_dir,
        &["-incoming".into(), uri.clone()],
        Some(lab.ns(Member::Host2)),
    )?;
    let tool = format!("QEMU {}.{}.{}", q.version.0, q.version.1, q.version.2);
    let write_mibps = (w.write_mibps != u64::MAX).then_some(w.write_mibps);
    let start = tern_bench::unix_now();
    let Some((status, seconds, stopped)) = src.migrate_live(&uri, DOWNTIME_MS, QEMU_GIVE_UP)?
    else {
        let _ = src.quit();
        let _ = dst.quit();
        return Ok(Figures {
            tool,
            write_mibps,
            total_s: QEMU_GIVE_UP.as_secs_f64(),
            ..Figures::default()
        });
    };
    let end = tern_bench::unix_now();
    let resumed = dst.wait_resumed()?;
    let before = guest::last_beat(&dst).map(|b| b.passes).unwrap_or(0);
    let after = guest::wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "a full memory check under QEMU on the destination",
        || Ok(guest::last_beat(&dst).ok().filter(|b| b.passes > before)),
    )?;
    let felt = felt::measure(
        &guest::beats(&src.lines()?),
        &guest::beats(&dst.lines()?),
        start,
        end,
    )
    .context("the guest's heartbeats under QEMU")?;
    let _ = src.quit();
    let _ = dst.quit();
    let (before_pause_ms, after_resume_ms) = felt.around(stopped, resumed);
    Ok(Figures {
        before_pause_ms,
        after_resume_ms,
        tool,
        write_mibps,
        converged: true,
        felt,
        downtime_ms: (resumed - stopped) * 1e3,
        longest_vcpu_stall_ms: None,
        total_s: seconds,
        bytes: status["ram"]["transferred"].as_u64().unwrap_or(0),
        rounds: status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        throttle_percent: status["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        checks_clean: after.mem_errors == 0 && after.reg_errors == 0,
    })
}

fn print_row(f: &Figures, link_bps: f64) {
    if !f.converged {
        println!(
            "{:<12} {:>10}: did not converge in {:.0} s",
            f.tool,
            f.rate_label(),
            f.total_s
        );
        return;
    }
    println!(
        "{:<12} {:>10}: guest: longest gap {:>6.1} ms (at {:.2} s), at the switch {:>6.1} ms ({:.1} before the pause, {:.1} after the resume), speed kept {:>5.1}%; tool: downtime {:>6.1} ms, longest vCPU stall {}, total {:>6.2} s, {:>5} MiB sent ({:.2}x the link time), {} rounds, throttle {}%, checks {}",
        f.tool,
        f.rate_label(),
        f.felt.longest_gap_ms,
        f.felt.longest_gap_at_s,
        f.felt.switch_gap_ms,
        f.before_pause_ms,
        f.after_resume_ms,
        f.felt.speed_kept * 100.0,
        f.downtime_ms,
        stall_word(f),
        f.total_s,
        f.bytes >> 20,
        f.over_link(link_bps),
        f.rounds,
        f.throttle_percent,
        f.checks_word()
    );
}

fn stall_word(f: &Figures) -> String {
    f.longest_vcpu_stall_ms
        .map_or("-".to_string(), |ms| format!("{ms:.1} ms"))
}

fn report(results: &[Figures], link_bps: f64, info: &MachineInfo, qemu: Option<&Qemu>) -> String {
    let mut md = format!(
        "# Migration benchmark (issues 5 and 11)\n\n\
         Measured by `cargo bench -p tern-bench --bench migration` (also run by `scripts/bench`).\n\n\
         {}\n\n\
         A {MEM_MIB} MiB, {VCPUS}-vCPU test guest with {WSS_MIB} MiB of its memory in use (written\n\
         once at start), writing at the given rate over those {WSS_MIB} MiB, is live-migrated from\n\
         host1 to host2 of the test lab. The hosts' uplinks are shaped to {LINK_MBIT} Mbit/s with a\n\
         token bucket (measured: {:.0} Mbit/s for one TCP stream). Both tools: {DOWNTIME_MS} ms\n\
         downtime limit, no bandwidth cap, auto-converge. tern migrates over TLS 1.3 (its\n\
         default); QEMU in clear (a `tcp:` URI, its default). A QEMU migration still running\n\
         after {} s is cancelled and shown as not converging. At 256 MiB/s and faster tern is also\n\
         measured with `--postcopy` (the guest runs on the destination as soon as pre-copy would\n\
         send much of its memory twice, its missing pages fetched on demand and pushed behind;\n\
         total time runs until every page arrived), and without KVM's dirty ring\n\
         (`TERN_DIRTY_RING=0`, as on a KVM without one: the dirty bitmap, and auto-converge holds\n\
         every vCPU for a slice of each 5 ms, instead of only the vCPUs that dirty more than\n\
         their share of the budget).\n\n\
         **What the guest felt** comes first, measured the same way for both tools from the\n\
         guest's own heartbeats (one every {} ms of guest time, each stamped with the host clock\n\
         as its first byte reaches the console; every byte of a line is an exit to the host,\n\
         about 40 µs on this machine, so printing a line takes the guest about 5 ms, and a line\n\
         the pause cuts in two is lost for both tools): the *longest gap* between two heartbeats from the start of\n\
         the migration until {:.0} s after it ended; the *gap at the switch* from the last\n\
         heartbeat on the source to the first on the destination; the *speed kept*, the guest's\n\
         work rate (pages written and verified per second) during the migration over its rate\n\
         in the {:.0} s before.\n\n\
         Then the tools' own figures: *downtime* from the pause on the source to the resume on the\n\
         destination, as both processes stamp them with the host clock (tern's summary; QEMU's\n\
         STOP and RESUME events); tern's *longest vCPU stall* (its summary: the longest a vCPU\n\
         was kept out of the guest by a throttle slice or by the pause); *link time* is bytes\n\
         sent divided by the measured link rate. After each move the guest completes a full\n\
         verification pass of its memory and registers on the destination.\n\n\
         QEMU: {}\n\n\
         | write rate | tool | longest guest gap | gap at switch | speed kept | downtime | longest vCPU stall | total time | sent | total / link time | rounds | throttle | guest checks |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        info.markdown(),
        link_bps * 8.0 / 1e6,
        QEMU_GIVE_UP.as_secs(),
        guest::HEARTBEAT_MS,
        felt::AFTERMATH_S,
        felt::BASELINE_S,
        qemu.map_or("not measured".to_string(), |q| q.version_line.clone())
    );
    for f in results {
        if !f.converged {
            md += &format!(
                "| {} | {} | did not converge in {:.0} s | | | | | | | | | | |\n",
                f.rate_label(),
                f.tool,
                f.total_s
            );
            continue;
        }
        md += &format!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1}% | {:.1} ms | {} | {:.2} s | {} MiB | {:.2} | {} | {}% | {} |\n",
            f.rate_label(),
            f.tool,
            f.felt.longest_gap_ms,
            f.felt.switch_gap_ms,
            f.felt.speed_kept * 100.0,
            f.downtime_ms,
            stall_word(f),
            f.total_s,
            f.bytes >> 20,
            f.over_link(link_bps),
            f.rounds,
            f.throttle_percent,
            f.checks_word()
        );
    }
    md += "\n## Targets\n\n";
    for f in results.iter().filter(|f| f.tool.starts_with("tern")) {
        md += &targets(f, results, link_bps);
    }
    md
}

/// The targets of issues 5 and 11 for one tern row, one line each.
fn targets(f: &Figures, results: &[Figures], link_bps: f64) -> String {
    if f.tool.contains("--postcopy") {
        return postcopy_targets(f, link_bps);
    }
    let rate = match f.tool.as_str() {
        "tern" => f.rate_label(),
        _ => format!("{} with the dirty bitmap", f.rate_label()),
    };
    let mut md = String::new();
    let gap = f.felt.longest_gap_ms;
    match f.write_mibps {
        Some(0) | Some(64) => {
            md += &format!(
                "- longest guest gap at {rate}: {gap:.1} ms, target at most 30 ms: {}\n",
                verdict(gap <= 30.0)
            );
            md += &format!(
                "- guest speed kept at {rate}: {:.1}%, target at least 95%: {}\n",
                f.felt.speed_kept * 100.0,
                verdict(f.felt.speed_kept >= 0.95)
            );
        }
        _ => {
            md += &format!(
                "- longest guest gap at {rate} (pre-copy): {gap:.1} ms, target at most 100 ms: {}\n",
                verdict(gap <= 100.0)
            );
        }
    }
    if f.write_mibps == Some(64) {
        md += &format!(
            "- no throttle at {rate}: {}%: {}\n",
            f.throttle_percent,
            verdict(f.throttle_percent == 0)
        );
    }
    let downtime_limit = match f.write_mibps {
        Some(0) => Some(5.0),
        Some(256) => Some(20.0),
        _ => None,
    };
    if let Some(limit) = downtime_limit {
        md += &format!(
            "- downtime at {rate}: {:.1} ms, target under {limit} ms: {}\n",
            f.downtime_ms,
            verdict(f.downtime_ms < limit)
        );
    }
    md += &format!(
        "- total time at {rate}: {:.2}x the link time, target at most 1.3x: {}\n",
        f.over_link(link_bps),
        verdict(f.over_link(link_bps) <= 1.3)
    );
    // The comparison with QEMU is for tern as it comes (the bitmap row is for reference).
    let qemu = results
        .iter()
        .find(|q| !q.tool.starts_with("tern") && q.write_mibps == f.write_mibps);
    if let Some(q) = qemu.filter(|_| f.tool == "tern") {
        if q.converged {
            md += &format!(
                "- longest guest gap at {rate} below QEMU's ({gap:.1} vs {:.1} ms): {}\n",
                q.felt.longest_gap_ms,
                verdict(gap < q.felt.longest_gap_ms)
            );
        } else {
            md += &format!("- at {rate} QEMU did not converge; tern did\n");
        }
    }
    md
}

/// The targets of a `--postcopy` row: the guest's longest gap, and the total time against
/// the time the memory in use takes on the link.
fn postcopy_targets(f: &Figures, link_bps: f64) -> String {
    let rate = f.rate_label();
    let gap = f.felt.longest_gap_ms;
    let memory_time = ((WSS_MIB << 20) as f64) / link_bps;
    let ratio = f.total_s / memory_time;
    format!(
        "- longest guest gap at {rate} with --postcopy: {gap:.1} ms, target at most 100 ms: {}\n\
         - total time at {rate} with --postcopy: {:.2} s, {ratio:.2}x the {WSS_MIB} MiB in use over the link, target at most 1.3x: {}\n",
        verdict(gap <= 100.0),
        f.total_s,
        verdict(ratio <= 1.3)
    )
}

fn encryption_report(costs: &[EncryptionCost]) -> String {
    let Some(first) = costs.first() else {
        return String::new();
    };
    let mut md = format!(
        "\n## Encryption cost\n\n\
         The same guest writing nothing ({WSS_MIB} MiB in use) live-migrated by tern in clear\n\
         (`insecure = true` on both hosts) and over TLS 1.3 (the default), {} runs of each,\n\
         alternated; the rate is guest data per second over the pre-copy rounds. The second link\n\
         is the lab's veth path with the shaping removed: there the CPU, not the link, sets the pace.\n\n\
         | link | plaintext | TLS | TLS / plaintext |\n|---|---:|---:|---:|\n",
        first.runs_each
    );
    for c in costs {
        md += &format!(
            "| {} | {:.0} Mbit/s | {:.0} Mbit/s | {:.1}% |\n",
            c.link,
            c.plaintext_mbit,
            c.tls_mbit,
            c.ratio() * 100.0
        );
    }
    md += &format!(
        "\n- encrypted throughput on the {} link: {:.1}% of plaintext, target at least 90%: {}\n",
        first.link,
        first.ratio() * 100.0,
        verdict(first.ratio() >= 0.9)
    );
    md
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}
