//! [`WriteDeadline`]: a socket wrapper that fails a write which makes no
//! progress for a set time, so a peer that stops reading cannot hold a
//! connection (and its file, buffers and slot) forever.
//!
//! hyper has a read timeout for request heads but nothing for writes: a
//! client that asks for a 10 MB static file and never reads keeps its
//! connection until the kernel gives up, which is never while the peer acks
//! zero-window probes. With this wrapper under hyper, a write or flush that
//! stays pending for `timeout` returns `TimedOut`; hyper then drops the
//! connection. "Progress" is any accepted byte: a slow but steady reader is
//! never cut, only one that stalls for the whole timeout.
//!
//! The WebSocket session takes the raw stream back after the upgrade
//! (http.rs) and applies its own `write_timeout` per frame.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A stream whose writes fail after `timeout` without progress.
#[derive(Debug)]
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    peer: SocketAddr,
    /// Armed when a write first returns `Pending`; disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration, peer: SocketAddr) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            timeout,
            peer,
            stalled: None,
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Passes a ready result through (it is progress, or a real error) and
    /// turns a pending one into `TimedOut` once the deadline has passed.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        // Polling the timer registers this task's waker with it, so the task
        // wakes at the deadline even if the socket never becomes writable.
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        tracing::info!(peer = %self.peer, "HTTP response write made no progress for {timeout:?} (write_timeout); closing the connection");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer read nothing for {timeout:?} (write_timeout)"),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_times_out() {
        // A pipe whose other end never reads: the second write blocks.
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WriteDeadline::new(a, Duration::from_secs(1), peer());
        w.write_all(&[0; 16]).await.unwrap();
        let e = w.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(16);
        let mut w = WriteDeadline::new(a, Duration::from_secs(1), peer());
        let reader = tokio::spawn(async move {
            let mut buf = [0; 8];
            let mut total = 0;
            while total < 160 {
                // Each read comes well within the timeout, but the whole
                // transfer takes far longer than it.
                tokio::time::sleep(Duration::from_millis(500)).await;
                total += b.read(&mut buf).await.unwrap();
            }
        });
        w.write_all(&[0; 160]).await.unwrap();
        reader.await.unwrap();
    }
}
