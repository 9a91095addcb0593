//! # sluice-proto
//!
//! Sluice's own definitions of the Apache RocketMQ 5 gRPC protocol
//! (protobuf package `apache.rocketmq.v2`) together with the prost messages
//! and tonic server/client code generated from them at build time.
//!
//! The `.proto` sources in `proto/apache/rocketmq/v2/` were written for this
//! project from an implementer's summary of the protocol. They are
//! **wire-compatible** with the official RocketMQ 5 clients: package name,
//! service/method names, field numbers, field types and enum numbers match
//! the upstream protocol (enum value *names* follow proto3 prefix
//! conventions so that prost generates short Rust names, e.g.
//! [`v2::Code::Ok`], [`v2::MessageType::Unspecified`]).
//!
//! Code generation uses `protox` (a pure-Rust protobuf compiler), so no
//! system `protoc` is required.
//!
//! Besides the generated [`v2`] module this crate offers a few helpers for
//! building in-band [`v2::Status`] values and for staying compatible with
//! older clients ([`code_known_to_all_clients`]).

/// Generated protobuf messages, enums and gRPC service code for
/// `apache.rocketmq.v2`.
///
/// The most important items:
/// * [`v2::messaging_service_server::MessagingService`] (the trait a broker
///   implements) and [`v2::messaging_service_server::MessagingServiceServer`];
/// * [`v2::messaging_service_client::MessagingServiceClient`];
/// * oneofs live in snake-case modules named after their message, e.g.
///   [`v2::telemetry_command::Command`], [`v2::receive_message_response::Content`].
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    clippy::unwrap_used,
    rustdoc::all
)]
pub mod v2 {
    tonic::include_proto!("apache.rocketmq.v2");
}

pub mod auth;

pub use prost;
pub use prost_types;

/// Builds an in-band [`v2::Status`] with the given code and message.
pub fn status(code: v2::Code, message: impl Into<String>) -> v2::Status {
    v2::Status {
        code: code as i32,
        message: message.into(),
    }
}

/// The canonical success status: `{code: OK, message: "OK"}`.
pub fn status_ok() -> v2::Status {
    status(v2::Code::Ok, "OK")
}

/// Whether every supported official client can handle `code` in a
/// [`v2::Status`].
///
/// The crates.io `rocketmq` 5.0.0 Rust client decodes status codes with
/// `Code::from_i32(code).unwrap()` and therefore **panics** on codes added to
/// the protocol after its release: `ILLEGAL_OFFSET` (40019),
/// `ILLEGAL_LITE_TOPIC` (40020), `INVALID_CLIENT_PROPERTIES` (40021),
/// `OFFSET_NOT_FOUND` (40404), `MESSAGE_BODY_EMPTY` (41302),
/// `LITE_TOPIC_QUOTA_EXCEEDED` (42901) and
/// `LITE_SUBSCRIPTION_QUOTA_EXCEEDED` (42902). These return `false`.
///
/// [`v2::Code::Unspecified`] (0) also returns `false`: the Rust client knows
/// it, but the Python client rejects a response carrying code 0 as illegal,
/// so it must never be sent.
pub fn code_known_to_all_clients(code: v2::Code) -> bool {
    use v2::Code;
    !matches!(
        code,
        Code::Unspecified
            | Code::IllegalOffset
            | Code::IllegalLiteTopic
            | Code::InvalidClientProperties
            | Code::OffsetNotFound
            | Code::MessageBodyEmpty
            | Code::LiteTopicQuotaExceeded
            | Code::LiteSubscriptionQuotaExceeded
    )
}

