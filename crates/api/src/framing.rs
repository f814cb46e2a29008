//! One JSON value per line, with a hard cap on line length: a peer cannot make us allocate
//! without bound or wait for a line that never ends.

use std::io::{BufRead, Write};

use serde::{de::DeserializeOwned, Serialize};

/// Longest accepted message line.
pub const MAX_LINE: usize = 1 << 20;
/// Longest reply the CLI accepts from its own daemon: a pool's listing of 50,000 guests is
/// some 20 MB.
pub const MAX_REPLY: usize = 256 << 20;

/// Errors of the line framing.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("connection closed")]
    Closed,
    #[error("message longer than {0} bytes")]
    TooLong(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one message of at most [`MAX_LINE`] bytes; `Closed` at a clean end of stream.
pub fn read_message<T: DeserializeOwned>(r: &mut impl BufRead) -> Result<T, FramingError> {
    read_message_within(r, MAX_LINE)
}

/// Reads one message of at most `max` bytes; `Closed` at a clean end of stream.
pub fn read_message_within<T: DeserializeOwned>(
    r: &mut impl BufRead,
    max: usize,
) -> Result<T, FramingError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(if line.is_empty() {
                FramingError::Closed
            } else {
                FramingError::Malformed("truncated message".into())
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(FramingError::TooLong(max));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            break;
        }
    }
    serde_json::from_slice(&line).map_err(|e| FramingError::Malformed(e.to_string()))
}

/// Writes one message and flushes it.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FramingError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| FramingError::Malformed(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn round_trip_and_close() {
        let mut buf = Vec::new();
        write_message(&mut buf, &vec![1, 2, 3]).unwrap();
        write_message(&mut buf, &"x").unwrap();
        let mut r = BufReader::new(&buf[..]);
        assert_eq!(read_message::<Vec<i32>>(&mut r).unwrap(), vec![1, 2, 3]);
        assert_eq!(read_message::<String>(&mut r).unwrap(), "x");
        assert!(matches!(
            read_message::<String>(&mut r),
            Err(FramingError::Closed)
        ));
    }

    #[test]
    fn refuses_endless_lines_and_garbage() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = BufReader::new(&long[..]);
        assert!(matches!(
            read_message::<String>(&mut r),
            Err(FramingError::TooLong(_))
        ));
        let mut r = BufReader::new(&b"{not json\n"[..]);
        assert!(matches!(
            read_message::<String>(&mut r),
            Err(FramingError::Malformed(_))
        ));
        let mut r = BufReader::new(&b"\"half"[..]);
        assert!(matches!(
            read_message::<String>(&mut r),
            Err(FramingError::Malformed(_))
        ));
    }
}
