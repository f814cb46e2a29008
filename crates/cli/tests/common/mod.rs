//! Test hosts: a real `tern daemon` with its own socket and state directory, driven through the
//! real `tern` CLI, booting the real test guest on /dev/kvm.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use tern_testguest::{Heartbeat, KvmLock};

/// Path of the `tern` executable under test.
pub fn tern_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One test "host": a daemon and its files.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    daemon: Option<Child>,
    _lock: Option<KvmLock>,
}

impl Host {
    /// Starts a daemon, holding the KVM test lock for the host's lifetime.
    pub fn start() -> Host {
        let lock = KvmLock::acquire();
        let mut host = Host::start_unlocked();
        host._lock = Some(lock);
        host
    }

    /// Starts a daemon without taking the lock (for a second host in the same test).
    pub fn start_unlocked() -> Host {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("ternd.sock");
        let state_dir = dir.path().join("state");
        let config = dir.path().join("ternd.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nsocket = \"{}\"\n",
                state_dir.display(),
                socket.display()
            ),
        )
        .expect("write daemon config");
        let mut host = Host {
            dir,
            socket,
            state_dir,
            config,
            daemon: None,
            _lock: None,
        };
        host.start_daemon();
        host
    }

    /// (Re)starts the daemon process and waits until it answers.
    pub fn start_daemon(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(tern_bin())
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start daemon");
        self.daemon = Some(child);
        let socket = self.socket.clone();
        assert!(
            wait_for(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            }),
            "daemon did not come up; log:\n{}",
            self.daemon_log()
        );
    }

    /// Kills the daemon with SIGKILL (guests keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs `tern --socket <ours> args...`.
    pub fn tern(&self, args: &[&str]) -> Output {
        Command::new(tern_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tern")
    }

    /// Runs tern and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tern(args);
        assert!(
            out.status.success(),
            "tern {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs tern and asserts failure with an `Error: ` line; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.tern(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "tern {args:?} unexpectedly succeeded"
        );
        assert!(
            stderr.starts_with("Error: "),
            "tern {args:?} printed {stderr:?}"
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("Error: ")).count(),
            1
        );
        stderr
    }

    /// Writes a test-guest config file and returns its path.
    pub fn guest_config(&self, name: &str, memory_mib: u64, vcpus: u32, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.cfg"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nmemory = {memory_mib}\nvcpus = {vcpus}\nkernel = \"{}\"\nextra = \"{extra}\"\n",
                tern_testguest::path().display()
            ),
        )
        .expect("write guest config");
        path
    }

    /// Creates a test guest and waits until it printed its first heartbeat.
    pub fn create_guest(&self, name: &str, memory_mib: u64, vcpus: u32, extra: &str) {
        let cfg = self.guest_config(name, memory_mib, vcpus, extra);
        self.ok(&["create", cfg.to_str().expect("utf-8 path")]);
        assert!(
            wait_for(Duration::from_secs(20), || !self
                .heartbeats(name)
                .is_empty()),
            "no heartbeat from {name}; console:\n{}",
            self.console(name)
        );
    }

    /// The console log so far.
    pub fn console(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.tern(&["console", name, "--dump"]).stdout).into_owned()
    }

    /// Heartbeats so far, with the host time (s) at which each line arrived.
    pub fn heartbeats(&self, name: &str) -> Vec<(f64, Heartbeat)> {
        let out = self.tern(&["console", name, "--dump", "--timestamps"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (ts, _) = l.split_once(' ')?;
                Some((ts.parse().ok()?, Heartbeat::parse(l)?))
            })
            .collect()
    }

    /// Waits until the guest printed a heartbeat with `seq >= at_least`; returns the last one.
    pub fn wait_heartbeat(&self, name: &str, at_least: u64, timeout: Duration) -> Heartbeat {
        let mut last = None;
        let seen = wait_for(timeout, || {
            last = self.heartbeats(name).pop().map(|(_, h)| h);
            last.as_ref().is_some_and(|h| h.seq >= at_least)
        });
        assert!(
            seen,
            "{name} did not reach heartbeat {at_least}; last {last:?}; console:\n{}",
            self.console(name)
        );
        last.expect("a heartbeat")
    }

    /// `tern list --json`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--json"])).expect("list --json is JSON")
    }

    /// The state `tern list` reports for a domain, if it is listed.
    pub fn state(&self, name: &str) -> Option<String> {
        self.list()
            .into_iter()
            .find(|d| d["name"] == name)
            .and_then(|d| d["state"].as_str().map(String::from))
    }

    /// PID of a domain's guest process.
    pub fn guest_pid(&self, name: &str) -> u32 {
        let id = self
            .list()
            .into_iter()
            .find(|d| d["name"] == name)
            .and_then(|d| d["id"].as_u64())
            .expect("domain listed");
        let pid = std::fs::read_to_string(self.state_dir.join(format!("domains/{id}/vmm.pid")))
            .expect("pid file");
        pid.trim().parse().expect("pid")
    }

    /// Asserts the guest never reported a failed check or a fault.
    pub fn assert_no_failures(&self, name: &str) {
        let console = self.console(name);
        let bad: Vec<&str> = console
            .lines()
            .filter(|l| tern_testguest::is_failure_line(l))
            .collect();
        assert!(
            bad.is_empty(),
            "{name} reported failures:\n{}",
            bad.join("\n")
        );
    }

    /// Guest processes still alive under this host's state directory.
    pub fn live_guest_processes(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.state_dir.join("domains")) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("vmm.pid")).ok())
            .filter_map(|p| p.trim().parse::<u32>().ok())
            .filter(|&pid| process_alive(pid))
            .collect()
    }
}

/// True if a process with this PID exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn kill9(pid: u32) {
    // SAFETY: sending a signal.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Leave nothing running: destroy every guest, then stop the daemon.
        if self.daemon.is_some() {
            if let Ok(list) = serde_json::from_slice::<Vec<serde_json::Value>>(
                &self.tern(&["list", "--json"]).stdout,
            ) {
                for d in list {
                    if let Some(id) = d["id"].as_u64() {
                        let _ = self.tern(&["destroy", &id.to_string()]);
                    }
                }
            }
        }
        for pid in self.live_guest_processes() {
            kill9(pid);
        }
        self.kill_daemon();
    }
}

/// Path helper for tests that want the state directory of one domain.
pub fn domain_dir(host: &Host, id: u64) -> PathBuf {
    host.state_dir.join("domains").join(id.to_string())
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
