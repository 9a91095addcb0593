//! Namespaces: a client configured with namespace `prod` that names topic `orders` means
//! the broker's topic `prod%orders` (RocketMQ's spelling of a namespaced resource, so
//! names and admin tooling carry over). The system topics keep their prefix in front:
//! the dead-letter topic of group `g` in `prod` is `%DLQ%prod%g`.
//!
//! Clients carry the namespace in two places and not consistently: the `x-mq-namespace`
//! header and `Resource.resource_namespace`. The header wins when it is not empty (the
//! Node.js client sends it but leaves most resources' namespace empty); otherwise the
//! resource's own field counts (the Rust client sends neither, and means no namespace).
//! Everything the access point sends back names resources as the client does: name
//! without the namespace, namespace in `resource_namespace`.

use sluice_broker::BrokerError;
use sluice_proto::v2;

/// Longest namespace accepted; with the separator it leaves most of a resource name's
/// 127 bytes to the name.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// Prefixes of system topics that stay in front of the namespace.
const SYSTEM_PREFIXES: [&str; 2] = ["%DLQ%", "%RETRY%"];

/// Checks a namespace: 1 to 64 ASCII letters, digits, `_` or `-` (no `%`, which separates
/// it from the name).
pub fn check(ns: &str) -> Result<(), BrokerError> {
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(BrokerError::BadRequest(format!(
            "namespace is {} bytes long; at most {MAX_NAMESPACE_LEN} are allowed",
            ns.len()
        )));
    }
    if let Some(c) = ns
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(BrokerError::BadRequest(format!(
            "namespace {ns:?} contains {c:?}; only ASCII letters, digits, '_' and '-' are allowed"
        )));
    }
    Ok(())
}

/// The broker's name of `name` in namespace `ns` (`ns` already checked; empty: none).
pub fn wrap(ns: &str, name: &str) -> String {
    if ns.is_empty() || name.is_empty() {
        return name.to_owned();
    }
    for p in SYSTEM_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return format!("{p}{ns}%{rest}");
        }
    }
    format!("{ns}%{name}")
}

/// The client's name of the broker's `full` name seen from namespace `ns`: the inverse
/// of [`wrap`]. A name outside the namespace is returned whole.
pub fn client_name(ns: &str, full: &str) -> String {
    if ns.is_empty() {
        return full.to_owned();
    }
    let inner = |rest: &str| {
        rest.strip_prefix(ns)
            .and_then(|r| r.strip_prefix('%'))
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
    };
    for p in SYSTEM_PREFIXES {
        if let Some(rest) = full.strip_prefix(p) {
            return inner(rest).map_or_else(|| full.to_owned(), |r| format!("{p}{r}"));
        }
    }
    inner(full).unwrap_or_else(|| full.to_owned())
}

/// The namespace a request's resource is in: the header's if it is set, else the
/// resource's own.
pub fn of<'a>(header: &'a str, r: Option<&'a v2::Resource>) -> &'a str {
    if !header.is_empty() {
        return header;
    }
    r.map(|r| r.resource_namespace.as_str()).unwrap_or("")
}

/// The broker's name of a request's resource.
pub fn resolve(header: &str, r: &Option<v2::Resource>) -> Result<String, BrokerError> {
    let ns = of(header, r.as_ref());
    check(ns)?;
    Ok(wrap(ns, r.as_ref().map(|r| r.name.as_str()).unwrap_or("")))
}

/// [`resolve`] that rewrites the resource itself to the broker's name (and no namespace);
/// without a namespace it is left as it is, with no copy.
pub fn resolve_in_place(header: &str, r: &mut Option<v2::Resource>) -> Result<(), BrokerError> {
    let Some(res) = r.as_mut() else {
        return Ok(());
    };
    let ns = if header.is_empty() {
        std::mem::take(&mut res.resource_namespace)
    } else {
        res.resource_namespace.clear();
        header.to_owned()
    };
    if ns.is_empty() {
        return Ok(());
    }
    check(&ns)?;
    res.name = wrap(&ns, &res.name);
    Ok(())
}

/// A resource as a client in namespace `ns` names the broker's `full`.
pub fn resource(ns: &str, full: &str) -> v2::Resource {
    let name = client_name(ns, full);
    let inside = name != full || ns.is_empty();
    v2::Resource {
        resource_namespace: if inside { ns.to_owned() } else { String::new() },
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(ns: &str, name: &str) -> Option<v2::Resource> {
        Some(v2::Resource {
            resource_namespace: ns.into(),
            name: name.into(),
        })
    }

    #[test]
    fn wraps_like_rocketmq() {
        assert_eq!(wrap("", "orders"), "orders");
        assert_eq!(wrap("prod", "orders"), "prod%orders");
        assert_eq!(wrap("prod", "%DLQ%g"), "%DLQ%prod%g");
        assert_eq!(wrap("prod", "%RETRY%g"), "%RETRY%prod%g");
        assert_eq!(wrap("prod", ""), "");
    }

    #[test]
    fn client_names_invert_wrap() {
        for ns in ["", "prod", "a-b_1"] {
            for name in ["orders", "%DLQ%g", "%RETRY%g", "x%y", "%DLQ%other%g"] {
                let full = wrap(ns, name);
                assert_eq!(client_name(ns, &full), name, "{ns} {name}");
                let r = resource(ns, &full);
                assert_eq!(r.name, name);
                assert_eq!(r.resource_namespace, ns);
            }
        }
        // Names from outside the namespace stay whole and carry no namespace.
        assert_eq!(client_name("prod", "orders"), "orders");
        assert_eq!(client_name("prod", "%DLQ%g"), "%DLQ%g");
        assert_eq!(client_name("prod", "prod%"), "prod%");
        assert_eq!(resource("prod", "orders").resource_namespace, "");
    }

    #[test]
    fn header_wins_over_the_resource() {
        assert_eq!(resolve("", &res("", "t")).ok().as_deref(), Some("t"));
        assert_eq!(
            resolve("", &res("prod", "t")).ok().as_deref(),
            Some("prod%t")
        );
        assert_eq!(
            resolve("prod", &res("", "t")).ok().as_deref(),
            Some("prod%t")
        );
        assert_eq!(
            resolve("prod", &res("dev", "t")).ok().as_deref(),
            Some("prod%t")
        );
        assert_eq!(resolve("prod", &None).ok().as_deref(), Some(""));
    }

    #[test]
    fn in_place_resolution_matches_resolve() {
        for (h, ns, name) in [
            ("", "", "t"),
            ("", "prod", "t"),
            ("prod", "", "t"),
            ("prod", "dev", "%DLQ%g"),
        ] {
            let mut r = res(ns, name);
            let want = resolve(h, &r).ok();
            assert!(resolve_in_place(h, &mut r).is_ok());
            assert_eq!(r.as_ref().map(|r| r.name.clone()), want, "{h} {ns} {name}");
            assert_eq!(r.map(|r| r.resource_namespace), Some(String::new()));
        }
        let mut bad = res("a.b", "t");
        assert!(resolve_in_place("", &mut bad).is_err());
        let mut none = None;
        assert!(resolve_in_place("prod", &mut none).is_ok());
    }

    #[test]
    fn bad_namespaces_are_refused() {
        for bad in ["a%b", "a.b", "a/b", "é", &"n".repeat(65)] {
            assert!(
                matches!(resolve(bad, &res("", "t")), Err(BrokerError::BadRequest(_))),
                "{bad}"
            );
            assert!(resolve("", &res(bad, "t")).is_err(), "{bad}");
        }
        assert!(check(&"n".repeat(64)).is_ok());
    }
}
