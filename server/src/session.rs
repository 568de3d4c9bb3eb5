//! One WebSocket connection: registers it and calls `on_open` before the 101
//! is sent ([`open`]), then loops over peer messages and queued sends,
//! runs the close handshake, calls `on_close` exactly once and writes the
//! access line.
//!
//! The loop is a single task that owns the socket: a `select!` over the
//! peer's next frame, the connection's one wake-up (its send queue,
//! out-of-band close requests, the handler version's drain and server
//! shutdown all arrive through [`ConnShared`](crate::mailbox::ConnShared)) and one timer. Sends a
//! handler makes during its own callback come back in the [`Outbox`] and are
//! written as one batch with one flush.
//!
//! The one timer (allocated once per connection, re-armed in place) serves
//! every deadline: the keepalive ping (`ping_interval`), the idle close
//! (`idle_timeout`, 1001), the unfinished message (`message_timeout`, 1008),
//! output the peer does not read (`write_timeout`, pongs included), the
//! drain jitter and the close handshake (`close_timeout`). It fires at
//! least every `min(ping_interval, message_timeout, write_timeout)`; traffic
//! from the peer is noticed at those ticks, not per read, so an idle close
//! comes between `idle_timeout` and `idle_timeout` plus one tick after the
//! peer's last byte.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use wshd_handler_api::abi::{WSHD_ERR_PANIC, WSHD_OK};

use crate::host_api::Outbox;
use crate::instance::ConnState;
use crate::mailbox::ConnShared;
use crate::routing::Route;
use crate::server::Server;
use crate::ws::ReadError;

type Ws = crate::ws::WsConn;

/// Queued messages written per flush, so one busy connection cannot starve
/// its own reads.
const WRITE_BATCH: usize = 64;

/// Traffic counters for the access line.
#[derive(Debug, Default)]
struct Stats {
    msgs_in: u64,
    msgs_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// The route's Prometheus counters, kept beside the access line's.
    metrics: Option<Arc<crate::metrics::RouteMetrics>>,
}

/// Who started the close, for the access line.
#[derive(Debug, Clone, Copy)]
enum Closer {
    Peer,
    Server,
    Dropped,
}

/// The connection's close state, as tungstenite sees it from our side.
#[derive(Debug)]
struct Close {
    code: u16,
    reason: String,
    by: Closer,
}

/// A connection the handler has opened (`on_open` ran) whose socket is not
/// the session's yet.
///
/// `on_open` runs before the 101 response is sent, so a client never sees
/// its connection open before the handler does: a chat client that gets its
/// 101 and then a broadcast sent by another client must find itself already
/// in the room. (With `on_open` after the upgrade, a message another client
/// sends right after our 101 could reach the handler first, on another
/// worker thread, and this connection missed it.)
pub struct Opening {
    route: Arc<Route>,
    id: u64,
    server: Arc<Server>,
    /// The connection's place under `max_connections`:
    /// held until the session ends.
    slot: Arc<crate::server::Slot>,
    span: tracing::Span,
    started: Instant,
    shared: Arc<ConnShared>,
    outbox: Outbox,
    opened: Result<ConnState, i32>,
}

/// Registers the connection and calls `on_open`. Call [`Opening::run`] once
/// upgraded, or [`Opening::abandon`] if the upgrade never happens.
pub async fn open(
    route: Arc<Route>,
    id: u64,
    peer: SocketAddr,
    protocol: Option<&str>,
    server: Arc<Server>,
    slot: Arc<crate::server::Slot>,
) -> Opening {
    let inst = route.instance.clone();
    // The span is not entered around every poll (that costs two refcount
    // updates per poll, per connection); events name it as their parent, and
    // handler log calls made inside a callback find it through the outbox.
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        path = %route.path,
        handler = %inst.lib.desc.name,
        version = %inst.lib.desc.version,
        generation = inst.lib.generation,
    );
    let shared = Arc::new(ConnShared::new(
        inst.id,
        route.limits.send_queue,
        route.limits.send_queue_bytes,
        route.limits.slow_consumer,
    ));
    // Shutdown and drain reach open connections by a walk of
    // `server.conns` (mailbox.rs); registering checks both tokens, so a
    // connection the walk missed still sees the event.
    server.conns.register(
        id,
        shared.clone(),
        &[
            (&server.shutdown, ConnShared::SHUTDOWN),
            (&inst.drain, ConnShared::RETIRED),
        ],
    );
    // Likewise for a handover the registry started during the walk.
    if inst.handover_to().is_some() {
        shared.signal(ConnShared::HANDOVER);
    }
    inst.live.fetch_add(1, Ordering::Relaxed);
    inst.metrics.opened();
    tracing::info!(parent: &span, subprotocol = %crate::logsafe::esc(protocol.unwrap_or("")), "open");
    let outbox = Outbox {
        msgs: Vec::new(),
        limit: route.limits.send_queue,
        limit_bytes: route.limits.send_queue_bytes,
        overflowed: false,
        slow_consumer: Some(route.limits.slow_consumer),
        span: Some(span.clone()),
        closed: false,
    };
    let (opened, outbox) = inst.open(id, outbox).await;
    Opening {
        route,
        id,
        server,
        slot,
        span,
        started: Instant::now(),
        shared,
        outbox,
        opened,
    }
}

