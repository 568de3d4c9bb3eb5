//! The load shapes. Each is an async function that takes a [`Target`], its
//! parameters and an optional server [`Probe`], runs for a bounded time and
//! number of connections, and returns a [`Record`].
//!
//! Every workload follows the same timeline: connect, warm up, measure for a
//! fixed window while sampling the server's CPU at both ends, then drain with
//! a deadline. CPU per message is the server's CPU time in the window divided
//! by the messages completed in the same window.

pub mod connect;
pub mod deflate;
pub mod echo;
pub mod fanout;
pub mod handshake;

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::probe::{Probe, Sample};
use crate::record::{Failures, Record};
use crate::target::{Client, Target};

/// How long one connection attempt (TCP plus handshake) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the drain after the window may take before it counts as a stall.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The phases of a measured run, fixed before the first message.
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// When the measured window opens (after the warm-up).
    pub measure_start: Instant,
    /// When it closes; no new work starts after this.
    pub measure_end: Instant,
    /// Hard limit for draining in-flight work.
    pub deadline: Instant,
}

impl Timeline {
    /// A timeline starting now.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Timeline {
        let measure_start = Instant::now() + warmup;
        let measure_end = measure_start + duration;
        Timeline {
            measure_start,
            measure_end,
            deadline: measure_end + DRAIN_TIMEOUT,
        }
    }

    /// True when `at` lies inside the measured window.
    pub fn in_window(&self, at: Instant) -> bool {
        at >= self.measure_start && at <= self.measure_end
    }

    /// Length of the measured window.
    pub fn window(&self) -> Duration {
        self.measure_end - self.measure_start
    }
}

/// Opens `count` connections to `url`, at most `concurrency` at a time.
/// Returns the connections that succeeded and the failures of the rest.
pub async fn dial_all(
    target: &Target,
    url: &str,
    count: usize,
    concurrency: usize,
    config: WebSocketConfig,
) -> (Vec<Client>, Failures) {
    let mut failures = Failures::default();
    let mut clients = Vec::with_capacity(count);
    let mut attempts = stream::iter(0..count)
        .map(|_| async move { timeout(DIAL_TIMEOUT, target.dial(url, config)).await })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = attempts.next().await {
        match result {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(error)) => failures.error(format!("{error:#}")),
            Err(_) => failures.error(format!("dialing {url} timed out")),
        }
    }
    (clients, failures)
}

/// Samples the server at both ends of the measured window, in the background.
pub fn sample_window(probe: Option<Probe>, timeline: Timeline) -> JoinHandle<Option<CpuWindow>> {
    tokio::spawn(async move {
        let probe = probe?;
        sleep_until(timeline.measure_start).await;
        let before = probe.sample().ok()?;
        sleep_until(timeline.measure_end).await;
        let after = probe.sample().ok()?;
        Some(CpuWindow {
            probe,
            before,
            after,
        })
    })
}

/// Server counters at both ends of the measured window.
#[derive(Debug, Clone, Copy)]
pub struct CpuWindow {
    probe: Probe,
    /// Reading when the window opened.
    pub before: Sample,
    /// Reading when it closed.
    pub after: Sample,
}

impl CpuWindow {
    /// Adds `server_cpu_s` and `cpu_us_per_<unit>` (server CPU divided by
    /// `count`) to the record.
    pub fn report(&self, record: &mut Record, unit: &str, count: u64) {
        let cpu = self
            .probe
            .cpu_between(self.before, self.after)
            .as_secs_f64();
        record.metric("server_cpu_s", cpu);
        if count > 0 {
            record.metric(&format!("cpu_us_per_{unit}"), cpu * 1e6 / count as f64);
        }
    }
}

/// The client's smallest read chunk.
const SMALL_CHUNK: usize = 4096;

/// A small client read buffer, for workloads that hold many idle sockets.
pub fn small_client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(SMALL_CHUNK)
}

/// A client read buffer sized to the messages it will read: one message
/// (with its largest header) per read, at least [`SMALL_CHUNK`], at most
/// tungstenite's default of 128 KiB.
///
/// tungstenite zeroes the free part of its read buffer before every read, so
/// with the default 128 KiB a 32-byte echo cost the load generator a 128 KiB
/// memset per message: a third of its CPU. That made it the bottleneck of
/// the small-message workloads, and the servers spent their time waiting
/// for it.
pub fn echo_client_config(message_size: usize) -> WebSocketConfig {
    const MAX_HEADER: usize = 14;
    let chunk = (message_size + MAX_HEADER)
        .next_power_of_two()
        .clamp(SMALL_CHUNK, 128 * 1024);
    WebSocketConfig::default().read_buffer_size(chunk)
}

/// Joins tasks, turning a panicked task into an error instead of a crash.
pub async fn join_all<T: Default>(handles: Vec<JoinHandle<T>>, failures: &mut Failures) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(value) => results.push(value),
            Err(error) => {
                failures.error(format!("connection task failed: {error}"));
                results.push(T::default());
            }
        }
    }
    results
}

/// After the connections were held: the server's RSS before and after,
/// and its growth per connection (`rss_kib_per_conn`), for the idle-memory
/// workloads. `before` is the sample taken before the first connection.
pub(crate) fn record_rss_growth(
    record: &mut Record,
    failures: &mut Failures,
    probe: Option<Probe>,
    before: Option<std::io::Result<Sample>>,
    connected: usize,
) {
    let (Some(probe), Some(Ok(before))) = (probe, before) else {
        return;
    };
    match probe.sample() {
        Ok(after) => {
            record
                .metric("rss_before_kib", before.rss_kib as f64)
                .metric("rss_after_kib", after.rss_kib as f64);
            if connected > 0 {
                let delta = after.rss_kib as f64 - before.rss_kib as f64;
                record.metric("rss_kib_per_conn", delta / connected as f64);
            }
        }
        Err(error) => failures.error(format!("reading server memory: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::echo_client_config;

    #[test]
    fn echo_client_reads_one_message_per_chunk_within_bounds() {
        let chunk = |size| echo_client_config(size).read_buffer_size;
        assert_eq!(chunk(32), 4096, "small messages: the 4 KiB floor");
        assert_eq!(chunk(4096), 8192, "a message and its header fit");
        assert_eq!(
            chunk(65536),
            128 * 1024,
            "64 KiB keeps tungstenite's default"
        );
        assert_eq!(chunk(1 << 20), 128 * 1024, "never above the default");
    }
}
