//! Where load may go, and how client connections are opened.
//!
//! Every workload sends traffic only to loopback addresses. [`Target::parse`]
//! refuses anything else, resolving nothing but the literal name `localhost`,
//! so a typo cannot turn a load test into traffic to another host. Source
//! addresses for spreading connections must be loopback too.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyhow::{Context, bail, ensure};
use tokio::net::TcpSocket;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client WebSocket over plain TCP or TLS.
pub type Client = WebSocketStream<crate::tls::ClientStream>;

/// Source ports are picked by us, below the kernel's ephemeral range
/// (32768–60999 by default) so they never collide with the servers' own
/// ephemeral listening ports. Asking the kernel for a port at `bind` time
/// (port 0) scans every bound port and slows to a few hundred connections a
/// second past 10,000 sockets; Linux's fix, IP_BIND_ADDRESS_NO_PORT, is not
/// reachable from safe Rust with our dependencies.
const SOURCE_PORTS: std::ops::Range<u32> = 10_000..32_768;

/// How many ports to try per connection before giving up.
const PORT_ATTEMPTS: usize = 4096;

/// A loopback source address and the next port to try on it.
#[derive(Debug)]
struct Source {
    ip: IpAddr,
    next_port: AtomicU32,
}

/// A loopback `ws://` endpoint plus the source addresses to dial from.
#[derive(Debug)]
pub struct Target {
    /// The URL sent in the handshake.
    pub url: String,
    /// The server's socket address (always loopback).
    pub addr: SocketAddr,
    /// Local addresses to bind before connecting, used round robin. Empty
    /// means let the kernel choose.
    sources: Vec<Source>,
    /// Round-robin cursor over `sources`.
    next_source: AtomicUsize,
    /// For `wss://`: the client TLS configuration ([`Target::with_ca`]).
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    /// True for a `wss://` URL.
    secure: bool,
}

