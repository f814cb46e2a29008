//! The demo behind `scripts/demo`: on this one machine, a test lab of network namespaces
//! (two hosts and a client on one segment), a tern daemon with its relocation server on each
//! host, and a networked test guest on host1 serving a download to the client and answering
//! its pings while it is live-migrated to host2. Then the evidence: the download verified,
//! the ping log, the migration summary. Every command is printed before its output, like a
//! terminal transcript.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_testkit::{relocation_toml, Member, NetLab, TernHost, LAB_HOSTS_ALLOW};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
const DOWNLOAD: u64 = 200 << 20;

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

/// Prints and runs `tern args` on `who`, its progress display (stderr) going straight to the
/// terminal.
fn show_live(host: &TernHost, who: &str, args: &[&str]) -> anyhow::Result<String> {
    println!("\n{who}$ tern {}", args.join(" "));
    let out = host
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    if !out.status.success() {
        bail!("tern {} failed", args.join(" "));
    }
    Ok(stdout)
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    println!("== tern demo: live migration ==");
    println!("\nA lab of network namespaces on this machine: host1 and host2 (each with a bridge");
    println!("br0 for guests), a client, all on one layer-2 segment.");
    let lab = NetLab::new().context("cannot build the network lab (the demo needs root)")?;
    print!("{}", lab.describe());
    let host1 = lab.start_host(
        &tern,
        Member::Host1,
        &relocation_toml(Member::Host1, &[LAB_HOSTS_ALLOW]),
    )?;
    let host2 = lab.start_host(
        &tern,
        Member::Host2,
        &relocation_toml(Member::Host2, &[LAB_HOSTS_ALLOW]),
    )?;
    for (name, h) in [("host1", &host1), ("host2", &host2)] {
        println!(
            "\n{name}$ cat {0}\n{1}\n{name}$ tern daemon --config {0} &",
            h.config_path().display(),
            std::fs::read_to_string(h.config_path())?.trim_end()
        );
    }
    println!(
        "\nMigrations are TLS 1.3 with both hosts authenticated: each trusts the other's key."
    );
    for ((name, h), (other_name, other)) in [
        (("host1", &host1), ("host2", &host2)),
        (("host2", &host2), ("host1", &host1)),
    ] {
        let fingerprint = other.fingerprint()?;
        println!("{other_name}$ tern fingerprint\n{fingerprint}");
        println!("{name}$ tern trust add {fingerprint} --name {other_name}");
        h.run(&["trust", "add", &fingerprint, "--name", other_name])?;
    }

    let cfg = host1.guest_config(
        "web",
        1024,
        2,
        &format!(
            "ip={GUEST_IP}/24 gw=10.77.0.1 heartbeat_ms=500 wss_mib=256 write_mibps=64 disk_mib=0"
        ),
    )?;
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str("vif = [ 'mac=02:77:00:00:00:10, bridge=br0' ]\n");
    std::fs::write(&cfg, &text)?;
    println!("\nhost1$ cat {}\n{}", cfg.display(), text.trim_end());
    show(&host1, &["create", tern_testkit::path_arg(&cfg)?])?;
    std::thread::sleep(Duration::from_secs(3));
    show(&host1, &["list"])?;

    println!("\nThe client downloads 200 MiB from the guest (curl, at 25 MB/s) and pings it");
    println!(
        "every 10 ms; meanwhile the guest moves to host2, live, over a link capped at 1 Gbit/s:"
    );
    let file = host1.dir().join("download.bin");
    let url = format!("http://{GUEST_IP}/download/{DOWNLOAD}");
    println!("client$ curl --limit-rate 25M -o download.bin {url} &");
    let mut curl = std::process::Command::new(tern_testkit::ensure_program("curl", "curl")?);
    curl.args(["-sS", "--fail", "--limit-rate", "25M", "-o"])
        .arg(&file)
        .arg(&url);
    let download = lab.spawn_in(Member::Client, curl)?;
    println!("client$ ping -D -i 0.01 -c 800 {GUEST_IP} > ping.log &");
    let mut ping =
        std::process::Command::new(tern_testkit::ensure_program("ping", "iputils-ping")?);
    ping.args(["-n", "-D", "-i", "0.01", "-c", "800", &GUEST_IP.to_string()])
        .stdout(std::process::Stdio::piped());
    let pinger = lab.spawn_in(Member::Client, ping)?;
    std::thread::sleep(Duration::from_secs(3));
    show_live(
        &host1,
        "host1",
        &["migrate", "web", "10.77.0.2", "--live", "-r", "1000"],
    )?;
    show(&host1, &["list"])?;
    println!("\nhost2$ tern list");
    print!("{}", host2.run(&["list"])?);

    let out = download.wait_with_output()?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let data = std::fs::read(&file)?;
    let verdict = match tern_testguest::verify_download(&data) {
        Ok(()) => "every byte verified".to_string(),
        Err(at) => format!("MISMATCH at byte {at}"),
    };
    println!(
        "\nThe evidence:\n  download: {} bytes, {verdict}",
        data.len()
    );
    let out = pinger.wait_with_output()?;
    let report = tern_testkit::PingReport::parse(&String::from_utf8_lossy(&out.stdout))?;
    println!(
        "  ping: {} sent, {} replies, lost {:?}; median {:.2} ms",
        report.transmitted,
        report.received,
        report.missing_seqs(),
        median_ms(&report)
    );
    let mut slow: Vec<_> = report.replies.iter().collect();
    slow.sort_by_key(|r| std::cmp::Reverse(r.rtt));
    for r in slow.iter().take(3) {
        println!(
            "    slowest: icmp_seq={} time={:.2} ms",
            r.seq,
            r.rtt.as_secs_f64() * 1e3
        );
    }
    println!("  the guest's own heartbeats, now printed on host2 (sequence unbroken, 0 errors):");
    for line in heartbeats(&host2, "web")?.iter().take(2) {
        println!("    {line}");
    }
    println!("\nhost2$ tern destroy web");
    host2.run(&["destroy", "web"])?;
    println!("\n== demo complete ==");
    Ok(())
}

fn median_ms(report: &tern_testkit::PingReport) -> f64 {
    let mut rtts: Vec<f64> = report
        .rtts()
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    rtts.sort_by(|a, b| a.total_cmp(b));
    rtts.get(rtts.len() / 2).copied().unwrap_or(0.0)
}
