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
//! sockets (the excess is closed at once), the request head within
//! [`AdminLimits::read_timeout`], responses under the server's
//! `write_timeout`, and no connection lives past [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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

async fn accept_loop(listener: TcpListener, health: Arc<Health>, limits: AdminLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Dropping the socket closes it: the admin port answers no one
            // past its cap, and a flood cannot make it allocate.
            tracing::debug!(%peer, "admin connection refused: {} already open", limits.max_connections);
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = crate::write_deadline::WriteDeadline::new(stream, limits.write_timeout, peer);
            let svc = service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(answer(&health, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.read_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(%peer, "admin connection: {e}");
            }
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
    async fn connections_are_capped_and_idle_ones_time_out() {
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
        // Over the cap: closed without an answer while the two are open.
        let mut third = TcpStream::connect(admin.addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
            .await
            .expect("the excess connection is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The idle ones are closed by the read timeout, freeing their slots.
        for s in [&mut idle1, &mut idle2] {
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .expect("an idle admin connection is closed by read_timeout")
                .ok();
        }
        // Slots come back once the tasks end.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = get(admin.addr, "/readyz").await;
            if r.starts_with("HTTP/1.1 503") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slots never freed: {r:?}"
            );
            tokio::task::yield_now().await;
        }
    }
}
