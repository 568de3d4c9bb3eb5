//! Topics (ABI 1.2): host-owned publish/subscribe membership.
//!
//! Membership lives here, in the host, keyed by topic name with one
//! namespace per server, so it outlives every handler version: after a
//! reload, a publish from the new version still reaches the members that
//! joined through the old one (a room is never split in two).
//!
//! Shape and locking:
//! * [`Topics::map`] is a sharded map from name to [`Topic`]; a publish takes
//!   one shard's read lock just long enough to clone the topic's `Arc`.
//! * Each [`Topic`] has one mutex over its subscriber list. A publish holds
//!   it for the fan-out, so publishes to the *same* topic are serialized and
//!   every subscriber sees them in the same order (a chat room shows one
//!   history to everyone; the one exception is the publishing connection
//!   itself, inside its callback, whose copy goes out with the callback's
//!   sends); publishes to different topics never contend. The
//!   fan-out only pushes a clone of one `Message` (a reference to one shared
//!   payload) onto each subscriber's bounded queue ([`ConnShared::offer`](crate::mailbox::ConnShared::offer)),
//!   which never blocks, so the lock is held for microseconds per hundred
//!   subscribers, and nothing is allocated per subscriber.
//! * Each connection's own list of topics sits in its [`ConnShared`](crate::mailbox::ConnShared)
//!   (`ConnTopics`): it enforces the per-connection cap, answers
//!   `is_subscribed`, and lets the session drop every subscription in one
//!   call when the connection closes ([`Topics::leave_all`]). Its `closed`
//!   flag, checked under the same lock, keeps a subscribe racing with the
//!   close from leaving a dead connection in a topic.
//!
//! Lock order: a connection's topic list, then a topic's subscribers; the
//! map's shard locks are never held while taking either (except in the
//! removal of an empty topic, which takes shard then subscribers, and
//! nothing takes them the other way round).
//!
//! A topic with no subscribers is removed, so the `max_topics` cap counts
//! live topics only.
//!
//! **Per-address shares** (`max_topics_per_ip`, #23). The topic pool is
//! server-wide, so without a share one client could create topics until the
//! pool is empty and every other route's subscribe fails (a canary that
//! only needs a chat room would then look broken). Each topic is charged to
//! the address of the connection that created it (IPv4 whole, IPv6 by /64,
//! like the connection limits; addresses in `per_ip_exempt` are not
//! charged), and given back when the topic is removed. The address is kept
//! as a 32-bit keyed hash ([`AddressKey`]), which fits in spare bytes of
//! every connection's [`ConnTopics`]: two addresses share one share only on
//! a hash collision, which an outsider cannot aim at because the key is
//! random per process. A topic costs about 855 bytes (measured), so the
//! default share of 1,000 topics is under 1 MiB per address.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use dashmap::DashMap;
use tungstenite::Message;
use wshd_handler_api::abi::{WSHD_ERR_CLOSED, WSHD_ERR_INVALID, WSHD_ERR_LIMIT, wshd_conn_id};

use crate::mailbox::ConnShared;

/// The longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Default `[topics] max_per_connection`.
pub const DEFAULT_MAX_PER_CONNECTION: usize = 64;
/// Default `[topics] max_topics`.
pub const DEFAULT_MAX_TOPICS: usize = 100_000;
/// Default `[topics] max_topics_per_ip`: a hundredth of the default pool, so
/// a hundred addresses are needed to empty it.
pub const DEFAULT_MAX_TOPICS_PER_IP: usize = 1_000;

/// The address a topic is charged to: a keyed 32-bit hash of the per-IP key
/// (IPv4 whole, IPv6 /64), never 0; 0 means "not charged" (an exempt
/// address, or a connection without one).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(u32);

impl AddressKey {
    /// Not charged to any address.
    pub const NONE: AddressKey = AddressKey(0);

    /// The key of `ip`, grouped as the connection limits group addresses.
    pub fn of(ip: std::net::IpAddr) -> AddressKey {
        use std::hash::BuildHasher;
        static SEED: OnceLock<std::hash::RandomState> = OnceLock::new();
        let h = SEED
            .get_or_init(std::hash::RandomState::new)
            .hash_one(crate::server::per_ip::key(ip));
        AddressKey((h as u32).max(1))
    }
}