impl Opening {
    /// Runs the session on the upgraded socket to completion. Not an
    /// `async fn`, for the reason given at `run_inner`.
    pub fn run(self, ws: Ws) -> impl Future<Output = ()> + Send {
        run_inner(ws, self)
    }

    /// The upgrade did not happen (the client left, or shutdown came first):
    /// unregisters the connection and gives the handler its `on_close`.
    pub async fn abandon(self) {
        let Opening {
            route,
            id,
            server,
            span,
            opened,
            shared,
            ..
        } = self;
        server.conns.unregister(id);
        leave(&shared);
        let inst = &route.instance;
        if let Ok(st) = opened {
            inst.close(st, id, 1006, String::new(), Some(span.clone()))
                .await;
        }
        inst.live.fetch_sub(1, Ordering::Relaxed);
        inst.metrics.closed(1006);
        tracing::info!(parent: &span, close_code = 1006, "close before the upgrade completed");
    }
}

// A plain fn returning an async block, not an `async fn`: the task is
// allocated at its largest state for the connection's whole life, and an
// `async fn` keeps its arguments (`ws`, `opening`: 488 bytes) stored beside
// the locals they were moved into. The block captures each field once.
fn run_inner(mut ws: Ws, opening: Opening) -> impl Future<Output = ()> + Send {
    let Opening {
        route,
        id,
        server,
        slot,
        span,
        started,
        shared,
        mut outbox,
        opened,
    } = opening;
    async move {
        // Both change when a handover moves the connection to another
        // version of its handler (see `hand_over`).
        let mut route = route;
        let mut inst = route.instance.clone();
        let limits = &route.limits;
        let wt = limits.write_timeout;
        let mut stats = Stats {
            metrics: Some(inst.metrics.clone()),
            ..Stats::default()
        };
        let mut state: Option<ConnState> = None;
        // Set once we have sent a close frame; we then only wait for the reply.
        let mut closing = false;
        let mut close: Option<Close> = None;
        // Once a close starts (ours, or a close request draining the queue),
        // everything left (the last writes, our close frame, the peer's
        // reply) must happen by then: a peer that does not read cannot hold
        // the connection for a full write_timeout.
        let mut close_by: Option<Instant> = None;
        // Queued sends, close requests, shutdown and drain all arrive
        // through `shared.wakeup`; `registered` is the waker it holds for us.
        let mut registered: Option<std::task::Waker> = None;
        // A close requested while a write waited for the peer: it starts at
        // the top of the loop.
        let mut deferred: Option<CloseFrame> = None;
        ws.attach(crate::budget::Meter::new(
            server.budget.clone(),
            id,
            shared.clone(),
            limits.read_buffer_size,
        ));

        match opened {
            Ok(s) => {
                state = Some(s);
                match write_outbox(
                    &mut ws,
                    wt,
                    &mut outbox,
                    &mut stats,
                    &mut close,
                    &shared,
                    &mut registered,
                )
                .await
                {
                    Ok(()) => {}
                    Err(WriteError::Closing(f)) => deferred = Some(f),
                    Err(e) => {
                        e.log(&span);
                        close.get_or_insert(dropped());
                    }
                }
            }
            Err(rc) => {
                tracing::warn!(
                    parent: &span,
                    "on_open failed ({}); closing with 1011",
                    crate::error::status_name(rc)
                );
                start_close(
                    &mut ws,
                    left(&mut close_by, limits.close_timeout),
                    1011,
                    "handler failed to open the connection",
                    &mut close,
                )
                .await;
            }
        }

        // Queued sends, close requests, shutdown and drain all arrive
        // through `shared.wakeup`; `registered` is the waker it holds for us.
        let mut draining = false;
        // The one timer and what it waits for. Boxed once: an idle
        // connection's timer is re-armed in place, never allocated per tick.
        let tick = limits.ping_interval.min(limits.message_timeout).min(wt);
        let mut clock = Box::pin(tokio::time::sleep(tick));
        let mut next_ping = Instant::now() + limits.ping_interval;
        let mut last_heard = Instant::now();
        let mut drain_at: Option<Instant> = None;
        let mut reply_by: Option<Instant> = None;
        let mut batch: Vec<Message> = Vec::new();
        // The registry asked this connection to move to a new version
        // (ConnShared::HANDOVER); done at the next message boundary.
        let mut handover_pending = false;

        while !matches!(
            close,
            Some(Close {
                by: Closer::Dropped,
                ..
            })
        ) {
            // Between two messages: no callback of this connection is
            // running (each is awaited below, on the blocking pool too) and
            // no fragmented message is half read.
            if handover_pending
                && close.is_none()
                && deferred.is_none()
                && ws.unfinished_since().is_none()
            {
                handover_pending = false;
                if let Some(moved) =
                    Box::pin(hand_over(&inst, &shared, id, &mut state, &span)).await
                {
                    inst = moved.route.instance.clone();
                    route = moved.route;
                    // The new version serves it: the old one's drain does
                    // not apply any more.
                    draining = false;
                    drain_at = None;
                    // The new version may have been replaced in turn
                    // before the connection reached it.
                    handover_pending = inst.handover_to().is_some();
                    if inst.drain.is_cancelled() {
                        shared.signal(ConnShared::RETIRED);
                    }
                }
            }
            let limits = &route.limits;
            if let Some(f) = deferred.take() {
                tracing::debug!(parent: &span, "close requested while a write waited for the peer; closing now");
                start_close(
                    &mut ws,
                    left(&mut close_by, limits.close_timeout),
                    f.code.into(),
                    &f.reason,
                    &mut close,
                )
                .await;
            }
            // Once our close frame is out (here, or before the loop when on_open
            // failed), only the reply is awaited, for at most close_timeout.
            if !closing
                && close
                    .as_ref()
                    .is_some_and(|c| matches!(c.by, Closer::Server))
            {
                closing = true;
                drain_at = None;
                let by = *close_by.get_or_insert_with(|| Instant::now() + limits.close_timeout);
                reply_by = Some(by);
                if by < clock.deadline() {
                    clock.as_mut().reset(by);
                }
            }
            let open = !closing;
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                        stats.msgs_in += 1;
                        stats.bytes_in += msg.len() as u64;
                        inst.metrics.message_in(msg.len());
                        if !open {
                            continue; // RFC 6455 §1.4: data after our close is discarded
                        }
                        let Some(st) = state.as_mut() else { continue };
                        let rc = if inst.is_inline() {
                            inst.message_inline(st, id, &msg, &mut outbox)
                        } else {
                            let st = state.take().expect("state present");
                            let (rc, st, ob) = Box::pin(inst.message(st, id, msg, std::mem::take(&mut outbox))).await;
                            state = Some(st);
                            outbox = ob;
                            rc
                        };
                        match write_outbox(&mut ws, wt, &mut outbox, &mut stats, &mut close, &shared, &mut registered).await {
                            Ok(()) => {}
                            Err(WriteError::Closing(f)) => deferred = Some(f),
                            Err(e) => {
                                e.log(&span);
                                close.get_or_insert(dropped());
                                break;
                            }
                        }
                        if rc != WSHD_OK && close.is_none() {
                            let reason = if rc == WSHD_ERR_PANIC { "handler panicked" } else { "handler error" };
                            tracing::warn!(parent: &span, "on_message failed ({}); closing with 1011", crate::error::status_name(rc));
                            start_close(&mut ws, left(&mut close_by, limits.close_timeout), 1011, reason, &mut close).await;
                        } else if std::mem::take(&mut outbox.overflowed) && close.is_none() {
                            tracing::info!(parent: &span, "send queue full: closing slow consumer with 1008");
                            start_close(&mut ws, left(&mut close_by, limits.close_timeout), 1008, "slow consumer", &mut close).await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite queues the reply; the next read flushes it
                        // and then reports the end of the stream.
                        if close.is_none() {
                            let (code, reason) = match frame {
                                Some(f) => (u16::from(f.code), f.reason.to_string()),
                                None => (1005, String::new()),
                            };
                            close = Some(Close { code, reason, by: Closer::Peer });
                        }
                    }
                    Some(Ok(_)) => {} // ws.rs answers pings itself and returns only data and close
                    Some(Err(ReadError::OverBudget)) => {
                        let reason = "buffered data over the server's budget";
                        tracing::info!(
                            parent: &span,
                            "unfinished messages of all connections are over max_buffered_bytes ({} bytes); this connection holds the most ({} bytes): closing with 1009 and freeing them",
                            limits.max_buffered_bytes,
                            ws.held(),
                        );
                        cut(&mut ws, &mut close, limits, 1009, reason).await;
                        break;
                    }
                    Some(Err(ReadError::Protocol { code, reason })) => {
                        if close.is_none() {
                            tracing::info!(parent: &span, "closing with {code}: {reason}");
                            start_close(&mut ws, left(&mut close_by, limits.close_timeout), code, reason, &mut close).await;
                            // Fail the connection (RFC 6455 §7.1.7): don't
                            // wait for a reply from a misbehaving peer, but
                            // don't reset it either, or it never sees why.
                            Box::pin(linger(&mut ws, &route.limits)).await;
                        } else {
                            tracing::debug!(parent: &span, "peer broke the protocol while closing: {reason}");
                        }
                        break;
                    }
                    Some(Err(ReadError::Io(e))) => {
                        tracing::debug!(parent: &span, "connection error: {e}");
                        close.get_or_insert(dropped());
                        break;
                    }
                    None => {
                        close.get_or_insert(dropped());
                        break;
                    }
                },
                _ = std::future::poll_fn(|cx| shared.wakeup.poll(cx, &mut registered)), if open => {
                    // Timers that fired run here, between this connection's
                    // messages (one atomic load when none did).
                    if shared.has_fired_timers()
                        && fire_timers(&inst, &shared, id, &mut state, &mut outbox, &mut ws, wt, &mut stats, &mut close, &span, TimerIo {
                            registered: &mut registered,
                            deferred: &mut deferred,
                            close_by: &mut close_by,
                            close_timeout: limits.close_timeout,
                        })
                            .await
                            .is_err()
                    {
                        break;
                    }
                    // A close request or shutdown drains the whole queue first;
                    // otherwise one batch per wake, so a busy sender cannot
                    // starve reads.
                    let close_request = shared.take_close_request();
                    let events = shared.take_events();
                    let closing_now = close_request.is_some() || events & ConnShared::SHUTDOWN != 0;
                    let max = if closing_now { usize::MAX } else { WRITE_BATCH };
                    if closing_now {
                        // The queue's last messages, our close frame and
                        // the reply all fit in close_timeout from here.
                        left(&mut close_by, limits.close_timeout);
                    }
                    shared.take(&mut batch, max);
                    let mut result = Ok(());
                    for m in batch.drain(..) {
                        let limit = write_limit(&ws, wt, close_by);
                        // Once closing, close_by bounds the writes already.
                        let stop = (!closing_now).then_some(Stop { shared: &shared, registered: &mut registered });
                        result = write_one(&mut ws, limit, m, &mut stats, &mut close, stop).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    batch.clear();
                    if result.is_ok() {
                        let stop = (!closing_now).then_some(Stop { shared: &shared, registered: &mut registered });
                        result = timed_or_close(write_limit(&ws, wt, close_by), ws.flush(), stop).await;
                    }
                    let close_request = match result {
                        Ok(()) => close_request,
                        Err(WriteError::Closing(f)) => Some(f),
                        Err(e) => {
                            e.log(&span);
                            close.get_or_insert(dropped());
                            break;
                        }
                    };
                    if let Some(f) = close_request {
                        start_close(&mut ws, left(&mut close_by, limits.close_timeout), f.code.into(), &f.reason, &mut close).await;
                    } else if events & ConnShared::SHUTDOWN != 0 {
                        start_close(&mut ws, left(&mut close_by, limits.close_timeout), 1001, "server shutting down", &mut close).await;
                    } else if shared.has_queued() {
                        shared.wakeup.wake();
                    }
                    if events & ConnShared::HANDOVER != 0 {
                        handover_pending = true;
                    }
                    // A connection that moved ignores a drain signal its old
                    // version sent before the move.
                    if events & ConnShared::RETIRED != 0 && close.is_none() && !draining && inst.drain.is_cancelled() {
                        draining = true;
                        let delay = inst.drain_delay(id);
                        tracing::debug!(parent: &span, "handler version retired: closing with 1012 in {delay:?}");
                        let at = Instant::now() + delay;
                        drain_at = Some(at);
                        if at < clock.deadline() {
                            clock.as_mut().reset(at);
                        }
                    }
                }
                () = clock.as_mut() => {
                    let now = Instant::now();
                    if reply_by.is_some_and(|t| now >= t) {
                        tracing::debug!(parent: &span, "peer did not answer our close in time; dropping the connection");
                        break;
                    }
                    if ws.take_heard() {
                        last_heard = now;
                    }
                    if let Some(since) = ws.write_blocked_since()
                        && now >= since + wt
                    {
                        WriteError::Stalled(wt).log(&span);
                        close.get_or_insert(dropped());
                        break;
                    }
                    if let Some(since) = ws.unfinished_since()
                        && now >= since + limits.message_timeout
                    {
                        let reason = "message not completed in time";
                        tracing::info!(
                            parent: &span,
                            "a message started {:?} ago is still unfinished ({} bytes so far; message_timeout is {:?}): closing with 1008 and freeing it",
                            now - since,
                            ws.held(),
                            limits.message_timeout,
                        );
                        cut(&mut ws, &mut close, limits, 1008, reason).await;
                        break;
                    }
                    if drain_at.is_some_and(|t| now >= t) {
                        drain_at = None;
                        tracing::info!(parent: &span, "handler version retired: closing with 1012 (service restart)");
                        start_close(&mut ws, left(&mut close_by, limits.close_timeout), 1012, "service restart", &mut close).await;
                    }
                    if close.is_none() && now >= last_heard + limits.idle_timeout {
                        tracing::info!(parent: &span, "nothing received from the peer for {:?} (idle_timeout): closing with 1001", now - last_heard);
                        start_close(&mut ws, left(&mut close_by, limits.close_timeout), 1001, "idle timeout", &mut close).await;
                    }
                    if close.is_none() && now >= next_ping {
                        next_ping = now + limits.ping_interval;
                        // Output already waiting for the peer is watched by
                        // the write deadline; a ping would only queue behind it.
                        if ws.write_blocked_since().is_none()
                        {
                            let stop = Stop { shared: &shared, registered: &mut registered };
                            match timed_or_close(wt, ws.send(Message::Ping(Default::default())), Some(stop)).await {
                                Ok(()) => {}
                                Err(WriteError::Closing(f)) => deferred = Some(f),
                                Err(e) => {
                                    e.log(&span);
                                    close.get_or_insert(dropped());
                                    break;
                                }
                            }
                        }
                    }
                    // Re-arm for whatever comes first; at the latest one tick
                    // from now, to notice a message or a write that starts
                    // stalling in between.
                    let mut next = now + tick;
                    let mut due = |t: Option<Instant>| {
                        if let Some(t) = t {
                            next = next.min(t);
                        }
                    };
                    due(reply_by);
                    due(drain_at);
                    due(ws.unfinished_since().map(|s| s + limits.message_timeout));
                    due(ws.write_blocked_since().map(|s| s + wt));
                    if close.is_none() {
                        due(Some(next_ping));
                        due(Some(last_heard + limits.idle_timeout));
                    }
                    // Never in the past: what was due has been handled.
                    clock.as_mut().reset(next.max(now + Duration::from_millis(1)));
                }
            }
        }

        // Unregister first, so sends from handler threads from now on get
        // WSHD_ERR_CLOSED; then on_close, exactly once per successful on_open.
        server.conns.unregister(id);
        leave(&shared);
        let close = close.unwrap_or_else(dropped);
        if let Some(st) = state {
            Box::pin(inst.close(st, id, close.code, close.reason.clone(), Some(span.clone())))
                .await;
        }
        inst.live.fetch_sub(1, Ordering::Relaxed);
        // The generation that counted the open counts the close, also for
        // a connection that moved since.
        let metrics = stats
            .metrics
            .clone()
            .unwrap_or_else(|| inst.metrics.clone());
        metrics.closed(close.code);
        // Both slow-consumer paths (this session's outbox, a sender's queue
        // in host_api.rs) close with exactly this code and reason.
        if close.code == 1008
            && close.reason == "slow consumer"
            && matches!(close.by, Closer::Server)
        {
            metrics.slow_consumer();
        }
        // Dropping `ws` closes the socket; tungstenite already sent or answered
        // the close frame.
        drop(ws);
        tracing::info!(
            parent: &span,
            duration_ms = started.elapsed().as_millis() as u64,
            msgs_in = stats.msgs_in,
            msgs_out = stats.msgs_out,
            bytes_in = stats.bytes_in,
            bytes_out = stats.bytes_out,
            close_code = close.code,
            close_reason = %crate::logsafe::esc(&close.reason),
            closed_by = ?close.by,
            "close"
        );
        // Only now: the block must own the slot, or it would be dropped when
        // this fn returns, long before the connection closes.
        drop(slot);
    }
}

