//! Receiving a guest in post-copy: the guest runs before all its memory is here.
//!
//! Before `Ready` the pages the source named MISSING are punched out of the RAM file (their
//! pre-copied content is stale) and guest RAM is registered with userfaultfd, so that a vCPU,
//! KVM on its behalf or a device touching one of them waits until it arrives. After `Go` the
//! incoming thread runs the engine's fault loop ([`PostcopyDestination`]) until every page is
//! in. If the connection breaks, the guest's threads wait in their faults; the source comes
//! back through the daemon's relocation server, which passes the new connection here
//! ([`take_resumed`]).

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tern_api::vmm::VmmReply;
use tern_api::write_message;
use tern_machine::memory::RamSlot;
use tern_machine::uffd::Uffd;
use tern_machine::Machine;
use tern_migration::link::{self, Link, Security};
use tern_migration::postcopy::{drop_stale, PostcopyDestination, PostcopyTarget};
use tern_migration::transport::Channel;
use tern_migration::{guest_slice, GuestSlice, PageSet, RamRegion};

use crate::lifecycle::Event;
use crate::record::IncomingState;
use crate::Vmm;

const PAGE: u64 = 4096;

/// Guest memory behind userfaultfd, as the engine's post-copy loop fills it. Holds its own
/// mappings and a clone of the RAM file, never the machine (its lock must stay free for
/// destroy).
pub(crate) struct UffdTarget {
    uffd: Uffd,
    regions: Vec<RamRegion>,
    ram_file: File,
    slots: Vec<RamSlot>,
}

impl UffdTarget {
    fn slice(&self, pfn: u64, pages: u64) -> Result<GuestSlice<'_>, String> {
        guest_slice(&self.regions, pfn, pages)
            .ok_or_else(|| format!("pages {pfn:#x}+{pages} are outside guest RAM"))
    }
}

impl PostcopyTarget for UffdTarget {
    fn discard(&self, first_pfn: u64, pages: u64) -> Result<(), String> {
        tern_machine::memory::discard(&self.ram_file, &self.slots, first_pfn * PAGE, pages * PAGE)
            .map_err(|e| e.to_string())
    }

