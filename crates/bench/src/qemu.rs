//! The same test guest under QEMU with KVM, saved with `migrate` to a file and restored with
//! `-incoming`, as a QEMU user would do it.
//!
//! QEMU boots the test guest's ELF directly (it has a PVH note) through SeaBIOS and the PVH
//! option ROM. The machine options are what the test guest needs on QEMU, each for a reason:
//! * `pc,pit=off,hpet=off`: SeaBIOS leaves the i8254 PIT ticking through the i8259 PIC on
//!   vector 8; the test guest, which never touches a PIC, takes that as a double fault
//!   (`EXCEPTION vector=8`). Without a PIT nothing ticks. SeaBIOS puts the ACPI PM1 block at
//!   0x600 (the guest polls its power button there), as on tern.
//! * `max-ram-below-4g=3G`: the same RAM below 4 GiB as tern (3 GiB), so that a 4 GiB guest's
//!   2 GiB working set fits above the image on both (q35 would leave only 2 GiB).
//! * `-cpu host,-vmx,-svm,-arch-capabilities`: this machine's nested KVM refuses to set
//!   IA32_ARCH_CAPABILITIES (QEMU aborts at start) and cannot save nested state.
//! * A guest with a disk runs on `microvm` instead (`auto-kernel-cmdline=on,acpi=off`, so that
//!   the command line names its virtio-mmio devices, the only transport the test guest has;
//!   see docs/test-guest.md): its disk is [`disk_args`], node `d0`.
//! * `migration.store-global-state=off`: the guest is stopped before the migration (a save);
//!   without the stored run state the destination starts the guest as soon as it is loaded,
//!   like `tern restore` and `xm restore`, with no `cont` round trip to measure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::guest::{self, Console, Stamped, Workload};
use crate::qmp::Qmp;

/// An installed QEMU.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: PathBuf,
    /// (major, minor, micro)
    pub version: (u32, u32, u32),
    /// The first line of `--version`.
    pub version_line: String,
}

/// The QEMU a benchmark puts beside tern: none with `TERN_BENCH_QEMU=off`, or when none can
/// run here (said on stderr).
pub fn unless_off() -> Option<Qemu> {
    if std::env::var("TERN_BENCH_QEMU").as_deref() == Ok("off") {
        return None;
    }
    match detect() {
        Ok(q) => Some(q),
        Err(why) => {
            eprintln!("warning: QEMU left out: {why}");
            None
        }
    }
}

