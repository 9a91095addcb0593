//! The admin API over a real broker and store in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use sluice_broker::{Broker, BrokerConfig, Message, Messaging};
use sluice_common::SystemClock;
use sluice_store::{Store, StoreConfig};
use tower::ServiceExt;

use super::*;

struct Env {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    app: Router,
}

fn info(dir: &std::path::Path) -> BrokerInfo {
    BrokerInfo {
        version: "9.9.9-test".into(),
        started_at: SystemTime::now(),
        flush_policy: "sync".into(),
        data_dir: dir.to_path_buf(),
    }
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(StoreConfig::small(dir.path())).expect("store"));
    let broker =
        Broker::open(BrokerConfig::new(dir.path()), store, Arc::new(SystemClock)).expect("broker");
    let app = router(broker.clone(), info(dir.path()));
    Env {
        _dir: dir,
        broker,
        app,
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
    json: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

async fn send(app: &Router, method: Method, uri: &str, body: Option<&str>) -> Reply {
    let mut b = Request::builder().method(method).uri(uri);
    if body.is_some() {
        b = b.header(header::CONTENT_TYPE, "application/json");
    }
    let req = b
        .body(body.map(|s| Body::from(s.to_owned())).unwrap_or_default())
        .expect("request");
    raw(app, req).await
}

async fn raw(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        text,
        json,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri, None).await
}

async fn post(app: &Router, uri: &str, body: &str) -> Reply {
    send(app, Method::POST, uri, Some(body)).await
}

async fn put(app: &Router, uri: &str, body: &str) -> Reply {
    send(app, Method::PUT, uri, Some(body)).await
}

async fn delete(app: &Router, uri: &str) -> Reply {
    send(app, Method::DELETE, uri, None).await
}

#[tokio::test]
async fn health_and_status() {
    let e = env();
    let r = get(&e.app, "/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok"));
    let r = get(&e.app, "/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&e.app, "/api/v1/broker").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let s: api::BrokerStatus = serde_json::from_value(r.json).expect("status shape");
    assert_eq!(s.version, "9.9.9-test");
    assert_eq!(s.flush_policy, "sync");
    assert_eq!(s.name, "sluice-0");
    assert!(s.fenced.is_none());
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text() {
    let e = env();
    let r = post(
        &e.app,
        "/api/v1/topics",
        r#"{"name":"m","type":"normal","queues":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = post(&e.app, "/api/v1/groups", r#"{"name":"mg"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = get(&e.app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    for name in [
        "# TYPE sluice_store_append_seconds histogram",
        "# TYPE sluice_store_fsync_seconds histogram",
        "# TYPE sluice_store_checkpoint_seconds histogram",
        "sluice_store_queue_files_evicted_total",
        "sluice_store_disk_bytes",
        "sluice_store_disk_free_bytes",
        "sluice_broker_pending_transactions 0",
        "sluice_broker_pending_timers 0",
    ] {
        assert!(r.text.contains(name), "missing {name}:\n{}", r.text);
    } // Every exposed metric is documented (proxy metrics are checked by name: the proxy
    // is not part of this test's process).
    let doc = include_str!("../../../docs/metrics.md");
    let exposed = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| !n.starts_with("sluice_test_"));
    for name in exposed.chain([
        "sluice_grpc_requests_total",
        "sluice_grpc_request_seconds",
        "sluice_proxy_connections_open",
    ]) {
        assert!(
            doc.contains(&format!("| `{name}` |")),
            "{name} is not documented in docs/metrics.md"
        );
    }
}

