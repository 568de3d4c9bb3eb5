//! `blocking`: a handler that blocks inside its callbacks, and says so with
//! the `MAY_BLOCK` flag, so the server runs its callbacks on a separate
//! thread pool instead of its async workers.
//!
//! Text `sleep <ms>` logs `blocking: conn <id> sleeping <ms> ms` (info),
//! sleeps that many milliseconds (at most 10000) with `std::thread::sleep`,
//! then replies `slept <ms>` (the capped value).
//! Everything else, text or binary, is echoed.
//!
//! Build: `cargo build --release -p blocking-handler` →
//! `target/release/libblocking_wsh.so` (serves the handler named `blocking`).
//!
//! Enable it with a route in the server config, e.g.
//!
//! ```toml
//! [[route]]
//! path = "/blocking"
//! handler = "blocking"
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use wshd_handler_api::{Conn, Handler, Host, Message, SendError, export_handler, log};

/// The longest sleep one message can ask for, in milliseconds.
pub const MAX_SLEEP_MS: u64 = 10_000;

/// The blocking handler. Stateless.
pub struct Blocking;

/// The capped duration of a `sleep <ms>` request.
fn sleep_request(text: &str) -> Option<u64> {
    let ms: u64 = text.strip_prefix("sleep ")?.trim().parse().ok()?;
    Some(ms.min(MAX_SLEEP_MS))
}

impl Handler for Blocking {
    type ConnState = ();

    fn init(_host: Host, _config: &str) -> Result<Self, String> {
        log::info!("blocking handler ready (MAY_BLOCK)");
        Ok(Blocking)
    }

    fn open(&self, _conn: Conn) -> Result<(), String> {
        Ok(())
    }

    fn message(&self, _state: &mut (), conn: Conn, msg: Message<'_>) -> Result<(), String> {
        let result = match msg.as_text().and_then(sleep_request) {
            Some(ms) => {
                log::info!("blocking: conn {} sleeping {ms} ms", conn.id());
                std::thread::sleep(Duration::from_millis(ms));
                conn.send_text(&format!("slept {ms}"))
            }
            None => conn.send(msg),
        };
        match result {
            Ok(()) | Err(SendError::Closed) => Ok(()),
            Err(e) => Err(format!("blocking: {e}")),
        }
    }
}

export_handler!(Blocking, flags = MAY_BLOCK);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use wshd_handler_api::testing::{Sent, TestHost, exported};

    #[test]
    fn sleeps_then_replies() {
        let mut t = TestHost::<Blocking>::init_exported("").unwrap();
        let c = t.open().unwrap();
        let started = Instant::now();
        t.message(c, Message::Text("sleep 30")).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(t.logs_contain(&format!("blocking: conn {} sleeping 30 ms", c.id())));
        t.message(c, Message::Text("sleep x")).unwrap();
        t.message(c, Message::Binary(b"sleep 5")).unwrap();
        assert_eq!(
            t.sent(c),
            [
                Sent::Text("slept 30".into()),
                Sent::Text("sleep x".into()),
                Sent::Binary(b"sleep 5".to_vec())
            ]
        );
    }

    #[test]
    fn sleeps_are_capped() {
        assert_eq!(sleep_request("sleep 99999999"), Some(MAX_SLEEP_MS));
        assert_eq!(sleep_request("sleep 0"), Some(0));
        assert_eq!(sleep_request("sleep -1"), None);
        assert_eq!(sleep_request("sleeps 1"), None);
    }

    #[test]
    fn declares_may_block() {
        let info = exported::<Blocking>().unwrap();
        assert_eq!(info.name, "blocking");
        assert!(info.may_block());
    }
}
