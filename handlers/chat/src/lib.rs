//! `chat`: chat rooms on host-owned topics (ABI 1.2).
//!
//! The room is chosen by the query, `/chat?room=NAME`, and defaults to the
//! route path (`/chat`). A member's connection subscribes to the room's
//! topic, and every message (text or binary) a member sends is published
//! to it, the sender included, with one `Host::publish` call: the server
//! stores the message once (here, not even once: it shares the buffer the
//! message arrived in) and queues a reference to it for each member.
//!
//! The handler keeps **no member list**: the server does. That is what
//! makes a reload safe: after a new `libchat_wsh.so` is installed, members
//! who joined through the old version and members who join through the
//! new one are subscribers of the same topic, so every message reaches
//! all of them, before and after the old version is drained.
//!
//! Joins and leaves are published as small JSON events,
//! `{"event":"join","conn":7,"members":3}` and
//! `{"event":"leave","conn":7,"members":2}`, to the members that asked for
//! them with `?events=1` (e.g. `/chat?room=lobby&events=1`); other members
//! see only the messages, as before. They are logged at info too.
//!
//! Build: `cargo build --release -p chat-handler` → `target/release/libchat_wsh.so`
//! (serves the handler named `chat`).
//!
//! Enable it with a route in the server config; the route's config table is
//! optional:
//!
//! ```toml
//! [[route]]
//! path = "/chat"
//! handler = "chat"
//! [route.config]
//! max_members = 100   # per room, default 10000; further handshakes get 503
//! ```
//!
//! A member whose send queue is full misses that message (it is a slow
//! reader; the others must not wait for it). Under the server's default
//! `slow_consumer = "close"` policy it is then closed with 1008 and leaves
//! the room.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use wshd_handler_api::{
    Conn, Handler, HandshakeRequest, HandshakeResponse, Host, Message, export_handler, log,
};

/// The room size when the route config does not set `max_members`.
pub const DEFAULT_MAX_MEMBERS: usize = 10_000;
/// The longest room name, in bytes (the topic adds a prefix and a suffix
/// and must stay within the server's 256).
pub const MAX_ROOM_LEN: usize = 200;

/// The chat handler. It keeps no member list: the server does.
pub struct Chat {
    host: Host,
    max_members: usize,
    /// The room each accepted handshake asked for, until its `open` takes
    /// it (the handshake sees the query, `open` does not).
    joining: Mutex<HashMap<u64, Member>>,
}

/// Where a member is: its room's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The topic messages go to: `chat:` + room.
    pub topic: String,
    /// The topic join and leave events go to, if the member asked for
    /// them: the messages topic + `#events`.
    pub events: String,
    /// Whether this member receives the events.
    pub wants_events: bool,
}

impl Member {
    fn new(room: &str, wants_events: bool) -> Member {
        Member {
            topic: format!("chat:{room}"),
            events: format!("chat:{room}#events"),
            wants_events,
        }
    }
}

/// The value of `key` in a query string, percent-decoded (`+` is a space).
fn query_param(query: &str, key: &str) -> Option<Result<String, String>> {
    let raw = query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)?
        .1;
    let mut out = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(byte) = hex else {
                    return Some(Err(format!("bad percent escape in `{key}`")));
                };
                out.push(byte);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Some(String::from_utf8(out).map_err(|_| format!("`{key}` is not UTF-8")))
}

/// The room a handshake asks for: `?room=NAME`, else the path.
fn room_of(path: &str, query: &str) -> Result<String, String> {
    let room = match query_param(query, "room") {
        None => path.to_owned(),
        Some(r) => r?,
    };
    if room.is_empty() || room.len() > MAX_ROOM_LEN || room.chars().any(char::is_control) {
        return Err(format!(
            "chat: the room name must be 1 to {MAX_ROOM_LEN} bytes without control characters"
        ));
    }
    Ok(room)
}

/// Parses the route config: `key = value` lines, `#` comments.
fn parse_max_members(config: &str) -> Result<usize, String> {
    let mut max = DEFAULT_MAX_MEMBERS;
    for line in config.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("chat: cannot read config line `{line}`"));
        };
        let value = value.split('#').next().unwrap_or("").trim();
        match key.trim() {
            "max_members" => {
                max = value
                    .replace('_', "")
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| {
                        format!("chat: max_members must be a positive integer, not `{value}`")
                    })?;
            }
            other => {
                return Err(format!(
                    "chat: unknown config key `{other}` (known: max_members)"
                ));
            }
        }
    }
    Ok(max)
}