#[tokio::test]
async fn topic_lifecycle() {
    let e = env();
    let r = post(
        &e.app,
        "/api/v1/topics",
        r#"{"name":"orders","type":"fifo","queues":4}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["name"], "orders");
    assert_eq!(r.json["type"], "fifo");
    assert_eq!(r.json["queues"], 4);
    assert_eq!(
        r.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/api/v1/topics/orders")
    );

    // Default type and queue count.
    let r = post(&e.app, "/api/v1/topics", r#"{"name":"plain"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        (r.json["type"].as_str(), r.json["queues"].as_u64()),
        (Some("normal"), Some(8))
    );

    let r = post(
        &e.app,
        "/api/v1/topics",
        r#"{"name":"orders","type":"normal"}"#,
    )
    .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "TOPIC_EXISTS"));

    let r = get(&e.app, "/api/v1/topics").await;
    let list: api::TopicList = serde_json::from_value(r.json).expect("list shape");
    let names: Vec<&str> = list.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["orders", "plain"]);

    let r = get(&e.app, "/api/v1/topics/orders").await;
    assert_eq!(r.status, StatusCode::OK);
    let d: api::TopicDetail = serde_json::from_value(r.json).expect("detail shape");
    assert_eq!(d.topic.queues, 4);
    assert_eq!(d.queue_status.len(), 4);
    assert_eq!(d.stored_messages, 0);

    let r = put(&e.app, "/api/v1/topics/orders", r#"{"queues":6}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        (r.json["queues"].as_u64(), r.json["type"].as_str()),
        (Some(6), Some("fifo"))
    );
    let r = put(&e.app, "/api/v1/topics/orders", r#"{"queues":2}"#).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "BAD_REQUEST")
    );
    let r = put(&e.app, "/api/v1/topics/orders", r#"{}"#).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "EMPTY_UPDATE")
    );
    let r = put(&e.app, "/api/v1/topics/nope", r#"{"queues":9}"#).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
    );

    let r = delete(&e.app, "/api/v1/topics/orders").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = get(&e.app, "/api/v1/topics/orders").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("orders"))
    );
    let r = delete(&e.app, "/api/v1/topics/orders").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
    );
}

