//! What the runner measures: the workloads of a full run and of the smoke
//! run, each one `wsbench` invocation with the metrics the report shows.

use std::time::Duration;

/// Source addresses for the spread-out workloads.
const FOUR_SOURCES: &str = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4";

/// Which route of a peer a workload loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Echo,
    Chat,
}

/// One column of a workload's table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Metric name in the record.
    pub metric: &'static str,
    /// Column heading.
    pub heading: &'static str,
    /// True when a smaller value is better (CPU, memory, latency).
    pub lower_is_better: bool,
}

const fn column(metric: &'static str, heading: &'static str, lower_is_better: bool) -> Column {
    Column {
        metric,
        heading,
        lower_is_better,
    }
}

const ECHO_COLUMNS: &[Column] = &[
    column("cpu_us_per_msg", "server CPU µs/msg", true),
    column("msgs_per_s", "msgs/s", false),
    column("rtt_p50_us", "RTT p50 µs", true),
    column("rtt_p99_us", "RTT p99 µs", true),
];
const IDLE_COLUMNS: &[Column] = &[
    column("rss_kib_per_conn", "server KiB/conn", true),
    column("conn_per_s", "conn/s", false),
    column("connected", "connected", false),
];
const HANDSHAKE_COLUMNS: &[Column] = &[
    column("handshakes_per_s", "handshakes/s", false),
    column("cpu_us_per_handshake", "server CPU µs/handshake", true),
    column("cycle_p99_us", "cycle p99 µs", true),
];
const FANOUT_COLUMNS: &[Column] = &[
    column("cpu_us_per_delivery", "server CPU µs/delivery", true),
    column("delivered_per_s", "delivered/s", false),
    column("lat_p50_us", "latency p50 µs", true),
    column("lat_p99_us", "latency p99 µs", true),
];

/// One measurement shape, run against every peer in every round.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short id, used in file names, results and the chart.
    pub key: &'static str,
    /// Heading in the report.
    pub title: &'static str,
    /// `wsbench` arguments after the global ones, without `--url`.
    pub args: Vec<&'static str>,
    /// Which route the load goes to.
    pub route: Route,
    /// Run on a server started just for this workload and stopped after it:
    /// memory readings start from a clean heap, and a thread-per-connection
    /// peer does not carry thousands of threads into the next workload.
    pub fresh_server: bool,
    /// Table columns; the first is the headline figure that gets ratios.
    pub columns: &'static [Column],
    /// Kill `wsbench` if it runs longer than this.
    pub budget: Duration,
    /// Also run against the TLS peers (wss://): the echo and handshake rows.
    pub tls: bool,
}

impl Workload {
    /// The headline column.
    pub fn primary(&self) -> Column {
        self.columns[0]
    }
}

fn echo(key: &'static str, title: &'static str, args: Vec<&'static str>) -> Workload {
    Workload {
        key,
        title,
        args,
        route: Route::Echo,
        fresh_server: false,
        columns: ECHO_COLUMNS,
        budget: Duration::from_secs(90),
        tls: false,
    }
}

fn idle(key: &'static str, title: &'static str, args: Vec<&'static str>) -> Workload {
    Workload {
        key,
        title,
        args,
        route: Route::Echo,
        fresh_server: true,
        columns: IDLE_COLUMNS,
        budget: Duration::from_secs(180),
        tls: false,
    }
}

fn handshake(args: Vec<&'static str>) -> Workload {
    Workload {
        key: "handshake",
        title: "Handshake rate (connect, echo 1 message, close)",
        args,
        route: Route::Echo,
        fresh_server: false,
        columns: HANDSHAKE_COLUMNS,
        budget: Duration::from_secs(90),
        // A TLS handshake is most of a wss connection's cost.
        tls: true,
    }
}

fn fanout(key: &'static str, title: &'static str, args: Vec<&'static str>) -> Workload {
    Workload {
        key,
        title,
        args,
        route: Route::Chat,
        fresh_server: false,
        columns: FANOUT_COLUMNS,
        budget: Duration::from_secs(120),
        tls: false,
    }
}

