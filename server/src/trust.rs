//! Who may put code into the process: a check like OpenSSH's `StrictModes`.
//!
//! A handler file's constructors run inside `dlopen`, before any check of its
//! descriptor, so whoever can write a handler file, or replace it, or replace
//! a directory on its path, runs code as wshd. The rule:
//!
//! * the handler file, the directory it sits in, every directory between it
//!   and the handler directory, the handler directory and each of its parents
//!   up to `/` (both as written and after resolving symlinks) must be owned
//!   by root or by wshd's effective uid, and must be neither group- nor
//!   world-writable;
//! * except that a directory writable by others **with the sticky bit**
//!   (like `/tmp`, mode 1777) is accepted: in a sticky directory nobody can
//!   rename, remove or replace an entry they do not own, so its entries are
//!   as safe as the checks on the entries themselves, and each entry below it
//!   on the path is checked in turn. A stranger can only create names that do
//!   not exist yet, and anything they create fails the owner check.
//!
//! The file itself is checked on the descriptor whose bytes are then hashed
//! and loaded ([`check_file`] takes the opened `File`), so there is no window
//! between a check of the path and the open. Directories are checked by path:
//! once every directory from `/` down is trusted, nobody else can change what
//! the path resolves to.
//!
//! Opt-out: `allow_insecure_handler_dir = true` or
//! `--allow-insecure-handler-dir`; every load of a file that fails the check
//! then logs a warning instead of being refused.
#![allow(unsafe_code)] // geteuid and getpwuid_r only

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const S_IWGRP: u32 = 0o020;
const S_IWOTH: u32 = 0o002;
const S_ISVTX: u32 = 0o1000;

/// wshd's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a file or directory is not trusted: everything the operator needs to
/// see it and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    pub path: PathBuf,
    pub is_dir: bool,
    pub uid: u32,
    pub mode: u32,
    /// What is wrong, e.g. "owned by uid 65534 (nobody)".
    pub problems: Vec<String>,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.is_dir {
            "handler directory"
        } else {
            "handler file"
        };
        write!(
            f,
            "untrusted {what} {}: owner {}, mode {:04o}: {}. Anyone who can write it can run code inside wshd. Fix:",
            self.path.display(),
            user_desc(self.uid),
            self.mode & 0o7777,
            self.problems.join(" and ")
        )?;
        let me = euid();
        if self.uid != 0 && self.uid != me {
            write!(
                f,
                " `chown {} {}`;",
                user_name(me).unwrap_or_else(|| me.to_string()),
                self.path.display()
            )?;
        }
        if self.mode & (S_IWGRP | S_IWOTH) != 0 {
            write!(f, " `chmod go-w {}`;", self.path.display())?;
        }
        write!(
            f,
            " or, knowing the risk, set allow_insecure_handler_dir = true (--allow-insecure-handler-dir)"
        )
    }
}

/// Checks owner and mode from a stat result.
fn judge(path: &Path, m: &std::fs::Metadata, me: u32) -> Result<(), Untrusted> {
    let mode = m.mode();
    let mut problems = Vec::new();
    if m.uid() != 0 && m.uid() != me {
        problems.push(format!(
            "not owned by root or by wshd's user, {}",
            user_desc(me)
        ));
    }
    let writable = mode & (S_IWGRP | S_IWOTH);
    let sticky_dir = m.is_dir() && mode & S_ISVTX != 0;
    if writable != 0 && !sticky_dir {
        problems.push(
            match (mode & S_IWGRP != 0, mode & S_IWOTH != 0) {
                (true, true) => "writable by group and others",
                (true, false) => "writable by its group",
                _ => "writable by others",
            }
            .to_string(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Untrusted {
            path: path.to_owned(),
            is_dir: m.is_dir(),
            uid: m.uid(),
            mode,
            problems,
        })
    }
}

/// Checks the opened handler file (its `fstat`).
pub fn check_file(path: &Path, file: &std::fs::File) -> Result<(), Untrusted> {
    let m = file.metadata().map_err(|e| Untrusted {
        path: path.to_owned(),
        is_dir: false,
        uid: u32::MAX,
        mode: 0,
        problems: vec![format!("cannot fstat it: {e}")],
    })?;
    judge(path, &m, euid())
}

/// Checks directories, remembering results for one reconcile pass: every
/// handler under one directory shares its parents.
#[derive(Debug, Default)]
pub struct DirCache {
    seen: HashMap<PathBuf, Result<(), Untrusted>>,
}

impl DirCache {
    /// Checks every directory on the way to `file`: its parents as written
    /// (made absolute) and after resolving symlinks, up to `/`. Returns the
    /// first untrusted one, closest to `/` first.
    pub fn check_dirs_of(&mut self, file: &Path) -> Result<(), Untrusted> {
        let abs = if file.is_absolute() {
            file.to_owned()
        } else {
            std::env::current_dir()
                .map(|d| d.join(file))
                .unwrap_or_else(|_| file.to_owned())
        };
        let mut dirs: Vec<PathBuf> = abs.ancestors().skip(1).map(Path::to_owned).collect();
        if let Ok(real) = abs.canonicalize() {
            dirs.extend(real.ancestors().skip(1).map(Path::to_owned));
        }
        // Closest to / first, so the message names the outermost problem.
        dirs.sort_by_key(|d| d.components().count());
        dirs.dedup();
        let me = euid();
        for d in dirs {
            if d.as_os_str().is_empty() {
                continue;
            }
            let r = self
                .seen
                .entry(d.clone())
                .or_insert_with(|| match std::fs::metadata(&d) {
                    Ok(m) => judge(&d, &m, me),
                    Err(e) => Err(Untrusted {
                        path: d.clone(),
                        is_dir: true,
                        uid: u32::MAX,
                        mode: 0,
                        problems: vec![format!("cannot stat it: {e}")],
                    }),
                });
            r.clone()?;
        }
        Ok(())
    }
}

/// "uid 65534 (nobody)", or "uid 1234" where the name is unknown.
fn user_desc(uid: u32) -> String {
    match user_name(uid) {
        Some(n) => format!("uid {uid} ({n})"),
        None => format!("uid {uid}"),
    }
}

/// The user name for `uid`, through NSS (getpwuid_r).
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid out-value for getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer's length is
    // passed; on success `out` points to `pw`, whose strings live in `buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside `buf`, still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x_wsh.so");
        std::fs::write(&f, b"x").unwrap();
        chmod(&f, 0o644);
        let open = || std::fs::File::open(&f).unwrap();
        assert_eq!(check_file(&f, &open()), Ok(()));
        chmod(&f, 0o664);
        let e = check_file(&f, &open()).unwrap_err();
        assert!(e.to_string().contains("mode 0664"), "{e}");
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        chmod(&f, 0o644);

        let mut cache = DirCache::default();
        assert_eq!(cache.check_dirs_of(&f), Ok(()));
        // A world-writable directory with the sticky bit, like /tmp, passes;
        // without it, it does not.
        let sub = tmp.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let g = sub.join("y_wsh.so");
        std::fs::write(&g, b"y").unwrap();
        chmod(&sub, 0o1777);
        assert_eq!(DirCache::default().check_dirs_of(&g), Ok(()));
        chmod(&sub, 0o777);
        let e = DirCache::default().check_dirs_of(&g).unwrap_err();
        assert_eq!(e.path, sub);
        assert!(
            e.to_string().contains("writable by group and others"),
            "{e}"
        );
    }
}