impl Chat {
    /// Publishes a join or leave event to the room's event topic.
    fn event(&self, member: &Member, what: &str, conn: Conn) -> usize {
        let members = self.host.subscribers(&member.topic).unwrap_or(0);
        let json = format!(
            "{{\"event\":\"{what}\",\"conn\":{},\"members\":{members}}}",
            conn.id()
        );
        if let Err(e) = self.host.publish(&member.events, Message::Text(&json)) {
            log::warn!("chat: cannot publish the {what} of conn {}: {e}", conn.id());
        }
        members
    }
}

impl Handler for Chat {
    type ConnState = Member;

    fn init(host: Host, config: &str) -> Result<Self, String> {
        let max_members = parse_max_members(config)?;
        if host.abi_version() < (1, 2) {
            return Err("chat: needs a server with topics (handler ABI 1.2)".into());
        }
        log::info!("chat ready (max {max_members} members per room)");
        Ok(Chat {
            host,
            max_members,
            joining: Mutex::default(),
        })
    }

    fn handshake(
        &self,
        req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        let room = match room_of(req.path(), req.query()) {
            Ok(room) => room,
            Err(e) => {
                resp.reject(400, &e).map_err(|e| e.to_string())?;
                return Ok(());
            }
        };
        let events = matches!(
            query_param(req.query(), "events"),
            Some(Ok(v)) if v == "1" || v == "true"
        );
        let member = Member::new(&room, events);
        let n = self.host.subscribers(&member.topic).unwrap_or(0);
        if n >= self.max_members {
            resp.reject(503, &format!("chat: the room is full ({n} members)"))
                .map_err(|e| e.to_string())?;
            return Ok(());
        }
        self.joining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.conn_id(), member);
        Ok(())
    }

    fn open(&self, conn: Conn) -> Result<Member, String> {
        let member = self
            .joining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn.id())
            // No handshake hook ran (a host that skips it): the route's room.
            .unwrap_or_else(|| Member::new("/chat", false));
        conn.subscribe(&member.topic)
            .map_err(|e| format!("chat: cannot join {}: {e}", member.topic))?;
        if member.wants_events {
            conn.subscribe(&member.events)
                .map_err(|e| format!("chat: cannot join {}: {e}", member.events))?;
        }
        let n = self.event(&member, "join", conn);
        log::info!(
            "chat: conn {} joined ({n} members) {}",
            conn.id(),
            member.topic
        );
        Ok(member)
    }

    fn message(&self, member: &mut Member, _conn: Conn, msg: Message<'_>) -> Result<(), String> {
        // Members that are leaving or too slow (full queue) are skipped by
        // the host; the slow ones are closed by its policy.
        match self.host.publish(&member.topic, msg) {
            Ok(_) => {}
            Err(e) => log::warn!("chat: publish to {} failed: {e}", member.topic),
        }
        Ok(())
    }

    fn close(&self, member: Member, conn: Conn, code: u16, _reason: &str) {
        // The server already ended this connection's subscriptions.
        let n = self.event(&member, "leave", conn);
        log::info!(
            "chat: conn {} left with code {code} ({n} members) {}",
            conn.id(),
            member.topic
        );
    }
}

