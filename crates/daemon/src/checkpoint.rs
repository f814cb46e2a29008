//! What the daemon reads from a checkpoint before it starts a guest process on it.

use std::path::Path;

use anyhow::Context;
use tern_config::DomainConfig;
use tern_snapshot::{RecordType, SnapshotIndex};

/// The guest config stored in a checkpoint, after checking the file's structure; whether it
/// may be restored is [`crate::admission`]'s to decide.
pub fn read_config(path: &Path) -> anyhow::Result<DomainConfig> {
    let shown = path.display();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read checkpoint {shown}"))?;
    let index = SnapshotIndex::open(&file).with_context(|| format!("cannot restore {shown}"))?;
    let record = index
        .record(RecordType::CONFIG)
        .with_context(|| format!("cannot restore {shown}: it has no guest config"))?;
    let config: DomainConfig = serde_json::from_slice(&record.body)
        .with_context(|| format!("cannot restore {shown}: its guest config is malformed"))?;
    Ok(config)
}
