//! Evacuating a host: run on it, or asked of it by another host of the pool over the
//! relocation channel (its daemon is the source of every move). Maintenance first (no guest is placed here any more), then every
//! guest it owns moved to the host the plan gives it, `parallel` at a time. Planned from what
//! the pool says now, so an evacuation that was interrupted (a killed daemon) is simply run
//! again: it moves what is left.

use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_api::{EvacuationEvent, EvacuationSummary, MigrateOptions, PlannedMove};
use tern_migration::link::{self, Security};
use tern_migration::{ToDestination, ToSource};
use tern_pool::{plan_evacuation, GuestRecord};

use crate::pool::PoolLink;
use crate::registry::{Life, Registry};

/// How to evacuate.
#[derive(Clone, Copy, Debug)]
pub struct EvacuateOptions {
    pub live: bool,
    pub parallel: u32,
    pub dry_run: bool,
}

/// Evacuates `host`, telling `events` what happens: this host itself, or another host of the
/// pool asked over its relocation server (its daemon moves its guests).
pub fn evacuate(
    registry: &Arc<Registry>,
    host: &str,
    options: EvacuateOptions,
    events: impl FnMut(&EvacuationEvent) + Send,
) -> anyhow::Result<EvacuationSummary> {
    let pool = registry
        .pool()
        .context("this host is not in a pool ([pool] in its daemon config)")?
        .clone();
    if host == pool.host() {
        evacuate_here(registry, host, options, events)
    } else {
        ask_to_evacuate(registry, &pool, host, options, events)
    }
}

/// How long a host asked to evacuate may stay silent (a guest's migration reports progress
/// every few seconds).
const REMOTE_SILENCE: Duration = Duration::from_secs(300);

/// Asks `host`'s daemon, over its relocation server, to evacuate; passes its events on.
fn ask_to_evacuate(
    registry: &Registry,
    pool: &PoolLink,
    host: &str,
    options: EvacuateOptions,
    mut events: impl FnMut(&EvacuationEvent),
) -> anyhow::Result<EvacuationSummary> {
    let record = pool
        .hosts()?
        .into_iter()
        .find(|h| h.record.name == host)
        .with_context(|| format!("no host {host} in this pool"))?;
    if record.state == tern_pool::HostState::Down {
        bail!("host {host} is down: its daemon cannot be asked to evacuate it");
    }
    let address = &record.record.address;
    let addr = crate::registry::resolve(address)?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("cannot reach host {host} at {addr}"))?;
    let security = Security::load(&registry.trust().outgoing())?;
    let mut ch = link::open(stream, &security, &crate::registry::server_name(address))?;
    let ask = ToDestination::Evacuate {
        host: host.to_string(),
        live: options.live,
        parallel: options.parallel,
        dry_run: options.dry_run,
    };
    let mut reply = link::ask(&mut ch, &ask, REMOTE_SILENCE)?;
    loop {
        match reply {
            ToSource::Evacuation { event } => {
                if let Ok(event) = serde_json::from_value::<EvacuationEvent>(event) {
                    events(&event);
                }
            }
            ToSource::Evacuated { summary } => {
                return serde_json::from_value(summary)
                    .with_context(|| format!("host {host} sent a malformed summary"));
            }
            ToSource::Refuse { reason } => bail!("host {host}: {reason}"),
            other => bail!("host {host} answered {other:?}"),
        }
        reply = ch.receive::<ToSource>(REMOTE_SILENCE)?;
    }
}

/// Evacuates this host (`host` must name it).
pub fn evacuate_here(
    registry: &Arc<Registry>,
    host: &str,
    options: EvacuateOptions,
    events: impl FnMut(&EvacuationEvent) + Send,
) -> anyhow::Result<EvacuationSummary> {
    let started = Instant::now();
    let pool = registry
        .pool()
        .context("this host is not in a pool ([pool] in its daemon config)")?
        .clone();
    if host != pool.host() {
        bail!("this is host {}, not {host}", pool.host());
    }
    let guests = local_guests(registry, &pool.guests_on_me()?);
    let hosts = pool.hosts()?;
    let plan = plan_evacuation(host, &hosts, &guests)?;
    let moves: Vec<PlannedMove> = plan
        .moves
        .iter()
        .map(|m| PlannedMove {
            guest: m.name.clone(),
            uuid: m.uuid.clone(),
            memory_mib: m.memory_mib,
            to: m.to.clone(),
            address: m.address.clone(),
        })
        .collect();
    let mut summary = EvacuationSummary {
        host: host.to_string(),
        dry_run: options.dry_run,
        moves: moves.clone(),
        ..EvacuationSummary::default()
    };
    if options.dry_run {
        return Ok(summary);
    }
    pool.set_maintenance(true)?;
    log::info!(
        "evacuating: {} guests to move, {} at a time",
        moves.len(),
        options.parallel.max(1)
    );
    let events = Mutex::new(events);
    let emit = |e: &EvacuationEvent| (events.lock().unwrap_or_else(|p| p.into_inner()))(e);
    emit(&EvacuationEvent::Plan {
        moves: moves.clone(),
    });
    let results = run_moves(registry, &moves, options, &emit);
    for (guest, result) in results {
        match result {
            Ok(()) => summary.moved.push(guest),
            Err(e) => summary.failed.push((guest, e)),
        }
    }
    summary.total_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The pool's records of this host's guests that run here (by UUID).
fn local_guests(registry: &Registry, records: &[GuestRecord]) -> Vec<GuestRecord> {
    let here: Vec<String> = registry
        .list_lives()
        .into_iter()
        .filter(|(_, life)| matches!(life, Life::Live { .. }))
        .map(|(uuid, _)| uuid)
        .collect();
    records
        .iter()
        .filter(|r| here.contains(&r.uuid))
        .cloned()
        .collect()
}

/// Runs the moves with `options.parallel` workers; each guest's result.
fn run_moves(
    registry: &Arc<Registry>,
    moves: &[PlannedMove],
    options: EvacuateOptions,
    emit: &(dyn Fn(&EvacuationEvent) + Sync),
) -> Vec<(String, Result<(), String>)> {
    let queue = Mutex::new(moves.iter());
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..options.parallel.max(1) {
            let (queue, done_tx) = (&queue, done_tx.clone());
            s.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some(m) = next else {
                    return;
                };
                let result = move_one(registry, m, options.live, emit);
                let _ = done_tx.send((m.guest.clone(), result));
            });
        }
    });
    drop(done_tx);
    done_rx.into_iter().collect()
}

fn move_one(
    registry: &Arc<Registry>,
    m: &PlannedMove,
    live: bool,
    emit: &(dyn Fn(&EvacuationEvent) + Sync),
) -> Result<(), String> {
    let options = MigrateOptions {
        live,
        resource_mbit: None,
        max_downtime_ms: tern_api::DEFAULT_MAX_DOWNTIME_MS,
        force: false,
        postcopy: false,
        copy_storage: false,
        remove_source_images: false,
    };
    let result = registry.migrate(&m.guest, &m.address, &options, |p| {
        emit(&EvacuationEvent::Progress {
            guest: m.guest.clone(),
            to: m.to.clone(),
            progress: p.clone(),
        })
    });
    let (error, downtime_ms) = match &result {
        Ok(s) => (None, Some(s.downtime_ms)),
        Err(e) => (Some(format!("{e:#}")), None),
    };
    emit(&EvacuationEvent::Moved {
        guest: m.guest.clone(),
        to: m.to.clone(),
        error: error.clone(),
        downtime_ms,
    });
    match error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}
