//! TLS on the listeners: rustls through tokio-rustls, with the `ring`
//! provider (aws-lc-rs needs cmake and a long C build; ring builds in
//! seconds and is what rustls used for years), ALPN `http/1.1`.
//!
//! * [`TlsSettings`]: `[tls] cert/key/client_ca/client_auth` and
//!   `--tls-cert/--tls-key`, resolved.
//! * [`load`]: reads and checks a certificate/key pair (and the client CA)
//!   into a rustls `ServerConfig`. Everything wrong with the files is one
//!   clear error; an expired or not-yet-valid certificate loads with a
//!   warning (a server that refuses to start on an expired certificate
//!   serves nobody, one that warns serves clients that ignore the date).
//! * [`Tls`]: the live configuration. [`Tls::reload`] (SIGHUP, or the cert
//!   and key files changing, see [`Tls::watch`]) swaps in a new pair for the
//!   next handshake; open connections keep the session they negotiated. A
//!   pair that fails [`load`] is refused and the old one keeps serving.
//! * [`Tls::accept`]: the handshake of one accepted socket, bounded by the
//!   caller's deadline (`handshake_timeout`). A client that speaks plain
//!   HTTP to the port gets a clean close (FIN, its request drained), never a
//!   hang and never a reset.
//! * [`ClientCert`]: the verified client certificate's subject and SANs,
//!   handed to the handler's `on_handshake` as the pseudo-headers
//!   [`SUBJECT_HEADER`] and [`SAN_HEADER`]. A client cannot send them
//!   itself: [`client_headers`] drops any header of those names first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

use crate::cli::Args;
use crate::config::RawTls;
use crate::error::ConfigError;

/// The handshake header that carries the verified client certificate's
/// subject (RFC 4514 style, e.g. `CN=alice, O=Example`).
pub const SUBJECT_HEADER: &str = "wshd-client-subject";
/// The handshake header that carries its subject alternative names, comma
/// separated, each with its type: `DNS:a.example, URI:spiffe://x, IP:10.0.0.1,
/// email:a@example.com`.
pub const SAN_HEADER: &str = "wshd-client-san";

/// How long a client that sent plain HTTP to a TLS port gets to read our
/// FIN and hang up before the socket is closed anyway.
const PLAIN_DRAIN: Duration = Duration::from_secs(2);

/// Whether and how clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates are asked for.
    Off,
    /// Asked for; a client without one is served, one with a certificate
    /// that does not verify is refused.
    Optional,
    /// Every client must present a certificate that verifies.
    Required,
}

/// The resolved `[tls]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

impl TlsSettings {
    /// Flags win over the file; relative file paths are relative to the
    /// config file (`rel`). `None`: no TLS.
    pub fn resolve(
        args: &Args,
        raw: Option<&RawTls>,
        rel: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Option<TlsSettings>, ConfigError> {
        let file_cert = raw.and_then(|t| t.cert.as_deref()).map(rel);
        let file_key = raw.and_then(|t| t.key.as_deref()).map(rel);
        let cert = args.tls_cert.clone().or(file_cert);
        let key = args.tls_key.clone().or(file_key);
        let client_ca = raw.and_then(|t| t.client_ca.as_deref()).map(rel);
        let client_auth = match raw.and_then(|t| t.client_auth.as_deref()) {
            None if client_ca.is_some() => ClientAuth::Required,
            None => ClientAuth::Off,
            Some("required") => ClientAuth::Required,
            Some("optional") => ClientAuth::Optional,
            Some(other) => {
                return Err(ConfigError::Other(format!(
                    "[tls] client_auth = {:?}: write \"required\" or \"optional\"",
                    crate::logsafe::esc(other).to_string()
                )));
            }
        };
        if client_auth != ClientAuth::Off && client_ca.is_none() {
            return Err(ConfigError::Other(
                "[tls] client_auth is set but client_ca is not: name the PEM file of the CA that \
                 signs the client certificates"
                    .into(),
            ));
        }
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsSettings {
                cert,
                key,
                client_ca,
                client_auth,
            })),
            (None, None) if raw.is_none() => Ok(None),
            (None, None) => Err(ConfigError::Other(
                "[tls] needs cert and key (PEM files); set both, or remove the [tls] section"
                    .into(),
            )),
            (Some(_), None) => Err(ConfigError::Other(
                "a TLS certificate is set but no key: set [tls] key (or --tls-key)".into(),
            )),
            (None, Some(_)) => Err(ConfigError::Other(
                "a TLS key is set but no certificate: set [tls] cert (or --tls-cert)".into(),
            )),
        }
    }
}

