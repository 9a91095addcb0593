//! Transactional messages over a real store, with a manual clock: half messages stay
//! invisible until committed, rollbacks discard, orphans are checked and then resolved by
//! default, and all of it survives restarts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_broker::*;
use sluice_common::ManualClock;
use tokio::sync::broadcast;

mod common;

const INTERVAL_MS: i64 = 30_000;
const MAX_CHECKS: u32 = 3;

struct Env {
    dir: tempfile::TempDir,
    clock: ManualClock,
    default: TransactionResolution,
    broker: Arc<Broker>,
}

fn open_at(dir: tempfile::TempDir, clock: ManualClock, default: TransactionResolution) -> Env {
    let mut cfg = BrokerConfig::new(dir.path());
    cfg.transaction_check_interval = Duration::from_millis(INTERVAL_MS as u64);
    cfg.transaction_max_checks = MAX_CHECKS;
    cfg.transaction_default_resolution = default;
    let broker = common::open_broker(dir.path(), &clock, cfg);
    Env {
        dir,
        clock,
        default,
        broker,
    }
}

fn env_with(default: TransactionResolution) -> Env {
    let e = open_at(
        tempfile::tempdir().expect("tempdir"),
        ManualClock::new(1_700_000_000_000),
        default,
    );
    e.broker
        .create_topic("tx", MessageType::Transaction, 2)
        .expect("topic");
    e.broker
        .create_group("g", false, None, None, Some(StartPosition::Earliest))
        .expect("group");
    e
}

fn env() -> Env {
    env_with(TransactionResolution::Rollback)
}

/// Restart after a clean shutdown (snapshots written).
fn reopen(e: Env) -> Env {
    let Env {
        dir,
        clock,
        default,
        broker,
    } = e;
    broker.snapshot_pop().expect("snapshot");
    drop(broker);
    open_at(dir, clock, default)
}

/// Restart after a crash: no snapshot, everything comes from the logs.
fn crash(e: Env) -> Env {
    let Env {
        dir,
        clock,
        default,
        broker,
    } = e;
    drop(broker);
    open_at(dir, clock, default)
}

fn tx_msg(i: u32) -> Message {
    Message {
        topic: "tx".into(),
        message_id: format!("TX{i:04}"),
        tag: Some("T".into()),
        keys: vec![format!("k{i}")],
        user_properties: BTreeMap::from([("n".to_string(), i.to_string())]),
        body: Bytes::from(format!("tx body {i}")),
        message_type: Some(MessageType::Transaction),
        born_timestamp_ms: 1,
        producer_client_id: Some("producer-1".into()),
        ..Default::default()
    }
}

async fn send(e: &Env, i: u32) -> SendReceipt {
    e.broker
        .send(vec![tx_msg(i)])
        .await
        .pop()
        .expect("one result")
        .expect("sent")
}

async fn receive(e: &Env) -> Vec<Delivery> {
    common::receive_all(&e.broker, "g", "tx").await
}

async fn end(
    e: &Env,
    r: &SendReceipt,
    resolution: TransactionResolution,
    source: TransactionSource,
) -> Result<(), BrokerError> {
    e.broker
        .end_transaction(EndTransaction {
            topic: "tx".into(),
            message_id: r.message_id.clone(),
            transaction_id: r.transaction_id.clone(),
            resolution,
            source,
        })
        .await
}

fn drain(rx: &mut broadcast::Receiver<TransactionCheck>) -> Vec<TransactionCheck> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    out
}

fn err_text(r: Result<(), BrokerError>) -> String {
    match r {
        Err(e @ BrokerError::InvalidTransaction(_)) => e.to_string(),
        other => panic!("expected InvalidTransaction, got {other:?}"),
    }
}

