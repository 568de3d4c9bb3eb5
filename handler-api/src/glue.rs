//! The generic `extern "C"` trampolines that
//! [`export_handler!`](crate::export_handler) puts into the descriptor, and
//! the const descriptor builder. The null-safe views of their arguments and
//! the calls into the host's function table are in `raw.rs`, the only other
//! module that touches raw pointers.
//!
//! Every trampoline does the same four things:
//! 1. build borrowed Rust views of its arguments with the null-safe helpers
//!    ((NULL, 0) is empty; text is UTF-8-checked, so bad input is never UB);
//! 2. run the handler's code inside `catch_unwind`, because a panic that
//!    unwinds out of an `extern "C"` function aborts the whole server;
//! 3. log a failure (`Err(String)` or a panic) through the host's `log`;
//! 4. map the outcome to a status code: `WSHD_OK`, `WSHD_ERR_HANDLER`,
//!    `WSHD_ERR_PANIC`, or `WSHD_ERR_INVALID` when the host broke the contract.
//!
//! This module is public only so the macro can name it; it is not API.
#![allow(unsafe_code)]

use std::any::type_name;
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;

use crate::abi::{
    WSHD_ABI_MAJOR, WSHD_ABI_MINOR, WSHD_ERR_HANDLER, WSHD_ERR_INVALID, WSHD_ERR_PANIC,
    WSHD_ERR_UNSUPPORTED, WSHD_F_MAY_BLOCK, WSHD_F_PANIC_UNWIND, WSHD_F_RUST_SDK, WSHD_MAGIC,
    WSHD_MSG_BINARY, WSHD_MSG_TEXT, WSHD_OK, wshd_conn_id, wshd_descriptor, wshd_handshake,
    wshd_handshake_req, wshd_host_api, wshd_str,
};
use crate::abi::{wshd_export_out, wshd_on_export_fn, wshd_on_import_fn};
use crate::handler::{Handler, HandshakeRequest, HandshakeResponse};
use crate::handover::Handover;
use crate::host::Host;
use crate::logging;
use crate::message::Message;
use crate::raw::{HostApi, RawHandshake, RawHeaders, RawStrs, bytes, opt_text, text};

// ---------------------------------------------------------------------------
// The trampolines.

/// What `init` hands to the host as `*out_handler`.
struct Instance<H> {
    handler: H,
    host: Host,
}

/// Runs handler code on this thread with logs routed to `api`, catching a
/// panic. `Err` holds a one-line description of the panic.
fn guarded<R>(api: HostApi, f: impl FnOnce() -> R) -> Result<R, String> {
    let _scope = logging::enter_callback(api);
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Ok(value),
        Err(payload) => {
            // The panic hook saw the message and location; fall back to the
            // payload if someone replaced the hook.
            let line = logging::take_panic_line()
                .unwrap_or_else(|| format!("panicked: {}", logging::payload_str(&*payload)));
            // A payload whose Drop panics must not unwind out of here.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            Err(line)
        }
    }
}

struct ForConn(Option<wshd_conn_id>);

impl fmt::Display for ForConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, " for conn {id}"),
            None => Ok(()),
        }
    }
}

fn log_error<H>(api: HostApi, msg: fmt::Arguments<'_>) {
    api.log(log::Level::Error, type_name::<H>(), &msg.to_string());
}

/// The handler inside an instance pointer, for the testing host.
///
/// # Safety
/// `handler` must be a live pointer returned by `t_init::<H>`, and stay live
/// for `'a`.
#[cfg(feature = "testing")]
pub(crate) unsafe fn handler_ref<'a, H: Handler>(handler: *mut c_void) -> &'a H {
    // SAFETY: forwarded to the caller.
    unsafe { &(*handler.cast::<Instance<H>>()).handler }
}

/// Maps an outcome to a status code, logging failures.
fn report<H>(
    api: HostApi,
    callback: &str,
    conn: Option<wshd_conn_id>,
    outcome: Result<Result<(), String>, String>,
) -> i32 {
    let conn = ForConn(conn);
    match outcome {
        Ok(Ok(())) => WSHD_OK,
        Ok(Err(e)) => {
            log_error::<H>(api, format_args!("{callback} failed{conn}: {e}"));
            WSHD_ERR_HANDLER
        }
        Err(panic) => {
            log_error::<H>(api, format_args!("{callback}{conn} {panic}"));
            WSHD_ERR_PANIC
        }
    }
}

