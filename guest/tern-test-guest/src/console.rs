//! Serial console output: whole lines, one `rep outsb` each, never interleaved between CPUs.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::hw::{outsb, SERIAL_PORT};

static LOCK: AtomicBool = AtomicBool::new(false);

/// A line being assembled on the stack.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn flush(&mut self) {
        if self.len > 0 {
            outsb(SERIAL_PORT, &self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints formatted text atomically with respect to other CPUs.
pub fn print_fmt(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = line.write_fmt(args);
    line.flush();
    LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!("tern-guest: {}\n", format_args!($($arg)*)))
    };
}
