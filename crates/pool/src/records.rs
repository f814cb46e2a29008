//! What a pool's records say: a host's, and a guest's ownership record.

use serde::{Deserialize, Serialize};

/// A host as the pool sees it (`hosts/<host>`), written by its daemon at start and whenever
/// its guests change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostRecord {
    pub name: String,
    /// Where other hosts reach its relocation server (`host:port`).
    pub address: String,
    /// Its relocation key (`sha256:…`); `None` when its relocation server is insecure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The memory its guests may have together, MiB.
    pub memory_total_mib: u64,
    /// What of that its guests do not have.
    pub memory_free_mib: u64,
    /// The CPU features its guests get (tern's known names).
    pub cpu_features: Vec<String>,
    pub guests: u32,
    /// What an incoming guest may use there.
    pub admits: Admits,
    /// The tern version of its daemon.
    pub version: String,
}

/// What a host lets an incoming guest use: its `[relocation]` policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Admits {
    /// Whether it takes incoming guests at all (its relocation server runs).
    pub incoming: bool,
    /// Storage paths (files and directories) disks may be on.
    pub storage: Vec<String>,
    /// NBD servers (`host:port`) disks may come from.
    pub nbd_servers: Vec<String>,
    /// Bridges network interfaces may join; `None`: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridges: Option<Vec<String>>,
}

/// A guest's ownership record (`guests/<uuid>`): the one host that may run it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestRecord {
    pub uuid: String,
    pub name: String,
    /// The owner.
    pub host: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The CPU features the guest was given: a host without one of them cannot take it.
    pub cpu_features: Vec<String>,
    pub needs: Needs,
    /// The migration that made `host` the owner, while it may still be undone: cleared when
    /// the guest runs there, or moved back when it did not get there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// What a guest uses that a destination must allow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Needs {
    /// Disk files and devices.
    pub files: Vec<String>,
    /// NBD servers of its disks (`host:port`).
    pub nbd_servers: Vec<String>,
    /// Bridges of its network interfaces.
    pub bridges: Vec<String>,
}

/// An ownership change by a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Handover {
    pub migration_id: String,
    pub from: String,
}

/// Why a host is in maintenance (`maintenance/<host>`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Maintenance {
    pub since_unix_s: u64,
    pub by: String,
}

/// A host's state in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its daemon holds its lease.
    Up,
    /// Up, and no guest is placed on it.
    Maintenance,
    /// Its lease expired: its daemon stopped or cannot reach etcd.
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Maintenance => "maintenance",
            HostState::Down => "down",
        }
    }
}

impl Admits {
    /// Whether a guest needing `needs` may come in; the first thing it may not have.
    pub fn refuses(&self, needs: &Needs) -> Option<String> {
        if !self.incoming {
            return Some("it takes no incoming guests (no relocation server)".into());
        }
        for file in &needs.files {
            let allowed = self.storage.iter().any(|s| {
                let dir = s.trim_end_matches('/');
                file == s || file.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
            });
            if !allowed {
                return Some(format!("disk {file} is outside its storage"));
            }
        }
        for server in &needs.nbd_servers {
            if !self.nbd_servers.contains(server) {
                return Some(format!("NBD server {server} is not one of its nbd_servers"));
            }
        }
        if let Some(bridges) = &self.bridges {
            for bridge in &needs.bridges {
                if !bridges.contains(bridge) {
                    return Some(format!("bridge {bridge} is not one of its bridges"));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_checks_storage_nbd_and_bridges() {
        let admits = Admits {
            incoming: true,
            storage: vec!["/srv/guests".into(), "/dev/vg0/web".into()],
            nbd_servers: vec!["10.0.0.1:10809".into()],
            bridges: Some(vec!["br0".into()]),
        };
        let mut needs = Needs {
            files: vec!["/srv/guests/a.img".into(), "/dev/vg0/web".into()],
            nbd_servers: vec!["10.0.0.1:10809".into()],
            bridges: vec!["br0".into()],
        };
        assert_eq!(admits.refuses(&needs), None);
        needs.files.push("/srv/guestsX/b.img".into());
        assert!(admits
            .refuses(&needs)
            .unwrap()
            .contains("/srv/guestsX/b.img"));
        needs.files.pop();
        needs.bridges.push("br1".into());
        assert!(admits.refuses(&needs).unwrap().contains("br1"));
        let closed = Admits::default();
        assert!(closed.refuses(&Needs::default()).is_some());
    }

    #[test]
    fn records_read_with_later_fields_missing() {
        let g: GuestRecord = serde_json::from_str(r#"{"uuid":"u","host":"h"}"#).unwrap();
        assert_eq!(g.host, "h");
        assert!(g.handover.is_none());
    }
}
