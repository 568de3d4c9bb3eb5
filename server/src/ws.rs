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

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

/// A server-side WebSocket connection over a TCP stream.
#[derive(Debug)]
pub struct WsConn {
    ctx: WebSocketContext,
    io: TcpStream,
    /// A read returned the end of the stream or an error; later reads
    /// return `None`, as a fused stream does.
    ended: bool,
    /// False after a write that could not go out at once: the next `feed`
    /// first flushes what is queued, so the queue cannot grow unbounded.
    ready: bool,
}

/// The socket and the polling task's context, seen as a blocking-style
/// stream by tungstenite: `Pending` becomes `WouldBlock`, after tokio has
/// registered the task to be woken when the socket is ready.
struct Io<'a, 'b> {
    io: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // A TCP stream has no user-space buffer; tungstenite's own buffer is
        // written out by `write`.
        Ok(())
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
    pub fn new(io: TcpStream, early: Option<Vec<u8>>, config: WebSocketConfig) -> WsConn {
        let ctx = match early {
            Some(part) => WebSocketContext::from_partially_read(part, Role::Server, Some(config)),
            None => WebSocketContext::new(Role::Server, Some(config)),
        };
        WsConn {
            ctx,
            io,
            ended: false,
            ready: true,
        }
    }

    /// The socket, for the lingering close after the WebSocket is done.
    pub fn get_mut(&mut self) -> &mut TcpStream {
        &mut self.io
    }

    /// The next message: `None` once the connection is closed.
    /// Cancel-safe: a partly read frame stays buffered for the next call.
    pub async fn next(&mut self) -> Option<Result<Message, WsError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let io = &mut Io {
            io: &mut self.io,
            cx,
        };
        match ready!(pending_on_block(self.ctx.read(io))) {
            Ok(msg) => Poll::Ready(Some(Ok(msg))),
            Err(e) => {
                self.ended = true;
                match e {
                    WsError::ConnectionClosed | WsError::AlreadyClosed => Poll::Ready(None),
                    e => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }

    /// Queues a message and writes what the socket takes now; `flush`
    /// finishes the job.
    pub async fn feed(&mut self, msg: Message) -> Result<(), WsError> {
        if !self.ready {
            self.flush().await?;
        }
        let mut msg = Some(msg);
        std::future::poll_fn(|cx| {
            let io = &mut Io {
                io: &mut self.io,
                cx,
            };
            let msg = msg.take().expect("polled once");
            Poll::Ready(match self.ctx.write(io, msg) {
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
            };
            pending_on_block(self.ctx.flush(io))
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
