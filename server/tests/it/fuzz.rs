//! Randomized tests of the two parsers a client reaches first: the HTTP
//! upgrade request and the WebSocket frame reader (issue #12). The requests
//! and frame streams are generated from a fixed seed with a fixed case
//! budget, so a CI run is bounded and a failure replays exactly.
//!
//! What must hold, whatever the bytes: the server answers with 101, a 4xx,
//! a static file (the document root is on), or closes the socket without
//! answering; never with a 5xx;
//! it ends a WebSocket only with RFC 6455 close codes a server may send; and
//! it keeps serving everyone else afterwards.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use crate::common::{Wshd, connect, echo_once, standard_dir};

/// Change it to explore new inputs; keep it fixed in the repository.
const SEED: [u8; 32] = *b"wshd fuzz: handshake and frames!";

fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 32,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED))
}

/// Small limits so that inputs reach them, and a short handshake timeout
/// so an unfinished request costs little. The document root is on, so
/// requests that are not upgrades reach the static file server too.
const CONFIG: &str = "[limits]\nhandshake_timeout = \"2s\"\nmax_message_size = \"64KiB\"\n\
                      max_frame_size = \"16KiB\"\nclose_timeout = \"1s\"\n";

fn start() -> (tempfile::TempDir, Wshd) {
    let dir = standard_dir();
    let www = crate::common::repo_root().join("www");
    let wshd = Wshd::with_config(dir.path(), CONFIG, &["-d", www.to_str().unwrap()]);
    (dir, wshd)
}

/// Reads what the server sends until it closes the socket, `done` says the
/// answer is complete, or `limit` passes.
fn read_answer(s: &mut TcpStream, limit: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn head_complete(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n")
}

// ---------------------------------------------------------------------------
// Handshakes

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("GET".to_string()),
        1 => prop::sample::select(vec!["POST", "HEAD", "CONNECT", "OPTIONS", "get", "G\tT"])
            .prop_map(str::to_string),
        1 => "[A-Z]{1,12}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["/echo", "/chat", "/origin_check", "/nope", "/"])
            .prop_map(str::to_string),
        1 => prop::sample::select(vec![
            "*", "example.com:80", "http://x/echo", "//echo", "/echo?a=%0a%1b[31m", "/%2e%2e/etc/passwd",
            "/.env", "/echo#frag",
        ])
        .prop_map(str::to_string),
        1 => "/[ -~]{0,40}",
        1 => (1usize..80_000).prop_map(|n| format!("/{}", "a".repeat(n))),
    ]
}

fn version() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("HTTP/1.1".to_string()),
        1 => prop::sample::select(vec!["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "", "HTTP/9.9"])
            .prop_map(str::to_string),
    ]
}

fn header() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "Host",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Extensions",
            "Origin",
            "Content-Length",
            "Transfer-Encoding",
            "Proxy-Authorization",
        ])
        .prop_map(str::to_string),
        "[A-Za-z-]{1,20}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "x",
            "websocket",
            "Upgrade",
            "keep-alive, Upgrade",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "13",
            "8",
            "chat, superchat",
            "http://example.com",
            "null",
            "0",
            "5",
            "chunked",
            "-1",
            "99999999999999999999",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,60}",
        "[\\x00-\\x7f]{0,20}",
        (1usize..9000).prop_map(|n| "v".repeat(n)),
    ];
    (name, value)
}

/// A whole request: mostly close to a valid upgrade (so the later checks are
/// reached), sometimes plain noise.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let valid_headers = Just(vec![
        ("Host".to_string(), "x".to_string()),
        ("Upgrade".to_string(), "websocket".to_string()),
        ("Connection".to_string(), "Upgrade".to_string()),
        (
            "Sec-WebSocket-Key".to_string(),
            "dGhlIHNhbXBsZSBub25jZQ==".to_string(),
        ),
        ("Sec-WebSocket-Version".to_string(), "13".to_string()),
    ]);
    let structured = (
        method(),
        target(),
        version(),
        valid_headers,
        prop::collection::vec(header(), 0..8),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    )
        .prop_map(|(m, t, v, mut hs, extra, drops, body)| {
            for d in drops {
                if !hs.is_empty() {
                    hs.remove(d.index(hs.len()));
                }
            }
            hs.extend(extra);
            let mut r = format!("{m} {t} {v}\r\n").into_bytes();
            for (n, v) in hs {
                r.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            if let Some(b) = body {
                r.extend_from_slice(&b);
            }
            r
        });
    prop_oneof![
        8 => structured,
        1 => prop::collection::vec(any::<u8>(), 0..600),
    ]
}

/// The status of a response head, if the bytes start with one.
fn status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    rest.get(..3)?.parse().ok()
}

