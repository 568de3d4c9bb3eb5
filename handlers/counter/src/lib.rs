//! `counter`: answers each text message `T` with `"N: T"`, where N counts
//! that connection's messages (1, 2, 3, ...). Binary messages count too and
//! are answered with the text `"N: <len> bytes"`.
//!
//! It supports connection handover (ABI 1.2): when a new version of the
//! file is installed, every open connection moves to it between two
//! messages and N goes on where it was; the client notices nothing.
//!
//! Build: `cargo build --release -p counter-handler` →
//! `target/release/libcounter_wsh.so` (serves the handler named `counter`).
//!
//! Route config keys (`[route.config]`), each optional:
//!
//! * `state_format = "v1"`: export the state as version 1 did, a bare
//!   little-endian `u64` count. The default, `"v2"`, exports JSON
//!   `{"count": N, "started_at": UNIX_SECONDS}`. `import` accepts both,
//!   which is how a version converts the state format of the one before
//!   it (see README.md).
//! * `refuse_import = true`: refuse every handed-over connection (they stay
//!   on the old version and drain), to show and test that path.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wshd_handler_api::{
    Conn, Handler, Handover, Host, Message, SendError, export_handler, handover,
};

/// How `export` writes the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// Version 1: the count as 8 little-endian bytes.
    V1,
    /// Version 2: JSON `{count, started_at}`.
    V2,
}

/// The counter handler.
pub struct Counter {
    format: StateFormat,
    refuse_import: bool,
}

/// One connection's state (the version 2 format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Messages answered so far.
    pub count: u64,
    /// When the connection opened (Unix seconds), kept across versions.
    pub started_at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads one `key = value` line of the route config (TOML text); enough for
/// this handler's two flat keys.
fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

impl Handler for Counter {
    type ConnState = State;

    fn init(_host: Host, config: &str) -> Result<Self, String> {
        let format = match config_value(config, "state_format") {
            None | Some("v2") => StateFormat::V2,
            Some("v1") => StateFormat::V1,
            Some(other) => {
                return Err(format!(
                    "counter: state_format = {other:?} is unknown; use \"v1\" or \"v2\""
                ));
            }
        };
        let refuse_import = match config_value(config, "refuse_import") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(format!(
                    "counter: refuse_import = {other} is not a boolean; use true or false"
                ));
            }
        };
        Ok(Counter {
            format,
            refuse_import,
        })
    }

    fn open(&self, _conn: Conn) -> Result<State, String> {
        Ok(State {
            count: 0,
            started_at: now(),
        })
    }

    fn message(&self, state: &mut State, conn: Conn, msg: Message<'_>) -> Result<(), String> {
        state.count += 1;
        let reply = match msg {
            Message::Text(t) => format!("{}: {t}", state.count),
            Message::Binary(b) => format!("{}: {} bytes", state.count, b.len()),
        };
        match conn.send_text(&reply) {
            Ok(()) | Err(SendError::Closed) => Ok(()),
            Err(e) => Err(format!("counter: {e}")),
        }
    }
}

impl Handover for Counter {
    fn export(&self, state: &State) -> Vec<u8> {
        match self.format {
            StateFormat::V1 => state.count.to_le_bytes().to_vec(),
            StateFormat::V2 => handover::to_bytes(state),
        }
    }

    /// Accepts both formats: version 1's bare count (8 bytes; the start
    /// time was not kept, so it becomes now) and version 2's JSON.
    fn import(&self, _conn: Conn, data: &[u8]) -> Result<State, String> {
        if self.refuse_import {
            return Err("counter: refuse_import is set".into());
        }
        if let Ok(v1) = <[u8; 8]>::try_from(data) {
            return Ok(State {
                count: u64::from_le_bytes(v1),
                started_at: now(),
            });
        }
        handover::from_bytes(data)
    }
}

export_handler!(Counter, handover);

#[cfg(test)]
mod tests {
    use super::*;
    use wshd_handler_api::testing::{Sent, TestHost};

    fn texts(sent: Vec<Sent>) -> Vec<String> {
        sent.into_iter()
            .map(|s| match s {
                Sent::Text(t) => t,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn counts_per_connection() {
        let mut h = TestHost::<Counter>::init("").unwrap();
        let (a, b) = (h.open().unwrap(), h.open().unwrap());
        h.message(a, Message::Text("x")).unwrap();
        h.message(a, Message::Text("y")).unwrap();
        h.message(b, Message::Binary(b"abc")).unwrap();
        assert_eq!(texts(h.take_sent(a)), ["1: x", "2: y"]);
        assert_eq!(texts(h.take_sent(b)), ["1: 3 bytes"]);
    }

    #[test]
    fn handover_continues_the_count_from_either_format() {
        for config in ["state_format = \"v1\"", "state_format = \"v2\""] {
            let mut old = TestHost::<Counter>::init_handover(config).unwrap();
            let mut new = TestHost::<Counter>::init_handover("").unwrap();
            let c = old.open().unwrap();
            old.message(c, Message::Text("a")).unwrap();
            old.message(c, Message::Text("b")).unwrap();
            let started = old.state(c).unwrap().started_at;
            let c2 = old.hand_over(c, &mut new, 1 << 20).unwrap();
            assert!(!old.is_open(c), "moved out of the old version");
            new.message(c2, Message::Text("c")).unwrap();
            assert_eq!(texts(new.take_sent(c2)), ["3: c"], "{config}");
            if config.contains("v2") {
                assert_eq!(new.state(c2).unwrap().started_at, started);
            }
        }
    }

    #[test]
    fn a_refused_or_oversized_handover_leaves_the_connection_where_it_was() {
        let mut old = TestHost::<Counter>::init_handover("").unwrap();
        let mut picky = TestHost::<Counter>::init_handover("refuse_import = true").unwrap();
        let c = old.open().unwrap();
        old.message(c, Message::Text("a")).unwrap();
        assert!(old.hand_over(c, &mut picky, 1 << 20).is_err());
        assert!(old.hand_over(c, &mut picky, 4).is_err(), "over the cap");
        assert!(old.is_open(c));
        old.message(c, Message::Text("b")).unwrap();
        assert_eq!(texts(old.take_sent(c)), ["1: a", "2: b"]);
    }

    #[test]
    fn an_unknown_state_format_is_refused() {
        let mut h = TestHost::<Counter>::init_handover("").unwrap();
        let conn = h.open().unwrap();
        let c = Counter {
            format: StateFormat::V2,
            refuse_import: false,
        };
        assert!(c.import(conn, b"not a state").is_err());
        assert_eq!(c.import(conn, &5u64.to_le_bytes()).unwrap().count, 5);
    }
}
