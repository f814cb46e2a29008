//! The network lab, for real: these need root and iproute2 (as CI has), and build
//! namespaces only; nothing is added to the root namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use tern_testkit::{
    find_tern, netns_exists, process_alive, wait_for, Member, NbdExport, NetLab, GUEST_BRIDGE,
};

/// Tests building labs hold this shared; the stale-lab test holds it alone, because its fake
/// abandoned lab is fair game for the cleanup every new lab runs.
static LABS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    LABS.read().unwrap_or_else(|p| p.into_inner())
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The inode of a process's network namespace.
fn netns_inode_of(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

#[test]
fn members_reach_each_other_and_teardown_leaves_nothing() {
    let _shared = shared();
    let root_veths = ip(&["-o", "link", "show", "type", "veth"]);
    let root_links = ip(&["-o", "link", "show"]).lines().count();
    let ipv6_sysctl = "/proc/sys/net/ipv6/conf/all/disable_ipv6";
    let root_ipv6 = std::fs::read_to_string(ipv6_sysctl).ok();

    let lab = NetLab::new().expect("build a lab");
    let namespaces: Vec<String> = lab.namespaces().iter().map(|s| s.to_string()).collect();
    let listed = ip(&["netns", "list"]);
    for ns in &namespaces {
        assert!(listed.contains(ns.as_str()), "{ns} not in {listed}");
        assert!(
            ns.starts_with(&format!("ternlab-{}-", std::process::id())),
            "{ns}"
        );
    }
    print!("{}", lab.describe());

    // Every pair that matters for migration tests: host ↔ host, client ↔ hosts, hosts ↔
    // storage.
    for (from, to) in [
        (Member::Host1, Member::Host2),
        (Member::Host2, Member::Host1),
        (Member::Host2, Member::Client),
        (Member::Client, Member::Host1),
        (Member::Host1, Member::Storage),
        (Member::Client, Member::Storage),
    ] {
        let r = lab
            .ping(from, to.ip(), 3, Duration::from_millis(50))
            .unwrap();
        assert_eq!(
            (r.transmitted, r.received),
            (3, 3),
            "{from:?} -> {to:?}: {r:?}"
        );
        assert_eq!(r.rtts().len(), 3);
        assert!(r.max_rtt().unwrap() < Duration::from_secs(1));
    }
    // Nothing answers for an unused guest address; losses are reported, not errors.
    let r = lab
        .ping(
            Member::Client,
            Ipv4Addr::new(10, 77, 0, 10),
            1,
            Duration::from_millis(100),
        )
        .unwrap();
    assert_eq!((r.transmitted, r.received), (1, 0));

    // A host's address sits on br0, which enslaves the uplink; /sys shows the namespace.
    let out = lab
        .exec(
            Member::Host1,
            "ip",
            &["-o", "link", "show", "master", GUEST_BRIDGE],
        )
        .unwrap();
    assert!(stdout(&out).contains("eth0@"), "{}", stdout(&out));
    let out = lab.exec(Member::Host2, "ls", &["/sys/class/net"]).unwrap();
    let sys = stdout(&out);
    assert!(sys.contains("br0") && sys.contains("eth0"), "{sys}");
    assert!(!sys.contains("sw0"));
    // IPv6 is off inside the lab, untouched outside.
    let out = lab.exec(Member::Client, "cat", &[ipv6_sysctl]).unwrap();
    if root_ipv6.is_some() {
        assert_eq!(stdout(&out).trim(), "1");
    }
    assert_eq!(std::fs::read_to_string(ipv6_sysctl).ok(), root_ipv6);

    // Long-running things started in the lab are the lab's: they end with it.
    let mut cmd = Command::new("sleep");
    cmd.arg("600").stdout(Stdio::null());
    let mut sleeper = lab.spawn_in(Member::Client, cmd).unwrap();
    let sleeper_pid = sleeper.id();
    let client_ns_ino = std::fs::metadata(format!("/run/netns/{}", lab.ns(Member::Client)))
        .unwrap()
        .ino();
    assert_eq!(netns_inode_of(sleeper_pid), client_ns_ino);

    drop(lab);

    let listed = ip(&["netns", "list"]);
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind: {listed}");
        assert!(!netns_exists(ns));
    }
    assert_eq!(ip(&["-o", "link", "show", "type", "veth"]), root_veths);
    assert_eq!(ip(&["-o", "link", "show"]).lines().count(), root_links);
    assert!(
        sleeper.try_wait().unwrap().is_some(),
        "the sleeper was killed"
    );
    let prefix = namespaces[0].trim_end_matches("-switch");
    assert!(!std::path::Path::new("/run/tern-testnet")
        .join(prefix)
        .exists());
}

