//! virtio-net: a network card whose frames go to and come from a host backend (a TAP device).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Work, Worker};
use super::{
    lock_queue, next_chain, read_config_bytes, Activation, Interrupt, SharedQueue, VirtioDevice,
    TYPE_NET,
};
use crate::state::{decode_state, encode_state, SavedState, StateError, VersionedState};
use crate::GuestMem;

/// Feature: the device has a MAC address in its configuration space.
pub const F_MAC: u64 = 1 << 5;
/// Size of the virtio-net header (version 1) in front of every frame.
pub const HEADER_LEN: usize = 12;
/// Largest frame handled (header + 64 KiB), enough for any frame without offloads.
const MAX_FRAME: usize = HEADER_LEN + 65_536;
const QUEUE_SIZE: u16 = 256;

/// Where the device's frames go: one frame per call, each with its virtio-net header.
pub trait NetBackend: Send + AsRawFd + 'static {
    /// Receives a frame; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends a frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
}

/// Tells the network that a MAC address is now reachable here (after a restore or a
/// migration), e.g. with RARP frames sent on the guest's behalf.
pub type Announcer = Box<dyn Fn([u8; 6]) + Send>;

/// Saved state of the network card: its MAC (queues are the transport's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

impl VersionedState for NetState {
    const KIND: &'static str = "virtio-net";
    const VERSION: u16 = 1;
}

/// A virtio network card.
pub struct VirtioNet {
    id: String,
    mac: [u8; 6],
    backend: Option<Box<dyn NetBackend>>,
    worker: Option<Worker<NetWork>>,
    sizes: [u16; 2],
    announcer: Option<Announcer>,
}

impl VirtioNet {
    /// A card `id` with address `mac`, its frames going to `backend`; `announcer` is called
    /// when the machine runs again after a restore or a migration.
    pub fn new(
        id: &str,
        mac: [u8; 6],
        backend: Box<dyn NetBackend>,
        announcer: Option<Announcer>,
    ) -> Self {
        VirtioNet {
            id: id.to_string(),
            mac,
            backend: Some(backend),
            worker: None,
            sizes: [QUEUE_SIZE; 2],
            announcer,
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let backend = self.backend.take().ok_or("the network backend is in use")?;
        let [rx_evt, tx_evt]: [EventFd; 2] = a
            .queue_events
            .try_into()
            .map_err(|_| "virtio-net needs exactly two queues".to_string())?;
        let [rx, tx]: [SharedQueue; 2] = a
            .queues
            .try_into()
            .map_err(|_| "virtio-net needs exactly two queues".to_string())?;
        let work = NetWork {
            mem: a.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            backend,
            interrupt: a.interrupt,
            frame: vec![0; MAX_FRAME],
            pending: 0,
            outgoing: vec![0; MAX_FRAME],
        };
        let worker = Worker::spawn(&format!("{}-io", self.id), work, a.start_paused)
            .map_err(|e| e.to_string())?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.backend = w.stop().map(|work| work.backend);
        }
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn state(&self) -> Result<Vec<u8>, StateError> {
        encode_state(&self.id, &NetState { mac: self.mac })
    }

    fn set_state(&mut self, saved: SavedState<'_>) -> Result<(), StateError> {
        let state: NetState = decode_state(&self.id, saved)?;
        if state.mac != self.mac {
            return Err(StateError::Apply {
                id: self.id.clone(),
                reason: "the saved MAC address differs from the configured one".into(),
            });
        }
        Ok(())
    }

    fn restored(&mut self) {
        if let Some(announce) = &self.announcer {
            announce(self.mac);
        }
    }
}

/// The card's worker: moves frames between the queues and the backend.
pub struct NetWork {
    mem: GuestMem,
    rx: SharedQueue,
    tx: SharedQueue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    backend: Box<dyn NetBackend>,
    interrupt: Arc<Interrupt>,
    /// A received frame waiting for a guest buffer (`pending` bytes of it).
    frame: Vec<u8>,
    pending: usize,
    /// Where a frame to send is gathered from its descriptors.
    outgoing: Vec<u8>,
}

const SOURCE_RX_QUEUE: usize = 0;
const SOURCE_TX_QUEUE: usize = 1;
const SOURCE_BACKEND: usize = 2;

impl NetWork {
    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let mut sent = false;
        let mut q = lock_queue(&self.tx);
        // While draining, the driver need not kick us for every frame (each kick is a VM exit);
        // after re-enabling notifications, look once more for frames queued in between. Only
        // while that finds frames: a ring the driver broke (an available index too far ahead,
        // a head outside the queue) always looks non-empty yet yields nothing, and must not
        // keep this thread spinning.
        loop {
            let _ = q.disable_notification(&self.mem);
            let mut progressed = false;
            while let Some(chain) = next_chain(&mut q, &self.mem) {
                progressed = true;
                let head = chain.head_index();
                let len = match chain.reader(&self.mem) {
                    Ok(mut reader) => read_up_to(&mut reader, &mut self.outgoing),
                    Err(_) => 0,
                };
                if len > HEADER_LEN {
                    if let Err(e) = self.backend.send(&self.outgoing[..len]) {
                        log::debug!("net: frame dropped on send: {e}");
                    }
                }
                if q.add_used(&self.mem, head, 0).is_err() {
                    log::warn!("net: cannot return a transmit buffer");
                }
                sent = true;
            }
            let more = q.enable_notification(&self.mem).unwrap_or(false);
            if !more || !progressed {
                break;
            }
        }
        if sent {
            self.interrupt.signal_used_queue();
        }
    }

    /// Delivers received frames while the guest has buffers for them.
    fn receive(&mut self) {
        let mut delivered = false;
        loop {
            if self.pending == 0 {
                match self.backend.recv(&mut self.frame) {
                    Ok(0) => break,
                    Ok(n) => {
                        // The TAP fills 10 header bytes; num_buffers (bytes 10..12) is ours.
                        if n >= HEADER_LEN {
                            self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                        }
                        self.pending = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::debug!("net: receive failed: {e}");
                        break;
                    }
                }
            }
            let mut q = lock_queue(&self.rx);
            let Some(chain) = next_chain(&mut q, &self.mem) else {
                break; // no buffer: keep the frame until the guest adds one
            };
            let head = chain.head_index();
            let written = match chain.writer(&self.mem) {
                Ok(mut w) => {
                    let n = self.pending.min(w.available_bytes());
                    w.write_all(&self.frame[..n]).map(|_| n).unwrap_or(0)
                }
                Err(_) => 0,
            };
            if q.add_used(&self.mem, head, written as u32).is_err() {
                log::warn!("net: cannot return a receive buffer");
            }
            self.pending = 0;
            delivered = true;
        }
        if delivered {
            self.interrupt.signal_used_queue();
        }
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

impl Work for NetWork {
    fn sources(&self) -> Vec<(RawFd, bool)> {
        vec![
            (self.rx_evt.as_raw_fd(), false),
            (self.tx_evt.as_raw_fd(), false),
            (self.backend.as_raw_fd(), true),
        ]
    }

    fn handle(&mut self, index: usize) {
        match index {
            SOURCE_RX_QUEUE => {
                let _ = self.rx_evt.read();
                self.receive();
            }
            SOURCE_TX_QUEUE => {
                let _ = self.tx_evt.read();
                self.transmit();
            }
            SOURCE_BACKEND => self.receive(),
            _ => {}
        }
    }

    fn wake(&mut self) {
        self.transmit();
        self.receive();
    }
}
