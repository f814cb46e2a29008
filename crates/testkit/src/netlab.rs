//! A network lab: hosts, a client and a storage server on one layer-2 segment, built from
//! network namespaces, veth pairs and bridges.
//!
//! ```text
//!  namespace <lab>-switch          bridge sw0, ports host1 host2 client storage (veth)
//!      │ veth host1 ⇄ eth0 ─ namespace <lab>-host1    br0 (10.77.0.1/24) ⊃ eth0; guests' TAPs join br0
//!      │ veth host2 ⇄ eth0 ─ namespace <lab>-host2    br0 (10.77.0.2/24) ⊃ eth0
//!      │ veth host3 ⇄ eth0 ─ namespace <lab>-host3    br0 (10.77.0.3/24) ⊃ eth0
//!      │ veth client ⇄ eth0 ─ namespace <lab>-client  eth0 10.77.0.100/24
//!      │ veth storage ⇄ eth0 ─ namespace <lab>-storage eth0 10.77.0.200/24 (NBD server)
//!      └ veth etcd1..3 ⇄ eth0 ─ namespaces <lab>-etcd1..3 eth0 10.77.0.221..223/24 (a pool's etcd)
//! ```
//!
//! Guests get addresses from 10.77.0.10 ([`guest_ip`]). Every interface lives in a lab
//! namespace from birth (the veth pairs are created in the switch namespace with their peer
//! placed straight into the member's), so nothing ever appears in the root namespace and
//! interface names need only be unique per namespace; only namespace names carry the lab's
//! unique prefix `ternlab-<pid>-<n>`. IPv6 is disabled on the lab's own interfaces so the
//! segment carries no traffic the tests did not cause (bridged guest traffic is unaffected).
//!
//! A lab removes itself on drop, killing whatever still runs in its namespaces. A lab whose
//! creating process died (a crashed or killed test run) is removed by
//! [`NetLab::cleanup_stale`], which every new lab calls first. `scripts/testnet` builds the
//! same topology under the fixed prefix `tern` (`tern-host1`, …) for manual use.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cmd::{ensure_program, ip, output_within};
use crate::netns::{enter_netns, netns_exists, run_in_netns};
use crate::{PingReport, TernHost};

/// The lab's subnet, 10.77.0.0/24.
pub const LAB_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
/// Prefix length of every lab address.
pub const LAB_PREFIX_LEN: u8 = 24;
/// The bridge guests' TAPs join in each host namespace.
pub const GUEST_BRIDGE: &str = "br0";
/// Each member's link to the switch (in the member's namespace).
pub const UPLINK: &str = "eth0";
/// The prefix `scripts/testnet` uses: namespaces `tern-host1`, `tern-host2`, …
pub const FIXED_PREFIX: &str = "tern";

const SWITCH_BRIDGE: &str = "sw0";
const SWITCH_SUFFIX: &str = "switch";
/// Namespace prefix of labs owned by a process (`ternlab-<pid>-<n>-<member>`).
const OWNED_PREFIX: &str = "ternlab-";
/// Owner records of labs, and the lock that serialises building and cleaning them.
const RUN_DIR: &str = "/run/tern-testnet";
const NETNS_DIR: &str = "/run/netns";
/// How long `ip netns` and friends may wait for the creation lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`NetLab::exec`] lets a command run.
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// A machine on the lab's segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Member {
    /// A tern host: daemons run here, guests' TAPs join its `br0`.
    Host1,
    Host2,
    Host3,
    /// Where a test's clients (ping, curl, a TCP stream) run.
    Client,
    /// The shared-storage server (NBD).
    Storage,
    /// The members of a pool's etcd cluster.
    Etcd1,
    Etcd2,
    Etcd3,
}

impl Member {
    pub const ALL: [Member; 8] = [
        Member::Host1,
        Member::Host2,
        Member::Host3,
        Member::Client,
        Member::Storage,
        Member::Etcd1,
        Member::Etcd2,
        Member::Etcd3,
    ];
    pub const HOSTS: [Member; 3] = [Member::Host1, Member::Host2, Member::Host3];
    pub const ETCD: [Member; 3] = [Member::Etcd1, Member::Etcd2, Member::Etcd3];

