//! The previous release of tern, which this build must stay compatible with: it restores that
//! release's checkpoints and accepts guests migrated from it. This is the one place that names
//! the release's commit; releases are also tagged (`v0.1.0`, ...) in the repository.
//!
//! Moving to a new release: set [`PREVIOUS`] to the release just made, write its fixtures with
//! `scripts/release-fixture` using that release's build, on an Intel and an AMD host, and
//! commit them under `tests/fixtures/` as `tern-<version>.<CPU vendor>.tern`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A release of tern: its version and the commit it was built from.
#[derive(Clone, Copy, Debug)]
pub struct Release {
    pub version: &'static str,
    pub commit: &'static str,
}

/// The release before this build.
pub const PREVIOUS: Release = Release {
    version: "0.1.0",
    commit: "6704a6f79aad5d5c51bb50bb07b98092c637999f",
};

/// How long building a release from scratch may take (a cold build on two cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// This host's CPU vendor (`GenuineIntel`, `AuthenticAMD`), as /proc/cpuinfo says.
pub fn cpu_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("vendor_id"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The repository's root (this crate lives in `crates/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Release {
    /// The checkpoint this release wrote (see `scripts/release-fixture`) on a host of this
    /// host's CPU vendor: a guest keeps the CPU features it was started with, and the other
    /// vendor's host lacks some of them (a restore there is refused, rightly).
    pub fn fixture(&self) -> PathBuf {
        repo_root().join("tests/fixtures").join(format!(
            "tern-{}.{}.tern",
            self.version,
            cpu_vendor()
        ))
    }

    /// Builds this release's `tern` from the repository's own history (once; later calls
    /// reuse the build) and returns the executable. Takes minutes the first time.
    pub fn build(&self) -> anyhow::Result<PathBuf> {
        let root = repo_root();
        let dir = root.join("target/releases").join(self.version);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let _lock = BuildLock::take(&dir.join(".lock"))?;
        let tern = dir.join("target/debug/tern");
        let stamp = dir.join("built-from");
        let built = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == self.commit);
        if built && tern.exists() {
            return Ok(tern);
        }
        let src = dir.join("src");
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src)?;
        self.export_source(&root, &src)?;
        crate::run_within(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--quiet", "-p", "tern", "--target-dir"])
                .arg(dir.join("target"))
                .current_dir(&src)
                .env_remove("CARGO_TARGET_DIR")
                .stdin(Stdio::null()),
            BUILD_TIMEOUT,
        )
        .with_context(|| format!("cannot build tern {}", self.version))?;
        std::fs::write(&stamp, self.commit)?;
        Ok(tern)
    }

    /// Writes the release's source tree into `src` with `git archive`.
    fn export_source(&self, root: &Path, src: &Path) -> anyhow::Result<()> {
        let archive = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["archive", "--format=tar", self.commit])
            .stderr(Stdio::piped())
            .output()
            .context("cannot run git")?;
        if !archive.status.success() {
            bail!(
                "the repository's history lacks tern {}'s commit {} (a shallow clone?): {}",
                self.version,
                self.commit,
                String::from_utf8_lossy(&archive.stderr).trim()
            );
        }
        let mut tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(src)
            .stdin(Stdio::piped())
            .spawn()
            .context("cannot run tar")?;
        {
            use std::io::Write;
            let mut input = tar.stdin.take().context("tar's input")?;
            input.write_all(&archive.stdout)?;
        }
        if !tar.wait()?.success() {
            bail!("cannot unpack tern {}'s source", self.version);
        }
        Ok(())
    }
}

/// Keeps two tests from building the same release at once.
struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    fn take(path: &Path) -> anyhow::Result<BuildLock> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}", path.display());
        }
        Ok(BuildLock { _file: file })
    }
}
