//! Serving: routing, the handshake, the example handlers.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn echo_text_binary_and_goodbye() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut ws = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut ws, "hello").await, "hello");
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(blob));
    assert_eq!(echo_once(&mut ws, "Goodbye").await, "Goodbye");
    assert_eq!(recv_close(&mut ws).await.0, 1000);
    // The access line records the close.
    srv.wait_log("close_code=1000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_errors_are_clear() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let r = raw_http(
        &srv.addr,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = raw_http(
        &srv.addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(r.contains("WebSocket endpoint"), "{r}");
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/echo", "Sec-WebSocket-Version: 8\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "{r}"
    );
    let r = raw_http(
        &srv.addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    assert!(
        r.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455 sample accept key: {r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_fans_out_to_every_member() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&srv.url("/chat")).await);
    }
    // Every member must be registered before the broadcast.
    srv.wait_log_count("joined", 3).await;
    clients[0].send(Message::text("hi all")).await.unwrap();
    for c in clients.iter_mut() {
        assert!(recv_text(c).await.contains("hi all"));
    }
}

fn origin_config(dir: &std::path::Path) -> std::path::PathBuf {
    write_config(
        dir,
        r#"
[[route]]
path = "/oc"
handler = "origin_check"
allowed_origins = ["http://good.example", "null"]
[route.config]
allowed_origins = ["http://good.example", "null"]
subprotocols = ["chat.v2", "chat.v1"]
"#,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn subprotocol_choice_and_origin_rejection() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = origin_config(cfg_dir.path());
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);

    let mut req = srv.url("/oc").into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", HeaderValue::from_static("http://good.example"));
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("chat.v1, chat.v2"),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "chat.v2",
        "server preference wins"
    );
    assert_eq!(echo_once(&mut ws, "x").await, "x");

    // `null` is what a page opened from file:// sends.
    let mut req = srv.url("/oc").into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", HeaderValue::from_static("null"));
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());

    let r = raw_http(
        &srv.addr,
        &upgrade_request(
            "/oc",
            "Sec-WebSocket-Version: 13\r\nOrigin: http://evil.example\r\n",
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    srv.wait_log("Origin not allowed").await;

    // Unconfigured routes accept any Origin, including null.
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\nOrigin: null\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_so_serves_several_routes_with_their_own_config() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        cfg_dir.path(),
        r#"
[[route]]
path = "/a"
handler = "origin_check"
aliases = ["/a2"]
[route.config]
subprotocols = ["alpha"]
[[route]]
path = "/b"
handler = "origin_check"
[route.config]
subprotocols = ["beta"]
"#,
    );
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    for (path, proto) in [("/a", "alpha"), ("/a2", "alpha"), ("/b", "beta")] {
        let mut req = srv.url(path).into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("alpha, beta"),
        );
        let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], proto, "{path}");
    }
}

/// A Rust handler's `debug!` lines show when the server logs at debug, with
/// no environment variable set (Wshd::start clears RUST_LOG and
/// WSHD_HANDLER_LOG and passes `--log-level debug`): the SDK asks the host.
#[tokio::test(flavor = "multi_thread")]
async fn a_rust_handler_logs_at_the_servers_level() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut ws = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut ws, "x").await, "x");
    let log = srv.wait_log("echo: open").await;
    let line = log.lines().find(|l| l.contains("echo: open")).unwrap();
    assert!(line.contains("DEBUG"), "{line}");
}

/// Messages and frames up to 4 KiB.
const LIMITS_4K: &str = "[limits]\nmax_message_size = \"4KiB\"\nmax_frame_size = \"4KiB\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn over_limit_message_gets_1009() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), LIMITS_4K, &[]);
    let mut ws = connect(&srv.url("/echo")).await;
    let exact = "x".repeat(4096);
    assert_eq!(echo_once(&mut ws, &exact).await, exact);
    ws.send(Message::text("y".repeat(4097))).await.unwrap();
    assert_eq!(recv_close(&mut ws).await.0, 1009);
}

/// A client may send its first frame in the same packet as the upgrade
/// request; those bytes reach the session even though hyper read them.
#[tokio::test(flavor = "multi_thread")]
async fn frame_sent_with_the_upgrade_request_is_echoed() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &["--workers", "3"]);
    let mut s = tokio::net::TcpStream::connect(&srv.addr).await.unwrap();
    let mut bytes = upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n").into_bytes();
    // A text frame "hi", written in the same call.
    bytes.extend(client_frame(0x1, b"hi"));
    s.write_all(&bytes).await.unwrap();

    let mut got = Vec::new();
    let want_tail = [0x81u8, 2, b'h', b'i'];
    while !got.ends_with(&want_tail) {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no echo")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// A peer still sending the rest of an oversized message when we refuse it
/// must see our 1009 and a clean end of stream, not a reset: a socket closed
/// with unread data sends RST, and a peer that gets it drops the close frame
/// it had not read yet (Node `ws` then reports 1006).
#[tokio::test(flavor = "multi_thread")]
async fn over_limit_message_in_flight_gets_1009_then_fin_not_reset() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), LIMITS_4K, &[]);
    let mut s = tokio::net::TcpStream::connect(&srv.addr).await.unwrap();
    s.write_all(upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "handshake cut short");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    // One masked binary frame of 64 KiB: the header alone exceeds the limit,
    // so the server refuses it with the payload still unread.
    let frame = client_frame(0x2, &[b'a'; 64 * 1024]);
    s.write_all(&frame).await.unwrap();

    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("server neither closed nor reset");
    assert!(end.is_ok(), "connection reset instead of closed: {end:?}");
    // An unmasked close frame carrying 1009.
    assert!(got.len() >= 4 && got[0] == 0x88, "no close frame: {got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1009);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_close_code_and_reason_reach_the_handler_and_come_back() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut ws = connect(&srv.url("/chat")).await;
    srv.wait_log("joined").await;
    ws.close(Some(CloseFrame {
        code: 4000.into(),
        reason: "bye now".into(),
    }))
    .await
    .unwrap();
    assert_eq!(recv_close(&mut ws).await, (4000, "bye now".to_string()));
    // The chat handler logs the code its on_close received.
    srv.wait_log("left with code 4000").await;
    let log = srv.wait_log("close_reason=bye now").await;
    assert!(log.contains("closed_by=Peer"), "{log}");
}