    /// `host1`, `client`, `etcd1`, …: the namespace suffix and switch port name.
    pub fn name(self) -> &'static str {
        match self {
            Member::Host1 => "host1",
            Member::Host2 => "host2",
            Member::Host3 => "host3",
            Member::Client => "client",
            Member::Storage => "storage",
            Member::Etcd1 => "etcd1",
            Member::Etcd2 => "etcd2",
            Member::Etcd3 => "etcd3",
        }
    }

    /// The member's address on the segment.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Member::Host1 => Ipv4Addr::new(10, 77, 0, 1),
            Member::Host2 => Ipv4Addr::new(10, 77, 0, 2),
            Member::Host3 => Ipv4Addr::new(10, 77, 0, 3),
            Member::Client => Ipv4Addr::new(10, 77, 0, 100),
            Member::Storage => Ipv4Addr::new(10, 77, 0, 200),
            Member::Etcd1 => Ipv4Addr::new(10, 77, 0, 221),
            Member::Etcd2 => Ipv4Addr::new(10, 77, 0, 222),
            Member::Etcd3 => Ipv4Addr::new(10, 77, 0, 223),
        }
    }

    /// Whether guests run here (it has a `br0`).
    pub fn is_host(self) -> bool {
        matches!(self, Member::Host1 | Member::Host2 | Member::Host3)
    }

    /// The interface holding the member's address: `br0` on hosts, `eth0` elsewhere.
    pub fn address_interface(self) -> &'static str {
        if self.is_host() {
            GUEST_BRIDGE
        } else {
            UPLINK
        }
    }
}

/// `hosts_allow` that admits exactly the lab's hosts.
pub const LAB_HOSTS_ALLOW: &str = r"^10\.77\.0\.[123]$";

/// The daemon config's `[relocation]` table for host `member`: the server on its lab address,
/// `hosts_allow` as given (regular expressions); incoming guests may use the test guest's
/// kernel and the lab's NBD server.
pub fn relocation_toml(member: Member, hosts_allow: &[&str]) -> String {
    relocation_toml_with(member, hosts_allow, "")
}

/// [`relocation_toml`] with `lines` added to the table (`insecure = true`, say); a `storage`
/// or `nbd_servers` line there replaces the lab's.
pub fn relocation_toml_with(member: Member, hosts_allow: &[&str], lines: &str) -> String {
    let allow: Vec<String> = hosts_allow.iter().map(|a| format!("'{a}'")).collect();
    let sets = |key: &str| lines.lines().any(|l| l.trim_start().starts_with(key));
    let mut table = format!(
        "[relocation]\nserver = true\naddress = \"{}\"\nhosts_allow = [{}]\n",
        member.ip(),
        allow.join(", "),
    );
    if !sets("storage") {
        let kernels = tern_testguest::path()
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        table += &format!("storage = [\"{kernels}\"]\n");
    }
    if !sets("nbd_servers") {
        table += &format!("nbd_servers = [\"{}:10809\"]\n", Member::Storage.ip());
    }
    table + lines + "\n"
}

/// Address of the `n`th guest of a test (10.77.0.10 + n), for n below 90.
pub fn guest_ip(n: u8) -> Option<Ipv4Addr> {
    (n < 90).then(|| Ipv4Addr::new(10, 77, 0, 10 + n))
}

/// A lab: nine network namespaces and the links between them. See the module docs.
pub struct NetLab {
    prefix: String,
    members: [String; 8],
    switch: String,
    owner_file: Option<PathBuf>,
    /// Whether dropping this value removes the lab (not for `scripts/testnet`'s, nor for one
    /// still being built: a failed build is removed by its builder, which holds the lock).
    remove_on_drop: bool,
}

impl NetLab {
    /// Builds a new lab with unique namespace names, after removing stale labs.
    pub fn new() -> anyhow::Result<NetLab> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        ensure_program("ip", "iproute2")?;
        let _lock = LabLock::acquire()?;
        cleanup_stale_locked()?;
        let pid = std::process::id();
        let prefix = format!(
            "{OWNED_PREFIX}{pid}-{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // The owner record comes first, so a crash at any later point leaves a lab that
        // cleanup_stale recognises as abandoned.
        let owner_file = Path::new(RUN_DIR).join(&prefix);
        let start = process_start_time(pid).context("cannot read this process's start time")?;
        std::fs::write(&owner_file, format!("{pid} {start}\n"))
            .with_context(|| format!("cannot write {}", owner_file.display()))?;
        let mut lab = NetLab::named(&prefix);
        lab.owner_file = Some(owner_file);
        if let Err(e) = lab.build() {
            lab.teardown();
            return Err(e);
        }
        lab.remove_on_drop = true;
        Ok(lab)
    }