export_handler!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use wshd_handler_api::SendError;
    use wshd_handler_api::testing::{Handshake, Sent, TestHost, exported};

    fn text(s: &str) -> Sent {
        Sent::Text(s.into())
    }

    #[test]
    fn publishes_to_every_member_including_the_sender() {
        let mut t = TestHost::<Chat>::init_exported("").unwrap();
        let (a, b, c) = (t.open().unwrap(), t.open().unwrap(), t.open().unwrap());
        t.message(a, Message::Text("hello")).unwrap();
        t.message(b, Message::Binary(b"\x00bin")).unwrap();
        for conn in [a, b, c] {
            assert_eq!(
                t.sent(conn),
                [text("hello"), Sent::Binary(b"\x00bin".to_vec())]
            );
        }
        assert!(t.logs_contain(&format!("chat: conn {} joined (3 members)", c.id())));
        assert_eq!(
            t.subscribers("chat:/chat").len(),
            3,
            "the host keeps the members"
        );
        assert_eq!(
            t.publishes(),
            5,
            "3 joins (to the event topic) + 1 per message"
        );
    }

    #[test]
    fn the_room_comes_from_the_query_and_defaults_to_the_path() {
        let mut t = TestHost::<Chat>::init("").unwrap();
        let lobby = t
            .connect(&Handshake::new("/chat").query("room=lob%20by"))
            .unwrap();
        let other = t
            .connect(&Handshake::new("/chat").query("x=1&room=other"))
            .unwrap();
        let plain = t.connect(&Handshake::new("/talk")).unwrap();
        t.message(lobby, Message::Text("to lobby")).unwrap();
        t.message(plain, Message::Text("to /talk")).unwrap();
        assert_eq!(t.sent(lobby), [text("to lobby")]);
        assert!(t.sent(other).is_empty());
        assert_eq!(t.sent(plain), [text("to /talk")]);
        assert_eq!(t.subscribers("chat:lob by"), [lobby.id()]);
        let bad = t.handshake(&Handshake::new("/chat").query("room=%ff"));
        assert_eq!(bad.rejected.map(|r| r.0), Some(400));
        let long = format!("room={}", "x".repeat(MAX_ROOM_LEN + 1));
        assert!(
            !t.handshake(&Handshake::new("/chat").query(&long))
                .accepted()
        );
    }

    #[test]
    fn joins_and_leaves_are_json_events_for_members_who_ask() {
        let mut t = TestHost::<Chat>::init("").unwrap();
        let watcher = t
            .connect(&Handshake::new("/chat").query("events=1"))
            .unwrap();
        let quiet = t.connect(&Handshake::new("/chat")).unwrap();
        t.close(quiet, 1000, "");
        let id = quiet.id();
        assert_eq!(
            t.sent(watcher),
            [
                text(&format!(
                    "{{\"event\":\"join\",\"conn\":{},\"members\":1}}",
                    watcher.id()
                )),
                text(&format!(
                    "{{\"event\":\"join\",\"conn\":{id},\"members\":2}}"
                )),
                text(&format!(
                    "{{\"event\":\"leave\",\"conn\":{id},\"members\":1}}"
                )),
            ]
        );
        assert!(t.logs_contain(&format!("chat: conn {id} left with code 1000 (1 members)")));
    }

    #[test]
    fn members_who_left_get_nothing() {
        let mut t = TestHost::<Chat>::init("").unwrap();
        let (a, b) = (t.open().unwrap(), t.open().unwrap());
        t.close(b, 1000, "");
        assert_eq!(t.subscribers("chat:/chat"), [a.id()]);
        t.message(a, Message::Text("anyone?")).unwrap();
        assert_eq!(t.sent(a), [text("anyone?")]);
        assert!(t.sent(b).is_empty());
    }

    #[test]
    fn a_full_queue_does_not_fail_the_sender() {
        let mut t = TestHost::<Chat>::init("").unwrap();
        let a = t.open().unwrap();
        t.set_send_error(Some(SendError::Backpressure));
        t.message(a, Message::Text("x")).unwrap();
        assert!(t.is_open(a));
    }

    #[test]
    fn max_members_rejects_handshakes_when_the_room_is_full() {
        let mut t = TestHost::<Chat>::init("max_members = 2\n").unwrap();
        t.connect(&Handshake::new("/chat")).unwrap();
        let b = t.connect(&Handshake::new("/chat")).unwrap();
        let full = t.handshake(&Handshake::new("/chat"));
        assert_eq!(
            full.rejected,
            Some((503, "chat: the room is full (2 members)".into()))
        );
        assert!(
            t.handshake(&Handshake::new("/chat").query("room=b"))
                .accepted(),
            "another room has space"
        );
        t.close(b, 1001, "");
        assert!(t.handshake(&Handshake::new("/chat")).accepted());
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(parse_max_members(""), Ok(DEFAULT_MAX_MEMBERS));
        assert_eq!(
            parse_max_members("# c\nmax_members = 1_000 # room\n"),
            Ok(1000)
        );
        assert!(parse_max_members("max_members = 0").is_err());
        assert!(parse_max_members("max_members = \"x\"").is_err());
        let err = TestHost::<Chat>::init("room = 1").unwrap_err();
        assert!(err.logs_contain("chat: unknown config key `room`"), "{err}");
    }

    #[test]
    fn descriptor() {
        assert_eq!(exported::<Chat>().unwrap().name, "chat");
    }
}
