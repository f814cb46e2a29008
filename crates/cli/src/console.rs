//! `tern console`: print the log, or attach to the live console.

use std::io::{IsTerminal, Read, Write};
use std::net::Shutdown;
use std::path::Path;

use tern_api::console::{format_time, Frame};
use tern_api::Request;

use crate::client;

/// Ctrl-] ends an interactive console session.
const DETACH: u8 = 0x1d;

/// Prints everything the guest wrote on this host so far.
pub fn dump(socket: &Path, domain: &str, timestamps: bool) -> anyhow::Result<()> {
    let mut conn = client::send(
        socket,
        &Request::Console {
            domain: domain.into(),
            dump: true,
            timestamps,
        },
    )?;
    let data = client::finish(&mut conn, |_| {})?;
    let len = data.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0);
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut (&mut conn.reader).take(len), &mut out)?;
    out.flush()?;
    Ok(())
}

/// Attaches to the console until the guest leaves this host or the user detaches.
pub fn attach(socket: &Path, domain: &str, timestamps: bool) -> anyhow::Result<()> {
    let mut conn = client::send(
        socket,
        &Request::Console {
            domain: domain.into(),
            dump: false,
            timestamps,
        },
    )?;
    client::finish(&mut conn, |_| {})?;
    let interactive = std::io::stdin().is_terminal();
    let _raw = if interactive {
        RawTerminal::enter()
    } else {
        None
    };
    if interactive {
        eprint!("[attached to {domain}; Ctrl-] detaches]\r\n");
    }
    let to_guest = conn.writer.try_clone()?;
    std::thread::spawn(move || forward_input(to_guest, interactive));

    let mut out = std::io::stdout().lock();
    let mut at_line_start = true;
    while let Some(frame) = Frame::read_from(&mut conn.reader)? {
        render(
            &mut out,
            &frame,
            timestamps,
            &mut at_line_start,
            interactive,
        )?;
        out.flush()?;
    }
    Ok(())
}

fn render(
    out: &mut impl Write,
    frame: &Frame,
    timestamps: bool,
    at_line_start: &mut bool,
    raw_terminal: bool,
) -> std::io::Result<()> {
    if timestamps && (frame.starts_line || *at_line_start) {
        write!(out, "{} ", format_time(frame.line_time_us))?;
    }
    if raw_terminal {
        // The terminal no longer turns "\n" into "\r\n".
        for piece in frame.data.split_inclusive(|&b| b == b'\n') {
            match piece.strip_suffix(b"\n") {
                Some(line) => {
                    out.write_all(line)?;
                    out.write_all(b"\r\n")?;
                }
                None => out.write_all(piece)?,
            }
        }
    } else {
        out.write_all(&frame.data)?;
    }
    *at_line_start = frame.data.last() == Some(&b'\n');
    Ok(())
}

/// Sends stdin to the guest. On a terminal Ctrl-] ends the whole session; otherwise the end
/// of stdin only ends the input (output continues until the guest leaves).
fn forward_input(mut to_guest: std::os::unix::net::UnixStream, interactive: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if interactive {
            if let Some(pos) = data.iter().position(|&b| b == DETACH) {
                let _ = to_guest.write_all(&data[..pos]);
                let _ = to_guest.shutdown(Shutdown::Both);
                return;
            }
        }
        if to_guest.write_all(data).is_err() {
            return;
        }
    }
    let _ = to_guest.shutdown(Shutdown::Write);
}

/// Puts the terminal in raw mode while it lives.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: termios calls on fd 0 with properly sized structures.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}
