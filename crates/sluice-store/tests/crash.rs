//! Crash test with a real process and a real SIGKILL.
//!
//! The test binary runs itself as the child (`child_writer`, which does nothing unless
//! `SLUICE_CRASH_DIR` is set). The child opens the store (Sync flush, 256 KiB segments) and
//! appends from 8 threads forever, printing `ACK <id> <queue> <queue_offset>` after every
//! acknowledged append. The parent kills it with SIGKILL after a random 50..400 ms, opens the
//! store itself and checks every acknowledgement it ever received, over many cycles on the
//! same directory:
//!
//! * every acknowledged id is stored at exactly its acknowledged (queue, offset), with the
//!   body its id determines;
//! * no id is stored twice, every queue is dense from offset 0, every body verifies;
//! * per writer thread the stored sequence numbers have no gap (a thread appends `seq + 1`
//!   only after `seq` was acknowledged), and at most 2 stored messages were not
//!   acknowledged to the parent (one in flight, one acknowledged but not yet printed);
//! * everything a previous cycle found is still at the same place.
//!
//! `SLUICE_CRASH_CYCLES` sets the number of cycles (default 12), `SLUICE_CRASH_SEED` the
//! seed of the kill delays (printed at the start), `SLUICE_CRASH_DELAY_MS=lo..hi` the range
//! of the kill delay (default `50..400`; e.g. `0..40` kills children while they recover).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_store::{
    AppendMessage, FlushPolicy, PROP_MSG_ID, ReadStatus, Store, StoreConfig, StoredMessage,
};

const THREADS: u32 = 8;
const QUEUES: u32 = 4;
const TOPIC: &str = "crash";

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::small(dir);
    c.segment_size = 256 << 10;
    c.max_record_size = 64 << 10;
    c.flush = FlushPolicy::Sync;
    c
}

fn fnv(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The body an id determines: 10..2000 bytes of a pattern seeded by the id's hash.
fn body_for(id: &str) -> Vec<u8> {
    let h = fnv(id.as_bytes());
    let len = 10 + (h % 1990) as usize;
    let mut x = h | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `c{cycle}-t{thread}-{seq}` → (cycle, thread, seq).
fn parse_id(id: &str) -> Option<(u64, u32, u64)> {
    let mut it = id.split('-');
    let c = it.next()?.strip_prefix('c')?.parse().ok()?;
    let t = it.next()?.strip_prefix('t')?.parse().ok()?;
    let s = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((c, t, s))
}

/// The child: appends forever and reports every acknowledgement on stdout.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os("SLUICE_CRASH_DIR") else {
        return;
    };
    let cycle: u64 = std::env::var("SLUICE_CRASH_CYCLE")
        .ok()
        .and_then(|c| c.parse().ok())
        .expect("SLUICE_CRASH_CYCLE is set");
    let store = Arc::new(Store::open(config(Path::new(&dir))).expect("child opens the store"));
    {
        // libtest printed "test child_writer ... " without a newline: end that line first.
        let mut out = std::io::stdout().lock();
        out.write_all(b"\nCHILD READY\n").expect("stdout");
        out.flush().expect("stdout");
    }
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let queue = t % QUEUES;
                for seq in 0u64.. {
                    let id = format!("c{cycle}-t{t}-{seq}");
                    let msg = AppendMessage {
                        topic: TOPIC.to_owned(),
                        queue_id: queue,
                        flags: 0,
                        born_ts: seq as i64,
                        properties: vec![(PROP_MSG_ID.to_owned(), id.clone())],
                        body: Bytes::from(body_for(&id)),
                    };
                    let r = store.append_blocking(vec![msg]).expect("append");
                    let line = format!("ACK {id} {queue} {}\n", r[0].queue_offset);
                    // One write of the whole line under the lock, then flush: the parent
                    // never sees two lines interleaved, at most a partial last one.
                    let mut out = std::io::stdout().lock();
                    out.write_all(line.as_bytes()).expect("stdout");
                    out.flush().expect("stdout");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
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
}

/// Complete `ACK` lines of the child's output (a partial last line is ignored).
fn parse_acks(out: &[u8]) -> Vec<(String, u32, u64)> {
    let text = String::from_utf8_lossy(out);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ACK ")?.split(' ');
            let id = f.next()?.to_owned();
            let q = f.next()?.parse().ok()?;
            let off = f.next()?.parse().ok()?;
            Some((id, q, off))
        })
        .collect()
}

