//! The accept side under hostile clients (issue #12, section 3): per-IP
//! connection caps and handshake rates, a bounded way of refusing, and the
//! descriptor limit. The test client is 127.0.0.1, which is exempt by
//! default, so these configs set `per_ip_exempt = []`.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Reads a raw response until the server closes.
async fn read_all(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_per_ip_are_capped_with_503() {
    let dir = standard_dir();
    let srv = Wshd::with_config(
        dir.path(),
        "[limits]\nper_ip_exempt = []\nmax_connections_per_ip = 2\n",
        &[],
    );
    let mut a = connect(&srv.url("/echo")).await;
    let mut b = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut a, "a").await, "a");
    assert_eq!(echo_once(&mut b, "b").await, "b");
    let resp = raw_http(&srv.addr, &upgrade_request("/echo", "")).await;
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    assert!(resp.contains("Retry-After: 5\r\n"), "{resp}");
    assert!(resp.contains("too many connections from your IP"), "{resp}");
    srv.wait_log("RATE-LIMITED: 503: max_connections_per_ip reached")
        .await;
    // Leaving gives the place back.
    a.close(None).await.unwrap();
    recv_close(&mut a).await;
    let mut c = crate::lifecycle::connect_when_free(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut c, "c").await, "c");
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_per_ip_are_rate_limited_with_429() {
    let dir = standard_dir();
    // A burst of 3, refilled at one per 100 s: the 4th in a row is refused.
    let srv = Wshd::with_config(
        dir.path(),
        "[limits]\nper_ip_exempt = []\nhandshake_rate_per_ip = 0.01\nhandshake_burst_per_ip = 3\n",
        &[],
    );
    for _ in 0..3 {
        let r = raw_http(
            &srv.addr,
            "GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }
    for _ in 0..5 {
        let r = raw_http(&srv.addr, &upgrade_request("/echo", "")).await;
        assert!(r.starts_with("HTTP/1.1 429 "), "{r}");
        assert!(r.contains("Retry-After: 1\r\n"), "{r}");
    }
    let log = srv.wait_log("RATE-LIMITED: 429").await;
    // Five refusals within a second or two: one line, the rest counted.
    assert!(log.matches("RATE-LIMITED: 429").count() <= 2, "{log}");
}

/// Refusing is bounded: with `reject_slots = 1` and one refused client
/// that does not hang up, the next excess client is closed without an
/// answer; once the first leaves, refusals are answered again.
#[tokio::test(flavor = "multi_thread")]
async fn refusing_is_bounded_by_reject_slots() {
    let dir = standard_dir();
    let srv = Wshd::with_config(
        dir.path(),
        "[limits]\nmax_connections = 1\nreject_slots = 1\n",
        &[],
    );
    let mut held = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut held, "x").await, "x");
    // B reads its 503 but keeps the socket open.
    let mut b = tokio::net::TcpStream::connect(&srv.addr).await.unwrap();
    b.write_all(upgrade_request("/echo", "").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), b.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    // C: the only reject slot is B's, so C gets nothing.
    let c = raw_http(&srv.addr, &upgrade_request("/echo", "")).await;
    assert_eq!(c, "", "refused without a free reject slot");
    srv.wait_log("RATE-LIMITED: closed without an answer").await;
    drop(b);
    // D is answered again once B's slot is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut d = tokio::net::TcpStream::connect(&srv.addr).await.unwrap();
        d.write_all(upgrade_request("/echo", "").as_bytes())
            .await
            .unwrap();
        let r = read_all(&mut d).await;
        if r.starts_with("HTTP/1.1 503 ") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never answered again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts wshd under `sh -c "ulimit ...; exec wshd"` and returns its log
/// once it is listening.
async fn start_with_ulimit(ulimit: &str, handlers: &std::path::Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let addr_file = tmp.path().join("addr");
    let log_path = tmp.path().join("log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit {ulimit} && exec {} -H 127.0.0.1 -p 0 --log-level debug -w {} --addr-file {} 2>{}",
            env!("CARGO_BIN_EXE_wshd"),
            handlers.display(),
            addr_file.display(),
            log_path.display()
        ))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&addr_file).is_ok_and(|a| a.ends_with('\n')) {
        assert!(
            std::time::Instant::now() < deadline,
            "not listening: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "exited {s}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn the_descriptor_limit_is_raised_or_its_shortfall_reported() {
    let dir = standard_dir();
    // Soft limit below the hard one: raised to the hard one.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    if hard > 200 {
        let log = start_with_ulimit("-Sn 200", dir.path()).await;
        assert!(
            log.contains("file descriptor limit raised from 200 to"),
            "{log}"
        );
    }
    // A hard limit too low for max_connections (10000 by default): said,
    // with both numbers.
    let log = start_with_ulimit("-n 128", dir.path()).await;
    assert!(
        log.contains("file descriptor limit 128 is below the")
            && log.contains("max_connections = 10000"),
        "{log}"
    );
}
