//! Broker behaviour over a real store in a temporary directory.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::*;
use sluice_common::ManualClock;

mod common;

use common::{Env, open_at};

fn env() -> Env {
    open_at(
        tempfile::tempdir().expect("tempdir"),
        ManualClock::new(1_700_000_000_000),
    )
}

fn reopen(e: Env) -> Env {
    let Env { dir, clock, broker } = e;
    broker.snapshot_pop().ok();
    drop(broker);
    open_at(dir, clock)
}

fn msg(topic: &str, i: u32, tag: &str) -> Message {
    Message {
        topic: topic.into(),
        message_id: format!("ID{i:04}"),
        tag: Some(tag.into()),
        keys: vec![format!("key-{i}")],
        user_properties: BTreeMap::from([("n".to_string(), i.to_string())]),
        body: Bytes::from(format!("body {i}")),
        born_timestamp_ms: 1,
        ..Default::default()
    }
}

fn req(group: &str, topic: &str, max: u32) -> ReceiveRequest {
    ReceiveRequest {
        group: group.into(),
        topic: topic.into(),
        filter: Filter::All,
        max_messages: max,
        invisible: Duration::from_secs(30),
        long_poll: Duration::ZERO,
    }
}

async fn send_all(b: &Broker, msgs: Vec<Message>) {
    for r in b.send(msgs).await {
        r.expect("send");
    }
}

#[tokio::test]
async fn send_receive_ack_and_no_redelivery() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 4).expect("topic");
    b.create_group("g", false, None, None, None).expect("group");
    send_all(b, (0..20).map(|i| msg("t", i, "a")).collect()).await;
    let got = b.receive(req("g", "t", 32)).await.expect("receive");
    assert_eq!(got.len(), 20);
    let d = got
        .iter()
        .find(|d| d.message.message_id == "ID0007")
        .expect("id 7");
    assert_eq!(d.message.tag.as_deref(), Some("a"));
    assert_eq!(d.message.keys, vec!["key-7"]);
    assert_eq!(
        d.message.user_properties.get("n").map(String::as_str),
        Some("7")
    );
    assert_eq!(&d.message.body[..], b"body 7");
    assert_eq!(d.delivery_attempt, 1);
    for d in &got {
        b.ack("g", "t", &d.receipt_handle).await.expect("ack");
    }
    // A second ack of the same handle is refused.
    assert!(matches!(
        b.ack("g", "t", &got[0].receipt_handle).await,
        Err(BrokerError::InvalidReceiptHandle(_))
    ));
    e.clock.advance(60_000);
    assert!(
        b.receive(req("g", "t", 32))
            .await
            .expect("receive")
            .is_empty()
    );
    let st = b.group_status("g").expect("status");
    assert_eq!(st.queues.iter().map(|q| q.inflight).sum::<u64>(), 0);
    assert_eq!(st.queues.iter().map(|q| q.lag).sum::<u64>(), 0);
}

#[tokio::test]
async fn unacked_messages_come_back_then_go_to_the_dead_letter_topic() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 1).expect("topic");
    b.create_group("g", false, Some(2), None, None)
        .expect("group");
    send_all(b, vec![msg("t", 1, "a")]).await;
    let first = b.receive(req("g", "t", 1)).await.expect("receive");
    assert_eq!(first[0].delivery_attempt, 1);
    // Still invisible.
    e.clock.advance(29_000);
    assert!(
        b.receive(req("g", "t", 1))
            .await
            .expect("receive")
            .is_empty()
    );
    e.clock.advance(2_000);
    let second = b.receive(req("g", "t", 1)).await.expect("receive");
    assert_eq!(second[0].delivery_attempt, 2);
    assert_eq!(second[0].message.message_id, "ID0001");
    // The first delivery's handle is stale now.
    assert!(matches!(
        b.ack("g", "t", &first[0].receipt_handle).await,
        Err(BrokerError::InvalidReceiptHandle(_))
    ));
    e.clock.advance(31_000);
    assert!(
        b.receive(req("g", "t", 1))
            .await
            .expect("receive")
            .is_empty()
    );
    let dlq = b.topic_status("%DLQ%g").expect("dlq exists");
    assert_eq!(dlq.queue_status[0].max_offset, 1);
    b.create_group(
        "dlq-reader",
        false,
        None,
        None,
        Some(StartPosition::Earliest),
    )
    .expect("group");
    let dead = b
        .receive(req("dlq-reader", "%DLQ%g", 10))
        .await
        .expect("receive dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.message_id, "ID0001");
    assert_eq!(&dead[0].message.body[..], b"body 1");
    // Re-send puts a copy back on the original topic.
    assert_eq!(b.resend_dead_letters("g", 10).await.expect("resend"), 1);
    assert_eq!(
        b.topic_status("t").expect("t").queue_status[0].max_offset,
        2
    );
    assert_eq!(b.resend_dead_letters("g", 10).await.expect("resend"), 0);
}

