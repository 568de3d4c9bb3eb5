//! Benchmark harness for wshd: a loopback-only load generator, a raw
//! tokio-tungstenite peer, and the pieces the runner uses to compare them.
//!
//! # Layout
//!
//! - [`target`]: the one place that decides where traffic may go (loopback
//!   only) and opens client connections, optionally from several source
//!   addresses.
//! - [`probe`]: reads a server's CPU time and resident memory from `/proc`.
//! - [`record`]: the result of one measurement, printed as one JSON line.
//! - [`latency`]: latency histogram shared by the workloads.
//! - [`workload`]: the four load shapes (`echo`, `connect`, `handshake`,
//!   `fanout`), each a bounded async function returning a [`Record`].
//! - [`raw_server`]: the raw tokio-tungstenite echo and chat server, our floor.
//! - [`limits`]: raises the open-file limit so thousands of sockets fit.
//! - [`listen`]: the listening flags and bind shared by the peer binaries.
//! - [`tls`]: the rustls configuration of the wss rows (the same as
//!   wshd's), the client stream, the runner's test certificate.
//!
//! Start reading at `src/bin/wsbench.rs`, which maps the CLI onto the
//! workloads; the runner lives in `src/bin/wsbench-runner/`.

pub mod latency;
pub mod limits;
pub mod listen;
pub mod probe;
pub mod raw_server;
pub mod record;
pub mod target;
pub mod tls;
pub mod workload;

pub use record::Record;
pub use target::Target;
