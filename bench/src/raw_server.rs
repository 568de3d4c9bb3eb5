//! The raw tokio-tungstenite peer: the least a server built on the same
//! library can cost, so wshd's overhead shows up as a ratio to it.
//!
//! Routes: `/echo` returns every text or binary message unchanged; `/chat`
//! broadcasts every message to all `/chat` connections, the sender included.
//! Any other path gets 404 during the handshake.
//!
//! The echo loop feeds every message that is already readable before it
//! flushes, so a burst costs one write; that is the straightforward efficient
//! use of the library, not a special trick.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// Broadcast backlog per chat room; a receiver further behind loses messages.
const CHAT_BACKLOG: usize = 8192;

/// What the raw server is configured with.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// The per-connection WebSocket config (read buffer size in particular).
    pub websocket: WebSocketConfig,
    /// Serve TLS with this configuration ([`crate::tls::server_config`],
    /// the same as wshd's).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Shared state of a running raw server.
#[derive(Debug)]
pub struct RawServer {
    config: RawConfig,
    /// The `/chat` room.
    chat: broadcast::Sender<Message>,
    /// Broadcasts a slow `/chat` receiver missed; printed at shutdown.
    chat_lagged: AtomicU64,
}

/// Which handler a connection asked for in its request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Echo,
    Chat,
}

impl RawServer {
    /// Creates the shared state.
    pub fn new(config: RawConfig) -> Arc<RawServer> {
        let (chat, _) = broadcast::channel(CHAT_BACKLOG);
        Arc::new(RawServer {
            config,
            chat,
            chat_lagged: AtomicU64::new(0),
        })
    }

    /// Broadcasts lost to lagging chat receivers so far.
    pub fn chat_lagged(&self) -> u64 {
        self.chat_lagged.load(Ordering::Relaxed)
    }

    /// Accepts connections until the listener fails; one task per connection.
    pub async fn serve(self: Arc<RawServer>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, _peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Running out of descriptors is transient; keep serving the
                // connections we have.
                Err(error) if is_transient(&error) => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                // A failed session concerns only its own client.
                let _ = server.session(stream).await;
            });
        }
    }

    // The handshake callback's error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    async fn session(&self, stream: TcpStream) -> Result<(), tungstenite::Error> {
        stream.set_nodelay(true)?;
        match &self.config.tls {
            None => self.websocket(stream).await,
            Some(tls) => {
                let stream = tokio_rustls::TlsAcceptor::from(tls.clone())
                    .accept(stream)
                    .await?;
                self.websocket(stream).await
            }
        }
    }

    #[allow(clippy::result_large_err)]
    async fn websocket<S>(&self, stream: S) -> Result<(), tungstenite::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut route = None;
        let callback = |request: &Request, response: Response| {
            route = match request.uri().path() {
                "/echo" => Some(Route::Echo),
                "/chat" => Some(Route::Chat),
                _ => None,
            };
            if route.is_some() {
                Ok(response)
            } else {
                let mut refusal = ErrorResponse::new(Some("no such route".to_owned()));
                *refusal.status_mut() = StatusCode::NOT_FOUND;
                Err(refusal)
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            callback,
            Some(self.config.websocket),
        )
        .await?;
        match route {
            Some(Route::Echo) => echo(ws).await,
            Some(Route::Chat) => self.chat(ws).await,
            None => Ok(()),
        }
    }

    async fn chat<S>(&self, mut ws: WebSocketStream<S>) -> Result<(), tungstenite::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut room = self.chat.subscribe();
        loop {
            tokio::select! {
                incoming = ws.next() => match incoming {
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        // Our own receiver is subscribed, so there is always one.
                        let _ = self.chat.send(message);
                    }
                    // The library sends the close reply on the next read.
                    Some(Ok(_)) => {}
                    None => return Ok(()),
                    Some(Err(error)) => return Err(error),
                },
                outgoing = room.recv() => match outgoing {
                    Ok(message) => {
                        ws.feed(message).await?;
                        while let Ok(more) = room.try_recv() {
                            ws.feed(more).await?;
                        }
                        ws.flush().await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.chat_lagged.fetch_add(missed, Ordering::Relaxed);
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}

/// Echoes text and binary messages. Control frames, the close reply
/// included, are answered by the library while we keep reading.
async fn echo<S>(mut ws: WebSocketStream<S>) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = ws.next().await {
        feed_echo(&mut ws, message?).await?;
        // Batch whatever else is already readable into the same write.
        while let Some(Some(message)) = ws.next().now_or_never() {
            feed_echo(&mut ws, message?).await?;
        }
        ws.flush().await?;
    }
    Ok(())
}

/// Queues the echo of one data message.
async fn feed_echo<S>(
    ws: &mut WebSocketStream<S>,
    message: Message,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match message {
        Message::Text(_) | Message::Binary(_) => ws.feed(message).await,
        _ => Ok(()),
    }
}

/// EMFILE and ENFILE: out of descriptors, which frees up as clients leave.
fn is_transient(error: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    matches!(error.raw_os_error(), Some(EMFILE | ENFILE))
        || error.kind() == io::ErrorKind::ConnectionAborted
}
