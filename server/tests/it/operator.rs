//! Issue #23, item 8: what a new operator runs into on the first day. A
//! handler directory without handlers (the README's TLS example used the
//! source folder), `--list` showing a fresh load as if it were live, a
//! handler whose descriptor name differs from its file name, the unit's
//! `ExecStartPre` refusing a server that would start, and typo help for
//! config keys, each tried the way an operator meets it.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A directory laid out like `handlers/` in this repository: sources, no
/// built library.
fn source_like_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("echo/src")).unwrap();
    std::fs::write(dir.path().join("echo/src/lib.rs"), "// source\n").unwrap();
    std::fs::create_dir_all(dir.path().join("c")).unwrap();
    std::fs::write(dir.path().join("c/echo_wsh.c"), "/* source */\n").unwrap();
    dir
}

const NO_HANDLERS: &str = "contains no handler files";

// ------------------------------------------------------------ empty handler dir

/// `wshd -w handlers` (the source folder) started with 0 routes and no
/// word. Now the server warns at startup, `-t` and `--list` warn too (and
/// still exit 0: wshd does start, and picks up handlers added later).
#[tokio::test]
async fn a_handler_directory_without_handlers_is_warned_about() {
    let dir = source_like_dir();
    let d = dir.path().to_str().unwrap();
    for args in [&["-t", "-w", d][..], &["--list", "-w", d][..]] {
        let out = wshd_cmd(args).output().unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {t}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "wshd: warning: the handler directory {d} {NO_HANDLERS}"
            )) && err.contains("target/handlers"),
            "{args:?}: {t}"
        );
    }

    let server = Wshd::start(dir.path(), &[]);
    let log = server.wait_log(NO_HANDLERS).await;
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains(&format!("the handler directory {d}")), "{log}");

    // A directory with handlers says nothing of the kind.
    let good = standard_dir();
    let out = wshd_cmd(&["-t", "-w", good.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success() && !text(&out).contains(NO_HANDLERS),
        "{}",
        text(&out)
    );
}

/// The README's commands pass the staged libraries (target/handlers), never
/// the source folder: `-w handlers` serves nothing.
#[test]
fn the_readme_never_points_w_at_the_source_folder() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for (i, line) in readme.lines().enumerate() {
        assert!(
            !line.contains("-w handlers ") && !line.contains("-w handlers\n"),
            "README.md:{}: {line}",
            i + 1
        );
    }
    assert!(
        readme.contains(
            "wshd -w target/handlers --tls-cert /etc/wshd/cert.pem --tls-key /etc/wshd/key.pem"
        ),
        "the TLS example changed: check that its -w still names staged handlers"
    );
}

// ------------------------------------------------------------ --list

/// Without `status_file`, `--list` can only load the handlers itself: it
/// says that its table is not live, why, and how to get the live one.
#[test]
fn list_without_a_live_table_says_not_live() {
    let handlers = standard_dir();
    let h = handlers.path().to_str().unwrap();
    let out = wshd_cmd(&["--list", "-w", h]).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or("");
    assert!(
        first.starts_with("not live: no status_file is set")
            && first.contains("a start with this configuration would serve")
            && first.contains("set status_file"),
        "{t}"
    );
    assert!(stdout.contains("/echo"), "{t}");

    // status_file set, but no server wrote it: still not live, and why.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "status_file = \"status\"\n");
    let out = wshd_cmd(&["--list", "--config", cfg.to_str().unwrap(), "-w", h])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("no running server's table in"), "{t}");
    assert!(
        t.contains("not live: a start with this configuration would serve (loaded afresh"),
        "{t}"
    );
    assert!(!t.contains(", live:"), "{t}");
}

/// With `status_file` and a running server, the live table comes first and
/// is labelled live; the fresh load after it is labelled not live.
#[tokio::test]
async fn list_with_a_running_server_shows_the_live_table_first() {
    let handlers = standard_dir();
    let tmp = tempfile::tempdir().unwrap();
    let status = tmp.path().join("status");
    let body = format!("status_file = \"{}\"\n", status.display());
    let server = Wshd::with_config(handlers.path(), &body, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !status.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let cfg = write_config(tmp.path(), &body);
    let out = wshd_cmd(&[
        "--list",
        "--config",
        cfg.to_str().unwrap(),
        "-w",
        handlers.path().to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let live = stdout.find(", live:").unwrap_or_else(|| panic!("{t}"));
    let not_live = stdout.find("not live: ").unwrap_or_else(|| panic!("{t}"));
    assert!(live < not_live, "{t}");
    assert!(
        stdout.contains(&format!("# wshd pid {}", server.child.id())),
        "{t}"
    );
}

// ------------------------------------------------------------ name mismatch

/// The echo library, installed as `libshout_wsh.so`, serves `/shout` but
/// says `echo` in its descriptor (and so in `handler=` log fields and
/// `--list`). The server and `-t` name both.
#[tokio::test]
async fn a_descriptor_name_that_differs_from_the_file_name_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let file = install(dir.path(), "echo", "libshout_wsh.so");
    install(dir.path(), "chat", "libchat_wsh.so");
    let needle = format!(
        "handler file {} is named `shout` by its file name, but its descriptor says `echo`",
        file.display()
    );

    let out = wshd_cmd(&["-t", "-w", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("wshd: warning: {needle}")), "{t}");
    assert!(err.contains("rename the file to echo_wsh.so"), "{t}");
    assert_eq!(err.matches("descriptor says").count(), 1, "{t}");

    let server = Wshd::start(dir.path(), &[]);
    let log = server.wait_log(&needle).await;
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(&needle)),
        "{log}"
    );
    assert!(!log.contains("descriptor says `chat`"), "{log}");
    // It is served under the file name, as before.
    let mut ws = connect(&server.url("/shout")).await;
    assert_eq!(echo_once(&mut ws, "hi").await, "hi");
}

