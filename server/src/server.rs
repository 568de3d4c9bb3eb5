//! The running server: shared state ([`Server`]), the accept loop
//! ([`listen`]), and the lifecycle ([`run`]): startup, reloads, signals and
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::Args;
use crate::host_api::Connections;
use crate::loader::Loader;
use crate::logging::LogHandle;
use crate::registry::{Mode, Registry};
use crate::reload::{self, Trigger};
use crate::routing::RouteTable;
use crate::settings::Settings;
use crate::static_files::StaticFiles;
use crate::workers::Workers;

/// State shared by every connection.
pub struct Server {
    /// The published routes; swapped whole on reload.
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Open WebSocket connections by id, for the host API.
    pub conns: Arc<Connections>,
    /// Cancelled once, when graceful shutdown starts.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection ids: never reused, 0 never used.
    pub next_conn: AtomicU64,
    /// The document root, if any (replaced on config reload).
    pub files: ArcSwap<Option<StaticFiles>>,
    /// `max_buffered_bytes`: unfinished incoming messages, server-wide.
    pub budget: Arc<crate::budget::Budget>,
}

impl Server {
    pub fn static_files(&self) -> Option<StaticFiles> {
        (**self.files.load()).clone()
    }
}

/// What an open connection holds until its last task ends: its place under
/// `max_connections`.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Starts the accept loop on the connection runtime, so what it accepts is
/// registered there. At most `max_connections` sockets are open at once;
/// beyond that, new clients wait in the kernel's backlog. The returned task
/// ends at shutdown.
pub fn listen(
    listener: std::net::TcpListener,
    server: &Arc<Server>,
    workers: &Workers,
    max_connections: usize,
    handshake_timeout: Duration,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(max_connections));
    workers.handle().spawn(accept_loop(
        listener,
        server.clone(),
        slots,
        handshake_timeout,
    ))
}

/// The accept loop. Accept errors (EMFILE when out of file descriptors,
/// ECONNABORTED) back off and retry: the server neither exits nor spins, and
/// open connections are unaffected.
async fn accept_loop(
    listener: std::net::TcpListener,
    server: Arc<Server>,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot watch the listening socket: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = server.shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = server.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%peer, "accepted");
        let slot = Arc::new(Slot { _permit: permit });
        let task = serve_http(stream, peer, server.clone(), slot, handshake_timeout);
        tokio::spawn(server.tracker.track_future(task));
    }
}

/// One accepted connection: HTTP/1.1 until it upgrades to a WebSocket
/// session (http.rs) or closes.
fn serve_http(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    srv: Arc<Server>,
    slot: Arc<Slot>,
    handshake_timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let shutdown = srv.shutdown.clone();
    let svc = service_fn(move |req| crate::http::handle(srv.clone(), peer, slot.clone(), req));
    async move {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(handshake_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { tracing::debug!(%peer, "http connection: {e}"); }
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

/// The private directory for loaded copies: the configured one, or a fresh
/// per-process directory under the system temp dir. Directories left by
/// processes that no longer exist are removed.
fn state_dir(settings: &Settings) -> std::io::Result<PathBuf> {
    if let Some(d) = &settings.state_dir {
        let d = d.join(format!("wshd-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        return Ok(d);
    }
    let tmp = std::env::temp_dir();
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("wshd-")) else {
                continue;
            };
            if let Ok(pid) = pid.parse::<u32>()
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = tmp.join(format!("wshd-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Runs the server until SIGTERM/SIGINT, then shuts down gracefully.
pub async fn run(args: Args, settings: Settings, log: LogHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let state = state_dir(&settings)?;
    let conns = Arc::new(Connections::default());
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut registry = Registry::new(Loader::new(state.clone())?, conns.clone(), table.clone());
    let report = registry.apply(&settings, Mode::Startup).await?;
    for p in &report.problems {
        tracing::error!("{p}");
    }
    let files = settings
        .document_root
        .as_deref()
        .map(StaticFiles::new)
        .transpose()?;

    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    // Accepted on the connection runtime (workers.rs), not on this one.
    let listener = listener.into_std()?;
    let server = Arc::new(Server {
        table,
        conns,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        files: ArcSwap::from_pointee(files),
        budget: Arc::new(crate::budget::Budget::new(
            settings.limits.max_buffered_bytes,
        )),
    });
    let workers = Workers::start(settings.workers)
        .map_err(|e| anyhow::anyhow!("cannot start the worker threads: {e}"))?;
    // Handlers go in before readiness is announced (addr file, pid file,
    // systemd): a SIGHUP or SIGUSR1 sent the moment we look ready must not
    // meet the default action, which kills the process.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let routes = registry.table().primary_routes().len();
    tracing::info!(%addr, routes, workers = workers.threads(), handler_dir = %settings.handler_dir.display(), "listening");
    if is_root() {
        tracing::warn!(
            "running as root: handler libraries run with full privileges; prefer a dedicated user"
        );
    }
    if let Some(p) = &settings.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))?;
    }
    if let Some(p) = &args.addr_file {
        // Write then rename, so a reader never sees a partial address.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))?;
        std::fs::rename(&tmp, p)?;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let (trigger_tx, trigger_rx) = mpsc::channel::<Trigger>(64);
    let _watcher = if settings.reload.watch {
        Some(reload::watch(&settings, trigger_tx.clone())?)
    } else {
        None
    };
    let reloader = tokio::spawn(reload::run(
        registry,
        settings.clone(),
        args.clone(),
        trigger_rx,
        server.clone(),
    ));
    let accept = listen(
        listener,
        &server,
        &workers,
        settings.limits.max_connections,
        settings.limits.handshake_timeout,
    );

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config and handlers");
                let _ = trigger_tx.send(Trigger::Signal).await;
            }
            _ = usr1.recv() => {
                match log.reopen() {
                    Ok(true) => tracing::info!("SIGUSR1: log file reopened"),
                    Ok(false) => tracing::info!("SIGUSR1: logging to stderr, nothing to reopen"),
                    Err(e) => tracing::error!("SIGUSR1: cannot reopen the log file: {e}"),
                }
            }
        }
    }

    // Graceful shutdown: stop accepting, close every connection with 1001
    // (their on_close still runs), wait up to the deadline.
    let deadline = settings.shutdown_timeout;
    let open = server.conns.len();
    tracing::info!(
        open,
        "shutting down: closing connections with 1001, waiting up to {deadline:?}"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.shutdown.cancel();
    // After the cancel: a session registering during this walk checks the
    // token itself once it is in `conns` (session.rs).
    for c in server.conns.iter() {
        c.signal(crate::host_api::ConnShared::SHUTDOWN);
    }
    server.tracker.close();
    reloader.abort();
    let _ = accept.await;
    tokio::select! {
        _ = server.tracker.wait() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(deadline) => tracing::warn!("shutdown deadline passed with {} connections open; exiting", server.conns.len()),
        _ = term.recv() => { tracing::warn!("second signal: exiting now"); std::process::exit(1) }
        _ = int.recv() => { tracing::warn!("second signal: exiting now"); std::process::exit(1) }
    }
    if let Some(p) = &settings.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid: no unsafe libc call needed.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
