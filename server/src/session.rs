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
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use wshd_handler_api::abi::{WSHD_ERR_LIMIT, WSHD_ERR_PANIC, WSHD_OK};

use crate::host_api::Outbox;
use crate::instance::ConnState;
use crate::mailbox::ConnShared;
use crate::routing::Route;
use crate::server::Server;
use crate::ws::ReadError;

/// The close reason when a callback failed on a server-enforced cap
/// (`WSHD_ERR_LIMIT`): 1013 Try Again Later, the client's cue to retry.
const LIMIT_REASON: &str = "server limit reached, try again later";

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
    peer: SocketAddr,
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
    let shared = Arc::new(ConnShared::new(
        inst.id,
        route.limits.send_queue,
        route.limits.send_queue_bytes,
        route.limits.slow_consumer,
    ));
    crate::topics::Topics::set_address(&shared, slot.topic_address());
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
    // Debug, not info: the access line at close (one per connection, as
    // nginx writes one per request) carries all of this. At info, the two
    // lines were about a fifth of the server's CPU per handshake cycle.
    tracing::debug!(
        conn = id,
        %peer,
        path = %route.path,
        handler = %inst.lib.desc.name,
        version = %inst.lib.desc.version,
        generation = inst.lib.generation,
        subprotocol = %crate::logsafe::esc(protocol.unwrap_or("")),
        "open"
    );
    let outbox = Outbox {
        msgs: Default::default(),
        limit: route.limits.send_queue,
        limit_bytes: route.limits.send_queue_bytes,
        overflowed: false,
        slow_consumer: Some(route.limits.slow_consumer),
        conn: Some(id),
        closed: false,
    };
    let (opened, outbox) = inst.open(id, outbox).await;
    Opening {
        route,
        id,
        server,
        slot,
        peer,
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
            opened,
            shared,
            ..
        } = self;
        server.conns.unregister(id);
        server.auth.forget(id);
        leave(&shared);
        let inst = &route.instance;
        if let Ok(st) = opened {
            inst.close(st, id, 1006, String::new(), Some(id)).await;
        }
        inst.live.fetch_sub(1, Ordering::Relaxed);
        inst.metrics.closed(1006);
        tracing::info!(
            conn = id,
            close_code = 1006,
            "close before the upgrade completed"
        );
    }
}

/// Where a connection is in its life. Each phase decides what the loop
/// waits for and which deadline the one timer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Messages flow both ways.
    Open,
    /// The handler version was retired: messages still flow until `at`,
    /// then the connection closes with 1012 (spread over the drain window).
    Draining { at: Instant },
    /// A close started, ours or the peer's: whatever is left (the last
    /// queued writes, our close frame, the peer's reply) must happen by
    /// `by`. The handler gets no more messages and the send queue is no
    /// longer read.
    Closing { by: Instant },
    /// Over: the loop ends, `on_close` runs and the access line is written.
    Done,
}

/// Which callback ran, for the line that says it failed: one byte in the
/// session's task across the writes, where a `&str` would be sixteen.
#[derive(Debug, Clone, Copy)]
enum Callback {
    Message,
    Timer,
}

impl Callback {
    fn name(self) -> &'static str {
        match self {
            Callback::Message => "on_message",
            Callback::Timer => "on_timer",
        }
    }
}

/// What woke the session.
enum Event {
    /// The peer: a message, its close, an error, or the end of the stream.
    Peer(Option<Result<Message, ReadError>>),
    /// The connection's mailbox: queued sends, a close request, timers,
    /// shutdown, drain or handover.
    Mail,
    /// The one timer.
    Tick,
}

