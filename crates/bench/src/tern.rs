//! Driving the real tern: a `tern daemon` with its own socket and state directory, and the
//! `tern` CLI with `--json` for figures. The benchmark measures what a user runs.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
pub use tern_testkit::TernHost;

use crate::guest::{self, Console, Stamped, Workload};

pub use tern_testkit::find_tern;

/// What `tern save --json` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SaveSummary {
    pub file_bytes: u64,
    pub memory_bytes: u64,
    pub pages_stored: u64,
    pub write_seconds: f64,
    pub total_seconds: f64,
}

/// What `tern restore --json` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub mode: String,
    pub running_after_ms: f64,
    pub loaded_after_ms: f64,
    pub pages_loaded: u64,
}

/// The benchmark's uses of a test host.
pub trait BenchHost {
    fn create(&self, name: &str, w: &Workload) -> anyhow::Result<()>;
    fn guest_console<'a>(&'a self, name: &'a str) -> TernConsole<'a>;
    fn save(&self, name: &str, file: &Path) -> anyhow::Result<(SaveSummary, f64)>;
    fn restore(&self, file: &Path, copy: bool) -> anyhow::Result<(RestoreSummary, f64, f64)>;
}

impl BenchHost for TernHost {
    /// Creates the test guest `name` with workload `w` (1 vCPU) and waits for its first
    /// heartbeat.
    fn create(&self, name: &str, w: &Workload) -> anyhow::Result<()> {
        let cfg = self.dir().join(format!("{name}.cfg"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\nmemory = {}\nvcpus = 1\nkernel = \"{}\"\nextra = \"{}\"\n",
                w.mem_mib,
                tern_testguest::path().display(),
                w.cmdline()
            ),
        )?;
        self.run(&["create", path_str(&cfg)?])?;
        guest::first_beat(&self.guest_console(name))?;
        Ok(())
    }

    /// A guest's console, read through `tern console --dump --timestamps`.
    fn guest_console<'a>(&'a self, name: &'a str) -> TernConsole<'a> {
        TernConsole { host: self, name }
    }

    /// `tern save NAME FILE --json`, with the wall time of the whole command.
    fn save(&self, name: &str, file: &Path) -> anyhow::Result<(SaveSummary, f64)> {
        let t = Instant::now();
        let out = self.run(&["save", name, path_str(file)?, "--json"])?;
        let wall = t.elapsed().as_secs_f64();
        let summary = serde_json::from_str(out.trim())
            .with_context(|| format!("tern save --json printed {out:?}"))?;
        Ok((summary, wall))
    }

    /// `tern restore FILE --json [--copy]`; also returns the host time just before the CLI
    /// was spawned, the start of "restore until the next heartbeat", and the CLI's wall time.
    fn restore(&self, file: &Path, copy: bool) -> anyhow::Result<(RestoreSummary, f64, f64)> {
        let mut args = vec!["restore", path_str(file)?, "--json"];
        if copy {
            args.push("--copy");
        }
        let started = crate::unix_now();
        let t = Instant::now();
        let out = self.run(&args)?;
        let wall = t.elapsed().as_secs_f64();
        let summary = serde_json::from_str(out.trim())
            .with_context(|| format!("tern restore --json printed {out:?}"))?;
        Ok((summary, started, wall))
    }
}

use tern_testkit::{complete_lines, path_arg as path_str};

/// The console of one tern guest.
pub struct TernConsole<'a> {
    host: &'a TernHost,
    name: &'a str,
}

impl Console for TernConsole<'_> {
    fn lines(&self) -> anyhow::Result<Vec<Stamped>> {
        let out = self
            .host
            .run(&["console", self.name, "--dump", "--timestamps"])?;
        Ok(complete_lines(&out)
            .filter_map(Stamped::parse_timestamped)
            .collect())
    }
}
