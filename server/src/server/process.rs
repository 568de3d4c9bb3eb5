//! The wshd process around [`run`](super::run): raises the descriptor
//! limit, installs signal handlers, binds, announces readiness (addr file,
//! pid file, systemd) once handlers are loaded, and cleans up at exit.

use crate::cli::Args;
use crate::logging::LogHandle;
use crate::settings::Settings;

use super::signals::Signals;
use super::{Triggers, fdlimit, malloc, pidfile};

/// Runs the server as a process until SIGTERM/SIGINT.
pub async fn serve(args: Args, settings: Settings, log: LogHandle) -> anyhow::Result<()> {
    if !malloc::tune() {
        tracing::debug!("allocator: mallopt not available; big blocks follow the libc's policy");
    }
    fdlimit::raise_and_check(
        settings.limits.max_connections,
        settings.limits.reject_slots,
        settings.workers,
    );
    let signals = Signals::install()?;
    let mut listeners = Vec::new();
    for l in &settings.listeners {
        let listener = tokio::net::TcpListener::bind(l.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", l.addr))?;
        // Accepted on the connection runtime (workers.rs), not on this one.
        listeners.push((listener.into_std()?, l.tls));
    }
    let triggers = Triggers::new();
    let shutdown = signals.spawn(triggers.sender(), log);
    let pid_file = settings.pid_file.clone();
    let addr_file = args.addr_file.clone();
    let ready = |addrs: &[std::net::SocketAddr]| -> anyhow::Result<()> {
        if let Some(p) = &pid_file {
            pidfile::write_pid(p)?;
        }
        if let Some(p) = &addr_file {
            // One line per listener, in config order.
            let lines: String = addrs.iter().map(|a| format!("{a}\n")).collect();
            pidfile::write_replace(p, &lines)
                .map_err(|e| anyhow::anyhow!("cannot write the addr file {}: {e}", p.display()))?;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        Ok(())
    };
    let result = super::run_on(settings, args, listeners, triggers, shutdown, ready).await;
    if let Some(p) = &pid_file {
        pidfile::remove_pid(p);
    }
    result
}
