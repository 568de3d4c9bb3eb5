//! `[cluster]`: topics across wshd nodes through Redis pub/sub.
//!
//! Each node keeps its own, exact membership ([`crate::topics`]); Redis only
//! carries messages between nodes. One task per process, the *link*
//! ([`run`]), owns two Redis connections and does all Redis I/O, so a
//! handler never waits on Redis:
//!
//! * **Subscribing.** [`Topics`] calls [`Link::topic_changed`] when a topic
//!   appears (first local subscriber) or disappears (last one left). That
//!   only marks the name dirty and wakes the link, which compares the
//!   topic's presence with its own set of subscribed channels and sends
//!   `SUBSCRIBE` / `UNSUBSCRIBE` for `channel_prefix + topic`. Reference
//!   counting is therefore the topic map itself, and a subscribe/unsubscribe
//!   burst collapses to the final state.
//! * **Publishing.** `publish` delivers locally at once, then
//!   [`Link::forward`] offers the message to a queue bounded in messages
//!   (`queue`) and in bytes (`queue_bytes`); a full queue or a link that is
//!   down drops it and counts the drop. The link sends what is queued as
//!   pipelined `PUBLISH`es on one connection, at most
//!   [`PIPELINE_BYTES`] per pipeline, so one publisher's messages stay in
//!   order. A message's bytes count against the queue until its pipeline is
//!   answered, so a stalled Redis holds at most `queue_bytes` of them (#23:
//!   with only the message cap, 1 MiB messages grew a node by 3 GB).
//! * **Receiving.** An [envelope](encode) carries the sender's node id, the
//!   kind and the payload; a node skips its own envelopes (it delivered them
//!   locally already) and hands the others to [`Topics::deliver_remote`],
//!   the same shared-payload fan-out a local publish uses, never re-published.
//! * **Counts.** Every `count_interval` the link writes this node's count of
//!   each local topic into the hash `prefix + "count:" + topic` (field: node
//!   id, value: `count:unix_ms`, key expiring after three intervals) and
//!   reads the other nodes' fresh fields back in the same pipeline; the sums
//!   are cached for [`Link::cluster_subscribers`].
//! * **Faults.** A failed connect, a failed command or the end of the
//!   subscriber stream (Redis restarted, or it cut a slow subscriber through
//!   `client-output-buffer-limit pubsub`) marks the link down; it reconnects
//!   with a capped backoff (100 ms doubling to 2 s) and subscribes again to
//!   every topic that still has local subscribers. Drops are logged at most
//!   once per second.
//! * **TLS.** A `rediss://` URL connects through rustls with the `ring`
//!   provider (the one the listeners use; no OpenSSL, no aws-lc-rs). The
//!   server certificate is checked against the system's roots, or only
//!   against `tls_ca` when that is set (a private CA). Certificate checks
//!   cannot be turned off: the redis crate's `#insecure` fragment is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tungstenite::Message;

use crate::config::{Bounded, Dur};
use crate::topics::Topics;

/// Default `[cluster] channel_prefix`.
pub const DEFAULT_CHANNEL_PREFIX: &str = "wshd:";
/// Default `[cluster] queue`: messages waiting to be published to Redis.
pub const DEFAULT_QUEUE: usize = 10_000;
/// Default `[cluster] queue_bytes`: bytes of messages waiting for Redis.
/// Redis itself cuts a pub/sub subscriber at 32 MiB of output buffer.
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;
/// What one queued message costs beyond its payload and topic name (the
/// queue slot, the `Arc<str>`, the envelope header).
const QUEUED_OVERHEAD: usize = 64;
/// Bytes of envelopes one pipeline carries at most, so the encoded copy of
/// a batch stays small whatever the message size.
const PIPELINE_BYTES: usize = 1 << 20;
/// Default `[cluster] count_interval`.
pub const DEFAULT_COUNT_INTERVAL: Duration = Duration::from_secs(2);
/// The longest `node_id` and `channel_prefix`, in bytes (the node id goes
/// into every envelope).
pub const MAX_ID_LEN: usize = 64;
/// Topics whose counts one heartbeat writes at most: bounds the Redis load
/// of the counts whatever the number of topics (the rest keep their last
/// cached value until a later heartbeat reaches them).
pub const MAX_COUNTED_PER_BEAT: usize = 10_000;
/// `PUBLISH`es sent in one pipeline.
const PUBLISH_BATCH: usize = 256;
/// Dirty names handled per round, so a subscribe storm cannot starve the
/// incoming messages.
const SUBSCRIBE_BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Capped low enough that cross-node delivery is back within a few seconds
/// of Redis returning; an attempt against a down Redis costs one refused
/// connect.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Connecting (TCP + AUTH + first reply) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One command's reply may take this long before the link counts Redis as
/// down.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The envelope format; bumped if the layout ever changes.
const ENVELOPE_VERSION: u8 = 1;
const KIND_TEXT: u8 = 1;
const KIND_BINARY: u8 = 2;

