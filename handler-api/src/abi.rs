//! The raw C ABI, version 1: a field-for-field mirror of
//! `include/wshd_handler.h`.
//!
//! This module holds only `#[repr(C)]` types and constants, no logic. The
//! header is the source of truth and carries the ownership, threading and
//! versioning rules; `tests/layout.rs` compiles the header with a C compiler
//! and compares every size and offset with this mirror.
//!
//! The server uses these types to load handlers; handler authors normally use
//! the safe [`Handler`](crate::Handler) trait instead.

use std::ffi::c_void;

/// `"WSHD"` as a little-endian `u32`; the first field of every descriptor.
pub const WSHD_MAGIC: u32 = 0x4448_5357;
/// Incompatible changes bump the major version and rename the entry symbol.
pub const WSHD_ABI_MAJOR: u16 = 1;
/// Fields appended to the end of a struct bump the minor version.
pub const WSHD_ABI_MINOR: u16 = 2;
/// The exported entry point, NUL-terminated for `dlsym`.
pub const WSHD_ENTRY_SYMBOL: &[u8] = b"wshd_entry_v1\0";
/// The entry point name without the NUL, for messages.
pub const WSHD_ENTRY_NAME: &str = "wshd_entry_v1";

/// Connection ids are unique for the life of the process; 0 is never valid.
pub type wshd_conn_id = u64;

/// Status: success.
pub const WSHD_OK: i32 = 0;
/// The connection is closed or belongs to another handler instance.
pub const WSHD_ERR_CLOSED: i32 = -1;
/// The connection's send queue is full.
pub const WSHD_ERR_BACKPRESSURE: i32 = -2;
/// A bad argument: invalid UTF-8, bad close code, refused header.
pub const WSHD_ERR_INVALID: i32 = -3;
/// The call is not allowed in the current state.
pub const WSHD_ERR_STATE: i32 = -4;
/// The handler instance was destroyed; nothing more can be sent through it.
pub const WSHD_ERR_REVOKED: i32 = -5;
/// The host is too old to provide this function.
pub const WSHD_ERR_UNSUPPORTED: i32 = -6;
/// ABI 1.2: a configured cap was reached (topics per connection, topics on
/// the server, pending timers); nothing was changed.
pub const WSHD_ERR_LIMIT: i32 = -7;
/// A Rust handler panicked; the SDK caught it.
pub const WSHD_ERR_PANIC: i32 = -100;
/// The handler reports a failure of its own.
pub const WSHD_ERR_HANDLER: i32 = -101;

/// Message kind: UTF-8 text.
pub const WSHD_MSG_TEXT: u32 = 1;
/// Message kind: binary.
pub const WSHD_MSG_BINARY: u32 = 2;
/// Send flag, OR-ed into the `kind` of `send`, `broadcast` and `publish`:
/// never compress this message, even on a connection that negotiated
/// permessage-deflate (data that is already compressed, or secrets that
/// must not share a compressed frame with attacker-chosen text). Hosts
/// before it refuse the flag with `WSHD_ERR_INVALID`; a handler can resend
/// without it.
pub const WSHD_SEND_NO_COMPRESS: u32 = 1 << 8;

/// Log level: error.
pub const WSHD_LOG_ERROR: u32 = 1;
/// Log level: warning.
pub const WSHD_LOG_WARN: u32 = 2;
/// Log level: info.
pub const WSHD_LOG_INFO: u32 = 3;
/// Log level: debug.
pub const WSHD_LOG_DEBUG: u32 = 4;
/// Log level: trace.
pub const WSHD_LOG_TRACE: u32 = 5;

/// The handler's callbacks may block; the host runs them off its async workers.
pub const WSHD_F_MAY_BLOCK: u32 = 1 << 0;
/// Built with `panic = "unwind"`: the SDK catches panics in every callback.
pub const WSHD_F_PANIC_UNWIND: u32 = 1 << 1;
/// Built with the Rust SDK; the host then requires `WSHD_F_PANIC_UNWIND`.
pub const WSHD_F_RUST_SDK: u32 = 1 << 2;
/// Every flag this version of the ABI defines.
pub const WSHD_F_KNOWN: u32 = WSHD_F_MAY_BLOCK | WSHD_F_PANIC_UNWIND | WSHD_F_RUST_SDK;

/// Borrowed UTF-8 text, not NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wshd_str {
    /// Start of the bytes; may be null when `len` is 0.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a wshd_str is a borrowed view; the ABI rules say who keeps the bytes
