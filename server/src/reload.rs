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
//!
//! Reload never gives up silently:
//! - a reload that failed for lack of resources (EMFILE, ENFILE, ENOMEM) is
//!   retried with backoff, 100 ms doubling to 10 s, until it succeeds;
//! - inotify drops a watch when its directory is deleted, so the parent is
//!   watched too, and a re-created handler directory is watched again;
//! - each reload step runs under a supervisor: a panic is logged, the loop
//!   goes on with the registry and settings it had, and the step is tried
//!   again with the same backoff;
//! - config changes that need a restart are named in one WARN line each,
//!   and the rest applies.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
    /// Makes the next reload step panic. The server never sends it; tests
    /// of an in-process server do, to prove the supervisor.
    #[doc(hidden)]
    PanicForTest,
}

/// First and last wait between retries of a reload that lacked resources.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

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

/// The file watcher. Events become [`Trigger`]s on the channel it was
/// started with.
pub struct Watch {
    watcher: RecommendedWatcher,
    /// The handler directory as watched (canonical), shared with the
    /// event callback.
    dir: Arc<ArcSwap<PathBuf>>,
    /// Device and inode of the watched directory: a different pair means it
    /// was deleted and re-created (or replaced by a rename).
    identity: Option<(u64, u64)>,
    /// The parent watched for the directory's own creation.
    parent: Option<PathBuf>,
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_owned())
}

fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Watch {
    /// Starts watching the handler directory, its parent and the config
    /// file's directory.
    pub fn start(settings: &Settings, tx: mpsc::Sender<Trigger>) -> notify::Result<Watch> {
        let handler_dir = canonical(&settings.handler_dir);
        let config = settings.config_path.as_deref().map(canonical);
        let config_name = config
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_owned());
        let config_dir = config.as_ref().and_then(|p| p.parent()).map(Path::to_owned);
        let dir = Arc::new(ArcSwap::from_pointee(handler_dir.clone()));
        let hdir = dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(event) = res else { return };
                if !completed(&event.kind) {
                    return;
                }
                let hdir = hdir.load();
                for path in &event.paths {
                    let trigger =
                        if config_name.is_some() && path.file_name() == config_name.as_deref() {
                            Trigger::Config
                        } else if *path == **hdir || (path.starts_with(&**hdir) && relevant(path)) {
                            // The directory itself: created again, removed, renamed.
                            Trigger::Files
                        } else {
                            continue;
                        };
                    // A full channel already holds a pending reload; dropping is fine.
                    let _ = tx.try_send(trigger);
                }
            })?;
        watcher.watch(&handler_dir, RecursiveMode::Recursive)?;
        let mut w = Watch {
            watcher,
            dir,
            identity: identity(&handler_dir),
            parent: None,
        };
        w.watch_parent(&handler_dir);
        if let Some(dir) = config_dir
            && !dir.starts_with(&handler_dir)
            && Some(&dir) != w.parent.as_ref()
        {
            w.watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    }

    /// Watches the handler directory's parent (non-recursively): the
    /// directory's own watch dies with it, and only the parent sees it
    /// come back.
    fn watch_parent(&mut self, handler_dir: &Path) {
        let Some(parent) = handler_dir.parent() else {
            return;
        };
        if self.parent.as_deref() == Some(parent) {
            return;
        }
        match self.watcher.watch(parent, RecursiveMode::NonRecursive) {
            Ok(()) => self.parent = Some(parent.to_owned()),
            Err(e) => tracing::warn!(
                "cannot watch {}: {e}; if the handler directory is deleted and re-created, \
                 send SIGHUP to watch it again",
                parent.display()
            ),
        }
    }

    /// Watches the handler directory again if it is a different directory
    /// than the one watched: re-created, or `handler_dir` changed in the
    /// config.
    fn refresh(&mut self, handler_dir: &Path) {
        let path = canonical(handler_dir);
        let id = identity(&path);
        if path == **self.dir.load() && id == self.identity {
            return;
        }
        let _ = self.watcher.unwatch(&self.dir.load());
        self.dir.store(Arc::new(path.clone()));
        self.identity = id;
        if id.is_none() {
            // Gone: the parent's watch sees it come back.
            return;
        }
        match self.watcher.watch(&path, RecursiveMode::Recursive) {
            Ok(()) => tracing::info!("watching the handler directory {} again", path.display()),
            Err(e) => {
                self.identity = None;
                tracing::warn!(
                    "cannot watch the handler directory {}: {e}; changes there need SIGHUP",
                    path.display()
                )
            }
        }
        self.watch_parent(&path);
    }
}

/// Handler files and directories (which may contain handlers) matter;
/// hidden temporaries of atomic deploys do not until renamed into place.
fn relevant(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (crate::scan::handler_stem(name).is_some() || !name.contains('.'))
}

