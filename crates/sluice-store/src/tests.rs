//! Engine tests: functional behaviour, fault injection, corrupt-file fixtures.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use sluice_common::{ManualClock, SystemClock};

use crate::faulty::{Faults, FaultyFs};
use crate::*;

fn msg(topic: &str, queue: u32, i: u64) -> AppendMessage {
    AppendMessage {
        topic: topic.into(),
        queue_id: queue,
        flags: 0,
        born_ts: 1,
        properties: vec![
            (PROP_MSG_ID.into(), format!("id-{topic}-{queue}-{i}")),
            (
                PROP_TAGS.into(),
                if i.is_multiple_of(2) {
                    "even".into()
                } else {
                    "odd".into()
                },
            ),
            (PROP_KEYS.into(), format!("k{i} shared")),
        ],
        body: Bytes::from(format!("body-{i}-{}", "x".repeat((i % 50) as usize))),
    }
}

fn open(dir: &std::path::Path, flush: FlushPolicy) -> Store {
    let mut c = StoreConfig::small(dir);
    c.flush = flush;
    Store::open(c).expect("open store")
}

const ASYNC: FlushPolicy = FlushPolicy::Async {
    interval: Duration::from_millis(50),
    bytes: 1 << 20,
};

fn read_all(s: &Store, topic: &str, q: u32) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let (mut off, _) = s.queue_offsets(topic, q);
    loop {
        let b = s
            .read(topic, q, off, 100, u64::MAX, |_| true)
            .expect("read");
        if b.status != ReadStatus::Found {
            return out;
        }
        off = b.next_offset;
        out.extend(b.messages);
    }
}

/// Appends `batches` batches of `per_batch` messages to queue 0 of `topic`, message `i`
/// with body `body(i)`; returns how many.
fn append_bodies(
    s: &Store,
    topic: &str,
    batches: u64,
    per_batch: u64,
    body: impl Fn(u64) -> Bytes,
) -> u64 {
    for b in 0..batches {
        let batch = (b * per_batch..(b + 1) * per_batch)
            .map(|i| AppendMessage {
                body: body(i),
                ..msg(topic, 0, i)
            })
            .collect();
        s.append_blocking(batch).expect("append");
    }
    batches * per_batch
}

/// Queue 0 of `topic` holds exactly `n` messages, message `i` with body `body(i)`.
fn assert_bodies(s: &Store, topic: &str, n: u64, body: impl Fn(u64) -> Bytes) {
    let got = read_all(s, topic, 0);
    assert_eq!(got.len() as u64, n);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.body, body(i as u64), "record {i}");
    }
}

/// Bodies from empty to 70 KB in batches that cross segment boundaries: every record reads
/// back intact, before and after a full verification on reopen.
#[test]
fn bodies_of_every_size_across_segments_read_back_intact() {
    let body = |i: u64| {
        let len = [0usize, 1, 100, 511, 512, 513, 1024, 4000, 70_000][(i % 9) as usize];
        Bytes::from(vec![(i % 251) as u8; len])
    };
    for flush in [FlushPolicy::Sync, ASYNC] {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = {
            let s = open(dir.path(), flush);
            // ≈ 2.4 MiB over 1 MiB segments.
            let n = append_bodies(&s, "big", 40, 9, body);
            assert_bodies(&s, "big", n, body);
            assert!(s.stats().written_offset > 2 << 20);
            n
        };
        std::fs::remove_file(dir.path().join("checkpoint")).expect("drop checkpoint");
        let s = open(dir.path(), flush);
        let rep = s.recovery_report();
        assert_eq!(rep.dropped_bytes, 0, "{rep:?}");
        assert!(rep.records_replayed >= n, "{rep:?}");
        assert_bodies(&s, "big", n, body);
    }
}

#[test]
fn append_read_lookup_both_policies() {
    for flush in [FlushPolicy::Sync, ASYNC] {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), flush);
        for i in 0..300u64 {
            let r = s
                .append_blocking(vec![msg("orders", (i % 3) as u32, i)])
                .expect("append");
            assert_eq!(r[0].queue_offset, i / 3);
        }
        assert_eq!(s.queue_offsets("orders", 1), (0, 100));
        let q1 = read_all(&s, "orders", 1);
        assert_eq!(q1.len(), 100);
        for (n, m) in q1.iter().enumerate() {
            assert_eq!(m.queue_offset, n as u64);
            assert_eq!(
                m.msg_id(),
                Some(format!("id-orders-1-{}", n * 3 + 1).as_str())
            );
        }
        // Tag filter by hash skips records without reading them.
        let even = tag_hash("even");
        let b = s
            .read("orders", 0, 0, 1000, u64::MAX, |e| e.tag_hash == even)
            .expect("read");
        assert!(b.messages.iter().all(|m| m.tag() == Some("even")));
        assert_eq!(b.messages.len(), 50);
        // max_bytes limits the batch but always returns one message.
        let b = s.read("orders", 0, 0, 1000, 1, |_| true).expect("read");
        assert_eq!(b.messages.len(), 1);
        assert_eq!(b.next_offset, 1);
        // Lookups.
        let m = s
            .lookup_message_id("id-orders-2-299")
            .expect("lookup")
            .expect("found");
        assert_eq!(m.queue_offset, 99);
        assert!(s.lookup_message_id("nope").expect("lookup").is_none());
        let ks = s
            .lookup_key("orders", "shared", 0, i64::MAX, 1000)
            .expect("keys");
        assert_eq!(ks.len(), 300);
        let ks = s.lookup_key("orders", "k7", 0, i64::MAX, 10).expect("keys");
        assert_eq!(ks.len(), 1);
        assert!(
            s.lookup_key("other", "k7", 0, i64::MAX, 10)
                .expect("keys")
                .is_empty()
        );
        // Statuses at the edges.
        assert_eq!(
            s.read("orders", 1, 100, 10, u64::MAX, |_| true)
                .expect("read")
                .status,
            ReadStatus::NoNewMessage
        );
        assert_eq!(
            s.read("orders", 1, 500, 10, u64::MAX, |_| true)
                .expect("read")
                .status,
            ReadStatus::OffsetOverflow
        );
        assert_eq!(
            s.read("nope", 0, 0, 10, u64::MAX, |_| true)
                .expect("read")
                .status,
            ReadStatus::NoSuchQueue
        );
        drop(s);
        // Everything is there after a clean reopen, and offsets continue.
        let s = open(dir.path(), flush);
        assert_eq!(s.recovery_report().dropped_bytes, 0);
        assert_eq!(read_all(&s, "orders", 2).len(), 100);
        let r = s
            .append_blocking(vec![msg("orders", 2, 1000)])
            .expect("append");
        assert_eq!(r[0].queue_offset, 100);
        assert!(
            s.lookup_message_id("id-orders-0-0")
                .expect("lookup")
                .is_some()
        );
    }
}

#[test]
fn reading_one_of_many_interleaved_queues_reads_its_records_not_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, faults, _) = faulty(dir.path(), FlushPolicy::Sync);
    let body = |q: u32, i: u64| Bytes::from(vec![q as u8 ^ i as u8; 1000]);
    // 8 queues written in turn, as 8 busy producers interleave them in the one log.
    for i in 0..64 {
        let batch = (0..8)
            .map(|q| AppendMessage {
                body: body(q, i),
                ..msg("t", q, i)
            })
            .collect();
        s.append_blocking(batch).expect("append");
    }
    let before = faults.read_bytes.load(Ordering::SeqCst);
    let b = s.read("t", 3, 0, 64, u64::MAX, |_| true).expect("read");
    let read = faults.read_bytes.load(Ordering::SeqCst) - before;
    assert_eq!(b.messages.len(), 64);
    assert!(
        b.messages
            .iter()
            .enumerate()
            .all(|(i, m)| m.body == body(3, i as u64))
    );
    // Its own records and its queue entries; the other 7 queues' records lie between
    // them and are not copied along.
    let own: u64 = b.messages.iter().map(|m| m.record_size as u64 + 28).sum();
    assert!(read <= own + (4 << 10), "read {read} bytes for {own}");
}