/// One subscription, as a publish sees it.
#[derive(Debug)]
pub struct Subscriber {
    pub id: wshd_conn_id,
    pub conn: Arc<ConnShared>,
    /// The subscriber's route, for the slow-consumer log line.
    pub route: Arc<str>,
}

/// One publish on its way to subscribers other than the publishing
/// callback's own: through each subscriber's door when it can be written
/// directly (direct.rs), with the whole frame built at most once per
/// publish, else through its mailbox.
pub struct Delivery<'a> {
    msg: &'a Message,
    /// `None` until the first subscriber needs it; then the frame, or
    /// `None` inside when the message cannot be written directly.
    frame: Option<Option<bytes::Bytes>>,
}

impl<'a> Delivery<'a> {
    pub fn new(msg: &'a Message) -> Delivery<'a> {
        Delivery { msg, frame: None }
    }

    /// Delivers `m` (a copy of the published message) to `sub`.
    pub fn to(&mut self, sub: &Subscriber, m: Message) -> i32 {
        let msg = self.msg;
        let frame = self
            .frame
            .get_or_insert_with(|| crate::ws::frame_bytes(msg));
        sub.conn.deliver(sub.id, &sub.route, m, frame.as_ref())
    }
}

#[derive(Debug, Default)]
struct Subs {
    list: Vec<Subscriber>,
    /// Removed from the map (it was empty): a subscribe that still holds
    /// this `Arc` must look the name up again.
    dead: bool,
}

/// One topic and its subscribers.
#[derive(Debug)]
pub struct Topic {
    name: Arc<str>,
    /// Charged to this address's share until the topic is removed.
    owner: AddressKey,
    subs: Mutex<Subs>,
    /// `subs.list.len()`, readable without the lock (`subscribers`).
    len: AtomicUsize,
}

impl Topic {
    fn lock(&self) -> MutexGuard<'_, Subs> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection's subscriptions, kept in its [`ConnShared`](crate::mailbox::ConnShared).
#[derive(Debug, Default)]
pub struct ConnTopics {
    list: Vec<Arc<Topic>>,
    /// The address topics this connection creates are charged to. (In the
    /// padding after `closed`: it costs idle connections nothing.)
    address: AddressKey,
    /// The connection closed: no new subscriptions.
    closed: bool,
}

/// Every topic on the server.
#[derive(Debug)]
pub struct Topics {
    map: DashMap<Arc<str>, Arc<Topic>>,
    /// Topics in `map`, without walking its shards.
    count: AtomicUsize,
    max_per_connection: AtomicUsize,
    max_topics: AtomicUsize,
    max_per_address: AtomicUsize,
    /// Topics charged to each address that has any. Touched only when a
    /// topic is created or removed, never on a publish or a subscribe to an
    /// existing topic.
    per_address: Mutex<std::collections::HashMap<AddressKey, usize>>,
    /// `[cluster]`: the link to the other nodes, set once at startup. Absent,
    /// a publish costs one extra load and branch.
    cluster: OnceLock<Arc<crate::cluster::Link>>,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics::new(
            DEFAULT_MAX_PER_CONNECTION,
            DEFAULT_MAX_TOPICS,
            DEFAULT_MAX_TOPICS_PER_IP,
        )
    }
}

/// The server's topics: one namespace per server process.
pub fn global() -> &'static Topics {
    static TOPICS: OnceLock<Topics> = OnceLock::new();
    TOPICS.get_or_init(Topics::default)
}

/// Checks a topic name: UTF-8, 1..=[`MAX_TOPIC_LEN`] bytes.
pub fn topic_name(bytes: &[u8]) -> Result<&str, i32> {
    if bytes.is_empty() || bytes.len() > MAX_TOPIC_LEN {
        return Err(WSHD_ERR_INVALID);
    }
    std::str::from_utf8(bytes).map_err(|_| WSHD_ERR_INVALID)
}

