//! The wire types of the admin API, shared by the server and the `sluice` CLI.
//!
//! *API boundary*: these are the JSON shapes clients see. They are separate from the
//! broker's metadata types on purpose: the broker persists its own structs to disk, and a
//! change there must not silently change the HTTP contract. Requests reject unknown fields
//! (a typo must not be ignored); responses tolerate them (a newer server may add fields).

use serde::{Deserialize, Serialize};
pub use sluice_broker::{Backoff, MessageType};

/// Queues of a topic created without an explicit count.
pub const DEFAULT_QUEUES: u32 = 8;
/// Messages returned by a message query without `max`.
pub const DEFAULT_MAX_MESSAGES: u32 = 32;
/// Most messages one message query returns.
pub const MAX_MESSAGES: u32 = 1000;
/// Body bytes shown per message without `preview_bytes`.
pub const DEFAULT_PREVIEW_BYTES: usize = 1024;
/// Largest `preview_bytes` accepted.
pub const MAX_PREVIEW_BYTES: usize = 64 << 10;
/// Dead letters re-sent by one call without `max`.
pub const DEFAULT_RESEND_MAX: u32 = 1000;
/// Largest request body accepted.
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// Every error response: `{"error": {"code": "TOPIC_NOT_FOUND", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, upper-case code for scripts; never reused for another condition.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

// ------------------------------------------------------------------------------- topics

/// `POST /api/v1/topics`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopic {
    pub name: String,
    #[serde(rename = "type", default = "normal")]
    pub message_type: MessageType,
    #[serde(default = "default_queues")]
    pub queues: u32,
}

fn normal() -> MessageType {
    MessageType::Normal
}

fn default_queues() -> u32 {
    DEFAULT_QUEUES
}

/// `PUT /api/v1/topics/{name}`: every field is optional; the queue count can only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTopic {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<MessageType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    pub name: String,
    #[serde(rename = "type")]
    pub message_type: MessageType,
    pub queues: u32,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicList {
    pub topics: Vec<Topic>,
}

/// `GET /api/v1/topics/{name}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDetail {
    #[serde(flatten)]
    pub topic: Topic,
    /// Messages still stored, summed over the queues.
    pub stored_messages: u64,
    pub queue_status: Vec<QueueOffsets>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOffsets {
    pub queue_id: u32,
    /// Oldest offset still stored.
    pub min_offset: u64,
    /// Offset the next message will get.
    pub max_offset: u64,
}

// ------------------------------------------------------------------------------- groups

/// Where a consumer group starts on a queue it has never read.
///
/// JSON: `"earliest"`, `"latest"` or `{"timestamp_ms": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StartRepr", into = "StartRepr")]
pub enum Start {
    Earliest,
    Latest,
    Timestamp(i64),
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "\"earliest\", \"latest\" or {\"timestamp_ms\": <ms since the epoch>}"
)]
enum StartRepr {
    Named(NamedStart),
    At(StartAt),
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NamedStart {
    Earliest,
    Latest,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartAt {
    timestamp_ms: i64,
}

impl From<StartRepr> for Start {
    fn from(r: StartRepr) -> Start {
        match r {
            StartRepr::Named(NamedStart::Earliest) => Start::Earliest,
            StartRepr::Named(NamedStart::Latest) => Start::Latest,
            StartRepr::At(StartAt { timestamp_ms }) => Start::Timestamp(timestamp_ms),
        }
    }
}

impl From<Start> for StartRepr {
    fn from(s: Start) -> StartRepr {
        match s {
            Start::Earliest => StartRepr::Named(NamedStart::Earliest),
            Start::Latest => StartRepr::Named(NamedStart::Latest),
            Start::Timestamp(timestamp_ms) => StartRepr::At(StartAt { timestamp_ms }),
        }
    }
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::Earliest => f.write_str("earliest"),
            Start::Latest => f.write_str("latest"),
            Start::Timestamp(ms) => write!(f, "timestamp {ms}"),
        }
    }
}

/// `POST /api/v1/groups`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
    #[serde(default)]
    pub fifo: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Start>,
}