#[test]
fn filtered_reads_choose_what_one_pass_over_the_scan_limit_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = StoreConfig::small(dir.path());
    c.segment_size = 4 << 20;
    let s = Store::open(c).expect("open");
    // 3,000 entries, one in 97 tagged "hit", bodies of varying size.
    let hit = |i: u64| i.is_multiple_of(97);
    let size = |i: u64| 10 + (i * 7919 % 300) as usize;
    // What a read counts against `max_bytes`: the record's size in the log.
    let mut record = Vec::new();
    for chunk in (0..3000u64).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<AppendMessage> = chunk
            .iter()
            .map(|&i| {
                let mut m = msg("t", 0, i);
                m.properties.retain(|(k, _)| k != PROP_TAGS);
                m.properties
                    .push((PROP_TAGS.into(), if hit(i) { "hit" } else { "miss" }.into()));
                m.body = Bytes::from(vec![b'b'; size(i)]);
                m
            })
            .collect();
        record.extend(batch.iter().map(|m| m.encoded_len() as u64));
        s.append_blocking(batch).expect("append");
    }
    let h = tag_hash("hit");
    // The model: one pass over at most `max(max_msgs * 16, 1024)` entries from `offset`.
    let model = |offset: u64, max_msgs: u32, max_bytes: u64| {
        let scan = (max_msgs as u64 * 16).max(1024);
        let (mut chosen, mut bytes, mut next) = (Vec::new(), 0u64, offset);
        for q in offset..(offset + scan).min(3000) {
            if chosen.len() as u32 >= max_msgs || (bytes >= max_bytes && !chosen.is_empty()) {
                break;
            }
            next = q + 1;
            if hit(q) {
                bytes += record[q as usize];
                chosen.push(q);
            }
        }
        (chosen, next)
    };
    for offset in [0u64, 1, 96, 97, 500, 1999, 2900, 2999] {
        for max_msgs in [0u32, 1, 2, 4, 7, 20, 64, 100] {
            for max_bytes in [1u64, 400, 1 << 20] {
                let b = s
                    .read("t", 0, offset, max_msgs, max_bytes, |e| e.tag_hash == h)
                    .expect("read");
                let got: Vec<u64> = b.messages.iter().map(|m| m.queue_offset).collect();
                assert_eq!(
                    (got, b.next_offset),
                    model(offset, max_msgs, max_bytes),
                    "offset {offset}, max_msgs {max_msgs}, max_bytes {max_bytes}"
                );
            }
        }
    }
}

/// Small segments and queue files under a disk budget of three segments: retention deletes
/// every few dozen appends of 700 B.
fn busy_retention(c: &mut StoreConfig) {
    c.segment_size = 16 << 10;
    c.max_record_size = 4 << 10;
    c.cq_entries_per_file = 8;
    c.disk_budget = Some(48 << 10);
}

#[test]
fn readers_at_the_minimum_while_retention_deletes_see_no_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = StoreConfig::small(dir.path());
    busy_retention(&mut c);
    let s = Arc::new(Store::open(c).expect("open"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Appends and retention, one after another, while the reader below chases the minimum.
    let w = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch = (0..4)
                    .map(|k| AppendMessage {
                        body: Bytes::from(vec![b'r'; 700]),
                        ..msg("t", 0, i + k)
                    })
                    .collect();
                s.append_blocking(batch).expect("append");
                i += 4;
                s.run_retention().expect("retention");
            }
            i
        })
    };
    let (mut reads, mut got) = (0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < deadline {
        let (min, _) = s.queue_offsets("t", 0);
        match s.read("t", 0, min, 8, u64::MAX, |_| true) {
            Ok(b) => {
                reads += 1;
                got += b.messages.len() as u64;
                for m in &b.messages {
                    assert!(m.queue_offset >= min && m.queue_offset < b.next_offset);
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                panic!("a read at the minimum failed while retention ran: {e}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let appended = w.join().expect("writer");
    assert!(
        appended > 0 && reads > 0 && got > 0,
        "{appended} appended, {reads} reads, {got} messages"
    );
    assert!(s.queue_offsets("t", 0).0 > 0, "retention never ran");
}

#[test]
fn a_reader_following_the_writer_sees_every_record_once_and_in_order() {
    for flush in [FlushPolicy::Sync, ASYNC] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = StoreConfig::small(dir.path());
        c.flush = flush;
        c.segment_size = 64 << 10;
        c.max_record_size = 4 << 10;
        // Small queue files and few handles: the reader crosses file ends, tail flushes and
        // handle evictions while it follows.
        c.cq_entries_per_file = 16;
        c.open_queue_files = 2;
        let s = Arc::new(Store::open(c).expect("open"));
        const N: u64 = 3000;
        let body =
            |q: u32, i: u64| Bytes::from(format!("{q}:{i}:{}", "f".repeat((i % 97) as usize)));
        let w = {
            let s = s.clone();
            std::thread::spawn(move || {
                let (mut i, mut k) = ([0u64; 3], 0u64);
                while i[0] < N {
                    // 1–3 messages to queues 0, 1 and 2 in turn.
                    let q = (k % 3) as u32;
                    let n = 1 + k % 3;
                    let batch = (0..n)
                        .map(|j| AppendMessage {
                            body: body(q, i[q as usize] + j),
                            ..msg("f", q, i[q as usize] + j)
                        })
                        .collect();
                    s.append_blocking(batch).expect("append");
                    i[q as usize] += n;
                    k += 1;
                }
            })
        };
        let (mut next, mut expect) = (0u64, 0u64);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while expect < N {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck at {expect} ({flush:?})"
            );
            let b = s.read("f", 0, next, 7, u64::MAX, |_| true).expect("read");
            match b.status {
                ReadStatus::Found => {
                    for m in &b.messages {
                        assert_eq!(m.queue_offset, expect, "{flush:?}");
                        assert_eq!(m.body, body(0, expect), "{flush:?}");
                        expect += 1;
                    }
                    assert_eq!(b.next_offset, expect, "{flush:?}");
                    next = b.next_offset;
                }
                ReadStatus::NoNewMessage | ReadStatus::NoSuchQueue => std::thread::yield_now(),
                other => panic!("{other:?} at {next} ({flush:?})"),
            }
        }
        w.join().expect("writer");
    }
}

#[test]
fn power_loss_after_retention_keeps_every_queue_readable_from_its_minimum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _faults, fs, c) = faulty_with(dir.path(), |c| {
        c.flush = FlushPolicy::Sync;
        busy_retention(c);
    });
    for i in 0..300u64 {
        let batch = (0..4)
            .map(|q| AppendMessage {
                body: Bytes::from(vec![b'p'; 700]),
                ..msg("t", q, i)
            })
            .collect();
        s.append_blocking(batch).expect("append");
        if i % 10 == 9 {
            s.run_retention().expect("retention");
        }
    }
    let before: Vec<(u64, u64)> = (0..4).map(|q| s.queue_offsets("t", q)).collect();
    assert!(before.iter().all(|&(min, max)| min > 0 && max == 300));
    // A crash: what was not synced is gone (every append was, in Sync mode).
    drop(s);
    fs.lose_unsynced().expect("power loss");
    let s = Store::open_with(c, Arc::new(FsRef(fs)), Arc::new(SystemClock)).expect("reopen");
    for q in 0..4u32 {
        let (min, max) = s.queue_offsets("t", q);
        // Deleted segments stay deleted: no queue starts lower than before the crash.
        assert_eq!(max, 300, "queue {q}");
        assert!(
            min >= before[q as usize].0,
            "queue {q}: {min} < {:?}",
            before[q as usize]
        );
        let got = read_all(&s, "t", q);
        assert_eq!(got.len() as u64, max - min, "queue {q}");
        for (k, m) in got.iter().enumerate() {
            let i = min + k as u64;
            assert_eq!(m.queue_offset, i);
            assert_eq!(m.msg_id(), Some(format!("id-t-{q}-{i}").as_str()));
        }
        // Below the minimum: told so, not an error.
        let b = s.read("t", q, 0, 10, u64::MAX, |_| true).expect("read");
        assert_eq!((b.status, b.next_offset), (ReadStatus::OffsetTooSmall, min));
    }
}

#[test]
fn segments_roll_and_records_never_span_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = StoreConfig::small(dir.path());
    c.segment_size = 64 << 10;
    c.max_record_size = 16 << 10;
    let s = Store::open(c.clone()).expect("open");
    let big = |i: u64| AppendMessage {
        body: Bytes::from(vec![i as u8; 9000]),
        ..msg("t", 0, i)
    };
    for i in 0..40 {
        s.append_blocking(vec![big(i)]).expect("append");
    }
    let names = std::fs::read_dir(dir.path().join("commitlog"))
        .expect("ls")
        .count();
    assert!(names >= 5, "{names} segments");
    for seg in std::fs::read_dir(dir.path().join("commitlog")).expect("ls") {
        let len = seg.expect("entry").metadata().expect("meta").len();
        assert!(len <= 64 << 10);
    }
    let all = read_all(&s, "t", 0);
    assert_eq!(all.len(), 40);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, m)| m.body[0] == i as u8 && m.body.len() == 9000)
    );
    drop(s);
    let s = Store::open(c).expect("reopen");
    assert_eq!(read_all(&s, "t", 0).len(), 40);
    // A record larger than the limit is refused and changes nothing.
    let huge = AppendMessage {
        body: Bytes::from(vec![0u8; 20 << 10]),
        ..msg("t", 0, 99)
    };
    assert!(matches!(
        s.append_blocking(vec![huge]),
        Err(StoreError::InvalidMessage(_))
    ));
    assert!(matches!(
        s.append_blocking(vec![msg("../x", 0, 1)]),
        Err(StoreError::InvalidMessage(_))
    ));
    assert_eq!(s.queue_offsets("t", 0), (0, 40));
}