/// `[cluster]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `redis://[:password@]host:port[/db]` (or `redis://user:password@...`).
    pub redis: String,
    /// This node's name in envelopes and count hashes (default: hostname,
    /// pid and a random suffix).
    pub node_id: Option<String>,
    /// Prepended to a topic name to make its Redis channel.
    pub channel_prefix: Option<String>,
    /// Messages waiting to be published to Redis; more are dropped.
    pub queue: Option<Bounded<1_000_000>>,
    /// Bytes of messages waiting to be published to Redis (payload, topic
    /// and a small overhead each); more are dropped.
    pub queue_bytes: Option<crate::config::ByteSize>,
    /// How often cluster-wide counts are refreshed.
    pub count_interval: Option<Dur>,
    /// PEM file with the CA certificate(s) that signed Redis's TLS
    /// certificate, for a `rediss://` URL (relative to the config file).
    /// Default: the system's root store.
    pub tls_ca: Option<PathBuf>,
}

/// `[cluster]` resolved and checked. Its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub redis: String,
    pub node_id: String,
    pub channel_prefix: String,
    pub queue: usize,
    pub queue_bytes: usize,
    pub count_interval: Duration,
    /// `tls_ca` resolved against the config file's directory.
    pub tls_ca: Option<PathBuf>,
    /// Its PEM, read when the config is read: a missing or unreadable file
    /// fails `wshd -t` and startup rather than every reconnect.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl ClusterSettings {
    /// Checks `raw` and fills in the defaults; `rel` resolves a path
    /// relative to the config file. The URL is parsed, not connected to: an
    /// unreachable Redis is a run-time condition.
    pub fn from_raw(
        raw: &RawCluster,
        rel: impl Fn(&Path) -> PathBuf,
    ) -> Result<ClusterSettings, String> {
        let url = raw.redis.trim();
        let tls = url.starts_with("rediss://");
        if !tls && !url.starts_with("redis://") {
            return Err(format!(
                "[cluster] redis = \"{}\": write a redis:// or rediss:// (TLS) URL, e.g. \
                 \"redis://127.0.0.1:6379\" or \"rediss://:password@host:6380/0\"",
                redact(url)
            ));
        }
        if tls && url.contains('#') {
            // The redis crate reads `#insecure` as "skip certificate checks";
            // wshd does not offer that (a private CA goes in tls_ca).
            return Err(format!(
                "[cluster] redis = \"{}\": remove the #fragment; certificate checks cannot be \
                 turned off: for a private CA set [cluster] tls_ca = \"ca.pem\"",
                redact(url)
            ));
        }
        let (tls_ca, tls_ca_pem) = match &raw.tls_ca {
            None => (None, None),
            Some(_) if !tls => {
                return Err(format!(
                    "[cluster] tls_ca is set but redis = \"{}\" is not TLS: write the URL as \
                     rediss://, or drop tls_ca",
                    redact(url)
                ));
            }
            Some(p) => {
                let path = rel(p);
                let pem = read_ca(&path)?;
                (Some(path), Some(pem))
            }
        };
        let settings_url = url.to_string();
        client(&settings_url, tls_ca_pem.as_deref()).map_err(|e| {
            format!(
                "[cluster] redis = \"{}\": {e}; write e.g. \"redis://127.0.0.1:6379\" or \
                 \"rediss://host:6380\"",
                redact(url)
            )
        })?;
        let node_id = match &raw.node_id {
            Some(id) => id.clone(),
            None => default_node_id(),
        };
        check_id("node_id", &node_id, false)?;
        let channel_prefix = raw
            .channel_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_CHANNEL_PREFIX.into());
        check_id("channel_prefix", &channel_prefix, true)?;
        let queue_bytes = raw.queue_bytes.map_or(DEFAULT_QUEUE_BYTES, |b| b.0);
        if !(64 << 10..=1 << 40).contains(&queue_bytes) {
            return Err(format!(
                "[cluster] queue_bytes = {queue_bytes}: must be between 64KiB and 1TiB \
                 (default \"64MiB\")"
            ));
        }
        Ok(ClusterSettings {
            redis: settings_url,
            node_id,
            channel_prefix,
            queue: raw.queue.map_or(DEFAULT_QUEUE, |q| q.0),
            queue_bytes,
            count_interval: raw.count_interval.map_or(DEFAULT_COUNT_INTERVAL, |d| d.0),
            tls_ca,
            tls_ca_pem,
        })
    }

    /// Whether the link speaks TLS to Redis (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.redis.starts_with("rediss://")
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        client(&self.redis, self.tls_ca_pem.as_deref())
    }

    /// Where Redis is, without the password, for logs.
    pub fn describe(&self) -> String {
        redact(&self.redis)
    }
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("redis", &self.describe())
            .field("node_id", &self.node_id)
            .field("channel_prefix", &self.channel_prefix)
            .field("queue", &self.queue)
            .field("queue_bytes", &self.queue_bytes)
            .field("count_interval", &self.count_interval)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

