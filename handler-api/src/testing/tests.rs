//! Tests of the glue, through the fake host: every call below goes through
//! the `extern "C"` trampolines.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::abi::{WSHD_F_MAY_BLOCK, WSHD_F_PANIC_UNWIND, WSHD_F_RUST_SDK};
use crate::{HandshakeRequest, HandshakeResponse, export_handler};

/// A handler whose behaviour is chosen by its config and by the messages
/// it receives.
struct Probe {
    config: String,
    /// How many connection states were dropped.
    drops: Arc<AtomicUsize>,
    /// What `handshake` saw.
    seen: Mutex<Vec<String>>,
}

/// Counts its own drop.
struct State(Arc<AtomicUsize>);

impl Drop for State {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Handler for Probe {
    type ConnState = State;

    fn init(_host: Host, config: &str) -> Result<Self, String> {
        match config {
            "fail" => Err("probe: init refused".into()),
            "panic" => panic!("probe: init panicked"),
            _ => Ok(Probe {
                config: config.to_owned(),
                drops: Arc::default(),
                seen: Mutex::default(),
            }),
        }
    }

    fn handshake(
        &self,
        req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        let headers: Vec<String> = req.headers().map(|h| format!("{h:?}")).collect();
        self.seen.lock().unwrap().push(format!(
            "{} {} {:?} {} {:?} {}",
            req.path(),
            req.query(),
            req.origin(),
            req.remote_addr(),
            req.subprotocols().collect::<Vec<_>>(),
            headers.join("|"),
        ));
        match req.query() {
            "err" => Err("probe: bad handshake".into()),
            "panic" => panic!("probe: handshake panicked"),
            "reject" => resp.reject(403, "go away").map_err(|e| e.to_string()),
            // 4,200 bytes: byte 4096 falls inside a character.
            "euro" => resp
                .reject(403, &"€".repeat(1400))
                .map_err(|e| e.to_string()),
            "reject-then-more" => {
                resp.reject(403, "first").map_err(|e| e.to_string())?;
                let results = [
                    resp.reject(500, "second"),
                    resp.select_subprotocol(0),
                    resp.add_header("X-Late", "1"),
                ];
                let shown: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
                self.seen.lock().unwrap().push(shown.join(" "));
                Ok(())
            }
            "misuse" => {
                // Every misuse must come back as an error, never UB.
                let mut results = vec![
                    resp.select_subprotocol(7),
                    resp.add_header("Sec-WebSocket-Accept", "x"),
                    resp.add_header("Connection", "close"),
                    resp.add_header("bad name", "x"),
                    resp.reject(200, "not an error status"),
                ];
                results.push(resp.select_subprotocol(0));
                results.push(resp.select_subprotocol(0));
                let shown: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
                self.seen.lock().unwrap().push(shown.join(" "));
                Ok(())
            }
            _ => {
                if let Some(i) = req.subprotocol_index("chat.v2") {
                    resp.select_subprotocol(i).map_err(|e| e.to_string())?;
                }
                resp.add_header("X-Probe", "yes").map_err(|e| e.to_string())
            }
        }
    }

    fn open(&self, conn: Conn) -> Result<State, String> {
        if self.config == "fail_open" {
            return Err("probe: open refused".into());
        }
        conn.send_text("welcome").map_err(|e| e.to_string())?;
        Ok(State(self.drops.clone()))
    }

    fn message(&self, _state: &mut State, conn: Conn, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::Text("err") => Err("probe: message refused".into()),
            Message::Text("panic") => panic!("probe: message panicked"),
            Message::Text("log") => {
                log::warn!("via log {}", conn.id());
                tracing::info!(conn = conn.id(), "via tracing");
                log::trace!("trace level");
                Ok(())
            }
            Message::Text("close") => conn.close(4000, "probe bye").map_err(|e| e.to_string()),
            Message::Text("bad-close") => {
                let results = [
                    conn.close(999, ""),
                    conn.close(1005, ""),
                    conn.close(1000, &"x".repeat(124)),
                ];
                conn.send_text(&format!("{results:?}"))
                    .map_err(|e| e.to_string())
            }
            Message::Text("ping") => {
                conn.ping(b"p").map_err(|e| e.to_string())?;
                let too_long = conn.ping(&[0; 126]);
                conn.send_text(&format!("{too_long:?}"))
                    .map_err(|e| e.to_string())
            }
            Message::Text("send-elsewhere") => {
                let other = conn.host().conn(u64::MAX);
                conn.send_text(&format!("{:?}", other.send_text("x")))
                    .map_err(|e| e.to_string())
            }
            other => conn.send(other).map_err(|e| e.to_string()),
        }
    }