#[test]
fn offset_for_timestamp_uses_store_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_000_000);
    let s = Store::open_with(
        StoreConfig::small(dir.path()),
        Arc::new(StdFs),
        Arc::new(clock.clone()),
    )
    .expect("open");
    for i in 0..10 {
        s.append_blocking(vec![msg("t", 0, i)]).expect("append");
        clock.advance(1000);
    }
    assert_eq!(s.offset_for_timestamp("t", 0, 0).expect("ts"), 0);
    assert_eq!(s.offset_for_timestamp("t", 0, 1_004_000).expect("ts"), 4);
    assert_eq!(s.offset_for_timestamp("t", 0, 1_004_001).expect("ts"), 5);
    assert_eq!(s.offset_for_timestamp("t", 0, 9_000_000).expect("ts"), 10);
    // Time going backwards never makes store times decrease.
    clock.set(0);
    let r = s.append_blocking(vec![msg("t", 0, 10)]).expect("append");
    assert_eq!(r[0].store_ts, 1_009_000);
    let keyed = s
        .lookup_key("t", "shared", 1_002_000, 1_003_000, 100)
        .expect("keys");
    assert_eq!(keyed.len(), 2);
}

#[test]
fn retention_by_budget_and_age_moves_min_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_000_000);
    let mut c = StoreConfig::small(dir.path());
    c.segment_size = 32 << 10;
    c.max_record_size = 8 << 10;
    c.retention = Some(Duration::from_secs(60));
    c.disk_budget = Some(100 << 10);
    let s = Store::open_with(c, Arc::new(StdFs), Arc::new(clock.clone())).expect("open");
    let m = |i: u64| AppendMessage {
        body: Bytes::from(vec![1u8; 1000]),
        ..msg("t", (i % 2) as u32, i)
    };
    for i in 0..300 {
        s.append_blocking(vec![m(i)]).expect("append");
    }
    let before = s.stats().disk_bytes;
    assert!(before > 100 << 10);
    let r = s.run_retention().expect("retention");
    assert!(r.segments_deleted > 0);
    assert!(s.stats().disk_bytes <= 100 << 10);
    let (min0, max0) = s.queue_offsets("t", 0);
    assert!(min0 > 0 && max0 == 150);
    let b = s.read("t", 0, 0, 10, u64::MAX, |_| true).expect("read");
    assert_eq!(b.status, ReadStatus::OffsetTooSmall);
    assert_eq!(b.next_offset, min0);
    let rest = read_all(&s, "t", 0);
    assert_eq!(rest.len() as u64, 150 - min0);
    // Age: everything but the active segment goes once it is old enough.
    clock.advance(61_000);
    s.append_blocking(vec![m(1000)]).expect("append");
    let r = s.run_retention().expect("retention");
    assert!(r.segments_deleted > 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("commitlog"))
            .expect("ls")
            .count(),
        1
    );
    drop(s);
    let c = StoreConfig::small(dir.path());
    let s = Store::open_with(c, Arc::new(StdFs), Arc::new(clock)).expect("reopen");
    let (min1, max1) = s.queue_offsets("t", 1);
    assert_eq!(max1, 150);
    assert!(min1 > 0);
}

fn faulty(dir: &std::path::Path, flush: FlushPolicy) -> (Store, Arc<Faults>, Arc<FaultyFs<StdFs>>) {
    let (s, faults, fs, _) = faulty_with(dir, |c| {
        c.flush = flush;
        c.checkpoint_interval = Duration::from_secs(3600);
    });
    (s, faults, fs)
}

/// A store on the failure-injecting file system with the small test configuration as
/// `tweak` leaves it; the configuration comes back too, to reopen with.
fn faulty_with(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut StoreConfig),
) -> (Store, Arc<Faults>, Arc<FaultyFs<StdFs>>, StoreConfig) {
    let faults = Faults::new();
    let fs = Arc::new(FaultyFs::new(StdFs, faults.clone()));
    let mut c = StoreConfig::small(dir);
    tweak(&mut c);
    let s = Store::open_with(c.clone(), fs.clone(), Arc::new(SystemClock)).expect("open");
    (s, faults, fs, c)
}

/// Closes `s`, whose closing checkpoint must have fenced it at its `syncfs`.
fn expect_fenced_at_closing_syncfs(s: &Store) -> anyhow::Result<()> {
    s.close();
    let why = s
        .fenced()
        .ok_or_else(|| anyhow::anyhow!("the checkpoint missed the error"))?;
    anyhow::ensure!(why.contains("sync file system"), "{why}");
    Ok(())
}

/// Simulates a power loss (un-synced bytes vanish) on a store already dropped, and opens it
/// again through the same faulty file system.
fn lose_power_and_reopen(dir: &std::path::Path, fs: Arc<FaultyFs<StdFs>>) -> Store {
    fs.lose_unsynced().expect("power loss");
    Store::open_with(
        StoreConfig::small(dir),
        Arc::new(FsRef(fs)),
        Arc::new(SystemClock),
    )
    .expect("reopen")
}

struct FsRef(Arc<FaultyFs<StdFs>>);
impl Vfs for FsRef {
    fn open(&self, p: &std::path::Path, c: bool) -> std::io::Result<Arc<dyn VFile>> {
        self.0.open(p, c)
    }
    fn remove_file(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.remove_file(p)
    }
    fn create_dir_all(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.create_dir_all(p)
    }
    fn list_dir(&self, p: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.0.list_dir(p)
    }
    fn sync_dir(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.sync_dir(p)
    }
    fn open_fs_sync(&self, p: &std::path::Path) -> std::io::Result<Arc<dyn FsSync>> {
        self.0.open_fs_sync(p)
    }
    fn rename(&self, a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
        self.0.rename(a, b)
    }
    fn exists(&self, p: &std::path::Path) -> bool {
        self.0.exists(p)
    }
    fn file_len(&self, p: &std::path::Path) -> std::io::Result<u64> {
        self.0.file_len(p)
    }
    fn available_space(&self, p: &std::path::Path) -> std::io::Result<u64> {
        self.0.available_space(p)
    }
}

