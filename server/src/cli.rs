//! Command-line flags. Names follow pywebsocket's standalone server where the
//! meaning is the same (`-p`, `-H`, `-w`, `-d`, `--log-level`,
//! `--allow-handlers-outside-root-dir`). Flags override the config file.

use std::path::PathBuf;

use clap::Parser;

/// The exit statuses wshd ends with, one scheme for serving and for `-t`:
/// 2 means "wshd would not start with this", so a supervisor can tell a
/// broken deploy (do not restart in a loop) from a failure at run time.
pub mod exit {
    /// Served and shut down cleanly; `-t` / `--list` found no problem.
    pub const OK: u8 = 0;
    /// A failure while starting or running (cannot listen, cannot write the
    /// pid file, ...), or `-t` / `--list` found handler files that would not
    /// be served (unloadable, untrusted); the server would start without them
    /// (`-t --fatal-only` exits 0 then), or `-t` found a TLS certificate that
    /// cannot be served (the server would not start).
    pub const FAILURE: u8 = 1;
    /// Usage or configuration error: a bad flag or value, an unreadable or
    /// invalid config file, a route naming a handler that does not exist.
    /// wshd would refuse to start; `-t` says so with the same status.
    pub const CONFIG: u8 = 2;
    /// Handler code called `exit()` (crash.rs; a fatal signal in handler
    /// code ends the process by that signal instead).
    pub const HANDLER: u8 = crate::crash::EXIT_HANDLER as u8;
}

/// The config file `-t` and `--list` read when given neither `--config` nor
/// `-w`: the one the installed service runs with (scripts/install.sh).
pub const DEFAULT_CONFIG: &str = "/etc/wshd/wshd.toml";

/// Printed after the flags by `wshd --help`.
const AFTER_HELP: &str = "\
Without --config and -w, `wshd -t` and `wshd --list` check /etc/wshd/wshd.toml
(the installed service's config; $WSHD_DEFAULT_CONFIG names another) when it
exists, and say which file they read.

Exit status:
  0   served and shut down cleanly; -t / --list found no problem; or
      -t --fatal-only found only handler files that would not be served
  1   failure at run time (e.g. cannot listen), or -t / --list found handler
      files that would not be served (the server would start without them),
      or -t found a TLS certificate that cannot be served
  2   usage or configuration error: bad flag or value, unreadable or invalid
      config file, a route naming a missing handler; wshd would not start
  70  handler code called exit(); a fatal signal in handler code (SIGSEGV...)
      ends wshd by that signal instead, after a line naming the handler";

/// wshd: a WebSocket server for compiled handler modules, with hot reload.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "wshd", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Args {
    /// Port to listen on (default 9998; 0 picks a free port).
    #[arg(short = 'p', long = "port", env = "WSHD_PORT")]
    pub port: Option<u16>,

    /// Address to bind (default 127.0.0.1; use 0.0.0.0 or :: to listen on all interfaces).
    #[arg(short = 'H', long = "server-host", env = "WSHD_HOST")]
    pub host: Option<String>,

    /// Directory scanned recursively for NAME_wsh.so / libNAME_wsh.so handlers.
    #[arg(short = 'w', long = "websock-handlers", env = "WSHD_HANDLERS")]
    pub handlers: Option<PathBuf>,

    /// Serve static files from this directory on the same port.
    #[arg(short = 'd', long = "document-root")]
    pub document_root: Option<PathBuf>,

    /// TOML config file (routes, limits, reload); see config/wshd.toml.
    #[arg(short = 'c', long = "config", env = "WSHD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log level: error, warn, info, debug, trace, or a tracing filter such as "info,handler=debug".
    #[arg(long = "log-level")]
    pub log_level: Option<String>,

    /// Log to this file instead of stderr; SIGUSR1 reopens it (for logrotate).
    #[arg(short = 'l', long = "log-file")]
    pub log_file: Option<PathBuf>,

    /// Serve handler files whose real path (after symlinks) is outside the handler directory.
    #[arg(long = "allow-handlers-outside-root-dir")]
    pub allow_handlers_outside_root_dir: bool,

    /// Test the config and load every handler (like nginx -t), print each problem, then exit.
    #[arg(short = 't', long = "check-config")]
    pub check_config: bool,

    /// With -t: fail only when the server would not start (exit 1 or 2); handler files that would not be served are printed as warnings and exit 0. For systemd's ExecStartPre.
    #[arg(long = "fatal-only", requires = "check_config")]
    pub fatal_only: bool,

    /// List the handlers and routes the server would serve, then exit (live state: set status_file).
    #[arg(long = "list")]
    pub list: bool,

    /// Write the process id to this file.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,

    /// Write the bound address (host:port) to this file once listening; useful with -p 0.
    #[arg(long = "addr-file")]
    pub addr_file: Option<PathBuf>,

    /// How long connections stay on a replaced handler version before Close 1012 ("never" to keep them).
    #[arg(long = "drain-timeout")]
    pub drain_timeout: Option<String>,

    /// Worker threads that serve connections (default: one per CPU core).
    #[arg(long = "workers", value_parser = clap::value_parser!(u16).range(1..=crate::config::MAX_WORKERS as i64))]
    pub workers: Option<u16>,

    /// Do not watch the handler directory and config file (SIGHUP still reloads).
    #[arg(long = "no-watch")]
    pub no_watch: bool,

    /// Load handler files even if they or their directories are writable by others or owned by another user (logs a warning at every load).
    #[arg(long = "allow-insecure-handler-dir")]
    pub allow_insecure_handler_dir: bool,

    /// Serve /metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9999); never the public port. Off by default.
    #[arg(long = "admin", value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,

    /// PEM certificate chain: the listener speaks TLS (wss://, https://); needs --tls-key.
    #[arg(long = "tls-cert", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert.
    #[arg(long = "tls-key", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
