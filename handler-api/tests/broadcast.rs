//! `Host::broadcast` through the testing host (feature `testing`): one call
//! fans a message out to every listed open connection, skips closed ones,
//! and reports how many it reached.
#![cfg(feature = "testing")]

use std::sync::Mutex;

use wshd_handler_api::testing::{Sent, TestHost};
use wshd_handler_api::{Conn, Handler, Host, Message, SendError};

/// Relays every message to every connection it has seen, and records how
/// many each broadcast reached.
struct Relay {
    host: Host,
    seen: Mutex<Vec<Conn>>,
    reached: Mutex<Vec<usize>>,
}

impl Handler for Relay {
    type ConnState = ();

    fn init(host: Host, _config: &str) -> Result<Self, String> {
        Ok(Relay {
            host,
            seen: Mutex::default(),
            reached: Mutex::default(),
        })
    }

    fn open(&self, conn: Conn) -> Result<(), String> {
        self.seen.lock().unwrap().push(conn);
        Ok(())
    }

    fn message(&self, _state: &mut (), _conn: Conn, msg: Message<'_>) -> Result<(), String> {
        let seen = self.seen.lock().unwrap().clone();
        let n = self.host.broadcast(&seen, msg).map_err(|e| e.to_string())?;
        self.reached.lock().unwrap().push(n);
        Ok(())
    }
}

#[test]
fn broadcast_reaches_every_open_connection_in_one_call() {
    let mut t = TestHost::<Relay>::init("").unwrap();
    let (a, b, c) = (t.open().unwrap(), t.open().unwrap(), t.open().unwrap());
    t.close(c, 1000, "");
    t.message(a, Message::Text("hi")).unwrap();
    t.message(b, Message::Binary(b"\x01")).unwrap();
    for conn in [a, b] {
        assert_eq!(
            t.sent(conn),
            [Sent::Text("hi".into()), Sent::Binary(vec![1])],
            "{conn:?}"
        );
    }
    assert!(t.sent(c).is_empty(), "a closed connection is skipped");
    assert_eq!(t.broadcasts(), 2, "one host call per message");
    assert_eq!(*t.handler().reached.lock().unwrap(), [2, 2]);

    // A full queue everywhere: nothing reached, but the call itself is fine.
    t.set_send_error(Some(SendError::Backpressure));
    t.message(a, Message::Text("dropped")).unwrap();
    assert_eq!(*t.handler().reached.lock().unwrap(), [2, 2, 0]);
}

#[test]
fn broadcast_ids_takes_plain_ids() {
    let mut t = TestHost::<Relay>::init("").unwrap();
    let (a, b) = (t.open().unwrap(), t.open().unwrap());
    let host = t.handler().host;
    assert_eq!(
        host.broadcast_ids(&[a.id(), b.id(), 999], Message::Text("x")),
        Ok(2)
    );
    assert_eq!(t.sent(b), [Sent::Text("x".into())]);
}