#[test]
fn failed_fsync_fences_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, faults, _fs) = faulty(dir.path(), FlushPolicy::Sync);
    s.append_blocking(vec![msg("t", 0, 0)]).expect("append");
    faults.fail_sync.store(true, Ordering::SeqCst);
    let e = s
        .append_blocking(vec![msg("t", 0, 1)])
        .expect_err("must not ack");
    assert!(matches!(e, StoreError::Fenced(_)), "{e}");
    // Even once fsync works again, the store does not retry-and-ack.
    faults.fail_sync.store(false, Ordering::SeqCst);
    assert!(matches!(
        s.append_blocking(vec![msg("t", 0, 2)]),
        Err(StoreError::Fenced(_))
    ));
    assert!(s.fenced().is_some());
    // The unacknowledged record is not visible to readers.
    assert_eq!(s.queue_offsets("t", 0), (0, 1));
}

/// Out of descriptors when the commit log has to move to a new segment: the appends that
/// need it fail with an I/O error, nothing of them is stored (a request of several
/// messages not in part), the store is not fenced, and once the file can be created the
/// appends go on with no gap in any queue.
#[test]
fn a_segment_that_cannot_be_created_fails_only_the_appends_that_need_it() {
    for flush in [FlushPolicy::Sync, ASYNC] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, faults, fs, c) = faulty_with(dir.path(), |c| {
            c.flush = flush;
            c.segment_size = 16 << 10;
            c.max_record_size = 4 << 10;
        });
        let big = |q: u32, i: u64| AppendMessage {
            body: Bytes::from(vec![b'r'; 600]),
            ..msg("roll", q, i)
        };
        *faults.fail_create_in.lock() = Some(dir.path().join("commitlog"));
        let mut stored = 0;
        let refused = loop {
            // Two messages to queue 0 and one to queue 1 per request.
            let req = vec![big(0, 2 * stored), big(1, stored), big(0, 2 * stored + 1)];
            match s.append_blocking(req) {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 100, "{flush:?}: the segment never filled");
        };
        assert!(
            matches!(
                &refused,
                StoreError::Io {
                    op: "create segment",
                    ..
                }
            ),
            "{flush:?}: {refused}"
        );
        assert!(s.fenced().is_none(), "{flush:?}");
        assert_eq!(segments(dir.path()).len(), 1, "{flush:?}");
        // Refused as often as it is tried, and nothing of it counts.
        let again = vec![big(0, 2 * stored), big(1, stored), big(0, 2 * stored + 1)];
        assert!(s.append_blocking(again).is_err(), "{flush:?}");
        assert_eq!(s.queue_offsets("roll", 0), (0, 2 * stored), "{flush:?}");
        assert_eq!(s.queue_offsets("roll", 1), (0, stored), "{flush:?}");
        // A message that still fits in the segment is stored meanwhile.
        s.append_blocking(vec![AppendMessage {
            body: Bytes::new(),
            ..msg("small", 0, 0)
        }])
        .expect("a small append fits");
        *faults.fail_create_in.lock() = None;
        for i in 0..10 {
            s.append_blocking(vec![
                big(0, 2 * stored),
                big(1, stored),
                big(0, 2 * stored + 1),
            ])
            .expect("append once the segment can be created");
            stored += 1;
            assert!(i < 9 || segments(dir.path()).len() > 1);
        }
        drop(s);
        let s = Store::open_with(c, fs, Arc::new(SystemClock)).expect("reopen");
        let q0 = read_all(&s, "roll", 0);
        let q1 = read_all(&s, "roll", 1);
        assert_eq!(
            (q0.len() as u64, q1.len() as u64),
            (2 * stored, stored),
            "{flush:?}"
        );
        for (i, m) in q0.iter().enumerate() {
            assert_eq!(m.queue_offset, i as u64);
            assert_eq!(
                m.msg_id(),
                Some(format!("id-roll-0-{i}").as_str()),
                "{flush:?}"
            );
        }
        for (i, m) in q1.iter().enumerate() {
            assert_eq!(
                m.msg_id(),
                Some(format!("id-roll-1-{i}").as_str()),
                "{flush:?}"
            );
        }
        assert_eq!(read_all(&s, "small", 0).len(), 1);
    }
}

#[test]
fn low_disk_space_refuses_writes_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let fs = Arc::new(FaultyFs::new(StdFs, faults.clone()));
    let mut c = StoreConfig::small(dir.path());
    c.min_free_space = 1 << 20;
    let s = Store::open_with(c, fs, Arc::new(SystemClock)).expect("open");
    s.append_blocking(vec![msg("t", 0, 0)]).expect("append");
    faults.available_space.store(1000, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(120));
    let e = s
        .append_blocking(vec![msg("t", 0, 1)])
        .expect_err("refused");
    assert!(
        matches!(
            e,
            StoreError::DiskFull {
                available: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.queue_offsets("t", 0), (0, 1));
    faults.available_space.store(u64::MAX, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(120));
    let r = s
        .append_blocking(vec![msg("t", 0, 1)])
        .expect("writes resume");
    assert_eq!(r[0].queue_offset, 1);
}

#[test]
fn write_error_fences_and_nothing_partial_is_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, faults, fs) = faulty(dir.path(), FlushPolicy::Sync);
    for i in 0..5 {
        s.append_blocking(vec![msg("t", 0, i)]).expect("append");
    }
    faults.torn_write_bytes.store(20, Ordering::SeqCst);
    assert!(s.append_blocking(vec![msg("t", 0, 5)]).is_err());
    assert_eq!(s.queue_offsets("t", 0), (0, 5));
    drop(s);
    let s = lose_power_and_reopen(dir.path(), fs);
    assert_eq!(read_all(&s, "t", 0).len(), 5);
}

/// A page that fails writeback after its write returned (a failing disk) fences the store
/// at the next fdatasync of the commit log, in both flush modes: no append is acknowledged
/// after it. In Sync mode the zeroer also waits for writeback on the same file.
#[test]
fn a_writeback_error_fences_the_store() {
    for flush in [
        FlushPolicy::Sync,
        FlushPolicy::Async {
            interval: Duration::from_millis(10),
            bytes: 1 << 20,
        },
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, faults, _fs) = faulty(dir.path(), flush);
        for i in 0..5 {
            s.append_blocking(vec![msg("t", 0, i)]).expect("append");
        }
        let seg = segments(dir.path()).pop().expect("a segment");
        faults.inject_writeback_error(&seg);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut i = 5;
        let e = loop {
            match s.append_blocking(vec![msg("t", 0, i)]) {
                Err(e) => break e,
                Ok(_) if flush == FlushPolicy::Sync => panic!("acknowledged after the error"),
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "never fenced");
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        assert!(matches!(e, StoreError::Fenced(_)), "{flush:?}: {e}");
        assert!(s.fenced().is_some());
    }
}

#[test]
fn power_loss_keeps_every_sync_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _faults, fs) = faulty(dir.path(), FlushPolicy::Sync);
    let s = Arc::new(s);
    let mut handles = Vec::new();
    for t in 0..4u32 {
        let s = s.clone();
        handles.push(std::thread::spawn(move || {
            for i in 0..50u64 {
                s.append_blocking(vec![msg("p", t, i)]).expect("append");
            }
        }));
    }
    for h in handles {
        h.join().expect("join");
    }
    // Simulate a crash: writer and flusher stop, un-synced bytes vanish.
    drop(Arc::try_unwrap(s).ok().expect("sole owner"));
    let s = lose_power_and_reopen(dir.path(), fs);
    for t in 0..4 {
        let got = read_all(&s, "p", t);
        assert_eq!(got.len(), 50);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.msg_id(), Some(format!("id-p-{t}-{i}").as_str()));
        }
    }
}

