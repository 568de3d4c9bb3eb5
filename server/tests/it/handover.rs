//! Connection handover (ABI 1.2): a reload moves open connections to the new
//! version between two messages instead of draining them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Installs a new version of `name`: the built library with `marker` bytes
/// appended (a different hash, the same code), renamed into place.
fn reinstall(dir: &Path, name: &str, marker: u8) {
    let file = format!("lib{name}_wsh.so");
    let mut bytes = std::fs::read(built_handlers().join(&file)).unwrap();
    bytes.extend_from_slice(&[marker; 64]);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Fast reloads, drain after `drain`.
fn config(drain: &str, extra: &str) -> String {
    format!(
        "[reload]\ndebounce = \"50ms\"\ndrain_timeout = \"{drain}\"\ndrain_window = \"200ms\"\n{extra}"
    )
}

/// What one client saw.
#[derive(Debug)]
struct Seen {
    /// Replies checked (for counter: "N: text" with N consecutive).
    replies: usize,
    /// The server's close code, if it closed the connection.
    closed: Option<u16>,
}

/// `clients` connections to `url` send and read continuously until `stop`
/// (or until the server closes them). For counter (`counted`), every reply
/// must be "N: text" with N exactly one more than the last; for echo, the
/// text itself.
fn load(
    url: &str,
    clients: usize,
    counted: bool,
    stop: &Arc<AtomicBool>,
    warmed: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..clients)
        .map(|c| {
            let (url, stop, warmed) = (url.to_owned(), stop.clone(), warmed.clone());
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let text = format!("c{c}-{n}");
                    if ws.send(Message::text(text.clone())).await.is_err() {
                        break;
                    }
                    match recv(&mut ws).await {
                        Message::Text(t) => {
                            let want = if counted {
                                format!("{}: {text}", n + 1)
                            } else {
                                text
                            };
                            assert_eq!(t.as_str(), want, "client {c}: reply {n}");
                        }
                        Message::Close(f) => {
                            return Seen {
                                replies: n,
                                closed: Some(f.map_or(1005, |f| u16::from(f.code))),
                            };
                        }
                        other => panic!("client {c}: unexpected {other:?}"),
                    }
                    n += 1;
                    if n == 3 {
                        warmed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Seen {
                    replies: n,
                    closed: None,
                }
            })
        })
        .collect()
}

async fn warm(warmed: &AtomicUsize, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while warmed.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "clients never got going"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn counter_under_load_moves_every_connection_through_20_reinstalls() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "counter", "libcounter_wsh.so");
    let srv = Wshd::with_config(dir.path(), &config("2s", ""), &[]);
    const CLIENTS: usize = 50;
    const RELOADS: usize = 20;
    let stop = Arc::new(AtomicBool::new(false));
    let warmed = Arc::new(AtomicUsize::new(0));
    let tasks = load(&srv.url("/counter"), CLIENTS, true, &stop, &warmed);
    warm(&warmed, CLIENTS).await;

    for i in 0..RELOADS {
        reinstall(dir.path(), "counter", i as u8 + 1);
        // Each version takes over every connection before the next one.
        srv.wait_log_count("handed over from", CLIENTS * (i + 1))
            .await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut replies = 0;
    for t in tasks {
        let seen = t.await.expect("client task");
        assert_eq!(seen.closed, None, "no connection was closed: {seen:?}");
        replies += seen.replies;
    }
    assert!(replies >= CLIENTS * 3);
    let log = srv.log();
    assert_eq!(
        log.matches("handing over the").count(),
        RELOADS,
        "one handover per reinstall:\n{log}"
    );
    assert!(
        !log.contains("closing with 1012"),
        "nothing drained:\n{log}"
    );
    assert!(!log.contains("stays on"), "every handover worked:\n{log}");
    // Every old version was destroyed once its connections had moved.
    srv.wait_log_count(
        &format!("({CLIENTS} connections handed over, 0 stayed)"),
        RELOADS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_handover_support_the_same_reinstall_drains_with_1012() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "echo", "libecho_wsh.so");
    let srv = Wshd::with_config(dir.path(), &config("2s", ""), &[]);
    const CLIENTS: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let warmed = Arc::new(AtomicUsize::new(0));
    let tasks = load(&srv.url("/echo"), CLIENTS, false, &stop, &warmed);
    warm(&warmed, CLIENTS).await;
    reinstall(dir.path(), "echo", 1);
    for t in tasks {
        let seen = t.await.expect("client task");
        assert_eq!(seen.closed, Some(1012), "drained as before: {seen:?}");
    }
    assert!(!srv.log().contains("handed over from"));
}

