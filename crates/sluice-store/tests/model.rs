//! Model-based property test of the store.
//!
//! Random sequences of appends, clean reopens and torn tails (garbage after the last record,
//! as a crash in the middle of a write leaves it) run against the real store on plain files
//! and against a trivial in-memory model: per (topic, queue) the list of acknowledged
//! messages. After every operation every queue must read back exactly as the model says
//! (offsets, ids, bodies, keys), the offsets and lookups must agree, and every reopen after a
//! torn tail must cut exactly the garbage and nothing else.
//!
//! Sync flush, tiny segments (8 KiB, records up to 4 KiB) so that rolls happen all the time.
//! `SLUICE_MODEL_CASES` overrides the number of cases (default 32).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sluice_store::{
    AppendMessage, FlushPolicy, PROP_KEYS, PROP_MSG_ID, PROP_TAGS, ReadStatus, Store, StoreConfig,
    tag_hash,
};

const TOPICS: [&str; 2] = ["alpha", "beta_2"];
const QUEUES: u32 = 3;
const SEGMENT_SIZE: u64 = 8 << 10;
const MAX_RECORD: u32 = 4 << 10;

#[derive(Debug, Clone)]
struct MsgSpec {
    topic: usize,
    queue: u32,
    len: usize,
    key: Option<u8>,
}

/// What a torn tail looks like.
#[derive(Debug, Clone, Copy)]
enum Garbage {
    /// Random bytes appended to the last segment.
    Random,
    /// Zeros appended to the last segment (a file extended but never written).
    Zeros,
    /// The first bytes of the last segment appended again: record headers that are valid
    /// but sit at the wrong position, or end before their size says.
    TornRecord,
    /// Random bytes in a new segment file starting where the log ends (a roll that crashed
    /// before its first write completed).
    NewSegment,
}

#[derive(Debug, Clone)]
enum Op {
    /// One `append_blocking` call with 1..=3 messages.
    Append(Vec<MsgSpec>),
    /// Drop the store (clean shutdown) and open it again.
    Reopen,
    /// Drop the store, add `len` bytes of garbage, cut `cut <= len` of them off again, reopen.
    TornTail {
        kind: Garbage,
        len: usize,
        cut: usize,
        seed: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let spec = (
        0..TOPICS.len(),
        0..QUEUES,
        0..3000usize,
        proptest::option::of(0..3u8),
    )
        .prop_map(|(topic, queue, len, key)| MsgSpec {
            topic,
            queue,
            len,
            key,
        });
    let kind = prop_oneof![
        Just(Garbage::Random),
        Just(Garbage::Zeros),
        Just(Garbage::TornRecord),
        Just(Garbage::NewSegment),
    ];
    let torn = (kind, 1..500usize, any::<u64>()).prop_flat_map(|(kind, len, seed)| {
        // Half of the torn tails keep all their garbage; the others lose part of it again.
        let cut = prop_oneof![Just(0usize), 0..=len];
        cut.prop_map(move |cut| Op::TornTail {
            kind,
            len,
            cut,
            seed,
        })
    });
    prop_oneof![
        7 => proptest::collection::vec(spec, 1..=3).prop_map(Op::Append),
        1 => Just(Op::Reopen),
        2 => torn,
    ]
}

/// A message the store acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    n: u64,
    id: String,
    key: Option<String>,
    tag: &'static str,
    body: Vec<u8>,
}

fn body_for(n: u64, len: usize) -> Vec<u8> {
    let salt = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|i| ((salt >> ((i % 8) * 8)) as u8) ^ (i as u8).wrapping_mul(31) ^ (i >> 8) as u8)
        .collect()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::small(dir);
    c.segment_size = SEGMENT_SIZE;
    c.max_record_size = MAX_RECORD;
    c.flush = FlushPolicy::Sync;
    c
}

/// Commit-log segment files, oldest first, with their start offsets.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("commitlog"))
        .expect("list commitlog")
        .map(|e| e.expect("dir entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            (name.len() == 20)
                .then(|| name.parse::<u64>().ok())
                .flatten()
                .map(|s| (s, p))
        })
        .collect();
    v.sort();
    v
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

