//! Checkpoints: saving a running domain to a file, and restoring one from it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tern_api::vmm::{VmmReply, VmmRequest};
use tern_api::{read_message, write_message, Progress, RestoreSummary, SaveSummary};
use tern_vmm::record::RestoreSpec;

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
        let mut control = Control::connect(&dir)?;
        let request = VmmRequest::Save {
            path: path.display().to_string(),
            keep_running,
        };
        let summary = follow_save(&mut control, &request, path, progress)?;
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
