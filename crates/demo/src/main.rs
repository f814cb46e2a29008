//! The demo behind `scripts/demo`: a daemon on this machine boots the test guest and shows it
//! running, with every command printed before its output like a terminal transcript.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn main() {
    if let Err(e) = run() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

/// The `tern` executable built next to this one.
fn tern_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("tern");
    if !bin.exists() {
        bail!(
            "{} not found; build the workspace first (cargo build --release)",
            bin.display()
        );
    }
    Ok(bin)
}

struct Demo {
    tern: PathBuf,
    socket: PathBuf,
}

impl Demo {
    /// Prints and runs `tern args`, showing its output.
    fn show(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("\n$ tern {}", args.join(" "));
        let out = Command::new(&self.tern)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("tern {} failed", args.join(" "));
        }
        Ok(stdout)
    }

    fn heartbeats(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let out = Command::new(&self.tern)
            .arg("--socket")
            .arg(&self.socket)
            .args(["console", name, "--dump", "--timestamps"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("tern-guest: hb "))
            .map(String::from)
            .collect())
    }
}

fn start_daemon(tern: &Path, dir: &Path, socket: &Path) -> anyhow::Result<Child> {
    let config = dir.join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nsocket = \"{}\"\n",
            dir.join("state").display(),
            socket.display()
        ),
    )?;
    println!("$ tern daemon --config {} &", config.display());
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let child = Command::new(tern)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the daemon did not start; see {}",
                dir.join("daemon.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn run() -> anyhow::Result<()> {
    let tern = tern_bin()?;
    let dir = tempfile::Builder::new().prefix("tern-demo-").tempdir()?;
    let socket = dir.path().join("ternd.sock");
    println!("== tern demo: the test guest under a tern daemon ==");
    let mut daemon = start_daemon(&tern, dir.path(), &socket)?;
    let demo = Demo { tern, socket };
    let result = guest_tour(&demo, dir.path());
    let _ = daemon.kill();
    let _ = daemon.wait();
    result
}

fn guest_tour(demo: &Demo, dir: &Path) -> anyhow::Result<()> {
    let cfg = dir.join("demo.cfg");
    std::fs::write(
        &cfg,
        format!(
            "name = \"demo\"\nmemory = 1024\nvcpus = 2\nkernel = \"{}\"\nextra = \"heartbeat_ms=500 wss_mib=256 write_mibps=64\"\n",
            tern_testguest::path().display()
        ),
    )?;
    println!(
        "\n$ cat {}\n{}",
        cfg.display(),
        std::fs::read_to_string(&cfg)?.trim_end()
    );
    demo.show(&["create", cfg.to_str().context("path")?])?;
    std::thread::sleep(Duration::from_secs(3));
    demo.show(&["list"])?;
    demo.show(&["console", "demo", "--dump", "--timestamps"])?;

    demo.show(&["pause", "demo"])?;
    let paused_at = demo.heartbeats("demo")?.len();
    std::thread::sleep(Duration::from_secs(2));
    demo.show(&["list"])?;
    println!(
        "(paused for 2 s: {} new heartbeats)",
        demo.heartbeats("demo")?.len() - paused_at
    );
    demo.show(&["unpause", "demo"])?;
    std::thread::sleep(Duration::from_secs(2));
    println!("\nheartbeats since unpause (the sequence continues where it stopped):");
    for line in demo
        .heartbeats("demo")?
        .iter()
        .skip(paused_at.saturating_sub(1))
    {
        println!("  {line}");
    }
    demo.show(&["destroy", "demo"])?;
    demo.show(&["list"])?;
    println!("\n== demo complete ==");
    Ok(())
}
