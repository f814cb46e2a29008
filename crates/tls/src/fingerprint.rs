//! Host key fingerprints.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use rustls::server::ParsedCertificate;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{sha256, TlsError};

/// SHA-256 of a host's public key (its SubjectPublicKeyInfo DER), so that re-issuing a
/// certificate for the same key keeps it.
///
/// Written `sha256:` and 64 lowercase hex digits, which is also its JSON form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

const PREFIX: &str = "sha256:";

impl Fingerprint {
    /// The fingerprint of the key in a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Result<Fingerprint, TlsError> {
        let cert = CertificateDer::from(der);
        let parsed = ParsedCertificate::try_from(&cert)
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        Ok(Fingerprint::of_public_key(
            parsed.subject_public_key_info().as_ref(),
        ))
    }

    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_public_key(spki_der: &[u8]) -> Fingerprint {
        Fingerprint(sha256(spki_der))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Fingerprint, TlsError> {
        let bad = || TlsError::BadFingerprint {
            // Bounded: the input may come from anywhere.
            input: s.chars().take(80).collect(),
        };
        let hex = s.strip_prefix(PREFIX).ok_or_else(bad)?.as_bytes();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let hi = hex_digit(pair[0]).ok_or_else(bad)?;
            let lo = hex_digit(pair[1]).ok_or_else(bad)?;
            *o = hi << 4 | lo;
        }
        Ok(Fingerprint(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let fp = Fingerprint::of_public_key(b"key");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 71);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            s.to_uppercase()
                .replace("SHA256:", "sha256:")
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        for bad in [
            "",
            "sha256:",
            &s[7..],
            &s[..70],
            &format!("{s}0"),
            &s.replace("sha256:", "md5:"),
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            let err = bad.parse::<Fingerprint>().unwrap_err().to_string();
            assert!(err.contains("64 hex digits"), "{err}");
        }
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
        assert!(serde_json::from_str::<Fingerprint>("\"sha256:00\"").is_err());
    }
}