/// Finds `qemu-system-x86_64` (or `$TERN_BENCH_QEMU`) and checks it can use KVM; the reason
/// when it cannot.
pub fn detect() -> Result<Qemu, String> {
    let binary = match std::env::var_os("TERN_BENCH_QEMU") {
        Some(b) => PathBuf::from(b),
        None => find_in_path("qemu-system-x86_64").ok_or_else(|| {
            "qemu-system-x86_64 is not installed (scripts/bench installs Debian's qemu-system-x86)"
                .to_string()
        })?,
    };
    let out = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version_line = text.lines().next().unwrap_or_default().to_string();
    let version = parse_version(&version_line)
        .ok_or_else(|| format!("cannot read QEMU's version from {version_line:?}"))?;
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm is not usable".into());
    }
    Ok(Qemu {
        binary,
        version,
        version_line,
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `QEMU emulator version 7.2.22 (Debian …)` → (7, 2, 22).
pub fn parse_version(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let number = rest.split_whitespace().next()?;
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

impl Qemu {
    /// QEMU 8.2 added the `file:` migration transport; older ones pipe through `cat`.
    fn has_file_transport(&self) -> bool {
        self.version >= (8, 2, 0)
    }

    /// Migration URI that writes the stream to `file`.
    pub fn save_uri(&self, file: &Path) -> anyhow::Result<String> {
        let path = shell_safe(file)?;
        Ok(if self.has_file_transport() {
            format!("file:{path}")
        } else {
            format!("exec:cat > '{path}'")
        })
    }

    /// Migration URI that reads the stream from `file`.
    pub fn restore_uri(&self, file: &Path) -> anyhow::Result<String> {
        let path = shell_safe(file)?;
        Ok(if self.has_file_transport() {
            format!("file:{path}")
        } else {
            format!("exec:cat '{path}'")
        })
    }

    /// Arguments that make QEMU run the test guest with workload `w` (see the module doc for
    /// why each is there).
    fn args(&self, w: &Workload, qmp: &Path) -> anyhow::Result<Vec<String>> {
        let qmp = qmp.to_str().context("QMP socket path is not UTF-8")?;
        let kernel = tern_testguest::path()
            .to_str()
            .context("test guest path is not UTF-8")?;
        // A guest with a disk needs virtio-mmio, which only `microvm` has (see the module doc).
        let machine = if w.disk.is_some() {
            "microvm,auto-kernel-cmdline=on,rtc=off,pit=off,pic=off,acpi=off"
        } else {
            "pc,pit=off,hpet=off,max-ram-below-4g=3G"
        };
        let args = [
            "-name",
            "tern-bench",
            "-accel",
            "kvm",
            "-machine",
            machine,
            "-cpu",
            "host,-vmx,-svm,-arch-capabilities",
            "-m",
            &w.mem_mib.to_string(),
            "-smp",
            &w.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
            kernel,
            "-append",
            &w.cmdline(),
            "-qmp",
            &format!("unix:{qmp},server=on,wait=off"),
            "-global",
            "migration.store-global-state=off",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if w.disk.is_some() {
            args.extend(
                ["-global", "virtio-mmio.force-legacy=false"]
                    .iter()
                    .map(|s| s.to_string()),
            );
        }
        Ok(args)
    }

    /// Spawns QEMU (with `extra` arguments) and starts collecting its serial output.
    fn spawn(&self, w: &Workload, dir: &Path, extra: &[String]) -> anyhow::Result<QemuGuest> {
        self.spawn_in(w, dir, extra, None)
    }

    /// [`Qemu::spawn`] inside network namespace `netns` (a lab host), if given.
    pub fn spawn_in(
        &self,
        w: &Workload,
        dir: &Path,
        extra: &[String],
        netns: Option<&str>,
    ) -> anyhow::Result<QemuGuest> {
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let stderr = std::fs::File::create(dir.join("qemu.stderr"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args(w, &qmp_path)?)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Some(ns) = netns {
            tern_testkit::enter_netns(&mut cmd, ns)?;
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = child
            .stdout
            .take()
            .map(|out| spawn_reader(out, Arc::clone(&lines)));
        let mut guest = QemuGuest {
            child,
            qmp: None,
            lines,
            reader,
            stderr_path: dir.join("qemu.stderr"),
        };
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20))
            .with_context(|| guest.stderr_tail())?;
        guest.qmp = Some(qmp);
        Ok(guest)
    }

    /// Boots the test guest and waits for its first heartbeat.
    pub fn boot(&self, w: &Workload, dir: &Path) -> anyhow::Result<QemuGuest> {
        let guest = self.spawn(w, dir, &[])?;
        guest::first_beat(&guest).with_context(|| guest.stderr_tail())?;
        Ok(guest)
    }

    /// Starts a new QEMU that loads `file` (`-incoming`) and runs the guest once loaded.
    /// Returns it and the host time just before it was spawned.
    pub fn restore(
        &self,
        w: &Workload,
        dir: &Path,
        file: &Path,
    ) -> anyhow::Result<(QemuGuest, f64)> {
        let started = crate::unix_now();
        let guest = self.spawn(w, dir, &["-incoming".into(), self.restore_uri(file)?])?;
        Ok((guest, started))
    }
}

/// The arguments that give a (microvm) guest the raw image `image` as its virtio-blk disk,
/// block node `d0`.
pub fn disk_args(image: &Path) -> anyhow::Result<Vec<String>> {
    let image = image.to_str().context("image path is not UTF-8")?;
    Ok(vec![
        "-blockdev".into(),
        format!("driver=file,filename={image},node-name=f0,cache.direct=on,aio=threads"),
        "-blockdev".into(),
        "driver=raw,file=f0,node-name=d0".into(),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
    ])
}

/// The path, refused if it could break out of the single quotes of an `exec:` command.
fn shell_safe(p: &Path) -> anyhow::Result<&str> {
    let s = p.to_str().context("path is not UTF-8")?;
    if s.contains('\'') {
        bail!("path {s:?} contains a quote");
    }
    Ok(s)
}

/// Collects QEMU's serial output line by line, stamping each with the host time its first
/// byte arrived: the way tern's console log stamps lines, so that both tools' heartbeats are
/// timed alike.
fn spawn_reader(mut out: ChildStdout, lines: Arc<Mutex<Vec<Stamped>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut line: Vec<u8> = Vec::new();
        let mut started = 0.0;
        loop {
            let n = match out.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let at = crate::unix_now();
            for &b in &chunk[..n] {
                if line.is_empty() {
                    started = at;
                }
                line.push(b);
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    line.clear();
                    if let Ok(mut l) = lines.lock() {
                        l.push(Stamped {
                            at: started,
                            line: text,
                        });
                    }
                }
            }
        }
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Ok(mut l) = lines.lock() {
                l.push(Stamped {
                    at: started,
                    line: text,
                });
            }
        }
    })
}

