//! A running domain's life: watching its guest process, applying its `on_poweroff`,
//! `on_reboot` and `on_crash` when the process ends, and shutting it down or destroying it.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tern_api::vmm::{ExitReason, VmmEvent, VmmRequest};
use tern_api::DomainState;
use tern_api::{read_message, write_message};
use tern_config::{Action, DomainConfig};
use tern_sandbox::process::Child;
use tern_vmm::record::DomainDir;

use super::{Domain, Life, Registry};
use crate::guest_process::{self, Control};
use crate::sandbox;

/// Most automatic restarts within [`RESTART_WINDOW`] before a domain is left crashed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

impl Registry {
    /// Opens a monitor connection to a running process and reacts when it ends.
    pub(super) fn watch(
        self: &Arc<Self>,
        id: u32,
        dir: &DomainDir,
        child: Option<Child>,
    ) -> anyhow::Result<()> {
        let mut control = Control::connect(dir)?;
        control.expect_ok(&VmmRequest::Monitor)?;
        let (mut reader, writer) = control.into_parts();
        reader.get_ref().set_read_timeout(None)?;
        let registry = self.clone();
        std::thread::Builder::new()
            .name(format!("monitor-{id}"))
            .spawn(move || {
                // The process sees the monitor gone if this end closes: keep it open.
                let mut writer = writer;
                let mut reason = None;
                while let Ok(event) = read_message::<VmmEvent>(&mut reader) {
                    match event {
                        VmmEvent::Exiting(r) => reason = Some(r),
                        VmmEvent::Committed => registry.incoming_committed(id),
                        VmmEvent::MayArrive { migration_id } => {
                            let answer = registry.may_arrive(id, &migration_id);
                            let _ = write_message(&mut writer, &answer);
                        }
                        VmmEvent::StaysHere { migration_id } => {
                            registry.stays_here(id, &migration_id)
                        }
                    }
                }
                // Drain until the process really closed the socket.
                let mut sink = [0u8; 64];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                if let Some(child) = child {
                    let _ = child.wait();
                }
                registry.guest_ended(id, reason);
            })?;
        Ok(())
    }

    /// Applies the domain's policy after its process ended.
    pub(super) fn guest_ended(self: &Arc<Self>, id: u32, reason: Option<ExitReason>) {
        let Some((dir, life)) = self
            .lock()
            .get(&id)
            .map(|d| (d.dir.clone(), d.life.clone()))
        else {
            return;
        };
        sandbox::remove_cgroup(&dir);
        // A process the sandbox killed said nothing on its way out; its report says why.
        let reason = match sandbox::violation(&dir) {
            Some(message) => {
                log::error!("domain {id}'s guest process was {message}");
                let reason = ExitReason::Crash { message };
                if let Ok(json) = serde_json::to_vec(&reason) {
                    let _ = tern_vmm::record::write_atomically(&dir.exit_file(), &json);
                }
                Some(reason)
            }
            None => reason,
        };
        if let Life::Incoming { migration_id, .. } = life {
            self.incoming_ended(id, &migration_id, reason);
            return;
        }
        if self.postcopy_died(id, &dir) {
            return;
        }
        let reason = reason
            .or_else(|| read_exit_file(&dir))
            .unwrap_or(ExitReason::Crash {
                message: "the guest process died".into(),
            });
        log::info!("domain {id} ended: {reason:?}");
        let Some(action) = self.next_action(id, &reason) else {
            return;
        };
        match action {
            Action::Destroy | Action::CoredumpDestroy => self.forget_for_good(id),
            Action::Preserve => {
                let state = match reason {
                    ExitReason::Poweroff | ExitReason::Reboot => DomainState::Shutdown,
                    _ => DomainState::Crashed,
                };
                self.set_life(id, Life::Ended(state));
            }
            Action::Restart | Action::RenameRestart | Action::CoredumpRestart => {
                if let Err(e) = boot_fresh(&dir).and_then(|_| self.launch(id, &dir, None, None)) {
                    log::error!("cannot restart domain {id}: {e:#}");
                    self.set_life(id, Life::Ended(DomainState::Crashed));
                }
            }
        }
    }

