//! Guest configuration files in Xen's xl.cfg(5) syntax.
//!
//! The syntax is the subset of Python that xl accepts: `key = value` statements ended by a
//! newline or `;`, `#` comments, and values that are quoted strings, integers, or lists of
//! those. tern reads the keys in [`SUPPORTED_KEYS`]; any other key is accepted with a warning,
//! so that a config written for Xen still starts a guest here.

mod disk;
mod lexer;
mod settings;
mod syntax;
mod vif;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{quote, ConfigError};
use crate::mac::MacAddr;
use settings::{Settings, Warnings};

/// The keys tern acts on. Others draw a warning.
pub const SUPPORTED_KEYS: &[&str] = &[
    "name",
    "uuid",
    "memory",
    "vcpus",
    "kernel",
    "ramdisk",
    "cmdline",
    "root",
    "extra",
    "disk",
    "vif",
    "on_poweroff",
    "on_reboot",
    "on_crash",
];

/// Memory size limits in MiB: below 16 no kernel boots, above 1 TiB is surely a typo.
const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=1_048_576;
const DEFAULT_MEMORY_MIB: u64 = 128;
const VCPUS: std::ops::RangeInclusive<u64> = 1..=255;
const NAME_MAX: usize = 64;

/// A guest's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainConfig {
    /// 1 to 64 characters of `[A-Za-z0-9_.-]`, not starting with `-` or `.`.
    pub name: String,
    /// Given with `uuid`; tern makes one up when absent.
    pub uuid: Option<uuid::Uuid>,
    /// Guest RAM (`memory`), 16 to 1048576 MiB; 128 when not given.
    pub memory_mib: u64,
    /// Virtual CPUs (`vcpus`), 1 to 255; 1 when not given.
    pub vcpus: u32,
    /// The kernel to boot directly.
    pub kernel: Option<PathBuf>,
    /// The initial ramdisk.
    pub ramdisk: Option<PathBuf>,
    /// The kernel command line: `cmdline`, or else `root=<root> <extra>` as xl builds it.
    pub cmdline: String,
    /// Block devices, in `disk` order.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in `vif` order.
    pub vifs: Vec<VifSpec>,
    /// What to do when the guest powers off; default destroy.
    pub on_poweroff: Action,
    /// What to do when the guest reboots; default restart.
    pub on_reboot: Action,
    /// What to do when the guest crashes. The default, preserve, differs from xl's destroy
    /// on purpose: a crashed guest stays listed until destroyed, so it can be looked at.
    pub on_crash: Action,
}

/// A guest config and the warnings about what tern ignored in it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedDomain {
    /// The configuration.
    pub config: DomainConfig,
    /// One `line N: ...` message for each ignored key, option or repeated key, in line order.
    pub warnings: Vec<String>,
}

/// What tern does when a guest stops in a given way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Tear the guest down.
    Destroy,
    /// Start it again with the same configuration.
    Restart,
    /// Keep it, stopped, until it is destroyed by hand.
    Preserve,
    /// Rename the old guest (kept as with preserve) and start a new one.
    RenameRestart,
    /// Write a core dump, then destroy.
    CoredumpDestroy,
    /// Write a core dump, then restart.
    CoredumpRestart,
}

/// One block device of a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Where the data is.
    pub backend: DiskBackend,
    /// The device name the guest sees, such as `xvda`.
    pub vdev: String,
    /// Whether the guest may write to it.
    pub writable: bool,
}

/// Where a guest disk's data is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskBackend {
    /// A raw image file.
    File(PathBuf),
    /// A host block device.
    Phy(PathBuf),
    /// An export of an NBD server.
    Nbd {
        /// Host name or address (an IPv6 address without brackets).
        host: String,
        /// TCP port, never 0.
        port: u16,
        /// The export name, or the server's default export.
        export: Option<String>,
    },
}

/// One network interface of a guest. Unset fields take tern's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VifSpec {
    /// The guest's MAC address.
    pub mac: Option<MacAddr>,
    /// The host bridge to attach to.
    pub bridge: Option<String>,
    /// The address(es) the guest may use, as given.
    pub ip: Option<String>,
    /// The emulated NIC model.
    pub model: Option<String>,
}

