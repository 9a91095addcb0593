//! Transactions and stream reads over gRPC: a producer with an open Telemetry stream is
//! asked about its orphaned transaction (`RecoverOrphanedTransactionCommand`) and its
//! `EndTransaction(SOURCE_SERVER_CHECK)` resolves it; PullMessage frames and the offset
//! RPCs.

use std::sync::Arc;
use std::time::Duration;

use sluice_broker::{BrokerConfig, MessageType, StartPosition};
use sluice_common::ManualClock;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{
    self, Code, pull_message_response, receive_message_response, telemetry_command,
};
use tonic::transport::Channel;

mod common;

use common::{Server, res, with_id};

const PRODUCER: &str = "producer@1@1";

async fn start() -> anyhow::Result<(Server, ManualClock)> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(1_700_000_000_000);
    let mut cfg = BrokerConfig::new(dir.path());
    cfg.transaction_check_interval = Duration::from_secs(30);
    let broker = common::open_broker(dir.path(), cfg, Arc::new(clock.clone()))?;
    broker.create_topic("tx", MessageType::Transaction, 2)?;
    broker.create_topic("t", MessageType::Normal, 1)?;
    broker.create_group("g", false, None, None, Some(StartPosition::Earliest))?;
    Ok((common::serve(dir, broker).await?, clock))
}

fn tx_message(id: &str) -> v2::Message {
    v2::Message {
        topic: res("tx"),
        user_properties: [("order".to_string(), "42".to_string())].into(),
        system_properties: Some(v2::SystemProperties {
            tag: Some("paid".into()),
            message_id: id.into(),
            message_type: v2::MessageType::Transaction as i32,
            ..Default::default()
        }),
        body: b"order 42 paid".to_vec().into(),
    }
}

async fn send_tx(c: &mut MessagingServiceClient<Channel>, id: &str) -> anyhow::Result<String> {
    let r = c
        .send_message(with_id(
            PRODUCER,
            v2::SendMessageRequest {
                messages: vec![tx_message(id)],
            },
        ))
        .await?
        .into_inner();
    anyhow::ensure!(
        r.status.as_ref().map(|s| s.code) == Some(Code::Ok as i32),
        "{r:?}"
    );
    let e = &r.entries[0];
    anyhow::ensure!(e.message_id == id, "message id not echoed: {e:?}");
    anyhow::ensure!(!e.transaction_id.is_empty(), "empty transaction id");
    Ok(e.transaction_id.clone())
}