/// Group commits that span segment rolls: each fdatasync has to cover the tail of the old
/// segment as well as the head of the new one. The batches are large enough for the writer
/// to start their writeback early, which must make nothing count as durable.
#[test]
fn power_loss_keeps_sync_acks_across_segment_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, faults, fs) = faulty(dir.path(), FlushPolicy::Sync);
    let body = |i: u64| Bytes::from(vec![(i % 251) as u8; 90_000 + (i as usize % 7) * 1000]);
    // ≈ 4.6 MiB in batches of 5 records (≈ 450 KB) over 1 MiB segments.
    let n = append_bodies(&s, "r", 10, 5, body);
    assert!(faults.write_back_hints.load(Ordering::SeqCst) > 0);
    drop(s);
    let s = lose_power_and_reopen(dir.path(), fs);
    assert_bodies(&s, "r", n, body);
}

#[test]
fn async_power_loss_loses_at_most_the_unflushed_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _faults, fs) = faulty(
        dir.path(),
        FlushPolicy::Async {
            interval: Duration::from_secs(3600),
            bytes: u64::MAX,
        },
    );
    for i in 0..20 {
        s.append_blocking(vec![msg("a", 0, i)]).expect("append");
    }
    // Nothing flushed yet: a power loss right now would lose these writes. Simulate it
    // without the clean shutdown (which would flush) by cutting files while the store runs.
    fs.lose_unsynced().expect("power loss");
    std::mem::forget(s);
    let mut c = StoreConfig::small(dir.path());
    c.flush = ASYNC;
    // The lock is still held by the forgotten store's file handle in this process; flock
    // locks belong to the open file description, so a new open in the same process fails.
    // Open through a copy of the directory instead.
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(dir.path(), copy.path());
    c.data_dir = copy.path().to_path_buf();
    let s = Store::open(c).expect("reopen");
    let n = read_all(&s, "a", 0).len();
    assert!(
        n < 20,
        "unflushed Async writes cannot survive a power loss here ({n})"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).expect("ls") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&dst).expect("mkdir");
            copy_dir(&e.path(), &dst);
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

// ---- corrupt-file fixtures ----

fn fixture() -> (tempfile::TempDir, StoreConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = StoreConfig::small(dir.path());
    c.segment_size = 16 << 10;
    c.max_record_size = 4 << 10;
    let s = Store::open(c.clone()).expect("open");
    for i in 0..100 {
        let m = AppendMessage {
            body: Bytes::from(vec![b'f'; 600]),
            ..msg("f", 0, i)
        };
        s.append_blocking(vec![m]).expect("append");
    }
    drop(s);
    (dir, c)
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("commitlog"))
        .expect("ls")
        .map(|e| e.expect("e").path())
        .collect();
    v.sort();
    v
}

/// A store closed cleanly opens without reading a consume-queue file: its closing
/// checkpoint says that no queue points past the commit log's end. Without that checkpoint
/// (a crash: here the checkpoint the store wrote when it opened, put back) every queue is
/// checked again, and either way the queues read back whole.
#[test]
fn a_clean_close_lets_the_next_open_take_the_queues_as_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = StoreConfig::small(dir.path());
    c.checkpoint_interval = Duration::from_secs(3600);
    let s = Store::open(c.clone()).expect("open");
    // The checkpoint of a store at work: not clean.
    let at_work = std::fs::read(dir.path().join("checkpoint")).expect("checkpoint");
    for q in 0..6u32 {
        for i in 0..3 {
            s.append_blocking(vec![msg("c", q, i)]).expect("append");
        }
    }
    drop(s);
    let s = Store::open(c.clone()).expect("reopen");
    let r = s.recovery_report().clone();
    assert!(r.clean_shutdown, "{r:?}");
    assert_eq!(s.stats().queue_files_opened, 0);
    for q in 0..6u32 {
        assert_eq!(read_all(&s, "c", q).len(), 3);
    }
    drop(s);
    // A crash leaves a checkpoint that is not clean: everything is checked (and the records
    // after it replayed), as before.
    std::fs::write(dir.path().join("checkpoint"), &at_work).expect("put back");
    let s = Store::open(c.clone()).expect("reopen after a crash");
    let r = s.recovery_report().clone();
    assert!(!r.clean_shutdown && r.records_replayed == 18, "{r:?}");
    for q in 0..6u32 {
        let got = read_all(&s, "c", q);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].msg_id(), Some(format!("id-c-{q}-2").as_str()));
    }
    drop(s);
    // The store that opened after the crash and closed again is clean once more.
    let s = Store::open(c).expect("reopen");
    assert!(s.recovery_report().clean_shutdown);
}

#[test]
fn torn_tail_is_cut_and_reported() {
    let (dir, c) = fixture();
    let end = Store::open(c.clone()).expect("open").stats().written_offset;
    let last = segments(dir.path()).pop().expect("segment");
    let start: u64 = last
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("segment name");
    let len = std::fs::metadata(&last).expect("meta").len();
    // Garbage right after the last record (in the segment's reserved space), as a torn
    // write would leave.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 300], end - start).expect("write");
    drop(f);
    let s = Store::open(c.clone()).expect("reopen");
    let r = s.recovery_report();
    assert_eq!(r.valid_end, end);
    // The garbage and, in a preallocated segment, the reserved space after it.
    assert!(r.dropped_bytes >= 300, "{r:?}");
    let (file, off, _) = r.truncated_at.clone().expect("cut");
    assert!(file.ends_with(&*last.file_name().expect("name").to_string_lossy()));
    assert_eq!(std::fs::metadata(&last).expect("meta").len(), len);
    assert!(off > 0);
    assert_eq!(read_all(&s, "f", 0).len(), 100);
}

#[test]
fn flipped_bit_in_acknowledged_data_is_an_error_not_a_silent_cut() {
    let (dir, c) = fixture();
    let first = segments(dir.path())[0].clone();
    let mut b = std::fs::read(&first).expect("read");
    b[700] ^= 0x10;
    std::fs::write(&first, &b).expect("write");
    // Below the checkpoint records are trusted at open; a read of the damaged record fails
    // with file and offset, never returns wrong bytes.
    let s = Store::open(c.clone()).expect("open");
    let e = s
        .read("f", 0, 0, 10, u64::MAX, |_| true)
        .expect_err("corrupt record");
    assert!(
        matches!(
            e,
            StoreError::Corrupt {
                offset: 0..=700,
                ..
            }
        ),
        "{e}"
    );
    drop(s);
    // When recovery has to verify it (queue damaged, full rebuild), damage below the
    // checkpointed durable offset stops the open instead of cutting acknowledged data.
    let qfile = dir
        .path()
        .join("consumequeue/f/0")
        .join(format!("{:020}", 0));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .expect("open");
    f.set_len(28 * 3 + 1).expect("truncate");
    drop(f);
    match Store::open(c).err().expect("corruption detected") {
        StoreError::Corrupt { file, offset, .. } => {
            assert!(file.contains("commitlog"));
            assert!(offset <= 700);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(std::fs::read(&first).expect("read"), b, "nothing changed");
}

#[test]
fn preallocated_space_is_not_data_and_a_lost_seal_is_repaired() {
    for rebuild in [false, true] {
        let (dir, c) = fixture();
        let segs = segments(dir.path());
        assert!(segs.len() >= 3);
        // The active segment is preallocated: longer than its data, which ends in zeros.
        let last = segs.last().expect("last");
        assert_eq!(std::fs::metadata(last).expect("meta").len(), c.segment_size);
        // A crash lost the cut of a full segment: it reaches past the next one in zeros.
        let exact = std::fs::metadata(&segs[1]).expect("meta").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segs[1])
            .expect("open");
        f.set_len(c.segment_size).expect("extend");
        drop(f);
        if rebuild {
            // Without a checkpoint recovery scans every segment from the start.
            std::fs::remove_file(dir.path().join("checkpoint")).expect("rm checkpoint");
        }
        let s = Store::open(c.clone()).expect("reopen");
        let r = s.recovery_report();
        assert_eq!(r.dropped_bytes, 0, "rebuild={rebuild}: {r:?}");
        assert!(r.truncated_at.is_none(), "{r:?}");
        assert_eq!(read_all(&s, "f", 0).len(), 100);
        assert_eq!(
            std::fs::metadata(&segs[1]).expect("meta").len(),
            exact,
            "the lost cut is made again"
        );
        // Appends continue where the data ended.
        s.append_blocking(vec![msg("f", 0, 100)]).expect("append");
        drop(s);
        let s = Store::open(c).expect("reopen again");
        assert_eq!(read_all(&s, "f", 0).len(), 101);
    }
}

#[test]
fn truncated_middle_segment_is_an_error() {
    let (dir, c) = fixture();
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[1])
        .expect("open");
    f.set_len(100).expect("truncate");
    drop(f);
    assert!(matches!(Store::open(c), Err(StoreError::Corrupt { .. })));
}