#[tokio::test]
async fn nack_by_change_invisible_and_explicit_dead_letter() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 1).expect("topic");
    b.create_group("g", false, None, None, None).expect("group");
    send_all(b, vec![msg("t", 1, "a"), msg("t", 2, "a")]).await;
    let got = b.receive(req("g", "t", 2)).await.expect("receive");
    let h = b
        .change_invisible("g", "t", &got[0].receipt_handle, Duration::from_secs(1))
        .await
        .expect("nack");
    e.clock.advance(1_000);
    let again = b.receive(req("g", "t", 2)).await.expect("receive");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery_attempt, 2);
    assert!(
        b.ack("g", "t", &h).await.is_err(),
        "handle of the earlier delivery is stale"
    );
    b.forward_to_dead_letter("g", "t", &got[1].receipt_handle)
        .await
        .expect("dlq");
    assert_eq!(
        b.topic_status("%DLQ%g").expect("dlq").queue_status[0].max_offset,
        1
    );
}

#[tokio::test]
async fn filters_tag_and_sql() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 2).expect("topic");
    b.create_group("tags", false, None, None, None)
        .expect("group");
    b.create_group("sql", false, None, None, None)
        .expect("group");
    send_all(
        b,
        (0..30)
            .map(|i| msg("t", i, if i % 3 == 0 { "x" } else { "y" }))
            .collect(),
    )
    .await;
    let mut r = req("tags", "t", 100);
    r.filter = Filter::parse(FilterKind::Tag, "x || z").expect("tag filter");
    let got = b.receive(r).await.expect("receive");
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|d| d.message.tag.as_deref() == Some("x")));
    let mut r = req("sql", "t", 100);
    r.filter = Filter::parse(FilterKind::Sql, "n BETWEEN 5 AND 9 AND TAGS = 'y'").expect("sql");
    let got = b.receive(r).await.expect("receive");
    let mut ns: Vec<u32> = got
        .iter()
        .map(|d| d.message.user_properties["n"].parse().expect("n"))
        .collect();
    ns.sort();
    assert_eq!(ns, vec![5, 7, 8]);
}

#[tokio::test]
async fn acks_and_inflight_survive_restart() {
    let e = env();
    e.broker
        .create_topic("t", MessageType::Normal, 2)
        .expect("topic");
    e.broker
        .create_group("g", false, None, None, None)
        .expect("group");
    send_all(&e.broker, (0..10).map(|i| msg("t", i, "a")).collect()).await;
    let got = e.broker.receive(req("g", "t", 10)).await.expect("receive");
    assert_eq!(got.len(), 10);
    for d in &got[..6] {
        e.broker
            .ack("g", "t", &d.receipt_handle)
            .await
            .expect("ack");
    }
    // Restart without a fresh snapshot: state comes from the POP log.
    let Env { dir, clock, broker } = e;
    drop(broker);
    let e = open_at(dir, clock);
    // Handles issued before the restart still work.
    e.broker
        .ack("g", "t", &got[6].receipt_handle)
        .await
        .expect("ack after restart");
    e.clock.advance(31_000);
    let back = e.broker.receive(req("g", "t", 10)).await.expect("receive");
    let mut ids: Vec<String> = back.iter().map(|d| d.message.message_id.clone()).collect();
    ids.sort();
    let mut want: Vec<String> = got[7..]
        .iter()
        .map(|d| d.message.message_id.clone())
        .collect();
    want.sort();
    assert_eq!(ids, want, "only unacked messages come back");
    let e = reopen(e);
    e.clock.advance(31_000);
    assert_eq!(
        e.broker
            .receive(req("g", "t", 10))
            .await
            .expect("receive")
            .len(),
        3
    );
}

