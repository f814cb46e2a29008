//! Disk specifications, as xl-disk-configuration(5) writes them.
//!
//! Two forms, which may be mixed:
//! - positional: `[<type>:]<target>,<vdev>[,<access>]`, or `<target>,<format>,<vdev>,<access>`
//!   when the target has no type prefix (xl's four-field form);
//! - keyed: `vdev=xvda, access=rw, format=raw, target=<target>`. As in xl, `target=` takes
//!   everything after it, commas included, so it must come last.
//!
//! Type prefixes: `file:`, `raw:`, `aio:`, `tap:aio:` and `tap2:aio:` mean a raw image file,
//! `phy:` a block device, `nbd:<host>:<port>[:exportname=<name>]` an NBD server. Without a
//! prefix the target is a block device if `backendtype=phy` says so or it is under `/dev/`, and
//! an image file otherwise.

use std::path::{Path, PathBuf};

use super::settings::Warnings;
use super::{DiskBackend, DiskSpec};
use crate::error::{quote, ConfigError};

/// Parses one item of `disk = [ ... ]`, found on `line`.
pub(super) fn parse_disk(
    spec: &str,
    line: usize,
    base_dir: Option<&Path>,
    warnings: &mut Warnings,
) -> Result<DiskSpec, ConfigError> {
    let err = |message: String| ConfigError::at(line, message);
    let fields = Fields::split(spec, line, warnings).map_err(err)?;
    fields.into_spec(spec, base_dir).map_err(err)
}

/// Writes `disk` the way [`parse_disk`] reads it back.
pub(super) fn disk_to_xl(disk: &DiskSpec) -> String {
    let target = target_to_xl(&disk.backend);
    let access = if disk.writable { "w" } else { "r" };
    if target.contains(',') {
        // Only the keyed form can carry a comma in the target.
        format!("vdev={}, access={access}, target={target}", disk.vdev)
    } else {
        format!("{target},{},{access}", disk.vdev)
    }
}

fn target_to_xl(backend: &DiskBackend) -> String {
    match backend {
        DiskBackend::File(path) => format!("file:{}", path.to_string_lossy()),
        DiskBackend::Phy(path) => format!("phy:{}", path.to_string_lossy()),
        DiskBackend::Nbd { host, port, export } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            match export {
                Some(name) => format!("nbd:{host}:{port}:exportname={name}"),
                None => format!("nbd:{host}:{port}"),
            }
        }
    }
}

/// The fields of a disk specification, each given at most once.
#[derive(Default)]
struct Fields<'a> {
    target: Option<&'a str>,
    format: Option<&'a str>,
    vdev: Option<&'a str>,
    access: Option<&'a str>,
    backendtype: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// Splits `spec` into its fields, warning about keyed options tern ignores.
    fn split(spec: &'a str, line: usize, warnings: &mut Warnings) -> Result<Self, String> {
        let mut fields = Fields::default();
        let mut positional = Vec::new();
        let mut rest = spec;
        loop {
            let (part, remainder) = match rest.split_once(',') {
                Some((part, remainder)) => (part.trim(), Some(remainder)),
                None => (rest.trim(), None),
            };
            if let Some(target) = rest.trim_start().strip_prefix("target=") {
                set_once(&mut fields.target, target.trim(), "target")?;
                break;
            }
            match keyed(part) {
                Some((key, value)) => fields.set_key(key, value, line, warnings)?,
                // A trailing comma, as xl allows, leaves an empty last part.
                None if part.is_empty() && remainder.is_none() && !positional.is_empty() => {}
                None => positional.push(part),
            }
            match remainder {
                Some(remainder) => rest = remainder,
                None => break,
            }
        }
        fields.set_positional(&positional, spec)?;
        Ok(fields)
    }

    fn set_key(
        &mut self,
        key: &str,
        value: &'a str,
        line: usize,
        warnings: &mut Warnings,
    ) -> Result<(), String> {
        match key {
            "vdev" => set_once(&mut self.vdev, value, "vdev"),
            "access" => set_once(&mut self.access, value, "access"),
            "format" => set_once(&mut self.format, value, "format"),
            "backendtype" => set_once(&mut self.backendtype, value, "backendtype"),
            _ => {
                warnings.push(
                    line,
                    format!("disk option '{key}' is not supported by tern and is ignored"),
                );
                Ok(())
            }
        }
    }

    /// Assigns positional parameters in xl's order: target, then format only if the target
    /// has no type prefix and all four are given, then vdev and access.
    fn set_positional(&mut self, positional: &[&'a str], spec: &str) -> Result<(), String> {
        let Some((&target, rest)) = positional.split_first() else {
            return Ok(());
        };
        set_once(&mut self.target, target, "target")?;
        let rest = match rest {
            [format, tail @ ..] if tail.len() == 2 && type_prefix(target).is_none() => {
                set_once(&mut self.format, format, "format")?;
                tail
            }
            _ => rest,
        };
        match rest {
            [] => Ok(()),
            [vdev] => set_once(&mut self.vdev, vdev, "vdev"),
            [vdev, access] => {
                set_once(&mut self.vdev, vdev, "vdev")?;
                set_once(&mut self.access, access, "access")
            }
            _ => Err(format!("too many fields in disk {}", quote(spec))),
        }
    }

    fn into_spec(self, spec: &str, base_dir: Option<&Path>) -> Result<DiskSpec, String> {
        check_format(self.format)?;
        let target = self
            .target
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("disk {} has no target", quote(spec)))?;
        let vdev = self
            .vdev
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("disk {} has no vdev", quote(spec)))?;
        check_vdev(vdev)?;
        Ok(DiskSpec {
            backend: parse_target(target, self.backendtype, base_dir)?,
            vdev: vdev.to_string(),
            writable: parse_access(self.access)?,
        })
    }
}

