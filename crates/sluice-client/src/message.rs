//! Messages as the SDK's users see them, and their translation to the protocol.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::{Digest as _, Md5};
use sluice_proto::prost_types;
use sluice_proto::v2::{self, MessageType};

use crate::error::ClientError;
use crate::ids;

/// Largest body a GZIP-encoded delivery may inflate to.
const MAX_INFLATED_BODY: u64 = 64 << 20;

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub topic: String,
    pub body: Vec<u8>,
    /// One tag, matched by consumers' tag filters (`tagA||tagB`).
    pub tag: Option<String>,
    /// Keys for look-up by key.
    pub keys: Vec<String>,
    /// User properties (matched by SQL92 filters).
    pub properties: HashMap<String, String>,
    /// FIFO message group: messages of a group are delivered in send order.
    pub message_group: Option<String>,
    /// Delay message: not delivered before this time.
    pub delivery_time: Option<SystemTime>,
}

impl Message {
    /// A normal message.
    pub fn new(topic: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: topic.into(),
            body: body.into(),
            ..Default::default()
        }
    }

    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Makes this a FIFO message of `group`.
    pub fn with_message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Makes this a delay message delivered at `at`.
    pub fn with_delivery_time(mut self, at: SystemTime) -> Self {
        self.delivery_time = Some(at);
        self
    }

    /// Makes this a delay message delivered `delay` from now.
    pub fn with_delay(self, delay: Duration) -> Self {
        self.with_delivery_time(SystemTime::now() + delay)
    }

    /// The protocol type this message is sent as.
    pub fn message_type(&self, transactional: bool) -> MessageType {
        if transactional {
            MessageType::Transaction
        } else if self.message_group.is_some() {
            MessageType::Fifo
        } else if self.delivery_time.is_some() {
            MessageType::Delay
        } else {
            MessageType::Normal
        }
    }

    /// Checks what can be checked before sending.
    pub(crate) fn validate(&self, max_body: usize, transactional: bool) -> Result<(), ClientError> {
        let bad = |s: String| Err(ClientError::InvalidArgument(s));
        if self.topic.is_empty() {
            return bad("the topic is empty".into());
        }
        if self.body.is_empty() {
            return bad("the message body is empty".into());
        }
        if max_body > 0 && self.body.len() > max_body {
            return bad(format!(
                "the body has {} bytes, the server accepts at most {max_body}",
                self.body.len()
            ));
        }
        if self.message_group.as_deref() == Some("") {
            return bad("the message group is empty".into());
        }
        if self
            .tag
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.contains("||"))
        {
            return bad("a tag must be non-empty and must not contain '||'".into());
        }
        let kinds = usize::from(self.message_group.is_some())
            + usize::from(self.delivery_time.is_some())
            + usize::from(transactional);
        if kinds > 1 {
            return bad(
                "a message is either FIFO (message group), delay (delivery time) or transactional"
                    .into(),
            );
        }
        Ok(())
    }

    /// The protocol message, with a fresh id and the body digest.
    pub(crate) fn to_pb(&self, namespace: &str, transactional: bool) -> v2::Message {
        let now = SystemTime::now();
        v2::Message {
            topic: Some(resource(namespace, &self.topic)),
            user_properties: self.properties.clone(),
            system_properties: Some(v2::SystemProperties {
                tag: self.tag.clone(),
                keys: self.keys.clone(),
                message_id: ids::next_message_id(),
                body_digest: Some(v2::Digest {
                    r#type: v2::DigestType::Md5 as i32,
                    checksum: md5_upper_hex(&self.body),
                }),
                body_encoding: v2::Encoding::Identity as i32,
                message_type: self.message_type(transactional) as i32,
                born_timestamp: Some(to_timestamp(now)),
                born_host: ids::hostname(),
                delivery_timestamp: self.delivery_time.map(to_timestamp),
                message_group: self.message_group.clone(),
                ..Default::default()
            }),
            body: self.body.clone().into(),
        }
    }
}