/// A scratch directory on tmpfs when there is one: this test is about the engine's logic,
/// not the disk, and thousands of fdatasyncs on a busy disk would make it slow and flaky in
/// time. `SLUICE_MODEL_ON_DISK=1` uses the default temporary directory instead.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if std::env::var_os("SLUICE_MODEL_ON_DISK").is_none()
        && shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("tempdir")
}

struct Harness {
    dir: tempfile::TempDir,
    store: Option<Store>,
    /// Acknowledged messages per (topic index, queue).
    model: BTreeMap<(usize, u32), Vec<Acked>>,
    /// Messages appended so far (source of ids and bodies).
    counter: u64,
    /// End of the commit log: the byte after the last acknowledged record.
    clog_end: u64,
    /// Drives the read shapes and lookup samples of the checks.
    rng: XorShift,
}

impl Harness {
    fn new() -> Harness {
        let dir = scratch_dir();
        let store = Store::open(config(dir.path())).expect("open fresh store");
        let r = store.recovery_report();
        assert_eq!(r.dropped_bytes, 0);
        assert_eq!(r.valid_end, 0);
        Harness {
            dir,
            store: Some(store),
            model: BTreeMap::new(),
            counter: 0,
            clog_end: 0,
            rng: XorShift(0x2545_F491_4F6C_DD1D),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Append(specs) => self.append(specs),
            Op::Reopen => {
                drop(self.store.take());
                self.reopen(0);
            }
            Op::TornTail {
                kind,
                len,
                cut,
                seed,
            } => self.torn_tail(*kind, *len, *cut, *seed),
        }
    }

    fn append(&mut self, specs: &[MsgSpec]) {
        let mut msgs = Vec::new();
        let mut acked = Vec::new();
        for s in specs {
            let n = self.counter;
            self.counter += 1;
            let id = format!("m{n}");
            let key = s.key.map(|k| format!("k{k}"));
            let tag = if n.is_multiple_of(2) { "even" } else { "odd" };
            let body = body_for(n, s.len);
            let mut properties = vec![
                (PROP_MSG_ID.to_owned(), id.clone()),
                (PROP_TAGS.to_owned(), tag.to_owned()),
            ];
            if let Some(k) = &key {
                properties.push((PROP_KEYS.to_owned(), k.clone()));
            }
            msgs.push(AppendMessage {
                topic: TOPICS[s.topic].to_owned(),
                queue_id: s.queue,
                flags: n as u32,
                born_ts: n as i64,
                properties,
                body: Bytes::from(body.clone()),
            });
            acked.push(Acked {
                n,
                id,
                key,
                tag,
                body,
            });
        }
        let sizes: Vec<u64> = msgs.iter().map(|m| m.encoded_len() as u64).collect();
        let results = self
            .store()
            .append_blocking(msgs)
            .expect("append is acknowledged");
        assert_eq!(results.len(), specs.len(), "one result per message");
        for ((s, a), (r, size)) in specs.iter().zip(acked).zip(results.iter().zip(sizes)) {
            let q = self.model.entry((s.topic, s.queue)).or_default();
            assert_eq!(
                r.queue_offset,
                q.len() as u64,
                "queue offset of {} in {}/{}",
                a.id,
                TOPICS[s.topic],
                s.queue
            );
            assert_eq!(r.size as u64, size, "record size of {}", a.id);
            // The messages of one call are contiguous, right after the previous append
            // (a roll may move a record to the start of the next segment, but segments are
            // dense, so the offset still continues).
            assert_eq!(
                r.physical_offset, self.clog_end,
                "physical offset of {}",
                a.id
            );
            self.clog_end += size;
            q.push(a);
        }
    }

