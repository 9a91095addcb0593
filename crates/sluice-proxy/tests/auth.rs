//! Authentication and permissions over gRPC: with an ACL configured, unsigned or wrongly
//! signed requests get UNAUTHORIZED, signed ones for topics or groups their user may not
//! use get FORBIDDEN, and neither changes anything; allowed ones work as without an ACL.

use std::sync::Arc;

use sluice_broker::{BrokerConfig, MessageType};
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code};
use sluice_proxy::ProxyConfig;
use sluice_proxy::auth::{Acl, SharedAcl, sign};
use tonic::transport::Channel;

mod common;

use common::{Server, client, res};

const ACL: &str = r#"
[[users]]
access_key = "producer"
secret_key = "p-secret"
publish = ["orders"]

[[users]]
access_key = "consumer"
secret_key = "c-secret"
subscribe = ["orders"]
groups = ["billing"]
"#;

async fn start() -> anyhow::Result<Server> {
    Ok(start_shared().await?.0)
}

/// [`start`], with the ACL handle the server checks requests against.
async fn start_shared() -> anyhow::Result<(Server, Arc<SharedAcl>)> {
    let dir = tempfile::tempdir()?;
    let broker = common::open_broker(
        dir.path(),
        BrokerConfig::new(dir.path()),
        Arc::new(sluice_common::SystemClock),
    )?;
    broker.create_topic("orders", MessageType::Normal, 2)?;
    broker.create_topic("payments", MessageType::Normal, 2)?;
    broker.create_group("billing", false, Some(3), None, None)?;
    broker.create_group("audit", false, Some(3), None, None)?;
    let acl = Arc::new(SharedAcl::new(Acl::from_toml(ACL)?));
    let cfg = ProxyConfig {
        acl: Some(acl.clone()),
        ..ProxyConfig::default()
    };
    Ok((common::serve_with(dir, broker, cfg).await?, acl))
}

/// Who signs a request.
#[derive(Clone, Copy)]
enum As {
    Nobody,
    /// Python without credentials: an empty Credential.
    Empty,
    User(&'static str, &'static str),
}

fn req<T>(who: As, msg: T) -> tonic::Request<T> {
    let mut r = common::with_id("auth-test@1@1", msg);
    let date = "20261203T120000Z";
    let md = r.metadata_mut();
    md.insert("x-mq-date-time", date.parse().expect("header"));
    let h = match who {
        As::Nobody => return r,
        As::Empty => {
            "MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, Signature=".to_string()
        }
        As::User(k, s) => sign(k, s, date),
    };
    md.insert("authorization", h.parse().expect("header"));
    r
}

async fn send(
    c: &mut MessagingServiceClient<Channel>,
    who: As,
    topic: &str,
    id: &str,
) -> anyhow::Result<Option<Code>> {
    let m = v2::Message {
        topic: res(topic),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: id.into(),
            message_type: v2::MessageType::Normal as i32,
            ..Default::default()
        }),
        body: id.as_bytes().to_vec().into(),
    };
    let r = c
        .send_message(req(who, v2::SendMessageRequest { messages: vec![m] }))
        .await?
        .into_inner();
    Ok(r.status.map(|s| s.code()))
}

async fn receive(
    c: &mut MessagingServiceClient<Channel>,
    who: As,
    group: &str,
    topic: &str,
) -> anyhow::Result<(Option<Code>, usize)> {
    let r = common::receive_request(res(group), res(topic));
    let (code, msgs) = common::receive_all(c, req(who, r)).await?;
    Ok((code, msgs.len()))
}

async fn route(
    c: &mut MessagingServiceClient<Channel>,
    who: As,
    topic: &str,
) -> anyhow::Result<Option<Code>> {
    let r = c
        .query_route(req(
            who,
            v2::QueryRouteRequest {
                topic: res(topic),
                endpoints: None,
            },
        ))
        .await?
        .into_inner();
    Ok(r.status.map(|s| s.code()))
}

