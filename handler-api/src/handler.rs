//! The safe side of the ABI: the [`Handler`] trait a handler author
//! implements, and the borrowed values its methods receive.

use std::fmt;

use crate::host::{Conn, Host, SendError};
pub use crate::message::Message;
use crate::raw::{RawHandshake, RawHeaders, RawStrs};

/// A WebSocket handler. Implement it, then export the type with
/// [`export_handler!`](crate::export_handler).
///
/// # Lifecycle
///
/// One value of `Self` is one *handler instance*: the server creates one per
/// route (and a new one for every reload of the library) with [`init`], and
/// destroys it by dropping it, after the last connection's [`close`]
/// returned. `Drop` for `Self` is the ABI's `destroy`: stop and join every
/// thread you started there.
///
/// Each connection goes through [`handshake`] → [`open`] →
/// [`message`]* → [`close`]. [`close`] runs exactly once for every [`open`]
/// that returned `Ok`, whatever ended the connection.
///
/// # Threads
///
/// Calls for *one* connection never overlap and arrive in that order, so
/// [`message`] gets the connection's state as `&mut`. Calls for *different*
/// connections may run at the same time on different threads, so `Self`
/// must be `Sync` and shared state needs a lock or atomics. The methods run
/// on the server's async workers and must not block (sleep, blocking I/O,
/// long locks) unless the handler is exported with `flags = MAY_BLOCK`.
///
/// # Errors and panics
///
/// An `Err` from [`init`] discards the instance (a reload keeps the previous
/// version serving); from [`handshake`] it refuses the upgrade; from
/// [`open`] or [`message`] it closes the connection with 1011. The error
/// text goes to the server's log. A panic is caught by the SDK, logged with
/// its message and location, and treated like an `Err`.
///
/// [`init`]: Handler::init
/// [`handshake`]: Handler::handshake
/// [`open`]: Handler::open
/// [`message`]: Handler::message
/// [`close`]: Handler::close
pub trait Handler: Sized + Send + Sync + 'static {
    /// Per-connection state, created by [`open`](Handler::open) and handed
    /// back by value to [`close`](Handler::close). Use `()` if you need none
    /// (a zero-sized state costs no allocation).
    type ConnState: Send + 'static;

    /// Creates the instance. `config` is the route's `[route.config]` table
    /// rendered as TOML text (`""` if there is none). Keep `host` if you need
    /// to address connections by id later.
    fn init(host: Host, config: &str) -> Result<Self, String>;

    /// Inspects the opening handshake and shapes the response: choose a
    /// subprotocol, add headers, or reject. The default accepts every
    /// request without a subprotocol.
    fn handshake(
        &self,
        req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        let _ = (req, resp);
        Ok(())
    }

    /// The connection is open; returns its state.
    fn open(&self, conn: Conn) -> Result<Self::ConnState, String>;

    /// One complete message. It is borrowed for this call: copy what you keep.
    fn message(
        &self,
        state: &mut Self::ConnState,
        conn: Conn,
        msg: Message<'_>,
    ) -> Result<(), String>;

    /// The connection is gone (`conn` only accepts calls that then fail with
    /// [`SendError::Closed`]). `code` is 1005 if the peer sent no code and
    /// 1006 if the connection dropped without a close frame. The state is
    /// dropped after this returns. The default does nothing.
    fn close(&self, state: Self::ConnState, conn: Conn, code: u16, reason: &str) {
        let _ = (state, conn, code, reason);
    }

    /// A timer fired (ABI 1.2): one set with [`Conn::set_timer`] (then
    /// `state` and `conn` are that connection's, and the call is ordered
    /// with its messages exactly like [`message`](Handler::message); an
    /// `Err` closes it with 1011), or with [`Host::set_timer`] (both
    /// `None`). `timer` is the id `set_timer` returned. The default does
    /// nothing.
    fn timer(
        &self,
        state: Option<&mut Self::ConnState>,
        conn: Option<Conn>,
        timer: u64,
    ) -> Result<(), String> {
        let _ = (state, conn, timer);
        Ok(())
    }
}

/// A client's opening handshake, borrowed for the duration of
/// [`Handler::handshake`].
pub struct HandshakeRequest<'a> {
    pub(crate) conn_id: u64,
    pub(crate) path: &'a str,
    pub(crate) query: &'a str,
    pub(crate) origin: Option<&'a str>,
    pub(crate) remote_addr: &'a str,
    pub(crate) headers: RawHeaders<'a>,
    pub(crate) subprotocols: RawStrs<'a>,
}

