//! The accept loop. Every socket is accepted at once, so nobody waits
//! silently in the kernel's backlog: right after `accept`, before hyper
//! parses a byte, the client's address is checked against its per-IP caps
//! ([`super::per_ip`]) and the server against `max_connections`. The excess
//! gets a tiny fixed 429 or 503 with `Retry-After`, written with a short
//! timeout. Answering is bounded too: at most `reject_slots` sockets are
//! open only to be answered; beyond that an excess socket is closed at once.
//!
//! A TLS listener does the same checks first, so a refused client costs no
//! handshake; then the TLS handshake (tls.rs) and the HTTP request that
//! follows share one `handshake_timeout`. Every listener shares the same
//! caps: `max_connections` counts the whole server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::per_ip::{PerIp, RateLog, Verdict};
use super::{Server, Slot};
use crate::config::Limits;
use crate::workers::Workers;
use crate::ws::Stream;

/// How long a refused client gets to take its 429/503 and hang up.
const REJECT_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP keepalive on accepted sockets: a peer that vanished (power loss, a
/// dropped NAT mapping) is found within about two minutes even when neither
/// side has anything to send, and its slot comes back.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// Why a socket is refused right after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The address used up its handshake tokens: 429.
    Rate,
    /// The address holds `max_connections_per_ip` sockets: 503.
    PerIp,
    /// The server holds `max_connections` sockets: 503.
    Full,
}

impl Refusal {
    /// The whole response: fixed bytes, no allocation per refusal.
    fn response(self) -> &'static [u8] {
        match self {
            Refusal::Rate => {
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n\
                  Content-Length: 56\r\nConnection: close\r\n\r\n\
                  429 Too Many Requests: too many handshakes from your IP\n"
            }
            Refusal::PerIp => {
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\
                  Content-Length: 59\r\nConnection: close\r\n\r\n\
                  503 Service Unavailable: too many connections from your IP\n"
            }
            Refusal::Full => {
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\
                  Content-Length: 56\r\nConnection: close\r\n\r\n\
                  503 Service Unavailable: server at its connection limit\n"
            }
        }
    }
}

/// Everything the accept loop decides with.
struct Admission {
    /// `max_connections` places; a connection's [`Slot`] holds one.
    slots: Arc<Semaphore>,
    /// Sockets being answered 429/503.
    rejecting: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    handshake_timeout: Duration,
    /// One rate-limited log per kind of refusal.
    logs: [RateLog; 4],
}

/// One bound socket to serve, TLS or not.
pub struct Bound {
    pub listener: std::net::TcpListener,
    /// `Some`: every connection starts with a TLS handshake.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// Starts one accept loop per listener on the connection runtime, so what
/// they accept is registered there. The returned tasks end at shutdown.
pub fn listen(
    listeners: Vec<Bound>,
    server: &Arc<Server>,
    workers: &Workers,
    limits: &Limits,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let adm = Arc::new(Admission {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        rejecting: Arc::new(Semaphore::new(limits.reject_slots)),
        per_ip: Arc::new(PerIp::new(limits)),
        handshake_timeout: limits.handshake_timeout,
        logs: Default::default(),
    });
    let mut tasks = Vec::new();
    for b in listeners {
        b.listener.set_nonblocking(true)?;
        if let Err(e) = tune(&b.listener) {
            // A listener that is not TCP/IP (never the case today) or a
            // kernel that refuses: connections work, only without keepalive.
            tracing::warn!("cannot set TCP keepalive and TCP_NODELAY on the listener: {e}");
        }
        tasks.push(workers.handle().spawn(accept_loop(
            b.listener,
            server.clone(),
            adm.clone(),
            b.tls,
        )));
    }
    Ok(tasks)
}

/// Keepalive and no Nagle for every accepted socket, set once on the
/// listening socket: Linux copies a listener's socket options (its
/// `SO_KEEPALIVE`, `TCP_KEEPIDLE`/`INTVL`/`CNT` and `TCP_NODELAY`) to each
/// socket it accepts, which saves five `setsockopt` calls per connection
/// (about a tenth of a short connection's syscalls). The test below checks
/// the inheritance on the machine it runs on.
pub fn tune(listener: &std::net::TcpListener) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    sock.set_tcp_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&ka)
}

