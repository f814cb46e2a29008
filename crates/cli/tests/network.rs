//! Guests on the network and on shared storage, in the test lab (network namespaces: two hosts
//! with a bridge each, a client and an NBD server on one segment). Real ping, real curl, real
//! TAP devices; the guest checks its own disk blocks.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tern_testkit::{Member, NbdExport, NetLab};

/// A lab and a daemon on host1, the KVM lock held.
fn lab_host() -> (KvmLock, NetLab, Host) {
    let lock = KvmLock::acquire();
    let lab = NetLab::new().expect("build the network lab");
    let host = Host::in_lab(&lab, Member::Host1, "");
    (lock, lab, host)
}

/// TAP devices of tern guests in a host's namespace.
fn taps(lab: &NetLab, member: Member) -> Vec<String> {
    let out = lab
        .exec(member, "ip", &["-o", "link", "show"])
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
        })
        .filter(|n| n.starts_with("tern"))
        .collect()
}

#[test]
fn a_networked_guest_answers_ping_serves_echo_and_a_verified_download() {
    let (_lock, lab, host) = lab_host();
    let cfg = host.net_guest_config(
        "web",
        256,
        2,
        GUEST_IP,
        GUEST_MAC,
        "heartbeat_ms=200 disk_mib=0",
    );
    host.ok(&["create", cfg.to_str().expect("path")]);
    host.wait_heartbeat("web", 2, Duration::from_secs(20));
    assert_eq!(taps(&lab, Member::Host1), vec!["tern1.0".to_string()]);

    let ping = lab
        .ping(Member::Client, GUEST_IP, 50, Duration::from_millis(10))
        .expect("ping");
    assert_eq!(ping.lost(), 0, "lost pings: {:?}", ping.missing_seqs());

    let addr = SocketAddr::from((GUEST_IP, 7));
    let mut echo = lab
        .tcp_connect(Member::Client, addr, Duration::from_secs(5))
        .expect("echo");
    echo.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    echo.write_all(&message).expect("send");
    let mut back = vec![0u8; message.len()];
    echo.read_exact(&mut back).expect("receive");
    assert_eq!(back, message);

    let file = host.dir.join("download.bin");
    let started = Instant::now();
    let out = lab
        .exec(
            Member::Client,
            "curl",
            &[
                "-sS",
                "--fail",
                "-o",
                file.to_str().expect("path"),
                "http://10.77.0.10/download/104857600",
            ],
        )
        .expect("curl");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&file).expect("downloaded file");
    assert_eq!(data.len(), 104_857_600);
    assert_eq!(
        tern_testguest::verify_download(&data),
        Ok(()),
        "a byte differs"
    );
    println!(
        "100 MiB download in {seconds:.2} s: {:.0} MB/s",
        104_857_600.0 / seconds / 1e6
    );
    host.assert_no_failures("web");
}

#[test]
fn disk_workload_runs_a_minute_on_a_file_and_on_nbd() {
    let (_lock, lab, host) = lab_host();
    let file_disk = host.dir.join("file.img");
    let nbd_disk = host.dir.join("nbd.img");
    for d in [&file_disk, &nbd_disk] {
        std::fs::File::create(d)
            .and_then(|f| f.set_len(32 << 20))
            .expect("disk image");
    }
    let nbd = NbdExport::start(&lab, &nbd_disk, 10809).expect("NBD export");
    let params = "heartbeat_ms=500 disk_mib=16 disk_kibps=4096 disk_verify_ms=2000";
    let a = host.guest_config("filedisk", 256, 1, params);
    let b = host.guest_config("nbddisk", 256, 1, params);
    append(
        &a,
        &format!("disk = [ 'file:{},xvda,w' ]\n", file_disk.display()),
    );
    append(
        &b,
        &format!(
            "disk = [ 'nbd:{}:{},xvda,w' ]\n",
            nbd.addr().ip(),
            nbd.addr().port()
        ),
    );
    host.ok(&["create", a.to_str().expect("path")]);
    host.ok(&["create", b.to_str().expect("path")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(5));
        host.assert_no_failures("filedisk");
        host.assert_no_failures("nbddisk");
    }
    for name in ["filedisk", "nbddisk"] {
        let hb = host.heartbeats(name).pop().expect("beats").1;
        assert_eq!(hb.disk_errors, 0, "{name}");
        // 16 MiB written at 4 MiB/s takes 4 s; after a minute every block was read back many times.
        assert!(hb.disk_written >= 4096 * 10, "{name}: {hb:?}");
        assert!(hb.disk_verified >= 4096 * 10, "{name}: {hb:?}");
    }
    // The blocks on the disks themselves check out too (written by the guest, read by us).
    host.ok(&["destroy", "filedisk"]);
    let written = valid_disk_blocks(&file_disk, 4096);
    assert!(
        written > 4000,
        "only {written} valid blocks on the file disk"
    );
}

fn append(path: &std::path::Path, text: &str) {
    let mut t = std::fs::read_to_string(path).expect("config");
    t.push_str(text);
    std::fs::write(path, t).expect("config");
}

