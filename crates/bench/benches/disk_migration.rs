//! Live migration with a local disk (issue 12): a 1 GiB test guest whose 4 GiB disk image has
//! 1 GiB allocated, written at 0, 16 and 64 MiB/s during the move, over the test lab's
//! 1 Gbit/s link; tern (`--copy-storage`) and, where it can run the guest's disk, QEMU (the
//! disk mirrored to an NBD export on the destination, then migrate) measured the same way,
//! from the guest's heartbeats.
//!
//! `TERN_BENCH_RATES=0,64` runs some disk write rates only (nothing is recorded then);
//! `TERN_BENCH_QEMU=off` leaves QEMU out.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tern_bench::felt::{self, Felt};
use tern_bench::guest::{self, Console, DiskLoad, Heartbeat, Workload};
use tern_bench::lab::shaped;
use tern_bench::machine_info::MachineInfo;
use tern_bench::qemu::{self, disk_args, Qemu};
use tern_testkit::{relocation_toml_with, KvmLock, Member, NetLab, TernHost, LAB_HOSTS_ALLOW};

const MEM_MIB: u64 = 1024;
const VCPUS: u32 = 2;
/// Guest memory in use, written at [`MEM_WRITE_MIBPS`] throughout.
const WSS_MIB: u64 = 256;
const MEM_WRITE_MIBPS: u64 = 16;
const IMAGE_BYTES: u64 = 4 << 30;
/// The image's allocated part, filled before the guest starts; the guest's disk workload
/// writes over all of it.
const ALLOCATED_BYTES: u64 = 1 << 30;
const LINK_MBIT: u64 = 1000;
const DOWNTIME_MS: u64 = 30;
const QEMU_PORT: u16 = 4444;
const QEMU_NBD_PORT: u16 = 10810;
/// A QEMU memory migration still running after this long is given up.
const QEMU_GIVE_UP: Duration = Duration::from_secs(120);
/// Disk write rates, MiB/s.
const RATES: [u64; 3] = [0, 16, 64];

#[derive(Clone, Debug, Default, Serialize)]
struct Figures {
    tool: String,
    disk_write_mibps: u64,
    felt: Felt,
    /// The guest's disk blocks written per second during the move over before it.
    disk_speed_kept: f64,
    downtime_ms: f64,
    total_s: f64,
    /// Everything sent, and the disk data of it.
    bytes: u64,
    disk_bytes: u64,
    /// What had to move: the memory in use, the allocated disk data, and the disk blocks the
    /// guest wrote during the move (each write once, as a mirror would send it).
    needed_bytes: u64,
    rounds: u64,
    throttle_percent: u64,
    /// The guest's memory, register and disk checks on the destination.
    checks_clean: bool,
}

impl Figures {
    /// Total time over the time the bytes that had to move take on the link.
    fn over_link(&self, link_bps: f64) -> f64 {
        self.total_s / (self.needed_bytes as f64 / link_bps)
    }
}

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

fn workload(disk_write_mibps: u64) -> Workload {
    Workload {
        mem_mib: MEM_MIB,
        wss_mib: WSS_MIB,
        write_mibps: MEM_WRITE_MIBPS,
        verify_ms: 4000,
        heartbeat_ms: guest::HEARTBEAT_MS,
        vcpus: VCPUS,
        prefill: true,
        disk: Some(DiskLoad {
            mib: ALLOCATED_BYTES >> 20,
            kibps: disk_write_mibps << 10,
            verify_ms: 30_000,
        }),
    }
}

