//! The `wshd` binary: parse flags, load settings, start logging, run.

use std::process::ExitCode;

use clap::Parser;
use wshd::cli::Args;
use wshd::settings::Settings;

fn main() -> ExitCode {
    let args = Args::parse();
    // After parsing, so clap's own exits (--help, a bad flag) stay as they
    // are; before anything loads handler code. From here on, an exit() that
    // is not wshd's own ends the process with status 70 (crash.rs).
    if let Err(e) = wshd::crash::install() {
        eprintln!("wshd: cannot install the crash reporting hooks: {e}");
        return ExitCode::FAILURE;
    }
    let code = run(args);
    wshd::crash::orderly_exit();
    code
}

fn run(args: Args) -> ExitCode {
    let settings = match Settings::load(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wshd: {e}");
            return ExitCode::from(2);
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
            return ExitCode::FAILURE;
        }
    };
    if args.check_config || args.list {
        return runtime.block_on(wshd::check::run(&settings, args.list));
    }
    let log = match wshd::logging::init(&settings.log_level, settings.log_file.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wshd: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(wshd::server::serve(args, settings, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
