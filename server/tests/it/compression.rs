//! permessage-deflate (RFC 7692, server/src/deflate.rs) seen from a raw
//! client: negotiation, compressed echo in both directions, the inflated
//! size limit, window bits, and the route switch.

use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;

const ON: &str = "[[route]]\npath = \"/echo\"\nhandler = \"echo\"\ncompression = \"on\"\n";

/// Upgrades with `extensions` offered; returns the socket and the
/// response head.
async fn upgrade(srv: &Wshd, path: &str, extensions: &str) -> (TcpStream, String) {
    raw_upgrade_with(
        &srv.addr,
        path,
        &format!("Sec-WebSocket-Extensions: {extensions}\r\n"),
    )
    .await
}

/// The response's Sec-WebSocket-Extensions value, if any.
fn extensions(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("sec-websocket-extensions:")
            .map(|v| v.trim().to_owned())
    })
}

/// A masked client frame with the given first byte (FIN, RSV1, opcode).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(first & 0x0f, payload);
    f[0] = first;
    f
}

/// Raw deflate of one message with the RFC 7692 tail stripped.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(z.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one server message with a window of `bits`.
fn inflate(data: &[u8], bits: u8) -> Vec<u8> {
    let mut z = Decompress::new_with_window_bits(false, bits);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("server output inflates with the negotiated window");
    out
}

/// One server frame: first byte and payload.
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(10), read_server_frame(s))
        .await
        .expect("no frame in time")
        .unwrap()
}

fn json(n: usize) -> String {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user{i}\",\"online\":true}},"
        ));
        i += 1;
    }
    s.push(']');
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn negotiated_and_echoed_compressed_both_ways() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), ON, &[]);
    let (mut s, head) = upgrade(&srv, "/echo", "permessage-deflate; client_max_window_bits").await;
    assert_eq!(
        extensions(&head).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let text = json(4096);
    let z = deflate(text.as_bytes());
    // One compressed frame.
    s.write_all(&frame(0xc1, &z)).await.unwrap();
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first, 0xc1, "FIN, RSV1, text");
    assert!(p.len() < text.len() / 3, "compressed: {} bytes", p.len());
    assert_eq!(inflate(&p, 15), text.as_bytes());
    // The same message fragmented in three, with a ping in the middle.
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut bytes = frame(0x41, a);
    bytes.extend(frame(0x00, b));
    bytes.extend(frame(0x89, b"mid"));
    bytes.extend(frame(0x80, c));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x8a, b"mid".to_vec()));
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first, 0xc1);
    assert_eq!(inflate(&p, 15), text.as_bytes());
    // Uncompressed messages still work; short ones come back uncompressed.
    s.write_all(&frame(0x81, b"hi")).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x81, b"hi".to_vec()));
    // A compressed empty message.
    s.write_all(&frame(0xc2, &deflate(b""))).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x82, Vec::new()));
}

#[tokio::test(flavor = "multi_thread")]
async fn inflated_size_is_what_max_message_size_limits() {
    let dir = standard_dir();
    let srv = Wshd::with_config(
        dir.path(),
        &format!("{ON}[route.limits]\nmax_message_size = \"64KiB\"\n"),
        &[],
    );
    let (mut s, head) = upgrade(&srv, "/echo", "permessage-deflate").await;
    assert!(extensions(&head).is_some());
    // 16 MiB of zeros deflate to about 16 KiB: under the limit on the
    // wire, 256 times over it inflated.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024);
    s.write_all(&frame(0xc2, &bomb)).await.unwrap();
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first & 0x0f, 0x8, "a close frame, not an echo");
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1009);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_max_window_bits_is_honoured_and_eight_declined() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), ON, &[]);
    let (mut s, head) = upgrade(
        &srv,
        "/echo",
        "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9",
    )
    .await;
    assert_eq!(
        extensions(&head).as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        )
    );
    // Repeats 1000 bytes apart: a 32 KiB window would refer back to them,
    // which a 512-byte inflater refuses ("invalid distance too far back").
    let block: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 97) as u8 + b' ').collect();
    let data = block.repeat(20);
    s.write_all(&frame(0xc2, &deflate(&data))).await.unwrap();
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first, 0xc2);
    assert_eq!(inflate(&p, 9), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn off_unless_the_route_turns_it_on() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let (mut s, head) = upgrade(&srv, "/echo", "permessage-deflate").await;
    assert_eq!(extensions(&head), None);
    // Without the extension, RSV1 is a protocol error.
    s.write_all(&frame(0xc1, &deflate(b"hello hello hello")))
        .await
        .unwrap();
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first & 0x0f, 0x8);
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1002);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_compressed_data_is_a_protocol_error() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), ON, &[]);
    let (mut s, _) = upgrade(&srv, "/echo", "permessage-deflate").await;
    s.write_all(&frame(0xc1, &[0xff; 32])).await.unwrap();
    let (first, p) = read_frame(&mut s).await;
    assert_eq!(first & 0x0f, 0x8);
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1002);
}
