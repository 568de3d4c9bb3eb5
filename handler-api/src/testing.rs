//! A fake host for unit-testing handlers without a server (feature
//! `testing`).
//!
//! [`TestHost`] builds a real `wshd_host_api` table whose functions are
//! `extern "C"` fakes that record every call, and drives the handler through
//! the same `extern "C"` trampolines the server calls, so a test exercises
//! the real glue: panics are caught, errors are mapped to status codes,
//! connection state is freed in `on_close`.
//!
//! ```
//! use wshd_handler_api::testing::{Sent, TestHost};
//! use wshd_handler_api::{Conn, Handler, Host, Message};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     type ConnState = ();
//!     fn init(_: Host, _: &str) -> Result<Self, String> { Ok(Echo) }
//!     fn open(&self, _: Conn) -> Result<(), String> { Ok(()) }
//!     fn message(&self, _: &mut (), conn: Conn, msg: Message<'_>) -> Result<(), String> {
//!         conn.send(msg).map_err(|e| e.to_string())
//!     }
//! }
//!
//! let mut t = TestHost::<Echo>::init("").unwrap();
//! let c = t.open().unwrap();
//! t.message(c, Message::Text("hi")).unwrap();
//! assert_eq!(t.sent(c), [Sent::Text("hi".into())]);
//! ```
//!
//! The fake host behaves like the server where it matters for a handler:
//! sends to a closed or unknown connection fail with `Closed` (also after
//! the handler asked to close it), text must be UTF-8, close codes and ping
//! sizes are checked, a failed `on_message` closes the connection with 1011
//! (running `on_close`), dropping the `TestHost` closes every open
//! connection with 1001 and then destroys the instance, and after destroy
//! every host function returns `Revoked`. Log records are kept and also
//! printed to stderr (which the test harness captures). While a `TestHost`
//! exists the handler's log level is `trace`.
//!
//! Topics and timers (ABI 1.2) work too, within one `TestHost`:
//! `publish` records one message per subscriber in [`TestHost::sent`]
//! (checks as the server makes them: names of 1..=256 bytes, at most
//! [`TEST_TOPICS_PER_CONNECTION`] topics per connection, subscriptions end
//! when a connection closes), and [`TestHost::publishes`] counts the calls.
//! Timers never fire by themselves: [`TestHost::timers`] lists the pending
//! ones and [`TestHost::fire_timer`] delivers one, the way the server would.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::abi::{
    WSHD_ABI_MAJOR, WSHD_ABI_MINOR, WSHD_ERR_CLOSED, WSHD_ERR_HANDLER, WSHD_ERR_INVALID,
    WSHD_ERR_PANIC, WSHD_ERR_REVOKED, WSHD_ERR_STATE, WSHD_ERR_UNSUPPORTED, WSHD_F_MAY_BLOCK,
    WSHD_MAGIC, WSHD_MSG_BINARY, WSHD_MSG_TEXT, WSHD_OK, wshd_conn_id, wshd_descriptor,
    wshd_export_out, wshd_handshake, wshd_handshake_req, wshd_header, wshd_host_api, wshd_str,
};
use crate::glue::{self, Export, Exported};
use crate::host::{Conn, Host, SendError};
use crate::raw::{self, HostApi};
use crate::rules::{
    self, DescriptorTextError, FlagsError, HandshakeAnswer, MAX_DESCRIPTOR_STRING, RuleError,
};
use crate::{Handler, Message, logging};

/// Connection ids, unique across every `TestHost` of the process (as the
/// server's are).
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A message the handler sent through the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
}

/// A log line the handler wrote through the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its level.
    pub level: log::Level,
    /// Its target (usually the module path).
    pub target: String,
    /// The text.
    pub message: String,
}

/// A non-OK status a callback returned (`WSHD_ERR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallError(pub i32);

impl CallError {
    /// `WSHD_ERR_INVALID`: the arguments broke the contract.
    pub const INVALID: CallError = CallError(WSHD_ERR_INVALID);
    /// `WSHD_ERR_UNSUPPORTED`.
    pub const UNSUPPORTED: CallError = CallError(WSHD_ERR_UNSUPPORTED);
    /// `WSHD_ERR_PANIC`: the handler panicked.
    pub const PANIC: CallError = CallError(WSHD_ERR_PANIC);
    /// `WSHD_ERR_HANDLER`: the handler returned `Err`.
    pub const HANDLER: CallError = CallError(WSHD_ERR_HANDLER);

    fn check(status: i32) -> Result<(), CallError> {
        if status == WSHD_OK {
            Ok(())
        } else {
            Err(CallError(status))
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            WSHD_ERR_INVALID => "WSHD_ERR_INVALID",
            WSHD_ERR_UNSUPPORTED => "WSHD_ERR_UNSUPPORTED",
            WSHD_ERR_PANIC => "WSHD_ERR_PANIC",
            WSHD_ERR_HANDLER => "WSHD_ERR_HANDLER",
            _ => "status",
        };
        write!(f, "{name} ({})", self.0)
    }
}

impl std::error::Error for CallError {}

/// `init` failed: its status and what the handler logged meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitError {
    /// What `init` returned.
    pub status: CallError,
    /// Every log line written during `init`.
    pub logs: Vec<LogRecord>,
}

