//! The mailbox of every open connection and the map that finds it.
//!
//! Session, host API, registry, topics and shutdown all reach a connection
//! through its [`ConnShared`]: the bounded queue of messages sent to it from
//! outside its own callbacks, out-of-band close requests, server events
//! (shutdown, drain) and fired timers, all behind one [`Wakeup`].
//!
//! [`Connections`] maps ids to mailboxes and owns the one rule for
//! server-wide events: **cancel the token first, then walk the map**
//! ([`Connections::cancel_and_signal`]), while a connection that registers
//! checks the tokens after it is in the map ([`Connections::register`]). A
//! session registering during the walk is then either found by the walk
//! or sees the cancelled token itself; no event is lost. The host API's C
//! glue lives in [`crate::host_api`]; topic membership in [`crate::topics`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use wshd_handler_api::abi::*;

use crate::config::SlowConsumer;

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
    /// The instance that owns the connection; changes when a handover moves
    /// the connection to another version (session.rs).
    owner: AtomicU64,
    pub slow_consumer: SlowConsumer,
    /// Queue capacity in messages.
    limit: usize,
    /// Queue capacity in payload bytes (an empty queue takes any message).
    limit_bytes: usize,
    queue: std::sync::Mutex<Queue>,
    /// Wakes the session when the queue or the close request changes.
    pub wakeup: Wakeup,
    /// A close the session should perform after draining the queue.
    /// Boxed: rare, and this struct is part of every connection.
    close_request: std::sync::Mutex<Option<Box<CloseFrame>>>,
    /// [`ConnShared::SHUTDOWN`] and [`ConnShared::RETIRED`] bits not yet seen
    /// by the session.
    events: AtomicU8,
    /// The topics this connection is subscribed to (ABI 1.2).
    pub(crate) topics: std::sync::Mutex<crate::topics::ConnTopics>,
    /// This connection's pending and fired timers (ABI 1.2).
    pub(crate) timers: std::sync::Mutex<crate::timers::ConnTimers>,
    /// A timer fired and waits for the session: checked on every wake-up
    /// without taking the `timers` lock.
    pub(crate) timer_fired: AtomicBool,
    /// Topic messages written straight to the socket while the session is
    /// idle (direct.rs). Allocated when the connection first subscribes to
    /// a topic; other connections keep only this empty cell.
    door: std::sync::OnceLock<Box<crate::direct::Door>>,
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
    /// Past the message or byte bound.
    Full,
    /// The slow-consumer policy closed the connection; nothing more is taken.
    Shed,
}

/// One connection's outgoing messages.
#[derive(Debug, Default)]
struct Queue {
    msgs: std::collections::VecDeque<Message>,
    /// Payload bytes in `msgs`.
    bytes: usize,
    /// Set by [`ConnShared::shed`]: the queue was dropped for good.
    shed: bool,
}

/// Whether one more message of `len` bytes fits beside `count` messages of
/// `bytes` bytes. An empty queue takes any message, so a message larger than
/// the byte bound is not refused for its size alone (it still needs a
/// reader that keeps up).
pub(crate) fn fits(
    count: usize,
    bytes: usize,
    limit: usize,
    limit_bytes: usize,
    len: usize,
) -> bool {
    count == 0 || (count < limit && bytes.saturating_add(len) <= limit_bytes)
}

impl ConnShared {
    /// The id of the instance that owns the connection now.
    pub fn owner(&self) -> u64 {
        self.owner.load(Ordering::SeqCst)
    }

    /// Hands the connection to instance `owner` (a handover): from now on
    /// the previous owner's calls for it get `WSHD_ERR_CLOSED`.
    pub fn set_owner(&self, owner: u64) {
        self.owner.store(owner, Ordering::SeqCst);
    }

    pub fn new(
        owner: u64,
        limit: usize,
        limit_bytes: usize,
        slow_consumer: SlowConsumer,
    ) -> ConnShared {
        ConnShared {
            owner: AtomicU64::new(owner),
            slow_consumer,
            limit,
            limit_bytes,
            queue: Default::default(),
            wakeup: Default::default(),
            close_request: Default::default(),
            events: AtomicU8::new(0),
            topics: Default::default(),
            timers: Default::default(),
            timer_fired: AtomicBool::new(false),
            door: Default::default(),
        }
    }

