//! The Sluice admin HTTP API: topics, consumer groups, offsets, dead letters, message
//! look-up, broker status and health probes, as JSON over HTTP/1.1.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 `ready` while the broker serves; 503 when shutting down or fenced |
//! | `GET /api/v1/broker` | version, uptime, flush policy, data dir, disk usage |
//! | `GET, POST /api/v1/topics` | list, create (201) |
//! | `GET, PUT, DELETE /api/v1/topics/{name}` | describe with per-queue offsets, update, delete (204) |
//! | `GET /api/v1/topics/{name}/messages` | `?key=K[&begin_ms&end_ms]` or `?queue=Q[&offset=O]`, plus `max`, `preview_bytes` |
//! | `GET, POST /api/v1/groups` | list, create (201) |
//! | `GET, PUT, DELETE /api/v1/groups/{name}` | describe with lag and in-flight per queue, update, delete (204) |
//! | `POST /api/v1/groups/{name}/reset-offset` | `{"topic", "timestamp_ms"}` |
//! | `POST /api/v1/groups/{name}/dead-letters/resend` | `{"max"?}` |
//! | `GET /api/v1/messages/{id}` | one message by id |
//!
//! Errors are `{"error": {"code": "TOPIC_NOT_FOUND", "message": "..."}}` with a 4xx status
//! for anything the caller can fix (see [`ApiError`]). Request bodies must be JSON with
//! `Content-Type: application/json`, at most 1 MiB, and may not carry unknown fields.
//!
//! With a token configured ([`AdminOptions::token`]), every `/api/` request must carry
//! `Authorization: Bearer <token>`, otherwise 401 `UNAUTHORIZED`; the probes and
//! `/metrics` stay open for load balancers and scrapers. At most [`MAX_CONNECTIONS`]
//! connections are served at once (the API shares the broker's file descriptors), and one
//! with no byte either way for [`IDLE_TIMEOUT`] is closed.
//!
//! *Architecture invariant*: talks to the broker's admin methods only; it never opens store
//! files. The wire types live in [`api`] so the CLI parses exactly what the server writes.

pub mod api;
mod error;
mod handlers;
mod listener;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use sluice_broker::Broker;

pub use error::ApiError;
pub use listener::{IDLE_TIMEOUT, MAX_CONNECTIONS};

/// What the status endpoint reports about the running process.
#[derive(Debug, Clone)]
pub struct BrokerInfo {
    pub version: String,
    pub started_at: SystemTime,
    /// `sync` or `async`.
    pub flush_policy: String,
    pub data_dir: PathBuf,
}

/// Settings of the admin API.
#[derive(Clone, Default)]
pub struct AdminOptions {
    /// Bearer token that `/api/` requests must carry; `None`: open.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("AdminOptions")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    broker: Arc<Broker>,
    info: Arc<BrokerInfo>,
    /// False once shutdown began, so `/readyz` takes the broker out of rotation.
    serving: Arc<AtomicBool>,
}

/// The admin API as a router, for tests and for embedding.
pub fn router(broker: Arc<Broker>, info: BrokerInfo) -> Router {
    router_with(broker, info, AdminOptions::default())
}

/// [`router`] with settings.
pub fn router_with(broker: Arc<Broker>, info: BrokerInfo, options: AdminOptions) -> Router {
    build(
        AppState {
            broker,
            info: Arc::new(info),
            serving: Arc::new(AtomicBool::new(true)),
        },
        options,
    )
}

/// Refuses `/api/` requests without the configured bearer token.
async fn require_token(
    token: Arc<str>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.uri().path().starts_with("/api/") {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| ct_eq(g.as_bytes(), token.as_bytes())) {
            let mut r = ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "this admin API needs `Authorization: Bearer <token>` ([server] admin_token)",
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(req).await
}

/// Equality whose time depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn build(state: AppState, options: AdminOptions) -> Router {
    use handlers as h;
    let router = Router::new()
        .route("/healthz", get(h::healthz))
        .route("/readyz", get(h::readyz))
        .route("/metrics", get(h::metrics))
        .route("/api/v1/broker", get(h::broker_status))
        .route("/api/v1/topics", get(h::list_topics).post(h::create_topic))
        .route(
            "/api/v1/topics/{name}",
            get(h::describe_topic)
                .put(h::update_topic)
                .delete(h::delete_topic),
        )
        .route("/api/v1/topics/{name}/messages", get(h::topic_messages))
        .route("/api/v1/groups", get(h::list_groups).post(h::create_group))
        .route(
            "/api/v1/groups/{name}",
            get(h::describe_group)
                .put(h::update_group)
                .delete(h::delete_group),
        )
        .route("/api/v1/groups/{name}/reset-offset", post(h::reset_offset))
        .route(
            "/api/v1/groups/{name}/dead-letters/resend",
            post(h::resend_dead_letters),
        )
        .route("/api/v1/messages/{id}", get(h::message_by_id))
        .fallback(h::route_not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(DefaultBodyLimit::max(api::MAX_REQUEST_BODY))
        .with_state(state);
    match options.token {
        Some(t) => {
            let t: Arc<str> = t.into();
            router.layer(axum::middleware::from_fn(move |req, next| {
                require_token(t.clone(), req, next)
            }))
        }
        None => router,
    }
}

/// Serves the admin API on `listener` until `shutdown` resolves, then stops accepting,
/// reports not-ready, and finishes the requests in flight. At most [`MAX_CONNECTIONS`]
/// connections are open at once; further ones wait in the listen backlog.
pub async fn run(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    info: BrokerInfo,
    options: AdminOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let serving = Arc::new(AtomicBool::new(true));
    let app = build(
        AppState {
            broker,
            info: Arc::new(info),
            serving: serving.clone(),
        },
        options,
    );
    run_limited(
        listener,
        app,
        serving,
        (MAX_CONNECTIONS, listener::IDLE_TIMEOUT),
        shutdown,
    )
    .await
}

/// [`run`] with (connection cap, idle timeout) of its own (tests use small ones).
async fn run_limited(
    listener: tokio::net::TcpListener,
    app: Router,
    serving: Arc<AtomicBool>,
    (max_connections, idle): (usize, std::time::Duration),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener::Limited::new(listener, max_connections, idle), app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            serving.store(false, Ordering::Release);
        })
        .await
}

#[cfg(test)]
mod tests;
