//! `fanout`: one publisher and N subscribers on a chat route, where the server
//! broadcasts every message to every connection on the route, the sender
//! included.
//!
//! The publisher sends at a fixed rate; each message carries its sequence
//! number and send time, and the publisher ends with a marker message so
//! every receiver knows when it has seen everything.
//!
//! Metrics: `published_in_window`, `receivers` (subscribers plus the
//! publisher's own copy), `delivered` (copies of in-window messages that
//! arrived), `delivered_per_s`, `lost` (expected − delivered; any loss is an
//! error), `lat_p50_us`/`lat_p99_us`/`lat_max_us` (publish to receipt), and
//! with a server pid `cpu_us_per_delivery`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::time::{Instant, MissedTickBehavior, interval, timeout_at};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Timeline, dial_all, join_all, sample_window, small_client_config};
use crate::latency::Latency;
use crate::probe::Probe;
use crate::record::{Failures, Record};
use crate::target::Target;

/// Text of the marker that ends a run; real messages start with a hex digit.
const END_MARKER: &str = "end-of-run";

/// Parameters of a fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutParams {
    /// Subscribers besides the publisher (N).
    pub subscribers: usize,
    /// Messages the publisher sends per second.
    pub rate: f64,
    /// Message size in bytes (at least the 34-byte header).
    pub size: usize,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Connections opened at once while setting up.
    pub connect_concurrency: usize,
    /// Where the subscribers connect, if not to the publisher's URL: another
    /// wshd node of a `[cluster]`, so every delivery crosses Redis.
    pub subscriber_url: Option<String>,
}