    /// Event: the server is shutting down; close with 1001.
    pub const SHUTDOWN: u8 = 1;
    /// Event: the connection's handler version was retired and its drain
    /// timeout passed; close with 1012.
    pub const RETIRED: u8 = 2;
    /// Event: the connection's handler version was replaced by one it can
    /// hand the connection over to (`Instance::handover_to`); move at the
    /// next message boundary.
    pub const HANDOVER: u8 = 4;

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

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message for the session to write, within the bounds; no
    /// policy (see [`ConnShared::offer`]).
    pub fn push(&self, msg: Message) -> Result<(), QueueError> {
        {
            let mut q = self.lock();
            if q.shed {
                return Err(QueueError::Shed);
            }
            let len = msg.len();
            if !fits(q.msgs.len(), q.bytes, self.limit, self.limit_bytes, len) {
                return Err(QueueError::Full);
            }
            q.bytes += len;
            q.msgs.push_back(msg);
        }
        self.wakeup.wake();
        Ok(())
    }

    /// Queues one message for connection `conn` and applies the
    /// slow-consumer policy if it does not fit: the delivery step shared by
    /// `send`, `broadcast` and anything else that fans a message out (a
    /// message's payload is a shared `Bytes`, so each recipient gets a cheap
    /// clone). Returns the ABI status for that one delivery; it never blocks.
    /// `route` is for the log line.
    pub fn offer(&self, conn: wshd_conn_id, route: &str, msg: Message) -> i32 {
        match self.push(msg) {
            Ok(()) => WSHD_OK,
            Err(QueueError::Shed) => WSHD_ERR_CLOSED,
            Err(QueueError::Full) => {
                if self.slow_consumer == SlowConsumer::Close
                    && let Some((msgs, bytes)) = self.shed()
                {
                    tracing::info!(
                        conn,
                        route,
                        dropped_msgs = msgs,
                        dropped_bytes = bytes,
                        "send queue full: closing slow consumer with 1008"
                    );
                }
                WSHD_ERR_BACKPRESSURE
            }
        }
    }

    /// The connection's door, once it has subscribed to a topic.
    pub fn door(&self) -> Option<&crate::direct::Door> {
        self.door.get().map(|d| &**d)
    }

    /// The connection subscribed to a topic: its session opens its door
    /// from its next wait on (direct.rs).
    pub fn want_door(&self) {
        self.door.get_or_init(Default::default);
    }

    /// Delivers a topic message: straight to the socket through the
    /// connection's door when its session is idle and nothing is queued
    /// (direct.rs), else as [`ConnShared::offer`]. `frame` is the message
    /// as one whole frame, built once per publish; `None` when it cannot be
    /// written directly.
    pub fn deliver(
        &self,
        conn: wshd_conn_id,
        route: &str,
        msg: Message,
        frame: Option<&bytes::Bytes>,
    ) -> i32 {
        use crate::direct::Outcome;
        if let Some(frame) = frame
            && let Some(door) = self.door()
        {
            let empty = || {
                let q = self.lock();
                q.msgs.is_empty() && !q.shed
            };
            match door.write(frame, msg.len(), empty) {
                Outcome::Written => return WSHD_OK,
                Outcome::Spilled => {
                    self.wakeup.wake();
                    return WSHD_OK;
                }
                Outcome::Refused => {}
            }
        }
        self.offer(conn, route, msg)
    }

    /// The slow-consumer close: drops (frees) everything queued right away,
    /// refuses every later message and asks the session to close with 1008;
    /// only the close frame is left to send. `Some((messages, bytes))`
    /// dropped, or `None` if the queue was already shed.
    pub fn shed(&self) -> Option<(usize, usize)> {
        let dropped = {
            let mut q = self.lock();
            if q.shed {
                return None;
            }
            q.shed = true;
            q.bytes = 0;
            std::mem::take(&mut q.msgs)
        };
        let counts = (dropped.len(), dropped.iter().map(Message::len).sum());
        // Freed here, outside the lock (a payload shared with other queues
        // just loses a reference).
        drop(dropped);
        self.request_close(1008, "slow consumer");
        Some(counts)
    }

    /// Moves up to `max` queued messages into `out`.
    pub fn take(&self, out: &mut std::collections::VecDeque<Message>, max: usize) {
        let mut q = self.lock();
        let n = q.msgs.len().min(max);
        let start = out.len();
        out.extend(q.msgs.drain(..n));
        let taken: usize = out.range(start..).map(Message::len).sum();
        q.bytes -= taken;
        if q.msgs.is_empty() && q.msgs.capacity() > 64 {
            // Give back the memory a burst needed.
            q.msgs = Default::default();
        }
    }

