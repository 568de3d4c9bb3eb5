//! The HTTP side of the port, on hyper: routes each request to a WebSocket
//! upgrade, a static file, or a clear error.
//!
//! * Unknown path: the document root if there is one, else 404.
//! * A handler path without an upgrade: 426 saying a WebSocket was expected.
//! * An upgrade is checked per RFC 6455 §4.2.1 (GET, HTTP/1.1, `Upgrade`,
//!   `Connection`, a 16-byte base64 `Sec-WebSocket-Key`, version 13; a wrong
//!   version gets 426 with `Sec-WebSocket-Version: 13`), then the route's
//!   Origin allowlist (403), then the handler's `on_handshake`, which may
//!   reject, pick a subprotocol or add headers. Then 101, and the upgraded
//!   socket goes to a [`Session`](crate::session).
//!
//! Before any of that, every request passes [`check_request`]: exactly one
//! `Host` (HTTP/1.1), a request target that is a path (origin-form) or an
//! absolute URL (absolute-form, which RFC 9112 §3.2.2 says a server must
//! accept; its path is what is routed), at most [`MAX_REQUEST_TARGET`]
//! bytes (else 414). Authority-form (`CONNECT host:port`), asterisk-form
//! (`OPTIONS *`) and any other method that would need a proxy get 400.
//!
//! Every client-controlled value that reaches the log goes through
//! [`logsafe::esc`](crate::logsafe::esc): escaped and capped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::handshake::HandshakeInput;
use crate::logsafe::esc;
use crate::server::Server;
use crate::session;
use crate::write_deadline::WriteDeadline;

/// Longest request target (path plus query, or the whole absolute URL)
/// served, in bytes; longer ones get 414. Far above any real route or
/// document-root path (Linux refuses file paths over 4 KiB anyway), far below
/// hyper's 64 KiB head buffer.
pub const MAX_REQUEST_TARGET: usize = 8 * 1024;

/// Request headers that must not repeat (RFC 6455 §4.1 sends each once;
/// RFC 9112 §3.2 requires exactly one `Host`). Two values would let the
/// checks here and the handler read different ones.
const SINGLE_HEADERS: [header::HeaderName; 4] = [
    header::HOST,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::ORIGIN,
];

/// Response body: small in-memory bodies or static files.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body: String = body.into();
    body.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Error bodies quote the request (path, Origin): never let a browser
    // sniff them into HTML.
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The checks every request passes, whatever it asks for: `Some` is the
/// 4xx to answer with.
pub fn check_request<B>(req: &Request<B>) -> Option<Response<Body>> {
    let uri = req.uri();
    // Origin-form ("/path?q") and absolute-form ("http://host/path") have a
    // path starting with '/'; authority-form ("host:443", CONNECT) and
    // asterisk-form ("*", OPTIONS) do not.
    let has_path = uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str().starts_with('/'));
    if req.method() == Method::CONNECT || !has_path {
        return Some(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: this server is not a proxy; the request target must be a path \
             such as /echo (CONNECT, `host:port` and `*` targets are refused)",
        ));
    }
    let target_len = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_REQUEST_TARGET {
        return Some(text(
            StatusCode::URI_TOO_LONG,
            format!(
                "414 URI Too Long: the request target is {target_len} bytes; at most \
                 {MAX_REQUEST_TARGET} are accepted"
            ),
        ));
    }
    // HTTP/1.0 may omit Host (RFC 9112 §3.2 requires it from 1.1 on).
    if req.version() == Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        return Some(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: an HTTP/1.1 request needs a Host header",
        ));
    }
    for name in &SINGLE_HEADERS {
        let n = req.headers().get_all(name).iter().count();
        if n > 1 {
            return Some(text(
                StatusCode::BAD_REQUEST,
                format!("400 Bad Request: the {name} header appears {n} times; send it once"),
            ));
        }
    }
    None
}

/// Whether a header holds `token` in its comma-separated list
/// (case-insensitive), as `Connection: keep-alive, Upgrade` does.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Serves one request. Never fails: every problem is an HTTP response.
/// A request with `Upgrade: websocket` is a handshake attempt, counted in
/// `wshd_handshakes_total` by the status it gets.
pub async fn handle(
    server: Arc<Server>,
    peer: SocketAddr,
    slot: Arc<crate::server::Slot>,
    req: Request<Incoming>,
    client: Option<Arc<crate::tls::ClientCert>>,
    upgrade: Arc<UpgradeCell>,
) -> Result<Response<Body>, Infallible> {
    let attempt = has_token(req.headers(), header::UPGRADE, "websocket");
    let response = respond(server, peer, slot, req, client, &upgrade).await;
    if attempt && let Ok(r) = &response {
        crate::metrics::handshake(r.status().as_u16());
    }
    response
}

