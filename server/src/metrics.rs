//! Prometheus metrics: the counters the server keeps, and [`render`], which
//! turns them into the text served on the admin listener's `/metrics`
//! (admin.rs).
//!
//! # Cost
//! Nothing here takes a lock or allocates per message. Per-route counters
//! live in a [`RouteMetrics`] that the route's [`Instance`] holds (one per
//! route and handler generation), split into [`SHARDS`] cache-line-aligned
//! shards: a thread adds to its own shard with one relaxed atomic add, so
//! the worker threads never fight over a cache line. The scrape sums the
//! shards (a custom `prometheus-client` collector), so label lookups and
//! string formatting happen once per scrape, never per message.
//!
//! Without the admin listener nobody can read the counters, so the
//! per-message ones (messages, bytes, callback durations) are kept only
//! while it is on ([`enable`]); with it off, each costs one relaxed load
//! and a predictable branch. Callback durations need two clock reads per
//! call (about 20-40 ns each). The rare events (connections, closes,
//! panics, handshakes, reloads) are always counted. The admin listener is
//! started before any connection and never stopped, so the gauge of open
//! connections stays consistent.
//!
//! # Labels
//! Label values come only from the configuration (route paths), the loaded
//! versions (generations) and fixed tables ([`STATUSES`], [`CLOSE_CODES`]):
//! a status or close code outside the table is counted as `other`, so no
//! client can grow the label set.
//!
//! A route's series carry `route` and `generation`. When a retired
//! generation's last connection ends its instance is destroyed and its
//! series disappear from the scrape: sum per route over `rate()`, which is
//! computed per series, rather than summing raw counters.
//!
//! [`Instance`]: crate::instance::Instance

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// HTTP statuses a handshake answer is counted under; any other is `other`.
/// 101 is a completed handshake; 429 and 503 include the sockets refused
/// at accept (per-IP caps, a full server).
pub const STATUSES: [u16; 14] = [
    101, 400, 401, 403, 404, 405, 408, 409, 414, 426, 429, 431, 500, 503,
];

/// Close codes counted by their number; any other (handler-chosen 3000-4999
/// codes included) is `other`. 1005 and 1006 are never sent on the wire
/// but are what a close without a code, and a dropped connection, record.
pub const CLOSE_CODES: [u16; 14] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
];

/// Upper bounds of the callback duration buckets, in nanoseconds (1 µs to
/// 5 s: an inline callback is a few µs; one that takes milliseconds blocks
/// a worker thread and is worth seeing).
const BUCKETS_NS: [u64; 14] = [
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Per-thread shards of every route's counters. More threads than shards
/// (the blocking pool) share, which is still correct: the adds are atomic.
pub const SHARDS: usize = 8;

/// A handler callback, the `callback` label of
/// `wshd_callback_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cb {
    Handshake = 0,
    Open = 1,
    Message = 2,
    Close = 3,
}

impl Cb {
    const ALL: [Cb; 4] = [Cb::Handshake, Cb::Open, Cb::Message, Cb::Close];

    fn label(self) -> &'static str {
        match self {
            Cb::Handshake => "on_handshake",
            Cb::Open => "on_open",
            Cb::Message => "on_message",
            Cb::Close => "on_close",
        }
    }
}

/// The result of one reload, the `result` label of `wshd_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied with no problem.
    Ok = 0,
    /// Applied, but something was not (a handler failed to load and its
    /// previous version, if any, keeps serving).
    Partial = 1,
    /// Nothing changed: the config was refused, or the reload failed.
    Failed = 2,
}

// Slots of one shard.
const MSG_IN: usize = 0;
const MSG_OUT: usize = 1;
const BYTES_IN: usize = 2;
const BYTES_OUT: usize = 3;
const OPENED: usize = 4;
const PANICS: usize = 5;
const SLOW: usize = 6;
/// `CLOSE_CODES.len() + 1` slots, the last for `other`.
const CLOSES: usize = 7;
/// Per callback: one slot per bucket, `+Inf`, then the sum in ns.
const HIST: usize = CLOSES + CLOSE_CODES.len() + 1;
const HIST_LEN: usize = BUCKETS_NS.len() + 2;
const SLOTS: usize = HIST + Cb::ALL.len() * HIST_LEN;

