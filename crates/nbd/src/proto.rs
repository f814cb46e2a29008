//! Wire constants and message encoding of the NBD protocol (the NBD project's `doc/proto.md`).
//!
//! Everything on the wire is big-endian. Only what this client speaks is here: the fixed
//! newstyle handshake with `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`, and the transmission phase with
//! simple replies. Structured replies are never negotiated, so a server must answer every
//! request with a 16-byte simple reply header (plus the data of a successful read).

use std::io;

/// `NBDMAGIC`: the first 8 bytes every server sends, oldstyle or newstyle.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of a newstyle greeting, and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The second 8 bytes of an oldstyle greeting (`cliserv_magic`): no export names, no options.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk: only legal after `NBD_OPT_STRUCTURED_REPLY`, which this
/// client never sends; recognised only to say so in the error.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits).
/// The server speaks fixed newstyle: options other than `EXPORT_NAME` get replies.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits); a client may only set what the server advertised.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

// Information types in `NBD_REP_INFO` replies.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

// Error values of simple replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string the protocol allows (export names, error messages).
pub const MAX_STRING: usize = 4096;
/// Largest option reply payload this client accepts. The largest legitimate one for the options
/// it sends is an error message (at most [`MAX_STRING`]) or an `NBD_INFO_NAME`/`DESCRIPTION`;
/// anything bigger is a broken or hostile server and ends the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most option replies accepted for one option before giving up: `NBD_OPT_GO` legitimately
/// gets a handful of `NBD_REP_INFO`s, a server sending more is not going anywhere.
pub const MAX_OPTION_REPLIES: usize = 64;
/// The request size every server must accept (2^25): the cap used when the server says nothing.
pub const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;

/// Encodes a transmission request header.
pub fn encode_request(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// A decoded simple (or would-be simple) reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub magic: u32,
    pub error: u32,
    pub cookie: u64,
}

/// Decodes a 16-byte reply header; the magic is checked by the caller, which knows what to say.
pub fn decode_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> ReplyHeader {
    ReplyHeader {
        magic: be_u32(&b[0..4]),
        error: be_u32(&b[4..8]),
        cookie: be_u64(&b[8..16]),
    }
}

/// Encodes an option header (the data follows separately).
pub fn encode_option(option: u32, data_len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&data_len.to_be_bytes());
    b
}

/// The data of `NBD_OPT_GO`: the export name and the information requests.
pub fn encode_go_data(export: &str, info_requests: &[u16]) -> Vec<u8> {
    let name = export.as_bytes();
    let mut d = Vec::with_capacity(4 + name.len() + 2 + 2 * info_requests.len());
    // The caller validated the name (at most MAX_STRING bytes), so the length fits.
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
    for r in info_requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// A decoded option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub magic: u64,
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn decode_option_reply(b: &[u8; OPTION_REPLY_LEN]) -> OptionReplyHeader {
    OptionReplyHeader {
        magic: be_u64(&b[0..8]),
        option: be_u32(&b[8..12]),
        reply_type: be_u32(&b[12..16]),
        length: be_u32(&b[16..20]),
    }
}

/// Big-endian u16 from the first 2 bytes of `b` (callers pass slices of fixed arrays).
pub fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

pub fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The name and meaning of an NBD error value, for messages.
pub fn errno_name(errno: u32) -> String {
    let s = match errno {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (cannot allocate memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left on device)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (operation not supported)",
        ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        other => return format!("error {other} (not an NBD error value)"),
    };
    s.to_string()
}

/// The `io::ErrorKind` closest to an NBD error value, so callers (the virtio-blk back-end) can
/// tell a full disk or a refused write from a plain I/O error without parsing messages.
pub fn errno_kind(errno: u32) -> io::ErrorKind {
    match errno {
        EPERM => io::ErrorKind::PermissionDenied,
        ENOMEM => io::ErrorKind::OutOfMemory,
        EINVAL | EOVERFLOW => io::ErrorKind::InvalidInput,
        ENOSPC => io::ErrorKind::StorageFull,
        ENOTSUP => io::ErrorKind::Unsupported,
        ESHUTDOWN => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    }
}

/// The name and meaning of an option reply error type, for messages.
pub fn option_error_name(reply_type: u32) -> String {
    let s = match reply_type {
        REP_ERR_UNSUP => "option not supported by the server (NBD_REP_ERR_UNSUP)",
        REP_ERR_POLICY => "forbidden by the server's policy (NBD_REP_ERR_POLICY)",
        REP_ERR_INVALID => "the server found the request invalid (NBD_REP_ERR_INVALID)",
        REP_ERR_PLATFORM => "not supported on the server's platform (NBD_REP_ERR_PLATFORM)",
        REP_ERR_TLS_REQD => {
            "the server requires TLS, which this client does not speak (NBD_REP_ERR_TLS_REQD)"
        }
        REP_ERR_UNKNOWN => "no such export (NBD_REP_ERR_UNKNOWN)",
        REP_ERR_SHUTDOWN => "the server is shutting down (NBD_REP_ERR_SHUTDOWN)",
        REP_ERR_BLOCK_SIZE_REQD => {
            "the server requires block size negotiation (NBD_REP_ERR_BLOCK_SIZE_REQD)"
        }
        REP_ERR_TOO_BIG => "request or reply too big (NBD_REP_ERR_TOO_BIG)",
        other => return format!("unknown option error {other:#x}"),
    };
    s.to_string()
}

/// The `io::ErrorKind` of a refused `NBD_OPT_GO`.
pub fn option_error_kind(reply_type: u32) -> io::ErrorKind {
    match reply_type {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_POLICY | REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
        REP_ERR_UNSUP | REP_ERR_PLATFORM | REP_ERR_BLOCK_SIZE_REQD => io::ErrorKind::Unsupported,
        REP_ERR_INVALID | REP_ERR_TOO_BIG => io::ErrorKind::InvalidInput,
        REP_ERR_SHUTDOWN => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let b = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 0x1000, 512);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be_u64(&b[16..24]), 0x1000);
        assert_eq!(be_u32(&b[24..28]), 512);
    }

    #[test]
    fn go_data_layout() {
        let d = encode_go_data("ab", &[INFO_BLOCK_SIZE]);
        assert_eq!(d, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        assert_eq!(encode_go_data("", &[]), [0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn reply_decoding() {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&EIO.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        let h = decode_reply(&b);
        assert_eq!((h.magic, h.error, h.cookie), (SIMPLE_REPLY_MAGIC, EIO, 7));
    }

    #[test]
    fn error_names_and_kinds() {
        assert!(errno_name(ENOSPC).contains("ENOSPC"));
        assert!(errno_name(4242).contains("4242"));
        assert_eq!(errno_kind(EPERM), io::ErrorKind::PermissionDenied);
        assert_eq!(errno_kind(ENOSPC), io::ErrorKind::StorageFull);
        assert_eq!(errno_kind(EIO), io::ErrorKind::Other);
        assert_eq!(option_error_kind(REP_ERR_UNKNOWN), io::ErrorKind::NotFound);
        assert!(option_error_name(0x8000_00ff).contains("0x800000ff"));
    }
}
