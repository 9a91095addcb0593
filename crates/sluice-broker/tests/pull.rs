//! Stream reads over a real store: pulling by offset with filters and long polling,
//! committed offsets that survive restarts, and offset queries by time.

use std::time::Duration;

use bytes::Bytes;
use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::*;
use sluice_common::ManualClock;

mod common;

use common::{Env, open_at, receive_all};

const T0: i64 = 1_700_000_000_000;

fn env() -> Env {
    let e = open_at(tempfile::tempdir().expect("tempdir"), ManualClock::new(T0));
    e.broker
        .create_topic("t", MessageType::Normal, 2)
        .expect("topic");
    e.broker
        .create_group("g", false, None, None, None)
        .expect("group");
    e
}

fn restart(e: Env, clean: bool) -> Env {
    let Env { dir, clock, broker } = e;
    if clean {
        broker.snapshot_pop().expect("snapshot");
    }
    drop(broker);
    open_at(dir, clock)
}

/// Sends `n` messages to queue 0, tags alternating A and B, one ms apart.
async fn fill(e: &Env, from: u32, n: u32) {
    for i in from..from + n {
        let m = Message {
            topic: "t".into(),
            message_id: format!("ID{i:04}"),
            tag: Some(if i % 2 == 0 { "A" } else { "B" }.into()),
            body: Bytes::from(format!("body {i}")),
            born_timestamp_ms: 1,
            queue_id: Some(0),
            ..Default::default()
        };
        e.broker
            .send(vec![m])
            .await
            .pop()
            .expect("result")
            .expect("sent");
        e.clock.advance(1);
    }
}

fn req(offset: u64, max: u32, filter: Filter) -> PullRequest {
    PullRequest {
        group: "g".into(),
        topic: "t".into(),
        queue: 0,
        offset,
        max_messages: max,
        filter,
        long_poll: Duration::ZERO,
    }
}

fn ids(r: &PullResult) -> Vec<String> {
    r.messages
        .iter()
        .map(|d| d.message.message_id.clone())
        .collect()
}

