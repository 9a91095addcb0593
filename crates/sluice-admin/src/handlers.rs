//! Route handlers: translate JSON requests into broker calls and broker results into the
//! wire types of [`crate::api`].
//!
//! Broker admin calls write metadata with fsync and read the store, so the synchronous ones
//! run on the blocking pool, never on the runtime's worker threads.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_broker::{
    Backoff, GroupConfig, GroupStatus, Messaging, StartPosition, StoredView, TopicConfig,
    TopicStatus,
};

use crate::AppState;
use crate::api::*;
use crate::error::{ApiError, JsonBody, Params, PathParam};

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Runs a synchronous broker call on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("admin task failed: {e}")))?
}

// ------------------------------------------------------------------------------- health

/// Prometheus text exposition of every metric of the process.
pub async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sluice_common::metrics::global().render(),
    )
}

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(st): State<AppState>) -> Result<&'static str> {
    if !st.serving.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            "the broker is shutting down",
        ));
    }
    if let Some(why) = st.broker.store().fenced() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_FENCED",
            format!("the store refuses writes: {why}"),
        ));
    }
    Ok("ready")
}

pub async fn broker_status(State(st): State<AppState>) -> Json<BrokerStatus> {
    let s = st.broker.store().stats();
    let started_at_ms = st
        .info
        .started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let uptime_ms = SystemTime::now()
        .duration_since(st.info.started_at)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Json(BrokerStatus {
        name: st.broker.config().broker_name.clone(),
        version: st.info.version.clone(),
        started_at_ms,
        uptime_ms,
        flush_policy: st.info.flush_policy.clone(),
        data_dir: st.info.data_dir.display().to_string(),
        topics: st.broker.topics().len(),
        groups: st.broker.groups().len(),
        store: StoreUsage {
            disk_bytes: s.disk_bytes,
            min_offset: s.min_offset,
            written_offset: s.written_offset,
            durable_offset: s.durable_offset,
            appended_messages: s.appended_messages,
            appended_bytes: s.appended_bytes,
            fsyncs: s.fsyncs,
            queues: s.queues,
        },
        fenced: st.broker.store().fenced(),
    })
}

// ------------------------------------------------------------------------------- topics

fn topic_view(t: TopicConfig) -> Topic {
    Topic {
        name: t.name,
        message_type: t.message_type,
        queues: t.queues,
        created_at_ms: t.created_at_ms,
    }
}

fn topic_detail(s: TopicStatus) -> TopicDetail {
    let queue_status: Vec<QueueOffsets> = s
        .queue_status
        .into_iter()
        .map(|q| QueueOffsets {
            queue_id: q.queue_id,
            min_offset: q.min_offset,
            max_offset: q.max_offset,
        })
        .collect();
    TopicDetail {
        topic: topic_view(s.config),
        stored_messages: queue_status
            .iter()
            .map(|q| q.max_offset.saturating_sub(q.min_offset))
            .sum(),
        queue_status,
    }
}