// ------------------------------------------------------------ ExecStartPre

/// `wshd -t` exits 1 for a handler file that would not be served, although
/// the server starts without it; `-t --fatal-only` (the unit's
/// ExecStartPre) exits 0 then, with the problem as a warning, and still
/// fails when the server would not start.
#[test]
fn fatal_only_fails_only_when_the_server_would_not_start() {
    let handlers = standard_dir();
    let h = handlers.path().to_str().unwrap();
    std::fs::write(handlers.path().join("junk_wsh.so"), b"junk").unwrap();

    let out = wshd_cmd(&["-t", "-w", h]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    let out = wshd_cmd(&["-t", "--fatal-only", "-w", h]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("wshd: warning: ") && t.contains("junk_wsh.so"),
        "{t}"
    );
    assert!(
        t.contains(
            "configuration test successful (--fatal-only): wshd would start, serving 5 route(s)"
        ),
        "{t}"
    );

    // And the server does start without it.
    let server = Wshd::try_start(handlers.path(), &[]);
    assert!(server.is_ok(), "{}", server.err().unwrap_or_default());
    drop(server);

    // A config error: 2, with or without --fatal-only.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "[[route]]\npath = \"/x\"\nhandler = \"nope\"\n");
    let c = cfg.to_str().unwrap();
    let out = wshd_cmd(&["-t", "--fatal-only", "--config", c, "-w", h])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // A TLS pair that cannot be served stops the server: not a warning.
    std::fs::write(tmp.path().join("cert.pem"), "not a certificate\n").unwrap();
    std::fs::write(tmp.path().join("key.pem"), "not a key\n").unwrap();
    let out = wshd_cmd(&["-t", "--fatal-only", "-w", h])
        .arg("--tls-cert")
        .arg(tmp.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(tmp.path().join("key.pem"))
        .output()
        .unwrap();
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");

    // Only meaningful with -t.
    let out = wshd_cmd(&["--fatal-only", "-w", h]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// The installed unit's ExecStartPre, run as systemd runs it (its own
/// command line, against the installed config): a bad handler file next
/// to a good one does not stop the service; a config error does.
#[test]
fn the_installed_units_exec_start_pre_passes_with_one_bad_handler() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_wshd"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/wshd.service")).unwrap();
    let pre = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .unwrap_or_else(|| panic!("no ExecStartPre in\n{unit}"));
    assert_eq!(
        pre,
        "/usr/local/bin/wshd -t --fatal-only --config /etc/wshd/wshd.toml"
    );
    let handlers = root.join("var/lib/wshd/handlers");
    install(&handlers, "echo", "libecho_wsh.so");
    std::fs::write(handlers.join("broken_wsh.so"), b"not a library").unwrap();

    // The command line as systemd would run it, its absolute paths moved
    // into the root; the installed config names /var/lib/wshd/handlers, so
    // -w points it at the root's copy.
    let run = |unit_line: &str| {
        let mut words = unit_line.split_whitespace().map(|w| {
            if w.starts_with('/') {
                root.join(w.trim_start_matches('/')).display().to_string()
            } else {
                w.to_string()
            }
        });
        let bin = words.next().unwrap();
        assert!(Path::new(&bin).is_file(), "{bin}");
        Command::new(bin)
            .args(words)
            .arg("-w")
            .arg(&handlers)
            .env_remove("RUST_LOG")
            .env_remove("WSHD_DEFAULT_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(pre);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "ExecStartPre failed:\n{t}");
    assert!(t.contains("broken_wsh.so") && t.contains("warning"), "{t}");
    // Plain -t still reports it as a failure, for an operator's check.
    let out = run(&pre.replace(" --fatal-only", ""));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // A broken config: the unit does not start (and does not restart, status 2).
    let cfg = root.join("etc/wshd/wshd.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("handler_dri = \"/srv\"\n{good}")).unwrap();
    let out = run(pre);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert_eq!(unit_value(&unit, "RestartPreventExitStatus"), "2");

    // systemd accepts the unit with the new flag (install.rs checks the
    // rest of it the same way).
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        std::fs::write(&cfg, &good).unwrap();
        assert_unit_verifies(
            &unit,
            "/usr/local/bin/wshd",
            &root.join("usr/local/bin/wshd"),
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is needed in CI"
        );
    }
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit:\n{unit}"))
}

// ------------------------------------------------------------ typo help

/// A mistyped key, as `wshd -t` shows it: file, line, key and the fix.
#[test]
fn a_mistyped_key_gets_a_suggestion_from_t() {
    let handlers = standard_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_mesage_size = \"64KiB\"\n",
    );
    let c = cfg.to_str().unwrap();
    let out = wshd_cmd(&["-t", "--config", c, "-w", handlers.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!(
            "wshd: {c}:3:1: key `max_mesage_size`: unknown field `max_mesage_size`"
        )) && t.contains("did you mean `max_message_size`?"),
        "{t}"
    );
}
