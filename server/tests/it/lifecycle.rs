//! Daemon lifecycle: graceful shutdown, config test, listing.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_with_1001_and_exits_zero() {
    let dir = standard_dir();
    let mut srv = Wshd::start(dir.path(), &[]);
    let mut clients = Vec::new();
    for path in ["/echo", "/chat", "/echo"] {
        let mut ws = connect(&srv.url(path)).await;
        if path == "/echo" {
            assert_eq!(echo_once(&mut ws, "x").await, "x");
        }
        clients.push(ws);
    }
    srv.signal("TERM");
    for ws in clients.iter_mut() {
        assert_eq!(recv_close(ws).await.0, 1001);
    }
    assert_eq!(srv.wait_exit(Duration::from_secs(15)).await, Some(0));
    let log = srv.log();
    assert!(log.contains("all connections closed"), "{log}");
    // on_close ran for the chat member.
    assert!(log.contains("left"), "{log}");
}

fn wshd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_config_and_list() {
    let dir = standard_dir();
    let d = dir.path().to_str().unwrap();
    let out = wshd(&["-t", "-w", d]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("configuration test successful: 5 route(s)"),
        "{stdout}"
    );

    let out = wshd(&["--list", "-w", d]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("/echo") && stdout.contains("/blocking") && stdout.contains("[may block]"),
        "{stdout}"
    );

    std::fs::write(dir.path().join("junk_wsh.so"), b"junk").unwrap();
    let out = wshd(&["-t", "-w", d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("junk_wsh.so") && stderr.contains("configuration test failed"),
        "{stderr}"
    );
}
