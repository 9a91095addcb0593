//! Delay messages: a timer wheel persisted next to the commit log.
//!
//! A delay message is a message with an absolute delivery time `T` (ms since the epoch,
//! any millisecond, up to `BrokerConfig::max_delay` ahead). It becomes visible to consumers
//! of its topic once the broker clock reaches `T`, never earlier.
//!
//! # Flow
//!
//! ```text
//!  send(T > now) ─► %TIMER% queue 0 in the commit log ─► ack + recall handle
//!                   (same group commit and crash recovery as every message)
//!                          │ dispatch: the timer task reads %TIMER% from its checkpoint
//!                          ▼
//!      fire_at ≥ cascaded ? coarse bucket file (1 h) : fine bucket file (1 min)
//!                          │ cascade: one hour before a coarse bucket starts, its entries
//!                          ▼          are copied into fine buckets
//!      fine buckets starting within the next 5 s are loaded into a min-heap
//!                          │ pop every entry with fire_at ≤ now
//!                          ▼
//!      append to the real topic and queue: same message id, properties, TIMER_DELIVER_MS
//! ```
//!
//! `send` with `T ≤ now` (or a delay topic message without a time) skips all of this and is
//! stored in its topic at once, keeping `TIMER_DELIVER_MS`: RocketMQ delivers a delay
//! message whose time has passed immediately.
//!
//! The send receipt of a waiting message reports its real queue, its `%TIMER%` queue offset
//! and a recall handle ([`RecallHandle`]).
//!
//! Memory per pending timer is zero outside the loaded window: far timers exist only as
//! records in the commit log and 32-byte entries in bucket files. The heap holds the
//! timers of the current fine bucket and, from 5 s before it starts, the next one.
//!
//! # Files in `<data>/timer/`
//!
//! `fine-<start ms>.bkt` (bucket `[start, start + 60 s)`) and `coarse-<start ms>.bkt`
//! (bucket `[start, start + 1 h)`), start zero-padded to 15 digits, are append-only arrays
//! of 32-byte entries, little-endian:
//!
//! ```text
//!  offset  size  field
//!       0     8  fire_at      ms since the epoch when the entry is processed
//!       8     8  log_offset   queue offset of the record in %TIMER% queue 0
//!      16     8  clog_offset  commit-log position of that record
//!      24     1  kind         1 deliver, 2 roll, 3 recall
//!      25     3  zero
//!      28     4  crc32c       of bytes [0, 28)
//! ```
//!
//! `checkpoint` (52 bytes, replaced atomically: temporary file, fsync, rename, directory
//! fsync):
//!
//! ```text
//!       0     4  magic        "STM2" (0x5354_4D32)
//!       4     4  fine_ms      bucket widths the files were written with
//!       8     4  coarse_ms
//!      12     4  zero
//!      16     8  dispatched   next %TIMER% queue offset to dispatch
//!      24     8  read_time    every entry firing before this was processed
//!      32     8  cascaded     coarse buckets starting before this were cascaded
//!      40     8  pending      deliver and roll entries dispatched below `dispatched`
//!                             and not processed before `read_time`
//!      48     4  crc32c       of bytes [0, 48)
//! ```
//!
//! The 44-byte "STM1" checkpoint of earlier versions (no `pending`) is still read; the
//! pending count then starts at zero.
//!
//! # Pending count
//!
//! `Timer::pending` (the `sluice_timer_pending` metric) counts the deliver and roll entries
//! not processed yet: +1 when a record is dispatched, −1 when its entry is processed
//! (delivered, rolled forward, or dropped because it was recalled: a recalled message
//! counts until its entry, or a roll entry before it, is processed). A roll is −1 then +1
//! for the copy; recall records are never counted. The checkpoint stores the
//! count that matches its `dispatched` and `read_time`, so the replay after a crash
//! (dispatching after `dispatched`, processing from `read_time`) brings it back to the
//! same value: entries processed at exactly `read_time` before the checkpoint are added
//! back, as the replay processes them again.
//!
//! # Records in `%TIMER%`
//!
//! A pending message is the original record with its topic replaced by `%TIMER%`, queue 0,
//! and two properties added: `REAL_TOPIC` and `REAL_QID`. A recall is a record with flag
//! bit 8 set ([`FLAG_RECALL`]), properties `REAL_TOPIC` and `TIMER_DELIVER_MS`, and the
//! message id as body. Users cannot set these properties (reserved) nor write to `%` topics.
//!
//! # Entry kinds
//!
//! - *deliver* (`fire_at = T`): append the message to its real topic.
//! - *roll* (`fire_at = store_ts + roll_window`, when `T` lies beyond that): append the
//!   record to `%TIMER%` again, where it is dispatched anew. Rolling keeps every pending
//!   record younger than the roll window (half the store's retention at most), so retention
//!   never deletes a timer that is still waiting, and it bounds the bucket files to
//!   roll window / bucket width.
//! - *recall* (`fire_at = T`): the recall of the message `(topic, id, T)`. When the fine
//!   bucket is loaded (before anything in it fires), recall entries become keys of the
//!   in-memory cancel set; deliver (and roll) entries whose key is in it are dropped.
//!
//! # Invariants
//!
//! 1. `fire_at` is a function of the record alone (`T`, `store_ts`, roll window, kind),
//!    so dispatching a record twice writes the same entry into the same bucket. Equal
//!    entries pop from the heap one after the other; the second is dropped.
//! 2. Every %TIMER% record below `checkpoint.dispatched` has its entry in a bucket file
//!    that was fsynced before the checkpoint was written.
//! 3. Every entry firing before `checkpoint.read_time` was processed durably: its
//!    delivery or roll copy is stored, or its key was cancelled by a durable recall.
//! 4. Entries firing at or after `cascaded` live in coarse buckets, earlier ones in fine
//!    buckets; coarse buckets below `checkpoint.cascaded` were copied into fine buckets
//!    that were fsynced first.
//! 5. A deliver entry fires at `T` and is popped only when the broker clock is at or past
//!    `fire_at`, so no message is delivered early. Roll entries fire before `T` but only
//!    copy the record within `%TIMER%`.
//!
//! # Procedures
//!
//! - *Write*: the send path appends to `%TIMER%` (durable per the flush policy) and
//!   answers. The timer task dispatches new records: computes the entry, appends it to its
//!   bucket file (buffered; written after each read batch) and, if its bucket is loaded
//!   or its time already passed, pushes it into the heap.
//! - *Deliver*: the timer task runs every `tick` (100 ms), earlier when the heap's first
//!   entry is due sooner or a send brings a timer due before its next run. Each run pops
//!   the entries with `fire_at ≤ now` in batches of at most 1024 records / 4 MiB, one
//!   append per batch; copies rolled forward in a run are dispatched, and delivered if
//!   due, in the same run.
//! - *Checkpoint* (every `checkpoint_interval` when something changed, and on shutdown):
//!   fsync every bucket file written since the last one (and the directory if files were
//!   created), then write the checkpoint, then delete fine buckets ending at or before
//!   `read_time` and coarse buckets below `cascaded`.
//! - *Recover* (open): read the checkpoint; cut bucket files to whole entries (a torn
//!   tail is rewritten by the replay); delete buckets the checkpoint says are finished;
//!   clamp `dispatched` into the queue's range (an async-flush crash can shorten the log).
//!   The first run dispatches everything after `dispatched` before delivering anything,
//!   so duplicates written before the crash meet their copies in the heap.
//! - *Recall*: under the lock, refuse if `T` was already taken for delivery, else insert
//!   the key as pending and pin the wheel below `T`; append the recall record; on success
//!   mark the key durable, on failure drop it; unpin. A recall answered OK is therefore
//!   never followed by a delivery.
//!
//! # Guarantees
//!
//! Nothing is lost once the send was acknowledged (in `FlushPolicy::Sync`; in `Async` the
//! store's own window applies). Each message is delivered once across clean shutdowns. A
//! crash between the append of a delivery (or roll) and the next checkpoint (at most
//! `checkpoint_interval`, 1 s by default) leaves that entry to be processed again after
//! restart; entries already due at start-up are therefore first looked up in the
//! message-id index, and skipped if their delivered copy (or later roll copy) is found.
//! The contract is at-least-once: a repeat remains possible if the index misses (hash
//! index candidates are bounded) or a client reused the message id. A recall survives
//! restarts. Age-based retention never deletes a waiting record, as the roll window is at
//! most half the retention; a `disk_budget` that forces young segments out can lose
//! pending timers (logged as a warning when their entry fires). Timers of a deleted topic
//! are still appended to its name when due (invisible unless it is created again).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use sluice_common::Clock;
use sluice_store::{AppendMessage, AppendResult, ReadStatus, Store, StoreError, StoredMessage};
use tokio::sync::Notify;