    /// Opens the store again and checks what recovery reports.
    /// `expect_dropped`: bytes of garbage after the last record (a cut in a preallocated
    /// segment also drops its reserved space, so at least this many are reported).
    fn reopen(&mut self, expect_dropped: u64) {
        let store = Store::open(config(self.dir.path())).expect("reopen store");
        let r = store.recovery_report().clone();
        assert!(
            r.dropped_bytes >= expect_dropped && (expect_dropped > 0 || r.dropped_bytes == 0),
            "dropped bytes on reopen, expected {expect_dropped}: {r:?}"
        );
        assert_eq!(
            r.truncated_at.is_some(),
            expect_dropped > 0,
            "truncation reported iff garbage was there: {r:?}"
        );
        assert_eq!(
            r.valid_end, self.clog_end,
            "valid end after recovery: {r:?}"
        );
        self.store = Some(store);
        // Sealed segments end exactly where the next begins, no segment is larger than
        // allowed, and the last one holds the log's end (its file may be longer: reserved).
        let segs = segments(self.dir.path());
        let mut expect_start = segs.first().map(|s| s.0).unwrap_or(0);
        for (i, (start, path)) in segs.iter().enumerate() {
            assert_eq!(*start, expect_start, "segments are dense: {segs:?}");
            let len = file_len(path);
            assert!(len <= SEGMENT_SIZE, "{} has {len} bytes", path.display());
            if i + 1 == segs.len() {
                assert!(
                    *start <= self.clog_end && self.clog_end <= start + len,
                    "the last segment {} ({len} bytes) holds the end {}",
                    path.display(),
                    self.clog_end
                );
            }
            expect_start = start + len;
        }
    }

    fn torn_tail(&mut self, kind: Garbage, len: usize, cut: usize, seed: u64) {
        drop(self.store.take());
        let mut rng = XorShift(seed | 1);
        let segs = segments(self.dir.path());
        let (start, last) = segs.last().cloned().expect("at least one segment");
        // The data of the last segment (its file may be longer: reserved space).
        let last_len = self.clog_end - start;
        let garbage = match kind {
            Garbage::Random | Garbage::NewSegment => rng.bytes(len),
            Garbage::Zeros => vec![0u8; len],
            Garbage::TornRecord => {
                let mut b = std::fs::read(&last).expect("read last segment");
                b.truncate(len);
                let pad = len - b.len();
                b.extend(rng.bytes(pad));
                b
            }
        };
        let target = match kind {
            // A fresh store has one empty segment starting at 0: that is where the next
            // segment would start too.
            Garbage::NewSegment if last_len > 0 => self
                .dir
                .path()
                .join("commitlog")
                .join(format!("{:020}", start + last_len)),
            _ => last.clone(),
        };
        // What a torn write leaves: the first `len - cut` bytes of the garbage, right after
        // the last record (in a new segment file, at its start).
        let at = if target == last { last_len } else { 0 };
        let kept = &garbage[..len - cut];
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .expect("open segment for garbage");
        std::os::unix::fs::FileExt::write_all_at(&f, kept, at).expect("write garbage");
        f.sync_all().expect("sync garbage");
        drop(f);
        // Zeros after the last record read as the reserved space of a preallocated segment
        // (the end of the data), unless they start a new segment file of their own.
        let is_garbage = !kept.is_empty() && (kept.iter().any(|b| *b != 0) || target != last);
        self.reopen(if is_garbage { kept.len() as u64 } else { 0 });
    }

    /// Compares the whole store with the model.
    fn check(&mut self) {
        let store = self.store.as_ref().expect("store is open");
        let mut expected_queues: Vec<(String, u32)> = self
            .model
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|((t, q), _)| (TOPICS[*t].to_owned(), *q))
            .collect();
        expected_queues.sort();
        assert_eq!(store.queues(), expected_queues, "set of queues");