/// Figures of one QEMU save.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QemuSave {
    /// Wall time from the `migrate` command to `query-migrate` reporting it completed.
    pub seconds: f64,
    /// QEMU's own `total-time`, ms.
    pub qemu_total_ms: u64,
    pub file_bytes: u64,
    /// Pages QEMU found not all zero (its `ram.normal`).
    pub normal_pages: u64,
    /// Pages QEMU found all zero (its `ram.duplicate`).
    pub zero_pages: u64,
}

/// One running QEMU.
pub struct QemuGuest {
    child: Child,
    qmp: Option<Qmp>,
    lines: Arc<Mutex<Vec<Stamped>>>,
    reader: Option<JoinHandle<()>>,
    stderr_path: PathBuf,
}

impl Console for QemuGuest {
    fn lines(&self) -> anyhow::Result<Vec<Stamped>> {
        if self.exited() {
            bail!("QEMU exited; {}", self.stderr_tail());
        }
        let lines = self
            .lines
            .lock()
            .map_err(|_| anyhow::anyhow!("serial reader panicked"))?;
        Ok(lines.clone())
    }
}

impl QemuGuest {
    fn qmp(&mut self) -> anyhow::Result<&mut Qmp> {
        self.qmp.as_mut().context("QMP is not connected")
    }

    /// True once the QEMU process has ended (a zombie or gone). Read from /proc: `try_wait`
    /// needs `&mut self`, and the console is read through `&self`.
    fn exited(&self) -> bool {
        let pid = self.child.id();
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    /// QEMU's stderr so far, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!("QEMU stderr: {}", text.trim())
    }

    /// Host time at which QEMU reported the guest running (its RESUME event), if seen.
    pub fn resumed_at(&mut self) -> anyhow::Result<Option<f64>> {
        self.qmp()?.execute("query-status", None)?;
        Ok(self.qmp()?.event_time("RESUME"))
    }

