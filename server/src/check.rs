//! `wshd -t` (`--check-config`) and `wshd --list`: load the config and every
//! handler the way startup would (the same loader: sealed memfds, or a fresh
//! private directory that is removed afterwards), print what would be served
//! and every problem, and exit. Nothing is sent to a running server.
//!
//! Exit status ([`crate::cli::exit`]): 2 when wshd would not start with this
//! configuration, 1 when it would but some handler file would not be served.
//! `-t --fatal-only` (the systemd unit's `ExecStartPre`) exits 0 in that
//! second case, printing the same problems as warnings, so one bad handler
//! file does not keep a service from starting that would start without it.
//! Given neither `--config` nor `-w`, they check the installed service's
//! config file ([`default_config`]).
//!
//! `--list` shows what a start with this config and directory would serve:
//! every version `serving` with a 100% share, and the full SHA-256 of each
//! file, ready to paste into `sha256 = "..."` of a `[[route]]`. That table
//! is marked "not live": this process loaded it. With `status_file` set, it
//! first prints the table the running server wrote there: its canaries,
//! shares, draining and quarantined versions (status.rs). Each rollout step
//! is also one log line.
//!
//! Both warn, as the server's log does, about a handler directory without
//! any handler file and about a handler whose descriptor names it
//! differently from its file name.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::cli::{Args, DEFAULT_CONFIG, exit};
use crate::loader::Loader;
use crate::mailbox::Connections;
use crate::registry::{Mode, Registry};
use crate::routing::RouteTable;
use crate::settings::Settings;

/// The config file `-t` / `--list` read when the command line names neither
/// a config file nor a handler directory: `$WSHD_DEFAULT_CONFIG`, else
/// [`DEFAULT_CONFIG`], if that file exists. With `-w`, the command line
/// describes an ad-hoc server (pywebsocket style) that reads no config file,
/// and the check tests exactly that. The server itself never reads a config
/// file it was not given: the unit passes `--config`.
pub fn default_config(args: &Args) -> Option<PathBuf> {
    if !(args.check_config || args.list) || args.config.is_some() || args.handlers.is_some() {
        return None;
    }
    let path = default_config_path();
    path.is_file().then_some(path)
}

fn default_config_path() -> PathBuf {
    std::env::var_os("WSHD_DEFAULT_CONFIG")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from)
}

/// What `-t` adds when it found nothing to check.
pub fn no_default_config_note() -> String {
    format!(
        "wshd: no --config or -w given, and {} does not exist (scripts/install.sh installs it)",
        default_config_path().display()
    )
}

/// Names the config file the check read, for its last line.
fn config_note(settings: &Settings, defaulted: bool) -> String {
    match (&settings.config_path, defaulted) {
        (Some(p), true) => format!(
            "config {}, the default when no --config is given",
            p.display()
        ),
        (Some(p), false) => format!("config {}", p.display()),
        (None, _) => "no config file".into(),
    }
}

/// What the fresh-load table of `--list` is, when no live one is shown.
pub const NOT_LIVE: &str = "not live";

/// Runs the check; `list` prints the route table even when all is well.
/// `defaulted`: the config file is [`default_config`]'s choice.
/// `fatal_only`: handler files that would not be served are warnings, and
/// the status is 0 as long as the server would start.
pub async fn run(settings: &Settings, list: bool, defaulted: bool, fatal_only: bool) -> ExitCode {
    let used = config_note(settings, defaulted);
    let loader = match Loader::new(settings.state_dir.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wshd: cannot set up the handler loader: {e}");
            eprintln!("wshd: configuration test failed: {used}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut registry = Registry::new(loader, Arc::new(Connections::default()), table);
    // This process is not the server: it must not replace the running
    // server's status file with its own table.
    let own = Settings {
        status_file: None,
        ..settings.clone()
    };
    let report = match registry.apply(&own, Mode::Startup).await {
        Ok(r) => r,
        Err(e) => {
            // Fatal at startup too: the server would exit with the same status.
            eprintln!("wshd: {e}");
            eprintln!("wshd: configuration test failed: {used}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let routes = registry.status();
    if list {
        match &settings.status_file {
            Some(path) => {
                match crate::status::read_running(path) {
                    Ok(text) => println!("running server ({}), live:\n{text}", path.display()),
                    Err(why) => println!("{why}"),
                }
                // rollout.rs's test splits the output at this phrase.
                println!(
                    "{NOT_LIVE}: a start with this configuration would serve (loaded afresh by \
                     this --list process):"
                );
            }
            None => println!(
                "{NOT_LIVE}: no status_file is set, so this is what a start with this \
                 configuration would serve, loaded afresh by this --list process, not the state of a \
                 running server (its canaries, draining or quarantined versions and open \
                 connections are not shown). For the live table, set status_file (e.g. \
                 status_file = \"/run/wshd/status\") in the server's config: the running server \
                 writes it, and --list with that config prints it."
            ),
        }
    }
    if list || !report.problems.is_empty() {
        print!("{}", crate::status::render(&routes));
    }
    let kind = if fatal_only { "warning" } else { "problem" };
    for p in &report.problems {
        eprintln!("wshd: {kind}: {p}");
    }
    // What the server's log warns about, which this process does not log.
    if let Ok(scan) = crate::scan::scan(&settings.handler_dir, settings.allow_outside)
        && scan.is_empty()
    {
        eprintln!(
            "wshd: warning: {}",
            crate::scan::nothing_found(&settings.handler_dir)
        );
    }
    let mut named = std::collections::HashSet::new();
    for v in routes.iter().flat_map(|r| &r.versions) {
        let lib = &v.instance.lib;
        if named.insert(lib.source.clone())
            && let Some(w) = lib.name_mismatch()
        {
            eprintln!("wshd: warning: {w}");
        }
    }
    // Redis is a run-time dependency the server retries in the background:
    // unreachable now is worth a warning, not a failed check.
    if let Some(c) = &settings.cluster
        && let Err(e) = crate::cluster::probe(c).await
    {
        eprintln!(
            "wshd: warning: [cluster] redis at {} is unreachable ({e}); wshd would start, serve \
             local topics and retry in the background, with cross-node delivery down until it answers",
            c.describe()
        );
    }
    registry.clear();
    // The TLS pair, loaded as startup and reloads load it.
    let mut tls_failed = false;
    if let Some(t) = &settings.tls {
        match crate::tls::load(t) {
            Ok(l) => {
                for w in &l.warnings {
                    eprintln!("wshd: warning: {w}");
                }
                println!("wshd: TLS certificate {}: {}", t.cert.display(), l.summary);
            }
            Err(e) => {
                eprintln!("wshd: problem: {e}");
                tls_failed = true;
            }
        }
    }
    if tls_failed {
        eprintln!("wshd: configuration test failed: the TLS certificate cannot be served");
        return ExitCode::FAILURE;
    }
    if report.problems.is_empty() {
        println!(
            "wshd: configuration test successful: {} route(s) from {}, {used}",
            routes.len(),
            settings.handler_dir.display()
        );
        ExitCode::from(exit::OK)
    } else if fatal_only {
        println!(
            "wshd: configuration test successful (--fatal-only): wshd would start, serving {} \
             route(s) from {}, without {} handler problem(s) printed above; {used}",
            routes.len(),
            settings.handler_dir.display(),
            report.problems.len()
        );
        ExitCode::from(exit::OK)
    } else {
        eprintln!(
            "wshd: configuration test failed: {} problem(s), {used}",
            report.problems.len()
        );
        ExitCode::from(exit::FAILURE)
    }
}