/// Lingering close after we failed the connection: half-close our side and
/// discard what the peer is still sending, until it closes too or a limit
/// is hit.
///
/// Closing a socket whose receive buffer holds unread data makes the kernel
/// send RST instead of FIN, and a peer that gets the RST drops everything it
/// had not read yet, our close frame included: it would see 1006 instead of
/// the 1009 or 1002 we sent. The case is common, not exotic: a message over
/// `max_message_size` is refused from its header, with the rest of its
/// payload still in flight. nginx and Apache do the same for HTTP
/// (`lingering_close`).
async fn linger(ws: &mut Ws, limits: &crate::config::Limits) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let io = ws.get_mut();
    // FIN after our close frame: the peer's read side ends cleanly.
    if io.shutdown().await.is_err() {
        return;
    }
    // Bounded in time and bytes, so a hostile peer that never stops sending
    // cannot hold the connection: the rest of one oversized message is
    // what an honest peer still has in flight.
    let budget = limits.max_message_size.max(limits.max_frame_size) as u64 + 64 * 1024;
    let discard = async {
        let mut buf = [0u8; 4096];
        let mut left = budget;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
    };
    let _ = tokio::time::timeout(limits.close_timeout, discard).await;
}

/// Runs one socket write with a time limit. A peer that stops reading fills
/// its TCP window and would otherwise park the session here forever, out of
/// reach of shutdown, drain and close requests.
async fn timed<T>(
    limit: Duration,
    write: impl Future<Output = std::io::Result<T>>,
) -> Result<T, WriteError> {
    timed_or_close(limit, write, None).await
}

