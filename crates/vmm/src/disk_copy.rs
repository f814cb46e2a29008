//! The guest's disks in a migration that copies them (`tern migrate --copy-storage`): on the
//! source, each `file:` image as the engine reads it ([`FileDisk`]); on the destination, the
//! images arriving under temporary names in the place the daemon chose ([`ArrivingDisks`]),
//! named only once the guest is this host's.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tern_config::DiskBackend;
use tern_migration::{CopiedDisk, DiskTarget, Offer, SourceDisk};
use tern_storage::{IncomingImage, WriteLog};

use crate::devices::GuestDisk;
use crate::record::DomainRecord;

/// A `file:` disk of the running guest, read for copying.
pub(crate) struct FileDisk {
    vdev: String,
    path: PathBuf,
    file: File,
    size: u64,
    written: Arc<WriteLog>,
}

impl FileDisk {
    fn open(disk: &GuestDisk) -> anyhow::Result<FileDisk> {
        let path = match &disk.spec.backend {
            DiskBackend::File(path) => path.clone(),
            DiskBackend::Phy(path) => bail!(
                "disk {} is the block device {}: --copy-storage copies file: disks only",
                disk.spec.vdev,
                path.display()
            ),
            DiskBackend::Nbd { .. } => bail!("disk {} is on NBD storage", disk.spec.vdev),
        };
        let file = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(FileDisk {
            vdev: disk.spec.vdev.clone(),
            path,
            file,
            size,
            written: disk.written.clone(),
        })
    }

    fn allocated_bytes(&self) -> anyhow::Result<u64> {
        let extents = tern_storage::allocated(&self.file, 0..self.size, 4096)
            .with_context(|| format!("cannot map {}", self.path.display()))?;
        Ok(extents.iter().map(|r| r.end - r.start).sum())
    }
}

/// The disks `--copy-storage` copies: every `file:` disk (NBD disks are on storage both
/// hosts reach already; a `phy:` disk cannot be copied, so the migration is refused).
pub(crate) fn copied(disks: &[GuestDisk]) -> anyhow::Result<Vec<FileDisk>> {
    disks
        .iter()
        .filter(|d| !matches!(d.spec.backend, DiskBackend::Nbd { .. }))
        .map(FileDisk::open)
        .collect()
}

/// What the offer says of `disks`.
pub(crate) fn offered(disks: &[FileDisk]) -> anyhow::Result<Vec<CopiedDisk>> {
    disks
        .iter()
        .map(|d| {
            if d.size % tern_snapshot::DISK_SECTOR != 0 {
                bail!(
                    "disk {}: {} is not a whole number of 512-byte sectors",
                    d.vdev,
                    d.path.display()
                );
            }
            Ok(CopiedDisk {
                vdev: d.vdev.clone(),
                size: d.size,
                allocated: d.allocated_bytes()?,
            })
        })
        .collect()
}

impl SourceDisk for FileDisk {
    fn vdev(&self) -> String {
        self.vdev.clone()
    }

    fn path(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn allocated(&self) -> Result<Vec<Range<u64>>, String> {
        tern_storage::allocated(&self.file, 0..self.size, 4096).map_err(|e| e.to_string())
    }

    fn start_write_log(&self) {
        self.written.start();
    }

    fn stop_write_log(&self) {
        self.written.stop();
    }

    fn block_size(&self) -> u64 {
        self.written.block_size()
    }

    fn take_written(&self) -> Vec<u64> {
        self.written.take()
    }

    fn rearm(&self, range: Range<u64>) {
        self.written
            .clear_range(range.start, range.end - range.start);
    }

    fn limit_writes(&self, bytes_per_sec: Option<u64>) {
        self.written.set_limit(bytes_per_sec);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
    }
}

/// The images of an arriving guest's copied disks, in the offer's order.
pub(crate) struct ArrivingDisks {
    images: Vec<IncomingImage>,
}

impl ArrivingDisks {
    /// Starts receiving the disks `offer` copies, each at the path the daemon gave its vdev
    /// in `record`'s config (the daemon checked name, place and room); returns them and the
    /// record with each such disk at its temporary path, for the devices to open.
    pub(crate) fn prepare(
        record: &DomainRecord,
        offer: &Offer,
    ) -> anyhow::Result<(ArrivingDisks, DomainRecord)> {
        let mut record = record.clone();
        let mut images = Vec::new();
        for copied in &offer.copy_disks {
            let spec = record
                .config
                .disks
                .iter_mut()
                .find(|d| d.vdev == copied.vdev)
                .with_context(|| {
                    format!(
                        "the offer copies disk {}, which the guest lacks",
                        copied.vdev
                    )
                })?;
            let DiskBackend::File(path) = &spec.backend else {
                bail!("disk {} is not a file here", copied.vdev);
            };
            let (dir, name) = split(path)?;
            let image = IncomingImage::create(dir, name, copied.size, copied.allocated)
                .with_context(|| format!("disk {}", copied.vdev))?;
            spec.backend = DiskBackend::File(image.partial_path().to_path_buf());
            images.push(image);
        }
        Ok((ArrivingDisks { images }, record))
    }

    /// The guest is this host's: every image gets its final name.
    pub(crate) fn commit(self) -> anyhow::Result<()> {
        for image in self.images {
            let path = image.path().to_path_buf();
            image
                .commit()
                .with_context(|| format!("cannot name {}", path.display()))?;
        }
        Ok(())
    }
}

fn split(path: &Path) -> anyhow::Result<(&Path, &str)> {
    let dir = path.parent().context("a disk path without a directory")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a disk path without a file name")?;
    Ok((dir, name))
}

impl DiskTarget for ArrivingDisks {
    fn sizes(&self) -> Vec<u64> {
        self.images.iter().map(|i| i.size()).collect()
    }

    fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        self.image(disk)?
            .write(offset, data)
            .map_err(|e| e.to_string())
    }

    fn zero(&mut self, disk: u32, range: Range<u64>) -> Result<(), String> {
        self.image(disk)?
            .zero(range.start, range.end - range.start)
            .map_err(|e| e.to_string())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.images
            .iter()
            .try_for_each(|i| i.sync())
            .map_err(|e| e.to_string())
    }
}

impl ArrivingDisks {
    fn image(&self, disk: u32) -> Result<&IncomingImage, String> {
        self.images
            .get(disk as usize)
            .ok_or_else(|| format!("no disk {disk}"))
    }
}
