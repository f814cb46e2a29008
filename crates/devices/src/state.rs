//! Traits for components whose state is captured by a checkpoint or a migration.

use serde::{de::DeserializeOwned, Serialize};

/// Errors while capturing or restoring a component's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode the state of {id}: {reason}")]
    Encode { id: String, reason: String },
    #[error("the saved state of {id} is malformed: {reason}")]
    Decode { id: String, reason: String },
    #[error("the saved state of {id} cannot be applied: {reason}")]
    Apply { id: String, reason: String },
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
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError>;
}

/// Encodes a state struct in the compact binary form used inside checkpoints.
pub fn encode_state<T: Serialize>(id: &str, state: &T) -> Result<Vec<u8>, StateError> {
    postcard::to_allocvec(state).map_err(|e| StateError::Encode {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// Decodes a state struct; trailing bytes are an error (the record length is authoritative).
/// The restore of a device that holds no state: anything but an empty body is not its own.
pub fn expect_no_state(id: &str, bytes: &[u8]) -> Result<(), StateError> {
    if bytes.is_empty() {
        return Ok(());
    }
    Err(StateError::Decode {
        id: id.to_string(),
        reason: format!("expected no state, found {} bytes", bytes.len()),
    })
}

pub fn decode_state<T: DeserializeOwned>(id: &str, bytes: &[u8]) -> Result<T, StateError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| StateError::Decode {
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(StateError::Decode {
            id: id.to_string(),
            reason: format!("{} unexpected trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip() {
        let s = Sample {
            a: 7,
            b: vec![1, 2, 3],
        };
        let bytes = encode_state("x", &s).unwrap();
        assert_eq!(decode_state::<Sample>("x", &bytes).unwrap(), s);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_state("x", &Sample { a: 1, b: vec![] }).unwrap();
        bytes.push(0);
        assert!(decode_state::<Sample>("x", &bytes).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_state::<Sample>("x", &bytes);
        }
    }
}
