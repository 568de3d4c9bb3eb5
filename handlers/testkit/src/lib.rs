//! `testkit`: a deliberately misbehaving handler for the server's
//! integration tests. Not for production routes.
//!
//! Route config keys (both default to `false`):
//! * `fail_init = true`: `init` returns the error `testkit: fail_init requested`;
//! * `panic_init = true`: `init` panics with `testkit: panic_init requested`.
//!
//! Text messages:
//! * `panic`: panics inside `message` (`testkit: panic requested`); the
//!   server then closes the connection with 1011;
//! * `error`: returns the error `testkit: error requested` (also 1011);
//! * `spawn-late-send`: replies `spawned`, then starts a thread that waits
//!   until this connection has closed (at most 10 s), sends `late` and logs
//!   `late send after close -> Err(Closed)` (the result, at info). The
//!   thread is joined when the instance is destroyed;
//! * `block <ms>`: sleeps that long inside `message`, on the worker thread
//!   (testkit does not declare `MAY_BLOCK`), then replies `woke`: the
//!   blocked callback other connections must not wait for;
//! * anything else, text or binary, is echoed.
//!
//! Handshake queries (for the server's rules on rejects and logs):
//! * `?reject_euro=N`: rejects with 403 and a body of N bytes of `€`
//!   (rounded down to whole characters);
//! * `?reject=TEXT`: rejects with 403 and TEXT, percent-decoded, as the body
//!   (so a test can put control bytes in a body the server logs);
//! * `?client_cert`: answers with the response headers `x-seen-subject` and
//!   `x-seen-san` holding the request's `wshd-client-subject` and
//!   `wshd-client-san` (the verified TLS client certificate), or `(none)`.
//! * `?auth`: answers with `x-seen-auth-sub`, `x-seen-auth-claims`,
//!   `x-seen-authorization` (the `wshd-auth-sub`, `wshd-auth-claims` and
//!   `Authorization` headers it was given, or `(none)`) and `x-seen-query`
//!   (the query it was given), for the `[route.auth]` tests.
//! * `?fail_handshake`: the handshake callback fails, which the server
//!   answers with 500 (for the rollout's `max_5xx_handshakes`).
//!
//! Build: `cargo build -p testkit-handler` → `target/debug/libtestkit_wsh.so`
//! (serves the handler named `testkit`).
//!
//! Enable it with a route in the server config, e.g.
//!
//! ```toml
//! [[route]]
//! path = "/testkit"
//! handler = "testkit"
//! [route.config]
//! fail_init = false
//! ```
#![forbid(unsafe_code)]

use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use wshd_handler_api::{
    Conn, Handler, HandshakeRequest, HandshakeResponse, Host, Message, SendError, export_handler,
    log,
};

/// How long a late-send thread waits for its connection to close.
pub const LATE_SEND_WAIT: Duration = Duration::from_secs(10);

/// The misbehaving handler.
pub struct Testkit {
    host: Host,
    /// Late-send threads; joined in `Drop`, as the contract requires.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Per-connection state.
#[derive(Default)]
pub struct TestkitConn {
    /// One sender per late-send thread. Dropping the state when the
    /// connection closes disconnects them, which wakes the threads.
    closed_signals: Vec<mpsc::Sender<()>>,
}

/// `fail_init` and `panic_init` from the route config.
fn parse_config(config: &str) -> Result<(bool, bool), String> {
    let (mut fail_init, mut panic_init) = (false, false);
    for line in config.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("testkit: cannot read config line `{line}`"))?;
        let value = match value.split('#').next().unwrap_or("").trim() {
            "true" => true,
            "false" => false,
            other => {
                return Err(format!(
                    "testkit: `{}` must be true or false, not `{other}`",
                    key.trim()
                ));
            }
        };
        match key.trim() {
            "fail_init" => fail_init = value,
            "panic_init" => panic_init = value,
            other => {
                return Err(format!(
                    "testkit: unknown config key `{other}` (known: fail_init, panic_init)"
                ));
            }
        }
    }
    Ok((fail_init, panic_init))
}

