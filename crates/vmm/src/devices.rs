//! The guest's virtio devices, built from its config: a TAP-backed network card per `vif` and a
//! virtio-blk disk per `disk` (raw image, block device or NBD export).
//!
//! Order is fixed: network cards first, then disks, each in config order. A restore builds the
//! same devices from the same config, so device IDs and MMIO slots match the checkpoint.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::{bail, Context};
use tern_config::{DiskBackend, DiskSpec, VifSpec};
use tern_devices::virtio::block::{BlockBackend, FileBackend, VirtioBlock};
use tern_devices::virtio::net::{Announcer, NetBackend, VirtioNet};
use tern_devices::virtio::VirtioDevice;
use tern_net::Tap;
use tern_storage::WriteLog;

use crate::record::DomainRecord;

/// Times a restored guest's MAC is announced (RARP), as QEMU does.
const ANNOUNCE_ROUNDS: u32 = 5;

/// The guest's devices, and what a migration that copies its disks needs of them.
pub struct Built {
    pub virtio: Vec<Box<dyn VirtioDevice>>,
    pub disks: Vec<GuestDisk>,
}

/// A disk of the guest: its config, and the log of the blocks the guest writes to it.
#[derive(Clone)]
pub struct GuestDisk {
    pub spec: DiskSpec,
    pub written: Arc<WriteLog>,
}

/// Builds every virtio device of the guest.
pub fn build(record: &DomainRecord) -> anyhow::Result<Built> {
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, vif) in record.config.vifs.iter().enumerate() {
        virtio
            .push(net_device(record.id, i, vif).with_context(|| format!("network interface {i}"))?);
    }
    let mut disks = Vec::new();
    for (i, spec) in record.config.disks.iter().enumerate() {
        let device = disk_device(i, spec).with_context(|| format!("disk {}", spec.vdev))?;
        disks.push(GuestDisk {
            spec: spec.clone(),
            written: device.write_log(),
        });
        virtio.push(Box::new(device));
    }
    Ok(Built { virtio, disks })
}

/// Name of the TAP device of a guest's `index`th interface.
pub fn tap_name(domid: u32, index: usize) -> String {
    format!("tern{domid}.{index}")
}

fn net_device(domid: u32, index: usize, vif: &VifSpec) -> anyhow::Result<Box<dyn VirtioDevice>> {
    let mac = vif.mac.context("it has no MAC address")?;
    let bridge = vif
        .bridge
        .as_deref()
        .context("it names no bridge (vif = ['mac=..., bridge=br0'])")?;
    if !tern_net::bridge_exists(bridge) {
        bail!("bridge {bridge} does not exist on this host");
    }
    let tap = Tap::create(&tap_name(domid, index))?;
    tap.attach_to_bridge(bridge)?;
    tap.set_nonblocking(true)?;
    let announce_tap = tap.try_clone()?;
    let announcer: Announcer = Box::new(move |mac| {
        if let Err(e) = tern_net::announce(&announce_tap, mac, ANNOUNCE_ROUNDS) {
            log::warn!("cannot announce {mac:02x?}: {e}");
        }
    });
    Ok(Box::new(VirtioNet::new(
        &format!("net{index}"),
        mac.0,
        Box::new(TapBackend(tap)),
        Some(announcer),
    )))
}

fn disk_device(index: usize, disk: &DiskSpec) -> anyhow::Result<VirtioBlock> {
    let read_only = !disk.writable;
    let backend: Box<dyn BlockBackend> = match &disk.backend {
        DiskBackend::File(path) | DiskBackend::Phy(path) => Box::new(
            FileBackend::open(path, read_only)
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        DiskBackend::Nbd { host, port, export } => {
            let addr = format!("{host}:{port}");
            let nbd = tern_nbd::NbdDisk::connect(
                &addr,
                export.as_deref().unwrap_or(""),
                &Default::default(),
            )
            .with_context(|| format!("cannot use the NBD export at {addr}"))?;
            if !read_only && nbd.read_only() {
                bail!("the NBD export at {addr} is read-only but the disk is writable");
            }
            Box::new(NbdBackend(nbd))
        }
    };
    Ok(VirtioBlock::new(
        &format!("blk{index}"),
        &format!("tern-{}", disk.vdev),
        backend,
    ))
}

/// A TAP device as a virtio-net backend.
struct TapBackend(Tap);

impl AsRawFd for TapBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for TapBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.0.write(frame)
    }
}

/// An NBD export as a virtio-blk backend.
struct NbdBackend(tern_nbd::NbdDisk);

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        self.0.read_only()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.0.can_flush() {
            self.0.flush()
        } else {
            Ok(())
        }
    }
}
