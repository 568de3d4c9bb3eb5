//! wsbench: loopback WebSocket load generator.
//!
//! ```text
//! wsbench --server-pid PID echo      --url ws://127.0.0.1:PORT/echo -c 100 -s 32 -d 5
//! wsbench --server-pid PID connect   --url ws://127.0.0.1:PORT/echo -n 10000 --sources 127.0.0.1,127.0.0.2
//! wsbench --server-pid PID handshake --url ws://127.0.0.1:PORT/echo --concurrency 8 -d 5
//! wsbench --server-pid PID fanout    --url ws://127.0.0.1:PORT/chat -n 1000 --rate 100 -d 5
//! wsbench --server-pid PID deflate-echo --url ws://127.0.0.1:PORT/echo-deflate -c 100 -s 4096 -d 5
//! wsbench --server-pid PID deflate-idle --url ws://127.0.0.1:PORT/echo-deflate -n 5000
//! ```
//!
//! Prints one JSON line per result on stdout and a human line on stderr.
//! Exits 1 when the run saw any error or echo mismatch. Targets and source
//! addresses must be loopback; everything is bounded in time and count.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bench::probe::Probe;
use bench::target::{Target, parse_sources};
use bench::workload::{connect, deflate, echo, fanout, handshake};
use bench::{Record, limits};
use clap::{Args, Parser, Subcommand};

/// Loopback-only WebSocket load generator for wshd and its peers.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// PID of the server, to report its CPU time and memory.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Name of the peer under test, copied into the result.
    #[arg(long, global = true)]
    label: Option<String>,
    /// Client runtime worker threads. One leaves the other core of a 2-core
    /// machine to the server.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// C connections echo S-byte messages with P in flight each.
    Echo {
        #[command(flatten)]
        target: TargetArgs,
        /// Connections (C).
        #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50_000))]
        connections: u32,
        /// Message size in bytes (S).
        #[arg(short, long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
        size: u32,
        /// Send binary messages instead of text.
        #[arg(long)]
        binary: bool,
        /// Messages in flight per connection (P).
        #[arg(short = 'p', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
        in_flight: u32,
        #[command(flatten)]
        window: WindowArgs,
        /// Connections opened at once during set-up.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
        /// Pace each connection to this many messages per second (default:
        /// send the next message as soon as the echo arrives).
        #[arg(long, value_parser = per_conn_rate)]
        rate: Option<f64>,
    },
    /// Open N connections and hold them idle; report conn/s and server RSS per connection.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        /// Connections (N).
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u32).range(1..=60_000))]
        connections: u32,
        /// Connections opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold them before reading the server's memory.
        #[arg(long, default_value_t = 1.0, value_parser = seconds)]
        hold: f64,
        /// Skip the echo on a sample of held connections.
        #[arg(long)]
        no_alive_check: bool,
    },
    /// Connect, echo one message, close, repeat; report handshakes/s.
    Handshake {
        #[command(flatten)]
        target: TargetArgs,
        /// Workers cycling in parallel.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// C connections echo S-byte JSON documents with permessage-deflate;
    /// report server CPU and bytes on the wire per message.
    DeflateEcho {
        #[command(flatten)]
        target: TargetArgs,
        /// Connections (C).
        #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50_000))]
        connections: u32,
        /// Document size in bytes.
        #[arg(short, long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(128..=1_048_576))]
        size: u32,
        #[command(flatten)]
        window: WindowArgs,
        /// Connections opened at once during set-up.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
        /// The permessage-deflate offer.
        #[arg(long, value_enum, default_value_t = deflate::Offer::NoContext)]
        offer: deflate::Offer,
    },
    /// Open N permessage-deflate connections, echo one JSON document on
    /// each, hold them idle; report server RSS per connection.
    DeflateIdle {
        #[command(flatten)]
        target: TargetArgs,
        /// Connections (N).
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u32).range(1..=60_000))]
        connections: u32,
        /// Connections opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold them before reading the server's memory.
        #[arg(long, default_value_t = 1.0, value_parser = seconds)]
        hold: f64,
        /// Size of the document each connection echoes.
        #[arg(short, long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(128..=1_048_576))]
        size: u32,
        /// The permessage-deflate offer (default: what browsers send).
        #[arg(long, value_enum, default_value_t = deflate::Offer::Browser)]
        offer: deflate::Offer,
    },
    /// One publisher, N subscribers on a chat route; report deliveries/s and latency.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        /// Subscribers (N), besides the publisher.
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u32).range(1..=50_000))]
        subscribers: u32,
        /// Messages published per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Message size in bytes (at least 34).
        #[arg(short, long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(34..=1_048_576))]
        size: u32,
        #[command(flatten)]
        window: WindowArgs,
        /// Connections opened at once during set-up.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
        /// Subscribers connect here instead of --url: another node of a
        /// wshd [cluster], so every delivery but the publisher's own copy
        /// crosses Redis (docs/cluster.md).
        #[arg(long)]
        subscriber_url: Option<String>,
    },
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Loopback ws:// or wss:// URL of the route to load.
    #[arg(long)]
    url: String,
    /// For wss://: the PEM certificate(s) to trust (the server's, or its CA).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Comma-separated loopback source addresses to spread connections over
    /// (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, default_value = "")]
    sources: String,
}

