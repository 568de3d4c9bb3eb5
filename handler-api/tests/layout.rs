//! Checks the Rust mirror (`src/abi.rs`) against the C header with a real C
//! compiler: the size and alignment of every struct, the offset of every
//! field, and the value of every constant.
//!
//! The struct fields and constants are read from the header itself, so a
//! field or constant added to the header without a Rust counterpart here
//! fails the test. Needs `gcc` (the test fails, loudly, without it); also
//! compiles the header as C++ when `g++` is installed.

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use wshd_handler_api::abi::*;

const HEADER: &str = include_str!("../include/wshd_handler.h");

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `/* */` and `//` comments.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
            out.push(' ');
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
            out.push('\n');
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// `(struct name, field names)` for every `typedef struct NAME { ... } NAME;`.
fn header_structs() -> Vec<(String, Vec<String>)> {
    let src = strip_comments(HEADER);
    let mut structs = Vec::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find("typedef struct ") {
        rest = &rest[at + "typedef struct ".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after_name = rest[name.len()..].trim_start();
        // Opaque typedefs (`typedef struct wshd_handshake wshd_handshake;`) have no body.
        let Some(body) = after_name.strip_prefix('{') else {
            continue;
        };
        let body = &body[..body.find('}').expect("closing brace")];
        let fields = body
            .split(';')
            .map(str::trim)
            .filter(|decl| !decl.is_empty())
            .map(|decl| {
                if let Some(fp) = decl.find("(*") {
                    // A function pointer: `int32_t (*name)(...)`.
                    let tail = &decl[fp + 2..];
                    tail[..tail.find(')').unwrap()].trim().to_owned()
                } else {
                    let ident: String = decl
                        .chars()
                        .rev()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    ident.chars().rev().collect()
                }
            })
            .collect();
        structs.push((name, fields));
    }
    structs
}

/// Every `WSHD_*` name given a numeric value by a `#define` or an `enum`.
fn header_constants() -> Vec<String> {
    let src = strip_comments(HEADER);
    let mut names = Vec::new();
    for line in src.lines() {
        if let Some(def) = line.trim().strip_prefix("#define ") {
            let name = def.split_whitespace().next().unwrap();
            if name.starts_with("WSHD_") && name != "WSHD_HANDLER_H" && name != "WSHD_ENTRY_SYMBOL"
            {
                names.push(name.to_owned());
            }
        }
    }
    let mut rest = src.as_str();
    while let Some(at) = rest.find("enum {") {
        rest = &rest[at + "enum {".len()..];
        let body = &rest[..rest.find('}').unwrap()];
        for item in body.split(',') {
            let name = item.split('=').next().unwrap().trim();
            if !name.is_empty() {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// Compiles and runs a C program that prints `key value` lines.
fn c_facts(structs: &[(String, Vec<String>)], constants: &[String]) -> BTreeMap<String, String> {
    let mut prog = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"wshd_handler.h\"\n\
         #define S(T) printf(\"size %s %zu\\nalign %s %zu\\n\", #T, sizeof(T), #T, _Alignof(T))\n\
         #define O(T, f) printf(\"offset %s.%s %zu\\n\", #T, #f, offsetof(T, f))\n\
         #define K(c) printf(\"const %s %lld\\n\", #c, (long long)(c))\n\
         int main(void) {\n",
    );
    for (name, fields) in structs {
        prog += &format!("  S({name});\n");
        for f in fields {
            prog += &format!("  O({name}, {f});\n");
        }
    }
    for c in constants {
        prog += &format!("  K({c});\n");
    }
    prog += "  printf(\"symbol WSHD_ENTRY_SYMBOL %s\\n\", WSHD_ENTRY_SYMBOL);\n  return 0;\n}\n";

    let dir = work_dir("layout");
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, prog).unwrap();
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(include_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs gcc to compile the C header, and running it failed: {e}")
        });
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (kind, rest) = l.split_once(' ').unwrap();
            let (name, value) = rest.split_once(' ').unwrap();
            (format!("{kind} {name}"), value.to_owned())
        })
        .collect()
}

macro_rules! layout {
    ($facts:ident; $($ty:ident { $($field:ident),* $(,)? })*) => {
        $(
            $facts.insert(concat!("size ", stringify!($ty)).into(), size_of::<$ty>().to_string());
            $facts.insert(concat!("align ", stringify!($ty)).into(), align_of::<$ty>().to_string());
            $(
                $facts.insert(
                    concat!("offset ", stringify!($ty), ".", stringify!($field)).into(),
                    offset_of!($ty, $field).to_string(),
                );
            )*
        )*
    };
}

macro_rules! constants {
    ($facts:ident; $($name:ident),* $(,)?) => {
        $( $facts.insert(concat!("const ", stringify!($name)).into(), ($name as i64).to_string()); )*
    };
}

