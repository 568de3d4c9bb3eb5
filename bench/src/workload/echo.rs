//! `echo`: C connections each keep P messages of S bytes in flight and check
//! every echo byte for byte.
//!
//! Metrics: `msgs` and `msgs_per_s` (echoes received in the window),
//! `rtt_p50_us`, `rtt_p99_us`, `rtt_max_us`, and with a server pid
//! `server_cpu_s` and `cpu_us_per_msg`.
//!
//! With a `rate`, each connection sends at most that many messages per
//! second, evenly spaced and out of phase with the other connections: the
//! regime of a server that is not saturated, where every message may find
//! the server asleep. Without one, every echo is answered at once and
//! the client's speed sets the pace.
//!
//! Each message starts with its sequence number in hex and continues with a
//! per-connection filler, so an echo can be checked without keeping a copy:
//! the server must return messages in order, with the same type and bytes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use super::{Timeline, dial_all, echo_client_config, join_all, sample_window};
use crate::latency::Latency;
use crate::probe::Probe;
use crate::record::{Failures, Record};
use crate::target::{Client, Target};

/// Parameters of an echo run.
#[derive(Debug, Clone)]
pub struct EchoParams {
    /// Number of connections (C).
    pub connections: usize,
    /// Message size in bytes (S).
    pub size: usize,
    /// Binary messages instead of text.
    pub binary: bool,
    /// Messages in flight per connection (P).
    pub in_flight: usize,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Length of the measured window (D).
    pub duration: Duration,
    /// Connections opened at once while setting up.
    pub connect_concurrency: usize,
    /// Messages per second per connection; `None` sends as fast as echoes
    /// come back.
    pub rate: Option<f64>,
}

/// Runs the echo workload.
pub async fn run(target: &Target, params: &EchoParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("echo", &target.url);
    record
        .param("connections", params.connections)
        .param("size", params.size)
        .param("binary", params.binary)
        .param("in_flight", params.in_flight)
        .param("duration_s", params.duration.as_secs_f64())
        .param("warmup_s", params.warmup.as_secs_f64());
    if let Some(rate) = params.rate {
        record.param("rate_per_conn", rate);
    }

    let (clients, mut failures) = dial_all(
        target,
        &target.url,
        params.connections,
        params.connect_concurrency,
        echo_client_config(params.size),
    )
    .await;
    record.metric("connected", clients.len() as f64);

    let timeline = Timeline::starting_now(params.warmup, params.duration);
    let cpu = sample_window(probe, timeline);
    let shape = Arc::new(Shape {
        size: params.size,
        binary: params.binary,
        in_flight: params.in_flight.max(1),
        period: params.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
    });
    let handles = clients
        .into_iter()
        .enumerate()
        .map(|(id, client)| {
            let pacer = shape
                .period
                .map(|period| Pacer::new(period, id, params.connections));
            tokio::spawn(connection(client, id, shape.clone(), pacer, timeline))
        })
        .collect();
    let results: Vec<ConnOutcome> = join_all(handles, &mut failures).await;

    let mut latency = Latency::default();
    for outcome in results {
        latency.merge(&outcome.latency);
        failures.merge(outcome.failures);
    }
    let msgs = latency.len();
    record
        .metric("msgs", msgs as f64)
        .metric("msgs_per_s", msgs as f64 / timeline.window().as_secs_f64());
    if !latency.is_empty() {
        record
            .metric("rtt_p50_us", latency.quantile_us(0.50))
            .metric("rtt_p99_us", latency.quantile_us(0.99))
            .metric("rtt_max_us", latency.max_us());
    }
    if let Ok(Some(window)) = cpu.await {
        window.report(&mut record, "msg", msgs);
    }
    if msgs == 0 {
        failures.error("no echo completed inside the measured window");
    }
    record.absorb(failures);
    record
}

/// What every connection sends.
#[derive(Debug)]
struct Shape {
    size: usize,
    binary: bool,
    in_flight: usize,
    /// Time between a connection's sends, when paced.
    period: Option<Duration>,
}

/// When a paced connection sends next.
#[derive(Debug)]
struct Pacer {
    period: Duration,
    next: Instant,
}

impl Pacer {
    /// Connection `id` starts at its own fraction of the first period, so
    /// the connections' sends spread evenly instead of arriving together.
    /// `id` is below `connections`.
    fn new(period: Duration, id: usize, connections: usize) -> Pacer {
        let phase = period.mul_f64(id as f64 / connections as f64);
        Pacer {
            period,
            next: Instant::now() + phase,
        }
    }

    /// Waits for the next send slot and returns true, or returns false at
    /// once if that slot is not before `end`, so a slow rate never waits
    /// past the window. A connection that fell behind (a slow echo) sends at
    /// once but does not burst to catch up.
    async fn wait(&mut self, end: Instant) -> bool {
        let now = Instant::now();
        if self.next > now {
            if self.next >= end {
                return false;
            }
            tokio::time::sleep_until(self.next).await;
            self.next += self.period;
        } else {
            self.next = now + self.period;
        }
        true
    }
}

/// What one connection measured.
#[derive(Debug, Default)]
struct ConnOutcome {
    latency: Latency,
    failures: Failures,
}