/// One connection's session: the socket, the handler's state for it, and
/// where it is in its life ([`Phase`]).
struct Session {
    ws: Ws,
    /// Both change when a handover moves the connection to another
    /// version of its handler (see `hand_over`).
    route: Arc<Route>,
    inst: Arc<crate::instance::Instance>,
    id: u64,
    server: Arc<Server>,
    /// For the access line. (No `tracing` span per connection: the
    /// subscriber keeps a span's formatted fields for its whole life, about
    /// half a kilobyte, more than the rest of an idle connection. Events
    /// carry `conn = id` instead, and the open and close lines say the
    /// rest.)
    peer: SocketAddr,
    shared: Arc<ConnShared>,
    /// The handler's state; `None` when `on_open` failed.
    state: Option<ConnState>,
    /// What a callback sent to its own connection.
    outbox: Outbox,
    stats: Stats,
    phase: Phase,
    /// How the connection closed (or is closing), for `on_close` and the
    /// access line: set when the first close frame is sent or received.
    close: Option<Close>,
    /// A close requested while a write waited for the peer: it starts at
    /// the next step.
    /// Boxed: rare, and the session is part of every connection's task.
    deferred: Option<Box<CloseFrame>>,
    /// The registry asked this connection to move to a new version
    /// (ConnShared::HANDOVER); done at the next message boundary.
    handover_pending: bool,
    /// The waker `shared.wakeup` holds for this session.
    registered: Option<std::task::Waker>,
    /// The one timer. Boxed once: an idle connection's timer is re-armed in
    /// place, never allocated per tick.
    clock: Pin<Box<tokio::time::Sleep>>,
    next_ping: Instant,
    last_heard: Instant,
}

// A plain fn returning an async block, not an `async fn`: the task is
// allocated at its largest state for the connection's whole life, and an
// `async fn` keeps its arguments stored beside the locals they were moved
// into. The session is built before the block, which captures only it.
fn run_inner(ws: Ws, opening: Opening) -> impl Future<Output = ()> + Send {
    let slot = opening.slot.clone();
    let started = opening.started;
    let opened = opening.opened.as_ref().map(|_| ()).map_err(|rc| *rc);
    let mut s = Session::new(ws, opening);
    async move {
        s.start(opened).await;
        while s.phase != Phase::Done {
            s.step().await;
        }
        // Boxed: it runs once, and its state must not enlarge the task.
        Box::pin(s.finish(started)).await;
        // Only now: the block must own the slot, or it would be dropped when
        // this fn returns, long before the connection closes.
        drop(slot);
    }
}

impl Session {
    fn new(mut ws: Ws, opening: Opening) -> Session {
        let Opening {
            route,
            id,
            server,
            peer,
            shared,
            outbox,
            opened,
            ..
        } = opening;
        let inst = route.instance.clone();
        let limits = &route.limits;
        ws.attach(crate::budget::Meter::new(
            server.budget.clone(),
            id,
            shared.clone(),
            limits.read_buffer_size,
        ));
        let mut tick = limits
            .ping_interval
            .min(limits.message_timeout)
            .min(limits.write_timeout);
        // `[route.auth]`: the timer also serves the token's expiry.
        if let Some(left) = limits
            .auth
            .as_ref()
            .and_then(|auth| auth.time_left(&server.auth, id))
        {
            tick = tick.min(left.max(Duration::from_millis(1)));
        }
        let now = Instant::now();
        Session {
            ws,
            stats: Stats {
                metrics: Some(inst.metrics.clone()),
                ..Stats::default()
            },
            clock: Box::pin(tokio::time::sleep(tick)),
            next_ping: now + limits.ping_interval,
            last_heard: now,
            route,
            inst,
            id,
            server,
            peer,
            shared,
            state: opened.ok(),
            outbox,
            phase: Phase::Open,
            close: None,
            deferred: None,
            handover_pending: false,
            registered: None,
        }
    }

    /// What `on_open` sent goes out; if it failed, the connection closes
    /// with 1011.
    async fn start(&mut self, opened: Result<(), i32>) {
        let Err(rc) = opened else {
            let r = if self.outbox.msgs.is_empty() {
                Ok(())
            } else {
                self.write_batch(false).await
            };
            self.after_write(r);
            return;
        };
        let (code, reason) = if rc == WSHD_ERR_LIMIT {
            tracing::info!(
                conn = self.id,
                "on_open refused: a server limit was reached; closing with 1013"
            );
            (1013, LIMIT_REASON)
        } else {
            tracing::warn!(
                conn = self.id,
                "on_open failed ({}); closing with 1011",
                crate::error::status_name(rc)
            );
            (1011, "handler failed to open the connection")
        };
        self.close_with(code, reason).await;
    }