/// Parses an xl.cfg text. Relative `kernel`, `ramdisk` and disk paths are resolved against
/// `base_dir` (the config file's directory) when given.
pub fn parse_domain_config(
    text: &str,
    base_dir: Option<&Path>,
) -> Result<ParsedDomain, ConfigError> {
    let mut warnings = Warnings::default();
    let settings = Settings::new(syntax::parse(text)?, &mut warnings);
    settings.warn_unsupported(SUPPORTED_KEYS, &mut warnings);
    let config = build(&settings, base_dir, &mut warnings)?;
    Ok(ParsedDomain {
        config,
        warnings: warnings.into_messages(),
    })
}

/// Reads and parses the xl.cfg file at `path`, resolving relative paths in it against its
/// directory. Errors start with `path`.
pub fn load_domain_config(path: &Path) -> Result<ParsedDomain, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_domain_config(&text, path.parent()).map_err(|e| e.in_file(path))
}

fn build(
    settings: &Settings,
    base_dir: Option<&Path>,
    warnings: &mut Warnings,
) -> Result<DomainConfig, ConfigError> {
    Ok(DomainConfig {
        name: name(settings)?,
        uuid: uuid(settings)?,
        memory_mib: settings
            .number("memory", MEMORY_MIB, " MiB")?
            .unwrap_or(DEFAULT_MEMORY_MIB),
        vcpus: vcpus(settings)?,
        kernel: path(settings, "kernel", base_dir)?,
        ramdisk: path(settings, "ramdisk", base_dir)?,
        cmdline: cmdline(settings, warnings)?,
        disks: disks(settings, base_dir, warnings)?,
        vifs: settings
            .list("vif")
            .iter()
            .map(|item| vif::parse_vif(&item.text, item.line, warnings))
            .collect::<Result<_, _>>()?,
        on_poweroff: action(settings, "on_poweroff", Action::Destroy)?,
        on_reboot: action(settings, "on_reboot", Action::Restart)?,
        on_crash: action(settings, "on_crash", Action::Preserve)?,
    })
}

fn name(settings: &Settings) -> Result<String, ConfigError> {
    let scalar = settings
        .scalar("name")?
        .ok_or(ConfigError::Missing { key: "name" })?;
    let name = &scalar.text;
    if is_valid_name(name) {
        Ok(name.clone())
    } else {
        Err(ConfigError::at(
            scalar.line,
            format!(
                "invalid name {}: use 1 to {NAME_MAX} of A-Z a-z 0-9 _ . - and do not start with '-' or '.'",
                quote(name)
            ),
        ))
    }
}

/// Names end up in file names and on command lines, hence the narrow character set and the
/// rule against a leading `-` (an option) or `.` (hidden, or `..`).
fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn uuid(settings: &Settings) -> Result<Option<uuid::Uuid>, ConfigError> {
    let Some(scalar) = settings.scalar("uuid")? else {
        return Ok(None);
    };
    uuid::Uuid::parse_str(scalar.text.trim())
        .map(Some)
        .map_err(|_| ConfigError::at(scalar.line, format!("invalid uuid {}", quote(&scalar.text))))
}

