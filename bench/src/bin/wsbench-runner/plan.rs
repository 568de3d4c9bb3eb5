//! What the runner measures: the workloads of a full run and of the smoke
//! run, each one `wsbench` invocation with the metrics the report shows.

use std::time::Duration;

use crate::peers::PeerKind;

/// Source addresses for the spread-out workloads.
const FOUR_SOURCES: &str = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4";

/// Which route of a peer a workload loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Echo,
    Chat,
    /// The echo route with permessage-deflate on ([`PeerKind::deflate_path`]).
    EchoDeflate,
}

/// The CPU a pinned server runs on; the load generator gets [`CLIENT_CPU`].
pub const SERVER_CPU: usize = 0;
/// The CPU the load generator runs on in the pinned configuration.
pub const CLIENT_CPU: usize = 1;

/// The peers of the pinned configuration: wshd, the floors its targets name
/// (raw 4K, fastwebsockets, uWebSockets.js) and Node ws. Each run starts a fresh pinned
/// server, so fewer peers keep the full run's time down. wshd's default
/// (one worker per CPU it may run on) starts one worker when pinned, so
/// `wshd1` would measure the same thing.
const PINNED_PEERS: &[PeerKind] = &[
    PeerKind::Wshd,
    PeerKind::Raw4k,
    PeerKind::FastWs,
    PeerKind::NodeWs,
    PeerKind::Uws,
];

/// The peers with a permessage-deflate echo route.
const DEFLATE_PEERS: &[PeerKind] = &[PeerKind::Wshd, PeerKind::NodeWs];

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
const DEFLATE_ECHO_COLUMNS: &[Column] = &[
    column("cpu_us_per_msg", "server CPU µs/msg", true),
    column("wire_in_bytes_per_msg", "wire bytes/echo", true),
    column("msgs_per_s", "msgs/s", false),
    column("rtt_p50_us", "RTT p50 µs", true),
    column("compressed_share", "echoes compressed", false),
];
const DEFLATE_IDLE_COLUMNS: &[Column] = &[
    column("rss_kib_per_conn", "server KiB/conn", true),
    column("conn_per_s", "conn/s (with 1 echo)", false),
    column("connected", "connected", false),
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
    /// The second client configuration: the server pinned to [`SERVER_CPU`]
    /// and started for this workload, the load generator pinned to
    /// [`CLIENT_CPU`], as if each had a machine of its own.
    pub pinned: bool,
    /// Run only against these peers (`None`: every peer with the route).
    pub peers: Option<&'static [PeerKind]>,
}

impl Workload {
    /// The headline column.
    pub fn primary(&self) -> Column {
        self.columns[0]
    }

    /// True when this workload runs against `peer` (route aside).
    pub fn runs_on(&self, peer: PeerKind) -> bool {
        self.peers.is_none_or(|peers| peers.contains(&peer))
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
        pinned: false,
        peers: None,
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
        pinned: false,
        peers: None,
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
        pinned: false,
        peers: None,
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
        pinned: false,
        peers: None,
    }
}

/// A workload in the pinned configuration, under its own key and title; it
/// runs on a fresh pinned server each time.
fn pinned(key: &'static str, title: &'static str, mut workload: Workload) -> Workload {
    workload.key = key;
    workload.title = title;
    workload.pinned = true;
    workload.fresh_server = true;
    workload.tls = false;
    workload.peers = Some(PINNED_PEERS);
    workload
}

fn deflate_echo(key: &'static str, title: &'static str, args: Vec<&'static str>) -> Workload {
    Workload {
        route: Route::EchoDeflate,
        columns: DEFLATE_ECHO_COLUMNS,
        peers: Some(DEFLATE_PEERS),
        ..echo(key, title, args)
    }
}

