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
use crate::server::per_ip::Cidr;

/// Default listen address: loopback, so a fresh install is not reachable from
/// the network until the operator says so (`-H 0.0.0.0`).
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default port, the one pywebsocket's examples use.
pub const DEFAULT_PORT: u16 = 9998;

/// The most `max_connections` may be. Each connection is a file descriptor,
/// and Linux's `fs.nr_open` defaults to 1,048,576; a larger value can never
/// be reached, and one near `usize::MAX` would overflow the slot semaphore.
pub const MAX_CONNECTIONS_CAP: usize = 1 << 20;

/// The most `read_buffer_size` may be. The key is deprecated (connections
/// no longer own a read buffer; it only sets how finely unfinished bytes
/// are reported to the budget), but configs that set it keep being checked
/// as before, so one valid on an older wshd stays valid and a typo
/// (`"1GiB"`) is still caught. It may also never exceed `max_frame_size`.
pub const READ_BUFFER_CAP: usize = 1 << 20;

/// The most worker threads: `--workers` takes at most this too.
pub const MAX_WORKERS: usize = 1024;

/// `[limits]` keys that only make sense for the whole server; in a
/// `[route.limits]` they are refused rather than silently ignored.
pub const SERVER_ONLY_LIMITS: &[&str] = &[
    "max_connections",
    "handshake_timeout",
    "max_buffered_bytes",
    "max_connections_per_ip",
    "handshake_rate_per_ip",
    "handshake_burst_per_ip",
    "per_ip_exempt",
    "reject_slots",
];

/// The whole file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on, `host:port` (`-H`/`-p` override it), or a list
    /// of listeners, each `{ addr = "host:port", tls = true|false }`.
    pub listen: Option<Spanned<Listen>>,
    /// Directory scanned for `*_wsh.so` handlers, relative to the config file.
    pub handler_dir: Option<PathBuf>,
    /// Static files served on the same port (pywebsocket's `-d`).
    pub document_root: Option<PathBuf>,
    /// Accept handler files whose real path leaves `handler_dir`.
    #[serde(default)]
    pub allow_handlers_outside_root_dir: bool,
    /// `error`, `warn`, `info`, `debug`, `trace`, `off`, or a list of
    /// `target=level` directives; checked by [`check_log_level`].
    pub log_level: Option<Spanned<String>>,
    /// Log to this file instead of stderr (reopened on SIGUSR1).
    pub log_file: Option<PathBuf>,
    /// Write the server's pid here.
    pub pid_file: Option<PathBuf>,
    /// Parent of the loader's private fallback directory, used only where
    /// handler code cannot be loaded from sealed memfds.
    pub state_dir: Option<PathBuf>,
    /// Worker threads that serve connections (default: one per core).
    pub workers: Option<Spanned<Count>>,
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
    /// Load handler files that fail the ownership/permission check (with a
    /// warning at every load) instead of refusing them.
    #[serde(default)]
    pub allow_insecure_handler_dir: bool,
    /// Publish/subscribe caps (ABI 1.2 topics).
    #[serde(default)]
    pub topics: RawTopics,
    /// Handler timer caps (ABI 1.2 `set_timer`).
    #[serde(default)]
    pub timers: RawTimers,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); off unless
    /// `listen` is set.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[tls]`: certificate, key and client certificates (tls.rs).
    pub tls: Option<RawTls>,
    /// Canary rollout, rollback and quarantine for every route
    /// (`[route.rollout]` overrides it per route).
    #[serde(default)]
    pub rollout: RawRollout,
    /// Where a running server writes its live route table (versions,
    /// shares, states) for `wshd --list`. Default: not written.
    pub status_file: Option<PathBuf>,
    /// Topics across nodes through Redis (docs/cluster.md); absent: this
    /// node alone, no Redis needed.
    pub cluster: Option<crate::cluster::RawCluster>,
}

/// `[topics]`: caps on the host-owned subscriptions.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTopics {
    /// Topics one connection may be subscribed to at once. Bounded: the
    /// connection's list is scanned on every subscribe.
    pub max_per_connection: Option<Bounded<10_000>>,
    /// Topics with at least one subscriber, server-wide.
    pub max_topics: Option<Bounded<10_000_000>>,
    /// Of those, topics one client address may have created (IPv6 grouped
    /// by /64; `[limits] per_ip_exempt` addresses are not counted).
    pub max_topics_per_ip: Option<Bounded<10_000_000>>,
}

/// `[timers]`: caps on pending handler timers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimers {
    /// Pending timers per connection (a list scanned on cancel).
    pub max_per_connection: Option<Bounded<10_000>>,
    /// Pending timers a handler instance set for itself (conn 0).
    pub max_per_instance: Option<Bounded<100_000>>,
}

/// A count from 1 to `MAX`: a cap that must stay finite and cheap to
/// enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<const MAX: usize>(pub usize);

impl<'de, const MAX: usize> Deserialize<'de> for Bounded<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if v < 1 || v as u64 > MAX as u64 {
            return Err(de::Error::custom(format!(
                "{v} is out of range; use 1 to {MAX}"
            )));
        }
        Ok(Bounded(v as usize))
    }
}