/// `init`: create the handler instance.
///
/// # Safety
/// Called by the host as `wshd_descriptor.init` (see `wshd_handler.h`).
pub unsafe extern "C" fn t_init<H: Handler>(
    host: *const wshd_host_api,
    config: wshd_str,
    out_handler: *mut *mut c_void,
) -> i32 {
    if out_handler.is_null() {
        return WSHD_ERR_INVALID;
    }
    // SAFETY: ownership rule 4: the table and host_ctx live for the process.
    let Some(api) = (unsafe { HostApi::from_raw(host) }) else {
        return if host.is_null() {
            WSHD_ERR_INVALID
        } else {
            WSHD_ERR_UNSUPPORTED
        };
    };
    logging::install(api);
    // SAFETY: ownership rule 1: the config text is borrowed for this call.
    let Ok(config) = (unsafe { text(config) }) else {
        log_error::<H>(
            api,
            format_args!("init: the route config is not valid UTF-8"),
        );
        return WSHD_ERR_INVALID;
    };
    let host = Host::new(api);
    let outcome = guarded(api, || H::init(host, config));
    let (status, instance) = match outcome {
        Ok(Ok(handler)) => (
            WSHD_OK,
            Box::into_raw(Box::new(Instance { handler, host })).cast(),
        ),
        Ok(Err(e)) => {
            log_error::<H>(api, format_args!("init failed: {e}"));
            (WSHD_ERR_HANDLER, std::ptr::null_mut())
        }
        Err(panic) => {
            log_error::<H>(api, format_args!("init {panic}"));
            (WSHD_ERR_PANIC, std::ptr::null_mut())
        }
    };
    // SAFETY: out_handler is non-null and points to the host's slot for it.
    unsafe { out_handler.write(instance) };
    status
}

/// Builds the safe view of a handshake request.
///
/// # Safety
/// `req` and everything it points to must be valid for `'a` (ownership rule 1).
unsafe fn handshake_request<'a>(
    req: &'a wshd_handshake_req,
) -> Result<HandshakeRequest<'a>, &'static str> {
    if (req.struct_size as usize) < size_of::<wshd_handshake_req>() {
        return Err("a handshake request smaller than ABI 1.0's");
    }
    // SAFETY: every field is borrowed for 'a by the caller's contract.
    let path = unsafe { text(req.path) }.map_err(|_| "a path that is not UTF-8")?;
    // SAFETY: as above.
    let query = unsafe { text(req.query) }.map_err(|_| "a query that is not UTF-8")?;
    // SAFETY: as above.
    let origin = unsafe { opt_text(req.origin) }.map_err(|_| "an Origin that is not UTF-8")?;
    // SAFETY: as above.
    let remote_addr =
        unsafe { text(req.remote_addr) }.map_err(|_| "a remote address that is not UTF-8")?;
    Ok(HandshakeRequest {
        conn_id: req.conn,
        path,
        query,
        origin,
        remote_addr,
        // SAFETY: the arrays and their strings are borrowed for 'a.
        headers: unsafe { RawHeaders::new(req.headers, req.n_headers) },
        // SAFETY: as above.
        subprotocols: unsafe { RawStrs::new(req.subprotocols, req.n_subprotocols) },
    })
}