fn vcpus(settings: &Settings) -> Result<u32, ConfigError> {
    let Some(n) = settings.number("vcpus", VCPUS, "")? else {
        return Ok(1);
    };
    // The range check above keeps n far below u32::MAX.
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

fn path(
    settings: &Settings,
    key: &str,
    base_dir: Option<&Path>,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(scalar) = settings.scalar(key)? else {
        return Ok(None);
    };
    if scalar.text.is_empty() {
        return Err(ConfigError::at(
            scalar.line,
            format!("'{key}' must not be empty"),
        ));
    }
    Ok(Some(resolve(Path::new(&scalar.text), base_dir)))
}

/// `path`, taken relative to `base_dir` if it is relative and a base is given.
fn resolve(path: &Path, base_dir: Option<&Path>) -> PathBuf {
    match base_dir {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// The command line the way xl builds it: `cmdline` wins; otherwise `root=<root>` followed by
/// `extra`; otherwise `extra` alone.
fn cmdline(settings: &Settings, warnings: &mut Warnings) -> Result<String, ConfigError> {
    let root = settings.scalar("root")?.map(|s| s.text.as_str());
    let extra = settings.scalar("extra")?.map(|s| s.text.as_str());
    if let Some(cmdline) = settings.scalar("cmdline")? {
        if root.is_some() || extra.is_some() {
            warnings.push(
                cmdline.line,
                "'root' and 'extra' are ignored because 'cmdline' is given",
            );
        }
        return Ok(cmdline.text.clone());
    }
    Ok(match (root, extra) {
        (Some(root), Some(extra)) if !extra.is_empty() => format!("root={root} {extra}"),
        (Some(root), _) => format!("root={root}"),
        (None, extra) => extra.unwrap_or_default().to_string(),
    })
}

fn disks(
    settings: &Settings,
    base_dir: Option<&Path>,
    warnings: &mut Warnings,
) -> Result<Vec<DiskSpec>, ConfigError> {
    let mut disks = Vec::new();
    let mut vdevs = HashSet::new();
    for item in settings.list("disk") {
        let disk = disk::parse_disk(&item.text, item.line, base_dir, warnings)?;
        // Two disks on one vdev would leave the guest seeing only one of them.
        if !vdevs.insert(disk.vdev.clone()) {
            return Err(ConfigError::at(
                item.line,
                format!("disk vdev '{}' is used twice", disk.vdev),
            ));
        }
        disks.push(disk);
    }
    Ok(disks)
}

fn action(settings: &Settings, key: &str, default: Action) -> Result<Action, ConfigError> {
    let Some(scalar) = settings.scalar(key)? else {
        return Ok(default);
    };
    scalar.text.parse().map_err(|_| {
        ConfigError::at(
            scalar.line,
            format!(
                "invalid {key} action {} (expected destroy, restart, preserve, rename-restart, coredump-destroy or coredump-restart)",
                quote(&scalar.text)
            ),
        )
    })
}

impl Action {
    /// The name xl.cfg uses, such as `rename-restart`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Destroy => "destroy",
            Action::Restart => "restart",
            Action::Preserve => "preserve",
            Action::RenameRestart => "rename-restart",
            Action::CoredumpDestroy => "coredump-destroy",
            Action::CoredumpRestart => "coredump-restart",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown [`Action`] name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const ALL: [Action; 6] = [
            Action::Destroy,
            Action::Restart,
            Action::Preserve,
            Action::RenameRestart,
            Action::CoredumpDestroy,
            Action::CoredumpRestart,
        ];
        ALL.into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_string()))
    }
}

impl DomainConfig {
    /// An xl.cfg text that [`parse_domain_config`] reads back as `self` (given no base
    /// directory, so relative paths stay relative). Every field is written, defaults included,
    /// so the text does not depend on tern's defaults.
    pub fn to_xl(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| {
            out.push_str(key);
            out.push_str(" = ");
            out.push_str(&value);
            out.push('\n');
        };
        line("name", xl_string(&self.name));
        if let Some(uuid) = &self.uuid {
            line("uuid", xl_string(&uuid.hyphenated().to_string()));
        }
        line("memory", self.memory_mib.to_string());
        line("vcpus", self.vcpus.to_string());
        if let Some(kernel) = &self.kernel {
            line("kernel", xl_string(&kernel.to_string_lossy()));
        }
        if let Some(ramdisk) = &self.ramdisk {
            line("ramdisk", xl_string(&ramdisk.to_string_lossy()));
        }
        if !self.cmdline.is_empty() {
            line("cmdline", xl_string(&self.cmdline));
        }
        if !self.disks.is_empty() {
            line("disk", xl_list(self.disks.iter().map(disk::disk_to_xl)));
        }
        if !self.vifs.is_empty() {
            line("vif", xl_list(self.vifs.iter().map(vif::vif_to_xl)));
        }
        line("on_poweroff", xl_string(self.on_poweroff.as_str()));
        line("on_reboot", xl_string(self.on_reboot.as_str()));
        line("on_crash", xl_string(self.on_crash.as_str()));
        out
    }
}