fn rates() -> Vec<u64> {
    match std::env::var("TERN_BENCH_RATES") {
        Ok(list) => list
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect(),
        Err(_) => RATES.to_vec(),
    }
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let qemu = qemu::unless_off();
    let _lock = KvmLock::acquire();
    let (lab, link_bps) = shaped(LINK_MBIT)?;
    let mut results = Vec::new();
    for rate in rates() {
        let f = tern_once(&lab, &tern, &workload(rate))
            .with_context(|| format!("tern at {rate} MiB/s"))?;
        print_row(&f, link_bps);
        results.push(f);
        if let Some(q) = &qemu {
            let f = qemu_once(&lab, q, &workload(rate))
                .with_context(|| format!("QEMU at {rate} MiB/s"))?;
            print_row(&f, link_bps);
            results.push(f);
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let info = MachineInfo::collect(&repo);
    let version = qemu.as_ref().map(|q| q.version_line.clone());
    let md = report(&results, link_bps, &info, version.as_deref());
    println!("\n{md}");
    if std::env::var_os("TERN_BENCH_RATES").is_none() {
        std::fs::write(repo.join("benchmarks/disk-migration.md"), &md)?;
        let json = serde_json::json!({
            "link_mbit_measured": link_bps * 8.0 / 1e6,
            "results": results,
        });
        std::fs::write(
            repo.join("benchmarks/disk-migration.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        println!("Recorded in benchmarks/disk-migration.md and benchmarks/disk-migration.json");
    }
    Ok(())
}

/// A lab host and its disk directory, its only place for copied disks.
struct DiskHost {
    host: TernHost,
    disks: tempfile::TempDir,
}

/// Starts lab host `member` with a disk directory of its own.
fn start_host(lab: &NetLab, tern: &Path, member: Member) -> anyhow::Result<DiskHost> {
    let disks = tempfile::tempdir()?;
    let kernels = tern_testguest::path()
        .parent()
        .context("test guest directory")?
        .to_path_buf();
    let lines = format!(
        "storage = [\"{}\", \"{}\"]\ndisk_dir = \"{}\"",
        kernels.display(),
        disks.path().display(),
        disks.path().display()
    );
    let host = lab.start_host(
        tern,
        member,
        &relocation_toml_with(member, &[LAB_HOSTS_ALLOW], &lines),
    )?;
    Ok(DiskHost { host, disks })
}

/// A sparse image of [`IMAGE_BYTES`] with its first [`ALLOCATED_BYTES`] written (non-zero).
fn make_image(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(IMAGE_BYTES)?;
    let chunk: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let mut at = 0;
    while at < ALLOCATED_BYTES {
        file.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// The guest's disk blocks written per second between two heartbeats.
fn disk_rate(a: &Heartbeat, at_a: f64, b: &Heartbeat, at_b: f64) -> f64 {
    (b.disk_written.saturating_sub(a.disk_written)) as f64 / (at_b - at_a).max(1e-6)
}

fn tern_once(lab: &NetLab, tern: &Path, w: &Workload) -> anyhow::Result<Figures> {
    let d1 = start_host(lab, tern, Member::Host1)?;
    let d2 = start_host(lab, tern, Member::Host2)?;
    let (h1, h2) = (&d1.host, &d2.host);
    h1.trust_each_other(h2)?;
    let image = d1.disks.path().join("bench.img");
    make_image(&image)?;
    let cfg = h1.guest_config("bench", w.mem_mib, w.vcpus, &w.cmdline())?;
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(&format!("disk = [ 'file:{},xvda,w' ]\n", image.display()));
    std::fs::write(&cfg, text)?;
    h1.run(&["create", tern_testkit::path_arg(&cfg)?])?;
    guest::wait_for(
        w.fill_timeout(),
        Duration::from_millis(200),
        "the guest to fill its working set",
        || {
            Ok(h1
                .heartbeats("bench")?
                .last()
                .filter(|(_, b)| b.written >= w.ws_pages())
                .map(|_| ()))
        },
    )?;
    let kept = tempfile::tempdir()?;
    h1.keep_console("bench", kept.path())?;
    std::thread::sleep(Duration::from_secs(3));
    let start = tern_bench::unix_now();
    let out = h1.run(&[
        "migrate",
        "bench",
        "10.77.0.2",
        "--live",
        "--copy-storage",
        "--json",
    ])?;
    let end = tern_bench::unix_now();
    let s: serde_json::Value = serde_json::from_str(out.trim()).context("tern's summary")?;
    println!(
        "  tern disks: {}; downtime parts {}; stopped: {}",
        s["disks"],
        s["downtime_parts"],
        s["stop_reason"].as_str().unwrap_or("")
    );
    let source = felt::kept_beats(kept.path())?;
    let last = checks_on_arrival(w, "on the destination", || {
        Ok(h2.heartbeats("bench")?.pop().map(|(_, b)| b))
    })?;
    let destination = h2.heartbeats("bench")?;
    let felt = felt::measure(&source, &destination, start, end).context("the heartbeats")?;
    let disk_speed_kept = disk_speed_kept(&source, &destination, start, end);
    let needed = needed_bytes(w, &source, &destination, start, end);
    h2.run(&["destroy", "bench"])?;
    let ns = |k: &str| s[k].as_u64().unwrap_or(0) as f64;
    Ok(Figures {
        tool: "tern".into(),
        disk_write_mibps: w.disk.as_ref().map_or(0, |d| d.kibps >> 10),
        felt,
        disk_speed_kept,
        downtime_ms: (ns("resumed_unix_ns") - ns("paused_unix_ns")) / 1e6,
        total_s: s["total_seconds"].as_f64().unwrap_or(0.0),
        bytes: s["bytes_sent"].as_u64().unwrap_or(0),
        disk_bytes: s["disks"]["bytes_sent"].as_u64().unwrap_or(0),
        needed_bytes: needed,
        rounds: s["rounds"].as_array().map_or(0, |r| r.len() as u64),
        throttle_percent: s["max_throttle_percent"].as_u64().unwrap_or(0),
        checks_clean: last.mem_errors == 0 && last.reg_errors == 0 && last.disk_errors == 0,
    })
}

/// Waits for the arrived guest's first heartbeat (`last_beat` reads its latest one), then
/// for its memory and disk checks after it; that heartbeat.
fn checks_on_arrival(
    w: &Workload,
    where_: &str,
    mut last_beat: impl FnMut() -> anyhow::Result<Option<Heartbeat>>,
) -> anyhow::Result<Heartbeat> {
    let first = guest::wait_for(
        Duration::from_secs(20),
        Duration::from_millis(50),
        &format!("heartbeats {where_}"),
        &mut last_beat,
    )?;
    guest::wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        &format!("full memory and disk checks {where_}"),
        || Ok(last_beat()?.filter(|b| checked_since(b, &first, w))),
    )
}

/// Whether the guest checked its memory, and its disk if it writes one, since `first`.
fn checked_since(b: &Heartbeat, first: &Heartbeat, w: &Workload) -> bool {
    let writes_disk = w.disk.as_ref().is_some_and(|d| d.kibps > 0);
    b.passes > first.passes && (!writes_disk || b.disk_verified > first.disk_verified)
}

/// What had to move: the guest's memory in use, its image's allocated data, and the disk
/// blocks it wrote from `start` to `end` (each write once: what a mirror sends), from its
/// heartbeats on both hosts.
fn needed_bytes(
    w: &Workload,
    source: &[(f64, Heartbeat)],
    destination: &[(f64, Heartbeat)],
    start: f64,
    end: f64,
) -> u64 {
    let all: Vec<&(f64, Heartbeat)> = source.iter().chain(destination.iter()).collect();
    let before = all.iter().rev().find(|(at, _)| *at <= start);
    let after = all.iter().find(|(at, _)| *at >= end);
    let written = match (before, after) {
        (Some(b), Some(a)) => a.1.disk_written.saturating_sub(b.1.disk_written) * 4096,
        _ => 0,
    };
    w.touched_estimate() + ALLOCATED_BYTES + written
}

/// QEMU as libvirt moves a guest with its local disk: the destination (started paused)
/// exports its empty image over NBD, the source mirrors its disk there until in sync, then
/// migrates memory; once that completed the mirror is ended and the destination resumed.
fn qemu_once(lab: &NetLab, q: &Qemu, w: &Workload) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let (src_image, dst_image) = (src_dir.join("disk.img"), dst_dir.join("disk.img"));
    make_image(&src_image)?;
    std::fs::File::create(&dst_image)?.set_len(IMAGE_BYTES)?;
    let mut src = q.spawn_in(
        w,
        &src_dir,
        &disk_args(&src_image)?,
        Some(lab.ns(Member::Host1)),
    )?;
    guest::first_beat(&src).with_context(|| src.stderr_tail())?;
    guest::wait_filled(&src, w)?;
    std::thread::sleep(Duration::from_secs(3));
    let host2 = Member::Host2.ip().to_string();
    let uri = format!("tcp:{host2}:{QEMU_PORT}");
    let mut extra = vec!["-incoming".to_string(), uri.clone(), "-S".to_string()];
    extra.extend(disk_args(&dst_image)?);
    let mut dst = q.spawn_in(w, &dst_dir, &extra, Some(lab.ns(Member::Host2)))?;
    dst.export_disk(&host2, QEMU_NBD_PORT)
        .with_context(|| dst.stderr_tail())?;
    let start = tern_bench::unix_now();
    let mirrored_s = src
        .mirror_disk(&host2, QEMU_NBD_PORT)
        .with_context(|| format!("{}; destination {}", src.stderr_tail(), dst.stderr_tail()))?;
    let migrated = src
        .migrate_live_with_mirror(&uri, DOWNTIME_MS, QEMU_GIVE_UP)
        .with_context(|| format!("{}; destination {}", src.stderr_tail(), dst.stderr_tail()))?;
    let Some((status, _, stopped)) = migrated else {
        bail!("QEMU's memory migration did not converge in {QEMU_GIVE_UP:?}");
    };
    dst.stop_export().with_context(|| dst.stderr_tail())?;
    dst.cont().with_context(|| dst.stderr_tail())?;
    let end = tern_bench::unix_now();
    let resumed = dst.wait_resumed()?;
    println!("  QEMU: disk in sync after {mirrored_s:.2} s");
    let last = checks_on_arrival(w, "under QEMU on the destination", || {
        Ok(guest::last_beat(&dst).ok())
    })?;
    let source = guest::beats(&src.lines()?);
    let destination = guest::beats(&dst.lines()?);
    let felt = felt::measure(&source, &destination, start, end).context("the heartbeats")?;
    let disk_speed_kept = disk_speed_kept(&source, &destination, start, end);
    let needed = needed_bytes(w, &source, &destination, start, end);
    let _ = src.quit();
    let _ = dst.quit();
    let disk_bytes =
        tern_storage::allocated(&std::fs::File::open(&dst_image)?, 0..IMAGE_BYTES, 4096)?
            .iter()
            .map(|r| r.end - r.start)
            .sum::<u64>();
    let ram = status["ram"]["transferred"].as_u64().unwrap_or(0);
    Ok(Figures {
        tool: format!("QEMU {}.{}.{}", q.version.0, q.version.1, q.version.2),
        disk_write_mibps: w.disk.as_ref().map_or(0, |d| d.kibps >> 10),
        felt,
        disk_speed_kept,
        downtime_ms: (resumed - stopped) * 1e3,
        total_s: end - start,
        bytes: ram + disk_bytes,
        disk_bytes,
        needed_bytes: needed,
        rounds: status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        throttle_percent: status["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        checks_clean: last.mem_errors == 0 && last.reg_errors == 0 && last.disk_errors == 0,
    })
}

/// The guest's disk writing during the move (`start`..`end`) over before it, from its
/// heartbeats on both hosts.
fn disk_speed_kept(
    source: &[(f64, Heartbeat)],
    destination: &[(f64, Heartbeat)],
    start: f64,
    end: f64,
) -> f64 {
    let all: Vec<&(f64, Heartbeat)> = source.iter().chain(destination.iter()).collect();
    let at_or_before = |t: f64| all.iter().rev().find(|(at, _)| *at <= t).copied();
    let at_or_after = |t: f64| all.iter().find(|(at, _)| *at >= t).copied();
    let (Some(b0), Some(b1), Some(d1)) = (
        at_or_before(start - felt::BASELINE_S),
        at_or_before(start),
        at_or_after(end),
    ) else {
        return 0.0;
    };
    let before = disk_rate(&b0.1, b0.0, &b1.1, b1.0);
    let during = disk_rate(&b1.1, b1.0, &d1.1, d1.0);
    if before <= 0.0 {
        1.0
    } else {
        during / before
    }
}

fn print_row(f: &Figures, link_bps: f64) {
    println!(
        "{:<6} disk {:>3} MiB/s: guest: longest gap {:6.1} ms, switch {:6.1} ms, memory speed kept {:5.1}%, disk speed kept {:5.1}%; downtime {:5.1} ms, total {:6.2} s ({:.2}x what had to move over the link), {} MiB sent ({} MiB disk), throttle {}%, checks {}",
        f.tool,
        f.disk_write_mibps,
        f.felt.longest_gap_ms,
        f.felt.switch_gap_ms,
        f.felt.speed_kept * 100.0,
        f.disk_speed_kept * 100.0,
        f.downtime_ms,
        f.total_s,
        f.over_link(link_bps),
        f.bytes >> 20,
        f.disk_bytes >> 20,
        f.throttle_percent,
        if f.checks_clean { "clean" } else { "FAILED" }
    );
}

fn report(results: &[Figures], link_bps: f64, info: &MachineInfo, qemu: Option<&str>) -> String {
    let mut md = format!(
        "# Live migration with a local disk (issue 12)\n\n\
         Measured by `cargo bench -p tern-bench --bench disk_migration`.\n\n\
         {}\n\n\
         A {MEM_MIB} MiB, {VCPUS}-vCPU test guest ({WSS_MIB} MiB of memory in use, written at \
         {MEM_WRITE_MIBPS} MiB/s) whose {} GiB disk image has its first {} GiB allocated is \
         live-migrated with its disk from host1 to host2 of the test lab, each host with a disk \
         directory of its own; the guest writes numbered, checksummed blocks over that 1 GiB at \
         the given rate and reads them back throughout. The hosts' link is shaped to \
         {LINK_MBIT} Mbit/s (measured: {:.0} Mbit/s). *What had to move* is the memory in use, \
         the image's allocated data and every disk block the guest wrote during the move (once \
         each, as a mirror would send them); *total / link* is the total time over the \
         time those bytes take on the link. The guest's figures are from its heartbeats as in \
         the memory-only benchmark; *disk speed kept* is its disk writing during the move over \
         before it. QEMU runs the guest on its `microvm` machine (virtio-mmio, as tern) and \
         moves it as libvirt's `--copy-storage-all` does: the destination, started paused, \
         exports its empty image over NBD; the source mirrors its disk there (`blockdev-mirror`, \
         `sync=full`) until in sync, then migrates memory (auto-converge, the same downtime \
         limit); then the mirror is ended and the destination resumed. Its *sent* column counts \
         memory sent and the data that arrived in the destination's image. QEMU: {}.\n\n\
         | disk write rate | tool | longest guest gap | gap at switch | memory speed kept | disk speed kept | downtime | total time | sent (disk) | total / link | throttle | guest checks |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        info.markdown(),
        IMAGE_BYTES >> 30,
        ALLOCATED_BYTES >> 30,
        link_bps * 8.0 / 1e6,
        qemu.unwrap_or("not measured"),
    );
    for f in results {
        md += &format!(
            "| {} MiB/s | {} | {:.1} ms | {:.1} ms | {:.1}% | {:.1}% | {:.1} ms | {:.2} s | {} MiB ({} MiB) | {:.2} | {}% | {} |\n",
            f.disk_write_mibps,
            f.tool,
            f.felt.longest_gap_ms,
            f.felt.switch_gap_ms,
            f.felt.speed_kept * 100.0,
            f.disk_speed_kept * 100.0,
            f.downtime_ms,
            f.total_s,
            f.bytes >> 20,
            f.disk_bytes >> 20,
            f.over_link(link_bps),
            f.throttle_percent,
            if f.checks_clean { "clean" } else { "FAILED" }
        );
    }
    md += "\n## Targets\n\n";
    for f in results.iter().filter(|f| f.tool == "tern") {
        let gap = f.felt.longest_gap_ms;
        let ratio = f.over_link(link_bps);
        md += &format!(
            "- {} MiB/s: total time {ratio:.2}x what had to move over the link, target at most 1.3x: {}\n",
            f.disk_write_mibps,
            verdict(ratio <= 1.3)
        );
        md += &format!(
            "- {} MiB/s: longest guest gap {gap:.1} ms, target at most 30 ms (the memory-only target for a guest writing at most 64 MiB/s): {}\n",
            f.disk_write_mibps,
            verdict(gap <= 30.0)
        );
        let qemu = results
            .iter()
            .find(|q| q.tool != "tern" && q.disk_write_mibps == f.disk_write_mibps);
        if let Some(q) = qemu {
            md += &format!(
                "- {} MiB/s: beside QEMU: longest gap {gap:.1} vs {:.1} ms, total time {:.2} vs {:.2} s\n",
                f.disk_write_mibps, q.felt.longest_gap_ms, f.total_s, q.total_s
            );
        }
    }
    md
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT MET"
    }
}
