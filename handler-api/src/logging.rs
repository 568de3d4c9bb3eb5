//! The logging bridge: the handler's `log` records, its `tracing` events and
//! its panic messages all end up in the server's log through the host's `log`
//! function.
//!
//! A handler library carries its own copy of `log`, `tracing` and std, so
//! nothing the server configured reaches them. The first `init` in the
//! library therefore installs:
//!
//! * a [`log::Log`] that forwards each record to a host `log` function;
//! * a panic hook that forwards the panic's message and location (one line).
//!
//! `tracing` needs nothing more: the SDK enables its `log` feature, and with
//! no tracing subscriber (there never is one inside a handler library)
//! tracing emits every event as a `log` record.
//!
//! **Which host receives a record.** Inside a callback, the host of the
//! instance being called. On a thread started with [`Host::spawn`], that
//! host. Anywhere else (a plain `std::thread`), the host table passed to the
//! most recent `init` in this library: every instance's table points at the
//! same server log, so only the per-instance context may be off.
//!
//! **Level.** Formatting a record costs time even if the server then drops
//! it, so records above a maximum level are dropped before formatting. That
//! level is the one the server writes at (ABI 1.1 `log_level`, asked again at
//! every `init`); the environment variable `WSHD_HANDLER_LOG` (`off`,
//! `error`, `warn`, `info`, `debug`, `trace`) overrides it. A handler can
//! also install its own logger, or call `log::set_max_level` itself.
//!
//! [`Host::spawn`]: crate::Host::spawn

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, RwLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::raw::HostApi;

/// Where this thread's log records go, and whether it is inside a callback.
#[derive(Clone, Copy)]
struct Scope {
    host: Option<HostApi>,
    in_callback: bool,
}

thread_local! {
    static SCOPE: Cell<Scope> = const { Cell::new(Scope { host: None, in_callback: false }) };
    /// The last panic on this thread inside a callback, for the trampoline.
    static PANIC_LINE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The host table of the most recent `init`, for threads outside any scope.
static LATEST: RwLock<Option<HostApi>> = RwLock::new(None);
static INSTALL: Once = Once::new();
static LOGGER: HostLogger = HostLogger;

/// Restores the previous scope when dropped.
pub(crate) struct ScopeGuard {
    prev: Scope,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let prev = self.prev;
        let _ = SCOPE.try_with(|s| s.set(prev));
    }
}

fn enter(scope: Scope) -> ScopeGuard {
    let prev = SCOPE.try_with(|s| s.replace(scope)).unwrap_or(Scope {
        host: None,
        in_callback: false,
    });
    ScopeGuard { prev }
}

/// Entered by every trampoline around the handler's code.
pub(crate) fn enter_callback(api: HostApi) -> ScopeGuard {
    enter(Scope {
        host: Some(api),
        in_callback: true,
    })
}

/// Entered for the whole life of a thread started with `Host::spawn`.
pub(crate) fn enter_thread(api: HostApi) -> ScopeGuard {
    enter(Scope {
        host: Some(api),
        in_callback: false,
    })
}

/// Called by every `init`: remembers the host and installs the logger and
/// the panic hook once per library.
pub(crate) fn install(api: HostApi) {
    *LATEST.write().unwrap_or_else(|e| e.into_inner()) = Some(api);
    INSTALL.call_once(|| {
        // If the handler (or a crate it uses) set a logger first, keep it.
        if log::set_logger(&LOGGER).is_ok() {
            OURS.store(true, Ordering::Relaxed);
        }
        std::panic::set_hook(Box::new(panic_hook));
    });
    // Every init asks again: the server's level may have changed with a
    // config reload since the library's first instance.
    if OURS.load(Ordering::Relaxed) {
        log::set_max_level(level_for(api));
    }
}

/// Whether the SDK's logger is the library's `log` logger (a handler may
/// have installed its own first, and then owns the level too).
static OURS: AtomicBool = AtomicBool::new(false);

/// The level the handler's `log` and `tracing` macros filter at:
/// `WSHD_HANDLER_LOG` if set (to make one handler chattier than the server),
/// else the level the server itself writes at, so `--log-level debug` shows
/// a handler's debug lines too. A host of ABI 1.0 cannot say; then `RUST_LOG`
/// is read as a hint, and the default is `info`.
fn level_for(api: HostApi) -> LevelFilter {
    if let Some(level) = std::env::var("WSHD_HANDLER_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return level;
    }
    if let Some(level) = api.log_level() {
        return level;
    }
    let rust_log = std::env::var("RUST_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if rust_log.contains("trace") {
        LevelFilter::Trace
    } else if rust_log.contains("debug") {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    }
}

/// The host this thread's records go to.
fn route() -> Option<HostApi> {
    let scoped = SCOPE.try_with(|s| s.get().host).ok().flatten();
    scoped.or_else(|| *LATEST.read().unwrap_or_else(|e| e.into_inner()))
}

struct HostLogger;

impl Log for HostLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Some(api) = route() else { return };
        match record.args().as_str() {
            Some(msg) => api.log(record.level(), record.target(), msg),
            None => api.log(record.level(), record.target(), &record.args().to_string()),
        }
    }

    fn flush(&self) {}
}

/// The message of a panic payload (`&str` or `String`; other types are rare).
pub(crate) fn payload_str(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}

/// The panic line the hook recorded for the callback that just panicked.
pub(crate) fn take_panic_line() -> Option<String> {
    PANIC_LINE
        .try_with(|p| p.borrow_mut().take())
        .ok()
        .flatten()
}

/// At most this many bytes of a panic message reach the log.
const MAX_PANIC_LINE: usize = 400;

fn one_line(mut s: String) -> String {
    if s.contains(['\n', '\r']) {
        s = s.replace("\r\n", " / ").replace(['\n', '\r'], " / ");
    }
    if s.len() > MAX_PANIC_LINE {
        let mut end = MAX_PANIC_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Forwards a panic to the host log in one line. Inside a callback the line
/// is left for the trampoline, which logs it together with the callback name
/// and the connection; elsewhere it is logged at once.
fn panic_hook(info: &PanicHookInfo<'_>) {
    let msg = payload_str(info.payload());
    let line = match info.location() {
        Some(loc) => one_line(format!(
            "panicked at {}:{}:{}: {msg}",
            loc.file(),
            loc.line(),
            loc.column()
        )),
        None => one_line(format!("panicked: {msg}")),
    };
    let in_callback = SCOPE.try_with(|s| s.get().in_callback).unwrap_or(false);
    if in_callback
        && PANIC_LINE
            .try_with(|p| p.replace(Some(line.clone())))
            .is_ok()
    {
        return;
    }
    if let Some(api) = route() {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        api.log(Level::Error, "panic", &format!("thread '{name}' {line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn panic_lines_are_short_single_lines() {
        assert_eq!(one_line("a\nb\r\nc".into()), "a / b / c");
        let long = one_line("é".repeat(300));
        assert!(long.len() <= super::MAX_PANIC_LINE + '…'.len_utf8());
        assert!(long.ends_with('…'));
    }
}
