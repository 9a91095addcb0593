//! The SDK end to end against a real in-process Sluice (store + broker + gRPC proxy on
//! 127.0.0.1), started exactly as `sluice server` starts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_broker::{Broker, BrokerConfig, MessageType as TopicType, StartPosition};
use sluice_client::{
    ClientConfig, ClientError, Code, ConsumeResult, FilterExpression, Message, MessageType,
    Producer, PushConsumer, RetryPolicy, SimpleConsumer, TransactionResolution,
};
use sluice_store::{Store, StoreConfig};
use tokio::sync::{oneshot, watch};

struct Server {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    _maintenance: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start_on(listener: tokio::net::TcpListener) -> anyhow::Result<Server> {
    start_on_with(listener, sluice_proxy::ProxyConfig::default()).await
}

async fn start_on_with(
    listener: tokio::net::TcpListener,
    proxy: sluice_proxy::ProxyConfig,
) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(StoreConfig::small(dir.path()))?);
    let mut cfg = BrokerConfig::new(dir.path());
    cfg.transaction_check_interval = Duration::from_millis(500);
    let broker = Broker::open(cfg, store, Arc::new(sluice_common::SystemClock))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let b = broker.clone();
    tokio::spawn(async move {
        let _ = sluice_proxy::run(listener, b, proxy, async {
            let _ = rx.await;
        })
        .await;
    });
    let (maint_tx, maint_rx) = watch::channel(false);
    tokio::spawn(broker.clone().run_maintenance(maint_rx));
    Ok(Server {
        _dir: dir,
        addr,
        broker,
        stop: Some(tx),
        _maintenance: maint_tx,
    })
}

async fn start() -> anyhow::Result<Server> {
    start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await?).await
}

fn config(addr: SocketAddr) -> ClientConfig {
    ClientConfig::new(addr.to_string())
}

async fn simple(
    s: &Server,
    group: &str,
    topic: &str,
    filter: FilterExpression,
) -> anyhow::Result<SimpleConsumer> {
    Ok(SimpleConsumer::builder(config(s.addr), group)
        .subscribe(topic, filter)
        .await_duration(Duration::from_millis(800))
        .start()
        .await?)
}