/// Reads `tls_ca` and checks that it holds at least one PEM certificate.
fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "[cluster] tls_ca = {}: cannot read it ({e}); give the PEM file of the CA that signed \
             Redis's certificate (relative paths are relative to the config file)",
            path.display()
        )
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "[cluster] tls_ca = {}: not valid PEM ({e}); give a file of \
                 -----BEGIN CERTIFICATE----- blocks",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "[cluster] tls_ca = {}: holds no certificate; give a file of -----BEGIN CERTIFICATE----- \
             blocks (the CA that signed Redis's certificate)",
            path.display()
        ));
    }
    Ok(pem)
}

/// The redis client for `url`: with `ca` (PEM) as its only trusted roots
/// for a `rediss://` URL, else the system's roots.
fn client(url: &str, ca: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    ensure_crypto_provider();
    match ca {
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
        None => redis::Client::open(url),
    }
}

/// The redis crate builds its rustls config with `ClientConfig::builder()`,
/// which uses the process-wide default provider and, when none is
/// installed, picks the one enabled in rustls's features, panicking if
/// there are two (e.g. a workspace build that unifies in aws-lc-rs). The
/// listeners pass `ring` explicitly; installing it here as the default,
/// once, makes the redis side use the same provider whatever the features.
fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first, which rustls then
        // uses: fine too.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    });
}

/// Appended to a connect error that looks like a certificate problem.
fn tls_hint(settings: &ClusterSettings, err: &str) -> &'static str {
    let e = err.to_ascii_lowercase();
    if !settings.is_tls() || !(e.contains("certificate") || e.contains("tls")) {
        return "";
    }
    if settings.tls_ca.is_some() {
        " (check that [cluster] tls_ca is the CA that signed Redis's certificate and that the \
         certificate names the host in the URL)"
    } else {
        " (the system's roots do not vouch for Redis's certificate: for a private CA set \
         [cluster] tls_ca = \"ca.pem\")"
    }
}

fn check_id(key: &str, v: &str, empty_ok: bool) -> Result<(), String> {
    if (!empty_ok && v.is_empty()) || v.len() > MAX_ID_LEN || v.chars().any(char::is_control) {
        return Err(format!(
            "[cluster] {key} = {v:?}: use 1 to {MAX_ID_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.into(),
    }
}

/// Hostname, pid and a random suffix: unique per process even when two
/// nodes share a host. Chosen once per process, so a config reload does not
/// see a changed node id.
fn default_node_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(new_node_id).clone()
}

fn new_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() { "wshd".into() } else { host };
    // RandomState is seeded from the OS's randomness: no rand dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let suffix = h.finish() & 0xff_ffff;
    let mut id = format!("{host}-{}-{suffix:06x}", std::process::id());
    if id.len() > MAX_ID_LEN {
        id = id.split_off(id.len() - MAX_ID_LEN);
    }
    id
}

/// Builds the envelope Redis carries: `[version, kind, id_len, id.., payload..]`.
pub fn encode(node_id: &[u8], msg: &Message) -> Option<Vec<u8>> {
    let (kind, payload): (u8, &[u8]) = match msg {
        Message::Text(t) => (KIND_TEXT, t.as_bytes()),
        Message::Binary(b) => (KIND_BINARY, b),
        // A "do not compress" send (host_api.rs): relayed as a plain
        // message, since the envelope has no flag for it.
        Message::Frame(f) => match f.header().opcode {
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ) => (KIND_TEXT, f.payload()),
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Binary,
            ) => (KIND_BINARY, f.payload()),
            _ => return None,
        },
        _ => return None,
    };
    let mut out = Vec::with_capacity(3 + node_id.len() + payload.len());
    out.push(ENVELOPE_VERSION);
    out.push(kind);
    out.push(u8::try_from(node_id.len()).ok()?);
    out.extend_from_slice(node_id);
    out.extend_from_slice(payload);
    Some(out)
}