#[tokio::test]
async fn half_message_is_invisible_until_commit() {
    let e = env();
    let r = send(&e, 1).await;
    assert_eq!(r.message_id, "TX0001");
    assert_eq!(r.transaction_id.len(), 32, "{:?}", r.transaction_id);
    assert!(r.queue_id < 2);
    assert!(receive(&e).await.is_empty(), "half message delivered");
    assert_eq!(e.broker.pending_transactions(), 1);
    // Not visible in admin look-ups either.
    assert!(e.broker.message_by_id("TX0001").expect("lookup").is_none());

    end(
        &e,
        &r,
        TransactionResolution::Commit,
        TransactionSource::Client,
    )
    .await
    .expect("commit");
    let got = receive(&e).await;
    assert_eq!(got.len(), 1);
    let m = &got[0].message;
    assert_eq!(m.message_id, "TX0001");
    assert_eq!(m.topic, "tx");
    assert_eq!(m.body, Bytes::from("tx body 1"));
    assert_eq!(m.tag.as_deref(), Some("T"));
    assert_eq!(m.keys, vec!["k1".to_string()]);
    assert_eq!(m.message_type, Some(MessageType::Transaction));
    // Only the user's properties: the transaction bookkeeping stays hidden.
    assert_eq!(
        m.user_properties,
        BTreeMap::from([("n".to_string(), "1".to_string())])
    );
    assert_eq!(got[0].queue_id, r.queue_id);
    assert_eq!(e.broker.pending_transactions(), 0);
    assert!(e.broker.message_by_id("TX0001").expect("lookup").is_some());
}

#[tokio::test]
async fn rollback_discards_for_good() {
    let e = env();
    let r = send(&e, 1).await;
    end(
        &e,
        &r,
        TransactionResolution::Rollback,
        TransactionSource::Client,
    )
    .await
    .expect("rollback");
    let mut rx = e.broker.subscribe_transaction_checks();
    for _ in 0..(MAX_CHECKS + 3) {
        e.clock.advance(INTERVAL_MS);
        assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
    }
    assert!(drain(&mut rx).is_empty());
    assert!(receive(&e).await.is_empty());
    let e = crash(e);
    assert!(receive(&e).await.is_empty());
    assert_eq!(e.broker.pending_transactions(), 0);
}

