//! Strict edges (issue #12 §4, and the hs_reject panic of §5): malformed
//! and ambiguous requests get a clear 4xx, the document root hides
//! dotfiles and cuts off readers that stall, client-controlled text cannot
//! forge log lines, and a multi-byte reject body does not abort the server.

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// One request on a fresh connection; returns the status line, the head
/// and the body (read by Content-Length, so keep-alive does not stall us).
async fn request(addr: &str, raw: &[u8]) -> (String, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 16 * 1024];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                assert!(n > 0, "connection closed before a full head");
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if buf.len() >= end + 4 + len || n == 0 {
                return end;
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no complete response within 10 s");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.lines().next().unwrap_or("").to_owned();
    (status, head, buf[end + 4..].to_vec())
}

fn upgrade(path: &str, extra: &str) -> Vec<u8> {
    upgrade_request(path, &format!("Sec-WebSocket-Version: 13\r\n{extra}")).into_bytes()
}

/// A document root with an index, dotfiles and a dot-directory.
fn www(dir: &Path) {
    std::fs::write(dir.join("index.html"), "hello\n").unwrap();
    std::fs::write(dir.join(".env"), "SECRET=1\n").unwrap();
    std::fs::create_dir_all(dir.join(".git")).unwrap();
    std::fs::write(dir.join(".git/config"), "[core]\n").unwrap();
    std::fs::create_dir_all(dir.join("a/.hidden")).unwrap();
    std::fs::write(dir.join("a/.hidden/x"), "x\n").unwrap();
    std::fs::create_dir_all(dir.join(".well-known")).unwrap();
    std::fs::write(dir.join(".well-known/security.txt"), "Contact: x\n").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn host_key_and_version_must_appear_exactly_once() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "no Host",
            format!(
                "GET /echo HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .into_bytes(),
            "needs a Host header",
        ),
        (
            "two Hosts",
            upgrade("/echo", "Host: y\r\n"),
            "the host header appears 2 times",
        ),
        (
            "two keys",
            upgrade("/echo", key),
            "the sec-websocket-key header appears 2 times",
        ),
        (
            "two versions",
            upgrade("/echo", "Sec-WebSocket-Version: 13\r\n"),
            "the sec-websocket-version header appears 2 times",
        ),
        (
            "two Origins",
            upgrade("/echo", "Origin: http://a\r\nOrigin: http://b\r\n"),
            "the origin header appears 2 times",
        ),
    ];
    for (what, raw, why) in cases {
        let (status, _, body) = request(&srv.addr, &raw).await;
        let body = String::from_utf8_lossy(&body);
        assert!(status.starts_with("HTTP/1.1 400"), "{what}: {status}");
        assert!(body.contains(why), "{what}: {body}");
    }
    // The same request with each header once still upgrades.
    let (status, _, _) = request(&srv.addr, &upgrade("/echo", "")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_targets_authority_absolute_and_too_long() {
    let dir = standard_dir();
    let root = tempfile::tempdir().unwrap();
    www(root.path());
    let srv = Wshd::start(dir.path(), &["-d", root.path().to_str().unwrap()]);

    for raw in [
        "GET example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let (status, _, body) = request(&srv.addr, raw.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{raw:?}: {status}");
        assert!(
            String::from_utf8_lossy(&body).contains("not a proxy"),
            "{raw:?}"
        );
    }

    // Absolute-form is legal HTTP/1.1: routed by its path.
    let abs = format!("http://{}/echo", srv.addr);
    let (status, _, _) = request(&srv.addr, &upgrade(&abs, "")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let (status, _, body) = request(
        &srv.addr,
        format!(
            "GET http://{}/index.html HTTP/1.1\r\nHost: x\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, b"hello\n");

    // Over the 8 KiB target limit: 414, for a route and for the root.
    for path in [
        format!("/echo?{}", "q".repeat(9000)),
        format!("/{}", "a".repeat(9000)),
    ] {
        let (status, _, body) = request(
            &srv.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 414"), "{status}");
        assert!(String::from_utf8_lossy(&body).contains("at most 8192"));
    }
    // Under it, but a name no file system accepts (ENAMETOOLONG): 404.
    for path in [format!("/{}", "a".repeat(300)), "/a".repeat(2600)] {
        let (status, _, _) = request(
            &srv.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    }
    // None of this is a server problem: no 500, no warning.
    let log = srv.log();
    assert!(!log.contains("static file error"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dotfiles_and_dot_directories_are_not_served() {
    let dir = standard_dir();
    let root = tempfile::tempdir().unwrap();
    www(root.path());
    let srv = Wshd::start(dir.path(), &["-d", root.path().to_str().unwrap()]);
    for path in [
        "/.env",
        "/%2eenv",
        "/.git/config",
        "/%2Egit/config",
        "/a/.hidden/x",
        "/.git/",
    ] {
        let (status, _, body) = request(
            &srv.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 404"), "{path}: {status}");
        assert!(!String::from_utf8_lossy(&body).contains("SECRET"));
    }
    for path in ["/index.html", "/.well-known/security.txt"] {
        let (status, _, _) = request(
            &srv.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn static_file_readers_that_stall_are_cut_off_by_write_timeout() {
    const SIZE: usize = 10 << 20;
    const CLIENTS: usize = 5;
    let dir = standard_dir();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("big.bin"), vec![7u8; SIZE]).unwrap();
    let toml = format!(
        "document_root = {:?}\n[limits]\nwrite_timeout = \"1s\"\n",
        root.path().to_str().unwrap()
    );
    let srv = Wshd::with_config(dir.path(), &toml, &[]);

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window, so the server's writes stall soon.
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(srv.addr.parse().unwrap()).await.unwrap();
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        clients.push(s);
    }
    // Nobody reads. Each connection is ended once its write has made no
    // progress for 1 s (before the fix they stayed open for good).
    srv.wait_log_count("made no progress", CLIENTS).await;
    for mut s in clients {
        // What was already in flight still arrives, then the stream ends.
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "the connection is still open");
        assert!(got < SIZE, "the whole file arrived ({got} bytes)");
    }
    // The server still serves.
    let (status, _, _) = request(&srv.addr, &upgrade("/echo", "")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_text_cannot_forge_log_lines() {
    let dir = standard_dir();
    let toml = r#"
[[route]]
path = "/guarded"
handler = "echo"
allowed_origins = ["http://good.example"]
"#;
    let srv = Wshd::with_config(dir.path(), toml, &[]);
    let forged = "2026-01-01T00:00:00.000000Z ERROR forged";

    // A handler reject body that quotes the request: the testkit handler
    // percent-decodes ?reject= into its body, as a careless handler might.
    let query = "reject=bye%0a2026-01-01T00:00:00.000000Z%20ERROR%20forged%1b%5b31m";
    let (status, _, body) = request(&srv.addr, &upgrade(&format!("/testkit?{query}"), "")).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    assert!(String::from_utf8_lossy(&body).starts_with("bye\n2026"));
    srv.wait_log("handshake refused by handler").await;

    // An Origin with a C1 control (CSI, an ANSI escape on many terminals)
    // refused by the route's allowlist.
    let raw = [
        upgrade("/guarded", "").strip_suffix(b"\r\n").unwrap(),
        b"Origin: http://evil.example\xc2\x9b31m\r\n\r\n",
    ]
    .concat();
    let (status, _, _) = request(&srv.addr, &raw).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    srv.wait_log("Origin not allowed").await;

    // A close reason with a newline, a fake log line and an ANSI escape:
    // the access line logs it (the measured attack in issue #12).
    let mut ws = connect(&srv.url("/echo")).await;
    let reason = format!("bye\n{forged} close\x1b[31m");
    ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 4000.into(),
            reason: reason.into(),
        },
    )))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let log = srv.wait_log("close_code=4000").await;

    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "forged line:\n{log}"
    );
    assert!(!log.contains('\x1b') && !log.contains('\u{9b}'), "{log}");
    assert!(
        log.contains("bye\\x0a2026-01-01T00:00:00.000000Z ERROR forged close\\x1b[31m"),
        "{log}"
    );
    assert!(log.contains("bye\\x0a2026-01-01"), "{log}");
    assert!(log.contains("evil.example\\xc2\\x9b31m"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multibyte_reject_body_is_cut_without_aborting_the_server() {
    // Issue #12 §5: 4,200 bytes of "€" put byte 4096 inside a character and
    // String::truncate panicked in hs_reject, aborting the whole server.
    let dir = standard_dir();
    let mut srv = Wshd::start(dir.path(), &[]);
    let (status, _, body) = request(&srv.addr, &upgrade("/testkit?reject_euro=4200", "")).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body, format!("{}\n", "€".repeat(1365)));
    assert!(srv.child.try_wait().unwrap().is_none(), "wshd exited");
    let mut ws = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut ws, "still here").await, "still here");
    drop(ws);
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(Duration::from_secs(20)).await, Some(0));
}
