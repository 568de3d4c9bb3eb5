//! The TOML configuration: [`RawConfig`] as written by the operator, parsed
//! with `deny_unknown_fields`, and the value types that validate themselves
//! while parsing so that every error carries the file, line and key.
//!
//! The example in `config/wshd.toml` documents every key; a test parses every
//! file in `config/` so the examples cannot rot.
//!
//! Command-line flags override the file: see [`crate::settings::Settings::resolve`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;

use crate::error::ConfigError;

/// Default listen address: loopback, so a fresh install is not reachable from
/// the network until the operator says so (`-H 0.0.0.0`).
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default port, the one pywebsocket's examples use.
pub const DEFAULT_PORT: u16 = 9998;

/// The whole file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on, `host:port` (`-H`/`-p` override it).
    pub listen: Option<Spanned<String>>,
    /// Directory scanned for `*_wsh.so` handlers, relative to the config file.
    pub handler_dir: Option<PathBuf>,
    /// Static files served on the same port (pywebsocket's `-d`).
    pub document_root: Option<PathBuf>,
    /// Accept handler files whose real path leaves `handler_dir`.
    #[serde(default)]
    pub allow_handlers_outside_root_dir: bool,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    pub log_level: Option<String>,
    /// Log to this file instead of stderr (reopened on SIGUSR1).
    pub log_file: Option<PathBuf>,
    /// Write the server's pid here.
    pub pid_file: Option<PathBuf>,
    /// Private directory for the loader's copies of handler files.
    pub state_dir: Option<PathBuf>,
    /// Worker threads that serve connections (default: one per core).
    pub workers: Option<Count>,
    /// Server-wide limits; routes may override some of them.
    #[serde(default)]
    pub limits: RawLimits,
    /// Hot reload settings.
    #[serde(default)]
    pub reload: RawReload,
    /// Graceful shutdown settings.
    #[serde(default)]
    pub shutdown: RawShutdown,
    /// Routes added on top of the scanned ones.
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
}

/// `[limits]` and `[route.limits]`: every field optional so a route can
/// override only what it names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_message_size: Option<ByteSize>,
    pub max_frame_size: Option<ByteSize>,
    pub read_buffer_size: Option<ByteSize>,
    pub send_queue: Option<QueueLen>,
    pub slow_consumer: Option<SlowConsumer>,
    pub handshake_timeout: Option<Dur>,
    pub max_connections: Option<Count>,
    pub close_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    /// Server-wide: only allowed in `[limits]` (checked in `ConfigFile::check`).
    pub max_buffered_bytes: Option<Spanned<ByteSize>>,
    pub message_timeout: Option<Interval>,
    pub ping_interval: Option<Interval>,
    pub idle_timeout: Option<Interval>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub watch: Option<bool>,
    pub debounce: Option<Dur>,
    pub drain_timeout: Option<DrainTimeout>,
    pub drain_window: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub timeout: Option<Dur>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: Spanned<RoutePath>,
    /// The handler's name: its path under the handler directory without the
    /// `_wsh.so` suffix, e.g. `echo` or `chat/room`.
    pub handler: Spanned<String>,
    #[serde(default)]
    pub aliases: Vec<Spanned<RoutePath>>,
    /// Origin allowlist; absent means any Origin, `null` included.
    pub allowed_origins: Option<Vec<OriginRule>>,
    #[serde(default)]
    pub limits: RawLimits,
    /// Passed to the handler's init as TOML text.
    pub config: Option<toml::Table>,
}

