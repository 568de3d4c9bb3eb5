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
    /// `[topics]` and `[timers]` caps.
    pub pubsub: crate::config::PubSubLimits,
    /// The admin listener's address (`--admin`, `[admin] listen`); `None`:
    /// no admin listener.
    pub admin: Option<SocketAddr>,
    /// Every listener, in config order; the first one's address is `listen`.
    pub listeners: Vec<ListenerSpec>,
    /// `[tls]` or `--tls-cert/--tls-key`: the certificate the TLS listeners
    /// serve.
    pub tls: Option<crate::tls::TlsSettings>,
    /// `[rollout]`: canary, rollback and quarantine for every route.
    pub rollout: crate::rollout::Policy,
    /// Where the running server writes its live route table (status.rs).
    pub status_file: Option<PathBuf>,
    /// `[cluster]`, if configured. Read at startup only: a config reload
    /// does not reconnect.
    pub cluster: Option<crate::cluster::ClusterSettings>,
}

/// One listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub tls: bool,
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
        // Configured paths are tidied (`config/../target/x` becomes
        // `target/x`) so that logs, `--list` and error messages name files
        // the way an operator would write them.
        let rel = |p: &Path| {
            if p.is_absolute() {
                normalize(p)
            } else {
                normalize(&base.join(p))
            }
        };
        let raw = file.map(|f| &f.raw);

        let listen_list: Option<Vec<ListenerSpec>> =
            match raw.and_then(|r| r.listen.as_ref()).map(|l| l.get_ref()) {
                Some(crate::config::Listen::Many(l)) => Some(
                    l.iter()
                        .map(|l| ListenerSpec {
                            addr: l.addr.parse().expect("checked when parsing"),
                            tls: l.tls,
                        })
                        .collect(),
                ),
                _ => None,
            };
        if listen_list.is_some() && (args.host.is_some() || args.port.is_some()) {
            return Err(ConfigError::Other(
                "-H/--server-host and -p/--port set the address of a single listener, but the \
                 config file's `listen` is a list of listeners: change the addresses there, or \
                 drop the flags"
                    .into(),
            ));
        }
        let file_listen: Option<SocketAddr> = match raw.and_then(|r| r.listen.as_ref()) {
            Some(l) => match l.get_ref() {
                crate::config::Listen::One(a) => Some(a.parse().expect("checked when parsing")),
                crate::config::Listen::Many(l) => {
                    Some(l[0].addr.parse().expect("checked when parsing"))
                }
            },
            None => None,
        };
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
        let tls = crate::tls::TlsSettings::resolve(args, raw.and_then(|r| r.tls.as_ref()), &rel)?;
        let listeners = match listen_list {
            Some(l) => l,
            // One listener: TLS exactly when a certificate is configured.
            None => vec![ListenerSpec {
                addr: listen,
                tls: tls.is_some(),
            }],
        };
        if tls.is_none() && listeners.iter().any(|l| l.tls) {
            return Err(ConfigError::Other(
                "a listener has `tls = true` but no certificate is configured: set [tls] cert and \
                 key (or --tls-cert and --tls-key)"
                    .into(),
            ));
        }
        if tls.is_some() && !listeners.iter().any(|l| l.tls) {
            return Err(ConfigError::Other(
                "a TLS certificate is configured but no listener has `tls = true`: add `tls = \
                 true` to a listener in the `listen` list, or drop [tls]"
                    .into(),
            ));
        }

        let handler_dir = match (&args.handlers, raw.and_then(|r| r.handler_dir.as_deref())) {
            (Some(d), _) => normalize(d),
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
            .as_deref()
            .map(normalize)
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
            reload.handover_max_bytes = r
                .handover_max_bytes
                .map_or(reload.handover_max_bytes, |b| b.0);
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
                let auth = match &r.auth {
                    Some(a) => Some(std::sync::Arc::new(
                        crate::auth::Auth::load(a, &file.base_dir()).map_err(
                            |(key, message)| {
                                let (line, column) = line_col(&file.source, r.path.span().start);
                                Location {
                                    path: file.path.clone(),
                                    line,
                                    column,
                                }
                                .error(&format!("route.{key}"), message)
                            },
                        )?,
                    )),
                    None => None,
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
                    limits: crate::config::Limits {
                        compression: r.compression.unwrap_or_default(),
                        auth,
                        ..limits.overlay(&r.limits)
                    },
                    config_text,
                    rollout: rollout.overlay(&r.rollout),
                    sha256: r.sha256.as_ref().map(|p| p.get_ref().0.clone()),
                });
            }
        }

        let admin = args.admin.or_else(|| {
            raw.and_then(|r| r.admin.listen.as_ref())
                .map(|l| l.get_ref().parse().expect("checked when parsing"))
        });
        if let Some(a) = admin
            && crate::admin::clashes(a, listen)
        {
            return Err(ConfigError::Other(format!(
                "the admin listener ({a}) would share the public listen address ({listen}); \
                 /metrics must never be served on the public port: give [admin] listen or \
                 --admin another port, e.g. 127.0.0.1:9999"
            )));
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
                .as_deref()
                .map(normalize)
                .or_else(|| raw.and_then(|r| r.log_file.as_deref()).map(rel)),
            pid_file: args
                .pid_file
                .as_deref()
                .map(normalize)
                .or_else(|| raw.and_then(|r| r.pid_file.as_deref()).map(rel)),
            state_dir: raw.and_then(|r| r.state_dir.as_deref()).map(rel),
            config_path: args.config.clone(),
            allow_insecure_handler_dir: args.allow_insecure_handler_dir
                || raw.is_some_and(|r| r.allow_insecure_handler_dir),
            pubsub: crate::config::PubSubLimits::from_raw(raw),
            admin,
            listeners,
            tls,
            rollout,
            status_file,
            cluster: raw
                .and_then(|r| r.cluster.as_ref())
                .map(|c| crate::cluster::ClusterSettings::from_raw(c, rel))
                .transpose()
                .map_err(ConfigError::Other)?,
        })
    }
}

