//! `wshd -t` (`--check-config`) and `wshd --list`: load the config and every
//! handler the way startup would (the same loader: sealed memfds, or a fresh
//! private directory that is removed afterwards), print what would be served
//! and every problem, and exit. Nothing is sent to a running server.

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
    let report = match registry.apply(settings, Mode::Startup).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wshd: {e}");
            eprintln!("wshd: configuration test failed");
            return ExitCode::FAILURE;
        }
    };
    let table = registry.table();
    let routes = table.primary_routes();
    if list || !report.problems.is_empty() {
        println!(
            "{:<24} {:<14} {:<10} {:<6} {:<13} FILE",
            "PATH", "HANDLER", "VERSION", "ABI", "HASH"
        );
        for r in &routes {
            let lib = &r.instance.lib;
            let aliases: Vec<&str> = table
                .routes
                .iter()
                .filter(|(p, x)| Arc::ptr_eq(x, r) && **p != r.path)
                .map(|(p, _)| &**p)
                .collect();
            let path = if aliases.is_empty() {
                r.path.to_string()
            } else {
                format!("{} ({})", r.path, aliases.join(", "))
            };
            println!(
                "{:<24} {:<14} {:<10} {:<6} {:<13} {}{}",
                path,
                lib.desc.name,
                lib.desc.version,
                format!("{}.{}", lib.desc.abi_major, lib.desc.abi_minor),
                lib.short_hash(),
                lib.source.display(),
                if lib.may_block() { "  [may block]" } else { "" }
            );
        }
    }
    for p in &report.problems {
        eprintln!("wshd: problem: {p}");
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