/// The accept loop. Accept errors (EMFILE when out of file descriptors,
/// ECONNABORTED) back off and retry: the server neither exits nor spins, and
/// open connections are unaffected.
async fn accept_loop(
    listener: std::net::TcpListener,
    server: Arc<Server>,
    adm: Arc<Admission>,
    tls: Option<Arc<crate::tls::Tls>>,
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
        let per_ip = match adm.per_ip.admit(peer.ip(), Instant::now()) {
            Verdict::Admit(g) => g,
            Verdict::TooFast => {
                refuse(&adm, stream, peer, Refusal::Rate);
                continue;
            }
            Verdict::TooMany => {
                refuse(&adm, stream, peer, Refusal::PerIp);
                continue;
            }
        };
        let Ok(permit) = adm.slots.clone().try_acquire_owned() else {
            drop(per_ip);
            refuse(&adm, stream, peer, Refusal::Full);
            continue;
        };
        tracing::debug!(%peer, "accepted");
        let slot = Arc::new(Slot {
            _permit: permit,
            _per_ip: per_ip,
        });
        match &tls {
            None => {
                let task = serve_http(
                    Stream::Plain(stream),
                    peer,
                    server.clone(),
                    slot,
                    adm.handshake_timeout,
                    None,
                    None,
                );
                tokio::spawn(server.tracker.track_future(task));
            }
            Some(tls) => {
                let tls = tls.clone();
                let srv = server.clone();
                let limit = adm.handshake_timeout;
                let task = async move {
                    // One deadline for the TLS handshake and the HTTP
                    // request head after it.
                    let deadline = tokio::time::Instant::now() + limit;
                    let Some((stream, client)) = tls.accept(stream, peer, deadline).await else {
                        return;
                    };
                    let stream = Stream::Tls(Box::new(stream));
                    serve_http(
                        stream,
                        peer,
                        srv,
                        slot,
                        limit,
                        client.map(Arc::new),
                        Some(deadline),
                    )
                    .await
                };
                tokio::spawn(server.tracker.track_future(task));
            }
        }
    }
}

/// Answers a refused socket, or closes it at once when `reject_slots`
/// sockets are already being answered. Logged at most once a second per
/// kind.
fn refuse(adm: &Admission, mut stream: TcpStream, peer: SocketAddr, why: Refusal) {
    let Ok(permit) = adm.rejecting.clone().try_acquire_owned() else {
        adm.logs[3].hit(|n| {
            tracing::warn!(%peer, suppressed = n, "RATE-LIMITED: closed without an answer: reject_slots sockets are already being answered")
        });
        return;
    };
    let (log, what) = match why {
        Refusal::Rate => (&adm.logs[0], "429: handshake_rate_per_ip exceeded"),
        Refusal::PerIp => (&adm.logs[1], "503: max_connections_per_ip reached"),
        Refusal::Full => (&adm.logs[2], "503: max_connections reached"),
    };
    log.hit(|n| tracing::warn!(%peer, suppressed = n, "RATE-LIMITED: {what}"));
    crate::metrics::handshake(if why == Refusal::Rate { 429 } else { 503 });
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REJECT_TIMEOUT, async {
            stream.write_all(why.response()).await?;
            stream.shutdown().await?;
            // Read until the client hangs up: closing with its request
            // unread would send a reset, which can destroy the answer
            // before the client reads it.
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// One accepted connection: HTTP/1.1 until it upgrades to a WebSocket
/// session (http.rs) or closes. `first_by`: the first request's head must
/// have arrived by then (TLS: the handshake already used part of
/// `handshake_timeout`), else the connection closes.
fn serve_http(
    stream: Stream,
    peer: SocketAddr,
    srv: Arc<Server>,
    slot: Arc<Slot>,
    handshake_timeout: Duration,
    client: Option<Arc<crate::tls::ClientCert>>,
    first_by: Option<tokio::time::Instant>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let shutdown = srv.shutdown.clone();
    let io = crate::write_deadline::WriteDeadline::new(stream, srv.write_timeout, peer);
    let got_request = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = got_request.clone();
    let upgrade = Arc::new(crate::http::UpgradeCell::default());
    let accepted = upgrade.clone();
    let server = srv.clone();
    let svc = service_fn(move |req| {
        seen.store(true, std::sync::atomic::Ordering::Relaxed);
        crate::http::handle(
            srv.clone(),
            peer,
            slot.clone(),
            req,
            client.clone(),
            accepted.clone(),
        )
    });
    // Ends when `first_by` passes before any request arrived; pending
    // forever otherwise (hyper's own header_read_timeout covers the rest).
    let first_request_late = async move {
        let Some(at) = first_by else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at).await;
        if got_request.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        tracing::debug!(%peer, "no request within handshake_timeout after the TLS handshake; closing");
    };
    async move {
        // In a block of its own, so hyper's connection (and its buffers) is
        // dropped before the session starts.
        {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r { tracing::debug!(%peer, "http connection: {e}"); }
                }
                _ = first_request_late => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }
        // hyper is done with the socket; an upgrade it answered with 101
        // continues here (or is abandoned, with on_close, if it failed).
        if let Some(p) = upgrade.take() {
            p.start(&server).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_responses_have_the_right_length() {
        for r in [Refusal::Rate, Refusal::PerIp, Refusal::Full] {
            let text = std::str::from_utf8(r.response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains("Retry-After: "), "{head}");
            assert!(
                head.contains(&format!("Content-Length: {}\r\n", body.len())),
                "{r:?}: body is {} bytes: {head}",
                body.len()
            );
        }
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_keepalive_and_nodelay() {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        tune(&std_l).unwrap();
        let l = TcpListener::from_std(std_l).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert!(s.nodelay().unwrap());
    }
}