/// Removes `.` components and folds `dir/..` into nothing, without touching
/// the file system's meaning of the path: a `..` after a component that is a
/// symbolic link is kept, because there it leads to the parent of the link's
/// target, not to the directory holding the link. A `..` that climbs above
/// the start of a relative path is kept too. `/..` is `/`.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) if !out.is_symlink() => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_dot_and_dotdot_lexically() {
        let n = |p: &str| normalize(Path::new(p)).display().to_string();
        assert_eq!(n("config/../target/handlers"), "target/handlers");
        assert_eq!(n("./config/./wshd.toml"), "config/wshd.toml");
        assert_eq!(n("/etc/wshd/../wshd/x"), "/etc/wshd/x");
        assert_eq!(n("/../x"), "/x");
        assert_eq!(n("../x/../y"), "../y");
        assert_eq!(n("../../x"), "../../x");
        assert_eq!(n("a/.."), ".");
        assert_eq!(n("/"), "/");
    }

    /// `link/..` is the parent of the link's target, so it must stay.
    #[test]
    fn normalize_keeps_dotdot_after_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real/inner");
        std::fs::create_dir_all(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = link.join("../x");
        assert_eq!(normalize(&p), p);
        // A plain directory folds.
        assert_eq!(
            normalize(&tmp.path().join("real/inner/../x")),
            tmp.path().join("real/x")
        );
    }

    #[test]
    fn paths_from_the_config_file_are_normalized() {
        let file = ConfigFile::parse(
            Path::new("config/wshd.toml"),
            "handler_dir = \"../target/handlers\"\ndocument_root = \"./../www\"\n\
             pid_file = \"/run/wshd/./wshd.pid\"\n"
                .into(),
        )
        .unwrap();
        let s = Settings::resolve(&Args::default(), Some(&file)).unwrap();
        assert_eq!(s.handler_dir, Path::new("target/handlers"));
        assert_eq!(s.document_root.as_deref(), Some(Path::new("www")));
        assert_eq!(s.pid_file.as_deref(), Some(Path::new("/run/wshd/wshd.pid")));
    }
}