#[test]
fn ping_resumes_within_a_second_after_save_and_restore() {
    let (_lock, lab, host) = lab_host();
    let cfg = host.net_guest_config(
        "p",
        256,
        1,
        GUEST_IP,
        GUEST_MAC,
        "heartbeat_ms=200 disk_mib=0",
    );
    host.ok(&["create", cfg.to_str().expect("path")]);
    host.wait_heartbeat("p", 2, Duration::from_secs(20));
    let mut ping = std::process::Command::new(tern_testkit::find_program("ping").expect("ping"));
    ping.args(["-n", "-D", "-i", "0.02", "-c", "200", "10.77.0.10"]);
    ping.stdout(std::process::Stdio::piped());
    let child = lab.spawn_in(Member::Client, ping).expect("ping");
    std::thread::sleep(Duration::from_millis(800));
    let file = host.dir.join("p.tern");
    host.ok(&["save", "p", file.to_str().expect("path")]);
    std::thread::sleep(Duration::from_millis(300)); // the guest is gone for a while
    host.ok(&["restore", file.to_str().expect("path")]);
    let restored_at = unix_now();
    let out = child.wait_with_output().expect("ping output");
    let report = tern_testkit::PingReport::parse(&String::from_utf8_lossy(&out.stdout))
        .expect("ping report");
    let first_after = report
        .replies
        .iter()
        .filter_map(|r| r.timestamp)
        .find(|&t| t >= restored_at)
        .expect("no ping reply after the restore");
    assert!(
        first_after - restored_at < 1.0,
        "first reply {:.3} s after the restore",
        first_after - restored_at
    );
    assert!(
        report.received > 150,
        "only {} of 200 replies",
        report.received
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[test]
fn bad_network_and_disk_configs_are_refused_and_leave_no_tap() {
    let (_lock, lab, host) = lab_host();
    let cases = [
        (
            "vif = [ 'mac=02:77:00:00:00:11, bridge=nosuchbr' ]\n",
            "bridge nosuchbr does not exist",
        ),
        (
            "vif = [ 'mac=02:77:zz:00:00:11, bridge=br0' ]\n",
            "invalid MAC address",
        ),
        (
            "disk = [ 'file:/nonexistent/disk.img,xvda,w' ]\n",
            "/nonexistent/disk.img",
        ),
        (
            "disk = [ 'nbd:10.77.0.200:10999,xvda,w' ]\n",
            "10.77.0.200:10999",
        ),
    ];
    for (i, (line, expected)) in cases.iter().enumerate() {
        let cfg = host.guest_config(&format!("bad{i}"), 128, 1, "heartbeat_ms=500");
        append(&cfg, line);
        let err = host.fails(&["create", cfg.to_str().expect("path")]);
        assert!(err.contains(expected), "case {i}: {err}");
        assert!(host.list().is_empty(), "case {i} left a domain");
        assert!(
            taps(&lab, Member::Host1).is_empty(),
            "case {i} left a TAP: {:?}",
            taps(&lab, Member::Host1)
        );
    }
}

/// A checkpoint taken with a download in progress and the disk being written loses nothing:
/// the download (one TCP connection across the save and the restore) completes with every
/// byte right, and the guest's disk and memory checks stay clean.
#[test]
fn save_and_restore_with_traffic_and_disk_io_in_flight_loses_nothing() {
    let (_lock, lab, host) = lab_host();
    let disk = host.dir.join("inflight.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(32 << 20))
        .expect("disk image");
    let cfg = host.net_guest_config(
        "busy",
        512,
        2,
        GUEST_IP,
        GUEST_MAC,
        "heartbeat_ms=200 wss_mib=64 write_mibps=32 verify_ms=1000 disk_mib=16 disk_kibps=8192 disk_verify_ms=1000",
    );
    append(
        &cfg,
        &format!("disk = [ 'file:{},xvda,w' ]\n", disk.display()),
    );
    host.ok(&["create", cfg.to_str().expect("path")]);
    host.wait_heartbeat("busy", 5, Duration::from_secs(20));

    // A slow download (curl limits its rate), so that it is surely in flight at the save.
    let mut download = Download::start(&lab, host.dir.join("inflight.bin"), "20M");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        download.running(),
        "the download should still be running when the checkpoint starts"
    );
    let checkpoint = host.dir.join("busy.tern");
    host.ok(&["save", "busy", checkpoint.to_str().expect("path")]);
    host.ok(&["restore", checkpoint.to_str().expect("path")]);
    download.assert_complete();

    let before = host.heartbeats("busy").pop().expect("beats").1;
    let after = host.wait_heartbeat("busy", before.seq + 10, Duration::from_secs(20));
    assert!(after.disk_verified > before.disk_verified);
    assert_eq!(after.disk_errors, 0);
    assert_eq!(after.mem_errors, 0);
    assert_eq!(after.reg_errors, 0);
    host.assert_no_failures("busy");
}
