//! The host API: the `wshd_host_api` function table handed to each handler
//! instance, and the connection map it sends through.
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
//!   [`Connections`] and pushes onto that connection's bounded queue
//!   ([`ConnShared`]), waking its session.
//!
//! A send of bytes that lie inside the message being handled (an echo)
//! shares that message's buffer instead of copying it.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};

use dashmap::DashMap;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use wshd_handler_api::abi::*;

use crate::config::SlowConsumer;

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
}

impl HostCtx {
    /// Marks the instance destroyed.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
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

/// What the host shares with one open connection's session: the queue that
/// sends from outside the connection's own callbacks go through, out-of-band
/// close requests, and server events (shutdown, drain).
///
/// Everything reaches the session through this one per-connection
/// [`Wakeup`]. Server-wide events are delivered by walking [`Connections`]
/// rather than by having every session wait on a shared `CancellationToken`,
/// whose `Notified` takes a lock shared by every connection each time it is
/// polled.
///
/// The queue is a `VecDeque` that allocates only when something is queued,
/// so an idle connection costs a few hundred bytes here (a channel would
/// allocate its first block of slots up front, for every connection).
#[derive(Debug)]
pub struct ConnShared {
    /// The instance that owns the connection.
    pub owner: u64,
    pub slow_consumer: SlowConsumer,
    /// Queue capacity in messages.
    limit: usize,
    queue: std::sync::Mutex<std::collections::VecDeque<Message>>,
    /// Wakes the session when the queue or the close request changes.
    pub wakeup: Wakeup,
    /// A close the session should perform after draining the queue.
    close_request: std::sync::Mutex<Option<CloseFrame>>,
    /// [`ConnShared::SHUTDOWN`] and [`ConnShared::RETIRED`] bits not yet seen
    /// by the session.
    events: AtomicU8,
}

/// Wakes one session task from any thread.
///
/// Not `tokio::sync::Notify`: a pending `Notified` takes its `Notify`'s lock
/// each time it is polled, and a session is polled at least once per
/// message. Here the session registers its task's waker once and keeps a
/// copy, so a poll with the same waker is one load of `pending`; only
/// [`Wakeup::wake`], which is rare next to messages, takes the lock.
#[derive(Debug, Default)]
pub struct Wakeup {
    /// Set by `wake`, cleared by the poll that reports it.
    pending: AtomicBool,
    waker: std::sync::Mutex<Option<Waker>>,
}

impl Wakeup {
    /// Makes the next (or current) poll ready and wakes the registered task.
    /// Wakes that come before the session sees them count as one.
    pub fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = waker.as_ref() {
            w.wake_by_ref();
        }
    }

    /// Ready once for any number of `wake` calls since it was last ready.
    /// `registered` is the caller's copy of the waker it last registered.
    pub fn poll(&self, cx: &mut Context<'_>, registered: &mut Option<Waker>) -> Poll<()> {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let w = cx.waker().clone();
            *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
            *registered = Some(w);
        }
        // After registering: a `wake` that stored `pending` before we
        // registered released the lock we then took, so we see it here; one
        // that comes later finds the waker and wakes us again.
        if self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Why a message could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    Full,
}

impl ConnShared {
    pub fn new(owner: u64, limit: usize, slow_consumer: SlowConsumer) -> ConnShared {
        ConnShared {
            owner,
            slow_consumer,
            limit,
            queue: Default::default(),
            wakeup: Default::default(),
            close_request: Default::default(),
            events: AtomicU8::new(0),
        }
    }

    /// Event: the server is shutting down; close with 1001.
    pub const SHUTDOWN: u8 = 1;
    /// Event: the connection's handler version was retired and its drain
    /// timeout passed; close with 1012.
    pub const RETIRED: u8 = 2;

    /// Tells the session about a server event and wakes it.
    pub fn signal(&self, event: u8) {
        self.events.fetch_or(event, Ordering::Release);
        self.wakeup.wake();
    }

    /// The events signalled since the last call.
    pub fn take_events(&self) -> u8 {
        // A plain load first: on the common wake-up (a queued message) no
        // event is pending and the cache line stays shared.
        if self.events.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.events.swap(0, Ordering::Acquire)
    }