/// Resolved `[topics]` and `[timers]` caps, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubSubLimits {
    pub topics_per_connection: usize,
    pub max_topics: usize,
    pub topics_per_ip: usize,
    pub timers_per_connection: usize,
    pub timers_per_instance: usize,
}

impl Default for PubSubLimits {
    fn default() -> PubSubLimits {
        PubSubLimits {
            topics_per_connection: crate::topics::DEFAULT_MAX_PER_CONNECTION,
            max_topics: crate::topics::DEFAULT_MAX_TOPICS,
            topics_per_ip: crate::topics::DEFAULT_MAX_TOPICS_PER_IP,
            timers_per_connection: crate::timers::DEFAULT_MAX_PER_CONNECTION,
            timers_per_instance: crate::timers::DEFAULT_MAX_PER_INSTANCE,
        }
    }
}

impl PubSubLimits {
    /// The caps the file sets, defaults for the rest.
    pub fn from_raw(raw: Option<&RawConfig>) -> PubSubLimits {
        let d = PubSubLimits::default();
        let Some(r) = raw else { return d };
        PubSubLimits {
            topics_per_connection: r
                .topics
                .max_per_connection
                .map_or(d.topics_per_connection, |c| c.0),
            max_topics: r.topics.max_topics.map_or(d.max_topics, |c| c.0),
            topics_per_ip: r.topics.max_topics_per_ip.map_or(d.topics_per_ip, |c| c.0),
            timers_per_connection: r
                .timers
                .max_per_connection
                .map_or(d.timers_per_connection, |c| c.0),
            timers_per_instance: r
                .timers
                .max_per_instance
                .map_or(d.timers_per_instance, |c| c.0),
        }
    }

    /// Applies the caps to the server's topics and timers.
    pub fn apply(&self) {
        crate::topics::global().configure(
            self.topics_per_connection,
            self.max_topics,
            self.topics_per_ip,
        );
        crate::timers::global().configure(self.timers_per_connection, self.timers_per_instance);
    }
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port` of the admin listener (`--admin` overrides it).
    pub listen: Option<Spanned<String>>,
}

/// `listen`: one address (a plain listener, or TLS when `[tls]` is set), or
/// a list of listeners with their own `tls` switch.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    One(String),
    Many(Vec<RawListener>),
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand rather than `untagged`: serde's untagged error ("data did
        // not match any variant") would not say what to write.
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an address such as \"127.0.0.1:9998\", or a list of listeners such as \
                     [{ addr = \"127.0.0.1:9998\" }, { addr = \"0.0.0.0:9443\", tls = true }]",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(Listen::One(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut all = Vec::new();
                while let Some(l) = seq.next_element::<RawListener>()? {
                    all.push(l);
                }
                if all.is_empty() {
                    return Err(de::Error::custom(
                        "the listen list is empty; name at least one listener",
                    ));
                }
                Ok(Listen::Many(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of a `listen` list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// `host:port`.
    pub addr: String,
    /// Speak TLS on this listener (needs `[tls] cert` and `key`).
    #[serde(default)]
    pub tls: bool,
}

/// `[tls]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, leaf first (relative to the config file).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// `"required"` (the default with `client_ca`) or `"optional"`.
    pub client_auth: Option<String>,
}

/// `[limits]` and `[route.limits]`: every field optional so a route can
/// override only what it names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_message_size: Option<ByteSize>,
    pub max_frame_size: Option<ByteSize>,
    /// At most the effective `max_frame_size` and [`READ_BUFFER_CAP`].
    pub read_buffer_size: Option<Spanned<ByteSize>>,
    pub send_queue: Option<QueueLen>,
    pub slow_consumer: Option<SlowConsumer>,
    /// Server-wide only: a route may not set it (see [`SERVER_ONLY_LIMITS`]).
    pub handshake_timeout: Option<Spanned<Dur>>,
    /// Server-wide only, at most [`MAX_CONNECTIONS_CAP`].
    pub max_connections: Option<Spanned<Count>>,
    pub close_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    pub send_queue_bytes: Option<QueueBytes>,
    pub max_connections_per_ip: Option<Count>,
    pub handshake_rate_per_ip: Option<Rate>,
    pub handshake_burst_per_ip: Option<Count>,
    pub per_ip_exempt: Option<Vec<Cidr>>,
    pub reject_slots: Option<Count>,
    /// Server-wide: only allowed in `[limits]` (checked in `ConfigFile::check`).
    pub max_buffered_bytes: Option<Spanned<ByteSize>>,
    pub message_timeout: Option<Dur>,
    pub ping_interval: Option<Dur>,
    pub idle_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub watch: Option<bool>,
    pub debounce: Option<DurOrZero>,
    pub drain_timeout: Option<DrainTimeout>,
    pub drain_window: Option<DurOrZero>,
    /// Cap on one connection's exported handover state (ABI 1.2).
    pub handover_max_bytes: Option<ByteSize>,
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
    /// Overrides `[rollout]` for this route.
    #[serde(default)]
    pub rollout: RawRollout,
    /// The only handler bytes this route may load: lowercase hex SHA-256
    /// of the file (`wshd --list` prints it).
    pub sha256: Option<Spanned<Sha256Pin>>,
    /// permessage-deflate on this route: `"off"` (the default) or `"on"`.
    pub compression: Option<Compression>,
    /// JWT auth for this route's handshakes (auth.rs).
    pub auth: Option<crate::auth::RawAuth>,
}

