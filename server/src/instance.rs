//! A handler instance: one `init` of a loaded [`Library`] for one route, and
//! the only place that calls the handler's callbacks.
//!
//! Lifetime: the route table and every session on the route hold an
//! `Arc<Instance>`. When a reload replaces the instance, the table lets go;
//! sessions keep it until they end (or the drain closes them). The last
//! `Arc` dropping calls `destroy`, after every `on_close` has returned, and
//! then revokes the host context so stray handler threads get
//! `WSHD_ERR_REVOKED`.
//!
//! Threading: by default callbacks run inline on the async worker (a few
//! nanoseconds per call). A library flagged `WSHD_F_MAY_BLOCK` runs them on
//! tokio's blocking pool, at most [`BLOCKING_PER_INSTANCE`] at a time, so a
//! handler that sleeps cannot stall connections of other handlers.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use wshd_handler_api::abi::*;

use crate::error::{InitError, status_name};
use crate::handshake::{HandshakeBuilder, HandshakeInput};
use crate::host_api::{HostApiBox, Outbox, new_host_api, with_outbox};
use crate::loader::{Callback, Library};
use crate::mailbox::Connections;

/// Concurrent callbacks of one MAY_BLOCK instance on the blocking pool.
pub const BLOCKING_PER_INSTANCE: usize = 64;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The handler's opaque instance pointer.
#[derive(Debug, Clone, Copy)]
struct HandlerPtr(*mut c_void);
// SAFETY: the ABI requires the handler object to be thread-safe (callbacks of
// different connections may run concurrently on different threads).
unsafe impl Send for HandlerPtr {}
// SAFETY: as above.
unsafe impl Sync for HandlerPtr {}

impl HandlerPtr {
    /// The raw pointer. A method rather than `.0`, so closures capture the
    /// whole `Send` wrapper instead of the bare pointer field.
    fn get(self) -> *mut c_void {
        self.0
    }
}

/// A connection's opaque state pointer, owned by the handler.
#[derive(Debug)]
pub struct ConnState(*mut c_void);
// SAFETY: the ABI lets per-connection state move between threads (the SDK
// requires `Send`); one connection's callbacks never run concurrently.
unsafe impl Send for ConnState {}

impl ConnState {
    /// The raw pointer (see [`HandlerPtr::get`] for why this is a method).
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// One initialised handler for one route.
#[derive(Debug)]
pub struct Instance {
    /// Unique per instance; the owner id of its connections.
    pub id: u64,
    pub lib: Arc<Library>,
    /// The route's primary path.
    pub route: Arc<str>,
    /// The `[route.config]` text passed to init.
    pub config_text: String,
    handler: HandlerPtr,
    host: &'static HostApiBox,
    /// Cancelled when the instance is retired and its drain timeout passed.
    pub drain: CancellationToken,
    /// Open connections, for drain logs.
    pub live: AtomicUsize,
    /// Window over which drained connections are closed, in milliseconds.
    drain_window_ms: AtomicU64,
    blocking: Option<Arc<Semaphore>>,
    /// This route and generation's counters (metrics.rs).
    pub metrics: Arc<crate::metrics::RouteMetrics>,
    /// Panics, failed callbacks and 5xx handshakes, for rollout thresholds
    /// and quarantine (rollout.rs).
    pub health: crate::rollout::Health,
    /// Connection handover (ABI 1.2): where this retired version's
    /// connections move, set by the registry when both versions support it.
    handover: std::sync::Mutex<Option<Handover>>,
    /// Connections handed over to another version / that failed to move
    /// and stayed (they drain), for the log and `--list`.
    pub moved_out: AtomicUsize,
    pub stayed: AtomicUsize,
    /// Connections handed over to this version from an older one.
    pub moved_in: AtomicUsize,
}

/// Where a retired instance's connections move (see [`Instance::handover_to`]).
#[derive(Debug, Clone)]
pub struct Handover {
    /// The new version's route (its `instance` imports the connections).
    pub route: Arc<crate::routing::Route>,
    /// The most bytes one export may take (`[reload] handover_max_bytes`).
    pub max_bytes: usize,
}

/// Why a connection did not move; it stays on its version and drains.
#[derive(Debug)]
pub enum HandoverError {
    /// `on_export` failed with this status.
    Export(i32),
    /// The export passed `[reload] handover_max_bytes`.
    TooBig(usize),
    /// `on_import` of the new version refused the state.
    Import(i32),
}

impl std::fmt::Display for HandoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoverError::Export(rc) => write!(f, "on_export failed ({})", status_name(*rc)),
            HandoverError::TooBig(max) => write!(
                f,
                "the exported state is over handover_max_bytes ({max} bytes); raise [reload] \
                 handover_max_bytes or export less"
            ),
            HandoverError::Import(rc) => write!(
                f,
                "the new version's on_import refused the state ({})",
                status_name(*rc)
            ),
        }
    }
}

