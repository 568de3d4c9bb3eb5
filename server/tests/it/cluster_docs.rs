//! docs/cluster.md's "A two-node cluster on one machine, step by step", run
//! with the files it writes (`cat > node1.toml <<'EOF'` ...), taken from the
//! document itself so that the example cannot rot: only its ports are
//! swapped for free ones. Redis, both nodes and nginx start with the flags
//! the document gives, in the directory layout it makes
//! (`target/cluster-demo` next to `www`); then two clients through nginx
//! must land one on each node and share a room.
//!
//! Needs `redis-server` and `nginx` (Debian's packages; .ci/run installs
//! them), as tests/it/cluster.rs does.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use rustix::process::{Pid, Signal, kill_process};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const SECTION: &str = "## A two-node cluster on one machine, step by step";

/// The files the section writes with `cat > NAME <<'EOF'`, by name.
fn doc_files() -> HashMap<String, String> {
    let doc = std::fs::read_to_string(repo_root().join("docs/cluster.md")).unwrap();
    let start = doc
        .find(SECTION)
        .unwrap_or_else(|| panic!("docs/cluster.md lost its section {SECTION:?}"));
    let section = &doc[start..];
    let section = &section[..section[SECTION.len()..]
        .find("\n## ")
        .map_or(section.len(), |e| e + SECTION.len())];
    let mut files = HashMap::new();
    let mut rest = section;
    while let Some(at) = rest.find("cat > ") {
        let after = &rest[at + "cat > ".len()..];
        let (name, body) = after.split_once(" <<'EOF'\n").expect("a quoted heredoc");
        let (body, next) = body.split_once("\nEOF\n").expect("a heredoc ends with EOF");
        files.insert(name.to_string(), format!("{body}\n"));
        rest = next;
    }
    files
}

async fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "{what} never listened on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process of ours, ended by its PID with `signal` on drop (nginx's
/// master stops its worker on SIGTERM; a SIGKILL would orphan it).
struct Proc(Child, Signal);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = Pid::from_raw(self.0.id() as i32) {
            let _ = kill_process(pid, self.1);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, signal: Signal) -> Proc {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    Proc(child, signal)
}

/// `redis-cli -p PORT pubsub numsub CHANNEL`'s count.
fn numsub(port: u16, channel: &str) -> u32 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "pubsub", "numsub", channel])
        .output()
        .expect("redis-cli (apt-get install redis-server)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_two_node_example_in_docs_cluster_md_works() {
    let files = doc_files();
    let mut names: Vec<&String> = files.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["nginx.conf", "node1.toml", "node2.toml"],
        "{files:#?}"
    );

    // The document's layout: target/cluster-demo beside www/, the chat
    // handler in handlers/, the binary in ../release (here: the test's).
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("target/cluster-demo");
    install(&demo.join("handlers"), "chat", "libchat_wsh.so");
    std::os::unix::fs::symlink(repo_root().join("www"), tmp.path().join("www")).unwrap();

    // Its ports, swapped for free ones in every file. The sockets that
    // found them stay bound until all are found: a port released at once
    // can be handed out again by the next bind (it was: Redis and node 1
    // once got the same one).
    let held: Vec<std::net::TcpListener> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<(u16, u16)> = [6399, 9001, 9002, 9101, 9102, 8080]
        .into_iter()
        .zip(&held)
        .map(|(p, l)| (p, l.local_addr().unwrap().port()))
        .collect();
    drop(held);
    let port = |doc: u16| ports.iter().find(|(d, _)| *d == doc).unwrap().1;
    for (name, body) in &files {
        let mut body = body.clone();
        for (doc, free) in &ports {
            body = body.replace(&format!("127.0.0.1:{doc}"), &format!("127.0.0.1:{free}"));
        }
        std::fs::write(demo.join(name), body).unwrap();
    }
    let node1 = std::fs::read_to_string(demo.join("node1.toml")).unwrap();
    assert!(
        node1.contains(&format!("listen = \"127.0.0.1:{}\"", port(9001))),
        "{node1}"
    );

    let redis_port = port(6399).to_string();
    let _redis = spawn(
        Command::new("redis-server")
            .args(["--port", &redis_port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&demo)
            .current_dir(&demo),
        Signal::KILL,
    );
    wait_port(port(6399), "redis", &demo.join("redis.log")).await;

    let wshd = env!("CARGO_BIN_EXE_wshd");
    for node in ["node1.toml", "node2.toml"] {
        let out = Command::new(wshd)
            .args(["-t", "--config", node])
            .current_dir(&demo)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wshd -t --config {node}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut nodes = Vec::new();
    for (node, p) in [("node1", 9001), ("node2", 9002)] {
        nodes.push(spawn(
            Command::new(wshd)
                .args(["--config", &format!("{node}.toml")])
                .current_dir(&demo)
                .env_remove("RUST_LOG"),
            Signal::KILL,
        ));
        wait_port(port(p), node, &demo.join(format!("{node}.log"))).await;
    }
    let nginx_bin = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nginx");
    let _nginx = spawn(
        Command::new(nginx_bin)
            .arg("-p")
            .arg(&demo)
            .arg("-c")
            .arg(demo.join("nginx.conf"))
            .arg("-e")
            .arg(demo.join("error.log"))
            .args(["-g", "daemon off;"]),
        Signal::TERM,
    );
    wait_port(port(8080), "nginx", &demo.join("error.log")).await;

    // Two clients through nginx: round robin puts one on each node.
    let url = format!("ws://127.0.0.1:{}/chat?room=demo", port(8080));
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    let log = |n: &str| std::fs::read_to_string(demo.join(format!("{n}.log"))).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(log("node1").contains("joined (1 members)")
        && log("node2").contains("joined (1 members)"))
        || numsub(port(6399), "wshd:chat:demo") < 2
    {
        assert!(
            Instant::now() < deadline,
            "not one client per node, both subscribed:\n--- node1\n{}\n--- node2\n{}",
            log("node1"),
            log("node2")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.send(Message::text("hello from a")).await.unwrap();
    assert_eq!(recv_text(&mut a).await, "hello from a");
    assert_eq!(recv_text(&mut b).await, "hello from a");
    b.send(Message::text("hello from b")).await.unwrap();
    assert_eq!(recv_text(&mut a).await, "hello from b");

    // The chat page through nginx (document_root = "../../www").
    let page = raw_http(
        &format!("127.0.0.1:{}", port(8080)),
        "GET /chat.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");

    // status_file: --list shows node 1's live table.
    let out = Command::new(wshd)
        .args(["--list", "--config", "node1.toml"])
        .current_dir(&demo)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("running server (node1.status), live:"),
        "{stdout}"
    );
    for n in ["node1", "node2"] {
        let l = log(n);
        assert!(!l.contains("ERROR"), "{n}:\n{l}");
    }
    drop(nodes);
}