/// The same facts, from the Rust mirror.
fn rust_facts() -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    layout! { facts;
        wshd_str { ptr, len }
        wshd_header { name, value }
        wshd_handshake_req {
            struct_size, reserved, conn, path, query, origin, remote_addr,
            headers, n_headers, subprotocols, n_subprotocols,
        }
        wshd_host_api {
            struct_size, abi_major, abi_minor, host_ctx, send, ping, close, log,
            hs_select_subprotocol, hs_add_header, hs_reject, log_level, broadcast,
            subscribe, unsubscribe, is_subscribed, publish, subscribers, set_timer,
            cancel_timer, subscribers_cluster,
        }
        wshd_descriptor {
            magic, abi_major, abi_minor, struct_size, flags, name, version, build_info,
            init, on_handshake, on_open, on_message, on_close, destroy, on_timer,
            on_export, on_import,
        }
        wshd_export_out { host_buf, write, max_len }
    }
    constants! { facts;
        WSHD_MAGIC, WSHD_ABI_MAJOR, WSHD_ABI_MINOR,
        WSHD_OK, WSHD_ERR_CLOSED, WSHD_ERR_BACKPRESSURE, WSHD_ERR_INVALID, WSHD_ERR_STATE,
        WSHD_ERR_REVOKED, WSHD_ERR_UNSUPPORTED, WSHD_ERR_LIMIT, WSHD_ERR_PANIC, WSHD_ERR_HANDLER,
        WSHD_MSG_TEXT, WSHD_MSG_BINARY, WSHD_SEND_NO_COMPRESS,
        WSHD_LOG_ERROR, WSHD_LOG_WARN, WSHD_LOG_INFO, WSHD_LOG_DEBUG, WSHD_LOG_TRACE,
        WSHD_F_MAY_BLOCK, WSHD_F_PANIC_UNWIND, WSHD_F_RUST_SDK,
        WSHD_HOST_API_SIZE_1_1, WSHD_HOST_API_SIZE_1_2,
        WSHD_DESCRIPTOR_SIZE_1_0, WSHD_DESCRIPTOR_SIZE_1_2, WSHD_DESCRIPTOR_SIZE_HANDOVER,
    }
    facts.insert(
        "symbol WSHD_ENTRY_SYMBOL".into(),
        WSHD_ENTRY_NAME.to_owned(),
    );
    facts
}

#[test]
fn header_parser_sees_every_struct_and_constant() {
    let structs = header_structs();
    let names: Vec<&str> = structs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "wshd_str",
            "wshd_header",
            "wshd_handshake_req",
            "wshd_host_api",
            "wshd_export_out",
            "wshd_descriptor"
        ]
    );
    let constants = header_constants();
    assert!(constants.len() >= 22, "{constants:?}");
    assert!(constants.contains(&"WSHD_ERR_PANIC".to_owned()));
    assert!(constants.contains(&"WSHD_F_RUST_SDK".to_owned()));
}

#[test]
fn rust_mirror_matches_the_c_header() {
    let c = c_facts(&header_structs(), &header_constants());
    let rust = rust_facts();
    let mut problems = Vec::new();
    for (key, c_value) in &c {
        match rust.get(key) {
            None => problems.push(format!(
                "{key}: in the header ({c_value}) but not checked against abi.rs"
            )),
            Some(r) if r != c_value => {
                problems.push(format!("{key}: C says {c_value}, Rust says {r}"))
            }
            Some(_) => {}
        }
    }
    for key in rust.keys().filter(|k| !c.contains_key(*k)) {
        problems.push(format!("{key}: in abi.rs but not in the header"));
    }
    assert!(
        problems.is_empty(),
        "ABI mismatch:\n  {}",
        problems.join("\n  ")
    );
    assert!(c.len() > 60, "suspiciously few facts: {}", c.len());
    assert_eq!(WSHD_ENTRY_SYMBOL, b"wshd_entry_v1\0");
}

#[test]
fn header_compiles_as_strict_c99_and_as_cpp() {
    let dir = work_dir("layout");
    let src = dir.join("strict.c");
    std::fs::write(&src, "#include \"wshd_handler.h\"\nint main(void) {\n  const wshd_descriptor *(*entry)(void) = wshd_entry_v1;\n  (void)entry;\n  return 0;\n}\n").unwrap();
    let out = Command::new("gcc")
        .args([
            "-std=c99",
            "-pedantic",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(include_dir())
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("this test needs gcc: {e}"));
    assert!(
        out.status.success(),
        "gcc -std=c99:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("g++ not found: skipping the C++ check of the header");
        return;
    }
    let src = dir.join("header.cpp");
    std::fs::write(
        &src,
        "#include \"wshd_handler.h\"\nstatic_assert(sizeof(wshd_descriptor) > 0, \"\");\nint main() { return 0; }\n",
    )
    .unwrap();
    let out = Command::new("g++")
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(include_dir())
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "g++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