async fn respond(
    server: Arc<Server>,
    peer: SocketAddr,
    slot: Arc<crate::server::Slot>,
    mut req: Request<Incoming>,
    client: Option<Arc<crate::tls::ClientCert>>,
    upgrade: &UpgradeCell,
) -> Result<Response<Body>, Infallible> {
    if let Some(refusal) = check_request(&req) {
        let target = crate::auth::redact_target(&req.uri().to_string());
        tracing::debug!(%peer, method = %esc(req.method().as_str()), target = %esc(&target), "request refused: {}", refusal.status());
        return Ok(refusal);
    }
    let path = req.uri().path().to_owned();
    // During a canary rollout the route picks which version serves this
    // connection (routing.rs); everything below sees just that version.
    let route = server.table.load().get(&path).map(|r| r.pick());
    let Some(route) = route else {
        if let Some(files) = server.static_files() {
            return Ok(files.serve(req).await);
        }
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("404 Not Found: no handler serves {path}"),
        ));
    };

    let headers = req.headers();
    let is_upgrade = has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            format!(
                "426 Upgrade Required: {path} is a WebSocket endpoint. Connect with a WebSocket client \
                 (for example new WebSocket(\"ws://HOST{path}\") in a browser); this request had no \
                 `Upgrade: websocket` / `Connection: Upgrade` headers."
            ),
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        return Ok(r);
    }
    if req.method() != Method::GET {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: a WebSocket handshake must use GET",
        ));
    }
    if req.version() != Version::HTTP_11 {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: a WebSocket handshake needs HTTP/1.1",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "426 Upgrade Required: this server speaks WebSocket version 13 (RFC 6455) only",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Ok(r);
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .filter(|k| valid_key(k.as_bytes()))
    else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: Sec-WebSocket-Key must be 16 random bytes, base64-encoded",
        ));
    };
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
    if !route.origin_allowed(origin.as_deref()) {
        let shown = origin.as_deref().unwrap_or("(none)");
        tracing::info!(%peer, path = %esc(&path), origin = %esc(shown), "handshake refused: Origin not allowed");
        return Ok(text(
            StatusCode::FORBIDDEN,
            format!("403 Forbidden: Origin {shown} is not allowed on {path}"),
        ));
    }

    // `[route.auth]`: a valid token before the handler runs (auth.rs).
    let verified = match &route.limits.auth {
        None => None,
        Some(auth) => {
            let checked = match crate::auth::token_of(headers, req.uri().query()) {
                None => Err(crate::auth::Refused(
                    "no token: send `Authorization: Bearer TOKEN` or `?token=TOKEN`".into(),
                )),
                Some(t) => auth.verify(&t),
            };
            match checked {
                Ok(v) => Some(v),
                Err(crate::auth::Refused(why)) => {
                    tracing::info!(%peer, path = %esc(&path), "handshake refused: 401, {why}");
                    let mut r = text(
                        StatusCode::UNAUTHORIZED,
                        format!("401 Unauthorized: {path} needs a valid token: {why}"),
                    );
                    // RFC 6750 §3; the description is ours, never the token.
                    let challenge = format!(
                        "Bearer realm=\"wshd\", error=\"invalid_token\", error_description=\"{}\"",
                        why.replace(['"', '\\'], "'")
                    );
                    if let Ok(v) = HeaderValue::from_str(&challenge) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                    return Ok(r);
                }
            }
        }
    };

    let conn = server.next_conn.fetch_add(1, Ordering::Relaxed);
    // The handler's view of the request is built only for a handler that
    // has a handshake callback: copying every header, the path, the query
    // and the peer into owned strings is most of what a handshake costs in
    // user space otherwise.
    let (decision, subprotocols) = if route.instance.has_handshake() {
        let subprotocols: Vec<String> = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let mut query = req.uri().query().unwrap_or("").to_owned();
        // With the verified client certificate's subject and SANs, and
        // never a client-sent copy of those headers (tls.rs).
        let mut view_headers = crate::tls::client_headers(headers, client.as_deref());
        if route.limits.auth.is_some() {
            // The handler gets the verified claims, not the token, and no
            // client-sent copy of the claim headers.
            query = crate::auth::redact_query(&query);
            view_headers.retain(|(n, _)| {
                n != header::AUTHORIZATION.as_str()
                    && n != crate::auth::SUB_HEADER
                    && n != crate::auth::CLAIMS_HEADER
            });
            if let Some(v) = &verified {
                if let Some(sub) = &v.sub {
                    view_headers.push((crate::auth::SUB_HEADER.into(), sub.clone().into_bytes()));
                }
                let claims = serde_json::Value::Object(v.claims.clone()).to_string();
                view_headers.push((crate::auth::CLAIMS_HEADER.into(), claims.into_bytes()));
            }
        }
        let input = HandshakeInput {
            conn,
            path: path.clone(),
            query,
            origin,
            remote_addr: peer.to_string(),
            headers: view_headers,
            subprotocols: subprotocols.clone(),
        };
        (route.instance.handshake(input).await, subprotocols)
    } else {
        Default::default()
    };
    if let Some((status, body)) = decision.reject {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        // The body is the handler's, but handlers quote the request in it.
        tracing::info!(%peer, path = %esc(&path), status = status.as_u16(), "handshake refused by handler: {}", esc(&body));
        return Ok(text(status, body));
    }

    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    let protocol = decision.selected.map(|i| subprotocols[i].clone());
    if let Some(p) = &protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).expect("came from a header"),
        );
    }
    for (name, value) in decision.headers {
        // The rules (wshd_handler_api::rules) only admit tokens and values
        // without control bytes, which http accepts; a failure here would be
        // a bug there, so the header is dropped rather than the connection.
        match (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(n), Ok(v)) => {
                h.append(n, v);
            }
            _ => {
                tracing::error!(%peer, header = %esc(&name), "handler header refused by http; dropped")
            }
        }
    }

    // permessage-deflate (deflate.rs), where the route allows it and the
    // client offers it.
    let deflate = match route.limits.compression {
        crate::config::Compression::On => crate::deflate::negotiate(
            headers
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(HeaderValue::as_bytes),
        ),
        crate::config::Compression::Off => None,
    };
    if let Some(p) = &deflate {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(&p.response()).expect("ASCII"),
        );
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    if let Some(v) = &verified {
        // Watched until the session (or its abandon) forgets it.
        server.auth.admit(conn, v);
    }
    // on_open before the 101 goes out: see `session::Opening`.
    let opening = session::open(
        route.clone(),
        conn,
        peer,
        protocol.as_deref(),
        server.clone(),
        slot,
    )
    .await;
    // Copied out: the pending upgrade must not hold the route (and so its
    // instance) for the connection's life; a handover moves the session to
    // another.
    upgrade.put(Pending {
        on_upgrade,
        opening,
        ws_config: route.ws_config,
        deflate,
        peer,
    });
    Ok(resp)
}