    /// One turn of the loop: pending work at a message boundary, then one
    /// event.
    async fn step(&mut self) {
        // The rest of a topic message a publisher wrote in part while we
        // waited (direct.rs) goes before anything else; a close requested
        // while it waited for the peer is then handled below.
        if self.ws.has_spill() {
            let r = self.flush_out(true).await;
            if !self.after_write(r) {
                return;
            }
        }
        // Between two messages: no callback of this connection is running
        // (each is awaited, on the blocking pool too) and no fragmented
        // message is half read.
        if self.handover_pending
            && matches!(self.phase, Phase::Open | Phase::Draining { .. })
            && self.close.is_none()
            && self.deferred.is_none()
            && self.ws.unfinished_since().is_none()
        {
            self.handover_pending = false;
            Box::pin(self.move_on()).await;
        }
        if let Some(f) = self.deferred.take() {
            tracing::debug!(
                conn = self.id,
                "close requested while a write waited for the peer; closing now"
            );
            self.close_with(f.code.into(), &f.reason).await;
        }
        // A close frame the handler queued (or on_open's failure) went out
        // with the last write: from now only the reply is awaited, for at
        // most close_timeout.
        if matches!(
            self.close,
            Some(Close {
                by: Closer::Server,
                ..
            })
        ) {
            self.closing();
        }
        // Idle and subscribed to a topic: publishers may write whole frames
        // to the socket while we wait. The door closes as soon as the wait
        // ends (or the session is dropped), before this session writes.
        let door = self
            .door_fd()
            .and_then(|fd| crate::direct::OpenDoor::new(&self.shared, fd));
        if door.is_some() {
            self.ws.set_door_open(true);
        }
        // The event is moved into the future that handles it, so the task
        // does not keep room for it beside that future.
        use futures_util::future::Either::{Left, Right};
        let handling = match self.wait_with(door).await {
            Event::Peer(Some(Ok(msg @ (Message::Text(_) | Message::Binary(_))))) => {
                Left(Left(self.on_message(msg)))
            }
            Event::Peer(r) => Left(Right(self.on_peer(r))),
            Event::Mail => Right(Left(self.on_mail())),
            Event::Tick => Right(Right(self.on_tick())),
        };
        handling.await
    }

    /// [`Session::wait`] with the door open, if it is; then closes it and
    /// takes what publishers left: their counts, and the rest of a frame
    /// the socket did not take whole.
    async fn wait_with(&mut self, door: Option<crate::direct::OpenDoor>) -> Event {
        let event = self.wait().await;
        if let Some(door) = door {
            let closed = door.close();
            self.ws.set_door_open(false);
            if closed.msgs > 0 {
                self.stats.msgs_out += closed.msgs;
                self.stats.bytes_out += closed.bytes;
                if let Some(m) = &self.stats.metrics {
                    m.messages_out(closed.msgs, closed.bytes);
                }
            }
            if let Some(rest) = closed.spill {
                tracing::debug!(
                    conn = self.id,
                    rest = rest.len(),
                    "a topic frame written directly was cut short by a full socket; the session writes the rest first"
                );
                self.ws.push_spill(rest);
            }
        }
        event
    }

    /// The socket, when publishers may write to it during the next wait:
    /// the connection subscribed to a topic and is idle and open, with
    /// nothing of its own queued (see [`crate::ws::WsConn::direct_fd`]).
    fn door_fd(&self) -> Option<std::os::fd::RawFd> {
        if self.shared.door().is_none()
            || self.phase != Phase::Open
            || self.close.is_some()
            || self.deferred.is_some()
            || self.handover_pending
        {
            return None;
        }
        self.ws.direct_fd()
    }

    /// Waits for the peer, the mailbox (not once closing: the queue is
    /// done) or the timer.
    async fn wait(&mut self) -> Event {
        let reading_mail = !matches!(self.phase, Phase::Closing { .. });
        let Session {
            ws,
            shared,
            registered,
            clock,
            ..
        } = self;
        tokio::select! {
            r = ws.next() => Event::Peer(r),
            _ = std::future::poll_fn(|cx| shared.wakeup.poll(cx, registered)), if reading_mail => Event::Mail,
            () = clock.as_mut() => Event::Tick,
        }
    }