const PRODUCER: As = As::User("producer", "p-secret");
const CONSUMER: As = As::User("consumer", "c-secret");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_forged_requests_are_unauthorized_and_change_nothing() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    for who in [
        As::Nobody,
        As::Empty,
        As::User("producer", "wrong"),
        As::User("stranger", "p-secret"),
    ] {
        assert_eq!(
            route(&mut c, who, "orders").await?,
            Some(Code::Unauthorized)
        );
        assert_eq!(
            send(&mut c, who, "orders", "X").await?,
            Some(Code::Unauthorized)
        );
        let (code, n) = receive(&mut c, who, "billing", "orders").await?;
        assert_eq!((code, n), (Some(Code::Unauthorized), 0));
        let hb = c
            .heartbeat(req(who, v2::HeartbeatRequest::default()))
            .await?
            .into_inner();
        assert_eq!(hb.status.map(|s| s.code()), Some(Code::Unauthorized));
        // Telemetry is a stream: refused with the gRPC status.
        let t = c
            .telemetry(req(
                who,
                tokio_stream::iter(Vec::<v2::TelemetryCommand>::new()),
            ))
            .await;
        assert_eq!(
            t.err().map(|e| e.code()),
            Some(tonic::Code::Unauthenticated)
        );
    }
    for q in 0..2 {
        assert_eq!(s.broker.store().queue_offsets("orders", q).1, 0);
    }
    s.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_get_what_the_acl_allows_and_forbidden_otherwise() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    // Routes need publish or subscribe on the topic.
    assert_eq!(route(&mut c, PRODUCER, "orders").await?, Some(Code::Ok));
    assert_eq!(route(&mut c, CONSUMER, "orders").await?, Some(Code::Ok));
    assert_eq!(
        route(&mut c, PRODUCER, "payments").await?,
        Some(Code::Forbidden)
    );

    assert_eq!(send(&mut c, PRODUCER, "orders", "A").await?, Some(Code::Ok));
    assert_eq!(
        send(&mut c, PRODUCER, "payments", "B").await?,
        Some(Code::Forbidden)
    );
    assert_eq!(
        send(&mut c, CONSUMER, "orders", "C").await?,
        Some(Code::Forbidden)
    );
    let stored = |t: &str| {
        (0..2)
            .map(|q| s.broker.store().queue_offsets(t, q).1)
            .sum::<u64>()
    };
    assert_eq!((stored("orders"), stored("payments")), (1, 0));

    // Consuming needs the topic and the group.
    assert_eq!(
        receive(&mut c, PRODUCER, "billing", "orders").await?.0,
        Some(Code::Forbidden)
    );
    assert_eq!(
        receive(&mut c, CONSUMER, "audit", "orders").await?.0,
        Some(Code::Forbidden)
    );
    assert_eq!(
        receive(&mut c, CONSUMER, "billing", "orders").await?,
        (Some(Code::Ok), 1)
    );
    let hb = c
        .heartbeat(req(CONSUMER, v2::HeartbeatRequest::default()))
        .await?
        .into_inner();
    assert_eq!(hb.status.map(|s| s.code()), Some(Code::Ok));
    // Offsets of a group the user may not consume as are not even read.
    let off = c
        .get_offset(req(
            PRODUCER,
            v2::GetOffsetRequest {
                group: res("billing"),
                message_queue: Some(v2::MessageQueue {
                    topic: res("orders"),
                    id: 0,
                    ..Default::default()
                }),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(off.status.map(|s| s.code()), Some(Code::Forbidden));
    s.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_acl_applies_to_the_next_request_on_open_connections() -> anyhow::Result<()> {
    let (s, acl) = start_shared().await?;
    let mut c = client(s.addr).await?;
    let producer = As::User("producer", "p-secret");
    assert_eq!(
        send(&mut c, producer, "orders", "before").await?,
        Some(Code::Ok)
    );
    assert_eq!(
        send(&mut c, As::User("newcomer", "n-secret"), "payments", "x").await?,
        Some(Code::Unauthorized)
    );

    // The producer loses "orders" and gains "payments"; a new user appears; the same
    // connection is used throughout.
    acl.replace(Acl::from_toml(
        r#"
[[users]]
access_key = "producer"
secret_key = "p-secret"
publish = ["payments"]

[[users]]
access_key = "newcomer"
secret_key = "n-secret"
publish = ["payments"]
"#,
    )?);
    assert_eq!(
        send(&mut c, producer, "orders", "after").await?,
        Some(Code::Forbidden)
    );
    assert_eq!(
        send(&mut c, producer, "payments", "p1").await?,
        Some(Code::Ok)
    );
    assert_eq!(
        send(&mut c, As::User("newcomer", "n-secret"), "payments", "p2").await?,
        Some(Code::Ok)
    );
    // A changed secret: the old signature no longer passes, though it was cached.
    acl.replace(Acl::from_toml(
        "[[users]]\naccess_key = \"producer\"\nsecret_key = \"rotated\"\npublish = [\"*\"]\n",
    )?);
    assert_eq!(
        send(&mut c, producer, "payments", "p3").await?,
        Some(Code::Unauthorized)
    );
    assert_eq!(
        send(&mut c, As::User("producer", "rotated"), "payments", "p4").await?,
        Some(Code::Ok)
    );
    let stored = |t: &str| {
        (0..2)
            .map(|q| s.broker.store().queue_offsets(t, q).1)
            .sum::<u64>()
    };
    assert_eq!((stored("orders"), stored("payments")), (1, 3));
    Ok(())
}