async fn receive_ids(c: &mut MessagingServiceClient<Channel>) -> anyhow::Result<Vec<String>> {
    let req = v2::ReceiveMessageRequest {
        group: res("g"),
        message_queue: Some(v2::MessageQueue {
            topic: res("tx"),
            id: -1,
            ..Default::default()
        }),
        batch_size: 16,
        invisible_duration: Some(sluice_proto::prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        long_polling_timeout: Some(sluice_proto::prost_types::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut stream = c
        .receive_message(with_id("consumer@1@1", req))
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(f) = stream.message().await? {
        if let Some(receive_message_response::Content::Message(m)) = f.content {
            ids.push(
                m.system_properties
                    .map(|s| s.message_id)
                    .unwrap_or_default(),
            );
        }
    }
    Ok(ids)
}

async fn end(
    c: &mut MessagingServiceClient<Channel>,
    id: &str,
    txid: &str,
    resolution: v2::TransactionResolution,
    source: v2::TransactionSource,
) -> anyhow::Result<v2::Status> {
    let r = c
        .end_transaction(with_id(
            PRODUCER,
            v2::EndTransactionRequest {
                topic: res("tx"),
                message_id: id.into(),
                transaction_id: txid.into(),
                resolution: resolution as i32,
                source: source as i32,
                trace_context: String::new(),
            },
        ))
        .await?
        .into_inner();
    r.status.ok_or_else(|| anyhow::anyhow!("no status"))
}

/// Opens the producer's Telemetry stream, announces the topic it publishes to and reads
/// the settings echo. Keep the sender: dropping it ends the stream.
async fn open_telemetry(
    c: &mut MessagingServiceClient<Channel>,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<v2::TelemetryCommand>,
    tonic::Streaming<v2::TelemetryCommand>,
)> {
    let (out, rx) = tokio::sync::mpsc::channel(4);
    out.send(v2::TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(v2::Settings {
            client_type: Some(v2::ClientType::Producer as i32),
            pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
                topics: vec![v2::Resource {
                    resource_namespace: String::new(),
                    name: "tx".into(),
                }],
                ..Default::default()
            })),
            ..Default::default()
        })),
    })
    .await?;
    let mut telemetry = c
        .telemetry(with_id(
            PRODUCER,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await?
        .into_inner();
    let echo = telemetry.message().await?.expect("settings echo");
    assert!(matches!(
        echo.command,
        Some(telemetry_command::Command::Settings(_))
    ));

    Ok((out, telemetry))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_checks_reaches_the_producer_paced_and_complete() -> anyhow::Result<()> {
    let (s, clock) = start().await?;
    let mut c = common::client(s.addr).await?;
    let (_out, mut telemetry) = open_telemetry(&mut c).await?;
    let n = sluice_broker::transaction::MAX_CHECKS_PER_RUN + 44;
    let mut open = std::collections::HashSet::new();
    for i in 0..n {
        open.insert(send_tx(&mut c, &format!("01AABBCCDDEEFF0002{i:08}")).await?);
    }
    clock.advance(30_000);
    // More checks are due than one run publishes: the rest follow in the next run, and
    // every one of them reaches the producer's stream (none dropped on a full queue).
    let first = s.broker.check_transactions().await?;
    assert_eq!(first, sluice_broker::transaction::MAX_CHECKS_PER_RUN);
    let second = s.broker.check_transactions().await?;
    assert_eq!(first + second, n);
    let mut asked = std::collections::HashSet::new();
    while asked.len() < n {
        let cmd = tokio::time::timeout(Duration::from_secs(10), telemetry.message())
            .await??
            .expect("a telemetry command");
        if let Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(rec)) =
            cmd.command
        {
            asked.insert(rec.transaction_id);
        }
    }
    assert_eq!(asked, open);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_transaction_is_checked_over_telemetry_and_resolved() -> anyhow::Result<()> {
    let (s, clock) = start().await?;
    let mut c = common::client(s.addr).await?;

    let (_out, mut telemetry) = open_telemetry(&mut c).await?;

    let id = "01AABBCCDDEEFF000100000001";
    let txid = send_tx(&mut c, id).await?;
    assert!(
        receive_ids(&mut c).await?.is_empty(),
        "half message visible"
    );

    // One check interval later the broker asks the producer.
    clock.advance(30_000);
    assert_eq!(s.broker.check_transactions().await?, 1);
    let cmd = tokio::time::timeout(Duration::from_secs(10), telemetry.message())
        .await??
        .expect("a telemetry command");
    let Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(rec)) = cmd.command
    else {
        anyhow::bail!("expected a RecoverOrphanedTransactionCommand, got {cmd:?}");
    };
    assert_eq!(rec.transaction_id, txid);
    let m = rec.message.expect("message");
    assert_eq!(m.topic.as_ref().map(|t| t.name.as_str()), Some("tx"));
    assert_eq!(m.body[..], b"order 42 paid"[..]);
    assert_eq!(
        m.user_properties.get("order").map(String::as_str),
        Some("42")
    );
    let sp = m.system_properties.expect("system properties");
    assert_eq!(sp.message_id, id);
    assert_eq!(sp.tag.as_deref(), Some("paid"));
    assert_eq!(sp.message_type, v2::MessageType::Transaction as i32);
    assert!(sp.body_digest.is_some(), "clients need the body digest");
    assert!(sp.receipt_handle.is_none());

    // "Don't know yet" changes nothing.
    let st = end(
        &mut c,
        &sp.message_id,
        &rec.transaction_id,
        v2::TransactionResolution::Unspecified,
        v2::TransactionSource::SourceServerCheck,
    )
    .await?;
    assert_eq!(st.code, Code::Ok as i32, "{st:?}");
    assert!(receive_ids(&mut c).await?.is_empty());

    // The producer answers the check.
    let st = end(
        &mut c,
        &sp.message_id,
        &rec.transaction_id,
        v2::TransactionResolution::Commit,
        v2::TransactionSource::SourceServerCheck,
    )
    .await?;
    assert_eq!(st.code, Code::Ok as i32, "{st:?}");
    assert_eq!(receive_ids(&mut c).await?, vec![id.to_string()]);

    // A second answer and an unknown id get clear codes.
    let st = end(
        &mut c,
        id,
        &txid,
        v2::TransactionResolution::Rollback,
        v2::TransactionSource::SourceServerCheck,
    )
    .await?;
    assert_eq!(st.code, Code::InvalidTransactionId as i32, "{st:?}");
    assert!(st.message.contains("already committed"), "{st:?}");
    let st = end(
        &mut c,
        id,
        "NOPE",
        v2::TransactionResolution::Commit,
        v2::TransactionSource::SourceClient,
    )
    .await?;
    assert_eq!(st.code, Code::InvalidTransactionId as i32, "{st:?}");

    // A client rollback: never delivered, never checked.
    let id2 = "01AABBCCDDEEFF000100000002";
    let txid2 = send_tx(&mut c, id2).await?;
    let st = end(
        &mut c,
        id2,
        &txid2,
        v2::TransactionResolution::Rollback,
        v2::TransactionSource::SourceClient,
    )
    .await?;
    assert_eq!(st.code, Code::Ok as i32, "{st:?}");
    clock.advance(30_000);
    assert_eq!(s.broker.check_transactions().await?, 0);
    assert!(receive_ids(&mut c).await?.is_empty());
    Ok(())
}

async fn pull(
    c: &mut MessagingServiceClient<Channel>,
    offset: i64,
    batch: i32,
) -> anyhow::Result<(v2::Status, Vec<v2::Message>, i64)> {
    let req = v2::PullMessageRequest {
        group: res("g"),
        message_queue: Some(v2::MessageQueue {
            topic: res("t"),
            id: 0,
            ..Default::default()
        }),
        offset,
        batch_size: batch,
        filter_expression: Some(v2::FilterExpression {
            r#type: v2::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        long_polling_timeout: None,
    };
    let mut stream = c
        .pull_message(with_id("puller@1@1", req))
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(f) = stream.message().await? {
        frames.push(f.content.ok_or_else(|| anyhow::anyhow!("empty frame"))?);
    }
    let mut it = frames.into_iter();
    let Some(pull_message_response::Content::Status(st)) = it.next() else {
        anyhow::bail!("the stream must start with a status frame");
    };
    let mut msgs = Vec::new();
    let mut next = None;
    for f in it {
        match f {
            pull_message_response::Content::Message(m) => {
                anyhow::ensure!(next.is_none(), "message after next_offset");
                msgs.push(m)
            }
            pull_message_response::Content::NextOffset(o) => next = Some(o),
            pull_message_response::Content::Status(_) => anyhow::bail!("second status frame"),
        }
    }
    Ok((
        st,
        msgs,
        next.ok_or_else(|| anyhow::anyhow!("no next_offset frame"))?,
    ))
}

fn queue_t0() -> Option<v2::MessageQueue> {
    Some(v2::MessageQueue {
        topic: res("t"),
        id: 0,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_offsets_over_grpc() -> anyhow::Result<()> {
    let (s, clock) = start().await?;
    let mut c = common::client(s.addr).await?;
    for i in 0..3 {
        let mut m = tx_message(&format!("ID{i}"));
        m.topic = res("t");
        if let Some(sp) = m.system_properties.as_mut() {
            sp.message_type = v2::MessageType::Normal as i32;
        }
        let r = c
            .send_message(with_id(
                PRODUCER,
                v2::SendMessageRequest { messages: vec![m] },
            ))
            .await?
            .into_inner();
        assert_eq!(r.status.map(|s| s.code), Some(Code::Ok as i32));
        clock.advance(1000);
    }
    let (st, msgs, next) = pull(&mut c, 0, 2).await?;
    assert_eq!(st.code, Code::Ok as i32);
    assert_eq!(msgs.len(), 2);
    assert_eq!(next, 2);
    let sp = msgs[1].system_properties.clone().expect("sp");
    assert_eq!(sp.message_id, "ID1");
    assert_eq!(sp.queue_offset, Some(1));
    assert!(sp.receipt_handle.is_none() && sp.body_digest.is_some());
    let (st, msgs, next) = pull(&mut c, 3, 2).await?;
    assert_eq!(
        (st.code, msgs.len(), next),
        (Code::MessageNotFound as i32, 0, 3)
    );
    let (st, _, next) = pull(&mut c, 9, 2).await?;
    assert_eq!((st.code, next), (Code::IllegalOffset as i32, 3));

    // Committed offsets.
    let get = |c: &mut MessagingServiceClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.get_offset(with_id(
                "puller@1@1",
                v2::GetOffsetRequest {
                    group: res("g"),
                    message_queue: queue_t0(),
                },
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    let r = get(&mut c).await?;
    assert_eq!(r.status.map(|s| s.code), Some(Code::OffsetNotFound as i32));
    let r = c
        .update_offset(with_id(
            "puller@1@1",
            v2::UpdateOffsetRequest {
                group: res("g"),
                message_queue: queue_t0(),
                offset: 2,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(Code::Ok as i32));
    let r = get(&mut c).await?;
    assert_eq!(
        (r.status.map(|s| s.code), r.offset),
        (Some(Code::Ok as i32), 2)
    );
    let r = c
        .update_offset(with_id(
            "puller@1@1",
            v2::UpdateOffsetRequest {
                group: res("g"),
                message_queue: queue_t0(),
                offset: 99,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(Code::IllegalOffset as i32));

    // Offset queries.
    let query = |policy: v2::QueryOffsetPolicy, ts: Option<i64>| {
        let mut c = c.clone();
        async move {
            c.query_offset(with_id(
                "puller@1@1",
                v2::QueryOffsetRequest {
                    message_queue: queue_t0(),
                    query_offset_policy: policy as i32,
                    timestamp: ts.map(|ms| sluice_proto::prost_types::Timestamp {
                        seconds: ms / 1000,
                        nanos: 0,
                    }),
                },
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    let r = query(v2::QueryOffsetPolicy::Beginning, None).await?;
    assert_eq!(
        (r.status.map(|s| s.code), r.offset),
        (Some(Code::Ok as i32), 0)
    );
    let r = query(v2::QueryOffsetPolicy::End, None).await?;
    assert_eq!(r.offset, 3);
    let r = query(v2::QueryOffsetPolicy::Timestamp, Some(1_700_000_001_000)).await?;
    assert_eq!(r.offset, 1);
    let r = query(v2::QueryOffsetPolicy::Timestamp, None).await?;
    assert_eq!(r.status.map(|s| s.code), Some(Code::BadRequest as i32));
    Ok(())
}
