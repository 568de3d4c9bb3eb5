//! `connect`: open N connections, hold them idle, and see what they cost the
//! server.
//!
//! Metrics: `connected`, `conn_per_s` (connections established per second of
//! set-up), and with a server pid `rss_before_kib`, `rss_after_kib` and
//! `rss_kib_per_conn` ((after − before) ÷ connected). After the memory reading
//! a sample of the held connections does one echo each, so a server that
//! silently dropped idle sockets fails the run (`alive_checked`).

use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::{self, StreamExt};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use super::echo::next_data;
use super::{dial_all, record_rss_growth, small_client_config};
use crate::probe::Probe;
use crate::record::Record;
use crate::target::{Client, Target};

/// How many held connections are checked with an echo at the end.
const ALIVE_SAMPLE: usize = 100;

/// Parameters of a connect run.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Connections to open (N).
    pub connections: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// How long to hold them idle before reading the server's memory.
    pub hold: Duration,
    /// Send one echo on a sample of connections after the hold.
    pub check_alive: bool,
}

/// Runs the connect workload.
pub async fn run(target: &Target, params: &ConnectParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("connect", &target.url);
    record
        .param("connections", params.connections)
        .param("concurrency", params.concurrency)
        .param("hold_s", params.hold.as_secs_f64())
        .param(
            "sources",
            target
                .sources()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );

    let before = probe.map(|p| p.sample());
    let started = Instant::now();
    let (mut clients, mut failures) = dial_all(
        target,
        &target.url,
        params.connections,
        params.concurrency,
        small_client_config(),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let connected = clients.len();
    record
        .metric("connected", connected as f64)
        .metric("connect_s", elapsed)
        .metric("conn_per_s", connected as f64 / elapsed.max(1e-9));

    sleep(params.hold).await;
    record_rss_growth(&mut record, &mut failures, probe, before, connected);

    if params.check_alive && connected > 0 {
        let step = (connected / ALIVE_SAMPLE).max(1);
        let sample: Vec<&mut Client> = clients.iter_mut().step_by(step).collect();
        record.metric("alive_checked", sample.len() as f64);
        let checks: Vec<Result<(), String>> = stream::iter(sample)
            .map(|client| async move { ping_echo(client).await })
            .buffer_unordered(16)
            .collect()
            .await;
        for problem in checks.into_iter().filter_map(Result::err) {
            failures.error(format!("held connection: {problem}"));
        }
    }
    if connected == 0 {
        failures.error("no connection could be opened");
    }
    close_all(clients).await;
    record.absorb(failures);
    record
}

/// Sends one short text message and expects it back unchanged.
async fn ping_echo(client: &mut Client) -> Result<(), String> {
    const TEXT: &str = "still-there?";
    let exchange = async {
        client
            .send(Message::text(TEXT))
            .await
            .map_err(|e| format!("send: {e}"))?;
        match next_data(client).await? {
            Message::Text(text) if text.as_str() == TEXT => Ok(()),
            other => Err(format!("wrong echo {other:?}")),
        }
    };
    timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("echo timed out".to_owned()))
}

/// Closes held connections: a close frame each, then a reset instead of a
/// FIN, so the client's source ports do not sit in TIME_WAIT for a minute and
/// block the next run that binds them.
pub(crate) async fn close_all(clients: Vec<Client>) {
    let closing = stream::iter(clients)
        .map(|mut client| async move {
            let _ = timeout(Duration::from_secs(2), client.close(None)).await;
            let tcp = match client.get_ref() {
                crate::tls::ClientStream::Plain(s) => s,
                crate::tls::ClientStream::Tls(s) => s.get_ref().0,
            };
            let _ = tcp.set_zero_linger();
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>();
    let _ = timeout(Duration::from_secs(20), closing).await;
}
