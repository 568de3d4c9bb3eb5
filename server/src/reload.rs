//! Hot reload: watches the handler directory (recursively) and the config
//! file with notify, debounces the events, and asks the
//! [`Registry`] to reconcile. SIGHUP does the same
//! for the config.
//!
//! Only completed writes count: close-after-write (`cp`), a rename into
//! place (`mv`, editors, atomic deploys) and create/remove (cargo's
//! hard-link uplift, `rm`). A plain modify event is the middle of a write and
//! is ignored. Even so a slow writer can be seen half-way; the loader's ELF
//! check refuses the partial file, the old version keeps serving, and the
//! writer's final close event triggers the retry. Versions are identified by
//! content hash, so `touch` or an identical rebuild changes nothing.

use std::path::Path;
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::cli::Args;
use crate::registry::{Mode, Registry};
use crate::server::Server;
use crate::settings::Settings;
use crate::static_files::StaticFiles;

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Something under the handler directory changed.
    Files,
    /// The config file changed.
    Config,
    /// SIGHUP: re-read the config and rescan.
    Signal,
}

/// Whether an event means a write finished (or a file appeared/vanished).
fn completed(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Create(_)
            | EventKind::Remove(_)
    )
}

/// Starts watching; events become [`Trigger`]s on `tx`. Keep the returned
/// watcher alive.
pub fn watch(settings: &Settings, tx: mpsc::Sender<Trigger>) -> notify::Result<RecommendedWatcher> {
    let handler_dir = settings
        .handler_dir
        .canonicalize()
        .unwrap_or_else(|_| settings.handler_dir.clone());
    let config = settings
        .config_path
        .as_ref()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()));
    let config_name = config
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_owned());
    let config_dir = config.as_ref().and_then(|p| p.parent()).map(Path::to_owned);
    let hdir = handler_dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if !completed(&event.kind) {
            return;
        }
        for path in &event.paths {
            let trigger = if config_name.is_some() && path.file_name() == config_name.as_deref() {
                Trigger::Config
            } else if path.starts_with(&hdir) && relevant(path) {
                Trigger::Files
            } else {
                continue;
            };
            // A full channel already holds a pending reload; dropping is fine.
            let _ = tx.try_send(trigger);
        }
    })?;
    watcher.watch(&handler_dir, RecursiveMode::Recursive)?;
    if let Some(dir) = config_dir
        && !dir.starts_with(&handler_dir)
    {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// Handler files and directories (which may contain handlers) matter;
/// hidden temporaries of atomic deploys do not until renamed into place.
fn relevant(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (crate::scan::handler_stem(name).is_some() || !name.contains('.'))
}

/// The reload task: waits for triggers, debounces, reconciles.
pub async fn run(
    mut registry: Registry,
    mut settings: Settings,
    args: Args,
    mut rx: mpsc::Receiver<Trigger>,
    server: Arc<Server>,
) {
    while let Some(first) = rx.recv().await {
        let mut config = first != Trigger::Files;
        // Debounce: wait until the burst of events (cp, cargo) is quiet.
        loop {
            match tokio::time::timeout(settings.reload.debounce, rx.recv()).await {
                Ok(Some(t)) => config |= t != Trigger::Files,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now().expect("monotonic clock"),
        ]);
        let (candidate, mode) = if config {
            match Settings::load(&args) {
                Ok(new) => (new, Mode::Config),
                Err(e) => {
                    tracing::error!("config reload failed, keeping the running configuration: {e}");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    continue;
                }
            }
        } else {
            (settings.clone(), Mode::Files)
        };
        if candidate.listen != settings.listen {
            tracing::warn!(
                "listen address changed from {} to {}; this needs a restart (keeping {})",
                settings.listen,
                candidate.listen,
                settings.listen
            );
        }
        match registry.apply(&candidate, mode).await {
            Ok(report) => {
                for p in &report.problems {
                    tracing::error!("reload: {p}");
                }
                if mode == Mode::Config {
                    tracing::info!(changed = report.changed, "config reloaded");
                    if candidate.document_root != settings.document_root {
                        match candidate
                            .document_root
                            .as_deref()
                            .map(StaticFiles::new)
                            .transpose()
                        {
                            Ok(files) => server.files.store(Arc::new(files)),
                            Err(e) => {
                                tracing::error!("document_root: {e}; keeping the previous one")
                            }
                        }
                    }
                }
                let listen = settings.listen;
                settings = candidate;
                settings.listen = listen;
            }
            Err(e) if mode == Mode::Config => {
                tracing::error!("config reload failed, keeping the running configuration: {e}")
            }
            Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
}
