//! A shared disk for the lab: `qemu-nbd` exporting an image from the storage namespace.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cmd::ensure_program;
use crate::{Member, NetLab};

/// How long `qemu-nbd` may take to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `qemu-nbd` serving a raw image at 10.77.0.200:`port` (the default, unnamed export) to up
/// to 8 clients at once; killed on drop. Keep it alive no longer than its lab.
pub struct NbdExport {
    child: Child,
    addr: SocketAddrV4,
    image: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdExport {
    /// Starts the server in `lab`'s storage namespace and waits until it answers an NBD
    /// client (a connection from the client namespace receives the NBD greeting).
    pub fn start(lab: &NetLab, image: &Path, port: u16) -> anyhow::Result<NbdExport> {
        let qemu_nbd = ensure_program("qemu-nbd", "qemu-utils")?;
        let image = image
            .canonicalize()
            .with_context(|| format!("no disk image {}", image.display()))?;
        let dir = tempfile::Builder::new().prefix("tern-nbd-").tempdir()?;
        let log = dir.path().join("qemu-nbd.log");
        let log_file = File::create(&log)?;
        let addr = SocketAddrV4::new(Member::Storage.ip(), port);
        let mut cmd = Command::new(qemu_nbd);
        cmd.args(["--persistent", "--shared=8", "--format=raw"])
            .args(["--bind", &addr.ip().to_string()])
            .args(["--port", &port.to_string()])
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = lab.spawn_in(Member::Storage, cmd)?;
        let mut export = NbdExport {
            child,
            addr,
            image,
            log,
            _dir: dir,
        };
        export.wait_ready(lab)?;
        Ok(export)
    }

    fn wait_ready(&mut self, lab: &NetLab) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = None;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("qemu-nbd exited ({status}): {}", self.log());
            }
            match greeting(lab, self.addr) {
                Ok(()) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "qemu-nbd did not answer at {} within {READY_TIMEOUT:?} ({}): {}",
            self.addr,
            last_err.map(|e| format!("{e:#}")).unwrap_or_default(),
            self.log()
        )
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// `nbd://10.77.0.200:PORT`.
    pub fn uri(&self) -> String {
        format!("nbd://{}", self.addr)
    }

    /// The exported image.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What qemu-nbd printed.
    pub fn log(&self) -> String {
        format!(
            "qemu-nbd log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

/// Connects from the client namespace and reads the server's first 8 bytes, `NBDMAGIC`.
fn greeting(lab: &NetLab, addr: SocketAddrV4) -> anyhow::Result<()> {
    let mut s = lab.tcp_connect(Member::Client, SocketAddr::V4(addr), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).context("no NBD greeting")?;
    if &magic != b"NBDMAGIC" {
        bail!("not an NBD server: greeting {magic:?}");
    }
    Ok(())
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
