//! The SDK's topic and timer calls through the testing host: what a
//! handler's own unit tests can check (fan-out, exclusion, caps, timers).
#![cfg(feature = "testing")]

use std::sync::Mutex;
use std::time::Duration;

use wshd_handler_api::testing::{Sent, TEST_TOPICS_PER_CONNECTION, TestHost};
use wshd_handler_api::{Conn, Handler, Host, Message, SendError};

/// "sub T", "unsub T", "pub T TEXT", "pubx T TEXT", "tick MS", "cancel",
/// "later MS" (an instance timer); timers reply "tick N".
struct Pubsub {
    host: Host,
    instance_ticks: Mutex<u32>,
}

impl Handler for Pubsub {
    type ConnState = (u32, Option<u64>);

    fn init(host: Host, _: &str) -> Result<Self, String> {
        Ok(Pubsub {
            host,
            instance_ticks: Mutex::new(0),
        })
    }

    fn open(&self, _: Conn) -> Result<Self::ConnState, String> {
        Ok((0, None))
    }

    fn message(
        &self,
        state: &mut Self::ConnState,
        conn: Conn,
        msg: Message<'_>,
    ) -> Result<(), String> {
        let text = msg.as_text().unwrap_or_default();
        let (cmd, rest) = text.split_once(' ').unwrap_or((text, ""));
        let e = |e: SendError| e.to_string();
        match cmd {
            "sub" => conn.subscribe(rest).map_err(e),
            "unsub" => conn.unsubscribe(rest).map_err(e),
            "pub" | "pubx" => {
                let (topic, body) = rest.split_once(' ').unwrap_or((rest, ""));
                let n = if cmd == "pub" {
                    self.host.publish(topic, Message::Text(body))
                } else {
                    self.host.publish_except(topic, Message::Text(body), conn)
                };
                conn.send_text(&format!("reached {}", n.map_err(e)?))
                    .map_err(e)
            }
            "tick" => {
                state.1 = Some(
                    conn.set_timer(Duration::from_millis(rest.parse().unwrap()))
                        .map_err(e)?,
                );
                Ok(())
            }
            "cancel" => self.host.cancel_timer(state.1.take().unwrap()).map_err(e),
            "later" => self
                .host
                .set_timer(Duration::from_millis(rest.parse().unwrap()))
                .map(drop)
                .map_err(e),
            _ => Err(format!("unknown {text}")),
        }
    }

    fn timer(
        &self,
        state: Option<&mut Self::ConnState>,
        conn: Option<Conn>,
        _timer: u64,
    ) -> Result<(), String> {
        match (state, conn) {
            (Some(state), Some(conn)) => {
                state.0 += 1;
                conn.send_text(&format!("tick {}", state.0))
                    .map_err(|e| e.to_string())
            }
            _ => {
                *self.instance_ticks.lock().unwrap() += 1;
                Ok(())
            }
        }
    }
}

fn text(s: &str) -> Sent {
    Sent::Text(s.into())
}

#[test]
fn publish_fans_out_to_subscribers_and_can_skip_the_sender() {
    let mut t = TestHost::<Pubsub>::init("").unwrap();
    let (a, b, c) = (t.open().unwrap(), t.open().unwrap(), t.open().unwrap());
    t.message(a, Message::Text("sub room")).unwrap();
    t.message(b, Message::Text("sub room")).unwrap();
    t.message(c, Message::Text("pub room hello")).unwrap();
    t.message(a, Message::Text("pubx room again")).unwrap();
    assert_eq!(t.sent(a), [text("hello"), text("reached 1")]);
    assert_eq!(t.sent(b), [text("hello"), text("again")]);
    assert_eq!(t.sent(c), [text("reached 2")]);
    assert_eq!(t.publishes(), 2);
    t.close(b, 1000, "");
    assert_eq!(
        t.subscribers("room"),
        [a.id()],
        "a closed connection leaves"
    );
    t.message(a, Message::Text("unsub room")).unwrap();
    assert!(t.subscribers("room").is_empty());
}

#[test]
fn bad_names_and_the_per_connection_cap_are_errors() {
    let mut t = TestHost::<Pubsub>::init("").unwrap();
    let a = t.open().unwrap();
    let long = format!("sub {}", "x".repeat(257));
    assert!(t.message(a, Message::Text(&long)).is_err(), "257 bytes");
    let a = t.open().unwrap();
    for i in 0..TEST_TOPICS_PER_CONNECTION {
        t.message(a, Message::Text(&format!("sub t{i}"))).unwrap();
    }
    let err = t.message(a, Message::Text("sub one-more"));
    assert!(err.is_err());
    assert!(t.logs_contain("a configured limit was reached"));
}

#[test]
fn timers_fire_when_the_test_says_and_cancelled_ones_never() {
    let mut t = TestHost::<Pubsub>::init("").unwrap();
    let a = t.open().unwrap();
    t.message(a, Message::Text("tick 50")).unwrap();
    let [(id, conn, delay)] = t.timers()[..] else {
        panic!("{:?}", t.timers())
    };
    assert_eq!((conn, delay), (a.id(), Duration::from_millis(50)));
    t.fire_timer(id).unwrap();
    assert_eq!(t.sent(a), [text("tick 1")]);
    assert!(t.timers().is_empty(), "fired once");

    t.message(a, Message::Text("tick 10")).unwrap();
    t.message(a, Message::Text("cancel")).unwrap();
    assert!(t.timers().is_empty());

    t.message(a, Message::Text("later 5")).unwrap();
    let [(id, 0, _)] = t.timers()[..] else {
        panic!("{:?}", t.timers())
    };
    t.fire_timer(id).unwrap();
    assert_eq!(*t.handler().instance_ticks.lock().unwrap(), 1);

    t.message(a, Message::Text("tick 10")).unwrap();
    t.close(a, 1000, "");
    assert!(
        t.timers().is_empty(),
        "a closed connection's timers are dropped"
    );
}
