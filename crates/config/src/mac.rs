//! Ethernet MAC addresses as a guest NIC may be given.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A unicast Ethernet address for a guest NIC.
///
/// Displays as lowercase `00:16:3e:55:9d:b0`. Parsing accepts exactly six two-digit hex groups
/// separated by `:` (either case), and refuses addresses a NIC cannot own: multicast (the low
/// bit of the first octet set, which includes broadcast) and all-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not an acceptable [`MacAddr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    /// Not six `:`-separated pairs of hex digits.
    #[error("expected six ':'-separated pairs of hex digits")]
    Syntax,
    /// The multicast bit is set, so no NIC can use it as its own address.
    #[error("multicast address")]
    Multicast,
    /// `00:00:00:00:00:00` is not a valid station address.
    #[error("all-zero address")]
    Zero,
}

impl MacAddr {
    /// Whether the multicast (group) bit of the first octet is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut octets = [0u8; 6];
        let mut groups = s.split(':');
        for octet in &mut octets {
            *octet = groups
                .next()
                .and_then(parse_hex_pair)
                .ok_or(MacAddrError::Syntax)?;
        }
        if groups.next().is_some() {
            return Err(MacAddrError::Syntax);
        }
        let mac = MacAddr(octets);
        if mac.is_multicast() {
            Err(MacAddrError::Multicast)
        } else if octets == [0; 6] {
            Err(MacAddrError::Zero)
        } else {
            Ok(mac)
        }
    }
}

/// Exactly two hex digits; `u8::from_str_radix` alone would also take `+f` or a single digit.
fn parse_hex_pair(group: &str) -> Option<u8> {
    if group.len() == 2 && group.bytes().all(|b| b.is_ascii_hexdigit()) {
        u8::from_str_radix(group, 16).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_lowercase() {
        let mac: MacAddr = "00:16:3E:55:9d:B0".parse().unwrap();
        assert_eq!(mac, MacAddr([0x00, 0x16, 0x3e, 0x55, 0x9d, 0xb0]));
        assert_eq!(mac.to_string(), "00:16:3e:55:9d:b0");
    }

    #[test]
    fn refuses_bad_syntax() {
        for bad in [
            "",
            "00:16:3e:55:9d",
            "00:16:3e:55:9d:b0:11",
            "00:16:3e:zz:9d:b0",
            "0:16:3e:55:9d:b0",
            "000:16:3e:55:9d:b0",
            "00-16-3e-55-9d-b0",
            "+0:16:3e:55:9d:b0",
            "00:16:3e:55:9d:b0:",
            "00:16:3e:55:9d:é0",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacAddrError::Syntax), "{bad}");
        }
    }

    #[test]
    fn refuses_multicast_and_zero() {
        assert_eq!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacAddrError::Multicast)
        );
        assert_eq!(
            "ff:ff:ff:ff:ff:ff".parse::<MacAddr>(),
            Err(MacAddrError::Multicast)
        );
        assert_eq!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacAddrError::Zero)
        );
        // Locally administered unicast is fine.
        assert!("02:00:00:00:00:01".parse::<MacAddr>().is_ok());
    }
}
