//! Handles to the host: [`Host`] for a handler instance, [`Conn`] for one of
//! its connections, and [`SendError`] for a host call that did not happen.

use std::fmt;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::abi::{
    WSHD_ERR_BACKPRESSURE, WSHD_ERR_CLOSED, WSHD_ERR_INVALID, WSHD_ERR_LIMIT, WSHD_ERR_REVOKED,
    WSHD_ERR_STATE, WSHD_ERR_UNSUPPORTED, WSHD_MSG_BINARY, WSHD_MSG_TEXT, WSHD_OK, wshd_conn_id,
};
use crate::logging;
use crate::message::Message;
use crate::raw::HostApi;

/// The server, as seen by one handler instance.
///
/// `Host` is `Copy + Send + Sync` and stays usable for the life of the
/// process: after the instance is destroyed its calls fail with
/// [`SendError::Revoked`] instead of misbehaving. Keep it in your handler if
/// you need to address connections by id (see [`Host::conn`]).
#[derive(Clone, Copy)]
pub struct Host {
    pub(crate) api: HostApi,
}

impl Host {
    pub(crate) fn new(api: HostApi) -> Host {
        Host { api }
    }

    /// A handle to connection `id` of this instance. Any id can be named;
    /// sending to one that is closed or not yours fails with
    /// [`SendError::Closed`].
    pub fn conn(&self, id: u64) -> Conn {
        Conn { id, api: self.api }
    }

    /// Queues `msg` to each of `conns` and returns how many it was queued
    /// to. The payload is stored once and shared by every recipient's queue
    /// (ABI 1.2; an older host gets one send per connection instead).
    ///
    /// Each recipient is treated as [`Conn::send`] would treat it: closed or
    /// foreign connections are skipped, and each delivery obeys that
    /// connection's own queue bounds and slow-consumer policy, so one slow
    /// recipient never holds up the others. Inside a callback, the
    /// connection the callback is for gets the message in order with the
    /// callback's other sends to it. `Err` means nothing was sent:
    /// [`SendError::Revoked`], or [`SendError::Invalid`].
    pub fn broadcast(&self, conns: &[Conn], msg: Message<'_>) -> Result<usize, SendError> {
        let ids: Vec<u64> = conns.iter().map(Conn::id).collect();
        self.broadcast_ids(&ids, msg)
    }

    /// [`Host::broadcast`] to connections named by id, e.g. a room's member
    /// list, without building [`Conn`]s.
    pub fn broadcast_ids(&self, ids: &[u64], msg: Message<'_>) -> Result<usize, SendError> {
        let (kind, data) = match msg {
            Message::Text(text) => (WSHD_MSG_TEXT, text.as_bytes()),
            Message::Binary(data) => (WSHD_MSG_BINARY, data),
        };
        self.api.broadcast(ids, kind, data).map_err(|status| {
            SendError::check(status)
                .err()
                .unwrap_or(SendError::Other(status))
        })
    }

    /// Publishes `msg` to every subscriber of `topic` (ABI 1.2) and returns
    /// how many it was queued to on this server.
    ///
    /// Subscriptions belong to the server, not to this handler instance:
    /// the message reaches subscribers on every route and every loaded
    /// version of every handler, so a reload never splits a room. The
    /// payload is stored once and shared; each delivery obeys that
    /// subscriber's queue bounds and slow-consumer policy, so a slow one
    /// never delays the others or the caller. All subscribers of a topic
    /// see its publishes in the same order. Inside a callback, the
    /// callback's own connection (if subscribed) gets it in order with its
    /// other sends instead (when the callback returns, possibly ahead of a
    /// publish another thread made just before).
    ///
    /// `Err`: [`SendError::Invalid`] (topic not 1..=256 bytes of UTF-8),
    /// [`SendError::Revoked`], [`SendError::Unsupported`] (a host older than
    /// ABI 1.2).
    pub fn publish(&self, topic: &str, msg: Message<'_>) -> Result<usize, SendError> {
        self.publish_raw(topic, msg, 0)
    }

