//! The ABI rules a host enforces, in one place: which response headers a
//! handler may add, how a subprotocol is chosen, what a reject does, the
//! caps, and which descriptor flags are acceptable.
//!
//! The server (`hs_*` host functions and the loader) and the fake host of the
//! `testing` feature both call this module, so a handler's unit tests see
//! exactly the answers the server gives. It is safe, pure code: the hosts do
//! the pointer work and hand it byte slices. The rules are explained, with
//! the reasons, in the [contract](crate::contract) ("The handshake answer").

use crate::abi::{WSHD_ERR_INVALID, WSHD_ERR_STATE, WSHD_F_PANIC_UNWIND, WSHD_F_RUST_SDK};

/// Response headers one handshake may add; the next `hs_add_header` gets
/// `WSHD_ERR_STATE`. Bounds what one handler call can make the host hold
/// and send.
pub const MAX_RESPONSE_HEADERS: usize = 32;

/// Bytes of a reject body the host keeps; longer bodies are cut at the last
/// whole UTF-8 character at or before this many bytes.
pub const MAX_REJECT_BODY: usize = 4096;

/// Bytes allowed in each descriptor string (`name`, `version`,
/// `build_info`); a longer one makes the library fail to load.
pub const MAX_DESCRIPTOR_STRING: usize = 4096;

/// Response header names a handler may not add (lower case), besides every
/// `sec-websocket-*` name: the server owns the upgrade and the framing, and
/// hop-by-hop headers (RFC 9110 §7.6.1, plus the proxy ones of RFC 2616
/// §13.5.1) describe the server's connection, not the handler's answer.
pub const REFUSED_HEADERS: [&str; 10] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why a handshake call was refused; [`RuleError::status`] is what the
/// host function returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleError {
    /// `WSHD_ERR_INVALID`: the arguments are wrong whatever the state.
    Invalid,
    /// `WSHD_ERR_STATE`: the call is not allowed any more in this handshake.
    State,
}

impl RuleError {
    /// The `WSHD_ERR_*` status for this error.
    pub fn status(self) -> i32 {
        match self {
            RuleError::Invalid => WSHD_ERR_INVALID,
            RuleError::State => WSHD_ERR_STATE,
        }
    }
}

/// The answer a handler builds in `on_handshake`, starting as "accept, no
/// subprotocol, no extra headers". The handler changes it only through the
/// three methods, which apply the rules; the host reads the fields
/// afterwards (and may set `reject` itself, e.g. when the callback failed).
///
/// The state machine: once [`reject`](Self::reject) succeeded, the answer
/// is final and every later call gets [`RuleError::State`]. A subprotocol
/// is chosen at most once. At most [`MAX_RESPONSE_HEADERS`] headers.
/// State errors are reported before argument errors: a call that is not
/// allowed any more is refused as such, whatever its arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandshakeAnswer {
    /// How many subprotocols the client offered (valid indexes are below).
    pub n_offered: usize,
    /// The chosen subprotocol: an index into the offer.
    pub selected: Option<usize>,
    /// Headers to add to the 101, as the handler spelled them.
    pub headers: Vec<(String, String)>,
    /// `(HTTP status, body)` if the upgrade is refused.
    pub reject: Option<(u16, String)>,
}

impl HandshakeAnswer {
    /// A fresh answer for a request offering `n_offered` subprotocols.
    pub fn new(n_offered: usize) -> HandshakeAnswer {
        HandshakeAnswer {
            n_offered,
            ..HandshakeAnswer::default()
        }
    }

    /// `hs_select_subprotocol`: accept the offered subprotocol at `index`.
    /// At most once, even with the same index: a second call means the
    /// handler's logic ran twice, which the contract calls a bug.
    pub fn select_subprotocol(&mut self, index: usize) -> Result<(), RuleError> {
        if self.reject.is_some() || self.selected.is_some() {
            return Err(RuleError::State);
        }
        if index >= self.n_offered {
            return Err(RuleError::Invalid);
        }
        self.selected = Some(index);
        Ok(())
    }

    /// `hs_add_header`: add a response header to the 101. The name must be
    /// an HTTP token and not refused ([`header_refused`]); the value UTF-8
    /// with no control characters but tab (so nothing can split the
    /// response).
    pub fn add_header(&mut self, name: &[u8], value: &[u8]) -> Result<(), RuleError> {
        if self.reject.is_some() || self.headers.len() >= MAX_RESPONSE_HEADERS {
            return Err(RuleError::State);
        }
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return Err(RuleError::Invalid);
        };
        if !is_token(name) || header_refused(name) || !valid_header_value(value) {
            return Err(RuleError::Invalid);
        }
        self.headers.push((name.to_owned(), value.to_owned()));
        Ok(())
    }

    /// `hs_reject`: refuse the upgrade with `status` (400..=599) and a text
    /// body, which is kept as [`reject_body`] makes it. Final: later calls,
    /// a second reject included, get [`RuleError::State`] and the first
    /// reject stands.
    pub fn reject(&mut self, status: u16, body: &[u8]) -> Result<(), RuleError> {
        if self.reject.is_some() {
            return Err(RuleError::State);
        }
        if !(400..=599).contains(&status) {
            return Err(RuleError::Invalid);
        }
        self.reject = Some((status, reject_body(body)));
        Ok(())
    }
}

