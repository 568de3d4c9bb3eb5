//! The running server. [`run`] is the core, mini-redis style: it takes a
//! bound listener, its reload triggers and its shutdown as values, so the
//! process (main.rs, [`process`]) feeds it signals and tests feed it
//! channels.
//!
//! * this module: the shared state ([`Server`], [`Slot`]), startup, the
//!   private state directory, and graceful shutdown;
//! * [`listener`]: the accept loop and the 429/503 answers of a full server;
//! * [`per_ip`]: per-client-address connection caps and handshake rates;
//! * [`process`]: the process around `run`: binding, readiness (addr and pid
//!   files, sd_notify), cleanup; [`signals`] turns signals into triggers and
//!   the shutdown value; [`pidfile`] writes files without following symlinks;
//! * [`fdlimit`]: raising `RLIMIT_NOFILE` at startup.
//! * [`malloc`]: glibc's allocator gives big blocks back when they are freed.

pub mod fdlimit;
pub mod listener;
pub mod malloc;
pub mod per_ip;
pub mod pidfile;
pub mod process;
pub mod signals;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::Args;
use crate::loader::Loader;
use crate::mailbox::Connections;
use crate::registry::{Mode, Registry};
use crate::reload::{self, Trigger};
use crate::routing::RouteTable;
use crate::settings::Settings;
use crate::static_files::StaticFiles;
use crate::workers::Workers;

pub use process::serve;

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
    /// `[limits] write_timeout` for HTTP responses (before any upgrade).
    pub write_timeout: Duration,
    /// `max_buffered_bytes`: unfinished incoming messages, server-wide.
    pub budget: Arc<crate::budget::Budget>,
    /// The live TLS certificate, when a listener speaks TLS (reloaded on
    /// SIGHUP).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Token expiries of connections admitted by `[route.auth]` (auth.rs).
    pub auth: crate::auth::Expiries,
}

impl Server {
    pub fn static_files(&self) -> Option<StaticFiles> {
        (**self.files.load()).clone()
    }
}

/// What an open connection holds until its last task ends: its place under
/// `max_connections` and under its address's `max_connections_per_ip`.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _per_ip: Option<per_ip::ConnGuard>,
}

impl Slot {
    /// The address the connection's topics are charged to: none for an
    /// address in `per_ip_exempt` (it holds no per-address place either).
    pub fn topic_address(&self) -> crate::topics::AddressKey {
        self._per_ip
            .as_ref()
            .map_or(crate::topics::AddressKey::NONE, |g| {
                crate::topics::AddressKey::of(g.address())
            })
    }
}

/// The reload triggers [`run`] listens to. Keep a [`Triggers::sender`] to
/// ask for reloads (SIGHUP does); the file watcher gets one too.
pub struct Triggers {
    tx: mpsc::Sender<Trigger>,
    rx: mpsc::Receiver<Trigger>,
}

impl Triggers {
    pub fn new() -> Triggers {
        // A full channel already holds pending reloads: senders may drop.
        let (tx, rx) = mpsc::channel(64);
        Triggers { tx, rx }
    }

    /// A handle that asks the running server to reload.
    pub fn sender(&self) -> mpsc::Sender<Trigger> {
        self.tx.clone()
    }
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers::new()
    }
}

/// Serves `listener` until `shutdown` completes, then shuts down gracefully:
/// every connection gets 1001 and the call returns once they are gone or
/// `shutdown_timeout` passed.
///
/// Handlers are loaded before `ready` is called with the bound address;
/// `ready` is where the process announces itself (addr and pid files,
/// systemd). Reloads come from `triggers` (and the file watcher, if
/// `reload.watch`); `args` is what a config reload re-reads.
pub async fn run(
    settings: Settings,
    args: Args,
    listener: std::net::TcpListener,
    triggers: Triggers,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tls = settings.listeners.first().is_some_and(|l| l.tls);
    run_on(
        settings,
        args,
        vec![(listener, tls)],
        triggers,
        shutdown,
        |addrs| ready(addrs[0]),
    )
    .await
}

