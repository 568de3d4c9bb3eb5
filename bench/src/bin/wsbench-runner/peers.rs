//! The servers under test: how each is prepared, started, found and stopped.
//!
//! Every peer serves an echo route, and optionally a chat route, on its own
//! loopback port. A started peer is a [`RunningPeer`], which owns the child
//! process and stops it (SIGTERM, then SIGKILL) when dropped, so no server
//! outlives the runner's error paths.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// wshd's config for the runs: defaults except the connection cap, plus the
/// echo handler on a second path with permessage-deflate on, for the
/// compression rows.
const WSHD_CONFIG: &str = "[limits]\nmax_connections = 20000\n\n\
    [[route]]\npath = \"/echo-deflate\"\nhandler = \"echo\"\ncompression = \"on\"\n";

/// The path of the echo route with permessage-deflate on (wshd, Node ws).
pub const DEFLATE_PATH: &str = "/echo-deflate";

/// The pinned pywebsocket3 release from PyPI.
pub const PYWEBSOCKET_VERSION: &str = "4.0.2";

/// Which server a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// wshd with the echo and chat handlers loaded through the C ABI, with
    /// its default of one worker thread per core.
    Wshd,
    /// The same with `--workers 1`: one worker thread, matching the one core
    /// the load generator leaves to the server.
    Wshd1,
    /// raw-echo with the library's default read buffer.
    Raw,
    /// raw-echo with a 4 KiB read buffer: the reference for wshd's targets.
    Raw4k,
    /// The same on one tokio worker thread: the reference for `Wshd1`.
    Raw4k1,
    /// fastwebsockets 0.10 (`fastws-echo`), run as its own echo example
    /// runs: one current-thread runtime. Echo only.
    FastWs,
    /// Node's `ws` package.
    NodeWs,
    /// uWebSockets.js (`@trufflesuite/uws-js-unofficial` from npm, pinned):
    /// uWS's C++ core driven from Node; `/chat` uses its native pub/sub.
    Uws,
    /// `Wshd` with the admin listener on (`--admin`): per-message counters
    /// and callback durations are kept only with it on, so this row against
    /// `Wshd` is what metrics cost.
    WshdAdmin,
    /// pywebsocket3 standalone with its example echo handler.
    Pywebsocket,
    /// wshd serving wss:// (rustls, ring) with a test certificate; measured
    /// on the echo and handshake workloads that say `tls`.
    WshdTls,
    /// raw-echo with a 4 KiB buffer over the same rustls configuration: the
    /// reference for `WshdTls`.
    Raw4kTls,
}

impl PeerKind {
    /// Every peer, in table order.
    pub const ALL: [PeerKind; 12] = [
        PeerKind::Wshd,
        PeerKind::Wshd1,
        PeerKind::Raw,
        PeerKind::Raw4k,
        PeerKind::Raw4k1,
        PeerKind::FastWs,
        PeerKind::NodeWs,
        PeerKind::Uws,
        PeerKind::Pywebsocket,
        PeerKind::WshdAdmin,
        PeerKind::WshdTls,
        PeerKind::Raw4kTls,
    ];

