//! ABI 1.2 topics and timers with a real server and real clients: a chat
//! room that a reload no longer splits, fan-out order and exactly-once
//! delivery, a subscriber that stops consuming, the memory of a large
//! publish, the caps, and timers. The C demo handler
//! `handlers/c/pubsub_wsh.c` drives the C side of the API (its commands are
//! listed at the top of that file); chat drives the Rust SDK.

use std::collections::HashSet;
use std::path::Path;

use futures_util::SinkExt;
use futures_util::future::join_all;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Installs a new version of chat: the built library with `marker` bytes
/// appended (a different hash, the same code), renamed into place.
fn reinstall_chat(dir: &Path, marker: u8) {
    let mut bytes = std::fs::read(built_handlers().join("libchat_wsh.so")).unwrap();
    bytes.extend_from_slice(&[marker; 64]);
    let tmp = dir.join(".libchat_wsh.so.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("libchat_wsh.so")).unwrap();
}

/// Fast reloads; retired versions drain (1012) after `drain`, all at once.
fn drain_config(drain: &str) -> String {
    format!("[reload]\ndebounce = \"50ms\"\ndrain_timeout = \"{drain}\"\ndrain_window = \"0s\"\n")
}

fn chat_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "chat", "libchat_wsh.so");
    dir
}

/// Sends `text` from `from` and checks that every client in `to`, and the
/// sender itself (chat includes it), gets it.
async fn relay(from: &mut Client, to: &mut [&mut Client], text: &str) {
    from.send(Message::text(text)).await.unwrap();
    for c in to.iter_mut() {
        assert_eq!(recv_text(c).await, text);
    }
    assert_eq!(recv_text(from).await, text);
}

/// The scenario: A joins, chat is reinstalled, B joins; messages
/// go both ways, before A's version is drained and after (when A, closed
/// with 1012, comes back on the new version). Before topics, the room
/// lived inside each loaded version: B never saw A's messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_does_not_split_a_chat_room() {
    let dir = chat_dir();
    let srv = Wshd::with_config(dir.path(), &drain_config("3s"), &[]);
    let url = srv.url("/chat");
    let mut a = connect(&url).await;
    srv.wait_log("joined (1 members)").await;
    reinstall_chat(dir.path(), 1);
    srv.wait_log("swapped").await;
    let mut b = connect(&url).await;
    srv.wait_log("joined (2 members)").await;

    relay(&mut a, &mut [&mut b], "from A on the old version").await;
    relay(&mut b, &mut [&mut a], "from B on the new version").await;

    // The old version drains: A is told to reconnect, and does.
    assert_eq!(recv_close(&mut a).await.0, 1012);
    srv.wait_log("destroyed handler instance").await;
    let mut a = connect(&url).await;
    srv.wait_log_count("joined (2 members)", 2).await;
    relay(&mut a, &mut [&mut b], "from A after the drain").await;
    relay(&mut b, &mut [&mut a], "from B after the drain").await;
}

/// The same with 50 members spread over three versions: one message from a
/// member of each version reaches all 50; after the two old versions are
/// drained and their members reconnect, again.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_members_over_three_versions_are_one_room() {
    let dir = chat_dir();
    let srv = Wshd::with_config(dir.path(), &drain_config("6s"), &[]);
    let url = srv.url("/chat");
    let mut members: Vec<Client> = Vec::new();
    let mut version_of = Vec::new();
    for (version, n) in [(1usize, 17usize), (2, 17), (3, 16)] {
        if version > 1 {
            reinstall_chat(dir.path(), version as u8);
            srv.wait_log_count("swapped", version - 1).await;
        }
        for _ in 0..n {
            members.push(connect(&url).await);
            version_of.push(version);
        }
        srv.wait_log(&format!("joined ({} members)", members.len()))
            .await;
    }

    exchange(&mut members, "before the drains").await;

    // Versions 1 and 2 drain; their 34 members reconnect (to version 3).
    for (i, m) in members.iter_mut().enumerate() {
        if version_of[i] < 3 {
            assert_eq!(recv_close(m).await.0, 1012, "member {i}");
            *m = connect(&url).await;
        }
    }
    srv.wait_log_count("joined (", 50 + 34).await;
    exchange(&mut members, "after the drains").await;
}

