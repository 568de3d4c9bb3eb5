//! `chat`: one chat room per route. Every message (text or binary) a member
//! sends is broadcast to every connection of the room, the sender included,
//! with one `Host::broadcast_ids` call: the server stores the message once
//! (here, not even once: it shares the buffer the message arrived in) and
//! queues a reference to it for each member, so a room of N members costs
//! one copy per message, not N. Joins and leaves are logged at info.
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
//! max_members = 100   # default 10000; further handshakes get 503
//! ```
//!
//! A member whose send queue is full misses that message (it is a slow
//! reader; the others must not wait for it). Under the server's default
//! `slow_consumer = "close"` policy it is then closed with 1008 and leaves
//! the room.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use wshd_handler_api::{
    Conn, Handler, HandshakeRequest, HandshakeResponse, Host, Message, export_handler, log,
};

/// The room size when the route config does not set `max_members`.
pub const DEFAULT_MAX_MEMBERS: usize = 10_000;

/// One room: the connections of this handler instance.
pub struct Chat {
    host: Host,
    members: RwLock<BTreeSet<u64>>,
    max_members: usize,
}

impl Chat {
    fn members(&self) -> RwLockReadGuard<'_, BTreeSet<u64>> {
        // A panic elsewhere cannot leave the set half-updated: use it anyway.
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn members_mut(&self) -> RwLockWriteGuard<'_, BTreeSet<u64>> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections are in the room.
    pub fn len(&self) -> usize {
        self.members().len()
    }

    /// Whether the room is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

impl Handler for Chat {
    type ConnState = ();

    fn init(host: Host, config: &str) -> Result<Self, String> {
        let max_members = parse_max_members(config)?;
        log::info!("chat room ready (max {max_members} members)");
        Ok(Chat {
            host,
            members: RwLock::default(),
            max_members,
        })
    }

    fn handshake(
        &self,
        _req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        let n = self.len();
        if n >= self.max_members {
            resp.reject(503, &format!("chat: the room is full ({n} members)"))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn open(&self, conn: Conn) -> Result<(), String> {
        let n = {
            let mut members = self.members_mut();
            members.insert(conn.id());
            members.len()
        };
        log::info!("chat: conn {} joined ({n} members)", conn.id());
        Ok(())
    }

    fn message(&self, _state: &mut (), _conn: Conn, msg: Message<'_>) -> Result<(), String> {
        // Copy the ids out rather than hold the lock across the host call,
        // so joins and leaves never wait on a broadcast.
        let ids: Vec<u64> = self.members().iter().copied().collect();
        // Members that are leaving (closed) or too slow (full queue) are
        // skipped by the host; the slow ones are closed by its policy.
        match self.host.broadcast_ids(&ids, msg) {
            Ok(reached) if reached < ids.len() => log::debug!(
                "chat: message reached {reached} of {} members (others slow or leaving)",
                ids.len()
            ),
            Ok(_) => {}
            Err(e) => log::warn!("chat: broadcast failed: {e}"),
        }
        Ok(())
    }

    fn close(&self, _state: (), conn: Conn, code: u16, _reason: &str) {
        let n = {
            let mut members = self.members_mut();
            members.remove(&conn.id());
            members.len()
        };
        log::info!(
            "chat: conn {} left with code {code} ({n} members)",
            conn.id()
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
    fn broadcasts_to_every_member_including_the_sender() {
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
            t.broadcasts(),
            2,
            "one broadcast per message, not one send per member"
        );
    }

    #[test]
    fn members_who_left_get_nothing() {
        let mut t = TestHost::<Chat>::init("").unwrap();
        let (a, b) = (t.open().unwrap(), t.open().unwrap());
        t.close(b, 1000, "");
        assert_eq!(t.handler().len(), 1);
        assert!(t.logs_contain(&format!(
            "chat: conn {} left with code 1000 (1 members)",
            b.id()
        )));
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
        assert!(t.logs_contain("chat: message reached 0 of 1 members"));
    }

    #[test]
    fn max_members_rejects_handshakes_when_full() {
        let mut t = TestHost::<Chat>::init("max_members = 2\n").unwrap();
        t.connect(&Handshake::new("/chat")).unwrap();
        let b = t.connect(&Handshake::new("/chat")).unwrap();
        let full = t.handshake(&Handshake::new("/chat"));
        assert_eq!(
            full.rejected,
            Some((503, "chat: the room is full (2 members)".into()))
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
