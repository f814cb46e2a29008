//! The two configuration formats of tern.
//!
//! - Guest (domain) configs in Xen's xl.cfg syntax: [`parse_domain_config`],
//!   [`load_domain_config`], and [`DomainConfig::to_xl`] to write one back. Keys tern does not
//!   implement are accepted with a warning, so configs written for Xen keep working.
//! - The daemon's config in TOML: [`parse_daemon_config`], [`load_daemon_config`]. Unknown
//!   keys are errors there.
//!
//! Errors are [`ConfigError`]s whose messages are one line, such as
//! `line 4: expected '=' after 'memory'`.

pub mod daemon;
pub mod error;
pub mod mac;
pub mod xl;

pub use daemon::{
    load_daemon_config, parse_daemon_config, DaemonConfig, HostsAllow, InvalidPattern, PoolConfig,
    RelocationConfig, SandboxConfig, SeccompMode,
};
pub use error::ConfigError;
pub use mac::{MacAddr, MacAddrError};
pub use xl::{
    load_domain_config, parse_domain_config, Action, DiskBackend, DiskSpec, DomainConfig,
    ParsedDomain, UnknownAction, VifSpec,
};