/// Reads an envelope: the sender's node id and the message. `None` for
/// anything malformed (another program publishing on our channels), which is
/// ignored.
pub fn decode(env: &[u8]) -> Option<(&[u8], Message)> {
    let [version, kind, id_len, rest @ ..] = env else {
        return None;
    };
    if *version != ENVELOPE_VERSION || rest.len() < usize::from(*id_len) {
        return None;
    }
    let (id, payload) = rest.split_at(usize::from(*id_len));
    let payload = Bytes::copy_from_slice(payload);
    let msg = match *kind {
        KIND_TEXT => Message::Text(tungstenite::Utf8Bytes::try_from(payload).ok()?),
        KIND_BINARY => Message::Binary(payload),
        _ => return None,
    };
    Some((id, msg))
}

/// One message on its way to Redis.
struct Outgoing {
    topic: Arc<str>,
    msg: Message,
    /// What it counts against `queue_bytes`.
    cost: usize,
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages published to Redis.
    pub published: AtomicU64,
    /// Cross-node messages dropped (link down or queue full).
    pub dropped: AtomicU64,
    /// Of those, dropped because `queue_bytes` was reached.
    pub dropped_for_bytes: AtomicU64,
    /// Messages from other nodes delivered locally.
    pub received: AtomicU64,
}

/// The handle [`Topics`] and the host API hold; the Redis side is [`run`].
#[derive(Debug)]
pub struct Link {
    node_id: Arc<[u8]>,
    prefix: String,
    tx: mpsc::Sender<Outgoing>,
    /// Bytes queued or in a pipeline not yet answered, against `max_bytes`.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Connected to Redis, subscribed and able to publish.
    up: AtomicBool,
    /// Topics whose presence changed since the link last looked.
    dirty: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
    /// Other nodes' subscribers per local topic, from the last heartbeat.
    remote_counts: DashMap<Arc<str>, u64>,
    pub stats: Stats,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("topic", &self.topic)
            .finish()
    }
}

/// The link's half of [`Link::new`]: the queue's receiving end.
pub struct Receiver(mpsc::Receiver<Outgoing>);

impl Link {
    pub fn new(settings: &ClusterSettings) -> (Arc<Link>, Receiver) {
        let (tx, rx) = mpsc::channel(settings.queue);
        let link = Arc::new(Link {
            node_id: settings.node_id.as_bytes().into(),
            prefix: settings.channel_prefix.clone(),
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes: settings.queue_bytes,
            up: AtomicBool::new(false),
            dirty: Mutex::default(),
            wake: Notify::new(),
            remote_counts: DashMap::new(),
            stats: Stats::default(),
        });
        (link, Receiver(rx))
    }