#[test]
fn random_upgrade_requests_never_get_a_5xx_and_the_server_keeps_serving() {
    let (_dir, mut wshd) = start();
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    runner(400)
        .run(&request(), |req| {
            let mut s = TcpStream::connect(&wshd.addr).unwrap();
            // The server may answer (and close) before it has read all of
            // a long request; a failed write is then fine.
            let _ = s.write_all(&req);
            if !head_complete(&req) {
                // An unfinished request would wait for the handshake
                // timeout; end it now.
                let _ = s.shutdown(Shutdown::Write);
            }
            let answer = read_answer(&mut s, Duration::from_secs(5), head_complete);
            if answer.is_empty() {
                *seen.borrow_mut().entry(0).or_default() += 1;
                return Ok(()); // closed without an answer: allowed
            }
            let code = status(&answer).ok_or_else(|| {
                TestCaseError::fail(format!(
                    "not an HTTP/1.1 response: {:?}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ))
            })?;
            *seen.borrow_mut().entry(code).or_default() += 1;
            // Static files may answer 2xx/3xx; nothing may be a 5xx (this
            // server is far from its connection limits, so no 503 either).
            prop_assert!(
                code == 101 || (200..500).contains(&code),
                "status {code} for request {:?}",
                String::from_utf8_lossy(&req[..req.len().min(300)])
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", wshd.log()));
    // The generator must really reach both outcomes, or the test proves
    // little.
    let seen = seen.into_inner();
    assert!(seen.get(&101).copied().unwrap_or(0) >= 10, "{seen:?}");
    assert!(seen.range(400..500).count() >= 3, "{seen:?}");
    assert!(wshd.child.try_wait().unwrap().is_none(), "wshd exited");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = connect(&wshd.url("/echo")).await;
        assert_eq!(echo_once(&mut ws, "still here").await, "still here");
    });
    assert!(!wshd.log().contains("panicked"), "{}", wshd.log());
}

// ---------------------------------------------------------------------------
// Frames

/// One frame as a client might (mis)write it.
#[derive(Debug, Clone)]
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    /// How the length is encoded: 0 = the shortest form, 1 = 16-bit,
    /// 2 = 64-bit (non-minimal forms are legal), 3 = a claimed length that
    /// is larger than what follows.
    len_form: u8,
    payload: Vec<u8>,
}

fn frame() -> impl Strategy<Value = Frame> {
    let opcode = prop_oneof![
        6 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        1 => 0u8..16,
    ];
    let payload = prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..40),
        1 => prop::collection::vec(any::<u8>(), 100..300),
        1 => "[ -~é€]{0,30}".prop_map(String::into_bytes),
        1 => (0u16..=5000).prop_map(|code| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(b"bye");
            p
        }),
    ];
    (
        prop::bool::weighted(0.85),
        prop_oneof![8 => Just(0u8), 1 => 0u8..8],
        opcode,
        prop::bool::weighted(0.95),
        prop_oneof![8 => Just(0u8), 1 => 0u8..4],
        payload,
    )
        .prop_map(|(fin, rsv, opcode, masked, len_form, payload)| Frame {
            fin,
            rsv,
            opcode,
            masked,
            len_form,
            payload,
        })
}

fn encode(f: &Frame) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![(u8::from(f.fin) << 7) | (f.rsv << 4) | f.opcode];
    let m = u8::from(f.masked) << 7;
    let n = f.payload.len();
    match f.len_form {
        1 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        2 => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        3 => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64 + 1_000_000_000).to_be_bytes());
        }
        _ if n < 126 => out.push(m | n as u8),
        _ => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if f.masked {
        out.extend_from_slice(&MASK);
        out.extend(
            f.payload
                .iter()
                .zip(MASK.iter().cycle())
                .map(|(b, k)| b ^ k),
        );
    } else {
        out.extend_from_slice(&f.payload);
    }
    out
}

/// Close codes a server may put on the wire (RFC 6455 §7.4.1), plus 1012
/// (service restart, IANA registry) that wshd uses on drain.
const SERVER_CLOSE_CODES: &[u16] = &[1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012];

/// Whether the server may send `code`: one of its own, or an application
/// code (3000-4999, RFC 6455 §7.4.2) echoed from the client's close frame.
fn server_may_send(code: u16) -> bool {
    SERVER_CLOSE_CODES.contains(&code) || (3000..=4999).contains(&code)
}

/// The close codes in a server-to-client byte stream (unmasked frames).
/// Stops at the first frame that is cut off by the end of the stream.
fn close_codes(mut b: &[u8]) -> Result<Vec<Option<u16>>, String> {
    let mut codes = Vec::new();
    while b.len() >= 2 {
        let opcode = b[0] & 0x0f;
        if b[1] & 0x80 != 0 {
            return Err("the server masked a frame".into());
        }
        let (len, hdr) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if b.len() < hdr + len {
            break;
        }
        let payload = &b[hdr..hdr + len];
        if opcode == 8 {
            codes.push((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])));
        }
        b = &b[hdr + len..];
    }
    Ok(codes)
}

#[test]
fn random_frame_streams_end_only_with_rfc_close_codes_and_the_server_keeps_serving() {
    let (_dir, mut wshd) = start();
    let closes = std::cell::RefCell::new(std::collections::BTreeMap::<Option<u16>, u32>::new());
    let upgrade = crate::common::upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n");
    runner(250)
        .run(&prop::collection::vec(frame(), 1..8), |frames| {
            let mut s = TcpStream::connect(&wshd.addr).unwrap();
            s.write_all(upgrade.as_bytes()).unwrap();
            let head = read_answer(&mut s, Duration::from_secs(5), head_complete);
            prop_assert_eq!(
                status(&head),
                Some(101),
                "{:?}",
                String::from_utf8_lossy(&head)
            );
            let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(Shutdown::Write);
            let answer = read_answer(&mut s, Duration::from_secs(5), |_| false);
            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut stream = head[end..].to_vec();
            stream.extend_from_slice(&answer);
            let codes = close_codes(&stream).map_err(TestCaseError::fail)?;
            for code in codes {
                *closes.borrow_mut().entry(code).or_default() += 1;
                if let Some(c) = code {
                    prop_assert!(server_may_send(c), "close code {c} after frames {frames:?}");
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", wshd.log()));
    // Protocol errors and clean closes must both have been reached.
    let closes = closes.into_inner();
    assert!(closes.contains_key(&Some(1002)), "{closes:?}");
    assert!(closes.len() >= 3, "{closes:?}");
    assert!(wshd.child.try_wait().unwrap().is_none(), "wshd exited");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = connect(&wshd.url("/echo")).await;
        assert_eq!(echo_once(&mut ws, "still here").await, "still here");
    });
    assert!(!wshd.log().contains("panicked"), "{}", wshd.log());
}