/// One counter connection that has sent `n` messages.
async fn counted(url: &str, n: usize) -> Client {
    let mut ws = connect(url).await;
    for i in 1..=n {
        assert_eq!(
            echo_once(&mut ws, &format!("m{i}")).await,
            format!("{i}: m{i}")
        );
    }
    ws
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_that_fails_leaves_the_connection_draining_on_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "counter", "libcounter_wsh.so");
    let cfg_dir = tempfile::tempdir().unwrap();
    let route = |refuse: bool| {
        config(
            "1s",
            &format!(
                "[[route]]\npath = \"/counter\"\nhandler = \"counter\"\n[route.config]\nrefuse_import = {refuse}\n"
            ),
        )
    };
    let cfg = write_config(cfg_dir.path(), &route(false));
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut ws = counted(&srv.url("/counter"), 2).await;

    // A new config makes a new instance, which refuses every import.
    write_config(cfg_dir.path(), &route(true));
    srv.signal("HUP");
    let log = srv.wait_log("refused the state").await;
    assert!(log.contains("stays on"), "{log}");
    // Still the old version, count intact, until the drain closes it.
    assert_eq!(echo_once(&mut ws, "m3").await, "3: m3");
    assert_eq!(recv_close(&mut ws).await.0, 1012);
    srv.wait_log("(0 connections handed over, 1 stayed)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_over_handover_max_bytes_is_refused_and_the_connection_drains() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "counter", "libcounter_wsh.so");
    // counter's JSON state is ~30 bytes: over a 16-byte cap.
    let srv = Wshd::with_config(dir.path(), &config("1s", "handover_max_bytes = 16\n"), &[]);
    let mut ws = counted(&srv.url("/counter"), 2).await;
    reinstall(dir.path(), "counter", 1);
    let log = srv.wait_log("over handover_max_bytes (16 bytes)").await;
    assert!(log.contains("stays on"), "{log}");
    assert_eq!(echo_once(&mut ws, "m3").await, "3: m3");
    assert_eq!(recv_close(&mut ws).await.0, 1012);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_canary_hands_its_connections_back() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "counter", "libcounter_wsh.so");
    let cfg_dir = tempfile::tempdir().unwrap();
    let at = |p: u8| {
        config(
            "1h",
            &format!("[rollout]\ncanary_percent = {p}\ncanary_period = \"1h\"\n"),
        )
    };
    let cfg = write_config(cfg_dir.path(), &at(50));
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    reinstall(dir.path(), "counter", 1);
    srv.wait_log("canary started").await;
    let url = srv.url("/counter");
    // At 50%, two of these four are on the canary.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(counted(&url, 2).await);
    }

    write_config(cfg_dir.path(), &at(0));
    srv.signal("HUP");
    let log = srv.wait_log("rolled back").await;
    assert!(log.contains("(2 handed over)"), "{log}");
    srv.wait_log_count("handed over from", 2).await;
    for ws in &mut clients {
        assert_eq!(echo_once(ws, "m3").await, "3: m3", "count kept, no close");
    }
    // The canary is gone once its connections moved back.
    srv.wait_log("(2 connections handed over, 0 stayed)").await;
}
