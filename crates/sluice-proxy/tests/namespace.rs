//! Namespaces over gRPC: a client in namespace `prod` naming topic `t` uses the broker's
//! `prod%t`, whether the namespace comes in the `x-mq-namespace` header (Node.js), in
//! `Resource.resource_namespace` (Python fills both) or not at all (Rust); answers name
//! resources as the client does; namespaces do not see each other's messages.

use std::sync::Arc;

use sluice_broker::{BrokerConfig, MessageType, Messaging};
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code};
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
    for t in ["t", "prod%t"] {
        broker.create_topic(t, MessageType::Normal, 2)?;
    }
    broker.create_topic("only-global", MessageType::Normal, 1)?;
    for g in ["g", "prod%g"] {
        broker.create_group(g, false, Some(3), None, None)?;
    }
    common::serve(dir, broker).await
}

/// How a client says which namespace it is in.
#[derive(Clone, Copy)]
enum Style {
    /// Header only, resources without a namespace (Node.js).
    Header(&'static str),
    /// Both the header and every resource (Python).
    Both(&'static str),
    /// Resources only, no header.
    Resource(&'static str),
    /// Neither (Rust).
    None,
}

impl Style {
    fn req<T>(self, msg: T) -> tonic::Request<T> {
        let mut r = common::with_id("ns-test@1@1", msg);
        let h = match self {
            Style::Header(ns) | Style::Both(ns) => Some(ns),
            Style::Resource(_) => Some(""),
            Style::None => None,
        };
        if let Some(h) = h {
            r.metadata_mut()
                .insert("x-mq-namespace", h.parse().expect("header"));
        }
        r
    }

    fn res(self, name: &str) -> Option<v2::Resource> {
        match self {
            Style::Both(ns) | Style::Resource(ns) => Some(v2::Resource {
                resource_namespace: ns.into(),
                name: name.into(),
            }),
            Style::Header(_) | Style::None => res(name),
        }
    }
}

async fn send(
    c: &mut MessagingServiceClient<Channel>,
    style: Style,
    topic: &str,
    id: &str,
) -> anyhow::Result<v2::SendMessageResponse> {
    let m = v2::Message {
        topic: style.res(topic),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: id.into(),
            message_type: v2::MessageType::Normal as i32,
            ..Default::default()
        }),
        body: id.as_bytes().to_vec().into(),
    };
    Ok(
        c.send_message(style.req(v2::SendMessageRequest { messages: vec![m] }))
            .await?
            .into_inner(),
    )
}

async fn receive(
    c: &mut MessagingServiceClient<Channel>,
    style: Style,
    group: &str,
    topic: &str,
) -> anyhow::Result<(Code, Vec<v2::Message>)> {
    let r = common::receive_request(style.res(group), style.res(topic));
    let (code, msgs) = common::receive_all(c, style.req(r)).await?;
    Ok((code.ok_or_else(|| anyhow::anyhow!("no status"))?, msgs))
}

/// The status code of a QueryRoute of `topic` in the style's namespace.
async fn route(
    c: &mut MessagingServiceClient<Channel>,
    style: Style,
    topic: &str,
) -> anyhow::Result<Option<Code>> {
    let r = c
        .query_route(style.req(v2::QueryRouteRequest {
            topic: style.res(topic),
            endpoints: None,
        }))
        .await?
        .into_inner();
    Ok(r.status.map(|s| s.code()))
}

/// The status code of an ack of one received message as `g` on `t`.
async fn ack(
    c: &mut MessagingServiceClient<Channel>,
    style: Style,
    m: &v2::Message,
) -> anyhow::Result<Option<Code>> {
    let id = m
        .system_properties
        .as_ref()
        .map(|s| s.message_id.clone())
        .unwrap_or_default();
    let r = c
        .ack_message(style.req(v2::AckMessageRequest {
            group: style.res("g"),
            topic: style.res("t"),
            entries: vec![v2::AckMessageEntry {
                message_id: id,
                receipt_handle: handle(m),
                lite_topic: None,
            }],
        }))
        .await?
        .into_inner();
    Ok(r.status.map(|s| s.code()))
}

fn ids(msgs: &[v2::Message]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .filter_map(|m| m.system_properties.as_ref().map(|s| s.message_id.clone()))
        .collect();
    v.sort();
    v
}

fn handle(m: &v2::Message) -> String {
    m.system_properties
        .as_ref()
        .and_then(|s| s.receipt_handle.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_scope_topics_and_groups() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;

    // Every way of saying "prod" reaches prod%t; none reaches t.
    let prod = [
        Style::Header("prod"),
        Style::Both("prod"),
        Style::Resource("prod"),
    ];
    for (i, st) in prod.iter().enumerate() {
        let r = send(&mut c, *st, "t", &format!("P{i}")).await?;
        assert_eq!(r.status.map(|s| s.code()), Some(Code::Ok));
    }
    let r = send(&mut c, Style::None, "t", "G0").await?;
    assert_eq!(r.status.map(|s| s.code()), Some(Code::Ok));
    let stored = |t: &str| {
        (0..2)
            .map(|q| s.broker.store().queue_offsets(t, q).1)
            .sum::<u64>()
    };
    assert_eq!(stored("prod%t"), 3, "prod%t holds the three prod messages");
    assert_eq!(stored("t"), 1);

    // The header wins over a resource's own namespace.
    let mixed = Style::Resource("dev");
    let mut req = mixed.req(v2::QueryRouteRequest {
        topic: mixed.res("t"),
        endpoints: None,
    });
    req.metadata_mut()
        .insert("x-mq-namespace", "prod".parse().expect("header"));
    let routed = c.query_route(req).await?.into_inner();
    assert_eq!(routed.status.map(|s| s.code()), Some(Code::Ok));
    let t = routed.message_queues[0].topic.clone().unwrap_or_default();
    assert_eq!(
        (t.resource_namespace.as_str(), t.name.as_str()),
        ("prod", "t")
    );

    // A topic that exists only outside the namespace is not found inside it.
    let st = Style::Both("prod");
    assert_eq!(
        route(&mut c, st, "only-global").await?,
        Some(Code::TopicNotFound)
    );

    // Receives see their own namespace only, and name the topic as the client does.
    let (code, msgs) = receive(&mut c, Style::Header("prod"), "g", "t").await?;
    assert_eq!(code, Code::Ok);
    assert_eq!(ids(&msgs), vec!["P0", "P1", "P2"]);
    for m in &msgs {
        let t = m.topic.clone().unwrap_or_default();
        assert_eq!(
            (t.resource_namespace.as_str(), t.name.as_str()),
            ("prod", "t")
        );
    }
    let (code, global) = receive(&mut c, Style::None, "g", "t").await?;
    assert_eq!(code, Code::Ok);
    assert_eq!(ids(&global), vec!["G0"]);
    let t = global[0].topic.clone().unwrap_or_default();
    assert_eq!((t.resource_namespace.as_str(), t.name.as_str()), ("", "t"));

    // A prod receipt handle is not valid for the global topic, and is for prod.
    assert_ne!(ack(&mut c, Style::None, &msgs[0]).await?, Some(Code::Ok));
    let st = Style::Both("prod");
    assert_eq!(ack(&mut c, st, &msgs[0]).await?, Some(Code::Ok));

    // Dead letters of prod%g land in %DLQ%prod%g, which the prod client names %DLQ%g.
    let dlq = c
        .forward_message_to_dead_letter_queue(st.req(v2::ForwardMessageToDeadLetterQueueRequest {
            group: st.res("g"),
            topic: st.res("t"),
            receipt_handle: handle(&msgs[1]),
            message_id: "P1".into(),
            delivery_attempt: 1,
            max_delivery_attempts: 3,
            lite_topic: None,
        }))
        .await?
        .into_inner();
    assert_eq!(dlq.status.map(|s| s.code()), Some(Code::Ok));
    assert_eq!(route(&mut c, st, "%DLQ%g").await?, Some(Code::Ok));
    assert!(s.broker.route("%DLQ%prod%g").is_ok());
    assert!(s.broker.route("%DLQ%g").is_err());
    s.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_namespaces_get_bad_request_and_change_nothing() -> anyhow::Result<()> {
    let s = start().await?;
    let mut c = client(s.addr).await?;
    for bad in ["a.b", "x%y", "../etc"] {
        for st in [Style::Header(bad), Style::Resource(bad)] {
            assert_eq!(
                route(&mut c, st, "t").await?,
                Some(Code::BadRequest),
                "{bad}"
            );
            let sent = send(&mut c, st, "t", "X").await?;
            assert_eq!(
                sent.status.map(|s| s.code()),
                Some(Code::BadRequest),
                "{bad}"
            );
            let (code, msgs) = receive(&mut c, st, "g", "t").await?;
            assert_eq!(code, Code::BadRequest, "{bad}");
            assert!(msgs.is_empty());
        }
    }
    for t in ["t", "prod%t"] {
        for q in 0..2 {
            assert_eq!(s.broker.store().queue_offsets(t, q).1, 0);
        }
    }
    s.stop();
    Ok(())
}