fn lock_conn(shared: &ConnShared) -> MutexGuard<'_, ConnTopics> {
    shared.topics.lock().unwrap_or_else(|p| p.into_inner())
}

impl Topics {
    pub fn new(max_per_connection: usize, max_topics: usize, max_per_address: usize) -> Topics {
        Topics {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            max_per_connection: AtomicUsize::new(max_per_connection),
            max_topics: AtomicUsize::new(max_topics),
            max_per_address: AtomicUsize::new(max_per_address),
            per_address: Mutex::default(),
            cluster: OnceLock::new(),
        }
    }

    /// Charges the topics `shared`'s connection creates from now on to
    /// `address` (the session calls it once, before `on_open`).
    pub fn set_address(shared: &ConnShared, address: AddressKey) {
        lock_conn(shared).address = address;
    }

    /// Topics charged to `address` now.
    pub fn charged_to(&self, address: AddressKey) -> usize {
        self.lock_per_address().get(&address).copied().unwrap_or(0)
    }

    fn lock_per_address(&self) -> MutexGuard<'_, std::collections::HashMap<AddressKey, usize>> {
        self.per_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects these topics to the other nodes (once, at startup): topics
    /// appearing and disappearing are reported to `link`, and publishes are
    /// forwarded to it. `false` if a link was already set.
    pub fn set_cluster(&self, link: Arc<crate::cluster::Link>) -> bool {
        self.cluster.set(link).is_ok()
    }

