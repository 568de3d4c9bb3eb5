//! Shared test helpers: build the real handler cdylibs once, compile the C
//! handlers, start `wshd` on port 0 and wait for it to be listening, and
//! connect clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Builds every example handler once per test run, with the same cargo and
/// target directory as the tests, and returns the directory holding the
/// `lib*_wsh.so` files.
pub fn built_handlers() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "-q"])
            .args([
                "-p",
                "echo-handler",
                "-p",
                "chat-handler",
                "-p",
                "origin-check-handler",
            ])
            .args(["-p", "testkit-handler", "-p", "blocking-handler"])
            .args(["-p", "counter-handler"])
            .status()
            .expect("run cargo build for the handlers");
        assert!(status.success(), "building the example handlers failed");
        // Tests run from target/debug/deps.
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().to_owned()
    })
}

/// Copies `lib<name>_wsh.so` from the build into `dir` under `as_name`.
pub fn install(dir: &Path, name: &str, as_name: &str) -> PathBuf {
    let src = built_handlers().join(format!("lib{name}_wsh.so"));
    let dst = dir.join(as_name);
    if let Some(p) = dst.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    dst
}

/// Compiles handlers/c/echo_wsh.c with extra `-D` flags into `out`.
pub fn build_c(out: &Path, defines: &[&str]) {
    let root = repo_root();
    let status = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(root.join("handler-api/include"))
        .args(defines)
        .arg(root.join("handlers/c/echo_wsh.c"))
        .arg("-o")
        .arg(out)
        .status()
        .expect("gcc is required to build the C handlers");
    assert!(status.success(), "gcc failed for {}", out.display());
}

/// Compiles the C handler `handlers/c/{file}` (with pthreads) and extra
/// `-D` flags into `out`.
pub fn build_c_file(file: &str, out: &Path, defines: &[&str]) {
    let root = repo_root();
    let status = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-pthread", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(root.join("handler-api/include"))
        .args(defines)
        .arg(root.join("handlers/c").join(file))
        .arg("-o")
        .arg(out)
        .status()
        .expect("gcc is required to build the C handlers");
    assert!(status.success(), "gcc failed for {}", out.display());
}