/// [`timed`], and while the write waits, a close request for the
/// connection (the slow-consumer policy, the handler's close) ends the
/// wait: the close then starts at once, bounded by `close_timeout`,
/// instead of after the rest of `limit`.
async fn timed_or_close<T>(
    limit: Duration,
    write: impl Future<Output = std::io::Result<T>>,
    stop: Option<Stop<'_>>,
) -> Result<T, WriteError> {
    let mut write = std::pin::pin!(write);
    // Most writes complete on the first poll; only one that has to wait
    // pays for a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(r) = first {
        return r.map_err(|_| WriteError::Failed);
    }
    // Boxed: only a write that has to wait gets here, and its timer must
    // not sit in every idle session's future.
    Box::pin(wait_or_close(limit, write, stop)).await
}

async fn wait_or_close<T>(
    limit: Duration,
    mut write: Pin<&mut impl Future<Output = std::io::Result<T>>>,
    mut stop: Option<Stop<'_>>,
) -> Result<T, WriteError> {
    let mut timer = std::pin::pin!(tokio::time::sleep(limit));
    let mut woken = false;
    let r = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = write.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(|_| WriteError::Failed));
        }
        if let Some(stop) = stop.as_mut()
            && stop.shared.wakeup.poll(cx, stop.registered).is_ready()
        {
            woken = true;
            if let Some(f) = stop.shared.take_close_request() {
                return Poll::Ready(Err(WriteError::Closing(f)));
            }
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(WriteError::Stalled(limit)));
        }
        Poll::Pending
    })
    .await;
    if woken && let Some(stop) = stop {
        // What else woke us (queued sends, shutdown) is for the main loop.
        stop.shared.wakeup.wake();
    }
    r
}