// alive, and the bytes are never written through it.
unsafe impl Send for wshd_str {}
// SAFETY: as above; the view is read-only.
unsafe impl Sync for wshd_str {}

impl wshd_str {
    /// The empty string (null pointer, zero length).
    pub const EMPTY: wshd_str = wshd_str {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// A view of a Rust string. The view borrows `s`; keep `s` alive while the
    /// view is used.
    pub const fn from_str(s: &str) -> wshd_str {
        wshd_str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// A view of bytes. The view borrows `b`.
    pub const fn from_bytes(b: &[u8]) -> wshd_str {
        wshd_str {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }
}

/// One HTTP header, borrowed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wshd_header {
    /// Header name as received.
    pub name: wshd_str,
    /// Header value as received (may not be UTF-8 in theory; the host passes
    /// the raw bytes).
    pub value: wshd_str,
}

/// Opaque host object for building a handshake response.
#[repr(C)]
pub struct wshd_handshake {
    _private: [u8; 0],
}

/// A client's opening handshake, borrowed for the duration of `on_handshake`.
#[repr(C)]
#[derive(Debug)]
pub struct wshd_handshake_req {
    /// `size_of::<wshd_handshake_req>()` as the host saw it.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// The id the connection will have if it is accepted.
    pub conn: wshd_conn_id,
    /// The request path without the query.
    pub path: wshd_str,
    /// The query string without `?`.
    pub query: wshd_str,
    /// The `Origin` header; `ptr` is null when the header is absent.
    pub origin: wshd_str,
    /// The peer address as `ip:port`.
    pub remote_addr: wshd_str,
    /// All request headers in arrival order.
    pub headers: *const wshd_header,
    /// Number of entries in `headers`.
    pub n_headers: usize,
    /// The client's `Sec-WebSocket-Protocol` offer, in order.
    pub subprotocols: *const wshd_str,
    /// Number of entries in `subprotocols`.
    pub n_subprotocols: usize,
}

/// Host function: queue a message.
pub type wshd_send_fn = unsafe extern "C" fn(
    ctx: *mut c_void,
    conn: wshd_conn_id,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32;
/// Host function: queue a ping.
pub type wshd_ping_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, data: *const u8, len: usize) -> i32;
/// Host function: start a close handshake.
pub type wshd_close_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, code: u16, reason: wshd_str) -> i32;
/// Host function: write a log line.
pub type wshd_log_fn =
    unsafe extern "C" fn(ctx: *mut c_void, level: u32, target: wshd_str, msg: wshd_str);
/// Host function (ABI 1.1): the most verbose `WSHD_LOG_*` level the host
/// writes right now, 0 for none.
pub type wshd_log_level_fn = unsafe extern "C" fn(ctx: *mut c_void) -> u32;
/// Host function (ABI 1.2): queue one message to many connections, storing
/// the payload once. `*delivered` (if not null) receives how many of the
/// listed connections it was queued to.
pub type wshd_broadcast_fn = unsafe extern "C" fn(
    ctx: *mut c_void,
    conns: *const wshd_conn_id,
    n: usize,
    kind: u32,
    data: *const u8,
    len: usize,
    delivered: *mut usize,
) -> i32;
/// Host function (ABI 1.2): subscribe connection `conn` to `topic`
/// (UTF-8, 1..=256 bytes).
pub type wshd_subscribe_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, topic: wshd_str) -> i32;
/// Host function (ABI 1.2): end `conn`'s subscription to `topic`.
pub type wshd_unsubscribe_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, topic: wshd_str) -> i32;
/// Host function (ABI 1.2): 1 if `conn` is subscribed to `topic`, 0 if not,
/// or a negative status.
pub type wshd_is_subscribed_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, topic: wshd_str) -> i32;
/// Host function (ABI 1.2): queue one message to every subscriber of
/// `topic` except `exclude` (0 for none), storing the payload once. Returns
/// the number of local recipients, or a negative status.
pub type wshd_publish_fn = unsafe extern "C" fn(
    ctx: *mut c_void,
    topic: wshd_str,
    kind: u32,
    data: *const u8,
    len: usize,
    exclude: wshd_conn_id,
) -> i64;
/// Host function (ABI 1.2): the number of subscribers of `topic` on this
/// server, or a negative status.
pub type wshd_subscribers_fn = unsafe extern "C" fn(ctx: *mut c_void, topic: wshd_str) -> i64;
/// Host function (ABI 1.2): the number of subscribers of `topic` across
/// every node of a cluster (`[cluster]`), or a negative status. Approximate:
/// this node's exact count plus the other nodes' counts as last exchanged
/// (every few seconds, and only for topics with a subscriber on this node).
/// Without a cluster, the same as `subscribers`. Never waits on the network.
pub type wshd_subscribers_cluster_fn =
    unsafe extern "C" fn(ctx: *mut c_void, topic: wshd_str) -> i64;
