//! Events a guest raises through its devices (reset, power-off, panic).

use std::sync::mpsc;

/// Something the guest asked for, or suffered, that ends its current run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest asked for a reset (i8042 reset line).
    Reset,
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest reported a panic (pvpanic).
    Panic,
    /// A vCPU stopped for good (triple fault, KVM internal error, failed entry).
    Crashed(String),
}

/// Where devices send [`GuestEvent`]s; cheap to clone.
#[derive(Clone, Debug)]
pub struct GuestEventSender(mpsc::Sender<GuestEvent>);

impl GuestEventSender {
    /// Creates a sender and the receiver the machine listens on.
    pub fn channel() -> (Self, mpsc::Receiver<GuestEvent>) {
        let (tx, rx) = mpsc::channel();
        (GuestEventSender(tx), rx)
    }

    /// Reports an event; if nobody listens any more the machine is already going away.
    pub fn send(&self, event: GuestEvent) {
        let _ = self.0.send(event);
    }
}