/// What interrupts a waiting write: a close request on `shared`, noticed
/// through the session's wake-up (`registered` is its waker).
struct Stop<'a> {
    shared: &'a ConnShared,
    registered: &'a mut Option<std::task::Waker>,
}

/// Why a write to the peer did not happen.
#[derive(Debug)]
enum WriteError {
    /// The connection is broken or closed.
    Failed,
    /// The peer did not read for this long.
    Stalled(Duration),
    /// A close was requested while the write waited; start it now.
    Closing(CloseFrame),
}

impl WriteError {
    fn log(&self, span: &tracing::Span) {
        if let WriteError::Stalled(limit) = self {
            tracing::info!(parent: span, "peer has not read for {limit:?}; dropping the connection");
        }
    }
}

fn dropped() -> Close {
    Close {
        code: 1006,
        reason: String::new(),
        by: Closer::Dropped,
    }
}

/// The time left until `close_by`, which is set to `close_timeout` from
/// now if no close has started yet.
fn left(close_by: &mut Option<Instant>, close_timeout: Duration) -> Duration {
    close_by
        .get_or_insert_with(|| Instant::now() + close_timeout)
        .saturating_duration_since(Instant::now())
}

/// How long the next write may wait: what is left of the close deadline
/// once closing, otherwise `write_timeout` minus how long output has
/// already been waiting.
fn write_limit(ws: &Ws, wt: Duration, close_by: Option<Instant>) -> Duration {
    match close_by {
        Some(t) => t.saturating_duration_since(Instant::now()),
        None => ws.write_time_left(wt),
    }
}