fn created(location: String, body: impl IntoResponse) -> Response {
    let mut r = (StatusCode::CREATED, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

pub async fn list_topics(State(st): State<AppState>) -> Json<TopicList> {
    Json(TopicList {
        topics: st.broker.topics().into_iter().map(topic_view).collect(),
    })
}

pub async fn create_topic(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreateTopic>,
) -> Result<Response> {
    let t = blocking(move || {
        Ok(st
            .broker
            .create_topic(&req.name, req.message_type, req.queues)?)
    })
    .await?;
    tracing::info!(topic = %t.name, r#type = t.message_type.as_str(), queues = t.queues, "topic created");
    Ok(created(
        format!("/api/v1/topics/{}", t.name),
        Json(topic_view(t)),
    ))
}

pub async fn describe_topic(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<TopicDetail>> {
    let s = blocking(move || Ok(st.broker.topic_status(&name)?)).await?;
    Ok(Json(topic_detail(s)))
}

pub async fn update_topic(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
    JsonBody(req): JsonBody<UpdateTopic>,
) -> Result<Json<Topic>> {
    if req.message_type.is_none() && req.queues.is_none() {
        return Err(ApiError::bad_request(
            "EMPTY_UPDATE",
            "nothing to update: give \"type\" and/or \"queues\"",
        ));
    }
    let t = blocking(move || {
        Ok(st
            .broker
            .update_topic(&name, req.message_type, req.queues)?)
    })
    .await?;
    tracing::info!(topic = %t.name, r#type = t.message_type.as_str(), queues = t.queues, "topic updated");
    Ok(Json(topic_view(t)))
}

pub async fn delete_topic(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
) -> Result<StatusCode> {
    let n = name.clone();
    blocking(move || Ok(st.broker.delete_topic(&n)?)).await?;
    tracing::info!(topic = %name, "topic deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------------- groups

fn start_to_broker(s: Start) -> StartPosition {
    match s {
        Start::Earliest => StartPosition::Earliest,
        Start::Latest => StartPosition::Latest,
        Start::Timestamp(ms) => StartPosition::Timestamp(ms),
    }
}

fn start_from_broker(s: StartPosition) -> Start {
    match s {
        StartPosition::Earliest => Start::Earliest,
        StartPosition::Latest => Start::Latest,
        StartPosition::Timestamp(ms) => Start::Timestamp(ms),
    }
}

fn group_view(g: GroupConfig) -> Group {
    Group {
        dead_letter_topic: g.dlq_topic(),
        name: g.name,
        fifo: g.fifo,
        max_attempts: g.max_attempts,
        backoff: g.backoff,
        start: start_from_broker(g.start),
        created_at_ms: g.created_at_ms,
    }
}

fn group_detail(s: GroupStatus) -> GroupDetail {
    let queues: Vec<GroupQueue> = s
        .queues
        .into_iter()
        .map(|q| GroupQueue {
            topic: q.topic,
            queue_id: q.queue_id,
            cursor: q.cursor,
            max_offset: q.max_offset,
            lag: q.lag,
            inflight: q.inflight,
        })
        .collect();
    GroupDetail {
        group: group_view(s.config),
        total_lag: queues.iter().map(|q| q.lag).sum(),
        total_inflight: queues.iter().map(|q| q.inflight).sum(),
        queues,
    }
}

fn check_backoff(b: &Backoff) -> Result<()> {
    if b.initial_ms == 0 || b.validate().is_err() {
        return Err(ApiError::bad_request(
            "INVALID_BACKOFF",
            "backoff needs 0 < initial_ms <= max_ms <= 604800000 (7 days) and a multiplier \
             between 1 and 100",
        ));
    }
    Ok(())
}

fn check_start(s: &Start) -> Result<()> {
    if let Start::Timestamp(ms) = s {
        if *ms < 0 {
            return Err(ApiError::bad_request(
                "INVALID_START",
                "start timestamp_ms must not be negative",
            ));
        }
    }
    Ok(())
}

pub async fn list_groups(State(st): State<AppState>) -> Json<GroupList> {
    Json(GroupList {
        groups: st.broker.groups().into_iter().map(group_view).collect(),
    })
}

pub async fn create_group(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreateGroup>,
) -> Result<Response> {
    if let Some(b) = &req.backoff {
        check_backoff(b)?;
    }
    if let Some(s) = &req.start {
        check_start(s)?;
    }
    let g = blocking(move || {
        Ok(st.broker.create_group(
            &req.name,
            req.fifo,
            req.max_attempts,
            req.backoff,
            req.start.map(start_to_broker),
        )?)
    })
    .await?;
    tracing::info!(group = %g.name, fifo = g.fifo, "consumer group created");
    Ok(created(
        format!("/api/v1/groups/{}", g.name),
        Json(group_view(g)),
    ))
}

pub async fn describe_group(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
) -> Result<Json<GroupDetail>> {
    let s = blocking(move || Ok(st.broker.group_status(&name)?)).await?;
    Ok(Json(group_detail(s)))
}

pub async fn update_group(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
    JsonBody(req): JsonBody<UpdateGroup>,
) -> Result<Json<Group>> {
    if req == UpdateGroup::default() {
        return Err(ApiError::bad_request(
            "EMPTY_UPDATE",
            "nothing to update: give fifo, max_attempts, backoff and/or start",
        ));
    }
    if let Some(b) = &req.backoff {
        check_backoff(b)?;
    }
    if let Some(s) = &req.start {
        check_start(s)?;
    }
    let g = blocking(move || {
        let mut g = st.broker.group_config(&name)?;
        if let Some(fifo) = req.fifo {
            g.fifo = fifo;
        }
        if let Some(n) = req.max_attempts {
            g.max_attempts = n;
        }
        if let Some(b) = req.backoff {
            g.backoff = b;
        }
        if let Some(s) = req.start {
            g.start = start_to_broker(s);
        }
        Ok(st.broker.update_group(g)?)
    })
    .await?;
    tracing::info!(group = %g.name, "consumer group updated");
    Ok(Json(group_view(g)))
}

pub async fn delete_group(
    State(st): State<AppState>,
    PathParam(name): PathParam<String>,
) -> Result<StatusCode> {
    let n = name.clone();
    blocking(move || Ok(st.broker.delete_group(&n)?)).await?;
    tracing::info!(group = %name, "consumer group deleted");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn reset_offset(
    State(st): State<AppState>,
    PathParam(group): PathParam<String>,
    JsonBody(req): JsonBody<ResetOffset>,
) -> Result<Json<ResetOffsetResult>> {
    if req.timestamp_ms < 0 {
        return Err(ApiError::bad_request(
            "INVALID_TIMESTAMP",
            "timestamp_ms must not be negative",
        ));
    }
    let cursors = st
        .broker
        .reset_offset(&group, &req.topic, req.timestamp_ms)
        .await?;
    tracing::info!(%group, topic = %req.topic, timestamp_ms = req.timestamp_ms, "consumer offset reset");
    Ok(Json(ResetOffsetResult {
        group,
        topic: req.topic,
        timestamp_ms: req.timestamp_ms,
        queues: cursors
            .into_iter()
            .map(|(queue_id, offset)| QueueCursor { queue_id, offset })
            .collect(),
    }))
}

pub async fn resend_dead_letters(
    State(st): State<AppState>,
    PathParam(group): PathParam<String>,
    JsonBody(req): JsonBody<ResendDeadLetters>,
) -> Result<Json<ResendResult>> {
    let max = req.max.unwrap_or(DEFAULT_RESEND_MAX);
    if max == 0 || max > 100_000 {
        return Err(ApiError::bad_request(
            "INVALID_MAX",
            "max must be between 1 and 100000",
        ));
    }
    // The broker re-sends from the dead-letter topic of any name; check the group exists so
    // a typo is a 404, not a silent "0 re-sent".
    st.broker.group_config(&group)?;
    let resent = st.broker.resend_dead_letters(&group, max).await?;
    tracing::info!(%group, resent, "dead letters re-sent");
    Ok(Json(ResendResult { group, resent }))
}

// ----------------------------------------------------------------------------- messages

/// Where to cut a body for a preview of at most `limit` bytes without splitting a UTF-8
/// character: when the first byte left out continues a character, cut before that
/// character's lead byte.
fn preview_cut(body: &[u8], limit: usize) -> usize {
    if limit >= body.len() {
        return body.len();
    }
    let is_continuation = |i: usize| body[i] & 0xC0 == 0x80;
    if !is_continuation(limit) {
        return limit;
    }
    (limit.saturating_sub(3)..limit)
        .rev()
        .find(|&p| !is_continuation(p))
        .filter(|&p| body[p] >= 0xC0)
        .unwrap_or(limit)
}

fn message_view(v: StoredView, preview_limit: usize) -> StoredMessage {
    let m = v.message;
    let cut = preview_cut(&m.body, preview_limit);
    StoredMessage {
        message_id: m.message_id,
        topic: m.topic,
        queue_id: v.queue_id,
        queue_offset: v.queue_offset,
        store_timestamp_ms: v.store_timestamp_ms,
        born_timestamp_ms: m.born_timestamp_ms,
        born_host: m.born_host,
        message_type: m.message_type,
        tag: m.tag,
        keys: m.keys,
        message_group: m.message_group,
        delivery_timestamp_ms: m.delivery_timestamp_ms,
        properties: m.user_properties,
        body_size: m.body.len(),
        body_preview: String::from_utf8_lossy(&m.body[..cut]).into_owned(),
        body_truncated: cut < m.body.len(),
    }
}

fn preview_limit(p: Option<usize>) -> Result<usize> {
    let p = p.unwrap_or(DEFAULT_PREVIEW_BYTES);
    if p > MAX_PREVIEW_BYTES {
        return Err(ApiError::bad_request(
            "INVALID_QUERY",
            format!("preview_bytes must be at most {MAX_PREVIEW_BYTES}"),
        ));
    }
    Ok(p)
}

pub async fn message_by_id(
    State(st): State<AppState>,
    PathParam(id): PathParam<String>,
    Params(q): Params<PreviewQuery>,
) -> Result<Json<StoredMessage>> {
    let limit = preview_limit(q.preview_bytes)?;
    let found = blocking(move || {
        st.broker.message_by_id(&id)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "MESSAGE_NOT_FOUND",
                format!("no stored message has id {id:?}"),
            )
        })
    })
    .await?;
    Ok(Json(message_view(found, limit)))
}

pub async fn topic_messages(
    State(st): State<AppState>,
    PathParam(topic): PathParam<String>,
    Params(q): Params<MessageQuery>,
) -> Result<Json<MessageList>> {
    let limit = preview_limit(q.preview_bytes)?;
    let max = q.max.unwrap_or(DEFAULT_MAX_MESSAGES);
    if max == 0 || max > MAX_MESSAGES {
        return Err(ApiError::bad_request(
            "INVALID_QUERY",
            format!("max must be between 1 and {MAX_MESSAGES}"),
        ));
    }
    let bad = |m: &str| Err(ApiError::bad_request("INVALID_QUERY", m));
    let found = blocking(move || {
        let status = st.broker.topic_status(&topic)?;
        match (q.key, q.queue) {
            (Some(_), Some(_)) => bad("give either key or queue, not both"),
            (None, None) => bad("give key=K (by message key) or queue=Q (by queue offset)"),
            (Some(key), None) => {
                if q.offset.is_some() {
                    return bad("offset goes with queue, not with key");
                }
                let begin = q.begin_ms.unwrap_or(0);
                let end = q.end_ms.unwrap_or(i64::MAX);
                if begin > end {
                    return bad("begin_ms is after end_ms");
                }
                Ok(st
                    .broker
                    .messages_by_key(&topic, &key, begin, end, max as usize)?)
            }
            (None, Some(queue)) => {
                if q.begin_ms.is_some() || q.end_ms.is_some() {
                    return bad("begin_ms and end_ms go with key, not with queue");
                }
                let Some(qs) = status.queue_status.get(queue as usize) else {
                    return Err(ApiError::bad_request(
                        "INVALID_QUEUE",
                        format!(
                            "topic {topic} has queues 0..{}, not {queue}",
                            status.config.queues
                        ),
                    ));
                };
                // Offsets below the oldest stored message start at the oldest one.
                let offset = q.offset.unwrap_or(qs.min_offset).max(qs.min_offset);
                Ok(st.broker.messages_at(&topic, queue, offset, max)?)
            }
        }
    })
    .await?;
    Ok(Json(MessageList {
        messages: found.into_iter().map(|v| message_view(v, limit)).collect(),
    }))
}

// ------------------------------------------------------------------------------ fallback

pub async fn route_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ROUTE_NOT_FOUND",
        "no such API route",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this route does not accept that method",
    )
}

#[cfg(test)]
mod tests {
    use super::preview_cut;

    #[test]
    fn preview_never_splits_a_character() {
        let s = "héllo".as_bytes();
        assert_eq!(preview_cut(s, 0), 0);
        assert_eq!(preview_cut(s, 1), 1);
        assert_eq!(preview_cut(s, 2), 1, "é is two bytes");
        assert_eq!(preview_cut(s, 3), 3);
        assert_eq!(preview_cut(s, 99), s.len());
        let emoji = "a😀".as_bytes(); // 1 + 4 bytes
        for limit in 1..5 {
            assert_eq!(preview_cut(emoji, limit), 1);
        }
        // Invalid bytes are cut where asked; the lossy conversion shows them.
        assert_eq!(preview_cut(&[0x80, 0x80, 0x80, 0x80, 0x80], 2), 2);
    }
}