    /// [`Host::publish`] to every subscriber but `except`, e.g. the sender.
    pub fn publish_except(
        &self,
        topic: &str,
        msg: Message<'_>,
        except: Conn,
    ) -> Result<usize, SendError> {
        self.publish_raw(topic, msg, except.id)
    }

    fn publish_raw(&self, topic: &str, msg: Message<'_>, exclude: u64) -> Result<usize, SendError> {
        let (kind, data) = match msg {
            Message::Text(text) => (WSHD_MSG_TEXT, text.as_bytes()),
            Message::Binary(data) => (WSHD_MSG_BINARY, data),
        };
        count(self.api.publish(topic, kind, data, exclude))
    }

    /// The number of subscribers of `topic` on this server (ABI 1.2).
    pub fn subscribers(&self, topic: &str) -> Result<usize, SendError> {
        count(self.api.subscribers(topic))
    }

    /// The number of subscribers of `topic` across every node of a cluster
    /// (ABI 1.2): this server's exact count plus the other nodes' counts as
    /// last exchanged through Redis, so approximate (a few seconds old, and
    /// the other nodes are counted only for topics with a subscriber here).
    /// Without `[cluster]`, the same as [`Host::subscribers`]. Never waits
    /// on the network.
    pub fn subscribers_cluster(&self, topic: &str) -> Result<usize, SendError> {
        count(self.api.subscribers_cluster(topic))
    }

    /// Calls [`Handler::timer`](crate::Handler::timer) once, after `delay`,
    /// with no connection (ABI 1.2). The timer is dropped when this
    /// instance is destroyed; it never fires into another version. Returns
    /// its id for [`Host::cancel_timer`]. `Err`: [`SendError::Limit`] (too
    /// many pending), [`SendError::Invalid`] (a delay over a year),
    /// [`SendError::Unsupported`].
    pub fn set_timer(&self, delay: Duration) -> Result<u64, SendError> {
        timer_id(self.api.set_timer(0, millis(delay)))
    }

    /// Cancels a pending timer of this instance: after `Ok`, its
    /// `timer` call never comes. [`SendError::State`] if it is not pending
    /// (already delivered, cancelled, or not this instance's).
    pub fn cancel_timer(&self, timer: u64) -> Result<(), SendError> {
        SendError::check(self.api.cancel_timer(timer))
    }

    /// Writes a line to the server's log. Usually you would rather use the
    /// `log` or `tracing` macros, which end up here.
    pub fn log(&self, level: log::Level, target: &str, message: &str) {
        self.api.log(level, target, message);
    }

    /// The ABI version of the running host, `(major, minor)`.
    pub fn abi_version(&self) -> (u16, u16) {
        self.api.version()
    }

    /// Starts a named thread whose `log`/`tracing` records and panics go to
    /// this host's log.
    ///
    /// The contract requires `destroy` to stop and join every thread the
    /// handler started: keep the [`JoinHandle`] and join it in your handler's
    /// `Drop`.
    pub fn spawn<F, T>(&self, name: impl Into<String>, f: F) -> std::io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let api = self.api;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _scope = logging::enter_thread(api);
                f()
            })
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.abi_version();
        write!(f, "Host(abi {major}.{minor})")
    }
}

/// One connection of a handler instance: an id plus the host's function
/// table.
///
/// `Conn` is `Copy + Send + Sync`; every method may be called from any
/// thread, at any time, also after the connection closed (then it returns
/// [`SendError::Closed`]). The host copies what you pass before returning and
/// never blocks: a full send queue is [`SendError::Backpressure`].
#[derive(Clone, Copy)]
pub struct Conn {
    id: wshd_conn_id,
    api: HostApi,
}

impl Conn {
    /// The connection id, unique for the life of the server process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The host this connection belongs to.
    pub fn host(&self) -> Host {
        Host::new(self.api)
    }

    /// Queues a text or binary message, e.g. to echo one back.
    pub fn send(&self, msg: Message<'_>) -> Result<(), SendError> {
        match msg {
            Message::Text(text) => self.send_text(text),
            Message::Binary(data) => self.send_binary(data),
        }
    }

