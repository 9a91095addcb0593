//! `docs/openapi.json` describes exactly the routes of the admin router: every route the
//! router declares (read from `src/lib.rs`) is in the spec with the same methods, every
//! operation of the spec is served (not the router's "no such route" or "method not
//! allowed" fallbacks), and every other method on a spec path is refused with 405.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use sluice_admin::{BrokerInfo, router};
use sluice_broker::{Broker, BrokerConfig};
use sluice_common::SystemClock;
use sluice_store::{Store, StoreConfig};
use tower::ServiceExt;

const SPEC: &str = include_str!("../../../docs/openapi.json");
const ROUTER_SOURCE: &str = include_str!("../src/lib.rs");
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

type Routes = BTreeMap<String, BTreeSet<String>>;

fn spec_routes(spec: &Value) -> Routes {
    let paths = spec["paths"].as_object().expect("paths object");
    paths
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .expect("path item object")
                .keys()
                .filter(|k| {
                    [
                        "get", "put", "post", "delete", "patch", "head", "options", "trace",
                    ]
                    .contains(&k.as_str())
                })
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// The `.route("path", get(..).post(..))` calls of the router, read from its source.
fn source_routes(src: &str) -> Routes {
    let mut out = Routes::new();
    let mut rest = src;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let open = rest.find('"').expect("route path literal");
        let close = open + 1 + rest[open + 1..].find('"').expect("end of path literal");
        let path = rest[open + 1..close].to_owned();
        // The method router: up to the parenthesis closing `.route(`.
        let mut depth = 1usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[close..end];
        let mut methods = BTreeSet::new();
        for m in METHODS {
            let needle = format!("{m}(");
            let mut from = 0;
            while let Some(i) = call[from..].find(&needle) {
                let pos = from + i;
                let before = call[..pos].chars().next_back();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    methods.insert(m.to_owned());
                }
                from = pos + needle.len();
            }
        }
        assert!(!methods.is_empty(), "no method found for route {path}");
        out.insert(path, methods);
        rest = &rest[end..];
    }
    out
}

#[test]
fn the_spec_lists_exactly_the_routes_of_the_router() {
    let spec: Value = serde_json::from_str(SPEC).expect("docs/openapi.json is valid JSON");
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let from_source = source_routes(ROUTER_SOURCE);
    assert!(from_source.len() >= 10, "parsed routes: {from_source:?}");
    assert_eq!(spec_routes(&spec), from_source);
}

#[test]
fn every_schema_reference_resolves() {
    let spec: Value = serde_json::from_str(SPEC).expect("valid JSON");
    fn walk(v: &Value, spec: &Value, n: &mut usize) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let ptr = r.strip_prefix('#').expect("local reference");
                    assert!(spec.pointer(ptr).is_some(), "dangling {r}");
                    *n += 1;
                }
                m.values().for_each(|v| walk(v, spec, n));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, spec, n)),
            _ => {}
        }
    }
    let mut refs = 0;
    walk(&spec, &spec, &mut refs);
    assert!(refs > 20);
}

#[tokio::test]
async fn every_spec_operation_is_served_and_others_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(StoreConfig::small(dir.path())).expect("store"));
    let broker =
        Broker::open(BrokerConfig::new(dir.path()), store, Arc::new(SystemClock)).expect("broker");
    let app = router(
        broker,
        BrokerInfo {
            version: "test".into(),
            started_at: SystemTime::now(),
            flush_policy: "sync".into(),
            data_dir: dir.path().to_path_buf(),
        },
    );
    let spec: Value = serde_json::from_str(SPEC).expect("valid JSON");
    let call = |method: &str, uri: String| {
        let app = app.clone();
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method");
        async move {
            let mut b = Request::builder().method(method.clone()).uri(uri);
            let body = if method == Method::POST || method == Method::PUT {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from("{}")
            } else {
                Body::empty()
            };
            let resp = app
                .oneshot(b.body(body).expect("request"))
                .await
                .expect("infallible");
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            let code = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            (status, code)
        }
    };
    for (path, methods) in spec_routes(&spec) {
        let uri = path
            .replace("{name}", "no-such-thing")
            .replace("{id}", "NOSUCHID");
        for m in &methods {
            let (status, code) = call(m, uri.clone()).await;
            assert!(
                code != "ROUTE_NOT_FOUND" && status != StatusCode::METHOD_NOT_ALLOWED,
                "{m} {uri}: {status} {code}"
            );
        }
        for m in METHODS.iter().filter(|m| !methods.contains(**m)) {
            let (status, code) = call(m, uri.clone()).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}: {code}");
        }
    }
    let (status, code) = call("get", "/api/v1/nothing-here".into()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ROUTE_NOT_FOUND")
    );
}