    /// Whether cross-node delivery is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A topic appeared or disappeared locally. Never blocks: it marks the
    /// name for the link task.
    pub fn topic_changed(&self, name: &Arc<str>) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        self.wake.notify_one();
    }

    /// Offers a locally published message to the other nodes. Never blocks:
    /// when the link is down or the queue is full the message is dropped
    /// and counted (delivery across nodes is at most once).
    pub fn forward(&self, topic: &str, msg: &Message) {
        if !self.is_up() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cost = payload_len(msg) + topic.len() + self.node_id.len() + QUEUED_OVERHEAD;
        // Reserve the bytes first, so concurrent publishers cannot together
        // pass the cap.
        let reserved = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + cost <= self.max_bytes).then_some(q + cost)
            });
        if reserved.is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats.dropped_for_bytes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let out = Outgoing {
            topic: topic.into(),
            msg: msg.clone(),
            cost,
        };
        if self.tx.try_send(out).is_err() {
            self.release(cost);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes queued for Redis or in a pipeline not yet answered.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    fn release(&self, cost: usize) {
        self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Subscribers of `topic` on the other nodes as of the last heartbeat
    /// (0 for a topic without local subscribers: only those are counted).
    pub fn remote_subscribers(&self, topic: &str) -> u64 {
        self.remote_counts.get(topic).map_or(0, |c| *c)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    fn count_key(&self, topic: &str) -> String {
        format!("{}count:{topic}", self.prefix)
    }

    /// Forgets the changes seen so far: while the link is down they do not
    /// matter (reconnecting subscribes to whatever exists then), and
    /// forgetting them keeps the set small during a long outage with
    /// subscription churn.
    fn clear_dirty(&self) {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn take_dirty(&self, max: usize) -> Vec<Arc<str>> {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() <= max {
            return d.drain().collect();
        }
        let some: Vec<Arc<str>> = d.iter().take(max).cloned().collect();
        for n in &some {
            d.remove(n);
        }
        self.wake.notify_one();
        some
    }
}

/// Connects once and sends `PING`, for `wshd -t`: `Err` says why Redis is
/// not usable right now.
pub async fn probe(settings: &ClusterSettings) -> Result<(), String> {
    let client = settings.client().map_err(|e| e.to_string())?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| format!("{e}{}", tls_hint(settings, &e.to_string())))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Why a connected session ended.
#[derive(Debug)]
enum Down {
    Shutdown,
    Lost(String),
}

/// The link task: connects, reconnects, and moves messages both ways until
/// `stop` is cancelled.
pub async fn run(
    settings: ClusterSettings,
    link: Arc<Link>,
    rx: Receiver,
    topics: &'static Topics,
    stop: CancellationToken,
) {
    let mut rx = rx.0;
    let where_ = settings.describe();
    let client = match settings.client() {
        Ok(c) => c,
        Err(e) => {
            // Checked when the config was read; kept for completeness.
            tracing::error!("cluster: redis URL {where_}: {e}; cross-node delivery is off");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    let mut announced_down = false;
    let mut drop_log = DropLog::new(&link);
    loop {
        let err = match session(
            &client,
            &link,
            &mut rx,
            topics,
            &settings,
            &stop,
            &mut drop_log,
        )
        .await
        {
            Ok(Down::Shutdown) => break,
            Ok(Down::Lost(e)) => {
                // It was up: start over quickly.
                backoff = BACKOFF_MIN;
                announced_down = false;
                e
            }
            Err(e) => e,
        };
        link.up.store(false, Ordering::Relaxed);
        // Queued messages would go out late and out of order with the
        // outage's drops: drop them too, counted.
        while let Ok(o) = rx.try_recv() {
            link.release(o.cost);
            link.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if !announced_down {
            tracing::warn!(
                "cluster: cross-node delivery is down: redis at {where_}: {err}; local delivery \
                 continues; reconnecting with backoff up to {BACKOFF_MAX:?}"
            );
            announced_down = true;
        } else {
            tracing::debug!("cluster: redis at {where_} still unreachable: {err}");
        }
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        // Keep logging drops while waiting.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut sleep => break,
                _ = tick.tick() => {
                    drop_log.tick(&link, false);
                    link.clear_dirty();
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    link.up.store(false, Ordering::Relaxed);
}

/// Logs dropped cross-node messages at most once per second.
struct DropLog {
    last: u64,
    last_for_bytes: u64,
    at: tokio::time::Instant,
}

impl DropLog {
    fn new(link: &Link) -> DropLog {
        DropLog {
            last: link.stats.dropped.load(Ordering::Relaxed),
            last_for_bytes: link.stats.dropped_for_bytes.load(Ordering::Relaxed),
            at: tokio::time::Instant::now(),
        }
    }

    /// Call it as often as convenient: it logs the drops since the last
    /// line, if any, and if that line is at least a second old. The link
    /// task cannot call it while it waits on a stalled Redis, so a line may
    /// cover more than a second.
    fn tick(&mut self, link: &Link, up: bool) {
        let now = link.stats.dropped.load(Ordering::Relaxed);
        if now > self.last && self.at.elapsed() >= Duration::from_secs(1) {
            self.at = tokio::time::Instant::now();
            let for_bytes = link.stats.dropped_for_bytes.load(Ordering::Relaxed);
            let over_queue_bytes = for_bytes - self.last_for_bytes;
            let why = if over_queue_bytes > 0 {
                "the outgoing queue held [cluster] queue_bytes (redis slow or stalled)"
            } else if up {
                "the outgoing queue was full ([cluster] queue)"
            } else {
                "redis is unreachable"
            };
            tracing::warn!(
                dropped = now - self.last,
                over_queue_bytes,
                total = now,
                "cluster: dropped cross-node messages since the last line: {why}"
            );
            self.last = now;
            self.last_for_bytes = for_bytes;
        }
    }
}

/// One connected period: returns `Ok` when it ends after having been up,
/// `Err` when connecting failed.
async fn session(
    client: &redis::Client,
    link: &Arc<Link>,
    rx: &mut mpsc::Receiver<Outgoing>,
    topics: &'static Topics,
    settings: &ClusterSettings,
    stop: &CancellationToken,
    drop_log: &mut DropLog,
) -> Result<Down, String> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| format!("{e}{}", tls_hint(settings, &e.to_string())))?;
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = pubsub.split();

    // Subscribe to every topic that has local subscribers now; later
    // changes arrive through `dirty`. Marking them all dirty (instead of
    // walking twice) keeps one code path. A topic created after the clear
    // is marked by its creation or listed by `names`, or both.
    let mut subscribed: HashSet<Arc<str>> = HashSet::new();
    link.clear_dirty();
    for name in topics.names() {
        link.topic_changed(&name);
    }
    sync_subscriptions(link, topics, &mut sink, &mut subscribed, &mut conn)
        .await
        .map_err(|e| e.to_string())?;
    link.up.store(true, Ordering::Relaxed);
    tracing::info!(
        node_id = %settings.node_id,
        topics = subscribed.len(),
        "cluster: connected to redis at {}; cross-node delivery is up",
        settings.describe()
    );

    let mut second = tokio::time::interval(Duration::from_millis(250));
    let mut beat = tokio::time::interval(settings.count_interval);
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Down::Shutdown,
            msg = stream.next() => {
                let Some(msg) = msg else {
                    break Down::Lost("the subscriber connection closed".into());
                };
                receive(link, topics, &msg);
            }
            n = rx.recv_many(&mut batch, PUBLISH_BATCH) => {
                if n == 0 {
                    break Down::Shutdown;
                }
                let r = publish(link, &mut conn, &batch).await;
                link.release(batch.iter().map(|o| o.cost).sum());
                batch.clear();
                if let Err(e) = r {
                    break Down::Lost(format!("PUBLISH failed: {e}"));
                }
            }
            _ = link.wake.notified() => {
                if let Err(e) = sync_subscriptions(link, topics, &mut sink, &mut subscribed, &mut conn).await {
                    break Down::Lost(format!("SUBSCRIBE failed: {e}"));
                }
            }
            _ = second.tick() => drop_log.tick(link, true),
            _ = beat.tick() => {
                if let Err(e) = heartbeat(link, topics, &mut conn, settings).await {
                    break Down::Lost(format!("count heartbeat failed: {e}"));
                }
            }
        }
    };
    link.up.store(false, Ordering::Relaxed);
    Ok(result)
}

/// Delivers one message from Redis to this node's subscribers.
fn receive(link: &Link, topics: &Topics, msg: &redis::Msg) {
    let Some(topic) = msg.get_channel_name().strip_prefix(link.prefix.as_str()) else {
        return;
    };
    let Some((from, m)) = decode(msg.get_payload_bytes()) else {
        tracing::debug!(
            topic = %crate::logsafe::esc(topic),
            "cluster: ignoring a malformed envelope"
        );
        return;
    };
    if from == &*link.node_id {
        // Delivered locally when it was published.
        return;
    }
    link.stats.received.fetch_add(1, Ordering::Relaxed);
    topics.deliver_remote(topic, &m);
}

/// Sends `batch` as pipelines of at most [`PIPELINE_BYTES`] of envelopes
/// each, in order. On an error the rest of the batch is dropped, counted.
async fn publish(
    link: &Link,
    conn: &mut redis::aio::MultiplexedConnection,
    batch: &[Outgoing],
) -> redis::RedisResult<()> {
    let mut rest = batch;
    while !rest.is_empty() {
        let mut pipe = redis::pipe();
        let mut bytes = 0;
        let mut n = 0;
        for o in rest {
            if n > 0 && bytes + o.cost > PIPELINE_BYTES {
                break;
            }
            n += 1;
            bytes += o.cost;
            if let Some(env) = encode(&link.node_id, &o.msg) {
                pipe.cmd("PUBLISH")
                    .arg(link.channel(&o.topic))
                    .arg(env)
                    .ignore();
            }
        }
        let r: redis::RedisResult<()> = pipe.query_async(conn).await;
        if let Err(e) = r {
            link.stats
                .dropped
                .fetch_add(rest.len() as u64, Ordering::Relaxed);
            return Err(e);
        }
        link.stats.published.fetch_add(n as u64, Ordering::Relaxed);
        rest = &rest[n..];
    }
    Ok(())
}

/// The payload bytes of a message [`encode`] relays.
fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Frame(f) => f.payload().len(),
        _ => 0,
    }
}

/// Brings the Redis subscriptions in line with the topics that exist
/// locally, for the names marked dirty.
async fn sync_subscriptions(
    link: &Link,
    topics: &Topics,
    sink: &mut redis::aio::PubSubSink,
    subscribed: &mut HashSet<Arc<str>>,
    conn: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<()> {
    loop {
        let names = link.take_dirty(SUBSCRIBE_BATCH);
        if names.is_empty() {
            return Ok(());
        }
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for name in names {
            let wanted = topics.contains(&name);
            match (wanted, subscribed.contains(&name)) {
                (true, false) => add.push(name),
                (false, true) => del.push(name),
                _ => {}
            }
        }
        if !add.is_empty() {
            let channels: Vec<String> = add.iter().map(|n| link.channel(n)).collect();
            sink.subscribe(channels).await?;
            tracing::debug!(
                "cluster: subscribed to {}",
                add.iter()
                    .map(|n| crate::logsafe::esc(n.as_bytes()).to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            subscribed.extend(add);
        }
        if !del.is_empty() {
            let channels: Vec<String> = del.iter().map(|n| link.channel(n)).collect();
            sink.unsubscribe(channels).await?;
            // This node's count for them goes away now rather than at expiry.
            let mut pipe = redis::pipe();
            for n in &del {
                subscribed.remove(n);
                link.remote_counts.remove(n);
                pipe.cmd("HDEL")
                    .arg(link.count_key(n))
                    .arg(&*link.node_id)
                    .ignore();
            }
            pipe.query_async::<()>(conn).await?;
            tracing::debug!(
                "cluster: unsubscribed from {}",
                del.iter()
                    .map(|n| crate::logsafe::esc(n.as_bytes()).to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        // Yield between batches so incoming messages keep flowing.
        tokio::task::yield_now().await;
    }
}

/// Writes this node's counts and reads everyone's, for up to
/// [`MAX_COUNTED_PER_BEAT`] local topics, in pipelines of 256.
async fn heartbeat(
    link: &Link,
    topics: &Topics,
    conn: &mut redis::aio::MultiplexedConnection,
    settings: &ClusterSettings,
) -> redis::RedisResult<()> {
    let ttl = settings.count_interval * 3;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut names = topics.names();
    names.truncate(MAX_COUNTED_PER_BEAT);
    for chunk in names.chunks(256) {
        let mut pipe = redis::pipe();
        for n in chunk {
            let key = link.count_key(n);
            let local = topics.subscribers(n);
            pipe.cmd("HSET")
                .arg(&key)
                .arg(&*link.node_id)
                .arg(format!("{local}:{now}"))
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl.as_millis() as u64)
                .ignore();
            pipe.cmd("HGETALL").arg(&key);
        }
        let all: Vec<std::collections::HashMap<Vec<u8>, String>> = pipe.query_async(conn).await?;
        for (n, fields) in chunk.iter().zip(all) {
            let remote: u64 = fields
                .iter()
                .filter(|(node, _)| node.as_slice() != &*link.node_id)
                .filter_map(|(_, v)| {
                    let (count, at) = v.split_once(':')?;
                    let at: u64 = at.parse().ok()?;
                    // Skip nodes that stopped refreshing (crashed): their
                    // field lingers until the key expires.
                    (now.saturating_sub(at) <= ttl.as_millis() as u64)
                        .then(|| count.parse::<u64>().ok())
                        .flatten()
                })
                .sum();
            link.remote_counts.insert(n.clone(), remote);
        }
    }
    // Forget topics that are gone locally.
    link.remote_counts.retain(|n, _| topics.contains(n));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_raw(raw: &RawCluster) -> Result<ClusterSettings, String> {
        ClusterSettings::from_raw(raw, |p| Path::new("/etc/wshd").join(p))
    }

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let env = encode(b"node-1", &Message::text("héllo")).unwrap();
        let (id, m) = decode(&env).unwrap();
        assert_eq!((id, m), (&b"node-1"[..], Message::text("héllo")));
        let env = encode(b"", &Message::binary(vec![0u8, 255])).unwrap();
        assert_eq!(decode(&env).unwrap().1, Message::binary(vec![0u8, 255]));
        assert!(decode(b"").is_none());
        assert!(decode(&[9, 1, 0]).is_none(), "unknown version");
        assert!(decode(&[1, 3, 0]).is_none(), "unknown kind");
        assert!(
            decode(&[1, 1, 5, b'a']).is_none(),
            "id longer than the rest"
        );
        assert!(decode(&[1, 1, 0, 0xff]).is_none(), "text that is not UTF-8");
    }

    #[test]
    fn settings_check_the_url_and_ids() {
        let raw = |url: &str| RawCluster {
            redis: url.into(),
            node_id: Some("n1".into()),
            channel_prefix: None,
            queue: None,
            queue_bytes: None,
            count_interval: None,
            tls_ca: None,
        };
        let s = from_raw(&raw("redis://:pw@127.0.0.1:6379/0")).unwrap();
        assert_eq!(s.channel_prefix, "wshd:");
        assert_eq!(s.queue, DEFAULT_QUEUE);
        assert_eq!(s.describe(), "redis://:***@127.0.0.1:6379/0");
        let s = from_raw(&raw("rediss://:pw@h:6380")).unwrap();
        assert!(s.is_tls() && s.tls_ca.is_none());
        assert_eq!(s.describe(), "rediss://:***@h:6380");
        let e = from_raw(&raw("rediss://h:6380/#insecure")).unwrap_err();
        assert!(e.contains("cannot be turned off"), "{e}");
        let e = from_raw(&raw("http://h")).unwrap_err();
        assert!(e.contains("redis://"), "{e}");
        let mut r = raw("redis://h");
        r.node_id = Some(String::new());
        assert!(from_raw(&r).is_err());
        r.node_id = None;
        let id = from_raw(&r).unwrap().node_id;
        assert!(!id.is_empty() && id.len() <= MAX_ID_LEN, "{id}");
        assert_eq!(
            id,
            from_raw(&r).unwrap().node_id,
            "stable across config reloads"
        );
        assert_ne!(new_node_id(), new_node_id(), "random per process");
        assert!(!format!("{s:?}").contains("pw"), "Debug hides the password");
    }

    #[test]
    fn tls_ca_is_read_relative_to_the_config_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let raw = |url: &str, ca: &str| RawCluster {
            redis: url.into(),
            node_id: Some("n1".into()),
            channel_prefix: None,
            queue: None,
            queue_bytes: None,
            count_interval: None,
            tls_ca: Some(ca.into()),
        };
        let rel = |p: &Path| dir.path().join(p);
        let e = ClusterSettings::from_raw(&raw("rediss://h", "ca.pem"), rel).unwrap_err();
        assert!(e.contains("cannot read it") && e.contains("ca.pem"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let e = ClusterSettings::from_raw(&raw("rediss://h", "ca.pem"), rel).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        let s = ClusterSettings::from_raw(&raw("rediss://h", "ca.pem"), rel).unwrap();
        assert_eq!(s.tls_ca.as_deref(), Some(&*dir.path().join("ca.pem")));
        assert_eq!(s.tls_ca_pem.as_deref(), Some(ca.cert.pem().as_bytes()));
        let e = ClusterSettings::from_raw(&raw("redis://h", "ca.pem"), rel).unwrap_err();
        assert!(e.contains("is not TLS"), "{e}");
    }

    #[test]
    fn a_link_that_is_down_drops_and_counts() {
        let s = from_raw(&RawCluster {
            redis: "redis://127.0.0.1:1".into(),
            node_id: Some("n".into()),
            channel_prefix: None,
            queue: Some(Bounded(2)),
            queue_bytes: None,
            count_interval: None,
            tls_ca: None,
        })
        .unwrap();
        let (link, _rx) = Link::new(&s);
        link.forward("t", &Message::text("x"));
        assert_eq!(link.stats.dropped.load(Ordering::Relaxed), 1);
        link.up.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            link.forward("t", &Message::text("x"));
        }
        assert_eq!(
            link.stats.dropped.load(Ordering::Relaxed),
            2,
            "the third did not fit the queue of 2"
        );
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_frees_them_when_taken() {
        let s = from_raw(&RawCluster {
            redis: "redis://127.0.0.1:1".into(),
            node_id: Some("n".into()),
            channel_prefix: None,
            queue: None,
            queue_bytes: Some(crate::config::ByteSize(3 << 20)),
            count_interval: None,
            tls_ca: None,
        })
        .unwrap();
        let (link, mut rx) = Link::new(&s);
        link.up.store(true, Ordering::Relaxed);
        let mib = Message::binary(vec![7u8; 1 << 20]);
        for _ in 0..5 {
            link.forward("t", &mib);
        }
        // Two fit under 3 MiB with their overhead, a third does not.
        assert_eq!(link.stats.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(link.stats.dropped_for_bytes.load(Ordering::Relaxed), 3);
        assert!(link.queued_bytes() > 2 << 20 && link.queued_bytes() <= 3 << 20);
        // Taken and answered: the bytes are free again.
        let o = rx.0.try_recv().unwrap();
        link.release(o.cost);
        link.forward("t", &mib);
        assert_eq!(link.stats.dropped.load(Ordering::Relaxed), 3);
        let e = from_raw(&RawCluster {
            redis: "redis://h".into(),
            node_id: None,
            channel_prefix: None,
            queue: None,
            queue_bytes: Some(crate::config::ByteSize(1)),
            count_interval: None,
            tls_ca: None,
        })
        .unwrap_err();
        assert!(e.contains("queue_bytes"), "{e}");
        assert_eq!(
            from_raw(&raw_default()).unwrap().queue_bytes,
            DEFAULT_QUEUE_BYTES
        );
    }

    fn raw_default() -> RawCluster {
        RawCluster {
            redis: "redis://h".into(),
            node_id: None,
            channel_prefix: None,
            queue: None,
            queue_bytes: None,
            count_interval: None,
            tls_ca: None,
        }
    }
}
