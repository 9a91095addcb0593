//! Authentication and permissions of the gRPC access point.
//!
//! Off unless an ACL is configured (`[proxy] acl_file`). With it, every request must carry
//! the RocketMQ 5 signature the official clients send when given an access key and a
//! secret key:
//!
//! ```text
//! authorization: MQv2-HMAC-SHA1 Credential=<access key>[/…], SignedHeaders=x-mq-date-time, Signature=<hex>
//! ```
//!
//! where the signature is HMAC-SHA1 keyed with the secret key over the bytes of the
//! `x-mq-date-time` header as sent (upper- or lower-case hex; the date is not parsed,
//! since some clients send local time marked "Z"). A request without it, with an unknown
//! access key or a wrong signature gets UNAUTHORIZED; one whose user may not use the
//! topic or group gets FORBIDDEN. Nothing else about the request is looked at first.
//!
//! The ACL file (TOML) lists users and the broker names (after namespaces: `prod%orders`)
//! they may publish to, subscribe to and consume as; a pattern is a name, or a prefix
//! followed by `*` (`prod%*`, `*`):
//!
//! ```toml
//! [[users]]
//! access_key = "orders-app"
//! secret_key = "…"
//! publish = ["orders"]
//! subscribe = ["orders", "%DLQ%billing"]
//! groups = ["billing"]
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use sluice_proto::auth::SCHEME;
pub use sluice_proto::auth::authorization as sign;

