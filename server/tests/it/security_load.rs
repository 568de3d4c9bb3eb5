//! Issue #12 §1: nobody but the operator can put code into the process.
//!
//! * Handler code is loaded from sealed memfds: nothing on disk, nothing left
//!   after SIGKILL, and directories pre-created at predictable names are
//!   never used. The fallback directory is fresh, private and removed.
//! * Handler files and directories others could write are refused (StrictModes),
//!   at startup, on reload and by `-t`, unless the operator opts out.
//! * Handler code that calls exit() or dies by a signal does not look like a
//!   clean exit, and the log names the handler.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A handler directory (0700, inside a tempdir) holding the C echo built
/// with `defines` as `c_echo_wsh.so`.
fn c_dir(defines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("h");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let so = dir.join("c_echo_wsh.so");
    build_c(&so, defines);
    chmod(&so, 0o644);
    (tmp, dir)
}

fn wshd_out(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("WSHD_LOADER")
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls until the child exits and returns its status.
async fn exited(child: &mut Child, log: &dyn Fn() -> String) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "wshd did not exit:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- memfd

/// Directories under /tmp that are removed when the test ends, pass or fail.
struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memfd_loading_uses_no_directory_and_leaves_nothing_after_sigkill() {
    let (_tmp, dir) = c_dir(&[]);
    // An attacker's guesses: world-writable /tmp/wshd-<pid> for the next
    // pids. The old loader reused such a directory for its copies.
    let tmp = std::env::temp_dir();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut planted = Cleanup(Vec::new());
    for pid in last + 1..last + 200 {
        let p = tmp.join(format!("wshd-{pid}"));
        if std::fs::create_dir(&p).is_ok() {
            chmod(&p, 0o777);
            planted.0.push(p);
        }
    }

    let mut srv = Wshd::start(&dir, &[]);
    let pid = srv.child.id();
    srv.wait_log("sealed memory files (memfd)").await;
    let mut ws = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut ws, "hi").await, "hi");
    // The code is mapped from a memfd, not from any file.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/memfd:c_echo_wsh-1"), "{maps}");
    assert!(
        !maps.contains(&format!("{}/wshd-", tmp.display())),
        "a handler was mapped from a directory in {}:\n{maps}",
        tmp.display()
    );
    let mine = tmp.join(format!("wshd-{pid}"));
    let before = std::fs::read_dir(&mine).map(|d| d.count()).unwrap_or(0);
    assert_eq!(before, 0, "wshd wrote into the planted {}", mine.display());

    srv.signal("KILL");
    let st = exited(&mut srv.child, &|| String::new()).await;
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    // Nothing of this process is left behind: the only wshd-<pid> entry
    // is one we planted ourselves, still empty.
    match std::fs::read_dir(&mine) {
        Ok(d) => {
            assert!(planted.0.contains(&mine));
            assert_eq!(d.count(), 0);
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
}

/// A wshd with extra environment (the fallback is forced by WSHD_LOADER).
struct Env {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start(handlers: &Path, extra: &[&str], env: &[(&str, &str)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("addr");
        let log = dir.path().join("wshd.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_wshd"))
            .args(["-H", "127.0.0.1", "-p", "0", "--log-level", "debug", "-w"])
            .arg(handlers)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(extra)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && a.ends_with('\n')
            {
                return Env {
                    child,
                    addr: a.trim().to_owned(),
                    log,
                    _dir: dir,
                };
            }
            if let Some(s) = child.try_wait().unwrap() {
                panic!(
                    "wshd exited {s}:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "wshd not listening after 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_directory_is_fresh_private_and_removed_at_exit() {
    let (tmp, dir) = c_dir(&[]);
    let parent = tmp.path().join("state");
    std::fs::create_dir(&parent).unwrap();
    chmod(&parent, 0o755);
    let cfg = write_config(
        tmp.path(),
        &format!("state_dir = {:?}\n", parent.to_str().unwrap()),
    );
    let mut srv = Env::start(
        &dir,
        &["--config", cfg.to_str().unwrap()],
        &[("WSHD_LOADER", "dir")],
    );
    let log = srv.wait_log("memfd loading is not available").await;
    let entries: Vec<PathBuf> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let private = &entries[0];
    let name = private.file_name().unwrap().to_str().unwrap();
    // A random name, not the pid.
    assert!(name.starts_with("wshd-") && name.len() == 5 + 16, "{name}");
    assert!(log.contains(private.to_str().unwrap()), "{log}");
    let m = std::fs::metadata(private).unwrap();
    assert_eq!(m.mode() & 0o777, 0o700);
    assert_eq!(m.uid(), unsafe_free_euid());
    let mut ws = connect(&format!("ws://{}/c_echo", srv.addr)).await;
    assert_eq!(echo_once(&mut ws, "hi").await, "hi");
    drop(ws);

    // SIGTERM: a clean shutdown removes the directory.
    assert!(
        Command::new("kill")
            .args(["-TERM", &srv.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let log_of = || std::fs::read_to_string(&srv.log).unwrap_or_default();
    let st = exited(&mut srv.child, &log_of).await;
    assert_eq!(st.code(), Some(0), "{}", srv.log());
    assert!(!private.exists(), "{} was left behind", private.display());
}

/// wshd's euid, as the test process sees it (both run as the same user).
fn unsafe_free_euid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Successive versions each run their own code, in memfd mode (where fd
/// numbers could repeat) and in the fallback.
#[tokio::test(flavor = "multi_thread")]
async fn each_new_version_runs_its_own_code() {
    for loader in ["memfd", "dir"] {
        let (tmp, dir) = c_dir(&[]);
        let srv = Env::start(&dir, &[], &[("WSHD_LOADER", loader)]);
        let url = format!("ws://{}/c_echo", srv.addr);
        let mut old = connect(&url).await;
        assert_eq!(echo_once(&mut old, "x").await, "x");
        for v in 2..=4 {
            let so = tmp.path().join(format!("v{v}.so"));
            build_c(&so, &[&format!("-DECHO_PREFIX=\"v{v}:\"")]);
            chmod(&so, 0o644);
            // Atomic deploy: rename over the watched name.
            std::fs::rename(&so, dir.join("c_echo_wsh.so")).unwrap();
            srv.wait_log(&format!("generation {v}")).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let mut ws = connect(&url).await;
                let got = echo_once(&mut ws, "x").await;
                if got == format!("v{v}:x") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{loader}: version {v} never served, got {got:?}:\n{}",
                    srv.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The first connection still runs the first version's code.
        assert_eq!(echo_once(&mut old, "y").await, "y", "{loader}");
    }
}

// ---------------------------------------------------------------- trust

#[test]
fn a_group_or_world_writable_handler_directory_is_refused() {
    let (_tmp, dir) = c_dir(&[]);
    let d = dir.to_str().unwrap();
    let out = wshd_out(&["-t", "-w", d]);
    assert!(out.status.success(), "{}", text(&out));

    chmod(&dir, 0o777);
    let out = wshd_out(&["-t", "-w", d]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("untrusted handler directory {d}")),
        "{t}"
    );
    assert!(t.contains("mode 0777"), "{t}");
    assert!(t.contains(&format!("chmod go-w {d}")), "{t}");

    chmod(&dir, 0o775);
    let out = wshd_out(&["-t", "-w", d]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("writable by its group"));

    // Sticky, like /tmp: others cannot replace entries they do not own.
    chmod(&dir, 0o1777);
    let out = wshd_out(&["-t", "-w", d]);
    assert!(out.status.success(), "{}", text(&out));

    // A subdirectory between the handler directory and the file counts.
    chmod(&dir, 0o755);
    let sub = dir.join("room");
    std::fs::create_dir(&sub).unwrap();
    chmod(&sub, 0o777);
    std::fs::copy(dir.join("c_echo_wsh.so"), sub.join("x_wsh.so")).unwrap();
    let out = wshd_out(&["-t", "-w", d]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("untrusted handler directory {}", sub.display())),
        "{t}"
    );
}

#[test]
fn a_writable_or_foreign_handler_file_is_refused() {
    let (_tmp, dir) = c_dir(&[]);
    let d = dir.to_str().unwrap();
    let so = dir.join("c_echo_wsh.so");
    chmod(&so, 0o666);
    let out = wshd_out(&["-t", "-w", d]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("untrusted handler file {}", so.display())),
        "{t}"
    );
    assert!(
        t.contains("mode 0666") && t.contains("writable by group and others"),
        "{t}"
    );
    assert!(t.contains(&format!("chmod go-w {}", so.display())), "{t}");

    // Owned by another user (only root can chown; the tests run as root).
    chmod(&so, 0o644);
    if unsafe_free_euid() == 0 {
        std::os::unix::fs::chown(&so, Some(65534), None).unwrap();
        let out = wshd_out(&["-t", "-w", d]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains("owner uid 65534"), "{t}");
        assert!(t.contains("chown"), "{t}");
    }

    // The opt-out flag: loaded, -t passes.
    chmod(&so, 0o666);
    let out = wshd_out(&["-t", "--allow-insecure-handler-dir", "-w", d]);
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_file_loads_once_fixed_and_the_opt_out_warns_at_every_load() {
    let (tmp, dir) = c_dir(&[]);
    let so = dir.join("c_echo_wsh.so");
    chmod(&so, 0o666);
    let srv = Wshd::start(&dir, &[]);
    let log = srv.wait_log("untrusted handler file").await;
    assert!(log.contains(&format!("refused {}", so.display())), "{log}");
    assert!(!log.contains("loaded handler library"), "{log}");
    // Fixed: the same bytes load on the next reload (a refusal by the trust
    // check is not remembered as a broken file).
    chmod(&so, 0o644);
    srv.signal("HUP");
    srv.wait_log("loaded handler library").await;
    let mut ws = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut ws, "ok").await, "ok");
    drop(srv);

    // The config key: insecure files load, with a WARN at every load.
    chmod(&so, 0o666);
    let srv = Wshd::with_config(&dir, "allow_insecure_handler_dir = true\n", &[]);
    srv.wait_log("loaded handler library").await;
    let v2 = tmp.path().join("v2.so");
    build_c(&v2, &["-DECHO_PREFIX=\"v2:\""]);
    chmod(&v2, 0o666);
    std::fs::rename(&v2, &so).unwrap();
    let log = srv.wait_log_count("loaded handler library", 2).await;
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("allow_insecure_handler_dir is set"))
        .count();
    assert_eq!(warns, 2, "{log}");
}

// ---------------------------------------------------------------- crashes

#[tokio::test(flavor = "multi_thread")]
async fn exit_in_a_constructor_is_a_failure_naming_the_file() {
    let (_tmp, dir) = c_dir(&["-DWSHD_TEST_EXIT_IN_CTOR"]);
    let so = dir.join("c_echo_wsh.so");
    let log = Wshd::try_start(&dir, &[])
        .err()
        .expect("wshd must not start");
    assert!(log.starts_with("exit exit status: 70"), "{log}");
    assert!(
        log.contains(&format!(
            "exit() called by handler code: handler file {}",
            so.display()
        )) && log.contains("while dlopen ran its constructors"),
        "{log}"
    );
    // -t too: not "configuration test successful" with status 0.
    let out = wshd_out(&["-t", "-w", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(70), "{}", text(&out));
}

/// Starts the crash build, sends `magic` and returns the exit status and
/// stderr.
async fn crash_with(magic: &str, extra: &[&str]) -> (std::process::ExitStatus, String, PathBuf) {
    let (_tmp, dir) = c_dir(&["-DWSHD_TEST_CRASH"]);
    let mut srv = Wshd::start(&dir, extra);
    let mut ws = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut ws, "alive").await, "alive");
    ws.send(Message::text(magic)).await.unwrap();
    let log_path = srv.log_path.clone();
    let st = exited(&mut srv.child, &|| {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    (st, srv.log(), dir.join("c_echo_wsh.so"))
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_in_a_callback_is_a_failure_naming_handler_version_and_callback() {
    // With a log file: the line goes to stderr and to the file.
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("wshd.log");
    let (st, stderr, so) = crash_with("exit", &["-l", file.to_str().unwrap()]).await;
    let log = std::fs::read_to_string(&file).unwrap();
    assert_eq!(st.code(), Some(70), "{stderr}{log}");
    let want = format!(
        "exit() called by handler code: handler c_echo 0.1.0 (file {}, generation 1",
        so.display()
    );
    for out in [&stderr, &log] {
        assert!(out.contains(&want), "{out}");
        assert!(out.contains("callback on_message"), "{out}");
    }
    assert!(log.contains("loaded handler library"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_from_a_handler_thread_is_a_failure() {
    let (st, log, _) = crash_with("thread-exit", &[]).await;
    assert_eq!(st.code(), Some(70), "{log}");
    assert!(
        log.contains("on a thread that runs no handler callback"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigsegv_in_a_callback_names_the_handler_and_dies_by_the_signal() {
    let (st, log, so) = crash_with("segv", &[]).await;
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "{st:?}\n{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("FATAL")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains(&format!(
            "signal SIGSEGV in handler c_echo 0.1.0 (file {}",
            so.display()
        )) && lines[0].contains("callback on_message"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_in_a_callback_names_the_handler_and_dies_by_sigabrt() {
    let (st, log, _) = crash_with("abort", &[]).await;
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}\n{log}");
    assert!(
        log.contains("signal SIGABRT in handler c_echo 0.1.0")
            && log.contains("callback on_message"),
        "{log}"
    );
}
