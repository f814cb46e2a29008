//! Guest processes are contained (`[sandbox]`): every thread of a running one is under a
//! system-call filter, it runs in PID, mount and IPC namespaces of its own, it sits in its own
//! control group with the limits its guest's config gives, and a forbidden call ends that
//! process alone, with the daemon naming the call.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tern_testkit::wait_for;

/// A test guest that checks its memory and registers.
const CHECKING: &str = "heartbeat_ms=100 wss_mib=8 verify_ms=500";

/// `field` of `/proc/<pid>/task/<tid>/status` for every thread of `pid`: (thread name, value).
fn thread_status(pid: u32, field: &str) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("threads of the process");
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let value = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((value("Name:"), value(&format!("{field}:"))));
    }
    out
}

/// The directory of `pid`'s group in the v1 hierarchy of `controller`.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroups of pid");
    let path = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then_some(path)
        })
        .unwrap_or_else(|| panic!("{pid} is in no {controller} group:\n{text}"));
    PathBuf::from("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
}

fn read_trimmed(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn every_thread_is_filtered_and_the_process_is_limited() {
    let host = Host::start();
    host.create_guest("g", 96, 2, CHECKING);
    let pid = host.guest_pid("g");

    let threads = thread_status(pid, "Seccomp");
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"vcpu0") && names.contains(&"vcpu1"),
        "{names:?}"
    );
    for (name, mode) in &threads {
        assert_eq!(
            mode, "2",
            "thread {name} of the guest process is not filtered"
        );
    }
    assert_eq!(
        thread_status(pid, "NoNewPrivs")[0].1,
        "1",
        "no_new_privs is not set"
    );

    for ns in ["pid", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("its namespace");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("our namespace");
        assert_ne!(theirs, ours, "the guest process shares our {ns} namespace");
    }
    // In its PID namespace it is the first process, and its /proc shows no other.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let ns_pids = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid");
    assert_eq!(
        ns_pids.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "{ns_pids}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("its mounts");
    let proc_mounts = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/proc"))
        .count();
    assert!(
        proc_mounts >= 2,
        "no /proc of its own over the host's:\n{mounts}"
    );

    let memory = cgroup_dir(pid, "memory");
    assert!(
        memory.parent().and_then(|p| p.file_name()) == Some("tern".as_ref()),
        "the guest process is not in a group of its own: {}",
        memory.display()
    );
    // 96 MiB of RAM and the default 512 MiB of overhead; two vCPUs and one CPU more.
    assert_eq!(
        read_trimmed(memory.join("memory.limit_in_bytes")),
        ((96u64 + 512) << 20).to_string()
    );
    let cpu = cgroup_dir(pid, "cpu");
    assert_eq!(read_trimmed(cpu.join("cpu.cfs_quota_us")), "300000");
    assert_eq!(read_trimmed(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(
        read_trimmed(cgroup_dir(pid, "pids").join("pids.max")),
        "256"
    );
    let tasks = read_trimmed(cgroup_dir(pid, "pids").join("pids.current"));
    assert!(tasks.parse::<u32>().expect("a count") >= 3, "{tasks} tasks");

    let since = host.wait_heartbeat("g", 2, Duration::from_secs(20));
    host.assert_checks_clean("g", &since);

    host.ok(&["destroy", "g"]);
    assert!(
        wait_for(Duration::from_secs(10), || !memory.exists()),
        "{} is left after the guest ended",
        memory.display()
    );
}

/// Sends one request to a guest process directly, on its control socket.
fn ask_guest_process(host: &Host, name: &str, request: &str) -> String {
    let id = host
        .list()
        .into_iter()
        .find(|d| d["name"] == name)
        .and_then(|d| d["id"].as_u64())
        .expect("the guest's id");
    let socket = domain_dir(host, id).join("control.sock");
    let mut stream = UnixStream::connect(&socket).expect("the guest's control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    writeln!(stream, "{request}").expect("send");
    let mut reply = String::new();
    let _ = BufReader::new(stream).read_line(&mut reply);
    reply
}

#[test]
fn a_forbidden_call_ends_that_guest_alone_and_is_named() {
    let host = Host::start_with_toml("[sandbox]\ntest_requests = true\n");
    // Kept listed after it crashed, to be asked why.
    let config = host.guest_config("victim", 64, 1, CHECKING);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("on_crash = \"preserve\"\n");
    std::fs::write(&config, text).expect("config");
    host.ok(&["create", config.to_str().expect("utf-8 path")]);
    host.wait_heartbeat("victim", 1, Duration::from_secs(20));
    host.create_guest("neighbour", 64, 1, CHECKING);
    let neighbour_pid = host.guest_pid("neighbour");
    let before = host.last_beat("neighbour");

    let reply = ask_guest_process(&host, "victim", r#"{"op":"test_forbidden_call"}"#);
    assert!(
        reply.is_empty(),
        "the process answered instead of dying: {reply}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || host.state("victim").as_deref()
            == Some("crashed")),
        "victim is not listed crashed: {:?}",
        host.list()
    );
    let victim = host
        .list()
        .into_iter()
        .find(|d| d["name"] == "victim")
        .expect("victim listed");
    let note = victim["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("killed by its sandbox: thread control-conn (inherited control)")
            && note.contains("system call 59 (execve)"),
        "tern list does not say why: {victim}"
    );
    let listed = host.ok(&["list"]);
    assert!(listed.contains("execve"), "{listed}");

    // The neighbour and the daemon go on.
    assert_eq!(host.guest_pid("neighbour"), neighbour_pid);
    host.wait_heartbeat("neighbour", before.seq + 3, Duration::from_secs(20));
    host.assert_checks_clean("neighbour", &before);
}

#[test]
fn test_requests_are_refused_unless_the_host_takes_them() {
    let host = Host::start();
    host.create_guest("g", 64, 1, CHECKING);
    let reply = ask_guest_process(&host, "g", r#"{"op":"test_forbidden_call"}"#);
    assert!(reply.contains("takes no test requests"), "{reply}");
    let since = host.last_beat("g");
    host.wait_heartbeat("g", since.seq + 2, Duration::from_secs(20));
}
