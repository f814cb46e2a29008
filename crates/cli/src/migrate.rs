//! `tern migrate`, and cancelling a migration: `tern migrate --cancel`, or Ctrl-C on the
//! `tern migrate` that started it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_api::{
    DiskCopySummary, DomainState, MigrateOptions, MigrationCancel, MigrationProgress,
    MigrationSummary, PostcopySummary, Request,
};

use crate::client;
use crate::progress::{bytes, ProgressLine};

pub fn migrate(
    socket: &Path,
    domain: &str,
    destination: &str,
    options: MigrateOptions,
    json: bool,
) -> anyhow::Result<()> {
    let progress_seen = cancel_on_ctrl_c(socket, domain)?;
    let mut conn = client::send(
        socket,
        &Request::Migrate {
            domain: domain.into(),
            destination: destination.into(),
            options,
        },
    )?;
    let mut line = ProgressLine::new(&format!("migrating {domain}"));
    let result = client::finish(&mut conn, |data| {
        progress_seen.store(true, Ordering::Release);
        if let Ok(p) = serde_json::from_value::<MigrationProgress>(data.clone()) {
            line.draw(|| progress_text(&p));
        }
    });
    line.finish();
    let summary: MigrationSummary =
        serde_json::from_value(result?).context("malformed migration summary")?;
    if summary.insecure {
        eprintln!(
            "Warning: this migration was neither authenticated nor encrypted ([relocation] insecure = true)"
        );
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", describe(&summary));
    }
    Ok(())
}

/// `tern migrate --cancel`: cancels the guest's migration and says how it ended.
pub fn cancel(socket: &Path, domain: &str, json: bool) -> anyhow::Result<()> {
    let data = client::call(
        socket,
        &Request::CancelMigration {
            domain: domain.into(),
        },
    )?;
    let outcome: MigrationCancel =
        serde_json::from_value(data).context("the daemon sent a malformed answer to the cancel")?;
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        println!("{}", describe_cancel(&outcome));
    }
    Ok(())
}

/// The one-line confirmation of a cancel.
fn describe_cancel(c: &MigrationCancel) -> String {
    let to = c
        .destination
        .as_deref()
        .map_or_else(String::new, |d| format!(" to {d}"));
    if !c.stopped {
        return format!(
            "Cancelling the migration of {}{to}: it can no longer hand the guest over and stops \
             at its next check (tern list shows when)",
            c.domain
        );
    }
    let here = match c.state {
        DomainState::Running | DomainState::Blocked => "it keeps running here".to_string(),
        DomainState::Paused => "it stays here, paused".to_string(),
        other => format!("it is {} here", other.as_str()),
    };
    format!("Cancelled the migration of {}{to}; {here}", c.domain)
}

/// Makes Ctrl-C cancel the migration this command starts rather than end the command and
/// leave the migration running: SIGINT is blocked in this thread (and so in any it starts)
/// and taken by a thread of its own, which asks the daemon to cancel; the migration's end is
/// then reported as usual. Returns the flag to raise once the daemon relays progress (the
/// migration is then under way, so a refusal to cancel is final).
fn cancel_on_ctrl_c(socket: &Path, domain: &str) -> anyhow::Result<Arc<AtomicBool>> {
    let progress_seen = Arc::new(AtomicBool::new(false));
    if sigint_ignored() {
        // Started with SIGINT ignored (in the background of a script, under nohup): leave it so.
        return Ok(progress_seen);
    }
    let signals = sigint_only();
    // SAFETY: changes the signal mask of this thread, before it starts any other.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        bail!(
            "cannot take over Ctrl-C: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let seen = progress_seen.clone();
    let (socket, domain) = (socket.to_path_buf(), domain.to_string());
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || cancel_when_interrupted(&socket, &domain, &seen))
        .context("cannot take over Ctrl-C")?;
    Ok(progress_seen)
}

/// Whether this process ignores SIGINT (as programs started in the background by a shell
/// without job control do).
fn sigint_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `current`.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// A signal set holding SIGINT alone.
fn sigint_only() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds a valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Waits for the next SIGINT (blocked, so it waits here rather than ending the process).
fn wait_for_sigint() -> bool {
    let signals = sigint_only();
    let mut signal = 0;
    // SAFETY: sigwait reads the set and writes one int.
    unsafe { libc::sigwait(&signals, &mut signal) == 0 }
}

