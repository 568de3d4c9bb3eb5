//! The SDK's raw side of the host: null-safe views of the borrowed data a
//! host passes to callbacks, the host's function table ([`HostApi`]) and
//! the handshake builder. Everything above it (the safe `Host` and `Conn`,
//! the log bridge, the trampolines in `glue`) calls the host through here,
//! so this module depends on the ABI definitions alone and nothing depends
//! back on its users.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::str::Utf8Error;

use crate::abi::{
    WSHD_ERR_INVALID, WSHD_ERR_REVOKED, WSHD_ERR_UNSUPPORTED, WSHD_HOST_API_SIZE_1_0,
    WSHD_HOST_API_SIZE_1_1, WSHD_HOST_API_SIZE_1_2, WSHD_OK, wshd_conn_id, wshd_handshake,
    wshd_header, wshd_host_api, wshd_str,
};

// ---------------------------------------------------------------------------
// Null-safe views of borrowed ABI data.

/// Borrows `len` bytes at `ptr`. A null pointer or a zero length gives the
/// empty slice, and so does a length no allocation can have.
///
/// # Safety
/// If `ptr` is non-null and `len > 0`, `len` bytes at `ptr` must be readable
/// and unchanged for `'a`.
pub(crate) unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 || len > isize::MAX as usize {
        return &[];
    }
    // SAFETY: ptr is non-null, len fits in isize, and the caller promises the
    // bytes are readable and unchanged for 'a. u8 has no alignment needs.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// The bytes of a `wshd_str`; see [`bytes`].
///
/// # Safety
/// As for [`bytes`], with `s.ptr` and `s.len`.
pub(crate) unsafe fn str_bytes<'a>(s: wshd_str) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { bytes(s.ptr, s.len) }
}

/// A `wshd_str` as `&str`, checking UTF-8. (NULL, 0) is `""`.
///
/// # Safety
/// As for [`bytes`], with `s.ptr` and `s.len`.
pub(crate) unsafe fn text<'a>(s: wshd_str) -> Result<&'a str, Utf8Error> {
    // SAFETY: forwarded to the caller.
    std::str::from_utf8(unsafe { str_bytes(s) })
}

/// Like [`text`], but a null pointer means "absent" (`Ok(None)`), as for
/// `wshd_handshake_req.origin`.
///
/// # Safety
/// As for [`bytes`], with `s.ptr` and `s.len`.
pub(crate) unsafe fn opt_text<'a>(s: wshd_str) -> Result<Option<&'a str>, Utf8Error> {
    if s.ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded to the caller.
    unsafe { text(s) }.map(Some)
}

/// Borrows an array of `n` values at `ptr`. Null, zero, misaligned or
/// impossible sizes give the empty slice.
///
/// # Safety
/// If the pointer is non-null, aligned and `n > 0`, `n` initialised values
/// at `ptr` must be readable and unchanged for `'a`.
pub(crate) unsafe fn items<'a, T>(ptr: *const T, n: usize) -> &'a [T] {
    let fits = n
        .checked_mul(size_of::<T>())
        .is_some_and(|b| b <= isize::MAX as usize);
    if ptr.is_null() || n == 0 || !ptr.is_aligned() || !fits {
        return &[];
    }
    // SAFETY: non-null, aligned, the total size fits in isize, and the caller
    // promises n readable values for 'a.
    unsafe { std::slice::from_raw_parts(ptr, n) }
}

/// A host-provided array of strings whose bytes live for `'a`.
#[derive(Clone, Copy)]
pub(crate) struct RawStrs<'a>(&'a [wshd_str]);

impl<'a> RawStrs<'a> {
    /// # Safety
    /// As for [`items`]; in addition every element's bytes must be readable
    /// for `'a` (as for [`bytes`]).
    pub(crate) unsafe fn new(ptr: *const wshd_str, n: usize) -> RawStrs<'a> {
        // SAFETY: forwarded to the caller.
        RawStrs(unsafe { items(ptr, n) })
    }

    pub(crate) fn len(self) -> usize {
        self.0.len()
    }

    pub(crate) fn get(self, i: usize) -> Option<&'a [u8]> {
        let s = *self.0.get(i)?;
        // SAFETY: `new`'s contract: every element's bytes live for 'a.
        Some(unsafe { str_bytes(s) })
    }
}