/// Maps `code` to the closest code that every official client understands
/// (see [`code_known_to_all_clients`]); known codes are returned unchanged.
///
/// The replacement keeps the client-side error category (BadRequest,
/// NotFound, TooManyRequests) the original code would have produced, except
/// for `MESSAGE_BODY_EMPTY`, which becomes `BAD_REQUEST` rather than a
/// "payload too large" error, and `CODE_UNSPECIFIED`, which becomes
/// `INTERNAL_ERROR`.
pub fn code_for_all_clients(code: v2::Code) -> v2::Code {
    use v2::Code;
    match code {
        Code::Unspecified => Code::InternalError,
        Code::IllegalOffset
        | Code::IllegalLiteTopic
        | Code::InvalidClientProperties
        | Code::MessageBodyEmpty => Code::BadRequest,
        Code::OffsetNotFound => Code::NotFound,
        Code::LiteTopicQuotaExceeded | Code::LiteSubscriptionQuotaExceeded => Code::TooManyRequests,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost::Message as _;

    use super::*;
    use v2::{
        Code, Digest, DigestType, Message, MessageType, Publishing, Resource, SendMessageRequest,
        Settings, SystemProperties, TelemetryCommand, settings::PubSub, telemetry_command::Command,
    };

    fn encode<M: prost::Message>(msg: &M) -> Vec<u8> {
        msg.encode_to_vec()
    }

    fn sample_system_properties() -> SystemProperties {
        SystemProperties {
            tag: Some("TagA".to_owned()),
            keys: vec!["k1".to_owned(), "k2".to_owned()],
            message_id: "01E2031531CDD364F67e27b72000000004".to_owned(),
            body_digest: Some(Digest {
                r#type: DigestType::Md5 as i32,
                checksum: "5D41402ABC4B2A76B9719D911017C592".to_owned(),
            }),
            message_type: MessageType::Normal as i32,
            born_timestamp: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000_000,
            }),
            born_host: "10.0.0.1".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn status_helpers() {
        let ok = status_ok();
        assert_eq!(ok.code(), Code::Ok);
        assert_eq!(ok.code, 20_000);
        assert_eq!(ok.message, "OK");

        let nf = status(Code::TopicNotFound, format!("topic {} not found", "t"));
        assert_eq!(nf.code(), Code::TopicNotFound);
        assert_eq!(nf.code, 40_402);
        assert_eq!(nf.message, "topic t not found");
    }

    #[test]
    fn round_trip_send_message_request() {
        let mut user_properties = HashMap::new();
        user_properties.insert("color".to_owned(), "blue".to_owned());
        user_properties.insert("weight".to_owned(), "42".to_owned());
        let req = SendMessageRequest {
            messages: vec![Message {
                topic: Some(Resource {
                    resource_namespace: "ns".to_owned(),
                    name: "orders".to_owned(),
                }),
                user_properties,
                system_properties: Some(sample_system_properties()),
                body: b"hello".to_vec().into(),
            }],
        };
        let bytes = encode(&req);
        let decoded = SendMessageRequest::decode(bytes.as_slice()).expect("decode");
        assert_eq!(decoded, req);
        let sp = decoded.messages[0]
            .system_properties
            .as_ref()
            .expect("system properties");
        assert_eq!(sp.tag.as_deref(), Some("TagA"));
        assert_eq!(
            sp.body_digest.as_ref().map(Digest::r#type),
            Some(DigestType::Md5)
        );
        assert_eq!(decoded.messages[0].user_properties["color"], "blue");
    }

    #[test]
    fn round_trip_system_properties() {
        let sp = sample_system_properties();
        let decoded = SystemProperties::decode(encode(&sp).as_slice()).expect("decode");
        assert_eq!(decoded, sp);
        assert_eq!(decoded.message_type(), MessageType::Normal);
        // Unset proto3 `optional` fields stay absent.
        assert_eq!(decoded.store_timestamp, None);
        assert_eq!(decoded.delivery_attempt, None);
    }

    #[test]
    fn round_trip_telemetry_settings() {
        let cmd = TelemetryCommand {
            status: Some(status_ok()),
            command: Some(Command::Settings(Settings {
                client_type: Some(v2::ClientType::Producer as i32),
                backoff_policy: Some(v2::RetryPolicy {
                    max_attempts: 3,
                    strategy: Some(v2::retry_policy::Strategy::ExponentialBackoff(
                        v2::ExponentialBackoff {
                            initial: Some(prost_types::Duration {
                                seconds: 0,
                                nanos: 10_000_000,
                            }),
                            max: Some(prost_types::Duration {
                                seconds: 1,
                                nanos: 0,
                            }),
                            multiplier: 2.0,
                        },
                    )),
                }),
                pub_sub: Some(PubSub::Publishing(Publishing {
                    topics: vec![Resource {
                        resource_namespace: String::new(),
                        name: "orders".to_owned(),
                    }],
                    max_body_size: 4 * 1024 * 1024,
                    validate_message_type: true,
                })),
                user_agent: Some(v2::Ua {
                    language: v2::Language::Rust as i32,
                    version: "5.0.0".to_owned(),
                    platform: "linux".to_owned(),
                    hostname: "h".to_owned(),
                }),
                ..Default::default()
            })),
        };
        let decoded = TelemetryCommand::decode(encode(&cmd).as_slice()).expect("decode");
        assert_eq!(decoded, cmd);
        match decoded.command {
            Some(Command::Settings(Settings {
                pub_sub: Some(PubSub::Publishing(p)),
                ..
            })) => assert_eq!(p.max_body_size, 4 * 1024 * 1024),
            other => panic!("unexpected command {other:?}"),
        }
    }

    /// Asserts that `msg` encodes to bytes starting with `prefix`
    /// (field key, and optionally the value).
    fn assert_prefix<M: prost::Message + std::fmt::Debug>(msg: &M, prefix: &[u8]) {
        let bytes = encode(msg);
        assert!(
            bytes.starts_with(prefix),
            "{msg:?} encoded to {bytes:02x?}, expected prefix {prefix:02x?}"
        );
    }

    #[test]
    fn wire_tags_are_stable() {
        // key byte = field_number << 3 | wire_type (0 varint, 2 length-delimited, 5 fixed32)
        assert_prefix(&status(Code::Ok, ""), &[0x08, 0xa0, 0x9c, 0x01]); // Status.code=1, 20000
        assert_prefix(
            &SystemProperties {
                message_id: "m".to_owned(),
                ..Default::default()
            },
            &[0x1a, 0x01, b'm'],
        );
        assert_prefix(
            &SystemProperties {
                tag: Some(String::new()),
                ..Default::default()
            },
            &[0x0a, 0x00], // optional: explicit presence encodes the empty string
        );
        assert_prefix(
            &SystemProperties {
                queue_offset: Some(0),
                ..Default::default()
            },
            &[0x70, 0x00], // field 14 varint
        );
        assert_prefix(
            &SystemProperties {
                priority: Some(0),
                ..Default::default()
            },
            &[0xb0, 0x01, 0x00], // field 22 varint (two-byte key)
        );
        assert_prefix(
            &v2::ReceiveMessageResponse {
                content: Some(v2::receive_message_response::Content::DeliveryTimestamp(
                    prost_types::Timestamp::default(),
                )),
            },
            &[0x1a, 0x00],
        );
        assert_prefix(
            &v2::ReceiveMessageResponse {
                content: Some(v2::receive_message_response::Content::Status(status_ok())),
            },
            &[0x0a],
        );
        assert_prefix(
            &v2::ReceiveMessageRequest {
                long_polling_timeout: Some(prost_types::Duration::default()),
                ..Default::default()
            },
            &[0x3a, 0x00],
        );
        assert_prefix(
            &v2::SendResultEntry {
                recall_handle: "r".to_owned(),
                ..Default::default()
            },
            &[0x2a, 0x01, b'r'],
        );
        assert_prefix(
            &Publishing {
                max_body_size: 1,
                ..Default::default()
            },
            &[0x10, 0x01],
        );
        assert_prefix(
            &Settings {
                pub_sub: Some(PubSub::Publishing(Publishing::default())),
                ..Default::default()
            },
            &[0x2a, 0x00],
        );
        assert_prefix(
            &TelemetryCommand {
                status: None,
                command: Some(Command::NotifyUnsubscribeLiteCommand(
                    v2::NotifyUnsubscribeLiteCommand::default(),
                )),
            },
            &[0x4a, 0x00],
        );
        assert_prefix(
            &v2::ChangeInvisibleDurationRequest {
                suspend: Some(true),
                ..Default::default()
            },
            &[0x38, 0x01],
        );
        assert_prefix(
            &v2::PullMessageResponse {
                content: Some(v2::pull_message_response::Content::NextOffset(5)),
            },
            &[0x18, 0x05],
        );
        assert_prefix(
            &v2::ExponentialBackoff {
                multiplier: 2.0,
                ..Default::default()
            },
            &[0x1d, 0x00, 0x00, 0x00, 0x40], // float field 3 (fixed32)
        );
    }

    #[test]
    fn enum_numbers_are_stable() {
        assert_eq!(Code::MultipleResults as i32, 30_000);
        assert_eq!(Code::MessageNotFound as i32, 40_401);
        assert_eq!(Code::TooManyRequests as i32, 42_900);
        assert_eq!(Code::FailedToConsumeMessage as i32, 60_000);
        assert_eq!(MessageType::Priority as i32, 6);
        assert_eq!(v2::ClientType::LiteSimpleConsumer as i32, 6);
        assert_eq!(v2::Permission::ReadWrite as i32, 4);
        assert_eq!(v2::AddressScheme::DomainName as i32, 3);
        assert_eq!(v2::Language::NodeJs as i32, 8);
        assert_eq!(v2::TransactionSource::SourceServerCheck as i32, 2);
        assert_eq!(v2::TransactionResolution::Rollback as i32, 2);
        assert_eq!(v2::QueryOffsetPolicy::Beginning as i32, 0);
        assert_eq!(v2::LiteSubscriptionAction::CompleteRemove as i32, 3);
        assert_eq!(v2::offset_option::Policy::Max as i32, 2);
    }

    #[test]
    fn codes_known_to_rust_5_0_0() {
        let unknown: Vec<Code> = (0..=70_000)
            .filter_map(|n| Code::try_from(n).ok())
            .filter(|c| !code_known_to_all_clients(*c))
            .collect();
        assert_eq!(
            unknown,
            vec![
                Code::Unspecified,
                Code::IllegalOffset,
                Code::IllegalLiteTopic,
                Code::InvalidClientProperties,
                Code::OffsetNotFound,
                Code::MessageBodyEmpty,
                Code::LiteTopicQuotaExceeded,
                Code::LiteSubscriptionQuotaExceeded,
            ]
        );
        for known in [
            Code::Ok,
            Code::MultipleResults,
            Code::BadRequest,
            Code::IllegalPollingTime,
            Code::MessageNotFound,
            Code::TopicNotFound,
            Code::MessageBodyTooLarge,
            Code::TooManyRequests,
            Code::InternalError,
            Code::FailedToConsumeMessage,
        ] {
            assert!(code_known_to_all_clients(known), "{known:?}");
            assert_eq!(code_for_all_clients(known), known);
        }
        for code in unknown {
            assert!(code_known_to_all_clients(code_for_all_clients(code)));
        }
        assert_eq!(
            code_for_all_clients(Code::MessageBodyEmpty),
            Code::BadRequest
        );
        assert_eq!(code_for_all_clients(Code::OffsetNotFound), Code::NotFound);
        assert_eq!(
            code_for_all_clients(Code::LiteTopicQuotaExceeded),
            Code::TooManyRequests
        );
    }
}