/// The host side of `wshd_export_out`: the bytes so far and whether a
/// write went past the cap.
struct ExportBuf {
    data: Vec<u8>,
    over: bool,
}

/// `wshd_export_out.write`: appends within `max_len`, else refuses.
unsafe extern "C" fn export_write(out: *mut wshd_export_out, data: *const u8, len: usize) -> i32 {
    // SAFETY: the host passed `out` to on_export and it is valid for that
    // call, whose host_buf is an `ExportBuf` it owns; handlers call write
    // only during on_export.
    let Some(out) = (unsafe { out.as_mut() }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: as above.
    let buf = unsafe { &mut *out.host_buf.cast::<ExportBuf>() };
    if len == 0 {
        return WSHD_OK;
    }
    if data.is_null() {
        return WSHD_ERR_INVALID;
    }
    if buf.data.len().saturating_add(len) > out.max_len {
        buf.over = true;
        return WSHD_ERR_LIMIT;
    }
    // SAFETY: the handler passes `len` readable bytes at `data` for the call.
    buf.data
        .extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
    WSHD_OK
}

impl Instance {
    /// Calls the handler's `init`. Blocking: run it off the async workers.
    pub fn init(
        lib: Arc<Library>,
        route: Arc<str>,
        config_text: String,
        conns: Arc<Connections>,
    ) -> Result<Instance, InitError> {
        let id = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let host = new_host_api(id, lib.desc.name.as_str().into(), route.clone(), conns);
        // Before init: a handler may set its first timers there.
        host.ctx.has_on_timer.store(
            lib.desc.callbacks.on_timer.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut out: *mut c_void = std::ptr::null_mut();
        let running = lib.enter(Callback::Init);
        // SAFETY: `init` comes from a validated descriptor; the host table is
        // leaked (valid forever) and the config text outlives the call.
        let rc = unsafe {
            (lib.desc.callbacks.init)(&host.api, wshd_str::from_str(&config_text), &mut out)
        };
        drop(running);
        let handler = lib.desc.name.clone();
        if rc != WSHD_OK {
            host.ctx.revoke();
            return Err(InitError::Failed {
                handler,
                code: rc,
                meaning: status_name(rc),
            });
        }
        if out.is_null() {
            host.ctx.revoke();
            return Err(InitError::NullInstance { handler });
        }
        let metrics = crate::metrics::RouteMetrics::register(&route, lib.generation);
        Ok(Instance {
            id,
            blocking: lib
                .may_block()
                .then(|| Arc::new(Semaphore::new(BLOCKING_PER_INSTANCE))),
            lib,
            route,
            config_text,
            handler: HandlerPtr(out),
            host,
            drain: CancellationToken::new(),
            live: AtomicUsize::new(0),
            drain_window_ms: AtomicU64::new(0),
            metrics,
            health: Default::default(),
            handover: Default::default(),
            moved_out: AtomicUsize::new(0),
            stayed: AtomicUsize::new(0),
            moved_in: AtomicUsize::new(0),
        })
    }

    /// Runs `f` inline, or on the blocking pool for MAY_BLOCK handlers.
    async fn dispatch<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Instance) -> R + Send + 'static,
    ) -> R {
        match &self.blocking {
            None => f(self),
            Some(sem) => {
                let _permit = sem
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                let this = self.clone();
                tokio::task::spawn_blocking(move || f(&this))
                    .await
                    .expect("callbacks do not unwind: the SDK catches panics")
            }
        }
    }

    /// `on_handshake`: lets the handler reject, pick a subprotocol or add
    /// headers.
    pub async fn handshake(self: &Arc<Self>, input: HandshakeInput) -> HandshakeBuilder {
        let Some(cb) = self.lib.desc.callbacks.on_handshake else {
            return HandshakeBuilder::default();
        };
        let handler = self.handler;
        self.dispatch(move |this| {
            let _running = this.lib.enter(Callback::OnHandshake);
            let mut b = HandshakeBuilder {
                n_offered: input.subprotocols.len(),
                ..Default::default()
            };
            let t = this.metrics.start();
            let rc = input.with_view(|req| {
                // SAFETY: the request view and the builder outlive the call;
                // the builder pointer is only used by the hs_* functions
                // during it.
                unsafe {
                    cb(
                        handler.get(),
                        req,
                        &mut b as *mut HandshakeBuilder as *mut wshd_handshake,
                    )
                }
            });
            this.metrics.finish(crate::metrics::Cb::Handshake, t, rc);
            if rc != WSHD_OK && b.reject.is_none() {
                b.reject = Some((
                    500,
                    format!("handler failed the handshake ({})", status_name(rc)),
                ));
            }
            this.health.panicked_if(rc);
            if let Some((status, _)) = &b.reject {
                this.health.handshake(*status);
            }
            b
        })
        .await
    }

    /// `on_open`. On error the connection must be closed with 1011.
    pub async fn open(
        self: &Arc<Self>,
        conn: wshd_conn_id,
        mut outbox: Outbox,
    ) -> (Result<ConnState, i32>, Outbox) {
        let Some(cb) = self.lib.desc.callbacks.on_open else {
            return (Ok(ConnState(std::ptr::null_mut())), outbox);
        };
        let handler = self.handler;
        self.dispatch(move |this| {
            let _running = this.lib.enter(Callback::OnOpen);
            let mut state: *mut c_void = std::ptr::null_mut();
            let t = this.metrics.start();
            // SAFETY: callback from a validated descriptor; `state` is a
            // valid out-pointer for the call.
            let rc = with_outbox(conn, &mut outbox, None, || unsafe {
                cb(handler.get(), conn, &mut state)
            });
            let rc = crate::host_api::callback_outcome(rc);
            this.metrics.finish(crate::metrics::Cb::Open, t, rc);
            this.health.callback(rc);
            let r = if rc == WSHD_OK {
                Ok(ConnState(state))
            } else {
                Err(rc)
            };
            (r, outbox)
        })
        .await
    }

    /// `on_message` for a text or binary message, inline (the hot path).
    pub fn message_inline(
        &self,
        state: &mut ConnState,
        conn: wshd_conn_id,
        msg: &Message,
        outbox: &mut Outbox,
    ) -> i32 {
        let (kind, payload): (u32, &bytes::Bytes) = match msg {
            Message::Text(t) => (WSHD_MSG_TEXT, t.as_ref()),
            Message::Binary(b) => (WSHD_MSG_BINARY, b),
            _ => return WSHD_OK,
        };
        let data: &[u8] = payload;
        let cb = self.lib.desc.callbacks.on_message;
        let inbound = crate::host_api::Inbound {
            payload,
            text: kind == WSHD_MSG_TEXT,
        };
        let _running = self.lib.enter(Callback::OnMessage);
        let t = self.metrics.start();
        // SAFETY: callback from a validated descriptor; `data` is borrowed
        // for the call and text payloads were UTF-8-validated by tungstenite.
        let rc = with_outbox(conn, outbox, Some(inbound), || unsafe {
            cb(
                self.handler.get(),
                state.get(),
                conn,
                kind,
                data.as_ptr(),
                data.len(),
            )
        });
        let rc = crate::host_api::callback_outcome(rc);
        self.metrics.finish(crate::metrics::Cb::Message, t, rc);
        if rc != WSHD_OK {
            self.health.callback(rc);
        }
        rc
    }

    /// `on_message`, on whichever thread the handler's flags require.
    pub async fn message(
        self: &Arc<Self>,
        mut state: ConnState,
        conn: wshd_conn_id,
        msg: Message,
        mut outbox: Outbox,
    ) -> (i32, ConnState, Outbox) {
        self.dispatch(move |this| {
            let rc = this.message_inline(&mut state, conn, &msg, &mut outbox);
            (rc, state, outbox)
        })
        .await
    }

    /// Sets the window over which this retired instance's connections close.
    pub fn set_drain_window(&self, window: std::time::Duration) {
        self.drain_window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// This connection's share of the drain window: closes are spread
    /// evenly over the window, by connection id, so clients do not all
    /// reconnect at the same instant.
    pub fn drain_delay(&self, conn: wshd_conn_id) -> std::time::Duration {
        let window = self.drain_window_ms.load(Ordering::Relaxed);
        if window == 0 {
            return std::time::Duration::ZERO;
        }
        // A multiplicative hash spreads consecutive ids across the window.
        let spread = conn.wrapping_mul(0x9E37_79B9_7F4A_7C15) % window;
        std::time::Duration::from_millis(spread)
    }

    /// Whether the handler has an `on_handshake` callback (only then is
    /// the request copied into a `HandshakeInput` for it).
    pub fn has_handshake(&self) -> bool {
        self.lib.desc.callbacks.on_handshake.is_some()
    }

    /// Whether callbacks run inline (no MAY_BLOCK flag).
    pub fn is_inline(&self) -> bool {
        self.blocking.is_none()
    }

    /// `on_close`, exactly once per successful `on_open`. The connection is
    /// already gone from the map: sends to it get `WSHD_ERR_CLOSED`.
    pub async fn close(
        self: &Arc<Self>,
        state: ConnState,
        conn: wshd_conn_id,
        code: u16,
        reason: String,
        conn_log: Option<u64>,
    ) {
        let Some(cb) = self.lib.desc.callbacks.on_close else {
            return;
        };
        let handler = self.handler;
        self.dispatch(move |this| {
            let _running = this.lib.enter(Callback::OnClose);
            // The outbox only carries the id for handler log lines; the
            // connection is gone, so sends to it get WSHD_ERR_CLOSED.
            let mut gone = Outbox {
                closed: true,
                conn: conn_log,
                ..Default::default()
            };
            let t = this.metrics.start();
            // SAFETY: callback from a validated descriptor; the handler takes
            // back ownership of `state`; the reason is borrowed for the call.
            with_outbox(conn, &mut gone, None, || unsafe {
                cb(
                    handler.get(),
                    state.get(),
                    conn,
                    code,
                    wshd_str::from_str(&reason),
                )
            });
            // on_close returns no status: only its duration is recorded.
            this.metrics.finish(crate::metrics::Cb::Close, t, WSHD_OK);
        })
        .await
    }

    /// Shares the instance and lets timers set for it (conn 0) reach it.
    pub fn into_arc(self) -> Arc<Instance> {
        let inst = Arc::new(self);
        let _ = inst.host.ctx.target.set(Arc::downgrade(&inst));
        inst
    }

    /// `on_timer` for connection timers that fired (ABI 1.2), in order,
    /// between the connection's other callbacks: the session calls this
    /// with the ids [`ConnShared::take_fired_timers`] gave it. A timer
    /// cancelled since it fired is skipped. Stops at the first non-OK
    /// status, which the session treats like one from `on_message`.
    ///
    /// [`ConnShared::take_fired_timers`]: crate::mailbox::ConnShared::take_fired_timers
    pub async fn timers(
        self: &Arc<Self>,
        state: ConnState,
        conn: wshd_conn_id,
        ids: Vec<u64>,
        mut outbox: Outbox,
    ) -> (i32, ConnState, Outbox) {
        let Some(cb) = self.lib.desc.callbacks.on_timer else {
            return (WSHD_OK, state, outbox);
        };
        let handler = self.handler;
        self.dispatch(move |_| {
            let mut rc = WSHD_OK;
            for id in ids {
                if !crate::timers::global().take(id) {
                    continue;
                }
                // SAFETY: callback from a validated descriptor; the state is
                // this connection's and no other callback of it is running.
                rc = with_outbox(conn, &mut outbox, None, || unsafe {
                    cb(handler.get(), state.get(), conn, id)
                });
                rc = crate::host_api::callback_outcome(rc);
                if rc != WSHD_OK {
                    break;
                }
            }
            (rc, state, outbox)
        })
        .await
    }

    /// `on_timer` for a timer set for the instance (conn 0): NULL state.
    pub async fn instance_timer(self: &Arc<Self>, id: u64) {
        let Some(cb) = self.lib.desc.callbacks.on_timer else {
            return;
        };
        let handler = self.handler;
        let route = self.route.clone();
        self.dispatch(move |_| {
            // SAFETY: callback from a validated descriptor; `self` is alive
            // (we hold an Arc), so destroy has not run.
            let rc = unsafe { cb(handler.get(), std::ptr::null_mut(), 0, id) };
            if rc != WSHD_OK {
                tracing::warn!(route = %route, timer = id, "on_timer failed ({})", status_name(rc));
            }
        })
        .await
    }

    /// Whether the handler has `on_export` and `on_import` (ABI 1.2).
    pub fn supports_handover(&self) -> bool {
        let cb = &self.lib.desc.callbacks;
        cb.on_export.is_some() && cb.on_import.is_some()
    }

    /// Where this (retired) instance's connections move, if anywhere.
    pub fn handover_to(&self) -> Option<Handover> {
        self.handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `to` this instance's successor for connection handover.
    pub fn set_handover(&self, to: Handover) {
        *self.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }

    /// Moves one connection's handler state from this version to `to`
    /// (ABI 1.2 handover), between two of its callbacks: `on_export` here
    /// (at most `max_bytes`), `on_import` there, then the release call here
    /// (`on_export` with a NULL buffer). On `Err` the state is still this
    /// version's and is handed back.
    pub async fn hand_over(
        self: &Arc<Self>,
        state: ConnState,
        conn: wshd_conn_id,
        to: &Arc<Instance>,
        max_bytes: usize,
    ) -> Result<ConnState, (HandoverError, ConnState)> {
        let (Some(export), Some(import)) = (
            self.lib.desc.callbacks.on_export,
            to.lib.desc.callbacks.on_import,
        ) else {
            return Err((HandoverError::Export(WSHD_ERR_UNSUPPORTED), state));
        };
        let handler = self.handler;
        let (rc, buf, state) = self
            .dispatch(move |this| {
                let _running = this.lib.enter(Callback::OnExport);
                let mut buf = ExportBuf {
                    data: Vec::new(),
                    over: false,
                };
                let mut out = wshd_export_out {
                    host_buf: (&mut buf as *mut ExportBuf).cast(),
                    write: export_write,
                    max_len: max_bytes,
                };
                // SAFETY: callback from a validated descriptor; the state is
                // this connection's and none of its callbacks runs now;
                // `out` and its buffer outlive the call.
                let rc = unsafe { export(handler.get(), state.get(), conn, &mut out) };
                this.health.panicked_if(rc);
                (rc, buf, state)
            })
            .await;
        if buf.over {
            return Err((HandoverError::TooBig(max_bytes), state));
        }
        if rc != WSHD_OK {
            return Err((HandoverError::Export(rc), state));
        }
        let new_handler = to.handler;
        let data = buf.data;
        let imported = to
            .dispatch(move |this| {
                let _running = this.lib.enter(Callback::OnImport);
                let mut new_state: *mut c_void = std::ptr::null_mut();
                // SAFETY: callback from a validated descriptor; the bytes
                // are borrowed for the call; `new_state` is a valid
                // out-pointer.
                let rc = unsafe {
                    import(
                        new_handler.get(),
                        conn,
                        data.as_ptr(),
                        data.len(),
                        &mut new_state,
                    )
                };
                this.health.panicked_if(rc);
                if rc == WSHD_OK {
                    Ok(ConnState(new_state))
                } else {
                    Err(rc)
                }
            })
            .await;
        match imported {
            Ok(new_state) => {
                self.dispatch(move |this| {
                    let _running = this.lib.enter(Callback::OnExport);
                    // SAFETY: the release call: the connection moved, the
                    // handler frees its state; this is the state's last use
                    // in this version (no on_close follows).
                    unsafe { export(handler.get(), state.get(), conn, std::ptr::null_mut()) };
                })
                .await;
                Ok(new_state)
            }
            Err(rc) => Err((HandoverError::Import(rc), state)),
        }
    }

    /// `--list`'s note on handover: connections moved in, moved out and
    /// that stayed (failed to move), for a version that supports it.
    pub fn handover_note(&self) -> String {
        if !self.supports_handover() {
            return String::new();
        }
        format!(
            "  [handover: {} in, {} out, {} stayed]",
            self.moved_in.load(Ordering::Relaxed),
            self.moved_out.load(Ordering::Relaxed),
            self.stayed.load(Ordering::Relaxed)
        )
    }

    /// Handler name, version and generation for log fields.
    pub fn describe(&self) -> String {
        format!(
            "{} {} (generation {}, {})",
            self.lib.desc.name,
            self.lib.desc.version,
            self.lib.generation,
            self.lib.short_hash()
        )
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let destroy = self.lib.desc.callbacks.destroy;
        let handler = self.handler;
        let ctx = self.host.ctx;
        let mut what = self.describe();
        let moved = self.moved_out.load(Ordering::Relaxed);
        if moved > 0 || self.stayed.load(Ordering::Relaxed) > 0 {
            what += &format!(
                " ({moved} connections handed over, {} stayed)",
                self.stayed.load(Ordering::Relaxed)
            );
        }
        let route = self.route.clone();
        let lib = self.lib.clone();
        let run = move || {
            if let Some(destroy) = destroy {
                let _running = lib.enter(Callback::Destroy);
                // SAFETY: the last reference is gone, so every on_close has
                // returned and no other callback can run; destroy is called
                // exactly once.
                unsafe { destroy(handler.get()) };
            }
            ctx.revoke();
            tracing::info!(route = %route, "destroyed handler instance {what}");
        };
        // A MAY_BLOCK handler may take its time joining threads in destroy.
        match (
            self.blocking.is_some(),
            tokio::runtime::Handle::try_current(),
        ) {
            (true, Ok(rt)) => drop(rt.spawn_blocking(run)),
            _ => run(),
        }
    }
}