use crate::broker::keys;
use crate::error::BrokerError;
use crate::messaging::Message;
use crate::meta::{MessageType, write_atomic};

/// Internal topic of pending delay messages and recalls.
pub const TIMER_TOPIC: &str = "%TIMER%";
const PROP_REAL_TOPIC: &str = "REAL_TOPIC";
const PROP_REAL_QID: &str = "REAL_QID";
/// Record flag of a recall record in `%TIMER%`.
pub const FLAG_RECALL: u32 = 1 << 8;

/// Width of a fine bucket.
pub const FINE_MS: i64 = 60_000;
/// Width of a coarse bucket.
pub const COARSE_MS: i64 = 3_600_000;
/// A coarse bucket is cascaded into fine buckets this long before it starts.
const CASCADE_AHEAD_MS: i64 = COARSE_MS;
/// A fine bucket is loaded into memory this long before it starts.
const LOAD_AHEAD_MS: i64 = 5_000;
const ENTRY_LEN: usize = 32;
const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_LEN: usize = 52;
const CHECKPOINT_MAGIC: u32 = 0x5354_4D32;
const CHECKPOINT_V1_LEN: usize = 44;
const CHECKPOINT_V1_MAGIC: u32 = 0x5354_4D31;
/// Records dispatched per run once the start-up replay is done, so that a flood of new
/// timers cannot delay due deliveries for long.
const DISPATCH_PER_RUN: u64 = 100_000;
const DELIVERY_BATCH: usize = 1024;
const DELIVERY_BATCH_BYTES: usize = 4 << 20;

/// Settings of the timer task.
#[derive(Debug, Clone)]
pub struct TimerConfig {
    /// Longest sleep of the timer task between runs (it wakes earlier for due timers).
    pub tick: Duration,
    /// Pending records older than this are copied forward in the log (capped at half the
    /// store's retention).
    pub roll_window: Duration,
    /// How often progress is checkpointed. After a crash the entries of this window are
    /// processed again, each first looked up in the message-id index (see the module
    /// documentation, *Guarantees*).
    pub checkpoint_interval: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            tick: Duration::from_millis(100),
            roll_window: Duration::from_secs(24 * 3600),
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// What one run of the timer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerReport {
    /// `%TIMER%` records indexed.
    pub dispatched: u64,
    /// Messages appended to their real topics.
    pub delivered: u64,
    /// Records copied forward within `%TIMER%`.
    pub rolled: u64,
    /// Entries dropped because their message was recalled.
    pub recalled: u64,
    /// Timers held in memory (the loaded window).
    pub in_memory: usize,
    /// Earliest fire time in memory.
    pub next_fire_ms: Option<i64>,
    /// Whether every `%TIMER%` record stored so far was dispatched.
    pub caught_up: bool,
}

/// Checks the delivery time of a delay message (`None`: deliver now).
pub fn check_delivery_time(
    at: Option<i64>,
    now: i64,
    max_delay: Duration,
) -> Result<(), BrokerError> {
    let Some(at) = at else {
        return Ok(());
    };
    if at < 0 {
        return Err(BrokerError::IllegalDeliveryTime(format!(
            "{at} is before 1970"
        )));
    }
    let max = now.saturating_add(i64::try_from(max_delay.as_millis()).unwrap_or(i64::MAX));
    if at > max {
        return Err(BrokerError::IllegalDeliveryTime(format!(
            "{at} is more than {max_delay:?} ahead of {now}"
        )));
    }
    Ok(())
}

/// The queue a send receipt reports for an append, and whether it waits in the timer.
pub fn receipt_queue(a: &AppendMessage) -> (u32, bool) {
    if a.topic == TIMER_TOPIC {
        let q = a
            .property(PROP_REAL_QID)
            .and_then(|q| q.parse().ok())
            .unwrap_or(0);
        (q, true)
    } else {
        (a.queue_id, false)
    }
}

fn floor(t: i64, width: i64) -> i64 {
    t.div_euclid(width) * width
}

fn io_err(op: &str, path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::Internal(format!("timer: {op} {}: {e}", path.display()))
}

fn deliver_at(m: &StoredMessage) -> Option<i64> {
    m.property(keys::DELIVER_AT)?.parse().ok()
}

// ------------------------------------------------------------------ recall handle

/// Names one pending delay message. Carries the `%TIMER%` queue offset rather than a
/// commit-log position, so an untrusted handle only ever drives a consume-queue read.
///
/// ```text
/// 1~<T ms>~<%TIMER% queue offset>~<topic>~<message id>~<crc32c, 8 hex>
/// ```
///
/// `~` cannot occur in topic names; the message id is the last field, so it may contain
/// one. The CRC covers everything before it and rejects garbage and typos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallHandle {
    pub deliver_at: i64,
    pub log_offset: u64,
    pub topic: String,
    pub message_id: String,
}

impl RecallHandle {
    pub fn encode(&self) -> String {
        let body = format!(
            "1~{}~{}~{}~{}",
            self.deliver_at, self.log_offset, self.topic, self.message_id
        );
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body}~{crc:08x}")
    }

    pub fn decode(s: &str) -> Result<RecallHandle, BrokerError> {
        let bad = |why: &str| BrokerError::BadRequest(format!("invalid recall handle ({why})"));
        if s.len() > 512 {
            return Err(bad("too long"));
        }
        let (body, crc) = s.rsplit_once('~').ok_or_else(|| bad("malformed"))?;
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("malformed checksum"))?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err(bad("checksum mismatch"));
        }
        let parts: Vec<&str> = body.splitn(5, '~').collect();
        if parts.len() != 5 || parts[0] != "1" {
            return Err(bad("unknown format"));
        }
        Ok(RecallHandle {
            deliver_at: parts[1].parse().map_err(|_| bad("time"))?,
            log_offset: parts[2].parse().map_err(|_| bad("offset"))?,
            topic: parts[3].to_owned(),
            message_id: parts[4].to_owned(),
        })
    }
}