/// Host function (ABI 1.2): call `on_timer` once after `delay_ms`, for
/// connection `conn` (0: for the instance). Returns the timer id (> 0) or a
/// negative status.
pub type wshd_set_timer_fn =
    unsafe extern "C" fn(ctx: *mut c_void, conn: wshd_conn_id, delay_ms: u64) -> i64;
/// Host function (ABI 1.2): cancel a pending timer.
pub type wshd_cancel_timer_fn = unsafe extern "C" fn(ctx: *mut c_void, timer: u64) -> i32;
/// Host function: choose the offered subprotocol at `index`.
pub type wshd_hs_select_subprotocol_fn =
    unsafe extern "C" fn(hs: *mut wshd_handshake, index: usize) -> i32;
/// Host function: add a response header.
pub type wshd_hs_add_header_fn =
    unsafe extern "C" fn(hs: *mut wshd_handshake, name: wshd_str, value: wshd_str) -> i32;
/// Host function: refuse the upgrade.
pub type wshd_hs_reject_fn =
    unsafe extern "C" fn(hs: *mut wshd_handshake, http_status: u16, body: wshd_str) -> i32;

/// The host's function table. Valid for the life of the process.
#[repr(C)]
#[derive(Debug)]
pub struct wshd_host_api {
    /// `size_of::<wshd_host_api>()` as the host built it.
    pub struct_size: u32,
    /// The host's ABI major version.
    pub abi_major: u16,
    /// The host's ABI minor version.
    pub abi_minor: u16,
    /// Opaque context to pass to `send`, `ping`, `close` and `log`.
    pub host_ctx: *mut c_void,
    /// Queue a text or binary message.
    pub send: wshd_send_fn,
    /// Queue a ping (payload at most 125 bytes).
    pub ping: wshd_ping_fn,
    /// Start a close handshake.
    pub close: wshd_close_fn,
    /// Write to the server's log.
    pub log: wshd_log_fn,
    /// Choose a subprotocol (inside `on_handshake` only).
    pub hs_select_subprotocol: wshd_hs_select_subprotocol_fn,
    /// Add a response header (inside `on_handshake` only).
    pub hs_add_header: wshd_hs_add_header_fn,
    /// Refuse the upgrade (inside `on_handshake` only).
    pub hs_reject: wshd_hs_reject_fn,
    /// ABI 1.1: the level the host logs at now. A host of ABI 1.0 ends
    /// before this field: read it only when `struct_size` is at least
    /// [`WSHD_HOST_API_SIZE_1_1`].
    pub log_level: wshd_log_level_fn,
    /// ABI 1.2: queue one message to many connections with one shared copy
    /// of the payload. Hosts of ABI 1.0 and 1.1 end before this field: read
    /// it only when `struct_size` is at least [`WSHD_HOST_API_SIZE_1_2`].
    pub broadcast: wshd_broadcast_fn,
    /// ABI 1.2: subscribe a connection to a topic. Like every field below,
    /// present when `struct_size` is at least [`WSHD_HOST_API_SIZE_1_2`].
    pub subscribe: wshd_subscribe_fn,
    /// ABI 1.2: end a subscription.
    pub unsubscribe: wshd_unsubscribe_fn,
    /// ABI 1.2: whether a connection is subscribed to a topic.
    pub is_subscribed: wshd_is_subscribed_fn,
    /// ABI 1.2: one message to every subscriber of a topic.
    pub publish: wshd_publish_fn,
    /// ABI 1.2: the number of subscribers of a topic.
    pub subscribers: wshd_subscribers_fn,
    /// ABI 1.2: start a one-shot timer delivered to `on_timer`.
    pub set_timer: wshd_set_timer_fn,
    /// ABI 1.2: cancel a timer.
    pub cancel_timer: wshd_cancel_timer_fn,
    /// ABI 1.2: the approximate number of subscribers of a topic across a
    /// cluster.
    pub subscribers_cluster: wshd_subscribers_cluster_fn,
}