    /// What to do with domain `id` after it ended for `reason`; a restart is counted and the
    /// domain marked starting. `None` if there is nothing more to do: the domain is gone, or
    /// restarted too often and left crashed.
    fn next_action(&self, id: u32, reason: &ExitReason) -> Option<Action> {
        let mut domains = self.lock();
        let d = domains.get_mut(&id)?;
        let action = exit_action(&d.config, reason);
        if is_restart(action) {
            if !d.may_restart() {
                log::warn!("domain {id} restarted {MAX_RESTARTS} times within {RESTART_WINDOW:?}; leaving it crashed");
                d.life = Life::Ended(DomainState::Crashed);
                self.changed.notify_all();
                return None;
            }
            d.life = Life::Starting;
        }
        Some(action)
    }

    /// Destroys a domain: stops its process if it runs, forgets it.
    pub fn destroy(&self, key: &str) -> anyhow::Result<()> {
        let (id, dir, life) = self.find(key)?;
        match life {
            Life::Ended(_) => {
                self.forget_for_good(id);
                Ok(())
            }
            Life::Starting => bail!("domain '{key}' is still starting; try again"),
            Life::Live { pid } | Life::Incoming { pid, .. } => {
                if let Err(e) = guest_process::request(&dir, &VmmRequest::Destroy) {
                    log::warn!("domain {id} did not take the destroy request ({e:#}); killing it");
                    kill(pid);
                }
                if !self.wait_gone(id, Duration::from_secs(10)) {
                    kill(pid);
                    if !self.wait_gone(id, Duration::from_secs(10)) {
                        bail!("domain '{key}' did not go away after being killed");
                    }
                }
                Ok(())
            }
        }
    }

    /// Presses the guest's power button; with `wait`, returns once it is gone or shut down.
    pub fn shutdown(&self, key: &str, wait: bool) -> anyhow::Result<()> {
        let (id, dir) = self.find_live(key)?;
        guest_process::request(&dir, &VmmRequest::PowerButton)?;
        if wait {
            let down = |d: &std::collections::BTreeMap<u32, Domain>| {
                d.get(&id)
                    .is_none_or(|d| !matches!(d.life, Life::Live { .. } | Life::Starting))
            };
            if !self.wait_until(Duration::from_secs(120), down) {
                bail!("domain '{key}' did not shut down within 120 s");
            }
        }
        Ok(())
    }
}

impl Domain {
    /// Counts a restart now, unless the domain restarted [`MAX_RESTARTS`] times within
    /// [`RESTART_WINDOW`]: a crash loop is left crashed.
    fn may_restart(&mut self) -> bool {
        self.restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
        if self.restarts.len() >= MAX_RESTARTS {
            return false;
        }
        self.restarts.push(Instant::now());
        true
    }
}

/// What the guest's config says to do when its process ended for `reason`; ends that were
/// asked for (destroy, save, migration) leave nothing to keep.
fn exit_action(config: &DomainConfig, reason: &ExitReason) -> Action {
    match reason {
        ExitReason::Destroyed
        | ExitReason::Saved
        | ExitReason::Migrated { .. }
        | ExitReason::IncomingAborted { .. } => Action::Destroy,
        ExitReason::Poweroff => config.on_poweroff,
        ExitReason::Reboot => config.on_reboot,
        ExitReason::Crash { .. } => config.on_crash,
    }
}

fn is_restart(action: Action) -> bool {
    matches!(
        action,
        Action::Restart | Action::RenameRestart | Action::CoredumpRestart
    )
}

/// A restarted domain boots its kernel, whatever it was restored or migrated from.
fn boot_fresh(dir: &DomainDir) -> anyhow::Result<()> {
    let mut record = dir.load_record()?;
    record.restore = None;
    record.incoming = None;
    record.start_paused = false;
    dir.save_record(&record)
}

/// Why the process said it ended, if it could write it down before the monitor heard.
fn read_exit_file(dir: &DomainDir) -> Option<ExitReason> {
    let text = std::fs::read(dir.exit_file()).ok()?;
    serde_json::from_slice(&text).ok()
}

fn kill(pid: u32) {
    if pid > 1 {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}