#[derive(Debug, Args)]
struct WindowArgs {
    /// Measured window in seconds (D).
    #[arg(short, long, default_value_t = 5.0, value_parser = seconds)]
    duration: f64,
    /// Warm-up in seconds before the window.
    #[arg(short, long, default_value_t = 1.0, value_parser = seconds)]
    warmup: f64,
}

impl WindowArgs {
    fn durations(&self) -> (Duration, Duration) {
        (
            Duration::from_secs_f64(self.warmup),
            Duration::from_secs_f64(self.duration),
        )
    }
}

/// Parses a per-connection message rate: positive and at most 100,000/s.
fn per_conn_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if value > 0.0 && value <= 100_000.0 {
        Ok(value)
    } else {
        Err(format!(
            "{value} is not a rate between 0 and 100000 messages per second"
        ))
    }
}

/// Parses seconds, bounded to ten minutes so no run can go on forever.
fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=600.0).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0 and 600 seconds".to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    limits::raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(record) => {
            println!("{}", record.to_json_line());
            eprintln!("{record}");
            if record.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("wsbench: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Record> {
    let probe = cli
        .server_pid
        .map(|pid| Probe::new(pid).with_context(|| format!("reading /proc/{pid}")))
        .transpose()?;
    let mut record = match cli.mode {
        Mode::Echo {
            target,
            connections,
            size,
            binary,
            in_flight,
            window,
            connect_concurrency,
            rate,
        } => {
            let (warmup, duration) = window.durations();
            let params = echo::EchoParams {
                connections: connections as usize,
                size: size as usize,
                binary,
                in_flight: in_flight as usize,
                warmup,
                duration,
                connect_concurrency,
                rate,
            };
            echo::run(&target.resolve()?, &params, probe).await
        }
        Mode::Connect {
            target,
            connections,
            concurrency,
            hold,
            no_alive_check,
        } => {
            let params = connect::ConnectParams {
                connections: connections as usize,
                concurrency,
                hold: Duration::from_secs_f64(hold),
                check_alive: !no_alive_check,
            };
            connect::run(&target.resolve()?, &params, probe).await
        }
        Mode::Handshake {
            target,
            concurrency,
            window,
        } => {
            let (warmup, duration) = window.durations();
            let params = handshake::HandshakeParams {
                concurrency: concurrency as usize,
                warmup,
                duration,
            };
            handshake::run(Arc::new(target.resolve()?), &params, probe).await
        }
        Mode::Fanout {
            target,
            subscribers,
            rate,
            size,
            window,
            connect_concurrency,
            subscriber_url,
        } => {
            let (warmup, duration) = window.durations();
            let params = fanout::FanoutParams {
                subscribers: subscribers as usize,
                rate,
                size: size as usize,
                warmup,
                duration,
                connect_concurrency,
                subscriber_url,
            };
            fanout::run(Arc::new(target.resolve()?), &params, probe).await
        }
        Mode::DeflateEcho {
            target,
            connections,
            size,
            window,
            connect_concurrency,
            offer,
        } => {
            let (warmup, duration) = window.durations();
            let params = deflate::DeflateEchoParams {
                connections: connections as usize,
                size: size as usize,
                warmup,
                duration,
                connect_concurrency,
                offer,
            };
            deflate::run_echo(&target.resolve()?, &params, probe).await
        }
        Mode::DeflateIdle {
            target,
            connections,
            concurrency,
            hold,
            size,
            offer,
        } => {
            let params = deflate::DeflateIdleParams {
                connections: connections as usize,
                concurrency,
                hold: Duration::from_secs_f64(hold),
                size: size as usize,
                offer,
            };
            deflate::run_idle(&target.resolve()?, &params, probe).await
        }
    };
    record.label = cli.label;
    record.server_pid = cli.server_pid;
    Ok(record)
}

impl TargetArgs {
    fn resolve(&self) -> anyhow::Result<Target> {
        Target::parse(&self.url)?
            .with_ca(self.ca.as_deref())?
            .with_sources(parse_sources(&self.sources)?)
    }
}