/// A route's `compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Never negotiate permessage-deflate.
    #[default]
    Off,
    /// Accept a client's permessage-deflate offer (RFC 7692), always with
    /// no context takeover (deflate.rs).
    On,
}

/// `[rollout]` and `[route.rollout]`: every field optional so a route can
/// override only what it names. Resolved into
/// [`crate::rollout::Policy`].
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// Share of new connections a new version gets during its canary
    /// period, 0..=100. 100 switches at once; 0 rolls a running canary
    /// back and refuses new versions.
    pub canary_percent: Option<Percent>,
    pub canary_period: Option<Dur>,
    /// Rollback when the canary's handler panics more than this often.
    pub max_panics: Option<u32>,
    /// Rollback when the canary's callbacks fail (connection closed with
    /// 1011) more than this often.
    pub max_1011_closes: Option<u32>,
    /// Rollback when the canary fails or refuses more than this many
    /// handshakes with a 5xx status.
    pub max_5xx_handshakes: Option<u32>,
    /// Quarantine a version whose callbacks fail (panic or 1011) more than
    /// this many times within `quarantine_window`.
    pub quarantine_faults: Option<Count>,
    pub quarantine_window: Option<Dur>,
}

/// A percentage, 0..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u8);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if !(0..=100).contains(&v) {
            return Err(de::Error::custom(format!(
                "{v} is not a percentage; write a whole number from 0 to 100"
            )));
        }
        Ok(Percent(v as u8))
    }
}

/// A pinned SHA-256: 64 hex digits, stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Pin(pub String);