/// What the server returned for one sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub topic: String,
    pub message_id: String,
    /// Queue the message was sent to.
    pub queue_id: i32,
    /// Offset in the queue, as reported by the server.
    pub offset: i64,
    /// Non-empty for transactional (half) messages.
    pub transaction_id: String,
    /// Handle to recall a delay message, if the server gives one.
    pub recall_handle: String,
}

/// A message delivered to a consumer (or shown to a transaction checker).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedMessage {
    pub topic: String,
    pub message_id: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: HashMap<String, String>,
    pub body: Vec<u8>,
    pub message_group: Option<String>,
    pub message_type: i32,
    pub delivery_time: Option<SystemTime>,
    pub born_time: Option<SystemTime>,
    pub born_host: String,
    pub store_time: Option<SystemTime>,
    pub queue_id: i32,
    pub queue_offset: Option<i64>,
    /// 1 on the first delivery.
    pub delivery_attempt: u32,
    /// The handle that acknowledges this delivery (empty for transaction checks).
    /// [`crate::SimpleConsumer::change_invisible_duration`] replaces it.
    pub receipt_handle: String,
    /// The body does not match the digest the server sent.
    pub corrupted: bool,
}

impl ReceivedMessage {
    /// The message type as an enum (`Unspecified` for values this SDK does not know).
    pub fn kind(&self) -> MessageType {
        MessageType::try_from(self.message_type).unwrap_or(MessageType::Unspecified)
    }

    /// The body as UTF-8, lossily.
    pub fn body_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    pub(crate) fn from_pb(m: v2::Message) -> Self {
        let sp = m.system_properties.unwrap_or_default();
        let mut body = m.body;
        let mut corrupted = false;
        if sp.body_encoding == v2::Encoding::Gzip as i32 {
            let mut out = Vec::new();
            match flate2::read::GzDecoder::new(&body[..])
                .take(MAX_INFLATED_BODY)
                .read_to_end(&mut out)
            {
                Ok(_) => body = out.into(),
                Err(_) => corrupted = true,
            }
        }
        if let Some(d) = &sp.body_digest {
            if d.r#type == v2::DigestType::Md5 as i32
                && !d.checksum.eq_ignore_ascii_case(&md5_upper_hex(&body))
            {
                corrupted = true;
            }
        }
        ReceivedMessage {
            topic: m.topic.map(|t| t.name).unwrap_or_default(),
            message_id: sp.message_id,
            tag: sp.tag,
            keys: sp.keys,
            properties: m.user_properties,
            body: body.into(),
            message_group: sp.message_group,
            message_type: sp.message_type,
            delivery_time: sp.delivery_timestamp.as_ref().and_then(from_timestamp),
            born_time: sp.born_timestamp.as_ref().and_then(from_timestamp),
            born_host: sp.born_host,
            store_time: sp.store_timestamp.as_ref().and_then(from_timestamp),
            queue_id: sp.queue_id,
            queue_offset: sp.queue_offset,
            delivery_attempt: sp
                .delivery_attempt
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(1),
            receipt_handle: sp.receipt_handle.unwrap_or_default(),
            corrupted,
        }
    }
}

/// Which messages of a topic a consumer wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterExpression {
    /// `*` (everything) or tags separated by `||`.
    Tag(String),
    /// A SQL92 condition on properties, e.g. `a > 1 AND region = 'eu'`.
    Sql(String),
}

impl FilterExpression {
    /// Everything.
    pub fn all() -> Self {
        FilterExpression::Tag("*".into())
    }

    pub(crate) fn to_pb(&self) -> v2::FilterExpression {
        match self {
            FilterExpression::Tag(e) => v2::FilterExpression {
                r#type: v2::FilterType::Tag as i32,
                expression: e.clone(),
            },
            FilterExpression::Sql(e) => v2::FilterExpression {
                r#type: v2::FilterType::Sql as i32,
                expression: e.clone(),
            },
        }
    }
}

