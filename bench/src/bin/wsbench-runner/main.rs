//! wsbench-runner: measures wshd against its peers in one run and writes
//! BENCHMARKS.md plus bench/chart.svg.
//!
//! ```text
//! cargo run --release -p bench --bin wsbench-runner            # full run, ~20 min
//! cargo run --release -p bench --bin wsbench-runner -- --smoke # CI smoke, < 2 min
//! ```
//!
//! It builds the bench binaries (and wshd with its echo and chat handlers when
//! wshd is among the peers) in release, prepares the other peers (a venv for
//! pywebsocket3, `npm ci` for Node ws), starts every server on its own
//! loopback port, then runs each workload against each peer, round after
//! round, through the `wsbench` binary. Every server is stopped by PID at the
//! end, on errors, and on SIGINT/SIGTERM.
//!
//! Layout: `plan` (workloads), `peers` (starting and stopping servers),
//! `results` (medians), `report` (the Markdown), `chart` (the SVG).

mod chart;
mod peers;
mod plan;
mod report;
mod results;

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bench::{Record, limits};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use peers::{Launch, Layout, PeerKind, RunningPeer, stop_child, tail};
use plan::{Route, Workload};
use report::{Environment, ReportInput};
use results::Results;

/// Set by SIGINT/SIGTERM; the run stops at the next step and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

