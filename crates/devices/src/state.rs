//! Traits for components whose state is captured by a checkpoint or a migration, and the
//! encoding of their state records.
//!
//! Formats are contracts between builds of tern: a checkpoint written by the previous release
//! must restore, and a migration from it must be accepted. So every component's state is a
//! record that carries its own version and names its fields:
//!
//! * [`StateEncoding::Versioned`] (stream format 2, tern 0.2 on): a CBOR map
//!   `{"v": version, "state": {field: value, ...}}`. A field added later has a serde default,
//!   so a reader fills it in for a record of the previous version; unknown fields are ignored.
//!   A reader accepts versions [`VersionedState::OLDEST`] to [`VersionedState::VERSION`] and
//!   refuses others, naming both its own range and the record's version.
//! * [`StateEncoding::Positional`] (stream format 1, tern 0.1): postcard, whose fields are
//!   positional. Kept for reading only, so that tern 0.1's checkpoints restore; it decodes
//!   with the version-1 layout of each state.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// This build's version, as messages name it.
pub const TERN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors while capturing or restoring a component's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode the state of {id}: {reason}")]
    Encode { id: String, reason: String },
    #[error("the saved state of {id} is malformed: {reason}")]
    Decode { id: String, reason: String },
    #[error("the saved state of {id} cannot be applied: {reason}")]
    Apply { id: String, reason: String },
    #[error(
        "{id}: {kind} state version {found} is {relation} than tern {ours} reads (versions {oldest} to {newest})",
        ours = TERN_VERSION,
        relation = if found > newest { "newer" } else { "older" }
    )]
    Version {
        id: String,
        kind: &'static str,
        found: u16,
        oldest: u16,
        newest: u16,
    },
}

/// How the state records of a checkpoint or stream are encoded; follows from its format
/// version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateEncoding {
    /// tern 0.1 (format 1): postcard, version-1 layouts.
    Positional,
    /// tern 0.2 on (format 2): versioned CBOR maps.
    Versioned,
}

impl StateEncoding {
    /// The encoding of stream/checkpoint format `format`, if this build reads it.
    pub fn of_format(format: u32) -> Option<StateEncoding> {
        match format {
            1 => Some(StateEncoding::Positional),
            2 => Some(StateEncoding::Versioned),
            _ => None,
        }
    }
}

/// One component's saved state as it came from a checkpoint or a stream: opaque bytes and
/// how to read them.
#[derive(Clone, Copy, Debug)]
pub struct SavedState<'a> {
    pub encoding: StateEncoding,
    pub bytes: &'a [u8],
}

impl<'a> SavedState<'a> {
    /// State this build wrote.
    pub fn current(bytes: &'a [u8]) -> Self {
        SavedState {
            encoding: StateEncoding::Versioned,
            bytes,
        }
    }

    /// State read from a source of `encoding`.
    pub fn new(encoding: StateEncoding, bytes: &'a [u8]) -> Self {
        SavedState { encoding, bytes }
    }
}

/// A state struct with a version of its own.
///
/// Changing a state: add fields only, each `#[serde(default)]` (the value a record of the
/// previous version implies), and raise `VERSION`. Never remove or retype a field a supported
/// version has; drop it only once no supported version has it.
pub trait VersionedState: Serialize + DeserializeOwned {
    /// What the state is of, for messages ("vCPU", "virtio transport").
    const KIND: &'static str;
    /// The version this build writes.
    const VERSION: u16;
    /// The oldest version this build reads: its own and the previous one.
    const OLDEST: u16 = if Self::VERSION > 1 {
        Self::VERSION - 1
    } else {
        1
    };
}

/// A component that can be stopped and started again without losing work in flight.
///
/// Passive devices have nothing to do; devices with worker threads (virtio back-ends) stop
/// touching guest memory and queues while paused.
pub trait Pausable {
    /// Stops all activity that could change guest memory or device state.
    fn pause(&mut self) {}
    /// Starts it again.
    fn resume(&mut self) {}
}

