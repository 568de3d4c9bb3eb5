//! One WebSocket connection, driven by the session task that owns it.
//!
//! tokio-tungstenite's `WebSocketStream` may be split between a reading and
//! a writing task, so it routes every wake-up through two proxy wakers:
//! each poll registers the task's waker in an `AtomicWaker`, and each
//! readiness event wakes a proxy that wakes the task. A wshd session is one
//! task that owns its socket, so none of that is needed: [`WsConn`] hands
//! tungstenite's `WebSocketContext` the socket together with the session's
//! own `Context`, and a readiness event wakes the session directly. On the
//! 32-byte echo benchmark the proxies cost about 7% of wshd's user-space
//! instructions per message (callgrind: 5510 before, 5146 after).
//!
//! The semantics are tokio-tungstenite's: `next` ends with `None` after a
//! clean close, `feed` queues a message (writing what the socket takes now),
//! `flush` waits until everything queued is written.
//!
//! The socket is a [`Stream`]: plain TCP, or TLS (tls.rs). An enum with two
//! arms rather than a generic keeps the session code (session.rs) one type,
//! and rather than a `Box<dyn>` keeps the plain path free of an indirect
//! call: a match per read or write is all it costs.
//!
//! It also watches what the peer can make the server hold:
//! * unfinished incoming messages, followed frame by frame
//!   ([`FrameTracker`]) and counted against the server-wide budget
//!   ([`Meter`]); [`WsConn::cut`] frees them at once;
//! * output tungstenite could not write (pong and close replies included),
//!   since when ([`WsConn::write_blocked_since`]). While output is blocked no
//!   more is read: every ping read queues a pong, so a client that floods
//!   pings and never reads would otherwise grow the write buffer.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

use crate::budget::{FrameTracker, Meter};
use crate::deflate::{Inflow, Params};

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
        bufs: &[io::IoSlice<'_>],
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

/// A server-side WebSocket connection over a TCP or TLS stream.
#[derive(Debug)]
pub struct WsConn {
    ctx: WebSocketContext,
    io: Stream,
    /// A read returned the end of the stream or an error; later reads
    /// return `None`, as a fused stream does.
    ended: bool,
    /// False after a write that could not go out at once: the next `feed`
    /// first flushes what is queued, so the queue cannot grow unbounded.
    ready: bool,
    /// Follows the peer's frames in the bytes read.
    tracker: FrameTracker,
    /// This connection's share of `max_buffered_bytes`, once attached.
    meter: Option<Meter>,
    /// When the unfinished message the peer is sending started.
    unfinished_since: Option<Instant>,
    /// Bytes arrived since [`WsConn::take_heard`] last looked.
    heard: bool,
    /// Since when output tungstenite holds could not be written.
    blocked_since: Option<Instant>,
    /// permessage-deflate, when negotiated (deflate.rs). Boxed: most
    /// connections do without.
    deflate: Option<Box<Deflate>>,
}

/// A connection's permessage-deflate side.
#[derive(Debug)]
struct Deflate {
    params: Params,
    inflow: Inflow,
}

/// Why [`WsConn::next`] failed.
#[derive(Debug)]
pub enum ReadError {
    /// From tungstenite: a protocol violation, an I/O error...
    Ws(WsError),
    /// The server-wide budget for unfinished messages picked this
    /// connection: call [`WsConn::cut`].
    OverBudget,
}

/// The socket and the polling task's context, seen as a blocking-style
/// stream by tungstenite: `Pending` becomes `WouldBlock`, after tokio has
/// registered the task to be woken when the socket is ready.
struct Io<'a, 'b> {
    io: &'a mut Stream,
    cx: &'a mut Context<'b>,
    tracker: &'a mut FrameTracker,
    heard: &'a mut bool,
    /// Inflates compressed messages before tungstenite reads them.
    inflow: Option<&'a mut Inflow>,
    /// How the last write call went: `Some(true)` if it would have blocked.
    /// tungstenite writes its buffer until it is empty or a write blocks, so
    /// the last call tells whether output is left over.
    last_write_blocked: Option<bool>,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (io, cx, heard) = (&mut *self.io, &mut *self.cx, &mut *self.heard);
        let mut src = |b: &mut [u8]| raw_read(io, cx, heard, b);
        let n = match self.inflow.as_deref_mut() {
            None => src(buf)?,
            Some(inflow) => inflow.read(buf, &mut src)?,
        };
        // What tungstenite gets: with permessage-deflate, inflated frames.
        self.tracker.feed(&buf[..n]);
        Ok(n)
    }
}

