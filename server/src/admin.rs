//! The admin listener (`[admin] listen`, `--admin`): `/metrics`, `/healthz`
//! and `/readyz` on their own address, never on the public port, so the
//! public side cannot read them and operators can firewall them apart.
//!
//! It runs on the control runtime (main.rs), not on the connection runtime,
//! so a stalled worker cannot also silence the endpoint that reports it:
//! `/healthz` asks the connection runtime to run a task and answers 503
//! when it does not within [`HEALTH_TIMEOUT`].
//!
//! Bounded like the public port: at most [`AdminLimits::max_connections`]
//! sockets (when full, the longest-idle one is closed to make room, and a
//! small overflow pool answers one request each, so idle sockets cannot keep
//! probes out: see [`Open`]), the request head within
//! [`AdminLimits::read_timeout`], responses under the server's
//! `write_timeout`, and no connection lives past [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long `/healthz` waits for the connection runtime to run a task.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest an admin connection stays open; a scraper that keeps its
/// connection alive simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The admin listener's bounds.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Open admin connections; more are closed at once. A scraper and a
    /// probe or two need a handful.
    pub max_connections: usize,
    /// A request head must arrive within this.
    pub read_timeout: Duration,
    /// A response must be taken within this (the server's `write_timeout`).
    pub write_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: 16,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    state: AtomicU8,
    /// The connection runtime, once started.
    workers: OnceLock<tokio::runtime::Handle>,
}

impl Health {
    /// The connection runtime `/healthz` checks from now on.
    pub fn set_workers(&self, handle: tokio::runtime::Handle) {
        let _ = self.workers.set(handle);
    }

    /// Listeners bound and handlers loaded: `/readyz` answers 200.
    pub fn set_ready(&self) {
        let _ = self
            .state
            .compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Shutdown started: `/readyz` answers 503 from now on.
    pub fn set_stopping(&self) {
        self.state.store(STOPPING, Ordering::SeqCst);
    }

    async fn healthz(&self) -> (StatusCode, &'static str) {
        // Before the workers start (handlers still loading) the control
        // runtime answering is the evidence the process is alive.
        let Some(h) = self.workers.get() else {
            return (StatusCode::OK, "ok: starting");
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, h.spawn(async {})).await {
            Ok(Ok(())) => (StatusCode::OK, "ok"),
            Ok(Err(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: the connection runtime is shut down",
            ),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: the connection runtime did not run a task within 2 s \
                 (a handler callback may be blocking every worker thread)",
            ),
        }
    }

    fn readyz(&self) -> (StatusCode, &'static str) {
        match self.state.load(Ordering::SeqCst) {
            READY => (StatusCode::OK, "ready"),
            STARTING => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: loading handlers",
            ),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down"),
        }
    }
}

/// A running admin listener; stopped when dropped.
#[derive(Debug)]
pub struct Admin {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the admin endpoints on the current runtime.
/// Also turns on the per-message metrics (metrics.rs).
pub async fn start(
    addr: SocketAddr,
    health: Arc<Health>,
    limits: AdminLimits,
) -> anyhow::Result<Admin> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on the admin address {addr}: {e}; change [admin] listen or --admin"
        )
    })?;
    let addr = listener.local_addr()?;
    crate::metrics::enable();
    tracing::info!(%addr, "admin listener: /metrics, /healthz, /readyz");
    let task = tokio::spawn(accept_loop(listener, health, limits));
    Ok(Admin { addr, task })
}

/// How long a connection may sit idle (since it was accepted, or since its
/// last answer) before a newcomer may close it to take its place. A probe
/// sends its request the moment it connects, well within this.
const EVICT_AFTER: Duration = Duration::from_millis(200);

/// Connections answered while every place is taken by a connection too
/// young to evict: one request each, then closed.
const OVERFLOW_PER_PLACE: usize = 4;

/// How long an overflow connection has to send its request head.
const OVERFLOW_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The admin connections open, oldest first: what keeps health probes
/// answered when clients hold the listener full (#23). With a plain cap, 16
/// idle sockets, re-opened whenever they were cut, kept every `/healthz`
/// out and an orchestrator would restart a healthy server.
///
/// A newcomer takes a free place, or closes the oldest connection that is
/// idle and has been for [`EVICT_AFTER`] (a socket that was never used, or
/// a keep-alive one between requests) and takes its place. When clients
/// churn so fast that every place is younger than that, the newcomer is
/// still answered, once, from a small overflow pool
/// ([`OVERFLOW_PER_PLACE`] per place, with a short read deadline), and only
/// past that refused. Holding probes out therefore takes more connections
/// than places and overflow together, re-opened faster than every 200 ms.
struct Open {
    max: usize,
    base: tokio::time::Instant,
    next_id: u64,
    conns: std::collections::VecDeque<OpenConn>,
    overflow: usize,
}

