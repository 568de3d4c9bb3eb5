//! One WebSocket connection's frames: wshd's own codec for the established
//! connection (RFC 6455, and RFC 7692 permessage-deflate through
//! deflate.rs). The handshake stays with hyper (http.rs); tungstenite
//! supplies only the in-memory types (`Message`, `CloseFrame`).
//!
//! **Reading.** A connection owns no read buffer. Each worker thread has one
//! ([`RX`], 64 KiB): a read goes there, the frames it completes are parsed
//! in place, their payloads unmasked eight bytes at a time and split off as
//! `Bytes` that share the worker's block, so a message that arrived whole
//! reaches the handler without a copy. Only bytes of a frame that is not
//! complete yet (and any frames behind the message returned) are copied to
//! the connection's own `rx`, which is empty, with no allocation, between
//! messages. Once a connection holds a partial frame it reads straight into
//! `rx`, sized for that frame, so a 64 KiB message is not copied twice. The
//! worker block is reused once the handler has dropped every payload cut
//! from it (`BytesMut::reserve` reclaims a block nobody else holds), so the
//! steady state allocates nothing per message.
//!
//! **Writing.** Sends are queued as a header (built in place, at most ten
//! bytes) and the payload `Bytes` they arrived with: a topic message shared
//! by a thousand subscribers is never copied into a write buffer. `flush`
//! writes everything queued in one vectored write, so the reply to a
//! message, a pong and whatever the handler sent from other threads since
//! the last wake-up leave in one syscall.
//!
//! **Limits and protocol.** Every frame header is checked before its payload
//! is waited for: masking, reserved bits and opcodes, control frame rules,
//! `max_frame_size`, and `max_message_size` against what the message
//! already holds (for a compressed message, against its inflated size as
//! well). Text is validated as it arrives, so an invalid fragment fails the
//! connection without waiting for the rest. Pings are answered and the
//! close handshake is answered here; the session (session.rs) sees data
//! messages, the peer's close, and errors that say which close code to fail
//! the connection with.
//!
//! **What the peer can make us hold** is watched here too: unfinished
//! messages count against the server-wide budget ([`Meter`]), and
//! [`WsConn::cut`] frees them at once; output the peer does not read is
//! timed from [`WsConn::write_blocked_since`], and while it is blocked no
//! more is read, so a client that floods pings and never reads cannot grow
//! the pong queue.
//!
//! The socket is a [`Stream`]: plain TCP, or TLS (tls.rs). An enum with two
//! arms rather than a generic keeps the session code one type, and rather
//! than a `Box<dyn>` keeps the plain path free of an indirect call.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Utf8Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use crate::budget::Meter;
use crate::deflate::Params;

/// An accepted connection: plain TCP or TLS over TCP. The TLS state is
/// boxed (it is over a kilobyte), so a plain connection stays small.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The per-route limits the codec enforces (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub max_frame_size: usize,
    pub max_message_size: usize,
}

/// The worker thread's read buffer: see the module doc.
const WORKER_BUF: usize = 64 * 1024;
/// Below this much free space the worker buffer is renewed before a read:
/// smaller reads would cost a syscall per few frames.
const MIN_SPARE: usize = 8 * 1024;
/// A connection reading into its own buffer (a partial frame) reads at most
/// this much past the frame it waits for, so a frame of a few bytes does not
/// make it reserve a large buffer.
const OWN_READ: usize = 16 * 1024;
/// Queued output over this is written before more is queued
/// ([`WsConn::should_flush`]): a burst of sends cannot grow the queue past
/// it plus one message.
const HIGH_WATER: usize = 256 * 1024;
/// Queued payloads up to this size are copied out of the worker's read
/// block when the peer stops reading ([`WsConn::detach_queued`]).
const DETACH_MAX: usize = WORKER_BUF / 2;
/// Slices per vectored write (two per frame: header and payload).
const IOV: usize = 64;
/// Output up to this size is copied into the worker's write buffer and
/// sent with one `send(2)` instead of a `writev(2)` of its slices. On a
/// socket `writev` goes through the VFS (`do_writev`, `fdget_pos`,
/// importing the iovec, `sock_write_iter`), about 5 % of the server's CPU
/// per 32-byte echo in the profile (bench/README.md), where `send` goes
/// to the socket directly; copying a few kilobytes costs less than that.
const COPY_MAX: usize = 4 * 1024;

thread_local! {
    /// The worker thread's read buffer. Empty between polls: whatever a
    /// connection does not consume is moved to its own `rx` before the
    /// poll returns, because the next poll on this thread may be another
    /// connection's.
    static RX: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    /// The worker thread's write buffer for small output ([`COPY_MAX`]).
    /// Empty between polls, like `RX`: what the socket did not take stays
    /// in the connection's queue, not here.
    static TX: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COPY_MAX));
}