    fn close(&self, state: State, _conn: Conn, code: u16, reason: &str) {
        if reason == "panic" {
            panic!("probe: close panicked (code {code})");
        }
        drop(state);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.config == "panic_destroy" && !std::thread::panicking() {
            panic!("probe: destroy panicked");
        }
    }
}

export_handler!(Probe, version = "9.9.9", name = "probe", flags = MAY_BLOCK);

fn text(s: &str) -> Sent {
    Sent::Text(s.into())
}

#[test]
fn messages_go_through_the_trampolines() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    t.message(c, Message::Text("hi")).unwrap();
    t.message(c, Message::Binary(&[0, 1, 2])).unwrap();
    t.message(c, Message::Text("")).unwrap();
    assert_eq!(
        t.sent(c),
        [
            text("welcome"),
            text("hi"),
            Sent::Binary(vec![0, 1, 2]),
            text("")
        ]
    );
    assert_eq!(t.take_sent(c).len(), 4);
    assert!(t.sent(c).is_empty());
}

#[test]
fn err_is_logged_and_returned_as_handler_error() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    assert_eq!(t.message(c, Message::Text("err")), Err(CallError::HANDLER));
    let want = format!(
        "on_message failed for conn {}: probe: message refused",
        c.id()
    );
    assert!(
        t.logs()
            .iter()
            .any(|r| r.level == log::Level::Error && r.message == want),
        "{:?}",
        t.logs()
    );
    // The connection was closed with 1011 and its state freed.
    assert!(!t.is_open(c));
    assert_eq!(t.handler().drops.load(Ordering::SeqCst), 1);
}

#[test]
fn panic_returns_panic_status_logs_the_message_and_frees_the_state() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    assert_eq!(t.message(c, Message::Text("panic")), Err(CallError::PANIC));
    let logs = t.logs();
    let line = logs
        .iter()
        .find(|r| r.message.contains("probe: message panicked"))
        .expect("panic logged");
    assert_eq!(line.level, log::Level::Error);
    let prefix = format!("on_message for conn {} panicked at ", c.id());
    assert!(line.message.starts_with(&prefix), "{}", line.message);
    assert!(
        line.message.contains("src/testing/tests.rs:"),
        "{}",
        line.message
    );
    assert!(!line.message.contains('\n'));
    assert_eq!(t.handler().drops.load(Ordering::SeqCst), 1);
    // The instance keeps working for other connections.
    let c2 = t.open().unwrap();
    t.message(c2, Message::Text("still here")).unwrap();
    assert_eq!(t.sent(c2), [text("welcome"), text("still here")]);
}

#[test]
fn panic_in_close_is_caught_and_the_state_still_freed() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    t.close(c, 1000, "panic");
    assert_eq!(t.handler().drops.load(Ordering::SeqCst), 1);
    assert!(t.logs_contain("on_close for conn"));
    assert!(t.logs_contain("probe: close panicked (code 1000)"));
}

#[test]
fn init_errors_and_panics_map_to_status_codes() {
    let err = TestHost::<Probe>::init("fail").unwrap_err();
    assert_eq!(err.status, CallError::HANDLER);
    assert!(
        err.logs_contain("init failed: probe: init refused"),
        "{err}"
    );
    let err = TestHost::<Probe>::init("panic").unwrap_err();
    assert_eq!(err.status, CallError::PANIC);
    assert!(err.logs_contain("init panicked at "), "{err}");
    assert!(err.logs_contain("probe: init panicked"), "{err}");
}