pub(crate) fn resource(namespace: &str, name: &str) -> v2::Resource {
    v2::Resource {
        resource_namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// MD5 as upper-case hex, the digest the RocketMQ proxy and official clients use.
pub fn md5_upper_hex(body: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let d = Md5::digest(body);
    let mut s = String::with_capacity(32);
    for b in d.iter() {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

pub(crate) fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        },
        Err(e) => {
            let d = e.duration();
            let mut seconds = -(d.as_secs() as i64);
            let mut nanos = -(d.subsec_nanos() as i32);
            if nanos < 0 {
                seconds -= 1;
                nanos += 1_000_000_000;
            }
            prost_types::Timestamp { seconds, nanos }
        }
    }
}

pub(crate) fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(t.seconds as u64, t.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_the_options() {
        let m = Message::new("t", "b");
        assert_eq!(m.message_type(false), MessageType::Normal);
        assert_eq!(m.message_type(true), MessageType::Transaction);
        assert_eq!(
            m.clone().with_message_group("g").message_type(false),
            MessageType::Fifo
        );
        assert_eq!(
            m.clone()
                .with_delay(Duration::from_secs(1))
                .message_type(false),
            MessageType::Delay
        );
    }

    #[test]
    fn validation() {
        assert!(Message::new("t", "b").validate(10, false).is_ok());
        assert!(Message::new("", "b").validate(10, false).is_err());
        assert!(Message::new("t", "").validate(10, false).is_err());
        assert!(Message::new("t", vec![0; 11]).validate(10, false).is_err());
        assert!(
            Message::new("t", "b")
                .with_message_group("g")
                .with_delay(Duration::from_secs(1))
                .validate(10, false)
                .is_err()
        );
        assert!(
            Message::new("t", "b")
                .with_message_group("g")
                .validate(10, true)
                .is_err()
        );
        assert!(
            Message::new("t", "b")
                .with_tag("a||b")
                .validate(10, false)
                .is_err()
        );
    }

    #[test]
    fn protocol_round_trip() {
        let m = Message::new("t", "hello")
            .with_tag("tagA")
            .with_key("k1")
            .with_property("color", "red")
            .with_message_group("g1");
        let pb = m.to_pb("ns", false);
        let sp = pb.system_properties.as_ref().expect("system properties");
        assert_eq!(sp.message_id.len(), 34);
        assert_eq!(
            sp.body_digest.as_ref().map(|d| d.checksum.as_str()),
            Some("5D41402ABC4B2A76B9719D911017C592")
        );
        assert_eq!(sp.message_type, MessageType::Fifo as i32);
        assert_eq!(
            pb.topic.as_ref().map(|r| r.resource_namespace.as_str()),
            Some("ns")
        );
        let mut delivered = pb.clone();
        if let Some(sp) = delivered.system_properties.as_mut() {
            sp.receipt_handle = Some("h".into());
            sp.delivery_attempt = Some(2);
        }
        let r = ReceivedMessage::from_pb(delivered);
        assert_eq!(r.topic, "t");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.tag.as_deref(), Some("tagA"));
        assert_eq!(r.keys, vec!["k1"]);
        assert_eq!(r.properties["color"], "red");
        assert_eq!(r.message_group.as_deref(), Some("g1"));
        assert_eq!(r.receipt_handle, "h");
        assert_eq!(r.delivery_attempt, 2);
        assert_eq!(r.kind(), MessageType::Fifo);
        assert!(!r.corrupted);
        let mut bad = pb;
        bad.body = b"tampered".to_vec().into();
        assert!(ReceivedMessage::from_pb(bad).corrupted);
    }

    #[test]
    fn gzip_bodies_are_inflated() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"hello").expect("gzip");
        let pb = v2::Message {
            system_properties: Some(v2::SystemProperties {
                body_encoding: v2::Encoding::Gzip as i32,
                body_digest: Some(v2::Digest {
                    r#type: v2::DigestType::Md5 as i32,
                    checksum: md5_upper_hex(b"hello"),
                }),
                ..Default::default()
            }),
            body: enc.finish().expect("gzip").into(),
            ..Default::default()
        };
        let r = ReceivedMessage::from_pb(pb);
        assert_eq!(r.body, b"hello");
        assert!(!r.corrupted);
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
        assert_eq!(
            from_timestamp(&prost_types::Timestamp {
                seconds: 1,
                nanos: -1
            }),
            None
        );
    }
}
