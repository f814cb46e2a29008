//! Starting guest processes and talking to them.

use std::io::{BufRead, BufReader};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tern_api::vmm::{VmmReply, VmmRequest, VmmStartup, VmmStatus};
use tern_api::RestoreSummary;
use tern_api::{read_message, write_message};
use tern_sandbox::cgroup::Joiner;
use tern_sandbox::process::{self, Child, Spawn};
use tern_vmm::record::DomainDir;

/// How long a guest process may take to build its machine and report.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest process may take to answer a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A guest process that reported ready.
pub struct Started {
    pub child: Child,
    pub pid: u32,
    pub restore: Option<RestoreSummary>,
}

/// The descriptor number an incoming migration's connection has in the guest process.
pub const INCOMING_FD: i32 = 3;

/// Starts `tern vmm` for the domain in `dir` and waits until it reports ready or failed.
/// `connection`, if given, is passed to the process as descriptor [`INCOMING_FD`].
///
/// The process gets its own session so that signals aimed at the daemon (or its terminal)
/// do not reach guests: guests outlive a daemon restart. With `sandbox`, it also gets its own
/// PID, mount and IPC namespaces; with `cgroup`, it joins that control group before it
/// executes anything.
pub fn spawn(
    dir: &DomainDir,
    connection: Option<RawFd>,
    cgroup: Option<&Joiner>,
    namespaces: bool,
) -> anyhow::Result<Started> {
    let exe = std::env::current_exe().context("cannot find the tern executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.process_log())
        .with_context(|| format!("cannot open {}", dir.process_log().display()))?;
    let cgroup_fds = cgroup.map(Joiner::raw_fds).unwrap_or_default();
    let args = [
        "vmm".into(),
        "--dir".into(),
        dir.path().as_os_str().to_owned(),
    ];
    let child = process::spawn(&Spawn {
        program: &exe,
        args: &args,
        stderr: &log,
        pass: connection.map(|fd| (fd, INCOMING_FD)),
        cgroup_procs: &cgroup_fds,
        namespaces,
    })
    .context("cannot start the guest process")?;
    // Written here: in its own PID namespace the process knows itself only as 1.
    if let Err(e) = std::fs::write(dir.pid_file(), child.pid.to_string()) {
        child.kill();
        let _ = child.wait();
        return Err(e).context("cannot record the guest process's PID");
    }
    let stdout = child
        .stdout
        .try_clone()
        .context("guest process has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let result = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(result);
    });
    let startup = match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Ok(line)) if !line.is_empty() => serde_json::from_str::<VmmStartup>(&line)
            .map_err(|e| anyhow!("guest process said something unexpected: {e}")),
        Ok(_) => Err(anyhow!(
            "guest process exited during start-up (see {})",
            dir.process_log().display()
        )),
        Err(_) => Err(anyhow!(
            "guest process did not start within {STARTUP_TIMEOUT:?}"
        )),
    };
    match startup {
        // Its own word for its PID would be 1 in a PID namespace of its own.
        Ok(VmmStartup::Ready { restore, .. }) => Ok(Started {
            pid: child.pid,
            child,
            restore,
        }),
        Ok(VmmStartup::Failed { message }) => {
            let _ = child.wait();
            Err(anyhow!(message))
        }
        Err(e) => {
            child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// A connection to a guest process's control socket.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects to the guest process of `dir`.
    pub fn connect(dir: &DomainDir) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(dir.control_socket()).with_context(|| {
            format!(
                "guest process is not reachable at {}",
                dir.control_socket().display()
            )
        })?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Control {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one request and returns its reply.
    pub fn call(&mut self, req: &VmmRequest) -> anyhow::Result<VmmReply> {
        write_message(&mut self.writer, req).context("guest process went away")?;
        read_message(&mut self.reader).context("guest process did not answer")
    }

    /// Sends a request that must succeed.
    pub fn expect_ok(&mut self, req: &VmmRequest) -> anyhow::Result<()> {
        match self.call(req)? {
            VmmReply::Ok => Ok(()),
            VmmReply::Error { message } => bail!(message),
            other => bail!("unexpected reply from guest process: {other:?}"),
        }
    }

    /// Asks for the guest's status.
    pub fn status(&mut self) -> anyhow::Result<VmmStatus> {
        match self.call(&VmmRequest::Status)? {
            VmmReply::Status(s) => Ok(s),
            VmmReply::Error { message } => bail!(message),
            other => bail!("unexpected reply from guest process: {other:?}"),
        }
    }

    /// Asks the process to take connection `fd` over with `request` (see [`hand_over`]),
    /// within the usual request timeouts.
    pub fn hand_over(&mut self, request: &VmmRequest, fd: RawFd) -> anyhow::Result<()> {
        hand_over(&mut self.reader, &mut self.writer, request, fd)
    }

    /// Reader and writer, for exchanges longer than one request and reply; no timeouts.
    pub fn parts_mut(&mut self) -> (&mut BufReader<UnixStream>, &mut UnixStream) {
        let _ = self.writer.set_read_timeout(None);
        let _ = self.writer.set_write_timeout(None);
        (&mut self.reader, &mut self.writer)
    }

    /// The underlying stream, for long-lived uses (monitor, console).
    pub fn into_parts(self) -> (BufReader<UnixStream>, UnixStream) {
        (self.reader, self.writer)
    }
}

/// One request on a fresh connection.
pub fn request(dir: &DomainDir, req: &VmmRequest) -> anyhow::Result<()> {
    Control::connect(dir)?.expect_ok(req)
}

/// One request on a fresh connection that may succeed with a warning for the user.
pub fn request_warned(dir: &DomainDir, req: &VmmRequest) -> anyhow::Result<Option<String>> {
    match Control::connect(dir)?.call(req)? {
        VmmReply::Ok => Ok(None),
        VmmReply::Warning { message } => Ok(Some(message)),
        VmmReply::Error { message } => bail!(message),
        other => bail!("unexpected reply from guest process: {other:?}"),
    }
}

/// Asks the guest process to take a connection over (`request`) and, once it agrees, passes
/// it the connection's descriptor `fd` (one byte with `SCM_RIGHTS`): the process speaks to
/// the other host itself.
pub fn hand_over(
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    request: &VmmRequest,
    fd: RawFd,
) -> anyhow::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    write_message(writer, request).context("guest process went away")?;
    match read_message::<VmmReply>(reader) {
        Ok(VmmReply::Ok) => {}
        Ok(VmmReply::Error { message }) => bail!(message),
        Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
        Err(e) => bail!("the guest process went away ({e})"),
    }
    writer
        .send_with_fd(&[0u8][..], fd)
        .context("cannot pass the connection to the guest process")?;
    Ok(())
}