/// Where the service leaves an accepted upgrade for the connection task
/// (`server::listener::serve_http`). That task finishes the upgrade once
/// hyper has written the 101 and let go of the socket, so a connection costs
/// two tasks (HTTP, then the session) rather than three: every spawn may
/// wake another worker thread, which shows in the handshake benchmark.
#[derive(Default)]
pub struct UpgradeCell(std::sync::Mutex<Option<Pending>>);

impl UpgradeCell {
    fn put(&self, p: Pending) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// The upgrade the service accepted, if any.
    pub fn take(&self) -> Option<Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// An accepted upgrade: `on_open` has run, the 101 is queued in hyper.
pub struct Pending {
    on_upgrade: hyper::upgrade::OnUpgrade,
    opening: session::Opening,
    ws_config: crate::ws::Config,
    deflate: Option<crate::deflate::Params>,
    peer: SocketAddr,
}

impl Pending {
    /// Takes the socket back from hyper and starts the session in a task
    /// of its own; or, when the upgrade failed (the 101 could not be
    /// written) or the server is stopping, gives the handler its
    /// `on_close`.
    pub async fn start(self, server: &Server) {
        let Pending {
            on_upgrade,
            opening,
            ws_config,
            deflate,
            peer,
        } = self;
        let upgraded = tokio::select! {
            u = on_upgrade => u,
            _ = server.shutdown.cancelled() => return opening.abandon().await,
        };
        let upgraded = match upgraded {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, "upgrade failed: {e}");
                return opening.abandon().await;
            }
        };
        // Take the TCP (or TLS) stream back out of hyper: the session then
        // reads and writes the socket directly, not through the boxed
        // `dyn Io` and two adapters of `Upgraded` (measurable per message,
        // and heap per connection). Bytes the client sent after its request
        // are handed to the codec.
        let parts = match upgraded.downcast::<TokioIo<WriteDeadline<crate::ws::Stream>>>() {
            Ok(p) => p,
            Err(_) => {
                tracing::error!(%peer, "upgraded connection is not a wshd stream; dropping it");
                return opening.abandon().await;
            }
        };
        // The session has its own write timeout: drop the HTTP one.
        let stream = parts.io.into_inner().into_inner();
        // Copy out and drop at once: `read_buf` is a view of hyper's whole
        // read buffer, which would otherwise stay allocated for the
        // connection's life.
        let early = (!parts.read_buf.is_empty()).then(|| parts.read_buf.to_vec());
        drop(parts.read_buf);
        let ws = crate::ws::WsConn::new(stream, early, ws_config, deflate);
        // A task of its own: a task is allocated at its largest state for
        // its whole life, and the connection task also held hyper's
        // connection. The session task holds only the session (see
        // session::run_inner).
        server.tracker.spawn(opening.run(ws));
    }
}

/// RFC 6455 §4.2.1: the key is base64 of exactly 16 bytes.
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!valid_key(b"not base64 at all!!!!!!!"));
        assert!(!valid_key(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
    }

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::CONNECTION, "close"));
    }
}