/// `on_handshake`: inspect the request and shape the response.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_handshake`; `handler` is what
/// `t_init::<H>` returned.
pub unsafe extern "C" fn t_on_handshake<H: Handler>(
    handler: *mut c_void,
    req: *const wshd_handshake_req,
    hs: *mut wshd_handshake,
) -> i32 {
    // SAFETY: handler came from t_init::<H> and lives until destroy (rule 3);
    // other connections may use it concurrently, so only a shared reference
    // is made (H: Sync).
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    let api = inst.host.api;
    // SAFETY: the request is borrowed for this call (rules 1 and 5).
    let Some(req) = (unsafe { req.as_ref() }) else {
        log_error::<H>(
            api,
            format_args!("on_handshake: the host passed a null request"),
        );
        return WSHD_ERR_INVALID;
    };
    // SAFETY: as above.
    let request = match unsafe { handshake_request(req) } {
        Ok(request) => request,
        Err(what) => {
            log_error::<H>(api, format_args!("on_handshake: the host passed {what}"));
            return WSHD_ERR_INVALID;
        }
    };
    // SAFETY: hs is this call's handle and `response` does not outlive the call.
    let Some(raw) = (unsafe { RawHandshake::new(hs, api) }) else {
        log_error::<H>(
            api,
            format_args!("on_handshake: the host passed a null handshake handle"),
        );
        return WSHD_ERR_INVALID;
    };
    let mut response = HandshakeResponse { raw };
    let outcome = guarded(api, || inst.handler.handshake(&request, &mut response));
    report::<H>(api, "on_handshake", Some(req.conn), outcome)
}

/// `on_open`: create the connection's state.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_open`; `handler` is what
/// `t_init::<H>` returned.
pub unsafe extern "C" fn t_on_open<H: Handler>(
    handler: *mut c_void,
    conn: wshd_conn_id,
    out_conn_state: *mut *mut c_void,
) -> i32 {
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    if out_conn_state.is_null() {
        return WSHD_ERR_INVALID;
    }
    let api = inst.host.api;
    let handle = inst.host.conn(conn);
    let outcome = guarded(api, || inst.handler.open(handle));
    // SAFETY: non-null, the host's slot for this connection's state.
    let outcome = unsafe { store_state(outcome, out_conn_state) };
    report::<H>(api, "on_open", Some(conn), outcome)
}

/// Writes a connection state that `on_open` or `on_import` made into the
/// host's slot (boxed; a zero-sized state does not allocate), or null when
/// the callback failed or panicked, and returns the outcome without it.
///
/// # Safety
/// `slot` is non-null and writable: the host's out-pointer for the state.
unsafe fn store_state<S>(
    outcome: Result<Result<S, String>, String>,
    slot: *mut *mut c_void,
) -> Result<Result<(), String>, String> {
    let (outcome, state) = match outcome {
        Ok(Ok(state)) => (Ok(Ok(())), Box::into_raw(Box::new(state)).cast()),
        Ok(Err(e)) => (Ok(Err(e)), std::ptr::null_mut()),
        Err(panic) => (Err(panic), std::ptr::null_mut()),
    };
    // SAFETY: the caller's contract.
    unsafe { slot.write(state) };
    outcome
}

/// `on_message`: one complete message.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_message`; `handler` and
/// `conn_state` are what `t_init::<H>` and `t_on_open::<H>` returned.
pub unsafe extern "C" fn t_on_message<H: Handler>(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32 {
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    let api = inst.host.api;
    // SAFETY: conn_state is the Box t_on_open::<H> made for this connection,
    // and callbacks of one connection never overlap (threading rule 1), so
    // this is the only reference to it.
    let Some(state) = (unsafe { conn_state.cast::<H::ConnState>().as_mut() }) else {
        log_error::<H>(api, format_args!("on_message: no state for conn {conn}"));
        return WSHD_ERR_INVALID;
    };
    // SAFETY: the payload is borrowed for this call (rule 1).
    let payload = unsafe { bytes(data, len) };
    let msg = match kind {
        WSHD_MSG_BINARY => Message::Binary(payload),
        WSHD_MSG_TEXT => match std::str::from_utf8(payload) {
            Ok(text) => Message::Text(text),
            Err(_) => {
                log_error::<H>(
                    api,
                    format_args!("on_message: text for conn {conn} is not valid UTF-8"),
                );
                return WSHD_ERR_INVALID;
            }
        },
        other => {
            log_error::<H>(
                api,
                format_args!("on_message: unknown message kind {other} for conn {conn}"),
            );
            return WSHD_ERR_INVALID;
        }
    };
    let handle = inst.host.conn(conn);
    let outcome = guarded(api, || inst.handler.message(state, handle, msg));
    report::<H>(api, "on_message", Some(conn), outcome)
}

/// `on_close`: the connection is gone; frees its state.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_close`, exactly once per
/// successful `on_open`; `handler` and `conn_state` are what `t_init::<H>`
/// and `t_on_open::<H>` returned.
pub unsafe extern "C" fn t_on_close<H: Handler>(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    code: u16,
    reason: wshd_str,
) {
    // Take the state back first, so it is freed even if the handler panics.
    let state = NonNull::new(conn_state.cast::<H::ConnState>()).map(|p| {
        // SAFETY: the pointer came from Box::into_raw in t_on_open::<H> and
        // on_close is its last use (threading rule 1), so we own it again.
        unsafe { Box::from_raw(p.as_ptr()) }
    });
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return;
    };
    let api = inst.host.api;
    let Some(state) = state else {
        log_error::<H>(api, format_args!("on_close: no state for conn {conn}"));
        return;
    };
    // SAFETY: the reason is borrowed for this call (rule 1). Bad UTF-8 there
    // is not worth failing the close over.
    let reason = unsafe { text(reason) }.unwrap_or("");
    let handle = inst.host.conn(conn);
    let outcome = guarded(api, move || {
        inst.handler.close(*state, handle, code, reason)
    });
    if let Err(panic) = outcome {
        log_error::<H>(api, format_args!("on_close for conn {conn} {panic}"));
    }
}