/// Why an ACL file is refused.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("{0}")]
    Parse(String),
    #[error("user {0:?}: {1}")]
    User(String, String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    access_key: String,
    secret_key: String,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// Resource-name patterns: exact names and prefixes (`prefix*`).
#[derive(Debug, Clone, Default)]
struct Patterns(Vec<String>);

impl Patterns {
    fn new(v: Vec<String>, user: &str, what: &str) -> Result<Patterns, AclError> {
        for p in &v {
            let body = p.strip_suffix('*').unwrap_or(p);
            if body.contains('*') || p.is_empty() {
                return Err(AclError::User(
                    user.into(),
                    format!("{what} pattern {p:?}: `*` may only end a pattern"),
                ));
            }
        }
        Ok(Patterns(v))
    }

    fn allows(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

/// One user of the ACL.
#[derive(Debug)]
pub struct User {
    pub access_key: String,
    secret_key: String,
    publish: Patterns,
    subscribe: Patterns,
    groups: Patterns,
    /// The last date and signature that verified: clients sign a date of whole seconds,
    /// so the requests of one second repeat them and need no new HMAC.
    verified: parking_lot::Mutex<Option<(Vec<u8>, [u8; 20])>>,
}

/// What a request does with a resource (broker names).
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    Publish(&'a str),
    Subscribe(&'a str),
    /// Publish or subscribe (routes).
    Use(&'a str),
    Group(&'a str),
}

impl User {
    /// Whether the user may do `a`; otherwise the reason.
    pub fn check(&self, a: Action<'_>) -> Result<(), String> {
        let (ok, what, name) = match a {
            Action::Publish(t) => (self.publish.allows(t), "publish to topic", t),
            Action::Subscribe(t) => (self.subscribe.allows(t), "subscribe to topic", t),
            Action::Use(t) => (
                self.publish.allows(t) || self.subscribe.allows(t),
                "use topic",
                t,
            ),
            Action::Group(g) => (self.groups.allows(g), "consume as group", g),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "access key {:?} may not {what} {name:?}",
                self.access_key
            ))
        }
    }
}

/// Users by access key.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    users: HashMap<String, Arc<User>>,
}

/// The ACL in force, shared by every connection and replaced whole when its file is
/// reloaded: a request sees either the old users or the new ones, never a mix. A reload
/// drops the users' cached signatures, so the first request of each signs afresh.
#[derive(Debug, Default)]
pub struct SharedAcl {
    current: parking_lot::RwLock<Arc<Acl>>,
}

impl SharedAcl {
    pub fn new(acl: Acl) -> SharedAcl {
        SharedAcl {
            current: parking_lot::RwLock::new(Arc::new(acl)),
        }
    }

    /// The ACL in force now (a snapshot: a later `replace` does not change it).
    pub fn current(&self) -> Arc<Acl> {
        self.current.read().clone()
    }

    /// [`Acl::authenticate`] against the ACL in force, without taking a reference to it
    /// (the per-request path: no reference count shared by every connection to touch).
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        date_time: Option<&[u8]>,
    ) -> Result<Arc<User>, AuthError> {
        self.current.read().authenticate(authorization, date_time)
    }

    /// Puts `acl` in force for every request that starts from now on.
    pub fn replace(&self, acl: Acl) {
        *self.current.write() = Arc::new(acl);
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: no `authorization` header")]
    Missing,
    #[error("malformed `authorization` header: {0}")]
    Malformed(&'static str),
    #[error("unknown access key {0:?}")]
    UnknownKey(String),
    #[error("signature does not match for access key {0:?}")]
    BadSignature(String),
}

impl Acl {
    /// Parses an ACL file (strict: unknown keys and duplicate access keys are errors).
    pub fn from_toml(text: &str) -> Result<Acl, AclError> {
        let f: AclFile = toml::from_str(text).map_err(|e| AclError::Parse(e.to_string()))?;
        let mut users = HashMap::new();
        for u in f.users {
            let k = u.access_key.clone();
            if k.is_empty() || k.contains(['/', ',', ' ']) {
                return Err(AclError::User(
                    k,
                    "access_key must be non-empty, without '/', ',' or spaces".into(),
                ));
            }
            if u.secret_key.is_empty() {
                return Err(AclError::User(k, "secret_key must not be empty".into()));
            }
            let user = User {
                publish: Patterns::new(u.publish, &k, "publish")?,
                subscribe: Patterns::new(u.subscribe, &k, "subscribe")?,
                groups: Patterns::new(u.groups, &k, "groups")?,
                access_key: k.clone(),
                secret_key: u.secret_key,
                verified: parking_lot::Mutex::new(None),
            };
            if users.insert(k.clone(), Arc::new(user)).is_some() {
                return Err(AclError::User(k, "listed twice".into()));
            }
        }
        Ok(Acl { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user a request's `authorization` and `x-mq-date-time` headers prove.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        date_time: Option<&[u8]>,
    ) -> Result<Arc<User>, AuthError> {
        let h = authorization.ok_or(AuthError::Missing)?;
        let h = std::str::from_utf8(h).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let rest = h
            .trim()
            .strip_prefix(SCHEME)
            .ok_or(AuthError::Malformed("the scheme must be MQv2-HMAC-SHA1"))?;
        let (mut credential, mut signature) = (None, None);
        for part in rest.split(',') {
            let Some((k, v)) = part.trim().split_once('=') else {
                continue;
            };
            match k.trim() {
                "Credential" => credential = Some(v.trim()),
                "Signature" => signature = Some(v.trim()),
                _ => {}
            }
        }
        let key = credential
            .map(|c| c.split('/').next().unwrap_or(c))
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Malformed("no access key in Credential"))?;
        let sig = signature
            .and_then(decode_hex)
            .ok_or(AuthError::Malformed("Signature must be hex"))?;
        let user = self
            .users
            .get(key)
            .ok_or_else(|| AuthError::UnknownKey(key.to_owned()))?;
        let date = date_time.ok_or(AuthError::Malformed("no x-mq-date-time header"))?;
        let cached = matches!(&*user.verified.lock(), Some((d, s)) if d == date && ct_eq(s, &sig));
        if !cached {
            if !sluice_proto::auth::verify(user.secret_key.as_bytes(), date, &sig) {
                return Err(AuthError::BadSignature(key.to_owned()));
            }
            *user.verified.lock() = Some((date.to_vec(), sig));
        }
        Ok(user.clone())
    }
}

/// A 20-byte HMAC-SHA1 signature from 40 hex digits of either case.
fn decode_hex(s: &str) -> Option<[u8; 20]> {
    let b = s.as_bytes();
    if b.len() != 40 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 20];
    for (o, p) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = digit(p[0])? << 4 | digit(p[1])?;
    }
    Some(out)
}

/// Equality that takes the same time wherever the bytes differ.
fn ct_eq(a: &[u8; 20], b: &[u8; 20]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACL: &str = r#"
[[users]]
access_key = "app"
secret_key = "s3cret"
publish = ["orders", "prod%*"]
subscribe = ["orders"]
groups = ["billing"]

[[users]]
access_key = "admin"
secret_key = "root"
publish = ["*"]
subscribe = ["*"]
groups = ["*"]
"#;

    fn acl() -> Acl {
        Acl::from_toml(ACL).expect("acl")
    }

    #[test]
    fn signatures_of_the_official_clients_are_accepted() {
        let acl = acl();
        let date = "20261203T101500Z";
        let h = sign("app", "s3cret", date);
        let u = acl.authenticate(Some(h.as_bytes()), Some(date.as_bytes()));
        assert_eq!(u.map(|u| u.access_key.clone()), Ok("app".to_string()));
        // Lower-case hex (Python, Rust) and a credential with a scope after '/'.
        let lower = h.replace("Credential=app", "Credential=app/scope");
        let (head, sig) = lower.rsplit_once('=').expect("sig");
        let lower = format!("{head}={}", sig.to_ascii_lowercase());
        assert!(
            acl.authenticate(Some(lower.as_bytes()), Some(date.as_bytes()))
                .is_ok()
        );
    }

    #[test]
    fn bad_credentials_are_refused_with_the_reason() {
        let acl = acl();
        let date = "20261203T101500Z";
        let good = sign("app", "s3cret", date);
        let auth = |h: &str, d: &str| acl.authenticate(Some(h.as_bytes()), Some(d.as_bytes()));
        assert_eq!(
            acl.authenticate(None, Some(b"x")).err(),
            Some(AuthError::Missing)
        );
        // Python without credentials: an empty Credential.
        assert!(matches!(
            auth(
                "MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, Signature=",
                date
            ),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(
            auth(&sign("nobody", "s3cret", date), date).err(),
            Some(AuthError::UnknownKey("nobody".into()))
        );
        assert_eq!(
            auth(&sign("app", "wrong", date), date).err(),
            Some(AuthError::BadSignature("app".into()))
        );
        // After a success for this date (cached), a wrong signature is still refused.
        assert!(auth(&good, date).is_ok());
        let (head, _) = good.rsplit_once('=').expect("sig");
        let forged = format!("{head}={}", "0".repeat(40));
        assert!(matches!(
            auth(&forged, date),
            Err(AuthError::BadSignature(_))
        ));
        assert!(auth(&good, date).is_ok());
        // The signature covers the date header as sent.
        assert!(matches!(
            auth(&good, "20261203T101501Z"),
            Err(AuthError::BadSignature(_))
        ));
        assert!(matches!(
            auth(&good.replace("MQv2-HMAC-SHA1", "Basic"), date),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            acl.authenticate(Some(good.as_bytes()), None),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            acl.authenticate(Some(&[0xff, 0xfe]), Some(date.as_bytes())),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn permissions_follow_the_patterns() {
        let acl = acl();
        let app = &acl.users["app"];
        assert!(app.check(Action::Publish("orders")).is_ok());
        assert!(app.check(Action::Publish("prod%anything")).is_ok());
        assert!(app.check(Action::Publish("payments")).is_err());
        assert!(app.check(Action::Subscribe("prod%x")).is_err());
        assert!(app.check(Action::Use("prod%x")).is_ok());
        assert!(app.check(Action::Group("billing")).is_ok());
        assert!(app.check(Action::Group("billing2")).is_err());
        let admin = &acl.users["admin"];
        assert!(admin.check(Action::Group("anything")).is_ok());
    }

    #[test]
    fn malformed_acl_files_are_refused() {
        for bad in [
            "[[users]]\naccess_key = \"a\"\n",
            "[[users]]\naccess_key = \"a\"\nsecret_key = \"\"\n",
            "[[users]]\naccess_key = \"\"\nsecret_key = \"s\"\n",
            "[[users]]\naccess_key = \"a\"\nsecret_key = \"s\"\npublish = [\"a*b\"]\n",
            "[[users]]\naccess_key = \"a\"\nsecret_key = \"s\"\ncolour = 1\n",
            "[[users]]\naccess_key = \"a\"\nsecret_key = \"s\"\n[[users]]\naccess_key = \"a\"\nsecret_key = \"t\"\n",
            "users = 3",
        ] {
            assert!(Acl::from_toml(bad).is_err(), "{bad}");
        }
        assert_eq!(Acl::from_toml("").map(|a| a.len()).ok(), Some(0));
    }
}
