//! Delay messages and recalls over a real store, with a manual clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sluice_broker::filter::Filter;
use sluice_broker::*;
use sluice_common::{Clock, ManualClock};

mod common;

const T0: i64 = 1_700_000_000_000;

struct Env {
    dir: tempfile::TempDir,
    clock: ManualClock,
    config: BrokerConfig,
    broker: Arc<Broker>,
}

fn open_with(dir: tempfile::TempDir, clock: ManualClock, config: BrokerConfig) -> Env {
    let broker = common::open_broker(dir.path(), &clock, config.clone());
    Env {
        dir,
        clock,
        config,
        broker,
    }
}

fn env_with(f: impl FnOnce(&mut BrokerConfig)) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = BrokerConfig::new(dir.path());
    f(&mut config);
    let e = open_with(dir, ManualClock::new(T0), config);
    e.broker
        .create_topic("d", MessageType::Delay, 2)
        .expect("topic");
    e
}

fn env() -> Env {
    env_with(|_| {})
}

/// Drops broker and store (no shutdown hook runs) and opens them again.
fn restart(e: Env) -> Env {
    let Env {
        dir,
        clock,
        config,
        broker,
    } = e;
    drop(broker);
    open_with(dir, clock, config)
}

fn delay_msg(id: &str, at: Option<i64>) -> Message {
    Message {
        topic: "d".into(),
        message_id: id.into(),
        tag: Some("tagA".into()),
        keys: vec![format!("k-{id}")],
        user_properties: BTreeMap::from([("p".to_string(), id.to_string())]),
        body: Bytes::from(format!("body {id}")),
        message_type: Some(MessageType::Delay),
        delivery_timestamp_ms: at,
        born_timestamp_ms: T0 - 5,
        born_host: "h".into(),
        ..Default::default()
    }
}

async fn send(b: &Broker, m: Message) -> Result<SendReceipt, BrokerError> {
    b.send(vec![m]).await.pop().expect("one result")
}

/// (message id, delivery time property, store time) of everything visible in topic `d`.
fn visible(b: &Broker) -> Vec<(String, Option<i64>, i64)> {
    let mut out = Vec::new();
    for q in 0..2 {
        for v in b.messages_at("d", q, 0, 10_000).expect("read") {
            out.push((
                v.message.message_id.clone(),
                v.message.delivery_timestamp_ms,
                v.store_timestamp_ms,
            ));
        }
    }
    out
}

fn ids(b: &Broker) -> Vec<String> {
    let mut v: Vec<String> = visible(b).into_iter().map(|(id, _, _)| id).collect();
    v.sort();
    v
}

#[tokio::test]
async fn never_before_due_and_delivered_at_due_with_its_properties() {
    let e = env();
    let b = &e.broker;
    let at = T0 + 5_123;
    let r = send(b, delay_msg("M1", Some(at))).await.expect("send");
    assert!(!r.recall_handle.is_empty());
    assert_eq!(r.message_id, "M1");
    b.create_group("g", false, None, None, Some(StartPosition::Earliest))
        .expect("group");
    b.run_timers_once().await.expect("run");
    assert!(ids(b).is_empty());
    e.clock.set(at - 1);
    let rep = b.run_timers_once().await.expect("run");
    assert!(ids(b).is_empty(), "delivered 1 ms early");
    assert_eq!(rep.next_fire_ms, Some(at));
    e.clock.set(at);
    let rep = b.run_timers_once().await.expect("run");
    assert_eq!(rep.delivered, 1);
    assert_eq!(visible(b), vec![("M1".to_string(), Some(at), at)]);
    let got = b
        .receive(ReceiveRequest {
            group: "g".into(),
            topic: "d".into(),
            filter: Filter::All,
            max_messages: 10,
            invisible: Duration::from_secs(30),
            long_poll: Duration::ZERO,
        })
        .await
        .expect("receive");
    assert_eq!(got.len(), 1);
    let m = &got[0].message;
    assert_eq!(m.message_id, "M1");
    assert_eq!(m.delivery_timestamp_ms, Some(at));
    assert_eq!(m.message_type, Some(MessageType::Delay));
    assert_eq!(m.tag.as_deref(), Some("tagA"));
    assert_eq!(m.keys, vec!["k-M1"]);
    assert_eq!(
        m.user_properties,
        BTreeMap::from([("p".to_string(), "M1".to_string())])
    );
    assert_eq!(&m.body[..], b"body M1");
    assert_eq!(got[0].queue_id, r.queue_id);
    // Delivered once only.
    e.clock.advance(600_000);
    b.run_timers_once().await.expect("run");
    assert_eq!(ids(b), vec!["M1"]);
}