/// One message from a member of each version (0, 17, 34) reaches all.
async fn exchange(members: &mut [Client], round: &str) {
    for s in [0, 17, 34] {
        let text = format!("{round}: hello from member {s}");
        members[s].send(Message::text(text.clone())).await.unwrap();
        for (i, m) in members.iter_mut().enumerate() {
            assert_eq!(recv_text(m).await, text, "member {i}");
        }
    }
}

/// The C pubsub demo, twice: `pubsub` (callbacks inline) and
/// `pubsub_block` (MAY_BLOCK: its callbacks may block, e.g. "wait").
fn pubsub_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    build_c_file("pubsub_wsh.c", &dir.path().join("pubsub_wsh.so"), &[]);
    build_c_file(
        "pubsub_wsh.c",
        &dir.path().join("pubsub_block_wsh.so"),
        &["-DPUBSUB_MAY_BLOCK", "-DPUBSUB_NAME=\"pubsub_block\""],
    );
    dir
}

/// One command and its reply.
async fn cmd(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    recv_text(ws).await
}

/// `n` clients on `path`, each subscribed to `topic`; connected `par` at a
/// time.
async fn subscribers(srv: &Wshd, path: &str, topic: &str, n: usize) -> Vec<Client> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(100);
        let url = srv.url(path);
        let joined = join_all((0..batch).map(|_| {
            let url = url.clone();
            let sub = format!("sub {topic}");
            async move {
                let mut c = connect(&url).await;
                assert_eq!(cmd(&mut c, &sub).await, "sub 0");
                c
            }
        }))
        .await;
        all.extend(joined);
    }
    all
}

/// Reads text messages until `last` (included).
async fn read_until(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let t = recv_text(c).await;
        let done = t == last;
        got.push(t);
        if done {
            return got;
        }
    }
}