/// A host-provided array of headers whose bytes live for `'a`.
#[derive(Clone, Copy)]
pub(crate) struct RawHeaders<'a>(&'a [wshd_header]);

impl<'a> RawHeaders<'a> {
    /// # Safety
    /// As for [`items`]; in addition every name's and value's bytes must be
    /// readable for `'a` (as for [`bytes`]).
    pub(crate) unsafe fn new(ptr: *const wshd_header, n: usize) -> RawHeaders<'a> {
        // SAFETY: forwarded to the caller.
        RawHeaders(unsafe { items(ptr, n) })
    }

    pub(crate) fn len(self) -> usize {
        self.0.len()
    }

    pub(crate) fn get(self, i: usize) -> Option<(&'a [u8], &'a [u8])> {
        let h = *self.0.get(i)?;
        // SAFETY: `new`'s contract: every name and value lives for 'a.
        Some(unsafe { (str_bytes(h.name), str_bytes(h.value)) })
    }
}

// ---------------------------------------------------------------------------
// Calls into the host.

/// A host function table that is valid for the rest of the process (ABI
/// ownership rule 4), so it can be copied into `Conn`s that other threads keep.
///
/// Held as a pointer, not a `&wshd_host_api`: a host of an older minor
/// version built a shorter table, and a reference would claim that all of
/// the current struct is there. Fields are read one at a time, and a field
/// added after ABI 1.0 only once `struct_size` shows the host has it.
#[derive(Clone, Copy)]
pub(crate) struct HostApi(NonNull<wshd_host_api>);

// SAFETY: the table is immutable and outlives every thread (ownership rule
// 4), and the host's functions are thread-safe by contract; `host_ctx` is only
// passed back to them.
unsafe impl Send for HostApi {}
// SAFETY: as for Send: nothing in the table is ever written.
unsafe impl Sync for HostApi {}

impl HostApi {
    /// Wraps a host table; `None` if it is null or smaller than ABI 1.0's.
    ///
    /// # Safety
    /// A non-null `api` must point to a table that stays valid and unchanged
    /// for the rest of the process, at least `struct_size` bytes long, whose
    /// functions and `host_ctx` follow the contract in `wshd_handler.h`
    /// (thread-safe, never re-entering).
    pub(crate) unsafe fn from_raw(api: *const wshd_host_api) -> Option<HostApi> {
        let api = NonNull::new(api.cast_mut())?;
        // SAFETY: the caller promises a valid table; struct_size comes first
        // in every version.
        let size = unsafe { (*api.as_ptr()).struct_size } as usize;
        // Every ABI 1.0 field must be there; a newer, larger table is fine.
        (size >= WSHD_HOST_API_SIZE_1_0).then_some(HostApi(api))
    }

    /// The table, for reading ABI 1.0 fields, which `from_raw` checked are
    /// all there.
    fn t(self) -> *const wshd_host_api {
        self.0.as_ptr()
    }

    /// The host's ABI version, `(major, minor)`.
    pub(crate) fn version(self) -> (u16, u16) {
        // SAFETY: 1.0 fields of a table `from_raw` accepted.
        unsafe { ((*self.t()).abi_major, (*self.t()).abi_minor) }
    }

    pub(crate) fn send(self, conn: wshd_conn_id, kind: u32, data: &[u8]) -> i32 {
        let t = self.t();
        // SAFETY: `from_raw` guarantees a valid, thread-safe table; the payload
        // is borrowed only for the call (ownership rule 2).
        unsafe { ((*t).send)((*t).host_ctx, conn, kind, data.as_ptr(), data.len()) }
    }

    pub(crate) fn ping(self, conn: wshd_conn_id, data: &[u8]) -> i32 {
        let t = self.t();
        // SAFETY: as in `send`.
        unsafe { ((*t).ping)((*t).host_ctx, conn, data.as_ptr(), data.len()) }
    }

