//! `deflate-echo` and `deflate-idle`: the compression rows, through a small
//! permessage-deflate (RFC 7692) client of our own.
//!
//! tokio-tungstenite cannot negotiate the extension (tungstenite rejects
//! RSV1), so this module speaks just enough WebSocket itself: the upgrade
//! with a `Sec-WebSocket-Extensions` offer, masked frames out, unmasked
//! frames in, and raw deflate per message (flate2, the backend wshd uses).
//! The client compresses every message on its own (it resets its compressor
//! each time, which a client may always do), and keeps one inflater for the
//! connection, so it reads servers with and without context takeover alike.
//!
//! The payload is a 4 KiB-ish JSON document (a list of sensor readings),
//! compressible as real JSON is, which starts with its sequence number and
//! differs per connection; every echo is compared byte for byte and must
//! come back as text.
//!
//! `deflate-echo` metrics: `msgs`, `msgs_per_s`, `rtt_p50_us`, `rtt_p99_us`,
//! `wire_in_bytes_per_msg` (server to client: frame headers and payload of
//! the echo, what the server's compression achieved), `wire_out_bytes_per_msg`
//! (client to server), `compressed_share` (echoes that came back with RSV1)
//! and, with a server pid, `cpu_us_per_msg`.
//!
//! `deflate-idle` metrics: like `connect` (`connected`, `conn_per_s`,
//! `rss_kib_per_conn`), for connections that negotiated the extension and
//! each echoed one JSON message before they went idle: a server that keeps
//! zlib state between messages holds it from then on.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::{DIAL_TIMEOUT, Timeline, join_all, record_rss_growth, sample_window};
use crate::latency::Latency;
use crate::probe::Probe;
use crate::record::{Failures, Record};
use crate::target::Target;

/// What the client offers in `Sec-WebSocket-Extensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Offer {
    /// No context takeover either way: every message is compressed on its
    /// own by both sides, so both peers do the same work per message.
    NoContext,
    /// What browsers send (`permessage-deflate; client_max_window_bits`):
    /// the server chooses whether it keeps a compression context.
    Browser,
}

impl Offer {
    /// The header value.
    pub fn header(self) -> &'static str {
        match self {
            Offer::NoContext => {
                "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
            }
            Offer::Browser => "permessage-deflate; client_max_window_bits",
        }
    }
}

/// The largest inflated message the client accepts.
const MAX_MESSAGE: usize = 16 << 20;

/// The empty stored block that ends a sync flush: the sender strips it from
/// every message and the receiver appends it again (RFC 7692, 7.2.1).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// One connection with permessage-deflate in effect.
#[derive(Debug)]
pub struct DeflateClient {
    stream: TcpStream,
    /// Bytes read and not parsed yet: `input[start..]`.
    input: Vec<u8>,
    start: usize,
    compress: Compress,
    decompress: Decompress,
    /// The frame being written.
    frame: Vec<u8>,
    /// Deflate output of the message being sent.
    deflated: Vec<u8>,
    /// Payload of the message being received, as it came.
    payload: Vec<u8>,
    /// The last message received, inflated.
    message: Vec<u8>,
    /// Masking keys: a per-connection xorshift, since a client must mask
    /// but the key's quality does not matter on loopback.
    mask_state: u32,
}

/// What [`DeflateClient::recv`] read.
#[derive(Debug, Clone, Copy)]
pub struct Inbound {
    /// A text message (else binary).
    pub text: bool,
    /// The message was compressed (RSV1 on its first frame).
    pub compressed: bool,
    /// Bytes on the wire: every frame's header and payload.
    pub wire: usize,
}