impl Testkit {
    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_late_send(&self, state: &mut TestkitConn, conn: Conn) -> Result<(), String> {
        let (signal, closed) = mpsc::channel::<()>();
        state.closed_signals.push(signal);
        let thread = self
            .host
            .spawn(format!("testkit-late-{}", conn.id()), move || {
                // Nothing is ever sent: recv returns when the state is dropped
                // (the connection closed) or after the bounded wait.
                let _ = closed.recv_timeout(LATE_SEND_WAIT);
                let result = conn.send_text("late");
                log::info!("late send after close -> {:?}", result);
            })
            .map_err(|e| format!("testkit: cannot start a thread: {e}"))?;
        let mut threads = self.threads();
        // Join the threads that already finished, so the list stays short.
        let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
        *threads = running;
        threads.push(thread);
        drop(threads);
        for t in done {
            let _ = t.join();
        }
        Ok(())
    }
}

impl Handler for Testkit {
    type ConnState = TestkitConn;

    fn init(host: Host, config: &str) -> Result<Self, String> {
        let (fail_init, panic_init) = parse_config(config)?;
        if panic_init {
            panic!("testkit: panic_init requested");
        }
        if fail_init {
            return Err("testkit: fail_init requested".into());
        }
        log::info!("testkit ready");
        Ok(Testkit {
            host,
            threads: Mutex::default(),
        })
    }

    fn handshake(
        &self,
        req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        for pair in req.query().split('&') {
            if pair == "auth" {
                // What a `[route.auth]` route lets the handler see: the
                // verified claims, and neither the token nor its header.
                for (from, to) in [
                    ("wshd-auth-sub", "x-seen-auth-sub"),
                    ("wshd-auth-claims", "x-seen-auth-claims"),
                    ("authorization", "x-seen-authorization"),
                ] {
                    let v = req.header(from).map(String::from_utf8_lossy);
                    resp.add_header(to, v.as_deref().unwrap_or("(none)"))
                        .map_err(|e| e.to_string())?;
                }
                resp.add_header("x-seen-query", req.query())
                    .map_err(|e| e.to_string())?;
                continue;
            }
            if pair == "client_cert" {
                for (from, to) in [
                    ("wshd-client-subject", "x-seen-subject"),
                    ("wshd-client-san", "x-seen-san"),
                ] {
                    let v = req.header(from).map(String::from_utf8_lossy);
                    resp.add_header(to, v.as_deref().unwrap_or("(none)"))
                        .map_err(|e| e.to_string())?;
                }
                continue;
            }
            let body = match pair.split_once('=') {
                Some(("reject_euro", n)) => {
                    let n: usize = n.parse().map_err(|_| format!("testkit: bad {pair}"))?;
                    "€".repeat(n / 3)
                }
                Some(("reject", text)) => percent_decode(text),
                None if pair == "fail_handshake" => {
                    return Err("testkit: asked to fail the handshake".into());
                }
                _ => continue,
            };
            return resp.reject(403, &body).map_err(|e| e.to_string());
        }
        Ok(())
    }

    fn open(&self, _conn: Conn) -> Result<TestkitConn, String> {
        Ok(TestkitConn::default())
    }

    fn message(&self, state: &mut TestkitConn, conn: Conn, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::Text("panic") => panic!("testkit: panic requested"),
            Message::Text("error") => Err("testkit: error requested".into()),
            Message::Text("spawn-late-send") => {
                send_ok(conn.send_text("spawned"))?;
                self.spawn_late_send(state, conn)
            }
            Message::Text(t) if t.starts_with("block ") => {
                let ms: u64 = t[6..]
                    .trim()
                    .parse()
                    .map_err(|_| format!("testkit: bad `{t}`"))?;
                std::thread::sleep(Duration::from_millis(ms.min(60_000)));
                send_ok(conn.send_text("woke"))
            }
            other => send_ok(conn.send(other)),
        }
    }
}