    /// Stops the guest's vCPUs (as tern's save does first).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.qmp()?.execute("stop", None)?;
        Ok(())
    }

    /// Migrates the stopped guest to `uri` and waits until QEMU reports it completed.
    pub fn save(&mut self, uri: &str, file: &Path) -> anyhow::Result<QemuSave> {
        // QEMU caps migration bandwidth (128 MiB/s by default): uncapped, as a save should be.
        self.qmp()?.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40 })),
        )?;
        let t = Instant::now();
        self.qmp()?
            .execute("migrate", Some(json!({ "uri": uri })))?;
        let status = self.wait_migrated(Duration::from_millis(1))?;
        let seconds = t.elapsed().as_secs_f64();
        Ok(QemuSave {
            seconds,
            qemu_total_ms: status["total-time"].as_u64().unwrap_or(0),
            file_bytes: settled_size(file)?,
            normal_pages: status["ram"]["normal"].as_u64().unwrap_or(0),
            zero_pages: status["ram"]["duplicate"].as_u64().unwrap_or(0),
        })
    }

    /// Live-migrates the running guest to `uri` as the benchmark asks of both tools: a
    /// downtime limit of `downtime_ms`, no bandwidth cap, auto-converge on. Waits until QEMU
    /// reports it completed: the figures of `query-migrate`, the seconds it took and the host
    /// time of the STOP event (the guest paused here). A migration still running after
    /// `give_up` is cancelled (the guest runs on here) and None is returned: it did not
    /// converge.
    pub fn migrate_live(
        &mut self,
        uri: &str,
        downtime_ms: u64,
        give_up: Duration,
    ) -> anyhow::Result<Option<(serde_json::Value, f64, f64)>> {
        self.migrate_live_then(uri, downtime_ms, give_up, false)
    }

    /// [`QemuGuest::migrate_live`] of a guest whose disk is being mirrored: the migration
    /// stops before the switchover (the guest paused), the mirror is ended there (its last
    /// writes reach the target), and the migration completes: as libvirt does with
    /// `pause-before-switchover`. (Ending the mirror after the migration completed writes to
    /// a disk QEMU has handed over: QEMU 7.2 aborts.)
    pub fn migrate_live_with_mirror(
        &mut self,
        uri: &str,
        downtime_ms: u64,
        give_up: Duration,
    ) -> anyhow::Result<Option<(serde_json::Value, f64, f64)>> {
        self.migrate_live_then(uri, downtime_ms, give_up, true)
    }

    fn migrate_live_then(
        &mut self,
        uri: &str,
        downtime_ms: u64,
        give_up: Duration,
        mirror: bool,
    ) -> anyhow::Result<Option<(serde_json::Value, f64, f64)>> {
        let qmp = self.qmp()?;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "auto-converge", "state": true },
                { "capability": "events", "state": true },
                { "capability": "pause-before-switchover", "state": mirror }
            ]})),
        )?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": downtime_ms })),
        )?;
        let t = Instant::now();
        qmp.execute("migrate", Some(json!({ "uri": uri })))?;
        let status = loop {
            let s = self.qmp()?.execute("query-migrate", None)?;
            match s["status"].as_str() {
                Some("completed") => break s,
                Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {s}"),
                Some("pre-switchover") => {
                    self.finish_mirror()?;
                    self.qmp()?.execute(
                        "migrate-continue",
                        Some(json!({ "state": "pre-switchover" })),
                    )?;
                }
                _ => {}
            }
            if t.elapsed() > give_up {
                self.qmp()?.execute("migrate_cancel", None)?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let seconds = t.elapsed().as_secs_f64();
        let stopped = self
            .qmp()?
            .event_time("STOP")
            .context("QEMU sent no STOP event")?;
        Ok(Some((status, seconds, stopped)))
    }

    /// Exports the guest's disk (node `d0`) writable over NBD at `host:port`, as a mirror's
    /// target (the destination of a migration with its disk).
    pub fn export_disk(&mut self, host: &str, port: u16) -> anyhow::Result<()> {
        let qmp = self.qmp()?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "inet",
                "data": { "host": host, "port": port.to_string() } } })),
        )?;
        qmp.execute(
            "block-export-add",
            Some(
                json!({ "type": "nbd", "id": "e0", "node-name": "d0", "name": "d0",
                "writable": true }),
            ),
        )?;
        Ok(())
    }

    /// Mirrors the guest's disk (node `d0`) to the NBD export `d0` at `host:port` and waits
    /// until the mirror is in sync (its job is ready); the seconds that took.
    pub fn mirror_disk(&mut self, host: &str, port: u16) -> anyhow::Result<f64> {
        let t = Instant::now();
        let qmp = self.qmp()?;
        qmp.execute(
            "blockdev-add",
            Some(
                json!({ "driver": "nbd", "node-name": "target", "export": "d0",
                "server": { "type": "inet", "host": host, "port": port.to_string() } }),
            ),
        )?;
        qmp.execute(
            "blockdev-mirror",
            Some(json!({ "job-id": "m0", "device": "d0", "target": "target", "sync": "full" })),
        )?;
        guest::wait_for(
            Duration::from_secs(600),
            Duration::from_millis(50),
            "QEMU's disk mirror to be in sync",
            || {
                let jobs = self.qmp()?.execute("query-block-jobs", None)?;
                let job = jobs.as_array().and_then(|j| j.first()).cloned();
                match job {
                    Some(j) if j["ready"] == true => Ok(Some(())),
                    Some(_) => Ok(None),
                    None => bail!("QEMU's disk mirror ended before it was in sync"),
                }
            },
        )?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Ends the disk mirror once the guest is paused for good (its memory migrated): the
    /// target gets the last writes, the guest keeps its own disk here (what libvirt does).
    pub fn finish_mirror(&mut self) -> anyhow::Result<()> {
        self.qmp()?
            .execute("block-job-cancel", Some(json!({ "device": "m0" })))?;
        guest::wait_for(
            Duration::from_secs(60),
            Duration::from_millis(2),
            "QEMU's disk mirror to finish",
            || {
                let jobs = self.qmp()?.execute("query-block-jobs", None)?;
                Ok(jobs.as_array().is_some_and(|j| j.is_empty()).then_some(()))
            },
        )?;
        // Disconnects from the destination's export.
        self.qmp()?
            .execute("blockdev-del", Some(json!({ "node-name": "target" })))?;
        Ok(())
    }

    /// Stops exporting the disk (before the guest resumes and writes it itself).
    pub fn stop_export(&mut self) -> anyhow::Result<()> {
        let qmp = self.qmp()?;
        qmp.execute(
            "block-export-del",
            Some(json!({ "id": "e0", "mode": "hard" })),
        )?;
        qmp.execute("nbd-server-stop", None)?;
        Ok(())
    }

    /// Resumes a guest started paused (`-S`).
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.qmp()?.execute("cont", None)?;
        Ok(())
    }

    /// Polls `query-migrate` every `every` until the migration completed; its last answer.
    fn wait_migrated(&mut self, every: Duration) -> anyhow::Result<serde_json::Value> {
        guest::wait_for(
            Duration::from_secs(600),
            every,
            "QEMU's migration to finish",
            || {
                let s = self.qmp()?.execute("query-migrate", None)?;
                match s["status"].as_str() {
                    Some("completed") => Ok(Some(s)),
                    Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {s}"),
                    _ => Ok(None),
                }
            },
        )
    }

    /// Waits until QEMU reports the guest running (RESUME); the host time it did.
    pub fn wait_resumed(&mut self) -> anyhow::Result<f64> {
        guest::wait_for(
            Duration::from_secs(60),
            Duration::from_millis(5),
            "the migrated guest to resume under QEMU",
            || self.resumed_at(),
        )
    }

    /// Asks QEMU to quit and waits for it.
    pub fn quit(mut self) -> anyhow::Result<()> {
        if let Some(qmp) = self.qmp.as_mut() {
            // QEMU may close the socket before replying.
            let _ = qmp.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("QEMU did not quit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(())
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The size of `file` once it stops growing (with `exec:cat`, cat may still be writing the
/// last pipe buffer when QEMU reports completion).
fn settled_size(file: &Path) -> anyhow::Result<u64> {
    let size = || -> anyhow::Result<u64> {
        Ok(std::fs::metadata(file)
            .with_context(|| format!("QEMU wrote no {}", file.display()))?
            .len())
    };
    let mut last = size()?;
    let mut stable = 0;
    for _ in 0..500 {
        std::thread::sleep(Duration::from_millis(10));
        let now = size()?;
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        if stable >= 3 {
            break;
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2, 22))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0, 2))
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn uris_follow_the_version() {
        let old = Qemu {
            binary: "q".into(),
            version: (7, 2, 22),
            version_line: String::new(),
        };
        let new = Qemu {
            version: (8, 2, 0),
            ..old.clone()
        };
        let f = Path::new("/tmp/x.qemu");
        assert_eq!(old.save_uri(f).unwrap(), "exec:cat > '/tmp/x.qemu'");
        assert_eq!(old.restore_uri(f).unwrap(), "exec:cat '/tmp/x.qemu'");
        assert_eq!(new.save_uri(f).unwrap(), "file:/tmp/x.qemu");
        assert!(old.save_uri(Path::new("/tmp/a'b")).is_err());
    }
}