    fn fault_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    fn next_fault(&self) -> Result<Option<u64>, String> {
        match self.uffd.next_fault() {
            Ok(Some(addr)) => self
                .regions
                .iter()
                .find_map(|r| r.pfn_at(addr))
                .map(Some)
                .ok_or_else(|| "a fault outside guest RAM".to_string()),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn install(&self, first_pfn: u64, data: &[u8]) -> Result<(), String> {
        let pages = data.len() as u64 / PAGE;
        self.uffd
            .copy(&self.slice(first_pfn, pages)?, data)
            .map_err(|e| e.to_string())
    }

    fn install_zeros(&self, first_pfn: u64, pages: u64) -> Result<(), String> {
        self.uffd
            .zero(&self.slice(first_pfn, pages)?)
            .map_err(|e| e.to_string())
    }

    fn finish(&self) -> Result<(), String> {
        self.uffd.unregister_all().map_err(|e| e.to_string())
    }
}

/// A post-copy migration between its MISSING records and its end.
pub(crate) struct Postcopy {
    target: UffdTarget,
    missing: PageSet,
}

/// Prepares the paused `machine` for post-copy of the pages of `missing`: guest RAM behind
/// userfaultfd, the stale copies of those pages dropped.
pub(crate) fn prepare(machine: &Machine, missing: PageSet) -> anyhow::Result<Postcopy> {
    let uffd = Uffd::new().context("userfaultfd is not available for post-copy")?;
    let regions = crate::migrate_in::regions(machine);
    for r in &regions {
        let whole = r.whole().context("guest RAM is not page-aligned")?;
        uffd.register(&whole)
            .context("cannot register guest RAM with userfaultfd")?;
    }
    let target = UffdTarget {
        uffd,
        regions,
        ram_file: machine
            .ram()
            .backing_file()
            .try_clone()
            .context("cannot share the guest RAM file")?,
        slots: machine.ram().slots().to_vec(),
    };
    drop_stale(&target, &missing)?;
    Ok(Postcopy { target, missing })
}

/// After `Go`: serves the guest's faults until every page is in, over `ch` and whatever
/// connections the source comes back on. Records the end in `state_file`.
pub(crate) fn serve(
    vmm: &Vmm,
    postcopy: Postcopy,
    ch: Channel<Link>,
    resumed: Instant,
    state_file: &Path,
) {
    let (links_tx, links) = mpsc::channel();
    *vmm.postcopy_links.lock().unwrap_or_else(|p| p.into_inner()) = Some(links_tx);
    let pages = postcopy.missing.count();
    log::info!("post-copy: the guest runs; {pages} pages to come");
    let mut keep_going = || {
        if vmm.life.ending() {
            Err("the guest was destroyed here".to_string())
        } else {
            Ok(())
        }
    };
    // Recorded before the source hears that every page is here.
    let mut whole = || {
        if let Err(e) = IncomingState::Committed.store(state_file) {
            log::error!("{e:#}");
        }
        let _ = vmm.life.apply(Event::PostcopyArrived);
        // The daemon may now make the handover final.
        vmm.notify_monitors(&tern_api::vmm::VmmEvent::Committed);
    };
    let regions = postcopy.target.regions.clone();
    let destination = PostcopyDestination::new(
        &postcopy.target,
        &regions,
        postcopy.missing,
        resumed,
        &links,
        &mut keep_going,
    )
    .on_complete(&mut whole);
    let result = destination.run(ch);
    *vmm.postcopy_links.lock().unwrap_or_else(|p| p.into_inner()) = None;
    match result {
        Ok(report) => {
            log::info!(
                "post-copy complete {:.3} s after the resume: {} pages fetched on demand, {} \
                 pushed, longest fault wait {:.1} ms",
                report.complete_after_us as f64 / 1e6,
                report.fetched,
                report.pushed,
                report.longest_wait_us as f64 / 1e3
            );
        }
        Err(e) => log::error!("post-copy ended before every page arrived: {e}"),
    }
}

/// Serves a `ResumePostcopy` request: the source came back for migration `migration_id`.
/// Answers, takes the connection's descriptor, accepts the stream's session on it (from the
/// source's key only) and hands it to the post-copy loop.
pub(crate) fn take_resumed(
    vmm: &Arc<Vmm>,
    reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    migration_id: &str,
) {
    let links = match resumable(vmm, migration_id) {
        Ok(links) => links,
        Err(message) => {
            let _ = write_message(&mut writer, &VmmReply::Error { message });
            return;
        }
    };
    let accepted =
        crate::migrate_out::take_connection(&reader, &mut writer).and_then(|tcp| accept(vmm, tcp));
    match accepted {
        Ok(link) => {
            if links.send(link).is_err() {
                log::warn!("post-copy: the source came back after the migration ended");
            }
        }
        Err(e) => log::warn!("post-copy: cannot take the source's new connection: {e:#}"),
    }
}

/// Where a resumed connection for `migration_id` goes, if this process serves it.
fn resumable(vmm: &Vmm, migration_id: &str) -> Result<mpsc::Sender<Link>, String> {
    let ours = vmm
        .record
        .incoming
        .as_ref()
        .is_some_and(|spec| spec.offer.migration_id == migration_id);
    let links = vmm
        .postcopy_links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match links {
        Some(links) if ours && vmm.life.receiving_postcopy() => Ok(links),
        _ => Err(format!(
            "no post-copy of migration {migration_id} is under way here"
        )),
    }
}

/// The stream's session on the new connection: TLS from the key that made the offer (or
/// plaintext on an insecure host).
fn accept(vmm: &Vmm, tcp: std::net::TcpStream) -> anyhow::Result<Link> {
    let spec = vmm
        .record
        .incoming
        .as_ref()
        .context("not an incoming migration")?;
    let security = Security::load(&spec.security)?;
    Ok(link::accept_stream(tcp, &security)?)
}