/// Why [`WsConn::next`] failed.
#[derive(Debug)]
pub enum ReadError {
    /// The peer broke the protocol or a limit: fail the connection with
    /// this close code and reason (RFC 6455 §7.1.7), then linger.
    Protocol { code: u16, reason: &'static str },
    /// The socket failed: the connection is gone (1006).
    Io(io::Error),
    /// The server-wide budget for unfinished messages picked this
    /// connection: call [`WsConn::cut`].
    OverBudget,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Protocol { code, reason } => write!(f, "{reason} ({code})"),
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::OverBudget => f.write_str("over the server's buffered-data budget"),
        }
    }
}

const fn fail(code: u16, reason: &'static str) -> ReadError {
    ReadError::Protocol { code, reason }
}

/// One frame header, parsed and checked.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    /// Header bytes, mask key included.
    len: usize,
    payload: usize,
    mask: [u8; 4],
}

/// A fragmented (or compressed) data message being assembled.
#[derive(Debug)]
struct Assembly {
    text: bool,
    compressed: bool,
    data: BytesMut,
    /// Bytes of `data` known to be valid UTF-8 (uncompressed text only).
    valid: usize,
}

/// The header of an unmasked frame with first byte `first` and `n`
/// payload bytes, in the shortest length form, and its length.
fn header(first: u8, n: usize) -> ([u8; 10], u8) {
    let mut head = [0u8; 10];
    head[0] = first;
    let head_len = if n < 126 {
        head[1] = n as u8;
        2
    } else if n <= usize::from(u16::MAX) {
        head[1] = 126;
        head[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(n as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

/// A frame queued for the socket.
#[derive(Debug)]
struct Out {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl Out {
    fn new(first: u8, payload: Bytes) -> Out {
        let (head, head_len) = header(first, payload.len());
        Out {
            head,
            head_len,
            payload,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }
}

/// A server-side WebSocket connection over a TCP or TLS stream.
#[derive(Debug)]
pub struct WsConn {
    io: Stream,
    config: Config,
    /// Bytes read from the peer and not parsed yet: a partial frame, or
    /// frames behind the message last returned. Empty between messages.
    rx: BytesMut,
    /// The fragmented message in progress. Boxed: most messages are one
    /// frame and never need it.
    msg: Option<Box<Assembly>>,
    /// Frames waiting for the socket, and how much of the first is written.
    tx: VecDeque<Out>,
    tx_sent: usize,
    tx_bytes: usize,
    /// Payload bytes of the partial text frame at the front of `rx` known
    /// to be valid UTF-8 (see [`WsConn::check_partial_text`]).
    partial_valid: usize,
    /// permessage-deflate, when negotiated.
    deflate: Option<Params>,
    /// The stream ended or failed: later reads return `None`.
    ended: bool,
    /// The peer's close frame arrived (our reply, if any, is queued).
    got_close: bool,
    /// Our close frame is queued: nothing may follow it.
    sent_close: bool,
    /// This connection's share of `max_buffered_bytes`, once attached.
    meter: Option<Meter>,
    /// When the unfinished message the peer is sending started.
    unfinished_since: Option<Instant>,
    /// Bytes arrived since [`WsConn::take_heard`] last looked.
    heard: bool,
    /// Since when queued output could not be written.
    blocked_since: Option<Instant>,
    /// Publishers may be writing to the socket (direct.rs): reads must not
    /// write (see [`WsConn::set_door_open`]).
    door_open: bool,
}

impl WsConn {
    /// Wraps an upgraded socket, with permessage-deflate when `deflate` is
    /// given. `early` holds bytes the client sent right after its handshake
    /// request, which the HTTP layer already read.
    pub fn new(
        io: Stream,
        early: Option<Vec<u8>>,
        config: Config,
        deflate: Option<Params>,
    ) -> WsConn {
        WsConn {
            io,
            config,
            rx: early.map(|e| BytesMut::from(&e[..])).unwrap_or_default(),
            msg: None,
            tx: VecDeque::new(),
            tx_sent: 0,
            tx_bytes: 0,
            partial_valid: 0,
            deflate,
            ended: false,
            got_close: false,
            sent_close: false,
            meter: None,
            unfinished_since: None,
            heard: false,
            blocked_since: None,
            door_open: false,
        }
    }

    /// Whether permessage-deflate is in effect.
    pub fn compressed(&self) -> bool {
        self.deflate.is_some()
    }

    /// Counts this connection's unfinished messages against the server's
    /// budget from now on.
    pub fn attach(&mut self, meter: Meter) {
        self.meter = Some(meter);
        self.account();
    }

    /// The socket, for the lingering close after the WebSocket is done.
    pub fn get_mut(&mut self) -> &mut Stream {
        &mut self.io
    }

    /// When the message the peer has started and not finished began.
    pub fn unfinished_since(&self) -> Option<Instant> {
        self.unfinished_since
    }

    /// Bytes of unfinished messages this connection holds.
    pub fn held(&self) -> u64 {
        (self.rx.len() + self.msg.as_ref().map_or(0, |m| m.data.len())) as u64
    }

    /// Whether any bytes arrived from the peer since the last call.
    pub fn take_heard(&mut self) -> bool {
        std::mem::take(&mut self.heard)
    }

    /// Frees the write queue's capacity if nothing waits in it: called when
    /// the connection has been quiet for a while.
    pub fn release_idle(&mut self) {
        if self.tx.is_empty() {
            self.tx = VecDeque::new();
        }
    }

    /// Since when output has been waiting for the peer to read.
    pub fn write_blocked_since(&self) -> Option<Instant> {
        self.blocked_since
    }

    /// What is left of `limit` for the next write, counting the time output
    /// has already been waiting (a pong the peer never read, say).
    pub fn write_time_left(&self, limit: Duration) -> Duration {
        self.blocked_since
            .map_or(limit, |since| limit.saturating_sub(since.elapsed()))
    }

    /// The next data message or the peer's close frame: `None` once the
    /// connection is closed. Cancel-safe: whatever was read stays in the
    /// connection for the next call.
    pub async fn next(&mut self) -> Option<Result<Message, ReadError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, ReadError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.meter.as_ref().is_some_and(Meter::over) {
            return Poll::Ready(Some(Err(ReadError::OverBudget)));
        }
        // While publishers may write to the socket (direct.rs) a read must
        // not: a pong or close reply queued while reading is handed back to
        // the session as an empty `Pong`, and the session closes the door
        // before it writes.
        if self.door_open && !self.tx.is_empty() {
            return hand_back();
        }
        // Output is waiting for the peer: write it before reading more.
        // Reading on would answer each ping read with one more pong that
        // cannot go out either.
        if !self.tx.is_empty() {
            match self.poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return self.end(Err(ReadError::Io(e))),
                Poll::Ready(Ok(())) => {}
            }
        }
        if self.got_close {
            // Our reply is written: the close handshake is complete.
            return self.end(Ok(()));
        }
        let r = if self.rx.is_empty() {
            self.read_shared(cx)
        } else {
            self.read_own(cx)
        };
        // A data message returned ends the message the clock was running
        // for: bytes still held belong to the next one, which starts now.
        let finished = matches!(
            r,
            Poll::Ready(Ok(Some(Message::Text(_) | Message::Binary(_))))
        );
        self.account_after(finished);
        // A pong (or a close reply) queued while reading goes out now; with
        // the door open, once the session closed it.
        if !self.tx.is_empty() {
            if self.door_open {
                if r.is_pending() {
                    return hand_back();
                }
            } else if let Poll::Ready(Err(e)) = self.poll_flush(cx) {
                return self.end(Err(ReadError::Io(e)));
            }
        }
        match r {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(msg))) => Poll::Ready(Some(Ok(msg))),
            Poll::Ready(Ok(None)) => self.end(Ok(())),
            Poll::Ready(Err(e)) => self.end(Err(e)),
        }
    }

    /// Marks the stream ended; `Ok` reads as the end of the stream.
    fn end(&mut self, r: Result<(), ReadError>) -> Poll<Option<Result<Message, ReadError>>> {
        self.ended = true;
        Poll::Ready(r.err().map(Err))
    }

    /// Reads into the worker's buffer and parses what arrived there; moves
    /// whatever is left over to `rx`. `Ok(None)`: the peer closed the
    /// stream.
    fn read_shared(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, ReadError>> {
        RX.with_borrow_mut(|buf| {
            debug_assert!(buf.is_empty());
            if buf.capacity() < MIN_SPARE {
                // Reuses the block in place when every payload cut from it
                // has been dropped; otherwise allocates a new one.
                buf.reserve(WORKER_BUF);
            }
            let n = match ready!(read_into(&mut self.io, cx, buf)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
            };
            if n == 0 {
                return Poll::Ready(Ok(None));
            }
            self.heard = true;
            let r = self.parse(buf);
            if !buf.is_empty() {
                // Not ours to keep: the next poll on this thread may be
                // another connection's.
                self.rx.extend_from_slice(buf);
                buf.clear();
            }
            match r {
                Ok(Some(msg)) => Poll::Ready(Ok(Some(msg))),
                // Frames were only control frames, or a frame is partial:
                // read again (the socket reports `Pending` when drained).
                Ok(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
    }

    /// Parses what `rx` holds, reading into it while the frame at its front
    /// is incomplete.
    fn read_own(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, ReadError>> {
        loop {
            let mut rx = std::mem::take(&mut self.rx);
            let r = self.parse(&mut rx);
            self.rx = rx;
            match r {
                Ok(Some(msg)) => return Poll::Ready(Ok(Some(msg))),
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) if self.rx.is_empty() => {
                    // Consumed: the next read goes to the worker buffer.
                    self.rx = BytesMut::new();
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(None) => {}
            }
            // The front frame is incomplete. Text in it that can never
            // become valid fails the connection now, not once the rest of
            // the frame has arrived.
            if let Err(e) = self.check_partial_text() {
                return Poll::Ready(Err(e));
            }
            // Room for the rest of it.
            let need = match peek_header(&self.rx) {
                Some(len) => len.saturating_sub(self.rx.len()),
                None => 14,
            };
            self.rx.reserve(need.min(WORKER_BUF) + OWN_READ.min(need));
            match ready!(read_into(&mut self.io, cx, &mut self.rx)) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => self.heard = true,
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
            }
        }
    }

    /// Takes complete frames off the front of `buf` until one completes a
    /// data message or the peer's close: `Ok(None)` when more bytes are
    /// needed (what remains in `buf` is a partial frame, or nothing).
    fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(h) = self.header(buf)? else {
                return Ok(None);
            };
            if buf.len() < h.len + h.payload {
                return Ok(None);
            }
            buf.advance(h.len);
            self.partial_valid = 0;
            let mut payload = buf.split_to(h.payload);
            unmask(&mut payload, h.mask);
            if let Some(msg) = self.frame(h, payload)? {
                return Ok(Some(msg));
            }
            if self.got_close || buf.is_empty() {
                // Nothing may follow the peer's close; what does is dropped.
                if self.got_close {
                    buf.clear();
                }
                return Ok(None);
            }
        }
    }

    /// Validates what has arrived of a text frame that is still partial
    /// (a single-frame message, or a fragment of one with no character
    /// split across fragments), from where the last check stopped. The
    /// bytes stay masked in `rx`; each piece is unmasked in a copy on the
    /// stack.
    fn check_partial_text(&mut self) -> Result<(), ReadError> {
        let Some(h) = self.header(&self.rx)? else {
            return Ok(());
        };
        let text = match (h.opcode, &self.msg) {
            (1, None) => true,
            (0, Some(m)) => m.text && !m.compressed && m.valid == m.data.len(),
            _ => false,
        };
        if !text || h.rsv1 {
            return Ok(());
        }
        let avail = (self.rx.len() - h.len).min(h.payload);
        let mut pos = self.partial_valid;
        let mut piece = [0u8; 4096];
        while pos < avail {
            let end = (pos + piece.len()).min(avail);
            let c = &mut piece[..end - pos];
            c.copy_from_slice(&self.rx[h.len + pos..h.len + end]);
            let k = pos % 4;
            unmask(
                c,
                [
                    h.mask[k],
                    h.mask[(k + 1) % 4],
                    h.mask[(k + 2) % 4],
                    h.mask[(k + 3) % 4],
                ],
            );
            match std::str::from_utf8(c) {
                Ok(_) => pos = end,
                // A character cut by the end of what arrived: checked
                // again with the bytes that complete it.
                Err(e) if e.error_len().is_none() => {
                    pos += e.valid_up_to();
                    if end == avail {
                        break;
                    }
                }
                Err(_) => return Err(fail(1007, "invalid UTF-8 in text message")),
            }
        }
        self.partial_valid = pos;
        Ok(())
    }

    /// Parses and checks the header at the front of `buf`, before its
    /// payload has arrived: a frame over a limit is refused from its first
    /// bytes.
    fn header(&self, buf: &[u8]) -> Result<Option<Header>, ReadError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0f;
        if b1 & 0x80 == 0 {
            return Err(fail(1002, "protocol error: unmasked client frame"));
        }
        if b0 & 0x30 != 0 {
            return Err(fail(1002, "protocol error: reserved bits set"));
        }
        let len_len = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len = 2 + len_len + 4;
        if buf.len() < len {
            return Ok(None);
        }
        let payload = match len_len {
            0 => u64::from(b1 & 0x7f),
            2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            _ => {
                let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if n >> 63 != 0 {
                    return Err(fail(1002, "protocol error: frame length over 2^63"));
                }
                n
            }
        };
        let mask = buf[len - 4..len].try_into().expect("4 bytes");
        match opcode {
            8..=10 => {
                if !fin {
                    return Err(fail(1002, "protocol error: fragmented control frame"));
                }
                if payload > 125 {
                    return Err(fail(1002, "protocol error: control frame over 125 bytes"));
                }
                if rsv1 {
                    return Err(fail(1002, "protocol error: reserved bits set"));
                }
            }
            0..=2 => {
                match (opcode, &self.msg) {
                    (0, None) => {
                        return Err(fail(1002, "protocol error: continuation without a message"));
                    }
                    (1 | 2, Some(_)) => {
                        return Err(fail(
                            1002,
                            "protocol error: new message inside a fragmented one",
                        ));
                    }
                    _ => {}
                }
                // RSV1 marks a compressed message, on its first frame only.
                if rsv1 && (self.deflate.is_none() || opcode == 0) {
                    return Err(fail(1002, "protocol error: reserved bits set"));
                }
                if payload > self.config.max_frame_size as u64 {
                    return Err(fail(1009, "frame too big"));
                }
                let held = self.msg.as_ref().map_or(0, |m| m.data.len()) as u64;
                if held + payload > self.config.max_message_size as u64 {
                    return Err(fail(1009, "message too big"));
                }
            }
            _ => return Err(fail(1002, "protocol error: reserved opcode")),
        }
        Ok(Some(Header {
            fin,
            rsv1,
            opcode,
            len,
            payload: payload as usize,
            mask,
        }))
    }

    /// Handles one complete frame: `Some` when it completes a data message
    /// or is the peer's close.
    fn frame(&mut self, h: Header, payload: BytesMut) -> Result<Option<Message>, ReadError> {
        match h.opcode {
            9 => {
                if !self.sent_close {
                    self.push(Out::new(0x80 | 10, payload.freeze()));
                }
                Ok(None)
            }
            10 => Ok(None),
            8 => self.close_frame(payload.freeze()).map(Some),
            1 | 2 if h.fin && !h.rsv1 => {
                let data = payload.freeze();
                if h.opcode == 2 {
                    return Ok(Some(Message::Binary(data)));
                }
                match Utf8Bytes::try_from(data) {
                    Ok(t) => Ok(Some(Message::Text(t))),
                    Err(_) => Err(fail(1007, "invalid UTF-8 in text message")),
                }
            }
            1 | 2 => {
                let mut m = Box::new(Assembly {
                    text: h.opcode == 1,
                    compressed: h.rsv1,
                    data: payload,
                    valid: 0,
                });
                m.check_utf8(false)?;
                if h.fin {
                    return self.finish(*m).map(Some);
                }
                self.msg = Some(m);
                Ok(None)
            }
            _ => {
                let mut m = self.msg.take().expect("checked in header()");
                m.data.extend_from_slice(&payload);
                m.check_utf8(false)?;
                if h.fin {
                    return self.finish(*m).map(Some);
                }
                self.msg = Some(m);
                Ok(None)
            }
        }
    }

    /// A message's last frame is in.
    fn finish(&mut self, m: Assembly) -> Result<Message, ReadError> {
        let Assembly {
            text,
            compressed,
            data,
            ..
        } = m;
        let data = if compressed {
            match crate::deflate::inflate(&data, self.config.max_message_size) {
                Ok(d) => d,
                Err(crate::deflate::InflateError::TooBig) => {
                    return Err(fail(1009, "message too big"));
                }
                Err(crate::deflate::InflateError::Corrupt) => {
                    return Err(fail(1002, "protocol error: invalid compressed data"));
                }
            }
        } else {
            data.freeze()
        };
        if !text {
            return Ok(Message::Binary(data));
        }
        Utf8Bytes::try_from(data)
            .map(Message::Text)
            .map_err(|_| fail(1007, "invalid UTF-8 in text message"))
    }

    /// The peer's close frame: checked, answered with the same frame unless
    /// we closed first, and returned.
    fn close_frame(&mut self, payload: Bytes) -> Result<Message, ReadError> {
        let frame = match payload.len() {
            0 => None,
            1 => return Err(fail(1002, "protocol error: close frame with a 1-byte body")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !close_code_allowed(code) {
                    return Err(fail(1002, "protocol error: invalid close code"));
                }
                let Ok(reason) = Utf8Bytes::try_from(payload.slice(2..)) else {
                    return Err(fail(1007, "invalid UTF-8 in close reason"));
                };
                Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason,
                })
            }
        };
        self.got_close = true;
        if !self.sent_close {
            self.sent_close = true;
            // The reply echoes the peer's code and reason.
            self.push(Out::new(0x88, payload));
        }
        Ok(Message::Close(frame))
    }

    /// Updates the unfinished message's start and the budget.
    fn account(&mut self) {
        self.account_after(false);
    }

    /// [`WsConn::account`] after a read; `finished`: it completed a data
    /// message. Each message is timed from its own start: a client that
    /// streams back-to-back messages always holds the first bytes of the
    /// next one when a message completes (a proxy re-chunks them), so
    /// "held nothing" alone would never reset the clock and
    /// `message_timeout` would cut a healthy upload (#23).
    fn account_after(&mut self, finished: bool) {
        let held = self.held();
        if held == 0 {
            self.unfinished_since = None;
        } else if finished || self.unfinished_since.is_none() {
            self.unfinished_since = Some(Instant::now());
        }
        if let Some(m) = self.meter.as_mut() {
            m.update(held);
        }
    }

    fn push(&mut self, out: Out) {
        self.tx_bytes += out.len();
        self.tx.push_back(out);
    }

    /// Whether the output queued should be written before more is queued:
    /// it is over [`HIGH_WATER`], or the socket is not taking it.
    pub fn should_flush(&self) -> bool {
        self.tx_bytes >= HIGH_WATER || self.blocked_since.is_some()
    }

    /// Queues a message for the next `flush`. Nothing is queued after our
    /// close frame. Callers check [`WsConn::should_flush`] between
    /// messages, which bounds the queue.
    pub fn queue(&mut self, msg: Message) {
        if self.sent_close {
            return;
        }
        let out = match msg {
            Message::Text(t) => self.data(OpCode::Data(Data::Text), Bytes::from(t)),
            Message::Binary(b) => self.data(OpCode::Data(Data::Binary), b),
            Message::Ping(p) => Out::new(0x89, p),
            Message::Pong(p) => Out::new(0x8a, p),
            Message::Close(f) => {
                self.sent_close = true;
                let payload = match f {
                    None => Bytes::new(),
                    Some(f) => {
                        let reason = truncate_utf8(&f.reason, 123);
                        let mut p = Vec::with_capacity(2 + reason.len());
                        p.extend_from_slice(&u16::from(f.code).to_be_bytes());
                        p.extend_from_slice(reason.as_bytes());
                        Bytes::from(p)
                    }
                };
                Out::new(0x88, payload)
            }
            // A ready frame: a handler's "do not compress" send.
            Message::Frame(f) => {
                let h = f.header();
                let first = u8::from(h.is_final) << 7 | u8::from(h.rsv1) << 6 | u8::from(h.opcode);
                Out::new(first, f.into_payload())
            }
        };
        self.push(out);
    }

    /// A data message as one frame, compressed when permessage-deflate is
    /// on and it makes the message smaller.
    fn data(&self, op: OpCode, payload: Bytes) -> Out {
        let op = u8::from(op);
        if let Some(p) = &self.deflate
            && let Some(z) = crate::deflate::compress(&payload, p.server_max_window_bits)
        {
            return Out::new(0x80 | 0x40 | op, z);
        }
        Out::new(0x80 | op, payload)
    }

    /// The socket, for a publisher to write whole frames to while the
    /// session waits (direct.rs): only when nothing is queued or blocked,
    /// no close was sent or received, on plain TCP without
    /// permessage-deflate (TLS and compression state belong to this
    /// connection alone).
    pub fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match &self.io {
            Stream::Plain(s)
                if self.deflate.is_none()
                    && self.tx.is_empty()
                    && self.blocked_since.is_none()
                    && !self.sent_close
                    && !self.got_close
                    && !self.ended =>
            {
                Some(s.as_raw_fd())
            }
            _ => None,
        }
    }

    /// The session opened (`true`) or closed the door to its socket
    /// (direct.rs). While it is open, reads queue their control replies
    /// without writing them and return an empty `Pong` to say so.
    pub fn set_door_open(&mut self, open: bool) {
        self.door_open = open;
    }

    /// Whether the rest of a publisher's frame waits at the front of the
    /// queue (see [`WsConn::push_spill`]).
    pub fn has_spill(&self) -> bool {
        self.tx.front().is_some_and(|o| o.head_len == 0)
    }

    /// Queues the rest of a frame a publisher wrote in part (direct.rs),
    /// ahead of everything else.
    pub fn push_spill(&mut self, rest: Bytes) {
        // Nothing was written while the door was open; only control
        // replies a read queued can be here, and they go after it.
        debug_assert!(self.tx_sent == 0);
        let out = Out {
            head: [0; 10],
            head_len: 0,
            payload: rest,
        };
        self.tx_bytes += out.len();
        self.tx.push_front(out);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// `queue` then `flush`.
    pub async fn send(&mut self, msg: Message) -> io::Result<()> {
        self.queue(msg);
        self.flush().await
    }

    /// Writes the queue with vectored writes, everything queued in one
    /// syscall when the socket takes it.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV];
            let mut n = 0;
            let mut skip = self.tx_sent;
            for out in &self.tx {
                for part in [&out.head[..usize::from(out.head_len)], &out.payload[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
                if n + 2 > IOV {
                    break;
                }
            }
            let total: usize = iov[..n].iter().map(|s| s.len()).sum();
            let r = if n > 1 && total <= COPY_MAX && matches!(self.io, Stream::Plain(_)) {
                TX.with_borrow_mut(|tx| {
                    tx.clear();
                    for s in &iov[..n] {
                        tx.extend_from_slice(s);
                    }
                    let r = Pin::new(&mut self.io).poll_write(cx, tx);
                    tx.clear();
                    r
                })
            } else {
                Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..n])
            };
            let written = match r {
                Poll::Pending => {
                    if self.blocked_since.is_none() {
                        self.detach_queued();
                    }
                    self.blocked_since.get_or_insert_with(Instant::now);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => w,
            };
            self.blocked_since = None;
            self.tx_bytes -= written;
            let mut left = self.tx_sent + written;
            while let Some(front) = self.tx.front() {
                if left < front.len() {
                    break;
                }
                left -= front.len();
                self.tx.pop_front();
            }
            self.tx_sent = left;
        }
        // An idle connection keeps no large queue.
        if self.tx.capacity() > 64 {
            self.tx = VecDeque::new();
        }
        // TLS keeps records rustls accepted but the socket did not take.
        if let Stream::Tls(s) = &mut self.io {
            if Pin::new(&mut **s).poll_flush(cx).is_pending() {
                self.blocked_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
            self.blocked_since = None;
        }
        Poll::Ready(Ok(()))
    }

    /// Output that waits for a peer that is not reading must not keep a
    /// worker's read block alive: an echo, or a pong, shares its payload
    /// with the inbound message, which is a slice of the 64 KiB block it
    /// was read into. Many small replies stuck on many stalled
    /// connections would otherwise pin a block each, far more memory
    /// than `send_queue_bytes` counts. Small payloads get a copy of their
    /// own when the socket first stops taking output (no more is read
    /// until it takes it again); a payload over [`DETACH_MAX`] pins at
    /// most twice its size.
    fn detach_queued(&mut self) {
        for out in &mut self.tx {
            if !out.payload.is_empty() && out.payload.len() <= DETACH_MAX {
                out.payload = Bytes::copy_from_slice(&out.payload);
            }
        }
    }

    /// Ends the connection at once, freeing everything it holds (the
    /// partial message, the queued output), then sends `code` in a close
    /// frame written straight to the socket, half-closes it and discards
    /// what the peer still sends (see `session::linger`), for at most
    /// `limit`.
    ///
    /// The close frame is sent only when no earlier output is still
    /// waiting: bytes written after half a frame would corrupt the stream,
    /// and a peer that does not read would not see it anyway.
    pub async fn cut(&mut self, code: u16, reason: &str, limit: Duration, discard: u64) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        self.ended = true;
        self.rx = BytesMut::new();
        self.msg = None;
        let blocked = !self.tx.is_empty();
        self.tx = VecDeque::new();
        self.tx_bytes = 0;
        self.tx_sent = 0;
        self.unfinished_since = None;
        // Gives the bytes back to the budget and leaves it.
        self.meter = None;
        let io = &mut self.io;
        let work = async {
            if !blocked && !self.sent_close {
                let reason = truncate_utf8(reason, 123);
                let mut frame = Vec::with_capacity(4 + reason.len());
                frame.extend_from_slice(&[0x88, 2 + reason.len() as u8]);
                frame.extend_from_slice(&code.to_be_bytes());
                frame.extend_from_slice(reason.as_bytes());
                if io.write_all(&frame).await.is_err() {
                    return;
                }
            }
            // FIN after our close frame, then discard (see session::linger).
            if io.shutdown().await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            let mut left = discard;
            while left > 0 {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n as u64),
                }
            }
        };
        let _ = tokio::time::timeout(limit, work).await;
        self.sent_close = true;
    }
}

