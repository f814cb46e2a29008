//! The network benchmark of issue 4: a networked test guest on host1 of the test lab, pinged
//! every 10 ms and downloaded from (100 MiB over HTTP, every byte verified) by the client
//! namespace. Prints the figures and records them in `benchmarks/network.md`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_bench::machine_info::MachineInfo;
use tern_testkit::{KvmLock, Member, NetLab, TernHost};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
const DOWNLOAD: u64 = 100 << 20;
const ROUNDS: usize = 3;

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

struct Figures {
    ping_sent: u32,
    ping_lost: u32,
    rtt_ms: Vec<f64>,
    download_mbps: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let _lock = KvmLock::acquire();
    let lab = NetLab::new()?;
    let host = lab.start_host(&tern, Member::Host1, "")?;
    let figures = measure(&lab, &host)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let report = report(&figures, &MachineInfo::collect(&repo));
    println!("{report}");
    std::fs::write(repo.join("benchmarks/network.md"), &report)?;
    println!("Recorded in benchmarks/network.md");
    Ok(())
}

fn measure(lab: &NetLab, host: &TernHost) -> anyhow::Result<Figures> {
    let cmdline = format!("ip={GUEST_IP}/24 gw=10.77.0.1 heartbeat_ms=1000 disk_mib=0");
    let cfg = host.guest_config("web", 256, 2, &cmdline)?;
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str("vif = [ 'mac=02:77:00:00:00:10, bridge=br0' ]\n");
    std::fs::write(&cfg, text)?;
    host.run(&["create", tern_testkit::path_arg(&cfg)?])?;
    if !tern_testkit::wait_for(Duration::from_secs(20), || {
        host.heartbeats("web")
            .map(|b| !b.is_empty())
            .unwrap_or(false)
    }) {
        bail!("the guest did not start");
    }
    let ping = lab.ping(Member::Client, GUEST_IP, 500, Duration::from_millis(10))?;
    let rtt_ms = ping.rtts().iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let file = host.dir().join("download.bin");
    let url = format!("http://{GUEST_IP}/download/{DOWNLOAD}");
    let mut download_mbps = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let out = lab.exec(
            Member::Client,
            "curl",
            &["-sS", "--fail", "-o", tern_testkit::path_arg(&file)?, &url],
        )?;
        let seconds = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let data = std::fs::read(&file).context("downloaded file")?;
        if data.len() as u64 != DOWNLOAD || tern_testguest::verify_download(&data).is_err() {
            bail!("the download is not what the guest should have sent");
        }
        download_mbps.push(DOWNLOAD as f64 / seconds / 1e6);
    }
    Ok(Figures {
        ping_sent: ping.transmitted,
        ping_lost: ping.lost(),
        rtt_ms,
        download_mbps,
    })
}

fn report(f: &Figures, info: &MachineInfo) -> String {
    let mut rtt = f.rtt_ms.clone();
    let mut mbps = f.download_mbps.clone();
    format!(
        "# Network benchmark (issue 4)\n\n\
         Measured by `cargo bench -p tern-bench --bench network` (also run by `scripts/bench`).\n\n\
         {}\n\n\
         A test guest (256 MiB, 2 vCPUs, tern's virtio-net over a TAP on host1's bridge) in the\n\
         test lab; the client namespace pings it every 10 ms and downloads {} MiB over HTTP with\n\
         curl, {ROUNDS} times; every byte of every download is checked against the function of its offset.\n\n\
         | figure | value |\n|---|---:|\n\
         | pings sent / lost | {} / {} |\n\
         | ping RTT median | {:.2} ms |\n\
         | ping RTT 99th percentile | {:.2} ms |\n\
         | download rate, median of {ROUNDS} | {:.0} MB/s |\n\
         | download rates | {} |\n",
        info.markdown(),
        DOWNLOAD >> 20,
        f.ping_sent,
        f.ping_lost,
        median(&mut rtt),
        percentile(&mut rtt, 0.99),
        median(&mut mbps),
        f.download_mbps.iter().map(|r| format!("{r:.0} MB/s")).collect::<Vec<_>>().join(", ")
    )
}
