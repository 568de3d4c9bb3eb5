//! `origin_check`: accepts a WebSocket only from allowed origins and
//! negotiates a subprotocol, like pywebsocket's `origin_check_wsh.py`; then
//! echoes every message.
//!
//! In the opening handshake:
//! * if `allowed_origins` is configured: no `Origin` header, or one not
//!   listed (exact `scheme://host[:port]` match; `"null"` may be listed) →
//!   HTTP 403, with a body naming the origin. Without `allowed_origins` any
//!   Origin (or none) is accepted, and only the subprotocol is negotiated;
//! * the client offered subprotocols → the first entry of `subprotocols`
//!   (the server's preference order) that the client offered is selected;
//!   if none matches → HTTP 400 naming both lists;
//! * the client offered none → accepted without a subprotocol.
//!
//! Build: `cargo build --release -p origin-check-handler` →
//! `target/release/liborigin_check_wsh.so` (serves the handler named
//! `origin_check`).
//!
//! Enable it with a route whose config lists the origins and the
//! subprotocols (both optional):
//!
//! ```toml
//! [[route]]
//! path = "/origin_check"
//! handler = "origin_check"
//! [route.config]
//! allowed_origins = ["http://localhost:8080", "https://example.com"]
//! subprotocols = ["chat.v2", "chat.v1"]
//! ```
#![forbid(unsafe_code)]

use serde::Deserialize;
use wshd_handler_api::{
    Conn, Handler, HandshakeRequest, HandshakeResponse, Host, Message, SendError, export_handler,
    log,
};

/// The route config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Exact origins to accept; `None`: any.
    allowed_origins: Option<Vec<String>>,
    /// Supported subprotocols, most preferred first.
    #[serde(default)]
    subprotocols: Vec<String>,
}

/// The origin-checking echo handler.
pub struct OriginCheck {
    /// `None`: no origin check.
    allowed_origins: Option<Vec<String>>,
    subprotocols: Vec<String>,
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

impl Handler for OriginCheck {
    type ConnState = ();

    fn init(_host: Host, config: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(config)
            .map_err(|e| format!("origin_check: bad route config: {}", e.message().trim()))?;
        let origins = match &config.allowed_origins {
            None => "any (allowed_origins not set)".to_owned(),
            Some(allowed) if allowed.is_empty() => {
                log::warn!("origin_check: allowed_origins is empty: every handshake is rejected");
                "(none)".to_owned()
            }
            Some(allowed) => allowed.join(", "),
        };
        log::info!(
            "origin_check ready: origins {origins}; subprotocols {}",
            list(&config.subprotocols)
        );
        Ok(OriginCheck {
            allowed_origins: config.allowed_origins,
            subprotocols: config.subprotocols,
        })
    }

    fn handshake(
        &self,
        req: &HandshakeRequest<'_>,
        resp: &mut HandshakeResponse<'_>,
    ) -> Result<(), String> {
        let refuse = |resp: &mut HandshakeResponse<'_>, status: u16, body: String| {
            log::info!(
                "origin_check: refused {} with {status}: {body}",
                req.remote_addr()
            );
            resp.reject(status, &body).map_err(|e| e.to_string())
        };
        if let Some(allowed) = &self.allowed_origins {
            let Some(origin) = req.origin() else {
                return refuse(resp, 403, "origin_check: no Origin header".to_owned());
            };
            if !allowed.iter().any(|a| a == origin) {
                let body = format!("origin_check: origin {origin} is not allowed");
                return refuse(resp, 403, body);
            }
        }
        if req.subprotocols().len() == 0 {
            return Ok(());
        }
        for preferred in &self.subprotocols {
            if let Some(index) = req.subprotocol_index(preferred) {
                return resp.select_subprotocol(index).map_err(|e| e.to_string());
            }
        }
        let offered: Vec<&str> = req.subprotocols().collect();
        refuse(
            resp,
            400,
            format!(
                "origin_check: none of the offered subprotocols ({}) is supported; supported: {}",
                offered.join(", "),
                list(&self.subprotocols)
            ),
        )
    }

    fn open(&self, _conn: Conn) -> Result<(), String> {
        Ok(())
    }

    fn message(&self, _state: &mut (), conn: Conn, msg: Message<'_>) -> Result<(), String> {
        match conn.send(msg) {
            Ok(()) | Err(SendError::Closed) => Ok(()),
            Err(e) => Err(format!("origin_check: {e}")),
        }
    }
}

