//! Delay-message timer benchmark: lateness with a million pending timers, and memory per
//! pending timer with ten million.
//!
//! ```text
//! cargo run --release -p sluice-broker --example timer_bench -- [--dir PATH]
//!     [--lateness N] [--spread-s S] [--memory N] [--quick]
//! ```
//!
//! 1. *Lateness*: the timer task runs as in the server (`Timer::run`, 100 ms tick, real
//!    clock, `FlushPolicy::Sync`) while 4 producers send N delay messages (default 1M)
//!    due uniformly over S seconds (default 60) starting 30 s after the start. Lateness of
//!    a message = its store timestamp in the real topic − its delivery time (it becomes
//!    readable after the fsync of that append, a few ms later). Reports percentiles,
//!    messages delivered early (must be 0) and the peak RSS.
//! 2. *Memory*: N delay messages (default 10M) due 2–20 h ahead are sent (store in
//!    `FlushPolicy::Async` to save time), then one timer run dispatches them all. RSS
//!    (`/proc/self/status` VmRSS) before the sends, after them, and after the dispatch;
//!    the timer's cost per pending timer is (after dispatch − after sends) ÷ N. Also reports
//!    the dispatch rate, the bucket files, and the time to reopen broker and store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_broker::{Broker, BrokerConfig, Message, MessageType, Messaging};
use sluice_common::{Clock, SystemClock};
use sluice_store::{FlushPolicy, ReadStatus, Store, StoreConfig};