/// Ends the connection at once and frees what it holds (see
/// [`crate::ws::WsConn::cut`]); records the close. Boxed: it happens once,
/// and its discard buffer must not sit in every idle session.
fn cut<'a>(
    ws: &'a mut Ws,
    close: &'a mut Option<Close>,
    limits: &'a crate::config::Limits,
    code: u16,
    reason: &'static str,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        close.get_or_insert(Close {
            code,
            reason: reason.to_owned(),
            by: Closer::Server,
        });
        let discard = limits.max_message_size.max(limits.max_frame_size) as u64 + 64 * 1024;
        ws.cut(code, reason, limits.close_timeout, discard).await;
    })
}

/// Sends our close frame and records it, unless a close already happened.
/// Boxed: a close happens once, so its state need not sit in every idle
/// session.
fn start_close<'a>(
    ws: &'a mut Ws,
    limit: Duration,
    code: u16,
    reason: &'a str,
    close: &'a mut Option<Close>,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(start_close_now(ws, limit, code, reason, close))
}

async fn start_close_now(
    ws: &mut Ws,
    limit: Duration,
    code: u16,
    reason: &str,
    close: &mut Option<Close>,
) {
    if close.is_some() {
        return;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    *close = Some(Close {
        code,
        reason: reason.to_owned(),
        by: Closer::Server,
    });
    let _ = timed(limit, ws.send(Message::Close(Some(frame)))).await;
}

/// Feeds one queued message; a close frame starts our close handshake.
async fn write_one(
    ws: &mut Ws,
    limit: Duration,
    m: Message,
    stats: &mut Stats,
    close: &mut Option<Close>,
    stop: Option<Stop<'_>>,
) -> Result<(), WriteError> {
    if close.is_some() {
        return Ok(()); // nothing may follow a close frame
    }
    if let Message::Close(frame) = &m {
        let (code, reason) = frame.as_ref().map_or((1005, String::new()), |f| {
            (u16::from(f.code), f.reason.to_string())
        });
        *close = Some(Close {
            code,
            reason,
            by: Closer::Server,
        });
    } else {
        stats.msgs_out += 1;
        stats.bytes_out += m.len() as u64;
        if let Some(metrics) = &stats.metrics {
            metrics.message_out(m.len());
        }
    }
    timed_or_close(limit, ws.feed(m), stop).await
}

/// Writes what a callback queued for its own connection, with one flush.
async fn write_outbox(
    ws: &mut Ws,
    limit: Duration,
    outbox: &mut Outbox,
    stats: &mut Stats,
    close: &mut Option<Close>,
    shared: &ConnShared,
    registered: &mut Option<std::task::Waker>,
) -> Result<(), WriteError> {
    if outbox.msgs.is_empty() {
        return Ok(());
    }
    // Output already waiting for the peer (a pong, say) has used part of
    // the write timeout.
    let limit = ws.write_time_left(limit);
    for m in outbox.msgs.drain(..) {
        if close.is_some() {
            continue;
        }
        let stop = Stop {
            shared,
            registered: &mut *registered,
        };
        write_one(ws, limit, m, stats, close, Some(stop)).await?;
    }
    let stop = Stop { shared, registered };
    timed_or_close(limit, ws.flush(), Some(stop)).await
}

/// The connection is gone: its subscriptions and timers end (before
/// `on_close`, so a goodbye published there does not go to it).
fn leave(shared: &Arc<ConnShared>) {
    crate::topics::global().leave_all(shared);
    crate::timers::global().drop_conn(shared);
}

/// The session state a timer callback's writes and closes share with the
/// message path: the wake-up registration, a close requested while a write
/// waited, and the one close deadline.
struct TimerIo<'a> {
    registered: &'a mut Option<std::task::Waker>,
    deferred: &'a mut Option<CloseFrame>,
    close_by: &'a mut Option<Instant>,
    close_timeout: Duration,
}

