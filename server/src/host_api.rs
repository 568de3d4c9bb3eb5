//! The host API: the `wshd_host_api` function table handed to each handler
//! instance. The connections it sends to, and their mailboxes, live in
//! [`crate::mailbox`].
//!
//! Contract (see `wshd_handler.h`): every function is thread-safe, never
//! blocks and never calls back into the handler. Connections are addressed by
//! id, never by pointer, so a send after close is a clean `WSHD_ERR_CLOSED`
//! and a call through a destroyed instance's context is `WSHD_ERR_REVOKED`.
//!
//! Two paths deliver a message:
//! * Fast path: while a callback for connection N runs on this thread, a send
//!   to N goes into that session's [`Outbox`] through a thread-local pointer,
//!   with no lock and no channel; the session writes the outbox to the socket
//!   as one batch when the callback returns.
//! * Any other send (another connection, another thread) looks the id up in
//!   [`Connections`](crate::mailbox::Connections) and pushes onto that connection's bounded queue
//!   ([`ConnShared`](crate::mailbox::ConnShared)), waking its session.
//!
//! Both paths are bounded in messages (`send_queue`) and in payload bytes
//! (`send_queue_bytes`); past either, the route's slow-consumer policy
//! applies ([`ConnShared::offer`](crate::mailbox::ConnShared::offer)). Under `close`, what was queued for the
//! connection is dropped right then, so a reader that stopped reading does
//! not hold memory until its write times out.
//!
//! Payloads are `Bytes`, so one message can sit in many queues at once:
//! `broadcast` (ABI 1.2) builds the message once and queues a clone of the
//! handle to each recipient through [`enqueue`], the per-recipient step
//! that `send` uses too. A send of bytes that lie inside the message being
//! handled (an echo, or a chat relaying what it received) shares that
//! message's buffer instead of copying it.
//!
//! ABI 1.2 also adds topics (`subscribe`, `publish`, ...: membership lives
//! in [`crate::topics`], delivery goes through [`ConnShared::offer`](crate::mailbox::ConnShared::offer) like a
//! broadcast) and timers (`set_timer`, `cancel_timer`: [`crate::timers`]).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use wshd_handler_api::abi::*;

use crate::config::SlowConsumer;
use crate::mailbox::{ConnShared, Connections, fits};

/// Per-instance context behind `host_ctx`. Leaked on purpose: a handler
/// thread that outlives its instance must still find valid memory here, and
/// it costs a few dozen bytes per instance.
#[derive(Debug)]
pub struct HostCtx {
    /// The instance this context belongs to; a handler may only address its
    /// own connections.
    pub instance: u64,
    /// Set after `destroy`; every call then returns `WSHD_ERR_REVOKED`.
    revoked: AtomicBool,
    /// For log lines.
    pub handler: Arc<str>,
    pub route: Arc<str>,
    conns: Arc<Connections>,
    /// The runtime timers are scheduled on (the one `init` ran from); `None`
    /// outside a runtime (unit tests), where `set_timer` is unsupported.
    pub(crate) rt: Option<tokio::runtime::Handle>,
    /// Whether the descriptor has `on_timer` (set by the instance).
    pub(crate) has_on_timer: AtomicBool,
    /// Pending timers set for the instance (conn 0), for the per-instance
    /// cap and to drop them on `destroy`.
    pub(crate) timers: std::sync::Mutex<Vec<u64>>,
    /// The instance, for timers set for it (conn 0); set once the instance
    /// is shared ([`crate::instance::Instance::into_arc`]).
    pub(crate) target: OnceLock<Weak<crate::instance::Instance>>,
}

impl HostCtx {
    /// Marks the instance destroyed, and drops the timers it set for itself
    /// (its connections' timers went with the connections).
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        crate::timers::global().drop_instance(self);
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Connection `conn` if it is open and belongs to this instance.
    pub(crate) fn own_conn(&self, conn: wshd_conn_id) -> Option<Arc<ConnShared>> {
        let shared = self.conns.get(conn)?;
        (shared.owner() == self.instance).then_some(shared)
    }
}

/// Builds the leaked context and function table for one handler instance.
pub fn new_host_api(
    instance: u64,
    handler: Arc<str>,
    route: Arc<str>,
    conns: Arc<Connections>,
) -> &'static HostApiBox {
    let ctx: &'static HostCtx = Box::leak(Box::new(HostCtx {
        instance,
        revoked: AtomicBool::new(false),
        handler,
        route,
        conns,
        rt: tokio::runtime::Handle::try_current().ok(),
        has_on_timer: AtomicBool::new(false),
        timers: Default::default(),
        target: OnceLock::new(),
    }));
    Box::leak(Box::new(HostApiBox {
        api: wshd_host_api {
            struct_size: std::mem::size_of::<wshd_host_api>() as u32,
            abi_major: WSHD_ABI_MAJOR,
            abi_minor: WSHD_ABI_MINOR,
            host_ctx: ctx as *const HostCtx as *mut c_void,
            send: host_send,
            ping: host_ping,
            close: host_close,
            log: host_log,
            hs_select_subprotocol: crate::handshake::hs_select_subprotocol,
            hs_add_header: crate::handshake::hs_add_header,
            hs_reject: crate::handshake::hs_reject,
            log_level: host_log_level,
            broadcast: host_broadcast,
            subscribe: host_subscribe,
            unsubscribe: host_unsubscribe,
            is_subscribed: host_is_subscribed,
            publish: host_publish,
            subscribers: host_subscribers,
            set_timer: host_set_timer,
            cancel_timer: host_cancel_timer,
            subscribers_cluster: host_subscribers_cluster,
        },
        ctx,
    }))
}

/// A host table together with its typed context.
#[derive(Debug)]
pub struct HostApiBox {
    pub api: wshd_host_api,
    pub ctx: &'static HostCtx,
}

/// Messages a callback queued for its own connection (the fast path).
#[derive(Debug)]
pub struct Outbox {
    /// In order; a deque so the session can write a long outbox in
    /// batches, taking from the front, without keeping an iterator in its
    /// task across the writes.
    pub msgs: std::collections::VecDeque<Message>,
    /// Capacity before `slow_consumer` applies (the send queue length).
    pub limit: usize,
    /// Payload bytes before `slow_consumer` applies (`send_queue_bytes`);
    /// as for the queue, an empty outbox takes any one message.
    pub limit_bytes: usize,
    /// Set when the limit was hit under the `close` policy.
    pub overflowed: bool,
    /// The connection is gone (during `on_close`): sends to it get
    /// `WSHD_ERR_CLOSED`.
    pub closed: bool,
    pub slow_consumer: Option<SlowConsumer>,
    /// The connection's id: handler log lines made during a callback
    /// carry it as `conn`, like the session's own lines.
    pub conn: Option<u64>,
}

