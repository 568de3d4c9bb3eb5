//! BENCHMARKS.md: machine, versions, method, wshd's targets, one table per
//! workload, and the reload section that another bench fills in.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use bench::record::human_number;

use crate::peers::PeerKind;
use crate::plan::{Column, Route, Workload};
use crate::results::{Results, Stat};

/// Marks the reload section, which regeneration keeps as it finds it.
const RELOAD_BEGIN: &str = "<!-- reload-bench:begin -->";
const RELOAD_END: &str = "<!-- reload-bench:end -->";
/// Marks the cross-node section (`bench/cluster.sh`), kept the same way.
const CLUSTER_BEGIN: &str = "<!-- cluster-bench:begin -->";
const CLUSTER_END: &str = "<!-- cluster-bench:end -->";

/// What the report says about where and with what it ran.
#[derive(Debug, Default)]
pub struct Environment {
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub git_commit: String,
    /// (tool, version) pairs: rustc, node, python.
    pub tools: Vec<(String, String)>,
    /// (crate, version) pairs from Cargo.lock.
    pub crates: Vec<(String, String)>,
    /// Version of each peer that has its own (ws, pywebsocket3).
    pub peers: Vec<(PeerKind, String)>,
}

impl Environment {
    /// Reads the machine and tool versions.
    pub fn gather(repo: &Path) -> Environment {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_default();
        let lock = fs::read_to_string(repo.join("Cargo.lock")).unwrap_or_default();
        Environment {
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            memory,
            git_commit: command_output(
                "git",
                &[
                    "-C",
                    &repo.display().to_string(),
                    "rev-parse",
                    "--short",
                    "HEAD",
                ],
            ),
            tools: vec![
                ("rustc".to_owned(), command_output("rustc", &["--version"])),
                ("node".to_owned(), command_output("node", &["--version"])),
                (
                    "python3".to_owned(),
                    command_output("python3", &["--version"]),
                ),
            ],
            crates: [
                "tokio",
                "tokio-tungstenite",
                "tungstenite",
                "flate2",
                "hdrhistogram",
            ]
            .iter()
            .map(|name| ((*name).to_owned(), locked_version(&lock, name)))
            .collect(),
            peers: Vec::new(),
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The version of `name` in a Cargo.lock (the first, if several).
pub fn locked_version(lock: &str, name: &str) -> String {
    let needle = format!("name = \"{name}\"\nversion = \"");
    lock.find(&needle)
        .map(|at| &lock[at + needle.len()..])
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

/// Everything the report is made from.
pub struct ReportInput<'a> {
    pub env: &'a Environment,
    pub workloads: &'a [Workload],
    pub peers: &'a [PeerKind],
    pub results: &'a Results,
    /// Peers that could not be run, with why.
    pub unavailable: &'a [(PeerKind, String)],
    pub rounds: u32,
    pub smoke: bool,
    /// Chart path relative to the report, if one was drawn.
    pub chart: Option<String>,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// The command that regenerates this file.
    pub command: String,
}

/// Renders the report, keeping the reload section of `previous` if present.
pub fn render(input: &ReportInput<'_>, previous: Option<&str>) -> String {
    let mut out = String::new();
    let env = input.env;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `{}` on {} at commit `{}` ({} round{}, {:.0} s). \
         Do not edit by hand except for the reload section; see `bench/README.md`.\n",
        input.command,
        env.date,
        env.git_commit,
        input.rounds,
        if input.rounds == 1 { "" } else { "s" },
        input.elapsed_s
    );
    if input.smoke {
        let _ = writeln!(
            out,
            "**Smoke run**: tiny sizes and one short round; the figures check that the harness works and mean little.\n"
        );
    }

    let _ = writeln!(out, "## Machine and versions\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} × {} |", env.nproc, env.cpu_model);
    let _ = writeln!(out, "| memory | {} |", env.memory);
    let _ = writeln!(out, "| kernel | {} |", env.kernel);
    for (tool, version) in &env.tools {
        let _ = writeln!(out, "| {tool} | {version} |");
    }
    for (name, version) in &env.crates {
        let _ = writeln!(out, "| crate {name} | {version} |");
    }
    for (peer, version) in &env.peers {
        let _ = writeln!(out, "| {} | {version} |", peer.title());
    }
    out.push('\n');

    let _ = writeln!(out, "## Method\n");
    let _ = writeln!(
        out,
        "- All servers run on this machine on loopback, each on its own port. Every round runs every \
         workload against every peer in turn (peer order rotates each round), so slow phases of a \
         shared, noisy machine spread over all peers. Tables show the **median over rounds** and, in \
         brackets, the spread `(max − min) ÷ median`. Rounds with any error are left out of the \
         median and flagged.\n\
         - Compare peers by the ratio columns rather than by absolute numbers: `÷ raw 4K` is the \
         peer's figure divided by raw tokio-tungstenite with a 4 KiB read buffer, `÷ pyws` divided \
         by pywebsocket3's. For columns marked ↓ lower is better, for ↑ higher is better.\n\
         - **Server CPU per message** = the server's `utime + stime` from `/proc/PID/stat` over the \
         measured window (clock ticks of 10 ms) ÷ messages echoed in the window. **Memory per \
         connection** = growth of the server's `VmRSS` while N connections are opened and held 0.5 s, \
         ÷ N; those workloads run on a freshly started server.\n\
         - The load generator (`wsbench`) runs on one tokio worker thread, leaving the other core to \
         the server, and checks every echo byte for byte; any mismatch fails the round. Its echo \
         client reads in chunks sized to the messages (at least 4 KiB), not tungstenite's default \
         128 KiB, which it would zero before every read. No compression is negotiated except in \
         the permessage-deflate rows.\n\
         - **Two client configurations.** With *shared cores* (every row without \"pinned\" in \
         its title) the kernel schedules the server and the load generator on both CPUs. Rows \
         marked *server pinned to its own core* start the server for each run under \
         `taskset -c 0` and the load generator under `taskset -c 1`, as if each had a machine \
         of its own; a server that sizes its thread pool to the CPUs it may use starts one \
         worker thread. Those rows run wshd, raw 4K, fastwebsockets, Node ws and uWebSockets.js only.\n\
         - **fastwebsockets** 0.10 runs as its own `examples/echo_server.rs` runs (one \
         current-thread tokio runtime, hyper for the upgrade, `FragmentCollector`), in \
         `bench/src/bin/fastws-echo.rs`; it has no chat route and no compression.\n\
         - **permessage-deflate rows.** The load generator speaks the extension itself \
         (raw deflate per message with flate2) and sends a 4 KiB JSON document. The echo row \
         offers no context takeover both ways, so both peers compress every message on its \
         own; *wire bytes/echo* is the echo's frame header and payload as the server sent \
         it. The idle row offers what browsers offer (`permessage-deflate; \
         client_max_window_bits`), echoes one document per connection, and leaves to the \
         server whether it keeps a compression context while idle. wshd serves them on a \
         route with `compression = \"on\"`, Node ws with `perMessageDeflate: true`.\n\
         - The paced workload sends each connection's messages at a fixed rate, spread over the \
         second, instead of as soon as the echo returns: the server is not saturated and often \
         sleeps between messages, as most servers do most of the time.\n\
         - The two servers whose thread count is a setting run twice: with their defaults (one \
         worker thread per core, two here) and with one, matching the one core the load \
         generator leaves them. On this machine a second thread competes with the load generator \
         for its core, and costs raw tokio-tungstenite and wshd alike more CPU per message. Rows \
         marked 1 worker thread are compared with raw 4K on one worker thread in the `÷ raw 4K` \
         column, the others with raw 4K on its default runtime. Node ws is single-threaded; \
         pywebsocket3 runs a thread per connection and has no such setting.\n"
    );

    render_targets(&mut out, input);

    if let Some(chart) = &input.chart {
        let _ = writeln!(
            out,
            "## Chart\n\n![server CPU per message and memory per connection]({chart})\n"
        );
    }

    let _ = writeln!(out, "## Results\n");
    for workload in input.workloads {
        render_workload(&mut out, input, workload);
    }

    let _ = writeln!(out, "## Reload under load\n");
    out.push_str(&reload_section(previous));
    out.push_str("\n\n");

    let _ = writeln!(out, "## Across nodes (Redis)\n");
    out.push_str(&kept_section(
        previous,
        CLUSTER_BEGIN,
        CLUSTER_END,
        "TODO: measured by `bench/cluster.sh`, pending. Cross-node fan-out through Redis goes \
         here; the runner keeps whatever stands between these markers.",
    ));
    out.push_str("\n\n");

    if !input.unavailable.is_empty() {
        let _ = writeln!(out, "## Peers not measured\n");
        for (peer, why) in input.unavailable {
            let first_line = why.lines().next().unwrap_or_default();
            let _ = writeln!(out, "- {}: {first_line}", peer.title());
        }
        out.push('\n');
    }
    out
}

/// The reload section from a previous report, or the pending placeholder.
fn reload_section(previous: Option<&str>) -> String {
    kept_section(
        previous,
        RELOAD_BEGIN,
        RELOAD_END,
        "TODO: measured by the reload bench, pending. Reload latency and dropped connections or \
         messages during 100 handler reloads under echo load go here; the runner keeps whatever \
         stands between these markers when it regenerates this file.",
    )
}

/// The section between `begin` and `end` in a previous report (written by
/// another tool), or `placeholder` between fresh markers.
fn kept_section(previous: Option<&str>, begin: &str, end: &str, placeholder: &str) -> String {
    if let Some(text) = previous
        && let (Some(b), Some(e)) = (text.find(begin), text.find(end))
        && b < e
    {
        return text[b..e + end.len()].to_owned();
    }
    format!("{begin}\n{placeholder}\n{end}")
}

/// A target from the issue: an upper bound on one figure (every #17
/// target is a "no more than").
#[derive(Debug, Clone, Copy)]
struct Bound {
    at_most: f64,
}

impl Bound {
    const fn at_most(at_most: f64) -> Bound {
        Bound { at_most }
    }

    fn met(self, value: f64) -> bool {
        value <= self.at_most
    }
}

fn render_targets(out: &mut String, input: &ReportInput<'_>) {
    let results = input.results;
    let fastws = PeerKind::FastWs;
    let divide = |workload: &str, metric: &str, a: PeerKind, b: PeerKind| {
        Some(results.median(workload, a, metric)? / results.median(workload, b, metric)?)
    };
    let cpu = "cpu_us_per_msg";
    let handshake = "cpu_us_per_handshake";
    // One row per target: the figure for wshd (default) with shared cores,
    // wshd (default) pinned, and wshd `workers = 1` with shared cores.
    type Row = (String, [Option<f64>; 3], &'static str, Bound);
    let both = |key: &str, metric: &str, against: fn(PeerKind) -> PeerKind| {
        let pinned = format!("{key}-pinned");
        [
            divide(key, metric, PeerKind::Wshd, against(PeerKind::Wshd)),
            divide(&pinned, metric, PeerKind::Wshd, against(PeerKind::Wshd)),
            divide(key, metric, PeerKind::Wshd1, against(PeerKind::Wshd1)),
        ]
    };
    let memory = |peer: PeerKind| results.median("idle-19k", peer, "rss_kib_per_conn");
    let fastws_memory =
        memory(fastws).map_or_else(|| "not measured".to_owned(), |kib| format!("{kib:.2} KiB"));
    let rows: Vec<Row> = vec![
        (
            "CPU/msg, 32 B echo, C=100: wshd ÷ fastwebsockets ≤ 0.95".to_owned(),
            both("echo-32-c100", cpu, |_| PeerKind::FastWs),
            "×",
            Bound::at_most(0.95),
        ),
        (
            "CPU/msg, 32 B echo, C=1000: wshd ÷ fastwebsockets ≤ 0.95".to_owned(),
            both("echo-32-c1000", cpu, |_| PeerKind::FastWs),
            "×",
            Bound::at_most(0.95),
        ),
        (
            format!(
                "Idle memory, 19,000 connections: ≤ 2 KiB/conn (fastwebsockets: {fastws_memory})"
            ),
            [memory(PeerKind::Wshd), None, memory(PeerKind::Wshd1)],
            " KiB",
            Bound::at_most(2.0),
        ),
        (
            "Server CPU per handshake cycle: wshd ÷ fastwebsockets ≤ 1.0".to_owned(),
            both("handshake", handshake, |_| PeerKind::FastWs),
            "×",
            Bound::at_most(1.0),
        ),
        (
            "CPU/msg, 64 KiB binary echo: wshd ÷ raw 4K ≤ 1.0".to_owned(),
            both("echo-64k-c10", cpu, PeerKind::floor),
            "×",
            Bound::at_most(1.0),
        ),
    ];
    // Issue #28: the same figures against uWebSockets.js.
    let uws = PeerKind::Uws;
    let uws_memory = memory(uws).map_or_else(
        || "not measured".to_owned(),
        |kib| format!("{:.0} B", kib * 1024.0),
    );
    let delivery = "cpu_us_per_delivery";
    let uws_rows: Vec<Row> = vec![
        (
            "CPU/msg, 32 B echo, C=100: wshd ÷ uWS.js ≤ 0.90".to_owned(),
            both("echo-32-c100", cpu, |_| PeerKind::Uws),
            "×",
            Bound::at_most(0.90),
        ),
        (
            "CPU/msg, 32 B echo, C=1000: wshd ÷ uWS.js ≤ 0.90".to_owned(),
            both("echo-32-c1000", cpu, |_| PeerKind::Uws),
            "×",
            Bound::at_most(0.90),
        ),
        (
            "Server CPU per handshake cycle: wshd ÷ uWS.js ≤ 0.90".to_owned(),
            both("handshake", handshake, |_| PeerKind::Uws),
            "×",
            Bound::at_most(0.90),
        ),
        (
            format!("Idle memory, 19,000 connections: ≤ 0.5 KiB/conn (uWS.js: {uws_memory})"),
            [memory(PeerKind::Wshd), None, memory(PeerKind::Wshd1)],
            " KiB",
            Bound::at_most(0.5),
        ),
        (
            "Fan-out CPU per delivery, 1,000 subscribers: wshd topics ÷ uWS.js publish ≤ 1.0"
                .to_owned(),
            [
                divide("fanout-1000", delivery, PeerKind::Wshd, uws),
                None,
                divide("fanout-1000", delivery, PeerKind::Wshd1, uws),
            ],
            "×",
            Bound::at_most(1.0),
        ),
    ];
    // One table of targets: a header, then a row per target with the
    // three configurations' figures and whether each meets it.
    let table = |out: &mut String, rows: Vec<Row>| {
        let cell = |value: Option<f64>, unit: &str, bound: Bound| match value {
            Some(v) if bound.met(v) => format!("{}{unit} | met", ratio(v)),
            Some(v) => format!("{}{unit} | **missed**", ratio(v)),
            None => "n/a | not measured".to_owned(),
        };
        let _ = writeln!(
            out,
            "| target | wshd, shared cores | status | wshd, server pinned | status | `workers = 1`, shared cores | status |\n\
             |---|---|---|---|---|---|---|"
        );
        for (what, values, unit, bound) in rows {
            let _ = writeln!(
                out,
                "| {what} | {} | {} | {} |",
                cell(values[0], unit, bound),
                cell(values[1], unit, bound),
                cell(values[2], unit, bound)
            );
        }
        out.push('\n');
    };
    let _ = writeln!(out, "## wshd against its targets (issue #17)\n");
    let _ = writeln!(
        out,
        "Two client configurations. **Shared cores**: server and load generator are scheduled \
         on both CPUs by the kernel. **Server pinned**: the server is started pinned to CPU \
         {server} and the load generator runs pinned to CPU {client}, as if each had a machine \
         of its own; a server that sizes its thread pool to the machine starts one worker \
         thread. The targets hold in both. `workers = 1` is wshd on one worker thread with \
         shared cores; its 64 KiB ratio is against raw 4K on one worker thread. Idle memory \
         is measured with shared cores only: where the threads run does not change it.\n",
        server = crate::plan::SERVER_CPU,
        client = crate::plan::CLIENT_CPU,
    );
    table(out, rows);
    let _ = writeln!(
        out,
        "## wshd against uWebSockets.js (issue #28)\n\n\
         The same client configurations, against uWebSockets.js from npm (its C++ core under \
         Node; fan-out through its native `app.publish`). Fan-out is measured with shared \
         cores only.\n"
    );
    table(out, uws_rows);

    // Compression has no numeric target in #17; the comparison is with
    // Node ws.
    let ws = PeerKind::NodeWs;
    let compression = [
        (
            "Server CPU per 4 KiB JSON echo, deflate: wshd ÷ Node ws",
            divide("deflate-echo-4k-c100", cpu, PeerKind::Wshd, ws),
            "×",
        ),
        (
            "Bytes on the wire per echo (server to client): wshd ÷ Node ws",
            divide(
                "deflate-echo-4k-c100",
                "wire_in_bytes_per_msg",
                PeerKind::Wshd,
                ws,
            ),
            "×",
        ),
        (
            "Bytes on the wire per echo, wshd (the document is 4,096 bytes)",
            results.median(
                "deflate-echo-4k-c100",
                PeerKind::Wshd,
                "wire_in_bytes_per_msg",
            ),
            " B",
        ),
        (
            "Memory per idle compressed connection, wshd",
            results.median("deflate-idle-1k", PeerKind::Wshd, "rss_kib_per_conn"),
            " KiB",
        ),
        (
            "Memory per idle compressed connection, Node ws",
            results.median("deflate-idle-1k", ws, "rss_kib_per_conn"),
            " KiB",
        ),
    ];
    if compression.iter().any(|(_, value, _)| value.is_some()) {
        let _ = writeln!(
            out,
            "Compression (permessage-deflate), shared cores; no target, compared with Node ws:\n\n\
             | figure | value |\n|---|---|"
        );
        for (what, value, unit) in compression {
            let value = value.map_or_else(|| "n/a".to_owned(), |v| format!("{}{unit}", ratio(v)));
            let _ = writeln!(out, "| {what} | {value} |");
        }
        out.push('\n');
    }
}

fn render_workload(out: &mut String, input: &ReportInput<'_>, workload: &Workload) {
    let _ = writeln!(
        out,
        "### {}\n\n`wsbench {}`\n",
        workload.title,
        workload.args.join(" ")
    );
    let primary = workload.primary();
    let references = references(workload);
    let _ = write!(out, "| peer | {} |", heading(&primary));
    for (name, _) in &references {
        let _ = write!(out, " ÷ {name} |");
    }
    for column in &workload.columns[1..] {
        let _ = write!(out, " {} |", heading(column));
    }
    let _ = write!(out, " rounds ok |\n|---|---:|");
    for _ in &references {
        out.push_str("---:|");
    }
    for _ in &workload.columns[1..] {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");

    let results = input.results;
    let reference = |peer: PeerKind| results.median(workload.key, peer, primary.metric);
    for &peer in input.peers {
        let (failed, total) = results.failures(workload.key, peer);
        if total == 0 {
            continue;
        }
        let stat = results.stat(workload.key, peer, primary.metric);
        let ratio_to = |reference: Option<f64>| match (stat, reference) {
            (Some(stat), Some(reference)) if reference > 0.0 => {
                format!("{}×", ratio(stat.median / reference))
            }
            _ => "n/a".to_owned(),
        };
        let _ = write!(out, "| {} | {} |", peer.title(), cell(stat));
        for (_, reference_of) in &references {
            let _ = write!(out, " {} |", ratio_to(reference(reference_of(peer))));
        }
        for column in &workload.columns[1..] {
            let _ = write!(
                out,
                " {} |",
                cell(results.stat(workload.key, peer, column.metric))
            );
        }
        let flag = if failed > 0 { " ⚠" } else { "" };
        let _ = writeln!(out, " {}/{total}{flag} |", total - failed);
    }
    let problems: Vec<String> = input
        .peers
        .iter()
        .flat_map(|&peer| {
            results
                .records(workload.key, peer)
                .iter()
                .filter(|r| !r.is_ok())
                .map(move |r| {
                    format!(
                        "{}: {} errors, {} mismatches{}",
                        peer.key(),
                        r.errors,
                        r.mismatches,
                        r.error_samples
                            .first()
                            .map(|s| format!(" (first: {})", s.replace('|', "/")))
                            .unwrap_or_default()
                    )
                })
        })
        .collect();
    let not_applicable: Vec<&str> = input
        .peers
        .iter()
        .filter(|&&peer| results.records(workload.key, peer).is_empty())
        .filter(|&&peer| (workload.tls || !peer.is_tls()) && workload.runs_on(peer))
        .filter(|peer| !input.unavailable.iter().any(|(p, _)| p == *peer))
        .map(|peer| peer.key())
        .collect();
    out.push('\n');
    if !not_applicable.is_empty() {
        let _ = writeln!(out, "N/A (no such route): {}.\n", not_applicable.join(", "));
    }
    for problem in problems.iter().take(6) {
        let _ = writeln!(out, "- ⚠ {problem}");
    }
    if !problems.is_empty() {
        out.push('\n');
    }
}

/// The ratio columns of a workload's table: a name and the peer each row is
/// divided by.
type Reference = (&'static str, fn(PeerKind) -> PeerKind);

fn references(workload: &Workload) -> Vec<Reference> {
    if workload.route == Route::EchoDeflate {
        return vec![("Node ws", |_| PeerKind::NodeWs)];
    }
    let mut references: Vec<Reference> = vec![
        ("raw 4K", PeerKind::floor),
        ("fastws", |_| PeerKind::FastWs),
        ("uWS.js", |_| PeerKind::Uws),
    ];
    // pywebsocket3 is not run pinned.
    if !workload.pinned {
        references.push(("pyws", |_| PeerKind::Pywebsocket));
    }
    references
}

/// A ratio with two decimals, or three significant digits when large.
fn ratio(value: f64) -> String {
    if value.abs() >= 10.0 {
        human_number(value)
    } else {
        format!("{value:.2}")
    }
}

fn heading(column: &Column) -> String {
    format!(
        "{} {}",
        column.heading,
        if column.lower_is_better { "↓" } else { "↑" }
    )
}

fn cell(stat: Option<Stat>) -> String {
    match stat {
        Some(stat) if stat.rounds > 1 => {
            format!(
                "{} ({:.0}%)",
                human_number(stat.median),
                stat.spread() * 100.0
            )
        }
        Some(stat) => human_number(stat.median),
        None => "n/a".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_section_survives_regeneration() {
        let fresh = reload_section(None);
        assert!(fresh.contains("pending"));
        let filled = format!("# old\n{RELOAD_BEGIN}\nreload p99 3 ms\n{RELOAD_END}\nrest");
        assert_eq!(
            reload_section(Some(&filled)),
            format!("{RELOAD_BEGIN}\nreload p99 3 ms\n{RELOAD_END}")
        );
    }

    #[test]
    fn the_cluster_section_survives_regeneration() {
        let filled = format!("x\n{CLUSTER_BEGIN}\ncross-node p50 1 ms\n{CLUSTER_END}\ny");
        assert_eq!(
            kept_section(Some(&filled), CLUSTER_BEGIN, CLUSTER_END, "pending"),
            format!("{CLUSTER_BEGIN}\ncross-node p50 1 ms\n{CLUSTER_END}")
        );
        assert_eq!(
            kept_section(None, CLUSTER_BEGIN, CLUSTER_END, "pending"),
            format!("{CLUSTER_BEGIN}\npending\n{CLUSTER_END}")
        );
    }

    #[test]
    fn lock_versions_are_found() {
        let lock = "[[package]]\nname = \"tokio\"\nversion = \"1.54.1\"\n";
        assert_eq!(locked_version(lock, "tokio"), "1.54.1");
        assert_eq!(locked_version(lock, "ws"), "?");
    }
}