#[tokio::test]
async fn bad_requests_are_4xx_with_codes() {
    let e = env();
    let cases: &[(&str, u16, &str)] = &[
        (
            r#"{"name":"t","type":"normal","colour":"red"}"#,
            400,
            "INVALID_REQUEST",
        ),
        (r#"{"name":"t","type":"normal""#, 400, "INVALID_JSON"),
        ("not json", 400, "INVALID_JSON"),
        (r#"{"name":"t","type":"sometimes"}"#, 400, "INVALID_REQUEST"),
        (r#"{"name":"t","queues":-1}"#, 400, "INVALID_REQUEST"),
        (r#"{"type":"normal"}"#, 400, "INVALID_REQUEST"),
        (r#"{"name":"a/b"}"#, 400, "INVALID_TOPIC_NAME"),
        (r#"{"name":"%sys"}"#, 400, "INVALID_TOPIC_NAME"),
        (r#"{"name":""}"#, 400, "INVALID_TOPIC_NAME"),
        (r#"{"name":"t","queues":0}"#, 400, "BAD_REQUEST"),
        (r#"{"name":"t","queues":100000}"#, 400, "BAD_REQUEST"),
        ("[1,2]", 400, "INVALID_REQUEST"),
    ];
    for (body, status, code) in cases {
        let r = post(&e.app, "/api/v1/topics", body).await;
        assert_eq!(r.status.as_u16(), *status, "{body}: {}", r.text);
        assert_eq!(r.code(), *code, "{body}: {}", r.text);
    }
    // The unknown field is named.
    let r = post(&e.app, "/api/v1/topics", r#"{"name":"t","colour":"red"}"#).await;
    assert!(r.text.contains("colour"), "{}", r.text);

    // Not JSON by content type.
    let req = Request::post("/api/v1/topics")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"name":"t"}"#))
        .expect("request");
    let r = raw(&e.app, req).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
    );

    // Bodies over 1 MiB.
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(api::MAX_REQUEST_BODY));
    let r = post(&e.app, "/api/v1/topics", &big).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE")
    );

    let r = get(&e.app, "/api/v1/nothing-here").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "ROUTE_NOT_FOUND")
    );
    let r = send(&e.app, Method::PATCH, "/api/v1/topics", Some("{}")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
    );

    assert!(
        e.broker.topics().is_empty(),
        "no rejected request created a topic"
    );
}

#[tokio::test]
async fn group_lifecycle() {
    let e = env();
    let r = post(
        &e.app,
        "/api/v1/groups",
        r#"{"name":"billing","fifo":true,"max_attempts":5,
            "backoff":{"initial_ms":100,"max_ms":1000,"multiplier":3.0},"start":"earliest"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let g: api::Group = serde_json::from_value(r.json).expect("group shape");
    assert!(g.fifo);
    assert_eq!(g.max_attempts, 5);
    assert_eq!(g.start, api::Start::Earliest);
    assert_eq!(g.backoff.initial_ms, 100);
    assert_eq!(g.dead_letter_topic, "%DLQ%billing");

    let r = post(&e.app, "/api/v1/groups", r#"{"name":"plain"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        (r.json["fifo"].as_bool(), r.json["start"].as_str()),
        (Some(false), Some("latest"))
    );

    let r = post(&e.app, "/api/v1/groups", r#"{"name":"billing"}"#).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "GROUP_EXISTS"));
    for (body, code) in [
        (r#"{"name":"g","max_attempts":0}"#, "BAD_REQUEST"),
        (r#"{"name":"g","start":"soon"}"#, "INVALID_REQUEST"),
        (
            r#"{"name":"g","start":{"timestamp_ms":-5}}"#,
            "INVALID_START",
        ),
        (
            r#"{"name":"g","backoff":{"initial_ms":0,"max_ms":1,"multiplier":2}}"#,
            "INVALID_BACKOFF",
        ),
        (
            r#"{"name":"g","backoff":{"initial_ms":1,"max_ms":1}}"#,
            "INVALID_REQUEST",
        ),
        (r#"{"name":"g g"}"#, "INVALID_GROUP_NAME"),
        (r#"{"name":"g","fifo":"yes"}"#, "INVALID_REQUEST"),
    ] {
        let r = post(&e.app, "/api/v1/groups", body).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, code),
            "{body}: {}",
            r.text
        );
    }
    let r = post(&e.app, "/api/v1/groups", r#"{"name":"g","start":"soon"}"#).await;
    assert!(
        r.text.contains("earliest"),
        "explains the accepted forms: {}",
        r.text
    );

    let r = get(&e.app, "/api/v1/groups").await;
    let list: api::GroupList = serde_json::from_value(r.json).expect("list shape");
    assert_eq!(list.groups.len(), 2);

    let r = get(&e.app, "/api/v1/groups/billing").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let d: api::GroupDetail = serde_json::from_value(r.json).expect("detail shape");
    assert_eq!((d.total_lag, d.total_inflight, d.queues.len()), (0, 0, 0));

    let r = put(
        &e.app,
        "/api/v1/groups/billing",
        r#"{"max_attempts":9,"start":{"timestamp_ms":1700000000000}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g: api::Group = serde_json::from_value(r.json).expect("group shape");
    assert_eq!(
        (g.max_attempts, g.start, g.fifo),
        (9, api::Start::Timestamp(1_700_000_000_000), true)
    );
    let r = put(&e.app, "/api/v1/groups/nope", r#"{"fifo":true}"#).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND")
    );

    let r = delete(&e.app, "/api/v1/groups/billing").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = get(&e.app, "/api/v1/groups/billing").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND")
    );
    let r = delete(&e.app, "/api/v1/groups/billing").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND")
    );
}

fn message(topic: &str, id: &str, key: &str, body: &str) -> Message {
    Message {
        topic: topic.into(),
        message_id: id.into(),
        keys: vec![key.into()],
        body: body.as_bytes().to_vec().into(),
        born_timestamp_ms: 1,
        born_host: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn offsets_dead_letters_and_messages() {
    let e = env();
    post(&e.app, "/api/v1/topics", r#"{"name":"t","queues":2}"#).await;
    post(&e.app, "/api/v1/groups", r#"{"name":"g"}"#).await;
    let mut msgs = vec![message("t", "ID-1", "k1", "héllo wörld")];
    msgs[0].queue_id = Some(1);
    msgs.push(message("t", "ID-2", "k2", "second"));
    msgs[1].queue_id = Some(1);
    for r in e.broker.send(msgs).await {
        r.expect("sent");
    }

    let r = post(
        &e.app,
        "/api/v1/groups/g/reset-offset",
        r#"{"topic":"t","timestamp_ms":0}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let res: api::ResetOffsetResult = serde_json::from_value(r.json).expect("reset shape");
    assert_eq!(res.queues.len(), 2);
    let r = post(
        &e.app,
        "/api/v1/groups/g/reset-offset",
        r#"{"topic":"nope","timestamp_ms":0}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
    );
    let r = post(
        &e.app,
        "/api/v1/groups/nope/reset-offset",
        r#"{"topic":"t","timestamp_ms":0}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND")
    );
    let r = post(&e.app, "/api/v1/groups/g/reset-offset", r#"{"topic":"t"}"#).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "INVALID_REQUEST")
    );

    let r = post(&e.app, "/api/v1/groups/g/dead-letters/resend", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["resent"], 0);
    let r = post(
        &e.app,
        "/api/v1/groups/g/dead-letters/resend",
        r#"{"max":0}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "INVALID_MAX")
    );
    let r = post(&e.app, "/api/v1/groups/nope/dead-letters/resend", "{}").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND")
    );

    let r = get(&e.app, "/api/v1/messages/ID-1?preview_bytes=2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let m: api::StoredMessage = serde_json::from_value(r.json).expect("message shape");
    assert_eq!((m.topic.as_str(), m.queue_id, m.queue_offset), ("t", 1, 0));
    assert_eq!(m.body_size, "héllo wörld".len());
    assert_eq!((m.body_preview.as_str(), m.body_truncated), ("h", true));
    let r = get(&e.app, "/api/v1/messages/ID-404").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "MESSAGE_NOT_FOUND")
    );

    let r = get(&e.app, "/api/v1/topics/t/messages?key=k2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let l: api::MessageList = serde_json::from_value(r.json).expect("list shape");
    assert_eq!(l.messages.len(), 1);
    assert_eq!(
        (
            l.messages[0].body_preview.as_str(),
            l.messages[0].body_truncated
        ),
        ("second", false)
    );

    let r = get(&e.app, "/api/v1/topics/t/messages?queue=1&offset=1").await;
    let l: api::MessageList = serde_json::from_value(r.json).expect("list shape");
    let ids: Vec<&str> = l.messages.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["ID-2"]);
    let r = get(&e.app, "/api/v1/topics/t/messages?queue=1&max=1").await;
    let l: api::MessageList = serde_json::from_value(r.json).expect("list shape");
    assert_eq!(l.messages.len(), 1);
    assert_eq!(l.messages[0].message_id, "ID-1");

    for (q, code) in [
        ("", "INVALID_QUERY"),
        ("?key=a&queue=0", "INVALID_QUERY"),
        ("?queue=2", "INVALID_QUEUE"),
        ("?queue=x", "INVALID_QUERY"),
        ("?queue=0&kee=1", "INVALID_QUERY"),
        ("?key=a&offset=3", "INVALID_QUERY"),
        ("?key=a&max=0", "INVALID_QUERY"),
        ("?key=a&preview_bytes=99999999", "INVALID_QUERY"),
    ] {
        let r = get(&e.app, &format!("/api/v1/topics/t/messages{q}")).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, code),
            "{q}: {}",
            r.text
        );
    }
    let r = get(&e.app, "/api/v1/topics/nope/messages?queue=0").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
    );

    let r = get(&e.app, "/api/v1/topics/t").await;
    assert_eq!(r.json["stored_messages"], 2);
}

/// `run` over a real socket: serves, then drains and returns when shutdown fires.
#[tokio::test]
async fn serves_on_a_socket_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(StoreConfig::small(dir.path())).expect("store"));
    let broker =
        Broker::open(BrokerConfig::new(dir.path()), store, Arc::new(SystemClock)).expect("broker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(
        listener,
        broker,
        info(dir.path()),
        Default::default(),
        async move {
            let _ = stopped.await;
        },
    ));

    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    conn.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("ready"), "{out}");

    stop.send(()).expect("server alive");
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("shut down in time")
        .expect("task");
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn a_token_guards_the_api_but_not_the_probes() {
    let e = env();
    let app = router_with(
        e.broker.clone(),
        info(e._dir.path()),
        AdminOptions {
            token: Some("t0ken".into()),
        },
    );
    assert!(
        !format!(
            "{:?}",
            AdminOptions {
                token: Some("t0ken".into())
            }
        )
        .contains("t0ken")
    );
    let with = |auth: Option<&str>, method: Method, uri: &str, body: Option<&str>| {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(body.map(|s| Body::from(s.to_owned())).unwrap_or_default())
            .expect("request")
    };
    let create = r#"{"name":"guarded","type":"normal","queues":1}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("t0ken"),
        Some("Basic t0ken"),
        Some("Bearer t0ken2"),
    ] {
        let r = raw(
            &app,
            with(auth, Method::POST, "/api/v1/topics", Some(create)),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}: {}", r.text);
        assert_eq!(r.code(), "UNAUTHORIZED");
        assert_eq!(
            r.headers
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        let r = raw(&app, with(auth, Method::GET, "/api/v1/topics", None)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert!(e.broker.topics().iter().all(|t| t.name != "guarded"));
    let r = raw(
        &app,
        with(
            Some("Bearer t0ken"),
            Method::POST,
            "/api/v1/topics",
            Some(create),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = raw(
        &app,
        with(
            Some("Bearer t0ken"),
            Method::GET,
            "/api/v1/topics/guarded",
            None,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for open in ["/healthz", "/readyz", "/metrics"] {
        let r = raw(&app, with(None, Method::GET, open, None)).await;
        assert_eq!(r.status, StatusCode::OK, "{open}");
    }
}

/// Beyond the connection cap nothing more is accepted (the broker's file descriptors are
/// not the admin API's to use up); a connection waiting in the backlog is served as soon
/// as another closes.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let e = env();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serving = Arc::new(AtomicBool::new(true));
    let _server = tokio::spawn(run_limited(
        listener,
        e.app.clone(),
        serving,
        (2, Duration::from_secs(60)),
        std::future::pending(),
    ));
    let idle1 = tokio::net::TcpStream::connect(addr).await?;
    let _idle2 = tokio::net::TcpStream::connect(addr).await?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    let early =
        tokio::time::timeout(Duration::from_millis(300), conn.read_to_string(&mut out)).await;
    anyhow::ensure!(early.is_err(), "answered beyond the cap: {out}");
    drop(idle1);
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out)).await??;
    anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(())
}

/// A connection that sends nothing (or stops halfway through a request) is closed once it
/// has been idle for the timeout, and gives its slot back.
#[tokio::test]
async fn idle_connections_are_closed() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let e = env();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let _server = tokio::spawn(run_limited(
        listener,
        e.app.clone(),
        Arc::new(AtomicBool::new(true)),
        (1, Duration::from_millis(300)),
        std::future::pending(),
    ));
    let t = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(addr).await?;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo").await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out)).await??;
    anyhow::ensure!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Its slot (the only one) serves the next client.
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out)).await??;
    anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(())
}
