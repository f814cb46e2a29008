//! The console log of one guest on this host: the raw bytes it wrote (`console.raw`) and the
//! host time at which each line began (`console.idx`: pairs of little-endian u64 byte offset and
//! Unix microseconds). Raw bytes keep partial lines and binary output exact; the index gives
//! `--timestamps` the time each line started arriving.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Past this many bytes the log is rotated to `.1` files (one generation kept).
const ROTATE_BYTES: u64 = 64 << 20;

/// Appends guest output.
pub struct ConsoleLogWriter {
    dir: PathBuf,
    raw: File,
    idx: File,
    size: u64,
    at_line_start: bool,
}

fn raw_path(dir: &Path, generation: &str) -> PathBuf {
    dir.join(format!("console.raw{generation}"))
}

fn idx_path(dir: &Path, generation: &str) -> PathBuf {
    dir.join(format!("console.idx{generation}"))
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl ConsoleLogWriter {
    /// Opens (or continues) the log in `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let raw = open_append(&raw_path(dir, ""))?;
        let idx = open_append(&idx_path(dir, ""))?;
        let size = raw.metadata()?.len();
        let at_line_start = size == 0 || last_byte(&raw_path(dir, ""))? == Some(b'\n');
        Ok(ConsoleLogWriter {
            dir: dir.to_path_buf(),
            raw,
            idx,
            size,
            at_line_start,
        })
    }

    /// Records `bytes` received at `now_us`. Returns, for each piece of `bytes` that belongs to
    /// one line, (starts a new line, the piece).
    pub fn append<'a>(
        &mut self,
        bytes: &'a [u8],
        now_us: u64,
    ) -> io::Result<Vec<(bool, &'a [u8])>> {
        let mut pieces = Vec::new();
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            let starts = self.at_line_start;
            if starts {
                if self.size >= ROTATE_BYTES {
                    self.rotate()?;
                }
                let mut rec = [0u8; 16];
                rec[..8].copy_from_slice(&self.size.to_le_bytes());
                rec[8..].copy_from_slice(&now_us.to_le_bytes());
                self.idx.write_all(&rec)?;
            }
            self.raw.write_all(piece)?;
            self.size += piece.len() as u64;
            self.at_line_start = piece.last() == Some(&b'\n');
            pieces.push((starts, piece));
        }
        Ok(pieces)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(raw_path(&self.dir, ""), raw_path(&self.dir, ".1"))?;
        std::fs::rename(idx_path(&self.dir, ""), idx_path(&self.dir, ".1"))?;
        self.raw = open_append(&raw_path(&self.dir, ""))?;
        self.idx = open_append(&idx_path(&self.dir, ""))?;
        self.size = 0;
        Ok(())
    }
}

fn last_byte(path: &Path) -> io::Result<Option<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(None);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut b = [0u8];
    f.read_exact(&mut b)?;
    Ok(Some(b[0]))
}

/// Reads the whole log (older generation first): raw bytes, with each line prefixed by its
/// arrival time when `timestamps` is set.
pub fn read_log(dir: &Path, timestamps: bool) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for generation in [".1", ""] {
        let raw = match std::fs::read(raw_path(dir, generation)) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !timestamps {
            out.extend_from_slice(&raw);
            continue;
        }
        let idx = std::fs::read(idx_path(dir, generation)).unwrap_or_default();
        let mut starts = idx.chunks_exact(16).map(|rec| {
            let mut off = [0u8; 8];
            let mut t = [0u8; 8];
            off.copy_from_slice(&rec[..8]);
            t.copy_from_slice(&rec[8..]);
            (u64::from_le_bytes(off), u64::from_le_bytes(t))
        });
        let mut next = starts.next();
        let mut last_time = 0;
        for (pos, line) in split_lines_with_offsets(&raw) {
            // Find the recorded start time of the line at `pos` (skip stale entries).
            while let Some((off, t)) = next {
                if off > pos {
                    break;
                }
                last_time = t;
                next = starts.next();
            }
            out.extend_from_slice(tern_api::console::format_time(last_time).as_bytes());
            out.push(b' ');
            out.extend_from_slice(line);
        }
    }
    Ok(out)
}

fn split_lines_with_offsets(raw: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut pos = 0u64;
    raw.split_inclusive(|&b| b == b'\n').map(move |line| {
        let here = pos;
        pos += line.len() as u64;
        (here, line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_and_line_times() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ConsoleLogWriter::open(dir.path()).unwrap();
        let p = w.append(b"hel", 1_000_000).unwrap();
        assert_eq!(p, vec![(true, &b"hel"[..])]);
        let p = w.append(b"lo\nwor", 2_000_000).unwrap();
        assert_eq!(p, vec![(false, &b"lo\n"[..]), (true, &b"wor"[..])]);
        w.append(b"ld\n", 3_000_000).unwrap();
        assert_eq!(read_log(dir.path(), false).unwrap(), b"hello\nworld\n");
        assert_eq!(
            String::from_utf8(read_log(dir.path(), true).unwrap()).unwrap(),
            "1.000000 hello\n2.000000 world\n"
        );
    }

    #[test]
    fn reopening_continues_the_line() {
        let dir = tempfile::tempdir().unwrap();
        ConsoleLogWriter::open(dir.path())
            .unwrap()
            .append(b"abc", 5)
            .unwrap();
        let mut w = ConsoleLogWriter::open(dir.path()).unwrap();
        let p = w.append(b"def\n", 6).unwrap();
        assert_eq!(p, vec![(false, &b"def\n"[..])]);
        assert_eq!(read_log(dir.path(), false).unwrap(), b"abcdef\n");
    }

    #[test]
    fn missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_log(dir.path(), true).unwrap().is_empty());
    }
}