    /// Queues a message for the session to write.
    pub fn push(&self, msg: Message) -> Result<(), QueueError> {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= self.limit {
                return Err(QueueError::Full);
            }
            q.push_back(msg);
        }
        self.wakeup.wake();
        Ok(())
    }

    /// Moves up to `max` queued messages into `out`.
    pub fn take(&self, out: &mut Vec<Message>, max: usize) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() && q.capacity() > 64 {
            // Give back the memory a burst needed.
            *q = Default::default();
        }
    }

    /// Whether messages are waiting.
    pub fn has_queued(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Asks the session to drain its queue and close with `code`. The first
    /// request wins.
    pub fn request_close(&self, code: u16, reason: &str) {
        let mut slot = self.close_request.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            });
        }
        drop(slot);
        self.wakeup.wake();
    }

    /// The pending close request, if any.
    pub fn take_close_request(&self) -> Option<CloseFrame> {
        self.close_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Every open connection by id. Sharded, so sends from many threads rarely
/// contend.
pub type Connections = DashMap<wshd_conn_id, Arc<ConnShared>>;

/// Messages a callback queued for its own connection (the fast path).
#[derive(Debug, Default)]
pub struct Outbox {
    pub msgs: Vec<Message>,
    /// Capacity before `slow_consumer` applies (the send queue length).
    pub limit: usize,
    /// Set when the limit was hit under the `close` policy.
    pub overflowed: bool,
    /// The connection is gone (during `on_close`): sends to it get
    /// `WSHD_ERR_CLOSED`.
    pub closed: bool,
    pub slow_consumer: Option<SlowConsumer>,
    /// The connection's span: handler log lines made during a callback are
    /// attached to it (the session does not enter it on every poll).
    pub span: Option<tracing::Span>,
}

#[derive(Clone, Copy)]
struct Current {
    conn: wshd_conn_id,
    outbox: *mut Outbox,
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
            outbox: outbox as *mut Outbox,
            inbound: inbound.map_or(std::ptr::null(), |m| m.payload as *const bytes::Bytes),
            inbound_text: inbound.is_some_and(|m| m.text),
        }))
    });
    let _reset = Reset(prev);
    f()
}

/// Queues `msg` for `conn` on behalf of instance `ctx`.
fn deliver(ctx: &HostCtx, conn: wshd_conn_id, msg: Message) -> i32 {
    if ctx.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED;
    }
    let fast = CURRENT.with(|c| c.get()).filter(|cur| cur.conn == conn);
    if let Some(cur) = fast {
        // SAFETY: `with_outbox` set this pointer from a `&mut Outbox` that
        // outlives the callback, and resets it when the callback returns;
        // host functions never re-enter the handler, so no other reference
        // to the outbox is live while we push.
        let outbox = unsafe { &mut *cur.outbox };
        if outbox.closed {
            return WSHD_ERR_CLOSED;
        }
        if outbox.msgs.len() >= outbox.limit && !matches!(msg, Message::Close(_)) {
            if outbox.slow_consumer == Some(SlowConsumer::Close) {
                outbox.overflowed = true;
            }
            return WSHD_ERR_BACKPRESSURE;
        }
        outbox.msgs.push(msg);
        return WSHD_OK;
    }
    let Some(shared) = ctx.conns.get(&conn).map(|e| e.value().clone()) else {
        return WSHD_ERR_CLOSED;
    };
    if shared.owner != ctx.instance {
        return WSHD_ERR_CLOSED;
    }
    if let Message::Close(Some(f)) = msg {
        // A close always gets through, even with a full queue; the session
        // sends what is queued first.
        shared.request_close(f.code.into(), &f.reason);
        return WSHD_OK;
    }
    match shared.push(msg) {
        Ok(()) => WSHD_OK,
        Err(QueueError::Full) => {
            if shared.slow_consumer == SlowConsumer::Close {
                tracing::info!(conn, route = %ctx.route, "send queue full: closing slow consumer with 1008");
                shared.request_close(1008, "slow consumer");
            }
            WSHD_ERR_BACKPRESSURE
        }
    }
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
    let shared = shared_slice(conn, data);
    // An echo of (part of) a text message was validated when it arrived.
    let known_utf8 = shared.as_ref().is_some_and(|s| s.utf8);
    if kind == WSHD_MSG_TEXT && !known_utf8 && std::str::from_utf8(data).is_err() {
        return WSHD_ERR_INVALID;
    }
    let payload = shared.map_or_else(|| bytes::Bytes::copy_from_slice(data), |s| s.bytes);
    let msg = match kind {
        WSHD_MSG_TEXT => {
            // SAFETY: `payload` holds the bytes of `data`, checked to be UTF-8 above.
            Message::Text(unsafe { tungstenite::Utf8Bytes::from_bytes_unchecked(payload) })
        }
        WSHD_MSG_BINARY => Message::Binary(payload),
        _ => return WSHD_ERR_INVALID,
    };
    deliver(ctx, conn, msg)
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