impl<'de> Deserialize<'de> for Sha256Pin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(de::Error::custom(format!(
                "`{s}` is not a SHA-256; write the 64 hex digits that `wshd --list` or \
                 `sha256sum FILE` prints"
            )));
        }
        Ok(Sha256Pin(s.to_ascii_lowercase()))
    }
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
    /// Open connections (sockets) at most; past it a new socket is answered
    /// 503 with `Retry-After` (server/listener.rs), not left in the backlog.
    pub max_connections: usize,
    /// How long to wait for the peer's reply to our close frame.
    pub close_timeout: Duration,
    /// How long one write may wait for a peer that does not read; then the
    /// connection is dropped, so a stalled reader cannot pin a session.
    /// Pending pong and close replies count: output tungstenite could not
    /// write for this long drops the connection too.
    pub write_timeout: Duration,
    /// Payload bytes that may wait in one connection's send queue (and, as a
    /// separate bound, in what one callback sends to its own connection).
    /// Past it, `slow_consumer` applies. An empty queue always takes one
    /// message, so a single larger message is not refused for its size.
    pub send_queue_bytes: usize,
    /// Open sockets per client address (IPv6: per /64); the excess gets 503.
    pub max_connections_per_ip: usize,
    /// Handshakes per second per client address, refilling a bucket of
    /// `handshake_burst_per_ip`; the excess gets 429.
    pub handshake_rate_per_ip: f64,
    pub handshake_burst_per_ip: usize,
    /// Addresses the per-IP caps do not apply to (a local reverse proxy).
    pub per_ip_exempt: Vec<Cidr>,
    /// Sockets that may be open at once only to be answered 429/503; beyond
    /// that, an excess socket is closed without an answer.
    pub reject_slots: usize,
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
    /// permessage-deflate: set per route (`[[route]] compression`).
    pub compression: Compression,
    /// `[route.auth]`: handshakes need a valid JWT (auth.rs). Route only.
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
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
            send_queue_bytes: 8 << 20,
            max_connections_per_ip: 256,
            handshake_rate_per_ip: 20.0,
            handshake_burst_per_ip: 40,
            per_ip_exempt: crate::server::per_ip::default_exempt(),
            reject_slots: 64,
            max_buffered_bytes: 64 << 20,
            message_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            compression: Compression::Off,
            auth: None,
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
        if let Some(v) = &raw.read_buffer_size {
            l.read_buffer_size = v.get_ref().0;
        }
        if let Some(v) = raw.send_queue {
            l.send_queue = v.0;
        }
        if let Some(v) = raw.slow_consumer {
            l.slow_consumer = v;
        }
        if let Some(v) = &raw.handshake_timeout {
            l.handshake_timeout = v.get_ref().0;
        }
        if let Some(v) = &raw.max_connections {
            l.max_connections = v.get_ref().0;
        }
        if let Some(v) = raw.close_timeout {
            l.close_timeout = v.0;
        }
        if let Some(v) = raw.write_timeout {
            l.write_timeout = v.0;
        }
        if let Some(v) = raw.send_queue_bytes {
            l.send_queue_bytes = v.0;
        }
        if let Some(v) = raw.max_connections_per_ip {
            l.max_connections_per_ip = v.0;
        }
        if let Some(v) = raw.handshake_rate_per_ip {
            l.handshake_rate_per_ip = v.0;
        }
        if let Some(v) = raw.handshake_burst_per_ip {
            l.handshake_burst_per_ip = v.0;
        }
        if let Some(v) = &raw.per_ip_exempt {
            l.per_ip_exempt = v.clone();
        }
        if let Some(v) = raw.reject_slots {
            l.reject_slots = v.0;
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
    /// Connection handover: the most bytes one connection's `on_export`
    /// may write; a bigger export is refused and the connection drains.
    pub handover_max_bytes: usize,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        ReloadSettings {
            watch: true,
            debounce: Duration::from_millis(50),
            drain_timeout: Some(Duration::from_secs(60)),
            drain_window: Duration::from_secs(10),
            handover_max_bytes: 1 << 20,
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
                let message = with_suggestion(e.message());
                Err(file_error(path, &source, span, message))
            }
        }
    }

    /// Checks that need more than one value at a time.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(listen) = &self.raw.listen {
            let addrs: Vec<&str> = match listen.get_ref() {
                Listen::One(a) => vec![a],
                Listen::Many(l) => l.iter().map(|l| l.addr.as_str()).collect(),
            };
            for a in addrs {
                if a.parse::<std::net::SocketAddr>().is_err() {
                    return Err(self.error_at(
                        listen.span(),
                        format!("`{a}` is not a socket address; write it as \"127.0.0.1:9998\" or \"[::1]:9998\""),
                    ));
                }
            }
        }
        if let Some(listen) = &self.raw.admin.listen
            && listen.get_ref().parse::<std::net::SocketAddr>().is_err()
        {
            return Err(self.error_at(
                listen.span(),
                format!("`{}` is not a socket address; write it as \"127.0.0.1:9999\" or \"[::1]:9999\"", listen.get_ref()),
            ));
        }
        if let Some(level) = &self.raw.log_level
            && let Err(e) = check_log_level(level.get_ref())
        {
            return Err(self.error_at(level.span(), e));
        }
        if let Some(mc) = &self.raw.limits.max_connections
            && mc.get_ref().0 > MAX_CONNECTIONS_CAP
        {
            return Err(self.error_at(
                mc.span(),
                format!(
                    "max_connections {} is more than this server can ever hold; use at most {MAX_CONNECTIONS_CAP} \
                     (and raise LimitNOFILE to match)",
                    mc.get_ref().0
                ),
            ));
        }
        if let Some(w) = &self.raw.workers
            && w.get_ref().0 > MAX_WORKERS
        {
            return Err(self.error_at(
                w.span(),
                format!("workers {} is too many; use at most {MAX_WORKERS} (one per core is the default)", w.get_ref().0),
            ));
        }
        let server_limits = Limits::default().overlay(&self.raw.limits);
        self.check_read_buffer(&[&self.raw.limits], &server_limits)?;
        for route in &self.raw.routes {
            let l = &route.limits;
            // Spanned keys point at their own line; the rest at the route.
            let server_only = [
                l.max_connections.as_ref().map(|v| v.span()),
                l.handshake_timeout.as_ref().map(|v| v.span()),
                l.max_buffered_bytes.as_ref().map(|v| v.span()),
                l.max_connections_per_ip
                    .is_some()
                    .then(|| route.path.span()),
                l.handshake_rate_per_ip.is_some().then(|| route.path.span()),
                l.handshake_burst_per_ip
                    .is_some()
                    .then(|| route.path.span()),
                l.per_ip_exempt.is_some().then(|| route.path.span()),
                l.reject_slots.is_some().then(|| route.path.span()),
            ];
            for (key, span) in SERVER_ONLY_LIMITS.iter().zip(server_only) {
                if let Some(span) = span {
                    return Err(self.error_at(
                        span,
                        format!(
                            "`{key}` in the [route.limits] of route {} is only allowed in [limits]: it applies to \
                             the whole server (checked when a socket is accepted, before any route is known); move it there",
                            route.path.get_ref().0
                        ),
                    ));
                }
            }
            self.check_read_buffer(&[l, &self.raw.limits], &server_limits.overlay(l))?;
        }
        if let Some(n) = self.raw.limits.reject_slots
            && n.0 > 65_536
        {
            return Err(ConfigError::Other(format!(
                "{}: limits.reject_slots = {} is too large; use at most 65536",
                self.path.display(),
                n.0
            )));
        }
        let mut seen: std::collections::HashMap<&str, std::ops::Range<usize>> = Default::default();
        for route in &self.raw.routes {
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

    /// The effective `read_buffer_size` of a table must fit in
    /// [`READ_BUFFER_CAP`] and in that table's effective `max_frame_size`.
    /// The error points at whichever `read_buffer_size` line set the value
    /// (the route's, or the inherited one from `[limits]`); the 2 KiB default
    /// needs no line, and with a smaller frame limit it costs nothing extra.
    fn check_read_buffer(
        &self,
        raws: &[&RawLimits],
        effective: &Limits,
    ) -> Result<(), ConfigError> {
        let Some(rb) = raws.iter().find_map(|r| r.read_buffer_size.as_ref()) else {
            return Ok(());
        };
        let size = effective.read_buffer_size;
        if size > READ_BUFFER_CAP.min(effective.max_frame_size) {
            return Err(self.error_at(
                rb.span(),
                format!(
                    "read_buffer_size {size} is too large: it may be at most max_frame_size ({}) and at most \
                     {READ_BUFFER_CAP}; the key is deprecated (connections no longer own a read buffer), remove it",
                    effective.max_frame_size
                ),
            ));
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
// The schema's keys, read from the schema itself, and typo help.

/// One key the file may set, as the schema (the `Raw*` structs) defines it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SchemaKey {
    /// The table it belongs to, dotted: `""` for the top level, `limits`,
    /// `route` (each `[[route]]`), `route.limits`, `listen` (each entry of
    /// a `listen` list), `cluster`, ...
    pub table: String,
    pub key: String,
    /// The key is a table or list of tables with keys of its own (listed
    /// under `table.key`); `false` for a value, `[route.config]` included
    /// (its keys are the handler's).
    pub has_keys: bool,
}

/// The key no table has; probing with it makes serde list a table's keys.
const PROBE_KEY: &str = "wshd_schema_probe_key";

/// How a probed key holds its table.
#[derive(Clone, Copy)]
enum Shape {
    /// `[table]` or `key = { ... }`.
    Table,
    /// `[[table]]` or `key = [{ ... }]`.
    List,
}

/// Every key of the config file, derived from the schema: each table is
/// parsed with a key it cannot have, and serde's `deny_unknown_fields`
/// error lists the keys it can (no list is kept by hand, so none can
/// drift). Sorted by table, then key.
pub fn schema_keys() -> Vec<SchemaKey> {
    let mut out = Vec::new();
    walk_schema(&mut Vec::new(), &mut out);
    out.sort();
    out
}

fn walk_schema(path: &mut Vec<(String, Shape)>, out: &mut Vec<SchemaKey>) {
    let Some(keys) = probe_table(path) else {
        return;
    };
    let table = path
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(".");
    for key in keys {
        let mut has_keys = false;
        for shape in [Shape::Table, Shape::List] {
            path.push((key.clone(), shape));
            if probe_table(path).is_some() {
                has_keys = true;
                walk_schema(path, out);
            }
            path.pop();
            if has_keys {
                break;
            }
        }
        out.push(SchemaKey {
            table: table.clone(),
            key,
            has_keys,
        });
    }
}

/// The keys serde expects in the table at `path`, or `None` when `path`
/// does not lead to a table with `deny_unknown_fields`.
fn probe_table(path: &[(String, Shape)]) -> Option<Vec<String>> {
    let mut value = toml::Value::Table(toml::Table::from_iter([(
        PROBE_KEY.to_string(),
        toml::Value::Integer(0),
    )]));
    for (key, shape) in path.iter().rev() {
        if let Shape::List = shape {
            value = toml::Value::Array(vec![value]);
        }
        value = toml::Value::Table(toml::Table::from_iter([(key.clone(), value)]));
    }
    let text = toml::to_string(&value).ok()?;
    let err = toml::from_str::<RawConfig>(&text).err()?;
    // "unknown field" only: an enum read from a table answers "unknown
    // variant", and its variants are values, not keys.
    let message = err.message();
    let (unknown, expected) = unknown_name(message)?;
    (message.starts_with("unknown field") && unknown == PROBE_KEY).then_some(expected)
}

/// Reads serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown
/// variant") into the unknown name and the expected ones.
fn unknown_name(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (unknown, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((unknown.to_owned(), expected))
}

/// How a table is written in the file, for messages.
fn table_name(table: &str) -> String {
    match table {
        "" => "the top level".into(),
        "route" => "[[route]]".into(),
        "listen" => "a `listen` list entry".into(),
        t => format!("[{t}]"),
    }
}

/// Whether `typo` is close enough to `key` to suggest it: a few edits
/// (a transposition is one), fewer for short names.
fn is_close(typo: &str, key: &str) -> Option<usize> {
    let typo = typo.to_ascii_lowercase().replace('-', "_");
    let d = strsim::damerau_levenshtein(&typo, key);
    (d <= (key.len() / 3).max(1)).then_some(d)
}

/// serde's message for an unknown key or value, with a cargo-like hint:
/// the closest key of the same table ("did you mean `max_message_size`?"),
/// or the table a key belongs to when it was written in another one.
fn with_suggestion(message: &str) -> String {
    let Some((unknown, expected)) = unknown_name(message) else {
        return message.to_owned();
    };
    let closest = |names: &mut dyn Iterator<Item = (usize, String)>| names.min_by_key(|(d, _)| *d);
    // The same table first: serde listed its keys (or a value's variants).
    let near = closest(
        &mut expected
            .iter()
            .filter_map(|k| is_close(&unknown, k).map(|d| (d, format!("`{k}`")))),
    );
    if let Some((_, k)) = near {
        return format!("{message}; did you mean {k}?");
    }
    if !message.starts_with("unknown field") {
        return message.to_owned();
    }
    // Another table's key, written in the wrong place.
    let same_table = |t: &str, all: &[SchemaKey]| {
        let mut keys: Vec<&str> = all
            .iter()
            .filter(|k| k.table == t)
            .map(|k| k.key.as_str())
            .collect();
        keys.sort_unstable();
        let mut exp: Vec<&str> = expected.iter().map(String::as_str).collect();
        exp.sort_unstable();
        keys == exp
    };
    let all = schema_keys();
    let elsewhere = closest(
        &mut all
            .iter()
            .filter(|k| !same_table(&k.table, &all))
            .filter_map(|k| {
                is_close(&unknown, &k.key)
                    .map(|d| (d, format!("`{}` in {}", k.key, table_name(&k.table))))
            }),
    );
    match elsewhere {
        Some((0, _)) => {
            let place = all
                .iter()
                .filter(|k| k.key == unknown && !same_table(&k.table, &all))
                .map(|k| table_name(&k.table))
                .collect::<Vec<_>>()
                .join(" or ");
            format!("{message}; `{unknown}` is a key of {place}, not of this table: move it there")
        }
        Some((_, k)) => format!("{message}; did you mean {k}?"),
        None => message.to_owned(),
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
        let DurOrZero(v) = DurOrZero::deserialize(d)?;
        if v.is_zero() {
            // A zero timeout or interval would fire at once, every time: it
            // is always a mistake for the keys that use `Dur`.
            return Err(de::Error::custom(
                "a zero duration is not allowed here; write a positive duration such as \"10s\"",
            ));
        }
        Ok(Dur(v))
    }
}

/// A duration where zero is meaningful (`debounce`, `drain_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurOrZero(pub Duration);

impl<'de> Deserialize<'de> for DurOrZero {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(DurOrZero).map_err(|e| {
            de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. \"10s\", \"250ms\", \"5m\""
            ))
        })
    }
}