impl Default for Outbox {
    /// An outbox with no room (`limit` 0: every send is refused) and no byte
    /// bound; sessions set both from the route's limits.
    fn default() -> Outbox {
        Outbox {
            msgs: Default::default(),
            limit: 0,
            limit_bytes: usize::MAX,
            overflowed: false,
            closed: false,
            slow_consumer: None,
            conn: None,
        }
    }
}

#[derive(Clone, Copy)]
struct Current {
    conn: wshd_conn_id,
    outbox: *mut Outbox,
    /// Payload bytes in the outbox, kept here rather than in [`Outbox`]
    /// because the session empties the outbox between callbacks.
    outbox_bytes: usize,
    /// The payload of the message being handled (null if none), so a send
    /// of bytes inside it (an echo) can share the buffer instead of copying.
    inbound: *const bytes::Bytes,
    /// `inbound` is a text payload, already checked to be UTF-8.
    inbound_text: bool,
}

/// The message a callback is handling, as `with_outbox` needs it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub payload: &'a bytes::Bytes,
    /// A text message: tungstenite has checked that it is UTF-8.
    pub text: bool,
}

thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
    /// A host call made during the running callback was refused for a
    /// server-enforced cap (`WSHD_ERR_LIMIT`: topics, timers).
    static LIMIT_HIT: Cell<bool> = const { Cell::new(false) };
}

/// Records that a host call is returning `WSHD_ERR_LIMIT`, when it does:
/// if the callback then fails, the failure is the server's limit, not the
/// handler's fault ([`callback_outcome`]).
fn note_limit<T: PartialEq + From<i32>>(rc: T) -> T {
    if rc == T::from(WSHD_ERR_LIMIT) {
        LIMIT_HIT.with(|h| h.set(true));
    }
    rc
}

/// What a callback that ends the connection on failure (`on_open`,
/// `on_message`) returned, as the server treats it. A failure is the
/// server's limit, `WSHD_ERR_LIMIT`, when the handler says so itself (its
/// own "full") or when it failed after a host call of the same callback was
/// refused for a cap: the client gets 1013 Try Again Later, and neither a
/// canary's rollback nor quarantine counts it. A panic is always the
/// handler's fault. Call it right after the callback, on its thread.
pub fn callback_outcome(rc: i32) -> i32 {
    let hit = LIMIT_HIT.with(|h| h.replace(false));
    if rc != WSHD_OK && rc != WSHD_ERR_PANIC && hit {
        WSHD_ERR_LIMIT
    } else {
        rc
    }
}

/// Runs `f` (a handler callback for `conn`) with `outbox` as the fast path for
/// sends to `conn` made on this thread; `inbound` is the message `f` is
/// handling, if any.
pub fn with_outbox<R>(
    conn: wshd_conn_id,
    outbox: &mut Outbox,
    inbound: Option<Inbound<'_>>,
    f: impl FnOnce() -> R,
) -> R {
    struct Reset(Option<Current>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let prev = CURRENT.with(|c| {
        c.replace(Some(Current {
            conn,
            outbox_bytes: outbox.msgs.iter().map(Message::len).sum(),
            outbox: outbox as *mut Outbox,
            inbound: inbound.map_or(std::ptr::null(), |m| m.payload as *const bytes::Bytes),
            inbound_text: inbound.is_some_and(|m| m.text),
        }))
    });
    let _reset = Reset(prev);
    LIMIT_HIT.with(|h| h.set(false));
    f()
}

/// Queues `msg` for `conn` on behalf of instance `ctx`.
fn deliver(ctx: &HostCtx, conn: wshd_conn_id, msg: Message) -> i32 {
    if ctx.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED;
    }
    enqueue(ctx, conn, msg)
}

/// Queues one message for one connection of instance `ctx` (not checking
/// `revoked`): through the outbox when a callback for `conn` is running on
/// this thread, so the message stays in order with that callback's other
/// sends, otherwise through the connection's queue ([`ConnShared::offer`](crate::mailbox::ConnShared::offer)).
/// Either way the connection's bounds and slow-consumer policy apply.
/// Unknown, closed and other instances' connections get `WSHD_ERR_CLOSED`.
///
/// The per-recipient step of `send` and `broadcast`; a fan-out calls it with
/// a clone of one message, whose payload is then shared, not copied.
pub fn enqueue(ctx: &HostCtx, conn: wshd_conn_id, msg: Message) -> i32 {
    let fast = CURRENT.with(|c| c.get()).filter(|cur| cur.conn == conn);
    if let Some(cur) = fast {
        return outbox_push(ctx, cur, msg);
    }
    let Some(shared) = ctx.conns.get(conn) else {
        return WSHD_ERR_CLOSED;
    };
    if shared.owner() != ctx.instance {
        return WSHD_ERR_CLOSED;
    }
    if let Message::Close(Some(f)) = msg {
        // A close always gets through, even with a full queue; the session
        // sends what is queued first.
        shared.request_close(f.code.into(), &f.reason);
        return WSHD_OK;
    }
    shared.offer(conn, &ctx.route, msg)
}

/// The fast path of [`enqueue`]: `msg` for `cur.conn`, whose callback is
/// running on this thread, goes into that callback's outbox, within its
/// bounds.
fn outbox_push(ctx: &HostCtx, mut cur: Current, msg: Message) -> i32 {
    let conn = cur.conn;
    // SAFETY: `with_outbox` set this pointer from a `&mut Outbox` that
    // outlives the callback, and resets it when the callback returns;
    // host functions never re-enter the handler, so no other reference
    // to the outbox is live while we push.
    let outbox = unsafe { &mut *cur.outbox };
    // After a slow-consumer overflow the connection is closing with 1008.
    if outbox.closed || outbox.overflowed {
        return WSHD_ERR_CLOSED;
    }
    let len = msg.len();
    let full = !fits(
        outbox.msgs.len(),
        cur.outbox_bytes,
        outbox.limit,
        outbox.limit_bytes,
        len,
    );
    if full && !matches!(msg, Message::Close(_)) {
        if outbox.slow_consumer == Some(SlowConsumer::Close) {
            // The session closes with 1008 when the callback returns
            // and logs it; what is queued for the connection, here and
            // in its queue, is dropped now.
            outbox.overflowed = true;
            outbox.msgs = Default::default();
            cur.outbox_bytes = 0;
            CURRENT.with(|c| c.set(Some(cur)));
            if let Some(shared) = ctx.conns.get(conn)
                && shared.owner() == ctx.instance
            {
                shared.shed();
            }
        }
        return WSHD_ERR_BACKPRESSURE;
    }
    outbox.msgs.push_back(msg);
    cur.outbox_bytes += len;
    CURRENT.with(|c| c.set(Some(cur)));
    WSHD_OK
}