#[tokio::test]
async fn past_or_missing_times_deliver_at_once_and_limits_are_enforced() {
    let e = env_with(|c| c.max_delay = Duration::from_secs(3600));
    let b = &e.broker;
    let r = send(b, delay_msg("PAST", Some(T0 - 10_000)))
        .await
        .expect("past");
    assert!(r.recall_handle.is_empty());
    let r = send(b, delay_msg("NOW", Some(T0))).await.expect("now");
    assert!(r.recall_handle.is_empty());
    send(b, delay_msg("NONE", None)).await.expect("none");
    // Visible without any timer run, keeping the requested time.
    let v = visible(b);
    assert_eq!(v.len(), 3);
    assert!(v.contains(&("PAST".to_string(), Some(T0 - 10_000), T0)));
    assert!(v.contains(&("NONE".to_string(), None, T0)));
    // Exactly the maximum is fine, one ms more is not; negative times are refused.
    send(b, delay_msg("MAX", Some(T0 + 3_600_000)))
        .await
        .expect("max");
    for at in [T0 + 3_600_001, -1, i64::MAX] {
        assert!(matches!(
            send(b, delay_msg("BAD", Some(at))).await,
            Err(BrokerError::IllegalDeliveryTime(_))
        ));
    }
    // Delay messages belong on delay topics.
    b.create_topic("n", MessageType::Normal, 1).expect("topic");
    let mut m = delay_msg("X", Some(T0 + 1000));
    m.topic = "n".into();
    assert!(matches!(
        send(b, m).await,
        Err(BrokerError::MessageTypeMismatch { .. })
    ));
}

#[tokio::test]
async fn recall_cancels_for_good_and_survives_a_restart() {
    let e = env();
    let at = T0 + 10_000;
    let keep = send(&e.broker, delay_msg("KEEP", Some(at)))
        .await
        .expect("send");
    let gone = send(&e.broker, delay_msg("GONE", Some(at)))
        .await
        .expect("send");
    // Garbage, a handle of another topic, and a tampered handle are refused.
    assert!(matches!(
        e.broker.recall("d", "nonsense").await,
        Err(BrokerError::BadRequest(_))
    ));
    assert!(e.broker.recall("other", &gone.recall_handle).await.is_err());
    assert!(
        e.broker
            .recall("d", &gone.recall_handle.replace("GONE", "GONF"))
            .await
            .is_err()
    );
    assert_eq!(
        e.broker
            .recall("d", &gone.recall_handle)
            .await
            .expect("recall"),
        "GONE"
    );
    // Recalling again is harmless.
    assert_eq!(
        e.broker
            .recall("d", &gone.recall_handle)
            .await
            .expect("again"),
        "GONE"
    );
    let e = restart(e);
    e.clock.set(at);
    let rep = e.broker.run_timers_once().await.expect("run");
    assert_eq!(rep.delivered, 1);
    assert_eq!(rep.recalled, 1);
    assert_eq!(ids(&e.broker), vec!["KEEP"]);
    // Too late for the delivered one.
    assert!(matches!(
        e.broker.recall("d", &keep.recall_handle).await,
        Err(BrokerError::NoPendingMessage(_))
    ));
    let e = restart(e);
    e.clock.advance(3_600_000);
    e.broker.run_timers_once().await.expect("run");
    assert_eq!(ids(&e.broker), vec!["KEEP"]);
    assert!(matches!(
        e.broker.recall("d", &keep.recall_handle).await,
        Err(BrokerError::NoPendingMessage(_))
    ));
}

#[tokio::test]
async fn recall_after_dispatch_and_before_dispatch_both_hold() {
    let e = env();
    let b = &e.broker;
    let a = send(b, delay_msg("A", Some(T0 + 2_000))).await.expect("a");
    b.run_timers_once().await.expect("dispatch A");
    b.recall("d", &a.recall_handle).await.expect("recall A");
    let c = send(b, delay_msg("C", Some(T0 + 2_000))).await.expect("c");
    b.recall("d", &c.recall_handle).await.expect("recall C");
    send(b, delay_msg("D", Some(T0 + 2_000))).await.expect("d");
    e.clock.set(T0 + 2_000);
    let rep = b.run_timers_once().await.expect("run");
    assert_eq!((rep.delivered, rep.recalled), (1, 2));
    assert_eq!(ids(b), vec!["D"]);
}

