//! The admin HTTP API: arbitrary requests to the real router over a real broker and store.
//!
//! The first input byte picks the method (GET, POST, PUT, DELETE); the rest up to the first
//! newline is the path and query, the remainder the body, sent as `application/json`.
//! Inputs whose path is no valid URI are skipped. The router is `sluice_admin::router`,
//! called in this process without a socket; its broker starts with the topics `t` (normal,
//! 4 queues) and `f` (FIFO), the group `g` and a few messages, and keeps what earlier
//! inputs changed.
//!
//! What must hold, whatever the request: no panic anywhere in the process, an answer within
//! 5 s, never a 5xx (bad input is the client's error: 4xx with a stable code), and an
//! answer body that is JSON (for `/api/v1/…`) or text.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use sluice_broker::messaging::{Message, Messaging};
use sluice_broker::meta::MessageType;
use tower::ServiceExt;

struct Env {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        sluice_fuzz::abort_on_panic();
        let dir = sluice_fuzz::scratch_dir("sluice-fuzz-admin");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let broker = sluice_fuzz::scratch_broker(&dir);
        broker
            .create_topic("t", MessageType::Normal, 4)
            .expect("topic");
        broker
            .create_topic("f", MessageType::Fifo, 2)
            .expect("topic");
        broker
            .create_group("g", false, Some(2), None, None)
            .expect("group");
        rt.block_on(async {
            let msgs = (0..4)
                .map(|i| Message {
                    topic: "t".into(),
                    message_id: format!("01FUZZADMIN{i:017}"),
                    keys: vec!["k".into()],
                    body: Bytes::from_static(b"{\"a\":1}"),
                    message_type: Some(MessageType::Normal),
                    born_timestamp_ms: 1,
                    ..Message::default()
                })
                .collect();
            for r in broker.send(msgs).await {
                r.expect("send");
            }
        });
        let router = sluice_admin::router(
            broker,
            sluice_admin::BrokerInfo {
                version: "fuzz".into(),
                started_at: SystemTime::now(),
                flush_policy: "async".into(),
                data_dir: dir,
            },
        );
        Env { rt, router }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "POST", "PUT", "DELETE"][m as usize % 4];
    let (path, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let Ok(req) = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let env = env();
    let router = env.router.clone();
    let answer = env.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async move {
            let resp = router.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let api = path.starts_with("/api/");
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, api, bytes)
        })
        .await
    });
    let Ok((status, api, bytes)) = answer else {
        panic!("no answer within 5 s to {method} {path}");
    };
    assert!(
        !status.is_server_error(),
        "{method} {path} gave {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if api && !bytes.is_empty() {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "{method} {path} answered {status} with no JSON: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
});