        for (t, topic) in TOPICS.iter().enumerate() {
            for q in 0..QUEUES {
                let model: &[Acked] = self.model.get(&(t, q)).map(|v| &v[..]).unwrap_or(&[]);
                let n = model.len() as u64;
                assert_eq!(store.queue_offsets(topic, q), (0, n), "{topic}/{q} offsets");
                if n == 0 {
                    let b = store
                        .read(topic, q, 0, 10, u64::MAX, |_| true)
                        .expect("read");
                    assert_eq!(
                        b.status,
                        ReadStatus::NoSuchQueue,
                        "{topic}/{q} never written"
                    );
                    continue;
                }
                // Read everything back in randomly shaped batches.
                let mut off = 0u64;
                while off < n {
                    let max_msgs = 1 + (self.rng.next() % 7) as u32;
                    let max_bytes = match self.rng.next() % 3 {
                        0 => 1,
                        1 => 4000,
                        _ => u64::MAX,
                    };
                    let b = store
                        .read(topic, q, off, max_msgs, max_bytes, |_| true)
                        .expect("read");
                    assert_eq!(b.status, ReadStatus::Found, "{topic}/{q}@{off}");
                    assert_eq!((b.min_offset, b.max_offset), (0, n));
                    assert!(!b.messages.is_empty(), "{topic}/{q}@{off}: empty batch");
                    assert!(b.messages.len() as u32 <= max_msgs);
                    assert_eq!(b.next_offset, off + b.messages.len() as u64);
                    for m in &b.messages {
                        let a = &model[off as usize];
                        assert_eq!(m.topic, *topic);
                        assert_eq!(m.queue_id, q);
                        assert_eq!(m.queue_offset, off, "{topic}/{q}: offsets are dense");
                        assert_eq!(m.msg_id(), Some(a.id.as_str()), "{topic}/{q}@{off} id");
                        assert_eq!(&m.body[..], &a.body[..], "{topic}/{q}@{off} body");
                        assert_eq!(m.born_ts, a.n as i64);
                        assert_eq!(m.flags, a.n as u32);
                        assert_eq!(m.tag(), Some(a.tag));
                        assert_eq!(
                            m.keys().collect::<Vec<_>>(),
                            a.key.iter().map(String::as_str).collect::<Vec<_>>()
                        );
                        off += 1;
                    }
                }
                let b = store
                    .read(topic, q, n, 10, u64::MAX, |_| true)
                    .expect("read");
                assert_eq!(b.status, ReadStatus::NoNewMessage, "{topic}/{q} at the end");
                let b = store
                    .read(topic, q, n + 1, 10, u64::MAX, |_| true)
                    .expect("read");
                assert_eq!(
                    b.status,
                    ReadStatus::OffsetOverflow,
                    "{topic}/{q} past the end"
                );
                assert_eq!(b.next_offset, n);

                // A tag filter returns exactly the matching messages.
                let even = tag_hash("even");
                let mut got = Vec::new();
                let mut off = 0;
                while off < n {
                    let b = store
                        .read(topic, q, off, 1000, u64::MAX, |e| e.tag_hash == even)
                        .expect("filtered read");
                    assert!(b.next_offset > off, "filtered read makes progress");
                    off = b.next_offset;
                    got.extend(b.messages.iter().map(|m| m.queue_offset));
                }
                let want: Vec<u64> = (0..n)
                    .filter(|&i| model[i as usize].tag == "even")
                    .collect();
                assert_eq!(got, want, "{topic}/{q}: tag filter");
            }

            // Keys: newest first, exactly the model's messages of this topic with the key.
            for k in 0..3u8 {
                let key = format!("k{k}");
                let mut want: Vec<&Acked> = self
                    .model
                    .iter()
                    .filter(|((mt, _), _)| *mt == t)
                    .flat_map(|(_, v)| v.iter())
                    .filter(|a| a.key.as_deref() == Some(key.as_str()))
                    .collect();
                want.sort_by_key(|a| std::cmp::Reverse(a.n));
                let want: Vec<&str> = want.iter().map(|a| a.id.as_str()).collect();
                let got = store
                    .lookup_key(topic, &key, i64::MIN, i64::MAX, 1000)
                    .expect("lookup key");
                let got: Vec<&str> = got.iter().filter_map(|m| m.msg_id()).collect();
                assert_eq!(got, want, "{topic}: lookup_key({key})");
            }
        }