/// 1,000 subscribers each get every one of 100 publishes, made by four
/// handler threads at once, exactly once, each thread's in its order, and
/// all subscribers in the same order (a topic's publishes are serialized).
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_subscribers_get_every_publish_once_and_in_order() {
    let dir = pubsub_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut subs = subscribers(&srv, "/pubsub", "fan", 1000).await;
    let mut publisher = connect(&srv.url("/pubsub")).await;
    assert_eq!(cmd(&mut publisher, "count fan").await, "count 1000");
    assert_eq!(
        cmd(&mut publisher, "threads fan 4 25").await,
        "threads started"
    );

    let orders = join_all(subs.iter_mut().map(|c| read_until(c, "done"))).await;
    let first = &orders[0];
    assert_eq!(first.len(), 101, "100 publishes and the final \"done\"");
    let unique: HashSet<&String> = first.iter().collect();
    assert_eq!(unique.len(), 101, "no duplicates: {first:?}");
    for t in 0..4 {
        let mine: Vec<&String> = first
            .iter()
            .filter(|m| m.starts_with(&format!("t{t}-")))
            .collect();
        let expected: Vec<String> = (0..25).map(|i| format!("t{t}-{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "thread {t}'s order"
        );
    }
    for (i, o) in orders.iter().enumerate() {
        assert_eq!(o, first, "subscriber {i} saw another order");
    }
}

/// A subscriber that stops consuming (its session is stuck in a blocking
/// callback, so nothing leaves its queue; its client never reads either)
/// is dropped by the slow-consumer policy once its queue (16 messages
/// here) overflows, while 999 others get all 100 publishes and every
/// publish returns at once: the publisher gets each reply while the slow
/// subscriber is still stuck.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_never_reads_is_dropped_and_the_others_get_everything() {
    let dir = pubsub_dir();
    let config = "[[route]]\npath = \"/slow\"\nhandler = \"pubsub_block\"\n\
                  [route.limits]\nsend_queue = 16\n";
    let srv = Wshd::with_config(dir.path(), config, &[]);
    let mut readers = subscribers(&srv, "/pubsub", "feed", 999).await;
    let mut slow = connect(&srv.url("/slow")).await;
    assert_eq!(cmd(&mut slow, "sub feed").await, "sub 0");
    slow.send(Message::text("wait")).await.unwrap();
    srv.wait_log("pubsub: waiting").await;

    let mut publisher = connect(&srv.url("/pubsub")).await;
    let mut reached = Vec::new();
    for i in 0..100 {
        let reply = cmd(&mut publisher, &format!("pub feed m{i:03}")).await;
        reached.push(
            reply
                .strip_prefix("pub ")
                .unwrap()
                .parse::<usize>()
                .unwrap(),
        );
    }
    // The slow one took 16, then overflowed and was closed: later
    // publishes reach only the 999.
    assert_eq!(reached[0], 1000, "{reached:?}");
    assert_eq!(reached[99], 999, "{reached:?}");
    assert!(
        srv.log()
            .contains("send queue full: closing slow consumer with 1008")
    );
    let expected: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    let got = join_all(readers.iter_mut().map(|c| read_until(c, "m099"))).await;
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &expected, "reader {i}");
    }
    // Released (through the same library: "wait" is a static of each
    // loaded copy), the slow subscriber's session closes it with 1008.
    let mut releaser = connect(&srv.url("/pubsub_block")).await;
    assert_eq!(cmd(&mut releaser, "release").await, "released");
    assert_eq!(recv_close(&mut slow).await.0, 1008);
    srv.wait_log("close_code=1008").await;
    assert_eq!(cmd(&mut publisher, "count feed").await, "count 999");
}

/// A 1 MiB publish to 1,000 subscribers costs the server about one copy
/// of the message, not 1,000: every queue holds a reference to the same
/// bytes.
///
/// The message must still be queued when RSS is measured: a session that
/// writes it copies it into its socket buffer (the transport's cost, the
/// same for a plain `send`). So the subscribers are on a MAY_BLOCK route
/// whose 64 callback slots are all taken by 64 "wait"ing connections; each
/// subscriber then sends one more command, and its session stops at the
/// slot it cannot get, leaving its queue alone. (A session that has not
/// read that command yet when the publish comes would write the message:
/// the bound below leaves room for a few dozen of those.)
#[tokio::test(flavor = "multi_thread")]
async fn a_large_publish_to_a_thousand_subscribers_is_stored_once() {
    const SIZE: usize = 1 << 20;
    let dir = pubsub_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut subs = subscribers(&srv, "/pubsub_block", "big", 1000).await;
    let mut blockers = Vec::new();
    for _ in 0..64 {
        let mut c = connect(&srv.url("/pubsub_block")).await;
        c.send(Message::text("wait")).await.unwrap();
        blockers.push(c);
    }
    srv.wait_log_count("pubsub: waiting", 64).await;
    join_all(subs.iter_mut().map(|c| c.send(Message::text("count big")))).await;
    let mut publisher = connect(&srv.url("/pubsub")).await;
    assert_eq!(cmd(&mut publisher, "count big").await, "count 1000");
    let pid = srv.child.id();
    let before = rss(pid);
    assert_eq!(
        cmd(&mut publisher, &format!("big big {SIZE}")).await,
        "big 1000"
    );
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB for a 1 MiB message to 1000 subscribers",
        grown >> 20
    );
    // The server is killed with the message still queued.
    drop((subs, blockers));
}

