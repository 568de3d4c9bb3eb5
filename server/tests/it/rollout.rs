//! Canary rollout, automatic rollback, quarantine and pinned hashes
//! (issue #15 sections 2-4), with the C echo handler built in versions that
//! tell themselves apart ("v2:" prefix) or fail every message (1011).

use std::path::{Path, PathBuf};

use futures_util::SinkExt;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Builds v1 (plain echo), v2 ("v2:" prefix) and a broken version whose
/// every message fails (Close 1011).
fn versions() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (v1, v2, bad) = (
        d.path().join("v1.so"),
        d.path().join("v2.so"),
        d.path().join("bad.so"),
    );
    build_c(&v1, &[]);
    build_c(&v2, &["-DECHO_PREFIX=\"v2:\""]);
    build_c(&bad, &["-DECHO_FAIL_MESSAGES"]);
    (d, v1, v2, bad)
}

fn sha256_of(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A handler directory holding `v` as c_echo_wsh.so.
fn dir_with(v: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("c_echo_wsh.so");
    std::fs::copy(v, &target).unwrap();
    (dir, target)
}

const FAST: &str = "[reload]\ndebounce = \"50ms\"\ndrain_timeout = \"1h\"\ndrain_window = \"0s\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn canary_takes_its_share_and_a_sighup_at_100_promotes_it() {
    let (_b, v1, v2, _) = versions();
    let (dir, target) = dir_with(&v1);
    let cfg_dir = tempfile::tempdir().unwrap();
    let rollout = "[rollout]\ncanary_percent = 10\ncanary_period = \"1h\"\n";
    let cfg = write_config(
        cfg_dir.path(),
        &format!("status_file = \"status\"\n{FAST}{rollout}"),
    );
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    std::fs::copy(&v2, &target).unwrap();
    srv.wait_log("canary started").await;

    // `--list` with the same config shows the running server's table,
    // once the server has rewritten it after the step it logged.
    let status = cfg_dir.path().join("status");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("canary")) {
        assert!(
            std::time::Instant::now() < deadline,
            "status file never showed the canary"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(["--list", "--config"])
        .arg(&cfg)
        .arg("-w")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let running = stdout
        .split("a start with this configuration would serve")
        .next()
        .unwrap();
    assert!(running.contains("running server"), "{stdout}");
    let line = |state: &str| {
        running
            .lines()
            .find(|l| l.starts_with("/c_echo") && l.contains(state))
            .unwrap_or_else(|| panic!("no {state} line in {stdout}"))
            .to_owned()
    };
    let (serving, canary) = (line("serving"), line("canary"));
    assert!(
        serving.contains(" 90%") && serving.contains(&sha256_of(&v1)),
        "{stdout}"
    );
    assert!(
        canary.contains(" 10%") && canary.contains(&sha256_of(&v2)),
        "{stdout}"
    );

    // 1000 new connections, 20 at a time: 100 +- 30 reach the canary.
    let url = srv.url("/c_echo");
    let mut on_canary = 0;
    for batch in 0..50 {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    let mut ws = connect(&url).await;
                    let msg = format!("b{batch}-{i}");
                    let got = echo_once(&mut ws, &msg).await;
                    let _ = ws.close(None).await;
                    got == format!("v2:{msg}")
                })
            })
            .collect();
        for t in tasks {
            on_canary += usize::from(t.await.unwrap());
        }
    }
    assert!(
        (70..=130).contains(&on_canary),
        "{on_canary} of 1000 on the canary"
    );

    // Manual promote: canary_percent = 100 and SIGHUP.
    write_config(
        cfg_dir.path(),
        &format!("{FAST}[rollout]\ncanary_percent = 100\n"),
    );
    srv.signal("HUP");
    let log = srv.wait_log("promoted").await;
    assert!(log.contains("manual promote"), "{log}");
    let mut ws = connect(&url).await;
    assert_eq!(echo_once(&mut ws, "after").await, "v2:after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_canary_is_rolled_back_and_its_connections_drain() {
    let (_b, v1, _, bad) = versions();
    let (dir, target) = dir_with(&v1);
    let rollout = "[rollout]\ncanary_percent = 50\ncanary_period = \"1h\"\nmax_1011_closes = 0\n";
    let srv = Wshd::with_config(dir.path(), &format!("{FAST}{rollout}"), &[]);
    std::fs::copy(&bad, &target).unwrap();
    srv.wait_log("canary started").await;

    // At 50% the split alternates: stable, canary, stable, canary.
    let url = srv.url("/c_echo");
    let mut stable1 = connect(&url).await;
    let mut canary1 = connect(&url).await;
    let mut stable2 = connect(&url).await;
    let mut canary2 = connect(&url).await;
    assert_eq!(echo_once(&mut stable1, "one").await, "one");
    canary1.send(Message::text("boom")).await.unwrap();
    assert_eq!(recv_close(&mut canary1).await.0, 1011);

    let log = srv.wait_log("rolled back").await;
    assert!(log.contains("max_1011_closes = 0"), "{log}");
    // The other canary connection drains at once although drain_timeout
    // is an hour: the version is known bad.
    assert_eq!(recv_close(&mut canary2).await.0, 1012);
    assert_eq!(echo_once(&mut stable2, "two").await, "two");
    for i in 0..4 {
        let mut ws = connect(&url).await;
        let msg = format!("after-{i}");
        assert_eq!(
            echo_once(&mut ws, &msg).await,
            msg,
            "new connections go to v1"
        );
    }

    // The rolled-back bytes are not rolled out again by a later reload.
    std::fs::copy(&bad, &target).unwrap();
    install(dir.path(), "echo", "libecho_wsh.so");
    srv.wait_log("route=/echo").await;
    let log = srv.log();
    assert_eq!(log.matches("canary started").count(), 1, "{log}");
    let mut ws = connect(&url).await;
    assert_eq!(echo_once(&mut ws, "still v1").await, "still v1");
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_falls_back_to_the_last_good_version() {
    let (_b, v1, v2, bad) = versions();
    let (dir, target) = dir_with(&v1);
    let q = "[rollout]\nquarantine_faults = 3\nquarantine_window = \"1m\"\n";
    let srv = Wshd::with_config(dir.path(), &format!("{FAST}{q}"), &[]);
    // The default rollout switches at once: the broken version serves all.
    std::fs::copy(&bad, &target).unwrap();
    srv.wait_log("swapped").await;
    let url = srv.url("/c_echo");
    for i in 0..4 {
        let mut ws = connect(&url).await;
        ws.send(Message::text(format!("f{i}"))).await.unwrap();
        assert_eq!(recv_close(&mut ws).await.0, 1011);
    }
    let log = srv.wait_log("quarantined").await;
    assert!(log.contains("last good version"), "{log}");
    let mut ws = connect(&url).await;
    assert_eq!(echo_once(&mut ws, "back on v1").await, "back on v1");

    // New bytes end the quarantine.
    std::fs::copy(&v2, &target).unwrap();
    srv.wait_log_count("swapped", 2).await;
    let mut ws = connect(&url).await;
    assert_eq!(echo_once(&mut ws, "x").await, "v2:x");
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_without_a_good_version_keeps_serving_and_warns() {
    let (_b, _, _, bad) = versions();
    let (dir, _target) = dir_with(&bad);
    let q = "[rollout]\nquarantine_faults = 2\nquarantine_window = \"1m\"\n";
    let srv = Wshd::with_config(dir.path(), &format!("{FAST}{q}"), &[]);
    let url = srv.url("/c_echo");
    for i in 0..3 {
        let mut ws = connect(&url).await;
        ws.send(Message::text(format!("f{i}"))).await.unwrap();
        assert_eq!(recv_close(&mut ws).await.0, 1011);
    }
    let log = srv.wait_log("quarantined").await;
    assert!(log.contains("no earlier good version"), "{log}");
    assert!(log.contains("warning every 60s"), "{log}");
    // Still served (and still failing): nothing better is loaded.
    let mut ws = connect(&url).await;
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(recv_close(&mut ws).await.0, 1011);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_mismatch_is_refused_and_the_pinned_version_keeps_serving() {
    let (_b, v1, v2, _) = versions();
    let (dir, target) = dir_with(&v1);
    let (h1, h2) = (sha256_of(&v1), sha256_of(&v2));
    let route = format!(
        "[[route]]\npath = \"/c_echo\"\nhandler = \"c_echo\"\nsha256 = \"{}\"\n",
        h1.to_uppercase()
    );
    let srv = Wshd::with_config(dir.path(), &format!("{FAST}{route}"), &[]);
    let mut open = connect(&srv.url("/c_echo")).await;
    std::fs::copy(&v2, &target).unwrap();
    let log = srv.wait_log("pins sha256").await;
    let line = log.lines().find(|l| l.contains("pins sha256")).unwrap();
    assert!(line.contains(&h1) && line.contains(&h2), "{line}");
    assert!(line.contains("keeps serving /c_echo"), "{line}");
    // Refused before loading: only v1 was ever loaded.
    assert_eq!(log.matches("loaded handler library").count(), 1, "{log}");
    let mut ws = connect(&srv.url("/c_echo")).await;
    assert_eq!(echo_once(&mut ws, "v1").await, "v1");
    assert_eq!(echo_once(&mut open, "open").await, "open");
}

#[test]
fn list_prints_versions_states_shares_and_full_hashes() {
    let (_b, v1, v2, _) = versions();
    let (dir, _) = dir_with(&v1);
    let cfg_dir = tempfile::tempdir().unwrap();
    let list = |cfg: &str| {
        let cfg = write_config(cfg_dir.path(), cfg);
        std::process::Command::new(env!("CARGO_BIN_EXE_wshd"))
            .args(["--list", "--config"])
            .arg(cfg)
            .arg("-w")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = list("");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("STATE") && stdout.contains("SHA256"),
        "{stdout}"
    );
    let line = stdout.lines().find(|l| l.starts_with("/c_echo")).unwrap();
    assert!(line.contains("serving") && line.contains("100%"), "{line}");
    assert!(line.contains(&sha256_of(&v1)), "{line}");

    // A pin that does not match: refused, with both hashes, exit 1.
    let wrong = sha256_of(&v2);
    let out = list(&format!(
        "[[route]]\npath = \"/c_echo\"\nhandler = \"c_echo\"\nsha256 = \"{wrong}\"\n"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&wrong) && stderr.contains(&sha256_of(&v1)),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_at_0_rolls_the_canary_back_by_hand_and_it_may_come_back() {
    let (_b, v1, v2, _) = versions();
    let (dir, target) = dir_with(&v1);
    let cfg_dir = tempfile::tempdir().unwrap();
    let at = |p: u8| format!("{FAST}[rollout]\ncanary_percent = {p}\ncanary_period = \"1h\"\n");
    let cfg = write_config(cfg_dir.path(), &at(50));
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    std::fs::copy(&v2, &target).unwrap();
    srv.wait_log("canary started").await;

    write_config(cfg_dir.path(), &at(0));
    srv.signal("HUP");
    let log = srv.wait_log("rolled back").await;
    assert!(log.contains("manual rollback"), "{log}");
    let url = srv.url("/c_echo");
    for i in 0..4 {
        let mut ws = connect(&url).await;
        let msg = format!("m{i}");
        assert_eq!(
            echo_once(&mut ws, &msg).await,
            msg,
            "all on v1 after the rollback"
        );
    }

    // A manual rollback does not condemn the bytes: at 50% they roll out again.
    write_config(cfg_dir.path(), &at(50));
    srv.signal("HUP");
    srv.wait_log_count("canary started", 2).await;
    let replies: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..2 {
            let mut ws = connect(&url).await;
            v.push(echo_once(&mut ws, &format!("n{i}")).await);
        }
        v
    };
    assert_eq!(replies, ["n0", "v2:n1"]);
}

#[test]
fn a_status_file_inside_the_handler_dir_is_refused() {
    // Every write would be a change under the watched directory, and so a
    // reload that writes it again.
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("status");
    let cfg = write_config(
        cfg_dir.path(),
        &format!("status_file = \"{}\"\n", inside.display()),
    );
    let err = match Wshd::try_start(dir.path(), &["--config", cfg.to_str().unwrap()]) {
        Ok(_) => panic!("started with status_file inside handler_dir"),
        Err(log) => log,
    };
    assert!(err.contains("is inside handler_dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_failing_handshakes_with_5xx_is_rolled_back() {
    // A config change makes a new instance, which rolls out like new bytes.
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "testkit", "libtestkit_wsh.so");
    let cfg_dir = tempfile::tempdir().unwrap();
    let with = |changed: bool| {
        format!(
            "{FAST}[rollout]\ncanary_percent = 50\ncanary_period = \"1h\"\nmax_5xx_handshakes = 1\n\
             [[route]]\npath = \"/tk\"\nhandler = \"testkit\"\n{}",
            if changed {
                "[route.config]\nfail_init = false\n"
            } else {
                ""
            }
        )
    };
    let cfg = write_config(cfg_dir.path(), &with(false));
    let srv = Wshd::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    write_config(cfg_dir.path(), &with(true));
    srv.signal("HUP");
    srv.wait_log("canary started").await;

    // Alternating split: stable, canary, stable, canary. One 500 from the
    // canary stays within max_5xx_handshakes = 1; the second crosses it.
    for _ in 0..4 {
        match tokio_tungstenite::connect_async(srv.url("/tk?fail_handshake")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 500)
            }
            other => panic!("expected a 500, got {other:?}"),
        }
    }
    let log = srv.wait_log("rolled back").await;
    assert!(log.contains("max_5xx_handshakes = 1"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_canary_is_promoted_when_its_period_ends() {
    let (_b, v1, v2, _) = versions();
    let (dir, target) = dir_with(&v1);
    let rollout = "[rollout]\ncanary_percent = 50\ncanary_period = \"300ms\"\n";
    let srv = Wshd::with_config(dir.path(), &format!("{FAST}{rollout}"), &[]);
    std::fs::copy(&v2, &target).unwrap();
    srv.wait_log("canary started").await;
    // Nothing else happens: the period's end alone promotes it.
    let log = srv.wait_log("promoted").await;
    assert!(log.contains("passed under every threshold"), "{log}");
    let url = srv.url("/c_echo");
    for i in 0..4 {
        let mut ws = connect(&url).await;
        let msg = format!("p{i}");
        assert_eq!(echo_once(&mut ws, &msg).await, format!("v2:{msg}"));
    }
}

/// #23: failures a client causes through a server limit are not the
/// version's faults. Clients fill the topic pool from other addresses, then
/// joins on a chat canary fail on the pool (`WSHD_ERR_LIMIT` inside
/// `on_open`) and on the room's own "full" answer (503): the clients get
/// 1013 and 503, never 1011, and the canary with `max_1011_closes = 2` and
/// `max_5xx_handshakes = 2` is not rolled back. The per-address share keeps
/// one address from taking the whole pool.
#[tokio::test(flavor = "multi_thread")]
async fn clients_filling_server_limits_cannot_veto_a_canary() {
    let dir = tempfile::tempdir().unwrap();
    build_c_file("pubsub_wsh.c", &dir.path().join("pubsub_wsh.so"), &[]);
    let chat = dir.path().join("chat_wsh.so");
    std::fs::copy(built_handlers().join("libchat_wsh.so"), &chat).unwrap();
    let cfg = format!(
        "{FAST}[rollout]\ncanary_percent = 50\ncanary_period = \"1h\"\n\
         max_1011_closes = 2\nmax_5xx_handshakes = 2\n\
         [limits]\nper_ip_exempt = []\n\
         [topics]\nmax_topics = 12\nmax_topics_per_ip = 10\n\
         [[route]]\npath = \"/room\"\nhandler = \"chat\"\n[route.config]\nmax_members = 1\n"
    );
    let srv = Wshd::with_config(dir.path(), &cfg, &[]);
    // v2 of chat: the same code, other bytes (a trailing byte).
    let mut v2 = std::fs::read(&chat).unwrap();
    v2.push(0);
    let tmp = dir.path().join(".chat.tmp");
    std::fs::write(&tmp, &v2).unwrap();
    std::fs::rename(&tmp, &chat).unwrap();
    srv.wait_log_count("canary started", 2).await;

    // Address .2 takes its share of 10 and no more, though the pool has 12.
    let mut a = connect_from(&srv.url("/pubsub"), "127.0.0.2").await;
    for i in 0..12 {
        a.send(Message::text(format!("sub a{i}"))).await.unwrap();
        let want = if i < 10 { "sub 0" } else { "sub -7" };
        assert_eq!(recv_text(&mut a).await, want, "topic a{i}");
    }
    // Address .4 takes the last two: the pool is empty.
    let mut b = connect_from(&srv.url("/pubsub"), "127.0.0.4").await;
    for (i, want) in ["sub 0", "sub 0", "sub -7"].into_iter().enumerate() {
        b.send(Message::text(format!("sub b{i}"))).await.unwrap();
        assert_eq!(recv_text(&mut b).await, want, "topic b{i}");
    }
    // Joins cannot create their rooms: 1013, ten times, so five reach the
    // canary (an even split of new connections).
    for i in 0..10 {
        let mut c = connect_from(&srv.url(&format!("/room?room=r{i}")), "127.0.0.3").await;
        let (code, reason) = recv_close(&mut c).await;
        assert_eq!(
            (code, reason.as_str()),
            (1013, "server limit reached, try again later")
        );
    }
    // A room: its one member joins once the pool has room, the next gets
    // the room's own 503, six times (three on the canary).
    b.send(Message::text("unsub b0")).await.unwrap();
    assert_eq!(recv_text(&mut b).await, "unsub 0");
    let mut member = connect_from(&srv.url("/room?room=full"), "127.0.0.3").await;
    member.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv_text(&mut member).await, "hi");
    for _ in 0..6 {
        let (status, _) = try_connect_from(&srv.url("/room?room=full"), "127.0.0.5").await;
        assert_eq!(status, 503);
    }
    // The canary is alive after every refusal above.
    let log = srv.log();
    assert!(!log.contains("rolled back"), "{log}");
    assert!(!log.contains("closing with 1011"), "{log}");
    assert!(log.contains("closing with 1013"), "{log}");
    member.send(Message::text("still")).await.unwrap();
    assert_eq!(recv_text(&mut member).await, "still");
}
