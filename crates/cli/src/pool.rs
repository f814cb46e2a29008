//! `tern host list|evacuate|resume` and `tern list --pool`: the pool of hosts this host is
//! one of, as its daemon reads it from etcd.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Context;
use tern_api::{EvacuationEvent, EvacuationSummary, Request};
use tern_pool::{GuestRecord, HostView};

use crate::client;

pub fn host_list(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = client::call(socket, &Request::PoolHosts)?;
    let hosts: Vec<HostView> =
        serde_json::from_value(data).context("the daemon sent a malformed host list")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<12} {:>10} {:>10} {:>6}  Address",
        "Host", "State", "Mem(MiB)", "Free(MiB)", "Guests"
    );
    for h in hosts {
        println!(
            "{:<20} {:<12} {:>10} {:>10} {:>6}  {}",
            h.record.name,
            h.state.as_str(),
            h.record.memory_total_mib,
            h.record.memory_free_mib,
            h.record.guests,
            h.record.address
        );
    }
    Ok(())
}

pub fn pool_list(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = client::call(socket, &Request::PoolGuests)?;
    let guests: Vec<GuestRecord> =
        serde_json::from_value(data).context("the daemon sent a malformed guest list")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&guests)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:>8} {:>5}  UUID",
        "Name", "Host", "Mem(MiB)", "VCPUs"
    );
    for g in guests {
        println!(
            "{:<32} {:<20} {:>8} {:>5}  {}",
            g.name, g.host, g.memory_mib, g.vcpus, g.uuid
        );
    }
    Ok(())
}

pub fn resume(socket: &Path, host: &str) -> anyhow::Result<()> {
    client::call(
        socket,
        &Request::ResumeHost {
            host: host.to_string(),
        },
    )?;
    println!("Host {host} takes guests again");
    Ok(())
}

pub fn evacuate(
    socket: &Path,
    host: &str,
    live: bool,
    parallel: u32,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let request = Request::Evacuate {
        host: host.to_string(),
        live,
        parallel,
        dry_run,
    };
    let terminal = !json && std::io::stderr().is_terminal();
    let mut conn = client::send(socket, &request)?;
    let data = client::finish(&mut conn, |data| {
        let Ok(event) = serde_json::from_value::<EvacuationEvent>(data.clone()) else {
            return;
        };
        if !json {
            show_event(&event, terminal);
        }
    })?;
    let summary: EvacuationSummary =
        serde_json::from_value(data).context("the daemon sent a malformed summary")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if dry_run {
        print_plan(&summary);
    } else {
        println!(
            "Evacuated {host}: {} of {} guests moved in {:.1} s{}",
            summary.moved.len(),
            summary.moves.len(),
            summary.total_seconds,
            if summary.failed.is_empty() {
                String::new()
            } else {
                format!("; {} still here", summary.failed.len())
            }
        );
        for (guest, why) in &summary.failed {
            println!("  {guest}: {why}");
        }
    }
    Ok(summary.failed.is_empty())
}

fn print_plan(summary: &EvacuationSummary) {
    println!(
        "Plan for {} ({} guests; nothing moved):",
        summary.host,
        summary.moves.len()
    );
    for m in &summary.moves {
        println!("  {:<32} {:>6} MiB  -> {}", m.guest, m.memory_mib, m.to);
    }
}

fn show_event(event: &EvacuationEvent, terminal: bool) {
    match event {
        EvacuationEvent::Plan { moves } => {
            eprintln!("Moving {} guests:", moves.len());
            for m in moves {
                eprintln!("  {:<32} {:>6} MiB  -> {}", m.guest, m.memory_mib, m.to);
            }
        }
        EvacuationEvent::Progress {
            guest,
            to,
            progress,
        } if terminal => {
            eprint!(
                "\r\x1b[K{guest} -> {to}: {} round {}, {} pages left",
                progress.phase, progress.round, progress.pages_left
            );
        }
        EvacuationEvent::Progress { .. } => {}
        EvacuationEvent::Moved {
            guest,
            to,
            error,
            downtime_ms,
        } => {
            if terminal {
                eprint!("\r\x1b[K");
            }
            match (error, downtime_ms) {
                (Some(e), _) => eprintln!("{guest}: NOT moved to {to}: {e}"),
                (None, Some(d)) => eprintln!("{guest}: moved to {to} ({d:.1} ms downtime)"),
                (None, None) => eprintln!("{guest}: moved to {to}"),
            }
        }
    }
}
