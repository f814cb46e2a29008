//! Console stream frames and console log records.
//!
//! A frame carries bytes of guest output that all belong to one line, with the host wall-clock
//! time (Unix µs) at which that line's first byte arrived, and whether the frame starts the line.
//! A log record is one text line: `<seconds>.<micros> <line>`.

use std::io::{Read, Write};

/// Most payload bytes in one frame.
pub const MAX_FRAME: usize = 64 * 1024;

/// One piece of console output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Unix time in microseconds when the line this data belongs to began.
    pub line_time_us: u64,
    /// The data begins a new line.
    pub starts_line: bool,
    pub data: Vec<u8>,
}

impl Frame {
    /// Writes the frame: flag (1 byte), time (8, LE), length (4, LE), data.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(13 + self.data.len());
        buf.push(u8::from(self.starts_line));
        buf.extend_from_slice(&self.line_time_us.to_le_bytes());
        buf.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        buf.extend_from_slice(&self.data);
        w.write_all(&buf)
    }

    /// Reads a frame; `Ok(None)` at a clean end of stream.
    pub fn read_from(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 13];
        match r.read_exact(&mut head[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        r.read_exact(&mut head[1..])?;
        let mut time = [0u8; 8];
        time.copy_from_slice(&head[1..9]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[9..13]);
        let len = u32::from_le_bytes(len) as usize;
        if head[0] > 1 || len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "malformed console frame",
            ));
        }
        let mut data = vec![0u8; len];
        r.read_exact(&mut data)?;
        Ok(Some(Frame {
            line_time_us: u64::from_le_bytes(time),
            starts_line: head[0] == 1,
            data,
        }))
    }
}

/// Formats a Unix time in µs as `seconds.micros`.
pub fn format_time(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// Splits a log record into its time text and its line.
pub fn split_record(record: &str) -> (&str, &str) {
    record.split_once(' ').unwrap_or(("", record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame {
            line_time_us: 1_763_721_234_123_456,
            starts_line: true,
            data: b"hello\n".to_vec(),
        };
        let mut buf = Vec::new();
        f.write_to(&mut buf).unwrap();
        let mut r = &buf[..];
        assert_eq!(Frame::read_from(&mut r).unwrap(), Some(f));
        assert_eq!(Frame::read_from(&mut r).unwrap(), None);
    }

    #[test]
    fn hostile_frames_are_refused() {
        let mut buf = vec![1u8];
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::read_from(&mut &buf[..]).is_err());
        assert!(Frame::read_from(&mut &[1u8, 2, 3][..]).is_err());
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time(1_763_721_234_000_001), "1763721234.000001");
        assert_eq!(split_record("1.000001 a b"), ("1.000001", "a b"));
    }
}