/// Publishes are written straight to idle subscribers' sockets
/// (direct.rs). A 1 MiB frame does not fit in a socket's send buffer, so
/// the socket takes part of it and the session must write the rest before
/// anything else; later publishes queue behind it. Subscribers that read
/// only after all the publishes get every frame whole and in publish
/// order, small and large interleaved: a frame written into the middle of
/// another would break their WebSocket parser or the order.
#[tokio::test(flavor = "multi_thread")]
async fn frames_a_full_socket_cut_short_are_finished_first_and_in_order() {
    const BIG: usize = 1 << 20;
    const ROUNDS: usize = 12;
    let dir = pubsub_dir();
    let srv = Wshd::with_config(dir.path(), "[limits]\nsend_queue_bytes = \"64MiB\"\n", &[]);
    let mut subs = subscribers(&srv, "/pubsub", "spill", 4).await;
    let mut publisher = connect(&srv.url("/pubsub")).await;
    for i in 0..ROUNDS {
        assert_eq!(
            cmd(&mut publisher, &format!("pub spill m{i:02}")).await,
            "pub 4"
        );
        assert_eq!(
            cmd(&mut publisher, &format!("big spill {BIG}")).await,
            "big 4"
        );
    }
    srv.wait_log("was cut short by a full socket").await;
    for (n, s) in subs.iter_mut().enumerate() {
        for i in 0..ROUNDS {
            assert_eq!(recv_text(s).await, format!("m{i:02}"), "subscriber {n}");
            match recv(s).await {
                Message::Binary(b) => {
                    assert_eq!(b.len(), BIG, "subscriber {n}, round {i}");
                    assert!(b.iter().all(|&c| c == b'x'), "subscriber {n}, round {i}");
                }
                other => panic!("subscriber {n}, round {i}: expected 1 MiB, got {other:?}"),
            }
        }
    }
}

/// Subscribers that ping while publishes are written straight to their
/// sockets (direct.rs): the server's pongs are written by the session,
/// never while a publisher may be writing, so every frame arrives whole
/// and every ping gets its pong.
#[tokio::test(flavor = "multi_thread")]
async fn pongs_and_direct_publishes_do_not_interleave() {
    const N: usize = 20;
    const PUBLISHES: usize = 200;
    const SIZE: usize = 10_000;
    let dir = pubsub_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let subs = subscribers(&srv, "/pubsub", "pings", N).await;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                let (mut got, mut pings, mut pongs) = (0, 0, 0);
                while got < PUBLISHES || pongs < pings {
                    if got % 10 == 0 && pings * 10 <= got && got < PUBLISHES {
                        c.send(Message::Ping(vec![7u8; 8].into())).await.unwrap();
                        pings += 1;
                    }
                    let m = tokio::time::timeout(std::time::Duration::from_secs(20), c.next())
                        .await
                        .expect("timed out")
                        .expect("stream ended")
                        .expect("a broken frame");
                    match m {
                        Message::Binary(b) => {
                            assert_eq!(b.len(), SIZE);
                            assert!(b.iter().all(|&x| x == b'x'));
                            got += 1;
                        }
                        Message::Pong(p) => {
                            assert_eq!(&p[..], &[7u8; 8]);
                            pongs += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                (got, pings, pongs)
            })
        })
        .collect();
    let mut publisher = connect(&srv.url("/pubsub")).await;
    for _ in 0..PUBLISHES {
        assert_eq!(
            cmd(&mut publisher, &format!("big pings {SIZE}")).await,
            format!("big {N}")
        );
    }
    for r in join_all(readers).await {
        let (got, pings, pongs) = r.unwrap();
        assert_eq!(got, PUBLISHES);
        assert!(pings > 0 && pongs == pings, "{pings} pings, {pongs} pongs");
    }
}

