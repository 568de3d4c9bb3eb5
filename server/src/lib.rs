//! wshd: a WebSocket server that serves compiled handler modules
//! (`*_wsh.so` cdylibs) through a versioned C ABI, with hot reload.
//!
//! # Layout
//! Start reading at [`server::run`] (the process around it is
//! [`server::process`]); a connection's path through the code is
//! [`server::listener`] → http → session → instance.
//!
//! * [`cli`], [`config`], [`settings`]: flags, the TOML file, and the
//!   resolved settings (flags override the file).
//! * [`server`]: shared state, startup and shutdown ([`server::run`], which
//!   takes its reload triggers and shutdown as values);
//!   [`server::listener`]: the accept loop, 429/503 for the excess;
//!   [`server::per_ip`]: per-address caps; [`server::process`],
//!   [`server::signals`], [`server::pidfile`], [`server::fdlimit`]: the
//!   process around it (signals, pid/addr files, sd_notify, descriptors).
//! * [`workers`]: the work-stealing runtime connections run on.
//! * [`http`]: hyper service: 404/426, RFC 6455 handshake checks, Origin,
//!   the handler's handshake hook, the 101 and the upgrade.
//! * [`static_files`]: the document root (`-d`).
//! * [`write_deadline`]: ends an HTTP connection whose peer stops reading.
//! * [`session`]: one WebSocket connection as a state machine (open,
//!   draining, closing, done): its events, close handshake and access line;
//!   [`ws`]: wshd's own frame codec over its socket (per-worker read
//!   buffer, zero-copy payloads, vectored writes); [`direct`]: topic
//!   messages written by the publisher to idle subscribers' sockets;
//!   [`budget`]: the
//!   server-wide budget for unfinished incoming messages; [`deflate`]:
//!   permessage-deflate (RFC 7692) negotiation, compression and inflation.
//! * [`routing`]: the route table, swapped atomically on reload.
//! * [`registry`]: loaded versions and instances; reconciles the handler
//!   directory and config into a new route table.
//! * [`rollout`]: canary/rollback/quarantine state machine per route, and
//!   each instance's fault counters.
//! * [`status`]: the `--list` table, and the live copy a running server
//!   writes to `status_file`.
//! * [`scan`]: finds `NAME_wsh.so` files.
//! * [`loader`] + [`elf`]: sealed memfds (or a private fallback directory),
//!   ELF checks, `dlopen`, descriptor validation.
//! * [`trust`]: StrictModes-like owner/mode checks of handler files and
//!   their directories.
//! * [`crash`]: handler `exit()` and fatal signals end the process loudly.
//! * [`instance`]: one `init` of a handler for a route; the only caller of
//!   handler callbacks.
//! * [`host_api`] + [`handshake`]: the function table handlers call.
//! * [`topics`], [`timers`]: host-owned publish/subscribe membership and
//!   handler timers (ABI 1.2); [`cluster`]: topics across nodes through
//!   Redis pub/sub (`[cluster]`).
//! * [`reload`]: notify watcher, debounce, retries, supervision, SIGHUP.
//! * [`logging`]: tracing setup and log reopening; [`logsafe`]: escaping
//!   client-controlled values before they are logged.
//! * [`metrics`]: Prometheus counters (atomic, sharded per thread);
//!   [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//!
//! `unsafe` lives only in `loader`, `instance`, `host_api`, `handshake`,
//! `crash` (signal handlers, `atexit`), `trust` (`geteuid`, `getpwuid_r`),
//! `direct` (one `send(2)` to a subscriber's socket) and `server::fdlimit`.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod crash;
pub mod deflate;
pub mod direct;
pub mod elf;
pub mod error;
pub mod handshake;
pub mod host_api;
pub mod http;
pub mod instance;
pub mod loader;
pub mod logging;
pub mod logsafe;
pub mod mailbox;
pub mod metrics;
pub mod registry;
pub mod reload;
pub mod rollout;
pub mod routing;
pub mod scan;
pub mod server;
pub mod session;
pub mod settings;
pub mod static_files;
pub mod status;
pub mod timers;
pub mod tls;
pub mod topics;
pub mod trust;
pub mod workers;
pub mod write_deadline;
pub mod ws;
