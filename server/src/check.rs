//! `wshd -t` (`--check-config`) and `wshd --list`: load the config and every
//! handler the way startup would (the same loader: sealed memfds, or a fresh
//! private directory that is removed afterwards), print what would be served
//! and every problem, and exit. Nothing is sent to a running server.
//!
//! `--list` therefore shows what a start with this config and directory
//! would serve: every version `serving` with a 100% share, and the full
//! SHA-256 of each file, ready to paste into `sha256 = "..."` of a
//! `[[route]]`. A running server's canaries, drains and quarantines are in
//! its log: each rollout step is one line (registry.rs, rollout.rs).

use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::host_api::Connections;
use crate::loader::Loader;
use crate::registry::{Mode, Registry, RouteStatus};
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
    let report = match registry.apply(settings, Mode::Startup).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wshd: {e}");
            eprintln!("wshd: configuration test failed");
            return ExitCode::FAILURE;
        }
    };
    let routes = registry.status();
    if list || !report.problems.is_empty() {
        print_list(&routes);
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

/// One line per route version: state, share of new connections, hash.
fn print_list(routes: &[RouteStatus]) {
    println!(
        "{:<24} {:<14} {:<10} {:<6} {:<11} {:>5}  {:<64}  FILE",
        "PATH", "HANDLER", "VERSION", "ABI", "STATE", "SHARE", "SHA256"
    );
    for r in routes {
        let path = if r.aliases.is_empty() {
            r.path.to_string()
        } else {
            format!("{} ({})", r.path, r.aliases.join(", "))
        };
        for v in &r.versions {
            let lib = &v.instance.lib;
            println!(
                "{:<24} {:<14} {:<10} {:<6} {:<11} {:>4}%  {:<64}  {}{}",
                path,
                lib.desc.name,
                lib.desc.version,
                format!("{}.{}", lib.desc.abi_major, lib.desc.abi_minor),
                v.state,
                v.share,
                lib.hash,
                lib.source.display(),
                if lib.may_block() { "  [may block]" } else { "" }
            );
        }
    }
}
