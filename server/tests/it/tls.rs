//! TLS listeners (issue #16 §1): wss echo, certificate reload under open
//! connections (file watch and SIGHUP), broken pairs refused while the old
//! one serves, client certificates (required and optional) reaching the
//! handler and not spoofable, plain HTTP to the TLS port closed cleanly,
//! TLS to a plain port answered 400, stalled handshakes cut at
//! `handshake_timeout`, per-IP caps before the handshake, a plain and a TLS
//! listener in one process, and `-t` checking the pair.
//!
//! Certificates are made at test time with rcgen: one test CA signs the
//! server certificates (so a client trusting it accepts each of them, and a
//! test tells them apart by their DER) and the client certificates.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A test CA and what it signs, written as PEM files in a temp dir.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM and DER.
pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    pub(crate) fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub(crate) fn server(&self) -> Leaf {
        let p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        self.sign(p)
    }

    /// A client certificate `CN=<cn>` with a DNS and a URI SAN.
    fn client(&self, cn: &str) -> Leaf {
        let mut p = CertificateParams::new(vec![format!("{cn}.client.example")]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names.push(rcgen::SanType::URI(
            format!("spiffe://example/{cn}").try_into().unwrap(),
        ));
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Installs `cert` and `key` as cert.pem / key.pem, each replaced by a
    /// rename as certbot does.
    pub(crate) fn install(&self, cert: &str, key: &str) {
        for (name, body) in [("key.pem", key), ("cert.pem", cert)] {
            let tmp = self.path(&format!(".{name}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("cert.pem").display().to_string(),
            "--tls-key".into(),
            self.path("key.pem").display().to_string(),
        ]
    }

    /// A client that trusts this CA, presenting `cert` if given.
    fn client_config(&self, cert: Option<&Leaf>) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let b =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut c = match cert {
            Some(l) => b
                .with_client_auth_cert(
                    vec![l.der.clone()],
                    PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

fn flag_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// TLS to `addr`, then a WebSocket handshake on `path`.
async fn wss(
    addr: &str,
    path: &str,
    config: Arc<ClientConfig>,
    extra: &[(&str, &str)],
) -> Result<(Wss, http::HeaderMap), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("wss://{addr}{path}").into_client_request().unwrap();
    for (n, v) in extra {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async(req, tls),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?;
    let (ws, resp) = r.map_err(|e| format!("ws: {e}"))?;
    Ok((ws, resp.headers().clone()))
}

/// The certificate the server presented on this connection.
fn served_cert(ws: &Wss) -> CertificateDer<'static> {
    ws.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn wss_echo(ws: &mut Wss, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("timed out waiting for the echo")
            .expect("stream ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            return t.to_string();
        }
    }
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Reads until the server ends the connection; `Ok(bytes)` for a clean
/// close (FIN), `Err` for a reset, panics if it never ends.
async fn read_until_closed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got))
        .await
        .expect("the server never closed the connection")?;
    Ok(got)
}

/// A real ClientHello, as a TLS client's first flight.
fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let mut c =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    assert_eq!(out[0], 0x16, "a handshake record");
    out
}

#[tokio::test]
async fn wss_echo_and_client_cert_headers_cannot_be_spoofed() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let s = Wshd::start(dir.path(), &flag_refs(&pki.flags()));
    let client = pki.client_config(None);

    let (mut ws, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();
    assert_eq!(wss_echo(&mut ws, "hello over wss").await, "hello over wss");
    // Large enough to span many TLS records and socket writes.
    let big = "x".repeat(300_000);
    assert_eq!(wss_echo(&mut ws, &big).await, big);
    ws.close(None).await.unwrap();

    // Without client certificates, a client-sent copy of the pseudo-headers
    // never reaches the handler.
    let (_ws, h) = wss(
        &s.addr,
        "/testkit?client_cert",
        client,
        &[
            ("wshd-client-subject", "CN=admin"),
            ("wshd-client-san", "DNS:admin.example"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(header(&h, "x-seen-subject"), "(none)");
    assert_eq!(header(&h, "x-seen-san"), "(none)");
}

#[tokio::test]
async fn cert_reload_keeps_open_connections_and_refuses_a_broken_pair() {
    let pki = Pki::new("test CA");
    let a = pki.server();
    pki.install(&a.cert_pem, &a.key_pem);
    let dir = standard_dir();
    let s = Wshd::start(dir.path(), &flag_refs(&pki.flags()));
    let client = pki.client_config(None);

    let (mut old, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();
    assert_eq!(served_cert(&old), a.der);

    // A renewed certificate: the watcher installs it for new handshakes.
    let b = pki.server();
    pki.install(&b.cert_pem, &b.key_pem);
    s.wait_log("TLS certificate reloaded").await;
    let (mut new, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();
    assert_eq!(served_cert(&new), b.der);
    assert_eq!(wss_echo(&mut old, "still here").await, "still here");
    assert_eq!(wss_echo(&mut new, "new one").await, "new one");

    // A certificate with someone else's key: refused, B keeps serving.
    let c = pki.server();
    pki.install(&c.cert_pem, &a.key_pem);
    let log = s.wait_log("TLS certificate reload refused").await;
    assert!(log.contains("does not belong to the certificate"), "{log}");
    let (mut third, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();
    assert_eq!(served_cert(&third), b.der);
    assert_eq!(wss_echo(&mut third, "b serves").await, "b serves");
    // Not PEM at all: refused too.
    pki.install("garbage", "garbage");
    s.wait_log_count("TLS certificate reload refused", 2).await;
    let (third, _) = wss(&s.addr, "/echo", client, &[]).await.unwrap();
    assert_eq!(served_cert(&third), b.der);
    assert_eq!(wss_echo(&mut old, "through it all").await, "through it all");
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let pki = Pki::new("test CA");
    let a = pki.server();
    pki.install(&a.cert_pem, &a.key_pem);
    let dir = standard_dir();
    let mut flags = pki.flags();
    flags.push("--no-watch".into());
    let s = Wshd::start(dir.path(), &flag_refs(&flags));
    let client = pki.client_config(None);
    let (mut old, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();

    let b = pki.server();
    pki.install(&b.cert_pem, &b.key_pem);
    // Not watched: still A until SIGHUP.
    let (ws, _) = wss(&s.addr, "/echo", client.clone(), &[]).await.unwrap();
    assert_eq!(served_cert(&ws), a.der);
    s.signal("HUP");
    s.wait_log("TLS certificate reloaded").await;
    let (ws, _) = wss(&s.addr, "/echo", client, &[]).await.unwrap();
    assert_eq!(served_cert(&ws), b.der);
    assert_eq!(wss_echo(&mut old, "kept").await, "kept");
}

fn mtls_config(pki: &Pki, auth: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = {auth:?}\n",
        pki.path("cert.pem"),
        pki.path("key.pem"),
        pki.path("ca.pem")
    )
}

#[tokio::test]
async fn mtls_required_refuses_without_a_good_cert_and_shows_the_subject() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let s = Wshd::with_config(dir.path(), &mtls_config(&pki, "required"), &[]);

    // No certificate: refused (TLS 1.3 reports it at the first read).
    let e = wss(&s.addr, "/echo", pki.client_config(None), &[])
        .await
        .expect_err("a client without a certificate must be refused");
    assert!(!e.is_empty());
    // A certificate from another CA: refused.
    let other = Pki::new("other CA");
    let stranger = other.client("mallory");
    let e = wss(&s.addr, "/echo", pki.client_config(Some(&stranger)), &[])
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    assert!(!e.is_empty());

    // A good one: served, and the handler sees who it is, not what the
    // client claims in headers.
    let alice = pki.client("alice");
    let (mut ws, h) = wss(
        &s.addr,
        "/testkit?client_cert",
        pki.client_config(Some(&alice)),
        &[("wshd-client-subject", "CN=admin")],
    )
    .await
    .unwrap();
    assert_eq!(header(&h, "x-seen-subject"), "CN=alice");
    assert_eq!(
        header(&h, "x-seen-san"),
        "DNS:alice.client.example, URI:spiffe://example/alice"
    );
    assert_eq!(wss_echo(&mut ws, "hi alice").await, "hi alice");
}

#[tokio::test]
async fn mtls_optional_serves_clients_without_a_cert() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let s = Wshd::with_config(dir.path(), &mtls_config(&pki, "optional"), &[]);

    let (mut ws, h) = wss(
        &s.addr,
        "/testkit?client_cert",
        pki.client_config(None),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(header(&h, "x-seen-subject"), "(none)");
    assert_eq!(wss_echo(&mut ws, "anon").await, "anon");
    let bob = pki.client("bob");
    let (_ws, h) = wss(
        &s.addr,
        "/testkit?client_cert",
        pki.client_config(Some(&bob)),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(header(&h, "x-seen-subject"), "CN=bob");
    // A presented certificate must still verify.
    let other = Pki::new("other CA");
    let e = wss(
        &s.addr,
        "/echo",
        pki.client_config(Some(&other.client("mallory"))),
        &[],
    )
    .await;
    assert!(e.is_err(), "an unverifiable certificate must be refused");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_closed_cleanly() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let owned = pki.flags();
    let mut flags = flag_refs(&owned);
    flags.extend(["--admin", "127.0.0.1:0"]);
    let s = Wshd::start(dir.path(), &flags);
    let mut c = TcpStream::connect(&s.addr).await.unwrap();
    c.write_all(
        upgrade_request("/echo", "")
            .replace("Host: x", &format!("Host: {}", s.addr))
            .as_bytes(),
    )
    .await
    .unwrap();
    // FIN, no bytes (no binary TLS alert), and no reset.
    let got = read_until_closed(&mut c)
        .await
        .expect("a clean close, not a reset");
    assert!(got.is_empty(), "expected nothing, got {got:?}");
    // The port still serves TLS.
    let (mut ws, _) = wss(&s.addr, "/echo", pki.client_config(None), &[])
        .await
        .unwrap();
    assert_eq!(wss_echo(&mut ws, "ok").await, "ok");
    // The refused client is counted as a TLS handshake error.
    let log = s.wait_log("admin listener:").await;
    let line = log.lines().find(|l| l.contains("admin listener:")).unwrap();
    let admin: String = line[line.find("addr=").unwrap() + 5..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    let scrape = raw_http(
        &admin,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let errors = scrape
        .lines()
        .find(|l| l.starts_with("wshd_tls_handshake_errors_total"))
        .unwrap_or_else(|| panic!("no TLS error counter in:\n{scrape}"));
    assert!(errors.ends_with(" 1"), "{errors}");
}

#[tokio::test]
async fn tls_to_a_plain_port_gets_400() {
    let dir = standard_dir();
    let s = Wshd::start(dir.path(), &[]);
    let pki = Pki::new("test CA");
    let mut c = TcpStream::connect(&s.addr).await.unwrap();
    c.write_all(&client_hello(pki.client_config(None)))
        .await
        .unwrap();
    let got = read_until_closed(&mut c).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
}

#[tokio::test]
async fn stalled_tls_handshakes_are_cut_at_handshake_timeout() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let s = Wshd::with_config(
        dir.path(),
        &format!(
            "[limits]\nhandshake_timeout = \"1s\"\n\n[tls]\ncert = {:?}\nkey = {:?}\n",
            pki.path("cert.pem"),
            pki.path("key.pem")
        ),
        &[],
    );
    // Half a ClientHello, then nothing.
    let hello = client_hello(pki.client_config(None));
    let mut c = TcpStream::connect(&s.addr).await.unwrap();
    c.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let _ = read_until_closed(&mut c).await;
    s.wait_log("TLS handshake timed out").await;

    // A finished TLS handshake and no request: cut by the same deadline.
    let tcp = TcpStream::connect(&s.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the server never closed an idle TLS connection");
    assert!(buf.is_empty());
    s.wait_log("no request within handshake_timeout after the TLS handshake")
        .await;
}

#[tokio::test]
async fn per_ip_caps_answer_before_any_tls_handshake() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let s = Wshd::with_config(
        dir.path(),
        &format!(
            "[limits]\nmax_connections_per_ip = 1\nper_ip_exempt = []\n\n[tls]\ncert = {:?}\nkey = {:?}\n",
            pki.path("cert.pem"),
            pki.path("key.pem")
        ),
        &[],
    );
    let (mut held, _) = wss(&s.addr, "/echo", pki.client_config(None), &[])
        .await
        .unwrap();
    // The refusal is plain HTTP, written before any TLS: it costs the
    // server no handshake.
    let mut c = TcpStream::connect(&s.addr).await.unwrap();
    let got = read_until_closed(&mut c).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert_eq!(wss_echo(&mut held, "held").await, "held");
}

/// Runs wshd with `--config` only (no -H/-p: the config's listen list is
/// the truth) and returns it with every listener's address.
fn start_listen_list(
    dir: &Path,
    toml: &str,
) -> (std::process::Child, Vec<String>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), toml);
    let addr_file = tmp.path().join("addr");
    let log = std::fs::File::create(tmp.path().join("wshd.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wshd"))
        .arg("-w")
        .arg(dir)
        .arg("--config")
        .arg(&cfg)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && a.ends_with('\n')
        {
            return (child, a.lines().map(str::to_owned).collect(), tmp);
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "wshd exited {st}:\n{}",
                std::fs::read_to_string(tmp.path().join("wshd.log")).unwrap_or_default()
            );
        }
        assert!(std::time::Instant::now() < deadline, "wshd not listening");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_plain_and_a_tls_listener_in_one_process() {
    let pki = Pki::new("test CA");
    let leaf = pki.server();
    pki.install(&leaf.cert_pem, &leaf.key_pem);
    let dir = standard_dir();
    let toml = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}, {{ addr = \"127.0.0.1:0\", tls = true }}]\n\n\
         [tls]\ncert = {:?}\nkey = {:?}\n",
        pki.path("cert.pem"),
        pki.path("key.pem")
    );
    let (mut child, addrs, _tmp) = start_listen_list(dir.path(), &toml);
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let mut plain = connect(&format!("ws://{}/echo", addrs[0])).await;
    assert_eq!(echo_once(&mut plain, "plain").await, "plain");
    let (mut tls, _) = wss(&addrs[1], "/echo", pki.client_config(None), &[])
        .await
        .unwrap();
    assert_eq!(wss_echo(&mut tls, "tls").await, "tls");
    // Each port speaks only its own protocol.
    assert!(
        wss(&addrs[0], "/echo", pki.client_config(None), &[])
            .await
            .is_err()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn check_config_checks_the_pair() {
    let pki = Pki::new("test CA");
    let a = pki.server();
    let b = pki.server();
    pki.install(&a.cert_pem, &a.key_pem);
    let dir = standard_dir();
    let run = |flags: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_wshd"))
            .arg("-t")
            .arg("-w")
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap()
    };
    let out = run(&pki.flags());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("TLS certificate"), "{text}");

    pki.install(&a.cert_pem, &b.key_pem);
    let out = run(&pki.flags());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not belong to the certificate"), "{err}");

    // At startup, a broken pair stops the server before it serves.
    let r = Wshd::try_start(dir.path(), &flag_refs(&pki.flags()));
    let log = r
        .err()
        .expect("wshd must refuse to start with a mismatched key");
    assert!(log.contains("does not belong to the certificate"), "{log}");
}
