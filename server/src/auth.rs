//! `[route.auth]`: JWT connection auth in the host (issue #27, part 2).
//!
//! A route with `[route.auth]` admits a WebSocket handshake only with a valid
//! JSON Web Token, checked before the handler runs:
//!
//! * **Where the token is.** `Authorization: Bearer TOKEN`, or the query
//!   parameter `token=TOKEN` (browsers cannot set headers on a WebSocket).
//!   Neither reaches the handler, and no log line shows a token
//!   ([`redact_query`]).
//! * **What is checked.** The signature, with the one key the route names:
//!   an HS256 secret, an RS256 public key (PEM), or a JWKS file whose key is
//!   picked by the token's `kid` (RS256, ES256, EdDSA). `exp` is required;
//!   `exp` and `nbf` are checked with `leeway`; `aud` and `iss` when
//!   configured. Anything else, "none" included, is refused with **401**
//!   and a `WWW-Authenticate: Bearer` header saying why.
//! * **What the handler sees.** The verified claims, in its handshake view:
//!   `wshd-auth-sub` (the `sub` claim) and `wshd-auth-claims` (all claims,
//!   as JSON). A client-sent header of either name is dropped.
//! * **Expiry.** The session closes the connection with [`EXPIRED_CODE`]
//!   when the token's `exp` (plus `leeway`) passes, unless the client sent
//!   a fresh token first: the text message `{"wshd":"refresh","token":"…"}`,
//!   which the host answers itself (`{"wshd":"refreshed","exp":N}`, or
//!   `{"wshd":"refresh_failed","error":"…"}`) and never passes to the
//!   handler. A fresh token must name the same `sub`.
//!
//! Per-connection state is one entry in the server's [`Expiries`] for
//! connections of auth routes only, so other connections pay nothing. It
//! lives in the server rather than in a route's [`Auth`] because a reload
//! can give the route a new `Auth` (and a handover a new route) while the
//! connection stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};