impl Assembly {
    /// Validates the text received so far. An incomplete character at the
    /// end may still be completed by the next fragment, unless `last`.
    fn check_utf8(&mut self, last: bool) -> Result<(), ReadError> {
        if !self.text || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.valid..]) {
            Ok(_) => self.valid = self.data.len(),
            Err(e) if e.error_len().is_none() && !last => self.valid += e.valid_up_to(),
            Err(_) => return Err(fail(1007, "invalid UTF-8 in text message")),
        }
        Ok(())
    }
}

/// One read from the socket into the spare capacity of `buf`.
/// What a read returns instead of writing the control reply it queued while
/// the door is open (direct.rs): an empty `Pong`, which the session ignores;
/// its next read writes the reply.
fn hand_back() -> Poll<Option<Result<Message, ReadError>>> {
    Poll::Ready(Some(Ok(Message::Pong(Bytes::new()))))
}

/// A text or binary message as one whole unmasked frame, header and
/// payload in one buffer, for writing to many sockets (direct.rs); `None`
/// for other kinds.
pub fn frame_bytes(msg: &Message) -> Option<Bytes> {
    let (op, payload): (u8, &[u8]) = match msg {
        Message::Text(t) => (0x81, t.as_bytes()),
        Message::Binary(b) => (0x82, b),
        _ => return None,
    };
    let (head, head_len) = header(op, payload.len());
    let head = &head[..usize::from(head_len)];
    let mut f = BytesMut::with_capacity(head.len() + payload.len());
    f.extend_from_slice(head);
    f.extend_from_slice(payload);
    Some(f.freeze())
}