/// Marks a workload to run against the TLS peers too.
fn wss(mut workload: Workload) -> Workload {
    workload.tls = true;
    workload
}

/// The full run: about 50 s per peer per round.
pub fn full() -> Vec<Workload> {
    let window = ["-d", "2", "-w", "0.5"];
    let with = |mut args: Vec<&'static str>| {
        args.extend(window);
        args
    };
    vec![
        echo(
            "echo-32-c1",
            "Echo 32 B text, C=1",
            with(vec!["echo", "-c", "1", "-s", "32"]),
        ),
        wss(echo(
            "echo-32-c100",
            "Echo 32 B text, C=100",
            with(vec!["echo", "-c", "100", "-s", "32"]),
        )),
        echo(
            "echo-32-c1000",
            "Echo 32 B text, C=1000",
            with(vec!["echo", "-c", "1000", "-s", "32"]),
        ),
        // Not saturated: 20,000 msgs/s in all, each connection's sends
        // spread over its second, so a message often finds the server idle.
        // A longer window, because the server's CPU time is counted in
        // 10 ms ticks.
        echo(
            "echo-32-c1000-paced",
            "Echo 32 B text, C=1000, each paced to 20 msg/s",
            vec![
                "echo", "-c", "1000", "-s", "32", "--rate", "20", "-d", "4", "-w", "1",
            ],
        ),
        wss(echo(
            "echo-64k-c10",
            "Echo 64 KiB binary, C=10",
            with(vec!["echo", "-c", "10", "-s", "65536", "--binary"]),
        )),
        idle(
            "idle-10k",
            "10,000 idle connections",
            vec!["connect", "-n", "10000", "--hold", "0.5"],
        ),
        idle(
            "idle-19k",
            "19,000 idle connections from 4 source addresses",
            vec![
                "connect",
                "-n",
                "19000",
                "--hold",
                "0.5",
                "--sources",
                FOUR_SOURCES,
            ],
        ),
        handshake(with(vec!["handshake", "--concurrency", "16"])),
        fanout(
            "fanout-1000",
            "Fan-out: 1 publisher at 20 msg/s to 1,000 subscribers",
            with(vec!["fanout", "-n", "1000", "--rate", "20", "-s", "64"]),
        ),
    ]
}

/// The smoke run: tiny sizes, one short window each.
pub fn smoke() -> Vec<Workload> {
    let window = ["-d", "1", "-w", "0.3"];
    let with = |mut args: Vec<&'static str>| {
        args.extend(window);
        args
    };
    let mut workloads = vec![
        wss(echo(
            "echo-32-c10",
            "Echo 32 B text, C=10",
            with(vec!["echo", "-c", "10", "-s", "32"]),
        )),
        echo(
            "echo-4k-c2",
            "Echo 4 KiB binary, C=2, 4 in flight",
            with(vec!["echo", "-c", "2", "-s", "4096", "--binary", "-p", "4"]),
        ),
        idle(
            "idle-200",
            "200 idle connections from 2 source addresses",
            vec![
                "connect",
                "-n",
                "200",
                "--hold",
                "0.3",
                "--sources",
                "127.0.0.1,127.0.0.2",
            ],
        ),
        handshake(with(vec!["handshake", "--concurrency", "4"])),
        fanout(
            "fanout-20",
            "Fan-out: 1 publisher at 50 msg/s to 20 subscribers",
            with(vec!["fanout", "-n", "20", "--rate", "50"]),
        ),
    ];
    for workload in &mut workloads {
        workload.budget = Duration::from_secs(30);
    }
    workloads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_headlines_exist() {
        for plan in [full(), smoke()] {
            let mut keys: Vec<_> = plan.iter().map(|w| w.key).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), plan.len());
            assert!(plan.iter().all(|w| !w.columns.is_empty()));
        }
    }
}