#[tokio::test]
async fn pull_by_offset_with_filters_and_bounds() {
    let e = env();
    fill(&e, 0, 10).await;
    let r = e.broker.pull(req(0, 4, Filter::All)).await.expect("pull");
    assert_eq!(r.status, PullStatus::Found);
    assert_eq!(ids(&r), ["ID0000", "ID0001", "ID0002", "ID0003"]);
    assert_eq!(r.next_offset, 4);
    assert_eq!((r.min_offset, r.max_offset), (0, 10));
    assert!(r.messages.iter().all(|d| d.receipt_handle.is_empty()));
    assert_eq!(r.messages[3].queue_offset, 3);

    // A tag filter skips the others, and next_offset moves past them.
    let tags = Filter::parse(FilterKind::Tag, "B").expect("filter");
    let r = e
        .broker
        .pull(req(4, 100, tags.clone()))
        .await
        .expect("pull");
    assert_eq!(ids(&r), ["ID0005", "ID0007", "ID0009"]);
    assert_eq!(r.next_offset, 10);
    // Stopping at the batch size leaves the rest for the next pull.
    let r = e.broker.pull(req(4, 1, tags)).await.expect("pull");
    assert_eq!(ids(&r), ["ID0005"]);
    assert_eq!(r.next_offset, 6);
    let sql = Filter::parse(FilterKind::Sql, "TAGS = 'A'").expect("filter");
    let r = e.broker.pull(req(0, 100, sql)).await.expect("pull");
    assert_eq!(r.messages.len(), 5);

    // Nothing matching up to the end: next_offset is the end.
    let none = Filter::parse(FilterKind::Tag, "C").expect("filter");
    let r = e.broker.pull(req(0, 10, none)).await.expect("pull");
    assert_eq!((r.status, r.next_offset), (PullStatus::NoNewMessage, 10));
    let r = e.broker.pull(req(10, 10, Filter::All)).await.expect("pull");
    assert_eq!((r.status, r.next_offset), (PullStatus::NoNewMessage, 10));
    let r = e.broker.pull(req(11, 10, Filter::All)).await.expect("pull");
    assert_eq!((r.status, r.next_offset), (PullStatus::OffsetOverflow, 10));
    // The other queue was never written.
    let mut q1 = req(0, 10, Filter::All);
    q1.queue = 1;
    let r = e.broker.pull(q1.clone()).await.expect("pull");
    assert_eq!((r.status, r.next_offset), (PullStatus::NoNewMessage, 0));

    q1.queue = 2;
    assert!(matches!(
        e.broker.pull(q1).await,
        Err(BrokerError::BadRequest(_))
    ));
    let mut bad = req(0, 10, Filter::All);
    bad.group = "nope".into();
    assert!(matches!(
        e.broker.pull(bad).await,
        Err(BrokerError::GroupNotFound(_))
    ));
    let mut bad = req(0, 10, Filter::All);
    bad.topic = "nope".into();
    assert!(matches!(
        e.broker.pull(bad).await,
        Err(BrokerError::TopicNotFound(_))
    ));
    assert!(matches!(
        e.broker.pull(req(0, 0, Filter::All)).await,
        Err(BrokerError::BadRequest(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_long_polls_until_a_message_arrives() {
    let e = env();
    fill(&e, 0, 2).await;
    let b = e.broker.clone();
    let waiting = tokio::spawn(async move {
        let mut r = req(2, 10, Filter::All);
        r.long_poll = Duration::from_secs(20);
        let started = std::time::Instant::now();
        (b.pull(r).await, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fill(&e, 2, 1).await;
    let (r, took) = waiting.await.expect("task");
    let r = r.expect("pull");
    assert_eq!(ids(&r), ["ID0002"]);
    assert!(took < Duration::from_secs(10), "{took:?}");

    // And gives up after the long poll.
    let mut r = req(3, 10, Filter::All);
    r.long_poll = Duration::from_millis(200);
    let r = e.broker.pull(r).await.expect("pull");
    assert_eq!((r.status, r.next_offset), (PullStatus::NoNewMessage, 3));
}

#[tokio::test]
async fn committed_offsets_persist_across_restarts() {
    for clean in [true, false] {
        let e = env();
        fill(&e, 0, 10).await;
        assert_eq!(e.broker.get_offset("g", "t", 0).expect("get"), None);
        e.broker
            .update_offset("g", "t", 0, 4)
            .await
            .expect("update");
        e.broker
            .update_offset("g", "t", 0, 6)
            .await
            .expect("update");
        e.broker
            .update_offset("g", "t", 1, 0)
            .await
            .expect("update");
        assert_eq!(e.broker.get_offset("g", "t", 0).expect("get"), Some(6));
        // Beyond the end, unknown group, unknown queue.
        assert!(matches!(
            e.broker.update_offset("g", "t", 0, 11).await,
            Err(BrokerError::IllegalOffset(_))
        ));
        assert!(matches!(
            e.broker.update_offset("nope", "t", 0, 1).await,
            Err(BrokerError::GroupNotFound(_))
        ));
        assert!(matches!(
            e.broker.get_offset("g", "t", 7),
            Err(BrokerError::BadRequest(_))
        ));
        let e = restart(e, clean);
        assert_eq!(
            e.broker.get_offset("g", "t", 0).expect("get"),
            Some(6),
            "clean={clean}"
        );
        assert_eq!(e.broker.get_offset("g", "t", 1).expect("get"), Some(0));
        // Going back is allowed (a consumer re-reads), and the latest write wins.
        e.broker
            .update_offset("g", "t", 0, 2)
            .await
            .expect("update");
        let e = restart(e, !clean);
        assert_eq!(
            e.broker.get_offset("g", "t", 0).expect("get"),
            Some(2),
            "clean={clean}"
        );
        let e = restart(e, clean);
        assert_eq!(
            e.broker.get_offset("g", "t", 0).expect("get"),
            Some(2),
            "clean={clean}"
        );
    }
}

#[tokio::test]
async fn query_offsets_by_position_and_time() {
    let e = env();
    // Offsets 0..5 stored at T0..T0+4, offsets 5..10 at T0+1000..T0+1004.
    fill(&e, 0, 5).await;
    e.clock.set(T0 + 1000);
    fill(&e, 5, 5).await;
    let q = |query| e.broker.query_offset("t", 0, query).expect("query");
    assert_eq!(q(OffsetQuery::Beginning), 0);
    assert_eq!(q(OffsetQuery::End), 10);
    assert_eq!(q(OffsetQuery::Timestamp(T0 - 10_000)), 0);
    assert_eq!(q(OffsetQuery::Timestamp(T0 + 2)), 2);
    assert_eq!(q(OffsetQuery::Timestamp(T0 + 500)), 5);
    assert_eq!(q(OffsetQuery::Timestamp(T0 + 1003)), 8);
    assert_eq!(q(OffsetQuery::Timestamp(T0 + 100_000)), 10);
    assert_eq!(
        e.broker
            .query_offset("t", 1, OffsetQuery::End)
            .expect("query"),
        0
    );
    assert!(matches!(
        e.broker.query_offset("nope", 0, OffsetQuery::End),
        Err(BrokerError::TopicNotFound(_))
    ));
}

#[tokio::test]
async fn a_group_created_again_under_the_same_name_starts_fresh() {
    for clean in [true, false] {
        let e = env();
        fill(&e, 0, 10).await;
        e.broker
            .update_offset("g", "t", 0, 7)
            .await
            .expect("update");
        // A second group keeps its state through all of this.
        e.broker
            .create_group("other", false, None, None, Some(StartPosition::Earliest))
            .expect("group");
        e.broker
            .update_offset("other", "t", 0, 3)
            .await
            .expect("update");
        // POP state: "g" (created before the sends) takes all 12 and leaves them in flight.
        fill(&e, 10, 2).await;
        let got = receive_all(&e.broker, "g", "t").await;
        assert_eq!(got.len(), 12);
        let e = restart(e, clean);
        e.broker.delete_group("g").expect("delete");
        // A crash right after the delete, then the group is created again.
        let e = restart(e, false);
        e.broker
            .create_group("g", false, None, None, Some(StartPosition::Earliest))
            .expect("create again");
        let e = restart(e, clean);
        assert_eq!(
            e.broker.get_offset("g", "t", 0).expect("get"),
            None,
            "clean={clean}"
        );
        assert_eq!(e.broker.get_offset("other", "t", 0).expect("get"), Some(3));
        let st = e.broker.group_status("g").expect("status");
        assert!(
            st.queues.iter().all(|q| q.cursor == 0 && q.inflight == 0),
            "old consumption state came back: {:?}",
            st.queues
        );
        // From the earliest message, as the new group asks.
        let got = receive_all(&e.broker, "g", "t").await;
        assert_eq!(got.len(), 12, "clean={clean}");
    }
}
