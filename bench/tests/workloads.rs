//! Every workload against the in-process raw server, at toy sizes: the
//! harness must report clean runs against a correct server and count what a
//! broken one gets wrong.

use std::sync::Arc;
use std::time::Duration;

use bench::probe::Probe;
use bench::raw_server::{RawConfig, RawServer};
use bench::target::Target;
use bench::workload::{connect, deflate, echo, fanout, handshake};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Starts the raw server on a free loopback port and returns its address.
async fn raw_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = RawServer::new(RawConfig {
        websocket: WebSocketConfig::default().read_buffer_size(4096),
        tls: None,
    });
    tokio::spawn(server.serve(listener));
    addr.to_string()
}

/// The raw server over TLS with a certificate made now; returns its address
/// and the PEM file a client must trust.
async fn raw_tls_server() -> (String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "bench-tls-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    bench::tls::make_cert(&cert, &key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = RawServer::new(RawConfig {
        websocket: WebSocketConfig::default().read_buffer_size(4096),
        tls: Some(bench::tls::server_config(&cert, &key).unwrap()),
    });
    tokio::spawn(server.serve(listener));
    (addr.to_string(), cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_and_handshakes_verify_cleanly() {
    let (addr, ca) = raw_tls_server().await;
    let target = Target::parse(&format!("wss://{addr}/echo"))
        .unwrap()
        .with_ca(Some(&ca))
        .unwrap();
    let params = echo::EchoParams {
        connections: 2,
        size: 70_000,
        binary: true,
        in_flight: 2,
        warmup: Duration::from_millis(50),
        duration: SHORT,
        connect_concurrency: 2,
        rate: None,
    };
    let record = echo::run(&target, &params, own_probe()).await;
    assert!(record.is_ok(), "{record}");
    assert!(record.get("msgs").unwrap() > 0.0, "{record}");
    let params = handshake::HandshakeParams {
        concurrency: 2,
        warmup: Duration::ZERO,
        duration: SHORT,
    };
    let record = handshake::run(Arc::new(target), &params, None).await;
    assert!(record.is_ok(), "{record}");
    assert!(record.get("handshakes").unwrap() > 0.0, "{record}");
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}

fn own_probe() -> Option<Probe> {
    Some(Probe::new(std::process::id()).unwrap())
}

const SHORT: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_text_and_binary_verify_cleanly() {
    let addr = raw_server().await;
    let target = Target::parse(&format!("ws://{addr}/echo")).unwrap();
    for (size, binary, in_flight) in [(32, false, 1), (70_000, true, 3), (1, false, 2)] {
        let params = echo::EchoParams {
            connections: 3,
            size,
            binary,
            in_flight,
            warmup: Duration::from_millis(50),
            duration: SHORT,
            connect_concurrency: 4,
            rate: None,
        };
        let record = echo::run(&target, &params, own_probe()).await;
        assert!(record.is_ok(), "{record}");
        assert!(record.get("msgs").unwrap() > 0.0, "{record}");
        assert!(record.get("cpu_us_per_msg").is_some(), "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_echo_sends_no_faster_than_its_rate() {
    let addr = raw_server().await;
    let target = Target::parse(&format!("ws://{addr}/echo")).unwrap();
    let params = echo::EchoParams {
        connections: 4,
        size: 32,
        binary: false,
        in_flight: 1,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(500),
        connect_concurrency: 4,
        rate: Some(40.0),
    };
    let record = echo::run(&target, &params, None).await;
    assert!(record.is_ok(), "{record}");
    assert_eq!(record.params["rate_per_conn"], 40.0, "{record}");
    // 4 connections at 40/s over half a second: 80, plus at most one
    // early send each at the window's edges. Unpaced, loopback echoes
    // thousands.
    let msgs = record.get("msgs").unwrap();
    assert!(msgs > 0.0 && msgs <= 88.0, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_holds_connections_from_several_sources() {
    let addr = raw_server().await;
    let target = Target::parse(&format!("ws://{addr}/echo"))
        .unwrap()
        .with_sources(vec![
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
        ])
        .unwrap();
    let params = connect::ConnectParams {
        connections: 50,
        concurrency: 8,
        hold: Duration::from_millis(50),
        check_alive: true,
    };
    let record = connect::run(&target, &params, own_probe()).await;
    assert!(record.is_ok(), "{record}");
    assert_eq!(record.get("connected"), Some(50.0));
    assert!(record.get("rss_kib_per_conn").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_cycles_complete() {
    let addr = raw_server().await;
    let target = Arc::new(Target::parse(&format!("ws://{addr}/echo")).unwrap());
    let params = handshake::HandshakeParams {
        concurrency: 2,
        warmup: Duration::ZERO,
        duration: SHORT,
    };
    let record = handshake::run(target, &params, None).await;
    assert!(record.is_ok(), "{record}");
    assert!(record.get("handshakes").unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_to_every_receiver() {
    let addr = raw_server().await;
    let target = Arc::new(Target::parse(&format!("ws://{addr}/chat")).unwrap());
    let params = fanout::FanoutParams {
        subscribers: 5,
        rate: 200.0,
        size: 64,
        warmup: Duration::from_millis(50),
        duration: SHORT,
        connect_concurrency: 4,
        subscriber_url: None,
    };
    let record = fanout::run(target, &params, None).await;
    assert!(record.is_ok(), "{record}");
    assert_eq!(record.get("lost"), Some(0.0));
    assert_eq!(record.get("receivers"), Some(6.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_an_echo_route_reports_loss() {
    let addr = raw_server().await;
    // /echo returns only the publisher's own messages: subscribers get nothing.
    let target = Arc::new(Target::parse(&format!("ws://{addr}/echo")).unwrap());
    let params = fanout::FanoutParams {
        subscribers: 2,
        rate: 100.0,
        size: 64,
        warmup: Duration::ZERO,
        duration: Duration::from_millis(200),
        connect_concurrency: 4,
        subscriber_url: None,
    };
    let record = tokio::time::timeout(Duration::from_secs(30), fanout::run(target, &params, None))
        .await
        .unwrap();
    assert!(!record.is_ok(), "{record}");
}

#[tokio::test]
async fn unknown_routes_are_connection_errors() {
    let addr = raw_server().await;
    let target = Target::parse(&format!("ws://{addr}/nope")).unwrap();
    let params = echo::EchoParams {
        connections: 1,
        size: 8,
        binary: false,
        in_flight: 1,
        warmup: Duration::ZERO,
        duration: Duration::from_millis(50),
        connect_concurrency: 1,
        rate: None,
    };
    let record = echo::run(&target, &params, None).await;
    assert!(record.errors >= 1, "{record}");
    assert!(record.error_samples[0].contains("404"), "{record}");
}

/// The raw server has no permessage-deflate: the compression rows must fail
/// against it rather than measure uncompressed echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_rows_fail_when_the_server_does_not_negotiate_compression() {
    let addr = raw_server().await;
    let target = Target::parse(&format!("ws://{addr}/echo")).unwrap();
    let params = deflate::DeflateEchoParams {
        connections: 2,
        size: 4096,
        warmup: Duration::from_millis(50),
        duration: Duration::from_millis(200),
        connect_concurrency: 2,
        offer: deflate::Offer::NoContext,
    };
    let record = deflate::run_echo(&target, &params, None).await;
    assert!(!record.is_ok());
    assert_eq!(record.get("connected"), Some(0.0));
    assert!(
        record.error_samples[0].contains("did not accept permessage-deflate"),
        "{:?}",
        record.error_samples
    );

    let params = deflate::DeflateIdleParams {
        connections: 3,
        concurrency: 3,
        hold: Duration::from_millis(10),
        size: 4096,
        offer: deflate::Offer::Browser,
    };
    let record = deflate::run_idle(&target, &params, None).await;
    assert_eq!(record.get("connected"), Some(0.0));
    let refused = record
        .error_samples
        .iter()
        .filter(|e| e.contains("did not accept permessage-deflate"))
        .count();
    assert_eq!(refused, 3, "{:?}", record.error_samples);
}
