//! Error types. Each variant's doc says what the caller should do about it.

use std::path::PathBuf;

/// A problem with the configuration file or flags. Fix the file and reload
/// (SIGHUP) or restart; a running server keeps its previous configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: check the path and permissions.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key or value is wrong; the message says which and how to fix it.
    #[error("{}:{line}:{column}: key `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// A setting that is not tied to one line of the file (for example a
    /// command-line flag, or a conflict between handler files).
    #[error("{0}")]
    Other(String),
}

/// Why a handler file could not be loaded. The server skips the file (at
/// startup) or keeps the previous version serving (on reload); the operator
/// fixes or rebuilds the handler, and the next change to the file retries.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading or copying the file failed: check permissions and disk space.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a complete shared library for this machine. A file
    /// that is still being written looks like this; the server retries when
    /// the write completes.
    #[error("{} is not a loadable ELF shared object: {reason}", path.display())]
    NotElf { path: PathBuf, reason: String },
    /// `dlopen` refused the file (missing symbols, wrong architecture).
    #[error("dlopen failed for {}: {message}", path.display())]
    Dlopen { path: PathBuf, message: String },
    /// The library exports no `wshd_entry_v1`.
    #[error("{}: {message}", path.display())]
    NoEntry { path: PathBuf, message: String },
    /// Too few pthread keys are left to load another version safely: every
    /// version loaded since start stays mapped and keeps its keys. Restart
    /// the server; the versions loaded now keep serving until then.
    #[error(
        "{} not loaded: only {free} of {max} pthread keys are free, and each handler version \
         loaded since start keeps the ones it took (a Rust handler's std takes one); loading \
         more could abort the server. The current version keeps serving: restart wshd \
         (systemctl restart wshd) to load new versions", path.display()
    )]
    OutOfKeys {
        path: PathBuf,
        free: usize,
        max: usize,
    },
    /// The descriptor does not match this server's ABI: the message names the
    /// field, the value found, the value expected and the fix.
    #[error("{}: ABI mismatch in field `{field}`: found {found}, expected {expected}. {fix}", path.display())]
    Abi {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
        fix: &'static str,
    },
}

impl LoadError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            LoadError::Io { path, .. }
            | LoadError::NotElf { path, .. }
            | LoadError::Dlopen { path, .. }
            | LoadError::NoEntry { path, .. }
            | LoadError::OutOfKeys { path, .. }
            | LoadError::Abi { path, .. } => path,
        }
    }

    /// Whether the load failed for lack of a resource (EMFILE, ENFILE,
    /// ENOMEM) rather than because of the file: the same bytes may load on
    /// a later attempt, so they must not be remembered as broken.
    pub fn is_transient(&self) -> bool {
        match self {
            LoadError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ),
            LoadError::Dlopen { message, .. } => crate::reload::transient(message),
            _ => false,
        }
    }
}

/// Why a handler instance could not be created from a loaded library. The
/// route keeps its previous instance (on reload) or is not served.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// init returned an error code; the handler's own log line says why.
    #[error("handler `{handler}` init failed with code {code} ({meaning})")]
    Failed {
        handler: String,
        code: i32,
        meaning: &'static str,
    },
    /// init returned OK but no instance.
    #[error("handler `{handler}` init returned OK but no instance pointer")]
    NullInstance { handler: String },
    /// init did not return within the time limit; the instance is abandoned.
    #[error("handler `{handler}` init did not finish within {secs} s")]
    Timeout { handler: String, secs: u64 },
    /// init unwound through the host (a bug in the handler or the host).
    #[error("handler `{handler}` init crashed: {message}")]
    Crashed { handler: String, message: String },
}

/// Why a handler file's current bytes are not used. The previous version
/// of the file keeps serving where there is one.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    /// stat or read failed: check permissions.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The trust check (trust.rs) refused the file or a directory above it.
    #[error("refused {}: {why}", path.display())]
    Untrusted { path: PathBuf, why: String },
    /// The loader refused the bytes.
    #[error("refused {}: {error}", error.path().display())]
    Load { error: LoadError },
    /// The same bytes failed before; a change to the file retries.
    #[error("{} is unchanged since it failed to load", path.display())]
    StillBroken { path: PathBuf },
    /// A route pins other bytes (`sha256` in `[[route]]`).
    #[error(
        "refused {}: its SHA-256 is {found}, but route {route} pins sha256 = \"{pinned}\"; \
         install the approved build, or review this one and set sha256 to its hash",
        path.display()
    )]
    PinMismatch {
        path: PathBuf,
        route: String,
        found: String,
        pinned: String,
    },
    /// These bytes were quarantined or rolled back; new bytes are loaded.
    #[error(
        "not loading {} again: these bytes (sha256 {hash}) were {why}; install a fixed build",
        path.display()
    )]
    Quarantined {
        path: PathBuf,
        hash: String,
        why: &'static str,
    },
}

/// One problem a reconcile met; none of them stopped the others. Each says
/// what happened and what serves instead.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The scanner skipped a file (not a regular file, outside the root...).
    #[error("skipped {}: {why}", path.display())]
    Skipped { path: PathBuf, why: String },
    /// Two files claim one path.
    #[error("{message} (keeping what served /{name} before)")]
    Conflict { name: String, message: String },
    /// A config route names a handler that is not there.
    #[error("route {route}: {message}; not serving it")]
    MissingHandler { route: String, message: String },
    /// A file's new bytes are not used; `outcome` says what serves.
    #[error("{problem}; {outcome}")]
    File {
        problem: FileProblem,
        outcome: String,
    },
    /// A new instance could not be created; `outcome` says what serves.
    #[error("{error}; {outcome}")]
    Init { error: InitError, outcome: String },
}

impl Problem {
    /// Whether a later attempt may succeed without any change (EMFILE,
    /// ENFILE, ENOMEM): the reload task retries those.
    pub fn is_transient(&self) -> bool {
        match self {
            Problem::File {
                problem: FileProblem::Load { error },
                ..
            } => error.is_transient(),
            Problem::File {
                problem: FileProblem::Io { source, .. },
                ..
            } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ),
            _ => false,
        }
    }
}

/// A human name for a WSHD status code.
pub fn status_name(code: i32) -> &'static str {
    use wshd_handler_api::abi::*;
    match code {
        WSHD_OK => "ok",
        WSHD_ERR_CLOSED => "closed",
        WSHD_ERR_BACKPRESSURE => "backpressure",
        WSHD_ERR_INVALID => "invalid argument",
        WSHD_ERR_STATE => "wrong state",
        WSHD_ERR_REVOKED => "revoked",
        WSHD_ERR_UNSUPPORTED => "unsupported",
        WSHD_ERR_LIMIT => "limit reached",
        WSHD_ERR_PANIC => "handler panicked",
        WSHD_ERR_HANDLER => "handler error",
        _ => "unknown error",
    }
}
