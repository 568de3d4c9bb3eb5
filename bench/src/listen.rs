//! Where a bench peer listens, and how it tells the runner: the `-H`, `-p`
//! and `--addr-file` flags the peer binaries share, and the bind that
//! writes `HOST:PORT` to the address file (atomically, via a rename) so a
//! runner can wait for it instead of sleeping.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;

/// The listening flags of a peer binary (`#[command(flatten)]`).
#[derive(Debug, clap::Args)]
pub struct Listen {
    /// Address to bind.
    #[arg(short = 'H', long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one.
    #[arg(short, long, default_value_t = 0)]
    pub port: u16,
    /// Write the bound `host:port` to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

impl Listen {
    /// Binds, writes the address file, and prints `listening on HOST:PORT`.
    pub async fn bind(&self) -> anyhow::Result<TcpListener> {
        let listener = TcpListener::bind(SocketAddr::new(self.host, self.port))
            .await
            .with_context(|| format!("binding {}:{}", self.host, self.port))?;
        let bound = listener.local_addr()?;
        if let Some(path) = &self.addr_file {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, bound.to_string())
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        println!("listening on {bound}");
        Ok(listener)
    }
}
