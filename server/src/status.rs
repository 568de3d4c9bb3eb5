//! The route status table that `wshd --list` prints: each route's
//! versions, their share of new connections, their state (serving, canary,
//! draining, quarantined), open connections and SHA-256.
//!
//! `--list` runs in its own process and loads the handlers itself, so on
//! its own it can only show what a start would serve. A running server
//! with `status_file` set writes its live table there after every reload
//! and rollout step (and every few seconds while a version drains);
//! `--list` with the same config prints that table first, if the process
//! that wrote it is still running.

use std::path::Path;
use std::sync::Arc;

use crate::instance::Instance;

/// One version of a route.
#[derive(Debug, Clone)]
pub struct VersionStatus {
    pub instance: Arc<Instance>,
    /// Share of new connections, in percent.
    pub share: u8,
    pub state: &'static str,
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteStatus {
    pub path: Arc<str>,
    pub aliases: Vec<String>,
    pub versions: Vec<VersionStatus>,
}

/// The table, one line per route version.
pub fn render(routes: &[RouteStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<14} {:<10} {:<6} {:<11} {:>5} {:>6}  {:<64}  FILE",
        "PATH", "HANDLER", "VERSION", "ABI", "STATE", "SHARE", "OPEN", "SHA256"
    );
    for r in routes {
        let path = if r.aliases.is_empty() {
            r.path.to_string()
        } else {
            format!("{} ({})", r.path, r.aliases.join(", "))
        };
        for v in &r.versions {
            let lib = &v.instance.lib;
            let _ = writeln!(
                out,
                "{:<24} {:<14} {:<10} {:<6} {:<11} {:>4}% {:>6}  {:<64}  {}{}{}",
                path,
                lib.desc.name,
                lib.desc.version,
                format!("{}.{}", lib.desc.abi_major, lib.desc.abi_minor),
                v.state,
                v.share,
                v.instance.live.load(std::sync::atomic::Ordering::Relaxed),
                lib.hash,
                lib.source.display(),
                if lib.may_block() { "  [may block]" } else { "" },
                v.instance.handover_note()
            );
        }
    }
    out
}

/// Replaces `path` with the running server's table: written to a
/// temporary beside it and renamed, so a reader never sees half a table.
pub fn write(path: &Path, routes: &[RouteStatus]) -> std::io::Result<()> {
    let body = format!(
        "# wshd pid {} at {}\n{}",
        std::process::id(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        render(routes)
    );
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "status".into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The table a running server wrote to `path`, or why there is none.
pub fn read_running(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("no running server's table in {}: {e}", path.display()))?;
    let pid = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# wshd pid "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| format!("{} is not a wshd status file", path.display()))?;
    // The writer must still be a wshd process: a stale file from a stopped
    // server would show versions nobody serves.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "wshd" {
        return Err(format!(
            "{} was written by pid {pid}, which is no longer a running wshd",
            path.display()
        ));
    }
    Ok(text)
}
