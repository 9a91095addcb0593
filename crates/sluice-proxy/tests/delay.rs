//! Delay messages and RecallMessage through the gRPC edge, with a manual broker clock.

use std::sync::Arc;

use sluice_broker::{BrokerConfig, MessageType, StartPosition};
use sluice_common::ManualClock;
use sluice_proto::prost_types::Timestamp;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code, receive_message_response::Content};
use tonic::transport::Channel;

mod common;

use common::res;

const T0: i64 = 1_700_000_000_000;

fn with_id<T>(msg: T, rust: bool) -> tonic::Request<T> {
    let mut r = common::with_id("test@1@1", msg);
    if rust {
        r.metadata_mut()
            .insert("x-mq-language", "RUST".parse().expect("header"));
    }
    r
}

fn delay_message(id: &str, at_ms: i64) -> v2::Message {
    v2::Message {
        topic: res("d"),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: id.into(),
            message_type: v2::MessageType::Delay as i32,
            delivery_timestamp: Some(Timestamp {
                seconds: at_ms.div_euclid(1000),
                nanos: (at_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            ..Default::default()
        }),
        body: id.as_bytes().to_vec().into(),
    }
}

async fn send(
    c: &mut MessagingServiceClient<Channel>,
    m: v2::Message,
) -> anyhow::Result<v2::SendResultEntry> {
    let r = c
        .send_message(with_id(v2::SendMessageRequest { messages: vec![m] }, false))
        .await?
        .into_inner();
    r.entries
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no entry"))
}

async fn recall(
    c: &mut MessagingServiceClient<Channel>,
    handle: &str,
    rust: bool,
) -> anyhow::Result<v2::RecallMessageResponse> {
    Ok(c.recall_message(with_id(
        v2::RecallMessageRequest {
            topic: res("d"),
            recall_handle: handle.into(),
        },
        rust,
    ))
    .await?
    .into_inner())
}

fn code(s: &Option<v2::Status>) -> Option<Code> {
    s.as_ref().map(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_send_recall_and_delivery_over_grpc() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(T0);
    let broker = common::open_broker(
        dir.path(),
        BrokerConfig::new(dir.path()),
        Arc::new(clock.clone()),
    )?;
    broker.create_topic("d", MessageType::Delay, 2)?;
    broker.create_group("g", false, None, None, Some(StartPosition::Earliest))?;
    let server = common::serve(dir, broker.clone()).await?;
    let mut c = common::client(server.addr).await?;

    // Millisecond precision, kept exactly.
    let at = T0 + 5_123;
    let kept = send(&mut c, delay_message("KEEP", at)).await?;
    assert_eq!(code(&kept.status), Some(Code::Ok));
    assert!(!kept.recall_handle.is_empty());
    let gone = send(&mut c, delay_message("GONE", at)).await?;
    let r = recall(&mut c, &gone.recall_handle, false).await?;
    assert_eq!(code(&r.status), Some(Code::Ok));
    assert_eq!(r.message_id, "GONE");
    let r = recall(&mut c, "garbage", false).await?;
    assert_eq!(code(&r.status), Some(Code::BadRequest));
    let too_far = send(&mut c, delay_message("FAR", T0 + 41 * 86_400_000)).await?;
    assert_eq!(code(&too_far.status), Some(Code::IllegalDeliveryTime));

    clock.set(at);
    broker.run_timers_once().await?;
    let mut stream = c
        .receive_message(with_id(
            v2::ReceiveMessageRequest {
                group: res("g"),
                message_queue: Some(v2::MessageQueue {
                    topic: res("d"),
                    id: -1,
                    ..Default::default()
                }),
                filter_expression: Some(v2::FilterExpression {
                    r#type: v2::FilterType::Tag as i32,
                    expression: "*".into(),
                }),
                batch_size: 10,
                invisible_duration: Some(sluice_proto::prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                auto_renew: false,
                long_polling_timeout: Some(sluice_proto::prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                attempt_id: None,
            },
            false,
        ))
        .await?
        .into_inner();
    let mut got = Vec::new();
    while let Some(frame) = stream.message().await? {
        if let Some(Content::Message(m)) = frame.content {
            got.push(m);
        }
    }
    assert_eq!(got.len(), 1);
    let sp = got[0].system_properties.clone().unwrap_or_default();
    assert_eq!(sp.message_id, "KEEP");
    assert_eq!(sp.message_type, v2::MessageType::Delay as i32);
    assert_eq!(
        sp.delivery_timestamp,
        Some(Timestamp {
            seconds: at / 1000,
            nanos: 123_000_000
        })
    );

    // Too late now: NOT_FOUND, a code every client (rust 5.0.0 included) knows.
    for rust in [false, true] {
        let r = recall(&mut c, &kept.recall_handle, rust).await?;
        assert_eq!(code(&r.status), Some(Code::NotFound));
        assert!(r.message_id.is_empty());
    }
    server.shutdown().await;
    Ok(())
}