/// Resolved limits with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest message accepted from a peer; bigger ones get close 1009.
    pub max_message_size: usize,
    /// Largest single frame accepted from a peer.
    pub max_frame_size: usize,
    /// tungstenite's per-connection read buffer, allocated for the whole
    /// life of every connection: it is most of an idle connection's memory.
    /// Larger messages still arrive whole; a bigger buffer only means fewer
    /// read calls for them.
    pub read_buffer_size: usize,
    /// Messages that may wait in one connection's send queue.
    pub send_queue: usize,
    /// What happens when the send queue is full.
    pub slow_consumer: SlowConsumer,
    /// Time allowed for a client to send the whole upgrade request.
    pub handshake_timeout: Duration,
    /// Open connections (sockets) at most; more wait in the accept backlog.
    pub max_connections: usize,
    /// How long to wait for the peer's reply to our close frame.
    pub close_timeout: Duration,
    /// How long one write may wait for a peer that does not read; then the
    /// connection is dropped, so a stalled reader cannot pin a session.
    /// Pending pong and close replies count: output tungstenite could not
    /// write for this long drops the connection too.
    pub write_timeout: Duration,
    /// Server-wide budget for bytes of unfinished incoming messages (partly
    /// received frames and fragmented messages) held by all connections
    /// together. Over it, the connection holding the most is closed with
    /// 1009 and its buffers are freed. Only allowed in `[limits]`.
    pub max_buffered_bytes: usize,
    /// A message whose first byte has arrived must be complete within this
    /// time, or the connection is closed with 1008 and its buffers freed.
    pub message_timeout: Duration,
    /// The server pings every connection this often.
    pub ping_interval: Duration,
    /// A connection from which nothing (pongs included) arrived for this
    /// long is closed with 1001 "idle timeout".
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            read_buffer_size: 2048,
            send_queue: 1024,
            slow_consumer: SlowConsumer::Close,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            close_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            max_buffered_bytes: 64 << 20,
            message_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl Limits {
    /// These limits with every field `raw` sets replaced.
    pub fn overlay(&self, raw: &RawLimits) -> Limits {
        let mut l = self.clone();
        if let Some(v) = raw.max_message_size {
            l.max_message_size = v.0;
        }
        if let Some(v) = raw.max_frame_size {
            l.max_frame_size = v.0;
        }
        if let Some(v) = raw.read_buffer_size {
            l.read_buffer_size = v.0;
        }
        if let Some(v) = raw.send_queue {
            l.send_queue = v.0;
        }
        if let Some(v) = raw.slow_consumer {
            l.slow_consumer = v;
        }
        if let Some(v) = raw.handshake_timeout {
            l.handshake_timeout = v.0;
        }
        if let Some(v) = raw.max_connections {
            l.max_connections = v.0;
        }
        if let Some(v) = raw.close_timeout {
            l.close_timeout = v.0;
        }
        if let Some(v) = raw.write_timeout {
            l.write_timeout = v.0;
        }
        if let Some(v) = &raw.max_buffered_bytes {
            l.max_buffered_bytes = v.get_ref().0;
        }
        if let Some(v) = raw.message_timeout {
            l.message_timeout = v.0;
        }
        if let Some(v) = raw.ping_interval {
            l.ping_interval = v.0;
        }
        if let Some(v) = raw.idle_timeout {
            l.idle_timeout = v.0;
        }
        l
    }
}

/// What to do when a handler sends to a connection whose queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Refuse the message (`WSHD_ERR_BACKPRESSURE`) and close the connection
    /// with 1008, so one stalled reader cannot hold memory or stall a
    /// broadcast.
    Close,
    /// Refuse the message (`WSHD_ERR_BACKPRESSURE`) and leave the decision to
    /// the handler.
    Error,
}

/// Hot-reload settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadSettings {
    pub watch: bool,
    pub debounce: Duration,
    /// `None` means connections on an old version are never closed by a
    /// reload; they stay until they close themselves.
    pub drain_timeout: Option<Duration>,
    /// After the drain timeout, closes (1012) are spread over this window.
    pub drain_window: Duration,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        ReloadSettings {
            watch: true,
            debounce: Duration::from_millis(50),
            drain_timeout: Some(Duration::from_secs(60)),
            drain_window: Duration::from_secs(10),
        }
    }
}

/// A parsed config file together with where it came from.
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub source: String,
    pub raw: RawConfig,
}

impl ConfigFile {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        Self::parse(path, source)
    }

    /// Parse `source` as if it were the file `path` (tests feed strings).
    pub fn parse(path: &Path, source: String) -> Result<ConfigFile, ConfigError> {
        match toml::from_str::<RawConfig>(&source) {
            Ok(raw) => {
                let file = ConfigFile {
                    path: path.to_owned(),
                    source,
                    raw,
                };
                file.check()?;
                Ok(file)
            }
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                Err(file_error(path, &source, span, e.message().to_string()))
            }
        }
    }

    /// Checks that need more than one value at a time.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(listen) = &self.raw.listen
            && listen.get_ref().parse::<std::net::SocketAddr>().is_err()
        {
            return Err(self.error_at(
                listen.span(),
                format!("`{}` is not a socket address; write it as \"127.0.0.1:9998\" or \"[::1]:9998\"", listen.get_ref()),
            ));
        }
        let mut seen: std::collections::HashMap<&str, std::ops::Range<usize>> = Default::default();
        for route in &self.raw.routes {
            if let Some(v) = &route.limits.max_buffered_bytes {
                return Err(self.error_at(
                    v.span(),
                    "max_buffered_bytes is a budget shared by the whole server: it is only allowed in [limits], not in [route.limits]".into(),
                ));
            }
            for p in std::iter::once(&route.path).chain(route.aliases.iter()) {
                if let Some(prev) = seen.insert(p.get_ref().0.as_str(), p.span()) {
                    let prev_line = line_col(&self.source, prev.start).0;
                    return Err(self.error_at(
                        p.span(),
                        format!("path {} is already used by a route on line {prev_line}; each path may appear once", p.get_ref().0),
                    ));
                }
            }
        }
        Ok(())
    }

    /// An error pointing at `span` in this file.
    pub fn error_at(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        file_error(&self.path, &self.source, span, message)
    }

    /// The directory relative paths in the file are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_owned).unwrap_or_default()
    }
}

