//! Daemon lifecycle: graceful shutdown, config test, listing.

use std::process::Command;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

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

/// The addr file, like systemd's READY=1, says "ready for signals too": an
/// init system may send SIGHUP or SIGUSR1 the moment it appears, and the
/// default action of both is to kill the process. The signal goes out within
/// microseconds of the file appearing, to hit any window between the two.
#[test]
fn a_signal_sent_the_moment_it_is_ready_is_handled() {
    let dir = standard_dir();
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let addr_file = tmp.path().join(format!("addr{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_wshd"))
            .args(["-H", "127.0.0.1", "-p", "0", "--log-level", "warn", "-w"])
            .arg(dir.path())
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !addr_file.exists() {
            assert!(std::time::Instant::now() < deadline, "never ready");
            std::hint::spin_loop();
        }
        let pid = Pid::from_child(&child);
        kill_process(pid, Signal::USR1).unwrap();
        // The process must still be there to take SIGTERM and exit cleanly.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            child.try_wait().unwrap().is_none(),
            "run {i}: SIGUSR1 right after readiness killed wshd"
        );
        kill_process(pid, Signal::TERM).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0), "run {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigusr1_reopens_the_log_file() {
    let dir = standard_dir();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("wshd.log");
    let srv = Wshd::start(dir.path(), &["--log-file", log.to_str().unwrap()]);
    let rotated = logs.path().join("wshd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    srv.signal("USR1");
    // The reopen itself is logged, into the new file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("log file reopened")
    {
        assert!(std::time::Instant::now() < deadline, "no new log file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("listening")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_sets_the_threads_that_serve_connections() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &["--workers", "3"]);
    // Thirty connections open at once, each echoing while the others are
    // held: they share the three threads.
    let mut clients = Vec::new();
    for i in 0..30 {
        let mut ws = connect(&srv.url("/echo")).await;
        assert_eq!(echo_once(&mut ws, &i.to_string()).await, i.to_string());
        clients.push(ws);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            echo_once(ws, &format!("again {i}")).await,
            format!("again {i}")
        );
    }
    assert!(srv.log().contains("workers=3"), "{}", srv.log());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", srv.child.id())).unwrap();
    let workers = tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "wshd-worker")
        })
        .count();
    assert_eq!(workers, 3, "threads named wshd-worker");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_holds_a_new_client_until_an_open_one_leaves() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), "[limits]\nmax_connections = 2\n", &[]);
    let mut first = connect(&srv.url("/echo")).await;
    let mut second = connect(&srv.url("/echo")).await;
    // Both sessions are running, past their handshakes.
    assert_eq!(echo_once(&mut first, "1").await, "1");
    assert_eq!(echo_once(&mut second, "2").await, "2");
    let url = srv.url("/echo");
    let mut third = tokio::spawn(async move { connect(&url).await });
    // Correct behaviour is that it never completes while two are open; the
    // wait only bounds how long we look for a wrong completion.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third connection was served with max_connections = 2"
    );
    assert_eq!(echo_once(&mut second, "still").await, "still");
    first.close(None).await.unwrap();
    // The server's answer: the session is ending and gives its slot back.
    recv_close(&mut first).await;
    let mut third = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the waiting client is served once a slot is free")
        .unwrap();
    assert_eq!(echo_once(&mut third, "3").await, "3");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_accept_backs_off_and_recovers() {
    let dir = standard_dir();
    let tmp = tempfile::tempdir().unwrap();
    let addr_file = tmp.path().join("addr");
    let log_path = tmp.path().join("log");
    // A tiny descriptor limit: the server runs out after a few dozen sockets.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 48 && exec {} -H 127.0.0.1 -p 0 -w {} --addr-file {} 2>{}",
            env!("CARGO_BIN_EXE_wshd"),
            dir.path().display(),
            addr_file.display(),
            log_path.display()
        ))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && a.ends_with('\n')
        {
            break a.trim().to_owned();
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let url = format!("ws://{addr}/echo");
    let mut first = connect(&url).await;
    // Keep opening until the server cannot accept any more.
    let mut held = Vec::new();
    for _ in 0..60 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            Ok(Ok((ws, _))) => held.push(ws),
            _ => break,
        }
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("accept failed") && log.contains("retrying in"),
        "{log}"
    );
    // Existing connections keep working, and the process is not spinning.
    assert_eq!(echo_once(&mut first, "alive").await, "alive");
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu(child.id()) - before;
    assert!(used < 50, "accept loop used {used} ticks in 1 s: spinning");
    // Free descriptors: new connections are accepted again.
    held.clear();
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(Ok((ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            again = Some(ws);
            break;
        }
    }
    let mut again = again.expect("the server accepts again once descriptors are free");
    assert_eq!(echo_once(&mut again, "back").await, "back");
    let _ = child.kill();
    let _ = child.wait();
}
