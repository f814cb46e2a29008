//! `tern migrate`.

use std::path::Path;

use anyhow::Context;
use tern_api::{MigrateOptions, MigrationProgress, MigrationSummary, PostcopySummary, Request};

use crate::client;
use crate::progress::{bytes, ProgressLine};

pub fn migrate(
    socket: &Path,
    domain: &str,
    destination: &str,
    options: MigrateOptions,
    json: bool,
) -> anyhow::Result<()> {
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
    format!(
        "{} round {}, {} pages left, {} sent, {}/s, ETA {eta}{throttle}",
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