#[test]
fn truncated_or_missing_queue_files_are_rebuilt() {
    let (dir, c) = fixture();
    let qfile = dir
        .path()
        .join("consumequeue/f/0")
        .join(format!("{:020}", 0));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .expect("open");
    f.set_len(28 * 30 + 5).expect("truncate");
    drop(f);
    let s = Store::open(c.clone()).expect("reopen");
    assert!(s.recovery_report().full_rebuild);
    assert_eq!(read_all(&s, "f", 0).len(), 100);
    drop(s);
    // Entry-aligned truncation is found as a gap during replay.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .expect("open");
    f.set_len(28 * 10).expect("truncate");
    drop(f);
    std::fs::remove_file(dir.path().join("checkpoint")).expect("rm");
    let s = Store::open(c.clone()).expect("reopen");
    assert_eq!(read_all(&s, "f", 0).len(), 100);
    drop(s);
    std::fs::remove_dir_all(dir.path().join("consumequeue")).expect("rm");
    std::fs::remove_dir_all(dir.path().join("index")).expect("rm");
    std::fs::remove_file(dir.path().join("checkpoint")).expect("rm");
    let s = Store::open(c).expect("reopen");
    assert_eq!(read_all(&s, "f", 0).len(), 100);
    assert!(s.lookup_message_id("id-f-0-42").expect("lookup").is_some());
}

#[test]
fn garbage_queue_entries_give_errors_not_panics_or_huge_reads() {
    // Found by the `store_open` fuzz target: an entry whose offset + size overflowed u64
    // panicked recovery's tail check, and a read trusted an entry's size to size its buffer.
    let (dir, c) = fixture();
    let qfile = dir
        .path()
        .join("consumequeue/f/0")
        .join(format!("{:020}", 0));
    let entry = |clog_offset: u64, size: u32| {
        let mut b = [0u8; 28];
        b[0..8].copy_from_slice(&clog_offset.to_le_bytes());
        b[8..12].copy_from_slice(&size.to_le_bytes());
        b
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .expect("open");
    let mut b = std::fs::read(&qfile).expect("read");
    // Entry 5 claims 4 GiB from its own record on; entry 6 sits at the top of the u64 range.
    let e5 = CqEntry::decode(&b[5 * 28..6 * 28]).expect("entry 5");
    b[5 * 28..6 * 28].copy_from_slice(&entry(e5.clog_offset, u32::MAX));
    b[6 * 28..7 * 28].copy_from_slice(&entry(u64::MAX - 3, 100));
    std::os::unix::fs::FileExt::write_all_at(&f, &b, 0).expect("write");
    drop(f);
    let s = Store::open(c.clone()).expect("reopen");
    for from in [5, 6] {
        match s.read("f", 0, from, 1, 1 << 20, |_| true) {
            Err(StoreError::Corrupt { reason, .. }) => {
                assert!(reason.contains("consume-queue entry"), "{reason}")
            }
            other => panic!("queue offset {from}: {other:?}"),
        }
    }
    // The other entries still read.
    let good = s.read("f", 0, 0, 5, 1 << 20, |_| true).expect("read");
    assert_eq!(good.messages.len(), 5);
    drop(s);
    // The same garbage right after the last entry is cut by recovery.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &entry(u64::MAX - 3, 100), 100 * 28)
        .expect("append");
    drop(f);
    std::fs::remove_file(dir.path().join("checkpoint")).expect("rm");
    let s = Store::open(c).expect("reopen");
    assert_eq!(s.queue_offsets("f", 0).1, 100);
}

#[test]
fn damaged_checkpoint_falls_back_to_full_verification() {
    let (dir, c) = fixture();
    std::fs::write(dir.path().join("checkpoint"), b"garbage").expect("write");
    let s = Store::open(c).expect("reopen");
    assert_eq!(s.recovery_report().replayed_from, 0);
    assert_eq!(read_all(&s, "f", 0).len(), 100);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), FlushPolicy::Sync);
    assert!(matches!(
        Store::open(StoreConfig::small(dir.path())),
        Err(StoreError::Locked(_))
    ));
    drop(s);
    assert!(Store::open(StoreConfig::small(dir.path())).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs_and_never_overlaps_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(open(dir.path(), FlushPolicy::Sync));
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                s.append(vec![msg("g", t % 4, i)]).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let st = s.stats();
    assert_eq!(st.appended_messages, 64 * 20);
    assert!(
        st.fsyncs < 64 * 20,
        "{} fsyncs for {} appends",
        st.fsyncs,
        64 * 20
    );
    assert_eq!(st.max_syncs_in_flight, 1);
    assert_eq!(st.durable_offset, st.written_offset);
}

/// Sync group commits change hands as the load changes: small groups are synced by the
/// writer itself, large ones by the syncer thread (while the writer writes the next). In
/// every phase an acknowledged append is already durable, syncs never overlap, and nothing
/// is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_move_between_writer_and_syncer_safely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let fs = Arc::new(FaultyFs::new(StdFs, faults.clone()));
    let mut c = StoreConfig::small(dir.path());
    c.flush = FlushPolicy::Sync;
    c.inline_sync_max = 8;
    let s = Arc::new(Store::open_with(c, fs, Arc::new(SystemClock)).expect("open"));
    let mut next = [0u64; 64];
    // (appenders, appends each, extra ms per fdatasync): the slow phase makes groups larger
    // than `inline_sync_max`.
    let phases = [(1, 30, 0), (64, 10, 2), (4, 20, 0), (48, 10, 1)];
    for (phase, &(appenders, each, delay)) in phases.iter().cycle().take(12).enumerate() {
        faults.sync_delay_ms.store(delay, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for (t, &first) in next.iter().enumerate().take(appenders) {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in first..first + each {
                    let r = s.append(vec![msg("h", t as u32, i)]).await.expect("append");
                    assert_eq!(r[0].queue_offset, i, "phase {phase}");
                    let st = s.stats();
                    assert!(st.durable_offset >= r[0].physical_offset + u64::from(r[0].size));
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        for n in next.iter_mut().take(appenders) {
            *n += each;
        }
    }
    let st = s.stats();
    assert_eq!(st.appended_messages, 3 * (30 + 640 + 80 + 480));
    assert_eq!(st.max_syncs_in_flight, 1);
    assert!(st.writer_group_commits > 0, "the writer never synced");
    assert!(
        st.writer_group_commits < st.fsyncs,
        "the syncer never synced ({} of {} by the writer)",
        st.writer_group_commits,
        st.fsyncs
    );
    assert_eq!(st.durable_offset, st.written_offset);
    for (t, &n) in next.iter().enumerate() {
        let got = read_all(&s, "h", t as u32);
        assert_eq!(got.len() as u64, n, "queue {t}");
        for (i, m) in got.iter().enumerate() {
            assert_eq!(
                m.property(PROP_MSG_ID),
                Some(format!("id-h-{t}-{i}").as_str())
            );
        }
    }
}

#[test]
fn arrival_listener_fires_when_records_become_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), FlushPolicy::Sync);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    s.set_arrival_listener(move |t, q, max| seen2.lock().push((t.to_string(), q, max)));
    s.append_blocking(vec![msg("l", 3, 0), msg("l", 3, 1)])
        .expect("append");
    assert_eq!(seen.lock().last().cloned(), Some(("l".to_string(), 3, 2)));
}