struct Args {
    dir: PathBuf,
    lateness: u64,
    spread_s: u64,
    memory: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("target/timer-bench"),
        lateness: 1_000_000,
        spread_s: 60,
        memory: 10_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v()?),
            "--lateness" => a.lateness = v()?.parse()?,
            "--spread-s" => a.spread_s = v()?.parse()?,
            "--memory" => a.memory = v()?.parse()?,
            "--quick" => {
                a.lateness = 100_000;
                a.spread_s = 20;
                a.memory = 1_000_000;
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn open(dir: &Path, flush: FlushPolicy) -> anyhow::Result<Arc<Broker>> {
    let store = Arc::new(Store::open(StoreConfig {
        flush,
        min_free_space: 0,
        ..StoreConfig::new(dir)
    })?);
    Ok(Broker::open(
        BrokerConfig::new(dir),
        store,
        Arc::new(SystemClock),
    )?)
}

fn message(i: u64, topic: &str, at: i64) -> Message {
    Message {
        topic: topic.to_owned(),
        message_id: format!("BENCH{i:012}"),
        body: Bytes::from_static(&[b'x'; 100]),
        message_type: Some(MessageType::Delay),
        delivery_timestamp_ms: Some(at),
        born_timestamp_ms: 1,
        ..Default::default()
    }
}

/// Sends `n` delay messages from 4 tasks in batches; `due(i)` gives message i's time.
async fn send_all(
    b: &Arc<Broker>,
    topic: &str,
    n: u64,
    batch: u64,
    due: impl Fn(u64) -> i64 + Send + Sync + Clone + 'static,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..4u64 {
        let b = b.clone();
        let topic = topic.to_owned();
        let due = due.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = p * batch;
            while i < n {
                let end = (i + batch).min(n);
                let msgs: Vec<Message> = (i..end).map(|k| message(k, &topic, due(k))).collect();
                for r in b.send(msgs).await {
                    r?;
                }
                i += 4 * batch;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

fn stored_count(b: &Broker, topic: &str, queues: u32) -> u64 {
    (0..queues)
        .map(|q| b.store().queue_offsets(topic, q).1)
        .sum()
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn lateness(a: &Args) -> anyhow::Result<()> {
    let dir = a.dir.join("lateness");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let b = open(&dir, FlushPolicy::Sync)?;
    const QUEUES: u32 = 8;
    b.create_topic("late", MessageType::Delay, QUEUES)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let timer = tokio::spawn(b.timer().clone().run(stop_rx));
    let rss0 = rss_bytes();
    let n = a.lateness;
    let spread = a.spread_s as i64 * 1000;
    let base = SystemClock.now_ms() + 30_000;
    let took = send_all(&b, "late", n, 1000, move |i| {
        base + (splitmix(i) % spread as u64) as i64
    })
    .await?;
    println!(
        "lateness: sent {n} delay messages due over {}s in {:.1}s ({:.0}/s, fsync per batch of 1000)",
        a.spread_s,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    if SystemClock.now_ms() > base {
        println!(
            "  WARNING: sending took longer than the 30 s lead; early timers were due on arrival"
        );
    }
    let mut peak = rss_bytes();
    let deadline = Instant::now()
        + Duration::from_millis((base - SystemClock.now_ms()).max(0) as u64)
        + Duration::from_millis(spread as u64 + 60_000);
    while stored_count(&b, "late", QUEUES) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_bytes());
    }
    let _ = stop.send(true);
    timer.await?;
    let mut late = Vec::with_capacity(n as usize);
    for q in 0..QUEUES {
        let mut off = 0;
        loop {
            let batch = b.store().read("late", q, off, 4096, 64 << 20, |_| true)?;
            if batch.status != ReadStatus::Found {
                break;
            }
            for m in &batch.messages {
                let at: i64 = m
                    .property("TIMER_DELIVER_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MIN);
                late.push(m.store_ts - at);
            }
            off = batch.next_offset;
        }
    }
    late.sort_unstable();
    let early = late.iter().filter(|l| **l < 0).count();
    println!(
        "lateness: delivered {} of {n}; early {early}; lateness ms p50 {} p90 {} p99 {} p99.9 {} max {}",
        late.len(),
        pct(&late, 0.5),
        pct(&late, 0.9),
        pct(&late, 0.99),
        pct(&late, 0.999),
        late.last().copied().unwrap_or(0)
    );
    println!(
        "lateness: RSS at start {:.0} MiB, peak {:.0} MiB",
        mib(rss0),
        mib(peak)
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn dir_size(dir: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            files += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (files, bytes)
}

async fn memory(a: &Args) -> anyhow::Result<()> {
    let dir = a.dir.join("memory");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let flush = FlushPolicy::Async {
        interval: Duration::from_millis(500),
        bytes: 64 << 20,
    };
    let b = open(&dir, flush)?;
    b.create_topic("far", MessageType::Delay, 8)?;
    let n = a.memory;
    let rss0 = rss_bytes();
    let now = SystemClock.now_ms();
    let took = send_all(&b, "far", n, 2000, move |i| {
        now + 2 * 3_600_000 + (splitmix(i) % (18 * 3_600_000)) as i64
    })
    .await?;
    let rss1 = rss_bytes();
    println!(
        "memory: sent {n} delay messages due 2-20 h ahead in {:.1}s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let t = Instant::now();
    let rep = b.run_timers_once().await?;
    let dispatch = t.elapsed();
    let rss2 = rss_bytes();
    let (files, bytes) = dir_size(&dir.join("timer"));
    println!(
        "memory: first timer run dispatched {} in {:.1}s ({:.0}/s); {} timers in memory; {files} files in timer/ ({:.0} MiB)",
        rep.dispatched,
        dispatch.as_secs_f64(),
        rep.dispatched as f64 / dispatch.as_secs_f64(),
        rep.in_memory,
        mib(bytes)
    );
    println!(
        "memory: RSS before sends {:.0} MiB, after sends {:.0} MiB, after dispatch {:.0} MiB",
        mib(rss0),
        mib(rss1),
        mib(rss2)
    );
    println!(
        "memory: timer RSS per pending timer {:.2} B (after dispatch - after sends) / N; process RSS growth per message {:.1} B (store included)",
        (rss2 as f64 - rss1 as f64) / n as f64,
        (rss2 as f64 - rss0 as f64) / n as f64
    );
    drop(b);
    let t = Instant::now();
    let b = open(&dir, flush)?;
    let rep = b.run_timers_once().await?;
    println!(
        "memory: reopen of store + broker with {n} pending timers and first timer run: {:.2}s ({} dispatched, {} in memory)",
        t.elapsed().as_secs_f64(),
        rep.dispatched,
        rep.in_memory
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "timer_bench: dir {}, lateness N={} over {}s, memory N={}",
        a.dir.display(),
        a.lateness,
        a.spread_s,
        a.memory
    );
    rt.block_on(async {
        if a.lateness > 0 {
            lateness(&a).await?;
        }
        if a.memory > 0 {
            memory(&a).await?;
        }
        Ok::<_, anyhow::Error>(())
    })
}
