//! Every file in config/ must parse (TOML against the real schema), so the
//! examples cannot rot.

use std::path::Path;

use wshd::cli::Args;
use wshd::config::ConfigFile;
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
