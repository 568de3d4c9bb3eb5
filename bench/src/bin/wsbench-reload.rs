//! `wsbench-reload`: measures wshd's hot reload.
//!
//! 1. **Reload latency**: from the moment a new handler file is complete
//!    (the `cp` over the loaded file has returned) to the first new
//!    connection answered by the new version, with default reload settings.
//! 2. **Reloads under load**: `--reloads` consecutive reloads while
//!    `--clients` connections echo in a loop and a handshake loop keeps
//!    opening fresh connections. Counts failed handshakes and dropped
//!    connections (anything but a clean echo, or a deliberate 1012 drain).
//!
//! The handler is the C echo (`handlers/c/echo_wsh.c`) built twice with
//! different reply prefixes, so every reply says which version answered.
//! Loopback only; every loop is bounded in time and count.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Measure wshd reload latency and drops during reloads under load")]
struct Args {
    /// The wshd binary.
    #[arg(long, default_value = "target/release/wshd")]
    wshd: PathBuf,
    /// Repository root (for handlers/c/echo_wsh.c and the header).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Latency samples.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Consecutive reloads under load.
    #[arg(long, default_value_t = 100)]
    reloads: usize,
    /// Persistent echoing connections during the reloads.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rewrite the reload section (between the reload-bench markers) of this
    /// report, e.g. BENCHMARKS.md.
    #[arg(long)]
    update: Option<PathBuf>,
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn build_c(repo: &Path, out: &Path, prefix: &str) -> Result<()> {
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-I"])
        .arg(repo.join("handler-api/include"))
        .arg(format!("-DECHO_PREFIX=\"{prefix}\""))
        .arg(repo.join("handlers/c/echo_wsh.c"))
        .arg("-o")
        .arg(out)
        .status()
        .context("gcc")?;
    if !status.success() {
        bail!("gcc failed");
    }
    Ok(())
}

fn start(wshd: &Path, dir: &Path, work: &Path) -> Result<Server> {
    let addr_file = work.join("addr");
    let child = Command::new(wshd)
        .args(["-H", "127.0.0.1", "-p", "0", "--log-level", "warn", "-w"])
        .arg(dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", wshd.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && a.ends_with('\n')
        {
            return Ok(Server {
                child,
                addr: a.trim().to_owned(),
            });
        }
        if Instant::now() > deadline {
            bail!("wshd did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One handshake and one echo; returns the reply.
async fn probe(url: &str) -> Result<String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text("probe")).await?;
    let reply = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before the echo"),
        }
    };
    let _ = ws.close(None).await;
    Ok(reply)
}

/// Copies `src` over `dst` in place (the common, dangerous deploy) and
/// returns when the write is complete.
fn cp_over(src: &Path, dst: &Path) -> Result<Instant> {
    std::fs::copy(src, dst)?;
    Ok(Instant::now())
}

/// Waits until a new connection is answered with `prefix`; returns when.
async fn wait_for_version(url: &str, prefix: &str) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = probe(url).await?;
        if reply.starts_with(prefix) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("version {prefix} never answered");
        }
    }
}

#[derive(Default)]
struct LoadStats {
    echoes: AtomicU64,
    handshakes: AtomicU64,
    failed_handshakes: AtomicU64,
    dropped: AtomicU64,
}

