//! The handshake: greeting, client flags, then `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` on servers that do not know it), ending in the transmission phase.
//!
//! Every length read from the wire is checked against a small bound before anything is
//! allocated or skipped, and the number of replies to one option is capped, so a hostile server
//! can neither make the client allocate without bound nor keep it in the handshake forever
//! (each read is also bounded by the socket's I/O timeout).

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::error::NbdError;
use crate::proto::*;

/// The transmission flags the server sent for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// `NBD_FLAG_HAS_FLAGS`: the other bits are meaningful (always set by real servers).
    pub fn has_flags(self) -> bool {
        self.0 & FLAG_HAS_FLAGS != 0
    }
    /// Writes and trims will be refused.
    pub fn read_only(self) -> bool {
        self.has_flags() && self.0 & FLAG_READ_ONLY != 0
    }
    /// `NBD_CMD_FLUSH` is understood (the server has a write cache worth flushing).
    pub fn can_flush(self) -> bool {
        self.has_flags() && self.0 & FLAG_SEND_FLUSH != 0
    }
    /// `NBD_CMD_FLAG_FUA` is understood.
    pub fn can_fua(self) -> bool {
        self.has_flags() && self.0 & FLAG_SEND_FUA != 0
    }
    /// `NBD_CMD_TRIM` is understood.
    pub fn can_trim(self) -> bool {
        self.has_flags() && self.0 & FLAG_SEND_TRIM != 0
    }
    /// The export behaves like a rotational disk (a scheduling hint only).
    pub fn rotational(self) -> bool {
        self.has_flags() && self.0 & FLAG_ROTATIONAL != 0
    }
    /// `NBD_CMD_WRITE_ZEROES` is understood (not used by this client yet).
    pub fn can_write_zeroes(self) -> bool {
        self.has_flags() && self.0 & FLAG_SEND_WRITE_ZEROES != 0
    }
    /// Several connections to this export see each other's flushed writes: safe to spread
    /// requests over more than one connection.
    pub fn can_multi_conn(self) -> bool {
        self.has_flags() && self.0 & FLAG_CAN_MULTI_CONN != 0
    }
}

/// Block size constraints the server advertised (`NBD_INFO_BLOCK_SIZE`), already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Every request's offset and length must be a multiple of this (a power of two ≤ 64 KiB).
    pub minimum: u32,
    /// Requests aligned to this avoid read-modify-write on the server.
    pub preferred: u32,
    /// Largest read or write the server accepts (`u32::MAX`: no limit of its own).
    pub maximum: u32,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints, if the server sent them (only with `NBD_OPT_GO`).
    pub block_size: Option<BlockSize>,
    /// The server's canonical export name, if it sent one.
    pub name: Option<String>,
    /// The server's description of the export, if it sent one.
    pub description: Option<String>,
    /// True if `NBD_OPT_GO` was used, false after the `NBD_OPT_EXPORT_NAME` fallback.
    pub negotiated_with_go: bool,
}

/// Largest export size accepted: offsets must stay within `i64` everywhere downstream
/// (`pread`-style APIs, virtio-blk sector arithmetic).
const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

/// Checks an export name before anything is sent: the protocol caps strings at 4096 bytes and
/// forbids NUL.
pub(crate) fn validate_export_name(name: &str) -> Result<(), NbdError> {
    let reason = if name.len() > MAX_STRING {
        "longer than 4096 bytes"
    } else if name.contains('\0') {
        "contains a NUL character"
    } else {
        return Ok(());
    };
    Err(NbdError::BadExportName {
        name: name.chars().take(64).collect(),
        reason,
    })
}

/// Runs the client side of the handshake on a connected stream.
pub(crate) struct Handshake<'a, S> {
    pub stream: &'a mut S,
    pub peer: &'a str,
    pub export: &'a str,
    /// The stream's I/O timeout, for messages.
    pub timeout: Duration,
}

enum GoOutcome {
    Done(ExportInfo),
    NotSupported,
}