#[tokio::test]
async fn pending_timers_survive_restarts_and_are_delivered_once() {
    let e = env();
    let times: Vec<i64> = vec![
        1_000, 59_999, 60_000, 61_000, 3_600_000, 7_300_000, 90_000_000,
    ];
    for (i, d) in times.iter().enumerate() {
        send(&e.broker, delay_msg(&format!("P{i}"), Some(T0 + d)))
            .await
            .expect("send");
    }
    // Not even dispatched before the first restart.
    let e = restart(e);
    e.clock.set(T0 + 60_000);
    e.broker.run_timers_once().await.expect("run");
    assert_eq!(ids(&e.broker), vec!["P0", "P1", "P2"]);
    assert_eq!(e.broker.timer().pending(), 4);
    let e = restart(e);
    assert_eq!(
        e.broker.timer().pending(),
        4,
        "pending count after a restart"
    );
    let e = restart(e);
    e.clock.set(T0 + 3_600_000);
    e.broker.run_timers_once().await.expect("run");
    assert_eq!(ids(&e.broker), vec!["P0", "P1", "P2", "P3", "P4"]);
    let e = restart(e);
    e.clock.set(T0 + 90_000_000 - 1);
    e.broker.run_timers_once().await.expect("run");
    assert_eq!(ids(&e.broker).len(), 6);
    let e = restart(e);
    e.clock.set(T0 + 100_000_000);
    e.broker.run_timers_once().await.expect("run");
    let v = visible(&e.broker);
    assert_eq!(v.len(), 7);
    for (id, at, stored) in v {
        let at = at.expect("delivery time kept");
        assert!(stored >= at, "{id} stored at {stored}, due {at}");
    }
}

#[tokio::test]
async fn far_timers_roll_forward_and_still_fire_exactly_on_time() {
    // A 3-hour timer with a 10-minute roll window is copied forward many times.
    let e = env_with(|c| c.timer.roll_window = Duration::from_secs(600));
    let at = T0 + 3 * 3_600_000 + 17;
    let r = send(&e.broker, delay_msg("FAR", Some(at)))
        .await
        .expect("send");
    let mut e = e;
    let mut rolled = 0;
    let mut now = T0;
    let mut step = 0;
    while now < at - 1 {
        now = (now + 7 * 60_000).min(at - 1);
        e.clock.set(now);
        rolled += e.broker.run_timers_once().await.expect("run").rolled;
        assert!(ids(&e.broker).is_empty(), "delivered early at {now}");
        step += 1;
        if step % 3 == 0 {
            e = restart(e);
        }
    }
    assert!(rolled >= 10, "rolled {rolled} times");
    // The recall handle still works after the original record was copied forward.
    e.clock.set(at - 1);
    e.broker
        .recall("d", &r.recall_handle)
        .await
        .expect("recall after rolls");
    e.clock.set(at);
    e.broker.run_timers_once().await.expect("run");
    assert!(ids(&e.broker).is_empty());
}

#[tokio::test]
async fn many_timers_in_one_millisecond_and_across_buckets() {
    let e = env();
    let b = &e.broker;
    let mut batch = Vec::new();
    for i in 0..500 {
        let at = T0 + 1_000 + (i % 5) * 30_000;
        batch.push(delay_msg(&format!("B{i:03}"), Some(at)));
    }
    for r in b.send(batch).await {
        r.expect("send");
    }
    for step in 0..5 {
        e.clock.set(T0 + 1_000 + step * 30_000);
        b.run_timers_once().await.expect("run");
        assert_eq!(visible(b).len() as i64, 100 * (step + 1));
    }
}

#[tokio::test]
async fn a_crash_before_the_checkpoint_neither_loses_nor_repeats_deliveries() {
    let e = env_with(|c| c.timer.checkpoint_interval = Duration::from_secs(3600));
    let mut handles = Vec::new();
    for (i, d) in [1_000, 1_000, 1_000, 5_000, 5_000].iter().enumerate() {
        let r = send(&e.broker, delay_msg(&format!("C{i}"), Some(T0 + d)))
            .await
            .expect("send");
        handles.push(r.recall_handle);
    }
    e.clock.set(T0 + 1_000);
    // Delivers without a checkpoint, as the background task does between checkpoints.
    let t = e.broker.timer().clone();
    let rep = tokio::task::spawn_blocking(move || t.run_once(false))
        .await
        .expect("join")
        .expect("run");
    assert_eq!(rep.delivered, 3);
    let e = restart(e);
    // Too late to recall a message delivered before the crash.
    assert!(matches!(
        e.broker.recall("d", &handles[0]).await,
        Err(BrokerError::NoPendingMessage(_))
    ));
    e.clock.set(T0 + 5_000);
    let rep = e.broker.run_timers_once().await.expect("run");
    assert_eq!(rep.delivered, 2);
    assert_eq!(ids(&e.broker), vec!["C0", "C1", "C2", "C3", "C4"]);
}

// ---------------------------------------------------------------- model test

