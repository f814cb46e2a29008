//! The save/restore benchmark of issue 3: `cargo bench -p tern-bench --bench save_restore`
//! (or `scripts/bench`, which also builds tern and installs QEMU). Prints tern's figures
//! beside QEMU's and Xen's published ones, a PASS/FAIL line per target, and records the
//! full run in `benchmarks/save-restore.{md,json}`.
//!
//! A missed target is reported, not an error; a guest that a restore broke is an error (exit
//! status 1), since its figures would mean nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use tern_bench::machine_info::MachineInfo;
use tern_bench::report::Report;
use tern_bench::save_restore::{self, Config};

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let info = MachineInfo::collect(&repo);
    let run = save_restore::run(config)?;
    let report = Report::new(&run, info);
    println!("{}", report.text());
    let record = std::env::var("TERN_BENCH_RECORD").map_or(true, |v| v != "off");
    if run.config.is_full() && record {
        let dir = repo.join("benchmarks");
        report.record(&run, &dir)?;
        println!("Recorded in benchmarks/save-restore.md and benchmarks/save-restore.json");
    } else {
        println!("(a partial run: not recorded)");
    }
    Ok(())
}
