//! The handler's view of an opening handshake: the owned request data passed
//! to `on_handshake`, and the builder behind the opaque `wshd_handshake*`
//! that the `hs_*` host functions fill in.
#![allow(unsafe_code)]

use wshd_handler_api::abi::*;
use wshd_handler_api::rules::{HandshakeAnswer, RuleError};

use crate::host_api::str_bytes;

/// Everything `on_handshake` sees, owned so it can move to a blocking thread.
#[derive(Debug, Clone)]
pub struct HandshakeInput {
    pub conn: wshd_conn_id,
    pub path: String,
    pub query: String,
    pub origin: Option<String>,
    pub remote_addr: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub subprotocols: Vec<String>,
}

/// What the handler decided; starts as "accept, no subprotocol". The rules
/// for changing it (shared with the SDK's test host) live in
/// [`wshd_handler_api::rules`]; the `hs_*` functions below only turn the
/// C arguments into slices.
pub type HandshakeBuilder = HandshakeAnswer;

impl HandshakeInput {
    /// Calls `f` with the C view of this request. The views borrow `self`
    /// and live only for the call, as the ABI promises.
    pub fn with_view<R>(&self, f: impl FnOnce(&wshd_handshake_req) -> R) -> R {
        let headers: Vec<wshd_header> = self
            .headers
            .iter()
            .map(|(n, v)| wshd_header {
                name: wshd_str::from_str(n),
                value: wshd_str::from_bytes(v),
            })
            .collect();
        let subprotocols: Vec<wshd_str> = self
            .subprotocols
            .iter()
            .map(|s| wshd_str::from_str(s))
            .collect();
        let req = wshd_handshake_req {
            struct_size: std::mem::size_of::<wshd_handshake_req>() as u32,
            reserved: 0,
            conn: self.conn,
            path: wshd_str::from_str(&self.path),
            query: wshd_str::from_str(&self.query),
            origin: match &self.origin {
                Some(o) => wshd_str::from_str(o),
                None => wshd_str::EMPTY,
            },
            remote_addr: wshd_str::from_str(&self.remote_addr),
            headers: headers.as_ptr(),
            n_headers: headers.len(),
            subprotocols: subprotocols.as_ptr(),
            n_subprotocols: subprotocols.len(),
        };
        f(&req)
    }
}

/// # Safety
/// `hs` must be the pointer the host passed to the running `on_handshake`.
unsafe fn builder<'a>(hs: *mut wshd_handshake) -> Option<&'a mut HandshakeBuilder> {
    // SAFETY: the host creates `hs` from a `&mut HandshakeBuilder` that lives
    // for the whole on_handshake call and is not otherwise touched meanwhile.
    unsafe { (hs as *mut HandshakeBuilder).as_mut() }
}

fn status(r: Result<(), RuleError>) -> i32 {
    r.map_or_else(RuleError::status, |()| WSHD_OK)
}

pub(crate) unsafe extern "C" fn hs_select_subprotocol(
    hs: *mut wshd_handshake,
    index: usize,
) -> i32 {
    // SAFETY: called by the handler during on_handshake with our pointer.
    let Some(b) = (unsafe { builder(hs) }) else {
        return WSHD_ERR_INVALID;
    };
    status(b.select_subprotocol(index))
}

pub(crate) unsafe extern "C" fn hs_add_header(
    hs: *mut wshd_handshake,
    name: wshd_str,
    value: wshd_str,
) -> i32 {
    // SAFETY: called by the handler during on_handshake with our pointer.
    let Some(b) = (unsafe { builder(hs) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: the strings are borrowed for this call.
    let (Some(name), Some(value)) = (unsafe { str_bytes(name) }, unsafe { str_bytes(value) })
    else {
        return WSHD_ERR_INVALID;
    };
    status(b.add_header(name, value))
}

pub(crate) unsafe extern "C" fn hs_reject(
    hs: *mut wshd_handshake,
    status_code: u16,
    body: wshd_str,
) -> i32 {
    // SAFETY: called by the handler during on_handshake with our pointer.
    let Some(b) = (unsafe { builder(hs) }) else {
        return WSHD_ERR_INVALID;
    };
    // SAFETY: borrowed for this call.
    let Some(body) = (unsafe { str_bytes(body) }) else {
        return WSHD_ERR_INVALID;
    };
    // Truncated on a character boundary by the rules: a plain
    // String::truncate(4096) panicked here on multi-byte text (issue #12).
    status(b.reject(status_code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(b: &mut HandshakeBuilder) -> *mut wshd_handshake {
        b as *mut HandshakeBuilder as *mut wshd_handshake
    }

    #[test]
    fn builder_rules() {
        let mut b = HandshakeBuilder {
            n_offered: 2,
            ..Default::default()
        };
        let h = hs(&mut b);
        // SAFETY: `h` points at `b`, alive for the whole test.
        unsafe {
            assert_eq!(hs_select_subprotocol(h, 2), WSHD_ERR_INVALID);
            assert_eq!(hs_select_subprotocol(h, 1), WSHD_OK);
            assert_eq!(hs_select_subprotocol(h, 0), WSHD_ERR_STATE);
            assert_eq!(hs_select_subprotocol(h, 1), WSHD_ERR_STATE);
            let s = wshd_str::from_str;
            assert_eq!(hs_add_header(h, s("X-Handler"), s("echo")), WSHD_OK);
            assert_eq!(
                hs_add_header(h, s("Sec-WebSocket-Accept"), s("x")),
                WSHD_ERR_INVALID
            );
            assert_eq!(
                hs_add_header(h, s("X-Bad"), s("a\r\nInjected: 1")),
                WSHD_ERR_INVALID
            );
            assert_eq!(hs_reject(h, 200, s("no")), WSHD_ERR_INVALID);
            assert_eq!(
                hs_add_header(h, s("Proxy-Authenticate"), s("Basic")),
                WSHD_ERR_INVALID
            );
            assert_eq!(hs_reject(h, 403, s("go away")), WSHD_OK);
            assert_eq!(hs_reject(h, 500, s("again")), WSHD_ERR_STATE);
            assert_eq!(hs_add_header(h, s("X-Late"), s("1")), WSHD_ERR_STATE);
        }
        assert_eq!(b.selected, Some(1));
        assert_eq!(b.headers.len(), 1);
        assert_eq!(b.reject, Some((403, "go away".into())));
    }

    #[test]
    fn reject_body_of_multibyte_text_does_not_panic() {
        let mut b = HandshakeBuilder::new(0);
        let body = "€".repeat(1400);
        // SAFETY: the pointer is `b`, alive for the call.
        let rc = unsafe { hs_reject(hs(&mut b), 403, wshd_str::from_str(&body)) };
        assert_eq!(rc, WSHD_OK);
        assert_eq!(b.reject.map(|(_, body)| body.len()), Some(4095));
    }
}