/// `on_timer` (ABI 1.2): a timer fired, for a connection or (conn 0, NULL
/// state) for the instance.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_timer`; `handler` is what
/// `t_init::<H>` returned and, for a connection's timer, `conn_state` what
/// `t_on_open::<H>` returned for `conn`.
pub unsafe extern "C" fn t_on_timer<H: Handler>(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    timer: u64,
) -> i32 {
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    let api = inst.host.api;
    if conn == 0 {
        let outcome = guarded(api, || inst.handler.timer(None, None, timer));
        return report::<H>(api, "on_timer", None, outcome);
    }
    // SAFETY: as in t_on_message: this connection's state, and no other
    // callback of the connection runs now.
    let Some(state) = (unsafe { conn_state.cast::<H::ConnState>().as_mut() }) else {
        log_error::<H>(api, format_args!("on_timer: no state for conn {conn}"));
        return WSHD_ERR_INVALID;
    };
    let handle = inst.host.conn(conn);
    let outcome = guarded(api, || inst.handler.timer(Some(state), Some(handle), timer));
    report::<H>(api, "on_timer", Some(conn), outcome)
}

/// `destroy`: drops the handler (its `Drop` joins its threads).
///
/// # Safety
/// Called by the host as `wshd_descriptor.destroy`, once, after every other
/// callback of the instance returned; `handler` is what `t_init::<H>` returned.
pub unsafe extern "C" fn t_destroy<H: Handler>(handler: *mut c_void) {
    let Some(ptr) = NonNull::new(handler.cast::<Instance<H>>()) else {
        return;
    };
    // SAFETY: the pointer came from Box::into_raw in t_init::<H>, and destroy
    // runs once with no other callback in flight (threading rule 3).
    let inst = unsafe { Box::from_raw(ptr.as_ptr()) };
    let api = inst.host.api;
    if let Err(panic) = guarded(api, move || drop(inst)) {
        log_error::<H>(api, format_args!("destroy {panic}"));
    }
}

