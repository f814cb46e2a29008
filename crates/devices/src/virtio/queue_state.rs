//! Serialisable form of a virtqueue's state (virtio-queue's `QueueState` is not serde).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// A queue's configuration and position, as saved in a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for SavedQueue {
    fn from(q: &Queue) -> Self {
        SavedQueue {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
        }
    }
}

impl SavedQueue {
    /// Rebuilds the queue; refuses states a driver could not have produced (bad size,
    /// misaligned rings).
    pub fn to_queue(&self) -> Result<Queue, String> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| format!("invalid queue state: {e:?}"))
    }
}