/// Calls `on_timer` for the connection's timers that fired (ABI 1.2) and
/// writes what they sent, as for a message: a failed callback closes with
/// 1011, an overflow under the close policy with 1008. `Err` when the
/// socket is gone. Boxed: timers are rare next to messages.
#[allow(clippy::too_many_arguments)]
fn fire_timers<'a>(
    inst: &'a Arc<crate::instance::Instance>,
    shared: &'a ConnShared,
    id: u64,
    state: &'a mut Option<ConnState>,
    outbox: &'a mut Outbox,
    ws: &'a mut Ws,
    wt: Duration,
    stats: &'a mut Stats,
    close: &'a mut Option<Close>,
    span: &'a tracing::Span,
    io: TimerIo<'a>,
) -> Pin<Box<impl Future<Output = Result<(), ()>> + Send + 'a>> {
    let TimerIo {
        registered,
        deferred,
        close_by,
        close_timeout,
    } = io;
    Box::pin(async move {
        let fired = shared.take_fired_timers();
        if fired.is_empty() || close.is_some() {
            return Ok(());
        }
        let Some(st) = state.take() else {
            return Ok(());
        };
        let (rc, st, ob) = inst.timers(st, id, fired, std::mem::take(outbox)).await;
        *state = Some(st);
        *outbox = ob;
        match write_outbox(ws, wt, outbox, stats, close, shared, registered).await {
            Ok(()) => {}
            Err(WriteError::Closing(f)) => *deferred = Some(f),
            Err(e) => {
                e.log(span);
                close.get_or_insert(dropped());
                return Err(());
            }
        }
        if rc != WSHD_OK && close.is_none() {
            let reason = if rc == WSHD_ERR_PANIC {
                "handler panicked"
            } else {
                "handler error"
            };
            tracing::warn!(parent: span, "on_timer failed ({}); closing with 1011", crate::error::status_name(rc));
            start_close(ws, left(close_by, close_timeout), 1011, reason, close).await;
        } else if std::mem::take(&mut outbox.overflowed) && close.is_none() {
            tracing::info!(parent: span, "send queue full: closing slow consumer with 1008");
            start_close(
                ws,
                left(close_by, close_timeout),
                1008,
                "slow consumer",
                close,
            )
            .await;
        }
        Ok(())
    })
}

