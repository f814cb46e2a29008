//! Test hosts for the CLI's integration tests: `tern-testkit`'s `TernHost` with the `tern`
//! under test, the KVM test lock, and asserting helpers.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

#[allow(unused_imports)]
pub use tern_testkit::{kill9, process_alive, wait_for, Heartbeat, KvmLock, TernHost};

/// The networked test guest's address and MAC on the lab's segment.
pub const GUEST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 0, 10);
pub const GUEST_MAC: &str = "02:77:00:00:00:10";

/// Host `member`'s address in the lab, as `tern migrate` takes it.
pub fn host_ip(member: tern_testkit::Member) -> String {
    member.ip().to_string()
}

/// Path of the `tern` executable under test.
pub fn tern_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

/// A test host whose helpers assert instead of returning errors.
pub struct Host {
    inner: TernHost,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    _lock: Option<KvmLock>,
}

impl Deref for Host {
    type Target = TernHost;
    fn deref(&self) -> &TernHost {
        &self.inner
    }
}

impl DerefMut for Host {
    fn deref_mut(&mut self) -> &mut TernHost {
        &mut self.inner
    }
}

impl Host {
    /// Starts a daemon, holding the KVM test lock for the host's lifetime.
    pub fn start() -> Host {
        let lock = KvmLock::acquire();
        let mut host = Host::start_unlocked();
        host._lock = Some(lock);
        host
    }

    /// Starts a daemon with `extra_toml` appended to its config, holding the KVM test lock.
    pub fn start_with_toml(extra_toml: &str) -> Host {
        let lock = KvmLock::acquire();
        let inner = TernHost::start_with(&tern_bin(), &std::env::temp_dir(), None, extra_toml)
            .expect("start a tern daemon");
        let mut host = Host::wrap(inner);
        host._lock = Some(lock);
        host
    }

    /// Starts a daemon without taking the lock (for a second host in the same test).
    pub fn start_unlocked() -> Host {
        Host::wrap(TernHost::start(&tern_bin()).expect("start a tern daemon"))
    }

    /// Starts a daemon in host `member` of `lab` (with `extra_toml` in its config); the caller
    /// holds the KVM lock.
    pub fn in_lab(
        lab: &tern_testkit::NetLab,
        member: tern_testkit::Member,
        extra_toml: &str,
    ) -> Host {
        Host::wrap(
            lab.start_host(&tern_bin(), member, extra_toml)
                .expect("start a tern daemon in the lab"),
        )
    }

    fn wrap(inner: TernHost) -> Host {
        Host {
            dir: inner.dir().to_path_buf(),
            socket: inner.socket().to_path_buf(),
            state_dir: inner.state_dir().to_path_buf(),
            inner,
            _lock: None,
        }
    }

    /// Writes a networked test-guest config: one vif on the host's `br0` with `mac`, the
    /// guest at `ip` (/24, the lab's segment).
    pub fn net_guest_config(
        &self,
        name: &str,
        memory_mib: u64,
        vcpus: u32,
        ip: std::net::Ipv4Addr,
        mac: &str,
        params: &str,
    ) -> PathBuf {
        let cmdline = format!("ip={ip}/24 gw=10.77.0.1 {params}");
        let path = self.guest_config(name, memory_mib, vcpus, &cmdline);
        let mut text = std::fs::read_to_string(&path).expect("config");
        text.push_str(&format!("vif = [ 'mac={mac}, bridge=br0' ]\n"));
        std::fs::write(&path, text).expect("config");
        path
    }

    /// Creates the networked test guest `name` (1 GiB, 2 vCPUs, at [`GUEST_IP`]) running
    /// `params`, and waits for its first heartbeats.
    pub fn create_net_guest(&self, name: &str, params: &str) {
        let cfg = self.net_guest_config(name, 1024, 2, GUEST_IP, GUEST_MAC, params);
        self.ok(&["create", cfg.to_str().expect("path")]);
        self.wait_heartbeat(name, 3, Duration::from_secs(30));
    }

    /// Runs `tern --socket <ours> args...` in the background, its output piped and SIGINT
    /// at its default (whatever the test runner was started with), so that a Ctrl-C reaches
    /// it as on a terminal.
    pub fn spawn(&self, args: &[&str]) -> Child {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: signal() is async-signal-safe; the child has not run anything else yet.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        cmd.spawn().expect("spawn tern")
    }

    /// Runs `tern migrate NAME DESTINATION ARGS…` in the background (see [`Host::spawn`]).
    pub fn spawn_migrate(&self, name: &str, destination: &str, args: &[&str]) -> Child {
        let mut all = vec!["migrate", name, destination];
        all.extend_from_slice(args);
        self.spawn(&all)
    }

    /// (Re)starts the daemon, asserting it comes up.
    pub fn start_daemon(&mut self) {
        self.inner.start_daemon().expect("restart the daemon");
    }

    /// Runs `tern --socket <ours> args...`.
    pub fn tern(&self, args: &[&str]) -> std::process::Output {
        self.inner.output(args).expect("run tern")
    }