/// Builds a [`ConfigError::Invalid`] naming file, line and the key on that line.
fn file_error(
    path: &Path,
    source: &str,
    span: std::ops::Range<usize>,
    message: String,
) -> ConfigError {
    let (line, column) = line_col(source, span.start);
    let text = source.lines().nth(line.saturating_sub(1)).unwrap_or("");
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        column,
        key: key_on_line(text),
        message,
    }
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The key a TOML line assigns (`key = value`) or the table it opens.
fn key_on_line(line: &str) -> String {
    let line = line.trim();
    if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    }
    match line.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Self-validating value types. Validation happens inside Deserialize so the
// toml crate attaches the value's span to the error.

/// A size in bytes: an integer, or a string such as `"64KiB"`, `"1MiB"`, `"2MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"64KiB\" or \"1MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                if v <= 0 {
                    return Err(E::custom("a size must be greater than 0"));
                }
                Ok(ByteSize(v as usize))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"64KiB"`, `"1 MiB"`, `"512"`, `"2MB"` into bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| {
        format!("`{s}` is not a size; write a number of bytes or e.g. \"64KiB\", \"1MiB\"")
    })?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err("a size must be greater than 0".into()),
        Some(v) => Ok(v),
        None => Err(format!("`{s}` is too large")),
    }
}

/// A duration written as a string: `"10s"`, `"250ms"`, `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. \"10s\", \"250ms\", \"5m\""
            ))
        })
    }
}

/// A duration that must not be zero (a period or a deadline where zero
/// makes no sense): `"30s"`, `"200ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Dur(v) = Dur::deserialize(d)?;
        if v.is_zero() {
            return Err(de::Error::custom(
                "a zero duration is not allowed here; write e.g. \"30s\" or \"200ms\"",
            ));
        }
        Ok(Interval(v))
    }
}

/// `drain_timeout`: a duration or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainTimeout(pub Option<Duration>);

impl<'de> Deserialize<'de> for DrainTimeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "never" {
            return Ok(DrainTimeout(None));
        }
        humantime::parse_duration(&s)
            .map(|d| DrainTimeout(Some(d)))
            .map_err(|e| de::Error::custom(format!("`{s}` is not a duration or \"never\" ({e})")))
    }
}

/// A positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if v <= 0 {
            return Err(de::Error::custom(format!(
                "{v} is not allowed here; write a number greater than 0"
            )));
        }
        Ok(Count(v as usize))
    }
}

/// Send queue length: 1..=1_000_000 messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLen(pub usize);

impl<'de> Deserialize<'de> for QueueLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if !(1..=1_000_000).contains(&v) {
            return Err(de::Error::custom(format!(
                "send_queue {v} is out of range; use 1 to 1000000 messages"
            )));
        }
        Ok(QueueLen(v as usize))
    }
}

/// A route path: starts with `/`, no query, fragment or whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutePath(pub String);

impl<'de> Deserialize<'de> for RoutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(de::Error::custom(format!(
                "route path `{s}` must start with `/`"
            )));
        }
        if s.contains(['?', '#']) || s.contains(char::is_whitespace) {
            return Err(de::Error::custom(format!(
                "route path `{s}` must not contain a query, a fragment or whitespace"
            )));
        }
        Ok(RoutePath(s))
    }
}

/// One allowed Origin: `null`, or `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRule {
    /// The literal `null` origin (file:// pages, sandboxed frames).
    Null,
    /// A tuple origin; the port is filled in from the scheme when omitted.
    Tuple {
        scheme: String,
        host: String,
        port: u16,
    },
}

