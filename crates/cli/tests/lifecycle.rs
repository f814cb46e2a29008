//! Guest life cycle under a real daemon: boot, heartbeats, pause/unpause, memory and register
//! checks, destroy, two guests, a killed guest process, shutdown, console, daemon restart.

mod common;

use std::time::Duration;

use common::*;

/// Heartbeats arrive at the configured period, with consecutive sequence numbers, and the
/// guest's own clock advances by the same period.
#[test]
fn heartbeats_arrive_at_the_configured_period() {
    let host = Host::start();
    host.create_guest("hb", 128, 1, "heartbeat_ms=100");
    host.wait_heartbeat("hb", 21, Duration::from_secs(20));
    let beats = host.heartbeats("hb");
    let seqs: Vec<u64> = beats.iter().map(|(_, h)| h.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "sequence has gaps: {seqs:?}"
    );
    let (first, last) = (&beats[0], &beats[beats.len() - 1]);
    let n = (last.1.seq - first.1.seq) as f64;
    let host_period = (last.0 - first.0) / n;
    let guest_period = (last.1.t_us - first.1.t_us) as f64 / n / 1e6;
    assert!(
        (0.09..0.11).contains(&host_period),
        "host-observed period {host_period} s"
    );
    assert!(
        (0.099..0.101).contains(&guest_period),
        "guest-observed period {guest_period} s"
    );
    assert_eq!(host.state("hb").as_deref(), Some("blocked"));
    host.assert_no_failures("hb");
}

/// Pause stops the heartbeats; unpause resumes them with the next sequence number.
#[test]
fn pause_stops_heartbeats_and_unpause_continues_the_sequence() {
    let host = Host::start();
    host.create_guest("p", 128, 2, "heartbeat_ms=100");
    host.wait_heartbeat("p", 5, Duration::from_secs(20));
    host.ok(&["pause", "p"]);
    assert_eq!(host.state("p").as_deref(), Some("paused"));
    let at_pause = host.heartbeats("p").last().expect("beats").1.seq;
    std::thread::sleep(Duration::from_millis(1000));
    let still = host.heartbeats("p").last().expect("beats").1.seq;
    assert_eq!(at_pause, still, "heartbeats continued while paused");

    host.ok(&["unpause", "p"]);
    host.wait_heartbeat("p", at_pause + 3, Duration::from_secs(20));
    let seqs: Vec<u64> = host.heartbeats("p").iter().map(|(_, h)| h.seq).collect();
    let after: Vec<u64> = seqs.iter().copied().filter(|&s| s > at_pause).collect();
    assert_eq!(after[0], at_pause + 1, "sequence after unpause: {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "sequence has gaps: {seqs:?}"
    );
    host.assert_no_failures("p");
}

/// A 1 GiB guest with a 256 MiB working set written at 64 MiB/s: every page verifies and the
/// fixed register values survive every sleep, on both vCPUs.
#[test]
fn memory_and_register_checks_pass_on_a_busy_1gib_guest() {
    let host = Host::start();
    host.create_guest(
        "mem",
        1024,
        2,
        "heartbeat_ms=250 wss_mib=256 write_mibps=64 verify_ms=2000",
    );
    let first = host.wait_heartbeat("mem", 1, Duration::from_secs(20));
    let hb = host.wait_heartbeat("mem", first.seq + 24, Duration::from_secs(30));
    assert_eq!(hb.cpus, 2);
    assert!(hb.passes >= 2, "full verification passes: {}", hb.passes);
    assert_eq!(hb.mem_errors, 0);
    assert_eq!(hb.reg_errors, 0);
    assert!(hb.reg_checks > 100, "register checks: {}", hb.reg_checks);
    // 64 MiB/s is 16384 pages/s; over ~6 s the writer must have kept that rate.
    let seconds = (hb.t_us - first.t_us) as f64 / 1e6;
    let rate = (hb.written - first.written) as f64 / seconds;
    assert!(
        (15_000.0..17_500.0).contains(&rate),
        "write rate {rate} pages/s"
    );
    host.assert_no_failures("mem");
}