    /// Runs tern and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        match self.inner.run(args) {
            Ok(out) => out,
            Err(e) => panic!("{e:#}\n{}", self.daemon_log()),
        }
    }

    /// Runs tern and asserts failure with exactly one `Error: ` line; returns stderr.
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
        self.inner
            .guest_config(name, memory_mib, vcpus, extra)
            .expect("write guest config")
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

    /// The console log so far (empty if the domain is gone).
    pub fn console(&self, name: &str) -> String {
        self.inner.console(name).unwrap_or_default()
    }

    /// Heartbeats so far, with the host time (s) at which each line arrived.
    pub fn heartbeats(&self, name: &str) -> Vec<(f64, Heartbeat)> {
        self.inner.heartbeats(name).unwrap_or_default()
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
        self.inner.list().expect("tern list --json")
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
        self.inner.guest_pid(name).expect("guest pid")
    }

    /// The guest's last heartbeat so far.
    pub fn last_beat(&self, name: &str) -> Heartbeat {
        self.heartbeats(name)
            .pop()
            .map(|(_, h)| h)
            .unwrap_or_else(|| panic!("no heartbeat from {name}:\n{}", self.console(name)))
    }

    /// Waits until the guest completed a full memory pass and a register check after
    /// heartbeat `since` (a loaded machine may slow it down, so this waits rather than
    /// expects), then asserts it found no error and reported no failure.
    pub fn assert_checks_clean(&self, name: &str, since: &Heartbeat) {
        let checked = wait_for(Duration::from_secs(20), || {
            let now = self.last_beat(name);
            now.passes > since.passes && now.reg_checks > since.reg_checks
        });
        let now = self.last_beat(name);
        assert!(
            checked,
            "{name} did not check its memory and registers again: {since:?} then {now:?}"
        );
        assert_eq!(now.mem_errors, 0, "memory errors");
        assert_eq!(now.reg_errors, 0, "register errors");
        self.assert_no_failures(name);
    }

    /// Asserts the guest never reported a failed check or a fault.
    pub fn assert_no_failures(&self, name: &str) {
        let console = self.console(name);
        let bad: Vec<&str> = console
            .lines()
            .filter(|l| tern_testkit::is_failure_line(l))
            .collect();
        assert!(
            bad.is_empty(),
            "{name} reported failures:\n{}",
            bad.join("\n")
        );
    }
}

/// Path helper for tests that want the state directory of one domain.
pub fn domain_dir(host: &Host, id: u64) -> PathBuf {
    host.state_dir.join("domains").join(id.to_string())
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Two hosts of a lab with their relocation servers on, the KVM lock held. Fields drop in
/// order: hosts (and their guests) before the lab, the lock last.
pub struct Pair {
    pub h1: Host,
    pub h2: Host,
    pub lab: tern_testkit::NetLab,
    _lock: KvmLock,
}

/// The `[relocation]` table for `member`: its server on its lab address, `allow` as
/// `hosts_allow`, and `extra` lines at the top level of the config.
pub fn relocation_toml(member: tern_testkit::Member, allow: &[&str], extra: &str) -> String {
    format!("{extra}\n{}", tern_testkit::relocation_toml(member, allow))
}

impl Host {
    /// Restarts this lab host's daemon with `top_level` lines in its config and `relocation`
    /// lines in its `[relocation]` table; its state directory (guests, key, trust) stays.
    pub fn reconfigure(&mut self, member: tern_testkit::Member, top_level: &str, relocation: &str) {
        self.kill_daemon();
        let toml = format!(
            "state_dir = \"{}\"\nsocket = \"{}\"\n{top_level}\n{}",
            self.state_dir.display(),
            self.socket.display(),
            tern_testkit::relocation_toml_with(
                member,
                &[tern_testkit::LAB_HOSTS_ALLOW],
                relocation
            )
        );
        std::fs::write(self.config_path(), toml).expect("config");
        self.start_daemon();
    }
}

impl Pair {
    /// Sets host `member`'s link to the switch `up` or `down`.
    pub fn set_link(&self, member: tern_testkit::Member, state: &str) {
        let out = self
            .lab
            .exec(member, "ip", &["link", "set", "eth0", state])
            .expect("ip link set");
        assert!(out.status.success(), "ip link set eth0 {state}");
    }

    /// Hosts that accept each other (and only each other).
    pub fn start() -> Pair {
        Pair::start_with(&[tern_testkit::LAB_HOSTS_ALLOW], "", "")
    }

    /// Hosts with `allow` as both servers' `hosts_allow` and extra top-level config lines.
    pub fn start_with(allow: &[&str], extra1: &str, extra2: &str) -> Pair {
        use tern_testkit::{Member, NetLab};
        let lock = KvmLock::acquire();
        let lab = NetLab::new().expect("build the network lab");
        let h1 = Host::in_lab(
            &lab,
            Member::Host1,
            &relocation_toml(Member::Host1, allow, extra1),
        );
        let h2 = Host::in_lab(
            &lab,
            Member::Host2,
            &relocation_toml(Member::Host2, allow, extra2),
        );
        h1.trust_each_other(&h2)
            .expect("make the hosts trust each other");
        Pair {
            h1,
            h2,
            lab,
            _lock: lock,
        }
    }
}

/// The lab address of the host `host` is (`h1` or `h2` of a [`Pair`]).
pub fn address_of(pair: &Pair, host: &Host) -> String {
    use tern_testkit::Member;
    let member = if std::ptr::eq(host, &pair.h1) {
        Member::Host1
    } else {
        Member::Host2
    };
    member.ip().to_string()
}

impl Host {
    /// `tern migrate NAME DEST --json ARGS…`, asserting success; the summary.
    pub fn migrate(&self, name: &str, destination: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["migrate", name, destination, "--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
    }

    /// Whether `name` is listed here.
    pub fn has(&self, name: &str) -> bool {
        self.list().iter().any(|d| d["name"] == name)
    }

    /// Asserts nothing of an (arrived or refused) guest is left here: not listed, no guest
    /// process, no domain directory, no TAP device in `netns`.
    pub fn assert_empty(&self, lab: &tern_testkit::NetLab, member: tern_testkit::Member) {
        let gone = wait_for(Duration::from_secs(20), || {
            self.list().is_empty() && self.live_guest_processes().is_empty()
        });
        assert!(
            gone,
            "left over: {:?}, processes {:?}\n{}",
            self.list(),
            self.live_guest_processes(),
            self.daemon_log()
        );
        let domains = self.state_dir.join("domains");
        let left: Vec<_> = std::fs::read_dir(&domains)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "domain directories left: {left:?}");
        let out = lab
            .exec(member, "ip", &["-o", "link", "show"])
            .expect("ip link");
        let links = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !links.lines().any(|l| l.contains(": tern")),
            "TAP devices left:\n{links}"
        );
    }
}