/// Checks a log level as `--log-level` and `log_level` take it: `off`,
/// `error`, `warn`, `info`, `debug`, `trace`, or comma-separated
/// `target=level` directives. A bare word that is not a level is refused:
/// tracing would read `"loud"` as "everything from target `loud`", and the
/// server would then log nothing at all, errors included.
pub fn check_log_level(spec: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    if spec.trim().is_empty() {
        return Err("the log level is empty; use error, warn, info, debug or trace".into());
    }
    for directive in spec.split(',') {
        let directive = directive.trim();
        let ok = match directive.split_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(format!(
                "`{directive}` is not a log level; use off, error, warn, info, debug or trace, \
                 or target=level directives such as \"info,handler=debug\""
            ));
        }
    }
    Ok(())
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

/// A rate per second: a positive number, `20` or `0.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(de::Error::custom(format!(
                "{v} is not a rate; write a number per second greater than 0, e.g. 20 or 0.5"
            )));
        }
        Ok(Rate(v))
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

/// `send_queue_bytes`: a [`ByteSize`] from 1 KiB to 1 GiB. Below 1 KiB
/// nearly every message would trip the slow-consumer policy; above 1 GiB a
/// single slow reader could hold that much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBytes(pub usize);

impl QueueBytes {
    pub const MIN: usize = 1 << 10;
    pub const MAX: usize = 1 << 30;
}

