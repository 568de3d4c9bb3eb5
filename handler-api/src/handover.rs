//! Connection handover (ABI 1.2): a connection moves to a new version of its
//! handler at a reload instead of draining. See the "Connection handover"
//! section of [`contract`](crate::contract).

use crate::{Conn, Handler};

/// Lets a reload hand this handler's open connections to the next version
/// (which must implement it too) instead of closing them after
/// `drain_timeout`. Declare it in the export:
/// `export_handler!(Counter, handover)`.
///
/// Model: Erlang/OTP's `code_change`. The old version's [`export`] turns a
/// connection's state into bytes; the new version's [`import`] turns them
/// back into its own state, converting older formats as it goes. An
/// [`import`] that does not know the format returns `Err`: that connection
/// stays on the old version and drains as without handover.
///
/// The moved connection's old state is dropped by the SDK after the move;
/// [`Handler::close`] is not called for it in the old version.
///
/// [`export`]: Handover::export
/// [`import`]: Handover::import
pub trait Handover: Handler {
    /// Serializes one connection's state. Runs between two of its
    /// callbacks; the state stays valid (the move may still fail).
    fn export(&self, state: &Self::ConnState) -> Vec<u8>;

    /// Rebuilds a connection's state from what some version's
    /// [`export`](Handover::export) produced.
    fn import(&self, conn: Conn, data: &[u8]) -> Result<Self::ConnState, String>;
}

/// Serde helpers for [`Handover`] (feature `handover-serde`): state as JSON.
///
/// ```ignore
/// fn export(&self, s: &State) -> Vec<u8> { wshd_handler_api::handover::to_bytes(s) }
/// fn import(&self, _: Conn, b: &[u8]) -> Result<State, String> { wshd_handler_api::handover::from_bytes(b) }
/// ```
#[cfg(feature = "handover-serde")]
mod serde_helpers {
    /// The state as JSON bytes (self-describing, so a later version can
    /// tell formats apart and convert them).
    pub fn to_bytes<T: serde::Serialize>(state: &T) -> Vec<u8> {
        // Serializing plain data to a Vec does not fail; a type whose
        // Serialize impl errors exports nothing, which import refuses.
        serde_json::to_vec(state).unwrap_or_default()
    }

    /// Parses what [`to_bytes`] produced; the error says what did not
    /// match, for the server's log.
    pub fn from_bytes<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, String> {
        serde_json::from_slice(data).map_err(|e| format!("handover state not understood: {e}"))
    }
}
#[cfg(feature = "handover-serde")]
pub use serde_helpers::{from_bytes, to_bytes};