impl DeflateClient {
    /// Connects to `target` and negotiates permessage-deflate with `offer`;
    /// fails when the server does not accept the extension.
    pub async fn connect(target: &Target, offer: Offer) -> anyhow::Result<DeflateClient> {
        ensure!(
            !target.is_secure(),
            "{}: the deflate workloads speak ws:// only",
            target.url
        );
        let rest = target.url.trim_start_matches("ws://");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let mut stream = target.connect_tcp().await?;
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {}\r\n\r\n",
            offer.header()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut input = Vec::with_capacity(4096);
        let head_end = loop {
            if let Some(at) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            ensure!(input.len() < 16 * 1024, "handshake response head too long");
            let read = stream.read_buf(&mut input).await?;
            ensure!(
                read > 0,
                "server closed the connection during the handshake"
            );
        };
        let head = std::str::from_utf8(&input[..head_end]).context("response head")?;
        let agreed = check_response(head, &derive_accept_key(key.as_bytes()))?;
        let window_bits = agreed.client_max_window_bits.clamp(9, 15);
        let client = DeflateClient {
            stream,
            start: head_end,
            input,
            compress: Compress::new_with_window_bits(Compression::default(), false, window_bits),
            decompress: Decompress::new(false),
            frame: Vec::new(),
            deflated: Vec::new(),
            payload: Vec::new(),
            message: Vec::new(),
            mask_state: 0x9e37_79b9 ^ key.len() as u32 ^ u32::from(key.as_bytes()[0]) << 8,
        };
        Ok(client)
    }

    /// Sends `data` as one compressed message; returns its bytes on the wire.
    pub async fn send(&mut self, text: bool, data: &[u8]) -> anyhow::Result<usize> {
        deflate(&mut self.compress, data, &mut self.deflated)?;
        let opcode = if text { 0x1 } else { 0x2 };
        // FIN, RSV1 (compressed), opcode.
        self.frame.clear();
        self.frame.push(0x80 | 0x40 | opcode);
        push_length(&mut self.frame, self.deflated.len());
        let mask = self.next_mask();
        self.frame.extend_from_slice(&mask);
        let body = self.frame.len();
        self.frame.extend_from_slice(&self.deflated);
        for (i, byte) in self.frame[body..].iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        self.stream.write_all(&self.frame).await?;
        Ok(self.frame.len())
    }

    /// Reads the next text or binary message (skipping pings and pongs,
    /// which the bench servers do not send); its bytes are in
    /// [`DeflateClient::message`].
    pub async fn recv(&mut self) -> anyhow::Result<Inbound> {
        self.payload.clear();
        let mut first: Option<(u8, bool)> = None;
        let mut wire = 0;
        loop {
            self.fill(2).await?;
            let (b0, b1) = (self.input[self.start], self.input[self.start + 1]);
            ensure!(b1 & 0x80 == 0, "the server sent a masked frame");
            let (length, header) = match b1 & 0x7f {
                126 => {
                    self.fill(4).await?;
                    let at = self.start + 2;
                    let bytes = [self.input[at], self.input[at + 1]];
                    (usize::from(u16::from_be_bytes(bytes)), 4)
                }
                127 => {
                    self.fill(10).await?;
                    let at = self.start + 2;
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&self.input[at..at + 8]);
                    (
                        usize::try_from(u64::from_be_bytes(bytes)).unwrap_or(usize::MAX),
                        10,
                    )
                }
                short => (usize::from(short), 2),
            };
            ensure!(
                self.payload.len().saturating_add(length) <= MAX_MESSAGE,
                "message over {MAX_MESSAGE} bytes"
            );
            self.fill(header + length).await?;
            let body = self.start + header..self.start + header + length;
            let (fin, rsv1, opcode) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f);
            match opcode {
                0x8 => bail!("server closed the connection"),
                0x9 | 0xa => {
                    self.start = body.end;
                    continue;
                }
                0x1 | 0x2 => {
                    ensure!(first.is_none(), "a new message inside a fragmented one");
                    first = Some((opcode, rsv1));
                }
                0x0 => {
                    ensure!(first.is_some(), "a continuation frame without a message");
                    ensure!(!rsv1, "RSV1 on a continuation frame");
                }
                other => bail!("unknown opcode {other:#x}"),
            }
            self.payload.extend_from_slice(&self.input[body.clone()]);
            self.start = body.end;
            wire += header + length;
            if fin {
                break;
            }
        }
        let (opcode, compressed) = first.expect("a data frame was read");
        if compressed {
            self.payload.extend_from_slice(&TAIL);
            inflate(&mut self.decompress, &self.payload, &mut self.message)?;
        } else {
            std::mem::swap(&mut self.message, &mut self.payload);
        }
        Ok(Inbound {
            text: opcode == 0x1,
            compressed,
            wire,
        })
    }

    /// The message the last [`DeflateClient::recv`] returned.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Sends a close frame, waits briefly for the server's, then drops the
    /// connection with a reset so its source port skips TIME_WAIT (as the
    /// other workloads do).
    pub async fn close(mut self) {
        let mask = self.next_mask();
        let code = 1000u16.to_be_bytes();
        let frame = [
            0x88,
            0x80 | 2,
            mask[0],
            mask[1],
            mask[2],
            mask[3],
            code[0] ^ mask[0],
            code[1] ^ mask[1],
        ];
        if self.stream.write_all(&frame).await.is_ok() {
            let _ = timeout(Duration::from_secs(2), async {
                while self.recv().await.is_ok() {}
            })
            .await;
        }
        let _ = self.stream.set_zero_linger();
    }

    /// Reads until at least `need` unparsed bytes are buffered.
    async fn fill(&mut self, need: usize) -> anyhow::Result<()> {
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
        while self.input.len() - self.start < need {
            if self.start > 0 {
                self.input.drain(..self.start);
                self.start = 0;
            }
            self.input.reserve(need.max(16 * 1024));
            let read = self.stream.read_buf(&mut self.input).await?;
            ensure!(read > 0, "connection ended");
        }
        Ok(())
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }
}

