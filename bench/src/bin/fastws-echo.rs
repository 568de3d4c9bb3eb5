//! fastws-echo: the fastwebsockets 0.10 peer (`/echo` only).
//!
//! ```text
//! fastws-echo --port 0 --addr-file /tmp/fastws.addr
//! ```
//!
//! It runs the way fastwebsockets' own `examples/echo_server.rs` does, so the
//! peer is the library as its authors present it: one current-thread tokio
//! runtime with only the I/O driver, hyper's HTTP/1 server with upgrades for
//! the handshake, one task per connection run `unconstrained` (no
//! cooperative-budget yields), and a `FragmentCollector` that echoes whole
//! messages. Two differences, both to make it a peer the runner can drive:
//! it writes its address to `--addr-file` once bound, and it prints nothing
//! per connection (the example prints a line for each, which would be
//! measured as server CPU). Other paths than `/echo` get 404, like the other
//! peers. SIGTERM's default action stops it.

use bench::limits;
use clap::Parser;
use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};

/// fastwebsockets echo server, a peer for the benchmarks.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    listen: bench::listen::Listen,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    limits::raise_nofile();
    // The example's runtime: current-thread, I/O driver only.
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = args.listen.bind().await?;
    let mut accept_errors = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // The example returns on any accept error; a benchmark peer that
            // ran out of descriptors should keep its open connections
            // instead, and say so once.
            Err(error) => {
                accept_errors += 1;
                if accept_errors == 1 {
                    eprintln!("fastws-echo: accept failed (going on): {error}");
                }
                tokio::task::yield_now().await;
                continue;
            }
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = http1::Builder::new()
                .serve_connection(io, service_fn(upgrade_echo))
                .with_upgrades();
            if let Err(error) = connection.await {
                eprintln!("fastws-echo: connection: {error}");
            }
        });
    }
}

/// Answers the upgrade of `/echo` and spawns the echo loop; 404 elsewhere.
async fn upgrade_echo(
    mut request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    if request.uri().path() != "/echo" {
        let mut response = Response::new(Empty::new());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let echo = async move {
            let mut ws = FragmentCollector::new(upgraded.await?);
            loop {
                let frame = ws.read_frame().await?;
                match frame.opcode {
                    // The library answers the close handshake itself
                    // (auto-close is on by default).
                    OpCode::Close => return Ok::<(), WebSocketError>(()),
                    OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
                    _ => {}
                }
            }
        };
        if let Err(error) = tokio::task::unconstrained(echo).await {
            eprintln!("fastws-echo: websocket: {error}");
        }
    });
    Ok(response)
}