async fn persistent_client(url: String, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    let mut ws = match tokio_tungstenite::connect_async(&url).await {
        Ok((ws, _)) => ws,
        Err(_) => {
            stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let msg = format!("m{n}");
        if ws.send(Message::text(msg.clone())).await.is_err() {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.ends_with(msg.as_str()) => {
                stats.echoes.fetch_add(1, Ordering::Relaxed);
            }
            // A drain (1012) is the server's documented behaviour, not a drop;
            // a client reconnects. Anything else is a drop.
            Ok(Some(Ok(Message::Close(Some(f))))) if u16::from(f.code) == 1012 => {
                match tokio_tungstenite::connect_async(&url).await {
                    Ok((new, _)) => ws = new,
                    Err(_) => {
                        stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            _ => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        n += 1;
    }
    let _ = ws.close(None).await;
}

async fn handshake_loop(url: String, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    while !stop.load(Ordering::Relaxed) {
        stats.handshakes.fetch_add(1, Ordering::Relaxed);
        if probe(&url).await.is_err() {
            stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("wsbench-reload-{}", std::process::id()));
    let handlers = work.join("handlers");
    std::fs::create_dir_all(&handlers)?;
    let result = run(&args, &work, &handlers).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(args: &Args, work: &Path, handlers: &Path) -> Result<()> {
    let (a, b) = (work.join("a.so"), work.join("b.so"));
    build_c(&args.repo, &a, "A:")?;
    build_c(&args.repo, &b, "B:")?;
    let target = handlers.join("c_echo_wsh.so");
    std::fs::copy(&a, &target)?;
    let server = start(&args.wshd, handlers, work)?;
    let url = format!("ws://{}/c_echo", server.addr);
    wait_for_version(&url, "A:").await?;

    // 1. Latency, alternating versions, default settings, no other load.
    let mut lat = Vec::new();
    for i in 0..args.samples {
        let (src, prefix) = if i.is_multiple_of(2) {
            (&b, "B:")
        } else {
            (&a, "A:")
        };
        let t0 = cp_over(src, &target)?;
        let t1 = wait_for_version(&url, prefix).await?;
        lat.push((t1 - t0).as_secs_f64() * 1000.0);
    }
    lat.sort_by(|x, y| x.total_cmp(y));
    let (p50, p90, max) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        lat[lat.len() - 1],
    );
    println!(
        "reload latency over {} reloads: p50 {p50:.1} ms, p90 {p90:.1} ms, max {max:.1} ms",
        lat.len()
    );

    // 2. Reloads under load.
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        tasks.push(tokio::spawn(persistent_client(
            url.clone(),
            stop.clone(),
            stats.clone(),
        )));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(handshake_loop(
            url.clone(),
            stop.clone(),
            stats.clone(),
        )));
    }
    let started = Instant::now();
    let mut current = if args.samples.is_multiple_of(2) {
        "A:"
    } else {
        "B:"
    };
    for _ in 0..args.reloads {
        let (src, prefix) = if current == "A:" {
            (&b, "B:")
        } else {
            (&a, "A:")
        };
        cp_over(src, &target)?;
        wait_for_version(&url, prefix).await?;
        current = prefix;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let failed = stats.failed_handshakes.load(Ordering::Relaxed);
    let dropped = stats.dropped.load(Ordering::Relaxed);
    println!(
        "{} reloads under load in {:.1} s: {} echoes on {} persistent connections, {} extra handshakes; \
         failed handshakes {failed}, dropped connections {dropped}",
        args.reloads,
        elapsed.as_secs_f64(),
        stats.echoes.load(Ordering::Relaxed),
        args.clients,
        stats.handshakes.load(Ordering::Relaxed),
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "latency_ms": { "samples": lat.len(), "p50": p50, "p90": p90, "max": max },
            "under_load": {
                "reloads": args.reloads,
                "clients": args.clients,
                "seconds": elapsed.as_secs_f64(),
                "echoes": stats.echoes.load(Ordering::Relaxed),
                "handshakes": stats.handshakes.load(Ordering::Relaxed),
                "failed_handshakes": failed,
                "dropped_connections": dropped,
            }
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    drop(server);
    if let Some(path) = &args.update {
        let section = format!(
            "### Hot reload\n\n\
             `wsbench-reload` (wshd release build, C echo handler replaced with `cp` over the loaded file, \
             default reload settings):\n\n\
             | figure | measured | target |\n|---|---:|---|\n\
             | reload latency: file complete → first new connection served by the new version, p50 | {p50:.1} ms | < 250 ms |\n\
             | reload latency, p90 / max over {} reloads | {p90:.1} ms / {max:.1} ms | < 250 ms |\n\
             | failed handshakes during {} consecutive reloads under load | {failed} | 0 |\n\
             | dropped connections during those reloads | {dropped} | 0 |\n\n\
             Load during the reloads: {} connections echoing in a loop ({} echoes in {:.1} s) plus 2 loops of \
             connect-echo-close ({} handshakes). Open connections stay on the version they started with; \
             the default 60 s drain timeout is longer than the run, so none of them was closed.\n",
            lat.len(),
            args.reloads,
            args.clients,
            stats.echoes.load(Ordering::Relaxed),
            elapsed.as_secs_f64(),
            stats.handshakes.load(Ordering::Relaxed),
        );
        let report =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let (begin, end) = ("<!-- reload-bench:begin -->", "<!-- reload-bench:end -->");
        let (Some(b), Some(e)) = (report.find(begin), report.find(end)) else {
            bail!("{} has no reload-bench markers", path.display());
        };
        let updated = format!("{}{begin}\n{section}{}", &report[..b], &report[e..]);
        std::fs::write(path, updated)?;
    }
    if failed > 0 || dropped > 0 {
        bail!("reloads under load: {failed} failed handshakes, {dropped} dropped connections");
    }
    Ok(())
}