// ------------------------------------------------------------------ entries

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
enum Kind {
    Deliver = 1,
    Roll = 2,
    Recall = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Deliver),
            2 => Some(Kind::Roll),
            3 => Some(Kind::Recall),
            _ => None,
        }
    }
}

/// One bucket entry. Ordered by fire time first (the heap's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    fire_at: i64,
    log_offset: u64,
    clog_offset: u64,
    kind: Kind,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.fire_at.to_le_bytes());
        out.extend_from_slice(&self.log_offset.to_le_bytes());
        out.extend_from_slice(&self.clog_offset.to_le_bytes());
        out.extend_from_slice(&[self.kind as u8, 0, 0, 0]);
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() != ENTRY_LEN {
            return None;
        }
        let u64_at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        let crc = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crc32c::crc32c(&b[..28]) != crc {
            return None;
        }
        Some(Entry {
            fire_at: u64_at(0)? as i64,
            log_offset: u64_at(8)?,
            clog_offset: u64_at(16)?,
            kind: Kind::from_u8(b[24])?,
        })
    }
}

// ------------------------------------------------------------------ checkpoint

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpoint {
    dispatched: u64,
    read_time: i64,
    cascaded: i64,
    pending: u64,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CHECKPOINT_LEN);
        b.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        b.extend_from_slice(&(FINE_MS as u32).to_le_bytes());
        b.extend_from_slice(&(COARSE_MS as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.dispatched.to_le_bytes());
        b.extend_from_slice(&self.read_time.to_le_bytes());
        b.extend_from_slice(&self.cascaded.to_le_bytes());
        b.extend_from_slice(&self.pending.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Checkpoint, String> {
        let (magic, body) = match b.len() {
            CHECKPOINT_LEN => (CHECKPOINT_MAGIC, CHECKPOINT_LEN - 4),
            CHECKPOINT_V1_LEN => (CHECKPOINT_V1_MAGIC, CHECKPOINT_V1_LEN - 4),
            n => return Err(format!("{n} bytes, expected {CHECKPOINT_LEN}")),
        };
        let u32_at = |i: usize| {
            b[i..i + 4]
                .try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| "short".to_owned())
        };
        let u64_at = |i: usize| {
            b[i..i + 8]
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "short".to_owned())
        };
        if u32_at(0)? != magic {
            return Err("bad magic".into());
        }
        if crc32c::crc32c(&b[..body]) != u32_at(body)? {
            return Err("checksum mismatch".into());
        }
        if u32_at(4)? as i64 != FINE_MS || u32_at(8)? as i64 != COARSE_MS {
            return Err("written with other bucket widths".into());
        }
        Ok(Checkpoint {
            dispatched: u64_at(16)?,
            read_time: u64_at(24)? as i64,
            cascaded: u64_at(32)? as i64,
            pending: if magic == CHECKPOINT_MAGIC {
                u64_at(40)?
            } else {
                0
            },
        })
    }
}

// ------------------------------------------------------------------ bucket files

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Level {
    Fine,
    Coarse,
}

impl Level {
    fn prefix(self) -> &'static str {
        match self {
            Level::Fine => "fine-",
            Level::Coarse => "coarse-",
        }
    }
}

/// The bucket files of one directory: which exist, appends buffered until `flush`, files
/// written since the last `sync`.
struct BucketFiles {
    dir: PathBuf,
    fine: BTreeSet<i64>,
    coarse: BTreeSet<i64>,
    pending: HashMap<(Level, i64), Vec<u8>>,
    unsynced: HashMap<(Level, i64), File>,
    created: bool,
    /// Why writing stopped, after a failed write or fsync.
    fenced: Option<String>,
}

