//! One test host: a `tern daemon` and its files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tern_testguest::Heartbeat;

/// A daemon with its own socket and state directory; everything it runs is destroyed when
/// this is dropped.
pub struct TernHost {
    dir: tempfile::TempDir,
    tern: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    config: PathBuf,
    daemon: Option<Child>,
    /// The network namespace the daemon (and so its guests) runs in; None: ours.
    netns: Option<String>,
}

/// A path as the UTF-8 argument the CLI takes.
pub fn path_arg(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

impl TernHost {
    /// Starts `tern daemon` (the executable `tern`) in a new scratch directory.
    pub fn start(tern: &Path) -> anyhow::Result<TernHost> {
        Self::start_in(tern, &std::env::temp_dir())
    }

    /// Starts `tern daemon` in a new directory under `parent` and waits until it answers.
    pub fn start_in(tern: &Path, parent: &Path) -> anyhow::Result<TernHost> {
        Self::start_with(tern, parent, None, "")
    }

    /// Starts `tern daemon` inside network namespace `netns` (e.g. a [`NetLab`] host's), with
    /// `extra_toml` appended to its config (a `[relocation]` table, say). Its guests inherit
    /// the namespace; the CLI still reaches the daemon through its Unix socket.
    ///
    /// [`NetLab`]: crate::NetLab
    pub fn start_in_netns(tern: &Path, netns: &str, extra_toml: &str) -> anyhow::Result<TernHost> {
        Self::start_with(tern, &std::env::temp_dir(), Some(netns), extra_toml)
    }

    /// Starts `tern daemon` in a new directory under `parent`, in network namespace `netns`
    /// if given, with `extra_toml` appended to the config, and waits until it answers.
    pub fn start_with(
        tern: &Path,
        parent: &Path,
        netns: Option<&str>,
        extra_toml: &str,
    ) -> anyhow::Result<TernHost> {
        let dir = tempfile::Builder::new()
            .prefix("tern-host-")
            .tempdir_in(parent)?;
        let socket = dir.path().join("ternd.sock");
        let state_dir = dir.path().join("state");
        let config = dir.path().join("ternd.toml");
        let mut toml = format!(
            "state_dir = \"{}\"\nsocket = \"{}\"\n",
            state_dir.display(),
            socket.display()
        );
        if !extra_toml.is_empty() {
            toml.push('\n');
            toml.push_str(extra_toml);
            toml.push('\n');
        }
        std::fs::write(&config, toml)?;
        let mut host = TernHost {
            dir,
            tern: tern.to_path_buf(),
            socket,
            state_dir,
            config,
            daemon: None,
            netns: netns.map(str::to_string),
        };
        host.start_daemon()?;
        Ok(host)
    }

    /// (Re)starts the daemon process and waits until it answers.
    pub fn start_daemon(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let mut cmd = Command::new(&self.tern);
        cmd.arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(ns) = &self.netns {
            crate::netns::enter_netns(&mut cmd, ns)?;
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} daemon", self.tern.display()))?;
        self.daemon = Some(child);
        let socket = self.socket.clone();
        let up = crate::wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if !up {
            bail!("the daemon did not start; {}", self.daemon_log());
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (guests keep running, as they would on a real host).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// The scratch directory (configs, checkpoints, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The network namespace the daemon runs in, if not ours.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The daemon's PID while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The daemon's config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// What the daemon logged.
    pub fn daemon_log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        format!("daemon log:\n{log}")
    }

    /// `tern --socket <ours> args…`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.tern);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `tern args…` and returns what it did, success or not.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("cannot run tern {args:?}"))
    }

    /// Runs `tern args…`; its stdout, or an error carrying its `Error:` line.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "tern {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// This host's relocation key fingerprint (`tern fingerprint`).
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        Ok(self.run(&["fingerprint"])?.trim().to_string())
    }

    /// Makes this host trust `other`'s key, under `name`.
    pub fn trust(&self, other: &TernHost, name: &str) -> anyhow::Result<()> {
        self.run(&["trust", "add", &other.fingerprint()?, "--name", name])?;
        Ok(())
    }

    /// Makes this host and `other` trust each other, as an administrator would with
    /// `tern fingerprint` on each and `tern trust add` on the other.
    pub fn trust_each_other(&self, other: &TernHost) -> anyhow::Result<()> {
        self.trust(other, "peer")?;
        other.trust(self, "peer")
    }

    /// Writes a test-guest config file in the scratch directory and returns its path.
    pub fn guest_config(
        &self,
        name: &str,
        memory_mib: u64,
        vcpus: u32,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.cfg"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nmemory = {memory_mib}\nvcpus = {vcpus}\nkernel = \"{}\"\nextra = \"{extra}\"\n",
                tern_testguest::path().display()
            ),
        )?;
        Ok(path)
    }

    /// `tern list --json`.
    pub fn list(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        serde_json::from_str(&self.run(&["list", "--json"])?)
            .context("tern list --json is not JSON")
    }

    /// The domain ID of `name`.
    pub fn domain_id(&self, name: &str) -> anyhow::Result<u64> {
        self.list()?
            .iter()
            .find(|d| d["name"] == name)
            .and_then(|d| d["id"].as_u64())
            .with_context(|| format!("{name} is not listed"))
    }

    /// PID of a domain's guest process.
    pub fn guest_pid(&self, name: &str) -> anyhow::Result<u32> {
        let id = self.domain_id(name)?;
        let pid_file = self.state_dir.join(format!("domains/{id}/vmm.pid"));
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?;
        pid.trim()
            .parse()
            .with_context(|| format!("bad pid in {}", pid_file.display()))
    }

    /// Keeps the console log of `name` on this host readable in `into` after the guest
    /// leaves (a migration removes its directory here): hard links to its files, which the
    /// guest process goes on appending to until it ends. The log's format is tern-vmm's
    /// `console_log`.
    pub fn keep_console(&self, name: &str, into: &Path) -> anyhow::Result<()> {
        let id = self.domain_id(name)?;
        let dir = self.state_dir.join(format!("domains/{id}"));
        for file in ["console.raw", "console.idx"] {
            std::fs::hard_link(dir.join(file), into.join(file))
                .with_context(|| format!("cannot keep {}", dir.join(file).display()))?;
        }
        Ok(())
    }

    /// Everything the guest printed on this host (`tern console --dump`).
    pub fn console(&self, name: &str) -> anyhow::Result<String> {
        self.run(&["console", name, "--dump"])
    }

    /// Complete console lines with the host time (Unix seconds) each arrived.
    pub fn stamped_lines(&self, name: &str) -> anyhow::Result<Vec<(f64, String)>> {
        let out = self.run(&["console", name, "--dump", "--timestamps"])?;
        Ok(crate::complete_lines(&out)
            .filter_map(|l| {
                let (ts, rest) = l.split_once(' ')?;
                Some((ts.parse().ok()?, rest.to_string()))
            })
            .collect())
    }

    /// Heartbeats so far, with the host time at which each line arrived.
    pub fn heartbeats(&self, name: &str) -> anyhow::Result<Vec<(f64, Heartbeat)>> {
        Ok(self
            .stamped_lines(name)?
            .into_iter()
            .filter_map(|(t, l)| Some((t, Heartbeat::parse(&l)?)))
            .collect())
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
            .filter(|&pid| crate::process_alive(pid))
            .collect()
    }

    /// Destroys every guest the daemon lists.
    pub fn destroy_all(&self) {
        let Ok(list) = self.list() else { return };
        for d in list {
            if let Some(id) = d["id"].as_u64() {
                let _ = self.run(&["destroy", &id.to_string()]);
            }
        }
    }
}

impl Drop for TernHost {
    fn drop(&mut self) {
        // Leave nothing running: destroy every guest, kill what is left, stop the daemon.
        if self.daemon.is_some() {
            self.destroy_all();
        }
        for pid in self.live_guest_processes() {
            crate::kill9(pid);
        }
        self.kill_daemon();
    }
}
