//! `[route.auth]` (issue #27, JWT connection auth) against a real wshd:
//! tokens made here with the same JWT crate a client's auth service would
//! use, HS256, RS256 and a JWKS file (RSA keys from the openssl CLI), sent
//! the two ways clients send them, and the testkit handler reporting what
//! its handshake view holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

const SECRET: &str = "this-is-the-shared-secret-of-the-test-auth-service";

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(sub: &str, exp: u64) -> String {
    let claims = serde_json::json!({"sub": sub, "exp": exp, "role": "admin"});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A server with `/secure` (testkit, HS256, no leeway) beside the plain
/// routes of the standard directory.
fn server(keys: &Path, extra_routes: &str) -> Wshd {
    std::fs::write(keys.join("secret"), format!("{SECRET}\n")).unwrap();
    let dir = standard_dir();
    let cfg = format!(
        "[[route]]\npath = \"/secure\"\nhandler = \"testkit\"\n\
         [route.auth]\njwt_hs256_secret_file = \"{}\"\nleeway = \"0s\"\n{extra_routes}",
        keys.join("secret").display()
    );
    let srv = Wshd::with_config(dir.path(), &cfg, &[]);
    // The directory must outlive the server (it holds the handlers).
    std::mem::forget(dir);
    srv
}

/// Upgrades to `path` with optional extra headers; the status, and the
/// response's `x-seen-*` headers and the socket when it was 101.
async fn upgrade(
    srv: &Wshd,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Option<Client>) {
    let mut req = srv.url(path).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            let seen = resp
                .headers()
                .iter()
                .filter(|(n, _)| {
                    n.as_str().starts_with("x-seen") || n.as_str() == "www-authenticate"
                })
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            (101, seen, Some(ws))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let seen = r
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            (r.status().as_u16(), seen, None)
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

fn header<'a>(seen: &'a [(String, String)], name: &str) -> &'a str {
    seen.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {seen:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_valid_tokens_are_admitted_and_the_handler_sees_claims_not_tokens() {
    let keys = tempfile::tempdir().unwrap();
    let srv = server(keys.path(), "");
    let good = hs256("alice", unix() + 3600);

    // Refused before the handler runs, with the reason and never the token.
    let wrong_key = encode(
        &Header::default(),
        &serde_json::json!({"sub": "alice", "exp": unix() + 3600}),
        &EncodingKey::from_secret(b"some-other-secret-of-the-same-length-ok"),
    )
    .unwrap();
    let expired = hs256("alice", unix() - 60);
    let no_exp = encode(
        &Header::default(),
        &serde_json::json!({"sub": "alice"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for (path, why) in [
        ("/secure".to_owned(), "no token"),
        ("/secure?token=not-a-jwt".to_owned(), "malformed token"),
        (format!("/secure?token={wrong_key}"), "bad signature"),
        (format!("/secure?token={expired}"), "token expired"),
        (format!("/secure?token={no_exp}"), "the token has no exp"),
    ] {
        let (status, seen, _) = upgrade(&srv, &path, &[]).await;
        assert_eq!(status, 401, "{path}");
        let challenge = header(&seen, "www-authenticate");
        assert!(
            challenge.starts_with("Bearer realm=\"wshd\", error=\"invalid_token\"")
                && challenge.contains(why),
            "{path}: {challenge}"
        );
    }

    // Admitted through the query: the handler sees the verified claims, and
    // neither the token nor a claim header the client made up.
    let (status, seen, ws) = upgrade(
        &srv,
        &format!("/secure?auth&token={good}&room=a"),
        &[("wshd-auth-sub", "mallory")],
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(header(&seen, "x-seen-auth-sub"), "alice");
    let claims: serde_json::Value =
        serde_json::from_str(header(&seen, "x-seen-auth-claims")).unwrap();
    assert_eq!(claims["role"], "admin");
    assert_eq!(header(&seen, "x-seen-query"), "auth&room=a");
    let mut ws = ws.unwrap();
    assert_eq!(echo_once(&mut ws, "hello").await, "hello");

    // Admitted through the header, which the handler does not see either.
    let bearer = format!("Bearer {good}");
    let (status, seen, _) =
        upgrade(&srv, "/secure?auth", &[("authorization", bearer.as_str())]).await;
    assert_eq!(status, 101);
    assert_eq!(header(&seen, "x-seen-auth-sub"), "alice");
    assert_eq!(header(&seen, "x-seen-authorization"), "(none)");

    // Routes without [route.auth] need nothing.
    let mut plain = connect(&srv.url("/echo")).await;
    assert_eq!(echo_once(&mut plain, "free").await, "free");

    // A refused request whose target the log shows (414: over 8 KiB): the
    // token is redacted.
    let pad = "p".repeat(9000);
    let r = raw_http(
        &srv.addr,
        &format!("GET /secure?token={good}&pad={pad} HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 414"), "{r}");
    srv.wait_log("request refused").await;
    let log = srv.log();
    assert!(log.contains("token=REDACTED"), "{log}");
    for t in [&good, &wrong_key, &expired, &no_exp] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a token reached the log:\n{log}");
    }
    assert_eq!(log.matches("handshake refused: 401").count(), 5, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_connection_closes_with_4001_unless_its_client_refreshed_the_token() {
    let keys = tempfile::tempdir().unwrap();
    let srv = server(keys.path(), "");
    let exp = unix() + 2;

    let mut lapsing = connect(&srv.url(&format!("/secure?token={}", hs256("alice", exp)))).await;
    let mut renewed = connect(&srv.url(&format!("/secure?token={}", hs256("alice", exp)))).await;

    // A fresh token for the same sub: the host answers, the handler never
    // sees the message.
    let later = unix() + 3600;
    let refresh = format!(
        "{{\"wshd\":\"refresh\",\"token\":\"{}\"}}",
        hs256("alice", later)
    );
    renewed.send(Message::text(refresh)).await.unwrap();
    assert_eq!(
        recv_text(&mut renewed).await,
        format!("{{\"exp\":{later},\"wshd\":\"refreshed\"}}")
    );
    // Not someone else's.
    let other = format!(
        "{{\"wshd\":\"refresh\",\"token\":\"{}\"}}",
        hs256("mallory", later)
    );
    renewed.send(Message::text(other)).await.unwrap();
    let answer = recv_text(&mut renewed).await;
    assert!(
        answer.contains("refresh_failed") && answer.contains("another sub"),
        "{answer}"
    );

    // The first one's token runs out: 4001, within a second of exp.
    let (code, reason) = recv_close(&mut lapsing).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    let late = unix().saturating_sub(exp);
    assert!(late <= 2, "closed {late} s after exp");
    // The renewed one outlives the old exp.
    assert!(unix() >= exp);
    assert_eq!(echo_once(&mut renewed, "still here").await, "still here");
    srv.wait_log("token expired and no fresh one came").await;
}

/// RSA keys from the openssl CLI: the private key (PKCS#8 PEM) and the
/// public one (SPKI PEM), and the modulus for a JWK.
fn rsa_key(dir: &Path, name: &str) -> (Vec<u8>, PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl CLI is needed to make RSA test keys");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let k = key.to_str().unwrap();
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        k,
    ]);
    run(&[
        "pkey",
        "-in",
        k,
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let modulus = run(&["rsa", "-in", k, "-noout", "-modulus"]);
    let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let n = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
    (std::fs::read(&key).unwrap(), public, n)
}

fn rs256(private: &[u8], kid: Option<&str>, sub: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    encode(
        &h,
        &serde_json::json!({"sub": sub, "exp": unix() + 3600, "aud": "chat"}),
        &EncodingKey::from_rsa_pem(private).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_keys_from_a_pem_file_or_a_jwks_file_and_audience_checks() {
    let keys = tempfile::tempdir().unwrap();
    let (k1, pub1, n1) = rsa_key(keys.path(), "k1");
    let (k2, _, _) = rsa_key(keys.path(), "k2");
    let jwks = keys.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": n1, "e": "AQAB"}
        ]})
        .to_string(),
    )
    .unwrap();
    let routes = format!(
        "[[route]]\npath = \"/rs\"\nhandler = \"testkit\"\n\
         [route.auth]\njwt_rs256_public_key_file = \"{}\"\naudience = [\"chat\"]\n\
         [[route]]\npath = \"/jwks\"\nhandler = \"testkit\"\n\
         [route.auth]\njwks_file = \"{}\"\nissuer = \"https://auth.example\"\n",
        pub1.display(),
        jwks.display()
    );
    let srv = server(keys.path(), &routes);
    let ok = |path: &str, token: &str| format!("{path}?auth&token={token}");

    let (status, seen, _) = upgrade(&srv, &ok("/rs", &rs256(&k1, None, "bob")), &[]).await;
    assert_eq!(status, 101);
    assert_eq!(header(&seen, "x-seen-auth-sub"), "bob");
    // Another key, an HS256 token on an RS256 route: refused.
    let (status, seen, _) = upgrade(&srv, &ok("/rs", &rs256(&k2, None, "bob")), &[]).await;
    assert_eq!(status, 401);
    assert!(header(&seen, "www-authenticate").contains("bad signature"));
    let (status, seen, _) = upgrade(&srv, &ok("/rs", &hs256("bob", unix() + 60)), &[]).await;
    assert_eq!(status, 401);
    assert!(header(&seen, "www-authenticate").contains("this route accepts RS256"));

    // The JWKS route also wants an issuer, which these tokens lack; then
    // the right kid with one.
    let (status, seen, _) = upgrade(&srv, &ok("/jwks", &rs256(&k1, Some("k1"), "bob")), &[]).await;
    assert_eq!(status, 401);
    assert!(
        header(&seen, "www-authenticate").contains("wrong issuer"),
        "{seen:?}"
    );
    let with_iss = |key: &[u8], kid: &str| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        encode(
            &h,
            &serde_json::json!({"sub": "carol", "exp": unix() + 60, "iss": "https://auth.example"}),
            &EncodingKey::from_rsa_pem(key).unwrap(),
        )
        .unwrap()
    };
    let (status, seen, _) = upgrade(&srv, &ok("/jwks", &with_iss(&k1, "k1")), &[]).await;
    assert_eq!(status, 101);
    assert_eq!(header(&seen, "x-seen-auth-sub"), "carol");
    let (status, seen, _) = upgrade(&srv, &ok("/jwks", &with_iss(&k2, "k2")), &[]).await;
    assert_eq!(status, 401);
    assert!(
        header(&seen, "www-authenticate").contains("no key with kid"),
        "{seen:?}"
    );
}

#[test]
fn a_missing_key_file_is_a_config_error_naming_the_line_and_key() {
    let dir = standard_dir();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        cfg_dir.path(),
        "[[route]]\npath = \"/secure\"\nhandler = \"testkit\"\n\
         [route.auth]\njwt_hs256_secret_file = \"nowhere.secret\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wshd"))
        .args(["-t", "--config"])
        .arg(&cfg)
        .arg("-w")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(":2:") && err.contains("route.auth.jwt_hs256_secret_file"),
        "{err}"
    );
    assert!(
        err.contains("nowhere.secret") && err.contains("cannot read"),
        "{err}"
    );
}