    /// Builds the lab with fixed names `<prefix>-host1`, … that outlives this value (for
    /// `scripts/testnet up`). An existing complete lab of that prefix is reused; a partial
    /// one is rebuilt.
    pub fn up_persistent(prefix: &str) -> anyhow::Result<NetLab> {
        check_fixed_prefix(prefix)?;
        ensure_program("ip", "iproute2")?;
        let _lock = LabLock::acquire()?;
        let lab = NetLab::named(prefix);
        if lab.is_complete() {
            return Ok(lab);
        }
        lab.teardown();
        if let Err(e) = lab.build() {
            lab.teardown();
            return Err(e);
        }
        Ok(lab)
    }

    /// The persistent lab of `prefix` if it is up.
    pub fn open_persistent(prefix: &str) -> anyhow::Result<NetLab> {
        check_fixed_prefix(prefix)?;
        let lab = NetLab::named(prefix);
        if !lab.is_complete() {
            bail!("the lab {prefix} is not up (run scripts/testnet up)");
        }
        Ok(lab)
    }

    /// Removes the persistent lab of `prefix` (whatever of it exists) and what runs in it.
    pub fn down_persistent(prefix: &str) -> anyhow::Result<()> {
        check_fixed_prefix(prefix)?;
        let _lock = LabLock::acquire()?;
        NetLab::named(prefix).teardown();
        Ok(())
    }

    /// Removes every lab whose creating process no longer exists (namespaces, processes
    /// still running in them, owner records); returns the namespaces removed.
    pub fn cleanup_stale() -> anyhow::Result<Vec<String>> {
        let _lock = LabLock::acquire()?;
        cleanup_stale_locked()
    }

    /// The lab of these names, not removed on drop.
    fn named(prefix: &str) -> NetLab {
        NetLab {
            prefix: prefix.to_string(),
            members: Member::ALL.map(|m| format!("{prefix}-{}", m.name())),
            switch: format!("{prefix}-{SWITCH_SUFFIX}"),
            owner_file: None,
            remove_on_drop: false,
        }
    }

    /// The prefix of this lab's namespace names.
    pub fn id(&self) -> &str {
        &self.prefix
    }

    /// The network namespace of `member`.
    pub fn ns(&self, member: Member) -> &str {
        &self.members[member as usize]
    }

    /// The switch's namespace (bridge `sw0`; one port per member, named after it): where to
    /// capture to see everything on the segment.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// All of the lab's namespaces, the switch first.
    pub fn namespaces(&self) -> Vec<&str> {
        std::iter::once(self.switch.as_str())
            .chain(self.members.iter().map(String::as_str))
            .collect()
    }

    /// Whether every namespace of the lab exists.
    pub fn is_complete(&self) -> bool {
        self.namespaces().iter().all(|ns| netns_exists(ns))
    }

    /// A command that will run `program` in `member`'s namespace (see
    /// [`enter_netns`](crate::enter_netns)); configure it further and spawn it.
    pub fn command(
        &self,
        member: Member,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        enter_netns(&mut cmd, self.ns(member))?;
        Ok(cmd)
    }

    /// Runs `program args…` in `member`'s namespace and returns its output, success or not;
    /// killed after two minutes.
    pub fn exec(&self, member: Member, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.command(member, program)?;
        cmd.args(args);
        output_within(&mut cmd, EXEC_TIMEOUT)
    }

    /// Spawns `cmd`, as configured (stdio included), in `member`'s namespace: for long-running
    /// things (a continuous ping, a server). Whatever still runs there when the lab is dropped
    /// is killed.
    pub fn spawn_in(&self, member: Member, mut cmd: Command) -> anyhow::Result<Child> {
        enter_netns(&mut cmd, self.ns(member))?;
        cmd.spawn().with_context(|| {
            format!(
                "cannot start {} in {}",
                crate::cmd::describe(&cmd),
                self.ns(member)
            )
        })
    }

    /// Runs `f` on a thread inside `member`'s namespace (sockets it creates stay there).
    pub fn run_in<T: Send>(
        &self,
        member: Member,
        f: impl FnOnce() -> T + Send,
    ) -> anyhow::Result<T> {
        run_in_netns(self.ns(member), f)
    }

