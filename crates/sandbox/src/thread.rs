//! Starting a thread of a given kind under its filter.
//!
//! A thread inherits the filter of the thread that starts it, and filters only narrow. A
//! device's worker is started when the guest's driver activates the device, on the vCPU
//! thread that wrote the register: started there, it could make only what both a vCPU and a
//! device may. So once filters are armed, threads are started by one spawner thread under
//! the control filter, and each new thread enters its own kind's filter before it runs.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{Builder, JoinHandle};

use crate::seccomp;
use crate::ThreadKind;

type Task = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<Mutex<Sender<Task>>> = OnceLock::new();

/// Starts the spawner thread (when the process arms its filters).
pub(crate) fn start_spawner() -> io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Task>();
    Builder::new().name("spawner".into()).spawn(move || {
        seccomp::enter_or_abort(ThreadKind::Control);
        while let Ok(task) = rx.recv() {
            task();
        }
    })?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

/// Starts thread `name` of `kind` running `f`, under that kind's filter if the process armed
/// filters.
pub fn spawn<F, T>(kind: ThreadKind, name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = Builder::new().name(name);
    let body = move || {
        seccomp::enter_or_abort(kind);
        f()
    };
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(body);
    };
    let (tx, rx) = mpsc::channel();
    let task: Task = Box::new(move || {
        let _ = tx.send(builder.spawn(body));
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(task)
        .map_err(|_| io::Error::other("the thread spawner is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the thread spawner did not answer"))?
}