/// A 100 MiB download from the guest at 10.77.0.10 by the lab's client, with curl limited to
/// `rate` (curl's syntax, e.g. `20M`) so that it is surely still running a moment later.
pub struct Download {
    child: std::process::Child,
    file: PathBuf,
}

/// Bytes the guest's HTTP server sends for a [`Download`].
pub const DOWNLOAD_BYTES: usize = 104_857_600;

impl Download {
    pub fn start(lab: &tern_testkit::NetLab, file: PathBuf, rate: &str) -> Download {
        let curl_bin = tern_testkit::find_program("curl").expect("curl");
        let mut curl = std::process::Command::new(curl_bin);
        curl.args(["-sS", "--fail", "--limit-rate", rate, "-o"])
            .arg(&file)
            .arg(format!("http://10.77.0.10/download/{DOWNLOAD_BYTES}"));
        let child = lab
            .spawn_in(tern_testkit::Member::Client, curl)
            .expect("curl");
        Download { child, file }
    }

    /// Whether curl is still at it.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for curl and asserts every byte arrived as the guest should have sent it.
    pub fn assert_complete(self) {
        let out = self.child.wait_with_output().expect("curl");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&self.file).expect("download");
        assert_eq!(data.len(), DOWNLOAD_BYTES);
        assert_eq!(tern_testguest::verify_download(&data), Ok(()));
    }
}

/// Waits for a backgrounded `tern migrate` and asserts it failed with one `Error:` line.
pub fn assert_migrate_failed(child: Child, context: &str) -> String {
    let out = child.wait_with_output().expect("tern migrate");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{context}: the migration succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.starts_with("Error: "), "{context}: {stderr:?}");
    println!("{context}: {}", stderr.trim());
    stderr
}

/// PID of the arriving guest's process on `host`, once there is one.
pub fn incoming_pid(host: &Host) -> u32 {
    let mut pid = None;
    wait_for(Duration::from_secs(10), || {
        pid = host.live_guest_processes().first().copied();
        pid.is_some()
    });
    pid.expect("no guest process on the destination")
}

/// Asserts the guest still runs on `host` after a failed migration and checks itself clean.
pub fn assert_still_runs(host: &Host, name: &str) {
    // The guest gives up at its next record (about 20 ms at the tests' caps); a daemon killed
    // and restarted meanwhile may answer sooner than that.
    wait_for(Duration::from_secs(10), || {
        host.state(name).as_deref() != Some("migrating")
    });
    let state = host.state(name).expect("the guest is listed on the source");
    assert!(
        state == "running" || state == "blocked",
        "{name} is {state} on the source after a failed migration\n{}",
        host.daemon_log()
    );
    let before = host.last_beat(name);
    host.wait_heartbeat(name, before.seq + 3, Duration::from_secs(10));
    host.assert_checks_clean(name, &before);
}

/// How many of the first `blocks` 4 KiB blocks of `image` are blocks the test guest wrote
/// and checks out (read here, after the guest is gone).
pub fn valid_disk_blocks(image: &Path, blocks: usize) -> usize {
    let data = std::fs::read(image).expect("image");
    data.chunks(4096)
        .take(blocks)
        .enumerate()
        .filter(|(i, block)| {
            matches!(
                tern_testguest::check_disk_block(block, *i as u64),
                Ok(Some(_))
            )
        })
        .count()
}