/// `key=value` if `part` starts with a key name and `=`; a path such as `file:/a=b` does not.
fn keyed(part: &str) -> Option<(&str, &str)> {
    let (key, value) = part.split_once('=')?;
    let key = key.trim();
    let is_key = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-');
    is_key.then(|| (key, value.trim()))
}

fn set_once<'a>(slot: &mut Option<&'a str>, value: &'a str, what: &str) -> Result<(), String> {
    if slot.replace(value).is_some() {
        Err(format!("disk {what} is given twice"))
    } else {
        Ok(())
    }
}

/// tern reads images as raw bytes; any other format would be misread.
fn check_format(format: Option<&str>) -> Result<(), String> {
    match format {
        None | Some("") | Some("raw") => Ok(()),
        Some(other) => Err(format!(
            "disk format {} is not supported by tern (only raw)",
            quote(other)
        )),
    }
}

/// Letters then letters or digits, like `xvda`, `hdc` or `xvda1`.
fn check_vdev(vdev: &str) -> Result<(), String> {
    let mut chars = vdev.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid disk vdev {} (expected letters then letters or digits, like xvda)",
            quote(vdev)
        ))
    }
}

fn parse_access(access: Option<&str>) -> Result<bool, String> {
    match access {
        None | Some("w") | Some("rw") => Ok(true),
        Some("r") | Some("ro") => Ok(false),
        Some(other) => Err(format!(
            "invalid disk access {} (expected r, ro, w or rw)",
            quote(other)
        )),
    }
}

/// The kind of backend a type prefix selects.
enum Prefix {
    File,
    Phy,
    Nbd,
}

/// Splits a recognised type prefix off `target`. `Some(Err)` for a prefix that names
/// something tern cannot do (`qcow2:`, `iscsi:`), so it is not silently taken as a file name.
fn type_prefix(target: &str) -> Option<Result<(Prefix, &str), String>> {
    let (head, rest) = target.split_once(':')?;
    let is_word = head.starts_with(|c: char| c.is_ascii_lowercase())
        && head
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !is_word {
        return None;
    }
    let prefix = match head {
        "file" | "raw" | "aio" => Ok((Prefix::File, rest)),
        "phy" => Ok((Prefix::Phy, rest)),
        "nbd" => Ok((Prefix::Nbd, rest)),
        "tap" | "tap2" => match rest.split_once(':') {
            Some(("aio", path)) => Ok((Prefix::File, path)),
            Some((format, _)) => Err(format!(
                "disk format {} is not supported by tern (only raw)",
                quote(format)
            )),
            None => Err(format!(
                "disk type '{head}:' needs a format, as in 'tap:aio:'"
            )),
        },
        "qcow" | "qcow2" | "vhd" | "qed" => Err(format!(
            "disk format '{head}' is not supported by tern (only raw)"
        )),
        _ => Err(format!(
            "disk type '{head}:' is not supported by tern (use file:, phy: or nbd:)"
        )),
    };
    Some(prefix)
}

fn parse_target(
    target: &str,
    backendtype: Option<&str>,
    base_dir: Option<&Path>,
) -> Result<DiskBackend, String> {
    let (prefix, rest) = match type_prefix(target) {
        Some(prefix) => prefix?,
        None => (default_prefix(target, backendtype)?, target),
    };
    let path = || -> Result<PathBuf, String> {
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(format!("disk target {} has no path", quote(target)));
        }
        Ok(super::resolve(Path::new(rest), base_dir))
    };
    match prefix {
        Prefix::File => Ok(DiskBackend::File(path()?)),
        Prefix::Phy => Ok(DiskBackend::Phy(path()?)),
        Prefix::Nbd => parse_nbd(rest),
    }
}