/// Destroy stops the guest process and forgets the domain.
#[test]
fn destroy_frees_the_guest() {
    let host = Host::start();
    host.create_guest("d", 256, 1, "heartbeat_ms=100");
    let pid = host.guest_pid("d");
    let id = host.list()[0]["id"].as_u64().expect("id");
    host.ok(&["destroy", "d"]);
    assert!(host.list().is_empty());
    assert!(
        wait_for(Duration::from_secs(5), || !process_alive(pid)),
        "guest process {pid} survived"
    );
    assert!(
        !domain_dir(&host, id).exists(),
        "domain directory left behind"
    );
    // IDs are not reused.
    host.create_guest("d", 256, 1, "heartbeat_ms=100");
    assert!(host.list()[0]["id"].as_u64().expect("id") > id);
}

/// Two guests run at once; killing one guest's process leaves the daemon and the other guest
/// running and marks the killed one crashed (kept until destroyed).
#[test]
fn a_killed_guest_process_is_crashed_and_others_go_on() {
    let host = Host::start();
    host.create_guest("one", 256, 1, "heartbeat_ms=100");
    host.create_guest("two", 256, 1, "heartbeat_ms=100");
    kill9(host.guest_pid("one"));
    assert!(
        wait_for(Duration::from_secs(10), || host.state("one").as_deref()
            == Some("crashed")),
        "state after kill: {:?}",
        host.state("one")
    );
    let before = host.heartbeats("two").last().expect("beats").1.seq;
    host.wait_heartbeat("two", before + 5, Duration::from_secs(10));
    assert!(matches!(
        host.state("two").as_deref(),
        Some("running" | "blocked")
    ));
    // The crashed domain's console log is still there, and destroy removes it.
    assert!(host.console("one").contains("tern-guest: hb"));
    host.ok(&["destroy", "one"]);
    assert_eq!(host.list().len(), 1);
    host.assert_no_failures("two");
}

/// `tern shutdown -w` presses the ACPI power button; the guest powers off and is gone.
#[test]
fn shutdown_powers_the_guest_off() {
    let host = Host::start();
    host.create_guest("s", 128, 1, "heartbeat_ms=100");
    let pid = host.guest_pid("s");
    host.ok(&["shutdown", "-w", "s"]);
    assert!(host.list().is_empty(), "still listed: {:?}", host.list());
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
}

/// With on_poweroff = "preserve" a powered-off guest stays listed as shutdown.
#[test]
fn preserved_guest_is_listed_as_shutdown() {
    let host = Host::start();
    let cfg = host.guest_config("keep", 128, 1, "heartbeat_ms=100");
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str("on_poweroff = \"preserve\"\n");
    std::fs::write(&cfg, text).expect("config");
    host.ok(&["create", cfg.to_str().expect("path")]);
    host.wait_heartbeat("keep", 2, Duration::from_secs(20));
    host.ok(&["shutdown", "--wait", "keep"]);
    assert_eq!(host.state("keep").as_deref(), Some("shutdown"));
    assert!(host.console("keep").contains("power button pressed"));
    host.ok(&["destroy", "keep"]);
    assert!(host.list().is_empty());
}

