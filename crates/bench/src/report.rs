//! Turning a run into figures: medians per size, the table beside Xen's published figures,
//! a PASS/FAIL line per target of issue 3, and the recorded Markdown and JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use crate::guest;
use crate::machine_info::MachineInfo;
use crate::save_restore::{QemuOutcome, Run, SizeResult};
use crate::stats::{median, median_u64};

/// The commands that produce the recorded results.
pub const COMMANDS: [&str; 2] = [
    "cargo bench -p tern-bench --bench save_restore",
    "scripts/bench",
];

/// Xen's figures from the reference chapter (Table 13.1): guest MiB, file MB (10^6 bytes),
/// save seconds. Xen saves all of a guest's memory.
pub const XEN: [(u64, f64, f64); 3] = [(64, 67.1, 0.859), (128, 134.5, 2.426), (256, 268.7, 4.802)];

/// The targets of issue 3.
const SAVE_GBPS_TARGET: f64 = 2.0;
const RUNNING_MS_TARGET: f64 = 10.0;
const FILE_SLACK_BYTES: i64 = 1 << 20;

/// Medians for one guest size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub mem_mib: u64,
    pub wss_mib: u64,
    pub touched_bytes: u64,
    pub touched_source: String,
    pub file_bytes: u64,
    pub file_minus_touched_bytes: i64,
    /// tern's `write_seconds`: from the save request to the last byte in the page cache.
    pub save_seconds: Option<f64>,
    /// Touched bytes per `save_seconds`, in 10^9 bytes per second.
    pub save_gb_per_s: Option<f64>,
    /// `total_seconds - write_seconds`: fsync and rename.
    pub fsync_seconds: Option<f64>,
    pub save_wall_seconds: Option<f64>,
    pub lazy_running_ms: Option<f64>,
    pub lazy_first_heartbeat_ms: Option<f64>,
    pub lazy_loaded_ms: Option<f64>,
    pub copy_running_ms: Option<f64>,
    pub copy_first_heartbeat_ms: Option<f64>,
    pub qemu_file_bytes: Option<u64>,
    pub qemu_save_seconds: Option<f64>,
    pub qemu_running_ms: Option<f64>,
    pub qemu_first_heartbeat_ms: Option<f64>,
    /// QEMU's count of non-zero pages it saved (its firmware's included), in bytes.
    pub qemu_nonzero_bytes: Option<u64>,
}