fn read_queue(store: &Store, q: u32) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let b = store
            .read(TOPIC, q, off, 256, 1 << 20, |_| true)
            .expect("read queue");
        match b.status {
            ReadStatus::Found => {
                assert!(b.next_offset > off, "read makes progress");
                off = b.next_offset;
                out.extend(b.messages);
            }
            ReadStatus::NoNewMessage | ReadStatus::NoSuchQueue => return out,
            s => panic!("queue {q} at {off}: unexpected status {s:?}"),
        }
    }
}

struct CycleResult {
    found: HashMap<String, (u32, u64)>,
    violations: Vec<String>,
}

/// Checks the store against everything acknowledged and everything seen before.
fn verify(
    store: &Store,
    acked: &HashMap<String, (u32, u64)>,
    seen_before: &HashMap<String, (u32, u64)>,
    rng: &mut XorShift,
) -> CycleResult {
    let mut v = Vec::new();
    let mut found: HashMap<String, (u32, u64)> = HashMap::new();
    // (cycle, thread) → stored seqs.
    let mut seqs: BTreeMap<(u64, u32), Vec<u64>> = BTreeMap::new();
    let queues = store.queues();
    for (t, q) in &queues {
        if t != TOPIC || *q >= QUEUES {
            v.push(format!("unexpected queue {t}/{q}"));
        }
    }
    for q in 0..QUEUES {
        let (min, max) = store.queue_offsets(TOPIC, q);
        if min != 0 {
            v.push(format!("queue {q}: min offset {min}"));
        }
        let msgs = read_queue(store, q);
        if msgs.len() as u64 != max {
            v.push(format!(
                "queue {q}: read {} messages, max offset {max}",
                msgs.len()
            ));
        }
        for (i, m) in msgs.iter().enumerate() {
            let i = i as u64;
            if m.queue_offset != i || m.queue_id != q || m.topic != TOPIC {
                v.push(format!(
                    "queue {q}: position {i} holds {}/{}@{}",
                    m.topic, m.queue_id, m.queue_offset
                ));
            }
            let Some(id) = m.msg_id() else {
                v.push(format!("queue {q}@{i}: no message id"));
                continue;
            };
            let Some((c, t, s)) = parse_id(id) else {
                v.push(format!("queue {q}@{i}: malformed id {id:?}"));
                continue;
            };
            if t % QUEUES != q {
                v.push(format!(
                    "queue {q}@{i}: {id} belongs to queue {}",
                    t % QUEUES
                ));
            }
            if m.born_ts != s as i64 {
                v.push(format!("queue {q}@{i}: {id} has born_ts {}", m.born_ts));
            }
            if m.body[..] != body_for(id)[..] {
                v.push(format!(
                    "queue {q}@{i}: body of {id} does not verify ({} bytes)",
                    m.body.len()
                ));
            }
            if let Some(prev) = found.insert(id.to_owned(), (q, i)) {
                v.push(format!(
                    "{id} stored twice: at {prev:?} and at {:?}",
                    (q, i)
                ));
            }
            seqs.entry((c, t)).or_default().push(s);
        }
    }
    let mut lost = 0;
    for (id, at) in acked {
        match found.get(id) {
            Some(f) if f == at => {}
            Some(f) => v.push(format!("{id} acknowledged at {at:?} but stored at {f:?}")),
            None => {
                lost += 1;
                if lost <= 20 {
                    v.push(format!("{id} acknowledged at {at:?} but LOST"));
                }
            }
        }
    }
    if lost > 20 {
        v.push(format!("... {lost} acknowledged messages lost in total"));
    }
    for (id, at) in seen_before {
        if found.get(id) != Some(at) {
            v.push(format!(
                "{id} was stored at {at:?} in the previous cycle, now at {:?}",
                found.get(id)
            ));
        }
    }
    // Per writer thread: seqs 0..k without gaps, in order, and at most 2 beyond the acks.
    let mut acked_max: HashMap<(u64, u32), u64> = HashMap::new();
    for id in acked.keys() {
        if let Some((c, t, s)) = parse_id(id) {
            let e = acked_max.entry((c, t)).or_insert(0);
            *e = (*e).max(s + 1);
        }
    }
    for ((c, t), ss) in &seqs {
        let dense = ss.iter().enumerate().all(|(i, &s)| s == i as u64);
        if !dense {
            v.push(format!(
                "c{c}-t{t}: stored seqs are not 0..{} in order: {:?}",
                ss.len(),
                &ss[..ss.len().min(50)]
            ));
        }
        let a = acked_max.get(&(*c, *t)).copied().unwrap_or(0);
        if (ss.len() as u64) > a + 2 {
            v.push(format!(
                "c{c}-t{t}: {} stored but only {a} acknowledged",
                ss.len()
            ));
        }
    }
    // The id index finds a sample of acknowledged messages.
    let ids: Vec<&String> = acked.keys().collect();
    for _ in 0..ids.len().min(64) {
        let id = ids[(rng.next() % ids.len() as u64) as usize];
        match store.lookup_message_id(id) {
            Ok(Some(m)) if Some((m.queue_id, m.queue_offset)) == acked.get(id).copied() => {}
            Ok(Some(m)) => v.push(format!(
                "lookup_message_id({id}) found {}@{}",
                m.queue_id, m.queue_offset
            )),
            Ok(None) => v.push(format!("lookup_message_id({id}) found nothing")),
            Err(e) => v.push(format!("lookup_message_id({id}) failed: {e}")),
        }
    }
    CycleResult {
        found,
        violations: v,
    }
}

