//! Interface names.
//!
//! Linux interface names are at most 15 bytes (`IFNAMSIZ` is 16 with the NUL) and the kernel
//! rejects `.`, `..` and names with `/`, `:` or whitespace. tern also rejects `%`, which would
//! make `TUNSETIFF` pick a name by itself (`tap%d`), and control characters, so that a name from
//! a guest config either is used exactly or fails with a message saying why.

use crate::NetError;

/// Size of the kernel's interface-name buffer, including the terminating NUL.
pub const IFNAMSIZ: usize = 16;

/// Checks that `name` can be used as an exact interface name.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() >= IFNAMSIZ {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is . or ..")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.contains(':') {
        Some("it contains ':'")
    } else if name.contains('%') {
        Some("it contains '%'")
    } else if name.chars().any(|c| c.is_whitespace()) {
        Some("it contains whitespace")
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// tern's name for NIC `index` of domain `domid` when the config gives no `vifname`:
/// `tern<domid>.<index>` (like Xen's `vif<domid>.<index>`). Not validated: a huge domain ID
/// makes it too long, which `Tap::create` reports.
pub fn default_vif_name(domid: u64, index: usize) -> String {
    format!("tern{domid}.{index}")
}

/// The NUL-padded buffer form of a name already validated.
pub(crate) fn to_buf(name: &str) -> [u8; IFNAMSIZ] {
    let mut buf = [0u8; IFNAMSIZ];
    let bytes = name.as_bytes();
    let n = bytes.len().min(IFNAMSIZ - 1);
    buf[..n].copy_from_slice(&bytes[..n]);
    buf
}

/// The name in a NUL-padded buffer the kernel filled in.
pub(crate) fn from_buf(buf: &[u8; IFNAMSIZ]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tern_and_xl_names() {
        for ok in [
            "tern1.0",
            "tern65535.15",
            "vif-web",
            "a",
            "abcdefghijklmno",
            "eth0_x-1",
        ] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        assert_eq!(default_vif_name(7, 1), "tern7.1");
        assert!(validate_ifname(&default_vif_name(123456, 12)).is_ok());
    }

    #[test]
    fn rejects_what_the_kernel_or_tunsetiff_would_mangle() {
        for bad in [
            "",
            "abcdefghijklmnop",
            ".",
            "..",
            "a/b",
            "eth0:1",
            "tap%d",
            "a b",
            "a\tb",
            "a\0b",
            "a\u{7f}",
        ] {
            let err = validate_ifname(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid interface name"), "{err}");
        }
        // 15 bytes of UTF-8 is the limit, not 15 characters.
        assert!(validate_ifname("ééééééé").is_ok());
        assert!(validate_ifname("éééééééé").is_err());
    }

    #[test]
    fn buffers_round_trip() {
        let b = to_buf("tern3.0");
        assert_eq!(&b[..8], b"tern3.0\0");
        assert_eq!(from_buf(&b), "tern3.0");
        assert_eq!(from_buf(&to_buf("abcdefghijklmno")), "abcdefghijklmno");
    }
}