/// `struct_size` of an ABI 1.0 host table: everything before `log_level`.
pub const WSHD_HOST_API_SIZE_1_0: usize = std::mem::offset_of!(wshd_host_api, log_level);
/// `struct_size` of a host table that has `log_level` (ABI 1.1 and later).
pub const WSHD_HOST_API_SIZE_1_1: usize =
    WSHD_HOST_API_SIZE_1_0 + std::mem::size_of::<wshd_log_level_fn>();
/// `struct_size` of an ABI 1.2 host table: `broadcast` and the topic and
/// timer functions, up to `subscribers_cluster` (ABI 1.2 and later).
pub const WSHD_HOST_API_SIZE_1_2: usize = std::mem::offset_of!(wshd_host_api, subscribers_cluster)
    + std::mem::size_of::<wshd_subscribers_cluster_fn>();

// SAFETY: the host API table is immutable after creation and every function in
// it is documented as thread-safe; host_ctx is only ever passed back to those
// functions.
unsafe impl Send for wshd_host_api {}
// SAFETY: as above.
unsafe impl Sync for wshd_host_api {}

/// Handler callback: create an instance for one route.
pub type wshd_init_fn = unsafe extern "C" fn(
    host: *const wshd_host_api,
    config: wshd_str,
    out_handler: *mut *mut c_void,
) -> i32;
/// Handler callback: inspect and shape the opening handshake.
pub type wshd_on_handshake_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    req: *const wshd_handshake_req,
    hs: *mut wshd_handshake,
) -> i32;
/// Handler callback: a connection opened.
pub type wshd_on_open_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn: wshd_conn_id,
    out_conn_state: *mut *mut c_void,
) -> i32;
/// Handler callback: a complete message arrived.
pub type wshd_on_message_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32;
/// Handler callback: a connection closed.
pub type wshd_on_close_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    code: u16,
    reason: wshd_str,
);
/// Handler callback (ABI 1.2): a timer set with `set_timer` fired.
/// `conn_state` and `conn` are the connection's (NULL and 0 for a timer set
/// for the instance).
pub type wshd_on_timer_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    timer: u64,
) -> i32;
/// Host function (ABI 1.2, handover): append `len` bytes to an export
/// buffer. `WSHD_OK`, or `WSHD_ERR_LIMIT` (nothing appended) when the total
/// would exceed `out.max_len`; the export then fails.
pub type wshd_export_write_fn =
    unsafe extern "C" fn(out: *mut wshd_export_out, data: *const u8, len: usize) -> i32;

/// ABI 1.2 (handover): the host-owned buffer `on_export` writes one
/// connection's state into. Valid only during that `on_export` call.
#[repr(C)]
#[derive(Debug)]
pub struct wshd_export_out {
    /// Opaque host data; pass `out` itself to `write`.
    pub host_buf: *mut c_void,
    /// Append bytes to the buffer.
    pub write: wshd_export_write_fn,
    /// The most bytes the buffer takes in total (`[reload]
    /// handover_max_bytes`).
    pub max_len: usize,
}

/// Handler callback (ABI 1.2, optional): serialize connection `conn`'s state
/// into `out` so another version can rebuild it in `on_import`. Called
/// between two of the connection's callbacks. `out == NULL` is the release
/// call: the connection has moved to another version; free `conn_state`
/// (no other callback for `conn` follows in this version, not `on_close`).
pub type wshd_on_export_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn_state: *mut c_void,
    conn: wshd_conn_id,
    out: *mut wshd_export_out,
) -> i32;
/// Handler callback (ABI 1.2, optional): rebuild connection `conn`'s state
/// from bytes another version's `on_export` wrote (borrowed for the call).
/// A non-OK status refuses the connection, which stays on the old version.
pub type wshd_on_import_fn = unsafe extern "C" fn(
    handler: *mut c_void,
    conn: wshd_conn_id,
    data: *const u8,
    len: usize,
    out_conn_state: *mut *mut c_void,
) -> i32;

/// Handler callback: free the instance.
pub type wshd_destroy_fn = unsafe extern "C" fn(handler: *mut c_void);