/// Runs wshd and its peers through the benchmark workloads and writes the report.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// CI smoke run: one short round, wshd, raw (4 KiB) and fastwebsockets, plain, over TLS,
    /// pinned and with permessage-deflate, tiny sizes; writes the report to a temp dir and
    /// fails on any error.
    #[arg(long)]
    smoke: bool,
    /// Rounds (default 3, smoke 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Peers to run, comma-separated: wshd, wshd1, raw, raw4k, raw4k1, fastws, ws, pyws, wshdm,
    /// wshd-tls, raw4k-tls (default all; smoke: wshd,raw4k,fastws,wshd-tls,raw4k-tls).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Only these workloads (keys as in the report), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Report path (default: BENCHMARKS.md at the workspace root; smoke: a temp file).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Chart path (default: bench/chart.svg; smoke: next to the report).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Use the binaries already built instead of running cargo first.
    #[arg(long)]
    no_build: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("wsbench-runner: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns Ok(false) when the run finished but something failed that the
/// mode treats as fatal (any failure in smoke mode).
fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let nofile = limits::raise_nofile();
    watch_signals();

    let layout = layout(args.smoke)?;
    let workloads = select_workloads(&args)?;
    let requested = select_peers(&args)?;
    let rounds = args.rounds.unwrap_or(if args.smoke { 1 } else { 3 });
    eprintln!(
        "wsbench-runner: {} workload(s) × {} peer(s) × {rounds} round(s); open-file limit {nofile}; logs in {}",
        workloads.len(),
        requested.len(),
        layout.run_dir.display()
    );

    let mut unavailable: Vec<(PeerKind, String)> = Vec::new();
    if !args.no_build {
        build(&layout, &["-p", "bench", "--bins"]).context("building the bench crate")?;
        let wshd = ["-p", "wshd", "-p", "echo-handler", "-p", "chat-handler"];
        if requested.iter().any(|p| p.is_wshd())
            && let Err(error) = build(&layout, &wshd)
        {
            for &peer in requested.iter().filter(|p| p.is_wshd()) {
                unavailable.push((peer, format!("build failed: {error:#}")));
            }
        }
    }

    let mut env = Environment::gather(&layout.repo);
    let mut launches: Vec<Launch> = Vec::new();
    for &kind in &requested {
        if unavailable.iter().any(|(p, _)| *p == kind) {
            continue;
        }
        match peers::prepare(kind, &layout) {
            Ok(launch) => {
                if !launch.version.is_empty() {
                    env.peers.push((kind, launch.version.clone()));
                }
                launches.push(launch);
            }
            Err(error) => unavailable.push((kind, format!("{error:#}"))),
        }
    }

    let mut results = Results::default();
    let results_path = layout.run_dir.join("results.jsonl");
    let mut results_file = File::create(&results_path)?;
    let mut running: Vec<(Launch, Option<RunningPeer>, u32)> =
        launches.into_iter().map(|l| (l, None, 0)).collect();

    let progress = progress_bar((rounds as usize * workloads.len() * running.len()) as u64);
    'rounds: for round in 0..rounds {
        for workload in &workloads {
            // Rotate the peer order each round so no peer always goes first.
            let count = running.len().max(1);
            for step in 0..running.len() {
                if STOP.load(Ordering::Relaxed) {
                    break 'rounds;
                }
                let index = (step + round as usize) % count;
                let (launch, slot, starts) = &mut running[index];
                let kind = launch.kind;
                progress.set_message(format!(
                    "round {} {} {}",
                    round + 1,
                    workload.key,
                    kind.key()
                ));
                let path = match workload.route {
                    Route::Echo => Some("/echo"),
                    Route::Chat => kind.chat_path(),
                    Route::EchoDeflate => kind.deflate_path(),
                };
                let Some(path) = path.filter(|_| workload.runs_on(kind)) else {
                    progress.inc(1);
                    continue;
                };
                // The TLS peers take the wss rows only.
                if kind.is_tls() && !workload.tls {
                    progress.inc(1);
                    continue;
                }
                if workload.fresh_server || !slot.as_mut().is_some_and(RunningPeer::is_alive) {
                    *slot = None;
                    *starts += 1;
                    let cpu = workload.pinned.then_some(plan::SERVER_CPU);
                    match launch.start(&layout, *starts, cpu) {
                        Ok(peer) => *slot = Some(peer),
                        Err(error) => {
                            let mut record = Record::new("start", "");
                            record.error(format!("{error:#}"));
                            say(
                                &progress,
                                &format!(
                                    "{} {}: could not start: {error:#}",
                                    workload.key,
                                    kind.key()
                                ),
                            );
                            results.push(workload.key, kind, record);
                            progress.inc(1);
                            continue;
                        }
                    }
                }
                let peer = slot.as_ref().expect("started above");
                let record = run_wsbench(&layout, peer, workload, path, round);
                say(
                    &progress,
                    &format!(
                        "round {} {} {}: {}",
                        round + 1,
                        workload.key,
                        kind.key(),
                        summary(workload, &record)
                    ),
                );
                writeln!(results_file, "{}", record.to_json_line())?;
                results.push(workload.key, kind, record);
                if workload.fresh_server {
                    *slot = None;
                }
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    // Stop every server now rather than at the end of the function.
    running.clear();
    let stopped_early = STOP.load(Ordering::Relaxed);

    let out = args.out.clone().unwrap_or_else(|| {
        if args.smoke {
            layout.run_dir.join("BENCHMARKS.md")
        } else {
            layout.repo.join("BENCHMARKS.md")
        }
    });
    let chart_path = args.chart.clone().unwrap_or_else(|| {
        if args.smoke {
            layout.run_dir.join("chart.svg")
        } else {
            layout.repo.join("bench/chart.svg")
        }
    });
    let drew = chart::draw(&chart_path, &workloads, &requested, &results)
        .with_context(|| format!("drawing {}", chart_path.display()))?;
    let previous = fs::read_to_string(&out).ok();
    let command = if args.smoke {
        "cargo run --release -p bench --bin wsbench-runner -- --smoke".to_owned()
    } else {
        let given: Vec<String> = std::env::args().skip(1).collect();
        let mut command = "cargo run --release -p bench --bin wsbench-runner".to_owned();
        if !given.is_empty() {
            command = format!("{command} -- {}", given.join(" "));
        }
        command
    };
    let markdown = report::render(
        &ReportInput {
            env: &env,
            workloads: &workloads,
            peers: &requested,
            results: &results,
            unavailable: &unavailable,
            rounds,
            smoke: args.smoke,
            chart: drew.then(|| relative_to(&chart_path, &out)),
            elapsed_s: started.elapsed().as_secs_f64(),
            command,
        },
        previous.as_deref(),
    );
    fs::write(&out, markdown).with_context(|| format!("writing {}", out.display()))?;

    let failed: Vec<String> = results
        .failed()
        .map(|(workload, peer, record)| {
            format!(
                "{workload} {peer}: {} errors, {} mismatches {}",
                record.errors,
                record.mismatches,
                record.error_samples.first().cloned().unwrap_or_default()
            )
        })
        .collect();
    for (peer, why) in &unavailable {
        eprintln!("wsbench-runner: {} not measured: {why}", peer.key());
    }
    for line in &failed {
        eprintln!("wsbench-runner: FAILED {line}");
    }
    eprintln!(
        "wsbench-runner: wrote {}{} and {} in {:.0} s ({} failed runs)",
        out.display(),
        if drew {
            format!(", {}", chart_path.display())
        } else {
            String::new()
        },
        results_path.display(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    if stopped_early {
        bail!("stopped by a signal before the run finished");
    }
    Ok(!args.smoke || (failed.is_empty() && unavailable.is_empty()))
}

/// Picks the paths: the workspace this crate lives in, the target directory
/// this binary was built into, and a fresh run directory.
fn layout(smoke: bool) -> anyhow::Result<Layout> {
    let exe = std::env::current_exe()?;
    let release = exe.parent().context("executable has no directory")?;
    let target_dir = release
        .parent()
        .context("executable is not in a cargo target dir")?
        .to_path_buf();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("bench crate has no parent")?
        .to_path_buf();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let run_dir = if smoke {
        std::env::temp_dir().join(format!("wsbench-smoke-{stamp}"))
    } else {
        target_dir.join("bench-run").join(stamp.to_string())
    };
    fs::create_dir_all(&run_dir)?;
    Ok(Layout {
        repo,
        target_dir,
        run_dir,
    })
}

fn select_workloads(args: &Args) -> anyhow::Result<Vec<Workload>> {
    let mut workloads = if args.smoke {
        plan::smoke()
    } else {
        plan::full()
    };
    if let Some(only) = &args.only {
        for key in only {
            if !workloads.iter().any(|w| w.key == key) {
                bail!("unknown workload {key:?}");
            }
        }
        workloads.retain(|w| only.iter().any(|k| k == w.key));
    }
    // The pinned configuration needs a CPU for the server and another for
    // the load generator (CPUs 0 and 1).
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("wsbench-runner: {cpus} CPU(s): skipping the pinned workloads");
        workloads.retain(|w| !w.pinned);
    }
    Ok(workloads)
}

fn select_peers(args: &Args) -> anyhow::Result<Vec<PeerKind>> {
    let keys: Vec<String> = match &args.peers {
        Some(keys) => keys.clone(),
        None if args.smoke => ["wshd", "raw4k", "fastws", "wshd-tls", "raw4k-tls"]
            .map(str::to_owned)
            .to_vec(),
        None => PeerKind::ALL.iter().map(|p| p.key().to_owned()).collect(),
    };
    let mut peers = Vec::new();
    for key in keys {
        let peer = PeerKind::from_key(&key).with_context(|| format!("unknown peer {key:?}"))?;
        if !peers.contains(&peer) {
            peers.push(peer);
        }
    }
    // Keep table order whatever the command line said.
    peers.sort_by_key(|p| PeerKind::ALL.iter().position(|q| q == p));
    Ok(peers)
}

/// `cargo build --release` into the target dir this runner lives in.
fn build(layout: &Layout, packages: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release"])
        .args(packages)
        .arg("--target-dir")
        .arg(&layout.target_dir)
        .current_dir(&layout.repo)
        .stdin(Stdio::null())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build {} exited with {status}", packages.join(" "));
    }
    Ok(())
}

/// Runs one workload against one peer through the `wsbench` binary and
/// returns its record; a crash, a timeout or unreadable output becomes a
/// failed record.
fn run_wsbench(
    layout: &Layout,
    peer: &RunningPeer,
    workload: &Workload,
    path: &str,
    round: u32,
) -> Record {
    let url = peer.url(path);
    let stem = format!("r{}-{}-{}", round + 1, workload.key, peer.kind.key());
    let stdout_path = layout.run_dir.join(format!("{stem}.json"));
    let stderr_path = layout.run_dir.join(format!("{stem}.log"));
    let failed = |why: String| {
        let mut record = Record::new(workload.args[0], &url);
        record.label = Some(peer.kind.key().to_owned());
        record.server_pid = Some(peer.pid());
        record.error(why);
        record
    };
    let (Ok(stdout), Ok(stderr)) = (File::create(&stdout_path), File::create(&stderr_path)) else {
        return failed(format!("cannot write logs in {}", layout.run_dir.display()));
    };
    let wsbench = layout.release_dir().join("wsbench");
    // Pinned: the load generator on its own CPU, the server on the other.
    let mut command = if workload.pinned {
        let mut command = Command::new("taskset");
        command
            .arg("-c")
            .arg(plan::CLIENT_CPU.to_string())
            .arg(&wsbench);
        command
    } else {
        Command::new(&wsbench)
    };
    let spawned = command
        .arg("--server-pid")
        .arg(peer.pid().to_string())
        .arg("--label")
        .arg(peer.kind.key())
        .args(&workload.args)
        .arg("--url")
        .arg(&url)
        .args(if peer.kind.is_tls() {
            vec!["--ca".into(), layout.tls_cert().into_os_string()]
        } else {
            Vec::new()
        })
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return failed(format!("cannot start wsbench: {error}")),
    };
    let deadline = Instant::now() + workload.budget;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline || STOP.load(Ordering::Relaxed) => {
                stop_child(&mut child);
                return failed(format!("wsbench ran past its {:?} budget", workload.budget));
            }
            Ok(None) => sleep(Duration::from_millis(50)),
            Err(error) => return failed(format!("waiting for wsbench: {error}")),
        }
    }
    let output = fs::read_to_string(&stdout_path).unwrap_or_default();
    match output
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .map(serde_json::from_str::<Record>)
    {
        Some(Ok(record)) => record,
        Some(Err(error)) => failed(format!("unreadable wsbench output: {error}")),
        None => failed(format!("wsbench printed no result: {}", tail(&stderr_path))),
    }
}

