//! `handshake`: workers connect, echo one message, close and start over, as
//! fast as they can.
//!
//! Metrics: `handshakes` and `handshakes_per_s` (cycles finished inside the
//! window), `cycle_p50_us`/`cycle_p99_us` (one whole cycle), and with a server
//! pid `cpu_us_per_handshake`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use super::echo::next_data;
use super::{Timeline, join_all, sample_window, small_client_config};
use crate::latency::Latency;
use crate::probe::Probe;
use crate::record::{Failures, Record};
use crate::target::Target;

/// Parameters of a handshake run.
#[derive(Debug, Clone)]
pub struct HandshakeParams {
    /// Workers cycling in parallel.
    pub concurrency: usize,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
}

/// Runs the handshake workload.
pub async fn run(target: Arc<Target>, params: &HandshakeParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("handshake", &target.url);
    record
        .param("concurrency", params.concurrency)
        .param("duration_s", params.duration.as_secs_f64())
        .param("warmup_s", params.warmup.as_secs_f64());

    let timeline = Timeline::starting_now(params.warmup, params.duration);
    let cpu = sample_window(probe, timeline);
    let mut failures = Failures::default();
    let handles = (0..params.concurrency.max(1))
        .map(|worker| tokio::spawn(worker_loop(Arc::clone(&target), worker, timeline)))
        .collect();
    let outcomes: Vec<WorkerOutcome> = join_all(handles, &mut failures).await;

    let mut cycles = Latency::default();
    for outcome in outcomes {
        cycles.merge(&outcome.cycles);
        failures.merge(outcome.failures);
    }
    let count = cycles.len();
    record.metric("handshakes", count as f64).metric(
        "handshakes_per_s",
        count as f64 / timeline.window().as_secs_f64(),
    );
    if !cycles.is_empty() {
        record
            .metric("cycle_p50_us", cycles.quantile_us(0.50))
            .metric("cycle_p99_us", cycles.quantile_us(0.99));
    }
    if let Ok(Some(window)) = cpu.await {
        window.report(&mut record, "handshake", count);
    }
    if count == 0 {
        failures.error("no handshake completed inside the measured window");
    }
    record.absorb(failures);
    record
}

#[derive(Debug, Default)]
struct WorkerOutcome {
    cycles: Latency,
    failures: Failures,
}

/// One worker: cycle until the window closes. A failed cycle is counted and
/// the worker goes on, so one refused connection does not end the run.
async fn worker_loop(target: Arc<Target>, worker: usize, timeline: Timeline) -> WorkerOutcome {
    let mut outcome = WorkerOutcome::default();
    let mut cycle = 0u64;
    while Instant::now() < timeline.measure_end {
        let started = Instant::now();
        let text = format!("handshake {worker:>6} {cycle:>16}");
        match timeout_at(timeline.deadline, one_cycle(&target, &text)).await {
            Ok(Ok(())) => {
                let finished = Instant::now();
                if timeline.in_window(finished) {
                    outcome.cycles.record(finished - started);
                }
            }
            Ok(Err(problem)) => outcome.failures.error(problem),
            Err(_) => {
                outcome.failures.error("handshake cycle timed out");
                break;
            }
        }
        cycle += 1;
    }
    outcome
}

/// Connect, echo `text`, close, and wait for the server's side of the close.
async fn one_cycle(target: &Target, text: &str) -> Result<(), String> {
    let mut client = target
        .dial(&target.url, small_client_config())
        .await
        .map_err(|e| format!("{e:#}"))?;
    client
        .send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    match next_data(&mut client).await? {
        Message::Text(echo) if echo.as_str() == text => {}
        other => return Err(format!("wrong echo {other:?}")),
    }
    client
        .close(None)
        .await
        .map_err(|e| format!("close: {e}"))?;
    // Read until the server's close frame (or end of stream) arrives.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
    Ok(())
}