#[test]
fn open_errors_close_without_on_close() {
    let mut t = TestHost::<Probe>::init("fail_open").unwrap();
    assert_eq!(t.open().unwrap_err(), CallError::HANDLER);
    assert!(t.logs_contain("on_open failed for conn"));
    assert_eq!(t.handler().drops.load(Ordering::SeqCst), 0);
}

#[test]
fn panic_in_destroy_is_caught_and_logged() {
    let t = TestHost::<Probe>::init("panic_destroy").unwrap();
    let logs = t.destroy();
    assert!(
        logs.iter()
            .any(|r| r.message.contains("destroy panicked at")),
        "{logs:?}"
    );
}

#[test]
fn log_and_tracing_reach_the_host() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    t.message(c, Message::Text("log")).unwrap();
    let logs = t.logs();
    let find = |needle: &str| logs.iter().find(|r| r.message.contains(needle)).cloned();
    let via_log = find("via log").expect("log record");
    assert_eq!(via_log.level, log::Level::Warn);
    assert!(
        via_log.target.starts_with("wshd_handler_api"),
        "{via_log:?}"
    );
    let via_tracing = find("via tracing").expect("tracing event");
    assert_eq!(via_tracing.level, log::Level::Info);
    assert!(
        via_tracing.message.contains(&format!("conn={}", c.id())),
        "{via_tracing:?}"
    );
    assert!(find("trace level").is_some(), "the test host logs at trace");
}

#[test]
fn handshake_views_and_response() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let req = Handshake::new("/probe?a=1")
        .origin("http://example.com")
        .subprotocols(["chat.v1", "chat.v2"])
        .header("X-Extra", "1")
        .remote_addr("10.0.0.1:5");
    let out = t.handshake(&req);
    assert!(out.accepted());
    assert_eq!(out.subprotocol.as_deref(), Some("chat.v2"));
    assert_eq!(out.headers, [("X-Probe".to_owned(), "yes".to_owned())]);
    let seen = t.handler().seen.lock().unwrap().pop().unwrap();
    assert!(
        seen.starts_with(r#"/probe a=1 Some("http://example.com") 10.0.0.1:5 ["chat.v1", "chat.v2"] Host: localhost|"#),
        "{seen}"
    );
    assert!(seen.contains(
        "Origin: http://example.com|Sec-WebSocket-Protocol: chat.v1, chat.v2|X-Extra: 1"
    ));

    let plain = t.handshake(&Handshake::new("/probe"));
    assert!(plain.accepted());
    assert_eq!(plain.subprotocol, None);
    let seen = t.handler().seen.lock().unwrap().pop().unwrap();
    assert!(
        seen.starts_with("/probe  None 127.0.0.1:40000 [] "),
        "{seen}"
    );
}

#[test]
fn handshake_rejections_errors_and_misuse() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let out = t.handshake(&Handshake::new("/p?reject"));
    assert!(!out.accepted());
    assert_eq!(out.status, Ok(()));
    assert_eq!(out.rejected, Some((403, "go away".into())));

    let out = t.handshake(&Handshake::new("/p?err"));
    assert_eq!(out.status, Err(CallError::HANDLER));
    assert!(t.logs_contain(&format!(
        "on_handshake failed for conn {}: probe: bad handshake",
        out.conn
    )));

    let out = t.handshake(&Handshake::new("/p?panic"));
    assert_eq!(out.status, Err(CallError::PANIC));
    assert!(t.logs_contain("probe: handshake panicked"));

    let out = t.handshake(&Handshake::new("/p?misuse").subprotocols(["a"]));
    assert_eq!(out.subprotocol.as_deref(), Some("a"));
    let seen = t.handler().seen.lock().unwrap().pop().unwrap();
    assert_eq!(
        seen,
        "Err(Invalid) Err(Invalid) Err(Invalid) Err(Invalid) Err(Invalid) Ok(()) Err(State)"
    );

    // The shared rules (crate::rules): a reject is final.
    let out = t.handshake(&Handshake::new("/p?reject-then-more").subprotocols(["a"]));
    assert_eq!(out.rejected, Some((403, "first".into())));
    assert_eq!(out.subprotocol, None);
    let seen = t.handler().seen.lock().unwrap().pop().unwrap();
    assert_eq!(seen, "Err(State) Err(State) Err(State)");

    let refused = t.connect(&Handshake::new("/p?reject")).unwrap_err();
    assert!(matches!(refused, Refused::Handshake(o) if o.rejected.is_some()));
    let c = t.connect(&Handshake::new("/p")).unwrap();
    assert_eq!(t.sent(c), [text("welcome")]);
}