/// The backend of a target without a type prefix.
fn default_prefix(target: &str, backendtype: Option<&str>) -> Result<Prefix, String> {
    match backendtype {
        Some("phy") => Ok(Prefix::Phy),
        Some("qdisk") | Some("tap") => Ok(Prefix::File),
        Some(other) => Err(format!(
            "invalid disk backendtype {} (expected phy, qdisk or tap)",
            quote(other)
        )),
        None if target.starts_with("/dev/") => Ok(Prefix::Phy),
        None => Ok(Prefix::File),
    }
}

/// `<host>:<port>[:exportname=<name>]`; an IPv6 host goes in brackets.
fn parse_nbd(rest: &str) -> Result<DiskBackend, String> {
    let bad = || {
        format!(
            "invalid NBD target {} (expected nbd:<host>:<port>[:exportname=<name>])",
            quote(&format!("nbd:{rest}"))
        )
    };
    let (host, after_host) = match rest.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':').ok_or_else(bad)?)
        }
        None => rest.split_once(':').ok_or_else(bad)?,
    };
    let (port, export) = match after_host.split_once(':') {
        Some((port, export)) => (port, Some(export)),
        None => (after_host, None),
    };
    let host_ok = !host.is_empty() && !host.chars().any(|c| c.is_whitespace() || c.is_control());
    if !host_ok {
        return Err(bad());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("invalid NBD port {} (expected 1 to 65535)", quote(port)))?;
    let export = match export {
        None => None,
        Some(export) => match export.strip_prefix("exportname=") {
            Some(name) if !name.is_empty() => Some(name.to_string()),
            _ => return Err(bad()),
        },
    };
    Ok(DiskBackend::Nbd {
        host: host.to_string(),
        port,
        export,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(spec: &str) -> DiskSpec {
        let mut warnings = Warnings::default();
        parse_disk(spec, 1, None, &mut warnings).unwrap()
    }

    fn disk_err(spec: &str) -> String {
        let mut warnings = Warnings::default();
        parse_disk(spec, 3, None, &mut warnings)
            .unwrap_err()
            .to_string()
    }

    fn phy(path: &str, vdev: &str, writable: bool) -> DiskSpec {
        DiskSpec {
            backend: DiskBackend::Phy(path.into()),
            vdev: vdev.into(),
            writable,
        }
    }

    fn file(path: &str, vdev: &str, writable: bool) -> DiskSpec {
        DiskSpec {
            backend: DiskBackend::File(path.into()),
            vdev: vdev.into(),
            writable,
        }
    }

    #[test]
    fn positional_with_prefixes() {
        assert_eq!(
            disk("phy:/dev/VolumeGroup0/TestGuest-volume,xvda,w"),
            phy("/dev/VolumeGroup0/TestGuest-volume", "xvda", true)
        );
        assert_eq!(
            disk("file:/img/a.img,hda,r"),
            file("/img/a.img", "hda", false)
        );
        assert_eq!(
            disk("tap:aio:/img/a.img,sda,ro"),
            file("/img/a.img", "sda", false)
        );
        assert_eq!(
            disk("aio:/img/a.img,vda,rw"),
            file("/img/a.img", "vda", true)
        );
        assert_eq!(
            disk("tap2:aio:/img/a.img, xvdb1"),
            file("/img/a.img", "xvdb1", true)
        );
        assert_eq!(
            disk(" file:/a=b.img , xvda , w ,"),
            file("/a=b.img", "xvda", true)
        );
    }

    #[test]
    fn positional_without_prefix() {
        assert_eq!(disk("/dev/sdb,xvdb"), phy("/dev/sdb", "xvdb", true));
        assert_eq!(
            disk("/img/a:b.img,xvdb,r"),
            file("/img/a:b.img", "xvdb", false)
        );
        // xl's four-field form: target, format, vdev, access.
        assert_eq!(
            disk("/img/a.img,raw,xvda,rw"),
            file("/img/a.img", "xvda", true)
        );
        assert_eq!(
            disk("/img/a.img,,xvda,rw"),
            file("/img/a.img", "xvda", true)
        );
    }

    #[test]
    fn keyed_form() {
        assert_eq!(
            disk("format=raw, vdev=xvdc, access=ro, target=/img/with,comma.img"),
            file("/img/with,comma.img", "xvdc", false)
        );
        assert_eq!(
            disk("vdev=xvdc, backendtype=phy, target=/srv/lv"),
            phy("/srv/lv", "xvdc", true)
        );
        assert_eq!(
            disk("/img/x.img, vdev=xvdd"),
            file("/img/x.img", "xvdd", true)
        );
        let mut warnings = Warnings::default();
        parse_disk("/img/x,xvda,devtype=disk", 5, None, &mut warnings).unwrap();
        assert_eq!(
            warnings.into_messages(),
            vec!["line 5: disk option 'devtype' is not supported by tern and is ignored"]
        );
    }

    #[test]
    fn nbd() {
        assert_eq!(
            disk("nbd:10.0.0.5:10809,xvda,w").backend,
            DiskBackend::Nbd {
                host: "10.0.0.5".into(),
                port: 10809,
                export: None
            }
        );
        assert_eq!(
            disk("nbd:[fe80::1]:10809:exportname=root disk,xvda").backend,
            DiskBackend::Nbd {
                host: "fe80::1".into(),
                port: 10809,
                export: Some("root disk".into())
            }
        );
        assert_eq!(
            disk_err("nbd:host:0,xvda"),
            "line 3: invalid NBD port '0' (expected 1 to 65535)"
        );
        assert_eq!(
            disk_err("nbd:host:+5,xvda"),
            "line 3: invalid NBD port '+5' (expected 1 to 65535)"
        );
        assert!(disk_err("nbd:host,xvda").starts_with("line 3: invalid NBD target 'nbd:host'"));
        assert!(disk_err("nbd::10809,xvda").starts_with("line 3: invalid NBD target"));
        assert!(disk_err("nbd:h:1:export=x,xvda").starts_with("line 3: invalid NBD target"));
    }

    #[test]
    fn relative_paths_resolve_against_base_dir() {
        let mut warnings = Warnings::default();
        let base = Path::new("/etc/tern/guests");
        let d = parse_disk("file:images/a.img,xvda", 1, Some(base), &mut warnings).unwrap();
        assert_eq!(
            d.backend,
            DiskBackend::File("/etc/tern/guests/images/a.img".into())
        );
        let d = parse_disk("phy:/dev/sda,xvda", 1, Some(base), &mut warnings).unwrap();
        assert_eq!(d.backend, DiskBackend::Phy("/dev/sda".into()));
    }

    #[test]
    fn errors() {
        assert_eq!(
            disk_err("phy:/dev/sda"),
            "line 3: disk 'phy:/dev/sda' has no vdev"
        );
        assert_eq!(
            disk_err("phy:/dev/sda,,w"),
            "line 3: disk 'phy:/dev/sda,,w' has no vdev"
        );
        assert_eq!(disk_err(",xvda,w"), "line 3: disk ',xvda,w' has no target");
        assert_eq!(disk_err(""), "line 3: disk '' has no target");
        assert_eq!(
            disk_err("phy:,xvda"),
            "line 3: disk target 'phy:' has no path"
        );
        assert_eq!(
            disk_err("phy:/dev/sda,1xvda"),
            "line 3: invalid disk vdev '1xvda' (expected letters then letters or digits, like xvda)"
        );
        assert_eq!(
            disk_err("phy:/dev/sda,xvda,x"),
            "line 3: invalid disk access 'x' (expected r, ro, w or rw)"
        );
        assert_eq!(
            disk_err("phy:/dev/sda,xvda,w,extra"),
            "line 3: too many fields in disk 'phy:/dev/sda,xvda,w,extra'"
        );
        assert_eq!(
            disk_err("tap:qcow2:/img/a.qcow2,xvda"),
            "line 3: disk format 'qcow2' is not supported by tern (only raw)"
        );
        assert_eq!(
            disk_err("/img/a.qcow2,qcow2,xvda,w"),
            "line 3: disk format 'qcow2' is not supported by tern (only raw)"
        );
        assert_eq!(
            disk_err("iscsi:iqn.2001-05.com.example,xvda"),
            "line 3: disk type 'iscsi:' is not supported by tern (use file:, phy: or nbd:)"
        );
        assert_eq!(
            disk_err("/img/a,xvda,vdev=xvdb"),
            "line 3: disk vdev is given twice"
        );
        assert_eq!(
            disk_err("target=/img/a,xvda"),
            "line 3: disk 'target=/img/a,xvda' has no vdev"
        );
    }

    #[test]
    fn to_xl_reads_back() {
        for spec in [
            phy("/dev/vg/x", "xvda", true),
            file("/img/a,b.img", "xvdb", false),
            file("rel/a.img", "hda", true),
            DiskSpec {
                backend: DiskBackend::Nbd {
                    host: "::1".into(),
                    port: 10809,
                    export: Some("a:b,c".into()),
                },
                vdev: "vda".into(),
                writable: false,
            },
        ] {
            assert_eq!(disk(&disk_to_xl(&spec)), spec);
        }
    }
}