        // Ids: a few random acknowledged ones (and sometimes all of them), and unknown ones.
        let all: Vec<(usize, u32, u64, &Acked)> = self
            .model
            .iter()
            .flat_map(|((t, q), v)| {
                v.iter()
                    .enumerate()
                    .map(move |(i, a)| (*t, *q, i as u64, a))
            })
            .collect();
        let sample = if self.rng.next().is_multiple_of(8) {
            all.len()
        } else {
            all.len().min(5)
        };
        for i in 0..sample {
            let pick = if sample == all.len() {
                i
            } else {
                (self.rng.next() % all.len() as u64) as usize
            };
            let (t, q, off, a) = all[pick];
            let m = store
                .lookup_message_id(&a.id)
                .expect("lookup id")
                .unwrap_or_else(|| panic!("id {} not found by lookup_message_id", a.id));
            assert_eq!(
                (m.topic.as_str(), m.queue_id, m.queue_offset),
                (TOPICS[t], q, off),
                "lookup of {}",
                a.id
            );
            assert_eq!(&m.body[..], &a.body[..]);
        }
        let unknown = format!("m{}", self.counter);
        assert!(
            store.lookup_message_id(&unknown).expect("lookup").is_none(),
            "{unknown} was never appended"
        );
    }
}

fn cases() -> u32 {
    std::env::var("SLUICE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

#[test]
fn store_matches_model() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        // Keep the source tree clean: a failure prints its minimal case instead.
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    });
    let ops = proptest::collection::vec(op_strategy(), 1..=40);
    let result = runner.run(&ops, |ops| {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        // One last clean reopen must preserve everything.
        drop(h.store.take());
        h.reopen(0);
        h.check();
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn one(topic: usize, queue: u32, len: usize, key: Option<u8>) -> Op {
    Op::Append(vec![MsgSpec {
        topic,
        queue,
        len,
        key,
    }])
}

#[test]
fn torn_tails_spelled_out() {
    for kind in [
        Garbage::Random,
        Garbage::Zeros,
        Garbage::TornRecord,
        Garbage::NewSegment,
    ] {
        let mut h = Harness::new();
        h.apply(&one(0, 0, 10, None));
        h.apply(&Op::TornTail {
            kind,
            len: 7,
            cut: 0,
            seed: 42,
        });
        h.check();
        h.apply(&one(0, 0, 3000, Some(1)));
        h.apply(&one(0, 0, 3000, None));
        h.apply(&Op::TornTail {
            kind,
            len: 499,
            cut: 100,
            seed: 7,
        });
        h.check();
        h.apply(&Op::Append(vec![
            MsgSpec {
                topic: 1,
                queue: 2,
                len: 3000,
                key: Some(1),
            },
            MsgSpec {
                topic: 0,
                queue: 0,
                len: 0,
                key: Some(1),
            },
        ]));
        h.check();
        h.apply(&Op::TornTail {
            kind,
            len: 300,
            cut: 300,
            seed: 9,
        });
        h.apply(&one(1, 1, 2000, Some(2)));
        h.check();
        h.apply(&Op::Reopen);
        h.check();
    }
}

/// Regression: a torn first write of a brand-new store (garbage in segment 0, no record
/// before it) is cut by recovery; the store must still have a segment to write to.
#[test]
fn garbage_in_an_empty_log_keeps_the_store_writable() {
    let dir = scratch_dir();
    drop(Store::open(config(dir.path())).expect("open"));
    let seg0 = dir.path().join("commitlog").join(format!("{:020}", 0));
    let f = OpenOptions::new()
        .write(true)
        .open(&seg0)
        .expect("open segment 0");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB], 0).expect("write garbage");
    drop(f);
    let s = Store::open(config(dir.path())).expect("reopen");
    assert!(s.recovery_report().dropped_bytes >= 1);
    assert!(s.recovery_report().truncated_at.is_some());
    let r = s.append_blocking(vec![AppendMessage {
        topic: "alpha".into(),
        queue_id: 0,
        body: Bytes::from_static(b"after the cut"),
        ..AppendMessage::default()
    }]);
    assert!(r.is_ok(), "append after the cut: {r:?}");
}