/// A checked pair, ready to serve.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// One line for the log: subject, expiry, fingerprint.
    pub summary: String,
    /// Things that do not stop the pair from serving (an expired
    /// certificate, say).
    pub warnings: Vec<String>,
    /// Identifies the files' content, so a reload that finds nothing new
    /// changes nothing.
    pub digest: [u8; 32],
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the TLS {what} {}: {e}; check the path and that the wshd user may read it",
            path.display()
        )
    })
}

fn certs(what: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the TLS {what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the TLS {what} {} holds no certificate: expected PEM blocks starting with \
             -----BEGIN CERTIFICATE-----",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads and checks the pair (and the client CA) named by `s`.
pub fn load(s: &TlsSettings) -> Result<Loaded, String> {
    use sha2::{Digest, Sha256};

    let cert_pem = read("certificate", &s.cert)?;
    let key_pem = read("key", &s.key)?;
    let chain = certs("certificate", &s.cert, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "the TLS key {} holds no private key ({e}): expected a PEM block starting with \
             -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)",
            s.key.display()
        )
    })?;
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(&key_pem);

    let mut warnings = Vec::new();
    let leaf = describe(&chain[0], &s.cert, &mut warnings)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match (&s.client_ca, s.client_auth) {
        (Some(ca), auth) if auth != ClientAuth::Off => {
            let ca_pem = read("client CA", ca)?;
            digest.update(&ca_pem);
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("client CA", ca, &ca_pem)? {
                roots.add(c).map_err(|e| {
                    format!(
                        "the TLS client CA {} is not a usable CA certificate: {e}",
                        ca.display()
                    )
                })?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let v = match auth {
                ClientAuth::Optional => v.allow_unauthenticated(),
                _ => v,
            };
            let v = v
                .build()
                .map_err(|e| format!("the TLS client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "the key {} does not belong to the certificate {}; install the key the \
                 certificate was issued for",
            s.key.display(),
            s.cert.display()
        ),
        e => format!(
            "the TLS key {} cannot be used with {}: {e}",
            s.key.display(),
            s.cert.display()
        ),
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let digest: [u8; 32] = digest.finalize().into();
    Ok(Loaded {
        config: Arc::new(config),
        summary: leaf,
        warnings,
        digest,
    })
}

/// The leaf certificate in one line; dates outside its validity become
/// warnings.
fn describe(
    leaf: &CertificateDer<'_>,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<String, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| {
        format!(
            "the TLS certificate {} is not a valid X.509 certificate: {e}",
            path.display()
        )
    })?;
    let v = cert.validity();
    let now = ASN1Time::now();
    if v.not_after < now {
        warnings.push(format!(
            "the TLS certificate {} EXPIRED on {}: clients that check dates will refuse it; \
             renew it (it is served anyway, and reloaded when the file changes)",
            path.display(),
            v.not_after
        ));
    } else if v.not_before > now {
        warnings.push(format!(
            "the TLS certificate {} is not valid before {}: clients will refuse it until then",
            path.display(),
            v.not_before
        ));
    }
    Ok(format!(
        "subject \"{}\", valid until {}",
        cert.subject(),
        v.not_after
    ))
}

/// The live TLS configuration of a server.
pub struct Tls {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
    digest: std::sync::Mutex<[u8; 32]>,
}

impl Tls {
    /// Loads the pair at startup: an error here stops the server.
    pub fn new(settings: TlsSettings) -> Result<Arc<Tls>, String> {
        let loaded = load(&settings)?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            cert = %settings.cert.display(),
            client_auth = ?settings.client_auth,
            "TLS certificate loaded: {}",
            loaded.summary
        );
        Ok(Arc::new(Tls {
            settings,
            current: ArcSwap::new(loaded.config),
            digest: std::sync::Mutex::new(loaded.digest),
        }))
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files. A good pair serves the next handshake; a broken
    /// one is refused with an error and the running pair keeps serving.
    /// Returns whether a new pair was installed.
    pub fn reload(&self) -> bool {
        match load(&self.settings) {
            Ok(loaded) => {
                let mut digest = self.digest.lock().unwrap_or_else(|p| p.into_inner());
                if *digest == loaded.digest {
                    tracing::debug!("TLS certificate files unchanged");
                    return false;
                }
                for w in &loaded.warnings {
                    tracing::warn!("{w}");
                }
                self.current.store(loaded.config);
                *digest = loaded.digest;
                tracing::info!(
                    cert = %self.settings.cert.display(),
                    "TLS certificate reloaded: {}; new handshakes use it, open connections keep theirs",
                    loaded.summary
                );
                true
            }
            Err(e) => {
                tracing::error!(
                    "TLS certificate reload refused: {e}; still serving the previous certificate"
                );
                false
            }
        }
    }

    /// Watches the certificate, key and client CA files (their directories,
    /// so replacing a file by rename, as certbot and Kubernetes do, is seen)
    /// and reloads `debounce` after the last change. The watch ends when the
    /// returned watcher is dropped.
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};

        let mut files: Vec<&Path> = vec![&self.settings.cert, &self.settings.key];
        if let Some(ca) = &self.settings.client_ca {
            files.push(ca);
        }
        let names: Vec<std::ffi::OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(ToOwned::to_owned))
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            // Our files, or Kubernetes' `..data` symlink swap.
            let ours = ev.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    names.iter().any(|x| x == n) || n.to_string_lossy().starts_with("..")
                })
            });
            if ours {
                // Full means a reload is already pending.
                let _ = tx.try_send(());
            }
        })?;
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            watcher.watch(d, RecursiveMode::NonRecursive)?;
        }
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Quiet for `debounce`: a cert and its key are written one
                // after the other.
                while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                let Some(tls) = tls.upgrade() else { return };
                tls.reload();
            }
        });
        Ok(watcher)
    }

    /// The TLS handshake of an accepted socket, done by `deadline`. `None`
    /// if it failed (logged at debug: clients cause this) or was not TLS.
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        deadline: Instant,
    ) -> Option<(TlsStream<TcpStream>, Option<ClientCert>)> {
        // A TLS client starts with a handshake record (0x16). Anything else
        // is plain HTTP (or noise): close cleanly instead of answering with
        // a binary TLS alert.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(1)) => {
                tracing::debug!(%peer, "not a TLS client on a TLS port (plain HTTP?); closing");
                crate::metrics::tls_handshake_error();
                close_plain(stream).await;
                return None;
            }
            Ok(_) => return None,
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out (handshake_timeout) before the first byte");
                crate::metrics::tls_handshake_error();
                return None;
            }
        }
        let config = self.config();
        let handshake = async {
            let start =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                    .await?;
            start.into_stream(config).await
        };
        let stream = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "TLS handshake failed: {}", crate::logsafe::esc(&e.to_string()));
                crate::metrics::tls_handshake_error();
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out (handshake_timeout)");
                crate::metrics::tls_handshake_error();
                return None;
            }
        };
        let client = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(ClientCert::parse);
        Some((stream, client))
    }
}