impl BucketFiles {
    /// Lists the bucket files, cutting each to whole entries, and deletes leftovers.
    fn scan(dir: &Path) -> Result<BucketFiles, BrokerError> {
        let mut files = BucketFiles {
            dir: dir.to_owned(),
            fine: BTreeSet::new(),
            coarse: BTreeSet::new(),
            pending: HashMap::new(),
            unsynced: HashMap::new(),
            created: false,
            fenced: None,
        };
        let rd = std::fs::read_dir(dir).map_err(|e| io_err("listing", dir, e))?;
        for de in rd {
            let de = de.map_err(|e| io_err("listing", dir, e))?;
            let name = de.file_name().to_string_lossy().into_owned();
            let path = de.path();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(|e| io_err("removing", &path, e))?;
                continue;
            }
            let Some(stem) = name.strip_suffix(".bkt") else {
                continue;
            };
            let (level, start) = if let Some(s) = stem.strip_prefix(Level::Fine.prefix()) {
                (Level::Fine, s)
            } else if let Some(s) = stem.strip_prefix(Level::Coarse.prefix()) {
                (Level::Coarse, s)
            } else {
                continue;
            };
            let Ok(start) = start.parse::<i64>() else {
                tracing::warn!(file = %path.display(), "ignoring a file with an unexpected name");
                continue;
            };
            let len = de.metadata().map_err(|e| io_err("stat", &path, e))?.len();
            if len % ENTRY_LEN as u64 != 0 {
                // A torn append after the last checkpoint: its entries are dispatched again.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err("opening", &path, e))?;
                f.set_len(len - len % ENTRY_LEN as u64)
                    .map_err(|e| io_err("truncating", &path, e))?;
                // The cut must be on disk before new entries are appended behind it.
                f.sync_all().map_err(|e| io_err("syncing", &path, e))?;
                tracing::warn!(file = %path.display(), "cut a torn timer bucket tail");
            }
            match level {
                Level::Fine => files.fine.insert(start),
                Level::Coarse => files.coarse.insert(start),
            };
        }
        Ok(files)
    }

    fn path(&self, level: Level, start: i64) -> PathBuf {
        self.dir.join(format!("{}{start:015}.bkt", level.prefix()))
    }

    fn set(&mut self, level: Level) -> &mut BTreeSet<i64> {
        match level {
            Level::Fine => &mut self.fine,
            Level::Coarse => &mut self.coarse,
        }
    }

    fn add(&mut self, level: Level, start: i64, e: &Entry) {
        self.set(level).insert(start);
        e.encode(self.pending.entry((level, start)).or_default());
    }

    fn check_fence(&self) -> Result<(), BrokerError> {
        match &self.fenced {
            Some(why) => Err(BrokerError::Internal(format!(
                "the timer stopped after a failed write ({why}); restart the broker to recover"
            ))),
            None => Ok(()),
        }
    }

    /// Writes the buffered entries (to the page cache; `sync` makes them durable). After a
    /// failure the files are fenced: `dispatched` has moved past entries that may not be
    /// written, so no checkpoint may be taken until a restart replays them.
    fn flush(&mut self) -> Result<(), BrokerError> {
        self.check_fence()?;
        let r = self.write_pending();
        if let Err(e) = &r {
            self.fenced = Some(e.to_string());
        }
        r
    }

    fn write_pending(&mut self) -> Result<(), BrokerError> {
        for ((level, start), bytes) in std::mem::take(&mut self.pending) {
            let path = self.path(level, start);
            let f = match self.unsynced.entry((level, start)) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    self.created |= !path.exists();
                    let f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| io_err("opening", &path, e))?;
                    v.insert(f)
                }
            };
            f.write_all(&bytes)
                .map_err(|e| io_err("appending to", &path, e))?;
        }
        Ok(())
    }

    /// Makes every entry written so far durable. A failed fsync fences the files (the
    /// kernel may have dropped the unwritten pages; only a replay is trustworthy).
    fn sync(&mut self) -> Result<(), BrokerError> {
        self.flush()?;
        let r = self.sync_unsynced();
        if let Err(e) = &r {
            self.fenced = Some(e.to_string());
        }
        r
    }

    fn sync_unsynced(&mut self) -> Result<(), BrokerError> {
        let files: Vec<((Level, i64), File)> = self.unsynced.drain().collect();
        for ((level, start), f) in files {
            // The checkpoint written next claims these entries are on disk.
            f.sync_data()
                .map_err(|e| io_err("syncing", &self.path(level, start), e))?;
        }
        if std::mem::take(&mut self.created) {
            // New bucket files must survive a crash together with their contents.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("syncing", &self.dir, e))?;
        }
        Ok(())
    }

    /// Reads a bucket (call `flush` first). Entries failing their CRC are skipped: they
    /// can only come from a torn write after the last checkpoint, which the replay redoes.
    fn read(&self, level: Level, start: i64) -> Result<Vec<Entry>, BrokerError> {
        let path = self.path(level, start);
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err("reading", &path, e)),
        };
        let mut out = Vec::with_capacity(b.len() / ENTRY_LEN);
        let mut bad = 0u64;
        for chunk in b.chunks_exact(ENTRY_LEN) {
            match Entry::decode(chunk) {
                Some(e) => out.push(e),
                None => bad += 1,
            }
        }
        if bad > 0 {
            tracing::warn!(file = %path.display(), entries = bad, "skipped damaged timer entries");
        }
        Ok(out)
    }

    fn remove(&mut self, level: Level, start: i64) -> Result<(), BrokerError> {
        self.set(level).remove(&start);
        self.pending.remove(&(level, start));
        self.unsynced.remove(&(level, start));
        let path = self.path(level, start);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path, e)),
        }
    }

    /// Deletes finished buckets: fine ones ending at or before `read_time`, coarse ones
    /// starting before `cascaded`. A deletion lost in a crash is redone at the next open.
    fn remove_finished(&mut self, read_time: i64, cascaded: i64) -> Result<(), BrokerError> {
        let fine: Vec<i64> = self
            .fine
            .range(..=read_time.saturating_sub(FINE_MS))
            .copied()
            .collect();
        for s in fine {
            self.remove(Level::Fine, s)?;
        }
        let coarse: Vec<i64> = self.coarse.range(..cascaded).copied().collect();
        for s in coarse {
            self.remove(Level::Coarse, s)?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ the timer

/// Identity of a delay message for recalls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TimerKey {
    topic: String,
    message_id: String,
    deliver_at: i64,
}

#[derive(Debug, Default)]
struct Cancel {
    /// A recall record is stored.
    durable: bool,
    /// Recalls being appended right now.
    pending: u32,
    /// `%TIMER%` offset of the stored recall record.
    log_offset: Option<u64>,
}

/// State shared between the timer task and recalls.
struct Shared {
    /// Entries firing before this were taken for processing.
    taken: i64,
    cancelled: HashMap<TimerKey, Cancel>,
    /// Delivery times of recalls in progress: the wheel does not pass them until done.
    pinned: BTreeMap<i64, u32>,
}

/// State of the timer task.
struct Worker {
    dispatched: u64,
    cascaded: i64,
    /// Fine buckets starting before this are loaded into `heap`.
    loaded: i64,
    heap: BinaryHeap<Reverse<Entry>>,
    last_popped: Option<(i64, u64)>,
    /// `fire_at` of the last processed entry, and how many were processed at that time.
    last_processed_fire: Option<i64>,
    processed_at_last: u64,
    /// Deliver and roll entries not processed yet (see *Pending count*).
    pending: u64,
    files: BucketFiles,
    last_checkpoint: Instant,
    dirty: bool,
    /// The start-up replay is done.
    replayed: bool,
}

/// The timer wheel of delay messages. See the module documentation.
pub struct Timer {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    cfg: TimerConfig,
    roll_ms: i64,
    dir: PathBuf,
    shared: Mutex<Shared>,
    worker: Mutex<Worker>,
    wake: Notify,
    /// When the timer task will run next on its own (ms).
    next_wake: AtomicI64,
    /// Broker time at open: entries due before it may have been processed just before a
    /// crash, so they are checked against the message-id index first.
    opened_at: i64,
    /// Copy of `Worker::pending` readable without the worker lock (metrics).
    pending: AtomicU64,
}

impl Timer {
    /// Opens the timer state in `dir` (created if missing) and recovers it.
    pub fn open(
        dir: PathBuf,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        cfg: TimerConfig,
    ) -> Result<Timer, BrokerError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let now = clock.now_ms();
        let ck_path = dir.join(CHECKPOINT_FILE);
        let ck = match std::fs::read(&ck_path) {
            Ok(b) => Some(Checkpoint::decode(&b).map_err(|why| {
                BrokerError::Internal(format!("{} is damaged: {why}", ck_path.display()))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &ck_path, e)),
        };
        let mut files = BucketFiles::scan(&dir)?;
        let (min, max) = store.queue_offsets(TIMER_TOPIC, 0);
        let fresh_cascaded = floor(now.saturating_add(CASCADE_AHEAD_MS), COARSE_MS) + COARSE_MS;
        let ck = ck.unwrap_or_else(|| Checkpoint {
            dispatched: min,
            read_time: 0,
            pending: 0,
            // Without a checkpoint, cascade whatever coarse buckets exist.
            cascaded: files
                .coarse
                .first()
                .copied()
                .unwrap_or(fresh_cascaded)
                .min(fresh_cascaded),
        });
        files.remove_finished(ck.read_time, ck.cascaded)?;
        let mut dispatched = ck.dispatched;
        if dispatched > max {
            tracing::warn!(
                checkpoint = dispatched,
                log_end = max,
                "the timer log is shorter than the checkpoint says (lost in a crash); dispatching from its end"
            );
            dispatched = max;
        }
        dispatched = dispatched.max(min);
        let retention_half = store
            .config()
            .retention
            .map(|r| r / 2)
            .unwrap_or(Duration::MAX);
        let roll = cfg
            .roll_window
            .min(retention_half)
            .max(Duration::from_secs(60));
        let roll_ms = i64::try_from(roll.as_millis()).unwrap_or(i64::MAX);
        tracing::info!(
            dispatched,
            read_time = ck.read_time,
            fine_buckets = files.fine.len(),
            coarse_buckets = files.coarse.len(),
            roll_ms,
            "timer state opened"
        );
        Ok(Timer {
            store,
            clock,
            roll_ms,
            dir,
            shared: Mutex::new(Shared {
                taken: ck.read_time,
                cancelled: HashMap::new(),
                pinned: BTreeMap::new(),
            }),
            worker: Mutex::new(Worker {
                dispatched,
                cascaded: ck.cascaded,
                loaded: floor(ck.read_time, FINE_MS),
                heap: BinaryHeap::new(),
                last_popped: None,
                last_processed_fire: None,
                processed_at_last: 0,
                pending: ck.pending,
                files,
                last_checkpoint: Instant::now(),
                dirty: false,
                replayed: false,
            }),
            cfg,
            wake: Notify::new(),
            next_wake: AtomicI64::new(i64::MIN),
            opened_at: now,
            pending: AtomicU64::new(ck.pending),
        })
    }

    /// Delay messages waiting for their time (see *Pending count* in the module docs).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &TimerConfig {
        &self.cfg
    }

    /// Redirects a delay message whose time has not come to `%TIMER%`; every other
    /// append passes unchanged.
    pub fn route(&self, mut a: AppendMessage) -> AppendMessage {
        if MessageType::from_flag(a.flags) != MessageType::Delay || a.topic.starts_with('%') {
            return a;
        }
        let Some(at) = a
            .property(keys::DELIVER_AT)
            .and_then(|v| v.parse::<i64>().ok())
        else {
            return a;
        };
        if at <= self.clock.now_ms() {
            return a;
        }
        let topic = std::mem::replace(&mut a.topic, TIMER_TOPIC.to_owned());
        a.properties.push((PROP_REAL_TOPIC.to_owned(), topic));
        a.properties
            .push((PROP_REAL_QID.to_owned(), a.queue_id.to_string()));
        a.queue_id = 0;
        a
    }

    /// Called once a routed message is stored: wakes the timer task if the message is due
    /// before its next run, and returns the recall handle (empty unless `timed`).
    pub fn accepted(&self, timed: bool, m: &Message, r: &AppendResult) -> String {
        let Some(at) = m.delivery_timestamp_ms.filter(|_| timed) else {
            return String::new();
        };
        if at < self.next_wake.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
        RecallHandle {
            deliver_at: at,
            log_offset: r.queue_offset,
            topic: m.topic.clone(),
            message_id: m.message_id.clone(),
        }
        .encode()
    }

    /// Cancels a pending delay message. Returns its message id.
    pub async fn recall(&self, topic: &str, handle: &str) -> Result<String, BrokerError> {
        let h = RecallHandle::decode(handle)?;
        if h.topic != topic {
            return Err(BrokerError::BadRequest(format!(
                "the recall handle is for topic {}, not {topic}",
                h.topic
            )));
        }
        self.check_pending(&h)?;
        let key = TimerKey {
            topic: h.topic.clone(),
            message_id: h.message_id.clone(),
            deliver_at: h.deliver_at,
        };
        {
            let mut g = self.shared.lock();
            let s = &mut *g;
            if s.cancelled.get(&key).is_some_and(|c| c.durable) {
                return Ok(h.message_id);
            }
            if h.deliver_at < s.taken {
                return Err(BrokerError::NoPendingMessage(format!(
                    "message {} is due and was delivered (or recalled)",
                    h.message_id
                )));
            }
            let c = s.cancelled.entry(key.clone()).or_default();
            c.pending += 1;
            *s.pinned.entry(h.deliver_at).or_default() += 1;
        }
        // From here on the wheel stays below T until the guard resolves the recall.
        let mut guard = RecallGuard {
            timer: self,
            key,
            stored: None,
        };
        let rec = AppendMessage {
            topic: TIMER_TOPIC.to_owned(),
            queue_id: 0,
            flags: MessageType::Delay.flag() | FLAG_RECALL,
            born_ts: self.clock.now_ms(),
            properties: vec![
                (PROP_REAL_TOPIC.to_owned(), h.topic.clone()),
                (keys::DELIVER_AT.to_owned(), h.deliver_at.to_string()),
            ],
            body: Bytes::from(h.message_id.clone()),
        };
        let stored = self.store.append(vec![rec]).await?;
        guard.stored = stored.first().map(|r| r.queue_offset);
        drop(guard);
        self.wake.notify_one();
        Ok(h.message_id)
    }

    /// Whether the handle names a message still waiting in `%TIMER%`.
    fn check_pending(&self, h: &RecallHandle) -> Result<(), BrokerError> {
        let is_it = |m: &StoredMessage| {
            m.topic == TIMER_TOPIC
                && m.flags & FLAG_RECALL == 0
                && m.msg_id() == Some(h.message_id.as_str())
                && m.property(PROP_REAL_TOPIC) == Some(h.topic.as_str())
                && deliver_at(m) == Some(h.deliver_at)
        };
        // The newest record with the id is its delivered copy (too late), a copy rolled
        // forward, or the original.
        if let Some(m) = self.store.lookup_message_id(&h.message_id)? {
            if m.topic == h.topic && deliver_at(&m) == Some(h.deliver_at) {
                return Err(BrokerError::NoPendingMessage(format!(
                    "message {} was already delivered",
                    h.message_id
                )));
            }
            if is_it(&m) {
                return Ok(());
            }
        }
        let b = self
            .store
            .read(TIMER_TOPIC, 0, h.log_offset, 1, u64::MAX, |_| true)?;
        if b.messages
            .first()
            .is_some_and(|m| m.queue_offset == h.log_offset && is_it(m))
        {
            return Ok(());
        }
        Err(BrokerError::NoPendingMessage(format!(
            "no pending delay message {} in topic {}",
            h.message_id, h.topic
        )))
    }

    /// Whether an entry that was overdue at start-up was processed before a crash that
    /// came before the checkpoint: the newest record with its message id is then its
    /// delivered copy (or a later roll copy).
    fn done_before_restart(&self, m: &StoredMessage, kind: Kind, at: i64) -> bool {
        let Some(id) = m.msg_id() else {
            return false;
        };
        let Ok(Some(n)) = self.store.lookup_message_id(id) else {
            return false;
        };
        if deliver_at(&n) != Some(at) || n.physical_offset <= m.physical_offset {
            return false;
        }
        let delivered = m.property(PROP_REAL_TOPIC) == Some(n.topic.as_str());
        match kind {
            Kind::Deliver => delivered,
            // A later copy in the timer log, or already the delivered one.
            Kind::Roll => delivered || n.topic == TIMER_TOPIC,
            Kind::Recall => false,
        }
    }

    /// One run: dispatch new records, cascade and load buckets, deliver what is due, and
    /// checkpoint when the interval has passed (or `force_checkpoint`). Blocking.
    pub fn run_once(&self, force_checkpoint: bool) -> Result<TimerReport, BrokerError> {
        let mut g = self.worker.lock();
        let w = &mut *g;
        w.files.check_fence()?;
        let mut rep = TimerReport::default();
        let now = self.clock.now_ms();
        // The first run replays everything, so that entries written before a crash meet
        // their replayed copies in the heap before anything is delivered.
        let limit = if w.replayed {
            DISPATCH_PER_RUN
        } else {
            u64::MAX
        };
        rep.caught_up = self.dispatch(w, limit, &mut rep)?;
        w.replayed = true;
        self.cascade(w, now)?;
        self.load(w, now)?;
        loop {
            let rolled = rep.rolled;
            self.deliver(w, now, &mut rep)?;
            if rep.rolled == rolled {
                break;
            }
            // Copies rolled forward may be due already: index and deliver them now.
            self.dispatch(w, DISPATCH_PER_RUN, &mut rep)?;
        }
        if force_checkpoint
            || (w.dirty && w.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval)
        {
            self.checkpoint(w)?;
        }
        rep.in_memory = w.heap.len();
        rep.next_fire_ms = w.heap.peek().map(|Reverse(e)| e.fire_at);
        Ok(rep)
    }

    /// Runs the timer until `shutdown` turns true, then writes a final checkpoint.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let tick = self.cfg.tick.max(Duration::from_millis(1));
        let tick_ms = i64::try_from(tick.as_millis()).unwrap_or(100);
        loop {
            let t = self.clone();
            let sleep_ms = match tokio::task::spawn_blocking(move || t.run_once(false)).await {
                Ok(Ok(rep)) if !rep.caught_up => 0,
                Ok(Ok(rep)) => rep
                    .next_fire_ms
                    .map_or(tick_ms, |at| (at - self.clock.now_ms()).clamp(0, tick_ms)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "timer run failed; retrying in 1s");
                    1000
                }
                Err(e) => {
                    tracing::warn!(error = %e, "timer task panicked; retrying in 1s");
                    1000
                }
            };
            self.next_wake.store(
                self.clock.now_ms().saturating_add(sleep_ms),
                Ordering::Relaxed,
            );
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms as u64)) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        let t = self.clone();
        match tokio::task::spawn_blocking(move || t.checkpoint_now()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "final timer checkpoint failed"),
            Err(e) => tracing::warn!(error = %e, "final timer checkpoint panicked"),
        }
    }

    /// Writes a checkpoint now. Blocking.
    pub fn checkpoint_now(&self) -> Result<(), BrokerError> {
        let mut g = self.worker.lock();
        self.checkpoint(&mut g)
    }

    // ---------------------------------------------------------------- internals

    /// Indexes `%TIMER%` records from `dispatched`; returns whether it caught up.
    fn dispatch(
        &self,
        w: &mut Worker,
        limit: u64,
        rep: &mut TimerReport,
    ) -> Result<bool, BrokerError> {
        let taken = self.shared.lock().taken;
        let mut done = 0u64;
        let caught_up = loop {
            if done >= limit {
                break false;
            }
            let b = self
                .store
                .read(TIMER_TOPIC, 0, w.dispatched, 1024, 8 << 20, |_| true)?;
            match b.status {
                ReadStatus::Found => {}
                ReadStatus::OffsetTooSmall => {
                    tracing::warn!(
                        from = w.dispatched,
                        to = b.next_offset,
                        "timer records were deleted before they were dispatched"
                    );
                    w.dispatched = b.next_offset;
                    w.dirty = true;
                    continue;
                }
                ReadStatus::OffsetOverflow => {
                    w.dispatched = b.next_offset;
                    w.dirty = true;
                    break true;
                }
                ReadStatus::NoNewMessage | ReadStatus::NoSuchQueue => break true,
            }
            for m in &b.messages {
                self.dispatch_one(w, m, taken);
                done += 1;
            }
            w.files.flush()?;
            if b.next_offset <= w.dispatched {
                break true;
            }
            w.dispatched = b.next_offset;
            w.dirty = true;
        };
        w.files.flush()?;
        rep.dispatched += done;
        Ok(caught_up)
    }

    fn dispatch_one(&self, w: &mut Worker, m: &StoredMessage, taken: i64) {
        let Some(at) = deliver_at(m) else {
            tracing::warn!(
                offset = m.queue_offset,
                "timer record without a delivery time; skipped"
            );
            return;
        };
        let recall = m.flags & FLAG_RECALL != 0;
        let roll_at = m.store_ts.saturating_add(self.roll_ms);
        let (fire_at, kind) = if at > roll_at {
            (roll_at, Kind::Roll)
        } else if recall {
            (at, Kind::Recall)
        } else {
            (at, Kind::Deliver)
        };
        if !recall {
            // Recall records (even while they roll forward) are not pending messages.
            w.pending += 1;
            self.pending.store(w.pending, Ordering::Relaxed);
        }
        if kind == Kind::Recall {
            if let Some(k) = recall_key(m, at) {
                let mut s = self.shared.lock();
                let c = s.cancelled.entry(k).or_default();
                c.durable = true;
                c.log_offset = Some(m.queue_offset);
            }
        }
        let e = Entry {
            fire_at,
            log_offset: m.queue_offset,
            clog_offset: m.physical_offset,
            kind,
        };
        self.place(w, e, taken);
    }

    /// Files an entry into its bucket, and into the heap if that bucket is loaded.
    fn place(&self, w: &mut Worker, e: Entry, taken: i64) {
        if e.fire_at >= w.cascaded {
            w.files.add(Level::Coarse, floor(e.fire_at, COARSE_MS), &e);
            return;
        }
        let b = floor(e.fire_at, FINE_MS);
        w.files.add(Level::Fine, b, &e);
        if e.kind != Kind::Recall && (b < w.loaded || e.fire_at < taken) {
            w.heap.push(Reverse(e));
        }
    }

    /// Copies coarse buckets that start within the cascade horizon into fine buckets.
    fn cascade(&self, w: &mut Worker, now: i64) -> Result<(), BrokerError> {
        let horizon = now.saturating_add(CASCADE_AHEAD_MS);
        while w.cascaded <= horizon {
            match w.files.coarse.range(w.cascaded..).next().copied() {
                Some(start) if start <= horizon => {
                    w.files.flush()?;
                    let entries = w.files.read(Level::Coarse, start)?;
                    w.cascaded = start + COARSE_MS;
                    let taken = self.shared.lock().taken;
                    for e in entries {
                        self.place(w, e, taken);
                    }
                }
                _ => w.cascaded = floor(horizon, COARSE_MS) + COARSE_MS,
            }
            w.dirty = true;
        }
        w.files.flush()
    }

    /// Loads fine buckets that start within the load horizon into the heap.
    fn load(&self, w: &mut Worker, now: i64) -> Result<(), BrokerError> {
        let until = now.saturating_add(LOAD_AHEAD_MS);
        while w.loaded <= until {
            match w.files.fine.range(w.loaded..).next().copied() {
                Some(start) if start <= until => {
                    w.files.flush()?;
                    let entries = w.files.read(Level::Fine, start)?;
                    w.loaded = start + FINE_MS;
                    let taken = self.shared.lock().taken;
                    let mut keep = Vec::with_capacity(entries.len());
                    for e in entries {
                        if e.fire_at < taken {
                            // Processed before the last checkpoint (or a copy of an entry
                            // the replay put into the heap already).
                            continue;
                        }
                        if e.kind == Kind::Recall {
                            self.restore_recall(&e)?;
                        } else {
                            keep.push(Reverse(e));
                        }
                    }
                    w.heap.extend(keep);
                }
                _ => w.loaded = floor(until, FINE_MS) + FINE_MS,
            }
        }
        Ok(())
    }

    fn restore_recall(&self, e: &Entry) -> Result<(), BrokerError> {
        let Some(m) = self.read_entry(e)? else {
            return Ok(());
        };
        if let Some(k) = deliver_at(&m).and_then(|at| recall_key(&m, at)) {
            let mut s = self.shared.lock();
            let c = s.cancelled.entry(k).or_default();
            c.durable = true;
            c.log_offset = Some(e.log_offset);
        }
        Ok(())
    }

    /// Reads the record of an entry; `None` (logged) if it is gone or not the one.
    fn read_entry(&self, e: &Entry) -> Result<Option<StoredMessage>, BrokerError> {
        match self.store.read_at(e.clog_offset) {
            Ok(m) if m.topic == TIMER_TOPIC && m.queue_offset == e.log_offset => Ok(Some(m)),
            Ok(_) | Err(StoreError::OffsetGone(_)) | Err(StoreError::Corrupt { .. }) => {
                tracing::warn!(
                    log_offset = e.log_offset,
                    clog_offset = e.clog_offset,
                    "the record of a timer entry is gone (retention or a lost log tail); entry dropped"
                );
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Pops and processes every entry due at `now`, in batches of one append each.
    fn deliver(&self, w: &mut Worker, now: i64, rep: &mut TimerReport) -> Result<(), BrokerError> {
        loop {
            let limit = {
                let mut s = self.shared.lock();
                let lim = match s.pinned.keys().next() {
                    Some(&pin) => now.min(pin - 1),
                    None => now,
                };
                s.taken = s.taken.max(lim + 1);
                lim
            };
            let mut popped = Vec::new();
            let mut appends = Vec::new();
            let mut bytes = 0usize;
            let (mut delivered, mut rolled, mut recalled) = (0, 0, 0);
            // Entries of delay messages (not of recall records) processed in this batch.
            let mut counted = 0u64;
            while let Some(&Reverse(e)) = w.heap.peek() {
                if e.fire_at > limit
                    || appends.len() >= DELIVERY_BATCH
                    || bytes >= DELIVERY_BATCH_BYTES
                {
                    break;
                }
                w.heap.pop();
                if w.last_popped == Some((e.fire_at, e.log_offset)) {
                    continue; // a copy of the entry just processed (invariant 1)
                }
                w.last_popped = Some((e.fire_at, e.log_offset));
                popped.push(e);
                match self.prepare(&e).map(|(p, is_recall)| {
                    counted += u64::from(!is_recall);
                    p
                }) {
                    Ok(Prepared::Append(a, rolled_copy)) => {
                        bytes += a.encoded_len();
                        appends.push(a);
                        if rolled_copy {
                            rolled += 1;
                        } else {
                            delivered += 1;
                        }
                    }
                    Ok(Prepared::Recalled) => recalled += 1,
                    Ok(Prepared::Nothing) => {}
                    Err(err) => {
                        self.unpop(w, popped);
                        return Err(err);
                    }
                }
            }
            if popped.is_empty() {
                return Ok(());
            }
            if !appends.is_empty() {
                if let Err(err) = self.store.append_blocking(appends) {
                    self.unpop(w, popped);
                    return Err(err.into());
                }
            }
            rep.delivered += delivered;
            rep.rolled += rolled;
            rep.recalled += recalled;
            w.pending = w.pending.saturating_sub(counted);
            self.pending.store(w.pending, Ordering::Relaxed);
            for e in &popped {
                if w.last_processed_fire == Some(e.fire_at) {
                    w.processed_at_last += 1;
                } else {
                    w.last_processed_fire = Some(e.fire_at);
                    w.processed_at_last = 1;
                }
            }
            w.dirty = true;
        }
    }

    fn unpop(&self, w: &mut Worker, popped: Vec<Entry>) {
        w.heap.extend(popped.into_iter().map(Reverse));
        w.last_popped = None;
    }

    /// What processing an entry appends.
    fn prepare(&self, e: &Entry) -> Result<(Prepared, bool), BrokerError> {
        let mut is_recall = false;
        let p = self.prepare_entry(e, &mut is_recall)?;
        Ok((p, is_recall))
    }

    /// What processing an entry appends; sets `is_recall` for entries of recall records.
    fn prepare_entry(&self, e: &Entry, is_recall: &mut bool) -> Result<Prepared, BrokerError> {
        let Some(m) = self.read_entry(e)? else {
            return Ok(Prepared::Nothing);
        };
        let Some(at) = deliver_at(&m) else {
            return Ok(Prepared::Nothing);
        };
        let recall = m.flags & FLAG_RECALL != 0;
        *is_recall = recall;
        if e.fire_at <= self.opened_at && self.done_before_restart(&m, e.kind, at) {
            return Ok(Prepared::Nothing);
        }
        match e.kind {
            Kind::Recall => Ok(Prepared::Nothing),
            Kind::Roll => {
                if !recall && self.is_cancelled(&m, at) {
                    return Ok(Prepared::Recalled);
                }
                Ok(Prepared::Append(
                    AppendMessage {
                        topic: TIMER_TOPIC.to_owned(),
                        queue_id: 0,
                        flags: m.flags,
                        born_ts: m.born_ts,
                        properties: m.properties,
                        body: m.body,
                    },
                    true,
                ))
            }
            Kind::Deliver => {
                if at != e.fire_at || recall {
                    tracing::warn!(
                        log_offset = e.log_offset,
                        "timer entry does not match its record; dropped"
                    );
                    return Ok(Prepared::Nothing);
                }
                if self.is_cancelled(&m, at) {
                    return Ok(Prepared::Recalled);
                }
                let Some(topic) = m.property(PROP_REAL_TOPIC).map(str::to_owned) else {
                    tracing::warn!(
                        log_offset = e.log_offset,
                        "timer record without its topic; dropped"
                    );
                    return Ok(Prepared::Nothing);
                };
                let queue_id = m
                    .property(PROP_REAL_QID)
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(0);
                let properties = m
                    .properties
                    .into_iter()
                    .filter(|(k, _)| k != PROP_REAL_TOPIC && k != PROP_REAL_QID)
                    .collect();
                Ok(Prepared::Append(
                    AppendMessage {
                        topic,
                        queue_id,
                        flags: m.flags,
                        born_ts: m.born_ts,
                        properties,
                        body: m.body,
                    },
                    false,
                ))
            }
        }
    }

    fn is_cancelled(&self, m: &StoredMessage, at: i64) -> bool {
        let s = self.shared.lock();
        if s.cancelled.is_empty() {
            return false;
        }
        let key = TimerKey {
            topic: m.property(PROP_REAL_TOPIC).unwrap_or_default().to_owned(),
            message_id: m.msg_id().unwrap_or_default().to_owned(),
            deliver_at: at,
        };
        s.cancelled.get(&key).is_some_and(|c| c.durable)
    }

    fn checkpoint(&self, w: &mut Worker) -> Result<(), BrokerError> {
        w.files.sync()?;
        let taken = self.shared.lock().taken;
        let read_time = w
            .heap
            .peek()
            .map_or(taken, |Reverse(e)| e.fire_at.min(taken));
        // Entries processed at exactly `read_time` are processed again by a replay.
        let replayed = if w.last_processed_fire == Some(read_time) {
            w.processed_at_last
        } else {
            0
        };
        let ck = Checkpoint {
            dispatched: w.dispatched,
            read_time,
            cascaded: w.cascaded,
            pending: w.pending + replayed,
        };
        // Bucket files first (synced above), then the checkpoint that points past them.
        write_atomic(&self.dir.join(CHECKPOINT_FILE), &ck.encode())?;
        w.dirty = false;
        w.last_checkpoint = Instant::now();
        w.files.remove_finished(read_time, w.cascaded)?;
        if w.heap.capacity() > 4096 && w.heap.len() < w.heap.capacity() / 4 {
            w.heap.shrink_to_fit();
        }
        let loaded = w.loaded;
        self.shared.lock().cancelled.retain(|k, c| {
            if c.pending > 0 {
                return true;
            }
            if k.deliver_at < read_time.saturating_sub(FINE_MS) {
                return false; // every entry of that time was processed
            }
            // Its recall entry waits durably in a bucket not loaded yet, which restores it.
            !(k.deliver_at >= loaded && c.log_offset.is_some_and(|o| o < ck.dispatched))
        });
        Ok(())
    }
}

impl crate::Broker {
    /// Runs the delay-message timer once (dispatch, deliver what is due by the broker
    /// clock) and writes its checkpoint. The server runs the timer from
    /// [`Broker::run_maintenance`](crate::Broker::run_maintenance); tests call this after
    /// moving a manual clock.
    pub async fn run_timers_once(&self) -> Result<TimerReport, BrokerError> {
        let t = self.timer.clone();
        tokio::task::spawn_blocking(move || t.run_once(true))
            .await
            .map_err(|e| BrokerError::Internal(format!("timer run failed: {e}")))?
    }

    /// The timer of delay messages.
    pub fn timer(&self) -> &Arc<Timer> {
        &self.timer
    }
}

enum Prepared {
    /// Append this (`true`: a roll copy into `%TIMER%`).
    Append(AppendMessage, bool),
    Recalled,
    Nothing,
}

fn recall_key(m: &StoredMessage, at: i64) -> Option<TimerKey> {
    Some(TimerKey {
        topic: m.property(PROP_REAL_TOPIC)?.to_owned(),
        message_id: std::str::from_utf8(&m.body).ok()?.to_owned(),
        deliver_at: at,
    })
}

/// Resolves a recall in progress, also when its future is dropped: unpins the wheel and
/// keeps the cancel key only if the recall record was stored.
struct RecallGuard<'a> {
    timer: &'a Timer,
    key: TimerKey,
    stored: Option<u64>,
}

impl Drop for RecallGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.timer.shared.lock();
        let s = &mut *g;
        let at = self.key.deliver_at;
        if let Some(n) = s.pinned.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                s.pinned.remove(&at);
            }
        }
        let remove = match s.cancelled.get_mut(&self.key) {
            Some(c) => {
                c.pending = c.pending.saturating_sub(1);
                if let Some(off) = self.stored {
                    c.durable = true;
                    c.log_offset = Some(off);
                }
                !c.durable && c.pending == 0
            }
            None => false,
        };
        if remove {
            s.cancelled.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recall_handles_round_trip_and_reject_tampering() {
        let h = RecallHandle {
            deliver_at: 1_700_000_123_456,
            log_offset: 42,
            topic: "orders".into(),
            message_id: "01AB~cd".into(),
        };
        let s = h.encode();
        assert_eq!(RecallHandle::decode(&s).expect("decodes"), h);
        assert!(RecallHandle::decode(&s.replace("~42~", "~43~")).is_err());
        assert!(RecallHandle::decode("").is_err());
        assert!(RecallHandle::decode("1~2~3~4~5~00000000").is_err());
        assert!(RecallHandle::decode(&"y".repeat(600)).is_err());
    }

    #[test]
    fn entries_and_checkpoints_round_trip_and_detect_damage() {
        let e = Entry {
            fire_at: 1_700_000_000_001,
            log_offset: 7,
            clog_offset: 1 << 40,
            kind: Kind::Roll,
        };
        let mut b = Vec::new();
        e.encode(&mut b);
        assert_eq!(b.len(), ENTRY_LEN);
        assert_eq!(Entry::decode(&b), Some(e));
        b[3] ^= 1;
        assert_eq!(Entry::decode(&b), None);
        assert_eq!(Entry::decode(&[0u8; ENTRY_LEN]), None);

        let ck = Checkpoint {
            dispatched: 9,
            read_time: 1_700_000_000_000,
            cascaded: 1_700_003_600_000,
            pending: 12_345,
        };
        let mut b = ck.encode();
        assert_eq!(b.len(), CHECKPOINT_LEN);
        assert_eq!(Checkpoint::decode(&b), Ok(ck));
        b[20] ^= 1;
        assert!(Checkpoint::decode(&b).is_err());
        assert!(Checkpoint::decode(&b[..10]).is_err());

        // A version 1 checkpoint (44 bytes, no pending count) is still read.
        let mut v1 = ck.encode()[..40].to_vec();
        v1[..4].copy_from_slice(&CHECKPOINT_V1_MAGIC.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Checkpoint::decode(&v1), Ok(Checkpoint { pending: 0, ..ck }));
    }

    #[test]
    fn delivery_times_are_checked() {
        let max = Duration::from_secs(40 * 86_400);
        let now = 1_700_000_000_000;
        assert!(check_delivery_time(None, now, max).is_ok());
        assert!(check_delivery_time(Some(0), now, max).is_ok());
        assert!(check_delivery_time(Some(now + 40 * 86_400_000), now, max).is_ok());
        assert!(matches!(
            check_delivery_time(Some(now + 40 * 86_400_000 + 1), now, max),
            Err(BrokerError::IllegalDeliveryTime(_))
        ));
        assert!(check_delivery_time(Some(-1), now, max).is_err());
        assert!(check_delivery_time(Some(i64::MAX), now, max).is_err());
    }

    #[test]
    fn bucket_files_cut_torn_tails_and_skip_damaged_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = BucketFiles::scan(dir.path()).expect("scan");
        let e = |i: u64| Entry {
            fire_at: 60_000 + i as i64,
            log_offset: i,
            clog_offset: i * 100,
            kind: Kind::Deliver,
        };
        for i in 0..3 {
            f.add(Level::Fine, 60_000, &e(i));
        }
        f.sync().expect("sync");
        let path = f.path(Level::Fine, 60_000);
        // A torn append of half an entry, and garbage in a whole entry.
        let mut raw = std::fs::read(&path).expect("read");
        raw[ENTRY_LEN + 5] ^= 0xff;
        raw.extend_from_slice(&[1u8; 16]);
        std::fs::write(&path, &raw).expect("write");
        std::fs::write(dir.path().join("checkpoint.tmp"), b"x").expect("write");
        let mut f = BucketFiles::scan(dir.path()).expect("scan");
        assert!(!dir.path().join("checkpoint.tmp").exists());
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            3 * ENTRY_LEN as u64
        );
        assert_eq!(f.read(Level::Fine, 60_000).expect("read"), vec![e(0), e(2)]);
        // Appends continue on an entry boundary.
        f.add(Level::Fine, 60_000, &e(3));
        f.sync().expect("sync");
        assert_eq!(
            f.read(Level::Fine, 60_000).expect("read"),
            vec![e(0), e(2), e(3)]
        );
        f.remove_finished(120_000, 0).expect("gc");
        assert!(!path.exists());
        assert!(f.fine.is_empty());
    }

    #[test]
    fn buckets_floor_negative_and_positive_times() {
        assert_eq!(floor(59_999, FINE_MS), 0);
        assert_eq!(floor(60_000, FINE_MS), 60_000);
        assert_eq!(floor(-1, FINE_MS), -60_000);
    }

    proptest! {
        #[test]
        fn recall_handle_decode_never_panics(s in ".{0,200}") {
            let _ = RecallHandle::decode(&s);
        }

        #[test]
        fn entry_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Entry::decode(&b);
        }
    }
}