#[derive(Debug, Clone)]
enum Op {
    /// Send with a delivery time this far ahead (negative: in the past).
    Send(i64),
    Advance(i64),
    Run,
    /// A run that writes no checkpoint (then a restart is a crash after deliveries).
    RunNoCheckpoint,
    Restart,
    Recall(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop_oneof![-5_000i64..0, 0i64..120_000, 0i64..8_000_000].prop_map(Op::Send),
        3 => prop_oneof![0i64..2_000, 0i64..200_000, 0i64..2_000_000].prop_map(Op::Advance),
        2 => Just(Op::Run),
        1 => Just(Op::RunNoCheckpoint),
        1 => Just(Op::Restart),
        1 => any::<usize>().prop_map(Op::Recall),
    ]
}

enum OpKind {
    Run,
    Other,
}

struct Sent {
    at: i64,
    handle: String,
    recalled: bool,
}

async fn model_run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    // A short roll window and the hour-wide coarse buckets are both exercised.
    let mut e = env_with(|c| {
        c.timer.roll_window = Duration::from_secs(900);
        c.timer.checkpoint_interval = Duration::from_secs(3600);
    });
    let mut sent: Vec<(String, Sent)> = Vec::new();
    // Time of the last timer run: everything due by then was taken.
    let mut last_run = i64::MIN;
    for op in ops {
        let op_kind = match op {
            Op::Run | Op::RunNoCheckpoint => OpKind::Run,
            _ => OpKind::Other,
        };
        match op {
            Op::Send(d) => {
                let id = format!("S{}", sent.len());
                let at = e.clock.now_ms() + d;
                let r = send(&e.broker, delay_msg(&id, Some(at)))
                    .await
                    .map_err(|err| TestCaseError::fail(format!("send: {err}")))?;
                prop_assert_eq!(r.recall_handle.is_empty(), d <= 0);
                sent.push((
                    id,
                    Sent {
                        at,
                        handle: r.recall_handle,
                        recalled: false,
                    },
                ));
            }
            Op::Advance(ms) => e.clock.advance(ms),
            Op::Run => {
                e.broker
                    .run_timers_once()
                    .await
                    .map_err(|err| TestCaseError::fail(format!("run: {err}")))?;
                last_run = e.clock.now_ms();
            }
            Op::RunNoCheckpoint => {
                let t = e.broker.timer().clone();
                tokio::task::spawn_blocking(move || t.run_once(false))
                    .await
                    .map_err(|err| TestCaseError::fail(format!("join: {err}")))?
                    .map_err(|err| TestCaseError::fail(format!("run: {err}")))?;
                last_run = e.clock.now_ms();
            }
            Op::Restart => e = restart(e),
            Op::Recall(i) => {
                if sent.is_empty() {
                    continue;
                }
                let i = i % sent.len();
                let s = &mut sent[i].1;
                if s.handle.is_empty() {
                    continue;
                }
                match e.broker.recall("d", &s.handle).await {
                    Ok(_) => {
                        prop_assert!(s.recalled || s.at > last_run, "recalled after it was taken");
                        s.recalled = true;
                    }
                    Err(BrokerError::NoPendingMessage(_)) => {
                        // A second recall after the time passed may be refused.
                        prop_assert!(s.at <= last_run, "refused while pending");
                    }
                    Err(err) => return Err(TestCaseError::fail(format!("recall: {err}"))),
                }
            }
        }
        if matches!(op_kind, OpKind::Run) {
            // Every timed message not yet due counts; a recalled one may count until its
            // time (or until a roll entry finds it recalled).
            let waiting = |with_recalled: bool| {
                sent.iter()
                    .filter(|(_, s)| !s.handle.is_empty() && s.at > last_run)
                    .filter(|(_, s)| with_recalled || !s.recalled)
                    .count() as u64
            };
            let pending = e.broker.timer().pending();
            prop_assert!(
                (waiting(false)..=waiting(true)).contains(&pending),
                "pending timers {} not in {}..={}",
                pending,
                waiting(false),
                waiting(true)
            );
        }
        // Whatever is visible was due when it was stored, and nothing is visible twice.
        let v = visible(&e.broker);
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (id, at, stored) in &v {
            *seen.entry(id).or_default() += 1;
            prop_assert!(stored >= &at.unwrap_or(i64::MIN), "{} early", id);
        }
        prop_assert!(seen.values().all(|n| *n == 1), "duplicates: {:?}", seen);
        for (id, s) in &sent {
            let shown = seen.contains_key(id.as_str());
            if s.recalled {
                prop_assert!(!shown, "recalled {} was delivered", id);
            } else if s.at <= last_run || s.handle.is_empty() {
                prop_assert!(
                    shown,
                    "{} due at {} not delivered by {}",
                    id,
                    s.at,
                    last_run
                );
            } else {
                prop_assert!(!shown, "{} delivered before its run", id);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn timers_fire_never_early_and_exactly_once_across_restarts(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(model_run(ops))?;
    }
}
