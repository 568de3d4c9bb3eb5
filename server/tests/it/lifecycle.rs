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

/// A full server says so: the excess gets 503 with Retry-After at once
/// (rather than waiting unseen in the backlog), it is logged, and a client
/// that retries is served once a slot is free.
#[tokio::test(flavor = "multi_thread")]
async fn max_connections_answers_503_until_an_open_one_leaves() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), "[limits]\nmax_connections = 2\n", &[]);
    let mut first = connect(&srv.url("/echo")).await;
    let mut second = connect(&srv.url("/echo")).await;
    // Both sessions are running, past their handshakes.
    assert_eq!(echo_once(&mut first, "1").await, "1");
    assert_eq!(echo_once(&mut second, "2").await, "2");
    let resp = raw_http(&srv.addr, &upgrade_request("/echo", "")).await;
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    assert!(resp.contains("Retry-After: 5\r\n"), "{resp}");
    assert!(resp.contains("server at its connection limit"), "{resp}");
    srv.wait_log("RATE-LIMITED: 503: max_connections reached")
        .await;
    assert_eq!(echo_once(&mut second, "still").await, "still");
    first.close(None).await.unwrap();
    // The server's answer: the session is ending and gives its slot back.
    recv_close(&mut first).await;
    let mut third = connect_when_free(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut third, "3").await, "3");
}

/// Connects, retrying while the server answers 503 (a slot is given back
/// just after the close handshake).
pub async fn connect_when_free(url: &str) -> Client {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused after 20 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
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

/// A server run in this process through `wshd::server::run`, with its
/// reload trigger and shutdown as values.
struct InProcess {
    addr: std::net::SocketAddr,
    reload: tokio::sync::mpsc::Sender<wshd::reload::Trigger>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _state: tempfile::TempDir,
}

impl InProcess {
    async fn start(handlers: &std::path::Path) -> InProcess {
        let args = wshd::cli::Args {
            handlers: Some(handlers.to_owned()),
            no_watch: true,
            ..Default::default()
        };
        let mut settings = wshd::settings::Settings::resolve(&args, None).unwrap();
        // Its own state directory: tests in this process run side by side.
        let state = tempfile::tempdir().unwrap();
        settings.state_dir = Some(state.path().to_owned());
        settings.workers = 2;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let triggers = wshd::server::Triggers::new();
        let reload = triggers.sender();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(wshd::server::run(
            settings,
            args,
            listener,
            triggers,
            async {
                let _ = stopped.await;
            },
            move |addr| {
                let _ = ready_tx.send(addr);
                Ok(())
            },
        ));
        let addr = tokio::time::timeout(Duration::from_secs(20), ready_rx)
            .await
            .expect("in-process server ready within 20 s")
            .expect("run called ready");
        InProcess {
            addr,
            reload,
            stop: Some(stop),
            task,
            _state: state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Polls until a handshake on `path` gets 101.
    async fn wait_route(&self, path: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = raw_http(
                &self.addr.to_string(),
                &upgrade_request(path, "Sec-WebSocket-Version: 13\r\n"),
            )
            .await;
            if r.starts_with("HTTP/1.1 101") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} not served: {r}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_reload_by_channel_and_shutdown_by_value() {
    let dir = standard_dir();
    let srv = InProcess::start(dir.path()).await;
    let mut old = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut old, "a").await, "a");
    // No watcher (no_watch): only the trigger can bring the new route up.
    install(dir.path(), "echo", "libecho2_wsh.so");
    srv.reload.send(wshd::reload::Trigger::Files).await.unwrap();
    srv.wait_route("/echo2").await;
    let mut new = connect(&srv.url("/echo2")).await;
    assert_eq!(echo_once(&mut new, "b").await, "b");
    let closes =
        tokio::spawn(async move { (recv_close(&mut old).await.0, recv_close(&mut new).await.0) });
    srv.shutdown().await;
    assert_eq!(closes.await.unwrap(), (1001, 1001));
}

/// A panic inside a reload is caught: the reload task goes on with the
/// registry it had, and the next reload works.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_reload_is_survived() {
    let dir = standard_dir();
    let srv = InProcess::start(dir.path()).await;
    srv.reload
        .send(wshd::reload::Trigger::PanicForTest)
        .await
        .unwrap();
    install(dir.path(), "echo", "libecho2_wsh.so");
    srv.reload.send(wshd::reload::Trigger::Files).await.unwrap();
    srv.wait_route("/echo2").await;
    // What was loaded before the panic still serves.
    let mut ws = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut ws, "kept").await, "kept");
    drop(ws);
    srv.shutdown().await;
}

