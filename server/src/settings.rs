//! [`Settings`]: the configuration the server runs with, resolved from the
//! command line and the config file (flags win), with defaults applied.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::Args;
use crate::config::{
    ConfigFile, DEFAULT_HOST, DEFAULT_PORT, Limits, OriginRule, ReloadSettings, line_col,
};
use crate::error::ConfigError;

/// Everything the server needs to know, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub handler_dir: PathBuf,
    pub document_root: Option<PathBuf>,
    pub allow_outside: bool,
    pub limits: Limits,
    pub reload: ReloadSettings,
    pub shutdown_timeout: Duration,
    /// Worker threads for connections (`--workers`, `workers`).
    pub workers: usize,
    /// Routes from the config file, in file order.
    pub routes: Vec<RouteSpec>,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub config_path: Option<PathBuf>,
    /// Load handler files that fail the trust check (trust.rs), warning at
    /// every load, instead of refusing them.
    pub allow_insecure_handler_dir: bool,
    /// `[rollout]`: canary, rollback and quarantine for every route.
    pub rollout: crate::rollout::Policy,
    /// Where the running server writes its live route table (status.rs).
    pub status_file: Option<PathBuf>,
}

/// One `[[route]]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub path: String,
    pub aliases: Vec<String>,
    pub handler: String,
    /// Where `handler = ...` is written, for "missing handler" errors.
    pub handler_at: Option<Location>,
    pub allowed_origins: Option<Vec<OriginRule>>,
    pub limits: Limits,
    pub config_text: String,
    /// `[rollout]` overlaid with `[route.rollout]`.
    pub rollout: crate::rollout::Policy,
    /// `sha256 = "..."`: the only handler bytes this route loads.
    pub sha256: Option<String>,
}

/// A place in the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// A config error at this place for `key`.
    pub fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: self.line,
            column: self.column,
            key: key.into(),
            message,
        }
    }
}

impl Settings {
    /// Loads the config file named by `args` (if any) and applies the flags.
    pub fn load(args: &Args) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(p) => Some(ConfigFile::load(p)?),
            None => None,
        };
        Settings::resolve(args, file.as_ref())
    }

    /// Combines flags and file; flags override the file.
    pub fn resolve(args: &Args, file: Option<&ConfigFile>) -> Result<Settings, ConfigError> {
        let base = file.map(ConfigFile::base_dir).unwrap_or_default();
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let raw = file.map(|f| &f.raw);

        let file_listen: Option<SocketAddr> = raw
            .and_then(|r| r.listen.as_ref())
            .map(|l| l.get_ref().parse().expect("checked when parsing"));
        let host = match &args.host {
            Some(h) => h.clone(),
            None => file_listen
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| DEFAULT_HOST.into()),
        };
        let port = args
            .port
            .or(file_listen.map(|a| a.port()))
            .unwrap_or(DEFAULT_PORT);
        let listen = resolve_listen(&host, port)?;

        let handler_dir = match (&args.handlers, raw.and_then(|r| r.handler_dir.as_deref())) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => rel(d),
            (None, None) => {
                return Err(ConfigError::Other(
                    "no handler directory: pass -w DIR or set handler_dir in the config file"
                        .into(),
                ));
            }
        };
        let document_root = args
            .document_root
            .clone()
            .or_else(|| raw.and_then(|r| r.document_root.as_deref()).map(rel));

        if let Some(level) = &args.log_level {
            crate::config::check_log_level(level)
                .map_err(|e| ConfigError::Other(format!("--log-level: {e}")))?;
        }
        let limits =
            Limits::default().overlay(raw.map(|r| &r.limits).unwrap_or(&Default::default()));
        let mut reload = ReloadSettings::default();
        if let Some(r) = raw.map(|r| &r.reload) {
            reload.watch = r.watch.unwrap_or(reload.watch);
            reload.debounce = r.debounce.map_or(reload.debounce, |d| d.0);
            reload.drain_timeout = r.drain_timeout.map_or(reload.drain_timeout, |d| d.0);
            reload.drain_window = r.drain_window.map_or(reload.drain_window, |d| d.0);
        }
        if let Some(d) = &args.drain_timeout {
            reload.drain_timeout = if d == "never" {
                None
            } else {
                Some(humantime::parse_duration(d).map_err(|e| {
                    ConfigError::Other(format!(
                        "--drain-timeout `{d}`: {e}; write e.g. 30s or never"
                    ))
                })?)
            };
        }
        if args.no_watch {
            reload.watch = false;
        }
        let shutdown_timeout = raw
            .and_then(|r| r.shutdown.timeout)
            .map_or(Duration::from_secs(10), |d| d.0);

        let status_file = raw.and_then(|r| r.status_file.as_deref()).map(rel);
        if let Some(f) = &status_file
            && f.starts_with(&handler_dir)
        {
            // Each write would be a change under the watched directory: a
            // reload that writes it again, forever.
            return Err(ConfigError::Other(format!(
                "status_file {} is inside handler_dir {}; put it outside, e.g. in /run/wshd/",
                f.display(),
                handler_dir.display()
            )));
        }
        let rollout = crate::rollout::Policy::default()
            .overlay(raw.map(|r| &r.rollout).unwrap_or(&Default::default()));
        let mut routes = Vec::new();
        if let (Some(file), Some(raw)) = (file, raw) {
            for r in &raw.routes {
                let (line, column) = line_col(&file.source, r.handler.span().start);
                let config_text = match &r.config {
                    Some(t) => toml::to_string(t).map_err(|e| ConfigError::Other(e.to_string()))?,
                    None => String::new(),
                };
                routes.push(RouteSpec {
                    path: r.path.get_ref().0.clone(),
                    aliases: r.aliases.iter().map(|a| a.get_ref().0.clone()).collect(),
                    handler: r.handler.get_ref().trim_matches('/').to_string(),
                    handler_at: Some(Location {
                        path: file.path.clone(),
                        line,
                        column,
                    }),
                    allowed_origins: r.allowed_origins.clone(),
                    limits: limits.overlay(&r.limits),
                    config_text,
                    rollout: rollout.overlay(&r.rollout),
                    sha256: r.sha256.as_ref().map(|p| p.get_ref().0.clone()),
                });
            }
        }

        Ok(Settings {
            listen,
            handler_dir,
            document_root,
            allow_outside: args.allow_handlers_outside_root_dir
                || raw.is_some_and(|r| r.allow_handlers_outside_root_dir),
            limits,
            reload,
            shutdown_timeout,
            workers: args
                .workers
                .map(usize::from)
                .or_else(|| raw.and_then(|r| r.workers.as_ref()).map(|c| c.get_ref().0))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            routes,
            log_level: args
                .log_level
                .clone()
                .or_else(|| {
                    raw.and_then(|r| r.log_level.as_ref())
                        .map(|l| l.get_ref().clone())
                })
                .unwrap_or_else(|| "info".into()),
            log_file: args
                .log_file
                .clone()
                .or_else(|| raw.and_then(|r| r.log_file.as_deref()).map(rel)),
            pid_file: args
                .pid_file
                .clone()
                .or_else(|| raw.and_then(|r| r.pid_file.as_deref()).map(rel)),
            state_dir: raw.and_then(|r| r.state_dir.as_deref()).map(rel),
            config_path: args.config.clone(),
            allow_insecure_handler_dir: args.allow_insecure_handler_dir
                || raw.is_some_and(|r| r.allow_insecure_handler_dir),
            rollout,
            status_file,
        })
    }
}

fn resolve_listen(host: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            ConfigError::Other(format!(
                "cannot resolve listen address `{host}` (port {port})"
            ))
        })
}
