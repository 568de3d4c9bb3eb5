//! Config values that used to pass `wshd -t` and then misbehave at run time
//! (issue #12, section 4): each is now a `-t` failure naming file, line and
//! key, so a bad deploy is caught before it replaces a working server.

use std::process::Command;

use crate::common::{standard_dir, write_config};

/// Runs `wshd -t` on `toml` and returns (exit code, stderr).
fn check(toml: &str) -> (Option<i32>, String) {
    let handlers = standard_dir();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), toml);
    let out = Command::new(env!("CARGO_BIN_EXE_wshd"))
        .arg("-t")
        .arg("-w")
        .arg(handlers.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn values_that_used_to_pass_the_check_now_fail_it_with_file_line_and_key() {
    let cases: &[(&str, &str, &str)] = &[
        // Logged nothing at all, errors included.
        ("log_level = \"loud\"\n", "wshd.toml:1:", "key `log_level`"),
        // Passed -t, then panicked at startup.
        (
            "[limits]\nmax_connections = 9223372036854775807\n",
            "wshd.toml:2:",
            "key `max_connections`",
        ),
        // A zero timeout fires at once.
        (
            "[limits]\nwrite_timeout = \"0s\"\n",
            "wshd.toml:2:",
            "key `write_timeout`",
        ),
        // Accepted, then silently ignored.
        (
            "[[route]]\npath = \"/e\"\nhandler = \"echo\"\n[route.limits]\nmax_connections = 3\n",
            "wshd.toml:5:",
            "only allowed in [limits]",
        ),
        (
            "[[route]]\npath = \"/e\"\nhandler = \"echo\"\n[route.limits]\nhandshake_timeout = \"1s\"\n",
            "wshd.toml:5:",
            "only allowed in [limits]",
        ),
        // Allocated for every connection's whole life.
        (
            "[limits]\nread_buffer_size = \"512MiB\"\n",
            "wshd.toml:2:",
            "key `read_buffer_size`",
        ),
    ];
    for (toml, at, says) in cases {
        let (code, stderr) = check(toml);
        assert_eq!(code, Some(2), "{toml:?} should fail -t:\n{stderr}");
        assert!(
            stderr.contains(at) && stderr.contains(says),
            "{toml:?}: expected {at:?} and {says:?} in:\n{stderr}"
        );
    }
    let (code, stderr) = check("log_level = \"info,handler=debug\"\n");
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_bad_log_level_flag_is_refused() {
    let handlers = standard_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(["-t", "--log-level", "loud", "-w"])
        .arg(handlers.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--log-level") && stderr.contains("`loud` is not a log level"),
        "{stderr}"
    );
}