impl Target {
    /// Parses a `ws://` or `wss://HOST:PORT/PATH` URL whose host is a
    /// loopback IP literal or `localhost`. A `wss://` target needs
    /// [`Target::with_ca`] before it can dial.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (secure, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            _ => bail!("{url}: only ws:// and wss:// URLs are supported"),
        };
        let (authority, _path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = authority
            .rsplit_once(':')
            .with_context(|| format!("{url}: the URL needs an explicit port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("{url}: bad port {port:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse()
                .with_context(|| format!("{url}: host must be a loopback IP or localhost"))?
        };
        ensure!(
            ip.is_loopback(),
            "{url}: refusing a non-loopback target; load goes to 127.0.0.0/8 or ::1 only"
        );
        Ok(Target {
            url: url.to_owned(),
            addr: SocketAddr::new(ip, port),
            sources: Vec::new(),
            next_source: AtomicUsize::new(0),
            tls: None,
            secure,
        })
    }

    /// Trusts the PEM certificates in `ca` for a `wss://` target.
    pub fn with_ca(mut self, ca: Option<&std::path::Path>) -> anyhow::Result<Target> {
        match (self.secure, ca) {
            (true, Some(ca)) => self.tls = Some(crate::tls::client_config(ca)?),
            (true, None) => bail!(
                "{}: a wss:// target needs --ca FILE (the server's CA, PEM)",
                self.url
            ),
            (false, Some(_)) => bail!("{}: --ca is for wss:// targets", self.url),
            (false, None) => {}
        }
        Ok(self)
    }

    /// Dials from these local addresses in turn. Each must be loopback and of
    /// the same family as the target.
    pub fn with_sources(mut self, sources: Vec<IpAddr>) -> anyhow::Result<Target> {
        for source in &sources {
            ensure!(
                source.is_loopback(),
                "source address {source} is not loopback"
            );
            ensure!(
                source.is_ipv4() == self.addr.is_ipv4(),
                "source address {source} and target {} differ in family",
                self.addr
            );
        }
        // Start each run somewhere else in the range, away from ports a
        // previous run may have left in TIME_WAIT.
        let offset = std::process::id() * 7919 % (SOURCE_PORTS.end - SOURCE_PORTS.start);
        self.sources = sources
            .into_iter()
            .map(|ip| Source {
                ip,
                next_port: AtomicU32::new(offset),
            })
            .collect();
        Ok(self)
    }

    /// The source addresses, for the record.
    pub fn sources(&self) -> Vec<IpAddr> {
        self.sources.iter().map(|s| s.ip).collect()
    }

    /// The same target with a different path, for routes next to the main one.
    pub fn url_with_path(&self, path: &str) -> String {
        let scheme = if self.secure { "wss://" } else { "ws://" };
        let rest = &self.url[scheme.len()..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        format!("{scheme}{}{path}", &rest[..authority_end])
    }

    /// Opens a TCP connection (from the next source address, if any) and runs
    /// the client handshake for `url`, which must be this target's URL or one
    /// made by [`Target::url_with_path`].
    pub async fn dial(&self, url: &str, config: WebSocketConfig) -> anyhow::Result<Client> {
        let stream = self.connect_tcp().await?;
        let stream = match &self.tls {
            None => crate::tls::ClientStream::Plain(stream),
            Some(config) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::from(self.addr.ip());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS handshake with {}", self.addr))?;
                crate::tls::ClientStream::Tls(Box::new(tls))
            }
        };
        let (client, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .with_context(|| format!("handshake with {url}"))?;
        Ok(client)
    }
}

impl Target {
    /// True for a `wss://` target.
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// Opens a TCP connection to the server (from the next source address,
    /// if any), with Nagle off, for clients that speak WebSocket themselves.
    pub async fn connect_tcp(&self) -> anyhow::Result<tokio::net::TcpStream> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        if !self.sources.is_empty() {
            let index = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            bind_source(&socket, &self.sources[index])?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Binds `socket` to the next free port of `source`, skipping ports in use.
fn bind_source(socket: &TcpSocket, source: &Source) -> anyhow::Result<()> {
    let span = SOURCE_PORTS.end - SOURCE_PORTS.start;
    for _ in 0..PORT_ATTEMPTS {
        let port = SOURCE_PORTS.start + source.next_port.fetch_add(1, Ordering::Relaxed) % span;
        let addr = SocketAddr::new(source.ip, port as u16);
        match socket.bind(addr) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => continue,
            Err(error) => return Err(error).with_context(|| format!("binding {addr}")),
        }
    }
    bail!(
        "no free source port on {} after {PORT_ATTEMPTS} tries",
        source.ip
    )
}

/// Parses a comma-separated list of loopback source addresses.
pub fn parse_sources(list: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut sources = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ip: IpAddr = item
            .parse()
            .with_context(|| format!("bad source address {item:?}"))?;
        if !ip.is_loopback() {
            bail!("source address {ip} is not loopback");
        }
        sources.push(ip);
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_accepted() {
        let target = Target::parse("ws://127.0.0.1:9001/echo").unwrap();
        assert_eq!(target.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(Target::parse("ws://127.9.9.9:1/").unwrap().addr.port(), 1);
        assert!(Target::parse("ws://[::1]:80/echo").unwrap().addr.is_ipv6());
        assert!(Target::parse("ws://localhost:80/x").is_ok());
    }

    #[test]
    fn anything_off_the_machine_is_refused() {
        for url in [
            "ws://10.0.0.1:80/echo",
            "ws://192.168.1.2:80/echo",
            "ws://8.8.8.8:80/echo",
            "ws://example.com:80/echo",
            "wss://10.0.0.1:443/echo",
            "ws://127.0.0.1/echo",
        ] {
            assert!(Target::parse(url).is_err(), "{url} should be refused");
        }
    }

    #[test]
    fn sources_must_be_loopback() {
        assert_eq!(parse_sources("127.0.0.1, 127.0.0.2").unwrap().len(), 2);
        assert!(parse_sources("127.0.0.1,10.1.1.1").is_err());
        let target = Target::parse("ws://127.0.0.1:1/echo").unwrap();
        assert!(target.with_sources(vec!["::1".parse().unwrap()]).is_err());
    }

    #[test]
    fn wss_needs_a_ca() {
        let target = Target::parse("wss://127.0.0.1:443/echo").unwrap();
        assert!(target.with_ca(None).is_err());
        assert_eq!(
            Target::parse("wss://127.0.0.1:443/echo")
                .unwrap()
                .url_with_path("/chat"),
            "wss://127.0.0.1:443/chat"
        );
    }

    #[test]
    fn sibling_routes_keep_the_authority() {
        let target = Target::parse("ws://127.0.0.1:9001/echo").unwrap();
        assert_eq!(target.url_with_path("/chat"), "ws://127.0.0.1:9001/chat");
    }
}