/// `%XX` escapes decoded (invalid UTF-8 replaced); other bytes kept.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn send_ok(result: Result<(), SendError>) -> Result<(), String> {
    match result {
        Ok(()) | Err(SendError::Closed) => Ok(()),
        Err(e) => Err(format!("testkit: {e}")),
    }
}

impl Drop for Testkit {
    fn drop(&mut self) {
        for thread in self.threads().drain(..) {
            let _ = thread.join();
        }
    }
}

export_handler!(Testkit);

#[cfg(test)]
mod tests {
    use super::*;
    use wshd_handler_api::testing::{CallError, Sent, TestHost, exported};

    #[test]
    fn init_can_fail_or_panic() {
        let err = TestHost::<Testkit>::init_exported("fail_init = true").unwrap_err();
        assert_eq!(err.status, CallError::HANDLER);
        assert!(
            err.logs_contain("init failed: testkit: fail_init requested"),
            "{err}"
        );
        let err = TestHost::<Testkit>::init_exported("panic_init = true\n").unwrap_err();
        assert_eq!(err.status, CallError::PANIC);
        assert!(err.logs_contain("testkit: panic_init requested"), "{err}");
        assert!(TestHost::<Testkit>::init("fail_init = false\npanic_init = false").is_ok());
        let err = TestHost::<Testkit>::init("fail_init = yes").unwrap_err();
        assert!(
            err.logs_contain("testkit: `fail_init` must be true or false, not `yes`"),
            "{err}"
        );
    }

    #[test]
    fn panic_and_error_fail_the_connection() {
        let mut t = TestHost::<Testkit>::init_exported("").unwrap();
        let c = t.open().unwrap();
        assert_eq!(t.message(c, Message::Text("panic")), Err(CallError::PANIC));
        assert!(t.logs_contain("testkit: panic requested"));
        assert!(!t.is_open(c));
        let c = t.open().unwrap();
        assert_eq!(
            t.message(c, Message::Text("error")),
            Err(CallError::HANDLER)
        );
        assert!(t.logs_contain("testkit: error requested"));
    }

    #[test]
    fn other_messages_echo() {
        let mut t = TestHost::<Testkit>::init("").unwrap();
        let c = t.open().unwrap();
        t.message(c, Message::Text("hello")).unwrap();
        t.message(c, Message::Binary(b"panic")).unwrap();
        assert_eq!(
            t.sent(c),
            [Sent::Text("hello".into()), Sent::Binary(b"panic".to_vec())]
        );
    }

    #[test]
    fn late_send_after_close_gets_closed_and_the_thread_is_joined() {
        let mut t = TestHost::<Testkit>::init("").unwrap();
        let c = t.open().unwrap();
        t.message(c, Message::Text("spawn-late-send")).unwrap();
        assert_eq!(t.sent(c), [Sent::Text("spawned".into())]);
        let started = std::time::Instant::now();
        t.close(c, 1000, "");
        // destroy joins the thread, so its log line is there afterwards.
        let logs = t.destroy();
        assert!(
            started.elapsed() < LATE_SEND_WAIT,
            "the thread woke up on close"
        );
        let line = logs
            .iter()
            .find(|r| r.message.starts_with("late send"))
            .expect("late send logged");
        assert_eq!(line.message, "late send after close -> Err(Closed)");
        assert_eq!(line.level, log::Level::Info);
    }

    #[test]
    fn handshake_rejects_on_request() {
        use wshd_handler_api::testing::Handshake;
        let mut t = TestHost::<Testkit>::init("").unwrap();
        assert!(t.handshake(&Handshake::new("/t")).accepted());
        let out = t.handshake(&Handshake::new("/t?x=1&reject=a%0Ab%1b%zz"));
        assert_eq!(out.rejected, Some((403, "a\nb\x1b%zz".into())));
        let out = t.handshake(&Handshake::new("/t?reject_euro=4200"));
        // The host keeps 4096 bytes at most, cut on a character boundary.
        assert_eq!(out.rejected, Some((403, "€".repeat(1365))));
    }

    #[test]
    fn descriptor() {
        assert_eq!(exported::<Testkit>().unwrap().name, "testkit");
    }
}