/// Receives until `n` messages arrived or `within` passed.
async fn receive_n(
    c: &SimpleConsumer,
    n: usize,
    within: Duration,
) -> anyhow::Result<Vec<sluice_client::ReceivedMessage>> {
    let end = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < end {
        out.extend(c.receive(32, Duration::from_secs(30)).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receive_ack_round_trip() -> anyhow::Result<()> {
    let s = start().await?;
    s.broker.create_topic("t", TopicType::Normal, 4)?;
    s.broker
        .create_group("g", false, None, None, Some(StartPosition::Earliest))?;

    let producer = Producer::builder(config(s.addr))
        .topics(["t"])
        .start()
        .await?;
    let mut sent = HashMap::new();
    for i in 0..5 {
        let m = Message::new("t", format!("body-{i}"))
            .with_tag(if i % 2 == 0 { "even" } else { "odd" })
            .with_key(format!("k{i}"))
            .with_property("n", i.to_string());
        let r = producer.send(m).await?;
        assert_eq!(r.message_id.len(), 34);
        assert!((0..4).contains(&r.queue_id));
        sent.insert(r.message_id.clone(), i);
    }
    let batch = producer
        .send_batch(vec![Message::new("t", "b1"), Message::new("t", "b2")])
        .await?;
    assert_eq!(batch.len(), 2);
    for r in &batch {
        sent.insert(r.message_id.clone(), 100);
    }

    let consumer = simple(&s, "g", "t", FilterExpression::all()).await?;
    let got = receive_n(&consumer, sent.len(), Duration::from_secs(10)).await?;
    assert_eq!(got.len(), sent.len());
    for m in &got {
        let i = sent[&m.message_id];
        assert_eq!(m.delivery_attempt, 1);
        assert!(!m.receipt_handle.is_empty());
        assert!(!m.corrupted);
        assert_eq!(m.kind(), MessageType::Normal);
        if i < 100 {
            assert_eq!(m.body_str(), format!("body-{i}"));
            assert_eq!(m.keys, vec![format!("k{i}")]);
            assert_eq!(m.properties["n"], i.to_string());
        }
    }
    consumer.ack_batch(&got).await?;
    assert!(
        consumer
            .receive(32, Duration::from_secs(30))
            .await?
            .is_empty()
    );

    // Change invisible duration: the message comes back with a new handle and attempt 2.
    producer.send(Message::new("t", "again")).await?;
    let mut first = receive_n(&consumer, 1, Duration::from_secs(5)).await?;
    assert_eq!(first.len(), 1);
    let old_handle = first[0].receipt_handle.clone();
    consumer
        .change_invisible_duration(&mut first[0], Duration::from_secs(1))
        .await?;
    // The server may or may not issue a new handle; the returned one must work.
    assert!(!first[0].receipt_handle.is_empty(), "{old_handle}");
    let again = receive_n(&consumer, 1, Duration::from_secs(10)).await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, first[0].message_id);
    assert_eq!(again[0].delivery_attempt, 2);
    consumer.ack(&again[0]).await?;

    // A tag filter only returns matching messages.
    s.broker
        .create_group("g2", false, None, None, Some(StartPosition::Earliest))?;
    let odd = simple(&s, "g2", "t", FilterExpression::Tag("odd".into())).await?;
    let got = receive_n(&odd, 2, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.tag.as_deref() == Some("odd")));

    // Errors keep their RocketMQ code.
    let err = producer
        .send(Message::new("missing", "x"))
        .await
        .expect_err("unknown topic");
    assert_eq!(err.code(), Some(Code::TopicNotFound), "{err}");
    let err = producer
        .send(Message::new("t", ""))
        .await
        .expect_err("empty");
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    let err = producer
        .send(Message::new("t", "x").with_message_group("g"))
        .await
        .expect_err("FIFO message to a normal topic");
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");

    odd.shutdown().await?;
    consumer.shutdown().await?;
    producer.shutdown().await?;
    assert!(matches!(
        producer.send(Message::new("t", "late")).await,
        Err(ClientError::Shutdown)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_retries_a_failure_then_acks() -> anyhow::Result<()> {
    let s = start().await?;
    s.broker.create_topic("p", TopicType::Normal, 2)?;
    s.broker.create_group(
        "pg",
        false,
        Some(3),
        Some(sluice_broker::Backoff {
            initial_ms: 200,
            max_ms: 1_000,
            multiplier: 2.0,
        }),
        Some(StartPosition::Earliest),
    )?;
    let producer = Producer::builder(config(s.addr)).start().await?;
    let ok_id = producer
        .send(Message::new("p", "fail-once"))
        .await?
        .message_id;
    let dead_id = producer
        .send(Message::new("p", "always-fail"))
        .await?
        .message_id;

    let calls: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let seen = calls.clone();
    let consumer = PushConsumer::builder(config(s.addr), "pg")
        .subscribe("p", FilterExpression::all())
        // Short polls: a nacked message becomes visible again while a poll is waiting,
        // and Sluice's long poll does not wake up for it.
        .long_polling_timeout(Duration::from_secs(1))
        .consumption_concurrency(4)
        .listener(move |m| {
            let mut calls = seen.lock().expect("lock");
            calls.push((m.body_str().into_owned(), m.delivery_attempt));
            if m.body_str() == "fail-once" && m.delivery_attempt >= 2 {
                ConsumeResult::Success
            } else {
                ConsumeResult::Failure
            }
        })
        .start()
        .await?;
    let settings = consumer
        .server_settings()
        .expect("settings before start returns");
    assert_eq!(settings.fifo, Some(false));
    assert_eq!(
        settings.retry_policy.as_ref().map(|p| p.max_attempts),
        Some(3)
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (once, always) = {
            let c = calls.lock().expect("lock");
            (
                c.iter().filter(|(b, _)| b == "fail-once").count(),
                c.iter().filter(|(b, _)| b == "always-fail").count(),
            )
        };
        if once >= 2 && always >= 3 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "listener calls: {:?}", calls);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the ack and the dead-lettering a moment, then check nothing comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    consumer.shutdown().await?;
    let calls = calls.lock().expect("lock").clone();
    let attempts = |body: &str| -> Vec<u32> {
        calls
            .iter()
            .filter(|(b, _)| b == body)
            .map(|(_, a)| *a)
            .collect()
    };
    assert_eq!(attempts("fail-once"), vec![1, 2], "{calls:?}");
    assert_eq!(attempts("always-fail"), vec![1, 2, 3], "{calls:?}");
    // The failing message went to the group's dead-letter queue, the other one did not.
    let (_, dlq_end) = s.broker.store().queue_offsets("%DLQ%pg", 0);
    assert_eq!(dlq_end, 1, "one dead letter");
    let dead = s.broker.messages_at("%DLQ%pg", 0, 0, 10)?;
    let ids: Vec<&str> = dead.iter().map(|m| m.message.message_id.as_str()).collect();
    assert!(
        ids.contains(&dead_id.as_str()) && !ids.contains(&ok_id.as_str()),
        "{ids:?}"
    );
    producer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_order_per_message_group() -> anyhow::Result<()> {
    let s = start().await?;
    s.broker.create_topic("f", TopicType::Fifo, 4)?;
    s.broker
        .create_group("fg", true, None, None, Some(StartPosition::Earliest))?;
    let producer = Producer::builder(config(s.addr)).start().await?;
    let groups = ["alpha", "beta", "gamma", "delta"];
    let mut queue_of: HashMap<&str, i32> = HashMap::new();
    for i in 0..10 {
        for g in groups {
            let r = producer
                .send(Message::new("f", format!("{g}:{i}")).with_message_group(g))
                .await?;
            // One message group always lands on one queue.
            assert_eq!(*queue_of.entry(g).or_insert(r.queue_id), r.queue_id);
        }
    }
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let rec = seen.clone();
    let consumer = PushConsumer::builder(config(s.addr), "fg")
        .subscribe("f", FilterExpression::all())
        .consumption_concurrency(4)
        .listener(move |m| {
            // Slow enough that out-of-order delivery would show.
            std::thread::sleep(Duration::from_millis(2));
            rec.lock().expect("lock").push(m.body_str().into_owned());
            ConsumeResult::Success
        })
        .start()
        .await?;
    assert_eq!(consumer.server_settings().and_then(|s| s.fifo), Some(true));
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("lock").len() < 40 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of 40 consumed",
            seen.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown().await?;
    let seen = seen.lock().expect("lock").clone();
    for g in groups {
        let order: Vec<u32> = seen
            .iter()
            .filter_map(|b| b.strip_prefix(&format!("{g}:")))
            .map(|n| n.parse().expect("number"))
            .collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>(), "group {g}: {seen:?}");
    }
    producer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_until_the_server_is_up() -> anyhow::Result<()> {
    // Reserve a port, free it, and start the server there only after the first attempts
    // failed with connection errors.
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = probe.local_addr()?;
    drop(probe);
    let producer = Producer::builder(config(addr))
        .retry_policy(RetryPolicy::exponential(
            60,
            Duration::from_millis(50),
            Duration::from_millis(200),
            2.0,
        ))
        .start()
        .await?;
    let started = Instant::now();
    let send = tokio::spawn(async move {
        let r = producer.send(Message::new("t", "eventually")).await;
        (r, producer)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!send.is_finished(), "the send must still be retrying");
    let s = start_on(tokio::net::TcpListener::bind(addr).await?).await?;
    s.broker.create_topic("t", TopicType::Normal, 1)?;
    let (r, producer) = send.await?;
    let receipt = r?;
    assert!(started.elapsed() >= Duration::from_millis(700));
    let stored = s.broker.message_by_id(&receipt.message_id)?;
    assert!(stored.is_some(), "the retried message is stored");

    // Errors the server reports as final are not retried.
    let t = Instant::now();
    let err = producer
        .send(Message::new("nope", "x"))
        .await
        .expect_err("unknown topic");
    assert_eq!(err.code(), Some(Code::TopicNotFound));
    assert!(t.elapsed() < Duration::from_secs(2));
    producer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_rollback_and_check() -> anyhow::Result<()> {
    let s = start().await?;
    s.broker.create_topic("tx", TopicType::Transaction, 2)?;
    s.broker
        .create_group("txg", false, None, None, Some(StartPosition::Earliest))?;
    let checked: Arc<Mutex<Vec<String>>> = Arc::default();
    let rec = checked.clone();
    let producer = Producer::builder(config(s.addr))
        .transaction_checker(move |m| {
            rec.lock().expect("lock").push(m.body_str().into_owned());
            // Only the transaction this test leaves open is decided by the checker.
            if m.body_str() == "checked" {
                TransactionResolution::Commit
            } else {
                TransactionResolution::Unknown
            }
        })
        .start()
        .await?;

    let mut tx = producer.begin_transaction();
    let r = match tx.send(Message::new("tx", "committed")).await {
        Ok(r) => r,
        Err(e) if e.code() == Some(Code::NotImplemented) => {
            eprintln!("NOTE: the server does not implement transactions yet: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    assert!(!r.transaction_id.is_empty());
    let consumer = simple(&s, "txg", "tx", FilterExpression::all()).await?;
    let early = consumer.receive(32, Duration::from_secs(30)).await?;
    assert!(early.is_empty(), "a half message is invisible: {early:?}");
    match tx.commit().await {
        Ok(()) => {}
        Err(e) if e.code() == Some(Code::NotImplemented) => {
            eprintln!("NOTE: the server does not implement EndTransaction yet: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let got = receive_n(&consumer, 1, Duration::from_secs(5)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body_str(), "committed");
    assert_eq!(got[0].message_id, r.message_id);
    consumer.ack(&got[0]).await?;

    let mut tx = producer.begin_transaction();
    tx.send(Message::new("tx", "rolled back")).await?;
    tx.rollback().await?;

    // Left open: the server asks the checker, which commits.
    let mut tx = producer.begin_transaction();
    tx.send(Message::new("tx", "checked")).await?;
    drop(tx);
    let got = receive_n(&consumer, 1, Duration::from_secs(15)).await?;
    assert_eq!(got.len(), 1, "the checked transaction is committed");
    assert_eq!(got[0].body_str(), "checked");
    consumer.ack(&got[0]).await?;
    assert!(checked.lock().expect("lock").iter().any(|b| b == "checked"));
    assert!(
        consumer
            .receive(32, Duration::from_secs(30))
            .await?
            .is_empty()
    );

    // Transactional messages are not plain messages and vice versa.
    let err = producer
        .send(Message::new("tx", "plain"))
        .await
        .expect_err("normal message to a transaction topic");
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    consumer.shutdown().await?;
    producer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_messages_arrive_at_their_time() -> anyhow::Result<()> {
    let s = start().await?;
    s.broker.create_topic("d", TopicType::Delay, 2)?;
    s.broker
        .create_group("dg", false, None, None, Some(StartPosition::Earliest))?;
    let producer = Producer::builder(config(s.addr)).start().await?;
    let at = std::time::SystemTime::now() + Duration::from_secs(2);
    let r = producer
        .send(Message::new("d", "later").with_delivery_time(at))
        .await?;
    let consumer = simple(&s, "dg", "d", FilterExpression::all()).await?;
    let early = consumer.receive(32, Duration::from_secs(30)).await?;
    assert!(early.is_empty(), "delivered before its time: {early:?}");
    let got = receive_n(&consumer, 1, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, r.message_id);
    assert_eq!(got[0].kind(), MessageType::Delay);
    assert!(std::time::SystemTime::now() >= at);
    let delivery = got[0].delivery_time.expect("delivery time");
    let diff = delivery.duration_since(at).unwrap_or_else(|e| e.duration());
    assert!(diff < Duration::from_millis(1), "{diff:?}");
    consumer.ack(&got[0]).await?;
    consumer.shutdown().await?;
    producer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_sign_every_request_for_an_access_point_with_an_acl() -> anyhow::Result<()> {
    let acl = sluice_proxy::auth::Acl::from_toml(
        "[[users]]\naccess_key = \"app\"\nsecret_key = \"s3\"\n\
         publish = [\"t\"]\nsubscribe = [\"t\"]\ngroups = [\"g\"]\n",
    )?;
    let proxy = sluice_proxy::ProxyConfig {
        acl: Some(Arc::new(sluice_proxy::auth::SharedAcl::new(acl))),
        ..Default::default()
    };
    let s = start_on_with(tokio::net::TcpListener::bind("127.0.0.1:0").await?, proxy).await?;
    s.broker.create_topic("t", TopicType::Normal, 2)?;
    s.broker
        .create_group("g", false, None, None, Some(StartPosition::Earliest))?;
    let signed = config(s.addr).with_credentials("app", "s3");
    assert!(
        !format!("{signed:?}").contains("s3\""),
        "the secret stays out of Debug"
    );

    let producer = Producer::builder(signed.clone())
        .topics(["t"])
        .start()
        .await?;
    producer.send(Message::new("t", "hello")).await?;
    let consumer = SimpleConsumer::builder(signed.clone(), "g")
        .subscribe("t", FilterExpression::all())
        .await_duration(Duration::from_millis(800))
        .start()
        .await?;
    let got = receive_n(&consumer, 1, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 1);
    consumer.ack(&got[0]).await?;

    // Unsigned, or signed with the wrong secret: UNAUTHORIZED, at start or at the send.
    for cfg in [
        config(s.addr),
        config(s.addr).with_credentials("app", "wrong"),
    ] {
        let r = match Producer::builder(cfg).topics(["t"]).start().await {
            Ok(p) => p.send(Message::new("t", "x")).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert_eq!(r.err().and_then(|e| e.code()), Some(Code::Unauthorized));
    }
    // Signed, but not allowed to consume as another group.
    s.broker
        .create_group("other", false, None, None, Some(StartPosition::Earliest))?;
    let r = match SimpleConsumer::builder(signed, "other")
        .subscribe("t", FilterExpression::all())
        .start()
        .await
    {
        Ok(c) => c.receive(1, Duration::from_secs(30)).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert_eq!(r.err().and_then(|e| e.code()), Some(Code::Forbidden));
    assert_eq!(
        s.broker.store().queue_offsets("t", 0).1 + s.broker.store().queue_offsets("t", 1).1,
        1
    );
    Ok(())
}
