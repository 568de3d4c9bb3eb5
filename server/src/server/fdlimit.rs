//! Raises the soft `RLIMIT_NOFILE` to the hard limit at startup. Every
//! connection is a descriptor, and the usual soft default (1024) would cap
//! the server far below `max_connections` while the hard limit (often
//! 524288) allows it.
//!
//! Unsafe is allowed here because `getrlimit`/`setrlimit` are libc calls
//! with no safe wrapper among our dependencies; each call only reads or
//! writes a local `rlimit` struct.
#![allow(unsafe_code)]

/// The descriptor limit after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit to the hard one.
pub fn raise() -> std::io::Result<NoFile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit struct, which `want` is.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = want;
    }
    Ok(NoFile {
        was,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Descriptors the server needs besides its connections: the listener,
/// logs, the watcher, epoll and eventfds per worker, handler files being
/// loaded.
pub fn headroom(workers: usize) -> u64 {
    64 + 2 * workers as u64
}

/// Raises the limit and logs the result: a warning with both numbers when
/// `max_connections` plus the refusal sockets and headroom do not fit.
pub fn raise_and_check(max_connections: usize, reject_slots: usize, workers: usize) {
    let need = (max_connections as u64)
        .saturating_add(reject_slots as u64)
        .saturating_add(headroom(workers));
    match raise() {
        Ok(l) => {
            if l.soft < need {
                tracing::warn!(
                    "file descriptor limit {} is below the {need} that max_connections = {max_connections} \
                     needs (plus {reject_slots} reject_slots and {} for the server itself): connections \
                     beyond it fail to accept. Raise it (systemd LimitNOFILE=, ulimit -n) or lower \
                     max_connections",
                    l.soft,
                    headroom(workers)
                );
            } else if l.soft != l.was {
                tracing::info!(
                    "file descriptor limit raised from {} to {} (the hard limit)",
                    l.was,
                    l.soft
                );
            } else {
                tracing::debug!("file descriptor limit {} (hard {})", l.soft, l.hard);
            }
        }
        Err(e) => tracing::warn!("cannot read or raise the file descriptor limit: {e}"),
    }
}