/// `PUT /api/v1/groups/{name}`: fields left out keep their value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Start>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub fifo: bool,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub start: Start,
    pub created_at_ms: i64,
    /// Topic that receives the group's messages after `max_attempts` failed deliveries.
    pub dead_letter_topic: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupList {
    pub groups: Vec<Group>,
}

/// `GET /api/v1/groups/{name}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDetail {
    #[serde(flatten)]
    pub group: Group,
    pub total_lag: u64,
    pub total_inflight: u64,
    /// Queues the group has consumed from, by topic and queue id.
    pub queues: Vec<GroupQueue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupQueue {
    pub topic: String,
    pub queue_id: u32,
    /// Next offset never handed out to the group.
    pub cursor: u64,
    pub max_offset: u64,
    /// Messages not yet handed out.
    pub lag: u64,
    /// Handed out and not yet acknowledged.
    pub inflight: u64,
}

/// `POST /api/v1/groups/{name}/reset-offset`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetOffset {
    pub topic: String,
    /// The group resumes at the first message stored at or after this time.
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetOffsetResult {
    pub group: String,
    pub topic: String,
    pub timestamp_ms: i64,
    pub queues: Vec<QueueCursor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCursor {
    pub queue_id: u32,
    pub offset: u64,
}

/// `POST /api/v1/groups/{name}/dead-letters/resend`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendDeadLetters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResendResult {
    pub group: String,
    pub resent: u32,
}

// ----------------------------------------------------------------------------- messages

/// Query of `GET /api/v1/topics/{name}/messages`: either `key` (with optional
/// `begin_ms`/`end_ms`) or `queue` (with optional `offset`, default the oldest stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_bytes: Option<usize>,
}

/// Query of `GET /api/v1/messages/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_bytes: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageList {
    pub messages: Vec<StoredMessage>,
}

/// A stored message with where it is and the start of its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub message_id: String,
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_timestamp_ms: i64,
    pub born_timestamp_ms: i64,
    pub born_host: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<MessageType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_timestamp_ms: Option<i64>,
    pub properties: std::collections::BTreeMap<String, String>,
    /// Size of the whole body in bytes.
    pub body_size: usize,
    /// The body's first bytes as UTF-8 (invalid sequences replaced), never cutting a
    /// character in two.
    pub body_preview: String,
    /// Whether `body_preview` shows less than the whole body.
    pub body_truncated: bool,
}

// ------------------------------------------------------------------------------- broker

/// `GET /api/v1/broker`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    pub name: String,
    pub version: String,
    pub started_at_ms: i64,
    pub uptime_ms: u64,
    /// `sync` or `async`.
    pub flush_policy: String,
    pub data_dir: String,
    pub topics: usize,
    pub groups: usize,
    pub store: StoreUsage,
    /// Why the store refuses writes, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreUsage {
    /// Bytes of commit-log segments on disk.
    pub disk_bytes: u64,
    pub min_offset: u64,
    pub written_offset: u64,
    pub durable_offset: u64,
    pub appended_messages: u64,
    pub appended_bytes: u64,
    pub fsyncs: u64,
    pub queues: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_round_trips_and_explains_itself() {
        for (s, json) in [
            (Start::Earliest, r#""earliest""#),
            (Start::Latest, r#""latest""#),
            (Start::Timestamp(42), r#"{"timestamp_ms":42}"#),
        ] {
            assert_eq!(serde_json::to_string(&s).ok().as_deref(), Some(json));
            assert_eq!(serde_json::from_str::<Start>(json).ok(), Some(s));
        }
        let err = serde_json::from_str::<Start>(r#""soon""#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("earliest"), "{err}");
        assert!(serde_json::from_str::<Start>(r#"{"timestamp_ms":1,"x":2}"#).is_err());
    }

    #[test]
    fn create_topic_defaults() {
        let t: CreateTopic = serde_json::from_str(r#"{"name":"a"}"#).expect("parses");
        assert_eq!(t.queues, DEFAULT_QUEUES);
        assert_eq!(t.message_type, MessageType::Normal);
    }
}