impl<'de> Deserialize<'de> for QueueBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ByteSize(v) = ByteSize::deserialize(d)?;
        if !(QueueBytes::MIN..=QueueBytes::MAX).contains(&v) {
            return Err(de::Error::custom(format!(
                "send_queue_bytes {v} is out of range; use 1KiB to 1GiB (e.g. \"8MiB\")"
            )));
        }
        Ok(QueueBytes(v))
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
            c.raw.limits.handshake_timeout.map(|d| d.into_inner()),
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

    /// Issue #23: a mistyped key gets cargo's kind of hint, in an error
    /// that still names the file, the line and the key.
    #[test]
    fn an_unknown_key_suggests_the_closest_one() {
        let err = parse("listen = \"127.0.0.1:1\"\n\n[limits]\nmax_mesage_size = 5\n").unwrap_err();
        let ConfigError::Invalid {
            path,
            line,
            key,
            message,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(
            (path.to_str(), *line, key.as_str()),
            (Some("test.toml"), 4, "max_mesage_size"),
            "{err}"
        );
        assert!(
            message.ends_with("did you mean `max_message_size`?"),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("test.toml:4:1: key `max_mesage_size`: unknown field"),
            "{text}"
        );

        // A transposition, a dash for an underscore, a route table, a
        // nested table, an enum value.
        for (src, line, hint) in [
            ("[reload]\nwacth = true\n", 2, "did you mean `watch`?"),
            (
                "[limits]\nsend-queue-bytes = \"1MiB\"\n",
                2,
                "did you mean `send_queue_bytes`?",
            ),
            (
                "[[route]]\npath = \"/x\"\nhandler = \"echo\"\ncompresion = \"on\"\n",
                4,
                "did you mean `compression`?",
            ),
            (
                "[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.rollout]\ncanary_percnt = 5\n",
                5,
                "did you mean `canary_percent`?",
            ),
            (
                "[[route]]\npath = \"/x\"\nhandler = \"echo\"\ncompression = \"onn\"\n",
                4,
                "did you mean `on`?",
            ),
            (
                "[topics]\nmax_per_conection = 3\n",
                2,
                "did you mean `max_per_connection`?",
            ),
        ] {
            let (l, _, msg) = refused(src);
            assert_eq!(l, line, "{src:?}: {msg}");
            assert!(msg.ends_with(hint), "{src:?}: {msg}");
        }

        // A key of another table: say where it goes.
        let (line, key, msg) = refused("max_connections_per_ip = 3\n");
        assert_eq!((line, key.as_str()), (1, "max_connections_per_ip"));
        assert!(
            msg.contains("`max_connections_per_ip` is a key of [limits]"),
            "{msg}"
        );
        let (_, _, msg) = refused("[limits]\nmax_topic = 3\n");
        assert!(
            msg.ends_with("did you mean `max_topics` in [topics]?"),
            "{msg}"
        );

        // Nothing close: serde's list, no guess.
        let (_, _, msg) = refused("[limits]\nfrobnicate = 1\n");
        assert!(!msg.contains("did you mean"), "{msg}");
        assert!(msg.contains("expected one of `max_message_size`"), "{msg}");
    }

    /// The key list other checks (tests/config_examples.rs, the typo
    /// hints) rely on really comes out of the schema.
    #[test]
    fn schema_keys_come_from_the_structs() {
        let keys = schema_keys();
        let has = |table: &str, key: &str| keys.iter().any(|k| k.table == table && k.key == key);
        for (table, key) in [
            ("", "listen"),
            ("", "status_file"),
            ("limits", "max_message_size"),
            ("limits", "per_ip_exempt"),
            ("route", "compression"),
            ("route.limits", "send_queue_bytes"),
            ("route.rollout", "canary_percent"),
            ("listen", "addr"),
            ("listen", "tls"),
            ("tls", "client_auth"),
            ("cluster", "redis"),
            ("reload", "handover_max_bytes"),
        ] {
            assert!(has(table, key), "{table}.{key} missing from {keys:#?}");
        }
        let table = |t: &str| keys.iter().find(|k| k.table.is_empty() && k.key == t);
        assert!(table("limits").unwrap().has_keys);
        assert!(table("route").unwrap().has_keys);
        assert!(!table("workers").unwrap().has_keys);
        let config = keys
            .iter()
            .find(|k| k.table == "route" && k.key == "config")
            .unwrap();
        assert!(!config.has_keys, "[route.config] is the handler's");
        assert!(keys.len() > 70, "{}", keys.len());
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

    /// The key an error names, or a panic showing the whole error.
    fn refused(src: &str) -> (usize, String, String) {
        match parse(src) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an Invalid error for {src:?}, got {other:?}"),
        }
    }

    #[test]
    fn log_level_must_be_a_level() {
        let (line, key, msg) = refused("listen = \"127.0.0.1:1\"\nlog_level = \"loud\"\n");
        assert_eq!((line, key.as_str()), (2, "log_level"));
        assert!(msg.contains("`loud` is not a log level"), "{msg}");
        assert!(
            refused("log_level = \"info,handler=shouty\"\n")
                .2
                .contains("handler=shouty")
        );
        assert!(refused("log_level = \"\"\n").2.contains("empty"));
        for ok in ["info", "OFF", "warn,handler=debug", " debug , wshd=trace "] {
            parse(&format!("log_level = \"{ok}\"\n")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn absurd_counts_and_sizes_are_refused() {
        let (line, key, msg) = refused("[limits]\nmax_connections = 9223372036854775807\n");
        assert_eq!((line, key.as_str()), (2, "max_connections"));
        assert!(msg.contains("at most 1048576"), "{msg}");
        assert!(parse("[limits]\nmax_connections = 1048576\n").is_ok());
        let (_, key, msg) = refused("workers = 100000\n");
        assert_eq!(key, "workers");
        assert!(msg.contains("at most 1024"), "{msg}");
        let (line, key, msg) = refused("[limits]\nread_buffer_size = \"1GiB\"\n");
        assert_eq!((line, key.as_str()), (2, "read_buffer_size"));
        assert!(msg.contains("at most max_frame_size"), "{msg}");
        // Bounded by the frame size of its own table, the route's included.
        let (line, ..) = refused(
            "[limits]\nread_buffer_size = \"8KiB\"\n[[route]]\npath = \"/x\"\nhandler = \"echo\"\n\
             [route.limits]\nmax_frame_size = \"4KiB\"\n",
        );
        assert_eq!(line, 2);
        assert!(parse("[limits]\nread_buffer_size = \"64KiB\"\n").is_ok());
    }

    #[test]
    fn zero_durations_only_where_zero_means_something() {
        for key in ["handshake_timeout", "close_timeout", "write_timeout"] {
            let (line, k, msg) = refused(&format!("[limits]\n{key} = \"0s\"\n"));
            assert_eq!((line, k.as_str()), (2, key));
            assert!(msg.contains("zero duration"), "{msg}");
        }
        assert!(
            refused("[shutdown]\ntimeout = \"0ms\"\n")
                .2
                .contains("zero")
        );
        parse("[reload]\ndebounce = \"0s\"\ndrain_window = \"0s\"\ndrain_timeout = \"0s\"\n")
            .unwrap();
    }

    #[test]
    fn server_wide_limits_are_refused_in_a_route() {
        for (key, value) in [("max_connections", "5"), ("handshake_timeout", "\"1s\"")] {
            let src = format!(
                "[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.limits]\n{key} = {value}\n"
            );
            let (line, k, msg) = refused(&src);
            assert_eq!((line, k.as_str()), (5, key));
            assert!(msg.contains("only allowed in [limits]"), "{msg}");
        }
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
    fn topic_and_timer_caps_have_finite_defaults_and_ranges() {
        let d = PubSubLimits::default();
        assert_eq!(
            (d.topics_per_connection, d.max_topics),
            (64, 100_000),
            "finite defaults"
        );
        assert_eq!((d.timers_per_connection, d.timers_per_instance), (64, 1024));
        let c = parse(
            "[topics]\nmax_per_connection = 3\nmax_topics = 5\n[timers]\nmax_per_connection = 2\n",
        )
        .unwrap();
        let l = PubSubLimits::from_raw(Some(&c.raw));
        assert_eq!(
            (
                l.topics_per_connection,
                l.max_topics,
                l.timers_per_connection
            ),
            (3, 5, 2)
        );
        assert_eq!(l.timers_per_instance, 1024, "unset keys keep the default");
        for bad in [
            "[topics]\nmax_per_connection = 0\n",
            "[topics]\nmax_per_connection = 10001\n",
            "[topics]\nmax_topics = -1\n",
            "[timers]\nmax_per_instance = 100001\n",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
        let err = parse("[topics]\nmax_per_conection = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_per_conection"), "{err}");
    }

    #[test]
    fn send_queue_bytes_has_a_finite_default_a_range_and_a_route_override() {
        assert_eq!(Limits::default().send_queue_bytes, 8 << 20);
        let c = parse(
            "[limits]\nsend_queue_bytes = \"4MiB\"\n[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.limits]\nsend_queue_bytes = 65536\n",
        )
        .unwrap();
        let server = Limits::default().overlay(&c.raw.limits);
        assert_eq!(server.send_queue_bytes, 4 << 20);
        assert_eq!(
            server.overlay(&c.raw.routes[0].limits).send_queue_bytes,
            65536
        );
        for bad in ["1000", "\"2GiB\"", "0"] {
            let err = parse(&format!("[limits]\nsend_queue_bytes = {bad}\n")).unwrap_err();
            assert!(err.to_string().contains("send_queue_bytes"), "{bad}: {err}");
        }
    }

    #[test]
    fn per_ip_keys() {
        let c = parse(
            "[limits]\nmax_connections_per_ip = 3\nhandshake_rate_per_ip = 0.5\n\
             handshake_burst_per_ip = 4\nper_ip_exempt = []\nreject_slots = 2\n",
        )
        .unwrap();
        let l = Limits::default().overlay(&c.raw.limits);
        assert_eq!(l.max_connections_per_ip, 3);
        assert_eq!(l.handshake_rate_per_ip, 0.5);
        assert_eq!(l.handshake_burst_per_ip, 4);
        assert!(l.per_ip_exempt.is_empty());
        assert_eq!(l.reject_slots, 2);
        let d = Limits::default();
        assert_eq!(d.per_ip_exempt, crate::server::per_ip::default_exempt());
        assert!(parse("[limits]\nhandshake_rate_per_ip = 0\n").is_err());
        assert!(parse("[limits]\nper_ip_exempt = [\"10.0.0.0/40\"]\n").is_err());
        let err = parse(
            "[[route]]\npath = \"/x\"\nhandler = \"echo\"\n[route.limits]\nmax_connections_per_ip = 2\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("only allowed in [limits]"),
            "{err}"
        );
    }

    #[test]
    fn rollout_keys_parse_and_are_checked() {
        let f = parse(
            "[rollout]\ncanary_percent = 10\ncanary_period = \"30s\"\nmax_panics = 0\n\
             [[route]]\npath = \"/a\"\nhandler = \"a\"\nsha256 = \"AB\"\n",
        );
        let e = f.unwrap_err().to_string();
        assert!(e.contains("sha256") && e.contains("64 hex digits"), "{e}");
        let e = parse("[rollout]\ncanary_percent = 101\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 to 100"), "{e}");
        let e = parse("[rollout]\nquarantine_faults = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("greater than 0"), "{e}");
        let pin = "A".repeat(64);
        let f = parse(&format!(
            "[[route]]\npath = \"/a\"\nhandler = \"a\"\nsha256 = \"{pin}\"\n\
             [route.rollout]\ncanary_percent = 5\n"
        ))
        .unwrap();
        let r = &f.raw.routes[0];
        assert_eq!(r.sha256.as_ref().unwrap().get_ref().0, "a".repeat(64));
        assert_eq!(r.rollout.canary_percent, Some(Percent(5)));
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