/// A slow disk (every fdatasync 20 ms longer): appends still complete, in order and durable,
/// and the slowness shows as bigger group commits, never as overlapping syncs or appends
/// acknowledged before their sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fsync_makes_bigger_group_commits_not_early_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, faults, _fs) = faulty(dir.path(), FlushPolicy::Sync);
    faults.sync_delay_ms.store(20, Ordering::SeqCst);
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5u64 {
                let r = s.append(vec![msg("slow", t, i)]).await.expect("append");
                // Acknowledged means durable: the durable mark covers this record already.
                let st = s.stats();
                assert!(st.durable_offset >= r[0].physical_offset + u64::from(r[0].size));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let st = s.stats();
    assert_eq!(st.appended_messages, 16 * 5);
    assert_eq!(st.max_syncs_in_flight, 1);
    // 80 appends with a 20 ms sync each would be 80 syncs without group commit.
    assert!(st.fsyncs <= 40, "{} fdatasyncs for 80 appends", st.fsyncs);
    for t in 0..16u32 {
        assert_eq!(read_all(&s, "slow", t).len(), 5);
    }
}

/// Async appends are written by the appenders themselves (flat combining): tasks on the
/// runtime and plain threads append at once across segment rolls; every append is stored
/// once, each appender's messages keep their order, and batches were shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appenders_combine_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(open(dir.path(), ASYNC));
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u64 {
                let r = s
                    .append(vec![msg("c", t, 2 * i), msg("c", t, 2 * i + 1)])
                    .await
                    .expect("append");
                assert_eq!(r[0].queue_offset, 2 * i);
                assert_eq!(r[1].queue_offset, 2 * i + 1);
                assert_eq!(
                    r[1].physical_offset,
                    r[0].physical_offset + u64::from(r[0].size)
                );
            }
        }));
    }
    let threads: Vec<_> = (32..36u32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    s.append_blocking(vec![msg("c", t, i)]).expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    for t in threads {
        t.join().expect("thread");
    }
    let st = s.stats();
    assert_eq!(st.appended_messages, 32 * 200 + 4 * 200);
    assert!(st.batches <= st.appended_messages);
    assert!(
        s.config().segment_size < st.written_offset,
        "no segment roll happened"
    );
    for t in 0..36u32 {
        let got = read_all(&s, "c", t);
        assert_eq!(got.len(), 200, "queue {t}");
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.queue_offset, i as u64);
            assert_eq!(
                m.property(PROP_MSG_ID),
                Some(format!("id-c-{t}-{i}").as_str())
            );
        }
    }
    drop(s);
    // Everything written is there after a reopen.
    let s = open(dir.path(), ASYNC);
    assert_eq!(read_all(&s, "c", 7).len(), 200);
}

/// Closing while appenders are at work neither hangs nor loses an acknowledged append:
/// every append either succeeds (and is there after a reopen) or is refused as closed.
#[test]
fn async_close_under_load_answers_every_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(open(dir.path(), ASYNC));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut ok = 0u64;
                for i in 0..100_000u64 {
                    match s.append_blocking(vec![msg("z", t, i)]) {
                        Ok(_) => ok += 1,
                        Err(StoreError::Closed) => break,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                ok
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    s.close();
    let acked: Vec<u64> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    drop(s);
    let s = open(dir.path(), ASYNC);
    for (t, n) in acked.iter().enumerate() {
        assert_eq!(read_all(&s, "z", t as u32).len() as u64, *n, "queue {t}");
    }
}

/// A queue that cannot be opened (here its topic directory is taken by a file; in
/// production: out of file descriptors) fails the requests that write to it, and only
/// those: the rest of the same batch is stored, and the store is not fenced. The stray file
/// among the topic directories does not keep the store from opening again.
#[test]
fn a_queue_that_cannot_be_opened_fails_only_its_requests() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for flush in [FlushPolicy::Sync, ASYNC] {
        let data = dir.path().join(format!("{flush:?}").replace(' ', ""));
        let s = open(&data, flush);
        s.append_blocking(vec![msg("good", 0, 0)])?;
        std::fs::write(
            data.join("consumequeue").join("blocked"),
            b"not a directory",
        )?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        // Three requests appended together: the writer takes them as one batch.
        let (a, b, c) = rt.block_on(async {
            tokio::join!(
                s.append(vec![msg("good", 0, 1)]),
                s.append(vec![msg("good", 1, 0), msg("blocked", 0, 0)]),
                s.append(vec![msg("good", 0, 2)]),
            )
        });
        let a = a?;
        let c = c?;
        anyhow::ensure!(
            matches!(&b, Err(StoreError::Io { op, .. }) if *op == "open consume queue"),
            "{b:?}"
        );
        anyhow::ensure!(s.fenced().is_none(), "{:?}", s.fenced());
        anyhow::ensure!(a[0].queue_offset == 1 && c[0].queue_offset == 2);
        s.append_blocking(vec![msg("good", 0, 3)])?;
        let got: Vec<u64> = read_all(&s, "good", 0)
            .iter()
            .map(|m| m.queue_offset)
            .collect();
        anyhow::ensure!(got == [0, 1, 2, 3], "{got:?}");
        // Nothing of the failed request was stored, not even its message to a good queue.
        anyhow::ensure!(read_all(&s, "good", 1).is_empty());
        drop(s);
        // The stray file does not keep the store from opening either.
        let s = open(&data, flush);
        anyhow::ensure!(read_all(&s, "good", 0).len() == 4);
        anyhow::ensure!(read_all(&s, "good", 1).is_empty());
    }
    Ok(())
}

/// A checkpoint after writes to more queues than it syncs one by one (64) syncs the file
/// system once instead: after a power loss every queue still has its entries, and recovery
/// starts from that checkpoint (nothing replayed).
#[test]
fn a_checkpoint_of_many_queues_survives_power_loss() -> anyhow::Result<()> {
    for flush in [FlushPolicy::Sync, ASYNC] {
        let dir = tempfile::tempdir()?;
        let (s, faults, fs) = faulty(dir.path(), flush);
        for q in 0..200u32 {
            s.append_blocking(vec![msg(&format!("many{}", q / 8), q % 8, 0)])?;
        }
        let syncs = faults.syncs.load(Ordering::SeqCst);
        // Closing writes every tail out and checkpoints.
        drop(s);
        anyhow::ensure!(faults.syncs.load(Ordering::SeqCst) > syncs);
        let s = lose_power_and_reopen(dir.path(), fs);
        for q in 0..200u32 {
            let got = read_all(&s, &format!("many{}", q / 8), q % 8);
            anyhow::ensure!(
                got.len() == 1,
                "{flush:?}: queue {q} has {} entries",
                got.len()
            );
        }
        let rep = s.recovery_report();
        anyhow::ensure!(
            rep.records_replayed == 0 && !rep.full_rebuild,
            "{flush:?}: {rep:?}"
        );
    }
    Ok(())
}