impl Summary {
    /// The medians of one size's rounds (saves of both modes count for the save figures).
    pub fn of(r: &SizeResult) -> Summary {
        let (touched, source) = r.touched();
        let all = |f: &dyn Fn(&crate::save_restore::TernRound) -> f64| -> Option<f64> {
            median(&r.tern.iter().map(f).collect::<Vec<_>>())
        };
        let by_mode = |m: &str, f: &dyn Fn(&crate::save_restore::TernRound) -> f64| {
            median(
                &r.tern
                    .iter()
                    .filter(|t| t.mode == m)
                    .map(f)
                    .collect::<Vec<_>>(),
            )
        };
        let file =
            median_u64(&r.tern.iter().map(|t| t.save.file_bytes).collect::<Vec<_>>()).unwrap_or(0);
        let save_seconds = all(&|t| t.save.write_seconds);
        let mut s = Summary {
            mem_mib: r.workload.mem_mib,
            wss_mib: r.workload.wss_mib,
            touched_bytes: touched,
            touched_source: source.into(),
            file_bytes: file,
            file_minus_touched_bytes: file as i64 - touched as i64,
            save_seconds,
            save_gb_per_s: save_seconds.map(|s| touched as f64 / s.max(1e-9) / 1e9),
            fsync_seconds: all(&|t| t.save.total_seconds - t.save.write_seconds),
            save_wall_seconds: all(&|t| t.save_wall_seconds),
            lazy_running_ms: by_mode("lazy", &|t| t.restore.running_after_ms),
            lazy_first_heartbeat_ms: by_mode("lazy", &|t| t.first_heartbeat_ms),
            lazy_loaded_ms: by_mode("lazy", &|t| t.restore.loaded_after_ms),
            copy_running_ms: by_mode("copy", &|t| t.restore.running_after_ms),
            copy_first_heartbeat_ms: by_mode("copy", &|t| t.first_heartbeat_ms),
            ..Summary::default()
        };
        if let QemuOutcome::Measured(rounds) = &r.qemu {
            s.qemu_file_bytes =
                median_u64(&rounds.iter().map(|q| q.save.file_bytes).collect::<Vec<_>>());
            s.qemu_save_seconds =
                median(&rounds.iter().map(|q| q.save.seconds).collect::<Vec<_>>());
            s.qemu_first_heartbeat_ms = median(
                &rounds
                    .iter()
                    .map(|q| q.first_heartbeat_ms)
                    .collect::<Vec<_>>(),
            );
            s.qemu_nonzero_bytes = median_u64(
                &rounds
                    .iter()
                    .map(|q| q.save.normal_pages * 4096)
                    .collect::<Vec<_>>(),
            );
            let running: Vec<f64> = rounds.iter().filter_map(|q| q.running_ms).collect();
            if running.len() == rounds.len() {
                s.qemu_running_ms = median(&running);
            }
        }
        s
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn signed_mib(bytes: i64) -> String {
    format!("{:+.2} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.decimals$}"))
}

/// The results table, in Markdown (also printed as is).
pub fn table(summaries: &[Summary]) -> String {
    let header = [
        "guest RAM",
        "touched",
        "tern file",
        "file-touched",
        "save (s)",
        "save GB/s of touched",
        "+fsync (s)",
        "restore lazy: running (ms)",
        "first heartbeat (ms)",
        "restore copy: first heartbeat (ms)",
        "QEMU file",
        "QEMU save (s)",
        "QEMU restore: first heartbeat (ms)",
    ];
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---:|".repeat(header.len()));
    for s in summaries {
        let cells = [
            format!("{} MiB", s.mem_mib),
            mib(s.touched_bytes),
            mib(s.file_bytes),
            signed_mib(s.file_minus_touched_bytes),
            opt(s.save_seconds, 3),
            opt(s.save_gb_per_s, 2),
            opt(s.fsync_seconds, 3),
            opt(s.lazy_running_ms, 1),
            opt(s.lazy_first_heartbeat_ms, 1),
            opt(s.copy_first_heartbeat_ms, 1),
            s.qemu_file_bytes.map_or_else(|| "–".into(), mib),
            opt(s.qemu_save_seconds, 3),
            opt(s.qemu_first_heartbeat_ms, 1),
        ];
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// Figures behind the main table: where restore time goes, and the wall time of the CLI.
pub fn details_table(summaries: &[Summary]) -> String {
    let header = [
        "guest RAM",
        "tern save wall (s)",
        "lazy: all pages loaded (ms)",
        "copy: running (ms)",
        "QEMU: running (ms)",
        "QEMU non-zero pages",
    ];
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---:|".repeat(header.len()));
    for s in summaries {
        let cells = [
            format!("{} MiB", s.mem_mib),
            opt(s.save_wall_seconds, 3),
            opt(s.lazy_loaded_ms, 1),
            opt(s.copy_running_ms, 1),
            opt(s.qemu_running_ms, 1),
            s.qemu_nonzero_bytes.map_or_else(|| "–".into(), mib),
        ];
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// Xen's figures and how tern's saves of the same sizes compare.
pub fn xen_lines(summaries: &[Summary]) -> String {
    let xen: Vec<String> = XEN
        .iter()
        .map(|(m, mb, s)| format!("{m} MiB: {mb} MB file, {s} s ({:.0} MB/s)", mb / s))
        .collect();
    let mut out = format!(
        "Xen (reference chapter, Table 13.1; it saves all guest memory): {}\n",
        xen.join("; ")
    );
    let vs: Vec<String> = XEN
        .iter()
        .filter_map(|(m, mb, xs)| {
            let s = summaries.iter().find(|s| s.mem_mib == *m)?;
            let ts = s.save_seconds?;
            Some(format!(
                "{m} MiB: {ts:.3} s vs {xs} s ({:.0}x faster), file {} vs {mb} MB",
                xs / ts.max(1e-9),
                mib(s.file_bytes)
            ))
        })
        .collect();
    if !vs.is_empty() {
        out += &format!("tern's saves of the same guests: {}\n", vs.join("; "));
    }
    out
}

/// One target of issue 3 and whether every size met it (None: could not be judged).
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub pass: Option<bool>,
    pub detail: String,
}

impl Target {
    fn line(&self) -> String {
        let verdict = match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "SKIP",
        };
        format!("{verdict}  {}: {}", self.name, self.detail)
    }
}

/// Judges one target over all sizes: `value` gives a size's figure (None: not measured),
/// `ok` whether it meets the target.
fn judge(
    name: &str,
    summaries: &[Summary],
    value: impl Fn(&Summary) -> Option<(f64, String)>,
    ok: impl Fn(f64) -> bool,
) -> Target {
    let figures: Vec<(bool, String)> = summaries
        .iter()
        .filter_map(|s| {
            let (v, shown) = value(s)?;
            Some((ok(v), format!("{} MiB {shown}", s.mem_mib)))
        })
        .collect();
    let pass = if figures.is_empty() {
        None
    } else {
        Some(figures.iter().all(|(p, _)| *p))
    };
    let detail = figures
        .iter()
        .map(|(p, f)| {
            if *p {
                f.clone()
            } else {
                format!("{f} (missed)")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    Target {
        name: name.into(),
        pass,
        detail: if detail.is_empty() {
            "not measured".into()
        } else {
            detail
        },
    }
}

/// The four targets of issue 3.
pub fn targets(summaries: &[Summary]) -> Vec<Target> {
    vec![
        judge(
            "save >= 2 GB/s of touched memory (file in the page cache)",
            summaries,
            |s| s.save_gb_per_s.map(|v| (v, format!("{v:.2} GB/s"))),
            |v| v >= SAVE_GBPS_TARGET,
        ),
        judge(
            "lazy restore: guest running < 10 ms (guest process start to vCPUs running)",
            summaries,
            |s| {
                let r = s.lazy_running_ms?;
                let hb = opt(s.lazy_first_heartbeat_ms, 1);
                Some((
                    r,
                    format!("{r:.1} ms (first heartbeat {hb} ms after spawning `tern restore`)"),
                ))
            },
            |v| v < RUNNING_MS_TARGET,
        ),
        judge(
            "file within 1 MiB of the memory the guest touched",
            summaries,
            |s| {
                let d = s.file_minus_touched_bytes;
                Some((d as f64, signed_mib(d)))
            },
            |v| v.abs() <= FILE_SLACK_BYTES as f64,
        ),
        judge(
            "tern restore faster than QEMU's (first heartbeat; `tern restore` is lazy by default, --copy shown)",
            summaries,
            |s| {
                let q = s.qemu_first_heartbeat_ms?;
                let lazy = s.lazy_first_heartbeat_ms?;
                let copy = opt(s.copy_first_heartbeat_ms, 1);
                Some((
                    lazy - q,
                    format!("{lazy:.1} ms vs QEMU {q:.1} ms (--copy {copy} ms)"),
                ))
            },
            |d| d < 0.0,
        ),
    ]
}

/// Everything printed and recorded about a run.
pub struct Report {
    pub info: MachineInfo,
    pub summaries: Vec<Summary>,
    pub targets: Vec<Target>,
    pub qemu_line: String,
}

impl Report {
    pub fn new(run: &Run, info: MachineInfo) -> Report {
        let summaries: Vec<Summary> = run.sizes.iter().map(Summary::of).collect();
        let targets = targets(&summaries);
        let qemu_line = match &run.qemu {
            Ok(q) => format!("QEMU: {} ({})", q.version_line, q.binary.display()),
            Err(why) => format!("QEMU: not available ({why})"),
        };
        Report {
            info,
            summaries,
            targets,
            qemu_line,
        }
    }

    /// What the benchmark prints: the table, Xen's figures, QEMU's version, the targets.
    pub fn text(&self) -> String {
        let mut out = table(&self.summaries);
        out += "\n";
        out += &details_table(&self.summaries);
        out += "\n";
        out += &xen_lines(&self.summaries);
        out += &self.qemu_line;
        out += "\n\n";
        for t in &self.targets {
            out += &t.line();
            out += "\n";
        }
        out
    }

    /// The recorded Markdown page.
    pub fn markdown(&self, run: &Run) -> String {
        let i = &self.info;
        let mut md = String::from("# Save/restore benchmark (issue 3)\n\n");
        let _ = writeln!(
            md,
            "Measured on {} by `{}` (all benchmarks: `{}`).\n",
            i.date, COMMANDS[0], COMMANDS[1]
        );
        let _ = writeln!(
            md,
            "Machine: {} cores, {}, Linux {} (load average at start: {}). tern {}. {}.\n",
            i.cores, i.cpu_model, i.kernel, i.load_at_start, i.tern_commit, self.qemu_line
        );
        md += &method(run);
        md += "\n## Results (medians)\n\n";
        md += &table(&self.summaries);
        md += "\n";
        md += &details_table(&self.summaries);
        md += "\n";
        for l in xen_lines(&self.summaries).lines() {
            let _ = writeln!(md, "{l}\n");
        }
        md += "## Targets\n\n";
        for t in &self.targets {
            let _ = writeln!(md, "- {}", t.line());
        }
        md += "\nEvery round's raw figures: [save-restore.json](save-restore.json).\n";
        md
    }

    /// The recorded JSON: every round, the medians and the verdicts.
    pub fn json(&self, run: &Run) -> serde_json::Value {
        let qemu = match &run.qemu {
            Ok(q) => json!({ "version": q.version_line, "binary": q.binary }),
            Err(why) => json!({ "not_available": why }),
        };
        json!({
            "benchmark": "save-restore",
            "commands": COMMANDS,
            "machine": self.info,
            "qemu": qemu,
            "reps": run.config.reps,
            "workload": {
                "vcpus": 1,
                "working_set": "half the guest's memory",
                "heartbeat_ms": guest::HEARTBEAT_MS,
                "write_mibps": guest::WRITE_MIBPS,
                "verify_mibps": guest::VERIFY_MIBPS,
            },
            "xen_reference": XEN.iter().map(|(m, mb, s)| json!({"mem_mib": m, "file_mb": mb, "save_seconds": s})).collect::<Vec<_>>(),
            "summaries": self.summaries,
            "targets": self.targets,
            "rounds": run.sizes,
        })
    }

    /// Writes `save-restore.md` and `save-restore.json` into `dir`.
    pub fn record(&self, run: &Run, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("save-restore.md"), self.markdown(run))?;
        let json = serde_json::to_string_pretty(&self.json(run))?;
        std::fs::write(dir.join("save-restore.json"), json + "\n")?;
        Ok(())
    }
}

/// How the figures were taken, for the Markdown page.
fn method(run: &Run) -> String {
    format!(
        "## Method\n\n\
- Guest: tern's test guest, 1 vCPU, working set of half its memory \
(`heartbeat_ms={hb} write_mibps={w} verify_ms=<pass of {v} MiB/s>`), booted and left until \
it has written every working-set page once. {reps} repetitions of each measurement; medians.\n\
- touched: the guest's non-zero RAM pages, read from the host through the guest process's \
memfd with the guest paused just before each save.\n\
- tern: `tern save NAME FILE --json` (save = its `write_seconds`, from the request to the \
last byte in the page cache; +fsync = `total_seconds - write_seconds`), then `tern restore \
FILE --json` (lazy) or `--copy`; running = its `running_after_ms` (guest process start to \
vCPUs running); first heartbeat = from just before spawning `tern restore` to the host \
timestamp of the restored guest's first heartbeat line (`tern console --dump --timestamps`). \
Each save is of the guest the previous restore brought back.\n\
- first heartbeat includes up to one heartbeat period ({hb} ms) of the guest's own rhythm: \
its clock continues from the save, so its next heartbeat is due up to one period after it runs \
again. The period cannot be 1 ms on this machine: KVM emulates `rep outsb` one byte per exit \
to the VMM, so one heartbeat line costs the guest about 3.7 ms of exits.\n\
- QEMU: the same guest ELF booted with `-machine pc,pit=off,hpet=off,max-ram-below-4g=3G \
-cpu host,-vmx,-svm,-arch-capabilities -smp 1 -kernel … -append …`; QMP `stop`, then \
`migrate` to the file (uncapped bandwidth) until `query-migrate` completes; restore = a new \
QEMU with `-incoming`, from just before spawning it to the first heartbeat line on its serial.\n\
- Files are in the page cache (nothing drops caches). Every restore is checked by the \
guest itself: heartbeats continue in sequence and a whole verification pass of the working \
set after the restore finds no mismatch; a broken restore fails the benchmark.\n",
        hb = guest::HEARTBEAT_MS,
        w = guest::WRITE_MIBPS,
        v = guest::VERIFY_MIBPS,
        reps = run.config.reps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(mem: u64) -> Summary {
        Summary {
            mem_mib: mem,
            wss_mib: mem / 2,
            touched_bytes: (mem / 2) << 20,
            touched_source: "measured".into(),
            file_bytes: ((mem / 2) << 20) + 4096,
            file_minus_touched_bytes: 4096,
            save_seconds: Some(0.01),
            save_gb_per_s: Some(3.3),
            fsync_seconds: Some(0.1),
            lazy_running_ms: Some(4.0),
            lazy_first_heartbeat_ms: Some(20.0),
            copy_first_heartbeat_ms: Some(30.0),
            qemu_first_heartbeat_ms: Some(300.0),
            ..Summary::default()
        }
    }

    #[test]
    fn table_has_a_row_per_size() {
        let t = table(&[summary(64), summary(128)]);
        assert_eq!(t.lines().count(), 4);
        assert!(t.starts_with("| guest RAM | touched | tern file |"));
        assert!(t.contains("| 64 MiB | 32.0 MiB | 32.0 MiB | +0.00 MiB |"));
    }

    #[test]
    fn targets_pass_and_fail() {
        let mut slow = summary(256);
        slow.save_gb_per_s = Some(1.0);
        slow.qemu_first_heartbeat_ms = None;
        let t = targets(&[summary(64), slow]);
        assert_eq!(t[0].pass, Some(false));
        assert!(t[0].detail.contains("256 MiB 1.00 GB/s (missed)"));
        assert_eq!(t[1].pass, Some(true));
        assert_eq!(t[2].pass, Some(true));
        assert_eq!(t[3].pass, Some(true));
        let none = targets(&[Summary {
            qemu_first_heartbeat_ms: None,
            ..summary(64)
        }]);
        assert_eq!(none[3].pass, None);
    }

    #[test]
    fn xen_comparison() {
        let x = xen_lines(&[summary(64)]);
        assert!(x.contains("64 MiB: 67.1 MB file, 0.859 s (78 MB/s)"));
        assert!(x.contains("64 MiB: 0.010 s vs 0.859 s (86x faster)"));
    }
}
