//! The wshd handler ABI and the Rust SDK for writing handlers.
//!
//! wshd serves WebSocket routes with *handler libraries*: shared objects
//! named `NAME_wsh` that export one C function, `wshd_entry_v1`, returning a
//! static descriptor of callbacks. The contract is the C header
//! `include/wshd_handler.h`; C handlers include it directly. This crate
//! mirrors it in Rust ([`abi`]) and wraps it in a safe API, so a Rust handler
//! is a type implementing [`Handler`] plus one line of
//! [`export_handler!`]; its author never writes `unsafe`.
//!
//! # Layout
//!
//! Each module uses only the ones listed before it (no cycle:
//! `scripts/module-cycles.py handler-api/src` checks it in CI).
//!
//! * [`abi`]: the raw `#[repr(C)]` mirror of the header, no logic. The server
//!   uses it to load handlers; `tests/layout.rs` checks it against a C
//!   compiler.
//! * `raw.rs`: the host as the ABI gives it: null-safe views of borrowed
//!   arguments, the host's function table and the handshake builder. The
//!   only other code that touches raw pointers besides `glue.rs`.
//! * [`Message`] (`message.rs`): what the trait and the host calls share.
//! * `logging.rs`: forwards `log` records, `tracing` events and panic
//!   messages to the server's log.
//! * [`Host`], [`Conn`], [`SendError`] (`host.rs`): thread-safe handles for
//!   talking back to the server: send, broadcast, ping, close, log.
//! * [`Handler`] (`handler.rs`): the trait, with the handshake views
//!   [`HandshakeRequest`] and [`HandshakeResponse`].
//! * [`Host`], [`Conn`], [`SendError`] (`host.rs`): thread-safe handles for
//!   talking back to the server: send, broadcast, ping, close, log.
//! * [`export_handler!`] (`export.rs`): writes the exported entry point.
//! * `glue.rs` (hidden): the generic `extern "C"` trampolines. They catch
//!   panics and map results to status codes.
//! * [`rules`]: the handshake and descriptor rules every host applies (the
//!   server and the `testing` fake host share them): caps, refused headers,
//!   the handshake answer's state machine.
//! * `testing` (with the `testing` feature): a fake host to unit-test a handler
//!   through the real trampolines, without a server.
//! * [`contract`]: the ownership, threading and versioning rules.
//!
//! # Example
//!
//! A complete echo handler. Build it as a `cdylib` whose library name ends
//! in `_wsh` (here `echo_wsh`, so the server loads `libecho_wsh.so` for the
//! handler named `echo`):
//!
//! ```
//! use wshd_handler_api::{Conn, Handler, Host, Message, export_handler};
//!
//! pub struct Echo;
//!
//! impl Handler for Echo {
//!     type ConnState = ();
//!
//!     fn init(_host: Host, _config: &str) -> Result<Self, String> {
//!         Ok(Echo)
//!     }
//!
//!     fn open(&self, _conn: Conn) -> Result<(), String> {
//!         Ok(())
//!     }
//!
//!     fn message(&self, _state: &mut (), conn: Conn, msg: Message<'_>) -> Result<(), String> {
//!         conn.send(msg).map_err(|e| e.to_string())
//!     }
//! }
//!
//! export_handler!(Echo);
//! ```
//!
//! with, in `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! name = "echo_wsh"
//! crate-type = ["cdylib", "rlib"]   # rlib so unit tests can link it
//!
//! [dependencies]
//! wshd-handler-api = "0.1"
//!
//! [dev-dependencies]
//! wshd-handler-api = { version = "0.1", features = ["testing"] }
//! ```
//!
//! Handlers log with the re-exported [`log`] and [`tracing`] macros; both
//! reach the server's log. Build handlers with `panic = "unwind"` (the
//! default): the export macro refuses `panic = "abort"`.
#![warn(missing_docs)]
#![allow(non_camel_case_types)]

#[allow(unsafe_code)]
pub mod abi;
mod export;
#[doc(hidden)]
pub mod glue;
mod handler;
pub mod handover;
mod host;
mod logging;
mod message;
mod raw;
pub mod rules;
#[cfg(feature = "testing")]
pub mod testing;

pub mod contract {
    #![doc = include_str!("../docs/abi.md")]
}

pub use handler::{
    Handler, HandshakeRequest, HandshakeResponse, Header, Headers, Message, Subprotocols,
};
pub use handover::Handover;
pub use host::{Conn, Host, SendError};
/// The `log` crate the SDK forwards to the server; use its macros.
pub use log;
/// The `tracing` crate; with no subscriber in a handler library its events
/// become `log` records, so they reach the server's log too.
pub use tracing;