/// If `data` lies inside the payload of the message being handled for
/// `conn` on this thread, the same bytes as a shared slice (no copy).
fn shared_slice(conn: wshd_conn_id, data: &[u8]) -> Option<Shared> {
    let cur = CURRENT
        .with(|c| c.get())
        .filter(|c| c.conn == conn && !c.inbound.is_null())?;
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
    let msg = unsafe { str_bytes(msg) }
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let handler = &*ctx.handler;
    let route = &*ctx.route;
    let parent: Option<tracing::Id> = CURRENT.with(|c| c.get()).and_then(|cur| {
        // SAFETY: set by `with_outbox` for the running callback on this
        // thread; only read here, while no other reference is in use.
        unsafe { (*cur.outbox).span.as_ref().and_then(|s| s.id()) }
    });
    // tracing needs the level at compile time, hence one macro per level.
    match level {
        WSHD_LOG_ERROR => {
            tracing::error!(target: "handler", parent: parent.clone(), handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_WARN => {
            tracing::warn!(target: "handler", parent: parent.clone(), handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_INFO => {
            tracing::info!(target: "handler", parent: parent.clone(), handler, route, module = %target, "{msg}")
        }
        WSHD_LOG_DEBUG => {
            tracing::debug!(target: "handler", parent: parent.clone(), handler, route, module = %target, "{msg}")
        }
        _ => {
            tracing::trace!(target: "handler", parent: parent.clone(), handler, route, module = %target, "{msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(conns: &Arc<Connections>) -> &'static HostApiBox {
        new_host_api(7, "t".into(), "/t".into(), conns.clone())
    }

    /// A waker that counts its wakes.
    struct Counter(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn counter() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(Default::default()));
        (c.clone(), Waker::from(c))
    }
    fn wakes(c: &Counter) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    #[test]
    fn wakeups_before_a_poll_make_it_ready_once() {
        let w = Wakeup::default();
        let (_, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut registered = None;
        assert!(w.poll(&mut cx, &mut registered).is_pending());
        w.wake();
        w.wake();
        assert!(w.poll(&mut cx, &mut registered).is_ready());
        assert!(
            w.poll(&mut cx, &mut registered).is_pending(),
            "two wakes before the poll are one"
        );
    }

    #[test]
    fn a_wake_from_another_thread_wakes_the_registered_task() {
        let w = Arc::new(Wakeup::default());
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut registered = None;
        assert!(w.poll(&mut cx, &mut registered).is_pending());
        std::thread::spawn({
            let w = w.clone();
            move || w.wake()
        })
        .join()
        .unwrap();
        assert_eq!(wakes(&count), 1);
        assert!(w.poll(&mut cx, &mut registered).is_ready());
    }

    #[test]
    fn a_poll_with_another_waker_moves_the_registration() {
        let w = Wakeup::default();
        let (old_count, old) = counter();
        let (new_count, new) = counter();
        let mut registered = None;
        assert!(
            w.poll(&mut Context::from_waker(&old), &mut registered)
                .is_pending()
        );
        assert!(
            w.poll(&mut Context::from_waker(&new), &mut registered)
                .is_pending()
        );
        w.wake();
        assert_eq!((wakes(&old_count), wakes(&new_count)), (0, 1));
    }

    #[test]
    fn send_to_unknown_or_foreign_conn_is_closed() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(99, 2, SlowConsumer::Error));
        conns.insert(5, shared.clone());
        // SAFETY: a valid context and a valid (ptr, len).
        let rc = unsafe { (a.api.send)(a.api.host_ctx, 5, WSHD_MSG_TEXT, b"hi".as_ptr(), 2) };
        assert_eq!(rc, WSHD_ERR_CLOSED, "another instance's connection");
        // SAFETY: as above.
        let rc = unsafe { (a.api.send)(a.api.host_ctx, 6, WSHD_MSG_TEXT, b"hi".as_ptr(), 2) };
        assert_eq!(rc, WSHD_ERR_CLOSED, "unknown connection");
        assert!(!shared.has_queued());
    }

    #[test]
    fn queue_full_and_revoked() {
        let conns = Arc::new(Connections::default());
        let a = api(&conns);
        let shared = Arc::new(ConnShared::new(7, 1, SlowConsumer::Close));
        conns.insert(5, shared.clone());
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
        assert_eq!(outbox.msgs, vec![Message::text("a")]);
        assert!(outbox.overflowed);
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
