//! Checkpoints: saving a running domain to a file, and restoring one from it.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tern_api::vmm::{VmmReply, VmmRequest};
use tern_api::{read_message, write_message, Progress, RestoreSummary, SaveSummary};
use tern_vmm::record::{DomainDir, RestoreSpec};
use tern_vmm::save::{self, CheckpointFiles};

use super::{Launch, Registry};
use crate::admission;
use crate::guest_process::Control;

impl Registry {
    /// Saves a running domain to `path`; unless `keep_running`, it is gone afterwards.
    pub fn save(
        &self,
        key: &str,
        path: &Path,
        keep_running: bool,
        progress: impl FnMut(&Progress),
    ) -> anyhow::Result<SaveSummary> {
        let (id, dir) = self.find_live(key)?;
        let uuid = self
            .lock()
            .get(&id)
            .map(|d| d.uuid.clone())
            .context("the domain went away")?;
        let summary = save_into(&dir, &uuid, path, keep_running, progress)?;
        if !keep_running && !self.wait_gone(id, Duration::from_secs(30)) {
            bail!("saved, but domain '{key}' did not stop afterwards");
        }
        Ok(summary)
    }

    /// Restores a domain from a checkpoint file.
    pub fn restore(
        self: &Arc<Self>,
        path: &Path,
        paused: bool,
        copy: bool,
    ) -> anyhow::Result<RestoreSummary> {
        let config = crate::checkpoint::read_config(path)?;
        admission::admit_checkpoint(path, &config)?;
        let spec = RestoreSpec {
            path: path.to_path_buf(),
            copy,
        };
        let (id, _, summary) = self.start_domain(config, paused, Launch::Restore(spec))?;
        summary.ok_or_else(|| anyhow!("guest process {id} did not report its restore"))
    }
}

/// Opens the checkpoint's temporary file next to `path`, hands it to the guest process to
/// write, passes on its progress, and gives the file its name once the process flushed it.
/// Whatever fails, no temporary file stays and the guest runs on (unless it was saved).
fn save_into(
    dir: &DomainDir,
    uuid: &str,
    path: &Path,
    keep_running: bool,
    progress: impl FnMut(&Progress),
) -> anyhow::Result<SaveSummary> {
    let shown = path.display();
    let partial = save::partial_path(path, uuid);
    // A leftover of this guest's own earlier save, whose writer died.
    let _ = std::fs::remove_file(&partial);
    let files = CheckpointFiles::create(&partial).with_context(|| {
        format!(
            "cannot write checkpoint {shown}: cannot create {}",
            partial.display()
        )
    })?;
    let mut control = Control::connect(dir)?;
    let request = VmmRequest::SaveInto {
        path: shown.to_string(),
        keep_running,
    };
    let result = hand_checkpoint_files(&mut control, &request, files).and_then(|handed| {
        if !handed {
            // A guest process of an earlier build, which opens the file itself.
            let _ = std::fs::remove_file(&partial);
            let mut control = Control::connect(dir)?;
            let request = VmmRequest::Save {
                path: shown.to_string(),
                keep_running,
            };
            return follow_save(&mut control, &request, path, progress);
        }
        follow_save_into(&mut control, &partial, path, keep_running, progress)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Asks the guest process to save into `files` and passes them; false if the process does
/// not know the request (it closed the connection).
fn hand_checkpoint_files(
    control: &mut Control,
    request: &VmmRequest,
    files: CheckpointFiles,
) -> anyhow::Result<bool> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (reader, writer) = control.parts_mut();
    write_message(writer, request).context("guest process went away")?;
    match read_message::<VmmReply>(&mut *reader) {
        Ok(VmmReply::Ok) => {}
        Ok(VmmReply::Error { message }) => bail!(message),
        Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
        Err(_) => return Ok(false),
    }
    let pass = |byte: u8, fd: Option<RawFd>| match fd {
        Some(fd) => writer.send_with_fd(&[byte][..], fd).map(drop),
        None => writer.send_with_fds(&[&[byte][..]], &[]).map(drop),
    };
    pass(b'f', Some(files.file.as_raw_fd()))
        .and_then(|()| pass(b'd', files.direct.as_ref().map(|f| f.as_raw_fd())))
        .context("cannot pass the checkpoint file to the guest process")?;
    Ok(true)
}

/// Passes on the progress of a save into a file the daemon opened until the process reports
/// the file flushed; then gives it its name and, unless the guest runs on, tells the process.
fn follow_save_into(
    control: &mut Control,
    partial: &Path,
    path: &Path,
    keep_running: bool,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<SaveSummary> {
    let (reader, writer) = control.parts_mut();
    loop {
        match read_message::<VmmReply>(&mut *reader) {
            Ok(VmmReply::Progress(p)) => progress(&p),
            Ok(VmmReply::Saved(summary)) => {
                let placed = save::place(partial, path);
                if !keep_running {
                    let answer = VmmRequest::SavePlaced {
                        placed: placed.is_ok(),
                    };
                    if write_message(writer, &answer).is_err() && placed.is_ok() {
                        // The process did not hear it: it runs on, and the file is there.
                        log::warn!(
                            "saved to {} but the guest process did not hear it; it runs on",
                            path.display()
                        );
                    }
                }
                placed?;
                return Ok(summary);
            }
            Ok(VmmReply::Error { message }) => bail!(message),
            Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
            Err(e) => bail!("the guest process went away while saving ({e})"),
        }
    }
}

/// Sends the save request and passes on its progress until the guest process reports the
/// save done; a process that goes away leaves no partial file behind.
fn follow_save(
    control: &mut Control,
    request: &VmmRequest,
    path: &Path,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<SaveSummary> {
    let (reader, writer) = control.parts_mut();
    write_message(writer, request).context("guest process went away")?;
    loop {
        match read_message::<VmmReply>(&mut *reader) {
            Ok(VmmReply::Progress(p)) => progress(&p),
            Ok(VmmReply::Saved(summary)) => return Ok(summary),
            Ok(VmmReply::Error { message }) => bail!(message),
            Ok(other) => bail!("unexpected reply from guest process: {other:?}"),
            Err(e) => {
                tern_vmm::save::remove_partials(path);
                bail!("the guest process went away while saving ({e})");
            }
        }
    }
}