#[tokio::test]
async fn start_positions_and_reset() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 1).expect("topic");
    send_all(b, vec![msg("t", 1, "a")]).await;
    e.clock.advance(10);
    b.create_group("latest", false, None, None, None)
        .expect("group");
    b.create_group("earliest", false, None, None, Some(StartPosition::Earliest))
        .expect("group");
    e.clock.advance(10);
    send_all(b, vec![msg("t", 2, "a")]).await;
    let l = b.receive(req("latest", "t", 10)).await.expect("receive");
    assert_eq!(
        l.iter()
            .map(|d| d.message.message_id.as_str())
            .collect::<Vec<_>>(),
        vec!["ID0002"]
    );
    assert_eq!(
        b.receive(req("earliest", "t", 10))
            .await
            .expect("receive")
            .len(),
        2
    );
    b.reset_offset("latest", "t", 0).await.expect("reset");
    assert_eq!(
        b.receive(req("latest", "t", 10))
            .await
            .expect("receive")
            .len(),
        1,
        "the in-flight one stays in flight"
    );
}

type Check = fn(&BrokerError) -> bool;

#[tokio::test]
#[allow(clippy::vec_init_then_push)]
async fn bad_input_changes_nothing() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 1).expect("topic");
    b.create_topic("f", MessageType::Fifo, 1).expect("topic");
    b.create_group("g", false, None, None, None).expect("group");
    let mut cases: Vec<(Message, Check)> = Vec::new();
    cases.push((
        Message {
            body: Bytes::new(),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::BodyEmpty),
    ));
    cases.push((
        Message {
            body: Bytes::from(vec![0u8; 5 << 20]),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::BodyTooLarge { .. }),
    ));
    cases.push((
        Message {
            topic: "nope".into(),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::TopicNotFound(_)),
    ));
    cases.push((
        Message {
            topic: "../x".into(),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::IllegalTopic(_)),
    ));
    cases.push((
        Message {
            message_id: String::new(),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::IllegalMessageId(_)),
    ));
    cases.push((
        Message {
            tag: Some("a||b".into()),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::IllegalTag(_)),
    ));
    let mut reserved = msg("t", 1, "a");
    reserved
        .user_properties
        .insert("UNIQ_KEY".into(), "x".into());
    cases.push((reserved, |e| {
        matches!(e, BrokerError::IllegalPropertyKey(_))
    }));
    let mut many = msg("t", 1, "a");
    for i in 0..200 {
        many.user_properties.insert(format!("p{i}"), "v".into());
    }
    cases.push((many, |e| matches!(e, BrokerError::PropertiesTooLarge(_))));
    cases.push((msg("f", 1, "a"), |e| {
        matches!(e, BrokerError::MessageTypeMismatch { .. })
    }));
    cases.push((
        Message {
            message_group: Some("g".into()),
            ..msg("t", 1, "a")
        },
        |e| matches!(e, BrokerError::MessageTypeMismatch { .. }),
    ));
    cases.push((
        Message {
            message_group: Some("x".repeat(100)),
            message_type: Some(MessageType::Fifo),
            ..msg("f", 1, "a")
        },
        |e| matches!(e, BrokerError::IllegalMessageGroup(_)),
    ));
    for (m, ok) in cases {
        let r = b.send(vec![m]).await.pop().expect("one result");
        let err = r.expect_err("must be refused");
        assert!(ok(&err), "unexpected error {err}");
    }
    assert_eq!(
        b.topic_status("t").expect("t").queue_status[0].max_offset,
        0
    );
    assert!(matches!(
        b.receive(req("nope", "t", 1)).await,
        Err(BrokerError::GroupNotFound(_))
    ));
    assert!(matches!(
        b.receive(req("g", "nope", 1)).await,
        Err(BrokerError::TopicNotFound(_))
    ));
    let mut r = req("g", "t", 1);
    r.invisible = Duration::from_millis(10);
    assert!(matches!(
        b.receive(r).await,
        Err(BrokerError::IllegalInvisibleTime(_))
    ));
    for h in ["", "garbage", "1~x~t~0~0~1~0000000000000001~00000000"] {
        assert!(
            matches!(
                b.ack("g", "t", h).await,
                Err(BrokerError::InvalidReceiptHandle(_))
            ),
            "{h}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_when_a_message_arrives() {
    let e = env();
    let b = e.broker.clone();
    b.create_topic("t", MessageType::Normal, 2).expect("topic");
    b.create_group("g", false, None, None, None).expect("group");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut r = req("g", "t", 1);
            r.long_poll = Duration::from_secs(20);
            let t = std::time::Instant::now();
            (b.receive(r).await.expect("receive"), t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&b, vec![msg("t", 1, "a")]).await;
    let (got, took) = waiter.await.expect("join");
    assert_eq!(got.len(), 1);
    assert!(took < Duration::from_secs(10), "woke after {took:?}");
    // Nothing arrives: the poll ends at its deadline with nothing.
    let mut r = req("g", "t", 1);
    r.long_poll = Duration::from_millis(300);
    let t = std::time::Instant::now();
    assert!(b.receive(r).await.expect("receive").is_empty());
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn two_consumers_share_the_queue_without_overlap() {
    let e = env();
    let b = &e.broker;
    b.create_topic("t", MessageType::Normal, 3).expect("topic");
    b.create_group("g", false, None, None, None).expect("group");
    send_all(b, (0..30).map(|i| msg("t", i, "a")).collect()).await;
    let a = b.receive(req("g", "t", 7)).await.expect("a");
    let c = b.receive(req("g", "t", 7)).await.expect("c");
    let rest = b.receive(req("g", "t", 100)).await.expect("rest");
    let mut ids: Vec<String> = a
        .iter()
        .chain(&c)
        .chain(&rest)
        .map(|d| d.message.message_id.clone())
        .collect();
    assert_eq!(a.len(), 7);
    assert_eq!(c.len(), 7);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);
}

fn fifo_msg(i: u32, group: &str) -> Message {
    Message {
        message_group: Some(group.into()),
        message_type: Some(MessageType::Fifo),
        queue_id: Some(0),
        ..msg("f", i, "a")
    }
}

#[tokio::test]
async fn fifo_one_in_flight_per_message_group_and_retries_block_the_group() {
    let e = env();
    let b = &e.broker;
    b.create_topic("f", MessageType::Fifo, 2).expect("topic");
    b.create_group("fg", true, Some(5), None, None)
        .expect("group");
    // Two message groups interleaved in one queue, a third in another queue.
    let mut msgs = Vec::new();
    for i in 0..5 {
        msgs.push(fifo_msg(i, "A"));
        msgs.push(fifo_msg(100 + i, "B"));
    }
    for i in 0..3 {
        msgs.push(Message {
            queue_id: Some(1),
            ..fifo_msg(200 + i, "C")
        });
    }
    send_all(b, msgs).await;
    let ids = |ds: &[Delivery]| {
        let mut v: Vec<String> = ds.iter().map(|d| d.message.message_id.clone()).collect();
        v.sort();
        v
    };
    // Only the head of each message group is handed out, to any number of consumers.
    let first = b.receive(req("fg", "f", 32)).await.expect("receive");
    assert_eq!(ids(&first), vec!["ID0000", "ID0100", "ID0200"]);
    assert!(
        b.receive(req("fg", "f", 32))
            .await
            .expect("receive")
            .is_empty()
    );
    // Ack A's head; nack B's head (retry keeps the group blocked behind it).
    let a0 = first
        .iter()
        .find(|d| d.message.message_id == "ID0000")
        .expect("a0");
    let b0 = first
        .iter()
        .find(|d| d.message.message_id == "ID0100")
        .expect("b0");
    b.ack("fg", "f", &a0.receipt_handle).await.expect("ack");
    b.change_invisible("fg", "f", &b0.receipt_handle, Duration::ZERO)
        .await
        .expect("nack");
    let second = b.receive(req("fg", "f", 32)).await.expect("receive");
    assert_eq!(ids(&second), vec!["ID0001", "ID0100"]);
    let b0again = second
        .iter()
        .find(|d| d.message.message_id == "ID0100")
        .expect("retry");
    assert_eq!(b0again.delivery_attempt, 2);
    // Drain everything in order per group, acking as we go.
    let mut pending: Vec<Delivery> = second.clone();
    pending.extend(
        first
            .into_iter()
            .filter(|d| d.message.message_id == "ID0200"),
    );
    let mut order: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    order.entry("A".into()).or_default().push(0);
    for _ in 0..20 {
        for d in pending.drain(..) {
            b.ack("fg", "f", &d.receipt_handle).await.expect("ack");
            let g = d.message.message_group.clone().expect("group");
            let n: u32 = d.message.user_properties["n"].parse().expect("n");
            order.entry(g).or_default().push(n);
        }
        pending = b.receive(req("fg", "f", 32)).await.expect("receive");
        if pending.is_empty() {
            break;
        }
    }
    assert_eq!(order["A"], vec![0, 1, 2, 3, 4]);
    assert_eq!(order["B"], vec![100, 101, 102, 103, 104]);
    assert_eq!(order["C"], vec![200, 201, 202]);
    // The state survives a restart: nothing redelivered after everything was acked.
    let e = reopen(e);
    e.clock.advance(3_600_000);
    assert!(
        e.broker
            .receive(req("fg", "f", 32))
            .await
            .expect("receive")
            .is_empty()
    );
}