    /// The short name used on the command line and in results.
    pub fn key(self) -> &'static str {
        match self {
            PeerKind::Wshd => "wshd",
            PeerKind::Wshd1 => "wshd1",
            PeerKind::Raw => "raw",
            PeerKind::Raw4k => "raw4k",
            PeerKind::Raw4k1 => "raw4k1",
            PeerKind::FastWs => "fastws",
            PeerKind::NodeWs => "ws",
            PeerKind::Uws => "uws",
            PeerKind::Pywebsocket => "pyws",
            PeerKind::WshdAdmin => "wshdm",
            PeerKind::WshdTls => "wshd-tls",
            PeerKind::Raw4kTls => "raw4k-tls",
        }
    }

    /// The name shown in the report.
    pub fn title(self) -> &'static str {
        match self {
            PeerKind::Wshd => "wshd (C ABI echo/chat)",
            PeerKind::Wshd1 => "wshd, 1 worker thread (`workers = 1`)",
            PeerKind::Raw => "raw tokio-tungstenite (default buffers)",
            PeerKind::Raw4k => "raw tokio-tungstenite (4 KiB read buffer)",
            PeerKind::Raw4k1 => "raw tokio-tungstenite (4 KiB, 1 worker thread)",
            PeerKind::FastWs => "fastwebsockets 0.10 (its echo example: current-thread runtime)",
            PeerKind::NodeWs => "Node ws",
            PeerKind::Uws => "uWebSockets.js (native pub/sub on /chat)",
            PeerKind::Pywebsocket => "pywebsocket3",
            PeerKind::WshdAdmin => "wshd, admin listener on (`--admin`: metrics kept)",
            PeerKind::WshdTls => "wshd over TLS (wss://, rustls + ring)",
            PeerKind::Raw4kTls => "raw tokio-tungstenite over TLS (4 KiB, same rustls config)",
        }
    }

    /// Parses a key.
    pub fn from_key(key: &str) -> Option<PeerKind> {
        PeerKind::ALL.into_iter().find(|peer| peer.key() == key)
    }

    /// The raw floor this peer is compared with: the one with the same
    /// number of worker threads, so a ratio measures the server and not
    /// its thread count.
    pub fn floor(self) -> PeerKind {
        match self {
            PeerKind::Wshd1 | PeerKind::Raw4k1 => PeerKind::Raw4k1,
            // Over TLS the floor is raw over the same TLS: the ratio is
            // wshd's cost, not rustls'.
            PeerKind::WshdTls | PeerKind::Raw4kTls => PeerKind::Raw4kTls,
            _ => PeerKind::Raw4k,
        }
    }

    /// True for the wshd peers.
    pub fn is_wshd(self) -> bool {
        matches!(
            self,
            PeerKind::Wshd | PeerKind::Wshd1 | PeerKind::WshdAdmin | PeerKind::WshdTls
        )
    }

    /// True for the peers that serve wss:// (and take only the workloads
    /// marked `tls`).
    pub fn is_tls(self) -> bool {
        matches!(self, PeerKind::WshdTls | PeerKind::Raw4kTls)
    }

    /// The chat route, when the peer has one.
    pub fn chat_path(self) -> Option<&'static str> {
        match self {
            PeerKind::Pywebsocket | PeerKind::FastWs => None,
            _ => Some("/chat"),
        }
    }

    /// The echo route with permessage-deflate on, when the peer has one.
    pub fn deflate_path(self) -> Option<&'static str> {
        match self {
            PeerKind::Wshd | PeerKind::Wshd1 | PeerKind::WshdAdmin | PeerKind::NodeWs => {
                Some(DEFLATE_PATH)
            }
            _ => None,
        }
    }
}

/// Paths the runner works with.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The workspace root (holds Cargo.toml, BENCHMARKS.md, bench/).
    pub repo: PathBuf,
    /// The cargo target directory whose `release/` holds our binaries.
    pub target_dir: PathBuf,
    /// This run's scratch directory: logs, addr files, handler copies.
    pub run_dir: PathBuf,
}

impl Layout {
    /// `target/release`.
    pub fn release_dir(&self) -> PathBuf {
        self.target_dir.join("release")
    }

    /// Where peer installs (venv, sdist) are cached between runs.
    pub fn peer_cache(&self) -> PathBuf {
        self.target_dir.join("bench-peers")
    }

    /// The test certificate the TLS peers serve and wsbench trusts (made
    /// by [`Layout::tls_files`]).
    pub fn tls_cert(&self) -> PathBuf {
        self.run_dir.join("tls-cert.pem")
    }

    /// Makes the test certificate and key once per run; returns their paths.
    pub fn tls_files(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = (self.tls_cert(), self.run_dir.join("tls-key.pem"));
        if !cert.exists() || !key.exists() {
            bench::tls::make_cert(&cert, &key).context("making the test certificate")?;
        }
        Ok((cert, key))
    }
}

/// How to start a peer and find its port.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Which peer this is.
    pub kind: PeerKind,
    program: PathBuf,
    args: Vec<String>,
    /// Working directory for the child.
    cwd: PathBuf,
    /// How the bound address becomes known.
    announce: Announce,
    /// Version string for the report.
    pub version: String,
}

#[derive(Debug, Clone)]
enum Announce {
    /// The server writes `host:port` to this file once it listens.
    AddrFile(PathBuf),
    /// The port is chosen by us; readiness means it accepts TCP.
    FixedPort,
}