fn deflate_idle(key: &'static str, title: &'static str, args: Vec<&'static str>) -> Workload {
    Workload {
        route: Route::EchoDeflate,
        columns: DEFLATE_IDLE_COLUMNS,
        peers: Some(DEFLATE_PEERS),
        ..idle(key, title, args)
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
        // The second client configuration: the key rows again, each peer
        // started pinned to one CPU, the load generator on the other.
        pinned(
            "echo-32-c100-pinned",
            "Echo 32 B text, C=100, server pinned to its own core",
            echo("", "", with(vec!["echo", "-c", "100", "-s", "32"])),
        ),
        pinned(
            "echo-32-c1000-pinned",
            "Echo 32 B text, C=1000, server pinned to its own core",
            echo("", "", with(vec!["echo", "-c", "1000", "-s", "32"])),
        ),
        pinned(
            "echo-64k-c10-pinned",
            "Echo 64 KiB binary, C=10, server pinned to its own core",
            echo(
                "",
                "",
                with(vec!["echo", "-c", "10", "-s", "65536", "--binary"]),
            ),
        ),
        pinned(
            "handshake-pinned",
            "Handshake rate (connect, echo 1 message, close), server pinned to its own core",
            handshake(with(vec!["handshake", "--concurrency", "16"])),
        ),
        // Compression: the same JSON document each time, every message
        // compressed on its own by both sides (no context takeover asked
        // for either way), so both peers do the same work.
        deflate_echo(
            "deflate-echo-4k-c100",
            "Echo 4 KiB JSON text with permessage-deflate (no context takeover), C=100",
            with(vec![
                "deflate-echo",
                "-c",
                "100",
                "-s",
                "4096",
                "--offer",
                "no-context",
            ]),
        ),
        // What an idle compressed connection costs after one message, when
        // the client offers what browsers offer and the server decides
        // whether to keep a compression context.
        deflate_idle(
            "deflate-idle-1k",
            "1,000 idle permessage-deflate connections (browser offer), each after one 4 KiB echo",
            vec![
                "deflate-idle",
                "-n",
                "1000",
                "-s",
                "4096",
                "--offer",
                "browser",
                "--hold",
                "0.5",
            ],
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
        pinned(
            "echo-32-c10-pinned",
            "Echo 32 B text, C=10, server pinned to its own core",
            echo("", "", with(vec!["echo", "-c", "10", "-s", "32"])),
        ),
        deflate_echo(
            "deflate-echo-4k-c2",
            "Echo 4 KiB JSON text with permessage-deflate (no context takeover), C=2",
            with(vec![
                "deflate-echo",
                "-c",
                "2",
                "-s",
                "4096",
                "--offer",
                "no-context",
            ]),
        ),
        deflate_idle(
            "deflate-idle-20",
            "20 idle permessage-deflate connections (browser offer), each after one 4 KiB echo",
            vec![
                "deflate-idle",
                "-n",
                "20",
                "-s",
                "4096",
                "--offer",
                "browser",
                "--hold",
                "0.3",
            ],
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

    #[test]
    fn pinned_rows_run_fresh_pinned_servers_of_wshd_and_fastwebsockets() {
        for plan in [full(), smoke()] {
            let pinned: Vec<_> = plan.iter().filter(|w| w.pinned).collect();
            assert!(!pinned.is_empty());
            for workload in pinned {
                assert!(workload.fresh_server, "{}", workload.key);
                assert!(workload.key.ends_with("-pinned"), "{}", workload.key);
                assert!(workload.title.contains("pinned"), "{}", workload.title);
                assert!(workload.runs_on(PeerKind::Wshd) && workload.runs_on(PeerKind::FastWs));
                assert!(!workload.runs_on(PeerKind::WshdTls));
            }
        }
        let keys: Vec<_> = full().iter().filter(|w| w.pinned).map(|w| w.key).collect();
        for key in ["echo-32-c100", "echo-32-c1000", "echo-64k-c10", "handshake"] {
            assert!(keys.contains(&format!("{key}-pinned").as_str()), "{key}");
        }
    }

    #[test]
    fn deflate_rows_load_the_deflate_route_of_peers_that_have_one() {
        for plan in [full(), smoke()] {
            for workload in plan.iter().filter(|w| w.route == Route::EchoDeflate) {
                for peer in PeerKind::ALL.into_iter().filter(|&p| workload.runs_on(p)) {
                    assert!(
                        peer.deflate_path().is_some(),
                        "{} {}",
                        workload.key,
                        peer.key()
                    );
                }
            }
        }
    }
}
