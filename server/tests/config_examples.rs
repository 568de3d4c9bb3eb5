//! Every file in config/ must parse (TOML against the real schema), so the
//! examples cannot rot.

use std::collections::BTreeSet;
use std::path::Path;

use wshd::cli::Args;
use wshd::config::{ConfigFile, SchemaKey, schema_keys};
use wshd::settings::Settings;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let file = ConfigFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let args = Args {
            config: Some(path.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&args, Some(&file))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            s.handler_dir.ends_with("target/handlers"),
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected the example configs in {}",
        dir.display()
    );
}

#[test]
fn systemd_unit_has_the_essentials() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wshd.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
}

// ------------------------------------------------------------ one source of truth

/// Issue #23: config/wshd.toml says it documents every key, and the README
/// has the reference table; both drifted from the schema. The key list here
/// is not kept by hand: `schema_keys` reads it out of the `Raw*` structs
/// (serde's own list of each table's fields), so a new key fails this test
/// until it is documented in both places.
#[test]
fn every_schema_key_is_in_the_example_config_and_the_readme_table() {
    let keys = schema_keys();
    // The list really came out of the schema: a change in how serde words
    // its error would leave it empty, not let the test pass.
    assert!(
        keys.len() > 70,
        "only {} keys derived: {keys:#?}",
        keys.len()
    );
    for (table, key) in [
        ("", "handler_dir"),
        ("limits", "max_message_size"),
        ("route", "compression"),
        ("listen", "addr"),
        ("cluster", "redis"),
    ] {
        assert!(
            keys.iter().any(|k| k.table == table && k.key == key),
            "{table}.{key} missing from the derived keys: {keys:#?}"
        );
    }
    // A route's [route.limits] and [route.rollout] take exactly the keys of
    // [limits] and [rollout] (the same structs), documented there once.
    for (per_route, server) in [("route.limits", "limits"), ("route.rollout", "rollout")] {
        assert_eq!(
            keys_of(&keys, per_route),
            keys_of(&keys, server),
            "[{per_route}] no longer takes the keys of [{server}]: document it on its own"
        );
    }
    // [route.auth] has keys of its own, documented with the route's.
    let documented =
        |k: &SchemaKey| !k.has_keys && (!k.table.starts_with("route.") || k.table == "route.auth");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join("config/wshd.toml")).unwrap();
    let in_example = example_keys(&example);
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let in_readme = readme_keys(&readme);
    let mut missing = Vec::new();
    for k in keys.iter().filter(|k| documented(k)) {
        let name = (k.table.clone(), k.key.clone());
        if !in_example.contains(&name) {
            missing.push(format!("config/wshd.toml lacks {}", show(&name)));
        }
        if !in_readme.contains(&name) {
            missing.push(format!("README.md's tables lack {}", show(&name)));
        }
    }
    // Each table with keys of its own shows its header (commented out or
    // not) in the example, and has a row in the README.
    for k in keys.iter().filter(|k| k.has_keys && k.table.is_empty()) {
        let name = (String::new(), k.key.clone());
        if !in_example.contains(&name) {
            missing.push(format!("config/wshd.toml lacks the table {}", k.key));
        }
    }
    for t in ["route.limits", "route.rollout", "route.config"] {
        let name = (String::new(), t.to_string());
        if !in_readme.contains(&name) {
            missing.push(format!("README.md's tables lack [{t}]"));
        }
    }
    // And the other way round: the README names no key the schema lacks.
    for name in &in_readme {
        let known = name.0.is_empty() && name.1.starts_with("route.")
            || keys.iter().any(|k| k.table == name.0 && k.key == name.1);
        if !known {
            missing.push(format!(
                "README.md documents {}, which is not in the schema",
                show(name)
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// A header `[a.b]` names table `a.b` (as a top-level name) and key `b`
/// of table `a` (`[route.config]` is the route's key `config`).
fn insert_header(out: &mut BTreeSet<(String, String)>, header: &str) {
    out.insert((String::new(), header.to_string()));
    if let Some((parent, key)) = header.rsplit_once('.') {
        out.insert((parent.to_string(), key.to_string()));
    }
}

fn keys_of(keys: &[SchemaKey], table: &str) -> BTreeSet<String> {
    keys.iter()
        .filter(|k| k.table == table)
        .map(|k| k.key.clone())
        .collect()
}

fn show((table, key): &(String, String)) -> String {
    if table.is_empty() {
        format!("`{key}`")
    } else {
        format!("`[{table}] {key}`")
    }
}

/// The keys config/wshd.toml sets or shows commented out, by table:
/// `key = ...` or `# key = ...` under a `[table]` / `[[table]]` header
/// (itself commented out or not), keys of a `listen = [{ addr = ... }]`
/// list as table `listen`, and every header as a top-level name
/// (`[limits]` → `limits`, `[route.config]` → `route.config`).
fn example_keys(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut table = String::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix('[') {
            let Some(h) = h.split(']').next() else {
                continue;
            };
            let h = h.trim_start_matches('[').trim();
            if !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.".contains(c))
            {
                // `[route.limits]` is the limits of the current [[route]]:
                // the same keys as [limits], documented there. `[route.auth]`
                // is a route's only, and keeps its name.
                table = match h.strip_prefix("route.") {
                    Some(sub) if sub != "auth" => sub.to_string(),
                    _ => h.to_string(),
                };
                insert_header(&mut out, h);
                continue;
            }
        }
        let Some((key, value)) = l.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.insert((table.clone(), key.to_string()));
        if value.trim_start().starts_with("[{") || value.trim_start().starts_with("[ {") {
            for part in value.split(['{', ',']) {
                if let Some((k, _)) = part.split_once('=') {
                    out.insert((key.to_string(), k.trim().to_string()));
                }
            }
        }
    }
    out
}

/// The keys the README's tables name in their first column: `` `[limits]
/// max_message_size` ``, `` `[tls] cert`, `key` `` (later names share the
/// table), `` `[rollout] max_panics` / `max_1011_closes` ``, `` `listen` ``,
/// `` `listen = [{ addr, tls }]` ``, and whole tables such as
/// `` `[route.limits]` `` (as top-level names). Flags (`` `-p` ``,
/// `` `--admin` ``) are skipped.
fn readme_keys(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut in_key_table = false;
    for line in text.lines() {
        let Some(row) = line.strip_prefix('|') else {
            in_key_table = false;
            continue;
        };
        let first = row.split('|').next().unwrap_or("");
        // Only the tables whose first column is `key` (not the signal,
        // metric or exit-status tables).
        if first.trim() == "key" {
            in_key_table = true;
        }
        if !in_key_table {
            continue;
        }
        let mut table = String::new();
        for (i, span) in first.split('`').enumerate() {
            if i % 2 == 0 || span.is_empty() || span.starts_with('-') {
                continue;
            }
            if let Some((list, entries)) = span.split_once("= [{") {
                let list = list.trim().to_string();
                out.insert((String::new(), list.clone()));
                for e in entries.trim_end_matches("}]").split(',') {
                    out.insert((list.clone(), e.trim().to_string()));
                }
                continue;
            }
            let mut rest = span;
            if let Some(h) = span.strip_prefix('[') {
                let h = h.trim_start_matches('[');
                let Some((name, after)) = h.split_once(']') else {
                    continue;
                };
                table = name.to_string();
                rest = after.trim_start_matches(']').trim();
                if rest.is_empty() {
                    insert_header(&mut out, &table);
                    continue;
                }
            }
            if rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert((table.clone(), rest.to_string()));
            }
        }
    }
    out
}
