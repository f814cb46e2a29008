//! A device's worker thread: waits on file descriptors (queue notifications, a TAP, ...) and
//! lets the device do its work, and can be paused, resumed and stopped from outside.

use std::os::fd::RawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use tern_sandbox::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a worker thread runs.
pub trait Work: Send + 'static {
    /// Descriptors to wait on, each with whether it is edge-triggered. Event `i` is reported as
    /// `handle(i)`.
    fn sources(&self) -> Vec<(RawFd, bool)>;
    /// Source `index` is ready.
    fn handle(&mut self, index: usize);
    /// Called when the worker is about to pause: finish what is in flight.
    fn quiesce(&mut self) {}
    /// Called when the worker resumes: pick up anything that arrived meanwhile.
    fn wake(&mut self) {}
}

enum Command {
    Pause(Sender<()>),
    Resume,
    Stop,
}

/// Handle on a running worker thread.
pub struct Worker<W: Work> {
    control: EventFd,
    commands: Sender<Command>,
    thread: Option<JoinHandle<W>>,
}

const CONTROL_TOKEN: u64 = u64::MAX;

impl<W: Work> Worker<W> {
    /// Starts a thread named `name` running `work` (paused if `paused`).
    pub fn spawn(name: &str, work: W, paused: bool) -> std::io::Result<Self> {
        let control = EventFd::new(libc::EFD_NONBLOCK)?;
        let (tx, rx) = mpsc::channel();
        let thread_control = control.try_clone()?;
        let thread =
            tern_sandbox::thread::spawn(ThreadKind::Device, name.to_string(), move || {
                run(work, &thread_control, &rx, paused)
            })?;
        Ok(Worker {
            control,
            commands: tx,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) {
        if self.commands.send(cmd).is_ok() {
            let _ = self.control.write(1);
        }
    }

    /// Stops the thread's activity; returns when it has quiesced.
    pub fn pause(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Pause(tx));
        let _ = rx.recv();
    }

    /// Lets a paused thread work again.
    pub fn resume(&self) {
        self.send(Command::Resume);
    }

    /// Ends the thread and gives back its work (with whatever it owns, e.g. a TAP).
    pub fn stop(mut self) -> Option<W> {
        self.send(Command::Stop);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<W: Work> Drop for Worker<W> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.send(Command::Stop);
            let _ = t.join();
        }
    }
}

fn run<W: Work>(mut work: W, control: &EventFd, commands: &Receiver<Command>, paused: bool) -> W {
    let Ok(epoll) = Epoll::new() else {
        log::error!("device worker: cannot create epoll");
        return work;
    };
    let _ = epoll.ctl(
        ControlOperation::Add,
        control_fd(control),
        EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
    );
    for (i, (fd, edge)) in work.sources().into_iter().enumerate() {
        let mut set = EventSet::IN;
        if edge {
            set |= EventSet::EDGE_TRIGGERED;
        }
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, i as u64)) {
            log::error!("device worker: cannot watch fd {fd}: {e}");
        }
    }
    if paused && !wait_for_resume(commands) {
        return work;
    }
    work.wake();
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                log::error!("device worker: epoll failed: {e}");
                return work;
            }
        };
        for ev in &events[..n] {
            if ev.data() == CONTROL_TOKEN {
                let _ = control.read();
                match handle_commands(&mut work, commands) {
                    Flow::Continue => {}
                    Flow::Stop => return work,
                }
            } else {
                work.handle(ev.data() as usize);
            }
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

fn handle_commands<W: Work>(work: &mut W, commands: &Receiver<Command>) -> Flow {
    while let Ok(cmd) = commands.try_recv() {
        match cmd {
            Command::Pause(ack) => {
                work.quiesce();
                let _ = ack.send(());
                if !wait_for_resume(commands) {
                    return Flow::Stop;
                }
                work.wake();
            }
            Command::Resume => {}
            Command::Stop => return Flow::Stop,
        }
    }
    Flow::Continue
}

/// Blocks while paused; false if told to stop instead.
fn wait_for_resume(commands: &Receiver<Command>) -> bool {
    loop {
        match commands.recv() {
            Ok(Command::Resume) => return true,
            Ok(Command::Pause(ack)) => {
                let _ = ack.send(());
            }
            Ok(Command::Stop) | Err(_) => return false,
        }
    }
}

fn control_fd(e: &EventFd) -> RawFd {
    use std::os::fd::AsRawFd;
    e.as_raw_fd()
}