/// Over the per-connection topic cap, over the server's topic cap, and a
/// topic name over 256 bytes: errors returned, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn topic_caps_and_names_are_enforced() {
    let dir = pubsub_dir();
    let config = "[topics]\nmax_per_connection = 3\nmax_topics = 5\n";
    let srv = Wshd::with_config(dir.path(), config, &[]);
    let mut a = connect(&srv.url("/pubsub")).await;
    let mut b = connect(&srv.url("/pubsub")).await;
    let long = "x".repeat(257);
    assert_eq!(
        cmd(&mut a, &format!("sub {long}")).await,
        "sub -3",
        "257 bytes"
    );
    assert_eq!(cmd(&mut a, &format!("pub {long} hi")).await, "pub -3");
    for t in ["t1", "t2", "t3"] {
        assert_eq!(cmd(&mut a, &format!("sub {t}")).await, "sub 0");
    }
    assert_eq!(cmd(&mut a, "sub t1").await, "sub 0", "again: no new topic");
    assert_eq!(cmd(&mut a, "sub t4").await, "sub -7", "WSHD_ERR_LIMIT");
    assert_eq!(cmd(&mut a, "is t4").await, "is 0");
    assert_eq!(cmd(&mut b, "sub t4").await, "sub 0");
    assert_eq!(cmd(&mut b, "sub t5").await, "sub 0");
    assert_eq!(
        cmd(&mut b, "sub t6").await,
        "sub -7",
        "5 topics on the server"
    );
    assert_eq!(cmd(&mut b, "count t6").await, "count 0");
    // Leaving frees the caps.
    assert_eq!(cmd(&mut a, "unsub t3").await, "unsub 0");
    assert_eq!(cmd(&mut a, "sub t4").await, "sub 0");
    assert_eq!(cmd(&mut a, "count t4").await, "count 2");
    drop(a);
    srv.wait_log_count("close_code=", 1).await;
    assert_eq!(
        cmd(&mut b, "sub t6").await,
        "sub 0",
        "a's topics t1 and t2 are gone"
    );
}

/// The id in a reply like "timer 7".
fn id_of(reply: &str, cmd: &str) -> u64 {
    reply
        .strip_prefix(cmd)
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected `{cmd} ID`, got {reply:?}"))
}

/// A timer fires once, as a callback of its connection; a cancelled one
/// never fires; a closed connection's timer never fires; an instance timer
/// fires with no connection.
#[tokio::test(flavor = "multi_thread")]
async fn timers_fire_once_and_cancelled_or_orphaned_ones_never() {
    let dir = pubsub_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut a = connect(&srv.url("/pubsub")).await;

    // Fires once, after the reply that set it.
    let t1 = id_of(&cmd(&mut a, "timer 20").await, "timer");
    assert_eq!(recv_text(&mut a).await, format!("fired {t1}"));
    // Cancelled: a later timer fires and the cancelled one never did, nor
    // did t1 again.
    // (Delays leave a second for a round trip on a loaded machine: a
    // cancel that came after the timer fired would read "cancel -4".)
    let t2 = id_of(&cmd(&mut a, "timer 1000").await, "timer");
    let cancelled = cmd(&mut a, &format!("cancel {t2}")).await;
    assert_eq!(cancelled, "cancel 0", "timer {t2}:\n{}", srv.log());
    assert_eq!(
        cmd(&mut a, &format!("cancel {t2}")).await,
        "cancel -4",
        "not pending"
    );
    let t3 = id_of(&cmd(&mut a, "timer 1500").await, "timer");
    assert_eq!(recv_text(&mut a).await, format!("fired {t3}"));

    // A closed connection's timer is dropped with it.
    let mut b = connect(&srv.url("/pubsub")).await;
    let orphan = id_of(&cmd(&mut b, "timer 1000").await, "timer");
    b.close(None).await.unwrap();
    srv.wait_log_count("close_code=", 1).await;
    // Due after the orphan was.
    let t4 = id_of(&cmd(&mut a, "timer 1500").await, "timer");
    assert_eq!(recv_text(&mut a).await, format!("fired {t4}"));

    // An instance timer (conn 0) publishes to "itimers".
    assert_eq!(cmd(&mut a, "sub itimers").await, "sub 0");
    let t5 = id_of(&cmd(&mut a, "itimer 10").await, "itimer");
    assert_eq!(recv_text(&mut a).await, format!("ifired {t5}"));

    let log = srv.log();
    for (t, times) in [(t1, 1), (t2, 0), (t3, 1), (orphan, 0), (t4, 1), (t5, 1)] {
        assert_eq!(
            log.matches(&format!("pubsub: timer {t} fired")).count(),
            times,
            "timer {t}:\n{log}"
        );
    }
}

