//! Logging through tracing: to stderr, or to a file that SIGUSR1 reopens so
//! logrotate can move it away (`postrotate kill -USR1 $(cat wshd.pid)`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

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
        *f.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(true)
    }
}

/// Installs the global subscriber. `level` is a level name or a full
/// tracing filter (`info,handler=debug`); `RUST_LOG` wins if set.
pub fn init(level: &str, file: Option<&Path>) -> anyhow::Result<LogHandle> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f)?,
        _ => {
            EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("--log-level `{level}`: {e}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match file {
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
            Ok(LogHandle::default())
        }
        Some(path) => {
            let f = LogFile {
                path: path.to_owned(),
                file: Arc::new(Mutex::new(open_append(path).map_err(|e| {
                    anyhow::anyhow!("cannot open log file {}: {e}", path.display())
                })?)),
            };
            builder.with_ansi(false).with_writer(f.clone()).init();
            Ok(LogHandle { file: Some(f) })
        }
    }
}
