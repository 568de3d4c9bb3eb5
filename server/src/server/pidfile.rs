//! The pid and addr files. Both are written to a fresh temporary file in the
//! same directory, created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode
//! 0644, then renamed over the target. So a symlink planted at the target
//! path (in a shared directory such as /run or /tmp) is replaced, never
//! followed: wshd cannot be made to overwrite another file, even as root.
//! A reader never sees a partial file either.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` as described in the module docs.
pub fn write_replace(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?
        .to_string_lossy();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            ".{name}.{}.{nanos:x}{attempt}.tmp",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            // Someone else's file (or symlink) has that name: pick another.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes the pid file; the error names the path.
pub fn write_pid(path: &Path) -> anyhow::Result<()> {
    write_replace(path, &format!("{}\n", std::process::id())).map_err(|e| {
        anyhow::anyhow!(
            "cannot write the pid file {}: {e}; check that its directory exists and is writable",
            path.display()
        )
    })
}

/// Removes the pid file at exit, if it still holds our pid (a second
/// instance started since may own it now).
pub fn remove_pid(path: &Path) {
    let ours = format!("{}\n", std::process::id());
    if std::fs::read_to_string(path).is_ok_and(|s| s == ours) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let pid = dir.path().join("wshd.pid");
        std::os::unix::fs::symlink(&victim, &pid).unwrap();
        write_pid(&pid).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!std::fs::symlink_metadata(&pid).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&pid).unwrap(),
            format!("{}\n", std::process::id())
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pid).unwrap().permissions().mode() & 0o777;
        // 0644 less the umask.
        assert_eq!(mode & !0o644, 0, "{mode:o}");
        remove_pid(&pid);
        assert!(!pid.exists());
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