export_handler!(OriginCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use wshd_handler_api::testing::{Handshake, Sent, TestHost, exported};

    const CONFIG: &str = r#"
allowed_origins = ["http://example.com", "https://example.com:8443", "null"]
subprotocols = ["chat.v2", "chat.v1"]
"#;

    fn host() -> TestHost<OriginCheck> {
        TestHost::init_exported(CONFIG).unwrap()
    }

    fn from(origin: &str) -> Handshake {
        Handshake::new("/origin_check").origin(origin)
    }

    #[test]
    fn allowed_origin_without_subprotocols_is_accepted() {
        let mut t = host();
        for origin in ["http://example.com", "https://example.com:8443", "null"] {
            let out = t.handshake(&from(origin));
            assert!(out.accepted(), "{origin}: {out:?}");
            assert_eq!(out.subprotocol, None);
        }
    }

    #[test]
    fn missing_or_unknown_origin_is_403() {
        let mut t = host();
        let out = t.handshake(&Handshake::new("/origin_check"));
        assert_eq!(
            out.rejected,
            Some((403, "origin_check: no Origin header".into()))
        );
        for origin in [
            "http://evil.example",
            "http://example.com:80",
            "https://example.com",
            "HTTP://EXAMPLE.COM",
        ] {
            let out = t.handshake(&from(origin));
            assert_eq!(
                out.rejected,
                Some((403, format!("origin_check: origin {origin} is not allowed")))
            );
        }
        assert!(t.logs_contain("refused 127.0.0.1:40000 with 403"));
    }

    #[test]
    fn the_servers_preference_wins() {
        let mut t = host();
        let out = t.handshake(&from("http://example.com").subprotocols(["chat.v1", "chat.v2"]));
        assert!(out.accepted());
        assert_eq!(out.subprotocol.as_deref(), Some("chat.v2"));
        let out = t.handshake(&from("http://example.com").subprotocols(["x", "chat.v1"]));
        assert_eq!(out.subprotocol.as_deref(), Some("chat.v1"));
    }

    #[test]
    fn no_common_subprotocol_is_400() {
        let mut t = host();
        let out = t.handshake(&from("http://example.com").subprotocols(["chat.v3", "mqtt"]));
        assert_eq!(
            out.rejected,
            Some((
                400,
                "origin_check: none of the offered subprotocols (chat.v3, mqtt) is supported; supported: chat.v2, chat.v1"
                    .into()
            ))
        );
        // The origin is checked first.
        let out = t.handshake(&from("http://evil.example").subprotocols(["chat.v2"]));
        assert_eq!(out.rejected.map(|r| r.0), Some(403));
    }

    #[test]
    fn without_configured_subprotocols_any_offer_is_refused() {
        let mut t = TestHost::<OriginCheck>::init("allowed_origins = [\"null\"]").unwrap();
        assert!(t.handshake(&from("null")).accepted());
        let out = t.handshake(&from("null").subprotocols(["a"]));
        assert_eq!(out.rejected.map(|r| r.0), Some(400));
    }

    #[test]
    fn accepted_connections_echo() {
        let mut t = host();
        let c = t.connect(&from("http://example.com")).unwrap();
        t.message(c, Message::Text("hi")).unwrap();
        t.message(c, Message::Binary(&[7])).unwrap();
        assert_eq!(t.sent(c), [Sent::Text("hi".into()), Sent::Binary(vec![7])]);
    }

    #[test]
    fn without_allowed_origins_any_origin_passes() {
        let mut t = TestHost::<OriginCheck>::init("subprotocols = [\"alpha\"]").unwrap();
        assert!(t.logs_contain("origins any (allowed_origins not set)"));
        assert!(t.handshake(&Handshake::new("/oc")).accepted());
        let out = t.handshake(&from("http://anything.example").subprotocols(["beta", "alpha"]));
        assert_eq!(out.subprotocol.as_deref(), Some("alpha"));
        // No config at all: an echo that accepts handshakes without subprotocols.
        let mut t = TestHost::<OriginCheck>::init("").unwrap();
        assert!(t.handshake(&Handshake::new("/oc")).accepted());
        let out = t.handshake(&Handshake::new("/oc").subprotocols(["x"]));
        assert_eq!(out.rejected.map(|r| r.0), Some(400));
    }

    #[test]
    fn config_errors_fail_init() {
        let err = TestHost::<OriginCheck>::init("allowed_origins = []\nfoo = 1").unwrap_err();
        assert!(err.logs_contain("unknown field `foo`"), "{err}");
        let err = TestHost::<OriginCheck>::init("allowed_origins = \"x\"").unwrap_err();
        assert!(err.logs_contain("bad route config"), "{err}");
    }

    #[test]
    fn descriptor() {
        assert_eq!(exported::<OriginCheck>().unwrap().name, "origin_check");
    }
}