/// A double-quoted string literal that the lexer reads back as `s`.
fn xl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A list literal, one item per line.
fn xl_list(items: impl Iterator<Item = String>) -> String {
    let mut out = String::from("[\n");
    for item in items {
        out.push_str("    ");
        out.push_str(&xl_string(&item));
        out.push_str(",\n");
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ParsedDomain {
        parse_domain_config(text, None).unwrap()
    }

    fn err(text: &str) -> String {
        parse_domain_config(text, None).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let p = parse("name = 'g'\n");
        assert_eq!(
            p.config,
            DomainConfig {
                name: "g".into(),
                uuid: None,
                memory_mib: 128,
                vcpus: 1,
                kernel: None,
                ramdisk: None,
                cmdline: String::new(),
                disks: vec![],
                vifs: vec![],
                on_poweroff: Action::Destroy,
                on_reboot: Action::Restart,
                on_crash: Action::Preserve,
            }
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn names() {
        for good in [
            "a",
            "TestGuest",
            "web-01.example_2",
            &"x".repeat(64),
            "1234",
        ] {
            assert_eq!(parse(&format!("name = '{good}'")).config.name, good);
        }
        assert_eq!(parse("name = 1234").config.name, "1234");
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"x".repeat(65)] {
            let e = err(&format!("\nname = '{bad}'"));
            assert!(e.starts_with("line 2: invalid name "), "{e}");
        }
        assert_eq!(err("memory = 64"), "missing 'name'");
        assert_eq!(err(""), "missing 'name'");
        assert_eq!(
            err("name = ['a']"),
            "line 1: 'name' must be a single value, not a list"
        );
    }

    #[test]
    fn memory_and_vcpus() {
        let c = parse("name='g'\nmemory=\"64\"\nvcpus=0x4").config;
        assert_eq!((c.memory_mib, c.vcpus), (64, 4));
        assert_eq!(
            err("name='g'\nmemory = 8"),
            "line 2: memory must be between 16 and 1048576 MiB, got 8"
        );
        assert_eq!(
            err("name='g'\nmemory = '1048577'"),
            "line 2: memory must be between 16 and 1048576 MiB, got 1048577"
        );
        assert_eq!(
            err("name='g'\nmemory = 'lots'"),
            "line 2: memory must be a number, got 'lots'"
        );
        assert_eq!(
            err("name='g'\nvcpus = 0"),
            "line 2: vcpus must be between 1 and 255, got 0"
        );
        assert_eq!(
            err("name='g'\nvcpus = 256"),
            "line 2: vcpus must be between 1 and 255, got 256"
        );
    }

    #[test]
    fn uuid_values() {
        let c = parse("name='g'\nuuid = 'cc0029f5-10a1-e6d0-3c92-19b0ea021f21'").config;
        assert_eq!(
            c.uuid.unwrap().to_string(),
            "cc0029f5-10a1-e6d0-3c92-19b0ea021f21"
        );
        assert_eq!(
            err("name='g'\nuuid = 'cc0029f5-10a1-e6d0-3c92'"),
            "line 2: invalid uuid 'cc0029f5-10a1-e6d0-3c92'"
        );
    }

    #[test]
    fn actions() {
        let c = parse(
            "name='g'\non_poweroff='preserve'\non_reboot='rename-restart'\non_crash='coredump-restart'",
        )
        .config;
        assert_eq!(c.on_poweroff, Action::Preserve);
        assert_eq!(c.on_reboot, Action::RenameRestart);
        assert_eq!(c.on_crash, Action::CoredumpRestart);
        assert_eq!(
            err("name='g'\n\non_crash = 'explode'"),
            "line 3: invalid on_crash action 'explode' (expected destroy, restart, preserve, rename-restart, coredump-destroy or coredump-restart)"
        );
        for a in [Action::CoredumpDestroy, Action::Destroy, Action::Restart] {
            assert_eq!(a.to_string().parse::<Action>(), Ok(a));
        }
    }

    #[test]
    fn cmdline_as_xl_builds_it() {
        let cmd = |text: &str| parse(&format!("name='g'\n{text}")).config.cmdline;
        assert_eq!(cmd(""), "");
        assert_eq!(cmd("extra='console=hvc0'"), "console=hvc0");
        assert_eq!(cmd("root='/dev/xvda1'"), "root=/dev/xvda1");
        assert_eq!(
            cmd("root='/dev/xvda1'\nextra='ro quiet'"),
            "root=/dev/xvda1 ro quiet"
        );
        let p = parse("name='g'\nroot='/dev/a'\ncmdline='console=ttyS0'");
        assert_eq!(p.config.cmdline, "console=ttyS0");
        assert_eq!(
            p.warnings,
            vec!["line 3: 'root' and 'extra' are ignored because 'cmdline' is given"]
        );
    }

    #[test]
    fn relative_paths_use_base_dir() {
        let text =
            "name='g'\nkernel='vmlinuz'\nramdisk='/boot/initrd'\ndisk=['file:disk.img,xvda']";
        let c = parse_domain_config(text, Some(Path::new("/etc/tern")))
            .unwrap()
            .config;
        assert_eq!(c.kernel, Some(PathBuf::from("/etc/tern/vmlinuz")));
        assert_eq!(c.ramdisk, Some(PathBuf::from("/boot/initrd")));
        assert_eq!(
            c.disks[0].backend,
            DiskBackend::File("/etc/tern/disk.img".into())
        );
        let c = parse(text).config;
        assert_eq!(c.kernel, Some(PathBuf::from("vmlinuz")));
        assert_eq!(
            err("name='g'\nkernel=''"),
            "line 2: 'kernel' must not be empty"
        );
    }

    #[test]
    fn duplicate_vdev_is_an_error() {
        assert_eq!(
            err("name='g'\ndisk=['phy:/dev/a,xvda',\n 'phy:/dev/b,xvda']"),
            "line 3: disk vdev 'xvda' is used twice"
        );
    }

    #[test]
    fn warnings_in_line_order() {
        let p = parse("vnc=1; sdl=0\nname='g'\nname='h'\nvif=['script=x']\npae=1");
        assert_eq!(
            p.warnings,
            vec![
                "line 1: 'vnc' is not supported by tern and is ignored",
                "line 1: 'sdl' is not supported by tern and is ignored",
                "line 3: 'name' is set again; the value on line 2 is ignored",
                "line 4: vif option 'script' is not supported by tern and is ignored",
                "line 5: 'pae' is not supported by tern and is ignored",
            ]
        );
        assert_eq!(p.config.name, "h");
    }

    #[test]
    fn single_string_is_a_one_item_list() {
        let c = parse("name='g'\ndisk='phy:/dev/a,xvda'\nvif=''").config;
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.vifs, vec![VifSpec::default()]);
    }

    #[test]
    fn to_xl_round_trip() {
        let text = r#"
name = "rt"
uuid = "cc0029f5-10a1-e6d0-3c92-19b0ea021f21"
memory = 0x100
vcpus = 4
kernel = "/boot/vm \"linuz\""
ramdisk = "rel/initrd"
root = "/dev/xvda1"
extra = "console=hvc0\tquiet\\"
disk = [ 'phy:/dev/vg/rt,xvda,w', 'file:/img/a.img,xvdb,r',
         'vdev=xvdc, target=/img/comma,name.img', 'nbd:[::1]:10809:exportname=x,xvdd' ]
vif = [ 'mac=00:16:3e:55:9d:b0, bridge=xenbr0, model=virtio', '' ]
on_poweroff = 'preserve'
on_reboot = 'rename-restart'
on_crash = 'coredump-destroy'
"#;
        let c = parse(text).config;
        let written = c.to_xl();
        let again = parse_domain_config(&written, None).unwrap();
        assert_eq!(again.config, c, "{written}");
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    }
}