/// What the server agreed to in its `Sec-WebSocket-Extensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Agreed {
    /// The window the client's compressor may use.
    client_max_window_bits: u8,
}

/// Checks a 101 response head and returns the agreed deflate parameters.
fn check_response(head: &str, accept_key: &str) -> anyhow::Result<Agreed> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("101"),
        "the upgrade was refused: {status}"
    );
    let mut accept = None;
    let mut extensions = Vec::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "sec-websocket-accept" => accept = Some(value.trim()),
                "sec-websocket-extensions" => extensions.extend(value.split(',')),
                _ => {}
            }
        }
    }
    ensure!(accept == Some(accept_key), "wrong Sec-WebSocket-Accept");
    let deflate = extensions
        .iter()
        .find(|e| {
            e.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("permessage-deflate"))
        })
        .context("the server did not accept permessage-deflate")?;
    let mut agreed = Agreed {
        client_max_window_bits: 15,
    };
    for parameter in deflate.split(';').skip(1) {
        let (name, value) = parameter
            .split_once('=')
            .map_or((parameter.trim(), None), |(n, v)| {
                (n.trim(), Some(v.trim().trim_matches('"')))
            });
        if name.eq_ignore_ascii_case("client_max_window_bits") {
            agreed.client_max_window_bits = value
                .context("client_max_window_bits needs a value in a response")?
                .parse()
                .context("client_max_window_bits")?;
        }
    }
    Ok(agreed)
}

/// Appends the masked-frame length field.
fn push_length(frame: &mut Vec<u8>, length: usize) {
    if length < 126 {
        frame.push(0x80 | length as u8);
    } else if let Ok(short) = u16::try_from(length) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(length as u64).to_be_bytes());
    }
}

/// One message's raw deflate, the sync-flush tail stripped, with a fresh
/// context (so the client never relies on context takeover).
fn deflate(compress: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    compress.reset();
    out.clear();
    out.reserve(input.len() / 2 + 64);
    let base = compress.total_in();
    loop {
        let consumed = (compress.total_in() - base) as usize;
        compress.compress_vec(&input[consumed..], out, FlushCompress::Sync)?;
        let consumed = (compress.total_in() - base) as usize;
        if consumed == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Ok(())
}

/// Inflates one message (its tail appended) with the connection's inflater.
fn inflate(decompress: &mut Decompress, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    out.clear();
    out.reserve((input.len() * 4).min(MAX_MESSAGE) + 64);
    let base = decompress.total_in();
    loop {
        let before = (decompress.total_in(), out.len());
        let consumed = (decompress.total_in() - base) as usize;
        let status = decompress.decompress_vec(&input[consumed..], out, FlushDecompress::Sync)?;
        if status == Status::StreamEnd {
            // The server ended the deflate stream (a final block); the next
            // message starts a new one.
            decompress.reset(false);
            return Ok(());
        }
        let consumed = (decompress.total_in() - base) as usize;
        if consumed == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
        ensure!(
            out.len() <= MAX_MESSAGE,
            "inflated message over {MAX_MESSAGE} bytes"
        );
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        } else {
            ensure!(
                (decompress.total_in(), out.len()) != before,
                "inflate made no progress: truncated or corrupt data"
            );
        }
    }
}

