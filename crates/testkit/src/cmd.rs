//! Running helper programs (`ip`, `ping`, `apt-get`) with a bound on how long they may take,
//! and installing the Debian packages that provide them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long one `ip` invocation may take.
pub(crate) const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `cmd` (stdin from /dev/null, output captured) and waits at most `timeout`; on timeout
/// the process is killed and an error returned.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    // Read both pipes on threads so a chatty program cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`output_within`], but a non-zero exit is an error carrying the program's stderr;
/// returns stdout.
pub fn run_within(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let out = output_within(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`, which must succeed; its stdout.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_within(Command::new("ip").args(args), IP_TIMEOUT)
}

/// `program arg…` as one line, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where `program` is: searched in `$PATH` and the sbin directories (root's tools live there
/// and a test's `$PATH` may lack them).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure `program` exists, installing Debian `package` with apt-get if it does not (as
/// root; `scripts/install-deps` does the same for a whole test run). Serialised within the
/// process; apt's own lock serialises processes.
pub fn ensure_program(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    static APT: Mutex<()> = Mutex::new(());
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    let _guard = APT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{program} is missing; install the Debian package {package}");
    }
    let install = || {
        run_within(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(600),
        )
    };
    if install().is_err() {
        // The package lists may be missing or stale on a fresh machine.
        run_within(
            Command::new("apt-get").args(["update", "-qq"]),
            Duration::from_secs(600),
        )?;
        install().with_context(|| format!("cannot install {package} (for {program})"))?;
    }
    find_program(program)
        .with_context(|| format!("{package} is installed but {program} is still not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_commands_report_output_failure_and_timeout() {
        let out = run_within(
            Command::new("sh").args(["-c", "echo hi; echo err >&2"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out, "hi\n");
        let err = run_within(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("oops"), "{err:#}");
        let start = Instant::now();
        let err =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-tern").is_none());
    }
}