#[test]
fn the_test_process_can_talk_through_the_lab() {
    let _shared = shared();
    let lab = NetLab::new().unwrap();
    let listener = lab
        .run_in(Member::Host2, || TcpListener::bind((Member::Host2.ip(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let mut s = lab
        .tcp_connect(Member::Client, addr, Duration::from_secs(5))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello").unwrap();
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello");
    let peer: SocketAddr = server.join().unwrap();
    assert_eq!(peer.ip(), Member::Client.ip());
}

#[test]
fn labs_of_dead_processes_are_cleaned_up() {
    let _alone = LABS.write().unwrap_or_else(|p| p.into_inner());
    // A PID that no longer runs, and namespaces "left" by it.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dead = gone.id();
    let prefix = format!("ternlab-{dead}-0");
    let switch = format!("{prefix}-switch");
    let host = format!("{prefix}-host1");
    ip(&["netns", "add", &switch]);
    ip(&["netns", "add", &host]);
    ip(&[
        "-n", &switch, "link", "add", "host1", "type", "veth", "peer", "name", "eth0", "netns",
        &host,
    ]);
    std::fs::create_dir_all("/run/tern-testnet").unwrap();
    std::fs::write(format!("/run/tern-testnet/{prefix}"), format!("{dead} 1\n")).unwrap();
    // A process it left running in its namespace.
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    tern_testkit::enter_netns(&mut cmd, &host).unwrap();
    let mut sleeper = cmd.spawn().unwrap();

    // Our own labs are not stale.
    let mine = NetLab::new().unwrap();
    NetLab::cleanup_stale().unwrap();

    assert!(!netns_exists(&switch) && !netns_exists(&host));
    assert!(!std::path::Path::new("/run/tern-testnet")
        .join(&prefix)
        .exists());
    assert!(wait_for(Duration::from_secs(5), || sleeper
        .try_wait()
        .unwrap()
        .is_some()));
    assert!(mine.is_complete());
}

#[test]
fn persistent_labs_outlive_their_value_until_taken_down() {
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = NetLab::down_persistent(&self.0);
        }
    }
    let _shared = shared();
    let prefix = format!("tt{}", std::process::id());
    let _down = Down(prefix.clone());
    assert!(NetLab::open_persistent(&prefix).is_err());
    let lab = NetLab::up_persistent(&prefix).unwrap();
    assert_eq!(lab.ns(Member::Host1), format!("{prefix}-host1"));
    drop(lab);
    let lab = NetLab::open_persistent(&prefix).unwrap();
    assert!(lab.is_complete());
    // `up` again reuses it.
    let again = NetLab::up_persistent(&prefix).unwrap();
    let r = again
        .ping(
            Member::Host1,
            Member::Host2.ip(),
            1,
            Duration::from_millis(50),
        )
        .unwrap();
    assert_eq!(r.received, 1);
    NetLab::down_persistent(&prefix).unwrap();
    assert!(!lab.is_complete());
    assert!(lab.namespaces().iter().all(|ns| !netns_exists(ns)));
    assert!(
        NetLab::up_persistent("ternlab-1-2").is_err(),
        "owned names are reserved"
    );
}

#[test]
fn nbd_export_serves_the_image_to_the_segment() {
    let _shared = shared();
    let lab = NetLab::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0xabu8; 1 << 20]).unwrap();
    let export = NbdExport::start(&lab, &image, 10809).expect("start qemu-nbd");
    assert_eq!(export.uri(), "nbd://10.77.0.200:10809");
    let pid = export.pid();
    assert_eq!(
        netns_inode_of(pid),
        std::fs::metadata(format!("/run/netns/{}", lab.ns(Member::Storage)))
            .unwrap()
            .ino()
    );
    // A host reads the data through the network (qemu-io is qemu-nbd's sibling).
    if let Some(qemu_io) = tern_testkit::find_program("qemu-io") {
        let out = lab
            .exec(
                Member::Host1,
                qemu_io.to_str().unwrap(),
                &[
                    "-f",
                    "raw",
                    "-r",
                    "-c",
                    "read -P 0xab 0 65536",
                    &export.uri(),
                ],
            )
            .unwrap();
        let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success() && text.contains("read 65536/65536 bytes"),
            "{text}"
        );
        assert!(!text.contains("verification failed"), "{text}");
    }
    drop(export);
    assert!(!process_alive(pid));
}

#[test]
fn a_daemon_runs_in_a_lab_host() {
    let tern = match find_tern() {
        Ok(t) => t,
        Err(e) => {
            // The tern executable belongs to another package; `cargo test --workspace`
            // builds it, `cargo test -p tern-testkit` alone may not.
            eprintln!("skipping: {e:#}");
            return;
        }
    };
    let _shared = shared();
    let lab = NetLab::new().unwrap();
    let host = lab
        .start_host(&tern, Member::Host1, "[relocation]\nserver = false\n")
        .expect("daemon in host1");
    assert_eq!(host.netns(), Some(lab.ns(Member::Host1)));
    let config = std::fs::read_to_string(host.config_path()).unwrap();
    assert!(config.contains("[relocation]"), "{config}");
    let pid = host.daemon_pid().unwrap();
    let host1_ino = std::fs::metadata(format!("/run/netns/{}", lab.ns(Member::Host1)))
        .unwrap()
        .ino();
    assert_eq!(netns_inode_of(pid), host1_ino);
    // The CLI reaches it through its socket from the root namespace.
    assert!(host.list().unwrap().is_empty());
    drop(host);
    assert!(!process_alive(pid));
}