/// Borrows `(ptr, len)` as bytes; NULL with length 0 is the empty slice.
///
/// # Safety
/// `ptr` must be valid for `len` bytes for the returned lifetime, or `len`
/// must be 0.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees ptr is valid for len bytes.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Borrows a `wshd_str` as bytes.
///
/// # Safety
/// As for [`bytes`].
pub(crate) unsafe fn str_bytes<'a>(s: wshd_str) -> Option<&'a [u8]> {
    // SAFETY: forwarded contract.
    unsafe { bytes(s.ptr, s.len) }
}

/// # Safety
/// `ctx` must be a `host_ctx` from [`new_host_api`] (they are never freed).
unsafe fn ctx_ref<'a>(ctx: *mut c_void) -> Option<&'a HostCtx> {
    // SAFETY: host contexts are leaked `HostCtx` values, valid forever.
    unsafe { (ctx as *const HostCtx).as_ref() }
}

unsafe extern "C" fn host_send(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32 {
    // SAFETY: the handler passes back the host_ctx we gave it (ABI rule 4).
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: the handler lends (data, len) for the duration of this call.
    let Some(data) = (unsafe { bytes(data, len) }) else {
        return WSHD_ERR_INVALID;
    };
    match message(kind, data) {
        Ok(msg) => deliver(ctx, conn, msg),
        Err(rc) => rc,
    }
}

/// A text or binary message holding `data`: a slice of the inbound message
/// when `data` lies inside it, otherwise one copy. Text must be UTF-8.
///
/// With `WSHD_SEND_NO_COMPRESS` in `kind`, the message is a ready frame
/// (`Message::Frame`), which the connection writes as it is: never
/// compressed (ws.rs).
fn message(kind: u32, data: &[u8]) -> Result<Message, i32> {
    if kind & WSHD_SEND_NO_COMPRESS != 0 {
        use tungstenite::protocol::frame::Frame;
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        let op = if kind & !WSHD_SEND_NO_COMPRESS == WSHD_MSG_TEXT {
            Data::Text
        } else {
            Data::Binary
        };
        let msg = message(kind & !WSHD_SEND_NO_COMPRESS, data)?;
        return Ok(Message::Frame(Frame::message(
            msg.into_data(),
            OpCode::Data(op),
            true,
        )));
    }
    if kind != WSHD_MSG_TEXT && kind != WSHD_MSG_BINARY {
        return Err(WSHD_ERR_INVALID);
    }
    let shared = shared_slice(data);
    // An echo of (part of) a text message was validated when it arrived.
    let known_utf8 = shared.as_ref().is_some_and(|s| s.utf8);
    if kind == WSHD_MSG_TEXT && !known_utf8 && std::str::from_utf8(data).is_err() {
        return Err(WSHD_ERR_INVALID);
    }
    let payload = shared.map_or_else(|| bytes::Bytes::copy_from_slice(data), |s| s.bytes);
    Ok(if kind == WSHD_MSG_TEXT {
        // SAFETY: `payload` holds the bytes of `data`, checked to be UTF-8 above.
        Message::Text(unsafe { tungstenite::Utf8Bytes::from_bytes_unchecked(payload) })
    } else {
        Message::Binary(payload)
    })
}

/// Borrows `n` connection ids at `ptr`; (NULL, 0) is empty. `None` for a
/// NULL or misaligned pointer with `n > 0`, or an impossible `n`.
///
/// # Safety
/// A non-null, aligned `ptr` must be valid for reading `n` ids during the
/// returned lifetime.
unsafe fn ids<'a>(ptr: *const wshd_conn_id, n: usize) -> Option<&'a [wshd_conn_id]> {
    if n == 0 {
        return Some(&[]);
    }
    let fits = n
        .checked_mul(std::mem::size_of::<wshd_conn_id>())
        .is_some_and(|b| b <= isize::MAX as usize);
    if ptr.is_null() || !ptr.is_aligned() || !fits {
        return None;
    }
    // SAFETY: non-null, aligned, the size fits in isize, and the caller
    // guarantees `n` readable ids.
    Some(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// `broadcast` (ABI 1.2): builds the message once and queues a clone (a new
/// reference to the same payload) to each listed connection.
unsafe extern "C" fn host_broadcast(
    ctx: *mut c_void,
    conns: *const wshd_conn_id,
    n: usize,
    kind: u32,
    data: *const u8,
    len: usize,
    delivered: *mut usize,
) -> i32 {
    let report = |count: usize| {
        if !delivered.is_null() {
            // SAFETY: the handler lends a writable `size_t` for this call;
            // unaligned in case it packed it.
            unsafe { delivered.write_unaligned(count) };
        }
    };
    report(0);
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID;
    };
    if ctx.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED;
    }
    // SAFETY: the handler lends the id array for this call.
    let Some(ids) = (unsafe { ids(conns, n) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: and the payload.
    let Some(data) = (unsafe { bytes(data, len) }) else {
        return WSHD_ERR_INVALID;
    };
    let msg = match message(kind, data) {
        Ok(msg) => msg,
        Err(rc) => return rc,
    };
    let count = ids
        .iter()
        .filter(|&&id| enqueue(ctx, id, msg.clone()) == WSHD_OK)
        .count();
    report(count);
    WSHD_OK
}

/// Checks the context and borrows a topic name: `Err(status)` if revoked
/// or the name is not 1..=256 bytes of UTF-8.
///
/// # Safety
/// `ctx` as for [`ctx_ref`]; `topic` borrowed for `'a`.
unsafe fn topic_call<'a>(ctx: *mut c_void, topic: wshd_str) -> Result<(&'a HostCtx, &'a str), i32> {
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return Err(WSHD_ERR_INVALID);
    };
    if ctx.is_revoked() {
        return Err(WSHD_ERR_REVOKED);
    }
    // SAFETY: the handler lends the name for this call.
    let name = unsafe { str_bytes(topic) }.ok_or(WSHD_ERR_INVALID)?;
    Ok((ctx, crate::topics::topic_name(name)?))
}

/// [`topic_call`] for a call about one of the caller's connections: also
/// `Err(WSHD_ERR_CLOSED)` when `conn` is not open or not this instance's.
///
/// # Safety
/// As for [`topic_call`].
unsafe fn conn_topic_call<'a>(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    topic: wshd_str,
) -> Result<(&'a HostCtx, Arc<ConnShared>, &'a str), i32> {
    // SAFETY: the caller's contract.
    let (ctx, name) = unsafe { topic_call(ctx, topic) }?;
    let shared = ctx.own_conn(conn).ok_or(WSHD_ERR_CLOSED)?;
    Ok((ctx, shared, name))
}