impl OriginRule {
    /// Parses an origin as browsers send it (also used for request headers).
    pub fn parse(s: &str) -> Result<OriginRule, String> {
        if s == "null" {
            return Ok(OriginRule::Null);
        }
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("origin `{s}` must be `null` or `scheme://host[:port]`"))?;
        let scheme = scheme.to_ascii_lowercase();
        if rest.is_empty() || rest.contains(['/', '?', '#']) {
            return Err(format!(
                "origin `{s}` must be `scheme://host[:port]` with no path"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("origin `{s}` has a bad port"))?,
            ),
            _ => {
                let port = match scheme.as_str() {
                    "http" | "ws" => 80,
                    "https" | "wss" => 443,
                    _ => {
                        return Err(format!(
                            "origin `{s}` needs an explicit port for scheme `{scheme}`"
                        ));
                    }
                };
                (rest, port)
            }
        };
        Ok(OriginRule::Tuple {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for OriginRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        OriginRule::parse(&s).map_err(de::Error::custom)
    }
}

impl fmt::Display for OriginRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginRule::Null => f.write_str("null"),
            OriginRule::Tuple { scheme, host, port } => write!(f, "{scheme}://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("test.toml"), s.to_string())
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        let c =
            parse("[limits]\nmax_message_size = \"2MiB\"\nhandshake_timeout = \"3s\"\n").unwrap();
        assert_eq!(c.raw.limits.max_message_size, Some(ByteSize(2 << 20)));
        assert_eq!(
            c.raw.limits.handshake_timeout,
            Some(Dur(Duration::from_secs(3)))
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("listen = \"127.0.0.1:1\"\n\n[limits]\nmax_mesage_size = 5\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("test.toml:4"), "{text}");
        assert!(text.contains("max_mesage_size"), "{text}");
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let err = parse("[reload]\nwatch = true\ndrain_timeout = \"soon\"\n").unwrap_err();
        let ConfigError::Invalid { line, key, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!((*line, key.as_str()), (3, "drain_timeout"), "{err}");
    }

    #[test]
    fn route_paths_validated_and_unique() {
        let err = parse("[[route]]\npath = \"echo\"\nhandler = \"echo\"\n").unwrap_err();
        assert!(err.to_string().contains("must start with `/`"), "{err}");
        let err = parse(
            "[[route]]\npath = \"/a\"\nhandler = \"echo\"\n[[route]]\npath = \"/b\"\nhandler = \"echo\"\naliases = [\"/a\"]\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { line, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*line, 7, "{err}");
    }

    #[test]
    fn origins() {
        assert_eq!(OriginRule::parse("null"), Ok(OriginRule::Null));
        assert_eq!(
            OriginRule::parse("HTTPS://Example.com"),
            OriginRule::parse("https://example.com:443")
        );
        assert_ne!(
            OriginRule::parse("http://example.com"),
            OriginRule::parse("https://example.com")
        );
        assert!(OriginRule::parse("example.com").is_err());
        assert!(OriginRule::parse("http://example.com/path").is_err());
        assert_eq!(
            OriginRule::parse("http://[::1]:8080").unwrap().to_string(),
            "http://[::1]:8080"
        );
    }

    #[test]
    fn limits_overlay() {
        let c =
            parse("[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.limits]\nsend_queue = 7\n")
                .unwrap();
        let l = Limits::default().overlay(&c.raw.routes[0].limits);
        assert_eq!(l.send_queue, 7);
        assert_eq!(l.max_message_size, Limits::default().max_message_size);
    }

    #[test]
    fn session_limits_parse_and_are_checked() {
        let c = parse(
            "[limits]\nmax_buffered_bytes = \"8MiB\"\nping_interval = \"200ms\"\nidle_timeout = \"1s\"\nmessage_timeout = \"2s\"\n",
        )
        .unwrap();
        let l = Limits::default().overlay(&c.raw.limits);
        assert_eq!(l.max_buffered_bytes, 8 << 20);
        assert_eq!(l.ping_interval, Duration::from_millis(200));
        assert_eq!(l.idle_timeout, Duration::from_secs(1));
        assert_eq!(l.message_timeout, Duration::from_secs(2));
        let err = parse("[limits]\nping_interval = \"0s\"\n").unwrap_err();
        assert!(err.to_string().contains("zero duration"), "{err}");
        let err = parse(
            "[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.limits]\nmax_buffered_bytes = \"1MiB\"\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { line, key, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!((*line, key.as_str()), (5, "max_buffered_bytes"), "{err}");
    }
}