/// Moves the connection to the version its handler was replaced by
/// (ABI 1.2 handover; the caller checked it is between two messages):
/// export from `inst`, import into the new version, then switch the owner
/// (from now on `inst`'s sends to it get `WSHD_ERR_CLOSED`), drop the old
/// version's timers for it and free the old state. Host-owned state
/// (subscriptions, queued frames) stays with `shared`. `Some` with the new
/// version's route once moved; `None` when it stays (nothing to move to,
/// or the export or import failed: it then drains as without handover).
async fn hand_over(
    inst: &Arc<crate::instance::Instance>,
    shared: &ConnShared,
    id: u64,
    state: &mut Option<ConnState>,
    span: &tracing::Span,
) -> Option<crate::instance::Handover> {
    let to = inst.handover_to()?;
    let new = &to.route.instance;
    if shared.owner() != inst.id || new.id == inst.id {
        return None;
    }
    let st = state.take()?;
    match inst.hand_over(st, id, new, to.max_bytes).await {
        Ok(new_state) => {
            // Owner first: a timer the old version sets from now on is
            // refused, and the ones it set are dropped just after.
            shared.set_owner(new.id);
            crate::timers::global().moved(shared);
            new.live.fetch_add(1, Ordering::Relaxed);
            new.moved_in.fetch_add(1, Ordering::Relaxed);
            inst.live.fetch_sub(1, Ordering::Relaxed);
            inst.moved_out.fetch_add(1, Ordering::Relaxed);
            *state = Some(new_state);
            tracing::info!(
                parent: span,
                "handed over from {} to {}",
                inst.describe(),
                new.describe()
            );
            Some(to)
        }
        Err((e, st)) => {
            *state = Some(st);
            inst.stayed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                parent: span,
                "handover to {} failed: {e}; the connection stays on {} and drains",
                new.describe(),
                inst.describe()
            );
            None
        }
    }
}