    /// Queues a text message.
    pub fn send_text(&self, text: &str) -> Result<(), SendError> {
        SendError::check(self.api.send(self.id, WSHD_MSG_TEXT, text.as_bytes()))
    }

    /// Queues a binary message.
    pub fn send_binary(&self, data: &[u8]) -> Result<(), SendError> {
        SendError::check(self.api.send(self.id, WSHD_MSG_BINARY, data))
    }

    /// Queues a text or binary message that is never compressed, even when
    /// the connection negotiated permessage-deflate: for data that is
    /// already compressed, or secrets that must not share a compressed
    /// message with text an attacker chose. On a host that predates the
    /// flag it fails with `SendError::Invalid`-like status; send plainly then.
    pub fn send_uncompressed(&self, msg: Message<'_>) -> Result<(), SendError> {
        let (kind, data) = match msg {
            Message::Text(text) => (WSHD_MSG_TEXT, text.as_bytes()),
            Message::Binary(data) => (WSHD_MSG_BINARY, data),
        };
        SendError::check(
            self.api
                .send(self.id, kind | crate::abi::WSHD_SEND_NO_COMPRESS, data),
        )
    }

    /// Queues a ping with at most 125 bytes of payload.
    pub fn ping(&self, payload: &[u8]) -> Result<(), SendError> {
        SendError::check(self.api.ping(self.id, payload))
    }

    /// Subscribes this connection to `topic` (ABI 1.2): from now on it gets
    /// every [`Host::publish`] to it, from any handler version or route,
    /// until it unsubscribes or closes. Subscribing twice is once.
    /// `Err`: [`SendError::Limit`] (the connection's or the server's topic
    /// cap), [`SendError::Invalid`] (topic not 1..=256 bytes),
    /// [`SendError::Closed`], [`SendError::Unsupported`].
    pub fn subscribe(&self, topic: &str) -> Result<(), SendError> {
        SendError::check(self.api.topic_call(|t| t.subscribe, self.id, topic))
    }

    /// Ends this connection's subscription to `topic` (`Ok` also if it had
    /// none). Closing the connection ends all of them.
    pub fn unsubscribe(&self, topic: &str) -> Result<(), SendError> {
        SendError::check(self.api.topic_call(|t| t.unsubscribe, self.id, topic))
    }

    /// Whether this connection is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: &str) -> Result<bool, SendError> {
        match self.api.topic_call(|t| t.is_subscribed, self.id, topic) {
            1 => Ok(true),
            0 => Ok(false),
            status => Err(SendError::check(status)
                .err()
                .unwrap_or(SendError::Other(status))),
        }
    }

    /// Calls [`Handler::timer`](crate::Handler::timer) for this connection
    /// once, after `delay`, in order with its messages (ABI 1.2). Dropped if
    /// the connection closes first. Returns the id for
    /// [`Host::cancel_timer`].
    pub fn set_timer(&self, delay: Duration) -> Result<u64, SendError> {
        timer_id(self.api.set_timer(self.id, millis(delay)))
    }

    /// Starts the close handshake: `code` 1000 or 3000–4999 (or 1001–1014
    /// where RFC 6455 lets a sender use it), `reason` at most 123 bytes.
    /// The handler's `close` runs later, when the connection is gone.
    pub fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        SendError::check(self.api.close(self.id, code, reason))
    }
}

/// A delay in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A count or a negative status from an ABI 1.2 function.
fn count(status: i64) -> Result<usize, SendError> {
    usize::try_from(status).map_err(|_| status_error(status))
}

/// A timer id (> 0) or a negative status.
fn timer_id(status: i64) -> Result<u64, SendError> {
    match u64::try_from(status) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(status_error(status)),
    }
}

fn status_error(status: i64) -> SendError {
    let status = i32::try_from(status).unwrap_or(i32::MIN);
    SendError::check(status)
        .err()
        .unwrap_or(SendError::Other(status))
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conn({})", self.id)
    }
}