#[tokio::test]
async fn unknown_mismatched_and_repeated_ends_are_refused() {
    let e = env();
    let r = send(&e, 1).await;
    let mut bogus = r.clone();
    bogus.transaction_id = "0123456789ABCDEF0123456789ABCDEF".into();
    let t = err_text(
        end(
            &e,
            &bogus,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("unknown transaction id"), "{t}");
    bogus.transaction_id.clear();
    let t = err_text(
        end(
            &e,
            &bogus,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("empty"), "{t}");

    let mut wrong_id = r.clone();
    wrong_id.message_id = "OTHER".into();
    let t = err_text(
        end(
            &e,
            &wrong_id,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("is for message TX0001"), "{t}");
    let t = err_text(
        e.broker
            .end_transaction(EndTransaction {
                topic: "other".into(),
                message_id: r.message_id.clone(),
                transaction_id: r.transaction_id.clone(),
                resolution: TransactionResolution::Commit,
                source: TransactionSource::Client,
            })
            .await,
    );
    assert!(t.contains("belongs to topic tx"), "{t}");
    assert!(
        receive(&e).await.is_empty(),
        "a refused end changed something"
    );

    end(
        &e,
        &r,
        TransactionResolution::Commit,
        TransactionSource::Client,
    )
    .await
    .expect("commit");
    for res in [
        TransactionResolution::Commit,
        TransactionResolution::Rollback,
    ] {
        let t = err_text(end(&e, &r, res, TransactionSource::Client).await);
        assert!(t.contains("already committed"), "{t}");
    }
    let r2 = send(&e, 2).await;
    end(
        &e,
        &r2,
        TransactionResolution::Rollback,
        TransactionSource::Client,
    )
    .await
    .expect("rollback");
    let t = err_text(
        end(
            &e,
            &r2,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("already rolled back"), "{t}");
    // Exactly one delivery: the first commit.
    let got = receive(&e).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.message_id, "TX0001");

    // Remembered across a crash too.
    let e = crash(e);
    let t = err_text(
        end(
            &e,
            &r,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("already committed"), "{t}");
    let t = err_text(
        end(
            &e,
            &r2,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await,
    );
    assert!(t.contains("already rolled back"), "{t}");
}

#[tokio::test]
async fn wrong_message_types_are_refused() {
    let e = env();
    let mut m = tx_msg(1);
    m.message_type = Some(MessageType::Normal);
    let r = e.broker.send(vec![m]).await.pop().expect("result");
    assert!(
        matches!(r, Err(BrokerError::MessageTypeMismatch { .. })),
        "{r:?}"
    );
    e.broker
        .create_topic("plain", MessageType::Normal, 1)
        .expect("topic");
    let mut m = tx_msg(2);
    m.topic = "plain".into();
    let r = e.broker.send(vec![m]).await.pop().expect("result");
    assert!(
        matches!(r, Err(BrokerError::MessageTypeMismatch { .. })),
        "{r:?}"
    );
    assert_eq!(e.broker.pending_transactions(), 0);
}

#[tokio::test]
async fn orphans_are_checked_up_to_the_maximum_then_rolled_back() {
    let e = env();
    let mut rx = e.broker.subscribe_transaction_checks();
    let r = send(&e, 1).await;
    // Not yet due.
    e.clock.advance(INTERVAL_MS - 1);
    assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
    for attempt in 1..=MAX_CHECKS {
        e.clock.advance(if attempt == 1 { 1 } else { INTERVAL_MS });
        assert_eq!(e.broker.check_transactions().await.expect("check"), 1);
        // Once per interval, not on every tick.
        assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
        let checks = drain(&mut rx);
        assert_eq!(checks.len(), 1);
        let c = &checks[0];
        assert_eq!(c.attempt, attempt);
        assert_eq!(c.topic, "tx");
        assert_eq!(c.transaction_id, r.transaction_id);
        assert_eq!(c.producer_client_id.as_deref(), Some("producer-1"));
        assert_eq!(c.message.message_id, "TX0001");
        assert_eq!(c.message.topic, "tx");
        assert_eq!(c.message.body, Bytes::from("tx body 1"));
        assert_eq!(c.message.queue_id, Some(r.queue_id));
        assert_eq!(
            c.message.user_properties,
            BTreeMap::from([("n".to_string(), "1".to_string())])
        );
    }
    // The maximum was reached: the next interval applies the default (rollback).
    e.clock.advance(INTERVAL_MS);
    assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
    assert!(drain(&mut rx).is_empty());
    assert_eq!(e.broker.pending_transactions(), 0);
    let t = err_text(
        end(
            &e,
            &r,
            TransactionResolution::Commit,
            TransactionSource::Check,
        )
        .await,
    );
    assert!(t.contains("already rolled back by the broker"), "{t}");
    assert!(receive(&e).await.is_empty());
    let e = crash(e);
    assert!(receive(&e).await.is_empty());
    assert_eq!(e.broker.pending_transactions(), 0);
}

#[tokio::test]
async fn the_default_resolution_can_be_commit() {
    let e = env_with(TransactionResolution::Commit);
    send(&e, 1).await;
    for _ in 0..=MAX_CHECKS {
        e.clock.advance(INTERVAL_MS);
        e.broker.check_transactions().await.expect("check");
    }
    assert_eq!(e.broker.pending_transactions(), 0);
    let got = receive(&e).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.message_id, "TX0001");
}

#[tokio::test]
async fn a_check_answered_with_commit_delivers() {
    let e = env();
    let mut rx = e.broker.subscribe_transaction_checks();
    let r = send(&e, 1).await;
    e.clock.advance(INTERVAL_MS);
    assert_eq!(e.broker.check_transactions().await.expect("check"), 1);
    let c = drain(&mut rx).pop().expect("a check");
    e.broker
        .end_transaction(EndTransaction {
            topic: c.topic.clone(),
            message_id: c.message.message_id.clone(),
            transaction_id: c.transaction_id.clone(),
            resolution: TransactionResolution::Commit,
            source: TransactionSource::Check,
        })
        .await
        .expect("commit from the check");
    let got = receive(&e).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.message_id, r.message_id);
    // No further checks for a resolved transaction.
    e.clock.advance(INTERVAL_MS * 5);
    assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
}

#[tokio::test]
async fn pending_halves_and_check_counts_survive_restarts() {
    for clean in [true, false] {
        let restart = |e: Env| if clean { reopen(e) } else { crash(e) };
        let e = env();
        let a = send(&e, 1).await; // stays pending, checked twice
        let b = send(&e, 2).await; // committed
        let c = send(&e, 3).await; // rolled back
        end(
            &e,
            &b,
            TransactionResolution::Commit,
            TransactionSource::Client,
        )
        .await
        .expect("commit");
        end(
            &e,
            &c,
            TransactionResolution::Rollback,
            TransactionSource::Client,
        )
        .await
        .expect("rollback");
        for _ in 0..2 {
            e.clock.advance(INTERVAL_MS);
            assert_eq!(e.broker.check_transactions().await.expect("check"), 1);
        }
        let e = restart(e);
        assert_eq!(e.broker.pending_transactions(), 1, "clean={clean}");
        let got = receive(&e).await;
        assert_eq!(got.len(), 1, "clean={clean}");
        assert_eq!(got[0].message.message_id, "TX0002");
        e.broker
            .ack("g", "tx", &got[0].receipt_handle)
            .await
            .expect("ack");
        let t = err_text(
            end(
                &e,
                &b,
                TransactionResolution::Commit,
                TransactionSource::Client,
            )
            .await,
        );
        assert!(t.contains("already committed"), "{t}");
        let t = err_text(
            end(
                &e,
                &c,
                TransactionResolution::Commit,
                TransactionSource::Client,
            )
            .await,
        );
        assert!(t.contains("already rolled back"), "{t}");

        // The pending one continues with its third (last) check, then the default.
        let mut rx = e.broker.subscribe_transaction_checks();
        e.clock.advance(INTERVAL_MS);
        assert_eq!(e.broker.check_transactions().await.expect("check"), 1);
        let check = drain(&mut rx).pop().expect("check");
        assert_eq!(check.attempt, 3, "clean={clean}");
        assert_eq!(check.transaction_id, a.transaction_id);
        let e = restart(e);
        e.clock.advance(INTERVAL_MS);
        assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
        assert_eq!(e.broker.pending_transactions(), 0, "clean={clean}");
        let e = restart(e);
        assert_eq!(e.broker.pending_transactions(), 0, "clean={clean}");
        let t = err_text(
            end(
                &e,
                &a,
                TransactionResolution::Commit,
                TransactionSource::Check,
            )
            .await,
        );
        assert!(t.contains("already rolled back"), "{t}");
        assert!(receive(&e).await.is_empty(), "clean={clean}");
    }
}

#[tokio::test]
async fn a_pending_half_can_be_committed_after_a_restart() {
    let e = env();
    let r = send(&e, 7).await;
    let e = crash(e);
    assert_eq!(e.broker.pending_transactions(), 1);
    end(
        &e,
        &r,
        TransactionResolution::Commit,
        TransactionSource::Client,
    )
    .await
    .expect("commit after restart");
    let got = receive(&e).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.message_id, "TX0007");
}

#[tokio::test]
async fn a_commit_whose_op_was_lost_is_not_committed_twice() {
    // Simulate a torn write that kept the committed copy but lost its op record: append
    // the copy by hand.
    let e = env();
    let r = send(&e, 1).await;
    let copy = sluice_store::AppendMessage {
        topic: "tx".into(),
        queue_id: r.queue_id,
        flags: MessageType::Transaction.flag(),
        born_ts: 1,
        properties: vec![
            (sluice_store::PROP_MSG_ID.into(), r.message_id.clone()),
            ("__transactionId__".into(), r.transaction_id.clone()),
        ],
        body: Bytes::from("tx body 1"),
    };
    e.broker.store().append(vec![copy]).await.expect("append");
    let e = crash(e);
    assert_eq!(e.broker.pending_transactions(), 0);
    let t = err_text(
        end(
            &e,
            &r,
            TransactionResolution::Commit,
            TransactionSource::Check,
        )
        .await,
    );
    assert!(t.contains("already committed"), "{t}");
    e.clock.advance(INTERVAL_MS * 10);
    assert_eq!(e.broker.check_transactions().await.expect("check"), 0);
    assert_eq!(receive(&e).await.len(), 1);
    // The repair is logged, so it holds after the next restart as well.
    let e = reopen(e);
    assert_eq!(e.broker.pending_transactions(), 0);
}

#[tokio::test]
async fn concurrent_ends_resolve_once() {
    let e = env();
    let r = send(&e, 1).await;
    let (a, b) = tokio::join!(
        end(
            &e,
            &r,
            TransactionResolution::Commit,
            TransactionSource::Client
        ),
        end(
            &e,
            &r,
            TransactionResolution::Commit,
            TransactionSource::Check
        ),
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    assert_eq!(receive(&e).await.len(), 1);
}