/// A consume-queue page that fails writeback in the background is reported by the next
/// checkpoint's `syncfs` (past 64 dirty queues it syncs no queue file itself), even after
/// another process's `syncfs` of the same file system saw the error first: the store syncs
/// through one descriptor kept from its start, and Linux reports an error to every
/// descriptor opened before it. One opened for each call would have missed it, and the
/// checkpoint would have claimed entries the disk did not keep.
#[test]
fn a_writeback_error_before_a_checkpoint_fences_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, faults, fs) = faulty(dir.path(), ASYNC);
    let round = |i: u64| -> anyhow::Result<()> {
        for q in 0..200u32 {
            s.append_blocking(vec![msg(&format!("many{}", q / 8), q % 8, i)])?;
        }
        Ok(())
    };
    round(0)?;
    let cq_root = dir.path().join("consumequeue");
    faults.inject_writeback_error(&cq_root.join("many0").join("0").join("00000000000000000000"));
    // Another process syncs the same file system and sees the error first.
    anyhow::ensure!(fs.open_fs_sync(&cq_root)?.sync().is_err());
    round(1)?;
    // Closing writes every tail out and checkpoints.
    expect_fenced_at_closing_syncfs(&s)
}

/// A queue file whose handle the cache closed, and whose inode the kernel then dropped,
/// takes a writeback error with it: an fdatasync through a new handle succeeds. The
/// checkpoint after an eviction therefore syncs the file system (`syncfs`), which still
/// reports the error, even with only two dirty queues.
#[test]
fn a_writeback_error_of_an_evicted_queue_file_still_fences_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, faults, _fs, _) = faulty_with(dir.path(), |c| {
        c.flush = FlushPolicy::Sync;
        c.checkpoint_interval = Duration::from_secs(3600);
        c.open_queue_files = 1;
    });
    // A full tail of queue 0 goes to its file; then queue 1's file takes the one handle.
    for i in 0..200 {
        s.append_blocking(vec![msg("ev", 0, i)])?;
    }
    for i in 0..200 {
        s.append_blocking(vec![msg("ev", 1, i)])?;
    }
    anyhow::ensure!(s.stats().open_queue_files <= 1);
    let q0 = dir.path().join("consumequeue/ev/0/00000000000000000000");
    faults.inject_writeback_error(&q0);
    faults.evict_inode(&q0);
    expect_fenced_at_closing_syncfs(&s)
}

/// A checkpoint that takes long (here a `syncfs` held up for seconds, as writing out the
/// tails of many thousands of queues does) does not hold up the Async commit-log sync: it
/// runs on a thread of its own, and the commit log is still synced every interval.
#[test]
fn a_slow_checkpoint_does_not_hold_up_the_async_flush() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, faults, _fs, _) = faulty_with(dir.path(), |c| {
        c.flush = FlushPolicy::Async {
            interval: Duration::from_millis(10),
            bytes: 1 << 30,
        };
        c.checkpoint_interval = Duration::from_millis(20);
    });
    faults.fs_sync_delay_ms.store(3000, Ordering::SeqCst);
    // More than 64 dirty queues: the next checkpoint syncs the file system, and waits.
    for q in 0..100u32 {
        s.append_blocking(vec![msg(&format!("slow{}", q / 8), q % 8, 0)])?;
    }
    std::thread::sleep(Duration::from_millis(200));
    s.append_blocking(vec![msg("slow0", 0, 1)])?;
    let written = s.stats().written_offset;
    let t = std::time::Instant::now();
    while s.stats().durable_offset < written {
        anyhow::ensure!(
            t.elapsed() < Duration::from_millis(1500),
            "the commit log was not synced while a checkpoint was running"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    faults.fs_sync_delay_ms.store(0, Ordering::SeqCst);
    drop(s);
    Ok(())
}

/// Nice values of this process's threads named `name`.
fn thread_nices(name: &str) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")? {
        let dir = t?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        // Fields after the command name (which may hold spaces) start with the third.
        let rest = stat
            .rsplit_once(')')
            .ok_or_else(|| anyhow::anyhow!("odd stat {stat}"))?
            .1;
        let nice = rest
            .split_whitespace()
            .nth(16)
            .ok_or_else(|| anyhow::anyhow!("odd stat {stat}"))?;
        out.push(nice.parse()?);
    }
    Ok(out)
}

#[test]
fn the_syncer_runs_at_the_configured_priority_where_allowed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = StoreConfig::small(dir.path());
    c.syncer_nice = -3;
    let s = Store::open_with(c, Arc::new(StdFs), Arc::new(SystemClock))?;
    s.append_blocking(vec![msg("t", 0, 0)])?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The syncer sets it as it starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let nices = thread_nices("sluice-store-sy")?;
            if nices.contains(&-3) {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "syncer nice values: {nices:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Allowed or not, the store works.
    s.append_blocking(vec![msg("t", 0, 1)])?;
    anyhow::ensure!(s.queue_offsets("t", 0) == (0, 2));
    Ok(())
}

mod refused_segments {
    //! Against a model (per queue, the acknowledged messages in order): random appends of
    //! one to three messages of random sizes to random queues, while creating segment files
    //! is switched on and off at random. A refused append leaves no trace, an accepted one
    //! reads back in place, before and after a reopen, and the store is never fenced.

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn refused_rolls_leave_no_trace(
            ops in prop::collection::vec(
                (any::<bool>(), prop::collection::vec((0u32..3, 0usize..1500), 1..4)),
                1..60,
            )
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (s, faults, fs, c) = faulty_with(dir.path(), |c| {
                c.segment_size = 8 << 10;
                c.max_record_size = 4 << 10;
            });
            let mut model: Vec<Vec<(String, usize)>> = vec![Vec::new(); 3];
            let mut refused: Vec<String> = Vec::new();
            let mut n = 0u64;
            for (refuse, msgs) in ops {
                *faults.fail_create_in.lock() = refuse.then(|| dir.path().join("commitlog"));
                let req: Vec<AppendMessage> = msgs
                    .iter()
                    .map(|&(q, len)| {
                        n += 1;
                        AppendMessage {
                            body: Bytes::from(vec![b'm'; len]),
                            ..msg("m", q, n)
                        }
                    })
                    .collect();
                let ids: Vec<String> = req.iter().map(|m| m.property(PROP_MSG_ID).unwrap_or("").to_owned()).collect();
                match s.append_blocking(req) {
                    Ok(res) => {
                        prop_assert_eq!(res.len(), msgs.len());
                        for ((&(q, len), id), r) in msgs.iter().zip(ids).zip(res) {
                            prop_assert_eq!(r.queue_offset, model[q as usize].len() as u64);
                            model[q as usize].push((id, len));
                        }
                    }
                    Err(e) => {
                        refused.extend(ids);
                        prop_assert!(refuse, "refused while segments could be created: {}", e);
                        prop_assert!(matches!(e, StoreError::Io { op: "create segment", .. }), "{}", e);
                    }
                }
                prop_assert!(s.fenced().is_none());
            }
            *faults.fail_create_in.lock() = None;
            let check = |s: &Store| -> Result<(), TestCaseError> {
                for (q, want) in model.iter().enumerate() {
                    let got = read_all(s, "m", q as u32);
                    prop_assert_eq!(got.len(), want.len());
                    for (i, (m, (id, len))) in got.iter().zip(want).enumerate() {
                        prop_assert_eq!(m.queue_offset, i as u64);
                        prop_assert_eq!(m.msg_id(), Some(id.as_str()));
                        prop_assert_eq!(m.body.len(), *len);
                        let found = s.lookup_message_id(id).expect("lookup");
                        prop_assert_eq!(found.map(|f| (f.queue_id, f.queue_offset)), Some((q as u32, i as u64)));
                    }
                }
                for id in &refused {
                    prop_assert!(s.lookup_message_id(id).expect("lookup").is_none());
                }
                Ok(())
            };
            check(&s)?;
            drop(s);
            let s = Store::open_with(c, fs, Arc::new(SystemClock)).expect("reopen");
            check(&s)?;
        }
    }
}
