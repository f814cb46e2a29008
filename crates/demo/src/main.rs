//! The demo behind `scripts/demo`: on this one machine, a test lab of network namespaces
//! (two hosts and a client on one segment), a tern daemon on host1, and a networked test guest
//! on it that the client pings and downloads from, through a checkpoint and back. Every
//! command is printed before its output, like a terminal transcript.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_testkit::{Member, NetLab, TernHost};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);

fn main() {
    if let Err(e) = run() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

/// Prints and runs `tern args`, showing its output.
fn show(host: &TernHost, args: &[&str]) -> anyhow::Result<String> {
    println!("\nhost1$ tern {}", args.join(" "));
    let out = host.output(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("tern {} failed", args.join(" "));
    }
    Ok(stdout)
}

/// Heartbeat lines so far, with the host time each arrived.
fn heartbeats(host: &TernHost, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(host
        .stamped_lines(name)?
        .into_iter()
        .filter(|(_, l)| l.contains("tern-guest: hb "))
        .map(|(t, l)| format!("{t:.6} {l}"))
        .collect())
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    println!("== tern demo ==");
    println!("\nA lab of network namespaces on this machine: host1 and host2 (each with a bridge");
    println!("br0 for guests), a client, all on one layer-2 segment.");
    let lab = NetLab::new().context("cannot build the network lab (the demo needs root)")?;
    print!("{}", lab.describe());
    let host = lab.start_host(&tern, Member::Host1, "")?;
    println!(
        "\nhost1$ tern daemon --config {} &",
        host.config_path().display()
    );

    let cfg = host.guest_config(
        "web",
        1024,
        2,
        &format!(
            "ip={GUEST_IP}/24 gw=10.77.0.1 heartbeat_ms=500 wss_mib=128 write_mibps=32 disk_mib=0"
        ),
    )?;
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str("vif = [ 'mac=02:77:00:00:00:10, bridge=br0' ]\n");
    std::fs::write(&cfg, &text)?;
    println!("\nhost1$ cat {}\n{}", cfg.display(), text.trim_end());
    show(&host, &["create", tern_testkit::path_arg(&cfg)?])?;
    std::thread::sleep(Duration::from_secs(2));
    show(&host, &["list"])?;

    println!("\nclient$ ping -c 5 -i 0.2 {GUEST_IP}");
    let ping = lab.ping(Member::Client, GUEST_IP, 5, Duration::from_millis(200))?;
    for r in &ping.replies {
        println!(
            "64 bytes from {GUEST_IP}: icmp_seq={} time={:.2} ms",
            r.seq,
            r.rtt.as_secs_f64() * 1e3
        );
    }
    println!(
        "{} transmitted, {} received",
        ping.transmitted, ping.received
    );

    download(&lab, &host)?;

    println!("\nA checkpoint and back, while the client keeps pinging every 20 ms:");
    let checkpoint = host.dir().join("web.tern");
    let checkpoint = tern_testkit::path_arg(&checkpoint)?.to_string();
    let mut cmd = std::process::Command::new(tern_testkit::ensure_program("ping", "iputils-ping")?);
    cmd.args(["-n", "-i", "0.02", "-c", "100", &GUEST_IP.to_string()])
        .stdout(std::process::Stdio::piped());
    let pinger = lab.spawn_in(Member::Client, cmd)?;
    std::thread::sleep(Duration::from_millis(500));
    show(&host, &["save", "web", &checkpoint])?;
    show(&host, &["restore", &checkpoint])?;
    let out = pinger.wait_with_output()?;
    let report = tern_testkit::PingReport::parse(&String::from_utf8_lossy(&out.stdout))?;
    println!(
        "client: {} pings, {} replies (lost around the save and restore: {:?})",
        report.transmitted,
        report.received,
        report.missing_seqs()
    );
    println!("\nThe guest's own heartbeats: the sequence runs on, its checks pass:");
    for line in heartbeats(&host, "web")?.iter().rev().take(3).rev() {
        println!("  {line}");
    }
    show(&host, &["destroy", "web"])?;
    println!("\n== demo complete ==");
    Ok(())
}

fn download(lab: &NetLab, host: &TernHost) -> anyhow::Result<()> {
    let file = host.dir().join("download.bin");
    let url = format!("http://{GUEST_IP}/download/33554432");
    println!("\nclient$ curl -o download.bin {url}");
    let started = std::time::Instant::now();
    let out = lab.exec(
        Member::Client,
        "curl",
        &["-sS", "--fail", "-o", tern_testkit::path_arg(&file)?, &url],
    )?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let data = std::fs::read(&file)?;
    let verdict = match tern_testguest::verify_download(&data) {
        Ok(()) => "every byte verified".to_string(),
        Err(at) => format!("MISMATCH at byte {at}"),
    };
    println!(
        "{} bytes in {:.2} s: {verdict}",
        data.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