/// A peer that is listening.
#[derive(Debug)]
pub struct RunningPeer {
    /// Which peer this is.
    pub kind: PeerKind,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl RunningPeer {
    /// The server's process id, for `/proc` readings.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `ws://ADDR/PATH`, or `wss://` for a TLS peer.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.kind.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.addr)
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Asks a child to stop, then kills it if it is still there after 3 s.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = kill_process(Pid::from_child(child), Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Launch {
    /// Starts the peer and waits until it listens. With `cpu`, the server
    /// runs pinned to that CPU (`taskset -c CPU`, which execs the server,
    /// so the PID is the server's): it sees one CPU from the start, and a
    /// runtime that sizes itself to the machine starts one worker thread.
    pub fn start(
        &self,
        layout: &Layout,
        attempt: u32,
        cpu: Option<usize>,
    ) -> anyhow::Result<RunningPeer> {
        let log_path = layout
            .run_dir
            .join(format!("{}-{attempt}.log", self.kind.key()));
        let log = File::create(&log_path)?;
        let mut args = self.args.clone();
        let port = match &self.announce {
            Announce::AddrFile(path) => {
                let _ = fs::remove_file(path);
                None
            }
            Announce::FixedPort => {
                let port = free_port()?;
                args.extend(["-p".to_owned(), port.to_string()]);
                Some(port)
            }
        };
        let mut command = match cpu {
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu.to_string()).arg(&self.program);
                command
            }
            None => Command::new(&self.program),
        };
        let child = command
            .args(&args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let mut peer = RunningPeer {
            kind: self.kind,
            addr: SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))),
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !peer.is_alive() {
                bail!(
                    "{} exited during start-up; log {}:\n{}",
                    self.kind.key(),
                    log_path.display(),
                    tail(&log_path)
                );
            }
            let ready = match &self.announce {
                Announce::AddrFile(path) => fs::read_to_string(path)
                    .ok()
                    .and_then(|text| text.trim().parse::<SocketAddr>().ok())
                    .map(|addr| peer.addr = addr)
                    .is_some(),
                Announce::FixedPort => {
                    TcpStream::connect_timeout(&peer.addr, Duration::from_millis(200)).is_ok()
                }
            };
            if ready {
                return Ok(peer);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start listening within {START_TIMEOUT:?}; log {}",
                    self.kind.key(),
                    log_path.display()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }
}

/// A port that was free a moment ago, for servers that cannot report theirs.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs a set-up command, failing with its output when it fails.
fn run_quiet(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Prepares a peer: builds nothing, but installs what the peer needs (venv,
/// npm packages, handler copies) and returns how to launch it.
pub fn prepare(kind: PeerKind, layout: &Layout) -> anyhow::Result<Launch> {
    let addr_file = layout.run_dir.join(format!("{}.addr", kind.key()));
    let release = layout.release_dir();
    let addr_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--addr-file".to_owned(), addr_file.display().to_string()]);
        args
    };
    match kind {
        PeerKind::Raw | PeerKind::Raw4k | PeerKind::Raw4k1 | PeerKind::Raw4kTls => {
            let program = release.join("raw-echo");
            if !program.exists() {
                bail!("{} is missing; build the bench crate", program.display());
            }
            let mut args = addr_args(&["-H", "127.0.0.1", "-p", "0"]);
            if kind != PeerKind::Raw {
                args.extend(["--read-buffer-size".to_owned(), "4096".to_owned()]);
            }
            if kind == PeerKind::Raw4k1 {
                args.extend(["--threads".to_owned(), "1".to_owned()]);
            }
            if kind.is_tls() {
                let (cert, key) = layout.tls_files()?;
                args.extend([
                    "--tls-cert".to_owned(),
                    cert.display().to_string(),
                    "--tls-key".to_owned(),
                    key.display().to_string(),
                ]);
            }
            Ok(Launch {
                kind,
                program,
                args,
                cwd: layout.run_dir.clone(),
                announce: Announce::AddrFile(addr_file),
                version: String::new(),
            })
        }
        PeerKind::Wshd | PeerKind::Wshd1 | PeerKind::WshdAdmin | PeerKind::WshdTls => {
            let program = release.join("wshd");
            // Each peer its own copies: never overwrite a loaded library.
            let handlers = layout.run_dir.join(format!("{}-handlers", kind.key()));
            fs::create_dir_all(&handlers)?;
            for library in ["libecho_wsh.so", "libchat_wsh.so"] {
                let built = release.join(library);
                fs::copy(&built, handlers.join(library))
                    .with_context(|| format!("copying {}", built.display()))?;
            }
            if !program.exists() {
                bail!("{} is missing", program.display());
            }
            // The default cap of 10,000 sockets would stall the 19,000
            // connection workload; the other peers have no cap at all.
            let config = layout.run_dir.join(format!("{}.toml", kind.key()));
            fs::write(&config, WSHD_CONFIG)?;
            let handlers = handlers.display().to_string();
            let config = config.display().to_string();
            let mut args = addr_args(&[
                "-H",
                "127.0.0.1",
                "-p",
                "0",
                "-w",
                &handlers,
                "--config",
                &config,
                "--log-level",
                "warn",
            ]);
            if kind == PeerKind::Wshd1 {
                args.extend(["--workers".to_owned(), "1".to_owned()]);
            }
            if kind == PeerKind::WshdAdmin {
                args.extend(["--admin".to_owned(), "127.0.0.1:0".to_owned()]);
            }
            if kind.is_tls() {
                let (cert, key) = layout.tls_files()?;
                args.extend([
                    "--tls-cert".to_owned(),
                    cert.display().to_string(),
                    "--tls-key".to_owned(),
                    key.display().to_string(),
                ]);
            }
            Ok(Launch {
                kind,
                program,
                args,
                cwd: layout.run_dir.clone(),
                announce: Announce::AddrFile(addr_file),
                version: String::new(),
            })
        }
        PeerKind::FastWs => {
            let program = release.join("fastws-echo");
            if !program.exists() {
                bail!("{} is missing; build the bench crate", program.display());
            }
            let lock = fs::read_to_string(layout.repo.join("Cargo.lock")).unwrap_or_default();
            Ok(Launch {
                kind,
                program,
                args: addr_args(&["-H", "127.0.0.1", "-p", "0"]),
                cwd: layout.run_dir.clone(),
                announce: Announce::AddrFile(addr_file),
                version: crate::report::locked_version(&lock, "fastwebsockets"),
            })
        }
        PeerKind::NodeWs | PeerKind::Uws => {
            let (package, script) = if kind == PeerKind::Uws {
                ("uWebSockets.js", "uws-echo.mjs")
            } else {
                ("ws", "ws-echo.mjs")
            };
            let peers = layout.repo.join("bench/peers");
            let manifest = peers
                .join("node_modules")
                .join(package)
                .join("package.json");
            if !manifest.exists() {
                run_quiet(
                    Command::new("npm")
                        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                        .arg(&peers),
                    "npm ci in bench/peers",
                )?;
            }
            let package = fs::read_to_string(&manifest)?;
            let package: serde_json::Value = serde_json::from_str(&package)?;
            let version = package["version"].as_str().unwrap_or("?").to_owned();
            let script = peers.join(script).display().to_string();
            Ok(Launch {
                kind,
                program: PathBuf::from("node"),
                args: addr_args(&[&script, "--host", "127.0.0.1", "--port", "0"]),
                cwd: peers,
                announce: Announce::AddrFile(addr_file),
                version,
            })
        }
        PeerKind::Pywebsocket => {
            let cache = layout.peer_cache().join("pywebsocket3");
            let python = cache.join("venv/bin/python");
            if !python.exists() {
                fs::create_dir_all(&cache)?;
                run_quiet(
                    Command::new("python3")
                        .args(["-m", "venv"])
                        .arg(cache.join("venv")),
                    "creating the pywebsocket3 venv",
                )?;
            }
            let pinned = format!("pywebsocket3=={PYWEBSOCKET_VERSION}");
            if run_quiet(
                Command::new(&python).args(["-c", "import pywebsocket3"]),
                "import",
            )
            .is_err()
            {
                run_quiet(
                    Command::new(&python).args(["-m", "pip", "install", "-q", &pinned]),
                    "pip install pywebsocket3",
                )?;
            }
            // The wheel ships no example handlers; the sdist has echo_wsh.py.
            let sdist = cache.join("sdist");
            let example = sdist.join(format!("pywebsocket3-{PYWEBSOCKET_VERSION}/example"));
            if !example.join("echo_wsh.py").exists() {
                fs::create_dir_all(&sdist)?;
                run_quiet(
                    Command::new(&python)
                        .args(["-m", "pip", "download", "-q", "--no-deps"])
                        .args(["--no-binary", ":all:", &pinned, "-d"])
                        .arg(&sdist),
                    "pip download of the pywebsocket3 sdist",
                )?;
                let archive = sdist.join(format!("pywebsocket3-{PYWEBSOCKET_VERSION}.tar.gz"));
                run_quiet(
                    Command::new("tar")
                        .arg("xzf")
                        .arg(&archive)
                        .arg("-C")
                        .arg(&sdist),
                    "unpacking the pywebsocket3 sdist",
                )?;
            }
            let version = run_quiet(
                Command::new(&python).args([
                    "-c",
                    "import importlib.metadata as m, sys; \
                     print(m.version('pywebsocket3'), 'on Python', sys.version.split()[0])",
                ]),
                "reading the pywebsocket3 version",
            )?;
            let example = example.display().to_string();
            Ok(Launch {
                kind,
                program: python,
                args: [
                    "-m",
                    "pywebsocket3.standalone",
                    "-H",
                    "127.0.0.1",
                    "-d",
                    &example,
                    "-w",
                    &example,
                    "-q",
                    "1024",
                    "--log-level",
                    "warn",
                ]
                .map(str::to_owned)
                .to_vec(),
                cwd: layout.run_dir.clone(),
                announce: Announce::FixedPort,
                version,
            })
        }
    }
}
