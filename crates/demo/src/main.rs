//! The demo behind `scripts/demo`: a daemon on this machine boots the test guest and shows it
//! running, with every command printed before its output like a terminal transcript.

use std::time::Duration;

use anyhow::{bail, Context};
use tern_testkit::TernHost;

fn main() {
    if let Err(e) = run() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

/// Prints and runs `tern args`, showing its output.
fn show(host: &TernHost, args: &[&str]) -> anyhow::Result<String> {
    println!("\n$ tern {}", args.join(" "));
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
    println!("== tern demo: the test guest under a tern daemon ==");
    let host = TernHost::start(&tern)?;
    println!(
        "$ tern daemon --config {} &",
        host.dir().join("ternd.toml").display()
    );
    let cfg = host.guest_config(
        "demo",
        1024,
        2,
        "heartbeat_ms=500 wss_mib=256 write_mibps=64",
    )?;
    println!(
        "\n$ cat {}\n{}",
        cfg.display(),
        std::fs::read_to_string(&cfg)?.trim_end()
    );
    let cfg = cfg.to_str().context("config path is not UTF-8")?;
    show(&host, &["create", cfg])?;
    std::thread::sleep(Duration::from_secs(3));
    show(&host, &["list"])?;
    show(&host, &["console", "demo", "--dump", "--timestamps"])?;

    show(&host, &["pause", "demo"])?;
    let paused_at = heartbeats(&host, "demo")?.len();
    std::thread::sleep(Duration::from_secs(2));
    show(&host, &["list"])?;
    println!(
        "(paused for 2 s: {} new heartbeats)",
        heartbeats(&host, "demo")?.len() - paused_at
    );
    show(&host, &["unpause", "demo"])?;
    std::thread::sleep(Duration::from_secs(2));
    println!("\nheartbeats since unpause (the sequence continues where it stopped):");
    for line in heartbeats(&host, "demo")?
        .iter()
        .skip(paused_at.saturating_sub(1))
    {
        println!("  {line}");
    }

    let checkpoint = host.dir().join("demo.tern");
    let checkpoint = checkpoint.to_str().context("path is not UTF-8")?;
    show(&host, &["save", "demo", checkpoint])?;
    show(&host, &["list"])?;
    show(&host, &["restore", checkpoint])?;
    std::thread::sleep(Duration::from_secs(2));
    println!("\nheartbeats after the restore (the sequence continues again):");
    for line in heartbeats(&host, "demo")?.iter().take(3) {
        println!("  {line}");
    }
    show(&host, &["destroy", "demo"])?;
    show(&host, &["list"])?;
    println!("\n== demo complete ==");
    Ok(())
}