/// One line per result for the console.
fn summary(workload: &Workload, record: &Record) -> String {
    let figures: Vec<String> = workload
        .columns
        .iter()
        .filter_map(|c| {
            let value = record.get(c.metric)?;
            Some(format!(
                "{} {}",
                bench::record::human_number(value),
                c.heading
            ))
        })
        .collect();
    let status = if record.is_ok() {
        "ok".to_owned()
    } else {
        format!(
            "FAILED ({} errors, {} mismatches{})",
            record.errors,
            record.mismatches,
            record
                .error_samples
                .first()
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        )
    };
    format!("{} — {status}", figures.join(", "))
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar
}

/// Prints above the progress bar, or plainly when there is no terminal.
fn say(progress: &ProgressBar, line: &str) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// `target` relative to the directory of `from`, when it lies below it.
fn relative_to(target: &Path, from: &Path) -> String {
    let base = from.parent().unwrap_or(Path::new(""));
    target
        .strip_prefix(base)
        .unwrap_or(target)
        .display()
        .to_string()
}

/// Turns SIGINT/SIGTERM into a request to stop, so servers get cleaned up.
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut interrupt), Ok(mut terminate)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            eprintln!("wsbench-runner: stopping after the current step");
            STOP.store(true, Ordering::Relaxed);
        });
    });
}