#[test]
fn host_calls_report_errors() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    t.message(c, Message::Text("ping")).unwrap();
    assert_eq!(t.pings(c), [b"p".to_vec()]);
    t.message(c, Message::Text("bad-close")).unwrap();
    t.message(c, Message::Text("send-elsewhere")).unwrap();
    assert_eq!(
        t.take_sent(c),
        [
            text("welcome"),
            text("Err(Invalid)"),
            text("[Err(Invalid), Err(Invalid), Err(Invalid)]"),
            text("Err(Closed)"),
        ]
    );
    t.set_send_error(Some(SendError::Backpressure));
    assert_eq!(t.message(c, Message::Text("x")), Err(CallError::HANDLER));
    assert!(t.logs_contain("send queue full"));
}

#[test]
fn close_requests_and_sends_after_close_and_destroy() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    t.message(c, Message::Text("close")).unwrap();
    assert_eq!(t.close_request(c), Some((4000, "probe bye".into())));
    // After asking to close, sends fail.
    assert_eq!(c.send_text("late"), Err(SendError::Closed));
    t.close(c, 4000, "probe bye");
    assert_eq!(c.send_text("late"), Err(SendError::Closed));

    let kept = t.open().unwrap();
    let drops = t.handler().drops.clone();
    t.destroy();
    // destroy closed the remaining connection first.
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    assert_eq!(kept.send_text("after destroy"), Err(SendError::Revoked));
    assert_eq!(kept.host().conn(1).ping(b""), Err(SendError::Revoked));
}

#[test]
fn spawned_threads_log_to_their_host() {
    let t = TestHost::<Probe>::init("").unwrap();
    let handle = t
        .host()
        .spawn("probe-worker", || {
            log::info!("from the worker");
            panic!("worker panicked");
        })
        .unwrap();
    assert!(handle.join().is_err());
    assert!(t.logs_contain("from the worker"));
    let logs = t.logs();
    let panic = logs
        .iter()
        .find(|r| r.target == "panic")
        .expect("panic logged");
    assert!(
        panic
            .message
            .starts_with("thread 'probe-worker' panicked at "),
        "{panic:?}"
    );
    assert!(panic.message.ends_with("worker panicked"), "{panic:?}");
}

#[test]
fn raw_contract_violations_are_refused_not_ub() {
    let mut t = TestHost::<Probe>::init("").unwrap();
    let c = t.open().unwrap();
    let d = t.descriptor();
    let state = t.conns[&c.id()];
    let bad = [0xffu8, 0xfe];
    let on_message = d.on_message.unwrap();
    // SAFETY: live handler and state; the payloads are live
    // locals or null; the trampolines must refuse, not read, the bad ones.
    unsafe {
        assert_eq!(
            on_message(t.handler, state, c.id(), WSHD_MSG_TEXT, bad.as_ptr(), 2),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            on_message(t.handler, state, c.id(), 9, bad.as_ptr(), 2),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            on_message(
                t.handler,
                std::ptr::null_mut(),
                c.id(),
                WSHD_MSG_TEXT,
                bad.as_ptr(),
                0
            ),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            on_message(
                std::ptr::null_mut(),
                state,
                c.id(),
                WSHD_MSG_TEXT,
                bad.as_ptr(),
                0
            ),
            WSHD_ERR_INVALID
        );
        // (NULL, 0) is an empty text message.
        assert_eq!(
            on_message(t.handler, state, c.id(), WSHD_MSG_TEXT, std::ptr::null(), 0),
            WSHD_OK
        );
        let mut slot = std::ptr::null_mut();
        assert_eq!(
            d.init.unwrap()(std::ptr::null(), wshd_str::EMPTY, &mut slot),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            d.init.unwrap()(t.table, wshd_str::EMPTY, std::ptr::null_mut()),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            d.init.unwrap()(t.table, wshd_str::from_bytes(&bad), &mut slot),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            d.on_open.unwrap()(t.handler, 5, std::ptr::null_mut()),
            WSHD_ERR_INVALID
        );
        assert_eq!(
            d.on_handshake.unwrap()(t.handler, std::ptr::null(), std::ptr::null_mut()),
            WSHD_ERR_INVALID
        );
        // A host table from an older, smaller ABI is refused.
        let small = wshd_host_api {
            struct_size: 8,
            ..std::ptr::read(t.table)
        };
        assert_eq!(
            d.init.unwrap()(&small, wshd_str::EMPTY, &mut slot),
            WSHD_ERR_UNSUPPORTED
        );
        assert!(slot.is_null());
    }
    assert!(t.logs_contain("is not valid UTF-8"));
    assert!(t.logs_contain("unknown message kind 9"));
    assert_eq!(t.sent(c), [text("welcome"), text("")]);
}