impl PartialEq for Conn {
    fn eq(&self, other: &Conn) -> bool {
        self.id == other.id
    }
}

impl Eq for Conn {}

/// Why a host call (send, ping, close, handshake response) did not happen.
///
/// None of them is fatal to the handler; what to do depends on the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SendError {
    /// The connection is closed (or is not one of this instance's). Usually
    /// ignore it: the handler's `close` runs, or has run, for it.
    Closed,
    /// The connection's send queue is full (in messages or in bytes): the
    /// peer reads slower than you send. Drop the message, or close the
    /// connection. Under the server's default `slow_consumer = "close"`
    /// policy the server has already dropped what was queued and is closing
    /// the connection with 1008; later sends get [`SendError::Closed`].
    Backpressure,
    /// A bad argument: close code, ping too long, a refused header name, an
    /// out-of-range subprotocol index or HTTP status.
    Invalid,
    /// Not allowed now, e.g. choosing a second subprotocol.
    State,
    /// This handler instance was destroyed; stop the thread that is calling.
    Revoked,
    /// The host is too old to provide this function.
    Unsupported,
    /// A configured cap was reached: topics per connection or on the
    /// server, pending timers (ABI 1.2). Nothing was changed.
    Limit,
    /// A status code this SDK does not know.
    Other(i32),
}

impl SendError {
    /// Maps a host status code: `WSHD_OK` is `Ok(())`.
    pub fn check(status: i32) -> Result<(), SendError> {
        Err(match status {
            WSHD_OK => return Ok(()),
            WSHD_ERR_CLOSED => SendError::Closed,
            WSHD_ERR_BACKPRESSURE => SendError::Backpressure,
            WSHD_ERR_INVALID => SendError::Invalid,
            WSHD_ERR_STATE => SendError::State,
            WSHD_ERR_REVOKED => SendError::Revoked,
            WSHD_ERR_UNSUPPORTED => SendError::Unsupported,
            WSHD_ERR_LIMIT => SendError::Limit,
            other => SendError::Other(other),
        })
    }

    /// The ABI status code (`WSHD_ERR_*`) for this error.
    pub fn status(&self) -> i32 {
        match *self {
            SendError::Closed => WSHD_ERR_CLOSED,
            SendError::Backpressure => WSHD_ERR_BACKPRESSURE,
            SendError::Invalid => WSHD_ERR_INVALID,
            SendError::State => WSHD_ERR_STATE,
            SendError::Revoked => WSHD_ERR_REVOKED,
            SendError::Unsupported => WSHD_ERR_UNSUPPORTED,
            SendError::Limit => WSHD_ERR_LIMIT,
            SendError::Other(code) => code,
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Closed => f.write_str("connection closed"),
            SendError::Backpressure => f.write_str("send queue full"),
            SendError::Invalid => f.write_str("invalid argument"),
            SendError::State => f.write_str("not allowed in this state"),
            SendError::Revoked => f.write_str("handler instance destroyed"),
            SendError::Unsupported => f.write_str("not supported by this host"),
            SendError::Limit => f.write_str("a configured limit was reached"),
            SendError::Other(code) => write!(f, "host status {code}"),
        }
    }
}

impl std::error::Error for SendError {}

#[cfg(test)]
mod tests {
    use super::{Conn, Host, SendError};

    #[test]
    fn handles_are_copy_send_sync() {
        fn copy_send_sync<T: Copy + Send + Sync + 'static>() {}
        copy_send_sync::<Host>();
        copy_send_sync::<Conn>();
        copy_send_sync::<SendError>();
    }

    #[test]
    fn status_codes_round_trip() {
        assert_eq!(SendError::check(0), Ok(()));
        for code in [-1, -2, -3, -4, -5, -6, -7, -42] {
            let err = SendError::check(code).unwrap_err();
            assert_eq!(err.status(), code);
        }
        assert_eq!(SendError::check(-1), Err(SendError::Closed));
        assert_eq!(SendError::check(-2), Err(SendError::Backpressure));
        assert_eq!(SendError::check(-42), Err(SendError::Other(-42)));
    }
}