/// The static descriptor returned by `wshd_entry_v1`.
#[repr(C)]
#[derive(Debug)]
pub struct wshd_descriptor {
    /// Must be [`WSHD_MAGIC`].
    pub magic: u32,
    /// The ABI major version the handler was built against.
    pub abi_major: u16,
    /// The ABI minor version the handler was built against.
    pub abi_minor: u16,
    /// `size_of::<wshd_descriptor>()` as the handler saw it.
    pub struct_size: u32,
    /// `WSHD_F_*` flags.
    pub flags: u32,
    /// Handler name, e.g. `echo`.
    pub name: wshd_str,
    /// Handler version, e.g. `1.2.0`.
    pub version: wshd_str,
    /// Free text for diagnostics (SDK version, compiler).
    pub build_info: wshd_str,
    /// Required: create an instance.
    pub init: Option<wshd_init_fn>,
    /// Optional: shape the handshake.
    pub on_handshake: Option<wshd_on_handshake_fn>,
    /// Optional: a connection opened.
    pub on_open: Option<wshd_on_open_fn>,
    /// Required: a message arrived.
    pub on_message: Option<wshd_on_message_fn>,
    /// Optional: a connection closed.
    pub on_close: Option<wshd_on_close_fn>,
    /// Optional: free the instance.
    pub destroy: Option<wshd_destroy_fn>,
    /// ABI 1.2, optional: a timer fired. Descriptors of ABI 1.0 and 1.1 end
    /// before this field: the host reads it only when `struct_size` is at
    /// least [`WSHD_DESCRIPTOR_SIZE_1_2`].
    pub on_timer: Option<wshd_on_timer_fn>,
    /// ABI 1.2, optional (connection handover): serialize a connection's
    /// state, or free it once the connection moved (`out == NULL`). Read
    /// only when `struct_size` is at least [`WSHD_DESCRIPTOR_SIZE_HANDOVER`].
    pub on_export: Option<wshd_on_export_fn>,
    /// ABI 1.2, optional (connection handover): rebuild a connection's
    /// state from another version's export.
    pub on_import: Option<wshd_on_import_fn>,
}

/// `struct_size` of an ABI 1.0 or 1.1 descriptor: everything before
/// `on_timer`.
pub const WSHD_DESCRIPTOR_SIZE_1_0: usize = std::mem::offset_of!(wshd_descriptor, on_timer);
/// `struct_size` of a descriptor that has `on_timer` (ABI 1.2 and later).
pub const WSHD_DESCRIPTOR_SIZE_1_2: usize =
    WSHD_DESCRIPTOR_SIZE_1_0 + std::mem::size_of::<Option<wshd_on_timer_fn>>();

/// `struct_size` of a descriptor that has `on_export` and `on_import` (the
/// end of the ABI 1.2 descriptor). Descriptors of early 1.2 builds end at
/// `on_timer`; the host reads these two fields only past this size.
pub const WSHD_DESCRIPTOR_SIZE_HANDOVER: usize = std::mem::offset_of!(wshd_descriptor, on_import)
    + std::mem::size_of::<Option<wshd_on_import_fn>>();

// SAFETY: the descriptor is static, immutable data.
unsafe impl Sync for wshd_descriptor {}

/// The signature of `wshd_entry_v1`.
pub type wshd_entry_fn = unsafe extern "C" fn() -> *const wshd_descriptor;

// Compile-time layout checks for 64-bit targets; tests/layout.rs checks every
// field offset against the C compiler.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<wshd_str>() == 16);
    assert!(std::mem::size_of::<wshd_header>() == 32);
    assert!(std::mem::size_of::<wshd_handshake_req>() == 112);
    assert!(std::mem::size_of::<wshd_host_api>() == 152);
    // ABI 1.0 hosts (wshd before log_level) built 72-byte tables, 1.1 hosts
    // (before broadcast) 80-byte ones, 1.2 hosts 152-byte ones.
    assert!(WSHD_HOST_API_SIZE_1_0 == 72);
    assert!(WSHD_HOST_API_SIZE_1_1 == 80);
    assert!(WSHD_HOST_API_SIZE_1_2 == 152);
    assert!(std::mem::size_of::<wshd_descriptor>() == 136);
    assert!(WSHD_DESCRIPTOR_SIZE_1_0 == 112);
    assert!(WSHD_DESCRIPTOR_SIZE_1_2 == 120);
    assert!(WSHD_DESCRIPTOR_SIZE_HANDOVER == 136);
    assert!(std::mem::size_of::<wshd_export_out>() == 24);
};
