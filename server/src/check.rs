//! `wshd -t` (`--check-config`) and `wshd --list`: load the config and every
//! handler the way startup would (the same loader: sealed memfds, or a fresh
//! private directory that is removed afterwards), print what would be served
//! and every problem, and exit. Nothing is sent to a running server.
//!
//! `--list` shows what a start with this config and directory would serve:
//! every version `serving` with a 100% share, and the full SHA-256 of each
//! file, ready to paste into `sha256 = "..."` of a `[[route]]`. With
//! `status_file` set, it first prints the table the running server wrote
//! there: its canaries, shares, draining and quarantined versions
//! (status.rs). Each rollout step is also one log line.

use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::host_api::Connections;
use crate::loader::Loader;
use crate::registry::{Mode, Registry};
use crate::routing::RouteTable;
use crate::settings::Settings;

/// Runs the check; `list` prints the route table even when all is well.
pub async fn run(settings: &Settings, list: bool) -> ExitCode {
    let loader = match Loader::new(settings.state_dir.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wshd: cannot set up the handler loader: {e}");
            return ExitCode::FAILURE;
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
            eprintln!("wshd: {e}");
            eprintln!("wshd: configuration test failed");
            return ExitCode::FAILURE;
        }
    };
    let routes = registry.status();
    if list && let Some(path) = &settings.status_file {
        match crate::status::read_running(path) {
            Ok(text) => println!("running server ({}):\n{text}", path.display()),
            Err(why) => println!("{why}"),
        }
        println!("a start with this configuration would serve:");
    }
    if list || !report.problems.is_empty() {
        print!("{}", crate::status::render(&routes));
    }
    for p in &report.problems {
        eprintln!("wshd: problem: {p}");
    }
    registry.clear();
    if report.problems.is_empty() {
        println!(
            "wshd: configuration test successful: {} route(s) from {}",
            routes.len(),
            settings.handler_dir.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "wshd: configuration test failed: {} problem(s)",
            report.problems.len()
        );
        ExitCode::FAILURE
    }
}