/// Settings a running server cannot change are named once each as needing
/// a restart; the rest of the new config applies.
#[tokio::test(flavor = "multi_thread")]
async fn config_reload_names_what_needs_a_restart_and_applies_the_rest() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg_dir.path(), "[limits]\nmax_connections = 100\n");
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    write_config(
        cfg_dir.path(),
        "workers = 3\n[limits]\nmax_connections = 50\n\
         [[route]]\npath = \"/again\"\nhandler = \"echo\"\n",
    );
    srv.signal("HUP");
    let log = srv.wait_log("config reloaded").await;
    let restart: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("needs a restart"))
        .collect();
    assert_eq!(restart.len(), 2, "{log}");
    assert!(
        restart[0].contains("WARN") && restart[0].contains("`workers` changed from"),
        "{log}"
    );
    assert!(
        restart[1].contains("`limits.max_connections` changed from 100 to 50"),
        "{log}"
    );
    let mut ws = connect(&srv.url("/again")).await;
    assert_eq!(echo_once(&mut ws, "applied").await, "applied");
}

/// The lowest descriptor number a process has free: with the soft limit
/// set to it, every open fails with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let mut fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds.iter()
        .enumerate()
        .find(|(i, fd)| *i as u64 != **fd)
        .map_or(fds.len() as u64, |(i, _)| i as u64)
}

/// A reload that fails for lack of descriptors is retried with backoff
/// until it succeeds: the new route comes up once descriptors are back,
/// with no SIGHUP and no further file event.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_out_of_descriptors_is_retried_until_it_succeeds() {
    use rustix::process::{Resource, Rlimit, prlimit};
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let pid = Pid::from_child(&srv.child);
    let free = lowest_free_fd(srv.child.id());
    let before = prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: Some(free),
            // wshd keeps the hard limit it inherited from us.
            maximum: rustix::process::getrlimit(Resource::Nofile).maximum,
        },
    )
    .unwrap();
    install(dir.path(), "echo", "libecho2_wsh.so");
    let log = srv.wait_log("retrying in").await;
    assert!(log.contains("Too many open files"), "{log}");
    prlimit(Some(pid), Resource::Nofile, before).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = raw_http(
            &srv.addr,
            &upgrade_request("/echo2", "Sec-WebSocket-Version: 13\r\n"),
        )
        .await;
        if r.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/echo2 never came up: {r}\n{}",
            srv.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// inotify drops the watch of a deleted directory: a handler directory
/// that is deleted and created again is watched again.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_handler_directory_is_watched_again() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    std::fs::remove_dir_all(dir.path()).unwrap();
    srv.wait_log("cannot read the handler directory").await;
    std::fs::create_dir(dir.path()).unwrap();
    srv.wait_log("watching the handler directory").await;
    install(dir.path(), "echo", "libecho2_wsh.so");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = raw_http(
            &srv.addr,
            &upgrade_request("/echo2", "Sec-WebSocket-Version: 13\r\n"),
        )
        .await;
        if r.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/echo2 never came up: {r}\n{}",
            srv.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A symlink planted at the pid file's path is replaced, not followed: the
/// file it points to keeps its contents.
#[tokio::test(flavor = "multi_thread")]
async fn the_pid_file_does_not_follow_a_planted_symlink() {
    let dir = standard_dir();
    let run = tempfile::tempdir().unwrap();
    let victim = run.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let pid_file = run.path().join("wshd.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).unwrap();
    let mut srv = Wshd::start(dir.path(), &["--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!std::fs::symlink_metadata(&pid_file).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", srv.child.id())
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(Duration::from_secs(15)).await, Some(0));
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}