/// `on_export` (ABI 1.2, handover): writes the connection's state into
/// `out`, or with `out == NULL` frees it (the connection moved).
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_export`; `handler` and
/// `conn_state` are what `t_init::<H>` and `t_on_open::<H>` (or
/// `t_on_import::<H>`) returned; `out` is null or valid for this call.
pub unsafe extern "C" fn t_on_export<H: Handover>(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    out: *mut wshd_export_out,
) -> i32 {
    if out.is_null() {
        // The release call: take the state back and drop it, without close.
        if let Some(p) = NonNull::new(conn_state.cast::<H::ConnState>()) {
            // SAFETY: the pointer came from Box::into_raw in t_on_open::<H>
            // or t_on_import::<H>, and the release call is its last use.
            let state = unsafe { Box::from_raw(p.as_ptr()) };
            // A panicking Drop must not unwind into the host.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
        }
        return WSHD_OK;
    }
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    let api = inst.host.api;
    // SAFETY: as in t_on_message: this connection's state, and no other
    // callback of the connection runs now.
    let Some(state) = (unsafe { conn_state.cast::<H::ConnState>().as_ref() }) else {
        log_error::<H>(api, format_args!("on_export: no state for conn {conn}"));
        return WSHD_ERR_INVALID;
    };
    let bytes = match guarded(api, || inst.handler.export(state)) {
        Ok(b) => b,
        Err(panic) => return report::<H>(api, "on_export", Some(conn), Err(panic)),
    };
    // SAFETY: `out` is non-null and valid for this call (host contract);
    // its write function takes exactly these arguments.
    unsafe { ((*out).write)(out, bytes.as_ptr(), bytes.len()) }
}

/// `on_import` (ABI 1.2, handover): rebuilds a connection's state from
/// another version's export.
///
/// # Safety
/// Called by the host as `wshd_descriptor.on_import`; `handler` is what
/// `t_init::<H>` returned; `data` is borrowed for the call.
pub unsafe extern "C" fn t_on_import<H: Handover>(
    handler: *mut c_void,
    conn: wshd_conn_id,
    data: *const u8,
    len: usize,
    out_conn_state: *mut *mut c_void,
) -> i32 {
    // SAFETY: as in t_on_handshake.
    let Some(inst) = (unsafe { handler.cast::<Instance<H>>().as_ref() }) else {
        return WSHD_ERR_INVALID;
    };
    if out_conn_state.is_null() {
        return WSHD_ERR_INVALID;
    }
    let api = inst.host.api;
    // SAFETY: the bytes are borrowed for this call.
    let payload = unsafe { bytes(data, len) };
    let handle = inst.host.conn(conn);
    let outcome = guarded(api, || inst.handler.import(handle, payload));
    // SAFETY: non-null, the host's slot for this connection's new state.
    let outcome = unsafe { store_state(outcome, out_conn_state) };
    report::<H>(api, "on_import", Some(conn), outcome)
}

// ---------------------------------------------------------------------------
// The descriptor, built in const context by `export_handler!`.

/// Flags a handler author may set with `export_handler!(T, flags = NAME)`.
pub mod flag {
    /// Callbacks may block; the host runs them off its async workers.
    pub const MAY_BLOCK: u32 = crate::abi::WSHD_F_MAY_BLOCK;
}

/// `build_info` of every descriptor: SDK version, compiler and profile.
pub const BUILD_INFO: &str = if cfg!(debug_assertions) {
    concat!(
        "wshd-handler-api ",
        env!("CARGO_PKG_VERSION"),
        "; ",
        env!("WSHD_SDK_RUSTC_VERSION"),
        "; debug"
    )
} else {
    concat!(
        "wshd-handler-api ",
        env!("CARGO_PKG_VERSION"),
        "; ",
        env!("WSHD_SDK_RUSTC_VERSION"),
        "; release"
    )
};

/// The handler name a library named `NAME_wsh` serves: its crate name
/// without the `_wsh` suffix (the host matches it against the file name).
pub const fn default_name(crate_name: &'static str) -> &'static str {
    let b = crate_name.as_bytes();
    let n = b.len();
    if n > 4 && b[n - 4] == b'_' && b[n - 3] == b'w' && b[n - 2] == b's' && b[n - 1] == b'h' {
        crate_name.split_at(n - 4).0
    } else {
        crate_name
    }
}

/// Const builder for the descriptor of handler type `H`.
pub struct Export<H> {
    name: &'static str,
    version: &'static str,
    flags: u32,
    on_export: Option<wshd_on_export_fn>,
    on_import: Option<wshd_on_import_fn>,
    _handler: PhantomData<fn() -> H>,
}

impl<H: Handler> Export<H> {
    /// Defaults: the name from the crate name, the given version, and the SDK
    /// flags (`PANIC_UNWIND` only when built with `panic = "unwind"`).
    pub const fn new(crate_name: &'static str, version: &'static str, panic_unwind: bool) -> Self {
        let unwind = if panic_unwind { WSHD_F_PANIC_UNWIND } else { 0 };
        Export {
            name: default_name(crate_name),
            version,
            flags: WSHD_F_RUST_SDK | unwind,
            on_export: None,
            on_import: None,
            _handler: PhantomData,
        }
    }

    /// Overrides the handler name.
    pub const fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Overrides the handler version.
    pub const fn version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    /// Adds author-settable flags (see [`flag`]).
    pub const fn flags(mut self, flags: u32) -> Self {
        self.flags |= flags & WSHD_F_MAY_BLOCK;
        self
    }

    /// The descriptor, pointing at this module's trampolines for `H`.
    pub const fn build(self) -> wshd_descriptor {
        wshd_descriptor {
            magic: WSHD_MAGIC,
            abi_major: WSHD_ABI_MAJOR,
            abi_minor: WSHD_ABI_MINOR,
            struct_size: size_of::<wshd_descriptor>() as u32,
            flags: self.flags,
            name: wshd_str::from_str(self.name),
            version: wshd_str::from_str(self.version),
            build_info: wshd_str::from_str(BUILD_INFO),
            init: Some(t_init::<H>),
            on_handshake: Some(t_on_handshake::<H>),
            on_open: Some(t_on_open::<H>),
            on_message: Some(t_on_message::<H>),
            on_close: Some(t_on_close::<H>),
            destroy: Some(t_destroy::<H>),
            on_timer: Some(t_on_timer::<H>),
            on_export: self.on_export,
            on_import: self.on_import,
        }
    }
}

impl<H: Handover> Export<H> {
    /// Declares connection handover (`export_handler!(T, handover)`).
    pub const fn handover(mut self) -> Self {
        self.on_export = Some(t_on_export::<H>);
        self.on_import = Some(t_on_import::<H>);
        self
    }
}

/// Implemented by `export_handler!` for the exported type, so the testing
/// host can inspect the very descriptor the library exports.
pub trait Exported: Handler {
    /// The static descriptor `wshd_entry_v1` returns.
    fn descriptor() -> &'static wshd_descriptor;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::*;
    use crate::raw::items;

    /// The host table as wshd built it before ABI 1.1: it ends at
    /// `hs_reject`, so reading `log_level` would run past it.
    #[repr(C)]
    struct HostApiV10 {
        struct_size: u32,
        abi_major: u16,
        abi_minor: u16,
        host_ctx: *mut c_void,
        send: wshd_send_fn,
        ping: wshd_ping_fn,
        close: wshd_close_fn,
        log: wshd_log_fn,
        hs_select_subprotocol: wshd_hs_select_subprotocol_fn,
        hs_add_header: wshd_hs_add_header_fn,
        hs_reject: wshd_hs_reject_fn,
    }

    unsafe extern "C" fn send(_: *mut c_void, _: u64, _: u32, _: *const u8, _: usize) -> i32 {
        WSHD_OK
    }
    unsafe extern "C" fn ping(_: *mut c_void, _: u64, _: *const u8, _: usize) -> i32 {
        WSHD_OK
    }
    unsafe extern "C" fn close(_: *mut c_void, _: u64, _: u16, _: wshd_str) -> i32 {
        WSHD_OK
    }
    unsafe extern "C" fn log(ctx: *mut c_void, level: u32, _: wshd_str, _: wshd_str) {
        // SAFETY: ctx is the test's AtomicU32, alive for the test.
        unsafe { &*ctx.cast::<std::sync::atomic::AtomicU32>() }
            .store(level, std::sync::atomic::Ordering::Relaxed);
    }
    unsafe extern "C" fn select(_: *mut wshd_handshake, _: usize) -> i32 {
        WSHD_OK
    }
    unsafe extern "C" fn header(_: *mut wshd_handshake, _: wshd_str, _: wshd_str) -> i32 {
        WSHD_OK
    }
    unsafe extern "C" fn reject(_: *mut wshd_handshake, _: u16, _: wshd_str) -> i32 {
        WSHD_OK
    }

    #[test]
    fn a_host_of_abi_1_0_is_used_without_reading_past_its_table() {
        assert_eq!(size_of::<HostApiV10>(), WSHD_HOST_API_SIZE_1_0);
        let last_level = std::sync::atomic::AtomicU32::new(0);
        let mut old = HostApiV10 {
            struct_size: WSHD_HOST_API_SIZE_1_0 as u32,
            abi_major: 1,
            abi_minor: 0,
            host_ctx: (&last_level as *const std::sync::atomic::AtomicU32)
                .cast_mut()
                .cast(),
            send,
            ping,
            close,
            log,
            hs_select_subprotocol: select,
            hs_add_header: header,
            hs_reject: reject,
        };
        let table = (&old as *const HostApiV10).cast::<wshd_host_api>();
        // SAFETY: a live table of struct_size bytes; HostApi reads only
        // the fields struct_size covers.
        let api = unsafe { HostApi::from_raw(table) }.expect("a 1.0 table is accepted");
        assert_eq!(api.version(), (1, 0));
        assert_eq!(api.log_level(), None, "1.0 hosts cannot say");
        api.log(log::Level::Warn, "t", "m");
        assert_eq!(
            last_level.load(std::sync::atomic::Ordering::Relaxed),
            WSHD_LOG_WARN
        );

        old.struct_size -= 8;
        let table = (&old as *const HostApiV10).cast::<wshd_host_api>();
        // SAFETY: as above; a table missing 1.0 fields is refused unread.
        assert!(unsafe { HostApi::from_raw(table) }.is_none());
    }

    #[test]
    fn broadcast_on_a_host_without_it_falls_back_to_one_send_each() {
        unsafe extern "C" fn counting_send(
            ctx: *mut c_void,
            conn: u64,
            _: u32,
            _: *const u8,
            _: usize,
        ) -> i32 {
            // SAFETY: ctx is the test's AtomicU32, alive for the test.
            unsafe { &*ctx.cast::<std::sync::atomic::AtomicU32>() }
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if conn == 2 { WSHD_ERR_CLOSED } else { WSHD_OK }
        }
        let sends = std::sync::atomic::AtomicU32::new(0);
        let old = HostApiV10 {
            struct_size: WSHD_HOST_API_SIZE_1_0 as u32,
            abi_major: 1,
            abi_minor: 0,
            host_ctx: (&sends as *const std::sync::atomic::AtomicU32)
                .cast_mut()
                .cast(),
            send: counting_send,
            ping,
            close,
            log,
            hs_select_subprotocol: select,
            hs_add_header: header,
            hs_reject: reject,
        };
        let table = (&old as *const HostApiV10).cast::<wshd_host_api>();
        // SAFETY: a live table of struct_size bytes; `broadcast` lies past
        // it and must not be read.
        let api = unsafe { HostApi::from_raw(table) }.unwrap();
        assert_eq!(api.broadcast(&[1, 2, 3], WSHD_MSG_TEXT, b"hi"), Ok(2));
        assert_eq!(sends.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn topics_and_timers_on_an_older_host_are_unsupported_not_read_past_its_table() {
        let old = HostApiV10 {
            struct_size: WSHD_HOST_API_SIZE_1_0 as u32,
            abi_major: 1,
            abi_minor: 0,
            host_ctx: std::ptr::null_mut(),
            send,
            ping,
            close,
            log,
            hs_select_subprotocol: select,
            hs_add_header: header,
            hs_reject: reject,
        };
        let table = (&old as *const HostApiV10).cast::<wshd_host_api>();
        // SAFETY: a live table of struct_size bytes; the ABI 1.2 functions
        // lie past it and must not be read.
        let api = unsafe { HostApi::from_raw(table) }.unwrap();
        let host = Host::new(api);
        let conn = host.conn(7);
        let unsupported = Err(crate::SendError::Unsupported);
        assert_eq!(conn.subscribe("room"), unsupported);
        assert_eq!(conn.unsubscribe("room"), unsupported);
        assert_eq!(
            conn.is_subscribed("room"),
            Err(crate::SendError::Unsupported)
        );
        assert_eq!(
            host.publish("room", Message::Text("hi")),
            Err(crate::SendError::Unsupported)
        );
        assert_eq!(host.subscribers("room"), Err(crate::SendError::Unsupported));
        assert_eq!(
            host.subscribers_cluster("room"),
            Err(crate::SendError::Unsupported)
        );
        let second = std::time::Duration::from_secs(1);
        assert_eq!(host.set_timer(second), Err(crate::SendError::Unsupported));
        assert_eq!(conn.set_timer(second), Err(crate::SendError::Unsupported));
        assert_eq!(host.cancel_timer(1), unsupported);
    }

    fn raw(s: &str) -> wshd_str {
        wshd_str::from_str(s)
    }

    #[test]
    fn null_and_empty_views_are_empty() {
        // SAFETY: null pointers and zero lengths are never read.
        unsafe {
            assert_eq!(bytes(std::ptr::null(), 0), b"");
            assert_eq!(bytes(std::ptr::null(), 5), b"");
            assert_eq!(bytes(b"abc".as_ptr(), 0), b"");
            assert_eq!(text(wshd_str::EMPTY), Ok(""));
            assert_eq!(opt_text(wshd_str::EMPTY), Ok(None));
            assert_eq!(items::<wshd_str>(std::ptr::null(), 3).len(), 0);
            assert_eq!(RawStrs::new(std::ptr::null(), 2).len(), 0);
            assert_eq!(RawHeaders::new(std::ptr::null(), 2).len(), 0);
        }
    }

    #[test]
    fn views_borrow_the_bytes() {
        let data = *b"hello";
        let empty_but_present = wshd_str {
            ptr: data.as_ptr(),
            len: 0,
        };
        // SAFETY: every view points into a live local.
        unsafe {
            assert_eq!(bytes(data.as_ptr(), 5), b"hello");
            assert_eq!(text(raw("héllo")), Ok("héllo"));
            assert_eq!(opt_text(empty_but_present), Ok(Some("")));
            assert_eq!(opt_text(raw("http://a")), Ok(Some("http://a")));
        }
    }

    #[test]
    fn bad_utf8_and_bad_sizes_are_refused() {
        let bad = [0xffu8, 0xfe];
        let s = wshd_str::from_bytes(&bad);
        // SAFETY: the pointers are live; the absurd lengths are refused
        // before anything is read.
        unsafe {
            assert!(text(s).is_err());
            assert!(opt_text(s).is_err());
            assert_eq!(bytes(bad.as_ptr(), usize::MAX), b"");
            assert_eq!(
                items(bad.as_ptr().cast::<wshd_str>(), usize::MAX / 2).len(),
                0
            );
        }
        // A misaligned array pointer is refused rather than read.
        let words = [0u64; 4];
        let misaligned = words
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(1)
            .cast::<wshd_str>();
        // SAFETY: refused before anything is read.
        assert_eq!(unsafe { items(misaligned, 1) }.len(), 0);
    }

    #[test]
    fn raw_arrays_index_safely() {
        let strs = [raw("chat.v1"), wshd_str::EMPTY];
        let headers = [wshd_header {
            name: raw("Host"),
            value: raw("x"),
        }];
        // SAFETY: both arrays and their strings are live locals.
        let (s, h) = unsafe {
            (
                RawStrs::new(strs.as_ptr(), 2),
                RawHeaders::new(headers.as_ptr(), 1),
            )
        };
        assert_eq!(s.get(0), Some(&b"chat.v1"[..]));
        assert_eq!(s.get(1), Some(&b""[..]));
        assert_eq!(s.get(2), None);
        assert_eq!(h.get(0), Some((&b"Host"[..], &b"x"[..])));
        assert_eq!(h.get(1), None);
    }

    #[test]
    fn default_name_strips_wsh() {
        assert_eq!(default_name("echo_wsh"), "echo");
        assert_eq!(default_name("origin_check_wsh"), "origin_check");
        assert_eq!(default_name("echo"), "echo");
        assert_eq!(default_name("_wsh"), "_wsh");
    }
}
