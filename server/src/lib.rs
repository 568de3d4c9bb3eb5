//! wshd: a WebSocket server that serves compiled handler modules
//! (`*_wsh.so` cdylibs) through a versioned C ABI, with hot reload.
//!
//! # Layout
//! Start reading at [`server::run`]; a connection's path through the code is
//! listener → http → session → instance.
//!
//! * [`cli`], [`config`], [`settings`]: flags, the TOML file, and the
//!   resolved settings (flags override the file).
//! * [`server`]: shared state, the accept loop, startup, signals, shutdown.
//! * [`workers`]: the work-stealing runtime connections run on.
//! * [`http`]: hyper service: 404/426, RFC 6455 handshake checks, Origin,
//!   the handler's handshake hook, the 101 and the upgrade.
//! * [`static_files`]: the document root (`-d`).
//! * [`session`]: one WebSocket connection's loop, close handshake and access
//!   line.
//! * [`routing`]: the route table, swapped atomically on reload.
//! * [`registry`]: loaded versions and instances; reconciles the handler
//!   directory and config into a new route table.
//! * [`scan`]: finds `NAME_wsh.so` files.
//! * [`loader`] + [`elf`]: private copies, ELF checks, `dlopen`, descriptor
//!   validation.
//! * [`instance`]: one `init` of a handler for a route; the only caller of
//!   handler callbacks.
//! * [`host_api`] + [`handshake`]: the function table handlers call.
//! * [`topics`], [`timers`]: host-owned publish/subscribe membership and
//!   handler timers (ABI 1.2).
//! * [`reload`]: notify watcher, debounce, SIGHUP.
//! * [`logging`]: tracing setup and log reopening; [`logsafe`]: escaping
//!   client-controlled values before they are logged.
//!
//! `unsafe` lives only in `loader`, `instance`, `host_api` and `handshake`.

pub mod check;
pub mod cli;
pub mod config;
pub mod elf;
pub mod error;
pub mod handshake;
pub mod host_api;
pub mod http;
pub mod instance;
pub mod loader;
pub mod logging;
pub mod logsafe;
pub mod registry;
pub mod reload;
pub mod routing;
pub mod scan;
pub mod server;
pub mod session;
pub mod settings;
pub mod static_files;
pub mod timers;
pub mod topics;
pub mod workers;
pub mod ws;