/// Whether a problem's text says a resource ran out (EMFILE, ENFILE,
/// ENOMEM), which a later attempt may not meet. Problems reach the reload
/// task as text (registry reports); io::Error and dlerror texts both carry
/// strerror's words.
pub fn transient(problem: &str) -> bool {
    [
        "Too many open files",
        "Cannot allocate memory",
        "os error 23)",
        "os error 24)",
        "os error 12)",
    ]
    .iter()
    .any(|s| problem.contains(s))
}

/// The state the reload loop keeps across steps, and across a panic in one.
struct Reloader {
    registry: Registry,
    settings: Settings,
    args: Args,
    watch: Option<Watch>,
    server: Arc<Server>,
}

/// How one step ended.
enum Outcome {
    Done,
    /// Failed for lack of resources: worth retrying.
    Transient(String),
}

/// A pending retry.
struct Retry {
    at: Instant,
    backoff: Duration,
    config: bool,
}

/// The reload task: waits for triggers, debounces, reconciles. It ends when
/// every sender is gone.
pub async fn run(
    registry: Registry,
    settings: Settings,
    args: Args,
    mut rx: mpsc::Receiver<Trigger>,
    watch: Option<Watch>,
    server: Arc<Server>,
) {
    let mut r = Reloader {
        registry,
        settings,
        args,
        watch,
        server,
    };
    let mut retry: Option<Retry> = None;
    // Rollouts (rollout.rs) move on a fault, which notifies the alarm, and
    // at their deadlines (end of a canary period, quarantine warnings).
    let alarm = r.registry.alarm();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let rollout_at = r.registry.next_deadline();
        let first = tokio::select! {
            t = rx.recv() => t,
            _ = tokio::time::sleep_until(retry.as_ref().map_or(far, |p| p.at)), if retry.is_some() => {
                Some(if retry.as_ref().is_some_and(|p| p.config) { Trigger::Signal } else { Trigger::Files })
            }
            _ = alarm.notified() => {
                r.tick().await;
                continue;
            }
            _ = tokio::time::sleep_until(rollout_at.unwrap_or(far)), if rollout_at.is_some() => {
                r.tick().await;
                continue;
            }
        };
        let Some(first) = first else { return };
        let mut config = first != Trigger::Files || retry.as_ref().is_some_and(|p| p.config);
        let mut panic = first == Trigger::PanicForTest;
        // Debounce: wait until the burst of events (cp, cargo) is quiet.
        loop {
            match tokio::time::timeout(r.settings.reload.debounce, rx.recv()).await {
                Ok(Some(t)) => {
                    config |= !matches!(t, Trigger::Files | Trigger::PanicForTest);
                    panic |= t == Trigger::PanicForTest;
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now().expect("monotonic clock"),
        ]);
        let step = CatchUnwind(Box::pin(r.step(config, panic)));
        match step.await {
            Ok(Outcome::Done) => retry = None,
            Ok(Outcome::Transient(why)) => {
                let backoff = retry
                    .as_ref()
                    .map_or(RETRY_FIRST, |p| (p.backoff * 2).min(RETRY_MAX));
                tracing::warn!(
                    "reload ran out of resources ({why}); retrying in {backoff:?} until it succeeds"
                );
                retry = Some(Retry {
                    at: Instant::now() + backoff,
                    backoff,
                    config,
                });
            }
            Err(msg) => {
                crate::metrics::reload(crate::metrics::Reload::Failed);
                // What the step was asked to do is retried: the triggers it
                // merged are gone, and a change may be waiting in them.
                let backoff = retry
                    .as_ref()
                    .map_or(RETRY_FIRST, |p| (p.backoff * 2).min(RETRY_MAX));
                tracing::error!(
                    "reload panicked: {msg}; the reload task goes on with the configuration and \
                     handlers that were serving, and tries again in {backoff:?} (report this as a bug)"
                );
                retry = Some(Retry {
                    at: Instant::now() + backoff,
                    backoff,
                    config,
                });
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
}

impl Reloader {
    /// Moves rollouts along (registry.rs `tick`), under the same panic
    /// supervision as a reload step.
    async fn tick(&mut self) {
        let tick = CatchUnwind(Box::pin(self.registry.tick(&self.settings)));
        if let Err(msg) = tick.await {
            tracing::error!(
                "rollout check panicked: {msg}; the routes keep the versions they had (report \
                 this as a bug)"
            );
        }
    }

    /// One reload: re-read the config if asked, rewatch the handler
    /// directory if it changed, reconcile.
    async fn step(&mut self, config: bool, panic: bool) -> Outcome {
        if panic {
            panic!("a test asked this reload to panic");
        }
        // SIGHUP (and a config change) re-reads the TLS certificate too.
        if config && let Some(tls) = &self.server.tls {
            tls.reload();
        }
        let (mut candidate, mode) = if config {
            match Settings::load(&self.args) {
                Ok(new) => (new, Mode::Config),
                Err(e) => {
                    tracing::error!("config reload failed, keeping the running configuration: {e}");
                    crate::metrics::reload(crate::metrics::Reload::Failed);
                    return Outcome::Done;
                }
            }
        } else {
            (self.settings.clone(), Mode::Files)
        };
        if mode == Mode::Config {
            for w in keep_restart_only(&self.settings, &mut candidate) {
                tracing::warn!("{w}");
            }
        }
        if let Some(w) = &mut self.watch {
            w.refresh(&candidate.handler_dir);
        }
        let mut transient_problem = None;
        match self.registry.apply(&candidate, mode).await {
            Ok(report) => {
                crate::metrics::reload(if report.problems.is_empty() {
                    crate::metrics::Reload::Ok
                } else {
                    crate::metrics::Reload::Partial
                });
                for p in &report.problems {
                    tracing::error!("reload: {p}");
                    if transient_problem.is_none() && p.is_transient() {
                        transient_problem = Some(p.to_string());
                    }
                }
                if mode == Mode::Config {
                    tracing::info!(changed = report.changed, "config reloaded");
                    if candidate.document_root != self.settings.document_root {
                        match candidate
                            .document_root
                            .as_deref()
                            .map(StaticFiles::new)
                            .transpose()
                        {
                            Ok(files) => self.server.files.store(Arc::new(files)),
                            Err(e) => {
                                tracing::error!("document_root: {e}; keeping the previous one")
                            }
                        }
                    }
                }
                self.settings = candidate;
            }
            Err(e) => {
                crate::metrics::reload(crate::metrics::Reload::Failed);
                let e = e.to_string();
                if mode == Mode::Config {
                    tracing::error!("config reload failed, keeping the running configuration: {e}")
                } else {
                    tracing::error!("reload refused, nothing changed: {e}")
                }
                if transient(&e) {
                    transient_problem = Some(e);
                }
            }
        }
        match transient_problem {
            Some(p) => Outcome::Transient(p),
            None => Outcome::Done,
        }
    }
}

/// Settings a running server cannot change: each one that differs in
/// `new` is put back to its running value, and the returned lines say so.
pub fn keep_restart_only(running: &Settings, new: &mut Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if new.$($field).+ != running.$($field).+ {
                warnings.push(format!(
                    "`{}` changed from {:?} to {:?}; this needs a restart, keeping {:?} until then",
                    $key, running.$($field).+, new.$($field).+, running.$($field).+
                ));
                new.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!("listen", listen);
    keep!("listen", listeners);
    keep!("tls", tls);
    keep!("workers", workers);
    keep!("limits.max_connections", limits.max_connections);
    keep!("limits.handshake_timeout", limits.handshake_timeout);
    keep!(
        "limits.max_connections_per_ip",
        limits.max_connections_per_ip
    );
    keep!("limits.handshake_rate_per_ip", limits.handshake_rate_per_ip);
    keep!(
        "limits.handshake_burst_per_ip",
        limits.handshake_burst_per_ip
    );
    keep!("limits.per_ip_exempt", limits.per_ip_exempt);
    keep!("limits.reject_slots", limits.reject_slots);
    keep!("state_dir", state_dir);
    keep!("log_file", log_file);
    keep!("log_level", log_level);
    keep!("pid_file", pid_file);
    keep!("shutdown.timeout", shutdown_timeout);
    keep!("admin.listen", admin);
    keep!("cluster", cluster);
    warnings
}

/// Polls a future inside `catch_unwind`: a panic becomes `Err(message)`
/// instead of ending the task, so the state the future borrowed survives.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        // The state is used after a panic on purpose: the registry publishes
        // a new table only at the end of a reconcile, so a step that panics
        // midway leaves the previous table serving.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_transient() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(transient(&format!("cannot read /h/x_wsh.so: {emfile}")));
        assert!(transient(&format!(
            "{}",
            std::io::Error::from_raw_os_error(libc::ENFILE)
        )));
        assert!(transient(&format!(
            "{}",
            std::io::Error::from_raw_os_error(libc::ENOMEM)
        )));
        assert!(transient(
            "dlopen failed for /h/x_wsh.so: /tmp/x.so: cannot open shared object file: Too many open files"
        ));
        assert!(!transient(&format!(
            "{}",
            std::io::Error::from_raw_os_error(libc::ENOENT)
        )));
        assert!(!transient("refused x: not a loadable ELF shared object"));
    }

    #[test]
    fn restart_only_settings_are_kept_and_named() {
        let args = Args {
            handlers: Some("/h".into()),
            ..Args::default()
        };
        let running = Settings::resolve(&args, None).unwrap();
        let mut new = running.clone();
        new.workers += 1;
        new.limits.max_connections = 7;
        new.limits.send_queue = 9;
        let w = keep_restart_only(&running, &mut new);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("`workers`") && w[0].contains("needs a restart"),
            "{w:?}"
        );
        assert!(w[1].contains("`limits.max_connections`"), "{w:?}");
        assert_eq!(new.workers, running.workers);
        assert_eq!(new.limits.max_connections, running.limits.max_connections);
        // The rest applies.
        assert_eq!(new.limits.send_queue, 9);
    }
}
