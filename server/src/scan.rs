//! Finds handler files under the handler directory, pywebsocket style:
//! `echo_wsh.so` (or cargo's `libecho_wsh.so`) serves `/echo`, and
//! `chat/room_wsh.so` serves `/chat/room`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A handler file found by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The handler's name: its path under the root without `lib` and
    /// `_wsh.so`, e.g. `chat/room`. The route is `/` + name.
    pub name: String,
    /// The file as found (possibly a symlink).
    pub path: PathBuf,
}

/// What a scan produced. Problems do not stop the other handlers.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: BTreeMap<String, Found>,
    /// Names claimed by more than one file; none of them is served.
    pub conflicts: Vec<(String, Vec<PathBuf>)>,
    /// Files skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Scan {
    /// Not one handler file under the root: not even a refused or
    /// conflicting one.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty() && self.conflicts.is_empty() && self.skipped.is_empty()
    }
}

/// The warning for a handler directory without a single handler file
/// (typically a source folder given instead of the staged libraries): the
/// server starts, and serves no route until one is added.
pub fn nothing_found(root: &Path) -> String {
    format!(
        "the handler directory {} contains no handler files (NAME_wsh.so or libNAME_wsh.so, \
         searched recursively): no WebSocket route is served until one is added there. Is it \
         the directory the built handlers are copied to (./scripts/run.sh stages them in \
         target/handlers, the installed service reads /var/lib/wshd/handlers), rather than \
         their sources?",
        root.display()
    )
}

const MAX_DEPTH: usize = 16;
const MAX_ENTRIES: usize = 100_000;

/// The handler name a file name stands for, if it is a handler file.
pub fn handler_stem(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix("_wsh.so")?;
    Some(
        stem.strip_prefix("lib")
            .filter(|s| !s.is_empty())
            .unwrap_or(stem),
    )
}

/// Scans `root` recursively. Hidden entries (a leading `.`, such as the
/// temporary file of an atomic-rename deploy) are ignored, symlinked
/// directories are not followed, and a symlinked file whose target leaves
/// the root is refused unless `allow_outside`.
pub fn scan(root: &Path, allow_outside: bool) -> std::io::Result<Scan> {
    let root_real = root.canonicalize()?;
    let mut scan = Scan::default();
    let mut claims: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    let mut entries = 0usize;
    while let Some((dir, prefix, depth)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if depth > 0 => {
                scan.skipped
                    .push((dir, format!("cannot read directory: {e}")));
                continue;
            }
            Err(e) => return Err(e),
        };
        for entry in rd.flatten() {
            entries += 1;
            if entries > MAX_ENTRIES {
                scan.skipped.push((
                    dir.clone(),
                    format!("more than {MAX_ENTRIES} entries; stopped scanning"),
                ));
                break;
            }
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    stack.push((path, format!("{prefix}{file_name}/"), depth + 1));
                }
                continue;
            }
            let Some(stem) = handler_stem(file_name) else {
                continue;
            };
            if ft.is_symlink() {
                match path.canonicalize() {
                    // Path::starts_with compares whole components, so
                    // /srv/handlers-evil is not inside /srv/handlers.
                    Ok(real) if real.starts_with(&root_real) || allow_outside => {}
                    Ok(real) => {
                        scan.skipped.push((
                            path,
                            format!(
                                "symlink points outside the handler directory (to {}); pass --allow-handlers-outside-root-dir to allow it",
                                real.display()
                            ),
                        ));
                        continue;
                    }
                    Err(e) => {
                        scan.skipped.push((path, format!("broken symlink: {e}")));
                        continue;
                    }
                }
            }
            claims
                .entry(format!("{prefix}{stem}"))
                .or_default()
                .push(path);
        }
    }
    for (name, mut paths) in claims {
        if paths.len() > 1 {
            paths.sort();
            scan.conflicts.push((name, paths));
        } else {
            let path = paths.pop().expect("one path");
            scan.found.insert(name.clone(), Found { name, path });
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(handler_stem("echo_wsh.so"), Some("echo"));
        assert_eq!(handler_stem("libecho_wsh.so"), Some("echo"));
        assert_eq!(handler_stem("lib_wsh.so"), Some("lib"));
        assert_eq!(handler_stem("echo.so"), None);
        assert_eq!(handler_stem("echo_wsh.so.tmp"), None);
    }

    #[test]
    fn scan_tree_conflicts_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("handlers");
        std::fs::create_dir_all(root.join("chat")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        for f in [
            "echo_wsh.so",
            "chat/room_wsh.so",
            "dup_wsh.so",
            "libdup_wsh.so",
            ".x_wsh.so",
            "notes.txt",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        std::fs::write(root.join(".hidden/h_wsh.so"), b"x").unwrap();
        // A sibling directory whose name has the root's name as a prefix.
        let evil = tmp.path().join("handlers-evil");
        std::fs::create_dir_all(&evil).unwrap();
        std::fs::write(evil.join("x_wsh.so"), b"x").unwrap();
        std::os::unix::fs::symlink(evil.join("x_wsh.so"), root.join("evil_wsh.so")).unwrap();
        std::os::unix::fs::symlink(root.join("echo_wsh.so"), root.join("alias_wsh.so")).unwrap();

        let s = scan(&root, false).unwrap();
        let names: Vec<_> = s.found.keys().cloned().collect();
        assert_eq!(names, ["alias", "chat/room", "echo"]);
        assert_eq!(s.conflicts.len(), 1);
        assert_eq!(s.conflicts[0].0, "dup");
        assert!(
            s.skipped
                .iter()
                .any(|(p, why)| p.ends_with("evil_wsh.so") && why.contains("outside"))
        );

        let s = scan(&root, true).unwrap();
        assert!(s.found.contains_key("evil"));
    }
}