/// [`run`] on several bound listeners, each `(socket, tls)`; `ready` gets
/// their addresses in the same order.
pub async fn run_on(
    settings: Settings,
    args: Args,
    listeners: Vec<(std::net::TcpListener, bool)>,
    triggers: Triggers,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&[SocketAddr]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // The admin listener first, so /readyz says 503 while handlers load
    // and a taken admin port fails before any handler's init runs.
    let health = Arc::new(crate::admin::Health::default());
    let _admin = match settings.admin {
        Some(a) => {
            let limits = crate::admin::AdminLimits {
                write_timeout: settings.limits.write_timeout,
                ..Default::default()
            };
            Some(crate::admin::start(a, health.clone(), limits).await?)
        }
        None => None,
    };
    // The certificate first: a broken pair fails in milliseconds, before
    // any handler's init runs.
    let tls = match (&settings.tls, listeners.iter().any(|l| l.1)) {
        (Some(t), true) => {
            Some(crate::tls::Tls::new(t.clone()).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        (None, true) => anyhow::bail!(
            "a listener speaks TLS but no certificate is configured: set [tls] cert and key"
        ),
        _ => None,
    };
    // Sealed memfds, or a fresh private directory (removed when the loader
    // is dropped) where memfds are refused: see loader.rs.
    let loader = Loader::new(settings.state_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("cannot set up the handler loader: {e}"))?;
    tracing::info!("{}", loader.describe());
    let state = loader.private_dir().map(ToOwned::to_owned);
    let conns = Arc::new(Connections::default());
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut registry = Registry::new(loader, conns.clone(), table.clone());
    let report = registry.apply(&settings, Mode::Startup).await?;
    for p in &report.problems {
        tracing::error!("{p}");
    }
    let files = settings
        .document_root
        .as_deref()
        .map(StaticFiles::new)
        .transpose()?;

    let addrs = listeners
        .iter()
        .map(|l| l.0.local_addr())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let addr = addrs[0];
    let server = Arc::new(Server {
        table,
        conns,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        files: ArcSwap::from_pointee(files),
        write_timeout: settings.limits.write_timeout,
        budget: Arc::new(crate::budget::Budget::new(
            settings.limits.max_buffered_bytes,
        )),
        tls: tls.clone(),
        auth: Default::default(),
    });
    let workers = Workers::start(settings.workers)
        .map_err(|e| anyhow::anyhow!("cannot start the worker threads: {e}"))?;
    health.set_workers(workers.handle().clone());
    let routes = registry.table().primary_routes().len();
    tracing::info!(%addr, routes, workers = workers.threads(), handler_dir = %settings.handler_dir.display(), "listening");
    for (a, (_, is_tls)) in addrs.iter().zip(&listeners) {
        tracing::info!(addr = %a, tls = is_tls, "listener");
    }
    if is_root() {
        tracing::warn!(
            "running as root: handler libraries run with full privileges; prefer a dedicated user"
        );
    }

    let Triggers { tx, rx } = triggers;
    let watcher = if settings.reload.watch {
        Some(reload::Watch::start(&settings, tx.clone())?)
    } else {
        None
    };
    let reloader = tokio::spawn(reload::run(
        registry,
        settings.clone(),
        args,
        rx,
        watcher,
        server.clone(),
    ));
    let cluster = start_cluster(&settings);
    // The certificate files are watched like the handlers are.
    let _tls_watch = match &tls {
        Some(t) if settings.reload.watch => match t.watch(settings.reload.debounce) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch the TLS certificate files: {e}; send SIGHUP after renewing them"
                );
                None
            }
        },
        _ => None,
    };
    let bound = listeners
        .into_iter()
        .map(|(listener, is_tls)| listener::Bound {
            listener,
            tls: if is_tls { tls.clone() } else { None },
        })
        .collect();
    let accept = listener::listen(bound, &server, &workers, &settings.limits)?;
    ready(&addrs)?;
    health.set_ready();

    shutdown.await;
    health.set_stopping();

    // Graceful shutdown: stop accepting, close every connection with 1001
    // (their on_close still runs), wait up to the deadline.
    let deadline = settings.shutdown_timeout;
    let open = server.conns.len();
    tracing::info!(
        open,
        "shutting down: closing connections with 1001, waiting up to {deadline:?}"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.conns.cancel_and_signal(
        &server.shutdown,
        crate::mailbox::ConnShared::SHUTDOWN,
        |_| true,
    );
    server.tracker.close();
    reloader.abort();
    for a in accept {
        let _ = a.await;
    }
    tokio::select! {
        _ = server.tracker.wait() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(deadline) => tracing::warn!("shutdown deadline passed with {} connections open; exiting", server.conns.len()),
    }
    if let Some((stop, task)) = cluster {
        stop.cancel();
        let _ = task.await;
    }
    if let Some(state) = &state {
        let _ = std::fs::remove_dir_all(state);
    }
    Ok(())
}

/// Starts the `[cluster]` link, if configured: the task that carries topics
/// to and from Redis (cluster.rs). It never delays startup: an unreachable
/// Redis is retried in the background while local delivery works.
fn start_cluster(settings: &Settings) -> Option<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let cs = settings.cluster.clone()?;
    let (link, rx) = crate::cluster::Link::new(&cs);
    let topics = crate::topics::global();
    if !topics.set_cluster(link.clone()) {
        tracing::warn!("cluster: a link is already running in this process; not starting another");
        return None;
    }
    tracing::info!(
        node_id = %cs.node_id,
        prefix = %cs.channel_prefix,
        "cluster: connecting to redis at {}",
        cs.describe()
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(crate::cluster::run(cs, link, rx, topics, stop.clone()));
    Some((stop, task))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid: no unsafe libc call needed.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