    /// Whether messages are waiting.
    pub fn has_queued(&self) -> bool {
        !self.lock().msgs.is_empty()
    }

    /// Messages and payload bytes waiting now.
    pub fn queued(&self) -> (usize, usize) {
        let q = self.lock();
        (q.msgs.len(), q.bytes)
    }

    /// Asks the session to drain its queue and close with `code`. The first
    /// request wins.
    pub fn request_close(&self, code: u16, reason: &str) {
        let mut slot = self.close_request.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Box::new(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            }));
        }
        drop(slot);
        self.wakeup.wake();
    }

    /// The pending close request, if any (boxed as it was stored: the
    /// session keeps it in its task across writes).
    pub fn take_close_request(&self) -> Option<Box<CloseFrame>> {
        self.close_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Every open connection by id. Sharded, so sends from many threads rarely
/// contend.
#[derive(Debug, Default)]
pub struct Connections {
    map: DashMap<wshd_conn_id, Arc<ConnShared>>,
}

impl Connections {
    /// Adds a connection, then applies every event whose token is already
    /// cancelled: the registering half of the cancel-then-walk rule (see the
    /// module docs). `events` pairs each token with the event bit it means.
    pub fn register(
        &self,
        id: wshd_conn_id,
        shared: Arc<ConnShared>,
        events: &[(&CancellationToken, u8)],
    ) {
        self.map.insert(id, shared.clone());
        for (token, event) in events {
            if token.is_cancelled() {
                shared.signal(*event);
            }
        }
    }

    /// Removes a connection: later sends to its id get `WSHD_ERR_CLOSED`.
    pub fn unregister(&self, id: wshd_conn_id) {
        self.map.remove(&id);
    }

    /// The mailbox of connection `id`, if it is open.
    pub fn get(&self, id: wshd_conn_id) -> Option<Arc<ConnShared>> {
        self.map.get(&id).map(|e| e.value().clone())
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Calls `f` for every open connection that `filter` accepts: the one
    /// way to reach many connections at once. Holds one shard's read lock at
    /// a time, so `f` must not register or unregister connections.
    pub fn for_each(
        &self,
        filter: impl Fn(&ConnShared) -> bool,
        mut f: impl FnMut(&Arc<ConnShared>),
    ) {
        for e in self.map.iter() {
            if filter(e.value()) {
                f(e.value());
            }
        }
    }

    /// A server-wide event: cancels `token`, then signals `event` to every
    /// connection `filter` accepts. The order matters (module docs): a
    /// connection registering concurrently that this walk misses sees the
    /// cancelled token in [`Connections::register`].
    pub fn cancel_and_signal(
        &self,
        token: &CancellationToken,
        event: u8,
        filter: impl Fn(&ConnShared) -> bool,
    ) {
        token.cancel();
        self.for_each(filter, |c| c.signal(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn mailbox(owner: u64) -> Arc<ConnShared> {
        Arc::new(ConnShared::new(owner, 8, 1 << 20, SlowConsumer::Close))
    }

    #[test]
    fn a_walk_reaches_exactly_the_matching_connections() {
        let conns = Connections::default();
        let (a, b, c) = (mailbox(1), mailbox(2), mailbox(1));
        conns.register(10, a.clone(), &[]);
        conns.register(11, b.clone(), &[]);
        conns.register(12, c.clone(), &[]);
        let drain = CancellationToken::new();
        conns.cancel_and_signal(&drain, ConnShared::RETIRED, |s| s.owner() == 1);
        assert!(drain.is_cancelled());
        assert_eq!(a.take_events(), ConnShared::RETIRED);
        assert_eq!(b.take_events(), 0);
        assert_eq!(c.take_events(), ConnShared::RETIRED);
        conns.unregister(11);
        assert!(conns.get(11).is_none());
        assert_eq!(conns.len(), 2);
    }

    #[test]
    fn a_connection_registering_after_the_cancel_still_gets_the_event() {
        // The other half of the rule: the walk has already passed (or is
        // past this shard) when the connection registers.
        let conns = Connections::default();
        let shutdown = CancellationToken::new();
        let drain = CancellationToken::new();
        conns.cancel_and_signal(&shutdown, ConnShared::SHUTDOWN, |_| true);
        let late = mailbox(7);
        conns.register(
            1,
            late.clone(),
            &[
                (&shutdown, ConnShared::SHUTDOWN),
                (&drain, ConnShared::RETIRED),
            ],
        );
        assert_eq!(late.take_events(), ConnShared::SHUTDOWN);
    }
}
