//! wshd's own frame codec (ws.rs), seen from a raw client: bytes that
//! arrive with the upgrade request, frames in any split, pipelined frames,
//! fragments with control frames between them, and text that fails as soon
//! as it is invalid.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// The next data or control frame's opcode and payload, within 10 s.
async fn next_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let (first, p) = tokio::time::timeout(Duration::from_secs(10), read_server_frame(s))
        .await
        .expect("no frame in time")
        .expect("socket ended");
    (first & 0x0f, p)
}

/// A client frame without FIN: the first fragments of a message.
fn fragment(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(opcode, payload);
    f[0] &= 0x7f;
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_sent_with_the_upgrade_request_are_served() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    // One write: the request and three frames right behind it, as a client
    // that does not wait for the 101 sends them.
    let mut bytes = upgrade_request("/echo", "Sec-WebSocket-Version: 13\r\n").into_bytes();
    for m in ["one", "two", "three"] {
        bytes.extend(client_frame(0x1, m.as_bytes()));
    }
    s.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    for m in ["one", "two", "three"] {
        assert_eq!(next_frame(&mut s).await, (0x1, m.as_bytes().to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_frames_and_frames_split_across_reads_echo_in_order() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut s = raw_upgrade(&srv.addr, "/echo").await;
    // Every length form (7-bit, 16-bit, 64-bit) and the edges between them,
    // all in one write: several frames per read, and frames that straddle
    // the end of a read.
    let sizes = [0usize, 1, 125, 126, 127, 1000, 65535, 65536, 70_000, 3];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let mut bytes = Vec::new();
    for p in &payloads {
        bytes.extend(client_frame(0x2, p));
    }
    s.write_all(&bytes).await.unwrap();
    for p in &payloads {
        let (op, got) = next_frame(&mut s).await;
        assert_eq!((op, got.len()), (0x2, p.len()));
        assert!(&got == p, "payload of {} bytes differs", p.len());
    }
    // One message dribbled in 7-byte writes: its header arrives in pieces,
    // then its payload over many reads.
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in client_frame(0x2, &big).chunks(7) {
        s.write_all(chunk).await.unwrap();
        s.flush().await.unwrap();
    }
    assert_eq!(next_frame(&mut s).await, (0x2, big));
}

#[tokio::test(flavor = "multi_thread")]
async fn pings_between_fragments_are_answered_and_the_message_completes() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut s = raw_upgrade(&srv.addr, "/echo").await;
    let mut bytes = fragment(0x1, "hé".as_bytes());
    bytes.extend(client_frame(0x9, b"are you there"));
    // "é" split between two fragments: valid once joined.
    let e = "é".as_bytes();
    bytes.extend(fragment(0x0, &e[..1]));
    bytes.extend(client_frame(0x0, &[&e[1..], b"llo"].concat()));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(next_frame(&mut s).await, (0xa, b"are you there".to_vec()));
    assert_eq!(
        next_frame(&mut s).await,
        (0x1, "hééllo".as_bytes().to_vec())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_text_fails_at_its_first_fragment() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut s = raw_upgrade(&srv.addr, "/echo").await;
    // 0xC0 can never start a valid sequence. The rest of the message is
    // never sent: the close must not wait for it.
    s.write_all(&fragment(0x1, b"ok so far \xC0\xAF"))
        .await
        .unwrap();
    let (op, p) = next_frame(&mut s).await;
    assert_eq!(op, 0x8);
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1007);
    srv.wait_log("close_code=1007").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_violations_close_with_1002_and_the_reason() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let cases: [(&str, Vec<u8>); 4] = [
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i']),
        ("continuation without a message", client_frame(0x0, b"x")),
        ("reserved opcode", client_frame(0x3, b"x")),
        ("fragmented control frame", fragment(0x9, b"x")),
    ];
    for (reason, frame) in cases {
        let mut s = raw_upgrade(&srv.addr, "/echo").await;
        s.write_all(&frame).await.unwrap();
        let (op, p) = next_frame(&mut s).await;
        assert_eq!(op, 0x8, "{reason}");
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1002, "{reason}");
        let text = String::from_utf8_lossy(&p[2..]).into_owned();
        assert!(text.contains(reason), "{reason}: got {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_text_fails_before_the_rest_of_its_frame_arrives() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut s = raw_upgrade(&srv.addr, "/echo").await;
    // A 10,000-byte text frame of which only the first 600 bytes are sent,
    // the invalid byte among them: the close must not wait for the other
    // 9,400, which never come.
    let mut text = "a".repeat(10_000).into_bytes();
    text[500] = 0xFF;
    let frame = client_frame(0x1, &text);
    s.write_all(&frame[..600]).await.unwrap();
    let (op, p) = next_frame(&mut s).await;
    assert_eq!(op, 0x8);
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1007);
}