/// Whether a handler may never add the header `name` (any case).
pub fn header_refused(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    REFUSED_HEADERS.contains(&lower.as_str()) || lower.starts_with("sec-websocket-")
}

/// An HTTP token (RFC 9110 §5.6.2), what a header name must be.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value without CR, LF or other control bytes (tab is allowed),
/// as RFC 9110 §5.5 asks.
fn valid_header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// The body the host keeps for a reject: invalid UTF-8 replaced (a reject
/// must never turn into an accept because of its body's encoding), then cut
/// to at most [`MAX_REJECT_BODY`] bytes on a character boundary.
pub fn reject_body(body: &[u8]) -> String {
    // Bytes past the cap plus one character can never survive the cut, so
    // a huge body is not copied whole. A character cut here becomes U+FFFD
    // past the cap and is dropped below.
    let head = &body[..body.len().min(MAX_REJECT_BODY + 4)];
    let mut s = String::from_utf8_lossy(head).into_owned();
    truncate_on_char_boundary(&mut s, MAX_REJECT_BODY);
    s
}

/// Cuts `s` to at most `max` bytes without splitting a character
/// (`String::truncate` panics when `max` is inside one).
pub fn truncate_on_char_boundary(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Why a descriptor's flags are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagsError {
    /// `WSHD_F_RUST_SDK` without `WSHD_F_PANIC_UNWIND`: the handler was
    /// built with `panic = "abort"`, so one panic would kill the server.
    RustSdkWithoutUnwind,
}

/// Checks a descriptor's flags. Flags this ABI version does not define are
/// ignored, not refused: a handler built for a newer minor version loads on
/// an older host (the versioning rule), and a new flag can only ask for
/// something optional.
pub fn check_flags(flags: u32) -> Result<(), FlagsError> {
    if flags & WSHD_F_RUST_SDK != 0 && flags & WSHD_F_PANIC_UNWIND == 0 {
        return Err(FlagsError::RustSdkWithoutUnwind);
    }
    Ok(())
}

/// Why a descriptor string is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorTextError {
    /// Longer than [`MAX_DESCRIPTOR_STRING`] bytes (the length it has).
    TooLong(usize),
    /// Not UTF-8.
    NotUtf8,
}

