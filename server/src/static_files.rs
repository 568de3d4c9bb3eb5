//! The document root (`-d`): static files on the same port, served by
//! tower-http's `ServeDir` (GET and HEAD, content types, ranges,
//! `index.html` for directories).
//!
//! `ServeDir` already refuses `..` and other non-normal path components,
//! after percent-decoding, so an encoded `%2F..%2F` cannot climb out either.
//! It does follow symlinks, so before serving we resolve the requested path
//! and refuse anything whose real location is outside the root.
//!
//! Dotfiles and dot-directories (`/.env`, `/.git/config`, `/a/.hidden/x`)
//! get 404: they are where secrets and repository metadata live, and a
//! document root that is a checkout would otherwise publish them. The one
//! exception is a leading `/.well-known/` (RFC 8615), which exists to be
//! public; dot-names below it are still refused.
//!
//! A name too long for the file system (ENAMETOOLONG) is a 404 like any
//! missing file, not a 500 and a warning per request.

use std::path::{Component, Path, PathBuf};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower_http::services::ServeDir;

use crate::http::Body;

/// A served document root.
#[derive(Debug, Clone)]
pub struct StaticFiles {
    root: PathBuf,
    dir: ServeDir,
}

impl StaticFiles {
    pub fn new(root: &Path) -> std::io::Result<StaticFiles> {
        let root = root.canonicalize().map_err(|e| {
            std::io::Error::new(e.kind(), format!("document root {}: {e}", root.display()))
        })?;
        Ok(StaticFiles {
            dir: ServeDir::new(&root),
            root,
        })
    }

    /// Serves `req` from the root, or answers 404/405.
    pub async fn serve(&self, req: Request<Incoming>) -> http::Response<Body> {
        let path = req.uri().path().to_owned();
        if hidden(&path) || !self.contained(&path) {
            return not_found();
        }
        let mut dir = self.dir.clone();
        match dir.try_call(req).await {
            Ok(resp) => resp.map(|b| b.map_err(std::io::Error::other).boxed_unsync()),
            // ENAMETOOLONG: no such file can exist. ServeDir only maps
            // NotFound and PermissionDenied to 404 itself.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidFilename => not_found(),
            Err(e) => {
                tracing::warn!(path = %crate::logsafe::esc(&path), "static file error: {e}");
                let mut r = not_found();
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        }
    }

    /// Whether the real path of the requested file (after symlinks) is inside
    /// the root. Missing files pass: ServeDir answers 404 for them.
    fn contained(&self, uri_path: &str) -> bool {
        let decoded = match percent_encoding::percent_decode_str(uri_path.trim_start_matches('/'))
            .decode_utf8()
        {
            Ok(d) => d,
            Err(_) => return false,
        };
        let mut path = self.root.clone();
        for c in Path::new(&*decoded).components() {
            match c {
                Component::Normal(n) => path.push(n),
                Component::CurDir => {}
                _ => return false,
            }
        }
        match path.canonicalize() {
            Ok(real) => real.starts_with(&self.root),
            Err(_) => true,
        }
    }
}

/// Whether the request names a dotfile or goes through a dot-directory,
/// after percent-decoding (`/%2egit/config` is `/.git/config`). Undecodable
/// paths count as hidden: `contained` refuses them too.
fn hidden(uri_path: &str) -> bool {
    let Ok(decoded) = percent_encoding::percent_decode_str(uri_path).decode_utf8() else {
        return true;
    };
    let mut parts = decoded.split('/').filter(|p| !p.is_empty()).peekable();
    if parts.peek() == Some(&".well-known") {
        parts.next();
    }
    parts.any(|p| p.starts_with('.'))
}

fn not_found() -> http::Response<Body> {
    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"404 Not Found\n"))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = http::Response::new(body);
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.html"), "a").unwrap();
        std::fs::write(tmp.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("leak")).unwrap();
        let f = StaticFiles::new(&root).unwrap();
        assert!(f.contained("/a.html"));
        assert!(f.contained("/missing.html"));
        assert!(!f.contained("/leak"), "symlink out of the root");
        assert!(!f.contained("/../secret"));
        assert!(!f.contained("/%2e%2e/secret"));
        assert!(!f.contained("/x%2F..%2F..%2Fsecret"));
    }

    #[test]
    fn dot_names_are_hidden() {
        for p in [
            "/.env",
            "/.git/config",
            "/a/.hidden/x",
            "/%2egit/config",
            "/a/%2Ehtaccess",
            "/.well-known/.secret",
            "/..",
            "/%ff",
        ] {
            assert!(hidden(p), "{p}");
        }
        for p in [
            "/",
            "/index.html",
            "/a/b.c/d",
            "/.well-known/security.txt",
            "/a/file.",
        ] {
            assert!(!hidden(p), "{p}");
        }
    }
}