    /// The cluster link, if `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Link>> {
        self.cluster.get()
    }

    /// Whether `name` has local subscribers (its topic exists).
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The names of every topic with local subscribers (a snapshot).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.map.iter().map(|e| e.key().clone()).collect()
    }

    /// Sets the caps (at startup and on every config reload). Lowering a cap
    /// refuses new subscriptions past it; existing ones stay.
    pub fn configure(&self, max_per_connection: usize, max_topics: usize, max_per_address: usize) {
        self.max_per_connection
            .store(max_per_connection, Ordering::Relaxed);
        self.max_topics.store(max_topics, Ordering::Relaxed);
        self.max_per_address
            .store(max_per_address, Ordering::Relaxed);
    }

    /// Topics that have at least one subscriber.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no topic has a subscriber.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The topic named `name`, created if needed (within `max_topics` and
    /// `owner`'s share), charged to `owner`.
    fn get_or_create(&self, name: &str, owner: AddressKey) -> Result<Arc<Topic>, i32> {
        if let Some(t) = self.map.get(name) {
            return Ok(t.value().clone());
        }
        match self.map.entry(Arc::from(name)) {
            dashmap::Entry::Occupied(e) => Ok(e.get().clone()),
            dashmap::Entry::Vacant(e) => {
                let max = self.max_topics.load(Ordering::Relaxed);
                if self.count.fetch_add(1, Ordering::Relaxed) >= max {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    return Err(WSHD_ERR_LIMIT);
                }
                if owner != AddressKey::NONE {
                    let share = self.max_per_address.load(Ordering::Relaxed);
                    let mut per = self.lock_per_address();
                    let n = per.entry(owner).or_insert(0);
                    if *n >= share {
                        if *n == 0 {
                            per.remove(&owner);
                        }
                        drop(per);
                        self.count.fetch_sub(1, Ordering::Relaxed);
                        return Err(WSHD_ERR_LIMIT);
                    }
                    *n += 1;
                }
                let topic = Arc::new(Topic {
                    name: e.key().clone(),
                    owner,
                    subs: Mutex::default(),
                    len: AtomicUsize::new(0),
                });
                e.insert(topic.clone());
                // Under the shard lock, so the link sees appearances and
                // removals of one name in the order they happened.
                if let Some(link) = self.cluster.get() {
                    link.topic_changed(&topic.name);
                }
                Ok(topic)
            }
        }
    }

    /// Subscribes connection `id` (whose shared state is `shared`, on
    /// `route`) to `name`. Subscribing again is a no-op.
    pub fn subscribe(
        &self,
        id: wshd_conn_id,
        shared: &Arc<ConnShared>,
        route: &Arc<str>,
        name: &str,
    ) -> Result<(), i32> {
        let mut mine = lock_conn(shared);
        if mine.closed {
            return Err(WSHD_ERR_CLOSED);
        }
        if mine.list.iter().any(|t| &*t.name == name) {
            return Ok(());
        }
        if mine.list.len() >= self.max_per_connection.load(Ordering::Relaxed) {
            return Err(WSHD_ERR_LIMIT);
        }
        loop {
            let topic = self.get_or_create(name, mine.address)?;
            let mut subs = topic.lock();
            if subs.dead {
                // Emptied and removed between the lookup and the lock.
                continue;
            }
            subs.list.push(Subscriber {
                id,
                conn: shared.clone(),
                route: route.clone(),
            });
            topic.len.store(subs.list.len(), Ordering::Relaxed);
            drop(subs);
            mine.list.push(topic);
            shared.want_door();
            return Ok(());
        }
    }

    /// Ends connection `shared`'s subscription to `name`, if it has one.
    pub fn unsubscribe(&self, shared: &Arc<ConnShared>, name: &str) {
        let mut mine = lock_conn(shared);
        if let Some(pos) = mine.list.iter().position(|t| &*t.name == name) {
            let topic = mine.list.swap_remove(pos);
            self.remove(&topic, shared);
        }
    }

    /// Whether `shared`'s connection is subscribed to `name`.
    pub fn is_subscribed(&self, shared: &ConnShared, name: &str) -> bool {
        lock_conn(shared).list.iter().any(|t| &*t.name == name)
    }

    /// Drops every subscription of a connection that is closing, and
    /// refuses later ones. Called once by the session when it ends.
    pub fn leave_all(&self, shared: &Arc<ConnShared>) {
        let list = {
            let mut mine = lock_conn(shared);
            mine.closed = true;
            std::mem::take(&mut mine.list)
        };
        for topic in &list {
            self.remove(topic, shared);
        }
    }

    /// Takes `shared` out of `topic`, and `topic` out of the map if it is
    /// now empty.
    fn remove(&self, topic: &Arc<Topic>, shared: &Arc<ConnShared>) {
        let empty = {
            let mut subs = topic.lock();
            if let Some(pos) = subs.list.iter().position(|s| Arc::ptr_eq(&s.conn, shared)) {
                subs.list.swap_remove(pos);
            }
            topic.len.store(subs.list.len(), Ordering::Relaxed);
            subs.list.is_empty()
        };
        if !empty {
            return;
        }
        // Check again under the shard lock: a subscribe may have come in.
        let removed = self.map.remove_if(&topic.name, |_, t| {
            if !Arc::ptr_eq(t, topic) {
                return false;
            }
            let mut subs = t.lock();
            subs.dead = subs.list.is_empty();
            subs.dead
        });
        if removed.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
            if topic.owner != AddressKey::NONE {
                let mut per = self.lock_per_address();
                if let Some(n) = per.get_mut(&topic.owner) {
                    *n -= 1;
                    if *n == 0 {
                        per.remove(&topic.owner);
                    }
                }
            }
            if let Some(link) = self.cluster.get() {
                link.topic_changed(&topic.name);
            }
        }
    }

    /// Subscribers of `name` on this server.
    pub fn subscribers(&self, name: &str) -> usize {
        self.map
            .get(name)
            .map_or(0, |t| t.value().len.load(Ordering::Relaxed))
    }

    /// Offers `msg` to every subscriber of `name` except connection
    /// `exclude` (0: none) through `deliver`, which gets a clone of `msg`
    /// (its payload is shared, not copied) and returns the ABI status of
    /// that one delivery. Returns how many were `WSHD_OK` (on this node:
    /// with `[cluster]`, the message then goes to the other nodes too, not
    /// counted).
    pub fn publish(
        &self,
        name: &str,
        msg: &Message,
        exclude: wshd_conn_id,
        deliver: impl FnMut(&Subscriber, Message) -> i32,
    ) -> usize {
        let n = self.fan_out(name, msg, exclude, deliver);
        if let Some(link) = self.cluster.get() {
            link.forward(name, msg);
        }
        n
    }

    /// Delivers a message that another node published (through the
    /// cluster link) to this node's subscribers, like a local publish but
    /// without forwarding it again.
    pub fn deliver_remote(&self, name: &str, msg: &Message) -> usize {
        let mut delivery = Delivery::new(msg);
        self.fan_out(name, msg, 0, |s, m| delivery.to(s, m))
    }

    /// Subscribers of `name` across the cluster: this node's exact count
    /// plus the other nodes' counts as of the last heartbeat (approximate).
    /// Without `[cluster]`, the local count.
    pub fn subscribers_cluster(&self, name: &str) -> u64 {
        let local = self.subscribers(name) as u64;
        match self.cluster.get() {
            Some(link) => local + link.remote_subscribers(name),
            None => local,
        }
    }

    fn fan_out(
        &self,
        name: &str,
        msg: &Message,
        exclude: wshd_conn_id,
        mut deliver: impl FnMut(&Subscriber, Message) -> i32,
    ) -> usize {
        crate::metrics::publish();
        let Some(topic) = self.map.get(name).map(|t| t.value().clone()) else {
            return 0;
        };
        let subs = topic.lock();
        let mut n = 0;
        for s in subs.list.iter().filter(|s| s.id != exclude) {
            if deliver(s, msg.clone()) == wshd_handler_api::abi::WSHD_OK {
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumer;

    fn conn() -> Arc<ConnShared> {
        Arc::new(ConnShared::new(1, 100, 1 << 20, SlowConsumer::Close))
    }

    fn publish(t: &Topics, name: &str, exclude: u64) -> usize {
        t.publish(name, &Message::text("x"), exclude, |s, m| {
            s.conn.offer(s.id, &s.route, m)
        })
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(topic_name(b"room"), Ok("room"));
        assert_eq!(topic_name(&[b'a'; 256]).map(str::len), Ok(256));
        assert_eq!(topic_name(&[b'a'; 257]), Err(WSHD_ERR_INVALID));
        assert_eq!(topic_name(b""), Err(WSHD_ERR_INVALID));
        assert_eq!(topic_name(&[0xff]), Err(WSHD_ERR_INVALID));
    }

    #[test]
    fn subscribe_publish_unsubscribe_and_empty_topics_go_away() {
        let t = Topics::new(4, 10, 10);
        let route: Arc<str> = "/r".into();
        let (a, b) = (conn(), conn());
        t.subscribe(1, &a, &route, "room").unwrap();
        t.subscribe(1, &a, &route, "room").unwrap();
        t.subscribe(2, &b, &route, "room").unwrap();
        assert_eq!(t.subscribers("room"), 2, "subscribing twice is once");
        assert!(t.is_subscribed(&a, "room") && !t.is_subscribed(&a, "other"));
        assert_eq!(publish(&t, "room", 0), 2);
        assert_eq!(publish(&t, "room", 1), 1, "the excluded connection");
        assert_eq!(publish(&t, "nobody", 0), 0);
        assert_eq!(a.queued().0, 1);
        assert_eq!(b.queued().0, 2);
        t.unsubscribe(&a, "room");
        t.unsubscribe(&a, "room");
        assert_eq!(t.subscribers("room"), 1);
        t.leave_all(&b);
        assert_eq!((t.subscribers("room"), t.len()), (0, 0), "topic removed");
        assert_eq!(
            t.subscribe(2, &b, &route, "room"),
            Err(WSHD_ERR_CLOSED),
            "a closed connection cannot subscribe again"
        );
    }

    #[test]
    fn caps_refuse_and_change_nothing() {
        let t = Topics::new(2, 3, 3);
        let route: Arc<str> = "/r".into();
        let (a, b) = (conn(), conn());
        t.subscribe(1, &a, &route, "t1").unwrap();
        t.subscribe(1, &a, &route, "t2").unwrap();
        assert_eq!(t.subscribe(1, &a, &route, "t3"), Err(WSHD_ERR_LIMIT));
        assert!(!t.is_subscribed(&a, "t3"));
        t.subscribe(2, &b, &route, "t3").unwrap();
        assert_eq!(t.subscribe(2, &b, &route, "t4"), Err(WSHD_ERR_LIMIT));
        assert_eq!(t.len(), 3, "the refused topic was not created");
        t.subscribe(2, &b, &route, "t1").unwrap();
        t.leave_all(&a);
        assert_eq!(t.len(), 2);
        t.subscribe(2, &b, &route, "t4").unwrap_err();
        t.unsubscribe(&b, "t3");
        t.subscribe(2, &b, &route, "t4").unwrap();
    }

    #[test]
    fn concurrent_subscribes_and_leaves_keep_the_count_right() {
        let t = Arc::new(Topics::new(64, 1000, 1000));
        let route: Arc<str> = "/r".into();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (t, route) = (t.clone(), route.clone());
                s.spawn(move || {
                    for i in 0..500u64 {
                        let c = conn();
                        t.subscribe(i, &c, &route, "hot").unwrap();
                        t.subscribe(i, &c, &route, &format!("t{}", i % 7)).unwrap();
                        t.leave_all(&c);
                    }
                });
            }
        });
        assert_eq!((t.len(), t.subscribers("hot")), (0, 0));
    }

    #[test]
    fn each_address_has_a_share_of_the_pool_given_back_when_its_topics_go() {
        let t = Topics::new(64, 5, 2);
        let route: Arc<str> = "/r".into();
        let ip = |s: &str| AddressKey::of(s.parse().unwrap());
        let (a, a2, b, exempt) = (conn(), conn(), conn(), conn());
        Topics::set_address(&a, ip("192.0.2.1"));
        // Another address in the same IPv6 /64 is the same client; here a
        // second connection from the same IPv4 address.
        Topics::set_address(&a2, ip("192.0.2.1"));
        Topics::set_address(&b, ip("2001:db8:1:2::7"));
        assert_eq!(ip("2001:db8:1:2::7"), ip("2001:db8:1:2:ffff::1"));
        assert_ne!(ip("2001:db8:1:2::7"), ip("2001:db8:1:3::7"));
        assert_ne!(ip("192.0.2.1"), AddressKey::NONE);
        assert_eq!(t.subscribe(1, &a, &route, "a1"), Ok(()));
        assert_eq!(t.subscribe(2, &a2, &route, "a2"), Ok(()));
        // The address's share is spent, across its connections...
        assert_eq!(t.subscribe(2, &a2, &route, "a3"), Err(WSHD_ERR_LIMIT));
        // ...but joining a topic that exists creates nothing and is free.
        assert_eq!(t.subscribe(2, &a2, &route, "a1"), Ok(()));
        assert_eq!(t.charged_to(ip("192.0.2.1")), 2);
        // Others are not starved; exempt connections are not charged.
        assert_eq!(t.subscribe(3, &b, &route, "b1"), Ok(()));
        assert_eq!(t.subscribe(4, &exempt, &route, "e1"), Ok(()));
        assert_eq!(t.subscribe(4, &exempt, &route, "e2"), Ok(()));
        assert_eq!(t.charged_to(AddressKey::NONE), 0);
        // The pool (5) is now full for everyone.
        assert_eq!(t.subscribe(3, &b, &route, "b2"), Err(WSHD_ERR_LIMIT));
        assert_eq!(t.len(), 5);
        // a1 goes when its last member leaves: the share comes back.
        t.leave_all(&a);
        assert_eq!(t.charged_to(ip("192.0.2.1")), 2, "a2 still holds a1");
        t.unsubscribe(&a2, "a1");
        assert_eq!(t.charged_to(ip("192.0.2.1")), 1);
        assert_eq!(t.subscribe(2, &a2, &route, "a4"), Ok(()));
        t.leave_all(&a2);
        assert_eq!(t.charged_to(ip("192.0.2.1")), 0);
        assert!(t.lock_per_address().get(&ip("192.0.2.1")).is_none());
    }
}