/// `tern console` with stdin not a terminal streams output and ends by itself when the guest
/// leaves the host.
#[test]
fn console_streams_and_ends_when_the_guest_goes() {
    let host = Host::start();
    host.create_guest("c", 128, 1, "heartbeat_ms=50");
    let mut console = std::process::Command::new(tern_bin())
        .args([
            "--socket",
            host.socket.to_str().expect("path"),
            "console",
            "c",
            "--timestamps",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("console");
    std::thread::sleep(Duration::from_millis(1500));
    host.ok(&["destroy", "c"]);
    let ended = wait_for(Duration::from_secs(5), || {
        matches!(console.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = console.kill();
    }
    assert!(ended, "console did not end when the guest was destroyed");
    let out = console.wait_with_output().expect("output");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let beats: Vec<Heartbeat> = text.lines().filter_map(Heartbeat::parse).collect();
    assert!(
        beats.len() >= 10,
        "streamed {} heartbeats:\n{text}",
        beats.len()
    );
    assert!(beats.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // Every streamed line carries a host timestamp.
    assert!(text.lines().all(|l| l
        .split_once(' ')
        .is_some_and(|(t, _)| t.parse::<f64>().is_ok())));
}

/// A restarted daemon adopts the guests that kept running without it.
#[test]
fn restarted_daemon_adopts_running_guests() {
    let mut host = Host::start();
    host.create_guest("a", 128, 1, "heartbeat_ms=100");
    let pid = host.guest_pid("a");
    host.kill_daemon();
    std::thread::sleep(Duration::from_millis(500));
    assert!(process_alive(pid), "guest died with the daemon");
    host.start_daemon();
    assert_eq!(host.guest_pid("a"), pid);
    let before = host.heartbeats("a").last().expect("beats").1.seq;
    host.wait_heartbeat("a", before + 3, Duration::from_secs(10));
    host.ok(&["pause", "a"]);
    assert_eq!(host.state("a").as_deref(), Some("paused"));
    host.ok(&["destroy", "a"]);
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
}

/// Two daemons side by side, each with its own guest of the same name.
#[test]
fn two_daemons_run_side_by_side() {
    let first = Host::start();
    let second = Host::start_unlocked();
    first.create_guest("twin", 128, 1, "heartbeat_ms=100");
    second.create_guest("twin", 128, 1, "heartbeat_ms=100");
    assert_eq!(first.list().len(), 1);
    assert_eq!(second.list().len(), 1);
    assert_ne!(first.guest_pid("twin"), second.guest_pid("twin"));
    first.ok(&["destroy", "twin"]);
    let before = second.heartbeats("twin").last().expect("beats").1.seq;
    second.wait_heartbeat("twin", before + 3, Duration::from_secs(10));
}

/// Clear errors: unknown domains, bad configs (naming the line), missing kernel, duplicates.
#[test]
fn bad_requests_get_clear_errors() {
    let host = Host::start();
    let err = host.fails(&["pause", "nosuch"]);
    assert!(err.contains("no domain 'nosuch'"), "{err}");
    let err = host.fails(&["destroy", "42"]);
    assert!(err.contains("no domain '42'"), "{err}");

    let bad = host.dir.join("bad.cfg");
    std::fs::write(&bad, "name = \"x\"\nmemory = 128\nvcpus = = 2\n").expect("write");
    let err = host.fails(&["create", bad.to_str().expect("path")]);
    assert!(err.contains("line 3"), "{err}");

    let nokernel = host.dir.join("nokernel.cfg");
    std::fs::write(
        &nokernel,
        "name = \"x\"\nmemory = 128\nkernel = \"/nonexistent/vmlinux\"\n",
    )
    .expect("write");
    let err = host.fails(&["create", nokernel.to_str().expect("path")]);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    assert!(
        host.list().is_empty(),
        "a failed create left a domain behind"
    );

    let err = host.fails(&["create", "/nonexistent.cfg"]);
    assert!(err.contains("/nonexistent.cfg"), "{err}");

    host.create_guest("dup", 128, 1, "heartbeat_ms=100");
    let again = host.guest_config("dup", 128, 1, "");
    let err = host.fails(&["create", again.to_str().expect("path")]);
    assert!(err.contains("already exists"), "{err}");

    let huge = host.guest_config("huge", 1 << 20, 1, "");
    let err = host.fails(&["create", huge.to_str().expect("path")]);
    assert!(err.contains("not enough free memory"), "{err}");
    assert_eq!(host.list().len(), 1);

    let err = host.fails(&["frobnicate"]);
    assert!(err.contains("frobnicate"), "{err}");
}

/// Without a daemon the CLI says so.
#[test]
fn missing_daemon_is_a_clear_error() {
    let out = std::process::Command::new(tern_bin())
        .args(["--socket", "/nonexistent/ternd.sock", "list"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("Error: cannot reach the tern daemon"),
        "{err}"
    );
}

/// Output cut short by the reader (`tern list | head -1`) ends the command quietly: no panic,
/// no error, and the shell sees the reader's success.
#[test]
fn a_closed_output_pipe_is_not_an_error() {
    let host = Host::start_unlocked();
    host.ok(&["trust", "add", &format!("sha256:{}", "ab".repeat(32))]);
    let tern = format!(
        "{} --socket {}",
        tern_bin().display(),
        host.socket.display()
    );
    let shell = |script: String| {
        std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .expect("bash")
    };
    for command in ["list", "list --json", "trust list", "fingerprint"] {
        // `true` exits without reading: tern's first write finds the pipe closed.
        let out = shell(format!("{tern} {command} | true"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "tern {command} | true: {stderr}"
        );
        let out = shell(format!("{tern} {command} | head -1"));
        assert!(out.status.success(), "tern {command} | head -1: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
