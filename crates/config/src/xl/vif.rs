//! Network interface specifications: `mac=..., bridge=..., ip=..., model=...`.

use super::settings::Warnings;
use super::VifSpec;
use crate::error::{quote, ConfigError};
use crate::mac::{MacAddr, MacAddrError};

/// Parses one item of `vif = [ ... ]`, found on `line`. An empty string is a NIC with every
/// setting left to its default, as in xl.
pub(super) fn parse_vif(
    spec: &str,
    line: usize,
    warnings: &mut Warnings,
) -> Result<VifSpec, ConfigError> {
    let mut vif = VifSpec::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                ConfigError::at(line, format!("vif option {} is not key=value", quote(part)))
            })?;
        let slot = match key {
            "mac" => {
                let mac = parse_mac(value).map_err(|e| ConfigError::at(line, e))?;
                replace(&mut vif.mac, mac, key, line, warnings);
                continue;
            }
            "bridge" => &mut vif.bridge,
            "ip" => &mut vif.ip,
            "model" => &mut vif.model,
            _ => {
                warnings.push(
                    line,
                    format!(
                        "vif option {} is not supported by tern and is ignored",
                        quote(key)
                    ),
                );
                continue;
            }
        };
        if value.is_empty() {
            return Err(ConfigError::at(
                line,
                format!("vif option '{key}' has an empty value"),
            ));
        }
        replace(slot, value.to_string(), key, line, warnings);
    }
    Ok(vif)
}

/// Writes `vif` the way [`parse_vif`] reads it back.
pub(super) fn vif_to_xl(vif: &VifSpec) -> String {
    let mac = vif.mac.map(|m| m.to_string());
    [
        ("mac", mac.as_deref()),
        ("bridge", vif.bridge.as_deref()),
        ("ip", vif.ip.as_deref()),
        ("model", vif.model.as_deref()),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
    .collect::<Vec<_>>()
    .join(", ")
}

fn parse_mac(value: &str) -> Result<MacAddr, String> {
    value.parse().map_err(|e| match e {
        MacAddrError::Syntax => format!("invalid MAC address {}", quote(value)),
        reason => format!("invalid MAC address {} ({reason})", quote(value)),
    })
}

/// Sets an option, warning if the same string already set it.
fn replace<T>(slot: &mut Option<T>, value: T, key: &str, line: usize, warnings: &mut Warnings) {
    if slot.replace(value).is_some() {
        warnings.push(
            line,
            format!("vif option '{key}' is given twice; the last value is used"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vif(spec: &str) -> (VifSpec, Vec<String>) {
        let mut warnings = Warnings::default();
        let vif = parse_vif(spec, 7, &mut warnings).unwrap();
        (vif, warnings.into_messages())
    }

    fn vif_err(spec: &str) -> String {
        let mut warnings = Warnings::default();
        parse_vif(spec, 7, &mut warnings).unwrap_err().to_string()
    }

    #[test]
    fn reference_vif() {
        let (v, warnings) = vif("mac=00:16:3e:55:9d:b0, bridge=xenbr0");
        assert_eq!(
            v,
            VifSpec {
                mac: Some(MacAddr([0x00, 0x16, 0x3e, 0x55, 0x9d, 0xb0])),
                bridge: Some("xenbr0".into()),
                ip: None,
                model: None,
            }
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn all_keys_and_empty() {
        let (v, _) = vif(" model = e1000 ,ip=10.0.0.2 10.0.0.3,bridge=br0,");
        assert_eq!(v.model.as_deref(), Some("e1000"));
        assert_eq!(v.ip.as_deref(), Some("10.0.0.2 10.0.0.3"));
        assert_eq!(v.bridge.as_deref(), Some("br0"));
        assert_eq!(vif("").0, VifSpec::default());
    }

    #[test]
    fn unsupported_and_repeated_keys_warn() {
        let (v, warnings) = vif("script=vif-bridge, vifname=v1, bridge=a, bridge=b");
        assert_eq!(v.bridge.as_deref(), Some("b"));
        assert_eq!(
            warnings,
            vec![
                "line 7: vif option 'script' is not supported by tern and is ignored",
                "line 7: vif option 'vifname' is not supported by tern and is ignored",
                "line 7: vif option 'bridge' is given twice; the last value is used",
            ]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            vif_err("mac=00:16:3e:zz:9d:b0, bridge=xenbr0"),
            "line 7: invalid MAC address '00:16:3e:zz:9d:b0'"
        );
        assert_eq!(
            vif_err("mac=01:16:3e:55:9d:b0"),
            "line 7: invalid MAC address '01:16:3e:55:9d:b0' (multicast address)"
        );
        assert_eq!(
            vif_err("bridge"),
            "line 7: vif option 'bridge' is not key=value"
        );
        assert_eq!(vif_err("=x"), "line 7: vif option '=x' is not key=value");
        assert_eq!(
            vif_err("bridge="),
            "line 7: vif option 'bridge' has an empty value"
        );
    }

    #[test]
    fn to_xl_reads_back() {
        let (v, _) = vif("mac=00:16:3e:55:9d:b0, bridge=xenbr0, ip=1.2.3.4, model=a=b");
        assert_eq!(vif(&vif_to_xl(&v)).0, v);
        assert_eq!(vif_to_xl(&VifSpec::default()), "");
    }
}
