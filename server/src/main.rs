//! The `wshd` binary: parse flags, load settings, start logging, run.
//! Exit statuses follow one scheme, [`wshd::cli::exit`] (also in `--help`).

use std::process::ExitCode;

use clap::Parser;
use wshd::cli::{Args, exit};
use wshd::error::ConfigError;
use wshd::settings::Settings;

fn main() -> ExitCode {
    let args = Args::parse();
    // After parsing, so clap's own exits (--help, a bad flag: status 2) stay
    // as they are; before anything loads handler code. From here on, an
    // exit() that is not wshd's own ends the process with status 70
    // (crash.rs).
    if let Err(e) = wshd::crash::install() {
        eprintln!("wshd: cannot install the crash reporting hooks: {e}");
        return ExitCode::from(exit::FAILURE);
    }
    let code = run(args);
    wshd::crash::orderly_exit();
    code
}

fn run(mut args: Args) -> ExitCode {
    let checking = args.check_config || args.list;
    let defaulted = wshd::check::default_config(&args);
    if let Some(p) = &defaulted {
        args.config = Some(p.clone());
    }
    let settings = match Settings::load(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wshd: {e}");
            if checking && args.config.is_none() && args.handlers.is_none() {
                eprintln!("{}", wshd::check::no_default_config_note());
            }
            if checking {
                eprintln!("wshd: configuration test failed");
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    // The control runtime: signals, reloads, handler init. It needs one
    // thread; connections run on the worker runtime (workers.rs),
    // and blocking work (file reads, dlopen, init) goes to its blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wshd: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    if checking {
        return runtime.block_on(wshd::check::run(
            &settings,
            args.list,
            defaulted.is_some(),
            args.fatal_only,
        ));
    }
    let log = match wshd::logging::init(&settings.log_level, settings.log_file.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wshd: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    match runtime.block_on(wshd::server::serve(args, settings, log)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wshd: {e:#}");
            // A configuration the handler directory contradicts (a route
            // naming a missing handler, two files claiming one path) is
            // found only once the directory is scanned, after the bind:
            // still a configuration error, as `-t` reports it.
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(exit::CONFIG)
            } else {
                ExitCode::from(exit::FAILURE)
            }
        }
    }
}