/// One thread's share of a route's counters, on its own cache lines.
#[repr(align(128))]
struct Shard([AtomicU64; SLOTS]);

impl Shard {
    fn new() -> Shard {
        Shard(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// The shard this thread adds to: threads are dealt shards in turn.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// The counters of one route and handler generation. Held by the route's
/// instance; every method is a relaxed atomic add on this thread's shard.
#[derive(Debug)]
pub struct RouteMetrics {
    route: Arc<str>,
    generation: String,
    shards: Box<[Shard; SHARDS]>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shard")
    }
}

/// Every live [`RouteMetrics`], for the scrape. Locked only when an
/// instance is created and at scrape time.
static ROUTES: Mutex<Vec<Weak<RouteMetrics>>> = Mutex::new(Vec::new());

impl RouteMetrics {
    /// The counters for `route` at `generation`: the live ones if another
    /// instance has them (a config change re-inits the same generation, and
    /// one label set must be one series), else new ones.
    pub fn register(route: &Arc<str>, generation: u64) -> Arc<RouteMetrics> {
        let mut all = ROUTES.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        let gen_label = generation.to_string();
        if let Some(m) = all
            .iter()
            .filter_map(Weak::upgrade)
            .find(|m| m.route == *route && m.generation == gen_label)
        {
            return m;
        }
        let m = Arc::new(RouteMetrics {
            route: route.clone(),
            generation: gen_label,
            shards: Box::new(std::array::from_fn(|_| Shard::new())),
        });
        all.push(Arc::downgrade(&m));
        m
    }

    #[inline]
    fn add(&self, slot: usize, n: u64) {
        self.shards[shard_index()].0[slot].fetch_add(n, Ordering::Relaxed);
    }

    fn sum(&self, slot: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[slot].load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    /// A text or binary message of `bytes` payload bytes arrived.
    #[inline]
    pub fn message_in(&self, bytes: usize) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let s = &self.shards[shard_index()].0;
        s[MSG_IN].fetch_add(1, Ordering::Relaxed);
        s[BYTES_IN].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// `n` messages of `bytes` payload bytes in all went out (written by
    /// publishers directly, direct.rs).
    #[inline]
    pub fn messages_out(&self, n: u64, bytes: u64) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let s = &self.shards[shard_index()].0;
        s[MSG_OUT].fetch_add(n, Ordering::Relaxed);
        s[BYTES_OUT].fetch_add(bytes, Ordering::Relaxed);
    }

    /// A text or binary message of `bytes` payload bytes was written.
    #[inline]
    pub fn message_out(&self, bytes: usize) {
        self.messages_out(1, bytes as u64);
    }

    /// A connection was registered (before its `on_open`).
    pub fn opened(&self) {
        self.add(OPENED, 1);
    }

    /// A connection ended with `code`; every [`opened`](Self::opened) gets
    /// exactly one.
    pub fn closed(&self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.add(CLOSES + i, 1);
    }

    /// The slow-consumer policy closed a connection.
    pub fn slow_consumer(&self) {
        self.add(SLOW, 1);
    }

    /// Start of a callback: the time, if durations are being measured.
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        ENABLED.load(Ordering::Relaxed).then(Instant::now)
    }

    /// End of a callback that returned `rc`: counts a panic
    /// (`WSHD_ERR_PANIC`) and records the duration since `started`.
    #[inline]
    pub fn finish(&self, cb: Cb, started: Option<Instant>, rc: i32) {
        if rc == wshd_handler_api::abi::WSHD_ERR_PANIC {
            self.add(PANICS, 1);
        }
        if let Some(t) = started {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let b = BUCKETS_NS
                .iter()
                .position(|&le| ns <= le)
                .unwrap_or(BUCKETS_NS.len());
            let base = HIST + cb as usize * HIST_LEN;
            let s = &self.shards[shard_index()].0;
            s[base + b].fetch_add(1, Ordering::Relaxed);
            s[base + HIST_LEN - 1].fetch_add(ns, Ordering::Relaxed);
        }
    }

    fn labels(&self) -> [(&'static str, &str); 2] {
        [("route", &self.route), ("generation", &self.generation)]
    }
}

/// Whether the per-message counters and callback durations are kept (the
/// admin listener is on).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Starts keeping the per-message counters and callback durations; the
/// admin listener calls it when it starts, so a server without one never
/// reads the clock or touches a shard per message.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Server-wide counters.
struct Global {
    handshakes: [AtomicU64; STATUSES.len() + 1],
    reloads: [AtomicU64; 3],
    load_errors: AtomicU64,
    tls_errors: AtomicU64,
    publishes: AtomicU64,
}

static GLOBAL: Global = Global {
    handshakes: [const { AtomicU64::new(0) }; STATUSES.len() + 1],
    reloads: [const { AtomicU64::new(0) }; 3],
    load_errors: AtomicU64::new(0),
    tls_errors: AtomicU64::new(0),
    publishes: AtomicU64::new(0),
};

/// A WebSocket handshake was answered with `status` (101 when accepted).
pub fn handshake(status: u16) {
    let i = STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len());
    GLOBAL.handshakes[i].fetch_add(1, Ordering::Relaxed);
}

/// A reload (file change, SIGHUP) ended with `result`.
pub fn reload(result: Reload) {
    GLOBAL.reloads[result as usize].fetch_add(1, Ordering::Relaxed);
}

/// A handler library failed to load (refused file, dlopen or descriptor
/// error) or its `init` failed.
pub fn handler_load_error() {
    GLOBAL.load_errors.fetch_add(1, Ordering::Relaxed);
}

/// A TLS handshake failed (for the TLS listener to call).
pub fn tls_handshake_error() {
    GLOBAL.tls_errors.fetch_add(1, Ordering::Relaxed);
}

/// A message was published to a topic.
pub fn publish() {
    GLOBAL.publishes.fetch_add(1, Ordering::Relaxed);
}

/// The collector that reads every counter at scrape time.
#[derive(Debug)]
struct Wshd;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(&[(&str, &str)], u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Wshd {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut routes: Vec<Arc<RouteMetrics>> = ROUTES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        routes.sort_by(|a, b| (&a.route, &a.generation).cmp(&(&b.route, &b.generation)));
        let labels: Vec<[(&str, &str); 2]> = routes.iter().map(|r| r.labels()).collect();
        let per_route = |slot: usize| -> Vec<(&[(&str, &str)], u64)> {
            routes
                .iter()
                .zip(&labels)
                .map(|(r, l)| (&l[..], r.sum(slot)))
                .collect()
        };

        // Opens and closes are read once per scrape: the open gauge is
        // derived from them, so it agrees with the opened and closes
        // counters of the same scrape even while connections come and go.
        let opened = per_route(OPENED);
        let closes: Vec<Vec<u64>> = routes
            .iter()
            .map(|r| (0..=CLOSE_CODES.len()).map(|i| r.sum(CLOSES + i)).collect())
            .collect();
        let mut m = enc.encode_descriptor(
            "wshd_connections_open",
            "Open WebSocket connections.",
            None,
            MetricType::Gauge,
        )?;
        for ((l, opened), closes) in labels.iter().zip(&opened).zip(&closes) {
            let closed = closes.iter().fold(0u64, |a, &n| a.wrapping_add(n));
            let open = opened.1.wrapping_sub(closed) as i64;
            ConstGauge::new(open).encode(m.encode_family(l)?)?;
        }
        counter(
            &mut enc,
            "wshd_connections",
            "WebSocket connections opened (handshake accepted).",
            &opened,
        )?;

        let status_labels: Vec<String> = STATUSES
            .iter()
            .map(u16::to_string)
            .chain(["other".to_owned()])
            .collect();
        let status: Vec<[(&str, &str); 1]> =
            status_labels.iter().map(|s| [("status", &s[..])]).collect();
        let series: Vec<(&[(&str, &str)], u64)> = status
            .iter()
            .zip(&GLOBAL.handshakes)
            .filter(|(s, n)| s[0].1 == "101" || n.load(Ordering::Relaxed) > 0)
            .map(|(s, n)| (&s[..], n.load(Ordering::Relaxed)))
            .collect();
        counter(
            &mut enc,
            "wshd_handshakes",
            "WebSocket handshake attempts by HTTP status answered (101: accepted).",
            &series,
        )?;

        for (name, help, slot) in [
            (
                "wshd_messages_received",
                "Text and binary messages received.",
                MSG_IN,
            ),
            (
                "wshd_messages_sent",
                "Text and binary messages written to clients.",
                MSG_OUT,
            ),
            (
                "wshd_bytes_received",
                "Payload bytes of the messages received.",
                BYTES_IN,
            ),
            (
                "wshd_bytes_sent",
                "Payload bytes of the messages written to clients.",
                BYTES_OUT,
            ),
        ] {
            counter(&mut enc, name, help, &per_route(slot))?;
        }

        let code_labels: Vec<String> = CLOSE_CODES
            .iter()
            .map(u16::to_string)
            .chain(["other".to_owned()])
            .collect();
        let mut close_labels: Vec<([(&str, &str); 3], u64)> = Vec::new();
        for (l, closes) in labels.iter().zip(&closes) {
            for (code, &n) in code_labels.iter().zip(closes) {
                if n > 0 {
                    close_labels.push(([l[0], l[1], ("code", code)], n));
                }
            }
        }
        let series: Vec<(&[(&str, &str)], u64)> =
            close_labels.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(
            &mut enc,
            "wshd_closes",
            "Connections ended, by close code (1006: dropped without a close frame).",
            &series,
        )?;

        counter(
            &mut enc,
            "wshd_handler_panics",
            "Handler callbacks that panicked (WSHD_ERR_PANIC).",
            &per_route(PANICS),
        )?;

        let mut m = enc.encode_descriptor(
            "wshd_callback_duration",
            "Time spent in handler callbacks (measured while the admin listener is on).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (r, l) in routes.iter().zip(&labels) {
            for cb in Cb::ALL {
                let base = HIST + cb as usize * HIST_LEN;
                let mut buckets = Vec::with_capacity(BUCKETS_NS.len() + 1);
                let mut count = 0u64;
                for (i, le) in BUCKETS_NS
                    .iter()
                    .map(|&ns| ns as f64 / 1e9)
                    .chain([f64::INFINITY])
                    .enumerate()
                {
                    let n = r.sum(base + i);
                    count = count.wrapping_add(n);
                    buckets.push((le, n));
                }
                let sum = r.sum(base + HIST_LEN - 1) as f64 / 1e9;
                let set = [l[0], l[1], ("callback", cb.label())];
                m.encode_family(&set)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }

        counter(
            &mut enc,
            "wshd_slow_consumer_closes",
            "Connections closed by the slow-consumer policy (1008).",
            &per_route(SLOW),
        )?;

        let results = [
            ("ok", Reload::Ok),
            ("partial", Reload::Partial),
            ("failed", Reload::Failed),
        ];
        let result_labels: Vec<[(&str, &str); 1]> =
            results.iter().map(|(s, _)| [("result", *s)]).collect();
        let series: Vec<(&[(&str, &str)], u64)> = result_labels
            .iter()
            .zip(&results)
            .map(|(l, (_, r))| (&l[..], GLOBAL.reloads[*r as usize].load(Ordering::Relaxed)))
            .collect();
        counter(
            &mut enc,
            "wshd_reloads",
            "Reloads (file changes, SIGHUP) by result.",
            &series,
        )?;

        let none: &[(&str, &str)] = &[];
        for (name, help, v) in [
            (
                "wshd_handler_load_errors",
                "Handler libraries refused or failed to load, and failed inits.",
                &GLOBAL.load_errors,
            ),
            (
                "wshd_tls_handshake_errors",
                "TLS handshakes that failed.",
                &GLOBAL.tls_errors,
            ),
            (
                "wshd_publishes",
                "Messages published to topics.",
                &GLOBAL.publishes,
            ),
        ] {
            counter(&mut enc, name, help, &[(none, v.load(Ordering::Relaxed))])?;
        }
        let mut m =
            enc.encode_descriptor("wshd_topics", "Topics that exist.", None, MetricType::Gauge)?;
        // Read from the topic map itself, which counts live topics exactly.
        ConstGauge::new(crate::topics::global().len() as i64).encode(m.encode_family(&none)?)?;
        // `[cluster]` only: what the link to Redis dropped and holds.
        if let Some(link) = crate::topics::global().cluster() {
            let reasons = [
                (
                    "queue_bytes",
                    link.stats.dropped_for_bytes.load(Ordering::Relaxed),
                ),
                ("other", {
                    let all = link.stats.dropped.load(Ordering::Relaxed);
                    all.saturating_sub(link.stats.dropped_for_bytes.load(Ordering::Relaxed))
                }),
            ];
            let labels: Vec<[(&str, &str); 1]> =
                reasons.iter().map(|(r, _)| [("reason", *r)]).collect();
            let series: Vec<(&[(&str, &str)], u64)> = labels
                .iter()
                .zip(&reasons)
                .map(|(l, (_, v))| (&l[..], *v))
                .collect();
            counter(
                &mut enc,
                "wshd_cluster_dropped",
                "Messages for other nodes dropped: over [cluster] queue_bytes, or for another \
                 reason (Redis down, the queue's message cap).",
                &series,
            )?;
            let mut m = enc.encode_descriptor(
                "wshd_cluster_queued_bytes",
                "Bytes of messages waiting for Redis or in a pipeline not yet answered.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(link.queued_bytes() as i64).encode(m.encode_family(&none)?)?;
        }
        Ok(())
    }
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric, in the OpenMetrics text format (which Prometheus scrapes).
pub fn render() -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Wshd));
    let mut out = String::with_capacity(8 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        // Writing to a String cannot fail; say so rather than serve half.
        out.clear();
        let _ = writeln!(out, "# metrics encoding failed\n# EOF");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_cache_line_aligned() {
        assert_eq!(std::mem::align_of::<Shard>(), 128);
        assert_eq!(std::mem::size_of::<Shard>() % 128, 0);
    }

    #[test]
    fn counters_sum_across_threads_and_render() {
        let route: Arc<str> = "/metrics-unit-test".into();
        let m = RouteMetrics::register(&route, 7);
        // The same route and generation is one series.
        assert!(Arc::ptr_eq(&m, &RouteMetrics::register(&route, 7)));
        enable();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        m.message_in(3);
                        m.message_out(5);
                    }
                });
            }
        });
        m.opened();
        m.opened();
        m.closed(4999);
        m.finish(
            Cb::Message,
            Some(Instant::now()),
            wshd_handler_api::abi::WSHD_ERR_PANIC,
        );
        let text = render();
        let l = r#"{route="/metrics-unit-test",generation="7"}"#;
        for want in [
            format!("wshd_messages_received_total{l} 400"),
            format!("wshd_bytes_received_total{l} 1200"),
            format!("wshd_messages_sent_total{l} 400"),
            format!("wshd_bytes_sent_total{l} 2000"),
            format!("wshd_connections_total{l} 2"),
            format!("wshd_connections_open{l} 1"),
            format!("wshd_handler_panics_total{l} 1"),
            r#"wshd_closes_total{route="/metrics-unit-test",generation="7",code="other"} 1"#
                .to_owned(),
            r#"wshd_callback_duration_seconds_count{route="/metrics-unit-test",generation="7",callback="on_message"} 1"#.to_owned(),
        ] {
            assert!(text.contains(&want), "missing {want} in:\n{text}");
        }
        assert!(!text.contains("4999"), "{text}");
        drop(m);
        assert!(!render().contains("/metrics-unit-test"));
    }

    #[test]
    fn unknown_statuses_are_other() {
        handshake(299);
        assert!(render().contains(r#"wshd_handshakes_total{status="other"}"#));
    }
}