/// A connection's timer never runs beside its other callbacks: one that
/// comes due while a (MAY_BLOCK) callback of the connection is blocked
/// runs after it, so its message comes after that callback's reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_timer_waits_for_the_running_callback_of_its_connection() {
    let dir = pubsub_dir();
    let srv = Wshd::start(dir.path(), &[]);
    let mut a = connect(&srv.url("/pubsub_block")).await;
    let t = id_of(&cmd(&mut a, "timer 500").await, "timer");
    a.send(Message::text("wait")).await.unwrap();
    // The timer comes due while "wait" blocks.
    let log = srv.wait_log("timer due").await;
    let waiting = log
        .find("pubsub: waiting")
        .expect("the callback is blocking");
    let due = log.find(&format!("timer={t}")).expect("the timer came due");
    assert!(
        waiting < due,
        "due only after the callback started blocking:\n{log}"
    );
    let mut other = connect(&srv.url("/pubsub_block")).await;
    assert_eq!(cmd(&mut other, "release").await, "released");
    assert_eq!(recv_text(&mut a).await, "waited");
    assert_eq!(recv_text(&mut a).await, format!("fired {t}"));
}

/// A timer of a connection on a retired version fires into that version
/// (its own), and the per-connection timer cap is enforced.
#[tokio::test(flavor = "multi_thread")]
async fn timers_stay_with_their_version_and_are_capped() {
    let dir = pubsub_dir();
    let srv = Wshd::with_config(
        dir.path(),
        &format!(
            "{}[timers]\nmax_per_connection = 2\n",
            drain_config("never")
        ),
        &[],
    );
    let mut a = connect(&srv.url("/pubsub")).await;
    let t1 = id_of(&cmd(&mut a, "timer 600000").await, "timer");
    let t2 = id_of(&cmd(&mut a, "timer 1500").await, "timer");
    assert_eq!(
        cmd(&mut a, "timer 1").await,
        "timer -7",
        "two pending already"
    );
    assert_eq!(cmd(&mut a, &format!("cancel {t1}")).await, "cancel 0");
    // A new version of the library takes over the route; a's timer
    // belongs to a's version and fires there, not into 2.0.0.
    let v2 = dir.path().join(".v2");
    build_c_file("pubsub_wsh.c", &v2, &["-DPUBSUB_VERSION=\"2.0.0\""]);
    std::fs::rename(&v2, dir.path().join("pubsub_wsh.so")).unwrap();
    srv.wait_log("swapped").await;
    let mut b = connect(&srv.url("/pubsub")).await;
    let t3 = id_of(&cmd(&mut b, "timer 1").await, "timer");
    assert_eq!(recv_text(&mut b).await, format!("fired {t3}"));
    assert_eq!(
        cmd(&mut b, &format!("cancel {t2}")).await,
        "cancel -4",
        "the new version cannot cancel the old one's timer"
    );
    assert_eq!(recv_text(&mut a).await, format!("fired {t2}"));
    let log = srv.log();
    assert!(log.contains(&format!("timer {t2} fired for conn")), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains(&format!("pubsub: timer {t2} fired")))
        .unwrap();
    assert!(line.contains("on 1.0.0"), "{line}");
    assert!(log.contains(&format!("pubsub: timer {t3} fired for conn")));
    assert!(log.contains("on 2.0.0"), "{log}");
}