    pub(crate) fn close(self, conn: wshd_conn_id, code: u16, reason: &str) -> i32 {
        let t = self.t();
        // SAFETY: as in `send`.
        unsafe { ((*t).close)((*t).host_ctx, conn, code, wshd_str::from_str(reason)) }
    }

    pub(crate) fn log(self, level: log::Level, target: &str, msg: &str) {
        let (target, msg) = (wshd_str::from_str(target), wshd_str::from_str(msg));
        let t = self.t();
        // SAFETY: as in `send`. log::Level's numbering (Error = 1 .. Trace = 5)
        // is the ABI's WSHD_LOG_* numbering.
        unsafe { ((*t).log)((*t).host_ctx, level as u32, target, msg) }
    }

    /// The most verbose level the host writes now; `None` from a host of ABI
    /// 1.0, which cannot say.
    pub(crate) fn log_level(self) -> Option<log::LevelFilter> {
        let t = self.t();
        // SAFETY: `log_level` is read only when `struct_size` shows the table
        // has it, through a raw place (no reference to the whole struct);
        // calling it follows the same contract as `send`.
        let level = unsafe {
            if ((*t).struct_size as usize) < WSHD_HOST_API_SIZE_1_1 {
                return None;
            }
            let f = std::ptr::addr_of!((*t).log_level).read();
            f((*t).host_ctx)
        };
        Some(abi_level(level))
    }

    /// Whether the host has the ABI 1.2 functions (topics, timers).
    fn has_1_2(self) -> bool {
        let t = self.t();
        // SAFETY: struct_size is an ABI 1.0 field.
        (unsafe { (*t).struct_size } as usize) >= WSHD_HOST_API_SIZE_1_2
    }

    /// `subscribe`, `unsubscribe` or `is_subscribed` (ABI 1.2), chosen by
    /// `pick`; `WSHD_ERR_UNSUPPORTED` from an older host.
    pub(crate) fn topic_call(
        self,
        pick: fn(&wshd_host_api) -> crate::abi::wshd_subscribe_fn,
        conn: wshd_conn_id,
        topic: &str,
    ) -> i32 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED;
        }
        let t = self.t();
        // SAFETY: the table has every ABI 1.2 field (checked above), and
        // `pick` only reads one function pointer out of it; the topic is
        // borrowed for the call (ownership rule 2).
        unsafe { pick(&*t)((*t).host_ctx, conn, wshd_str::from_str(topic)) }
    }

    /// `publish` (ABI 1.2): recipients, or a negative status.
    pub(crate) fn publish(self, topic: &str, kind: u32, data: &[u8], exclude: wshd_conn_id) -> i64 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED.into();
        }
        let t = self.t();
        // SAFETY: as in `topic_call`; the payload is borrowed for the call.
        unsafe {
            ((*t).publish)(
                (*t).host_ctx,
                wshd_str::from_str(topic),
                kind,
                data.as_ptr(),
                data.len(),
                exclude,
            )
        }
    }

    /// `subscribers` (ABI 1.2).
    pub(crate) fn subscribers(self, topic: &str) -> i64 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED.into();
        }
        let t = self.t();
        // SAFETY: as in `topic_call`.
        unsafe { ((*t).subscribers)((*t).host_ctx, wshd_str::from_str(topic)) }
    }

    /// `subscribers_cluster` (ABI 1.2).
    pub(crate) fn subscribers_cluster(self, topic: &str) -> i64 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED.into();
        }
        let t = self.t();
        // SAFETY: as in `topic_call`.
        unsafe { ((*t).subscribers_cluster)((*t).host_ctx, wshd_str::from_str(topic)) }
    }

    /// `set_timer` (ABI 1.2): the timer id, or a negative status.
    pub(crate) fn set_timer(self, conn: wshd_conn_id, delay_ms: u64) -> i64 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED.into();
        }
        let t = self.t();
        // SAFETY: as in `topic_call`.
        unsafe { ((*t).set_timer)((*t).host_ctx, conn, delay_ms) }
    }

    /// `cancel_timer` (ABI 1.2).
    pub(crate) fn cancel_timer(self, timer: u64) -> i32 {
        if !self.has_1_2() {
            return WSHD_ERR_UNSUPPORTED;
        }
        let t = self.t();
        // SAFETY: as in `topic_call`.
        unsafe { ((*t).cancel_timer)((*t).host_ctx, timer) }
    }

    /// Queues one message to every connection in `conns` with one shared
    /// copy of the payload: `Ok(delivered)`, or `Err(status)` when the host
    /// refused the whole call. A host of ABI 1.0 or 1.1 has no `broadcast`:
    /// then the message goes out with one `send` per connection (one copy
    /// each), with the same result.
    pub(crate) fn broadcast(
        self,
        conns: &[wshd_conn_id],
        kind: u32,
        data: &[u8],
    ) -> Result<usize, i32> {
        let t = self.t();
        // SAFETY: `broadcast` is read only when `struct_size` shows the table
        // has it, through a raw place; the id list and the payload are
        // borrowed for the call (ownership rule 2) and `delivered` is a
        // live local.
        unsafe {
            if ((*t).struct_size as usize) >= WSHD_HOST_API_SIZE_1_2 {
                let f = std::ptr::addr_of!((*t).broadcast).read();
                let mut delivered = 0usize;
                let status = f(
                    (*t).host_ctx,
                    conns.as_ptr(),
                    conns.len(),
                    kind,
                    data.as_ptr(),
                    data.len(),
                    &mut delivered,
                );
                return if status == WSHD_OK {
                    Ok(delivered)
                } else {
                    Err(status)
                };
            }
        }
        let mut delivered = 0;
        for &conn in conns {
            match self.send(conn, kind, data) {
                WSHD_OK => delivered += 1,
                // The whole call is refused, as the host's broadcast would.
                status @ (WSHD_ERR_INVALID | WSHD_ERR_REVOKED) => return Err(status),
                // Closed, full queue: that recipient is skipped.
                _ => {}
            }
        }
        Ok(delivered)
    }
}

