//! The gRPC edge end to end: a real broker and store behind a real tonic server on
//! 127.0.0.1, driven with a generated client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_broker::{BrokerConfig, MessageType};
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code, receive_message_response::Content, telemetry_command};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

mod common;

use common::{Server, client, res};

async fn start() -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let broker = common::open_broker(
        dir.path(),
        BrokerConfig::new(dir.path()),
        Arc::new(sluice_common::SystemClock),
    )?;
    broker.create_topic("t", MessageType::Normal, 4)?;
    broker.create_group("g", false, Some(3), None, None)?;
    common::serve(dir, broker).await
}

fn with_id<T>(msg: T) -> tonic::Request<T> {
    common::with_id("test@1@1", msg)
}

fn message(id: &str, body: &[u8]) -> v2::Message {
    v2::Message {
        topic: res("t"),
        user_properties: HashMap::from([("color".to_string(), "red".to_string())]),
        system_properties: Some(v2::SystemProperties {
            tag: Some("tagA".into()),
            keys: vec!["k1".into()],
            message_id: id.into(),
            message_type: v2::MessageType::Normal as i32,
            queue_id: 0,
            ..Default::default()
        }),
        body: body.to_vec().into(),
    }
}

async fn receive(
    c: &mut MessagingServiceClient<Channel>,
    batch: i32,
    invisible_s: i64,
) -> anyhow::Result<(v2::Status, Vec<v2::Message>)> {
    let req = v2::ReceiveMessageRequest {
        group: res("g"),
        message_queue: Some(v2::MessageQueue {
            topic: res("t"),
            id: -1,
            ..Default::default()
        }),
        filter_expression: Some(v2::FilterExpression {
            r#type: v2::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: batch,
        invisible_duration: Some(sluice_proto::prost_types::Duration {
            seconds: invisible_s,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(sluice_proto::prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        attempt_id: None,
    };
    let mut stream = c.receive_message(with_id(req)).await?.into_inner();
    let mut status = None;
    let mut msgs = Vec::new();
    let mut saw_ts = false;
    while let Some(frame) = stream.message().await? {
        match frame.content {
            Some(Content::Status(s)) => status = Some(s),
            Some(Content::Message(m)) => msgs.push(m),
            Some(Content::DeliveryTimestamp(_)) => saw_ts = true,
            None => anyhow::bail!("empty frame"),
        }
    }
    anyhow::ensure!(saw_ts, "stream must end with a delivery timestamp");
    Ok((
        status.ok_or_else(|| anyhow::anyhow!("no status frame"))?,
        msgs,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_send_receive_ack() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    let route = c
        .query_route(with_id(v2::QueryRouteRequest {
            topic: res("t"),
            endpoints: Some(v2::Endpoints {
                scheme: v2::AddressScheme::IPv4 as i32,
                addresses: vec![v2::Address {
                    host: "127.0.0.1".into(),
                    port: s.addr.port() as i32,
                }],
            }),
        }))
        .await?
        .into_inner();
    assert_eq!(route.status.as_ref().map(|s| s.code()), Some(Code::Ok));
    assert_eq!(route.message_queues.len(), 4);
    assert_eq!(route.message_queues[0].id, 0);
    assert_eq!(
        route.message_queues[0].broker.as_ref().map(|b| b.id),
        Some(0)
    );
    let missing = c
        .query_route(with_id(v2::QueryRouteRequest {
            topic: res("nope"),
            endpoints: None,
        }))
        .await?
        .into_inner();
    assert_eq!(missing.status.map(|s| s.code()), Some(Code::TopicNotFound));

    let sent = c
        .send_message(with_id(v2::SendMessageRequest {
            messages: vec![message("M1", b"hello"), message("M2", b"world")],
        }))
        .await?
        .into_inner();
    assert_eq!(sent.status.as_ref().map(|s| s.code()), Some(Code::Ok));
    assert_eq!(sent.entries[0].message_id, "M1");

    let (st, msgs) = receive(&mut c, 32, 30).await?;
    assert_eq!(st.code(), Code::Ok);
    assert_eq!(msgs.len(), 2);
    let m = msgs
        .iter()
        .find(|m| m.body[..] == b"hello"[..])
        .expect("M1");
    let sp = m.system_properties.as_ref().expect("system properties");
    assert_eq!(sp.message_id, "M1");
    assert_eq!(sp.tag.as_deref(), Some("tagA"));
    assert_eq!(sp.keys, vec!["k1"]);
    assert_eq!(
        m.user_properties.get("color").map(String::as_str),
        Some("red")
    );
    assert_eq!(
        sp.body_digest.as_ref().map(|d| d.checksum.as_str()),
        Some("5D41402ABC4B2A76B9719D911017C592")
    );
    assert_eq!(sp.delivery_attempt, Some(1));
    let handles: Vec<v2::AckMessageEntry> = msgs
        .iter()
        .map(|m| {
            let sp = m.system_properties.clone().unwrap_or_default();
            v2::AckMessageEntry {
                message_id: sp.message_id,
                receipt_handle: sp.receipt_handle.unwrap_or_default(),
                lite_topic: None,
            }
        })
        .collect();
    let ack = c
        .ack_message(with_id(v2::AckMessageRequest {
            group: res("g"),
            topic: res("t"),
            entries: handles.clone(),
        }))
        .await?
        .into_inner();
    assert_eq!(ack.status.map(|s| s.code()), Some(Code::Ok));
    let again = c
        .ack_message(with_id(v2::AckMessageRequest {
            group: res("g"),
            topic: res("t"),
            entries: handles,
        }))
        .await?
        .into_inner();
    assert_eq!(
        again.status.map(|s| s.code()),
        Some(Code::InvalidReceiptHandle)
    );
    let (st, msgs) = receive(&mut c, 32, 30).await?;
    assert_eq!(st.code(), Code::MessageNotFound);
    assert!(msgs.is_empty());
    s.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_echoes_merged_settings() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let settings = v2::Settings {
        client_type: Some(v2::ClientType::Producer as i32),
        pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
            topics: vec![res("t").expect("r")],
            ..Default::default()
        })),
        ..Default::default()
    };
    tx.send(v2::TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(settings)),
    })
    .await?;
    let mut inbound = c
        .telemetry(with_id(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await??
        .expect("a reply");
    assert_eq!(reply.status.map(|s| s.code()), Some(Code::Ok));
    let Some(telemetry_command::Command::Settings(s)) = reply.command else {
        anyhow::bail!("no settings")
    };
    let Some(v2::settings::PubSub::Publishing(p)) = s.pub_sub else {
        anyhow::bail!("no publishing")
    };
    assert_eq!(p.max_body_size, 4 << 20);
    assert!(matches!(
        s.backoff_policy.and_then(|b| b.strategy),
        Some(v2::retry_policy::Strategy::ExponentialBackoff(_))
    ));
    // Consumer settings carry the group's FIFO flag and polling settings.
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    tx2.send(v2::TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(v2::Settings {
            client_type: Some(v2::ClientType::PushConsumer as i32),
            pub_sub: Some(v2::settings::PubSub::Subscription(v2::Subscription {
                group: res("g"),
                ..Default::default()
            })),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = c
        .telemetry(with_id(tokio_stream::wrappers::ReceiverStream::new(rx2)))
        .await?
        .into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await??
        .expect("a reply");
    let Some(telemetry_command::Command::Settings(s)) = reply.command else {
        anyhow::bail!("no settings")
    };
    let Some(v2::settings::PubSub::Subscription(sub)) = s.pub_sub else {
        anyhow::bail!("no subscription")
    };
    assert_eq!(sub.fifo, Some(false));
    assert_eq!(sub.receive_batch_size, Some(32));
    assert!(sub.long_polling_timeout.is_some_and(|d| d.seconds > 0));
    assert_eq!(s.backoff_policy.map(|b| b.max_attempts), Some(3));
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_codes_and_changes_nothing() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    // No client id.
    let r = c
        .send_message(tonic::Request::new(v2::SendMessageRequest {
            messages: vec![message("X", b"x")],
        }))
        .await?
        .into_inner();
    assert_eq!(r.status.map(|s| s.code()), Some(Code::ClientIdRequired));
    let cases: Vec<(v2::Message, Code)> = vec![
        (message("X1", b""), Code::MessageBodyEmpty),
        (
            message("X2", &vec![0u8; 5 << 20]),
            Code::MessageBodyTooLarge,
        ),
        (
            v2::Message {
                topic: res("nope"),
                ..message("X3", b"x")
            },
            Code::TopicNotFound,
        ),
        (
            {
                let mut m = message("X4", b"x");
                m.user_properties.insert("UNIQ_KEY".into(), "v".into());
                m
            },
            Code::IllegalMessagePropertyKey,
        ),
        (
            {
                let mut m = message("X5", b"x");
                if let Some(sp) = m.system_properties.as_mut() {
                    sp.message_type = v2::MessageType::Fifo as i32;
                    sp.message_group = Some("g1".into());
                }
                m
            },
            Code::MessagePropertyConflictWithType,
        ),
        (
            {
                let mut m = message("", b"x");
                if let Some(sp) = m.system_properties.as_mut() {
                    sp.message_id.clear();
                }
                m
            },
            Code::IllegalMessageId,
        ),
    ];
    for (m, code) in cases {
        let r = c
            .send_message(with_id(v2::SendMessageRequest { messages: vec![m] }))
            .await?
            .into_inner();
        assert_eq!(r.status.map(|s| s.code()), Some(code));
    }
    // The rust client does not know MESSAGE_BODY_EMPTY: it gets a code it understands.
    let mut req = with_id(v2::SendMessageRequest {
        messages: vec![message("X6", b"")],
    });
    req.metadata_mut()
        .insert("x-mq-language", "RUST".parse().expect("header"));
    let r = c.send_message(req).await?.into_inner();
    assert_eq!(r.status.map(|s| s.code()), Some(Code::BadRequest));
    // Mixed results.
    let r = c
        .send_message(with_id(v2::SendMessageRequest {
            messages: vec![message("OK1", b"x"), message("BAD", b"")],
        }))
        .await?
        .into_inner();
    assert_eq!(r.status.map(|s| s.code()), Some(Code::MultipleResults));
    assert_eq!(
        s.broker
            .topic_status("t")?
            .queue_status
            .iter()
            .map(|q| q.max_offset)
            .sum::<u64>(),
        1
    );
    // Garbage handles and filters.
    let ack = c
        .ack_message(with_id(v2::AckMessageRequest {
            group: res("g"),
            topic: res("t"),
            entries: vec![v2::AckMessageEntry {
                message_id: "x".into(),
                receipt_handle: "forged".into(),
                lite_topic: None,
            }],
        }))
        .await?
        .into_inner();
    assert_eq!(
        ack.status.map(|s| s.code()),
        Some(Code::InvalidReceiptHandle)
    );
    let mut req = v2::ReceiveMessageRequest {
        group: res("g"),
        message_queue: Some(v2::MessageQueue {
            topic: res("t"),
            id: 0,
            ..Default::default()
        }),
        filter_expression: Some(v2::FilterExpression {
            r#type: v2::FilterType::Sql as i32,
            expression: "a >".into(),
        }),
        batch_size: 1,
        invisible_duration: Some(sluice_proto::prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut st = c.receive_message(with_id(req.clone())).await?.into_inner();
    let first = st.message().await?.and_then(|f| f.content);
    assert!(matches!(first, Some(Content::Status(s)) if s.code() == Code::IllegalFilterExpression));
    req.filter_expression = None;
    req.group = res("nope");
    let mut st = c.receive_message(with_id(req)).await?.into_inner();
    let first = st.message().await?.and_then(|f| f.content);
    assert!(matches!(first, Some(Content::Status(s)) if s.code() == Code::ConsumerGroupNotFound));
    // Garbage bytes on a raw socket do not disturb other clients.
    for _ in 0..20 {
        let mut raw = tokio::net::TcpStream::connect(s.addr).await?;
        raw.write_all(b"\x00\x01garbage that is not http/2 at all\r\n\r\n")
            .await?;
        drop(raw);
    }
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(tokio::net::TcpStream::connect(s.addr).await?);
    }
    let r = c
        .send_message(with_id(v2::SendMessageRequest {
            messages: vec![message("OK2", b"x")],
        }))
        .await?
        .into_inner();
    assert_eq!(r.status.map(|s| s.code()), Some(Code::Ok));
    Ok(())
}

/// A shutdown closes the listener at once, lets a request already in flight (a long poll)
/// finish with its answer, and then ends the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_and_finishes_requests_in_flight() -> anyhow::Result<()> {
    let s = start().await?;
    let addr = s.addr;
    let mut c = client(addr).await?;
    // A long poll of 1 s on an empty topic: in flight when the shutdown starts.
    let polling = tokio::spawn(async move { receive(&mut c, 16, 30).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::spawn(s.shutdown());
    // New connections are refused within moments (not after the drain).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            // Reset: the attempt reached the backlog of the closing socket.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break;
            }
            Err(e) => anyhow::bail!("unexpected connect error: {e}"),
            Ok(_) => {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "still accepting 5 s after the shutdown started"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Refused while the long poll was still open: the listener did not wait for the drain.
    let poll_was_open = !polling.is_finished();
    // The long poll still gets its whole answer: a status and the closing timestamp.
    let (status, msgs) = tokio::time::timeout(Duration::from_secs(10), polling).await???;
    assert_eq!(status.code(), Code::MessageNotFound, "{status:?}");
    assert!(msgs.is_empty());
    tokio::time::timeout(Duration::from_secs(10), stopped).await??;
    assert!(
        poll_was_open,
        "new connections were accepted until the request in flight had finished"
    );
    Ok(())
}