/// The JSON documents one connection sends: the same readings each time,
/// with the sequence number in a fixed-width field at the start.
#[derive(Debug, Clone)]
pub struct JsonPayload {
    template: Vec<u8>,
}

impl JsonPayload {
    /// Where the 16 hex digits of the sequence number start.
    const SEQ_AT: usize = br#"{"seq":""#.len();
    /// The smallest size that holds the envelope.
    pub const MIN_SIZE: usize = 128;

    /// Connection `id`'s document, exactly `size` bytes (at least
    /// [`JsonPayload::MIN_SIZE`]).
    pub fn new(id: usize, size: usize) -> JsonPayload {
        let size = size.max(Self::MIN_SIZE);
        let close = r#"],"pad":""}"#;
        let mut text = format!(r#"{{"seq":"{:016x}","conn":{id},"readings":["#, 0);
        for i in 0.. {
            let reading = format!(
                r#"{{"id":{i},"sensor":"sensor-{:02}","unit":"celsius","value":{}.{},"ok":{}}}"#,
                (i * 7 + id) % 100,
                (i * 37 + id * 11) % 100,
                i % 10,
                i % 3 != 0
            );
            if text.len() + 1 + reading.len() + close.len() > size {
                break;
            }
            if i > 0 {
                text.push(',');
            }
            text.push_str(&reading);
        }
        text.push_str(r#"],"pad":""#);
        let pad = size.saturating_sub(text.len() + 2);
        text.extend(std::iter::repeat_n('-', pad));
        text.push_str(r#""}"#);
        JsonPayload {
            template: text.into_bytes(),
        }
    }

    /// Writes document `seq` into `out`.
    pub fn fill(&self, seq: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.template);
        out[Self::SEQ_AT..Self::SEQ_AT + 16].copy_from_slice(format!("{seq:016x}").as_bytes());
    }
}

/// Sends document `seq` and checks its echo; returns (wire out, inbound).
async fn exchange(
    client: &mut DeflateClient,
    payload: &JsonPayload,
    seq: u64,
    scratch: &mut Vec<u8>,
) -> Result<(usize, Inbound), Problem> {
    payload.fill(seq, scratch);
    let sent = client
        .send(true, scratch)
        .await
        .map_err(|e| Problem::Error(format!("send: {e:#}")))?;
    let inbound = client
        .recv()
        .await
        .map_err(|e| Problem::Error(format!("receive: {e:#}")))?;
    if !inbound.text {
        return Err(Problem::Mismatch(format!(
            "seq {seq}: sent text, got binary"
        )));
    }
    if client.message() != scratch.as_slice() {
        return Err(Problem::Mismatch(format!(
            "seq {seq}: echoed bytes differ from the sent ones ({} bytes back, {} sent)",
            client.message().len(),
            scratch.len()
        )));
    }
    Ok((sent, inbound))
}

#[derive(Debug)]
enum Problem {
    Error(String),
    Mismatch(String),
}

impl Problem {
    fn count(self, failures: &mut Failures) {
        match self {
            Problem::Error(e) => failures.error(e),
            Problem::Mismatch(m) => failures.mismatch(m),
        }
    }
}

/// Parameters of a `deflate-echo` run.
#[derive(Debug, Clone)]
pub struct DeflateEchoParams {
    /// Connections (C).
    pub connections: usize,
    /// Document size in bytes.
    pub size: usize,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Connections opened at once while setting up.
    pub connect_concurrency: usize,
    /// The extension offer.
    pub offer: Offer,
}

/// What one echo connection measured.
#[derive(Debug, Default)]
struct EchoOutcome {
    latency: Latency,
    failures: Failures,
    wire_in: u64,
    wire_out: u64,
    compressed: u64,
}

/// Opens `count` deflate connections, `concurrency` at a time.
async fn dial_all(
    target: &Target,
    count: usize,
    concurrency: usize,
    offer: Offer,
    failures: &mut Failures,
) -> Vec<DeflateClient> {
    let mut clients = Vec::with_capacity(count);
    let mut attempts = stream::iter(0..count)
        .map(|_| async move { timeout(DIAL_TIMEOUT, DeflateClient::connect(target, offer)).await })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = attempts.next().await {
        match result {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(error)) => failures.error(format!("{error:#}")),
            Err(_) => failures.error(format!("dialing {} timed out", target.url)),
        }
    }
    clients
}

/// Runs `deflate-echo`: one document in flight per connection.
pub async fn run_echo(target: &Target, params: &DeflateEchoParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("deflate-echo", &target.url);
    record
        .param("connections", params.connections)
        .param("size", params.size)
        .param("offer", params.offer.header())
        .param("duration_s", params.duration.as_secs_f64())
        .param("warmup_s", params.warmup.as_secs_f64());
    let mut failures = Failures::default();
    let clients = dial_all(
        target,
        params.connections,
        params.connect_concurrency,
        params.offer,
        &mut failures,
    )
    .await;
    record.metric("connected", clients.len() as f64);

    let timeline = Timeline::starting_now(params.warmup, params.duration);
    let cpu = sample_window(probe, timeline);
    let handles = clients
        .into_iter()
        .enumerate()
        .map(|(id, client)| {
            let payload = JsonPayload::new(id, params.size);
            tokio::spawn(echo_connection(client, payload, timeline))
        })
        .collect();
    let outcomes: Vec<EchoOutcome> = join_all(handles, &mut failures).await;

    let mut latency = Latency::default();
    let (mut wire_in, mut wire_out, mut compressed) = (0u64, 0u64, 0u64);
    for outcome in outcomes {
        latency.merge(&outcome.latency);
        failures.merge(outcome.failures);
        wire_in += outcome.wire_in;
        wire_out += outcome.wire_out;
        compressed += outcome.compressed;
    }
    let msgs = latency.len();
    record
        .metric("msgs", msgs as f64)
        .metric("msgs_per_s", msgs as f64 / timeline.window().as_secs_f64());
    if msgs > 0 {
        let per = |total: u64| total as f64 / msgs as f64;
        record
            .metric("rtt_p50_us", latency.quantile_us(0.50))
            .metric("rtt_p99_us", latency.quantile_us(0.99))
            .metric("wire_in_bytes_per_msg", per(wire_in))
            .metric("wire_out_bytes_per_msg", per(wire_out))
            .metric("compressed_share", per(compressed));
    } else {
        failures.error("no echo completed inside the measured window");
    }
    if let Ok(Some(window)) = cpu.await {
        window.report(&mut record, "msg", msgs);
    }
    record.absorb(failures);
    record
}

async fn echo_connection(
    mut client: DeflateClient,
    payload: JsonPayload,
    timeline: Timeline,
) -> EchoOutcome {
    let mut outcome = EchoOutcome::default();
    let mut scratch = Vec::new();
    let mut seq = 0u64;
    while Instant::now() < timeline.measure_end {
        let sent_at = Instant::now();
        let result = timeout_at(
            timeline.deadline,
            exchange(&mut client, &payload, seq, &mut scratch),
        )
        .await;
        let (sent, inbound) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(problem)) => {
                problem.count(&mut outcome.failures);
                return outcome;
            }
            Err(_) => {
                outcome.failures.error("timed out waiting for an echo");
                return outcome;
            }
        };
        let now = Instant::now();
        if timeline.in_window(now) {
            outcome.latency.record(now - sent_at);
            outcome.wire_out += sent as u64;
            outcome.wire_in += inbound.wire as u64;
            outcome.compressed += u64::from(inbound.compressed);
        }
        seq += 1;
    }
    client.close().await;
    outcome
}

