//! The admin listener against a real wshd: `/metrics` after real traffic
//! (echo, a handler panic, a slow consumer, odd close codes and paths, a
//! reload), `/healthz` and `/readyz` through startup and shutdown, the
//! admin endpoints absent from the public port, and the Grafana dashboard
//! naming only metrics a scrape has.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::*;

/// The admin address, from the startup log line.
async fn admin_addr(srv: &Wshd) -> String {
    let log = srv.wait_log("admin listener:").await;
    let line = log.lines().find(|l| l.contains("admin listener:")).unwrap();
    let at = line.find("addr=").expect("addr field") + 5;
    line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect()
}

async fn get(addr: &str, path: &str) -> String {
    raw_http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn scrape(admin: &str) -> String {
    let r = get(admin, "/metrics").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    r
}

/// The sum of every sample of `name` whose labels include all of `with`.
fn sum(scrape: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Scrapes until `ok` holds for the scrape (counters are updated when a
/// session ends, which is just after the client sees its close).
async fn scrape_until(admin: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(admin).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never: {what}\n{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every label value in a scrape, per label name.
fn label_values(scrape: &str, label: &str) -> std::collections::BTreeSet<String> {
    let key = format!("{label}=\"");
    let key = key.as_str();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.match_indices(&key).map(move |(i, _)| &l[i + key.len()..]))
        .map(|rest| rest[..rest.find('"').unwrap()].to_owned())
        .collect()
}

const TRAFFIC_CONFIG: &str = "[limits]\nsend_queue = 4\nclose_timeout = \"1s\"\nwrite_timeout = \"60s\"\n\
     [admin]\nlisten = \"127.0.0.1:0\"\n\
     [[route]]\npath = \"/chat\"\nhandler = \"chat\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_with_real_traffic_and_labels_stay_bounded() {
    let dir = standard_dir();
    let srv = Wshd::with_config(dir.path(), TRAFFIC_CONFIG, &[]);
    let admin = admin_addr(&srv).await;
    let before = scrape(&admin).await;
    let echo = [("route", "/echo")];
    assert_eq!(sum(&before, "wshd_connections_total", &echo), 0.0);
    assert!(
        before.contains("# TYPE wshd_connections_open gauge"),
        "{before}"
    );

    // Echo: three messages of 5 bytes each way, then a normal close.
    let mut ws = connect(&srv.url("/echo")).await;
    let s = scrape_until(&admin, "one open /echo connection", |s| {
        sum(s, "wshd_connections_open", &echo) == 1.0
    })
    .await;
    assert_eq!(sum(&s, "wshd_connections_total", &echo), 1.0);
    for _ in 0..3 {
        assert_eq!(echo_once(&mut ws, "hello").await, "hello");
    }
    ws.close(None).await.unwrap();
    let s = scrape_until(&admin, "the /echo close counted", |s| {
        sum(
            s,
            "wshd_closes_total",
            &[("route", "/echo"), ("code", "1005")],
        ) == 1.0
    })
    .await;
    assert_eq!(sum(&s, "wshd_messages_received_total", &echo), 3.0);
    assert_eq!(sum(&s, "wshd_messages_sent_total", &echo), 3.0);
    assert_eq!(sum(&s, "wshd_bytes_received_total", &echo), 15.0);
    assert_eq!(sum(&s, "wshd_bytes_sent_total", &echo), 15.0);
    assert_eq!(sum(&s, "wshd_connections_open", &echo), 0.0);
    assert_eq!(sum(&s, "wshd_handshakes_total", &[("status", "101")]), 1.0);
    // The admin listener is on, so on_message durations are measured.
    assert_eq!(
        sum(
            &s,
            "wshd_callback_duration_seconds_count",
            &[("route", "/echo"), ("callback", "on_message")]
        ),
        3.0
    );

    // A handler panic closes with 1011 and is counted.
    let mut ws = connect(&srv.url("/testkit")).await;
    ws.send(Message::text("panic")).await.unwrap();
    assert_eq!(recv_close(&mut ws).await.0, 1011);
    let kit = [("route", "/testkit")];
    scrape_until(&admin, "the panic counted", |s| {
        sum(s, "wshd_handler_panics_total", &kit) == 1.0
            && sum(
                s,
                "wshd_closes_total",
                &[("route", "/testkit"), ("code", "1011")],
            ) == 1.0
    })
    .await;

    // A close code no table holds (4999), from the client: counted as
    // `other`, never as its own label value.
    let mut ws = connect(&srv.url("/echo")).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4999),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let s = scrape_until(&admin, "code 4999 counted as other", |s| {
        sum(
            s,
            "wshd_closes_total",
            &[("route", "/echo"), ("code", "other")],
        ) == 1.0
    })
    .await;
    assert!(!s.contains("4999"), "{s}");

    // A weird path (control bytes, quotes, a would-be label) gets 404 and
    // leaves no trace in the label set.
    for weird in ["/x%22%7Dwshd_evil%0Aweird", "/x\"}wshd_evil\"weird\x01"] {
        let r = raw_http(
            &srv.addr,
            &upgrade_request(weird, "Sec-WebSocket-Version: 13\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 4"), "{r}");
    }
    // And a handler that rejects with a status of its own choosing.
    let r = raw_http(
        &srv.addr,
        &upgrade_request("/testkit?reject=no", "Sec-WebSocket-Version: 13\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");

    // A slow consumer: a /chat member that never reads while another
    // floods the room.
    let mut stuck = raw_upgrade(&srv.addr, "/chat").await;
    let ws = connect(&srv.url("/chat")).await;
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let blob = vec![b'z'; 64 * 1024];
    let sender = tokio::spawn(async move {
        for _ in 0..2000 {
            if tx.send(Message::binary(blob.clone())).await.is_err() {
                break;
            }
        }
    });
    let chat = [("route", "/chat")];
    let s = scrape_until(&admin, "the slow consumer counted", |s| {
        sum(s, "wshd_slow_consumer_closes_total", &chat) >= 1.0
    })
    .await;
    assert!(
        sum(
            &s,
            "wshd_closes_total",
            &[("route", "/chat"), ("code", "1008")]
        ) >= 1.0
    );
    // Chat publishes to its room's topic (ABI 1.2): both families moved.
    assert!(sum(&s, "wshd_publishes_total", &[]) >= 1.0, "{s}");
    assert!(sum(&s, "wshd_topics", &[]) >= 1.0, "{s}");
    sender.abort();
    reader.abort();
    let mut buf = vec![0u8; 1 << 16];
    while stuck.read(&mut buf).await.is_ok_and(|n| n > 0) {}

    // A reload (SIGHUP re-reads the config).
    srv.signal("HUP");
    srv.wait_log("config reloaded").await;
    let s = scrape_until(&admin, "the reload counted", |s| {
        sum(s, "wshd_reloads_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(
        sum(&s, "wshd_reloads_total", &[("result", "ok")]),
        1.0,
        "{s}"
    );

    // Every label value comes from the config, the loaded versions or the
    // fixed tables.
    for v in label_values(&s, "route") {
        assert!(
            ["/echo", "/chat", "/testkit", "/origin_check", "/blocking"].contains(&v.as_str()),
            "route label {v:?}"
        );
    }
    for v in label_values(&s, "code") {
        assert!(
            v == "other" || (1000..1016).contains(&v.parse::<u16>().unwrap()),
            "code {v:?}"
        );
    }
    for v in label_values(&s, "status") {
        assert!(v == "other" || v.parse::<u16>().is_ok(), "status {v:?}");
    }
    assert_eq!(
        sum(&s, "wshd_handshakes_total", &[("status", "403")]),
        1.0,
        "{s}"
    );
    assert!(
        sum(&s, "wshd_handshakes_total", &[("status", "404")]) >= 1.0,
        "{s}"
    );
    for v in label_values(&s, "generation") {
        assert!(v.parse::<u64>().is_ok(), "generation {v:?}");
    }
    assert!(!s.contains("weird") && !s.contains("evil"), "{s}");
    assert!(s.trim_end().ends_with("# EOF"), "{s}");
}

/// #23: idle sockets must not keep health probes out. 20 idle connections
/// (more than the admin listener's 16 places), re-opened as fast as they
/// are cut, while an orchestrator probes `/healthz` and `/readyz`: every
/// probe is answered.
#[tokio::test(flavor = "multi_thread")]
async fn idle_admin_connections_cannot_starve_health_probes() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&srv).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut holders = Vec::new();
    for _ in 0..20 {
        let (admin, stop) = (admin.clone(), stop.clone());
        holders.push(tokio::spawn(async move {
            let mut reopened = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(&admin).await else {
                    continue;
                };
                // Hold it idle until the server closes it (its read_timeout
                // is 5 s), then re-open at once.
                let mut buf = [0u8; 64];
                let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
                    reopened += 1;
                }
            }
            reopened
        }));
    }
    for _ in 0..20 {
        for path in ["/healthz", "/readyz"] {
            let r = tokio::time::timeout(Duration::from_secs(5), get(&admin, path))
                .await
                .unwrap_or_else(|_| panic!("{path} unanswered for 5 s"));
            assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut cut = 0;
    for h in holders {
        cut += h.await.unwrap();
    }
    // The holders really did fill the listener: probes made room by
    // closing them (40 probes, well within the 5 s read timeout).
    assert!(cut >= 20, "only {cut} idle connections were ever cut");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_are_not_on_the_public_port() {
    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&srv).await;
    assert!(scrape(&admin).await.contains("wshd_connections_total"));
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = get(&srv.addr, path).await;
        assert!(
            r.starts_with("HTTP/1.1 404"),
            "{path} on the public port: {r}"
        );
        assert!(!r.contains("wshd_"), "{r}");
    }
    // The admin port serves nothing else, WebSocket handlers included.
    let r = get(&admin, "/echo").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}

#[test]
fn an_admin_address_equal_to_the_public_one_is_refused() {
    let dir = standard_dir();
    for (listen, admin) in [
        ("127.0.0.1", "127.0.0.1:19998"),
        ("0.0.0.0", "127.0.0.1:19998"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wshd"))
            .args(["-H", listen, "-p", "19998", "--admin", admin, "-t", "-w"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("never be served on the public port"), "{err}");
    }
    // The same from the config file.
    let cfg = write_config(
        dir.path(),
        "listen = \"127.0.0.1:19998\"\n[admin]\nlisten = \"127.0.0.1:19998\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(["-t", "-w"])
        .arg(dir.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("public port"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_shutting_down() {
    let dir = standard_dir();
    // A client that never answers our close holds shutdown for close_timeout.
    let mut srv = Wshd::with_config(
        dir.path(),
        "[limits]\nclose_timeout = \"5s\"\n[shutdown]\ntimeout = \"10s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        &[],
    );
    let admin = admin_addr(&srv).await;
    let r = get(&admin, "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = get(&admin, "/readyz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // on_open ran before the 101: the connection is registered.
    let _silent = raw_upgrade(&srv.addr, "/echo").await;
    srv.signal("TERM");
    srv.wait_log("shutting down").await;
    let r = get(&admin, "/readyz").await;
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("shutting down"),
        "{r}"
    );
    // The event loops still run: alive, just not ready.
    let r = get(&admin, "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(srv.wait_exit(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_names_only_metrics_a_scrape_has() {
    let path = repo_root().join("docs/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 8, "too few queries: {exprs:?}");
    let names: std::collections::BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.match_indices("wshd_").map(move |(i, _)| {
                e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
        })
        .collect();

    let dir = standard_dir();
    let srv = Wshd::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&srv).await;
    // Traffic, so every family has samples.
    let mut ws = connect(&srv.url("/echo")).await;
    echo_once(&mut ws, "x").await;
    ws.close(None).await.unwrap();
    let s = scrape_until(&admin, "the close counted", |s| {
        sum(s, "wshd_closes_total", &[]) >= 1.0
    })
    .await;
    let samples: std::collections::BTreeSet<&str> = s
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for n in &names {
        assert!(
            samples.contains(n.as_str()),
            "the dashboard uses {n}, which no scrape has; samples: {samples:?}"
        );
    }
    // And every family the README documents is on the dashboard.
    for family in [
        "wshd_connections_open",
        "wshd_messages_received_total",
        "wshd_closes_total",
        "wshd_handler_panics_total",
        "wshd_callback_duration_seconds_bucket",
        "wshd_reloads_total",
    ] {
        assert!(names.contains(family), "the dashboard lacks {family}");
    }
}
