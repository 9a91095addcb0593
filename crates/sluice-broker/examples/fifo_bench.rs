//! FIFO consumption throughput with 1 and 1,000 message groups.
//!
//! ```text
//! cargo run --release -p sluice-broker --example fifo_bench -- [--messages N] [--flush sync|async]
//! ```
//!
//! Sends N 1 KiB messages to a FIFO topic (8 queues) spread over G message groups, then
//! two consumers of a FIFO group receive (batches of 32) and ack until all are consumed.
//! With one message group only one message can be in flight at a time, so the rate is one
//! receive + ack round trip per message; with many groups consumers get whole batches.
//! Order per group is verified.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_broker::filter::Filter;
use sluice_broker::{
    Broker, BrokerConfig, Message, MessageType, Messaging, ReceiveRequest, StartPosition,
};
use sluice_store::{FlushPolicy, Store, StoreConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut n: u64 = 20_000;
    let mut flush = FlushPolicy::Async {
        interval: Duration::from_millis(200),
        bytes: 64 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--messages" => n = v.parse()?,
            "--flush" => {
                flush = if v == "sync" {
                    FlushPolicy::Sync
                } else {
                    flush
                }
            }
            _ => anyhow::bail!("unknown argument {k}"),
        }
    }
    println!("| message groups | messages | send msgs/s | FIFO consume msgs/s | order |");
    println!("|---|---|---|---|---|");
    for groups in [1u64, 1000] {
        let dir = tempfile::tempdir()?;
        let mut cfg = StoreConfig::new(dir.path());
        cfg.flush = flush;
        cfg.min_free_space = 0;
        cfg.index_slots = 1 << 16;
        cfg.index_entries = 1 << 20;
        let store = Arc::new(Store::open(cfg)?);
        let b = Broker::open(
            BrokerConfig::new(dir.path()),
            store,
            Arc::new(sluice_common::SystemClock),
        )?;
        b.create_topic("f", MessageType::Fifo, 8)?;
        b.create_group("fg", true, None, None, Some(StartPosition::Earliest))?;
        let body = Bytes::from(vec![b'x'; 1024]);
        let t = Instant::now();
        let mut batch = Vec::new();
        for i in 0..n {
            let g = i % groups;
            batch.push(Message {
                topic: "f".into(),
                message_id: format!("M{i:012}"),
                message_group: Some(format!("g{g}")),
                message_type: Some(MessageType::Fifo),
                queue_id: Some((g % 8) as u32),
                user_properties: [("seq".to_string(), i.to_string())].into(),
                body: body.clone(),
                ..Default::default()
            });
            if batch.len() == 256 {
                for r in b.send(std::mem::take(&mut batch)).await {
                    r?;
                }
            }
        }
        for r in b.send(batch).await {
            r?;
        }
        let send_rate = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let order = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let b = b.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen: Vec<(u64, String, u64)> = Vec::new();
                let mut idle = 0;
                while idle < 3 {
                    let req = ReceiveRequest {
                        group: "fg".into(),
                        topic: "f".into(),
                        filter: Filter::All,
                        max_messages: 32,
                        invisible: Duration::from_secs(30),
                        long_poll: Duration::from_millis(100),
                    };
                    let ds = b.receive(req).await.expect("receive");
                    if ds.is_empty() {
                        idle += 1;
                        continue;
                    }
                    idle = 0;
                    let handles: Vec<String> =
                        ds.iter().map(|d| d.receipt_handle.clone()).collect();
                    for d in &ds {
                        let g = d.message.message_group.clone().unwrap_or_default();
                        let seq = d
                            .message
                            .user_properties
                            .get("seq")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        // Taken right after the receive returned, before the ack that lets
                        // the next message of the group out: a global delivery order.
                        let at = order.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        seen.push((at, g, seq));
                    }
                    for r in b.ack_many("fg", "f", &handles).await {
                        r.expect("ack");
                    }
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await?);
        }
        let secs = t.elapsed().as_secs_f64() - 0.3; // the final idle polls
        let total: usize = all.iter().map(|v| v.len()).sum();
        // Order per group across both consumers: in global delivery order, each group's
        // sequence numbers must increase.
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut merged: Vec<(u64, String, u64)> = all.into_iter().flatten().collect();
        merged.sort_by_key(|(at, _, _)| *at);
        let mut ordered = true;
        for (_, g, s) in &merged {
            if let Some(p) = last.insert(g.clone(), *s) {
                ordered &= p < *s;
            }
        }
        println!(
            "| {groups} | {total} | {send_rate:.0} | {:.0} | {} |",
            total as f64 / secs.max(0.001),
            if ordered && total as u64 == n {
                "ok"
            } else {
                "VIOLATED"
            }
        );
    }
    Ok(())
}