/// A `WSHD_LOG_*` number as a `log` filter: 0 is off, anything above
/// `WSHD_LOG_TRACE` is trace.
pub(crate) fn abi_level(level: u32) -> log::LevelFilter {
    match level {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// The host's handshake builder, valid only during one `on_handshake` call,
/// which the lifetime `'a` stands for.
pub(crate) struct RawHandshake<'a> {
    hs: NonNull<wshd_handshake>,
    api: HostApi,
    _call: PhantomData<&'a mut wshd_handshake>,
}

impl RawHandshake<'_> {
    /// # Safety
    /// `hs` must be the handle the host passed to the current `on_handshake`
    /// call, and the value must not outlive that call (ownership rule 5).
    pub(crate) unsafe fn new<'a>(
        hs: *mut wshd_handshake,
        api: HostApi,
    ) -> Option<RawHandshake<'a>> {
        Some(RawHandshake {
            hs: NonNull::new(hs)?,
            api,
            _call: PhantomData,
        })
    }

    pub(crate) fn select_subprotocol(&mut self, index: usize) -> i32 {
        // SAFETY: `new`'s contract: the handle is live for this call.
        unsafe { ((*self.api.t()).hs_select_subprotocol)(self.hs.as_ptr(), index) }
    }

    pub(crate) fn add_header(&mut self, name: &str, value: &str) -> i32 {
        let (name, value) = (wshd_str::from_str(name), wshd_str::from_str(value));
        // SAFETY: as in `select_subprotocol`; the strings are borrowed.
        unsafe { ((*self.api.t()).hs_add_header)(self.hs.as_ptr(), name, value) }
    }

    pub(crate) fn reject(&mut self, status: u16, body: &str) -> i32 {
        // SAFETY: as in `select_subprotocol`; the body is borrowed.
        unsafe { ((*self.api.t()).hs_reject)(self.hs.as_ptr(), status, wshd_str::from_str(body)) }
    }
}