/// A running wshd process; killed on drop.
pub struct Wshd {
    pub child: Child,
    pub addr: String,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Wshd {
    /// Starts wshd on 127.0.0.1:0 serving `handlers`, with extra flags.
    pub fn start(handlers: &Path, extra: &[&str]) -> Wshd {
        Self::try_start(handlers, extra).unwrap_or_else(|log| panic!("wshd did not start:\n{log}"))
    }

    /// Starts wshd with a config file holding `toml` (kept with the process,
    /// for tests that never change it).
    pub fn with_config(handlers: &Path, toml: &str, extra: &[&str]) -> Wshd {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), toml);
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::launch(dir, handlers, &args)
            .unwrap_or_else(|log| panic!("wshd did not start:\n{log}"))
    }

    /// Like `start`, but returns the log if the process exits first.
    pub fn try_start(handlers: &Path, extra: &[&str]) -> Result<Wshd, String> {
        Self::launch(tempfile::tempdir().unwrap(), handlers, extra)
    }

    /// Runs wshd with its addr file and log in `dir`, and waits until it
    /// listens (the addr file appears) or exits.
    fn launch(dir: tempfile::TempDir, handlers: &Path, extra: &[&str]) -> Result<Wshd, String> {
        let addr_file = dir.path().join("addr");
        let log_path = dir.path().join("wshd.log");
        let log = std::fs::File::create(&log_path).unwrap();
        // WSHD_TEST_BIN runs the suite against another build (a release
        // one, for the memory tests' figures); default: this build's wshd.
        let bin =
            std::env::var_os("WSHD_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_wshd").into());
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0", "--log-level", "debug", "-w"])
            .arg(handlers)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("WSHD_HANDLER_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn wshd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && a.ends_with('\n')
            {
                return Ok(Wshd {
                    child,
                    addr: a.trim().to_owned(),
                    log_path,
                    _dir: dir,
                });
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "exit {status}\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            assert!(Instant::now() < deadline, "wshd not listening after 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the log until it contains `needle` (real progress, not a sleep).
    pub async fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1).await
    }

    /// Polls the log until `needle` appears at least `n` times.
    pub async fn wait_log_count(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {n}x {needle:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its status code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                Instant::now() < deadline,
                "wshd did not exit within {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Wshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(url: &str) -> Client {
    tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
}

/// The next data message, skipping pings and pongs.
pub async fn recv(ws: &mut Client) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("stream ended")
            .expect("websocket error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

pub async fn recv_text(ws: &mut Client) -> String {
    match recv(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server's close frame and returns its code and reason.
pub async fn recv_close(ws: &mut Client) -> (u16, String) {
    loop {
        match recv(ws).await {
            Message::Close(Some(f)) => return (u16::from(f.code), f.reason.to_string()),
            Message::Close(None) => return (1005, String::new()),
            _ => continue,
        }
    }
}

pub async fn echo_once(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    recv_text(ws).await
}

/// Sends a raw HTTP request and returns the whole response head and body.
pub async fn raw_http(addr: &str, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// One client frame with FIN set (RFC 6455 §5.2): `opcode` 0x1 text, 0x2
/// binary. The payload is masked, as a client's must be.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [1, 2, 3, 4];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
    f
}

/// A handler directory with the standard example handlers installed.
pub fn standard_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "echo", "libecho_wsh.so");
    install(dir.path(), "chat", "libchat_wsh.so");
    install(dir.path(), "origin_check", "liborigin_check_wsh.so");
    install(dir.path(), "testkit", "libtestkit_wsh.so");
    install(dir.path(), "blocking", "libblocking_wsh.so");
    dir
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("wshd.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// The resident set of process `pid`, in bytes (`VmRSS` of
/// `/proc/<pid>/status`), for the tests that bound what clients make the
/// server hold.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// One server frame, read from a raw client's socket: the first header
/// byte (FIN, RSV bits, opcode) and the payload (server frames are never
/// masked).
pub async fn read_server_frame<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await?;
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await?;
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    Ok((h[0], p))
}

/// Connects and upgrades a raw client (one that reads and writes bytes
/// itself, e.g. never reads); returns the socket right after the 101, with
/// no byte of what follows consumed.
pub async fn raw_upgrade(addr: &str, path: &str) -> tokio::net::TcpStream {
    raw_upgrade_with(addr, path, "").await.0
}

/// [`raw_upgrade`] with `extra` request header lines (each ending in
/// `\r\n`); also returns the 101 response head.
pub async fn raw_upgrade_with(
    addr: &str,
    path: &str,
    extra: &str,
) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra = format!("Sec-WebSocket-Version: 13\r\n{extra}");
    s.write_all(upgrade_request(path, &extra).as_bytes())
        .await
        .unwrap();
    // Read the response head byte by byte, so no frame after it is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("no upgrade response")
            .unwrap();
        assert!(n == 1, "connection closed during the upgrade: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// Like [`connect`], from the loopback address `from` (any of 127.0.0.0/8),
/// so one test can be several client addresses.
pub async fn connect_from(url: &str, from: &str) -> Client {
    let (status, ws) = try_connect_from(url, from).await;
    ws.unwrap_or_else(|| panic!("connect {url} from {from}: HTTP {status}"))
}

/// Connects from `from`; a refused handshake gives its HTTP status.
pub async fn try_connect_from(url: &str, from: &str) -> (u16, Option<Client>) {
    let hostport = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(hostport.parse().unwrap()).await.unwrap();
    match tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
    {
        Ok((ws, _)) => (101, Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => (r.status().as_u16(), None),
        Err(e) => panic!("connect {url} from {from}: {e}"),
    }
}

/// `wshd` with `args`, without any WSHD_* variable from the caller's shell.
pub fn wshd_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wshd"));
    c.args(args);
    for v in [
        "WSHD_CONFIG",
        "WSHD_HANDLERS",
        "WSHD_PORT",
        "WSHD_HOST",
        "WSHD_DEFAULT_CONFIG",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c
}

/// A finished command's status and output, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `systemd-analyze verify` on `unit` with the binary path `from`
/// replaced by `bin` (systemd checks that the binary exists), and fails on
/// any output: it only warns, with status 0, about unknown keys.
pub fn assert_unit_verifies(unit: &str, from: &str, bin: &Path) {
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("wshd.service");
    std::fs::write(&copy, unit.replace(from, bin.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify:\n{t}"
    );
}
