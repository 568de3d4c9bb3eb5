//! raw-echo: the raw tokio-tungstenite peer (`/echo` and `/chat`).
//!
//! ```text
//! raw-echo --port 0 --addr-file /tmp/raw.addr [--read-buffer-size 4096] [--tls-cert C --tls-key K]
//! ```
//!
//! Prints `listening on HOST:PORT` once bound and, with `--addr-file`, writes
//! `HOST:PORT` to that file (atomically, via a rename) so a runner can wait
//! for it instead of sleeping. Stops on SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use bench::limits;
use bench::raw_server::{RawConfig, RawServer};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Raw tokio-tungstenite echo and chat server, the floor for wshd's figures.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    listen: bench::listen::Listen,
    /// tungstenite read buffer size per connection, in bytes (library
    /// default: 128 KiB).
    #[arg(long)]
    read_buffer_size: Option<usize>,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve wss:// with this PEM certificate (rustls, ring, as wshd does).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    limits::raise_nofile();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut websocket = WebSocketConfig::default();
    if let Some(size) = args.read_buffer_size {
        websocket = websocket.read_buffer_size(size);
    }
    let listener = args.listen.bind().await?;

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(bench::tls::server_config(cert, key)?),
        _ => None,
    };
    let server = RawServer::new(RawConfig { websocket, tls });
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = server.clone().serve(listener) => result.context("accepting")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    let lagged = server.chat_lagged();
    if lagged > 0 {
        eprintln!("raw-echo: {lagged} chat broadcasts were dropped for lagging receivers");
    }
    Ok(())
}
