//! The CLI ↔ daemon API.

use serde::{Deserialize, Serialize};

/// A request from `tern` to the daemon. Domains are named by name or numeric ID.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    /// Create a guest from a parsed config (as JSON, see tern-config's `DomainConfig`).
    Create {
        config: serde_json::Value,
        paused: bool,
    },
    Console {
        domain: String,
        dump: bool,
        timestamps: bool,
    },
    Pause {
        domain: String,
    },
    Unpause {
        domain: String,
    },
    Shutdown {
        domain: String,
        wait: bool,
    },
    Destroy {
        domain: String,
    },
    /// Write the guest's state to `path` (absolute); the guest ends unless `keep_running`.
    Save {
        domain: String,
        path: String,
        keep_running: bool,
    },
    /// Bring a guest back from a checkpoint (absolute `path`). `copy` loads all memory
    /// before the guest runs instead of on demand.
    Restore {
        path: String,
        paused: bool,
        copy: bool,
    },
}

/// One message from the daemon. A request gets any number of `Warning`s and `Progress`es,
/// then exactly one `Ok` or `Error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        #[serde(default)]
        data: serde_json::Value,
    },
    Error {
        message: String,
    },
    Warning {
        message: String,
    },
    Progress {
        data: serde_json::Value,
    },
}

impl Reply {
    /// An `Ok` carrying `data`.
    pub fn ok<T: Serialize>(data: &T) -> Reply {
        Reply::Ok {
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    /// An `Error` with `message`.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
        }
    }
}

/// A domain's state as `tern list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Its vCPUs are busy.
    Running,
    /// Its vCPUs are mostly idle (halted, waiting for an interrupt).
    Blocked,
    Paused,
    /// It powered off and is kept (on_poweroff = "preserve").
    Shutdown,
    /// It crashed, or its process died; kept until destroyed.
    Crashed,
}

impl DomainState {
    /// The word `tern list` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "shutdown",
            DomainState::Crashed => "crashed",
        }
    }
}

/// One row of `tern list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub id: u32,
    pub uuid: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub state: DomainState,
    pub cpu_time_s: f64,
}

/// What a save did (the summary `tern save` prints).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SaveSummary {
    pub path: String,
    pub file_bytes: u64,
    pub memory_bytes: u64,
    /// Guest pages written (pages never touched or all zero are not stored).
    pub pages_stored: u64,
    /// From the pause to the last byte handed to the kernel.
    pub write_seconds: f64,
    /// Including fsync and rename: the file is durable and complete.
    pub total_seconds: f64,
    pub kept_running: bool,
    /// Where the time went (seconds): capturing device and CPU state, finding the pages to
    /// store, writing them.
    #[serde(default)]
    pub phases: SavePhases,
}

/// Time spent in each phase of a save, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavePhases {
    pub capture: f64,
    pub scan: f64,
    pub write: f64,
    pub fsync: f64,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub id: u32,
    pub name: String,
    pub uuid: String,
    /// "lazy" or "copy".
    pub mode: String,
    /// From the start of the guest process until its vCPUs ran (or were ready, if paused).
    pub running_after_ms: f64,
    /// Until every page of the checkpoint was verified and in memory.
    pub loaded_after_ms: f64,
    pub pages_loaded: u64,
}

/// Progress of a long operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::Pause {
            domain: "g1".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"pause","domain":"g1"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::ok(&vec![1]);
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), r);
    }
}