/// One read from the socket; `Pending` becomes `WouldBlock`.
fn raw_read(
    io: &mut Stream,
    cx: &mut Context<'_>,
    heard: &mut bool,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut buf = ReadBuf::new(buf);
    match Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => {
            let n = buf.filled().len();
            if n > 0 {
                *heard = true;
            }
            Ok(n)
        }
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => {
                self.last_write_blocked = Some(false);
                r
            }
            Poll::Pending => {
                self.last_write_blocked = Some(true);
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // A TCP stream has no user-space buffer; tungstenite's own buffer is
        // written out by `write`. TLS keeps records rustls accepted but the
        // socket did not take yet: those go out here.
        match self.io {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(s) => match Pin::new(&mut **s).poll_flush(self.cx) {
                Poll::Ready(r) => {
                    self.last_write_blocked = Some(false);
                    r
                }
                Poll::Pending => {
                    self.last_write_blocked = Some(true);
                    Err(io::ErrorKind::WouldBlock.into())
                }
            },
        }
    }
}

/// A text or binary message as one compressed (RSV1) frame, when that makes
/// it smaller; anything else as it is. A handler's "do not compress" sends
/// arrive as ready frames (`Message::Frame`) and pass unchanged.
fn compressed(msg: Message, bits: u8) -> Message {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let (op, data) = match &msg {
        Message::Text(t) => (Data::Text, bytes::Bytes::from(t.clone())),
        Message::Binary(b) => (Data::Binary, b.clone()),
        _ => return msg,
    };
    match crate::deflate::compress(&data, bits) {
        Some(z) => {
            let mut f = Frame::message(z, OpCode::Data(op), true);
            f.header_mut().rsv1 = true;
            Message::Frame(f)
        }
        None => msg,
    }
}