    /// A TCP connection from `member`'s namespace to `addr`, usable from any thread.
    pub fn tcp_connect(
        &self,
        from: Member,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<TcpStream> {
        self.run_in(from, || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("cannot connect from {} to {addr}", from.name()))
    }

    /// Pings `to` from `member`: `count` echo requests `interval` apart, each waiting at most
    /// a second for its reply; the parsed result (losses are not an error).
    pub fn ping(
        &self,
        from: Member,
        to: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> anyhow::Result<PingReport> {
        let ping = ensure_program("ping", "iputils-ping")?;
        let count = count.max(1);
        // ping sends `count` requests and then waits up to -W for the last reply. (Not -w:
        // with it ping keeps sending until it has `count` replies.)
        let runtime = interval.as_secs_f64() * f64::from(count) + 1.0;
        let mut cmd = self.command(from, ping)?;
        cmd.args(["-n", "-W", "1"])
            .args(["-c", &count.to_string()])
            .args(["-i", &format!("{:.3}", interval.as_secs_f64())])
            .arg(to.to_string());
        let out = output_within(&mut cmd, Duration::from_secs_f64(runtime + 30.0))?;
        PingReport::parse(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
            format!(
                "ping from {} to {to}: {}",
                from.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    /// Starts a tern daemon in host `member`'s namespace (see
    /// [`TernHost::start_in_netns`]). Drop hosts before their lab: declare the lab first.
    pub fn start_host(
        &self,
        tern: &Path,
        member: Member,
        extra_toml: &str,
    ) -> anyhow::Result<TernHost> {
        TernHost::start_in_netns(tern, self.ns(member), extra_toml)
    }

    /// `ip -brief address` of each member, for printing.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for m in Member::ALL {
            let addr = ip(&[
                "-n",
                self.ns(m),
                "-brief",
                "address",
                "show",
                "dev",
                m.address_interface(),
            ])
            .unwrap_or_else(|e| format!("{e:#}\n"));
            s.push_str(&format!("{:<8} {:<22} {}", m.name(), self.ns(m), addr));
            if !addr.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }

    fn build(&self) -> anyhow::Result<()> {
        for ns in self.namespaces() {
            ip(&["netns", "add", ns])?;
            self.quiet(ns)?;
        }
        let sw = self.switch.as_str();
        ip(&["-n", sw, "link", "add", SWITCH_BRIDGE, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", SWITCH_BRIDGE, "up"])?;
        for m in Member::ALL {
            let ns = self.ns(m);
            let port = m.name();
            ip(&[
                "-n", sw, "link", "add", port, "type", "veth", "peer", "name", UPLINK, "netns", ns,
            ])?;
            ip(&["-n", sw, "link", "set", port, "master", SWITCH_BRIDGE, "up"])?;
            if m.is_host() {
                ip(&["-n", ns, "link", "add", GUEST_BRIDGE, "type", "bridge"])?;
                ip(&["-n", ns, "link", "set", UPLINK, "master", GUEST_BRIDGE])?;
                ip(&["-n", ns, "link", "set", GUEST_BRIDGE, "up"])?;
            }
            let cidr = format!("{}/{LAB_PREFIX_LEN}", m.ip());
            ip(&[
                "-n",
                ns,
                "address",
                "add",
                &cidr,
                "dev",
                m.address_interface(),
            ])?;
            ip(&["-n", ns, "link", "set", UPLINK, "up"])?;
        }
        Ok(())
    }

    /// Loopback up, IPv6 off for the namespace's own interfaces.
    fn quiet(&self, ns: &str) -> anyhow::Result<()> {
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // /proc/sys/net is the namespace of the thread that opens it.
        run_in_netns(ns, || {
            for conf in ["all", "default"] {
                // Absent when the kernel has no IPv6: then there is nothing to quieten.
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
        })
    }

    /// Removes the lab's namespaces and kills what runs in them; idempotent.
    fn teardown(&self) {
        for ns in self.namespaces() {
            remove_netns(ns);
        }
        if let Some(f) = &self.owner_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _lock = LabLock::acquire();
            self.teardown();
        }
    }
}

impl std::fmt::Debug for NetLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetLab").field("id", &self.prefix).finish()
    }
}

fn check_fixed_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && !prefix.starts_with(OWNED_PREFIX)
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("bad lab prefix {prefix:?}: use up to 32 of a-z, 0-9 and -, not starting with {OWNED_PREFIX}");
    }
    Ok(())
}

/// Kills every process in namespace `ns` (never this one), waits for them to go, and deletes
/// the namespace. Deleting a namespace whose processes are gone removes its interfaces, and
/// a veth with either end.
fn remove_netns(ns: &str) {
    if !netns_exists(ns) {
        return;
    }
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<u32> = ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            crate::kill9(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = ip(&["netns", "delete", ns]) {
        if netns_exists(ns) {
            eprintln!("tern-testkit: cannot delete network namespace {ns}: {e:#}");
        }
    }
}

/// `<prefix>` of an owned lab's namespace `ternlab-<pid>-<n>-<member>` and its owner's PID.
fn owned_lab_of(ns: &str) -> Option<(String, u32)> {
    let rest = ns.strip_prefix(OWNED_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let seq: u32 = parts.next()?.parse().ok()?;
    Some((format!("{OWNED_PREFIX}{pid}-{seq}"), pid))
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// PID, it identifies a process even after PIDs wrap around.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that created lab `prefix` still runs.
fn owner_alive(prefix: &str, pid: u32) -> bool {
    let record = std::fs::read_to_string(Path::new(RUN_DIR).join(prefix)).ok();
    let recorded_start = record
        .as_deref()
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u64>().ok());
    match recorded_start {
        Some(start) => process_start_time(pid) == Some(start) && crate::process_alive(pid),
        None => crate::process_alive(pid),
    }
}

fn cleanup_stale_locked() -> anyhow::Result<Vec<String>> {
    let mut labs: std::collections::BTreeMap<String, (u32, Vec<String>)> = Default::default();
    for dir in [NETNS_DIR, RUN_DIR] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((prefix, pid)) = owned_lab_of(&format!("{name}-")) {
                let lab = labs.entry(prefix).or_insert((pid, Vec::new()));
                if dir == NETNS_DIR {
                    lab.1.push(name);
                }
            }
        }
    }
    let mut removed = Vec::new();
    for (prefix, (pid, namespaces)) in labs {
        if owner_alive(&prefix, pid) {
            continue;
        }
        for ns in &namespaces {
            remove_netns(ns);
        }
        let _ = std::fs::remove_file(Path::new(RUN_DIR).join(&prefix));
        removed.extend(namespaces);
    }
    Ok(removed)
}

/// Serialises lab construction and cleanup: within the process (a mutex) and between
/// processes (`flock` on /run/tern-testnet/lock). `ip netns add` mounts /run/netns on first
/// use, which must not race, and a cleanup must not see a lab half-built.
struct LabLock {
    _guard: MutexGuard<'static, ()>,
    _file: File,
}

impl LabLock {
    fn acquire() -> anyhow::Result<LabLock> {
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        let guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
        let path = Path::new(RUN_DIR).join("lock");
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{} stayed locked for {LOCK_TIMEOUT:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = writeln!(file, "{}", std::process::id());
        Ok(LabLock {
            _guard: guard,
            _file: file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let lab = NetLab::named("ternlab-42-7");
        assert_eq!(lab.ns(Member::Host1), "ternlab-42-7-host1");
        assert_eq!(lab.ns(Member::Storage), "ternlab-42-7-storage");
        assert_eq!(lab.switch_ns(), "ternlab-42-7-switch");
        assert_eq!(lab.ns(Member::Etcd3), "ternlab-42-7-etcd3");
        assert_eq!(lab.namespaces().len(), 9);
        assert_eq!(Member::Host3.ip(), Ipv4Addr::new(10, 77, 0, 3));
        assert_eq!(Member::Etcd1.ip(), Ipv4Addr::new(10, 77, 0, 221));
        assert!(Member::Host3.is_host() && !Member::Etcd1.is_host());
        assert_eq!(Member::Host2.ip(), Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(Member::Storage.ip(), Ipv4Addr::new(10, 77, 0, 200));
        assert_eq!(guest_ip(0), Some(Ipv4Addr::new(10, 77, 0, 10)));
        assert_eq!(guest_ip(89), Some(Ipv4Addr::new(10, 77, 0, 99)));
        assert_eq!(guest_ip(90), None);
        assert_eq!(Member::Host1.address_interface(), "br0");
        assert_eq!(Member::Client.address_interface(), "eth0");
        // Persistent labs never look like owned ones.
        assert!(check_fixed_prefix("tern").is_ok());
        assert!(check_fixed_prefix("ternlab-1").is_err());
        assert!(check_fixed_prefix("Tern").is_err());
        assert!(check_fixed_prefix("").is_err());
    }

    #[test]
    fn owned_lab_names_parse() {
        assert_eq!(
            owned_lab_of("ternlab-1234-5-host1"),
            Some(("ternlab-1234-5".to_string(), 1234))
        );
        assert_eq!(
            owned_lab_of("ternlab-1234-5-"),
            Some(("ternlab-1234-5".to_string(), 1234))
        );
        assert_eq!(owned_lab_of("tern-host1"), None);
        assert_eq!(owned_lab_of("ternlab-x-5-host1"), None);
        assert_eq!(owned_lab_of("ternlab-12"), None);
        assert!(process_start_time(std::process::id()).is_some());
    }
}