/// Runs the fan-out workload against `target`, which must be a chat route.
pub async fn run(target: Arc<Target>, params: &FanoutParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("fanout", &target.url);
    record
        .param("subscribers", params.subscribers)
        .param("rate", params.rate)
        .param("size", params.size)
        .param("duration_s", params.duration.as_secs_f64())
        .param("warmup_s", params.warmup.as_secs_f64());

    let (mut clients, mut failures) = match &params.subscriber_url {
        None => {
            dial_all(
                &target,
                &target.url,
                params.subscribers + 1,
                params.connect_concurrency,
                small_client_config(),
            )
            .await
        }
        Some(sub_url) => {
            record.param("subscriber_url", sub_url.as_str());
            // The publisher first (it stays at index 0), then the remote
            // subscribers.
            let (mut clients, failures) =
                dial_all(&target, &target.url, 1, 1, small_client_config()).await;
            let (subs, f) = dial_all(
                &target,
                sub_url,
                params.subscribers,
                params.connect_concurrency,
                small_client_config(),
            )
            .await;
            clients.extend(subs);
            record.absorb(f);
            (clients, failures)
        }
    };
    if clients.len() < 2 {
        failures.error("fewer than two connections on the chat route");
        record.absorb(failures);
        return record;
    }
    // Across nodes, only the remote copies are measured: the publisher's
    // own copy (delivered by its node) is read but not counted.
    let cross = params.subscriber_url.is_some();
    let receivers = clients.len() - usize::from(cross);
    record.metric("receivers", receivers as f64);
    let publisher = clients.swap_remove(0);
    let (mut sink, own_copies) = publisher.split();

    let timeline = Timeline::starting_now(params.warmup, params.duration);
    let origin = Instant::now();
    let shape = Shape {
        origin,
        timeline,
        size: params.size,
    };
    let own = tokio::spawn(receive(own_copies, shape));
    let (mut handles, own) = if cross {
        (Vec::new(), Some(own))
    } else {
        (vec![own], None)
    };
    handles.extend(
        clients
            .into_iter()
            .map(|client| tokio::spawn(receive(client, shape))),
    );
    let cpu = sample_window(probe, timeline);

    let mut ticker = interval(Duration::from_secs_f64(1.0 / params.rate.max(0.001)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut published_in_window = 0u64;
    let mut seq = 0u64;
    loop {
        let tick = ticker.tick().await;
        if tick >= timeline.measure_end {
            break;
        }
        let sent_at = Instant::now();
        let text = shape.message(seq, sent_at);
        if let Err(error) = sink.send(Message::text(text)).await {
            failures.error(format!("publish: {error}"));
            break;
        }
        if timeline.in_window(sent_at) {
            published_in_window += 1;
        }
        seq += 1;
    }
    if let Err(error) = sink.send(Message::text(END_MARKER)).await {
        failures.error(format!("publish end marker: {error}"));
    }

    let outcomes: Vec<ReceiverOutcome> = join_all(handles, &mut failures).await;
    if let Some(own) = own {
        let _ = own.await;
    }
    let _ = sink.close().await;
    let mut latency = Latency::default();
    for outcome in outcomes {
        latency.merge(&outcome.latency);
        failures.merge(outcome.failures);
    }
    let delivered = latency.len();
    let expected = published_in_window * receivers as u64;
    let lost = expected.saturating_sub(delivered);
    record
        .metric("published", seq as f64)
        .metric("published_in_window", published_in_window as f64)
        .metric("delivered", delivered as f64)
        .metric(
            "delivered_per_s",
            delivered as f64 / timeline.window().as_secs_f64(),
        )
        .metric("lost", lost as f64);
    if !latency.is_empty() {
        record
            .metric("lat_p50_us", latency.quantile_us(0.50))
            .metric("lat_p99_us", latency.quantile_us(0.99))
            .metric("lat_max_us", latency.max_us());
    }
    if let Ok(Some(window)) = cpu.await {
        window.report(&mut record, "delivery", delivered);
    }
    if lost > 0 {
        failures.error(format!(
            "{lost} of {expected} broadcast copies never arrived"
        ));
    }
    if delivered == 0 {
        failures.error("no broadcast arrived inside the measured window");
    }
    record.absorb(failures);
    record
}

/// The message format shared by the publisher and the receivers.
#[derive(Debug, Clone, Copy)]
struct Shape {
    origin: Instant,
    timeline: Timeline,
    size: usize,
}

impl Shape {
    /// `SEQ SENT_US ` in fixed-width hex, padded with `x` to `size`.
    fn message(&self, seq: u64, sent_at: Instant) -> String {
        let micros = (sent_at - self.origin).as_micros() as u64;
        let mut text = format!("{seq:016x} {micros:016x} ");
        while text.len() < self.size {
            text.push('x');
        }
        text
    }

    /// Returns the sequence number and send time of a well-formed message.
    fn parse(&self, text: &str) -> Option<(u64, Instant)> {
        let seq = u64::from_str_radix(text.get(0..16)?, 16).ok()?;
        let micros = u64::from_str_radix(text.get(17..33)?, 16).ok()?;
        let padding_ok = text.len() == self.size.max(34) && text[34..].bytes().all(|b| b == b'x');
        padding_ok.then(|| (seq, self.origin + Duration::from_micros(micros)))
    }
}

#[derive(Debug, Default)]
struct ReceiverOutcome {
    latency: Latency,
    failures: Failures,
}

/// Reads broadcasts until the end marker, checking order and content.
async fn receive<S>(mut stream: S, shape: Shape) -> ReceiverOutcome
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut outcome = ReceiverOutcome::default();
    let mut expected_seq = 0u64;
    loop {
        let text = match timeout_at(shape.timeline.deadline, stream.next()).await {
            Err(_) => {
                outcome.failures.error("timed out waiting for broadcasts");
                break;
            }
            Ok(None) => {
                outcome
                    .failures
                    .error("connection ended before the end marker");
                break;
            }
            Ok(Some(Err(error))) => {
                outcome.failures.error(format!("receive: {error}"));
                break;
            }
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(frame)))) => {
                outcome.failures.error(format!("server closed: {frame:?}"));
                break;
            }
            Ok(Some(Ok(Message::Binary(_)))) => {
                outcome
                    .failures
                    .mismatch("text broadcast arrived as binary");
                continue;
            }
            Ok(Some(Ok(_))) => continue,
        };
        if text.as_str() == END_MARKER {
            break;
        }
        let now = Instant::now();
        match shape.parse(&text) {
            Some((seq, sent_at)) => {
                if seq != expected_seq {
                    outcome
                        .failures
                        .mismatch(format!("expected broadcast {expected_seq}, got {seq}"));
                }
                expected_seq = seq + 1;
                if shape.timeline.in_window(sent_at) {
                    outcome.latency.record(now - sent_at);
                }
            }
            None => outcome.failures.mismatch("malformed broadcast"),
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_back() {
        let origin = Instant::now();
        let shape = Shape {
            origin,
            timeline: Timeline::starting_now(Duration::ZERO, Duration::from_secs(1)),
            size: 64,
        };
        let sent = origin + Duration::from_micros(1234);
        let text = shape.message(42, sent);
        assert_eq!(text.len(), 64);
        assert_eq!(shape.parse(&text), Some((42, sent)));
        assert_eq!(shape.parse(&text[..60]), None);
        assert_eq!(shape.parse(END_MARKER), None);
    }
}