/// A component whose state can be captured as bytes and put back.
///
/// The bytes are opaque to the checkpoint and migration code, which only stores them under
/// [`Snapshottable::snapshot_id`].
pub trait Snapshottable {
    /// Stable name of this component inside a machine ("serial0", "vcpu1", ...).
    fn snapshot_id(&self) -> String;
    /// Captures the current state.
    fn snapshot(&self) -> Result<Vec<u8>, StateError>;
    /// Replaces the current state with a captured one.
    fn restore(&mut self, saved: SavedState<'_>) -> Result<(), StateError>;
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u16,
    state: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeVersion {
    v: u16,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    state: T,
}

/// Encodes a state as a versioned record (the form this build writes).
pub fn encode_state<T: VersionedState>(id: &str, state: &T) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::with_capacity(256);
    let envelope = EnvelopeOut {
        v: T::VERSION,
        state,
    };
    ciborium::into_writer(&envelope, &mut out).map_err(|e| StateError::Encode {
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// The restore of a device that holds no state: anything but an empty body is not its own.
pub fn expect_no_state(id: &str, saved: SavedState<'_>) -> Result<(), StateError> {
    if saved.bytes.is_empty() {
        return Ok(());
    }
    Err(StateError::Decode {
        id: id.to_string(),
        reason: format!("expected no state, found {} bytes", saved.bytes.len()),
    })
}

/// Decodes a saved state; trailing bytes are an error (the record length is authoritative),
/// and so is a version this build does not read.
pub fn decode_state<T: VersionedState>(id: &str, saved: SavedState<'_>) -> Result<T, StateError> {
    let malformed = |reason: String| StateError::Decode {
        id: id.to_string(),
        reason,
    };
    match saved.encoding {
        StateEncoding::Positional => {
            let (value, rest) =
                postcard::take_from_bytes(saved.bytes).map_err(|e| malformed(e.to_string()))?;
            if !rest.is_empty() {
                return Err(malformed(format!(
                    "{} unexpected trailing bytes",
                    rest.len()
                )));
            }
            Ok(value)
        }
        StateEncoding::Versioned => {
            let version: EnvelopeVersion = read_whole(saved.bytes).map_err(malformed)?;
            if !(T::OLDEST..=T::VERSION).contains(&version.v) {
                return Err(StateError::Version {
                    id: id.to_string(),
                    kind: T::KIND,
                    found: version.v,
                    oldest: T::OLDEST,
                    newest: T::VERSION,
                });
            }
            let envelope: EnvelopeIn<T> = read_whole(saved.bytes).map_err(malformed)?;
            Ok(envelope.state)
        }
    }
}

/// Decodes one CBOR item that must span all of `bytes`.
fn read_whole<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut reader = std::io::Cursor::new(bytes);
    let value = ciborium::from_reader(&mut reader).map_err(|e| e.to_string())?;
    let rest = bytes.len() as u64 - reader.position();
    if rest != 0 {
        return Err(format!("{rest} unexpected trailing bytes"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
    }

    impl VersionedState for Sample {
        const KIND: &'static str = "sample";
        const VERSION: u16 = 1;
    }

    /// `Sample` as a later build has it: one field more.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct SampleV2 {
        a: u32,
        b: Vec<u8>,
        #[serde(default = "default_c")]
        c: u64,
    }

    fn default_c() -> u64 {
        42
    }

    impl VersionedState for SampleV2 {
        const KIND: &'static str = "sample";
        const VERSION: u16 = 2;
    }

    /// Two versions past `Sample`.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct SampleV3 {
        a: u32,
    }

    impl VersionedState for SampleV3 {
        const KIND: &'static str = "sample";
        const VERSION: u16 = 3;
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            b: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode_state("x", &sample()).unwrap();
        assert_eq!(
            decode_state::<Sample>("x", SavedState::current(&bytes)).unwrap(),
            sample()
        );
    }

    #[test]
    fn the_previous_version_reads_with_defaults_for_new_fields() {
        let bytes = encode_state("x", &sample()).unwrap();
        let read: SampleV2 = decode_state("x", SavedState::current(&bytes)).unwrap();
        assert_eq!(
            read,
            SampleV2 {
                a: 7,
                b: vec![1, 2, 3],
                c: 42
            }
        );
    }

    #[test]
    fn newer_and_older_versions_are_refused_naming_both() {
        let newer = encode_state(
            "x",
            &SampleV2 {
                a: 1,
                b: vec![],
                c: 5,
            },
        )
        .unwrap();
        let e = decode_state::<Sample>("x", SavedState::current(&newer)).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("x: sample state version 2 is newer than tern"),
            "{message}"
        );
        assert!(
            message.contains(TERN_VERSION) && message.contains("versions 1 to 1"),
            "{message}"
        );

        let older = encode_state("x", &sample()).unwrap();
        let e = decode_state::<SampleV3>("x", SavedState::current(&older)).unwrap_err();
        assert!(
            e.to_string().contains("version 1 is older than tern"),
            "{e}"
        );
        assert!(e.to_string().contains("versions 2 to 3"), "{e}");
    }

    #[test]
    fn tern_0_1_positional_state_decodes() {
        let bytes = postcard::to_allocvec(&sample()).unwrap();
        let saved = SavedState::new(StateEncoding::Positional, &bytes);
        assert_eq!(decode_state::<Sample>("x", saved).unwrap(), sample());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for encoding in [StateEncoding::Positional, StateEncoding::Versioned] {
            let mut bytes = match encoding {
                StateEncoding::Positional => postcard::to_allocvec(&sample()).unwrap(),
                StateEncoding::Versioned => encode_state("x", &sample()).unwrap(),
            };
            bytes.push(0);
            let saved = SavedState::new(encoding, &bytes);
            assert!(decode_state::<Sample>("x", saved).is_err(), "{encoding:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..256 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            for encoding in [StateEncoding::Positional, StateEncoding::Versioned] {
                let _ = decode_state::<Sample>("x", SavedState::new(encoding, &bytes));
            }
        }
    }
}
