//! Logging through tracing: to stderr, or to a file that SIGUSR1 reopens so
//! logrotate can move it away (`postrotate kill -USR1 $(cat wshd.pid)`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A log file that can be reopened at the same path.
#[derive(Debug, Clone)]
struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Locked access to the current file for one event.
pub struct LogWriter<'a>(MutexGuard<'a, File>);

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = LogWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.file.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Lets the server reopen the log file.
#[derive(Debug, Clone, Default)]
pub struct LogHandle {
    file: Option<LogFile>,
}

impl LogHandle {
    /// Reopens the log file; `Ok(false)` when logging to stderr.
    pub fn reopen(&self) -> std::io::Result<bool> {
        let Some(f) = &self.file else {
            return Ok(false);
        };
        let new = open_append(&f.path)?;
        // The crash line (crash.rs) goes to the new file from now on.
        crate::crash::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&new));
        *f.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(true)
    }
}

/// Installs the global subscriber. `level` is a level name or a list of
/// `target=level` directives (`info,handler=debug`); `RUST_LOG` wins if set.
///
/// The filter is a `Targets` filter rather than an `EnvFilter`: the latter
/// takes a lock on every span enter and exit (to support span-field
/// directives), and every connection's span is entered on every poll.
pub fn init(level: &str, file: Option<&Path>) -> anyhow::Result<LogHandle> {
    let spec = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => level.to_owned(),
    };
    // `RUST_LOG` gets the same check as `log_level`: a bare word such as
    // "loud" parses as a target name and would silence every line.
    crate::config::check_log_level(&spec)
        .map_err(|e| anyhow::anyhow!("log level `{spec}`: {e}"))?;
    let filter: Targets = spec.parse().map_err(|e| {
        anyhow::anyhow!(
            "log level `{spec}`: {e}; use error, warn, info, debug, trace or target=level"
        )
    })?;
    // The most verbose level any directive asks for. It also caps the `log`
    // crate's max level (bridged into tracing), so the `log::trace!` calls in
    // tungstenite's frame path stay a single comparison when not wanted.
    let max = filter
        .iter()
        .map(|(_, level)| level)
        .chain(filter.default_level())
        .max()
        .unwrap_or(tracing::level_filters::LevelFilter::OFF);
    let builder = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_target(false);
    match file {
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .finish()
                .with(filter)
                .init();
            Ok(LogHandle::default())
        }
        Some(path) => {
            let file = open_append(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            // A handler crash writes its line here too (crash.rs).
            crate::crash::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
            let f = LogFile {
                path: path.to_owned(),
                file: Arc::new(Mutex::new(file)),
            };
            builder
                .with_ansi(false)
                .with_writer(f.clone())
                .finish()
                .with(filter)
                .init();
            Ok(LogHandle { file: Some(f) })
        }
    }
}