struct OpenConn {
    id: u64,
    state: Arc<ConnState>,
}

/// What the accept loop knows of one connection with a place.
struct ConnState {
    /// A request is being answered: this connection is not evicted.
    busy: AtomicBool,
    /// Milliseconds from [`Open::base`] to its accept or its last answer.
    idle_since_ms: AtomicU64,
    evict: CancellationToken,
}

/// How a new admin connection is served.
enum Admission {
    /// With a place, keep-alive, until it is idle and someone needs it.
    Place(u64, Arc<ConnState>),
    /// One request, then closed.
    Overflow,
}

impl Open {
    fn new(max: usize) -> Open {
        Open {
            max: max.max(1),
            base: tokio::time::Instant::now(),
            next_id: 0,
            conns: std::collections::VecDeque::new(),
            overflow: 0,
        }
    }

    fn ms(&self, at: tokio::time::Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Where a connection accepted `now` goes; `None`: refused.
    fn admit(&mut self, now: tokio::time::Instant) -> Option<Admission> {
        if self.conns.len() >= self.max {
            let now = self.ms(now);
            let old = self.conns.iter().position(|c| {
                !c.state.busy.load(Ordering::Acquire)
                    && now.saturating_sub(c.state.idle_since_ms.load(Ordering::Acquire))
                        >= EVICT_AFTER.as_millis() as u64
            });
            match old.and_then(|i| self.conns.remove(i)) {
                Some(old) => old.state.evict.cancel(),
                None if self.overflow < self.max * OVERFLOW_PER_PLACE => {
                    self.overflow += 1;
                    return Some(Admission::Overflow);
                }
                None => return None,
            }
        }
        self.next_id += 1;
        let state = Arc::new(ConnState {
            busy: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.ms(now)),
            evict: CancellationToken::new(),
        });
        self.conns.push_back(OpenConn {
            id: self.next_id,
            state: state.clone(),
        });
        Some(Admission::Place(self.next_id, state))
    }

    /// The connection is gone: frees its place or its overflow slot.
    fn leave(&mut self, admission: &Admission) {
        match admission {
            Admission::Place(id, _) => {
                if let Some(i) = self.conns.iter().position(|c| c.id == *id) {
                    self.conns.remove(i);
                }
            }
            Admission::Overflow => self.overflow -= 1,
        }
    }
}

/// Marks a connection busy while its answer is made; when done (or dropped
/// half-way) it is idle again from that moment.
struct Busy {
    state: Option<Arc<ConnState>>,
    base: tokio::time::Instant,
}

impl Busy {
    fn mark(state: Option<&Arc<ConnState>>, base: tokio::time::Instant) -> Busy {
        if let Some(s) = state {
            s.busy.store(true, Ordering::Release);
        }
        Busy {
            state: state.cloned(),
            base,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            let ms = tokio::time::Instant::now()
                .saturating_duration_since(self.base)
                .as_millis() as u64;
            s.idle_since_ms.store(ms, Ordering::Release);
            s.busy.store(false, Ordering::Release);
        }
    }
}

async fn accept_loop(listener: TcpListener, health: Arc<Health>, limits: AdminLimits) {
    let open = Arc::new(Mutex::new(Open::new(limits.max_connections)));
    let base = open.lock().unwrap_or_else(|e| e.into_inner()).base;
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                tracing::warn!("admin accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let admitted = open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(tokio::time::Instant::now());
        let Some(admission) = admitted else {
            // Dropping the socket closes it: every place and the overflow
            // are taken, and a flood cannot make the admin port allocate.
            tracing::debug!(%peer, "admin connection refused: every place is taken");
            continue;
        };
        let health = health.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let (state, evict, read_timeout, keep_alive) = match &admission {
                Admission::Place(_, s) => {
                    (Some(s.clone()), s.evict.clone(), limits.read_timeout, true)
                }
                Admission::Overflow => (
                    None,
                    CancellationToken::new(),
                    limits.read_timeout.min(OVERFLOW_READ_TIMEOUT),
                    false,
                ),
            };
            let io = crate::write_deadline::WriteDeadline::new(stream, limits.write_timeout, peer);
            let svc = service_fn(move |req| {
                let health = health.clone();
                let state = state.clone();
                async move {
                    let _busy = Busy::mark(state.as_ref(), base);
                    Ok::<_, Infallible>(answer(&health, req).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .keep_alive(keep_alive)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                    if let Ok(Err(e)) = r {
                        tracing::debug!(%peer, "admin connection: {e}");
                    }
                }
                _ = evict.cancelled() => {
                    tracing::debug!(%peer, "admin connection closed to make room (idle the longest)");
                }
            }
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .leave(&admission);
        });
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn answer(health: &Health, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: use GET\n",
            PLAIN,
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            crate::metrics::render(),
            crate::metrics::CONTENT_TYPE,
        ),
        "/healthz" => {
            let (s, b) = health.healthz().await;
            text(s, format!("{b}\n"), PLAIN)
        }
        "/readyz" => {
            let (s, b) = health.readyz();
            text(s, format!("{b}\n"), PLAIN)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: the admin listener serves /metrics, /healthz and /readyz\n",
            PLAIN,
        ),
    }
}