/// FIN, then read what the client still sends (its request) so the close
/// is not a reset, for a short while.
async fn close_plain(mut stream: TcpStream) {
    let _ = tokio::time::timeout(PLAIN_DRAIN, async {
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What the handler learns about a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// RFC 4514 style: `CN=alice, O=Example`.
    pub subject: String,
    /// `DNS:a.example, URI:spiffe://x, IP:10.0.0.1, email:a@example.com`.
    pub sans: String,
}

impl ClientCert {
    /// From a DER certificate rustls has already verified.
    pub fn parse(der: &CertificateDer<'_>) -> Option<ClientCert> {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        let subject = cert.subject().to_string();
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for n in &ext.value.general_names {
                match n {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::RFC822Name(m) => sans.push(format!("email:{m}")),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?)
                        )),
                        16 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?)
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(ClientCert {
            subject: header_safe(&subject),
            sans: header_safe(&sans.join(", ")),
        })
    }
}

/// Control bytes (which a CA should never sign, but a header must never
/// carry) become `?`.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The request headers as the handler sees them: any client-sent
/// [`SUBJECT_HEADER`] or [`SAN_HEADER`] dropped (they would spoof a
/// certificate), then the verified certificate's, if any.
pub fn client_headers(
    headers: &http::HeaderMap,
    client: Option<&ClientCert>,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(n, _)| n.as_str() != SUBJECT_HEADER && n.as_str() != SAN_HEADER)
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    if let Some(c) = client {
        out.push((SUBJECT_HEADER.into(), c.subject.clone().into_bytes()));
        out.push((SAN_HEADER.into(), c.sans.clone().into_bytes()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn put(&self, name: &str, body: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        }
        fn settings(&self, cert: &str, key: &str) -> TlsSettings {
            TlsSettings {
                cert: self.put("cert.pem", cert),
                key: self.put("key.pem", key),
                client_ca: None,
                client_auth: ClientAuth::Off,
            }
        }
    }

    fn self_signed(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn a_good_pair_loads_with_alpn_http11() {
        let f = Files::new();
        let (cert, key) = self_signed("localhost");
        let l = load(&f.settings(&cert, &key)).unwrap();
        assert_eq!(l.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn broken_pairs_are_refused_with_a_clear_error() {
        let f = Files::new();
        let (cert, key) = self_signed("localhost");
        let (_, other_key) = self_signed("other");
        let e = load(&f.settings(&cert, &other_key)).err().unwrap();
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = load(&f.settings("not pem at all", &key)).err().unwrap();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = load(&f.settings(&cert, "garbage")).err().unwrap();
        assert!(e.contains("holds no private key"), "{e}");
        // The key where the certificate belongs.
        let e = load(&f.settings(&key, &key)).err().unwrap();
        assert!(e.contains("holds no certificate"), "{e}");
        let mut s = f.settings(&cert, &key);
        s.key = f.dir.path().join("missing.pem");
        let e = load(&s).err().unwrap();
        assert!(e.contains("cannot read the TLS key"), "{e}");
    }

    #[test]
    fn an_expired_certificate_loads_with_a_warning() {
        let f = Files::new();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2001, 1, 1);
        p.not_after = rcgen::date_time_ymd(2002, 1, 1);
        let k = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&k).unwrap();
        let l = load(&f.settings(&cert.pem(), &k.serialize_pem())).unwrap();
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("EXPIRED"), "{:?}", l.warnings);
    }

    #[test]
    fn client_cert_subject_and_sans() {
        let mut p = rcgen::CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example/alice".try_into().unwrap(),
        ));
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
                10, 0, 0, 1,
            ])));
        let k = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&k).unwrap();
        let c = ClientCert::parse(cert.der()).unwrap();
        assert_eq!(c.subject, "CN=alice, O=Example");
        assert_eq!(
            c.sans,
            "DNS:client.example, URI:spiffe://example/alice, IP:10.0.0.1"
        );
    }

    #[test]
    fn client_sent_certificate_headers_are_dropped() {
        let mut h = http::HeaderMap::new();
        h.insert(SUBJECT_HEADER, "CN=admin".parse().unwrap());
        h.insert(SAN_HEADER, "DNS:evil".parse().unwrap());
        h.insert("x-other", "kept".parse().unwrap());
        let out = client_headers(&h, None);
        assert_eq!(out, vec![("x-other".to_owned(), b"kept".to_vec())]);
        let c = ClientCert {
            subject: "CN=alice".into(),
            sans: String::new(),
        };
        let out = client_headers(&h, Some(&c));
        let subjects: Vec<_> = out.iter().filter(|(n, _)| n == SUBJECT_HEADER).collect();
        assert_eq!(
            subjects,
            vec![&(SUBJECT_HEADER.to_owned(), b"CN=alice".to_vec())]
        );
    }
}