/// Parameters of a `deflate-idle` run.
#[derive(Debug, Clone)]
pub struct DeflateIdleParams {
    /// Connections to open (N).
    pub connections: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// How long to hold them idle before reading the server's memory.
    pub hold: Duration,
    /// Size of the one document each connection echoes.
    pub size: usize,
    /// The extension offer.
    pub offer: Offer,
}

/// Runs `deflate-idle`.
pub async fn run_idle(target: &Target, params: &DeflateIdleParams, probe: Option<Probe>) -> Record {
    let mut record = Record::new("deflate-idle", &target.url);
    record
        .param("connections", params.connections)
        .param("concurrency", params.concurrency)
        .param("size", params.size)
        .param("offer", params.offer.header())
        .param("hold_s", params.hold.as_secs_f64());
    let mut failures = Failures::default();
    let before = probe.map(|p| p.sample());
    let started = Instant::now();
    let size = params.size;
    let offer = params.offer;
    let mut attempts = stream::iter(0..params.connections)
        .map(|id| async move {
            let open = async {
                let mut client = DeflateClient::connect(target, offer)
                    .await
                    .map_err(|e| Problem::Error(format!("{e:#}")))?;
                let payload = JsonPayload::new(id, size);
                let (_, inbound) = exchange(&mut client, &payload, 0, &mut Vec::new()).await?;
                Ok::<_, Problem>((client, inbound.compressed))
            };
            timeout(DIAL_TIMEOUT, open)
                .await
                .unwrap_or_else(|_| Err(Problem::Error("connect and echo timed out".to_owned())))
        })
        .buffer_unordered(params.concurrency.max(1));
    let mut clients = Vec::with_capacity(params.connections);
    let mut compressed = 0u64;
    while let Some(result) = attempts.next().await {
        match result {
            Ok((client, was_compressed)) => {
                clients.push(client);
                compressed += u64::from(was_compressed);
            }
            Err(problem) => problem.count(&mut failures),
        }
    }
    drop(attempts);
    let elapsed = started.elapsed().as_secs_f64();
    let connected = clients.len();
    record
        .metric("connected", connected as f64)
        .metric("connect_s", elapsed)
        .metric("conn_per_s", connected as f64 / elapsed.max(1e-9));
    if connected > 0 {
        record.metric("compressed_share", compressed as f64 / connected as f64);
    }
    sleep(params.hold).await;
    record_rss_growth(&mut record, &mut failures, probe, before, connected);
    if connected == 0 {
        failures.error("no connection could be opened");
    }
    let closing = stream::iter(clients)
        .map(DeflateClient::close)
        .buffer_unordered(256)
        .collect::<Vec<()>>();
    let _ = timeout(Duration::from_secs(20), closing).await;
    record.absorb(failures);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_have_the_size_asked_for_and_parse_as_json() {
        for size in [128, 1000, 4096] {
            let payload = JsonPayload::new(7, size);
            let mut out = Vec::new();
            payload.fill(0xabc, &mut out);
            assert_eq!(out.len(), size);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(value["seq"], "0000000000000abc");
            assert_eq!(value["conn"], 7);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        JsonPayload::new(1, 4096).fill(3, &mut a);
        JsonPayload::new(2, 4096).fill(3, &mut b);
        assert_ne!(a, b, "connections send different documents");
    }

    #[test]
    fn deflate_and_inflate_round_trip_and_json_compresses() {
        let mut document = Vec::new();
        JsonPayload::new(3, 4096).fill(42, &mut document);
        let mut compress = Compress::new(Compression::default(), false);
        let mut decompress = Decompress::new(false);
        let (mut deflated, mut inflated) = (Vec::new(), Vec::new());
        // Twice through the same inflater: context is kept across messages.
        for _ in 0..2 {
            deflate(&mut compress, &document, &mut deflated).unwrap();
            assert!(
                !deflated.ends_with(&TAIL),
                "the sync-flush tail is stripped"
            );
            assert!(deflated.len() < document.len() / 3, "{}", deflated.len());
            deflated.extend_from_slice(&TAIL);
            inflate(&mut decompress, &deflated, &mut inflated).unwrap();
            assert_eq!(inflated, document);
        }
        let mut corrupt = vec![0xff; 64];
        corrupt.extend_from_slice(&TAIL);
        assert!(inflate(&mut Decompress::new(false), &corrupt, &mut inflated).is_err());
    }

    #[test]
    fn responses_are_checked() {
        let key = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {key}\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_max_window_bits=12\r\n\r\n"
        );
        assert_eq!(
            check_response(&ok, key).unwrap(),
            Agreed {
                client_max_window_bits: 12
            }
        );
        let plain =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {key}\r\n\r\n");
        let error = check_response(&plain, key).unwrap_err().to_string();
        assert!(
            error.contains("did not accept permessage-deflate"),
            "{error}"
        );
        assert!(check_response(&ok, "other").is_err());
        assert!(check_response("HTTP/1.1 404 Not Found\r\n\r\n", key).is_err());
    }

    #[test]
    fn frame_lengths_use_the_shortest_form() {
        let mut frame = Vec::new();
        push_length(&mut frame, 125);
        assert_eq!(frame, [0x80 | 125]);
        frame.clear();
        push_length(&mut frame, 4096);
        assert_eq!(frame, [0x80 | 126, 0x10, 0x00]);
        frame.clear();
        push_length(&mut frame, 70_000);
        assert_eq!(frame.len(), 9);
    }
}
