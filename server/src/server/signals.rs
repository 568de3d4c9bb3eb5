//! Signals, turned into the values [`run`](super::run) takes: SIGHUP is a
//! reload trigger, the first SIGTERM or SIGINT is the shutdown, a second one
//! exits at once (status 1), and SIGUSR1 reopens the log file.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::logging::LogHandle;
use crate::reload::Trigger;

/// The signal handlers, installed.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    /// Installs the handlers. Do it before announcing readiness: a SIGHUP or
    /// SIGUSR1 sent the moment the process looks ready must not meet the
    /// default action, which kills the process.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// Spawns the task that handles them; the returned future completes at
    /// the first SIGTERM or SIGINT.
    pub fn spawn(
        mut self,
        reload: mpsc::Sender<Trigger>,
        log: LogHandle,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut stop = Some(stop_tx);
            loop {
                tokio::select! {
                    _ = self.term.recv() => {}
                    _ = self.int.recv() => {}
                    _ = self.hup.recv() => {
                        tracing::info!("SIGHUP: reloading config and handlers");
                        let _ = reload.send(Trigger::Signal).await;
                        continue;
                    }
                    _ = self.usr1.recv() => {
                        match log.reopen() {
                            Ok(true) => tracing::info!("SIGUSR1: log file reopened"),
                            Ok(false) => tracing::info!("SIGUSR1: logging to stderr, nothing to reopen"),
                            Err(e) => tracing::error!("SIGUSR1: cannot reopen the log file: {e}"),
                        }
                        continue;
                    }
                }
                match stop.take() {
                    Some(s) => {
                        let _ = s.send(());
                    }
                    None => {
                        tracing::warn!("second signal: exiting now");
                        // wshd's own exit, not a handler's (crash.rs).
                        crate::crash::orderly_exit();
                        std::process::exit(1)
                    }
                }
            }
        });
        async move {
            let _ = stop_rx.await;
        }
    }
}
