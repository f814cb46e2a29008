//! The INFO record: what a person or a restoring tern wants to know before reading the rest.

use serde::{Deserialize, Serialize};

/// The body of the INFO record (JSON).
///
/// Unknown fields are ignored when reading, so a later tern can add fields without a new
/// format version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Version of the tern that wrote the checkpoint.
    pub tern_version: String,
    /// When it was written, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// Host name of the machine that wrote it.
    pub host: String,
    pub guest_name: String,
    pub guest_uuid: String,
    /// Guest RAM size in bytes.
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The CPUID words the guest was started with, so a restore can check the new host
    /// offers them.
    pub cpu_features: Vec<CpuFeatureWord>,
}

/// One CPUID leaf/subleaf as the guest saw it: `regs` are EAX, EBX, ECX, EDX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub regs: [u32; 4],
}

impl Info {
    /// Encodes the record body.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// Decodes a record body.
    pub fn from_json(body: &[u8]) -> serde_json::Result<Info> {
        serde_json::from_slice(body)
    }
}