impl InitError {
    /// Whether some log line contains `needle`.
    pub fn logs_contain(&self, needle: &str) -> bool {
        self.logs.iter().any(|r| r.message.contains(needle))
    }
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "init returned {}", self.status)?;
        for r in &self.logs {
            write!(f, "; {}: {}", r.level, r.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for InitError {}

/// An opening handshake to feed to [`TestHost::handshake`].
#[derive(Clone, Debug)]
pub struct Handshake {
    path: String,
    query: String,
    origin: Option<String>,
    remote_addr: String,
    subprotocols: Vec<String>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Handshake {
    /// A request for `path` (a `?query` part is split off), from
    /// `127.0.0.1:40000`, with no Origin and no subprotocols. The usual
    /// upgrade headers are filled in.
    pub fn new(path: &str) -> Handshake {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        Handshake {
            path: path.to_owned(),
            query: query.to_owned(),
            origin: None,
            remote_addr: "127.0.0.1:40000".to_owned(),
            subprotocols: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Sets the `Origin` header.
    pub fn origin(mut self, origin: &str) -> Handshake {
        self.origin = Some(origin.to_owned());
        self
    }

    /// Offers these subprotocols, in this order.
    pub fn subprotocols<I, S>(mut self, offer: I) -> Handshake
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.subprotocols = offer.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a request header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Handshake {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Sets the query string (without `?`).
    pub fn query(mut self, query: &str) -> Handshake {
        self.query = query.to_owned();
        self
    }

    /// Sets the peer address (`ip:port`).
    pub fn remote_addr(mut self, addr: &str) -> Handshake {
        self.remote_addr = addr.to_owned();
        self
    }

    fn all_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = [
            ("Host", "localhost"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
        if let Some(origin) = &self.origin {
            all.push(("Origin".into(), origin.as_bytes().to_vec()));
        }
        if !self.subprotocols.is_empty() {
            all.push((
                "Sec-WebSocket-Protocol".into(),
                self.subprotocols.join(", ").into_bytes(),
            ));
        }
        all.extend(self.headers.iter().cloned());
        all
    }
}

/// What the handler answered to a handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeOutcome {
    /// The connection id the request carried.
    pub conn: u64,
    /// What `on_handshake` returned.
    pub status: Result<(), CallError>,
    /// The chosen subprotocol, if any.
    pub subprotocol: Option<String>,
    /// Response headers the handler added.
    pub headers: Vec<(String, String)>,
    /// `(HTTP status, body)` if the handler rejected the upgrade.
    pub rejected: Option<(u16, String)>,
}

impl HandshakeOutcome {
    /// Whether the server would upgrade: `Ok` and not rejected.
    pub fn accepted(&self) -> bool {
        self.status.is_ok() && self.rejected.is_none()
    }
}

/// Why [`TestHost::connect`] did not open a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The handshake was rejected or failed.
    Handshake(HandshakeOutcome),
    /// `on_open` failed.
    Open(CallError),
}

/// Everything the fake host recorded for one `TestHost`.
#[derive(Default)]
struct Records {
    open: HashSet<u64>,
    sent: HashMap<u64, Vec<Sent>>,
    pings: HashMap<u64, Vec<Vec<u8>>>,
    close_requests: HashMap<u64, (u16, String)>,
    logs: Vec<LogRecord>,
    fail_with: Option<i32>,
    broadcasts: usize,
    /// Topic name → subscribed connections.
    topics: BTreeMap<String, std::collections::BTreeSet<u64>>,
    publishes: usize,
    /// Pending timers: id → (connection or 0, delay in ms).
    timers: BTreeMap<u64, (u64, u64)>,
    next_timer: u64,
}

/// The fake host's `host_ctx`. Leaked: the contract says it lives for the
/// process, and a handler thread may call it after the `TestHost` is gone.
struct Recorder {
    records: Mutex<Records>,
    revoked: AtomicBool,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checks every connection call starts with.
    fn usable(&self, r: &Records, conn: u64) -> Result<(), i32> {
        if self.revoked.load(Ordering::Acquire) {
            return Err(WSHD_ERR_REVOKED);
        }
        if let Some(status) = r.fail_with {
            return Err(status);
        }
        if !r.open.contains(&conn) || r.close_requests.contains_key(&conn) {
            return Err(WSHD_ERR_CLOSED);
        }
        Ok(())
    }
}

/// # Safety
/// `ctx` must be the `host_ctx` of a table built by `TestHost`.
unsafe fn recorder<'a>(ctx: *mut c_void) -> &'a Recorder {
    // SAFETY: the caller passes our leaked Recorder.
    unsafe { &*ctx.cast::<Recorder>() }
}

fn status(r: Result<(), i32>) -> i32 {
    r.err().unwrap_or(WSHD_OK)
}

unsafe extern "C" fn fake_send(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32 {
    // SAFETY: ctx is this host's Recorder; the payload is borrowed for the call.
    let (rec, data) = unsafe { (recorder(ctx), raw::bytes(data, len)) };
    let mut r = rec.lock();
    status(rec.usable(&r, conn).and_then(|()| {
        let msg = match kind & !crate::abi::WSHD_SEND_NO_COMPRESS {
            WSHD_MSG_TEXT => Sent::Text(
                std::str::from_utf8(data)
                    .map_err(|_| WSHD_ERR_INVALID)?
                    .to_owned(),
            ),
            WSHD_MSG_BINARY => Sent::Binary(data.to_vec()),
            _ => return Err(WSHD_ERR_INVALID),
        };
        r.sent.entry(conn).or_default().push(msg);
        Ok(())
    }))
}

/// One `send` per listed id, after the checks `broadcast` makes once.
unsafe extern "C" fn fake_broadcast(
    ctx: *mut c_void,
    conns: *const wshd_conn_id,
    n: usize,
    kind: u32,
    data: *const u8,
    len: usize,
    delivered: *mut usize,
) -> i32 {
    // SAFETY: ctx is this host's Recorder; ids and payload are borrowed.
    let (rec, ids, payload) =
        unsafe { (recorder(ctx), raw::items(conns, n), raw::bytes(data, len)) };
    if rec.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED;
    }
    let kind = kind & !crate::abi::WSHD_SEND_NO_COMPRESS;
    let text = kind == WSHD_MSG_TEXT && std::str::from_utf8(payload).is_ok();
    if !text && kind != WSHD_MSG_BINARY {
        return WSHD_ERR_INVALID;
    }
    rec.lock().broadcasts += 1;
    // SAFETY: the same borrowed payload, for each call.
    let count =
        (ids.iter()).filter(|&&id| unsafe { fake_send(ctx, id, kind, data, len) } == WSHD_OK);
    let count = count.count();
    if !delivered.is_null() {
        // SAFETY: a non-null out-pointer the caller lends for the call.
        unsafe { delivered.write(count) };
    }
    WSHD_OK
}

/// Topics per connection the fake host allows (the server's default cap).
pub const TEST_TOPICS_PER_CONNECTION: usize = 64;

/// # Safety
/// As for [`recorder`]; `topic` borrowed for the call.
unsafe fn topic_args<'a>(ctx: *mut c_void, topic: wshd_str) -> Result<(&'a Recorder, String), i32> {
    // SAFETY: forwarded.
    let (rec, name) = unsafe { (recorder(ctx), raw::str_bytes(topic)) };
    if rec.revoked.load(Ordering::Acquire) {
        return Err(WSHD_ERR_REVOKED);
    }
    if name.is_empty() || name.len() > 256 {
        return Err(WSHD_ERR_INVALID);
    }
    let name = std::str::from_utf8(name).map_err(|_| WSHD_ERR_INVALID)?;
    Ok((rec, name.to_owned()))
}

unsafe extern "C" fn fake_subscribe(ctx: *mut c_void, conn: wshd_conn_id, topic: wshd_str) -> i32 {
    // SAFETY: our Recorder and a borrowed name.
    let (rec, name) = match unsafe { topic_args(ctx, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let mut r = rec.lock();
    if !r.open.contains(&conn) {
        return WSHD_ERR_CLOSED;
    }
    let mine = r.topics.values().filter(|s| s.contains(&conn)).count();
    let already = r.topics.get(&name).is_some_and(|s| s.contains(&conn));
    if !already && mine >= TEST_TOPICS_PER_CONNECTION {
        return crate::abi::WSHD_ERR_LIMIT;
    }
    r.topics.entry(name).or_default().insert(conn);
    WSHD_OK
}

unsafe extern "C" fn fake_unsubscribe(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    topic: wshd_str,
) -> i32 {
    // SAFETY: as above.
    let (rec, name) = match unsafe { topic_args(ctx, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let mut r = rec.lock();
    if !r.open.contains(&conn) {
        return WSHD_ERR_CLOSED;
    }
    if let Some(set) = r.topics.get_mut(&name) {
        set.remove(&conn);
        if set.is_empty() {
            r.topics.remove(&name);
        }
    }
    WSHD_OK
}

unsafe extern "C" fn fake_is_subscribed(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    topic: wshd_str,
) -> i32 {
    // SAFETY: as above.
    let (rec, name) = match unsafe { topic_args(ctx, topic) } {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let r = rec.lock();
    if !r.open.contains(&conn) {
        return WSHD_ERR_CLOSED;
    }
    i32::from(r.topics.get(&name).is_some_and(|s| s.contains(&conn)))
}

/// One `send` per subscriber, after the checks `publish` makes once.
unsafe extern "C" fn fake_publish(
    ctx: *mut c_void,
    topic: wshd_str,
    kind: u32,
    data: *const u8,
    len: usize,
    exclude: wshd_conn_id,
) -> i64 {
    // SAFETY: as above; the payload is borrowed for the call.
    let (rec, name) = match unsafe { topic_args(ctx, topic) } {
        Ok(v) => v,
        Err(rc) => return rc.into(),
    };
    // SAFETY: borrowed for the call.
    let payload = unsafe { raw::bytes(data, len) };
    let kind = kind & !crate::abi::WSHD_SEND_NO_COMPRESS;
    let text = kind == WSHD_MSG_TEXT && std::str::from_utf8(payload).is_ok();
    if !text && kind != WSHD_MSG_BINARY {
        return WSHD_ERR_INVALID.into();
    }
    let ids: Vec<u64> = {
        let mut r = rec.lock();
        r.publishes += 1;
        r.topics.get(&name).into_iter().flatten().copied().collect()
    };
    let reached = ids
        .into_iter()
        .filter(|&id| id != exclude)
        // SAFETY: the same borrowed payload, for each call.
        .filter(|&id| unsafe { fake_send(ctx, id, kind, data, len) } == WSHD_OK)
        .count();
    reached as i64
}

unsafe extern "C" fn fake_subscribers(ctx: *mut c_void, topic: wshd_str) -> i64 {
    // SAFETY: as above.
    match unsafe { topic_args(ctx, topic) } {
        Ok((rec, name)) => rec.lock().topics.get(&name).map_or(0, |s| s.len()) as i64,
        Err(rc) => rc.into(),
    }
}

unsafe extern "C" fn fake_set_timer(ctx: *mut c_void, conn: wshd_conn_id, delay_ms: u64) -> i64 {
    // SAFETY: ctx is this host's Recorder.
    let rec = unsafe { recorder(ctx) };
    if rec.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED.into();
    }
    let mut r = rec.lock();
    if conn != 0 && !r.open.contains(&conn) {
        return WSHD_ERR_CLOSED.into();
    }
    r.next_timer += 1;
    let id = r.next_timer;
    r.timers.insert(id, (conn, delay_ms));
    id as i64
}

unsafe extern "C" fn fake_cancel_timer(ctx: *mut c_void, timer: u64) -> i32 {
    // SAFETY: ctx is this host's Recorder.
    let rec = unsafe { recorder(ctx) };
    if rec.revoked.load(Ordering::Acquire) {
        return WSHD_ERR_REVOKED;
    }
    match rec.lock().timers.remove(&timer) {
        Some(_) => WSHD_OK,
        None => WSHD_ERR_STATE,
    }
}

unsafe extern "C" fn fake_ping(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    data: *const u8,
    len: usize,
) -> i32 {
    // SAFETY: as in fake_send.
    let (rec, data) = unsafe { (recorder(ctx), raw::bytes(data, len)) };
    let mut r = rec.lock();
    status(rec.usable(&r, conn).and_then(|()| {
        if data.len() > 125 {
            return Err(WSHD_ERR_INVALID);
        }
        r.pings.entry(conn).or_default().push(data.to_vec());
        Ok(())
    }))
}

/// Close codes an endpoint may send (RFC 6455 §7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

unsafe extern "C" fn fake_close(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    code: u16,
    reason: wshd_str,
) -> i32 {
    // SAFETY: as in fake_send.
    let (rec, reason) = unsafe { (recorder(ctx), raw::text(reason)) };
    let mut r = rec.lock();
    status(rec.usable(&r, conn).and_then(|()| {
        let reason = reason.map_err(|_| WSHD_ERR_INVALID)?;
        if !valid_close_code(code) || reason.len() > 123 {
            return Err(WSHD_ERR_INVALID);
        }
        r.close_requests.insert(conn, (code, reason.to_owned()));
        Ok(())
    }))
}

unsafe extern "C" fn fake_log(ctx: *mut c_void, level: u32, target: wshd_str, msg: wshd_str) {
    // SAFETY: as in fake_send.
    let (rec, target, msg) =
        unsafe { (recorder(ctx), raw::str_bytes(target), raw::str_bytes(msg)) };
    // A record always has a level: 0 (no ABI level) is kept as trace.
    let level = raw::abi_level(level)
        .to_level()
        .unwrap_or(log::Level::Trace);
    let record = LogRecord {
        level,
        target: String::from_utf8_lossy(target).into_owned(),
        message: String::from_utf8_lossy(msg).into_owned(),
    };
    eprintln!(
        "[wshd test host] {} {}: {}",
        record.level, record.target, record.message
    );
    rec.lock().logs.push(record);
}

/// # Safety
/// `hs` must be the `HandshakeAnswer` of the `handshake` call in progress.
unsafe fn hs_call<'a>(hs: *mut wshd_handshake) -> &'a mut HandshakeAnswer {
    // SAFETY: the caller passes the live answer; calls never overlap.
    unsafe { &mut *hs.cast::<HandshakeAnswer>() }
}

/// The test host records every line, so handlers log at every level.
unsafe extern "C" fn fake_log_level(_ctx: *mut c_void) -> u32 {
    crate::abi::WSHD_LOG_TRACE
}

// The hs_* fakes apply the same rules as the server's (crate::rules).

unsafe extern "C" fn fake_hs_select_subprotocol(hs: *mut wshd_handshake, index: usize) -> i32 {
    // SAFETY: hs is the HandshakeAnswer of this handshake.
    let call = unsafe { hs_call(hs) };
    status(call.select_subprotocol(index).map_err(RuleError::status))
}

unsafe extern "C" fn fake_hs_add_header(
    hs: *mut wshd_handshake,
    name: wshd_str,
    value: wshd_str,
) -> i32 {
    // SAFETY: hs is the HandshakeAnswer of this handshake; the strings are
    // borrowed for the call.
    let (call, name, value) = unsafe { (hs_call(hs), raw::str_bytes(name), raw::str_bytes(value)) };
    status(call.add_header(name, value).map_err(RuleError::status))
}

unsafe extern "C" fn fake_hs_reject(
    hs: *mut wshd_handshake,
    http_status: u16,
    body: wshd_str,
) -> i32 {
    // SAFETY: hs is the HandshakeAnswer of this handshake; the body is
    // borrowed for the call.
    let (call, body) = unsafe { (hs_call(hs), raw::str_bytes(body)) };
    status(call.reject(http_status, body).map_err(RuleError::status))
}

/// Checks a descriptor the way the server does when it loads a library
/// built with this SDK.
pub fn validate_descriptor(d: &wshd_descriptor) -> Result<(), String> {
    if d.magic != WSHD_MAGIC {
        return Err(format!("bad magic {:#x}", d.magic));
    }
    if d.abi_major != WSHD_ABI_MAJOR {
        return Err(format!(
            "ABI major {} (expected {WSHD_ABI_MAJOR})",
            d.abi_major
        ));
    }
    if (d.struct_size as usize) < size_of::<wshd_descriptor>() {
        return Err(format!("struct_size {} is too small", d.struct_size));
    }
    if d.init.is_none() || d.on_message.is_none() {
        return Err("init and on_message are required".into());
    }
    // Unknown flags are ignored, as the server does (rules::check_flags).
    match rules::check_flags(d.flags) {
        Ok(()) => {}
        Err(FlagsError::RustSdkWithoutUnwind) => {
            return Err("a Rust SDK handler built without panic = \"unwind\"".into());
        }
    }
    for (what, s) in [
        ("name", d.name),
        ("version", d.version),
        ("build_info", d.build_info),
    ] {
        // SAFETY: descriptor strings are static for the life of the library.
        match rules::descriptor_text(unsafe { raw::str_bytes(s) }) {
            Ok(_) => {}
            Err(DescriptorTextError::TooLong(n)) => {
                return Err(format!(
                    "{what} is {n} bytes (at most {MAX_DESCRIPTOR_STRING})"
                ));
            }
            Err(DescriptorTextError::NotUtf8) => return Err(format!("{what} is not UTF-8")),
        }
    }
    // SAFETY: as above.
    if unsafe { raw::str_bytes(d.name) }.is_empty() {
        return Err("empty name".into());
    }
    Ok(())
}

/// The checked contents of an exported descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorInfo {
    /// The handler name (`echo` for `libecho_wsh.so`).
    pub name: String,
    /// The handler version.
    pub version: String,
    /// SDK version, compiler and profile.
    pub build_info: String,
    /// `WSHD_F_*` flags.
    pub flags: u32,
}

impl DescriptorInfo {
    /// Whether the handler declared `MAY_BLOCK`.
    pub fn may_block(&self) -> bool {
        self.flags & WSHD_F_MAY_BLOCK != 0
    }
}

/// Validates the descriptor that `export_handler!(H)` exports, as the server
/// would, and returns its contents.
pub fn exported<H: Exported>() -> Result<DescriptorInfo, String> {
    let d = H::descriptor();
    validate_descriptor(d)?;
    // SAFETY: validated above; descriptor strings are static.
    let s = |s: wshd_str| unsafe { raw::text(s) }.unwrap_or_default().to_owned();
    Ok(DescriptorInfo {
        name: s(d.name),
        version: s(d.version),
        build_info: s(d.build_info),
        flags: d.flags,
    })
}

/// A fake server for one handler instance; see the [module docs](self).
pub struct TestHost<H: Handler> {
    desc: &'static wshd_descriptor,
    table: &'static wshd_host_api,
    api: HostApi,
    rec: &'static Recorder,
    /// What `init` returned; null once destroyed.
    handler: *mut c_void,
    /// Open connections and their state pointers.
    conns: BTreeMap<u64, *mut c_void>,
    _handler: PhantomData<H>,
}

impl<H: Handler> TestHost<H> {
    /// Runs `init` with this route config, through a descriptor built for
    /// `H` exactly as `export_handler!` builds one.
    pub fn init(config: &str) -> Result<TestHost<H>, InitError> {
        let desc = Export::<H>::new("testing", "0.0.0", cfg!(panic = "unwind")).build();
        Self::init_with(Box::leak(Box::new(desc)), config)
    }

    /// Like [`TestHost::init`], with connection handover declared
    /// (`export_handler!(H, handover)`), for [`TestHost::hand_over`].
    pub fn init_handover(config: &str) -> Result<TestHost<H>, InitError>
    where
        H: crate::Handover,
    {
        let desc = Export::<H>::new("testing", "0.0.0", cfg!(panic = "unwind"))
            .handover()
            .build();
        Self::init_with(Box::leak(Box::new(desc)), config)
    }

    /// Runs `init` through the descriptor `export_handler!(H)` exported.
    pub fn init_exported(config: &str) -> Result<TestHost<H>, InitError>
    where
        H: Exported,
    {
        Self::init_with(H::descriptor(), config)
    }

    fn init_with(desc: &'static wshd_descriptor, config: &str) -> Result<TestHost<H>, InitError> {
        let rec: &'static Recorder = Box::leak(Box::new(Recorder {
            records: Mutex::new(Records::default()),
            revoked: AtomicBool::new(false),
        }));
        let table: &'static wshd_host_api = Box::leak(Box::new(wshd_host_api {
            struct_size: size_of::<wshd_host_api>() as u32,
            abi_major: WSHD_ABI_MAJOR,
            abi_minor: WSHD_ABI_MINOR,
            host_ctx: (rec as *const Recorder).cast_mut().cast(),
            send: fake_send,
            ping: fake_ping,
            close: fake_close,
            log: fake_log,
            hs_select_subprotocol: fake_hs_select_subprotocol,
            hs_add_header: fake_hs_add_header,
            hs_reject: fake_hs_reject,
            log_level: fake_log_level,
            broadcast: fake_broadcast,
            subscribe: fake_subscribe,
            unsubscribe: fake_unsubscribe,
            is_subscribed: fake_is_subscribed,
            publish: fake_publish,
            subscribers: fake_subscribers,
            set_timer: fake_set_timer,
            cancel_timer: fake_cancel_timer,
            // One node: the cluster count is the local count.
            subscribers_cluster: fake_subscribers,
        }));
        // SAFETY: the table and its context are leaked, so valid forever, and
        // the fake functions are thread-safe.
        let api = unsafe { HostApi::from_raw(table) }.expect("the fake host table is complete");
        logging::install(api);
        log::set_max_level(log::LevelFilter::Trace);

        let init = desc.init.expect("init is required");
        let mut handler = std::ptr::null_mut();
        // SAFETY: a valid table, a borrowed config and a writable slot.
        let status = unsafe { init(table, wshd_str::from_str(config), &mut handler) };
        if status != WSHD_OK {
            let logs = std::mem::take(&mut rec.lock().logs);
            return Err(InitError {
                status: CallError(status),
                logs,
            });
        }
        Ok(TestHost {
            desc,
            table,
            api,
            rec,
            handler,
            conns: BTreeMap::new(),
            _handler: PhantomData,
        })
    }

    /// The descriptor this host drives.
    pub fn descriptor(&self) -> &'static wshd_descriptor {
        self.desc
    }

    /// The [`Host`] handle the handler got in `init`.
    pub fn host(&self) -> Host {
        Host::new(self.api)
    }

    /// The handler instance, to inspect its state.
    pub fn handler(&self) -> &H {
        assert!(!self.handler.is_null(), "the handler was destroyed");
        // SAFETY: a live pointer from t_init::<H> (the descriptor is built
        // for H), valid until destroy, which needs `&mut self`.
        unsafe { glue::handler_ref::<H>(self.handler) }
    }

    /// Runs `on_handshake` for a new connection id.
    pub fn handshake(&mut self, req: &Handshake) -> HandshakeOutcome {
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        self.handshake_as(conn, req)
    }

    fn handshake_as(&mut self, conn: u64, req: &Handshake) -> HandshakeOutcome {
        let headers = req.all_headers();
        let raw_headers: Vec<wshd_header> = headers
            .iter()
            .map(|(n, v)| wshd_header {
                name: wshd_str::from_str(n),
                value: wshd_str::from_bytes(v),
            })
            .collect();
        let raw_protocols: Vec<wshd_str> = req
            .subprotocols
            .iter()
            .map(|p| wshd_str::from_str(p))
            .collect();
        let raw = wshd_handshake_req {
            struct_size: size_of::<wshd_handshake_req>() as u32,
            reserved: 0,
            conn,
            path: wshd_str::from_str(&req.path),
            query: wshd_str::from_str(&req.query),
            origin: req
                .origin
                .as_deref()
                .map_or(wshd_str::EMPTY, wshd_str::from_str),
            remote_addr: wshd_str::from_str(&req.remote_addr),
            headers: raw_headers.as_ptr(),
            n_headers: raw_headers.len(),
            subprotocols: raw_protocols.as_ptr(),
            n_subprotocols: raw_protocols.len(),
        };
        let mut call = HandshakeAnswer::new(raw_protocols.len());
        let status = match self.desc.on_handshake {
            // SAFETY: a live handler, a request whose arrays outlive the call,
            // and the HandshakeAnswer that the fake hs_* functions expect.
            Some(f) => unsafe {
                f(
                    self.handler,
                    &raw,
                    (&mut call as *mut HandshakeAnswer).cast(),
                )
            },
            None => WSHD_OK,
        };
        HandshakeOutcome {
            conn,
            status: CallError::check(status),
            subprotocol: call.selected.map(|i| req.subprotocols[i].clone()),
            headers: call.headers,
            rejected: call.reject,
        }
    }

    /// Runs `on_open` for a new connection (no handshake).
    pub fn open(&mut self) -> Result<Conn, CallError> {
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        self.open_as(conn)
    }

    /// Runs `on_handshake` and, if the upgrade is accepted, `on_open` with
    /// the same connection id.
    pub fn connect(&mut self, req: &Handshake) -> Result<Conn, Refused> {
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let outcome = self.handshake_as(conn, req);
        if !outcome.accepted() {
            return Err(Refused::Handshake(outcome));
        }
        self.open_as(conn).map_err(Refused::Open)
    }

    fn open_as(&mut self, conn: u64) -> Result<Conn, CallError> {
        assert!(!self.handler.is_null(), "the handler was destroyed");
        self.rec.lock().open.insert(conn);
        let mut state = std::ptr::null_mut();
        let status = match self.desc.on_open {
            // SAFETY: a live handler and a writable slot.
            Some(f) => unsafe { f(self.handler, conn, &mut state) },
            None => WSHD_OK,
        };
        if status != WSHD_OK {
            // As the server does: close with 1011, no on_close.
            self.rec.lock().open.remove(&conn);
            return Err(CallError(status));
        }
        self.conns.insert(conn, state);
        Ok(Host::new(self.api).conn(conn))
    }

    /// Delivers one message. Like the server, a non-OK status closes the
    /// connection with 1011, running `on_close`.
    pub fn message(&mut self, conn: Conn, msg: Message<'_>) -> Result<(), CallError> {
        let Some(&state) = self.conns.get(&conn.id()) else {
            panic!("{conn:?} is not open in this TestHost");
        };
        let (kind, data) = match msg {
            Message::Text(t) => (WSHD_MSG_TEXT, t.as_bytes()),
            Message::Binary(b) => (WSHD_MSG_BINARY, b),
        };
        let on_message = self.desc.on_message.expect("on_message is required");
        // SAFETY: a live handler and this connection's state; the payload is
        // borrowed for the call.
        let status = unsafe {
            on_message(
                self.handler,
                state,
                conn.id(),
                kind,
                data.as_ptr(),
                data.len(),
            )
        };
        if status != WSHD_OK {
            self.close(conn, 1011, "");
        }
        CallError::check(status)
    }

    /// Ends a connection as if the peer closed it with `code` and `reason`:
    /// the connection is removed first (sends now fail with `Closed`), then
    /// `on_close` runs.
    pub fn close(&mut self, conn: Conn, code: u16, reason: &str) {
        let Some(state) = self.conns.remove(&conn.id()) else {
            panic!("{conn:?} is not open in this TestHost");
        };
        self.rec.lock().open.remove(&conn.id());
        self.forget_conn(conn.id());
        if let Some(on_close) = self.desc.on_close {
            // SAFETY: a live handler; the state is handed back exactly once.
            unsafe {
                on_close(
                    self.handler,
                    state,
                    conn.id(),
                    code,
                    wshd_str::from_str(reason),
                )
            };
        }
    }

    /// Moves `conn` to `to` as the server does at a reload (ABI 1.2
    /// handover): this host's `on_export` (at most `max_bytes`), `to`'s
    /// `on_import`, then the release call (`on_export` with no buffer; no
    /// `on_close`). Returns the connection in `to` (same id). On an error
    /// the connection stays open here, as on the server.
    pub fn hand_over<H2: Handler>(
        &mut self,
        conn: Conn,
        to: &mut TestHost<H2>,
        max_bytes: usize,
    ) -> Result<Conn, CallError> {
        let Some(&state) = self.conns.get(&conn.id()) else {
            panic!("{conn:?} is not open in this TestHost");
        };
        let (Some(export), Some(import)) = (self.desc.on_export, to.desc.on_import) else {
            return Err(CallError(WSHD_ERR_UNSUPPORTED));
        };
        unsafe extern "C" fn write(out: *mut wshd_export_out, data: *const u8, len: usize) -> i32 {
            // SAFETY: `out` is the buffer hand_over passed, whose host_buf
            // is its Vec; the data is borrowed for the call.
            let (out, data) = unsafe { (&mut *out, crate::raw::bytes(data, len)) };
            // SAFETY: as above.
            let buf = unsafe { &mut *out.host_buf.cast::<Vec<u8>>() };
            if buf.len() + data.len() > out.max_len {
                return crate::abi::WSHD_ERR_LIMIT;
            }
            buf.extend_from_slice(data);
            WSHD_OK
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut out = wshd_export_out {
            host_buf: (&mut buf as *mut Vec<u8>).cast(),
            write,
            max_len: max_bytes,
        };
        // SAFETY: a live handler, this connection's state, and a buffer
        // valid for the call.
        CallError::check(unsafe { export(self.handler, state, conn.id(), &mut out) })?;
        assert!(!to.handler.is_null(), "the target handler was destroyed");
        let mut new_state = std::ptr::null_mut();
        // SAFETY: a live handler; the bytes are borrowed for the call.
        CallError::check(unsafe {
            import(
                to.handler,
                conn.id(),
                buf.as_ptr(),
                buf.len(),
                &mut new_state,
            )
        })?;
        self.conns.remove(&conn.id());
        self.rec.lock().open.remove(&conn.id());
        // As the server does: the old version's timers for it are dropped.
        self.forget_conn(conn.id());
        // SAFETY: the release call, the state's last use in this host.
        unsafe { export(self.handler, state, conn.id(), std::ptr::null_mut()) };
        to.rec.lock().open.insert(conn.id());
        to.conns.insert(conn.id(), new_state);
        Ok(Host::new(to.api).conn(conn.id()))
    }

    /// Whether the connection is open (opened and not yet closed).
    pub fn is_open(&self, conn: Conn) -> bool {
        self.conns.contains_key(&conn.id())
    }

    /// The connection's state, while it is open.
    pub fn state(&self, conn: Conn) -> Option<&H::ConnState> {
        let &state = self.conns.get(&conn.id())?;
        // SAFETY: the Box t_on_open::<H> made for this connection; no
        // callback runs while `&self` is borrowed.
        Some(unsafe { &*state.cast::<H::ConnState>() })
    }

    /// Every message sent to `conn` so far.
    pub fn sent(&self, conn: Conn) -> Vec<Sent> {
        self.rec
            .lock()
            .sent
            .get(&conn.id())
            .cloned()
            .unwrap_or_default()
    }

    /// Takes the messages sent to `conn` so far.
    pub fn take_sent(&mut self, conn: Conn) -> Vec<Sent> {
        self.rec.lock().sent.remove(&conn.id()).unwrap_or_default()
    }

    /// How many `broadcast` calls the handler made (each also shows in
    /// [`TestHost::sent`] of every connection it reached).
    pub fn broadcasts(&self) -> usize {
        self.rec.lock().broadcasts
    }

    /// Ping payloads sent to `conn`.
    pub fn pings(&self, conn: Conn) -> Vec<Vec<u8>> {
        self.rec
            .lock()
            .pings
            .get(&conn.id())
            .cloned()
            .unwrap_or_default()
    }

    /// The `(code, reason)` with which the handler asked to close `conn`.
    pub fn close_request(&self, conn: Conn) -> Option<(u16, String)> {
        self.rec.lock().close_requests.get(&conn.id()).cloned()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<LogRecord> {
        self.rec.lock().logs.clone()
    }

    /// Whether some log line so far contains `needle`.
    pub fn logs_contain(&self, needle: &str) -> bool {
        self.rec
            .lock()
            .logs
            .iter()
            .any(|r| r.message.contains(needle))
    }

    /// From now on every send, ping and close fails with `err` (`None`
    /// restores normal behaviour), e.g. `Some(SendError::Backpressure)`.
    pub fn set_send_error(&mut self, err: Option<SendError>) {
        self.rec.lock().fail_with = err.map(|e| e.status());
    }

    /// As on the server: a closed connection's subscriptions and timers end.
    fn forget_conn(&self, id: u64) {
        let mut r = self.rec.lock();
        r.topics.retain(|_, subs| {
            subs.remove(&id);
            !subs.is_empty()
        });
        r.timers.retain(|_, (conn, _)| *conn != id);
    }

    /// How many `publish` calls the handler made (each also shows in
    /// [`TestHost::sent`] of every subscriber it reached).
    pub fn publishes(&self) -> usize {
        self.rec.lock().publishes
    }

    /// The connections subscribed to `topic`, by id.
    pub fn subscribers(&self, topic: &str) -> Vec<u64> {
        let r = self.rec.lock();
        r.topics.get(topic).into_iter().flatten().copied().collect()
    }

    /// Pending timers: `(id, connection id or 0, delay)`, in the order they
    /// were set.
    pub fn timers(&self) -> Vec<(u64, u64, std::time::Duration)> {
        let r = self.rec.lock();
        (r.timers.iter())
            .map(|(&id, &(conn, ms))| (id, conn, std::time::Duration::from_millis(ms)))
            .collect()
    }

    /// Delivers pending timer `id` as the server would when it fires: to
    /// its connection's state (an error closes it with 1011), or with no
    /// connection. Panics if it is not pending.
    pub fn fire_timer(&mut self, id: u64) -> Result<(), CallError> {
        let (conn, _) = self
            .rec
            .lock()
            .timers
            .remove(&id)
            .unwrap_or_else(|| panic!("timer {id} is not pending"));
        let Some(on_timer) = self.desc.on_timer else {
            return Ok(());
        };
        let state = match conn {
            0 => std::ptr::null_mut(),
            c => *self
                .conns
                .get(&c)
                .expect("a pending timer's connection is open"),
        };
        // SAFETY: a live handler and, for a connection timer, its state.
        let status = unsafe { on_timer(self.handler, state, conn, id) };
        if status != WSHD_OK && conn != 0 {
            self.close(Host::new(self.api).conn(conn), 1011, "");
        }
        CallError::check(status)
    }

    /// Closes every open connection with 1001 "going away", runs `destroy`,
    /// revokes the host table and returns every log line.
    pub fn destroy(mut self) -> Vec<LogRecord> {
        self.shut_down();
        std::mem::take(&mut self.rec.lock().logs)
    }

    fn shut_down(&mut self) {
        if self.handler.is_null() {
            return;
        }
        let open: Vec<u64> = self.conns.keys().copied().collect();
        for id in open {
            self.close(Host::new(self.api).conn(id), 1001, "going away");
        }
        if let Some(destroy) = self.desc.destroy {
            // SAFETY: no connection is left and no other call is running.
            unsafe { destroy(self.handler) };
        }
        self.handler = std::ptr::null_mut();
        self.rec.revoked.store(true, Ordering::Release);
        let mut r = self.rec.lock();
        r.sent.clear();
        r.pings.clear();
    }
}

impl<H: Handler> Drop for TestHost<H> {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl<H: Handler> fmt::Debug for TestHost<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHost")
            .field("table", &(self.table as *const wshd_host_api))
            .field("open", &self.conns.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests;
