//! Transaction throughput: a half message plus its commit per message, against plain sends
//! of the same messages measured in the same run (the baseline).
//!
//! ```text
//! cargo run --release -p sluice-broker --example tx_bench -- \
//!     [--messages 20000] [--concurrency 64] [--body 1024] [--rounds 3] [--flush sync|async]
//! ```
//!
//! Each round writes `--messages` messages from `--concurrency` tasks, each task waiting
//! for its previous message (one send, or one send and one commit, at a time), so the
//! store's group commit batches across tasks. Prints every round and the medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_broker::{
    Broker, BrokerConfig, EndTransaction, Message, MessageType, Messaging, TransactionResolution,
    TransactionSource,
};
use sluice_common::SystemClock;
use sluice_store::{FlushPolicy, Store, StoreConfig};

struct Opts {
    messages: u64,
    concurrency: u64,
    body: usize,
    rounds: usize,
    flush: FlushPolicy,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        messages: 20_000,
        concurrency: 64,
        body: 1024,
        rounds: 3,
        flush: FlushPolicy::Sync,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--messages" => o.messages = v()?.parse()?,
            "--concurrency" => o.concurrency = v()?.parse()?,
            "--body" => o.body = v()?.parse()?,
            "--rounds" => o.rounds = v()?.parse()?,
            "--flush" => {
                o.flush = match v()?.as_str() {
                    "sync" => FlushPolicy::Sync,
                    "async" => FlushPolicy::Async {
                        interval: Duration::from_millis(500),
                        bytes: 4 << 20,
                    },
                    other => anyhow::bail!("--flush {other}: expected sync or async"),
                }
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(o.messages > 0 && o.concurrency > 0 && o.rounds > 0);
    Ok(o)
}

/// Runs one round; returns messages per second.
async fn round(broker: &Arc<Broker>, o: &Opts, topic: &str, tx: bool, tag: &str) -> f64 {
    let body = Bytes::from(vec![b'x'; o.body]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let broker = broker.clone();
        let body = body.clone();
        let topic = topic.to_owned();
        let tag = tag.to_owned();
        let n = o.messages / o.concurrency + u64::from(w < o.messages % o.concurrency);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let m = Message {
                    topic: topic.clone(),
                    message_id: format!("{tag}-{w}-{i}"),
                    body: body.clone(),
                    message_type: Some(if tx {
                        MessageType::Transaction
                    } else {
                        MessageType::Normal
                    }),
                    born_timestamp_ms: 1,
                    producer_client_id: Some(format!("bench-{w}")),
                    ..Default::default()
                };
                let id = m.message_id.clone();
                let r = broker
                    .send(vec![m])
                    .await
                    .pop()
                    .ok_or_else(|| anyhow::anyhow!("no send result"))??;
                if tx {
                    broker
                        .end_transaction(EndTransaction {
                            topic: topic.clone(),
                            message_id: id,
                            transaction_id: r.transaction_id,
                            resolution: TransactionResolution::Commit,
                            source: TransactionSource::Client,
                        })
                        .await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("bench task failed: {e:#}"),
            Err(e) => panic!("bench task panicked: {e}"),
        }
    }
    o.messages as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let dir = tempfile::tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| ".".into()))?;
    let store = Arc::new(Store::open(StoreConfig {
        segment_size: 256 << 20,
        min_free_space: 0,
        flush: o.flush,
        ..StoreConfig::new(dir.path())
    })?);
    let mut cfg = BrokerConfig::new(dir.path());
    // No checks during the run: every transaction is committed by its producer.
    cfg.transaction_check_interval = Duration::from_secs(3600);
    let broker = Broker::open(cfg, store.clone(), Arc::new(SystemClock))?;
    broker.create_topic("plain", MessageType::Normal, 8)?;
    broker.create_topic("tx", MessageType::Transaction, 8)?;
    println!(
        "tx_bench: {} messages of {} B per round, {} concurrent producers, flush {:?}, {} rounds",
        o.messages, o.body, o.concurrency, o.flush, o.rounds
    );
    let (mut plain, mut tx) = (Vec::new(), Vec::new());
    for r in 0..o.rounds {
        let p = round(&broker, &o, "plain", false, &format!("p{r}")).await;
        let t = round(&broker, &o, "tx", true, &format!("t{r}")).await;
        println!("round {r}: plain sends {p:>9.0} msg/s   half + commit {t:>9.0} msg/s");
        plain.push(p);
        tx.push(t);
    }
    anyhow::ensure!(
        broker.pending_transactions() == 0,
        "transactions left pending"
    );
    let (p, t) = (median(plain), median(tx));
    println!(
        "median: plain sends {p:.0} msg/s, transactional (half + commit) {t:.0} msg/s, ratio {:.2}",
        t / p
    );
    drop(broker);
    store.close();
    Ok(())
}