/// `WouldBlock` means "woken later": the context was registered.
fn pending_on_block<T>(r: Result<T, WsError>) -> Poll<Result<T, WsError>> {
    match r {
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

impl WsConn {
    /// Wraps an upgraded socket. `early` holds bytes the client sent right
    /// after its handshake request, which the HTTP layer already read.
    pub fn new(io: Stream, early: Option<Vec<u8>>, config: WebSocketConfig) -> WsConn {
        WsConn::with_deflate(io, early, config, None)
    }

    /// [`WsConn::new`], with permessage-deflate when `deflate` is given.
    pub fn with_deflate(
        io: Stream,
        mut early: Option<Vec<u8>>,
        config: WebSocketConfig,
        deflate: Option<Params>,
    ) -> WsConn {
        // Early bytes may hold compressed frames: they go through the
        // inflater like the rest.
        let deflate = deflate.map(|params| {
            Box::new(Deflate {
                params,
                inflow: Inflow::new(config.max_frame_size.unwrap_or(usize::MAX), early.take()),
            })
        });
        let mut tracker = FrameTracker::default();
        let ctx = match early {
            Some(part) => {
                tracker.feed(&part);
                WebSocketContext::from_partially_read(part, Role::Server, Some(config))
            }
            None => WebSocketContext::new(Role::Server, Some(config)),
        };
        WsConn {
            ctx,
            io,
            ended: false,
            ready: true,
            tracker,
            meter: None,
            unfinished_since: None,
            heard: false,
            blocked_since: None,
            deflate,
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
        self.account_read();
    }

    /// The socket, for the lingering close after the WebSocket is done.
    pub fn get_mut(&mut self) -> &mut Stream {
        &mut self.io
    }

    /// When the message the peer has started and not finished began.
    pub fn unfinished_since(&self) -> Option<Instant> {
        self.unfinished_since
    }

    /// Bytes of unfinished messages this connection holds (an upper bound
    /// on what tungstenite buffers for them).
    pub fn held(&self) -> u64 {
        self.tracker.held()
    }

    /// Whether any bytes arrived from the peer since the last call.
    pub fn take_heard(&mut self) -> bool {
        std::mem::take(&mut self.heard)
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

    /// The next message: `None` once the connection is closed.
    /// Cancel-safe: a partly read frame stays buffered for the next call.
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
        let io = &mut Io {
            io: &mut self.io,
            cx,
            tracker: &mut self.tracker,
            heard: &mut self.heard,
            inflow: self.deflate.as_deref_mut().map(|d| &mut d.inflow),
            last_write_blocked: None,
        };
        // Output is waiting for the peer: write it before reading more.
        // Reading on would answer each ping read with one more pong that
        // cannot go out either.
        if self.blocked_since.is_some() {
            let r = self.ctx.flush(io);
            let blocked =
                matches!(&r, Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock);
            let last = io.last_write_blocked;
            self.note_write(last);
            if blocked {
                return Poll::Pending;
            }
            // Other errors surface from the read below.
        }
        let io = &mut Io {
            io: &mut self.io,
            cx,
            tracker: &mut self.tracker,
            heard: &mut self.heard,
            inflow: self.deflate.as_deref_mut().map(|d| &mut d.inflow),
            last_write_blocked: None,
        };
        let r = self.ctx.read(io);
        let last = io.last_write_blocked;
        self.note_write(last);
        self.account_read();
        match ready!(pending_on_block(r)) {
            Ok(msg) => Poll::Ready(Some(Ok(msg))),
            Err(e) => {
                self.ended = true;
                match e {
                    WsError::ConnectionClosed | WsError::AlreadyClosed => Poll::Ready(None),
                    e => Poll::Ready(Some(Err(ReadError::Ws(e)))),
                }
            }
        }
    }

    /// Records how the last write of an operation went.
    fn note_write(&mut self, last_write_blocked: Option<bool>) {
        match last_write_blocked {
            Some(true) => {
                self.blocked_since.get_or_insert_with(Instant::now);
            }
            Some(false) => self.blocked_since = None,
            None => {}
        }
    }

    /// Updates the unfinished message's start and the budget after a read.
    fn account_read(&mut self) {
        let held = self.tracker.held();
        let boundary = self.tracker.take_boundary();
        if held == 0 {
            self.unfinished_since = None;
        } else if boundary || self.unfinished_since.is_none() {
            // A new message started in the bytes just read.
            self.unfinished_since = Some(Instant::now());
        }
        if let Some(m) = self.meter.as_mut() {
            m.update(held);
        }
    }

    /// Ends the connection at once, freeing everything tungstenite holds
    /// for it (the partial message, the read and write buffers), then sends
    /// `code` in a close frame written straight to the socket, half-closes
    /// it and discards what the peer still sends (see
    /// `session::linger`), for at most `limit`.
    ///
    /// The close frame is sent only when no earlier output is still
    /// waiting: bytes written after half a frame would corrupt the stream,
    /// and a peer that does not read would not see it anyway.
    pub async fn cut(&mut self, code: u16, reason: &str, limit: Duration, discard: u64) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        // A context with no buffers: tungstenite allocates its read buffer
        // up front, and we will not read through it again.
        let empty = WebSocketConfig::default().read_buffer_size(0);
        drop(std::mem::replace(
            &mut self.ctx,
            WebSocketContext::new(Role::Server, Some(empty)),
        ));
        self.ended = true;
        self.deflate = None;
        self.tracker = FrameTracker::default();
        self.unfinished_since = None;
        // Gives the bytes back to the budget and leaves it.
        self.meter = None;
        let blocked = self.blocked_since.is_some();
        let io = &mut self.io;
        let work = async {
            if !blocked {
                let reason = &reason.as_bytes()[..reason.len().min(123)];
                let mut frame = Vec::with_capacity(4 + reason.len());
                frame.extend_from_slice(&[0x88, 2 + reason.len() as u8]);
                frame.extend_from_slice(&code.to_be_bytes());
                frame.extend_from_slice(reason);
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
    }

    /// Queues a message and writes what the socket takes now; `flush`
    /// finishes the job.
    pub async fn feed(&mut self, msg: Message) -> Result<(), WsError> {
        if !self.ready {
            self.flush().await?;
        }
        let msg = match &self.deflate {
            Some(d) => compressed(msg, d.params.server_max_window_bits),
            None => msg,
        };
        let mut msg = Some(msg);
        std::future::poll_fn(|cx| {
            let io = &mut Io {
                io: &mut self.io,
                cx,
                tracker: &mut self.tracker,
                heard: &mut self.heard,
                inflow: self.deflate.as_deref_mut().map(|d| &mut d.inflow),
                last_write_blocked: None,
            };
            let msg = msg.take().expect("polled once");
            let r = self.ctx.write(io, msg);
            let last = io.last_write_blocked;
            self.note_write(last);
            Poll::Ready(match r {
                Ok(()) => Ok(()),
                // Queued; it goes out with the next flush.
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready = false;
                    Ok(())
                }
                Err(e) => Err(e),
            })
        })
        .await
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), WsError> {
        let r = std::future::poll_fn(|cx| {
            let io = &mut Io {
                io: &mut self.io,
                cx,
                tracker: &mut self.tracker,
                heard: &mut self.heard,
                inflow: self.deflate.as_deref_mut().map(|d| &mut d.inflow),
                last_write_blocked: None,
            };
            let r = self.ctx.flush(io);
            let last = io.last_write_blocked;
            self.note_write(last);
            pending_on_block(r)
        })
        .await;
        self.ready = true;
        match r {
            // The close handshake just completed: nothing left to write.
            Err(WsError::ConnectionClosed) => Ok(()),
            other => other,
        }
    }

    /// `feed` then `flush`.
    pub async fn send(&mut self, msg: Message) -> Result<(), WsError> {
        self.feed(msg).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    #[test]
    fn data_is_compressed_unless_marked_or_short() {
        let text = "{\"k\":\"v\"},".repeat(100);
        let Message::Frame(f) = compressed(Message::text(text.clone()), 15) else {
            panic!("not compressed")
        };
        assert!(f.header().rsv1 && f.header().is_final);
        assert_eq!(f.header().opcode, OpCode::Data(Data::Text));
        assert!(f.payload().len() < text.len() / 4);
        // A handler's WSHD_SEND_NO_COMPRESS send (a ready frame) and short
        // messages stay as they are.
        let ready = Frame::message(bytes::Bytes::from(text), OpCode::Data(Data::Text), true);
        let Message::Frame(f) = compressed(Message::Frame(ready), 15) else {
            panic!("changed")
        };
        assert!(!f.header().rsv1);
        assert!(matches!(
            compressed(Message::text("short"), 15),
            Message::Text(_)
        ));
    }
}
