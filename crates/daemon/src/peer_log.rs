//! Logging failed relocation connections without letting a flood of them flood the log.
//!
//! The first failure of a kind from a peer in a minute is logged in full; repeats are only
//! counted, and once the minute is over one line per peer says how many there were. The
//! table is bounded: past [`MAX_PEERS`] peers in one minute, the rest are counted together.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often repeats are summarised.
const WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked one by one in a window.
const MAX_PEERS: usize = 64;

/// Counts of failed connections, per peer and kind, for the current window.
pub struct PeerLog {
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    /// `None` collects the peers past [`MAX_PEERS`].
    peers: BTreeMap<Option<IpAddr>, BTreeMap<&'static str, u64>>,
}

impl Default for PeerLog {
    fn default() -> Self {
        PeerLog {
            window: Mutex::new(Window {
                started: Instant::now(),
                peers: BTreeMap::new(),
            }),
        }
    }
}

impl PeerLog {
    /// Records a failed connection from `peer`, of `kind` (a short fixed phrase such as
    /// "handshake timed out"), with the full `message` logged if it is the first of its kind
    /// from that peer in this window.
    pub fn failed(&self, peer: IpAddr, kind: &'static str, message: &str) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.roll_over(Instant::now());
        let tracked = w.peers.contains_key(&Some(peer)) || w.peers.len() < MAX_PEERS;
        let key = tracked.then_some(peer);
        let count = w.peers.entry(key).or_default().entry(kind).or_insert(0);
        *count += 1;
        if *count == 1 && tracked {
            log::warn!("relocation from {peer}: {message}");
        }
    }

    /// Ends the window if it is over, logging its summary; called now and then so a quiet
    /// server still reports the end of a flood.
    pub fn tick(&self) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.roll_over(Instant::now());
    }
}

impl Window {
    fn roll_over(&mut self, now: Instant) {
        if now.duration_since(self.started) < WINDOW {
            return;
        }
        let minutes = now.duration_since(self.started).as_secs() / 60;
        for (peer, kinds) in std::mem::take(&mut self.peers) {
            // The first of each kind was logged in full already.
            let repeats: u64 = kinds.values().map(|n| n.saturating_sub(1)).sum();
            let unlogged = peer.is_none();
            if repeats == 0 && !unlogged {
                continue;
            }
            let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let who = peer.map_or_else(|| "other peers".to_string(), |p| p.to_string());
            log::warn!(
                "relocation: failed connections from {who} in the last {minutes} min: {}",
                parts.join(", ")
            );
        }
        self.started = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_not_logged() {
        let log = PeerLog::default();
        for i in 0..1000u32 {
            let ip = IpAddr::from([10, 0, (i % 200 / 100) as u8, (i % 100) as u8]);
            log.failed(ip, "handshake timed out", "no handshake");
        }
        let w = log.window.lock().unwrap();
        assert!(w.peers.len() <= MAX_PEERS + 1);
        let total: u64 = w.peers.values().flat_map(|k| k.values()).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_window_rolls_over() {
        let log = PeerLog::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        log.failed(ip, "refused", "x");
        log.failed(ip, "refused", "x");
        let mut w = log.window.lock().unwrap();
        let later = w.started + WINDOW;
        w.roll_over(later);
        assert!(w.peers.is_empty());
        assert_eq!(w.started, later);
    }
}