impl<'a> HandshakeRequest<'a> {
    /// The id the connection will have if it is accepted.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The request path, without the query.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The query string without the `?` (`""` if none).
    pub fn query(&self) -> &'a str {
        self.query
    }

    /// The `Origin` header, `None` if the client sent none (non-browser
    /// clients usually do not).
    pub fn origin(&self) -> Option<&'a str> {
        self.origin
    }

    /// The peer's address as `ip:port`.
    pub fn remote_addr(&self) -> &'a str {
        self.remote_addr
    }

    /// Every request header, in arrival order.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            raw: self.headers,
            next: 0,
        }
    }

    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The subprotocols the client offered in `Sec-WebSocket-Protocol`, in
    /// its order. Indexes here are what
    /// [`HandshakeResponse::select_subprotocol`] takes.
    pub fn subprotocols(&self) -> Subprotocols<'a> {
        Subprotocols {
            raw: self.subprotocols,
            next: 0,
        }
    }

    /// The index of the offered subprotocol equal to `name`, if offered.
    pub fn subprotocol_index(&self, name: &str) -> Option<usize> {
        self.subprotocols().position(|p| p == name)
    }
}

impl fmt::Debug for HandshakeRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeRequest")
            .field("conn_id", &self.conn_id)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("origin", &self.origin)
            .field("remote_addr", &self.remote_addr)
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("subprotocols", &self.subprotocols().collect::<Vec<_>>())
            .finish()
    }
}

/// One request header. Names are ASCII; values are bytes, usually ASCII.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The name as received (HTTP names are case-insensitive).
    pub name: &'a str,
    /// The raw value.
    pub value: &'a [u8],
}

impl<'a> Header<'a> {
    /// The value as text, if it is valid UTF-8.
    pub fn value_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.value).ok()
    }
}

impl fmt::Debug for Header<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, String::from_utf8_lossy(self.value))
    }
}

/// Iterator over the request headers; see [`HandshakeRequest::headers`].
/// A header whose name is not UTF-8 (never the case for valid HTTP) is
/// skipped.
#[derive(Clone)]
pub struct Headers<'a> {
    raw: RawHeaders<'a>,
    next: usize,
}

impl<'a> Iterator for Headers<'a> {
    type Item = Header<'a>;

    fn next(&mut self) -> Option<Header<'a>> {
        loop {
            let (name, value) = self.raw.get(self.next)?;
            self.next += 1;
            if let Ok(name) = std::str::from_utf8(name) {
                return Some(Header { name, value });
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.raw.len() - self.next))
    }
}

/// Iterator over the offered subprotocols; see
/// [`HandshakeRequest::subprotocols`]. An entry that is not UTF-8 (never the
/// case for a valid token) reads as `""`, so indexes stay right.
#[derive(Clone)]
pub struct Subprotocols<'a> {
    raw: RawStrs<'a>,
    next: usize,
}

impl<'a> Iterator for Subprotocols<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.raw.get(self.next)?;
        self.next += 1;
        Some(std::str::from_utf8(bytes).unwrap_or(""))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.raw.len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Subprotocols<'_> {}

/// The response to an opening handshake, built during
/// [`Handler::handshake`]. The host checks each call and copies what it
/// keeps.
pub struct HandshakeResponse<'a> {
    pub(crate) raw: RawHandshake<'a>,
}

impl HandshakeResponse<'_> {
    /// Accepts the offered subprotocol at `index` of
    /// [`HandshakeRequest::subprotocols`]. At most once:
    /// a second choice is [`SendError::State`], a bad index
    /// [`SendError::Invalid`].
    pub fn select_subprotocol(&mut self, index: usize) -> Result<(), SendError> {
        SendError::check(self.raw.select_subprotocol(index))
    }

    /// Adds a response header. Hop-by-hop and `Sec-WebSocket-*` names are
    /// refused with [`SendError::Invalid`].
    pub fn add_header(&mut self, name: &str, value: &str) -> Result<(), SendError> {
        SendError::check(self.raw.add_header(name, value))
    }

    /// Refuses the upgrade with an HTTP status in 400..=599 and a text body.
    /// Return `Ok(())` from `handshake` afterwards: the rejection is the
    /// answer, not an error.
    pub fn reject(&mut self, status: u16, body: &str) -> Result<(), SendError> {
        SendError::check(self.raw.reject(status, body))
    }
}

impl fmt::Debug for HandshakeResponse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandshakeResponse")
    }
}