/// The Ctrl-C thread: on the first Ctrl-C, asks the daemon to cancel the migration of
/// `domain`; on a second, stops waiting for it to end.
fn cancel_when_interrupted(socket: &Path, domain: &str, progress_seen: &AtomicBool) {
    if !wait_for_sigint() {
        return;
    }
    eprintln!(
        "\nCtrl-C: cancelling the migration of {domain} (Ctrl-C again stops waiting for it to end)"
    );
    let name = domain.to_string();
    let _ = std::thread::Builder::new()
        .name("ctrl-c-again".into())
        .spawn(move || {
            if wait_for_sigint() {
                eprintln!(
                    "Error: stopped waiting; the migration of '{name}' is being cancelled \
                     (tern list shows it)"
                );
                std::process::exit(130);
            }
        });
    let request = Request::CancelMigration {
        domain: domain.to_string(),
    };
    loop {
        // Progress relayed before this attempt: the daemon had the migration, so its answer
        // is final. Before that it may not have started it yet: try again shortly.
        let under_way = progress_seen.load(Ordering::Acquire);
        match client::call(socket, &request) {
            // The migration's own answer reports the cancellation.
            Ok(_) => return,
            Err(e) if under_way => {
                eprintln!("Warning: cannot cancel: {}", one_line(&format!("{e:#}")));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The progress text: phase, round, pages left, rate, ETA, throttle.
fn progress_text(p: &MigrationProgress) -> String {
    let eta = p
        .eta_seconds
        .map_or_else(|| "-".to_string(), |s| format!("{s:.1} s"));
    let throttle = if p.throttle_percent > 0 {
        format!(", vCPUs throttled {}%", p.throttle_percent)
    } else {
        String::new()
    };
    if p.phase.starts_with("post-copy") {
        return format!(
            "{}: {} pages to go, {} sent, {}/s, ETA {eta}",
            p.phase,
            p.pages_left,
            bytes(p.bytes_sent),
            bytes(p.rate_bps as u64),
        );
    }
    // Disk and memory share the link: each part says what it has left.
    let disk = p.disk.as_ref().map_or_else(String::new, |d| {
        let eta = d
            .eta_seconds
            .map_or_else(|| "-".to_string(), |s| format!("{s:.1} s"));
        format!(
            "; disks: {} left, {} sent, ETA {eta}",
            bytes(d.bytes_left),
            bytes(d.bytes_sent)
        )
    });
    format!(
        "{} round {}, memory: {} pages left, {} sent, {}/s, ETA {eta}{throttle}{disk}",
        p.phase,
        p.round,
        p.pages_left,
        bytes(p.bytes_sent),
        bytes(p.rate_bps as u64),
    )
}

/// The human summary of a migration, several lines.
pub fn describe(s: &MigrationSummary) -> String {
    let mut out = format!(
        "Migrated {} to {} (id={} there), {} migration\n",
        s.domain,
        s.destination,
        s.destination_id,
        if s.live { "live" } else { "warm" }
    );
    out += &format!("  total time   {:.3} s\n", s.total_seconds);
    let p = &s.downtime_parts;
    out += &format!(
        "  downtime     {:.1} ms (last pages {:.1}, state {:.1}, load {:.1}, handover {:.1})\n",
        s.downtime_ms, p.last_pages_ms, p.state_ms, p.load_ms, p.handover_ms
    );
    out += &format!(
        "  vCPU stall   {:.1} ms at most (the longest a vCPU was kept out of the guest)\n",
        s.longest_vcpu_stall_ms
    );
    out += &format!("  rounds       {}", s.rounds.len());
    let per_round: Vec<String> = s
        .rounds
        .iter()
        .map(|r| {
            let mark = if r.stop_and_copy { " (paused)" } else { "" };
            format!("{}{mark}", r.pages)
        })
        .collect();
    out += &format!(": pages {}\n", per_round.join(", "));
    let cap = s
        .resource_mbit
        .map_or_else(String::new, |c| format!(" (cap {c} Mbit/s)"));
    out += &format!(
        "  sent         {} at a mean {:.0} Mbit/s{cap}\n",
        bytes(s.bytes_sent),
        s.mean_rate_mbit
    );
    let throttle = if s.max_throttle_percent > 0 {
        format!(
            "yes, vCPUs slowed down by up to {}%",
            s.max_throttle_percent
        )
    } else {
        "no".to_string()
    };
    out += &format!("  throttling   {throttle}\n");
    out += &format!("  stopped      {}\n", s.stop_reason);
    if let Some(pc) = &s.postcopy {
        out += &postcopy_lines(pc);
    }
    if let Some(d) = &s.disks {
        out += &disk_lines(d);
    }
    out += &format!(
        "  link         {}\n",
        if s.insecure {
            "plaintext (insecure = true)"
        } else {
            "TLS 1.3, mutually authenticated"
        }
    );
    out
}

/// The disks copied with the guest: what went when, where the images are.
fn disk_lines(d: &DiskCopySummary) -> String {
    let rounds: Vec<String> = d.round_bytes.iter().map(|b| bytes(*b)).collect();
    let mut out = format!(
        "  disks        {} sent: bulk pass {} in {:.1} s, then rounds {}; {} of holes and zeros not sent\n",
        bytes(d.bytes_sent),
        bytes(d.bulk_bytes),
        d.bulk_seconds,
        if rounds.is_empty() { "none".to_string() } else { rounds.join(", ") },
        bytes(d.bytes_skipped)
    );
    for disk in &d.disks {
        let here = if disk.source_removed {
            "removed here"
        } else {
            "left in place here"
        };
        out += &format!(
            "               {} ({}) copied; {} {here}\n",
            disk.vdev,
            bytes(disk.size),
            disk.source_path
        );
    }
    out
}

/// The post-copy phase: what was missing, how it came, how long the guest waited.
fn postcopy_lines(pc: &PostcopySummary) -> String {
    let mut out = format!(
        "  post-copy    {} pages missing at the handover: {} fetched on demand ({} faults), {} pushed\n",
        pc.pages_missing, pc.pages_fetched, pc.faults, pc.pages_pushed
    );
    out += &format!(
        "               every page there {:.3} s after the resume; longest fault wait {:.1} ms\n",
        pc.seconds_until_complete, pc.longest_fault_wait_ms
    );
    if pc.reconnects > 0 {
        out += &format!(
            "               the link broke and was resumed {} time(s)\n",
            pc.reconnects
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::MigrationRound;

    #[test]
    fn a_cancel_says_where_the_guest_is() {
        let mut c = MigrationCancel {
            domain: "g".into(),
            destination: Some("10.0.0.2:8002".into()),
            stopped: true,
            state: DomainState::Blocked,
        };
        assert_eq!(
            describe_cancel(&c),
            "Cancelled the migration of g to 10.0.0.2:8002; it keeps running here"
        );
        c.state = DomainState::Paused;
        assert!(describe_cancel(&c).ends_with("it stays here, paused"));
        c.stopped = false;
        assert!(describe_cancel(&c).starts_with("Cancelling the migration of g to"));
    }

    #[test]
    fn summary_names_rounds_and_throttling() {
        let s = MigrationSummary {
            domain: "g".into(),
            destination: "10.0.0.2:8002".into(),
            destination_id: 4,
            live: true,
            rounds: vec![
                MigrationRound {
                    pages: 1000,
                    ..Default::default()
                },
                MigrationRound {
                    round: 1,
                    pages: 12,
                    stop_and_copy: true,
                    ..Default::default()
                },
            ],
            max_throttle_percent: 40,
            longest_vcpu_stall_ms: 4.5,
            stop_reason: "remaining pages fit the downtime budget".into(),
            ..Default::default()
        };
        let text = describe(&s);
        assert!(text.contains("live migration"), "{text}");
        assert!(text.contains("pages 1000, 12 (paused)"), "{text}");
        assert!(text.contains("up to 40%"), "{text}");
        assert!(text.contains("vCPU stall   4.5 ms"), "{text}");
        assert!(!text.contains("post-copy"), "{text}");
    }

    #[test]
    fn summary_names_the_post_copy_phase() {
        let s = MigrationSummary {
            live: true,
            postcopy: Some(PostcopySummary {
                pages_missing: 1000,
                pages_fetched: 120,
                pages_pushed: 880,
                faults: 118,
                seconds_until_complete: 0.25,
                longest_fault_wait_ms: 3.5,
                reconnects: 1,
            }),
            ..Default::default()
        };
        let text = describe(&s);
        assert!(text.contains("1000 pages missing"), "{text}");
        assert!(
            text.contains("120 fetched on demand (118 faults), 880 pushed"),
            "{text}"
        );
        assert!(text.contains("0.250 s after the resume"), "{text}");
        assert!(text.contains("longest fault wait 3.5 ms"), "{text}");
        assert!(text.contains("resumed 1 time"), "{text}");
    }
}