/// `subscribe` (ABI 1.2).
unsafe extern "C" fn host_subscribe(ctx: *mut c_void, conn: wshd_conn_id, topic: wshd_str) -> i32 {
    // SAFETY: the handler passes back our host_ctx and lends the name.
    let (ctx, shared, name) = match unsafe { conn_topic_call(ctx, conn, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    match crate::topics::global().subscribe(conn, &shared, &ctx.route, name) {
        Ok(()) => WSHD_OK,
        Err(rc) => note_limit(rc),
    }
}

/// `unsubscribe` (ABI 1.2).
unsafe extern "C" fn host_unsubscribe(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    topic: wshd_str,
) -> i32 {
    // SAFETY: as in host_subscribe.
    let (_, shared, name) = match unsafe { conn_topic_call(ctx, conn, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    crate::topics::global().unsubscribe(&shared, name);
    WSHD_OK
}

/// `is_subscribed` (ABI 1.2): 1 or 0.
unsafe extern "C" fn host_is_subscribed(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    topic: wshd_str,
) -> i32 {
    // SAFETY: as in host_subscribe.
    let (_, shared, name) = match unsafe { conn_topic_call(ctx, conn, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    i32::from(crate::topics::global().is_subscribed(&shared, name))
}

/// `publish` (ABI 1.2): builds the message once, then offers a clone to
/// every subscriber, on any route and any handler version.
unsafe extern "C" fn host_publish(
    ctx: *mut c_void,
    topic: wshd_str,
    kind: u32,
    data: *const u8,
    len: usize,
    exclude: wshd_conn_id,
) -> i64 {
    // SAFETY: as in host_subscribe.
    let (ctx, name) = match unsafe { topic_call(ctx, topic) } {
        Ok(v) => v,
        Err(rc) => return rc.into(),
    };
    // SAFETY: the handler lends the payload for this call.
    let Some(data) = (unsafe { bytes(data, len) }) else {
        return WSHD_ERR_INVALID.into();
    };
    let msg = match message(kind, data) {
        Ok(msg) => msg,
        Err(rc) => return rc.into(),
    };
    // Inside a callback, its own connection (if subscribed) gets the message
    // through its outbox, in order with the callback's sends. Looked up once
    // per publish, not per subscriber.
    let current = CURRENT.with(|c| c.get());
    let mut delivery = crate::topics::Delivery::new(&msg);
    let n = crate::topics::global().publish(name, &msg, exclude, |sub, m| match current {
        // The callback running on this thread is this subscriber's: its
        // outbox keeps the message in order with the callback's sends.
        Some(cur) if cur.conn == sub.id => outbox_push(ctx, cur, m),
        _ => delivery.to(sub, m),
    });
    n as i64
}

/// `subscribers` (ABI 1.2).
unsafe extern "C" fn host_subscribers(ctx: *mut c_void, topic: wshd_str) -> i64 {
    // SAFETY: as in host_subscribe.
    match unsafe { topic_call(ctx, topic) } {
        Ok((_, name)) => crate::topics::global().subscribers(name) as i64,
        Err(rc) => rc.into(),
    }
}

/// `subscribers_cluster` (ABI 1.2): never waits on Redis (cluster.rs caches
/// the other nodes' counts).
unsafe extern "C" fn host_subscribers_cluster(ctx: *mut c_void, topic: wshd_str) -> i64 {
    // SAFETY: as in host_subscribe.
    match unsafe { topic_call(ctx, topic) } {
        Ok((_, name)) => {
            i64::try_from(crate::topics::global().subscribers_cluster(name)).unwrap_or(i64::MAX)
        }
        Err(rc) => rc.into(),
    }
}

/// `set_timer` (ABI 1.2).
unsafe extern "C" fn host_set_timer(ctx: *mut c_void, conn: wshd_conn_id, delay_ms: u64) -> i64 {
    // SAFETY: as in host_send; contexts are leaked, so 'static is right.
    let Some(ctx): Option<&'static HostCtx> = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID.into();
    };
    match crate::timers::global().set(ctx, conn, delay_ms) {
        Ok(id) => id as i64,
        Err(rc) => note_limit(i64::from(rc)),
    }
}

/// `cancel_timer` (ABI 1.2).
unsafe extern "C" fn host_cancel_timer(ctx: *mut c_void, timer: u64) -> i32 {
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID;
    };
    if ctx.is_revoked() {
        return WSHD_ERR_REVOKED;
    }
    crate::timers::global().cancel(ctx, timer)
}

unsafe extern "C" fn host_ping(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    data: *const u8,
    len: usize,
) -> i32 {
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: borrowed for this call.
    let Some(data) = (unsafe { bytes(data, len) }) else {
        return WSHD_ERR_INVALID;
    };
    if data.len() > 125 {
        return WSHD_ERR_INVALID;
    }
    deliver(
        ctx,
        conn,
        Message::Ping(bytes::Bytes::copy_from_slice(data)),
    )
}

/// Bytes of the inbound message, shared rather than copied.
struct Shared {
    bytes: bytes::Bytes,
    /// Known to be UTF-8 without checking again.
    utf8: bool,
}

/// If `data` lies inside the payload of the message a callback on this
/// thread is handling, the same bytes as a shared slice (no copy), whichever
/// connection they are sent to.
fn shared_slice(data: &[u8]) -> Option<Shared> {
    let cur = CURRENT.with(|c| c.get()).filter(|c| !c.inbound.is_null())?;
    // SAFETY: `with_outbox` set `inbound` from a reference that outlives the
    // running callback, and clears it when the callback returns.
    let inbound = unsafe { &*cur.inbound };
    let start = (data.as_ptr() as usize).checked_sub(inbound.as_ptr() as usize)?;
    let end = start.checked_add(data.len())?;
    if end > inbound.len() || data.is_empty() {
        return None;
    }
    // A slice of UTF-8 text is UTF-8 when both its ends fall on character
    // boundaries, i.e. not on a continuation byte (0b10xx_xxxx).
    let boundary = |i: usize| i == inbound.len() || (inbound[i] as i8) >= -0x40;
    Some(Shared {
        bytes: inbound.slice(start..end),
        utf8: cur.inbound_text && boundary(start) && boundary(end),
    })
}

/// Close codes a server may send (RFC 6455 §7.4): 1000-1003, 1007-1014 and
/// the application range 3000-4999. 1004-1006 and 1015 are reserved.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

unsafe extern "C" fn host_close(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    code: u16,
    reason: wshd_str,
) -> i32 {
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: borrowed for this call.
    let Some(reason) = (unsafe { str_bytes(reason) }) else {
        return WSHD_ERR_INVALID;
    };
    let Ok(reason) = std::str::from_utf8(reason) else {
        return WSHD_ERR_INVALID;
    };
    if !valid_close_code(code) || reason.len() > 123 {
        return WSHD_ERR_INVALID;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    deliver(ctx, conn, Message::Close(Some(frame)))
}

/// The most verbose level at which `host_log` lines are written now: the
/// handler's SDK filters at it, so `--log-level debug` reaches handlers too.
unsafe extern "C" fn host_log_level(_ctx: *mut c_void) -> u32 {
    // `host_log` writes with target "handler"; ask the filter about it.
    if tracing::enabled!(target: "handler", tracing::Level::TRACE) {
        WSHD_LOG_TRACE
    } else if tracing::enabled!(target: "handler", tracing::Level::DEBUG) {
        WSHD_LOG_DEBUG
    } else if tracing::enabled!(target: "handler", tracing::Level::INFO) {
        WSHD_LOG_INFO
    } else if tracing::enabled!(target: "handler", tracing::Level::WARN) {
        WSHD_LOG_WARN
    } else if tracing::enabled!(target: "handler", tracing::Level::ERROR) {
        WSHD_LOG_ERROR
    } else {
        0
    }
}

/// Bytes of one handler log message that reach the log.
const HANDLER_LOG_CAP: usize = 4096;

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, target: wshd_str, msg: wshd_str) {
    // SAFETY: as in host_send.
    let Some(ctx) = (unsafe { ctx_ref(ctx) }) else {
        return;
    };
    // SAFETY: borrowed for this call.
    let target = unsafe { str_bytes(target) }
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    // SAFETY: borrowed for this call.
    let msg = unsafe { str_bytes(msg) }.unwrap_or_default();
    // Handlers often log what a client sent them: escaped like every other
    // client-controlled value (a `\n` must not forge a line), with a cap
    // large enough for a real message.
    let msg = crate::logsafe::esc_cap(msg, HANDLER_LOG_CAP);
    let handler = &*ctx.handler;
    let route = &*ctx.route;
    let conn: Option<u64> = CURRENT.with(|c| c.get()).and_then(|cur| {
        // SAFETY: set by `with_outbox` for the running callback on this
        // thread; only read here, while no other reference is in use.
        unsafe { (*cur.outbox).conn }
    });
    // tracing needs the level at compile time, hence one macro per level.
    match level {
        WSHD_LOG_ERROR => {
            tracing::error!(target: "handler", conn, handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_WARN => {
            tracing::warn!(target: "handler", conn, handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_INFO => {
            tracing::info!(target: "handler", conn, handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_DEBUG => {
            tracing::debug!(target: "handler", conn, handler, route, module = %target, "{msg}")
        }
        _ => {
            tracing::trace!(target: "handler", conn, handler, route, module = %target, "{msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_compress_flag_makes_a_ready_frame() {
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        let m = message(WSHD_MSG_TEXT | WSHD_SEND_NO_COMPRESS, b"secret").unwrap();
        let Message::Frame(f) = m else {
            panic!("not a ready frame: {m:?}")
        };
        assert_eq!(f.header().opcode, OpCode::Data(Data::Text));
        assert!(f.header().is_final && !f.header().rsv1);
        assert_eq!(f.payload(), b"secret");
        let m = message(WSHD_MSG_BINARY | WSHD_SEND_NO_COMPRESS, &[1, 2]).unwrap();
        assert!(matches!(m, Message::Frame(f) if f.header().opcode == OpCode::Data(Data::Binary)));
        // The flag does not excuse a bad kind or bad text.
        assert_eq!(
            message(7 | WSHD_SEND_NO_COMPRESS, b"x").unwrap_err(),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            message(WSHD_MSG_TEXT | WSHD_SEND_NO_COMPRESS, &[0xff]).unwrap_err(),
            WSHD_ERR_INVALID
        );
        // Without it, plain messages (compressible on a deflate connection).
        assert!(matches!(
            message(WSHD_MSG_TEXT, b"x").unwrap(),
            Message::Text(_)
        ));
    }

    fn api(conns: &Arc<Connections>) -> &'static HostApiBox {
        new_host_api(7, "t".into(), "/t".into(), conns.clone())
    }

    /// A waker that counts its wakes.
    #[test]
    fn send_to_unknown_or_foreign_conn_is_closed() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(99, 2, 1 << 20, SlowConsumer::Error));
        conns.register(5, shared.clone(), &[]);
        // SAFETY: a valid context and a valid (ptr, len).
        let rc = unsafe { (a.api.send)(a.api.host_ctx, 5, WSHD_MSG_TEXT, b"hi".as_ptr(), 2) };
        assert_eq!(rc, WSHD_ERR_CLOSED, "another instance's connection");
        // SAFETY: as above.
        let rc = unsafe { (a.api.send)(a.api.host_ctx, 6, WSHD_MSG_TEXT, b"hi".as_ptr(), 2) };
        assert_eq!(rc, WSHD_ERR_CLOSED, "unknown connection");
        assert!(!shared.has_queued());
    }

    #[test]
    fn after_a_handover_the_old_version_is_refused_and_the_new_one_sends() {
        let conns = Arc::new(Connections::default());
        let (old, new) = (
            api(&conns),
            new_host_api(8, "t".into(), "/t".into(), conns.clone()),
        );
        let shared = Arc::new(ConnShared::new(7, 8, 1 << 20, SlowConsumer::Error));
        conns.register(5, shared.clone(), &[]);
        // SAFETY: valid contexts and buffers.
        let send = |a: &HostApiBox| unsafe {
            (a.api.send)(a.api.host_ctx, 5, WSHD_MSG_TEXT, b"hi".as_ptr(), 2)
        };
        assert_eq!((send(old), send(new)), (WSHD_OK, WSHD_ERR_CLOSED));
        shared.set_owner(8);
        assert_eq!(
            (send(old), send(new)),
            (WSHD_ERR_CLOSED, WSHD_OK),
            "a moved connection belongs to its new version only"
        );
        // SAFETY: a valid context and topic.
        let sub = |a: &HostApiBox| unsafe {
            (a.api.subscribe)(a.api.host_ctx, 5, wshd_str::from_str("t"))
        };
        assert_eq!(sub(old), WSHD_ERR_CLOSED);
    }

    #[test]
    fn queue_full_and_revoked() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(7, 1, 1 << 20, SlowConsumer::Close));
        conns.register(5, shared.clone(), &[]);
        // SAFETY: valid context and buffers.
        let send = |data: &[u8], kind| unsafe {
            (a.api.send)(a.api.host_ctx, 5, kind, data.as_ptr(), data.len())
        };
        assert_eq!(send(b"one", WSHD_MSG_TEXT), WSHD_OK);
        assert_eq!(send(b"two", WSHD_MSG_TEXT), WSHD_ERR_BACKPRESSURE);
        let close = shared
            .take_close_request()
            .expect("close policy asks the session to close");
        assert_eq!(u16::from(close.code), 1008);
        assert_eq!(
            send(&[0xff, 0xfe], WSHD_MSG_TEXT),
            WSHD_ERR_INVALID,
            "text must be UTF-8"
        );
        a.ctx.revoke();
        assert_eq!(send(b"x", WSHD_MSG_BINARY), WSHD_ERR_REVOKED);
    }

    #[test]
    fn fast_path_goes_to_outbox() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let mut outbox = Outbox {
            limit: 1,
            slow_consumer: Some(SlowConsumer::Close),
            ..Default::default()
        };
        let (r1, r2) = with_outbox(42, &mut outbox, None, || {
            // SAFETY: valid context and buffers.
            unsafe {
                (
                    (a.api.send)(a.api.host_ctx, 42, WSHD_MSG_TEXT, b"a".as_ptr(), 1),
                    (a.api.send)(a.api.host_ctx, 42, WSHD_MSG_TEXT, b"b".as_ptr(), 1),
                )
            }
        });
        assert_eq!((r1, r2), (WSHD_OK, WSHD_ERR_BACKPRESSURE));
        assert!(outbox.overflowed);
        assert!(
            outbox.msgs.is_empty(),
            "the close policy drops what was queued; only the 1008 close is sent"
        );
        assert!(
            CURRENT.with(|c| c.get()).is_none(),
            "reset after the callback"
        );
    }

    #[test]
    fn echo_of_the_inbound_payload_shares_its_buffer() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let inbound = bytes::Bytes::from_static(b"hello world");
        let mut outbox = Outbox {
            limit: 8,
            ..Default::default()
        };
        let text = Inbound {
            payload: &inbound,
            text: true,
        };
        with_outbox(9, &mut outbox, Some(text), || {
            // SAFETY: valid context; the slices point into `inbound` and a
            // local array.
            unsafe {
                assert_eq!(
                    (a.api.send)(a.api.host_ctx, 9, WSHD_MSG_TEXT, inbound.as_ptr().add(6), 5),
                    WSHD_OK
                );
                let other = *b"copy";
                assert_eq!(
                    (a.api.send)(a.api.host_ctx, 9, WSHD_MSG_BINARY, other.as_ptr(), 4),
                    WSHD_OK
                );
            }
        });
        let Message::Text(t) = &outbox.msgs[0] else {
            panic!()
        };
        assert_eq!(t.as_str(), "world");
        let shared: &bytes::Bytes = t.as_ref();
        assert_eq!(
            shared.as_ptr(),
            inbound[6..].as_ptr(),
            "no copy for a slice of the inbound message"
        );
        assert_eq!(outbox.msgs[1], Message::binary(&b"copy"[..]));
    }

    #[test]
    fn text_slices_of_the_inbound_message_must_keep_whole_characters() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        // "é" is 0xC3 0xA9: offsets 1..3 hold it whole, 2 is inside it.
        let inbound = bytes::Bytes::from("hé!");
        let mut outbox = Outbox {
            limit: 8,
            ..Default::default()
        };
        let send = |off: usize, len: usize| {
            // SAFETY: valid context; the slice lies inside `inbound`.
            unsafe {
                (a.api.send)(
                    a.api.host_ctx,
                    5,
                    WSHD_MSG_TEXT,
                    inbound.as_ptr().add(off),
                    len,
                )
            }
        };
        let text = Inbound {
            payload: &inbound,
            text: true,
        };
        let rcs = with_outbox(5, &mut outbox, Some(text), || {
            [send(0, 4), send(1, 2), send(2, 2), send(0, 2)]
        });
        assert_eq!(
            rcs,
            [WSHD_OK, WSHD_OK, WSHD_ERR_INVALID, WSHD_ERR_INVALID],
            "whole message, whole character, then two slices that cut \"é\""
        );
        assert_eq!(outbox.msgs, vec![Message::text("hé!"), Message::text("é")]);

        // The same bytes as a binary message prove nothing about UTF-8.
        let invalid = bytes::Bytes::from_static(&[0xff, b'a']);
        let binary = Inbound {
            payload: &invalid,
            text: false,
        };
        let rc = with_outbox(5, &mut outbox, Some(binary), || unsafe {
            // SAFETY: valid context; the slice is `invalid` itself.
            (a.api.send)(a.api.host_ctx, 5, WSHD_MSG_TEXT, invalid.as_ptr(), 2)
        });
        assert_eq!(rc, WSHD_ERR_INVALID);
    }

    /// `send` through the table, as a handler would.
    fn send(a: &HostApiBox, conn: u64, data: &[u8]) -> i32 {
        // SAFETY: a valid context and a borrowed buffer.
        unsafe {
            (a.api.send)(
                a.api.host_ctx,
                conn,
                WSHD_MSG_BINARY,
                data.as_ptr(),
                data.len(),
            )
        }
    }

    /// `broadcast` through the table: `(status, delivered)`.
    fn broadcast(a: &HostApiBox, ids: &[u64], kind: u32, data: &[u8]) -> (i32, usize) {
        let mut delivered = usize::MAX;
        // SAFETY: a valid context, borrowed ids and payload, a live out-slot.
        let rc = unsafe {
            (a.api.broadcast)(
                a.api.host_ctx,
                ids.as_ptr(),
                ids.len(),
                kind,
                data.as_ptr(),
                data.len(),
                &mut delivered,
            )
        };
        (rc, delivered)
    }

    fn taken(shared: &ConnShared) -> Vec<Message> {
        let mut out = std::collections::VecDeque::new();
        shared.take(&mut out, usize::MAX);
        out.into()
    }

    #[test]
    fn byte_bound_refuses_and_error_policy_keeps_the_queue() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        // Room for 100 messages but only 10 bytes.
        let shared = Arc::new(ConnShared::new(7, 100, 10, SlowConsumer::Error));
        conns.register(5, shared.clone(), &[]);
        assert_eq!(send(a, 5, b"123456"), WSHD_OK);
        assert_eq!(send(a, 5, b"1234"), WSHD_OK, "exactly at the bound");
        assert_eq!(send(a, 5, b"x"), WSHD_ERR_BACKPRESSURE, "one byte past it");
        assert_eq!(shared.queued(), (2, 10));
        assert!(
            shared.take_close_request().is_none(),
            "error policy: no close"
        );
        assert_eq!(taken(&shared).len(), 2);
        assert_eq!(shared.queued(), (0, 0), "taking gives the bytes back");
        // An empty queue takes one message larger than the whole bound.
        assert_eq!(send(a, 5, &[0; 64]), WSHD_OK);
        assert_eq!(send(a, 5, b"y"), WSHD_ERR_BACKPRESSURE);
    }

    #[test]
    fn slow_consumer_close_drops_the_queue_at_once() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(7, 100, 1000, SlowConsumer::Close));
        conns.register(5, shared.clone(), &[]);
        let big = bytes::Bytes::from(vec![7u8; 600]);
        assert_eq!(shared.offer(5, "/t", Message::Binary(big.clone())), WSHD_OK);
        assert_eq!(
            shared.offer(5, "/t", Message::Binary(big.clone())),
            WSHD_ERR_BACKPRESSURE
        );
        assert_eq!(shared.queued(), (0, 0), "queued data is freed now");
        assert_eq!(
            big.try_into_mut().map(|b| b.len()),
            Ok(600),
            "no queue still holds a reference to the payload"
        );
        let close = shared.take_close_request().expect("asks for the close");
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (1008, "slow consumer")
        );
        assert_eq!(
            send(a, 5, b"late"),
            WSHD_ERR_CLOSED,
            "nothing more is taken"
        );
        assert!(!shared.has_queued());
        assert_eq!(shared.shed(), None, "shed once");
    }

    #[test]
    fn fast_path_obeys_the_byte_bound_and_drops_everything_on_close() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(7, 100, 1000, SlowConsumer::Close));
        conns.register(42, shared.clone(), &[]);
        assert_eq!(send(a, 42, b"from another thread"), WSHD_OK);
        let mut outbox = Outbox {
            limit: 100,
            limit_bytes: 8,
            slow_consumer: Some(SlowConsumer::Close),
            ..Default::default()
        };
        let rcs = with_outbox(42, &mut outbox, None, || {
            [
                send(a, 42, b"12345"),
                send(a, 42, b"123"),
                send(a, 42, b"1"),
                send(a, 42, b"2"),
            ]
        });
        assert_eq!(
            rcs,
            [WSHD_OK, WSHD_OK, WSHD_ERR_BACKPRESSURE, WSHD_ERR_CLOSED],
            "8 bytes fit, the 9th overflows, then the connection is closing"
        );
        assert!(
            outbox.overflowed && outbox.msgs.is_empty(),
            "outbox dropped"
        );
        assert_eq!(shared.queued(), (0, 0), "and the queue too");

        // Error policy: refused, nothing dropped; the next callback starts
        // from what the session left in the outbox.
        let mut outbox = Outbox {
            limit: 100,
            limit_bytes: 8,
            slow_consumer: Some(SlowConsumer::Error),
            ..Default::default()
        };
        let rcs = with_outbox(43, &mut outbox, None, || {
            [send(a, 43, b"12345678"), send(a, 43, b"9")]
        });
        assert_eq!(rcs, [WSHD_OK, WSHD_ERR_BACKPRESSURE]);
        let rc = with_outbox(43, &mut outbox, None, || send(a, 43, b"9"));
        assert_eq!(
            rc, WSHD_ERR_BACKPRESSURE,
            "still full: the session did not write"
        );
        assert!(!outbox.overflowed);
    }

    #[test]
    fn broadcast_stores_the_payload_once_and_each_recipient_has_its_own_bounds() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let fast = Arc::new(ConnShared::new(7, 100, 1 << 20, SlowConsumer::Close));
        let slow = Arc::new(ConnShared::new(7, 1, 1 << 20, SlowConsumer::Close));
        let foreign = Arc::new(ConnShared::new(99, 100, 1 << 20, SlowConsumer::Close));
        conns.register(1, fast.clone(), &[]);
        conns.register(2, slow.clone(), &[]);
        conns.register(3, foreign.clone(), &[]);
        assert_eq!(
            send(a, 2, b"backlog"),
            WSHD_OK,
            "conn 2's queue is now full"
        );
        let payload = vec![b'x'; 4096];
        let (rc, n) = broadcast(a, &[1, 2, 3, 4, 1], WSHD_MSG_TEXT, &payload);
        assert_eq!(
            (rc, n),
            (WSHD_OK, 2),
            "conn 1 twice; full, foreign and unknown skipped"
        );
        let got = taken(&fast);
        let ptrs: Vec<*const u8> = got.iter().map(|m| m.clone().into_data().as_ptr()).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(ptrs[0], ptrs[1], "one stored copy, shared");
        assert!(got.iter().all(|m| m.len() == 4096));
        assert!(
            slow.take_close_request().is_some(),
            "the slow one is closed"
        );
        assert_eq!(slow.queued(), (0, 0));
        assert!(!foreign.has_queued());

        assert_eq!(
            broadcast(a, &[1], WSHD_MSG_TEXT, &[0xff]),
            (WSHD_ERR_INVALID, 0)
        );
        assert_eq!(broadcast(a, &[1], 9, b"x"), (WSHD_ERR_INVALID, 0));
        // SAFETY: a NULL id array with a nonzero count is refused unread.
        let rc = unsafe {
            (a.api.broadcast)(
                a.api.host_ctx,
                std::ptr::null(),
                3,
                WSHD_MSG_TEXT,
                b"x".as_ptr(),
                1,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, WSHD_ERR_INVALID);
        assert!(!fast.has_queued(), "a refused call queues nothing");
        a.ctx.revoke();
        assert_eq!(
            broadcast(a, &[1], WSHD_MSG_TEXT, b"x"),
            (WSHD_ERR_REVOKED, 0)
        );
    }

    #[test]
    fn broadcast_from_a_callback_keeps_the_callers_order_and_shares_the_inbound_buffer() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let other = Arc::new(ConnShared::new(7, 100, 1 << 20, SlowConsumer::Close));
        conns.register(2, other.clone(), &[]);
        let inbound = bytes::Bytes::from_static(b"relay me");
        let mut outbox = Outbox {
            limit: 100,
            limit_bytes: 1 << 20,
            ..Default::default()
        };
        let text = Inbound {
            payload: &inbound,
            text: true,
        };
        with_outbox(1, &mut outbox, Some(text), || {
            assert_eq!(send(a, 1, b"before"), WSHD_OK);
            assert_eq!(broadcast(a, &[2, 1], WSHD_MSG_TEXT, &inbound), (WSHD_OK, 2));
            assert_eq!(send(a, 1, b"after"), WSHD_OK);
        });
        let order: Vec<Vec<u8>> = outbox
            .msgs
            .iter()
            .map(|m| m.clone().into_data().to_vec())
            .collect();
        assert_eq!(order, [&b"before"[..], b"relay me", b"after"]);
        let relayed = taken(&other).remove(0).into_data();
        assert_eq!(
            relayed.as_ptr(),
            inbound.as_ptr(),
            "no copy of the inbound message"
        );
    }

    fn topic(name: &str) -> wshd_str {
        wshd_str::from_str(name)
    }

    /// `publish` through the table: the recipient count or a status.
    fn publish(a: &HostApiBox, name: &str, data: &[u8], exclude: u64) -> i64 {
        // SAFETY: a valid context; name and payload are borrowed.
        unsafe {
            (a.api.publish)(
                a.api.host_ctx,
                topic(name),
                WSHD_MSG_TEXT,
                data.as_ptr(),
                data.len(),
                exclude,
            )
        }
    }

    #[test]
    fn publish_reaches_subscribers_of_any_instance_with_one_shared_payload() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        // Another version of the handler, on the same server.
        let b = new_host_api(8, "t".into(), "/t".into(), conns.clone());
        let mine = Arc::new(ConnShared::new(7, 100, 1 << 20, SlowConsumer::Close));
        let theirs = Arc::new(ConnShared::new(8, 100, 1 << 20, SlowConsumer::Close));
        conns.register(101, mine.clone(), &[]);
        conns.register(102, theirs.clone(), &[]);
        let name = "unit:publish";
        // SAFETY: valid contexts; the names are borrowed.
        unsafe {
            assert_eq!((a.api.subscribe)(a.api.host_ctx, 101, topic(name)), WSHD_OK);
            assert_eq!(
                (a.api.subscribe)(a.api.host_ctx, 102, topic(name)),
                WSHD_ERR_CLOSED,
                "only the owning instance subscribes a connection"
            );
            assert_eq!((b.api.subscribe)(b.api.host_ctx, 102, topic(name)), WSHD_OK);
            assert_eq!((a.api.is_subscribed)(a.api.host_ctx, 101, topic(name)), 1);
            assert_eq!((a.api.subscribers)(a.api.host_ctx, topic(name)), 2);
        }
        let payload = vec![b'p'; 1000];
        assert_eq!(publish(a, name, &payload, 0), 2);
        assert_eq!(publish(b, name, b"x", 101), 1, "101 excluded");
        let (m, t) = (taken(&mine), taken(&theirs));
        assert_eq!((m.len(), t.len()), (1, 2));
        assert_eq!(
            m[0].clone().into_data().as_ptr(),
            t[0].clone().into_data().as_ptr(),
            "one stored copy"
        );
        assert_eq!(
            publish(a, &"x".repeat(257), b"x", 0),
            WSHD_ERR_INVALID as i64
        );
        assert_eq!(publish(a, "", b"x", 0), WSHD_ERR_INVALID as i64);
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                (a.api.unsubscribe)(a.api.host_ctx, 101, topic(name)),
                WSHD_OK
            );
            assert_eq!((a.api.is_subscribed)(a.api.host_ctx, 101, topic(name)), 0);
        }
        crate::topics::global().leave_all(&theirs);
        assert_eq!(publish(a, name, b"x", 0), 0, "nobody left");
        a.ctx.revoke();
        assert_eq!(publish(a, name, b"x", 0), WSHD_ERR_REVOKED as i64);
    }

    #[test]
    fn publish_inside_a_callback_keeps_the_callers_order() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let me = Arc::new(ConnShared::new(7, 100, 1 << 20, SlowConsumer::Close));
        conns.register(201, me.clone(), &[]);
        let name = "unit:order";
        // SAFETY: a valid context and a borrowed name.
        let rc = unsafe { (a.api.subscribe)(a.api.host_ctx, 201, topic(name)) };
        assert_eq!(rc, WSHD_OK);
        let mut outbox = Outbox {
            limit: 100,
            limit_bytes: 1 << 20,
            ..Default::default()
        };
        with_outbox(201, &mut outbox, None, || {
            assert_eq!(send(a, 201, b"before"), WSHD_OK);
            assert_eq!(publish(a, name, b"published", 0), 1);
            assert_eq!(send(a, 201, b"after"), WSHD_OK);
        });
        let order: Vec<Vec<u8>> = (outbox.msgs.iter())
            .map(|m| m.clone().into_data().to_vec())
            .collect();
        assert_eq!(order, [&b"before"[..], b"published", b"after"]);
        assert!(!me.has_queued());
        crate::topics::global().leave_all(&me);
    }

    #[test]
    fn timers_need_on_timer_and_a_runtime() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        // SAFETY: a valid context.
        let id = unsafe { (a.api.set_timer)(a.api.host_ctx, 0, 10) };
        assert_eq!(id, WSHD_ERR_UNSUPPORTED as i64, "no on_timer");
        a.ctx.has_on_timer.store(true, Ordering::Relaxed);
        // SAFETY: as above.
        let id = unsafe { (a.api.set_timer)(a.api.host_ctx, 0, 10) };
        assert_eq!(id, WSHD_ERR_UNSUPPORTED as i64, "no runtime in this test");
        // SAFETY: as above.
        let rc = unsafe { (a.api.cancel_timer)(a.api.host_ctx, 12345) };
        assert_eq!(rc, WSHD_ERR_STATE, "never set");
    }

    #[tokio::test]
    async fn a_connection_timer_fires_once_into_its_session_and_cancel_wins() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        a.ctx.has_on_timer.store(true, Ordering::Relaxed);
        let me = Arc::new(ConnShared::new(7, 100, 1 << 20, SlowConsumer::Close));
        conns.register(301, me.clone(), &[]);
        let t = crate::timers::global();
        let fired = t.set(a.ctx, 301, 0).unwrap();
        let cancelled = t.set(a.ctx, 301, 0).unwrap();
        assert_eq!(
            t.set(a.ctx, 302, 0),
            Err(WSHD_ERR_CLOSED),
            "unknown connection"
        );
        // Both fire; the session has not run them yet when one is cancelled.
        while me.take_fired_timers_peek() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(t.cancel(a.ctx, cancelled), WSHD_OK);
        let ids = me.take_fired_timers();
        assert_eq!(ids, [fired, cancelled]);
        assert!(t.take(fired), "delivered once");
        assert!(!t.take(fired));
        assert!(!t.take(cancelled), "a cancelled timer is not delivered");
        // A closed connection's pending timers are dropped.
        let late = t.set(a.ctx, 301, 60_000).unwrap();
        t.drop_conn(&me);
        assert_eq!(t.cancel(a.ctx, late), WSHD_ERR_STATE);
        assert_eq!(t.set(a.ctx, 301, 0), Err(WSHD_ERR_CLOSED));
    }

    #[test]
    fn close_codes() {
        assert!(valid_close_code(1000) && valid_close_code(4999) && valid_close_code(1011));
        assert!(
            !valid_close_code(1005)
                && !valid_close_code(1006)
                && !valid_close_code(1015)
                && !valid_close_code(999)
        );
    }
}
