//! Open-file limit handling.
//!
//! Idle-connection workloads hold up to 19,000 sockets in one process, so both
//! the load generator and every server it measures need their soft `nofile`
//! limit raised to the hard limit. Children inherit the raised limit, which is
//! how the runner gives it to peers it does not control (Node, Python, wshd).

use rustix::process::{Resource, getrlimit, setrlimit};

/// Raises the soft open-file limit to the hard limit and returns the new soft
/// limit. Returns the current limit unchanged when it cannot be raised.
pub fn raise_nofile() -> u64 {
    let mut limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if limit.current == limit.maximum {
        return current;
    }
    limit.current = limit.maximum;
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => limit.maximum.unwrap_or(u64::MAX),
        Err(_) => current,
    }
}