#[test]
fn exported_descriptor_is_valid() {
    let info = exported::<Probe>().unwrap();
    assert_eq!(info.name, "probe");
    assert_eq!(info.version, "9.9.9");
    assert!(info.may_block());
    assert_eq!(
        info.flags,
        WSHD_F_MAY_BLOCK | WSHD_F_PANIC_UNWIND | WSHD_F_RUST_SDK
    );
    assert!(
        info.build_info.starts_with("wshd-handler-api 0."),
        "{}",
        info.build_info
    );
    assert!(info.build_info.contains("rustc "), "{}", info.build_info);
    // The exported symbol returns the same static descriptor.
    unsafe extern "C" {
        fn wshd_entry_v1() -> *const wshd_descriptor;
    }
    // SAFETY: export_handler! defined the symbol with this signature above.
    let entry = unsafe { wshd_entry_v1() };
    assert!(std::ptr::eq(entry, <Probe as Exported>::descriptor()));

    let mut t = TestHost::<Probe>::init_exported("").unwrap();
    let c = t.open().unwrap();
    t.message(c, Message::Text("x")).unwrap();
    assert_eq!(t.sent(c), [text("welcome"), text("x")]);

    // A descriptor without PANIC_UNWIND (what panic = "abort" produced) is
    // refused, and so is a bad magic.
    let abort = Export::<Probe>::new("x_wsh", "1", false).build();
    assert!(validate_descriptor(&abort).unwrap_err().contains("panic"));
    let mut bad = Export::<Probe>::new("x_wsh", "1", true).build();
    bad.magic = 0;
    assert!(validate_descriptor(&bad).is_err());
    assert_eq!(Export::<Probe>::new("x_wsh", "1", true).build().name.len, 1);

    // As on the server: flags this ABI does not define are ignored (a newer
    // minor may add some), and descriptor strings are capped.
    let mut newer = Export::<Probe>::new("x_wsh", "1", true).build();
    newer.flags |= 1 << 31;
    assert_eq!(validate_descriptor(&newer), Ok(()));
    let long: &'static str = Box::leak("v".repeat(4097).into_boxed_str());
    let mut long_version = Export::<Probe>::new("x_wsh", "1", true).build();
    long_version.version = wshd_str::from_str(long);
    assert!(
        validate_descriptor(&long_version)
            .unwrap_err()
            .contains("version is 4097 bytes (at most 4096)")
    );
}

#[test]
fn a_reject_body_is_cut_on_a_character_boundary() {
    // Issue #12: String::truncate(4096) inside the server's hs_reject
    // panicked in an extern "C" fn on this body and aborted the server.
    let mut t = TestHost::<Probe>::init("").unwrap();
    let out = t.handshake(&Handshake::new("/p?euro"));
    let (status, body) = out.rejected.expect("rejected");
    assert_eq!(status, 403);
    assert_eq!(body, "€".repeat(1365));
}
