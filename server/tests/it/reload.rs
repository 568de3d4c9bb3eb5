//! Hot reload: handler files and config change under a running server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Builds the C echo twice: v1 echoes as is, v2 prefixes "v2:".
fn c_versions() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let v1 = d.path().join("v1.so");
    let v2 = d.path().join("v2.so");
    build_c(&v1, &[]);
    build_c(&v2, &["-DECHO_PREFIX=\"v2:\""]);
    (d, v1, v2)
}

/// Fast reloads, and the given drain timeout.
fn reload_config(drain: &str) -> String {
    format!(
        "[reload]\ndebounce = \"50ms\"\ndrain_timeout = \"{drain}\"\ndrain_window = \"500ms\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_over_a_loaded_handler_under_load() {
    let (_b, v1, v2) = c_versions();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("c_echo_wsh.so");
    std::fs::copy(&v1, &target).unwrap();
    let srv = Wshd::with_config(dir.path(), &reload_config("2s"), &[]);
    let url = srv.url("/c_echo");

    const CLIENTS: usize = 50;
    let swapped = Arc::new(AtomicBool::new(false));
    let warmed = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (url, swapped, warmed, finished) = (
            url.clone(),
            swapped.clone(),
            warmed.clone(),
            finished.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Per connection: the answers it got, as "old" or "new".
            let mut first = connect(&url).await;
            let mut old_after_swap = 0;
            let mut n = 0;
            let close = loop {
                let msg = format!("c{c}-{n}");
                first
                    .send(Message::text(msg.clone()))
                    .await
                    .expect("send on the first connection");
                match recv(&mut first).await {
                    Message::Text(t) => {
                        assert_eq!(
                            t.as_str(),
                            msg,
                            "the first connection must keep the old version"
                        );
                        if swapped.load(Ordering::SeqCst) {
                            old_after_swap += 1;
                        }
                    }
                    Message::Close(f) => break f.map(|f| u16::from(f.code)),
                    other => panic!("unexpected {other:?}"),
                }
                n += 1;
                if n == 5 {
                    warmed.fetch_add(1, Ordering::SeqCst);
                }
            };
            assert_eq!(close, Some(1012), "drained with 1012 (service restart)");
            // Reconnect, as a client does after 1012: the new version answers.
            let mut second = connect(&url).await;
            for i in 0..5 {
                let msg = format!("c{c}-again-{i}");
                assert_eq!(echo_once(&mut second, &msg).await, format!("v2:{msg}"));
            }
            finished.fetch_add(1, Ordering::SeqCst);
            old_after_swap
        }));
    }
    while warmed.load(Ordering::SeqCst) < CLIENTS {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The dangerous way: overwrite the loaded file in place (same inode).
    std::fs::copy(&v2, &target).unwrap();
    srv.wait_log("swapped").await;
    swapped.store(true, Ordering::SeqCst);
    let mut fresh = connect(&url).await;
    assert_eq!(echo_once(&mut fresh, "new").await, "v2:new");

    let mut old_after_swap = 0;
    for t in tasks {
        old_after_swap += t.await.expect("client task failed");
    }
    assert_eq!(finished.load(Ordering::SeqCst), CLIENTS);
    assert!(
        old_after_swap > 0,
        "old connections kept answering on the old version after the swap"
    );
    let log = srv.log();
    assert!(!log.contains("upgrade failed"), "{log}");
    // The old version was destroyed once its last connection closed.
    srv.wait_log("destroyed handler instance").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_replacements_keep_the_old_version() {
    let (b, v1, _v2) = c_versions();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("c_echo_wsh.so");
    std::fs::copy(&v1, &target).unwrap();
    let srv = Wshd::with_config(dir.path(), &reload_config("never"), &[]);
    let mut open = connect(&srv.url("/c_echo")).await;

    let bytes = std::fs::read(&v1).unwrap();
    std::fs::write(&target, &bytes[..bytes.len() / 2]).unwrap();
    srv.wait_log("truncated").await;
    let mut c = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut c, "still v1").await, "still v1");

    let bad = b.path().join("major.so");
    build_c(&bad, &["-DWSHD_BREAK_MAJOR"]);
    std::fs::copy(&bad, &target).unwrap();
    let log = srv.wait_log("ABI mismatch in field `abi_major`").await;
    assert!(log.contains("keeps serving /c_echo"), "{log}");
    let mut c = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut c, "still v1").await, "still v1");
    assert_eq!(echo_once(&mut open, "open one").await, "open one");
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_and_removing_a_handler_file() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "echo", "libecho_wsh.so");
    let srv = Wshd::start(dir.path(), &[]);
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/late", "Sec-WebSocket-Version: 13\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    // Atomic deploy: write a hidden temporary, then rename into place.
    let tmp = dir.path().join(".late_wsh.so.tmp");
    std::fs::copy(built_handlers().join("libecho_wsh.so"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join("late_wsh.so")).unwrap();
    srv.wait_log("serving echo").await;
    srv.wait_log("route=/late").await;
    let mut ws = connect(&srv.url("/late")).await;
    assert_eq!(echo_once(&mut ws, "hi").await, "hi");

    std::fs::remove_file(dir.path().join("late_wsh.so")).unwrap();
    srv.wait_log("route removed").await;
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/late", "Sec-WebSocket-Version: 13\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // /echo was never touched.
    assert_eq!(
        srv.log().matches("serving echo").count(),
        2,
        "{}",
        srv.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn touch_and_identical_copies_do_not_reload() {
    let dir = tempfile::tempdir().unwrap();
    let echo = install(dir.path(), "echo", "libecho_wsh.so");
    let srv = Wshd::start(dir.path(), &[]);
    let status = std::process::Command::new("touch")
        .arg(&echo)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(built_handlers().join("libecho_wsh.so"), &echo).unwrap();
    // A real change afterwards: once it is served, the earlier events have
    // been processed too.
    install(dir.path(), "chat", "libchat_wsh.so");
    srv.wait_log("route=/chat").await;
    let log = srv.log();
    assert_eq!(log.matches("loaded handler library").count(), 2, "{log}");
    assert!(!log.contains("swapped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_reload_valid_then_invalid() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg_dir.path(), "[reload]\ndebounce = \"50ms\"\n");
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut chat = connect(&srv.url("/chat")).await;

    std::fs::write(
        &cfg,
        "[reload]\ndebounce = \"50ms\"\n[[route]]\npath = \"/e2\"\nhandler = \"echo\"\n",
    )
    .unwrap();
    srv.wait_log("config reloaded").await;
    let mut ws = connect(&srv.url("/e2")).await;
    assert_eq!(echo_once(&mut ws, "new route").await, "new route");

    std::fs::write(
        &cfg,
        "[reload]\ndebounce = \"50ms\"\n[[route]]\npath = \"/e3\"\nhandler = \"nosuch\"\n",
    )
    .unwrap();
    let log = srv.wait_log("config reload failed").await;
    assert!(log.contains("key `handler`"), "{log}");
    let mut ws = connect(&srv.url("/e2")).await;
    assert_eq!(echo_once(&mut ws, "unchanged").await, "unchanged");
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/e3", "Sec-WebSocket-Version: 13\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    // SIGHUP re-reads the file: fix it and signal.
    std::fs::write(
        &cfg,
        "[reload]\nwatch = false\n[[route]]\npath = \"/e4\"\nhandler = \"echo\"\n",
    )
    .unwrap();
    srv.signal("HUP");
    srv.wait_log_count("config reloaded", 2).await;
    let mut ws = connect(&srv.url("/e4")).await;
    assert_eq!(echo_once(&mut ws, "hup").await, "hup");
    // Unrelated routes were not touched: the chat connection still works.
    chat.send(Message::text("still")).await.unwrap();
    assert!(recv_text(&mut chat).await.contains("still"));
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_one_routes_config_reinits_only_that_route() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let routes = |b_proto: &str| {
        format!(
            "[reload]\ndebounce = \"50ms\"\n\
             [[route]]\npath = \"/a\"\nhandler = \"origin_check\"\n[route.config]\nsubprotocols = [\"alpha\"]\n\
             [[route]]\npath = \"/b\"\nhandler = \"origin_check\"\n[route.config]\nsubprotocols = [\"{b_proto}\"]\n"
        )
    };
    let cfg = write_config(cfg_dir.path(), &routes("beta"));
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut a = connect(&srv.url("/a")).await;
    let mut chat = connect(&srv.url("/chat")).await;

    std::fs::write(&cfg, routes("gamma")).unwrap();
    let log = srv.wait_log("config reloaded").await;
    let swaps: Vec<&str> = log.lines().filter(|l| l.contains("swapped")).collect();
    assert_eq!(swaps.len(), 1, "{log}");
    assert!(swaps[0].contains("route=/b"), "{log}");
    assert!(log.contains("config reloaded changed=1"), "{log}");
    // /a and /chat kept their instances and their connections.
    assert_eq!(echo_once(&mut a, "a").await, "a");
    chat.send(Message::text("c")).await.unwrap();
    assert!(recv_text(&mut chat).await.contains('c'));
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_stop_before_pthread_keys_run_out_and_the_last_version_keeps_serving() {
    // Each version's init takes 100 pthread keys and keeps them, as 100
    // reloads of a Rust handler would: glibc's 1024 run short in ~10 loads.
    let builds = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("c_echo_wsh.so");
    let build = |k: usize| {
        let out = builds.path().join(format!("v{k}.so"));
        let prefix = format!("-DECHO_PREFIX=\"v{k}:\"");
        build_c(&out, &["-DWSHD_TAKE_KEYS=100", &prefix]);
        out
    };
    std::fs::copy(build(1), &target).unwrap();
    let srv = Wshd::with_config(dir.path(), &reload_config("never"), &[]);
    let mut open = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut open, "a").await, "v1:a");

    let mut loaded = 1;
    let refused = loop {
        let k = loaded + 1;
        assert!(k <= 15, "still loading after 1500 keys:\n{}", srv.log());
        // Atomic deploy, so the server never reads a half-written file.
        let tmp = dir.path().join(".c_echo_wsh.so.tmp");
        std::fs::copy(build(k), &tmp).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let log = loop {
            let log = srv.log();
            // Swapped in (one line per reload since v1), or refused.
            let swapped = log.matches("swapped: new connections get c_echo").count();
            if swapped >= k - 1 || log.contains("pthread keys are free") {
                break log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no outcome for v{k}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if log.contains("pthread keys are free") {
            break log;
        }
        loaded = k;
        let mut c = connect(&srv.url("/c_echo")).await;
        assert_eq!(echo_once(&mut c, "b").await, format!("v{k}:b"));
    };
    assert!(
        loaded >= 5,
        "refused after only {loaded} versions:\n{refused}"
    );
    assert!(
        refused.contains("pthread keys left after loading"),
        "no warning before the refusal:\n{refused}"
    );
    assert!(refused.contains("restart wshd"), "{refused}");
    assert!(refused.contains("keeps serving /c_echo"), "{refused}");
    // The refused version replaced nothing: new clients get the last one
    // loaded, the first connection still has v1, and the process lives.
    let mut c = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut c, "c").await, format!("v{loaded}:c"));
    assert_eq!(echo_once(&mut open, "d").await, "v1:d");
}