impl<S: Read + Write> Handshake<'_, S> {
    /// Negotiates and returns the export's description; the stream is then in transmission.
    pub fn run(mut self) -> Result<ExportInfo, NbdError> {
        validate_export_name(self.export)?;
        let mut greeting = [0u8; 18];
        // The first 8 bytes alone tell a non-NBD service apart (which may then wait for us).
        self.read_exact(&mut greeting[..8], "the server greeting")?;
        if be_u64(&greeting[0..8]) != NBD_MAGIC {
            return Err(self.protocol(format!(
                "not an NBD server: greeting starts with {} instead of \"NBDMAGIC\"",
                show_bytes(&greeting[0..8])
            )));
        }
        self.read_exact(&mut greeting[8..16], "the server greeting")?;
        match be_u64(&greeting[8..16]) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => {
                return Err(NbdError::OldStyle {
                    peer: self.peer.to_string(),
                })
            }
            other => {
                return Err(self.protocol(format!(
                    "unknown handshake style {other:#018x} after NBDMAGIC (expected IHAVEOPT)"
                )))
            }
        }
        self.read_exact(&mut greeting[16..18], "the handshake flags")?;
        let server_flags = be_u16(&greeting[16..18]);
        let fixed = server_flags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = 0u32;
        if fixed {
            client_flags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.write_all(&client_flags.to_be_bytes(), "sending the client flags")?;

        if fixed {
            match self.go()? {
                GoOutcome::Done(info) => return Ok(info),
                GoOutcome::NotSupported => {
                    log::debug!(
                        "NBD server {} does not know NBD_OPT_GO; using NBD_OPT_EXPORT_NAME",
                        self.peer
                    );
                }
            }
        } else {
            log::debug!(
                "NBD server {} does not speak fixed newstyle; using NBD_OPT_EXPORT_NAME",
                self.peer
            );
        }
        self.export_name(no_zeroes)
    }

    /// `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request: the export's size and flags, its
    /// block size constraints, and a real error if the export cannot be had.
    fn go(&mut self) -> Result<GoOutcome, NbdError> {
        let data = encode_go_data(self.export, &[INFO_BLOCK_SIZE]);
        // The data is at most 4096 + 8 bytes (the name was validated).
        let mut msg = encode_option(OPT_GO, data.len() as u32).to_vec();
        msg.extend_from_slice(&data);
        self.write_all(&msg, "sending NBD_OPT_GO")?;

        let mut export: Option<(u64, u16)> = None;
        let mut block_size = None;
        let mut name = None;
        let mut description = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let mut hb = [0u8; OPTION_REPLY_LEN];
            self.read_exact(&mut hb, "the reply to NBD_OPT_GO")?;
            let h = decode_option_reply(&hb);
            if h.magic != OPTION_REPLY_MAGIC {
                return Err(self.protocol(format!(
                    "option reply starts with {} instead of the reply magic",
                    show_bytes(&hb[0..8])
                )));
            }
            if h.option != OPT_GO {
                return Err(self.protocol(format!(
                    "got a reply to option {} while waiting for the reply to NBD_OPT_GO",
                    h.option
                )));
            }
            if h.length > MAX_OPTION_REPLY {
                return Err(self.protocol(format!(
                    "option reply of {} bytes (type {:#x}); at most {MAX_OPTION_REPLY} are accepted",
                    h.length, h.reply_type
                )));
            }
            match h.reply_type {
                REP_INFO => {
                    if h.length < 2 {
                        return Err(self.protocol(format!(
                            "NBD_REP_INFO of {} bytes has no information type",
                            h.length
                        )));
                    }
                    let mut tb = [0u8; 2];
                    self.read_exact(&mut tb, "an NBD_REP_INFO")?;
                    let rest = h.length - 2;
                    match be_u16(&tb) {
                        INFO_EXPORT => {
                            let b = self.read_fixed::<10>(rest, "NBD_INFO_EXPORT")?;
                            export = Some((be_u64(&b[0..8]), be_u16(&b[8..10])));
                        }
                        INFO_BLOCK_SIZE => {
                            let b = self.read_fixed::<12>(rest, "NBD_INFO_BLOCK_SIZE")?;
                            block_size = Some(BlockSize {
                                minimum: be_u32(&b[0..4]),
                                preferred: be_u32(&b[4..8]),
                                maximum: be_u32(&b[8..12]),
                            });
                        }
                        INFO_NAME => name = Some(self.read_string(rest, "NBD_INFO_NAME")?),
                        INFO_DESCRIPTION => {
                            description = Some(self.read_string(rest, "NBD_INFO_DESCRIPTION")?)
                        }
                        // Unknown information must be ignored.
                        _ => self.skip(rest, "an NBD_REP_INFO")?,
                    }
                }
                REP_ACK => {
                    self.skip(h.length, "NBD_REP_ACK")?;
                    let Some((size, flags)) = export else {
                        return Err(self.protocol(
                            "the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT"
                                .to_string(),
                        ));
                    };
                    let info = ExportInfo {
                        size,
                        flags: TransmissionFlags(flags),
                        block_size,
                        name,
                        description,
                        negotiated_with_go: true,
                    };
                    self.validate(&info)?;
                    return Ok(GoOutcome::Done(info));
                }
                REP_ERR_UNSUP => {
                    self.skip(h.length, "NBD_REP_ERR_UNSUP")?;
                    return Ok(GoOutcome::NotSupported);
                }
                t if t & REP_ERR_BIT != 0 => {
                    let message = self.read_string(h.length, "an option error reply")?;
                    // Still in option haggling: leave politely (a soft disconnect).
                    let _ = self.stream.write_all(&encode_option(OPT_ABORT, 0));
                    return Err(NbdError::Refused {
                        peer: self.peer.to_string(),
                        export: self.export.to_string(),
                        reply_type: t,
                        message,
                    });
                }
                // Not a reply NBD_OPT_GO should get; harmless, so skipped.
                other => {
                    log::debug!(
                        "NBD server {} sent option reply type {other:#x} to NBD_OPT_GO; ignored",
                        self.peer
                    );
                    self.skip(h.length, "an option reply")?;
                }
            }
        }
        Err(self.protocol(format!(
            "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO without a final one"
        )))
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way in, for servers without `NBD_OPT_GO`. The server
    /// cannot report errors; it closes the connection instead.
    fn export_name(&mut self, no_zeroes: bool) -> Result<ExportInfo, NbdError> {
        let name = self.export.as_bytes();
        let mut msg = encode_option(OPT_EXPORT_NAME, name.len() as u32).to_vec();
        msg.extend_from_slice(name);
        self.write_all(&msg, "sending NBD_OPT_EXPORT_NAME")?;
        let mut b = [0u8; 10];
        if let Err(e) = self.stream.read_exact(&mut b) {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                    NbdError::ExportNameRejected {
                        peer: self.peer.to_string(),
                        export: self.export.to_string(),
                    }
                }
                _ => self.io_error(e, "reading the reply to NBD_OPT_EXPORT_NAME (handshake)"),
            });
        }
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.read_exact(&mut zeroes, "the padding after the export information")?;
        }
        let info = ExportInfo {
            size: be_u64(&b[0..8]),
            flags: TransmissionFlags(be_u16(&b[8..10])),
            block_size: None,
            name: None,
            description: None,
            negotiated_with_go: false,
        };
        self.validate(&info)?;
        Ok(info)
    }

    /// Refuses sizes no real export has and block sizes the protocol forbids: later
    /// arithmetic relies on them.
    fn validate(&self, info: &ExportInfo) -> Result<(), NbdError> {
        if info.size > MAX_EXPORT_SIZE {
            return Err(self.protocol(format!(
                "export size {} is larger than 2^63 - 1 bytes",
                info.size
            )));
        }
        if !info.flags.has_flags() {
            log::warn!(
                "NBD server {} did not set NBD_FLAG_HAS_FLAGS; ignoring its transmission flags {:#x}",
                self.peer,
                info.flags.0
            );
        }
        if let Some(bs) = info.block_size {
            let ok = bs.minimum.is_power_of_two()
                && bs.minimum <= 65536
                && bs.preferred.is_power_of_two()
                && bs.preferred >= bs.minimum
                && bs.maximum >= bs.minimum
                && (bs.maximum == u32::MAX || bs.maximum % bs.minimum == 0);
            if !ok {
                return Err(self.protocol(format!(
                    "invalid block size constraints: minimum {}, preferred {}, maximum {}",
                    bs.minimum, bs.preferred, bs.maximum
                )));
            }
        }
        Ok(())
    }

    /// Reads an information payload of exactly `N` bytes, checking the announced length first.
    fn read_fixed<const N: usize>(
        &mut self,
        len: u32,
        what: &'static str,
    ) -> Result<[u8; N], NbdError> {
        if len as usize != N {
            return Err(self.protocol(format!("{what} payload of {len} bytes (expected {N})")));
        }
        let mut b = [0u8; N];
        self.read_exact(&mut b, what)?;
        Ok(b)
    }

    /// Reads a string of `len` bytes (already bounded by `MAX_OPTION_REPLY`); invalid UTF-8 is
    /// replaced rather than refused, as it is only shown to people.
    fn read_string(&mut self, len: u32, what: &'static str) -> Result<String, NbdError> {
        let mut b = vec![0u8; len as usize];
        self.read_exact(&mut b, what)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Discards `len` bytes without allocating them.
    fn skip(&mut self, len: u32, what: &'static str) -> Result<(), NbdError> {
        let mut scratch = [0u8; 512];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(scratch.len());
            self.read_exact(&mut scratch[..n], what)?;
            left -= n;
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), NbdError> {
        self.stream
            .read_exact(buf)
            .map_err(|e| self.io_error(e, &format!("reading {what} (handshake)")))
    }

    fn write_all(&mut self, buf: &[u8], what: &str) -> Result<(), NbdError> {
        self.stream
            .write_all(buf)
            .and_then(|()| self.stream.flush())
            .map_err(|e| self.io_error(e, &format!("{what} (handshake)")))
    }

    fn io_error(&self, e: io::Error, during: &str) -> NbdError {
        crate::error::io_failure(self.peer, during, self.timeout, e)
    }

    fn protocol(&self, detail: String) -> NbdError {
        NbdError::Protocol {
            peer: self.peer.to_string(),
            detail: format!("during the handshake: {detail}"),
        }
    }
}

/// Shows up to 8 bytes as hex and, when printable, as text: helps spot "connected to an HTTP
/// server" at a glance.
fn show_bytes(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("0x{hex} (\"{}\")", String::from_utf8_lossy(b))
    } else {
        format!("0x{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        assert!(validate_export_name("").is_ok());
        assert!(validate_export_name("disk0").is_ok());
        assert!(validate_export_name("a\0b").is_err());
        assert!(validate_export_name(&"x".repeat(4097)).is_err());
        assert!(validate_export_name(&"x".repeat(4096)).is_ok());
    }

    #[test]
    fn flags_without_has_flags_mean_nothing() {
        let f = TransmissionFlags(FLAG_READ_ONLY | FLAG_SEND_FLUSH);
        assert!(!f.read_only() && !f.can_flush());
        let f = TransmissionFlags(FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_TRIM);
        assert!(f.read_only() && f.can_trim() && !f.can_fua());
    }

    #[test]
    fn bytes_shown_for_people() {
        assert_eq!(show_bytes(b"HTTP/1.1"), "0x485454502f312e31 (\"HTTP/1.1\")");
        assert_eq!(show_bytes(&[0, 1]), "0x0001");
    }
}