/// The close code for a connection whose token expired (4000-4999 is the
/// application range; the host owns this one on auth routes).
pub const EXPIRED_CODE: u16 = 4001;
/// The close reason that goes with it.
pub const EXPIRED_REASON: &str = "token expired";
/// The handshake-view header with the verified `sub` claim.
pub const SUB_HEADER: &str = "wshd-auth-sub";
/// The handshake-view header with every verified claim, as JSON.
pub const CLAIMS_HEADER: &str = "wshd-auth-claims";
/// How a refresh message starts; the rest must be the JSON object
/// `{"wshd":"refresh","token":"…"}`.
pub const REFRESH_PREFIX: &str = "{\"wshd\":\"refresh\"";
/// The default `leeway`: clock skew allowed on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key at
/// least as long as the hash (256 bits).
pub const MIN_SECRET_LEN: usize = 32;
/// The longest token read from a request or a refresh message.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// `[route.auth]` as written.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// A file holding the HS256 shared secret (at least 32 bytes; one
    /// trailing newline is ignored).
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// A PEM file with the RS256 public key (`BEGIN PUBLIC KEY`).
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`); the token's `kid` picks the key.
    pub jwks_file: Option<PathBuf>,
    /// Accepted `aud` values; absent: `aud` is not checked.
    pub audience: Option<Vec<String>>,
    /// The required `iss`; absent: `iss` is not checked.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default `"30s"`; `"0s"` for
    /// none). A humantime string, read here rather than with the config's
    /// duration type, so that this module does not depend on `config`
    /// (which depends on it).
    pub leeway: Option<String>,
}

/// The keys a route accepts tokens from.
enum Keys {
    One(Algorithm, DecodingKey),
    /// By `kid`; a set of one key also serves tokens without a `kid`.
    Set(Vec<(Option<String>, Algorithm, DecodingKey)>),
}

/// A route's token check, resolved from [`RawAuth`] (key files read once,
/// when the config is read: a missing or bad file fails `wshd -t`).
pub struct Auth {
    raw: RawAuth,
    /// The key material as read, so a changed file counts as a changed
    /// route on reload.
    fingerprint: Vec<u8>,
    keys: Keys,
    leeway: Duration,
}

/// `exp` (Unix seconds) and `sub` of each open connection admitted with a
/// token, by connection id: one per server.
#[derive(Debug, Default)]
pub struct Expiries {
    map: DashMap<u64, (u64, Option<String>)>,
    /// Entries in `map`: lets [`Expiries::forget`] cost one load on a
    /// server whose routes have no auth.
    live: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Auth").field("raw", &self.raw).finish()
    }
}

impl PartialEq for Auth {
    fn eq(&self, other: &Auth) -> bool {
        self.raw == other.raw && self.fingerprint == other.fingerprint
    }
}

/// Why a token was refused: the `error_description` of the 401 and the
/// log line. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub sub: Option<String>,
    pub exp: u64,
    pub claims: Map<String, Value>,
}

impl Auth {
    /// Reads the key file `raw` names (relative paths from `base`). `Err`
    /// says which key is wrong and how to fix it.
    pub fn load(raw: &RawAuth, base: &Path) -> Result<Auth, (String, String)> {
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let named = [
            raw.jwt_hs256_secret_file.is_some(),
            raw.jwt_rs256_public_key_file.is_some(),
            raw.jwks_file.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if named != 1 {
            return Err((
                "auth".into(),
                "[route.auth] needs exactly one of jwt_hs256_secret_file, \
                 jwt_rs256_public_key_file and jwks_file"
                    .into(),
            ));
        }
        let read = |key: &str, p: &Path| {
            let p = rel(p);
            std::fs::read(&p).map_err(|e| {
                (
                    format!("auth.{key}"),
                    format!("cannot read {}: {e}", p.display()),
                )
            })
        };
        let (keys, fingerprint) = if let Some(p) = &raw.jwt_hs256_secret_file {
            let mut secret = read("jwt_hs256_secret_file", p)?;
            if secret.last() == Some(&b'\n') {
                secret.pop();
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err((
                    "auth.jwt_hs256_secret_file".into(),
                    format!(
                        "{} holds a {}-byte secret; HS256 needs at least {MIN_SECRET_LEN} \
                         (e.g. `head -c 48 /dev/urandom | base64 > FILE`)",
                        rel(p).display(),
                        secret.len()
                    ),
                ));
            }
            (
                Keys::One(Algorithm::HS256, DecodingKey::from_secret(&secret)),
                secret,
            )
        } else if let Some(p) = &raw.jwt_rs256_public_key_file {
            let pem = read("jwt_rs256_public_key_file", p)?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                (
                    "auth.jwt_rs256_public_key_file".to_string(),
                    format!(
                        "{}: not an RSA public key in PEM ({e}); give the `BEGIN PUBLIC KEY` \
                         file, e.g. from `openssl rsa -in key.pem -pubout`",
                        rel(p).display()
                    ),
                )
            })?;
            (Keys::One(Algorithm::RS256, key), pem)
        } else {
            let p = raw.jwks_file.as_ref().expect("counted above");
            let text = read("jwks_file", p)?;
            let keys = jwks(&text).map_err(|e| {
                (
                    "auth.jwks_file".to_string(),
                    format!("{}: {e}", rel(p).display()),
                )
            })?;
            (Keys::Set(keys), text)
        };
        let leeway = match &raw.leeway {
            None => DEFAULT_LEEWAY,
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                (
                    "auth.leeway".to_string(),
                    format!("{text:?} is not a duration ({e}); write e.g. \"30s\" or \"0s\""),
                )
            })?,
        };
        if leeway > Duration::from_secs(3600) {
            return Err((
                "auth.leeway".into(),
                "at most 1h: a leeway is for clock skew, not a longer token life".into(),
            ));
        }
        Ok(Auth {
            raw: raw.clone(),
            fingerprint,
            keys,
            leeway,
        })
    }

    /// Checks `token`.
    pub fn verify(&self, token: &str) -> Result<Verified, Refused> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refused(format!("token longer than {MAX_TOKEN_LEN} bytes")));
        }
        let header = decode_header(token).map_err(|e| Refused(format!("malformed token: {e}")))?;
        let (alg, key) = match &self.keys {
            Keys::One(alg, key) => (*alg, key),
            Keys::Set(set) => {
                let found = match &header.kid {
                    Some(kid) => set.iter().find(|(k, _, _)| k.as_deref() == Some(kid)),
                    None if set.len() == 1 => set.first(),
                    None => None,
                };
                let Some((_, alg, key)) = found else {
                    return Err(Refused(match header.kid {
                        Some(kid) => format!(
                            "no key with kid {:?} in the JWKS",
                            crate::logsafe::esc(&kid).to_string()
                        ),
                        None => "the token has no kid and the JWKS has several keys".into(),
                    }));
                };
                (*alg, key)
            }
        };
        if header.alg != alg {
            return Err(Refused(format!(
                "token signed with {:?}; this route accepts {alg:?}",
                header.alg
            )));
        }
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        // A configured audience or issuer must be present, not only right
        // when present.
        let mut required = vec!["exp"];
        match &self.raw.audience {
            Some(aud) => {
                v.set_audience(aud);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.raw.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = decode::<Map<String, Value>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            Refused(
                match e.kind() {
                    K::ExpiredSignature => "token expired",
                    K::ImmatureSignature => "token not valid yet (nbf)",
                    K::InvalidSignature => "bad signature",
                    K::InvalidAudience => "wrong audience (aud)",
                    K::InvalidIssuer => "wrong issuer (iss)",
                    K::MissingRequiredClaim(c) if c == "exp" => "the token has no exp",
                    K::MissingRequiredClaim(c) if c == "aud" => "wrong audience (aud)",
                    K::MissingRequiredClaim(c) if c == "iss" => "wrong issuer (iss)",
                    K::InvalidAlgorithm => "algorithm not accepted",
                    _ => "malformed token",
                }
                .into(),
            )
        })?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let sub = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
        Ok(Verified { sub, exp, claims })
    }

    /// Handles a refresh message from `conn` (a text starting with
    /// [`REFRESH_PREFIX`]) against the connections in `open`; returns the
    /// host's answer to it.
    pub fn refresh(&self, open: &Expiries, conn: u64, text: &str) -> String {
        #[derive(serde::Deserialize)]
        struct Refresh {
            wshd: String,
            token: String,
        }
        let fail =
            |why: &str| serde_json::json!({"wshd": "refresh_failed", "error": why}).to_string();
        let Ok(r) = serde_json::from_str::<Refresh>(text) else {
            return fail("expected {\"wshd\":\"refresh\",\"token\":\"...\"}");
        };
        if r.wshd != "refresh" {
            return fail("expected {\"wshd\":\"refresh\",\"token\":\"...\"}");
        }
        let v = match self.verify(&r.token) {
            Ok(v) => v,
            Err(Refused(why)) => return fail(&why),
        };
        let Some(mut entry) = open.map.get_mut(&conn) else {
            return fail("this connection was not admitted with a token");
        };
        if entry.1 != v.sub {
            return fail("the new token names another sub");
        }
        entry.0 = entry.0.max(v.exp);
        serde_json::json!({"wshd": "refreshed", "exp": entry.0}).to_string()
    }

    /// How long `conn`'s token stays valid (its `exp` plus this route's
    /// `leeway`) from now; `Some(ZERO)` once it has expired, `None` for a
    /// connection admitted without one.
    pub fn time_left(&self, open: &Expiries, conn: u64) -> Option<Duration> {
        let exp = open.map.get(&conn)?.0;
        let until = Duration::from_secs(exp) + self.leeway;
        Some(until.saturating_sub(now_unix()))
    }
}

impl Expiries {
    /// Connection `conn` was admitted with `v`: its expiry is watched from
    /// now until [`Expiries::forget`].
    pub fn admit(&self, conn: u64, v: &Verified) {
        use std::sync::atomic::Ordering;
        if self.map.insert(conn, (v.exp, v.sub.clone())).is_none() {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connection `conn` is gone (whatever its route: a handover may have
    /// moved it).
    pub fn forget(&self, conn: u64) {
        use std::sync::atomic::Ordering;
        if self.live.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.map.remove(&conn).is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Connections watched now.
    pub fn len(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_unix() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The keys of a JWKS document.
fn jwks(text: &[u8]) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let set: JwkSet = serde_json::from_slice(text)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    if set.keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    let mut out = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(a), _) => format!("{a:?}")
                .parse::<Algorithm>()
                .map_err(|_| format!("key {kid:?}: algorithm {a:?} is not supported"))?,
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
            (None, _) => {
                return Err(format!(
                    "key {kid:?}: say its algorithm with \"alg\" (RS256, ES256 or EdDSA)"
                ));
            }
        };
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(format!(
                "key {kid:?}: a shared secret does not belong in a JWKS file; use \
                 jwt_hs256_secret_file"
            ));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
        out.push((kid, alg, key));
    }
    Ok(out)
}

/// The token a handshake carries: `Authorization: Bearer`, else `token=` in
/// the query (percent-decoded).
pub fn token_of(headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some((scheme, token)) = v.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(token.trim().to_owned());
    }
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("token=")?;
        Some(
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })
}

/// `query` without its `token=` parameters: what the handler and the logs
/// see of it.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .filter(|p| !p.starts_with("token="))
        .collect::<Vec<_>>()
        .join("&")
}

/// A request target with every `token=` value replaced by `REDACTED`, for
/// log lines that show the target.
pub fn redact_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let q: Vec<String> = query
        .split('&')
        .map(|p| {
            if p.starts_with("token=") {
                "token=REDACTED".to_owned()
            } else {
                p.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn hs_auth(extra: impl FnOnce(&mut RawAuth)) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), [SECRET, b"\n"].concat()).unwrap();
        let mut raw = RawAuth {
            jwt_hs256_secret_file: Some("s".into()),
            ..Default::default()
        };
        extra(&mut raw);
        let a = Auth::load(&raw, dir.path()).unwrap();
        (dir, a)
    }

    fn token(claims: Value, key: &[u8]) -> String {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).unwrap()
    }

    fn unix() -> u64 {
        now_unix().as_secs()
    }

    #[test]
    fn valid_tokens_pass_and_every_kind_of_bad_one_says_why() {
        let (_d, a) = hs_auth(|r| {
            r.audience = Some(vec!["chat".into()]);
            r.issuer = Some("https://auth.example".into());
            r.leeway = Some("0s".into());
        });
        let good = json(unix() + 60);
        let v = a.verify(&token(good.clone(), SECRET)).unwrap();
        assert_eq!(v.sub.as_deref(), Some("alice"));
        assert_eq!(v.claims["role"], "admin");
        let why = |claims: Value, key: &[u8]| a.verify(&token(claims, key)).unwrap_err().0;
        assert_eq!(
            why(good.clone(), b"another secret, also long enough!!"),
            "bad signature"
        );
        assert_eq!(why(json(unix() - 5), SECRET), "token expired");
        let mut nbf = good.clone();
        nbf["nbf"] = (unix() + 60).into();
        assert_eq!(why(nbf, SECRET), "token not valid yet (nbf)");
        let mut aud = good.clone();
        aud["aud"] = "other".into();
        assert_eq!(why(aud, SECRET), "wrong audience (aud)");
        let mut iss = good.clone();
        iss["iss"] = "https://evil.example".into();
        assert_eq!(why(iss, SECRET), "wrong issuer (iss)");
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(why(no_exp, SECRET), "the token has no exp");
        assert!(
            a.verify("not.a.token")
                .unwrap_err()
                .0
                .starts_with("malformed")
        );
        // alg=none, hand-made: refused.
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"alg":"none","typ":"JWT"}"#
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                good.to_string()
            )
        );
        assert!(a.verify(&none).is_err());
    }

    fn json(exp: u64) -> Value {
        serde_json::json!({
            "sub": "alice", "exp": exp, "aud": "chat",
            "iss": "https://auth.example", "role": "admin"
        })
    }

    #[test]
    fn short_secrets_and_bad_files_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), "tooshort\n").unwrap();
        let raw = RawAuth {
            jwt_hs256_secret_file: Some("short".into()),
            ..Default::default()
        };
        let (key, msg) = Auth::load(&raw, dir.path()).unwrap_err();
        assert_eq!(key, "auth.jwt_hs256_secret_file");
        assert!(msg.contains("8-byte secret"), "{msg}");
        let (key, _) = Auth::load(&RawAuth::default(), dir.path()).unwrap_err();
        assert_eq!(key, "auth");
        let raw = RawAuth {
            jwt_rs256_public_key_file: Some("missing.pem".into()),
            ..Default::default()
        };
        let (key, msg) = Auth::load(&raw, dir.path()).unwrap_err();
        assert_eq!(key, "auth.jwt_rs256_public_key_file");
        assert!(msg.contains("cannot read"), "{msg}");
    }

    #[test]
    fn expiry_is_watched_and_a_refresh_for_the_same_sub_extends_it() {
        let (_d, a) = hs_auth(|r| r.leeway = Some("0s".into()));
        let v = a
            .verify(&token(
                serde_json::json!({"sub": "alice", "exp": unix() + 2}),
                SECRET,
            ))
            .unwrap();
        let open = Expiries::default();
        open.admit(7, &v);
        let left = a.time_left(&open, 7).unwrap();
        assert!(
            left <= Duration::from_secs(2) && left > Duration::ZERO,
            "{left:?}"
        );
        let later = unix() + 3600;
        let fresh = token(serde_json::json!({"sub": "alice", "exp": later}), SECRET);
        let reply = a.refresh(
            &open,
            7,
            &format!("{{\"wshd\":\"refresh\",\"token\":\"{fresh}\"}}"),
        );
        assert_eq!(reply, format!("{{\"exp\":{later},\"wshd\":\"refreshed\"}}"));
        assert!(a.time_left(&open, 7).unwrap() > Duration::from_secs(3000));
        let other = token(
            serde_json::json!({"sub": "mallory", "exp": later + 10}),
            SECRET,
        );
        let reply = a.refresh(
            &open,
            7,
            &format!("{{\"wshd\":\"refresh\",\"token\":\"{other}\"}}"),
        );
        assert!(reply.contains("another sub"), "{reply}");
        assert!(
            a.refresh(&open, 7, "{\"wshd\":\"refresh\"")
                .contains("refresh_failed")
        );
        open.forget(7);
        assert_eq!(a.time_left(&open, 7), None);
        assert!(open.is_empty());
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query_and_never_reach_logs() {
        let mut h = http::HeaderMap::new();
        assert_eq!(
            token_of(&h, Some("room=a&token=abc%2Ed")),
            Some("abc.d".into())
        );
        h.insert(http::header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(token_of(&h, Some("token=abc")), Some("xyz".into()));
        assert_eq!(redact_query("room=a&token=abc&x=1"), "room=a&x=1");
        assert_eq!(
            redact_target("/chat?token=abc&room=a"),
            "/chat?token=REDACTED&room=a"
        );
        assert_eq!(redact_target("/chat"), "/chat");
    }
}