#[test]
fn sigkill_crash_cycles() {
    let cycles: u64 = std::env::var("SLUICE_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            t ^ ((std::process::id() as u64) << 32)
        });
    let (lo, hi): (u64, u64) = std::env::var("SLUICE_CRASH_DELAY_MS")
        .ok()
        .and_then(|r| {
            let (a, b) = r.split_once("..")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .filter(|(a, b)| a < b)
        .unwrap_or((50, 400));
    println!("crash test: {cycles} cycles, SLUICE_CRASH_SEED={seed}, delays {lo}..{hi} ms");
    let mut rng = XorShift(seed | 1);
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut acked: HashMap<String, (u32, u64)> = HashMap::new();
    let mut seen: HashMap<String, (u32, u64)> = HashMap::new();
    let mut dropped_per_cycle = Vec::new();
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env("SLUICE_CRASH_DIR", dir.path())
            .env("SLUICE_CRASH_CYCLE", cycle.to_string())
            .env_remove("SLUICE_CRASH_CYCLES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let mut stdout = child.stdout.take().expect("child stdout");
        let mut stderr = child.stderr.take().expect("child stderr");
        let out_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = stdout.read_to_end(&mut b);
            b
        });
        let err_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = stderr.read_to_end(&mut b);
            b
        });
        let delay = lo + rng.next() % (hi - lo + 1);
        std::thread::sleep(Duration::from_millis(delay));
        let early = child.try_wait().expect("try_wait");
        if early.is_none() {
            child.kill().expect("SIGKILL the child");
        }
        let status = child.wait().expect("wait for child");
        let out = out_reader.join().expect("stdout reader");
        let err = err_reader.join().expect("stderr reader");
        if let Some(s) = early {
            panic!(
                "cycle {cycle}: the child exited by itself with {s}\nstdout tail: {}\nstderr: {}",
                String::from_utf8_lossy(&out[out.len().saturating_sub(2000)..]),
                String::from_utf8_lossy(&err)
            );
        }
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "cycle {cycle}: child status {status}"
            );
        }
        let acks = parse_acks(&out);
        let new_acks = acks.len();
        for (id, q, off) in acks {
            if let Some(prev) = acked.insert(id.clone(), (q, off)) {
                panic!("cycle {cycle}: {id} acknowledged twice ({prev:?}, then {q}@{off})");
            }
        }

        let t = Instant::now();
        let store =
            Store::open(config(dir.path())).expect("parent opens the store after the crash");
        let opened_in = t.elapsed();
        let r = store.recovery_report().clone();
        let res = verify(&store, &acked, &seen, &mut rng);
        println!(
            "cycle {cycle:>2}: killed after {delay:>3} ms, +{new_acks} acks ({} total), {} stored; \
             recovery: dropped_bytes={} valid_end={} replayed_from={} records_replayed={} \
             full_rebuild={} clean_shutdown={} truncated_at={:?} open={:?}",
            acked.len(),
            res.found.len(),
            r.dropped_bytes,
            r.valid_end,
            r.replayed_from,
            r.records_replayed,
            r.full_rebuild,
            r.clean_shutdown,
            r.truncated_at,
            opened_in,
        );
        dropped_per_cycle.push(r.dropped_bytes);
        if !res.violations.is_empty() {
            panic!(
                "cycle {cycle}: {} violations (data dir kept at {}):\n{}\nchild stderr: {}",
                res.violations.len(),
                dir.keep().display(),
                res.violations.join("\n"),
                String::from_utf8_lossy(&err)
            );
        }
        seen = res.found;
        store.close();
        drop(store);
    }
    let found_acked = acked.keys().filter(|id| seen.contains_key(*id)).count();
    println!(
        "crash summary: cycles={cycles} acked={} found={} (of them acked: {found_acked}) lost={} \
         dropped_bytes_per_cycle={dropped_per_cycle:?} seed={seed} took={:?}",
        acked.len(),
        seen.len(),
        acked.len() - found_acked,
        started.elapsed()
    );
    assert_eq!(found_acked, acked.len(), "lost acknowledged messages");
}
