//! Keeps the C example handler (`handlers/c/echo_wsh.c`) honest against the
//! header: every build variant compiles with `-Wall -Wextra -Werror`, the
//! normal build also as strict C99, and each exports exactly the symbol it
//! should. Needs `gcc` and `nm` (fails loudly without them).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Compiles one variant and returns the names of its exported symbols.
fn build(out_name: &str, extra: &[&str]) -> Vec<String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_handler");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(out_name);
    let repo = repo();
    let status = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(repo.join("handler-api/include"))
        .args(extra)
        .arg(repo.join("handlers/c/echo_wsh.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("this test needs gcc: {e}"));
    assert!(
        status.status.success(),
        "gcc {extra:?} failed:\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("this test needs nm (binutils): {e}"));
    assert!(nm.status.success());
    String::from_utf8(nm.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

#[test]
fn c_echo_builds_cleanly_and_exports_only_the_entry_point() {
    assert_eq!(build("c_echo_wsh.so", &[]), ["wshd_entry_v1"]);
    assert_eq!(
        build("c_echo_c99_wsh.so", &["-std=c99", "-pedantic"]),
        ["wshd_entry_v1"]
    );
    assert_eq!(
        build(
            "c_echo_v2_wsh.so",
            &["-DECHO_PREFIX=\"v2:\"", "-DECHO_VERSION=\"0.2.0\""]
        ),
        ["wshd_entry_v1"]
    );
}

#[test]
fn broken_variants_build_for_the_loader_tests() {
    for flag in [
        "-DWSHD_BREAK_MAGIC",
        "-DWSHD_BREAK_MAJOR",
        "-DWSHD_BREAK_SIZE",
        "-DWSHD_BREAK_MISSING",
    ] {
        let name = format!(
            "broken{}_wsh.so",
            flag.to_lowercase().trim_start_matches("-dwshd_break")
        );
        assert_eq!(
            build(&name, &[flag, "-std=c99", "-pedantic"]),
            ["wshd_entry_v1"],
            "{flag}"
        );
    }
    assert_eq!(
        build("no_entry_wsh.so", &["-DWSHD_NO_ENTRY"]),
        ["c_echo_descriptor"]
    );
}