/// Drives one connection: keeps `in_flight` messages outstanding until the
/// window closes, then drains and closes.
async fn connection(
    mut client: Client,
    id: usize,
    shape: Arc<Shape>,
    mut pacer: Option<Pacer>,
    timeline: Timeline,
) -> ConnOutcome {
    let mut outcome = ConnOutcome::default();
    let payload = Payload::new(id, shape.size);
    let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::with_capacity(shape.in_flight);
    let mut next_seq = 0u64;

    for _ in 0..shape.in_flight {
        let message = payload.message(next_seq, shape.binary);
        let sent = match &mut pacer {
            // Paced: each message leaves at its own slot, not with the flush.
            Some(pacer) => {
                if !pacer.wait(timeline.measure_end).await {
                    break;
                }
                client.send(message).await
            }
            None => client.feed(message).await,
        };
        if let Err(error) = sent {
            outcome.failures.error(format!("send: {error}"));
            return outcome;
        }
        outstanding.push_back((next_seq, Instant::now()));
        next_seq += 1;
    }
    if let Err(error) = client.flush().await {
        outcome.failures.error(format!("send: {error}"));
        return outcome;
    }

    while let Some((seq, sent_at)) = outstanding.pop_front() {
        let received = match timeout_at(timeline.deadline, next_data(&mut client)).await {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => {
                outcome.failures.error(error);
                return outcome;
            }
            Err(_) => {
                outcome.failures.error("timed out waiting for an echo");
                return outcome;
            }
        };
        let now = Instant::now();
        if let Err(problem) = payload.check(seq, shape.binary, &received) {
            outcome.failures.mismatch(problem);
        } else if timeline.in_window(now) {
            outcome.latency.record(now - sent_at);
        }
        let slot = match &mut pacer {
            Some(pacer) => pacer.wait(timeline.measure_end).await,
            None => true,
        };
        if slot && Instant::now() < timeline.measure_end {
            if let Err(error) = client.send(payload.message(next_seq, shape.binary)).await {
                outcome.failures.error(format!("send: {error}"));
                return outcome;
            }
            outstanding.push_back((next_seq, Instant::now()));
            next_seq += 1;
        }
    }
    // A slow close is the server's business, not part of the figures.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close(None)).await;
    outcome
}

/// Reads the next text or binary message, skipping control frames.
pub(crate) async fn next_data(client: &mut Client) -> Result<Message, String> {
    loop {
        match client.next().await {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => return Ok(message),
            Some(Ok(Message::Close(frame))) => return Err(format!("server closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(format!("receive: {error}")),
            None => return Err("connection ended".to_owned()),
        }
    }
}

/// The bytes of one connection's messages: a hex sequence header followed by
/// filler that differs per connection.
#[derive(Debug)]
pub(crate) struct Payload {
    filler: Vec<u8>,
}

impl Payload {
    /// Width of the sequence header; shorter messages carry a truncated one.
    const HEADER: usize = 16;

    pub(crate) fn new(id: usize, size: usize) -> Payload {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let filler = (0..size)
            .map(|i| ALPHABET[(i.wrapping_mul(7) + id.wrapping_mul(13)) % ALPHABET.len()])
            .collect();
        Payload { filler }
    }

    fn header(seq: u64) -> [u8; Self::HEADER] {
        let mut header = [0u8; Self::HEADER];
        let hex = format!("{seq:016x}");
        header.copy_from_slice(hex.as_bytes());
        header
    }

    /// The message with sequence number `seq`.
    pub(crate) fn message(&self, seq: u64, binary: bool) -> Message {
        let mut bytes = self.filler.clone();
        let header_len = Self::HEADER.min(bytes.len());
        bytes[..header_len].copy_from_slice(&Self::header(seq)[..header_len]);
        if binary {
            Message::binary(bytes)
        } else {
            Message::text(String::from_utf8(bytes).expect("payload is ASCII"))
        }
    }

    /// Checks that `received` is exactly message `seq`.
    pub(crate) fn check(&self, seq: u64, binary: bool, received: &Message) -> Result<(), String> {
        let (bytes, was_binary): (&[u8], bool) = match received {
            Message::Binary(data) => (data.as_ref(), true),
            Message::Text(text) => (text.as_bytes(), false),
            other => return Err(format!("unexpected frame {other:?}")),
        };
        if was_binary != binary {
            return Err(format!(
                "seq {seq}: sent {} but got the other type back",
                kind(binary)
            ));
        }
        if bytes.len() != self.filler.len() {
            return Err(format!(
                "seq {seq}: sent {} bytes, got {}",
                self.filler.len(),
                bytes.len()
            ));
        }
        let header_len = Self::HEADER.min(bytes.len());
        let header_ok = bytes[..header_len] == Self::header(seq)[..header_len];
        if !header_ok || bytes[header_len..] != self.filler[header_len..] {
            return Err(format!("seq {seq}: echoed bytes differ from the sent ones"));
        }
        Ok(())
    }
}

fn kind(binary: bool) -> &'static str {
    if binary { "binary" } else { "text" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_checks_against_itself_only() {
        let payload = Payload::new(3, 32);
        let message = payload.message(7, false);
        assert_eq!(message.len(), 32);
        assert!(payload.check(7, false, &message).is_ok());
        assert!(payload.check(8, false, &message).is_err());
        assert!(payload.check(7, true, &message).is_err());
        let other = Payload::new(4, 32);
        assert!(other.check(7, false, &message).is_err());
    }

    #[test]
    fn tiny_and_large_binary_messages_round_trip() {
        for size in [1, 15, 16, 17, 65536] {
            let payload = Payload::new(0, size);
            let message = payload.message(u64::MAX - 1, true);
            assert_eq!(message.len(), size);
            assert!(payload.check(u64::MAX - 1, true, &message).is_ok());
        }
    }
}