fn read_into(io: &mut Stream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The full length (header and payload) of the frame at the front of
/// `buf`, once its header is there.
fn peek_header(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let (len_len, short) = match b1 & 0x7f {
        126 => (2, 0),
        127 => (8, 0),
        n => (0, u64::from(n)),
    };
    let head = 2 + len_len + 4;
    let payload = match len_len {
        0 => short,
        2 => u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        _ => u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?),
    };
    usize::try_from(payload).ok()?.checked_add(head)
}

/// XORs the client's mask into `data` eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let (words, rest) = data.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ wide).to_ne_bytes();
    }
    // `words` covered a multiple of 8 bytes, so the mask phase restarts at 0.
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Close codes a peer may send (RFC 6455 §7.4, and the IANA registry's
/// 1012-1014); the others fail the connection with 1002.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary (a close reason must fit in a control frame).
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the door is open (publishers may be writing, direct.rs) a
    /// read that queues a pong must not write it: it hands it back to the
    /// session, which writes it once the door is closed.
    #[tokio::test]
    async fn a_pong_waits_while_the_door_is_open() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let config = Config {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
        };
        let mut ws = WsConn::new(Stream::Plain(server), None, config, None);
        assert!(ws.direct_fd().is_some());
        ws.set_door_open(true);
        // A masked ping with a zero mask and payload "hi".
        client.write_all(b"\x89\x82\0\0\0\0hi").await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert!(p.is_empty()),
            other => panic!("expected the hand-back, got {other:?}"),
        }
        assert!(ws.direct_fd().is_none(), "a reply is queued");
        let mut buf = [0u8; 16];
        assert!(
            client.try_read(&mut buf).is_err(),
            "nothing may be written while the door is open"
        );
        ws.set_door_open(false);
        // The next read writes the pong first, then waits for the peer.
        let read = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
        assert!(read.is_err(), "no message from the peer");
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\x8a\x02hi");
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in [0, 1, 3, 7, 8, 9, 15, 16, 17, 100] {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    #[test]
    fn headers_are_built_with_the_shortest_length_form() {
        assert_eq!(Out::new(0x82, Bytes::from(vec![0; 125])).head_len, 2);
        let o = Out::new(0x82, Bytes::from(vec![0; 126]));
        assert_eq!((o.head_len, &o.head[..4]), (4, &[0x82, 126, 0, 126][..]));
        let o = Out::new(0x82, Bytes::from(vec![0; 65536]));
        assert_eq!(o.head_len, 10);
        assert_eq!(&o.head[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        let s = "é".repeat(100); // 200 bytes
        let t = truncate_utf8(&s, 123);
        assert_eq!(t.len(), 122);
        assert_eq!(truncate_utf8("short", 123), "short");
    }

    #[test]
    fn frame_length_is_known_from_the_header() {
        assert_eq!(peek_header(&[0x81]), None);
        assert_eq!(peek_header(&[0x81, 0x85]), Some(2 + 4 + 5));
        assert_eq!(peek_header(&[0x82, 0xfe, 0x01, 0x00]), Some(4 + 4 + 256));
        assert_eq!(peek_header(&[0x82, 0xff, 0, 0]), None);
    }
}