/// Checks one descriptor string (`name`, `version`, `build_info`): at most
/// [`MAX_DESCRIPTOR_STRING`] bytes of UTF-8.
pub fn descriptor_text(bytes: &[u8]) -> Result<&str, DescriptorTextError> {
    if bytes.len() > MAX_DESCRIPTOR_STRING {
        return Err(DescriptorTextError::TooLong(bytes.len()));
    }
    std::str::from_utf8(bytes).map_err(|_| DescriptorTextError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{WSHD_F_KNOWN, WSHD_F_MAY_BLOCK};

    #[test]
    fn a_subprotocol_is_chosen_at_most_once() {
        let mut a = HandshakeAnswer::new(2);
        assert_eq!(a.select_subprotocol(2), Err(RuleError::Invalid));
        assert_eq!(a.select_subprotocol(1), Ok(()));
        // The same index again is a second choice too (the server used to
        // accept it, the test host did not).
        assert_eq!(a.select_subprotocol(1), Err(RuleError::State));
        assert_eq!(a.select_subprotocol(0), Err(RuleError::State));
        assert_eq!(a.selected, Some(1));
        let mut none = HandshakeAnswer::new(0);
        assert_eq!(none.select_subprotocol(0), Err(RuleError::Invalid));
    }

    #[test]
    fn a_reject_is_final() {
        let mut a = HandshakeAnswer::new(1);
        assert_eq!(a.reject(200, b"no"), Err(RuleError::Invalid));
        assert_eq!(a.reject(600, b"no"), Err(RuleError::Invalid));
        assert_eq!(a.reject(403, b"go away"), Ok(()));
        assert_eq!(a.reject(500, b"changed my mind"), Err(RuleError::State));
        // State first: even an invalid call is "not allowed now".
        assert_eq!(a.reject(200, b""), Err(RuleError::State));
        assert_eq!(a.select_subprotocol(0), Err(RuleError::State));
        assert_eq!(a.add_header(b"X-Late", b"1"), Err(RuleError::State));
        assert_eq!(a.reject, Some((403, "go away".into())));
        assert_eq!((a.selected, a.headers.len()), (None, 0));
    }

    #[test]
    fn hop_by_hop_proxy_and_websocket_headers_are_refused() {
        let mut a = HandshakeAnswer::new(0);
        for name in [
            "Proxy-Authenticate",
            "proxy-authorization",
            "Proxy-Connection",
            "Connection",
            "Upgrade",
            "Content-Length",
            "Transfer-Encoding",
            "TE",
            "Trailer",
            "Keep-Alive",
            "Sec-WebSocket-Accept",
            "sec-websocket-protocol",
        ] {
            assert_eq!(
                a.add_header(name.as_bytes(), b"x"),
                Err(RuleError::Invalid),
                "{name}"
            );
        }
        assert_eq!(a.add_header(b"bad name", b"x"), Err(RuleError::Invalid));
        assert_eq!(a.add_header(b"", b"x"), Err(RuleError::Invalid));
        assert_eq!(
            a.add_header(b"X-Split", b"a\r\nInjected: 1"),
            Err(RuleError::Invalid)
        );
        assert_eq!(a.add_header(b"X-Nul", b"a\0b"), Err(RuleError::Invalid));
        assert_eq!(a.add_header(b"X-Del", b"a\x7fb"), Err(RuleError::Invalid));
        assert_eq!(a.add_header(b"X-Bytes", b"\xff"), Err(RuleError::Invalid));
        assert_eq!(a.add_header(b"X-Tab", b"a\tb \xe2\x82\xac"), Ok(()));
        assert_eq!(a.add_header(b"Set-Cookie", b"a=b"), Ok(()));
        assert_eq!(a.headers.len(), 2);
    }

    #[test]
    fn at_most_32_headers() {
        let mut a = HandshakeAnswer::new(0);
        for i in 0..MAX_RESPONSE_HEADERS {
            assert_eq!(a.add_header(format!("X-{i}").as_bytes(), b"v"), Ok(()));
        }
        assert_eq!(a.add_header(b"X-33", b"v"), Err(RuleError::State));
        assert_eq!(a.headers.len(), 32);
        // A reject is still possible: the cap is on headers only.
        assert_eq!(a.reject(503, b"full"), Ok(()));
    }

    #[test]
    fn reject_bodies_are_cut_on_a_character_boundary() {
        // Issue #12: 4,200 bytes of "€" put byte 4096 inside a character,
        // and String::truncate panicked inside an extern "C" function.
        let euros = "€".repeat(1400);
        let mut a = HandshakeAnswer::new(0);
        assert_eq!(a.reject(403, euros.as_bytes()), Ok(()));
        let body = a.reject.unwrap().1;
        assert_eq!(body.len(), 4095);
        assert_eq!(body, "€".repeat(1365));

        assert_eq!(reject_body(&[b'a'; 5000]).len(), MAX_REJECT_BODY);
        assert_eq!(reject_body(b"short"), "short");
        // Invalid UTF-8 is replaced, never a reason to drop the reject.
        assert_eq!(reject_body(b"a\xffb"), "a\u{fffd}b");
        let mut s = "ab€".to_owned();
        truncate_on_char_boundary(&mut s, 3);
        assert_eq!(s, "ab");
    }

    #[test]
    fn unknown_flags_are_ignored_and_panic_abort_is_refused() {
        assert_eq!(check_flags(WSHD_F_KNOWN), Ok(()));
        assert_eq!(check_flags(WSHD_F_MAY_BLOCK | 1 << 31), Ok(()));
        assert_eq!(
            check_flags(WSHD_F_RUST_SDK),
            Err(FlagsError::RustSdkWithoutUnwind)
        );
        assert_eq!(check_flags(0), Ok(()));
    }

    #[test]
    fn descriptor_strings_are_capped_utf8() {
        assert_eq!(descriptor_text(b"echo"), Ok("echo"));
        let long = vec![b'a'; MAX_DESCRIPTOR_STRING + 1];
        assert_eq!(
            descriptor_text(&long),
            Err(DescriptorTextError::TooLong(4097))
        );
        assert_eq!(descriptor_text(&long[..4096]).map(str::len), Ok(4096));
        assert_eq!(descriptor_text(b"\xff"), Err(DescriptorTextError::NotUtf8));
    }

    #[test]
    fn status_codes() {
        assert_eq!(RuleError::Invalid.status(), WSHD_ERR_INVALID);
        assert_eq!(RuleError::State.status(), WSHD_ERR_STATE);
    }
}