    /// Anything from the peer but a data message: its close, an error, or
    /// the end of the stream.
    ///
    /// A plain fn returning an async block, here and in `on_message`: the
    /// session's task is allocated at its largest state, so what is known
    /// at once is done before the block, and the block keeps only what
    /// it needs across its awaits (an `async fn` would also store its
    /// argument twice).
    #[allow(clippy::manual_async_fn)] // see the comment above
    fn on_peer(
        &mut self,
        r: Option<Result<Message, ReadError>>,
    ) -> impl Future<Output = ()> + Send + '_ {
        // What is left to do that has to wait for the socket.
        enum Then {
            Nothing,
            /// Over the buffered-data budget: cut with 1009.
            Cut,
            /// The peer broke the protocol: close with this, then linger.
            Fail {
                code: u16,
                reason: &'static str,
            },
        }
        let then = match r {
            Some(Ok(Message::Close(frame))) => {
                if self.close.is_none() {
                    let (code, reason) = match frame {
                        Some(f) => (u16::from(f.code), f.reason.to_string()),
                        None => (1005, String::new()),
                    };
                    self.close = Some(Close {
                        code,
                        reason,
                        by: Closer::Peer,
                    });
                }
                // ws.rs queued the reply; the next read writes it and then
                // reports the end of the stream.
                self.closing();
                Then::Nothing
            }
            // ws.rs answers pings itself and returns only data and close,
            // and an empty pong when a reply it queued waits for the door
            // to close (direct.rs): the next read writes it.
            Some(Ok(_)) => Then::Nothing,
            Some(Err(ReadError::OverBudget)) => {
                let limits = &self.route.limits;
                tracing::info!(
                    conn = self.id,
                    "unfinished messages of all connections are over max_buffered_bytes ({} bytes); this connection holds the most ({} bytes): closing with 1009 and freeing them",
                    limits.max_buffered_bytes,
                    self.ws.held(),
                );
                Then::Cut
            }
            Some(Err(ReadError::Protocol { code, reason })) => {
                if self.close.is_none() {
                    tracing::info!(conn = self.id, "closing with {code}: {reason}");
                    Then::Fail { code, reason }
                } else {
                    tracing::debug!(
                        conn = self.id,
                        "peer broke the protocol while closing: {reason}"
                    );
                    self.phase = Phase::Done;
                    Then::Nothing
                }
            }
            Some(Err(ReadError::Io(e))) => {
                tracing::debug!(conn = self.id, "connection error: {e}");
                self.drop_connection();
                Then::Nothing
            }
            None => {
                self.drop_connection();
                Then::Nothing
            }
        };
        async move {
            match then {
                Then::Nothing => {}
                Then::Cut => {
                    self.cut(1009, "buffered data over the server's budget")
                        .await
                }
                Then::Fail { code, reason } => {
                    self.close_with(code, reason).await;
                    // Fail the connection (RFC 6455 §7.1.7): don't wait for
                    // a reply from a misbehaving peer, but don't reset it
                    // either, or it never sees why.
                    Box::pin(linger(&mut self.ws, &self.route.limits)).await;
                    self.phase = Phase::Done;
                }
            }
        }
    }

    /// A data message from the peer: to the handler, then what it sent.
    ///
    /// The message is consumed before the returned future first awaits
    /// (by the inline callback, or moved into the boxed call of a blocking
    /// handler), so the session's task keeps no room for it across the
    /// writes.
    fn on_message(&mut self, msg: Message) -> impl Future<Output = ()> + Send + '_ {
        let len = msg.len();
        self.stats.msgs_in += 1;
        self.stats.bytes_in += len as u64;
        self.inst.metrics.message_in(len);
        let mut done = None;
        let mut blocking = None;
        // `[route.auth]`: a fresh token is the host's business, never the
        // handler's (auth.rs); the answer goes out like a callback's send.
        let refresh = match (&self.route.limits.auth, &msg) {
            (Some(auth), Message::Text(t)) if t.starts_with(crate::auth::REFRESH_PREFIX) => {
                Some(auth.refresh(&self.server.auth, self.id, t))
            }
            _ => None,
        };
        if let Some(answer) = refresh {
            self.outbox.msgs.push_back(Message::text(answer));
            done = Some(WSHD_OK);
        } else if !matches!(self.phase, Phase::Closing { .. })
            // RFC 6455 §1.4: data after a close is discarded.
            && let Some(st) = self.state.as_mut()
        {
            if self.inst.is_inline() {
                done = Some(
                    self.inst
                        .message_inline(st, self.id, &msg, &mut self.outbox),
                );
            } else {
                let st = self.state.take().expect("state present");
                let outbox = std::mem::take(&mut self.outbox);
                let (inst, id) = (self.inst.clone(), self.id);
                blocking = Some(Box::pin(
                    async move { inst.message(st, id, msg, outbox).await },
                ));
            }
        }
        async move {
            let rc = match (done, blocking) {
                (Some(rc), _) => rc,
                (None, Some(call)) => {
                    let (rc, st, ob) = call.await;
                    self.state = Some(st);
                    self.outbox = ob;
                    rc
                }
                (None, None) => return,
            };
            self.after_callback(rc, Callback::Message).await;
        }
    }

    /// After a callback: what it sent goes out, then a failed callback
    /// closes with 1011 and an outbox overflow under the close policy with
    /// 1008. (A plain fn returning an async block, as `on_peer`.)
    #[allow(clippy::manual_async_fn)] // see on_peer
    fn after_callback(
        &mut self,
        rc: i32,
        callback: Callback,
    ) -> impl Future<Output = ()> + Send + '_ {
        async move {
            let r = if self.outbox.msgs.is_empty() {
                Ok(())
            } else {
                self.write_batch(false).await
            };
            if !self.after_write(r) {
                return;
            }
            if self.close.is_some() {
                return;
            }
            if rc == WSHD_ERR_LIMIT {
                tracing::info!(
                    conn = self.id,
                    "{} refused: a server limit was reached; closing with 1013",
                    callback.name()
                );
                self.close_with(1013, LIMIT_REASON).await;
            } else if rc != WSHD_OK {
                let reason = if rc == WSHD_ERR_PANIC {
                    "handler panicked"
                } else {
                    "handler error"
                };
                tracing::warn!(
                    conn = self.id,
                    "{} failed ({}); closing with 1011",
                    callback.name(),
                    crate::error::status_name(rc)
                );
                self.close_with(1011, reason).await;
            } else if std::mem::take(&mut self.outbox.overflowed) {
                tracing::info!(
                    conn = self.id,
                    "send queue full: closing slow consumer with 1008"
                );
                self.close_with(1008, "slow consumer").await;
            }
        }
    }

    /// The mailbox: fired timers, queued sends, close requests, shutdown,
    /// drain and handover.
    async fn on_mail(&mut self) {
        // Timers that fired run here, between this connection's messages
        // (one atomic load when none did).
        if self.shared.has_fired_timers() {
            Box::pin(self.fire_timers()).await;
            if self.phase == Phase::Done {
                return;
            }
        }
        // A close request or shutdown drains the whole queue first;
        // otherwise one batch per wake, so a busy sender cannot starve
        // reads.
        let events = self.shared.take_events();
        let request = self.shared.take_close_request();
        if request.is_some() || events & ConnShared::SHUTDOWN != 0 {
            // Rare, so boxed: its state stays out of the session's task.
            Box::pin(self.close_after_queue(request)).await;
        } else {
            self.shared.take(&mut self.outbox.msgs, WRITE_BATCH);
            // Turned into what is left to do before awaiting that: the
            // write's result would otherwise keep its room in the task.
            let close = match self.write_batch(false).await {
                Ok(()) => {
                    if self.shared.has_queued() {
                        self.shared.wakeup.wake();
                    }
                    None
                }
                Err(WriteError::Closing(f)) => Some(f),
                Err(e) => {
                    e.log(self.id);
                    self.drop_connection();
                    return;
                }
            };
            if let Some(f) = close {
                self.close_with(f.code.into(), &f.reason).await;
            }
        }
        if events & ConnShared::HANDOVER != 0 {
            self.handover_pending = true;
        }
        // A connection that moved ignores a drain signal its old version
        // sent before the move.
        if events & ConnShared::RETIRED != 0
            && self.phase == Phase::Open
            && self.close.is_none()
            && self.inst.drain.is_cancelled()
        {
            let delay = self.inst.drain_delay(self.id);
            tracing::debug!(
                conn = self.id,
                "handler version retired: closing with 1012 in {delay:?}"
            );
            let at = Instant::now() + delay;
            self.phase = Phase::Draining { at };
            self.arm(at);
        }
    }

    /// A close request or shutdown: the whole queue is written first (one
    /// batch per wake-up otherwise, so a busy sender cannot starve reads),
    /// then our close frame; the peer's reply is awaited for what is left
    /// of close_timeout from now.
    async fn close_after_queue(&mut self, request: Option<Box<CloseFrame>>) {
        self.closing();
        self.shared.take(&mut self.outbox.msgs, usize::MAX);
        let request = match self.write_batch(true).await {
            Ok(()) => request,
            Err(WriteError::Closing(f)) => Some(f),
            // A peer that stopped reading (a slow consumer whose queue was
            // just dropped, with the rest of a topic frame still unwritten)
            // still gets the close that was asked for: recorded as ours,
            // sent if it ever reads, dropped at the close deadline if not.
            Err(WriteError::Stalled(_)) if request.is_some() => request,
            Err(e) => {
                e.log(self.id);
                self.drop_connection();
                return;
            }
        };
        match request {
            Some(f) => self.close_with(f.code.into(), &f.reason).await,
            None => self.close_with(1001, "server shutting down").await,
        }
    }

    /// Writes what is in the outbox (a batch taken from the mailbox, or
    /// what a callback sent to its own connection) with one flush, more
    /// only when it holds more than the codec queues at once. While not
    /// closing, a close request ends a write that waits.
    ///
    /// The messages are queued by a plain fn and the loop keeps no
    /// iterator or message across its awaits: this future is part of the
    /// session's task, which is allocated at its largest state.
    async fn write_batch(&mut self, closing_now: bool) -> Result<(), WriteError> {
        while self.queue_outbox() {
            if let Err(e) = Box::pin(self.flush_out(!closing_now)).await {
                self.outbox.msgs.clear();
                return Err(e);
            }
        }
        self.flush_out(!closing_now).await
    }

    /// Moves the outbox's messages, in order, to the codec's write queue
    /// until the queue is worth a write: true if messages are left then.
    fn queue_outbox(&mut self) -> bool {
        while let Some(m) = self.outbox.msgs.pop_front() {
            queue_one(&mut self.ws, m, &mut self.stats, &mut self.close);
            if self.ws.should_flush() {
                return !self.outbox.msgs.is_empty();
            }
        }
        false
    }

    /// Writes what is queued, within what is left of `write_timeout` (or
    /// of the close deadline once closing). With `stop_on_close`, a close
    /// request ends a write that waits.
    ///
    /// Most flushes complete at once; only one that has to wait pays for a
    /// timer, in a boxed future, so the session's task stays small.
    async fn flush_out(&mut self, stop_on_close: bool) -> Result<(), WriteError> {
        let ws = &mut self.ws;
        let first = std::future::poll_fn(|cx| Poll::Ready(ws.poll_flush(cx))).await;
        match first {
            Poll::Ready(r) => r.map_err(|_| WriteError::Failed),
            Poll::Pending => Box::pin(self.wait_flush(stop_on_close)).await,
        }
    }

    async fn wait_flush(&mut self, stop_on_close: bool) -> Result<(), WriteError> {
        let limit = write_limit(&self.ws, self.route.limits.write_timeout, self.phase);
        let stop = stop_on_close.then_some(Stop {
            shared: &self.shared,
            registered: &mut self.registered,
        });
        wait_or_close(limit, std::pin::pin!(self.ws.flush()), stop).await
    }

    /// The timer: every deadline of the connection.
    async fn on_tick(&mut self) {
        let now = Instant::now();
        let limits = &self.route.limits;
        let wt = limits.write_timeout;
        if let Phase::Closing { by } = self.phase
            && now >= by
        {
            tracing::debug!(
                conn = self.id,
                "close did not complete in time; dropping the connection"
            );
            self.phase = Phase::Done;
            return;
        }
        let heard = self.ws.take_heard();
        if heard {
            self.last_heard = now;
        }
        if let Some(since) = self.ws.write_blocked_since()
            && now >= since + wt
        {
            WriteError::Stalled(wt).log(self.id);
            self.drop_connection();
            return;
        }
        if let Some(since) = self.ws.unfinished_since()
            && now >= since + limits.message_timeout
        {
            tracing::info!(
                conn = self.id,
                "a message started {:?} ago is still unfinished ({} bytes so far; message_timeout is {:?}): closing with 1008 and freeing it",
                now - since,
                self.ws.held(),
                limits.message_timeout,
            );
            self.cut(1008, "message not completed in time").await;
            return;
        }
        if let Phase::Draining { at } = self.phase
            && now >= at
        {
            tracing::info!(
                conn = self.id,
                "handler version retired: closing with 1012 (service restart)"
            );
            self.close_with(1012, "service restart").await;
        }
        let expired =
            self.route.limits.auth.as_ref().is_some_and(|auth| {
                auth.time_left(&self.server.auth, self.id) == Some(Duration::ZERO)
            });
        if self.close.is_none() && expired {
            tracing::info!(
                conn = self.id,
                "the connection's token expired and no fresh one came: closing with {}",
                crate::auth::EXPIRED_CODE
            );
            self.close_with(crate::auth::EXPIRED_CODE, crate::auth::EXPIRED_REASON)
                .await;
        }
        let limits = &self.route.limits;
        if self.close.is_none() && now >= self.last_heard + limits.idle_timeout {
            tracing::info!(
                conn = self.id,
                "nothing received from the peer for {:?} (idle_timeout): closing with 1001",
                now - self.last_heard
            );
            self.close_with(1001, "idle timeout").await;
        }
        let limits = &self.route.limits;
        if self.close.is_none() && now >= self.next_ping {
            self.next_ping = now + limits.ping_interval;
            // Output already waiting for the peer is watched by the write
            // deadline; a ping would only queue behind it.
            if self.ws.write_blocked_since().is_none() {
                self.ws.queue(Message::Ping(Default::default()));
                let r = self.flush_out(true).await;
                if !self.after_write(r) {
                    return;
                }
            }
        }
        // A connection quiet for a tick gives back the capacity its
        // queues kept from the last burst (kept while busy, so the hot
        // path does not allocate per message).
        if !heard && self.outbox.msgs.is_empty() {
            self.outbox.msgs = Default::default();
            self.ws.release_idle();
        }
        self.rearm(now);
    }

    /// Re-arms the timer for whatever comes first; at the latest one tick
    /// from now, to notice a message or a write that starts stalling in
    /// between.
    fn rearm(&mut self, now: Instant) {
        let limits = &self.route.limits;
        let tick = limits
            .ping_interval
            .min(limits.message_timeout)
            .min(limits.write_timeout);
        let mut next = now + tick;
        let mut due = |t: Option<Instant>| {
            if let Some(t) = t {
                next = next.min(t);
            }
        };
        match self.phase {
            Phase::Closing { by } => due(Some(by)),
            Phase::Draining { at } => due(Some(at)),
            Phase::Open | Phase::Done => {}
        }
        due(self
            .ws
            .unfinished_since()
            .map(|s| s + limits.message_timeout));
        due(self
            .ws
            .write_blocked_since()
            .map(|s| s + limits.write_timeout));
        if self.close.is_none() {
            due(Some(self.next_ping));
            due(Some(self.last_heard + limits.idle_timeout));
            if let Some(auth) = &limits.auth {
                due(auth
                    .time_left(&self.server.auth, self.id)
                    .map(|left| now + left));
            }
        }
        // Never in the past: what was due has been handled.
        self.clock
            .as_mut()
            .reset(next.max(now + Duration::from_millis(1)));
    }

    /// Makes the timer fire by `t` at the latest.
    fn arm(&mut self, t: Instant) {
        if t < self.clock.deadline() {
            self.clock.as_mut().reset(t);
        }
    }

    /// Enters [`Phase::Closing`] (once): from now everything left must
    /// happen within `close_timeout`. Returns the deadline.
    fn closing(&mut self) -> Instant {
        match self.phase {
            Phase::Closing { by } => by,
            Phase::Done => Instant::now(),
            Phase::Open | Phase::Draining { .. } => {
                let by = Instant::now() + self.route.limits.close_timeout;
                self.phase = Phase::Closing { by };
                self.arm(by);
                by
            }
        }
    }

    /// Starts our close handshake with `code` (unless a close already
    /// happened) and enters [`Phase::Closing`].
    async fn close_with(&mut self, code: u16, reason: &str) {
        let by = self.closing();
        let limit = by.saturating_duration_since(Instant::now());
        start_close(&mut self.ws, limit, code, reason, &mut self.close).await;
    }

    /// Ends the connection at once and frees what it holds (see
    /// [`crate::ws::WsConn::cut`]).
    async fn cut(&mut self, code: u16, reason: &'static str) {
        cut(
            &mut self.ws,
            &mut self.close,
            &self.route.limits,
            code,
            reason,
        )
        .await;
        self.phase = Phase::Done;
    }

    /// The connection is gone without a close handshake (1006, unless a
    /// close was already recorded).
    fn drop_connection(&mut self) {
        self.close.get_or_insert(dropped());
        self.phase = Phase::Done;
    }

    /// Applies how a write went: `false` when the connection is gone.
    fn after_write(&mut self, r: Result<(), WriteError>) -> bool {
        match r {
            Ok(()) => true,
            Err(WriteError::Closing(f)) => {
                self.deferred = Some(f);
                true
            }
            Err(e) => {
                e.log(self.id);
                self.drop_connection();
                false
            }
        }
    }

    /// Calls `on_timer` for the connection's timers that fired (ABI 1.2)
    /// and writes what they sent, as for a message.
    async fn fire_timers(&mut self) {
        let fired = self.shared.take_fired_timers();
        if fired.is_empty() || self.close.is_some() {
            return;
        }
        let Some(st) = self.state.take() else {
            return;
        };
        let outbox = std::mem::take(&mut self.outbox);
        let (rc, st, ob) = self.inst.timers(st, self.id, fired, outbox).await;
        self.state = Some(st);
        self.outbox = ob;
        self.after_callback(rc, Callback::Timer).await;
    }

    /// A handover at a message boundary: on success the connection now
    /// belongs to the new version, whose drain (if any) applies instead.
    async fn move_on(&mut self) {
        let Some(moved) = hand_over(&self.inst, &self.shared, self.id, &mut self.state).await
        else {
            return;
        };
        self.inst = moved.route.instance.clone();
        self.route = moved.route;
        // The new version serves it: the old one's drain does not apply
        // any more.
        if let Phase::Draining { .. } = self.phase {
            self.phase = Phase::Open;
        }
        // The new version may have been replaced in turn before the
        // connection reached it.
        self.handover_pending = self.inst.handover_to().is_some();
        if self.inst.drain.is_cancelled() {
            self.shared.signal(ConnShared::RETIRED);
        }
    }

    /// The connection is over: unregisters it, calls `on_close` exactly
    /// once per successful `on_open`, and writes the access line.
    async fn finish(self, started: Instant) {
        let Session {
            ws,
            inst,
            id,
            server,
            peer,
            route,
            shared,
            state,
            stats,
            close,
            ..
        } = self;
        // Unregister first, so sends from handler threads from now on get
        // WSHD_ERR_CLOSED.
        server.conns.unregister(id);
        server.auth.forget(id);
        leave(&shared);
        let close = close.unwrap_or_else(dropped);
        if let Some(st) = state {
            Box::pin(inst.close(st, id, close.code, close.reason.clone(), Some(id))).await;
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
        // Dropping `ws` closes the socket; the close frames were sent or
        // answered already.
        drop(ws);
        // The access line: everything that identifies the connection, so
        // that it stands on its own.
        tracing::info!(
            conn = id,
            %peer,
            path = %route.path,
            handler = %inst.lib.desc.name,
            version = %inst.lib.desc.version,
            generation = inst.lib.generation,
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
    Closing(Box<CloseFrame>),
}

impl WriteError {
    fn log(&self, id: u64) {
        if let WriteError::Stalled(limit) = self {
            tracing::info!(
                conn = id,
                "peer has not read for {limit:?}; dropping the connection"
            );
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

/// How long the next write may wait: what is left of the close deadline
/// once closing, otherwise `write_timeout` minus how long output has
/// already been waiting.
fn write_limit(ws: &Ws, wt: Duration, phase: Phase) -> Duration {
    match phase {
        Phase::Closing { by } => by.saturating_duration_since(Instant::now()),
        _ => ws.write_time_left(wt),
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

/// Queues one message for the next flush and counts it; a close frame
/// starts our close handshake. Nothing may follow a close frame.
fn queue_one(ws: &mut Ws, m: Message, stats: &mut Stats, close: &mut Option<Close>) {
    if close.is_some() {
        return;
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
    ws.queue(m);
}

/// The connection is gone: its subscriptions and timers end (before
/// `on_close`, so a goodbye published there does not go to it).
fn leave(shared: &Arc<ConnShared>) {
    crate::topics::global().leave_all(shared);
    crate::timers::global().drop_conn(shared);
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
                conn = id,
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
                conn = id,
                "handover to {} failed: {e}; the connection stays on {} and drains",
                new.describe(),
                inst.describe()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, F>(_f: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection is a task holding this future, and tokio
    /// allocates a task in 128-byte steps: its header, scheduler handle,
    /// id and trailer add 112 bytes, and the task tracker's token 8. At
    /// 784 bytes or less the cell is 896 bytes; 8 bytes more and every
    /// connection costs 128 more. Rare paths are boxed and the handlers of
    /// an event keep nothing they can do before their first await (see
    /// `on_peer`, `on_message`, `write_batch`); if this fails, find what
    /// grew with `-Zprint-type-sizes` (bench/README.md) before raising it.
    #[test]
    fn an_idle_connection_fits_the_896_byte_task_cell() {
        let size = output_size(run_inner);
        assert!(
            size <= 784,
            "the session future is {size} bytes; over 784 its task cell grows to 1,024 bytes"
        );
    }
}