/// Whether the admin address would share a socket with the public one:
/// the same port on the same address, or on any address when either is the
/// wildcard. Port 0 (a free port picked at bind) never clashes.
pub fn clashes(admin: SocketAddr, public: SocketAddr) -> bool {
    admin.port() != 0
        && admin.port() == public.port()
        && (admin.ip() == public.ip()
            || admin.ip().is_unspecified()
            || public.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn clash_rules() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(clashes(a("127.0.0.1:9998"), a("127.0.0.1:9998")));
        assert!(clashes(a("0.0.0.0:9998"), a("127.0.0.1:9998")));
        assert!(clashes(a("127.0.0.1:9998"), a("[::]:9998")));
        assert!(!clashes(a("127.0.0.1:9999"), a("127.0.0.1:9998")));
        assert!(!clashes(a("127.0.0.2:9998"), a("127.0.0.1:9998")));
        assert!(!clashes(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[tokio::test]
    async fn readyz_follows_the_state_and_healthz_the_runtime() {
        let health = Arc::new(Health::default());
        let admin = start(
            "127.0.0.1:0".parse().unwrap(),
            health.clone(),
            AdminLimits::default(),
        )
        .await
        .unwrap();
        assert!(get(admin.addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready();
        assert!(get(admin.addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        health.set_stopping();
        let r = get(admin.addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("shutting down"),
            "{r}"
        );
        assert!(get(admin.addr, "/nope").await.starts_with("HTTP/1.1 404"));

        // A connection runtime whose only thread is stuck fails /healthz.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        health.set_workers(rt.handle().clone());
        assert!(
            get(admin.addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        rt.spawn(async move {
            let _ = stuck.recv(); // blocks the worker thread, as a bad callback would
        });
        let r = get(admin.addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        release.send(()).unwrap();
        rt.shutdown_background();
    }

    #[tokio::test]
    async fn when_full_a_probe_is_still_answered_and_idle_ones_time_out() {
        let limits = AdminLimits {
            max_connections: 2,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(1),
        };
        let admin = start("127.0.0.1:0".parse().unwrap(), Arc::default(), limits)
            .await
            .unwrap();
        let mut idle1 = TcpStream::connect(admin.addr).await.unwrap();
        let mut idle2 = TcpStream::connect(admin.addr).await.unwrap();
        // Over the cap, with both places too young to evict: answered from
        // the overflow pool.
        let probe = get(admin.addr, "/readyz").await;
        assert!(probe.starts_with("HTTP/1.1 503"), "{probe:?}");
        // The idle ones are closed by the read timeout.
        for s in [&mut idle1, &mut idle2] {
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .expect("an idle admin connection is closed by read_timeout")
                .ok();
        }
    }

    #[test]
    fn places_go_to_the_longest_idle_then_overflow_then_refusal() {
        let mut open = Open::new(2);
        let t0 = open.base;
        let place = |a: Option<Admission>| match a {
            Some(Admission::Place(id, s)) => (id, s),
            _ => panic!("expected a place"),
        };
        let (a, sa) = place(open.admit(t0));
        let (_b, sb) = place(open.admit(t0));
        // Both too young to evict: the overflow answers, up to its size.
        for _ in 0..2 * OVERFLOW_PER_PLACE {
            assert!(matches!(open.admit(t0), Some(Admission::Overflow)));
        }
        assert!(open.admit(t0).is_none(), "overflow full: refused");
        open.leave(&Admission::Overflow);
        // Later: a is answering a request, so b (idle, though younger)
        // makes room.
        let later = t0 + EVICT_AFTER + Duration::from_millis(1);
        sa.busy.store(true, Ordering::Release);
        let (c, _) = place(open.admit(later));
        assert!(sb.evict.is_cancelled() && !sa.evict.is_cancelled());
        // a busy, c too young: overflow again.
        assert!(matches!(open.admit(later), Some(Admission::Overflow)));
        open.leave(&Admission::Place(a, sa));
        assert_eq!(open.conns.len(), 1);
        assert_eq!(open.conns[0].id, c);
    }
}
