//! Interrupt lines: an eventfd that KVM turns into an interrupt on a GSI (irqfd).

use vmm_sys_util::eventfd::EventFd;

/// An edge on this eventfd raises the interrupt line it was registered for.
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    event: EventFd,
}

impl IrqLine {
    /// Creates a line for `gsi`; the machine registers [`IrqLine::eventfd`] with KVM.
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(IrqLine {
            gsi,
            event: EventFd::new(libc_efd_nonblock())?,
        })
    }

    /// The GSI this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }

    /// Raises the interrupt.
    pub fn raise(&self) -> std::io::Result<()> {
        self.event.write(1)
    }

    /// Another handle to the same line.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(IrqLine {
            gsi: self.gsi,
            event: self.event.try_clone()?,
        })
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

const fn libc_efd_nonblock() -> i32 {
    // EFD_NONBLOCK == O_NONBLOCK on Linux.
    0o4000
}
