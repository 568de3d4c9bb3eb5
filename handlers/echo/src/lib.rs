//! `echo`: sends every text and binary message back to its sender. The text
//! `Goodbye` is echoed and then the connection is closed normally (1000), as
//! pywebsocket's `echo_wsh.py` does.
//!
//! Build: `cargo build --release -p echo-handler` → `target/release/libecho_wsh.so`
//! (serves the handler named `echo`).
//!
//! Enable it with a route in the server config, e.g.
//!
//! ```toml
//! [[route]]
//! path = "/echo"
//! handler = "echo"
//! ```
//!
//! No route config keys. The message path is a hot path: no allocation, no
//! lock, no logging above `debug`.
#![forbid(unsafe_code)]

use wshd_handler_api::{Conn, Handler, Host, Message, SendError, export_handler, log, tracing};

/// The text that makes the handler close the connection after echoing it.
pub const GOODBYE: &str = "Goodbye";

/// The echo handler. Stateless.
pub struct Echo;

impl Handler for Echo {
    type ConnState = ();

    fn init(host: Host, _config: &str) -> Result<Self, String> {
        let (major, minor) = host.abi_version();
        log::info!("echo handler ready (host ABI {major}.{minor})");
        Ok(Echo)
    }

    fn open(&self, conn: Conn) -> Result<(), String> {
        tracing::debug!(conn = conn.id(), "echo: open");
        Ok(())
    }

    fn message(&self, _state: &mut (), conn: Conn, msg: Message<'_>) -> Result<(), String> {
        send_ok(conn.send(msg))?;
        if msg == Message::Text(GOODBYE) {
            send_ok(conn.close(1000, ""))?;
        }
        Ok(())
    }

    fn close(&self, _state: (), conn: Conn, code: u16, _reason: &str) {
        tracing::debug!(conn = conn.id(), code, "echo: closed");
    }
}

/// A closed connection is not an error (its `close` is on the way); anything
/// else (a full send queue) ends the connection with 1011.
fn send_ok(result: Result<(), SendError>) -> Result<(), String> {
    match result {
        Ok(()) | Err(SendError::Closed) => Ok(()),
        Err(e) => Err(format!("echo: {e}")),
    }
}

export_handler!(Echo);

#[cfg(test)]
mod tests {
    use super::*;
    use wshd_handler_api::testing::{CallError, Sent, TestHost, exported};

    #[test]
    fn echoes_text_and_binary() {
        let mut t = TestHost::<Echo>::init_exported("").unwrap();
        let c = t.open().unwrap();
        t.message(c, Message::Text("hi")).unwrap();
        t.message(c, Message::Binary(&[1, 2, 3])).unwrap();
        t.message(c, Message::Text("")).unwrap();
        assert_eq!(
            t.sent(c),
            [
                Sent::Text("hi".into()),
                Sent::Binary(vec![1, 2, 3]),
                Sent::Text("".into())
            ]
        );
        assert_eq!(t.close_request(c), None);
        assert!(t.logs_contain("echo handler ready"));
    }

    #[test]
    fn goodbye_is_echoed_then_closes_normally() {
        let mut t = TestHost::<Echo>::init("").unwrap();
        let c = t.open().unwrap();
        t.message(c, Message::Text(GOODBYE)).unwrap();
        assert_eq!(t.sent(c), [Sent::Text(GOODBYE.into())]);
        assert_eq!(t.close_request(c), Some((1000, String::new())));
        // Binary "Goodbye" is just echoed.
        let c2 = t.open().unwrap();
        t.message(c2, Message::Binary(GOODBYE.as_bytes())).unwrap();
        assert_eq!(t.close_request(c2), None);
    }

    #[test]
    fn full_send_queue_fails_the_connection() {
        let mut t = TestHost::<Echo>::init("").unwrap();
        let c = t.open().unwrap();
        t.set_send_error(Some(SendError::Backpressure));
        assert_eq!(t.message(c, Message::Text("x")), Err(CallError::HANDLER));
        assert!(t.logs_contain("echo: send queue full"));
    }

    #[test]
    fn descriptor() {
        let info = exported::<Echo>().unwrap();
        assert_eq!(info.name, "echo");
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(!info.may_block());
    }
}
